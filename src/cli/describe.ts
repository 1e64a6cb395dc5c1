/**
 * The command definitions as data, read off the same commander configuration the CLI parses with, so
 * shell completion and the man page cannot drift from the options that exist.
 */
import type { CommandModule } from './command.js'
import { COMMANDS } from './commands/index.js'

export interface OptionDescription {
  /** e.g. `-f, --format <fmt>` */
  flags: string
  short?: string
  long?: string
  /** the option takes a value */
  takesValue: boolean
  /** the values the option accepts, when it names them */
  choices?: string[]
  description: string
}

export interface CommandDescription {
  name: string
  aliases: string[]
  description: string
  /** positional arguments as commander shows them (`<image>`, `[image...]`) */
  args: string[]
  options: OptionDescription[]
}

/** Every work command (completion and man, which describe them, are not in the table), each configured on a throw-away commander command. */
export async function describeCommands(): Promise<CommandDescription[]> {
  const { Command } = await import('commander')
  const out: CommandDescription[] = []
  for (const entry of COMMANDS) {
    const mod: CommandModule = await entry.load()
    const cmd = new Command(mod.name)
    mod.configure(cmd)
    out.push({
      name: mod.name,
      aliases: mod.aliases ?? [],
      description: mod.description,
      args: cmd.registeredArguments.map((a) => {
        const n = `${a.name()}${a.variadic ? '...' : ''}`
        return a.required ? `<${n}>` : `[${n}]`
      }),
      options: cmd.options
        .filter((o) => !o.negate || o.long !== undefined)
        .map((o) => ({
          flags: o.flags,
          ...(o.short ? { short: o.short } : {}),
          ...(o.long ? { long: o.long } : {}),
          takesValue: o.required || o.optional,
          ...(o.argChoices ? { choices: [...o.argChoices] } : {}),
          description: o.description,
        })),
    })
  }
  return out
}
