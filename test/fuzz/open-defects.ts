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

export const OPEN_DEFECTS: OpenDefect[] = []

export function openDefectFor(invariant: string, detail: string): OpenDefect | undefined {
  return OPEN_DEFECTS.find((d) => d.matches(invariant, detail))
}

export function openCase(line: number): OpenDefect | undefined {
  return OPEN_DEFECTS.find((d) => d.cases.includes(line))
}
