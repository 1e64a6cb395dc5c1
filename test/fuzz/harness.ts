/**
 * One fuzz case: a seed, a list of mutations, imgtool and qemu-img on the same
 * bytes, and the invariants (see README.md in this folder for the list).
 */
import { createHash } from 'node:crypto'
import { copyFileSync, existsSync, mkdirSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { applyMutations, type Mutation } from './mutate.js'
import { runProc, type ProcResult } from './proc.js'
import { IMGTOOL_BIN, type BuiltSeed } from './seeds.js'
import { ImgtoolWorker, type CmdResult } from './worker-client.js'
import { matchException, type ExceptionContext } from './exceptions.js'
import { qcow2Layout, vpcLayout } from './layout.js'

export const INVARIANTS = [
  'error-shape', // stderr: nothing, or one line "imgtool: …", no "internal error", no stack; documented exit code
  'hang', // every command ends within the timeout
  'memory', // peak RSS of a command under the bound
  'readonly', // check/info/map/cat change no byte of any file
  'check-verdict', // imgtool check exit code == qemu-img check exit code
  'info-equal', // qemu-img info opens => imgtool info opens, same virtual size
  'read-refused', // qemu-img convert -O raw reads => imgtool cat reads
  'read-equal', // both read => same bytes
  'repair-guest', // guest bytes qemu-img's repair keeps, imgtool's repair keeps
  'repair-verdict', // after imgtool repair, qemu-img check not corrupt where qemu's repair succeeds / imgtool said clean
  'repair-atomic', // a repair that fails (exit 1) leaves the image as it was
  'repair-selfcheck', // imgtool repair exit 0 => imgtool check exit 0 afterwards
  'dry-run', // repair --dry-run (read-only) exits with check's verdict (or, where only the repair can complete, its starting one)
  'undo', // repair --undo JOURNAL restores the exact bytes
  'cli', // a sample through the real CLI (node bin/imgtool): same shape rules, RSS via /usr/bin/time
] as const
export type Invariant = (typeof INVARIANTS)[number]

export interface FuzzCase {
  seed: string
  mutations: Mutation[]
  /** which command the CLI sample runs (drawn by the runner; a replay keeps it) */
  cliCommand?: 'check' | 'info' | 'cat' | 'map' | 'repair'
}

export interface Outcome {
  invariant: Invariant
  status: 'pass' | 'fail' | 'excepted'
  detail?: string
  /** exception id when excepted */
  exception?: string
}

export interface CaseResult {
  case: FuzzCase
  outcomes: Outcome[]
  ms: number
}

export interface HarnessOptions {
  /** per imgtool command */
  timeoutMs: number
  rssLimitKiB: number
  /** virtual sizes above this are not read whole (cat / convert) */
  maxReadBytes: number
  keep?: boolean
}

export const DEFAULT_OPTIONS: HarnessOptions = { timeoutMs: 60_000, rssLimitKiB: 512 * 1024, maxReadBytes: 64 << 20 }

const md5 = (b: Uint8Array): string => createHash('md5').update(b).digest('hex')

function hashDir(dir: string): Map<string, string> {
  const m = new Map<string, string>()
  for (const f of readdirSync(dir)) {
    const p = join(dir, f)
    if (statSync(p).isFile()) m.set(f, md5(readFileSync(p)))
  }
  return m
}

function diffHashes(a: Map<string, string>, b: Map<string, string>): string[] {
  const out: string[] = []
  for (const [k, v] of a) if (b.get(k) !== v) out.push(b.has(k) ? `${k} changed` : `${k} removed`)
  for (const k of b.keys()) if (!a.has(k)) out.push(`${k} created`)
  return out
}

const QEMU_TIMEOUT = 120_000
const EXIT_CODES = new Set([0, 1, 2, 3, 63])

/** The stderr/exit rules for one imgtool command; undefined when it obeys them. */
/**
 * Check's report lines on stderr are qemu-img's own (ERROR ..., Leaked cluster ..., Can't get refcount ...,
 * Repairing ..., Warning: ...) and imgtool's findings: many shapes, none of them a JavaScript error. A line
 * that reads like one (TypeError: ..., Error: ...) is not a report line.
 */
const NOT_REPORT_LINE = /^\s*(?:[A-Z][A-Za-z]*)?Error(?:\s*\[[A-Z_]+\])?:\s/

export function shapeViolation(
  r: { code: number | null; stderr: string; threw?: string; stray?: string[]; crashed?: string; signal?: string | null },
  isCheck: boolean,
): string | undefined {
  if (r.crashed) return `process died: ${r.crashed}; stderr ${JSON.stringify(r.stderr.slice(0, 300))}`
  if (r.signal) return `killed by ${r.signal}; stderr ${JSON.stringify(r.stderr.slice(0, 300))}`
  if (r.threw) return `main() rejected: ${r.threw.split('\n')[0]}`
  if (r.stray && r.stray.length) return `stray: ${r.stray[0]!.split('\n')[0]}`
  let err = r.stderr.replace(/\n$/, '')
  if (isCheck && err.length) {
    // human check and repair print qemu-img's per-cluster lines and imgtool's findings on stderr, before and
    // after repair's own "imgtool: " line; none may be a JavaScript error, and the rules below hold for the
    // "imgtool: " lines
    const lines = err.split('\n')
    const report = lines.filter((l) => !l.startsWith('imgtool: '))
    const odd = report.find((l) => NOT_REPORT_LINE.test(l))
    if (odd !== undefined) return `a JavaScript error among the report lines: ${JSON.stringify(odd.slice(0, 200))}`
    if (/ERR_[A-Z_]+|\bat .*\(.*:\d+:\d+\)|node:internal|internal error/i.test(report.join('\n'))) return `Node internals in the report lines`
    err = lines.filter((l) => l.startsWith('imgtool: ')).join('\n')
  }
  if (err.length) {
    const lines = err.split('\n')
    if (lines.length > 1) return `stderr has ${lines.length} lines: ${JSON.stringify(err.slice(0, 300))}`
    if (!err.startsWith('imgtool: ')) return `stderr lacks the imgtool: prefix: ${JSON.stringify(err.slice(0, 200))}`
    if (/internal error/i.test(err)) return `internal error: ${err.slice(0, 300)}`
    if (/ERR_[A-Z_]+|\bat .*\(.*:\d+:\d+\)|node:internal/.test(err)) return `Node internals in the message: ${err.slice(0, 300)}`
  }
  if (r.code === null || !EXIT_CODES.has(r.code)) return `exit code ${r.code}`
  if (!isCheck && r.code !== 0 && !err.length) return `exit ${r.code} with nothing on stderr`
  return undefined
}

interface Ctx {
  outcomes: Outcome[]
  exc: ExceptionContext
}

function record(ctx: Ctx, invariant: Invariant, ok: boolean, detail?: string): void {
  if (ok) {
    ctx.outcomes.push({ invariant, status: 'pass' })
    return
  }
  const ex = matchException(invariant, ctx.exc, detail ?? '')
  ctx.outcomes.push(ex ? { invariant, status: 'excepted', detail, exception: ex } : { invariant, status: 'fail', detail })
}

function copyDir(from: string, to: string): void {
  mkdirSync(to, { recursive: true })
  for (const f of readdirSync(from)) if (statSync(join(from, f)).isFile()) copyFileSync(join(from, f), join(to, f))
}

function jsonOr<T>(s: string): T | undefined {
  try {
    return JSON.parse(s) as T
  } catch {
    return undefined
  }
}

interface MapEntry {
  start: number
  length: number
  depth: number
  offset?: number
}

/**
 * Whether every lost guest sector was, in the mutant, mapped (by qemu-img map)
 * onto a host cluster that holds metadata in the unmutated seed: guest bytes
 * that were never guest data, only an entry bent to point at a table.
 */
async function lostOnSeedMetadata(cwd: string, main: string, seedBytes: Uint8Array, lostAt: number[]): Promise<boolean> {
  const m = await runProc('qemu-img', ['map', '--output=json', '-f', 'qcow2', main], { timeoutMs: QEMU_TIMEOUT, cwd })
  if (m.code !== 0) return false
  const entries = jsonOr<MapEntry[]>(m.stdout.toString('utf8'))
  if (!entries) return false
  const seed = qcow2Layout(seedBytes)
  const cs = seed.clusterSize
  const meta = seed.regions.map((g) => ({ lo: Math.floor(g.offset / cs) * cs, hi: g.offset + g.length }))
  for (const g of lostAt) {
    const e = entries.find((x) => g >= x.start && g < x.start + x.length)
    if (!e || e.depth !== 0 || e.offset === undefined) return false
    const host = e.offset + (g - e.start)
    if (!meta.some((r) => host >= r.lo && host < r.hi)) return false
  }
  return true
}

/**
 * VHD: whether every lost guest sector lies in a block whose BAT entry, in the mutant, maps it over the
 * seed's footer at 0, dynamic header or BAT: a block bent onto metadata, whose bytes were never its data.
 */
function vpcLostOnSeedMetadata(mutant: Uint8Array, seedBytes: Uint8Array, lostAt: number[]): boolean {
  const dv = new DataView(mutant.buffer, mutant.byteOffset, mutant.byteLength)
  if (mutant.length < 512) return false
  const hdr = Number(dv.getBigUint64(16))
  if (!Number.isSafeInteger(hdr) || hdr + 1024 > mutant.length) return false
  const bs = dv.getUint32(hdr + 32)
  const bat = Number(dv.getBigUint64(hdr + 16))
  const entries = dv.getUint32(hdr + 28)
  if (bs < 4096 || (bs & (bs - 1)) !== 0 || !Number.isSafeInteger(bat)) return false
  const unit = Math.ceil(bs / 4096 / 512) * 512 + bs
  const meta = vpcLayout(seedBytes).regions.filter((g) => g.name === 'header' || g.name === 'dynamic header' || g.name === 'BAT')
  for (const g of lostAt) {
    const k = Math.floor(g / bs)
    if (k >= entries || bat + 4 * k + 4 > mutant.length) return false
    const v = dv.getUint32(bat + 4 * k)
    if (v === 0xffff_ffff) return false
    const start = v * 512
    if (!meta.some((m) => start < m.offset + m.length && m.offset < start + unit)) return false
  }
  return true
}

export class Harness {
  readonly worker: ImgtoolWorker
  constructor(
    readonly opts: HarnessOptions,
    private readonly workRoot: string,
  ) {
    this.worker = new ImgtoolWorker(opts.rssLimitKiB)
  }

  close(): void {
    this.worker.close()
  }

  async runCase(seed: BuiltSeed, fc: FuzzCase, index: number): Promise<CaseResult> {
    const started = Date.now()
    const rec = seed.recipe
    const isQ = rec.format === 'qcow2'
    // the formats qemu-img opens (dm-snapshot it does not), and those it checks (it has no check for vpc)
    const qFmt = rec.format === 'dmsnap' ? undefined : rec.format
    const qChecks = rec.format === 'qcow2' || rec.format === 'vmdk'
    const dir = join(this.workRoot, `case-${index}`)
    rmSync(dir, { recursive: true, force: true })
    const r = join(dir, 'r')
    copyDir(seed.dir, r)
    rmSync(join(r, '.done'), { force: true })
    const seedBytes = readFileSync(join(seed.dir, rec.main))
    const mutant = applyMutations(seedBytes, fc.mutations)
    writeFileSync(join(r, rec.main), mutant)
    const mutantMd5 = md5(mutant)
    const fmt = qFmt ? ['-f', qFmt] : ['-f', 'dmsnap', '--origin', rec.origin!]
    const ctx: Ctx = { outcomes: [], exc: { seed: rec.name, format: rec.format, mutations: fc.mutations } }
    const timeoutMs = this.opts.timeoutMs
    const shapes: string[] = []
    const hangs: string[] = []
    const mem: string[] = []
    const it = async (argv: string[], cwd: string, stdoutFile?: string): Promise<CmdResult> => {
      const res = await this.worker.run(argv, cwd, { timeoutMs, stdoutFile })
      const name = argv[0]!
      if (res.timedOut) hangs.push(`${argv.join(' ')}: no answer after ${timeoutMs} ms`)
      else {
        // check and repair (and its dry run) report verdicts through exit codes 2/3 with nothing on stderr
        const v = shapeViolation(res, (name === 'check' && !argv.includes('-r')) || (name === 'repair' && !argv.includes('--undo')))
        if (v) shapes.push(`${argv.join(' ')}: ${v}`)
      }
      if (res.maxRssKiB > this.opts.rssLimitKiB) mem.push(`${argv.join(' ')}: peak RSS ${Math.round(res.maxRssKiB / 1024)} MiB`)
      return res
    }
    const qemu = (args: string[], cwd: string): Promise<ProcResult> => runProc('qemu-img', args, { timeoutMs: QEMU_TIMEOUT, cwd })

    // --- read-only commands ------------------------------------------------
    const before = hashDir(r)
    const itCheck = await it(['check', '--output', 'json', ...fmt, rec.main], r)
    const itInfo = await it(['info', '--output', 'json', ...fmt, rec.main], r)
    let qCheck: ProcResult | undefined
    let qInfo: ProcResult | undefined
    if (qFmt) {
      if (qChecks) qCheck = await qemu(['check', '--output=json', '-f', qFmt, rec.main], r)
      qInfo = await qemu(['info', '--output=json', '-f', qFmt, rec.main], r)
    }
    ctx.exc.itCheck = itCheck
    ctx.exc.qCheck = qCheck
    const itVsize = jsonOr<{ 'virtual-size'?: number }>(itInfo.stdout)?.['virtual-size']
    const qVsize = qInfo && qInfo.code === 0 ? jsonOr<{ 'virtual-size'?: number }>(qInfo.stdout.toString('utf8'))?.['virtual-size'] : undefined
    const sizeOk = Math.max(itVsize ?? 0, qVsize ?? 0) <= this.opts.maxReadBytes
    if (sizeOk) await it(['map', '--output', 'json', ...fmt, rec.main], r)
    let itCat: CmdResult | undefined
    let qConv: ProcResult | undefined
    const itRaw = join(dir, 'it.raw')
    const qRaw = join(dir, 'q.raw')
    if (sizeOk) {
      itCat = await it(['cat', ...fmt, rec.main], r, itRaw)
      if (qFmt) qConv = await qemu(['convert', '-f', qFmt, '-O', 'raw', rec.main, qRaw], r)
    }
    const itDry = await it(['repair', '--dry-run', ...fmt, rec.main], r)
    const after = hashDir(r)
    const changed = diffHashes(before, after)
    record(ctx, 'readonly', changed.length === 0, `read-only commands changed files: ${changed.join(', ')}`)

    if (qChecks && qCheck && !qCheck.timedOut && !itCheck.timedOut) {
      const qs = qCheck.stderr.trim().split('\n')[0] ?? ''
      record(
        ctx,
        'check-verdict',
        itCheck.code === qCheck.code,
        `imgtool check ${itCheck.code}, qemu-img check ${qCheck.code}${qs ? ` (${qs})` : ''}${itCheck.stderr ? `; imgtool: ${itCheck.stderr.trim().slice(0, 200)}` : ''}`,
      )
    }
    if (qFmt && qInfo && !qInfo.timedOut && !itInfo.timedOut && qInfo.code === 0) {
      const ok = itInfo.code === 0 && itVsize === qVsize
      record(
        ctx,
        'info-equal',
        ok,
        itInfo.code !== 0
          ? `qemu-img info opens it, imgtool info exit ${itInfo.code}: ${itInfo.stderr.trim().slice(0, 200)}`
          : `virtual-size imgtool ${itVsize}, qemu-img ${qVsize}`,
      )
    }
    let bothReadEqual = false
    if (qFmt && itCat && qConv && !qConv.timedOut && !itCat.timedOut) {
      if (qConv.code === 0) {
        record(ctx, 'read-refused', itCat.code === 0, `qemu-img convert reads it, imgtool cat exit ${itCat.code}: ${itCat.stderr.trim().slice(0, 200)}`)
        if (itCat.code === 0) {
          const a = readFileSync(itRaw)
          const b = readFileSync(qRaw)
          let detail = ''
          if (a.length !== b.length) detail = `length imgtool ${a.length}, qemu-img ${b.length}`
          else if (!a.equals(b)) {
            let first = 0
            while (a[first] === b[first]) first++
            let n = 0
            for (let i = 0; i < a.length; i += 512) if (!a.subarray(i, i + 512).equals(b.subarray(i, i + 512))) n++
            detail = `${n} sectors differ, first at guest 0x${first.toString(16)}`
          }
          record(ctx, 'read-equal', detail === '', detail)
          bothReadEqual = detail === ''
        }
      }
    }

    // --- repair ---------------------------------------------------------------
    const i = join(dir, 'i')
    copyDir(r, i)
    const journal = join(dir, 'j.undo')
    const itRepair = await it(['repair', '--journal', journal, ...fmt, rec.main], i)
    ctx.exc.itRepair = itRepair
    const repaired = readFileSync(join(i, rec.main))
    const changedByRepair = md5(repaired) !== mutantMd5
    if (!itRepair.timedOut) {
      record(
        ctx,
        'repair-atomic',
        !(itRepair.code === 1 && changedByRepair),
        `imgtool repair failed (exit 1: ${itRepair.stderr.trim().slice(0, 200)}) after changing the image`,
      )
      // a dry run exits with the image's check verdict; where check cannot complete (1) but the repair
      // can (it rewrites what stopped the check), the dry run gives the verdict the repair starts from;
      // a dry run is the repair rehearsed in memory, so where the repair refuses (exit 1, nothing
      // written) the dry run refuses with the same first line
      const firstLine = (s: string): string => s.split('\n')[0] ?? ''
      const sameRefusal = itDry.code === 1 && itRepair.code === 1 && !changedByRepair && firstLine(itDry.stderr) === firstLine(itRepair.stderr)
      if (!itDry.timedOut && !itCheck.timedOut)
        record(
          ctx,
          'dry-run',
          itDry.code === itCheck.code || (itCheck.code === 1 && itRepair.code !== 1) || sameRefusal,
          `repair --dry-run exit ${itDry.code} (${itDry.stderr.trim().slice(0, 200)}), check exit ${itCheck.code}, repair exit ${itRepair.code}`,
        )
      if (itRepair.code === 0) {
        const self = await it(['check', '--output', 'json', ...fmt, rec.main], i)
        if (!self.timedOut) record(ctx, 'repair-selfcheck', self.code === 0, `imgtool repair exit 0, then imgtool check exit ${self.code}`)
      }
    }
    // imgtool's repair left the bytes as they were and qemu-img does not call them corrupt: qemu-img
    // check after it is the check already run on these bytes (not 2, so repair-verdict holds whatever
    // qemu-img's own repair does), and no guest byte changed (repair-guest holds): qemu-img's repair and
    // the two conversions are not needed
    const unchangedNotCorrupt = isQ && !itRepair.timedOut && !changedByRepair && qCheck !== undefined && !qCheck.timedOut && qCheck.code !== 2
    if (unchangedNotCorrupt) {
      record(ctx, 'repair-verdict', true, '')
      if (qConv && qConv.code === 0 && sizeOk) record(ctx, 'repair-guest', true, '')
    } else if (isQ && !itRepair.timedOut) {
      const q = join(dir, 'q')
      copyDir(r, q)
      const qRepair = await qemu(['check', '-r', 'all', '-f', 'qcow2', rec.main], q)
      const qAfterIt = await qemu(['check', '-f', 'qcow2', rec.main], i)
      ctx.exc.qRepair = qRepair
      ctx.exc.qAfterIt = qAfterIt
      if (!qRepair.timedOut && !qAfterIt.timedOut) {
        const qemuRepairOk = qRepair.code === 0 || qRepair.code === 3
        const bad = (qAfterIt.code === 2 && (qemuRepairOk || itRepair.code === 0)) || (qAfterIt.code === 1 && qCheck?.code !== 1 && qemuRepairOk)
        record(
          ctx,
          'repair-verdict',
          !bad,
          `after imgtool repair (exit ${itRepair.code}) qemu-img check exit ${qAfterIt.code} (${(qAfterIt.stdout.toString('utf8') + qAfterIt.stderr).trim().split('\n')[0]?.slice(0, 160)}); qemu-img check -r all exit ${qRepair.code}`,
        )
      }
      // guest bytes: those qemu-img's repair keeps must survive imgtool's
      if (qConv && qConv.code === 0 && !qRepair.timedOut && sizeOk) {
        const qbRaw = join(dir, 'qb.raw')
        const qaRaw = join(dir, 'qa.raw')
        const cb = await qemu(['convert', '-f', 'qcow2', '-O', 'raw', rec.main, qbRaw], q)
        if (cb.code === 0) {
          const ca = await qemu(['convert', '-f', 'qcow2', '-O', 'raw', rec.main, qaRaw], i)
          const orig = readFileSync(qRaw)
          const qb = readFileSync(qbRaw)
          if (ca.code !== 0) {
            record(ctx, 'repair-guest', false, `qemu-img reads the image after its own repair, not after imgtool's (${ca.stderr.trim().slice(0, 160)})`)
          } else {
            const qa = readFileSync(qaRaw)
            let lost = 0
            let first = -1
            const lostAt: number[] = []
            const n = Math.min(orig.length, qb.length)
            for (let o = 0; o < n; o += 512) {
              const so = orig.subarray(o, o + 512)
              if (!so.equals(qb.subarray(o, o + 512))) continue // qemu-img changed it too
              if (!so.equals(qa.subarray(o, o + 512))) {
                lost++
                if (first < 0) first = o
                lostAt.push(o)
              }
            }
            if (lost > 0) ctx.exc.lostOnSeedMetadata = await lostOnSeedMetadata(r, rec.main, seedBytes, lostAt)
            record(
              ctx,
              'repair-guest',
              lost === 0,
              `${lost} sectors (${lost * 512} bytes) that qemu-img's repair keeps changed by imgtool's repair, first at guest 0x${first.toString(16)}; guest size ${orig.length} -> ${qa.length}`,
            )
          }
        }
      }
    }
    // VHD and VMDK: qemu-img has no repair to compare with (and no check for vpc). imgtool's repairs of these
    // formats change no guest byte: where both tools read the mutant alike, qemu-img reads the same bytes after
    // imgtool's repair; and where imgtool says the repair succeeded, qemu-img's check (vmdk) does not call the
    // image corrupt.
    if (!isQ && qFmt && !itRepair.timedOut && changedByRepair) {
      if (bothReadEqual) {
        const qaRaw = join(dir, 'qa.raw')
        const ca = await qemu(['convert', '-f', qFmt, '-O', 'raw', rec.main, qaRaw], i)
        if (!ca.timedOut) {
          let detail = ''
          if (ca.code !== 0)
            detail = `qemu-img read the mutant, not the image after imgtool's repair (exit ${itRepair.code}): ${ca.stderr.trim().slice(0, 160)}`
          else {
            const orig = readFileSync(qRaw)
            const qa = readFileSync(qaRaw)
            let lost = 0
            let first = -1
            const lostAt: number[] = []
            for (let o = 0; o < Math.max(orig.length, qa.length); o += 512) {
              if (orig.subarray(o, o + 512).equals(qa.subarray(o, o + 512))) continue
              lost++
              if (first < 0) first = o
              lostAt.push(o)
            }
            if (lost > 0 && rec.format === 'vpc') ctx.exc.lostOnSeedMetadata = vpcLostOnSeedMetadata(mutant, seedBytes, lostAt)
            if (lost)
              detail = `${lost} sectors changed by imgtool's repair (exit ${itRepair.code}), first at guest 0x${first.toString(16)}; guest size ${orig.length} -> ${qa.length}`
          }
          record(ctx, 'repair-guest', detail === '', detail)
        }
      }
      if (qChecks && itRepair.code === 0) {
        const qAfterIt = await qemu(['check', '-f', qFmt, rec.main], i)
        ctx.exc.qAfterIt = qAfterIt
        if (!qAfterIt.timedOut)
          record(
            ctx,
            'repair-verdict',
            qAfterIt.code !== 2 && !(qAfterIt.code === 1 && qCheck?.code !== 1),
            `after imgtool repair (exit 0) qemu-img check exit ${qAfterIt.code} (${(qAfterIt.stdout.toString('utf8') + qAfterIt.stderr).trim().split('\n')[0]?.slice(0, 160)})`,
          )
      }
    }
    // --- undo -------------------------------------------------------------------
    if (!itRepair.timedOut && changedByRepair) {
      if (!existsSync(journal)) record(ctx, 'undo', false, `repair changed the image (exit ${itRepair.code}) and left no journal at ${journal}`)
      else {
        const u = await it(['repair', '--undo', journal, ...fmt, rec.main], i)
        const restored = md5(readFileSync(join(i, rec.main)))
        record(
          ctx,
          'undo',
          u.code === 0 && restored === mutantMd5,
          `repair --undo exit ${u.code} (${u.stderr.trim().slice(0, 160)}); bytes ${restored === mutantMd5 ? 'restored' : 'NOT restored'}`,
        )
      }
    }

    // --- the real CLI, one command ---------------------------------------------
    if (fc.cliCommand) {
      const c = fc.cliCommand
      const cwd = c === 'repair' ? join(dir, 'c') : r
      if (c === 'repair') copyDir(r, cwd)
      const args =
        c === 'repair'
          ? ['repair', '--no-journal', ...fmt, rec.main]
          : c === 'cat'
            ? ['cat', ...fmt, rec.main]
            : c === 'check'
              ? ['check', ...fmt, rec.main]
              : [c, '--output', 'json', ...fmt, rec.main]
      if (c !== 'cat' || sizeOk) {
        const pr = await runProc(process.execPath, [IMGTOOL_BIN, ...args], {
          timeoutMs,
          cwd,
          measureRss: true,
          stdoutLimit: 1 << 20,
          env: { ...process.env, IMGTOOL_DEBUG: '' },
        })
        if (pr.timedOut) hangs.push(`node bin/imgtool ${args.join(' ')}: killed after ${timeoutMs} ms`)
        else {
          const v = shapeViolation({ code: pr.code, stderr: pr.stderr, signal: pr.signal }, c === 'check' || c === 'repair')
          record(ctx, 'cli', v === undefined, `node bin/imgtool ${args.join(' ')}: ${v}`)
          if (pr.maxRssKiB !== undefined && pr.maxRssKiB > this.opts.rssLimitKiB)
            mem.push(`node bin/imgtool ${args.join(' ')}: peak RSS ${Math.round(pr.maxRssKiB / 1024)} MiB`)
        }
      }
    }

    record(ctx, 'error-shape', shapes.length === 0, shapes.join(' | '))
    record(ctx, 'hang', hangs.length === 0, hangs.join(' | '))
    record(ctx, 'memory', mem.length === 0, mem.join(' | '))
    if (!this.opts.keep) rmSync(dir, { recursive: true, force: true })
    return { case: fc, outcomes: ctx.outcomes, ms: Date.now() - started }
  }
}
