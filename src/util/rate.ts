/**
 * A rate limit in bytes per second, as QEMU's ratelimit.h counts it (qemu-img convert -r, commit -r): time
 * goes in slices of 100 ms, each allowing speed / 10 bytes; a request that finds its slice's quota used
 * waits for the slices it has overrun. The clock and the wait are injectable (tests use a fake clock).
 */
export interface RateClock {
  now(): number // milliseconds
  sleep(ms: number): Promise<void>
}

const realClock: RateClock = {
  now: () => performance.now(),
  sleep: (ms) => new Promise((resolve) => setTimeout(resolve, ms)),
}

const SLICE_MS = 100

export class RateLimiter {
  private sliceEnd = -Infinity
  private dispatched = 0
  private readonly quota: number

  /** `bytesPerSecond` > 0 */
  constructor(
    readonly bytesPerSecond: number,
    private readonly clock: RateClock = realClock,
  ) {
    this.quota = (bytesPerSecond * SLICE_MS) / 1000
  }

  /** The wait before `n` more bytes may go (0: now), as ratelimit_calculate_delay; counts them when 0. */
  delay(n: number): number {
    const now = this.clock.now()
    if (this.sliceEnd < now) {
      this.sliceEnd = now + SLICE_MS
      this.dispatched = 0
    }
    const slices = this.dispatched / this.quota
    if (slices >= 1) return this.sliceEnd - now + (Math.floor(slices) - 1) * SLICE_MS
    this.dispatched += n
    return 0
  }

  /** Wait until `n` bytes may go, then count them (after a wait, in a slice of their own). */
  async take(n: number): Promise<void> {
    const d = this.delay(n)
    if (d <= 0) return
    await this.clock.sleep(d)
    this.sliceEnd = this.clock.now() + SLICE_MS
    this.dispatched = n
  }
}
