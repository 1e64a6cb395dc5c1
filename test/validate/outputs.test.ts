/**
 * JUnit and SARIF outputs, validated by published schemas through real
 * validators (libxml2's xmllint as WebAssembly; ajv with the OASIS SARIF
 * 2.1.0 schema), never by our own parser. Schemas: test/validate/schemas/SOURCES.md.
 */
import Ajv04Module from 'ajv-draft-04'
import addFormatsModule from 'ajv-formats'
import { spawnSync } from 'node:child_process'
import { readFileSync, writeFileSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { beforeAll, describe, expect, it } from 'vitest'
import { validateXML } from 'xmllint-wasm'
import { cli } from '../support/cli.js'
import { describeQemu, makeTempDir, qemuImgOk, qemuIoOk, useTempDirs } from '../support/qemu.js'

useTempDirs()

// CommonJS packages: their default export is the module's `default` under NodeNext
const Ajv04 = ((Ajv04Module as { default?: unknown }).default ?? Ajv04Module) as typeof Ajv04Module.default
const addFormats = ((addFormatsModule as { default?: unknown }).default ?? addFormatsModule) as typeof addFormatsModule.default

const SCHEMAS = resolve(__dirname, 'schemas')
const BIN = resolve(__dirname, '..', '..', 'bin', 'imgtool')
const xsd = readFileSync(join(SCHEMAS, 'JUnit.xsd'), 'utf8')
const sarifSchema = JSON.parse(readFileSync(join(SCHEMAS, 'sarif-schema-2.1.0.json'), 'utf8')) as Record<string, unknown>

async function junitErrors(xml: string): Promise<string[]> {
  const r = await validateXML({ xml: [{ fileName: 'report.xml', contents: xml }], schema: [{ fileName: 'JUnit.xsd', contents: xsd }] })
  return r.valid ? [] : r.errors.map((e) => e.message)
}

function sarifValidator(): (doc: unknown) => string[] {
  const ajv = new Ajv04({ allErrors: true, strict: false })
  addFormats(ajv)
  const check = ajv.compile(sarifSchema)
  return (doc) => (check(doc) ? [] : (check.errors ?? []).map((e) => `${e.instancePath} ${e.message}`))
}

describeQemu('validate outputs against published schemas', () => {
  let images: string[] = []
  beforeAll(async () => {
    const dir = makeTempDir('imgtool-validate-out-')
    const good = join(dir, 'good.qcow2')
    const backed = join(dir, 'backed & <odd>.qcow2')
    const raw = join(dir, 'disk.raw')
    await qemuImgOk(['create', '-q', '-f', 'qcow2', good, '1M'])
    await qemuIoOk(good, ['write -P 0x44 0 64k'], { format: 'qcow2' })
    await qemuImgOk(['create', '-q', '-f', 'qcow2', '-u', '-b', 'json:{"file":{"driver":"nbd"}}', '-F', 'raw', backed, '1M'])
    await qemuImgOk(['convert', '-O', 'raw', good, raw])
    images = [good, backed, raw, join(dir, 'missing.qcow2')]
  })

  it('JUnit: one testcase per image x check, valid against the Ant JUnit schema', async () => {
    const r = await cli('validate', '--preset', 'produced', '--output', 'junit', ...images)
    expect(r.code).toBe(1) // one image is missing
    expect(await junitErrors(r.stdout)).toEqual([])
    expect(r.stdout.match(/<testcase /g)?.length).toBe(3 * 7 + 1)
    expect(r.stdout).toMatch(/<failure type="BACKING_FILE"/)
    expect(r.stdout).toMatch(/<testcase name="structure" classname="[^"]*disk\.raw" time="0"><skipped/)
    expect(r.stdout).toMatch(/<error type="COULD_NOT_VALIDATE"/)
  })

  it('JUnit: the schema check can fail (a document without the required hostname is refused)', async () => {
    const r = await cli('validate', '--preset', 'produced', '--output', 'junit', images[0]!)
    expect(await junitErrors(r.stdout)).toEqual([])
    expect((await junitErrors(r.stdout.replace(/ hostname="[^"]*"/, ''))).join()).toMatch(/hostname/)
  })

  it('SARIF 2.1.0: valid against the OASIS schema, one result per violation located by byte offset', async () => {
    const r = await cli('validate', '--preset', 'produced', '--output', 'sarif', ...images)
    const doc = JSON.parse(r.stdout) as {
      version: string
      runs: Array<{
        results: Array<{ ruleId: string; level: string; locations: Array<{ physicalLocation: { region?: { byteOffset: number } } }> }>
        tool: { driver: { rules: unknown[] } }
      }>
    }
    const errors = sarifValidator()(doc)
    expect(errors).toEqual([])
    expect(doc.version).toBe('2.1.0')
    const backing = doc.runs[0]!.results.find((x) => x.ruleId === 'BACKING_FILE')!
    expect(backing.level).toBe('error')
    expect(backing.locations[0]!.physicalLocation.region!.byteOffset).toBeGreaterThan(0)
    expect(doc.runs[0]!.results.map((x) => x.ruleId)).toContain('PROTOCOL_NAME')
  })

  describe('--manifest: one document over every image', () => {
    let manifest = ''
    beforeAll(() => {
      // images[3] is missing: an error entry in both documents
      manifest = join(makeTempDir('imgtool-validate-manifest-out-'), 'images.jsonl')
      const lines = images.map((path, i) => JSON.stringify(i === 2 ? { path, preset: 'openstack' } : { path }))
      writeFileSync(manifest, ['# four images', ...lines].join('\n') + '\n')
    })

    // --jobs > 1 runs worker threads from dist/: through the built CLI (bin/imgtool), as users run it
    const run = async (jobs: string, ...args: string[]): Promise<{ code: number; stdout: string }> => {
      if (jobs === '1') return cli(...args, '--jobs', jobs)
      const r = spawnSync(process.execPath, [BIN, ...args, '--jobs', jobs], { encoding: 'utf8', maxBuffer: 64 << 20 })
      return { code: r.status ?? -1, stdout: r.stdout }
    }

    for (const jobs of ['1', '3']) {
      it(`JUnit, --jobs ${jobs}: one <testsuites> with a suite per image, valid against the Ant JUnit schema`, async () => {
        const r = await run(jobs, 'validate', '--preset', 'produced', '--output', 'junit', '--manifest', manifest)
        expect(r.code).toBe(1) // one image is missing
        expect(await junitErrors(r.stdout)).toEqual([])
        expect(r.stdout.match(/<testsuites>/g)?.length).toBe(1)
        expect(r.stdout.match(/<testsuite /g)?.length).toBe(4)
        expect(r.stdout.match(/<testcase /g)?.length).toBe(3 * 7 + 1)
        // ids are the manifest lines (the comment is line 1)
        expect([...r.stdout.matchAll(/<testsuite [^>]* id="(\d+)"/g)].map((m) => Number(m[1])).sort()).toEqual([2, 3, 4, 5])
        expect(r.stdout).toMatch(/<failure type="BACKING_FILE"/)
        expect(r.stdout).toMatch(/<error type="COULD_NOT_VALIDATE"/)
      })

      it(`SARIF, --jobs ${jobs}: one run with every image's results, valid against the OASIS schema`, async () => {
        const r = await run(jobs, 'validate', '--preset', 'produced', '--output', 'sarif', '--manifest', manifest)
        expect(r.code).toBe(1)
        const doc = JSON.parse(r.stdout) as {
          runs: Array<{
            results: Array<{ ruleId: string; locations: Array<{ physicalLocation: { artifactLocation: { uri: string } } }> }>
            artifacts: unknown[]
            invocations: Array<{ executionSuccessful: boolean; toolExecutionNotifications: unknown[] }>
          }>
        }
        expect(sarifValidator()(doc)).toEqual([])
        expect(doc.runs.length).toBe(1)
        const one = doc.runs[0]!
        expect(one.artifacts.length).toBe(4)
        expect(one.invocations[0]!.executionSuccessful).toBe(false)
        expect(one.invocations[0]!.toolExecutionNotifications.length).toBe(1)
        // the single-image documents' results, together
        const single = JSON.parse((await cli('validate', '--preset', 'produced', '--output', 'sarif', images[1]!)).stdout) as typeof doc
        const backed = one.results.filter((x) => x.locations[0]!.physicalLocation.artifactLocation.uri.includes('backed'))
        expect(backed.map((x) => x.ruleId).sort()).toEqual(single.runs[0]!.results.map((x) => x.ruleId).sort())
        // line 4 (disk.raw) is validated under openstack, which allows raw without a digest rule failing
        expect(one.results.some((x) => x.locations[0]!.physicalLocation.artifactLocation.uri.includes('disk.raw'))).toBe(false)
      })
    }
  })

  it('SARIF: the schema check can fail (an unknown level is refused)', async () => {
    const r = await cli('validate', '--preset', 'produced', '--output', 'sarif', images[1]!)
    const doc = JSON.parse(r.stdout) as { runs: Array<{ results: Array<{ level: string }> }> }
    const check = sarifValidator()
    expect(check(doc)).toEqual([])
    doc.runs[0]!.results[0]!.level = 'fatal'
    expect(check(doc).join()).toMatch(/level/)
  })
})
