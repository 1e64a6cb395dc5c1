/** Qcow2Image.check(): the analysis of check.ts, as a CheckReport. */
import type { CheckOptions, CheckReport } from '../../../check/types.js'
import type { Qcow2State } from '../read/state.js'
import { analyzeQcow2 } from './check.js'

export async function checkQcow2(state: Qcow2State, options: CheckOptions = {}): Promise<CheckReport> {
  const a = await analyzeQcow2(state.device, { filename: state.filename, ...(options.signal ? { signal: options.signal } : {}) })
  return a.report
}
