/**
 * The LUKS1 header of a LUKS-encrypted qcow2 image (crypt_method 2), read for
 * `info` only: what qemu-img info shows under format-specific "encrypt". The
 * header lies in the clusters the crypto header extension names; imgtool
 * never needs the key and never decrypts.
 *
 * Layout (big-endian, cryptsetup's LUKS1 on-disk format): magic "LUKS\xba\xbe",
 * version u16, cipher name [32], cipher mode [32], hash spec [32], payload
 * offset u32 (sectors), key bytes u32, master key digest [20], digest salt
 * [32], digest iterations u32, uuid [40], then 8 key slots of 48 bytes:
 * active u32, iterations u32, salt [32], key material offset u32 (sectors),
 * stripes u32.
 */
import { CorruptImageError, UnsupportedFeatureError, hex } from '../../../errors.js'
import type { BlockDevice } from '../../../io/block-device.js'
import { u16be, u32be } from '../../../util/bytes.js'
import { cString, escapeBytes } from '../../../util/text.js'

const LUKS_MAGIC = [0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]
const HEADER_BYTES = 208 + 8 * 48
const SLOT_ACTIVE = 0x00ac71f3
const SECTOR = 512

const CIPHERS: Record<string, number[]> = { aes: [16, 24, 32], cast5: [16], serpent: [16, 24, 32], twofish: [16, 24, 32], sm4: [16] }
const MODES = ['ecb', 'cbc', 'xts', 'ctr']
const IVGENS = ['plain', 'plain64', 'essiv']
const HASHES = ['md5', 'sha1', 'sha224', 'sha256', 'sha384', 'sha512', 'ripemd160', 'sm3']

/** The "encrypt" object of qemu-img info for a LUKS image, keys in qemu-img's order. */
export async function readLuksInfo(dev: BlockDevice, file: string, crypto: { offset: number; length: number }): Promise<Record<string, unknown>> {
  const at = crypto.offset
  const bad = (what: string): never => {
    throw new CorruptImageError(`qcow2: ${file}: LUKS header: ${what} (LUKS header at ${hex(at)})`, { file, structure: 'LUKS header', offset: at })
  }
  const unsupported = (what: string): never => {
    throw new UnsupportedFeatureError(`qcow2: ${file}: LUKS header: ${what} (LUKS header at ${hex(at)})`, { file, structure: 'LUKS header', offset: at })
  }
  if (crypto.length < HEADER_BYTES) bad(`the crypto header extension gives it ${crypto.length} bytes, a LUKS header needs ${HEADER_BYTES}`)
  const b = await dev.read(at, HEADER_BYTES, 'header')
  if (!LUKS_MAGIC.every((m, i) => b[i] === m)) bad('Volume is not in LUKS format (no LUKS\\xba\\xbe magic)')
  const version = u16be(b, 6)
  if (version !== 1) unsupported(`LUKS version ${version} is not supported`)
  const field = (from: number, to: number, what: string): string => {
    const raw = cString(b.subarray(from, to))
    const s = new TextDecoder().decode(raw)
    if (!/^[\x20-\x7e]*$/.test(s)) bad(`${what} "${escapeBytes(raw)}" is not text`)
    return s
  }
  const cipherName = field(8, 40, 'cipher name')
  const cipherMode = field(40, 72, 'cipher mode')
  const hashSpec = field(72, 104, 'hash spec')
  const payloadOffset = u32be(b, 104)
  const keyBytes = u32be(b, 108)
  const digestIters = u32be(b, 164)
  const uuid = field(168, 208, 'uuid')

  // "xts-plain64", "cbc-essiv:sha256": the mode, then the IV generator and its hash
  const dash = cipherMode.indexOf('-')
  const mode = dash < 0 ? cipherMode : cipherMode.slice(0, dash)
  const ivgenSpec = dash < 0 ? '' : cipherMode.slice(dash + 1)
  const colon = ivgenSpec.indexOf(':')
  const ivgen = colon < 0 ? ivgenSpec : ivgenSpec.slice(0, colon)
  const ivgenHash = colon < 0 ? undefined : ivgenSpec.slice(colon + 1)
  if (!MODES.includes(mode)) unsupported(`cipher mode '${cipherMode}' is not supported`)
  if (!IVGENS.includes(ivgen)) unsupported(`IV generator '${ivgenSpec}' is not supported`)
  if (ivgenHash !== undefined && !HASHES.includes(ivgenHash)) unsupported(`IV generator hash '${ivgenHash}' is not supported`)
  if (!HASHES.includes(hashSpec)) unsupported(`hash '${hashSpec}' is not supported`)
  const cipherKeyBytes = mode === 'xts' ? keyBytes / 2 : keyBytes
  const sizes = CIPHERS[cipherName]
  if (!sizes || !sizes.includes(cipherKeyBytes)) unsupported(`Algorithm '${cipherName}' with key size ${cipherKeyBytes} bytes not supported`)
  const cipherAlg = cipherName === 'sm4' ? 'sm4' : `${cipherName}-${cipherKeyBytes * 8}`

  const slots: Array<Record<string, unknown>> = []
  for (let i = 0; i < 8; i++) {
    const s = 208 + i * 48
    const active = u32be(b, s) === SLOT_ACTIVE
    const keyOffset = u32be(b, s + 40) * SECTOR
    slots.push(active ? { active, iters: u32be(b, s + 4), 'key-offset': keyOffset, stripes: u32be(b, s + 44) } : { active, 'key-offset': keyOffset })
  }
  const out: Record<string, unknown> = { 'ivgen-alg': ivgen, 'hash-alg': hashSpec, 'cipher-alg': cipherAlg, uuid }
  if (ivgenHash !== undefined) out['ivgen-hash-alg'] = ivgenHash
  out['format'] = 'luks'
  out['cipher-mode'] = mode
  out['slots'] = slots
  out['payload-offset'] = payloadOffset * SECTOR
  out['master-key-iters'] = digestIters
  return out
}
