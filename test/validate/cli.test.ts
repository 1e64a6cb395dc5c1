/** imgtool validate on the command line: renderings, exit codes, policy errors; and the documented code table. */
import { readFileSync, writeFileSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { beforeAll, describe, expect, it } from 'vitest'
import { CODES } from '../../src/index.js'
import { cli } from '../support/cli.js'
import { describeQemu, makeTempDir, qemuImgOk, qemuIoOk, useTempDirs } from '../support/qemu.js'

useTempDirs()

describe('docs/validate.md', () => {
  it('documents every violation code with its check, severity and policy key, and no other', () => {
    const doc = readFileSync(resolve(__dirname, '..', '..', 'docs', 'validate.md'), 'utf8')
    const rows = [...doc.matchAll(/^\| `([A-Z_0-9]+)` +\| (\w+) +\| (\w+) +\| `([^`]+)` +\|/gm)].map((m) => [m[1], m[2], m[3], m[4]])
    expect(rows).toEqual(Object.entries(CODES).map(([code, c]) => [code, c.group, c.severity, c.key]))
  })
})

describeQemu('imgtool validate CLI', () => {
  let dir = ''
  let good = ''
  let backed = ''
  let dirty = ''
  beforeAll(async () => {
    dir = makeTempDir('imgtool-validate-cli-')
    good = join(dir, 'good.qcow2')
    backed = join(dir, 'backed.qcow2')
    dirty = join(dir, 'dirty.qcow2')
    await qemuImgOk(['create', '-q', '-f', 'qcow2', good, '1M'])
    await qemuIoOk(good, ['write -P 0x33 0 64k'], { format: 'qcow2' })
    await qemuImgOk(['create', '-q', '-f', 'qcow2', '-b', 'good.qcow2', '-F', 'qcow2', backed])
    await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on', dirty, '1M'])
    const bytes = readFileSync(dirty)
    bytes.writeBigUInt64BE(1n, 72)
    writeFileSync(dirty, bytes)
  })

  it('exit 0 and one pass line per image, with its digest when the policy computes one', async () => {
    const r = await cli('validate', '--preset', 'openstack', good)
    expect(r.code).toBe(0)
    expect(r.stdout).toMatch(/^pass: .*good\.qcow2 \(qcow2, 1048576 bytes\) sha256:[0-9a-f]{64}$/m)
    expect(r.stdout).toMatch(/1 image\(s\): 1 passed, 0 failed/)
    // produced reads no guest data unless a digest is expected
    const produced = await cli('validate', '--preset', 'produced', good)
    expect(produced.code).toBe(0)
    expect(produced.stdout).toMatch(/^pass: .*good\.qcow2 \(qcow2, 1048576 bytes\)$/m)
  })

  it('exit 2 on a violation, with code, message and policy key', async () => {
    const r = await cli('validate', '--preset', 'produced', good, backed)
    expect(r.code).toBe(2)
    expect(r.stdout).toMatch(
      /^error: BACKING_FILE: .*backed\.qcow2: names backing file 'good\.qcow2'.*\(header backing_file at 0x[0-9a-f]+\) \[references\.backingFile\]$/m,
    )
    expect(r.stdout).toMatch(/^FAIL: .*backed\.qcow2/m)
  })

  it('--fail-on warning turns a warning into exit 2', async () => {
    const policy = join(dir, 'warn.yaml')
    writeFileSync(policy, 'extends: produced\nqcow2:\n  dirty: warn\n  compatibleFeatures: [lazy-refcounts]\n')
    expect((await cli('validate', '--policy', policy, dirty)).code).toBe(0)
    expect((await cli('validate', '--policy', policy, '--fail-on', 'warning', dirty)).code).toBe(2)
  })

  it('exit 1 when an image cannot be read, and for usage errors', async () => {
    const r = await cli('validate', '--preset', 'produced', good, join(dir, 'missing.qcow2'))
    expect(r.code).toBe(1)
    expect(r.stdout).toMatch(/missing\.qcow2: could not validate: .*No such file/)
    expect((await cli('validate', '--preset', 'nosuch', good)).code).toBe(1)
    expect((await cli('validate', '--preset', 'produced')).code).toBe(1)
  })

  it('a wrong policy key is exit 1 naming the key and the file', async () => {
    const policy = join(dir, 'typo.yaml')
    writeFileSync(policy, 'extends: produced\nsizes:\n  maxVirtualSise: 10\n')
    const r = await cli('validate', '--policy', policy, good)
    expect(r.code).toBe(1)
    expect(r.stderr).toMatch(/typo\.yaml: invalid policy: unknown key 'sizes\.maxVirtualSise'/)
  })

  it('--output json prints one document with the report and a summary', async () => {
    const r = await cli('validate', '--preset', 'produced', '--output', 'json', good, backed)
    const doc = JSON.parse(r.stdout) as {
      version: number
      images: Array<{ status: string; violations: Array<{ code: string }> }>
      summary: Record<string, number>
    }
    expect(doc.version).toBe(1)
    expect(doc.images.map((i) => i.status)).toEqual(['pass', 'fail'])
    expect(doc.images[1]!.violations.map((v) => v.code)).toContain('BACKING_FILE')
    expect(doc.summary).toMatchObject({ images: 2, passed: 1, failed: 1, errors: 0 })
  })

  it('the library call validate(path, policy) returns the report the JSON output carries', async () => {
    const { validate } = await import('../../src/index.js')
    const lib = await validate(backed, 'produced')
    const r = await cli('validate', '--preset', 'produced', '--output', 'json', backed)
    const { status, durationMs: _d, ...fromCli } = (JSON.parse(r.stdout) as { images: Array<Record<string, unknown>> }).images[0]!
    const { durationMs: _l, ...fromLib } = lib as unknown as Record<string, unknown>
    expect(status).toBe('fail')
    expect(fromCli).toEqual(JSON.parse(JSON.stringify(fromLib)))
  })

  it('--print-schema prints the JSON Schema of policy files', async () => {
    const r = await cli('validate', '--print-schema')
    expect(r.code).toBe(0)
    const schema = JSON.parse(r.stdout) as { properties: Record<string, unknown>; additionalProperties: boolean }
    expect(Object.keys(schema.properties)).toEqual(expect.arrayContaining(['extends', 'formats', 'qcow2', 'limits', 'severity']))
    expect(schema.additionalProperties).toBe(false)
  })
})
