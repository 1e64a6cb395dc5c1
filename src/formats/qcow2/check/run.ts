/** Qcow2Image.check(): the analysis of check.ts, as a CheckReport. */
import type { CheckOptions, CheckReport } from '../../../check/types.js'
import { analyzeQcow2 } from './check.js'
import type { Qcow2Image } from '../image.js'

export async function checkQcow2(img: Qcow2Image, _options: CheckOptions = {}): Promise<CheckReport> {
  const a = await analyzeQcow2(img.device, { filename: img.filename })
  return a.report
}
