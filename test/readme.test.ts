/**
 * Every shell example in the README's "Use" section runs as written, in order, from a fresh directory that
 * holds the repository's `images/`: each command exits 0, or the code its `# exit N` comment names.
 * (`npx imgtool` runs the build in dist/, as `npx` does in a clone.)
 */
import { execFileSync } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync, symlinkSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { expect, it } from 'vitest'

const root = resolve(__dirname, '..')

/** The command lines of the README's "Use" section, each with the exit code it promises. */
export function useExamples(readme: string): { line: string; exit: number }[] {
  const start = readme.indexOf('\n## Use\n')
  const end = readme.indexOf('\n## ', start + 1)
  const section = readme.slice(start, end < 0 ? undefined : end)
  const out: { line: string; exit: number }[] = []
  for (const block of section.matchAll(/```sh\n([\s\S]*?)```/g)) {
    for (const raw of block[1]!.split('\n')) {
      const line = raw.trim()
      if (line === '' || line.startsWith('#')) continue
      const exit = /#\s*exit (\d+)/.exec(line)
      out.push({ line, exit: exit ? Number(exit[1]) : 0 })
    }
  }
  return out
}

it('the README names its examples (the extraction finds them)', () => {
  const examples = useExamples(readFileSync(join(root, 'README.md'), 'utf8'))
  expect(examples.length).toBeGreaterThan(20)
  expect(examples.some((e) => e.exit !== 0)).toBe(true)
})

it("every example of the README's Use section runs as written, with the exit code it promises", () => {
  const examples = useExamples(readFileSync(join(root, 'README.md'), 'utf8'))
  const dir = mkdtempSync(join(tmpdir(), 'imgtool-readme-'))
  try {
    symlinkSync(join(root, 'images'), join(dir, 'images'))
    const bin = `${JSON.stringify(process.execPath)} ${JSON.stringify(join(root, 'bin', 'imgtool'))}`
    // one shell for the whole section (a variable set in one line is used in the next); each line checked
    const script = ['set -o pipefail']
    examples.forEach((e, i) => {
      const cmd = e.line.replace(/\s+#.*$/, '').replace(/\bnpx imgtool\b/g, bin)
      if (/^[A-Za-z_][A-Za-z0-9_]*=\S*$/.test(e.line)) script.push(cmd)
      else
        script.push(
          `${cmd} >/dev/null 2>"$TMPDIR_ERR"; rc=$?; [ $rc -eq ${e.exit} ] || { echo "example ${i + 1} exited $rc, README says ${e.exit}: ${e.line.replace(/["`$\\]/g, '\\$&')}"; cat "$TMPDIR_ERR"; exit 1; }`,
        )
    })
    let failure = ''
    try {
      execFileSync('bash', ['-c', script.join('\n')], { cwd: dir, encoding: 'utf8', env: { ...process.env, TMPDIR_ERR: join(dir, '.stderr') } })
    } catch (e) {
      failure = String((e as { stdout?: string }).stdout ?? e)
    }
    expect(failure).toBe('')
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
}, 600_000)
