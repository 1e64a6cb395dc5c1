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
  it('--version and -V print the package version, the qemu-img version followed and the native parts, and exit 0', async () => {
    for (const flag of ['--version', '-V']) {
      const r = await imgtool(flag)
      expect(r.code).toBe(0)
      expect(r.stdout).toMatch(
        new RegExp(
          `^imgtool ${VERSION.replace(/\./g, '\\.')}\\nfollows qemu-img 7\\.2\\nnative: seek-hole (yes|no), ofd-locks (yes|no), copy-file-range (yes|no), fallocate (yes|no), deflate (yes|no)\\n$`,
        ),
      )
      expect(r.stderr).toBe('')
    }
  })

  it('--version says which native parts are missing (the seek-hole addon turned off)', async () => {
    const r = await run(process.execPath, [BIN, '--version'], { timeout: 30_000, env: { ...process.env, IMGTOOL_NO_SEEK_HOLE: '1' } })
    expect(r.code).toBe(0)
    expect(r.stdout).toContain('native: seek-hole no, ofd-locks no, copy-file-range no, fallocate no, deflate ')
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
