import type { CommandModule } from '../command.js'
import { addImageOptions, addImageOptsOption, addOutputOption, imageArg, parseOutput } from '../common.js'
import { writeOut } from '../stream.js'

const map: CommandModule = {
  name: 'map',
  description: 'show the allocation status of every guest range (qemu-img map)',
  configure(cmd) {
    addOutputOption(addImageOptsOption(addImageOptions(cmd)))
      .option('--start-offset <n>', 'first guest byte to map')
      .option('--max-length <n>', 'how many guest bytes to map')
      .option('-U, --force-share', 'open without image locks (read-only; the image may be in use)')
      .argument('<image>')
  },
  async run(args, opts, io) {
    const { path, format, options } = imageArg(args, opts)
    const output = parseOutput(opts)
    const { mapImage } = await import('../../index.js')
    const records = mapImage(path, {
      ...(format !== undefined ? { format } : {}),
      options,
      forceShare: opts['forceShare'] === true,
      ...(opts['startOffset'] !== undefined ? { offset: String(opts['startOffset']) } : {}),
      ...(opts['maxLength'] !== undefined ? { length: String(opts['maxLength']) } : {}),
    })
    {
      let first = true
      // the opening goes out with the first batch: an image that fails early prints nothing on stdout
      // (an empty range is one empty record, as qemu-img prints it)
      let batch = output === 'human' ? `${'Offset'.padEnd(16)}${'Length'.padEnd(16)}${'Mapped to'.padEnd(16)}File\n` : '['
      for await (const e of records) {
        if (output === 'json') {
          const off = e.hostOffset !== undefined ? `, "offset": ${e.hostOffset}` : ''
          batch += `${first ? '' : ',\n'}{ "start": ${e.start}, "length": ${e.length}, "depth": ${e.depth}, "present": ${e.present}, "zero": ${e.zero}, "data": ${e.data}${off}}`
        } else if (e.data && !e.zero && e.hostOffset !== undefined) {
          batch += `${cHex(e.start).padEnd(16)}${cHex(e.length).padEnd(16)}${cHex(e.hostOffset).padEnd(16)}${e.file ?? ''}\n`
        }
        first = false
        if (batch.length > 65536) {
          await writeOut(io.stdout, batch)
          batch = ''
        }
      }
      if (output === 'json') batch += ']\n'
      await writeOut(io.stdout, batch)
    }
    return 0
  },
}

/** printf("%#x"): 0 prints as "0", everything else with 0x. */
function cHex(n: number): string {
  return n === 0 ? '0' : '0x' + n.toString(16)
}

export default map
