/** validate: the library entry of this folder (the public API re-exports it from src/index.ts). */
export { validate, type ValidateOptions } from './validate.js'
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
