/** createImage (under imgtool create): the plan is told before anything is checked or touched, and -u. */
import { existsSync } from 'node:fs'
import { join } from 'node:path'
import { afterAll, describe, expect, it } from 'vitest'
import { createImage, imageInfo, type CreatePlan } from '../../src/index.js'
import { cleanupTempDirs, makeTempDir } from '../support/qemu.js'

describe('createImage', () => {
  const dir = makeTempDir('imgtool-create-')
  afterAll(() => cleanupTempDirs(dir))

  it('tells the plan (size from the backing file) before the file exists', async () => {
    await createImage(join(dir, 'base.qcow2'), { format: 'qcow2', size: '3M' })
    const path = join(dir, 'top.qcow2')
    const plans: Array<{ plan: CreatePlan; existed: boolean }> = []
    const r = await createImage(path, {
      format: 'qcow2',
      backingFile: 'base.qcow2',
      backingFormat: 'qcow2',
      options: { cluster_size: '4k' },
      onPlan: (plan) => plans.push({ plan, existed: existsSync(path) }),
    })
    expect(r).toEqual({ filename: path, format: 'qcow2', size: 3 * 1024 * 1024 })
    expect(plans).toEqual([
      { plan: { format: 'qcow2', size: 3 * 1024 * 1024, options: { cluster_size: '4k' }, backingFile: 'base.qcow2', backingFormat: 'qcow2' }, existed: false },
    ])
    expect(await imageInfo(path)).toMatchObject({ virtualSize: 3 * 1024 * 1024 })
  })

  it('tells the plan of bad options too, then refuses them and makes no file', async () => {
    const path = join(dir, 'bad.qcow2')
    let told = 0
    await expect(createImage(path, { format: 'qcow2', size: 1 << 20, options: { cluster_size: '3' }, onPlan: () => told++ })).rejects.toMatchObject({
      code: 'USAGE',
    })
    expect(told).toBe(1)
    expect(existsSync(path)).toBe(false)
  })

  it('with openBacking false needs the size; a size given twice is refused with the file named', async () => {
    const path = join(dir, 'u.qcow2')
    await expect(createImage(path, { format: 'qcow2', backingFile: 'base.qcow2', backingFormat: 'qcow2', openBacking: false })).rejects.toThrow(
      'Image creation needs a size parameter',
    )
    await expect(createImage(path, { format: 'qcow2', size: '1M', options: { size: '1M' } })).rejects.toThrow(
      `${path}: The image size must be specified only once`,
    )
    expect(existsSync(path)).toBe(false)
  })
})
