import { createRequire } from 'node:module'
import type { CliIo } from './command.js'
import { COMMANDS, type CommandEntry } from './commands/index.js'
import { EXIT_FAILURE, renderError } from './errors.js'

function version(): string {
  const require = createRequire(import.meta.url)
  return (require('../../package.json') as { version: string }).version
}

/**
 * `imgtool --version`: the package version, the qemu-img version whose
 * behaviour imgtool follows, and which optional native parts were loaded.
 */
async function versionText(): Promise<string> {
  const { QEMU_IMG_VERSION, nativeParts } = await import('../index.js')
  const n = await nativeParts()
  const yes = (b: boolean): string => (b ? 'yes' : 'no')
  return (
    `imgtool ${version()}\n` +
    `follows qemu-img ${QEMU_IMG_VERSION}\n` +
    `native: seek-hole ${yes(n.seekHole)}, ofd-locks ${yes(n.ofdLocks)}, copy-file-range ${yes(n.copyFileRange)}, ` +
    `fallocate ${yes(n.fallocate)}, deflate ${yes(n.deflate)}\n`
  )
}

export async function main(argv: string[], io?: Partial<CliIo>): Promise<number> {
  const cio: CliIo = {
    stdout: io?.stdout ?? process.stdout,
    stderr: io?.stderr ?? process.stderr,
    isTTY: io?.isTTY ?? Boolean((process.stderr as { isTTY?: boolean }).isTTY),
  }
  if (io?.signal) cio.signal = io.signal
  if (io?.onInterrupt) cio.onInterrupt = io.onInterrupt
  if (io?.setGraceful) cio.setGraceful = io.setGraceful
  const args = argv.slice(2)
  if (args.length === 1 && (args[0] === '--version' || args[0] === '-V')) {
    // the fast path: no commander, no command modules
    cio.stdout.write(await versionText())
    return 0
  }
  const { Command, CommanderError } = await import('commander')
  let exitCode = 0
  const program = new Command('imgtool')
  program
    .description('Check, repair, inspect and convert qcow2 images and dm-snapshot COW stores')
    .version(args.includes('-V') || args.includes('--version') ? await versionText() : version(), '-V, --version')
    .exitOverride()
    .configureOutput({
      writeOut: (s) => cio.stdout.write(s),
      writeErr: (s) => cio.stderr.write(s),
    })
    .showHelpAfterError('(run imgtool --help for usage)')

  // Only the command being run is loaded; --help lists every command by loading them all.
  const wanted = argv.slice(2).find((a) => !a.startsWith('-'))
  const known = wanted !== undefined && ALL_COMMANDS.some((c) => c.name === wanted || (ALIASES[c.name] ?? []).includes(wanted))
  const wantsHelp = !known || argv.includes('--help') || argv.includes('-h')
  for (const entry of ALL_COMMANDS) {
    if (!wantsHelp && entry.name !== wanted && !(ALIASES[entry.name] ?? []).includes(wanted!)) continue
    const mod = await entry.load()
    const cmd = program.command(mod.name).description(mod.description)
    for (const a of mod.aliases ?? []) cmd.alias(a)
    mod.configure(cmd)
    cmd.exitOverride()
    cmd.action(async (...actionArgs: unknown[]) => {
      const command = actionArgs[actionArgs.length - 1] as InstanceType<typeof Command>
      const opts = command.opts()
      try {
        exitCode = await mod.run(command.args, opts, cio)
      } catch (e) {
        exitCode = renderError(e, cio.stderr)
      }
    })
  }

  try {
    await program.parseAsync(argv)
  } catch (e) {
    if (e instanceof CommanderError) {
      if (e.code === 'commander.helpDisplayed' || e.code === 'commander.version' || e.code === 'commander.help') return 0
      return EXIT_FAILURE
    }
    return renderError(e, cio.stderr)
  }
  return exitCode
}

/** The work commands and the two that describe them (generated from the table, so not in it). */
const ALL_COMMANDS: CommandEntry[] = [
  ...COMMANDS,
  { name: 'completion', load: async () => (await import('./commands/completion.js')).default },
  { name: 'man', load: async () => (await import('./commands/man.js')).default },
]

/** Aliases must be known before a command module is loaded. */
const ALIASES: Record<string, string[]> = {}
