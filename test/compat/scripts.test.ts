/**
 * Script compatibility: qemu-img invocations as scripts write them (pipelines through grep and awk included),
 * run unchanged with qemu-img and with imgtool, each in its own copy of the same files. Where imgtool claims
 * compatibility the exit code and stdout are identical and the files a command writes read the same guest
 * bytes (qemu-img compare) with the same qemu-img info fields. The deliberate differences are listed at the
 * end with their reason, and tested to still be what they say.
 */
import { execFileSync, spawnSync } from 'node:child_process'
import { mkdirSync, readdirSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { beforeAll, expect, it, vi } from 'vitest'
import { QEMU_IMG, describeQemu, makeTempDir, parseJson, qemuImg, useTempDirs } from '../support/qemu.js'

const ROOT = resolve(__dirname, '..', '..')
const BIN = join(ROOT, 'bin', 'imgtool')
const QCOW2 = join(ROOT, 'images', 'qcow2')

/** the files every case starts from (copied, holes kept, into each tool's own directory) */
const INPUTS = [
  'v3-c64k.qcow2',
  'v2-c4k.qcow2',
  'v2-snapshot.qcow2',
  'v3-snapshot.qcow2',
  'v3-bitmap.qcow2',
  'v3-compressed-zstd.qcow2',
  'v3-extl2-c64k.qcow2',
  'v3-dirty-lazy.qcow2',
  'v3-rc1.qcow2',
  'v3-zero.qcow2',
  'chain-base.qcow2',
  'chain-mid.qcow2',
  'chain-top.qcow2',
]

interface Case {
  /** the command line, `$T` standing for the tool (qemu-img or imgtool) */
  sh: string
  /** files the command writes: compared by guest bytes and qemu-img info afterwards */
  writes?: string[]
  /** stdout is not compared (it holds times or host-dependent sizes), only the exit code and the files */
  exitOnly?: boolean
  /** stdout holds check JSON: compared without the members imgtool adds (`findings`, `notices`) */
  checkJson?: boolean
}

/** check JSON as qemu-img prints it: imgtool's additions (`findings`, `notices`) taken out, the rest as printed */
function withoutAdditions(stdout: string): string {
  const start = stdout.indexOf('{')
  const end = stdout.lastIndexOf('}')
  if (start < 0 || end < start) return stdout
  const j = JSON.parse(stdout.slice(start, end + 1)) as Record<string, unknown>
  expect(Array.isArray(j['findings']), 'imgtool adds findings').toBe(true)
  delete j['findings']
  delete j['notices']
  return stdout.slice(0, start) + JSON.stringify(j, null, 4) + stdout.slice(end + 1)
}

const CASES: Case[] = [
  // info, as scripts read it
  ...['v3-c64k', 'v2-c4k', 'v2-snapshot', 'v3-bitmap', 'v3-compressed-zstd', 'v3-extl2-c64k', 'chain-top'].map((n) => ({ sh: `$T info ${n}.qcow2` })),
  { sh: '$T info -f qcow2 v3-c64k.qcow2' },
  { sh: '$T info --output=json v3-c64k.qcow2' },
  { sh: '$T info --output json v3-snapshot.qcow2' },
  { sh: '$T info --output=json --backing-chain chain-top.qcow2' },
  { sh: '$T info --backing-chain chain-top.qcow2' },
  { sh: "$T info chain-top.qcow2 | grep '^backing file:'" },
  { sh: "$T info v3-c64k.qcow2 | awk '/virtual size/ {print $3, $4}'" },
  { sh: "$T info v3-c64k.qcow2 | grep -c '^cluster_size: 65536$'" },
  { sh: '$T info --output=json v3-c64k.qcow2 | grep \'"virtual-size"\'' },
  { sh: '$T info --output=json v3-bitmap.qcow2 | grep -c \'"name"\'' },
  { sh: '$T info missing.qcow2', exitOnly: true },
  // check
  { sh: '$T check v3-c64k.qcow2' },
  { sh: '$T check --output=json v3-c64k.qcow2', checkJson: true },
  { sh: '$T check -q v3-c64k.qcow2; echo "rc=$?"' },
  { sh: '$T check v3-dirty-lazy.qcow2 2>/dev/null; echo "rc=$?"' },
  { sh: '$T check --output=json v3-dirty-lazy.qcow2; echo "rc=$?"', checkJson: true },
  { sh: '$T check v3-dirty-lazy.qcow2 2>&1 >/dev/null | grep -c ERROR' },
  { sh: '$T check v3-rc1.qcow2 | tail -1' },
  { sh: '$T check -r leaks v3-c64k.qcow2', writes: ['v3-c64k.qcow2'] },
  // map
  { sh: '$T map --output=json v3-c64k.qcow2' },
  { sh: '$T map --output=json v3-zero.qcow2' },
  { sh: '$T map --output=json chain-top.qcow2' },
  // snapshot, compare, measure
  { sh: '$T snapshot -l v2-snapshot.qcow2' },
  { sh: '$T snapshot -l v3-c64k.qcow2; echo "rc=$?"' },
  { sh: '$T compare v3-c64k.qcow2 v3-c64k.qcow2; echo "rc=$?"' },
  { sh: '$T compare v3-c64k.qcow2 v2-c4k.qcow2; echo "rc=$?"' },
  { sh: '$T compare -q v3-c64k.qcow2 v2-c4k.qcow2; echo "rc=$?"' },
  { sh: '$T compare -s chain-top.qcow2 chain-top.qcow2; echo "rc=$?"' },
  { sh: '$T measure -O qcow2 --size 10G' },
  { sh: '$T measure --output=json -O qcow2 -o cluster_size=4096 --size 1G' },
  { sh: '$T measure -O qcow2 v3-bitmap.qcow2' },
  { sh: '$T measure --output=json -O raw v3-c64k.qcow2' },
  // create
  { sh: '$T create -f qcow2 new.qcow2 1G', writes: ['new.qcow2'] },
  { sh: '$T create -f qcow2 -o cluster_size=4096,lazy_refcounts=on new.qcow2 64M', writes: ['new.qcow2'] },
  { sh: '$T create -f qcow2 -o compat=0.10 new.qcow2 64M', writes: ['new.qcow2'] },
  { sh: '$T create -f raw new.raw 16M', writes: ['new.raw'] },
  { sh: '$T create -f qcow2 -b chain-base.qcow2 -F qcow2 new.qcow2', writes: ['new.qcow2'] },
  { sh: '$T create -q -f qcow2 new.qcow2 1M; echo "rc=$?"', writes: ['new.qcow2'] },
  { sh: '$T create -f vpc -o subformat=fixed new.vhd 16M', writes: ['new.vhd'] },
  // convert
  { sh: '$T convert -O raw v3-c64k.qcow2 out.raw', writes: ['out.raw'] },
  { sh: '$T convert -f qcow2 -O qcow2 v3-compressed-zstd.qcow2 out.qcow2', writes: ['out.qcow2'] },
  { sh: '$T convert -c -O qcow2 v3-c64k.qcow2 out.qcow2', writes: ['out.qcow2'] },
  { sh: '$T convert -O qcow2 -o cluster_size=4096 chain-top.qcow2 out.qcow2', writes: ['out.qcow2'] },
  { sh: '$T convert -O vpc -o subformat=dynamic v3-c64k.qcow2 out.vhd', writes: ['out.vhd'] },
  { sh: '$T convert -p -O raw v3-c64k.qcow2 out.raw | tail -c 20 | od -c | head -1', writes: ['out.raw'], exitOnly: true },
  { sh: '$T convert -n -O qcow2 v2-c4k.qcow2 v3-c64k.qcow2; echo "rc=$?"', writes: ['v3-c64k.qcow2'] },
  { sh: '$T convert -l snap1 -O raw v3-snapshot.qcow2 out.raw', writes: ['out.raw'] },
  { sh: '$T convert -l snapshot.name=snap2 -O qcow2 v2-snapshot.qcow2 out.qcow2', writes: ['out.qcow2'] },
  { sh: '$T convert -l snapshot.id=9 -O raw v3-snapshot.qcow2 out.raw 2>/dev/null; echo "rc=$?"' },
  { sh: '$T measure --output=json -l snapshot.id=1 -O qcow2 v3-snapshot.qcow2' },
  { sh: '$T check --image-opts driver=qcow2,file.filename=v3-c64k.qcow2' },
  { sh: '$T map --output=json --image-opts driver=qcow2,file.driver=file,file.filename=chain-top.qcow2' },
  { sh: '$T convert --image-opts -O raw driver=qcow2,file.filename=v3-c64k.qcow2 out.raw', writes: ['out.raw'] },
  // resize, snapshot changes, rebase, commit, dd
  { sh: '$T resize v3-c64k.qcow2 +64M', writes: ['v3-c64k.qcow2'] },
  { sh: '$T resize -f qcow2 v2-c4k.qcow2 2G', writes: ['v2-c4k.qcow2'] },
  { sh: '$T snapshot -c s1 v3-c64k.qcow2; echo "rc=$?"', writes: ['v3-c64k.qcow2'] },
  { sh: '$T snapshot -d snap1 v3-snapshot.qcow2; echo "rc=$?"', writes: ['v3-snapshot.qcow2'] },
  { sh: '$T snapshot -a snap1 v3-snapshot.qcow2; echo "rc=$?"', writes: ['v3-snapshot.qcow2'] },
  { sh: '$T rebase -u -b chain-base.qcow2 -F qcow2 chain-top.qcow2; echo "rc=$?"', writes: ['chain-top.qcow2'] },
  { sh: '$T rebase -b chain-base.qcow2 -F qcow2 chain-top.qcow2; echo "rc=$?"', writes: ['chain-top.qcow2'] },
  { sh: '$T commit chain-top.qcow2', writes: ['chain-top.qcow2', 'chain-mid.qcow2'] },
  { sh: '$T dd if=v3-c64k.qcow2 of=out.raw bs=64k count=4 -O raw; echo "rc=$?"', writes: ['out.raw'] },
  // a target that is the source: qemu-img's image locks refuse it, imgtool refuses it before the locks
  { sh: '$T dd if=v3-c64k.qcow2 of=v3-c64k.qcow2 -O qcow2; echo "rc=$?"', writes: ['v3-c64k.qcow2'] },
  { sh: '$T convert -n -O qcow2 v3-c64k.qcow2 v3-c64k.qcow2; echo "rc=$?"', writes: ['v3-c64k.qcow2'] },
  // more of what scripts run (issue 14's list: -U, human map, more option sets, amend, the other commit/rebase forms)
  { sh: '$T info -U v3-c64k.qcow2' },
  { sh: '$T info --force-share --output=json v3-c64k.qcow2' },
  { sh: '$T info v3-dirty-lazy.qcow2' },
  { sh: '$T info v3-rc1.qcow2' },
  { sh: '$T info v3-zero.qcow2' },
  { sh: "$T info v2-snapshot.qcow2 | grep -A3 '^Snapshot list:' | cut -c1-20" },
  { sh: "$T info --output=json chain-top.qcow2 | grep 'backing-filename-format'" },
  { sh: '$T info -f raw v3-c64k.qcow2 | head -3' },
  { sh: "$T info chain-mid.qcow2 | sed -n 's/^backing file: //p'" },
  { sh: '$T info --output=json v3-c64k.qcow2 | grep -o \'"cluster-size": [0-9]*\'' },
  { sh: '$T check -U v3-c64k.qcow2' },
  { sh: '$T check -f qcow2 v2-c4k.qcow2' },
  { sh: '$T check v3-snapshot.qcow2' },
  { sh: '$T check --output=json v3-compressed-zstd.qcow2', checkJson: true },
  { sh: '$T check v3-extl2-c64k.qcow2 && echo ok' },
  { sh: '$T check chain-top.qcow2' },
  { sh: '$T check v3-bitmap.qcow2' },
  { sh: '$T check --output json v2-snapshot.qcow2', checkJson: true },
  { sh: '$T map v3-c64k.qcow2' },
  { sh: '$T map chain-top.qcow2' },
  { sh: '$T map -f qcow2 --output=json v3-compressed-zstd.qcow2' },
  { sh: '$T map --output=json v3-extl2-c64k.qcow2' },
  { sh: '$T map --output json v2-snapshot.qcow2' },
  { sh: '$T map --output=json --start-offset=65536 --max-length=1048576 v3-c64k.qcow2' },
  { sh: '$T map -U --output=json chain-mid.qcow2' },
  { sh: '$T compare -f qcow2 -F qcow2 v3-c64k.qcow2 v3-c64k.qcow2; echo "rc=$?"' },
  { sh: '$T compare chain-top.qcow2 chain-mid.qcow2; echo "rc=$?"' },
  { sh: '$T compare -U v3-c64k.qcow2 v3-extl2-c64k.qcow2; echo "rc=$?"' },
  { sh: '$T snapshot -l v3-snapshot.qcow2 | cut -c1-20' },
  { sh: '$T snapshot -c s1 v2-c4k.qcow2 && $T snapshot -l v2-c4k.qcow2 | wc -l', writes: ['v2-c4k.qcow2'] },
  { sh: '$T snapshot -d nosuch v3-snapshot.qcow2; echo "rc=$?"', writes: ['v3-snapshot.qcow2'] },
  { sh: '$T measure --size 1G -O raw' },
  { sh: '$T measure -f qcow2 -O qcow2 -o compat=0.10 v2-snapshot.qcow2' },
  { sh: '$T measure --output=json -O qcow2 -o preallocation=metadata --size 2G' },
  { sh: '$T measure -O qcow2 chain-top.qcow2' },
  { sh: '$T create -f qcow2 -o preallocation=metadata new.qcow2 64M', writes: ['new.qcow2'] },
  { sh: '$T create -f qcow2 -o extended_l2=on,cluster_size=128k new.qcow2 64M', writes: ['new.qcow2'] },
  { sh: '$T create -f qcow2 -o refcount_bits=1 new.qcow2 64M', writes: ['new.qcow2'] },
  { sh: '$T create -f vmdk new.vmdk 64M', writes: ['new.vmdk'] },
  { sh: '$T create -f vpc new.vhd 64M', writes: ['new.vhd'] },
  { sh: '$T create -f qcow2 -o size=32M new.qcow2', writes: ['new.qcow2'] },
  { sh: '$T create -f qcow2 -u -b missing.qcow2 -F qcow2 new.qcow2 1G; echo "rc=$?"; ls new.qcow2' },
  { sh: '$T create -f raw -o preallocation=full new.raw 4M', writes: ['new.raw'] },
  { sh: '$T convert -O qcow2 -o compat=0.10 v3-c64k.qcow2 out.qcow2', writes: ['out.qcow2'] },
  { sh: '$T convert -f qcow2 -O raw -S 0 v2-c4k.qcow2 out.raw', writes: ['out.raw'] },
  { sh: '$T convert -O qcow2 -B chain-base.qcow2 -F qcow2 chain-top.qcow2 out.qcow2', writes: ['out.qcow2'] },
  { sh: '$T convert -t writeback -T writeback -O raw v3-c64k.qcow2 out.raw', writes: ['out.raw'] },
  { sh: '$T convert -O vmdk v3-c64k.qcow2 out.vmdk', writes: ['out.vmdk'] },
  { sh: '$T convert -O vmdk -o subformat=streamOptimized v3-c64k.qcow2 out.vmdk', writes: ['out.vmdk'] },
  { sh: '$T convert -q -O raw v2-snapshot.qcow2 out.raw; echo "rc=$?"', writes: ['out.raw'] },
  { sh: '$T convert -W -m 16 -O raw v3-c64k.qcow2 out.raw', writes: ['out.raw'] },
  { sh: '$T convert -m 17 -O raw v3-c64k.qcow2 out.raw 2>&1 | sed "s/^[a-z-]*: //"; echo "rc=$?"' },
  { sh: "$T convert -O qcow2 chain-top.qcow2 out.qcow2 && $T info out.qcow2 | grep -c '^backing file'", writes: ['out.qcow2'] },
  { sh: '$T convert -O qcow2 missing.qcow2 out.qcow2; echo "rc=$?"', writes: ['out.qcow2'] },
  { sh: '$T resize -q v3-c64k.qcow2 1G; echo "rc=$?"', writes: ['v3-c64k.qcow2'] },
  { sh: '$T resize v3-c64k.qcow2 -64M; echo "rc=$?"', writes: ['v3-c64k.qcow2'] },
  { sh: '$T amend -o lazy_refcounts=on v3-c64k.qcow2; echo "rc=$?"', writes: ['v3-c64k.qcow2'] },
  { sh: '$T amend -o compat=0.10 v3-snapshot.qcow2; echo "rc=$?"', writes: ['v3-snapshot.qcow2'] },
  { sh: '$T amend -f qcow2 -o refcount_bits=8 v2-c4k.qcow2; echo "rc=$?"', writes: ['v2-c4k.qcow2'] },
  { sh: '$T rebase -u -b \'\' chain-top.qcow2; echo "rc=$?"', writes: ['chain-top.qcow2'] },
  { sh: '$T commit -d chain-top.qcow2', writes: ['chain-top.qcow2', 'chain-mid.qcow2'] },
  { sh: '$T commit -b chain-base.qcow2 chain-top.qcow2', writes: ['chain-top.qcow2', 'chain-mid.qcow2', 'chain-base.qcow2'] },
  { sh: '$T dd if=v3-c64k.qcow2 of=out.qcow2 -O qcow2 bs=1M count=1 skip=1; echo "rc=$?"', writes: ['out.qcow2'] },
  { sh: '$T dd -f qcow2 -O raw if=v2-c4k.qcow2 of=out.raw; echo "rc=$?"', writes: ['out.raw'] },
  // convert -C, --salvage, rebase -c, resize --preallocation (issue 14's last flags)
  { sh: '$T convert -C -O raw v3-c64k.qcow2 out.raw; echo "rc=$?"', writes: ['out.raw'] },
  { sh: '$T convert -C -O qcow2 chain-top.qcow2 out.qcow2; echo "rc=$?"', writes: ['out.qcow2'] },
  { sh: '$T convert -C -c -O qcow2 v3-c64k.qcow2 out.qcow2; echo "rc=$?"', writes: ['out.qcow2'] },
  { sh: "$T convert -C -S 4k -O raw v3-c64k.qcow2 out.raw 2>&1 | sed 's/^[^:]*: //'", writes: ['out.raw'] },
  { sh: '$T convert -C --salvage -O raw v3-c64k.qcow2 out.raw; echo "rc=$?"', writes: ['out.raw'] },
  { sh: '$T convert --salvage -O qcow2 v3-compressed-zstd.qcow2 out.qcow2 2>&1; echo "rc=$?"', writes: ['out.qcow2'] },
  { sh: "$T resize --preallocation=metadata v2-snapshot.qcow2 +1M 2>&1 | sed 's/^[^:]*: //'", writes: ['v2-snapshot.qcow2'] },
  { sh: '$T resize --preallocation=falloc v3-c64k.qcow2 +1M; echo "rc=$?"', writes: ['v3-c64k.qcow2'] },
]

/** Run `sh` in `dir` with `$T` bound to the tool. */
function run(tool: 'qemu' | 'ours', dir: string, sh: string): { code: number; stdout: string } {
  const T = tool === 'qemu' ? QEMU_IMG! : `${process.execPath} ${BIN}`
  const r = spawnSync('sh', ['-c', sh], { cwd: dir, encoding: 'utf8', env: { ...process.env, T, LC_ALL: 'C', TZ: 'UTC' } })
  return { code: r.status ?? -1, stdout: r.stdout }
}

function prepare(dir: string): void {
  mkdirSync(dir, { recursive: true })
  for (const f of INPUTS) execFileSync('cp', ['--sparse=always', join(QCOW2, f), join(dir, f)])
}

/** what a written file is: its guest bytes (compared by qemu-img) and the info fields that do not depend on the host */
function infoOf(path: string): Record<string, unknown> {
  const r = spawnSync(QEMU_IMG!, ['info', '--output=json', path], { encoding: 'utf8' })
  const j = parseJson<Record<string, unknown>>(r.stdout)
  delete j['actual-size']
  delete j['filename']
  delete j['full-backing-filename']
  const fs = j['format-specific'] as { data?: Record<string, unknown> } | undefined
  // a VMDK's CID is random and its extents name the file itself
  if (fs?.data) {
    delete fs.data['cid']
    delete fs.data['parent-cid']
    for (const e of (fs.data['extents'] as Array<Record<string, unknown>> | undefined) ?? []) delete e['filename']
  }
  for (const s of (j['snapshots'] as Array<Record<string, unknown>> | undefined) ?? []) {
    delete s['date-sec']
    delete s['date-nsec']
  }
  return { ...j, ...(fs ? { 'format-specific': fs } : {}) }
}

describeQemu('script compatibility: the same invocations, the same answers', () => {
  useTempDirs()
  vi.setConfig({ testTimeout: 600_000 })
  let base: string
  beforeAll(() => {
    base = makeTempDir('imgtool-compat-')
  })

  CASES.forEach((c, i) => {
    it(`${c.sh.replace(/\$T/g, 'qemu-img')}`, async () => {
      const qd = join(base, `${i}-qemu`)
      const od = join(base, `${i}-ours`)
      prepare(qd)
      prepare(od)
      const q = run('qemu', qd, c.sh)
      const o = run('ours', od, c.sh)
      expect(o.code, `exit code (qemu-img ${q.code})`).toBe(q.code)
      if (c.checkJson) expect(withoutAdditions(o.stdout)).toBe(q.stdout)
      else if (!c.exitOnly) expect(o.stdout).toBe(q.stdout)
      for (const f of c.writes ?? []) {
        const qf = join(qd, f)
        const of = join(od, f)
        const exists = readdirSync(qd).includes(f)
        expect(readdirSync(od).includes(f), `${f} exists as with qemu-img`).toBe(exists)
        if (!exists) continue
        const fmt = f.endsWith('.vhd') ? ['-f', 'vpc', '-F', 'vpc'] : [] // a fixed VHD probes as raw in qemu-img
        const cmp = await qemuImg(['compare', ...fmt, qf, of])
        expect(cmp.code, `${f}: ${cmp.stdout}${cmp.stderr}`).toBe(0)
        expect(infoOf(of), f).toEqual(infoOf(qf))
      }
    })
  })

  /** Where imgtool answers differently on purpose: each difference, why, and that it still holds. */
  const DIFFERENCES: Array<{ sh: string; qemu: [number, RegExp]; ours: [number, RegExp]; why: string }> = [
    {
      sh: '$T rebase -b chain-base.qcow2 chain-top.qcow2',
      qemu: [1, /^$/],
      ours: [1, /^$/],
      why: 'both refuse a backing file without -F; imgtool before writing, qemu-img 7.2 after its safe-mode copy',
    },
    {
      sh: "$T create -q -f vpc -o subformat=fixed f.vhd 16M && $T info f.vhd | grep '^file format:'",
      qemu: [0, /^file format: raw\n$/],
      ours: [0, /^file format: vpc\n$/],
      why: 'qemu-img probes a fixed VHD as raw and shows its footer as guest data; imgtool recognises the footer',
    },
    {
      sh: '$T rebase -c -u -b \'\' chain-top.qcow2 2>/dev/null; echo "rc=$?"',
      qemu: [0, /^rc=1\n$/],
      ours: [0, /^rc=0\n$/],
      why: "-c is qemu-img 8.2's (7.2 has no such option); as 8.2, with -u nothing is copied and -c changes nothing",
    },
  ]
  DIFFERENCES.forEach((d, i) => {
    it(`difference: ${d.sh.replace(/\$T/g, 'qemu-img')} (${d.why})`, () => {
      const qd = join(base, `d${i}-qemu`)
      const od = join(base, `d${i}-ours`)
      prepare(qd)
      prepare(od)
      const q = run('qemu', qd, d.sh)
      const o = run('ours', od, d.sh)
      expect([q.code, q.stdout]).toEqual([d.qemu[0], expect.stringMatching(d.qemu[1])])
      expect([o.code, o.stdout]).toEqual([d.ours[0], expect.stringMatching(d.ours[1])])
    })
  })
})
