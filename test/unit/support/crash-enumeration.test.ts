/**
 * The crash states CrashDevice and CrashGroup enumerate, pinned: for a few
 * representative write sequences and option sets, the number of states and a
 * digest over every state in order (its kind, point, flushes, applied and
 * pending events, torn range, description, device names and bytes). The table
 * was recorded from the enumeration before crash-device.ts and crash-group.ts
 * shared one engine; a change that adds, drops, reorders or alters one state
 * fails here (the crash sweeps must not shrink).
 */
import { createHash } from 'node:crypto'
import { describe, expect, it } from 'vitest'
import type { MemoryDevice } from '../../../src/io/memory-device.js'
import { CrashDevice, sweepCrashes, type CrashStateOptions } from '../../support/crash-device.js'
import { CrashGroup } from '../../support/crash-group.js'
import { Prng } from '../../support/prng.js'

const fill = (n: number, v: number): Uint8Array => new Uint8Array(n).fill(v)

const OPTIONS: Record<string, CrashStateOptions> = {
  plain: {},
  subsets: { subsets: true },
  torn: { torn: true },
  tornTail: { torn: true, tornTail: true },
  everything: { subsets: true, torn: true, tornTail: true },
  random: { subsets: true, exhaustiveLimit: 3, randomSubsets: 5, seed: 7 },
  coarse: { torn: true, sectorSize: 4096, maxTornPerWrite: 2 },
}

interface StateLike {
  kind: string
  point: number
  flushes: number
  applied: number[]
  pending: number[]
  description: string
  torn?: { seq: number; from: number; to: number }
}

/** One state's digest: every field a test can see, and the bytes of every device. */
function stateHash(s: StateLike, devices: MemoryDevice[]): string {
  const h = createHash('sha256')
  const { kind, point, flushes, applied, pending, description, torn } = s
  h.update(JSON.stringify({ kind, point, flushes, applied, pending, description, torn, names: devices.map((d) => d.name) }))
  for (const d of devices) {
    const b = d.snapshot()
    h.update(`|${b.byteLength}|`)
    h.update(b)
  }
  return h.digest('hex')
}

/** `count:digest` over an ordered list of state hashes. */
function summary(hashes: string[]): string {
  const h = createHash('sha256')
  for (const x of hashes) h.update(x)
  return `${hashes.length}:${h.digest('hex').slice(0, 16)}`
}

type DeviceWorkload = (d: CrashDevice) => Promise<void>
type GroupWorkload = (g: CrashGroup) => Promise<void>

const DEVICE_WORKLOADS: Record<string, [base: number | Uint8Array, run: DeviceWorkload]> = {
  // tagged writes, an unaligned write, truncates (shrink and extend), allocate, three epochs
  mixed: [
    4096,
    async (d) => {
      await d.write(0, fill(512, 1), 'header')
      await d.write(1000, fill(1500, 2))
      await d.flush()
      await d.write(512, fill(1024, 3), 'l2')
      await d.truncate(3000)
      await d.write(4000, fill(100, 4))
      await d.flush()
      await d.write(0, fill(8, 5), 'header')
      await d.allocate(0, 8192)
      await d.write(0, new Uint8Array(0))
    },
  ],
  // 12 pending writes on a growing device: above the exhaustive limit, random subsets
  many: [
    0,
    async (d) => {
      const rng = new Prng(5)
      for (let i = 0; i < 12; i++) await d.write(rng.int(8) * 300, fill(200 + rng.int(700), i + 1), i % 2 ? 'data' : 'l2')
    },
  ],
  // a large write (more cuts than maxTornPerWrite), then the same bytes again, double flushes
  repeats: [
    new Prng(9).bytes(70000),
    async (d) => {
      await d.write(100, fill(65536, 7), 'data')
      await d.flush()
      await d.flush()
      await d.write(100, fill(65536, 7), 'data')
      await d.write(100, fill(512, 7), 'data')
      await d.flush()
    },
  ],
  empty: [512, async () => {}],
}

const GROUP_WORKLOADS: Record<string, GroupWorkload> = {
  // an image and its data file: a flush makes only its own member durable
  pair: async (g) => {
    const img = g.add('img.qcow2', fill(1024, 0))
    const data = g.add('img.data', fill(2048, 9))
    await data.write(0, fill(1536, 7), 'data')
    await img.write(0, fill(8, 1), 'l2')
    await img.flush()
    await data.write(700, fill(600, 6), 'data')
    await img.truncate(4096)
    await data.flush()
    await img.write(8, fill(8, 2), 'l2')
    await data.allocate(0, 4096)
  },
  // three members, repeated identical states across flushes (deduplicated)
  three: async (g) => {
    const a = g.add('a', 0)
    const b = g.add('b', fill(100, 1))
    const c = g.add('c', 512)
    for (let i = 0; i < 3; i++) {
      await a.write(i * 100, fill(100, i + 1))
      await b.write(0, fill(8, 1))
      await c.write(i * 512, fill(1024, i + 2))
      await b.flush()
      await a.flush()
    }
    await c.flush()
  },
  // a one-member group: the same workload as CrashDevice's "mixed"
  single: async (g) => {
    const d = g.add('single', 4096)
    await d.write(0, fill(512, 1), 'header')
    await d.write(1000, fill(1500, 2))
    await d.flush()
    await d.write(512, fill(1024, 3), 'l2')
    await d.truncate(3000)
    await d.write(4000, fill(100, 4))
    await d.flush()
    await d.write(0, fill(8, 5), 'header')
  },
  // 11 pending events over two members: random subsets
  many: async (g) => {
    const m = [g.add('x', 0), g.add('y', 0)]
    const rng = new Prng(3)
    for (let i = 0; i < 11; i++) await m[i % 2]!.write(rng.int(6) * 256, fill(100 + rng.int(900), i + 1))
  },
}

async function deviceTable(): Promise<Record<string, string>> {
  const out: Record<string, string> = {}
  for (const [wname, [base, run]] of Object.entries(DEVICE_WORKLOADS)) {
    const dev = new CrashDevice(base, { name: wname })
    await run(dev)
    // the device's own view of its log
    const own = createHash('sha256')
    own.update(
      JSON.stringify(dev.events.map((e) => [e.seq, e.kind, e.kind === 'write' ? [e.offset, e.data.byteLength, e.tag] : e.kind === 'truncate' ? e.size : 0])),
    )
    own.update(JSON.stringify([dev.flushCount, dev.size, dev.epochEnds(), dev.pendingWrites().map((e) => e.seq)]))
    own.update(dev.durableSnapshot())
    own.update('|')
    own.update(dev.snapshot())
    for (let k = 0; k <= dev.pendingWrites().length; k++) {
      const c = dev.crashAt(k)
      own.update(`|${c.name}|`)
      own.update(c.snapshot())
    }
    out[`device ${wname} log`] = own.digest('hex').slice(0, 16)
    for (const [oname, o] of Object.entries(OPTIONS)) {
      out[`device ${wname} all ${oname}`] = summary([...dev.allCrashStates(o)].map((s) => stateHash(s, [s.device])))
      out[`device ${wname} now ${oname}`] = summary([...dev.crashStates(o)].map((s) => stateHash(s, [s.device])))
      const at: string[] = []
      for (let p = 0; p <= dev.events.length; p++) for (const s of dev.statesAt(p, o)) at.push(stateHash(s, [s.device]))
      out[`device ${wname} every point ${oname}`] = summary(at)
    }
    const hashes: string[] = []
    const swept = await sweepCrashes(base, run, (s) => void hashes.push(stateHash(s, [s.device])), { ...OPTIONS.everything, name: wname })
    out[`device ${wname} sweep`] = `${swept.states}/${summary(hashes)}`
  }
  return out
}

async function groupTable(): Promise<Record<string, string>> {
  const out: Record<string, string> = {}
  for (const [wname, run] of Object.entries(GROUP_WORKLOADS)) {
    const g = new CrashGroup()
    await run(g)
    out[`group ${wname} log`] = createHash('sha256')
      .update(
        JSON.stringify([
          g.names,
          g.flushCount,
          g.events.map((e) => [e.seq, e.member, e.kind, e.kind === 'write' ? [e.offset, e.data.byteLength, e.tag] : e.kind === 'truncate' ? e.size : 0]),
        ]),
      )
      .digest('hex')
      .slice(0, 16)
    for (const [oname, o] of Object.entries(OPTIONS)) {
      out[`group ${wname} all ${oname}`] = summary([...g.allCrashStates(o)].map((s) => stateHash(s, s.devices)))
    }
  }
  return out
}

// recorded from the enumeration before the shared engine (count:digest of the states in order)
const EXPECTED: Record<string, string> = {
  'device empty all coarse': '1:be69230159099aa6',
  'device empty all everything': '1:be69230159099aa6',
  'device empty all plain': '1:be69230159099aa6',
  'device empty all random': '1:be69230159099aa6',
  'device empty all subsets': '1:be69230159099aa6',
  'device empty all torn': '1:be69230159099aa6',
  'device empty all tornTail': '1:be69230159099aa6',
  'device empty every point coarse': '1:be69230159099aa6',
  'device empty every point everything': '1:be69230159099aa6',
  'device empty every point plain': '1:be69230159099aa6',
  'device empty every point random': '1:be69230159099aa6',
  'device empty every point subsets': '1:be69230159099aa6',
  'device empty every point torn': '1:be69230159099aa6',
  'device empty every point tornTail': '1:be69230159099aa6',
  'device empty log': 'aecaf4dec563673f',
  'device empty now coarse': '1:be69230159099aa6',
  'device empty now everything': '1:be69230159099aa6',
  'device empty now plain': '1:be69230159099aa6',
  'device empty now random': '1:be69230159099aa6',
  'device empty now subsets': '1:be69230159099aa6',
  'device empty now torn': '1:be69230159099aa6',
  'device empty now tornTail': '1:be69230159099aa6',
  'device empty sweep': '1/1:be69230159099aa6',
  'device many all coarse': '13:a2fd0573b40733d7',
  'device many all everything': '76:7155fb13884aa13a',
  'device many all plain': '13:a2fd0573b40733d7',
  'device many all random': '29:ceb007b0c39d1068',
  'device many all subsets': '56:adfb94f6def32545',
  'device many all torn': '23:336817885f725abe',
  'device many all tornTail': '33:2eb25ff81c91d832',
  'device many every point coarse': '91:ca3c0362913d1f3c',
  'device many every point everything': '2309:d21091b2f68a7897',
  'device many every point plain': '91:ca3c0362913d1f3c',
  'device many every point random': '204:d8934bd1ce512297',
  'device many every point subsets': '2157:afb74ba5172dc92a',
  'device many every point torn': '167:a36db291e064db9c',
  'device many every point tornTail': '243:4fd347744d299769',
  'device many log': '6a89e6b807a83163',
  'device many now coarse': '13:a2fd0573b40733d7',
  'device many now everything': '76:7155fb13884aa13a',
  'device many now plain': '13:a2fd0573b40733d7',
  'device many now random': '29:ceb007b0c39d1068',
  'device many now subsets': '56:adfb94f6def32545',
  'device many now torn': '23:336817885f725abe',
  'device many now tornTail': '33:2eb25ff81c91d832',
  'device many sweep': '76/76:7155fb13884aa13a',
  'device mixed all coarse': '9:f651ee9fc93a11bf',
  'device mixed all everything': '24:0123460dd626b6cb',
  'device mixed all plain': '8:cdf807a5799649f3',
  'device mixed all random': '14:053370bb1f536877',
  'device mixed all subsets': '14:053370bb1f536877',
  'device mixed all torn': '13:559a80ba69207f0d',
  'device mixed all tornTail': '18:f224b01fdcf1be2b',
  'device mixed every point coarse': '23:617fc071cc853a7e',
  'device mixed every point everything': '43:52dfe7980071fb42',
  'device mixed every point plain': '22:79fa684f83fdafc1',
  'device mixed every point random': '29:c7e5720d9d84147a',
  'device mixed every point subsets': '29:c7e5720d9d84147a',
  'device mixed every point torn': '29:b23343ad9a3a93a5',
  'device mixed every point tornTail': '36:fa6ac5f087a07418',
  'device mixed log': 'd9c70961126bf712',
  'device mixed now coarse': '3:ff602e2bcc98552b',
  'device mixed now everything': '4:0049bda6ad02128d',
  'device mixed now plain': '3:ff602e2bcc98552b',
  'device mixed now random': '4:0049bda6ad02128d',
  'device mixed now subsets': '4:0049bda6ad02128d',
  'device mixed now torn': '3:ff602e2bcc98552b',
  'device mixed now tornTail': '3:ff602e2bcc98552b',
  'device mixed sweep': '24/24:0123460dd626b6cb',
  'device repeats all coarse': '8:3e6815509e858431',
  'device repeats all everything': '39:eade2976c724bc95',
  'device repeats all plain': '4:4e65a43b33995252',
  'device repeats all random': '5:a7225d765edb3104',
  'device repeats all subsets': '5:a7225d765edb3104',
  'device repeats all torn': '21:0a18c3f1eb4ea86f',
  'device repeats all tornTail': '38:283543fcfe627394',
  'device repeats every point coarse': '17:778a551383739807',
  'device repeats every point everything': '62:fe0826fcfb1ebb71',
  'device repeats every point plain': '11:0ae3f162e735ed67',
  'device repeats every point random': '12:127b8c2da1f79693',
  'device repeats every point subsets': '12:127b8c2da1f79693',
  'device repeats every point torn': '36:d16ca2028c682cff',
  'device repeats every point tornTail': '61:c211fe07849219dd',
  'device repeats log': '19298f061c5922b6',
  'device repeats now coarse': '1:9cd39f216e377635',
  'device repeats now everything': '1:9cd39f216e377635',
  'device repeats now plain': '1:9cd39f216e377635',
  'device repeats now random': '1:9cd39f216e377635',
  'device repeats now subsets': '1:9cd39f216e377635',
  'device repeats now torn': '1:9cd39f216e377635',
  'device repeats now tornTail': '1:9cd39f216e377635',
  'device repeats sweep': '39/39:eade2976c724bc95',
  'group many all coarse': '12:430da79ea71ad496',
  'group many all everything': '53:fd716977dc81fd80',
  'group many all plain': '12:430da79ea71ad496',
  'group many all random': '20:9356299cb9c2311d',
  'group many all subsets': '37:42a9ef2a78a3e59a',
  'group many all torn': '20:786368c89937619a',
  'group many all tornTail': '28:d49a1302353f5458',
  'group many log': '1d836fcfe4526f90',
  'group pair all coarse': '11:720a1ca8fcffd6d7',
  'group pair all everything': '30:f4bf417ff1d57c7c',
  'group pair all plain': '11:720a1ca8fcffd6d7',
  'group pair all random': '20:f57331dc0094fc48',
  'group pair all subsets': '20:f57331dc0094fc48',
  'group pair all torn': '16:d12085dafc417c46',
  'group pair all tornTail': '21:a9654157206ac33d',
  'group pair log': 'd256c4f3df97a186',
  'group single all coarse': '10:4fee97975cf5df47',
  'group single all everything': '22:1d64e4be762f28fe',
  'group single all plain': '9:e2f138b508f5f95c',
  'group single all random': '12:99b021bccf2e76f8',
  'group single all subsets': '12:99b021bccf2e76f8',
  'group single all torn': '14:24b821d79642c6fc',
  'group single all tornTail': '19:cd726c7ea89b63f3',
  'group single log': 'f03d2f3abf89c95d',
  'group three all coarse': '29:6f9bbbba493200ed',
  'group three all everything': '95:00d0a592fe5dfad9',
  'group three all plain': '29:6f9bbbba493200ed',
  'group three all random': '58:6f561a6bcc3a7d65',
  'group three all subsets': '65:b41e4bc64d60c433',
  'group three all torn': '44:38dc8e81c2dd550e',
  'group three all tornTail': '59:a612411ec71a4678',
  'group three log': '31439c24e8041d10',
}

describe('crash state enumeration', () => {
  it('CrashDevice enumerates exactly the recorded states, in order', async () => {
    const table = await deviceTable()
    if (process.env.PRINT_CRASH_TABLE) console.log(`TABLE ${JSON.stringify(table)}`)
    expect(table).toEqual(Object.fromEntries(Object.entries(EXPECTED).filter(([k]) => k.startsWith('device '))))
  })

  it('CrashGroup enumerates exactly the recorded states, in order', async () => {
    const table = await groupTable()
    if (process.env.PRINT_CRASH_TABLE) console.log(`TABLE ${JSON.stringify(table)}`)
    expect(table).toEqual(Object.fromEntries(Object.entries(EXPECTED).filter(([k]) => k.startsWith('group '))))
  })
})
