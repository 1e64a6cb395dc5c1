/**
 * convert -l and measure -l: an internal qcow2 snapshot read as the source (the qcow2 format's read-only
 * snapshot view), against qemu-img 7.2 on the same images: guest bytes by qemu-img compare, qemu-img check
 * clean on what we wrote, measure's figures, and the refusals (missing snapshot, bad parameter, a format
 * without snapshots) with qemu-img's exit code and words, nothing created.
 */
import { existsSync } from 'node:fs'
import { join } from 'node:path'
import { describe, expect, it, vi } from 'vitest'
import { main } from '../../src/cli/main.js'
import { parseSnapshotParam } from '../../src/cli/common.js'
import { collector, describeQemu, makeTempDir, qemuImg, qemuImgOk, qemuIoOk, useTempDirs } from '../support/qemu.js'

async function cli(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = collector()
  const err = collector()
  const code = await main(['node', 'imgtool', ...args], { stdout: out, stderr: err, isTTY: false })
  return { code, stdout: out.text(), stderr: err.text() }
}

const firstLine = (s: string) =>
  s
    .trim()
    .split('\n')
    .filter((l) => !l.includes('warning:') && !l.startsWith('Please use'))[0]!
    .replace(/^(qemu-img|imgtool): /, '')

describe('-l parameter parsing', () => {
  it('a bare word is an id or a name; snapshot.id and snapshot.name; anything else refused', () => {
    expect(parseSnapshotParam('s1')).toEqual({ idOrName: 's1' })
    expect(parseSnapshotParam('snapshot.id=1,snapshot.name=a,,b')).toEqual({ id: '1', name: 'a,b' })
    expect(() => parseSnapshotParam('snapshot.foo=1')).toThrow(/Invalid parameter 'snapshot.foo'/)
  })
})

describeQemu('convert -l / measure -l against qemu-img', () => {
  useTempDirs()
  vi.setConfig({ testTimeout: 600_000 })

  /**
   * base.qcow2 <- top.qcow2; top has snapshots s1 (id 1), "2" (id 2) and s3 (id 3) taken at different
   * contents, then was grown from 4M to 8M (v3 only) and written again (the current state differs from every snapshot)
   */
  async function chain(dir: string, compat: '0.10' | '1.1'): Promise<string> {
    const base = join(dir, 'base.qcow2')
    await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', `compat=${compat}`, base, '4M'])
    await qemuIoOk(base, ['write -P 11 0 4M'])
    const top = join(dir, 'top.qcow2')
    await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', `compat=${compat}`, '-b', 'base.qcow2', '-F', 'qcow2', top])
    await qemuIoOk(top, ['write -P 1 0 1M', 'write -z 2M 64k'])
    await qemuImgOk(['snapshot', '-c', 's1', top])
    await qemuIoOk(top, ['write -P 2 512k 1M'])
    await qemuImgOk(['snapshot', '-c', '2', top])
    await qemuIoOk(top, ['write -P 3 3M 128k'])
    await qemuImgOk(['snapshot', '-c', 's3', top])
    // v2 images with snapshots cannot be resized (qemu-img refuses)
    if (compat === '1.1') await qemuImgOk(['resize', '-q', top, '8M'])
    await qemuIoOk(top, ['write -P 4 0 256k', `write -P 5 ${compat === '1.1' ? '6M' : '3M'} 1M`])
    return top
  }

  for (const compat of ['1.1', '0.10'] as const) {
    it(`compat=${compat}: every spelling of -l, to raw and qcow2, gives qemu-img's guest bytes`, async () => {
      const dir = makeTempDir('imgtool-snap-l-')
      const top = await chain(dir, compat)
      const params = ['s1', 'snapshot.name=s1', 'snapshot.id=1', '2', 'snapshot.name=2', 'snapshot.id=2', 's3', '3', 'snapshot.id=3,snapshot.name=s3']
      let n = 0
      for (const l of params) {
        for (const fmt of ['raw', 'qcow2'] as const) {
          const ours = join(dir, `i${n}.${fmt}`)
          const theirs = join(dir, `q${n++}.${fmt}`)
          const o = await cli('convert', '-l', l, '-O', fmt, top, ours)
          expect(o.code, `${l} ${fmt}: ${o.stderr}`).toBe(0)
          await qemuImgOk(['convert', '-l', l, '-O', fmt, top, theirs])
          const cmp = await qemuImg(['compare', '-s', '-f', fmt, '-F', fmt, ours, theirs])
          expect(cmp.code, `${l} ${fmt}: ${cmp.stdout}${cmp.stderr}`).toBe(0)
          if (fmt === 'qcow2') expect((await qemuImg(['check', ours])).code, l).toBe(0)
        }
      }
      // the snapshots differ from each other and from the current state: -l was not ignored
      expect((await qemuImg(['compare', '-f', 'raw', '-F', 'raw', join(dir, 'i0.raw'), join(dir, 'i6.raw')])).code).toBe(1)
      expect((await qemuImg(['compare', '-F', 'raw', top, join(dir, 'i12.raw')])).code).toBe(1)
      // measure -l: qemu-img's figures for each snapshot
      for (const l of ['s1', 'snapshot.id=2', 's3']) {
        for (const fmt of ['qcow2', 'raw']) {
          const o = await cli('measure', '--output=json', '-l', l, '-O', fmt, top)
          const q = await qemuImgOk(['measure', '--output=json', '-l', l, '-O', fmt, top])
          expect(o.code, o.stderr).toBe(0)
          expect(JSON.parse(o.stdout), `${l} ${fmt}`).toEqual(JSON.parse(q))
        }
      }
    })
  }

  it('the refusals: exit code and words as qemu-img, no target created', async () => {
    const dir = makeTempDir('imgtool-snap-refuse-')
    const top = await chain(dir, '1.1')
    const raw = join(dir, 'plain.raw')
    await qemuImgOk(['create', '-q', '-f', 'raw', raw, '1M'])
    const cases: Array<[string, string]> = [
      ['nope', top],
      ['snapshot.name=nope', top],
      ['snapshot.id=9', top],
      ['snapshot.id=3,snapshot.name=s1', top],
      ['snapshot.id=', top],
      ['snapshot.foo=1', top],
      ['snapshot.name=s1,foo', top],
      ['s1', raw],
    ]
    let n = 0
    for (const [l, src] of cases) {
      const ours = join(dir, `r${n}.raw`)
      const theirs = join(dir, `rq${n++}.raw`)
      const o = await cli('convert', '-l', l, '-O', 'raw', src, ours)
      const q = await qemuImg(['convert', '-l', l, '-O', 'raw', src, theirs])
      expect(o.code, l).toBe(q.code)
      expect(o.code, l).toBe(1)
      expect(firstLine(o.stderr).startsWith(firstLine(q.stderr)), `${l}: ${o.stderr} vs ${q.stderr}`).toBe(true)
      expect(existsSync(ours), l).toBe(existsSync(theirs))
      const om = await cli('measure', '-l', l, '-O', 'qcow2', src)
      const qm = await qemuImg(['measure', '-l', l, '-O', 'qcow2', src])
      expect(om.code, l).toBe(qm.code)
      expect(firstLine(om.stderr).startsWith(firstLine(qm.stderr)), `${l}: ${om.stderr} vs ${qm.stderr}`).toBe(true)
    }
    const o = await cli('measure', '-l', 's1', '--size', '1M', '-O', 'qcow2')
    const q = await qemuImg(['measure', '-l', 's1', '--size', '1M', '-O', 'qcow2'])
    expect(o.code).toBe(q.code)
    expect(firstLine(o.stderr)).toBe(firstLine(q.stderr))
  })
})
