/**
 * rebase -c (qemu-img 8.2's: the clusters copied in are written compressed). qemu-img 7.2 has no rebase -c,
 * so the truth is its plain rebase on the same files: the same guest bytes over the new backing file,
 * qemu-img check clean, the clusters qemu-img allocates, each copied one compressed (check's counts).
 * -c with -u is accepted and changes nothing (qemu-img 8.2).
 */
import { copyFileSync, readFileSync } from 'node:fs'
import { join } from 'node:path'
import { expect, it, vi } from 'vitest'
import { main } from '../../src/cli/main.js'
import { collector, describeQemu, makeTempDir, qemuImg, qemuImgOk, qemuIoOk, useTempDirs } from '../support/qemu.js'

async function cli(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = collector()
  const err = collector()
  const code = await main(['node', 'imgtool', ...args], { stdout: out, stderr: err, isTTY: false })
  return { code, stdout: out.text(), stderr: err.text() }
}

/** qemu-img check's clean verdict, and its allocated and compressed cluster counts */
async function counts(path: string): Promise<{ allocated: number; compressed: number }> {
  const r = await qemuImg(['check', path])
  expect(r.code, r.stdout + r.stderr).toBe(0)
  const m = /(\d+)\/\d+ = [\d.]+% allocated, [\d.]+% fragmented, ([\d.]+)% compressed clusters/.exec(r.stdout)
  expect(m, r.stdout).not.toBeNull()
  const allocated = Number(m![1])
  return { allocated, compressed: Math.round((allocated * Number(m![2])) / 100) }
}

describeQemu('rebase -c', () => {
  useTempDirs()
  vi.setConfig({ testTimeout: 600_000 })

  for (const cluster of ['65536', '4096']) {
    it(`cluster_size=${cluster}: the guest bytes of qemu-img's rebase, the copied clusters compressed, check clean`, async () => {
      const mk = async (dir: string) => {
        const c = ['-o', `cluster_size=${cluster}`]
        await qemuImgOk(['create', '-q', '-f', 'qcow2', ...c, join(dir, 'base1.qcow2'), '1M'])
        await qemuIoOk(join(dir, 'base1.qcow2'), ['write -P 1 0 512k', 'write -P 5 800k 64k'])
        await qemuImgOk(['create', '-q', '-f', 'qcow2', ...c, join(dir, 'base2.qcow2'), '1M'])
        await qemuIoOk(join(dir, 'base2.qcow2'), ['write -P 2 128k 256k'])
        await qemuImgOk(['create', '-q', '-f', 'qcow2', ...c, '-b', 'base1.qcow2', '-F', 'qcow2', join(dir, 'img.qcow2')])
        await qemuIoOk(join(dir, 'img.qcow2'), ['write -P 3 256k 64k', 'write -P 4 40k 2k'])
      }
      const ours = makeTempDir('imgtool-rebase-c-')
      const theirs = makeTempDir('imgtool-rebase-c-q-')
      await mk(ours)
      for (const n of ['base1.qcow2', 'base2.qcow2', 'img.qcow2']) copyFileSync(join(ours, n), join(theirs, n))
      const ownBefore = (await counts(join(ours, 'img.qcow2'))).allocated
      const before = join(ours, 'before.raw')
      await qemuImgOk(['convert', '-O', 'raw', join(ours, 'img.qcow2'), before])
      const o = await cli('rebase', '-c', '-b', 'base2.qcow2', '-F', 'qcow2', join(ours, 'img.qcow2'))
      expect(o.code, o.stderr).toBe(0)
      await qemuImgOk(['rebase', '-b', 'base2.qcow2', '-F', 'qcow2', join(theirs, 'img.qcow2')])
      expect((await qemuImg(['compare', join(ours, 'img.qcow2'), join(theirs, 'img.qcow2')])).code).toBe(0)
      expect((await qemuImg(['compare', '-F', 'raw', join(ours, 'img.qcow2'), before])).code).toBe(0)
      const ourCheck = await counts(join(ours, 'img.qcow2'))
      const theirCheck = await counts(join(theirs, 'img.qcow2'))
      // the same clusters allocated as qemu-img's rebase; every one copied in is compressed (pattern data shrinks)
      expect(ourCheck.allocated).toBe(theirCheck.allocated)
      expect(ownBefore).toBeGreaterThan(0)
      expect(ourCheck.compressed).toBe(theirCheck.allocated - ownBefore)
      expect(ourCheck.compressed).toBeGreaterThan(0)
    })
  }

  it('-c with -u: as qemu-img 8.2, accepted and the same as -u (nothing is copied); header as qemu-img -u writes it', async () => {
    const dir = makeTempDir('imgtool-rebase-cu-')
    await qemuImgOk(['create', '-q', '-f', 'qcow2', join(dir, 'b.qcow2'), '1M'])
    await qemuIoOk(join(dir, 'b.qcow2'), ['write -P 3 0 64k'])
    for (const n of ['i', 'q']) await qemuImgOk(['create', '-q', '-f', 'qcow2', '-b', 'b.qcow2', '-F', 'qcow2', join(dir, `${n}.qcow2`)])
    const o = await cli('rebase', '-c', '-u', '-b', '', join(dir, 'i.qcow2'))
    // qemu-img 7.2 has no -c; 8.2's -c only sets the write flags of the copy, which -u skips
    const q = await qemuImg(['rebase', '-u', '-b', '', join(dir, 'q.qcow2')])
    expect(o.code, o.stderr).toBe(q.code)
    expect(o.code).toBe(0)
    expect(o.stdout).toBe(q.stdout)
    const info = async (n: string) => (await qemuImgOk(['info', '--output=json', join(dir, `${n}.qcow2`)])).replace(/"filename": "[^"]*"/, '')
    expect(await info('i')).toBe(await info('q'))
    expect(readFileSync(join(dir, 'i.qcow2')).equals(readFileSync(join(dir, 'q.qcow2')))).toBe(true)
  })
})
