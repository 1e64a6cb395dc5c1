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
const CLI_ONLY = ['commander', 'ora', 'cli-table3', 'zod']

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
})
