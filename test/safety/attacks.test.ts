/** Runs test/safety/attacks.sh (issue 9's attacks against the real CLI and qemu) and wants every line ok. */
import { spawnSync } from 'node:child_process'
import { join, resolve } from 'node:path'
import { expect, it } from 'vitest'
import { describeQemu, makeTempDir, useTempDirs } from '../support/qemu.js'

useTempDirs()

describeQemu('the attack script', () => {
  it('holds against every attack', () => {
    const r = spawnSync('bash', [resolve(__dirname, 'attacks.sh'), join(makeTempDir('imgtool-attacks-'), 'w')], { encoding: 'utf8', timeout: 900_000 })
    const failed = r.stdout.split('\n').filter((l) => l.startsWith('FAIL'))
    expect(failed).toEqual([])
    expect(r.stdout).toMatch(/attacks: \d+ passed, 0 failed/)
    expect(r.status).toBe(0)
  }, 1_000_000)
})
