/** validate: the library entry of this folder (the public API re-exports it from src/index.ts). */
export {
  resolvePolicy,
  basePolicy,
  mergePolicy,
  PRESET_NAMES,
  KNOWN_FORMATS,
  QCOW2_INCOMPATIBLE,
  QCOW2_COMPATIBLE,
  QCOW2_AUTOCLEAR,
  DEFAULT_LIMITS,
  type Policy,
  type PolicyInput,
  type PresetName,
  type Limits,
} from './policy.js'
export { PRESETS } from './presets.js'
