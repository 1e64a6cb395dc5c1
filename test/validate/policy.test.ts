/** Policy files: zod-validated JSON and YAML, deny by default, presets to extend, and the printed JSON Schema. */
import { Ajv2020 } from 'ajv/dist/2020.js'
import { mkdtempSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { loadPolicyFile, parsePolicyText, policyJsonSchema } from '../../src/cli/validate/policy-file.js'
import { basePolicy, PRESET_NAMES, PRESETS, resolvePolicy } from '../../src/index.js'

const dir = mkdtempSync(join(tmpdir(), 'imgtool-policy-'))
const write = (name: string, text: string): string => {
  const p = join(dir, name)
  writeFileSync(p, text)
  return p
}

describe('policy files', () => {
  it('reads a YAML policy that extends a preset and overrides one key', async () => {
    const file = write('p.yaml', 'extends: produced\nqcow2:\n  maxSnapshots: 2\nlimits:\n  maxTableBytes: 4096\n')
    const policy = await resolvePolicy(await loadPolicyFile(file))
    expect(policy.qcow2.maxSnapshots).toBe(2)
    expect(policy.limits.maxTableBytes).toBe(4096)
    // the preset's keys stay, the base's defaults fill the rest
    expect(policy.formats).toEqual(PRESETS.produced.formats)
    expect(policy.limits.timeoutSeconds).toBe(basePolicy().limits.timeoutSeconds)
  })

  it('reads the same policy as JSON', async () => {
    const file = write('p.json', JSON.stringify({ extends: 'produced', qcow2: { maxSnapshots: 2 } }))
    expect((await resolvePolicy(await loadPolicyFile(file))).qcow2.maxSnapshots).toBe(2)
  })

  it('names the wrong key and the file', async () => {
    const file = write('typo.yaml', 'qcow2:\n  compresion: [zstd]\n')
    await expect(loadPolicyFile(file)).rejects.toThrow(/typo\.yaml: invalid policy: unknown key 'qcow2\.compresion'/)
  })

  it('names a wrong top-level key and a wrong value', () => {
    expect(() => parsePolicyText('{"formatz": ["raw"]}', 'x.json')).toThrow(/x\.json: .*unknown key 'formatz'/)
    expect(() => parsePolicyText('qcow2: {dirty: maybe}', 'y.yml')).toThrow(/y\.yml: invalid policy: qcow2\.dirty/)
    expect(() => parsePolicyText('extends: gcp', 'z.yml')).toThrow(/z\.yml: invalid policy: extends/)
    expect(() => parsePolicyText('{', 'b.json')).toThrow(/b\.json: not valid JSON/)
  })

  it('denies by default: the base policy allows no format and no reference', () => {
    const p = basePolicy()
    expect(p.formats).toEqual([])
    expect(p.references).toEqual({ backingFile: false, dataFile: false, protocolNames: false, parentDirNames: false, absoluteNames: false })
    expect(p.qcow2.incompatibleFeatures).toEqual([])
    expect(p.limits.maxTableBytes).toBeGreaterThan(0)
    expect(p.limits.timeoutSeconds).toBeGreaterThan(0)
  })

  it('vmdk keys: createTypes and versions from a file, a wrong name or version refused; vsphere asks for a version 3 stream', async () => {
    const p = await resolvePolicy(parsePolicyText('extends: aws\nvmdk:\n  versions: [3]\n', 'v.yaml'))
    expect(p.vmdk).toEqual({ createTypes: ['streamOptimized'], versions: [3] })
    expect((await resolvePolicy('vsphere')).vmdk).toEqual({ createTypes: ['streamOptimized'], versions: [3] })
    expect(() => parsePolicyText('vmdk: {createTypes: [monolithicsparse]}', 'c.yml')).toThrow(/c\.yml: invalid policy: vmdk\.createTypes/)
    expect(() => parsePolicyText('vmdk: {versions: [4]}', 'n.yml')).toThrow(/n\.yml: invalid policy: vmdk\.versions/)
    expect(() => parsePolicyText('vmdk: {subformats: [flat]}', 'k.yml')).toThrow(/unknown key 'vmdk\.subformats'/)
  })

  it('every preset resolves', async () => {
    for (const name of PRESET_NAMES) expect((await resolvePolicy(name)).formats.length).toBeGreaterThan(0)
  })

  it('prints a JSON Schema that a JSON Schema validator compiles and applies', () => {
    const ajv = new Ajv2020({ strict: false })
    const validate = ajv.compile(policyJsonSchema())
    expect(validate({ extends: 'openstack', qcow2: { compat: ['1.1'] }, limits: { maxTableBytes: 1024 } })).toBe(true)
    expect(validate({ qcow2: { compresion: ['zstd'] } })).toBe(false)
    expect(validate({ formats: ['floppy'] })).toBe(false)
  })
})
