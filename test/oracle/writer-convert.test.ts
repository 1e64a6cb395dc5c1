/**
 * convert and compare through the CLI, against live qemu-img: what we convert
 * qemu-img compare calls identical to the source; -c output is compressed and
 * smaller; -B output relies on its backing file; our compare gives qemu-img
 * compare's exit codes and first differing offset.
 */
import { readFileSync, statSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { expect, it } from 'vitest'
import { main } from '../../src/cli/main.js'
import { deflateAddon } from '../../src/formats/qcow2/write/deflate-addon.js'
import { Prng } from '../support/prng.js'
import { REQUIRE_QEMU, collector, describeQemu, makeTempDir, qemuImg, qemuImgJson, qemuImgOk, qemuIoOk, useTempDirs } from '../support/qemu.js'

useTempDirs()

async function cli(...argv: string[]): Promise<{ code: number; out: string; err: string; bytes: Buffer }> {
  return cliTTY(false, ...argv)
}

async function cliTTY(isTTY: boolean, ...argv: string[]): Promise<{ code: number; out: string; err: string; bytes: Buffer }> {
  const stdout = collector()
  const stderr = collector()
  const code = await main(['node', 'imgtool', ...argv], { stdout, stderr, isTTY })
  return { code, out: stdout.text(), err: stderr.text(), bytes: stdout.bytes() }
}

describeQemu('convert and compare (CLI) against qemu-img', () => {
  const dir = makeTempDir('imgtool-convert-')
  const src = join(dir, 'src.qcow2')

  it('prepares a qemu-written source with data, zeros and holes', async () => {
    await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', src, '8M'])
    await qemuIoOk(src, ['write -P 0x11 0 100k', 'write -P 0x22 3M 1M', 'write -z 3300k 40k', 'write -P 0 6M 64k', 'write -P 0x33 8170k 12k'], {
      format: 'qcow2',
    })
  })

  for (const [name, args] of [
    ['qcow2', ['-O', 'qcow2']],
    ['qcow2 -c (zlib)', ['-O', 'qcow2', '-c']],
    ['qcow2 -c (zstd, 64 KiB clusters)', ['-O', 'qcow2', '-c', '-o', 'compression_type=zstd']],
    ['qcow2 with options', ['-O', 'qcow2', '-o', 'cluster_size=512,refcount_bits=8,extended_l2=off']],
    ['raw', ['-O', 'raw']],
    ['raw, -S 0', ['-O', 'raw', '-S', '0']],
  ] as Array<[string, string[]]>) {
    it(`converts to ${name}: qemu-img compare says identical, qemu-img check is clean`, async () => {
      const dst = join(dir, `out-${name.replace(/\W+/g, '_')}.${args[1]}`)
      const r = await cli('convert', ...args, src, dst)
      expect(r.code, r.err).toBe(0)
      const cmp = await qemuImg(['compare', src, dst])
      expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0)
      if (args[1] === 'qcow2') {
        const chk = await qemuImg(['check', dst])
        expect(chk.code, chk.stdout + chk.stderr).toBe(0)
        const map = await qemuImgJson<Array<{ start: number; length: number; data: boolean }>>(['map', '--output=json', dst])
        // the 64 KiB of zeros written as data at 6M stay sparse (zero detection)
        expect(map.some((m) => m.data && m.start <= 6 * 1024 * 1024 && m.start + m.length > 6 * 1024 * 1024 + 8192)).toBe(false)
        if (args.includes('-c')) {
          const check = await qemuImgJson<{ 'compressed-clusters'?: number }>(['check', '--output=json', dst])
          expect(check['compressed-clusters'] ?? 0).toBeGreaterThan(0)
        }
      } else if (!args.includes('0')) {
        expect(statSync(dst).blocks * 512).toBeLessThan(3 * 1024 * 1024) // sparse
      }
    })
  }

  it('-c: the same file as qemu-img convert -c, byte for byte, with the deflate addon on the system zlib', async () => {
    const addon = deflateAddon()
    const systemZlib = addon !== null && addon.zlibVersion() !== process.versions.zlib
    if (!systemZlib) {
      // CI builds the addon against Debian's zlib1g-dev (.ci/run); elsewhere the bytes may differ from qemu-img's
      if (REQUIRE_QEMU) throw new Error(`the deflate addon is ${addon ? `on Node's zlib ${addon.zlibVersion()}` : 'not built'}: install zlib1g-dev and rebuild`)
      console.log('[convert -c identity] skipped: the deflate addon does not use the system zlib')
      return
    }
    // compressible text-like clusters, random (incompressible) clusters, zero clusters, a partial tail
    const rng = new Prng(21)
    const size = 3 * 1024 * 1024 + 12345
    const raw = new Uint8Array(size)
    for (let off = 0; off < size; off += 4096) {
      const kind = rng.int(4)
      const n = Math.min(4096, size - off)
      if (kind === 0) continue
      if (kind === 1) raw.set(rng.bytes(n), off)
      else for (let i = 0; i < n; i++) raw[off + i] = 97 + ((i * 7 + (off >> 12) + rng.int(3)) % 26)
    }
    const src = join(dir, 'c-src.raw')
    writeFileSync(src, raw)
    // a sparse raw file (4 KiB pieces in holes: clusters partly data) and a qcow2 source with 4 KiB clusters
    const sparse = join(dir, 'c-sparse.raw')
    await qemuImgOk(['create', '-q', '-f', 'raw', sparse, '5M'])
    const sparseQ = join(dir, 'c-sparse.qcow2')
    await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', sparseQ, '5M'])
    const cmds: string[] = []
    for (let i = 0; i < 40; i++) cmds.push(`write -P ${i % 3 === 0 ? 0 : 0x41 + (i % 20)} ${rng.int(1280) * 4096} 4096`)
    cmds.push(`write -P 0x5a ${5 * 1024 * 1024 - 4096} 4096`)
    await qemuIoOk(sparse, cmds, { format: 'raw' })
    await qemuIoOk(sparseQ, cmds, { format: 'qcow2' })
    const cases: Array<[string, string, number, string[]]> = []
    for (const cs of [512, 4096, 65536, 2 * 1024 * 1024]) cases.push(['raw', src, cs, []])
    for (const cs of [512, 65536]) cases.push(['raw', sparse, cs, []])
    cases.push(['qcow2', sparseQ, 65536, []])
    cases.push(['raw', src, 4096, ['refcount_bits=1']])
    for (const [fmt, input, cs, extra] of cases) {
      const what = `${input} -> cluster ${cs} ${extra.join(',')}`
      const opts = [`cluster_size=${cs}`, ...extra].join(',')
      const ours = join(dir, 'c-ours.qcow2')
      const theirs = join(dir, 'c-theirs.qcow2')
      const r = await cli('convert', '-c', '-f', fmt, '-O', 'qcow2', '-o', opts, input, ours)
      expect(r.code, r.err).toBe(0)
      await qemuImgOk(['convert', '-c', '-f', fmt, '-O', 'qcow2', '-o', opts, input, theirs])
      const a = readFileSync(ours)
      const b = readFileSync(theirs)
      expect(a.byteLength, `${what}: file size`).toBe(b.byteLength)
      expect(a.equals(b), `${what}: bytes differ from qemu-img's`).toBe(true)
    }
  })

  it('-O raw -o preallocation=off|falloc|full: the same file, size and allocated blocks as qemu-img', async () => {
    for (const o of [[], ['-o', 'preallocation=falloc'], ['-o', 'preallocation=full']]) {
      const ours = join(dir, 'pre-ours.raw')
      const theirs = join(dir, 'pre-theirs.raw')
      const r = await cli('convert', '-O', 'raw', ...o, src, ours)
      expect(r.code, r.err).toBe(0)
      await qemuImgOk(['convert', '-O', 'raw', ...o, src, theirs])
      expect(readFileSync(ours).equals(readFileSync(theirs)), o.join(' ')).toBe(true)
      expect(Math.abs(statSync(ours).blocks - statSync(theirs).blocks), `${o.join(' ')}: allocated blocks`).toBeLessThanOrEqual(8)
    }
  })

  it('converts to raw on stdout (-), progress never on stdout', async () => {
    const r = await cliTTY(true, 'convert', '-p', '-O', 'raw', src, '-')
    expect(r.code, r.err).toBe(0)
    const raw = join(dir, 'stdout.raw')
    writeFileSync(raw, r.bytes)
    expect(r.bytes.byteLength).toBe(8 * 1024 * 1024)
    const cmp = await qemuImg(['compare', '-f', 'qcow2', '-F', 'raw', src, raw])
    expect(cmp.code).toBe(0)
  })

  it("-p without a terminal prints qemu-img's progress lines on stdout, nothing on stderr; without -p nothing", async () => {
    const r = await cli('convert', '-p', '-O', 'qcow2', src, join(dir, 'progress.qcow2'))
    expect(r.code).toBe(0)
    expect(r.out).toMatch(/^(?: {4}\(\d{1,3}\.\d\d\/100%\)\r)+\n$/)
    expect(r.err).toBe('')
    const q = await cli('convert', '-O', 'qcow2', src, join(dir, 'quiet.qcow2'))
    expect([q.code, q.out, q.err]).toEqual([0, '', ''])
  })

  it('converts with -B: only what differs from the backing file is written', async () => {
    const base = join(dir, 'base.qcow2')
    const top = join(dir, 'top.qcow2')
    await qemuImgOk(['create', '-q', '-f', 'qcow2', base, '4M'])
    await qemuIoOk(base, ['write -P 0x44 0 2M'], { format: 'qcow2' })
    await qemuImgOk(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top], { cwd: dir })
    await qemuIoOk(top, ['write -P 0x55 1M 64k', 'write -z 1536k 64k'], { format: 'qcow2' })
    const out = join(dir, 'rebased.qcow2')
    const r = await cli('convert', '-O', 'qcow2', '-B', 'base.qcow2', '-F', 'qcow2', top, out)
    expect(r.code, r.err).toBe(0)
    const cmp = await qemuImg(['compare', top, out], { cwd: dir })
    expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0)
    const info = await qemuImgJson<{ 'backing-filename': string }>(['info', '--output=json', out], { cwd: dir })
    expect(info['backing-filename']).toBe('base.qcow2')
    const map = await qemuImgJson<Array<{ depth: number; data: boolean }>>(['map', '--output=json', out], { cwd: dir })
    expect(map.some((m) => m.depth === 1 && m.data)).toBe(true) // the 0x44 data comes from the backing file
  })

  it('compare: exit codes and first differing offset as qemu-img', async () => {
    const a = join(dir, 'a.raw')
    const b = join(dir, 'b.qcow2')
    const c = join(dir, 'c.raw')
    await qemuImgOk(['create', '-q', '-f', 'raw', a, '1M'])
    await qemuImgOk(['create', '-q', '-f', 'qcow2', b, '1M'])
    await qemuImgOk(['create', '-q', '-f', 'raw', c, '2M'])
    const cases: string[][] = [
      [a, b],
      ['-s', a, b],
      [a, c],
      ['-s', a, c],
      [a, join(dir, 'missing.raw')],
    ]
    for (const args of cases) {
      const ours = await cli('compare', ...args)
      const theirs = await qemuImg(['compare', ...args])
      expect(ours.code, `${args.join(' ')}: ${ours.out}${ours.err}`).toBe(theirs.code)
      if (theirs.code !== 2) expect(ours.out.trim()).toBe(theirs.stdout.trim())
    }
    await qemuIoOk(b, ['write -P 1 700000 1'], { format: 'qcow2' })
    await qemuIoOk(c, ['write -P 2 1500000 1'], { format: 'raw' })
    for (const args of [
      [a, b],
      [a, c],
      [b, a],
    ]) {
      const ours = await cli('compare', ...args)
      const theirs = await qemuImg(['compare', ...args])
      expect([ours.code, ours.out.trim()], args.join(' ')).toEqual([theirs.code, theirs.stdout.trim()])
    }
  })
})
