#!/usr/bin/env node
/**
 * Read-path benchmark: imgtool against qemu-img on the same inputs, run
 * alternately, reporting median wall time, the ratio and peak RSS.
 *
 *   npm run build && node bench/read.mjs [--runs N] [--cat-runs N] [--only info,map,cat,startup] [--keep]
 *                                        [--baseline DIR]
 *
 * Builds into bench/work/ (gitignored) with qemu-img/qemu-io:
 *   meta-1t.qcow2   1 TiB, preallocation=metadata, 64 KiB clusters (~170 MB on disk, sparse)
 *   full-4g.qcow2   4 GiB, every cluster written (4 GiB on disk)
 * and needs about 9 GB free (the image plus one raw output at a time).
 *
 * Measures:
 *   info      imgtool info IMG                      vs qemu-img info IMG
 *   map       imgtool map --output json IMG         vs qemu-img map --output=json IMG   (stdout to /dev/null)
 *   cat       imgtool cat IMG > out                 vs qemu-img convert -O raw IMG out
 *   startup   imgtool --version                     vs node -e 0
 * Peak RSS comes from /usr/bin/time -f %M when present (else from a wrapper
 * that polls the child's VmHWM in /proc).
 *
 * --cat-runs N    rounds of the cat measurement (default: --runs, at most 5)
 * --baseline DIR  another checkout of imgtool, built (DIR/bin/imgtool, DIR/dist): its cat
 *                 runs in the same rounds, so before/after figures share the machine's load
 * The load average (1 min) is printed before and after each measurement: other work on
 * the machine moves these figures by tens of percent.
 */
import { spawn, spawnSync } from 'node:child_process'
import { closeSync, existsSync, mkdirSync, openSync, readFileSync, rmSync, statSync, statfsSync, writeFileSync } from 'node:fs'
import { loadavg } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..')
const WORK = join(ROOT, 'bench', 'work')
const BIN = join(ROOT, 'bin', 'imgtool')
const NODE = process.execPath
const TIME = existsSync('/usr/bin/time') ? '/usr/bin/time' : undefined

const argv = process.argv.slice(2)
const opt = (name, dflt) => {
  const i = argv.indexOf(name)
  return i >= 0 ? argv[i + 1] : dflt
}
const RUNS = Number(opt('--runs', '5'))
const ONLY = opt('--only', 'info,map,cat,startup').split(',')
const KEEP = argv.includes('--keep')
const CAT_RUNS = Number(opt('--cat-runs', String(Math.max(3, Math.min(RUNS, 5)))))
const BASELINE = opt('--baseline', undefined)

const GiB = 1024 ** 3

function which(cmd) {
  const r = spawnSync('sh', ['-c', `command -v ${cmd}`], { encoding: 'utf8' })
  return r.status === 0 ? r.stdout.trim() : undefined
}

function must(cmd, args) {
  const t0 = performance.now()
  const r = spawnSync(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'], encoding: 'utf8' })
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed: ${r.stderr}`)
  return performance.now() - t0
}

function sizeOnDisk(p) {
  return statSync(p).blocks * 512
}

// ---------------------------------------------------------------------------
// images

function build() {
  mkdirSync(WORK, { recursive: true })
  const free = statfsSync(WORK).bavail * statfsSync(WORK).bsize
  const meta = join(WORK, 'meta-1t.qcow2')
  const full = join(WORK, 'full-4g.qcow2')
  if (!existsSync(meta)) {
    console.log('building meta-1t.qcow2 (1 TiB, preallocation=metadata, 64 KiB clusters)...')
    const ms = must('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata,cluster_size=64k', meta + '.tmp', '1T'])
    must('mv', [meta + '.tmp', meta])
    console.log(`  ${(ms / 1000).toFixed(1)} s, ${(sizeOnDisk(meta) / 2 ** 20).toFixed(0)} MiB on disk`)
  }
  if (!existsSync(full) && ONLY.includes('cat')) {
    if (free < 10 * GiB) throw new Error(`need ~10 GiB free in ${WORK} for the 4 GiB image and its raw output, have ${(free / GiB).toFixed(1)} GiB`)
    console.log('building full-4g.qcow2 (4 GiB, every cluster written)...')
    must('qemu-img', ['create', '-q', '-f', 'qcow2', full + '.tmp', '4G'])
    const cmds = []
    for (let g = 0; g < 4; g++) cmds.push('-c', `write -P 0x${(0x11 * (g + 1)).toString(16)} ${g}G 1G`)
    const ms = must('qemu-io', ['-f', 'qcow2', ...cmds, full + '.tmp'])
    must('mv', [full + '.tmp', full])
    console.log(`  ${(ms / 1000).toFixed(1)} s, ${(sizeOnDisk(full) / GiB).toFixed(2)} GiB on disk`)
  }
  return { meta, full }
}

// ---------------------------------------------------------------------------
// running one command: wall time (parent clock) and peak RSS

// Without /usr/bin/time: the child's peak RSS is its VmHWM, polled every 5 ms until it
// exits (process.resourceUsage() would give the wrapper's own, RUSAGE_SELF).
const RSS_WRAPPER = `
const { spawn } = require('node:child_process')
const { readFileSync } = require('node:fs')
const [cmd, ...args] = process.argv.slice(1)
const child = spawn(cmd, args, { stdio: 'inherit' })
let hwm = 0
const poll = () => {
  try {
    const m = /VmHWM:\\s*(\\d+)/.exec(readFileSync('/proc/' + child.pid + '/status', 'utf8'))
    if (m) hwm = Math.max(hwm, Number(m[1]))
  } catch {}
}
const timer = setInterval(poll, 5)
child.on('exit', (code) => {
  clearInterval(timer)
  process.stderr.write('\\nMAXRSS_KIB ' + hwm + '\\n')
  process.exit(code ?? 1)
})
`

/** Run cmd with stdout to `outPath` (or /dev/null); returns { ms, rssKiB }. */
function measure(cmd, args, outPath = '/dev/null') {
  return new Promise((resolvePromise, reject) => {
    const out = openSync(outPath, 'w')
    const rssFile = join(WORK, '.rss')
    let file = cmd
    let fullArgs = args
    if (TIME) {
      file = TIME
      fullArgs = ['-f', '%M', '-o', rssFile, cmd, ...args]
    } else {
      // children's maxRSS: the largest of the waited-for children (getrusage RUSAGE_CHILDREN)
      file = NODE
      fullArgs = ['-e', RSS_WRAPPER, cmd, ...args]
    }
    const t0 = performance.now()
    const child = spawn(file, fullArgs, { stdio: ['ignore', out, 'pipe'] })
    let stderr = ''
    child.stderr.on('data', (c) => (stderr += c))
    child.on('error', reject)
    child.on('close', (code) => {
      const ms = performance.now() - t0
      closeSync(out)
      if (code !== 0) return reject(new Error(`${cmd} ${args.join(' ')} exited ${code}: ${stderr}`))
      let rssKiB
      if (TIME) rssKiB = Number(readFileSync(rssFile, 'utf8').trim().split('\n').pop())
      else rssKiB = Number(/MAXRSS_KIB (\d+)/.exec(stderr)?.[1])
      resolvePromise({ ms, rssKiB })
    })
  })
}

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b)
  const m = s.length >> 1
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2
}

function dropOutput(p) {
  rmSync(p, { force: true })
  spawnSync('sync')
}

/**
 * Alternate A and B `runs` times (A first on even rounds, B first on odd ones),
 * after one untimed warm-up of each. `extra` (the baseline build) runs in the same
 * rounds, between them.
 */
async function duel(name, a, b, runs, target, extra) {
  const res = { a: [], b: [], x: [] }
  const load0 = loadavg()[0]
  process.stdout.write(`${name}: warm-up`)
  for (const side of [a, b, extra]) {
    if (!side) continue
    side.before?.()
    await measure(side.cmd, side.args, side.out)
    side.after?.()
  }
  for (let i = 0; i < runs; i++) {
    const order = i % 2 === 0 ? [['a', a], ['x', extra], ['b', b]] : [['b', b], ['x', extra], ['a', a]]
    for (const [key, side] of order) {
      if (!side) continue
      side.before?.()
      res[key].push(await measure(side.cmd, side.args, side.out))
      side.after?.()
    }
    process.stdout.write(` ${i + 1}`)
  }
  const load1 = loadavg()[0]
  process.stdout.write(`  (load average ${load0.toFixed(2)} -> ${load1.toFixed(2)})\n`)
  const ma = median(res.a.map((r) => r.ms))
  const mb = median(res.b.map((r) => r.ms))
  const row = {
    name,
    imgtool: ma,
    other: mb,
    otherName: b.label,
    ratio: ma / mb,
    rssImgtool: Math.max(...res.a.map((r) => r.rssKiB)),
    rssOther: Math.max(...res.b.map((r) => r.rssKiB)),
    all: { imgtool: res.a.map((r) => Math.round(r.ms)), [b.label]: res.b.map((r) => Math.round(r.ms)) },
    load: [load0, load1],
    target,
  }
  if (extra) {
    row.baseline = median(res.x.map((r) => r.ms))
    row.baselineRatio = row.baseline / mb
    row.rssBaseline = Math.max(...res.x.map((r) => r.rssKiB))
    row.all[extra.label] = res.x.map((r) => Math.round(r.ms))
  }
  return row
}

// ---------------------------------------------------------------------------

async function mainBench() {
  for (const t of ['qemu-img', 'qemu-io']) if (!which(t)) throw new Error(`${t} not found`)
  if (!existsSync(join(ROOT, 'dist', 'cli', 'main.js'))) throw new Error('dist/ missing: npm run build first')
  console.log(`node ${process.version}, ${spawnSync('qemu-img', ['--version'], { encoding: 'utf8' }).stdout.split('\n')[0]}`)
  console.log(`peak RSS via ${TIME ? '/usr/bin/time -f %M' : 'process.resourceUsage().maxRSS in a wrapper'}; ${RUNS} alternating runs per measurement\n`)
  const { meta, full } = build()
  const rows = []

  if (ONLY.includes('startup')) {
    rows.push(
      await duel(
        'startup: imgtool --version',
        { cmd: NODE, args: [BIN, '--version'] },
        { cmd: NODE, args: ['-e', '0'], label: 'node -e 0' },
        Math.max(RUNS, 15),
        null,
      ),
    )
  }
  if (ONLY.includes('info')) {
    rows.push(
      await duel(
        'info (1 TiB, metadata prealloc)',
        { cmd: NODE, args: [BIN, 'info', meta] },
        { cmd: 'qemu-img', args: ['info', meta], label: 'qemu-img info' },
        RUNS,
        null,
      ),
    )
  }
  if (ONLY.includes('map')) {
    rows.push(
      await duel(
        'map --output json (1 TiB, metadata prealloc)',
        { cmd: NODE, args: [BIN, 'map', '--output', 'json', meta] },
        { cmd: 'qemu-img', args: ['map', '--output=json', meta], label: 'qemu-img map' },
        RUNS,
        0.8,
      ),
    )
    // same answer?
    const ours = spawnSync(NODE, [BIN, 'map', '--output', 'json', meta], { encoding: 'utf8', maxBuffer: 1 << 30 }).stdout
    const theirs = spawnSync('qemu-img', ['map', '--output=json', meta], { encoding: 'utf8', maxBuffer: 1 << 30 }).stdout
    console.log(`  map output identical to qemu-img's: ${ours === theirs} (${theirs.split('\n').length - 1} lines)`)
  }
  if (ONLY.includes('cat')) {
    const outA = join(WORK, 'out-imgtool.raw')
    const outB = join(WORK, 'out-qemu.raw')
    const outX = join(WORK, 'out-baseline.raw')
    let extra
    if (BASELINE) {
      const bin = join(resolve(BASELINE), 'bin', 'imgtool')
      if (!existsSync(bin) || !existsSync(join(resolve(BASELINE), 'dist', 'cli', 'main.js'))) throw new Error(`--baseline ${BASELINE}: no built imgtool there`)
      extra = { cmd: NODE, args: [bin, 'cat', full], out: outX, label: `baseline ${BASELINE}`, before: () => dropOutput(outX), after: () => dropOutput(outX) }
    }
    rows.push(
      await duel(
        'cat > file (4 GiB fully written)',
        { cmd: NODE, args: [BIN, 'cat', full], out: outA, before: () => dropOutput(outA), after: () => dropOutput(outA) },
        {
          cmd: 'qemu-img',
          args: ['convert', '-f', 'qcow2', '-O', 'raw', full, outB],
          label: 'qemu-img convert -O raw',
          before: () => dropOutput(outB),
          after: () => dropOutput(outB),
        },
        CAT_RUNS,
        1.0,
        extra,
      ),
    )
  }

  console.log('')
  const pad = (s, n) => String(s).padEnd(n)
  console.log(`${pad('measurement', 46)}${pad('imgtool', 11)}${pad('reference', 30)}${pad('ratio', 8)}${pad('target', 9)}${pad('RSS imgtool', 13)}RSS reference`)
  for (const r of rows) {
    const ok = r.target === null ? '' : r.ratio <= r.target ? `<=${r.target} ok` : `<=${r.target} MISS`
    console.log(
      `${pad(r.name, 46)}${pad(`${r.imgtool.toFixed(0)} ms`, 11)}${pad(`${r.other.toFixed(0)} ms (${r.otherName})`, 30)}${pad(`${r.ratio.toFixed(2)}x`, 8)}${pad(ok, 9)}${pad(`${(r.rssImgtool / 1024).toFixed(0)} MiB`, 13)}${(r.rssOther / 1024).toFixed(0)} MiB`,
    )
  }
  for (const r of rows.filter((r) => r.baseline !== undefined)) {
    console.log(`${pad(`  baseline: ${r.name}`, 46)}${pad(`${r.baseline.toFixed(0)} ms`, 11)}${pad('', 30)}${pad(`${r.baselineRatio.toFixed(2)}x`, 8)}${pad('', 9)}${(r.rssBaseline / 1024).toFixed(0)} MiB`)
  }
  for (const r of rows) console.log(`  ${r.name}: ${Object.entries(r.all).map(([k, v]) => `${k} [${v.join(', ')}]`).join('; ')}`)
  const rssMax = Math.max(...rows.map((r) => r.rssImgtool)) / 1024
  console.log(`\npeak RSS of imgtool over all runs: ${rssMax.toFixed(0)} MiB (target < 150 MiB: ${rssMax < 150 ? 'ok' : 'MISS'})`)
  writeFileSync(join(WORK, 'last-run.json'), JSON.stringify({ date: new Date().toISOString(), node: process.version, rows }, null, 2) + '\n')
  if (!KEEP) rmSync(join(WORK, '.rss'), { force: true })
}

mainBench().catch((e) => {
  console.error(`bench: ${e.message}`)
  process.exit(1)
})
