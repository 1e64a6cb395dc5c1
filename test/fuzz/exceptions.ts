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
  {
    // EXCEPTIONS.md#x3
    id: 'X3-vhd-block-on-metadata',
    invariant: 'repair-guest',
    match: (ctx) => ctx.format === 'vpc' && ctx.lostOnSeedMetadata === true,
  },
  // EXCEPTIONS.md#x2: a VHD footer at 0 that says fixed; qemu-img reads the file 1:1 from 0, metadata as guest data
  ...(['info-equal', 'read-refused'] as const).map((invariant): FuzzException => ({
    id: 'X2-vhd-fixed-footer-at-0',
    invariant,
    match: (ctx, detail) => ctx.format === 'vpc' && /footer at 0x0: disk type 2 \(fixed\) at the start of the file/.test(detail),
  })),
  // EXCEPTIONS.md#x4: a VMDK descriptor line that decides what is read (CID, parentCID, parentFileNameHint,
  // a descriptor file's createType and extent lines) is refused when malformed, where qemu-img guesses
  ...(['check-verdict', 'info-equal', 'read-refused'] as const).map((invariant) => ({
    id: 'X4-vmdk-deciding-descriptor-line',
    invariant,
    match: (ctx: ExceptionContext, d: string) =>
      ctx.format === 'vmdk' && /vmdk: [^:]+: ((embedded )?descriptor line \d+: |descriptor: no extent lines)/.test(d),
  })),
  // EXCEPTIONS.md#x5: a VMDK capacity QEMU cannot address (its grain directory size wraps in 32 bits)
  ...(['check-verdict', 'info-equal', 'read-refused'] as const).map((invariant) => ({
    id: 'X5-vmdk-capacity-wraps',
    invariant,
    match: (ctx: ExceptionContext, d: string) =>
      ctx.format === 'vmdk' && /vmdk: .*(header capacity .*too large \(above 2\^53\)|capacity \d+ sectors needs \d+ grain directory entries)/.test(d),
  })),
]

export function matchException(invariant: string, ctx: ExceptionContext, detail: string): string | undefined {
  for (const e of EXCEPTIONS) if (e.invariant === invariant && e.match(ctx, detail)) return e.id
  return undefined
}
