import type { CliIo, CommandModule } from '../command.js'
import type { ImageArgs, OutputMode } from '../common.js'
import { addImageOptions, addOutputOption, oneImageArg, parseImageOptions, parseOutput } from '../common.js'

const check: CommandModule = {
  name: 'check',
  description: 'check an image for consistency, optionally repair it (qemu-img check)',
  configure(cmd) {
    addOutputOption(addImageOptions(cmd))
      .option('-r, --repair <mode>', "repair: 'leaks' or 'all'")
      .option('-q, --quiet', 'print nothing on stdout')
      .option('--journal <path>', 'with -r: where to write the undo journal (default IMAGE.imgtool-undo[.N])')
      .option('--no-journal', 'with -r: repair without an undo journal')
      .option('--force-valid', 'with -r all: re-validate an invalidated dm-snapshot store when every record checks out')
      .argument('[image...]')
  },
  async run(args, opts, io) {
    const path = oneImageArg(args)
    const repair = opts['repair']
    if (repair !== undefined && repair !== 'leaks' && repair !== 'all') {
      io.stderr.write(`imgtool: Unknown option value for -r (expecting 'leaks' or 'all'): ${String(repair)}\n`)
      return 1
    }
    return runCheck(io, {
      path,
      image: parseImageOptions(opts),
      output: parseOutput(opts),
      quiet: Boolean(opts['quiet']),
      repair: repair as 'leaks' | 'all' | undefined,
      dryRun: false,
      journal: opts['journal'] === false ? false : (opts['journal'] as string | undefined),
      forceValid: Boolean(opts['forceValid']),
    })
  },
}
export default check

export interface RunCheckArgs {
  path: string
  image: ImageArgs
  output: OutputMode
  quiet: boolean
  repair: 'leaks' | 'all' | undefined
  dryRun: boolean
  /** journal path; undefined = default path; false = no journal */
  journal: string | false | undefined
  /** dm-snapshot: re-validate an invalidated store when every record checks out */
  forceValid?: boolean
}

/** check / check -r / repair: open with the check flag, one library call, render, qemu-img's exit code. */
export async function runCheck(io: CliIo, a: RunCheckArgs): Promise<number> {
  const { openImage } = await import('../../open.js')
  const { checkExitCode } = await import('../../check/types.js')
  const { checkJson, checkHuman, repairBanner, planHuman } = await import('../render/check.js')
  const { printJson } = await import('../common.js')
  const out = (s: string) => {
    if (!a.quiet) io.stdout.write(s)
  }
  const writes = a.repair !== undefined && !a.dryRun
  let image: import('../../image/disk-image.js').DiskImage
  try {
    image = await openImage(a.path, { format: a.image.format, readOnly: !writes, options: a.image.options, forCheck: true })
  } catch (e) {
    io.stderr.write(`imgtool: Could not open '${a.path}': ${oneLine(e)}\n`)
    return 1
  }
  let created: import('../journal-file.js').CreatedJournal | undefined
  try {
    const c = image as typeof image & Partial<import('../../check/types.js').Checkable>
    if (typeof c.check !== 'function' || (a.repair && typeof c.repair !== 'function')) {
      io.stderr.write(`imgtool: This image format does not support checks\n`)
      return 63
    }
    let report: import('../../check/types.js').CheckReport
    if (a.repair) {
      if (writes && a.journal !== false) {
        const { createJournal } = await import('../journal-file.js')
        created = await createJournal(a.path, a.journal)
      }
      const opts: import('../../check/types.js').CheckOptions & { repair: 'leaks' | 'all' } = { repair: a.repair, dryRun: a.dryRun }
      if (a.forceValid) opts.flags = { forceValid: true }
      if (created) {
        opts.journal = created.device
        opts.journalPath = created.path
        opts.journalIdentity = await imageIdentity(a.path)
      }
      const result = await c.repair!(opts)
      if (a.dryRun) {
        if (a.output === 'json') {
          if (!a.quiet) printJson(io.stdout, { ...checkJson(result.before, a.path), plan: result.actions })
        } else out(checkHuman(result.before) + '\n' + planHuman(result.actions))
        return checkExitCode(result.before)
      }
      const fixed = result.before.leaksFixed + result.before.corruptionsFixed
      if (fixed > 0 && a.output === 'human') out(repairBanner(result.before.leaksFixed, result.before.corruptionsFixed))
      report = { ...result.after, leaksFixed: result.before.leaksFixed, corruptionsFixed: result.before.corruptionsFixed }
      if (created && result.journalPath) {
        const where = created.fallbackReason ? ` (${created.fallbackReason})` : ''
        io.stderr.write(`imgtool: undo journal written to ${result.journalPath}${where} (restore with: imgtool repair --undo ${result.journalPath} ${a.path})\n`)
      }
    } else {
      report = await c.check({})
    }
    if (a.output === 'json') {
      if (!a.quiet) printJson(io.stdout, checkJson(report, a.path))
    } else out(checkHuman(report))
    const code = checkExitCode(report)
    if (report.checkErrors > 0) io.stderr.write('imgtool: Check failed\n')
    return code
  } catch (e) {
    if (created && created.device.size > 0) {
      // the repair stopped after it had changed the image: say where the bytes it changed are, in the one line
      const { isImgtoolError } = await import('../../errors.js')
      const why = isImgtoolError(e) ? oneLine(e) : `internal error: ${oneLine(e)}`
      io.stderr.write(`imgtool: ${why} (the repair stopped part way; to put ${a.path} back: imgtool repair --undo ${created.path} --force ${a.path})\n`)
      return 1
    }
    const f = e as { strerror?: string; diagnostics?: string[] }
    if (typeof f.strerror === 'string') {
      io.stderr.write(`imgtool: ${oneLine(e)}\nimgtool: Check failed: ${f.strerror}\n`)
      return 1
    }
    throw e
  } finally {
    await image.close()
    if (created) {
      await created.device.close()
      const { dropJournalIfEmpty } = await import('../journal-file.js')
      await dropJournalIfEmpty(created)
    }
  }
}

/** repair --undo JOURNAL IMAGE: put back the bytes a repair overwrote, after checking IMAGE is what that repair left. */
export async function runUndo(io: CliIo, journalPath: string, imagePath: string, output: OutputMode, force = false): Promise<number> {
  const { openFileDevice } = await import('../../io/file-device.js')
  const { printJson } = await import('../common.js')
  const journal = await openFileDevice(journalPath, { readOnly: true })
  try {
    const head = await journal.read(0, 16, 'journal')
    const magic = new TextDecoder().decode(head)
    if (!magic.startsWith('IMGTOOL-QC2UNDO') && !magic.startsWith('IMGTOOL-DMSUNDO')) {
      io.stderr.write(`imgtool: ${journalPath} is not an imgtool undo journal\n`)
      return 1
    }
    const current = await imageIdentity(imagePath)
    const options: import('../../check/undo.js').UndoOptions = { force, checkIdentity: (sealed) => identityMismatch(sealed, current) }
    const image = await openFileDevice(imagePath, { readOnly: false })
    try {
      let restored: number
      if (magic.startsWith('IMGTOOL-QC2UNDO')) {
        const { applyQcow2Undo } = await import('../../formats/qcow2/journal.js')
        restored = (await applyQcow2Undo(journal, image, options)).regions
      } else {
        const { applyUndoJournal } = await import('../../formats/dmsnap/journal.js')
        restored = await applyUndoJournal(journal, image, options)
      }
      if (output === 'json') printJson(io.stdout, { filename: imagePath, journal: journalPath, 'regions-restored': restored })
      else io.stdout.write(`Restored ${restored} regions of ${imagePath} from ${journalPath}.\n`)
      return 0
    } finally {
      await image.close()
    }
  } finally {
    await journal.close()
  }
}

/** what a journal's seal records of the image: the path as given, the absolute path, st_dev and st_ino */
async function imageIdentity(path: string): Promise<import('../../check/undo.js').JournalIdentity> {
  const { stat } = await import('node:fs/promises')
  const { resolve } = await import('node:path')
  const id: import('../../check/undo.js').JournalIdentity = { path, absolutePath: resolve(path) }
  try {
    const st = await stat(path, { bigint: true })
    id.dev = String(st.dev)
    id.ino = String(st.ino)
  } catch {
    /* the open reports it */
  }
  return id
}

function identityMismatch(sealed: import('../../check/undo.js').JournalIdentity, current: import('../../check/undo.js').JournalIdentity): string | undefined {
  if (sealed.dev === undefined || sealed.ino === undefined) return undefined // written by a library caller that gave no identity
  if (sealed.dev === current.dev && sealed.ino === current.ino) return undefined
  return `the journal belongs to ${sealed.absolutePath ?? sealed.path} (device ${sealed.dev}, inode ${sealed.ino}), not to ${current.path} (device ${current.dev ?? '?'}, inode ${current.ino ?? '?'})`
}

function oneLine(e: unknown): string {
  const m = e instanceof Error ? e.message : String(e)
  return m.replace(/\s*\n\s*/g, '; ')
}
