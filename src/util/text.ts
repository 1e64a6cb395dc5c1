/**
 * Text from an image (file names in headers) shown to people: control
 * characters never reach a terminal raw. C0 controls, DEL and C1 controls
 * become \xNN (\n, \t and \r included); everything else is kept.
 */
export function escapeControls(s: string): string {
  return s.replace(/[\u0000-\u001f\u007f-\u009f]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`)
}

/**
 * Bytes of a name as text for messages: valid UTF-8 is kept (controls
 * escaped), every byte that is not part of valid UTF-8 becomes \xNN.
 */
export function escapeBytes(b: Uint8Array): string {
  let out = ''
  let i = 0
  const strict = new TextDecoder('utf-8', { fatal: true })
  while (i < b.length) {
    const len = utf8SequenceLength(b, i)
    if (len === 0) {
      out += `\\x${b[i]!.toString(16).padStart(2, '0')}`
      i++
      continue
    }
    out += escapeControls(strict.decode(b.subarray(i, i + len)))
    i += len
  }
  return out
}

/** Length of the well-formed UTF-8 sequence at b[i], or 0 when there is none. */
function utf8SequenceLength(b: Uint8Array, i: number): number {
  const c = b[i]!
  if (c < 0x80) return 1
  const n = c >= 0xc2 && c <= 0xdf ? 2 : c >= 0xe0 && c <= 0xef ? 3 : c >= 0xf0 && c <= 0xf4 ? 4 : 0
  if (n === 0 || i + n > b.length) return 0
  try {
    new TextDecoder('utf-8', { fatal: true }).decode(b.subarray(i, i + n))
    return n
  } catch {
    return 0
  }
}

/** A name as QEMU keeps it: the bytes up to the first NUL (a C string). */
export function cString(b: Uint8Array): Uint8Array {
  const z = b.indexOf(0)
  return z < 0 ? b : b.subarray(0, z)
}

/** Decode UTF-8, or undefined when the bytes are not valid UTF-8. */
export function strictUtf8(b: Uint8Array): string | undefined {
  try {
    return new TextDecoder('utf-8', { fatal: true }).decode(b)
  } catch {
    return undefined
  }
}
