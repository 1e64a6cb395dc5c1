/**
 * The progress display of long commands, on stderr when it is a terminal.
 *
 * ora's default (`discardStdin: true`) puts the terminal in raw mode while it
 * spins, so Ctrl-C arrives as a byte instead of SIGINT and cannot stop the
 * command: stdin is left alone here, and the display registers itself with
 * the interrupt handler so the cursor is shown again however the command ends.
 */
import type { CliIo } from './command.js'

export interface Progress {
  update(done: number, total: number): void
  stop(): void
}

export async function startProgress(io: CliIo, verb: string): Promise<Progress> {
  const ora = (await import('ora')).default
  const spinner = ora({ stream: io.stderr as NodeJS.WriteStream, text: verb, discardStdin: false }).start()
  let stopped = false
  const stop = () => {
    if (stopped) return
    stopped = true
    spinner.stop()
    unregister?.()
  }
  const unregister = io.onInterrupt?.(stop)
  return {
    update: (done, total) => void (spinner.text = `${verb} (${((100 * done) / Math.max(1, total)).toFixed(2)}/100%)`),
    stop,
  }
}
