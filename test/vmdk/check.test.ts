/**
 * vmdk check against qemu-img check: the same exit code on every fixture and
 * on every damage (qemu-img judges one thing: a grain or a flat extent past
 * the end of its file, "Check failed", exit 1; it never says 2 for a VMDK).
 * Damage qemu-img does not see (it says "No errors", exit 0) gives imgtool's
 * finding with its offset as a warning, which counts nothing, and the JSON
 * counts equal qemu-img's.
 */
import { readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { expect, it } from 'vitest'
import { checkExitCode, type CheckReport } from '../../src/check/types.js'
import { openImage } from '../../src/open.js'
import { describeQemu, makeTempDir, qemuImg, useTempDirs } from '../support/qemu.js'
import { FIXTURES, FIXTURE_DIR, cli, withFooter } from './support.js'

useTempDirs()

async function checkFile(path: string): Promise<CheckReport> {
  const img = await openImage(path, { format: 'vmdk', forCheck: true })
  try {
    return await img.check!()
  } finally {
    await img.close()
  }
}

const fixture = (name: string) => readFileSync(join(FIXTURE_DIR, name))
const gdAt = (b: Buffer) => Number(b.readBigUInt64LE(56)) * 512
const rgdAt = (b: Buffer) => Number(b.readBigUInt64LE(48)) * 512
/** host offset of grain table entry j of table 0 (primary or redundant) */
const gte = (b: Buffer, j: number, redundant = false) => b.readUInt32LE(redundant ? rgdAt(b) : gdAt(b)) * 512 + j * 4

describeQemu(
  'vmdk check against qemu-img check',
  () => {
    const dir = makeTempDir('imgtool-vmdk-check-')

    for (const name of FIXTURES) {
      it(`${name}: the exit code of qemu-img check (recorded and live), no corruption`, async () => {
        const path = join(FIXTURE_DIR, name)
        const golden = Number(readFileSync(`${path}.check.exit`, 'utf8').trim())
        const theirs = await qemuImg(['check', '-f', 'vmdk', path])
        expect(theirs.code).toBe(golden)
        const r = await cli('check', '--output', 'json', path)
        expect(r.code, r.err).toBe(golden)
        const report = await checkFile(path)
        expect(report.findings).toEqual([])
        expect([report.corruptions, report.leaks, report.checkErrors]).toEqual([0, 0, 0])
      })
    }

    it('sparse-zeroed.vmdk: the grain QEMU orphaned with a zeroed-grain write is a notice, exit 0 as qemu-img', async () => {
      const report = await checkFile(join(FIXTURE_DIR, 'sparse-zeroed.vmdk'))
      expect(report.notices?.map((n) => [n.kind, n.cluster])).toEqual([['leaked-grain', 1]])
      expect(checkExitCode(report)).toBe(0)
    })

    const cases: Array<{
      name: string
      from: string
      damage: (b: Buffer) => Buffer
      kind: string
      at: (b: Buffer) => number
      qemu: number
    }> = [
      {
        name: 'a grain past the end of the file (qemu-img: points after EOF)',
        from: 'sparse-data.vmdk',
        damage: (b) => (b.writeUInt32LE(0x100000, gte(b, 1)), b),
        kind: 'grain-past-eof',
        at: () => 0x100000 * 512,
        qemu: 1,
      },
      {
        name: 'a compressed grain past the end of the file',
        from: 'conv-stream.vmdk',
        damage: (b) => (b.writeUInt32LE(0x200000, gte(b, 0)), b),
        kind: 'grain-past-eof',
        at: () => 0x200000 * 512,
        qemu: 1,
      },
      {
        name: 'a grain table past the end of the file',
        from: 'sparse-data.vmdk',
        damage: (b) => (b.writeUInt32LE(0x7fff0000, gdAt(b)), b),
        kind: 'gt-past-eof',
        at: () => 0x7fff0000 * 512,
        qemu: 0,
      },
      {
        name: 'a grain directory past the end of the file',
        from: 'sparse-data.vmdk',
        damage: (b) => (b.writeBigUInt64LE(0x10000n, 56), b),
        kind: 'grain-directory-range',
        at: () => 0x10000 * 512,
        qemu: 0,
      },
      {
        name: 'a redundant directory entry that differs',
        from: 'sparse-data.vmdk',
        damage: (b) => (b.writeUInt32LE(0, rgdAt(b)), b),
        kind: 'rgd-differs',
        at: (b) => rgdAt(b),
        qemu: 0,
      },
      {
        // (a redundant entry of 0 where the primary maps a grain is a write interrupted between the copies: a notice)
        name: 'a redundant grain table entry that differs',
        from: 'sparse-data.vmdk',
        damage: (b) => (b.writeUInt32LE(b.readUInt32LE(gte(b, 0)) + 128, gte(b, 0, true)), b),
        kind: 'rgt-differs',
        at: (b) => gte(b, 0, true),
        qemu: 0,
      },
      {
        name: 'a grain over the grain directory',
        from: 'sparse-data.vmdk',
        damage: (b) => (b.writeUInt32LE(gdAt(b) / 512, gte(b, 2)), b),
        kind: 'overlap',
        at: (b) => gdAt(b),
        qemu: 0,
      },
      {
        name: 'two grain table entries naming one grain',
        from: 'sparse-data.vmdk',
        damage: (b) => (b.writeUInt32LE(b.readUInt32LE(gte(b, 0)), gte(b, 5)), b),
        kind: 'overlap',
        at: (b) => b.readUInt32LE(gte(b, 0)) * 512,
        qemu: 0,
      },
      {
        name: 'a compressed grain whose bytes do not inflate',
        from: 'conv-stream.vmdk',
        damage: (b) => {
          const at = b.readUInt32LE(gte(b, 0)) * 512
          b.fill(0x55, at + 12, at + 40)
          return b
        },
        kind: 'compressed-grain',
        at: (b) => b.readUInt32LE(gte(b, 0)) * 512,
        qemu: 0,
      },
      {
        name: 'a grain marker naming another sector',
        from: 'conv-stream.vmdk',
        damage: (b) => (b.writeBigUInt64LE(999n, b.readUInt32LE(gte(b, 0)) * 512), b),
        kind: 'grain-marker-lba',
        at: (b) => b.readUInt32LE(gte(b, 0)) * 512,
        qemu: 0,
      },
      {
        name: "a stream footer whose grain size differs from the header's",
        from: 'conv-stream.vmdk',
        damage: (b) => {
          const f = withFooter(b)
          f.writeBigUInt64LE(0x100n, f.length - 1024 + 20)
          return f
        },
        kind: 'footer-differs',
        at: (b) => b.length - 1024 + 20,
        qemu: 0,
      },
    ]

    for (const c of cases) {
      it(`${c.name}: ${c.kind}, the exit code and JSON counts of qemu-img check (${c.qemu})`, async () => {
        const path = join(dir, `${c.name.replace(/\W+/g, '-')}.vmdk`)
        const bytes = c.damage(Buffer.from(fixture(c.from)))
        writeFileSync(path, bytes)
        expect((await qemuImg(['check', '-f', 'vmdk', path])).code).toBe(c.qemu)
        const report = await checkFile(path)
        const f = report.findings.find((x) => x.kind === c.kind)
        expect(f, JSON.stringify(report.findings)).toBeDefined()
        // qemu-img's one rule counts (a corruption that ends its walk); everything else is a warning
        expect(f!.severity).toBe(c.qemu === 1 ? 'corruption' : 'warning')
        expect(f!.hostOffset).toBe(c.at(bytes))
        expect(f!.message).toContain(path)
        expect(checkExitCode(report)).toBe(c.qemu)
        const r = await cli('check', path)
        expect(r.code).toBe(c.qemu)
        if (c.qemu === 0) {
          // qemu-img prints JSON only when the check completes: every member it prints, with its value
          const q = JSON.parse((await qemuImg(['check', '-f', 'vmdk', '--output', 'json', path])).stdout) as Record<string, unknown>
          const ours = JSON.parse((await cli('check', '--output', 'json', path)).out) as Record<string, unknown>
          for (const k of ['check-errors', 'corruptions', 'leaks', 'corruptions-fixed', 'leaks-fixed', 'total-clusters', 'allocated-clusters']) {
            expect(ours[k], k).toEqual(q[k])
          }
        }
      })
    }

    it('a flat extent that starts past the end of its file: exit 1 as qemu-img; one that ends past it: a notice, exit 0', async () => {
      const desc = readFileSync(join(FIXTURE_DIR, 'flat.vmdk'), 'utf8')
      writeFileSync(join(dir, 'flat-flat.vmdk'), fixture('flat-flat.vmdk'))
      const past = join(dir, 'flat-past.vmdk')
      writeFileSync(past, desc.replace(/ 0\n/, ' 4096\n'))
      expect((await qemuImg(['check', '-f', 'vmdk', past])).code).toBe(1)
      const a = await checkFile(past)
      expect(a.findings.map((f) => [f.kind, f.hostOffset])).toEqual([['extent-past-eof', 4096 * 512]])
      expect(checkExitCode(a)).toBe(1)
      const short = join(dir, 'flat-short.vmdk')
      writeFileSync(short, desc.replace(/ 0\n/, ' 8\n'))
      expect((await qemuImg(['check', '-f', 'vmdk', short])).code).toBe(0)
      const b = await checkFile(short)
      expect(b.findings).toEqual([])
      expect(b.notices?.map((n) => n.kind)).toEqual(['flat-extent-short'])
      expect(checkExitCode(b)).toBe(0)
    })

    it('a grain written past the tables with no entry (a crash before the table update): a notice, exit 0 as qemu-img', async () => {
      const b = fixture('sparse-data.vmdk')
      const path = join(dir, 'leak.vmdk')
      writeFileSync(path, Buffer.concat([b, Buffer.alloc(65536, 0x99)]))
      expect((await qemuImg(['check', '-f', 'vmdk', path])).code).toBe(0)
      const r = await checkFile(path)
      expect(r.findings).toEqual([])
      expect(r.notices?.map((n) => [n.kind, n.cluster])).toEqual([['leaked-grain', 1]])
    })
  },
  ['qemu-img'],
)
