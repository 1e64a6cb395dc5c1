/**
 * Policy files (JSON or YAML) parsed with zod: a strict schema, so a wrong
 * key is an error naming the key and the file; `--print-schema` prints the
 * same schema as JSON Schema (zod 4's toJSONSchema) for editors.
 */
import { readFile } from 'node:fs/promises'
import { z } from 'zod'
import { parse as parseYaml } from 'yaml'
import {
  KNOWN_FORMATS,
  PRESET_NAMES,
  QCOW2_AUTOCLEAR,
  QCOW2_COMPATIBLE,
  QCOW2_INCOMPATIBLE,
  UsageError,
  VHD_SUBFORMATS,
  VMDK_CREATE_TYPES,
  type PolicyInput,
} from '../../index.js'

const size = z.number().int().nonnegative()
const formatName = z.enum(KNOWN_FORMATS)

export const policySchema = z
  .strictObject({
    $schema: z.string().optional().describe('the JSON Schema this file follows (ignored)'),
    extends: z.enum(PRESET_NAMES).optional().describe('a preset this policy starts from'),
    formats: z.array(formatName).optional().describe('allowed formats (deny by default: none)'),
    expectFormat: formatName.optional().describe('the declared format the file must be'),
    identity: z.strictObject({ allowPolyglot: z.boolean().optional() }).optional(),
    references: z
      .strictObject({
        backingFile: z.boolean().optional(),
        dataFile: z.boolean().optional(),
        protocolNames: z.boolean().optional(),
        parentDirNames: z.boolean().optional(),
        absoluteNames: z.boolean().optional(),
      })
      .optional()
      .describe('referenced files are reported, never opened; true allows the kind'),
    qcow2: z
      .strictObject({
        compat: z.array(z.enum(['0.10', '1.1'])).optional(),
        incompatibleFeatures: z.array(z.enum(QCOW2_INCOMPATIBLE)).optional(),
        compatibleFeatures: z.array(z.enum(QCOW2_COMPATIBLE)).optional(),
        autoclearFeatures: z.array(z.enum(QCOW2_AUTOCLEAR)).optional(),
        dirty: z.enum(['fail', 'warn', 'stale-refcounts-expected']).optional(),
        compressionTypes: z.array(z.enum(['zlib', 'zstd'])).optional(),
        encryption: z.boolean().optional(),
        maxSnapshots: size.optional(),
        maxBitmaps: size.optional(),
        refcountBits: z.array(z.union([z.literal(1), z.literal(2), z.literal(4), z.literal(8), z.literal(16), z.literal(32), z.literal(64)])).optional(),
        clusterSizes: z.array(size).optional(),
      })
      .optional(),
    vhd: z
      .strictObject({
        subformats: z.array(z.enum(VHD_SUBFORMATS)).optional(),
        fileSizeAlignment: size.optional(),
      })
      .optional()
      .describe('VHD disk types allowed; the file size minus the footer a multiple of fileSizeAlignment'),
    vmdk: z
      .strictObject({
        createTypes: z.array(z.enum(VMDK_CREATE_TYPES)).optional(),
        versions: z.array(z.union([z.literal(1), z.literal(2), z.literal(3)])).optional(),
      })
      .optional()
      .describe('VMDK descriptor createType values and hosted sparse header versions allowed'),
    sizes: z
      .strictObject({
        minVirtualSize: size.optional(),
        maxVirtualSize: size.optional(),
        virtualSizeAlignment: size.optional(),
        maxAllocationRatio: z.number().nonnegative().optional(),
        targetVolumeSize: size.optional(),
        targetOverheadPercent: z.number().nonnegative().optional(),
        maxTrailingBytes: size.optional(),
      })
      .optional(),
    structure: z.strictObject({ check: z.boolean().optional(), maxLeaks: size.optional() }).optional(),
    content: z
      .strictObject({
        digest: z.boolean().optional(),
        expectDigest: z
          .string()
          .regex(/^[0-9a-fA-F]{64}$/)
          .optional(),
        reference: z.string().optional(),
        partitions: z.enum(['off', 'check', 'require']).optional(),
      })
      .optional(),
    limits: z
      .strictObject({
        timeoutSeconds: z.number().positive().optional(),
        maxTableBytes: size.optional(),
        maxClusters: size.optional(),
        maxChainDepth: size.optional(),
        maxDataBytes: size.optional(),
        maxMetadataMemory: size.optional(),
      })
      .optional(),
    severity: z
      .record(z.string(), z.enum(['error', 'warning', 'off']))
      .optional()
      .describe('per violation code: error, warning or off'),
  })
  .describe('imgtool validate policy')

// the schema and the library's type must agree: a drift is a compile error here
type SchemaOut = z.infer<typeof policySchema>
const _agree = (p: SchemaOut): PolicyInput => {
  const { $schema: _s, ...rest } = p
  return rest
}
void _agree

/** The JSON Schema of policy files. */
export function policyJsonSchema(): Record<string, unknown> {
  return z.toJSONSchema(policySchema, { target: 'draft-2020-12' }) as Record<string, unknown>
}

/** Parse policy text (JSON or YAML, by extension; YAML is a superset of JSON) and validate it. */
export function parsePolicyText(text: string, file: string): PolicyInput {
  let data: unknown
  try {
    data = /\.json$/i.test(file) ? JSON.parse(text) : parseYaml(text)
  } catch (e) {
    throw new UsageError(`${file}: not valid ${/\.json$/i.test(file) ? 'JSON' : 'YAML'}: ${(e as Error).message}`, { file })
  }
  const r = policySchema.safeParse(data ?? {})
  if (!r.success) {
    const lines = r.error.issues.map((i) => {
      const at = i.path.join('.')
      if (i.code === 'unrecognized_keys') return `unknown key ${i.keys.map((k) => `'${at ? `${at}.` : ''}${k}'`).join(', ')}`
      return `${at || '(top)'}: ${i.message}`
    })
    throw new UsageError(`${file}: invalid policy: ${lines.join('; ')}`, { file })
  }
  const { $schema: _s, ...policy } = r.data
  return policy
}

export async function loadPolicyFile(file: string): Promise<PolicyInput> {
  let text: string
  try {
    text = await readFile(file, 'utf8')
  } catch (e) {
    throw new UsageError(`${file}: cannot read policy file: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`, { file })
  }
  return parsePolicyText(text, file)
}
