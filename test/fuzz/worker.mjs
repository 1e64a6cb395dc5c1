// A long-lived process that runs imgtool commands in process (dist/cli/main.js,
// the code `node bin/imgtool` runs) for the fuzzer, one request at a time:
// stdin and stdout carry one JSON object a line. The parent kills it on a
// timeout and restarts it after a crash or when its peak RSS is too high.
import { closeSync, openSync, writeSync } from 'node:fs'
import { createHash } from 'node:crypto'
import { createInterface } from 'node:readline'
import { Writable } from 'node:stream'

const { main } = await import(process.argv[2])
const reply = (o) => process.stdout.write(JSON.stringify(o) + '\n')
let current
// anything that escapes main() is recorded against the request that was running
process.on('uncaughtException', (e) => {
  if (current) current.stray.push(`uncaughtException: ${e && e.stack ? e.stack : String(e)}`)
  else reply({ id: -1, stray: [`uncaughtException (idle): ${e && e.stack}`] })
})
process.on('unhandledRejection', (e) => {
  if (current) current.stray.push(`unhandledRejection: ${e && e.stack ? e.stack : String(e)}`)
  else reply({ id: -1, stray: [`unhandledRejection (idle): ${e && e.stack}`] })
})

function sink(file) {
  const h = createHash('md5')
  let n = 0
  const fd = file ? openSync(file, 'w') : undefined
  const w = new Writable({
    write(chunk, _enc, cb) {
      const b = typeof chunk === 'string' ? Buffer.from(chunk) : chunk
      h.update(b)
      n += b.length
      if (fd !== undefined) writeSync(fd, b)
      else if (w.text.length < 1 << 20) w.text += b.toString('utf8')
      cb()
    },
  })
  w.text = ''
  w.done = () => {
    if (fd !== undefined) closeSync(fd)
    return { md5: h.digest('hex'), length: n }
  }
  return w
}

const rl = createInterface({ input: process.stdin })
for await (const line of rl) {
  const req = JSON.parse(line)
  const started = Date.now()
  const out = sink(req.stdoutFile)
  const err = sink()
  current = { stray: [] }
  let code
  let threw
  try {
    process.chdir(req.cwd)
    code = await main(['node', 'imgtool', ...req.argv], { stdout: out, stderr: err, isTTY: false })
  } catch (e) {
    threw = e && e.stack ? e.stack : String(e)
  }
  // let stray rejections surface
  await new Promise((r) => setImmediate(r))
  const o = out.done()
  err.done()
  reply({
    id: req.id,
    code,
    threw,
    stray: current.stray,
    stdoutMd5: o.md5,
    stdoutLength: o.length,
    stdout: req.stdoutFile ? undefined : out.text,
    stderr: err.text,
    maxRssKiB: process.resourceUsage().maxRSS,
    ms: Date.now() - started,
  })
  current = undefined
}
