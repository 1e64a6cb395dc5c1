/**
 * JUnit XML (the Apache Ant schema Jenkins and GitLab read): one testsuite per
 * image, one testcase per image x check group; a group with violations is a
 * failure (its first violation in `message`, every violation in the body), a
 * group not run is skipped, an image that could not be validated is an error.
 */
import { hostname } from 'node:os'
import { CHECK_GROUPS } from '../../index.js'
import type { FailOn, Outcome } from './render.js'

const esc = (s: string): string =>
  s
    // characters XML 1.0 cannot carry at all
    .replace(/[\u0000-\u0008\u000b\u000c\u000e-\u001f\ufffe\uffff]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`)
    .replace(/&/g, '&amp;')
    .replace(/</g, '&lt;')
    .replace(/>/g, '&gt;')
    .replace(/"/g, '&quot;')

export function junit(outcomes: readonly Outcome[], failOn: FailOn, now = new Date()): string {
  const w = new JunitWriter(failOn, now)
  return w.head() + outcomes.map((o, id) => w.suite(o, id)).join('') + w.tail()
}

/** One document written piece by piece: head(), a suite() per image as it finishes, tail(). */
export class JunitWriter {
  private readonly timestamp: string
  private readonly host: string
  constructor(
    private readonly failOn: FailOn,
    now = new Date(),
  ) {
    this.timestamp = now.toISOString().slice(0, 19)
    this.host = esc(hostname() || 'localhost')
  }

  head(): string {
    return '<?xml version="1.0" encoding="UTF-8"?>\n<testsuites>\n'
  }

  tail(): string {
    return '</testsuites>\n'
  }

  /** one testsuite: `id` is the image's place (its manifest line) */
  suite(o: Outcome, id: number): string {
    const { timestamp, failOn } = this
    const host = this.host
    const out: string[] = []
    const name = esc(o.file)
    if ('error' in o) {
      out.push(
        `  <testsuite package="imgtool.validate" id="${id}" name="${name}" timestamp="${timestamp}" hostname="${host}" tests="1" failures="0" errors="1" time="0">`,
      )
      out.push('    <properties/>')
      out.push(
        `    <testcase name="validate" classname="${name}" time="0"><error type="COULD_NOT_VALIDATE" message="${esc(o.error)}">${esc(o.error)}</error></testcase>`,
      )
      out.push('    <system-out/>', '    <system-err/>', '  </testsuite>')
      return out.join('\n') + '\n'
    }
    const r = o.report
    const cases: string[] = []
    let failures = 0
    let skipped = 0
    const notes: string[] = []
    for (const g of CHECK_GROUPS) {
      const vs = r.violations.filter((v) => v.group === g && (v.severity === 'error' || failOn === 'warning'))
      const warnings = r.violations.filter((v) => v.group === g && !vs.includes(v))
      const head = `    <testcase name="${g}" classname="${name}" time="0"`
      if (vs.length > 0) {
        failures++
        const body = vs.map((v) => `${v.severity} ${v.code} [${v.policyKey}]: ${v.message}`).join('\n')
        cases.push(`${head}><failure type="${vs[0]!.code}" message="${esc(vs[0]!.message)}">${esc(body)}</failure></testcase>`)
      } else if (r.checks[g] === 'skip') {
        skipped++
        cases.push(`${head}><skipped message="${esc(r.notes.filter((n) => n.startsWith(`${g}:`)).join('; '))}"/></testcase>`)
      } else cases.push(`${head}/>`)
      for (const w of warnings) notes.push(`warning ${w.code} [${w.policyKey}]: ${w.message}`)
    }
    const time = (r.durationMs / 1000).toFixed(3)
    out.push(
      `  <testsuite package="imgtool.validate" id="${id}" name="${name}" timestamp="${timestamp}" hostname="${host}" tests="${CHECK_GROUPS.length}" failures="${failures}" errors="0" skipped="${skipped}" time="${time}">`,
    )
    out.push('    <properties>')
    out.push(`      <property name="format" value="${esc(r.format)}"/>`)
    if (r.digest) out.push(`      <property name="sha256" value="${r.digest.hex}"/>`)
    out.push('    </properties>')
    out.push(...cases, notes.length > 0 ? `    <system-out>${esc(notes.join('\n'))}</system-out>` : '    <system-out/>', '    <system-err/>', '  </testsuite>')
    return out.join('\n') + '\n'
  }
}
