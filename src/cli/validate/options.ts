/** validate's command-line options (zod), the policy they name, and one image validated: shared by run.ts, manifest.ts and worker.ts. */
import { z } from 'zod'
import { PRESET_NAMES, UsageError, isImgtoolError, resolvePolicy, validate, type Policy, type PolicyInput } from '../../index.js'
import type { Outcome } from './render.js'

const optionsSchema = z.object({
  policy: z.string().optional(),
  preset: z.enum(PRESET_NAMES, { error: () => `--preset must be one of ${PRESET_NAMES.join(', ')}` }).optional(),
  expectFormat: z.string().optional(),
  output: z.enum(['human', 'json', 'junit', 'sarif'], { error: () => '--output must be human, json, junit or sarif' }),
  failOn: z.enum(['error', 'warning'], { error: () => '--fail-on must be error or warning' }),
  manifest: z.string().optional(),
  jobs: z.coerce
    .number({ error: () => '--jobs must be a whole number from 1 to 64' })
    .int()
    .min(1)
    .max(64),
  printSchema: z.boolean().optional(),
})

export type ValidateCliOptions = z.infer<typeof optionsSchema> & { images: string[] }

export function parseValidateOptions(args: string[], opts: Record<string, unknown>): ValidateCliOptions {
  const r = optionsSchema.safeParse({ ...opts, output: opts['json'] ? 'json' : opts['output'] })
  if (!r.success) throw new UsageError(r.error.issues.map((i) => i.message).join('; '))
  const o = { ...r.data, images: args }
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
