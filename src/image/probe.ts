/** Format probing by magic; raw is the fallback. `-f FMT` overrides it. */
export type FormatName = 'qcow2' | 'dmsnap' | 'raw'

/** Every format name imgtool reads, in the order `-f` lists them. */
export const FORMAT_NAMES: readonly FormatName[] = ['qcow2', 'dmsnap', 'raw']

/** Bytes a prober needs from the start of the file. */
export const PROBE_BYTES = 512

export function probeFormat(head: Uint8Array): FormatName {
  if (head.length >= 4 && head[0] === 0x51 && head[1] === 0x46 && head[2] === 0x49 && head[3] === 0xfb) return 'qcow2'
  // dm-snapshot: little-endian u32 0x70416e53, the bytes "SnAp"
  if (head.length >= 4 && head[0] === 0x53 && head[1] === 0x6e && head[2] === 0x41 && head[3] === 0x70) return 'dmsnap'
  return 'raw'
}

/** True when `s` names a format imgtool knows (`qcow2`, `dmsnap`, `raw`). */
export function isFormatName(s: string): s is FormatName {
  return (FORMAT_NAMES as readonly string[]).includes(s)
}
