#!/usr/bin/env node
/**
 * Every ratio issue 15 asks for, in one command: imgtool against qemu-img on the same inputs, run
 * alternately (qemu-img first, then imgtool, RUNS rounds), page cache warm, no fsync on either side.
 *
 *   npm run build && node bench/ratios.mjs [--gb 4] [--runs 5] [--only raw-qcow2,qcow2-raw,...] [--list] [--no-native]
 *
 * --no-native runs imgtool as on a machine where the optional native addons could not be built (the
 * IMGTOOL_NO_SEEK_HOLE, IMGTOOL_NO_NATIVE_DEFLATE and IMGTOOL_NO_LOCKS switches): what the README's
 * "without the addons" figures are.
 *
 * For each measurement: the median wall time of each tool and its range, the ratio of the medians, the
 * ratio of the median CPU times (user + system, /usr/bin/time: it moves less than wall time on a shared
 * machine), the user and system medians apart (user time is the tool's own work; on this project's VMs
 * the system time of writing into new page-cache pages swings by 10x from run to run, bench/README.md,
 * 2026-12-06), imgtool's peak RSS, the target and whether it is met. The load average is printed before and
 * after each measurement; the whole run is written to bench/work/ratios-last.json.
 *
 * Before each measurement the page cache is emptied (as root) and that measurement's inputs are read once,
 * untimed (warmOnly). Before each timed run (outside the timing) the output is removed and `sync` runs, so
 * neither tool pays for the previous run's dirty pages. Inputs are made in bench/work/ (gitignored) with node and qemu-img:
 *   mixed-full-N.raw   N GiB of compressible mixed data, every byte written
 *   half-N.raw         the first half the same data, the second half a hole
 *   full-N.qcow2       mixed-full-N.raw converted by qemu-img
 *   half-N.{vhd,fixed.vhd,vmdk,stream.vmdk}   half-N.raw converted by qemu-img (the sources of "back to raw")
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
const TIME = '/usr/bin/time'
const argv = process.argv.slice(2)
const opt = (name, dflt) => {
  const i = argv.indexOf(name)
  return i >= 0 ? argv[i + 1] : dflt
}
const GB = Number(opt('--gb', '4'))
const RUNS = Number(opt('--runs', '5'))
const SIZE = GB * 1024 ** 3
const NO_NATIVE = argv.includes('--no-native')
if (NO_NATIVE) Object.assign(process.env, { IMGTOOL_NO_SEEK_HOLE: '1', IMGTOOL_NO_NATIVE_DEFLATE: '1', IMGTOOL_NO_LOCKS: '1' })
const LAST = join(WORK, NO_NATIVE ? 'ratios-last-no-native.json' : 'ratios-last.json')
if (!existsSync(TIME)) {
  console.error('bench/ratios.mjs needs GNU time at /usr/bin/time (Debian: apt-get install time)')
  process.exit(2)
}

const F = {
  full: join(WORK, `mixed-full-${GB}.raw`),
  half: join(WORK, `half-${GB}.raw`),
  q: join(WORK, `full-${GB}.qcow2`),
  vhd: join(WORK, `half-${GB}.vhd`),
  fixed: join(WORK, `half-${GB}.fixed.vhd`),
  vmdk: join(WORK, `half-${GB}.vmdk`),
  stream: join(WORK, `half-${GB}.stream.vmdk`),
}
const OUT = join(WORK, 'ratios-out.img')
const sh = (cmd) => ['sh', '-c', cmd]
const img = (...a) => [BIN, ...a]
const qi = (...a) => ['qemu-img', ...a]

/**
 * name, imgtool's command, qemu-img's, the target ratio (wall, median), what it means. Conversions use
 * the same -f/-O/-o on both sides; `cat` is compared with qemu-img's convert -O raw to a file (qemu-img
 * has no cat), and `compare` reads a qcow2 and its raw copy.
 */
const MEASUREMENTS = [
  ['raw-qcow2', img('convert', '-f', 'raw', '-O', 'qcow2', F.half, OUT), qi('convert', '-f', 'raw', '-O', 'qcow2', F.half, OUT), 1.0],
  ['qcow2-raw', img('convert', '-f', 'qcow2', '-O', 'raw', F.q, OUT), qi('convert', '-f', 'qcow2', '-O', 'raw', F.q, OUT), 0.9],
  ['qcow2-qcow2', img('convert', '-f', 'qcow2', '-O', 'qcow2', F.q, OUT), qi('convert', '-f', 'qcow2', '-O', 'qcow2', F.q, OUT), 1.0],
  ['cat', sh(`'${BIN}' cat '${F.q}' > '${OUT}'`), sh(`qemu-img convert -f qcow2 -O raw '${F.q}' '${OUT}'`), 0.9],
  ['compare', img('compare', F.q, F.full), qi('compare', F.q, F.full), 0.9],
  ['convert-c', img('convert', '-f', 'raw', '-O', 'qcow2', '-c', F.half, OUT), qi('convert', '-f', 'raw', '-O', 'qcow2', '-c', F.half, OUT), 0.6],
  ['raw-qcow2-W', img('convert', '-W', '-m', '8', '-f', 'raw', '-O', 'qcow2', F.half, OUT), qi('convert', '-W', '-m', '8', '-f', 'raw', '-O', 'qcow2', F.half, OUT), 1.0],
  ['raw-vpc', img('convert', '-f', 'raw', '-O', 'vpc', F.half, OUT), qi('convert', '-f', 'raw', '-O', 'vpc', F.half, OUT), 1.0],
  ['raw-vpc-fixed', img('convert', '-f', 'raw', '-O', 'vpc', '-o', 'subformat=fixed', F.half, OUT), qi('convert', '-f', 'raw', '-O', 'vpc', '-o', 'subformat=fixed', F.half, OUT), 1.0],
  ['raw-vmdk', img('convert', '-f', 'raw', '-O', 'vmdk', F.half, OUT), qi('convert', '-f', 'raw', '-O', 'vmdk', F.half, OUT), 1.0],
  ['raw-vmdk-stream', img('convert', '-f', 'raw', '-O', 'vmdk', '-o', 'subformat=streamOptimized', F.half, OUT), qi('convert', '-f', 'raw', '-O', 'vmdk', '-o', 'subformat=streamOptimized', F.half, OUT), 0.5],
  ['vpc-raw', img('convert', '-f', 'vpc', '-O', 'raw', F.vhd, OUT), qi('convert', '-f', 'vpc', '-O', 'raw', F.vhd, OUT), 1.0],
  ['vpc-fixed-raw', img('convert', '-f', 'vpc', '-O', 'raw', F.fixed, OUT), qi('convert', '-f', 'vpc', '-O', 'raw', F.fixed, OUT), 1.0],
  ['vmdk-raw', img('convert', '-f', 'vmdk', '-O', 'raw', F.vmdk, OUT), qi('convert', '-f', 'vmdk', '-O', 'raw', F.vmdk, OUT), 1.0],
  ['vmdk-stream-raw', img('convert', '-f', 'vmdk', '-O', 'raw', F.stream, OUT), qi('convert', '-f', 'vmdk', '-O', 'raw', F.stream, OUT), 1.0],
]
if (argv.includes('--list')) {
  for (const [name, , , target] of MEASUREMENTS) console.log(`${name.padEnd(16)} target ≤ ${target.toFixed(1)}×`)
  process.exit(0)
}
const ONLY = opt('--only', MEASUREMENTS.map((m) => m[0]).join(',')).split(',')
for (const n of ONLY) if (!MEASUREMENTS.some((m) => m[0] === n)) throw new Error(`unknown measurement '${n}' (--list)`)

/** One timed run: wall ms, CPU s (user + system of the command and its children), peak RSS MiB. */
function run(cmd) {
  return new Promise((res, rej) => {
    const t0 = process.hrtime.bigint()
    const p = spawn(TIME, ['-f', '@@ %M %U %S', ...cmd], { stdio: ['ignore', 'ignore', 'pipe'] })
    let err = ''
    p.stderr.on('data', (d) => (err += d))
    p.on('close', (code) => {
      const ms = Number(process.hrtime.bigint() - t0) / 1e6
      const m = /@@ (\d+) ([\d.]+) ([\d.]+)\s*$/.exec(err)
      if ((code !== 0 && code !== 1) || !m) return rej(new Error(`${cmd.join(' ')} exited ${code}: ${err}`))
      res({ ms, cpu: Number(m[2]) + Number(m[3]), user: Number(m[2]), sys: Number(m[3]), rss: Number(m[1]) / 1024 })
    })
  })
}

async function prepare() {
  mkdirSync(WORK, { recursive: true })
  if (!existsSync(F.full)) writeRaw(F.full, SIZE, SIZE)
  if (!existsSync(F.half)) writeRaw(F.half, SIZE / 2, SIZE)
  const made = [
    [F.q, ['-O', 'qcow2', F.full]],
    [F.vhd, ['-O', 'vpc', F.half]],
    [F.fixed, ['-O', 'vpc', '-o', 'subformat=fixed', F.half]],
    [F.vmdk, ['-O', 'vmdk', F.half]],
    [F.stream, ['-O', 'vmdk', '-o', 'subformat=streamOptimized', F.half]],
  ]
  for (const [path, args] of made) {
    if (existsSync(path)) continue
    const r = spawnSync('qemu-img', ['convert', ...args, path + '.tmp'], { stdio: 'inherit' })
    if (r.status !== 0) throw new Error(`qemu-img convert ${args.join(' ')} failed`)
    spawnSync('mv', [path + '.tmp', path])
  }
}

const median = (xs) => xs.slice().sort((a, b) => a - b)[Math.floor(xs.length / 2)]
const load = () => loadavg()[0].toFixed(2)
const settle = () => {
  rmSync(OUT, { force: true })
  spawnSync('sync')
}

await prepare()
/**
 * The inputs of one measurement in the page cache, and as little else as possible: the inputs of every
 * measurement (~16 GiB at --gb 4) and an output do not fit in this project's 24 GiB machines together, so
 * a run could find its input evicted by the previous measurement's outputs. Where the bench may drop the
 * page cache (root), it does before each measurement; either way each input is read once, untimed.
 */
const DROP = '/proc/sys/vm/drop_caches'
let canDrop = true
function warmOnly(files) {
  spawnSync('sync')
  if (canDrop) {
    try {
      writeFileSync(DROP, '1')
    } catch {
      canDrop = false
      console.error(`# cannot write ${DROP} (not root): inputs are warmed but the page cache is not emptied first`)
    }
  }
  for (const f of files) spawnSync('cat', [f], { stdio: ['ignore', 'ignore', 'ignore'] })
}
const inputsOf = (...cmds) => Object.values(F).filter((f) => cmds.some((c) => c.some((a) => a === f || a.includes(`'${f}'`))))

const results = []
console.log(`# imgtool vs qemu-img, ${GB} GiB inputs, ${RUNS} alternating rounds each${NO_NATIVE ? ", imgtool WITHOUT its native addons" : ""} (${new Date().toISOString()})`)
console.log(`# node ${process.version}; ${spawnSync('qemu-img', ['--version']).stdout.toString().split('\n')[0]}`)
console.log(`# imgtool ${spawnSync(BIN, ['--version']).stdout.toString().trim().split('\n').join('; ')}`)
console.log()
console.log('| measurement | imgtool s (range) | qemu-img s (range) | wall ratio | CPU s imgtool / qemu-img | CPU ratio | user s | sys s | peak RSS imgtool | target | met | load before→after |')
console.log('| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |')
for (const [name, ours, theirs, target] of MEASUREMENTS) {
  if (!ONLY.includes(name)) continue
  warmOnly(inputsOf(ours, theirs))
  const loadBefore = load()
  const a = []
  const b = []
  for (let i = 0; i < RUNS; i++) {
    settle()
    b.push(await run(theirs))
    settle()
    a.push(await run(ours))
  }
  settle()
  const r = {
    name,
    target,
    imgtool: a,
    qemu: b,
    wall: [median(a.map((x) => x.ms)) / 1000, median(b.map((x) => x.ms)) / 1000],
    cpu: [median(a.map((x) => x.cpu)), median(b.map((x) => x.cpu))],
    user: [median(a.map((x) => x.user)), median(b.map((x) => x.user))],
    sys: [median(a.map((x) => x.sys)), median(b.map((x) => x.sys))],
    rss: Math.max(...a.map((x) => x.rss)),
    load: [loadBefore, load()],
  }
  results.push(r)
  const range = (xs) => `${(Math.min(...xs.map((x) => x.ms)) / 1000).toFixed(2)}–${(Math.max(...xs.map((x) => x.ms)) / 1000).toFixed(2)}`
  const ratio = r.wall[0] / r.wall[1]
  console.log(
    `| ${name} | ${r.wall[0].toFixed(2)} (${range(a)}) | ${r.wall[1].toFixed(2)} (${range(b)}) | **${ratio.toFixed(2)}×** | ${r.cpu[0].toFixed(2)} / ${r.cpu[1].toFixed(2)} | ${(r.cpu[0] / r.cpu[1]).toFixed(2)}× | ${r.user[0].toFixed(2)} / ${r.user[1].toFixed(2)} | ${r.sys[0].toFixed(2)} / ${r.sys[1].toFixed(2)} | ${r.rss.toFixed(0)} MiB | ≤ ${target.toFixed(1)}× | ${ratio <= target ? 'yes' : 'no'} | ${r.load[0]}→${r.load[1]} |`,
  )
}
const peak = Math.max(...results.map((r) => r.rss))
console.log()
console.log(`peak RSS of imgtool over every run: ${peak.toFixed(0)} MiB (target ≤ 150 MiB: ${peak <= 150 ? 'met' : 'NOT met'})`)
writeFileSync(LAST, JSON.stringify({ date: new Date().toISOString(), gb: GB, runs: RUNS, noNative: NO_NATIVE, results }, null, 1))
// keep the JSON readable by later tools (and catch a write that silently failed)
JSON.parse(readFileSync(LAST, 'utf8'))
