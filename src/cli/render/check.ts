/**
 * check rendering. Human: qemu-img check's summary lines verbatim on stdout, and its
 * per-cluster lines then our findings on stderr (grep-based scripts keep working). JSON: qemu-img's members, in the
 * order qemu-img 7.2 prints them, zero-valued optional members omitted, plus
 * `findings` (and `notices` when there are some).
 */
import type { CheckReport, Finding, RepairAction } from '../../index.js'

export function checkJson(r: CheckReport, filename: string): Record<string, unknown> {
  const o: Record<string, unknown> = {}
  const opt = (k: string, v: number | bigint) => {
    if (v !== 0 && v !== 0n) o[k] = v
  }
  opt('image-end-offset', r.imageEndOffset)
  opt('compressed-clusters', r.compressedClusters)
  opt('total-clusters', r.totalClusters)
  opt('corruptions', r.corruptions)
  opt('corruptions-fixed', r.corruptionsFixed)
  o['check-errors'] = r.checkErrors
  opt('leaks', r.leaks)
  opt('leaks-fixed', r.leaksFixed)
  opt('allocated-clusters', r.allocatedClusters)
  o['filename'] = filename
  o['format'] = r.format
  opt('fragmented-clusters', r.fragmentedClusters)
  o['findings'] = r.findings.map(findingJson)
  if (r.notices && r.notices.length > 0) o['notices'] = r.notices
  return o
}

function findingJson(f: Finding): Record<string, unknown> {
  const o: Record<string, unknown> = { kind: f.kind, severity: f.severity, structure: f.structure }
  if (f.hostOffset !== undefined) o['host-offset'] = f.hostOffset
  if (f.cluster !== undefined) o['cluster'] = f.cluster
  if (f.l1Index !== undefined) o['l1-index'] = f.l1Index
  if (f.l2Index !== undefined) o['l2-index'] = f.l2Index
  if (f.guestRanges) o['guest-ranges'] = f.guestRanges
  for (const k of ['chunks', 'oldChunk', 'newChunk', 'area', 'slot'] as const) {
    if (f[k] !== undefined) o[k.replace(/[A-Z]/g, (c) => '-' + c.toLowerCase())] = f[k]
  }
  o['message'] = f.message
  return o
}

/** printf("%0.2f") of a double, as C rounds it */
function pct(n: number, d: number): string {
  const v = (n * 100) / d
  const scaled = v * 100
  // an exact tie rounds to even in C's printf; toFixed rounds it up
  if (Number.isInteger(scaled * 2) && !Number.isInteger(scaled)) {
    const f = Math.floor(scaled)
    return ((f % 2 === 0 ? f : f + 1) / 100).toFixed(2)
  }
  return v.toFixed(2)
}

/**
 * What human check prints on stderr, as qemu-img prints its per-cluster lines there: qemu-img's own lines
 * for the same problems (qcow2: `ERROR cluster 5 refcount=0 reference=1`, `Leaked cluster ...`), then our
 * findings (structure, offsets, guest ranges) and notes. stdout keeps qemu-img's summary alone, so
 * `check | head -1` and `check 2>&1 >/dev/null | grep -c ERROR` answer as with qemu-img.
 */
export function checkHumanDetails(r: CheckReport): string {
  let s = ''
  for (const d of r.diagnostics ?? []) s += `${d}\n`
  for (const f of r.findings) s += `${f.severity}: ${f.message}\n`
  for (const n of r.notices ?? []) s += `note: ${n.message}\n`
  return s
}

/** qemu-img check's summary (dump_human_image_check), as qemu-img prints it on stdout */
export function checkHuman(r: CheckReport): string {
  let s = ''
  if (r.corruptions === 0 && r.leaks === 0 && r.checkErrors === 0) {
    s += 'No errors were found on the image.\n'
  } else {
    if (r.corruptions) s += `\n${r.corruptions} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n`
    if (r.leaks) s += `\n${r.leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n`
    if (r.checkErrors) s += `\n${r.checkErrors} internal errors have occurred during the check.\n`
  }
  if (r.totalClusters !== 0 && r.allocatedClusters !== 0) {
    s +=
      `${r.allocatedClusters}/${r.totalClusters} = ${pct(r.allocatedClusters, r.totalClusters)}% allocated, ` +
      `${pct(r.fragmentedClusters, r.allocatedClusters)}% fragmented, ${pct(r.compressedClusters, r.allocatedClusters)}% compressed clusters\n`
  }
  if (r.imageEndOffset !== 0 && r.imageEndOffset !== 0n) s += `Image end offset: ${r.imageEndOffset}\n`
  return s
}

/** the banner qemu-img prints when the repair run fixed something */
export function repairBanner(leaksFixed: number, corruptionsFixed: number): string {
  return `The following inconsistencies were found and repaired:\n\n    ${leaksFixed} leaked clusters\n    ${corruptionsFixed} corruptions\n\nDouble checking the fixed image now...\n`
}

export function planHuman(actions: RepairAction[]): string {
  if (actions.length === 0) return 'Nothing to repair.\n'
  return `Repair plan (${actions.length} steps, nothing written):\n` + actions.map((a) => `  ${a.kind}: ${a.message}\n`).join('')
}
