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
    id: 'DATAFILE-REPAIR-OFFSET',
    why: 'an image with an external data file whose refcount table entry or refcount_order is bent: after imgtool repair qemu-img refuses to read it ("External data file host cluster offset 0x5000 does not match guest cluster offset 0x1000"), after its own repair it reads it (fuzz --seed 12, cases 45 and 346; present before the rooms refactor too)',
    matches: (inv, d) => inv === 'repair-guest' && /External data file host cluster offset .* does not match guest cluster offset/.test(d),
    cases: [24, 25],
  },
  {
    id: 'C512-HUGE-SNAPSHOTS-REPAIR-GUEST',
    why: 'v3, 512-byte clusters, a refcount table entry of 2^63, nb_snapshots 0x2400 and the file cut by one cluster: imgtool repair changes one guest sector that qemu-img check -r all keeps (fuzz --seed 12, case 500)',
    matches: () => false,
    cases: [26],
  },
]

export function openDefectFor(invariant: string, detail: string): OpenDefect | undefined {
  return OPEN_DEFECTS.find((d) => d.matches(invariant, detail))
}

export function openCase(line: number): OpenDefect | undefined {
  return OPEN_DEFECTS.find((d) => d.cases.includes(line))
}
