/**
 * info rendering: qemu-img's JSON field names; qemu-img's human `key: value`
 * lines (bdrv_image_info_dump); and the older table behind --table.
 */
import Table from 'cli-table3'
import { escapeControls as esc, humanSize, type ImageInfo, type SnapshotInfo } from '../../index.js'

export function infoJson(i: ImageInfo): Record<string, unknown> {
  const o: Record<string, unknown> = {}
  if (i.backingFormat !== undefined) o['backing-filename-format'] = i.backingFormat
  if (i.snapshots) o['snapshots'] = i.snapshots.map(snapshotJson)
  o['virtual-size'] = i.virtualSize
  o['filename'] = i.filename
  if (i.clusterSize !== undefined) o['cluster-size'] = i.clusterSize
  o['format'] = i.format
  if (i.actualSize !== undefined) o['actual-size'] = i.actualSize
  if (i.formatSpecific) o['format-specific'] = i.formatSpecific
  if (i.fullBackingFilename !== undefined) o['full-backing-filename'] = i.fullBackingFilename
  if (i.encrypted) o['encrypted'] = true
  if (i.backingFilename !== undefined) o['backing-filename'] = i.backingFilename
  o['dirty-flag'] = i.dirty ?? false
  return o
}

/** one snapshot as qemu-img info --output json shows it */
export function snapshotJson(s: SnapshotInfo): Record<string, unknown> {
  const o: Record<string, unknown> = {}
  if (s.icount !== undefined) o['icount'] = s.icount
  o['vm-clock-nsec'] = s.vmClockNsec % 1e9
  o['name'] = s.name
  o['date-sec'] = s.dateSec
  o['date-nsec'] = s.dateNsec
  o['vm-clock-sec'] = Math.floor(s.vmClockNsec / 1e9)
  o['id'] = s.id
  o['vm-state-size'] = s.vmStateSize
  return o
}

/** The old cli-table3 rendering (`imgtool info --table`). */
export function infoTable(i: ImageInfo): string {
  const t = new Table({ style: { head: [], border: [] } })
  const row = (k: string, v: string) => t.push({ [k]: v })
  row('image', esc(i.filename))
  row('file format', i.format)
  row('virtual size', `${humanSize(i.virtualSize)} (${i.virtualSize} bytes)`)
  if (i.actualSize !== undefined) row('disk size', humanSize(i.actualSize))
  if (i.encrypted) row('encrypted', 'yes')
  if (i.clusterSize !== undefined) row('cluster size', String(i.clusterSize))
  if (i.backingFilename !== undefined) {
    const full = i.fullBackingFilename && i.fullBackingFilename !== i.backingFilename ? ` (actual path: ${esc(i.fullBackingFilename)})` : ''
    row('backing file', esc(i.backingFilename) + full)
  }
  if (i.backingFormat !== undefined) row('backing file format', esc(i.backingFormat))
  if (i.dirty) row('dirty', 'yes: the image was not closed cleanly')
  if (i.formatSpecific) {
    for (const [k, v] of Object.entries(i.formatSpecific.data)) row(k, renderValue(v))
  }
  let out = t.toString() + '\n'
  if (i.snapshots && i.snapshots.length > 0) {
    const s = new Table({ head: ['ID', 'TAG', 'VM SIZE', 'DATE', 'VM CLOCK', 'ICOUNT'], style: { head: [], border: [] } })
    for (const sn of i.snapshots) {
      s.push([sn.id, sn.name, humanSize(sn.vmStateSize), formatDate(sn.dateSec), formatClock(sn.vmClockNsec), String(sn.icount ?? '')])
    }
    out += 'Snapshot list:\n' + s.toString() + '\n'
  }
  return out
}

function renderValue(v: unknown): string {
  if (Array.isArray(v)) {
    return v
      .map((x) =>
        typeof x === 'object' && x !== null
          ? Object.entries(x as Record<string, unknown>)
              .map(([k, y]) => `${k}: ${renderValue(y)}`)
              .join(', ')
          : renderValue(x),
      )
      .join('\n')
  }
  if (typeof v === 'object' && v !== null) {
    // a nested object (qcow2's encrypt): one "key: value" line each, nested values indented
    return Object.entries(v as Record<string, unknown>)
      .map(([k, y]) => {
        const r = renderValue(y)
        return r.includes('\n') ? `${k}:\n${r.replace(/^/gm, '  ')}` : `${k}: ${r}`
      })
      .join('\n')
  }
  return esc(String(v))
}

function formatDate(sec: number): string {
  const d = new Date(sec * 1000)
  const p = (n: number) => String(n).padStart(2, '0')
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`
}

function formatClock(ns: number): string {
  const ms = Math.floor(ns / 1e6)
  const h = Math.floor(ms / 3600000)
  const m = Math.floor(ms / 60000) % 60
  const s = Math.floor(ms / 1000) % 60
  const p = (n: number, w = 2) => String(n).padStart(w, '0')
  return `${p(h)}:${p(m)}:${p(s)}.${p(ms % 1000, 3)}`
}

/**
 * qemu-img info's human text for one image, line for line: the same keys in
 * the same order, the snapshot table with its column widths, and the
 * format-specific data dumped as qemu dumps a QDict (keys in its hash order,
 * dashes shown as spaces, four spaces per level).
 */
export function infoHuman(i: ImageInfo): string {
  const lines: string[] = []
  lines.push(`image: ${esc(i.filename)}`, `file format: ${i.format}`, `virtual size: ${humanSize(i.virtualSize)} (${i.virtualSize} bytes)`)
  if (i.actualSize !== undefined) lines.push(`disk size: ${humanSize(i.actualSize)}`)
  if (i.encrypted) lines.push('encrypted: yes')
  if (i.clusterSize !== undefined) lines.push(`cluster_size: ${i.clusterSize}`)
  if (i.dirty) lines.push('cleanly shut down: no')
  if (i.backingFilename !== undefined) {
    let line = `backing file: ${esc(i.backingFilename)}`
    if (i.fullBackingFilename === undefined) line += ' (cannot determine actual path)'
    else if (i.fullBackingFilename !== i.backingFilename) line += ` (actual path: ${esc(i.fullBackingFilename)})`
    lines.push(line)
  }
  if (i.backingFormat !== undefined) lines.push(`backing file format: ${esc(i.backingFormat)}`)
  if (i.snapshots && i.snapshots.length > 0) lines.push(...snapshotList(i.snapshots))
  let out = lines.join('\n') + '\n'
  if (i.formatSpecific) out += 'Format specific information:\n' + dumpDict(1, i.formatSpecific.data)
  return out
}

/** "Snapshot list:", the header and one line per snapshot, as qemu-img info and qemu-img snapshot -l print them */
export function snapshotList(list: readonly SnapshotInfo[]): string[] {
  return ['Snapshot list:', snapshotHeader(), ...list.map(snapshotLine)]
}

const padEnd = (s: string, n: number): string => s.padEnd(n)
const padStart = (s: string, n: number): string => s.padStart(n)

/** the columns of qemu's bdrv_snapshot_dump */
function snapshotHeader(): string {
  return padEnd('ID', 10) + padEnd('TAG', 17) + padStart('VM SIZE', 8) + padStart('DATE', 20) + padStart('VM CLOCK', 13) + padStart('ICOUNT', 11)
}

function snapshotLine(sn: SnapshotInfo): string {
  const secs = Math.floor(sn.vmClockNsec / 1e9)
  const p2 = (n: number): string => String(n).padStart(2, '0')
  const clock = `${p2(Math.floor(secs / 3600))}:${p2(Math.floor(secs / 60) % 60)}:${p2(secs % 60)}.${String(Math.floor(sn.vmClockNsec / 1e6) % 1000).padStart(3, '0')}`
  return (
    padEnd(esc(sn.id), 9) +
    ' ' +
    padEnd(esc(sn.name), 16) +
    ' ' +
    padStart(humanSize(sn.vmStateSize), 8) +
    padStart(formatDate(sn.dateSec), 20) +
    padStart(clock, 13) +
    padStart(sn.icount === undefined ? '' : String(sn.icount), 11)
  )
}

/** tdb_hash, the hash of QEMU's QDict: a QDict is walked bucket by bucket (512 of them) */
function qdictBucket(key: string): number {
  const b = Buffer.from(key, 'utf8')
  let v = Math.imul(0x238f13af, b.length) >>> 0
  for (let i = 0; i < b.length; i++) v = (v + ((b[i]! << ((i * 5) % 24)) >>> 0)) >>> 0
  return ((Math.imul(1103515243, v) + 12345) >>> 0) % 512
}

function isComposite(v: unknown): boolean {
  return typeof v === 'object' && v !== null
}

function scalar(v: unknown): string {
  return typeof v === 'string' ? esc(v) : String(v)
}

function dumpDict(level: number, d: Record<string, unknown>): string {
  // equal buckets: the later key first (QEMU links a new entry at the head of its bucket)
  const keys = Object.keys(d)
    .filter((k) => d[k] !== undefined)
    .map((k, n) => ({ k, n, b: qdictBucket(k) }))
    .sort((x, y) => x.b - y.b || y.n - x.n)
  let out = ''
  for (const { k } of keys) {
    const v = d[k]
    const name = esc(k.replace(/-/g, ' '))
    out += isComposite(v) ? `${' '.repeat(level * 4)}${name}:\n${dumpValue(level + 1, v)}` : `${' '.repeat(level * 4)}${name}: ${scalar(v)}\n`
  }
  return out
}

function dumpValue(level: number, v: unknown): string {
  if (!Array.isArray(v)) return dumpDict(level, v as Record<string, unknown>)
  let out = ''
  v.forEach((x, n) => {
    out += isComposite(x) ? `${' '.repeat(level * 4)}[${n}]:\n${dumpValue(level + 1, x)}` : `${' '.repeat(level * 4)}[${n}]: ${scalar(x)}\n`
  })
  return out
}
