/**
 * The deliberate differences from qemu-img, each narrow: an invariant plus a
 * condition on what both tools said. EXCEPTIONS.md gives the reasons; every
 * entry here has a section there under the same id.
 */
import type { Mutation } from './mutate.js'
import type { ProcResult } from './proc.js'
import type { CmdResult } from './worker-client.js'

export interface ExceptionContext {
  seed: string
  format: 'qcow2' | 'dmsnap' | 'vpc' | 'vmdk'
  mutations: readonly Mutation[]
  itCheck?: CmdResult
  qCheck?: ProcResult
  itRepair?: CmdResult
  qRepair?: ProcResult
  qAfterIt?: ProcResult
  /** repair-guest: every lost sector was mapped onto a cluster that is metadata in the unmutated seed */
  lostOnSeedMetadata?: boolean
}

export interface FuzzException {
  id: string
  invariant: string
  match(ctx: ExceptionContext, detail: string): boolean
}

export const EXCEPTIONS: FuzzException[] = [
  {
    // EXCEPTIONS.md#x1
    id: 'X1-guest-on-metadata',
    invariant: 'repair-guest',
    match: (ctx) => ctx.format === 'qcow2' && ctx.lostOnSeedMetadata === true,
  },
]

export function matchException(invariant: string, ctx: ExceptionContext, detail: string): string | undefined {
  for (const e of EXCEPTIONS) if (e.invariant === invariant && e.match(ctx, detail)) return e.id
  return undefined
}
