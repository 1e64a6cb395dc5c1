/**
 * The command table. Each entry loads its module only when that command runs,
 * so `imgtool --version` stays fast.
 */
import type { CommandModule } from '../command.js'

export interface CommandEntry {
  name: string
  load: () => Promise<CommandModule>
}

export const COMMANDS: CommandEntry[] = [
  { name: 'info', load: async () => (await import('./info.js')).default },
  { name: 'map', load: async () => (await import('./map.js')).default },
  { name: 'cat', load: async () => (await import('./cat.js')).default },
  { name: 'check', load: async () => (await import('./check.js')).default },
  { name: 'repair', load: async () => (await import('./repair.js')).default },
  { name: 'merge', load: async () => (await import('./merge.js')).default },
  { name: 'create', load: async () => (await import('./create.js')).default },
  { name: 'convert', load: async () => (await import('./convert.js')).default },
  { name: 'compare', load: async () => (await import('./compare.js')).default },
  { name: 'snapshot', load: async () => (await import('./snapshot.js')).default },
  { name: 'resize', load: async () => (await import('./resize.js')).default },
  { name: 'amend', load: async () => (await import('./amend.js')).default },
  { name: 'measure', load: async () => (await import('./measure.js')).default },
  { name: 'dd', load: async () => (await import('./dd.js')).default },
  { name: 'validate', load: async () => (await import('./validate.js')).default },
  { name: 'completion', load: async () => (await import('./completion.js')).default },
  { name: 'man', load: async () => (await import('./man.js')).default },
]
