/**
 * convert -W (out-of-order writes) and -m (chunks at once), as qemu-img convert takes them: -m's range and
 * words against qemu-img; -W really writes chunks in the order their reads finish (a source whose reads
 * finish backwards), and gives the same guest bytes as qemu-img on every target format we write.
 */
import { join } from 'node:path'
import { describe, expect, it, vi } from 'vitest'
import { main } from '../../src/cli/main.js'
import { convert } from '../../src/convert/convert.js'
import type { DiskImage, Extent, ImageInfo } from '../../src/image/disk-image.js'
import { collector, describeQemu, qemuImg, qemuImgOk, qemuIoOk, useTempDirs, makeTempDir } from '../support/qemu.js'

async function cli(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = collector()
  const err = collector()
  const code = await main(['node', 'imgtool', ...args], { stdout: out, stderr: err, isTTY: false })
  return { code, stdout: out.text(), stderr: err.text() }
}

const MiB = 1024 * 1024

/**
 * A source of data chunks whose reads finish in reverse order (the last chunk's read first): no read
 * answers before `gate` reads have started; chunk `fail` (if given) then fails its read.
 */
function backwardsSource(size: number, chunk: number, gate: number, fail?: number): DiskImage {
  const chunks = size / chunk
  const started: number[] = []
  let release: (() => void) | undefined
  const allStarted = new Promise<void>((r) => (release = r))
  return {
    format: 'test',
    filename: 'backwards',
    virtualSize: size,
    readOnly: true,
    async read(offset: number, length: number): Promise<Uint8Array> {
      started.push(offset)
      if (started.length === gate) release!()
      await allStarted
      if (offset / chunk === fail) throw new Error(`EIO at chunk ${fail}`)
      // later chunks answer sooner: chunk k waits (chunks - k) turns of the event loop
      for (let i = 0; i < (chunks - offset / chunk) * 20; i++) await new Promise((r) => setImmediate(r))
      return new Uint8Array(length).fill(1 + ((offset / chunk) % 250))
    },
    async *extents(offset = 0, length = size): AsyncIterable<Extent> {
      yield { start: offset, length, depth: 0, present: true, zero: false, data: true }
    },
    async info(): Promise<ImageInfo> {
      throw new Error('not used')
    },
    async flush() {},
    async close() {},
  }
}

/** A writable in-memory target that records the guest offset of every write, in call order. */
function recordingTarget(size: number): DiskImage & { order: number[]; bytes: Uint8Array } {
  const bytes = new Uint8Array(size)
  const order: number[] = []
  return {
    format: 'test',
    filename: 'target',
    virtualSize: size,
    readOnly: false,
    order,
    bytes,
    async read(offset: number, length: number) {
      return bytes.slice(offset, offset + length)
    },
    async *extents(offset = 0, length = size): AsyncIterable<Extent> {
      yield { start: offset, length, depth: 0, present: true, zero: false, data: true }
    },
    async info(): Promise<ImageInfo> {
      throw new Error('not used')
    },
    async write(offset: number, data: Uint8Array) {
      order.push(offset)
      bytes.set(data, offset)
    },
    async flush() {},
    async close() {},
  }
}

describe('convert -W: writes in the order the reads finish', () => {
  const size = 4 * MiB
  const chunk = MiB

  it('in order without -W, whatever order the reads finish in', async () => {
    const dst = recordingTarget(size)
    await convert(backwardsSource(size, chunk, 4), dst, { chunkSize: chunk, inFlight: 4 })
    expect(dst.order).toEqual([0, 1, 2, 3].map((k) => k * chunk))
  })

  it('with -W the chunk read first is written first (here: backwards), and the bytes are the same', async () => {
    const dst = recordingTarget(size)
    const r = await convert(backwardsSource(size, chunk, 4), dst, { chunkSize: chunk, inFlight: 4, outOfOrder: true })
    expect(dst.order).toEqual([3, 2, 1, 0].map((k) => k * chunk))
    for (let k = 0; k < 4; k++) expect(dst.bytes[k * chunk], `chunk ${k}`).toBe(1 + k)
    expect(r.bytesWritten).toBe(size)
  })

  it('with -W and -m 1 one chunk at a time: guest order again', async () => {
    const dst = recordingTarget(size)
    await convert(backwardsSource(size, chunk, 1), dst, { chunkSize: chunk, inFlight: 1, outOfOrder: true })
    expect(dst.order).toEqual([0, 1, 2, 3].map((k) => k * chunk))
  })

  it('with -W a failed read fails the convert', async () => {
    const src = backwardsSource(size, chunk, 4, 2)
    await expect(convert(src, recordingTarget(size), { chunkSize: chunk, inFlight: 4, outOfOrder: true })).rejects.toThrow('EIO at chunk 2')
  })
})

describeQemu('convert -m and -W against qemu-img', () => {
  useTempDirs()
  vi.setConfig({ testTimeout: 600_000 })

  it('-m takes what qemu-img takes (1 to 16, qemu_strtol spellings) and refuses the rest in its words', async () => {
    const dir = makeTempDir()
    const src = join(dir, 'src.raw')
    await qemuImgOk(['create', '-q', '-f', 'raw', src, '1M'])
    for (const m of ['1', '16', '010', '017', '0x10', '+8', ' 8', '0', '17', '-1', '08', '8 ', 'abc', '']) {
      const ours = await cli('convert', '-m', m, '-O', 'raw', src, join(dir, 'ours.raw'))
      const theirs = await qemuImg(['convert', '-m', m, '-O', 'raw', src, join(dir, 'theirs.raw')])
      expect(ours.code, `-m '${m}'`).toBe(theirs.code)
      expect(ours.stderr.trim().replace(/^imgtool: /, ''), `-m '${m}'`).toBe(theirs.stderr.trim().replace(/^qemu-img: /, ''))
    }
  })

  it('-W gives the source guest bytes on every target format, qemu-img check clean', async () => {
    const dir = makeTempDir()
    const src = join(dir, 'src.qcow2')
    await qemuImgOk(['create', '-q', '-f', 'qcow2', src, '40M'])
    // data in many places, zero ranges between them, a zero-written range inside data
    await qemuIoOk(src, ['write -P 7 0 3M', 'write -P 9 9M 5M', 'write -z 10M 1M', 'write -P 3 20M 64k', 'write -P 5 31M 9M'])
    const targets: Array<{ fmt: string; opts: string[] }> = [
      { fmt: 'raw', opts: [] },
      { fmt: 'qcow2', opts: [] },
      { fmt: 'qcow2', opts: ['-c'] },
      { fmt: 'vpc', opts: [] },
      { fmt: 'vmdk', opts: [] },
      { fmt: 'vmdk', opts: ['-o', 'subformat=streamOptimized'] },
    ]
    for (const t of targets) {
      for (const m of ['2', '8', '16']) {
        const label = `${t.fmt} ${t.opts.join(' ')} -m ${m}`
        const out = join(dir, `out-${t.fmt}-${t.opts.length}-${m}`)
        const r = await cli('convert', '-W', '-m', m, '-O', t.fmt, ...t.opts, src, out)
        expect(r.code, `${label}: ${r.stderr}`).toBe(0)
        const cmp = await qemuImg(['compare', '-f', 'qcow2', '-F', t.fmt, src, out])
        expect(cmp.code, `${label}: ${cmp.stdout}${cmp.stderr}`).toBe(0)
        if (t.fmt === 'qcow2' || t.fmt === 'vmdk') {
          const chk = await qemuImg(['check', '-f', t.fmt, out])
          expect(chk.code, `${label}: ${chk.stdout}`).toBe(0)
        }
      }
    }
  })

  it('-W with -n writes the source over a target holding data, as qemu-img -W -n', async () => {
    const dir = makeTempDir()
    const src = join(dir, 'src.raw')
    await qemuImgOk(['create', '-q', '-f', 'raw', src, '24M'])
    await qemuIoOk(src, ['write -P 1 0 5M', 'write -P 2 12M 3M'], { format: 'raw' })
    const ours = join(dir, 'ours.qcow2')
    const theirs = join(dir, 'theirs.qcow2')
    for (const t of [ours, theirs]) {
      await qemuImgOk(['create', '-q', '-f', 'qcow2', t, '24M'])
      await qemuIoOk(t, ['write -P 9 0 24M'])
    }
    expect((await cli('convert', '-W', '-n', '-O', 'qcow2', src, ours)).code).toBe(0)
    await qemuImgOk(['convert', '-W', '-n', '-O', 'qcow2', src, theirs])
    expect((await qemuImg(['compare', ours, theirs])).code).toBe(0)
    expect((await qemuImg(['compare', '-f', 'raw', '-F', 'qcow2', src, ours])).code).toBe(0)
  })
})
