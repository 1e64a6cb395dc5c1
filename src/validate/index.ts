/** validate: the library entry of this folder (the public API re-exports it from src/index.ts). */
import type { ValidateOptions } from './validate.js'
import type { Policy, PolicyInput, PresetName } from './policy.js'
import type { ValidationReport } from './report.js'

export type { ValidateOptions }

/**
 * Validate one image file against a policy (a preset name, policy input or a resolved policy) and return the
 * report. The engine and its format rules load on the first call, so importing the package (and every command that
 * is not validate) does not pay for them.
 */
export async function validate(path: string, policy: PolicyInput | PresetName | Policy = {}, o: ValidateOptions = {}): Promise<ValidationReport> {
  const engine = await import('./validate.js')
  return engine.validate(path, policy, o)
}
export {
  basePolicy,
  mergePolicy,
  PRESET_NAMES,
  KNOWN_FORMATS,
  QCOW2_INCOMPATIBLE,
  QCOW2_COMPATIBLE,
  QCOW2_AUTOCLEAR,
  DEFAULT_LIMITS,
  VHD_SUBFORMATS,
  VMDK_CREATE_TYPES,
  type Policy,
  type PolicyInput,
  type PresetName,
  type Limits,
  type VhdSubformat,
  type VmdkCreateType,
  type VmdkVersion,
} from './policy.js'
export { PRESETS } from './presets.js'
export { resolvePolicy } from './resolve.js'
export { CODES, CHECK_GROUPS, type CheckGroup, type CodeInfo, type ViolationCode, type ViolationSeverity } from './codes.js'
export type { ValidationReport, Violation, CheckStatus, GuestDigest } from './report.js'
