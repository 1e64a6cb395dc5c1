/**
 * Every reporting command has --output json, spelled `--output=json` or `--output json` alike; snapshot -l gives
 * the snapshots array qemu-img info --output json gives for the same image, compare the verdict as data.
 */
import { join, resolve } from 'node:path'
import { describe, expect, it } from 'vitest'
import { main } from '../../src/cli/main.js'
import { collector, describeQemu, parseJson, qemuImgOk } from '../support/qemu.js'

const FIXTURES = resolve(__dirname, '..', '..', 'images', 'qcow2')
const fx = (name: string): string => join(FIXTURES, name)

async function cli(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = collector()
  const err = collector()
  const code = await main(['node', 'imgtool', ...args], { stdout: out, stderr: err, isTTY: false })
  return { code, stdout: out.text(), stderr: err.text() }
}

describe('--output json on every reporting command, both spellings', () => {
  const commands: string[][] = [
    ['info', fx('v3-snapshot.qcow2')],
    ['check', fx('v3-c64k.qcow2')],
    ['map', fx('v3-c64k.qcow2')],
    ['snapshot', '-l', fx('v3-snapshot.qcow2')],
    ['compare', fx('v3-c64k.qcow2'), fx('v3-c4k.qcow2')],
    ['measure', '-O', 'qcow2', '--size', '1G'],
  ]
  for (const c of commands) {
    it(`${c[0]}: --output=json and --output json print the same JSON`, async () => {
      const [verb, ...rest] = c
      const a = await cli(verb!, '--output=json', ...rest)
      const b = await cli(verb!, '--output', 'json', ...rest)
      expect(a.code).toBe(b.code)
      expect(a.stdout).toBe(b.stdout)
      expect(() => JSON.parse(a.stdout) as unknown).not.toThrow()
    })
  }

  it('compare --output json: identical, a content mismatch with its offset, a size mismatch', async () => {
    const same = await cli('compare', '--output', 'json', fx('v3-c64k.qcow2'), fx('v3-c64k.qcow2'))
    expect(same.code).toBe(0)
    expect(JSON.parse(same.stdout)).toEqual({ identical: true, 'size-mismatch': false })
    const human = await cli('compare', fx('v3-snapshot.qcow2'), fx('v3-c64k.qcow2'))
    const diff = await cli('compare', '--output', 'json', fx('v3-snapshot.qcow2'), fx('v3-c64k.qcow2'))
    expect(diff.code).toBe(human.code)
    const j = JSON.parse(diff.stdout) as { identical: boolean; message: string; offset?: number }
    expect(j.identical).toBe(false)
    expect(`${j.message}\n`).toBe(human.stdout.split('\n').slice(-2).join('\n'))
    if (j.message.startsWith('Content mismatch')) expect(j.message).toContain(String(j.offset))
  })
})

describeQemu('snapshot -l --output json against qemu-img info', () => {
  for (const name of ['v2-snapshot.qcow2', 'v3-snapshot.qcow2']) {
    it(`${name}: the snapshots array of qemu-img info --output json`, async () => {
      const ours = await cli('snapshot', '-l', '--output', 'json', fx(name))
      expect(ours.code).toBe(0)
      const info = parseJson<{ snapshots?: unknown[] }>(await qemuImgOk(['info', '--output=json', fx(name)]))
      expect(info.snapshots?.length).toBeGreaterThan(0)
      expect(JSON.parse(ours.stdout)).toEqual(info.snapshots)
    })
  }

  it('an image without snapshots: an empty array, exit 0', async () => {
    const r = await cli('snapshot', '-l', '--output', 'json', fx('v3-c64k.qcow2'))
    expect(r.code).toBe(0)
    expect(JSON.parse(r.stdout)).toEqual([])
  })
})
