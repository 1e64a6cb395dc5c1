/**
 * `-p` as scripts see it: qemu-img's `    (NN.NN/100%)` lines when stdout is not a terminal (on stderr when
 * stdout carries data or a report), the terminal line's wording, and SIGUSR1 answered without `-p`.
 */
import { spawn } from 'node:child_process'
import { createHash } from 'node:crypto'
import { readFileSync, writeFileSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { describe, expect, it } from 'vitest'
import { main } from '../../src/cli/main.js'
import { plainProgress, qemuPercent, summaryLine, terminalLine } from '../../src/cli/progress.js'
import { collector, describeQemu, makeTempDir, qemuImg, qemuImgOk, qemuIoOk, useTempDirs } from '../support/qemu.js'

const ROOT = resolve(__dirname, '..', '..')
const BIN = join(ROOT, 'bin', 'imgtool')
const FIXTURES = join(ROOT, 'images', 'qcow2')

/** the whole of a plain progress stream: lines ending in CR, a first one at 0, a last one at 100, then a newline */
const PLAIN = /^(?: {4}\(\d{1,3}\.\d\d\/100%\)\r)+\n$/

function percents(s: string): number[] {
  return [...s.matchAll(/\((\d+\.\d\d)\/100%\)/g)].map((m) => Number(m[1]))
}

async function cli(...args: string[]): Promise<{ code: number; stdout: Buffer; stderr: string }> {
  const out = collector()
  const err = collector()
  const code = await main(['node', 'imgtool', ...args], { stdout: out, stderr: err, isTTY: false })
  return { code, stdout: out.bytes(), stderr: err.text() }
}

describe('progress rendering', () => {
  it("prints qemu-img's lines: 0 first, a line only after more than one point, 100 and a newline at the end", () => {
    const out = collector()
    const p = plainProgress(out)
    for (let done = 0; done <= 1000; done += 5) p.update(done, 1000)
    p.stop(true)
    const text = out.text()
    expect(text).toMatch(PLAIN)
    const ps = percents(text)
    expect(ps[0]).toBe(0)
    expect(ps.at(-1)).toBe(100)
    for (let i = 1; i < ps.length - 2; i++) expect(ps[i]! - ps[i - 1]!).toBeGreaterThan(1)
    expect(qemuPercent(6.25)).toBe('    (6.25/100%)')
    expect(qemuPercent(100)).toBe('    (100.00/100%)')
  })

  it('a failed command ends the plain lines with a newline and no 100', () => {
    const out = collector()
    const p = plainProgress(out)
    p.update(10, 100)
    p.stop(false)
    expect(percents(out.text()).at(-1)).toBe(10)
    expect(out.text().endsWith('\n')).toBe(true)
  })

  it('the terminal line names the percentage, the amount, the rate and the time left; the summary what was done', () => {
    expect(terminalLine('converting', 512 * 1024 * 1024, 1024 * 1024 * 1024, 2000)).toBe('converting 50.0%  512 MiB of 1.00 GiB  256 MiB/s  2s left')
    expect(terminalLine('merging', 10, 10, 1000, { unit: 'items', itemName: 'exceptions' })).toBe('merging 100.0%  10/10 exceptions  10/s  done')
    expect(summaryLine('converting', 1024 * 1024 * 1024, 4000)).toBe('converting: 1.00 GiB in 4.0 s (256 MiB/s)')
  })
})

describeQemu('-p when stdout is not a terminal, against qemu-img', () => {
  useTempDirs()

  it('convert -p and compare -p print the same kind of stream as qemu-img, on stdout', async () => {
    const dir = makeTempDir('imgtool-progress-')
    const src = join(dir, 'src.raw')
    await qemuImgOk(['create', '-q', '-f', 'raw', src, '16M'])
    await qemuIoOk(src, ['write -P 1 0 8M'], { format: 'raw' })
    const ours = await cli('convert', '-p', '-O', 'qcow2', src, join(dir, 'ours.qcow2'))
    expect(ours.code).toBe(0)
    const theirs = await qemuImg(['convert', '-p', '-O', 'qcow2', src, join(dir, 'theirs.qcow2')])
    expect(theirs.code).toBe(0)
    expect(theirs.stdout).toMatch(PLAIN) // the pattern is qemu-img's
    expect(ours.stdout.toString()).toMatch(PLAIN)
    expect(percents(ours.stdout.toString())[0]).toBe(0)
    expect(percents(ours.stdout.toString()).at(-1)).toBe(100)
    expect(ours.stderr).toBe('')

    const cmp = await cli('compare', '-p', src, join(dir, 'ours.qcow2'))
    const qcmp = await qemuImg(['compare', '-p', src, join(dir, 'ours.qcow2')])
    expect(cmp.code).toBe(qcmp.code)
    // the progress up to 100, the verdict after its carriage return, then the progress' newline: qemu-img's order
    const shape = (s: string) => {
      const m = /^((?: {4}\(\d{1,3}\.\d\d\/100%\)\r)+)([^\r]*\n)\n$/.exec(s)
      return m ? { last: percents(m[1]!).at(-1), verdict: m[2] } : undefined
    }
    expect(shape(qcmp.stdout)).toEqual({ last: 100, verdict: 'Images are identical.\n' })
    expect(shape(cmp.stdout.toString())).toEqual(shape(qcmp.stdout))
  })

  it('convert -p to stdout, cat -p and check -p keep stdout for the data or the report: the lines go to stderr', async () => {
    const img = join(FIXTURES, 'v3-c64k.qcow2')
    const plain = await cli('convert', '-O', 'raw', img, '-')
    const withP = await cli('convert', '-p', '-O', 'raw', img, '-')
    expect(withP.code).toBe(0)
    expect(createHash('md5').update(withP.stdout).digest('hex')).toBe(createHash('md5').update(plain.stdout).digest('hex'))
    expect(withP.stderr).toMatch(PLAIN)
    const cat = await cli('cat', '-p', img)
    expect(cat.stdout.equals(plain.stdout)).toBe(true)
    expect(cat.stderr).toMatch(PLAIN)
    const check = await cli('check', img)
    const checkP = await cli('check', '-p', img)
    expect(checkP.code).toBe(check.code)
    expect(checkP.stdout.toString()).toBe(check.stdout.toString())
    expect(checkP.stderr).toMatch(PLAIN)
  })

  it('without -p, SIGUSR1 prints the percentage on stderr, as qemu-img does', async () => {
    const dir = makeTempDir('imgtool-usr1-')
    const src = join(dir, 'src.raw')
    writeFileSync(src, Buffer.alloc(8 * 1024 * 1024, 7))
    const child = spawn(process.execPath, [BIN, 'convert', '-f', 'raw', '-O', 'raw', src, '-'], { stdio: ['ignore', 'pipe', 'pipe'] })
    let stderr = ''
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()))
    let bytes = 0
    // take the first chunk, then stop reading: the pipe fills and the copy cannot finish before the signal
    await new Promise<void>((res) => child.stdout.once('data', (d: Buffer) => ((bytes += d.byteLength), child.stdout.pause(), res())))
    child.kill('SIGUSR1')
    await new Promise((r) => setTimeout(r, 300))
    child.stdout.on('data', (d: Buffer) => (bytes += d.byteLength))
    child.stdout.resume()
    const code = await new Promise<number | null>((res) => child.on('close', res))
    expect(code).toBe(0)
    expect(bytes).toBe(8 * 1024 * 1024)
    expect(stderr).toMatch(/^ {4}\(\d{1,3}\.\d\d\/100%\)\n$/)
    expect(readFileSync(src).byteLength).toBe(8 * 1024 * 1024)
  }, 120_000)
})
