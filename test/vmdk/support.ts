/** Shared helpers for the VMDK suites: the committed fixtures (images/vmdk) and the CLI in-process. */
import { resolve } from 'node:path'
import { main } from '../../src/cli/main.js'
import { collector } from '../support/qemu.js'

export const FIXTURE_DIR = resolve(__dirname, '../../images/vmdk')

/** Every image images/vmdk/make-fixtures.sh makes. */
export const FIXTURES = [
  'sparse-empty.vmdk',
  'sparse-data.vmdk',
  'sparse-zeroed.vmdk',
  'sparse-odd.vmdk',
  'stream-empty.vmdk',
  'flat.vmdk',
  'split-sparse.vmdk',
  'split-flat.vmdk',
  'conv-sparse.vmdk',
  'conv-stream.vmdk',
  'conv-flat.vmdk',
] as const

export async function cli(...argv: string[]): Promise<{ code: number; out: string; err: string; bytes: Buffer }> {
  const stdout = collector()
  const stderr = collector()
  const code = await main(['node', 'imgtool', ...argv], { stdout, stderr, isTTY: false })
  return { code, out: stdout.text(), err: stderr.text(), bytes: stdout.bytes() }
}

/** Drop a directory prefix from every "filename" in a JSON value (golden outputs were made inside the folder). */
export function relativeNames<T>(v: T, dir: string): T {
  return JSON.parse(
    JSON.stringify(v, (k, x: unknown) => (k === 'filename' && typeof x === 'string' && x.startsWith(dir + '/') ? x.slice(dir.length + 1) : x)),
  ) as T
}

/**
 * A stream-optimized extent as VMware writes it, from one qemu-img made (qemu
 * 7.2 keeps the grain directory in the header): the header's gdOffset becomes
 * GD_AT_END and the file ends in a footer marker, a footer (the header with
 * the real gdOffset) and an end-of-stream marker.
 */
export function withFooter(b: Buffer): Buffer {
  const end = Math.ceil(b.length / 512) * 512
  const header = Buffer.from(b.subarray(0, 512))
  const out = Buffer.alloc(end + 3 * 512)
  b.copy(out)
  out.writeBigUInt64LE(0xffffffffffffffffn, 56)
  out.writeBigUInt64LE(1n, end) // footer marker: one sector follows
  out.writeUInt32LE(0, end + 8)
  out.writeUInt32LE(3, end + 12)
  header.copy(out, end + 512)
  // end-of-stream marker: all zeros
  return out
}
