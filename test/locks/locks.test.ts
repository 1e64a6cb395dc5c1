/**
 * Image locking (D6): imgtool takes and honours the OFD lock bytes QEMU uses,
 * so it neither writes an image a VM (here qemu-io) holds, nor lets QEMU open
 * one imgtool is writing; two imgtool writers exclude each other; readers share.
 */
import { copyFileSync, readFileSync } from 'node:fs'
import { createHash } from 'node:crypto'
import { join } from 'node:path'
import { afterEach, beforeAll, describe, expect, it } from 'vitest'
import { ImageLockedError, UsageError } from '../../src/errors.js'
import { openFileDevice } from '../../src/io/file-device.js'
import { LOCK_PERM_BASE, LOCK_SHARED_BASE, lockBytes, lockPerms, locksAvailable } from '../../src/io/lock.js'
import { openImage } from '../../src/open.js'
import type { DiskImage } from '../../src/image/disk-image.js'
import { cli } from '../support/cli.js'
import { describeQemu, makeTempDir, qemuImg, qemuImgOk, qemuIo, qemuIoOk, useTempDirs } from '../support/qemu.js'
import { QemuIoHolder, imgtool, lockedBytes } from './support.js'
import * as api from '../../src/index.js'

useTempDirs()

const sha = (p: string): string => createHash('sha256').update(readFileSync(p)).digest('hex')

describe('lock bytes', () => {
  it('are those qemu-img 7.2 takes on a qcow2 file', () => {
    expect(LOCK_PERM_BASE).toBe(100)
    expect(LOCK_SHARED_BASE).toBe(200)
    // reader: consistent read held; write and resize not shared
    expect(lockBytes(lockPerms('reader'))).toEqual([100, 201, 203])
    // writer: consistent read, write, resize held; write and resize not shared
    expect(lockBytes(lockPerms('writer'))).toEqual([100, 101, 103, 201, 203])
  })

  it('need the native addon (this build has it)', () => {
    expect(locksAvailable()).toBe(true)
  })
})

describeQemu('image locks against QEMU', () => {
  let dir: string
  let img: string
  const holders: QemuIoHolder[] = []
  const opened: DiskImage[] = []

  beforeAll(() => {
    dir = makeTempDir('imgtool-locks-')
  })

  afterEach(async () => {
    for (const h of holders.splice(0)) await h.stop()
    for (const i of opened.splice(0)) await i.close()
  })

  async function fresh(name: string): Promise<string> {
    const p = join(dir, name)
    await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', p, '16M'])
    await qemuIoOk(p, ['write -P 1 0 64k'], { format: 'qcow2' })
    return p
  }

  async function hold(image: string, readOnly = false): Promise<QemuIoHolder> {
    const h = await QemuIoHolder.start(image, { readOnly })
    holders.push(h)
    return h
  }

  it('imgtool holds the same bytes as qemu-io, read-only and read-write', async () => {
    img = await fresh('same.qcow2')
    const ro = await hold(img, true)
    const qemuRo = lockedBytes(img)
    await ro.stop()
    const rw = await hold(img)
    const qemuRw = lockedBytes(img)
    await rw.stop()
    expect(lockedBytes(img)).toEqual([])

    const r = await openImage(img, { readOnly: true })
    const imgRo = lockedBytes(img)
    await r.close()
    const w = await openImage(img, { readOnly: false })
    const imgRw = lockedBytes(img)
    await w.close()
    expect(lockedBytes(img), 'every lock is gone after close').toEqual([])

    expect(qemuRo).toEqual([100, 201, 203])
    expect(qemuRw).toEqual([100, 101, 103, 201, 203])
    expect(imgRo).toEqual(qemuRo)
    expect(imgRw).toEqual(qemuRw)
  })

  describe('qemu-io holds the image read-write', () => {
    const writers: Array<[string, (p: string, other: string) => string[]]> = [
      ['snapshot -c', (p) => ['snapshot', '-c', 'during', p]],
      ['resize', (p) => ['resize', p, '32M']],
      ['repair', (p) => ['repair', p]],
      ['check -r all', (p) => ['check', '-r', 'all', p]],
      ['convert onto it', (p, other) => ['convert', '-O', 'qcow2', other, p]],
      ['create over it', (p) => ['create', '-f', 'qcow2', p, '1M']],
    ]
    for (const [name, args] of writers) {
      it(`refuses ${name} with qemu-img's lock message, leaving the image unchanged`, async () => {
        const p = await fresh(`w-${name.replace(/\W+/g, '-')}.qcow2`)
        const other = await fresh(`src-${name.replace(/\W+/g, '-')}.qcow2`)
        const h = await hold(p)
        h.send('write -P 2 1M 64k')
        h.send('flush')
        // the write has happened once qemu-io answers a later command; the lock is what matters here
        await new Promise((r) => setTimeout(r, 300))
        const before = sha(p)
        const r = await cli(...args(p, other))
        expect(r.code, r.stderr).toBe(1)
        expect(r.stderr).toContain('Failed to get "write" lock')
        expect(r.stderr).toContain(`Is another process using the image [${p}]?`)
        expect(r.stderr.trim().split('\n')).toHaveLength(1)
        expect(sha(p), 'image bytes unchanged').toBe(before)
        await h.stop()
        const chk = await qemuImg(['check', p])
        expect(chk.code, chk.stdout + chk.stderr).toBe(0)
      })
    }

    const readers: Array<[string, (p: string) => string[]]> = [
      ['info', (p) => ['info', p]],
      ['check', (p) => ['check', p]],
      ['map', (p) => ['map', p]],
      ['cat', (p) => ['cat', '--length', '4096', p]],
      ['compare', (p) => ['compare', p, p]],
      ['snapshot -l', (p) => ['snapshot', '-l', p]],
    ]
    for (const [name, args] of readers) {
      it(`refuses ${name} without -U ("shared write" lock) and allows it with -U`, async () => {
        const p = await fresh(`r-${name.replace(/\W+/g, '-')}.qcow2`)
        await hold(p)
        const r = await cli(...args(p))
        expect(r.code, r.stderr).toBe(name === 'compare' ? 2 : 1)
        expect(r.stderr).toContain('Failed to get shared "write" lock')
        expect(r.stderr).toContain(p)
        const u = await cli(...args(p).slice(0, 1), '-U', ...args(p).slice(1))
        expect(u.stderr).toBe('')
        expect(u.code).toBe(0)
      })
    }

    it('the public API refuses the held image with ImageLockedError, and reads it with forceShare', async () => {
      const p = await fresh('api.qcow2')
      await hold(p)
      const err = await api.openImage(p).catch((e: unknown) => e)
      expect(err).toBeInstanceOf(api.ImageLockedError)
      expect((err as api.ImgtoolError).code).toBe('LOCKED')
      const img = await api.openImage(p, { forceShare: true })
      await img.close()
      await expect(api.openImage(p, { readOnly: false, forceShare: true })).rejects.toBeInstanceOf(api.UsageError)
    })

    it('convert -U reads the held image as a source', async () => {
      const p = await fresh('conv-src.qcow2')
      await hold(p)
      const out = join(dir, 'conv-out.raw')
      const r = await cli('convert', '-O', 'raw', p, out)
      expect(r.code).toBe(1)
      expect(r.stderr).toContain('Failed to get shared "write" lock')
      const u = await cli('convert', '-U', '-O', 'raw', p, out)
      expect(u.stderr).toBe('')
      expect(u.code).toBe(0)
    })

    it('refuses -U on writable opens, as qemu-img does', async () => {
      const p = await fresh('u-rw.qcow2')
      const before = sha(p)
      const r = await cli('check', '-U', '-r', 'all', p)
      expect(r.code).toBe(1)
      expect(r.stderr).toContain('force-share=on can only be used with read-only images')
      const s = await cli('snapshot', '-U', '-c', 'x', p)
      expect(s.code).toBe(1)
      expect(s.stderr).toContain('force-share=on can only be used with read-only images')
      expect(sha(p)).toBe(before)
      await expect(openFileDevice(p, { readOnly: false, forceShare: true })).rejects.toBeInstanceOf(UsageError)
    })
  })

  describe('imgtool holds the image', () => {
    it('for writing: qemu-img info and qemu-io are refused', async () => {
      const p = await fresh('held-rw.qcow2')
      opened.push(await openImage(p, { readOnly: false }))
      const info = await qemuImg(['info', p])
      expect(info.code).toBe(1)
      expect(info.stderr).toContain('Failed to get shared "write" lock')
      const io = await qemuIo(['-f', 'qcow2', '-c', 'read 0 512', p])
      expect(io.stderr + io.stdout).toContain('Failed to get "write" lock')
      const ior = await qemuIo(['-r', '-f', 'qcow2', '-c', 'read 0 512', p])
      expect(ior.stderr + ior.stdout).toContain('Failed to get shared "write" lock')
      // qemu-img -U still reads it
      expect((await qemuImg(['info', '-U', p])).code).toBe(0)
    })

    it('for writing: a second imgtool writer (another process) is refused', async () => {
      const p = await fresh('two-writers.qcow2')
      opened.push(await openImage(p, { readOnly: false }))
      const before = sha(p)
      for (const args of [
        ['snapshot', '-c', 'x', p],
        ['repair', p],
        ['resize', p, '20M'],
      ]) {
        const r = await imgtool(args)
        expect(r.code, r.stderr).toBe(1)
        expect(r.stderr).toContain('Failed to get "write" lock')
      }
      const ro = await imgtool(['info', p])
      expect(ro.code).toBe(1)
      expect(ro.stderr).toContain('Failed to get shared "write" lock')
      expect(sha(p)).toBe(before)
    })

    it('two concurrent imgtool snapshot -c never lose a snapshot nor corrupt the image (D6)', async () => {
      for (let trial = 0; trial < 4; trial++) {
        const p = await fresh(`race-${trial}.qcow2`)
        const [a, b] = await Promise.all([imgtool(['snapshot', '-c', 'a', p]), imgtool(['snapshot', '-c', 'b', p])])
        const list = await qemuImgOk(['snapshot', '-l', p])
        for (const [name, r] of [
          ['a', a],
          ['b', b],
        ] as const) {
          if (r.code === 0) expect(list, `snapshot ${name} reported made (trial ${trial})`).toMatch(new RegExp(`\\s${name}\\s`))
          else {
            expect(r.code).toBe(1)
            expect(r.stderr).toContain('Failed to get "write" lock')
          }
        }
        expect(a.code === 0 || b.code === 0, 'one of them ran').toBe(true)
        const chk = await qemuImg(['check', p])
        expect(chk.code, chk.stdout + chk.stderr).toBe(0)
      }
    })

    it('for writing: a second writer in the same process is refused too', async () => {
      const p = await fresh('two-writers-inproc.qcow2')
      opened.push(await openImage(p, { readOnly: false }))
      await expect(openImage(p, { readOnly: false })).rejects.toBeInstanceOf(ImageLockedError)
      await expect(openImage(p, { readOnly: true })).rejects.toThrow(/Failed to get shared "write" lock/)
    })

    it('read-only: shares with qemu-img info, qemu-io -r and other imgtool readers', async () => {
      const p = await fresh('readers.qcow2')
      opened.push(await openImage(p, { readOnly: true }))
      opened.push(await openImage(p, { readOnly: true }))
      expect((await qemuImg(['info', p])).code).toBe(0)
      expect((await qemuImg(['check', p])).code).toBe(0)
      await qemuIoOk(p, ['read -P 1 0 64k'], { format: 'qcow2', extraArgs: ['-r'] })
      const r = await imgtool(['check', p])
      expect(r.code, r.stderr).toBe(0)
      // but not with a writer
      const w = await qemuIo(['-f', 'qcow2', '-c', 'write 0 512', p])
      expect(w.stderr + w.stdout).toContain('Failed to get "write" lock')
      expect((await cli('snapshot', '-c', 'x', p)).stderr).toContain('Failed to get "write" lock')
    })

    it('read-only by qemu-io: imgtool readers share it, writers are refused', async () => {
      const p = await fresh('qemu-reader.qcow2')
      await hold(p, true)
      expect((await cli('check', p)).code).toBe(0)
      expect((await cli('info', p)).code).toBe(0)
      const w = await cli('snapshot', '-c', 'x', p)
      expect(w.code).toBe(1)
      expect(w.stderr).toContain('Failed to get "write" lock')
    })

    it('releases every lock when the image is closed, and after a refused open', async () => {
      const p = await fresh('release.qcow2')
      const back = join(dir, 'release-top.qcow2')
      copyFileSync(p, join(dir, 'release-copy.qcow2'))
      await qemuImgOk(['create', '-q', '-f', 'qcow2', '-b', p, '-F', 'qcow2', back])
      const top = await openImage(back, { readOnly: false })
      // the backing file is held as a reader, the top as a writer
      expect(lockedBytes(p)).toEqual([100, 201, 203])
      expect(lockedBytes(back)).toEqual([100, 101, 103, 201, 203])
      await expect(openImage(p, { readOnly: false })).rejects.toBeInstanceOf(ImageLockedError)
      await top.close()
      expect(lockedBytes(p)).toEqual([])
      expect(lockedBytes(back)).toEqual([])
    })
  })
})
