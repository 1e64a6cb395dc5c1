/** Resolving a policy: the deny-by-default base, the preset it extends, then its own keys. */
import { UsageError } from '../errors.js'
import { basePolicy, mergePolicy, PRESET_NAMES, type Policy, type PolicyInput, type PresetName } from './policy.js'
import { PRESETS } from './presets.js'

/** A policy ready to apply: the base, the preset it extends, then its own keys. */
export async function resolvePolicy(input: PolicyInput | PresetName = {}): Promise<Policy> {
  const given: PolicyInput = typeof input === 'string' ? { extends: input } : input
  let policy = basePolicy()
  if (given.extends !== undefined) {
    const preset = PRESETS[given.extends]
    if (!preset) throw new UsageError(`unknown preset '${String(given.extends)}' (known: ${PRESET_NAMES.join(', ')})`)
    policy = mergePolicy(policy, preset)
  }
  const { extends: _ignored, ...own } = given
  return mergePolicy(policy, own)
}
