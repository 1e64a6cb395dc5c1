/** Format probing by magic; raw is the fallback. `-f FMT` overrides it. */
export type FormatName = 'qcow2' | 'dmsnap' | 'vpc' | 'vmdk' | 'raw'

/** Every format name imgtool reads, in the order `-f` lists them. */
export const FORMAT_NAMES: readonly FormatName[] = ['qcow2', 'dmsnap', 'vpc', 'vmdk', 'raw']

/** Bytes a prober needs from the start of the file. */
export const PROBE_BYTES = 512

export function probeFormat(head: Uint8Array): FormatName {
  if (head.length >= 4 && head[0] === 0x51 && head[1] === 0x46 && head[2] === 0x49 && head[3] === 0xfb) return 'qcow2'
  // dm-snapshot: little-endian u32 0x70416e53, the bytes "SnAp"
  if (head.length >= 4 && head[0] === 0x53 && head[1] === 0x6e && head[2] === 0x41 && head[3] === 0x70) return 'dmsnap'
  // VHD (qemu's vpc): a dynamic or differencing disk starts with a copy of its footer
  if (isVhdFooter(head)) return 'vpc'
  // VMDK: a hosted sparse extent ("KDMV") or a text descriptor file
  if (head.length >= 4 && head[0] === 0x4b && head[1] === 0x44 && head[2] === 0x4d && head[3] === 0x56) return 'vmdk'
  if (startsWith(head, '# Disk DescriptorFile')) return 'vmdk'
  return 'raw'
}

/** Bytes a prober needs from the end of the file (a fixed VHD's footer). */
export const PROBE_TAIL_BYTES = 512

/**
 * The format the last 512 bytes of a file name, when its head named none: a
 * fixed VHD ends in its footer ("conectix", a valid checksum, disk type 2).
 * qemu-img probes such a file as raw; `-f raw` still reads it so.
 */
export function probeFormatTail(tail: Uint8Array): FormatName | undefined {
  if (tail.length !== PROBE_TAIL_BYTES || !isVhdFooter(tail)) return undefined
  let sum = 0
  for (let i = 0; i < 512; i++) if (i < 64 || i >= 68) sum += tail[i]!
  const stored = ((tail[64]! << 24) | (tail[65]! << 16) | (tail[66]! << 8) | tail[67]!) >>> 0
  const type = ((tail[60]! << 24) | (tail[61]! << 16) | (tail[62]! << 8) | tail[63]!) >>> 0
  return stored === ~sum >>> 0 && type === 2 ? 'vpc' : undefined
}

function startsWith(b: Uint8Array, text: string): boolean {
  if (b.length < text.length) return false
  for (let i = 0; i < text.length; i++) if (b[i] !== text.charCodeAt(i)) return false
  return true
}

function isVhdFooter(b: Uint8Array): boolean {
  const cookie = [0x63, 0x6f, 0x6e, 0x65, 0x63, 0x74, 0x69, 0x78] // "conectix"
  return b.length >= 8 && cookie.every((c, i) => b[i] === c)
}

/** True when `s` names a format imgtool knows (`qcow2`, `dmsnap`, `vpc`, `vmdk`, `raw`). */
export function isFormatName(s: string): s is FormatName {
  return (FORMAT_NAMES as readonly string[]).includes(s)
}
