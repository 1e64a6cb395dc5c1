/** Numbers from the qcow2 spec (docs/interop/qcow2.txt) and QEMU's limits. */
export const QCOW2_MAGIC = 0x514649fb // "QFI\xfb"
export const HEADER_V2_LENGTH = 72
export const HEADER_V3_MIN_LENGTH = 104

export const MIN_CLUSTER_BITS = 9
export const MAX_CLUSTER_BITS = 21

export const INCOMPAT_DIRTY = 1 << 0
export const INCOMPAT_CORRUPT = 1 << 1
export const INCOMPAT_DATA_FILE = 1 << 2
export const INCOMPAT_COMPRESSION = 1 << 3
export const INCOMPAT_EXTL2 = 1 << 4
export const INCOMPAT_KNOWN = 0x1f

export const COMPAT_LAZY_REFCOUNTS = 1 << 0
export const AUTOCLEAR_BITMAPS = 1 << 0
export const AUTOCLEAR_DATA_FILE_RAW = 1 << 1
export const AUTOCLEAR_KNOWN = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW

export const EXT_END = 0x00000000
export const EXT_BACKING_FORMAT = 0xe2792aca
export const EXT_FEATURE_TABLE = 0x6803f857
export const EXT_BITMAPS = 0x23852875
export const EXT_CRYPTO = 0x0537be77
export const EXT_DATA_FILE = 0x44415441

export const COMPRESSION_ZLIB = 0
export const COMPRESSION_ZSTD = 1

export const CRYPT_NONE = 0
export const CRYPT_AES = 1
export const CRYPT_LUKS = 2

/** QEMU limits */
export const MAX_L1_BYTES = 32 * 1024 * 1024
export const MAX_REFTABLE_BYTES = 8 * 1024 * 1024
export const MAX_SNAPSHOTS = 65536
export const MAX_SNAPSHOT_EXTRA_DATA = 1024
export const MAX_SNAPSHOT_TABLE_BYTES = 64 * 1024 * 1024
export const MAX_BACKING_FILE_NAME = 1023
/** host offsets above 2^56 cannot be expressed in L1/L2 entries */
export const MAX_HOST_OFFSET = 2 ** 56

export const SUBCLUSTERS_PER_CLUSTER = 32

/** persistent bitmaps: QEMU's limits on the directory */
export const MAX_BITMAPS = 65535
export const MAX_BITMAP_DIRECTORY_SIZE = 1024 * MAX_BITMAPS
