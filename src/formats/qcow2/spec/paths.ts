/**
 * QEMU's path_combine: a relative backing or data file name is taken relative
 * to the directory of the image's own name as given (not the current directory).
 * A name with a protocol prefix is returned unchanged: that is how qemu-img
 * shows it (full-backing-filename); `protocolPrefix` says imgtool will not open it.
 */
export function combinePath(base: string, name: string): string {
  if (name.startsWith('/') || protocolPrefix(name) !== undefined) return name
  const slash = base.lastIndexOf('/')
  return slash < 0 ? name : base.slice(0, slash + 1) + name
}

/**
 * The protocol a name would select in QEMU (path_has_protocol: a ':' before
 * any '/'), e.g. 'json', 'file', 'nbd', or the 'x' of 'x:y'; undefined for a
 * plain path. imgtool opens plain paths only: `x:y` is a protocol name to
 * QEMU ("Unknown protocol 'x'"), never a file in some directory.
 */
export function protocolPrefix(name: string): string | undefined {
  const m = /^[^:/]*:/.exec(name)
  return m ? m[0].slice(0, -1) : undefined
}
