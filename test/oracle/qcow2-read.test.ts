/**
 * Live oracle: images made by qemu-img/qemu-io with random writes, zero
 * writes (with and without unmap), discards and compressed writes across
 * option combinations; our guest bytes must equal `qemu-img convert -O raw`
 * byte for byte and our `map --output json` must equal `qemu-img map
 * --output=json` exactly (text).
 *
 * Reproduce:  IMGTOOL_ORACLE_SEED=<seed> IMGTOOL_ORACLE_ONLY=<id,id> IMGTOOL_KEEP_TMP=1 npx vitest run test/oracle
 * A failure message carries every qemu command that made the image.
 */
import { createHash } from 'node:crypto'
import { readdirSync, writeFileSync } from 'node:fs'
import { open as fsOpen } from 'node:fs/promises'
import { join } from 'node:path'
import { beforeAll, expect, it } from 'vitest'
import { main } from '../../src/cli/main.js'
import { openImage } from '../../src/open.js'
import { Prng } from '../support/prng.js'
import { collector, describeQemu, limiter, makeTempDir, mapLimit, qemuImgOk, qemuIoOk, useTempDirs } from '../support/qemu.js'

const SEED = Number(process.env['IMGTOOL_ORACLE_SEED'] ?? 0x5eed_2024)
const RANDOM_CASES = Number(process.env['IMGTOOL_ORACLE_COUNT'] ?? 216)
const ONLY = process.env['IMGTOOL_ORACLE_ONLY']?.split(',').map(Number)
/** qemu processes in flight at once (the machine has 2 cores) */
const QEMU_CONCURRENCY = 3

const KiB = 1024
const MiB = 1024 * KiB
const GiB = 1024 * MiB

interface Layer {
  file: string
  format: 'qcow2' | 'raw'
  size: number
  clusterSize: number
  /** qemu-img create -o, in order */
  options: Array<[string, string]>
  /** qemu-io commands, in order */
  commands: string[]
}

interface OracleCase {
  id: number
  label: string
  /** base first, the image we read last */
  layers: Layer[]
  /** virtual size in the GiB: hashes are skipped, the bytes are still compared in full */
  large: boolean
}

// ---------------------------------------------------------------------------
// generating cases

const pick = <T>(p: Prng, items: readonly T[]): T => items[p.int(items.length)] as T

function weighted<T>(p: Prng, table: ReadonlyArray<readonly [T, number]>): T {
  const total = table.reduce((s, [, w]) => s + w, 0)
  let r = p.next() * total
  for (const [v, w] of table) {
    r -= w
    if (r < 0) return v
  }
  return table[table.length - 1]![0]
}

const CLUSTER_BITS: ReadonlyArray<readonly [number, number]> = [
  [9, 10],
  [10, 6],
  [11, 6],
  [12, 12],
  [13, 6],
  [14, 8],
  [15, 8],
  [16, 12],
  [17, 5],
  [18, 4],
  [19, 3],
  [20, 3],
  [21, 4],
]

function qcow2Options(p: Prng, file: string, hasBacking: boolean): { options: Array<[string, string]>; clusterSize: number } {
  const v2 = p.chance(0.22)
  const clusterSize = 2 ** weighted(p, CLUSTER_BITS)
  const o: Array<[string, string]> = [
    ['compat', v2 ? '0.10' : '1.1'],
    ['cluster_size', String(clusterSize)],
  ]
  let extL2 = false
  if (!v2) {
    o.push(['refcount_bits', String(pick(p, [1, 2, 4, 8, 16, 16, 32, 64]))])
    if (clusterSize >= 16 * KiB && p.chance(0.35)) {
      o.push(['extended_l2', 'on'])
      extL2 = true
    }
    if (p.chance(0.4)) o.push(['compression_type', 'zstd'])
    if (p.chance(0.25)) o.push(['lazy_refcounts', 'on'])
    if (p.chance(0.15)) {
      o.push(['data_file', file.replace(/\.qcow2$/, '.data')])
      if (!hasBacking && p.chance(0.5)) o.push(['data_file_raw', 'on'])
    }
  }
  // QEMU: a backing file and preallocation only together with extended L2
  if ((!hasBacking || extL2) && p.chance(0.15)) o.push(['preallocation', 'metadata'])
  return { options: o, clusterSize }
}

const has = (l: Layer, key: string): boolean => l.options.some(([k]) => k === key)

function randomRange(p: Prng, l: Layer): [number, number] | undefined {
  const cs = l.clusterSize
  const sub = has(l, 'extended_l2') ? cs / 32 : cs
  for (let tries = 0; tries < 8; tries++) {
    const mode = weighted(p, [
      ['cluster', 3],
      ['subcluster', has(l, 'extended_l2') ? 2 : 0],
      ['sector', 4],
      ['byte', 2],
    ] as const)
    const unit = mode === 'cluster' ? cs : mode === 'subcluster' ? sub : mode === 'sector' ? 512 : 1
    const units = Math.floor(l.size / unit)
    if (units < 1) continue
    const off = p.int(units) * unit
    let len: number
    const lenMode = p.int(10)
    if (lenMode < 2)
      len = 1 + p.int(600) // small, any alignment
    else if (lenMode < 7) len = unit * (1 + p.int(3))
    else if (lenMode < 9) len = cs * (1 + p.int(4)) + (mode === 'byte' ? p.int(cs) : 0)
    else len = l.size - off // to the end
    len = Math.min(len, l.size - off)
    if (len > 0) return [off, len]
  }
  return undefined
}

function layerCommands(p: Prng, l: Layer): string[] {
  const cmds: string[] = []
  const cs = l.clusterSize
  // Compressed writes go first: QEMU refuses them over clusters that have a host offset.
  if (l.format === 'qcow2' && !has(l, 'data_file') && !has(l, 'preallocation')) {
    const clusters = Math.ceil(l.size / cs)
    const chosen = new Set<number>()
    const n = p.int(4)
    for (let i = 0; i < n; i++) chosen.add(p.int(clusters))
    for (const c of chosen) {
      const off = c * cs
      const len = Math.min(cs, l.size - off) // the last cluster may be partial: QEMU pads it
      cmds.push(p.chance(0.7) ? `write -c -P 0x${(1 + p.int(255)).toString(16)} ${off} ${len}` : `write -c -s src.bin ${off} ${len}`)
    }
  }
  const n = 2 + p.int(11)
  for (let i = 0; i < n; i++) {
    const r = randomRange(p, l)
    if (!r) break
    const [off, len] = r
    const op = weighted(p, [
      ['pattern', 35],
      ['source', 15],
      ['zero', 13],
      ['zero-unmap', 11],
      ['discard', 11],
    ] as const)
    switch (op) {
      case 'pattern':
        cmds.push(`write -P 0x${(1 + p.int(255)).toString(16)} ${off} ${len}`)
        break
      case 'source':
        cmds.push(`write -s src.bin ${off} ${len}`)
        break
      case 'zero':
        cmds.push(`write -z ${off} ${len}`)
        break
      case 'zero-unmap':
        cmds.push(`write -z -u ${off} ${len}`)
        break
      case 'discard':
        cmds.push(`discard ${off} ${len}`)
        break
    }
  }
  return cmds
}

function randomCase(id: number, p: Prng): OracleCase {
  const depth = weighted(p, [
    [1, 5],
    [2, 3],
    [3, 2],
  ] as const)
  // the size the guest sees: 512 B .. 8 MiB, sometimes a single sector, sometimes not cluster aligned
  const topSize = p.chance(0.05) ? 512 * (1 + p.int(8)) : 512 * (1 + p.int(2 ** (7 + p.int(8))))
  const sizes: number[] = [topSize]
  for (let i = 1; i < depth; i++) {
    const above = sizes[0]!
    const r = p.int(10)
    // backing files are often shorter (reads beyond them are zeros), sometimes longer
    sizes.unshift(r < 5 ? 512 * (1 + p.int(Math.max(1, above / 512))) : r < 8 ? above : above + 512 * (1 + p.int(4096)))
  }
  const layers: Layer[] = []
  for (let i = 0; i < depth; i++) {
    const file = `l${i}.qcow2`
    const hasBacking = i > 0
    if (i === 0 && depth > 1 && p.chance(0.12)) {
      layers.push({ file: 'l0.raw', format: 'raw', size: sizes[0]!, clusterSize: 512, options: [], commands: [] })
    } else {
      const { options, clusterSize } = qcow2Options(p, file, hasBacking)
      layers.push({ file, format: 'qcow2', size: sizes[i]!, clusterSize, options, commands: [] })
    }
    const l = layers[i]!
    l.commands = layerCommands(p, l)
  }
  return { id, label: describeLayers(layers), layers, large: false }
}

function describeLayers(layers: Layer[]): string {
  return layers
    .map((l) => {
      if (l.format === 'raw') return `raw ${sizeText(l.size)}`
      const o = Object.fromEntries(l.options)
      const bits = [
        o['compat'] === '0.10' ? 'v2' : 'v3',
        `c${sizeText(l.clusterSize)}`,
        o['refcount_bits'] ? `rc${o['refcount_bits']}` : '',
        o['extended_l2'] ? 'extl2' : '',
        o['compression_type'] === 'zstd' ? 'zstd' : '',
        o['lazy_refcounts'] ? 'lazy' : '',
        o['data_file'] ? (o['data_file_raw'] ? 'datafile-raw' : 'datafile') : '',
        o['preallocation'] ? 'prealloc' : '',
        sizeText(l.size),
      ]
      return bits.filter(Boolean).join(' ')
    })
    .join(' <- ')
}

function sizeText(n: number): string {
  if (n % GiB === 0) return `${n / GiB}G`
  if (n % MiB === 0) return `${n / MiB}M`
  if (n % KiB === 0) return `${n / KiB}K`
  return String(n)
}

/**
 * Host offsets above 2 GiB (a bug with offsets >= 2^31 was fixed; these keep it
 * fixed): metadata-preallocated images of just over 2 GiB give every guest
 * cluster a host cluster in order, so data written far in lives far in, and a
 * compressed write into an unmapped cluster lands past the end (> 2 GiB).
 */
function largeCases(firstId: number): OracleCase[] {
  const big = 2 * GiB + 192 * MiB
  const q = (file: string, size: number, clusterSize: number, options: Array<[string, string]>, commands: string[]): Layer => ({
    file,
    format: 'qcow2',
    size,
    clusterSize,
    options: [['cluster_size', String(clusterSize)], ...options],
    commands,
  })
  const cases: Array<Omit<OracleCase, 'id' | 'label' | 'large'>> = [
    {
      layers: [
        q(
          'l0.qcow2',
          big,
          64 * KiB,
          [
            ['compat', '1.1'],
            ['preallocation', 'metadata'],
          ],
          [
            'write -s src.bin 0 100k',
            'write -P 0x5a 2100M 192k',
            'write -P 0x33 2147418112 131072', // across 2^31 in the guest
            'write -z -u 2150M 64k',
            'write -c -P 0x6c 2150M 64k', // lands at the end of the file: > 2 GiB
            'write -z 2180M 128k',
            'write -P 0x71 2200M 1000',
          ],
        ),
      ],
    },
    {
      layers: [
        q(
          'l0.qcow2',
          big,
          2 * MiB,
          [
            ['compat', '0.10'],
            ['preallocation', 'metadata'],
          ],
          ['write -P 0x21 2090M 3M', 'write -z -u 2110M 2M', 'write -c -s src.bin 2110M 2M', 'write -z 2140M 1M', 'discard 2150M 4M'],
        ),
      ],
    },
    {
      layers: [
        q(
          'l0.qcow2',
          big + 256 * MiB,
          128 * KiB,
          [
            ['compat', '1.1'],
            ['extended_l2', 'on'],
            ['preallocation', 'metadata'],
            ['compression_type', 'zstd'],
          ],
          [
            'write -P 0x44 2300M 4k',
            'write -s src.bin 2301M 20k',
            'write -z 2302M 8k',
            'write -z -u 2303M 128k',
            'write -c -P 0x7e 2303M 128k',
            'write -P 0x45 2200M 1',
          ],
        ),
      ],
    },
    {
      layers: [
        q(
          'l0.qcow2',
          big,
          64 * KiB,
          [
            ['compat', '1.1'],
            ['preallocation', 'metadata'],
            ['refcount_bits', '64'],
          ],
          ['write -P 0x61 2100M 256k', 'write -s src.bin 2160M 100k'],
        ),
        q('l1.qcow2', big, 4 * KiB, [['compat', '1.1']], ['write -P 0x62 2100M 8k', 'write -z 2160M 4k', 'write -P 0x63 0 4k']),
      ],
    },
    {
      layers: [
        q(
          'l0.qcow2',
          big,
          64 * KiB,
          [
            ['compat', '1.1'],
            ['data_file', 'l0.data'],
            ['preallocation', 'metadata'],
          ],
          ['write -P 0x17 2120M 64k', 'write -z 2121M 64k', 'write -z -u 2122M 128k'],
        ),
      ],
    },
  ]
  return cases.map((c, i) => ({ ...c, id: firstId + i, large: true, label: `large: ${describeLayers(c.layers)}` }))
}

function allCases(): OracleCase[] {
  const p = new Prng(SEED)
  const out: OracleCase[] = []
  for (let i = 0; i < RANDOM_CASES; i++) out.push(randomCase(i, new Prng(p.nextU32())))
  out.push(...largeCases(RANDOM_CASES))
  return ONLY ? out.filter((c) => ONLY.includes(c.id)) : out
}

// ---------------------------------------------------------------------------
// building with qemu

const qemu = limiter(QEMU_CONCURRENCY)

function createArgs(l: Layer, backing: Layer | undefined): string[] {
  const args = ['create', '-q', '-f', l.format]
  if (l.options.length > 0) args.push('-o', l.options.map(([k, v]) => `${k}=${v}`).join(','))
  if (backing) args.push('-b', backing.file, '-F', backing.format)
  args.push(l.file, String(l.size))
  return args
}

/** Every command that made the image, for a failure message. */
function recipe(c: OracleCase, dir: string): string {
  const lines = [`cd ${dir}  # case ${c.id} (seed ${SEED}): ${c.label}`]
  c.layers.forEach((l, i) => {
    lines.push(`qemu-img ${createArgs(l, c.layers[i - 1]).join(' ')}`)
    if (l.commands.length > 0) lines.push(`qemu-io -f ${l.format} ${l.commands.map((x) => `-c '${x}'`).join(' ')} ${l.file}`)
  })
  return lines.join('\n')
}

interface Built {
  dir: string
  top: string
  raw: string
  qemuMap: string
  ourMap?: { code: number; stdout: string; stderr: string }
  error?: Error
}

async function build(c: OracleCase, p: Prng): Promise<Built> {
  const dir = makeTempDir(`imgtool-oracle-${c.id}-`)
  const top = c.layers[c.layers.length - 1]!
  const built: Built = { dir, top: join(dir, top.file), raw: join(dir, 'qemu.raw'), qemuMap: '' }
  try {
    // incompressible data of an odd length, so no two clusters get the same bytes
    writeFileSync(join(dir, 'src.bin'), p.bytes(4093 + p.int(30000)))
    for (let i = 0; i < c.layers.length; i++) {
      const l = c.layers[i]!
      await qemu(() => qemuImgOk(createArgs(l, c.layers[i - 1]), { cwd: dir }))
      if (l.commands.length > 0) await qemu(() => qemuIoOk(l.file, l.commands, { cwd: dir, format: l.format }))
    }
    // Settle the host files first: right after qemu-io, delayed allocation can still change
    // st_blocks and SEEK_HOLE answers, which qemu-img map consults (metadata preallocation
    // detection), so qemu's map and ours could otherwise see different host states.
    for (const name of readdirSync(dir)) {
      const fh = await fsOpen(join(dir, name), 'r')
      await fh.sync().finally(() => fh.close())
    }
    // Both maps before anything reads guest data: on ext4, reading a range that
    // fallocate left unwritten puts its pages in the page cache, and SEEK_DATA then
    // calls it data, so a map taken after a full read can differ from one taken before.
    built.qemuMap = await qemu(() => qemuImgOk(['map', '-f', top.format, '--output=json', top.file], { cwd: dir }))
    built.ourMap = await ourMap(built.top)
    await qemu(() => qemuImgOk(['convert', '-f', top.format, '-O', 'raw', top.file, 'qemu.raw'], { cwd: dir }))
  } catch (e) {
    built.error = e as Error
  }
  return built
}

// ---------------------------------------------------------------------------
// comparing

const CHUNK = 8 * MiB
/** images up to this size are hashed as well as compared */
const HASH_LIMIT = 256 * MiB

interface ByteComparison {
  size: number
  qemuSize: number
  firstDiff?: number
  ours?: number
  theirs?: number
  md5Ours?: string
  md5Qemu?: string
}

async function compareBytes(imagePath: string, rawPath: string): Promise<ByteComparison> {
  const image = await openImage(imagePath, { readOnly: true })
  const fh = await fsOpen(rawPath, 'r')
  try {
    const size = image.virtualSize
    const qemuSize = (await fh.stat()).size
    const result: ByteComparison = { size, qemuSize }
    const hash = size <= HASH_LIMIT
    const hOurs = createHash('md5')
    const hQemu = createHash('md5')
    const theirs = Buffer.alloc(Math.min(CHUNK, Math.max(size, 1)))
    for (let pos = 0; pos < size; pos += CHUNK) {
      const n = Math.min(CHUNK, size - pos)
      const ours = await image.read(pos, n)
      const t = theirs.subarray(0, n)
      t.fill(0)
      await fh.read(t, 0, n, pos)
      if (hash) {
        hOurs.update(ours)
        hQemu.update(t)
      }
      const o = Buffer.from(ours.buffer, ours.byteOffset, ours.byteLength)
      if (!o.equals(t)) {
        let i = 0
        while (o[i] === t[i]) i++
        result.firstDiff = pos + i
        result.ours = o[i]
        result.theirs = t[i]
        return result
      }
    }
    if (hash) {
      result.md5Ours = hOurs.digest('hex')
      result.md5Qemu = hQemu.digest('hex')
    }
    return result
  } finally {
    await fh.close()
    await image.close()
  }
}

async function ourMap(imagePath: string): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = collector()
  const err = collector()
  const code = await main(['node', 'imgtool', 'map', '--output', 'json', imagePath], { stdout: out, stderr: err, isTTY: false })
  return { code, stdout: out.text(), stderr: err.text() }
}

// ---------------------------------------------------------------------------

describeQemu('qcow2 reader against qemu-img (live oracle)', () => {
  useTempDirs()
  const cases = allCases()
  const built = new Map<number, Built>()

  beforeAll(async () => {
    const seeds = new Prng(SEED ^ 0x9e3779b9)
    const withSeeds = cases.map((c) => ({ c, p: new Prng(seeds.nextU32()) }))
    // the large images first: they take longest
    withSeeds.sort((a, b) => Number(b.c.large) - Number(a.c.large))
    await mapLimit(withSeeds, QEMU_CONCURRENCY + 1, async ({ c, p }) => {
      built.set(c.id, await build(c, p))
    })
  }, 300_000)

  it('covers the option space', () => {
    if (ONLY) return
    expect(cases.length).toBeGreaterThanOrEqual(200)
    const all = cases.flatMap((c) => c.layers)
    const opt = (k: string, v?: string) => all.filter((l) => l.options.some(([a, b]) => a === k && (v === undefined || b === v))).length
    expect(opt('compat', '0.10')).toBeGreaterThan(10)
    for (const bits of [1, 2, 4, 8, 16, 32, 64]) expect(opt('refcount_bits', String(bits)), `refcount_bits ${bits}`).toBeGreaterThan(3)
    for (let b = 9; b <= 21; b++) expect(opt('cluster_size', String(2 ** b)), `cluster_bits ${b}`).toBeGreaterThan(3)
    for (const [k, v] of [
      ['extended_l2', 'on'],
      ['compression_type', 'zstd'],
      ['lazy_refcounts', 'on'],
      ['data_file', undefined],
      ['data_file_raw', 'on'],
      ['preallocation', 'metadata'],
    ] as const) {
      expect(opt(k, v), `${k}=${v}`).toBeGreaterThan(5)
    }
    const cmds = all.flatMap((l) => l.commands)
    expect(cmds.filter((x) => x.startsWith('write -c')).length).toBeGreaterThan(100)
    expect(cmds.filter((x) => x.startsWith('write -z -u')).length).toBeGreaterThan(100)
    expect(cmds.filter((x) => x.startsWith('discard')).length).toBeGreaterThan(100)
    expect(cases.filter((c) => c.layers.length === 3).length).toBeGreaterThan(20)
    expect(cases.filter((c) => c.layers.length > 1 && c.layers[0]!.size < c.layers[c.layers.length - 1]!.size).length).toBeGreaterThan(20)
    expect(cases.filter((c) => c.large).length).toBeGreaterThanOrEqual(3)
  })

  it.each(cases.map((c) => [c.id, c.label, c] as const))('#%i %s', async (_id, _label, c) => {
    const b = built.get(c.id)
    if (!b) throw new Error(`case ${c.id} was not built`)
    const how = recipe(c, b.dir)
    if (b.error) throw new Error(`qemu could not build the image:\n${how}\n${b.error.message}`)

    const bytes = await compareBytes(b.top, b.raw)
    expect(bytes.qemuSize, `qemu-img convert output size\n${how}`).toBe(bytes.size)
    expect(
      bytes.firstDiff,
      `guest bytes differ from qemu-img convert at ${bytes.firstDiff} (0x${bytes.firstDiff?.toString(16)}): ours 0x${bytes.ours?.toString(16)}, qemu 0x${bytes.theirs?.toString(16)}\n${how}`,
    ).toBeUndefined()
    if (!c.large) expect(bytes.md5Ours, `md5 of our bytes\n${how}`).toBe(bytes.md5Qemu)

    const map = b.ourMap!
    expect(map.stderr, how).toBe('')
    expect(map.code).toBe(0)
    if (map.stdout !== b.qemuMap) {
      // show the records side by side; the text must still match exactly
      expect(JSON.parse(map.stdout), `map differs from qemu-img map --output=json\n${how}`).toEqual(JSON.parse(b.qemuMap))
      expect(map.stdout, `map text differs from qemu-img map --output=json\n${how}`).toBe(b.qemuMap)
    }
    if (c.large) {
      // the point of these: host offsets above 2^31 were really read and mapped
      const offsets = (JSON.parse(map.stdout) as Array<{ offset?: number }>).map((e) => e.offset ?? 0)
      expect(Math.max(...offsets)).toBeGreaterThan(2 ** 31)
    }
  })
})
