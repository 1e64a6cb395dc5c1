/**
 * Many images: `--manifest FILE` (JSON lines) validated by `--jobs N` worker
 * threads, one result line per image as it finishes and a summary line (human,
 * json), or one JUnit / SARIF document the images are written into as they finish.
 * The manifest is read as a stream and at most N images are in flight, so
 * memory stays bounded however many lines the manifest has.
 */
import { createReadStream } from 'node:fs'
import { dirname, isAbsolute, join } from 'node:path'
import { createInterface } from 'node:readline'
import { Worker } from 'node:worker_threads'
import { z } from 'zod'
import { KNOWN_FORMATS, PRESET_NAMES, UsageError, mergePolicy, resolvePolicy, type Policy } from '../../index.js'
import type { CliIo } from '../command.js'
import { loadPolicyFile } from './policy-file.js'
import { addToSummary, exitCodeOf, humanOne, humanSummary, outcomeJson, type Outcome, type Summary } from './render.js'
import { policyOf, validateOne, type ValidateCliOptions } from './options.js'

const lineSchema = z.strictObject({
  path: z.string().min(1),
  format: z.enum(KNOWN_FORMATS).optional(),
  policy: z.string().optional(),
  preset: z.enum(PRESET_NAMES).optional(),
  digest: z
    .string()
    .regex(/^(sha256:)?[0-9a-fA-F]{64}$/)
    .optional(),
})
type ManifestLine = z.infer<typeof lineSchema>

export interface Job {
  index: number
  file: string
  policy: Policy
}

/** Runs jobs in-process (jobs = 1) or on worker threads. */
interface Runner {
  run(job: Job): Promise<Outcome>
  close(): Promise<void>
}

export async function runManifest(o: ValidateCliOptions, io: CliIo): Promise<number> {
  const manifest = o.manifest!
  const base = await policyOf(o)
  // junit and sarif: one document over every image, each image written into it as it finishes
  const junitOut = o.output === 'junit' ? new (await import('./junit.js')).JunitWriter(o.failOn) : undefined
  const sarifOut = o.output === 'sarif' ? new (await import('./sarif.js')).SarifWriter(o.failOn, base) : undefined
  const policies = new PolicyCache(manifest)
  const runner = o.jobs > 1 ? await workerRunner(o.jobs) : inProcessRunner()
  const summary: Summary = { images: 0, passed: 0, failed: 0, errors: 0, violations: 0 }
  const inFlight = new Set<Promise<void>>()
  const emit = (index: number, out: Outcome): void => {
    addToSummary(summary, out, o.failOn)
    if (o.output === 'json') io.stdout.write(JSON.stringify({ index, ...outcomeJson(out, o.failOn) }) + '\n')
    else if (junitOut) io.stdout.write(junitOut.suite(out, index))
    else if (sarifOut) io.stdout.write(sarifOut.add(out))
    else io.stdout.write(humanOne(out, o.failOn).join('\n') + '\n')
    if (io.isTTY && o.output === 'human') io.stderr.write(`\r${summary.images} image(s) validated`)
  }
  let started = false
  const start = (): void => {
    if (started) return
    started = true
    if (junitOut) io.stdout.write(junitOut.head())
    if (sarifOut) io.stdout.write(sarifOut.head())
  }
  try {
    const lines = createInterface({ input: createReadStream(manifest, 'utf8'), crlfDelay: Infinity })
    let index = 0
    for await (const text of lines) {
      index++
      if (text.trim() === '' || text.trimStart().startsWith('#')) continue
      const line = parseLine(text, manifest, index)
      start()
      const file = isAbsolute(line.path) ? line.path : join(dirname(manifest), line.path)
      const job: Job = { index, file, policy: await policies.for(line, base) }
      const p: Promise<void> = runner.run(job).then((out) => {
        emit(job.index, out)
        inFlight.delete(p)
      })
      inFlight.add(p)
      if (inFlight.size >= o.jobs) await Promise.race(inFlight)
    }
    await Promise.all(inFlight)
  } catch (e) {
    await Promise.allSettled(inFlight)
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') throw new UsageError(`${manifest}: No such file or directory`, { file: manifest })
    throw e
  } finally {
    await runner.close()
  }
  if (io.isTTY && o.output === 'human') io.stderr.write('\n')
  start()
  if (junitOut) io.stdout.write(junitOut.tail())
  else if (sarifOut) io.stdout.write(sarifOut.end())
  else if (o.output === 'json') io.stdout.write(JSON.stringify({ summary }) + '\n')
  else io.stdout.write(humanSummary(summary) + '\n')
  return exitCodeOf(summary)
}

function parseLine(text: string, manifest: string, index: number): ManifestLine {
  let data: unknown
  try {
    data = JSON.parse(text)
  } catch (e) {
    throw new UsageError(`${manifest}:${index}: not valid JSON: ${(e as Error).message}`, { file: manifest })
  }
  const r = lineSchema.safeParse(data)
  if (!r.success) {
    const why = r.error.issues.map((i) =>
      i.code === 'unrecognized_keys' ? `unknown key ${i.keys.map((k) => `'${k}'`).join(', ')}` : `${i.path.join('.') || '(line)'}: ${i.message}`,
    )
    throw new UsageError(`${manifest}:${index}: ${why.join('; ')}`, { file: manifest })
  }
  if (r.data.policy !== undefined && r.data.preset !== undefined)
    throw new UsageError(`${manifest}:${index}: give policy or preset, not both`, { file: manifest })
  return r.data
}

/** Policies named by manifest lines, loaded once each. */
class PolicyCache {
  private readonly cache = new Map<string, Policy>()
  constructor(private readonly manifest: string) {}
  async for(line: ManifestLine, base: Policy): Promise<Policy> {
    let p = base
    if (line.policy !== undefined || line.preset !== undefined) {
      const key = line.policy !== undefined ? `file:${line.policy}` : `preset:${line.preset}`
      let cached = this.cache.get(key)
      if (!cached) {
        cached = await resolvePolicy(line.policy !== undefined ? await loadPolicyFile(join(dirname(this.manifest), line.policy)) : { extends: line.preset })
        this.cache.set(key, cached)
      }
      p = cached
    }
    const over: Partial<Policy> = {}
    if (line.format !== undefined) over.expectFormat = line.format
    if (line.digest !== undefined) over.content = { ...p.content, expectDigest: line.digest.replace(/^sha256:/, '') }
    return Object.keys(over).length > 0 ? mergePolicy(p, over) : p
  }
}

function inProcessRunner(): Runner {
  return { run: (job) => validateOne(job.file, job.policy), close: async () => undefined }
}

/** A pool of worker threads, each validating one image at a time (worker.ts). */
async function workerRunner(n: number): Promise<Runner> {
  const url = new URL('./worker.js', import.meta.url)
  const idle: Worker[] = []
  const waiting: Array<(w: Worker) => void> = []
  const all: Worker[] = []
  for (let i = 0; i < n; i++) {
    const w = new Worker(url)
    w.unref()
    all.push(w)
    idle.push(w)
  }
  const take = (): Promise<Worker> => {
    const w = idle.pop()
    return w ? Promise.resolve(w) : new Promise((resolve) => waiting.push(resolve))
  }
  const give = (w: Worker): void => {
    const next = waiting.shift()
    if (next) next(w)
    else idle.push(w)
  }
  return {
    async run(job) {
      const w = await take()
      let out: Outcome
      try {
        out = await new Promise<Outcome>((resolve, reject) => {
          const onMessage = (m: { outcome: Outcome }): void => {
            w.off('error', onError)
            resolve(m.outcome)
          }
          const onError = (e: Error): void => {
            w.off('message', onMessage)
            reject(e)
          }
          w.once('message', onMessage)
          w.once('error', onError)
          w.postMessage({ file: job.file, policy: job.policy })
        })
      } catch (e) {
        // a worker that died is replaced, the image reported as not validated
        const fresh = new Worker(url)
        fresh.unref()
        all[all.indexOf(w)] = fresh
        void w.terminate()
        give(fresh)
        return { file: job.file, error: `worker failed: ${(e as Error).message}` }
      }
      give(w)
      return out
    },
    async close() {
      await Promise.all(all.map((w) => w.terminate()))
    },
  }
}
