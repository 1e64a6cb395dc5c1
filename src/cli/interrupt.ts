/**
 * SIGINT and SIGTERM: the running command is asked to stop through an
 * AbortSignal (a convert then removes the target it created), the terminal is
 * restored (progress displays show the cursor again), and the process exits
 * 130 (SIGINT) or 143 (SIGTERM), as a shell reports a command killed by them.
 *
 * A command that does not watch the signal (a reader: nothing to clean up)
 * is ended at once, by the signal itself (its default action); one that
 * does gets a few seconds to stop and exits 130/143, or is ended by the
 * signal once they are up. A second signal ends the process at once.
 */
export const EXIT_SIGINT = 130
export const EXIT_SIGTERM = 143

export interface Interrupts {
  readonly signal: AbortSignal
  /** run `fn` (synchronous: terminal restoring, file removal) when a signal arrives; returns an unregister function */
  onInterrupt(fn: () => void): () => void
  /** the command watches `signal` and cleans up itself: give it time before the process is ended */
  setGraceful(graceful: boolean): void
  /** the exit code a signal asks for, once one has arrived */
  readonly exitCode: number | undefined
  dispose(): void
}

const GRACE_MS = 5000

export function installInterrupts(proc: NodeJS.Process = process): Interrupts {
  const controller = new AbortController()
  const hooks = new Set<() => void>()
  let graceful = false
  let code: number | undefined
  const runHooks = () => {
    for (const fn of [...hooks]) {
      try {
        fn()
      } catch {
        // restoring the terminal must not stop the rest
      }
    }
    hooks.clear()
  }
  let received: NodeJS.Signals = 'SIGINT'
  /**
   * End now: the hooks, then the signal again with its default action. Not
   * process.exit(): that waits for libuv's worker threads, and one blocked in
   * the kernel (an open(2) of a FIFO, a dead NFS server) would keep the
   * process alive through every SIGTERM. The shell sees 130/143 either way.
   */
  const end = () => {
    runHooks()
    proc.off('SIGINT', handler)
    proc.off('SIGTERM', handler)
    proc.kill(proc.pid, received)
  }
  const handler = (sig: NodeJS.Signals) => {
    if (code !== undefined) return end() // the second signal: now
    received = sig
    code = sig === 'SIGTERM' ? EXIT_SIGTERM : EXIT_SIGINT
    runHooks()
    controller.abort(new DOMException(`interrupted by ${sig}`, 'AbortError'))
    if (!graceful) return end()
    setTimeout(end, GRACE_MS).unref()
  }
  proc.on('SIGINT', handler)
  proc.on('SIGTERM', handler)
  return {
    signal: controller.signal,
    onInterrupt(fn) {
      hooks.add(fn)
      return () => void hooks.delete(fn)
    },
    setGraceful(g) {
      graceful = g
    },
    get exitCode() {
      return code
    },
    dispose() {
      proc.off('SIGINT', handler)
      proc.off('SIGTERM', handler)
    },
  }
}
