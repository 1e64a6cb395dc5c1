/** The imgtool process: --version, help, unknown commands, exit codes, no stack traces. */
import { readFileSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { describe, expect, it } from 'vitest'
import { run } from '../support/qemu.js'

const ROOT = resolve(__dirname, '..', '..')
const BIN = join(ROOT, 'bin', 'imgtool')
const VERSION = (JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { version: string }).version

const imgtool = (...args: string[]) => run(process.execPath, [BIN, ...args], { timeout: 30_000 })

describe('imgtool (the process)', () => {
  it('--version and -V print the package version and exit 0', async () => {
    for (const flag of ['--version', '-V']) {
      const r = await imgtool(flag)
      expect(r.code).toBe(0)
      expect(r.stdout).toBe(`${VERSION}\n`)
      expect(r.stderr).toBe('')
    }
  })

  it('--help lists info, map and cat and exits 0', async () => {
    const r = await imgtool('--help')
    expect(r.code).toBe(0)
    for (const c of ['info', 'map', 'cat']) expect(r.stdout).toMatch(new RegExp(`^  ${c} `, 'm'))
  })

  it('info --help describes its options', async () => {
    const r = await imgtool('info', '--help')
    expect(r.code).toBe(0)
    for (const o of ['--output', '--json', '--backing-chain', '-f, --format']) expect(r.stdout).toContain(o)
  })

  it('an unknown command exits 1 and says so', async () => {
    const r = await imgtool('frobnicate', 'x')
    expect(r.code).toBe(1)
    expect(r.stdout).toBe('')
    expect(r.stderr.split('\n')[0]).toBe("error: unknown command 'frobnicate'")
  })

  it('errors are one line without a stack trace; IMGTOOL_DEBUG=1 adds the stack', async () => {
    const r = await imgtool('info', '/nonexistent/z.qcow2')
    expect(r.code).toBe(1)
    expect(r.stderr).toBe('imgtool: /nonexistent/z.qcow2: No such file or directory\n')
    const d = await run(process.execPath, [BIN, 'info', '/nonexistent/z.qcow2'], { env: { ...process.env, IMGTOOL_DEBUG: '1' } })
    expect(d.code).toBe(1)
    expect(d.stderr).toMatch(/^\s+at /m)
    expect(d.stderr.trimEnd().split('\n').pop()).toBe('imgtool: /nonexistent/z.qcow2: No such file or directory')
  })

  it('a command that succeeds exits 0 with its output on stdout only', async () => {
    const r = await imgtool('info', '--json', join(ROOT, 'images', 'qcow2', 'v3-empty.qcow2'))
    expect(r.code).toBe(0)
    expect(r.stderr).toBe('')
    expect(JSON.parse(r.stdout)).toMatchObject({ format: 'qcow2', 'virtual-size': 1048576 })
  })
})
