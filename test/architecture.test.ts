import { readdirSync, readFileSync, statSync } from 'node:fs'
import { join, relative, dirname, resolve } from 'node:path'
import { describe, expect, it } from 'vitest'

// Layers from ARCHITECTURE.md: an import may only go down, formats never import each other.
const SRC = resolve(__dirname, '..', 'src')

function layerOf(rel: string): number {
  if (rel.startsWith('util/') || rel === 'errors.ts') return 0
  if (rel.startsWith('io/')) return 1
  if (rel.startsWith('image/') || rel.startsWith('check/')) return 2
  if (rel.startsWith('formats/')) return 3
  if (rel.startsWith('convert/') || rel.startsWith('api/') || rel.startsWith('validate/') || rel === 'open.ts' || rel === 'index.ts') return 4
  if (rel.startsWith('cli/')) return 5
  throw new Error(`file outside the known layers: ${rel}`)
}

function formatOf(rel: string): string | undefined {
  const m = /^formats\/([^/]+)\//.exec(rel)
  return m?.[1]
}

function walk(dir: string): string[] {
  return readdirSync(dir).flatMap((name) => {
    const p = join(dir, name)
    return statSync(p).isDirectory() ? walk(p) : p.endsWith('.ts') ? [p] : []
  })
}

const IMPORT_RE = /(?:^|\n)\s*(?:import|export)\s[^'"]*?from\s+['"]([^'"]+)['"]|import\(\s*['"]([^'"]+)['"]\s*\)/g
const CLI_ONLY = ['commander', 'ora', 'cli-table3', 'zod', 'yaml']

describe('architecture', () => {
  const files = walk(SRC).map((f) => relative(SRC, f).split('\\').join('/'))

  it('has source files in every layer it names', () => {
    expect(files.length).toBeGreaterThan(10)
    for (const f of files) expect(() => layerOf(f)).not.toThrow()
  })

  for (const file of walk(SRC)) {
    const rel = relative(SRC, file).split('\\').join('/')
    it(`${rel} imports only downwards`, () => {
      const text = readFileSync(file, 'utf8')
      const problems: string[] = []
      for (const m of text.matchAll(IMPORT_RE)) {
        const spec = m[1] ?? m[2]
        if (!spec) continue
        if (spec.startsWith('.')) {
          const target = relative(SRC, resolve(dirname(file), spec))
            .split('\\')
            .join('/')
            .replace(/\.js$/, '.ts')
          const from = layerOf(rel)
          const to = layerOf(target)
          if (to > from) problems.push(`imports ${target} (layer ${to}) from layer ${from}`)
          const fa = formatOf(rel)
          const fb = formatOf(target)
          if (fa && fb && fa !== fb) problems.push(`format ${fa} imports format ${fb} (${target})`)
        } else {
          const pkg = spec.startsWith('@') ? spec.split('/').slice(0, 2).join('/') : spec.split('/')[0]!
          if (CLI_ONLY.includes(pkg) && layerOf(rel) !== 5) problems.push(`imports ${pkg} outside src/cli`)
          if ((pkg === 'node:fs' || pkg === 'node:fs/promises' || pkg === 'fs') && layerOf(rel) === 3) {
            problems.push(`format code imports ${pkg}; use a BlockDevice`)
          }
        }
      }
      expect(problems).toEqual([])
    })
  }

  // The CLI sits on the public API: src/index.ts, its own files, node built-ins and its npm dependencies (yaml reads policy files).
  const CLI_DEPS = ['commander', 'zod', 'ora', 'cli-table3', 'yaml']
  for (const file of walk(SRC)) {
    const rel = relative(SRC, file).split('\\').join('/')
    if (layerOf(rel) !== 5) continue
    it(`${rel} imports only src/index.ts, src/cli, node built-ins and ${CLI_DEPS.join('/')}`, () => {
      const problems: string[] = []
      for (const m of readFileSync(file, 'utf8').matchAll(IMPORT_RE)) {
        const spec = m[1] ?? m[2]
        if (!spec) continue
        if (spec.startsWith('.')) {
          const target = relative(SRC, resolve(dirname(file), spec))
            .split('\\')
            .join('/')
            .replace(/\.js$/, '.ts')
          if (target !== 'index.ts' && !target.startsWith('cli/')) problems.push(`imports ${target}`)
        } else {
          const pkg = spec.startsWith('@') ? spec.split('/').slice(0, 2).join('/') : spec.split('/')[0]!
          if (!spec.startsWith('node:') && !CLI_DEPS.includes(pkg)) problems.push(`imports ${spec}`)
        }
      }
      expect(problems).toEqual([])
    })
  }

  // The library returns data; only src/cli prints or exits (bin/ is outside src).
  const OUTPUT_RE = /\bconsole\.|\bprocess\.(?:stdout|stderr|exit)\b/
  for (const file of walk(SRC)) {
    const rel = relative(SRC, file).split('\\').join('/')
    if (layerOf(rel) === 5) continue
    it(`${rel} neither prints nor exits`, () => {
      const lines = readFileSync(file, 'utf8').split('\n')
      const problems = lines.flatMap((line, i) => (OUTPUT_RE.test(line) ? [`line ${i + 1}: ${line.trim()}`] : []))
      expect(problems).toEqual([])
    })
  }
})
