/**
 * The committed VMDK fixtures (images/vmdk, made by qemu-img/qemu-io) against
 * the golden outputs recorded from qemu-img: cat gives the md5 of qemu-img
 * convert -O raw, info and map --output json give qemu-img's fields and values.
 */
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { md5 } from '../support/qemu.js'
import { FIXTURES, FIXTURE_DIR, cli, relativeNames } from './support.js'

interface MapRecord {
  start: number
  length: number
  depth: number
  present: boolean
  zero: boolean
  data: boolean
  offset?: number
}

/**
 * A map without what the host file system decides: a flat extent's zero flag on data (`zero` and `data`
 * both true) comes from the host's holes, and whether a checkout has holes where the bytes are zero is up
 * to the file system (some punch them for any zero block, a plain git checkout writes none). Such records
 * count as data, and neighbours that then continue each other are merged. What the image itself says
 * (unallocated, zero clusters without data, offsets) is kept.
 */
function hostIndependent(map: MapRecord[]): MapRecord[] {
  const out: MapRecord[] = []
  for (const r of map) {
    const m = { ...r, zero: r.data ? false : r.zero }
    const p = out.at(-1)
    const continues =
      p !== undefined &&
      p.start + p.length === m.start &&
      p.depth === m.depth &&
      p.present === m.present &&
      p.zero === m.zero &&
      p.data === m.data &&
      (p.offset === undefined ? m.offset === undefined : m.offset === p.offset + p.length)
    if (continues) p.length += m.length
    else out.push(m)
  }
  return out
}

describe('vmdk fixtures against qemu-img golden outputs', () => {
  for (const name of FIXTURES) {
    const path = join(FIXTURE_DIR, name)
    const golden = (ext: string) => readFileSync(`${path}.${ext}`, 'utf8')

    it(`${name}: cat gives the bytes of qemu-img convert -O raw (md5)`, async () => {
      const r = await cli('cat', path)
      expect(r.code, r.err).toBe(0)
      expect(md5(r.bytes)).toBe(golden('md5').trim())
    })

    it(`${name}: info --output json equals qemu-img info (actual-size aside)`, async () => {
      const r = await cli('info', '--output', 'json', path)
      expect(r.code, r.err).toBe(0)
      const ours = relativeNames(JSON.parse(r.out) as Record<string, unknown>, FIXTURE_DIR)
      const theirs = JSON.parse(golden('info.json')) as Record<string, unknown>
      delete ours['actual-size']
      delete theirs['actual-size']
      expect(ours).toEqual(theirs)
    })

    it(`${name}: map --output json equals qemu-img map (host holes aside)`, async () => {
      const r = await cli('map', '--output', 'json', path)
      expect(r.code, r.err).toBe(0)
      expect(hostIndependent(JSON.parse(r.out) as MapRecord[])).toEqual(hostIndependent(JSON.parse(golden('map.json')) as MapRecord[]))
    })
  }
})
