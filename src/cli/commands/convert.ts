import type { CommandModule } from '../command.js'
import { parseKeyValues } from '../common.js'

/** imgtool convert [-f FMT] -O raw|qcow2 [-c] [-o ...] [-B BACKING] [-S SIZE] [-p] SRC DST (DST may be - for raw) */
const convert: CommandModule = {
  name: 'convert',
  description: 'convert an image to another format (qemu-img convert)',
  configure(cmd) {
    cmd
      .option('-f, --format <fmt>', 'source format (probed when absent)')
      .option('-O, --output-format <fmt>', 'target format: raw, qcow2, or dmsnap (a COW store against -o origin=PATH)', 'raw')
      .option('--origin <path>', 'origin of a dm-snapshot source (with -f dmsnap)')
      .option('-c, --compress', 'write compressed clusters (qcow2)')
      .option('-o, --options <opts>', 'target format options (as for create)')
      .option('-B, --backing <file>', 'target backing file: only data not in it is written')
      .option('-F, --backing-format <fmt>', 'format of the -B backing file')
      .option('-S, --sparse-size <size>', 'zero runs of at least SIZE bytes are left sparse (0: write all)', '4k')
      .option('-m, --parallel <n>', 'I/Os in flight', '4')
      .option('-t, --cache <mode>', 'target cache mode: unsafe (as qemu-img: no flush at all) or writeback (flushed once, at the end)', 'unsafe')
      .option('-p, --progress', 'show progress (on a terminal)')
      .option('-q, --quiet', 'print nothing')
      .option('-U, --force-share', 'open the source without image locks (it may be in use)')
      .argument('<source>')
      .argument('<target>')
  },
  async run(args, opts, io) {
    const { UsageError } = await import('../../errors.js')
    const { parseSize } = await import('../../util/size.js')
    const { isFormatName } = await import('../../image/probe.js')
    if (args.length !== 2) throw new UsageError('Expecting one source and one target')
    const [srcPath, dstPath] = args as [string, string]
    const outFmt = String(opts['outputFormat'] ?? 'raw')
    if (outFmt !== 'raw' && outFmt !== 'qcow2' && outFmt !== 'dmsnap') throw new UsageError(`Unknown target format '${outFmt}' (raw, qcow2, dmsnap)`)
    const srcFmt = opts['format'] === undefined ? undefined : String(opts['format'])
    if (srcFmt !== undefined && !isFormatName(srcFmt)) throw new UsageError(`Unknown file format '${srcFmt}'`)
    const compress = Boolean(opts['compress'])
    if (compress && outFmt !== 'qcow2') throw new UsageError('Compression not supported for this file format')
    const minSparse = parseSize(String(opts['sparseSize'] ?? '4k'), '-S')
    const inFlight = Number(opts['parallel'] ?? 4)
    if (!Number.isInteger(inFlight) || inFlight < 1) throw new UsageError('-m must be a positive whole number')
    const cache = String(opts['cache'] ?? 'unsafe')
    if (cache !== 'unsafe' && cache !== 'writeback') throw new UsageError(`Invalid cache option: ${cache} (unsafe, writeback)`)
    const options = parseKeyValues(opts['options'] as string | undefined)
    const backing = opts['backing'] as string | undefined
    if (backing !== undefined && outFmt !== 'qcow2') throw new UsageError('-B needs a target format with backing files (qcow2)')
    const { openImage, makeContext, driverFor } = await import('../../open.js')
    const { openFileDevice } = await import('../../io/file-device.js')
    const { convert: run, rawStream } = await import('../../convert/convert.js')
    const srcOptions: Record<string, string> = typeof opts['origin'] === 'string' ? { origin: opts['origin'] } : {}
    const src = await openImage(srcPath, { format: srcFmt as never, readOnly: true, options: srcOptions, forceShare: opts['forceShare'] === true })
    try {
      const showProgress = Boolean(opts['progress']) && io.isTTY && !opts['quiet']
      const spinner = showProgress ? (await import('ora')).default({ stream: io.stderr as NodeJS.WriteStream, text: 'converting' }).start() : undefined
      const onProgress = spinner ? (d: number, t: number) => void (spinner.text = `converting (${((100 * d) / Math.max(1, t)).toFixed(2)}/100%)`) : undefined
      try {
        if (dstPath === '-') {
          if (outFmt !== 'raw') throw new UsageError('Only raw output can go to stdout (-)')
          const { writeOut, PipeClosed } = await import('../stream.js')
          let done = 0
          for await (const chunk of rawStream(src, { inFlight })) {
            try {
              await writeOut(io.stdout, chunk)
            } catch (e) {
              if (e instanceof PipeClosed) return 0
              throw e
            }
            done += chunk.byteLength
            onProgress?.(done, src.virtualSize)
          }
          return 0
        }
        if (outFmt === 'dmsnap') return await convertToDmsnap(src, dstPath, options, onProgress)
        const dev = await openFileDevice(dstPath, { readOnly: false, create: true })
        try {
          if (outFmt === 'raw') await driverFor('raw').create!(dev, makeContext(openFileDevice), { size: src.virtualSize, options })
          else {
            const extra: { backingFile?: string; backingFormat?: string } = {}
            if (backing !== undefined) {
              extra.backingFile = backing
              extra.backingFormat = String(opts['backingFormat'] ?? 'qcow2')
            }
            await driverFor('qcow2').create!(dev, makeContext(openFileDevice), { size: src.virtualSize, options, ...extra })
          }
          await dev.flush()
        } finally {
          await dev.close()
        }
        const { unsafeCacheOpener } = await import('../../convert/unsafe-cache.js')
        const dst = await openImage(dstPath, { format: outFmt, readOnly: false, openDevice: unsafeCacheOpener(openFileDevice, cache) })
        let pool: import('../../formats/qcow2/compress-write.js').CompressPool | undefined
        try {
          let compressFns: Pick<import('../../convert/convert.js').ConvertOptions, 'compress' | 'compressMany'> = {}
          if (compress) {
            const { CompressPool } = await import('../../formats/qcow2/compress-write.js')
            const q = dst as import('../../formats/qcow2/image.js').Qcow2Image
            pool = new CompressPool()
            const p = pool
            compressFns = {
              compress: (c) => p.compress(c, q.clusterSize, q.header.compressionType),
              compressMany: (buf, offsets) => p.compressMany(buf, offsets, q.clusterSize, q.header.compressionType),
            }
          }
          await run(src, dst, { minSparse, inFlight, hostFiles: true, targetHasBacking: backing !== undefined, ...compressFns, ...(onProgress ? { onProgress } : {}) })
        } finally {
          await pool?.close()
          await dst.close()
        }
      } finally {
        spinner?.stop()
      }
    } finally {
      await src.close()
    }
    return 0
  },
}
export default convert

/** -O dmsnap: a COW store holding the chunks where the source differs from the origin. */
async function convertToDmsnap(
  src: import('../../image/disk-image.js').DiskImage,
  dstPath: string,
  options: Record<string, string>,
  onProgress: ((done: number, total: number) => void) | undefined,
): Promise<number> {
  const { UsageError } = await import('../../errors.js')
  const { parseSize } = await import('../../util/size.js')
  const { openImage } = await import('../../open.js')
  const { openFileDevice } = await import('../../io/file-device.js')
  const { convertToCow } = await import('../../formats/dmsnap/index.js')
  for (const k of Object.keys(options)) {
    if (!['origin', 'chunk_size', 'cow_size'].includes(k)) throw new UsageError(`-O dmsnap: unknown option '${k}' (origin, chunk_size, cow_size)`)
  }
  const originPath = options['origin']
  if (!originPath) throw new UsageError('-O dmsnap needs the origin: -o origin=PATH')
  const origin = await openImage(originPath, { readOnly: true })
  try {
    const dev = await openFileDevice(dstPath, { readOnly: false, create: true })
    try {
      const o: { chunkSize?: number; cowSize?: number; onProgress?: (d: number, t: number) => void } = {}
      if (options['chunk_size'] !== undefined) o.chunkSize = parseSize(options['chunk_size'], 'chunk_size')
      if (options['cow_size'] !== undefined) o.cowSize = parseSize(options['cow_size'], 'cow_size')
      if (onProgress) o.onProgress = onProgress
      await convertToCow(src, origin, dev, o)
      await dev.flush()
    } finally {
      await dev.close()
    }
  } finally {
    await origin.close()
  }
  return 0
}
