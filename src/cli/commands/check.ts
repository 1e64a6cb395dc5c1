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
      .option('-U, --force-share', 'open without image locks (without -r; the image may be in use)')
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
      forceShare: opts['forceShare'] === true,
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
  /** -U: open without image locks (read-only opens only, as qemu-img) */
  forceShare?: boolean
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
    image = await openImage(a.path, { format: a.image.format, readOnly: !writes, options: a.image.options, forCheck: true, forceShare: a.forceShare === true })
  } catch (e) {
    io.stderr.write(`imgtool: Could not open '${a.path}': ${oneLine(e)}\n`)
    return 1
  }
  let journal: import('../../io/block-device.js').BlockDevice | undefined
  let journalPath: string | undefined
  try {
    const c = image as typeof image & Partial<import('../../check/types.js').Checkable>
    if (typeof c.check !== 'function' || (a.repair && typeof c.repair !== 'function')) {
      io.stderr.write(`imgtool: This image format does not support checks\n`)
      return 63
    }
    let report: import('../../check/types.js').CheckReport
    if (a.repair) {
      if (writes && a.journal !== false) {
        const { openFileDevice } = await import('../../io/file-device.js')
        journalPath = a.journal ?? (await freeJournalPath(a.path))
        journal = await openFileDevice(journalPath, { readOnly: false, create: true })
      }
      const opts: import('../../check/types.js').CheckOptions & { repair: 'leaks' | 'all' } = { repair: a.repair, dryRun: a.dryRun }
      if (a.forceValid) opts.flags = { forceValid: true }
      if (journal && journalPath) {
        opts.journal = journal
        opts.journalPath = journalPath
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
      if (journal && result.journalPath) io.stderr.write(`imgtool: undo journal written to ${result.journalPath} (restore with: imgtool repair --undo ${result.journalPath} ${a.path})\n`)
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
    const f = e as { strerror?: string; diagnostics?: string[] }
    if (typeof f.strerror === 'string') {
      io.stderr.write(`imgtool: ${oneLine(e)}\nimgtool: Check failed: ${f.strerror}\n`)
      return 1
    }
    throw e
  } finally {
    await image.close()
    if (journal) {
      await journal.close()
      if (journalPath) await dropEmptyJournal(journalPath)
    }
  }
}

/** repair --undo JOURNAL IMAGE: put back the bytes a repair overwrote. */
export async function runUndo(io: CliIo, journalPath: string, imagePath: string, output: OutputMode): Promise<number> {
  const { openFileDevice } = await import('../../io/file-device.js')
  const { printJson } = await import('../common.js')
  const journal = await openFileDevice(journalPath, { readOnly: true })
  try {
    const image = await openFileDevice(imagePath, { readOnly: false })
    try {
      const head = await journal.read(0, 16, 'journal')
      const magic = new TextDecoder().decode(head)
      let restored: number
      if (magic.startsWith('IMGTOOL-QC2UNDO')) {
        const { applyQcow2Undo } = await import('../../formats/qcow2/journal.js')
        restored = (await applyQcow2Undo(journal, image)).regions
      } else if (magic.startsWith('IMGTOOL-DMSUNDO')) {
        const { applyUndoJournal } = await import('../../formats/dmsnap/journal.js')
        restored = await applyUndoJournal(journal, image)
      } else {
        io.stderr.write(`imgtool: ${journalPath} is not an imgtool undo journal\n`)
        return 1
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

async function freeJournalPath(image: string): Promise<string> {
  const { access } = await import('node:fs/promises')
  for (let n = 0; ; n++) {
    const p = `${image}.imgtool-undo${n === 0 ? '' : '.' + n}`
    try {
      await access(p)
    } catch {
      return p
    }
  }
}

/** a journal that recorded nothing (nothing was repaired) is removed */
async function dropEmptyJournal(path: string): Promise<void> {
  const { stat, unlink } = await import('node:fs/promises')
  try {
    if ((await stat(path)).size === 0) await unlink(path)
  } catch {
    /* already gone */
  }
}

function oneLine(e: unknown): string {
  const m = e instanceof Error ? e.message : String(e)
  return m.replace(/\s*\n\s*/g, '; ')
}
