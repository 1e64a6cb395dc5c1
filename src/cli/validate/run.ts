/** imgtool validate: options, policy loading, one library call per image, rendering, exit code. */
import type { Policy } from '../../index.js'
import type { CliIo } from '../command.js'
import { qemuJson } from '../common.js'
import { policyOf, validateOne, type ValidateCliOptions } from './options.js'
import { exitCodeOf, human, jsonDocument, summarize, type FailOn, type Outcome } from './render.js'

export { parseValidateOptions } from './options.js'

export async function runValidate(o: ValidateCliOptions, io: CliIo): Promise<number> {
  if (o.printSchema) {
    const { policyJsonSchema } = await import('./policy-file.js')
    io.stdout.write(JSON.stringify(policyJsonSchema(), null, 2) + '\n')
    return 0
  }
  if (o.manifest !== undefined) {
    const { runManifest } = await import('./manifest.js')
    return runManifest(o, io)
  }
  const policy = await policyOf(o)
  const outcomes: Outcome[] = []
  for (const file of o.images) outcomes.push(await validateOne(file, policy))
  const failOn: FailOn = o.failOn
  io.stdout.write(await render(o.output, outcomes, failOn, policy))
  return exitCodeOf(summarize(outcomes, failOn))
}

async function render(output: ValidateCliOptions['output'], outcomes: Outcome[], failOn: FailOn, policy: Policy): Promise<string> {
  switch (output) {
    case 'human':
      return human(outcomes, failOn)
    case 'json':
      return qemuJson(jsonDocument(outcomes, failOn)) + '\n'
    case 'junit':
      return (await import('./junit.js')).junit(outcomes, failOn)
    case 'sarif':
      return JSON.stringify((await import('./sarif.js')).sarif(outcomes, failOn, policy), null, 2) + '\n'
  }
}
