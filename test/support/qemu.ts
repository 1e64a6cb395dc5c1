/**
 * Finding and running QEMU's tools (qemu-img, qemu-io) from tests, and the
 * policy for suites that need them:
 *
 * - qemu-img present: the suite runs.
 * - qemu-img absent: the suite is skipped, with a console.warn saying so.
 * - qemu-img absent and IMGTOOL_REQUIRE_QEMU=1 (CI): the suite FAILS.
 *
 * Processes are started with execFile (never a shell). Temporary directories
 * live under os.tmpdir() and are removed by `cleanupTempDirs()` (the
 * `useTempDirs()` hook registers it with vitest).
 */
import { execFile, type ExecFileOptions } from 'node:child_process'
import { createHash } from 'node:crypto'
import { accessSync, constants as fsConstants, createReadStream, mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { delimiter, join } from 'node:path'
import { Writable } from 'node:stream'
import { afterAll, describe, it } from 'vitest'

// ---------------------------------------------------------------------------
// finding the tools

/** Absolute path of an executable on PATH, or undefined. */
export function findExecutable(name: string): string | undefined {
  if (name.includes('/')) return isExecutable(name) ? name : undefined
  for (const dir of (process.env['PATH'] ?? '').split(delimiter)) {
    if (!dir) continue
    const p = join(dir, name)
    if (isExecutable(p)) return p
  }
  return undefined
}

function isExecutable(p: string): boolean {
  try {
    accessSync(p, fsConstants.X_OK)
    return true
  } catch {
    return false
  }
}

/** qemu-img: $QEMU_IMG when set, else the one on PATH. */
export const QEMU_IMG: string | undefined = findExecutable(process.env['QEMU_IMG'] ?? 'qemu-img')
/** qemu-io: $QEMU_IO when set, else the one on PATH. */
export const QEMU_IO: string | undefined = findExecutable(process.env['QEMU_IO'] ?? 'qemu-io')

/** True when CI demands the interop suites (IMGTOOL_REQUIRE_QEMU=1). */
export const REQUIRE_QEMU = process.env['IMGTOOL_REQUIRE_QEMU'] === '1'

export const hasQemuImg = QEMU_IMG !== undefined
export const hasQemuIo = QEMU_IO !== undefined

/** Which tools a suite needs. */
export type QemuTool = 'qemu-img' | 'qemu-io'

function missingTools(needs: readonly QemuTool[]): QemuTool[] {
  return needs.filter((t) => (t === 'qemu-img' ? !hasQemuImg : !hasQemuIo))
}

// ---------------------------------------------------------------------------
// the skip policy

/**
 * Whether a suite needing `needs` must be skipped. Warns (visibly) when it
 * is. Returns false when IMGTOOL_REQUIRE_QEMU=1 even if the tools are missing,
 * so the suite runs and fails; pair it with `requireQemuTools` in a
 * beforeAll, or use `describeQemu`, which does both.
 */
export function skipWithoutQemu(suite: string, needs: readonly QemuTool[] = ['qemu-img', 'qemu-io']): boolean {
  const missing = missingTools(needs)
  if (missing.length === 0) return false
  if (REQUIRE_QEMU) return false
  console.warn(`[imgtool tests] SKIPPING "${suite}": ${missing.join(' and ')} not found on PATH (set IMGTOOL_REQUIRE_QEMU=1 to make this a failure)`)
  return true
}

/** Throws when a needed tool is missing (the IMGTOOL_REQUIRE_QEMU=1 case). */
export function requireQemuTools(needs: readonly QemuTool[] = ['qemu-img', 'qemu-io']): void {
  const missing = missingTools(needs)
  if (missing.length > 0) {
    throw new Error(`${missing.join(' and ')} not found on PATH, and IMGTOOL_REQUIRE_QEMU=1 requires the QEMU interop suites to run`)
  }
}

/**
 * `describe` for interop suites: skipped with a warning without qemu, failed
 * (by one test that says why) when qemu is required but missing.
 */
export function describeQemu(name: string, fn: () => void, needs: readonly QemuTool[] = ['qemu-img', 'qemu-io']): void {
  const skip = skipWithoutQemu(name, needs)
  if (!skip && missingTools(needs).length > 0) {
    describe(name, () => {
      it('has the QEMU tools it needs', () => requireQemuTools(needs))
    })
    return
  }
  describe.skipIf(skip)(name, fn)
}

// ---------------------------------------------------------------------------
// running processes

export interface RunResult<T extends string | Buffer = string> {
  /** exit code; null when killed by a signal */
  code: number | null
  signal: NodeJS.Signals | null
  stdout: T
  stderr: string
}

export interface RunOptions {
  cwd?: string
  env?: NodeJS.ProcessEnv
  /** milliseconds before the process is killed (default 60 s) */
  timeout?: number
  /** default 256 MiB */
  maxBuffer?: number
}

/** Run `file args` without a shell; never rejects on a non-zero exit. */
export function run(file: string, args: readonly string[], opts?: RunOptions & { binary?: false }): Promise<RunResult<string>>
export function run(file: string, args: readonly string[], opts: RunOptions & { binary: true }): Promise<RunResult<Buffer>>
export function run(file: string, args: readonly string[], opts: RunOptions & { binary?: boolean } = {}): Promise<RunResult<string | Buffer>> {
  const o: ExecFileOptions & { encoding: BufferEncoding | 'buffer' } = {
    cwd: opts.cwd,
    env: opts.env ?? process.env,
    timeout: opts.timeout ?? 60_000,
    maxBuffer: opts.maxBuffer ?? 256 * 1024 * 1024,
    encoding: 'buffer',
    windowsHide: true,
  }
  return new Promise((resolve, reject) => {
    execFile(file, [...args], o, (err, stdout, stderr) => {
      const e = err as (NodeJS.ErrnoException & { code?: number | string; signal?: NodeJS.Signals | null; killed?: boolean }) | null
      if (e && typeof e.code === 'string') {
        // spawn failure (ENOENT, EACCES, maxBuffer...): not an exit status
        reject(new Error(`${file}: ${e.message}`))
        return
      }
      const out = stdout as unknown as Buffer
      resolve({
        code: e ? (typeof e.code === 'number' ? e.code : null) : 0,
        signal: e?.signal ?? null,
        stdout: opts.binary ? out : out.toString('utf8'),
        stderr: (stderr as unknown as Buffer).toString('utf8'),
      })
    })
  })
}

/** A failed tool run, with everything needed to reproduce it. */
export class ToolError extends Error {
  constructor(
    readonly file: string,
    readonly args: readonly string[],
    readonly result: RunResult<string | Buffer>,
  ) {
    super(
      `${file} ${args.map(shellQuote).join(' ')} exited with ${result.code ?? result.signal}: ${result.stderr.trim() || String(result.stdout).trim().slice(0, 2000)}`,
    )
  }
}

function shellQuote(a: string): string {
  return /^[A-Za-z0-9_./=,:+@%-]+$/.test(a) ? a : `'${a.replace(/'/g, `'\\''`)}'`
}

function tool(which: QemuTool): string {
  const p = which === 'qemu-img' ? QEMU_IMG : QEMU_IO
  if (!p) throw new Error(`${which} not found on PATH`)
  return p
}

/** qemu-img ARGS: {code, stdout, stderr}, whatever the exit status. */
export function qemuImg(args: readonly string[], opts?: RunOptions): Promise<RunResult> {
  return run(tool('qemu-img'), args, opts)
}

/** qemu-img ARGS that must succeed (exit 0); returns stdout. */
export async function qemuImgOk(args: readonly string[], opts?: RunOptions): Promise<string> {
  let r = await qemuImg(args, opts)
  // LUKS key set-up times PBKDF2 by CPU usage, and on a loaded machine qemu sometimes cannot measure it:
  // that is qemu's benchmark failing, not the command, so it is tried again (a few times at most)
  for (let i = 0; i < 5 && r.code !== 0 && /Unable to get accurate CPU usage/.test(r.stderr); i++) r = await qemuImg(args, opts)
  if (r.code !== 0) throw new ToolError('qemu-img', args, r)
  return r.stdout
}

/** qemu-img ARGS (with --output=json among them) parsed as JSON. */
export async function qemuImgJson<T = unknown>(args: readonly string[], opts?: RunOptions): Promise<T> {
  return parseJson<T>(await qemuImgOk(args, opts), `qemu-img ${args.join(' ')}`)
}

/** qemu-io ARGS: {code, stdout, stderr}. */
export function qemuIo(args: readonly string[], opts?: RunOptions): Promise<RunResult> {
  return run(tool('qemu-io'), args, opts)
}

/**
 * qemu-io on one image with a list of commands (each becomes `-c CMD`). Fails
 * on a non-zero exit or when any command reports failure (qemu-io prints
 * "... failed: ..." for those).
 */
export async function qemuIoOk(
  image: string,
  commands: readonly string[],
  opts: RunOptions & { format?: string; extraArgs?: readonly string[] } = {},
): Promise<string> {
  const args = [...(opts.format ? ['-f', opts.format] : []), ...(opts.extraArgs ?? [])]
  for (const c of commands) args.push('-c', c)
  args.push(image)
  const r = await qemuIo(args, opts)
  if (r.code !== 0 || /\bfailed\b/i.test(r.stdout) || /\bfailed\b/i.test(r.stderr)) throw new ToolError('qemu-io', args, r)
  return r.stdout
}

/** JSON.parse with the source named in the error. */
export function parseJson<T = unknown>(text: string, what = 'JSON'): T {
  try {
    return JSON.parse(text) as T
  } catch (e) {
    throw new Error(`${what}: invalid JSON (${(e as Error).message}): ${text.slice(0, 500)}`)
  }
}

// ---------------------------------------------------------------------------
// concurrency

/** Run `fn` over `items` with at most `limit` in flight; results in input order. */
export async function mapLimit<T, R>(items: readonly T[], limit: number, fn: (item: T, index: number) => Promise<R>): Promise<R[]> {
  const out = new Array<R>(items.length)
  let next = 0
  const worker = async (): Promise<void> => {
    for (;;) {
      const i = next++
      if (i >= items.length) return
      out[i] = await fn(items[i] as T, i)
    }
  }
  await Promise.all(Array.from({ length: Math.max(1, Math.min(limit, items.length)) }, worker))
  return out
}

/** A limiter for ad-hoc calls: `const lim = limiter(3); await lim(() => qemuImg(...))`. */
export function limiter(limit: number): <R>(fn: () => Promise<R>) => Promise<R> {
  let active = 0
  const queue: Array<() => void> = []
  return async <R>(fn: () => Promise<R>): Promise<R> => {
    if (active >= limit) await new Promise<void>((r) => queue.push(r))
    active++
    try {
      return await fn()
    } finally {
      active--
      queue.shift()?.()
    }
  }
}

// ---------------------------------------------------------------------------
// temporary directories

const tempDirs = new Set<string>()

/** A fresh directory under os.tmpdir(); removed by cleanupTempDirs(). */
export function makeTempDir(prefix = 'imgtool-test-'): string {
  const dir = mkdtempSync(join(tmpdir(), prefix))
  tempDirs.add(dir)
  return dir
}

/** Remove one temp dir (or every one made so far). Set IMGTOOL_KEEP_TMP=1 to keep them for debugging. */
export function cleanupTempDirs(dir?: string): void {
  if (process.env['IMGTOOL_KEEP_TMP'] === '1') {
    if (tempDirs.size > 0) console.warn(`[imgtool tests] keeping temp dirs: ${[...tempDirs].join(' ')}`)
    return
  }
  const dirs = dir === undefined ? [...tempDirs] : [dir]
  for (const d of dirs) {
    rmSync(d, { recursive: true, force: true })
    tempDirs.delete(d)
  }
}

/** Run `fn` with a temp dir that is removed afterwards, whatever happens. */
export async function withTempDir<R>(fn: (dir: string) => Promise<R>, prefix?: string): Promise<R> {
  const dir = makeTempDir(prefix)
  try {
    return await fn(dir)
  } finally {
    cleanupTempDirs(dir)
  }
}

/** Register an afterAll that removes every temp dir this file made. */
export function useTempDirs(): void {
  afterAll(() => cleanupTempDirs())
}

// ---------------------------------------------------------------------------
// hashing

export function md5(data: Uint8Array): string {
  return createHash('md5').update(data).digest('hex')
}

/** md5 of a file, streamed. */
export function md5File(path: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const h = createHash('md5')
    createReadStream(path)
      .on('data', (c) => h.update(c))
      .on('error', reject)
      .on('end', () => resolve(h.digest('hex')))
  })
}

// ---------------------------------------------------------------------------
// capturing in-process output (the CLI's main() takes its streams as arguments)

export interface Collector extends Writable {
  bytes(): Buffer
  text(): string
}

/** A writable stream that keeps everything written to it. */
export function collector(): Collector {
  const chunks: Buffer[] = []
  const w = new Writable({
    write(chunk: Buffer | string, _enc, cb) {
      chunks.push(typeof chunk === 'string' ? Buffer.from(chunk) : Buffer.from(chunk))
      cb()
    },
  }) as Collector
  w.bytes = () => Buffer.concat(chunks)
  w.text = () => Buffer.concat(chunks).toString('utf8')
  return w
}
