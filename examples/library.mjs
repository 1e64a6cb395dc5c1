import { check, convert, compare, openImage, ImgtoolError } from 'imgtool'

// the library, imported by its package name (inside this checkout too): node examples/library.mjs
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

const disk = 'images/qcow2/v3-c64k.qcow2'
const out = join(mkdtempSync(join(tmpdir(), 'imgtool-example-')), 'v3-c64k.raw')
const report = await check(disk) // qemu-img check's counters, plus findings naming structures and offsets
console.log(`${report.corruptions} corruptions, ${report.leaks} leaks, ${report.findings.length} findings`)

const img = await openImage(disk) // read-only; { readOnly: false } to write
try {
  const info = await img.info()
  let data = 0
  for await (const e of img.extents()) if (e.data) data += e.length
  console.log(`${info.format}, ${info.virtualSize} bytes, ${data} bytes of data`)
} finally {
  await img.close()
}

await convert(disk, out, { targetFormat: 'raw', onProgress: (done, total) => void 0 })
console.log((await compare(disk, out)).identical ? 'identical' : 'different')

try {
  await convert(disk, disk, { targetFormat: 'qcow2' })
} catch (e) {
  if (e instanceof ImgtoolError) console.log(`refused (${e.code}): ${e.message}`)
}
