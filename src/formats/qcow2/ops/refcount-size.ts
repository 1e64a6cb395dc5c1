/** How many refcount blocks and table clusters cover N clusters (qemu's qcow2_refcount_metadata_size); shared by the
 * preallocating writers and measure, which must not load the writers. */
import { refcountsPerBlock } from '../spec/refcount-codec.js'

/** qcow2_refcount_metadata_size: refcount blocks and table clusters to count `clusters` and themselves. */
export function refcountMetadataSize(clusters: number, clusterSize: number, order: number, generous: boolean): { blocks: number; table: number } {
  const perTableCluster = clusterSize / 8
  const perBlock = refcountsPerBlock(clusterSize, order)
  let table = 0
  let blocks = 0
  let n = 0
  let last: number
  do {
    last = n
    blocks = Math.ceil((clusters + table + blocks) / perBlock)
    table = Math.ceil(blocks / perTableCluster)
    n = clusters + blocks + table
    if (n === last && generous) {
      clusters += Math.ceil(table / 2)
      n = 0
      generous = false
    }
  } while (n !== last)
  return { blocks, table }
}
