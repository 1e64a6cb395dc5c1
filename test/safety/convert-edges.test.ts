/**
 * convert at its edges (issue 9 items 1, 5, 6): a target that is any file the
 * source reads is refused before anything is touched; options and the source
 * are checked before the target is created; a failed convert leaves no target
 * behind; -S 0 makes a fully allocated target, as qemu-img does.
 */
import { existsSync, linkSync, readFileSync, statSync, symlinkSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { expect, it } from 'vitest'
import { cli } from '../support/cli.js'
import { describeQemu, makeTempDir, md5File, qemuImgOk, qemuIoOk, useTempDirs } from '../support/qemu.js'

useTempDirs()

async function imageWithData(dir: string, name = 'src.qcow2'): Promise<string> {
  const p = join(dir, name)
  await qemuImgOk(['create', '-q', '-f', 'qcow2', p, '8M'])
  await qemuIoOk(p, ['write -P 7 0 4M'])
  return p
}

describeQemu('convert never destroys its source', () => {
  it('refuses a target that is the source itself, through a symlink or a hard link, for qcow2 and raw targets', async () => {
    const dir = makeTempDir()
    const src = await imageWithData(dir)
    const before = await md5File(src)
    symlinkSync(src, join(dir, 'link.qcow2'))
    linkSync(src, join(dir, 'hard.qcow2'))
    for (const [fmt, dst] of [
      ['qcow2', src],
      ['raw', src],
      ['qcow2', join(dir, 'link.qcow2')],
      ['raw', join(dir, 'hard.qcow2')],
    ] as const) {
      const r = await cli('convert', '-O', fmt, src, dst)
      expect(r.code).toBe(1)
      expect(r.stderr).toMatch(/^imgtool: convert: the target '.*' is the source image.*refusing to overwrite it\n$/)
    }
    expect(await md5File(src)).toBe(before)
  })

  it('refuses a raw source converted onto itself', async () => {
    const dir = makeTempDir()
    const p = join(dir, 'x.raw')
    writeFileSync(p, Buffer.alloc(1 << 20, 9))
    const r = await cli('convert', '-O', 'raw', p, p)
    expect(r.code).toBe(1)
    expect(readFileSync(p).every((b) => b === 9)).toBe(true)
  })

  it('refuses a target that is a backing file of the source, or its external data file', async () => {
    const dir = makeTempDir()
    const base = join(dir, 'base.qcow2')
    await qemuImgOk(['create', '-q', '-f', 'qcow2', base, '4M'])
    await qemuIoOk(base, ['write -P 1 3M 64k'])
    const mid = join(dir, 'mid.qcow2')
    await qemuImgOk(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', mid])
    const top = join(dir, 'top.qcow2')
    await qemuImgOk(['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', top])
    await qemuIoOk(top, ['write -P 7 512k 4k'])
    const baseMd5 = await md5File(base)
    for (const dst of [base, mid]) {
      const r = await cli('convert', '-O', 'qcow2', top, dst)
      expect(r.code).toBe(1)
      expect(r.stderr).toMatch(/is a file the source image reads/)
    }
    expect(await md5File(base)).toBe(baseMd5)

    const df = join(dir, 'df.qcow2')
    // qemu opens a relative data_file name from its working directory
    await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', 'data_file=df.data', df, '1M'], { cwd: dir })
    await qemuIoOk(df, ['write -P 5 0 64k'], { cwd: dir })
    const dataMd5 = await md5File(join(dir, 'df.data'))
    const r = await cli('convert', '-O', 'raw', df, join(dir, 'df.data'))
    expect(r.code).toBe(1)
    expect(await md5File(join(dir, 'df.data'))).toBe(dataMd5)
  })

  it("refuses a target that is the dm-snapshot origin, or the target's own -B backing file", async () => {
    const dir = makeTempDir()
    const origin = join(dir, 'origin.img')
    writeFileSync(origin, Buffer.alloc(1 << 20, 3))
    const r = await cli('convert', '-O', 'dmsnap', '-o', `origin=${origin}`, origin, origin)
    expect(r.code).toBe(1)
    expect(readFileSync(origin).every((b) => b === 3)).toBe(true)
    const src = await imageWithData(dir)
    const r2 = await cli('convert', '-O', 'dmsnap', '-o', `origin=${origin}`, src, origin)
    expect(r2.code).toBe(1)
    expect(r2.stderr).toMatch(/origin|source/)
    const base = join(dir, 'b.qcow2')
    await qemuImgOk(['create', '-q', '-f', 'qcow2', base, '8M'])
    const bmd5 = await md5File(base)
    const r3 = await cli('convert', '-O', 'qcow2', '-B', 'b.qcow2', '-F', 'qcow2', src, base)
    expect(r3.code).toBe(1)
    expect(r3.stderr).toMatch(/own backing file/)
    expect(await md5File(base)).toBe(bmd5)
  })
})

describeQemu('convert leaves nothing half-made', () => {
  it('checks target options before creating the target: no new file, an existing one intact', async () => {
    const dir = makeTempDir()
    const src = await imageWithData(dir)
    const fresh = join(dir, 'new.qcow2')
    for (const o of ['cluster_size=3', 'bogus=1', 'compat=0.10,extended_l2=on']) {
      const r = await cli('convert', '-O', 'qcow2', '-o', o, src, fresh)
      expect(r.code).toBe(1)
      expect(existsSync(fresh)).toBe(false)
    }
    const r = await cli('convert', '-O', 'raw', '-o', 'cluster_size=4k', src, fresh)
    expect(r.code).toBe(1)
    expect(existsSync(fresh)).toBe(false)
    const keep = join(dir, 'keep.img')
    writeFileSync(keep, 'precious\n')
    const r2 = await cli('convert', '-O', 'qcow2', '-o', 'bogus=1', src, keep)
    expect(r2.code).toBe(1)
    expect(readFileSync(keep, 'utf8')).toBe('precious\n')
  })

  it('refuses an encrypted source before creating the target', async () => {
    const dir = makeTempDir()
    const enc = join(dir, 'enc.qcow2')
    await qemuImgOk([
      'create',
      '-q',
      '-f',
      'qcow2',
      '--object',
      'secret,id=s0,data=pw',
      '-o',
      'encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10',
      enc,
      '1M',
    ])
    const dst = join(dir, 'out.qcow2')
    const r = await cli('convert', '-O', 'qcow2', enc, dst)
    expect(r.code).toBe(1)
    expect(r.stderr).toMatch(/encrypted/)
    expect(existsSync(dst)).toBe(false)
  })

  it('removes the target it created when the source fails half way, and says so', async () => {
    const dir = makeTempDir()
    const src = join(dir, 'c.qcow2')
    const raw = join(dir, 'in.raw')
    const data = Buffer.alloc(4 << 20)
    for (let i = 0; i < data.length; i += 4096) data.fill((i >> 12) & 0xff, i, i + 2048)
    writeFileSync(raw, data)
    await qemuImgOk(['convert', '-c', '-O', 'qcow2', '-o', 'cluster_size=4096', raw, src])
    // damage the last compressed cluster's bytes: reading it fails after the first chunks were written
    const buf = readFileSync(src)
    const l1 = Number(buf.readBigUInt64BE(40))
    const l2 = Number(buf.readBigUInt64BE(l1 + 8) & 0x00fffffffffffe00n) // L1[1]: guest 2M..4M
    const entry = buf.readBigUInt64BE(l2 + 511 * 8) // the image's last cluster
    expect(entry >> 62n).toBe(1n) // compressed
    const host = Number(entry & ((1n << 58n) - 1n)) // cluster_bits 12: 62 - (12 - 8) offset bits
    buf.fill(0xff, host, host + 64)
    writeFileSync(src, buf)
    for (const fmt of ['qcow2', 'raw']) {
      const dst = join(dir, `out-${fmt}`)
      const r = await cli('convert', '-m', '1', '-O', fmt, src, dst)
      expect(r.code).toBe(1)
      expect(r.stderr).toMatch(/partial target .* was removed/)
      expect(existsSync(dst)).toBe(false)
    }
  })

  it('stops when its AbortSignal fires and removes the target (library)', async () => {
    const dir = makeTempDir()
    const src = join(dir, 'big.qcow2')
    await qemuImgOk(['create', '-q', '-f', 'qcow2', src, '32M'])
    await qemuIoOk(src, ['write -P 7 0 32M'])
    const { convertFile } = await import('../../src/convert/to-file.js')
    const ac = new AbortController()
    const dst = join(dir, 'aborted.qcow2')
    let calls = 0
    const p = convertFile(src, dst, {
      targetFormat: 'qcow2',
      signal: ac.signal,
      onProgress: () => {
        if (++calls === 1) ac.abort()
      },
    })
    await expect(p).rejects.toMatchObject({ code: 'INTERRUPTED' })
    expect(existsSync(dst)).toBe(false)
  })
})

describeQemu('convert -S 0', () => {
  it('allocates the whole target as qemu-img does: the same qcow2 file, raw fully allocated', async () => {
    const dir = makeTempDir()
    const src = join(dir, 's.qcow2')
    await qemuImgOk(['create', '-q', '-f', 'qcow2', src, '4M'])
    await qemuIoOk(src, ['write -P 7 0 64k', 'write -z 1M 64k', 'write -P 0 2M 64k'])
    const sparse = join(dir, 'sp.raw')
    writeFileSync(sparse, 'abc')
    const { truncateSync } = await import('node:fs')
    truncateSync(sparse, 4 << 20)
    for (const [input, tag] of [
      [src, 'q'],
      [sparse, 'r'],
    ] as const) {
      const oursQ = join(dir, `${tag}-ours.qcow2`)
      const theirsQ = join(dir, `${tag}-theirs.qcow2`)
      expect((await cli('convert', '-S', '0', '-O', 'qcow2', input, oursQ)).code).toBe(0)
      await qemuImgOk(['convert', '-S', '0', '-O', 'qcow2', input, theirsQ])
      expect(await md5File(oursQ)).toBe(await md5File(theirsQ))
      const oursR = join(dir, `${tag}-ours.raw`)
      expect((await cli('convert', '-S', '0', '-O', 'raw', input, oursR)).code).toBe(0)
      expect(statSync(oursR).blocks * 512).toBeGreaterThanOrEqual(4 << 20)
    }
    // the default stays sparse
    const d = join(dir, 'default.raw')
    expect((await cli('convert', '-O', 'raw', sparse, d)).code).toBe(0)
    expect(statSync(d).blocks * 512).toBeLessThan(1 << 20)
  })
})
