/** Shared helpers for the VHD suites: fixtures made by qemu-img (make-fixtures.sh) into a temp dir. */
import { execFileSync } from 'node:child_process'
import { resolve } from 'node:path'
import { main } from '../../src/cli/main.js'
import { collector } from '../support/qemu.js'

export const SCRIPT = resolve(__dirname, 'make-fixtures.sh')

/** Every fixture make-fixtures.sh makes, and its subformat. */
export const FIXTURES: ReadonlyArray<{ name: string; fixed: boolean }> = [
  { name: 'dyn-empty.vhd', fixed: false },
  { name: 'dyn-data.vhd', fixed: false },
  { name: 'dyn-force.vhd', fixed: false },
  { name: 'dyn-odd.vhd', fixed: false },
  { name: 'chs-31.vhd', fixed: false },
  { name: 'chs-63.vhd', fixed: false },
  { name: 'chs-255.vhd', fixed: false },
  { name: 'fixed.vhd', fixed: true },
  { name: 'fixed-force.vhd', fixed: true },
  { name: 'conv-dyn.vhd', fixed: false },
  { name: 'conv-fixed.vhd', fixed: true },
  { name: 'conv-azure.vhd', fixed: true },
]

export function makeFixtures(dir: string): void {
  execFileSync('bash', [SCRIPT, dir], { stdio: ['ignore', 'ignore', 'inherit'] })
}

export async function cli(...argv: string[]): Promise<{ code: number; out: string; err: string; bytes: Buffer }> {
  const stdout = collector()
  const stderr = collector()
  const code = await main(['node', 'imgtool', ...argv], { stdout, stderr, isTTY: false })
  return { code, out: stdout.text(), err: stderr.text(), bytes: stdout.bytes() }
}
