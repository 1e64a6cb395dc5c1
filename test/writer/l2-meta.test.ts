import { describe, expect, it } from 'vitest'
import { encodeL2Standard } from '../../src/formats/qcow2/spec/entries.js'
import { setStandard } from '../../src/formats/qcow2/spec/l2-meta.js'
import { u64be } from '../../src/util/bytes.js'
import { Prng } from '../support/prng.js'

describe('setStandard', () => {
  it('writes what encodeL2Standard encodes, for 8- and 16-byte entries', () => {
    const rng = new Prng(5)
    const offsets = [0, 512, 0x7fff_fe00, 0x8000_0000, 0xffff_fe00, 0x1_0000_0000, 2 ** 52 - 512, 0x00ff_ffff_ffff_fe00]
    for (let i = 0; i < 200; i++) offsets.push(Math.floor(rng.next() * 2 ** 44) * 512)
    for (const entrySize of [8, 16]) {
      const t = new Uint8Array(entrySize * 4)
      for (const hostOffset of offsets) {
        for (const copied of [false, true]) {
          for (const zero of [false, true]) {
            setStandard(t, { entrySize, extended: entrySize === 16, clusterBits: 9 }, 2, { hostOffset, copied, zero })
            expect(u64be(t, 2 * entrySize)).toBe(encodeL2Standard({ hostOffset, copied, zero }))
          }
        }
      }
    }
  })
})
