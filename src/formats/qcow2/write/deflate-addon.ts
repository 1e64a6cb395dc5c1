/**
 * The optional deflate addon (native/zdeflate.c), shared with the other
 * formats that compress: it lives in src/util/deflate.ts.
 */
export { deflateAddon, type DeflateAddon } from '../../../util/deflate.js'
