/** validate's command-line options, the policy they name, and one image validated: shared by run.ts, manifest.ts and worker.ts. */
import { PRESET_NAMES, UsageError, isImgtoolError, resolvePolicy, validate, type Policy, type PolicyInput, type PresetName } from '../../index.js'
import type { Outcome } from './render.js'

// plain checks, not zod: loading zod costs about 30 ms of every run (zod loads with a policy file or a manifest)
const OUTPUTS = ['human', 'json', 'junit', 'sarif'] as const
const FAIL_ON = ['error', 'warning'] as const

export interface ValidateCliOptions {
  policy?: string | undefined
  preset?: PresetName | undefined
  expectFormat?: string | undefined
  output: (typeof OUTPUTS)[number]
  failOn: (typeof FAIL_ON)[number]
  manifest?: string | undefined
  jobs: number
  printSchema?: boolean | undefined
  images: string[]
}

const oneOf = <T extends string>(list: readonly T[], v: unknown): v is T => typeof v === 'string' && (list as readonly string[]).includes(v)
const str = (v: unknown): string | undefined => (typeof v === 'string' ? v : undefined)

export function parseValidateOptions(args: string[], opts: Record<string, unknown>): ValidateCliOptions {
  const problems: string[] = []
  const output = opts['json'] ? 'json' : opts['output']
  if (!oneOf(OUTPUTS, output)) problems.push('--output must be human, json, junit or sarif')
  if (!oneOf(FAIL_ON, opts['failOn'])) problems.push('--fail-on must be error or warning')
  if (opts['preset'] !== undefined && !oneOf(PRESET_NAMES, opts['preset'])) problems.push(`--preset must be one of ${PRESET_NAMES.join(', ')}`)
  const jobsText = String(opts['jobs'] ?? '')
  const jobs = /^\s*\d+\s*$/.test(jobsText) ? Number(jobsText) : NaN
  if (!(jobs >= 1 && jobs <= 64)) problems.push('--jobs must be a whole number from 1 to 64')
  if (problems.length > 0) throw new UsageError(problems.join('; '))
  const o: ValidateCliOptions = {
    policy: str(opts['policy']),
    preset: opts['preset'] as PresetName | undefined,
    expectFormat: str(opts['expectFormat']),
    output: output as ValidateCliOptions['output'],
    failOn: opts['failOn'] as ValidateCliOptions['failOn'],
    manifest: str(opts['manifest']),
    jobs,
    printSchema: opts['printSchema'] === true ? true : undefined,
    images: args,
  }
  if (!o.printSchema && o.images.length === 0 && o.manifest === undefined) throw new UsageError('Expecting at least one image file name (or --manifest FILE)')
  return o
}

/** The policy the options name: --policy FILE, with --preset as its `extends` when given. */
export async function policyOf(o: Pick<ValidateCliOptions, 'policy' | 'preset' | 'expectFormat'>): Promise<Policy> {
  // the policy-file module (and the yaml parser) loads only when a file is named
  const input: PolicyInput = o.policy !== undefined ? await (await import('./policy-file.js')).loadPolicyFile(o.policy) : {}
  if (o.preset !== undefined) input.extends = o.preset
  if (o.expectFormat !== undefined) input.expectFormat = o.expectFormat
  return resolvePolicy(input)
}

export async function validateOne(file: string, policy: Policy): Promise<Outcome> {
  try {
    return { file, report: await validate(file, policy) }
  } catch (e) {
    if (!isImgtoolError(e) && !(e instanceof Error && 'code' in e)) throw e
    return { file, error: (e as Error).message }
  }
}
