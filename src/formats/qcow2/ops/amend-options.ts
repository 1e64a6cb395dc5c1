/**
 * qcow2 amend's -o options, parsed and checked as qemu-img amend does, and the list `amend -o help` prints. Kept
 * apart from the amender so that parsing options does not load the writer.
 */
import { UsageError } from '../../../errors.js'
import { parseSize } from '../../../util/size.js'

/** The options of `qemu-img amend -o`, parsed. */
export interface Qcow2AmendOptions {
  version?: 2 | 3
  /** new virtual size; 0 or absent: unchanged (as qemu) */
  size?: number
  lazyRefcounts?: boolean
  refcountBits?: number
  dataFile?: string
  dataFileRaw?: boolean
  backingFile?: string
  backingFormat?: string
  /** encrypt.* amend options were given */
  encryption?: boolean
}

/** Options qemu-img takes only at creation: its hint names them. */
const CREATE_ONLY = new Set([
  'encryption',
  'encrypt.format',
  'encrypt.key-secret',
  'encrypt.cipher-alg',
  'encrypt.cipher-mode',
  'encrypt.ivgen-alg',
  'encrypt.ivgen-hash-alg',
  'encrypt.hash-alg',
  'cluster_size',
  'extended_l2',
  'preallocation',
  'compression_type',
])
const ENCRYPT_AMEND = new Set(['encrypt.state', 'encrypt.keyslot', 'encrypt.old-secret', 'encrypt.new-secret', 'encrypt.iter-time'])
const KNOWN = new Set(['size', 'compat', 'backing_file', 'backing_fmt', 'data_file', 'data_file_raw', 'lazy_refcounts', 'refcount_bits'])

/** One option `qemu-img amend -o help` lists for qcow2 (its order: by name). */
export interface AmendOptionHelp {
  name: string
  type: string
  help: string
}

/** The options qemu-img 7.2 lists for `amend -f qcow2 -o help` (imgtool refuses the encrypt.* ones on use). */
export const QCOW2_AMEND_OPTIONS: readonly AmendOptionHelp[] = [
  { name: 'backing_file', type: 'str', help: 'File name of a base image' },
  { name: 'backing_fmt', type: 'str', help: 'Image format of the base image' },
  { name: 'compat', type: 'str', help: 'Compatibility level (v2 [0.10] or v3 [1.1])' },
  { name: 'data_file', type: 'str', help: 'File name of an external data file' },
  { name: 'data_file_raw', type: 'bool (on/off)', help: 'The external data file must stay valid as a raw image' },
  { name: 'encrypt.iter-time', type: 'num', help: 'Time to spend in PBKDF in milliseconds' },
  { name: 'encrypt.keyslot', type: 'num', help: 'Select a single keyslot to modify explicitly' },
  { name: 'encrypt.new-secret', type: 'str', help: 'New secret to set in the matching keyslots. Empty string to erase' },
  { name: 'encrypt.old-secret', type: 'str', help: 'Select all keyslots that match this password' },
  { name: 'encrypt.state', type: 'str', help: 'Select new state of affected keyslots (active/inactive)' },
  { name: 'lazy_refcounts', type: 'bool (on/off)', help: 'Postpone refcount updates' },
  { name: 'refcount_bits', type: 'num', help: 'Width of a reference count entry in bits' },
  { name: 'size', type: 'size', help: 'Virtual disk size' },
]

function parseBool(key: string, v: string): boolean {
  if (v === 'on' || v === 'yes' || v === 'true') return true
  if (v === 'off' || v === 'no' || v === 'false') return false
  throw new UsageError(`Parameter '${key}' expects 'on' or 'off'`)
}

/**
 * Parse `-o` options as qemu-img amend does (its words): unknown and
 * creation-only options, value types, then the checks qcow2_amend_options
 * makes while it reads them.
 */
export function parseAmendOptions(options: Record<string, string>): Qcow2AmendOptions {
  const o: Qcow2AmendOptions = {}
  for (const [k, v] of Object.entries(options)) {
    if (KNOWN.has(k) || ENCRYPT_AMEND.has(k)) {
      if (k === 'size') {
        try {
          o.size = v === '' ? 0 : parseSize(v)
        } catch {
          throw new UsageError(
            "Parameter 'size' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.",
          )
        }
      } else if (k === 'lazy_refcounts') o.lazyRefcounts = parseBool(k, v)
      else if (k === 'data_file_raw') o.dataFileRaw = parseBool(k, v)
      else if (k === 'refcount_bits') {
        if (!/^(0x[0-9a-f]+|[0-9]+)$/i.test(v)) throw new UsageError(`Parameter '${k}' expects a number`)
        o.refcountBits = Number(v)
      }
      continue
    }
    if (CREATE_ONLY.has(k)) throw new UsageError(`Invalid parameter '${k}'\nThis option is only supported for image creation`)
    throw new UsageError(`Invalid parameter '${k}'`)
  }
  // qcow2_amend_options' own checks, in the order of its option list
  if (Object.keys(options).some((k) => ENCRYPT_AMEND.has(k))) o.encryption = true
  if (options['compat'] !== undefined) {
    const c = options['compat']
    if (c === '0.10' || c === 'v2') o.version = 2
    else if (c === '1.1' || c === 'v3') o.version = 3
    else throw new UsageError(`Unknown compatibility level ${c}`)
  }
  if (options['backing_file'] !== undefined) o.backingFile = options['backing_file']
  if (options['backing_fmt'] !== undefined) o.backingFormat = options['backing_fmt']
  if (options['data_file'] !== undefined) o.dataFile = options['data_file']
  if (o.refcountBits !== undefined) {
    const b = o.refcountBits
    if (b <= 0 || b > 64 || (b & (b - 1)) !== 0) throw new UsageError('Refcount width must be a power of two and may not exceed 64 bits')
  }
  return o
}
