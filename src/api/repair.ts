/**
 * repair and undoRepair as library calls. A repair writes an undo journal
 * first (unless told not to): a new file, next to the image or in the
 * per-user state folder when the image's folder takes no new files
 * (journal-file.ts), sealed to the image when the repair finishes, so that
 * undoRepair puts the bytes back only onto the image that repair left.
 */
import { stat } from 'node:fs/promises'
import { basename, resolve } from 'node:path'
import { ImgtoolError, NoCheckError, checkAborted, isImgtoolError, type ErrorDetails } from '../errors.js'
import type { CheckOptions, CheckReport, RepairAction, RepairMode } from '../check/types.js'
import type { JournalIdentity, UndoOptions } from '../check/undo.js'
import { openFileDevice } from '../io/file-device.js'
import { openImage as openByPath } from '../open.js'
import { createJournal, dropJournalIfEmpty, type CreatedJournal } from './journal-file.js'
import { formatOption, type OpenOptions } from './image.js'
import { markOpenFailure } from './check.js'

export interface RepairOptions {
  /** 'leaks' (check -r leaks) or 'all' (check -r all); default 'all' */
  mode?: RepairMode
  /** plan only: the image is opened read-only and nothing is written */
  dryRun?: boolean
  /** the undo journal: a new file's path, undefined for the default place, false for none */
  journal?: string | false
  format?: OpenOptions['format']
  /** dm-snapshot: the origin */
  origin?: string
  /** dm-snapshot: re-validate an invalidated store when every record checks out */
  forceValid?: boolean
  /** qemu-img -U: allowed with dryRun only (a writable open refuses it, as qemu-img does) */
  forceShare?: boolean
  onProgress?: (done: number, total: number) => void
  signal?: AbortSignal
}

export interface RepairOutcome {
  /** the first check, with what was fixed counted in leaksFixed/corruptionsFixed */
  before: CheckReport
  /** the check after repairing (the report qemu-img check -r prints; its exit code comes from this) */
  after: CheckReport
  /** `after` with the fixed counts of `before`: what `imgtool check -r` reports */
  report: CheckReport
  /** the steps applied (or, with dryRun, planned) */
  actions: RepairAction[]
  dryRun: boolean
  /** where the undo journal went (absent: none written, or nothing was repaired) */
  journalPath?: string
  /** set when the journal is not next to the image: why */
  journalFallbackReason?: string
}

/** The repair stopped after it had changed the image; `details.journal` holds what it overwrote. */
export class RepairIncompleteError extends ImgtoolError {
  constructor(message: string, details: ErrorDetails) {
    super('IO', message, details)
  }
}

/** A check that could not complete (qemu-img's "Check failed: ..."): `strerror` says why. */
export interface CheckFailure {
  strerror?: string
}

/** what a journal's seal records of the image: the path as given, the absolute path, st_dev and st_ino */
async function imageIdentity(path: string): Promise<JournalIdentity> {
  const id: JournalIdentity = { path, absolutePath: resolve(path) }
  try {
    const st = await stat(path, { bigint: true })
    id.dev = String(st.dev)
    id.ino = String(st.ino)
  } catch {
    /* the open reports it */
  }
  return id
}

function identityMismatch(sealed: JournalIdentity, current: JournalIdentity): string | undefined {
  if (sealed.dev === undefined || sealed.ino === undefined) return undefined // written by a caller that gave no identity
  if (sealed.dev === current.dev && sealed.ino === current.ino) return undefined
  return `the journal belongs to ${sealed.absolutePath ?? sealed.path} (device ${sealed.dev}, inode ${sealed.ino}), not to ${current.path} (device ${current.dev ?? '?'}, inode ${current.ino ?? '?'})`
}

/**
 * Repair an image file (qemu-img check -r), journaling what it overwrites.
 * Throws NoCheckError for formats without a check.
 */
export async function repair(path: string, o: RepairOptions = {}): Promise<RepairOutcome> {
  checkAborted(o.signal, 'repair')
  const mode = o.mode ?? 'all'
  const dryRun = o.dryRun ?? false
  const image = await markOpenFailure(
    openByPath(path, {
      format: formatOption(o.format),
      readOnly: dryRun,
      options: o.origin !== undefined ? { origin: o.origin } : {},
      forCheck: true,
      forceShare: o.forceShare === true,
    }),
  )
  let created: CreatedJournal | undefined
  /** journals of the other files the repair writes (a twoGbMaxExtentSparse image's extent files), one each */
  const extents: CreatedJournal[] = []
  try {
    if (typeof image.repair !== 'function') throw new NoCheckError(`${image.format}: ${path}: this image format does not support checks`, { file: path })
    if (!dryRun && o.journal !== false) created = await createJournal(path, o.journal)
    const opts: CheckOptions & { repair: RepairMode } = { repair: mode, dryRun }
    if (o.forceValid) opts.flags = { forceValid: true }
    if (o.onProgress) opts.onProgress = o.onProgress
    if (created) {
      opts.journal = created.device
      opts.journalPath = created.path
      opts.journalIdentity = await imageIdentity(path)
      const explicit = o.journal
      opts.extentJournal = async (file) => {
        const j = await createJournal(file, explicit === undefined ? undefined : `${explicit}.${basename(file)}`)
        extents.push(j)
        return { device: j.device, path: j.path, identity: await imageIdentity(file) }
      }
    }
    let result
    try {
      result = await image.repair(opts)
    } catch (e) {
      const named = created !== undefined && isImgtoolError(e) && e.details['journal'] === created.path
      if (created && (named || created.device.size > 0)) {
        // the repair stopped after it had changed the image: say where the bytes it changed are, in the one line
        // (the format's own pointer to the journal gives way to the CLI's undo command)
        const why = isImgtoolError(e) ? e.message.replace(/; the undo journal .*$/, '') : `internal error: ${e instanceof Error ? e.message : String(e)}`
        throw new RepairIncompleteError(`${why} (the repair stopped part way; to put ${path} back: imgtool repair --undo ${created.path} --force ${path})`, {
          file: path,
          journal: created.path,
        })
      }
      throw e
    }
    const report = dryRun ? result.before : { ...result.after, leaksFixed: result.before.leaksFixed, corruptionsFixed: result.before.corruptionsFixed }
    const out: RepairOutcome = { before: result.before, after: result.after, report, actions: result.actions, dryRun }
    if (created && result.journalPath) {
      out.journalPath = result.journalPath
      if (created.fallbackReason) out.journalFallbackReason = created.fallbackReason
    }
    return out
  } finally {
    await image.close()
    if (created) {
      await created.device.close()
      await dropJournalIfEmpty(created)
    }
    for (const j of extents) {
      await j.device.close()
      await dropJournalIfEmpty(j)
    }
  }
}

export interface UndoRepairOptions {
  /**
   * accept an unsealed journal (the repair did not finish), an old-format one,
   * or a copy of the repaired image; the sealed contents are still checked
   */
  force?: boolean
}

export interface UndoRepairResult {
  regionsRestored: number
}

/** Put back the bytes a repair overwrote, after checking the image is what that repair left. */
export async function undoRepair(journalPath: string, imagePath: string, o: UndoRepairOptions = {}): Promise<UndoRepairResult> {
  const journal = await openFileDevice(journalPath, { readOnly: true })
  try {
    const magic = new TextDecoder().decode(await journal.read(0, 16, 'journal'))
    if (
      !magic.startsWith('IMGTOOL-QC2UNDO') &&
      !magic.startsWith('IMGTOOL-DMSUNDO') &&
      !magic.startsWith('IMGTOOL-VHDUNDO') &&
      !magic.startsWith('IMGTOOL-VMKUNDO')
    ) {
      throw new ImgtoolError('WRONG_FORMAT', `${journalPath} is not an imgtool undo journal`, { file: journalPath, structure: 'journal', offset: 0 })
    }
    const current = await imageIdentity(imagePath)
    const options: UndoOptions = { force: o.force ?? false, checkIdentity: (sealed) => identityMismatch(sealed, current) }
    const image = await openFileDevice(imagePath, { readOnly: false })
    try {
      if (magic.startsWith('IMGTOOL-QC2UNDO')) {
        const { applyQcow2Undo } = await import('../formats/qcow2/index.js')
        return { regionsRestored: (await applyQcow2Undo(journal, image, options)).regions }
      }
      if (magic.startsWith('IMGTOOL-VHDUNDO')) {
        const { applyVhdUndo } = await import('../formats/vhd/index.js')
        return { regionsRestored: await applyVhdUndo(journal, image, options) }
      }
      if (magic.startsWith('IMGTOOL-VMKUNDO')) {
        const { applyVmdkUndo } = await import('../formats/vmdk/index.js')
        return { regionsRestored: await applyVmdkUndo(journal, image, options) }
      }
      const { applyUndoJournal } = await import('../formats/dmsnap/index.js')
      return { regionsRestored: await applyUndoJournal(journal, image, options) }
    } finally {
      await image.close()
    }
  } finally {
    await journal.close()
  }
}
