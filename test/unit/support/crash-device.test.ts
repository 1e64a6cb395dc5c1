import { describe, expect, it } from 'vitest'
import { MemoryDevice } from '../../../src/io/memory-device.js'
import { CrashDevice, sweepCrashes, tornCuts, type CrashState } from '../../support/crash-device.js'
import { Prng } from '../../support/prng.js'

const bytes = (n: number, v: number): Uint8Array => new Uint8Array(n).fill(v)

function isPrefixOf(applied: number[], pending: number[]): boolean {
  return applied.length <= pending.length && applied.every((s, i) => s === pending[i])
}

async function all(dev: MemoryDevice): Promise<Uint8Array> {
  return dev.read(0, dev.size)
}

describe('CrashDevice basics', () => {
  it('reads see pending writes; flush makes them durable', async () => {
    const dev = new CrashDevice(bytes(1024, 0))
    await dev.write(0, bytes(4, 1), 'header')
    expect(Array.from(await dev.read(0, 4))).toEqual([1, 1, 1, 1])
    expect(dev.durableSnapshot()[0]).toBe(0)
    expect(dev.pendingWrites().map((e) => e.kind)).toEqual(['write'])
    await dev.flush()
    expect(dev.pendingWrites()).toEqual([])
    expect(dev.durableSnapshot()[0]).toBe(1)
    expect(dev.flushCount).toBe(1)
    expect(dev.events.map((e) => [e.seq, e.kind])).toEqual([
      [0, 'write'],
      [1, 'flush'],
    ])
  })

  it('copies its base and the written buffers', async () => {
    const base = new MemoryDevice(bytes(8, 3))
    const dev = new CrashDevice(base)
    const buf = bytes(4, 9)
    await dev.write(0, buf)
    buf.fill(0)
    expect(Array.from(await dev.read(0, 8))).toEqual([9, 9, 9, 9, 3, 3, 3, 3])
    expect(Array.from(base.snapshot())).toEqual([3, 3, 3, 3, 3, 3, 3, 3])
    const raw = bytes(4, 5)
    const dev2 = new CrashDevice(raw)
    await dev2.write(0, bytes(1, 6))
    expect(raw[0]).toBe(5)
  })

  it('crashAt(k) is the durable state plus the first k pending writes', async () => {
    const dev = new CrashDevice(bytes(16, 0))
    await dev.write(0, bytes(4, 1))
    await dev.flush()
    await dev.write(4, bytes(4, 2))
    await dev.write(8, bytes(4, 3))
    await dev.write(0, bytes(2, 4))
    const img = async (k: number): Promise<number[]> => Array.from((await all(dev.crashAt(k))).subarray(0, 12))
    expect(await img(0)).toEqual([1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    expect(await img(1)).toEqual([1, 1, 1, 1, 2, 2, 2, 2, 0, 0, 0, 0])
    expect(await img(3)).toEqual([4, 4, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3])
    expect(() => dev.crashAt(4)).toThrow(/0\.\.3/)
  })

  it('yields fresh, independent devices', async () => {
    const dev = new CrashDevice(bytes(8, 0))
    await dev.write(0, bytes(1, 1))
    const [a, b] = [...dev.crashStates()]
    await a!.device.write(7, bytes(1, 9))
    expect((await b!.device.read(7, 1))[0]).toBe(0)
    expect(dev.crashAt(1).name).not.toBe(a!.device.name)
    expect((await dev.read(7, 1))[0]).toBe(0)
  })
})

describe('crash states', () => {
  it('prefixes: n+1 states, in order', async () => {
    const dev = new CrashDevice(bytes(4096, 0))
    for (let i = 0; i < 3; i++) await dev.write(i * 512, bytes(512, i + 1), 'data')
    const states = [...dev.crashStates()]
    expect(states.map((s) => s.kind)).toEqual(['prefix', 'prefix', 'prefix', 'prefix'])
    expect(states.map((s) => s.applied)).toEqual([[], [0], [0, 1], [0, 1, 2]])
    expect(states[2]!.description).toMatch(/crash at point 3 \(0 flushes done, 3 pending events: #0 write data 0x0\+0x200/)
    expect(states[2]!.description).toMatch(/prefix 2\/3/)
  })

  it('subsets: all 2^n combinations when n is small, each once', async () => {
    const dev = new CrashDevice(bytes(4096, 0))
    for (let i = 0; i < 4; i++) await dev.write(i * 512, bytes(512, i + 1))
    const states = [...dev.crashStates({ subsets: true })]
    expect(states).toHaveLength(16)
    const keys = new Set(states.map((s) => s.applied.join(',')))
    expect(keys.size).toBe(16)
    for (const s of states) {
      const img = await all(s.device)
      for (let i = 0; i < 4; i++) expect(img[i * 512]).toBe(s.applied.includes(i) ? i + 1 : 0)
      if (s.kind === 'prefix') expect(isPrefixOf(s.applied, s.pending)).toBe(true)
      else expect(isPrefixOf(s.applied, s.pending)).toBe(false)
    }
  })

  it('subsets: bounded and seeded when n is large', async () => {
    const dev = new CrashDevice(bytes(0x4000, 0))
    for (let i = 0; i < 14; i++) await dev.write(i * 512, bytes(512, i + 1))
    const subsets = (seed: number): string[] =>
      [...dev.crashStates({ subsets: true, seed, randomSubsets: 20 })].filter((s) => s.kind === 'subset').map((s) => s.applied.join(','))
    const a = subsets(7)
    expect(a).toHaveLength(13 + 20) // every "all but one" (but the last, a prefix) + 20 random
    expect(new Set(a).size).toBe(a.length)
    expect(subsets(7)).toEqual(a)
    expect(subsets(8)).not.toEqual(a)
    for (let skip = 0; skip < 13; skip++) {
      expect(a).toContain([...Array(14).keys()].filter((i) => i !== skip).join(','))
    }
    const small = new CrashDevice(bytes(0x2000, 0))
    for (let i = 0; i < 12; i++) await small.write(i * 512, bytes(512, i + 1))
    expect([...small.crashStates({ subsets: true, exhaustiveLimit: 12 })]).toHaveLength(2 ** 12)
  })

  it('torn: the last applied write is cut at each 512-byte boundary', async () => {
    const dev = new CrashDevice(bytes(8192, 0xee))
    await dev.write(0, bytes(1024, 1))
    await dev.write(4096, bytes(2048, 2), 'l2')
    const states = [...dev.crashStates({ torn: true })]
    const torn = states.filter((s) => s.kind === 'torn')
    expect(torn.map((s) => [s.torn!.seq, s.torn!.from, s.torn!.to])).toEqual([
      [0, 0, 512],
      [1, 4096, 4608],
      [1, 4096, 5120],
      [1, 4096, 5632],
    ])
    // order: prefix k-1, torn variants of write k, prefix k
    expect(states.map((s) => s.kind)).toEqual(['prefix', 'torn', 'prefix', 'torn', 'torn', 'torn', 'prefix'])
    for (const s of torn) {
      const img = await all(s.device)
      const t = s.torn!
      expect(s.applied).toEqual(s.pending.slice(0, s.pending.indexOf(t.seq)))
      const v = t.seq + 1
      const start = t.seq === 0 ? 0 : 4096
      const end = start + (t.seq === 0 ? 1024 : 2048)
      for (let i = start; i < end; i++) {
        if (img[i] !== (i < t.to ? v : 0xee)) throw new Error(`${s.description}: byte ${i} is ${img[i]}`)
      }
      if (t.seq === 1) expect(img[0]).toBe(1) // the earlier write landed whole
      expect(s.description).toMatch(/torn: 0x[0-9a-f]+\.\.0x[0-9a-f]+ landed/)
    }
  })

  it('torn: unaligned writes cut at absolute sector boundaries; count is bounded; tails optional', async () => {
    expect(tornCuts(100, 1000, 512, 8)).toEqual([512, 1024])
    expect(tornCuts(0, 512, 512, 8)).toEqual([])
    const many = tornCuts(0, 65536, 512, 8)
    expect(many).toHaveLength(8)
    expect(many[0]).toBe(512)
    expect(many[7]).toBe(65024)
    expect(many.every((c) => c % 512 === 0)).toBe(true)
    expect(tornCuts(0, 8192, 4096, 8)).toEqual([4096])

    const dev = new CrashDevice(bytes(2048, 0))
    await dev.write(100, bytes(1000, 1))
    const torn = [...dev.crashStates({ torn: true, tornTail: true })].filter((s) => s.kind === 'torn')
    expect(torn.map((s) => [s.torn!.from, s.torn!.to])).toEqual([
      [100, 512],
      [512, 1100],
      [100, 1024],
      [1024, 1100],
    ])
    const tail = await all(torn[1]!.device)
    expect(tail[511]).toBe(0)
    expect(tail[512]).toBe(1)
    expect(tail[1099]).toBe(1)
    expect([...dev.crashStates({ torn: true, maxTornPerWrite: 1 })].filter((s) => s.kind === 'torn')).toHaveLength(1)
    expect([...dev.crashStates({ torn: true, sectorSize: 4096 })].filter((s) => s.kind === 'torn')).toHaveLength(0)
  })

  it('truncate is pending until a flush, and may or may not land', async () => {
    const dev = new CrashDevice(bytes(4096, 1))
    await dev.truncate(1024)
    await dev.write(2048, bytes(512, 2)) // grows it again
    expect(dev.size).toBe(2560)
    const states = [...dev.crashStates({ subsets: true })]
    const sizes = states.map((s) => [s.applied.join(','), s.device.size])
    expect(sizes).toEqual([
      ['', 4096],
      ['0', 1024],
      ['0,1', 2560],
      ['1', 4096],
    ])
    const both = await all(states[2]!.device)
    expect(both[1023]).toBe(1)
    expect(both[1024]).toBe(0) // truncated away, then a hole
    expect(both[2048]).toBe(2)
    await dev.flush()
    expect([...dev.crashStates()].map((s) => s.device.size)).toEqual([2560])
  })

  it('statesAt reconstructs any earlier point', async () => {
    const dev = new CrashDevice(bytes(16, 0))
    await dev.write(0, bytes(1, 1)) // 0
    await dev.flush() // 1
    await dev.write(1, bytes(1, 2)) // 2
    await dev.write(2, bytes(1, 3)) // 3
    await dev.flush() // 4
    await dev.write(3, bytes(1, 4)) // 5
    const at = async (p: number): Promise<Array<[number[], number[]]>> => {
      const out: Array<[number[], number[]]> = []
      for (const s of dev.statesAt(p, { subsets: true })) out.push([s.applied, Array.from((await all(s.device)).subarray(0, 4))])
      return out
    }
    expect(await at(0)).toEqual([[[], [0, 0, 0, 0]]])
    expect(await at(1)).toEqual([
      [[], [0, 0, 0, 0]],
      [[0], [1, 0, 0, 0]],
    ])
    expect(await at(2)).toEqual([[[], [1, 0, 0, 0]]])
    expect(await at(4)).toEqual([
      [[], [1, 0, 0, 0]],
      [[2], [1, 2, 0, 0]],
      [
        [2, 3],
        [1, 2, 3, 0],
      ],
      [[3], [1, 0, 3, 0]],
    ])
    expect(await at(6)).toEqual([
      [[], [1, 2, 3, 0]],
      [[5], [1, 2, 3, 4]],
    ])
    expect([...dev.statesAt(4)].every((s) => s.flushes === 1 && s.point === 4)).toBe(true)
    expect(() => dev.statesAt(7).next()).toThrow(/0\.\.6/)
    expect(dev.epochEnds()).toEqual([1, 4, 6])
  })

  it('allCrashStates covers each epoch once without repeating the durable states', async () => {
    const dev = new CrashDevice(bytes(16, 0))
    await dev.write(0, bytes(1, 1))
    await dev.write(1, bytes(1, 2))
    await dev.flush()
    await dev.write(2, bytes(1, 3))
    await dev.flush()
    await dev.flush()
    await dev.write(3, bytes(1, 4))
    const images: string[] = []
    for (const s of dev.allCrashStates()) images.push(Array.from((await all(s.device)).subarray(0, 4)).join(''))
    expect(images).toEqual(['0000', '1000', '1200', '1230', '1234'])
  })
})

describe('crash sweep property: flushed writes always survive, unflushed ones only in allowed combinations', () => {
  it('random workload', async () => {
    const rng = new Prng(42)
    const slot = 2048
    const slots = 24
    const dev = new CrashDevice(bytes(slot * slots, 0))
    // each write goes to its own slot, so a slot's content says exactly which write landed
    const order = rng.shuffle([...Array(slots).keys()])
    const slotOfSeq = new Map<number, number>()
    for (const [i, s] of order.entries()) {
      slotOfSeq.set(dev.events.length, s)
      await dev.write(s * slot, bytes(slot, i + 1), 'data')
      if (rng.chance(0.3)) await dev.flush()
    }
    const flushIndex = dev.events.filter((e) => e.kind === 'flush').map((e) => e.seq)

    const check = async (st: CrashState): Promise<void> => {
      const img = await all(st.device)
      const lastFlush = st.flushes === 0 ? -1 : flushIndex[st.flushes - 1]!
      expect(st.pending.every((s) => s > lastFlush && s < st.point)).toBe(true)
      if (st.kind !== 'subset') expect(isPrefixOf(st.applied, st.pending)).toBe(true)
      for (const e of dev.events) {
        if (e.kind !== 'write') continue
        const s = slotOfSeq.get(e.seq)!
        const v = e.data[0]!
        const region = img.subarray(s * slot, (s + 1) * slot)
        let expected: (i: number) => number
        if (e.seq < lastFlush || st.applied.includes(e.seq)) expected = () => v
        else if (st.torn?.seq === e.seq) expected = (i) => (s * slot + i >= st.torn!.from && s * slot + i < st.torn!.to ? v : 0)
        else expected = () => 0 // not flushed and not applied, or after the crash point
        for (let i = 0; i < slot; i++) {
          if (region[i] !== expected(i)) throw new Error(`slot ${s} (event #${e.seq}) byte ${i}: ${region[i]} != ${expected(i)}`)
        }
      }
    }

    let n = 0
    for (const st of dev.allCrashStates({ subsets: true, torn: true, exhaustiveLimit: 6, randomSubsets: 8 })) {
      n++
      try {
        await check(st)
      } catch (e) {
        throw new Error(`${st.description}: ${(e as Error).message}`)
      }
    }
    expect(n).toBeGreaterThan(slots)
  })
})

describe('sweepCrashes', () => {
  it('runs the workload once and checks every crash state', async () => {
    const seen: string[] = []
    const { states, device } = await sweepCrashes(
      bytes(1024, 0),
      async (dev) => {
        await dev.write(0, bytes(1, 1))
        await dev.flush()
        await dev.write(1, bytes(1, 2))
      },
      async (st) => {
        seen.push(Array.from(await st.device.read(0, 2)).join(''))
      },
    )
    expect(seen).toEqual(['00', '10', '12'])
    expect(states).toBe(3)
    expect(device.flushCount).toBe(1)
  })

  it('puts the crash state in front of a check failure', async () => {
    await expect(
      sweepCrashes(
        0,
        async (dev) => {
          await dev.write(0, bytes(512, 1), 'refblock')
        },
        async (st) => {
          if (st.applied.length === 1) throw new Error('check found 1 corruption')
        },
      ),
    ).rejects.toThrow(/crash at point 1 .*#0 write refblock 0x0\+0x200.*prefix 1\/1.*:\ncheck found 1 corruption/s)
  })
})
