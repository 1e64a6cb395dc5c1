/** imgtool map: JSON and human rendering against qemu-img map, ranges, errors and exit codes. */
import { readFileSync } from 'node:fs'
import { describe, expect, it } from 'vitest'
import { describeQemu, qemuImg, qemuImgOk } from '../support/qemu.js'
import { cli, FIXTURES, fx } from '../support/cli.js'

describe('imgtool map', () => {
  it('--output json, --json and --output=json print the golden qemu-img map text', async () => {
    const golden = readFileSync(fx('chain-top.qcow2.map.json'), 'utf8')
    for (const flags of [['--output', 'json'], ['--json'], ['--output=json']]) {
      const r = await cli('map', ...flags, fx('chain-top.qcow2'))
      expect(r.code).toBe(0)
      expect(r.stderr).toBe('')
      expect(r.stdout).toBe(golden)
    }
  })

  it('human output lists the data ranges with host offsets and the file', async () => {
    const r = await cli('map', fx('v3-c4k.qcow2'))
    expect(r.code).toBe(0)
    const lines = r.stdout.trimEnd().split('\n')
    expect(lines[0]).toBe('Offset          Length          Mapped to       File')
    expect(lines[1]).toBe(`0               0x1000          0x5000          ${fx('v3-c4k.qcow2')}`)
    expect(lines.length).toBeGreaterThan(2)
  })

  it('-f raw maps the file itself', async () => {
    const r = await cli('map', '-f', 'raw', '--json', fx('v3-c4k.qcow2'))
    expect(r.code).toBe(0)
    const entries = JSON.parse(r.stdout) as Array<Record<string, unknown>>
    expect(entries[0]).toMatchObject({ start: 0, depth: 0, present: true, offset: 0 })
  })

  it('an unknown format, a missing file and a bad --output are one line, exit 1, nothing on stdout', async () => {
    const cases: Array<[string[], string]> = [
      [['map', '-f', 'qed', fx('v3-c4k.qcow2')], "imgtool: Unknown file format 'qed' (known: qcow2, dmsnap, vpc, vmdk, raw)\n"],
      [['map', '--json', '/nonexistent/y.qcow2'], 'imgtool: /nonexistent/y.qcow2: No such file or directory\n'],
      [['map', '--output', 'yaml', fx('v3-c4k.qcow2')], "imgtool: --output must be 'human' or 'json', not 'yaml'\n"],
    ]
    for (const [args, stderr] of cases) {
      const r = await cli(...args)
      expect(r.code, args.join(' ')).toBe(1)
      expect(r.stdout).toBe('')
      expect(r.stderr).toBe(stderr)
    }
  })
})

describeQemu(
  'imgtool map against live qemu-img map',
  () => {
    const images = ['v3-c4k.qcow2', 'chain-top.qcow2', 'v3-extl2-c32k-backing.qcow2', 'v3-datafile.qcow2', 'v2-zero.qcow2', 'v3-prealloc-metadata.qcow2']

    it.each(images)('human output of %s equals qemu-img map', async (name) => {
      const want = await qemuImgOk(['map', '-f', 'qcow2', name], { cwd: FIXTURES })
      const cwd = process.cwd()
      process.chdir(FIXTURES)
      try {
        const r = await cli('map', name)
        expect(r.stderr).toBe('')
        expect(r.stdout).toBe(want)
      } finally {
        process.chdir(cwd)
      }
    })

    it('human output of an image with compressed clusters lists the mapped ranges (qemu-img refuses the whole map)', async () => {
      const q = await qemuImg(['map', '-f', 'qcow2', fx('v3-compressed-zlib.qcow2')])
      expect(q.code).toBe(1)
      expect(q.stderr).toContain('compressed clusters')
      const r = await cli('map', fx('v3-compressed-zlib.qcow2'))
      expect(r.code).toBe(0)
      // the lines qemu prints before it gives up are ours too
      expect(r.stdout.startsWith(q.stdout)).toBe(true)
      const json = JSON.parse((await cli('map', '--json', fx('v3-compressed-zlib.qcow2'))).stdout) as Array<{ data: boolean; offset?: number }>
      expect(r.stdout.trimEnd().split('\n').length - 1).toBe(json.filter((e) => e.data && e.offset !== undefined).length)
    })

    it.each([
      ['chain-top.qcow2', '4096', '100000'],
      ['chain-top.qcow2', '65536', '1M'],
      ['v3-c4k.qcow2', '2044k', '8k'],
      ['v3-extl2-c64k.qcow2', '1000', '70000'],
      ['v3-c4k.qcow2', '8M', '4096'],
      ['v3-c4k.qcow2', '0', '0'],
    ])('--start-offset %s --max-length %s of %s equals qemu-img map (JSON)', async (name, start, len) => {
      const want = await qemuImgOk(['map', '-f', 'qcow2', '--output=json', `--start-offset=${start}`, `--max-length=${len}`, fx(name)])
      const r = await cli('map', '--output', 'json', '--start-offset', start, '--max-length', len, fx(name))
      expect(r.stderr).toBe('')
      expect(r.code).toBe(0)
      expect(r.stdout).toBe(want)
    })
  },
  ['qemu-img'],
)
