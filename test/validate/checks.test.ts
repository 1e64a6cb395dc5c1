/**
 * validate's checks, each with a fixture that passes and one that violates it.
 * Fixtures come from fixtures/make.sh (qemu-img, qemu-io); damage is applied in code.
 */
import { createHash } from 'node:crypto'
import { readFileSync, statSync, unlinkSync } from 'node:fs'
import { basename, join } from 'node:path'
import { beforeAll, expect, it } from 'vitest'
import { validate } from '../../src/index.js'
import { describeQemu, qemuImgOk, useTempDirs } from '../support/qemu.js'
import { append, codes, damaged, makeFixtures, permissive, PERMISSIVE, readU64, run, u32, u64 } from './fixtures.js'

useTempDirs()

describeQemu('imgtool validate: every check passes a sound fixture and names the violation in a broken one', () => {
  let dir = ''
  beforeAll(() => {
    dir = makeFixtures()
  })

  it('passes the sound qcow2 and raw fixtures under the permissive policy', async () => {
    for (const f of ['good.qcow2', 'good.raw', 'compressed.qcow2', 'zstd.qcow2', 'compat010.qcow2', 'extl2.qcow2', 'cluster4k.qcow2']) {
      const r = await run(dir, f, PERMISSIVE)
      expect({ f, codes: codes(r) }).toEqual({ f, codes: [] })
    }
  })

  // identity
  it('FORMAT_NOT_ALLOWED: qcow2 where only raw is allowed', async () => {
    expect(codes(await run(dir, 'good.qcow2', permissive({ formats: ['raw'] })))).toEqual(['FORMAT_NOT_ALLOWED'])
    expect(codes(await run(dir, 'good.raw', permissive({ formats: ['raw'] })))).toEqual([])
  })

  it('FORMAT_MISMATCH: a file declared raw that is qcow2 (a qcow2 magic inside a "raw" image)', async () => {
    const bad = await validate(join(dir, 'good.qcow2'), PERMISSIVE, { expectFormat: 'raw' })
    expect(codes(bad)).toEqual(['FORMAT_MISMATCH'])
    expect(bad.violations[0]!.message).toMatch(/declared format raw, but the file is qcow2/)
    expect(codes(await validate(join(dir, 'good.qcow2'), PERMISSIVE, { expectFormat: 'qcow2' }))).toEqual([])
  })

  it('POLYGLOT: a qcow2 header beside MBR, GPT or ISO 9660 signatures', async () => {
    const mbr = damaged(dir, 'good.qcow2', 'mbr', [[510, [0x55, 0xaa]]])
    const gpt = damaged(dir, 'good.qcow2', 'gpt', [[512, [...Buffer.from('EFI PART')]]])
    const iso = damaged(dir, 'good.qcow2', 'iso', [[0x8001, [...Buffer.from('CD001')]]])
    for (const [file, sig, offset] of [
      [mbr, 'mbr', 510],
      [gpt, 'gpt', 512],
      [iso, 'iso', 0x8001],
    ] as const) {
      const r = await validate(file, PERMISSIVE)
      expect(codes(r)).toEqual(['POLYGLOT'])
      expect(r.violations[0]).toMatchObject({ structure: `${sig} signature`, offset })
    }
    expect(codes(await validate(mbr, permissive({ identity: { allowPolyglot: true } })))).toEqual([])
  })

  it('POLYGLOT: guest data that starts with a qcow2 header (written raw, it would probe as qcow2)', async () => {
    const r = await run(dir, 'nested.qcow2', PERMISSIVE)
    expect(codes(r)).toEqual(['POLYGLOT'])
    expect(r.violations[0]!.structure).toBe('guest sector 0')
  })

  it('TRUNCATED: the L1 or refcount table ends past the end of the file', async () => {
    const full = join(dir, 'good.qcow2')
    const l1 = Number(readU64(full, 40))
    const cut = damaged(dir, 'good.qcow2', 'cut', [])
    const { truncateSync } = await import('node:fs')
    truncateSync(cut, l1 + 4)
    const r = await validate(cut, PERMISSIVE)
    expect(codes(r)).toContain('TRUNCATED')
    expect(r.violations.find((v) => v.code === 'TRUNCATED')).toMatchObject({ structure: 'l1', offset: l1 })
  })

  it('HEADER_INVALID: a header the parser refuses is reported with the field, not thrown', async () => {
    const bad = damaged(dir, 'good.qcow2', 'bits', [[20, u32(30)]])
    const r = await validate(bad, PERMISSIVE)
    expect(codes(r)).toEqual(expect.arrayContaining(['HEADER_INVALID', 'CLUSTER_SIZE']))
    expect(r.checks.structure).toBe('skip')
  })

  it('VERSION_NOT_ALLOWED: compat 0.10 where 1.1 is required', async () => {
    expect(codes(await run(dir, 'compat010.qcow2', permissive({ qcow2: { compat: ['1.1'] } })))).toEqual(['VERSION_NOT_ALLOWED'])
    expect(codes(await run(dir, 'good.qcow2', permissive({ qcow2: { compat: ['1.1'] } })))).toEqual([])
  })

  // references
  const DENY_REFS = { references: { backingFile: false, dataFile: false, protocolNames: false, parentDirNames: false, absoluteNames: false } }
  it('BACKING_FILE, PROTOCOL_NAME, PARENT_DIR_NAME, ABSOLUTE_NAME: names are reported and never opened', async () => {
    expect(codes(await run(dir, 'backing.qcow2', permissive(DENY_REFS)))).toEqual(['BACKING_FILE', 'CONTENT_SKIPPED'])
    expect(codes(await run(dir, 'json-backing.qcow2', permissive(DENY_REFS)))).toEqual(['BACKING_FILE', 'CONTENT_SKIPPED', 'PROTOCOL_NAME'])
    // ../outside.qcow2 does not exist: had it been opened, validation would have failed
    expect(codes(await run(dir, 'parent-backing.qcow2', permissive(DENY_REFS)))).toEqual(['BACKING_FILE', 'CONTENT_SKIPPED', 'PARENT_DIR_NAME'])
    expect(codes(await run(dir, 'absolute-backing.qcow2', permissive(DENY_REFS)))).toEqual(['ABSOLUTE_NAME', 'BACKING_FILE', 'CONTENT_SKIPPED'])
    // allowed kinds still carry no violation
    expect(codes(await run(dir, 'backing.qcow2', PERMISSIVE))).toEqual(['CONTENT_SKIPPED'])
    expect(codes(await run(dir, 'good.qcow2', permissive(DENY_REFS)))).toEqual([])
  })

  it('a backing chain loop (an image naming itself) stops at one violation, no hang', async () => {
    const r = await run(dir, 'self-loop.qcow2', permissive(DENY_REFS))
    expect(codes(r)).toEqual(['BACKING_FILE', 'CONTENT_SKIPPED'])
    expect(r.durationMs).toBeLessThan(5000)
  })

  it('DATA_FILE: an external data file (and data_file_raw) is reported, never opened', async () => {
    const copy = damaged(dir, 'datafile.qcow2', 'gone', [])
    const r = await validate(copy, permissive(DENY_REFS))
    expect(codes(r)).toEqual(['CONTENT_SKIPPED', 'DATA_FILE'])
    expect(r.violations.filter((v) => v.code === 'DATA_FILE').map((v) => v.structure)).toEqual([
      'header incompatible_features bit 2',
      'header extension data file',
    ])
    const raw = await run(dir, 'datafile-raw.qcow2', permissive(DENY_REFS))
    expect(raw.violations.filter((v) => v.code === 'DATA_FILE').map((v) => v.structure)).toContain('header autoclear_features bit 1')
    unlinkSync(join(dir, 'data.bin'))
    expect(codes(await run(dir, 'datafile.qcow2', permissive(DENY_REFS)))).toEqual(['CONTENT_SKIPPED', 'DATA_FILE'])
  })

  it('EXTENT_FILE: a VMDK descriptor naming an extent file, which is not opened', async () => {
    const r = await run(dir, 'flat.vmdk', permissive(DENY_REFS))
    expect(codes(r)).toEqual(['CONTENT_SKIPPED', 'EXTENT_FILE'])
    expect(r.violations.find((v) => v.code === 'EXTENT_FILE')!.message).toMatch(/FLAT extent 'flat-flat\.vmdk'/)
  })

  it('UNSUPPORTED_FORMAT: VHDX is detected and reported, not passed', async () => {
    for (const [f, fmt] of [['disk.vhdx', 'vhdx']] as const) {
      const r = await run(dir, f, PERMISSIVE)
      expect({ f, format: r.format, codes: codes(r) }).toEqual({ f, format: fmt, codes: ['UNSUPPORTED_FORMAT'] })
    }
  })

  // features
  it('UNKNOWN_FEATURE, CORRUPT_BIT, DIRTY_BIT: header bits', async () => {
    const incompat = (bits: bigint, tag: string): string => damaged(dir, 'good.qcow2', tag, [[72, u64(bits)]])
    const unknown = await validate(incompat(1n << 10n, 'unk'), PERMISSIVE)
    expect(codes(unknown)).toEqual(['UNKNOWN_FEATURE'])
    expect(unknown.violations[0]!.structure).toBe('header incompatible_features bit 10')
    expect(codes(await validate(incompat(2n, 'corrupt'), PERMISSIVE))).toContain('CORRUPT_BIT')
    const dirty = incompat(1n, 'dirty')
    expect(codes(await validate(dirty, permissive({ qcow2: { dirty: 'fail' } })))).toEqual(['DIRTY_BIT'])
    expect((await validate(dirty, permissive({ qcow2: { dirty: 'warn' } }))).violations.map((v) => v.severity)).toEqual(['warning'])
    expect(codes(await validate(dirty, permissive({ qcow2: { dirty: 'stale-refcounts-expected' } })))).toEqual([])
  })

  it('FEATURE_NOT_ALLOWED: lazy refcounts, extended L2 and bitmaps when the policy lists none', async () => {
    expect(codes(await run(dir, 'lazy.qcow2', permissive({ qcow2: { compatibleFeatures: [] } })))).toEqual(['FEATURE_NOT_ALLOWED'])
    expect(codes(await run(dir, 'extl2.qcow2', permissive({ qcow2: { incompatibleFeatures: [] } })))).toEqual(['FEATURE_NOT_ALLOWED'])
    expect(codes(await run(dir, 'bitmap.qcow2', permissive({ qcow2: { autoclearFeatures: [] } })))).toEqual(['FEATURE_NOT_ALLOWED'])
  })

  it('COMPRESSION_TYPE, ENCRYPTED, SNAPSHOTS, BITMAPS, REFCOUNT_WIDTH, CLUSTER_SIZE', async () => {
    expect(codes(await run(dir, 'zstd.qcow2', permissive({ qcow2: { compressionTypes: ['zlib'] } })))).toEqual(['COMPRESSION_TYPE'])
    expect(codes(await run(dir, 'compressed.qcow2', permissive({ qcow2: { compressionTypes: ['zlib'] } })))).toEqual([])
    expect(codes(await run(dir, 'luks.qcow2', permissive({ qcow2: { encryption: false } })))).toEqual(['CONTENT_SKIPPED', 'ENCRYPTED'])
    expect(codes(await run(dir, 'luks.qcow2', PERMISSIVE))).toEqual(['CONTENT_SKIPPED'])
    expect(codes(await run(dir, 'snapshot.qcow2', permissive({ qcow2: { maxSnapshots: 0 } })))).toEqual(['SNAPSHOTS'])
    expect(codes(await run(dir, 'snapshot.qcow2', permissive({ qcow2: { maxSnapshots: 1 } })))).toEqual([])
    expect(codes(await run(dir, 'bitmap.qcow2', permissive({ qcow2: { maxBitmaps: 0 } })))).toEqual(['BITMAPS'])
    expect(codes(await run(dir, 'refcount8.qcow2', permissive({ qcow2: { refcountBits: [16] } })))).toEqual(['REFCOUNT_WIDTH'])
    expect(codes(await run(dir, 'cluster4k.qcow2', permissive({ qcow2: { clusterSizes: [65536] } })))).toEqual(['CLUSTER_SIZE'])
  })

  it('BITMAP_IN_USE: a bitmap flagged in use, and bitmaps made inconsistent by clearing the autoclear bit', async () => {
    const file = join(dir, 'bitmap.qcow2')
    const head = readFileSync(file).subarray(0, 65536)
    const ext = head.indexOf(Buffer.from([0x23, 0x85, 0x28, 0x75]), 104)
    expect(ext).toBeGreaterThan(0)
    const directory = Number(head.readBigUInt64BE(ext + 8 + 16))
    const flags = readFileSync(file).readUInt32BE(directory + 12)
    const inUse = await validate(damaged(dir, 'bitmap.qcow2', 'inuse', [[directory + 12, u32(flags | 1)]]), PERMISSIVE)
    expect(codes(inUse)).toContain('BITMAP_IN_USE')
    expect(inUse.violations.find((v) => v.code === 'BITMAP_IN_USE')).toMatchObject({ structure: 'bitmap directory entry', offset: directory })
    const cleared = damaged(dir, 'bitmap.qcow2', 'stale', [[88, u64(readU64(file, 88) & ~1n)]])
    // qemu-img check counts the bitmap's clusters as leaked once the bitmaps are inconsistent: both are named
    expect(codes(await validate(cleared, PERMISSIVE))).toEqual(['BITMAP_IN_USE', 'CHECK_LEAKS'])
    expect(codes(await run(dir, 'bitmap.qcow2', PERMISSIVE))).toEqual([])
  })

  // sizes
  it('VIRTUAL_SIZE_BOUNDS and VIRTUAL_SIZE_ALIGNMENT', async () => {
    expect(codes(await run(dir, 'good.qcow2', permissive({ sizes: { maxVirtualSize: 512 * 1024 } })))).toEqual(['VIRTUAL_SIZE_BOUNDS'])
    expect(codes(await run(dir, 'size-1m-512.raw', permissive({ sizes: { virtualSizeAlignment: 1 << 20 } })))).toEqual(['VIRTUAL_SIZE_ALIGNMENT'])
    expect(codes(await run(dir, 'size-1m.raw', permissive({ sizes: { virtualSizeAlignment: 1 << 20 } })))).toEqual([])
  })

  it('FILE_SIZE_LAYOUT: bytes past the end of the layout', async () => {
    const long = damaged(dir, 'good.qcow2', 'long', [])
    append(long, 70000)
    const r = await validate(long, PERMISSIVE)
    expect(codes(r)).toContain('FILE_SIZE_LAYOUT')
    expect(r.violations.find((v) => v.code === 'FILE_SIZE_LAYOUT')!.offset).toBe(statSync(join(dir, 'good.qcow2')).size)
  })

  it('ALLOCATION_RATIO: a decompression bomb stops before its data is read', async () => {
    const r = await run(dir, 'bomb.qcow2', permissive({ sizes: { maxAllocationRatio: 100 } }))
    expect(codes(r)).toEqual(['ALLOCATION_RATIO'])
    expect(r.digest).toBeUndefined()
    expect(codes(await run(dir, 'compressed.qcow2', permissive({ sizes: { maxAllocationRatio: 100 } })))).toEqual([])
  })

  it('TARGET_VOLUME: the virtual size plus overhead must fit the target', async () => {
    expect(codes(await run(dir, 'good.qcow2', permissive({ sizes: { targetVolumeSize: 1 << 20, targetOverheadPercent: 5.5 } })))).toEqual(['TARGET_VOLUME'])
    expect(codes(await run(dir, 'good.qcow2', permissive({ sizes: { targetVolumeSize: 2 << 20, targetOverheadPercent: 5.5 } })))).toEqual([])
  })

  // structure: the check engine
  it('CHECK_LEAKS and CHECK_CORRUPTIONS from the same engine as check', async () => {
    const file = join(dir, 'good.qcow2')
    const size = statSync(file).size
    const refblock = Number(readU64(file, Number(readU64(file, 48))))
    const leak = damaged(dir, 'good.qcow2', 'leak', [[refblock + 2 * (size / 65536), [0, 1]]])
    append(leak, 65536)
    const leaky = await validate(leak, permissive({ structure: { maxLeaks: 0 } }))
    expect(codes(leaky)).toEqual(['CHECK_LEAKS'])
    expect(leaky.violations[0]!.message).toMatch(/1 leaked cluster/)
    expect(codes(await validate(leak, permissive({ structure: { maxLeaks: 1 } })))).toEqual([])
    const corrupt = damaged(dir, 'good.qcow2', 'corrupt0', [[refblock, [0, 0]]])
    expect(codes(await validate(corrupt, PERMISSIVE))).toEqual(['CHECK_CORRUPTIONS'])
  })

  // content
  it('the guest digest equals sha256sum of qemu-img convert -O raw, for every readable fixture', async () => {
    const files = [
      'good.qcow2',
      'good.raw',
      'compressed.qcow2',
      'zstd.qcow2',
      'compat010.qcow2',
      'extl2.qcow2',
      'cluster4k.qcow2',
      'lazy.qcow2',
      'refcount8.qcow2',
      'snapshot.qcow2',
      'bitmap.qcow2',
      'nested.qcow2',
      'size-1m-512.qcow2',
      'size-1m-512.raw',
      'bomb.qcow2',
    ]
    for (const f of files) {
      const raw = join(dir, `${basename(f)}.converted.raw`)
      await qemuImgOk(['convert', '-O', 'raw', join(dir, f), raw])
      const expected = createHash('sha256').update(readFileSync(raw)).digest('hex')
      const r = await run(dir, f, PERMISSIVE)
      expect({ f, digest: r.digest?.hex }).toEqual({ f, digest: expected })
    }
    // the same disk in raw and qcow2 (and compressed) hashes the same, and zero runs were not read
    const a = await run(dir, 'good.qcow2', PERMISSIVE)
    expect((await run(dir, 'compressed.qcow2', PERMISSIVE)).digest!.hex).toBe(a.digest!.hex)
    expect(a.digest!.zeroBytes).toBeGreaterThan(0)
    expect(a.digest!.dataBytes + a.digest!.zeroBytes).toBe(1 << 20)
  })

  it('DIGEST_MISMATCH and REFERENCE_MISMATCH', async () => {
    const good = (await run(dir, 'good.raw', PERMISSIVE)).digest!.hex
    expect(codes(await run(dir, 'good.qcow2', permissive({ content: { expectDigest: good } })))).toEqual([])
    expect(codes(await run(dir, 'good.qcow2', permissive({ content: { expectDigest: 'ab'.repeat(32) } })))).toEqual(['DIGEST_MISMATCH'])
    expect(codes(await run(dir, 'compressed.qcow2', permissive({ content: { reference: join(dir, 'good.raw') } })))).toEqual([])
    expect(codes(await run(dir, 'good.qcow2', permissive({ content: { reference: join(dir, 'size-1m.raw') } })))).toEqual(['REFERENCE_MISMATCH'])
  })

  // limits: a hostile image stops at its limit with a violation
  it('LIMIT_TABLE_SIZE: an L1 table larger than the limit is not read', async () => {
    const huge = damaged(dir, 'good.qcow2', 'hugel1', [[36, u32(4_000_000)]])
    const r = await validate(huge, permissive({ limits: { maxTableBytes: 1 << 20 } }))
    expect(codes(r)).toEqual(expect.arrayContaining(['LIMIT_TABLE_SIZE']))
    expect(r.checks.structure).toBe('skip')
    expect(codes(await run(dir, 'good.qcow2', permissive({ limits: { maxTableBytes: 1 << 20 } })))).toEqual([])
  })

  it('LIMIT_CLUSTERS, LIMIT_DATA_BYTES and LIMIT_TIMEOUT stop the work with a violation', async () => {
    expect(codes(await run(dir, 'good.qcow2', permissive({ limits: { maxClusters: 4 } })))).toEqual(['LIMIT_CLUSTERS'])
    const bomb = await run(dir, 'bomb.qcow2', permissive({ sizes: { maxAllocationRatio: 0 }, limits: { maxDataBytes: 4 << 20 } }))
    expect(codes(bomb)).toEqual(['LIMIT_DATA_BYTES'])
    const slow = await run(dir, 'bomb.qcow2', permissive({ sizes: { maxAllocationRatio: 0 }, limits: { timeoutSeconds: 0.001 } }))
    expect(codes(slow)).toEqual(['LIMIT_TIMEOUT'])
  })
})
