/**
 * qemu-img create -f raw: the size rounded up to 512 bytes, and
 * preallocation=off|falloc|full done as qemu's file driver does it
 * (io/prealloc.ts). qemu's raw files have no `metadata` mode: it is refused
 * with qemu's message, leaving the emptied file behind as qemu-img does.
 */
import { UsageError } from '../../errors.js'
import type { BlockDevice } from '../../io/block-device.js'
import { createRawFile, type RawPreallocation } from '../../io/prealloc.js'
import type { CreateImageOptions } from '../../image/context.js'
import { alignUp } from '../../util/bytes.js'
import { parseSize } from '../../util/size.js'

export function parseRawPreallocation(value: string | undefined, file = 'raw'): RawPreallocation {
  const v = value ?? 'off'
  if (v === 'off' || v === 'falloc' || v === 'full') return v
  if (v === 'metadata') throw new UsageError(`${file}: Unsupported preallocation mode: metadata`)
  throw new UsageError(`Invalid parameter value for 'preallocation': '${v}' (off, falloc or full)`)
}

export async function createRaw(device: BlockDevice, options: CreateImageOptions): Promise<void> {
  for (const k of Object.keys(options.options)) {
    if (k !== 'size' && k !== 'preallocation') throw new UsageError(`Invalid parameter '${k}' for raw`)
  }
  const mode = parseRawPreallocation(options.options['preallocation'], device.name)
  const size = alignUp(options.options['size'] !== undefined ? parseSize(options.options['size']) : options.size, 512)
  await createRawFile(device, size, mode)
}
