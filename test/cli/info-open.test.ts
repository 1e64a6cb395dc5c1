/**
 * Opening and info against qemu-img 7.2 on the same images (issues 9 and 10):
 * encrypted images, tables past the end of the file, sizes that are not a
 * multiple of 512, backing names with NUL bytes, bad UTF-8, control
 * characters or a protocol prefix, missing and looping backing files, deep
 * chains, and the header refusals of qcow2_do_open.
 */
import { mkdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { beforeAll, expect, it } from 'vitest'
import { main } from '../../src/cli/main.js'
import { collector, describeQemu, makeTempDir, md5, qemuImg, qemuImgOk, qemuIoOk, useTempDirs } from '../support/qemu.js'

useTempDirs()

async function run(args: string[], cwd?: string): Promise<{ code: number; stdout: Buffer; stderr: string }> {
  const out = collector()
  const err = collector()
  const before = process.cwd()
  if (cwd) process.chdir(cwd)
  try {
    const code = await main(['node', 'imgtool', ...args], { stdout: out, stderr: err, isTTY: false })
    return { code, stdout: out.bytes(), stderr: err.text() }
  } finally {
    if (cwd) process.chdir(before)
  }
}

const json = async (args: string[]): Promise<Record<string, unknown>> => {
  const r = await run([...args.slice(0, 1), '--output', 'json', ...args.slice(1)])
  expect(r.stderr).toBe('')
  expect(r.code).toBe(0)
  return JSON.parse(r.stdout.toString()) as Record<string, unknown>
}

const patch = (file: string, at: number, bytes: Buffer | number[]): void => {
  const b = readFileSync(file)
  Buffer.from(bytes).copy(b, at)
  writeFileSync(file, b)
}
const be32 = (v: number): Buffer => {
  const b = Buffer.alloc(4)
  b.writeUInt32BE(v >>> 0)
  return b
}
const be64 = (v: number | bigint): Buffer => {
  const b = Buffer.alloc(8)
  b.writeBigUInt64BE(BigInt(v))
  return b
}

/** qemu-img convert -O raw's bytes, the reference for cat */
async function qemuRaw(dir: string, file: string): Promise<Buffer> {
  const out = join(dir, `ref-${Math.random().toString(36).slice(2)}.raw`)
  await qemuImgOk(['convert', '-O', 'raw', file, out])
  return readFileSync(out)
}

/** The one line imgtool printed: no raw control bytes, no Node internals. */
function expectOneCleanLine(stderr: string): void {
  expect(stderr.split('\n').filter((l) => l !== '')).toHaveLength(1)
  expect(stderr.slice(0, -1)).not.toMatch(/[\u0000-\u001f\u007f-\u009f]/)
  expect(stderr).not.toMatch(/ERR_|internal error|\bat \w+ \(/)
}

describeQemu(
  'info and opening match qemu-img on encrypted images',
  () => {
    let dir = ''
    beforeAll(async () => {
      dir = makeTempDir('imgtool-enc-')
      const secret = ['--object', 'secret,id=s0,data=pw']
      await qemuImgOk([
        'create',
        '-q',
        '-f',
        'qcow2',
        ...secret,
        '-o',
        'encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=250',
        join(dir, 'luks.qcow2'),
        '1M',
      ])
      await qemuImgOk(['create', '-q', '-f', 'qcow2', ...secret, '-o', 'encrypt.format=aes,encrypt.key-secret=s0', join(dir, 'aes.qcow2'), '1M'])
      await qemuImgOk([
        'create',
        '-q',
        '-f',
        'qcow2',
        ...secret,
        '-o',
        'encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=250,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha1',
        join(dir, 'essiv.qcow2'),
        '1M',
      ])
      await qemuImgOk(['create', '-q', '-f', 'qcow2', join(dir, 'base.qcow2'), '1M'])
      await qemuImgOk([
        'create',
        '-q',
        '-f',
        'qcow2',
        ...secret,
        '-o',
        'encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=250',
        '-b',
        'base.qcow2',
        '-F',
        'qcow2',
        join(dir, 'luks-backed.qcow2'),
      ])
    })

    for (const name of ['luks.qcow2', 'aes.qcow2', 'essiv.qcow2', 'luks-backed.qcow2']) {
      it(`${name}: info --output json is qemu-img info's, "encrypted": true and the encrypt block included`, async () => {
        const file = join(dir, name)
        const r = await run(['info', '--output', 'json', file])
        expect(r.code).toBe(0)
        const q = await qemuImgOk(['info', '--output', 'json', file])
        expect(r.stdout.toString()).toBe(q)
        expect(JSON.parse(q)).toMatchObject({ encrypted: true })
      })
    }

    it("human info is qemu-img info's: encrypted: yes and the encrypt block with its LUKS parameters", async () => {
      for (const name of ['essiv.qcow2', 'aes.qcow2', 'luks-backed.qcow2']) {
        const file = join(dir, name)
        const r = await run(['info', file])
        expect(r.code).toBe(0)
        expect(r.stdout.toString()).toBe(await qemuImgOk(['info', file]))
      }
      const text = (await run(['info', join(dir, 'essiv.qcow2')])).stdout.toString()
      expect(text).toContain('\nencrypted: yes\n')
      for (const s of ['format: luks', 'cipher alg: aes-128', 'cipher mode: cbc', 'ivgen alg: essiv', 'ivgen hash alg: sha256', 'hash alg: sha1'])
        expect(text).toContain(s)
      expect((await run(['info', join(dir, 'aes.qcow2')])).stdout.toString()).toContain('format: aes')
      expect((await run(['info', '--table', join(dir, 'aes.qcow2')])).stdout.toString()).toMatch(/encrypted\s*│ yes/)
    })

    it('crypt_method 2 without a crypto header extension: refused as qemu-img refuses it (info and check exit 1)', async () => {
      const file = join(dir, 'nocrypto.qcow2')
      await qemuImgOk(['create', '-q', '-f', 'qcow2', file, '1M'])
      patch(file, 32, be32(2))
      // (qemu-img 7.2 info dies of SIGSEGV on this image; check names the reason)
      const q = await qemuImg(['check', file])
      expect(q.code).toBe(1)
      expect(q.stderr).toContain('Missing CRYPTO header for crypt method 2')
      for (const cmd of ['info', 'check']) {
        const r = await run([cmd, file])
        expect(r.code, cmd).toBe(1)
        expect(r.stderr).toContain('Missing CRYPTO header for crypt method 2')
        expectOneCleanLine(r.stderr)
      }
    })
  },
  ['qemu-img'],
)

describeQemu(
  'info, cat and convert agree with qemu-img on sizes and tables past the end of the file',
  () => {
    let dir = ''
    beforeAll(() => {
      dir = makeTempDir('imgtool-size-')
    })

    it('a raw file of 1000 bytes is 1024 bytes to info, cat, map and convert, as to qemu-img', async () => {
      const file = join(dir, 'odd.raw')
      writeFileSync(file, Buffer.from(Array.from({ length: 1000 }, (_, i) => (i * 7 + 1) & 0xff)))
      expect(((await json(['info', file])) as { 'virtual-size': number })['virtual-size']).toBe(1024)
      const ref = await qemuRaw(dir, file)
      expect(ref.length).toBe(1024)
      const cat = await run(['cat', file])
      expect(cat.code).toBe(0)
      expect(md5(cat.stdout)).toBe(md5(ref))
      const map = await run(['map', '--output', 'json', file])
      expect(map.stdout.toString()).toBe(await qemuImgOk(['map', '--output', 'json', file]))
      await run(['convert', '-O', 'raw', file, join(dir, 'odd-out.raw')])
      expect(readFileSync(join(dir, 'odd-out.raw')).equals(ref)).toBe(true)
      await run(['convert', '-O', 'qcow2', file, join(dir, 'odd-out.qcow2')])
      expect(JSON.parse(await qemuImgOk(['info', '--output', 'json', join(dir, 'odd-out.qcow2')]))['virtual-size']).toBe(1024)
    })

    it('a qcow2 size of 0x2000ff is 2,097,152 bytes to info, cat, check and convert, as to qemu-img (rounded down)', async () => {
      const file = join(dir, 'sz.qcow2')
      await qemuImgOk(['create', '-q', '-f', 'qcow2', file, '2M'])
      await qemuIoOk(file, ['write -P 7 0 2M'], { format: 'qcow2' })
      patch(file, 24, be64(0x2000ff))
      const q = JSON.parse(await qemuImgOk(['info', '--output', 'json', file])) as Record<string, unknown>
      expect(q['virtual-size']).toBe(2097152)
      expect((await json(['info', file]))['virtual-size']).toBe(2097152)
      const ref = await qemuRaw(dir, file)
      const cat = await run(['cat', file])
      expect(cat.stdout.length).toBe(2097152)
      expect(md5(cat.stdout)).toBe(md5(ref))
      await run(['convert', '-O', 'raw', file, join(dir, 'sz-out.raw')])
      expect(statSync(join(dir, 'sz-out.raw')).size).toBe(2097152)
      await run(['convert', '-O', 'qcow2', file, join(dir, 'sz-out.qcow2')])
      expect(JSON.parse(await qemuImgOk(['info', '--output', 'json', join(dir, 'sz-out.qcow2')]))['virtual-size']).toBe(2097152)
      const check = await run(['check', '--output', 'json', file])
      const qcheck = JSON.parse((await qemuImg(['check', '--output', 'json', file])).stdout) as Record<string, unknown>
      expect(JSON.parse(check.stdout.toString())).toMatchObject({ 'total-clusters': qcheck['total-clusters'] })
    })

    for (const [what, field, value] of [
      ['L1 table', 40, 0x100000],
      ['refcount table', 48, 0x100000],
    ] as const) {
      it(`${what} past the end of the file: info shows the header and cat reads what qemu-img convert reads`, async () => {
        const file = join(dir, `past-${field}.qcow2`)
        await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', file, '4M'])
        await qemuIoOk(file, ['write -P 1 0 64k'], { format: 'qcow2' })
        patch(file, field, be64(value))
        const r = await run(['info', '--output', 'json', file])
        expect(r.stderr).toBe('')
        expect(r.stdout.toString()).toBe(await qemuImgOk(['info', '--output', 'json', file]))
        const cat = await run(['cat', file])
        expect(cat.code).toBe(0)
        expect(md5(cat.stdout)).toBe(md5(await qemuRaw(dir, file)))
        // writing to it is still refused (qemu would allocate over the missing table)
        const resize = await run(['resize', file, '+1M'])
        expect(resize.code).toBe(1)
        expectOneCleanLine(resize.stderr)
      })
    }

    it('an L1 of 4 Mi entries running past the end of the file: info works, no read past the end', async () => {
      const file = join(dir, 'bigl1.qcow2')
      await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', file, '8M'])
      patch(file, 36, be32(4 * 1024 * 1024))
      const r = await run(['info', '--output', 'json', file])
      expect(r.stderr).toBe('')
      expect(r.stdout.toString()).toBe(await qemuImgOk(['info', '--output', 'json', file]))
    })
  },
  ['qemu-img', 'qemu-io'],
)

describeQemu(
  'backing and data file names: NUL, bad UTF-8, control characters, protocols',
  () => {
    let dir = ''
    beforeAll(async () => {
      dir = makeTempDir('imgtool-names-')
      await qemuImgOk(['create', '-q', '-f', 'qcow2', join(dir, 'base.qcow2'), '1M'])
      await qemuIoOk(join(dir, 'base.qcow2'), ['write -P 9 0 64k'], { format: 'qcow2' })
    })

    /** an image whose backing name is `name` (as bytes, patched over a placeholder of the same length) */
    async function withBackingBytes(file: string, name: Buffer, size?: number): Promise<{ offset: number }> {
      const placeholder = 'X'.repeat(name.length)
      await qemuImgOk(['create', '-q', '-f', 'qcow2', '-u', '-b', placeholder, '-F', 'qcow2', file, '1M'])
      const b = readFileSync(file)
      const offset = Number(b.readBigUInt64BE(8))
      name.copy(b, offset)
      if (size !== undefined) b.writeUInt32BE(size, 16)
      writeFileSync(file, b)
      return { offset }
    }

    it('a NUL inside the name: the name ends there, as in qemu (check clean, cat reads the backing file)', async () => {
      const file = join(dir, 'nul.qcow2')
      await qemuImgOk(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', file])
      const size = readFileSync(file).readUInt32BE(16)
      patch(file, 16, be32(size + 1))
      expect((await qemuImg(['check', file])).code).toBe(0)
      const check = await run(['check', file])
      expect(check.stderr).toBe('')
      expect(check.code).toBe(0)
      const info = await json(['info', file])
      const q = JSON.parse(await qemuImgOk(['info', '--output', 'json', file])) as Record<string, unknown>
      expect(info['backing-filename']).toBe(q['backing-filename'])
      expect(info['full-backing-filename']).toBe(q['full-backing-filename'])
      expect(md5((await run(['cat', file])).stdout)).toBe(md5(await qemuRaw(dir, file)))
    })

    it('a name that is not UTF-8: info shows it as qemu-img does; opening it is one line naming the file, the structure and the offset', async () => {
      const file = join(dir, 'bad8.qcow2')
      const { offset } = await withBackingBytes(file, Buffer.from([0x62, 0x61, 0x73, 0x65, 0xff, 0x2e, 0x71]))
      const info = await run(['info', '--output', 'json', file])
      expect(info.code).toBe(0)
      expect(info.stdout.toString()).toBe(await qemuImgOk(['info', '--output', 'json', file]))
      for (const cmd of ['cat', 'check', 'map']) {
        const r = await run([cmd, file])
        expect(r.code, cmd).toBe(1)
        expectOneCleanLine(r.stderr)
        expect(r.stderr).toContain(`${file}: backing file name "base\\xff.q" is not valid UTF-8 (backing file name at 0x${offset.toString(16)})`)
      }
    })

    it('control characters in a name never reach the terminal raw (info and errors escape them)', async () => {
      const file = join(dir, 'ctl.qcow2')
      await withBackingBytes(file, Buffer.from('a\x1b[2Jb\x07'))
      const info = await run(['info', file])
      expect(info.code).toBe(0)
      expect(info.stdout.toString()).toContain('a\\x1b[2Jb\\x07')
      expect(info.stdout.toString()).not.toContain('\x1b')
      const cat = await run(['cat', file])
      expect(cat.code).toBe(1)
      expectOneCleanLine(cat.stderr)
      expect(cat.stderr).toContain('a\\x1b[2Jb\\x07')
    })

    it('a truncated header whose backing name lies past the end of the file: no backing file, as in qemu', async () => {
      const file = join(dir, 'trunc.qcow2')
      await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', '-u', '-b', 'base.qcow2', '-F', 'qcow2', file, '1M'])
      const b = readFileSync(file)
      const offset = Number(b.readBigUInt64BE(8))
      writeFileSync(file, b.subarray(0, offset))
      const q = await qemuImg(['info', '--output', 'json', file])
      const r = await run(['info', '--output', 'json', file])
      expect(r.code).toBe(q.code)
      expect(r.stdout.toString()).toBe(q.stdout)
      expect(q.stdout).not.toContain('backing-filename"')
    })

    it("a name with ':' is a protocol to qemu: refused with one line, never opened relative to the current directory", async () => {
      const cwd = join(dir, 'cwd')
      const img = join(dir, 'img')
      mkdirSync(cwd)
      mkdirSync(img)
      writeFileSync(join(cwd, 'x:y'), 'SECRET')
      writeFileSync(join(img, 'x:y'), 'SECRET')
      await qemuImgOk(['create', '-q', '-f', 'qcow2', '-u', '-b', 'x:y', '-F', 'raw', join(img, 'colon.qcow2'), '64'])
      const q = await qemuImg(['convert', '-O', 'raw', '../img/colon.qcow2', join(dir, 'colon.raw')], { cwd })
      expect(q.code).toBe(1)
      expect(q.stderr).toContain("Unknown protocol 'x'")
      for (const cmd of ['cat', 'check', 'map']) {
        const r = await run([cmd, '../img/colon.qcow2'], cwd)
        expect(r.code, cmd).toBe(1)
        expect(r.stdout.toString()).not.toContain('SECRET')
        expectOneCleanLine(r.stderr)
        expect(r.stderr).toContain("backing file x:y names the protocol 'x:'")
        expect(r.stderr).toMatch(/\(backing file name at 0x[0-9a-f]+\)$/m)
      }
      // info shows the name, as qemu-img info does
      const info = await run(['info', '--output', 'json', '../img/colon.qcow2'], cwd)
      expect(info.stdout.toString()).toBe((await qemuImg(['info', '--output', 'json', '../img/colon.qcow2'], { cwd })).stdout)
      for (const name of ['json:{"driver":"raw","file":{"driver":"file","filename":"/etc/hostname"}}', 'file:/etc/hostname', 'nbd://localhost/x']) {
        const file = join(img, 'proto.qcow2')
        await qemuImgOk(['create', '-q', '-f', 'qcow2', '-u', '-b', name, '-F', 'raw', file, '64'])
        const r = await run(['cat', file])
        expect(r.code, name).toBe(1)
        expect(r.stdout.length).toBe(0)
        expect(r.stderr).toContain('names the protocol')
      }
    })

    it('a data file name with a protocol prefix is refused the same way', async () => {
      const file = join(dir, 'df.qcow2')
      await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', 'data_file=df.raw', file, '1M'], { cwd: dir })
      const b = readFileSync(file)
      const at = b.indexOf('df.raw')
      b.write('d:.raw', at, 'latin1')
      writeFileSync(file, b)
      const r = await run(['cat', file])
      expect(r.code).toBe(1)
      expectOneCleanLine(r.stderr)
      expect(r.stderr).toContain("data file d:.raw names the protocol 'd:'")
      expect(r.stderr).toMatch(/\(data file name at 0x[0-9a-f]+\)$/m)
    })
  },
  ['qemu-img', 'qemu-io'],
)

describeQemu(
  'info of an image whose backing file is missing or loops: as qemu-img info',
  () => {
    let dir = ''
    beforeAll(async () => {
      dir = makeTempDir('imgtool-missing-')
      await qemuImgOk(['create', '-q', '-f', 'qcow2', '-u', '-b', 'missing.qcow2', '-F', 'qcow2', join(dir, 'miss.qcow2'), '1M'])
      await qemuImgOk(['create', '-q', '-f', 'qcow2', '-u', '-b', 'loop2.qcow2', '-F', 'qcow2', join(dir, 'loop1.qcow2'), '1M'])
      await qemuImgOk(['create', '-q', '-f', 'qcow2', '-u', '-b', 'loop1.qcow2', '-F', 'qcow2', join(dir, 'loop2.qcow2'), '1M'])
      // (qemu-img create makes a relative data file in its current directory)
      await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', 'data_file=gone.raw', join(dir, 'nodata.qcow2'), '1M'], { cwd: dir })
    })

    for (const name of ['miss.qcow2', 'loop1.qcow2', 'nodata.qcow2']) {
      it(`${name}: info --output json is qemu-img's, exit 0`, async () => {
        const file = join(dir, name)
        if (name === 'nodata.qcow2') rmSync(join(dir, 'gone.raw'), { force: true })
        const r = await run(['info', '--output', 'json', file])
        expect(r.stderr).toBe('')
        expect(r.code).toBe(0)
        expect(r.stdout.toString()).toBe(await qemuImgOk(['info', '--output', 'json', file]))
        const human = await run(['info', file])
        expect(human.code).toBe(0)
      })
    }

    it('--backing-chain opens the chain and fails, as qemu-img info --backing-chain does', async () => {
      for (const name of ['miss.qcow2', 'loop1.qcow2']) {
        const q = await qemuImg(['info', '--backing-chain', join(dir, name)])
        expect(q.code).toBe(1)
        const r = await run(['info', '--backing-chain', join(dir, name)])
        expect(r.code, name).toBe(1)
        expectOneCleanLine(r.stderr)
      }
    })
  },
  ['qemu-img'],
)

describeQemu(
  'deep backing chains: read as deep as qemu-img reads',
  () => {
    it('a 66-image chain: cat gives qemu-img convert bytes; a loop is still refused', async () => {
      const dir = makeTempDir('imgtool-deep-')
      await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', join(dir, 'c0.qcow2'), '1M'])
      await qemuIoOk(join(dir, 'c0.qcow2'), ['write -P 100 0 4k'], { format: 'qcow2' })
      for (let i = 1; i <= 65; i++) {
        const f = join(dir, `c${i}.qcow2`)
        await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', '-u', '-b', `c${i - 1}.qcow2`, '-F', 'qcow2', f, '1M'])
        if (i % 5 === 0) await qemuIoOk(f, [`write -P ${i} ${i * 4}k 4k`], { format: 'qcow2' })
      }
      const top = join(dir, 'c65.qcow2')
      const r = await run(['cat', top])
      expect(r.stderr).toBe('')
      expect(r.code).toBe(0)
      expect(md5(r.stdout)).toBe(md5(await qemuRaw(dir, top)))
      // close the chain into a loop: c0 -> c65
      await qemuImgOk(['rebase', '-u', '-f', 'qcow2', '-b', 'c65.qcow2', '-F', 'qcow2', join(dir, 'c0.qcow2')])
      const loop = await run(['cat', top])
      expect(loop.code).toBe(1)
      expectOneCleanLine(loop.stderr)
      expect(loop.stderr).toContain('backing chain loop')
    }, 240_000)
  },
  ['qemu-img', 'qemu-io'],
)

describeQemu(
  'images qemu-img cannot open are not called clean (D15)',
  () => {
    it('an end marker whose length runs past the header cluster: check exit 1 with qemu-img reason, as qemu-img check', async () => {
      const dir = makeTempDir('imgtool-ext-')
      const file = join(dir, 'ext.qcow2')
      await qemuImgOk(['create', '-q', '-f', 'qcow2', file, '1M'])
      const b = readFileSync(file)
      let off = b.readUInt32BE(100)
      while (b.readUInt32BE(off) !== 0) off += 8 + Math.ceil(b.readUInt32BE(off + 4) / 8) * 8
      b.writeUInt32BE(0x20000, off + 4)
      writeFileSync(file, b)
      const q = await qemuImg(['check', file])
      expect(q.code).toBe(1)
      expect(q.stderr).toContain('Header extension too large')
      for (const cmd of ['check', 'info', 'cat']) {
        const r = await run([cmd, file])
        expect(r.code, cmd).toBe(1)
        expectOneCleanLine(r.stderr)
        expect(r.stderr).toContain(`Header extension too large: extension 0x0 claims 131072 bytes (header extension at 0x${off.toString(16)})`)
      }
    })
  },
  ['qemu-img'],
)
