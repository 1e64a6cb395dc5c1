/**
 * Many images: --manifest (JSON lines) in process, and 1,000 images on worker
 * threads through the built CLI (dist/, as bin/imgtool runs it) with the peak
 * memory of the process measured.
 */
import { execFile } from 'node:child_process'
import { copyFileSync, existsSync, writeFileSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { promisify } from 'node:util'
import { beforeAll, expect, it } from 'vitest'
import { cli } from '../support/cli.js'
import { describeQemu, makeTempDir, qemuImgOk, qemuIoOk, useTempDirs } from '../support/qemu.js'

useTempDirs()
const ROOT = resolve(__dirname, '..', '..')
const MAIN = join(ROOT, 'dist', 'cli', 'main.js')

interface Line {
  index?: number
  file?: string
  status?: string
  error?: string
  violations?: Array<{ code: string }>
  digest?: { hex: string }
  summary?: Record<string, number>
}
const lines = (text: string): Line[] =>
  text
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l) as Line)

/** Run the built CLI in a child process; it prints its peak RSS (bytes) on the last stderr line. */
async function builtCli(args: string[]): Promise<{ stdout: string; maxRss: number }> {
  if (!existsSync(MAIN)) throw new Error(`${MAIN} is missing: run npm run build first`)
  const script = `const { main } = await import(${JSON.stringify(MAIN)}); const code = await main(['node', 'imgtool', ...process.argv.slice(2)], { stdout: process.stdout, stderr: process.stderr, isTTY: false }); process.stderr.write('\\nmaxRSS=' + process.resourceUsage().maxRSS * 1024 + '\\n'); process.exitCode = code`
  const runner = join(makeTempDir('imgtool-validate-run-'), 'run.mjs')
  writeFileSync(runner, script)
  const { stdout, stderr } = await promisify(execFile)(process.execPath, [runner, ...args], { maxBuffer: 64 << 20 })
  return { stdout, maxRss: Number(/maxRSS=(\d+)/.exec(stderr)![1]) }
}

describeQemu('validate --manifest', () => {
  let dir = ''
  let goodDigest = ''
  beforeAll(async () => {
    dir = makeTempDir('imgtool-validate-many-')
    await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', join(dir, 'small.qcow2'), '64k'])
    await qemuIoOk(join(dir, 'small.qcow2'), ['write -P 0x61 0 4k'], { format: 'qcow2' })
    await qemuImgOk(['convert', '-O', 'raw', join(dir, 'small.qcow2'), join(dir, 'small.raw')])
    await qemuImgOk(['create', '-q', '-f', 'qcow2', '-b', 'small.qcow2', '-F', 'qcow2', join(dir, 'backed.qcow2')])
    // openstack computes the digest; produced does only when a line asks for one
    const r = await cli('validate', '--preset', 'openstack', '--output', 'json', join(dir, 'small.raw'))
    goodDigest = (JSON.parse(r.stdout) as { images: Line[] }).images[0]!.digest!.hex
  })

  it('streams one JSON line per image and a summary; lines carry format, preset, policy and digest', async () => {
    writeFileSync(join(dir, 'strict.yaml'), 'extends: produced\nformats: [raw]\n')
    const manifest = join(dir, 'm.jsonl')
    writeFileSync(
      manifest,
      [
        JSON.stringify({ path: 'small.qcow2', format: 'qcow2', digest: `sha256:${goodDigest}` }),
        JSON.stringify({ path: 'small.raw', format: 'qcow2' }),
        JSON.stringify({ path: 'small.qcow2', digest: '00'.repeat(32) }),
        JSON.stringify({ path: 'backed.qcow2', preset: 'openstack' }),
        JSON.stringify({ path: 'small.qcow2', policy: 'strict.yaml' }),
        '',
        JSON.stringify({ path: 'missing.qcow2' }),
      ].join('\n') + '\n',
    )
    const r = await cli('validate', '--preset', 'produced', '--manifest', manifest, '--output', 'json')
    const out = lines(r.stdout)
    expect(out).toHaveLength(7)
    const byIndex = new Map(out.filter((l) => l.index !== undefined).map((l) => [l.index!, l]))
    const codesAt = (i: number): string[] => (byIndex.get(i)!.violations ?? []).map((v) => v.code)
    expect(byIndex.get(1)!.status).toBe('pass')
    expect(codesAt(2)).toEqual(['FORMAT_MISMATCH'])
    expect(codesAt(3)).toEqual(['DIGEST_MISMATCH'])
    expect(codesAt(4)).toEqual(['BACKING_FILE', 'CONTENT_SKIPPED'])
    expect(codesAt(5)).toEqual(['FORMAT_NOT_ALLOWED'])
    expect(byIndex.get(7)!.status).toBe('error')
    expect(out[6]!.summary).toEqual({ images: 6, passed: 1, failed: 4, errors: 1, violations: 5 })
    expect(r.code).toBe(1)
  })

  it('a wrong key in a manifest line is exit 1 naming the file, line and key', async () => {
    const manifest = join(dir, 'bad.jsonl')
    writeFileSync(manifest, `${JSON.stringify({ path: 'small.raw' })}\n${JSON.stringify({ path: 'small.raw', sha: 'x' })}\n`)
    const r = await cli('validate', '--preset', 'produced', '--manifest', manifest, '--output', 'json')
    expect(r.code).toBe(1)
    expect(r.stderr).toMatch(/bad\.jsonl:2: unknown key 'sha'/)
  })

  it('1,000 images on 2 worker threads: every line, and peak memory that does not grow with the count', async () => {
    const many = join(dir, 'many')
    const write = (n: number): string => {
      const text: string[] = []
      for (let i = 0; i < n; i++) {
        const name = `${i}.${i % 2 ? 'qcow2' : 'raw'}`
        const file = join(dir, name)
        if (!existsSync(file)) copyFileSync(join(dir, i % 2 ? 'small.qcow2' : 'small.raw'), file)
        text.push(JSON.stringify({ path: name, digest: goodDigest }))
      }
      const m = `${many}-${n}.jsonl`
      writeFileSync(m, text.join('\n') + '\n')
      return m
    }
    const small = await builtCli(['validate', '--preset', 'produced', '--manifest', write(100), '--output', 'json', '--jobs', '2'])
    const big = await builtCli(['validate', '--preset', 'produced', '--manifest', write(1000), '--output', 'json', '--jobs', '2'])
    const out = lines(big.stdout)
    expect(out).toHaveLength(1001)
    expect(new Set(out.slice(0, 1000).map((l) => l.index)).size).toBe(1000)
    expect(out[1000]!.summary).toEqual({ images: 1000, passed: 1000, failed: 0, errors: 0, violations: 0 })
    // ten times the images, not ten times the memory (measured here: ~120 MB and ~145 MB)
    expect(big.maxRss).toBeLessThan(small.maxRss * 1.6)
  })
})
