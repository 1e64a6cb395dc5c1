/**
 * The command table. Each entry loads its module only when that command runs,
 * so `imgtool --version` stays fast.
 */
import type { CommandModule } from '../command.js'

export interface CommandEntry {
  name: string
  load: () => Promise<CommandModule>
}

/**
 * The commands that do the work. `completion` and `man`, which describe these, are added by main.ts
 * (listing them here would make a cycle: they read this table).
 */
export const COMMANDS: CommandEntry[] = [
  { name: 'info', load: async () => (await import('./info.js')).default },
  { name: 'map', load: async () => (await import('./map.js')).default },
  { name: 'cat', load: async () => (await import('./cat.js')).default },
  { name: 'check', load: async () => (await import('./check.js')).default },
  { name: 'repair', load: async () => (await import('./repair.js')).default },
  { name: 'merge', load: async () => (await import('./merge.js')).default },
  { name: 'commit', load: async () => (await import('./commit.js')).default },
  { name: 'rebase', load: async () => (await import('./rebase.js')).default },
  { name: 'create', load: async () => (await import('./create.js')).default },
  { name: 'convert', load: async () => (await import('./convert.js')).default },
  { name: 'compare', load: async () => (await import('./compare.js')).default },
  { name: 'snapshot', load: async () => (await import('./snapshot.js')).default },
  { name: 'resize', load: async () => (await import('./resize.js')).default },
  { name: 'amend', load: async () => (await import('./amend.js')).default },
  { name: 'bitmap', load: async () => (await import('./bitmap.js')).default },
  { name: 'measure', load: async () => (await import('./measure.js')).default },
  { name: 'dd', load: async () => (await import('./dd.js')).default },
  { name: 'validate', load: async () => (await import('./validate.js')).default },
]
