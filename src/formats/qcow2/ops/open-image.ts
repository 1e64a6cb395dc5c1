/**
 * An open qcow2 image as the operations (snapshots, resize) see it: the state
 * the read room owns, and the writer attached when it was opened read-write.
 * The façade (Qcow2Image) is one.
 */
import { UnsupportedFeatureError } from '../../../errors.js'
import type { Qcow2State } from '../read/state.js'
import type { Qcow2Writer } from '../write/write.js'

export interface Qcow2OpenImage {
  readonly state: Qcow2State
  /** attached when the image was opened read-write */
  readonly writer: Qcow2Writer | undefined
  /** why no writer could be attached (read-only, unsupported feature) */
  readonly writerRefusal: Error | undefined
  close(): Promise<void>
}

/** The image's writer, or the reason it has none. */
export function writerOf(img: Qcow2OpenImage): Qcow2Writer {
  if (!img.writer) throw img.writerRefusal ?? new UnsupportedFeatureError(`qcow2: ${img.state.filename}: image is not open for writing`)
  return img.writer
}
