/**
 * Committed qemu-img verdicts (images/qcow2-check/golden.json, recorded by
 * make-golden.sh) on damaged fixtures: our check matches them without qemu.
 */
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { MemoryDevice } from '../../src/io/memory-device.js'
import { CheckFailedError, analyzeQcow2 } from '../../src/formats/qcow2/check/check.js'
import { checkExitCode } from '../../src/check/types.js'
import { checkJson } from '../../src/cli/render/check.js'
import { Qcow2Bytes } from '../support/damage.js'
import { DAMAGES } from './damages.js'
import { fixture, fixtureBytes } from './fixtures.js'

interface GoldenCase {
  fixture: string
  damage: string
  description: string
  exit: number
  json: Record<string, unknown> | null
  stderr: string[]
}

const golden = JSON.parse(readFileSync(join(import.meta.dirname, '../../images/qcow2-check/golden.json'), 'utf8')) as { qemu: string; cases: GoldenCase[] }

describe(`check matches the recorded ${golden.qemu} verdicts on damaged fixtures`, () => {
  it('has recorded cases', () => expect(golden.cases.length).toBeGreaterThan(80))
  for (const c of golden.cases) {
    it(`${c.fixture} + ${c.damage}: exit ${c.exit}`, async () => {
      const img = new Qcow2Bytes(fixtureBytes(fixture(c.fixture)))
      expect(DAMAGES.find((d) => d.name === c.damage)!.apply(img)).toBe(c.description)
      const name = `${c.fixture}+${c.damage}.qcow2`
      const lines = c.stderr.filter((l) => !l.startsWith('qemu-img: Check failed'))
      try {
        const a = await analyzeQcow2(new MemoryDevice(img.bytes, { name }))
        const ours = checkJson(a.report, name)
        delete ours['findings']
        delete ours['notices']
        expect(ours).toEqual(c.json)
        expect(JSON.stringify(ours)).toBe(JSON.stringify(c.json)) // member order too
        expect(checkExitCode(a.report)).toBe(c.exit)
        expect(a.report.diagnostics).toEqual(lines)
      } catch (e) {
        if (!(e instanceof CheckFailedError)) throw e
        expect(c.json).toBeNull()
        expect(c.exit).toBe(1)
        expect(c.stderr).toContain(`qemu-img: Check failed: ${e.strerror}`)
        expect(e.diagnostics).toEqual(lines)
      }
    })
  }
})
