/* base.h - error codes, allocation wrappers and small helpers shared by every
 * ShardPACS component.
 *
 * Error convention: functions return 0 on success or a
 * negative code on failure. System errors are returned as -errno; project
 * errors use the SP_E* codes below, all of which lie below -10000 so they
 * never collide with an errno. sp_strerror() names either kind.
 *
 * The allocation wrappers abort the process on out-of-memory, so callers
 * never need an error path for allocation. Everything here is thread-safe. */
#ifndef SP_BASE_H
#define SP_BASE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/stat.h>
#include <time.h>

enum {
    SP_OK = 0,
    SP_EINVAL = -10001,    /* bad input: malformed value, missing field */
    SP_ENOTFOUND = -10002, /* no such object */
    SP_ECONFLICT = -10003, /* same SOP Instance UID, different bytes */
    SP_EDIGEST = -10004,   /* stored or received bytes fail their digest */
    SP_ETIMEOUT = -10005,  /* deadline passed */
    SP_EPROTO = -10006,    /* malformed or unexpected message */
    SP_ETOOBIG = -10007,   /* message or object over the configured limit */
    SP_EDB = -10008,       /* RocksDB reported an error */
    SP_ECONFIG = -10009,   /* configuration file problem */
    SP_EKEY = -10010,      /* key file missing, malformed or unsafe */
    SP_EUNAVAIL = -10011,  /* peer not reachable */
    SP_EUNKNOWN = -10012,  /* unknown request type */
    SP_ELIMIT = -10013,    /* result cap reached */
    SP_EREMOTE = -10014,   /* peer answered with an error */
    SP_ENOSPACE = -10015,  /* disk full */
    SP_EDENIED = -10016,   /* the caller's role or access rule does not allow it */
};

/* Returns a static description of a code from either family. */
const char *sp_strerror(int code);

/* Allocation wrappers: abort with a message on out-of-memory. */
void *sp_malloc(size_t n);
void *sp_calloc(size_t count, size_t n);
void *sp_realloc(void *p, size_t n);
char *sp_strdup(const char *s);
char *sp_strndup(const char *s, size_t n);
void *sp_memdup(const void *p, size_t n);

/* Monotonic clock in milliseconds, for deadlines and intervals. */
int64_t sp_now_ms(void);
/* Wall clock in milliseconds since the epoch, for logs and records. */
int64_t sp_wall_ms(void);

/* A DICOM UID per PS3.5 9.1: 1..64 characters of digits and dots, no empty
 * component, no leading zero in a multi-digit component. */
bool sp_uid_valid(const char *uid);

/* Copies at most dst_size-1 bytes of src into dst and terminates it. */
void sp_strlcpy(char *dst, const char *src, size_t dst_size);

/* Formats into a caller buffer, always terminated; returns the buffer. A
 * NULL buffer or a size of 0 formats nothing (optional error buffers). */
char *sp_fmt(char *buf, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* What tells one version of a file from another (files re-read when they
 * change: cluster.keys, access rules, TLS certificates). A path that could
 * not be stat'ed has missing set and the errno in err. */
typedef struct {
    bool missing;
    int err;
    dev_t dev;
    ino_t ino;
    off_t size;
    struct timespec mtim;
} sp_file_id_t;

/* The identity of what st describes, or of what path names now. */
sp_file_id_t sp_file_id_of(const struct stat *st);
sp_file_id_t sp_file_id_stat(const char *path);
/* Same version: same device, inode, size and modification time (two
 * missing files: the same errno). */
bool sp_file_id_equal(const sp_file_id_t *a, const sp_file_id_t *b);

/* Writes all of buf to fd, going on after short writes and EINTR.
 * Returns 0 or -errno. */
int sp_write_all(int fd, const void *buf, size_t len);

/* Lower-case hex of n bytes into out (2n+1 bytes). */
void sp_hex(const uint8_t *in, size_t n, char *out);

#define SP_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

/* An invariant of ShardPACS's own code: always checked (release builds
 * too), and on failure prints file:line and the condition, then aborts.
 * Never for anything that came from the network, a file or a peer: that is
 * validated and turned into an error code. */
#define SP_ASSERT(cond) ((cond) ? (void)0 : sp_assert_fail(#cond, __FILE__, __LINE__, __func__))
void sp_assert_fail(const char *cond, const char *file, int line, const char *func)
    __attribute__((noreturn));

/* Daemon signal handling. sp_signals_block() must run in main() before any
 * thread starts: it blocks SIGINT and SIGTERM (every thread inherits the mask,
 * so only sp_signals_wait() sees them) and ignores SIGPIPE (a peer closing a
 * socket must not kill the process). sp_signals_wait() blocks the calling
 * thread until SIGINT or SIGTERM arrives and returns its number. */
void sp_signals_block(void);
int sp_signals_wait(void);

/* Daemon memory policy, called once in main() before any thread starts.
 * Objects of up to a few MiB are allocated and freed per request (received
 * data sets, ZeroMQ's CURVE buffers, joined bodies): with glibc's defaults
 * each is a fresh mmap or a heap grown and trimmed again, i.e. page faults
 * and page clearing on every byte of every object. Keeping them in the heap
 * (mmap only from SP_MALLOC_MMAP_BYTES, trim only past SP_MALLOC_TRIM_BYTES
 * of free top) lets the next request reuse the same pages. */
#define SP_MALLOC_MMAP_BYTES (32u << 20)
#define SP_MALLOC_TRIM_BYTES (128u << 20)
void sp_malloc_tune(void);

/* Cores this process may run on (at least 1): what thread pools that do
 * per-byte work (ZeroMQ I/O threads, RocksDB background jobs, retrieval
 * fetchers) are sized from. */
int sp_cores(void);

/* BLAKE2b-256 (libsodium crypto_generichash), the digest every stored object
 * carries. Thread-safe; initialises libsodium on first use. */
#define SP_DIGEST_LEN 32
void sp_digest(const void *data, size_t len, uint8_t out[SP_DIGEST_LEN]);
#endif
