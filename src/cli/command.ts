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
}
