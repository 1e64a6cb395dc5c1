/** Shared by the journal tests: the CLI in process, damaged qcow2 fixtures, read-only folders. */
import { chmodSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { PassThrough } from 'node:stream'
import { execFileSync, spawn } from 'node:child_process'
import { main } from '../../src/cli/main.js'
import { Qcow2Bytes } from '../support/damage.js'
import { fixture, fixtureBytes } from '../check/fixtures.js'

export async function cli(...args: string[]): Promise<{ code: number; out: string; err: string }> {
  const stdout = new PassThrough()
  const stderr = new PassThrough()
  let out = ''
  let err = ''
  stdout.on('data', (d) => (out += d))
  stderr.on('data', (d) => (err += d))
  const code = await main(['node', 'imgtool', ...args], { stdout, stderr, isTTY: false })
  return { code, out, err }
}

/** a copy of fixture `name` with `damage` applied, at dir/file */
export function damaged(dir: string, name: string, damage: (i: Qcow2Bytes) => unknown, file = `${name}.qcow2`): string {
  const img = new Qcow2Bytes(fixtureBytes(fixture(name)))
  damage(img)
  const p = join(dir, file)
  writeFileSync(p, img.bytes)
  return p
}

/** an image with 2 leaked clusters: repair writes a journal */
export function leaky(dir: string, file?: string): string {
  return damaged(dir, 'v3-c4k', (i) => i.leak(2), file)
}

/** a clean image: repair records nothing */
export function clean(dir: string, file?: string): string {
  return damaged(dir, 'v3-c4k', () => undefined, file)
}

/**
 * Make `dir` refuse new files: chmod 0555, and as root (whom modes do not stop)
 * the immutable attribute. Returns an undo function, or undefined if neither works.
 */
export function makeReadOnlyDir(dir: string): (() => void) | undefined {
  chmodSync(dir, 0o555)
  if (process.getuid?.() !== 0) return () => chmodSync(dir, 0o755)
  try {
    execFileSync('chattr', ['+i', dir], { stdio: 'ignore' })
  } catch {
    chmodSync(dir, 0o755)
    return undefined
  }
  return () => {
    execFileSync('chattr', ['-i', dir], { stdio: 'ignore' })
    chmodSync(dir, 0o755)
  }
}

/** node bin/imgtool ARGS (the build in dist/), killed after `timeoutMs` */
export function imgtoolChild(
  args: string[],
  timeoutMs = 120_000,
): Promise<{ code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string }> {
  return new Promise((resolvePromise, reject) => {
    const bin = join(import.meta.dirname, '..', '..', 'bin', 'imgtool')
    const child = spawn(process.execPath, [bin, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, IMGTOOL_DEBUG: '' } })
    const out: Buffer[] = []
    const err: Buffer[] = []
    child.stdout.on('data', (c: Buffer) => out.push(c))
    child.stderr.on('data', (c: Buffer) => err.push(c))
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs)
    child.on('error', reject)
    child.on('close', (code, signal) => {
      clearTimeout(timer)
      resolvePromise({ code, signal, stdout: Buffer.concat(out).toString('utf8'), stderr: Buffer.concat(err).toString('utf8') })
    })
  })
}
