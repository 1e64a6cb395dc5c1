import type { CommandModule } from '../command.js'
import { addImageOptions, addOutputOption, oneImageArg, parseImageOptions, parseOutput } from '../common.js'

const repair: CommandModule = {
  name: 'repair',
  description: 'repair an image (check -r), with an undo journal; --undo restores one',
  configure(cmd) {
    addOutputOption(addImageOptions(cmd))
      .option('--mode <mode>', "'leaks' or 'all'", 'all')
      .option('--dry-run', 'print the repair plan, write nothing')
      .option('--journal <path>', 'where to write the undo journal (default IMAGE.imgtool-undo[.N])')
      .option('--no-journal', 'repair without an undo journal')
      .option('--undo <journal>', 'restore the image bytes saved in an undo journal (refused unless IMAGE is what that repair left)')
      .option('--force', 'with --undo: apply a journal that cannot be checked (no seal, format 1) or onto another file (a copy) holding what the repair left')
      .option('--force-valid', 're-validate an invalidated dm-snapshot store when every record checks out')
      .option('-q, --quiet', 'print nothing on stdout')
      .option('-p, --progress', "show progress (a terminal line; otherwise qemu-img's '    (NN.NN/100%)' lines, on stderr)")
      .argument('[image...]')
  },
  async run(args, opts, io) {
    const { runCheck, runUndo } = await import('./check.js')
    const path = oneImageArg(args)
    if (typeof opts['undo'] === 'string') return runUndo(io, opts['undo'], path, parseOutput(opts), Boolean(opts['force']))
    const mode = opts['mode']
    if (mode !== 'leaks' && mode !== 'all') {
      io.stderr.write(`imgtool: --mode expects 'leaks' or 'all', not '${String(mode)}'\n`)
      return 1
    }
    return runCheck(io, {
      path,
      image: parseImageOptions(opts),
      output: parseOutput(opts),
      quiet: Boolean(opts['quiet']),
      repair: mode,
      dryRun: Boolean(opts['dryRun']),
      journal: opts['journal'] === false ? false : (opts['journal'] as string | undefined),
      forceValid: Boolean(opts['forceValid']),
      progress: Boolean(opts['progress']),
    })
  },
}
export default repair
