/**
 * Work that must run one piece at a time, in the order it was asked for: each piece starts when the one
 * before it has ended, whether that one succeeded or failed (its failure goes to its own caller only).
 */
export class Turns {
  private last: Promise<unknown> = Promise.resolve()

  /** run `work` after everything asked for before it; its result or failure */
  run<T>(work: () => Promise<T>): Promise<T> {
    const turn = this.last.then(work)
    this.last = turn.catch(() => undefined)
    return turn
  }

  /** settles when everything asked for so far has ended (never rejects) */
  idle(): Promise<unknown> {
    return this.last
  }
}
