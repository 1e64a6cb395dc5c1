/**
 * The progress display of long commands (`-p`), three ways, as qemu-img and a terminal user expect:
 *
 * - stderr is a terminal: a spinner line with the percentage, bytes done of the total, the rate and the
 *   time left, ending with a one-line summary. ora's default (`discardStdin: true`) puts the terminal in
 *   raw mode while it spins, so Ctrl-C arrives as a byte instead of SIGINT and cannot stop the command:
 *   stdin is left alone here, and the display registers itself with the interrupt handler so the cursor
 *   is shown again however the command ends. `NO_COLOR` turns the spinner's colour off.
 * - not a terminal: qemu-img's own lines, `    (NN.NN/100%)` ending in a carriage return, printed at 0,
 *   whenever the percentage has grown by more than one point since the last line, and at 100, then a
 *   newline (util/qemu-progress.c), on stdout — or on stderr when stdout carries the command's data
 *   (`convert ... -`, `cat`). Management tools parse these.
 * - no `-p`: nothing, except that SIGUSR1 prints the current percentage on stderr, one line, as qemu-img
 *   does (`kill -USR1 PID` on a long convert).
 */
import type { CliIo } from './command.js'

export interface Progress {
  update(done: number, total: number): void
  /**
   * `ok`: the command finished (the terminal display then prints its summary, the plain one 100%).
   * `lastWords` prints the command's own result where qemu-img puts it: after the display is cleared on a
   * terminal, before the plain lines' final newline (as `qemu-img compare -p` prints its verdict).
   */
  stop(ok?: boolean, lastWords?: () => void): void
}

export interface ProgressOptions {
  /** `-p` was given */
  requested: boolean
  /** `-q` was given: no display at all (SIGUSR1 still answers) */
  quiet?: boolean
  /** stdout carries the command's data: the plain lines go to stderr */
  dataOnStdout?: boolean
  /** what `done`/`total` count (default bytes) */
  unit?: 'bytes' | 'items'
  /** the unit's name when it counts items (e.g. "exceptions") */
  itemName?: string
}

/** `    (NN.NN/100%)`, qemu's format: at least three digits before the point, two after */
export function qemuPercent(pct: number): string {
  return `    (${pct.toFixed(2)}/100%)`
}

function percent(done: number, total: number): number {
  if (total <= 0) return done > 0 ? 100 : 0
  return Math.min(100, Math.max(0, (100 * done) / total))
}

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB']
function human(n: number): string {
  let v = n
  let u = 0
  while (v >= 1024 && u < UNITS.length - 1) {
    v /= 1024
    u++
  }
  return u === 0 ? `${Math.round(v)} B` : `${v.toFixed(v < 10 ? 2 : v < 100 ? 1 : 0)} ${UNITS[u]}`
}

function duration(s: number): string {
  if (!Number.isFinite(s)) return '?'
  const t = Math.max(0, Math.round(s))
  const h = Math.floor(t / 3600)
  const m = Math.floor((t % 3600) / 60)
  const sec = t % 60
  return h > 0 ? `${h}h${String(m).padStart(2, '0')}m` : m > 0 ? `${m}m${String(sec).padStart(2, '0')}s` : `${sec}s`
}

/** The terminal line: percentage, amount done of the total, rate, time left. */
export function terminalLine(verb: string, done: number, total: number, elapsedMs: number, o: Pick<ProgressOptions, 'unit' | 'itemName'> = {}): string {
  const pct = percent(done, total)
  const secs = elapsedMs / 1000
  const rate = secs > 0 ? done / secs : 0
  const left = rate > 0 ? (total - done) / rate : Infinity
  const amount = o.unit === 'items' ? `${done}/${total} ${o.itemName ?? 'items'}` : `${human(done)} of ${human(total)}`
  const speed = o.unit === 'items' ? `${rate.toFixed(rate < 10 ? 1 : 0)}/s` : `${human(rate)}/s`
  return `${verb} ${pct.toFixed(1)}%  ${amount}  ${speed}  ${pct >= 100 ? 'done' : `${duration(left)} left`}`
}

/** The one line a terminal keeps after the spinner: what was done, in how long, how fast. */
export function summaryLine(verb: string, total: number, elapsedMs: number, o: Pick<ProgressOptions, 'unit' | 'itemName'> = {}): string {
  const secs = elapsedMs / 1000
  const rate = secs > 0 ? total / secs : 0
  const amount = o.unit === 'items' ? `${total} ${o.itemName ?? 'items'}` : human(total)
  const speed = o.unit === 'items' ? `${rate.toFixed(1)}/s` : `${human(rate)}/s`
  return `${verb}: ${amount} in ${secs.toFixed(1)} s (${speed})`
}

/** qemu-img's plain lines on `out`: 0 at the start, every step of more than one point, 100, a newline at the end. */
export function plainProgress(out: NodeJS.WritableStream): Progress {
  let last = 0
  let stopped = false
  out.write(`${qemuPercent(0)}\r`)
  return {
    update(done, total) {
      if (stopped) return
      const pct = percent(done, total)
      if (pct > last + 1 || pct === 100) {
        last = pct
        out.write(`${qemuPercent(pct)}\r`)
      }
    },
    stop(ok = true, lastWords) {
      if (stopped) return
      stopped = true
      if (ok && last < 100) out.write(`${qemuPercent(100)}\r`)
      lastWords?.()
      out.write('\n')
    },
  }
}

/** No display; SIGUSR1 prints the current percentage on `err` (qemu-img's progress_dummy_print). */
export function signalProgress(err: NodeJS.WritableStream): Progress {
  let pct = 0
  const onSignal = () => void err.write(`${qemuPercent(pct)}\n`)
  process.on('SIGUSR1', onSignal)
  return {
    update(done, total) {
      pct = percent(done, total)
    },
    stop(_ok, lastWords) {
      process.removeListener('SIGUSR1', onSignal)
      lastWords?.()
    },
  }
}

async function terminalProgress(io: CliIo, verb: string, o: ProgressOptions): Promise<Progress> {
  const ora = (await import('ora')).default
  const noColor = process.env['NO_COLOR'] !== undefined && process.env['NO_COLOR'] !== ''
  const spinner = ora({ stream: io.stderr as NodeJS.WriteStream, text: verb, discardStdin: false, ...(noColor ? { color: false as const } : {}) }).start()
  const started = Date.now()
  let total = 0
  let stopped = false
  const stop = (ok = false, lastWords?: () => void) => {
    if (stopped) return
    stopped = true
    spinner.stop()
    unregister?.()
    if (ok) io.stderr.write(`${summaryLine(verb, total, Date.now() - started, o)}\n`)
    lastWords?.()
  }
  const unregister = io.onInterrupt?.(() => stop(false))
  return {
    update: (done, t) => {
      total = t
      spinner.text = terminalLine(verb, done, t, Date.now() - started, o)
    },
    stop,
  }
}

/** The display `-p` asks for on this output (or the SIGUSR1 answer when it was not asked for). */
export async function startProgress(io: CliIo, verb: string, o: ProgressOptions): Promise<Progress> {
  if (!o.requested || o.quiet) return signalProgress(io.stderr)
  if (io.isTTY) return terminalProgress(io, verb, o)
  return plainProgress(o.dataOnStdout ? io.stderr : io.stdout)
}
