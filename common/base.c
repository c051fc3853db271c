/* base.c - error names, allocation wrappers and small helpers (base.h).
 * Stateless and thread-safe. */
#include "base.h"

#include <errno.h>
#include <malloc.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <pthread.h>
#include <signal.h>
#include <sodium.h>

const char *sp_strerror(int code)
{
    switch (code) {
    case SP_OK: return "success";
    case SP_EINVAL: return "invalid input";
    case SP_ENOTFOUND: return "not found";
    case SP_ECONFLICT: return "conflict: same SOP Instance UID with different content";
    case SP_EDIGEST: return "digest mismatch (corrupt data)";
    case SP_ETIMEOUT: return "deadline exceeded";
    case SP_EPROTO: return "malformed or unexpected message";
    case SP_ETOOBIG: return "over the size limit";
    case SP_EDB: return "database error";
    case SP_ECONFIG: return "configuration error";
    case SP_EKEY: return "key file error";
    case SP_EUNAVAIL: return "peer unavailable";
    case SP_EUNKNOWN: return "unknown request";
    case SP_ELIMIT: return "result limit reached";
    case SP_EREMOTE: return "peer reported an error";
    case SP_ENOSPACE: return "no space left on device";
    case SP_EDENIED: return "not authorized";
    default: break;
    }
    if (code < 0 && code > -10000)
        return strerror(-code);
    return "unknown error";
}

void sp_assert_fail(const char *cond, const char *file, int line, const char *func)
{
    fprintf(stderr, "shardpacs: %s:%d: %s: invariant '%s' failed\n", file, line, func, cond);
    fflush(stderr);
    abort();
}

static void *check_alloc(void *p, size_t n)
{
    if (p == NULL && n != 0) {
        fprintf(stderr, "shardpacs: out of memory allocating %zu bytes\n", n);
        abort();
    }
    return p;
}

void *sp_malloc(size_t n)
{
    return check_alloc(malloc(n ? n : 1), n ? n : 1);
}

void *sp_calloc(size_t count, size_t n)
{
    return check_alloc(calloc(count ? count : 1, n ? n : 1), 1);
}

void *sp_realloc(void *p, size_t n)
{
    return check_alloc(realloc(p, n ? n : 1), 1);
}

char *sp_strdup(const char *s)
{
    return sp_strndup(s, strlen(s));
}

char *sp_strndup(const char *s, size_t n)
{
    size_t len = strnlen(s, n);
    char *d = sp_malloc(len + 1);
    memcpy(d, s, len);
    d[len] = '\0';
    return d;
}

void *sp_memdup(const void *p, size_t n)
{
    void *d = sp_malloc(n);
    if (n)
        memcpy(d, p, n);
    return d;
}

int64_t sp_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t sp_wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

bool sp_uid_valid(const char *uid)
{
    size_t len = uid ? strlen(uid) : 0;
    if (len == 0 || len > 64)
        return false;
    size_t comp_start = 0;
    for (size_t i = 0; i <= len; i++) {
        char c = uid[i];
        if (c == '.' || c == '\0') {
            size_t comp_len = i - comp_start;
            if (comp_len == 0)
                return false;
            if (comp_len > 1 && uid[comp_start] == '0')
                return false;
            comp_start = i + 1;
        } else if (c < '0' || c > '9') {
            return false;
        }
    }
    return true;
}

void sp_strlcpy(char *dst, const char *src, size_t dst_size)
{
    if (dst_size == 0)
        return;
    size_t n = strnlen(src, dst_size - 1);
    memcpy(dst, src, n);
    dst[n] = '\0';
}

char *sp_fmt(char *buf, size_t size, const char *fmt, ...)
{
    if (buf == NULL || size == 0)
        return buf;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, size, fmt, ap);
    va_end(ap);
    return buf;
}

void sp_hex(const uint8_t *in, size_t n, char *out)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[in[i] >> 4];
        out[2 * i + 1] = digits[in[i] & 15];
    }
    out[2 * n] = '\0';
}

static pthread_once_t sodium_once = PTHREAD_ONCE_INIT;

static void sodium_start(void)
{
    if (sodium_init() < 0) {
        fprintf(stderr, "shardpacs: libsodium failed to initialise\n");
        abort();
    }
}

void sp_digest(const void *data, size_t len, uint8_t out[SP_DIGEST_LEN])
{
    pthread_once(&sodium_once, sodium_start);
    crypto_generichash(out, SP_DIGEST_LEN, data, len, NULL, 0);
}

static void shutdown_signals(sigset_t *set)
{
    sigemptyset(set);
    sigaddset(set, SIGINT);
    sigaddset(set, SIGTERM);
}

void sp_signals_block(void)
{
    sigset_t set;
    shutdown_signals(&set);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);
}

int sp_cores(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : n > 1024 ? 1024 : (int)n;
}

void sp_malloc_tune(void)
{
    mallopt(M_MMAP_THRESHOLD, (int)SP_MALLOC_MMAP_BYTES);
    mallopt(M_TRIM_THRESHOLD, (int)SP_MALLOC_TRIM_BYTES);
}

int sp_signals_wait(void)
{
    sigset_t set;
    shutdown_signals(&set);
    int sig = 0;
    sigwait(&set, &sig);
    return sig;
}

sp_file_id_t sp_file_id_of(const struct stat *st)
{
    sp_file_id_t id;
    memset(&id, 0, sizeof id);
    id.dev = st->st_dev;
    id.ino = st->st_ino;
    id.size = st->st_size;
    id.mtim = st->st_mtim;
    return id;
}

sp_file_id_t sp_file_id_stat(const char *path)
{
    struct stat st;
    if (path != NULL && stat(path, &st) == 0)
        return sp_file_id_of(&st);
    sp_file_id_t id;
    memset(&id, 0, sizeof id);
    id.missing = true;
    id.err = path != NULL ? errno : ENOENT;
    return id;
}

bool sp_file_id_equal(const sp_file_id_t *a, const sp_file_id_t *b)
{
    if (a->missing || b->missing)
        return a->missing == b->missing && a->err == b->err;
    return a->dev == b->dev && a->ino == b->ino && a->size == b->size &&
           a->mtim.tv_sec == b->mtim.tv_sec && a->mtim.tv_nsec == b->mtim.tv_nsec;
}

int sp_write_all(int fd, const void *buf, size_t len)
{
    const char *p = buf;
    while (len > 0) {
        ssize_t n = write(fd, p, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}
