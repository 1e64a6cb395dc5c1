/**
 * Defects the fuzzer has found that are not fixed yet. Issue 10 is not done while this list is not empty.
 * The short run fails on any failure that no entry here explains (a new class, or a regression), and the
 * regression replay expects exactly these cases to still fail (`it.fails`: a case that starts passing must
 * be moved back into the plain replay). Each entry says why it is open; none is an accepted difference
 * (those are in EXCEPTIONS.md).
 */
export interface OpenDefect {
  id: string
  why: string
  /** a failing outcome of the short run that this open defect explains */
  matches(invariant: string, detail: string): boolean
  /** the regression cases (regressions/cases.jsonl line numbers) that still fail because of it */
  cases: number[]
}

export const OPEN_DEFECTS: OpenDefect[] = [
  {
    id: 'REPAIR-REFTABLE-MOVED',
    why: 'refcount_table_offset bent onto other metadata: imgtool repair stops (exit 1) where qemu-img check -r all repairs',
    matches: (inv, d) => inv === 'repair-verdict' && /^after imgtool repair \(exit 1\) qemu-img check exit 2 .*qemu-img check -r all exit 0$/.test(d),
    cases: [],
  },
  {
    id: 'VERDICT-AFTER-D8-D15',
    why: "check's verdict still differs from qemu-img's once the D8 hang and D15 refusals are fixed (e.g. exit 2 where qemu-img says 1: refcount block outside the image; bitmap type/table bends)",
    matches: () => false,
    cases: [4, 8, 9],
  },
  {
    id: 'D4-NEW-1',
    why: 'a snapshot count bent to 4096 on a v2 image: the repair is not atomic where qemu-img fails cleanly, and the second stderr line names no file',
    matches: () => false,
    cases: [3],
  },
  { id: 'D16-L1-OFFSET-2^62', why: "l1_table_offset bent to 2^62: check's verdict still differs from qemu-img's", matches: () => false, cases: [10] },
]

export function openDefectFor(invariant: string, detail: string): OpenDefect | undefined {
  return OPEN_DEFECTS.find((d) => d.matches(invariant, detail))
}

export function openCase(line: number): OpenDefect | undefined {
  return OPEN_DEFECTS.find((d) => d.cases.includes(line))
}
