/**
 * Presets for the targets people publish to. Each rule names where it comes
 * from; a rule we could not tie to a target's published rule is marked "imgtool".
 * A preset is a PolicyInput applied over the deny-by-default base.
 */
import type { PolicyInput, PresetName } from './policy.js'

const MiB = 1024 * 1024
const GiB = 1024 * MiB
const TiB = 1024 * GiB
const ALL_CLUSTER_SIZES = [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288, 1048576, 2097152]
const ALL_REFCOUNT_BITS = [1, 2, 4, 8, 16, 32, 64]

export const PRESETS: Record<PresetName, PolicyInput> = {
  openstack: {
    // oslo.utils imageutils.format_inspector (after CVE-2024-32498): the formats Glance's
    // disk_formats list and the inspector knows; formats imgtool cannot read yet are reported unsupported
    formats: ['raw', 'qcow2', 'vmdk', 'vhd', 'vhdx', 'iso'],
    // format_inspector.detect_file_format: more than one matching format is refused
    identity: { allowPolyglot: false },
    // QcowInspector safety check "backing_file" and "data_file": both refused, as are json:/protocol names
    references: { backingFile: false, dataFile: false },
    // VMDKInspector reads createType monolithicSparse and streamOptimized only; its extent-name safety
    // check ("Add VMDK safety check", CVE-2024-32498) refuses extents in other files
    vmdk: { createTypes: ['monolithicSparse', 'streamOptimized'] },
    qcow2: {
      // QcowInspector: any version it can parse (2 and 3)
      compat: ['0.10', '1.1'],
      // QcowInspector "unknown_features": incompatible bits outside the known set are refused;
      // data-file (bit 2) is refused by the data_file check
      incompatibleFeatures: ['dirty', 'compression-type', 'extended-l2'],
      compatibleFeatures: ['lazy-refcounts'],
      autoclearFeatures: ['bitmaps'],
      // the inspector ignores the dirty bit; qemu-img check (below) then expects stale refcounts
      dirty: 'stale-refcounts-expected',
      compressionTypes: ['zlib', 'zstd'],
      // Nova refuses to boot qcow2 with encryption it did not set up (imagebackend); imgtool
      encryption: false,
      maxSnapshots: 65536,
      maxBitmaps: 65535,
      refcountBits: ALL_REFCOUNT_BITS,
      clusterSizes: ALL_CLUSTER_SIZES,
    },
    // the issue: "the inspector's rules plus a real structural check"; leaks do not harm a reader
    structure: { check: true, maxLeaks: 2 ** 31 },
    // Glance's os_hash_value is SHA-512 of the file; the guest digest is imgtool's addition
    content: { digest: true, partitions: 'off' },
  },
  kubevirt: {
    // CDI pkg/image/validate.go: formats qemu-img can convert for the importer
    formats: ['raw', 'qcow2', 'vmdk', 'vhd', 'vhdx'],
    // CDI validate(): "Image is invalid because it has backing file"
    references: { backingFile: false, dataFile: false },
    qcow2: {
      compat: ['0.10', '1.1'],
      incompatibleFeatures: ['compression-type', 'extended-l2'],
      compatibleFeatures: ['lazy-refcounts'],
      autoclearFeatures: ['bitmaps'],
      dirty: 'fail',
      compressionTypes: ['zlib', 'zstd'],
      maxSnapshots: 0,
      maxBitmaps: 65535,
      refcountBits: ALL_REFCOUNT_BITS,
      clusterSizes: ALL_CLUSTER_SIZES,
    },
    // CDI validate(): the virtual size must fit the target's available space; the default
    // filesystem overhead of CDIConfig (filesystemOverhead.global) is 5.5%
    sizes: { targetOverheadPercent: 5.5 },
    structure: { check: true, maxLeaks: 2 ** 31 },
  },
  azure: {
    // learn.microsoft.com "Prepare a Windows/Linux VHD for Azure": fixed VHD only (VHDX and dynamic VHD refused)
    formats: ['vhd'],
    // same page: "VHDX format isn't supported in Azure, only fixed VHD"
    vhd: {
      subformats: ['fixed'],
      // same page: a fixed VHD's file is the virtual size (a whole number of MiB) plus the 512-byte footer
      fileSizeAlignment: MiB,
    },
    sizes: {
      // same page: "the virtual size of all VHDs on Azure must be aligned to 1 MB"
      virtualSizeAlignment: MiB,
      // Azure managed disks: largest OS disk 4 TiB
      maxVirtualSize: 4 * TiB,
    },
    references: { backingFile: false, dataFile: false },
  },
  aws: {
    // docs.aws.amazon.com VM Import/Export "Image formats": raw, VHD/VHDX, streamOptimized ESX VMDK (and OVA)
    formats: ['raw', 'vhd', 'vhdx', 'vmdk'],
    // same page: the VMDK must be a stream-optimized ESX VMDK (no version named: 1 to 3 stay allowed)
    vmdk: { createTypes: ['streamOptimized'] },
    // VM Import: differencing/linked disks are not supported
    references: { backingFile: false, dataFile: false },
    // VM Import/Export limits: volumes up to 16 TiB (import-image, raw/VHD/VMDK)
    sizes: { maxVirtualSize: 16 * TiB },
    content: { partitions: 'require' },
  },
  vsphere: {
    // vSphere OVF import / ovftool: streamOptimized VMDK (version 3); other createTypes are refused
    formats: ['vmdk'],
    vmdk: { createTypes: ['streamOptimized'], versions: [3] },
    references: { backingFile: false, dataFile: false },
    sizes: { maxVirtualSize: 62 * TiB },
  },
  produced: {
    // imgtool: what a build pipeline should promise (the "produced"): sound, no leaks,
    // no references, not dirty, current compat
    formats: ['raw', 'qcow2'],
    references: { backingFile: false, dataFile: false },
    qcow2: {
      compat: ['1.1'],
      incompatibleFeatures: ['compression-type'],
      compatibleFeatures: [],
      autoclearFeatures: [],
      dirty: 'fail',
      compressionTypes: ['zlib', 'zstd'],
      encryption: false,
      maxSnapshots: 0,
      maxBitmaps: 0,
      refcountBits: [16],
      clusterSizes: ALL_CLUSTER_SIZES,
    },
    structure: { check: true, maxLeaks: 0 },
    // imgtool: the guest digest reads every data byte (seconds per GiB, hours on a 1 TiB
    // preallocated image): produced computes it only when a policy asks for an expected digest
    // (content.expectDigest, a manifest line's digest) or a reference image; content.digest: true turns it on
    content: { digest: false, partitions: 'check' },
  },
}
