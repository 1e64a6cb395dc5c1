/** The direct memory limit: the metadata a check would hold, computed from a header before any table is read. */
import type { Policy } from './policy.js'
import type { ViolationSink } from './report.js'

/** Reports LIMIT_MEMORY and returns true when `bytes` is above limits.maxMetadataMemory. */
export function overMemoryLimit(bytes: number, what: string, at: { structure: string; offset: number }, policy: Policy, sink: ViolationSink): boolean {
  const max = policy.limits.maxMetadataMemory
  if (bytes <= max) return false
  sink.add('LIMIT_MEMORY', `the check would hold ${bytes} bytes of metadata (${what}), more than limits.maxMetadataMemory ${max}: not checked`, at)
  return true
}
