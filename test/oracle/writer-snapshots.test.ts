/** Snapshots we create list and apply in qemu-img snapshot; resized images pass qemu-img check. */
import { copyFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { expect, it } from 'vitest'
import { openFileDevice } from '../../src/io/file-device.js'
import { makeContext, openImage } from '../../src/open.js'
import { createQcow2 } from '../../src/formats/qcow2/ops/create.js'
import type { Qcow2Image } from '../../src/formats/qcow2/image.js'
import { applySnapshot, createSnapshot, deleteSnapshot } from '../../src/formats/qcow2/ops/snapshot-ops.js'
import { resizeQcow2 } from '../../src/formats/qcow2/ops/resize.js'
import { Prng } from '../support/prng.js'
import { describeQemu, makeTempDir, qemuImg, qemuImgOk, useTempDirs } from '../support/qemu.js'

useTempDirs()

async function check(path: string): Promise<void> {
  const r = await qemuImg(['check', '--output=json', path])
  const j = JSON.parse(r.stdout || '{}') as Record<string, number>
  expect({ code: r.code, c: j['corruptions'] ?? 0, l: j['leaks'] ?? 0 }, r.stdout + r.stderr).toEqual({ code: 0, c: 0, l: 0 })
}

async function same(path: string, bytes: Uint8Array, dir: string): Promise<void> {
  const raw = join(dir, 'want.raw')
  writeFileSync(raw, bytes)
  const r = await qemuImg(['compare', '-f', 'qcow2', '-F', 'raw', path, raw])
  expect(r.code, r.stdout + r.stderr).toBe(0)
}

describeQemu('writer snapshots and resize with qemu-img', () => {
  for (const opts of [
    { cluster_size: '4096' },
    { compat: '0.10', cluster_size: '1024' },
    { cluster_size: '65536', extended_l2: 'on' },
    { cluster_size: '2048', refcount_bits: '8', lazy_refcounts: 'on' },
  ] as Array<Record<string, string>>) {
    it(`qemu-img snapshot lists and applies our snapshots; we apply and delete qemu's (${JSON.stringify(opts)})`, async () => {
      const dir = makeTempDir('imgtool-snap-')
      const path = join(dir, 's.qcow2')
      const size = 2 * 1024 * 1024
      const dev = await openFileDevice(path, { readOnly: false, create: true })
      await createQcow2(dev, makeContext(openFileDevice), { size, options: opts })
      await dev.close()
      const rng = new Prng(11)
      const v0 = new Uint8Array(size)
      let img = (await openImage(path, { readOnly: false })) as Qcow2Image
      for (let i = 0; i < 8; i++) {
        const off = rng.int(size - 100_000)
        const d = rng.bytes(1 + rng.int(100_000))
        await img.write(off, d)
        v0.set(d, off)
      }
      await createSnapshot(img, 'ours-1')
      const v1 = v0.slice()
      await img.write(10_000, new Uint8Array(200_000).fill(0x42))
      v1.fill(0x42, 10_000, 210_000)
      await img.close()
      await check(path)
      const list = await qemuImgOk(['snapshot', '-l', path])
      expect(list).toMatch(/ours-1/)
      await same(path, v1, dir)
      // qemu applies our snapshot
      await qemuImgOk(['snapshot', '-a', 'ours-1', path])
      await check(path)
      await same(path, v0, dir)
      // qemu makes one, we apply it after more writes, then delete both
      await qemuImgOk(['snapshot', '-c', 'theirs', path])
      img = (await openImage(path, { readOnly: false })) as Qcow2Image
      await img.write(0, new Uint8Array(70_000).fill(7))
      await applySnapshot(img, 'theirs')
      await deleteSnapshot(img, 'ours-1')
      await img.close()
      await check(path)
      await same(path, v0, dir)
      expect(await qemuImgOk(['snapshot', '-l', path])).not.toMatch(/ours-1/)
      img = (await openImage(path, { readOnly: false })) as Qcow2Image
      await deleteSnapshot(img, 'theirs')
      await img.close()
      await check(path)
      // an external data file: no internal snapshots, as in QEMU
      const dpath = join(dir, 'd.qcow2')
      const ddev = await openFileDevice(dpath, { readOnly: false, create: true })
      await createQcow2(ddev, makeContext(openFileDevice), { size: 1024 * 1024, options: { data_file: 'd.raw' } })
      await ddev.close()
      const dimg = (await openImage(dpath, { readOnly: false })) as Qcow2Image
      await expect(createSnapshot(dimg, 'x')).rejects.toThrow(/external data file/)
      await dimg.close()
      // resize with a snapshot present (QEMU allows it): grow past the L1 table, qemu reads it
      const v3 = opts['compat'] !== '0.10'
      img = (await openImage(path, { readOnly: false })) as Qcow2Image
      await createSnapshot(img, 'before-resize')
      if (!v3) {
        await expect(resizeQcow2(img, 64 * 1024 * 1024)).rejects.toThrow(/v2 image which has snapshots/)
        img = (await openImage(path, { readOnly: false })) as Qcow2Image
        await deleteSnapshot(img, 'before-resize')
      }
      await img.close()
      img = (await openImage(path, { readOnly: false })) as Qcow2Image
      await resizeQcow2(img, 64 * 1024 * 1024)
      img = (await openImage(path, { readOnly: false })) as Qcow2Image
      await img.write(64 * 1024 * 1024 - 5000, new Uint8Array(5000).fill(5))
      await img.close()
      await check(path)
      const big = new Uint8Array(64 * 1024 * 1024)
      big.set(v0)
      big.fill(5, big.byteLength - 5000)
      await same(path, big, dir)
      const info = JSON.parse(await qemuImgOk(['info', '--output=json', path])) as { 'virtual-size': number }
      expect(info['virtual-size']).toBe(64 * 1024 * 1024)
      if (v3) {
        // qemu applies the snapshot taken before the resize
        await qemuImgOk(['snapshot', '-a', 'before-resize', path])
        await check(path)
      }
    })
  }
})

describeQemu('snapshot apply with another disk size, against qemu-img snapshot -a', () => {
  for (const opts of [
    { cluster_size: '4096' },
    { cluster_size: '65536', extended_l2: 'on' },
    { cluster_size: '1024', refcount_bits: '4', lazy_refcounts: 'on' },
  ] as Array<Record<string, string>>) {
    it(`we and qemu-img give the same guest bytes and virtual size (${JSON.stringify(opts)})`, async () => {
      const dir = makeTempDir('imgtool-snapsize-')
      const path = join(dir, 'ours.qcow2')
      const theirs = join(dir, 'theirs.qcow2')
      const small = 3 * 1024 * 1024 + 512
      const big = 200 * 1024 * 1024
      const dev = await openFileDevice(path, { readOnly: false, create: true })
      await createQcow2(dev, makeContext(openFileDevice), { size: small, options: opts })
      await dev.close()
      let img = (await openImage(path, { readOnly: false })) as Qcow2Image
      const vSmall = new Uint8Array(small)
      vSmall.fill(1, 5000, 900_000)
      vSmall.fill(6, small - 20_000)
      await img.write(5000, vSmall.subarray(5000, 900_000))
      await img.write(small - 20_000, vSmall.subarray(small - 20_000))
      await createSnapshot(img, 'small')
      await resizeQcow2(img, big)
      img = (await openImage(path, { readOnly: false })) as Qcow2Image
      await img.write(big - 300_000, new Uint8Array(250_000).fill(2))
      await img.write(100_000, new Uint8Array(4000).fill(3))
      await createSnapshot(img, 'big')
      const vBig = new Uint8Array(big)
      vBig.set(vSmall)
      vBig.fill(2, big - 300_000, big - 50_000)
      vBig.fill(3, 100_000, 104_000)
      await img.write(0, new Uint8Array(8000).fill(4)) // after the snapshot: goes with the apply
      await img.close()
      await check(path)

      const info = async (p: string) => (JSON.parse(await qemuImgOk(['info', '--output=json', p])) as { 'virtual-size': number })['virtual-size']
      for (const [name, want] of [
        ['small', vSmall],
        ['big', vBig],
        ['small', vSmall],
      ] as const) {
        copyFileSync(path, theirs)
        await qemuImgOk(['snapshot', '-a', name, theirs])
        img = (await openImage(path, { readOnly: false })) as Qcow2Image
        await applySnapshot(img, name)
        expect(img.virtualSize).toBe(want.byteLength)
        await img.close()
        await check(path)
        await check(theirs)
        expect(await info(path)).toBe(await info(theirs))
        expect(await info(path)).toBe(want.byteLength)
        await same(path, want, dir)
        await same(theirs, want, dir)
        const cmp = await qemuImg(['compare', '-s', path, theirs])
        expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0)
      }
      // qemu keeps writing to the image we resized by applying
      await qemuImgOk(['snapshot', '-a', 'big', path])
      await check(path)
      await same(path, vBig, dir)
    })
  }
})

describeQemu('imgtool snapshot -l prints what qemu-img snapshot -l prints', () => {
  it('on qemu-made snapshots and on ours (icount 0, as qemu-img snapshot -c writes it)', async () => {
    const { execFileSync } = await import('node:child_process')
    const { resolve } = await import('node:path')
    const bin = resolve(__dirname, '..', '..', 'bin', 'imgtool')
    const fixtures = resolve(__dirname, '..', '..', 'images', 'qcow2')
    const dir = makeTempDir('imgtool-snaplist-')
    const ours = join(dir, 'ours.qcow2')
    await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', ours, '1M'])
    execFileSync(process.execPath, [bin, 'snapshot', '-c', 'first', ours])
    for (const path of [join(fixtures, 'v3-snapshot.qcow2'), join(fixtures, 'v2-snapshot.qcow2'), ours]) {
      const want = await qemuImgOk(['snapshot', '-l', path])
      expect(execFileSync(process.execPath, [bin, 'snapshot', '-l', path], { encoding: 'utf8' }), path).toBe(want)
    }
  })
})
