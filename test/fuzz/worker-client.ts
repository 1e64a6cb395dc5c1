/** The parent side of worker.mjs: one request at a time, a timeout, restarts. */
import { spawn, type ChildProcess } from 'node:child_process'
import { existsSync } from 'node:fs'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { pathToFileURL } from 'node:url'
import { REPO } from './seeds.js'

export interface CmdResult {
  argv: string[]
  code: number | null
  stdout: string
  stdoutMd5: string
  stdoutLength: number
  stderr: string
  /** main() rejected (stack) */
  threw?: string
  /** uncaught exceptions / unhandled rejections while the command ran */
  stray: string[]
  timedOut: boolean
  /** the worker died (signal or exit) during the command */
  crashed?: string
  maxRssKiB: number
  ms: number
}

interface Reply {
  id: number
  code?: number
  threw?: string
  stray: string[]
  stdoutMd5: string
  stdoutLength: number
  stdout?: string
  stderr: string
  maxRssKiB: number
  ms: number
}

export const MAIN_JS = join(REPO, 'dist', 'cli', 'main.js')
const WORKER = join(REPO, 'test', 'fuzz', 'worker.mjs')

export class ImgtoolWorker {
  private child: ChildProcess | undefined
  private seq = 0
  private pending: { id: number; child: ChildProcess; resolve: (r: Reply | { died: string }) => void } | undefined
  restarts = 0

  constructor(private readonly rssLimitKiB: number) {
    if (!existsSync(MAIN_JS)) throw new Error(`fuzz: ${MAIN_JS} is missing; run npm run build`)
  }

  private start(): ChildProcess {
    const child = spawn(process.execPath, [WORKER, pathToFileURL(MAIN_JS).href], {
      stdio: ['pipe', 'pipe', 'pipe'],
      env: { ...process.env, IMGTOOL_DEBUG: '' },
    })
    const rl = createInterface({ input: child.stdout! })
    rl.on('line', (line) => {
      let r: Reply
      try {
        r = JSON.parse(line) as Reply
      } catch {
        return // a stray print from imgtool itself would be a bug, but it cannot reach stdout: main() gets its own streams
      }
      if (this.pending && r.id === this.pending.id) {
        const p = this.pending
        this.pending = undefined
        p.resolve(r)
      }
    })
    child.stderr!.on('data', () => undefined)
    child.stdin!.on('error', () => undefined) // EPIPE to a worker that died: its exit settles the request
    child.on('exit', (code, signal) => {
      if (this.child === child) this.child = undefined
      // only the death of the process serving the request fails it (a worker
      // retired after a command may exit while the next one already runs)
      if (this.pending && this.pending.child === child) {
        const p = this.pending
        this.pending = undefined
        p.resolve({ died: signal ? `signal ${signal}` : `exit ${code}` })
      }
    })
    this.child = child
    return child
  }

  kill(): void {
    const c = this.child
    this.child = undefined
    if (c && c.exitCode === null) c.kill('SIGKILL')
  }

  async run(argv: string[], cwd: string, opts: { timeoutMs: number; stdoutFile?: string }): Promise<CmdResult> {
    const child = this.child ?? this.start()
    const id = ++this.seq
    const started = Date.now()
    let timer: NodeJS.Timeout | undefined
    const got = await new Promise<Reply | { died: string } | 'timeout'>((resolve) => {
      this.pending = { id, child, resolve }
      timer = setTimeout(() => resolve('timeout'), opts.timeoutMs)
      child.stdin!.write(JSON.stringify({ id, argv, cwd, stdoutFile: opts.stdoutFile }) + '\n')
    })
    clearTimeout(timer)
    const base = { argv, stdout: '', stdoutMd5: '', stdoutLength: 0, stderr: '', stray: [], maxRssKiB: 0, ms: Date.now() - started }
    if (got === 'timeout') {
      this.pending = undefined
      this.kill()
      this.restarts++
      return { ...base, code: null, timedOut: true }
    }
    if ('died' in got) {
      this.restarts++
      return { ...base, code: null, timedOut: false, crashed: got.died }
    }
    const r: CmdResult = {
      argv,
      code: got.code ?? null,
      stdout: got.stdout ?? '',
      stdoutMd5: got.stdoutMd5,
      stdoutLength: got.stdoutLength,
      stderr: got.stderr,
      threw: got.threw,
      stray: got.stray,
      timedOut: false,
      maxRssKiB: got.maxRssKiB,
      ms: got.ms,
    }
    if (r.maxRssKiB > this.rssLimitKiB * 0.6) {
      // peak RSS only grows: start afresh well below the limit, so a command
      // that crosses the limit did so by itself
      this.kill()
      this.restarts++
    }
    return r
  }

  close(): void {
    const c = this.child
    this.child = undefined
    if (c) c.stdin!.end()
  }
}
