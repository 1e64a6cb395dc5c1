/**
 * Records qemu-img check's verdict on every damage kind of test/check/damages.ts
 * applied to a few committed qemu-made fixtures (images/qcow2), into
 * images/qcow2-check/golden.json. The damaged bytes are not committed: the
 * damage library recreates them deterministically from the clean fixtures, so
 * test/check/damaged-golden.test.ts can compare without qemu.
 *
 *   bash images/qcow2-check/make-golden.sh
 */
import { execFileSync, spawnSync } from 'node:child_process'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Qcow2Bytes } from '../../test/support/damage.js'
import { DAMAGES } from '../../test/check/damages.js'
import { fixture, fixtureBytes } from '../../test/check/fixtures.js'

export const GOLDEN_FIXTURES = ['v2-c4k', 'v3-c4k', 'v3-rc1', 'v3-snapshot', 'v3-extl2-c64k']

const out = process.argv[2]!
const dir = mkdtempSync(join(tmpdir(), 'imgtool-golden-'))
const version = execFileSync('qemu-img', ['--version'], { encoding: 'utf8' }).split('\n')[0]
const cases: unknown[] = []
try {
  for (const fx of GOLDEN_FIXTURES) {
    for (const d of DAMAGES) {
      const img = new Qcow2Bytes(fixtureBytes(fixture(fx)))
      const what = d.apply(img)
      if (what === undefined) continue
      const name = `${fx}+${d.name}.qcow2`
      const path = join(dir, name)
      writeFileSync(path, img.bytes)
      const r = spawnSync('qemu-img', ['check', '-f', 'qcow2', '--output=json', name], { cwd: dir, encoding: 'utf8' })
      cases.push({
        fixture: fx,
        damage: d.name,
        description: what,
        exit: r.status,
        json: r.stdout.trim() ? JSON.parse(r.stdout) : null,
        stderr: r.stderr.split('\n').filter((l) => l),
      })
    }
  }
} finally {
  rmSync(dir, { recursive: true, force: true })
}
writeFileSync(out, JSON.stringify({ qemu: version, cases }, null, 1) + '\n')
console.log(`${cases.length} cases recorded in ${out}`)
