import { describe, expect, it } from 'vitest'
import { combinePath, protocolPrefix } from '../../../src/formats/qcow2/spec/paths.js'

describe('combinePath (QEMU path_combine)', () => {
  it.each([
    ['top.qcow2', 'base.qcow2', 'base.qcow2'],
    ['dir/top.qcow2', 'base.qcow2', 'dir/base.qcow2'],
    ['/abs/dir/top.qcow2', 'base.qcow2', '/abs/dir/base.qcow2'],
    ['/abs/dir/top.qcow2', 'sub/base.qcow2', '/abs/dir/sub/base.qcow2'],
    ['/abs/dir/top.qcow2', '../base.qcow2', '/abs/dir/../base.qcow2'],
    ['a/b/c/top.qcow2', './base', 'a/b/c/./base'],
    ['dir/top.qcow2', '/elsewhere/base.qcow2', '/elsewhere/base.qcow2'],
    ['dir/top.qcow2', 'nbd://host/export', 'nbd://host/export'],
    ['dir/top.qcow2', 'file:base.qcow2', 'file:base.qcow2'],
    ['/top.qcow2', 'base', '/base'],
    ['dir/', 'base', 'dir/base'],
  ])('%s + %s -> %s', (base, name, want) => {
    expect(combinePath(base, name)).toBe(want)
  })

  it('keeps the image path as given, relative stays relative', () => {
    expect(combinePath('../images/x.qcow2', 'y.qcow2')).toBe('../images/y.qcow2')
  })
})

describe('protocolPrefix (QEMU path_has_protocol)', () => {
  it.each([
    ['x:y', 'x'],
    ['json:{"driver":"file"}', 'json'],
    ['file:/etc/passwd', 'file'],
    ['nbd://host/export', 'nbd'],
    [':odd', ''],
    ['base.qcow2', undefined],
    ['dir/x:y', undefined],
    ['/abs/x:y', undefined],
    ['./x:y', undefined],
  ])('%s -> %s', (name, want) => {
    expect(protocolPrefix(name)).toBe(want)
  })
})
