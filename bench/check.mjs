#!/usr/bin/env node
/**
 * qcow2 check benchmark: `imgtool check` against `qemu-img check`, whole
 * commands timed the same way, run alternately on the same images.
 *
 *   node bench/check.mjs [--runs N] [--mem-runs N] [--only time,mem] [--images meta-1T,random-4k,full-4g]
 *                        [--sizes 128G,256G,512G,1T] [--extra-sizes 2T,4T] [--gc-diagnostic] [--max-load L]
 *                        [--keep] [--dist]
 *
 * Part 1, time (--runs, default 5, after one untimed warm-up of each command):
 *   node bin/imgtool check IMG                 vs  qemu-img check IMG
 *   node bin/imgtool check --output json IMG   vs  qemu-img check --output json IMG
 * on
 *   meta-1T.qcow2     1 TiB, preallocation=metadata, 64 KiB clusters (16.8 M host clusters, ~160 MB on disk)
 *   random-4k.qcow2   2 GiB, 4 KiB clusters, every cluster written once in a seeded random order
 *                     (qemu-io, ~5 min to make; qemu-img's refcount-block cache thrashes on it)
 *   full-4g.qcow2     4 GiB, 64 KiB clusters, every cluster written
 * Each command runs under `/usr/bin/time -f '%M %U %S'` (GNU time: peak RSS and CPU of the command
 * itself); the wall time is measured around the same spawn for both tools. The order of the two
 * tools alternates from round to round. The JSON outputs must agree on every qemu-img field.
 *
 * Part 2, memory (--mem-runs, default 3): peak RSS of `imgtool check` (and of qemu-img) on
 * preallocation=metadata images with 64 KiB clusters of each --sizes (+ --extra-sizes), the median
 * per size, and a least-squares line RSS = intercept + slope × host clusters (slope in bytes per
 * host cluster). --gc-diagnostic adds a run of imgtool with a preloaded module that forces a minor
 * GC every 2 ms (node --expose-gc --import): a diagnostic of how much of the RSS is collectable
 * garbage, not a way imgtool is run.
 *
 * The imgtool measured is bin/imgtool over a fresh `tsc` build of src/ into WORK/build (so a
 * colleague rebuilding dist/ mid-run changes nothing); --dist runs the repository's bin/imgtool and
 * dist/ as they are. Images go to bench/work/check/ (gitignored) and are deleted at the end unless
 * --keep. Machine load: loadavg before/after each block, and the CPU time used by other processes
 * during the block (from /proc/stat, minus the benchmarked commands' own CPU). --max-load L waits
 * (up to 10 min) for the 1-minute load average to fall to L before each block. Every sample goes to
 * WORK/last-run.json.
 */
import { spawnSync } from 'node:child_process'
import { cpSync, existsSync, mkdirSync, readFileSync, rmSync, statSync, statfsSync, symlinkSync, writeFileSync } from 'node:fs'
import { loadavg } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..')
const WORK = join(ROOT, 'bench', 'work', 'check')
const NODE = process.execPath
const { values: args } = parseArgs({
  options: {
    runs: { type: 'string', default: '5' },
    'mem-runs': { type: 'string', default: '3' },
    only: { type: 'string', default: 'time,mem' },
    images: { type: 'string', default: 'meta-1T,random-4k,full-4g' },
    sizes: { type: 'string', default: '128G,256G,512G,1T' },
    'extra-sizes': { type: 'string', default: '' },
    'gc-diagnostic': { type: 'boolean', default: false },
    'max-load': { type: 'string' },
    keep: { type: 'boolean', default: false },
    dist: { type: 'boolean', default: false },
  },
})
const RUNS = Number(args.runs)
const MEM_RUNS = Number(args['mem-runs'])
const ONLY = new Set(args.only.split(','))
const IMAGES = new Set(args.images.split(','))
const SIZES = args.sizes.split(',').filter(Boolean)
const EXTRA = args['extra-sizes'].split(',').filter(Boolean)
const MAX_LOAD = args['max-load'] === undefined ? undefined : Number(args['max-load'])
const MiB = 2 ** 20
const GiB = 2 ** 30

const log = (s) => process.stderr.write(s + '\n')
const median = (v) => {
  const s = [...v].sort((a, b) => a - b)
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2
}
const sh = (cmd, a, input) => {
  const r = spawnSync(cmd, a, { input, stdio: [input === undefined ? 'ignore' : 'pipe', 'ignore', 'pipe'], encoding: 'utf8', maxBuffer: 1 << 30 })
  if (r.status !== 0) throw new Error(`${cmd} ${a.join(' ')} failed (${r.status}): ${r.stderr}`)
}
const uptime = () => spawnSync('uptime', { encoding: 'utf8' }).stdout.trim()

// ---------------------------------------------------------------------------
// preflight

const TIME = '/usr/bin/time'
if (!existsSync(TIME) || spawnSync(TIME, ['-f', '%M', 'true'], { encoding: 'utf8' }).status !== 0) {
  throw new Error('GNU time is needed at /usr/bin/time (Debian: apt-get install time)')
}
for (const c of ['qemu-img', 'qemu-io']) if (spawnSync(c, ['--version']).status !== 0) throw new Error(`${c} not found`)
const QEMU_VERSION = spawnSync('qemu-img', ['--version'], { encoding: 'utf8' }).stdout.split('\n')[0]
mkdirSync(WORK, { recursive: true })

const parseSize = (s) => Number(s.slice(0, -1)) * { G: GiB, T: 1024 * GiB }[s.slice(-1)]
/** bytes an image will take on disk (metadata images: L2 tables + refcount blocks, 64 KiB clusters) */
function diskNeed() {
  let n = 0
  if (ONLY.has('time')) n += 2.1 * GiB + 4.1 * GiB + 0.2 * GiB
  if (ONLY.has('mem')) for (const s of [...SIZES, ...EXTRA]) n += (parseSize(s) / 8192) * 1.3
  return n
}
{
  const st = statfsSync(WORK)
  const free = st.bavail * st.bsize
  const need = diskNeed()
  log(`disk: ${(free / GiB).toFixed(1)} GiB free in ${WORK}, up to ${(need / GiB).toFixed(1)} GiB needed`)
  if (free < need + 2 * GiB) throw new Error('not enough free disk space (need the images plus 2 GiB to spare)')
}

// ---------------------------------------------------------------------------
// the imgtool under test

let IMGTOOL = join(ROOT, 'bin', 'imgtool')
if (!args.dist) {
  const b = join(WORK, 'build')
  rmSync(b, { recursive: true, force: true })
  mkdirSync(join(b, 'bin'), { recursive: true })
  log('building src/ into ' + b)
  const tsc = join(ROOT, 'node_modules', 'typescript', 'bin', 'tsc')
  const r = spawnSync(NODE, [tsc, '-p', join(ROOT, 'tsconfig.json'), '--outDir', join(b, 'dist'), '--declaration', 'false', '--sourceMap', 'false'], {
    encoding: 'utf8',
  })
  if (!existsSync(join(b, 'dist', 'cli', 'main.js'))) throw new Error('tsc produced no build: ' + r.stdout + r.stderr)
  if (r.status !== 0) log('tsc reported errors (outside the check code?), build emitted anyway:\n' + r.stdout)
  cpSync(join(ROOT, 'bin', 'imgtool'), join(b, 'bin', 'imgtool'))
  cpSync(join(ROOT, 'package.json'), join(b, 'package.json')) // "type": "module", and the version imgtool prints
  if (existsSync(join(ROOT, 'build'))) symlinkSync(join(ROOT, 'build'), join(b, 'build')) // the optional native addon
  IMGTOOL = join(b, 'bin', 'imgtool')
}
const gitRev = spawnSync('git', ['-C', ROOT, 'rev-parse', '--short', 'HEAD'], { encoding: 'utf8' }).stdout.trim()
const checkDirty = spawnSync('git', ['-C', ROOT, 'status', '--porcelain', '--', 'src/formats/qcow2'], { encoding: 'utf8' }).stdout.trim()

const GC_PRELOAD = join(WORK, 'gc-every-2ms.mjs')
writeFileSync(GC_PRELOAD, "setInterval(() => globalThis.gc({ type: 'minor' }), 2).unref()\n")

// ---------------------------------------------------------------------------
// images

function makeMeta(size) {
  const p = join(WORK, `meta-${size}.qcow2`)
  if (!existsSync(p)) {
    log(`creating ${p}`)
    sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata,cluster_size=64k', p, size])
  }
  return p
}

function makeRandom4k() {
  const p = join(WORK, 'random-4k.qcow2')
  if (existsSync(p)) return p
  log(`creating ${p} (qemu-io, 524288 writes in random order: several minutes)`)
  const tmp = p + '.tmp'
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', tmp, '2G'])
  const n = (2 * GiB) / 4096
  const order = Array.from({ length: n }, (_, i) => i)
  let s = 12345
  for (let i = n - 1; i > 0; i--) {
    s = (s * 1103515245 + 12345) & 0x7fffffff
    const j = s % (i + 1)
    ;[order[i], order[j]] = [order[j], order[i]]
  }
  sh('qemu-io', ['-f', 'qcow2', tmp], order.map((c) => `write -q -P ${(c % 255) + 1} ${c * 4096} 4k`).join('\n') + '\n')
  sh('mv', [tmp, p])
  return p
}

function makeFull4g() {
  const p = join(WORK, 'full-4g.qcow2')
  if (existsSync(p)) return p
  log(`creating ${p}`)
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', p + '.tmp', '4G'])
  sh('qemu-io', ['-f', 'qcow2', ...[0, 1, 2, 3].flatMap((g) => ['-c', `write -q -P 0x5a ${g}G 1G`]), p + '.tmp'])
  sh('mv', [p + '.tmp', p])
  return p
}

// ---------------------------------------------------------------------------
// measuring one command

const TIME_OUT = join(WORK, 'time.out')

/** one run under GNU time: wall ms (around the spawn), peak RSS bytes, CPU s, exit status, stdout */
function run(cmd) {
  const t0 = process.hrtime.bigint()
  const r = spawnSync(TIME, ['-o', TIME_OUT, '-f', '%M %U %S', ...cmd], { encoding: 'utf8', maxBuffer: 1 << 26, stdio: ['ignore', 'pipe', 'pipe'] })
  const ms = Number(process.hrtime.bigint() - t0) / 1e6
  const lines = readFileSync(TIME_OUT, 'utf8').trim().split('\n')
  const [rssKiB, user, sys] = lines[lines.length - 1].split(' ').map(Number)
  return { ms, rss: rssKiB * 1024, cpu: user + sys, status: r.status, stdout: r.stdout, stderr: r.stderr }
}

/** CPU seconds the whole machine spent busy, from /proc/stat */
function machineBusy() {
  const f = readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/).slice(1).map(Number)
  const [user, nice, system, , , irq, softirq, steal] = f
  return (user + nice + system + irq + softirq + (steal ?? 0)) / 100 // USER_HZ
}

/** a block of runs, with the machine's load around it */
async function block(name, fn) {
  if (MAX_LOAD !== undefined) {
    const t0 = Date.now()
    while (loadavg()[0] > MAX_LOAD && Date.now() - t0 < 600_000) {
      log(`  load ${loadavg()[0].toFixed(2)} > ${MAX_LOAD}: waiting (${name})`)
      await new Promise((r) => setTimeout(r, 15_000))
    }
  }
  const before = { uptime: uptime(), busy: machineBusy(), t: performance.now() }
  const own = { cpu: 0 }
  const result = fn(own)
  const wall = (performance.now() - before.t) / 1000
  const busy = machineBusy() - before.busy
  const load = {
    before: before.uptime,
    after: uptime(),
    wallSeconds: wall,
    // cores' worth of CPU used by other processes while this block ran (benchmark parent ~0)
    otherCores: Math.max(0, (busy - own.cpu) / wall),
  }
  log(`  ${name}: ${load.after.replace(/.*load/, 'load')}, other processes used ${load.otherCores.toFixed(2)} cores`)
  return { ...result, load }
}

// ---------------------------------------------------------------------------
// part 1: time

const results = { date: new Date().toISOString(), node: process.version, qemu: QEMU_VERSION, gitRev, checkDirty, imgtool: IMGTOOL, runs: RUNS }

/** qemu-img's JSON fields, compared with ours */
function sameJson(ours, theirs) {
  const a = JSON.parse(ours)
  const b = JSON.parse(theirs)
  const diff = Object.keys(b).filter((k) => JSON.stringify(a[k]) !== JSON.stringify(b[k]))
  return diff.length === 0 ? true : diff.map((k) => `${k}: ${JSON.stringify(a[k])} vs ${JSON.stringify(b[k])}`).join(', ')
}

if (ONLY.has('time')) {
  const images = [
    { key: 'meta-1T', name: '1 TiB preallocation=metadata, 64 KiB clusters', make: () => makeMeta('1T'), target: 0.8 },
    { key: 'random-4k', name: '2 GiB, 4 KiB clusters written in random order', make: makeRandom4k, target: 0.5 },
    { key: 'full-4g', name: '4 GiB fully written, 64 KiB clusters', make: makeFull4g, target: undefined },
  ]
    .filter((i) => IMAGES.has(i.key))
    .map((i) => ({ ...i, path: i.make() }))
  results.time = []
  for (const img of images) {
    const modes = [
      { mode: 'human', ours: [NODE, IMGTOOL, 'check', img.path], theirs: ['qemu-img', 'check', img.path] },
      { mode: 'json', ours: [NODE, IMGTOOL, 'check', '--output', 'json', img.path], theirs: ['qemu-img', 'check', '--output', 'json', img.path] },
    ]
    log(`time: ${img.name}`)
    const r = await block(img.key, (own) => {
      const out = {}
      for (const m of modes) {
        // warm-up (page cache, and the outputs must agree)
        const w1 = run(m.ours)
        const w2 = run(m.theirs)
        if (w1.status !== 0 || w2.status !== 0) throw new Error(`${img.key} ${m.mode}: exit ${w1.status} / ${w2.status}: ${w1.stderr}${w2.stderr}`)
        const agree = m.mode === 'json' ? sameJson(w1.stdout, w2.stdout) : w1.stdout === w2.stdout
        if (m.mode === 'json' && agree !== true) throw new Error(`${img.key}: JSON differs from qemu-img: ${agree}`)
        out[m.mode] = { ours: [], theirs: [], sameOutput: agree }
      }
      for (let i = 0; i < RUNS; i++) {
        for (const m of modes) {
          const pair = i % 2 === 0 ? ['ours', 'theirs'] : ['theirs', 'ours']
          for (const who of pair) {
            const x = run(m[who])
            if (x.status !== 0) throw new Error(`${img.key} ${m.mode} ${who}: exit ${x.status}`)
            own.cpu += x.cpu
            out[m.mode][who].push({ ms: x.ms, rss: x.rss, cpu: x.cpu })
          }
        }
      }
      return out
    })
    const row = { key: img.key, name: img.name, target: img.target, fileSize: statSync(img.path).size, load: r.load, modes: {} }
    for (const m of ['human', 'json']) {
      const o = r[m].ours
      const t = r[m].theirs
      row.modes[m] = {
        oursMs: median(o.map((x) => x.ms)),
        theirsMs: median(t.map((x) => x.ms)),
        oursRss: Math.max(...o.map((x) => x.rss)),
        theirsRss: Math.max(...t.map((x) => x.rss)),
        oursCpu: median(o.map((x) => x.cpu)),
        theirsCpu: median(t.map((x) => x.cpu)),
        sameOutput: r[m].sameOutput,
        samples: r[m],
      }
      row.modes[m].ratio = row.modes[m].oursMs / row.modes[m].theirsMs
      const x = row.modes[m]
      log(
        `  ${m}: imgtool ${x.oursMs.toFixed(0)} ms, qemu-img ${x.theirsMs.toFixed(0)} ms, ratio ${x.ratio.toFixed(2)}; ` +
          `RSS ${(x.oursRss / MiB).toFixed(1)} / ${(x.theirsRss / MiB).toFixed(1)} MiB`,
      )
    }
    results.time.push(row)
  }
}

// ---------------------------------------------------------------------------
// part 2: memory against image size

/** least squares y = a + b x */
function fit(points) {
  const n = points.length
  const mx = points.reduce((s, p) => s + p.x, 0) / n
  const my = points.reduce((s, p) => s + p.y, 0) / n
  const sxx = points.reduce((s, p) => s + (p.x - mx) ** 2, 0)
  const sxy = points.reduce((s, p) => s + (p.x - mx) * (p.y - my), 0)
  const slope = sxy / sxx
  const intercept = my - slope * mx
  const ssr = points.reduce((s, p) => s + (p.y - intercept - slope * p.x) ** 2, 0)
  return { slope, intercept, rmsResidual: Math.sqrt(ssr / n), sizes: points.map((p) => p.size) }
}

if (ONLY.has('mem')) {
  const sizes = [...SIZES, ...EXTRA]
  const rows = []
  log('memory: ' + sizes.join(', '))
  const r = await block('memory', (own) => {
    for (const size of sizes) {
      const p = makeMeta(size)
      const clusters = Math.ceil(statSync(p).size / 65536)
      run([NODE, IMGTOOL, 'check', p]) // warm-up
      const row = { size, clusters, ours: [], theirs: [], gc: [] }
      for (let i = 0; i < MEM_RUNS; i++) {
        const a = run([NODE, IMGTOOL, 'check', p])
        const b = run(['qemu-img', 'check', p])
        if (a.status !== 0 || b.status !== 0) throw new Error(`${size}: exit ${a.status} / ${b.status}`)
        own.cpu += a.cpu + b.cpu
        row.ours.push(a.rss)
        row.theirs.push(b.rss)
        if (args['gc-diagnostic']) {
          const c = run([NODE, '--expose-gc', '--import', GC_PRELOAD, IMGTOOL, 'check', p])
          if (c.status !== 0) throw new Error(`${size} (gc diagnostic): exit ${c.status}`)
          own.cpu += c.cpu
          row.gc.push(c.rss)
        }
      }
      row.oursMedian = median(row.ours)
      row.theirsMedian = median(row.theirs)
      if (row.gc.length) row.gcMedian = median(row.gc)
      log(
        `  ${size}: ${clusters} host clusters, imgtool ${(row.oursMedian / MiB).toFixed(1)} MiB` +
          (row.gc.length ? ` (forced GC ${(row.gcMedian / MiB).toFixed(1)})` : '') +
          `, qemu-img ${(row.theirsMedian / MiB).toFixed(1)} MiB`,
      )
      rows.push(row)
    }
    return {}
  })
  const pts = (key, only) => rows.filter((x) => !only || only.includes(x.size)).map((x) => ({ x: x.clusters, y: x[key], size: x.size }))
  const fits = {}
  for (const [name, only] of [
    ['sizes', SIZES],
    ...(EXTRA.length ? [['all', undefined]] : []),
  ]) {
    fits[name] = { imgtool: fit(pts('oursMedian', only)), qemu: fit(pts('theirsMedian', only)) }
    if (args['gc-diagnostic']) fits[name].imgtoolForcedGc = fit(pts('gcMedian', only))
    for (const [who, f] of Object.entries(fits[name])) {
      log(`  fit over ${f.sizes.join(', ')}: ${who}: ${f.slope.toFixed(3)} B/cluster + ${(f.intercept / MiB).toFixed(1)} MiB (rms residual ${(f.rmsResidual / MiB).toFixed(1)} MiB)`)
    }
  }
  results.memory = { rows, fits, load: r.load }
}

writeFileSync(join(WORK, 'last-run.json'), JSON.stringify(results, null, 2) + '\n')

// ---------------------------------------------------------------------------
// report (markdown)

const ms = (x) => `${x.toFixed(0)} ms`
const mib = (x) => `${(x / MiB).toFixed(1)} MiB`
const out = []
out.push(`node ${process.version}, ${QEMU_VERSION}, imgtool at ${gitRev}${checkDirty ? ' (+ uncommitted check changes)' : ''}`)
if (results.time) {
  out.push('', '| image | output | imgtool check | qemu-img check | ratio | target | peak RSS imgtool | peak RSS qemu-img | same output |', '|---|---|---|---|---|---|---|---|---|')
  for (const row of results.time) {
    for (const m of ['human', 'json']) {
      const x = row.modes[m]
      out.push(
        `| ${row.name} | ${m} | ${ms(x.oursMs)} | ${ms(x.theirsMs)} | ${x.ratio.toFixed(2)} | ${row.target ? `≤ ${row.target}` : '—'} | ${mib(x.oursRss)} | ${mib(x.theirsRss)} | ${x.sameOutput === true ? 'yes' : 'no'} |`,
      )
    }
  }
  out.push('', 'Load during each block:')
  for (const row of results.time) out.push(`- ${row.key}: before \`${row.load.before}\`; after \`${row.load.after}\`; other processes ${row.load.otherCores.toFixed(2)} cores`)
}
if (results.memory) {
  const m = results.memory
  const gc = args['gc-diagnostic']
  out.push('', `| image | host clusters | imgtool peak RSS | ${gc ? 'imgtool, forced minor GC every 2 ms | ' : ''}qemu-img peak RSS |`, `|---|---|---|${gc ? '---|' : ''}---|`)
  for (const r of m.rows) out.push(`| ${r.size} | ${r.clusters} | ${mib(r.oursMedian)} | ${gc ? mib(r.gcMedian) + ' | ' : ''}${mib(r.theirsMedian)} |`)
  out.push('')
  for (const f of Object.values(m.fits)) {
    for (const [who, x] of Object.entries(f)) {
      out.push(`- fit over ${x.sizes.join(', ')}, ${who}: **${x.slope.toFixed(2)} B/host cluster** + ${mib(x.intercept)} (rms residual ${mib(x.rmsResidual)})`)
    }
  }
  out.push(`- load: before \`${m.load.before}\`; after \`${m.load.after}\`; other processes ${m.load.otherCores.toFixed(2)} cores`)
}
console.log(out.join('\n'))

// ---------------------------------------------------------------------------
// clean up

if (!args.keep) {
  for (const f of ['meta-1T', 'random-4k', 'full-4g', ...[...SIZES, ...EXTRA].map((s) => `meta-${s}`)]) rmSync(join(WORK, `${f}.qcow2`), { force: true })
  rmSync(join(WORK, 'build'), { recursive: true, force: true })
  log('images deleted (--keep keeps them)')
}
rmSync(TIME_OUT, { force: true })
rmSync(GC_PRELOAD, { force: true })
