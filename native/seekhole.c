/*
 * File-offset primitives Node has no binding for.
 *
 * seek(fd, offset, whence) -> lseek(SEEK_DATA / SEEK_HOLE): whence 0 = SEEK_DATA,
 *   1 = SEEK_HOLE; the new offset, or -errno (ENXIO past the last data).
 *   qemu-img reports host holes as zero ranges; this lets imgtool do the same.
 * lseek(fd, offset, whence) -> plain lseek: whence 0 = SEEK_SET, 1 = SEEK_CUR,
 *   2 = SEEK_END; the new offset, or -errno. cat uses it to learn where the
 *   shell's stdout file stands and to leave it at the end of what it wrote.
 * getfl(fd) -> fcntl(fd, F_GETFL): the status flags, or -errno.
 * O_APPEND -> this platform's O_APPEND bit (positional writes to an append-mode
 *   file land at its end on Linux, so cat must not use them there).
 * copyRange(fdIn, offIn, fdOut, offOut, length) -> a Promise of the bytes copied
 *   (fewer at the end of the input file) or -errno, by copy_file_range(2) on a
 *   libuv thread: the kernel moves page-cache pages from one file to the other
 *   with one copy instead of read()'s and write()'s two. -ENOSYS where there is
 *   no copy_file_range.
 * fallocate(fd, offset, length) -> a Promise of 0 or -errno, by fallocate(2)
 *   with mode 0 on a libuv thread: the range gets blocks without any data being
 *   written (it reads as zeros where nothing was), and the file grows to cover
 *   it. -EOPNOTSUPP where the filesystem cannot, -ENOSYS off Linux; the caller
 *   decides what to do then (qemu-img's posix_fallocate lets glibc write zeros).
 * ofdLock(fd, byte, lock) -> fcntl(F_OFD_SETLK) of the single byte `byte`:
 *   a shared (read) lock when `lock` is true, an unlock when false; 0 or
 *   -errno (-EAGAIN / -EACCES when another open file holds a conflicting lock).
 *   Open-file-description locks belong to the open file, not the process, so
 *   two opens of one file in one process conflict as two processes would.
 * ofdTest(fd, byte) -> fcntl(F_OFD_GETLK) asking for an exclusive lock on the
 *   byte: 0 when no other open file holds a lock there, 1 when one does,
 *   -errno on failure. Locks held through `fd`'s own open file never count.
 *   Together these are the primitives of QEMU's image locking (bytes 100+n
 *   and 200+n of the image, see src/io/lock.ts). -ENOSYS where the platform
 *   has no OFD locks.
 * dup(fd) -> fcntl(F_DUPFD_CLOEXEC): a second descriptor on the same open file
 *   (which keeps its locks alive after the first is closed), or -errno.
 * close(fd) -> close(2): 0 or -errno.
 * clearNonblock(fd) -> clears O_NONBLOCK (images are opened with it so that a
 *   FIFO cannot block open(2)); 0 or -errno.
 * copySparse(fdIn, offIn, fdOut, offOut, length, block) -> a Promise, on a
 *   libuv thread: pread `length` bytes at offIn (zeros past the input's end),
 *   then pwrite at offOut only the runs of `block`-sized blocks (aligned to
 *   offOut, as convert's -S) that hold a non-zero byte: convert's read, zero
 *   scan and write of one chunk into a raw target with no JavaScript buffer.
 *   The bytes written (>= 0), -errno for a failed read, or -(4096 + errno)
 *   for a failed write. The chunk is read into a buffer of the thread's own,
 *   kept for the thread's life (libuv's pool threads live as long as the
 *   process), so a 2 MiB chunk costs no allocation and no fresh pages.
 *
 * copySparse's writes and copyRange run under a lock of the target descriptor
 * (one of 16, by fd): two pool threads writing one file at once contend for
 * its inode lock, and the kernel spins waiting for it (rwsem_spin_on_owner:
 * 11-34% of all CPU samples of a 4 GiB convert or cat under perf). Reads still
 * run ahead on the other threads; the writes go one at a time, as qemu-img's
 * in-order convert issues them.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <node_api.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

/* fd, offset, whence from the three arguments; 0 when they are not numbers */
static int get_args(napi_env env, napi_callback_info info, size_t want, int32_t *fd, int64_t *off, int32_t *whence) {
  size_t argc = 3;
  napi_value argv[3];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < want) return 0;
  if (napi_get_value_int32(env, argv[0], fd) != napi_ok) return 0;
  if (want >= 2 && napi_get_value_int64(env, argv[1], off) != napi_ok) return 0;
  if (want >= 3 && napi_get_value_int32(env, argv[2], whence) != napi_ok) return 0;
  return 1;
}

static napi_value result(napi_env env, int64_t r) {
  napi_value out;
  napi_create_int64(env, r < 0 ? -(int64_t)errno : r, &out);
  return out;
}

static napi_value einval(napi_env env) {
  napi_value out;
  napi_create_int64(env, -(int64_t)EINVAL, &out);
  return out;
}

static napi_value do_seek(napi_env env, napi_callback_info info) {
  int32_t fd = -1, whence = 0;
  int64_t off = 0;
  if (!get_args(env, info, 3, &fd, &off, &whence)) return NULL;
#if defined(SEEK_DATA) && defined(SEEK_HOLE)
  return result(env, (int64_t)lseek(fd, (off_t)off, whence == 0 ? SEEK_DATA : SEEK_HOLE));
#else
  napi_value out;
  napi_create_int64(env, -(int64_t)ENOSYS, &out);
  return out;
#endif
}

static napi_value do_lseek(napi_env env, napi_callback_info info) {
  int32_t fd = -1, whence = 0;
  int64_t off = 0;
  if (!get_args(env, info, 3, &fd, &off, &whence)) return einval(env);
  int w;
  switch (whence) {
    case 0: w = SEEK_SET; break;
    case 1: w = SEEK_CUR; break;
    case 2: w = SEEK_END; break;
    default: return einval(env);
  }
  return result(env, (int64_t)lseek(fd, (off_t)off, w));
}

static napi_value do_getfl(napi_env env, napi_callback_info info) {
  int32_t fd = -1;
  if (!get_args(env, info, 1, &fd, NULL, NULL)) return einval(env);
  return result(env, (int64_t)fcntl(fd, F_GETFL));
}

static int32_t arg_i32(napi_env env, napi_value v, int *ok) {
  int32_t x = 0;
  if (napi_get_value_int32(env, v, &x) != napi_ok) *ok = 0;
  return x;
}

static napi_value do_ofd_lock(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  int ok = 1;
  bool lock = false;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 3) return einval(env);
  int32_t fd = arg_i32(env, argv[0], &ok), byte = arg_i32(env, argv[1], &ok);
  if (!ok || byte < 0 || napi_get_value_bool(env, argv[2], &lock) != napi_ok) return einval(env);
#if defined(F_OFD_SETLK)
  struct flock fl = {0};
  fl.l_type = lock ? F_RDLCK : F_UNLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = byte;
  fl.l_len = 1;
  int rc;
  do {
    rc = fcntl(fd, F_OFD_SETLK, &fl);
  } while (rc < 0 && errno == EINTR);
  return result(env, rc);
#else
  (void)fd;
  napi_value out;
  napi_create_int64(env, -(int64_t)ENOSYS, &out);
  return out;
#endif
}

static napi_value do_ofd_test(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  int ok = 1;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 2) return einval(env);
  int32_t fd = arg_i32(env, argv[0], &ok), byte = arg_i32(env, argv[1], &ok);
  if (!ok || byte < 0) return einval(env);
#if defined(F_OFD_GETLK)
  struct flock fl = {0};
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = byte;
  fl.l_len = 1;
  int rc;
  do {
    rc = fcntl(fd, F_OFD_GETLK, &fl);
  } while (rc < 0 && errno == EINTR);
  if (rc < 0) return result(env, -1);
  return result(env, fl.l_type == F_UNLCK ? 0 : 1);
#else
  (void)fd;
  napi_value out;
  napi_create_int64(env, -(int64_t)ENOSYS, &out);
  return out;
#endif
}

static napi_value do_dup(napi_env env, napi_callback_info info) {
  int32_t fd = -1;
  if (!get_args(env, info, 1, &fd, NULL, NULL)) return einval(env);
  return result(env, (int64_t)fcntl(fd, F_DUPFD_CLOEXEC, 0));
}

static napi_value do_close(napi_env env, napi_callback_info info) {
  int32_t fd = -1;
  if (!get_args(env, info, 1, &fd, NULL, NULL)) return einval(env);
  return result(env, (int64_t)close(fd));
}

static napi_value do_clear_nonblock(napi_env env, napi_callback_info info) {
  int32_t fd = -1;
  if (!get_args(env, info, 1, &fd, NULL, NULL)) return einval(env);
  int fl = fcntl(fd, F_GETFL);
  if (fl < 0) return result(env, -1);
  if (!(fl & O_NONBLOCK)) return result(env, 0);
  return result(env, (int64_t)fcntl(fd, F_SETFL, fl & ~O_NONBLOCK));
}

/*
 * copyRange and fallocate: one request shape, run on a libuv thread, settling a
 * Promise of an int64 (bytes copied / 0, or -errno).
 */
typedef enum { OP_COPY, OP_FALLOC, OP_SPARSE } op_kind;

typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  op_kind op;
  int32_t fd_in, fd_out; /* fallocate: fd_out */
  int64_t off_in, off_out, len;
  int64_t block; /* copySparse: the zero-detection block */
  int64_t result;
} io_req;

/* Largest copySparse chunk: convert's chunks are 2 MiB (cluster-rounded); anything larger is refused. */
#define SPARSE_MAX (64 * 1024 * 1024)
#define WRITE_ERR 4096

/* The writers' locks, by target descriptor (see the header). */
#define WRITE_LOCKS 16
static pthread_mutex_t write_locks[WRITE_LOCKS] = {
    PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER,
    PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER,
    PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER,
    PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER,
};
static pthread_mutex_t *write_lock(int fd) { return &write_locks[(unsigned)fd % WRITE_LOCKS]; }

/* all `n` bytes at p zero: the first byte, then p against itself shifted by one (glibc's vector memcmp) */
static int all_zero(const unsigned char *p, size_t n) {
  if (n == 0) return 1;
  if (p[0] != 0 || p[n - 1] != 0) return 0;
  return memcmp(p, p + 1, n - 1) == 0;
}

static int64_t write_all(int fd, const unsigned char *p, int64_t n, int64_t off) {
  int64_t done = 0;
  while (done < n) {
    ssize_t w = pwrite(fd, p + done, (size_t)(n - done), (off_t)(off + done));
    if (w < 0) {
      if (errno == EINTR) continue;
      return -(int64_t)(WRITE_ERR + errno);
    }
    if (w == 0) return -(int64_t)(WRITE_ERR + EIO);
    done += w;
  }
  return 0;
}

static int64_t sparse_write(const io_req *r, const unsigned char *buf);

static void sparse_execute(io_req *r) {
  static __thread unsigned char *buf;
  static __thread size_t cap;
  if ((size_t)r->len > cap) {
    unsigned char *b = (unsigned char *)realloc(buf, (size_t)r->len);
    if (!b) {
      r->result = -(int64_t)ENOMEM;
      return;
    }
    buf = b;
    cap = (size_t)r->len;
  }
  int64_t got = 0;
  while (got < r->len) {
    ssize_t n = pread(r->fd_in, buf + got, (size_t)(r->len - got), (off_t)(r->off_in + got));
    if (n < 0) {
      if (errno == EINTR) continue;
      r->result = -(int64_t)errno;
      return;
    }
    if (n == 0) break; /* the input ends: zeros, as the image layer reads past a host file's end */
    got += n;
  }
  if (got < r->len) memset(buf + got, 0, (size_t)(r->len - got));
  pthread_mutex_t *lock = write_lock(r->fd_out);
  pthread_mutex_lock(lock);
  r->result = sparse_write(r, buf);
  pthread_mutex_unlock(lock);
}

/* the runs of non-zero blocks of buf written at off_out: the bytes written, or -(WRITE_ERR + errno) */
static int64_t sparse_write(const io_req *r, const unsigned char *buf) {
  int64_t written = 0, run = -1, i = 0;
  while (i < r->len) {
    int64_t next = i + r->block - ((r->off_out + i) % r->block);
    if (next > r->len) next = r->len;
    if (all_zero(buf + i, (size_t)(next - i))) {
      if (run >= 0) {
        int64_t e = write_all(r->fd_out, buf + run, i - run, r->off_out + run);
        if (e < 0) return e;
        written += i - run;
        run = -1;
      }
    } else if (run < 0) run = i;
    i = next;
  }
  if (run >= 0) {
    int64_t e = write_all(r->fd_out, buf + run, r->len - run, r->off_out + run);
    if (e < 0) return e;
    written += r->len - run;
  }
  return written;
}

static void copy_range(io_req *r);

static void copy_execute(io_req *r) {
  pthread_mutex_t *lock = write_lock(r->fd_out);
  pthread_mutex_lock(lock);
  copy_range(r);
  pthread_mutex_unlock(lock);
}

static void copy_range(io_req *r) {
#if defined(__linux__)
  int64_t done = 0;
  while (done < r->len) {
    off_t in = (off_t)(r->off_in + done), out = (off_t)(r->off_out + done);
    ssize_t n = copy_file_range(r->fd_in, &in, r->fd_out, &out, (size_t)(r->len - done), 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (done == 0) {
        r->result = -(int64_t)errno;
        return;
      }
      break;
    }
    if (n == 0) break; /* end of the input file */
    done += n;
  }
  r->result = done;
#else
  r->result = -(int64_t)ENOSYS;
#endif
}

static void falloc_execute(io_req *r) {
#if defined(__linux__)
  int rc;
  do {
    rc = fallocate(r->fd_out, 0, (off_t)r->off_out, (off_t)r->len);
  } while (rc < 0 && errno == EINTR);
  r->result = rc < 0 ? -(int64_t)errno : 0;
#else
  r->result = -(int64_t)ENOSYS;
#endif
}

static void io_execute(napi_env env, void *data) {
  (void)env;
  io_req *r = (io_req *)data;
  if (r->op == OP_COPY) copy_execute(r);
  else if (r->op == OP_SPARSE) sparse_execute(r);
  else falloc_execute(r);
}

static void io_complete(napi_env env, napi_status status, void *data) {
  io_req *r = (io_req *)data;
  napi_value v;
  napi_create_int64(env, status == napi_ok ? r->result : -(int64_t)ECANCELED, &v);
  napi_resolve_deferred(env, r->deferred, v);
  napi_delete_async_work(env, r->work);
  free(r);
}

/* Queue `r` (its fields set); returns the Promise, or -EINVAL when no promise could be made. */
static napi_value io_queue(napi_env env, io_req *r, const char *what) {
  napi_value promise, name;
  if (napi_create_promise(env, &r->deferred, &promise) != napi_ok) {
    free(r);
    return einval(env);
  }
  napi_create_string_utf8(env, what, NAPI_AUTO_LENGTH, &name);
  if (napi_create_async_work(env, NULL, name, io_execute, io_complete, r, &r->work) != napi_ok || napi_queue_async_work(env, r->work) != napi_ok) {
    napi_value v;
    napi_create_int64(env, -(int64_t)ENOMEM, &v);
    napi_resolve_deferred(env, r->deferred, v);
    free(r);
  }
  return promise;
}

static napi_value do_copy_range(napi_env env, napi_callback_info info) {
  size_t argc = 5;
  napi_value argv[5];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 5) return einval(env);
  io_req *r = (io_req *)calloc(1, sizeof *r);
  if (!r) return einval(env);
  r->op = OP_COPY;
  if (napi_get_value_int32(env, argv[0], &r->fd_in) != napi_ok || napi_get_value_int64(env, argv[1], &r->off_in) != napi_ok ||
      napi_get_value_int32(env, argv[2], &r->fd_out) != napi_ok || napi_get_value_int64(env, argv[3], &r->off_out) != napi_ok ||
      napi_get_value_int64(env, argv[4], &r->len) != napi_ok || r->off_in < 0 || r->off_out < 0 || r->len < 0) {
    free(r);
    return einval(env);
  }
  return io_queue(env, r, "imgtool.copyRange");
}

static napi_value do_copy_sparse(napi_env env, napi_callback_info info) {
  size_t argc = 6;
  napi_value argv[6];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 6) return einval(env);
  io_req *r = (io_req *)calloc(1, sizeof *r);
  if (!r) return einval(env);
  r->op = OP_SPARSE;
  if (napi_get_value_int32(env, argv[0], &r->fd_in) != napi_ok || napi_get_value_int64(env, argv[1], &r->off_in) != napi_ok ||
      napi_get_value_int32(env, argv[2], &r->fd_out) != napi_ok || napi_get_value_int64(env, argv[3], &r->off_out) != napi_ok ||
      napi_get_value_int64(env, argv[4], &r->len) != napi_ok || napi_get_value_int64(env, argv[5], &r->block) != napi_ok || r->off_in < 0 ||
      r->off_out < 0 || r->len <= 0 || r->len > SPARSE_MAX || r->block <= 0) {
    free(r);
    return einval(env);
  }
  return io_queue(env, r, "imgtool.copySparse");
}

static napi_value do_fallocate(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 3) return einval(env);
  io_req *r = (io_req *)calloc(1, sizeof *r);
  if (!r) return einval(env);
  r->op = OP_FALLOC;
  if (napi_get_value_int32(env, argv[0], &r->fd_out) != napi_ok || napi_get_value_int64(env, argv[1], &r->off_out) != napi_ok ||
      napi_get_value_int64(env, argv[2], &r->len) != napi_ok || r->off_out < 0 || r->len <= 0) {
    free(r);
    return einval(env);
  }
  return io_queue(env, r, "imgtool.fallocate");
}

static void export_fn(napi_env env, napi_value exports, const char *name, napi_callback cb) {
  napi_value fn;
  napi_create_function(env, name, NAPI_AUTO_LENGTH, cb, NULL, &fn);
  napi_set_named_property(env, exports, name, fn);
}

static napi_value init(napi_env env, napi_value exports) {
  napi_value v;
  export_fn(env, exports, "seek", do_seek);
  export_fn(env, exports, "lseek", do_lseek);
  export_fn(env, exports, "getfl", do_getfl);
  export_fn(env, exports, "copyRange", do_copy_range);
  export_fn(env, exports, "fallocate", do_fallocate);
  export_fn(env, exports, "copySparse", do_copy_sparse);
  export_fn(env, exports, "ofdLock", do_ofd_lock);
  export_fn(env, exports, "ofdTest", do_ofd_test);
  export_fn(env, exports, "dup", do_dup);
  export_fn(env, exports, "close", do_close);
  export_fn(env, exports, "clearNonblock", do_clear_nonblock);
  napi_create_int32(env, O_APPEND, &v);
  napi_set_named_property(env, exports, "O_APPEND", v);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
