#!/usr/bin/env node
/**
 * VHD and VMDK conversion benchmark (issue 13): imgtool against qemu-img convert
 * on the same inputs with the same options, run alternately, reporting median
 * wall time and CPU time (user + sys), the ratios, per-run ranges and peak RSS.
 *
 *   npm run build && node bench/formats.mjs [--gb 4] [--runs 5] [--only to-vpc,from-vmdk-stream,...]
 *
 * Inputs (bench/work/, gitignored):
 *   half-N.raw              N GiB, first half compressible mixed data, second half a hole (bench/gen.mjs,
 *                           the same bytes as bench/write.mjs's half-N.raw)
 *   half-N.{vpc,vpc-fixed,vmdk,vmdk-stream}   the same converted by qemu-img (the from-* inputs, shared by both tools)
 * Measures (each `imgtool convert` against `qemu-img convert` with the same arguments):
 *   to-vpc            -O vpc                                   raw -> dynamic VHD
 *   to-vpc-fixed      -O vpc -o subformat=fixed                raw -> fixed VHD
 *   to-vmdk           -O vmdk                                  raw -> monolithicSparse
 *   to-vmdk-stream    -O vmdk -o subformat=streamOptimized     raw -> streamOptimized (deflated)
 *   from-vpc, from-vpc-fixed, from-vmdk, from-vmdk-stream      each of the above (qemu-made) -> raw
 * Every output is checked outside the timing: `qemu-img compare` with the source, and `cmp` with
 * qemu-img's output of the same run.
 */
import { spawn, spawnSync } from 'node:child_process'
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { loadavg } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { writeRaw } from './gen.mjs'

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..')
const WORK = join(ROOT, 'bench', 'work')
const BIN = join(ROOT, 'bin', 'imgtool')
const TIME = existsSync('/usr/bin/time') ? '/usr/bin/time' : undefined
const argv = process.argv.slice(2)
const opt = (name, dflt) => {
  const i = argv.indexOf(name)
  return i >= 0 ? argv[i + 1] : dflt
}
const GB = Number(opt('--gb', '4'))
const RUNS = Number(opt('--runs', '5'))
const ALL = ['to-vpc', 'to-vpc-fixed', 'to-vmdk', 'to-vmdk-stream', 'from-vpc', 'from-vpc-fixed', 'from-vmdk', 'from-vmdk-stream']
const ONLY = opt('--only', ALL.join(',')).split(',')
const SIZE = GB * 1024 ** 3

/** one process under GNU time: wall ms, peak RSS (MiB), user + sys CPU (s) */
function run(cmd, args) {
  return new Promise((res, rej) => {
    const full = TIME ? [TIME, ['-f', '%M %U %S', cmd, ...args]] : [cmd, args]
    const t0 = process.hrtime.bigint()
    const p = spawn(full[0], full[1], { stdio: ['ignore', 'ignore', 'pipe'] })
    let err = ''
    p.stderr.on('data', (d) => (err += d))
    p.on('close', (code) => {
      const ms = Number(process.hrtime.bigint() - t0) / 1e6
      if (code !== 0) return rej(new Error(`${cmd} ${args.join(' ')} exited ${code}: ${err}`))
      const [rss, user, sys] = TIME ? err.trim().split('\n').pop().split(' ').map(Number) : [NaN, NaN, NaN]
      res({ ms, rss: rss / 1024, cpu: user + sys, user, sys })
    })
  })
}

const TARGETS = {
  vpc: ['-O', 'vpc'],
  'vpc-fixed': ['-O', 'vpc', '-o', 'subformat=fixed'],
  vmdk: ['-O', 'vmdk'],
  'vmdk-stream': ['-O', 'vmdk', '-o', 'subformat=streamOptimized'],
}

async function prepare() {
  mkdirSync(WORK, { recursive: true })
  const half = join(WORK, `half-${GB}.raw`)
  if (!existsSync(half)) writeRaw(half, SIZE / 2, SIZE)
  const made = {}
  for (const [k, o] of Object.entries(TARGETS)) {
    made[k] = join(WORK, `half-${GB}.${k}`)
    if (!existsSync(made[k])) await run('qemu-img', ['convert', '-f', 'raw', ...o, half, made[k]])
  }
  return { half, made }
}

const median = (xs) => xs.slice().sort((a, b) => a - b)[Math.floor(xs.length / 2)]
const load = () =>
  loadavg()
    .map((x) => x.toFixed(2))
    .join(' ')

/** outside the timing: remove outputs and sync, so no run pays for another's dirty pages */
function settle(paths) {
  for (const p of paths) rmSync(p, { force: true })
  spawnSync('sync')
}

/** the checks of one pair of outputs: qemu-img compare with the source, cmp with qemu-img's */
function check(source, srcFmt, ours, theirs, outFmt) {
  const cmpSrc = (f) => spawnSync('qemu-img', ['compare', '-q', '-f', srcFmt, '-F', outFmt, source, f]).status === 0
  const same = spawnSync('cmp', ['-s', ours, theirs]).status === 0
  let diff = ''
  if (!same) {
    const l = spawnSync('sh', ['-c', `cmp -l '${ours}' '${theirs}' 2>&1 | wc -l`], { encoding: 'utf8' }).stdout.trim()
    diff = ` (${l} bytes differ${spawnSync('stat', ['-c', '%s', ours], { encoding: 'utf8' }).stdout.trim() !== spawnSync('stat', ['-c', '%s', theirs], { encoding: 'utf8' }).stdout.trim() ? ', sizes differ' : ''})`
  }
  return {
    ok: cmpSrc(ours) && cmpSrc(theirs),
    same,
    text: `compare with source: ${cmpSrc(ours) ? 'identical' : 'DIFFERS'}; ${same ? 'byte-identical to' : 'not byte-identical to'} qemu-img's${diff}`,
  }
}

const rows = []
async function bench(name, input, inFmt, convArgs, outFmt) {
  const ours = join(WORK, 'out-imgtool.img')
  const theirs = join(WORK, 'out-qemu.img')
  const a = []
  const b = []
  const l0 = load()
  for (let i = 0; i < RUNS; i++) {
    settle([ours, theirs])
    b.push(await run('qemu-img', ['convert', '-f', inFmt, ...convArgs, input, theirs]))
    // every timed run starts with the same files in the page cache: keeping qemu-img's output through
    // imgtool's last run cost that run up to 2x its CPU time (system time: the page cache had to be
    // reclaimed instead of reusing the pages of the file just removed)
    settle([ours, theirs])
    a.push(await run(BIN, ['convert', '-f', inFmt, ...convArgs, input, ours]))
  }
  const l1 = load()
  // outside the timing: qemu-img's output again, for the check
  await run('qemu-img', ['convert', '-f', inFmt, ...convArgs, input, theirs])
  const c = check(input, inFmt, ours, theirs, outFmt)
  settle([ours, theirs])
  const r = {
    name,
    wall: [median(a.map((x) => x.ms)), median(b.map((x) => x.ms))],
    cpu: [median(a.map((x) => x.cpu)), median(b.map((x) => x.cpu))],
    rss: [Math.max(...a.map((x) => x.rss)), Math.max(...b.map((x) => x.rss))],
    runs: { imgtool: a, qemu: b },
    load: [l0, l1],
    check: c,
  }
  rows.push(r)
  const rng = (xs, k) => `${Math.min(...xs.map((x) => x[k])).toFixed(k === 'ms' ? 0 : 2)}–${Math.max(...xs.map((x) => x[k])).toFixed(k === 'ms' ? 0 : 2)}`
  console.log(
    `${name.padEnd(17)} wall ${(r.wall[0] / 1000).toFixed(2)} / ${(r.wall[1] / 1000).toFixed(2)} s = ${(r.wall[0] / r.wall[1]).toFixed(2)}x` +
      `   cpu ${r.cpu[0].toFixed(2)} / ${r.cpu[1].toFixed(2)} s = ${(r.cpu[0] / r.cpu[1]).toFixed(2)}x` +
      `   RSS ${r.rss[0].toFixed(0)} / ${r.rss[1].toFixed(0)} MiB   load ${l0} -> ${l1}\n` +
      `${''.padEnd(17)} runs ms imgtool ${rng(a, 'ms')}, qemu-img ${rng(b, 'ms')}; cpu s imgtool ${rng(a, 'cpu')}, qemu-img ${rng(b, 'cpu')}\n` +
      `${''.padEnd(17)} median user / sys s imgtool ${median(a.map((x) => x.user)).toFixed(2)} / ${median(a.map((x) => x.sys)).toFixed(2)}, qemu-img ${median(b.map((x) => x.user)).toFixed(2)} / ${median(b.map((x) => x.sys)).toFixed(2)}\n` +
      `${''.padEnd(17)} ${c.text}`,
  )
}

const { half, made } = await prepare()
console.log(`# imgtool vpc/vmdk convert bench, ${GB} GiB half-zero raw, median of ${RUNS} alternating runs; imgtool / qemu-img; load ${load()}`)
for (const [k, o] of Object.entries(TARGETS)) {
  if (ONLY.includes(`to-${k}`)) await bench(`to-${k}`, half, 'raw', o, k.startsWith('vpc') ? 'vpc' : 'vmdk')
}
for (const k of Object.keys(TARGETS)) {
  if (ONLY.includes(`from-${k}`)) await bench(`from-${k}`, made[k], k.startsWith('vpc') ? 'vpc' : 'vmdk', ['-O', 'raw'], 'raw')
}
const last = join(WORK, 'formats-last-run.json')
const prev = existsSync(last) ? readFileSync(last, 'utf8') : undefined
void prev
writeFileSync(last, JSON.stringify({ date: new Date().toISOString(), gb: GB, runs: RUNS, rows }, null, 1))
