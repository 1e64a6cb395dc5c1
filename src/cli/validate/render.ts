/** validate's human and JSON renderings (the JSON document is described in docs/validate.md). */
import type { ValidationReport, ViolationSeverity } from '../../index.js'

export type FailOn = ViolationSeverity

/** One image's outcome: a report, or why it could not be validated. */
export type Outcome = { file: string; report: ValidationReport } | { file: string; error: string }

export interface Summary {
  images: number
  passed: number
  failed: number
  errors: number
  violations: number
}

export const JSON_SCHEMA_VERSION = 1

export function fails(report: ValidationReport, failOn: FailOn): boolean {
  return report.violations.some((v) => v.severity === 'error' || failOn === 'warning')
}

export function summarize(outcomes: readonly Outcome[], failOn: FailOn): Summary {
  const s: Summary = { images: 0, passed: 0, failed: 0, errors: 0, violations: 0 }
  for (const o of outcomes) addToSummary(s, o, failOn)
  return s
}

export function addToSummary(s: Summary, o: Outcome, failOn: FailOn): void {
  s.images++
  if ('error' in o) s.errors++
  else {
    s.violations += o.report.violations.length
    if (fails(o.report, failOn)) s.failed++
    else s.passed++
  }
}

/** 1 when an image could not be validated, 2 when a violation at or above --fail-on, else 0. */
export function exitCodeOf(s: Summary): number {
  if (s.errors > 0) return 1
  return s.failed > 0 ? 2 : 0
}

export function human(outcomes: readonly Outcome[], failOn: FailOn): string {
  const lines: string[] = []
  for (const o of outcomes) lines.push(...humanOne(o, failOn))
  lines.push(humanSummary(summarize(outcomes, failOn)))
  return lines.join('\n') + '\n'
}

export function humanOne(o: Outcome, failOn: FailOn): string[] {
  if ('error' in o) return [`${o.file}: could not validate: ${o.error}`]
  const r = o.report
  const lines = r.violations.map((v) => `${v.severity}: ${v.code}: ${v.message} [${v.policyKey}]`)
  const verdict = fails(r, failOn) ? 'FAIL' : 'pass'
  const digest = r.digest ? ` sha256:${r.digest.hex}` : ''
  lines.push(`${verdict}: ${r.file} (${r.format}${r.virtualSize !== undefined ? `, ${r.virtualSize} bytes` : ''})${digest}`)
  return lines
}

export function humanSummary(s: Summary): string {
  return `${s.images} image(s): ${s.passed} passed, ${s.failed} failed, ${s.errors} could not be validated; ${s.violations} violation(s)`
}

/** The JSON form of one outcome (one document per image, and one line per image in JSON-lines mode). */
export function outcomeJson(o: Outcome, failOn: FailOn): Record<string, unknown> {
  if ('error' in o) return { file: o.file, status: 'error', error: o.error }
  return { status: fails(o.report, failOn) ? 'fail' : 'pass', ...o.report }
}

export function jsonDocument(outcomes: readonly Outcome[], failOn: FailOn): Record<string, unknown> {
  return { version: JSON_SCHEMA_VERSION, failOn, images: outcomes.map((o) => outcomeJson(o, failOn)), summary: summarize(outcomes, failOn) }
}
