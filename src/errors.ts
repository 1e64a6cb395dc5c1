/**
 * Thrown errors mean "the operation could not be done". Findings (what is wrong
 * with an image) are data returned by check, never thrown.
 *
 * Message style: `<format>: <facts>`, offsets in hex, expected vs found.
 */
export type ErrorCode =
  'USAGE' | 'NOT_FOUND' | 'WRONG_FORMAT' | 'UNSUPPORTED' | 'CORRUPT' | 'IO' | 'READ_ONLY' | 'NO_SPACE' | 'LOCKED' | 'INTERNAL' | 'INTERRUPTED'

export interface ErrorDetails {
  file?: string
  structure?: string
  offset?: number
  [key: string]: unknown
}

export class ImgtoolError extends Error {
  readonly code: ErrorCode
  readonly details: ErrorDetails
  constructor(code: ErrorCode, message: string, details: ErrorDetails = {}, options?: { cause?: unknown }) {
    super(message, options)
    this.name = new.target.name
    this.code = code
    this.details = details
  }
}

export class UsageError extends ImgtoolError {
  constructor(message: string, details: ErrorDetails = {}) {
    super('USAGE', message, details)
  }
}

export class NotFoundError extends ImgtoolError {
  constructor(message: string, details: ErrorDetails = {}) {
    super('NOT_FOUND', message, details)
  }
}

export class WrongFormatError extends ImgtoolError {
  constructor(message: string, details: ErrorDetails = {}) {
    super('WRONG_FORMAT', message, details)
  }
}

export class UnsupportedFeatureError extends ImgtoolError {
  constructor(message: string, details: ErrorDetails = {}) {
    super('UNSUPPORTED', message, details)
  }
}

export class CorruptImageError extends ImgtoolError {
  constructor(message: string, details: ErrorDetails = {}) {
    super('CORRUPT', message, details)
  }
}

/** An I/O error from the device below; `errno` is the system code (EIO, ENOSPC...). */
export class ImageIoError extends ImgtoolError {
  readonly errno: string
  constructor(message: string, errno: string, details: ErrorDetails = {}, options?: { cause?: unknown }) {
    super(errno === 'ENOSPC' ? 'NO_SPACE' : 'IO', message, details, options)
    this.errno = errno
  }
}

export class ReadOnlyError extends ImgtoolError {
  constructor(message: string, details: ErrorDetails = {}) {
    super('READ_ONLY', message, details)
  }
}

/**
 * Another process (QEMU, or another imgtool) holds the image in a way this open
 * cannot share: the lock bytes QEMU uses (see src/io/lock.ts) said no.
 * `details.permission` names the permission, as QEMU names it ("write").
 */
export class ImageLockedError extends ImgtoolError {
  constructor(message: string, details: ErrorDetails = {}) {
    super('LOCKED', message, details)
  }
}

/** The image's format has no check (qemu-img check's exit code 63: raw). */
export class NoCheckError extends UnsupportedFeatureError {
  constructor(message: string, details: ErrorDetails = {}) {
    super(message, details)
  }
}

/** The operation was stopped by its AbortSignal (the CLI: SIGINT or SIGTERM). */
export class AbortedError extends ImgtoolError {
  constructor(message: string, details: ErrorDetails = {}) {
    super('INTERRUPTED', message, details)
  }
}

/** Throw AbortedError when `signal` has fired (the library's one spelling of throwIfAborted). */
export function checkAborted(signal: AbortSignal | undefined, what: string): void {
  if (signal?.aborted) {
    const why = signal.reason instanceof Error ? signal.reason.message : 'aborted'
    throw new AbortedError(`${what}: ${why}`)
  }
}

export function isImgtoolError(e: unknown): e is ImgtoolError {
  return e instanceof ImgtoolError
}

/** Hex rendering used in every message: 0x30200. */
export function hex(n: number | bigint): string {
  return '0x' + n.toString(16)
}
