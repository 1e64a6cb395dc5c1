/** imgtool cat: guest bytes to stdout, --offset/--length, errors, and a reader that goes away early. */
import { spawn } from 'node:child_process'
import { createHash } from 'node:crypto'
import { closeSync, openSync, readFileSync, writeSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { describe, expect, it } from 'vitest'
import { main } from '../../src/cli/main.js'
import { openImage } from '../../src/open.js'
import { cleanupTempDirs, collector, findExecutable, makeTempDir } from '../support/qemu.js'

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
    expect([bad.code, bad.stdout.length, bad.stderr]).toEqual([1, 0, "imgtool: Unknown file format 'vdi' (known: qcow2, dmsnap, raw)\n"])
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
    expect(Buffer.concat(got).equals((await guest('v3-c64k-1g.qcow2', 0, 10)))).toBe(true)
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
