/**
 * Presets: an image the target accepts passes, a near miss fails with the right code.
 * Plus the partition-table checks, on disks built in code and stored by qemu-img as qcow2.
 */
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { beforeAll, expect, it } from 'vitest'
import { validate, type PolicyInput } from '../../src/index.js'
import { describeQemu, qemuImgOk, useTempDirs } from '../support/qemu.js'
import { codes, damaged, makeFixtures, permissive, readU64, run, u64 } from './fixtures.js'
import { gptDisk, mbrDisk } from './partitions.js'

useTempDirs()

describeQemu('presets and partition tables', () => {
  let dir = ''
  beforeAll(async () => {
    dir = makeFixtures()
    const sectors = 8192 // 4 MiB
    writeFileSync(
      join(dir, 'gpt.raw'),
      gptDisk(sectors, [
        { first: 2048, last: 4095 },
        { first: 4096, last: 8000 },
      ]),
    )
    writeFileSync(
      join(dir, 'gpt-overlap.raw'),
      gptDisk(sectors, [
        { first: 2048, last: 4095 },
        { first: 4000, last: 6000 },
      ]),
    )
    writeFileSync(join(dir, 'gpt-outside.raw'), gptDisk(sectors, [{ first: 2048, last: 9000 }]))
    writeFileSync(join(dir, 'mbr.raw'), mbrDisk(sectors, [{ first: 2048, count: 2048 }]))
    writeFileSync(
      join(dir, 'mbr-overlap.raw'),
      mbrDisk(sectors, [
        { first: 2048, count: 2048 },
        { first: 3000, count: 100 },
      ]),
    )
    writeFileSync(join(dir, 'mbr-past-end.raw'), mbrDisk(sectors, [{ first: 2048, count: 8192 }]))
    await qemuImgOk(['convert', '-f', 'raw', '-O', 'qcow2', join(dir, 'gpt.raw'), join(dir, 'gpt.qcow2')])
  })

  const parts = (codesOf: string[]): string[] => codesOf.filter((c) => c === 'PARTITION_TABLE' || c === 'NO_PARTITION_TABLE')

  it('a sound GPT and MBR pass, in raw and in qcow2', async () => {
    for (const f of ['gpt.raw', 'gpt.qcow2', 'mbr.raw'])
      expect({ f, codes: codes(await run(dir, f, permissive({ content: { partitions: 'require' } }))) }).toEqual({ f, codes: [] })
  })

  it('PARTITION_TABLE: GPT header and entry CRCs, partitions outside the disk, overlaps', async () => {
    const entryCrc = await validate(damaged(dir, 'gpt.raw', 'flip', [[2 * 512 + 40, [0x99]]]), permissive({}))
    expect(codes(entryCrc)).toEqual(['PARTITION_TABLE'])
    expect(entryCrc.violations[0]!.message).toMatch(/GPT entry array CRC32/)
    const headerCrc = await validate(damaged(dir, 'gpt.raw', 'hdr', [[512 + 56, [0x43]]]), permissive({}))
    expect(headerCrc.violations.map((v) => v.message).join()).toMatch(/GPT header CRC32/)
    expect((await run(dir, 'gpt-overlap.raw', permissive({}))).violations.map((v) => v.message).join()).toMatch(/GPT partition 2 .* overlaps GPT partition 1/)
    expect((await run(dir, 'gpt-outside.raw', permissive({}))).violations.map((v) => v.message).join()).toMatch(/outside the usable area/)
    expect(parts(codes(await run(dir, 'mbr-overlap.raw', permissive({}))))).toEqual(['PARTITION_TABLE'])
    expect((await run(dir, 'mbr-past-end.raw', permissive({}))).violations.map((v) => v.message).join()).toMatch(/ends past the disk/)
  })

  it('NO_PARTITION_TABLE only where the policy requires one', async () => {
    expect(codes(await run(dir, 'good.raw', permissive({ content: { partitions: 'require' } })))).toEqual(['NO_PARTITION_TABLE'])
    expect(codes(await run(dir, 'good.raw', permissive({ content: { partitions: 'check' } })))).toEqual([])
  })

  it('produced: a fresh qcow2 passes; compat 0.10, a backing file, a dirty bit or a leak fail', async () => {
    expect(codes(await validate(join(dir, 'good.qcow2'), 'produced'))).toEqual([])
    expect(codes(await validate(join(dir, 'compat010.qcow2'), 'produced'))).toEqual(['VERSION_NOT_ALLOWED'])
    // produced asks for no digest, so a skipped content is no violation of its own
    expect(codes(await validate(join(dir, 'backing.qcow2'), 'produced'))).toEqual(['BACKING_FILE'])
    const digest = (await validate(join(dir, 'good.raw'), 'openstack')).digest!.hex
    expect((await validate(join(dir, 'good.qcow2'), 'produced')).digest).toBeUndefined()
    expect(codes(await validate(join(dir, 'good.qcow2'), { extends: 'produced', content: { expectDigest: digest } }))).toEqual([])
    expect(codes(await validate(join(dir, 'good.qcow2'), { extends: 'produced', content: { expectDigest: 'ab'.repeat(32) } }))).toEqual(['DIGEST_MISMATCH'])
    const dirty = damaged(dir, 'good.qcow2', 'dirty', [[72, u64(1n)]])
    expect(codes(await validate(dirty, 'produced'))).toEqual(['DIRTY_BIT'])
  })

  it('openstack: compat 0.10 passes (the inspector reads both); a backing file, data file, polyglot or unknown bit fail', async () => {
    expect(codes(await validate(join(dir, 'good.qcow2'), 'openstack'))).toEqual([])
    expect(codes(await validate(join(dir, 'compat010.qcow2'), 'openstack'))).toEqual([])
    expect(codes(await validate(join(dir, 'backing.qcow2'), 'openstack'))).toEqual(['BACKING_FILE', 'CONTENT_SKIPPED'])
    expect(codes(await validate(join(dir, 'datafile-raw.qcow2'), 'openstack'))).toEqual(['CONTENT_SKIPPED', 'DATA_FILE'])
    expect(codes(await validate(join(dir, 'json-backing.qcow2'), 'openstack'))).toEqual(['BACKING_FILE', 'CONTENT_SKIPPED', 'PROTOCOL_NAME'])
    expect(codes(await validate(damaged(dir, 'good.qcow2', 'os-mbr', [[510, [0x55, 0xaa]]]), 'openstack'))).toEqual(['POLYGLOT'])
    expect(codes(await validate(damaged(dir, 'good.qcow2', 'os-bit', [[72, u64(1n << 12n)]]), 'openstack'))).toEqual(['UNKNOWN_FEATURE'])
    // the structural check is real: a corruption fails even though the header is fine
    const file = join(dir, 'good.qcow2')
    const refblock = Number(readU64(file, Number(readU64(file, 48))))
    expect(codes(await validate(damaged(dir, 'good.qcow2', 'os-corrupt', [[refblock, [0, 0]]]), 'openstack'))).toEqual(['CHECK_CORRUPTIONS'])
    // a VMDK whose descriptor names another file (and whose createType the inspector does not read)
    expect(codes(await validate(join(dir, 'flat.vmdk'), 'openstack'))).toEqual(['CONTENT_SKIPPED', 'EXTENT_FILE', 'VMDK_CREATE_TYPE'])
    expect(codes(await validate(join(dir, 'sparse.vmdk'), 'openstack'))).toEqual([])
  })

  it('kubevirt: the virtual size plus 5.5% filesystem overhead must fit the target volume', async () => {
    const fits: PolicyInput = { extends: 'kubevirt', sizes: { targetVolumeSize: 1_106_297 } } // 1 MiB x 1.055 = 1106247.7
    const misses: PolicyInput = { extends: 'kubevirt', sizes: { targetVolumeSize: 1_106_247 } }
    expect(codes(await validate(join(dir, 'good.qcow2'), fits))).toEqual([])
    expect(codes(await validate(join(dir, 'good.qcow2'), misses))).toEqual(['TARGET_VOLUME'])
    expect(codes(await validate(join(dir, 'backing.qcow2'), 'kubevirt'))).toEqual(['BACKING_FILE', 'CONTENT_SKIPPED'])
  })

  it('azure: a fixed VHD of whole MiB passes; the whole-MiB size rule catches 1 MiB + 512 bytes', async () => {
    expect(codes(await validate(join(dir, 'fixed.vhd'), 'azure'))).toEqual([])
    expect(codes(await validate(join(dir, 'azure.vhd'), 'azure'))).toEqual([])
    expect(codes(await validate(join(dir, 'near-miss.vhd'), 'azure'))).toEqual(['VHD_FILE_SIZE', 'VIRTUAL_SIZE_ALIGNMENT'])
    // qemu-img sizes a dynamic disk without force_size up to a CHS geometry: 1 MiB becomes 1,079,296 bytes
    expect(codes(await validate(join(dir, 'dynamic.vhd'), 'azure'))).toEqual(['VHD_SUBFORMAT', 'VIRTUAL_SIZE_ALIGNMENT'])
    expect(codes(await validate(join(dir, 'size-1m.raw'), 'azure'))).toEqual(['FORMAT_NOT_ALLOWED'])
    expect(codes(await validate(join(dir, 'size-1m-512.raw'), 'azure'))).toEqual(['FORMAT_NOT_ALLOWED', 'VIRTUAL_SIZE_ALIGNMENT'])
    expect(codes(await validate(join(dir, 'size-1m-512.qcow2'), 'azure'))).toEqual(['FORMAT_NOT_ALLOWED', 'VIRTUAL_SIZE_ALIGNMENT'])
  })

  it('aws: raw with a partition table passes; raw without one and qcow2 fail', async () => {
    expect(codes(await validate(join(dir, 'gpt.raw'), 'aws'))).toEqual([])
    expect(codes(await validate(join(dir, 'good.raw'), 'aws'))).toEqual(['NO_PARTITION_TABLE'])
    expect(codes(await validate(join(dir, 'gpt.qcow2'), 'aws'))).toEqual(['FORMAT_NOT_ALLOWED'])
  })

  it('vsphere: a monolithicSparse VMDK (header version 1) is not what vSphere imports; qcow2 is not allowed', async () => {
    expect(codes(await validate(join(dir, 'sparse.vmdk'), 'vsphere'))).toEqual(['VMDK_CREATE_TYPE', 'VMDK_VERSION'])
    expect(codes(await validate(join(dir, 'good.qcow2'), 'vsphere'))).toEqual(expect.arrayContaining(['FORMAT_NOT_ALLOWED']))
  })
})
