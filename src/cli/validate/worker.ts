/** A worker thread of `validate --manifest --jobs N`: validates one image per message and posts the outcome. */
import { parentPort } from 'node:worker_threads'
import type { Policy } from '../../index.js'
import { validateOne } from './options.js'

parentPort?.on('message', (m: { file: string; policy: Policy }) => {
  validateOne(m.file, m.policy).then(
    (outcome) => parentPort!.postMessage({ outcome }),
    (e: unknown) => parentPort!.postMessage({ outcome: { file: m.file, error: e instanceof Error ? e.message : String(e) } }),
  )
})
