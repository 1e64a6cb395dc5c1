/**
 * imgtool commit against qemu-img commit on copies of the same chain: the
 * bases hold the same guest bytes (qemu-img compare), the overlay reads what
 * it read before, both pass qemu-img check, the overlay is emptied or kept
 * as qemu-img leaves it; refusals use qemu's words.
 */
import { copyFileSync, mkdirSync, readdirSync } from 'node:fs'
import { join } from 'node:path'
import { expect, it } from 'vitest'
import { cli } from '../support/cli.js'
import { describeQemu, makeTempDir, qemuImg, qemuImgJson, qemuImgOk, qemuIoOk, useTempDirs } from '../support/qemu.js'

useTempDirs()

type Setup = (dir: string) => Promise<void>

const qcow2 = (dir: string, name: string, size: string, backing?: [string, string]) =>
  qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', ...(backing ? ['-b', backing[0], '-F', backing[1]] : []), join(dir, name), size])
const io = (dir: string, name: string, fmt: string, ...cmds: string[]) => qemuIoOk(join(dir, name), cmds, { format: fmt })

/**
 * What `image` itself allocates, as qemu-img map sees it (host offsets left
 * out; how the layers below allocate may differ: a zeroed range may stay
 * unallocated in a base without a backing file).
 */
async function layers(image: string): Promise<unknown[]> {
  const m = await qemuImgJson<Array<Record<string, unknown>>>(['map', '--output=json', image])
  return m.filter((e) => e['depth'] === 0).map((e) => [e['start'], e['length'], e['data'], e['zero']])
}

async function commitBoth(setup: Setup, image: string, base: string, args: string[], check: string[]): Promise<{ ours: string; theirs: string }> {
  const root = makeTempDir('imgtool-commit-')
  const src = join(root, 'src')
  mkdirSync(src)
  await setup(src)
  const copy = (to: string) => {
    mkdirSync(to)
    for (const f of readdirSync(src)) copyFileSync(join(src, f), join(to, f))
    return to
  }
  const ours = copy(join(root, 'ours'))
  const theirs = copy(join(root, 'theirs'))
  const before = join(root, 'before.raw')
  await qemuImgOk(['convert', '-O', 'raw', join(src, image), before])
  const r = await cli('commit', ...args, join(ours, image))
  expect(r.code, r.stderr).toBe(0)
  expect(r.stdout).toBe('Image committed.\n')
  const q = await qemuImgOk(['commit', ...args, join(theirs, image)])
  expect(q).toBe(r.stdout)
  const label = `commit ${args.join(' ')}`
  const baseFmt = base.endsWith('.raw') ? 'raw' : 'qcow2'
  const cmp = await qemuImg(['compare', '-f', baseFmt, '-F', baseFmt, join(ours, base), join(theirs, base)])
  expect(cmp.stdout, `${label}: the bases`).toBe('Images are identical.\n')
  for (const dir of [ours, theirs]) {
    expect((await qemuImg(['compare', before, join(dir, image)])).stdout, `${label}: ${dir}: the overlay reads as before`).toBe('Images are identical.\n')
    for (const f of check) {
      const chk = await qemuImg(['check', join(dir, f)])
      expect(chk.code, `${label}: ${f}: ${chk.stdout}`).toBe(0)
    }
  }
  expect(await layers(join(ours, image)), `${label}: what the overlay still allocates`).toEqual(await layers(join(theirs, image)))
  return { ours: join(ours, image), theirs: join(theirs, image) }
}

const twoLevels: Setup = async (d) => {
  await qcow2(d, 'base.qcow2', '1M')
  await io(d, 'base.qcow2', 'qcow2', 'write -P 1 0 64k', 'write -P 5 900k 4k')
  await qcow2(d, 'top.qcow2', '1M', ['base.qcow2', 'qcow2'])
  await io(d, 'top.qcow2', 'qcow2', 'write -P 3 32k 64k', 'write -z 896k 8k', 'write -P 4 500k 2k')
}

const threeLevels: Setup = async (d) => {
  await qcow2(d, 'b.qcow2', '1M')
  await io(d, 'b.qcow2', 'qcow2', 'write -P 1 0 8k')
  await qcow2(d, 'm.qcow2', '1M', ['b.qcow2', 'qcow2'])
  await io(d, 'm.qcow2', 'qcow2', 'write -P 2 4k 8k', 'write -P 6 300k 100k')
  await qcow2(d, 't.qcow2', '1M', ['m.qcow2', 'qcow2'])
  await io(d, 't.qcow2', 'qcow2', 'write -P 3 8k 8k', 'write -P 7 350k 4k')
}

describeQemu('imgtool commit against qemu-img commit', () => {
  it('commits into the backing file and empties the overlay', async () => {
    const r = await commitBoth(twoLevels, 'top.qcow2', 'base.qcow2', [], ['top.qcow2', 'base.qcow2'])
    expect(await layers(r.ours), 'nothing left allocated in the overlay').toEqual([])
  })

  it('keeps the overlay with -d', async () => {
    const r = await commitBoth(twoLevels, 'top.qcow2', 'base.qcow2', ['-d'], ['top.qcow2', 'base.qcow2'])
    expect((await layers(r.ours)).length, 'the overlay keeps its clusters').toBeGreaterThan(0)
  })

  it('commits two levels down with -b BASE, the middle layer too', async () => {
    await commitBoth(threeLevels, 't.qcow2', 'b.qcow2', ['-b', 'b.qcow2'], ['t.qcow2', 'm.qcow2', 'b.qcow2'])
  })

  it('commits the middle of a chain into its backing file', async () => {
    await commitBoth(threeLevels, 'm.qcow2', 'b.qcow2', [], ['m.qcow2', 'b.qcow2'])
  })

  it('commits into a raw backing file', async () => {
    const setup: Setup = async (d) => {
      await qemuImgOk(['create', '-q', '-f', 'raw', join(d, 'base.raw'), '1M'])
      await io(d, 'base.raw', 'raw', 'write -P 1 0 64k')
      await qcow2(d, 'top.qcow2', '1M', ['base.raw', 'raw'])
      await io(d, 'top.qcow2', 'qcow2', 'write -P 3 32k 64k', 'write -z 8k 4k')
    }
    await commitBoth(setup, 'top.qcow2', 'base.raw', [], ['top.qcow2'])
  })

  it('refuses an image without a backing file, and a base not in the chain, in qemu-img words', async () => {
    const d = makeTempDir('imgtool-commit-')
    await twoLevels(d)
    for (const args of [[join(d, 'base.qcow2')], ['-b', join(d, 'nope.qcow2'), join(d, 'top.qcow2')]]) {
      const ours = await cli('commit', ...args)
      const theirs = await qemuImg(['commit', ...args])
      expect(ours.code, args.join(' ')).toBe(theirs.code)
      expect(ours.stderr.trim()).toBe(theirs.stderr.trim().replace(/^qemu-img: /, 'imgtool: '))
    }
  })
})
