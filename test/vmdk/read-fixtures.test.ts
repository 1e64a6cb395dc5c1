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

    it(`${name}: map --output json equals qemu-img map`, async () => {
      const r = await cli('map', '--output', 'json', path)
      expect(r.code, r.err).toBe(0)
      expect(JSON.parse(r.out)).toEqual(JSON.parse(golden('map.json')))
    })
  }
})
