import type { BlockDevice, HostStatus, IoTag } from './block-device.js'

/** The optional BlockDevice members a pass-through device can forward. */
export type OptionalDeviceMember = 'readInto' | 'hostStatus' | 'allocatedSize' | 'allocate'

export interface PassThroughOptions {
  /** Name override (default: the inner device's name). */
  name?: string
  /**
   * Which optional members to forward, each only where the inner device has
   * it and the subclass does not define it. Default: hostStatus and
   * allocatedSize; readInto unless the subclass overrides read; allocate
   * unless it overrides write or truncate (forwarding those would bypass
   * what the subclass changes).
   */
  forward?: readonly OptionalDeviceMember[]
}

/**
 * A BlockDevice that forwards everything to an inner device: size, readOnly,
 * name, read, write, flush, truncate, close and the optional members (see
 * PassThroughOptions.forward). A wrapper extends it and overrides only what
 * it changes.
 */
export class PassThroughDevice implements BlockDevice {
  private readonly nameOverride: string | undefined

  constructor(
    readonly inner: BlockDevice,
    options: PassThroughOptions = {},
  ) {
    this.nameOverride = options.name
    const base = PassThroughDevice.prototype
    const keeps = (m: 'read' | 'write' | 'truncate'): boolean => this[m] === base[m]
    const forward = options.forward ?? [
      'hostStatus',
      'allocatedSize',
      ...(keeps('read') ? (['readInto'] as const) : []),
      ...(keeps('write') && keeps('truncate') ? (['allocate'] as const) : []),
    ]
    // own properties, so a caller that tests for a capability sees the inner device's
    if (forward.includes('readInto') && inner.readInto && !this.readInto) this.readInto = (o, b, t) => inner.readInto!(o, b, t)
    if (forward.includes('hostStatus') && inner.hostStatus && !this.hostStatus) this.hostStatus = (o, l) => inner.hostStatus!(o, l)
    if (forward.includes('allocatedSize') && inner.allocatedSize && !this.allocatedSize) this.allocatedSize = () => inner.allocatedSize!()
    if (forward.includes('allocate') && inner.allocate && !this.allocate) this.allocate = (o, l) => inner.allocate!(o, l)
  }

  get size(): number {
    return this.inner.size
  }
  get readOnly(): boolean {
    return this.inner.readOnly
  }
  get name(): string {
    return this.nameOverride ?? this.inner.name
  }

  read(offset: number, length: number, tag?: IoTag): Promise<Uint8Array> {
    return this.inner.read(offset, length, tag)
  }
  write(offset: number, data: Uint8Array, tag?: IoTag): Promise<void> {
    return this.inner.write(offset, data, tag)
  }
  flush(): Promise<void> {
    return this.inner.flush()
  }
  truncate(size: number): Promise<void> {
    return this.inner.truncate(size)
  }
  close(): Promise<void> {
    return this.inner.close()
  }

  readInto?(offset: number, buf: Uint8Array, tag?: IoTag): Promise<void>
  hostStatus?(offset: number, length: number): Promise<HostStatus>
  allocatedSize?(): Promise<number>
  allocate?(offset: number, length: number): Promise<void>
}
