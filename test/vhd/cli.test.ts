/**
 * `imgtool create -f vpc` and `imgtool convert -O vpc` through the CLI: the same virtual size and file
 * size as qemu-img's own file for the same options, and a conversion qemu-img calls identical.
 */
import { statSync } from 'node:fs'
import { join } from 'node:path'
import { expect, it } from 'vitest'
import { cli } from '../support/cli.js'
import { describeQemu, makeTempDir, qemuImg, qemuImgJson, qemuImgOk, qemuIoOk, useTempDirs } from '../support/qemu.js'

useTempDirs()

describeQemu('vpc through the CLI', () => {
  const dir = makeTempDir('imgtool-vhd-cli-')

  for (const [opts, size] of [
    ['subformat=dynamic', '10M'],
    ['subformat=fixed', '7654321'],
    ['subformat=fixed,force_size=on', '64M'],
  ] as const) {
    it(`create -f vpc -o ${opts} ${size}: qemu-img's virtual and file size`, async () => {
      const ours = join(dir, `ours-${opts}-${size}.vhd`.replace(/[=,]/g, '_'))
      const theirs = join(dir, `theirs-${opts}-${size}.vhd`.replace(/[=,]/g, '_'))
      const r = await cli('create', '-f', 'vpc', '-o', opts, ours, size)
      expect(r.stderr).toBe('')
      expect(r.code).toBe(0)
      await qemuImgOk(['create', '-q', '-f', 'vpc', '-o', opts, theirs, size])
      const a = await qemuImgJson<{ 'virtual-size': number }>(['info', '-f', 'vpc', '--output=json', ours])
      const b = await qemuImgJson<{ 'virtual-size': number }>(['info', '-f', 'vpc', '--output=json', theirs])
      expect(a['virtual-size']).toBe(b['virtual-size'])
      expect(statSync(ours).size).toBe(statSync(theirs).size)
    })
  }

  it('convert -O vpc: qemu-img compare calls it identical; imgtool check calls it clean', async () => {
    const src = join(dir, 'src.qcow2')
    await qemuImgOk(['create', '-q', '-f', 'qcow2', src, '8M'])
    await qemuIoOk(src, ['write -P 0x5a 0 1M', 'write -P 0xa5 5M 64k'], { format: 'qcow2' })
    const out = join(dir, 'out.vhd')
    const r = await cli('convert', '-O', 'vpc', src, out)
    expect(r.stderr).toBe('')
    expect(r.code).toBe(0)
    const cmp = await qemuImg(['compare', '-f', 'qcow2', '-F', 'vpc', src, out])
    expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0)
    const c = await cli('check', out)
    expect(c.code).toBe(0)
  })

  it('create -f vpc with a backing file is refused before a file is made', async () => {
    const out = join(dir, 'backed.vhd')
    const r = await cli('create', '-f', 'vpc', '-b', 'base.raw', '-F', 'raw', out, '1M')
    expect(r.code).toBe(1)
    expect(r.stderr).toContain("Backing file not supported for file format 'vpc'")
    expect(() => statSync(out)).toThrow()
  })
})
