/**
 * Human `imgtool info` is qemu-img info's text, byte for byte, on every qcow2
 * fixture in images/ and on vpc images (dynamic and fixed) made by qemu-img,
 * so `grep '^backing file:'` and `awk '/virtual size/ {print $3}'` give the
 * same answers with either tool.
 *
 * Deliberate differences (also in README.md, "info"), not compared here:
 * - a fixed VHD opened without -f: qemu-img probes it as raw (it does not
 *   look for the footer), imgtool as vpc; with -f vpc both print the same.
 * - control characters in names are printed as \xNN by imgtool (qemu-img
 *   writes them raw to the terminal).
 */
import { readdirSync } from 'node:fs'
import { join } from 'node:path'
import { expect, it } from 'vitest'
import { cli, FIXTURES } from '../support/cli.js'
import { describeQemu, makeTempDir, qemuImg, qemuImgOk, qemuIoOk, useTempDirs } from '../support/qemu.js'

useTempDirs()

async function expectSameInfo(args: string[]): Promise<string> {
  // qemu-img runs in the fixtures' folder: it opens a data file named relative to the image from its cwd
  const [ours, theirs] = await Promise.all([cli('info', ...args), qemuImg(['info', ...args], { cwd: FIXTURES })])
  expect(theirs.code, theirs.stderr).toBe(0)
  expect(ours.code, ours.stderr).toBe(0)
  expect(ours.stdout, `info ${args.join(' ')}`).toBe(theirs.stdout)
  return ours.stdout
}

describeQemu(
  "human info is qemu-img info's",
  () => {
    it('on every qcow2 fixture in images/ (snapshots, bitmaps, data files, backing files, dirty, extended L2)', async () => {
      const names = readdirSync(FIXTURES).filter((n) => n.endsWith('.qcow2'))
      expect(names.length).toBeGreaterThan(40)
      for (const name of names) await expectSameInfo([join(FIXTURES, name)])
      await expectSameInfo(['--backing-chain', join(FIXTURES, 'chain-top.qcow2')])
      await expectSameInfo(['--backing-chain', join(FIXTURES, 'chain-raw-top.qcow2')])
    }, 300_000)

    it('on vpc images (dynamic, fixed with -f vpc), raw, a missing backing file and a long snapshot name', async () => {
      const dir = makeTempDir()
      const dyn = join(dir, 'dyn.vhd')
      const fixed = join(dir, 'fixed.vhd')
      await qemuImgOk(['create', '-q', '-f', 'vpc', dyn, '10M'])
      await qemuIoOk(dyn, ['write -P 1 0 64k'], { format: 'vpc' })
      await qemuImgOk(['create', '-q', '-f', 'vpc', '-o', 'subformat=fixed', fixed, '3M'])
      await expectSameInfo([dyn])
      await expectSameInfo(['-f', 'vpc', dyn])
      await expectSameInfo(['-f', 'vpc', fixed])
      const raw = join(dir, 'disk.raw')
      await qemuImgOk(['create', '-q', '-f', 'raw', raw, '1000000'])
      await expectSameInfo([raw])
      const orphan = join(dir, 'orphan.qcow2')
      await qemuImgOk(['create', '-q', '-f', 'qcow2', '-u', '-b', 'gone.qcow2', '-F', 'qcow2', orphan, '1M'])
      await expectSameInfo([orphan])
      const snap = join(dir, 'snap.qcow2')
      await qemuImgOk(['create', '-q', '-f', 'qcow2', snap, '5M'])
      await qemuImgOk(['snapshot', '-c', 'a snapshot name longer than sixteen', snap])
      await qemuImgOk(['snapshot', '-c', 'x', snap])
      const text = await expectSameInfo([snap])
      expect(text).toMatch(/^Snapshot list:\nID {8}TAG/m)
    }, 300_000)

    it('answers grep and awk as qemu-img does', async () => {
      const file = join(FIXTURES, 'chain-top.qcow2')
      const text = await expectSameInfo([file])
      expect(text.split('\n').filter((l) => l.startsWith('backing file:'))).toEqual([
        'backing file: chain-mid.qcow2 (actual path: ' + join(FIXTURES, 'chain-mid.qcow2') + ')',
      ])
      const awk = text
        .split('\n')
        .filter((l) => /virtual size/.test(l))
        .map((l) => l.split(/\s+/)[2])
      expect(awk).toEqual(['2'])
    })
  },
  ['qemu-img', 'qemu-io'],
)
