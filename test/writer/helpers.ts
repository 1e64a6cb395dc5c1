/** Helpers for writer tests: images on memory devices, opened through the real driver. */
import type { BlockDevice } from '../../src/io/block-device.js'
import { MemoryDevice } from '../../src/io/memory-device.js'
import { PassThroughDevice } from '../../src/io/pass-through-device.js'
import type { OpenContext } from '../../src/image/context.js'
import { makeContext, openImageOnDevice } from '../../src/open.js'
import { createQcow2 } from '../../src/formats/qcow2/ops/create.js'
import type { Qcow2Image } from '../../src/formats/qcow2/image.js'
import { analyzeQcow2 } from '../../src/formats/qcow2/check/check.js'
import { Prng } from '../support/prng.js'

/** A set of named memory files: backing files and data files resolve here. */
export class MemFiles {
  readonly files = new Map<string, BlockDevice>()
  readonly context: OpenContext
  constructor() {
    this.context = makeContext(async (path, options) => {
      let d = this.files.get(path)
      if (!d || options.create) {
        d = new MemoryDevice(0, { name: path })
        this.files.set(path, d)
      }
      return new Unclosable(d)
    })
  }
}

/** Memory devices survive close (so a test can reopen them). */
export class Unclosable extends PassThroughDevice {
  constructor(inner: BlockDevice) {
    // optional capabilities pass through only where the inner device has them
    super(inner, { forward: ['allocate', 'readInto'] })
  }
  override get readOnly() {
    return false
  }
  override async close() {}
}

export async function createOn(
  dev: BlockDevice,
  size: number,
  options: Record<string, string> = {},
  files = new MemFiles(),
  extra: { backingFile?: string; backingFormat?: string } = {},
): Promise<void> {
  await createQcow2(dev, files.context, { size, options, ...extra })
}

export async function openOn(dev: BlockDevice, files = new MemFiles(), readOnly = false): Promise<Qcow2Image> {
  const d = dev instanceof Unclosable ? dev : new Unclosable(dev)
  return (await openImageOnDevice(d, { format: 'qcow2', readOnly, context: files.context })) as Qcow2Image
}

/** Check counts from our checker (qemu-img check's algorithm). */
export async function checkCounts(
  dev: BlockDevice,
  dataDevice?: BlockDevice,
): Promise<{ corruptions: number; leaks: number; checkErrors: number; diagnostics: string[] }> {
  const a = await analyzeQcow2(dev, dataDevice ? { dataDevice } : {})
  return { corruptions: a.report.corruptions, leaks: a.report.leaks, checkErrors: a.report.checkErrors, diagnostics: a.report.diagnostics }
}

export function randomBytes(rng: Prng, n: number): Uint8Array {
  const b = new Uint8Array(n)
  for (let i = 0; i < n; i++) b[i] = rng.int(256)
  return b
}

/** A byte pattern that names its offset (for reading back). */
export function pattern(offset: number, length: number, seed = 1): Uint8Array {
  const b = new Uint8Array(length)
  for (let i = 0; i < length; i++) b[i] = ((offset + i) * 31 + seed * 7 + ((offset + i) >>> 9)) & 0xff
  return b
}

/** Byte equality without vitest's slow deep compare; names the first differing offset. */
export function sameBytes(got: Uint8Array, want: Uint8Array, what = 'bytes'): void {
  if (
    got.byteLength === want.byteLength &&
    Buffer.from(got.buffer, got.byteOffset, got.byteLength).equals(Buffer.from(want.buffer, want.byteOffset, want.byteLength))
  )
    return
  let i = 0
  while (i < Math.min(got.byteLength, want.byteLength) && got[i] === want[i]) i++
  throw new Error(`${what}: differ at offset 0x${i.toString(16)} (got ${got[i]}, want ${want[i]}; lengths ${got.byteLength} / ${want.byteLength})`)
}
