import type { CommandModule } from '../command.js'

/** imgtool bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)... [-b SOURCE_FILE [-F SOURCE_FMT]] [-g GRANULARITY] [-f FMT] FILENAME BITMAP */
const bitmap: CommandModule = {
  name: 'bitmap',
  description: 'add, remove, clear, enable, disable or merge persistent dirty bitmaps of a qcow2 image (qemu-img bitmap)',
  configure(cmd) {
    cmd
      .option('--add', 'create the bitmap (enabled; --disable after it makes it disabled)')
      .option('--remove', 'remove the bitmap')
      .option('--clear', 'clear every bit of the bitmap')
      .option('--enable', 'let guest writes set its bits')
      .option('--disable', 'stop guest writes from setting its bits')
      .option('--merge <source>', 'merge the bits of bitmap SOURCE into the bitmap')
      .option('-b, --source-file <file>', 'with --merge: the image holding SOURCE')
      .option('-F, --source-format <fmt>', 'the format of the -b image; probed when absent')
      .option('-g, --granularity <size>', 'with --add: bytes per bit (a power of two, at least 512)')
      .option('-f, --format <fmt>', 'image format; probed when absent')
      .option('--object <spec>', 'refused: imgtool has no QEMU objects')
      .argument('[filename-and-bitmap...]', 'FILENAME BITMAP')
    // the operations, in the order given (qemu-img applies them in that order)
    const record = (op: string) =>
      function (this: typeof cmd, value?: string) {
        const prev = (this.getOptionValue('ops') as Array<[string, string | undefined]> | undefined) ?? []
        this.setOptionValue('ops', [...prev, [op, value]])
      }
    for (const op of ['add', 'remove', 'clear', 'enable', 'disable', 'merge']) cmd.on(`option:${op}`, record(op))
  },
  async run(args, opts, io) {
    const { UsageError, bitmap: edit, isFormatName } = await import('../../index.js')
    if (opts['object'] !== undefined) throw new UsageError('--object is not supported: imgtool has no QEMU objects')
    const recorded = (opts['ops'] as Array<[string, string | undefined]> | undefined) ?? []
    if (recorded.length === 0) throw new UsageError('Need at least one of --add, --remove, --clear, --enable, --disable, or --merge')
    let granularity: number | undefined
    if (opts['granularity'] !== undefined) {
      const text = String(opts['granularity'])
      const m = /^\s*(\d+(?:\.\d+)?)\s*([kmgtpe]?)\s*$/i.exec(text)
      const unit = 1024 ** ' kmgtpe'.indexOf((m?.[2] || ' ').toLowerCase())
      const n = m ? Number(m[1]) * unit : NaN
      if (!Number.isSafeInteger(n)) {
        throw new UsageError(
          'Invalid granularity specified. You may use k, M, G, T, P or E suffixes for\nkilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.',
        )
      }
      if (n !== 0) granularity = n
    }
    const ops = recorded.map(([op, value]) => (op === 'merge' ? { op: 'merge' as const, source: String(value) } : { op: op as 'add' }))
    if (granularity !== undefined && !ops.some((o) => o.op === 'add')) throw new UsageError('granularity only supported with --add')
    const sourceFile = opts['sourceFile'] as string | undefined
    const sourceFormat = opts['sourceFormat'] as string | undefined
    if (sourceFormat !== undefined && sourceFile === undefined) throw new UsageError('-F only supported with -b')
    if (sourceFile !== undefined && !ops.some((o) => o.op === 'merge')) throw new UsageError('Merge bitmap source file only supported with --merge')
    if (args.length !== 2 || args[0] === undefined || args[1] === undefined) throw new UsageError('Expecting filename and bitmap name')
    const f = opts['format']
    if (f !== undefined && !isFormatName(String(f))) throw new UsageError(`Unknown file format '${String(f)}'`)
    if (sourceFormat !== undefined && !isFormatName(sourceFormat)) throw new UsageError(`Unknown file format '${sourceFormat}'`)
    await edit(args[0], args[1], {
      operations: ops,
      ...(f !== undefined && isFormatName(String(f)) ? { format: String(f) as never } : {}),
      ...(granularity !== undefined ? { granularity } : {}),
      ...(sourceFile !== undefined ? { sourceFile } : {}),
      ...(sourceFormat !== undefined && isFormatName(sourceFormat) ? { sourceFormat } : {}),
      ...(io.signal ? { signal: io.signal } : {}),
    })
    return 0
  },
}
export default bitmap
