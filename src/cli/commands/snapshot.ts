import type { CommandModule } from '../command.js'
import { addImageOptions, oneImageArg, parseImageOptions } from '../common.js'

/** imgtool snapshot [-l | -c NAME | -a NAME | -d NAME] IMAGE */
const snapshot: CommandModule = {
  name: 'snapshot',
  description: 'list, create, apply or delete internal snapshots (qemu-img snapshot)',
  configure(cmd) {
    addImageOptions(cmd)
      .option('-l, --list', 'list snapshots')
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
      if (list.length === 0) return 0
      const pad = (s: string, n: number) => s.padEnd(n)
      const lines = ['Snapshot list:', `${pad('ID', 9)} ${pad('TAG', 17)} ${'VM SIZE'.padStart(7)}                DATE     VM CLOCK     ICOUNT`]
      for (const s of list) {
        const d = new Date(s.dateSec * 1000)
        const date = `${d.getFullYear()}-${String(d.getMonth() + 1).padStart(2, '0')}-${String(d.getDate()).padStart(2, '0')} ${d.toTimeString().slice(0, 8)}`
        const clock = new Date(Math.floor(s.vmClockNsec / 1e6)).toISOString().slice(11, 23)
        lines.push(
          `${pad(s.id, 9)} ${pad(s.name, 17)} ${api.humanSize(s.vmStateSize).padStart(7)} ${date} ${clock.padStart(12)} ${(s.icount !== undefined && s.icount >= 0 ? String(s.icount) : '').padStart(10)}`,
        )
      }
      if (!opts['quiet']) io.stdout.write(lines.join('\n') + '\n')
    }
    return 0
  },
}
export default snapshot
