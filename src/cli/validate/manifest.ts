/** placeholder replaced in the manifest step */
import { UsageError } from '../../index.js'
import type { CliIo } from '../command.js'
import type { ValidateCliOptions } from './run.js'

export async function runManifest(_o: ValidateCliOptions, _io: CliIo): Promise<number> {
  throw new UsageError('--manifest is not built yet')
}
