import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { open, type FileHandle } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, describe, expect, it, onTestFinished } from 'vitest'
import { openFileDevice } from '../../../src/io/file-device.js'

const dir = mkdtempSync(join(tmpdir(), 'imgtool-fd-'))
afterAll(() => rmSync(dir, { recursive: true, force: true }))

describe('FileDevice writes to a regular file', () => {
  it('run one at a time in call order: the last of overlapping writes submitted together wins', async () => {
    const path = join(dir, 'order.img')
    const dev = await openFileDevice(path, { readOnly: false, create: true })
    const big = 8 * 1024 * 1024
    const small = 4096
    // a large write, then a small one over its start, none awaited before the next is submitted: run
    // at once on two pool threads, the small one ends first and the large one's bytes are left on top
    const writes: Array<Promise<void>> = []
    // the pool-thread writes in flight at once, seen at FileHandle.write
    let inFlight = 0
    let maxInFlight = 0
    const probe = await open(path, 'r')
    const proto = Object.getPrototypeOf(probe) as { write: FileHandle['write'] }
    await probe.close()
    const original = proto.write
    proto.write = async function (this: FileHandle, ...args: unknown[]) {
      maxInFlight = Math.max(maxInFlight, ++inFlight)
      try {
        return await (original as (...a: unknown[]) => ReturnType<FileHandle['write']>).apply(this, args)
      } finally {
        inFlight--
      }
    } as FileHandle['write']
    onTestFinished(() => {
      proto.write = original
    })
    for (let i = 0; i < 8; i++) {
      writes.push(dev.write(0, new Uint8Array(big).fill(2 * i + 1)))
      writes.push(dev.write(0, new Uint8Array(small).fill(2 * i + 2)))
    }
    await Promise.all(writes)
    expect(maxInFlight).toBe(1)
    const bytes = readFileSync(path)
    expect(bytes.byteLength).toBe(big)
    expect(dev.size).toBe(big)
    // the last small write over the last large one
    expect(bytes.subarray(0, small).every((b) => b === 16)).toBe(true)
    expect(bytes.subarray(small).every((b) => b === 15)).toBe(true)
    await dev.close()
  })

  it('a failed write does not hold up the writes after it, and flush, truncate and close wait for them', async () => {
    const path = join(dir, 'fail.img')
    const dev = await openFileDevice(path, { readOnly: false, create: true })
    // far past any filesystem's largest file: EFBIG (or EINVAL) from the kernel
    const bad = dev.write(2 ** 52, new Uint8Array(512).fill(1))
    const good = dev.write(0, new Uint8Array(4096).fill(2))
    const trunc = dev.truncate(1024)
    await expect(bad).rejects.toThrow(/write data at 0x10000000000000/)
    await good
    await trunc
    await dev.flush()
    const bytes = readFileSync(path)
    // the truncate, submitted after the good write, ran after it
    expect(bytes.byteLength).toBe(1024)
    expect(bytes.every((b) => b === 2)).toBe(true)
    await dev.close()
  })
})
