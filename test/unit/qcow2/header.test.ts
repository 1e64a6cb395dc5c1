import { describe, expect, it } from 'vitest'
import { CorruptImageError, UnsupportedFeatureError, WrongFormatError } from '../../../src/errors.js'
import * as C from '../../../src/formats/qcow2/spec/constants.js'
import { l1EntriesNeeded, l2Entries, l2EntrySize, readHeader, type Qcow2Header } from '../../../src/formats/qcow2/spec/header.js'
import { MemoryDevice } from '../../../src/io/memory-device.js'

interface Fields {
  version: number
  backingFileOffset: bigint
  backingFileSize: number
  clusterBits: number
  size: bigint
  cryptMethod: number
  l1Size: number
  l1TableOffset: bigint
  refcountTableOffset: bigint
  refcountTableClusters: number
  nbSnapshots: number
  snapshotsOffset: bigint
  incompatible: bigint
  compatible: bigint
  autoclear: bigint
  refcountOrder: number
  headerLength: number
  compressionType: number
}

const DEFAULTS: Fields = {
  version: 3,
  backingFileOffset: 0n,
  backingFileSize: 0,
  clusterBits: 16,
  size: 1n << 30n,
  cryptMethod: 0,
  l1Size: 2,
  l1TableOffset: 0x30000n,
  refcountTableOffset: 0x10000n,
  refcountTableClusters: 1,
  nbSnapshots: 0,
  snapshotsOffset: 0n,
  incompatible: 0n,
  compatible: 0n,
  autoclear: 0n,
  refcountOrder: 4,
  headerLength: 112,
  compressionType: 0,
}

type Ext = { magic: number; data: Uint8Array }

function header(f: Partial<Fields> = {}, exts: Ext[] = [], tail?: { at: number; bytes: Uint8Array }): MemoryDevice {
  const h = { ...DEFAULTS, ...f }
  const cs = 2 ** Math.min(Math.max(h.clusterBits, 9), 21)
  const buf = new Uint8Array(Math.max(cs, 4096) * 4)
  const dv = new DataView(buf.buffer)
  dv.setUint32(0, C.QCOW2_MAGIC)
  dv.setUint32(4, h.version)
  dv.setBigUint64(8, h.backingFileOffset)
  dv.setUint32(16, h.backingFileSize)
  dv.setUint32(20, h.clusterBits)
  dv.setBigUint64(24, h.size)
  dv.setUint32(32, h.cryptMethod)
  dv.setUint32(36, h.l1Size)
  dv.setBigUint64(40, h.l1TableOffset)
  dv.setBigUint64(48, h.refcountTableOffset)
  dv.setUint32(56, h.refcountTableClusters)
  dv.setUint32(60, h.nbSnapshots)
  dv.setBigUint64(64, h.snapshotsOffset)
  let off = 72
  if (h.version >= 3) {
    dv.setBigUint64(72, h.incompatible)
    dv.setBigUint64(80, h.compatible)
    dv.setBigUint64(88, h.autoclear)
    dv.setUint32(96, h.refcountOrder)
    dv.setUint32(100, h.headerLength)
    buf[104] = h.compressionType
    off = h.headerLength >= 104 ? h.headerLength : 112
  }
  for (const e of exts) {
    dv.setUint32(off, e.magic)
    dv.setUint32(off + 4, e.data.length)
    buf.set(e.data, off + 8)
    off += 8 + Math.ceil(e.data.length / 8) * 8
  }
  dv.setUint32(off, C.EXT_END)
  if (tail) buf.set(tail.bytes, tail.at)
  return new MemoryDevice(buf, { readOnly: true, name: 'test.qcow2' })
}

const text = (s: string): Uint8Array => new TextEncoder().encode(s)

function featureTable(entries: Array<[number, number, string]>): Ext {
  const data = new Uint8Array(48 * entries.length)
  entries.forEach(([type, bit, name], i) => {
    data[i * 48] = type
    data[i * 48 + 1] = bit
    data.set(text(name), i * 48 + 2)
  })
  return { magic: C.EXT_FEATURE_TABLE, data }
}

const open = (dev: MemoryDevice, opts: { readOnly?: boolean; forCheck?: boolean } = {}): Promise<Qcow2Header> =>
  readHeader(dev, { file: 'test.qcow2', readOnly: opts.readOnly ?? true, forCheck: opts.forCheck ?? false })

/** The error a header produces: its class, message and details. */
async function failure(dev: MemoryDevice, opts?: { readOnly?: boolean; forCheck?: boolean }): Promise<Error & { details?: Record<string, unknown> }> {
  try {
    await open(dev, opts)
  } catch (e) {
    return e as Error
  }
  throw new Error('header was accepted')
}

describe('qcow2 header: accepted headers', () => {
  it('reads every v3 field', async () => {
    const h = await open(header({ compatible: 1n, autoclear: 0n, refcountOrder: 5, nbSnapshots: 0 }))
    expect(h).toMatchObject({
      version: 3,
      clusterBits: 16,
      clusterSize: 65536,
      size: 2 ** 30,
      l1Size: 2,
      l1TableOffset: 0x30000,
      refcountTableOffset: 0x10000,
      refcountTableClusters: 1,
      refcountOrder: 5,
      headerLength: 112,
      compressionType: 0,
      compatibleFeatures: 1n,
      featureNames: [],
    })
    expect(l2EntrySize(h)).toBe(8)
    expect(l2Entries(h)).toBe(8192)
  })

  it('gives v2 images v3 defaults (refcount order 4, header length 72, zlib)', async () => {
    const h = await open(header({ version: 2, incompatible: 0xffn }))
    expect(h).toMatchObject({ version: 2, refcountOrder: 4, headerLength: 72, compressionType: 0, incompatibleFeatures: 0n })
  })

  it('parses backing format, feature table, bitmaps, data file and keeps unknown extensions', async () => {
    const bitmaps = new Uint8Array(24)
    new DataView(bitmaps.buffer).setUint32(0, 2)
    new DataView(bitmaps.buffer).setBigUint64(8, 48n)
    new DataView(bitmaps.buffer).setBigUint64(16, 0x50000n)
    const h = await open(
      header(
        { backingFileOffset: 0x400n, backingFileSize: 9, autoclear: 1n, incompatible: BigInt(C.INCOMPAT_DATA_FILE) },
        [
          { magic: C.EXT_BACKING_FORMAT, data: text('qcow2') },
          featureTable([
            [0, 0, 'dirty bit'],
            [1, 0, 'lazy refcounts'],
            [2, 1, 'raw external data'],
          ]),
          { magic: C.EXT_BITMAPS, data: bitmaps },
          { magic: C.EXT_DATA_FILE, data: text('disk.data') },
          { magic: 0x12345678, data: Uint8Array.of(1, 2, 3) },
        ],
        { at: 0x400, bytes: text('base.img!') },
      ),
    )
    expect(h.backingFile).toBe('base.img!')
    expect(h.backingFormat).toBe('qcow2')
    expect(h.dataFile).toBe('disk.data')
    expect(h.bitmaps).toEqual({ nbBitmaps: 2, directorySize: 48, directoryOffset: 0x50000 })
    expect(h.featureNames).toEqual([
      { type: 'incompatible', bit: 0, name: 'dirty bit' },
      { type: 'compatible', bit: 0, name: 'lazy refcounts' },
      { type: 'autoclear', bit: 1, name: 'raw external data' },
    ])
    const unknown = h.extensions.find((e) => e.magic === 0x12345678)
    expect(unknown && Array.from(unknown.data)).toEqual([1, 2, 3])
    expect(h.extensions.map((e) => e.magic)).toEqual([C.EXT_BACKING_FORMAT, C.EXT_FEATURE_TABLE, C.EXT_BITMAPS, C.EXT_DATA_FILE, 0x12345678])
  })

  it('reads the compression type byte and zstd with its incompatible bit', async () => {
    const h = await open(header({ compressionType: 1, incompatible: BigInt(C.INCOMPAT_COMPRESSION) }))
    expect(h.compressionType).toBe(C.COMPRESSION_ZSTD)
  })

  it('counts L1 entries as QEMU does, extended L2 included', () => {
    expect(l1EntriesNeeded({ size: 2 ** 30, clusterBits: 16, incompatibleFeatures: 0n })).toBe(2)
    expect(l1EntriesNeeded({ size: 2 ** 30 + 1, clusterBits: 16, incompatibleFeatures: 0n })).toBe(3)
    expect(l1EntriesNeeded({ size: 2 ** 30, clusterBits: 16, incompatibleFeatures: BigInt(C.INCOMPAT_EXTL2) })).toBe(4)
    expect(l1EntriesNeeded({ size: 0, clusterBits: 9, incompatibleFeatures: 0n })).toBe(0)
    expect(l1EntriesNeeded({ size: 2 ** 40, clusterBits: 9, incompatibleFeatures: 0n })).toBe(2 ** 40 / (64 * 512))
  })

  it('opens a corrupt image read-only, and for check read/write', async () => {
    const corrupt = { incompatible: BigInt(C.INCOMPAT_CORRUPT) }
    await expect(open(header(corrupt))).resolves.toBeDefined()
    await expect(open(header(corrupt), { readOnly: false, forCheck: true })).resolves.toBeDefined()
  })
})

describe('qcow2 header: validation messages', () => {
  // [description, fields, extensions, class, message pattern, structure offset]
  const cases: Array<[string, Partial<Fields>, Ext[], new (...a: never[]) => Error, RegExp | string, number]> = [
    ['version 4', { version: 4 }, [], UnsupportedFeatureError, 'Unsupported qcow2 version 4 (header field version at 0x4)', 4],
    ['version 1', { version: 1 }, [], UnsupportedFeatureError, 'Unsupported qcow2 version 1', 4],
    ['cluster_bits 8', { clusterBits: 8 }, [], UnsupportedFeatureError, 'Unsupported cluster size: 2^8 (cluster_bits at 0x14; supported 2^9 to 2^21)', 0x14],
    ['cluster_bits 22', { clusterBits: 22 }, [], UnsupportedFeatureError, 'Unsupported cluster size: 2^22', 0x14],
    ['header_length < 104', { headerLength: 100 }, [], CorruptImageError, 'qcow2 header too short: header_length 100 < 104 (header at 0x64)', 100],
    [
      'header_length > cluster',
      { clusterBits: 9, headerLength: 1024, l1Size: 1 << 16, size: 1n << 20n },
      [],
      CorruptImageError,
      'header_length 1024 > 512',
      100,
    ],
    [
      'backing file offset beyond the cluster',
      { backingFileOffset: 0x20000n },
      [],
      CorruptImageError,
      'Invalid backing file offset 0x20000: beyond the header cluster (header at 0x8)',
      8,
    ],
    ['unknown compression type', { compressionType: 7 }, [], UnsupportedFeatureError, 'unknown compression type: 7 (header byte 0x68)', 104],
    ['zlib with the compression bit', { incompatible: BigInt(C.INCOMPAT_COMPRESSION) }, [], CorruptImageError, 'must not be set with zlib', 72],
    ['zstd without the compression bit', { compressionType: 1 }, [], CorruptImageError, 'must be set for non-zlib', 72],
    [
      'unknown incompatible bit, unnamed',
      { incompatible: 1n << 40n },
      [],
      UnsupportedFeatureError,
      'Unsupported qcow2 feature(s): Unknown incompatible feature: bit 40 (incompatible_features 0x10000000000 at 0x48)',
      72,
    ],
    [
      'unknown incompatible bit, named',
      { incompatible: (1n << 5n) | 1n },
      [featureTable([[0, 5, 'frobnication']])],
      UnsupportedFeatureError,
      'Unsupported qcow2 feature(s): frobnication (bit 5) (incompatible_features 0x21 at 0x48)',
      72,
    ],
    ['refcount order 7', { refcountOrder: 7 }, [], CorruptImageError, 'may not exceed 64 bits (refcount_order 7)', 96],
    ['crypt method 3', { cryptMethod: 3 }, [], UnsupportedFeatureError, 'Unsupported encryption method 3 (crypt_method at 0x20)', 32],
    [
      'extended L2 with 8 KiB clusters',
      { clusterBits: 13, l1Size: 1024, incompatible: BigInt(C.INCOMPAT_EXTL2) },
      [],
      UnsupportedFeatureError,
      'Unsupported subcluster size: 256',
      72,
    ],
    [
      'no refcount table',
      { refcountTableClusters: 0 },
      [],
      CorruptImageError,
      'does not contain a reference count table (refcount_table_clusters is 0) (header at 0x38)',
      56,
    ],
    ['refcount table too large', { refcountTableClusters: 129 }, [], CorruptImageError, 'Reference count table too large: 129 clusters', 56],
    [
      'refcount table unaligned',
      { refcountTableOffset: 0x10200n },
      [],
      CorruptImageError,
      'Reference count table offset invalid: 0x10200 is not aligned to cluster size 0x10000 (header at 0x30)',
      48,
    ],
    ['too many snapshots', { nbSnapshots: 65537, snapshotsOffset: 0x40000n }, [], CorruptImageError, 'Snapshot table too large: 65537 snapshots', 60],
    ['snapshot table unaligned', { nbSnapshots: 1, snapshotsOffset: 0x40100n }, [], CorruptImageError, 'Snapshot table offset invalid: 0x40100', 64],
    ['l1_size absurd', { l1Size: 0x4000_0000 }, [], CorruptImageError, 'Active L1 table too large: l1_size 1073741824 (limit 32 MiB) (header at 0x24)', 36],
    [
      'L1 table unaligned',
      { l1TableOffset: 0x30008n },
      [],
      CorruptImageError,
      'Active L1 table offset invalid: 0x30008 is not aligned to cluster size 0x10000 (header at 0x28)',
      40,
    ],
    ['L1 table too small', { l1Size: 1 }, [], CorruptImageError, 'L1 table is too small: l1_size 1, the virtual size 1073741824 needs 2 (header at 0x24)', 36],
    ['virtual size too big', { size: 1n << 52n, clusterBits: 9 }, [], CorruptImageError, /Image is too big: 4503599627370496 bytes need \d+ L1 entries/, 24],
    ['size above 2^53', { size: 1n << 60n }, [], CorruptImageError, 'size 0x1000000000000000 is too large (header at 0x18)', 24],
    ['data file bit without a name', { incompatible: BigInt(C.INCOMPAT_DATA_FILE) }, [], CorruptImageError, "'data-file' is required", 72],
    [
      'backing file name too long',
      { backingFileOffset: 0x200n, backingFileSize: 2000 },
      [],
      CorruptImageError,
      'Backing file name too long: 2000 bytes (header at 0x10)',
      16,
    ],
  ]

  for (const [name, fields, exts, cls, msg, at] of cases) {
    it(`${name}: names the file, the fact and the offset`, async () => {
      const e = await failure(header(fields, exts))
      expect(e).toBeInstanceOf(cls)
      if (typeof msg === 'string') expect(e.message).toContain(msg)
      else expect(e.message).toMatch(msg)
      expect(e.message).toMatch(/^qcow2: test\.qcow2: /)
      expect(e.message).not.toContain('\n')
      expect(e.details).toMatchObject({ file: 'test.qcow2', structure: 'header', offset: at })
    })
  }

  it('an extension claiming more bytes than the header cluster has', async () => {
    const dev = header({ clusterBits: 12, l1Size: 512, l1TableOffset: 0x3000n, refcountTableOffset: 0x1000n })
    const b = await dev.read(0, dev.size)
    new DataView(b.buffer).setUint32(112, 0x1234_5678)
    new DataView(b.buffer).setUint32(116, 5000)
    const e = await failure(new MemoryDevice(b, { name: 'test.qcow2', readOnly: true }))
    expect(e.message).toBe('qcow2: test.qcow2: Header extension too large: extension 0x12345678 claims 5000 bytes (header extension at 0x70)')
  })

  it('refuses a corrupt image opened read/write', async () => {
    const e = await failure(header({ incompatible: BigInt(C.INCOMPAT_CORRUPT) }), { readOnly: false })
    expect(e.message).toContain('Image is corrupt; cannot be opened read/write')
  })

  it('refuses a file without the magic as the wrong format', async () => {
    const e = await failure(new MemoryDevice(new Uint8Array(4096), { name: 'test.qcow2' }))
    expect(e).toBeInstanceOf(WrongFormatError)
    expect(e.message).toBe('qcow2: test.qcow2: Image is not in qcow2 format (no QFI\\xfb magic at offset 0x0)')
  })

  it('refuses a truncated header, naming the sizes', async () => {
    const full = await header().read(0, 512)
    for (const n of [4, 7]) {
      const e = await failure(new MemoryDevice(full.subarray(0, n), { name: 'test.qcow2' }))
      expect(e.message, `${n} bytes`).toBe(`qcow2: test.qcow2: header is truncated: the file is ${n} bytes, a qcow2 header needs at least 72 (header at 0x0)`)
    }
    for (const n of [8, 50, 103]) {
      const e = await failure(new MemoryDevice(full.subarray(0, n), { name: 'test.qcow2' }))
      expect(e.message, `${n} bytes`).toBe(`qcow2: test.qcow2: header is truncated: the file is ${n} bytes, a v3 header needs 104 (header at 0x0)`)
    }
    const v2 = await header({ version: 2 }).read(0, 512)
    const e = await failure(new MemoryDevice(v2.subarray(0, 71), { name: 'test.qcow2' }))
    expect(e.message).toContain('the file is 71 bytes, a v2 header needs 72')
  })

  it('lets check open what a normal open refuses', async () => {
    await expect(open(header({ refcountTableClusters: 0 }), { forCheck: true })).resolves.toBeDefined()
    await expect(open(header({ nbSnapshots: 1, snapshotsOffset: 0x40100n }), { forCheck: true })).resolves.toBeDefined()
  })
})

describe('qcow2 header: the refusals of qcow2_do_open and qcow2_read_extensions', () => {
  const bitmapsExt = (nb: number, size: bigint, offset: bigint, reserved = 0, len = 24): Ext => {
    const data = new Uint8Array(len)
    const dv = new DataView(data.buffer)
    if (len >= 24) {
      dv.setUint32(0, nb)
      dv.setUint32(4, reserved)
      dv.setBigUint64(8, size)
      dv.setBigUint64(16, offset)
    }
    return { magic: C.EXT_BITMAPS, data }
  }
  const cryptoExt = (offset: bigint, length: bigint, len = 16): Ext => {
    const data = new Uint8Array(len)
    if (len >= 16) {
      new DataView(data.buffer).setBigUint64(0, offset)
      new DataView(data.buffer).setBigUint64(8, length)
    }
    return { magic: C.EXT_CRYPTO, data }
  }
  // [description, fields, extensions, message]; every one is refused by check's open too (qemu-img check exit 1)
  const cases: Array<[string, Partial<Fields>, Ext[], string]> = [
    ['bitmaps extension of 16 bytes', {}, [bitmapsExt(0, 0n, 0n, 0, 16)], 'bitmaps_ext: Invalid extension length 16'],
    ['bitmaps extension of 32 bytes', {}, [bitmapsExt(1, 48n, 0x50000n, 0, 32)], 'bitmaps_ext: Invalid extension length 32'],
    ['bitmaps reserved field set', { autoclear: 1n }, [bitmapsExt(1, 48n, 0x50000n, 7)], 'bitmaps_ext: Reserved field is not zero'],
    ['65536 bitmaps', { autoclear: 1n }, [bitmapsExt(65536, 48n, 0x50000n)], 'exceeding the QEMU supported maximum of 65535'],
    ['zero bitmaps', { autoclear: 1n }, [bitmapsExt(0, 0n, 0x50000n)], 'found bitmaps extension with zero bitmaps'],
    ['bitmap directory unaligned', { autoclear: 1n }, [bitmapsExt(1, 48n, 0x50200n)], 'bitmaps_ext: invalid bitmap directory offset 0x50200'],
    [
      'bitmap directory too large',
      { autoclear: 1n },
      [bitmapsExt(1, 1n << 30n, 0x50000n)],
      'bitmap directory size (1073741824) exceeds the maximum supported size (67107840)',
    ],
    ['backing format of 16 bytes', {}, [{ magic: C.EXT_BACKING_FORMAT, data: text('qcow2qcow2qcow2!') }], 'ext_backing_format: len=16 too large (>=16)'],
    ['crypto extension without LUKS', { cryptMethod: 1 }, [cryptoExt(0x10000n, 0x1000n)], 'CRYPTO header extension only expected with LUKS encryption method'],
    ['crypto extension of 8 bytes', { cryptMethod: 2 }, [cryptoExt(0n, 0n, 8)], 'CRYPTO header extension size 8, but expected size 16'],
    [
      'crypto header unaligned',
      { cryptMethod: 2 },
      [cryptoExt(0x10200n, 0x1000n)],
      "Encryption header offset '66048' is not a multiple of cluster size '65536'",
    ],
    ['LUKS without a crypto extension', { cryptMethod: 2 }, [], 'Missing CRYPTO header for crypt method 2'],
    ['data-file-raw without a data file', { autoclear: 2n }, [], 'data-file-raw requires a data file'],
  ]
  for (const [name, fields, exts, msg] of cases) {
    it(`${name}: refused with qemu's reason, for check too`, async () => {
      for (const forCheck of [false, true]) {
        const e = await failure(header(fields, exts), { forCheck })
        expect(e).toBeInstanceOf(CorruptImageError)
        expect(e.message).toContain(msg)
        expect(e.message).toMatch(/^qcow2: test\.qcow2: .* \((header|header extension) at 0x[0-9a-f]+\)$/)
      }
    })
  }

  /** the header cluster with its extension area replaced by `bytes` at header_length */
  async function withExtensionBytes(bytes: number[]): Promise<MemoryDevice> {
    const b = await header().read(0, 4 * 65536)
    b.set(bytes, 112)
    return new MemoryDevice(b, { name: 'test.qcow2', readOnly: true })
  }

  it('an end marker whose length runs past the header cluster: "Header extension too large", as qemu-img', async () => {
    const dev = await withExtensionBytes([0, 0, 0, 0, 0, 2, 0, 0]) // end marker, length 0x20000
    for (const forCheck of [false, true]) {
      const e = await failure(dev, { forCheck })
      expect(e.message).toBe('qcow2: test.qcow2: Header extension too large: extension 0x0 claims 131072 bytes (header extension at 0x70)')
    }
  })

  it('an extension header that straddles the end of the extension area is too large too', async () => {
    // backing file name at 0x74: the extension area is 0x70..0x74, too short for an 8-byte extension header
    const e = await failure(header({ backingFileOffset: 0x74n, backingFileSize: 4 }, [], { at: 0x74, bytes: text('base') }))
    expect(e.message).toContain('Header extension too large: the extension header at 0x70 runs past 0x74')
  })

  it('bitmaps extension without the autoclear bit: kept, not validated (a stale extension QEMU ignores)', async () => {
    const h = await open(header({}, [bitmapsExt(0, 0n, 0x50200n)]))
    expect(h.bitmaps).toEqual({ nbBitmaps: 0, directorySize: 0, directoryOffset: 0x50200 })
  })

  it('an empty table offset is still validated: L1 offset unaligned with l1_size 0 is refused, as qemu refuses it', async () => {
    const e = await failure(header({ l1Size: 0, size: 0n, l1TableOffset: 0x30008n }))
    expect(e.message).toContain('Active L1 table offset invalid: 0x30008')
    const s = await failure(header({ nbSnapshots: 0, snapshotsOffset: 0x40100n }))
    expect(s.message).toContain('Snapshot table offset invalid: 0x40100')
  })

  it('an unused table offset at or above 2^53 (empty table) opens, as in qemu', async () => {
    const h = await open(header({ nbSnapshots: 0, snapshotsOffset: 1n << 60n }))
    expect(h.snapshotsOffset).toBe(0)
    expect(h.snapshotsOffsetExact).toBeUndefined()
  })

  it('a used snapshot or refcount table offset above 2^53 opens (qemu reads it past EOF as zeros), its exact value kept', async () => {
    // fuzz regression archive-replay.jsonl: qemu-img info, convert and check open both (check then counts
    // the table as past the end of the file)
    const s = await open(header({ nbSnapshots: 1, snapshotsOffset: (1n << 60n) + 0x10000n }))
    expect(s.snapshotsOffset).toBe(Number((1n << 60n) + 0x10000n))
    expect(s.snapshotsOffsetExact).toBe((1n << 60n) + 0x10000n)
    const past = await failure(header({ nbSnapshots: 1, snapshotsOffset: 1n << 63n }))
    expect(past.message).toContain('Snapshot table offset invalid')
    const r = await open(header({ refcountTableOffset: 1n << 62n }))
    expect(r.refcountTableOffset).toBe(2 ** 62)
    expect(r.refcountTableOffsetExact).toBe(1n << 62n)
    const rpast = await failure(header({ refcountTableOffset: 1n << 63n }))
    expect(rpast.message).toContain('Reference count table offset invalid')
  })

  it('a used active L1 offset above 2^53 opens (qemu reads the table past EOF as zeros), its exact value kept', async () => {
    const h = await open(header({ l1TableOffset: (1n << 62n) + 0x10000n }))
    expect(h.l1TableOffset).toBe(Number((1n << 62n) + 0x10000n))
    expect(h.l1TableOffsetExact).toBe((1n << 62n) + 0x10000n)
    const past = await failure(header({ l1TableOffset: 1n << 63n }))
    expect(past.message).toContain('Active L1 table offset invalid')
  })

  it('a size that is not a multiple of 512 is used rounded down, as QEMU keeps it in sectors', async () => {
    const h = await open(header({ size: 0x2000ffn }))
    expect(h.size).toBe(0x200000)
    expect(h.sizeField).toBe(0x2000ff)
  })

  it('names end at the first NUL; a name that is not UTF-8 is kept for display with the reason it cannot be opened', async () => {
    const nul = await open(header({ backingFileOffset: 0x400n, backingFileSize: 10 }, [], { at: 0x400, bytes: Uint8Array.of(...text('base.img'), 0, 0x41) }))
    expect(nul.backingFile).toBe('base.img')
    expect(nul.backingFileError).toBeUndefined()
    const bad = await open(header({ backingFileOffset: 0x400n, backingFileSize: 5 }, [], { at: 0x400, bytes: Uint8Array.of(0x61, 0xff, 0xc3, 0x28, 0x62) }))
    expect(bad.backingFile).toBe('a\ufffd\ufffd(b')
    expect(bad.backingFileError).toBe('backing file name "a\\xff\\xc3(b" is not valid UTF-8')
    const empty = await open(header({ backingFileOffset: 0x400n, backingFileSize: 4 }, [], { at: 0x400, bytes: new Uint8Array(4) }))
    expect(empty.backingFile).toBeUndefined()
    const df = await open(header({ incompatible: BigInt(C.INCOMPAT_DATA_FILE) }, [{ magic: C.EXT_DATA_FILE, data: Uint8Array.of(0x64, 0x80, 0x00, 0x7a) }]))
    expect(df.dataFile).toBe('d\ufffd')
    expect(df.dataFileError).toBe('data file name "d\\x80" is not valid UTF-8')
  })
})
