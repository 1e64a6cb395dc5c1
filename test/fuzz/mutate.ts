/**
 * Mutations: drawn from a seeded PRNG, stored as concrete byte edits so a case
 * replays without the PRNG (a regression case is a seed name plus this list).
 */
import { Prng } from '../support/prng.js'
import { dmsnapLayout, qcow2Layout, vhdChecksum, vmdkLayout, vpcLayout, type Field, type Layout } from './layout.js'

export type Mutation =
  | { op: 'set'; off: number; hex: string; why: string }
  | { op: 'flip'; off: number; bit: number; why: string }
  | { op: 'truncate'; size: number; why: string }
  | { op: 'extend'; size: number; why: string }

export function applyMutations(src: Uint8Array, muts: readonly Mutation[]): Buffer {
  let b = Buffer.from(src)
  for (const m of muts) {
    switch (m.op) {
      case 'set': {
        const v = Buffer.from(m.hex, 'hex')
        if (m.off + v.length > b.length) b = Buffer.concat([b, Buffer.alloc(m.off + v.length - b.length)])
        v.copy(b, m.off)
        break
      }
      case 'flip':
        if (m.off < b.length) b[m.off] = (b[m.off] as number) ^ (1 << m.bit)
        break
      case 'truncate':
        b = b.subarray(0, Math.min(m.size, b.length))
        break
      case 'extend':
        if (m.size > b.length) b = Buffer.concat([b, Buffer.alloc(m.size - b.length)])
        break
    }
  }
  return b
}

const MASK64 = (1n << 64n) - 1n

function readField(b: Uint8Array, f: Field): bigint {
  if (f.offset + f.width > b.length) return 0n
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength)
  switch (f.width) {
    case 1:
      return BigInt(dv.getUint8(f.offset))
    case 2:
      return BigInt(dv.getUint16(f.offset, f.le))
    case 4:
      return BigInt(dv.getUint32(f.offset, f.le))
    case 8:
      return dv.getBigUint64(f.offset, f.le)
  }
}

function encode(f: Field, v: bigint): string {
  const max = (1n << BigInt(8 * f.width)) - 1n
  v = ((v % (max + 1n)) + (max + 1n)) % (max + 1n)
  const out = Buffer.alloc(f.width)
  if (f.width === 1) out.writeUInt8(Number(v))
  else if (f.width === 2) f.le ? out.writeUInt16LE(Number(v)) : out.writeUInt16BE(Number(v))
  else if (f.width === 4) f.le ? out.writeUInt32LE(Number(v)) : out.writeUInt32BE(Number(v))
  else f.le ? out.writeBigUInt64LE(v & MASK64) : out.writeBigUInt64BE(v & MASK64)
  return out.toString('hex')
}

function pick<T>(p: Prng, xs: readonly T[]): T {
  return xs[p.int(xs.length)] as T
}

/** Interesting values for a field, given its current value and the image around it. */
function interesting(p: Prng, f: Field, v: bigint, layout: Layout): bigint {
  const cs = BigInt(layout.clusterSize)
  const fs = BigInt(layout.fileSize)
  const bits = BigInt(8 * f.width)
  const max = (1n << bits) - 1n
  const regionOffsets = layout.regions.map((r) => BigInt(r.offset))
  const common = [0n, 1n, v + 1n, v - 1n, v ^ (1n << BigInt(p.int(8 * f.width))), max, max >> 1n, v << 1n]
  const k = f.kind
  let xs: bigint[]
  if (k === 'size' || k === 'count')
    xs = [v * 2n, v * 16n, v * 256n, v + 4096n, 1n << 20n, 1n << 31n, (1n << 32n) - 1n, 1n << 53n, 1n << 62n, fs, fs / 8n, 0n, 2n, 3n]
  else if (k === 'offset')
    xs = [
      0n,
      cs,
      cs / 2n,
      v + 8n,
      v + cs,
      v - cs,
      fs,
      fs + cs,
      fs - 8n,
      1n << 53n,
      1n << 62n,
      v | (1n << 63n),
      pick(p, regionOffsets),
      pick(p, regionOffsets) + 8n,
    ]
  else if (k === 'entry') {
    if (layout.format === 'vpc' || layout.format === 'vmdk') {
      // 32-bit sector numbers: a VHD BAT entry (0xffffffff unused) or a VMDK grain directory / table entry
      // (0 unallocated, 1 a zeroed grain)
      const sectors = fs / 512n
      const grain = cs / 512n
      xs = [
        0n,
        1n,
        0xffff_ffffn,
        v + 1n,
        v - 1n,
        v + grain,
        v - grain,
        sectors,
        sectors - 1n,
        sectors + grain,
        pick(p, regionOffsets) / 512n,
        v ^ (1n << BigInt(p.int(32))),
        1n << 31n,
      ]
    } else if (layout.format === 'dmsnap') {
      const chunks = fs / cs
      xs = [0n, 1n, 2n, chunks, chunks - 1n, chunks + 5n, v + 1n, v + 256n, 1n << 32n, 1n << 53n, 1n << 63n, max, v ^ (1n << BigInt(p.int(64)))]
    } else {
      const flags = v & ~0x00ffffffffffff00n
      xs = [
        0n,
        v ^ (1n << 63n),
        v ^ (1n << 62n),
        v | 1n,
        v + cs / 2n,
        v + 512n,
        (fs + cs * 4n) | (1n << 63n),
        (1n << 55n) | (1n << 63n),
        1n << 63n,
        pick(p, regionOffsets) | (1n << 63n),
        pick(p, regionOffsets) | flags,
        v ^ (1n << BigInt(p.int(64))),
        v & (1n << 63n),
        0x100n,
      ]
    }
  } else if (k === 'refcount') xs = [0n, 1n, 2n, max, v + 1n, v - 1n]
  else if (k === 'bits') xs = [0n, 1n, 6n, 7n, 8n, 9n, 12n, 16n, 21n, 22n, 30n, 31n, 32n, 63n, 64n, v + 1n, v - 1n]
  else if (k === 'flags') xs = [0n, max, v | (1n << BigInt(p.int(8 * f.width))), v ^ 1n, v ^ 2n, v ^ 4n, v ^ 8n, v ^ 16n, 1n << BigInt(8 * f.width - 1)]
  else if (k === 'magic') xs = [0n, v ^ 0xffn, v ^ (1n << BigInt(p.int(8 * f.width))), v + 1n]
  else xs = [0n, 0xffn, 0x3an, 0x2fn, 0x80n]
  return p.chance(0.25) ? pick(p, common) : pick(p, xs)
}

const GEOMETRY =
  /^header\.(size|cluster_bits|l1_size|l1_table_offset|refcount_table_offset|refcount_table_clusters|nb_snapshots|snapshots_offset|refcount_order|header_length|chunk_size|magic)$|^bitmapext\.|^snap\[\d+\]\.l1_|^bitmap\[\d+\]\.table_|^(header|footer)\.(dyn\.)?(data_offset|current_size|disk_type|table_offset|max_table_entries|block_size|capacity|grain_size|num_gtes_per_gt|gd_offset|rgd_offset|descriptor_offset|descriptor_size|overhead)$/

function fieldMutation(p: Prng, b: Uint8Array, layout: Layout): Mutation {
  // half the time a header-ish field, else any structure entry
  const header = layout.fields.filter(
    (f) =>
      f.name.startsWith('header.') ||
      f.name.startsWith('footer.') ||
      f.name.startsWith('ext') ||
      f.name.startsWith('bitmapext') ||
      f.name.startsWith('backing'),
  )
  const rest = layout.fields.filter((f) => !header.includes(f))
  // table geometry (where a table is and how big it says it is) is where one bent field does the most
  const geometry = layout.fields.filter((f) => GEOMETRY.test(f.name))
  const r = p.next()
  const pool = r < 0.2 && geometry.length ? geometry : (r < 0.55 && header.length) || rest.length === 0 ? header : rest
  if (pool.length === 0) return regionFlip(p, b, layout)
  const f = pick(p, pool)
  const v = readField(b, f)
  const nv = interesting(p, f, v, layout)
  const hex = encode(f, nv)
  return { op: 'set', off: f.offset, hex, why: `${f.name}: 0x${v.toString(16)} -> 0x${Buffer.from(hex, 'hex').toString('hex')}${f.le ? ' (le)' : ''}` }
}

function regionFlip(p: Prng, b: Uint8Array, layout: Layout): Mutation {
  const regs = layout.regions.filter((g) => g.offset < b.length)
  if (regs.length === 0) {
    const off = p.int(Math.max(1, b.length))
    return { op: 'flip', off, bit: p.int(8), why: `bit flip at 0x${off.toString(16)}` }
  }
  const reg = pick(p, regs)
  const len = Math.max(1, Math.min(reg.length, b.length - reg.offset))
  const off = reg.offset + p.int(len)
  const bit = p.int(8)
  return { op: 'flip', off, bit, why: `bit flip in ${reg.name} at +0x${(off - reg.offset).toString(16)}` }
}

/** A descriptor line bent: a number changed, a line dropped or doubled, a quote or path made odd (VMDK text). */
function textMutation(p: Prng, b: Uint8Array, reg: { offset: number; length: number }): Mutation | undefined {
  const end = Math.min(b.length, reg.offset + reg.length)
  const text = Buffer.from(b.subarray(reg.offset, end)).toString('latin1')
  const used = text.indexOf('\0') >= 0 ? text.slice(0, text.indexOf('\0')) : text
  const lines: Array<{ at: number; line: string }> = []
  let at = 0
  for (const line of used.split('\n')) {
    if (line.trim() && !line.startsWith('#')) lines.push({ at, line })
    at += line.length + 1
  }
  if (lines.length === 0) return undefined
  const { at: lineAt, line } = pick(p, lines)
  const nums = [...line.matchAll(/\d+/g)]
  const r = p.next()
  let replacement: string
  let why: string
  if (r < 0.5 && nums.length) {
    const m = pick(p, nums)
    const nv = pick(p, ['0', '1', '4294967295', '18446744073709551616', '99999999999', '-1', String(Number(m[0]) * 2 + 1), '007', ''])
    replacement = line.slice(0, m.index) + nv + line.slice((m.index ?? 0) + m[0].length)
    why = `descriptor line ${JSON.stringify(line.slice(0, 60))}: number ${m[0]} -> ${nv || '(none)'}`
  } else if (r < 0.65) {
    replacement = line.replace(/"/, '')
    why = `descriptor line ${JSON.stringify(line.slice(0, 60))}: a quote dropped`
  } else if (r < 0.8) {
    replacement = line.replace(/"([^"]*)"/, pick(p, ['"../../etc/passwd"', '"/etc/passwd"', '"x.vmdk"', '""', '"a"b"', '"file:///etc/passwd"']))
    why = `descriptor line ${JSON.stringify(line.slice(0, 60))}: a quoted value replaced`
  } else if (r < 0.9) {
    replacement = line + '\n' + line
    why = `descriptor line ${JSON.stringify(line.slice(0, 60))}: doubled`
  } else {
    replacement = ''
    why = `descriptor line ${JSON.stringify(line.slice(0, 60))}: dropped`
  }
  // the text after the line moves; a sparse extent's descriptor area keeps its size (cut or zero-padded)
  const rest = used.slice(lineAt + line.length)
  let next = used.slice(0, lineAt) + replacement + rest
  const room = end - reg.offset
  if (next.length > room) next = next.slice(0, room)
  const isTextFile = reg.offset === 0 && end === b.length
  if (isTextFile) return { op: 'set', off: reg.offset, hex: Buffer.from(next, 'latin1').toString('hex'), why }
  const padded = Buffer.alloc(Math.max(used.length, next.length))
  padded.write(next, 0, 'latin1')
  return { op: 'set', off: reg.offset, hex: padded.toString('hex'), why }
}

function oneMutation(p: Prng, b: Uint8Array, layout: Layout): Mutation {
  const r = p.next()
  const cs = layout.clusterSize
  if (layout.format === 'vmdk' && p.chance(0.2)) {
    const desc = layout.regions.find((g) => g.name === 'descriptor')
    const m = desc && textMutation(p, b, desc)
    if (m) return m
  }
  if (r < 0.5) return fieldMutation(p, b, layout)
  if (r < 0.72) return regionFlip(p, b, layout)
  if (r < 0.8) {
    const off = p.int(b.length)
    const n = pick(p, [1, 2, 4, 8])
    const hex = Buffer.from(p.bytes(Math.min(n, b.length - off))).toString('hex')
    return { op: 'set', off, hex, why: `random ${n} bytes at 0x${off.toString(16)}` }
  }
  if (r < 0.85) {
    const off = p.int(b.length)
    const hex = pick(p, ['00', 'ff', '80', '7f', '01'])
    return { op: 'set', off, hex, why: `byte 0x${hex} at 0x${off.toString(16)}` }
  }
  if (r < 0.94) {
    const choices = [
      Math.floor(b.length / cs / 2) * cs,
      b.length - cs,
      b.length - 1,
      b.length - 512,
      Math.max(0, b.length - 1 - p.int(Math.min(b.length, 4 * cs))),
      cs,
      p.int(Math.min(b.length, 2 * cs)),
      512,
      72,
      0,
    ].filter((s) => s >= 0 && s < b.length)
    const size = pick(p, choices.length ? choices : [0])
    return { op: 'truncate', size, why: `truncate ${b.length} -> ${size}` }
  }
  const size = b.length + pick(p, [1, 511, 512, cs, cs * 3 + 7, 1 << 20])
  return { op: 'extend', size, why: `extend ${b.length} -> ${size} with zeros` }
}

export function layoutOf(format: Layout['format'], b: Uint8Array): Layout {
  switch (format) {
    case 'qcow2':
      return qcow2Layout(b)
    case 'dmsnap':
      return dmsnapLayout(b)
    case 'vpc':
      return vpcLayout(b)
    case 'vmdk':
      return vmdkLayout(b)
  }
}

/**
 * VHD footers and the dynamic header carry checksums: most bent fields would stop at them. A mutation that
 * left one wrong is, most of the time, followed by the edit that makes it right again, so the bent value
 * reaches the code behind the checksum.
 */
function vhdChecksumFixes(b: Uint8Array): Mutation[] {
  const out: Mutation[] = []
  const ascii = (o: number, n: number): string => (o >= 0 && o + n <= b.length ? String.fromCharCode(...b.subarray(o, o + n)) : '')
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength)
  const fix = (name: string, at: number, length: number, ck: number): void => {
    if (at < 0 || at + length > b.length) return
    const want = vhdChecksum(b, at, length, ck)
    if (dv.getUint32(at + ck) === want) return
    out.push({ op: 'set', off: at + ck, hex: want.toString(16).padStart(8, '0'), why: `${name} checksum made right again` })
  }
  if (ascii(0, 8) === 'conectix') fix('footer at 0', 0, 512, 64)
  if (b.length >= 1024 && ascii(b.length - 512, 8) === 'conectix') fix('footer copy', b.length - 512, 512, 64)
  const d = b.length >= 24 && ascii(0, 8) === 'conectix' ? Number(dv.getBigUint64(16)) : -1
  if (d > 0 && Number.isSafeInteger(d) && ascii(d, 8) === 'cxsparse') fix('dynamic header', d, 1024, 36)
  return out
}

/** One mutant's mutation list (1 to 3 edits), drawn from `p`. */
export function drawMutations(p: Prng, format: Layout['format'], seedBytes: Uint8Array): Mutation[] {
  const n = p.chance(0.7) ? 1 : p.chance(0.7) ? 2 : 3
  const muts: Mutation[] = []
  let cur: Uint8Array = seedBytes
  for (let i = 0; i < n; i++) {
    const layout = layoutOf(format, cur)
    const m = oneMutation(p, cur, layout)
    muts.push(m)
    cur = applyMutations(cur, [m])
    if (format === 'vpc' && p.chance(0.75)) {
      const fixes = vhdChecksumFixes(cur)
      muts.push(...fixes)
      cur = applyMutations(cur, fixes)
    }
    if (m.op === 'truncate' && cur.length < 16) break
  }
  return muts
}
