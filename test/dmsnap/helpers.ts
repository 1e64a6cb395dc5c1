/** Shared helpers for the dm-snapshot tests: fixtures, md5, opening stores on memory devices. */
import { createHash } from 'node:crypto'
import { existsSync, readFileSync, readdirSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { MemoryDevice } from '../../src/io/memory-device.js'
import { RawImage } from '../../src/formats/raw/image.js'
import { DmsnapImage } from '../../src/formats/dmsnap/index.js'
import type { BlockDevice } from '../../src/io/block-device.js'
import type { DiskImage } from '../../src/image/disk-image.js'

export const FIXTURES = resolve(__dirname, '..', '..', 'images', 'dmsnap')

export function md5(b: Uint8Array): string {
  return createHash('md5').update(b).digest('hex')
}

export interface CreateManifest {
  params: { chunk_sectors: number; store: string; origin_bytes: number; cow_bytes: number }
  observed: { snapshot_md5: string; snapshot_md5_after_reload: string; status: string; status_after_reload: string; origin_md5: string }
  cow: { md5: string; reference_parse: { exceptions: [number, number][]; next_free: number; state: string; current_area: number } }
}

export function fixtureNames(kind: 'create' | 'merge'): string[] {
  return readdirSync(FIXTURES)
    .filter((n) => existsSync(join(FIXTURES, n, kind === 'create' ? 'manifest.json' : 'merge.json')))
    .sort()
}

export function loadFixture(name: string): { origin: Uint8Array; cow: Uint8Array; manifest: CreateManifest } {
  const dir = join(FIXTURES, name)
  return {
    origin: new Uint8Array(readFileSync(join(dir, 'origin.img'))),
    cow: new Uint8Array(readFileSync(join(dir, 'cow.img'))),
    manifest: JSON.parse(readFileSync(join(dir, 'manifest.json'), 'utf8')) as CreateManifest,
  }
}

export function rawImage(bytes: Uint8Array | MemoryDevice, name = 'origin'): RawImage {
  return new RawImage(bytes instanceof MemoryDevice ? bytes : new MemoryDevice(bytes, { name }))
}

export async function openStore(
  cow: BlockDevice,
  origin?: DiskImage,
  opts: { readOnly?: boolean; forCheck?: boolean; onFull?: 'invalidate' | 'refuse' } = {},
): Promise<DmsnapImage> {
  return DmsnapImage.open(cow, { origin, readOnly: opts.readOnly ?? false, forCheck: opts.forCheck, onFull: opts.onFull })
}

export async function readAll(img: DiskImage): Promise<Uint8Array> {
  return img.read(0, img.virtualSize)
}

/** "72/256 16" out of "0 1024 snapshot 72/256 16" */
export function statusTail(line: string): string {
  return line.split(' ').slice(3).join(' ')
}
