/** The README's library example (examples/library.mjs) runs as written, against the build in dist/. */
import { execFileSync } from 'node:child_process'
import { resolve } from 'node:path'
import { expect, it } from 'vitest'

it('examples/library.mjs runs as the README shows it', () => {
  const root = resolve(__dirname, '..')
  const out = execFileSync(process.execPath, ['examples/library.mjs'], { cwd: root, encoding: 'utf8' })
  expect(out).toBe(
    [
      '0 corruptions, 0 leaks, 0 findings',
      'qcow2, 2097152 bytes, 131072 bytes of data',
      'identical',
      "refused (USAGE): convert: the target 'images/qcow2/v3-c64k.qcow2' is the source image: refusing to overwrite it",
      '',
    ].join('\n'),
  )
})
