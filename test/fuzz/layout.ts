/**
 * Where the metadata is, read tolerantly from a seed's bytes, so mutations can
 * aim at structures: qcow2 header fields, extensions, L1/L2 entries,
 * refcount table and block entries, the snapshot table, the bitmap directory
 * and bitmap tables; dm-snapshot header and exception records; VHD footers,
 * dynamic header, BAT and block bitmaps; VMDK sparse header (and the stream
 * footer's copy), descriptor, grain directories, grain tables and markers.
 *
 * A Field is a span of the file with a name and a width; the mutator bends it.
 */

export interface Field {
  /** e.g. "header.l1_size", "l2[0x30000][5]", "snap[1].l1_size" */
  name: string
  offset: number
  /** bytes: 1, 2, 4 or 8 (integers, big-endian for qcow2 and VHD, little-endian for dm-snapshot and VMDK) */
  width: 1 | 2 | 4 | 8
  le?: boolean
  /** what kind of value lives here: steers the interesting values */
  kind: 'size' | 'offset' | 'count' | 'bits' | 'flags' | 'entry' | 'refcount' | 'magic' | 'misc'
}

export interface Layout {
  format: 'qcow2' | 'dmsnap' | 'vpc' | 'vmdk'
  fileSize: number
  clusterSize: number
  fields: Field[]
  /** whole metadata regions (for bit flips aimed at metadata) */
  regions: Array<{ name: string; offset: number; length: number }>
}

function u64(b: Uint8Array, o: number): number {
  if (!Number.isSafeInteger(o) || o < 0 || o + 8 > b.length) return 0
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength)
  return Number(dv.getBigUint64(o))
}
function u32(b: Uint8Array, o: number): number {
  if (!Number.isSafeInteger(o) || o < 0 || o + 4 > b.length) return 0
  return new DataView(b.buffer, b.byteOffset, b.byteLength).getUint32(o)
}
function u16(b: Uint8Array, o: number): number {
  if (!Number.isSafeInteger(o) || o < 0 || o + 2 > b.length) return 0
  return new DataView(b.buffer, b.byteOffset, b.byteLength).getUint16(o)
}

const pad8 = (n: number): number => Math.ceil(n / 8) * 8

/** bits 9..55 of an entry (L1/L2/refcount-table offset field), by arithmetic: JS bit operators are 32-bit */
function entryOffset(b: Uint8Array, o: number): number {
  if (!Number.isSafeInteger(o) || o < 0 || o + 8 > b.length) return 0
  const v = new DataView(b.buffer, b.byteOffset, b.byteLength).getBigUint64(o)
  return Number(v & 0x00ff_ffff_ffff_fe00n)
}

export function qcow2Layout(b: Uint8Array): Layout {
  const fields: Field[] = []
  const regions: Layout['regions'] = []
  const h = (name: string, offset: number, width: Field['width'], kind: Field['kind']): void => {
    fields.push({ name: `header.${name}`, offset, width, kind })
  }
  h('magic', 0, 4, 'magic')
  h('version', 4, 4, 'count')
  h('backing_file_offset', 8, 8, 'offset')
  h('backing_file_size', 16, 4, 'size')
  h('cluster_bits', 20, 4, 'bits')
  h('size', 24, 8, 'size')
  h('crypt_method', 32, 4, 'count')
  h('l1_size', 36, 4, 'count')
  h('l1_table_offset', 40, 8, 'offset')
  h('refcount_table_offset', 48, 8, 'offset')
  h('refcount_table_clusters', 56, 4, 'count')
  h('nb_snapshots', 60, 4, 'count')
  h('snapshots_offset', 64, 8, 'offset')
  const version = u32(b, 4)
  const clusterBits = u32(b, 20)
  const cs = clusterBits >= 9 && clusterBits <= 21 ? 2 ** clusterBits : 65536
  let headerLength = 72
  let refcountOrder = 4
  let extendedL2 = false
  if (version >= 3) {
    h('incompatible_features', 72, 8, 'flags')
    h('compatible_features', 80, 8, 'flags')
    h('autoclear_features', 88, 8, 'flags')
    h('refcount_order', 96, 4, 'bits')
    h('header_length', 100, 4, 'size')
    headerLength = u32(b, 100)
    refcountOrder = u32(b, 96)
    extendedL2 = (u32(b, 76) & 16) !== 0
    if (headerLength > 104) h('compression_type', 104, 1, 'count')
  }
  regions.push({ name: 'header', offset: 0, length: Math.min(cs, b.length) })
  // header extensions
  let eo = version >= 3 ? headerLength : 72
  let bitmapDir: { off: number; size: number; nb: number } | undefined
  for (let i = 0; i < 16 && eo + 8 <= Math.min(cs, b.length); i++) {
    const type = u32(b, eo)
    const len = u32(b, eo + 4)
    fields.push({ name: `ext[${i}].type`, offset: eo, width: 4, kind: 'magic' })
    fields.push({ name: `ext[${i}].length`, offset: eo + 4, width: 4, kind: 'size' })
    if (type === 0) break
    if (type === 0x23852875 && len >= 24) {
      fields.push({ name: 'bitmapext.nb_bitmaps', offset: eo + 8, width: 4, kind: 'count' })
      fields.push({ name: 'bitmapext.directory_size', offset: eo + 16, width: 8, kind: 'size' })
      fields.push({ name: 'bitmapext.directory_offset', offset: eo + 24, width: 8, kind: 'offset' })
      bitmapDir = { nb: u32(b, eo + 8), size: u64(b, eo + 16), off: u64(b, eo + 24) }
    }
    if (type === 0xe2792aca || type === 0x44415441) {
      // backing format / data file name: the name bytes
      if (len > 0) fields.push({ name: `ext[${i}].name0`, offset: eo + 8, width: 1, kind: 'misc' })
    }
    eo += 8 + pad8(len)
  }
  const backingOff = u64(b, 8)
  const backingLen = u32(b, 16)
  if (backingOff > 0 && backingOff + backingLen <= b.length && backingLen > 0) {
    fields.push({ name: 'backing_name.byte0', offset: backingOff, width: 1, kind: 'misc' })
    fields.push({ name: 'backing_name.last', offset: backingOff + backingLen - 1, width: 1, kind: 'misc' })
  }
  const entryName = (t: string, base: number, i: number): string => `${t}[0x${base.toString(16)}][${i}]`
  // L1 and L2 tables (active and snapshots)
  const l2Seen = new Set<number>()
  const l2Size = cs / (extendedL2 ? 16 : 8)
  const addL1 = (tag: string, off: number, n: number): void => {
    if (off <= 0 || off % 8 || off >= b.length || n <= 0 || n > 1 << 16) return
    regions.push({ name: tag, offset: off, length: Math.min(n * 8, b.length - off) })
    for (let i = 0; i < n && off + 8 * i + 8 <= b.length; i++) {
      fields.push({ name: entryName(tag, off, i), offset: off + 8 * i, width: 8, kind: 'entry' })
      const l2 = entryOffset(b, off + 8 * i)
      if (l2 && l2 % cs === 0 && l2 + cs <= b.length && !l2Seen.has(l2)) {
        l2Seen.add(l2)
        regions.push({ name: 'l2', offset: l2, length: cs })
        for (let j = 0; j < l2Size; j++) {
          const eoff = l2 + j * (extendedL2 ? 16 : 8)
          if (u64(b, eoff) !== 0 || j % 7 === 0) fields.push({ name: entryName('l2', l2, j), offset: eoff, width: 8, kind: 'entry' })
          if (extendedL2 && u64(b, eoff + 8) !== 0) fields.push({ name: entryName('l2bitmap', l2, j), offset: eoff + 8, width: 8, kind: 'flags' })
        }
      }
    }
  }
  addL1('l1', u64(b, 40), u32(b, 36))
  // snapshot table
  const nbSnap = u32(b, 60)
  let so = u64(b, 64)
  for (let i = 0; i < Math.min(nbSnap, 64) && so > 0 && so + 40 <= b.length; i++) {
    const p = `snap[${i}]`
    fields.push({ name: `${p}.l1_table_offset`, offset: so, width: 8, kind: 'offset' })
    fields.push({ name: `${p}.l1_size`, offset: so + 8, width: 4, kind: 'count' })
    fields.push({ name: `${p}.id_str_size`, offset: so + 12, width: 2, kind: 'size' })
    fields.push({ name: `${p}.name_size`, offset: so + 14, width: 2, kind: 'size' })
    fields.push({ name: `${p}.vm_state_size`, offset: so + 32, width: 4, kind: 'size' })
    fields.push({ name: `${p}.extra_data_size`, offset: so + 36, width: 4, kind: 'size' })
    const extra = u32(b, so + 36)
    if (extra >= 8) fields.push({ name: `${p}.vm_state_size_large`, offset: so + 40, width: 8, kind: 'size' })
    if (extra >= 16) fields.push({ name: `${p}.disk_size`, offset: so + 48, width: 8, kind: 'size' })
    if (extra >= 24) fields.push({ name: `${p}.icount`, offset: so + 56, width: 8, kind: 'misc' })
    regions.push({ name: p, offset: so, length: 40 + extra + u16(b, so + 12) + u16(b, so + 14) })
    addL1(`snapl1`, u64(b, so), u32(b, so + 8))
    so += pad8(40 + extra + u16(b, so + 12) + u16(b, so + 14))
  }
  // refcount table and blocks
  const rto = u64(b, 48)
  const rtc = u32(b, 56)
  if (rto > 0 && rto % 8 === 0 && rto < b.length && rtc > 0 && rtc < 1 << 12) {
    regions.push({ name: 'reftable', offset: rto, length: Math.min(rtc * cs, b.length - rto) })
    const n = (rtc * cs) / 8
    for (let i = 0; i < n && rto + 8 * i + 8 <= b.length; i++) {
      const e = u64(b, rto + 8 * i)
      if (e === 0 && i > 2) continue
      fields.push({ name: entryName('reftable', rto, i), offset: rto + 8 * i, width: 8, kind: 'entry' })
      const rb = entryOffset(b, rto + 8 * i)
      if (rb > 0 && rb % cs === 0 && rb + cs <= b.length) {
        regions.push({ name: 'refblock', offset: rb, length: cs })
        const bits = 2 ** (refcountOrder <= 6 ? refcountOrder : 4)
        if (bits >= 8) {
          const w = bits / 8
          for (let j = 0; j < Math.min(cs / w, 64); j++)
            fields.push({ name: entryName('refblock', rb, j), offset: rb + j * w, width: w as Field['width'], kind: 'refcount' })
        } else {
          for (let j = 0; j < 16; j++) fields.push({ name: entryName('refblock', rb, j), offset: rb + j, width: 1, kind: 'refcount' })
        }
      }
    }
  }
  // bitmap directory and bitmap tables
  if (bitmapDir && bitmapDir.off > 0 && bitmapDir.off < b.length) {
    regions.push({ name: 'bitmapdir', offset: bitmapDir.off, length: Math.min(bitmapDir.size, b.length - bitmapDir.off) })
    let d = bitmapDir.off
    for (let i = 0; i < Math.min(bitmapDir.nb, 16) && d + 24 <= b.length; i++) {
      const p = `bitmap[${i}]`
      fields.push({ name: `${p}.table_offset`, offset: d, width: 8, kind: 'offset' })
      fields.push({ name: `${p}.table_size`, offset: d + 8, width: 4, kind: 'count' })
      fields.push({ name: `${p}.flags`, offset: d + 12, width: 4, kind: 'flags' })
      fields.push({ name: `${p}.type`, offset: d + 16, width: 1, kind: 'count' })
      fields.push({ name: `${p}.granularity_bits`, offset: d + 17, width: 1, kind: 'bits' })
      fields.push({ name: `${p}.name_size`, offset: d + 18, width: 2, kind: 'size' })
      fields.push({ name: `${p}.extra_data_size`, offset: d + 20, width: 4, kind: 'size' })
      const to = u64(b, d)
      const ts = u32(b, d + 8)
      if (to > 0 && to + 8 <= b.length) {
        regions.push({ name: `${p}.table`, offset: to, length: Math.min(ts * 8, b.length - to) })
        for (let j = 0; j < Math.min(ts, 8); j++) fields.push({ name: `${p}.table[${j}]`, offset: to + 8 * j, width: 8, kind: 'entry' })
      }
      d += pad8(24 + u16(b, d + 18) + u32(b, d + 20))
    }
  }
  return { format: 'qcow2', fileSize: b.length, clusterSize: cs, fields, regions }
}

/** dm-snapshot persistent store: little-endian header and 16-byte exception records. */
export function dmsnapLayout(b: Uint8Array): Layout {
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength)
  const fields: Field[] = [
    { name: 'header.magic', offset: 0, width: 4, le: true, kind: 'magic' },
    { name: 'header.valid', offset: 4, width: 4, le: true, kind: 'count' },
    { name: 'header.version', offset: 8, width: 4, le: true, kind: 'count' },
    { name: 'header.chunk_size', offset: 12, width: 4, le: true, kind: 'size' },
  ]
  const chunkSectors = b.length >= 16 ? dv.getUint32(12, true) : 8
  const cs = chunkSectors > 0 && chunkSectors <= 1 << 14 && (chunkSectors & (chunkSectors - 1)) === 0 ? chunkSectors * 512 : 4096
  const regions: Layout['regions'] = [{ name: 'header', offset: 0, length: Math.min(cs, b.length) }]
  const perArea = cs / 16
  // areas: metadata chunk at 1, then perArea data chunks, then the next metadata chunk
  for (let area = 0; area < 64; area++) {
    const mc = 1 + area * (perArea + 1)
    const off = mc * cs
    if (off + 16 > b.length) break
    regions.push({ name: `area[${area}]`, offset: off, length: cs })
    let last = -1
    for (let i = 0; i < perArea && off + 16 * i + 16 <= b.length; i++) {
      const nc = Number(dv.getBigUint64(off + 16 * i + 8, true))
      if (nc === 0) {
        last = i
        break
      }
      fields.push({ name: `area[${area}].rec[${i}].old_chunk`, offset: off + 16 * i, width: 8, le: true, kind: 'entry' })
      fields.push({ name: `area[${area}].rec[${i}].new_chunk`, offset: off + 16 * i + 8, width: 8, le: true, kind: 'entry' })
    }
    if (last >= 0) {
      // the terminator (new_chunk 0) and the one after it
      fields.push({ name: `area[${area}].rec[${last}].terminator`, offset: off + 16 * last + 8, width: 8, le: true, kind: 'entry' })
      fields.push({ name: `area[${area}].rec[${last}].old_chunk`, offset: off + 16 * last, width: 8, le: true, kind: 'entry' })
      break
    }
  }
  return { format: 'dmsnap', fileSize: b.length, clusterSize: cs, fields, regions }
}

/** the VHD checksum: the ones' complement of the byte sum, the checksum field counted as zeros */
export function vhdChecksum(b: Uint8Array, at: number, length: number, checksumAt: number): number {
  let sum = 0
  for (let i = 0; i < length; i++) if (i < checksumAt || i >= checksumAt + 4) sum += b[at + i] ?? 0
  return ~sum >>> 0
}

/** VHD: footer fields (at 0 for a dynamic disk, and the copy or only footer in the last sector), dynamic header, BAT. */
export function vpcLayout(b: Uint8Array): Layout {
  const fields: Field[] = []
  const regions: Layout['regions'] = []
  const ascii = (o: number, n: number): string => (o >= 0 && o + n <= b.length ? String.fromCharCode(...b.subarray(o, o + n)) : '')
  const footer = (tag: string, at: number): void => {
    const f = (name: string, off: number, width: Field['width'], kind: Field['kind']): void => {
      fields.push({ name: `${tag}.${name}`, offset: at + off, width, kind })
    }
    regions.push({ name: tag, offset: at, length: 512 })
    f('cookie', 0, 8, 'magic')
    f('features', 8, 4, 'flags')
    f('version', 12, 4, 'count')
    f('data_offset', 16, 8, 'offset')
    f('creator_app', 28, 4, 'misc')
    f('original_size', 40, 8, 'size')
    f('current_size', 48, 8, 'size')
    f('cylinders', 56, 2, 'count')
    f('heads', 58, 1, 'count')
    f('sectors', 59, 1, 'count')
    f('disk_type', 60, 4, 'count')
    f('checksum', 64, 4, 'misc')
    f('saved_state', 84, 1, 'flags')
  }
  if (ascii(0, 8) === 'conectix') footer('header', 0)
  if (b.length >= 512 && ascii(b.length - 512, 8) === 'conectix') footer('footer', b.length - 512)
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength)
  const dataOffset = u64(b, 16)
  let blockSize = 2 << 20
  if (ascii(0, 8) === 'conectix' && dataOffset > 0 && dataOffset + 1024 <= b.length && ascii(dataOffset, 8) === 'cxsparse') {
    const d = dataOffset
    const f = (name: string, off: number, width: Field['width'], kind: Field['kind']): void => {
      fields.push({ name: `header.dyn.${name}`, offset: d + off, width, kind })
    }
    regions.push({ name: 'dynamic header', offset: d, length: 1024 })
    f('cookie', 0, 8, 'magic')
    f('data_offset', 8, 8, 'offset')
    f('table_offset', 16, 8, 'offset')
    f('version', 24, 4, 'count')
    f('max_table_entries', 28, 4, 'count')
    f('block_size', 32, 4, 'size')
    f('checksum', 36, 4, 'misc')
    const bs = u32(b, d + 32)
    if (bs >= 512 && bs <= 1 << 28 && (bs & (bs - 1)) === 0) blockSize = bs
    const table = u64(b, d + 16)
    const n = Math.min(u32(b, d + 28), 1 << 16)
    if (table > 0 && table < b.length) {
      const len = Math.min(n * 4, b.length - table)
      regions.push({ name: 'BAT', offset: table, length: Math.max(1, len) })
      let unused = 0
      for (let i = 0; i * 4 + 4 <= len; i++) {
        const e = dv.getUint32(table + 4 * i)
        if (e === 0xffff_ffff) {
          if (unused++ < 2) fields.push({ name: `bat[${i}]`, offset: table + 4 * i, width: 4, kind: 'entry' })
          continue
        }
        fields.push({ name: `bat[${i}]`, offset: table + 4 * i, width: 4, kind: 'entry' })
        const bitmapAt = e * 512
        if (bitmapAt + 512 <= b.length) regions.push({ name: `bitmap[${i}]`, offset: bitmapAt, length: 512 })
      }
    }
  }
  return { format: 'vpc', fileSize: b.length, clusterSize: Math.min(blockSize, 1 << 20), fields, regions }
}

function le64(b: Uint8Array, o: number): number {
  if (!Number.isSafeInteger(o) || o < 0 || o + 8 > b.length) return 0
  return Number(new DataView(b.buffer, b.byteOffset, b.byteLength).getBigUint64(o, true))
}
function le32(b: Uint8Array, o: number): number {
  if (!Number.isSafeInteger(o) || o < 0 || o + 4 > b.length) return 0
  return new DataView(b.buffer, b.byteOffset, b.byteLength).getUint32(o, true)
}

/**
 * VMDK: a sparse extent's header (and, for streamOptimized, the footer's copy near the end), the embedded
 * descriptor, the grain directory and its redundant copy, grain tables, stream markers; a descriptor file
 * (text) is one region.
 */
export function vmdkLayout(b: Uint8Array): Layout {
  const fields: Field[] = []
  const regions: Layout['regions'] = []
  const isSparse = b.length >= 512 && b[0] === 0x4b && b[1] === 0x44 && b[2] === 0x4d && b[3] === 0x56
  if (!isSparse) {
    regions.push({ name: 'descriptor', offset: 0, length: Math.max(1, b.length) })
    return { format: 'vmdk', fileSize: b.length, clusterSize: 512, fields, regions }
  }
  const header = (tag: string, at: number): void => {
    const f = (name: string, off: number, width: Field['width'], kind: Field['kind']): void => {
      fields.push({ name: `${tag}.${name}`, offset: at + off, width, le: true, kind })
    }
    regions.push({ name: tag, offset: at, length: 512 })
    f('magic', 0, 4, 'magic')
    f('version', 4, 4, 'count')
    f('flags', 8, 4, 'flags')
    f('capacity', 12, 8, 'size')
    f('grain_size', 20, 8, 'size')
    f('descriptor_offset', 28, 8, 'offset')
    f('descriptor_size', 36, 8, 'size')
    f('num_gtes_per_gt', 44, 4, 'count')
    f('rgd_offset', 48, 8, 'offset')
    f('gd_offset', 56, 8, 'offset')
    f('overhead', 64, 8, 'size')
    f('unclean_shutdown', 72, 1, 'flags')
    f('newline_chars', 73, 4, 'misc')
    f('compress_algorithm', 77, 2, 'count')
  }
  header('header', 0)
  // streamOptimized: footer marker, footer (a header copy), end-of-stream marker in the last three sectors
  let h = 0
  if (b.length >= 1536 && new DataView(b.buffer, b.byteOffset, b.byteLength).getBigUint64(56, true) === 0xffff_ffff_ffff_ffffn) {
    const fo = b.length - 1024
    if (b[fo] === 0x4b && b[fo + 1] === 0x44) {
      header('footer', fo)
      h = fo
    }
  }
  const descAt = le64(b, 28) * 512
  const descLen = Math.min(le64(b, 36) * 512, 1 << 20)
  if (descAt > 0 && descAt + descLen <= b.length && descLen > 0) regions.push({ name: 'descriptor', offset: descAt, length: descLen })
  const capacity = le64(b, h + 12)
  const grain = le64(b, h + 20)
  const perGt = le32(b, h + 44)
  const grainBytes = grain > 0 && grain <= 1 << 14 ? grain * 512 : 65536
  if (grain > 0 && perGt > 0 && perGt <= 1 << 14) {
    const gtCount = Math.min(Math.ceil(capacity / grain / perGt), 1 << 12)
    for (const [tag, sec] of [
      ['gd', le64(b, h + 56)],
      ['rgd', (le32(b, h + 8) & 2) !== 0 ? le64(b, h + 48) : 0],
    ] as const) {
      const at = sec * 512
      if (sec <= 0 || !Number.isSafeInteger(at) || at >= b.length) continue
      regions.push({ name: tag, offset: at, length: Math.max(1, Math.min(gtCount * 4, b.length - at)) })
      for (let i = 0; i < gtCount && at + 4 * i + 4 <= b.length; i++) {
        fields.push({ name: `${tag}[${i}]`, offset: at + 4 * i, width: 4, le: true, kind: 'entry' })
        const gt = le32(b, at + 4 * i) * 512
        if (gt === 0 || gt >= b.length || i > 8) continue
        regions.push({ name: `${tag}.gt[${i}]`, offset: gt, length: Math.min(perGt * 4, b.length - gt) })
        let shown = 0
        for (let j = 0; j < perGt && gt + 4 * j + 4 <= b.length && shown < 24; j++) {
          const e = le32(b, gt + 4 * j)
          if (e === 0 && j % 64 !== 0) continue
          shown++
          fields.push({ name: `${tag}.gt[${i}][${j}]`, offset: gt + 4 * j, width: 4, le: true, kind: 'entry' })
        }
      }
    }
  }
  // stream markers after the overhead: grain markers (lba, size, data) and metadata markers (sectors, 0, type)
  if ((le32(b, 8) & 0x10000) !== 0) {
    let at = le64(b, 64) * 512
    for (let n = 0; n < 64 && at + 512 <= b.length; n++) {
      const size = le32(b, at + 8)
      if (size > 0) {
        fields.push({ name: `marker[${n}].lba`, offset: at, width: 8, le: true, kind: 'offset' })
        fields.push({ name: `marker[${n}].size`, offset: at + 8, width: 4, le: true, kind: 'size' })
        at += Math.ceil((12 + size) / 512) * 512
      } else {
        const sectors = le64(b, at)
        fields.push({ name: `marker[${n}].sectors`, offset: at, width: 8, le: true, kind: 'size' })
        fields.push({ name: `marker[${n}].type`, offset: at + 12, width: 4, le: true, kind: 'count' })
        if (le32(b, at + 12) === 0) break // end of stream
        at += 512 + sectors * 512
      }
    }
  }
  return { format: 'vmdk', fileSize: b.length, clusterSize: Math.min(grainBytes, 1 << 20), fields, regions }
}
