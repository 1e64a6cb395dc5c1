/**
 * kill -9 of the real CLI process during `snapshot -c` on a v3 image (D22):
 * an image with some 6,000 4 KiB clusters over a dozen L2 tables and a
 * snapshot; `node bin/imgtool snapshot -c` is killed at moments spread over
 * the length of an uninterrupted run. After each kill qemu-img check finds at
 * most leaks (exit 0 or 3, never 2), imgtool check agrees, and the guest data
 * compares equal to the image before. (The in-memory crash sweeps in
 * v3-snapshots.test.ts cover every crash point; this is the end-to-end check
 * through the page cache of a real process death. It runs the build in dist/.)
 */
import { spawn } from 'node:child_process'
import { copyFileSync, existsSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { afterAll, expect, it } from 'vitest'
import { cli } from '../support/cli.js'
import { describeQemu, makeTempDir, qemuImg, qemuImgOk, qemuIoOk, useTempDirs } from '../support/qemu.js'

useTempDirs()
const BIN = resolve(__dirname, '..', '..', 'bin', 'imgtool')
const KILLS = 10

function snapshotCreate(path: string, name: string, killAfterMs?: number): Promise<{ code: number | null; signal: NodeJS.Signals | null; ms: number }> {
  return new Promise((done, fail) => {
    const t0 = performance.now()
    const child = spawn(process.execPath, [BIN, 'snapshot', '-c', name, path], { stdio: 'ignore' })
    const timer = setTimeout(() => child.kill('SIGKILL'), killAfterMs ?? 120_000)
    child.on('error', fail)
    child.on('close', (code, signal) => {
      clearTimeout(timer)
      done({ code, signal, ms: performance.now() - t0 })
    })
  })
}

const verdicts: string[] = []
afterAll(() => {
  if (verdicts.length > 0) console.log(`[snapshot -c kill -9] ${verdicts.length} runs\n  ${verdicts.join('\n  ')}`)
})

describeQemu('kill -9 during snapshot -c (real process)', () => {
  it(`leaves at most leaks at ${KILLS} kill moments`, async () => {
    expect(existsSync(join(BIN, '..', '..', 'dist')), 'the CLI runs dist/: npm run build').toBe(true)
    const dir = makeTempDir('imgtool-snapkill-')
    const base = join(dir, 'base.qcow2')
    await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', base, '64M'])
    await qemuIoOk(base, ['write -P 0x5a 0 20M', 'write -c -P 0x33 40M 64k'])
    await qemuImgOk(['snapshot', '-c', 'old', base])
    await qemuIoOk(base, ['write -P 0x77 1M 3M', 'write -P 0x11 30M 4M'])
    // the length of an uninterrupted run (process start included)
    const full = join(dir, 'full.qcow2')
    copyFileSync(base, full)
    const whole = await snapshotCreate(full, 'new')
    expect(whole.code).toBe(0)
    let killed = 0
    for (let i = 0; i < KILLS; i++) {
      const path = join(dir, `k${i}.qcow2`)
      copyFileSync(base, path)
      const at = Math.round((whole.ms * (i + 0.5)) / KILLS)
      const r = await snapshotCreate(path, 'new', at)
      if (r.signal === 'SIGKILL') killed++
      const q = await qemuImg(['check', '--output=json', '-f', 'qcow2', path])
      const j = JSON.parse(q.stdout || '{}') as Record<string, number>
      const ours = await cli('check', '--output', 'json', path)
      const o = JSON.parse(ours.stdout || '{}') as Record<string, number>
      const list = await qemuImgOk(['snapshot', '-l', path])
      verdicts.push(
        `kill at ${at} ms: ${r.signal ?? `exit ${r.code}`}; qemu-img check exit ${q.code} (${j['leaks'] ?? 0} leaks, ${j['corruptions'] ?? 0} corruptions); imgtool check exit ${ours.code}; snapshot 'new' ${/\bnew\b/.test(list) ? 'present' : 'absent'}`,
      )
      expect({ code: q.code, corruptions: j['corruptions'] ?? 0 }, `kill at ${at} ms\n${q.stdout}${q.stderr}`).toEqual({
        code: (j['leaks'] ?? 0) > 0 ? 3 : 0,
        corruptions: 0,
      })
      expect(
        { code: ours.code, corruptions: o['corruptions'] ?? 0, leaks: o['leaks'] ?? 0 },
        `kill at ${at} ms: imgtool check\n${ours.stdout}${ours.stderr}`,
      ).toEqual({ code: q.code, corruptions: 0, leaks: j['leaks'] ?? 0 })
      const cmp = await qemuImg(['compare', '-f', 'qcow2', '-F', 'qcow2', base, path])
      expect(cmp.code, `kill at ${at} ms: guest data changed\n${cmp.stdout}${cmp.stderr}`).toBe(0)
    }
    verdicts.push(`uninterrupted run ${Math.round(whole.ms)} ms; ${killed} of ${KILLS} runs killed before they finished`)
  }, 600_000)
})
