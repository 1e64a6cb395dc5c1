/**
 * SARIF 2.1.0: one run, a rule per violation code (from the documented
 * table), a result per violation located in the image file by byte offset.
 * An image that could not be validated is a toolExecutionNotification.
 */
import { pathToFileURL } from 'node:url'
import { CODES, type Policy, type ViolationCode } from '../../index.js'
import type { FailOn, Outcome } from './render.js'

export function sarif(outcomes: readonly Outcome[], failOn: FailOn, policy: Policy): Record<string, unknown> {
  const ids = Object.keys(CODES) as ViolationCode[]
  const rules = ids.map((id) => ({
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
  const results = outcomes.flatMap((o) =>
    'error' in o
      ? []
      : o.report.violations.map((v) => ({
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
        })),
  )
  const notifications = outcomes.flatMap((o) => ('error' in o ? [{ level: 'error', message: { text: `${o.file}: could not validate: ${o.error}` } }] : []))
  return {
    $schema: 'https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json',
    version: '2.1.0',
    runs: [
      {
        tool: { driver: { name: 'imgtool validate', rules } },
        artifacts: outcomes.map((o) => ({ location: { uri: uriOf(o.file) }, ...('report' in o ? { length: o.report.fileSize } : {}) })),
        invocations: [{ executionSuccessful: notifications.length === 0, toolExecutionNotifications: notifications }],
        results,
        properties: { formats: policy.formats },
      },
    ],
  }
}

function uriOf(file: string): string {
  return file.startsWith('/') ? pathToFileURL(file).href : file.split('/').map(encodeURIComponent).join('/')
}
