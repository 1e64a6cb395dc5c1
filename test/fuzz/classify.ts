/**
 * Grouping failures into classes: the known defects of
 * /work/shared/findings/edge-defects-2026-12.md (D1..D22) where a failure
 * matches one, NEW-n otherwise. Rules look at the invariant, the harness's
 * detail text and the mutation list; first match wins.
 */
import type { FuzzCase, Invariant } from './harness.js'

export interface ClassRule {
  id: string
  label: string
  test(inv: Invariant, detail: string, fc: FuzzCase): boolean
}

const muts = (fc: FuzzCase): string => fc.mutations.map((m) => m.why).join(' ; ')
const SMALL_CLUSTERS = /^(v3-c512|v3-c1k-rc8|v3-rc2-c512)$/

export const CLASS_RULES: ClassRule[] = [
  {
    id: 'D8',
    label: 'repair hangs (512 B/1 KiB clusters, metadataClusters loop past 2^53)',
    test: (i, d, fc) => i === 'hang' && /\brepair\b/.test(d) && SMALL_CLUSTERS.test(fc.seed),
  },
  { id: 'D9', label: 'dm-snapshot check/repair hang on a bad header (chunk size 0)', test: (i, _d, fc) => i === 'hang' && fc.seed.startsWith('dmsnap') },
  { id: 'NEW-2', label: 'slow repair (tens of seconds; over the timeout on a loaded machine), e.g. nb_snapshots >= 2^20', test: (i) => i === 'hang' },
  { id: 'D21', label: 'peak RSS above the bound', test: (i) => i === 'memory' },
  {
    id: 'D11',
    label: 'repair dies with an internal error',
    test: (i, d) => (i === 'error-shape' || i === 'cli') && /Invalid typed array length|Maximum call stack|repair the refcounts first/.test(d),
  },
  {
    id: 'D13',
    label: "Node's internal error text (NUL in a file name, ERR_*)",
    test: (i, d) => (i === 'error-shape' || i === 'cli') && /ERR_INVALID_ARG|must be a string|\\u0000/.test(d),
  },
  {
    id: 'NEW-1',
    label: 'check that cannot complete prints a second stderr line "imgtool: Check failed: …"',
    test: (i, d) => (i === 'error-shape' || i === 'cli') && /stderr has 2 lines: .*Check failed: /.test(d),
  },
  {
    id: 'D4',
    label: 'repair fails after writing (EFBIG, l1 at the header, …)',
    test: (i, d) => (i === 'error-shape' || i === 'repair-atomic') && /EFBIG/.test(d),
  },
  { id: 'NEW-3', label: 'other error-shape failures', test: (i) => i === 'error-shape' || i === 'cli' },
  {
    id: 'NEW-9',
    label: 'after imgtool repair qemu-img cannot read the image it reads after its own repair (new refcount structure written over a table declared past EOF)',
    test: (i, d) => i === 'repair-guest' && /not after imgtool's/.test(d),
  },
  {
    id: 'NEW-11',
    label: 'v2 image over a backing file: repair clears a data entry that points past EOF, so the backing file shows through where qemu-img reads zeros',
    test: (i, _d, fc) => i === 'repair-guest' && fc.seed === 'v2-chain-raw',
  },
  {
    id: 'D2',
    label: 'repair zeroes guest data: refcount table declared over data (refcount_table_clusters/offset bent)',
    test: (i, _d, fc) => i === 'repair-guest' && /refcount_table_(clusters|offset)|reftable/.test(muts(fc)),
  },
  {
    id: 'D3',
    label: 'repair zeroes guest data: L1 declared over data (l1_size/l1_table_offset bent)',
    test: (i, _d, fc) => i === 'repair-guest' && /header\.l1_(size|table_offset)/.test(muts(fc)),
  },
  {
    id: 'D14/D2',
    label: 'repair zeroes guest data: an L1 entry aimed at a table (the L1 itself), repair "clears L2 entries" of it (D14 pattern 2)',
    test: (i, _d, fc) => i === 'repair-guest' && fc.mutations.some((m) => /^l1\[/.test(m.why)),
  },
  { id: 'D2-class', label: 'repair zeroes guest data qemu-img keeps: other tables/entries bent over data', test: (i) => i === 'repair-guest' },
  { id: 'D4', label: 'repair fails (exit 1) after changing the image', test: (i) => i === 'repair-atomic' },
  { id: 'D14', label: 'after imgtool repair qemu-img check says corrupt (repair said clean or qemu-img repairs it)', test: (i) => i === 'repair-verdict' },
  { id: 'NEW-4', label: 'repair exit 0 but imgtool check afterwards not clean', test: (i) => i === 'repair-selfcheck' },
  {
    id: 'D17',
    label: 'repair --dry-run fails where the repair does not (dm-snapshot: "open read-write to repair")',
    test: (i, _d, fc) => i === 'dry-run' && fc.seed.startsWith('dmsnap'),
  },
  { id: 'NEW-10', label: 'qcow2 repair --dry-run fails (its check cannot complete) where the repair runs', test: (i) => i === 'dry-run' },
  { id: 'NEW-5', label: 'repair --undo does not restore the bytes', test: (i) => i === 'undo' },
  {
    id: 'D14',
    label: 'check passes (0/3) what qemu-img calls corrupt (2): an L1 entry with offset 0 / reserved bits',
    test: (i, d) => i === 'check-verdict' && /imgtool check [03], qemu-img check 2/.test(d),
  },
  {
    id: 'D15',
    label: 'imgtool check passes (0/3) an image qemu-img cannot open',
    test: (i, d) => i === 'check-verdict' && /imgtool check [03], qemu-img check 1/.test(d),
  },
  {
    id: 'D15-converse',
    label: 'imgtool check finds corruption (2) where qemu-img cannot open it (1)',
    test: (i, d) => i === 'check-verdict' && /imgtool check 2, qemu-img check 1/.test(d),
  },
  {
    id: 'D16',
    label: 'imgtool refuses (check exit 1) an image qemu-img checks: tables past EOF, offsets >= 2^53',
    test: (i, d) => i === 'check-verdict' && /imgtool check 1, qemu-img check [023]/.test(d) && /Could not open|beyond the end|past the end|too large/.test(d),
  },
  { id: 'NEW-6', label: 'other check verdict differences', test: (i) => i === 'check-verdict' },
  {
    id: 'D16',
    label: 'imgtool refuses to open what qemu-img reads (tables past EOF, long deflate streams, …)',
    test: (i, d) => (i === 'info-equal' || i === 'read-refused') && /exit 1/.test(d),
  },
  {
    id: 'D16',
    label: 'virtual size differs (sizes not a multiple of 512)',
    test: (i, d) => (i === 'info-equal' && /virtual-size/.test(d)) || (i === 'read-equal' && /^length/.test(d)),
  },
  { id: 'NEW-7', label: 'cat differs from qemu-img convert -O raw', test: (i) => i === 'read-equal' },
  { id: 'NEW-8', label: 'read-only command changed a file', test: (i) => i === 'readonly' },
]

export function classify(inv: Invariant, detail: string, fc: FuzzCase): ClassRule {
  return CLASS_RULES.find((r) => r.test(inv, detail, fc)) ?? { id: 'NEW-?', label: 'unclassified', test: () => true }
}
