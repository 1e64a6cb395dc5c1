/**
 * imgtool man: the manual page (roff, section 1), generated from the command definitions, so it lists
 * exactly the commands and options the CLI parses. `imgtool man | man -l -` shows it.
 */
import type { CommandModule } from '../command.js'
import type { CommandDescription } from '../describe.js'

/** roff-safe text: backslashes doubled, hyphens as \-, a leading dot or quote escaped */
export function roff(s: string): string {
  const t = s.replace(/\\/g, '\\e').replace(/-/g, '\\-')
  return /^[.']/.test(t) ? `\\&${t}` : t
}

const EXIT_STATUS: Array<[string, string]> = [
  ['0', 'success; for check, no errors; for compare, identical images; for validate, every image passes'],
  ['1', 'the command failed (usage, I/O, an image it cannot open); for check, the check could not complete; for compare, the images differ'],
  ['2', 'check: corruptions found; compare: an error; validate: a violation at or above --fail-on'],
  ['3', 'check: leaked clusters only'],
  ['63', 'check: the format has no check'],
]

export function manPage(cmds: readonly CommandDescription[], version: string): string {
  const out: string[] = [
    `.TH IMGTOOL 1 "" "imgtool ${roff(version)}" "User Commands"`,
    '.SH NAME',
    'imgtool \\- check, repair, inspect and convert virtual\\-disk images (qcow2, VHD, VMDK, dm\\-snapshot)',
    '.SH SYNOPSIS',
    '.B imgtool',
    '.I command',
    '.RI [ options ]',
    '.RI [ arguments ]',
    '.br',
    '.B imgtool',
    '.BR \\-\\-version | \\-\\-help',
    '.SH DESCRIPTION',
    'imgtool follows qemu\\-img 7.2: the same verbs, options, JSON and exit codes, with safer repairs (an undo journal),',
    'references never followed unless allowed, and findings that name the structure and offset they concern.',
    '.SH COMMANDS',
  ]
  for (const c of cmds) {
    out.push(`.SS "${roff([c.name, ...c.aliases].join(', '))}"`)
    out.push(`.B imgtool ${roff(c.name)}`)
    out.push(['[\\fIoptions\\fR]', ...c.args.map((a) => `\\fI${roff(a)}\\fR`)].join(' '))
    out.push('.PP', roff(c.description))
    for (const o of c.options) out.push('.TP', `.B ${roff(o.flags)}`, roff(o.description))
  }
  out.push('.SH EXIT STATUS')
  for (const [code, text] of EXIT_STATUS) out.push('.TP', `.B ${code}`, roff(text))
  out.push('.SH ENVIRONMENT')
  out.push('.TP', '.B NO_COLOR', roff('no colour in the progress display'))
  out.push('.TP', '.B IMGTOOL_NO_LOCKS', roff('open images without the QEMU-compatible locks (as QEMU locking=off)'))
  out.push('.SH SEE ALSO', '.BR qemu\\-img (1)', '')
  return out.join('\n')
}

const man: CommandModule = {
  name: 'man',
  description: 'print the manual page (roff), generated from the command definitions: imgtool man | man -l -',
  configure() {},
  async run(_args, _opts, io) {
    const { describeCommands } = await import('../describe.js')
    const { createRequire } = await import('node:module')
    const version = (createRequire(import.meta.url)('../../../package.json') as { version: string }).version
    io.stdout.write(manPage(await describeCommands(), version))
    return 0
  },
}
export default man
