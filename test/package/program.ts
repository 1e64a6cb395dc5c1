// A strict TypeScript program that uses every function the package exports, compiled
// against the installed tarball by test/package/pack.test.ts. argv: WORKDIR FIXTURE_QCOW2 DMSNAP_ORIGIN DMSNAP_COW
import {
  openImage,
  check,
  createImage,
  convert,
  compare,
  snapshot,
  resize,
  merge,
  checkExitCode,
  MemoryDevice,
  isImgtoolError,
  ImgtoolError,
  UsageError,
  NotFoundError,
  WrongFormatError,
  UnsupportedFeatureError,
  NoCheckError,
  CorruptImageError,
  ImageIoError,
  ReadOnlyError,
  AbortedError,
  EXIT_CLEAN,
  EXIT_CHECK_FAILED,
  EXIT_CORRUPT,
  EXIT_LEAKS,
  EXIT_NO_CHECK,
  type CheckReport,
  type Extent,
  type Image,
  type ImageInfo,
  type ConvertResult,
  type CompareResult,
  type ErrorCode,
} from 'imgtool'
import { copyFileSync } from 'node:fs'
import { join } from 'node:path'

const [dir, fixture, origin, cow] = process.argv.slice(2) as [string, string, string, string]
const out: Record<string, unknown> = {}

// open, info, read, extents, dispose
{
  await using img: Image = await openImage(fixture)
  const info: ImageInfo = await img.info()
  const extents: Extent[] = []
  for await (const e of img.extents()) extents.push(e)
  const first = await img.read(0, 512)
  out['info'] = { format: info.format, virtualSize: info.virtualSize, extents: extents.length, firstByte: first[0], writable: img.write !== undefined }
}

// check a path and an open image
const report: CheckReport = await check(fixture)
out['check'] = { corruptions: report.corruptions, leaks: report.leaks, exit: checkExitCode(report), clean: EXIT_CLEAN }
{
  const img = await openImage(fixture)
  out['checkOpen'] = (await check(img)).corruptions
  await img.close()
}

// create, write through a writable image, snapshots, resize, convert, compare
const q = join(dir, 'made.qcow2')
await createImage(q, { format: 'qcow2', size: '4M', options: { cluster_size: '4096' } })
{
  const img = await openImage(q, { readOnly: false })
  await img.write!(0, new Uint8Array(4096).fill(7))
  await img.writeZeroes!(8192, 4096)
  await img.flush()
  await img.close()
}
const s = await snapshot.create(q, 'first')
out['snapshot'] = { id: s.snapshot.id, list: (await snapshot.list(q)).map((x) => x.name) }
{
  const img = await openImage(q, { readOnly: false })
  await img.write!(0, new Uint8Array(4096).fill(9))
  await img.close()
}
await snapshot.apply(q, 'first')
await snapshot.delete(q, 'first')
out['resized'] = (await resize(q, '+1M')).size
const raw = join(dir, 'made.raw')
let progressCalls = 0
const c: ConvertResult = await convert(q, raw, { targetFormat: 'raw', onProgress: () => void progressCalls++ })
const cmp: CompareResult = await compare(q, raw)
out['convert'] = { bytesWritten: c.bytesWritten, identical: cmp.identical, progress: progressCalls > 0 }

// a memory device
{
  const mem = new MemoryDevice(1 << 20, { name: 'mem' })
  const img = await openImage(mem, { format: 'raw' })
  out['memory'] = img.virtualSize
  await img.close()
}

// dm-snapshot: a fresh store against a copy of the origin, written and merged
{
  const o = join(dir, 'origin.img')
  copyFileSync(origin, o)
  const store = join(dir, 'store.cow')
  await createImage(store, { format: 'dmsnap', size: '1M', origin: o, options: { chunk_size: '4K' } })
  const img = await openImage(store, { readOnly: false, origin: o, format: 'dmsnap' })
  await img.write!(4096, new Uint8Array(4096).fill(0x42))
  await img.close()
  const m = await merge(store, o)
  out['merge'] = m.merged
  out['dmsnapCheck'] = (await check(cow, { format: 'dmsnap', origin })).corruptions
}

// errors with stable codes; an abort
const codes: ErrorCode[] = []
try {
  await openImage(join(dir, 'missing.qcow2'))
} catch (e) {
  if (isImgtoolError(e) && e instanceof NotFoundError) codes.push(e.code)
}
try {
  await createImage(join(dir, 'bad.qcow2'), { format: 'qcow2', size: 1 << 20, options: { cluster_size: '3' } })
} catch (e) {
  if (e instanceof UsageError) codes.push(e.code)
}
try {
  await check(raw, { format: 'raw' })
} catch (e) {
  if (e instanceof NoCheckError) codes.push(e.code)
}
try {
  const ac = new AbortController()
  ac.abort()
  await convert(q, join(dir, 'x.raw'), { signal: ac.signal })
} catch (e) {
  if (e instanceof AbortedError) codes.push(e.code)
}
const classes = [ImgtoolError, WrongFormatError, UnsupportedFeatureError, CorruptImageError, ImageIoError, ReadOnlyError].map((k) => k.name)
out['errors'] = { codes, classes, exits: [EXIT_CHECK_FAILED, EXIT_CORRUPT, EXIT_LEAKS, EXIT_NO_CHECK] }
console.log(JSON.stringify(out))
