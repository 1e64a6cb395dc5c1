/**
 * qemu-img convert writes its target with cache=unsafe by default: flushes
 * are skipped while converting, and the data is made durable once, at the
 * end. A target that a crash interrupts is incomplete either way; the writer's
 * ordering still holds for everything that reaches the disk in order.
 */
import type { BlockDevice, DeviceOpener } from '../io/block-device.js'

export function unsafeCacheDevice(inner: BlockDevice): BlockDevice {
  const d: BlockDevice = {
    get size() {
      return inner.size
    },
    get readOnly() {
      return inner.readOnly
    },
    get name() {
      return inner.name
    },
    read: (o, l, t) => inner.read(o, l, t),
    write: (o, data, t) => inner.write(o, data, t),
    flush: async () => undefined,
    truncate: (s) => inner.truncate(s),
    close: async () => {
      if (!inner.readOnly) await inner.flush()
      await inner.close()
    },
  }
  if (inner.hostStatus) d.hostStatus = (o, l) => inner.hostStatus!(o, l)
  if (inner.allocatedSize) d.allocatedSize = () => inner.allocatedSize!()
  return d
}

export function unsafeCacheOpener(open: DeviceOpener): DeviceOpener {
  return async (path, options) => unsafeCacheDevice(await open(path, options))
}
