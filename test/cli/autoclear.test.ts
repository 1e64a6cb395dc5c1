/**
 * Unknown autoclear feature bits (Q2): the qcow2 spec lets a program write to
 * an image with autoclear bits it does not know only after clearing them.
 * qemu-img clears them whenever it opens an image read/write; imgtool must
 * leave the same header as qemu-img after the same command on the same image.
 */
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { beforeAll, expect, it } from 'vitest'
import { cli } from '../support/cli.js'
import { describeQemu, makeTempDir, qemuImg, qemuImgOk, useTempDirs } from '../support/qemu.js'

useTempDirs()

const autoclear = (file: string): bigint => readFileSync(file).readBigUInt64BE(88)

describeQemu(
  'unknown autoclear bits are cleared before imgtool writes, as qemu-img clears them',
  () => {
    let dir = ''
    let n = 0
    beforeAll(() => {
      dir = makeTempDir('imgtool-autoclear-')
    })

    /** two copies of a fresh image with autoclear bit 63 (and the known bitmaps bit 0 clear) */
    async function pair(): Promise<{ mine: string; theirs: string }> {
      const mine = join(dir, `i${++n}.qcow2`)
      const theirs = join(dir, `q${n}.qcow2`)
      await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', mine, '4M'])
      const b = readFileSync(mine)
      b.writeBigUInt64BE(1n << 63n, 88)
      writeFileSync(mine, b)
      copyFileSync(mine, theirs)
      return { mine, theirs }
    }

    const cases: Array<[string, string[], string[]]> = [
      ['check -r leaks', ['check', '-r', 'leaks', '--no-journal'], ['check', '-r', 'leaks']],
      ['check -r all', ['check', '-r', 'all', '--no-journal'], ['check', '-r', 'all']],
      ['repair', ['repair', '--no-journal'], ['check', '-r', 'all']],
      ['snapshot -c', ['snapshot', '-c', 's1'], ['snapshot', '-c', 's1']],
      ['resize', ['resize', '%', '+1M'], ['resize', '%', '+1M']],
      ['check (read-only: left set)', ['check'], ['check']],
      ['repair --dry-run (read-only: left set)', ['repair', '--dry-run'], ['check']],
    ]
    for (const [name, mineArgs, theirArgs] of cases) {
      it(`${name}: the autoclear field afterwards is qemu-img's`, async () => {
        const { mine, theirs } = await pair()
        const withFile = (args: string[], f: string) => (args.includes('%') ? args.map((a) => (a === '%' ? f : a)) : [...args, f])
        const q = await qemuImg(withFile(theirArgs, theirs))
        expect(q.code, q.stderr).toBe(0)
        const r = await cli(...withFile(mineArgs, mine))
        expect(r.code, r.stderr).toBe(0)
        expect(autoclear(mine).toString(16)).toBe(autoclear(theirs).toString(16))
        expect((await qemuImg(['check', mine])).code).toBe(0)
      })
    }

    it('the known bits stay: bitmaps (bit 0) kept while bit 63 is cleared', async () => {
      const mine = join(dir, 'bm.qcow2')
      const theirs = join(dir, 'bm-q.qcow2')
      await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', mine, '4M'])
      await qemuImgOk(['bitmap', '--add', mine, 'b0'])
      const b = readFileSync(mine)
      b.writeBigUInt64BE(b.readBigUInt64BE(88) | (1n << 63n), 88)
      writeFileSync(mine, b)
      copyFileSync(mine, theirs)
      await qemuImgOk(['resize', theirs, '+1M'])
      const r = await cli('resize', mine, '+1M')
      expect(r.code, r.stderr).toBe(0)
      expect(autoclear(mine)).toBe(1n)
      expect(autoclear(mine)).toBe(autoclear(theirs))
    })
  },
  ['qemu-img'],
)
