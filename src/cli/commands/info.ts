import type { CommandModule } from '../command.js'
import { addImageOptions, addImageOptsOption, addOutputOption, imageArg, parseOutput, printJson } from '../common.js'

const info: CommandModule = {
  name: 'info',
  description: 'show information about an image (qemu-img info)',
  configure(cmd) {
    addOutputOption(addImageOptsOption(addImageOptions(cmd)))
      .option('--backing-chain', 'show every image of the backing chain')
      .option('--table', "human output as a table (imgtool's older layout) instead of qemu-img's lines")
      .option('-U, --force-share', 'open without image locks (read-only; the image may be in use)')
      .argument('<image>')
  },
  async run(args, opts, io) {
    const { path, format, options } = imageArg(args, opts)
    const output = parseOutput(opts)
    const { imageInfo } = await import('../../index.js')
    const { infoHuman, infoJson, infoTable } = await import('../render/info.js')
    // as qemu-img info: the image alone (a missing or looping backing file is a name
    // to show); --backing-chain opens the chain and fails where it cannot be opened
    const top = await imageInfo(path, {
      ...(format !== undefined ? { format } : {}),
      options,
      backingChain: Boolean(opts['backingChain']),
      forceShare: opts['forceShare'] === true,
    })
    const chain = [top]
    if (opts['backingChain']) for (let i = top.backing; i; i = i.backing) chain.push(i)
    if (output === 'json') printJson(io.stdout, opts['backingChain'] ? chain.map(infoJson) : infoJson(top))
    else io.stdout.write(chain.map(opts['table'] ? infoTable : infoHuman).join('\n'))
    return 0
  },
}
export default info
