/** Fixtures for the validate tests: made by fixtures/make.sh (qemu-img, qemu-io) into a temp dir; damage is applied here, in code. */
import { execFileSync } from 'node:child_process'
import { copyFileSync, openSync, closeSync, writeSync, readFileSync, appendFileSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { makeTempDir, QEMU_IMG, QEMU_IO } from '../support/qemu.js'
import { validate, type PolicyInput, type ValidationReport } from '../../src/index.js'

export const MAKE = resolve(__dirname, 'fixtures', 'make.sh')

export function makeFixtures(): string {
  const dir = makeTempDir('imgtool-validate-')
  try {
    execFileSync('sh', ['-x', MAKE, dir], {
      env: { ...process.env, QEMU_IMG: QEMU_IMG ?? 'qemu-img', QEMU_IO: QEMU_IO ?? 'qemu-io' },
      stdio: ['ignore', 'pipe', 'pipe'],
      maxBuffer: 16 << 20,
    })
  } catch (e) {
    // the trace (sh -x) names the command that failed
    const err = e as { status?: number; signal?: string; stderr?: Buffer }
    throw new Error(`make.sh failed (status ${err.status}, signal ${err.signal}):\n${err.stderr?.toString().split('\n').slice(-15).join('\n')}`)
  }
  return dir
}

/** Every qcow2 feature, reference and size allowed: a test turns on the one rule it means. */
export const PERMISSIVE: PolicyInput = {
  formats: ['raw', 'qcow2', 'dmsnap', 'vhd', 'vhdx', 'vmdk', 'iso'],
  references: { backingFile: true, dataFile: true, protocolNames: true, parentDirNames: true, absoluteNames: true },
  qcow2: {
    compat: ['0.10', '1.1'],
    incompatibleFeatures: ['dirty', 'corrupt', 'external-data-file', 'compression-type', 'extended-l2'],
    compatibleFeatures: ['lazy-refcounts'],
    autoclearFeatures: ['bitmaps', 'data-file-raw'],
    dirty: 'warn',
    compressionTypes: ['zlib', 'zstd'],
    encryption: true,
    maxSnapshots: 100,
    maxBitmaps: 100,
    refcountBits: [1, 2, 4, 8, 16, 32, 64],
    clusterSizes: [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288, 1048576, 2097152],
  },
  vhd: { subformats: ['fixed', 'dynamic', 'differencing'] },
  content: { partitions: 'check' },
}

/** PERMISSIVE with some keys replaced (one level deep merge per section). */
export function permissive(over: PolicyInput): PolicyInput {
  const out: Record<string, unknown> = { ...PERMISSIVE }
  for (const [k, v] of Object.entries(over)) {
    const cur = out[k]
    out[k] = cur && typeof cur === 'object' && !Array.isArray(cur) && v && typeof v === 'object' && !Array.isArray(v) ? { ...cur, ...v } : v
  }
  return out as PolicyInput
}

export const codes = (r: ValidationReport): string[] => [...new Set(r.violations.map((v) => v.code))].sort()

export async function run(dir: string, name: string, policy: PolicyInput): Promise<ValidationReport> {
  return validate(join(dir, name), policy)
}

/** A copy of fixture `name` with bytes written at offsets (damage in code). */
export function damaged(dir: string, name: string, tag: string, patches: Array<[number, number[] | Uint8Array]>): string {
  const out = join(dir, `${tag}-${name}`)
  copyFileSync(join(dir, name), out)
  const fd = openSync(out, 'r+')
  try {
    for (const [at, bytes] of patches) writeSync(fd, Uint8Array.from(bytes), 0, bytes.length, at)
  } finally {
    closeSync(fd)
  }
  return out
}

export const u64 = (n: bigint): number[] => Array.from({ length: 8 }, (_, i) => Number((n >> BigInt(56 - 8 * i)) & 0xffn))
export const u32 = (n: number): number[] => [n >>> 24, (n >>> 16) & 0xff, (n >>> 8) & 0xff, n & 0xff]
export const readU64 = (file: string, at: number): bigint => readFileSync(file).readBigUInt64BE(at)
export const append = (file: string, bytes: number): void => appendFileSync(file, new Uint8Array(bytes).fill(0x77))
