/**
 * Child processes for the fuzzer: no shell, a hard timeout that kills the
 * whole process, and (optionally) peak RSS through /usr/bin/time -f %M.
 */
import { spawn } from 'node:child_process'
import { existsSync, readFileSync, rmSync } from 'node:fs'
import { join } from 'node:path'
import { tmpdir } from 'node:os'

export interface ProcResult {
  /** exit code; null when killed (signal) or timed out */
  code: number | null
  signal: NodeJS.Signals | null
  timedOut: boolean
  stdout: Buffer
  stderr: string
  /** peak RSS in KiB when measured with /usr/bin/time */
  maxRssKiB?: number
  ms: number
}

export const TIME_BIN = existsSync('/usr/bin/time') ? '/usr/bin/time' : undefined
let rssSeq = 0

export function runProc(
  file: string,
  args: readonly string[],
  opts: { timeoutMs: number; cwd?: string; measureRss?: boolean; stdoutLimit?: number; env?: NodeJS.ProcessEnv },
): Promise<ProcResult> {
  let cmd = file
  let argv = [...args]
  let rssFile: string | undefined
  if (opts.measureRss && TIME_BIN) {
    rssFile = join(tmpdir(), `imgtool-fuzz-rss-${process.pid}-${++rssSeq}`)
    argv = ['-f', '%M', '-o', rssFile, file, ...args]
    cmd = TIME_BIN
  }
  const started = Date.now()
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, argv, { cwd: opts.cwd, env: opts.env ?? process.env, stdio: ['ignore', 'pipe', 'pipe'], detached: true })
    const out: Buffer[] = []
    let outLen = 0
    const err: Buffer[] = []
    let timedOut = false
    const limit = opts.stdoutLimit ?? 256 * 1024 * 1024
    child.stdout.on('data', (c: Buffer) => {
      outLen += c.length
      if (outLen <= limit) out.push(c)
    })
    child.stderr.on('data', (c: Buffer) => err.push(c))
    const timer = setTimeout(() => {
      timedOut = true
      try {
        process.kill(-child.pid!, 'SIGKILL')
      } catch {
        /* gone */
      }
    }, opts.timeoutMs)
    child.on('error', (e) => {
      clearTimeout(timer)
      reject(new Error(`${file}: ${e.message}`))
    })
    child.on('close', (code, signal) => {
      clearTimeout(timer)
      let maxRssKiB: number | undefined
      const stderr = Buffer.concat(err).toString('utf8')
      if (rssFile) {
        try {
          const t = readFileSync(rssFile, 'utf8').trim().split('\n')
          const last = t[t.length - 1] ?? ''
          if (/^\d+$/.test(last)) maxRssKiB = Number(last)
          // /usr/bin/time reports a signal death as "Command terminated by signal N"
          const sig = t.find((l) => l.startsWith('Command terminated by signal'))
          if (sig && code !== null && !signal) {
            resolve({
              code: null,
              signal: `SIG${sig.replace(/\D+/g, '')}` as NodeJS.Signals,
              timedOut,
              stdout: Buffer.concat(out),
              stderr,
              maxRssKiB,
              ms: Date.now() - started,
            })
            rmSync(rssFile, { force: true })
            return
          }
        } catch {
          /* killed before time wrote it */
        }
        rmSync(rssFile, { force: true })
      }
      resolve({
        code: timedOut ? null : code,
        signal: timedOut ? 'SIGKILL' : signal,
        timedOut,
        stdout: Buffer.concat(out),
        stderr,
        maxRssKiB,
        ms: Date.now() - started,
      })
    })
  })
}
