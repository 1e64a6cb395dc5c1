/**
 * The raw format's entry for the layers above: its driver and what they call
 * beyond the DiskImage interface. Nothing outside this folder imports another
 * file of it.
 */
export { RawImage, rawDriver } from './image.js'
export { parseRawPreallocation } from './create.js'
export { resizeRaw } from './resize.js'
