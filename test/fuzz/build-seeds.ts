/** Build every fuzz seed into the cache and print where (node …/build-seeds.js). */
import { buildSeeds } from './seeds.js'

const seeds = await buildSeeds()
for (const [name, s] of seeds) console.log(`${name}\t${s.dir}`)
