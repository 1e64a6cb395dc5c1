/**
 * Format identity by signature: every format's magic looked for where that
 * format puts it, so a file that matches more than one (a polyglot) is seen.
 * Reads a few sectors through the BlockDevice; never trusts a single probe.
 */
import type { BlockDevice } from '../io/block-device.js'

export type Signature = 'qcow2' | 'dmsnap' | 'vmdk' | 'vmdk-descriptor' | 'vhdx' | 'vhd' | 'iso' | 'mbr' | 'gpt'

export interface SignatureHit {
  signature: Signature
  offset: number
}

const ascii = (b: Uint8Array, at: number, s: string): boolean => {
  if (at < 0 || at + s.length > b.length) return false
  for (let i = 0; i < s.length; i++) if (b[at + i] !== s.charCodeAt(i)) return false
  return true
}

/** Signatures at the start of a buffer (a file's first bytes, or a guest's first sectors). */
export function headSignatures(head: Uint8Array): SignatureHit[] {
  const hits: SignatureHit[] = []
  if (ascii(head, 0, 'QFI\xfb')) hits.push({ signature: 'qcow2', offset: 0 })
  if (ascii(head, 0, 'SnAp')) hits.push({ signature: 'dmsnap', offset: 0 })
  if (ascii(head, 0, 'KDMV')) hits.push({ signature: 'vmdk', offset: 0 })
  // VMDK3 ('COWD'): qemu's vmdk driver probes it too (imgtool does not read it)
  if (ascii(head, 0, 'COWD')) hits.push({ signature: 'vmdk', offset: 0 })
  if (ascii(head, 0, '# Disk DescriptorFile') || qemuProbesVmdkText(head)) hits.push({ signature: 'vmdk-descriptor', offset: 0 })
  if (ascii(head, 0, 'vhdxfile')) hits.push({ signature: 'vhdx', offset: 0 })
  // a dynamic VHD starts with a copy of its footer
  if (ascii(head, 0, 'conectix')) hits.push({ signature: 'vhd', offset: 0 })
  if (head.length >= 512 && head[510] === 0x55 && head[511] === 0xaa) hits.push({ signature: 'mbr', offset: 510 })
  if (ascii(head, 512, 'EFI PART')) hits.push({ signature: 'gpt', offset: 512 })
  if (ascii(head, 4096, 'EFI PART')) hits.push({ signature: 'gpt', offset: 4096 })
  return hits
}

/**
 * QEMU's vmdk_probe on text: in its 2 KiB probe buffer, comment lines and blank lines (spaces only) are
 * skipped, and a first other line that is exactly `version=1`, `2` or `3` makes the file a VMDK descriptor,
 * so that a "raw" file of such text is opened by qemu-img as a VMDK that names its extent files.
 */
function qemuProbesVmdkText(head: Uint8Array): boolean {
  const end = Math.min(head.length, 2048)
  let p = 0
  while (p < end) {
    if (head[p] === 0x23) {
      while (p < end && head[p] !== 0x0a) p++
      p++
      continue
    }
    if (head[p] === 0x20) {
      while (p < end && head[p] === 0x20) p++
      if (p < end && head[p] === 0x0d) p++
      if (p === end || head[p] !== 0x0a) return false
      p++
      continue
    }
    for (const eol of ['\n', '\r\n']) {
      for (const v of ['1', '2', '3']) if (end - p >= 9 + eol.length && ascii(head, p, `version=${v}${eol}`)) return true
    }
    return false
  }
  return false
}

/** Every signature in the file: its head, the ISO 9660 volume descriptors and a VHD footer at the end. */
export async function fileSignatures(dev: BlockDevice): Promise<SignatureHit[]> {
  const head = await dev.read(0, Math.min(dev.size, 8192), 'probe')
  const hits = headSignatures(head)
  // ISO 9660: "CD001" at byte 1 of the volume descriptors from sector 16 (2 KiB sectors)
  for (const at of [0x8001, 0x8801, 0x9001]) {
    if (dev.size >= at + 5 && ascii(await dev.read(at, 5, 'probe'), 0, 'CD001')) {
      hits.push({ signature: 'iso', offset: at })
      break
    }
  }
  // VHD footer: the last 512 bytes (511 in images of old Virtual PC versions)
  for (const back of [512, 511]) {
    if (dev.size >= back + 8 && dev.size > 512) {
      const at = dev.size - back
      if (ascii(await dev.read(at, 8, 'probe'), 0, 'conectix') && !hits.some((h) => h.signature === 'vhd' && h.offset === at)) {
        hits.push({ signature: 'vhd', offset: at })
        break
      }
    }
  }
  return hits
}

/** The format a file is, from its signatures: a header at 0 wins, then a VHD footer, then ISO; raw otherwise. */
export function detectFormat(hits: readonly SignatureHit[]): string {
  const at0 = hits.find((h) => h.offset === 0)
  if (at0) return at0.signature === 'vmdk-descriptor' ? 'vmdk' : at0.signature
  if (hits.some((h) => h.signature === 'vhd')) return 'vhd'
  if (hits.some((h) => h.signature === 'iso')) return 'iso'
  return 'raw'
}

/**
 * Signatures that do not belong beside the detected format. A partition table
 * belongs in raw (and in an ISO: hybrid ISOs carry an MBR and a GPT); beside an
 * image format's header it is a second reading of the same bytes.
 */
export function foreignSignatures(format: string, hits: readonly SignatureHit[]): SignatureHit[] {
  const own = (s: Signature): boolean => s === format || (format === 'vmdk' && s === 'vmdk-descriptor')
  // a fixed VHD is raw guest bytes and a footer: its guest's partition table is at the start of the file
  const fixedVhd = format === 'vhd' && !hits.some((h) => h.signature === 'vhd' && h.offset === 0)
  const partitionOk = format === 'raw' || format === 'iso' || fixedVhd
  return hits.filter((h) => {
    if (own(h.signature)) return false
    if ((h.signature === 'mbr' || h.signature === 'gpt') && partitionOk) return false
    return true
  })
}
