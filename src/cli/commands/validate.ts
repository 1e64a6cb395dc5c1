import type { CommandModule } from '../command.js'

const validate: CommandModule = {
  name: 'validate',
  description: 'gate a pipeline on images being safe, sound and what was ordered (policy or preset)',
  configure(cmd) {
    cmd
      .option('--policy <file>', 'policy file (JSON or YAML); see --print-schema')
      .option('--preset <name>', 'openstack, kubevirt, azure, aws, vsphere or produced (a policy file may extend one)')
      .option('--expect-format <fmt>', 'the declared format the files must be')
      .option('--output <fmt>', 'human, json, junit or sarif', 'human')
      .option('--json', 'same as --output json')
      .option('--fail-on <severity>', 'exit 2 on violations at or above: error or warning', 'error')
      .option('--manifest <file>', 'JSON lines: {"path", "format", "policy" or "preset", "digest"} per image')
      .option('--jobs <n>', 'worker threads for many images', '1')
      .option('--print-schema', 'print the JSON Schema of policy files and exit')
      .argument('[images...]')
  },
  async run(args, opts, io) {
    const { parseValidateOptions, runValidate } = await import('../validate/run.js')
    const o = parseValidateOptions(args, opts)
    return runValidate(o, io)
  },
}
export default validate
