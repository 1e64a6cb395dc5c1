/**
 * Every violation code validate can report: stable names (scripts match on
 * them), the check group they belong to, the default severity and the policy
 * key that decides them. docs/validate.md renders this table; a test holds the
 * two equal.
 */
export type CheckGroup = 'identity' | 'references' | 'features' | 'sizes' | 'structure' | 'content' | 'limits'
export type ViolationSeverity = 'error' | 'warning'

export interface CodeInfo {
  group: CheckGroup
  severity: ViolationSeverity
  key: string
  summary: string
}

export const CODES = {
  FORMAT_NOT_ALLOWED: { group: 'identity', severity: 'error', key: 'formats', summary: 'the detected format is not in the allow list' },
  FORMAT_MISMATCH: { group: 'identity', severity: 'error', key: 'expectFormat', summary: 'the detected format differs from the declared one' },
  UNSUPPORTED_FORMAT: {
    group: 'identity',
    severity: 'error',
    key: 'formats',
    summary: 'a format imgtool cannot read yet (VHDX, ISO): not validated',
  },
  POLYGLOT: { group: 'identity', severity: 'error', key: 'identity.allowPolyglot', summary: 'more than one format signature in the file' },
  TRUNCATED: { group: 'identity', severity: 'error', key: 'identity', summary: 'the file ends before a structure its header names' },
  HEADER_INVALID: { group: 'identity', severity: 'error', key: 'identity', summary: 'the header cannot be parsed (the parser names the field)' },
  VERSION_NOT_ALLOWED: { group: 'identity', severity: 'error', key: 'qcow2.compat', summary: 'format version (qcow2 compat) not allowed' },
  VMDK_VERSION: { group: 'identity', severity: 'error', key: 'vmdk.versions', summary: 'VMDK sparse header version not allowed' },
  VMDK_DESCRIPTOR: {
    group: 'identity',
    severity: 'error',
    key: 'identity',
    summary: "the VMDK descriptor breaks the format's strict grammar (the line is named)",
  },
  BACKING_FILE: { group: 'references', severity: 'error', key: 'references.backingFile', summary: 'the image names a backing file' },
  DATA_FILE: { group: 'references', severity: 'error', key: 'references.dataFile', summary: 'the image names an external data file (data_file_raw included)' },
  EXTENT_FILE: { group: 'references', severity: 'error', key: 'references.dataFile', summary: 'a VMDK descriptor names an extent in another file' },
  PROTOCOL_NAME: {
    group: 'references',
    severity: 'error',
    key: 'references.protocolNames',
    summary: 'a referenced name selects a protocol (json:, nbd:, file:...)',
  },
  PARENT_DIR_NAME: { group: 'references', severity: 'error', key: 'references.parentDirNames', summary: "a referenced name contains '..'" },
  ABSOLUTE_NAME: { group: 'references', severity: 'error', key: 'references.absoluteNames', summary: 'a referenced name is an absolute path' },
  UNKNOWN_FEATURE: { group: 'features', severity: 'error', key: 'qcow2.incompatibleFeatures', summary: 'a feature bit no specification defines' },
  FEATURE_NOT_ALLOWED: { group: 'features', severity: 'error', key: 'qcow2.*Features', summary: 'a known feature bit the policy does not allow' },
  CORRUPT_BIT: { group: 'features', severity: 'error', key: 'qcow2.incompatibleFeatures', summary: 'the image is marked corrupt' },
  DIRTY_BIT: { group: 'features', severity: 'error', key: 'qcow2.dirty', summary: 'the image is marked dirty (refcounts may be stale)' },
  COMPRESSION_TYPE: { group: 'features', severity: 'error', key: 'qcow2.compressionTypes', summary: 'compression type not allowed' },
  ENCRYPTED: { group: 'features', severity: 'error', key: 'qcow2.encryption', summary: 'the guest data is encrypted' },
  SNAPSHOTS: { group: 'features', severity: 'error', key: 'qcow2.maxSnapshots', summary: 'more internal snapshots than allowed' },
  BITMAPS: { group: 'features', severity: 'error', key: 'qcow2.maxBitmaps', summary: 'more persistent bitmaps than allowed' },
  BITMAP_IN_USE: { group: 'features', severity: 'error', key: 'qcow2.maxBitmaps', summary: 'a persistent bitmap is in use or inconsistent' },
  REFCOUNT_WIDTH: { group: 'features', severity: 'error', key: 'qcow2.refcountBits', summary: 'refcount width not allowed' },
  CLUSTER_SIZE: { group: 'features', severity: 'error', key: 'qcow2.clusterSizes', summary: 'cluster size not allowed' },
  VMDK_CREATE_TYPE: {
    group: 'features',
    severity: 'error',
    key: 'vmdk.createTypes',
    summary: "VMDK createType not allowed, or not the layout of the file's sparse header",
  },
  VHD_SUBFORMAT: { group: 'features', severity: 'error', key: 'vhd.subformats', summary: 'VHD disk type (fixed, dynamic, differencing) not allowed' },
  VIRTUAL_SIZE_BOUNDS: { group: 'sizes', severity: 'error', key: 'sizes.minVirtualSize/maxVirtualSize', summary: 'virtual size outside the bounds' },
  VIRTUAL_SIZE_ALIGNMENT: { group: 'sizes', severity: 'error', key: 'sizes.virtualSizeAlignment', summary: 'virtual size not a multiple of the alignment' },
  FILE_SIZE_LAYOUT: { group: 'sizes', severity: 'warning', key: 'sizes.maxTrailingBytes', summary: 'the file is longer than its layout uses' },
  VHD_FILE_SIZE: {
    group: 'sizes',
    severity: 'error',
    key: 'vhd.fileSizeAlignment',
    summary: 'VHD file size is not a multiple of the alignment plus the 512-byte footer',
  },
  ALLOCATION_RATIO: { group: 'sizes', severity: 'error', key: 'sizes.maxAllocationRatio', summary: 'guest data bytes per file byte above the limit' },
  TARGET_VOLUME: { group: 'sizes', severity: 'error', key: 'sizes.targetVolumeSize', summary: 'the virtual size plus overhead does not fit the target volume' },
  CHECK_CORRUPTIONS: { group: 'structure', severity: 'error', key: 'structure.check', summary: 'check found corruptions' },
  CHECK_LEAKS: { group: 'structure', severity: 'error', key: 'structure.maxLeaks', summary: 'check found more leaked clusters than allowed' },
  CHECK_FAILED: { group: 'structure', severity: 'error', key: 'structure.check', summary: 'check could not complete' },
  DIGEST_MISMATCH: { group: 'content', severity: 'error', key: 'content.expectDigest', summary: 'the guest-bytes SHA-256 differs from the expected one' },
  REFERENCE_MISMATCH: { group: 'content', severity: 'error', key: 'content.reference', summary: 'the guest bytes differ from the reference image' },
  CONTENT_SKIPPED: {
    group: 'content',
    severity: 'warning',
    key: 'content.digest',
    summary: 'content not read: the guest bytes depend on a file validation does not open',
  },
  PARTITION_TABLE: {
    group: 'content',
    severity: 'error',
    key: 'content.partitions',
    summary: 'MBR/GPT damaged: bad CRC, a partition outside the disk, overlaps',
  },
  NO_PARTITION_TABLE: { group: 'content', severity: 'error', key: 'content.partitions', summary: 'no MBR or GPT where the policy requires one' },
  LIMIT_TABLE_SIZE: { group: 'limits', severity: 'error', key: 'limits.maxTableBytes', summary: 'a metadata table larger than the limit: not read' },
  LIMIT_CLUSTERS: { group: 'limits', severity: 'error', key: 'limits.maxClusters', summary: 'more clusters than the check may track' },
  LIMIT_MEMORY: {
    group: 'limits',
    severity: 'error',
    key: 'limits.maxMetadataMemory',
    summary: 'the structural check would hold more metadata in memory than the limit: not checked',
  },
  LIMIT_DATA_BYTES: { group: 'limits', severity: 'error', key: 'limits.maxDataBytes', summary: 'more guest data than the digest may read' },
  LIMIT_TIMEOUT: { group: 'limits', severity: 'error', key: 'limits.timeoutSeconds', summary: 'validation ran out of time' },
} as const satisfies Record<string, CodeInfo>

export type ViolationCode = keyof typeof CODES

export const CHECK_GROUPS: readonly CheckGroup[] = ['identity', 'references', 'features', 'sizes', 'structure', 'content', 'limits']
