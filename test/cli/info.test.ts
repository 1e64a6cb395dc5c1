/** imgtool info: option parsing, JSON and human rendering, -f, errors and exit codes (in process). */
import { readFileSync, statSync } from 'node:fs'
import { describe, expect, it } from 'vitest'
import { cli, FIXTURES, fx } from '../support/cli.js'

describe('imgtool info', () => {
  it('--output json prints qemu-img style JSON: 4-space indent, newline at the end', async () => {
    const r = await cli('info', '--output', 'json', fx('v3-c4k.qcow2'))
    expect(r.code).toBe(0)
    expect(r.stderr).toBe('')
    expect(r.stdout.endsWith('}\n')).toBe(true)
    expect(r.stdout).toContain('\n    "virtual-size": 8388608,\n')
    const j = JSON.parse(r.stdout) as Record<string, unknown>
    expect(j).toMatchObject({ 'virtual-size': 8388608, filename: fx('v3-c4k.qcow2'), 'cluster-size': 4096, format: 'qcow2', 'dirty-flag': false })
    expect(j['actual-size']).toBe(statSync(fx('v3-c4k.qcow2')).blocks * 512)
  })

  it('--json is the same as --output json, and --output=json works too', async () => {
    const a = await cli('info', '--output', 'json', fx('v3-c4k.qcow2'))
    const b = await cli('info', '--json', fx('v3-c4k.qcow2'))
    const c = await cli('info', '--output=json', fx('v3-c4k.qcow2'))
    expect(b.stdout).toBe(a.stdout)
    expect(c.stdout).toBe(a.stdout)
  })

  it("human output is qemu-img's key: value lines; --table keeps the table of the same facts", async () => {
    const r = await cli('info', fx('v3-compressed-zstd-c4k.qcow2'))
    expect(r.code).toBe(0)
    expect(r.stderr).toBe('')
    for (const s of [
      'file format: qcow2',
      'virtual size: 1 MiB (1048576 bytes)',
      'cluster_size: 4096',
      'Format specific information:',
      '    compression type: zstd',
    ])
      expect(r.stdout).toContain(`\n${s}\n`)
    expect(() => JSON.parse(r.stdout)).toThrow()
    const t = await cli('info', '--table', fx('v3-compressed-zstd-c4k.qcow2'))
    expect(t.code).toBe(0)
    for (const s of ['│ image', 'file format', 'qcow2', '1 MiB (1048576 bytes)', 'cluster size', '4096', 'compression-type', 'zstd', 'refcount-bits']) {
      expect(t.stdout).toContain(s)
    }
  })

  it('human output lists snapshots and backing files', async () => {
    const s = await cli('info', fx('v3-snapshot.qcow2'))
    expect(s.stdout).toContain('Snapshot list:')
    expect(s.stdout).toContain('snap1')
    expect(s.stdout).toContain('snap2')
    const b = await cli('info', '--backing-chain', fx('chain-top.qcow2'))
    expect(b.code).toBe(0)
    for (const n of ['chain-top.qcow2', 'chain-mid.qcow2', 'chain-base.qcow2', 'backing file']) expect(b.stdout).toContain(n)
  })

  it('--backing-chain --output json prints an array, top image first', async () => {
    const r = await cli('info', '--backing-chain', '--output', 'json', fx('chain-top.qcow2'))
    const chain = JSON.parse(r.stdout) as Array<Record<string, unknown>>
    expect(chain.map((i) => i['filename'])).toEqual([fx('chain-top.qcow2'), fx('chain-mid.qcow2'), fx('chain-base.qcow2')])
    expect(chain[0]!['full-backing-filename']).toBe(fx('chain-mid.qcow2'))
    // without --backing-chain: one object
    const one = JSON.parse((await cli('info', '--json', fx('chain-top.qcow2'))).stdout) as Record<string, unknown>
    expect(Array.isArray(one)).toBe(false)
    expect(one['backing-filename']).toBe('chain-mid.qcow2')
  })

  it('-f raw reads a qcow2 file as raw bytes', async () => {
    const r = await cli('info', '-f', 'raw', '--output', 'json', fx('v3-c4k.qcow2'))
    expect(r.code).toBe(0)
    const j = JSON.parse(r.stdout) as Record<string, unknown>
    expect(j['format']).toBe('raw')
    expect(j['virtual-size']).toBe(statSync(fx('v3-c4k.qcow2')).size)
    expect(j['format-specific']).toBeUndefined()
    const long = await cli('info', '--format', 'qcow2', '--json', fx('v3-c4k.qcow2'))
    expect((JSON.parse(long.stdout) as Record<string, unknown>)['format']).toBe('qcow2')
  })

  it('an unknown format is one line and exit 1', async () => {
    const r = await cli('info', '-f', 'vdi', fx('v3-c4k.qcow2'))
    expect(r.code).toBe(1)
    expect(r.stdout).toBe('')
    expect(r.stderr).toBe("imgtool: Unknown file format 'vdi' (known: qcow2, dmsnap, vpc, vmdk, raw)\n")
  })

  it('a missing file is one line and exit 1', async () => {
    const r = await cli('info', '/nonexistent/dir/x.qcow2')
    expect(r.code).toBe(1)
    expect(r.stdout).toBe('')
    expect(r.stderr).toBe('imgtool: /nonexistent/dir/x.qcow2: No such file or directory\n')
  })

  it('a directory is one line and exit 1', async () => {
    const r = await cli('info', FIXTURES)
    expect(r.code).toBe(1)
    expect(r.stderr.trim().split('\n')).toHaveLength(1)
    expect(r.stderr).toContain(FIXTURES)
  })

  it('a bad --output value is one line and exit 1', async () => {
    const r = await cli('info', '--output', 'xml', fx('v3-c4k.qcow2'))
    expect(r.code).toBe(1)
    expect(r.stdout).toBe('')
    expect(r.stderr).toBe("imgtool: --output must be 'human' or 'json', not 'xml'\n")
  })

  it('a raw file (no magic) is probed as raw', async () => {
    const r = await cli('info', '--json', fx('chain-raw-base.raw'))
    expect((JSON.parse(r.stdout) as Record<string, unknown>)['format']).toBe('raw')
  })

  it('usage errors exit 1 and name the problem', async () => {
    for (const [args, want] of [
      [['info'], "missing required argument 'image'"],
      [['info', 'a', 'b'], 'too many arguments'],
      [['info', '--bogus', fx('v3-c4k.qcow2')], "unknown option '--bogus'"],
    ] as const) {
      const r = await cli(...args)
      expect(r.code, args.join(' ')).toBe(1)
      expect(r.stdout).toBe('')
      expect(r.stderr.split('\n')[0]).toContain(want)
    }
  })

  it('leaves the image untouched', async () => {
    const before = readFileSync(fx('v3-dirty-lazy.qcow2'))
    const r = await cli('info', '--json', fx('v3-dirty-lazy.qcow2'))
    expect(r.code).toBe(0)
    expect((JSON.parse(r.stdout) as Record<string, unknown>)['dirty-flag']).toBe(true)
    expect(readFileSync(fx('v3-dirty-lazy.qcow2')).equals(before)).toBe(true)
  })
})
