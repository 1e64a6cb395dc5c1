/** Helpers for the locking tests: who locks which bytes of a file, and a qemu-io kept running on an image. */
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process'
import { readFileSync, statSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { QEMU_IO } from '../support/qemu.js'

export const ROOT = resolve(__dirname, '..', '..')
export const BIN = join(ROOT, 'bin', 'imgtool')

/** The OFD-locked bytes of `path` as /proc/locks lists them (every process), ascending, without duplicates. */
export function lockedBytes(path: string): number[] {
  const ino = statSync(path).ino
  const out = new Set<number>()
  for (const line of readFileSync('/proc/locks', 'utf8').split('\n')) {
    // "1: OFDLCK ADVISORY  READ -1 fe:00:2146894 203 203"
    const f = line.trim().split(/\s+/)
    if (f[1] !== 'OFDLCK' || f[0]?.startsWith('->') !== false) continue
    const id = f[5]
    if (!id || Number(id.split(':')[2]) !== ino) continue
    const start = Number(f[6])
    const end = Number(f[7])
    for (let b = start; b <= end; b++) out.add(b)
  }
  return [...out].sort((a, b) => a - b)
}

async function until(cond: () => boolean, what: string, ms = 30_000): Promise<void> {
  const t0 = Date.now()
  while (!cond()) {
    if (Date.now() - t0 > ms) throw new Error(`timed out waiting for ${what}`)
    await new Promise((r) => setTimeout(r, 50))
  }
}

/** qemu-io running interactively on an image (commands over its stdin), holding it open. */
export class QemuIoHolder {
  private stderr = ''
  private constructor(private readonly child: ChildProcessWithoutNullStreams) {
    child.stderr.on('data', (c: Buffer) => (this.stderr += c.toString()))
    child.stdout.on('data', () => undefined)
  }

  /** Start qemu-io on `image` (read-only with `readOnly`) and wait until its locks are in place. */
  static async start(image: string, opts: { format?: string; readOnly?: boolean } = {}): Promise<QemuIoHolder> {
    if (!QEMU_IO) throw new Error('qemu-io not found')
    const args = ['-f', opts.format ?? 'qcow2', ...(opts.readOnly ? ['-r'] : []), image]
    const h = new QemuIoHolder(spawn(QEMU_IO, args, { stdio: ['pipe', 'pipe', 'pipe'] }))
    const want = opts.readOnly ? 100 : 101
    await until(() => lockedBytes(image).includes(want) || h.child.exitCode !== null, `qemu-io to lock ${image}`)
    if (h.child.exitCode !== null) throw new Error(`qemu-io exited: ${h.stderr}`)
    return h
  }

  send(cmd: string): void {
    this.child.stdin.write(cmd + '\n')
  }

  /** quit and wait for the process to end */
  async stop(): Promise<void> {
    if (this.child.exitCode !== null) return
    const done = new Promise<void>((r) => this.child.on('close', () => r()))
    this.child.stdin.end('quit\n')
    const timer = setTimeout(() => this.child.kill('SIGKILL'), 30_000)
    await done
    clearTimeout(timer)
  }
}

export interface CliResult {
  code: number | null
  signal: NodeJS.Signals | null
  stdout: string
  stderr: string
}

/** node bin/imgtool ARGS in a child process, killed after `timeoutMs` (a hang fails the test instead of the run). */
export function imgtool(args: string[], timeoutMs = 60_000): Promise<CliResult> {
  return new Promise((resolvePromise, reject) => {
    const child = spawn(process.execPath, [BIN, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, IMGTOOL_DEBUG: '' } })
    let out = ''
    let err = ''
    child.stdout.on('data', (c: Buffer) => (out += c.toString()))
    child.stderr.on('data', (c: Buffer) => (err += c.toString()))
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs)
    child.on('error', reject)
    child.on('close', (code, signal) => {
      clearTimeout(timer)
      resolvePromise({ code, signal, stdout: out, stderr: err })
    })
  })
}
