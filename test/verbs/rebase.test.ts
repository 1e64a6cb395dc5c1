/**
 * imgtool rebase against qemu-img rebase on copies of the same chain: the
 * rebased images read the same guest bytes (qemu-img compare), as the image
 * did before; both pass qemu-img check; qemu-img info shows the same backing
 * fields; refusals use qemu's words.
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
const raw = (dir: string, name: string, size: string) => qemuImgOk(['create', '-q', '-f', 'raw', join(dir, name), size])
const io = (dir: string, name: string, fmt: string, ...cmds: string[]) => qemuIoOk(join(dir, name), cmds, { format: fmt })

/** Both tools rebase their own copy of the files `setup` made; everything they should agree on is checked. */
async function rebaseBoth(setup: Setup, image: string, args: string[]): Promise<{ ours: string; theirs: string }> {
  const root = makeTempDir('imgtool-rebase-')
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
  const r = await cli('rebase', ...args, join(ours, image))
  expect(r.code, r.stderr).toBe(0)
  await qemuImgOk(['rebase', ...args, join(theirs, image)])
  const label = `rebase ${args.join(' ')}`
  for (const dir of [ours, theirs]) {
    expect((await qemuImg(['compare', before, join(dir, image)])).stdout, `${label}: ${dir} reads as before`).toBe('Images are identical.\n')
    const chk = await qemuImg(['check', join(dir, image)])
    expect(chk.code, `${label}: ${chk.stdout}`).toBe(0)
  }
  const info = async (dir: string) => {
    const i = await qemuImgJson<Record<string, unknown>>(['info', '--output=json', join(dir, image)])
    return { name: i['backing-filename'], format: i['backing-filename-format'], size: i['virtual-size'] }
  }
  expect(await info(ours), label).toEqual(await info(theirs))
  return { ours: join(ours, image), theirs: join(theirs, image) }
}

/** base1 (pattern 1 at 0..64K), base2 (pattern 2 at 32K..96K), img over base1 with pattern 3 at 128K..160K */
const twoBases: Setup = async (d) => {
  await qcow2(d, 'base1.qcow2', '1M')
  await io(d, 'base1.qcow2', 'qcow2', 'write -P 1 0 64k', 'write -P 5 900k 4k')
  await qcow2(d, 'base2.qcow2', '1M')
  await io(d, 'base2.qcow2', 'qcow2', 'write -P 2 32k 64k')
  await qcow2(d, 'img.qcow2', '1M', ['base1.qcow2', 'qcow2'])
  await io(d, 'img.qcow2', 'qcow2', 'write -P 3 128k 32k', 'write -P 4 40k 2k')
}

/** b <- m <- t with overlapping writes */
const threeLevels: Setup = async (d) => {
  await qcow2(d, 'b.qcow2', '1M')
  await io(d, 'b.qcow2', 'qcow2', 'write -P 1 0 8k')
  await qcow2(d, 'm.qcow2', '1M', ['b.qcow2', 'qcow2'])
  await io(d, 'm.qcow2', 'qcow2', 'write -P 2 4k 8k', 'write -P 6 300k 100k')
  await qcow2(d, 't.qcow2', '1M', ['m.qcow2', 'qcow2'])
  await io(d, 't.qcow2', 'qcow2', 'write -P 3 8k 8k')
}

describeQemu('imgtool rebase against qemu-img rebase', () => {
  it('rebases onto a different base holding different data', async () => {
    await rebaseBoth(twoBases, 'img.qcow2', ['-b', 'base2.qcow2', '-F', 'qcow2'])
  })

  it('rebases onto a base that is a prefix of the chain', async () => {
    const r = await rebaseBoth(threeLevels, 't.qcow2', ['-b', 'b.qcow2', '-F', 'qcow2'])
    expect((await qemuImg(['compare', r.ours, r.theirs])).code).toBe(0)
  })

  it("flattens with -b ''", async () => {
    const r = await rebaseBoth(threeLevels, 't.qcow2', ['-b', ''])
    const i = await qemuImgJson<Record<string, unknown>>(['info', '--output=json', r.ours])
    expect(i['backing-filename']).toBeUndefined()
  })

  it('with -u only renames: both read through the new file alike', async () => {
    const setup: Setup = async (d) => {
      await twoBases(d)
      await copyFileSync(join(d, 'base1.qcow2'), join(d, 'renamed.qcow2'))
    }
    await rebaseBoth(setup, 'img.qcow2', ['-u', '-b', 'renamed.qcow2', '-F', 'qcow2'])
  })

  it('-u onto a raw file: the same header fields as qemu-img writes', async () => {
    const setup: Setup = async (d) => {
      await twoBases(d)
      await qemuImgOk(['convert', '-O', 'raw', join(d, 'base1.qcow2'), join(d, 'base1.raw')])
    }
    const r = await rebaseBoth(setup, 'img.qcow2', ['-u', '-b', 'base1.raw', '-F', 'raw'])
    const { readFileSync } = await import('node:fs')
    // the header cluster as qemu-img lays it out (fields, extensions in its order, name)
    expect(Buffer.compare(readFileSync(r.ours).subarray(0, 4096), readFileSync(r.theirs).subarray(0, 4096))).toBe(0)
  })

  it('rebases onto a raw backing file', async () => {
    const setup: Setup = async (d) => {
      await twoBases(d)
      await raw(d, 'new.raw', '1M')
      await io(d, 'new.raw', 'raw', 'write -P 9 0 16k', 'write -P 1 16k 48k')
    }
    await rebaseBoth(setup, 'img.qcow2', ['-b', 'new.raw', '-F', 'raw'])
  })

  it('rebases onto a smaller backing file', async () => {
    const setup: Setup = async (d) => {
      await twoBases(d)
      await raw(d, 'small.raw', '512k')
      await io(d, 'small.raw', 'raw', 'write -P 8 0 512k')
    }
    await rebaseBoth(setup, 'img.qcow2', ['-b', 'small.raw', '-F', 'raw'])
  })

  it('rebases onto a larger backing file', async () => {
    const setup: Setup = async (d) => {
      await twoBases(d)
      await qcow2(d, 'large.qcow2', '2M')
      await io(d, 'large.qcow2', 'qcow2', 'write -P 7 0 2M')
    }
    await rebaseBoth(setup, 'img.qcow2', ['-b', 'large.qcow2', '-F', 'qcow2'])
  })

  it('rebases an image that had no backing file', async () => {
    const setup: Setup = async (d) => {
      await twoBases(d)
      await qcow2(d, 'alone.qcow2', '1M')
      await io(d, 'alone.qcow2', 'qcow2', 'write -P 3 0 4k')
    }
    await rebaseBoth(setup, 'alone.qcow2', ['-b', 'base2.qcow2', '-F', 'qcow2'])
  })

  it('refuses a backing file without its format, in qemu-img words, before writing', async () => {
    const d = makeTempDir('imgtool-rebase-')
    await twoBases(d)
    const img = join(d, 'img.qcow2')
    const { readFileSync } = await import('node:fs')
    const bytes = readFileSync(img)
    const ours = await cli('rebase', '-b', 'base2.qcow2', img)
    const theirs = await qemuImg(['rebase', '-u', '-b', 'base2.qcow2', img])
    expect(ours.code).toBe(1)
    expect(theirs.code).toBe(1)
    expect(ours.stderr.trim()).toBe(theirs.stderr.trim().replace(/^qemu-img: /, 'imgtool: '))
    expect(Buffer.compare(readFileSync(img), bytes)).toBe(0)
  })
})
