/**
 * Journal files are only ever new files (D5, D19), owner-only, and go to a per-user
 * folder when the image's folder is not writable (issue item 8).
 */
import { existsSync, lstatSync, mkdirSync, readFileSync, readdirSync, readlinkSync, statSync, symlinkSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { afterEach, beforeEach, describe, expect, it } from 'vitest'
import { makeTempDir, useTempDirs } from '../support/qemu.js'
import { clean, cli, leaky, makeReadOnlyDir } from './helpers.js'

describe('repair --journal PATH (D5)', () => {
  useTempDirs()

  it('refuses an existing file and leaves it alone (it used to be truncated, then deleted)', async () => {
    const dir = makeTempDir()
    const img = clean(dir)
    const mine = join(dir, 'mine.txt')
    writeFileSync(mine, 'precious\n')
    const r = await cli('repair', '--journal', mine, img)
    expect(r.code).toBe(1)
    expect(r.err).toBe(`imgtool: journal ${mine} already exists (a journal is always a new file; choose another path or remove it)\n`)
    expect(readFileSync(mine, 'utf8')).toBe('precious\n')
  })

  it('refuses a symlink and writes nothing through it', async () => {
    const dir = makeTempDir()
    const img = leaky(dir)
    const before = readFileSync(img)
    writeFileSync(join(dir, 'target.txt'), 'data\n')
    symlinkSync('target.txt', join(dir, 'link.j'))
    const r = await cli('repair', '--journal', join(dir, 'link.j'), img)
    expect(r.code).toBe(1)
    expect(r.err).toContain('already exists')
    expect(readFileSync(join(dir, 'target.txt'), 'utf8')).toBe('data\n')
    expect(readlinkSync(join(dir, 'link.j'))).toBe('target.txt')
    expect(readFileSync(img).equals(before)).toBe(true) // refused before the image was touched
  })

  it('a second repair with the same --journal path keeps the first journal, so the first repair can still be undone', async () => {
    const dir = makeTempDir()
    const img = leaky(dir)
    const damagedBytes = readFileSync(img)
    const j = join(dir, 'repair.j')
    expect((await cli('repair', '--journal', j, img)).code).toBe(0)
    const journal = readFileSync(j)
    expect(journal.byteLength).toBeGreaterThan(0)
    expect((await cli('repair', '--journal', j, img)).code).toBe(1)
    expect(readFileSync(j).equals(journal)).toBe(true)
    expect((await cli('repair', '--undo', j, img)).code).toBe(0)
    expect(readFileSync(img).equals(damagedBytes)).toBe(true)
  })

  it('a journal that recorded nothing is removed, because this run created it', async () => {
    const dir = makeTempDir()
    const img = clean(dir)
    const r = await cli('repair', '--journal', join(dir, 'new.j'), img)
    expect(r.code).toBe(0)
    expect(existsSync(join(dir, 'new.j'))).toBe(false)
  })
})

describe('the default journal path (D19)', () => {
  useTempDirs()

  it('never follows a planted dangling symlink: the journal takes the next name', async () => {
    const dir = makeTempDir()
    const img = leaky(dir, 'disk.qcow2')
    mkdirSync(join(dir, 'elsewhere'))
    symlinkSync(join(dir, 'elsewhere', 'file'), img + '.imgtool-undo')
    const r = await cli('repair', img)
    expect(r.code).toBe(0)
    expect(existsSync(join(dir, 'elsewhere', 'file'))).toBe(false)
    expect(lstatSync(img + '.imgtool-undo').isSymbolicLink()).toBe(true)
    expect(statSync(img + '.imgtool-undo.1').size).toBeGreaterThan(0)
    expect(r.err).toContain(`undo journal written to ${img}.imgtool-undo.1 `)
  })

  it('creates the journal owner-only (0600), whatever the image mode', async () => {
    const dir = makeTempDir()
    const img = leaky(dir)
    expect((await cli('repair', img)).code).toBe(0)
    expect(statSync(img + '.imgtool-undo').mode & 0o777).toBe(0o600)
  })
})

describe('journal next to an image in a read-only folder (item 8)', () => {
  useTempDirs()
  let saved: string | undefined
  beforeEach(() => {
    saved = process.env['XDG_STATE_HOME']
  })
  afterEach(() => {
    if (saved === undefined) delete process.env['XDG_STATE_HOME']
    else process.env['XDG_STATE_HOME'] = saved
  })

  it('repairs, with the journal in $XDG_STATE_HOME/imgtool/journals (0700), says where, and undo works from there', async () => {
    const dir = makeTempDir()
    const imgDir = join(dir, 'ro')
    mkdirSync(imgDir)
    const img = leaky(imgDir, 'disk.qcow2')
    const damagedBytes = readFileSync(img)
    const state = join(dir, 'state')
    process.env['XDG_STATE_HOME'] = state
    const restore = makeReadOnlyDir(imgDir)
    if (!restore) {
      console.warn('[journal tests] cannot make a read-only folder here (root without chattr): skipped')
      return
    }
    try {
      const r = await cli('repair', img)
      expect(r.code).toBe(0)
      const jdir = join(state, 'imgtool', 'journals')
      const j = join(jdir, 'disk.qcow2.imgtool-undo')
      expect(readdirSync(imgDir)).toEqual(['disk.qcow2'])
      expect(statSync(jdir).mode & 0o777).toBe(0o700)
      expect(statSync(j).mode & 0o777).toBe(0o600)
      // the last stderr line (qemu-img's per-cluster lines and the findings come before it)
      expect(r.err).toMatch(
        new RegExp(
          `(^|\\n)imgtool: undo journal written to ${j} \\(${imgDir} is not writable \\(E[A-Z]+\\)\\) \\(restore with: imgtool repair --undo ${j} ${img}\\)\\n$`,
        ),
      )
      expect((await cli('repair', '--undo', j, img)).code).toBe(0)
      expect(readFileSync(img).equals(damagedBytes)).toBe(true)
    } finally {
      restore()
    }
  })

  it('an explicit --journal in a read-only folder is an error naming it (no silent move)', async () => {
    const dir = makeTempDir()
    const imgDir = join(dir, 'ro')
    mkdirSync(imgDir)
    const img = leaky(imgDir, 'disk.qcow2')
    const restore = makeReadOnlyDir(imgDir)
    if (!restore) return
    try {
      const r = await cli('repair', '--journal', join(imgDir, 'j'), img)
      expect(r.code).toBe(1)
      expect(r.err).toMatch(
        new RegExp(`^imgtool: cannot create the undo journal ${imgDir}/j: E[A-Z]+ \\(give --journal PATH, or --no-journal to repair without one\\)\\n$`),
      )
    } finally {
      restore()
    }
  })
})
