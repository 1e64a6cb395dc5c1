import type { Command } from 'commander'

/**
 * One file per command. `configure` declares options on the commander
 * command; `run` parses them (zod), makes one library call, renders, and
 * returns the exit code. Heavy modules are imported inside `run`.
 */
export interface CommandModule {
  name: string
  aliases?: string[]
  description: string
  configure(cmd: Command): void
  run(args: string[], opts: Record<string, unknown>, io: CliIo): Promise<number>
}

export interface CliIo {
  stdout: NodeJS.WritableStream
  stderr: NodeJS.WritableStream
  /** true when stderr is a terminal (progress spinners only then) */
  isTTY: boolean
  /** aborted when SIGINT/SIGTERM arrives (bin/imgtool; absent when main() is called in-process) */
  signal?: AbortSignal
  /** register a synchronous hook run when a signal arrives (restore the terminal); returns an unregister function */
  onInterrupt?(fn: () => void): () => void
  /** the command watches `signal` and cleans up after itself: let it finish stopping */
  setGraceful?(graceful: boolean): void
}
