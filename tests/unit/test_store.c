/* test_store.c - unit tests of the storage node's RocksDB store (node/store.c).
 *
 * Each test gets a fresh database in its own mkdtemp() directory under /tmp,
 * removed afterwards. Corruption tests open the database directly with the
 * RocksDB C API to damage an object behind the store's back. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include "../../common/log.h"
#include "../../common/part10.h"
#include "../../node/store.h"

#include <rocksdb/c.h>

#include <dirent.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define CT_IMAGE "1.2.840.10008.5.1.4.1.1.2"
#define EXPLICIT_LE "1.2.840.10008.1.2.1"

/* ---- fixture -------------------------------------------------------- */

typedef struct {
    char dir[64];
    store_t *s;
} fixture_t;

static store_t *open_at(const char *dir)
{
    store_config_t cfg;
    store_config_defaults(&cfg);
    cfg.path = (char *)dir;
    cfg.block_cache_bytes = 8u << 20;
    cfg.write_buffer_bytes = 4u << 20;
    store_t *s = NULL;
    char err[256] = "";
    int rc = store_open(&cfg, &s, err, sizeof err);
    if (rc != 0)
        fprintf(stderr, "store_open: %s\n", err);
    assert_int_equal(rc, 0);
    assert_non_null(s);
    return s;
}

static int setup(void **state)
{
    fixture_t *fx = calloc(1, sizeof *fx);
    strcpy(fx->dir, "/tmp/test_store.XXXXXX");
    if (!mkdtemp(fx->dir))
        return -1;
    fx->s = open_at(fx->dir);
    *state = fx;
    return 0;
}

/* Removes a directory and everything below it. */
static void rm_tree(const char *dir)
{
    DIR *d = opendir(dir);
    if (d) {
        struct dirent *de;
        while ((de = readdir(d)) != NULL) {
            if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
                continue;
            char path[512];
            struct stat st;
            snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
            if (lstat(path, &st) == 0 && S_ISDIR(st.st_mode))
                rm_tree(path);
            else
                unlink(path);
        }
        closedir(d);
    }
    rmdir(dir);
}

static int teardown(void **state)
{
    fixture_t *fx = *state;
    store_close(&fx->s);
    assert_null(fx->s);
    rm_tree(fx->dir);
    free(fx);
    return 0;
}

static void reopen(fixture_t *fx)
{
    store_close(&fx->s);
    fx->s = open_at(fx->dir);
}

/* ---- instances ------------------------------------------------------ */

typedef struct {
    uint32_t part;
    const char *pid, *pname, *study, *date, *acc, *modality, *series, *sop, *inum;
} inst_t;

static void inst_attrs(const inst_t *in, attrs_t *a)
{
    memset(a, 0, sizeof *a);
    attrs_set(a, ATTR_SPECIFIC_CHARACTER_SET, "ISO_IR 192");
    attrs_set(a, ATTR_PATIENT_ID, in->pid);
    attrs_set(a, ATTR_PATIENT_NAME, in->pname);
    attrs_set(a, ATTR_PATIENT_SEX, "O");
    attrs_set(a, ATTR_STUDY_INSTANCE_UID, in->study);
    attrs_set(a, ATTR_STUDY_DATE, in->date);
    attrs_set(a, ATTR_STUDY_TIME, "101500");
    attrs_set(a, ATTR_ACCESSION_NUMBER, in->acc);
    attrs_set(a, ATTR_STUDY_DESCRIPTION, "Test study");
    attrs_set(a, ATTR_MODALITY, in->modality);
    attrs_set(a, ATTR_SERIES_INSTANCE_UID, in->series);
    attrs_set(a, ATTR_SERIES_NUMBER, "1");
    attrs_set(a, ATTR_SOP_INSTANCE_UID, in->sop);
    attrs_set(a, ATTR_SOP_CLASS_UID, CT_IMAGE);
    attrs_set(a, ATTR_INSTANCE_NUMBER, in->inum);
    attrs_set(a, ATTR_TRANSFER_SYNTAX_UID, EXPLICIT_LE);
}

/* Deterministic pseudo-random bytes (xorshift32). */
static uint8_t *make_bytes(size_t n, uint32_t seed)
{
    uint8_t *b = malloc(n ? n : 1);
    uint32_t x = seed * 2654435761u + 1;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        b[i] = (uint8_t)x;
    }
    return b;
}

static int put_data(store_t *s, const inst_t *in, const uint8_t *data, size_t len,
                    store_outcome_t *out)
{
    attrs_t a;
    inst_attrs(in, &a);
    store_put_t p = {.partition = in->part, .attrs = &a, .data = data, .len = len};
    sp_digest(data, len, p.digest);
    int rc = store_put(s, &p, out);
    attrs_clear(&a);
    return rc;
}

static void put_ok(store_t *s, const inst_t *in, size_t len, uint32_t seed)
{
    uint8_t *b = make_bytes(len, seed);
    store_outcome_t out = STORE_DUPLICATE;
    assert_int_equal(put_data(s, in, b, len, &out), 0);
    assert_int_equal(out, STORE_STORED);
    free(b);
}

static inst_t simple(uint32_t part, const char *study, const char *series, const char *sop)
{
    inst_t in = {part, "PAT1", "Smith^John", study, "20200115", "A100", "CT", series, sop, "1"};
    return in;
}

static store_stats_t stats(store_t *s)
{
    store_stats_t st;
    assert_int_equal(store_stats(s, &st), 0);
    return st;
}

/* ---- put / get -------------------------------------------------------- */

static void check_get(store_t *s, const inst_t *in, size_t len, uint32_t seed)
{
    uint8_t *want = make_bytes(len, seed);
    store_object_t o;
    assert_int_equal(store_get(s, in->sop, &o), 0);
    assert_int_equal(o.len, len);
    assert_memory_equal(o.data, want, len);
    assert_int_equal(o.partition, in->part);
    uint8_t d[SP_DIGEST_LEN];
    sp_digest(want, len, d);
    assert_memory_equal(o.digest, d, SP_DIGEST_LEN);
    assert_string_equal(attrs_str(&o.attrs, ATTR_STUDY_INSTANCE_UID), in->study);
    assert_string_equal(attrs_str(&o.attrs, ATTR_SERIES_INSTANCE_UID), in->series);
    assert_string_equal(attrs_str(&o.attrs, ATTR_PATIENT_NAME), in->pname);
    assert_string_equal(attrs_str(&o.attrs, ATTR_TRANSFER_SYNTAX_UID), EXPLICIT_LE);
    assert_null(attrs_get(&o.attrs, ATTR_REFERRING_PHYSICIAN_NAME));
    store_object_free(&o);
    assert_null(o.data);
    free(want);
}

static void test_put_get_bit_exact(void **state)
{
    fixture_t *fx = *state;
    inst_t small = simple(7, "1.2.3", "1.2.3.1", "1.2.3.1.1");
    inst_t large = simple(7, "1.2.3", "1.2.3.1", "1.2.3.1.2");
    inst_t one = simple(7, "1.2.3", "1.2.3.1", "1.2.3.1.3");
    put_ok(fx->s, &small, 300, 1);
    put_ok(fx->s, &large, 200000, 2); /* over blob_min_bytes: a blob */
    put_ok(fx->s, &one, 1, 3);
    check_get(fx->s, &small, 300, 1);
    check_get(fx->s, &large, 200000, 2);
    check_get(fx->s, &one, 1, 3);

    store_object_t o;
    assert_int_equal(store_get(fx->s, "1.2.3.1.99", &o), SP_ENOTFOUND);
    assert_null(o.data);
    store_stats_t st = stats(fx->s);
    assert_int_equal(st.instances, 3);
    assert_int_equal(st.bytes, 300 + 200000 + 1);
    assert_int_equal(st.studies, 1);
    assert_int_equal(st.conflicts, 0);
}

static void test_duplicate_is_idempotent(void **state)
{
    fixture_t *fx = *state;
    inst_t in = simple(7, "1.2.3", "1.2.3.1", "1.2.3.1.1");
    uint8_t *b = make_bytes(5000, 9);
    store_outcome_t out;
    assert_int_equal(put_data(fx->s, &in, b, 5000, &out), 0);
    assert_int_equal(out, STORE_STORED);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(put_data(fx->s, &in, b, 5000, &out), 0);
        assert_int_equal(out, STORE_DUPLICATE);
    }
    store_stats_t st = stats(fx->s);
    assert_int_equal(st.instances, 1);
    assert_int_equal(st.bytes, 5000);
    assert_int_equal(st.conflicts, 0);
    check_get(fx->s, &in, 5000, 9);
    free(b);
}

static void test_conflict_is_kept_aside(void **state)
{
    fixture_t *fx = *state;
    inst_t in = simple(7, "1.2.3", "1.2.3.1", "1.2.3.1.1");
    uint8_t *a = make_bytes(4000, 1), *b = make_bytes(4000, 2), *c = make_bytes(50, 3);
    store_outcome_t out;
    assert_int_equal(put_data(fx->s, &in, a, 4000, &out), 0);
    assert_int_equal(out, STORE_STORED);
    assert_int_equal(put_data(fx->s, &in, b, 4000, &out), 0);
    assert_int_equal(out, STORE_CONFLICT);
    assert_int_equal(put_data(fx->s, &in, b, 4000, &out), 0); /* same copy again */
    assert_int_equal(out, STORE_CONFLICT);
    assert_int_equal(put_data(fx->s, &in, c, 50, &out), 0);
    assert_int_equal(out, STORE_CONFLICT);
    assert_int_equal(put_data(fx->s, &in, a, 4000, &out), 0);
    assert_int_equal(out, STORE_DUPLICATE);

    check_get(fx->s, &in, 4000, 1); /* the original, untouched */
    store_stats_t st = stats(fx->s);
    assert_int_equal(st.instances, 1);
    assert_int_equal(st.bytes, 4000);
    assert_int_equal(st.conflicts, 2);

    reopen(fx);
    st = stats(fx->s);
    assert_int_equal(st.conflicts, 2);
    assert_int_equal(st.instances, 1);
    check_get(fx->s, &in, 4000, 1);
    free(a), free(b), free(c);
}

static int count_entry(void *ctx, const store_entry_t *e)
{
    (void)e;
    (*(int *)ctx)++;
    return 0;
}

static void test_wrong_digest_refused(void **state)
{
    fixture_t *fx = *state;
    inst_t in = simple(7, "1.2.3", "1.2.3.1", "1.2.3.1.1");
    attrs_t a;
    inst_attrs(&in, &a);
    uint8_t *b = make_bytes(1000, 1);
    store_put_t p = {.partition = 7, .attrs = &a, .data = b, .len = 1000};
    sp_digest(b, 999, p.digest); /* not the digest of these bytes */
    store_outcome_t out;
    assert_int_equal(store_put(fx->s, &p, &out), SP_EDIGEST);
    attrs_clear(&a);

    store_object_t o;
    assert_int_equal(store_get(fx->s, in.sop, &o), SP_ENOTFOUND);
    int n = 0;
    assert_int_equal(store_list(fx->s, in.study, NULL, NULL, 0, count_entry, &n, NULL), 0);
    assert_int_equal(n, 0);
    store_stats_t st = stats(fx->s);
    assert_int_equal(st.instances, 0);
    assert_int_equal(st.studies, 0);
    uint64_t count = 9;
    uint8_t d[SP_DIGEST_LEN];
    assert_int_equal(store_partition_digest(fx->s, 7, d, &count, NULL), 0);
    assert_int_equal(count, 0);

    /* The correct digest is then accepted. */
    put_ok(fx->s, &in, 1000, 1);
    free(b);
}

static void expect_refused(store_t *s, inst_t in, size_t len)
{
    uint8_t *b = make_bytes(len, 1);
    store_outcome_t out;
    assert_int_equal(put_data(s, &in, b, len, &out), SP_EINVAL);
    free(b);
}

static void test_bad_input_refused(void **state)
{
    fixture_t *fx = *state;
    expect_refused(fx->s, simple(7, "1.02.3", "1.2.3.1", "1.2.3.1.1"), 10);
    expect_refused(fx->s, simple(7, "1.2.3", "abc", "1.2.3.1.1"), 10);
    expect_refused(fx->s, simple(7, "1.2.3", "1.2.3.1", "1.2.3.1.1."), 10);
    expect_refused(fx->s, simple(7, "1.2.3", "1.2.3.1", ""), 10);
    expect_refused(fx->s, simple(7, "1.2.3", NULL, "1.2.3.1.1"), 10);
    expect_refused(fx->s,
                   simple(7, "1.2.3", "1.2.3.1",
                          "1.2.3.4.5.6.7.8.9.10.11.12.13.14.15.16.17.18.19.20.21.22.23.24.25"),
                   10);
    expect_refused(fx->s, simple(65536, "1.2.3", "1.2.3.1", "1.2.3.1.1"), 10);
    expect_refused(fx->s, simple(7, "1.2.3", "1.2.3.1", "1.2.3.1.1"), 0);

    store_stats_t st = stats(fx->s);
    assert_int_equal(st.instances, 0);
    assert_int_equal(st.studies, 0);
    store_object_t o;
    assert_int_equal(store_get(fx->s, "1.2.3.1.1", &o), SP_ENOTFOUND);
    assert_int_equal(store_get(fx->s, "1..2", &o), SP_EINVAL);
    int n = 0;
    assert_int_equal(store_list(fx->s, "x", NULL, NULL, 0, count_entry, &n, NULL), SP_EINVAL);
    assert_int_equal(store_list(fx->s, "1.2.3", "1.02", NULL, 0, count_entry, &n, NULL), SP_EINVAL);
}

static void test_study_in_other_partition_refused(void **state)
{
    fixture_t *fx = *state;
    inst_t a = simple(7, "1.2.3", "1.2.3.1", "1.2.3.1.1");
    inst_t b = simple(8, "1.2.3", "1.2.3.1", "1.2.3.1.2");
    put_ok(fx->s, &a, 100, 1);
    expect_refused(fx->s, b, 100);
    store_stats_t st = stats(fx->s);
    assert_int_equal(st.instances, 1);
    store_object_t o;
    assert_int_equal(store_get(fx->s, b.sop, &o), SP_ENOTFOUND);
}

/* ---- corruption ------------------------------------------------------- */

/* Opens the store's database directly, every column family with default
 * options except blob files on "objects" (so a flush writes blob files). */
typedef struct {
    rocksdb_t *db;
    rocksdb_options_t *opt, *blob;
    char **names;
    size_t n;
    rocksdb_column_family_handle_t *cf[16];
} raw_db_t;

static void raw_open(raw_db_t *r, const char *dir)
{
    char *err = NULL;
    memset(r, 0, sizeof *r);
    r->opt = rocksdb_options_create();
    r->blob = rocksdb_options_create();
    rocksdb_options_set_enable_blob_files(r->blob, 1);
    rocksdb_options_set_min_blob_size(r->blob, 16u << 10);
    r->names = rocksdb_list_column_families(r->opt, dir, &r->n, &err);
    assert_null(err);
    assert_true(r->n >= 6 && r->n <= 16);
    const rocksdb_options_t *opts[16];
    for (size_t i = 0; i < r->n; i++)
        opts[i] = strcmp(r->names[i], "objects") == 0 ? r->blob : r->opt;
    r->db = rocksdb_open_column_families(r->opt, dir, (int)r->n, (const char *const *)r->names,
                                         opts, r->cf, &err);
    assert_null(err);
}

static rocksdb_column_family_handle_t *raw_cf(raw_db_t *r, const char *name)
{
    for (size_t i = 0; i < r->n; i++)
        if (strcmp(r->names[i], name) == 0)
            return r->cf[i];
    fail_msg("no column family %s", name);
    return NULL;
}

static void raw_close(raw_db_t *r)
{
    for (size_t i = 0; i < r->n; i++)
        rocksdb_column_family_handle_destroy(r->cf[i]);
    rocksdb_close(r->db);
    rocksdb_list_column_families_destroy(r->names, r->n);
    rocksdb_options_destroy(r->opt);
    rocksdb_options_destroy(r->blob);
}

/* The objects key of the layout in store.h: P(2, big-endian)|study\0series\0sop. */
static size_t object_key(const inst_t *in, char *k)
{
    size_t n = 0;
    k[n++] = (char)(in->part >> 8);
    k[n++] = (char)(in->part & 0xff);
    const char *parts[3] = {in->study, in->series, in->sop};
    for (int i = 0; i < 3; i++) {
        if (i)
            k[n++] = '\0';
        memcpy(k + n, parts[i], strlen(parts[i]));
        n += strlen(parts[i]);
    }
    return n;
}

static void flip_object_byte(raw_db_t *r, const inst_t *in, size_t at)
{
    char key[256], *err = NULL;
    size_t kn = object_key(in, key), vn = 0;
    rocksdb_readoptions_t *ro = rocksdb_readoptions_create();
    rocksdb_writeoptions_t *wo = rocksdb_writeoptions_create();
    char *v = rocksdb_get_cf(r->db, ro, raw_cf(r, "objects"), key, kn, &vn, &err);
    assert_null(err);
    assert_non_null(v);
    assert_true(at < vn);
    v[at] ^= 0x01;
    rocksdb_put_cf(r->db, wo, raw_cf(r, "objects"), key, kn, v, vn, &err);
    assert_null(err);
    rocksdb_free(v);
    rocksdb_readoptions_destroy(ro);
    rocksdb_writeoptions_destroy(wo);
}

static void expect_corrupt(store_t *s, const char *sop)
{
    store_object_t o;
    memset(&o, 0xab, sizeof o);
    assert_int_equal(store_get(s, sop, &o), SP_EDIGEST);
    assert_null(o.data);
    assert_int_equal(o.len, 0);
}

static void test_corrupt_object_detected(void **state)
{
    fixture_t *fx = *state;
    inst_t small = simple(7, "1.2.3", "1.2.3.1", "1.2.3.1.1");
    inst_t large = simple(7, "1.2.3", "1.2.3.1", "1.2.3.1.2");
    inst_t good = simple(7, "1.2.3", "1.2.3.1", "1.2.3.1.3");
    put_ok(fx->s, &small, 500, 1);
    put_ok(fx->s, &large, 100000, 2);
    put_ok(fx->s, &good, 700, 3);
    store_close(&fx->s);

    raw_db_t r;
    raw_open(&r, fx->dir);
    flip_object_byte(&r, &small, 17);
    flip_object_byte(&r, &large, 99999);
    raw_close(&r);

    fx->s = open_at(fx->dir);
    expect_corrupt(fx->s, small.sop);
    expect_corrupt(fx->s, large.sop);
    check_get(fx->s, &good, 700, 3);
    assert_int_equal(stats(fx->s).corrupt_reads, 2);
    expect_corrupt(fx->s, small.sop);
    assert_int_equal(stats(fx->s).corrupt_reads, 3);
}

/* Finds `needle` in a file and flips one bit of it there. */
static bool flip_in_file(const char *path, const uint8_t *needle, size_t n)
{
    FILE *fp = fopen(path, "r+b");
    if (!fp)
        return false;
    fseek(fp, 0, SEEK_END);
    long size = ftell(fp);
    rewind(fp);
    uint8_t *buf = malloc((size_t)size + 1);
    bool done = fread(buf, 1, (size_t)size, fp) == (size_t)size;
    for (long i = 0; done && i + (long)n <= size; i++) {
        if (memcmp(buf + i, needle, n) == 0) {
            fseek(fp, i + 5, SEEK_SET);
            fputc(buf[i + 5] ^ 0x80, fp);
            fclose(fp);
            free(buf);
            return true;
        }
    }
    fclose(fp);
    free(buf);
    return false;
}

/* Flushes the store's objects to files and flips a bit of one object
 * (size bytes from make_bytes(size, seed)) inside its blob file, where only
 * RocksDB's blob record checksum notices it. */
static void corrupt_in_blob_file(fixture_t *fx, size_t size, uint32_t seed)
{
    store_close(&fx->s);

    /* Flush the memtable so the object lands in a blob file on disk. */
    raw_db_t r;
    raw_open(&r, fx->dir);
    rocksdb_flushoptions_t *fo = rocksdb_flushoptions_create();
    rocksdb_flushoptions_set_wait(fo, 1);
    char *err = NULL;
    rocksdb_flush_cf(r.db, fo, raw_cf(&r, "objects"), &err);
    assert_null(err);
    rocksdb_flushoptions_destroy(fo);
    raw_close(&r);

    uint8_t *data = make_bytes(size, seed);
    DIR *d = opendir(fx->dir);
    assert_non_null(d);
    struct dirent *de;
    int flipped = 0;
    while ((de = readdir(d)) != NULL) {
        size_t len = strlen(de->d_name);
        if (len > 5 && strcmp(de->d_name + len - 5, ".blob") == 0) {
            char path[512];
            snprintf(path, sizeof path, "%s/%s", fx->dir, de->d_name);
            flipped += flip_in_file(path, data + size / 2, 64);
        }
    }
    closedir(d);
    free(data);
    assert_int_equal(flipped, 1);
    fx->s = open_at(fx->dir);
}

static void test_corrupt_blob_file_detected(void **state)
{
    fixture_t *fx = *state;
    inst_t large = simple(7, "1.2.3", "1.2.3.1", "1.2.3.1.1");
    put_ok(fx->s, &large, 80000, 5);
    corrupt_in_blob_file(fx, 80000, 5);
    expect_corrupt(fx->s, large.sop);
    assert_int_equal(stats(fx->s).corrupt_reads, 1);
}

/* ---- list ------------------------------------------------------------ */

typedef struct {
    char sop[32][65];
    char series[32][65];
    uint64_t size[32];
    int n;
    int stop_after;
} listing_t;

static int list_entry(void *ctx, const store_entry_t *e)
{
    listing_t *l = ctx;
    assert_true(l->n < 32);
    strcpy(l->sop[l->n], e->sop_uid);
    strcpy(l->series[l->n], e->series_uid);
    l->size[l->n] = e->size;
    assert_string_equal(e->sop_class_uid, CT_IMAGE);
    assert_string_equal(e->transfer_syntax_uid, EXPLICIT_LE);
    assert_string_equal(e->study_uid, "1.2.3");
    assert_int_equal(e->partition, 7);
    l->n++;
    return l->stop_after && l->n >= l->stop_after;
}

static void test_list_study_and_series(void **state)
{
    fixture_t *fx = *state;
    const char *sops[] = {"1.2.3.1.1", "1.2.3.1.2", "1.2.3.1.10", "1.2.3.2.1", "1.2.3.2.2"};
    for (int i = 0; i < 5; i++) {
        inst_t in = simple(7, "1.2.3", i < 3 ? "1.2.3.1" : "1.2.3.2", sops[i]);
        put_ok(fx->s, &in, 100 + (size_t)i, (uint32_t)i);
    }
    inst_t other = simple(7, "1.2.30", "1.2.30.1", "1.2.30.1.1"); /* a study UID prefix */
    put_ok(fx->s, &other, 10, 99);

    listing_t l = {0};
    assert_int_equal(store_list(fx->s, "1.2.3", NULL, NULL, 0, list_entry, &l, NULL), 0);
    assert_int_equal(l.n, 5);
    for (int i = 1; i < l.n; i++) { /* key order: series, then SOP, bytewise */
        int c = strcmp(l.series[i - 1], l.series[i]);
        assert_true(c < 0 || (c == 0 && strcmp(l.sop[i - 1], l.sop[i]) < 0));
    }
    uint64_t total = 0;
    for (int i = 0; i < l.n; i++)
        total += l.size[i];
    assert_int_equal(total, 100 + 101 + 102 + 103 + 104);

    memset(&l, 0, sizeof l);
    assert_int_equal(store_list(fx->s, "1.2.3", "1.2.3.1", NULL, 0, list_entry, &l, NULL), 0);
    assert_int_equal(l.n, 3);
    assert_string_equal(l.sop[0], "1.2.3.1.1");
    assert_string_equal(l.sop[1], "1.2.3.1.10");
    assert_string_equal(l.sop[2], "1.2.3.1.2");

    memset(&l, 0, sizeof l);
    l.stop_after = 2;
    assert_int_equal(store_list(fx->s, "1.2.3", NULL, NULL, 0, list_entry, &l, NULL), 0);
    assert_int_equal(l.n, 2);

    int n = 0;
    assert_int_equal(store_list(fx->s, "1.2.4", NULL, NULL, 0, count_entry, &n, NULL), 0);
    assert_int_equal(n, 0);
    assert_int_equal(store_list(fx->s, "1.2.3", "1.2.3.9", NULL, 0, count_entry, &n, NULL), 0);
    assert_int_equal(n, 0);
}

/* ---- find ------------------------------------------------------------ */

/* Patients, studies, series and instances used by the find tests. The
 * last two studies carry multi-valued values (invalid DICOM for these VM 1
 * attributes, but possible input) and an ACR-NEMA date. */
static const struct {
    uint32_t part;
    const char *pid, *pname, *study, *date, *acc;
    const char *series[2], *modality[2];
    int count[2];
} find_data[] = {
    {7,
     "PAT1",
     "Smith^John",
     "1.2.3.1",
     "20200115",
     "A100",
     {"1.2.3.1.1", "1.2.3.1.2"},
     {"CT", "MR"},
     {3, 2}},
    {300,
     "PAT1",
     "Smith^John",
     "1.2.3.2",
     "20210610",
     "A200",
     {"1.2.3.2.1", NULL},
     {"CT", NULL},
     {1, 0}},
    {7,
     "PAT2",
     "Smythe^Anna",
     "1.2.3.3",
     "20200301",
     "A300",
     {"1.2.3.3.1", NULL},
     {"US", NULL},
     {2, 0}},
    {4095,
     "PAT3",
     "Jones^Bob",
     "1.2.3.4",
     "20191231",
     "A400",
     {"1.2.3.4.1", NULL},
     {"MR", NULL},
     {1, 0}},
    {9,
     "PAT4",
     "smith^jane",
     "1.2.3.5",
     "20200115",
     "A500",
     {"1.2.3.5.1", "1.2.3.5.2"},
     {"CT", "CT"},
     {1, 1}},
    {9,
     "PAT5",
     "M\xc3\xbcller^J\xc3\xb6rg",
     "1.2.3.6",
     "20220202",
     "B600",
     {"1.2.3.6.1", NULL},
     {"MR", NULL},
     {1, 0}},
    {10,
     "PAT6",
     "Roe^Ann\\Doe^Ann",
     "1.2.3.7",
     "2023.03.03",
     "C700\\C701",
     {"1.2.3.7.1", NULL},
     {"OT", NULL},
     {1, 0}},
    {10,
     "PAT7\\PAT8",
     "Poe^Al",
     "1.2.3.8",
     "20230304",
     "C800",
     {"1.2.3.8.1", NULL},
     {"OT", NULL},
     {1, 0}},
};

static void load_find_data(store_t *s)
{
    uint32_t seed = 100;
    for (size_t i = 0; i < sizeof find_data / sizeof find_data[0]; i++) {
        for (int j = 0; j < 2 && find_data[i].series[j]; j++) {
            for (int k = 1; k <= find_data[i].count[j]; k++) {
                char sop[96], inum[16];
                snprintf(sop, sizeof sop, "%s.%d", find_data[i].series[j], k);
                snprintf(inum, sizeof inum, "%d", k);
                inst_t in = {find_data[i].part,
                             find_data[i].pid,
                             find_data[i].pname,
                             find_data[i].study,
                             find_data[i].date,
                             find_data[i].acc,
                             find_data[i].modality[j],
                             find_data[i].series[j],
                             sop,
                             inum};
                put_ok(s, &in, 64 + (size_t)k, seed++);
            }
        }
    }
}

#define MAX_RESULTS 64

typedef struct {
    attrs_t r[MAX_RESULTS];
    size_t n;
    size_t stop_after;
} results_t;

static int collect(void *ctx, const attrs_t *res)
{
    results_t *rs = ctx;
    assert_true(rs->n < MAX_RESULTS);
    memset(&rs->r[rs->n], 0, sizeof rs->r[rs->n]);
    attrs_copy(&rs->r[rs->n++], res);
    return rs->stop_after && rs->n >= rs->stop_after;
}

static void results_clear(results_t *rs)
{
    for (size_t i = 0; i < rs->n; i++)
        attrs_clear(&rs->r[i]);
    rs->n = 0;
}

/* A query: level, then keyword=value pairs, NULL-terminated. */
typedef struct {
    level_t level;
    unsigned flags;
    const char *kv[16];
} query_t;

static int run(store_t *s, const query_t *qd, size_t limit, bool no_index, results_t *rs)
{
    attrs_t keys = {0};
    for (int i = 0; qd->kv[i]; i += 2) {
        const attr_info_t *ai = attr_by_keyword(qd->kv[i]);
        assert_non_null(ai);
        attrs_set(&keys, ai->id, qd->kv[i + 1]);
    }
    store_query_t q = {.level = qd->level,
                       .keys = &keys,
                       .match_flags = qd->flags,
                       .limit = limit,
                       .no_index = no_index};
    results_clear(rs);
    int rc = store_find(s, &q, collect, rs);
    attrs_clear(&keys);
    return rc;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The results' identities (PatientID|study|series|sop), sorted, joined by ','. */
static void ids(const results_t *rs, char *out, size_t size)
{
    char *v[MAX_RESULTS];
    for (size_t i = 0; i < rs->n; i++) {
        char buf[300];
        snprintf(buf, sizeof buf, "%s|%s|%s|%s", attrs_str(&rs->r[i], ATTR_PATIENT_ID),
                 attrs_str(&rs->r[i], ATTR_STUDY_INSTANCE_UID),
                 attrs_str(&rs->r[i], ATTR_SERIES_INSTANCE_UID),
                 attrs_str(&rs->r[i], ATTR_SOP_INSTANCE_UID));
        v[i] = strdup(buf);
    }
    qsort(v, rs->n, sizeof v[0], cmp_str);
    out[0] = '\0';
    for (size_t i = 0; i < rs->n; i++) {
        if (i)
            strncat(out, ",", size - strlen(out) - 1);
        strncat(out, v[i], size - strlen(out) - 1);
        free(v[i]);
    }
}

/* The results' values of one attribute, sorted, joined by ','. */
static void values(const results_t *rs, attr_id_t id, char *out, size_t size)
{
    char *v[MAX_RESULTS];
    for (size_t i = 0; i < rs->n; i++)
        v[i] = strdup(attrs_get(&rs->r[i], id) ? attrs_get(&rs->r[i], id) : "(absent)");
    qsort(v, rs->n, sizeof v[0], cmp_str);
    out[0] = '\0';
    for (size_t i = 0; i < rs->n; i++) {
        if (i)
            strncat(out, ",", size - strlen(out) - 1);
        strncat(out, v[i], size - strlen(out) - 1);
        free(v[i]);
    }
}

/* Runs a query through the indexes and as a full scan, checks both give
 * the same results, and returns the sorted values of `id`. */
static void find_values(store_t *s, const query_t *qd, attr_id_t id, char *out, size_t size)
{
    static results_t a, b;
    char ia[4096], ib[4096];
    assert_int_equal(run(s, qd, 0, false, &a), 0);
    assert_int_equal(run(s, qd, 0, true, &b), 0);
    ids(&a, ia, sizeof ia);
    ids(&b, ib, sizeof ib);
    assert_string_equal(ia, ib);
    assert_int_equal(a.n, b.n);
    values(&a, id, out, size);
    results_clear(&a);
    results_clear(&b);
}

#define EXPECT(s, id, want, ...)                                                                   \
    do {                                                                                           \
        query_t q_ = __VA_ARGS__;                                                                  \
        char got_[4096];                                                                           \
        find_values((s), &q_, (id), got_, sizeof got_);                                            \
        assert_string_equal(got_, (want));                                                         \
    } while (0)

static void test_find_study_level(void **state)
{
    fixture_t *fx = *state;
    load_find_data(fx->s);
    store_t *s = fx->s;
    const attr_id_t SU = ATTR_STUDY_INSTANCE_UID;

    /* Single value, universal matching. */
    EXPECT(s, SU, "1.2.3.1,1.2.3.2", {LEVEL_STUDY, 0, {"PatientID", "PAT1", "StudyDate", ""}});
    EXPECT(s, SU, "1.2.3.1,1.2.3.2,1.2.3.3,1.2.3.4,1.2.3.5,1.2.3.6,1.2.3.7,1.2.3.8",
           {LEVEL_STUDY, 0, {"PatientName", ""}});
    EXPECT(s, SU, "1.2.3.1,1.2.3.2,1.2.3.3,1.2.3.4,1.2.3.5,1.2.3.6,1.2.3.7,1.2.3.8",
           {LEVEL_STUDY, 0, {"PatientName", "*"}});
    EXPECT(s, SU, "1.2.3.3", {LEVEL_STUDY, 0, {"AccessionNumber", "A300"}});
    EXPECT(s, SU, "", {LEVEL_STUDY, 0, {"AccessionNumber", "a300"}});
    EXPECT(s, SU, "1.2.3.1", {LEVEL_STUDY, 0, {"StudyInstanceUID", "1.2.3.1"}});
    EXPECT(s, SU, "", {LEVEL_STUDY, 0, {"StudyInstanceUID", "1.2.3.99"}});

    /* Wildcards, case-insensitive person names when asked. */
    EXPECT(s, SU, "1.2.3.1,1.2.3.2", {LEVEL_STUDY, 0, {"PatientName", "Smi*"}});
    EXPECT(s, SU, "1.2.3.1,1.2.3.2,1.2.3.5",
           {LEVEL_STUDY, MATCH_PN_CASE_INSENSITIVE, {"PatientName", "smi*"}});
    EXPECT(s, SU, "1.2.3.5", {LEVEL_STUDY, 0, {"PatientName", "smith^jane"}});
    EXPECT(s, SU, "1.2.3.1,1.2.3.2,1.2.3.5",
           {LEVEL_STUDY, MATCH_PN_CASE_INSENSITIVE, {"PatientName", "SMITH^J*"}});
    EXPECT(s, SU, "", {LEVEL_STUDY, 0, {"PatientName", "SMITH^J*"}});
    EXPECT(s, SU, "1.2.3.1,1.2.3.2,1.2.3.3", {LEVEL_STUDY, 0, {"PatientName", "Sm?th*"}});
    EXPECT(s, SU, "1.2.3.6",
           {LEVEL_STUDY, MATCH_PN_CASE_INSENSITIVE, {"PatientName", "m\xc3\x9cller*"}});
    EXPECT(s, SU, "1.2.3.6", {LEVEL_STUDY, 0, {"PatientName", "M?ller^J*"}});
    EXPECT(s, SU, "1.2.3.1,1.2.3.2,1.2.3.3,1.2.3.4,1.2.3.5",
           {LEVEL_STUDY, 0, {"AccessionNumber", "A*"}});
    EXPECT(s, SU, "1.2.3.1,1.2.3.2,1.2.3.3,1.2.3.4,1.2.3.5,1.2.3.6,1.2.3.7,1.2.3.8",
           {LEVEL_STUDY, 0, {"PatientID", "PAT?"}});

    /* Dates: single value and ranges, open at either end. */
    EXPECT(s, SU, "1.2.3.1,1.2.3.5", {LEVEL_STUDY, 0, {"StudyDate", "20200115"}});
    EXPECT(s, SU, "1.2.3.1,1.2.3.3,1.2.3.5", {LEVEL_STUDY, 0, {"StudyDate", "20200101-20201231"}});
    EXPECT(s, SU, "1.2.3.4", {LEVEL_STUDY, 0, {"StudyDate", "-20191231"}});
    EXPECT(s, SU, "1.2.3.2,1.2.3.6,1.2.3.7,1.2.3.8", {LEVEL_STUDY, 0, {"StudyDate", "20210101-"}});
    EXPECT(s, SU, "1.2.3.1,1.2.3.5", {LEVEL_STUDY, 0, {"StudyDate", "20200115-20200115"}});

    /* UID lists (a duplicate in the list gives one result). */
    EXPECT(s, SU, "1.2.3.1,1.2.3.4",
           {LEVEL_STUDY, 0, {"StudyInstanceUID", "1.2.3.4\\1.2.3.1\\1.2.3.4\\1.2.3.77"}});

    /* Several keys together. */
    EXPECT(s, SU, "1.2.3.1,1.2.3.5",
           {LEVEL_STUDY,
            MATCH_PN_CASE_INSENSITIVE,
            {"PatientName", "smith*", "StudyDate", "20200115"}});
    EXPECT(s, SU, "1.2.3.1",
           {LEVEL_STUDY, 0, {"PatientID", "PAT1", "StudyDate", "20200101-20201231"}});

    /* Multi-valued stored values match on any value, through the indexes too,
     * and the ACR-NEMA date form is found by the date index. */
    EXPECT(s, SU, "1.2.3.7", {LEVEL_STUDY, 0, {"PatientName", "Doe*"}});
    EXPECT(s, SU, "1.2.3.7", {LEVEL_STUDY, 0, {"PatientName", "*^Ann"}});
    EXPECT(s, SU, "1.2.3.7", {LEVEL_STUDY, 0, {"AccessionNumber", "C701"}});
    EXPECT(s, SU, "1.2.3.7,1.2.3.8", {LEVEL_STUDY, 0, {"AccessionNumber", "C*"}});
    EXPECT(s, SU, "1.2.3.7", {LEVEL_STUDY, 0, {"StudyDate", "20230303"}});
    EXPECT(s, SU, "1.2.3.7,1.2.3.8", {LEVEL_STUDY, 0, {"StudyDate", "20230301-20230331"}});
    EXPECT(s, SU, "1.2.3.8", {LEVEL_STUDY, 0, {"PatientID", "PAT8"}});

    /* Values come back as stored. */
    EXPECT(s, ATTR_PATIENT_NAME, "Smith^John,Smith^John",
           {LEVEL_STUDY, 0, {"PatientID", "PAT1", "PatientName", ""}});
    EXPECT(s, ATTR_STUDY_DATE, "20191231",
           {LEVEL_STUDY, 0, {"StudyInstanceUID", "1.2.3.4", "StudyDate", ""}});
}

static void test_find_projection(void **state)
{
    fixture_t *fx = *state;
    load_find_data(fx->s);
    static results_t rs;
    query_t q = {LEVEL_STUDY,
                 0,
                 {"PatientName", "Jones*", "StudyDescription", "", "ReferringPhysicianName", "",
                  "Modality", "CT", "SOPInstanceUID", "1.2.3.4.1.1"}};
    assert_int_equal(run(fx->s, &q, 0, false, &rs), 0);
    assert_int_equal(rs.n, 1);
    const attrs_t *r = &rs.r[0];
    for (unsigned id = 0; id < ATTR_COUNT; id++) {
        switch (id) {
        case ATTR_PATIENT_NAME: assert_string_equal(r->v[id], "Jones^Bob"); break;
        case ATTR_STUDY_DESCRIPTION: assert_string_equal(r->v[id], "Test study"); break;
        case ATTR_REFERRING_PHYSICIAN_NAME: assert_string_equal(r->v[id], ""); break;
        case ATTR_PATIENT_ID: assert_string_equal(r->v[id], "PAT3"); break;
        case ATTR_STUDY_INSTANCE_UID: assert_string_equal(r->v[id], "1.2.3.4"); break;
        case ATTR_SPECIFIC_CHARACTER_SET: assert_string_equal(r->v[id], "ISO_IR 192"); break;
        default: /* unrequested, and keys below the study level: absent */
            if (r->v[id])
                fail_msg("unexpected %s = %s", attr_info((attr_id_t)id)->keyword, r->v[id]);
        }
    }
    results_clear(&rs);

    /* No keys at all: only the unique keys. */
    store_query_t nq = {.level = LEVEL_SERIES, .keys = NULL};
    assert_int_equal(store_find(fx->s, &nq, collect, &rs), 0);
    assert_int_equal(rs.n, 10);
    for (size_t i = 0; i < rs.n; i++) {
        assert_non_null(attrs_get(&rs.r[i], ATTR_SERIES_INSTANCE_UID));
        assert_non_null(attrs_get(&rs.r[i], ATTR_STUDY_INSTANCE_UID));
        assert_null(attrs_get(&rs.r[i], ATTR_MODALITY));
        assert_null(attrs_get(&rs.r[i], ATTR_SOP_INSTANCE_UID));
    }
    results_clear(&rs);
}

static void test_find_counts_and_modalities(void **state)
{
    fixture_t *fx = *state;
    load_find_data(fx->s);
    store_t *s = fx->s;
    EXPECT(s, ATTR_NUM_STUDY_SERIES, "2",
           {LEVEL_STUDY, 0, {"StudyInstanceUID", "1.2.3.1", "NumberOfStudyRelatedSeries", ""}});
    EXPECT(s, ATTR_NUM_STUDY_INSTANCES, "5",
           {LEVEL_STUDY, 0, {"StudyInstanceUID", "1.2.3.1", "NumberOfStudyRelatedInstances", ""}});
    EXPECT(s, ATTR_MODALITIES_IN_STUDY, "CT,CT,CT\\MR,MR,MR,OT,OT,US",
           {LEVEL_STUDY, 0, {"ModalitiesInStudy", ""}});
    EXPECT(s, ATTR_MODALITIES_IN_STUDY, "CT",
           {LEVEL_STUDY, 0, {"StudyInstanceUID", "1.2.3.5", "ModalitiesInStudy", ""}});
    EXPECT(s, ATTR_NUM_PATIENT_STUDIES, "2",
           {LEVEL_STUDY, 0, {"StudyInstanceUID", "1.2.3.2", "NumberOfPatientRelatedStudies", ""}});
    EXPECT(s, ATTR_NUM_PATIENT_INSTANCES, "6,6",
           {LEVEL_STUDY, 0, {"PatientID", "PAT1", "NumberOfPatientRelatedInstances", ""}});

    /* ModalitiesInStudy as a matching key, single and list. */
    EXPECT(s, ATTR_STUDY_INSTANCE_UID, "1.2.3.1,1.2.3.4,1.2.3.6",
           {LEVEL_STUDY, 0, {"ModalitiesInStudy", "MR"}});
    EXPECT(s, ATTR_STUDY_INSTANCE_UID, "1.2.3.1,1.2.3.3,1.2.3.4,1.2.3.6",
           {LEVEL_STUDY, 0, {"ModalitiesInStudy", "US\\MR"}});

    /* Series level count; a study count requested at series level. */
    EXPECT(
        s, ATTR_NUM_SERIES_INSTANCES, "2,3",
        {LEVEL_SERIES, 0, {"StudyInstanceUID", "1.2.3.1", "NumberOfSeriesRelatedInstances", ""}});
    EXPECT(s, ATTR_NUM_STUDY_INSTANCES, "5,5",
           {LEVEL_SERIES, 0, {"StudyInstanceUID", "1.2.3.1", "NumberOfStudyRelatedInstances", ""}});

    /* Patient level counts. */
    EXPECT(s, ATTR_NUM_PATIENT_STUDIES, "2",
           {LEVEL_PATIENT, 0, {"PatientID", "PAT1", "NumberOfPatientRelatedStudies", ""}});
    EXPECT(s, ATTR_NUM_PATIENT_SERIES, "3",
           {LEVEL_PATIENT, 0, {"PatientID", "PAT1", "NumberOfPatientRelatedSeries", ""}});
    EXPECT(s, ATTR_NUM_PATIENT_INSTANCES, "1,1,1,1,2,2,6",
           {LEVEL_PATIENT, 0, {"NumberOfPatientRelatedInstances", ""}});
}

static void test_find_patient_level(void **state)
{
    fixture_t *fx = *state;
    load_find_data(fx->s);
    store_t *s = fx->s;
    const attr_id_t PI = ATTR_PATIENT_ID;
    /* One result per patient, PAT1 once although it has two studies. */
    EXPECT(s, PI, "PAT1,PAT2,PAT3,PAT4,PAT5,PAT6,PAT7\\PAT8",
           {LEVEL_PATIENT, 0, {"PatientID", ""}});
    EXPECT(s, PI, "PAT1", {LEVEL_PATIENT, 0, {"PatientID", "PAT1"}});
    EXPECT(s, PI, "PAT1,PAT2,PAT3,PAT4,PAT5,PAT6,PAT7\\PAT8",
           {LEVEL_PATIENT, 0, {"PatientID", "PAT*"}});
    EXPECT(s, PI, "PAT7\\PAT8", {LEVEL_PATIENT, 0, {"PatientID", "PAT8"}});
    EXPECT(s, PI, "PAT7\\PAT8", {LEVEL_PATIENT, 0, {"PatientID", "PAT7\\PAT9"}});
    EXPECT(s, PI, "PAT1,PAT4",
           {LEVEL_PATIENT, MATCH_PN_CASE_INSENSITIVE, {"PatientName", "smith*"}});
    EXPECT(s, ATTR_PATIENT_NAME, "Smith^John", {LEVEL_PATIENT, 0, {"PatientName", "Smith*"}});
    /* Study keys are ignored at patient level and not returned. */
    EXPECT(s, ATTR_STUDY_DATE, "(absent)",
           {LEVEL_PATIENT, 0, {"PatientID", "PAT3", "StudyDate", "20000101"}});
    EXPECT(s, ATTR_STUDY_INSTANCE_UID, "(absent)", {LEVEL_PATIENT, 0, {"PatientID", "PAT3"}});
}

static void test_find_series_level(void **state)
{
    fixture_t *fx = *state;
    load_find_data(fx->s);
    store_t *s = fx->s;
    const attr_id_t SE = ATTR_SERIES_INSTANCE_UID;
    EXPECT(s, SE, "1.2.3.1.1,1.2.3.1.2", {LEVEL_SERIES, 0, {"StudyInstanceUID", "1.2.3.1"}});
    EXPECT(s, ATTR_MODALITY, "CT,MR",
           {LEVEL_SERIES, 0, {"StudyInstanceUID", "1.2.3.1", "Modality", ""}});
    EXPECT(s, SE, "1.2.3.1.1,1.2.3.2.1,1.2.3.5.1,1.2.3.5.2", {LEVEL_SERIES, 0, {"Modality", "CT"}});
    EXPECT(s, SE, "1.2.3.5.2", {LEVEL_SERIES, 0, {"SeriesInstanceUID", "1.2.3.5.2"}});
    EXPECT(s, SE, "1.2.3.5.2",
           {LEVEL_SERIES, 0, {"StudyInstanceUID", "1.2.3.5", "SeriesInstanceUID", "1.2.3.5.2"}});
    EXPECT(s, SE, "1.2.3.1.2,1.2.3.5.1",
           {LEVEL_SERIES, 0, {"SeriesInstanceUID", "1.2.3.5.1\\1.2.3.1.2"}});
    EXPECT(s, SE, "1.2.3.1.2", {LEVEL_SERIES, 0, {"PatientName", "Smith^John", "Modality", "MR"}});
    EXPECT(s, SE, "1.2.3.1.1,1.2.3.5.1,1.2.3.5.2",
           {LEVEL_SERIES, 0, {"StudyDate", "20200115", "Modality", "CT"}});
    EXPECT(s, ATTR_STUDY_DATE, "20200115,20200115,20200115",
           {LEVEL_SERIES, 0, {"StudyDate", "20200115", "Modality", "CT"}});
}

static void test_find_image_level(void **state)
{
    fixture_t *fx = *state;
    load_find_data(fx->s);
    store_t *s = fx->s;
    const attr_id_t SO = ATTR_SOP_INSTANCE_UID;
    EXPECT(
        s, ATTR_INSTANCE_NUMBER, "1,2,3",
        {LEVEL_IMAGE,
         0,
         {"StudyInstanceUID", "1.2.3.1", "SeriesInstanceUID", "1.2.3.1.1", "InstanceNumber", ""}});
    EXPECT(s, SO, "1.2.3.1.1.2,1.2.3.1.2.2",
           {LEVEL_IMAGE, 0, {"StudyInstanceUID", "1.2.3.1", "InstanceNumber", "2"}});
    EXPECT(s, SO, "1.2.3.1.1.2,1.2.3.4.1.1",
           {LEVEL_IMAGE, 0, {"SOPInstanceUID", "1.2.3.4.1.1\\1.2.3.1.1.2\\1.2.3.9.9.9"}});
    EXPECT(s, SO, "1.2.3.1.1.2",
           {LEVEL_IMAGE, 0, {"SOPInstanceUID", "1.2.3.4.1.1\\1.2.3.1.1.2", "Modality", "CT"}});
    EXPECT(s, SO, "", {LEVEL_IMAGE, 0, {"SOPInstanceUID", "1.2.3.1.1.2", "PatientID", "PAT2"}});
    EXPECT(s, ATTR_TRANSFER_SYNTAX_UID, EXPLICIT_LE,
           {LEVEL_IMAGE, 0, {"SOPInstanceUID", "1.2.3.6.1.1", "TransferSyntaxUID", ""}});
    EXPECT(s, ATTR_SOP_CLASS_UID, CT_IMAGE "," CT_IMAGE,
           {LEVEL_IMAGE, 0, {"PatientID", "PAT4", "SOPClassUID", CT_IMAGE}});
    EXPECT(s, SO, "1.2.3.3.1.1,1.2.3.3.1.2", {LEVEL_IMAGE, 0, {"PatientName", "Smy*"}});
}

static void test_find_index_matches_scan(void **state)
{
    fixture_t *fx = *state;
    load_find_data(fx->s);
    /* More studies so index ranges have neighbours on both sides. */
    for (int i = 0; i < 40; i++) {
        char study[32], series[48], sop[64], pid[16], name[32], date[16], acc[16];
        snprintf(study, sizeof study, "1.2.5.%d", i);
        snprintf(series, sizeof series, "1.2.5.%d.1", i);
        snprintf(sop, sizeof sop, "1.2.5.%d.1.1", i);
        snprintf(pid, sizeof pid, "Q%02d", i % 13);
        snprintf(name, sizeof name, "%s^N%d", i % 3 ? "Smith" : "smyth", i);
        snprintf(date, sizeof date, "2020%02d%02d", 1 + i % 12, 1 + i % 28);
        snprintf(acc, sizeof acc, "A%d", 100 + i % 7);
        inst_t in = {(uint32_t)(i % 5),   pid,    name, study, date, acc,
                     i % 2 ? "CT" : "MR", series, sop,  "1"};
        put_ok(fx->s, &in, 32, (uint32_t)(1000 + i));
    }
    static const query_t queries[] = {
        {LEVEL_STUDY, 0, {"PatientID", "Q03"}},
        {LEVEL_STUDY, 0, {"PatientID", "Q1*"}},
        {LEVEL_STUDY, 0, {"PatientID", "Q0?"}},
        {LEVEL_STUDY, 0, {"AccessionNumber", "A100"}},
        {LEVEL_STUDY, 0, {"AccessionNumber", "A10*"}},
        {LEVEL_STUDY, 0, {"StudyDate", "20200303"}},
        {LEVEL_STUDY, 0, {"StudyDate", "20200301-20200630"}},
        {LEVEL_STUDY, 0, {"StudyDate", "-20200415"}},
        {LEVEL_STUDY, 0, {"StudyDate", "20201001-"}},
        {LEVEL_STUDY, 0, {"PatientName", "Smith^N1*"}},
        {LEVEL_STUDY, MATCH_PN_CASE_INSENSITIVE, {"PatientName", "SMYTH*"}},
        {LEVEL_STUDY, 0, {"PatientName", "smyth^N3"}},
        {LEVEL_STUDY, MATCH_PN_CASE_INSENSITIVE, {"PatientName", "SMITH^N4"}},
        {LEVEL_STUDY, 0, {"PatientName", "Sm*", "StudyDate", "20200101-20200531"}},
        {LEVEL_STUDY, 0, {"PatientID", "Q03", "AccessionNumber", "A101"}},
        {LEVEL_STUDY, 0, {"StudyInstanceUID", "1.2.5.3\\1.2.5.30\\1.2.3.5"}},
        {LEVEL_SERIES, 0, {"PatientID", "Q05", "Modality", "CT"}},
        {LEVEL_SERIES, 0, {"SeriesInstanceUID", "1.2.5.7.1"}},
        {LEVEL_IMAGE, 0, {"StudyDate", "20200202-20200909", "Modality", "MR"}},
        {LEVEL_IMAGE, 0, {"SOPInstanceUID", "1.2.5.8.1.1\\1.2.5.9.1.1", "PatientID", "Q08"}},
        {LEVEL_PATIENT, 0, {"PatientID", "Q07"}},
        {LEVEL_PATIENT, 0, {"PatientID", "Q1*", "NumberOfPatientRelatedStudies", ""}},
        {LEVEL_PATIENT, MATCH_PN_CASE_INSENSITIVE, {"PatientName", "smyth*"}},
    };
    static results_t a, b;
    for (size_t i = 0; i < sizeof queries / sizeof queries[0]; i++) {
        char ia[8192], ib[8192];
        assert_int_equal(run(fx->s, &queries[i], 0, false, &a), 0);
        assert_int_equal(run(fx->s, &queries[i], 0, true, &b), 0);
        ids(&a, ia, sizeof ia);
        ids(&b, ib, sizeof ib);
        if (strcmp(ia, ib) != 0)
            fail_msg("query %zu: index gave [%s], scan gave [%s]", i, ia, ib);
        if (a.n == 0)
            fail_msg("query %zu matched nothing: not a useful comparison", i);
    }
    results_clear(&a);
    results_clear(&b);
}

static void test_find_limit_and_errors(void **state)
{
    fixture_t *fx = *state;
    load_find_data(fx->s);
    static results_t rs;
    query_t all = {LEVEL_STUDY, 0, {"PatientID", ""}};
    assert_int_equal(run(fx->s, &all, 3, false, &rs), SP_ELIMIT);
    assert_int_equal(rs.n, 3);
    assert_int_equal(run(fx->s, &all, 8, false, &rs), 0); /* exactly the number there is */
    assert_int_equal(rs.n, 8);
    query_t images = {LEVEL_IMAGE, 0, {"PatientID", "PAT1"}};
    assert_int_equal(run(fx->s, &images, 5, false, &rs), SP_ELIMIT);
    assert_int_equal(rs.n, 5);
    query_t patients = {LEVEL_PATIENT, 0, {"PatientID", ""}};
    assert_int_equal(run(fx->s, &patients, 2, false, &rs), SP_ELIMIT);
    assert_int_equal(rs.n, 2);

    /* The callback stopping is not an error. */
    rs.stop_after = 2;
    assert_int_equal(run(fx->s, &all, 0, false, &rs), 0);
    assert_int_equal(rs.n, 2);
    rs.stop_after = 0;

    static const query_t bad[] = {
        {LEVEL_STUDY, 0, {"StudyDate", "20201301"}},
        {LEVEL_STUDY, 0, {"StudyDate", "20200101-20191231"}},
        {LEVEL_STUDY, 0, {"StudyDate", "2020-01-01"}},
        {LEVEL_STUDY, 0, {"StudyInstanceUID", "1.02.3"}},
        {LEVEL_STUDY, 0, {"StudyInstanceUID", "1.2.3*"}},
        {LEVEL_STUDY, 0, {"StudyTime", "2500"}},
        {LEVEL_IMAGE, 0, {"SOPInstanceUID", "1.2\\x"}},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        if (run(fx->s, &bad[i], 0, false, &rs) != SP_EINVAL)
            fail_msg("bad query %zu accepted", i);
        assert_int_equal(rs.n, 0);
    }
    store_query_t q = {.level = (level_t)7};
    assert_int_equal(store_find(fx->s, &q, collect, &rs), SP_EINVAL);
    results_clear(&rs);
}

/* ---- partitions ------------------------------------------------------ */

/* Every partition's kept summary (store_partition_summaries, updated by
 * writes) equals what reading the partition gives (store_partition_digest),
 * and partitions not reported are empty. */
typedef struct {
    store_t *s;
    int n;
} sums_check_t;

static int check_summary(void *ctx, const store_partition_summary_t *p)
{
    sums_check_t *c = ctx;
    uint8_t d[SP_DIGEST_LEN];
    uint64_t count = 0, bytes = 0;
    assert_int_equal(store_partition_digest(c->s, p->partition, d, &count, &bytes), 0);
    assert_memory_equal(p->digest, d, SP_DIGEST_LEN);
    assert_int_equal(p->count, count);
    assert_int_equal(p->bytes, bytes);
    assert_true(count > 0);
    c->n++;
    return 0;
}

static int summaries_match_reads(store_t *s)
{
    sums_check_t c = {.s = s};
    assert_int_equal(store_partition_summaries(s, check_summary, &c), 0);
    return c.n;
}

static void test_partition_digest(void **state)
{
    fixture_t *fx = *state;
    char dir2[64] = "/tmp/test_store.XXXXXX";
    assert_non_null(mkdtemp(dir2));
    store_t *other = open_at(dir2);

    uint8_t d1[SP_DIGEST_LEN], d2[SP_DIGEST_LEN], empty[SP_DIGEST_LEN];
    uint64_t c1 = 99, c2, b1 = 99, b2;
    memset(empty, 0, sizeof empty); /* the digest of no instances */
    assert_int_equal(store_partition_digest(fx->s, 42, d1, &c1, &b1), 0);
    assert_int_equal(c1, 0);
    assert_int_equal(b1, 0);
    assert_memory_equal(d1, empty, SP_DIGEST_LEN);
    assert_int_equal(store_partition_digest(fx->s, 70000, d1, &c1, &b1), SP_EINVAL);

    inst_t in[4] = {
        simple(42, "1.2.3", "1.2.3.1", "1.2.3.1.1"),
        simple(42, "1.2.3", "1.2.3.1", "1.2.3.1.2"),
        simple(42, "1.2.4", "1.2.4.1", "1.2.4.1.1"),
        simple(43, "1.2.5", "1.2.5.1", "1.2.5.1.1"),
    };
    for (int i = 0; i < 4; i++)
        put_ok(fx->s, &in[i], 100 + (size_t)i, (uint32_t)i);
    for (int i = 3; i >= 0; i--) /* other order, same content */
        put_ok(other, &in[i], 100 + (size_t)i, (uint32_t)i);

    assert_int_equal(store_partition_digest(fx->s, 42, d1, &c1, &b1), 0);
    assert_int_equal(store_partition_digest(other, 42, d2, &c2, &b2), 0);
    assert_memory_equal(d1, d2, SP_DIGEST_LEN);
    assert_int_equal(c1, 3);
    assert_int_equal(c2, 3);
    assert_int_equal(b1, 100 + 101 + 102);
    assert_int_equal(b2, b1);
    assert_memory_not_equal(d1, empty, SP_DIGEST_LEN);

    /* One more instance in one store: the digests differ; other partitions keep theirs. */
    uint8_t p43[SP_DIGEST_LEN], p43b[SP_DIGEST_LEN];
    assert_int_equal(store_partition_digest(fx->s, 43, p43, NULL, NULL), 0);
    inst_t extra = simple(42, "1.2.4", "1.2.4.1", "1.2.4.1.2");
    put_ok(fx->s, &extra, 10, 77);
    assert_int_equal(store_partition_digest(fx->s, 42, d1, &c1, &b1), 0);
    assert_int_equal(c1, 4);
    assert_memory_not_equal(d1, d2, SP_DIGEST_LEN);
    assert_int_equal(store_partition_digest(fx->s, 43, p43b, NULL, NULL), 0);
    assert_memory_equal(p43, p43b, SP_DIGEST_LEN);

    /* Same instance UIDs with different content: digests differ. */
    put_ok(other, &extra, 10, 78);
    assert_int_equal(store_partition_digest(other, 42, d2, &c2, &b2), 0);
    assert_int_equal(c2, 4);
    assert_memory_not_equal(d1, d2, SP_DIGEST_LEN);
    assert_int_equal(summaries_match_reads(fx->s), 2);
    assert_int_equal(summaries_match_reads(other), 2);
    reopen(fx); /* summed again from the database */
    assert_int_equal(summaries_match_reads(fx->s), 2);
    assert_int_equal(store_partition_digest(fx->s, 42, d2, NULL, NULL), 0);
    assert_memory_equal(d1, d2, SP_DIGEST_LEN);

    store_close(&other);
    rm_tree(dir2);
}

typedef struct {
    char seen[64][65];
    int n;
    int stop_at;
} pages_t;

static int page_entry(void *ctx, const store_entry_t *e)
{
    pages_t *p = ctx;
    assert_int_equal(e->partition, 42);
    assert_true(p->n < 64);
    for (int i = 0; i < p->n; i++)
        if (strcmp(p->seen[i], e->sop_uid) == 0)
            fail_msg("%s visited twice", e->sop_uid);
    strcpy(p->seen[p->n++], e->sop_uid);
    return p->stop_at && p->n == p->stop_at;
}

static void test_partition_list_paging(void **state)
{
    fixture_t *fx = *state;
    for (int i = 0; i < 23; i++) {
        char study[32], series[48], sop[64];
        snprintf(study, sizeof study, "1.2.%d", 3 + i % 3);
        snprintf(series, sizeof series, "%s.%d", study, 1 + i % 2);
        snprintf(sop, sizeof sop, "%s.%d", series, i);
        inst_t in = simple(42, study, series, sop);
        put_ok(fx->s, &in, 20, (uint32_t)i);
    }
    inst_t elsewhere = simple(41, "1.2.9", "1.2.9.1", "1.2.9.1.1");
    put_ok(fx->s, &elsewhere, 20, 99);
    inst_t after = simple(43, "1.2.8", "1.2.8.1", "1.2.8.1.1");
    put_ok(fx->s, &after, 20, 98);

    pages_t p = {0};
    char *cursor = NULL;
    int pages = 0;
    do {
        char *next = NULL;
        int before = p.n;
        assert_int_equal(store_partition_list(fx->s, 42, cursor, 5, page_entry, &p, &next), 0);
        assert_true(p.n - before <= 5);
        free(cursor);
        cursor = next;
        pages++;
        assert_true(pages < 10);
    } while (cursor);
    assert_int_equal(p.n, 23);
    assert_int_equal(pages, 5);

    /* All at once, and a limit equal to the count: no cursor back. */
    pages_t q = {0};
    char *next = (char *)"x";
    assert_int_equal(store_partition_list(fx->s, 42, NULL, 0, page_entry, &q, &next), 0);
    assert_int_equal(q.n, 23);
    assert_null(next);
    memset(&q, 0, sizeof q);
    assert_int_equal(store_partition_list(fx->s, 42, "", 23, page_entry, &q, &next), 0);
    assert_int_equal(q.n, 23);
    assert_null(next);

    /* Stopping in the callback resumes after the entry it stopped on. */
    memset(&q, 0, sizeof q);
    q.stop_at = 4;
    assert_int_equal(store_partition_list(fx->s, 42, NULL, 0, page_entry, &q, &next), 0);
    assert_int_equal(q.n, 4);
    assert_non_null(next);
    q.stop_at = 0;
    assert_int_equal(store_partition_list(fx->s, 42, next, 0, page_entry, &q, &cursor), 0);
    assert_int_equal(q.n, 23);
    assert_null(cursor);
    free(next);

    /* A cursor naming an instance that is not there still resumes in order. */
    memset(&q, 0, sizeof q);
    assert_int_equal(
        store_partition_list(fx->s, 42, "1.2.4/1.2.4.1/1.2.4.1.0", 0, page_entry, &q, &next), 0);
    assert_true(q.n > 0 && q.n < 23);
    assert_null(next);

    assert_int_equal(store_partition_list(fx->s, 42, "1.2.3/1.2.3.1", 5, page_entry, &q, &next),
                     SP_EINVAL);
    assert_int_equal(store_partition_list(fx->s, 42, "1.2.3/x/1.2", 5, page_entry, &q, &next),
                     SP_EINVAL);
    assert_int_equal(store_partition_list(fx->s, 65536, NULL, 5, page_entry, &q, &next), SP_EINVAL);
}

/* Pages through a study or series listing with store_list() at `limit`
 * per page; returns the number of pages. */
static int list_all_pages(store_t *s, const char *study, const char *series, size_t limit,
                          pages_t *p)
{
    char *cursor = NULL;
    int pages = 0;
    do {
        char *next = NULL;
        int before = p->n;
        assert_int_equal(store_list(s, study, series, cursor, limit, page_entry, p, &next), 0);
        assert_true((size_t)(p->n - before) <= limit);
        free(cursor);
        cursor = next;
        pages++;
        assert_true(pages < 40);
    } while (cursor);
    return pages;
}

/* store_list pages like store_partition_list: limit per page, a cursor that
 * resumes after the last entry, confined to the study (or series) even when
 * other studies share the partition and a study UID is a prefix of another. */
static void test_list_paging(void **state)
{
    fixture_t *fx = *state;
    for (int i = 0; i < 30; i++) {
        char series[48], sop[64];
        snprintf(series, sizeof series, "1.2.5.%d", 1 + i % 2);
        snprintf(sop, sizeof sop, "%s.%d", series, i);
        inst_t in = simple(42, "1.2.5", series, sop);
        put_ok(fx->s, &in, 20, (uint32_t)i);
    }
    inst_t prefix = simple(42, "1.2.50", "1.2.50.1", "1.2.50.1.1");
    put_ok(fx->s, &prefix, 20, 90);
    inst_t other = simple(42, "1.2.4", "1.2.4.1", "1.2.4.1.1");
    put_ok(fx->s, &other, 20, 91);

    /* The whole study, 7 per page: each instance once, in key order. */
    pages_t p = {0};
    assert_int_equal(list_all_pages(fx->s, "1.2.5", NULL, 7, &p), 5);
    assert_int_equal(p.n, 30);
    pages_t all = {0};
    assert_int_equal(store_list(fx->s, "1.2.5", NULL, NULL, 0, page_entry, &all, NULL), 0);
    assert_int_equal(all.n, 30);
    for (int i = 0; i < 30; i++)
        assert_string_equal(p.seen[i], all.seen[i]);
    /* A limit equal to the count, and no limit: one page, no cursor back. */
    memset(&p, 0, sizeof p);
    assert_int_equal(list_all_pages(fx->s, "1.2.5", NULL, 30, &p), 1);
    assert_int_equal(p.n, 30);

    /* One series, 4 per page: only its 15 instances. */
    memset(&p, 0, sizeof p);
    assert_int_equal(list_all_pages(fx->s, "1.2.5", "1.2.5.2", 4, &p), 4);
    assert_int_equal(p.n, 15);
    for (int i = 0; i < p.n; i++)
        assert_memory_equal(p.seen[i], "1.2.5.2.", 8);

    /* Stopping in the callback resumes after the entry it stopped on. */
    memset(&p, 0, sizeof p);
    p.stop_at = 3;
    char *next = NULL, *last = NULL;
    assert_int_equal(store_list(fx->s, "1.2.5", NULL, NULL, 0, page_entry, &p, &next), 0);
    assert_int_equal(p.n, 3);
    assert_non_null(next);
    p.stop_at = 0;
    assert_int_equal(store_list(fx->s, "1.2.5", NULL, next, 0, page_entry, &p, &last), 0);
    assert_int_equal(p.n, 30);
    assert_null(last);

    /* An instance stored after the cursor, between two pages, shows up; the
     * cursor's own instance need not exist. */
    memset(&p, 0, sizeof p);
    free(next);
    assert_int_equal(store_list(fx->s, "1.2.5", NULL, NULL, 10, page_entry, &p, &next), 0);
    inst_t late = simple(42, "1.2.5", "1.2.5.2", "1.2.5.2.99");
    put_ok(fx->s, &late, 20, 92);
    assert_int_equal(store_list(fx->s, "1.2.5", NULL, next, 0, page_entry, &p, &last), 0);
    assert_int_equal(p.n, 31);
    free(next);
    memset(&p, 0, sizeof p);
    assert_int_equal(
        store_list(fx->s, "1.2.5", NULL, "1.2.5/1.2.5.1/1.2.5.1.9999", 0, page_entry, &p, &next),
        0);
    assert_int_equal(p.n, 16); /* series 2 (now 16): everything after series 1's keys */
    assert_null(next);

    /* Cursors outside the listing, or malformed, are refused. */
    assert_int_equal(
        store_list(fx->s, "1.2.5", NULL, "1.2.4/1.2.4.1/1.2.4.1.1", 5, page_entry, &p, &next),
        SP_EINVAL);
    assert_int_equal(
        store_list(fx->s, "1.2.5", NULL, "1.2.50/1.2.50.1/1.2.50.1.1", 5, page_entry, &p, &next),
        SP_EINVAL);
    assert_int_equal(
        store_list(fx->s, "1.2.5", "1.2.5.2", "1.2.5/1.2.5.1/1.2.5.1.1", 5, page_entry, &p, &next),
        SP_EINVAL);
    assert_int_equal(store_list(fx->s, "1.2.5", NULL, "1.2.5/1.2.5.1", 5, page_entry, &p, &next),
                     SP_EINVAL);
    assert_null(next);
    /* A study this store does not hold: nothing, no cursor. */
    memset(&p, 0, sizeof p);
    next = (char *)"x";
    assert_int_equal(store_list(fx->s, "1.2.77", NULL, NULL, 5, page_entry, &p, &next), 0);
    assert_int_equal(p.n, 0);
    assert_null(next);
}

/* ---- persistence ------------------------------------------------------ */

static void test_persistence_across_reopen(void **state)
{
    fixture_t *fx = *state;
    load_find_data(fx->s);
    inst_t big = simple(11, "1.2.7", "1.2.7.1", "1.2.7.1.1");
    put_ok(fx->s, &big, 300000, 4);
    store_stats_t before = stats(fx->s);
    assert_int_equal(before.instances, 15);
    assert_int_equal(before.studies, 9);

    reopen(fx);
    store_stats_t after = stats(fx->s);
    assert_int_equal(after.instances, before.instances);
    assert_int_equal(after.bytes, before.bytes);
    assert_int_equal(after.studies, before.studies);
    assert_int_equal(after.conflicts, 0);
    assert_int_equal(after.corrupt_reads, 0);
    assert_true(after.db_size_bytes > 300000); /* recovery flushed the WAL to files */
    check_get(fx->s, &big, 300000, 4);
    EXPECT(fx->s, ATTR_STUDY_INSTANCE_UID, "1.2.3.1,1.2.3.2,1.2.7",
           {LEVEL_STUDY, 0, {"PatientID", "PAT1"}});

    /* Still idempotent after reopening. */
    uint8_t *b = make_bytes(300000, 4);
    store_outcome_t out;
    assert_int_equal(put_data(fx->s, &big, b, 300000, &out), 0);
    assert_int_equal(out, STORE_DUPLICATE);
    free(b);
    assert_int_equal(stats(fx->s).instances, 15);
}

/* ---- concurrency ------------------------------------------------------ */

#define THREADS 4
#define OWN_PUTS 40
#define SHARED_PUTS 25

typedef struct {
    store_t *s;
    int id;
    int outcomes[3];
    int race_outcome;
    int errors;
} worker_t;

static void count_put(worker_t *w, const inst_t *in, size_t len, uint32_t seed, int *slot)
{
    uint8_t *b = make_bytes(len, seed);
    store_outcome_t out;
    if (put_data(w->s, in, b, len, &out) != 0)
        w->errors++;
    else if (slot)
        *slot = (int)out;
    else
        w->outcomes[out]++;
    free(b);
}

static void *worker(void *arg)
{
    worker_t *w = arg;
    char study[32], series[48], sop[64];
    for (int i = 0; i < 3 * SHARED_PUTS || i < OWN_PUTS; i++) {
        if (i % 3 == 2 && i / 3 < SHARED_PUTS) {
            /* Shared SOPs, identical bytes from every thread, in another order. */
            int j = (i / 3 + w->id * 7) % SHARED_PUTS;
            snprintf(sop, sizeof sop, "1.2.9.1.100.%d", j);
            inst_t in = simple(9, "1.2.9.1", "1.2.9.1.100", sop);
            count_put(w, &in, 3000, (uint32_t)(5000 + j), NULL);
        }
        if (i < OWN_PUTS) {
            /* Own SOPs: half in a study of this thread, half in a shared study. */
            if (i % 2)
                snprintf(study, sizeof study, "1.2.9.1");
            else
                snprintf(study, sizeof study, "1.2.8.%d", w->id);
            snprintf(series, sizeof series, "%s.%d", study, w->id + 1);
            snprintf(sop, sizeof sop, "%s.%d", series, i);
            inst_t in = simple(9, study, series, sop);
            count_put(w, &in, 1000 + (size_t)i, (uint32_t)(w->id * 1000 + i), NULL);
        }
    }
    /* Same SOP, different bytes from each thread: one wins, the rest conflict. */
    inst_t race = simple(9, "1.2.9.2", "1.2.9.2.1", "1.2.9.2.1.1");
    count_put(w, &race, 2000, (uint32_t)(9000 + w->id), &w->race_outcome);
    return NULL;
}

static void test_concurrent_puts(void **state)
{
    fixture_t *fx = *state;
    pthread_t t[THREADS];
    worker_t w[THREADS];
    memset(w, 0, sizeof w);
    for (int i = 0; i < THREADS; i++) {
        w[i].s = fx->s;
        w[i].id = i;
        w[i].race_outcome = -1;
        assert_int_equal(pthread_create(&t[i], NULL, worker, &w[i]), 0);
    }
    int stored = 0, dup = 0, conflict = 0, race_stored = 0, race_conflict = 0;
    for (int i = 0; i < THREADS; i++) {
        pthread_join(t[i], NULL);
        assert_int_equal(w[i].errors, 0);
        stored += w[i].outcomes[STORE_STORED];
        dup += w[i].outcomes[STORE_DUPLICATE];
        conflict += w[i].outcomes[STORE_CONFLICT];
        race_stored += w[i].race_outcome == STORE_STORED;
        race_conflict += w[i].race_outcome == STORE_CONFLICT;
    }
    assert_int_equal(stored, THREADS * OWN_PUTS + SHARED_PUTS);
    assert_int_equal(dup, (THREADS - 1) * SHARED_PUTS);
    assert_int_equal(conflict, 0);
    assert_int_equal(race_stored, 1);
    assert_int_equal(race_conflict, THREADS - 1);

    store_stats_t st = stats(fx->s);
    assert_int_equal(st.instances, THREADS * OWN_PUTS + SHARED_PUTS + 1);
    assert_int_equal(st.studies, THREADS + 2);
    assert_int_equal(st.conflicts, THREADS - 1);
    int n = 0;
    assert_int_equal(store_list(fx->s, "1.2.9.1", NULL, NULL, 0, count_entry, &n, NULL), 0);
    assert_int_equal(n, THREADS * OWN_PUTS / 2 + SHARED_PUTS);

    /* The stored race copy is one of the candidates, intact. */
    store_object_t o;
    assert_int_equal(store_get(fx->s, "1.2.9.2.1.1", &o), 0);
    int matches = 0;
    for (int i = 0; i < THREADS; i++) {
        uint8_t *b = make_bytes(2000, (uint32_t)(9000 + i));
        matches += o.len == 2000 && memcmp(o.data, b, 2000) == 0;
        free(b);
    }
    assert_int_equal(matches, 1);
    store_object_free(&o);

    /* Counts agree with a fresh count at open. */
    reopen(fx);
    store_stats_t again = stats(fx->s);
    assert_int_equal(again.instances, st.instances);
    assert_int_equal(again.bytes, st.bytes);
    assert_int_equal(again.studies, st.studies);
    assert_int_equal(again.conflicts, st.conflicts);
    static results_t rs;
    query_t q = {
        LEVEL_SERIES, 0, {"StudyInstanceUID", "1.2.9.1", "NumberOfSeriesRelatedInstances", ""}};
    assert_int_equal(run(fx->s, &q, 0, false, &rs), 0);
    assert_int_equal(rs.n, THREADS + 1);
    results_clear(&rs);
}

/* ---- partition deletion ---------------------------------------------- */

/* Checks every instance of find_data: those of partition `gone` are not
 * found, all others come back bit-exact (same sizes and seeds as
 * load_find_data). */
static void check_find_data(store_t *s, uint32_t gone)
{
    uint32_t seed = 100;
    for (size_t i = 0; i < sizeof find_data / sizeof find_data[0]; i++) {
        for (int j = 0; j < 2 && find_data[i].series[j]; j++) {
            for (int k = 1; k <= find_data[i].count[j]; k++, seed++) {
                char sop[96];
                snprintf(sop, sizeof sop, "%s.%d", find_data[i].series[j], k);
                if (find_data[i].part == gone) {
                    store_object_t o;
                    assert_int_equal(store_get(s, sop, &o), SP_ENOTFOUND);
                    continue;
                }
                uint8_t *want = make_bytes(64 + (size_t)k, seed);
                store_object_t o;
                assert_int_equal(store_get(s, sop, &o), 0);
                assert_int_equal(o.partition, find_data[i].part);
                assert_int_equal(o.len, 64 + (size_t)k);
                assert_memory_equal(o.data, want, o.len);
                store_object_free(&o);
                free(want);
            }
        }
    }
}

/* Re-puts the find_data instances of one partition; each must be new. */
static void reput_find_data(store_t *s, uint32_t part)
{
    uint32_t seed = 100;
    for (size_t i = 0; i < sizeof find_data / sizeof find_data[0]; i++) {
        for (int j = 0; j < 2 && find_data[i].series[j]; j++) {
            for (int k = 1; k <= find_data[i].count[j]; k++, seed++) {
                if (find_data[i].part != part)
                    continue;
                char sop[96], inum[16];
                snprintf(sop, sizeof sop, "%s.%d", find_data[i].series[j], k);
                snprintf(inum, sizeof inum, "%d", k);
                inst_t in = {find_data[i].part,
                             find_data[i].pid,
                             find_data[i].pname,
                             find_data[i].study,
                             find_data[i].date,
                             find_data[i].acc,
                             find_data[i].modality[j],
                             find_data[i].series[j],
                             sop,
                             inum};
                put_ok(s, &in, 64 + (size_t)k, seed);
            }
        }
    }
}

/* What a closed store's database still holds of one partition: keys of its
 * objects and index records, secondary entries whose value names it (every
 * secondary value starts with the partition), and all kept conflicts. */
typedef struct {
    size_t objects, index, secondary, conflicts;
} raw_refs_t;

static size_t raw_count(raw_db_t *r, const char *cf, uint32_t part, int mode)
{
    rocksdb_readoptions_t *ro = rocksdb_readoptions_create();
    rocksdb_iterator_t *it = rocksdb_create_iterator_cf(r->db, ro, raw_cf(r, cf));
    char p[2] = {(char)(part >> 8), (char)(part & 0xff)};
    size_t n = 0;
    for (rocksdb_iter_seek_to_first(it); rocksdb_iter_valid(it); rocksdb_iter_next(it)) {
        size_t kn, vn;
        const char *k = rocksdb_iter_key(it, &kn), *v = rocksdb_iter_value(it, &vn);
        if (mode == 0) /* objects: P| */
            n += kn >= 2 && memcmp(k, p, 2) == 0;
        else if (mode == 1) /* index: type|P| */
            n += kn >= 3 && memcmp(k + 1, p, 2) == 0;
        else if (mode == 2) /* secondary: value P... */
            n += vn >= 2 && memcmp(v, p, 2) == 0;
        else
            n++;
    }
    char *err = NULL;
    rocksdb_iter_get_error(it, &err);
    assert_null(err);
    rocksdb_iter_destroy(it);
    rocksdb_readoptions_destroy(ro);
    return n;
}

static raw_refs_t raw_refs(fixture_t *fx, uint32_t part)
{
    store_close(&fx->s);
    raw_db_t r;
    raw_open(&r, fx->dir);
    raw_refs_t x = {raw_count(&r, "objects", part, 0), raw_count(&r, "index", part, 1),
                    raw_count(&r, "secondary", part, 2), raw_count(&r, "conflicts", part, 3)};
    raw_close(&r);
    fx->s = open_at(fx->dir);
    return x;
}

static void expect_partition_empty(store_t *s, uint32_t part)
{
    uint8_t d[SP_DIGEST_LEN], empty[SP_DIGEST_LEN];
    uint64_t c = 99, b = 99;
    memset(empty, 0, sizeof empty); /* the digest of no instances */
    assert_int_equal(store_partition_digest(s, part, d, &c, &b), 0);
    assert_int_equal(c, 0);
    assert_int_equal(b, 0);
    assert_memory_equal(d, empty, SP_DIGEST_LEN);
    int n = 0;
    char *next = NULL;
    assert_int_equal(store_partition_list(s, part, NULL, 0, count_entry, &n, &next), 0);
    assert_int_equal(n, 0);
    assert_null(next);
}

/* Finds after partition 7 (studies 1.2.3.1 of PAT1 and 1.2.3.3 of PAT2) is
 * gone, at every level, through the indexes and by scanning (EXPECT runs
 * both and compares). */
static void check_finds_without_7(store_t *s)
{
    const attr_id_t SU = ATTR_STUDY_INSTANCE_UID;
    EXPECT(s, SU, "1.2.3.2,1.2.3.4,1.2.3.5,1.2.3.6,1.2.3.7,1.2.3.8",
           {LEVEL_STUDY, 0, {"PatientName", ""}});
    EXPECT(s, SU, "", {LEVEL_STUDY, 0, {"StudyInstanceUID", "1.2.3.1\\1.2.3.3"}});
    EXPECT(s, SU, "1.2.3.2", {LEVEL_STUDY, 0, {"StudyInstanceUID", "1.2.3.1\\1.2.3.2"}});
    /* Secondary indexes: entries of deleted studies are gone, others work. */
    EXPECT(s, SU, "", {LEVEL_STUDY, 0, {"PatientID", "PAT2"}});
    EXPECT(s, SU, "1.2.3.2", {LEVEL_STUDY, 0, {"PatientID", "PAT1"}});
    EXPECT(s, SU, "", {LEVEL_STUDY, 0, {"AccessionNumber", "A100"}});
    EXPECT(s, SU, "", {LEVEL_STUDY, 0, {"AccessionNumber", "A300"}});
    EXPECT(s, SU, "1.2.3.2", {LEVEL_STUDY, 0, {"AccessionNumber", "A200"}});
    EXPECT(s, SU, "1.2.3.5", {LEVEL_STUDY, 0, {"StudyDate", "20200115"}});
    EXPECT(s, SU, "1.2.3.5", {LEVEL_STUDY, 0, {"StudyDate", "20200101-20200401"}});
    EXPECT(s, SU, "", {LEVEL_STUDY, 0, {"PatientName", "Smythe^Anna"}});
    EXPECT(s, SU, "1.2.3.2", {LEVEL_STUDY, 0, {"PatientName", "Sm?th*"}});
    EXPECT(s, ATTR_PATIENT_ID, "PAT1,PAT3,PAT4,PAT5,PAT6,PAT7\\PAT8",
           {LEVEL_PATIENT, 0, {"PatientID", ""}});
    EXPECT(s, ATTR_PATIENT_ID, "", {LEVEL_PATIENT, 0, {"PatientID", "PAT2"}});
    EXPECT(s, ATTR_SERIES_INSTANCE_UID, "", {LEVEL_SERIES, 0, {"StudyInstanceUID", "1.2.3.1"}});
    EXPECT(s, ATTR_SERIES_INSTANCE_UID, "", {LEVEL_SERIES, 0, {"Modality", "US"}});
    EXPECT(s, ATTR_SOP_INSTANCE_UID, "",
           {LEVEL_IMAGE, 0, {"SOPInstanceUID", "1.2.3.1.1.1\\1.2.3.3.1.2"}});
    EXPECT(s, ATTR_SOP_INSTANCE_UID, "1.2.3.4.1.1",
           {LEVEL_IMAGE, 0, {"SOPInstanceUID", "1.2.3.1.1.1\\1.2.3.4.1.1"}});
    int n = 0;
    assert_int_equal(store_list(s, "1.2.3.1", NULL, NULL, 0, count_entry, &n, NULL), 0);
    assert_int_equal(n, 0);
}

/* Blob GC (which rewrites valid blobs) is off while nothing was deleted,
 * on right after a delete and held on while compaction has not yet counted
 * the delete's garbage; the objects left are untouched. */
static void test_blob_gc_only_with_garbage(void **state)
{
    fixture_t *fx = *state;
    const size_t len = 64u << 10; /* over blob_min_bytes: a blob file value */
    assert_false(stats(fx->s).blob_gc);
    char sops[4][32];
    for (int i = 0; i < 4; i++) {
        snprintf(sops[i], sizeof sops[i], "1.2.70.1.%d", i + 1);
        inst_t in = simple(7, "1.2.70", "1.2.70.1", sops[i]);
        put_ok(fx->s, &in, len, 700 + (uint32_t)i);
    }
    inst_t keep = simple(8, "1.2.80", "1.2.80.1", "1.2.80.1.1");
    put_ok(fx->s, &keep, len, 800);
    store_blob_gc_tune(fx->s, false);
    assert_false(stats(fx->s).blob_gc);
    reopen(fx);
    assert_false(stats(fx->s).blob_gc);

    uint64_t deleted = 0;
    assert_int_equal(store_delete_partition(fx->s, 7, &deleted), 0);
    assert_int_equal(deleted, 4);
    assert_true(stats(fx->s).blob_gc);
    store_blob_gc_tune(fx->s, false);
    assert_true(stats(fx->s).blob_gc);
    check_get(fx->s, &keep, len, 800);
}

static void test_delete_partition(void **state)
{
    fixture_t *fx = *state;
    load_find_data(fx->s);
    /* Partition 7 also gets a blob-sized object and a kept conflict;
     * partition 9 a conflict that must stay. */
    inst_t big = simple(7, "1.2.3.1", "1.2.3.1.1", "1.2.3.1.1.9");
    put_ok(fx->s, &big, 200000, 4242);
    inst_t c7 = simple(7, "1.2.3.1", "1.2.3.1.1", "1.2.3.1.1.1");
    inst_t c9 = simple(9, "1.2.3.5", "1.2.3.5.1", "1.2.3.5.1.1");
    c9.pid = "PAT4";
    uint8_t *odd = make_bytes(65, 999);
    store_outcome_t out;
    assert_int_equal(put_data(fx->s, &c7, odd, 65, &out), 0);
    assert_int_equal(out, STORE_CONFLICT);
    assert_int_equal(put_data(fx->s, &c9, odd, 65, &out), 0);
    assert_int_equal(out, STORE_CONFLICT);

    const uint32_t others[] = {300, 4095, 9, 10};
    uint8_t keep[4][SP_DIGEST_LEN], d7[SP_DIGEST_LEN], d[SP_DIGEST_LEN];
    uint64_t n7 = 0, b7 = 0;
    for (int i = 0; i < 4; i++)
        assert_int_equal(store_partition_digest(fx->s, others[i], keep[i], NULL, NULL), 0);
    assert_int_equal(store_partition_digest(fx->s, 7, d7, &n7, &b7), 0);
    assert_int_equal(n7, 8);
    store_stats_t before = stats(fx->s);
    assert_int_equal(before.conflicts, 2);

    uint64_t deleted = 99;
    assert_int_equal(store_delete_partition(fx->s, 7, &deleted), 0);
    assert_int_equal(deleted, n7);

    for (int pass = 0; pass < 2; pass++) { /* as deleted, then after reopening */
        expect_partition_empty(fx->s, 7);
        for (int i = 0; i < 4; i++) {
            assert_int_equal(store_partition_digest(fx->s, others[i], d, NULL, NULL), 0);
            assert_memory_equal(d, keep[i], SP_DIGEST_LEN);
        }
        check_find_data(fx->s, 7);
        store_object_t o;
        assert_int_equal(store_get(fx->s, big.sop, &o), SP_ENOTFOUND);
        check_finds_without_7(fx->s);
        store_stats_t st = stats(fx->s);
        assert_int_equal(st.instances, before.instances - n7);
        assert_int_equal(st.bytes, before.bytes - b7);
        assert_int_equal(st.studies, before.studies - 2);
        assert_int_equal(st.conflicts, 1);
        assert_true(summaries_match_reads(fx->s) > 0);
        reopen(fx);
    }
    /* Nothing in the database names partition 7 any more; partition 9's
     * conflict is the one left. */
    raw_refs_t r = raw_refs(fx, 7);
    assert_int_equal(r.objects, 0);
    assert_int_equal(r.index, 0);
    assert_int_equal(r.secondary, 0);
    assert_int_equal(r.conflicts, 1);
    r = raw_refs(fx, 9);
    assert_true(r.objects > 0 && r.index > 0 && r.secondary > 0);

    /* Deleting it again, or an empty partition, deletes nothing. */
    assert_int_equal(store_delete_partition(fx->s, 7, &deleted), 0);
    assert_int_equal(deleted, 0);
    assert_int_equal(store_delete_partition(fx->s, 8, NULL), 0);
    assert_int_equal(store_delete_partition(fx->s, 65536, &deleted), SP_EINVAL);

    /* The same instances come back as new, the conflict as a new conflict
     * (its kept copy went with the partition), and the partition's digest
     * is what it was. */
    reput_find_data(fx->s, 7);
    put_ok(fx->s, &big, 200000, 4242);
    assert_int_equal(put_data(fx->s, &c7, odd, 65, &out), 0);
    assert_int_equal(out, STORE_CONFLICT);
    assert_int_equal(store_partition_digest(fx->s, 7, d, NULL, NULL), 0);
    assert_memory_equal(d, d7, SP_DIGEST_LEN);
    store_stats_t st = stats(fx->s);
    assert_int_equal(st.instances, before.instances);
    assert_int_equal(st.bytes, before.bytes);
    assert_int_equal(st.studies, before.studies);
    assert_int_equal(st.conflicts, before.conflicts);
    check_find_data(fx->s, UINT32_MAX);
    EXPECT(fx->s, ATTR_STUDY_INSTANCE_UID, "1.2.3.3", {LEVEL_STUDY, 0, {"PatientID", "PAT2"}});
    free(odd);
}

/* Multi-valued index entries (partition 10: two names, two accession
 * numbers, a two-valued PatientID, an ACR-NEMA date) go with their study. */
static void test_delete_partition_multivalued(void **state)
{
    fixture_t *fx = *state;
    load_find_data(fx->s);
    uint64_t deleted = 0;
    assert_int_equal(store_delete_partition(fx->s, 10, &deleted), 0);
    assert_int_equal(deleted, 2);
    const attr_id_t SU = ATTR_STUDY_INSTANCE_UID;
    EXPECT(fx->s, SU, "", {LEVEL_STUDY, 0, {"AccessionNumber", "C701"}});
    EXPECT(fx->s, SU, "", {LEVEL_STUDY, 0, {"PatientName", "Doe^Ann"}});
    EXPECT(fx->s, SU, "", {LEVEL_STUDY, 0, {"StudyDate", "20230303"}});
    EXPECT(fx->s, ATTR_PATIENT_ID, "", {LEVEL_PATIENT, 0, {"PatientID", "PAT8"}});
    EXPECT(fx->s, SU, "1.2.3.1,1.2.3.2", {LEVEL_STUDY, 0, {"PatientID", "PAT1"}});
    check_find_data(fx->s, 10);
    raw_refs_t r = raw_refs(fx, 10);
    assert_int_equal(r.objects + r.index + r.secondary, 0);
    assert_int_equal(stats(fx->s).studies, 6);
}

/* Workers putting while partition 5 is deleted. */
#define DEL_STUDIES 12
#define DEL_PER_STUDY 6
#define DEL_MIN_PUTS 25
#define DEL_MAX_PUTS 400

typedef struct {
    store_t *s;
    int id;
    uint32_t part; /* partition the worker puts into */
    pthread_barrier_t *start;
    atomic_int *done; /* set when the deletion returned */
    int n;            /* puts made */
    int errors;       /* puts that failed or were not STORED */
} del_worker_t;

static inst_t del_inst(const del_worker_t *w, int i, char *study, char *series, char *sop)
{
    /* Into partition 5 alternately an existing study and a new one. */
    if (w->part == 5 && i % 2 == 0)
        sprintf(study, "1.5.%d", (i / 2 + w->id) % DEL_STUDIES);
    else
        sprintf(study, "1.6.%u.%d.%d", w->part, w->id, i / 4);
    sprintf(series, "%s.7", study);
    sprintf(sop, "%s.%d.%d", series, w->id, i);
    return simple(w->part, study, series, sop);
}

static void *del_worker(void *arg)
{
    del_worker_t *w = arg;
    pthread_barrier_wait(w->start);
    for (int i = 0; i < DEL_MAX_PUTS && (i < DEL_MIN_PUTS || !atomic_load(w->done)); i++) {
        char study[64], series[80], sop[112];
        inst_t in = del_inst(w, i, study, series, sop);
        uint8_t *b = make_bytes(500 + (size_t)i, (uint32_t)(w->id * 10000 + i));
        store_outcome_t out;
        if (put_data(w->s, &in, b, 500 + (size_t)i, &out) != 0 || out != STORE_STORED)
            w->errors++;
        free(b);
        w->n++;
    }
    return NULL;
}

static void preload_5(store_t *s)
{
    for (int st = 0; st < DEL_STUDIES; st++)
        for (int i = 0; i < DEL_PER_STUDY; i++) {
            char study[32], series[40], sop[48];
            sprintf(study, "1.5.%d", st);
            sprintf(series, "%s.%d", study, i % 2);
            sprintf(sop, "%s.%d", series, i);
            inst_t in = simple(5, study, series, sop);
            in.pid = st % 2 ? "PAT5A" : "PAT5B";
            put_ok(s, &in, 100 + (size_t)i, (uint32_t)(st * 100 + i));
        }
}

/* Runs THREADS workers and one deletion of partition 5 at once; returns
 * the instances the deletion reported. */
static uint64_t delete_during_puts(store_t *s, del_worker_t *w, bool same_partition)
{
    pthread_t t[THREADS];
    pthread_barrier_t start;
    atomic_int done = 0;
    pthread_barrier_init(&start, NULL, THREADS + 1);
    for (int i = 0; i < THREADS; i++) {
        w[i] = (del_worker_t){.s = s,
                              .id = i,
                              .part = same_partition ? 5 : 200 + (uint32_t)i,
                              .start = &start,
                              .done = &done};
        assert_int_equal(pthread_create(&t[i], NULL, del_worker, &w[i]), 0);
    }
    pthread_barrier_wait(&start);
    uint64_t deleted = 0;
    int rc = store_delete_partition(s, 5, &deleted);
    atomic_store(&done, 1);
    for (int i = 0; i < THREADS; i++)
        pthread_join(t[i], NULL);
    pthread_barrier_destroy(&start);
    assert_int_equal(rc, 0);
    for (int i = 0; i < THREADS; i++)
        assert_int_equal(w[i].errors, 0);
    return deleted;
}

/* Checks a worker's instances: each is whole and bit-exact, or (only when
 * it may have been deleted) wholly gone; returns how many are present. */
static int check_worker(store_t *s, const del_worker_t *w, bool may_be_gone)
{
    int present = 0;
    for (int i = 0; i < w->n; i++) {
        char study[64], series[80], sop[112];
        del_inst(w, i, study, series, sop);
        store_object_t o;
        int rc = store_get(s, sop, &o);
        if (rc == SP_ENOTFOUND && may_be_gone)
            continue;
        assert_int_equal(rc, 0);
        uint8_t *want = make_bytes(500 + (size_t)i, (uint32_t)(w->id * 10000 + i));
        assert_int_equal(o.len, 500 + (size_t)i);
        assert_memory_equal(o.data, want, o.len);
        free(want);
        store_object_free(&o);
        /* Its study has its record and locator: found by UID and listed. */
        static results_t rs;
        query_t q = {LEVEL_STUDY, 0, {"StudyInstanceUID", study}};
        assert_int_equal(run(s, &q, 0, false, &rs), 0);
        assert_int_equal(rs.n, 1);
        results_clear(&rs);
        present++;
    }
    return present;
}

static void test_delete_partition_during_other_puts(void **state)
{
    fixture_t *fx = *state;
    preload_5(fx->s);
    inst_t keep = simple(6, "1.6.0", "1.6.0.1", "1.6.0.1.1");
    put_ok(fx->s, &keep, 777, 1);
    del_worker_t w[THREADS];
    uint64_t deleted = delete_during_puts(fx->s, w, false);
    assert_int_equal(deleted, DEL_STUDIES * DEL_PER_STUDY);
    expect_partition_empty(fx->s, 5);
    uint64_t total = 1;
    for (int i = 0; i < THREADS; i++) {
        assert_int_equal(check_worker(fx->s, &w[i], false), w[i].n);
        uint64_t c = 0;
        assert_int_equal(store_partition_digest(fx->s, w[i].part, NULL, &c, NULL), 0);
        assert_int_equal(c, (uint64_t)w[i].n);
        total += (uint64_t)w[i].n;
    }
    check_get(fx->s, &keep, 777, 1);
    store_stats_t st = stats(fx->s);
    assert_int_equal(st.instances, total);
    reopen(fx);
    store_stats_t again = stats(fx->s);
    assert_int_equal(again.instances, st.instances);
    assert_int_equal(again.bytes, st.bytes);
    assert_int_equal(again.studies, st.studies);
    EXPECT(fx->s, ATTR_STUDY_INSTANCE_UID, "", {LEVEL_STUDY, 0, {"PatientID", "PAT5A"}});
}

/* Puts into the partition being deleted: each lands wholly before its
 * study's deletion (and goes with it) or wholly after (and stays, with its
 * study record and locators); the counters stay exact. */
static void test_delete_partition_racing_puts(void **state)
{
    fixture_t *fx = *state;
    preload_5(fx->s);
    del_worker_t w[THREADS];
    uint64_t deleted = delete_during_puts(fx->s, w, true);
    uint64_t put = 0, present = 0, left = 0;
    for (int i = 0; i < THREADS; i++) {
        put += (uint64_t)w[i].n;
        present += (uint64_t)check_worker(fx->s, &w[i], true);
    }
    assert_int_equal(store_partition_digest(fx->s, 5, NULL, &left, NULL), 0);
    assert_int_equal(left, present);
    assert_int_equal(deleted + left, DEL_STUDIES * DEL_PER_STUDY + put);
    store_stats_t st = stats(fx->s);
    assert_int_equal(st.instances, left);
    reopen(fx);
    store_stats_t again = stats(fx->s);
    assert_int_equal(again.instances, st.instances);
    assert_int_equal(again.bytes, st.bytes);
    assert_int_equal(again.studies, st.studies);

    /* With the puts stopped, a second deletion empties the partition. */
    uint64_t more = 0;
    assert_int_equal(store_delete_partition(fx->s, 5, &more), 0);
    assert_int_equal(more, left);
    expect_partition_empty(fx->s, 5);
    st = stats(fx->s);
    assert_int_equal(st.instances, 0);
    assert_int_equal(st.bytes, 0);
    assert_int_equal(st.studies, 0);
    raw_refs_t r = raw_refs(fx, 5);
    assert_int_equal(r.objects + r.index + r.secondary + r.conflicts, 0);
}

/* A study whose record is corrupt still loses its index entries (found by
 * scanning the indexes instead of derived from the record). */
static void test_delete_partition_corrupt_study_record(void **state)
{
    fixture_t *fx = *state;
    load_find_data(fx->s);
    store_close(&fx->s);
    raw_db_t r;
    raw_open(&r, fx->dir);
    char key[64] = {'T', 0, 7}, *err = NULL;
    strcpy(key + 3, "1.2.3.3");
    rocksdb_writeoptions_t *wo = rocksdb_writeoptions_create();
    rocksdb_put_cf(r.db, wo, raw_cf(&r, "index"), key, 3 + strlen("1.2.3.3"), "\x01T\xff", 3, &err);
    assert_null(err);
    rocksdb_writeoptions_destroy(wo);
    raw_close(&r);
    fx->s = open_at(fx->dir);

    uint64_t deleted = 0;
    assert_int_equal(store_delete_partition(fx->s, 7, &deleted), 0);
    assert_int_equal(deleted, 7);
    check_finds_without_7(fx->s);
    assert_int_equal(stats(fx->s).studies, 6);
    raw_refs_t x = raw_refs(fx, 7);
    assert_int_equal(x.objects + x.index + x.secondary, 0);
}

/* ---- partition summaries ------------------------------------------------ */

#define MAX_SUMS 256

typedef struct {
    store_partition_summary_t v[MAX_SUMS];
    int n;
    int stop_after; /* return stop_rc after this many; 0 = never */
    int stop_rc;
} sums_t;

static int add_sum(void *ctx, const store_partition_summary_t *p)
{
    sums_t *sm = ctx;
    assert_true(sm->n < MAX_SUMS);
    if (sm->n > 0)
        assert_true(p->partition > sm->v[sm->n - 1].partition);
    sm->v[sm->n++] = *p;
    return sm->stop_after && sm->n == sm->stop_after ? sm->stop_rc : 0;
}

static void summaries(store_t *s, sums_t *sm)
{
    memset(sm, 0, sizeof *sm);
    assert_int_equal(store_partition_summaries(s, add_sum, sm), 0);
}

/* Checks each summary against store_partition_digest() and that exactly
 * the partitions of `want` (ascending, n of them) are reported. */
static void expect_summaries(store_t *s, const uint32_t *want, int n)
{
    static sums_t sm;
    summaries(s, &sm);
    assert_int_equal(sm.n, n);
    for (int i = 0; i < n; i++) {
        const store_partition_summary_t *p = &sm.v[i];
        uint8_t d[SP_DIGEST_LEN];
        uint64_t c = 0, b = 0;
        assert_int_equal(p->partition, want[i]);
        assert_int_equal(store_partition_digest(s, p->partition, d, &c, &b), 0);
        assert_true(c > 0);
        assert_int_equal(p->count, c);
        assert_int_equal(p->bytes, b);
        assert_memory_equal(p->digest, d, SP_DIGEST_LEN);
    }
}

/* Puts count instances into partition part, in study 1.7.<part>. */
static void put_into(store_t *s, uint32_t part, int first, int count, size_t len)
{
    for (int i = first; i < first + count; i++) {
        char study[32], series[48], sop[64];
        snprintf(study, sizeof study, "1.7.%u", part);
        snprintf(series, sizeof series, "%s.%d", study, i % 3);
        snprintf(sop, sizeof sop, "%s.%d", series, i);
        inst_t in = simple(part, study, series, sop);
        put_ok(s, &in, len + (size_t)i, part * 1000 + (uint32_t)i);
    }
}

static void test_partition_summaries(void **state)
{
    fixture_t *fx = *state;
    static sums_t sm;
    summaries(fx->s, &sm);
    assert_int_equal(sm.n, 0);
    assert_int_equal(store_partition_summaries(NULL, add_sum, &sm), SP_EINVAL);
    assert_int_equal(store_partition_summaries(fx->s, NULL, &sm), SP_EINVAL);

    /* 40 partitions spread over the whole range, both ends included; the
     * summaries are read in between so stale cache entries would show. */
    uint32_t parts[40];
    for (int i = 0; i < 40; i++)
        parts[i] = i == 39 ? 65535 : (uint32_t)i * 1637;
    for (int i = 0; i < 40; i++) {
        put_into(fx->s, parts[i], 0, 1 + i % 4, 50);
        if (i % 10 == 0)
            expect_summaries(fx->s, parts, i + 1);
    }
    expect_summaries(fx->s, parts, 40);
    expect_summaries(fx->s, parts, 40); /* from the cache, same answer */

    /* A put changes its partition's summary, and only that one. */
    summaries(fx->s, &sm);
    store_partition_summary_t before = sm.v[7];
    put_into(fx->s, parts[7], 10, 1, 77);
    summaries(fx->s, &sm);
    assert_int_equal(sm.v[7].count, before.count + 1);
    assert_int_equal(sm.v[7].bytes, before.bytes + 87);
    assert_memory_not_equal(sm.v[7].digest, before.digest, SP_DIGEST_LEN);
    expect_summaries(fx->s, parts, 40);

    /* A deletion removes the partition from the summaries. */
    uint64_t deleted = 0;
    assert_int_equal(store_delete_partition(fx->s, parts[39], &deleted), 0);
    assert_int_equal(deleted, 4);
    assert_int_equal(store_delete_partition(fx->s, parts[0], &deleted), 0);
    expect_summaries(fx->s, parts + 1, 38);

    /* A duplicate or a conflict changes nothing. */
    inst_t one = simple(parts[5], "1.7.8185", "1.7.8185.0", "1.7.8185.0.99");
    put_ok(fx->s, &one, 10, 1);
    summaries(fx->s, &sm);
    before = sm.v[4];
    assert_int_equal(before.partition, parts[5]);
    for (uint32_t seed = 1; seed <= 2; seed++) {
        uint8_t *b = make_bytes(10, seed);
        store_outcome_t out;
        assert_int_equal(put_data(fx->s, &one, b, 10, &out), 0);
        assert_int_equal(out, seed == 1 ? STORE_DUPLICATE : STORE_CONFLICT);
        free(b);
    }
    summaries(fx->s, &sm);
    assert_memory_equal(&sm.v[4], &before, sizeof before);
    expect_summaries(fx->s, parts + 1, 38);

    /* After reopening, the partitions holding instances are known again. */
    reopen(fx);
    expect_summaries(fx->s, parts + 1, 38);

    /* fn can stop the walk; a negative answer comes back. */
    memset(&sm, 0, sizeof sm);
    sm.stop_after = 3;
    sm.stop_rc = 1;
    assert_int_equal(store_partition_summaries(fx->s, add_sum, &sm), 0);
    assert_int_equal(sm.n, 3);
    memset(&sm, 0, sizeof sm);
    sm.stop_after = 2;
    sm.stop_rc = -77;
    assert_int_equal(store_partition_summaries(fx->s, add_sum, &sm), -77);
    assert_int_equal(sm.n, 2);
}

#define SUM_PARTS 6
#define SUM_PUTS 150

typedef struct {
    store_t *s;
    int id;
    int errors;
    atomic_int *running;
} sum_writer_t;

static void *sum_writer(void *arg)
{
    sum_writer_t *w = arg;
    for (int i = 0; i < SUM_PUTS; i++) {
        char study[32], series[48], sop[64];
        uint32_t part = 300 + (uint32_t)((i + w->id) % SUM_PARTS);
        snprintf(study, sizeof study, "1.8.%u.%d", part, w->id);
        snprintf(series, sizeof series, "%s.1", study);
        snprintf(sop, sizeof sop, "%s.%d", series, i);
        inst_t in = simple(part, study, series, sop);
        uint8_t *b = make_bytes(100, (uint32_t)(w->id * 1000 + i));
        store_outcome_t out;
        if (put_data(w->s, &in, b, 100, &out) != 0 || out != STORE_STORED)
            w->errors++;
        free(b);
        /* One partition deleted half way: deletions invalidate too. */
        if (w->id % THREADS == 0 && i == SUM_PUTS / 2 &&
            store_delete_partition(w->s, 300, NULL) != 0)
            w->errors++;
    }
    atomic_fetch_sub(w->running, 1);
    return NULL;
}

/* Summaries computed while puts land are never left cached stale: once the
 * writers are done, every summary equals a fresh digest. */
static void test_partition_summaries_concurrent(void **state)
{
    fixture_t *fx = *state;
    for (int round = 0; round < 3; round++) {
        pthread_t t[THREADS];
        sum_writer_t w[THREADS];
        atomic_int running = THREADS;
        for (int i = 0; i < THREADS; i++) {
            w[i] = (sum_writer_t){.s = fx->s, .id = round * THREADS + i, .running = &running};
            assert_int_equal(pthread_create(&t[i], NULL, sum_writer, &w[i]), 0);
        }
        /* Summarise over and over while they write (with a pause: a
         * reader spinning on the summary lock would starve the writers on
         * two cores, which no repair round does). */
        static sums_t sm;
        while (atomic_load(&running) > 0) {
            summaries(fx->s, &sm);
            nanosleep(&(struct timespec){.tv_nsec = 200000}, NULL);
        }
        for (int i = 0; i < THREADS; i++) {
            pthread_join(t[i], NULL);
            assert_int_equal(w[i].errors, 0);
        }
        uint32_t want[SUM_PARTS];
        for (int i = 0; i < SUM_PARTS; i++)
            want[i] = 300 + (uint32_t)i;
        expect_summaries(fx->s, want, SUM_PARTS);
    }
}

/* ---- per-study hand-off deletion ------------------------------------- */

#define MAX_STUDIES 16

typedef struct {
    char v[MAX_STUDIES][65];
    int n;
    int stop_after;
} studies_t;

static int add_study(void *ctx, const char *study_uid)
{
    studies_t *st = ctx;
    assert_true(st->n < MAX_STUDIES);
    strcpy(st->v[st->n++], study_uid);
    return st->stop_after && st->n == st->stop_after;
}

/* The study UIDs of a partition joined with commas. */
static void studies_of(store_t *s, uint32_t part, char *out, size_t size)
{
    studies_t st = {0};
    assert_int_equal(store_partition_studies(s, part, add_study, &st), 0);
    out[0] = '\0';
    for (int i = 0; i < st.n; i++)
        snprintf(out + strlen(out), size - strlen(out), "%s%s", i ? "," : "", st.v[i]);
}

/* What held() was asked: SOPs in order, and whether it says yes. */
typedef struct {
    char sop[64][65];
    uint8_t digest[64][SP_DIGEST_LEN];
    int n;
    const char *refuse; /* this SOP is not held */
} asked_t;

static bool held_record(void *ctx, const store_entry_t *e)
{
    asked_t *a = ctx;
    assert_true(a->n < 64);
    strcpy(a->sop[a->n], e->sop_uid);
    memcpy(a->digest[a->n], e->digest, SP_DIGEST_LEN);
    a->n++;
    return !(a->refuse && strcmp(a->refuse, e->sop_uid) == 0);
}

static void test_delete_study_if(void **state)
{
    fixture_t *fx = *state;
    inst_t a[5], b[3];
    char sops[8][32];
    for (int i = 0; i < 5; i++) {
        sprintf(sops[i], "1.4.1.%d.%d", i % 2, i);
        a[i] = simple(7, "1.4.1", i % 2 ? "1.4.1.1" : "1.4.1.0", sops[i]);
        put_ok(fx->s, &a[i], 200 + (size_t)i, (uint32_t)i);
    }
    for (int i = 0; i < 3; i++) {
        sprintf(sops[5 + i], "1.4.2.1.%d", i);
        b[i] = simple(7, "1.4.2", "1.4.2.1", sops[5 + i]);
        b[i].pid = "PAT4";
        put_ok(fx->s, &b[i], 300 + (size_t)i, 10 + (uint32_t)i);
    }
    inst_t c = simple(8, "1.4.3", "1.4.3.1", "1.4.3.1.1");
    put_ok(fx->s, &c, 100, 20);

    char got[256];
    studies_of(fx->s, 7, got, sizeof got);
    assert_string_equal(got, "1.4.1,1.4.2");
    studies_of(fx->s, 8, got, sizeof got);
    assert_string_equal(got, "1.4.3");
    studies_of(fx->s, 9, got, sizeof got);
    assert_string_equal(got, "");
    studies_t st = {.stop_after = 1};
    assert_int_equal(store_partition_studies(fx->s, 7, add_study, &st), 0);
    assert_int_equal(st.n, 1);
    assert_int_equal(store_partition_studies(fx->s, 65536, add_study, &st), SP_EINVAL);
    assert_int_equal(store_partition_studies(fx->s, 7, NULL, &st), SP_EINVAL);

    /* One instance of 1.4.2 not held: nothing of it is deleted. */
    static asked_t asked;
    memset(&asked, 0, sizeof asked);
    asked.refuse = "1.4.2.1.1";
    uint64_t deleted = 99;
    store_stats_t before = stats(fx->s);
    assert_int_equal(store_delete_study_if(fx->s, 7, "1.4.2", held_record, &asked, &deleted),
                     SP_ECONFLICT);
    assert_int_equal(deleted, 0);
    assert_int_equal(asked.n, 2); /* stopped at the first one not held */
    for (int i = 0; i < 3; i++)
        check_get(fx->s, &b[i], 300 + (size_t)i, 10 + (uint32_t)i);
    store_stats_t after = stats(fx->s);
    assert_int_equal(after.instances, before.instances);
    assert_int_equal(after.studies, before.studies);

    /* All of 1.4.1 held: it goes, in one piece; held() saw every instance
     * with its digest, in key order. */
    memset(&asked, 0, sizeof asked);
    assert_int_equal(store_delete_study_if(fx->s, 7, "1.4.1", held_record, &asked, &deleted), 0);
    assert_int_equal(deleted, 5);
    assert_int_equal(asked.n, 5);
    const int order[5] = {0, 2, 4, 1, 3}; /* series 1.4.1.0 first */
    for (int i = 0; i < 5; i++) {
        uint8_t *bytes = make_bytes(200 + (size_t)order[i], (uint32_t)order[i]);
        uint8_t d[SP_DIGEST_LEN];
        sp_digest(bytes, 200 + (size_t)order[i], d);
        free(bytes);
        assert_string_equal(asked.sop[i], sops[order[i]]);
        assert_memory_equal(asked.digest[i], d, SP_DIGEST_LEN);
        store_object_t o;
        assert_int_equal(store_get(fx->s, sops[i], &o), SP_ENOTFOUND);
    }
    after = stats(fx->s);
    assert_int_equal(after.instances, before.instances - 5);
    assert_int_equal(after.studies, before.studies - 1);
    assert_int_equal(after.bytes, before.bytes - (200 + 201 + 202 + 203 + 204));
    studies_of(fx->s, 7, got, sizeof got);
    assert_string_equal(got, "1.4.2");
    EXPECT(fx->s, ATTR_STUDY_INSTANCE_UID, "1.4.3", {LEVEL_STUDY, 0, {"PatientID", "PAT1"}});
    EXPECT(fx->s, ATTR_STUDY_INSTANCE_UID, "1.4.2", {LEVEL_STUDY, 0, {"PatientID", "PAT4"}});
    uint64_t count = 0;
    assert_int_equal(store_partition_digest(fx->s, 7, NULL, &count, NULL), 0);
    assert_int_equal(count, 3);
    static sums_t sm;
    summaries(fx->s, &sm);
    assert_int_equal(sm.n, 2);
    assert_int_equal(sm.v[0].count, 3);

    /* A study that is not there (or not in that partition): nothing asked. */
    memset(&asked, 0, sizeof asked);
    deleted = 99;
    assert_int_equal(store_delete_study_if(fx->s, 7, "1.4.1", held_record, &asked, &deleted), 0);
    assert_int_equal(deleted, 0);
    assert_int_equal(store_delete_study_if(fx->s, 7, "1.4.3", held_record, &asked, &deleted), 0);
    assert_int_equal(deleted, 0);
    assert_int_equal(asked.n, 0);
    check_get(fx->s, &c, 100, 20);

    assert_int_equal(store_delete_study_if(fx->s, 7, "1.4.2", NULL, NULL, &deleted), SP_EINVAL);
    assert_int_equal(store_delete_study_if(fx->s, 7, "1..4", held_record, &asked, &deleted),
                     SP_EINVAL);
    assert_int_equal(store_delete_study_if(fx->s, 65536, "1.4.2", held_record, &asked, &deleted),
                     SP_EINVAL);

    /* Counts agree with a fresh count at open. */
    after = stats(fx->s);
    reopen(fx);
    store_stats_t again = stats(fx->s);
    assert_int_equal(again.instances, after.instances);
    assert_int_equal(again.bytes, after.bytes);
    assert_int_equal(again.studies, after.studies);
}

#define RACE_PUTS 300

typedef struct {
    store_t *s;
    atomic_int n; /* puts finished */
    int errors;
} study_putter_t;

static void race_sop(int i, char *sop)
{
    sprintf(sop, "1.4.9.1.%d", i);
}

static void *study_putter(void *arg)
{
    study_putter_t *p = arg;
    for (int i = 0; i < RACE_PUTS; i++) {
        char sop[32];
        race_sop(i, sop);
        inst_t in = simple(12, "1.4.9", "1.4.9.1", sop);
        uint8_t *b = make_bytes(100 + (size_t)i, (uint32_t)i);
        store_outcome_t out;
        if (put_data(p->s, &in, b, 100 + (size_t)i, &out) != 0 || out != STORE_STORED)
            p->errors++;
        free(b);
        atomic_fetch_add(&p->n, 1);
    }
    return NULL;
}

/* What one racing deletion asked held() about, by put number. */
typedef struct {
    int batch[RACE_PUTS];
    int nbatch;
    int refuse_at; /* answer "not held" for the refuse_at-th instance; 0 = never */
    bool invalid;  /* asked about something the putter did not put */
} race_held_t;

static bool race_held(void *ctx, const store_entry_t *e)
{
    race_held_t *r = ctx;
    int i = atoi(e->sop_uid + strlen("1.4.9.1."));
    if (i < 0 || i >= RACE_PUTS || r->nbatch >= RACE_PUTS) {
        r->invalid = true; /* asserted by the caller (the gate is closed here) */
        return false;
    }
    r->batch[r->nbatch++] = i;
    return r->nbatch != r->refuse_at;
}

/* A put racing with store_delete_study_if() into the same study is either
 * among the instances held() was asked about (and deleted with them) or
 * survives whole; never deleted unasked. Every third call refuses at its
 * second instance: nothing it was asked about is deleted. */
static void test_delete_study_if_racing_puts(void **state)
{
    fixture_t *fx = *state;
    static race_held_t r;
    static int deleted_by[RACE_PUTS]; /* deletions that were asked about it */
    memset(deleted_by, 0, sizeof deleted_by);
    study_putter_t p = {.s = fx->s};
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, study_putter, &p), 0);
    uint64_t total = 0;
    int calls = 0, deletions = 0, refusals = 0, bad = 0;
    while (atomic_load(&p.n) < RACE_PUTS) {
        /* Paced so the putter is not starved by the closing gate, at
         * varying offsets from its puts. */
        usleep(100 + (useconds_t)(calls % 7) * 150);
        memset(&r, 0, sizeof r);
        r.refuse_at = calls++ % 3 == 2 ? 2 : 0;
        uint64_t n = 99;
        int rc = store_delete_study_if(fx->s, 12, "1.4.9", race_held, &r, &n);
        /* Failures are counted, not asserted, until the putter is joined. */
        bad += r.invalid;
        if (rc == SP_ECONFLICT) {
            bad += r.nbatch != r.refuse_at || n != 0;
            refusals++;
            continue;
        }
        bad += rc != 0 || n != (uint64_t)r.nbatch;
        for (int i = 0; i < r.nbatch; i++)
            deleted_by[r.batch[i]]++;
        total += n;
        deletions += n > 0;
    }
    pthread_join(t, NULL);
    assert_int_equal(bad, 0);
    assert_int_equal(p.errors, 0);
    assert_true(deletions > 0);
    assert_true(refusals > 0);

    /* Every put was deleted by exactly one call that asked about it, or is
     * still there, bit-exact. */
    uint64_t present = 0, gone = 0;
    for (int i = 0; i < RACE_PUTS; i++) {
        char sop[32];
        race_sop(i, sop);
        store_object_t o;
        int rc = store_get(fx->s, sop, &o);
        assert_true(deleted_by[i] <= 1);
        if (deleted_by[i]) {
            assert_int_equal(rc, SP_ENOTFOUND);
            gone++;
            continue;
        }
        assert_int_equal(rc, 0);
        uint8_t *want = make_bytes(100 + (size_t)i, (uint32_t)i);
        assert_int_equal(o.len, 100 + (size_t)i);
        assert_memory_equal(o.data, want, o.len);
        free(want);
        store_object_free(&o);
        present++;
    }
    assert_int_equal(gone, total);
    assert_int_equal(stats(fx->s).instances, present);
    uint64_t count = 0;
    assert_int_equal(store_partition_digest(fx->s, 12, NULL, &count, NULL), 0);
    assert_int_equal(count, present);
}

/* ---- repair ------------------------------------------------------------ */

static int repair_data(store_t *s, const inst_t *in, const uint8_t *data, size_t len,
                       store_outcome_t *out)
{
    attrs_t a;
    inst_attrs(in, &a);
    store_put_t p = {.partition = in->part, .attrs = &a, .data = data, .len = len};
    sp_digest(data, len, p.digest);
    int rc = store_repair(s, &p, out);
    attrs_clear(&a);
    return rc;
}

static store_outcome_t repair(store_t *s, const inst_t *in, size_t len, uint32_t seed)
{
    uint8_t *b = make_bytes(len, seed);
    store_outcome_t out = (store_outcome_t)-1;
    assert_int_equal(repair_data(s, in, b, len, &out), 0);
    free(b);
    return out;
}

static void test_repair(void **state)
{
    fixture_t *fx = *state;
    inst_t small = simple(7, "1.2.3", "1.2.3.1", "1.2.3.1.1");
    inst_t large = simple(7, "1.2.3", "1.2.3.1", "1.2.3.1.2");
    inst_t good = simple(7, "1.2.3", "1.2.3.1", "1.2.3.1.3");
    inst_t lost = simple(7, "1.2.3", "1.2.3.2", "1.2.3.2.1");
    put_ok(fx->s, &small, 500, 1);
    put_ok(fx->s, &large, 100000, 2);
    put_ok(fx->s, &good, 700, 3);
    put_ok(fx->s, &lost, 900, 4);
    uint8_t d7[SP_DIGEST_LEN];
    uint64_t c7 = 0, b7 = 0;
    assert_int_equal(store_partition_digest(fx->s, 7, d7, &c7, &b7), 0);
    store_close(&fx->s);

    /* Damage three objects behind the store's back: two flipped bytes (an
     * inline value and a blob), one object gone. */
    raw_db_t r;
    raw_open(&r, fx->dir);
    flip_object_byte(&r, &small, 17);
    flip_object_byte(&r, &large, 99999);
    char key[256], *err = NULL;
    size_t kn = object_key(&lost, key);
    rocksdb_writeoptions_t *wo = rocksdb_writeoptions_create();
    rocksdb_delete_cf(r.db, wo, raw_cf(&r, "objects"), key, kn, &err);
    assert_null(err);
    rocksdb_writeoptions_destroy(wo);
    raw_close(&r);
    fx->s = open_at(fx->dir);
    expect_corrupt(fx->s, small.sop);
    expect_corrupt(fx->s, large.sop);
    store_object_t o;
    assert_int_equal(store_get(fx->s, lost.sop, &o), SP_EDB);

    /* Repairs with the good bytes put them back; nothing else changes. */
    store_stats_t before = stats(fx->s);
    assert_int_equal(repair(fx->s, &small, 500, 1), STORE_STORED);
    assert_int_equal(repair(fx->s, &large, 100000, 2), STORE_STORED);
    assert_int_equal(repair(fx->s, &lost, 900, 4), STORE_STORED);
    check_get(fx->s, &small, 500, 1);
    check_get(fx->s, &large, 100000, 2);
    check_get(fx->s, &lost, 900, 4);
    store_stats_t after = stats(fx->s);
    assert_int_equal(after.instances, before.instances);
    assert_int_equal(after.bytes, before.bytes);
    assert_int_equal(after.corrupt_reads, before.corrupt_reads + 2);

    /* A copy that verifies is a duplicate: nothing written. */
    assert_int_equal(repair(fx->s, &small, 500, 1), STORE_DUPLICATE);
    assert_int_equal(repair(fx->s, &good, 700, 3), STORE_DUPLICATE);

    /* Different bytes are a conflict, kept aside; the original stays. */
    assert_int_equal(repair(fx->s, &good, 700, 99), STORE_CONFLICT);
    check_get(fx->s, &good, 700, 3);
    assert_int_equal(stats(fx->s).conflicts, 1);

    /* An absent SOP is stored as a put would. */
    inst_t fresh = simple(7, "1.2.3", "1.2.3.2", "1.2.3.2.2");
    assert_int_equal(repair(fx->s, &fresh, 300, 5), STORE_STORED);
    check_get(fx->s, &fresh, 300, 5);
    assert_int_equal(stats(fx->s).instances, before.instances + 1);
    assert_int_equal(repair(fx->s, &fresh, 300, 5), STORE_DUPLICATE);

    /* Validation as store_put's. */
    uint8_t *b = make_bytes(300, 5);
    attrs_t a;
    inst_attrs(&fresh, &a);
    store_put_t p = {.partition = 7, .attrs = &a, .data = b, .len = 300};
    sp_digest(b, 299, p.digest);
    store_outcome_t out;
    assert_int_equal(store_repair(fx->s, &p, &out), SP_EDIGEST);
    sp_digest(b, 300, p.digest);
    p.partition = 8; /* the study is in partition 7 */
    attrs_set(&a, ATTR_SOP_INSTANCE_UID, "1.2.3.2.3");
    assert_int_equal(store_repair(fx->s, &p, &out), SP_EINVAL);
    attrs_set(&a, ATTR_SOP_INSTANCE_UID, "1..2");
    assert_int_equal(store_repair(fx->s, &p, &out), SP_EINVAL);
    attrs_clear(&a);
    free(b);

    /* The partition's digest counts the same instances as before (plus the
     * new one), and the repairs survive a restart. */
    static sums_t sm;
    summaries(fx->s, &sm);
    assert_int_equal(sm.n, 1);
    assert_int_equal(sm.v[0].count, c7 + 1);
    assert_int_equal(sm.v[0].bytes, b7 + 300);
    reopen(fx);
    check_get(fx->s, &small, 500, 1);
    check_get(fx->s, &large, 100000, 2);
    check_get(fx->s, &lost, 900, 4);
}

/* A blob whose file is damaged (RocksDB's blob checksum fails, no digest
 * comparison needed) is repaired too. */
static void test_repair_blob_file(void **state)
{
    fixture_t *fx = *state;
    inst_t large = simple(7, "1.2.3", "1.2.3.1", "1.2.3.1.1");
    put_ok(fx->s, &large, 80000, 5);
    corrupt_in_blob_file(fx, 80000, 5);
    expect_corrupt(fx->s, large.sop);
    assert_int_equal(repair(fx->s, &large, 80000, 5), STORE_STORED);
    check_get(fx->s, &large, 80000, 5);
    assert_int_equal(repair(fx->s, &large, 80000, 5), STORE_DUPLICATE);
    reopen(fx);
    check_get(fx->s, &large, 80000, 5);
}

/* ---- scrub --------------------------------------------------------------- */

#define SCRUB_N 37

typedef struct {
    char sop[8][65];
    uint32_t part[8];
    int n;
    int stop; /* answer for each report */
} reports_t;

static int report(void *ctx, const store_entry_t *e)
{
    reports_t *r = ctx;
    assert_true(r->n < 8);
    strcpy(r->sop[r->n], e->sop_uid);
    r->part[r->n] = e->partition;
    r->n++;
    return r->stop;
}

/* One full scrub pass in steps of `step`; returns the number of steps and
 * adds what was read to *checked and *bytes. */
static int scrub_pass(store_t *s, size_t step, reports_t *r, uint64_t *checked, uint64_t *bytes)
{
    char *cursor = NULL;
    int steps = 0;
    do {
        char *next = (char *)"x";
        uint64_t c = 99, b = 99;
        assert_int_equal(store_scrub(s, cursor, step, report, r, &next, &c, &b), 0);
        assert_true(step == 0 || c <= step);
        *checked += c;
        *bytes += b;
        free(cursor);
        cursor = next;
        steps++;
        assert_true(steps < 100);
    } while (cursor);
    return steps;
}

static inst_t scrub_inst(int i, char *study, char *series, char *sop)
{
    /* Three partitions, ten studies. */
    sprintf(study, "1.3.%d", i % 10);
    sprintf(series, "%s.1", study);
    sprintf(sop, "%s.%d", series, i);
    return simple(20 + (uint32_t)(i % 10) % 3, study, series, sop);
}

static size_t scrub_len(int i)
{
    return i == 5 ? 100000 : 100 + (size_t)i; /* one in a blob file */
}

static void test_scrub(void **state)
{
    fixture_t *fx = *state;
    uint64_t total = 0;
    char study[SCRUB_N][32], series[SCRUB_N][40], sop[SCRUB_N][48];
    inst_t in[SCRUB_N];
    for (int i = 0; i < SCRUB_N; i++) {
        in[i] = scrub_inst(i, study[i], series[i], sop[i]);
        put_ok(fx->s, &in[i], scrub_len(i), (uint32_t)i);
        total += scrub_len(i);
    }

    /* A clean store: a pass in steps of 5 reads everything once. */
    static reports_t r;
    memset(&r, 0, sizeof r);
    uint64_t checked = 0, bytes = 0;
    assert_int_equal(scrub_pass(fx->s, 5, &r, &checked, &bytes), (SCRUB_N + 4) / 5);
    assert_int_equal(r.n, 0);
    assert_int_equal(checked, SCRUB_N);
    assert_int_equal(bytes, total);

    store_close(&fx->s);
    raw_db_t raw;
    raw_open(&raw, fx->dir);
    flip_object_byte(&raw, &in[5], 50000); /* the blob */
    flip_object_byte(&raw, &in[10], 3);
    raw_close(&raw);
    fx->s = open_at(fx->dir);

    /* Exactly the two damaged objects are reported, once each, in key
     * order; nothing is read twice or skipped. */
    for (size_t step = 1; step <= SCRUB_N + 1; step += 6) {
        memset(&r, 0, sizeof r);
        checked = bytes = 0;
        uint64_t corrupt = stats(fx->s).corrupt_reads;
        int steps = scrub_pass(fx->s, step, &r, &checked, &bytes);
        assert_int_equal(steps, (SCRUB_N + step - 1) / step);
        assert_int_equal(checked, SCRUB_N);
        assert_int_equal(bytes, total);
        assert_int_equal(r.n, 2);
        assert_string_equal(r.sop[0], sop[10]); /* partition 20 sorts first */
        assert_int_equal(r.part[0], 20);
        assert_string_equal(r.sop[1], sop[5]);
        assert_int_equal(r.part[1], 22);
        assert_int_equal(stats(fx->s).corrupt_reads, corrupt + 2);
    }

    /* All at once (no limit). */
    memset(&r, 0, sizeof r);
    checked = bytes = 0;
    assert_int_equal(scrub_pass(fx->s, 0, &r, &checked, &bytes), 1);
    assert_int_equal(checked, SCRUB_N);
    assert_int_equal(r.n, 2);

    /* A report can stop the step; the next resumes after it. */
    memset(&r, 0, sizeof r);
    r.stop = 1;
    char *next = NULL;
    uint64_t c = 0, b = 0;
    assert_int_equal(store_scrub(fx->s, NULL, 0, report, &r, &next, &c, &b), 0);
    assert_int_equal(r.n, 1);
    assert_non_null(next);
    char *next2 = NULL;
    r.stop = -42;
    assert_int_equal(store_scrub(fx->s, next, 0, report, &r, &next2, &c, &b), -42);
    assert_int_equal(r.n, 2);
    assert_string_equal(r.sop[1], sop[5]);
    assert_null(next2);
    free(next);

    /* Between steps, a put ahead of the cursor is checked and a deleted
     * partition is not reported missing. */
    memset(&r, 0, sizeof r);
    checked = 0;
    next = NULL;
    assert_int_equal(store_scrub(fx->s, NULL, 3, report, &r, &next, &checked, NULL), 0);
    inst_t late = simple(21, "1.3.1", "1.3.1.1", "1.3.1.1.99");
    put_ok(fx->s, &late, 10, 7);
    uint64_t gone = 0;
    assert_int_equal(store_delete_partition(fx->s, 22, &gone), 0);
    assert_true(gone > 0);
    char *cursor = next;
    while (cursor) {
        c = 0;
        assert_int_equal(store_scrub(fx->s, cursor, 4, report, &r, &next, &c, NULL), 0);
        checked += c;
        free(cursor);
        cursor = next;
    }
    assert_int_equal(checked, SCRUB_N + 1 - gone);
    assert_int_equal(r.n, 1);
    assert_string_equal(r.sop[0], sop[10]);

    /* Once repaired, a pass is clean. */
    assert_int_equal(repair(fx->s, &in[10], scrub_len(10), 10), STORE_STORED);
    memset(&r, 0, sizeof r);
    checked = bytes = 0;
    scrub_pass(fx->s, 10, &r, &checked, &bytes);
    assert_int_equal(r.n, 0);
    assert_int_equal(checked, SCRUB_N + 1 - gone);

    /* Empty store, malformed cursors. */
    assert_int_equal(store_scrub(fx->s, "abc", 1, report, &r, &next, NULL, NULL), SP_EINVAL);
    assert_null(next);
    assert_int_equal(store_scrub(fx->s, "zz", 1, report, &r, &next, NULL, NULL), SP_EINVAL);
    assert_int_equal(store_scrub(NULL, NULL, 1, report, &r, &next, NULL, NULL), SP_EINVAL);
    char dir2[64] = "/tmp/test_store.XXXXXX";
    assert_non_null(mkdtemp(dir2));
    store_t *empty = open_at(dir2);
    next = (char *)"x";
    c = 99;
    assert_int_equal(store_scrub(empty, NULL, 5, report, &r, &next, &c, NULL), 0);
    assert_null(next);
    assert_int_equal(c, 0);
    store_close(&empty);
    rm_tree(dir2);
}

/* ---- duplicate policies and the conflict bound ------------------------- */

/* Version `seed` of an instance: its own bytes and length, and its seed as
 * InstanceNumber so a test sees whose attributes the instance record holds. */
static size_t vlen(uint32_t seed)
{
    return 2000 + seed;
}

static int vput_rc(store_t *s, const inst_t *base, uint32_t seed, uint64_t version,
                   store_policy_t policy, bool repair, store_outcome_t *out)
{
    char inum[16];
    snprintf(inum, sizeof inum, "%u", (unsigned)seed);
    inst_t in = *base;
    in.inum = inum;
    attrs_t a;
    inst_attrs(&in, &a);
    uint8_t *b = make_bytes(vlen(seed), seed);
    store_put_t p = {.partition = in.part,
                     .attrs = &a,
                     .data = b,
                     .len = vlen(seed),
                     .version = version,
                     .policy = policy};
    sp_digest(b, vlen(seed), p.digest);
    int rc = repair ? store_repair(s, &p, out) : store_put(s, &p, out);
    attrs_clear(&a);
    free(b);
    return rc;
}

static store_outcome_t vput(store_t *s, const inst_t *in, uint32_t seed, uint64_t version,
                            store_policy_t policy)
{
    store_outcome_t out = (store_outcome_t)-1;
    assert_int_equal(vput_rc(s, in, seed, version, policy, false, &out), 0);
    return out;
}

static void vdigest(uint32_t seed, uint8_t d[SP_DIGEST_LEN])
{
    uint8_t *b = make_bytes(vlen(seed), seed);
    sp_digest(b, vlen(seed), d);
    free(b);
}

/* The instance is version `seed` (bytes, digest, attributes, version). */
static void expect_version(store_t *s, const inst_t *in, uint32_t seed, uint64_t version)
{
    uint8_t *want = make_bytes(vlen(seed), seed);
    store_object_t o;
    assert_int_equal(store_get(s, in->sop, &o), 0);
    assert_int_equal(o.len, vlen(seed));
    assert_memory_equal(o.data, want, vlen(seed));
    char inum[16];
    snprintf(inum, sizeof inum, "%u", (unsigned)seed);
    assert_string_equal(attrs_str(&o.attrs, ATTR_INSTANCE_NUMBER), inum);
    assert_int_equal(o.version, version);
    store_object_free(&o);
    free(want);
}

static void test_policy_reject(void **state)
{
    fixture_t *fx = *state;
    const store_policy_t P = STORE_POLICY_REJECT;
    inst_t in = simple(7, "1.2.3", "1.2.3.1", "1.2.3.1.1");
    assert_int_equal(vput(fx->s, &in, 1, 100, P), STORE_STORED);
    assert_int_equal(vput(fx->s, &in, 1, 900, P), STORE_DUPLICATE); /* same bytes, any time */
    assert_int_equal(vput(fx->s, &in, 2, 200, P), STORE_CONFLICT);
    assert_int_equal(vput(fx->s, &in, 2, 200, P), STORE_CONFLICT); /* kept once */
    assert_int_equal(stats(fx->s).conflicts, 1);
    for (uint32_t v = 3; v <= 5; v++)
        assert_int_equal(vput(fx->s, &in, v, 100 * v, P), STORE_CONFLICT);
    store_stats_t st = stats(fx->s);
    assert_int_equal(st.conflicts, 4);
    assert_int_equal(st.conflicts_refused, 0);
    /* K = 4 kept aside: the sixth and seventh versions are refused, every time. */
    assert_int_equal(vput(fx->s, &in, 6, 600, P), STORE_CONFLICT_LIMIT);
    assert_int_equal(vput(fx->s, &in, 6, 600, P), STORE_CONFLICT_LIMIT);
    /* An earlier version would become the instance, but its predecessor
     * needs a slot: refused too. */
    assert_int_equal(vput(fx->s, &in, 7, 50, P), STORE_CONFLICT_LIMIT);
    /* A version already kept is answered as before, not refused. */
    assert_int_equal(vput(fx->s, &in, 3, 300, P), STORE_CONFLICT);
    st = stats(fx->s);
    assert_int_equal(st.conflicts, 4);
    assert_int_equal(st.conflicts_refused, 3);
    assert_int_equal(st.instances, 1);
    assert_int_equal(st.bytes, vlen(1));
    expect_version(fx->s, &in, 1, 100);

    /* Earliest wins, whatever arrives first: a later-arriving earlier
     * version swaps in and the stored one goes aside (still 0x0111). */
    inst_t two = simple(7, "1.2.3", "1.2.3.1", "1.2.3.1.2");
    assert_int_equal(vput(fx->s, &two, 11, 2000, P), STORE_STORED);
    assert_int_equal(vput(fx->s, &two, 12, 1000, P), STORE_CONFLICT);
    expect_version(fx->s, &two, 12, 1000);
    assert_int_equal(vput(fx->s, &two, 11, 2000, P), STORE_CONFLICT); /* now aside */
    st = stats(fx->s);
    assert_int_equal(st.conflicts, 5);
    assert_int_equal(st.bytes, vlen(1) + vlen(12));

    /* An unversioned put (repair, an older router) keeps today's rule. */
    store_outcome_t out;
    assert_int_equal(vput(fx->s, &two, 13, 0, STORE_POLICY_UNSET), STORE_CONFLICT);
    expect_version(fx->s, &two, 12, 1000);
    /* Version and policy come together. */
    assert_int_equal(vput_rc(fx->s, &two, 14, 5, STORE_POLICY_UNSET, false, &out), SP_EINVAL);
    assert_int_equal(vput_rc(fx->s, &two, 14, 0, P, false, &out), SP_EINVAL);
    assert_int_equal(vput_rc(fx->s, &two, 14, 5, (store_policy_t)9, false, &out), SP_EINVAL);

    reopen(fx);
    st = stats(fx->s);
    assert_int_equal(st.conflicts, 6);
    assert_int_equal(st.conflicts_refused, 0); /* since start */
    expect_version(fx->s, &in, 1, 100);
    expect_version(fx->s, &two, 12, 1000);
}

static void test_policy_keep_first(void **state)
{
    fixture_t *fx = *state;
    const store_policy_t P = STORE_POLICY_KEEP_FIRST;
    inst_t in = simple(7, "1.2.3", "1.2.3.1", "1.2.3.1.1");
    assert_int_equal(vput(fx->s, &in, 1, 100, P), STORE_STORED);
    assert_int_equal(vput(fx->s, &in, 1, 100, P), STORE_DUPLICATE);
    assert_int_equal(vput(fx->s, &in, 2, 200, P), STORE_KEPT_ASIDE);
    assert_int_equal(vput(fx->s, &in, 2, 200, P), STORE_KEPT_ASIDE); /* idempotent */
    assert_int_equal(stats(fx->s).conflicts, 1);
    expect_version(fx->s, &in, 1, 100);
    /* An earlier version swaps in; acknowledged. */
    assert_int_equal(vput(fx->s, &in, 3, 50, P), STORE_REPLACED);
    expect_version(fx->s, &in, 3, 50);
    assert_int_equal(vput(fx->s, &in, 1, 100, P), STORE_KEPT_ASIDE); /* the old one, aside */
    assert_int_equal(vput(fx->s, &in, 4, 400, P), STORE_KEPT_ASIDE);
    assert_int_equal(vput(fx->s, &in, 5, 500, P), STORE_KEPT_ASIDE);
    assert_int_equal(vput(fx->s, &in, 6, 600, P), STORE_CONFLICT_LIMIT);
    store_stats_t st = stats(fx->s);
    assert_int_equal(st.conflicts, 4);
    assert_int_equal(st.conflicts_refused, 1);
    assert_int_equal(st.bytes, vlen(3));
    expect_version(fx->s, &in, 3, 50);
}

static int first_entry(void *ctx, const store_entry_t *e)
{
    *(store_entry_t *)ctx = *e;
    return 1;
}

static void test_policy_keep_newest(void **state)
{
    fixture_t *fx = *state;
    const store_policy_t P = STORE_POLICY_KEEP_NEWEST;
    inst_t in = simple(7, "1.2.3", "1.2.3.1", "1.2.3.1.1");
    assert_int_equal(vput(fx->s, &in, 1, 100, P), STORE_STORED);
    assert_int_equal(vput(fx->s, &in, 2, 200, P), STORE_REPLACED);
    expect_version(fx->s, &in, 2, 200);
    store_stats_t st = stats(fx->s);
    assert_int_equal(st.conflicts, 1);
    assert_int_equal(st.instances, 1);
    assert_int_equal(st.bytes, vlen(2));
    /* Re-sends: the replaced one is kept already, the instance a duplicate. */
    assert_int_equal(vput(fx->s, &in, 1, 100, P), STORE_KEPT_ASIDE);
    assert_int_equal(vput(fx->s, &in, 2, 200, P), STORE_DUPLICATE);
    assert_int_equal(stats(fx->s).conflicts, 1);
    /* An older version arriving late stays aside. */
    assert_int_equal(vput(fx->s, &in, 3, 150, P), STORE_KEPT_ASIDE);
    expect_version(fx->s, &in, 2, 200);
    assert_int_equal(vput(fx->s, &in, 4, 400, P), STORE_REPLACED);
    assert_int_equal(vput(fx->s, &in, 5, 500, P), STORE_REPLACED);
    st = stats(fx->s);
    assert_int_equal(st.conflicts, 4);
    /* The next newer version would push a fifth aside: refused, nothing
     * written, the instance stays. */
    assert_int_equal(vput(fx->s, &in, 6, 600, P), STORE_CONFLICT_LIMIT);
    expect_version(fx->s, &in, 5, 500);
    st = stats(fx->s);
    assert_int_equal(st.conflicts, 4);
    assert_int_equal(st.conflicts_refused, 1);
    assert_int_equal(st.bytes, vlen(5));
    /* Listings carry the version (the healer compares them). */
    store_entry_t e;
    memset(&e, 0, sizeof e);
    assert_int_equal(store_list(fx->s, "1.2.3", NULL, NULL, 0, first_entry, &e, NULL), 0);
    assert_int_equal(e.version, 500);
    assert_int_equal(e.policy, P);
    assert_int_equal(e.size, vlen(5));

    /* A re-send of a version kept aside is a new send, later than all:
     * under keep-newest it swaps back in, and still adds no copy. */
    assert_int_equal(vput(fx->s, &in, 4, 700, P), STORE_REPLACED);
    expect_version(fx->s, &in, 4, 700);
    st = stats(fx->s);
    assert_int_equal(st.conflicts, 4);
    assert_int_equal(st.bytes, vlen(4));
    assert_int_equal(vput(fx->s, &in, 5, 800, P), STORE_REPLACED);

    /* A SOP stored without a version is older than any versioned one. */
    inst_t old = simple(7, "1.2.3", "1.2.3.1", "1.2.3.1.9");
    assert_int_equal(vput(fx->s, &old, 20, 0, STORE_POLICY_UNSET), STORE_STORED);
    assert_int_equal(vput(fx->s, &old, 21, 10, P), STORE_REPLACED);
    assert_int_equal(vput(fx->s, &old, 22, 0, STORE_POLICY_UNSET), STORE_CONFLICT);
    expect_version(fx->s, &old, 21, 10);
    /* A version under another series is kept aside, never moved. */
    inst_t moved = simple(7, "1.2.3", "1.2.3.2", "1.2.3.1.9");
    assert_int_equal(vput(fx->s, &moved, 23, 20, P), STORE_KEPT_ASIDE);
    expect_version(fx->s, &old, 21, 10);
    assert_int_equal(summaries_match_reads(fx->s), 1); /* replacements kept it current */

    reopen(fx);
    expect_version(fx->s, &in, 5, 800);
    assert_int_equal(stats(fx->s).bytes, vlen(5) + vlen(21));
}

/* Every order of arrival of the same versions ends with the same instance:
 * the latest (version, digest) under keep-newest, the earliest under reject
 * and keep-first, a tie on version broken by the digest. */
static void test_policy_order_independent(void **state)
{
    fixture_t *fx = *state;
    enum { NV = 5 };
    const uint32_t seed[NV] = {31, 32, 33, 34, 35};
    const uint64_t when[NV] = {100, 300, 300, 200, 100}; /* two ties */
    uint8_t d[NV][SP_DIGEST_LEN];
    for (int i = 0; i < NV; i++)
        vdigest(seed[i], d[i]);
    int newest = 0, oldest = 0;
    for (int i = 1; i < NV; i++) {
        if (store_version_cmp(when[i], d[i], when[newest], d[newest]) > 0)
            newest = i;
        if (store_version_cmp(when[i], d[i], when[oldest], d[oldest]) < 0)
            oldest = i;
    }
    const store_policy_t policies[] = {STORE_POLICY_KEEP_NEWEST, STORE_POLICY_REJECT,
                                       STORE_POLICY_KEEP_FIRST};
    int perm = 0;
    for (int a = 0; a < NV; a++)
        for (int b = 0; b < NV; b++)
            for (int c = 0; c < NV; c++) {
                if (a == b || b == c || a == c || (a + b + c) % 2) /* a sample of orders */
                    continue;
                int order[NV] = {a, b, c, 0, 0}, k = 3;
                for (int i = 0; i < NV; i++)
                    if (i != a && i != b && i != c)
                        order[k++] = i;
                for (size_t p = 0; p < SP_ARRAY_LEN(policies); p++) {
                    char sop[64];
                    snprintf(sop, sizeof sop, "1.2.3.1.%d.%zu", perm, p);
                    inst_t in = simple(7, "1.2.3", "1.2.3.1", sop);
                    for (int i = 0; i < NV; i++) {
                        store_outcome_t o =
                            vput(fx->s, &in, seed[order[i]], when[order[i]], policies[p]);
                        assert_int_not_equal(o, STORE_CONFLICT_LIMIT); /* NV - 1 = K */
                    }
                    int win = policies[p] == STORE_POLICY_KEEP_NEWEST ? newest : oldest;
                    expect_version(fx->s, &in, seed[win], when[win]);
                }
                perm++;
            }
    assert_true(perm >= 20);
    store_stats_t st = stats(fx->s);
    assert_int_equal(st.conflicts, (uint64_t)perm * 3 * (NV - 1));
    assert_int_equal(st.conflicts_refused, 0);
}

static store_t *open_k(const char *dir, int k)
{
    store_config_t cfg;
    store_config_defaults(&cfg);
    cfg.path = (char *)dir;
    cfg.block_cache_bytes = 8u << 20;
    cfg.write_buffer_bytes = 4u << 20;
    cfg.max_conflicts = k;
    store_t *s = NULL;
    char err[256] = "";
    assert_int_equal(store_open(&cfg, &s, err, sizeof err), 0);
    return s;
}

/* Two replicas with K = 2 that got the same four versions in different
 * orders refuse different ones and diverge; a repair with the winning
 * version (as node/healer.c sends it) converges them, going beyond K to
 * keep the version it replaces. */
static void test_keep_newest_repair_converges(void **state)
{
    fixture_t *fx = *state;
    const store_policy_t P = STORE_POLICY_KEEP_NEWEST;
    char dir_b[64] = "/tmp/test_store.XXXXXX";
    assert_non_null(mkdtemp(dir_b));
    store_close(&fx->s);
    fx->s = open_k(fx->dir, 2);
    store_t *b = open_k(dir_b, 2);
    inst_t in = simple(7, "1.2.3", "1.2.3.1", "1.2.3.1.1");
    assert_int_equal(vput(fx->s, &in, 1, 100, P), STORE_STORED);
    assert_int_equal(vput(fx->s, &in, 2, 200, P), STORE_REPLACED);
    assert_int_equal(vput(fx->s, &in, 3, 300, P), STORE_REPLACED);
    assert_int_equal(vput(fx->s, &in, 4, 400, P), STORE_CONFLICT_LIMIT);
    assert_int_equal(vput(b, &in, 4, 400, P), STORE_STORED);
    assert_int_equal(vput(b, &in, 1, 100, P), STORE_KEPT_ASIDE);
    assert_int_equal(vput(b, &in, 2, 200, P), STORE_KEPT_ASIDE);
    assert_int_equal(vput(b, &in, 3, 300, P), STORE_CONFLICT_LIMIT);
    expect_version(fx->s, &in, 3, 300);
    expect_version(b, &in, 4, 400);

    /* What the healer asks before copying: only B's copy wins. */
    uint8_t d3[SP_DIGEST_LEN], d4[SP_DIGEST_LEN];
    vdigest(3, d3);
    vdigest(4, d4);
    assert_true(store_version_wins(P, 400, d4, 300, d3));
    assert_false(store_version_wins(P, 300, d3, 400, d4));
    assert_false(store_version_wins(STORE_POLICY_UNSET, 0, d4, 300, d3));

    store_outcome_t out;
    assert_int_equal(vput_rc(fx->s, &in, 4, 400, P, true, &out), 0);
    assert_int_equal(out, STORE_REPLACED);
    expect_version(fx->s, &in, 4, 400);
    assert_int_equal(stats(fx->s).conflicts, 3); /* v1..v3: beyond K, nothing lost */
    uint8_t da[SP_DIGEST_LEN], db[SP_DIGEST_LEN];
    uint64_t na, nb, ba, bb;
    assert_int_equal(store_partition_digest(fx->s, 7, da, &na, &ba), 0);
    assert_int_equal(store_partition_digest(b, 7, db, &nb, &bb), 0);
    assert_memory_equal(da, db, SP_DIGEST_LEN);
    /* Repeating the repair changes nothing. */
    assert_int_equal(vput_rc(fx->s, &in, 4, 400, P, true, &out), 0);
    assert_int_equal(out, STORE_DUPLICATE);
    store_close(&b);
    rm_tree(dir_b);
}

/* ---- the bound under races --------------------------------------------- */

#define RACE_VERSIONS 3

typedef struct {
    store_t *s;
    int id;
    store_policy_t policy;
    store_outcome_t out[RACE_VERSIONS];
    int errors;
} race_worker_t;

static uint32_t race_seed(int id, int i)
{
    return (uint32_t)(100 + id * RACE_VERSIONS + i);
}

static void *race_versions(void *arg)
{
    race_worker_t *w = arg;
    inst_t in = simple(9, "1.2.9.3", "1.2.9.3.1",
                       w->policy == STORE_POLICY_KEEP_NEWEST ? "1.2.9.3.1.1" : "1.2.9.3.1.2");
    for (int i = 0; i < RACE_VERSIONS; i++) {
        uint32_t seed = race_seed(w->id, i);
        /* Versions interleave between threads: 1000 + 10 * seed. */
        if (vput_rc(w->s, &in, seed, 1000 + 10 * (uint64_t)seed, w->policy, false, &w->out[i]))
            w->errors++;
    }
    return NULL;
}

/* THREADS threads put RACE_VERSIONS different versions each of one SOP at
 * once: exactly one is stored, exactly K are kept aside, the rest are
 * refused with nothing written, and the instance is the extreme of the
 * versions that were accepted. */
static void test_conflict_limit_race(void **state)
{
    fixture_t *fx = *state;
    const store_policy_t policies[] = {STORE_POLICY_KEEP_NEWEST, STORE_POLICY_REJECT};
    for (size_t p = 0; p < SP_ARRAY_LEN(policies); p++) {
        pthread_t t[THREADS];
        race_worker_t w[THREADS];
        memset(w, 0, sizeof w);
        for (int i = 0; i < THREADS; i++) {
            w[i].s = fx->s;
            w[i].id = i;
            w[i].policy = policies[p];
            assert_int_equal(pthread_create(&t[i], NULL, race_versions, &w[i]), 0);
        }
        int stored = 0, kept = 0, refused = 0;
        uint32_t best = 0;
        for (int i = 0; i < THREADS; i++) {
            pthread_join(t[i], NULL);
            assert_int_equal(w[i].errors, 0);
            for (int j = 0; j < RACE_VERSIONS; j++) {
                store_outcome_t o = w[i].out[j];
                stored += o == STORE_STORED;
                kept += o == STORE_REPLACED || o == STORE_KEPT_ASIDE || o == STORE_CONFLICT;
                refused += o == STORE_CONFLICT_LIMIT;
                if (o == STORE_CONFLICT_LIMIT)
                    continue;
                /* Seeds order as versions do (1000 + 10 * seed). */
                uint32_t sd = race_seed(i, j);
                if (best == 0 || (policies[p] == STORE_POLICY_KEEP_NEWEST ? sd > best : sd < best))
                    best = sd;
            }
        }
        assert_int_equal(stored, 1);
        assert_int_equal(kept, 4);
        assert_int_equal(refused, THREADS * RACE_VERSIONS - 5);
        inst_t in = simple(9, "1.2.9.3", "1.2.9.3.1",
                           policies[p] == STORE_POLICY_KEEP_NEWEST ? "1.2.9.3.1.1" : "1.2.9.3.1.2");
        expect_version(fx->s, &in, best, 1000 + 10 * (uint64_t)best);
        /* Identical re-sends of what was kept add nothing. */
        for (int i = 0; i < THREADS; i++)
            for (int j = 0; j < RACE_VERSIONS; j++)
                if (w[i].out[j] != STORE_CONFLICT_LIMIT) {
                    store_outcome_t o = vput(fx->s, &in, race_seed(i, j),
                                             1000 + 10 * (uint64_t)race_seed(i, j), policies[p]);
                    assert_true(o == STORE_DUPLICATE || o == STORE_KEPT_ASIDE ||
                                o == STORE_CONFLICT);
                }
    }
    store_stats_t st = stats(fx->s);
    assert_int_equal(st.conflicts, 8);
    assert_int_equal(st.conflicts_refused, 2 * (THREADS * RACE_VERSIONS - 5));
    assert_int_equal(st.instances, 2);
    reopen(fx);
    assert_int_equal(stats(fx->s).conflicts, 8);
}

/* ---- instance metadata ------------------------------------------------ */

/* Appends an explicit VR little endian element header. */
static size_t el(uint8_t *p, uint16_t g, uint16_t e, const char *vr, uint32_t len)
{
    size_t n = 0;
    p[n++] = (uint8_t)g;
    p[n++] = (uint8_t)(g >> 8);
    p[n++] = (uint8_t)e;
    p[n++] = (uint8_t)(e >> 8);
    p[n++] = (uint8_t)vr[0];
    p[n++] = (uint8_t)vr[1];
    bool longvr = strcmp(vr, "OB") == 0 || strcmp(vr, "OW") == 0 || strcmp(vr, "SQ") == 0;
    if (longvr) {
        p[n++] = 0;
        p[n++] = 0;
        for (int i = 0; i < 4; i++)
            p[n++] = (uint8_t)(len >> (8 * i));
    } else {
        p[n++] = (uint8_t)len;
        p[n++] = (uint8_t)(len >> 8);
    }
    return n;
}

/* A Part-10 CT object with npix bytes of native (or, encapsulated, one
 * fragment of) Pixel Data and a trailing padding element after it; *cut
 * gets what part10_metadata must make of it (malloc'd). */
static uint8_t *ct_object(const char *sop, size_t npix, bool encapsulated, size_t *len,
                          uint8_t **cut, size_t *cutlen)
{
    size_t cap = npix + 1024;
    uint8_t *ds = calloc(1, cap), *want = calloc(1, 1024);
    size_t n = 0, w = 0;
    size_t ul = strlen(sop) + (strlen(sop) % 2);
    n += el(ds + n, 0x0008, 0x0016, "UI", 26);
    memcpy(ds + n, CT_IMAGE "\0", 26);
    n += 26;
    n += el(ds + n, 0x0008, 0x0018, "UI", (uint32_t)ul);
    memset(ds + n, 0, ul);
    memcpy(ds + n, sop, strlen(sop));
    n += ul;
    n += el(ds + n, 0x0010, 0x0010, "PN", 10);
    memcpy(ds + n, "Smith^John", 10);
    n += 10;
    memcpy(want, ds, n);
    w = n;
    w += el(want + w, 0x7FE0, 0x0010, encapsulated ? "OB" : "OW", encapsulated ? 0xFFFFFFFFu : 0);
    if (encapsulated) {
        const uint8_t empty[16] = {0xFE, 0xFF, 0x00, 0xE0, 0, 0, 0, 0,
                                   0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0};
        memcpy(want + w, empty, 16);
        w += 16;
    }
    uint8_t *pix = make_bytes(npix, 77);
    if (!encapsulated) {
        n += el(ds + n, 0x7FE0, 0x0010, "OW", (uint32_t)npix);
    } else {
        n += el(ds + n, 0x7FE0, 0x0010, "OB", 0xFFFFFFFFu);
        const uint8_t items[] = {0xFE, 0xFF, 0x00, 0xE0, 0, 0, 0, 0}; /* empty offset table */
        memcpy(ds + n, items, 8);
        n += 8;
        uint8_t frag[8] = {0xFE, 0xFF, 0x00, 0xE0};
        for (int i = 0; i < 4; i++)
            frag[4 + i] = (uint8_t)(npix >> (8 * i));
        memcpy(ds + n, frag, 8);
        n += 8;
    }
    memcpy(ds + n, pix, npix);
    n += npix;
    if (encapsulated) {
        const uint8_t end[] = {0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0};
        memcpy(ds + n, end, 8);
        n += 8;
    }
    size_t t = el(ds + n, 0xFFFC, 0xFFFC, "OB", 4);
    memcpy(ds + n + t, "\0\0\0\0", 4);
    memcpy(want + w, ds + n, t + 4);
    n += t + 4;
    w += t + 4;
    free(pix);
    uint8_t *obj = NULL, *wobj = NULL;
    const char *ts = encapsulated ? "1.2.840.10008.1.2.4.50" : EXPLICIT_LE;
    assert_int_equal(part10_make(ds, n, CT_IMAGE, sop, ts, &obj, len), 0);
    assert_int_equal(part10_make(want, w, CT_IMAGE, sop, ts, &wobj, cutlen), 0);
    *cut = wobj;
    free(ds);
    free(want);
    return obj;
}

static int put_object(store_t *s, const inst_t *in, const uint8_t *obj, size_t len, bool repair)
{
    attrs_t a;
    inst_attrs(in, &a);
    store_put_t p = {.partition = in->part, .attrs = &a, .data = obj, .len = len};
    sp_digest(obj, len, p.digest);
    store_outcome_t out;
    int rc = repair ? store_repair(s, &p, &out) : store_put(s, &p, &out);
    attrs_clear(&a);
    assert_int_equal(out, STORE_STORED);
    return rc;
}

static void check_metadata(store_t *s, const char *sop, const uint8_t *want, size_t wlen)
{
    store_object_t m;
    assert_int_equal(store_metadata(s, sop, &m), 0);
    assert_int_equal(m.len, wlen);
    assert_memory_equal(m.data, want, wlen);
    assert_string_equal(attrs_str(&m.attrs, ATTR_SOP_INSTANCE_UID), sop);
    store_object_free(&m);
}

static void test_metadata_kept_with_object(void **state)
{
    fixture_t *fx = *state;
    inst_t a = simple(9, "1.9", "1.9.1", "1.9.1.1"), b = simple(9, "1.9", "1.9.1", "1.9.1.2");
    inst_t c = simple(9, "1.9", "1.9.1", "1.9.1.3");
    size_t alen, blen, acut, bcut;
    uint8_t *awant, *bwant;
    uint8_t *aobj = ct_object(a.sop, 300000, false, &alen, &awant, &acut);
    uint8_t *bobj = ct_object(b.sop, 50001, true, &blen, &bwant, &bcut);
    assert_int_equal(put_object(fx->s, &a, aobj, alen, false), 0);
    assert_int_equal(put_object(fx->s, &b, bobj, blen, false), 0);
    put_ok(fx->s, &c, 5000, 5);            /* not Part-10: the object is its own metadata */
    assert_true(acut < 600 && bcut < 600); /* the Part-10 header and three elements */
    check_metadata(fx->s, a.sop, awant, acut);
    check_metadata(fx->s, b.sop, bwant, bcut);
    /* Served without reading a single object byte. */
    assert_int_equal(stats(fx->s).object_bytes_read, 0);
    reopen(fx);
    check_metadata(fx->s, a.sop, awant, acut);
    check_metadata(fx->s, b.sop, bwant, bcut);
    assert_int_equal(stats(fx->s).object_bytes_read, 0);
    uint8_t *cdata = make_bytes(5000, 5);
    check_metadata(fx->s, c.sop, cdata, 5000);
    assert_int_equal(stats(fx->s).object_bytes_read, 5000);
    assert_int_equal(stats(fx->s).metadata_rebuilt, 0);
    /* The stored objects stay bit-exact. */
    store_object_t o;
    assert_int_equal(store_get(fx->s, a.sop, &o), 0);
    assert_int_equal(o.len, alen);
    assert_memory_equal(o.data, aobj, alen);
    store_object_free(&o);
    /* Deleted with the study. */
    assert_int_equal(store_delete_partition(fx->s, 9, NULL), 0);
    store_object_t m;
    assert_int_equal(store_metadata(fx->s, a.sop, &m), SP_ENOTFOUND);
    free(cdata);
    free(aobj);
    free(bobj);
    free(awant);
    free(bwant);
}

static void test_metadata_follows_repair(void **state)
{
    fixture_t *fx = *state;
    char dir2[64];
    strcpy(dir2, "/tmp/test_store.XXXXXX");
    assert_non_null(mkdtemp(dir2));
    store_t *peer = open_at(dir2);
    inst_t a = simple(11, "1.11", "1.11.1", "1.11.1.1"),
           b = simple(11, "1.11", "1.11.1", "1.11.1.2");
    size_t alen, blen, acut, bcut;
    uint8_t *awant, *bwant;
    uint8_t *aobj = ct_object(a.sop, 100000, false, &alen, &awant, &acut);
    uint8_t *bobj = ct_object(b.sop, 100000, true, &blen, &bwant, &bcut);
    assert_int_equal(put_object(fx->s, &a, aobj, alen, false), 0);
    assert_int_equal(put_object(fx->s, &b, bobj, blen, false), 0);
    /* What node/repair.c does: read the peer's object, put or repair it here. */
    store_object_t o;
    assert_int_equal(store_get(fx->s, a.sop, &o), 0);
    assert_int_equal(put_object(peer, &a, o.data, o.len, false), 0);
    store_object_free(&o);
    assert_int_equal(store_get(fx->s, b.sop, &o), 0);
    assert_int_equal(put_object(peer, &b, o.data, o.len, true), 0);
    store_object_free(&o);
    check_metadata(peer, a.sop, awant, acut);
    check_metadata(peer, b.sop, bwant, bcut);
    assert_int_equal(stats(peer).object_bytes_read, 0);
    store_close(&peer);
    rm_tree(dir2);
    free(aobj);
    free(bobj);
    free(awant);
    free(bwant);
}

/* An instance stored before 'M' records existed (its record removed behind
 * the store's back) gets its metadata rebuilt from the object once. */
static void test_metadata_rebuilt_for_old_objects(void **state)
{
    fixture_t *fx = *state;
    inst_t a = simple(12, "1.12", "1.12.1", "1.12.1.1");
    size_t alen, acut;
    uint8_t *awant;
    uint8_t *aobj = ct_object(a.sop, 200000, false, &alen, &awant, &acut);
    assert_int_equal(put_object(fx->s, &a, aobj, alen, false), 0);
    store_close(&fx->s);
    raw_db_t r;
    raw_open(&r, fx->dir);
    char key[256], *err = NULL;
    key[0] = 'M';
    size_t kn = 1 + object_key(&a, key + 1), vn = 0;
    rocksdb_readoptions_t *ro = rocksdb_readoptions_create();
    rocksdb_writeoptions_t *wo = rocksdb_writeoptions_create();
    char *v = rocksdb_get_cf(r.db, ro, raw_cf(&r, "index"), key, kn, &vn, &err);
    assert_null(err);
    assert_non_null(v); /* written with the object */
    rocksdb_free(v);
    rocksdb_delete_cf(r.db, wo, raw_cf(&r, "index"), key, kn, &err);
    assert_null(err);
    rocksdb_readoptions_destroy(ro);
    rocksdb_writeoptions_destroy(wo);
    raw_close(&r);
    fx->s = open_at(fx->dir);
    check_metadata(fx->s, a.sop, awant, acut);
    assert_int_equal(stats(fx->s).metadata_rebuilt, 1);
    assert_int_equal(stats(fx->s).object_bytes_read, alen);
    check_metadata(fx->s, a.sop, awant, acut);
    reopen(fx);
    check_metadata(fx->s, a.sop, awant, acut);
    assert_int_equal(stats(fx->s).metadata_rebuilt, 0);
    assert_int_equal(stats(fx->s).object_bytes_read, 0);
    free(aobj);
    free(awant);
}

int main(void)
{
    log_init("test_store", getenv("SP_TEST_LOG") ? LOG_DEBUG : LOG_OFF);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_put_get_bit_exact, setup, teardown),
        cmocka_unit_test_setup_teardown(test_duplicate_is_idempotent, setup, teardown),
        cmocka_unit_test_setup_teardown(test_conflict_is_kept_aside, setup, teardown),
        cmocka_unit_test_setup_teardown(test_wrong_digest_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_input_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_study_in_other_partition_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_corrupt_object_detected, setup, teardown),
        cmocka_unit_test_setup_teardown(test_corrupt_blob_file_detected, setup, teardown),
        cmocka_unit_test_setup_teardown(test_list_study_and_series, setup, teardown),
        cmocka_unit_test_setup_teardown(test_find_study_level, setup, teardown),
        cmocka_unit_test_setup_teardown(test_find_projection, setup, teardown),
        cmocka_unit_test_setup_teardown(test_find_counts_and_modalities, setup, teardown),
        cmocka_unit_test_setup_teardown(test_find_patient_level, setup, teardown),
        cmocka_unit_test_setup_teardown(test_find_series_level, setup, teardown),
        cmocka_unit_test_setup_teardown(test_find_image_level, setup, teardown),
        cmocka_unit_test_setup_teardown(test_find_index_matches_scan, setup, teardown),
        cmocka_unit_test_setup_teardown(test_find_limit_and_errors, setup, teardown),
        cmocka_unit_test_setup_teardown(test_partition_digest, setup, teardown),
        cmocka_unit_test_setup_teardown(test_partition_list_paging, setup, teardown),
        cmocka_unit_test_setup_teardown(test_list_paging, setup, teardown),
        cmocka_unit_test_setup_teardown(test_persistence_across_reopen, setup, teardown),
        cmocka_unit_test_setup_teardown(test_concurrent_puts, setup, teardown),
        cmocka_unit_test_setup_teardown(test_blob_gc_only_with_garbage, setup, teardown),
        cmocka_unit_test_setup_teardown(test_delete_partition, setup, teardown),
        cmocka_unit_test_setup_teardown(test_delete_partition_multivalued, setup, teardown),
        cmocka_unit_test_setup_teardown(test_delete_partition_during_other_puts, setup, teardown),
        cmocka_unit_test_setup_teardown(test_delete_partition_racing_puts, setup, teardown),
        cmocka_unit_test_setup_teardown(test_delete_partition_corrupt_study_record, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_partition_summaries, setup, teardown),
        cmocka_unit_test_setup_teardown(test_partition_summaries_concurrent, setup, teardown),
        cmocka_unit_test_setup_teardown(test_delete_study_if, setup, teardown),
        cmocka_unit_test_setup_teardown(test_delete_study_if_racing_puts, setup, teardown),
        cmocka_unit_test_setup_teardown(test_repair, setup, teardown),
        cmocka_unit_test_setup_teardown(test_repair_blob_file, setup, teardown),
        cmocka_unit_test_setup_teardown(test_scrub, setup, teardown),
        cmocka_unit_test_setup_teardown(test_policy_reject, setup, teardown),
        cmocka_unit_test_setup_teardown(test_policy_keep_first, setup, teardown),
        cmocka_unit_test_setup_teardown(test_policy_keep_newest, setup, teardown),
        cmocka_unit_test_setup_teardown(test_policy_order_independent, setup, teardown),
        cmocka_unit_test_setup_teardown(test_keep_newest_repair_converges, setup, teardown),
        cmocka_unit_test_setup_teardown(test_conflict_limit_race, setup, teardown),
        cmocka_unit_test_setup_teardown(test_metadata_kept_with_object, setup, teardown),
        cmocka_unit_test_setup_teardown(test_metadata_follows_repair, setup, teardown),
        cmocka_unit_test_setup_teardown(test_metadata_rebuilt_for_old_objects, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
