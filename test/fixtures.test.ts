/**
 * The fixture loop: every image in images/qcow2/manifest.json (made by
 * images/make-fixtures.sh with qemu-img/qemu-io) against the golden output
 * qemu recorded beside it:
 *
 * - info (infoJson over image.info(), and `info --backing-chain --output json`)
 *   equals `qemu-img info --output=json` field by field, in qemu's key order;
 *   actual-size depends on the host filesystem, so it is compared with a stat
 *   of the file instead;
 * - `map --output json` equals `qemu-img map --output=json` as text;
 * - the md5 of our guest bytes equals the md5 of `qemu-img convert -O raw`;
 * - the fixture files are byte for byte unchanged afterwards (sha256 from the manifest).
 *
 * Gzipped fixtures are unpacked (with the files they need) into a temp dir.
 * Everything runs with the fixture's directory as the current directory and the
 * image named relative to it, as qemu-img was run, so file names compare exactly.
 */
import { createHash } from 'node:crypto'
import { readFileSync, statSync, writeFileSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { gunzipSync } from 'node:zlib'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { main } from '../src/cli/main.js'
import { infoJson } from '../src/cli/render/info.js'
import type { DiskImage, ImageInfo } from '../src/image/disk-image.js'
import { openImage } from '../src/open.js'
import { collector, makeTempDir, useTempDirs } from './support/qemu.js'

const FIXTURES = resolve(__dirname, '..', 'images', 'qcow2')

interface FileEntry {
  file: string
  image: string
  gzip: boolean
  size: number
  sha256: string
}

interface ManifestEntry extends FileEntry {
  name: string
  format: string
  virtualSize: number
  features: string[]
  requires: FileEntry[]
  md5: string
  golden: { info: string; chain: string | null; map: string; md5: string }
}

const manifest = JSON.parse(readFileSync(join(FIXTURES, 'manifest.json'), 'utf8')) as ManifestEntry[]

type Json = Record<string, unknown>

const sha256 = (path: string): string => createHash('sha256').update(readFileSync(path)).digest('hex')
const readJson = <T = Json>(path: string): T => JSON.parse(readFileSync(path, 'utf8')) as T

/**
 * The directory to run in: a temp dir holding the files unpacked and written densely. The goldens
 * describe files without holes (images/make-fixtures.sh rewrites them so), but a git checkout may
 * leave runs of zeros as holes, and qemu-img map reports holes in metadata-preallocated-looking
 * images as zero: the same bytes must be laid out as they were when the goldens were taken.
 */
function workDir(entry: ManifestEntry): string {
  const files = [entry, ...entry.requires]
  const dir = makeTempDir(`imgtool-fixture-${entry.name}-`)
  for (const f of files) {
    const from = join(FIXTURES, f.file)
    const bytes = f.gzip ? gunzipSync(readFileSync(from)) : readFileSync(from)
    writeFileSync(join(dir, f.image), bytes)
  }
  return dir
}

async function runCli(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = collector()
  const err = collector()
  const code = await main(['node', 'imgtool', ...args], { stdout: out, stderr: err, isTTY: false })
  return { code, stdout: out.text(), stderr: err.text() }
}

/** Field by field, in qemu's key order; actual-size is checked against a stat of the file. */
function expectInfo(ours: Json, golden: Json, where: string): void {
  const { ['actual-size']: ourActual, ...oursRest } = ours
  const { ['actual-size']: goldenActual, ...goldenRest } = golden
  expect(Object.keys(oursRest), `${where}: fields (in qemu's order)`).toEqual(Object.keys(goldenRest))
  for (const key of Object.keys(goldenRest)) {
    expect(oursRest[key], `${where}: field "${key}"`).toEqual(goldenRest[key])
  }
  expect(ourActual === undefined, `${where}: actual-size present`).toBe(goldenActual === undefined)
  if (ourActual !== undefined) {
    expect(ourActual, `${where}: actual-size is the file's allocated bytes`).toBe(statSync(String(ours['filename'])).blocks * 512)
  }
}

describe('qcow2 fixtures against qemu-img golden output', () => {
  useTempDirs()
  const home = process.cwd()
  afterAll(() => process.chdir(home))

  it('has a manifest naming every fixture kind the issue asks for', () => {
    expect(manifest.length).toBeGreaterThanOrEqual(30)
    const features = new Set(manifest.flatMap((e) => e.features))
    for (const f of [
      'v2',
      'v3',
      'cluster-512',
      'cluster-4096',
      'cluster-65536',
      'cluster-2097152',
      'refcount-1',
      'refcount-16',
      'refcount-64',
      'zero-clusters',
      'compressed-zlib',
      'compressed-zstd',
      'backing-chain',
      'snapshot',
      'extended-l2',
      'data-file',
      'bitmap',
      'lazy-refcounts',
      'dirty',
      'gzipped',
    ]) {
      expect(features, f).toContain(f)
    }
  })

  describe.each(manifest.map((e) => [e.name, e] as const))('%s', (_name, entry) => {
    let dir = ''
    let image: DiskImage | undefined
    let info: ImageInfo | undefined

    beforeAll(async () => {
      dir = workDir(entry)
      process.chdir(dir)
      image = await openImage(entry.image, { readOnly: true })
      info = await image.info()
    })
    afterAll(async () => {
      await image?.close()
      process.chdir(home)
    })

    it('info equals qemu-img info --output=json', () => {
      process.chdir(dir)
      expectInfo(infoJson(info!), readJson(join(FIXTURES, entry.golden.info)), entry.name)
    })

    if (entry.golden.chain !== null)
      it('info --backing-chain equals qemu-img info --backing-chain', async () => {
        process.chdir(dir)
        const golden = readJson<Json[]>(join(FIXTURES, entry.golden.chain!))
        // the library: infoJson over the chain of ImageInfo
        const chain: Json[] = []
        for (let i: ImageInfo | undefined = info; i; i = i.backing) chain.push(infoJson(i))
        expect(chain.length).toBe(golden.length)
        golden.forEach((g, k) => expectInfo(chain[k]!, g, `${entry.name} chain[${k}]`))
        // the CLI
        const r = await runCli(['info', '--output', 'json', '--backing-chain', entry.image])
        expect(r.stderr).toBe('')
        expect(r.code).toBe(0)
        const printed = JSON.parse(r.stdout) as Json[]
        expect(printed.length).toBe(golden.length)
        golden.forEach((g, k) => expectInfo(printed[k]!, g, `${entry.name} CLI chain[${k}]`))
      })

    it('info --output json through the CLI', async () => {
      process.chdir(dir)
      const r = await runCli(['info', '--output', 'json', entry.image])
      expect(r.stderr).toBe('')
      expect(r.code).toBe(0)
      expectInfo(JSON.parse(r.stdout) as Json, readJson(join(FIXTURES, entry.golden.info)), `${entry.name} CLI`)
    })

    it('map --output json equals qemu-img map --output=json (text)', async () => {
      process.chdir(dir)
      const r = await runCli(['map', '--output', 'json', entry.image])
      expect(r.stderr).toBe('')
      expect(r.code).toBe(0)
      const golden = readFileSync(join(FIXTURES, entry.golden.map), 'utf8')
      if (r.stdout !== golden) expect(JSON.parse(r.stdout)).toEqual(JSON.parse(golden))
      expect(r.stdout).toBe(golden)
    })

    it('guest bytes have the md5 of qemu-img convert -O raw', async () => {
      const h = createHash('md5')
      const size = image!.virtualSize
      expect(size).toBe(entry.virtualSize)
      const chunk = 4 * 1024 * 1024
      for (let pos = 0; pos < size; pos += chunk) h.update(await image!.read(pos, Math.min(chunk, size - pos)))
      const golden = readFileSync(join(FIXTURES, entry.golden.md5), 'utf8').trim()
      expect(golden).toBe(entry.md5)
      expect(h.digest('hex')).toBe(golden)
    })

    it('leaves the fixture files unchanged', () => {
      for (const f of [entry, ...entry.requires]) {
        expect(sha256(join(dir, f.image)), f.image).toBe(f.sha256)
      }
    })
  })
})
