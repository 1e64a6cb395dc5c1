/**
 * Serialises operations that touch metadata on one open image (seed:
 * dm-snapshot header race: two writers must never interleave their metadata
 * updates). FIFO: operations run in the order they were called.
 */
export class Mutex {
  private tail: Promise<unknown> = Promise.resolve()
  private held = 0

  run<T>(fn: () => Promise<T>): Promise<T> {
    const result = this.tail.then(async () => {
      this.held++
      try {
        return await fn()
      } finally {
        this.held--
      }
    })
    this.tail = result.catch(() => undefined)
    return result
  }

  /** true while an operation is running (for assertions in tests). */
  get locked(): boolean {
    return this.held > 0
  }
}
