// Prints the system's static zlib (libz.a) for binding.gyp to link into the
// deflate addon, or nothing: then the addon uses the zlib Node exports.
const { existsSync } = require('node:fs')
const dirs = ['/usr/lib/x86_64-linux-gnu', '/usr/lib/aarch64-linux-gnu', '/usr/lib64', '/usr/lib', '/lib/x86_64-linux-gnu']
if (process.platform === 'linux') {
  const hit = dirs.map((d) => `${d}/libz.a`).find((p) => existsSync(p))
  if (hit) process.stdout.write(hit)
}
