/**
 * Shell completion and the man page are generated from the command definitions: every command and option the
 * CLI parses is in them. The bash script is run by a real bash (COMP_WORDS set as readline would set it), the
 * man page rendered by groff with every warning on.
 */
import { spawnSync } from 'node:child_process'
import { describe, expect, it } from 'vitest'
import { main } from '../../src/cli/main.js'
import { describeCommands } from '../../src/cli/describe.js'
import { collector, findExecutable } from '../support/qemu.js'

async function cli(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = collector()
  const err = collector()
  const code = await main(['node', 'imgtool', ...args], { stdout: out, stderr: err, isTTY: false })
  return { code, stdout: out.text(), stderr: err.text() }
}

/** what bash offers for the words typed so far (the last one is the word being completed) */
function bashComplete(script: string, words: string[]): string[] {
  const program = [
    script,
    `COMP_WORDS=(${words.map((w) => `'${w}'`).join(' ')})`,
    `COMP_CWORD=${words.length - 1}`,
    '_imgtool',
    'printf "%s\\n" "${COMPREPLY[@]}"',
  ].join('\n')
  const r = spawnSync('bash', ['--norc', '--noprofile', '-c', program], { encoding: 'utf8', cwd: '/' })
  expect(r.status, r.stderr).toBe(0)
  return r.stdout.split('\n').filter((l) => l !== '')
}

describe('imgtool completion', () => {
  it('bash: commands, each command options, format names and output modes, as bash offers them', async () => {
    const r = await cli('completion', 'bash')
    expect(r.code).toBe(0)
    const script = r.stdout
    expect(spawnSync('bash', ['-n', '-c', script]).status).toBe(0)
    const cmds = await describeCommands()
    const top = bashComplete(script, ['imgtool', ''])
    for (const c of cmds) for (const n of [c.name, ...c.aliases]) expect(top).toContain(n)
    expect(top).toEqual(expect.arrayContaining(['completion', 'man']))
    for (const c of cmds) {
      const offered = bashComplete(script, ['imgtool', c.name, '-'])
      for (const o of c.options) for (const f of [o.short, o.long]) if (f) expect(offered, `${c.name} ${f}`).toContain(f)
    }
    expect(bashComplete(script, ['imgtool', 'convert', '-O', ''])).toEqual(['qcow2', 'dmsnap', 'vpc', 'vmdk', 'raw'])
    expect(bashComplete(script, ['imgtool', 'convert', '-O', 'q'])).toEqual(['qcow2'])
    expect(bashComplete(script, ['imgtool', 'check', '--output', ''])).toEqual(['human', 'json'])
    expect(bashComplete(script, ['imgtool', 'validate', '--output', ''])).toEqual(['human', 'json', 'junit', 'sarif'])
    expect(bashComplete(script, ['imgtool', 'completion', ''])).toEqual(['bash', 'zsh', 'fish'])
    expect(bashComplete(script, ['imgtool', 'check', '-f', 'qcow2', '--re'])).toEqual(['--repair'])
  })

  it('zsh is the bash script behind bashcompinit; fish one complete line per command and option', async () => {
    const zsh = await cli('completion', 'zsh')
    expect(zsh.stdout.split('\n')[0]).toBe('#compdef imgtool')
    expect(zsh.stdout).toContain('bashcompinit')
    expect(zsh.stdout).toContain((await cli('completion', 'bash')).stdout)
    const fish = (await cli('completion', 'fish')).stdout.trim().split('\n')
    for (const l of fish.slice(1)) expect(l).toMatch(/^complete -c imgtool( |$)/)
    const cmds = await describeCommands()
    const count = cmds.reduce((n, c) => n + c.options.length, 0)
    expect(fish.filter((l) => / -[sl] /.test(l)).length).toBe(count)
    // quotes balanced once fish's escapes inside single quotes (a backslash before a quote or a backslash) are taken out
    for (const l of fish) expect(l.replace(/\\[\\']/g, '').split("'").length % 2, l).toBe(1)
  })

  it('an unknown shell is a usage error', async () => {
    const r = await cli('completion', 'tcsh')
    expect(r.code).toBe(1)
    expect(r.stderr).toContain("unknown shell 'tcsh'")
  })
})

describe('imgtool man', () => {
  it('lists every command and option; groff renders it without a warning', async () => {
    const r = await cli('man')
    expect(r.code).toBe(0)
    expect(r.stdout.startsWith('.TH IMGTOOL 1')).toBe(true)
    const groff = findExecutable('groff')
    if (!groff) return
    const g = spawnSync(groff, ['-man', '-Tutf8', '-ww'], { input: r.stdout, encoding: 'utf8', env: { ...process.env, GROFF_NO_SGR: '1' } })
    expect(g.stderr).toBe('')
    // the rendered text, overstrike (bold/underline by backspace) removed
    const text = g.stdout.replace(/.\x08/g, '').replace(/\u2010/g, '-')
    for (const c of await describeCommands()) {
      expect(text).toContain(`imgtool ${c.name}`)
      for (const o of c.options) expect(text, `${c.name} ${o.flags}`).toContain(o.flags)
    }
  })
})
