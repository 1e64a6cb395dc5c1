#!/usr/bin/env node
/**
 * Write-path benchmark: imgtool against qemu-img on the same inputs, run
 * alternately, reporting median wall time, the ratio and peak RSS.
 *
 *   npm run build && node bench/write.mjs [--gb 4] [--runs 5] [--only convert-raw,convert-qcow2,convert-c,compare,create]
 *
 * Inputs (bench/work/, gitignored), made with node and qemu-img:
 *   mixed-full.raw / full.qcow2   GB GiB, every byte written (compressible mixed data)
 *   half.raw                      GB GiB, first half mixed data, second half zeros (sparse)
 * Measures:
 *   convert-raw     convert -O raw full.qcow2          (qcow2 -> raw)
 *   convert-qcow2   convert -O qcow2 half.raw          (raw half zeros -> qcow2)
 *   convert-c       convert -O qcow2 -c half.raw       (compressed, worker threads)
 *   compare         compare full.qcow2 mixed-full.raw
 *   create          create -f qcow2 -o preallocation=metadata X 1T
 */
import { spawn, spawnSync } from 'node:child_process'
import { existsSync, mkdirSync, rmSync } from 'node:fs'
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
const ONLY = opt('--only', 'convert-raw,convert-qcow2,convert-c,compare,create').split(',')
const SIZE = GB * 1024 ** 3

function run(cmd, args) {
  return new Promise((res, rej) => {
    const full = TIME ? [TIME, ['-f', '%M', cmd, ...args]] : [cmd, args]
    const t0 = process.hrtime.bigint()
    const p = spawn(full[0], full[1], { stdio: ['ignore', 'ignore', 'pipe'] })
    let err = ''
    p.stderr.on('data', (d) => (err += d))
    p.on('close', (code) => {
      const ms = Number(process.hrtime.bigint() - t0) / 1e6
      if (code !== 0 && code !== 1) return rej(new Error(`${cmd} ${args.join(' ')} exited ${code}: ${err}`))
      const rss = TIME ? Number(err.trim().split('\n').pop()) / 1024 : NaN
      res({ ms, rss, code })
    })
  })
}

async function prepare() {
  mkdirSync(WORK, { recursive: true })
  const full = join(WORK, `mixed-full-${GB}.raw`)
  const half = join(WORK, `half-${GB}.raw`)
  const q = join(WORK, `full-${GB}.qcow2`)
  if (!existsSync(full)) writeRaw(full, SIZE, SIZE)
  if (!existsSync(half)) writeRaw(half, SIZE / 2, SIZE)
  if (!existsSync(q)) await run('qemu-img', ['convert', '-O', 'qcow2', full, q])
  return { full, half, q }
}

const median = (xs) => xs.slice().sort((a, b) => a - b)[Math.floor(xs.length / 2)]

/**
 * Before each timed run (outside the timing): remove the output and sync, so
 * neither tool pays for the previous run's dirty pages being written back.
 */
function settle(cleanup) {
  cleanup?.()
  spawnSync('sync')
}

async function bench(name, ours, theirs, cleanup) {
  const a = []
  const b = []
  for (let i = 0; i < RUNS; i++) {
    settle(cleanup)
    b.push(await run(theirs[0], theirs.slice(1)))
    settle(cleanup)
    a.push(await run(BIN, ours))
  }
  cleanup?.()
  const ma = median(a.map((r) => r.ms))
  const mb = median(b.map((r) => r.ms))
  const rss = Math.max(...a.map((r) => r.rss))
  const all = (xs) => xs.map((r) => (r.ms / 1000).toFixed(2)).join(' ')
  const line = `${name.padEnd(15)} imgtool ${(ma / 1000).toFixed(2)} s   qemu-img ${(mb / 1000).toFixed(2)} s   ratio ${(ma / mb).toFixed(2)}x   imgtool peak RSS ${rss.toFixed(0)} MiB   (imgtool: ${all(a)}; qemu-img: ${all(b)})`
  console.log(line)
  return line
}

/** Both tools' outputs for the same job, compared byte for byte with cmp (outside any timing). */
async function sameOutput(name, ours, theirs) {
  const a = join(WORK, 'same-ours.img')
  const b = join(WORK, 'same-theirs.img')
  rmSync(a, { force: true })
  rmSync(b, { force: true })
  await run(BIN, [...ours, a])
  await run(theirs[0], [...theirs.slice(1), b])
  const same = spawnSync('cmp', ['-s', a, b]).status === 0
  rmSync(a, { force: true })
  rmSync(b, { force: true })
  const line = `${name.padEnd(15)} output ${same ? 'byte-identical to' : 'DIFFERS from'} qemu-img's`
  console.log(line)
  return line
}

const { full, half, q } = await prepare()
const out = join(WORK, 'out.img')
const rmOut = () => rmSync(out, { force: true })
console.log(`# imgtool write bench, ${GB} GiB inputs, median of ${RUNS} alternating runs`)
if (ONLY.includes('convert-raw')) await bench('convert-raw', ['convert', '-O', 'raw', q, out], ['qemu-img', 'convert', '-O', 'raw', q, out], rmOut)
if (ONLY.includes('convert-qcow2')) {
  await bench('convert-qcow2', ['convert', '-f', 'raw', '-O', 'qcow2', half, out], ['qemu-img', 'convert', '-f', 'raw', '-O', 'qcow2', half, out], rmOut)
  await sameOutput('convert-qcow2', ['convert', '-f', 'raw', '-O', 'qcow2', half], ['qemu-img', 'convert', '-f', 'raw', '-O', 'qcow2', half])
}
if (ONLY.includes('convert-c')) {
  await bench('convert-c', ['convert', '-f', 'raw', '-O', 'qcow2', '-c', half, out], ['qemu-img', 'convert', '-f', 'raw', '-O', 'qcow2', '-c', half, out], rmOut)
  await sameOutput('convert-c', ['convert', '-f', 'raw', '-O', 'qcow2', '-c', half], ['qemu-img', 'convert', '-f', 'raw', '-O', 'qcow2', '-c', half])
}
if (ONLY.includes('compare')) await bench('compare', ['compare', q, full], ['qemu-img', 'compare', q, full])
if (ONLY.includes('create')) await bench('create-1T-meta', ['create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata', out, '1T'], ['qemu-img', 'create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata', out, '1T'], rmOut)
