/**
 * Rooms inside the qcow2 format (ARCHITECTURE.md, "Rooms inside a big format"), the format's single entry, and no
 * import cycles under src/ (type-only imports included). Imports are read from the source lines: static
 * `import`/`export ... from` (with `import type`) and dynamic `import()`.
 */
import { readdirSync, readFileSync, statSync } from 'node:fs'
import { dirname, join, relative, resolve } from 'node:path'
import { describe, expect, it } from 'vitest'

const SRC = resolve(__dirname, '..', 'src')
const Q = 'formats/qcow2/'

// Each room and the rooms it may import. 'top' is the façade (image.ts, driver.ts, index.ts): it may import every room.
const ALLOWED: Record<string, string[]> = {
  spec: [],
  read: ['spec'],
  check: ['spec', 'read'],
  repair: ['spec', 'read', 'check'],
  write: ['spec', 'read'],
  ops: ['spec', 'read', 'write', 'check', 'repair'],
  top: ['spec', 'read', 'check', 'repair', 'write', 'ops'],
}

// Room edges that break the table, listed exactly so that any NEW room violation fails. None left: the state
// object (read/state.ts) replaced the façade as what lower rooms are handed.
const KNOWN_ROOM_VIOLATIONS: string[] = []

// Files outside formats/qcow2 that still import qcow2 internals (to go through formats/qcow2/index.ts). Listed
// exactly, so that any NEW such import fails.
const KNOWN_OUTSIDE_IMPORTS: string[] = []

// The same for the dm-snapshot and raw formats (their entries: formats/dmsnap/index.ts, formats/raw/index.ts).
const KNOWN_OUTSIDE_IMPORTS_OTHER: string[] = []

// Import cycles that exist today, each as its sorted member list. Any new cycle, or a cycle that grows, fails.
// None left (the qcow2 façade cycle went with the state object, read/state.ts).
const KNOWN_CYCLES: string[][] = []

function walk(dir: string): string[] {
  return readdirSync(dir).flatMap((name) => {
    const p = join(dir, name)
    return statSync(p).isDirectory() ? walk(p) : p.endsWith('.ts') ? [p] : []
  })
}

const IMPORT_RE = /(?:^|\n)\s*(?:import|export)\s[^'";]*?from\s+['"]([^'"]+)['"]|import\(\s*['"]([^'"]+)['"]\s*\)/g

function importsOf(file: string): string[] {
  const text = readFileSync(file, 'utf8')
  const out: string[] = []
  for (const m of text.matchAll(IMPORT_RE)) {
    const spec = m[1] ?? m[2]
    if (spec === undefined || !spec.startsWith('.')) continue
    const abs = resolve(dirname(file), spec).replace(/\.js$/, '.ts')
    out.push(relative(SRC, abs).split('\\').join('/'))
  }
  return out
}

function roomOf(rel: string): string | undefined {
  if (!rel.startsWith(Q)) return undefined
  const rest = rel.slice(Q.length)
  const slash = rest.indexOf('/')
  return slash < 0 ? 'top' : rest.slice(0, slash)
}

const files = walk(SRC).map((f) => relative(SRC, f).split('\\').join('/'))
const graph = new Map(files.map((f) => [f, [...new Set(importsOf(join(SRC, f)).filter((t) => files.includes(t)))]]))

/** Tarjan's strongly connected components; returns the components with more than one member (or a self-import). */
function cycles(g: Map<string, string[]>): string[][] {
  let index = 0
  const idx = new Map<string, number>()
  const low = new Map<string, number>()
  const stack: string[] = []
  const on = new Set<string>()
  const out: string[][] = []
  const visit = (v: string): void => {
    idx.set(v, index)
    low.set(v, index++)
    stack.push(v)
    on.add(v)
    for (const w of g.get(v) ?? []) {
      if (!idx.has(w)) {
        visit(w)
        low.set(v, Math.min(low.get(v)!, low.get(w)!))
      } else if (on.has(w)) low.set(v, Math.min(low.get(v)!, idx.get(w)!))
    }
    if (low.get(v) === idx.get(v)) {
      const comp: string[] = []
      let w: string
      do {
        w = stack.pop()!
        on.delete(w)
        comp.push(w)
      } while (w !== v)
      if (comp.length > 1 || (g.get(v) ?? []).includes(v)) out.push(comp.sort())
    }
  }
  for (const v of g.keys()) if (!idx.has(v)) visit(v)
  return out.sort((a, b) => a[0]!.localeCompare(b[0]!))
}

describe('qcow2 rooms', () => {
  it('finds the rooms and reads their imports', () => {
    for (const room of Object.keys(ALLOWED)) expect(files.some((f) => roomOf(f) === room)).toBe(true)
    expect([...graph.values()].flat().length).toBeGreaterThan(100)
  })

  it('each room imports only the rooms the table allows (spec imports no other room)', () => {
    const bad: string[] = []
    for (const [from, targets] of graph) {
      const room = roomOf(from)
      if (room === undefined) continue
      for (const t of targets) {
        const to = roomOf(t)
        if (to === undefined || to === room) continue
        if (!(ALLOWED[room] ?? []).includes(to)) bad.push(`${from} -> ${t}`)
      }
    }
    expect(bad.sort()).toEqual([...KNOWN_ROOM_VIOLATIONS].sort())
  })

  it('nothing outside formats/qcow2 imports a qcow2 file other than formats/qcow2/index.ts', () => {
    const bad: string[] = []
    for (const [from, targets] of graph) {
      if (from.startsWith(Q)) continue
      for (const t of targets) if (t.startsWith(Q) && t !== `${Q}index.ts`) bad.push(`${from} -> ${t}`)
    }
    expect([...new Set(bad)].sort()).toEqual([...KNOWN_OUTSIDE_IMPORTS].sort())
  })

  it('nothing outside formats/dmsnap or formats/raw imports a file of it other than its index.ts', () => {
    const bad: string[] = []
    for (const [from, targets] of graph) {
      for (const f of ['formats/dmsnap/', 'formats/raw/']) {
        if (from.startsWith(f)) continue
        for (const t of targets) if (t.startsWith(f) && t !== `${f}index.ts`) bad.push(`${from} -> ${t}`)
      }
    }
    expect([...new Set(bad)].sort()).toEqual([...KNOWN_OUTSIDE_IMPORTS_OTHER].sort())
  })

  it('has no import cycles under src/ other than the known ones (type-only imports included)', () => {
    expect(cycles(graph)).toEqual(KNOWN_CYCLES)
  })
})
