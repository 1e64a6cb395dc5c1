/**
 * VMDK under validate: identity (KDMV header or descriptor file), the sparse
 * header version and createType against the policy, the descriptor checked by
 * the format's strict grammar, extent files and a delta disk's parent reported
 * and never opened, the sizes and digest qemu-img agrees with, the structure
 * check `imgtool check` runs, and the vSphere and AWS presets.
 * Fixtures: fixtures/make.sh (qemu-img create/convert -O vmdk -o subformat=...).
 */
import { execFileSync, spawnSync } from 'node:child_process'
import { createHash } from 'node:crypto'
import { existsSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs'
import { basename, dirname, join, resolve } from 'node:path'
import { beforeAll, expect, it } from 'vitest'
import { check, validate } from '../../src/index.js'
import { cli } from '../support/cli.js'
import { describeQemu, QEMU_IMG, useTempDirs } from '../support/qemu.js'
import { codes, damaged, makeFixtures, permissive, PERMISSIVE, run } from './fixtures.js'
import { gptDisk } from './partitions.js'

useTempDirs()

const IMG = QEMU_IMG ?? 'qemu-img'
const qemuInfo = (file: string): { 'virtual-size': number; format: string; 'backing-filename'?: string } =>
  JSON.parse(execFileSync(IMG, ['info', '-f', 'vmdk', '--output=json', file], { encoding: 'utf8' })) as {
    'virtual-size': number
    format: string
    'backing-filename'?: string
  }

/** the sparse header's version field (u32le at 4), as qemu-img wrote it */
const headerVersion = (file: string): number => readFileSync(file).readUInt32LE(4)
/** where the embedded descriptor starts (header descriptorOffset, sectors, u64le at 28) */
const descriptorAt = (file: string): number => Number(readFileSync(file).readBigUInt64LE(28)) * 512

/** `text` at the first place `find` occurs in the embedded descriptor, padded with blanks to the same length */
function patchDescriptor(dir: string, name: string, tag: string, find: string, text: string): string {
  const file = join(dir, name)
  const at = readFileSync(file).indexOf(find, descriptorAt(file), 'latin1')
  expect(at).toBeGreaterThan(0)
  expect(text.length).toBeLessThanOrEqual(find.length)
  return damaged(dir, name, tag, [[at, Buffer.from(text.padEnd(find.length, ' '), 'latin1')]])
}

/** a copy of a descriptor file qemu-img wrote, with its text edited */
function editDescriptor(dir: string, name: string, tag: string, edit: (s: string) => string): string {
  const out = join(dir, `${tag}-${name}`)
  writeFileSync(out, edit(readFileSync(join(dir, name), 'latin1')), 'latin1')
  return out
}

describeQemu('validate on VMDK', () => {
  let dir = ''
  beforeAll(() => {
    dir = makeFixtures()
  })

  it('hosted sparse files pass with the virtual size qemu-img reports; qemu writes header versions 1, 2 and 3', async () => {
    for (const [f, version] of [
      ['sparse.vmdk', 1],
      ['sparse-data.vmdk', 1],
      ['zeroed.vmdk', 2],
      ['stream.vmdk', 3],
    ] as const) {
      const file = join(dir, f)
      expect({ f, version: headerVersion(file) }).toEqual({ f, version })
      const r = await run(dir, f, PERMISSIVE)
      expect({ f, format: r.format, codes: codes(r), notes: r.notes }).toEqual({ f, format: 'vmdk', codes: [], notes: [] })
      expect(r.signatures).toEqual([{ signature: 'vmdk', offset: 0 }])
      expect(r.virtualSize).toBe(qemuInfo(file)['virtual-size'])
      expect(r.checks).toMatchObject({ identity: 'pass', features: 'pass', structure: 'pass', content: 'pass' })
      expect(r.fileSize).toBe(statSync(file).size)
    }
    expect(codes(await validate(join(dir, 'stream.vmdk'), PERMISSIVE, { expectFormat: 'vmdk' }))).toEqual([])
    expect(codes(await validate(join(dir, 'stream.vmdk'), PERMISSIVE, { expectFormat: 'qcow2' }))).toEqual(['FORMAT_MISMATCH'])
  })

  it('the guest digest of every hosted sparse fixture is sha256 of what qemu-img convert -O raw makes of it', async () => {
    for (const f of ['sparse.vmdk', 'sparse-data.vmdk', 'zeroed.vmdk', 'stream.vmdk']) {
      const out = join(dir, `${f}.raw`)
      execFileSync(IMG, ['convert', '-f', 'vmdk', '-O', 'raw', join(dir, f), out])
      const expected = createHash('sha256').update(readFileSync(out)).digest('hex')
      expect({ f, hex: (await run(dir, f, PERMISSIVE)).digest?.hex }).toEqual({ f, hex: expected })
    }
    // the three layouts of good.raw's guest hash alike, and the data is really there
    expect((await run(dir, 'stream.vmdk', PERMISSIVE)).digest!.hex).toBe(
      createHash('sha256')
        .update(readFileSync(join(dir, 'good.raw')))
        .digest('hex'),
    )
  })

  it('VMDK_VERSION: the sparse header version against vmdk.versions; a version no reader knows is HEADER_INVALID', async () => {
    const only3 = permissive({ vmdk: { versions: [3] } })
    expect(codes(await run(dir, 'stream.vmdk', only3))).toEqual([])
    const v1 = await run(dir, 'sparse-data.vmdk', only3)
    expect(codes(v1)).toEqual(['VMDK_VERSION'])
    expect(v1.violations[0]).toMatchObject({ structure: 'header version', offset: 4, policyKey: 'vmdk.versions' })
    expect(codes(await run(dir, 'zeroed.vmdk', only3))).toEqual(['VMDK_VERSION'])
    const v4 = await validate(damaged(dir, 'sparse-data.vmdk', 'v4', [[4, [4, 0, 0, 0]]]), PERMISSIVE)
    expect(codes(v4)).toEqual(['HEADER_INVALID'])
    expect(v4.violations[0]!.offset).toBe(4)
    expect(v4.checks).toMatchObject({ structure: 'skip', content: 'skip' })
  })

  it('VMDK_CREATE_TYPE: the descriptor createType against vmdk.createTypes, and against the header it sits in', async () => {
    const streamOnly = permissive({ vmdk: { createTypes: ['streamOptimized'] } })
    expect(codes(await run(dir, 'stream.vmdk', streamOnly))).toEqual([])
    const sparse = await run(dir, 'sparse-data.vmdk', streamOnly)
    expect(codes(sparse)).toEqual(['VMDK_CREATE_TYPE'])
    expect(sparse.violations[0]!.message).toMatch(/createType 'monolithicSparse' is not allowed/)
    // an uncompressed sparse file whose descriptor claims to be a stream
    const liar = patchDescriptor(dir, 'sparse-data.vmdk', 'liar', 'createType="monolithicSparse"', 'createType="streamOptimized"')
    const r = await validate(liar, PERMISSIVE)
    expect(codes(r)).toEqual(['VMDK_CREATE_TYPE'])
    expect(r.violations[0]!.message).toMatch(/says createType 'streamOptimized', but the sparse header \(compressAlgorithm 0\) is a monolithicSparse one/)
  })

  it("VMDK_DESCRIPTOR: a descriptor the format's strict grammar refuses is one violation naming the line", async () => {
    const file = join(dir, 'sparse-data.vmdk')
    const bad = patchDescriptor(dir, 'sparse-data.vmdk', 'grammar', 'version=1', 'version 1')
    const r = await validate(bad, PERMISSIVE)
    expect(codes(r)).toEqual(['VMDK_DESCRIPTOR'])
    expect(r.violations[0]).toMatchObject({ structure: 'embedded descriptor', offset: descriptorAt(file) })
    expect(r.violations[0]!.message).toMatch(/embedded descriptor line 2: not a comment, a key = value line or an extent line: version 1/)
    expect(r.violations[0]!.message).not.toMatch(/\n|at .*\.ts:/)
    expect(r.checks).toMatchObject({ structure: 'skip', content: 'skip' })
    // a descriptor file: the broken line does not hide the extent it names
    const broken = editDescriptor(dir, 'flat.vmdk', 'grammar', (s) => s.replace('"flat-flat.vmdk"', '"../x"').replace('version=1', 'version=1 junk'))
    const b = await validate(broken, permissive({ references: { dataFile: false, parentDirNames: false } }))
    expect(codes(b)).toEqual(['EXTENT_FILE', 'PARENT_DIR_NAME', 'VMDK_DESCRIPTOR'])
    expect(b.violations.find((v) => v.code === 'VMDK_DESCRIPTOR')!.message).toMatch(/descriptor line 2: value of 'version'/)
    // the embedded extent line must be the header's disk: QEMU sizes by the header, VMware by the descriptor
    const two = patchDescriptor(dir, 'stream.vmdk', 'size', 'RW 2048 SPARSE', 'RW 4096 SPARSE')
    const t = await validate(two, PERMISSIVE)
    expect(codes(t)).toEqual(['VMDK_DESCRIPTOR'])
    expect(t.violations[0]!.message).toMatch(/line \d+: an extent of 4096 sectors, but the header's capacity is 2048/)
    expect(qemuInfo(two)['virtual-size']).toBe(2048 * 512)
  })

  it('descriptor files: every extent is reported with its line, never opened; sizes as qemu-img reads them', async () => {
    for (const [f, type, extent] of [
      ['flat.vmdk', 'FLAT', 'flat-flat.vmdk'],
      ['split-sparse.vmdk', 'SPARSE', 'split-sparse-s001.vmdk'],
      ['split-flat.vmdk', 'FLAT', 'split-flat-f001.vmdk'],
    ] as const) {
      const r = await run(dir, f, permissive({ references: { dataFile: false } }))
      expect({ f, codes: codes(r) }).toEqual({ f, codes: ['CONTENT_SKIPPED', 'EXTENT_FILE'] })
      const v = r.violations.find((x) => x.code === 'EXTENT_FILE')!
      expect(v.message).toContain(`names ${type} extent '${extent}'; not opened`)
      expect(v.structure).toBe('descriptor line 8 extent')
      expect(readFileSync(join(dir, f), 'latin1').slice(v.offset).startsWith(`RW 2048 ${type} "${extent}"`)).toBe(true)
      expect(r.checks).toMatchObject({ references: 'fail', structure: 'skip', content: 'fail' })
      // qemu-img follows the extents; the descriptor alone gives the same size
      expect(r.virtualSize).toBe(qemuInfo(join(dir, f))['virtual-size'])
      // allowed references: nothing else to say, and still nothing read
      const ok = await run(dir, f, permissive({ content: { digest: false } }))
      expect({ f, codes: codes(ok), digest: ok.digest }).toEqual({ f, codes: [], digest: undefined })
    }
  })

  it('hostile extent names (.., absolute, protocol) are reported and nothing is opened: the files do not exist', async () => {
    const deny = permissive({ references: { dataFile: false, parentDirNames: false, absoluteNames: false, protocolNames: false } })
    const missing = join(dir, 'no-such-dir', 'secret')
    for (const [name, code] of [
      [`../x-${basename(dir)}`, 'PARENT_DIR_NAME'],
      ['/etc/passwd', 'ABSOLUTE_NAME'],
      [missing, 'ABSOLUTE_NAME'],
      ['nbd:localhost:10809', 'PROTOCOL_NAME'],
    ] as const) {
      const f = editDescriptor(dir, 'flat.vmdk', `hostile${name.length}`, (s) => s.replace('"flat-flat.vmdk"', `"${name}"`))
      if (name !== '/etc/passwd') expect(existsSync(resolve(dirname(f), name))).toBe(false)
      const r = await validate(f, deny)
      expect({ name, codes: codes(r) }).toEqual({ name, codes: ['CONTENT_SKIPPED', 'EXTENT_FILE', code].sort() })
      expect(r.violations.find((v) => v.code === code)!.message).toContain(`extent name '${name}'`)
      expect(r.checks.structure).toBe('skip')
    }
    // the vsphere preset refuses it on both counts
    const up = editDescriptor(dir, 'flat.vmdk', 'up', (s) => s.replace('"flat-flat.vmdk"', '"../x"'))
    expect(codes(await validate(up, 'vsphere'))).toEqual(['CONTENT_SKIPPED', 'EXTENT_FILE', 'PARENT_DIR_NAME', 'VMDK_CREATE_TYPE'])
  })

  it("a delta disk's parent (parentCID, parentFileNameHint) is a backing reference, never opened", async () => {
    const file = join(dir, 'delta.vmdk')
    const parent = qemuInfo(file)['backing-filename']!
    const r = await run(dir, 'delta.vmdk', permissive({ references: { backingFile: false } }))
    expect(codes(r)).toEqual(['BACKING_FILE', 'CONTENT_SKIPPED'])
    expect(r.violations[0]!.message).toContain(`parentFileNameHint names parent '${parent}'; not opened`)
    expect(readFileSync(file, 'latin1').slice(r.violations[0]!.offset).startsWith('parentFileNameHint=')).toBe(true)
    expect(r.checks).toMatchObject({ references: 'fail', structure: 'skip' })
    expect(r.virtualSize).toBe(qemuInfo(file)['virtual-size'])
    // the name rules of any backing name: a parent up the tree
    const up = patchDescriptor(dir, 'delta.vmdk', 'up', `parentFileNameHint="${parent}"`, 'parentFileNameHint="../p.vmdk"')
    expect(codes(await validate(up, permissive({ references: { parentDirNames: false } })))).toEqual(['CONTENT_SKIPPED', 'PARENT_DIR_NAME'])
  })

  it('structure: the same check as imgtool check; a grain past the end of the file is a corruption qemu-img check sees too', async () => {
    const file = join(dir, 'sparse-data.vmdk')
    const bytes = readFileSync(file)
    const gd = Number(bytes.readBigUInt64LE(56)) * 512
    const gt = bytes.readUInt32LE(gd) * 512
    const bad = damaged(dir, 'sparse-data.vmdk', 'eof', [[gt, [0x00, 0x00, 0x10, 0x00]]]) // grain 0 at sector 0x100000 (512 MiB)
    expect(spawnSync(IMG, ['check', '-f', 'vmdk', bad]).status).not.toBe(0)
    const r = await validate(bad, PERMISSIVE)
    expect(codes(r)).toContain('CHECK_CORRUPTIONS')
    const engine = await check(bad)
    expect(engine.corruptions).toBeGreaterThan(0)
    expect(r.violations.find((v) => v.code === 'CHECK_CORRUPTIONS')!.message).toContain(engine.findings.find((f) => f.severity === 'corruption')!.message)
    expect(r.checks.content).toBe('skip')
  })

  it('limits and identity: a grain directory over maxTableBytes is not read; a KDMV file with an MBR signature is a polyglot', async () => {
    const r = await run(dir, 'sparse-data.vmdk', permissive({ limits: { maxTableBytes: 2 } }))
    expect(codes(r)).toEqual(['LIMIT_TABLE_SIZE'])
    expect(r.checks).toMatchObject({ structure: 'skip', content: 'skip' })
    const poly = await validate(damaged(dir, 'stream.vmdk', 'mbr', [[510, [0x55, 0xaa]]]), PERMISSIVE)
    expect(codes(poly)).toEqual(['POLYGLOT'])
    expect(poly.violations[0]).toMatchObject({ structure: 'mbr signature', offset: 510 })
  })

  it('CHECK_FAILED: a stream header that sends the reader to a footer the file lacks; the file is closed again', async () => {
    const bad = damaged(dir, 'sparse-data.vmdk', 'gdend', [[56, Array<number>(8).fill(0xff)]])
    expect(spawnSync(IMG, ['info', '-f', 'vmdk', bad]).status).not.toBe(0)
    const fds = (): number => readdirSync('/proc/self/fd').length
    const before = fds()
    const r = await validate(bad, PERMISSIVE)
    expect(codes(r)).toEqual(['CHECK_FAILED'])
    expect(r.violations.find((v) => v.code === 'CHECK_FAILED')!.message).toMatch(/invalid footer/)
    expect(fds()).toBe(before)
  })

  it("identity as qemu-img probes: a descriptor without its '# Disk DescriptorFile' line is a VMDK, not raw", async () => {
    const f = editDescriptor(dir, 'flat.vmdk', 'nohdr', (s) => s.replace(/^# Disk DescriptorFile\n/, ''))
    expect(readFileSync(f, 'latin1').startsWith('version=1\n')).toBe(true)
    // qemu-img, probing, opens it as a VMDK and follows its extent
    expect((JSON.parse(execFileSync(IMG, ['info', '--output=json', f], { encoding: 'utf8' })) as { format: string }).format).toBe('vmdk')
    const r = await validate(f, permissive({ references: { dataFile: false } }))
    expect(r.format).toBe('vmdk')
    expect(codes(r)).toEqual(['CONTENT_SKIPPED', 'EXTENT_FILE'])
    expect(codes(await validate(f, permissive({ formats: ['raw'] })))).toEqual(['CONTENT_SKIPPED', 'FORMAT_NOT_ALLOWED'])
    // the rule is qemu's: only comments and blank lines may come before 'version='
    const late = editDescriptor(dir, 'flat.vmdk', 'late', (s) => s.replace(/^# Disk DescriptorFile\n/, 'x=1\n'))
    expect((JSON.parse(execFileSync(IMG, ['info', '--output=json', late], { encoding: 'utf8' })) as { format: string }).format).toBe('raw')
    expect((await validate(late, PERMISSIVE)).format).toBe('raw')
    // a VMDK3 ('COWD') extent, which qemu's vmdk driver also claims, is detected and not read
    const cowd = join(dir, 'cowd.vmdk')
    writeFileSync(cowd, Buffer.concat([Buffer.from('COWD'), Buffer.alloc(4092)]))
    const c = await validate(cowd, PERMISSIVE)
    expect({ format: c.format, codes: codes(c) }).toEqual({ format: 'vmdk', codes: ['UNSUPPORTED_FORMAT'] })
  })

  it('LIMIT_MEMORY and sizes: the directories the check would hold; the virtual size of a hosted file and of a descriptor file', async () => {
    const mem = await run(dir, 'sparse-data.vmdk', permissive({ limits: { maxMetadataMemory: 1 << 20 } }))
    expect(codes(mem)).toEqual(['LIMIT_MEMORY'])
    expect(mem.checks).toMatchObject({ structure: 'skip', content: 'skip' })
    const align = permissive({ sizes: { virtualSizeAlignment: 2 << 20 } })
    expect(codes(await run(dir, 'stream.vmdk', align))).toEqual(['VIRTUAL_SIZE_ALIGNMENT'])
    const small = permissive({ sizes: { maxVirtualSize: 1 << 19 } })
    expect(codes(await run(dir, 'stream.vmdk', small))).toEqual(['VIRTUAL_SIZE_BOUNDS'])
    expect(codes(await run(dir, 'split-flat.vmdk', small))).toEqual(['CONTENT_SKIPPED', 'VIRTUAL_SIZE_BOUNDS'])
  })

  it('a broken descriptor file whose quote spans lines: every message stays one line', async () => {
    const f = editDescriptor(dir, 'flat.vmdk', 'span', (s) => s.replace('"flat-flat.vmdk" 0', '"flat-flat.vmdk\x01 0\n\n# x\n"'))
    const r = await validate(f, permissive({ references: { dataFile: false } }))
    expect(codes(r)).toEqual(['VMDK_DESCRIPTOR'])
    for (const v of r.violations) expect(v.message).not.toMatch(/[\n\r\x01]/)
  })

  it('presets: vsphere and aws take the streamOptimized image qemu-img makes and refuse monolithicSparse', async () => {
    expect(codes(await validate(join(dir, 'stream.vmdk'), 'vsphere'))).toEqual([])
    expect(codes(await validate(join(dir, 'sparse-data.vmdk'), 'vsphere'))).toEqual(['VMDK_CREATE_TYPE', 'VMDK_VERSION'])
    expect(codes(await validate(join(dir, 'delta.vmdk'), 'vsphere'))).toEqual(['BACKING_FILE', 'CONTENT_SKIPPED', 'VMDK_CREATE_TYPE', 'VMDK_VERSION'])
    // AWS requires a partition table as well: the guest is a GPT disk, converted by qemu-img
    writeFileSync(join(dir, 'aws.raw'), gptDisk(2048, [{ first: 34, last: 2000 }]))
    execFileSync(IMG, ['convert', '-f', 'raw', '-O', 'vmdk', '-o', 'subformat=streamOptimized', join(dir, 'aws.raw'), join(dir, 'aws-stream.vmdk')])
    execFileSync(IMG, ['convert', '-f', 'raw', '-O', 'vmdk', join(dir, 'aws.raw'), join(dir, 'aws-sparse.vmdk')])
    expect(codes(await validate(join(dir, 'aws-stream.vmdk'), 'aws'))).toEqual([])
    expect(codes(await validate(join(dir, 'aws-sparse.vmdk'), 'aws'))).toEqual(['VMDK_CREATE_TYPE'])
    expect(codes(await validate(join(dir, 'stream.vmdk'), 'aws'))).toEqual(['NO_PARTITION_TABLE'])
  })

  it('the CLI: exit 0 on a stream for vsphere, exit 2 with the code in JSON on monolithicSparse', async () => {
    const ok = await cli('validate', '--preset', 'vsphere', join(dir, 'stream.vmdk'))
    expect(ok.code).toBe(0)
    const bad = await cli('validate', '--preset', 'vsphere', '--output', 'json', join(dir, 'sparse-data.vmdk'))
    expect(bad.code).toBe(2)
    const doc = JSON.parse(bad.stdout) as { images: Array<{ format: string; violations: Array<{ code: string }> }> }
    expect(doc.images[0]!.format).toBe('vmdk')
    expect(doc.images[0]!.violations.map((v) => v.code)).toEqual(['VMDK_VERSION', 'VMDK_CREATE_TYPE'])
  })
})
