/**
 * The twoGbMaxExtentSparse repair cases: a 3 GiB image qemu-img made (a
 * descriptor file and two sparse extent files, NAME-s001.vmdk of 2 GiB and
 * NAME-s002.vmdk of 1 GiB), written by qemu-io with grains in grain tables 0
 * and 1 of each extent, and damaged per extent with repair-damage.ts's damage
 * (found through each extent's own header: no offset is hard-coded).
 */
import type { RepairMode } from '../../src/check/types.js'
import { qemuImgOk, qemuIoOk } from '../support/qemu.js'
import { both, grainPastEnd, leak, overlapGrains, rgdAtPrimary, rgdIntoLeak, rgdOnPrimary, rgdPastEnd, rgtEntry, type Damage } from './repair-damage.js'

export const EXTENTS = ['s001', 's002'] as const
export type ExtentName = (typeof EXTENTS)[number]

/** Make the undamaged image at `path` (NAME.vmdk) with qemu-img and qemu-io: guest grains 0 and 1 and table 1 of each extent hold data. */
export async function makeTwoGb(path: string): Promise<void> {
  await qemuImgOk(['create', '-q', '-f', 'vmdk', '-o', 'subformat=twoGbMaxExtentSparse', path, '3G'])
  await qemuIoOk(
    path,
    ['write -P 0x61 0 64k', 'write -P 0x62 64k 4k', 'write -P 0x63 33M 100k', 'write -P 0x64 2048M 64k', 'write -P 0x65 2049M 4k', 'write -P 0x66 2081M 100k'],
    { format: 'vmdk' },
  )
}

/** NAME-sNNN.vmdk next to NAME.vmdk */
export const extentFile = (descriptor: string, x: ExtentName) => descriptor.replace(/\.vmdk$/, `-${x}.vmdk`)

export interface TwoGbCase {
  name: string
  /** the damage of each extent file (an extent not named is left as qemu-img wrote it) */
  damage: Partial<Record<ExtentName, Damage>>
  mode: RepairMode
  /** imgtool check's exit code before and after the repair: qemu-img check's */
  before: number
  after: number
  /** the kinds the check reports before the repair (findings of any severity, and notices) */
  reported: string[]
  /** of those, the kinds the check still reports after it */
  left: string[]
  /** the steps the repair takes, in order, over the extents in descriptor order ([]: nothing written) */
  kinds: string[]
  /** the extents the repair writes (each gets its own undo journal) */
  written: ExtentName[]
  /** the repair keeps every guest byte of the undamaged image (false: the damage itself changed the guest) */
  sameAsBase: boolean
}

export const TWOGB_CASES: TwoGbCase[] = [
  {
    name: 'leaked grains at the end of both extents (-r leaks)',
    damage: { s001: leak(2), s002: leak(1) },
    mode: 'leaks',
    before: 0,
    after: 0,
    reported: ['leaked-grain'],
    left: [],
    kinds: ['leak-freed', 'leak-freed'],
    written: ['s001', 's002'],
    sameAsBase: true,
  },
  {
    name: 'a redundant table entry differs in the first extent, one behind its primary in the second',
    damage: { s001: rgtEntry(7, 12345), s002: rgtEntry(0, 0) },
    mode: 'all',
    before: 0,
    after: 0,
    reported: ['rgt-differs', 'rgt-behind'],
    left: [],
    kinds: ['rgt-rewritten', 'rgt-rewritten'],
    written: ['s001', 's002'],
    sameAsBase: true,
  },
  {
    name: 'the second extent only: a redundant directory entry naming a primary table (a new table)',
    damage: { s002: rgdAtPrimary },
    mode: 'all',
    before: 0,
    after: 0,
    reported: ['rgt-differs', 'overlap'],
    left: [],
    kinds: ['rgt-rewritten', 'rgd-rewritten'],
    written: ['s002'],
    sameAsBase: true,
  },
  {
    name: 'redundant directories past the end of the file and on the primary one (both moved)',
    damage: { s001: rgdPastEnd, s002: rgdOnPrimary },
    mode: 'all',
    before: 0,
    after: 0,
    reported: ['redundant-grain-directory-range', 'rgd-differs', 'overlap'],
    left: [],
    kinds: ['rgt-rewritten', 'rgd-rewritten', 'rgd-moved', 'rgt-rewritten', 'rgd-rewritten', 'rgd-moved'],
    written: ['s001', 's002'],
    sameAsBase: true,
  },
  {
    name: 'a leak in the first extent, a redundant table in a leaked grain in the second',
    damage: { s001: leak(2), s002: rgdIntoLeak },
    mode: 'all',
    before: 0,
    after: 0,
    reported: ['leaked-grain', 'rgt-differs'],
    left: [],
    kinds: ['leak-freed', 'leak-freed', 'rgt-rewritten'],
    written: ['s001', 's002'],
    sameAsBase: true,
  },
  {
    name: 'leaks and a differing redundant table (-r leaks: the redundant table stays)',
    damage: { s001: both(leak(1), rgtEntry(7, 12345)), s002: leak(1) },
    mode: 'leaks',
    before: 0,
    after: 0,
    reported: ['rgt-differs', 'leaked-grain'],
    left: ['rgt-differs'],
    kinds: ['leak-freed', 'leak-freed'],
    written: ['s001', 's002'],
    sameAsBase: true,
  },
  {
    name: 'a grain past the end of the second extent (not repaired there), a leak in the first (repaired)',
    damage: { s001: leak(1), s002: both(leak(1), grainPastEnd(3)) },
    mode: 'all',
    before: 1,
    after: 1,
    reported: ['grain-past-eof', 'rgt-behind', 'leaked-grain'],
    left: ['grain-past-eof', 'rgt-behind', 'leaked-grain'],
    kinds: ['leak-freed'],
    written: ['s001'],
    sameAsBase: false,
  },
  {
    name: 'two guest grains on one host grain in the first extent (not repaired there), a differing redundant table in the second',
    damage: { s001: both(overlapGrains(5, 0), rgtEntry(9, 777)), s002: rgtEntry(7, 12345) },
    mode: 'all',
    before: 0,
    after: 0,
    reported: ['rgt-differs', 'overlap'],
    left: ['rgt-differs', 'overlap'],
    kinds: ['rgt-rewritten'],
    written: ['s002'],
    sameAsBase: false,
  },
]
