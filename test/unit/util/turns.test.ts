import { describe, expect, it } from 'vitest'
import { Turns } from '../../../src/util/turns.js'

const later = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms))

describe('Turns', () => {
  it('runs work one piece at a time in the order asked, even when later pieces are quicker', async () => {
    const turns = new Turns()
    const log: string[] = []
    let inFlight = 0
    let most = 0
    const piece = (name: string, ms: number) => async (): Promise<string> => {
      inFlight += 1
      most = Math.max(most, inFlight)
      log.push(`start ${name}`)
      await later(ms)
      log.push(`end ${name}`)
      inFlight -= 1
      return name
    }
    const results = await Promise.all([turns.run(piece('a', 30)), turns.run(piece('b', 1)), turns.run(piece('c', 10))])
    expect(results).toEqual(['a', 'b', 'c'])
    expect(most).toBe(1)
    expect(log).toEqual(['start a', 'end a', 'start b', 'end b', 'start c', 'end c'])
  })

  it('gives a failure to its own caller only; the next piece still runs and idle() never rejects', async () => {
    const turns = new Turns()
    const first = turns.run(async () => {
      await later(5)
      throw new Error('first failed')
    })
    const second = turns.run(async () => 'second ran')
    await expect(first).rejects.toThrow('first failed')
    await expect(second).resolves.toBe('second ran')
    const last = turns.run(async () => {
      throw new Error('last failed')
    })
    await expect(last).rejects.toThrow('last failed')
    // idle() after a failed last piece settles without rejecting
    let idleFailed = false
    await turns.idle().catch(() => {
      idleFailed = true
    })
    expect(idleFailed).toBe(false)
  })

  it('idle() waits for everything asked so far', async () => {
    const turns = new Turns()
    let done = 0
    for (let i = 0; i < 3; i++) {
      void turns.run(async () => {
        await later(5)
        done += 1
      })
    }
    await turns.idle()
    expect(done).toBe(3)
  })
})
