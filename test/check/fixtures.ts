/** The qcow2 fixtures of images/qcow2 (manifest.json) as bytes, for check tests. */
import { readFileSync, existsSync } from 'node:fs'
import { gunzipSync } from 'node:zlib'
import { join } from 'node:path'

export const QCOW2_DIR = join(import.meta.dirname, '../../images/qcow2')

export interface ManifestEntry {
  name: string
  file: string
  image: string
  gzip: boolean
  features: string[]
  requires: { file: string; image: string; gzip: boolean }[]
  checkExit: number
  golden: { check: string | null; checkExit: string | null; checkText: string | null }
}

export function manifest(): ManifestEntry[] {
  const p = join(QCOW2_DIR, 'manifest.json')
  if (!existsSync(p)) return []
  return JSON.parse(readFileSync(p, 'utf8')) as ManifestEntry[]
}

export function fixtureBytes(e: { file: string; gzip: boolean }): Uint8Array {
  const raw = readFileSync(join(QCOW2_DIR, e.file))
  return new Uint8Array(e.gzip ? gunzipSync(raw) : raw)
}

export function fixture(name: string): ManifestEntry {
  const e = manifest().find((m) => m.name === name)
  if (!e) throw new Error(`no fixture ${name} in images/qcow2/manifest.json`)
  return e
}
