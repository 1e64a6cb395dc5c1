/**
 * Damage library for qcow2 check/repair tests: breaks a clean image in code,
 * on its bytes (synchronously, no imgtool code involved beyond nothing: the
 * few fields needed are decoded here, so a reader bug cannot hide a damage).
 *
 *   const img = new Qcow2Bytes(bytes)
 *   img.setRefcount(img.firstDataCluster()!.cluster, 0)
 *   writeFileSync(path, img.bytes)
 *
 * Every damage function returns a short description (for test names/messages).
 */
const TWO32 = 0x1_0000_0000

export interface EntryLoc {
  /** byte offset of the entry in the file */
  at: number
  l1Index: number
  l2Index: number
  /** host offset the entry points at */
  host: number
  cluster: number
}

export class Qcow2Bytes {
  bytes: Uint8Array
  constructor(bytes: Uint8Array) {
    this.bytes = new Uint8Array(bytes)
  }
  private get dv(): DataView {
    return new DataView(this.bytes.buffer, this.bytes.byteOffset, this.bytes.byteLength)
  }
  u32(o: number): number {
    return this.dv.getUint32(o, false)
  }
  u64(o: number): number {
    return this.u32(o) * TWO32 + this.u32(o + 4)
  }
  putU32(o: number, v: number): void {
    this.ensure(o + 4)
    this.dv.setUint32(o, v >>> 0, false)
  }
  putU64(o: number, v: number | bigint): void {
    this.ensure(o + 8)
    this.dv.setBigUint64(o, BigInt(v), false)
  }
  ensure(n: number): void {
    if (n <= this.bytes.byteLength) return
    const b = new Uint8Array(n)
    b.set(this.bytes)
    this.bytes = b
  }
  get version(): number {
    return this.u32(4)
  }
  get clusterBits(): number {
    return this.u32(20)
  }
  get cs(): number {
    return 2 ** this.clusterBits
  }
  get l1Size(): number {
    return this.u32(36)
  }
  get l1Offset(): number {
    return this.u64(40)
  }
  get reftableOffset(): number {
    return this.u64(48)
  }
  get reftableClusters(): number {
    return this.u32(56)
  }
  get refcountOrder(): number {
    return this.version === 3 ? this.u32(96) : 4
  }
  get incompatible(): bigint {
    return this.version === 3 ? this.dv.getBigUint64(72, false) : 0n
  }
  get extL2(): boolean {
    return (this.incompatible & 16n) !== 0n
  }
  get entrySize(): number {
    return this.extL2 ? 16 : 8
  }
  get clusters(): number {
    return Math.ceil(this.bytes.byteLength / this.cs)
  }

  /** a byte poke */
  poke(offset: number, data: number[] | Uint8Array): string {
    this.ensure(offset + data.length)
    this.bytes.set(data, offset)
    return `poke ${data.length} bytes at 0x${offset.toString(16)}`
  }

  // ---- refcounts
  private refcountLoc(cluster: number): { block: number; index: number } | undefined {
    const perBlock = (this.cs * 8) >> this.refcountOrder
    const ti = Math.floor(cluster / perBlock)
    if (ti >= (this.reftableClusters * this.cs) / 8) return undefined
    const block = this.u64(this.reftableOffset + ti * 8) - (this.u32(this.reftableOffset + ti * 8 + 4) & 0x1ff)
    if (block === 0) return undefined
    return { block, index: cluster % perBlock }
  }
  getRefcount(cluster: number): number {
    const l = this.refcountLoc(cluster)
    if (!l) return 0
    const order = this.refcountOrder
    const bits = 2 ** order
    if (order <= 2) {
      const per = 8 / bits
      const byte = this.bytes[l.block + Math.floor(l.index / per)] ?? 0
      return (byte >> ((l.index % per) * bits)) & ((1 << bits) - 1)
    }
    let v = 0
    for (let i = 0; i < bits / 8; i++) v = v * 256 + (this.bytes[l.block + l.index * (bits / 8) + i] ?? 0)
    return v
  }
  setRefcount(cluster: number, value: number): string {
    const l = this.refcountLoc(cluster)
    if (!l) throw new Error(`damage: no refcount block covers cluster ${cluster}`)
    const order = this.refcountOrder
    const bits = 2 ** order
    if (order <= 2) {
      const per = 8 / bits
      const at = l.block + Math.floor(l.index / per)
      const shift = (l.index % per) * bits
      const mask = ((1 << bits) - 1) << shift
      this.bytes[at] = ((this.bytes[at] ?? 0) & ~mask) | ((value << shift) & mask)
    } else {
      let v = BigInt(value)
      for (let i = bits / 8 - 1; i >= 0; i--) {
        this.bytes[l.block + l.index * (bits / 8) + i] = Number(v & 0xffn)
        v >>= 8n
      }
    }
    return `refcount of cluster ${cluster} := ${value}`
  }
  /** leak n clusters: unreferenced clusters get refcount 1 (appended to the file, inside existing refblocks) */
  leak(n: number): string {
    const out: number[] = []
    for (let c = this.clusters; out.length < n; c++) {
      if (!this.refcountLoc(c)) throw new Error('damage: no refblock room to leak clusters')
      this.ensure((c + 1) * this.cs)
      this.setRefcount(c, 1)
      out.push(c)
    }
    return `leaked clusters ${out.join(',')}`
  }

  // ---- tables
  l1Entry(i: number): number {
    return this.u64(this.l1Offset + i * 8)
  }
  l2Tables(): Array<{ l1Index: number; offset: number; at: number }> {
    const out = []
    for (let i = 0; i < this.l1Size; i++) {
      const at = this.l1Offset + i * 8
      const offset = (this.u32(at) & 0x00ffffff) * TWO32 + ((this.u32(at + 4) & 0xfffffe00) >>> 0)
      if (offset !== 0) out.push({ l1Index: i, offset, at })
    }
    return out
  }
  /** active L2 entries that are normal data clusters (not compressed), in guest order */
  dataEntries(): EntryLoc[] {
    const out: EntryLoc[] = []
    const es = this.entrySize
    for (const t of this.l2Tables()) {
      for (let j = 0; j < this.cs / es; j++) {
        const at = t.offset + j * es
        const hi = this.u32(at)
        const lo = this.u32(at + 4)
        if (hi & 0x40000000) continue
        const host = (hi & 0x00ffffff) * TWO32 + ((lo & 0xfffffe00) >>> 0)
        if (host === 0) continue
        if (!this.extL2 && lo & 1) continue // zero-alloc
        out.push({ at, l1Index: t.l1Index, l2Index: j, host, cluster: host / this.cs })
      }
    }
    return out
  }
  compressedEntries(): EntryLoc[] {
    const out: EntryLoc[] = []
    const es = this.entrySize
    for (const t of this.l2Tables()) {
      for (let j = 0; j < this.cs / es; j++) {
        const at = t.offset + j * es
        const hi = this.u32(at)
        if (!(hi & 0x40000000)) continue
        out.push({ at, l1Index: t.l1Index, l2Index: j, host: 0, cluster: 0 })
      }
    }
    return out
  }
  firstData(): EntryLoc {
    const e = this.dataEntries()[0]
    if (!e) throw new Error('damage: the image has no data cluster')
    return e
  }
  private setEntryHost(at: number, host: number): void {
    const hi = this.u32(at)
    const lo = this.u32(at + 4)
    this.putU32(at, (hi & 0xff000000) | Math.floor(host / TWO32))
    this.putU32(at + 4, (lo & 0x1ff) | (host % TWO32))
  }

  clearCopiedL2(): string {
    const e = this.firstData()
    this.putU32(e.at, this.u32(e.at) & 0x7fffffff)
    return `COPIED cleared on L2 entry of cluster ${e.cluster}`
  }
  clearCopiedL1(): string {
    const t = this.l2Tables()[0]!
    this.putU32(t.at, this.u32(t.at) & 0x7fffffff)
    return `COPIED cleared on L1 entry ${t.l1Index}`
  }
  dataPastEof(clustersBeyond = 8): string {
    const e = this.firstData()
    const host = (this.clusters + clustersBeyond) * this.cs
    this.setEntryHost(e.at, host)
    return `L2 entry (L1 ${e.l1Index}, L2 ${e.l2Index}) points at 0x${host.toString(16)}, past EOF`
  }
  dataIntoReftable(): string {
    const e = this.firstData()
    this.setEntryHost(e.at, this.reftableOffset)
    return `L2 entry (L1 ${e.l1Index}, L2 ${e.l2Index}) points into the refcount table`
  }
  misalignData(): string {
    const e = this.firstData()
    this.setEntryHost(e.at, e.host + 512)
    return `data offset of cluster ${e.cluster} misaligned by 512`
  }
  misalignL2Table(): string {
    const t = this.l2Tables()[0]!
    this.putU32(t.at + 4, this.u32(t.at + 4) + 512)
    return `L2 table offset of L1 entry ${t.l1Index} misaligned by 512`
  }
  l1ReservedBits(): string {
    const t = this.l2Tables()[0]!
    this.putU32(t.at, this.u32(t.at) | 0x01000000)
    return `reserved bit 56 set in L1 entry ${t.l1Index}`
  }
  l2ReservedBits(): string {
    const e = this.firstData()
    this.putU32(e.at + 4, this.u32(e.at + 4) | 0x2)
    return `reserved bit 1 set in L2 entry of cluster ${e.cluster}`
  }
  /** break refcount table entry 0: reserved bits, unaligned, or beyond EOF */
  breakReftableEntry(how: 'reserved' | 'unaligned' | 'outside' | 'zero'): string {
    const at = this.reftableOffset
    if (how === 'reserved') this.putU32(at + 4, this.u32(at + 4) | 0x1)
    else if (how === 'unaligned') this.putU32(at + 4, this.u32(at + 4) + 512)
    else if (how === 'zero') this.putU64(at, 0)
    else this.putU64(at, (this.clusters + 16) * this.cs)
    return `refcount table entry 0: ${how}`
  }
  setDirty(): string {
    this.putU32(76, this.u32(76) | 1)
    return 'dirty bit set'
  }
  setCorrupt(): string {
    this.putU32(76, this.u32(76) | 2)
    return 'corrupt bit set'
  }
  setLazyRefcounts(): string {
    this.putU32(84, this.u32(84) | 1)
    return 'lazy refcounts set'
  }
  // ---- snapshots
  get nbSnapshots(): number {
    return this.u32(60)
  }
  get snapshotsOffset(): number {
    return this.u64(64)
  }
  snapshotExtraTooBig(): string {
    this.putU32(this.snapshotsOffset + 36, 5000)
    return 'snapshot 0 extra_data_size := 5000'
  }
  snapshotL1Unaligned(): string {
    const o = this.snapshotsOffset
    this.putU64(o, this.u64(o) + 512)
    return 'snapshot 0 L1 offset misaligned by 512'
  }
  snapshotTooMany(): string {
    this.putU32(60, 70000)
    return 'nb_snapshots := 70000'
  }
  snapshotTableUnaligned(): string {
    this.putU64(64, this.snapshotsOffset + 8)
    return 'snapshots_offset misaligned by 8'
  }
  snapshotIncomplete(): string {
    // v3: claim no extra data (the entry is then parsed with the extra bytes as id/name)
    this.putU32(this.snapshotsOffset + 36, 0)
    return 'snapshot 0 extra_data_size := 0'
  }
}
