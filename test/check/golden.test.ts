/**
 * Our check against the golden qemu-img check output recorded for every
 * committed fixture (images/qcow2/*.check.{json,exit,txt}): same JSON members
 * and values, same exit code, same stderr lines. Runs without qemu.
 */
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { MemoryDevice } from '../../src/io/memory-device.js'
import { analyzeQcow2 } from '../../src/formats/qcow2/check/check.js'
import { checkExitCode } from '../../src/check/types.js'
import { checkHuman, checkJson } from '../../src/cli/render/check.js'
import { QCOW2_DIR, fixtureBytes, manifest } from './fixtures.js'

const entries = manifest().filter((e) => e.golden.check)

describe('check agrees with the golden qemu-img check output of every fixture', () => {
  it('has fixtures to check', () => expect(entries.length).toBeGreaterThan(10))
  for (const e of entries) {
    it(`${e.name}: same counts, JSON and exit code as qemu-img`, async () => {
      const a = await analyzeQcow2(new MemoryDevice(fixtureBytes(e), { name: e.file }))
      const golden = JSON.parse(readFileSync(join(QCOW2_DIR, e.golden.check!), 'utf8')) as Record<string, unknown>
      const ours = checkJson(a.report, golden['filename'] as string)
      delete ours['findings']
      delete ours['notices']
      expect(JSON.stringify(ours, null, 4)).toBe(JSON.stringify(golden, null, 4))
      expect(checkExitCode(a.report)).toBe(Number(readFileSync(join(QCOW2_DIR, e.golden.checkExit!), 'utf8').trim()))
      const text = readFileSync(join(QCOW2_DIR, e.golden.checkText!), 'utf8')
      const human = checkHuman({ ...a.report, findings: [], notices: [] })
      expect((a.report.diagnostics ?? []).map((l) => l + '\n').join('') + human).toBe(text)
    })
  }
})
