import type { CommandModule } from '../command.js'
import { addImageOptions, addOutputOption, oneImageArg, parseImageOptions, parseOutput, printJson } from '../common.js'

/** imgtool snapshot [-l | -c NAME | -a NAME | -d NAME] IMAGE */
const snapshot: CommandModule = {
  name: 'snapshot',
  description: 'list, create, apply or delete internal snapshots (qemu-img snapshot)',
  configure(cmd) {
    addOutputOption(addImageOptions(cmd))
      .option('-l, --list', 'list snapshots (--output json: the snapshots array of qemu-img info --output json)')
      .option('-c, --create <name>', 'create a snapshot')
      .option('-a, --apply <name>', 'revert the image to a snapshot')
      .option('-d, --delete <name>', 'delete a snapshot')
      .option('-q, --quiet', 'print nothing')
      .option('-U, --force-share', 'with -l: open without image locks (the image may be in use)')
      .argument('<image>')
  },
  async run(args, opts, io) {
    const api = await import('../../index.js')
    const path = oneImageArg(args)
    const actions = ['list', 'create', 'apply', 'delete'].filter((k) => opts[k] !== undefined)
    if (actions.length > 1) throw new api.UsageError('Cannot mix -l, -c, -a and -d')
    const action = actions[0] ?? 'list'
    const { format, options } = parseImageOptions(opts)
    const o = {
      ...(format !== undefined ? { format } : {}),
      options,
      forceShare: opts['forceShare'] === true,
      onNotice: (n: string) => void io.stderr.write(`imgtool: ${n}\n`),
    }
    const name = String(opts[action] ?? '')
    if (action === 'create') await api.snapshot.create(path, name, o)
    else if (action === 'apply') await api.snapshot.apply(path, name, o)
    else if (action === 'delete') await api.snapshot.delete(path, name, o)
    else {
      const list = await api.snapshot.list(path, o)
      const { snapshotJson, snapshotList } = await import('../render/info.js')
      if (parseOutput(opts) === 'json') printJson(io.stdout, list.map(snapshotJson))
      else if (list.length > 0 && !opts['quiet']) io.stdout.write(snapshotList(list).join('\n') + '\n')
    }
    return 0
  },
}
export default snapshot
