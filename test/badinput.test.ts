/**
 * Bad input: qemu-made fixtures damaged in code (copies in a temp dir), each
 * through the real CLI (node bin/imgtool, the build in dist/) and through the
 * library. Every case must give:
 *
 * - exactly one line on stderr, `imgtool: qcow2: <file>: <facts> (<structure> at 0x..)`,
 *   naming the file, the structure and an offset; no stack trace;
 * - exit code 1 and nothing on stdout;
 * - an answer within seconds (no hang), without loading the absurd sizes it was handed;
 * - the image bytes unchanged, and not one write to a device opened read-only.
 */
import { spawn } from 'node:child_process'
import { createHash } from 'node:crypto'
import { existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { beforeAll, describe, expect, it } from 'vitest'
import { isImgtoolError, type ImgtoolError } from '../src/errors.js'
import type { BlockDevice, OpenDeviceOptions } from '../src/io/block-device.js'
import { openFileDevice } from '../src/io/file-device.js'
import { openImage } from '../src/open.js'
import { TracingDevice } from './support/tracing-device.js'
import { describeQemu, makeTempDir, qemuImg, useTempDirs } from './support/qemu.js'

const ROOT = resolve(__dirname, '..')
const BIN = join(ROOT, 'bin', 'imgtool')
const FIXTURES = join(ROOT, 'images', 'qcow2')

// ---------------------------------------------------------------------------
// reading and patching qcow2 structures in a byte copy

const u32 = (b: Buffer, o: number): number => b.readUInt32BE(o)
const u64 = (b: Buffer, o: number): number => Number(b.readBigUInt64BE(o))
const put32 = (b: Buffer, o: number, v: number): void => void b.writeUInt32BE(v >>> 0, o)
const put64 = (b: Buffer, o: number, v: number | bigint): void => void b.writeBigUInt64BE(BigInt(v), o)

const H = { version: 4, backingOffset: 8, backingSize: 16, clusterBits: 20, l1Size: 36, l1Offset: 40, reftableOffset: 48, incompat: 72, headerLength: 100 }

/** Offset of the L2 entry for guest cluster `cluster` (standard L2, L1 entry 0's table). */
function l2EntryOffset(b: Buffer, cluster: number): number {
  const cs = 2 ** u32(b, H.clusterBits)
  const l1 = u64(b, H.l1Offset)
  const l2 = Number(b.readBigUInt64BE(l1) & 0x00ff_ffff_ffff_fe00n)
  expect(cluster).toBeLessThan(cs / 8)
  return l2 + cluster * 8
}

/** The compressed descriptor of guest cluster `cluster`: where it is, its host offset and byte count. */
function compressedEntry(b: Buffer, cluster: number): { at: number; host: number; size: number } {
  const cb = u32(b, H.clusterBits)
  const at = l2EntryOffset(b, cluster)
  const v = b.readBigUInt64BE(at)
  expect(v & (1n << 62n), `guest cluster ${cluster} is compressed`).not.toBe(0n)
  const shift = BigInt(70 - cb)
  const host = Number(v & ((1n << shift) - 1n))
  const sectors = Number((v >> shift) & ((1n << BigInt(cb - 8)) - 1n)) + 1
  return { at, host, size: sectors * 512 - (host % 512) }
}

// ---------------------------------------------------------------------------
// the cases

interface Case {
  name: string
  /** fixture to start from */
  from: string
  /** damage applied to a copy; may write more files into dir */
  damage: (b: Buffer, dir: string) => Buffer
  /** commands that must fail (each run separately): info opens, map walks L2, cat reads data */
  commands: Array<'info' | 'map' | 'cat'>
  /** words the one line must contain (the facts and the structure) */
  expect: Array<string | RegExp>
  /** the file the message must start with, when not the image named (a backing file at fault) */
  culprit?: string
}

const CASES: Case[] = [
  {
    name: 'header truncated to 50 bytes',
    from: 'v3-c4k.qcow2',
    damage: (b) => b.subarray(0, 50),
    commands: ['info', 'map', 'cat'],
    expect: ['header is truncated: the file is 50 bytes, a v3 header needs 104', '(header at 0x0)'],
  },
  {
    name: 'header truncated to the magic',
    from: 'v3-c4k.qcow2',
    damage: (b) => b.subarray(0, 4),
    commands: ['info'],
    expect: ['header is truncated: the file is 4 bytes', '(header at 0x0)'],
  },
  {
    name: 'magic right but version 4',
    from: 'v3-c4k.qcow2',
    damage: (b) => (put32(b, H.version, 4), b),
    commands: ['info', 'cat'],
    expect: ['Unsupported qcow2 version 4', '(header field version at 0x4)'],
  },
  {
    name: 'cluster_bits 8',
    from: 'v3-c4k.qcow2',
    damage: (b) => (put32(b, H.clusterBits, 8), b),
    commands: ['info'],
    expect: ['Unsupported cluster size: 2^8', '(cluster_bits at 0x14'],
  },
  {
    name: 'cluster_bits 22',
    from: 'v3-c4k.qcow2',
    damage: (b) => (put32(b, H.clusterBits, 22), b),
    commands: ['info'],
    expect: ['Unsupported cluster size: 2^22', '(cluster_bits at 0x14'],
  },
  {
    name: 'l1_size absurd (2^31 - 1 entries)',
    from: 'v3-c4k.qcow2',
    damage: (b) => (put32(b, H.l1Size, 0x7fff_ffff), b),
    commands: ['info', 'map'],
    expect: ['Active L1 table too large: l1_size 2147483647', '(header at 0x24)'],
  },
  {
    name: 'L1 table offset unaligned',
    from: 'v3-c4k.qcow2',
    damage: (b) => (put64(b, H.l1Offset, 0x3200), b),
    commands: ['info'],
    expect: ['Active L1 table offset invalid: 0x3200 is not aligned to cluster size 0x1000', '(header at 0x28)'],
  },
  // An L2 table past the end of the file is not bad input for a reader: qemu-img reads it as zeros
  // (a short read past EOF), and so do map and cat; see 'L2 table past the end of the file' below.
  {
    name: 'L2 table offset unaligned',
    from: 'v3-c4k.qcow2',
    damage: (b) => {
      const at = u64(b, H.l1Offset) + 8 // L1 entry 1: guest 2 MiB..4 MiB
      put64(b, at, b.readBigUInt64BE(at) + 0x200n)
      return b
    },
    commands: ['map', 'cat'],
    expect: [/L2 table offset 0x[0-9a-f]+200 is not aligned to cluster size 0x1000/, /\(L1 entry 1 at 0x3008\)$/],
  },
  {
    name: 'refcount table offset unaligned',
    from: 'v3-c4k.qcow2',
    damage: (b) => (put64(b, H.reftableOffset, 0x1008), b),
    commands: ['info'],
    expect: ['Reference count table offset invalid: 0x1008 is not aligned to cluster size 0x1000', '(header at 0x30)'],
  },
  {
    name: 'compressed descriptor out of range',
    from: 'v3-compressed-zstd-c4k.qcow2',
    damage: (b) => {
      const e = compressedEntry(b, 0)
      const v = b.readBigUInt64BE(e.at)
      const shift = BigInt(70 - u32(b, H.clusterBits))
      put64(b, e.at, (v & ~((1n << shift) - 1n)) | 0x10_0000n) // host offset 1 MiB, the file is 28 KiB
      return b
    },
    commands: ['cat'],
    expect: ['compressed cluster descriptor out of range', 'guest 0x0', /\(compressed cluster at 0x100000\)$/],
  },
  {
    name: 'zstd garbage in a compressed cluster',
    from: 'v3-compressed-zstd-c4k.qcow2',
    damage: (b) => {
      const e = compressedEntry(b, 1)
      for (let i = 0; i < e.size; i++) b[e.host + i] = (i * 151 + 7) & 0xff
      return b
    },
    commands: ['cat'],
    expect: ['cannot decompress zstd cluster', 'guest 0x1000', /\(compressed cluster at 0x[0-9a-f]+\)$/],
  },
  {
    name: 'deflate garbage in a compressed cluster',
    from: 'v3-compressed-zlib.qcow2',
    damage: (b) => {
      const e = compressedEntry(b, 0)
      b.fill(0xff, e.host, e.host + e.size)
      return b
    },
    commands: ['cat'],
    expect: ['cannot decompress deflate cluster', 'guest 0x0', /\(compressed cluster at 0x[0-9a-f]+\)$/],
  },
  {
    name: 'backing loop a.qcow2 -> b.qcow2 -> a.qcow2',
    from: 'chain-mid.qcow2',
    damage: (b, dir) => {
      const withBacking = (name: string): Buffer => {
        const c = Buffer.from(b)
        const at = u64(c, H.backingOffset)
        c.fill(0, at, at + u32(c, H.backingSize))
        c.write(name, at, 'latin1')
        put32(c, H.backingSize, name.length)
        return c
      }
      writeFileSync(join(dir, 'b.qcow2'), withBacking('a.qcow2'))
      return withBacking('b.qcow2')
    },
    // info shows a.qcow2 and its backing name without opening it, as qemu-img info does (test/cli/info-open.test.ts)
    commands: ['map', 'cat'],
    // b.qcow2 holds the pointer that closes the loop; the chain it names starts at a.qcow2
    culprit: 'b.qcow2',
    expect: ['backing file a.qcow2: backing chain loop', /a\.qcow2 -> .*b\.qcow2 -> .*a\.qcow2/, /\(backing file name at 0x88\)$/],
  },
  {
    name: 'backing file missing',
    from: 'chain-mid.qcow2',
    damage: (b) => b,
    // info shows the image and the backing name, as qemu-img info does (test/cli/info-open.test.ts)
    commands: ['cat'],
    expect: ['backing file chain-base.qcow2:', 'No such file or directory', /\(backing file name at 0x88\)$/],
  },
  {
    name: 'data cluster offset unaligned',
    from: 'v3-c4k.qcow2',
    damage: (b) => {
      const at = l2EntryOffset(b, 0)
      put64(b, at, b.readBigUInt64BE(at) + 0x200n)
      return b
    },
    commands: ['cat'],
    expect: [/data cluster offset 0x[0-9a-f]+200 for guest 0x0 is not aligned to cluster size 0x1000/, /\(L2 entry 0 at 0x[0-9a-f]+\)$/],
  },
  {
    name: 'unknown incompatible feature bit, named in the feature table',
    from: 'v3-c4k.qcow2',
    damage: (b) => {
      const ext = u32(b, H.headerLength) // extensions start right after the header
      expect(u32(b, ext)).toBe(0) // no extensions yet: the end marker
      put32(b, ext, 0x6803f857)
      put32(b, ext + 4, 48)
      b[ext + 8] = 0 // incompatible
      b[ext + 9] = 9 // bit 9
      b.write('frobnicator', ext + 10, 'latin1')
      put32(b, ext + 56, 0) // end
      put32(b, ext + 60, 0)
      put64(b, H.incompat, 1n << 9n)
      return b
    },
    commands: ['info', 'cat'],
    expect: ['Unsupported qcow2 feature(s): frobnicator (bit 9)', '(incompatible_features 0x200 at 0x48)'],
  },
  {
    name: 'unknown incompatible feature bit without a name',
    from: 'v3-c4k.qcow2',
    damage: (b) => (put64(b, H.incompat, 1n << 40n), b),
    commands: ['info'],
    expect: ['Unknown incompatible feature: bit 40', '(incompatible_features 0x10000000000 at 0x48)'],
  },
]

// ---------------------------------------------------------------------------
// running

interface CliResult {
  code: number | null
  signal: NodeJS.Signals | null
  stdout: Buffer
  stderr: string
  ms: number
}

/** node bin/imgtool ARGS, killed after `timeoutMs` (a hang fails the test instead of the run). */
function imgtool(args: string[], timeoutMs = 30_000): Promise<CliResult> {
  return new Promise((resolvePromise, reject) => {
    const t0 = performance.now()
    const child = spawn(process.execPath, [BIN, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, IMGTOOL_DEBUG: '' } })
    const out: Buffer[] = []
    const err: Buffer[] = []
    child.stdout.on('data', (c: Buffer) => out.push(c))
    child.stderr.on('data', (c: Buffer) => err.push(c))
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs)
    child.on('error', reject)
    child.on('close', (code, signal) => {
      clearTimeout(timer)
      resolvePromise({ code, signal, stdout: Buffer.concat(out), stderr: Buffer.concat(err).toString('utf8'), ms: performance.now() - t0 })
    })
  })
}

const sha256 = (path: string): string => createHash('sha256').update(readFileSync(path)).digest('hex')
const escapeRe = (s: string): string => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')

/** The line format every case must follow. */
function expectOneLine(stderr: string, file: string, words: Case['expect']): string {
  const lines = stderr.split('\n')
  expect(lines.length, `exactly one line on stderr:\n${stderr}`).toBe(2)
  expect(lines[1]).toBe('')
  const line = lines[0]!
  expect(line).not.toMatch(/^\s+at /m)
  expect(line).not.toContain('internal error')
  // imgtool: qcow2: <file>: <facts> (<structure> at 0x..)
  expect(line).toMatch(new RegExp(`^imgtool: qcow2: ${escapeRe(file)}: .+ \\([^()]*\\bat 0x[0-9a-f]+[^()]*\\)$`))
  for (const w of words) {
    if (typeof w === 'string') expect(line).toContain(w)
    else expect(line).toMatch(w)
  }
  return line.slice('imgtool: '.length)
}

describe('bad input: one line, exit 1, no writes', () => {
  useTempDirs()
  let dir = ''

  beforeAll(() => {
    if (!existsSync(join(ROOT, 'dist', 'cli', 'main.js'))) throw new Error('dist/ is missing: run npm run build (npm install does) before these tests')
    dir = makeTempDir('imgtool-badinput-')
  })

  describe.each(CASES.map((c) => [c.name, c] as const))('%s', (_name, c) => {
    let file = ''
    let culprit = ''
    let sum = ''
    let others: Array<[string, string]> = []

    beforeAll(() => {
      const sub = join(dir, c.name.replace(/[^a-z0-9]+/gi, '-'))
      mkdirSync(sub)
      const clean = readFileSync(join(FIXTURES, c.from))
      file = join(sub, c.name.startsWith('backing loop') ? 'a.qcow2' : 'damaged.qcow2')
      writeFileSync(file, c.damage(Buffer.from(clean), sub))
      culprit = c.culprit ? join(sub, c.culprit) : file
      sum = sha256(file)
      others = readdirSync(sub)
        .map((n) => join(sub, n))
        .filter((p) => p !== file)
        .map((p) => [p, sha256(p)])
    })

    for (const command of c.commands) {
      it(`imgtool ${command}: one line naming file, structure and offset; exit 1; nothing on stdout; image unchanged`, async () => {
        const args = command === 'info' ? ['info', '--output', 'json', file] : command === 'map' ? ['map', '--output', 'json', file] : ['cat', file]
        const r = await imgtool(args)
        expect(r.signal, `killed: the command hung (${Math.round(r.ms)} ms)`).toBeNull()
        expect(r.ms, 'finishes fast').toBeLessThan(10_000)
        expectOneLine(r.stderr, culprit, c.expect)
        expect(r.code).toBe(1)
        expect(r.stdout.length, `stdout: ${r.stdout.subarray(0, 200).toString()}`).toBe(0)
        expect(sha256(file)).toBe(sum)
        for (const [p, s] of others) expect(sha256(p), p).toBe(s)
      })
    }

    it('the library throws the same error, with details, and never writes', async () => {
      const devices: TracingDevice[] = []
      const openDevice = async (path: string, o: OpenDeviceOptions): Promise<BlockDevice> => {
        expect(o.readOnly, `${path} opened read-only`).toBe(true)
        const d = new TracingDevice(await openFileDevice(path, o))
        devices.push(d)
        return d
      }
      let error: unknown
      const image = await openImage(file, { readOnly: true, openDevice }).catch((e: unknown) => {
        error = e
        return undefined
      })
      if (image) {
        try {
          if (c.commands.includes('map')) {
            for await (const _ of image.extents()) void _
          } else {
            for (let pos = 0; pos < image.virtualSize; pos += 1 << 20) await image.read(pos, Math.min(1 << 20, image.virtualSize - pos))
          }
        } catch (e) {
          error = e
        } finally {
          await image.close()
        }
      }
      expect(isImgtoolError(error), `an ImgtoolError, not ${String(error)}`).toBe(true)
      const e = error as ImgtoolError
      expect(e.code).not.toBe('INTERNAL')
      expect(expectOneLine(`imgtool: ${e.message}\n`, culprit, c.expect)).toBe(e.message)
      expect(typeof e.details.file).toBe('string')
      expect(typeof e.details.structure).toBe('string')
      expect(typeof e.details.offset).toBe('number')
      for (const d of devices) {
        expect(d.count({ op: ['write', 'truncate'] }), `${d.name}: writes\n${d.dump({ op: ['write', 'truncate'] })}`).toBe(0)
        // bounded: no single read bigger than a cluster table's worth, whatever the header claims
        for (const op of d.reads()) expect(op.length, `${d.name}: read of ${op.length} bytes`).toBeLessThanOrEqual(8 * 1024 * 1024)
      }
      expect(sha256(file)).toBe(sum)
    })
  })
})

/**
 * An L1 entry bent to an L2 table at 1 GiB, past the end of an 84 KiB file: qemu-img's reads past the
 * end of a file give zeros, so it maps the range as unallocated and reads zeros there; a read-only open
 * here does the same (fuzzer class L2-PAST-EOF). A writable open still refuses to use that table, with
 * the one-line error, before anything is written: writing through it would grow the file to 1 GiB.
 */
describeQemu(
  'L2 table past the end of the file',
  () => {
    useTempDirs()
    let file = ''
    beforeAll(() => {
      const dir = makeTempDir('l2-eof-')
      const b = readFileSync(join(FIXTURES, 'v3-c4k.qcow2'))
      put64(b, u64(b, H.l1Offset), 0x8000_0000_4000_0000n)
      file = join(dir, 'l2-eof.qcow2')
      writeFileSync(file, b)
    })

    it('map and cat read it as qemu-img does (unallocated, zeros), exit 0, image unchanged', async () => {
      const sum = sha256(file)
      const ours = await imgtool(['map', '--output', 'json', file])
      const theirs = await qemuImg(['map', '--output=json', '-f', 'qcow2', file])
      expect(ours.code, ours.stderr).toBe(0)
      expect(theirs.code).toBe(0)
      expect(JSON.parse(ours.stdout.toString())).toEqual(JSON.parse(theirs.stdout))
      const cat = await imgtool(['cat', file])
      expect(cat.code, cat.stderr).toBe(0)
      const raw = join(file + '.raw')
      expect((await qemuImg(['convert', '-f', 'qcow2', '-O', 'raw', file, raw])).code).toBe(0)
      expect(cat.stdout.equals(readFileSync(raw))).toBe(true)
      expect(sha256(file)).toBe(sum)
    })

    it('a writable open refuses to write through it: one line naming file, structure and offset; no write', async () => {
      const sum = sha256(file)
      const devices: TracingDevice[] = []
      const openDevice = async (path: string, o: OpenDeviceOptions): Promise<BlockDevice> => {
        const d = new TracingDevice(await openFileDevice(path, o))
        devices.push(d)
        return d
      }
      const image = await openImage(file, { readOnly: false, openDevice })
      let error: unknown
      expect(image.write, 'a writable open offers write').toBeTypeOf('function')
      try {
        await image.write!(0, new Uint8Array(4096).fill(7))
      } catch (e) {
        error = e
      } finally {
        await image.close().catch(() => undefined)
      }
      expect(isImgtoolError(error), `an ImgtoolError, not ${String(error)}`).toBe(true)
      const e = error as ImgtoolError
      expect(e.code).not.toBe('INTERNAL')
      expectOneLine(`imgtool: ${e.message}\n`, file, ['L2 table offset 0x40000000 is beyond the end of the file', /\(L1 entry 0 at 0x3000\)$/])
      for (const d of devices) expect(d.count({ op: ['write', 'truncate'] }), `${d.name}: writes\n${d.dump({ op: ['write', 'truncate'] })}`).toBe(0)
      expect(sha256(file)).toBe(sum)
    })
  },
  ['qemu-img'],
)
