/** Repeated -o options and a size given twice, as qemu-img create and convert take them (Q1, Q3). */
import { existsSync, readFileSync } from 'node:fs'
import { join } from 'node:path'
import { Command } from 'commander'
import { beforeAll, describe, expect, it } from 'vitest'
import { accumulateOptions, parseKeyValues } from '../../src/cli/common.js'
import { cli } from '../support/cli.js'
import { describeQemu, makeTempDir, qemuImg, qemuImgOk, useTempDirs } from '../support/qemu.js'

useTempDirs()

describe('accumulateOptions', () => {
  it('joins every -o with a comma; parseKeyValues then lets a later key win', () => {
    const cmd = new Command().exitOverride().option('-o, --options <opts>', '', accumulateOptions).argument('[x]')
    cmd.parse(['-o', 'cluster_size=4k', '-o', 'lazy_refcounts=on,cluster_size=8k', '-o', 'refcount_bits=8'], { from: 'user' })
    const text = cmd.opts()['options'] as string
    expect(text).toBe('cluster_size=4k,lazy_refcounts=on,cluster_size=8k,refcount_bits=8')
    expect(parseKeyValues(text)).toEqual({ cluster_size: '8k', lazy_refcounts: 'on', refcount_bits: '8' })
  })
})

describeQemu(
  'create and convert take repeated -o as qemu-img does',
  () => {
    let dir = ''
    beforeAll(() => {
      dir = makeTempDir('imgtool-opts-')
    })

    const info = async (file: string): Promise<Record<string, unknown>> => {
      const j = JSON.parse(await qemuImgOk(['info', '--output', 'json', file])) as Record<string, unknown>
      delete j['filename']
      delete j['actual-size']
      return j
    }

    it('create -o cluster_size=4k -o cluster_size=8k,lazy_refcounts=on -o refcount_bits=8: the image qemu-img makes, same Formatting line', async () => {
      const args = ['-f', 'qcow2', '-o', 'cluster_size=4k', '-o', 'cluster_size=8k,lazy_refcounts=on', '-o', 'refcount_bits=8']
      const q = await qemuImgOk(['create', ...args, join(dir, 'q.qcow2'), '1M'])
      const r = await cli('create', ...args, join(dir, 'i.qcow2'), '1M')
      expect(r.stderr).toBe('')
      expect(r.code).toBe(0)
      expect(r.stdout.replace('i.qcow2', 'q.qcow2')).toBe(q)
      expect(await info(join(dir, 'i.qcow2'))).toEqual(await info(join(dir, 'q.qcow2')))
      expect((await info(join(dir, 'i.qcow2')))['cluster-size']).toBe(8192)
    })

    it('create -o size=10M -o size=12M FILE: the later size, as qemu-img', async () => {
      const r = await cli('create', '-q', '-f', 'qcow2', '-o', 'size=10M', '-o', 'size=12M', join(dir, 'two.qcow2'))
      expect(r.code).toBe(0)
      expect((await info(join(dir, 'two.qcow2')))['virtual-size']).toBe(12 * 1024 * 1024)
    })

    for (const fmt of ['qcow2', 'raw']) {
      it(`create -f ${fmt} -o size=10M FILE 20M: refused as qemu-img refuses it, exit 1, no file`, async () => {
        const qfile = join(dir, `q-size.${fmt}`)
        const q = await qemuImg(['create', '-f', fmt, '-o', 'size=10M', qfile, '20M'])
        expect(q.code).toBe(1)
        expect(q.stderr).toContain('The image size must be specified only once')
        expect(existsSync(qfile)).toBe(false)
        const file = join(dir, `i-size.${fmt}`)
        const r = await cli('create', '-f', fmt, '-o', 'size=10M', file, '20M')
        expect(r.code).toBe(1)
        expect(r.stdout).toBe('')
        expect(r.stderr).toBe(`imgtool: ${file}: The image size must be specified only once\n`)
        expect(existsSync(file)).toBe(false)
      })
    }

    it('convert -o backing_file=B -o backing_fmt=qcow2: both count, as qemu-img convert', async () => {
      await qemuImgOk(['create', '-q', '-f', 'qcow2', join(dir, 'base.qcow2'), '64M'])
      await qemuImgOk(['create', '-q', '-f', 'qcow2', join(dir, 'src.qcow2'), '64M'])
      const args = ['-O', 'qcow2', '-o', `backing_file=${join(dir, 'base.qcow2')}`, '-o', 'backing_fmt=qcow2', '-o', 'cluster_size=4k']
      await qemuImgOk(['convert', ...args, join(dir, 'src.qcow2'), join(dir, 'q-dst.qcow2')])
      const r = await cli('convert', ...args, join(dir, 'src.qcow2'), join(dir, 'i-dst.qcow2'))
      expect(r.stderr).toBe('')
      expect(r.code).toBe(0)
      const want = await info(join(dir, 'q-dst.qcow2'))
      expect(want).toMatchObject({ 'backing-filename': join(dir, 'base.qcow2'), 'backing-filename-format': 'qcow2', 'cluster-size': 4096 })
      expect(await info(join(dir, 'i-dst.qcow2'))).toEqual(want)
      expect(readFileSync(join(dir, 'i-dst.qcow2')).length).toBeGreaterThan(0)
    })
  },
  ['qemu-img'],
)
