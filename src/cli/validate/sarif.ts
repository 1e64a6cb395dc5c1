/**
 * SARIF 2.1.0: one run, a rule per violation code (from the documented
 * table), a result per violation located in the image file by byte offset.
 * An image that could not be validated is a toolExecutionNotification.
 */
import { pathToFileURL } from 'node:url'
import { CODES, type Policy, type ViolationCode } from '../../index.js'
import type { FailOn, Outcome } from './render.js'

const ids = Object.keys(CODES) as ViolationCode[]

function rules(): Array<Record<string, unknown>> {
  return ids.map((id) => ({
    id,
    name: id
      .toLowerCase()
      .split('_')
      .map((w, i) => (i === 0 ? w : w[0]!.toUpperCase() + w.slice(1)))
      .join(''),
    shortDescription: { text: CODES[id].summary },
    defaultConfiguration: { level: CODES[id].severity === 'error' ? 'error' : 'warning' },
    properties: { group: CODES[id].group, policyKey: CODES[id].key },
  }))
}

function results(o: Outcome, failOn: FailOn): Array<Record<string, unknown>> {
  if ('error' in o) return []
  return o.report.violations.map((v) => ({
    ruleId: v.code,
    ruleIndex: ids.indexOf(v.code),
    level: v.severity === 'error' ? 'error' : failOn === 'warning' ? 'error' : 'warning',
    message: { text: v.message },
    locations: [
      {
        physicalLocation: {
          artifactLocation: { uri: uriOf(o.file) },
          ...(v.offset !== undefined ? { region: { byteOffset: v.offset, byteLength: 1 } } : {}),
        },
        logicalLocations: v.structure !== undefined ? [{ name: v.structure, kind: 'member' }] : [],
      },
    ],
    properties: { policyKey: v.policyKey, group: v.group },
  }))
}

const SCHEMA = 'https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json'

export function sarif(outcomes: readonly Outcome[], failOn: FailOn, policy: Policy): Record<string, unknown> {
  const notifications = outcomes.flatMap((o) => ('error' in o ? [notification(o.file, o.error)] : []))
  return {
    $schema: SCHEMA,
    version: '2.1.0',
    runs: [
      {
        tool: { driver: { name: 'imgtool validate', rules: rules() } },
        artifacts: outcomes.map(artifact),
        invocations: [{ executionSuccessful: notifications.length === 0, toolExecutionNotifications: notifications }],
        results: outcomes.flatMap((o) => results(o, failOn)),
        properties: { formats: policy.formats },
      },
    ],
  }
}

const notification = (file: string, error: string): Record<string, unknown> => ({ level: 'error', message: { text: `${file}: could not validate: ${error}` } })
const artifact = (o: Outcome): Record<string, unknown> => ({ location: { uri: uriOf(o.file) }, ...('report' in o ? { length: o.report.fileSize } : {}) })

/**
 * One SARIF run over many images, written as they finish: the results are
 * streamed; what the run says after them (an artifact per image, the
 * notifications of images that could not be validated) is kept until end().
 */
export class SarifWriter {
  private first = true
  private readonly artifacts: Array<Record<string, unknown>> = []
  private readonly notifications: Array<Record<string, unknown>> = []
  constructor(
    private readonly failOn: FailOn,
    private readonly policy: Policy,
  ) {}

  head(): string {
    const tool = JSON.stringify({ driver: { name: 'imgtool validate', rules: rules() } })
    return `{"$schema":${JSON.stringify(SCHEMA)},"version":"2.1.0","runs":[{"tool":${tool},"results":[\n`
  }

  add(o: Outcome): string {
    this.artifacts.push(artifact(o))
    if ('error' in o) this.notifications.push(notification(o.file, o.error))
    const rs = results(o, this.failOn)
    if (rs.length === 0) return ''
    const text = rs.map((r) => JSON.stringify(r)).join(',\n')
    const sep = this.first ? '' : ',\n'
    this.first = false
    return sep + text
  }

  end(): string {
    const invocations = [{ executionSuccessful: this.notifications.length === 0, toolExecutionNotifications: this.notifications }]
    return `\n],"artifacts":${JSON.stringify(this.artifacts)},"invocations":${JSON.stringify(invocations)},"properties":${JSON.stringify({ formats: this.policy.formats })}}]}\n`
  }
}

function uriOf(file: string): string {
  return file.startsWith('/') ? pathToFileURL(file).href : file.split('/').map(encodeURIComponent).join('/')
}
