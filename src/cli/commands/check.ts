import type { CliIo, CommandModule } from '../command.js'
import type { ImageArgs, OutputMode } from '../common.js'
import { addImageOptions, addImageOptsOption, addOutputOption, imageArg, parseOutput } from '../common.js'

const check: CommandModule = {
  name: 'check',
  description: 'check an image for consistency, optionally repair it (qemu-img check)',
  configure(cmd) {
    addOutputOption(addImageOptsOption(addImageOptions(cmd)))
      .option('-r, --repair <mode>', "repair: 'leaks' or 'all'")
      .option('-q, --quiet', 'print nothing on stdout')
      .option('--journal <path>', 'with -r: where to write the undo journal (default IMAGE.imgtool-undo[.N])')
      .option('--no-journal', 'with -r: repair without an undo journal')
      .option('--force-valid', 'with -r all: re-validate an invalidated dm-snapshot store when every record checks out')
      .option('-U, --force-share', 'open without image locks (without -r; the image may be in use)')
      .option('-p, --progress', "show progress (a terminal line; otherwise qemu-img's '    (NN.NN/100%)' lines, on stderr)")
      .argument('[image...]')
  },
  async run(args, opts, io) {
    const { path, ...image } = imageArg(args, opts)
    const repair = opts['repair']
    if (repair !== undefined && repair !== 'leaks' && repair !== 'all') {
      io.stderr.write(`imgtool: Unknown option value for -r (expecting 'leaks' or 'all'): ${String(repair)}\n`)
      return 1
    }
    return runCheck(io, {
      path,
      image,
      output: parseOutput(opts),
      quiet: Boolean(opts['quiet']),
      repair: repair as 'leaks' | 'all' | undefined,
      dryRun: false,
      journal: opts['journal'] === false ? false : (opts['journal'] as string | undefined),
      forceValid: Boolean(opts['forceValid']),
      forceShare: opts['forceShare'] === true,
      progress: Boolean(opts['progress']),
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
  /** -p: show progress (stdout carries the report: plain lines go to stderr) */
  progress?: boolean
}

/** check / check -r / repair: one library call, render, qemu-img's exit code. */
export async function runCheck(io: CliIo, a: RunCheckArgs): Promise<number> {
  const api = await import('../../index.js')
  const { checkJson, checkHuman, checkHumanDetails, repairBanner, planHuman } = await import('../render/check.js')
  const { printJson } = await import('../common.js')
  const out = (s: string) => {
    if (!a.quiet) io.stdout.write(s)
  }
  const origin = a.image.options['origin']
  const { startProgress } = await import('../progress.js')
  const progress = await startProgress(io, a.repair ? 'repairing' : 'checking', { requested: a.progress === true, quiet: a.quiet, dataOnStdout: true })
  let ok = false
  try {
    let report: import('../../index.js').CheckReport
    if (a.repair) {
      const result = await api.repair(a.path, {
        mode: a.repair,
        dryRun: a.dryRun,
        ...(a.journal !== undefined ? { journal: a.journal } : {}),
        ...(a.image.format ? { format: a.image.format } : {}),
        ...(origin !== undefined ? { origin } : {}),
        ...(a.forceValid ? { forceValid: true } : {}),
        ...(a.forceShare ? { forceShare: true } : {}),
        onProgress: progress.update,
      })
      ok = true
      progress.stop(ok)
      if (a.dryRun) {
        if (a.output === 'json') {
          if (!a.quiet) printJson(io.stdout, { ...checkJson(result.before, a.path), plan: result.actions })
        } else {
          io.stderr.write(checkHumanDetails(result.before))
          out(checkHuman(result.before) + '\n' + planHuman(result.actions))
        }
        return api.checkExitCode(result.before)
      }
      const fixed = result.before.leaksFixed + result.before.corruptionsFixed
      // what was found before the repair, on stderr as qemu-img prints it before repairing
      if (a.output === 'human') io.stderr.write(checkHumanDetails(result.before))
      // dropped persistent bitmaps are named on stderr among the report lines, whatever the output (the result's actions carry them)
      for (const act of result.actions ?? []) if (act.kind === 'drop-bitmap' || act.kind === 'undo-journal') io.stderr.write(`Repair: ${act.message}\n`)
      if (fixed > 0 && a.output === 'human') out(repairBanner(result.before.leaksFixed, result.before.corruptionsFixed))
      report = result.report
      if (result.journalPath) {
        const where = result.journalFallbackReason ? ` (${result.journalFallbackReason})` : ''
        io.stderr.write(
          `imgtool: undo journal written to ${result.journalPath}${where} (restore with: imgtool repair --undo ${result.journalPath} ${a.path})\n`,
        )
      }
    } else {
      report = await api.check(a.path, {
        ...(a.image.format ? { format: a.image.format } : {}),
        ...(origin !== undefined ? { origin } : {}),
        ...(a.forceShare ? { forceShare: true } : {}),
        onProgress: progress.update,
      })
      ok = true
      progress.stop(ok)
    }
    if (a.output === 'json') {
      if (!a.quiet) printJson(io.stdout, checkJson(report, a.path))
    } else {
      io.stderr.write(checkHumanDetails(report))
      out(checkHuman(report))
    }
    const code = api.checkExitCode(report)
    if (report.checkErrors > 0) io.stderr.write('imgtool: Check failed\n')
    return code
  } catch (e) {
    if (e instanceof api.NoCheckError) {
      io.stderr.write(`imgtool: This image format does not support checks\n`)
      return 63
    }
    if (e instanceof api.RepairIncompleteError) {
      io.stderr.write(`imgtool: ${oneLine(e)}\n`)
      return 1
    }
    const f = e as { strerror?: string; diagnostics?: string[] }
    if (typeof f.strerror === 'string') {
      io.stderr.write(`imgtool: ${oneLine(e)}; Check failed: ${f.strerror}\n`)
      return 1
    }
    if ((e as { openFailed?: boolean }).openFailed) {
      io.stderr.write(`imgtool: Could not open '${a.path}': ${oneLine(e)}\n`)
      return 1
    }
    throw e
  } finally {
    progress.stop(ok)
  }
}

/** repair --undo JOURNAL IMAGE: put back the bytes a repair overwrote, after checking IMAGE is what that repair left. */
export async function runUndo(io: CliIo, journalPath: string, imagePath: string, output: OutputMode, force = false): Promise<number> {
  const { undoRepair } = await import('../../index.js')
  const { printJson } = await import('../common.js')
  const r = await undoRepair(journalPath, imagePath, { force })
  if (output === 'json') printJson(io.stdout, { filename: imagePath, journal: journalPath, 'regions-restored': r.regionsRestored })
  else io.stdout.write(`Restored ${r.regionsRestored} regions of ${imagePath} from ${journalPath}.\n`)
  return 0
}

function oneLine(e: unknown): string {
  const m = e instanceof Error ? e.message : String(e)
  return m.replace(/\s*\n\s*/g, '; ')
}
