/**
 * validate(path, policy): is this image safe, sound and what was ordered?
 * Opens that one file read-only; a backing file, data file or origin it names
 * is reported and never opened (the open context refuses every other file).
 * Thrown errors mean the file could not be validated (missing, unreadable);
 * everything wrong with the image is a violation in the report.
 */
import { AbortedError, ImgtoolError, WrongFormatError, checkAborted } from '../errors.js'
import type { BlockDevice, DeviceOpener } from '../io/block-device.js'
import { openFileDevice } from '../io/file-device.js'
import type { DiskImage } from '../image/disk-image.js'
import type { FormatName } from '../image/probe.js'
import { makeContext, openImageOnDevice } from '../open.js'
import { DataLimitError, DeadlineError, guestDataBytes, guestDigest, partitionFacts } from './content.js'
import type { Policy, PolicyInput, PresetName } from './policy.js'
import { resolvePolicy } from './resolve.js'
import { qcow2Rules, type Qcow2Facts } from './qcow2-rules.js'
import { CHECK_GROUPS, type CheckGroup } from './codes.js'
import { ViolationSink, type ValidationReport } from './report.js'
import { vhdRules, type VhdFacts } from './vhd-rules.js'
import { vmdkRules, type VmdkFacts } from './vmdk-rules.js'
import { detectFormat, fileSignatures, foreignSignatures, headSignatures } from './signatures.js'

export interface ValidateOptions {
  /** the declared format (overrides the policy's expectFormat) */
  expectFormat?: string
  signal?: AbortSignal
}

const UNSUPPORTED = new Set(['vhdx', 'iso'])

/** validate's format names (qemu-img info's) against the library's driver names */
const LIBRARY_NAME: Partial<Record<string, FormatName>> = { raw: 'raw', qcow2: 'qcow2', dmsnap: 'dmsnap', vhd: 'vpc', vmdk: 'vmdk' }

/** Refuses every file: validation reads the named file only. */
const refuseAll: DeviceOpener = async (path) => {
  throw new WrongFormatError(`${path}: not opened: validation never follows a reference`, { file: path, structure: 'reference' })
}

/** After the time limit, how long the work may take to reach its next poll before its report is handed out anyway. */
const GRACE_MS = 5000

/** What one validation carries through its stages: the signal every loop polls, and where it is. */
interface RunContext {
  signal: AbortSignal
  /** the stage running now, named in a LIMIT_TIMEOUT violation */
  stage: string
  /** check groups whose verdict is complete (the others are skipped when time runs out) */
  done: Set<CheckGroup>
}

/** Enter a stage: stop here if time ran out; the groups named are complete. */
function stage(ctx: RunContext, name: string, complete: CheckGroup[] = []): void {
  for (const g of complete) ctx.done.add(g)
  ctx.stage = name
  checkAborted(ctx.signal, `validate: stopped before the ${name}`)
}

export async function validate(path: string, policyInput: PolicyInput | PresetName | Policy = {}, o: ValidateOptions = {}): Promise<ValidationReport> {
  const started = Date.now()
  checkAborted(o.signal, 'validate')
  const policy = isResolved(policyInput) ? policyInput : await resolvePolicy(policyInput)
  const sink = new ViolationSink(path, policy)
  const limit = policy.limits.timeoutSeconds
  // the time limit is an abort signal every stage polls, the check engine included (between tables)
  const timeout = new AbortController()
  let timedOut = false
  const timer = setTimeout(() => {
    timedOut = true
    timeout.abort(new DeadlineError(`time ran out (limits.timeoutSeconds ${limit})`))
  }, limit * 1000)
  const onOuterAbort = (): void => timeout.abort(o.signal?.reason)
  o.signal?.addEventListener('abort', onOuterAbort, { once: true })
  const ctx: RunContext = { signal: timeout.signal, stage: 'identity check', done: new Set() }
  let dev: BlockDevice
  try {
    dev = await openFileDevice(path, { readOnly: true })
  } catch (e) {
    clearTimeout(timer)
    o.signal?.removeEventListener('abort', onOuterAbort)
    throw e
  }
  const report: ValidationReport = {
    file: path,
    format: 'unknown',
    signatures: [],
    fileSize: dev.size,
    checks: sink.statuses(),
    violations: sink.list,
    notes: sink.notes,
    durationMs: 0,
  }
  const outOfTime = (how: string): void => {
    sink.add('LIMIT_TIMEOUT', `validation ran out of time (limits.timeoutSeconds ${limit}) ${how}`, { structure: ctx.stage })
    for (const g of CHECK_GROUPS) if (g !== 'limits' && !ctx.done.has(g) && !sink.list.some((v) => v.group === g)) sink.skip(g, 'time ran out')
    // anything the work finds after this does not count
    sink.closed = true
  }
  try {
    const declared = o.expectFormat ?? policy.expectFormat
    // qemu-img's name for VHD is vpc: either spelling declares it
    const work = run(dev, policy, sink, report, declared === 'vpc' ? 'vhd' : declared, ctx)
    await withGrace(work, timeout.signal, GRACE_MS, () => {
      if (timedOut) outOfTime(`during the ${ctx.stage}, which did not stop within ${GRACE_MS / 1000} s`)
    })
  } catch (e) {
    // the work stopped at a poll: the time limit is a violation, an abort from outside an error
    if (!timedOut || !(e instanceof AbortedError || e instanceof DeadlineError)) throw e
    outOfTime(`during the ${ctx.stage}: ${e.message}`)
  } finally {
    clearTimeout(timer)
    o.signal?.removeEventListener('abort', onOuterAbort)
    await dev.close().catch(() => undefined)
  }
  if (o.signal?.aborted) checkAborted(o.signal, 'validate')
  sink.closed = true
  report.checks = sink.statuses()
  report.durationMs = Date.now() - started
  return { ...report, violations: [...sink.list], notes: [...sink.notes] }
}

function isResolved(p: PolicyInput | PresetName | Policy): p is Policy {
  return (
    typeof p === 'object' &&
    'severity' in p &&
    'limits' in p &&
    typeof (p as Policy).limits?.timeoutSeconds === 'number' &&
    Array.isArray(p.formats) &&
    !('extends' in p)
  )
}

/**
 * Waits for the work; once the signal fires, gives it `graceMs` to reach its
 * next poll and stop (rejecting), then hands out the report without it (a
 * stage that does not poll is abandoned; its device is closed under it).
 */
async function withGrace(work: Promise<void>, signal: AbortSignal, graceMs: number, onLate: () => void): Promise<void> {
  let timer: NodeJS.Timeout | undefined
  let arm: (() => void) | undefined
  const late = new Promise<'late'>((resolve) => {
    arm = () => {
      timer = setTimeout(() => resolve('late'), graceMs)
    }
    if (signal.aborted) arm()
    else signal.addEventListener('abort', arm, { once: true })
  })
  try {
    if ((await Promise.race([work.then(() => 'done' as const), late])) === 'late') {
      work.catch(() => undefined)
      onLate()
    }
  } finally {
    clearTimeout(timer)
    if (arm) signal.removeEventListener('abort', arm)
  }
}

async function run(
  dev: BlockDevice,
  policy: Policy,
  sink: ViolationSink,
  report: ValidationReport,
  expect: string | undefined,
  ctx: RunContext,
): Promise<void> {
  // identity
  stage(ctx, 'identity check')
  const hits = await fileSignatures(dev)
  report.signatures = hits
  const format = detectFormat(hits)
  report.format = format
  report.expectedFormat = expect
  if (!policy.formats.includes(format)) {
    sink.add('FORMAT_NOT_ALLOWED', `format ${format} is not allowed (allowed: ${policy.formats.join(', ') || 'none'})`, { structure: 'header', offset: 0 })
  }
  if (expect !== undefined && expect !== format)
    sink.add('FORMAT_MISMATCH', `declared format ${expect}, but the file is ${format}`, { structure: 'header', offset: 0 })
  const foreign = foreignSignatures(format, hits)
  if (foreign.length > 0 && !policy.identity.allowPolyglot) {
    for (const f of foreign)
      sink.add('POLYGLOT', `a ${format} image that also carries a ${f.signature} signature`, { structure: `${f.signature} signature`, offset: f.offset })
  }
  if (UNSUPPORTED.has(format)) {
    sink.add('UNSUPPORTED_FORMAT', `format ${format} cannot be read by imgtool yet: not validated`, {
      structure: 'header',
      offset: hits.find((h) => h.signature.startsWith(format))?.offset ?? 0,
    })
    for (const g of ['references', 'features', 'sizes', 'structure', 'content'] as const) sink.skip(g, `format ${format} is not supported yet`)
    return
  }
  const lib = LIBRARY_NAME[format]
  if (lib === undefined) return

  // identity, references and features from the header (footer)
  let facts: Qcow2Facts | undefined
  let vhd: VhdFacts | undefined
  let vmdk: VmdkFacts | undefined
  if (format === 'qcow2') {
    facts = await qcow2Rules(dev, policy, sink)
    if (!facts?.header) {
      for (const g of ['structure', 'content'] as const) sink.skip(g, 'the header could not be parsed')
      return
    }
  } else if (format === 'vhd') {
    vhd = await vhdRules(dev, hits, policy, sink)
    if (!vhd.valid) {
      for (const g of ['structure', 'content'] as const) sink.skip(g, 'the footer or dynamic header could not be parsed')
      return
    }
  } else if (format === 'vmdk') {
    vmdk = await vmdkRules(dev, hits, policy, sink)
    if (!vmdk.valid) {
      for (const g of ['structure', 'content'] as const) sink.skip(g, 'the sparse header or the descriptor could not be parsed')
      return
    }
  }
  const overLimit = facts?.overLimit === true || vhd?.overLimit === true || vmdk?.overLimit === true
  const references = facts?.hasReferences === true || vhd?.hasReferences === true || vmdk?.hasReferences === true || format === 'dmsnap'
  report.virtualSize = facts?.header ? facts.header.size : format === 'raw' ? dev.size : vmdk?.virtualSize

  // structure: the check engine of `imgtool check`, on the image alone (no backing, data or parent file)
  let imageEnd: number | undefined
  let dataBytes: number | undefined
  if (overLimit) sink.skip('structure', 'a table exceeds the limits')
  else if (vmdk?.structureSkip !== undefined) sink.skip('structure', vmdk.structureSkip)
  else {
    stage(ctx, 'structural check', ['identity', 'references', 'features'])
    const r = await structure(dev.name, lib, policy, sink, facts?.header?.incompatibleFeatures, ctx.signal)
    report.virtualSize ??= r?.virtualSize
    // the VMDK check reports no layout end (its leaked grains are notices): no FILE_SIZE_LAYOUT rule
    imageEnd = format === 'vmdk' ? undefined : r?.imageEnd
    // guest bytes the image stores (compressed or not): allocated guest clusters, as check counts them
    if (r?.allocatedClusters !== undefined && facts) dataBytes = r.allocatedClusters * facts.clusterSize
  }
  if (vhd?.subformat === 'fixed') vhdFileSize(dev.size, policy, sink)

  // sizes and content need the guest view: only when nothing outside the file is named and the metadata is sound
  const corrupt = sink.list.some((v) => v.code === 'CHECK_CORRUPTIONS' || v.code === 'CHECK_FAILED')
  const unreadable = references
    ? 'the guest bytes depend on a file validation does not open'
    : facts?.encrypted
      ? 'the guest data is encrypted'
      : corrupt
        ? 'the structure check found the metadata unsound'
        : undefined
  if (unreadable !== undefined || overLimit) {
    sink.skip('content', unreadable ?? 'a table exceeds the limits')
    if (policy.content.digest && unreadable !== undefined && !corrupt)
      sink.add('CONTENT_SKIPPED', `${unreadable}: no digest`, { structure: references ? 'reference' : 'header crypt_method' })
    if (report.virtualSize !== undefined) sizeRules(report.virtualSize, dataBytes, dev.size, imageEnd, policy, sink)
    return
  }
  let img: DiskImage
  try {
    img = await openOwned(dev.name, { format: lib, readOnly: true, options: {}, context: makeContext(refuseAll) })
  } catch (e) {
    if (!(e instanceof ImgtoolError)) throw e
    const at = typeof e.details.offset === 'number' ? e.details.offset : undefined
    sink.add('HEADER_INVALID', `cannot be opened: ${e.message}`, { structure: String(e.details.structure ?? 'header'), offset: at })
    sink.skip('content', 'the image cannot be opened')
    return
  }
  try {
    report.virtualSize = img.virtualSize
    // without a check (raw stores what it holds; structure.check off) the extents are counted
    stage(ctx, 'allocation count', ['identity', 'references', 'features', 'structure'])
    if (dataBytes === undefined && format !== 'raw') dataBytes = await guestDataBytes(img, ctx.signal)
    const bomb = sizeRules(img.virtualSize, dataBytes, dev.size, imageEnd, policy, sink)
    if (bomb) {
      sink.skip('content', 'the allocation ratio exceeds the limit: data not read')
      return
    }
    stage(ctx, 'content check', ['sizes'])
    await contentRules(img, policy, sink, report, ctx)
  } catch (e) {
    // metadata the reader refuses mid-read (the check was off, or missed it): reported, never thrown
    if (!(e instanceof ImgtoolError) || e.code !== 'CORRUPT') throw e
    const at = typeof e.details.offset === 'number' ? e.details.offset : undefined
    sink.add('CHECK_CORRUPTIONS', `guest data cannot be read: ${e.message}`, { structure: String(e.details.structure ?? 'metadata'), offset: at })
    sink.skip('content', 'the guest data cannot be read')
  } finally {
    await img.close()
  }
}

interface StructureFacts {
  virtualSize: number
  imageEnd?: number
  allocatedClusters?: number
}

/** Opens the image as `imgtool check` does (references not followed) and, unless the policy says not, runs its check. */
async function structure(
  file: string,
  format: FormatName,
  policy: Policy,
  sink: ViolationSink,
  incompat: bigint | undefined,
  signal: AbortSignal,
): Promise<StructureFacts | undefined> {
  if (format === 'raw') {
    sink.skip('structure', 'raw has no metadata to check')
    return undefined
  }
  let img: DiskImage
  try {
    img = await openOwned(file, { format, readOnly: true, forCheck: true, infoOnly: true, options: {}, context: makeContext(refuseAll) })
  } catch (e) {
    if (!(e instanceof ImgtoolError) || e instanceof AbortedError) throw e
    sink.add('CHECK_FAILED', `cannot be opened for check: ${e.message}`, { structure: 'image' })
    return undefined
  }
  const facts: StructureFacts = { virtualSize: img.virtualSize }
  try {
    if (!policy.structure.check) {
      sink.skip('structure', 'structure.check is off')
      return facts
    }
    if (!img.check) {
      sink.skip('structure', `${format} has no check`)
      return facts
    }
    const r = await img.check({ signal })
    if (r.checkErrors > 0) sink.add('CHECK_FAILED', `check could not complete: ${r.checkErrors} error(s)`, { structure: 'check' })
    if (r.corruptions > 0) {
      const first = r.findings.find((f) => f.severity === 'corruption')
      sink.add('CHECK_CORRUPTIONS', `${r.corruptions} corruption(s); first: ${first?.message ?? 'n/a'}`, {
        structure: first?.structure ?? 'metadata',
        offset: first?.hostOffset,
      })
    }
    const staleOk = policy.qcow2.dirty === 'stale-refcounts-expected' && incompat !== undefined && (incompat & 1n) !== 0n
    if (r.leaks > policy.structure.maxLeaks && !staleOk) {
      const first = r.findings.find((f) => f.severity === 'leak')
      sink.add('CHECK_LEAKS', `${r.leaks} leaked cluster(s), at most ${policy.structure.maxLeaks} allowed`, {
        structure: first?.structure ?? 'refcount',
        offset: first?.hostOffset,
      })
    }
    return { ...facts, imageEnd: Number(r.imageEndOffset), allocatedClusters: r.allocatedClusters }
  } catch (e) {
    // time ran out: the engine stopped at its next table (the caller reports it)
    if (!(e instanceof ImgtoolError) || e instanceof AbortedError) throw e
    sink.add('CHECK_FAILED', `check could not complete: ${e.message}`, { structure: 'check' })
    return facts
  } finally {
    await img.close()
  }
}

/** Azure's rule for a fixed VHD: the file is a whole number of alignment units plus the 512-byte footer. */
function vhdFileSize(fileSize: number, policy: Policy, sink: ViolationSink): void {
  const align = policy.vhd.fileSizeAlignment
  if (align <= 0) return
  const over = (fileSize - 512) % align
  if (fileSize < 512 || over !== 0) {
    sink.add('VHD_FILE_SIZE', `the file is ${fileSize} bytes, not a multiple of ${align} plus the 512-byte footer (${over} bytes over)`, {
      structure: 'file end',
      offset: fileSize - 512,
    })
  }
}

/** Returns true when the allocation ratio marks a decompression bomb (content is then not read). */
function sizeRules(
  virtualSize: number,
  dataBytes: number | undefined,
  fileSize: number,
  imageEnd: number | undefined,
  policy: Policy,
  sink: ViolationSink,
): boolean {
  const s = policy.sizes
  if (virtualSize < s.minVirtualSize || virtualSize > s.maxVirtualSize) {
    sink.add('VIRTUAL_SIZE_BOUNDS', `virtual size ${virtualSize} is outside ${s.minVirtualSize}..${s.maxVirtualSize}`, { structure: 'virtual size' })
  }
  if (s.virtualSizeAlignment > 0 && virtualSize % s.virtualSizeAlignment !== 0) {
    sink.add(
      'VIRTUAL_SIZE_ALIGNMENT',
      `virtual size ${virtualSize} is not a multiple of ${s.virtualSizeAlignment} (${virtualSize % s.virtualSizeAlignment} bytes over)`,
      {
        structure: 'virtual size',
      },
    )
  }
  if (s.targetVolumeSize > 0) {
    const needed = Math.ceil(virtualSize * (1 + s.targetOverheadPercent / 100))
    if (needed > s.targetVolumeSize) {
      sink.add(
        'TARGET_VOLUME',
        `virtual size ${virtualSize} plus ${s.targetOverheadPercent}% overhead (${needed}) does not fit the target volume of ${s.targetVolumeSize}`,
        {
          structure: 'virtual size',
        },
      )
    }
  }
  if (imageEnd !== undefined && fileSize > imageEnd + s.maxTrailingBytes) {
    sink.add('FILE_SIZE_LAYOUT', `the file is ${fileSize} bytes, its layout ends at ${imageEnd} (${fileSize - imageEnd} bytes beyond)`, {
      structure: 'file end',
      offset: imageEnd,
    })
  }
  if (dataBytes !== undefined && s.maxAllocationRatio > 0) {
    const ratio = dataBytes / Math.max(fileSize, 1)
    if (ratio > s.maxAllocationRatio) {
      sink.add('ALLOCATION_RATIO', `${dataBytes} guest data bytes from a ${fileSize}-byte file (ratio ${ratio.toFixed(1)}, limit ${s.maxAllocationRatio})`, {
        structure: 'allocation',
      })
      return true
    }
  }
  return false
}

async function contentRules(img: DiskImage, policy: Policy, sink: ViolationSink, report: ValidationReport, ctx: RunContext): Promise<void> {
  const c = policy.content
  // a guest that starts with an image format's magic would be probed as that format once written raw
  const guestHead = await img.read(0, Math.min(img.virtualSize, 8192))
  const nested = headSignatures(guestHead).filter((h) => h.offset === 0)
  if (!policy.identity.allowPolyglot) {
    for (const n of nested)
      sink.add('POLYGLOT', `guest data starts with a ${n.signature} header: written raw, it would be probed as ${n.signature}`, {
        structure: 'guest sector 0',
        offset: 0,
      })
  }
  if (c.partitions !== 'off') {
    const p = await partitionFacts(img)
    if (p.kind === 'none' && c.partitions === 'require')
      sink.add('NO_PARTITION_TABLE', 'the guest has no MBR or GPT', { structure: 'guest sector 0', offset: 0 })
    for (const problem of p.problems) sink.add('PARTITION_TABLE', problem.message, { structure: `guest ${problem.structure}`, offset: problem.offset })
  }
  if (!c.digest && c.expectDigest === undefined && c.reference === undefined) return
  ctx.stage = 'content digest'
  const budget = { maxDataBytes: policy.limits.maxDataBytes, signal: ctx.signal }
  try {
    report.digest = await guestDigest(img, budget)
  } catch (e) {
    // a DeadlineError (time ran out) goes up to validate(), which reports it with the stage
    if (e instanceof DataLimitError) sink.add('LIMIT_DATA_BYTES', e.message, { structure: 'guest data' })
    else throw e
    return
  }
  if (c.expectDigest !== undefined && c.expectDigest.toLowerCase() !== report.digest.hex) {
    sink.add('DIGEST_MISMATCH', `guest SHA-256 ${report.digest.hex}, expected ${c.expectDigest.toLowerCase()}`, { structure: 'guest data' })
  }
  if (c.reference !== undefined) {
    const ref = await openReference(c.reference)
    try {
      const other = await guestDigest(ref, budget)
      if (ref.virtualSize !== img.virtualSize || other.hex !== report.digest.hex) {
        sink.add('REFERENCE_MISMATCH', `guest bytes differ from reference ${c.reference} (sizes ${img.virtualSize}/${ref.virtualSize}, SHA-256 ${other.hex})`, {
          structure: 'guest data',
        })
      }
    } finally {
      await ref.close()
    }
  }
}

async function openReference(path: string): Promise<DiskImage> {
  const dev = await openFileDevice(path, { readOnly: true })
  const format = detectFormat(await fileSignatures(dev))
  const lib = LIBRARY_NAME[format]
  if (lib === undefined) {
    await dev.close()
    throw new WrongFormatError(`${path}: reference image format ${format} cannot be read`, { file: path })
  }
  try {
    return await openImageOnDevice(dev, { format: lib, readOnly: true, options: {}, context: makeContext(refuseAll) })
  } catch (e) {
    await dev.close().catch(() => undefined)
    throw e
  }
}

/** Opens `file` read-only as an image; the device is closed when the format refuses it (openImageOnDevice leaves it open). */
async function openOwned(file: string, options: Parameters<typeof openImageOnDevice>[1]): Promise<DiskImage> {
  const dev = await openFileDevice(file, { readOnly: true })
  try {
    return await openImageOnDevice(dev, options)
  } catch (e) {
    await dev.close().catch(() => undefined)
    throw e
  }
}
