/**
 * Where a repair's undo journal goes, and how it is created.
 *
 * A journal is only ever a new file: created with O_CREAT|O_EXCL|O_NOFOLLOW and
 * mode 0600, so an existing file (or a symlink, dangling or not) at the path is
 * never opened, truncated or written through. Only a file this process created
 * is ever removed again (when the repair recorded nothing in it).
 *
 * Default place: next to the image, IMAGE.imgtool-undo[.N]. When the image's
 * folder is not writable (read-only folder or file system), the per-user state
 * folder: $XDG_STATE_HOME/imgtool/journals (XDG_STATE_HOME when set to an
 * absolute path, else ~/.local/state), created 0700, the file named after the
 * image: NAME.imgtool-undo[.N].
 */
import { lstat, mkdir, chmod, unlink } from 'node:fs/promises'
import { homedir } from 'node:os'
import { basename, dirname, isAbsolute, join } from 'node:path'
import { ImageIoError, NotFoundError, UsageError } from '../errors.js'
import type { BlockDevice } from '../io/block-device.js'

export interface CreatedJournal {
  path: string
  device: BlockDevice
  /** identity of the file created, so only that file is ever unlinked */
  dev: bigint
  ino: bigint
  /** set when the journal is not next to the image: why */
  fallbackReason?: string
}

/** the most IMAGE.imgtool-undo.N names tried in one folder */
const MAX_SUFFIX = 1000
/** errors meaning "this folder does not take new files" */
const NOT_WRITABLE = new Set(['EACCES', 'EPERM', 'EROFS'])

/** The per-user folder for journals when the image's folder is not writable. */
export function stateJournalDir(env: NodeJS.ProcessEnv = process.env): string {
  const xdg = env['XDG_STATE_HOME']
  const base = xdg && isAbsolute(xdg) ? xdg : join(env['HOME'] && isAbsolute(env['HOME']) ? env['HOME'] : homedir(), '.local', 'state')
  return join(base, 'imgtool', 'journals')
}

/**
 * Create the journal for a repair of `imagePath`: at `explicit` when given
 * (refused when anything exists there), else at the default place.
 */
export async function createJournal(imagePath: string, explicit: string | undefined): Promise<CreatedJournal> {
  if (explicit !== undefined) {
    try {
      return await createExclusive(explicit)
    } catch (e) {
      if (errnoOf(e) === 'EEXIST') {
        throw new UsageError(`journal ${explicit} already exists (a journal is always a new file; choose another path or remove it)`, { file: explicit })
      }
      throw journalError(e, explicit)
    }
  }
  const next = join(dirname(imagePath), basename(imagePath))
  let why: string
  try {
    return await createFree(next)
  } catch (e) {
    const code = errnoOf(e)
    if (!NOT_WRITABLE.has(code)) throw journalError(e, `${next}.imgtool-undo`)
    why = `${dirname(imagePath)} is not writable (${code})`
  }
  const dir = stateJournalDir()
  await ensurePrivateDir(dir)
  try {
    const j = await createFree(join(dir, basename(imagePath)))
    j.fallbackReason = why
    return j
  } catch (e) {
    throw journalError(e, join(dir, basename(imagePath) + '.imgtool-undo'))
  }
}

/** Remove the journal if the repair wrote nothing to it, and only if it is still the file we created. */
export async function dropJournalIfEmpty(j: CreatedJournal): Promise<boolean> {
  try {
    const st = await lstat(j.path, { bigint: true })
    if (st.isFile() && st.dev === j.dev && st.ino === j.ino && st.size === 0n) {
      await unlink(j.path)
      return true
    }
  } catch {
    /* gone or replaced: not ours to remove */
  }
  return false
}

async function createFree(stem: string): Promise<CreatedJournal> {
  for (let n = 0; n < MAX_SUFFIX; n++) {
    const p = `${stem}.imgtool-undo${n === 0 ? '' : '.' + n}`
    try {
      return await createExclusive(p)
    } catch (e) {
      if (errnoOf(e) !== 'EEXIST') throw e
    }
  }
  throw new UsageError(`${stem}.imgtool-undo … .${MAX_SUFFIX - 1} all exist; give --journal PATH`, { file: stem })
}

async function createExclusive(path: string): Promise<CreatedJournal> {
  const { openFileDevice } = await import('../io/file-device.js')
  const device = await openFileDevice(path, { readOnly: false, create: true, exclusive: true })
  try {
    const st = await lstat(path, { bigint: true })
    return { path, device, dev: st.dev, ino: st.ino }
  } catch (e) {
    await device.close()
    throw e
  }
}

/** mkdir -p with 0700; the last folder must be a real folder of ours, not a symlink, and is made owner-only. */
async function ensurePrivateDir(dir: string): Promise<void> {
  try {
    await mkdir(dir, { recursive: true, mode: 0o700 })
    const st = await lstat(dir)
    if (!st.isDirectory()) throw new UsageError(`journal folder ${dir} is not a folder (a symlink or file is there); give --journal PATH`, { file: dir })
    const uid = process.getuid?.()
    if (uid !== undefined && st.uid !== uid)
      throw new UsageError(`journal folder ${dir} belongs to uid ${st.uid}, not to you; give --journal PATH`, { file: dir })
    if ((st.mode & 0o077) !== 0) await chmod(dir, 0o700)
  } catch (e) {
    if (e instanceof UsageError) throw e
    throw journalError(e, dir)
  }
}

function errnoOf(e: unknown): string {
  if (e instanceof ImageIoError) return e.errno
  if (e instanceof NotFoundError) return 'ENOENT'
  const c = (e as { code?: unknown })?.code
  return typeof c === 'string' ? c : ''
}

function journalError(e: unknown, path: string): Error {
  const code = errnoOf(e) || 'EIO'
  return new ImageIoError(`cannot create the undo journal ${path}: ${code} (give --journal PATH, or --no-journal to repair without one)`, code, { file: path })
}
