/**
 * What `validate` allows. Deny by default: the base policy (no preset) allows
 * no format, no reference, no optional feature; a policy or preset names what
 * it allows. Policies are plain data: the CLI parses files with zod
 * (src/cli/validate/policy-file.ts), the library merges and fills defaults here.
 */

export const PRESET_NAMES = ['openstack', 'kubevirt', 'azure', 'aws', 'vsphere', 'produced'] as const
export type PresetName = (typeof PRESET_NAMES)[number]

export const KNOWN_FORMATS = ['raw', 'qcow2', 'dmsnap', 'vhd', 'vhdx', 'vmdk', 'iso'] as const
export type KnownFormat = (typeof KNOWN_FORMATS)[number]

/** qcow2 feature names (docs/interop/qcow2.txt), by table */
export const QCOW2_INCOMPATIBLE = ['dirty', 'corrupt', 'external-data-file', 'compression-type', 'extended-l2'] as const
export const QCOW2_COMPATIBLE = ['lazy-refcounts'] as const
export const QCOW2_AUTOCLEAR = ['bitmaps', 'data-file-raw'] as const
export type Qcow2IncompatibleFeature = (typeof QCOW2_INCOMPATIBLE)[number]
export type Qcow2CompatibleFeature = (typeof QCOW2_COMPATIBLE)[number]
export type Qcow2AutoclearFeature = (typeof QCOW2_AUTOCLEAR)[number]

/** VHD subformats (footer disk type 2, 3, 4) */
export const VHD_SUBFORMATS = ['fixed', 'dynamic', 'differencing'] as const
export type VhdSubformat = (typeof VHD_SUBFORMATS)[number]

/** VMDK createType values (VMware Virtual Disk Format 5.0, and QEMU's vmdk driver) */
export const VMDK_CREATE_TYPES = [
  'monolithicSparse',
  'monolithicFlat',
  'streamOptimized',
  'twoGbMaxExtentSparse',
  'twoGbMaxExtentFlat',
  'vmfs',
  'vmfsSparse',
  'vmfsThin',
  'vmfsRaw',
  'vmfsRDM',
  'vmfsPassthroughRawDeviceMap',
  'fullDevice',
  'partitionedDevice',
  'custom',
  'seSparse',
  'vsanSparse',
] as const
export type VmdkCreateType = (typeof VMDK_CREATE_TYPES)[number]
/** hosted sparse extent header versions (1 plain, 2 zeroed grains, 3 streamOptimized) */
export type VmdkVersion = 1 | 2 | 3

export type DirtyRule = 'fail' | 'warn' | 'stale-refcounts-expected'
export type PartitionRule = 'off' | 'check' | 'require'

export interface Limits {
  /** wall-clock budget for one image (seconds) */
  timeoutSeconds: number
  /** largest metadata table (L1, refcount table, snapshot table, bitmap directory) read, in bytes */
  maxTableBytes: number
  /** most clusters the structural check may track (its in-memory refcount array) */
  maxClusters: number
  /** backing chain depth; validation never opens a chain, so a reference counts as depth 1 */
  maxChainDepth: number
  /** most guest bytes the digest reads (decompressed); beyond it the digest stops with a violation */
  maxDataBytes: number
  /**
   * most metadata the structural check may hold in memory at once (tables x entry width: L1,
   * refcount table, the in-memory refcount array, tables in flight; a VHD's BAT), computed from
   * the header before anything is read
   */
  maxMetadataMemory: number
}

export interface Policy {
  /** detected format must be one of these */
  formats: string[]
  /** the declared format (--expect-format, manifest `format`) */
  expectFormat?: string | undefined
  identity: {
    /** several formats' signatures in one file */
    allowPolyglot: boolean
  }
  references: {
    backingFile: boolean
    dataFile: boolean
    /** json:, nbd:, file: ... names; checked even when the reference kind is allowed */
    protocolNames: boolean
    parentDirNames: boolean
    absoluteNames: boolean
  }
  qcow2: {
    /** compat levels: '0.10' (version 2) and '1.1' (version 3) */
    compat: Array<'0.10' | '1.1'>
    incompatibleFeatures: Qcow2IncompatibleFeature[]
    compatibleFeatures: Qcow2CompatibleFeature[]
    autoclearFeatures: Qcow2AutoclearFeature[]
    dirty: DirtyRule
    compressionTypes: Array<'zlib' | 'zstd'>
    encryption: boolean
    maxSnapshots: number
    maxBitmaps: number
    refcountBits: number[]
    clusterSizes: number[]
  }
  vhd: {
    /** allowed disk types: fixed (2), dynamic (3), differencing (4, names a parent) */
    subformats: VhdSubformat[]
    /** the file size minus the 512-byte footer is a multiple of this (Azure: 1 MiB); 0 = no rule */
    fileSizeAlignment: number
  }
  vmdk: {
    /** allowed descriptor createType values (a hosted sparse file's header must agree with it) */
    createTypes: VmdkCreateType[]
    /** allowed hosted sparse extent header versions */
    versions: VmdkVersion[]
  }
  sizes: {
    minVirtualSize: number
    maxVirtualSize: number
    /** the virtual size is a multiple of this */
    virtualSizeAlignment: number
    /** guest data bytes per file byte (a decompression bomb guard); 0 = no limit */
    maxAllocationRatio: number
    /** the image must fit a volume of this many bytes (0 = no target) */
    targetVolumeSize: number
    /** overhead kept free on the target volume, in percent of the virtual size */
    targetOverheadPercent: number
    /** bytes past the last cluster the layout uses */
    maxTrailingBytes: number
  }
  structure: {
    check: boolean
    maxLeaks: number
  }
  content: {
    digest: boolean
    /** expected layout-independent SHA-256 (hex) of the guest bytes */
    expectDigest?: string | undefined
    /** a reference image (any format) the guest bytes must equal; opened read-only */
    reference?: string | undefined
    partitions: PartitionRule
  }
  limits: Limits
  /** per-code severity override; 'off' drops the code */
  severity: Record<string, 'error' | 'warning' | 'off'>
}

/** A policy as written in a file: every key optional, `extends` a preset. */
export type PolicyInput = DeepPartial<Omit<Policy, 'severity'>> & {
  extends?: PresetName | undefined
  severity?: Record<string, 'error' | 'warning' | 'off'> | undefined
}

type DeepPartial<T> = { [K in keyof T]?: T[K] extends unknown[] ? T[K] : T[K] extends object ? DeepPartial<T[K]> : T[K] }

const MiB = 1024 * 1024
const GiB = 1024 * MiB
const TiB = 1024 * GiB

export const DEFAULT_LIMITS: Limits = {
  timeoutSeconds: 300,
  maxTableBytes: 32 * MiB,
  maxClusters: 64 * 1024 * 1024,
  maxChainDepth: 0,
  maxDataBytes: 4 * TiB,
  maxMetadataMemory: 256 * MiB,
}

/** The base every policy starts from: deny by default. */
export function basePolicy(): Policy {
  return {
    formats: [],
    identity: { allowPolyglot: false },
    references: { backingFile: false, dataFile: false, protocolNames: false, parentDirNames: false, absoluteNames: false },
    qcow2: {
      compat: ['1.1'],
      incompatibleFeatures: [],
      compatibleFeatures: [],
      autoclearFeatures: [],
      dirty: 'fail',
      compressionTypes: ['zlib'],
      encryption: false,
      maxSnapshots: 0,
      maxBitmaps: 0,
      refcountBits: [16],
      clusterSizes: [65536],
    },
    vhd: { subformats: ['fixed', 'dynamic'], fileSizeAlignment: 0 },
    // the layouts imgtool reads and that name no parent (extent files are references of their own)
    vmdk: { createTypes: ['monolithicSparse', 'streamOptimized', 'monolithicFlat', 'twoGbMaxExtentSparse', 'twoGbMaxExtentFlat'], versions: [1, 2, 3] },
    sizes: {
      minVirtualSize: 512,
      maxVirtualSize: 16 * TiB,
      virtualSizeAlignment: 512,
      maxAllocationRatio: 1024,
      targetVolumeSize: 0,
      targetOverheadPercent: 0,
      maxTrailingBytes: 0,
    },
    structure: { check: true, maxLeaks: 0 },
    content: { digest: true, partitions: 'check' },
    limits: { ...DEFAULT_LIMITS },
    severity: {},
  }
}

/** Deep merge: objects merge key by key, arrays and scalars replace. */
export function mergePolicy<T extends object>(base: T, over: object): T {
  const out: Record<string, unknown> = { ...(base as Record<string, unknown>) }
  for (const [k, v] of Object.entries(over)) {
    if (v === undefined) continue
    const cur = out[k]
    if (v !== null && typeof v === 'object' && !Array.isArray(v) && cur !== null && typeof cur === 'object' && !Array.isArray(cur)) {
      out[k] = mergePolicy(cur as object, v as object)
    } else out[k] = Array.isArray(v) ? [...(v as unknown[])] : v
  }
  return out as T
}
