/** create, snapshot and resize through the CLI, checked by qemu-img. */
import { existsSync, readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { expect, it } from 'vitest'
import { main } from '../../src/cli/main.js'
import { collector, describeQemu, makeTempDir, qemuImg, qemuImgJson, qemuImgOk, qemuIo, qemuIoOk, useTempDirs } from '../support/qemu.js'

useTempDirs()

async function cli(...argv: string[]): Promise<{ code: number; out: string; err: string }> {
  const stdout = collector()
  const stderr = collector()
  const code = await main(['node', 'imgtool', ...argv], { stdout, stderr, isTTY: false })
  return { code, out: stdout.text(), err: stderr.text() }
}

describeQemu('create / snapshot / resize CLI', () => {
  const dir = makeTempDir('imgtool-cli-')

  it('create: the same qemu-img info as qemu-img create, sizes like 64M, -b/-F with the size taken from the backing file', async () => {
    for (const o of [
      'cluster_size=4096',
      'compat=0.10',
      'refcount_bits=1,lazy_refcounts=on',
      'extended_l2=on,compression_type=zstd',
      'preallocation=metadata,cluster_size=65536',
    ]) {
      const ours = join(dir, 'ours.qcow2')
      const theirs = join(dir, 'theirs.qcow2')
      const r = await cli('create', '-q', '-f', 'qcow2', '-o', o, ours, '64M')
      expect(r.code, r.err).toBe(0)
      await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', o, theirs, '64M'])
      const strip = (j: Record<string, unknown>) => ({ ...j, filename: '', 'actual-size': 0 })
      expect(strip(await qemuImgJson(['info', '--output=json', ours])), o).toEqual(strip(await qemuImgJson(['info', '--output=json', theirs])))
      expect((await qemuImg(['check', ours])).code).toBe(0)
    }
    const base = join(dir, 'base.raw')
    await qemuImgOk(['create', '-q', '-f', 'raw', base, '3M'])
    const r = await cli('create', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', join(dir, 'top.qcow2'))
    expect(r.code, r.err).toBe(0)
    expect(r.out).toMatch(/Formatting '.*top.qcow2', fmt=qcow2/)
    const info = await qemuImgJson<Record<string, unknown>>(['info', '--output=json', join(dir, 'top.qcow2')])
    expect(info['virtual-size']).toBe(3 * 1024 * 1024)
    expect(info['backing-filename-format']).toBe('raw')
    expect((await cli('create', '-f', 'qcow2', '-b', 'base.raw', join(dir, 'x.qcow2'))).code).toBe(1) // -F required
    expect((await cli('create', '-f', 'qcow2', '-o', 'cluster_size=1000', join(dir, 'x.qcow2'), '1M')).err).toMatch(/power of two/)
  })

  it("create: qemu-img's Formatting line, and no file (an existing one untouched) when the options are wrong", async () => {
    await qemuImgOk(['create', '-q', '-f', 'raw', join(dir, 'fb.raw'), '1M'])
    const cases: Array<[string, string[]]> = [
      ['qcow2', []],
      ['qcow2', ['-o', 'compat=0.10']],
      ['qcow2', ['-o', 'cluster_size=64k,lazy_refcounts=true,compat=v3,extended_l2=on,refcount_bits=16']],
      ['qcow2', ['-o', 'preallocation=metadata,compression_type=zstd,refcount_bits=8']],
      ['qcow2', ['-o', 'data_file=fd.raw,data_file_raw=on']],
      ['qcow2', ['-b', 'fb.raw', '-F', 'raw']],
      ['raw', []],
      ['raw', ['-o', 'preallocation=full']],
    ]
    for (const [fmt, args] of cases) {
      const ours = await cli('create', '-f', fmt, ...args, join(dir, 'fmt.img'), '1M')
      const theirs = await qemuImg(['create', '-f', fmt, ...args, 'fmt.img', '1M'], { cwd: dir })
      expect(theirs.code, theirs.stderr).toBe(0)
      expect(ours.out.replace(join(dir, 'fmt.img'), 'fmt.img'), `${fmt} ${args.join(' ')}`).toBe(theirs.stdout)
    }
    for (const [fmt, o] of [
      ['qcow2', 'preallocation=foo'],
      ['qcow2', 'cluster_size=3000'],
      ['raw', 'preallocation=foo'],
      ['qcow2', 'data_file=no/such/dir/d.raw'],
    ]) {
      const fresh = join(dir, `none-${fmt}.img`)
      const ours = await cli('create', '-q', '-f', fmt!, '-o', o!, fresh, '1M')
      const theirs = await qemuImg(['create', '-q', '-f', fmt!, '-o', o!, `none-q-${fmt}.img`, '1M'], { cwd: dir })
      expect([ours.code, theirs.code], o).toEqual([1, 1])
      expect(existsSync(fresh), `${o}: imgtool left a file`).toBe(false)
      expect(existsSync(join(dir, `none-q-${fmt}.img`)), `${o}: qemu-img left a file`).toBe(false)
      const kept = join(dir, 'kept.img')
      writeFileSync(kept, 'precious')
      if (!o!.startsWith('data_file')) {
        expect((await cli('create', '-q', '-f', fmt!, '-o', o!, kept, '1M')).code).toBe(1)
        expect(readFileSync(kept, 'utf8'), `${o}: an existing file was changed`).toBe('precious')
      }
    }
  })

  it('snapshot -c/-l/-a/-d and resize, with qemu-img reading the result', async () => {
    const img = join(dir, 's.qcow2')
    expect((await cli('create', '-q', '-f', 'qcow2', img, '16M')).code).toBe(0)
    await qemuIoOk(img, ['write -P 0x61 0 1M'], { format: 'qcow2' })
    expect((await cli('snapshot', '-c', 'one', img)).code).toBe(0)
    await qemuIoOk(img, ['write -P 0x62 0 512k'], { format: 'qcow2' })
    const list = await cli('snapshot', '-l', img)
    expect(list.out).toMatch(/Snapshot list:[\s\S]*1\s+one/)
    expect(await qemuImgOk(['snapshot', '-l', img])).toMatch(/one/)
    expect((await cli('snapshot', '-a', 'one', img)).code).toBe(0)
    await qemuIoOk(img, ['read -P 0x61 0 1M'], { format: 'qcow2' })
    expect((await cli('snapshot', '-d', 'one', img)).code).toBe(0)
    expect((await cli('snapshot', '-d', 'nope', img)).code).toBe(1)
    expect((await cli('resize', img, '+48M')).out).toMatch(/Image resized/)
    expect((await cli('resize', img, '1M')).err).toMatch(/--shrink/)
    expect((await cli('resize', '--shrink', img, '2M')).code).toBe(0)
    const info = await qemuImgJson<Record<string, number>>(['info', '--output=json', img])
    expect(info['virtual-size']).toBe(2 * 1024 * 1024)
    const chk = await qemuImg(['check', img])
    expect(chk.code, chk.stdout + chk.stderr).toBe(0)
    await qemuIoOk(img, ['read -P 0x61 0 1M'], { format: 'qcow2' })
  })

  it('a dirty image (qemu-io abort with lazy refcounts) is repaired when opened read-write, and says so', async () => {
    const img = join(dir, 'dirty.qcow2')
    await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on,cluster_size=4096', img, '8M'])
    await qemuIo(['-f', 'qcow2', '-c', 'write -P 0x71 0 300k', '-c', 'abort', img])
    const before = await qemuImgJson<Record<string, unknown>>(['info', '--output=json', img])
    expect(before['dirty-flag']).toBe(true)
    const r = await cli('resize', img, '+1M')
    expect(r.code, r.err).toBe(0)
    expect(r.err).toMatch(/not closed cleanly; refcounts were rebuilt/)
    const chk = await qemuImg(['check', img])
    expect(chk.code, chk.stdout + chk.stderr).toBe(0)
    await qemuIoOk(img, ['read -P 0x71 0 300k'], { format: 'qcow2' })
  })
})
