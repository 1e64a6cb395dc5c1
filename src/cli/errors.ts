/**
 * Turning thrown errors into one line on stderr and an exit code. Never a
 * stack trace (set IMGTOOL_DEBUG=1 to see one).
 */
import { escapeControls, isImgtoolError } from '../index.js'

/** Exit codes outside check: qemu-img uses 1 for every failure. */
export const EXIT_FAILURE = 1

export function renderError(e: unknown, stderr: NodeJS.WritableStream): number {
  if (process.env['IMGTOOL_DEBUG'] === '1' && e instanceof Error) stderr.write(`${e.stack}\n`)
  if (isImgtoolError(e)) {
    stderr.write(`imgtool: ${oneLine(e.message)}\n`)
    return EXIT_FAILURE
  }
  const err = e as { code?: string; message?: string }
  if (err && typeof err.code === 'string' && err.code.startsWith('commander.')) return EXIT_FAILURE
  if (err && err.code === 'EPIPE') return 0
  const msg = e instanceof Error ? e.message : String(e)
  stderr.write(`imgtool: internal error: ${oneLine(msg)}\n`)
  return EXIT_FAILURE
}

/** One line, and no raw control bytes (a file name from an image header may carry any). */
function oneLine(s: string): string {
  return escapeControls(s.replace(/\s*\n\s*/g, '; '))
}
