/* store.c - a storage node's objects and indexes in one RocksDB database
 * (store.h).
 *
 * Any thread may call any function once store_open() has returned; the
 * store_t owns the database, its column family handles, the block cache,
 * two arrays of striped mutexes, the study gates and the per-partition
 * summary cache. Puts (and repairs) of the same SOP Instance UID are
 * serialised by a SOP stripe; the first put of a new study also holds a
 * study stripe so the study record and its secondary entries are written
 * exactly once. Every put also passes its study's gate (a striped
 * shared/exclusive lock) that store_delete_partition() and
 * store_delete_study_if() close while they delete that study. No lock on
 * the write path is global and none is held while RocksDB is read for a
 * query or a scrub, so puts of different instances reach rocksdb_write()
 * concurrently and share fsyncs through RocksDB's group commit. The one
 * store-wide lock guards the summary cache and is never held across a
 * database read.
 *
 * Write amplification: with the WAL on, every object is written twice on
 * the way in - once to the WAL (synced before the put returns), once to a
 * blob file when the memtable is flushed - so a large image costs ~2 bytes
 * of disk writes per byte stored, plus a small index share. Compaction moves
 * only the small blob references, except that blob GC (on, age cutoff 0.25)
 * relocates the still-valid blobs of the oldest quarter of blob files when
 * compaction reaches their references. That is pure cost while nothing is
 * deleted, and pays off once partitions handed to other nodes are deleted;
 * the cutoff (or GC off until deletes exist) is the knob. Getting near 1
 * byte per byte needs objects written once (e.g. object or blob files synced
 * before a WAL record that only references them). Measuring it is a later
 * step. */
#define _GNU_SOURCE /* O_DIRECT */
#include "store.h"

#include "../common/log.h"
#include "../common/match.h"
#include "../common/part10.h"

#include <rocksdb/c.h>
#include <sodium.h>

#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/stat.h>
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Format of the database as a whole (meta "format") and of one index record. */
#define STORE_FORMAT "1"
#define REC_VERSION 1
#define REC_VERSION_VERSIONED 2 /* instance records with a put version and policy */
#define CONFLICT_VERSION 1

#define LOCK_STRIPES 1024
#define PARTITIONS 65536u /* partition numbers are two key bytes */
#define BLOB_FILE_BYTES (256u << 20)

/* Longest attribute value a record accepts (PS3.5's longest indexed VR, LT,
 * is 10240 characters; the margin is for UTF-8 conversion). */
#define MAX_VALUE_LEN 65535u

/* Longest partition + three UIDs + separators, as in keys and cursors. */
#define LOC_MAX (2 + 3 * 65)

/* A find callback asked to stop: not an error. */
#define FIND_STOP 1

enum { CF_DEFAULT, CF_OBJECTS, CF_INDEX, CF_SECONDARY, CF_CONFLICTS, CF_META, CF_COUNT };

static const char *const cf_names[CF_COUNT] = {"default",   "objects",   "index",
                                               "secondary", "conflicts", "meta"};

/* A shared/exclusive lock that prefers the exclusive side: once a deleter
 * waits, new puts of the stripe wait behind it, so a steady stream of puts
 * cannot starve a partition deletion. (glibc's rwlock prefers readers unless
 * a GNU extension is used.) */
typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    unsigned readers;         /* puts inside */
    unsigned writers_waiting; /* deleters waiting to close it */
    bool writer;              /* closed by a deleter */
} gate_t;

/* The summary of one partition, kept current by every write (sum_add); a
 * partition with an unreadable instance record reports SP_EDB instead. */
typedef struct {
    bool corrupt;
    store_partition_summary_t sum;
} sum_cache_t;

struct store {
    rocksdb_t *db;
    rocksdb_column_family_handle_t *cf[CF_COUNT];
    rocksdb_cache_t *cache;
    rocksdb_writeoptions_t *wo_sync;  /* shared: RocksDB only reads it */
    rocksdb_readoptions_t *ro;        /* shared default read options */
    rocksdb_readoptions_t *ro_object; /* object reads: BLAKE2b replaces RocksDB's CRC */
    char *path;
    /* Check-then-write of one SOP Instance UID, and creation of one study. */
    pthread_mutex_t sop_locks[LOCK_STRIPES];
    pthread_mutex_t study_locks[LOCK_STRIPES];
    /* Puts of a study pass its gate shared; store_delete_partition() closes
     * it (exclusive) while it deletes the study. */
    gate_t study_gates[LOCK_STRIPES];
    /* Summaries for anti-entropy rounds (store_partition_summaries),
     * computed once at open and then updated by every write that changes a
     * partition's instances (under sum_lock), so no round rescans a
     * partition: that made ingest slower as the archive grew. */
    sum_cache_t *sums;
    pthread_mutex_t sum_lock;
    _Atomic uint64_t instances;
    _Atomic uint64_t bytes;
    _Atomic uint64_t studies;
    _Atomic uint64_t conflicts;
    _Atomic uint64_t conflicts_refused;
    _Atomic uint64_t corrupt_reads;
    _Atomic uint64_t object_bytes_read; /* object bytes read from the objects family */
    _Atomic uint64_t metadata_rebuilt;  /* 'M' records derived at read time */
    int max_conflicts;                  /* store_config_t.max_conflicts, read-only after open */
    _Atomic int blob_gc;             /* blob GC of the object families: -1 unknown, 0 off, 1 on */
    _Atomic int64_t blob_gc_hold_ms; /* after a delete, GC stays on until then */
};

/* The secondary indexes on study attributes: type byte and attribute. */
static const struct {
    char type;
    attr_id_t id;
} sec_indexes[] = {
    {'p', ATTR_PATIENT_ID},
    {'n', ATTR_PATIENT_NAME},
    {'d', ATTR_STUDY_DATE},
    {'a', ATTR_ACCESSION_NUMBER},
};

void store_config_defaults(store_config_t *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->blob_min_bytes = 2u << 10;
    cfg->write_buffer_bytes = 64u << 20;
    cfg->block_cache_bytes = 128u << 20;
    cfg->background_jobs = 0; /* store_open: one per core, at least 2 */
    cfg->max_conflicts = 4;
}

const char *store_policy_name(store_policy_t policy)
{
    switch (policy) {
    case STORE_POLICY_REJECT: return "reject";
    case STORE_POLICY_KEEP_FIRST: return "keep-first";
    case STORE_POLICY_KEEP_NEWEST: return "keep-newest";
    default: return "unset";
    }
}

int store_version_cmp(uint64_t va, const uint8_t *da, uint64_t vb, const uint8_t *db)
{
    if (va != vb)
        return va < vb ? -1 : 1;
    return memcmp(da, db, SP_DIGEST_LEN);
}

bool store_version_wins(store_policy_t policy, uint64_t v, const uint8_t *d, uint64_t sv,
                        const uint8_t *sd)
{
    if (policy == STORE_POLICY_UNSET || v == 0)
        return false; /* an unversioned put never displaces anything, as before versions */
    int c = store_version_cmp(v, d, sv, sd);
    return policy == STORE_POLICY_KEEP_NEWEST ? c > 0 : c < 0;
}

/* ---- byte buffers, keys --------------------------------------------- */

/* A growable byte string for keys and values; not NUL-terminated. */
typedef struct {
    char *p;
    size_t len, cap;
} buf_t;

static void buf_add(buf_t *b, const void *p, size_t n)
{
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap < b->len + n)
            cap *= 2;
        b->p = sp_realloc(b->p, cap);
        b->cap = cap;
    }
    if (n)
        memcpy(b->p + b->len, p, n);
    b->len += n;
}

static void buf_byte(buf_t *b, unsigned c)
{
    char ch = (char)(unsigned char)c;
    buf_add(b, &ch, 1);
}

static void buf_str(buf_t *b, const char *s)
{
    buf_add(b, s, strlen(s));
}

static void buf_varint(buf_t *b, uint64_t v)
{
    while (v >= 0x80) {
        buf_byte(b, (unsigned)(v & 0x7f) | 0x80);
        v >>= 7;
    }
    buf_byte(b, (unsigned)v);
}

static void buf_part(buf_t *b, uint32_t part)
{
    SP_ASSERT(part < PARTITIONS); /* two key bytes; callers validate what peers send */
    buf_byte(b, (part >> 8) & 0xff);
    buf_byte(b, part & 0xff);
}

static void buf_free(buf_t *b)
{
    free(b->p);
    memset(b, 0, sizeof *b);
}

/* Bytewise order, as RocksDB's default comparator. */
static int bytes_cmp(const char *a, size_t an, const char *b, size_t bn)
{
    int c = memcmp(a, b, an < bn ? an : bn);
    if (c != 0)
        return c;
    return an < bn ? -1 : an > bn;
}

/* Sets b to the smallest key greater than every key starting with prefix.
 * Returns false when there is none (prefix empty or all 0xff). */
static bool prefix_end(buf_t *b, const char *prefix, size_t n)
{
    b->len = 0;
    while (n > 0 && (unsigned char)prefix[n - 1] == 0xff)
        n--;
    if (n == 0)
        return false;
    buf_add(b, prefix, n);
    b->p[n - 1] = (char)((unsigned char)b->p[n - 1] + 1);
    return true;
}

/* The partition in a key's or value's first two bytes. */
static uint32_t part_of(const char *p)
{
    return (uint32_t)((unsigned char)p[0] << 8 | (unsigned char)p[1]);
}

/* Sets b to [type] P|study[\0series[\0sop]]; type 0 leaves it out (objects
 * keys). `tail` appends a final \0 so the key is the prefix of all children. */
static void key_loc(buf_t *b, char type, uint32_t part, const char *study, const char *series,
                    const char *sop, bool tail)
{
    b->len = 0;
    if (type)
        buf_byte(b, (unsigned char)type);
    buf_part(b, part);
    buf_str(b, study);
    if (series) {
        buf_byte(b, 0);
        buf_str(b, series);
        if (sop) {
            buf_byte(b, 0);
            buf_str(b, sop);
        }
    }
    if (tail)
        buf_byte(b, 0);
    /* The shape loc_parse() and part_of() read back: the partition in the
     * two bytes after the type, then the UIDs with one NUL between each. */
    size_t at = type ? 1 : 0;
    SP_ASSERT(part_of(b->p + at) == part);
    SP_ASSERT(b->len == at + 2 + strlen(study) + (series ? 1 + strlen(series) : 0) +
                            (series && sop ? 1 + strlen(sop) : 0) + (tail ? 1 : 0));
}

/* Sets b to type|uid (the 'U' and 'S' secondary keys). */
static void key_uid(buf_t *b, char type, const char *uid)
{
    b->len = 0;
    buf_byte(b, (unsigned char)type);
    buf_str(b, uid);
    SP_ASSERT(b->len == 1 + strlen(uid));
}

/* Builds the secondary key type|component\0study for one value of an indexed
 * study attribute. Names are folded (match_fold_name) and ACR-NEMA dates
 * "YYYY.MM.DD" become YYYYMMDD, so that index order and prefixes agree with
 * what match_value() accepts. */
static void sec_key(buf_t *b, char type, const char *comp, size_t n, const char *study)
{
    b->len = 0;
    buf_byte(b, (unsigned char)type);
    size_t at = b->len;
    if (type == 'd' && n == 10 && comp[4] == '.' && comp[7] == '.') {
        buf_add(b, comp, 4);
        buf_add(b, comp + 5, 2);
        buf_add(b, comp + 8, 2);
    } else {
        buf_add(b, comp, n);
    }
    size_t nul = b->len;
    buf_byte(b, 0);
    if (type == 'n')
        match_fold_name(b->p + at, b->p + at); /* same length, in place */
    buf_str(b, study);
    /* sec_parse() splits value and study at the first NUL after the type. */
    SP_ASSERT(b->p[0] == type && memchr(b->p + 1, 0, b->len - 1) == b->p + nul);
}

/* Walks the backslash-separated values of a (possibly multi-valued) value:
 * *pos starts at 0; returns false when done. "" yields one empty value. */
static bool next_value(const char *v, size_t *pos, const char **item, size_t *n)
{
    size_t len = strlen(v);
    if (*pos > len)
        return false;
    const char *start = v + *pos;
    const char *sep = strchr(start, '\\');
    *item = start;
    *n = sep ? (size_t)(sep - start) : strlen(start);
    *pos += *n + 1;
    return true;
}

/* Whether a secondary index of `type` holds an entry for one value: the
 * patient index holds every study (an empty PatientID too) so that patient
 * level queries can group by it; the others skip empty values. */
static bool sec_indexed(char type, size_t n)
{
    return type == 'p' || n > 0;
}

/* Makes a key printable for log lines: partition bytes as a number, NULs as '/'. */
static const char *key_text(const char *k, size_t n, char *out, size_t size)
{
    size_t o = 0;
    size_t i = 0;
    if (n >= 1 && k[0] >= 'A' && k[0] <= 'z' && size > 2) {
        out[o++] = k[0];
        out[o++] = '|';
        i = 1;
    }
    if (n >= i + 2) {
        int w = snprintf(out + o, size - o, "%u|",
                         (unsigned)((unsigned char)k[i] << 8 | (unsigned char)k[i + 1]));
        if (w > 0 && (size_t)w < size - o)
            o += (size_t)w;
        i += 2;
    }
    for (; i < n && o + 1 < size; i++) {
        unsigned char c = (unsigned char)k[i];
        out[o++] = c == 0 ? '/' : (c < 32 || c > 126) ? '?' : (char)c;
    }
    out[o < size ? o : size - 1] = '\0';
    return out;
}

/* A location decoded from a key or a 'U' value: P|study[\0series[\0sop]]. */
typedef struct {
    uint32_t part;
    char buf[LOC_MAX + 1];
    const char *study, *series, *sop;
} loc_t;

/* Parses n bytes holding a partition and `parts` UIDs separated by NULs.
 * Returns 0, or SP_EDB when they do not have that shape. */
static int loc_parse(const char *p, size_t n, int parts, loc_t *out)
{
    memset(out, 0, sizeof *out);
    if (n < 3 || n - 2 > LOC_MAX)
        return SP_EDB;
    out->part = (uint32_t)((unsigned char)p[0] << 8 | (unsigned char)p[1]);
    memcpy(out->buf, p + 2, n - 2);
    out->buf[n - 2] = '\0';
    const char *end = out->buf + (n - 2);
    const char **slots[3] = {&out->study, &out->series, &out->sop};
    const char *cur = out->buf;
    for (int i = 0; i < parts; i++) {
        if (cur > end)
            return SP_EDB;
        *slots[i] = cur;
        if (!sp_uid_valid(cur))
            return SP_EDB;
        cur += strlen(cur) + 1;
    }
    return cur == end + 1 ? 0 : SP_EDB;
}

/* ---- index records -------------------------------------------------- */

/* A record is: version byte, kind byte ('T', 'R' or 'I'); for instances a
 * varint object size and the 32-byte digest, and in version 2 (instances
 * only; version 1 instance records predate versions and read as version 0,
 * policy UNSET) a varint put version and a policy byte; then one field per present
 * attribute, in increasing id order: id byte, varint length, value bytes.
 * Study records hold patient and study attributes, series records series
 * attributes, instance records every stored attribute of the instance (so
 * store_get returns exactly what was put). */

static bool rec_holds(char kind, unsigned id)
{
    if (id >= ATTR_STORED_COUNT)
        return false;
    level_t l = attr_info((attr_id_t)id)->level;
    switch (kind) {
    case 'T': return l <= LEVEL_STUDY;
    case 'R': return l == LEVEL_SERIES;
    default: return true;
    }
}

static void rec_encode(buf_t *b, char kind, const attrs_t *a, uint64_t size, const uint8_t *digest,
                       uint64_t version, store_policy_t policy)
{
    b->len = 0;
    buf_byte(b, kind == 'I' ? REC_VERSION_VERSIONED : REC_VERSION);
    buf_byte(b, (unsigned char)kind);
    if (kind == 'I') {
        buf_varint(b, size);
        buf_add(b, digest, SP_DIGEST_LEN);
        buf_varint(b, version);
        buf_byte(b, (unsigned)policy);
    }
    for (unsigned id = 0; id < ATTR_STORED_COUNT; id++) {
        const char *v = a->v[id];
        if (!v || !rec_holds(kind, id))
            continue;
        buf_byte(b, id);
        buf_varint(b, strlen(v));
        buf_str(b, v);
    }
}

static bool get_varint(const uint8_t **p, const uint8_t *end, uint64_t *out)
{
    uint64_t v = 0;
    for (unsigned shift = 0; shift < 64; shift += 7) {
        if (*p >= end)
            return false;
        uint8_t c = *(*p)++;
        if (shift == 63 && c > 1)
            return false;
        v |= (uint64_t)(c & 0x7f) << shift;
        if (!(c & 0x80)) {
            *out = v;
            return true;
        }
    }
    return false;
}

/* Decodes and fully validates a record of `kind`. out (may be NULL to only
 * validate) must be empty; size and digest are filled for instance records.
 * Returns 0, or SP_EDB for anything malformed (out is then left empty). */
static int rec_decode(const char *val, size_t n, char kind, attrs_t *out, uint64_t *size,
                      uint8_t *digest)
{
    const uint8_t *p = (const uint8_t *)val, *end = p + n;
    if (n < 2 || p[1] != (uint8_t)kind ||
        !(p[0] == REC_VERSION || (kind == 'I' && p[0] == REC_VERSION_VERSIONED)))
        return SP_EDB;
    bool versioned = p[0] == REC_VERSION_VERSIONED;
    p += 2;
    if (kind == 'I') {
        uint64_t sz, version;
        if (!get_varint(&p, end, &sz) || (size_t)(end - p) < SP_DIGEST_LEN)
            return SP_EDB;
        if (size)
            *size = sz;
        if (digest)
            memcpy(digest, p, SP_DIGEST_LEN);
        p += SP_DIGEST_LEN;
        if (versioned && (!get_varint(&p, end, &version) || p >= end ||
                          *p > STORE_POLICY_KEEP_NEWEST || (version == 0) != (*p == 0)))
            return SP_EDB;
        p += versioned;
    }
    int last = -1;
    while (p < end) {
        unsigned id = *p++;
        uint64_t len;
        if ((int)id <= last || !rec_holds(kind, id) || !get_varint(&p, end, &len) ||
            len > (uint64_t)(end - p) || len > MAX_VALUE_LEN || memchr(p, 0, (size_t)len))
            goto bad;
        if (out)
            attrs_take(out, (attr_id_t)id, sp_strndup((const char *)p, (size_t)len));
        p += len;
        last = (int)id;
    }
    return 0;
bad:
    if (out)
        attrs_clear(out);
    return SP_EDB;
}

/* The put version and policy of an instance record rec_decode() accepted. */
static void rec_version(const char *val, size_t n, uint64_t *version, store_policy_t *policy)
{
    const uint8_t *p = (const uint8_t *)val, *end = p + n;
    uint64_t sz = 0, v = 0;
    *version = 0;
    *policy = STORE_POLICY_UNSET;
    if (n < 2 || p[0] != REC_VERSION_VERSIONED)
        return;
    p += 2;
    if (!get_varint(&p, end, &sz) || (size_t)(end - p) < SP_DIGEST_LEN)
        return;
    p += SP_DIGEST_LEN;
    if (get_varint(&p, end, &v) && p < end) {
        *version = v;
        *policy = (store_policy_t)*p;
    }
}

/* ---- RocksDB helpers ---------------------------------------------- */

static int db_code(const char *err)
{
    return strstr(err, "No space left") ? SP_ENOSPACE : SP_EDB;
}

/* Logs a RocksDB error with what was being done, frees it and returns
 * SP_ENOSPACE or SP_EDB. */
static int db_fail(char *err, const char *op, const char *what)
{
    int rc = db_code(err);
    log_error("store: %s %s: %s", op, what, err);
    rocksdb_free(err);
    return rc;
}

/* Reads one value into *val (release with rocksdb_free). Returns 0,
 * SP_ENOTFOUND, or a logged SP_EDB / SP_ENOSPACE; `what` names the object
 * for the log line. */
static int db_get(store_t *s, const rocksdb_readoptions_t *ro, int cf, const buf_t *key, char **val,
                  size_t *vlen, const char *what)
{
    char *err = NULL;
    *val = rocksdb_get_cf(s->db, ro, s->cf[cf], key->p, key->len, vlen, &err);
    if (err) {
        *val = NULL;
        return db_fail(err, "read for", what);
    }
    return *val ? 0 : SP_ENOTFOUND;
}

/* An iterator over [lo, hi) of one column family. */
typedef struct {
    rocksdb_readoptions_t *ro;
    rocksdb_iterator_t *it;
    buf_t upper; /* owns the upper bound RocksDB points at */
} scan_t;

static void scan_open(scan_t *sc, store_t *s, const rocksdb_snapshot_t *snap, int cf,
                      const char *lo, size_t lolen, const char *hi, size_t hilen)
{
    memset(sc, 0, sizeof *sc);
    sc->ro = rocksdb_readoptions_create();
    if (snap)
        rocksdb_readoptions_set_snapshot(sc->ro, snap);
    if (hi) {
        buf_add(&sc->upper, hi, hilen);
        rocksdb_readoptions_set_iterate_upper_bound(sc->ro, sc->upper.p, sc->upper.len);
    }
    sc->it = rocksdb_create_iterator_cf(s->db, sc->ro, s->cf[cf]);
    rocksdb_iter_seek(sc->it, lo, lolen);
}

/* An iterator over every key starting with prefix. */
static void scan_prefix(scan_t *sc, store_t *s, const rocksdb_snapshot_t *snap, int cf,
                        const char *prefix, size_t n)
{
    buf_t end = {0};
    bool bounded = prefix_end(&end, prefix, n);
    scan_open(sc, s, snap, cf, prefix, n, bounded ? end.p : NULL, end.len);
    buf_free(&end);
}

static bool scan_valid(const scan_t *sc)
{
    return rocksdb_iter_valid(sc->it) != 0;
}

static const char *scan_key(const scan_t *sc, size_t *n)
{
    return rocksdb_iter_key(sc->it, n);
}

static const char *scan_value(const scan_t *sc, size_t *n)
{
    return rocksdb_iter_value(sc->it, n);
}

static void scan_next(scan_t *sc)
{
    rocksdb_iter_next(sc->it);
}

/* Closes the iterator; returns 0 or the (logged) error it ended on. */
static int scan_close(scan_t *sc, const char *what)
{
    int rc = 0;
    if (sc->it) {
        char *err = NULL;
        rocksdb_iter_get_error(sc->it, &err);
        if (err)
            rc = db_fail(err, "scan of", what);
        rocksdb_iter_destroy(sc->it);
    }
    if (sc->ro)
        rocksdb_readoptions_destroy(sc->ro);
    buf_free(&sc->upper);
    memset(sc, 0, sizeof *sc);
    return rc;
}

/* Counts the keys starting with prefix. */
static int count_prefix(store_t *s, const rocksdb_snapshot_t *snap, int cf, const buf_t *prefix,
                        uint64_t *count)
{
    scan_t sc;
    *count = 0;
    scan_prefix(&sc, s, snap, cf, prefix->p, prefix->len);
    for (; scan_valid(&sc); scan_next(&sc))
        (*count)++;
    return scan_close(&sc, "a key range");
}

/* Reads and decodes the record of `kind` at a location. Returns 0,
 * SP_ENOTFOUND, or SP_EDB (logged) for a read error or a corrupt record. */
static int load_rec(store_t *s, const rocksdb_readoptions_t *ro, char kind, uint32_t part,
                    const char *study, const char *series, const char *sop, attrs_t *out,
                    uint64_t *size, uint8_t *digest)
{
    buf_t k = {0};
    char *val = NULL, text[256];
    size_t vlen = 0;
    key_loc(&k, kind, part, study, series, sop, false);
    int rc = db_get(s, ro, CF_INDEX, &k, &val, &vlen, study);
    if (rc == 0 && rec_decode(val, vlen, kind, out, size, digest) != 0) {
        log_error("store: corrupt index record %s", key_text(k.p, k.len, text, sizeof text));
        rc = SP_EDB;
    }
    rocksdb_free(val);
    buf_free(&k);
    return rc;
}

/* The lock order of a put (put_one): the SOP stripe, then study gates in
 * increasing stripe order, then the study creation stripe. A put records
 * the rank of the last lock it took and asserts each next one ranks higher,
 * so a change that breaks the order aborts at once instead of deadlocking
 * once in a while. */
#define RANK_SOP 0L
#define RANK_GATE(i) (1L + (long)(i))
#define RANK_STUDY (1L + LOCK_STRIPES)

static void lock_order(long *last, long rank)
{
    SP_ASSERT(rank > *last);
    *last = rank;
}

static size_t stripe(const char *uid)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (const unsigned char *p = (const unsigned char *)uid; *p; p++)
        h = (h ^ *p) * 1099511628211ull;
    return (size_t)(h % LOCK_STRIPES);
}

/* Passes a gate shared (a put of the study). */
static void gate_enter(gate_t *g)
{
    pthread_mutex_lock(&g->mu);
    while (g->writer || g->writers_waiting)
        pthread_cond_wait(&g->cv, &g->mu);
    g->readers++;
    pthread_mutex_unlock(&g->mu);
}

static void gate_leave(gate_t *g)
{
    pthread_mutex_lock(&g->mu);
    if (--g->readers == 0)
        pthread_cond_broadcast(&g->cv);
    pthread_mutex_unlock(&g->mu);
}

/* Closes a gate exclusively (a deletion of the study), waiting for the puts
 * inside to finish. */
static void gate_close(gate_t *g)
{
    pthread_mutex_lock(&g->mu);
    g->writers_waiting++;
    while (g->writer || g->readers)
        pthread_cond_wait(&g->cv, &g->mu);
    g->writers_waiting--;
    g->writer = true;
    pthread_mutex_unlock(&g->mu);
}

static void gate_open(gate_t *g)
{
    pthread_mutex_lock(&g->mu);
    g->writer = false;
    pthread_cond_broadcast(&g->cv);
    pthread_mutex_unlock(&g->mu);
}

/* A partition's digest is the sum, lane by lane (four 64-bit lanes, mod
 * 2^64, little-endian bytes), of BLAKE2b-256(sop \0 digest) over its
 * instances: independent of order, so a write adds or subtracts its
 * instance's term instead of rehashing the partition. The per-instance
 * terms are cryptographic, so two different sets of (SOP, digest) pairs
 * meet only by a collision nobody can aim at (a replica holds what the
 * cluster sent it). Empty partition: all zeros. */
static uint64_t load_le64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int b = 7; b >= 0; b--)
        v = v << 8 | p[b];
    return v;
}

static void digest_term(const char *sop, const uint8_t digest[SP_DIGEST_LEN], uint64_t term[4])
{
    crypto_generichash_state st;
    uint8_t h[32];
    crypto_generichash_init(&st, NULL, 0, sizeof h);
    crypto_generichash_update(&st, (const unsigned char *)sop, strlen(sop) + 1);
    crypto_generichash_update(&st, digest, SP_DIGEST_LEN);
    crypto_generichash_final(&st, h, sizeof h);
    for (int i = 0; i < 4; i++)
        term[i] = load_le64(h + 8 * i);
}

/* acc (a partition digest) += sign * term. */
static void digest_apply(uint8_t acc[SP_DIGEST_LEN], const uint64_t term[4], int sign)
{
    for (int i = 0; i < 4; i++) {
        uint64_t v = load_le64(acc + 8 * i);
        v = sign > 0 ? v + term[i] : v - term[i];
        for (int b = 0; b < 8; b++)
            acc[8 * i + b] = (uint8_t)(v >> (8 * b));
    }
}

/* Updates a partition's summary after a committed write: sign +1 for an
 * instance added, -1 for one removed. */
static void sum_add(store_t *s, uint32_t part, const char *sop, const uint8_t digest[SP_DIGEST_LEN],
                    uint64_t size, int sign)
{
    SP_ASSERT(part < PARTITIONS);
    uint64_t term[4];
    digest_term(sop, digest, term);
    pthread_mutex_lock(&s->sum_lock);
    store_partition_summary_t *sum = &s->sums[part].sum;
    digest_apply(sum->digest, term, sign);
    sum->count = sign > 0 ? sum->count + 1 : sum->count - 1;
    sum->bytes = sign > 0 ? sum->bytes + size : sum->bytes - size;
    pthread_mutex_unlock(&s->sum_lock);
}

/* ---- open / close ------------------------------------------------- */

/* Removes a deleted study's instances from its partition's summary: gone
 * is the sum of their terms, n and bytes their count and size. */
static void sum_remove(store_t *s, uint32_t part, const uint8_t gone[SP_DIGEST_LEN], uint64_t n,
                       uint64_t bytes)
{
    uint64_t lanes[4];
    for (int i = 0; i < 4; i++)
        lanes[i] = load_le64(gone + 8 * i);
    pthread_mutex_lock(&s->sum_lock);
    store_partition_summary_t *sum = &s->sums[part].sum;
    digest_apply(sum->digest, lanes, -1);
    sum->count -= n;
    sum->bytes -= bytes;
    pthread_mutex_unlock(&s->sum_lock);
}

/* Starts every partition's summary empty; count_at_open() adds what it finds. */
static void sums_init(store_t *s)
{
    s->sums = sp_calloc(PARTITIONS, sizeof *s->sums);
    pthread_mutex_init(&s->sum_lock, NULL);
    for (uint32_t p = 0; p < PARTITIONS; p++)
        s->sums[p].sum.partition = p;
}

/* Counts instances, bytes, studies and kept conflicts for store_stats(),
 * and sums every partition's summary (sum_add). */
static int count_at_open(store_t *s)
{
    scan_t sc;
    char text[256];
    scan_prefix(&sc, s, NULL, CF_INDEX, "T", 1);
    for (; scan_valid(&sc); scan_next(&sc))
        s->studies++;
    int rc = scan_close(&sc, "study records");
    if (rc)
        return rc;
    scan_prefix(&sc, s, NULL, CF_INDEX, "I", 1);
    for (; scan_valid(&sc); scan_next(&sc)) {
        size_t kn, vn;
        const char *k = scan_key(&sc, &kn), *v = scan_value(&sc, &vn);
        uint64_t size = 0;
        uint8_t d[SP_DIGEST_LEN];
        loc_t loc;
        if (kn < 3 || loc_parse(k + 1, kn - 1, 3, &loc) != 0 ||
            rec_decode(v, vn, 'I', NULL, &size, d) != 0) {
            log_error("store: corrupt index record %s (not counted)",
                      key_text(k, kn, text, sizeof text));
            if (kn >= 3)
                s->sums[part_of(k + 1)].corrupt = true; /* its summary reports it */
            continue;
        }
        s->instances++;
        s->bytes += size;
        sum_add(s, loc.part, loc.sop, d, size, +1);
    }
    rc = scan_close(&sc, "instance records");
    if (rc)
        return rc;
    scan_open(&sc, s, NULL, CF_CONFLICTS, "", 0, NULL, 0);
    for (; scan_valid(&sc); scan_next(&sc))
        s->conflicts++;
    return scan_close(&sc, "conflicts");
}

/* Checks the format marker of an existing database, or writes it into a new one. */
static int check_format(store_t *s, char *err, size_t errlen)
{
    buf_t k = {0};
    char *val = NULL;
    size_t vlen = 0;
    buf_str(&k, "format");
    int rc = db_get(s, s->ro, CF_META, &k, &val, &vlen, "format marker");
    if (rc == 0) {
        if (vlen != strlen(STORE_FORMAT) || memcmp(val, STORE_FORMAT, vlen) != 0) {
            sp_fmt(err, errlen, "%s: unsupported store format \"%.*s\"", s->path,
                   (int)(vlen < 16 ? vlen : 16), val);
            rc = SP_EDB;
        }
    } else if (rc == SP_ENOTFOUND) {
        char *e = NULL;
        rocksdb_put_cf(s->db, s->wo_sync, s->cf[CF_META], k.p, k.len, STORE_FORMAT,
                       strlen(STORE_FORMAT), &e);
        rc = 0;
        if (e) {
            sp_fmt(err, errlen, "%s: writing format marker: %s", s->path, e);
            rc = db_code(e);
            rocksdb_free(e);
        }
    } else {
        sp_fmt(err, errlen, "%s: reading format marker failed", s->path);
    }
    rocksdb_free(val);
    buf_free(&k);
    return rc;
}

/* Whether files in dir can be opened with O_DIRECT (RocksDB's flush and
 * compaction writes would fail on a file system that refuses it). */
static bool direct_io_works(const char *dir)
{
    char path[PATH_MAX];
    (void)mkdir(dir, 0700); /* RocksDB would create it; the probe needs it now */
    sp_fmt(path, sizeof path, "%s/.direct-io-probe", dir);
    int fd = open(path, O_CREAT | O_WRONLY | O_TRUNC | O_DIRECT | O_CLOEXEC, 0600);
    if (fd < 0)
        return false;
    close(fd);
    unlink(path);
    return true;
}

int store_open(const store_config_t *cfg, store_t **out, char *err, size_t errlen)
{
    *out = NULL;
    if (!cfg || !cfg->path || !cfg->path[0]) {
        sp_fmt(err, errlen, "store: no database path");
        return SP_EINVAL;
    }
    if (sodium_init() < 0) { /* store_partition_digest streams BLAKE2b directly */
        sp_fmt(err, errlen, "store: libsodium failed to initialise");
        return SP_EINVAL;
    }
    store_config_t c = *cfg;
    store_config_t def;
    store_config_defaults(&def);
    if (c.blob_min_bytes == 0)
        c.blob_min_bytes = def.blob_min_bytes;
    if (c.write_buffer_bytes == 0)
        c.write_buffer_bytes = def.write_buffer_bytes;
    if (c.block_cache_bytes == 0)
        c.block_cache_bytes = def.block_cache_bytes;
    if (c.background_jobs <= 0) /* flushes and compactions of blob files and SSTs */
        c.background_jobs = sp_cores() < 2 ? 2 : sp_cores();
    if (c.max_conflicts < 0)
        c.max_conflicts = def.max_conflicts;

    store_t *s = sp_calloc(1, sizeof *s);
    s->path = sp_strdup(c.path);
    s->max_conflicts = c.max_conflicts;
    for (size_t i = 0; i < LOCK_STRIPES; i++) {
        pthread_mutex_init(&s->sop_locks[i], NULL);
        pthread_mutex_init(&s->study_locks[i], NULL);
        pthread_mutex_init(&s->study_gates[i].mu, NULL);
        pthread_cond_init(&s->study_gates[i].cv, NULL);
    }
    sums_init(s);
    s->cache = rocksdb_cache_create_lru(c.block_cache_bytes);
    s->wo_sync = rocksdb_writeoptions_create();
    rocksdb_writeoptions_set_sync(s->wo_sync, 1);
    s->ro = rocksdb_readoptions_create();
    /* Every object read is checked against its BLAKE2b digest, which catches
     * all that RocksDB's CRC32c would; Debian's RocksDB computes CRC32c in
     * software, so skipping it saves a pass over every large object. */
    s->ro_object = rocksdb_readoptions_create();
    rocksdb_readoptions_set_verify_checksums(s->ro_object, 0);

    /* Index-like column families: whole-key bloom filters make the many
     * point lookups of a put ('U', 'S', 'R') and of a find cheap on misses.
     * No prefix extractor: queries scan across prefixes (all 'T' records,
     * date ranges), which a prefix bloom would make unsafe to seek. */
    rocksdb_block_based_table_options_t *bbt = rocksdb_block_based_options_create();
    rocksdb_block_based_options_set_block_cache(bbt, s->cache);
    rocksdb_block_based_options_set_filter_policy(bbt, rocksdb_filterpolicy_create_bloom_full(10));
    rocksdb_block_based_options_set_format_version(bbt, 5);
    rocksdb_options_t *opt = rocksdb_options_create();
    rocksdb_options_set_create_if_missing(opt, 1);
    rocksdb_options_set_create_missing_column_families(opt, 1);
    rocksdb_options_set_max_background_jobs(opt, c.background_jobs);
    rocksdb_options_set_write_buffer_size(opt, c.write_buffer_bytes);
    rocksdb_options_set_level_compaction_dynamic_level_bytes(opt, 1);
    rocksdb_options_set_bytes_per_sync(opt, 1u << 20);
    rocksdb_options_set_keep_log_file_num(opt, 5);
    /* Reuse WAL files: overwriting preallocated space lets fdatasync skip the
     * file-size metadata update (and its journal commit) that an append needs,
     * which on ext4 nearly halves the cost of each sync. */
    rocksdb_options_set_recycle_log_file_num(opt, 4);
    /* A family written rarely (meta, conflicts) would otherwise pin every WAL
     * file since its last write until the WALs reach 4 x all write buffers
     * (~3 GiB here): seen as 36 WAL files of 75 MB on a 200,000-instance
     * ingest. Past this size RocksDB flushes the family holding the oldest
     * WAL, so WALs are recycled and a restart replays little. */
    rocksdb_options_set_max_total_wal_size(opt, 4 * (uint64_t)c.write_buffer_bytes);
    rocksdb_options_set_block_based_table_factory(opt, bbt);
    rocksdb_block_based_options_destroy(bbt);

    /* Objects and kept conflicts: integrated BlobDB keeps values of
     * blob_min_bytes or more in blob files, so compaction moves only small
     * references. Pixel data is usually compressed already: no blob
     * compression. */
    rocksdb_options_t *obj = rocksdb_options_create_copy(opt);
    rocksdb_options_set_enable_blob_files(obj, 1);
    rocksdb_options_set_min_blob_size(obj, c.blob_min_bytes);
    rocksdb_options_set_blob_file_size(obj, BLOB_FILE_BYTES);
    rocksdb_options_set_blob_compression_type(obj, rocksdb_no_compression);
    /* Off until there is garbage (store_blob_gc_tune). */
    rocksdb_options_set_enable_blob_gc(obj, 0);
    rocksdb_options_set_blob_gc_age_cutoff(obj, 0.25);
    /* Flushes and compactions write blob files and SSTs with O_DIRECT: the
     * bytes were just copied into the page cache once by the WAL write, and
     * a second buffered copy (plus its writeback) costs CPU on every byte for
     * pages nobody reads soon. Measured on a CT ingest at N=3: ~10% less CPU.
     * Probed, because some file systems (tmpfs) refuse O_DIRECT. */
    if (direct_io_works(c.path))
        rocksdb_options_set_use_direct_io_for_flush_and_compaction(opt, 1);
    else
        log_info("store: %s does not support O_DIRECT; flushes go through the page cache", c.path);

    const rocksdb_options_t *cf_opts[CF_COUNT];
    for (int i = 0; i < CF_COUNT; i++)
        cf_opts[i] = (i == CF_OBJECTS || i == CF_CONFLICTS) ? obj : opt;
    char *e = NULL;
    s->db = rocksdb_open_column_families(opt, c.path, CF_COUNT, cf_names, cf_opts, s->cf, &e);
    rocksdb_options_destroy(obj);
    rocksdb_options_destroy(opt);
    int rc = 0;
    if (e) {
        sp_fmt(err, errlen, "%s: %s", c.path, e);
        rc = db_code(e);
        rocksdb_free(e);
        s->db = NULL;
        goto fail;
    }
    rc = check_format(s, err, errlen);
    if (rc)
        goto fail;
    atomic_store(&s->blob_gc, -1);
    store_blob_gc_tune(s, false);
    rc = count_at_open(s);
    if (rc) {
        sp_fmt(err, errlen, "%s: counting stored instances failed", c.path);
        goto fail;
    }
    log_info("store: opened %s: %llu instances in %llu studies, %llu bytes, %llu conflicts", c.path,
             (unsigned long long)s->instances, (unsigned long long)s->studies,
             (unsigned long long)s->bytes, (unsigned long long)s->conflicts);
    *out = s;
    return 0;
fail:
    store_close(&s);
    return rc;
}

/* A clean close writes the memtables out (blob files and SSTs), so the next
 * open has no WAL to replay and the disk holds every byte it will ever need
 * to for what was stored (what the benchmark's disk bytes per byte counts).
 * A failure only costs the replay at the next open. */
static void flush_memtables(store_t *s)
{
    rocksdb_flushoptions_t *fo = rocksdb_flushoptions_create();
    rocksdb_flushoptions_set_wait(fo, 1);
    for (int i = 0; i < CF_COUNT; i++) {
        char *err = NULL;
        if (s->cf[i])
            rocksdb_flush_cf(s->db, fo, s->cf[i], &err);
        if (err) {
            log_warn("store: flush at close: %s (the WAL is replayed at the next open)", err);
            rocksdb_free(err);
        }
    }
    rocksdb_flushoptions_destroy(fo);
}

void store_close(store_t **sp)
{
    if (!sp || !*sp)
        return;
    store_t *s = *sp;
    if (s->db) {
        flush_memtables(s);
        for (int i = 0; i < CF_COUNT; i++)
            if (s->cf[i])
                rocksdb_column_family_handle_destroy(s->cf[i]);
        rocksdb_close(s->db);
    }
    if (s->cache)
        rocksdb_cache_destroy(s->cache);
    if (s->wo_sync)
        rocksdb_writeoptions_destroy(s->wo_sync);
    if (s->ro)
        rocksdb_readoptions_destroy(s->ro);
    if (s->ro_object)
        rocksdb_readoptions_destroy(s->ro_object);
    for (size_t i = 0; i < LOCK_STRIPES; i++) {
        pthread_mutex_destroy(&s->sop_locks[i]);
        pthread_mutex_destroy(&s->study_locks[i]);
        pthread_mutex_destroy(&s->study_gates[i].mu);
        pthread_cond_destroy(&s->study_gates[i].cv);
    }
    if (s->sums)
        pthread_mutex_destroy(&s->sum_lock);
    free(s->sums);
    free(s->path);
    free(s);
    *sp = NULL;
}

/* ---- put ------------------------------------------------------------ */

/* Subtracts from a counter without wrapping below zero (a counter can only
 * be short after a corrupt record was skipped at open). */
static void counter_sub(_Atomic uint64_t *c, uint64_t n)
{
    uint64_t cur = atomic_load(c);
    while (!atomic_compare_exchange_weak(c, &cur, cur > n ? cur - n : 0))
        ;
}

/* Reads the object of an instance and checks it against the size and
 * digest of its instance record. Returns 0 with *data (release with
 * rocksdb_free) and *len; SP_EDIGEST when the bytes are bad (digest or size
 * mismatch, or RocksDB's own checksum of an SST block or blob record
 * failed), counted in corrupt_reads; SP_ENOTFOUND when the instance record
 * has no object; or SP_EDB / SP_ENOSPACE for another read error. Each
 * failure is logged. *len is the size read also for a mismatch (0 when
 * nothing was read). */
static int object_read(store_t *s, const rocksdb_readoptions_t *ro, const loc_t *loc,
                       const char *sop, uint64_t size, const uint8_t *digest, char **data,
                       size_t *len)
{
    buf_t k = {0};
    char *err = NULL;
    uint8_t got[SP_DIGEST_LEN];
    *len = 0;
    key_loc(&k, 0, loc->part, loc->study, loc->series, sop, false);
    *data = rocksdb_get_cf(s->db, ro, s->cf[CF_OBJECTS], k.p, k.len, len, &err);
    buf_free(&k);
    if (err) {
        *data = NULL;
        *len = 0;
        /* RocksDB's own checksums (SST blocks, blob records) failed: the bytes
         * on disk are bad, which is the same fault as a digest mismatch. */
        int rc = strncmp(err, "Corruption", 10) == 0 ? SP_EDIGEST : db_code(err);
        if (rc == SP_EDIGEST) {
            atomic_fetch_add(&s->corrupt_reads, 1);
            log_error("store: corrupt object SOP %s of study %s: %s", sop, loc->study, err);
        } else {
            log_error("store: read of object SOP %s of study %s: %s", sop, loc->study, err);
        }
        rocksdb_free(err);
        return rc;
    }
    if (!*data) {
        log_error("store: SOP %s of study %s has an index record but no object", sop, loc->study);
        return SP_ENOTFOUND;
    }
    atomic_fetch_add(&s->object_bytes_read, *len);
    sp_digest(*data, *len, got);
    if (*len == size && memcmp(got, digest, SP_DIGEST_LEN) == 0)
        return 0;
    char want_hex[2 * SP_DIGEST_LEN + 1], got_hex[2 * SP_DIGEST_LEN + 1];
    sp_hex(digest, SP_DIGEST_LEN, want_hex);
    sp_hex(got, SP_DIGEST_LEN, got_hex);
    atomic_fetch_add(&s->corrupt_reads, 1);
    log_error("store: corrupt object SOP %s of study %s in partition %u: digest %s "
              "(%zu bytes), expected %s (%llu bytes)",
              sop, loc->study, (unsigned)loc->part, got_hex, *len, want_hex,
              (unsigned long long)size);
    rocksdb_free(*data);
    *data = NULL;
    return SP_EDIGEST;
}

/* Looks up the partition a study is stored under. Returns 0, SP_ENOTFOUND,
 * or SP_EDB. */
static int study_partition(store_t *s, const rocksdb_readoptions_t *ro, const char *study,
                           uint32_t *part)
{
    buf_t k = {0};
    char *val = NULL;
    size_t vlen = 0;
    key_uid(&k, 'S', study);
    int rc = db_get(s, ro, CF_SECONDARY, &k, &val, &vlen, study);
    if (rc == 0) {
        if (vlen == 2) {
            *part = part_of(val);
        } else {
            log_error("store: corrupt study locator of study %s", study);
            rc = SP_EDB;
        }
    }
    rocksdb_free(val);
    buf_free(&k);
    return rc;
}

/* Finds where a SOP Instance UID is stored ('U' entry). Returns 0,
 * SP_ENOTFOUND, or SP_EDB. */
static int sop_locate(store_t *s, const rocksdb_readoptions_t *ro, const char *sop, loc_t *loc)
{
    buf_t k = {0};
    char *val = NULL;
    size_t vlen = 0;
    key_uid(&k, 'U', sop);
    int rc = db_get(s, ro, CF_SECONDARY, &k, &val, &vlen, sop);
    if (rc == 0 && loc_parse(val, vlen, 2, loc) != 0) {
        log_error("store: corrupt instance locator of SOP %s", sop);
        rc = SP_EDB;
    }
    rocksdb_free(val);
    buf_free(&k);
    return rc;
}

/* A repair of a SOP stored with the sender's digest (at loc): a duplicate
 * when the stored object verifies, else the object is rewritten with the
 * verified bytes (synced; the index records, which hold the digest, stay). */
static int object_repair(store_t *s, const store_put_t *in, const char *sop, const loc_t *loc,
                         store_outcome_t *outcome)
{
    char *data = NULL, *err = NULL;
    size_t len = 0;
    int rc = object_read(s, s->ro_object, loc, sop, in->len, in->digest, &data, &len);
    rocksdb_free(data);
    if (rc == 0) {
        *outcome = STORE_DUPLICATE;
        return 0;
    }
    /* Any failure to read back what the record promises (bad bytes, a
     * missing object, an I/O error) is cured by the verified bytes. */
    buf_t k = {0};
    key_loc(&k, 0, loc->part, loc->study, loc->series, sop, false);
    rocksdb_put_cf(s->db, s->wo_sync, s->cf[CF_OBJECTS], k.p, k.len, (const char *)in->data,
                   in->len, &err);
    buf_free(&k);
    if (err) /* the instance record, and so the summary, is unchanged */
        return db_fail(err, "repair of SOP", sop);
    log_info("store: repaired SOP %s of study %s in partition %u (%zu bytes)", sop, loc->study,
             (unsigned)loc->part, in->len);
    *outcome = STORE_STORED;
    return 0;
}

/* ---- instance metadata ('M' records) ---------------------------------- */

/* An 'M' record: format byte, kind, the object's digest, then for META_CUT
 * the object without its Pixel Data value (part10_metadata). META_WHOLE
 * says the object itself is its metadata (no top-level Pixel Data, or a
 * deflated or unscannable data set): nothing is copied, a read serves the
 * object. The digest ties the record to one version of the object, so a
 * record left stale (e.g. by an older binary replacing the object) is seen
 * and rebuilt, never served. */
#define META_FORMAT 1
#define META_CUT 0
#define META_WHOLE 1
#define META_HEAD (2 + SP_DIGEST_LEN)

/* Derives the 'M' value of an object into v: cheap, one pass over the
 * element headers (values are skipped, not read). */
static void meta_value(buf_t *v, const uint8_t *data, size_t len, const uint8_t *digest)
{
    uint8_t *cut = NULL;
    size_t cutlen = 0;
    int rc = part10_metadata(data, len, &cut, &cutlen);
    v->len = 0;
    buf_byte(v, META_FORMAT);
    buf_byte(v, rc == 0 ? META_CUT : META_WHOLE);
    buf_add(v, digest, SP_DIGEST_LEN);
    if (rc == 0)
        buf_add(v, cut, cutlen);
    free(cut);
}

/* Adds the 'M' record of an instance's object to a batch. */
static void batch_meta(rocksdb_writebatch_t *wb, store_t *s, const store_put_t *in,
                       const loc_t *loc, const char *sop)
{
    buf_t k = {0}, v = {0};
    key_loc(&k, 'M', loc->part, loc->study, loc->series, sop, false);
    meta_value(&v, in->data, in->len, in->digest);
    rocksdb_writebatch_put_cf(wb, s->cf[CF_INDEX], k.p, k.len, v.p, v.len);
    buf_free(&k);
    buf_free(&v);
}

/* The key of a version of sop kept aside: sop\0hex(digest). */
static void conflict_key(buf_t *k, const char *sop, const uint8_t *digest)
{
    char hex[2 * SP_DIGEST_LEN + 1];
    sp_hex(digest, SP_DIGEST_LEN, hex);
    k->len = 0;
    buf_str(k, sop);
    buf_byte(k, 0);
    buf_str(k, hex);
}

/* A conflicts value: format byte, partition, varint record length, the
 * version's instance record, its bytes. */
static void conflict_value(buf_t *v, uint32_t part, const char *rec, size_t reclen,
                           const void *data, size_t len)
{
    v->len = 0;
    buf_byte(v, CONFLICT_VERSION);
    buf_part(v, part);
    buf_varint(v, reclen);
    buf_add(v, rec, reclen);
    buf_add(v, data, len);
}

/* What the put of a version that is (or would be) kept aside answers: the
 * KEEP_* policies acknowledge it, REJECT and UNSET report the conflict. */
static store_outcome_t kept_aside_outcome(store_policy_t policy)
{
    return policy == STORE_POLICY_KEEP_FIRST || policy == STORE_POLICY_KEEP_NEWEST
               ? STORE_KEPT_ASIDE
               : STORE_CONFLICT;
}

/* The stored instance (at loc) as put_existing() weighs it. */
typedef struct {
    char *rec; /* its raw instance record (rocksdb_free) */
    size_t reclen;
    uint64_t size, version;
    store_policy_t policy;
    uint8_t digest[SP_DIGEST_LEN];
} stored_t;

static int stored_load(store_t *s, const char *sop, const loc_t *loc, stored_t *st)
{
    buf_t k = {0};
    char text[256];
    memset(st, 0, sizeof *st);
    key_loc(&k, 'I', loc->part, loc->study, loc->series, sop, false);
    int rc = db_get(s, s->ro, CF_INDEX, &k, &st->rec, &st->reclen, sop);
    if (rc == 0 && rec_decode(st->rec, st->reclen, 'I', NULL, &st->size, st->digest) != 0) {
        log_error("store: corrupt index record %s", key_text(k.p, k.len, text, sizeof text));
        rc = SP_EDB;
    }
    if (rc == SP_ENOTFOUND) {
        log_error("store: SOP %s has a locator but no instance record (study %s)", sop, loc->study);
        rc = SP_EDB;
    }
    if (rc == 0) {
        rec_version(st->rec, st->reclen, &st->version, &st->policy);
    } else {
        rocksdb_free(st->rec);
        st->rec = NULL;
    }
    buf_free(&k);
    return rc;
}

/* Makes the put's version the instance (same location) and keeps the stored
 * one aside, in one synced WriteBatch: the conflicts entry of the replaced
 * version, the new object and instance record, and the removal of the new
 * version's own conflicts entry if it had been kept aside before. The
 * replaced bytes are read back and verified first: a version that cannot be
 * kept is not replaced (its error is returned). */
static int replace_instance(store_t *s, const store_put_t *in, const char *sop, const loc_t *loc,
                            const stored_t *st, bool was_aside)
{
    char *old = NULL, *err = NULL;
    size_t oldlen = 0;
    int rc = object_read(s, s->ro_object, loc, sop, st->size, st->digest, &old, &oldlen);
    if (rc != 0)
        return rc == SP_ENOTFOUND ? SP_EDB : rc;
    buf_t k = {0}, v = {0};
    rocksdb_writebatch_t *wb = rocksdb_writebatch_create();
    conflict_key(&k, sop, st->digest);
    conflict_value(&v, loc->part, st->rec, st->reclen, old, oldlen);
    rocksdb_writebatch_put_cf(wb, s->cf[CF_CONFLICTS], k.p, k.len, v.p, v.len);
    if (was_aside) {
        conflict_key(&k, sop, in->digest);
        rocksdb_writebatch_delete_cf(wb, s->cf[CF_CONFLICTS], k.p, k.len);
    }
    key_loc(&k, 0, loc->part, loc->study, loc->series, sop, false);
    rocksdb_writebatch_put_cf(wb, s->cf[CF_OBJECTS], k.p, k.len, (const char *)in->data, in->len);
    key_loc(&k, 'I', loc->part, loc->study, loc->series, sop, false);
    rec_encode(&v, 'I', in->attrs, in->len, in->digest, in->version, in->policy);
    rocksdb_writebatch_put_cf(wb, s->cf[CF_INDEX], k.p, k.len, v.p, v.len);
    batch_meta(wb, s, in, loc, sop);
    rocksdb_write(s->db, s->wo_sync, wb, &err);
    if (err) {
        rc = db_fail(err, "replacement of SOP", sop);
    } else {
        sum_add(s, loc->part, sop, st->digest, st->size, -1);
        sum_add(s, loc->part, sop, in->digest, in->len, +1);
        if (!was_aside)
            atomic_fetch_add(&s->conflicts, 1);
        atomic_fetch_add(&s->bytes, in->len);
        counter_sub(&s->bytes, oldlen);
    }
    rocksdb_writebatch_destroy(wb);
    rocksdb_free(old);
    buf_free(&k);
    buf_free(&v);
    return rc;
}

/* The SOP is already stored (at loc). Same digest: a duplicate (for a
 * repair, after object_repair). Otherwise the versions are weighed as
 * store.h's "Duplicates" says: the put's version replaces the instance
 * (replace_instance) or is kept aside once (conflicts CF, synced), within
 * max_conflicts per SOP unless a repair must keep a replaced version. */
static int put_existing(store_t *s, const store_put_t *in, const char *sop, const loc_t *loc,
                        bool repair, store_outcome_t *outcome)
{
    stored_t st;
    int rc = stored_load(s, sop, loc, &st);
    if (rc)
        return rc;
    if (memcmp(st.digest, in->digest, SP_DIGEST_LEN) == 0) {
        rocksdb_free(st.rec);
        if (repair)
            return object_repair(s, in, sop, loc, outcome);
        *outcome = STORE_DUPLICATE;
        return 0;
    }

    const char *study = attrs_get(in->attrs, ATTR_STUDY_INSTANCE_UID);
    const char *series = attrs_get(in->attrs, ATTR_SERIES_INSTANCE_UID);
    char have_hex[2 * SP_DIGEST_LEN + 1], new_hex[2 * SP_DIGEST_LEN + 1];
    sp_hex(st.digest, SP_DIGEST_LEN, have_hex);
    sp_hex(in->digest, SP_DIGEST_LEN, new_hex);
    buf_t k = {0}, v = {0}, rec = {0};
    char *val = NULL;
    size_t vlen = 0;
    uint64_t kept = 0;
    /* Only the instance's bytes and record are replaced, never its location
     * (see store.h): a version under another study or series stays aside. */
    bool wins = store_version_wins(in->policy, in->version, in->digest, st.version, st.digest) &&
                strcmp(study, loc->study) == 0 && strcmp(series, loc->series) == 0;
    conflict_key(&k, sop, in->digest);
    rc = db_get(s, s->ro, CF_CONFLICTS, &k, &val, &vlen, sop);
    bool was_aside = rc == 0;
    if (rc != 0 && rc != SP_ENOTFOUND)
        goto out;
    if (was_aside && !wins) {
        log_warn("store: SOP %s of study %s sent again with digest %s (stored %s); "
                 "this version is already kept aside",
                 sop, loc->study, new_hex, have_hex);
        *outcome = kept_aside_outcome(in->policy);
        rc = 0;
        goto out;
    }
    /* Both paths need one more slot, except a winner that was aside already
     * (it leaves its slot to the version it replaces). A repair keeps the
     * version it replaces whatever the count, so replicas converge. */
    buf_t prefix = {0};
    buf_str(&prefix, sop);
    buf_byte(&prefix, 0);
    rc = count_prefix(s, NULL, CF_CONFLICTS, &prefix, &kept);
    buf_free(&prefix);
    if (rc)
        goto out;
    if (!was_aside && kept >= (uint64_t)s->max_conflicts && !(repair && wins)) {
        atomic_fetch_add(&s->conflicts_refused, 1);
        log_warn("store: refusing SOP %s of study %s with digest %s (version %llu, %s): "
                 "%llu other versions are kept already (max_conflicts %d); stored copy has %s",
                 sop, loc->study, new_hex, (unsigned long long)in->version,
                 store_policy_name(in->policy), (unsigned long long)kept, s->max_conflicts,
                 have_hex);
        *outcome = STORE_CONFLICT_LIMIT;
        rc = 0;
        goto out;
    }
    if (wins) {
        rc = replace_instance(s, in, sop, loc, &st, was_aside);
        if (rc)
            goto out;
        log_warn("store: SOP %s of study %s: version %llu (digest %s) replaces version %llu "
                 "(digest %s) by policy %s%s; the replaced version is kept aside",
                 sop, loc->study, (unsigned long long)in->version, new_hex,
                 (unsigned long long)st.version, have_hex, store_policy_name(in->policy),
                 repair ? " (repair)" : "");
        *outcome = in->policy == STORE_POLICY_REJECT ? STORE_CONFLICT : STORE_REPLACED;
        goto out;
    }
    rec_encode(&rec, 'I', in->attrs, in->len, in->digest, in->version, in->policy);
    conflict_value(&v, in->partition, rec.p, rec.len, in->data, in->len);
    char *err = NULL;
    rocksdb_put_cf(s->db, s->wo_sync, s->cf[CF_CONFLICTS], k.p, k.len, v.p, v.len, &err);
    if (err) {
        rc = db_fail(err, "write of conflicting copy of SOP", sop);
        goto out;
    }
    atomic_fetch_add(&s->conflicts, 1);
    log_warn("store: conflict: SOP %s of study %s received with digest %s (version %llu, %s), "
             "stored copy has %s (version %llu); the stored one stays and the new one is kept "
             "aside",
             sop, loc->study, new_hex, (unsigned long long)in->version,
             store_policy_name(in->policy), have_hex, (unsigned long long)st.version);
    *outcome = kept_aside_outcome(in->policy);
    rc = 0;
out:
    rocksdb_free(st.rec);
    rocksdb_free(val);
    buf_free(&k);
    buf_free(&v);
    buf_free(&rec);
    return rc;
}

/* Adds the study record, the study locator and the secondary entries of a
 * new study to a batch. */
static void batch_study(rocksdb_writebatch_t *wb, store_t *s, const store_put_t *in,
                        const char *study, buf_t *k, buf_t *v)
{
    char p[2] = {(char)((in->partition >> 8) & 0xff), (char)(in->partition & 0xff)};
    key_loc(k, 'T', in->partition, study, NULL, NULL, false);
    rec_encode(v, 'T', in->attrs, 0, NULL, 0, STORE_POLICY_UNSET);
    rocksdb_writebatch_put_cf(wb, s->cf[CF_INDEX], k->p, k->len, v->p, v->len);
    key_uid(k, 'S', study);
    rocksdb_writebatch_put_cf(wb, s->cf[CF_SECONDARY], k->p, k->len, p, 2);
    for (size_t i = 0; i < SP_ARRAY_LEN(sec_indexes); i++) {
        const char *value = attrs_str(in->attrs, sec_indexes[i].id), *item;
        size_t pos = 0, n;
        while (next_value(value, &pos, &item, &n)) {
            if (!sec_indexed(sec_indexes[i].type, n))
                continue;
            sec_key(k, sec_indexes[i].type, item, n, study);
            rocksdb_writebatch_put_cf(wb, s->cf[CF_SECONDARY], k->p, k->len, p, 2);
        }
    }
}

static bool put_attrs_valid(const attrs_t *a)
{
    for (size_t i = 0; i < ATTR_STORED_COUNT; i++)
        if (a->v[i] && strlen(a->v[i]) > MAX_VALUE_LEN)
            return false;
    return true;
}

/* store_put(), or store_repair() when repair is set: the same validation
 * and locking; they differ only for a SOP already stored with the same
 * digest (put_existing). */
static int put_one(store_t *s, const store_put_t *in, bool repair, store_outcome_t *outcome)
{
    if (!s || !in || !in->attrs || !outcome)
        return SP_EINVAL;
    const char *study = attrs_get(in->attrs, ATTR_STUDY_INSTANCE_UID);
    const char *series = attrs_get(in->attrs, ATTR_SERIES_INSTANCE_UID);
    const char *sop = attrs_get(in->attrs, ATTR_SOP_INSTANCE_UID);
    if (!sp_uid_valid(study) || !sp_uid_valid(series) || !sp_uid_valid(sop) ||
        in->partition > 0xffff || in->len == 0 || !in->data || !put_attrs_valid(in->attrs) ||
        (unsigned)in->policy > STORE_POLICY_KEEP_NEWEST ||
        (in->version == 0) != (in->policy == STORE_POLICY_UNSET))
        return SP_EINVAL; /* the caller logs it, naming the sender */
    uint8_t digest[SP_DIGEST_LEN];
    sp_digest(in->data, in->len, digest);
    if (memcmp(digest, in->digest, SP_DIGEST_LEN) != 0)
        return SP_EDIGEST; /* likewise */

    pthread_mutex_t *sop_lock = &s->sop_locks[stripe(sop)], *study_lock = NULL;
    size_t gate = stripe(study), gate2 = SIZE_MAX;
    buf_t k = {0}, v = {0};
    rocksdb_writebatch_t *wb = NULL;
    char *val = NULL;
    size_t vlen = 0;
    bool new_study = false, new_series = false;
    uint32_t part = 0;
    loc_t loc;
    long rank = -1;
    pthread_mutex_lock(sop_lock);
    lock_order(&rank, RANK_SOP);
    /* The study's gate keeps store_delete_partition() out of this study from
     * the first read to the write, so a put lands wholly before or wholly
     * after the study's deletion. Lock order: SOP stripe, then gates in
     * increasing stripe order, then the study creation stripe. */
    gate_enter(&s->study_gates[gate]);
    lock_order(&rank, RANK_GATE(gate));

    int rc = sop_locate(s, s->ro, sop, &loc);
    if (rc == 0 && strcmp(loc.study, study) != 0 && stripe(loc.study) != gate) {
        /* The SOP is stored under another study (a reused UID): its
         * duplicate check and any conflict copy concern that study, so hold
         * its gate too, then look again - while we hold the SOP stripe the
         * locator can only have been deleted, never moved. */
        gate2 = stripe(loc.study);
        if (gate2 < gate) {
            gate_leave(&s->study_gates[gate]);
            rank = RANK_SOP;
            gate_enter(&s->study_gates[gate2]);
            lock_order(&rank, RANK_GATE(gate2));
            gate_enter(&s->study_gates[gate]);
            lock_order(&rank, RANK_GATE(gate));
        } else {
            gate_enter(&s->study_gates[gate2]);
            lock_order(&rank, RANK_GATE(gate2));
        }
        rc = sop_locate(s, s->ro, sop, &loc);
    }
    if (rc == 0) {
        rc = put_existing(s, in, sop, &loc, repair, outcome);
        goto out;
    }
    if (rc != SP_ENOTFOUND)
        goto out;

    /* The first put of a study writes its study record and secondary entries
     * under a study stripe, re-checking inside it, so they are written once
     * and the study count and partition check stay exact under races. Later
     * puts of the study find the locator and take no study lock, so puts of
     * one study's instances still commit concurrently. */
    rc = study_partition(s, s->ro, study, &part);
    if (rc == SP_ENOTFOUND) {
        study_lock = &s->study_locks[stripe(study)];
        pthread_mutex_lock(study_lock);
        lock_order(&rank, RANK_STUDY);
        rc = study_partition(s, s->ro, study, &part);
        if (rc == SP_ENOTFOUND) {
            new_study = true;
            rc = 0;
        } else {
            pthread_mutex_unlock(study_lock);
            study_lock = NULL;
        }
    }
    if (rc)
        goto out;
    if (!new_study && part != in->partition) {
        rc = SP_EINVAL; /* the caller logs it, naming the sender and the partition it sent */
        goto out;
    }

    /* A series record is written by the put that finds it absent. Two first
     * puts of one series racing here may both write it; both derive it from
     * instances of the same series, so whichever lands last is equivalent,
     * and no counter depends on it. */
    new_series = new_study;
    if (!new_study) {
        key_loc(&k, 'R', in->partition, study, series, NULL, false);
        rc = db_get(s, s->ro, CF_INDEX, &k, &val, &vlen, sop);
        if (rc == SP_ENOTFOUND)
            new_series = true;
        else if (rc)
            goto out;
        rc = 0;
    }

    wb = rocksdb_writebatch_create();
    key_loc(&k, 'I', in->partition, study, series, sop, false);
    rec_encode(&v, 'I', in->attrs, in->len, digest, in->version, in->policy);
    rocksdb_writebatch_put_cf(wb, s->cf[CF_INDEX], k.p, k.len, v.p, v.len);
    if (new_series) {
        key_loc(&k, 'R', in->partition, study, series, NULL, false);
        rec_encode(&v, 'R', in->attrs, 0, NULL, 0, STORE_POLICY_UNSET);
        rocksdb_writebatch_put_cf(wb, s->cf[CF_INDEX], k.p, k.len, v.p, v.len);
    }
    if (new_study)
        batch_study(wb, s, in, study, &k, &v);
    key_uid(&k, 'U', sop);
    key_loc(&v, 0, in->partition, study, series, NULL, false);
    rocksdb_writebatch_put_cf(wb, s->cf[CF_SECONDARY], k.p, k.len, v.p, v.len);
    /* The metadata is derived here, from the verified bytes, rather than
     * carried in the put: a repair copy (store_put/store_repair from
     * node/repair.c) then brings it along without knowing about it. */
    loc_t at = {.part = in->partition, .study = study, .series = series};
    batch_meta(wb, s, in, &at, sop);
    /* The object goes in last: the batch's buffer grows once to hold it
     * instead of being copied again by every later, smaller put. */
    key_loc(&k, 0, in->partition, study, series, sop, false);
    rocksdb_writebatch_put_cf(wb, s->cf[CF_OBJECTS], k.p, k.len, (const char *)in->data, in->len);

    char *err = NULL;
    rocksdb_write(s->db, s->wo_sync, wb, &err);
    if (err) {
        char what[160];
        sp_fmt(what, sizeof what, "%s of study %s", sop, study);
        rc = db_fail(err, "write of SOP", what);
        goto out;
    }
    sum_add(s, in->partition, sop, digest, in->len, +1);
    atomic_fetch_add(&s->instances, 1);
    atomic_fetch_add(&s->bytes, in->len);
    if (new_study)
        atomic_fetch_add(&s->studies, 1);
    *outcome = STORE_STORED;
out:
    if (study_lock)
        pthread_mutex_unlock(study_lock);
    if (gate2 != SIZE_MAX)
        gate_leave(&s->study_gates[gate2]);
    gate_leave(&s->study_gates[gate]);
    pthread_mutex_unlock(sop_lock);
    if (wb)
        rocksdb_writebatch_destroy(wb);
    rocksdb_free(val);
    buf_free(&k);
    buf_free(&v);
    return rc;
}

int store_put(store_t *s, const store_put_t *in, store_outcome_t *outcome)
{
    return put_one(s, in, false, outcome);
}

int store_repair(store_t *s, const store_put_t *in, store_outcome_t *outcome)
{
    return put_one(s, in, true, outcome);
}

/* ---- get ------------------------------------------------------------ */

int store_get(store_t *s, const char *sop_uid, store_object_t *out)
{
    if (!s || !out)
        return SP_EINVAL;
    memset(out, 0, sizeof *out);
    if (!sp_uid_valid(sop_uid))
        return SP_EINVAL;
    loc_t loc;
    char *data = NULL;
    size_t len = 0;
    uint64_t size = 0;
    int rc = sop_locate(s, s->ro, sop_uid, &loc);
    if (rc)
        return rc;
    stored_t st;
    rc = stored_load(s, sop_uid, &loc, &st);
    if (rc == 0 && rec_decode(st.rec, st.reclen, 'I', &out->attrs, &size, out->digest) != 0)
        rc = SP_EDB; /* stored_load() validated it: cannot happen */
    if (rc == 0) {
        out->version = st.version;
        out->policy = st.policy;
        rocksdb_free(st.rec);
    }
    if (rc == 0)
        rc = object_read(s, s->ro_object, &loc, sop_uid, size, out->digest, &data, &len);
    if (rc) {
        store_object_free(out);
        return rc == SP_ENOTFOUND ? SP_EDB : rc;
    }
    out->partition = loc.part;
    out->data = (uint8_t *)data;
    out->len = len;
    return 0;
}

/* Rebuilds a missing or stale 'M' record from the verified object (an
 * instance stored before records were kept, or replaced by a binary that
 * did not keep them). The record is a cache of the object, so the write is
 * not synced. Returns 0 with *obj (the object, rocksdb_free) and v set. */
static int meta_rebuild(store_t *s, const loc_t *loc, const char *sop, const stored_t *st,
                        char **obj, size_t *objlen, buf_t *v)
{
    int rc = object_read(s, s->ro_object, loc, sop, st->size, st->digest, obj, objlen);
    if (rc != 0)
        return rc == SP_ENOTFOUND ? SP_EDB : rc;
    meta_value(v, (const uint8_t *)*obj, *objlen, st->digest);
    buf_t k = {0};
    char *err = NULL;
    key_loc(&k, 'M', loc->part, loc->study, loc->series, sop, false);
    rocksdb_writeoptions_t *wo = rocksdb_writeoptions_create();
    rocksdb_put_cf(s->db, wo, s->cf[CF_INDEX], k.p, k.len, v->p, v->len, &err);
    rocksdb_writeoptions_destroy(wo);
    buf_free(&k);
    if (err) {
        /* Served all the same; the next read tries again. */
        log_warn("store: cannot keep the metadata of SOP %s: %s", sop, err);
        rocksdb_free(err);
    }
    atomic_fetch_add(&s->metadata_rebuilt, 1);
    return 0;
}

int store_metadata(store_t *s, const char *sop_uid, store_object_t *out)
{
    if (!s || !out)
        return SP_EINVAL;
    memset(out, 0, sizeof *out);
    if (!sp_uid_valid(sop_uid))
        return SP_EINVAL;
    loc_t loc;
    stored_t st;
    uint64_t size = 0;
    char *val = NULL, *obj = NULL;
    size_t vlen = 0, objlen = 0;
    buf_t k = {0}, v = {0};
    int rc = sop_locate(s, s->ro, sop_uid, &loc);
    if (rc)
        return rc;
    rc = stored_load(s, sop_uid, &loc, &st);
    if (rc)
        return rc;
    if (rec_decode(st.rec, st.reclen, 'I', &out->attrs, &size, out->digest) != 0) {
        rc = SP_EDB; /* stored_load() validated it: cannot happen */
        goto out;
    }
    out->version = st.version;
    out->policy = st.policy;
    out->partition = loc.part;
    key_loc(&k, 'M', loc.part, loc.study, loc.series, sop_uid, false);
    rc = db_get(s, s->ro, CF_INDEX, &k, &val, &vlen, sop_uid);
    if (rc != 0 && rc != SP_ENOTFOUND)
        goto out;
    bool usable = rc == 0 && vlen >= META_HEAD && (uint8_t)val[0] == META_FORMAT &&
                  ((uint8_t)val[1] == META_CUT || (uint8_t)val[1] == META_WHOLE) &&
                  memcmp(val + 2, st.digest, SP_DIGEST_LEN) == 0;
    rc = 0;
    if (usable && (uint8_t)val[1] == META_CUT) {
        /* The record's own buffer, its head dropped. */
        memmove(val, val + META_HEAD, vlen - META_HEAD);
        out->data = (uint8_t *)val;
        out->len = vlen - META_HEAD;
        val = NULL;
        goto out;
    }
    if (usable) {
        rc = object_read(s, s->ro_object, &loc, sop_uid, st.size, st.digest, &obj, &objlen);
        if (rc == SP_ENOTFOUND)
            rc = SP_EDB;
    } else {
        rc = meta_rebuild(s, &loc, sop_uid, &st, &obj, &objlen, &v);
        if (rc == 0 && v.p[1] == META_CUT) {
            out->data = sp_memdup(v.p + META_HEAD, v.len - META_HEAD);
            out->len = v.len - META_HEAD;
            goto out;
        }
    }
    if (rc == 0) {
        out->data = (uint8_t *)obj;
        out->len = objlen;
        obj = NULL;
    }
out:
    rocksdb_free(st.rec);
    rocksdb_free(val);
    rocksdb_free(obj);
    buf_free(&k);
    buf_free(&v);
    if (rc)
        store_object_free(out);
    return rc;
}

void store_object_free(store_object_t *o)
{
    if (!o)
        return;
    attrs_clear(&o->attrs);
    store_buffer_free(o->data);
    memset(o, 0, sizeof *o);
}

void store_buffer_free(void *data)
{
    rocksdb_free(data);
}

/* ---- listing -------------------------------------------------------- */

/* Calls fn for one 'I' entry of an iterator. Returns fn's answer, or SP_EDB
 * for a corrupt key or record. */
static int entry_call(const char *k, size_t kn, const char *v, size_t vn, store_entry_fn fn,
                      void *ctx)
{
    loc_t loc;
    attrs_t a = {0};
    store_entry_t e;
    char text[256];
    memset(&e, 0, sizeof e);
    if (kn < 1 || loc_parse(k + 1, kn - 1, 3, &loc) != 0 ||
        rec_decode(v, vn, 'I', &a, &e.size, e.digest) != 0) {
        log_error("store: corrupt index record %s", key_text(k, kn, text, sizeof text));
        return SP_EDB;
    }
    rec_version(v, vn, &e.version, &e.policy);
    e.partition = loc.part;
    e.study_uid = loc.study;
    e.series_uid = loc.series;
    e.sop_uid = loc.sop;
    e.sop_class_uid = attrs_str(&a, ATTR_SOP_CLASS_UID);
    e.transfer_syntax_uid = attrs_str(&a, ATTR_TRANSFER_SYNTAX_UID);
    int r = fn(ctx, &e);
    attrs_clear(&a);
    return r;
}

/* Calls fn for each instance record whose key starts with prefix, in key
 * order. Returns 0 (also when fn asked to stop), fn's negative answer, or
 * SP_EDB (also for a corrupt record); `what` names the range in logs. */
static int list_prefix(store_t *s, const buf_t *prefix, store_entry_fn fn, void *ctx,
                       const char *what)
{
    int rc = 0;
    scan_t sc;
    scan_prefix(&sc, s, NULL, CF_INDEX, prefix->p, prefix->len);
    for (; scan_valid(&sc); scan_next(&sc)) {
        size_t kn, vn;
        const char *k = scan_key(&sc, &kn), *v = scan_value(&sc, &vn);
        int r = entry_call(k, kn, v, vn, fn, ctx);
        if (r < 0)
            rc = r;
        if (r)
            break;
    }
    int rc2 = scan_close(&sc, what);
    return rc ? rc : rc2;
}

/* Computes a partition's summary from its instance records (one iterator,
 * so one state of the partition). Returns 0 or SP_EDB. */
static int partition_summary(store_t *s, uint32_t partition, store_partition_summary_t *out)
{
    memset(out, 0, sizeof *out);
    uint64_t n = 0, total = 0;
    int rc = 0;
    char prefix[3] = {'I', (char)((partition >> 8) & 0xff), (char)(partition & 0xff)};
    char text[256];
    scan_t sc;
    scan_prefix(&sc, s, NULL, CF_INDEX, prefix, sizeof prefix);
    for (; scan_valid(&sc); scan_next(&sc)) {
        size_t kn, vn;
        const char *k = scan_key(&sc, &kn), *v = scan_value(&sc, &vn);
        loc_t loc;
        uint64_t size = 0;
        uint8_t d[SP_DIGEST_LEN];
        if (loc_parse(k + 1, kn - 1, 3, &loc) != 0 || rec_decode(v, vn, 'I', NULL, &size, d)) {
            log_error("store: corrupt index record %s", key_text(k, kn, text, sizeof text));
            rc = SP_EDB;
            break;
        }
        uint64_t term[4];
        digest_term(loc.sop, d, term);
        digest_apply(out->digest, term, +1);
        n++;
        total += size;
    }
    int rc2 = scan_close(&sc, "a partition");
    rc = rc ? rc : rc2;
    out->partition = partition;
    out->count = n;
    out->bytes = total;
    return rc;
}

int store_partition_digest(store_t *s, uint32_t partition, uint8_t digest[SP_DIGEST_LEN],
                           uint64_t *count, uint64_t *bytes)
{
    if (!s || partition > 0xffff)
        return SP_EINVAL;
    store_partition_summary_t sum;
    int rc = partition_summary(s, partition, &sum);
    if (rc)
        return rc;
    if (digest)
        memcpy(digest, sum.digest, SP_DIGEST_LEN);
    if (count)
        *count = sum.count;
    if (bytes)
        *bytes = sum.bytes;
    return 0;
}

/* A partition's kept summary (sum_add). Called with sum_lock held. Returns
 * 0, or SP_EDB for a partition with a corrupt instance record. */
static int summary_of(store_t *s, uint32_t p, store_partition_summary_t *out)
{
    *out = s->sums[p].sum;
    return s->sums[p].corrupt ? SP_EDB : 0;
}

int store_partition_summaries(store_t *s, store_summary_fn fn, void *ctx)
{
    if (!s || !fn)
        return SP_EINVAL;
    int rc = 0, skipped = 0;
    pthread_mutex_lock(&s->sum_lock);
    for (uint32_t p = 0; p < PARTITIONS; p++) {
        store_partition_summary_t sum;
        int r = summary_of(s, p, &sum);
        if (r) {
            if (!skipped)
                skipped = r; /* count_at_open() logged it */
            continue;
        }
        if (sum.count == 0)
            continue;
        pthread_mutex_unlock(&s->sum_lock);
        r = fn(ctx, &sum);
        pthread_mutex_lock(&s->sum_lock);
        if (r) {
            rc = r < 0 ? r : 0;
            break;
        }
    }
    pthread_mutex_unlock(&s->sum_lock);
    return rc ? rc : skipped;
}

/* Parses a cursor "study/series/sop" into the 'I' key it names. */
static int cursor_key(uint32_t part, const char *cursor, buf_t *k)
{
    char tmp[LOC_MAX + 1];
    if (strlen(cursor) > LOC_MAX)
        return SP_EINVAL;
    sp_strlcpy(tmp, cursor, sizeof tmp);
    char *series = strchr(tmp, '/');
    char *sop = series ? strchr(series + 1, '/') : NULL;
    if (!sop)
        return SP_EINVAL;
    *series++ = '\0';
    *sop++ = '\0';
    if (!sp_uid_valid(tmp) || !sp_uid_valid(series) || !sp_uid_valid(sop))
        return SP_EINVAL;
    key_loc(k, 'I', part, tmp, series, sop, false);
    return 0;
}

static char *cursor_of(const loc_t *loc)
{
    size_t n = strlen(loc->study) + strlen(loc->series) + strlen(loc->sop) + 3;
    char *c = sp_malloc(n);
    snprintf(c, n, "%s/%s/%s", loc->study, loc->series, loc->sop);
    return c;
}

/* Calls fn for the instance records whose key starts with prefix, in key
 * order, at most limit (0 = all), starting after the cursor (a
 * "study/series/sop" in partition part, whose key must lie under prefix;
 * NULL or "" = from the start). *next_cursor (caller frees; NULL when the
 * range is exhausted) resumes after the last entry passed to fn, including
 * one for which fn asked to stop. Each call reads the database as it is
 * then (no snapshot across pages), so an instance stored meanwhile after
 * the cursor shows up on a later page. Returns 0, SP_EINVAL (cursor), fn's
 * negative answer or SP_EDB. */
static int list_page(store_t *s, uint32_t part, const buf_t *prefix, const char *cursor,
                     size_t limit, store_entry_fn fn, void *ctx, char **next_cursor,
                     const char *what)
{
    buf_t start = {0}, end = {0};
    int rc = 0;
    if (cursor && cursor[0]) {
        rc = cursor_key(part, cursor, &start);
        if (rc == 0 && (start.len < prefix->len || memcmp(start.p, prefix->p, prefix->len) != 0))
            rc = SP_EINVAL; /* a cursor of another study, series or partition */
        if (rc) {
            buf_free(&start);
            return rc;
        }
    } else {
        buf_add(&start, prefix->p, prefix->len);
    }
    bool bounded = prefix_end(&end, prefix->p, prefix->len);
    scan_t sc;
    scan_open(&sc, s, NULL, CF_INDEX, start.p, start.len, bounded ? end.p : NULL, end.len);
    buf_free(&end);
    size_t seen = 0;
    loc_t last;
    bool more = false;
    for (; scan_valid(&sc); scan_next(&sc)) {
        size_t kn, vn;
        const char *k = scan_key(&sc, &kn), *v = scan_value(&sc, &vn);
        if (cursor && cursor[0] && bytes_cmp(k, kn, start.p, start.len) == 0)
            continue; /* the cursor names the last entry already visited */
        if (limit && seen == limit) {
            more = true;
            break;
        }
        if (loc_parse(k + 1, kn - 1, 3, &last) != 0) {
            char text[256];
            log_error("store: corrupt index key %s", key_text(k, kn, text, sizeof text));
            rc = SP_EDB;
            break;
        }
        seen++;
        int r = entry_call(k, kn, v, vn, fn, ctx);
        if (r < 0) {
            rc = r;
            break;
        }
        if (r) {
            more = true;
            break;
        }
    }
    buf_free(&start);
    int rc2 = scan_close(&sc, what);
    rc = rc ? rc : rc2;
    if (rc == 0 && more && next_cursor)
        *next_cursor = cursor_of(&last);
    return rc;
}

int store_list(store_t *s, const char *study_uid, const char *series_uid, const char *cursor,
               size_t limit, store_entry_fn fn, void *ctx, char **next_cursor)
{
    if (next_cursor)
        *next_cursor = NULL;
    if (!s || !fn || !sp_uid_valid(study_uid) || (series_uid && !sp_uid_valid(series_uid)))
        return SP_EINVAL;
    uint32_t part;
    int rc = study_partition(s, s->ro, study_uid, &part);
    if (rc)
        return rc == SP_ENOTFOUND ? 0 : rc;
    buf_t prefix = {0};
    key_loc(&prefix, 'I', part, study_uid, series_uid, NULL, true);
    rc = list_page(s, part, &prefix, cursor, limit, fn, ctx, next_cursor, study_uid);
    buf_free(&prefix);
    return rc;
}

int store_partition_list(store_t *s, uint32_t partition, const char *cursor, size_t limit,
                         store_entry_fn fn, void *ctx, char **next_cursor)
{
    if (next_cursor)
        *next_cursor = NULL;
    if (!s || !fn || partition > 0xffff)
        return SP_EINVAL;
    buf_t prefix = {0};
    buf_byte(&prefix, 'I');
    buf_part(&prefix, partition);
    int rc = list_page(s, partition, &prefix, cursor, limit, fn, ctx, next_cursor, "a partition");
    buf_free(&prefix);
    return rc;
}

/* ---- find ----------------------------------------------------------- */

typedef struct {
    store_t *s;
    level_t level;
    const attrs_t *keys;
    unsigned flags;
    size_t limit;
    bool use_index;
    const rocksdb_snapshot_t *snap; /* every read of one query sees one state */
    rocksdb_readoptions_t *ro;
    store_result_fn fn;
    void *ctx;
    size_t emitted;
    /* Patient counts last computed for a study-level result, by PatientID. */
    char *count_pid;
    uint64_t counts[3];
} find_t;

/* The query's key for an attribute, or NULL when it is not asked for, is
 * below the query level (ignored), or is SpecificCharacterSet (which
 * describes the query's encoding and never matches). */
static const char *fkey(const find_t *f, attr_id_t id)
{
    if (id == ATTR_SPECIFIC_CHARACTER_SET || attr_info(id)->level > f->level)
        return NULL;
    return f->keys->v[id];
}

/* A key that restricts something: not absent, empty or only '*'. */
static const char *fkey_matching(const find_t *f, attr_id_t id)
{
    const char *k = fkey(f, id);
    if (!k || k[strspn(k, "*")] == '\0')
        return NULL;
    return k;
}

/* Checks every matching key held by a record of `kind` (study records for
 * patient and study keys, series records, instance records for image keys). */
static bool match_rec(const find_t *f, char kind, const attrs_t *rec)
{
    for (unsigned id = 0; id < ATTR_STORED_COUNT; id++) {
        level_t l = attr_info((attr_id_t)id)->level;
        bool mine = kind == 'T'   ? l <= LEVEL_STUDY
                    : kind == 'R' ? l == LEVEL_SERIES
                                  : l == LEVEL_IMAGE;
        const char *k = mine ? fkey(f, (attr_id_t)id) : NULL;
        if (k && k[0] && !match_value(attr_info((attr_id_t)id)->kind, k, rec->v[id], f->flags))
            return false;
    }
    return true;
}

/* Checks the matching keys on computed attributes of one level. */
static bool match_computed(const find_t *f, level_t level, const attrs_t *comp)
{
    for (unsigned id = ATTR_STORED_COUNT; id < ATTR_COUNT; id++) {
        const attr_info_t *ai = attr_info((attr_id_t)id);
        const char *k = ai->level == level ? fkey(f, (attr_id_t)id) : NULL;
        if (k && k[0] && !match_value(ai->kind, k, comp->v[id], f->flags))
            return false;
    }
    return true;
}

static int str_cmp(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Sorts and de-duplicates a list of strings, freeing the duplicates. */
static size_t sort_unique(char **v, size_t n)
{
    if (n == 0)
        return 0;
    qsort(v, n, sizeof *v, str_cmp);
    size_t o = 1;
    for (size_t i = 1; i < n; i++) {
        if (strcmp(v[i], v[o - 1]) == 0)
            free(v[i]);
        else
            v[o++] = v[i];
    }
    return o;
}

/* Counts a study's series and instances and collects its modalities; NULL
 * outputs are skipped. *modalities is "CT\\MR" sorted, caller frees. */
static int study_counts(find_t *f, uint32_t part, const char *study, uint64_t *nseries,
                        uint64_t *ninstances, char **modalities)
{
    buf_t k = {0};
    int rc = 0;
    if (nseries || modalities) {
        char **mods = NULL;
        size_t nmods = 0, cap = 0;
        uint64_t n = 0;
        scan_t sc;
        key_loc(&k, 'R', part, study, NULL, NULL, true);
        scan_prefix(&sc, f->s, f->snap, CF_INDEX, k.p, k.len);
        for (; scan_valid(&sc); scan_next(&sc)) {
            n++;
            if (!modalities)
                continue;
            size_t vn, kn;
            const char *v = scan_value(&sc, &vn);
            attrs_t r = {0};
            if (rec_decode(v, vn, 'R', &r, NULL, NULL) != 0) {
                char text[256];
                const char *key = scan_key(&sc, &kn);
                log_error("store: corrupt index record %s", key_text(key, kn, text, sizeof text));
                rc = SP_EDB;
                break;
            }
            const char *m = attrs_str(&r, ATTR_MODALITY), *item;
            size_t pos = 0, len;
            while (next_value(m, &pos, &item, &len)) {
                if (len == 0)
                    continue;
                if (nmods == cap) {
                    cap = cap ? 2 * cap : 8;
                    mods = sp_realloc(mods, cap * sizeof *mods);
                }
                mods[nmods++] = sp_strndup(item, len);
            }
            attrs_clear(&r);
        }
        int rc2 = scan_close(&sc, study);
        rc = rc ? rc : rc2;
        if (nseries)
            *nseries = n;
        if (modalities) {
            nmods = sort_unique(mods, nmods);
            buf_t joined = {0};
            for (size_t i = 0; i < nmods; i++) {
                if (i)
                    buf_byte(&joined, '\\');
                buf_str(&joined, mods[i]);
                free(mods[i]);
            }
            buf_byte(&joined, 0);
            *modalities = joined.p; /* ownership moves to the caller */
            free(mods);
        }
    }
    if (rc == 0 && ninstances) {
        key_loc(&k, 'I', part, study, NULL, NULL, true);
        rc = count_prefix(f->s, f->snap, CF_INDEX, &k, ninstances);
    }
    buf_free(&k);
    return rc;
}

/* Parses a secondary entry type|value\0study -> P into its value (not
 * terminated; *vn bytes), study and partition. Returns 0 or SP_EDB. */
static int sec_parse(const char *k, size_t kn, const char *v, size_t vn, const char **val,
                     size_t *valn, char study[65], uint32_t *part)
{
    const char *nul = kn > 1 ? memchr(k + 1, 0, kn - 1) : NULL;
    if (!nul || vn != 2)
        return SP_EDB;
    size_t sn = kn - (size_t)(nul + 1 - k);
    if (sn == 0 || sn > 64)
        return SP_EDB;
    memcpy(study, nul + 1, sn);
    study[sn] = '\0';
    if (!sp_uid_valid(study))
        return SP_EDB;
    *val = k + 1;
    *valn = (size_t)(nul - (k + 1));
    *part = part_of(v);
    return 0;
}

/* Decides whether an index scan over [lo, hi) should take a study at the
 * entry `key`. A multi-valued attribute gives a study one entry per value,
 * so the scan may meet it several times: it is taken only at the first of
 * its entries inside the range. An entry the study record does not produce
 * (it cannot happen while study records are never rewritten) is skipped. */
static bool sec_take(char type, attr_id_t id, const attrs_t *t, const char *study, const char *key,
                     size_t kn, const buf_t *lo, const buf_t *hi)
{
    const char *value = attrs_str(t, id), *item;
    size_t pos = 0, n;
    bool found = false, earlier = false;
    buf_t k = {0};
    while (next_value(value, &pos, &item, &n)) {
        if (!sec_indexed(type, n))
            continue;
        sec_key(&k, type, item, n, study);
        int c = bytes_cmp(k.p, k.len, key, kn);
        if (c == 0)
            found = true;
        else if (c < 0 && bytes_cmp(k.p, k.len, lo->p, lo->len) >= 0 &&
                 (hi->len == 0 || bytes_cmp(k.p, k.len, hi->p, hi->len) < 0))
            earlier = true;
    }
    buf_free(&k);
    return found && !earlier;
}

/* Counts the studies, series and instances of the patient whose PatientID
 * is pid (the whole value), using the patient index. Caches the last one. */
static int patient_counts(find_t *f, const char *pid, uint64_t counts[3])
{
    if (f->count_pid && strcmp(f->count_pid, pid) == 0) {
        memcpy(counts, f->counts, sizeof f->counts);
        return 0;
    }
    const char *first;
    size_t pos = 0, n = 0;
    next_value(pid, &pos, &first, &n);
    buf_t prefix = {0};
    sec_key(&prefix, 'p', first, n, "");
    uint64_t c[3] = {0, 0, 0};
    int rc = 0;
    scan_t sc;
    scan_prefix(&sc, f->s, f->snap, CF_SECONDARY, prefix.p, prefix.len);
    for (; rc == 0 && scan_valid(&sc); scan_next(&sc)) {
        size_t kn, vn, valn;
        const char *k = scan_key(&sc, &kn), *v = scan_value(&sc, &vn), *val;
        char study[65];
        uint32_t part;
        attrs_t t = {0};
        if (sec_parse(k, kn, v, vn, &val, &valn, study, &part) != 0) {
            log_error("store: corrupt patient index entry of PatientID %s", pid);
            rc = SP_EDB;
            break;
        }
        rc = load_rec(f->s, f->ro, 'T', part, study, NULL, NULL, &t, NULL, NULL);
        if (rc == 0 && strcmp(attrs_str(&t, ATTR_PATIENT_ID), pid) == 0) {
            uint64_t series = 0, inst = 0;
            rc = study_counts(f, part, study, &series, &inst, NULL);
            c[0]++;
            c[1] += series;
            c[2] += inst;
        }
        if (rc == SP_ENOTFOUND)
            rc = 0; /* an entry without its study: nothing to count */
        attrs_clear(&t);
    }
    int rc2 = scan_close(&sc, "patient index");
    buf_free(&prefix);
    rc = rc ? rc : rc2;
    if (rc == 0) {
        free(f->count_pid);
        f->count_pid = sp_strdup(pid);
        memcpy(f->counts, c, sizeof c);
        memcpy(counts, c, sizeof c);
    }
    return rc;
}

/* Passes one result to the caller: the requested attributes of the level
 * and above (empty when not stored), the unique keys down to the level and
 * SpecificCharacterSet when stored. Returns 0, FIND_STOP or SP_ELIMIT. */
static int emit(find_t *f, const attrs_t *t, const attrs_t *r, const attrs_t *i,
                const attrs_t *comp, const char *study, const char *series, const char *sop)
{
    if (f->limit && f->emitted >= f->limit)
        return SP_ELIMIT;
    attrs_t res = {0};
    for (unsigned id = 0; id < ATTR_COUNT; id++) {
        if (!fkey(f, (attr_id_t)id))
            continue;
        level_t l = attr_info((attr_id_t)id)->level;
        const attrs_t *src = id >= ATTR_STORED_COUNT ? comp
                             : l <= LEVEL_STUDY      ? t
                             : l == LEVEL_SERIES     ? r
                                                     : i;
        attrs_set(&res, (attr_id_t)id, src ? attrs_str(src, (attr_id_t)id) : "");
    }
    attrs_set(&res, ATTR_PATIENT_ID, attrs_str(t, ATTR_PATIENT_ID));
    if (study)
        attrs_set(&res, ATTR_STUDY_INSTANCE_UID, study);
    if (series)
        attrs_set(&res, ATTR_SERIES_INSTANCE_UID, series);
    if (sop)
        attrs_set(&res, ATTR_SOP_INSTANCE_UID, sop);
    if (attrs_get(t, ATTR_SPECIFIC_CHARACTER_SET))
        attrs_set(&res, ATTR_SPECIFIC_CHARACTER_SET, attrs_get(t, ATTR_SPECIFIC_CHARACTER_SET));
    f->emitted++;
    int stop = f->fn(f->ctx, &res);
    attrs_clear(&res);
    return stop ? FIND_STOP : 0;
}

/* Image level below one series: one instance (only_sop) or all of them. */
static int find_images(find_t *f, uint32_t part, const char *study, const char *series,
                       const attrs_t *t, const attrs_t *r, const attrs_t *comp,
                       const char *only_sop)
{
    attrs_t rec = {0};
    int rc;
    if (only_sop) {
        rc = load_rec(f->s, f->ro, 'I', part, study, series, only_sop, &rec, NULL, NULL);
        if (rc == 0 && match_rec(f, 'I', &rec))
            rc = emit(f, t, r, &rec, comp, study, series, only_sop);
        attrs_clear(&rec);
        return rc == SP_ENOTFOUND ? 0 : rc;
    }
    buf_t prefix = {0};
    key_loc(&prefix, 'I', part, study, series, NULL, true);
    scan_t sc;
    scan_prefix(&sc, f->s, f->snap, CF_INDEX, prefix.p, prefix.len);
    buf_free(&prefix);
    rc = 0;
    for (; rc == 0 && scan_valid(&sc); scan_next(&sc)) {
        size_t kn, vn;
        const char *k = scan_key(&sc, &kn), *v = scan_value(&sc, &vn);
        loc_t loc;
        char text[256];
        if (loc_parse(k + 1, kn - 1, 3, &loc) != 0 || rec_decode(v, vn, 'I', &rec, NULL, NULL)) {
            log_error("store: corrupt index record %s", key_text(k, kn, text, sizeof text));
            rc = SP_EDB;
            break;
        }
        if (match_rec(f, 'I', &rec))
            rc = emit(f, t, r, &rec, comp, study, series, loc.sop);
        attrs_clear(&rec);
    }
    int rc2 = scan_close(&sc, study);
    return rc ? rc : rc2;
}

/* One series record: matches series keys, then emits or descends. */
static int find_one_series(find_t *f, uint32_t part, const char *study, const char *series,
                           const attrs_t *t, const attrs_t *r, attrs_t *comp, const char *only_sop)
{
    if (!match_rec(f, 'R', r))
        return 0;
    if (fkey(f, ATTR_NUM_SERIES_INSTANCES)) {
        buf_t prefix = {0};
        uint64_t n = 0;
        key_loc(&prefix, 'I', part, study, series, NULL, true);
        int rc = count_prefix(f->s, f->snap, CF_INDEX, &prefix, &n);
        buf_free(&prefix);
        if (rc)
            return rc;
        attrs_set_count(comp, ATTR_NUM_SERIES_INSTANCES, n);
    }
    if (!match_computed(f, LEVEL_SERIES, comp))
        return 0;
    if (f->level == LEVEL_SERIES)
        return emit(f, t, r, NULL, comp, study, series, NULL);
    return find_images(f, part, study, series, t, r, comp, only_sop);
}

/* Series level below one study: one series (only_series, or an exact
 * SeriesInstanceUID key) or all of them. */
static int find_series(find_t *f, uint32_t part, const char *study, const attrs_t *t, attrs_t *comp,
                       const char *only_series, const char *only_sop)
{
    const char *key = fkey(f, ATTR_SERIES_INSTANCE_UID);
    if (!only_series && f->use_index && key && match_key_is_exact(MATCH_UID, key))
        only_series = key;
    attrs_t r = {0};
    int rc;
    if (only_series) {
        rc = load_rec(f->s, f->ro, 'R', part, study, only_series, NULL, &r, NULL, NULL);
        if (rc == 0)
            rc = find_one_series(f, part, study, only_series, t, &r, comp, only_sop);
        attrs_clear(&r);
        return rc == SP_ENOTFOUND ? 0 : rc;
    }
    buf_t prefix = {0};
    key_loc(&prefix, 'R', part, study, NULL, NULL, true);
    scan_t sc;
    scan_prefix(&sc, f->s, f->snap, CF_INDEX, prefix.p, prefix.len);
    buf_free(&prefix);
    rc = 0;
    for (; rc == 0 && scan_valid(&sc); scan_next(&sc)) {
        size_t kn, vn;
        const char *k = scan_key(&sc, &kn), *v = scan_value(&sc, &vn);
        loc_t loc;
        char text[256];
        if (loc_parse(k + 1, kn - 1, 2, &loc) != 0 || rec_decode(v, vn, 'R', &r, NULL, NULL)) {
            log_error("store: corrupt index record %s", key_text(k, kn, text, sizeof text));
            rc = SP_EDB;
            break;
        }
        rc = find_one_series(f, part, study, loc.series, t, &r, comp, only_sop);
        attrs_clear(&r);
    }
    int rc2 = scan_close(&sc, study);
    return rc ? rc : rc2;
}

/* One candidate study (study/series/image levels): loads its record unless
 * given, matches patient and study keys, computes what is asked, then emits
 * or descends. An index entry whose study record is missing is SP_EDB. */
static int find_study(find_t *f, uint32_t part, const char *study, const attrs_t *trec,
                      const char *only_series, const char *only_sop)
{
    attrs_t loaded = {0}, comp = {0};
    int rc = 0;
    if (!trec) {
        rc = load_rec(f->s, f->ro, 'T', part, study, NULL, NULL, &loaded, NULL, NULL);
        if (rc == SP_ENOTFOUND) {
            log_error("store: index names study %s in partition %u but it has no record", study,
                      (unsigned)part);
            rc = SP_EDB;
        }
        if (rc)
            goto out;
        trec = &loaded;
    }
    if (!match_rec(f, 'T', trec))
        goto out;
    if (fkey(f, ATTR_NUM_PATIENT_STUDIES) || fkey(f, ATTR_NUM_PATIENT_SERIES) ||
        fkey(f, ATTR_NUM_PATIENT_INSTANCES)) {
        uint64_t c[3];
        rc = patient_counts(f, attrs_str(trec, ATTR_PATIENT_ID), c);
        if (rc)
            goto out;
        attrs_set_count(&comp, ATTR_NUM_PATIENT_STUDIES, c[0]);
        attrs_set_count(&comp, ATTR_NUM_PATIENT_SERIES, c[1]);
        attrs_set_count(&comp, ATTR_NUM_PATIENT_INSTANCES, c[2]);
    }
    bool want_mod = fkey(f, ATTR_MODALITIES_IN_STUDY) != NULL;
    bool want_series = fkey(f, ATTR_NUM_STUDY_SERIES) != NULL;
    bool want_inst = fkey(f, ATTR_NUM_STUDY_INSTANCES) != NULL;
    if (want_mod || want_series || want_inst) {
        uint64_t nseries = 0, ninst = 0;
        char *mods = NULL;
        rc = study_counts(f, part, study, want_series ? &nseries : NULL, want_inst ? &ninst : NULL,
                          want_mod ? &mods : NULL);
        if (mods)
            attrs_take(&comp, ATTR_MODALITIES_IN_STUDY, mods);
        if (rc)
            goto out;
        attrs_set_count(&comp, ATTR_NUM_STUDY_SERIES, nseries);
        attrs_set_count(&comp, ATTR_NUM_STUDY_INSTANCES, ninst);
    }
    if (!match_computed(f, LEVEL_PATIENT, &comp) || !match_computed(f, LEVEL_STUDY, &comp))
        goto out;
    if (f->level == LEVEL_STUDY)
        rc = emit(f, trec, NULL, NULL, &comp, study, NULL, NULL);
    else
        rc = find_series(f, part, study, trec, &comp, only_series, only_sop);
out:
    attrs_clear(&loaded);
    attrs_clear(&comp);
    return rc;
}

/* Splits a UID list key into sorted, unique UIDs (caller frees each and
 * the array). */
static size_t uid_list(const char *key, char ***out)
{
    char **v = NULL;
    size_t n = 0, cap = 0, pos = 0, len;
    const char *item;
    while (next_value(key, &pos, &item, &len)) {
        if (len == 0)
            continue;
        if (n == cap) {
            cap = cap ? 2 * cap : 8;
            v = sp_realloc(v, cap * sizeof *v);
        }
        v[n++] = sp_strndup(item, len);
    }
    *out = v;
    return sort_unique(v, n);
}

/* Candidates from a list of Study ('S') or SOP Instance ('U') UIDs. */
static int find_by_uids(find_t *f, const char *key, bool sops)
{
    char **uids;
    size_t n = uid_list(key, &uids);
    int rc = 0;
    for (size_t i = 0; i < n; i++) {
        if (rc == 0) {
            if (sops) {
                loc_t loc;
                rc = sop_locate(f->s, f->ro, uids[i], &loc);
                if (rc == 0)
                    rc = find_study(f, loc.part, loc.study, NULL, loc.series, uids[i]);
            } else {
                uint32_t part;
                rc = study_partition(f->s, f->ro, uids[i], &part);
                if (rc == 0)
                    rc = find_study(f, part, uids[i], NULL, NULL, NULL);
            }
            if (rc == SP_ENOTFOUND)
                rc = 0;
        }
        free(uids[i]);
    }
    free(uids);
    return rc;
}

/* Picks the secondary index range [lo, hi) that holds an entry for every
 * study the query can match, or returns false (scan all study records).
 * Exact probes first, then a single date, a name prefix, a date range,
 * then PatientID and AccessionNumber prefixes. */
static bool pick_index(const find_t *f, char *type, attr_id_t *id, buf_t *lo, buf_t *hi)
{
    const char *pid = fkey_matching(f, ATTR_PATIENT_ID);
    const char *acc = fkey_matching(f, ATTR_ACCESSION_NUMBER);
    const char *date = fkey_matching(f, ATTR_STUDY_DATE);
    const char *name = fkey_matching(f, ATTR_PATIENT_NAME);
    char dlo[9] = "", dhi[9] = "";
    if (date && match_date_bounds(date, dlo, dhi) != 0)
        dlo[0] = dhi[0] = '\0';
    bool date_single = dlo[0] && strcmp(dlo, dhi) == 0;
    bool date_range = dlo[0] || dhi[0];
    char prefix[256];
    lo->len = hi->len = 0;
    if (pid && match_key_is_exact(MATCH_STRING, pid)) {
        *type = 'p', *id = ATTR_PATIENT_ID;
        sec_key(lo, 'p', pid, strlen(pid), "");
    } else if (acc && match_key_is_exact(MATCH_STRING, acc)) {
        *type = 'a', *id = ATTR_ACCESSION_NUMBER;
        sec_key(lo, 'a', acc, strlen(acc), "");
    } else if (date_single) {
        *type = 'd', *id = ATTR_STUDY_DATE;
        sec_key(lo, 'd', dlo, 8, "");
    } else if (name && match_literal_prefix(name, prefix, sizeof prefix) > 0) {
        *type = 'n', *id = ATTR_PATIENT_NAME;
        if (match_key_is_exact(MATCH_PN, name)) {
            sec_key(lo, 'n', name, strlen(name), "");
        } else {
            sec_key(lo, 'n', prefix, strlen(prefix), "");
            lo->len--; /* a prefix of the value: drop the separator */
        }
    } else if (date_range) {
        *type = 'd', *id = ATTR_STUDY_DATE;
        buf_byte(lo, 'd');
        buf_str(lo, dlo);
        buf_byte(hi, 'd');
        if (dhi[0]) {
            buf_str(hi, dhi);
            buf_byte(hi, 1); /* after every hi\0study */
        } else {
            hi->p[0] = 'e';
        }
        return true;
    } else if (pid && match_literal_prefix(pid, prefix, sizeof prefix) > 0) {
        *type = 'p', *id = ATTR_PATIENT_ID;
        buf_byte(lo, 'p');
        buf_str(lo, prefix);
    } else if (acc && match_literal_prefix(acc, prefix, sizeof prefix) > 0) {
        *type = 'a', *id = ATTR_ACCESSION_NUMBER;
        buf_byte(lo, 'a');
        buf_str(lo, prefix);
    } else {
        return false;
    }
    prefix_end(hi, lo->p, lo->len);
    return true;
}

/* Candidates from a secondary index range. */
static int find_by_index(find_t *f, char type, attr_id_t id, const buf_t *lo, const buf_t *hi)
{
    scan_t sc;
    int rc = 0;
    scan_open(&sc, f->s, f->snap, CF_SECONDARY, lo->p, lo->len, hi->p, hi->len);
    for (; rc == 0 && scan_valid(&sc); scan_next(&sc)) {
        size_t kn, vn, valn;
        const char *k = scan_key(&sc, &kn), *v = scan_value(&sc, &vn), *val;
        char study[65], text[256];
        uint32_t part;
        attrs_t t = {0};
        if (sec_parse(k, kn, v, vn, &val, &valn, study, &part) != 0) {
            log_error("store: corrupt index entry %s", key_text(k, kn, text, sizeof text));
            rc = SP_EDB;
            break;
        }
        rc = load_rec(f->s, f->ro, 'T', part, study, NULL, NULL, &t, NULL, NULL);
        if (rc == SP_ENOTFOUND) {
            log_error("store: index entry %s names a study with no record",
                      key_text(k, kn, text, sizeof text));
            rc = SP_EDB;
        }
        if (rc == 0 && sec_take(type, id, &t, study, k, kn, lo, hi))
            rc = find_study(f, part, study, &t, NULL, NULL);
        attrs_clear(&t);
    }
    int rc2 = scan_close(&sc, "a secondary index");
    return rc ? rc : rc2;
}

/* Candidates from every study record. */
static int find_by_scan(find_t *f)
{
    scan_t sc;
    int rc = 0;
    scan_prefix(&sc, f->s, f->snap, CF_INDEX, "T", 1);
    for (; rc == 0 && scan_valid(&sc); scan_next(&sc)) {
        size_t kn, vn;
        const char *k = scan_key(&sc, &kn), *v = scan_value(&sc, &vn);
        loc_t loc;
        attrs_t t = {0};
        char text[256];
        if (loc_parse(k + 1, kn - 1, 1, &loc) != 0 || rec_decode(v, vn, 'T', &t, NULL, NULL)) {
            log_error("store: corrupt index record %s", key_text(k, kn, text, sizeof text));
            rc = SP_EDB;
            break;
        }
        rc = find_study(f, loc.part, loc.study, &t, NULL, NULL);
        attrs_clear(&t);
    }
    int rc2 = scan_close(&sc, "study records");
    return rc ? rc : rc2;
}

/* A patient being gathered at patient level: its studies share one whole
 * PatientID. */
typedef struct {
    char *pid;     /* NULL: none yet */
    bool matched;  /* some study record matched the patient keys */
    attrs_t rec;   /* the first matching study record: the patient's attributes */
    uint64_t c[3]; /* studies, series, instances (when asked for) */
} patient_t;

static bool want_patient_counts(const find_t *f)
{
    return fkey(f, ATTR_NUM_PATIENT_STUDIES) || fkey(f, ATTR_NUM_PATIENT_SERIES) ||
           fkey(f, ATTR_NUM_PATIENT_INSTANCES);
}

static int patient_add(find_t *f, patient_t *p, uint32_t part, const char *study, attrs_t *t)
{
    if (!p->matched && match_rec(f, 'T', t)) {
        p->matched = true;
        p->rec = *t; /* moved */
        memset(t, 0, sizeof *t);
    }
    if (!want_patient_counts(f))
        return 0;
    uint64_t series = 0, inst = 0;
    int rc = study_counts(f, part, study, &series, &inst, NULL);
    p->c[0]++;
    p->c[1] += series;
    p->c[2] += inst;
    return rc;
}

/* Emits a gathered patient when it matched, and resets it. */
static int patient_flush(find_t *f, patient_t *p)
{
    int rc = 0;
    if (p->matched) {
        attrs_t comp = {0};
        attrs_set_count(&comp, ATTR_NUM_PATIENT_STUDIES, p->c[0]);
        attrs_set_count(&comp, ATTR_NUM_PATIENT_SERIES, p->c[1]);
        attrs_set_count(&comp, ATTR_NUM_PATIENT_INSTANCES, p->c[2]);
        if (match_computed(f, LEVEL_PATIENT, &comp))
            rc = emit(f, &p->rec, NULL, NULL, &comp, NULL, NULL, NULL);
        attrs_clear(&comp);
    }
    free(p->pid);
    attrs_clear(&p->rec);
    memset(p, 0, sizeof *p);
    return rc;
}

/* A study whose PatientID is multi-valued, gathered after the scan. */
typedef struct {
    char *pid;
    char study[65];
    uint32_t part;
} deferred_t;

static int deferred_cmp(const void *a, const void *b)
{
    const deferred_t *x = a, *y = b;
    int c = strcmp(x->pid, y->pid);
    return c ? c : strcmp(x->study, y->study);
}

/* Patient level: walks the patient index (narrowed by an exact or prefix
 * PatientID key), whose entries for one PatientID are contiguous, and
 * groups studies into patients without holding more than one in memory.
 * Studies with a multi-valued PatientID (not valid DICOM, VM 1) are
 * collected and grouped after the walk. */
static int find_patients(find_t *f)
{
    buf_t lo = {0}, hi = {0};
    const char *pid = fkey_matching(f, ATTR_PATIENT_ID);
    char prefix[256];
    if (pid && f->use_index && match_key_is_exact(MATCH_STRING, pid)) {
        sec_key(&lo, 'p', pid, strlen(pid), "");
    } else {
        buf_byte(&lo, 'p');
        if (pid && f->use_index && match_literal_prefix(pid, prefix, sizeof prefix) > 0)
            buf_str(&lo, prefix);
    }
    prefix_end(&hi, lo.p, lo.len);
    patient_t cur = {0};
    deferred_t *def = NULL;
    size_t ndef = 0, cap = 0;
    int rc = 0;
    scan_t sc;
    scan_open(&sc, f->s, f->snap, CF_SECONDARY, lo.p, lo.len, hi.p, hi.len);
    for (; rc == 0 && scan_valid(&sc); scan_next(&sc)) {
        size_t kn, vn, valn;
        const char *k = scan_key(&sc, &kn), *v = scan_value(&sc, &vn), *val;
        char study[65], text[256];
        uint32_t part;
        attrs_t t = {0};
        if (sec_parse(k, kn, v, vn, &val, &valn, study, &part) != 0) {
            log_error("store: corrupt index entry %s", key_text(k, kn, text, sizeof text));
            rc = SP_EDB;
            break;
        }
        rc = load_rec(f->s, f->ro, 'T', part, study, NULL, NULL, &t, NULL, NULL);
        if (rc == SP_ENOTFOUND) {
            log_error("store: index entry %s names a study with no record",
                      key_text(k, kn, text, sizeof text));
            rc = SP_EDB;
        }
        const char *whole = attrs_str(&t, ATTR_PATIENT_ID);
        if (rc == 0 && sec_take('p', ATTR_PATIENT_ID, &t, study, k, kn, &lo, &hi)) {
            if (strchr(whole, '\\')) {
                if (ndef == cap) {
                    cap = cap ? 2 * cap : 8;
                    def = sp_realloc(def, cap * sizeof *def);
                }
                def[ndef].pid = sp_strdup(whole);
                memcpy(def[ndef].study, study, sizeof study);
                def[ndef++].part = part;
            } else {
                if (cur.pid && strcmp(cur.pid, whole) != 0)
                    rc = patient_flush(f, &cur);
                if (rc == 0 && !cur.pid)
                    cur.pid = sp_strdup(whole);
                if (rc == 0)
                    rc = patient_add(f, &cur, part, study, &t);
            }
        }
        attrs_clear(&t);
    }
    int rc2 = scan_close(&sc, "patient index");
    rc = rc ? rc : rc2;
    if (rc == 0)
        rc = patient_flush(f, &cur);

    if (ndef)
        qsort(def, ndef, sizeof *def, deferred_cmp);
    for (size_t i = 0; i < ndef && rc == 0; i++) {
        attrs_t t = {0};
        if (cur.pid && strcmp(cur.pid, def[i].pid) != 0)
            rc = patient_flush(f, &cur);
        if (rc == 0 && !cur.pid)
            cur.pid = sp_strdup(def[i].pid);
        if (rc == 0)
            rc = load_rec(f->s, f->ro, 'T', def[i].part, def[i].study, NULL, NULL, &t, NULL, NULL);
        if (rc == 0)
            rc = patient_add(f, &cur, def[i].part, def[i].study, &t);
        attrs_clear(&t);
    }
    if (rc == 0)
        rc = patient_flush(f, &cur);
    free(cur.pid);
    attrs_clear(&cur.rec);
    for (size_t i = 0; i < ndef; i++)
        free(def[i].pid);
    free(def);
    buf_free(&lo);
    buf_free(&hi);
    return rc;
}

/* Checks the syntax of every key the query will use. */
static int find_keys_valid(const find_t *f)
{
    for (unsigned id = 0; id < ATTR_COUNT; id++) {
        const char *k = fkey(f, (attr_id_t)id);
        if (k && match_key_valid(attr_info((attr_id_t)id)->kind, k) != 0) {
            log_debug("store: find refused: malformed %s key \"%.64s\"",
                      attr_info((attr_id_t)id)->keyword, k);
            return SP_EINVAL;
        }
    }
    return 0;
}

int store_find(store_t *s, const store_query_t *q, store_result_fn fn, void *ctx)
{
    static const attrs_t no_keys;
    if (!s || !q || !fn || (unsigned)q->level > LEVEL_IMAGE)
        return SP_EINVAL;
    find_t f;
    memset(&f, 0, sizeof f);
    f.s = s;
    f.level = q->level;
    f.keys = q->keys ? q->keys : &no_keys;
    f.flags = q->match_flags;
    f.limit = q->limit;
    f.use_index = !q->no_index;
    f.fn = fn;
    f.ctx = ctx;
    int rc = find_keys_valid(&f);
    if (rc)
        return rc;
    f.snap = rocksdb_create_snapshot(s->db);
    f.ro = rocksdb_readoptions_create();
    rocksdb_readoptions_set_snapshot(f.ro, f.snap);

    const char *sops = fkey_matching(&f, ATTR_SOP_INSTANCE_UID);
    const char *studies = fkey_matching(&f, ATTR_STUDY_INSTANCE_UID);
    buf_t lo = {0}, hi = {0};
    char type;
    attr_id_t id;
    if (f.level == LEVEL_PATIENT)
        rc = find_patients(&f);
    else if (f.use_index && sops)
        rc = find_by_uids(&f, sops, true);
    else if (f.use_index && studies)
        rc = find_by_uids(&f, studies, false);
    else if (f.use_index && pick_index(&f, &type, &id, &lo, &hi))
        rc = find_by_index(&f, type, id, &lo, &hi);
    else
        rc = find_by_scan(&f);

    buf_free(&lo);
    buf_free(&hi);
    free(f.count_pid);
    rocksdb_readoptions_destroy(f.ro);
    rocksdb_release_snapshot(s->db, f.snap);
    return rc == FIND_STOP ? 0 : rc;
}

/* ---- scrub ---------------------------------------------------------- */

static int hex_digit(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

/* A scrub cursor is the hex of the objects key last visited; sets k to the
 * instance record key it names. Returns 0 or SP_EINVAL. */
static int scrub_cursor_key(const char *cursor, buf_t *k)
{
    size_t n = strlen(cursor);
    if (n % 2 != 0 || n / 2 > LOC_MAX)
        return SP_EINVAL;
    k->len = 0;
    buf_byte(k, 'I');
    for (size_t i = 0; i < n; i += 2) {
        int hi = hex_digit(cursor[i]), lo = hex_digit(cursor[i + 1]);
        if (hi < 0 || lo < 0)
            return SP_EINVAL;
        buf_byte(k, (unsigned)(hi << 4 | lo));
    }
    return 0;
}

static char *scrub_cursor_of(const buf_t *ikey)
{
    char *c = sp_malloc(2 * (ikey->len - 1) + 1);
    sp_hex((const uint8_t *)ikey->p + 1, ikey->len - 1, c);
    return c;
}

/* Checks the object of one instance record read from the scrub's snapshot
 * (ro). Returns 0 (also for a corrupt record, logged and skipped), or
 * on_corrupt's answer for a bad object. */
static int scrub_one(store_t *s, const rocksdb_readoptions_t *ro, const char *k, size_t kn,
                     const char *v, size_t vn, store_entry_fn on_corrupt, void *ctx,
                     uint64_t *checked, uint64_t *bytes_read)
{
    loc_t loc;
    uint64_t size = 0;
    uint8_t digest[SP_DIGEST_LEN];
    char text[256], *data = NULL;
    size_t len = 0;
    if (kn < 1 || loc_parse(k + 1, kn - 1, 3, &loc) != 0 ||
        rec_decode(v, vn, 'I', NULL, &size, digest) != 0) {
        log_error("store: scrub skips corrupt index record %s", key_text(k, kn, text, sizeof text));
        return 0;
    }
    int rc = object_read(s, ro, &loc, loc.sop, size, digest, &data, &len);
    rocksdb_free(data);
    (*checked)++;
    *bytes_read += len;
    if (rc == 0)
        return 0;
    if (rc != SP_EDIGEST) /* object_read() counts only bad bytes */
        atomic_fetch_add(&s->corrupt_reads, 1);
    return on_corrupt ? entry_call(k, kn, v, vn, on_corrupt, ctx) : 0;
}

int store_scrub(store_t *s, const char *cursor, size_t max_objects, store_entry_fn on_corrupt,
                void *ctx, char **next_cursor, uint64_t *checked, uint64_t *bytes_read)
{
    uint64_t nchecked = 0, nbytes = 0;
    if (next_cursor)
        *next_cursor = NULL;
    if (checked)
        *checked = 0;
    if (bytes_read)
        *bytes_read = 0;
    if (!s)
        return SP_EINVAL;
    buf_t start = {0}, last = {0};
    bool resume = cursor && cursor[0];
    if (!resume)
        buf_byte(&start, 'I');
    else if (scrub_cursor_key(cursor, &start) != 0) {
        buf_free(&start);
        return SP_EINVAL;
    }
    /* Records and objects are read from one snapshot, so an instance
     * deleted meanwhile is checked as it was rather than reported missing.
     * Object reads skip RocksDB's CRC as store_get does (BLAKE2b covers it). */
    const rocksdb_snapshot_t *snap = rocksdb_create_snapshot(s->db);
    rocksdb_readoptions_t *ro = rocksdb_readoptions_create();
    rocksdb_readoptions_set_snapshot(ro, snap);
    rocksdb_readoptions_set_verify_checksums(ro, 0);
    scan_t sc;
    scan_open(&sc, s, snap, CF_INDEX, start.p, start.len, "J", 1);
    size_t seen = 0;
    bool more = false;
    int rc = 0;
    for (; scan_valid(&sc); scan_next(&sc)) {
        size_t kn, vn;
        const char *k = scan_key(&sc, &kn), *v = scan_value(&sc, &vn);
        if (resume && bytes_cmp(k, kn, start.p, start.len) == 0)
            continue; /* the cursor names the last instance already checked */
        if (max_objects && seen == max_objects) {
            more = true;
            break;
        }
        seen++;
        last.len = 0;
        buf_add(&last, k, kn);
        int r = scrub_one(s, ro, k, kn, v, vn, on_corrupt, ctx, &nchecked, &nbytes);
        if (r < 0)
            rc = r;
        if (r) {
            more = true;
            break;
        }
    }
    int rc2 = scan_close(&sc, "instance records");
    rc = rc ? rc : rc2;
    rocksdb_readoptions_destroy(ro);
    rocksdb_release_snapshot(s->db, snap);
    if (rc == 0 && more && next_cursor)
        *next_cursor = scrub_cursor_of(&last);
    if (checked)
        *checked = nchecked;
    if (bytes_read)
        *bytes_read = nbytes;
    buf_free(&start);
    buf_free(&last);
    return rc;
}

/* ---- blob garbage collection ---------------------------------------- */

/* Blob GC rewrites the still-valid blobs of the oldest blob files whenever
 * compaction reaches their references. While nothing is deleted that is
 * pure cost: on a CT ingest it added ~15% to the disk bytes written per
 * byte stored (2.2 instead of 1.93) and CPU for nothing. Deleted objects
 * (studies deleted, partitions handed to other nodes) leave garbage inside
 * blob files that only GC reclaims. So GC runs while the object families'
 * live blob files hold BLOB_GC_ON or more garbage (or just after a delete,
 * before compaction has counted it) and stops below BLOB_GC_OFF. */
#define BLOB_GC_ON 0.20
#define BLOB_GC_OFF 0.05
/* Compaction counts a delete's garbage only once it reaches the deleted
 * references; until then the ratio says nothing, so GC stays on this long. */
#define BLOB_GC_HOLD_MS (3600 * 1000)

/* Live blob file bytes of the object families, and the garbage in them. */
static void blob_sizes(store_t *s, uint64_t *live, uint64_t *garbage)
{
    int fams[] = {CF_OBJECTS, CF_CONFLICTS};
    for (size_t i = 0; i < SP_ARRAY_LEN(fams); i++) {
        uint64_t v = 0;
        if (rocksdb_property_int_cf(s->db, s->cf[fams[i]], "rocksdb.live-blob-file-size", &v) == 0)
            *live += v;
        v = 0;
        if (rocksdb_property_int_cf(s->db, s->cf[fams[i]], "rocksdb.live-blob-file-garbage-size",
                                    &v) == 0)
            *garbage += v;
    }
}

static void blob_gc_set(store_t *s, int on)
{
    if (atomic_exchange(&s->blob_gc, on) == on)
        return;
    const char *const keys[] = {"enable_blob_garbage_collection"};
    const char *const values[] = {on ? "true" : "false"};
    int fams[] = {CF_OBJECTS, CF_CONFLICTS};
    for (size_t i = 0; i < SP_ARRAY_LEN(fams); i++) {
        char *err = NULL;
        rocksdb_set_options_cf(s->db, s->cf[fams[i]], 1, keys, values, &err);
        if (err) {
            log_warn("store: blob garbage collection %s: %s", on ? "on" : "off", err);
            rocksdb_free(err);
            atomic_store(&s->blob_gc, -1); /* try again at the next call */
        }
    }
    log_info("store: blob garbage collection %s", on ? "on" : "off");
}

void store_blob_gc_tune(store_t *s, bool deleted)
{
    if (!s)
        return;
    if (deleted) {
        atomic_store(&s->blob_gc_hold_ms, sp_now_ms() + BLOB_GC_HOLD_MS);
        blob_gc_set(s, 1);
        return;
    }
    uint64_t live = 0, garbage = 0;
    blob_sizes(s, &live, &garbage);
    double ratio = live ? (double)garbage / (double)live : 0.0;
    int now = atomic_load(&s->blob_gc);
    if (ratio >= BLOB_GC_ON)
        blob_gc_set(s, 1);
    else if ((ratio < BLOB_GC_OFF && sp_now_ms() >= atomic_load(&s->blob_gc_hold_ms)) || now < 0)
        blob_gc_set(s, 0);
}

/* ---- stats ---------------------------------------------------------- */

int store_stats(store_t *s, store_stats_t *out)
{
    if (!s || !out)
        return SP_EINVAL;
    memset(out, 0, sizeof *out);
    out->instances = atomic_load(&s->instances);
    out->bytes = atomic_load(&s->bytes);
    out->studies = atomic_load(&s->studies);
    out->conflicts = atomic_load(&s->conflicts);
    out->corrupt_reads = atomic_load(&s->corrupt_reads);
    out->conflicts_refused = atomic_load(&s->conflicts_refused);
    out->object_bytes_read = atomic_load(&s->object_bytes_read);
    out->metadata_rebuilt = atomic_load(&s->metadata_rebuilt);
    uint64_t live = 0;
    blob_sizes(s, &live, &out->blob_garbage_bytes);
    out->blob_gc = atomic_load(&s->blob_gc) == 1;
    for (int i = 0; i < CF_COUNT; i++) {
        uint64_t v = 0;
        if (rocksdb_property_int_cf(s->db, s->cf[i], "rocksdb.total-sst-files-size", &v) == 0)
            out->db_size_bytes += v;
        v = 0;
        if (rocksdb_property_int_cf(s->db, s->cf[i], "rocksdb.total-blob-file-size", &v) == 0)
            out->db_size_bytes += v;
    }
    return 0;
}

uint64_t store_property_sum(store_t *s, const char *name)
{
    uint64_t sum = 0;
    for (int i = 0; i < CF_COUNT; i++) {
        uint64_t v = 0;
        if (rocksdb_property_int_cf(s->db, s->cf[i], name, &v) == 0)
            sum += v;
    }
    return sum;
}

/* ---- partition deletion --------------------------------------------- */

/* Adds a delete of [lo, lo's prefix end) in one column family to a batch. */
static void batch_delete_prefix(rocksdb_writebatch_t *wb, store_t *s, int cf, const buf_t *lo)
{
    buf_t hi = {0};
    if (prefix_end(&hi, lo->p, lo->len))
        rocksdb_writebatch_delete_range_cf(wb, s->cf[cf], lo->p, lo->len, hi.p, hi.len);
    buf_free(&hi);
}

/* Adds deletes of the attribute index entries a study record produced,
 * derived exactly as batch_study() derived them when it was written. */
static void batch_study_sec_delete(rocksdb_writebatch_t *wb, store_t *s, const attrs_t *t,
                                   const char *study)
{
    buf_t k = {0};
    for (size_t i = 0; i < SP_ARRAY_LEN(sec_indexes); i++) {
        const char *value = attrs_str(t, sec_indexes[i].id), *item;
        size_t pos = 0, n;
        while (next_value(value, &pos, &item, &n)) {
            if (!sec_indexed(sec_indexes[i].type, n))
                continue;
            sec_key(&k, sec_indexes[i].type, item, n, study);
            rocksdb_writebatch_delete_cf(wb, s->cf[CF_SECONDARY], k.p, k.len);
        }
    }
    buf_free(&k);
}

/* When a study's record is missing or corrupt its attribute index entries
 * cannot be derived: finds them by scanning the four attribute indexes for
 * entries naming the study in this partition (slow; only for a damaged
 * store). */
static int batch_study_sec_scan(rocksdb_writebatch_t *wb, store_t *s, uint32_t part,
                                const char *study)
{
    int rc = 0;
    for (size_t i = 0; rc == 0 && i < SP_ARRAY_LEN(sec_indexes); i++) {
        char type = sec_indexes[i].type;
        scan_t sc;
        scan_prefix(&sc, s, NULL, CF_SECONDARY, &type, 1);
        for (; scan_valid(&sc); scan_next(&sc)) {
            size_t kn, vn, valn;
            const char *k = scan_key(&sc, &kn), *v = scan_value(&sc, &vn), *val;
            char st[65];
            uint32_t p;
            if (sec_parse(k, kn, v, vn, &val, &valn, st, &p) == 0 && p == part &&
                strcmp(st, study) == 0)
                rocksdb_writebatch_delete_cf(wb, s->cf[CF_SECONDARY], k, kn);
        }
        rc = scan_close(&sc, "a secondary index");
    }
    return rc;
}

/* Sets *empty to whether a study has no key of one kind ('R' records, or
 * type 0 for objects) in the partition. Returns 0 or SP_EDB. */
static int study_range_empty(store_t *s, char type, int cf, uint32_t part, const char *study,
                             bool *empty)
{
    buf_t k = {0};
    scan_t sc;
    key_loc(&k, type, part, study, NULL, NULL, true);
    scan_prefix(&sc, s, NULL, cf, k.p, k.len);
    *empty = !scan_valid(&sc);
    buf_free(&k);
    return scan_close(&sc, study);
}

/* Deletes everything of one study of a partition in one synced WriteBatch:
 * the study record, series and instance records and objects (range
 * deletes: each is the contiguous range [type]P|study\0...), the study
 * locator and attribute index entries, and the locators and kept conflicts
 * of its SOPs (point deletes, the SOPs read from the instance records).
 * The caller holds the study's gate closed, so no put of the study runs and
 * these reads see the study's final state. Returns 0 with the number of
 * instances deleted in *ninst (nothing written when the study has nothing
 * here), or SP_EDB / SP_ENOSPACE with nothing of the study deleted. */
static int delete_study(store_t *s, uint32_t part, const char *study, uint64_t *ninst)
{
    rocksdb_writebatch_t *wb = rocksdb_writebatch_create();
    buf_t k = {0}, want = {0};
    char *val = NULL, text[256];
    size_t vlen = 0;
    attrs_t t = {0};
    uint64_t n = 0, bytes = 0, nconf = 0, nstudy = 0, nkeys = 0;
    uint8_t gone[SP_DIGEST_LEN] = {0}; /* summary terms of the instances deleted */
    bool derived = false;
    *ninst = 0;

    /* Instance records: their SOPs' locators and conflicts. A locator is
     * deleted only when it points here (a reused SOP UID stored elsewhere
     * keeps its own). */
    key_loc(&k, 'I', part, study, NULL, NULL, true);
    scan_t sc;
    scan_prefix(&sc, s, NULL, CF_INDEX, k.p, k.len);
    int rc = 0;
    for (; rc == 0 && scan_valid(&sc); scan_next(&sc)) {
        size_t kn, vn;
        const char *ik = scan_key(&sc, &kn), *iv = scan_value(&sc, &vn);
        loc_t loc;
        uint64_t size = 0;
        if (kn < 1 || loc_parse(ik + 1, kn - 1, 3, &loc) != 0) {
            /* Without the SOP its locator could not be found: refuse rather
             * than leave it pointing at a deleted object. */
            log_error("store: corrupt index key %s; partition %u not deleted",
                      key_text(ik, kn, text, sizeof text), (unsigned)part);
            rc = SP_EDB;
            break;
        }
        nkeys++;
        uint8_t d[SP_DIGEST_LEN];
        if (rec_decode(iv, vn, 'I', NULL, &size, d) == 0) {
            n++;
            bytes += size;
            uint64_t term[4];
            digest_term(loc.sop, d, term);
            digest_apply(gone, term, +1);
        } else {
            log_warn("store: deleting corrupt index record %s",
                     key_text(ik, kn, text, sizeof text));
        }
        key_uid(&k, 'U', loc.sop);
        rc = db_get(s, s->ro, CF_SECONDARY, &k, &val, &vlen, loc.sop);
        if (rc == 0) {
            key_loc(&want, 0, part, study, loc.series, NULL, false);
            if (bytes_cmp(val, vlen, want.p, want.len) == 0)
                rocksdb_writebatch_delete_cf(wb, s->cf[CF_SECONDARY], k.p, k.len);
        } else if (rc == SP_ENOTFOUND) {
            rc = 0;
        }
        rocksdb_free(val);
        val = NULL;
        if (rc)
            break;
        k.len = 0;
        buf_str(&k, loc.sop);
        buf_byte(&k, 0);
        scan_t cs;
        scan_prefix(&cs, s, NULL, CF_CONFLICTS, k.p, k.len);
        for (; scan_valid(&cs); scan_next(&cs)) {
            size_t cn;
            const char *ck = scan_key(&cs, &cn);
            rocksdb_writebatch_delete_cf(wb, s->cf[CF_CONFLICTS], ck, cn);
            nconf++;
        }
        rc = scan_close(&cs, "conflicts");
    }
    int rc2 = scan_close(&sc, study);
    rc = rc ? rc : rc2;
    if (rc)
        goto out;

    /* The study record and what was derived from it. */
    key_loc(&k, 'T', part, study, NULL, NULL, false);
    rc = db_get(s, s->ro, CF_INDEX, &k, &val, &vlen, study);
    if (rc == 0) {
        nstudy = 1;
        rocksdb_writebatch_delete_cf(wb, s->cf[CF_INDEX], k.p, k.len);
        if (rec_decode(val, vlen, 'T', &t, NULL, NULL) == 0) {
            batch_study_sec_delete(wb, s, &t, study);
            derived = true;
        } else {
            log_error("store: corrupt index record %s; scanning the indexes to delete it",
                      key_text(k.p, k.len, text, sizeof text));
        }
    } else if (rc != SP_ENOTFOUND) {
        goto out;
    }
    rocksdb_free(val);
    val = NULL;
    rc = 0;
    if (!derived && (nstudy || n)) {
        rc = batch_study_sec_scan(wb, s, part, study);
        if (rc)
            goto out;
    }
    key_uid(&k, 'S', study);
    rc = db_get(s, s->ro, CF_SECONDARY, &k, &val, &vlen, study);
    if (rc == 0 && vlen == 2 && part_of(val) == part) {
        rocksdb_writebatch_delete_cf(wb, s->cf[CF_SECONDARY], k.p, k.len);
        nkeys++;
    } else if (rc != 0 && rc != SP_ENOTFOUND) {
        goto out;
    }
    rc = 0;
    /* A study with nothing here costs no write: each deletion leaves range
     * tombstones that every new iterator of the memtable must fragment, and
     * hand-off may ask about absent studies often. */
    if (nkeys == 0 && nstudy == 0) {
        bool empty = true;
        rc = study_range_empty(s, 'R', CF_INDEX, part, study, &empty);
        if (rc == 0 && empty)
            rc = study_range_empty(s, 0, CF_OBJECTS, part, study, &empty);
        if (rc || empty)
            goto out;
    }

    key_loc(&k, 'R', part, study, NULL, NULL, true);
    batch_delete_prefix(wb, s, CF_INDEX, &k);
    key_loc(&k, 'I', part, study, NULL, NULL, true);
    batch_delete_prefix(wb, s, CF_INDEX, &k);
    key_loc(&k, 'M', part, study, NULL, NULL, true);
    batch_delete_prefix(wb, s, CF_INDEX, &k);
    key_loc(&k, 0, part, study, NULL, NULL, true);
    batch_delete_prefix(wb, s, CF_OBJECTS, &k);

    char *err = NULL;
    rocksdb_write(s->db, s->wo_sync, wb, &err);
    if (err) {
        rc = db_fail(err, "delete of study", study);
        goto out;
    }
    sum_remove(s, part, gone, n, bytes);
    counter_sub(&s->instances, n);
    counter_sub(&s->bytes, bytes);
    counter_sub(&s->studies, nstudy);
    counter_sub(&s->conflicts, nconf);
    *ninst = n;
    if (bytes > 0)
        store_blob_gc_tune(s, true);
out:
    rocksdb_writebatch_destroy(wb);
    rocksdb_free(val);
    attrs_clear(&t);
    buf_free(&k);
    buf_free(&want);
    return rc;
}

/* The kinds of keys a study of a partition can have: its study, series and
 * instance records and its objects. */
static const char study_key_types[] = {'T', 'R', 'I', 0};
#define STUDY_KEY_KINDS (sizeof study_key_types)

/* Finds the smallest study UID greater than `after` ("" = from the start)
 * that has a key of any kind in the partition, using one iterator per kind.
 * Returns 0 with study set, SP_ENOTFOUND when there is none, or SP_EDB for a
 * corrupt key. */
static int next_study(scan_t sc[STUDY_KEY_KINDS], uint32_t part, const char *after, char study[65])
{
    buf_t k = {0};
    char text[256];
    int rc = SP_ENOTFOUND;
    for (size_t i = 0; i < STUDY_KEY_KINDS; i++) {
        /* [type]P|after\1 sorts after every key of `after` (UID bytes are
         * above \1) and before those of any greater UID. */
        key_loc(&k, study_key_types[i], part, after, NULL, NULL, false);
        if (after[0])
            buf_byte(&k, 1);
        rocksdb_iter_seek(sc[i].it, k.p, k.len);
        if (!scan_valid(&sc[i]))
            continue;
        size_t kn, at = study_key_types[i] ? 3 : 2;
        const char *key = scan_key(&sc[i], &kn);
        const char *end = kn > at ? memchr(key + at, 0, kn - at) : NULL;
        size_t sn = kn <= at ? 0 : end ? (size_t)(end - (key + at)) : kn - at;
        char cand[65];
        if (sn == 0 || sn > 64) {
            rc = SP_EDB;
        } else {
            memcpy(cand, key + at, sn);
            cand[sn] = '\0';
            if (!sp_uid_valid(cand))
                rc = SP_EDB;
        }
        if (rc == SP_EDB) {
            log_error("store: corrupt key %s in partition %u", key_text(key, kn, text, sizeof text),
                      (unsigned)part);
            break;
        }
        if (rc == SP_ENOTFOUND || strcmp(cand, study) < 0) {
            memcpy(study, cand, sn + 1);
            rc = 0;
        }
    }
    buf_free(&k);
    return rc;
}

/* Calls fn with each study UID of a partition in ascending order, as of a
 * snapshot taken now, so the walk ends even while puts keep creating
 * studies in the partition. Returns 0 (also when fn asked to stop), fn's
 * negative answer, or SP_EDB. */
static int walk_studies(store_t *s, uint32_t partition, store_study_fn fn, void *ctx)
{
    const rocksdb_snapshot_t *snap = rocksdb_create_snapshot(s->db);
    scan_t sc[STUDY_KEY_KINDS];
    buf_t prefix = {0};
    for (size_t i = 0; i < STUDY_KEY_KINDS; i++) {
        key_loc(&prefix, study_key_types[i], partition, "", NULL, NULL, false);
        scan_prefix(&sc[i], s, snap, study_key_types[i] ? CF_INDEX : CF_OBJECTS, prefix.p,
                    prefix.len);
    }
    buf_free(&prefix);
    char study[65] = "", after[65] = "";
    int rc;
    while ((rc = next_study(sc, partition, after, study)) == 0) {
        rc = fn(ctx, study);
        if (rc)
            break;
        memcpy(after, study, sizeof after);
    }
    if (rc > 0 || rc == SP_ENOTFOUND)
        rc = 0;
    for (size_t i = 0; i < STUDY_KEY_KINDS; i++) {
        int rc2 = scan_close(&sc[i], "a partition");
        rc = rc ? rc : rc2;
    }
    rocksdb_release_snapshot(s->db, snap);
    return rc;
}

int store_partition_studies(store_t *s, uint32_t partition, store_study_fn fn, void *ctx)
{
    if (!s || !fn || partition > 0xffff)
        return SP_EINVAL;
    return walk_studies(s, partition, fn, ctx);
}

typedef struct {
    store_held_fn held;
    void *ctx;
} held_check_t;

static int held_entry(void *ctx, const store_entry_t *e)
{
    const held_check_t *h = ctx;
    return h->held(h->ctx, e) ? 0 : SP_ECONFLICT;
}

/* Deletes one study of a partition (delete_study) with its gate closed, so
 * that puts of the study land wholly before or wholly after. When held is
 * not NULL, first asks it about every instance of the study and deletes
 * nothing (SP_ECONFLICT) unless all are held; the gate stays closed from
 * that check to the write, so nothing held() was not asked about is
 * deleted. Returns 0 with *ninst set, or as delete_study. */
static int delete_study_gated(store_t *s, uint32_t part, const char *study, store_held_fn held,
                              void *ctx, uint64_t *ninst)
{
    gate_t *g = &s->study_gates[stripe(study)];
    int rc = 0;
    *ninst = 0;
    gate_close(g);
    if (held) {
        held_check_t h = {held, ctx};
        buf_t prefix = {0};
        key_loc(&prefix, 'I', part, study, NULL, NULL, true);
        rc = list_prefix(s, &prefix, held_entry, &h, study);
        buf_free(&prefix);
    }
    if (rc == 0)
        rc = delete_study(s, part, study, ninst);
    gate_open(g);
    return rc;
}

int store_delete_study_if(store_t *s, uint32_t partition, const char *study_uid, store_held_fn held,
                          void *ctx, uint64_t *deleted)
{
    uint64_t n = 0;
    if (deleted)
        *deleted = 0;
    if (!s || partition > 0xffff || !sp_uid_valid(study_uid) || !held)
        return SP_EINVAL;
    int rc = delete_study_gated(s, partition, study_uid, held, ctx, &n);
    if (rc == 0 && n)
        log_debug("store: deleted study %s of partition %u (%llu instances, all held elsewhere)",
                  study_uid, (unsigned)partition, (unsigned long long)n);
    if (deleted)
        *deleted = n;
    return rc;
}

/* A partition deletion in progress (store_delete_partition). */
typedef struct {
    store_t *s;
    uint32_t part;
    uint64_t total;
    size_t studies;
    uint64_t *deleted;
} part_delete_t;

static int delete_next_study(void *ctx, const char *study)
{
    part_delete_t *d = ctx;
    uint64_t n = 0;
    int rc = delete_study_gated(d->s, d->part, study, NULL, NULL, &n);
    if (rc)
        return rc;
    d->total += n;
    d->studies++;
    if (d->deleted)
        *d->deleted = d->total;
    return 0;
}

int store_delete_partition(store_t *s, uint32_t partition, uint64_t *deleted)
{
    if (deleted)
        *deleted = 0;
    if (!s || partition > 0xffff)
        return SP_EINVAL;
    /* Each study is deleted from its current state under its closed gate. */
    part_delete_t d = {.s = s, .part = partition, .deleted = deleted};
    int rc = walk_studies(s, partition, delete_next_study, &d);
    if (rc)
        log_error("store: deleting partition %u stopped after %zu studies (%llu instances)",
                  (unsigned)partition, d.studies, (unsigned long long)d.total);
    else
        log_info("store: deleted partition %u: %zu studies, %llu instances", (unsigned)partition,
                 d.studies, (unsigned long long)d.total);
    return rc;
}
