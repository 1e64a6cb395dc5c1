/*
 * lseek(SEEK_DATA / SEEK_HOLE) for Node, which has no binding for it.
 * qemu-img reports host holes as zero ranges; this lets imgtool do the same.
 * seek(fd, offset, whence) -> new offset, or -errno (ENXIO past the last data).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <node_api.h>
#include <sys/types.h>
#include <unistd.h>

static napi_value do_seek(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  int32_t fd = -1, whence = 0;
  int64_t off = 0;
  napi_value out;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 3) return NULL;
  napi_get_value_int32(env, argv[0], &fd);
  napi_get_value_int64(env, argv[1], &off);
  napi_get_value_int32(env, argv[2], &whence);
#if defined(SEEK_DATA) && defined(SEEK_HOLE)
  off_t r = lseek(fd, (off_t)off, whence == 0 ? SEEK_DATA : SEEK_HOLE);
  napi_create_int64(env, r < 0 ? -(int64_t)errno : (int64_t)r, &out);
#else
  napi_create_int64(env, -(int64_t)ENOSYS, &out);
#endif
  return out;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_value fn;
  napi_create_function(env, "seek", NAPI_AUTO_LENGTH, do_seek, NULL, &fn);
  napi_set_named_property(env, exports, "seek", fn);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
