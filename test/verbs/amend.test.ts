/**
 * imgtool amend against the real qemu-img amend on copies of the same image
 * (made by qemu-img create and qemu-io): after each option set both copies
 * are clean for qemu-img check, qemu-img info's JSON agrees (format-specific
 * fields, virtual size), qemu-img compare finds the same guest bytes, and,
 * where qemu's result is deterministic, the header clusters are byte-equal.
 * Every refusal has qemu-img's exit code and words; the deliberate
 * differences are tested with imgtool's own words.
 */
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { expect, it } from 'vitest'
import { cli } from '../support/cli.js'
import { stripSnapshotExtraData } from '../support/snapshot-extra.js'
import { QemuIoHolder } from '../locks/support.js'
import { fx } from '../support/cli.js'
import { describeQemu, makeTempDir, qemuImg, qemuImgJson, qemuImgOk, qemuIoOk, useTempDirs } from '../support/qemu.js'

useTempDirs()
const LIMIT = 120_000

interface Made {
  dir: string
  ours: string
  theirs: string
}

/** One image made by qemu (create options, qemu-io commands, then snapshots), copied twice. */
async function make(create: string[], io: string[] = [], snapshots: string[] = [], size = '4M'): Promise<Made> {
  const dir = makeTempDir('imgtool-amend-')
  const src = join(dir, 'src.qcow2')
  if (create.includes('base.qcow2')) await qemuImgOk(['create', '-q', '-f', 'qcow2', join(dir, 'base.qcow2'), size])
  await qemuImgOk(['create', '-q', '-f', 'qcow2', ...create, src, size], { cwd: dir })
  if (io.length > 0) await qemuIoOk(src, io, { format: 'qcow2', cwd: dir })
  for (const s of snapshots) await qemuImgOk(['snapshot', '-c', s, src], { cwd: dir })
  const ours = join(dir, 'ours.qcow2')
  const theirs = join(dir, 'theirs.qcow2')
  copyFileSync(src, ours)
  copyFileSync(src, theirs)
  return { dir, ours, theirs }
}

type Info = { 'virtual-size': number; 'format-specific': { data: Record<string, unknown> }; snapshots?: unknown[] }

/** `notice`: a dirty image, whose refcounts both tools rebuild on opening it, each saying so its own way */
async function expectSameResult(m: Made, opts: string, headerEqual: boolean, notice = false): Promise<void> {
  const theirs = await qemuImg(['amend', '-o', opts, m.theirs], { cwd: m.dir })
  expect(theirs, opts).toMatchObject(notice ? { code: 0 } : { code: 0, stdout: '', stderr: '' })
  const ours = await cli('amend', '-o', opts, m.ours)
  const says = notice ? `imgtool: qcow2: ${m.ours}: the image was not closed cleanly; refcounts were rebuilt\n` : ''
  expect(ours, opts).toEqual({ code: 0, stdout: '', stderr: says })
  for (const f of [m.ours, m.theirs]) {
    const c = await qemuImg(['check', f], { cwd: m.dir })
    expect(c.code, `${opts}: qemu-img check ${f}\n${c.stdout}${c.stderr}`).toBe(0)
  }
  const [a, b] = await Promise.all([m.ours, m.theirs].map((f) => qemuImgJson<Info>(['info', '--output=json', f], { cwd: m.dir })))
  expect(a!['virtual-size'], opts).toBe(b!['virtual-size'])
  expect(a!['format-specific'], opts).toEqual(b!['format-specific'])
  expect(a!.snapshots, opts).toEqual(b!.snapshots)
  const cmp = await qemuImg(['compare', '-f', 'qcow2', '-F', 'qcow2', m.ours, m.theirs], { cwd: m.dir })
  expect(cmp.code, `${opts}: ${cmp.stdout}${cmp.stderr}`).toBe(0)
  if (headerEqual) {
    const cs = Number((b!['format-specific'].data as { 'cluster-size'?: number })['cluster-size'] ?? 0) || clusterSize(m.theirs)
    expect(Buffer.compare(readFileSync(m.ours).subarray(0, cs), readFileSync(m.theirs).subarray(0, cs)), `${opts}: header cluster`).toBe(0)
  }
}

function clusterSize(path: string): number {
  return 2 ** readFileSync(path).readUInt32BE(20)
}

/** qemu-img's words, joined as imgtool joins a message of several lines */
function qemuWords(stderr: string): string {
  return stderr
    .trim()
    .split('\n')
    .filter((l) => !l.startsWith('Try '))
    .map((l) => l.replace(/^qemu-img: /, ''))
    .join('; ')
}

async function expectSameRefusal(m: Made, args: string[]): Promise<void> {
  const before = readFileSync(m.ours)
  const theirs = await qemuImg(['amend', ...args, m.theirs], { cwd: m.dir })
  const ours = await cli('amend', ...args, m.ours)
  expect(theirs.code, `${args.join(' ')}: qemu-img refused`).toBe(1)
  expect({ code: ours.code, stderr: ours.stderr.trim() }, args.join(' ')).toEqual({ code: 1, stderr: `imgtool: ${qemuWords(theirs.stderr)}` })
  expect(Buffer.compare(readFileSync(m.ours), before), `${args.join(' ')}: the image is unchanged`).toBe(0)
}

const DATA = ['write -P 7 0 64k', 'write -P 9 1M 100k', 'write -c -P 3 2M 64k']

describeQemu('imgtool amend matches qemu-img amend', () => {
  const same: Array<{ name: string; create: string[]; io?: string[]; snaps?: string[]; opts: string; header?: boolean }> = [
    { name: 'downgrade to 0.10 (64 KiB clusters)', create: [], io: DATA, opts: 'compat=0.10', header: true },
    { name: 'downgrade to 0.10 (4 KiB clusters, snapshots)', create: ['-o', 'cluster_size=4k'], io: DATA, snaps: ['s1'], opts: 'compat=0.10', header: true },
    { name: 'downgrade over unallocated zero clusters', create: [], io: [...DATA, 'write -z 256k 128k'], opts: 'compat=v2', header: true },
    {
      name: 'downgrade over preallocated zero clusters (zeroes written)',
      create: ['-o', 'preallocation=metadata,cluster_size=4k'],
      io: ['write -P 1 0 128k', 'write -z 0 64k', 'write -z 1M 8k'],
      opts: 'compat=0.10',
      header: true,
    },
    { name: 'downgrade with lazy refcounts on', create: ['-o', 'lazy_refcounts=on'], io: DATA, opts: 'compat=0.10', header: true },
    { name: 'upgrade to 1.1 (64 KiB clusters)', create: ['-o', 'compat=0.10'], io: DATA, opts: 'compat=1.1', header: true },
    {
      name: 'upgrade to 1.1 (4 KiB clusters, snapshots)',
      create: ['-o', 'compat=0.10,cluster_size=4k'],
      io: DATA,
      snaps: ['a', 'b'],
      opts: 'compat=v3',
      header: true,
    },
    { name: 'upgrade to 1.1 (8 KiB clusters)', create: ['-o', 'compat=0.10,cluster_size=8k'], io: DATA, opts: 'compat=1.1', header: true },
    {
      name: 'upgrade to 1.1 (512-byte clusters, a backing file)',
      create: ['-o', 'compat=0.10,cluster_size=512', '-b', 'base.qcow2', '-F', 'qcow2'],
      opts: 'compat=1.1',
      header: true,
    },
    { name: 'downgrade to 0.10 (a backing file)', create: ['-b', 'base.qcow2', '-F', 'qcow2'], io: ['write -P 2 64k 4k'], opts: 'compat=0.10', header: true },
    { name: 'upgrade with lazy refcounts', create: ['-o', 'compat=0.10'], io: DATA, opts: 'compat=1.1,lazy_refcounts=on', header: true },
    { name: 'lazy_refcounts on', create: [], io: DATA, opts: 'lazy_refcounts=on', header: true },
    { name: 'lazy_refcounts off', create: ['-o', 'lazy_refcounts=on'], io: DATA, opts: 'lazy_refcounts=off', header: true },
    { name: 'grow with size', create: [], io: DATA, opts: 'size=3G', header: true },
    { name: 'grow a v2 image and keep it v2', create: ['-o', 'compat=0.10'], io: DATA, opts: 'size=8M,compat=0.10', header: true },
    { name: 'refcount_bits=16 unchanged is a no-op', create: [], io: DATA, opts: 'refcount_bits=16', header: true },
    { name: 'data_file_raw=off', create: ['-o', 'data_file=src.raw,data_file_raw=on'], io: ['write -P 5 0 64k'], opts: 'data_file_raw=off', header: true },
    { name: 'data_file renamed', create: ['-o', 'data_file=src.raw'], io: ['write -P 5 0 64k'], opts: 'data_file=src.raw', header: true },
  ]
  for (const c of same) {
    it(
      c.name,
      async () => {
        const m = await make(c.create, c.io, c.snaps)
        await expectSameResult(m, c.opts, c.header ?? false)
      },
      LIMIT,
    )
  }

  // refcount_bits: a new structure, placed where each tool places it (qemu: first free clusters; imgtool: past the end)
  for (const bits of [1, 2, 4, 8, 32, 64]) {
    it(
      `refcount_bits=${bits}`,
      async () => {
        // compressed clusters share host clusters (16 and more references): only wide refcounts hold them
        const io = bits >= 8 ? [...DATA, 'write -P 1 3M 300k'] : ['write -P 7 0 64k', 'write -P 1 3M 300k']
        const m = await make(['-o', 'cluster_size=4k'], io, bits >= 2 ? ['s1'] : [])
        await expectSameResult(m, `refcount_bits=${bits}`, false)
      },
      LIMIT,
    )
  }
  it(
    'refcount_bits=8 and back to 16, then a downgrade',
    async () => {
      const m = await make([], DATA, ['s1', 's2'])
      await expectSameResult(m, 'refcount_bits=8', false)
      await expectSameResult(m, 'refcount_bits=16,compat=0.10', false)
    },
    LIMIT,
  )
  it(
    'upgrade of v2 snapshots without extra data: the table is written anew with disk sizes',
    async () => {
      const m = await make(['-o', 'compat=0.10,cluster_size=4k'], DATA, ['first', 'second'])
      for (const f of [m.ours, m.theirs]) writeFileSync(f, stripSnapshotExtraData(readFileSync(f)))
      expect((await qemuImg(['check', m.ours])).code, 'the stripped image is sound').toBe(0)
      await expectSameResult(m, 'compat=1.1', true)
    },
    LIMIT,
  )
  // a dirty image (lazy refcounts, not closed cleanly): both tools repair the refcounts on opening it, each its own way
  for (const opts of ['lazy_refcounts=off', 'compat=0.10', 'refcount_bits=32']) {
    it(
      `${opts} on a dirty image`,
      async () => {
        const m = await make([], [])
        for (const f of [m.ours, m.theirs]) copyFileSync(fx('v3-dirty-lazy.qcow2'), f)
        await expectSameResult(m, opts, false, true)
      },
      LIMIT,
    )
  }
  it(
    'refuses an image another process holds, as qemu-img does (its write lock)',
    async () => {
      const m = await make([], DATA)
      const before = readFileSync(m.ours)
      const holder = await QemuIoHolder.start(m.ours)
      try {
        const theirs = await qemuImg(['amend', '-o', 'lazy_refcounts=on', m.ours])
        const ours = await cli('amend', '-o', 'lazy_refcounts=on', m.ours)
        expect(theirs.code).toBe(1)
        expect(theirs.stderr).toMatch(/Failed to get "write" lock/)
        expect(ours.code).toBe(1)
        expect(ours.stderr).toMatch(/lock/i)
      } finally {
        await holder.stop()
      }
      expect(Buffer.compare(readFileSync(m.ours), before)).toBe(0)
    },
    LIMIT,
  )
  it(
    'upgrade and refcount_bits=1 at once',
    async () => {
      const m = await make(['-o', 'compat=0.10'], DATA)
      await expectSameResult(m, 'compat=1.1,refcount_bits=1', false)
    },
    LIMIT,
  )

  const refusals: Array<{ name: string; create?: string[]; io?: string[]; snaps?: string[]; args: string[] }> = [
    { name: 'a creation-only option', args: ['-o', 'cluster_size=4096'] },
    { name: 'preallocation', args: ['-o', 'preallocation=metadata'] },
    { name: 'extended_l2', args: ['-o', 'extended_l2=on'] },
    { name: 'compression_type', args: ['-o', 'compression_type=zstd'] },
    { name: 'encryption', args: ['-o', 'encryption=on'] },
    { name: 'an unknown option', args: ['-o', 'foo=bar'] },
    { name: 'an unknown compat level', args: ['-o', 'compat=0.9'] },
    { name: 'a refcount width not a power of two', args: ['-o', 'refcount_bits=3'] },
    { name: 'a refcount width above 64', args: ['-o', 'refcount_bits=128'] },
    { name: 'a bad bool', args: ['-o', 'lazy_refcounts=maybe'] },
    { name: 'a bad size', args: ['-o', 'size=abc'] },
    { name: 'encryption options on a plain image', args: ['-o', 'encrypt.new-secret=x'] },
    { name: 'the backing file', args: ['-o', 'backing_file=other.qcow2'] },
    { name: 'a data file on an image without one', args: ['-o', 'data_file=x.raw'] },
    { name: 'data_file_raw=on', create: ['-o', 'data_file=src.raw'], args: ['-o', 'data_file_raw=on'] },
    { name: 'no -o', args: [] },
    { name: 'the raw format', args: ['-f', 'raw', '-o', 'size=1M'] },
    { name: 'downgrade with refcount_bits 8', create: ['-o', 'refcount_bits=8'], args: ['-o', 'compat=0.10'] },
    { name: 'downgrade to refcount_bits 8', args: ['-o', 'compat=0.10,refcount_bits=8'] },
    { name: 'downgrade with extended L2', create: ['-o', 'extended_l2=on'], args: ['-o', 'compat=0.10'] },
    { name: 'downgrade with a data file', create: ['-o', 'data_file=src.raw'], args: ['-o', 'compat=0.10'] },
    { name: 'downgrade with zstd compressed clusters', create: ['-o', 'compression_type=zstd'], io: ['write -c 0 64k'], args: ['-o', 'compat=0.10'] },
    { name: 'downgrade and resize with snapshots', snaps: ['s'], args: ['-o', 'compat=0.10,size=8M'] },
    { name: 'lazy refcounts on a v2 image', create: ['-o', 'compat=0.10'], args: ['-o', 'lazy_refcounts=on'] },
    { name: 'refcount_bits on a v2 image', create: ['-o', 'compat=0.10'], args: ['-o', 'refcount_bits=8'] },
    { name: 'a refcount width too narrow', io: ['write 0 64k'], snaps: ['s1', 's2'], args: ['-o', 'refcount_bits=1'] },
  ]
  for (const r of refusals) {
    it(
      `refuses ${r.name} as qemu-img does`,
      async () => {
        const m = await make(r.create ?? [], r.io ?? [], r.snaps ?? [])
        await expectSameRefusal(m, r.args)
      },
      LIMIT,
    )
  }

  it(
    'downgrades an image with compressed zstd-less clusters and zstd without compressed clusters, as qemu',
    async () => {
      const m = await make(['-o', 'compression_type=zstd'], ['write -P 4 0 64k'])
      await expectSameResult(m, 'compat=0.10', true)
    },
    LIMIT,
  )
})

describeQemu('imgtool amend -o help prints what qemu-img amend prints', () => {
  for (const args of [
    ['-f', 'qcow2', '-o', 'help'],
    ['-o', 'help'],
    ['-o', '?'],
    ['-o', 'help,compat=0.10'],
    ['-f', 'raw', '-o', 'help'],
  ]) {
    it(
      `amend ${args.join(' ')}`,
      async () => {
        const m = await make([], [])
        const withImage = args[0] !== '-f'
        const before = readFileSync(m.ours)
        const theirs = await qemuImg(['amend', ...args, ...(withImage ? [m.theirs] : [])])
        const ours = await cli('amend', ...args, ...(withImage ? [m.ours] : []))
        expect(ours.code).toBe(theirs.code)
        expect(ours.stdout).toBe(theirs.stdout)
        if (theirs.code !== 0) expect(ours.stderr.trim()).toBe(`imgtool: ${qemuWords(theirs.stderr)}`)
        expect(Buffer.compare(readFileSync(m.ours), before), 'nothing is changed').toBe(0)
      },
      LIMIT,
    )
  }
})

describeQemu('imgtool amend: deliberate differences from qemu-img', () => {
  it(
    'refuses to shrink over guest data (qemu-img amend discards it)',
    async () => {
      const m = await make([], DATA)
      const before = readFileSync(m.ours)
      const r = await cli('amend', '-o', 'size=1M', m.ours)
      expect(r.code).toBe(1)
      expect(r.stderr).toMatch(/cannot shrink to 1048576 bytes: guest data is allocated at 0x100000/)
      expect(Buffer.compare(readFileSync(m.ours), before)).toBe(0)
      // shrinking over unallocated space works as in qemu
      await expectSameResult(m, 'size=3M', true)
    },
    LIMIT,
  )
  it(
    'refuses to downgrade an image with persistent bitmaps (qemu-img leaves them unusable and leaked)',
    async () => {
      const m = await make([], DATA)
      await qemuImgOk(['bitmap', '--add', m.ours, 'b0'])
      const r = await cli('amend', '-o', 'compat=0.10', m.ours)
      expect(r.code).toBe(1)
      expect(r.stderr).toMatch(/Cannot downgrade an image with persistent bitmaps/)
      expect((await qemuImg(['check', m.ours])).code).toBe(0)
    },
    LIMIT,
  )
  it(
    'refuses to downgrade over zero clusters over a backing file (qemu-img allocates and zeroes them)',
    async () => {
      const m = await make(['-b', 'base.qcow2', '-F', 'qcow2'], ['write -z 0 64k'])
      const before = readFileSync(m.ours)
      const r = await cli('amend', '-o', 'compat=0.10', m.ours)
      expect(r.code).toBe(1)
      expect(r.stderr).toMatch(/zero cluster in the L2 table at 0x[0-9a-f]+ \(entry 0\) is over a backing file/)
      expect(Buffer.compare(readFileSync(m.ours), before)).toBe(0)
    },
    LIMIT,
  )
})
