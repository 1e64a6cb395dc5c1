/**
 * D10: a backing file or data file that is a FIFO made every command hang in
 * open(2). Files are now opened O_NONBLOCK and anything but a regular file or
 * a block device is refused with one line naming it.
 */
import { execFileSync } from 'node:child_process'
import { rmSync } from 'node:fs'
import { join } from 'node:path'
import { beforeAll, expect, it } from 'vitest'
import { openFileDevice } from '../../src/io/file-device.js'
import { describeQemu, makeTempDir, qemuImgOk, useTempDirs } from '../support/qemu.js'
import { imgtool } from './support.js'

useTempDirs()

describeQemu(
  'FIFOs as backing or data files (D10)',
  () => {
    let dir: string
    let backingImg: string
    let dataImg: string

    beforeAll(async () => {
      dir = makeTempDir('imgtool-fifo-')
      execFileSync('mkfifo', [join(dir, 'fifo')])
      backingImg = join(dir, 'fb.qcow2')
      await qemuImgOk(['create', '-q', '-f', 'qcow2', '-u', '-b', 'fifo', '-F', 'raw', backingImg, '1M'])
      dataImg = join(dir, 'fd.qcow2')
      await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', 'data_file=data.raw', 'fd.qcow2', '1M'], { cwd: dir })
      rmSync(join(dir, 'data.raw'))
      execFileSync('mkfifo', [join(dir, 'data.raw')])
    })

    it('info shows the image at once without opening the FIFO, as qemu-img info (which opens no backing file)', async () => {
      for (const img of [backingImg, dataImg]) {
        const r = await imgtool(['info', '--output', 'json', img], 60_000)
        expect(r.signal, 'killed: it hung').toBeNull()
        expect(r.code).toBe(0)
        expect(r.stdout).toContain('"format": "qcow2"')
      }
    })

    // info --backing-chain opens the chain (qemu-img info --backing-chain too)
    for (const cmd of ['info --backing-chain', 'check', 'map', 'cat']) {
      it(`${cmd} refuses a FIFO backing file at once`, async () => {
        const r = await imgtool([...cmd.split(' '), backingImg], 60_000)
        expect(r.signal, 'killed: it hung').toBeNull()
        expect(r.code).toBe(1)
        expect(r.stdout).toBe('')
        expect(r.stderr.trim().split('\n')).toHaveLength(1)
        expect(r.stderr).toContain(`${join(dir, 'fifo')}: not a regular file or block device (fifo)`)
      })

      it(`${cmd} refuses a FIFO data file at once`, async () => {
        const r = await imgtool([...cmd.split(' '), dataImg], 60_000)
        expect(r.signal, 'killed: it hung').toBeNull()
        expect(r.code).toBe(1)
        expect(r.stdout).toBe('')
        expect(r.stderr.trim().split('\n')).toHaveLength(1)
        expect(r.stderr).toContain(`${join(dir, 'data.raw')}: not a regular file or block device (fifo)`)
      })
    }

    it('the library refuses a FIFO, read-only or for writing, without blocking', async () => {
      for (const readOnly of [true, false]) {
        await expect(openFileDevice(join(dir, 'fifo'), { readOnly })).rejects.toThrow(/not a regular file or block device \(fifo\)/)
      }
      await expect(openFileDevice('/dev/null', { readOnly: true })).rejects.toThrow(/\/dev\/null: not a regular file or block device \(character device\)/)
    })
  },
  ['qemu-img'],
)
