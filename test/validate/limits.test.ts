/**
 * Limits that stop work: the time limit is an abort signal the check engine
 * polls between tables (not a verdict taken after it returns), and the memory
 * limit bounds the metadata a check would hold, computed from the header
 * before any table is read. Images by qemu-img; hostile headers patched in code.
 */
import { truncateSync } from 'node:fs'
import { join } from 'node:path'
import { beforeAll, expect, it } from 'vitest'
import { AbortedError, check, validate } from '../../src/index.js'
import { describeQemu, makeTempDir, qemuImgOk, useTempDirs } from '../support/qemu.js'
import { codes, damaged, makeFixtures, permissive, u32 } from './fixtures.js'

useTempDirs()

/** An AbortSignal that reads as aborted from its n-th poll on (counts every poll). */
function abortsAtPoll(n: number): { signal: AbortSignal; polls: () => number } {
  let polls = 0
  const signal = {
    get aborted() {
      polls++
      return polls >= n
    },
    reason: new Error('test abort'),
    addEventListener() {},
    removeEventListener() {},
  } as unknown as AbortSignal
  return { signal, polls: () => polls }
}

describeQemu('validate limits stop the work', () => {
  let dir = ''
  let big = ''
  beforeAll(async () => {
    dir = makeFixtures()
    // 16 GiB with preallocation=metadata: 32 L2 tables the check walks, a sparse file
    big = join(makeTempDir('imgtool-validate-big-'), 'big.qcow2')
    await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata', big, '16G'])
  }, 120_000)

  it('the qcow2 check engine polls the signal between L2 tables and stops there', async () => {
    const clean = await check(big)
    expect({ corruptions: clean.corruptions, leaks: clean.leaks }).toEqual({ corruptions: 0, leaks: 0 })
    // poll 1: the API's entry; 2: the L1 table; 3..: before each L2 table. Abort at the 6th: mid-walk
    const s = abortsAtPoll(6)
    const err = await check(big, { signal: s.signal }).catch((e: unknown) => e)
    expect(err).toBeInstanceOf(AbortedError)
    expect((err as Error).message).toMatch(/check stopped before the l2 table at 0x[0-9a-f]+/)
    expect(s.polls()).toBe(6)
  })

  it('LIMIT_TIMEOUT: a tiny time limit on a 16 GiB sparse image stops with the violation, nothing passed', async () => {
    const r = await validate(big, permissive({ limits: { timeoutSeconds: 0.001 } }))
    expect(codes(r)).toEqual(['LIMIT_TIMEOUT'])
    const v = r.violations[0]!
    expect(v.message).toMatch(/ran out of time \(limits\.timeoutSeconds 0\.001\) during the /)
    expect(v.structure).toBe(/during the ([a-z ]+)/.exec(v.message)![1])
    expect(r.checks.structure).toBe('skip')
    expect(r.checks.content).toBe('skip')
    expect(r.checks.limits).toBe('fail')
    // the same image validates with the default limit
    expect(codes(await validate(big, permissive({ content: { digest: false } })))).toEqual([])
  })

  it('LIMIT_MEMORY: an L1 of 32 Mi entries (256 MiB) under a raised table limit is not read', async () => {
    const hostile = damaged(dir, 'good.qcow2', 'l1-32mi', [[36, u32(32 << 20)]])
    const r = await validate(hostile, permissive({ limits: { maxTableBytes: 1 << 30 } }))
    // QEMU's header parser refuses an L1 above 32 MiB too; the limit is reported before anything is read
    expect(codes(r)).toEqual(['HEADER_INVALID', 'LIMIT_MEMORY', 'TRUNCATED'])
    expect(r.violations.find((v) => v.code === 'LIMIT_MEMORY')!.message).toMatch(/more than limits\.maxMetadataMemory 268435456: not checked/)
    expect(r.checks.structure).toBe('skip')
    expect(r.checks.content).toBe('skip')
  })

  it('LIMIT_MEMORY: an L1 and a refcount table QEMU accepts, each under maxTableBytes, whose sum is over the limit', async () => {
    // 3.5 Mi L1 entries (28 MiB, QEMU allows 32) and 120 refcount table clusters (7.5 MiB, QEMU allows 8), in a 64 MiB file
    const hostile = damaged(dir, 'good.qcow2', 'tables', [
      [36, u32(7 << 19)],
      [56, u32(120)],
    ])
    truncateSync(hostile, 64 << 20)
    const r = await validate(hostile, permissive({ limits: { maxMetadataMemory: 32 << 20 } }))
    expect(codes(r)).toEqual(['LIMIT_MEMORY'])
    expect(r.checks.structure).toBe('skip')
    // above the limit's reach the check runs (and finds the tables overlap)
    const checked = await validate(hostile, permissive({ limits: { maxMetadataMemory: 48 << 20 } }))
    expect(codes(checked)).not.toContain('LIMIT_MEMORY')
    expect(codes(checked)).toContain('CHECK_CORRUPTIONS')
  })

  it('LIMIT_MEMORY: the bound is computed for sound images too (good.qcow2 holds about 1.1 MiB; VHD: its BAT)', async () => {
    expect(codes(await validate(join(dir, 'good.qcow2'), permissive({ limits: { maxMetadataMemory: 2 << 20 } })))).toEqual([])
    expect(codes(await validate(join(dir, 'good.qcow2'), permissive({ limits: { maxMetadataMemory: 1 << 20 } })))).toEqual(['LIMIT_MEMORY'])
    expect(codes(await validate(join(dir, 'dynamic.vhd'), permissive({ limits: { maxMetadataMemory: 256 } })))).toEqual(['LIMIT_MEMORY'])
    expect(codes(await validate(join(dir, 'dynamic.vhd'), permissive({ limits: { maxMetadataMemory: 4096 } })))).toEqual([])
  })
})
