/** Running the CLI in process with captured output, for the CLI tests. */
import { join, resolve } from 'node:path'
import { main } from '../../src/cli/main.js'
import { collector } from './qemu.js'

export const FIXTURES = resolve(__dirname, '..', '..', 'images', 'qcow2')
export const fx = (name: string): string => join(FIXTURES, name)

export async function cli(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = collector()
  const err = collector()
  const code = await main(['node', 'imgtool', ...args], { stdout: out, stderr: err, isTTY: false })
  return { code, stdout: out.text(), stderr: err.text() }
}
