/**
 * Opening a qcow2 image's parts the header points at: the active L1 table,
 * the external data file and the backing image. The façade's openQcow2
 * (image.ts) calls these in order and builds the state from what they return.
 */
import { CorruptImageError, UnsupportedFeatureError, hex, isImgtoolError } from '../../../errors.js'
import type { BlockDevice } from '../../../io/block-device.js'
import type { OpenContext, OpenImageOptions } from '../../../image/context.js'
import type { DiskImage } from '../../../image/disk-image.js'
import { isFormatName } from '../../../image/probe.js'
import { escapeControls } from '../../../util/text.js'
import { EXT_BACKING_FORMAT, EXT_DATA_FILE } from '../spec/constants.js'
import type { Qcow2Header } from '../spec/header.js'
import { combinePath, protocolPrefix } from '../spec/paths.js'

/**
 * The active L1 table's bytes (l1Size * 8). Tables past the end of the file
 * read as zeros, as QEMU reads them (qemu-img info and convert open such
 * images); imgtool only refuses to write to them (`writing`).
 */
export async function readActiveL1(device: BlockDevice, header: Qcow2Header, writing: boolean): Promise<Uint8Array> {
  const file = device.name
  const eofLimit = Math.ceil(device.size / header.clusterSize) * header.clusterSize
  const l1Bytes = header.l1Size * 8
  if (writing && l1Bytes > 0 && header.l1TableOffset + l1Bytes > eofLimit) {
    throw new CorruptImageError(
      `qcow2: ${file}: L1 table of ${header.l1Size} entries extends beyond the end of the file (size ${hex(device.size)}); not opened for writing (L1 table at ${hex(header.l1TableOffset)})`,
      { file, structure: 'l1', offset: header.l1TableOffset },
    )
  }
  if (writing && header.refcountTableOffset + header.refcountTableClusters * header.clusterSize > eofLimit) {
    throw new CorruptImageError(
      `qcow2: ${file}: refcount table of ${header.refcountTableClusters} clusters extends beyond the end of the file (size ${hex(device.size)}); not opened for writing (refcount table at ${hex(header.refcountTableOffset)})`,
      { file, structure: 'reftable', offset: header.refcountTableOffset },
    )
  }
  // read what the file holds; the rest of the table reads as zeros (no read past the end)
  const l1InFile = Math.max(0, Math.min(l1Bytes, device.size - header.l1TableOffset))
  const l1 = l1InFile > 0 ? await device.read(header.l1TableOffset, l1InFile, 'l1') : new Uint8Array(0)
  if (l1InFile === l1Bytes) return l1
  const full = new Uint8Array(l1Bytes)
  full.set(l1)
  return full
}

/** The external data file the header names, opened as the image is (read-only or read/write). */
export async function openDataFile(device: BlockDevice, header: Qcow2Header, context: OpenContext): Promise<BlockDevice> {
  const file = device.name
  const ext = header.extensions.find((x) => x.magic === EXT_DATA_FILE)
  const fieldOffset = (ext?.offset ?? 0) + 8
  const path = relatedPath(file, 'data file', header.dataFile!, header.dataFileError, fieldOffset)
  try {
    return await context.openDevice(path, { readOnly: device.readOnly })
  } catch (e) {
    throw relatedFileError(e, file, 'data file', header.dataFile!, path, fieldOffset)
  }
}

/** The backing image the header names, opened read-only one level deeper in the chain. */
export async function openBacking(file: string, header: Qcow2Header, context: OpenContext, options: OpenImageOptions): Promise<DiskImage> {
  const backingFile = header.backingFile!
  const path = relatedPath(file, 'backing file', backingFile, header.backingFileError, header.backingFileOffset)
  const fmt = header.backingFormat
  if (fmt !== undefined && !isFormatName(fmt)) {
    // qemu-img opens the backing file with the driver the header names, and fails on a name it has no
    // driver for; probing instead would read the file as something the image did not say it is
    const ext = header.extensions.find((x) => x.magic === EXT_BACKING_FORMAT)
    const at = (ext?.offset ?? 0) + 8
    throw new UnsupportedFeatureError(
      `qcow2: ${file}: backing file ${escapeControls(backingFile)}: Unknown driver '${escapeControls(fmt)}' (backing format at ${hex(at)})`,
      { file, structure: 'backing format', offset: at },
    )
  }
  try {
    return await context.openImage(path, {
      format: fmt,
      readOnly: true,
      depth: (options.depth ?? 0) + 1,
      chain: options.chain ?? [],
    })
  } catch (e) {
    throw relatedFileError(e, file, 'backing file', backingFile, path, header.backingFileOffset)
  }
}

/**
 * The path a backing or data file name opens: relative names are taken
 * relative to the image's directory. Names QEMU would hand to a protocol
 * driver (`json:`, `file:`, `nbd:`, the `x` of `x:y`) and names that are not
 * UTF-8 are refused, never opened relative to the current directory.
 */
function relatedPath(file: string, what: string, name: string, nameError: string | undefined, fieldOffset: number): string {
  const refuse = (why: string): never => {
    throw new UnsupportedFeatureError(`qcow2: ${file}: ${why} (${what} name at ${hex(fieldOffset)})`, {
      file,
      structure: `${what} name`,
      offset: fieldOffset,
    })
  }
  if (nameError !== undefined) refuse(nameError)
  const protocol = protocolPrefix(name)
  if (protocol !== undefined) {
    refuse(`${what} ${escapeControls(name)} names the protocol '${escapeControls(protocol)}:'; imgtool opens only plain file names`)
  }
  return combinePath(file, name)
}

/**
 * A backing or data file that cannot be opened (missing, or a backing chain
 * that loops or is too deep) is a fact about this image: name it and the
 * header field that points at the other file. Errors from inside a backing
 * image that did open already name that image, and pass through.
 */
function relatedFileError(e: unknown, file: string, what: string, name: string, path: string, fieldOffset: number): unknown {
  if (!isImgtoolError(e) || !(e.code === 'NOT_FOUND' || e.details.structure === 'backing chain')) return e
  const prefix = `${path}: `
  const why = e.message.startsWith(prefix) ? e.message.slice(prefix.length) : e.message
  return new CorruptImageError(`qcow2: ${file}: ${what} ${escapeControls(name)}: ${why} (${what} name at ${hex(fieldOffset)})`, {
    file,
    structure: `${what} name`,
    offset: fieldOffset,
  })
}
