/*
 * Raw deflate of many clusters in one call, on a libuv thread, for convert -c.
 *
 * deflateClusters(input, offsets, clusterSize, level, windowBits, memLevel, out, sizes)
 *   -> a Promise of 0, or a zlib error code (< 0) when the stream could not be set up.
 *   Cluster i is input[offsets[i] .. offsets[i] + clusterSize); its deflate stream
 *   (raw, windowBits, memLevel, Z_DEFAULT_STRATEGY) goes to out[i * clusterSize ..]
 *   and sizes[i] gets its length, or -1 when it does not fit in clusterSize - 1
 *   bytes (QEMU then stores the cluster uncompressed: qcow2_compress's -ENOMEM).
 *
 * Linked against the system's static zlib when the build finds one (binding.gyp),
 * with its symbols kept local: the compressed bytes and the speed are those of the
 * zlib qemu-img uses. Without it, the calls bind to the zlib Node itself exports.
 */
#include <node_api.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  napi_ref refs[4]; /* input, offsets, out, sizes: alive until the work completes */
  const uint8_t *in;
  const int32_t *offsets;
  uint8_t *out;
  int32_t *sizes;
  size_t n;
  int32_t cs, level, wbits, memlevel;
  int32_t result;
} batch_req;

static void batch_execute(napi_env env, void *data) {
  (void)env;
  batch_req *r = (batch_req *)data;
  z_stream s;
  memset(&s, 0, sizeof s);
  int rc = deflateInit2(&s, r->level, Z_DEFLATED, -r->wbits, r->memlevel, Z_DEFAULT_STRATEGY);
  if (rc != Z_OK) {
    r->result = rc < 0 ? rc : -1;
    return;
  }
  for (size_t i = 0; i < r->n; i++) {
    if (i > 0) deflateReset(&s);
    s.next_in = (Bytef *)(r->in + r->offsets[i]);
    s.avail_in = (uInt)r->cs;
    s.next_out = r->out + i * (size_t)r->cs;
    s.avail_out = (uInt)(r->cs - 1);
    rc = deflate(&s, Z_FINISH);
    r->sizes[i] = rc == Z_STREAM_END ? (int32_t)(r->cs - 1 - (int32_t)s.avail_out) : -1;
  }
  deflateEnd(&s);
  r->result = 0;
}

static void batch_complete(napi_env env, napi_status status, void *data) {
  batch_req *r = (batch_req *)data;
  napi_value v;
  napi_create_int32(env, status == napi_ok ? r->result : -1, &v);
  napi_resolve_deferred(env, r->deferred, v);
  for (int k = 0; k < 4; k++) napi_delete_reference(env, r->refs[k]);
  napi_delete_async_work(env, r->work);
  free(r);
}

/* data pointer and byte length of a typed array of the given type */
static int typed(napi_env env, napi_value v, napi_typedarray_type want, void **ptr, size_t *bytes) {
  napi_typedarray_type t;
  size_t len = 0, off = 0;
  napi_value ab;
  void *p = NULL;
  if (napi_get_typedarray_info(env, v, &t, &len, &p, &ab, &off) != napi_ok || t != want) return 0;
  *ptr = p;
  *bytes = want == napi_int32_array ? len * 4 : len;
  return 1;
}

static napi_value fail(napi_env env, const char *msg) {
  napi_throw_type_error(env, NULL, msg);
  return NULL;
}

static napi_value do_deflate_clusters(napi_env env, napi_callback_info info) {
  size_t argc = 8;
  napi_value argv[8], promise, name;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 8) return fail(env, "deflateClusters: 8 arguments");
  void *in, *offs, *out, *sizes;
  size_t in_len, offs_len, out_len, sizes_len;
  int32_t cs, level, wbits, memlevel;
  if (!typed(env, argv[0], napi_uint8_array, &in, &in_len) || !typed(env, argv[1], napi_int32_array, &offs, &offs_len) ||
      napi_get_value_int32(env, argv[2], &cs) != napi_ok || napi_get_value_int32(env, argv[3], &level) != napi_ok ||
      napi_get_value_int32(env, argv[4], &wbits) != napi_ok || napi_get_value_int32(env, argv[5], &memlevel) != napi_ok ||
      !typed(env, argv[6], napi_uint8_array, &out, &out_len) || !typed(env, argv[7], napi_int32_array, &sizes, &sizes_len)) {
    return fail(env, "deflateClusters: (Uint8Array, Int32Array, int, int, int, int, Uint8Array, Int32Array)");
  }
  size_t n = offs_len / 4;
  if (cs < 512 || wbits < 9 || wbits > 15 || memlevel < 1 || memlevel > 9 || level < -1 || level > 9) return fail(env, "deflateClusters: bad parameters");
  if (out_len < n * (size_t)cs || sizes_len < n * 4) return fail(env, "deflateClusters: output too small");
  for (size_t i = 0; i < n; i++) {
    int32_t o = ((const int32_t *)offs)[i];
    if (o < 0 || (size_t)o + (size_t)cs > in_len) return fail(env, "deflateClusters: offset outside the input");
  }
  batch_req *r = (batch_req *)calloc(1, sizeof *r);
  if (!r) return fail(env, "deflateClusters: out of memory");
  r->in = (const uint8_t *)in;
  r->offsets = (const int32_t *)offs;
  r->out = (uint8_t *)out;
  r->sizes = (int32_t *)sizes;
  r->n = n;
  r->cs = cs;
  r->level = level;
  r->wbits = wbits;
  r->memlevel = memlevel;
  const int which[4] = {0, 1, 6, 7};
  for (int k = 0; k < 4; k++) napi_create_reference(env, argv[which[k]], 1, &r->refs[k]);
  if (napi_create_promise(env, &r->deferred, &promise) != napi_ok) {
    for (int k = 0; k < 4; k++) napi_delete_reference(env, r->refs[k]);
    free(r);
    return fail(env, "deflateClusters: no promise");
  }
  napi_create_string_utf8(env, "imgtool.deflateClusters", NAPI_AUTO_LENGTH, &name);
  if (napi_create_async_work(env, NULL, name, batch_execute, batch_complete, r, &r->work) != napi_ok || napi_queue_async_work(env, r->work) != napi_ok) {
    napi_value v;
    napi_create_int32(env, -4, &v); /* Z_MEM_ERROR */
    napi_resolve_deferred(env, r->deferred, v);
    for (int k = 0; k < 4; k++) napi_delete_reference(env, r->refs[k]);
    free(r);
  }
  return promise;
}

static napi_value do_zlib_version(napi_env env, napi_callback_info info) {
  (void)info;
  napi_value v;
  napi_create_string_utf8(env, zlibVersion(), NAPI_AUTO_LENGTH, &v);
  return v;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_value fn;
  napi_create_function(env, "deflateClusters", NAPI_AUTO_LENGTH, do_deflate_clusters, NULL, &fn);
  napi_set_named_property(env, exports, "deflateClusters", fn);
  napi_create_function(env, "zlibVersion", NAPI_AUTO_LENGTH, do_zlib_version, NULL, &fn);
  napi_set_named_property(env, exports, "zlibVersion", fn);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
