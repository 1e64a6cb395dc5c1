/** imgtool cat: guest bytes to stdout, --offset/--length, errors, and a reader that goes away early. */
import { spawn } from 'node:child_process'
import { createHash } from 'node:crypto'
import { closeSync, existsSync, openSync, readdirSync, readFileSync, readSync, writeFileSync, writeSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { afterAll, describe, expect, it } from 'vitest'
import { positionedOutput } from '../../src/convert/export.js'
import { main } from '../../src/cli/main.js'
import { copyRangeAddon, fileOffsetAddon } from '../../src/io/seek-hole.js'
import { openImage } from '../../src/open.js'
import { cleanupTempDirs, collector, describeQemu, findExecutable, makeTempDir, QEMU_IMG, qemuImgOk, qemuIoOk } from '../support/qemu.js'

const ROOT = resolve(__dirname, '..', '..')
const BIN = join(ROOT, 'bin', 'imgtool')
const FIXTURES = join(ROOT, 'images', 'qcow2')
const fx = (name: string): string => join(FIXTURES, name)

async function cli(...args: string[]): Promise<{ code: number; stdout: Buffer; stderr: string }> {
  const out = collector()
  const err = collector()
  const code = await main(['node', 'imgtool', ...args], { stdout: out, stderr: err, isTTY: false })
  return { code, stdout: out.bytes(), stderr: err.text() }
}

async function guest(name: string, offset = 0, length?: number): Promise<Buffer> {
  const img = await openImage(fx(name))
  try {
    return Buffer.from(await img.read(offset, length ?? img.virtualSize - offset))
  } finally {
    await img.close()
  }
}

const md5 = (b: Uint8Array): string => createHash('md5').update(b).digest('hex')

describe('imgtool cat', () => {
  it('writes every guest byte (md5 of qemu-img convert -O raw)', async () => {
    for (const name of ['v3-c4k.qcow2', 'chain-top.qcow2', 'v3-compressed-zstd-c4k.qcow2']) {
      const r = await cli('cat', fx(name))
      expect(r.code).toBe(0)
      expect(r.stderr).toBe('')
      expect(md5(r.stdout), name).toBe(readFileSync(fx(`${name}.md5`), 'utf8').trim())
    }
  })

  it('--offset and --length select a range, with size suffixes', async () => {
    const name = 'v3-c4k.qcow2'
    const cases: Array<[string[], number, number | undefined]> = [
      [['--offset', '2040K', '--length', '16K'], 2040 * 1024, 16 * 1024],
      [['--offset', '6150000', '--length', '1234'], 6150000, 1234],
      [['--offset', '1', '--length', '1'], 1, 1],
      [['--offset', '8188k'], 8188 * 1024, undefined],
      [['--length', '100'], 0, 100],
      [['--offset', '8M'], 8 * 1024 * 1024, 0],
      [['--offset', '4064k', '--length', '0'], 4064 * 1024, 0],
    ]
    for (const [flags, offset, length] of cases) {
      const r = await cli('cat', ...flags, fx(name))
      expect(r.code, flags.join(' ')).toBe(0)
      expect(r.stderr).toBe('')
      expect(r.stdout.equals(await guest(name, offset, length)), flags.join(' ')).toBe(true)
    }
  })

  it('ranges past the virtual size are one line and exit 1, nothing on stdout', async () => {
    const p = fx('v3-c4k.qcow2')
    const cases: Array<[string[], string]> = [
      [['--offset', '9M'], `imgtool: ${p}: offset 9437184 is beyond the virtual size 8388608\n`],
      [['--length', '9M'], `imgtool: ${p}: 0+9437184 is beyond the virtual size 8388608\n`],
      [['--offset', '8M', '--length', '1'], `imgtool: ${p}: 8388608+1 is beyond the virtual size 8388608\n`],
      [['--offset', 'abc'], "imgtool: invalid offset 'abc' (expected a number with an optional K/M/G/T suffix)\n"],
      [['--length', '-5'], "imgtool: invalid length '-5' (expected a number with an optional K/M/G/T suffix)\n"],
    ]
    for (const [flags, stderr] of cases) {
      const r = await cli('cat', ...flags, p)
      expect(r.code, flags.join(' ')).toBe(1)
      expect(r.stdout.length).toBe(0)
      expect(r.stderr).toBe(stderr)
    }
  })

  it('-f raw writes the file itself; an unknown format and a missing file are one line, exit 1', async () => {
    const raw = await cli('cat', '-f', 'raw', fx('v3-c4k.qcow2'))
    expect(raw.code).toBe(0)
    expect(raw.stdout.equals(readFileSync(fx('v3-c4k.qcow2')))).toBe(true)
    const bad = await cli('cat', '-f', 'vdi', fx('v3-c4k.qcow2'))
    expect([bad.code, bad.stdout.length, bad.stderr]).toEqual([1, 0, "imgtool: Unknown file format 'vdi' (known: qcow2, dmsnap, vpc, vmdk, raw)\n"])
    const missing = await cli('cat', join(FIXTURES, 'missing.qcow2'))
    expect([missing.code, missing.stdout.length, missing.stderr]).toEqual([1, 0, `imgtool: ${join(FIXTURES, 'missing.qcow2')}: No such file or directory\n`])
  })

  it('streams through a real pipe: the bytes of the process equal the library read', async () => {
    const child = spawn(process.execPath, [BIN, 'cat', '--offset', '2040k', '--length', '2100k', fx('v3-c4k.qcow2')], { stdio: ['ignore', 'pipe', 'pipe'] })
    const out: Buffer[] = []
    let err = ''
    child.stdout.on('data', (c: Buffer) => out.push(c))
    child.stderr.on('data', (c: Buffer) => (err += c.toString()))
    const code = await new Promise<number | null>((r) => child.on('close', r))
    expect(err).toBe('')
    expect(code).toBe(0)
    expect(Buffer.concat(out).equals(await guest('v3-c4k.qcow2', 2040 * 1024, 2100 * 1024))).toBe(true)
  })

  it('stdout redirected to a file (the fast path: reused buffers, writes on the I/O threads) gets every byte', async () => {
    const dir = makeTempDir('imgtool-cat-')
    const cases: Array<[string, string[], () => Promise<Buffer>]> = [
      ['v3-c4k.qcow2', [], () => guest('v3-c4k.qcow2')],
      ['chain-top.qcow2', [], () => guest('chain-top.qcow2')],
      ['v3-compressed-zstd-c4k.qcow2', [], () => guest('v3-compressed-zstd-c4k.qcow2')],
      ['v3-extl2-c64k.qcow2', ['--offset', '12345', '--length', '1000000'], () => guest('v3-extl2-c64k.qcow2', 12345, 1000000)],
      ['v3-c64k-1g.qcow2', ['--length', '40M'], () => guest('v3-c64k-1g.qcow2', 0, 40 * 1024 * 1024)],
    ]
    for (const [name, flags, want] of cases) {
      const out = join(dir, `${name}.raw`)
      const fd = openSync(out, 'w')
      writeSync(fd, 'head:') // cat writes at the file's current offset
      const child = spawn(process.execPath, [BIN, 'cat', ...flags, fx(name)], { stdio: ['ignore', fd, 'pipe'] })
      closeSync(fd)
      let err = ''
      child.stderr!.on('data', (c: Buffer) => (err += c.toString()))
      const code = await new Promise<number | null>((r) => child.on('close', r))
      expect(err).toBe('')
      expect(code).toBe(0)
      const got = readFileSync(out)
      expect(got.subarray(0, 5).toString()).toBe('head:')
      expect(md5(got.subarray(5)), name).toBe(md5(await want()))
    }
    cleanupTempDirs(dir)
  })

  it.runIf(findExecutable('head') !== undefined)('cat | head -c 10 closes early without an error', async () => {
    // 1 GiB of guest data into a pipe whose reader leaves after 10 bytes
    const t0 = performance.now()
    const cat = spawn(process.execPath, [BIN, 'cat', fx('v3-c64k-1g.qcow2')], { stdio: ['ignore', 'pipe', 'pipe'] })
    const head = spawn(findExecutable('head')!, ['-c', '10'], { stdio: [cat.stdout, 'pipe', 'inherit'] })
    // head holds the read end now; the parent's copy must go, or the pipe never closes
    cat.stdout.destroy()
    const killer = setTimeout(() => cat.kill('SIGKILL'), 20_000)
    let err = ''
    cat.stderr.on('data', (c: Buffer) => (err += c.toString()))
    const got: Buffer[] = []
    head.stdout.on('data', (c: Buffer) => got.push(c))
    const [catCode, headCode] = await Promise.all([
      new Promise<number | null>((r) => cat.on('close', (c, s) => r(c ?? (s ? -1 : null)))),
      new Promise<number | null>((r) => head.on('close', r)),
    ])
    clearTimeout(killer)
    expect(headCode).toBe(0)
    expect(Buffer.concat(got).equals(await guest('v3-c64k-1g.qcow2', 0, 10))).toBe(true)
    expect(err).toBe('')
    expect(catCode).toBe(0)
    expect(performance.now() - t0).toBeLessThan(15_000)
  })

  it('a consumer that stops reading in process ends cat quietly (EPIPE)', async () => {
    const { Writable } = await import('node:stream')
    let n = 0
    const stdout = new Writable({
      write(chunk: Buffer, _e, cb) {
        n += chunk.length
        const e = Object.assign(new Error('write EPIPE'), { code: 'EPIPE' })
        cb(e)
      },
    })
    stdout.on('error', () => undefined)
    const err = collector()
    const code = await main(['node', 'imgtool', 'cat', fx('v3-c4k.qcow2')], { stdout, stderr: err, isTTY: false })
    expect(code).toBe(0)
    expect(err.text()).toBe('')
    expect(n).toBeGreaterThan(0)
  })
})

// ---------------------------------------------------------------------------
// stdout as the shell sets it up: `> out`, `>> out`, `{ a; cat; b; } > out`, `1<> out`, a pipe.
// With the addon (native/seekhole.c: lseek, fcntl) cat writes a file it may place writes in
// by position, several at once, and leaves the file offset after its bytes; without it
// (IMGTOOL_NO_SEEK_HOLE=1), and for `>>`, `1<>` and pipes, it writes in order at the offset.
// Every mode must leave the same bytes, equal to qemu-img convert's, and the same offset.

const sq = (s: string): string => `'${s.replace(/'/g, `'\\''`)}'`
const IMGTOOL = `${sq(process.execPath)} ${sq(BIN)}`
const MODES: Array<[string, NodeJS.ProcessEnv]> = [
  ['addon (positional writes where possible)', {}],
  ['no addon (writes in order)', { IMGTOOL_NO_SEEK_HOLE: '1' }],
]

function sh(script: string, env: NodeJS.ProcessEnv = {}): Promise<{ code: number | null; stderr: string }> {
  return new Promise((resolvePromise, reject) => {
    const child = spawn('sh', ['-c', script], { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, ...env } })
    let stderr = ''
    child.stderr.on('data', (c: Buffer) => (stderr += c.toString()))
    child.on('error', reject)
    child.on('close', (code) => resolvePromise({ code, stderr }))
  })
}

const shellDir = makeTempDir('imgtool-cat-sh-')
afterAll(() => cleanupTempDirs(shellDir))

/** qemu-img convert -O raw of a fixture (made once), or undefined without qemu-img. */
const rawCache = new Map<string, string>()
async function qemuRaw(name: string): Promise<string | undefined> {
  if (QEMU_IMG === undefined) return undefined
  let p = rawCache.get(name)
  if (!p) {
    p = join(shellDir, `${name}.qemu.raw`)
    await qemuImgOk(['convert', '-O', 'raw', fx(name), p])
    rawCache.set(name, p)
  }
  return p
}

/** The guest bytes cat must write: qemu-img convert's output, else the library's read checked against the fixture md5. */
async function expected(name: string, offset: number, length: number | undefined): Promise<Buffer> {
  const raw = await qemuRaw(name)
  if (raw !== undefined) {
    const fd = openSync(raw, 'r')
    try {
      const n = length ?? readFileSync(raw).length - offset
      const b = Buffer.alloc(n)
      expect(readSync(fd, b, 0, n, offset)).toBe(n)
      if (offset === 0 && length === undefined) expect(md5(b), name).toBe(readFileSync(fx(`${name}.md5`), 'utf8').trim())
      return b
    } finally {
      closeSync(fd)
    }
  }
  const b = await guest(name, offset, length)
  if (offset === 0 && length === undefined) expect(md5(b), name).toBe(readFileSync(fx(`${name}.md5`), 'utf8').trim())
  return b
}

describe('imgtool cat through a real shell', () => {
  it('the addon is built with lseek, fcntl and copy_file_range (so the positional path is what the "addon" mode tests)', () => {
    if (!existsSync(join(ROOT, 'build', 'Release', 'seekhole.node'))) {
      console.warn('[imgtool tests] native addon not built: cat through a shell is tested without positional writes only')
      return
    }
    expect(fileOffsetAddon()).not.toBeNull()
    expect(copyRangeAddon()).not.toBeNull()
  })

  const cases: Array<[string, string[], number, number | undefined]> = [
    ['v3-c4k.qcow2', [], 0, undefined],
    ['chain-top.qcow2', [], 0, undefined],
    ['v3-compressed-zstd-c4k.qcow2', [], 0, undefined],
    ['v3-extl2-c64k.qcow2', ['--offset', '12345', '--length', '1000000'], 12345, 1000000],
    // 30 MiB across the data in the middle of the image: many chunks, unaligned to them
    ['v3-c64k-1g.qcow2', ['--offset', '511999999', '--length', '30M'], 511999999, 30 * 1024 * 1024],
    ['v3-c4k.qcow2', ['--offset', '8M'], 8 * 1024 * 1024, 0],
  ]

  for (const [mode, env] of MODES) {
    it(`every shell redirection gets qemu-img convert's bytes and leaves the offset after them: ${mode}`, async () => {
      for (const [name, flags, offset, length] of cases) {
        const want = await expected(name, offset, length)
        const what = `${name} ${flags.join(' ')}`
        const cmd = `${IMGTOOL} cat ${flags.map(sq).join(' ')} ${sq(fx(name))}`
        const out = join(shellDir, 'out')
        const check = async (script: string, before: Buffer, after: Buffer, form: string): Promise<void> => {
          const r = await sh(script, env)
          expect([r.code, r.stderr], `${what}: ${form}`).toEqual([0, ''])
          const got = readFileSync(out)
          expect(got.length, `${what}: ${form}`).toBe(before.length + want.length + after.length)
          expect(got.subarray(0, before.length).equals(before), `${what}: ${form}: bytes before`).toBe(true)
          expect(md5(got.subarray(before.length, before.length + want.length)), `${what}: ${form}: guest bytes`).toBe(md5(want))
          expect(got.subarray(before.length + want.length).equals(after), `${what}: ${form}: bytes after`).toBe(true)
        }
        const none = Buffer.alloc(0)
        await check(`${cmd} > ${sq(out)}`, none, none, '> out')
        await check(`{ ${cmd}; echo tail; } > ${sq(out)}`, none, Buffer.from('tail\n'), '{ cat; echo tail; } > out')
        await check(`{ printf head; ${cmd}; echo tail; } > ${sq(out)}`, Buffer.from('head'), Buffer.from('tail\n'), '{ printf head; cat; echo tail; } > out')
        await check(
          `printf 'old bytes' > ${sq(out)} && ${cmd} >> ${sq(out)} && echo tail >> ${sq(out)}`,
          Buffer.from('old bytes'),
          Buffer.from('tail\n'),
          '>> out after existing bytes',
        )
        // append mode after the shell's own write: the offset is at the end, but a positional
        // write would still go to the end of the file, in whatever order the writes finish
        await check(
          `: > ${sq(out)} && { printf head; ${cmd}; echo tail; } >> ${sq(out)}`,
          Buffer.from('head'),
          Buffer.from('tail\n'),
          '{ printf head; cat; echo tail; } >> out',
        )
        await check(`${cmd} | cat > ${sq(out)}`, none, none, '| cat > out')
        // 1<> over existing bytes: they are overwritten in place, and those past the guest bytes stay
        const old = Buffer.from('x'.repeat(64))
        writeFileSync(out, old)
        const r = await sh(`${cmd} 1<> ${sq(out)}`, env)
        expect([r.code, r.stderr], `${what}: 1<> out`).toEqual([0, ''])
        const got = readFileSync(out)
        expect(got.length, `${what}: 1<> out`).toBe(Math.max(64, want.length))
        expect(md5(got.subarray(0, want.length)), `${what}: 1<> out`).toBe(md5(want))
        expect(got.subarray(want.length).equals(old.subarray(Math.min(64, want.length))), `${what}: 1<> out, the old bytes after`).toBe(true)
      }
    })
  }

  // Every fixture with qemu's md5 through `> out`: with the addon, copy_file_range for the chunks
  // stored as is and read() with a positional write for the rest; without it, writes in order.
  // Compressed, zero, extended-L2, preallocated, backing-chain, external-data-file...
  const fixtures = readdirSync(FIXTURES)
    .filter((f) => f.endsWith('.md5'))
    .map((f) => f.slice(0, -'.md5'.length))
    .filter((name) => existsSync(fx(name)))
  it(`every fixture (${fixtures.length}) gives qemu-img convert's md5 through > out, with and without the addon`, async () => {
    expect(fixtures.length).toBeGreaterThan(30)
    const out = join(shellDir, 'fixture.out')
    for (const name of fixtures) {
      const want = readFileSync(fx(`${name}.md5`), 'utf8').trim()
      for (const [mode, env] of MODES) {
        const r = await sh(`${IMGTOOL} cat ${sq(fx(name))} > ${sq(out)}`, env)
        expect([r.code, r.stderr], `${name} ${mode}`).toEqual([0, ''])
        expect(md5(readFileSync(out)), `${name} ${mode}`).toBe(want)
      }
    }
  })

  it('positional writes only where they leave what writes in order would: a file, not append mode, nothing after the offset', async () => {
    if (fileOffsetAddon() === null) return // without the addon there is no positional path at all
    const dir = makeTempDir('imgtool-cat-pos-')
    const p = join(dir, 'f')
    const stream = (fd: number) => ({ fd }) as unknown as NodeJS.WritableStream
    // `> f`: at 0, empty
    let fd = openSync(p, 'w')
    expect(await positionedOutput(stream(fd))).toMatchObject({ fd, start: 0, sizeBefore: 0 })
    // `{ printf head; cat; } > f`: at the end of what is there
    writeSync(fd, 'head')
    expect(await positionedOutput(stream(fd))).toMatchObject({ fd, start: 4, sizeBefore: 4 })
    closeSync(fd)
    // `>> f`: append mode, where Linux puts a positional write at the end
    fd = openSync(p, 'a')
    expect(await positionedOutput(stream(fd))).toBeUndefined()
    closeSync(fd)
    // `1<> f`: bytes after the offset
    fd = openSync(p, 'r+')
    expect(await positionedOutput(stream(fd))).toBeUndefined()
    closeSync(fd)
    // a pipe, and a stream without a descriptor
    const child = spawn('sleep', ['5'], { stdio: ['pipe', 'ignore', 'ignore'] })
    expect(await positionedOutput(child.stdin as unknown as NodeJS.WritableStream)).toBeUndefined()
    child.kill()
    expect(await positionedOutput(collector())).toBeUndefined()
    cleanupTempDirs(dir)
  })
})

describeQemu(
  'imgtool cat: a read failing part way leaves the same bytes and offset in every mode',
  () => {
    it('a damaged compressed cluster at 5 MiB: exit 1, one line, the chunks before it written, the offset after them', async () => {
      const dir = makeTempDir('imgtool-cat-fail-')
      const img = join(dir, 'damaged.qcow2')
      await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=64k,compression_type=zstd', img, '8M'])
      // the compressed cluster first (qemu writes compressed clusters only where none is allocated)
      await qemuIoOk(img, ['write -c -P 0x66 5M 64k', 'write -P 0x5a 0 5M', 'write -P 0x5b 5184k 3008k'], { format: 'qcow2' })
      const b = readFileSync(img)
      const l1 = Number(b.readBigUInt64BE(40))
      const l2 = Number(b.readBigUInt64BE(l1) & 0x00ff_ffff_ffff_fe00n)
      const v = b.readBigUInt64BE(l2 + 80 * 8) // guest cluster 80 = 5 MiB
      expect(v & (1n << 62n), 'guest cluster 80 is compressed').not.toBe(0n)
      const host = Number(v & ((1n << 54n) - 1n)) // 70 - cluster_bits 16
      for (let i = 0; i < 256; i++) b[host + i] = (i * 151 + 7) & 0xff
      writeFileSync(img, b)
      const good = Buffer.concat([Buffer.alloc(5 * 1024 * 1024, 0x5a), Buffer.alloc(64 * 1024, 0x66), Buffer.alloc(3008 * 1024, 0x5b)])
      const out = join(dir, 'out')
      const line = `imgtool: qcow2: ${img}: cannot decompress zstd cluster`
      for (const [flags, offset] of [
        [[], 0],
        [['--offset', '12345'], 12345],
        [['--offset', '3M', '--length', '4M'], 3 * 1024 * 1024],
      ] as Array<[string[], number]>) {
        // writes in order stop at the 1 MiB read that fails: everything before it is out
        const kept = Math.floor((5 * 1024 * 1024 - offset) / (1024 * 1024)) * 1024 * 1024
        for (const [mode, env] of MODES) {
          const what = `${flags.join(' ')} ${mode}`
          const r = await sh(`{ printf head; ${IMGTOOL} cat ${flags.map(sq).join(' ')} ${sq(img)}; echo "exit $?"; } > ${sq(out)}`, env)
          expect(r.code, what).toBe(0)
          expect(r.stderr.split('\n').length, `${what}: one line: ${r.stderr}`).toBe(2)
          expect(r.stderr.startsWith(line), `${what}: ${r.stderr}`).toBe(true)
          const got = readFileSync(out)
          expect(got.subarray(0, 4).toString(), what).toBe('head')
          expect(got.length, what).toBe(4 + kept + 'exit 1\n'.length)
          expect(got.subarray(4, 4 + kept).equals(good.subarray(offset, offset + kept)), what).toBe(true)
          expect(got.subarray(4 + kept).toString(), what).toBe('exit 1\n')
          // stderr on the same file (2>&1): the one line lands right after the bytes written
          const r2 = await sh(`{ printf head; ${IMGTOOL} cat ${flags.map(sq).join(' ')} ${sq(img)}; echo "exit $?"; } > ${sq(out)} 2>&1`, env)
          expect(r2.code, what).toBe(0)
          const got2 = readFileSync(out)
          expect(got2.subarray(0, 4 + kept).equals(got.subarray(0, 4 + kept)), `${what} 2>&1`).toBe(true)
          expect(got2.subarray(4 + kept).toString(), `${what} 2>&1`).toBe(`${r.stderr}exit 1\n`)
        }
      }
      cleanupTempDirs(dir)
    })
  },
  ['qemu-img', 'qemu-io'],
)

describeQemu(
  'imgtool cat: memory stays bounded on an image whose runs are all short',
  () => {
    it.runIf(existsSync('/usr/bin/time'))(
      "512 MiB of 64 KiB clusters in reverse host order: qemu-img convert's bytes, peak RSS < 200 MiB in every mode",
      async () => {
        // Each 1 or 2 MiB read is pieced together from 64 KiB host runs. The pieces were once
        // kept by the buffer pool for good (1.2 GiB of RSS for 1 GiB); now they are reused.
        const dir = makeTempDir('imgtool-cat-rss-')
        const img = join(dir, 'reverse.qcow2')
        await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=64k', img, '512M'])
        const cmds: string[] = []
        for (let i = 512 * 16 - 1; i >= 0; i--) cmds.push(`write -q -P ${(i % 250) + 1} ${i * 64}k 64k`)
        await qemuIoOk(img, cmds, { format: 'qcow2' })
        const ref = join(dir, 'ref.raw')
        await qemuImgOk(['convert', '-O', 'raw', img, ref])
        const want = md5(readFileSync(ref))
        const out = join(dir, 'out')
        const rss = join(dir, 'rss')
        for (const [mode, env] of MODES) {
          for (const [form, redirect] of [
            ['> out', `> ${sq(out)}`],
            ['| cat > out', `| cat > ${sq(out)}`],
          ]) {
            const r = await sh(`/usr/bin/time -f %M -o ${sq(rss)} ${IMGTOOL} cat ${sq(img)} ${redirect}`, env)
            expect([r.code, r.stderr], `${mode} ${form}`).toEqual([0, ''])
            expect(md5(readFileSync(out)), `${mode} ${form}`).toBe(want)
            const kib = Number(readFileSync(rss, 'utf8').trim().split('\n').pop())
            expect(kib, `${mode} ${form}: peak RSS in KiB`).toBeLessThan(200 * 1024)
          }
        }
        cleanupTempDirs(dir)
      },
    )
  },
  ['qemu-img', 'qemu-io'],
)

describeQemu(
  'imgtool cat: chunks stored as is are copied by the kernel (copy_file_range), the rest read',
  () => {
    it('full images with compressed, zero and discarded clusters, an external data file, a backing file, a host file cut short: the bytes of qemu-img convert and of writes in order; an encrypted one refused', async () => {
      const dir = makeTempDir('imgtool-cat-cfr-')
      const make = async (name: string, opts: string, cmds: string[], backing?: string): Promise<string> => {
        const img = join(dir, name)
        const args = ['create', '-q', '-f', 'qcow2', '-o', opts]
        if (backing) args.push('-b', backing, '-F', 'qcow2')
        await qemuImgOk([...args, img, '20M'])
        await qemuIoOk(img, cmds, { format: 'qcow2' })
        return img
      }
      const images: Array<[string, string]> = []
      // compressed first: qemu compresses only into unallocated clusters
      images.push([
        'mixed',
        await make('mixed.qcow2', 'cluster_size=64k', [
          'write -c -P 0x33 3M 64k',
          'write -P 0x11 0 3M',
          'write -P 0x12 3136k 16320k',
          'write -z 7M 64k',
          'discard 9M 128k',
          'write -P 0x13 19M 1M',
        ]),
      ])
      images.push([
        'external data file',
        await make('ext.qcow2', `cluster_size=64k,data_file=${join(dir, 'ext.data')}`, ['write -P 0x21 0 20M', 'write -z 5M 1M']),
      ])
      images.push([
        'extended L2',
        await make('extl2.qcow2', 'cluster_size=128k,extended_l2=on', ['write -P 0x41 0 20M', 'write -P 0x42 4100k 4k', 'write -z 6M 4k']),
      ])
      const base = await make('base.qcow2', 'cluster_size=64k', ['write -P 0x51 0 20M'])
      images.push(['backing file', await make('top.qcow2', 'cluster_size=64k', ['write -P 0x52 2M 6M', 'write -P 0x53 12M 1M'], base)])
      // the last data cluster runs past the end of the host file: read() gives zeros there
      const short = await make('short.qcow2', 'cluster_size=64k', ['write -P 0x61 0 20M'])
      const b = readFileSync(short)
      writeFileSync(short, b.subarray(0, b.length - 40000))
      images.push(['host file cut short', short])

      const out = join(dir, 'out')
      // an encrypted image (crypt_method 1 in the header): refused before a byte is copied, as read() refuses it
      const enc = await make('enc.qcow2', 'cluster_size=64k', ['write -P 0x71 0 20M'])
      const h = readFileSync(enc)
      h.writeUInt32BE(1, 32)
      writeFileSync(enc, h)
      for (const [mode, env] of MODES) {
        const r = await sh(`${IMGTOOL} cat ${sq(enc)} > ${sq(out)}`, env)
        expect([r.code, r.stderr], `encrypted, ${mode}`).toEqual([1, `imgtool: qcow2: ${enc}: encrypted images (crypt_method 1) cannot be read by imgtool\n`])
        expect(readFileSync(out).length, `encrypted, ${mode}`).toBe(0)
      }
      for (const [what, img] of images) {
        const ref = join(dir, 'ref.raw')
        await qemuImgOk(['convert', '-O', 'raw', img, ref])
        const all = readFileSync(ref)
        for (const [flags, from, len] of [
          [[], 0, all.length],
          [['--offset', '1234567', '--length', '15000000'], 1234567, 15000000],
        ] as Array<[string[], number, number]>) {
          const want = md5(all.subarray(from, from + len))
          for (const [mode, env] of MODES) {
            const r = await sh(`{ printf head; ${IMGTOOL} cat ${flags.map(sq).join(' ')} ${sq(img)}; echo tail; } > ${sq(out)}`, env)
            expect([r.code, r.stderr], `${what} ${flags.join(' ')} ${mode}`).toEqual([0, ''])
            const got = readFileSync(out)
            expect(got.length, `${what} ${flags.join(' ')} ${mode}`).toBe(4 + len + 5)
            expect(md5(got.subarray(4, 4 + len)), `${what} ${flags.join(' ')} ${mode}`).toBe(want)
            expect(got.subarray(0, 4).toString() + got.subarray(4 + len).toString(), `${what} ${flags.join(' ')} ${mode}`).toBe('headtail\n')
          }
        }
      }
      cleanupTempDirs(dir)
    })
  },
  ['qemu-img', 'qemu-io'],
)
