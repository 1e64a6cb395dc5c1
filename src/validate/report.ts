/** What validate returns: data, never printed here. docs/validate.md documents the JSON form. */
import { CODES, type CheckGroup, type ViolationCode, type ViolationSeverity } from './codes.js'
import type { Policy } from './policy.js'

export interface Violation {
  code: ViolationCode
  severity: ViolationSeverity
  group: CheckGroup
  /** the policy key that decides it */
  policyKey: string
  /** names the file, the structure and the offset */
  message: string
  file: string
  structure?: string | undefined
  offset?: number | undefined
}

export type CheckStatus = 'pass' | 'fail' | 'skip'

export interface GuestDigest {
  algorithm: 'sha256'
  hex: string
  /** guest bytes read from the file */
  dataBytes: number
  /** guest bytes hashed as zeros without reading (holes, zero clusters) */
  zeroBytes: number
}

export interface ValidationReport {
  file: string
  /** detected format */
  format: string
  expectedFormat?: string | undefined
  /** every format signature found, with its offset */
  signatures: Array<{ signature: string; offset: number }>
  fileSize: number
  virtualSize?: number | undefined
  digest?: GuestDigest | undefined
  /** per check group: pass, fail (a violation), skip (not run, `notes` says why) */
  checks: Record<CheckGroup, CheckStatus>
  violations: Violation[]
  notes: string[]
  durationMs: number
}

/** Collects violations, applying the policy's severity overrides. */
export class ViolationSink {
  readonly list: Violation[] = []
  readonly notes: string[] = []
  readonly skipped = new Set<CheckGroup>()
  /** set when the report is handed out (a timed-out check may still be running): later findings are dropped */
  closed = false
  constructor(
    readonly file: string,
    private readonly policy: Policy,
  ) {}

  add(code: ViolationCode, message: string, at: { structure?: string; offset?: number; severity?: ViolationSeverity } = {}): void {
    if (this.closed) return
    const info = CODES[code]
    const override = this.policy.severity[code]
    if (override === 'off') return
    const severity = override ?? at.severity ?? info.severity
    const where = at.structure !== undefined ? ` (${at.structure}${at.offset !== undefined ? ` at 0x${at.offset.toString(16)}` : ''})` : ''
    this.list.push({
      code,
      severity,
      group: info.group,
      policyKey: info.key,
      message: `${this.file}: ${message}${where}`,
      file: this.file,
      structure: at.structure,
      offset: at.offset,
    })
  }

  skip(group: CheckGroup, why: string): void {
    if (this.closed) return
    this.skipped.add(group)
    this.notes.push(`${group}: ${why}`)
  }

  statuses(): Record<CheckGroup, CheckStatus> {
    const out = {} as Record<CheckGroup, CheckStatus>
    for (const g of ['identity', 'references', 'features', 'sizes', 'structure', 'content', 'limits'] as const) {
      out[g] = this.list.some((v) => v.group === g) ? 'fail' : this.skipped.has(g) ? 'skip' : 'pass'
    }
    return out
  }
}
