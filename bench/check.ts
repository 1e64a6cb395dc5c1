/**
 * Benchmark: imgtool's qcow2 check against `qemu-img check`, alternating, on
 *   1. a 1 TiB preallocation=metadata image (16.8 M clusters of 64 KiB),
 *   2. a 2 GiB image with 4 KiB clusters written in random order,
 *   3. a 4 GiB fully written image (64 KiB clusters).
 * Prints median times, the ratio, and memory per host cluster (the refcount
 * array, and the growth of the process's resident set during the check).
 *
 *   bash bench/check.sh [WORKDIR]     (builds this file and runs it)
 */
import { execFileSync, spawnSync } from 'node:child_process'
import { existsSync, statSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { openFileDevice } from '../src/io/file-device.js'
import { analyzeQcow2 } from '../src/formats/qcow2/check.js'

const work = process.argv[2] ?? '/tmp/imgtool-bench'
const rounds = Number(process.env['ROUNDS'] ?? 3)

function sh(cmd: string, args: string[], input?: string): void {
  const r = spawnSync(cmd, args, { input, stdio: ['pipe', 'ignore', 'inherit'], maxBuffer: 1 << 30 })
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.status})`)
}

function make(): Array<{ name: string; path: string }> {
  const out: Array<{ name: string; path: string }> = []
  const tib = join(work, 'tib.qcow2')
  if (!existsSync(tib)) sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata,cluster_size=64k', tib, '1T'])
  out.push({ name: '1 TiB preallocation=metadata (64 KiB clusters)', path: tib })
  const rnd = join(work, 'random-4k.qcow2')
  if (!existsSync(rnd)) {
    sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', rnd, '2G'])
    // every 4 KiB cluster written once, in a random (seeded) order
    const n = (2 * 1024 ** 3) / 4096
    const order = Array.from({ length: n }, (_, i) => i)
    let s = 12345
    for (let i = n - 1; i > 0; i--) {
      s = (s * 1103515245 + 12345) & 0x7fffffff
      const j = s % (i + 1)
      ;[order[i], order[j]] = [order[j]!, order[i]!]
    }
    const lines = order.map((c) => `write -q -P ${(c % 255) + 1} ${c * 4096} 4k`).join('\n') + '\n'
    sh('qemu-io', ['-f', 'qcow2', rnd], lines)
  }
  out.push({ name: '2 GiB, 4 KiB clusters written in random order', path: rnd })
  const full = join(work, 'full-4g.qcow2')
  if (!existsSync(full)) {
    sh('qemu-img', ['create', '-q', '-f', 'qcow2', full, '4G'])
    sh('qemu-io', ['-f', 'qcow2', ...[0, 1, 2, 3].flatMap((g) => ['-c', `write -q -P 0x5a ${g}G 1G`]), full])
  }
  out.push({ name: '4 GiB fully written (64 KiB clusters)', path: full })
  return out
}

async function ours(path: string): Promise<{ ms: number; imrtBytes: number; clusters: number; rssGrowth: number }> {
  const dev = await openFileDevice(path, { readOnly: true })
  global.gc?.()
  const rss0 = process.memoryUsage().rss
  let peak = rss0
  const timer = setInterval(() => (peak = Math.max(peak, process.memoryUsage().rss)), 5)
  const t0 = performance.now()
  const a = await analyzeQcow2(dev)
  const ms = performance.now() - t0
  clearInterval(timer)
  peak = Math.max(peak, process.memoryUsage().rss)
  await dev.close()
  if (a.report.corruptions || a.report.leaks || a.report.checkErrors) throw new Error(`${path}: not clean`)
  return { ms, imrtBytes: a.imrt.bytes, clusters: a.nbClusters, rssGrowth: peak - rss0 }
}

function qemu(path: string): number {
  const t0 = performance.now()
  execFileSync('qemu-img', ['check', path], { stdio: 'ignore' })
  return performance.now() - t0
}

const median = (v: number[]) => [...v].sort((a, b) => a - b)[Math.floor(v.length / 2)]!

const rows: string[] = []
const only = process.env['ONLY']
for (const img of make().filter((i) => !only || i.path.includes(only))) {
  const o: number[] = []
  const q: number[] = []
  let mem = { imrtBytes: 0, clusters: 0, rssGrowth: 0 }
  for (let r = 0; r < rounds; r++) {
    const x = await ours(img.path)
    o.push(x.ms)
    mem = { imrtBytes: x.imrtBytes, clusters: x.clusters, rssGrowth: Math.max(mem.rssGrowth, x.rssGrowth) }
    q.push(qemu(img.path))
  }
  const line =
    `| ${img.name} | ${(statSync(img.path).size / 2 ** 20).toFixed(0)} MiB | ${mem.clusters} | ${median(o).toFixed(0)} ms | ${median(q).toFixed(0)} ms | ` +
    `${(median(o) / median(q)).toFixed(2)} | ${(mem.imrtBytes / mem.clusters).toFixed(2)} | ${(mem.rssGrowth / mem.clusters).toFixed(2)} |`
  console.log(line)
  rows.push(line)
}
const header =
  '| image | file size | host clusters | imgtool check | qemu-img check | ratio | refcount array B/cluster | RSS growth B/cluster |\n|---|---|---|---|---|---|---|---|'
if (process.env['WRITE_README']) writeFileSync(process.env['WRITE_README'], header + '\n' + rows.join('\n') + '\n')
