/**
 * Serialises operations that touch metadata on one open image (seed:
 * dm-snapshot header race: two writers must never interleave their metadata
 * updates). FIFO: operations run in the order they were called.
 *
 * `run` is exclusive. `shared` is for guest reads of an image open for
 * writing: shared operations run alongside each other but never alongside an
 * exclusive one, so a read never maps a cluster that a write, discard or
 * snapshot delete is freeing and reusing under it. Order stays FIFO: a shared
 * operation called after an exclusive one waits for it, and an exclusive one
 * waits for every shared operation called before it.
 */
export class Mutex {
  /** completion of the last exclusive operation */
  private lastExclusive: Promise<unknown> = Promise.resolve()
  /** shared operations called since it and not finished yet */
  private readonly sharedSince = new Set<Promise<unknown>>()
  private held = 0
  private sharedHeld = 0
  /** operations called so far (run and shared) */
  private calls = 0

  run<T>(fn: () => Promise<T>): Promise<T> {
    const before = this.sharedSince.size === 0 ? this.lastExclusive : Promise.all([this.lastExclusive, ...this.sharedSince])
    this.calls++
    const result = before.then(async () => {
      this.held++
      try {
        return await fn()
      } finally {
        this.held--
      }
    })
    this.lastExclusive = result.catch(() => undefined)
    this.sharedSince.clear()
    return result
  }

  shared<T>(fn: () => Promise<T>): Promise<T> {
    this.calls++
    const result = this.lastExclusive.then(async () => {
      this.sharedHeld++
      try {
        return await fn()
      } finally {
        this.sharedHeld--
      }
    })
    const done: Promise<unknown> = result.then(
      () => this.sharedSince.delete(done),
      () => this.sharedSince.delete(done),
    )
    this.sharedSince.add(done)
    return result
  }

  /** true while an exclusive operation is running (for assertions in tests). */
  get locked(): boolean {
    return this.held > 0
  }

  /**
   * Operations called so far: an operation that admits more work while it
   * runs (the write pipeline) stops admitting once this moved past its own
   * call, so what was called later still runs later (FIFO).
   */
  get called(): number {
    return this.calls
  }

  /** true while a shared operation (a guest read) is running. */
  get readers(): number {
    return this.sharedHeld
  }
}
