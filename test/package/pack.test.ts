/**
 * The package as published: `npm pack`, install the tarball into a fresh
 * project, compile a strict TypeScript program that uses every exported
 * function against it (test/package/program.ts), and run it on fixtures.
 * This is the proof that `import { openImage, check, convert } from 'imgtool'`
 * works for a user.
 */
import { execFileSync } from 'node:child_process'
import { copyFileSync, existsSync, readdirSync, writeFileSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { expect, it } from 'vitest'
import { makeTempDir, useTempDirs } from '../support/qemu.js'

useTempDirs()
const ROOT = resolve(__dirname, '..', '..')

it('installs from its tarball and compiles and runs a strict TypeScript user program', () => {
  if (!existsSync(join(ROOT, 'dist', 'index.js'))) throw new Error('dist/ is missing: run npm run build (npm install does) first')
  const dir = makeTempDir('imgtool-pack-')
  // --ignore-scripts: dist/ is built already (prepare); rebuilding it here would race the other test files
  const packed = execFileSync('npm', ['pack', '--ignore-scripts', '--json', '--pack-destination', dir], { cwd: ROOT, encoding: 'utf8' })
  const info = JSON.parse(packed) as Array<{ filename: string; files: Array<{ path: string }> }>
  const files = info[0]!.files.map((f) => f.path)
  expect(files).toContain('dist/index.js')
  expect(files).toContain('dist/index.d.ts')
  expect(files).toContain('LICENSE')
  expect(files.filter((f) => f.endsWith('.map') || f.startsWith('test/') || f.startsWith('bench/') || f.startsWith('src/'))).toEqual([])

  const app = join(dir, 'app')
  execFileSync('mkdir', ['-p', app])
  writeFileSync(join(app, 'package.json'), JSON.stringify({ name: 'app', private: true, type: 'module' }))
  execFileSync('npm', ['install', '--no-audit', '--no-fund', '--prefer-offline', join(dir, info[0]!.filename)], { cwd: app, stdio: 'pipe', timeout: 600_000 })
  copyFileSync(join(ROOT, 'test', 'package', 'program.ts'), join(app, 'program.ts'))
  writeFileSync(
    join(app, 'tsconfig.json'),
    JSON.stringify({
      compilerOptions: {
        target: 'ES2022',
        module: 'NodeNext',
        moduleResolution: 'NodeNext',
        strict: true,
        noUncheckedIndexedAccess: true,
        exactOptionalPropertyTypes: true,
        noEmitOnError: true,
        lib: ['ES2022', 'ESNext.Disposable'],
        types: ['node'],
        typeRoots: [join(ROOT, 'node_modules', '@types')],
        outDir: 'out',
      },
      files: ['program.ts'],
    }),
  )
  execFileSync(process.execPath, [join(ROOT, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', 'tsconfig.json'], { cwd: app, stdio: 'pipe' })
  const work = join(dir, 'work')
  execFileSync('mkdir', ['-p', work])
  const dm = join(ROOT, 'images', 'dmsnap', 'c8-basic')
  const stdout = execFileSync(
    process.execPath,
    [join(app, 'out', 'program.js'), work, join(ROOT, 'images', 'qcow2', 'v3-c64k.qcow2'), join(dm, 'origin.img'), join(dm, 'cow.img')],
    {
      cwd: app,
      encoding: 'utf8',
    },
  )
  const out = JSON.parse(stdout) as Record<string, { codes?: string[] } & Record<string, unknown>>
  expect(out['info']).toMatchObject({ format: 'qcow2', writable: false })
  expect(out['check']).toEqual({ corruptions: 0, leaks: 0, exit: 0, clean: 0 })
  expect(out['checkOpen']).toBe(0)
  expect(out['snapshot']).toEqual({ id: '1', list: ['first'] })
  expect(out['resized']).toBe(5 << 20)
  expect(out['convert']).toMatchObject({ identical: true, progress: true })
  expect(out['memory']).toBe(1 << 20)
  expect(out['merge']).toBe(1)
  expect(out['dmsnapCheck']).toBe(0)
  expect(out['errors']!.codes).toEqual(['NOT_FOUND', 'USAGE', 'UNSUPPORTED', 'INTERRUPTED'])
  expect(readdirSync(work)).toContain('made.raw')
}, 900_000)
