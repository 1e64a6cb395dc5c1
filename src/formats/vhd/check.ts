/**
 * Check a VHD (qemu-img has no check for vpc). A diff of what the metadata
 * implies against what the file holds:
 *
 *  - footer cookie and checksum; for sparse disks the footer copy that ends
 *    the file equals the footer at 0; the dynamic header's checksum;
 *  - the BAT inside the file and sector-aligned, covering the virtual size;
 *  - every mapped block (its sector bitmap, then its data) inside the file,
 *    before the footer copy, clear of the footer, header, BAT and parent
 *    locator data, and clear of every other block;
 *  - leaks: bytes between the last block and the footer copy that no BAT
 *    entry reaches (a block allocated by an interrupted write).
 *
 * Leak or corruption is the first fact of each finding, as for qcow2.
 */
import { CorruptImageError, hex } from '../../errors.js'
import type { BlockDevice } from '../../io/block-device.js'
import { emptyReport, type CheckReport, type Finding } from '../../check/types.js'
import { footerCookieOk, readLayout, type SparseLayout, type VhdLayout } from './open.js'
import { BAT_UNUSED, FOOTER_SIZE, HEADER_SIZE, SECTOR } from './spec.js'

function corruption(structure: string, kind: string, message: string, hostOffset?: number): Finding {
  return { kind, severity: 'corruption', structure, message, ...(hostOffset !== undefined ? { hostOffset } : {}) }
}

/** The counts from the findings. */
export function finish(report: CheckReport): CheckReport {
  report.corruptions = report.findings.filter((f) => f.severity === 'corruption').length
  report.leaks = report.findings.filter((f) => f.severity === 'leak').reduce((n, f) => n + (f.cluster ?? 1), 0)
  return report
}

export async function checkVhd(device: BlockDevice): Promise<CheckReport> {
  const report = emptyReport(device.name, 'vpc')
  report.imageEndOffset = device.size
  let layout: VhdLayout
  try {
    layout = await readLayout(device, true)
  } catch (e) {
    // a structure the rest hangs on (footer, header, BAT size) cannot be read: one finding, nothing further
    if (!(e instanceof CorruptImageError)) throw e
    const off = typeof e.details.offset === 'number' ? e.details.offset : undefined
    report.findings.push(corruption(String(e.details.structure ?? 'footer'), 'unreadable-metadata', e.message, off))
    return finish(report)
  }
  for (const p of layout.problems) {
    const off = typeof p.details.offset === 'number' ? p.details.offset : undefined
    const structure = String(p.details.structure ?? 'footer')
    const kind = /disk type/.test(p.message)
      ? 'footer-disk-type'
      : /cut short/.test(p.message)
        ? 'footer-cut'
        : /checksum/.test(p.message)
          ? `${structure.replace(/ /g, '-')}-checksum`
          : /truncated/.test(p.message)
            ? 'block-past-eof'
            : 'bat-range'
    report.findings.push(corruption(structure, kind, p.message, off))
  }
  if (!layout.sparse) {
    checkFixed(device, layout, report)
    return finish(report)
  }
  await checkFooterCopy(device, layout, report)
  checkBlocks(device, layout, layout.sparse, report)
  return finish(report)
}

function checkFixed(device: BlockDevice, layout: VhdLayout, report: CheckReport): void {
  const file = device.name
  report.totalClusters = 0
  if (layout.virtualSize > layout.footerOffset) {
    report.findings.push(
      corruption(
        'footer',
        'size-past-footer',
        `vpc: ${file}: the virtual size ${layout.virtualSize} reaches past the data area, into the footer at ${hex(layout.footerOffset)}`,
        layout.footerOffset,
      ),
    )
  }
}

async function checkFooterCopy(device: BlockDevice, layout: VhdLayout, report: CheckReport): Promise<void> {
  const file = device.name
  const at = device.size - FOOTER_SIZE
  if (at <= 0) {
    report.findings.push(corruption('footer copy', 'footer-copy-missing', `vpc: ${file}: no room for a footer copy after the footer at 0`, 0))
    return
  }
  const copy = await device.read(at, FOOTER_SIZE, 'footer')
  if (!footerCookieOk(copy)) {
    report.findings.push(
      corruption('footer copy', 'footer-copy-missing', `vpc: ${file}: the last 512 bytes (at ${hex(at)}) are not a footer copy (no 'conectix' cookie)`, at),
    )
    return
  }
  const same = copy.every((b, i) => b === layout.footerBytes[i])
  if (!same) {
    report.findings.push(corruption('footer copy', 'footer-copy-differs', `vpc: ${file}: the footer copy at ${hex(at)} differs from the footer at 0`, at))
  }
}

interface Span {
  start: number
  end: number
  what: string
}

/** The footer, header, BAT and parent locator data of a sparse disk, as byte ranges. */
export function metadataSpans(device: BlockDevice, s: SparseLayout): Span[] {
  const spans: Span[] = [
    { start: 0, end: FOOTER_SIZE, what: 'the footer' },
    { start: s.headerOffset, end: s.headerOffset + HEADER_SIZE, what: 'the dynamic header' },
    { start: s.batOffset, end: s.batOffset + s.header.maxTableEntries * 4, what: 'the BAT' },
  ]
  for (const [i, l] of s.header.locators.entries()) {
    if (l.platform === '\0\0\0\0' || l.dataLength === 0 || l.dataOffset >= BigInt(device.size)) continue
    const start = Number(l.dataOffset)
    spans.push({ start, end: start + Math.max(l.dataLength, l.dataSpace < 0x10000 ? l.dataSpace * SECTOR : l.dataSpace), what: `parent locator ${i}` })
  }
  return spans
}

/**
 * Where the bytes the metadata reaches end (sector-aligned): past every
 * mapped block, the BAT, the header and the parent locator data. The footer
 * copy belongs here; anything between this and the footer copy is leaked.
 */
export function reachedEnd(device: BlockDevice, s: SparseLayout): number {
  return Math.max(s.nextFree, ...metadataSpans(device, s).map((m) => Math.ceil(m.end / SECTOR) * SECTOR))
}

function checkBlocks(device: BlockDevice, layout: VhdLayout, s: SparseLayout, report: CheckReport): void {
  const file = device.name
  const needed = Math.ceil(layout.virtualSize / s.blockSize)
  if (s.batOffset % SECTOR !== 0) {
    report.findings.push(corruption('BAT', 'bat-unaligned', `vpc: ${file}: the BAT at ${hex(s.batOffset)} is not aligned to 512 bytes`, s.batOffset))
  }
  report.totalClusters = needed
  const metadata = metadataSpans(device, s)
  const footerCopyAt = device.size - FOOTER_SIZE
  const blocks: Array<Span & { index: number }> = []
  let lastEnd = -1
  for (let i = 0; i < s.bat.length; i++) {
    const v = s.bat[i]!
    if (v === BAT_UNUSED) continue
    const start = v * SECTOR
    const end = start + s.bitmapSize + s.blockSize
    const entryAt = s.batOffset + i * 4
    if (i >= needed) {
      report.findings.push(
        corruption(
          'BAT',
          'entry-past-virtual-size',
          `vpc: ${file}: BAT entry ${i} (at ${hex(entryAt)}) maps a block past the virtual size ${layout.virtualSize}`,
          entryAt,
        ),
      )
    }
    report.allocatedClusters++
    if (lastEnd >= 0 && start !== lastEnd) report.fragmentedClusters++
    lastEnd = end
    if (end > footerCopyAt && end <= device.size) {
      report.findings.push(
        corruption(
          'BAT',
          'block-over-footer',
          `vpc: ${file}: block ${i} at ${hex(start)} (BAT entry at ${hex(entryAt)}) runs into the footer copy at ${hex(footerCopyAt)}`,
          entryAt,
        ),
      )
    }
    for (const m of metadata) {
      if (start < m.end && m.start < end) {
        report.findings.push(
          corruption(
            'BAT',
            'block-over-metadata',
            `vpc: ${file}: block ${i} at ${hex(start)} (BAT entry at ${hex(entryAt)}) overlaps ${m.what} at ${hex(m.start)}`,
            entryAt,
          ),
        )
      }
    }
    blocks.push({ start, end, what: `block ${i}`, index: i })
  }
  blocks.sort((a, b) => a.start - b.start)
  for (let k = 1; k < blocks.length; k++) {
    const a = blocks[k - 1]!
    const b = blocks[k]!
    if (b.start < a.end) {
      const entryAt = s.batOffset + b.index * 4
      report.findings.push(
        corruption(
          'BAT',
          'block-overlap',
          `vpc: ${file}: block ${b.index} at ${hex(b.start)} (BAT entry at ${hex(entryAt)}) overlaps block ${a.index} at ${hex(a.start)}`,
          entryAt,
        ),
      )
    }
  }
  // leaks: what lies between the last thing the metadata reaches and the footer copy
  const reached = reachedEnd(device, s)
  if (footerCopyAt > reached && !report.findings.some((f) => f.kind === 'footer-copy-missing')) {
    const bytes = footerCopyAt - reached
    const unit = s.bitmapSize + s.blockSize
    report.findings.push({
      kind: 'leaked-space',
      severity: 'leak',
      structure: 'data',
      hostOffset: reached,
      cluster: Math.ceil(bytes / unit),
      message: `vpc: ${file}: ${bytes} bytes at ${hex(reached)} (before the footer copy at ${hex(footerCopyAt)}) are reached by no BAT entry`,
    })
  }
}
