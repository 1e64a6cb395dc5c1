/**
 * Ctrl-C typed in a real pseudo-terminal (issue 9 item 3): the progress
 * display must not put the terminal in raw mode, the command stops promptly
 * with exit 130, the cursor is shown again, and a convert removes the target
 * it was making. The Ctrl-C goes through the terminal's line discipline (a
 * signal sent with kill would not find the bug).
 */
import { execFileSync, spawnSync } from 'node:child_process'
import { existsSync, openSync, writeSync, closeSync, copyFileSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { randomFillSync } from 'node:crypto'
import { beforeAll, describe, expect, it } from 'vitest'
import { makeTempDir, useTempDirs } from '../support/qemu.js'

useTempDirs()

const ROOT = resolve(__dirname, '..', '..')
const BIN = join(ROOT, 'bin', 'imgtool')
const PTY = join(ROOT, 'test', 'support', 'pty-run.py')
const hasPython = spawnSync('python3', ['-c', 'import pty, termios'], { stdio: 'ignore' }).status === 0

interface PtyResult {
  isig_when_typed: boolean | null
  code: number | null
  signal: number | null
  typed: boolean
  timed_out: boolean
  seconds_after_ctrl_c: number | null
  output: string
}

function ptyRun(when: string, args: string[], cwd: string): PtyResult {
  // a user's terminal: without CI in the environment (ora shows no spinner when CI is set, as in .ci/run)
  const env = { ...process.env }
  delete env['CI']
  const out = execFileSync('python3', [PTY, when, '240', '--', process.execPath, BIN, ...args], { cwd, env, encoding: 'utf8', timeout: 300_000 })
  return JSON.parse(out) as PtyResult
}

function writeFile(path: string, mib: number, fill: (buf: Buffer, i: number) => void): void {
  const fd = openSync(path, 'w')
  const buf = Buffer.alloc(1 << 20)
  for (let i = 0; i < mib; i++) {
    fill(buf, i)
    writeSync(fd, buf)
  }
  closeSync(fd)
}

// python3 is on every machine that builds the addon (node-gyp); CI (IMGTOOL_REQUIRE_QEMU=1) must run these
describe.skipIf(!hasPython && process.env['IMGTOOL_REQUIRE_QEMU'] !== '1')('Ctrl-C in a terminal', () => {
  let dir: string
  beforeAll(() => {
    if (!existsSync(join(ROOT, 'dist', 'cli', 'interrupt.js')))
      throw new Error('dist/ is missing or old: run npm run build (npm install does) before these tests')
    dir = makeTempDir()
    // incompressible data: convert -c of it takes seconds
    writeFile(join(dir, 'random.raw'), 128, (b) => randomFillSync(b))
    writeFile(join(dir, 'a.raw'), 256, (b, i) => b.fill(i + 1))
    copyFileSync(join(dir, 'a.raw'), join(dir, 'b.raw'))
  }, 300_000)

  it('stops convert -p at once with exit 130, the cursor shown again and the half-made target removed', () => {
    const r = ptyRun('converting [0-9]', ['convert', '-p', '-c', '-O', 'qcow2', 'random.raw', 'out.qcow2'], dir)
    expect(r.typed).toBe(true)
    expect(r.isig_when_typed).toBe(true)
    expect(r.timed_out).toBe(false)
    expect(r.code).toBe(130)
    expect(r.seconds_after_ctrl_c!).toBeLessThan(30)
    expect(r.output).toMatch(/\x1b\[\?25l/) // the display hid the cursor...
    expect(r.output.lastIndexOf('\x1b[?25h')).toBeGreaterThan(r.output.lastIndexOf('\x1b[?25l')) // ...and showed it again
    expect(r.output).toMatch(/imgtool: convert: interrupted by SIGINT; the partial target 'out.qcow2' was removed/)
    expect(existsSync(join(dir, 'out.qcow2'))).toBe(false)
  })

  it('stops convert without -p too, and removes the target (not left looking like a good, empty image)', () => {
    // typed once the target exists: a fixed delay raced Node's start-up on a busy machine (the signal
    // came before imgtool's handler was installed, and the default action killed it)
    const r = ptyRun('file:quiet.qcow2', ['convert', '-c', '-O', 'qcow2', 'random.raw', 'quiet.qcow2'], dir)
    expect(r.typed).toBe(true)
    expect(r.code).toBe(130)
    expect(existsSync(join(dir, 'quiet.qcow2'))).toBe(false)
  })

  it('keeps the terminal able to signal while compare -p shows progress', () => {
    const r = ptyRun('comparing', ['compare', '-p', 'a.raw', 'b.raw'], dir)
    expect(r.typed).toBe(true)
    expect(r.isig_when_typed).toBe(true)
    // compare may have finished (exit 0) before the keystroke arrived; if not, Ctrl-C ended it: a reader
    // has nothing to clean up, so the signal's own action ends it (the shell's $? is 130 either way)
    expect(r.code === 0 || r.signal === 2).toBe(true)
    expect(r.output.lastIndexOf('\x1b[?25h')).toBeGreaterThan(r.output.lastIndexOf('\x1b[?25l'))
  })
})
