/** MBR and GPT disks built in code (no partitioning tool on the test machines); CRC32 from node:zlib. */
import { crc32 } from 'node:zlib'

const SECTOR = 512

export interface Part {
  first: number
  last: number
}

export function gptDisk(sectors: number, parts: Part[]): Buffer {
  const disk = Buffer.alloc(sectors * SECTOR)
  // protective MBR: one 0xEE partition over the whole disk
  disk[446 + 4] = 0xee
  disk.writeUInt32LE(1, 446 + 8)
  disk.writeUInt32LE(Math.min(sectors - 1, 0xffffffff), 446 + 12)
  disk[510] = 0x55
  disk[511] = 0xaa
  const entries = Buffer.alloc(128 * 128)
  parts.forEach((p, i) => {
    const e = entries.subarray(i * 128, (i + 1) * 128)
    e.fill(0x11 + i, 0, 16) // partition type GUID
    e.fill(0x21 + i, 16, 32) // unique GUID
    e.writeBigUInt64LE(BigInt(p.first), 32)
    e.writeBigUInt64LE(BigInt(p.last), 40)
  })
  entries.copy(disk, 2 * SECTOR)
  const h = disk.subarray(SECTOR, SECTOR + 92)
  h.write('EFI PART', 0, 'latin1')
  h.writeUInt32LE(0x00010000, 8)
  h.writeUInt32LE(92, 12)
  h.writeBigUInt64LE(1n, 24)
  h.writeBigUInt64LE(BigInt(sectors - 1), 32)
  h.writeBigUInt64LE(34n, 40)
  h.writeBigUInt64LE(BigInt(sectors - 34), 48)
  h.fill(0x42, 56, 72)
  h.writeBigUInt64LE(2n, 72)
  h.writeUInt32LE(128, 80)
  h.writeUInt32LE(128, 84)
  h.writeUInt32LE(crc32(entries) >>> 0, 88)
  h.writeUInt32LE(crc32(h) >>> 0, 16)
  return disk
}

export function mbrDisk(sectors: number, parts: Array<{ first: number; count: number }>): Buffer {
  const disk = Buffer.alloc(sectors * SECTOR)
  parts.forEach((p, i) => {
    const at = 446 + 16 * i
    disk[at + 4] = 0x83
    disk.writeUInt32LE(p.first, at + 8)
    disk.writeUInt32LE(p.count, at + 12)
  })
  disk[510] = 0x55
  disk[511] = 0xaa
  return disk
}
