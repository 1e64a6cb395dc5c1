import { describe, expect, it } from 'vitest'
import { CrashGroup } from '../../support/crash-group.js'

const bytes = (n: number, v: number): Uint8Array => new Uint8Array(n).fill(v)

async function first(dev: { read(o: number, l: number): Promise<Uint8Array> }, offset = 0): Promise<number> {
  return (await dev.read(offset, 1))[0]!
}

describe('CrashGroup', () => {
  it('reads see pending writes; a flush makes only its own file durable', async () => {
    const g = new CrashGroup()
    const img = g.add('img.qcow2', bytes(1024, 0))
    const data = g.add('img.data', bytes(1024, 0))
    await data.write(0, bytes(512, 7), 'data')
    await img.write(0, bytes(8, 1), 'l2')
    expect(await first(data)).toBe(7)
    await img.flush()
    expect(g.flushCount).toBe(1)
    // after the image's flush, the data write may still be lost while the image write is durable
    const states = [...g.allCrashStates()]
    const last = states.filter((s) => s.flushes === 1)
    expect(last.some((s) => s.devices[0]!.snapshot()[0] === 1 && s.devices[1]!.snapshot()[0] === 0)).toBe(true)
    expect(last.every((s) => s.devices[0]!.snapshot()[0] === 1)).toBe(true)
  })

  it('flushing the data file first keeps every state where the image write landed consistent', async () => {
    const g = new CrashGroup()
    const img = g.add('img.qcow2', bytes(1024, 0))
    const data = g.add('img.data', bytes(1024, 0))
    await data.write(0, bytes(512, 7), 'data')
    await data.flush()
    await img.write(0, bytes(8, 1), 'l2')
    await img.flush()
    await img.write(8, bytes(8, 2), 'l2')
    for (const s of g.allCrashStates({ subsets: true, torn: true })) {
      const [i, d] = [s.devices[0]!.snapshot(), s.devices[1]!.snapshot()]
      if (i[0] === 1) expect(d[0], s.description).toBe(7)
      if (s.flushes >= 1) expect(d[0], s.description).toBe(7)
      if (s.flushes >= 2) expect(i[0], s.description).toBe(1)
    }
  })

  it('expands subsets and torn writes over the pending events of both files', async () => {
    const g = new CrashGroup()
    const img = g.add('img.qcow2', 0)
    const data = g.add('img.data', 0)
    await data.write(0, bytes(1536, 5), 'data')
    await img.write(0, bytes(512, 1), 'l2')
    const states = [...g.allCrashStates({ subsets: true, torn: true, tornTail: true })]
    // the image write alone (a subset that is not a prefix)
    expect(states.some((s) => s.kind === 'subset' && s.applied.length === 1 && s.applied[0] === 1)).toBe(true)
    // the data write torn at 512 and 1024, head and tail
    const torn = states.filter((s) => s.kind === 'torn').map((s) => Array.from(s.devices[1]!.snapshot()).map((b) => (b === 5 ? 1 : 0)))
    expect(torn.length).toBe(4)
    expect(torn.some((t) => t.length === 512 && t.every((b) => b === 1))).toBe(true)
    expect(torn.some((t) => t.length === 1536 && t[0] === 0 && t[1535] === 1)).toBe(true)
  })

  it('yields no two states with the same bytes and the same flushes', async () => {
    const g = new CrashGroup()
    const img = g.add('img.qcow2', bytes(1024, 0))
    const data = g.add('img.data', bytes(1024, 0))
    for (let i = 0; i < 3; i++) {
      await data.write(i * 100, bytes(100, i + 1))
      await img.write(i * 8, bytes(8, i + 1))
      await data.flush()
      await img.flush()
    }
    const seen = new Set<string>()
    let n = 0
    for (const s of g.allCrashStates({ subsets: true, torn: true })) {
      const key = `${Buffer.from(s.devices[0]!.snapshot()).toString('hex')}|${Buffer.from(s.devices[1]!.snapshot()).toString('hex')}|${s.flushes}`
      expect(seen.has(key), s.description).toBe(false)
      seen.add(key)
      n++
    }
    expect(n).toBeGreaterThan(6)
  })

  it('truncates are pending events too, and closed members refuse I/O', async () => {
    const g = new CrashGroup()
    const data = g.add('img.data', bytes(4096, 1))
    await data.truncate(1024)
    expect(data.size).toBe(1024)
    const sizes = new Set([...g.allCrashStates()].map((s) => s.devices[0]!.size))
    expect(sizes).toEqual(new Set([4096, 1024]))
    await data.close()
    await expect(data.write(0, bytes(1, 1))).rejects.toThrow(/closed/)
  })
})
