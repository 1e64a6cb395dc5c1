/**
 * The damage the VMDK repair suites apply to a monolithicSparse image qemu-img
 * made (header at 0, redundant directory), found through the image's own
 * header: nothing here hard-codes an offset of the image.
 */
import type { RepairMode } from '../../src/check/types.js'

export const GRAIN = 65536

export interface Geometry {
  rgd: number
  gd: number
  entries: number
  gtBytes: number
  /** the sector of the primary / redundant grain table i */
  gt: (i: number) => number
  rgt: (i: number) => number
}

export function geometry(b: Uint8Array): Geometry {
  const B = Buffer.from(b.buffer, b.byteOffset, b.byteLength)
  const capacity = Number(B.readBigUInt64LE(12))
  const grain = Number(B.readBigUInt64LE(20))
  const gtes = B.readUInt32LE(44)
  const rgd = Number(B.readBigUInt64LE(48)) * 512
  const gd = Number(B.readBigUInt64LE(56)) * 512
  const entries = Math.ceil(capacity / (grain * gtes))
  return { rgd, gd, entries, gtBytes: gtes * 4, gt: (i) => B.readUInt32LE(gd + 4 * i), rgt: (i) => B.readUInt32LE(rgd + 4 * i) }
}

const u32 = (b: Uint8Array, at: number, v: number) => Buffer.from(b.buffer, b.byteOffset, b.byteLength).writeUInt32LE(v >>> 0, at)
const u64 = (b: Uint8Array, at: number, v: number) => Buffer.from(b.buffer, b.byteOffset, b.byteLength).writeBigUInt64LE(BigInt(v), at)

export type Damage = (b: Uint8Array) => Uint8Array

/** `n` grains of junk appended: space no grain table entry reaches (a crash between a grain and its entry) */
export const leak =
  (n: number): Damage =>
  (b) => {
    const c = new Uint8Array(b.length + n * GRAIN)
    c.set(b)
    c.fill(0x5a, b.length)
    return c
  }

/** redundant grain table 0's entry `j` set to `v` (0 where the primary maps a grain: a table behind its primary) */
export const rgtEntry =
  (j: number, v: number): Damage =>
  (b) => {
    const c = b.slice()
    const g = geometry(c)
    u32(c, g.rgt(0) * 512 + 4 * j, v)
    return c
  }

/** redundant directory entry 1 pointing at primary table 0 (an offset no redundant table may use) */
export const rgdAtPrimary: Damage = (b) => {
  const c = b.slice()
  const g = geometry(c)
  u32(c, g.rgd + 4, g.gt(0))
  return c
}

/** the header's rgdOffset past the end of the file */
export const rgdPastEnd: Damage = (b) => {
  const c = b.slice()
  u64(c, 48, Math.ceil(c.length / 512) + 100000)
  return c
}

/** the header's rgdOffset naming the primary directory (its entries: the primary tables) */
export const rgdOnPrimary: Damage = (b) => {
  const c = b.slice()
  u64(c, 48, geometry(c).gd / 512)
  return c
}

/** redundant directory entry 1 pointing into a leaked grain at the end of the file */
export const rgdIntoLeak: Damage = (b) => {
  const c = leak(1)(b)
  u32(c, geometry(c).rgd + 4, b.length / 512)
  return c
}

/** primary table 0's entry `j` pointing past the end of the file (qemu-img check: "Check failed") */
export const grainPastEnd =
  (j: number): Damage =>
  (b) => {
    const c = b.slice()
    u32(c, geometry(c).gt(0) * 512 + 4 * j, 0x7fffff)
    return c
  }

/** primary table 0's entry `j` naming the grain entry `k` names (two guest grains on one host grain) */
export const overlapGrains =
  (j: number, k: number): Damage =>
  (b) => {
    const c = b.slice()
    const at = geometry(c).gt(0) * 512
    const B = Buffer.from(c.buffer, c.byteOffset, c.byteLength)
    B.writeUInt32LE(B.readUInt32LE(at + 4 * k), at + 4 * j)
    return c
  }

export const both =
  (...fs: Damage[]): Damage =>
  (b) =>
    fs.reduce((x, f) => f(x), b)

export interface RepairCase {
  name: string
  damage: Damage
  mode: RepairMode
  /** imgtool check's exit code before and after the repair: qemu-img check's (a VMDK check counts as qemu-img's) */
  before: number
  after: number
  /** the kinds the check reports before the repair (findings of any severity, warnings included, and notices) */
  reported: string[]
  /** of those, the kinds the check still reports after it (the rest are gone) */
  left: string[]
  /** the steps the repair takes, in order ([] : it writes nothing) */
  kinds: string[]
  /** the repair keeps every guest byte of the undamaged image (false: the damage itself changed the guest) */
  sameAsBase: boolean
}

/**
 * The cases, for an image with grains in guest grains 0, 1 (table 0) and in table 1
 * (qemu-io writes at 0, 64k, 33M).
 */
export const CASES: RepairCase[] = [
  {
    name: 'two leaked grains at the end (-r leaks)',
    damage: leak(2),
    mode: 'leaks',
    before: 0,
    after: 0,
    reported: ['leaked-grain'],
    left: [],
    kinds: ['leak-freed'],
    sameAsBase: true,
  },
  {
    name: 'two leaked grains at the end (-r all)',
    damage: leak(2),
    mode: 'all',
    before: 0,
    after: 0,
    reported: ['leaked-grain'],
    left: [],
    kinds: ['leak-freed'],
    sameAsBase: true,
  },
  {
    name: 'a redundant table entry differs',
    damage: rgtEntry(7, 12345),
    mode: 'all',
    before: 0,
    after: 0,
    reported: ['rgt-differs'],
    left: [],
    kinds: ['rgt-rewritten'],
    sameAsBase: true,
  },
  {
    name: 'a redundant table behind its primary',
    damage: rgtEntry(0, 0),
    mode: 'all',
    before: 0,
    after: 0,
    reported: ['rgt-behind'],
    left: [],
    kinds: ['rgt-rewritten'],
    sameAsBase: true,
  },
  {
    name: 'a redundant directory entry naming a primary table (a new table)',
    damage: rgdAtPrimary,
    mode: 'all',
    before: 0,
    after: 0,
    reported: ['rgt-differs', 'overlap'],
    left: [],
    kinds: ['rgt-rewritten', 'rgd-rewritten'],
    sameAsBase: true,
  },
  {
    name: 'the redundant directory past the end of the file (moved)',
    damage: rgdPastEnd,
    mode: 'all',
    before: 0,
    after: 0,
    reported: ['redundant-grain-directory-range', 'rgd-differs'],
    left: [],
    kinds: ['rgt-rewritten', 'rgd-rewritten', 'rgd-moved'],
    sameAsBase: true,
  },
  {
    name: 'the redundant directory on the primary one (both moved off it)',
    damage: rgdOnPrimary,
    mode: 'all',
    before: 0,
    after: 0,
    reported: ['overlap'],
    left: [],
    kinds: ['rgt-rewritten', 'rgd-rewritten', 'rgd-moved'],
    sameAsBase: true,
  },
  {
    name: 'a redundant table in a leaked grain at the end (the rest of the grain cut, the table rewritten in place)',
    damage: rgdIntoLeak,
    mode: 'all',
    before: 0,
    after: 0,
    reported: ['rgt-differs'],
    left: [],
    kinds: ['leak-freed', 'rgt-rewritten'],
    sameAsBase: true,
  },
  {
    name: 'a leak and a differing redundant table (-r leaks: the redundant table stays)',
    damage: both(leak(1), rgtEntry(7, 12345)),
    mode: 'leaks',
    before: 0,
    after: 0,
    reported: ['rgt-differs', 'leaked-grain'],
    left: ['rgt-differs'],
    kinds: ['leak-freed'],
    sameAsBase: true,
  },
  {
    name: 'a primary grain past the end of the file, and a leak (not repaired)',
    damage: both(leak(1), grainPastEnd(3)),
    mode: 'all',
    before: 1,
    after: 1,
    reported: ['grain-past-eof', 'rgt-behind', 'leaked-grain'],
    left: ['grain-past-eof', 'rgt-behind', 'leaked-grain'],
    kinds: [],
    sameAsBase: false,
  },
  {
    name: 'two guest grains on one host grain, and a differing redundant table (not repaired)',
    damage: both(overlapGrains(5, 0), rgtEntry(9, 777)),
    mode: 'all',
    before: 0,
    after: 0,
    reported: ['rgt-differs', 'overlap'],
    left: ['rgt-differs', 'overlap'],
    kinds: [],
    sameAsBase: false,
  },
]
