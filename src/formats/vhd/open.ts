/**
 * Opening a VHD: find the footer (at 0 for dynamic and differencing disks,
 * in the last 512 bytes for fixed ones), check it, and for sparse disks read
 * the dynamic header and the BAT. Every refusal is one line naming the file,
 * the structure and its offset. Memory is bounded by the BAT, which must lie
 * inside the file and cover no more than the 2040 GiB a VHD can address.
 */
import { CorruptImageError, UnsupportedFeatureError, hex } from '../../errors.js'
import type { BlockDevice } from '../../io/block-device.js'
import { isPowerOfTwo, toSafeNumber } from '../../util/bytes.js'
import {
  BAT_UNUSED,
  FOOTER_CHECKSUM_AT,
  FOOTER_COOKIE,
  FOOTER_SIZE,
  HEADER_CHECKSUM_AT,
  HEADER_COOKIE,
  HEADER_SIZE,
  MAX_SECTORS,
  SECTOR,
  TYPE_DIFFERENCING,
  TYPE_DYNAMIC,
  TYPE_FIXED,
  bitmapSize,
  decodeFooter,
  decodeHeader,
  footerVirtualSize,
  vhdChecksum,
  type DynamicHeader,
  type Footer,
} from './spec.js'

/** BATs larger than this are refused (64 MiB: 16 M blocks; a 2040 GiB disk of 2 MiB blocks needs 4 MiB). */
export const MAX_BAT_BYTES = 64 * 1024 * 1024

/** Below this block size QEMU's bitmap size (none) and the specification's (one sector) differ: refused. */
export const MIN_BLOCK_SIZE = 4096

export interface SparseLayout {
  header: DynamicHeader
  headerOffset: number
  headerBytes: Uint8Array
  batOffset: number
  bat: Uint32Array
  blockSize: number
  bitmapSize: number
  /** where the next block goes: past the BAT and past every block (QEMU's free_data_block_offset) */
  nextFree: number
}

export interface VhdLayout {
  footer: Footer
  footerBytes: Uint8Array
  footerOffset: number
  virtualSize: number
  sparse?: SparseLayout
  /** problems a check-open let through (a normal open throws them) */
  problems: CorruptImageError[]
}

function corrupt(file: string, structure: string, offset: number, what: string): CorruptImageError {
  return new CorruptImageError(`vpc: ${file}: ${structure} at ${hex(offset)}: ${what}`, { file, structure, offset })
}

/** Damage qemu-img reads past: a read-only open reads on, a writable one is refused (`imgtool repair` fixes it). */
function writeRefused(e: CorruptImageError, fix: string): CorruptImageError {
  return new CorruptImageError(`${e.message}; not opened for writing (${fix})`, e.details)
}

export function footerCookieOk(b: Uint8Array): boolean {
  return b.byteLength >= 8 && String.fromCharCode(...b.subarray(0, 8)) === FOOTER_COOKIE
}

/** Read and check a VHD's metadata. With `lenient` (check), damage is collected instead of thrown where reading can go on. */
export async function readLayout(device: BlockDevice, lenient: boolean): Promise<VhdLayout> {
  const file = device.name
  const problems: CorruptImageError[] = []
  const fail = (e: CorruptImageError) => {
    if (!lenient) throw e
    problems.push(e)
  }
  if (device.size < FOOTER_SIZE) {
    throw corrupt(file, 'footer', 0, `the file (${device.size} bytes) is too small for a VHD footer (${FOOTER_SIZE} bytes)`)
  }
  let footerOffset = 0
  let footerBytes = await device.read(0, FOOTER_SIZE, 'header')
  let cut: CorruptImageError | undefined
  if (!footerCookieOk(footerBytes)) {
    // as QEMU: the file's length rounded up to whole sectors, the last sector's missing bytes read as zeros
    footerOffset = Math.ceil(device.size / SECTOR) * SECTOR - FOOTER_SIZE
    const held = device.size - footerOffset
    footerBytes = new Uint8Array(FOOTER_SIZE)
    footerBytes.set(await device.read(footerOffset, held, 'header'))
    if (!footerCookieOk(footerBytes)) throw corrupt(file, 'footer', footerOffset, `no '${FOOTER_COOKIE}' cookie at the start or in the last 512 bytes`)
    if (held < FOOTER_SIZE) {
      cut = corrupt(file, 'footer', footerOffset, `the file is cut short ${FOOTER_SIZE - held} bytes into the footer (read as zeros, as QEMU reads them)`)
    }
  }
  const footer = decodeFooter(footerBytes)
  if (cut) {
    if (lenient) problems.push(cut)
    else if (!device.readOnly) throw writeRefused(cut, 'the footer is not whole in the file')
  }
  const sum = vhdChecksum(footerBytes, FOOTER_CHECKSUM_AT)
  if (sum !== footer.checksum) fail(corrupt(file, 'footer', footerOffset, `checksum ${hex(footer.checksum)} does not match the footer (expected ${hex(sum)})`))
  const fixed = footerOffset !== 0
  if (fixed && footer.diskType !== TYPE_FIXED) {
    throw corrupt(file, 'footer', footerOffset, `disk type ${footer.diskType} in a footer found only at the end (a fixed disk has type ${TYPE_FIXED})`)
  }
  if (!fixed && footer.diskType === TYPE_FIXED) {
    // QEMU 7.2 reads such a file 1:1 from offset 0, its own footer and metadata as guest bytes: a guess imgtool does not make
    throw corrupt(file, 'footer', 0, `disk type ${TYPE_FIXED} (fixed) at the start of the file, where a fixed disk has no footer`)
  }
  if (!fixed && footer.diskType !== TYPE_DYNAMIC && footer.diskType !== TYPE_DIFFERENCING) {
    // QEMU 7.2 reads any other type in a footer at 0 as a dynamic disk (its header and BAT decide), and so does a
    // read-only open here; check names the type, and a writable open is refused: the type is not what the disk says it is
    const e = corrupt(
      file,
      'footer',
      0,
      `disk type ${footer.diskType} at the start of the file (expected ${TYPE_DYNAMIC} dynamic or ${TYPE_DIFFERENCING} differencing; read as dynamic)`,
    )
    if (lenient) problems.push(e)
    else if (!device.readOnly) throw writeRefused(e, 'imgtool repair -r all restores the footer from a sound copy at the end')
  }
  const virtualSize = footerVirtualSize(footer, file, footerOffset)
  const layout: VhdLayout = { footer, footerBytes, footerOffset, virtualSize, problems }
  if (!fixed) layout.sparse = await readSparse(device, footer, virtualSize, lenient, fail)
  return layout
}

async function readSparse(
  device: BlockDevice,
  footer: Footer,
  virtualSize: number,
  lenient: boolean,
  fail: (e: CorruptImageError) => void,
): Promise<SparseLayout> {
  const file = device.name
  const headerOffset = toSafeNumber(footer.dataOffset, `vpc: ${file}: footer data offset`)
  if (headerOffset + HEADER_SIZE > device.size) {
    throw corrupt(file, 'dynamic header', headerOffset, `the header (${HEADER_SIZE} bytes) extends past the end of the file (size ${hex(device.size)})`)
  }
  const headerBytes = await device.read(headerOffset, HEADER_SIZE, 'header')
  const header = decodeHeader(headerBytes)
  if (header.cookie !== HEADER_COOKIE) throw corrupt(file, 'dynamic header', headerOffset, `no '${HEADER_COOKIE}' cookie`)
  const hsum = vhdChecksum(headerBytes, HEADER_CHECKSUM_AT)
  if (hsum !== header.checksum) {
    // QEMU 7.2 does not check this checksum and reads the disk: so does a read-only open; check names it, repair rewrites it
    const e = corrupt(file, 'dynamic header', headerOffset, `checksum ${hex(header.checksum)} does not match the header (expected ${hex(hsum)})`)
    if (lenient) fail(e)
    else if (!device.readOnly) throw writeRefused(e, 'imgtool repair -r all rewrites the checksum')
  }
  const blockSize = header.blockSize
  if (!isPowerOfTwo(blockSize) || blockSize < SECTOR)
    throw corrupt(file, 'dynamic header', headerOffset + 32, `invalid block size ${blockSize} (a power of two, at least 512)`)
  if (blockSize < MIN_BLOCK_SIZE) {
    // QEMU sizes a block's bitmap as (block size / 4096) rounded up to 512 bytes: none at all below 4 KiB, where
    // the specification keeps one sector. The two read different bytes, so imgtool reads neither.
    throw new UnsupportedFeatureError(
      `vpc: ${file}: dynamic header at ${hex(headerOffset)}: block size ${blockSize} (at ${hex(headerOffset + 32)}) is below ${MIN_BLOCK_SIZE}, where QEMU and the VHD specification disagree on the sector bitmap's size`,
      { file, structure: 'dynamic header', offset: headerOffset + 32 },
    )
  }
  const entries = header.maxTableEntries
  if (entries * blockSize < virtualSize) {
    fail(corrupt(file, 'BAT', headerOffset + 28, `${entries} entries of ${blockSize} bytes cover less than the virtual size ${virtualSize}`))
  }
  if (entries > Math.ceil((MAX_SECTORS * SECTOR) / blockSize) || entries * 4 > MAX_BAT_BYTES) {
    throw corrupt(
      file,
      'BAT',
      headerOffset + 28,
      `${entries} entries is more than a VHD can address (2040 GiB) or imgtool reads (${MAX_BAT_BYTES} bytes of BAT)`,
    )
  }
  const batOffset = toSafeNumber(header.tableOffset, `vpc: ${file}: BAT offset`)
  const batBytes = entries * 4
  if (batOffset + batBytes > device.size) {
    fail(corrupt(file, 'BAT', batOffset, `the table of ${entries} entries (${batBytes} bytes) extends past the end of the file (size ${hex(device.size)})`))
  }
  // (a check reads what the file holds, so memory is bounded by the file; the rest of the table counts as unused)
  const held = Math.max(0, Math.min(entries, Math.floor((device.size - batOffset) / 4)))
  const raw = held > 0 ? await device.read(batOffset, held * 4, 'bat') : new Uint8Array(0)
  const dv = new DataView(raw.buffer, raw.byteOffset, raw.byteLength)
  const bat = new Uint32Array(held)
  const bmp = bitmapSize(blockSize)
  let nextFree = Math.ceil((batOffset + batBytes) / SECTOR) * SECTOR
  for (let i = 0; i < held; i++) {
    const v = dv.getUint32(i * 4, false)
    bat[i] = v
    if (v === BAT_UNUSED) continue
    const end = v * SECTOR + bmp + blockSize
    if (end > nextFree) nextFree = end
  }
  if (nextFree > device.size) {
    // the file was cut short: QEMU refuses the image too ("free_data_block_offset points after the end of file")
    let worst = 0
    for (let i = 0; i < held; i++) if (bat[i] !== BAT_UNUSED && bat[i]! * SECTOR + bmp + blockSize > device.size) worst = i
    fail(
      corrupt(
        file,
        'BAT',
        batOffset + worst * 4,
        `entry ${worst} maps a block at ${hex(bat[worst]! * SECTOR)} that ends at ${hex(bat[worst]! * SECTOR + bmp + blockSize)}, past the end of the file (size ${hex(device.size)}): the image was truncated`,
      ),
    )
  }
  if (footer.diskType === TYPE_DIFFERENCING && blockSize > 64 * 1024 * 1024) {
    throw new UnsupportedFeatureError(`vpc: ${file}: differencing disk with ${blockSize}-byte blocks (imgtool reads up to 64 MiB blocks)`, {
      file,
      structure: 'dynamic header',
      offset: headerOffset + 32,
    })
  }
  return { header, headerOffset, headerBytes, batOffset, bat, blockSize, bitmapSize: bmp, nextFree }
}
