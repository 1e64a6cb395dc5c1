/**
 * Image locking that QEMU understands.
 *
 * QEMU's file driver (block/file-posix.c) expresses who uses an image with
 * shared open-file-description (OFD) locks on single bytes of the file: byte
 * 100+n while the opener holds permission n, byte 200+n while it refuses to
 * share permission n with anyone else. Before it counts as opened it asks
 * (F_OFD_GETLK for an exclusive lock) whether some other open file locks byte
 * 200+n for a permission n it wants (`Failed to get "write" lock`) or byte
 * 100+n for a permission n it will not share (`Failed to get shared "write"
 * lock`). The permissions (include/block/block-common.h, QEMU 7.2) are
 * n = 0 consistent read, 1 write, 2 write unchanged, 3 resize.
 *
 * What qemu-img 7.2 locks on a qcow2 file, read off strace (see
 * test/locks/qemu-locks.test.ts), is what imgtool takes on every image file:
 *
 *   reader (info*, check, map, compare, cat, convert's source, backing files,
 *           snapshot -l):        bytes 100, 201, 203  (read; share neither write nor resize)
 *   writer (repair, snapshot -c/-a/-d, resize, create, convert's target,
 *           merge, commit):      bytes 100, 101, 103, 201, 203
 *
 * (* qemu-img info leaves byte 100 alone as it reads no guest data; on a raw
 * image qemu-img's map/check/info/resize share write and resize. imgtool
 * keeps the one rule above for every format: it never shares write or resize.)
 *
 * A running VM (or qemu-io) holds a qcow2 image as a writer, so imgtool's
 * readers fail on byte 101 and its writers on byte 201, as qemu-img does; an
 * imgtool writer makes `qemu-img info` and qemu-io fail the same way. `-U`
 * (force share) takes and tests nothing, for read-only opens only.
 *
 * OFD locks belong to an open file, so two opens of one file in one process
 * would lock each other out. This module keeps one lock holder per file
 * (device and inode) per process: a duplicate of the first opener's
 * descriptor that carries the union of what every open of that file in this
 * process asked for, and that tests only other processes' locks; opens inside
 * the process are checked against each other by the same rules, from a table.
 *
 * The locks need the native addon (native/seekhole.c). Without it, or on a
 * filesystem without OFD locks, images are opened without locks.
 */
import { constants as osConstants } from 'node:os'
import { ImageIoError, ImageLockedError } from '../errors.js'
import { seekHoleAddon } from './seek-hole.js'

/** QEMU's BLK_PERM_* bits (7.2). */
export const PERM_CONSISTENT_READ = 0x1
export const PERM_WRITE = 0x2
export const PERM_WRITE_UNCHANGED = 0x4
export const PERM_RESIZE = 0x8
export const PERM_ALL = 0xf
const PERM_NAMES = ['consistent read', 'write', 'write unchanged', 'resize']
const PERM_BITS = PERM_NAMES.length

/** Byte 100 + n: permission n is held. */
export const LOCK_PERM_BASE = 100
/** Byte 200 + n: permission n is not shared. */
export const LOCK_SHARED_BASE = 200

export type LockMode = 'reader' | 'writer'

export interface LockPerms {
  /** permissions held */
  perm: number
  /** permissions shared with other users (the complement is locked) */
  shared: number
}

/** What an open of an image file holds and shares, as qemu-img does on a qcow2 file. */
export function lockPerms(mode: LockMode): LockPerms {
  const unshared = PERM_WRITE | PERM_RESIZE
  const perm = mode === 'writer' ? PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE : PERM_CONSISTENT_READ
  return { perm, shared: PERM_ALL & ~unshared }
}

/** The bytes an opener locks for `p`, ascending: 100+n per held permission, 200+n per unshared one. */
export function lockBytes(p: LockPerms): number[] {
  const out: number[] = []
  for (let n = 0; n < PERM_BITS; n++) if (p.perm & (1 << n)) out.push(LOCK_PERM_BASE + n)
  for (let n = 0; n < PERM_BITS; n++) if (!(p.shared & (1 << n))) out.push(LOCK_SHARED_BASE + n)
  return out
}

/** The primitives of native/seekhole.c, or null where they are missing. */
interface OfdOps {
  ofdLock(fd: number, byte: number, lock: boolean): number
  ofdTest(fd: number, byte: number): number
  dup(fd: number): number
  close(fd: number): number
}

function ofdOps(): OfdOps | null {
  if (process.env['IMGTOOL_NO_LOCKS'] === '1') return null
  const a = seekHoleAddon() as (Partial<OfdOps> & object) | null
  if (!a || typeof a.ofdLock !== 'function' || typeof a.ofdTest !== 'function' || typeof a.dup !== 'function' || typeof a.close !== 'function') {
    return null
  }
  return a as OfdOps
}

/** Whether image locks are available here (the addon was built with OFD locks). */
export function locksAvailable(): boolean {
  return ofdOps() !== null
}

const EAGAIN = 11
const EACCES = 13
/** errnos meaning "this filesystem or platform has no OFD locks": open without locks then. */
const NO_LOCKS = new Set([38 /* ENOSYS */, 95 /* EOPNOTSUPP */, 37 /* ENOLCK */, 22 /* EINVAL */])

interface Holder extends LockPerms {
  readonly path: string
}

/** One file's locks in this process. */
interface Entry {
  readonly key: string
  /** duplicate of the first opener's descriptor: its open file carries the locks */
  readonly fd: number
  readonly holders: Set<Holder>
  /** bytes currently locked through fd */
  readonly locked: Set<number>
}

const entries = new Map<string, Entry>()

/** What an open of the file has taken; release() gives it back (once). */
export interface ImageLock {
  release(): void
}

const NO_LOCK: ImageLock = { release() {} }

function union(holders: Iterable<LockPerms>): LockPerms {
  let perm = 0
  let shared = PERM_ALL
  for (const h of holders) {
    perm |= h.perm
    shared &= h.shared
  }
  return { perm, shared }
}

function conflictError(path: string, n: number, shared: boolean): ImageLockedError {
  const name = PERM_NAMES[n]!
  const what = shared ? `Failed to get shared "${name}" lock` : `Failed to get "${name}" lock`
  return new ImageLockedError(`${path}: ${what}. Is another process using the image [${path}]?`, {
    file: path,
    permission: name,
    byte: (shared ? LOCK_PERM_BASE : LOCK_SHARED_BASE) + n,
  })
}

function errnoName(errno: number): string {
  return Object.entries(osConstants.errno).find(([, v]) => v === errno)?.[0] ?? `errno ${errno}`
}

/** mark a refusal that came from another process's bytes (worth one more try: see acquireImageLock) */
function raced(err: ImageLockedError): ImageLockedError {
  racedRefusals.add(err)
  return err
}
const racedRefusals = new WeakSet<ImageLockedError>()

/** Lock or unlock one byte through `fd`; a conflict or failure is thrown. */
function setByte(ops: OfdOps, fd: number, path: string, byte: number, lock: boolean): 'ok' | 'unsupported' {
  const r = ops.ofdLock(fd, byte, lock)
  if (r === 0) return 'ok'
  if (lock && (r === -EAGAIN || r === -EACCES)) {
    // someone holds an exclusive lock there: QEMU never does, but a conflict it is
    const n = byte >= LOCK_SHARED_BASE ? byte - LOCK_SHARED_BASE : byte - LOCK_PERM_BASE
    throw conflictError(path, n, byte < LOCK_SHARED_BASE)
  }
  if (NO_LOCKS.has(-r)) return 'unsupported'
  throw new ImageIoError(`${path}: ${lock ? 'lock' : 'unlock'} byte ${byte} failed: ${errnoName(-r)}`, errnoName(-r), { file: path, offset: byte })
}

/** Bring the bytes locked through `e.fd` to exactly those of `target`. */
function applyBytes(ops: OfdOps, e: Entry, path: string, target: Set<number>): 'ok' | 'unsupported' {
  for (const b of [...target].sort((x, y) => x - y)) {
    if (e.locked.has(b)) continue
    if (setByte(ops, e.fd, path, b, true) === 'unsupported') return 'unsupported'
    e.locked.add(b)
  }
  for (const b of [...e.locked]) {
    if (target.has(b)) continue
    setByte(ops, e.fd, path, b, false)
    e.locked.delete(b)
  }
  return 'ok'
}

/**
 * Take `mode`'s locks on the open file `fd` (of `path`; `key` names the file,
 * its device and inode). Throws ImageLockedError when another process holds
 * the image in a way this open cannot share (another open in this process
 * included).
 */
export function acquireImageLock(fd: number, path: string, key: string, mode: LockMode): ImageLock {
  // Two openers racing (both lock, then both test) each see the other and would both be refused,
  // as two qemu-imgs are; a conflict with a holder that stays (a VM) is still there after a short,
  // jittered pause, one with a racer that backed off is not. So a refusal is retried twice.
  for (let attempt = 1; ; attempt++) {
    try {
      return acquireOnce(fd, path, key, mode)
    } catch (err) {
      if (!(err instanceof ImageLockedError) || !racedAcquire(err) || attempt >= LOCK_ATTEMPTS) throw err
      sleepSync(LOCK_RETRY_MS * attempt * (1 + Math.random()))
    }
  }
}

/** how often a refused lock is tried in all, and the base pause (ms) before a retry */
const LOCK_ATTEMPTS = 3
const LOCK_RETRY_MS = 20

/** a refusal from another process's lock bytes (not from another open in this process, which cannot race) */
function racedAcquire(err: ImageLockedError): boolean {
  return racedRefusals.has(err)
}

/** block this thread for `ms` milliseconds (opening is synchronous; the pause is short and rare) */
function sleepSync(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms)
}

function acquireOnce(fd: number, path: string, key: string, mode: LockMode): ImageLock {
  const ops = ofdOps()
  if (!ops) return NO_LOCK
  const want: Holder = { path, ...lockPerms(mode) }
  let e = entries.get(key)
  if (e) {
    // other opens of this file in this process: the same rules as between processes
    for (let n = 0; n < PERM_BITS; n++) {
      const bit = 1 << n
      if (want.perm & bit) for (const h of e.holders) if (!(h.shared & bit)) throw conflictError(path, n, false)
    }
    for (let n = 0; n < PERM_BITS; n++) {
      const bit = 1 << n
      if (!(want.shared & bit)) for (const h of e.holders) if (h.perm & bit) throw conflictError(path, n, true)
    }
  } else {
    const dupFd = ops.dup(fd)
    if (dupFd < 0) throw new ImageIoError(`${path}: dup for locking failed: ${errnoName(-dupFd)}`, errnoName(-dupFd), { file: path })
    e = { key, fd: dupFd, holders: new Set(), locked: new Set() }
    entries.set(key, e)
  }
  const entry = e
  const before = new Set(entry.locked)
  const drop = (): void => {
    try {
      applyBytes(ops, entry, path, before)
    } catch {
      // unlocking cannot conflict; a failure here leaves a byte locked until close
    }
    if (entry.holders.size === 0) {
      entries.delete(entry.key)
      ops.close(entry.fd)
    }
  }
  try {
    // as QEMU does: lock first (everything held so far plus this open's bytes), then test
    const target = new Set([...before, ...lockBytes(want)])
    if (applyBytes(ops, entry, path, target) === 'unsupported') {
      drop()
      return NO_LOCK
    }
    for (let n = 0; n < PERM_BITS; n++) {
      if (!(want.perm & (1 << n))) continue
      const r = ops.ofdTest(entry.fd, LOCK_SHARED_BASE + n)
      if (r === 1) throw raced(conflictError(path, n, false))
      if (r < 0 && !NO_LOCKS.has(-r)) throw new ImageIoError(`${path}: lock test failed: ${errnoName(-r)}`, errnoName(-r), { file: path })
    }
    for (let n = 0; n < PERM_BITS; n++) {
      if (want.shared & (1 << n)) continue
      const r = ops.ofdTest(entry.fd, LOCK_PERM_BASE + n)
      if (r === 1) throw raced(conflictError(path, n, true))
      if (r < 0 && !NO_LOCKS.has(-r)) throw new ImageIoError(`${path}: lock test failed: ${errnoName(-r)}`, errnoName(-r), { file: path })
    }
  } catch (err) {
    drop()
    throw err
  }
  entry.holders.add(want)
  let released = false
  return {
    release() {
      if (released) return
      released = true
      entry.holders.delete(want)
      const rest = entry.holders.size > 0 ? new Set(lockBytes(union(entry.holders))) : new Set<number>()
      try {
        applyBytes(ops, entry, path, rest)
      } catch {
        // unlocking cannot conflict; a failure leaves a byte locked until the last close
      }
      if (entry.holders.size === 0) {
        entries.delete(entry.key)
        ops.close(entry.fd)
      }
    },
  }
}
