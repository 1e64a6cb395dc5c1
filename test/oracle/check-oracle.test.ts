/**
 * Live oracle: every damage kind on several fixtures; our check's counts, JSON
 * and exit code equal `qemu-img check`'s on the same bytes, and so do the
 * per-problem lines qemu-img prints on stderr.
 */
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { expect, it } from 'vitest'
import { MemoryDevice } from '../../src/io/memory-device.js'
import { CheckFailedError, analyzeQcow2 } from '../../src/formats/qcow2/check/check.js'
import { checkExitCode } from '../../src/check/types.js'
import { checkJson } from '../../src/cli/render/check.js'
import { Qcow2Bytes } from '../support/damage.js'
import { describeQemu, makeTempDir, mapLimit, qemuImg, useTempDirs } from '../support/qemu.js'
import { fixture, fixtureBytes } from '../check/fixtures.js'
import { DAMAGES, DAMAGE_FIXTURES } from '../check/damages.js'

describeQemu(
  'check agrees with qemu-img check on damaged images',
  () => {
    useTempDirs()
    const cases: { fx: string; dmg: string }[] = []
    for (const fx of DAMAGE_FIXTURES) for (const d of DAMAGES) cases.push({ fx, dmg: d.name })

    it(`${cases.length} fixture × damage cases: same JSON, exit code and stderr lines`, async () => {
      const dir = makeTempDir('imgtool-check-oracle-')
      const failures: string[] = []
      let compared = 0
      await mapLimit(cases, 3, async ({ fx, dmg }, n) => {
        const img = new Qcow2Bytes(fixtureBytes(fixture(fx)))
        const what = DAMAGES.find((d) => d.name === dmg)!.apply(img)
        if (what === undefined) return
        compared++
        const path = join(dir, `${n}-${fx}-${dmg}.qcow2`)
        writeFileSync(path, img.bytes)
        const q = await qemuImg(['check', '-f', 'qcow2', '--output=json', path])
        const qLines = q.stderr.split('\n').filter((l) => l && !l.startsWith('qemu-img: Check failed'))
        let ours: Record<string, unknown> | undefined
        let ourCode: number
        let ourLines: string[]
        let failed: string | undefined
        try {
          const a = await analyzeQcow2(new MemoryDevice(img.bytes, { name: path }))
          ours = checkJson(a.report, path)
          delete ours['findings']
          delete ours['notices']
          ourCode = checkExitCode(a.report)
          ourLines = a.report.diagnostics ?? []
        } catch (e) {
          if (!(e instanceof CheckFailedError)) throw e
          ourCode = 1
          ourLines = e.diagnostics
          failed = e.strerror
        }
        const label = `${fx} + ${dmg} (${what})`
        if (q.code !== ourCode) failures.push(`${label}: exit ${ourCode}, qemu-img ${q.code}: ${q.stderr.trim().split('\n').slice(-2).join(' | ')}`)
        if (q.stdout.trim()) {
          const theirs = JSON.stringify(JSON.parse(q.stdout), null, 4)
          if (JSON.stringify(ours ?? {}, null, 4) !== theirs)
            failures.push(`${label}: JSON ${JSON.stringify(ours)} vs qemu-img ${JSON.stringify(JSON.parse(q.stdout))}`)
        } else if (failed === undefined || !q.stderr.includes(`Check failed: ${failed}`)) {
          failures.push(`${label}: qemu-img printed no JSON (${q.stderr.trim().split('\n').pop()}), we ${failed ? 'failed with ' + failed : 'did not fail'}`)
        }
        if (qLines.join('\n') !== ourLines.join('\n'))
          failures.push(`${label}: stderr lines differ:\n  ours:  ${ourLines.join('\n         ')}\n  qemu:  ${qLines.join('\n         ')}`)
      })
      if (failures.length) writeFileSync(join(dir, '..', 'imgtool-check-oracle-failures.txt'), failures.join('\n\n'))
      expect(failures.map((f) => f.split('\n')[0]!.slice(0, 300))).toEqual([])
      expect(compared).toBeGreaterThan(200)
      console.log(`[check oracle] ${compared} damaged images compared with qemu-img check`)
    })
  },
  ['qemu-img'],
)
