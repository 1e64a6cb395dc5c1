/**
 * QEMU's path_combine: a relative backing or data file name is taken relative
 * to the directory of the image's own name as given (not the current directory).
 */
export function combinePath(base: string, name: string): string {
  if (name.startsWith('/') || /^[a-z][a-z0-9+.-]*:/i.test(name)) return name
  const slash = base.lastIndexOf('/')
  return slash < 0 ? name : base.slice(0, slash + 1) + name
}
