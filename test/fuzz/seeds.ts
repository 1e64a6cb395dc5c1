/**
 * Fuzz seeds: small images of every kind imgtool reads, made at run time by
 * the real qemu-img/qemu-io 7.2 (qcow2, VHD, VMDK) or taken from the kernel-made
 * dm-snapshot fixtures in images/dmsnap/ and from imgtool's own dm-snapshot
 * writer. The recipes below ARE the seed definitions: a regression case names
 * a seed, and replaying it rebuilds the seed from its recipe.
 *
 * Built seeds are cached under os.tmpdir()/imgtool-fuzz-seeds/<hash>, where
 * the hash covers the recipes and the qemu-img version, so a changed recipe or
 * tool makes fresh seeds.
 */
import { createHash } from 'node:crypto'
import { copyFileSync, existsSync, mkdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { vhdChecksum } from './layout.js'
import { runProc } from './proc.js'

/** The checkout: the first directory up from here with imgtool's package.json (works from a tsc build under node_modules/.cache too). */
export const REPO = findRepo()
function findRepo(): string {
  let d = dirname(fileURLToPath(import.meta.url))
  for (;;) {
    const p = join(d, 'package.json')
    if (existsSync(p) && existsSync(join(d, 'src')) && (JSON.parse(readFileSync(p, 'utf8')) as { name?: string }).name === 'imgtool') return d
    const up = dirname(d)
    if (up === d) return process.cwd()
    d = up
  }
}
export const IMGTOOL_BIN = join(REPO, 'bin', 'imgtool')

type Step =
  | { img: string[] } // qemu-img ARGS
  | { io: string[]; file: string; fmt?: string; abort?: boolean } // qemu-io -f FMT -c ... FILE
  | { imgtool: string[] }
  | { copyFixture: string; to: string } // a file under images/
  | { fixDates: string } // fixed timestamps in a qcow2 snapshot table
  | { fixVhdTimes: string } // fixed timestamp and UUID in a VHD's footers (checksums recomputed)
  | { fixVmdkIds: string } // fixed CID in a VMDK's descriptor (embedded or a descriptor file)

export type SeedFormat = 'qcow2' | 'dmsnap' | 'vpc' | 'vmdk'

export interface SeedRecipe {
  name: string
  format: SeedFormat
  /** the file the mutations apply to */
  main: string
  /** dm-snapshot origin (read-only input, never mutated) */
  origin?: string
  /** other files the image needs (backing file, data file), never mutated */
  sides?: string[]
  /** relative weight when picking seeds */
  weight?: number
  steps: Step[]
}

const q = (name: string, size: string, opts: string, writes: string[], extra: Partial<SeedRecipe> = {}): SeedRecipe => ({
  name,
  format: 'qcow2',
  main: `${name}.qcow2`,
  steps: [{ img: ['create', '-q', '-f', 'qcow2', '-o', opts, `${name}.qcow2`, size] }, ...(writes.length ? [{ io: writes, file: `${name}.qcow2` }] : [])],
  ...extra,
})

/** a VHD seed: qemu-img create -f vpc, then qemu-io writes */
const vpc = (name: string, opts: string, size: string, writes: string[], extra: Partial<SeedRecipe> = {}): SeedRecipe => ({
  name,
  format: 'vpc',
  main: `${name}.vhd`,
  steps: [
    { img: ['create', '-q', '-f', 'vpc', '-o', opts, `${name}.vhd`, size] },
    { io: writes, file: `${name}.vhd`, fmt: 'vpc' },
    { fixVhdTimes: `${name}.vhd` },
  ],
  ...extra,
})

/** a VMDK seed: qemu-img create -f vmdk, then qemu-io writes */
const vmdk = (name: string, opts: string, size: string, writes: string[], extra: Partial<SeedRecipe> = {}): SeedRecipe => ({
  name,
  format: 'vmdk',
  main: `${name}.vmdk`,
  steps: [
    { img: ['create', '-q', '-f', 'vmdk', '-o', opts, `${name}.vmdk`, size] },
    { io: writes, file: `${name}.vmdk`, fmt: 'vmdk' },
    { fixVmdkIds: `${name}.vmdk` },
  ],
  ...extra,
})

const W = ['write -P 0x11 0 8k', 'write -P 0x22 20k 4k', 'write -z 24k 4k', 'write -P 0x33 300k 12k', 'discard 304k 4k']

export const SEEDS: SeedRecipe[] = [
  q('v2-c64k', '2M', 'compat=0.10,cluster_size=64k', ['write -P 0x11 0 64k', 'write -P 0x22 1M 100k']),
  q('v2-c4k-rc16', '1M', 'compat=0.10,cluster_size=4k', ['write -P 0x11 0 8k', 'write -P 0x22 20k 4k', 'write -P 0x33 300k 12k']),
  q('v3-c512', '256K', 'compat=1.1,cluster_size=512', ['write -P 0x11 0 4k', 'write -P 0x22 100k 2k', 'write -z 8k 1k']),
  q('v3-c1k-rc8', '512K', 'compat=1.1,cluster_size=1k,refcount_bits=8', W),
  q('v3-c4k', '1M', 'compat=1.1,cluster_size=4k', W),
  q('v3-c64k', '4M', 'compat=1.1,cluster_size=64k', ['write -P 0x11 0 64k', 'write -P 0x22 1M 4k', 'write -z 2M 64k', 'write -P 0x44 3M 128k']),
  q('v3-c2m', '8M', 'compat=1.1,cluster_size=2M', ['write -P 0x11 0 64k', 'write -P 0x22 5M 4k'], { weight: 0.3 }),
  q('v3-rc1', '1M', 'compat=1.1,cluster_size=4k,refcount_bits=1', W),
  q('v3-rc2-c512', '256K', 'compat=1.1,cluster_size=512,refcount_bits=2', ['write -P 0x11 0 4k', 'write -P 0x22 100k 2k']),
  q('v3-rc4', '1M', 'compat=1.1,cluster_size=4k,refcount_bits=4', W),
  q('v3-rc32', '1M', 'compat=1.1,cluster_size=4k,refcount_bits=32', W),
  q('v3-rc64', '1M', 'compat=1.1,cluster_size=4k,refcount_bits=64', W),
  q('v2-zlib-c4k', '1M', 'compat=0.10,cluster_size=4k', ['write -c -P 0x41 0 16k', 'write -c -P 0x42 64k 4k', 'write -P 0x43 8k 4k']),
  q('v3-zlib-c64k', '1M', 'compat=1.1,cluster_size=64k', ['write -c -P 0x41 0 64k', 'write -c -P 0x42 128k 64k', 'write -P 0x43 512k 4k']),
  q('v3-zstd-c4k', '1M', 'compat=1.1,cluster_size=4k,compression_type=zstd', ['write -c -P 0x51 0 16k', 'write -c -P 0x52 64k 4k', 'write -z 4k 4k']),
  q('v3-extl2-c32k', '1M', 'compat=1.1,cluster_size=32k,extended_l2=on', [
    'write -P 0x61 0 2k',
    'write -P 0x62 40k 1k',
    'write -z 64k 32k',
    'write -z 100k 1k',
    'write -c -P 0x63 256k 32k',
  ]),
  q('v3-lazy-clean', '1M', 'compat=1.1,cluster_size=4k,lazy_refcounts=on', ['write -P 0x11 0 8k', 'write -P 0x12 512k 4k']),
  {
    name: 'v3-dirty-lazy',
    format: 'qcow2',
    main: 'v3-dirty-lazy.qcow2',
    steps: [
      { img: ['create', '-q', '-f', 'qcow2', '-o', 'compat=1.1,cluster_size=4k,lazy_refcounts=on', 'v3-dirty-lazy.qcow2', '1M'] },
      { io: ['write -P 0x11 0 8k', 'write -P 0x12 512k 4k', 'flush', 'abort'], file: 'v3-dirty-lazy.qcow2', abort: true },
    ],
  },
  {
    name: 'v3-datafile',
    format: 'qcow2',
    main: 'v3-datafile.qcow2',
    sides: ['v3-datafile.data'],
    steps: [
      { img: ['create', '-q', '-f', 'qcow2', '-o', 'compat=1.1,cluster_size=4k,data_file=v3-datafile.data', 'v3-datafile.qcow2', '256K'] },
      { io: ['write -P 0x71 0 8k', 'write -P 0x72 64k 4k', 'write -z 128k 4k'], file: 'v3-datafile.qcow2' },
    ],
  },
  {
    name: 'v3-datafile-raw',
    format: 'qcow2',
    main: 'v3-datafile-raw.qcow2',
    sides: ['v3-datafile-raw.data'],
    steps: [
      {
        img: [
          'create',
          '-q',
          '-f',
          'qcow2',
          '-o',
          'compat=1.1,cluster_size=4k,data_file=v3-datafile-raw.data,data_file_raw=on',
          'v3-datafile-raw.qcow2',
          '256K',
        ],
      },
      { io: ['write -P 0x73 0 8k', 'write -P 0x74 64k 4k'], file: 'v3-datafile-raw.qcow2' },
    ],
  },
  {
    name: 'v3-chain',
    format: 'qcow2',
    main: 'top.qcow2',
    sides: ['base.qcow2'],
    steps: [
      { img: ['create', '-q', '-f', 'qcow2', '-o', 'compat=1.1,cluster_size=4k', 'base.qcow2', '1M'] },
      { io: ['write -P 0x01 0 64k', 'write -P 0x02 512k 64k'], file: 'base.qcow2' },
      { img: ['create', '-q', '-f', 'qcow2', '-o', 'compat=1.1,cluster_size=4k', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2', '2M'] },
      { io: ['write -P 0x07 4k 4k', 'write -z 520k 4k', 'write -P 0x08 1536k 8k'], file: 'top.qcow2' },
    ],
  },
  {
    name: 'v2-chain-raw',
    format: 'qcow2',
    main: 'top.qcow2',
    sides: ['base.raw'],
    steps: [
      { img: ['create', '-q', '-f', 'raw', 'base.raw', '256K'] },
      { io: ['write -P 0x05 0 256k'], file: 'base.raw', fmt: 'raw' },
      { img: ['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10,cluster_size=4k', '-b', 'base.raw', '-F', 'raw', 'top.qcow2', '512K'] },
      { io: ['write -P 0x06 8k 4k', 'write -P 0x09 300k 4k'], file: 'top.qcow2' },
    ],
  },
  ...(['v3', 'v2'] as const).map((v): SeedRecipe => ({
    name: `${v}-snapshots`,
    format: 'qcow2',
    main: `${v}-snapshots.qcow2`,
    steps: [
      { img: ['create', '-q', '-f', 'qcow2', '-o', `compat=${v === 'v3' ? '1.1' : '0.10'},cluster_size=4k`, `${v}-snapshots.qcow2`, '1M'] },
      { io: ['write -P 0x21 0 16k', 'write -P 0x22 256k 4k'], file: `${v}-snapshots.qcow2` },
      { img: ['snapshot', '-c', 's1', `${v}-snapshots.qcow2`] },
      { io: ['write -P 0x23 4k 4k', 'write -P 0x24 512k 8k'], file: `${v}-snapshots.qcow2` },
      { img: ['snapshot', '-c', 'second-snapshot', `${v}-snapshots.qcow2`] },
      { io: ['write -P 0x25 0 4k', 'write -z 256k 4k'], file: `${v}-snapshots.qcow2` },
      { fixDates: `${v}-snapshots.qcow2` },
    ],
  })),
  {
    name: 'v3-bitmaps',
    format: 'qcow2',
    main: 'v3-bitmaps.qcow2',
    steps: [
      { img: ['create', '-q', '-f', 'qcow2', '-o', 'compat=1.1,cluster_size=4k', 'v3-bitmaps.qcow2', '2M'] },
      { io: ['write -P 0x11 0 64k'], file: 'v3-bitmaps.qcow2' },
      { img: ['bitmap', '-f', 'qcow2', '--add', 'v3-bitmaps.qcow2', 'b0'] },
      { img: ['bitmap', '-f', 'qcow2', '--add', '-g', '64k', 'v3-bitmaps.qcow2', 'bm-64k'] },
      { io: ['write -P 0x22 4k 4k', 'write -P 0x23 1M 40k'], file: 'v3-bitmaps.qcow2' },
    ],
  },
  // VHD (qemu's vpc): dynamic disks (footer copy at 0, dynamic header, BAT, blocks with sector bitmaps) and fixed
  vpc('vpc-dynamic', 'subformat=dynamic', '6M', ['write -P 0x31 0 64k', 'write -P 0x32 2M 4k', 'write -P 0x33 5M 8k', 'write -z 8k 4k']),
  vpc('vpc-dynamic-force', 'subformat=dynamic,force_size=on', '4M', ['write -P 0x34 4k 4k', 'write -P 0x35 3M 512']),
  vpc('vpc-fixed', 'subformat=fixed,force_size=on', '1M', ['write -P 0x36 0 8k', 'write -P 0x37 512k 4k'], { weight: 0.5 }),
  // VMDK: monolithicSparse (embedded descriptor, GD/RGD, grain tables), with zeroed grains, streamOptimized
  // (compressed grains, markers, footer), and a monolithicFlat descriptor (text) with its flat extent beside it
  vmdk('vmdk-sparse', 'subformat=monolithicSparse', '4M', ['write -P 0x41 0 64k', 'write -P 0x42 1M 4k', 'write -P 0x43 3M 8k']),
  vmdk('vmdk-sparse-zeroed', 'subformat=monolithicSparse,zeroed_grain=on', '2M', ['write -P 0x44 0 8k', 'write -z 64k 64k', 'write -P 0x45 1M 4k']),
  {
    name: 'vmdk-stream',
    format: 'vmdk',
    main: 'vmdk-stream.vmdk',
    steps: [
      { img: ['create', '-q', '-f', 'raw', 'src.raw', '2M'] },
      { io: ['write -P 0x46 0 64k', 'write -P 0x47 1M 8k', 'write -P 0x48 1984k 4k'], file: 'src.raw', fmt: 'raw' },
      { img: ['convert', '-q', '-f', 'raw', '-O', 'vmdk', '-o', 'subformat=streamOptimized', 'src.raw', 'vmdk-stream.vmdk'] },
    ],
  },
  {
    name: 'vmdk-flat',
    format: 'vmdk',
    main: 'vmdk-flat.vmdk',
    sides: ['vmdk-flat-flat.vmdk'],
    weight: 0.5,
    steps: [
      { img: ['create', '-q', '-f', 'vmdk', '-o', 'subformat=monolithicFlat', 'vmdk-flat.vmdk', '1M'] },
      { io: ['write -P 0x49 0 8k', 'write -P 0x4a 512k 4k'], file: 'vmdk-flat.vmdk', fmt: 'vmdk' },
      { fixVmdkIds: 'vmdk-flat.vmdk' },
    ],
  },
  // dm-snapshot: kernel-made stores from images/dmsnap, and imgtool's own writer
  ...['c8-basic', 'c1-areas', 'c16-random', 'c32-default', 'c8-partial', 'c8-full-po', 'c8-invalid'].map((f): SeedRecipe => ({
    name: `dmsnap-${f}`,
    format: 'dmsnap',
    main: 'cow.img',
    origin: 'origin.img',
    steps: [
      { copyFixture: `images/dmsnap/${f}/cow.img`, to: 'cow.img' },
      { copyFixture: `images/dmsnap/${f}/origin.img`, to: 'origin.img' },
    ],
  })),
  {
    name: 'dmsnap-imgtool-c4k',
    format: 'dmsnap',
    main: 'cow.img',
    origin: 'origin.img',
    steps: [
      { img: ['create', '-q', '-f', 'raw', 'origin.img', '256K'] },
      { io: ['write -P 0x0a 0 256k'], file: 'origin.img', fmt: 'raw' },
      { img: ['create', '-q', '-f', 'raw', 'snap.raw', '256K'] },
      { io: ['write -P 0x0a 0 256k', 'write -P 0x0b 8k 8k', 'write -P 0x0c 100k 1k', 'write -P 0x0d 250k 6k'], file: 'snap.raw', fmt: 'raw' },
      { imgtool: ['convert', '-f', 'raw', '-O', 'dmsnap', '-o', 'origin=origin.img,chunk_size=4K', 'snap.raw', 'cow.img'] },
    ],
  },
  {
    name: 'dmsnap-imgtool-empty-c1k',
    format: 'dmsnap',
    main: 'cow.img',
    origin: 'origin.img',
    weight: 0.5,
    steps: [
      { img: ['create', '-q', '-f', 'raw', 'origin.img', '128K'] },
      { io: ['write -P 0x0e 0 128k'], file: 'origin.img', fmt: 'raw' },
      { imgtool: ['create', '-q', '-f', 'dmsnap', '--origin', 'origin.img', '-o', 'chunk_size=1K', 'cow.img', '64K'] },
    ],
  },
]

export function seedByName(name: string): SeedRecipe {
  const s = SEEDS.find((x) => x.name === name)
  if (!s) throw new Error(`fuzz: unknown seed ${name}`)
  return s
}

export interface BuiltSeed {
  recipe: SeedRecipe
  dir: string
}

let qemuVersion: string | undefined
async function toolVersion(): Promise<string> {
  if (qemuVersion === undefined) {
    const r = await runProc('qemu-img', ['--version'], { timeoutMs: 60_000 })
    qemuVersion = r.stdout.toString('utf8').split('\n')[0] ?? ''
  }
  return qemuVersion
}

export async function seedCacheRoot(): Promise<string> {
  const h = createHash('sha256')
    .update(JSON.stringify(SEEDS))
    .update(await toolVersion())
    .digest('hex')
    .slice(0, 16)
  return join(process.env['IMGTOOL_FUZZ_SEEDS'] ?? join(tmpdir(), 'imgtool-fuzz-seeds'), h)
}

async function must(file: string, args: string[], cwd: string, allowSignal = false): Promise<void> {
  const r = await runProc(file, args, { timeoutMs: 120_000, cwd })
  const failed = r.timedOut || (allowSignal ? false : r.code !== 0) || /\bfailed\b/i.test(r.stdout.toString('utf8'))
  if (failed) throw new Error(`fuzz seed: ${file} ${args.join(' ')} -> ${r.code ?? r.signal}: ${r.stderr}${r.stdout.toString('utf8').slice(0, 500)}`)
}

/** Fixed snapshot dates, so a seed's bytes do not depend on the clock. */
export function fixSnapshotDates(path: string): void {
  const b = readFileSync(path)
  const nb = b.readUInt32BE(60)
  let off = Number(b.readBigUInt64BE(64))
  for (let i = 0; i < nb; i++) {
    b.writeUInt32BE(1_700_000_000 + 3600 * i, off + 16)
    b.writeUInt32BE(0, off + 20)
    b.writeBigUInt64BE(0n, off + 24)
    const idLen = b.readUInt16BE(off + 12)
    const nameLen = b.readUInt16BE(off + 14)
    const extra = b.readUInt32BE(off + 36)
    let len = 40 + extra + idLen + nameLen
    len = (len + 7) & ~7
    off += len
  }
  writeFileSync(path, b)
}

/** Fixed timestamp and UUID in both footers of a VHD, so a seed's bytes do not depend on the clock. */
function fixVhdTimes(path: string): void {
  const b = readFileSync(path)
  for (const at of [0, b.length - 512]) {
    if (at < 0 || b.toString('latin1', at, at + 8) !== 'conectix') continue
    b.writeUInt32BE(700_000_000, at + 24)
    for (let i = 0; i < 16; i++) b[at + 68 + i] = 0x10 + i
    b.writeUInt32BE(vhdChecksum(b, at, 512, 64), at + 64)
  }
  writeFileSync(path, b)
}

/** Fixed CID in a VMDK descriptor (embedded at the sector the header names, or the whole file). */
function fixVmdkIds(path: string): void {
  const b = readFileSync(path)
  let at = 0
  let len = b.length
  if (b.toString('latin1', 0, 4) === 'KDMV') {
    at = Number(b.readBigUInt64LE(28)) * 512
    len = Number(b.readBigUInt64LE(36)) * 512
  }
  const text = b.toString('latin1', at, at + len)
  const fixed = text.replace(/^CID=[0-9a-fA-F]+/m, (m) => `CID=${'fedcba98'.slice(0, m.length - 4).padStart(m.length - 4, '0')}`)
  b.write(fixed, at, 'latin1')
  writeFileSync(path, b)
}

async function buildOne(recipe: SeedRecipe, dir: string): Promise<void> {
  for (const s of recipe.steps) {
    if ('img' in s) await must('qemu-img', s.img, dir)
    else if ('io' in s) {
      const args = ['-f', s.fmt ?? 'qcow2']
      for (const c of s.io) args.push('-c', c)
      args.push(s.file)
      await must('qemu-io', args, dir, s.abort === true)
    } else if ('imgtool' in s) await must(process.execPath, [IMGTOOL_BIN, ...s.imgtool], dir)
    else if ('copyFixture' in s) copyFileSync(join(REPO, s.copyFixture), join(dir, s.to))
    else if ('fixVhdTimes' in s) fixVhdTimes(join(dir, s.fixVhdTimes))
    else if ('fixVmdkIds' in s) fixVmdkIds(join(dir, s.fixVmdkIds))
    else fixSnapshotDates(join(dir, s.fixDates))
  }
  for (const f of [recipe.main, ...(recipe.sides ?? []), ...(recipe.origin ? [recipe.origin] : [])]) {
    if (!existsSync(join(dir, f))) throw new Error(`fuzz seed ${recipe.name}: ${f} was not made`)
  }
}

/** Build (or reuse) the named seeds; returns them in the order asked. */
export async function buildSeeds(names: readonly string[] = SEEDS.map((s) => s.name)): Promise<Map<string, BuiltSeed>> {
  const root = await seedCacheRoot()
  mkdirSync(root, { recursive: true })
  const out = new Map<string, BuiltSeed>()
  for (const name of names) {
    const recipe = seedByName(name)
    const dir = join(root, name)
    if (!existsSync(join(dir, '.done'))) {
      const tmp = `${dir}.tmp-${process.pid}`
      rmSync(tmp, { recursive: true, force: true })
      mkdirSync(tmp, { recursive: true })
      await buildOne(recipe, tmp)
      writeFileSync(join(tmp, '.done'), '')
      rmSync(dir, { recursive: true, force: true })
      renameSync(tmp, dir)
    }
    out.set(name, { recipe, dir })
  }
  return out
}
