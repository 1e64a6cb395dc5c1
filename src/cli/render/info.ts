/** info rendering: qemu-img's JSON field names, and a readable table for people. */
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

function snapshotJson(s: SnapshotInfo): Record<string, unknown> {
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

export function infoHuman(i: ImageInfo): string {
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
