/* test_part10.c - the Part-10 framing of stored instances is bit-exact: what
 * part10_make() wraps, part10_split() hands back byte for byte, for data
 * sets of any size and transfer syntax; a file written by DCMTK splits where
 * DCMTK put its data set; and every truncated or garbled meta header is
 * refused without reading outside the buffer (each case is copied into a
 * buffer of exactly its length, so a sanitizer build catches any overread). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "base.h"
#include "part10.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

static const char *const k_ts[] = {
    "1.2.840.10008.1.2",      /* implicit VR little endian (odd length) */
    "1.2.840.10008.1.2.1",    /* explicit VR little endian */
    "1.2.840.10008.1.2.2",    /* explicit VR big endian */
    "1.2.840.10008.1.2.1.99", /* deflated (even length) */
    "1.2.840.10008.1.2.4.50", /* JPEG baseline */
    "1.2.840.10008.1.2.4.90", /* JPEG 2000 lossless */
    "1.2.840.10008.1.2.5",    /* RLE */
};

/* A Part-10 file written by DCMTK 3.6.7 (dump2dcm +te) after its 128-byte
 * zero preamble: "DICM", a meta group of 0x9a bytes (implementation
 * OFFIS_DCMTK_367), then a 98-byte explicit VR little endian data set. */
static const uint8_t k_dcmtk_tail[] = {
    0x44, 0x49, 0x43, 0x4d, 0x02, 0x00, 0x00, 0x00, 0x55, 0x4c, 0x04, 0x00, 0x9a, 0x00, 0x00, 0x00,
    0x02, 0x00, 0x01, 0x00, 0x4f, 0x42, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x01, 0x02, 0x00,
    0x02, 0x00, 0x55, 0x49, 0x1a, 0x00, 0x31, 0x2e, 0x32, 0x2e, 0x38, 0x34, 0x30, 0x2e, 0x31, 0x30,
    0x30, 0x30, 0x38, 0x2e, 0x35, 0x2e, 0x31, 0x2e, 0x34, 0x2e, 0x31, 0x2e, 0x31, 0x2e, 0x37, 0x00,
    0x02, 0x00, 0x03, 0x00, 0x55, 0x49, 0x0a, 0x00, 0x31, 0x2e, 0x32, 0x2e, 0x33, 0x2e, 0x34, 0x2e,
    0x35, 0x00, 0x02, 0x00, 0x10, 0x00, 0x55, 0x49, 0x14, 0x00, 0x31, 0x2e, 0x32, 0x2e, 0x38, 0x34,
    0x30, 0x2e, 0x31, 0x30, 0x30, 0x30, 0x38, 0x2e, 0x31, 0x2e, 0x32, 0x2e, 0x31, 0x00, 0x02, 0x00,
    0x12, 0x00, 0x55, 0x49, 0x1c, 0x00, 0x31, 0x2e, 0x32, 0x2e, 0x32, 0x37, 0x36, 0x2e, 0x30, 0x2e,
    0x37, 0x32, 0x33, 0x30, 0x30, 0x31, 0x30, 0x2e, 0x33, 0x2e, 0x30, 0x2e, 0x33, 0x2e, 0x36, 0x2e,
    0x37, 0x00, 0x02, 0x00, 0x13, 0x00, 0x53, 0x48, 0x10, 0x00, 0x4f, 0x46, 0x46, 0x49, 0x53, 0x5f,
    0x44, 0x43, 0x4d, 0x54, 0x4b, 0x5f, 0x33, 0x36, 0x37, 0x20, 0x08, 0x00, 0x16, 0x00, 0x55, 0x49,
    0x1a, 0x00, 0x31, 0x2e, 0x32, 0x2e, 0x38, 0x34, 0x30, 0x2e, 0x31, 0x30, 0x30, 0x30, 0x38, 0x2e,
    0x35, 0x2e, 0x31, 0x2e, 0x34, 0x2e, 0x31, 0x2e, 0x31, 0x2e, 0x37, 0x00, 0x08, 0x00, 0x18, 0x00,
    0x55, 0x49, 0x0a, 0x00, 0x31, 0x2e, 0x32, 0x2e, 0x33, 0x2e, 0x34, 0x2e, 0x35, 0x00, 0x10, 0x00,
    0x10, 0x00, 0x50, 0x4e, 0x08, 0x00, 0x44, 0x6f, 0x65, 0x5e, 0x4a, 0x61, 0x6e, 0x65, 0x20, 0x00,
    0x0d, 0x00, 0x55, 0x49, 0x06, 0x00, 0x31, 0x2e, 0x32, 0x2e, 0x33, 0x00, 0x20, 0x00, 0x0e, 0x00,
    0x55, 0x49, 0x08, 0x00, 0x31, 0x2e, 0x32, 0x2e, 0x33, 0x2e, 0x34, 0x00,
};
#define DCMTK_META_END (132 + 12 + 0x9a)

/* Deterministic bytes; the data set deliberately starts like a group 0002
 * element, which a parser that ignored the group length would swallow. */
static uint8_t *make_dataset(size_t len, uint32_t seed)
{
    uint8_t *d = malloc(len ? len : 1);
    for (size_t i = 0; i < len; i++) {
        seed = seed * 1103515245u + 12345u;
        d[i] = (uint8_t)(seed >> 16);
    }
    static const uint8_t fake[] = {0x02, 0x00, 0x10, 0x00, 'U', 'I', 0x02, 0x00, '1', 0};
    memcpy(d, fake, len < sizeof fake ? len : sizeof fake);
    return d;
}

static uint8_t *dcmtk_file(size_t *len)
{
    *len = 128 + sizeof k_dcmtk_tail;
    uint8_t *f = calloc(1, *len);
    memcpy(f + 128, k_dcmtk_tail, sizeof k_dcmtk_tail);
    return f;
}

/* Splits an exact-size copy of the first len bytes of p. */
static int split_prefix(const uint8_t *p, size_t len, part10_meta_t *meta)
{
    uint8_t *copy = malloc(len ? len : 1);
    if (len)
        memcpy(copy, p, len);
    int rc = part10_split(copy, len, meta);
    free(copy);
    return rc;
}

static void test_round_trip(void **state)
{
    (void)state;
    static const size_t sizes[] = {0,   1,   2,   3,    7,     8,     9,     127,
                                   128, 255, 256, 4097, 65535, 65536, 65537, 1u << 20};
    static const char *const classes[] = {"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.7"};
    static const char *const instances[] = {"1.2.3", "1.2.3.4", "2.25.1",
                                            "1.2.826.0.1.3680043.8.498.12345678901234567890123"
                                            "456789012345"};
    for (size_t s = 0; s < SP_ARRAY_LEN(sizes); s++) {
        for (size_t t = 0; t < SP_ARRAY_LEN(k_ts); t++) {
            const char *cls = classes[(s + t) % SP_ARRAY_LEN(classes)];
            const char *inst = instances[(s * 3 + t) % SP_ARRAY_LEN(instances)];
            uint8_t *ds = make_dataset(sizes[s], (uint32_t)(s * 31 + t));
            uint8_t *p10 = NULL;
            size_t len = 0;
            assert_int_equal(part10_make(ds, sizes[s], cls, inst, k_ts[t], &p10, &len), 0);
            for (size_t i = 0; i < 128; i++)
                assert_int_equal(p10[i], 0);
            assert_memory_equal(p10 + 128, "DICM", 4);
            part10_meta_t m;
            assert_int_equal(split_prefix(p10, len, &m), 0);
            assert_int_equal(m.dataset_offset + sizes[s], len);
            assert_int_equal(m.dataset_offset % 2, 0);
            assert_string_equal(m.ts, k_ts[t]);
            assert_string_equal(m.sop_class, cls);
            assert_string_equal(m.sop_instance, inst);
            if (sizes[s])
                assert_memory_equal(p10 + m.dataset_offset, ds, sizes[s]);
            free(p10);
            free(ds);
        }
    }
}

/* A UID with a NUL or a space inside would read back as another, shorter
 * UID: refused (found by fuzz_part10; its input is in tests/fuzz/regress). */
static void test_uid_characters(void **state)
{
    (void)state;
    static const char *const bad[] = {"1 .2", "1\0.2", "1.2a", "1,2"};
    for (size_t i = 0; i < SP_ARRAY_LEN(bad); i++) {
        uint8_t *p10 = NULL;
        size_t len = 0;
        assert_int_equal(part10_make((const uint8_t *)"\x08\x00", 2, "1.2.3", "1.2.3.4",
                                     "1.2.840.10008.1.2", &p10, &len),
                         0);
        /* overwrite the transfer syntax value ("1.2.840.10008.1.2" + NUL) */
        uint8_t *ts = NULL;
        for (size_t k = 0; k + 17 <= len && ts == NULL; k++)
            if (memcmp(p10 + k, "1.2.840.10008.1.2", 17) == 0)
                ts = p10 + k;
        assert_non_null(ts);
        memset(ts, '1', 17);
        memcpy(ts, bad[i], 4);
        part10_meta_t m;
        assert_int_equal(split_prefix(p10, len, &m), SP_EINVAL);
        free(p10);
    }
}

/* Framing in place writes exactly the bytes part10_make() would, right
 * before the data set, and refuses a header that does not fit. */
static void test_frame_in_place(void **state)
{
    (void)state;
    const char *cls = "1.2.840.10008.5.1.4.1.1.2";
    const char *inst = "1.2.826.0.1.3680043.8.498.12345678901234567890123456789012345";
    const char *uid64 = "1.2.826.0.1.3680043.8.498.12345678901234567890123456789012345678";
    for (size_t t = 0; t < SP_ARRAY_LEN(k_ts); t++) {
        size_t n = 4097 + t;
        uint8_t *ds = make_dataset(n, (uint32_t)t);
        uint8_t *want = NULL;
        size_t want_len = 0;
        assert_int_equal(part10_make(ds, n, cls, inst, k_ts[t], &want, &want_len), 0);
        uint8_t *buf = malloc(PART10_HEADER_MAX + n);
        memset(buf, 0xAB, PART10_HEADER_MAX);
        memcpy(buf + PART10_HEADER_MAX, ds, n);
        uint8_t *start = NULL;
        assert_int_equal(part10_frame_in_place(buf + PART10_HEADER_MAX, PART10_HEADER_MAX, cls,
                                               inst, k_ts[t], &start),
                         0);
        assert_int_equal(buf + PART10_HEADER_MAX - start + n, want_len);
        assert_memory_equal(start, want, want_len);
        /* a headroom one byte short is refused and nothing is written */
        size_t head = want_len - n;
        memset(buf, 0xAB, PART10_HEADER_MAX);
        assert_int_equal(
            part10_frame_in_place(buf + PART10_HEADER_MAX, head - 1, cls, inst, k_ts[t], &start),
            SP_EINVAL);
        for (size_t i = 0; i < PART10_HEADER_MAX; i++)
            assert_int_equal(buf[i], 0xAB);
        free(buf);
        free(want);
        free(ds);
    }
    /* the largest header (three 64-character UIDs) fits PART10_HEADER_MAX */
    uint8_t *buf = malloc(PART10_HEADER_MAX + 2);
    uint8_t *start = NULL;
    assert_int_equal(part10_frame_in_place(buf + PART10_HEADER_MAX, PART10_HEADER_MAX, uid64, uid64,
                                           uid64, &start),
                     0);
    assert_true(start >= buf);
    free(buf);
}

/* Our own meta group, byte for byte: it lives on the nodes for years, and
 * the group length must count exactly the elements after it. */
static void test_meta_layout(void **state)
{
    (void)state;
    uint8_t ds[4] = {0x08, 0x00, 0x05, 0x00};
    uint8_t *p10 = NULL;
    size_t len = 0;
    assert_int_equal(part10_make(ds, sizeof ds, "1.2.840.10008.5.1.4.1.1.7", "1.2.3.4.5",
                                 "1.2.840.10008.1.2.1", &p10, &len),
                     0);
    static const uint8_t head[] = {
        'D',  'I',  'C',  'M',  0x02, 0x00, 0x00, 0x00, 'U',  'L',  0x04,
        0x00, 0xa8, 0x00, 0x00, 0x00, /* group length */
        0x02, 0x00, 0x01, 0x00, 'O',  'B',  0x00, 0x00, 0x02, 0x00, 0x00,
        0x00, 0x00, 0x01, 0x02, 0x00, 0x02, 0x00, 'U',  'I',  0x1a, 0x00, /* SOP class, 26 */
    };
    assert_memory_equal(p10 + 128, head, sizeof head);
    assert_int_equal(len, 132 + 12 + 0xa8 + sizeof ds);
    /* the SH version name is padded with a space, the UIs with NUL */
    assert_memory_equal(p10 + len - sizeof ds - 14, "SHARDPACS_010 ", 14);
    assert_memory_equal(p10 + len - sizeof ds, ds, sizeof ds);
    free(p10);
}

static void test_dcmtk_file(void **state)
{
    (void)state;
    size_t len;
    uint8_t *f = dcmtk_file(&len);
    part10_meta_t m;
    assert_int_equal(split_prefix(f, len, &m), 0);
    assert_int_equal(m.dataset_offset, DCMTK_META_END);
    assert_string_equal(m.ts, "1.2.840.10008.1.2.1");
    assert_string_equal(m.sop_class, "1.2.840.10008.5.1.4.1.1.7");
    assert_string_equal(m.sop_instance, "1.2.3.4.5");
    /* the data set starts with (0008,0016) */
    static const uint8_t first[] = {0x08, 0x00, 0x16, 0x00, 'U', 'I'};
    assert_memory_equal(f + m.dataset_offset, first, sizeof first);
    /* re-framed with our meta group, the data set comes back unchanged */
    size_t ds_len = len - m.dataset_offset;
    uint8_t *p10 = NULL;
    size_t p10_len = 0;
    assert_int_equal(part10_make(f + m.dataset_offset, ds_len, m.sop_class, m.sop_instance, m.ts,
                                 &p10, &p10_len),
                     0);
    part10_meta_t m2;
    assert_int_equal(part10_split(p10, p10_len, &m2), 0);
    assert_int_equal(p10_len - m2.dataset_offset, ds_len);
    assert_memory_equal(p10 + m2.dataset_offset, f + m.dataset_offset, ds_len);
    free(p10);
    free(f);
}

/* Every prefix that ends inside the preamble or meta group is refused; one
 * that ends inside the data set still splits at the same place (the framing
 * cannot know the data set's length; the data set parser refuses it). */
static void check_prefixes(const uint8_t *p, size_t len, size_t meta_end)
{
    for (size_t n = 0; n <= len; n++) {
        part10_meta_t m;
        int rc = split_prefix(p, n, &m);
        if (n < meta_end) {
            assert_int_equal(rc, SP_EINVAL);
        } else {
            assert_int_equal(rc, 0);
            assert_int_equal(m.dataset_offset, meta_end);
        }
    }
}

static void test_truncated_prefixes(void **state)
{
    (void)state;
    size_t len;
    uint8_t *f = dcmtk_file(&len);
    check_prefixes(f, len, DCMTK_META_END);
    free(f);
    uint8_t *ds = make_dataset(33, 7);
    uint8_t *p10 = NULL;
    assert_int_equal(part10_make(ds, 33, "1.2.3", "1.2.3.4.5.6", "1.2.840.10008.1.2", &p10, &len),
                     0);
    part10_meta_t m;
    assert_int_equal(part10_split(p10, len, &m), 0);
    check_prefixes(p10, len, m.dataset_offset);
    free(p10);
    free(ds);
}

/* Writes a little-endian 16/32-bit value. */
static void put16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}
static void put32(uint8_t *p, uint32_t v)
{
    put16(p, (uint16_t)v);
    put16(p + 2, (uint16_t)(v >> 16));
}

static void expect_refused(const uint8_t *p, size_t len)
{
    part10_meta_t m;
    assert_int_equal(split_prefix(p, len, &m), SP_EINVAL);
}

static void test_garbled(void **state)
{
    (void)state;
    size_t len;
    uint8_t *f = dcmtk_file(&len);
    uint8_t *g = malloc(len);
    const size_t gl = 132 + 8;   /* group length value */
    const size_t first = 144;    /* (0002,0001) OB */
    const size_t cls = 144 + 14; /* (0002,0002) UI */

    memcpy(g, f, len);
    g[128] = 'X'; /* not DICM */
    expect_refused(g, len);

    memcpy(g, f, len);
    g[134] = 0x01; /* first element is not (0002,0000) */
    expect_refused(g, len);

    memcpy(g, f, len);
    g[136] = 'U';
    g[137] = 'S'; /* group length with another VR */
    expect_refused(g, len);

    memcpy(g, f, len);
    put32(g + gl, (uint32_t)len); /* group length beyond the end */
    expect_refused(g, len);

    memcpy(g, f, len);
    put32(g + gl, 0xFFFFFFFFu);
    expect_refused(g, len);

    memcpy(g, f, len);
    put32(g + gl, 0x9a - 3); /* ends inside the last element */
    expect_refused(g, len);

    memcpy(g, f, len);
    put32(g + gl, 0x9a + 4); /* swallows part of the data set */
    expect_refused(g, len);

    memcpy(g, f, len);
    put32(g + gl, 0); /* an empty meta group has no transfer syntax */
    expect_refused(g, len);

    memcpy(g, f, len);
    put32(g + first + 8, 0xFFFFFFFFu); /* undefined length in the meta group */
    expect_refused(g, len);

    memcpy(g, f, len);
    put32(g + first + 8, 0x7FFFFFF0u); /* a length past the group's end */
    expect_refused(g, len);

    memcpy(g, f, len);
    put16(g + cls, 0x0008); /* an element of another group inside the meta */
    expect_refused(g, len);

    memcpy(g, f, len);
    put16(g + cls + 34 + 18 + 2, 0x0011); /* (0002,0010) renamed: no transfer syntax */
    expect_refused(g, len);
    free(g);

    /* A transfer syntax longer than a UID may be. */
    uint8_t big[132 + 12 + 8 + 66 + 4];
    memset(big, 0, sizeof big);
    memcpy(big + 128, "DICM", 4);
    memcpy(big + 132, (const uint8_t[]){0x02, 0, 0, 0, 'U', 'L', 4, 0}, 8);
    put32(big + 140, 8 + 66);
    memcpy(big + 144, (const uint8_t[]){0x02, 0, 0x10, 0, 'U', 'I', 66, 0}, 8);
    memset(big + 152, '1', 66);
    expect_refused(big, sizeof big);
    big[152 + 65] = '\0'; /* 65 characters and padding: still too long */
    expect_refused(big, sizeof big);
    big[152 + 64] = '\0'; /* 64 characters: fine */
    part10_meta_t m;
    assert_int_equal(split_prefix(big, sizeof big, &m), 0);
    assert_int_equal(strlen(m.ts), 64);
    assert_int_equal(m.dataset_offset, sizeof big - 4);

    assert_int_equal(part10_split(NULL, 0, &m), SP_EINVAL);
    assert_int_equal(part10_split(f, len, NULL), SP_EINVAL);
    free(f);
}

/* Flipping any single byte of the header or meta group never makes the
 * parser read out of bounds, and what it accepts stays inside the buffer. */
static void test_single_byte_corruption(void **state)
{
    (void)state;
    size_t len;
    uint8_t *f = dcmtk_file(&len);
    static const uint8_t values[] = {0x00, 0x01, 0x02, 0x7f, 0x80, 0xfe, 0xff, 'O', 'U'};
    for (size_t at = 128; at < DCMTK_META_END; at++) {
        for (size_t v = 0; v < SP_ARRAY_LEN(values); v++) {
            uint8_t *g = malloc(len);
            memcpy(g, f, len);
            g[at] = values[v];
            part10_meta_t m;
            if (part10_split(g, len, &m) == 0) {
                assert_true(m.dataset_offset <= len);
                assert_true(m.ts[0] != '\0');
            }
            free(g);
        }
    }
    free(f);
}

static void test_make_refuses(void **state)
{
    (void)state;
    uint8_t *out = NULL;
    size_t len = 0;
    char long_uid[66];
    memset(long_uid, '1', 65);
    long_uid[65] = '\0';
    uint8_t ds[2] = {0, 0};
    assert_int_equal(part10_make(ds, 2, long_uid, "1.2", "1.2.840.10008.1.2", &out, &len),
                     SP_EINVAL);
    assert_int_equal(part10_make(ds, 2, "1.2", long_uid, "1.2.840.10008.1.2", &out, &len),
                     SP_EINVAL);
    assert_int_equal(part10_make(ds, 2, "1.2", "1.2", long_uid, &out, &len), SP_EINVAL);
    assert_int_equal(part10_make(NULL, 2, "1.2", "1.2", "1.2.840.10008.1.2", &out, &len),
                     SP_EINVAL);
    assert_int_equal(part10_make(ds, 2, NULL, "1.2", "1.2.840.10008.1.2", &out, &len), SP_EINVAL);
    assert_int_equal(part10_make(ds, 2, "1.2", "1.2", "1.2.840.10008.1.2", NULL, &len), SP_EINVAL);
    assert_null(out);
    /* an empty data set is a valid object */
    assert_int_equal(part10_make(NULL, 0, "1.2", "1.2", "1.2.840.10008.1.2", &out, &len), 0);
    part10_meta_t m;
    assert_int_equal(part10_split(out, len, &m), 0);
    assert_int_equal(m.dataset_offset, len);
    free(out);
}

/* Implicit VR little endian: tag, then a 4-byte length. */
static size_t implicit_el(uint8_t *p, uint16_t g, uint16_t e, uint32_t len)
{
    const uint8_t h[8] = {(uint8_t)g,           (uint8_t)(g >> 8),   (uint8_t)e,
                          (uint8_t)(e >> 8),    (uint8_t)len,        (uint8_t)(len >> 8),
                          (uint8_t)(len >> 16), (uint8_t)(len >> 24)};
    memcpy(p, h, 8);
    return 8;
}

/* part10_metadata in implicit VR: Pixel Data of defined length keeps its
 * header with length 0, an element after it stays; a nested sequence of
 * undefined length before it (whose items hold a "Pixel Data" tag of their
 * own) is passed over, not cut; no top-level Pixel Data, a deflated data
 * set or garbage are not cut at all. */
static void test_metadata_cut(void **state)
{
    (void)state;
    uint8_t ds[4096], want[4096];
    size_t n = 0, w = 0;
    n += implicit_el(ds + n, 0x0008, 0x0018, 6);
    memcpy(ds + n, "1.2.3", 6);
    n += 6;
    /* (0008,1115) sequence, undefined length, one item holding 7FE0,0010. */
    n += implicit_el(ds + n, 0x0008, 0x1115, 0xFFFFFFFFu);
    n += implicit_el(ds + n, 0xFFFE, 0xE000, 0xFFFFFFFFu);
    n += implicit_el(ds + n, 0x7FE0, 0x0010, 4);
    memcpy(ds + n, "\1\2\3\4", 4);
    n += 4;
    n += implicit_el(ds + n, 0xFFFE, 0xE00D, 0);
    n += implicit_el(ds + n, 0xFFFE, 0xE0DD, 0);
    memcpy(want, ds, n);
    w = n;
    n += implicit_el(ds + n, 0x7FE0, 0x0010, 1000);
    memset(ds + n, 0x5A, 1000);
    n += 1000;
    w += implicit_el(want + w, 0x7FE0, 0x0010, 0);
    n += implicit_el(ds + n, 0xFFFC, 0xFFFC, 2);
    memset(ds + n, 0, 2);
    n += 2;
    memcpy(want + w, ds + n - 10, 10);
    w += 10;

    uint8_t *obj, *exp, *cut;
    size_t olen, elen, clen;
    assert_int_equal(
        part10_make(ds, n, "1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2", &obj, &olen),
        0);
    assert_int_equal(part10_make(want, w, "1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2",
                                 &exp, &elen),
                     0);
    assert_int_equal(part10_metadata(obj, olen, &cut, &clen), 0);
    assert_int_equal(clen, elen);
    assert_memory_equal(cut, exp, elen);
    free(cut);
    free(obj);

    /* Without its top-level Pixel Data: nothing to cut. */
    assert_int_equal(part10_metadata(exp, elen - 18, &cut, &clen), SP_ENOTFOUND);
    assert_null(cut);
    free(exp);
    assert_int_equal(part10_make(want, 14, "1.2.840.10008.5.1.4.1.1.2", "1.2.3",
                                 "1.2.840.10008.1.2", &exp, &elen),
                     0);
    assert_int_equal(part10_metadata(exp, elen, &cut, &clen), SP_ENOTFOUND);
    free(exp);
    /* Deflated: the scanner's offsets are not the stored bytes'. */
    assert_int_equal(part10_make(ds, n, "1.2.840.10008.5.1.4.1.1.2", "1.2.3",
                                 "1.2.840.10008.1.2.1.99", &obj, &olen),
                     0);
    assert_int_equal(part10_metadata(obj, olen, &cut, &clen), SP_ENOTFOUND);
    free(obj);
    const uint8_t junk[200] = {1, 2, 3};
    assert_int_equal(part10_metadata(junk, sizeof junk, &cut, &clen), SP_EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip),     cmocka_unit_test(test_meta_layout),
        cmocka_unit_test(test_dcmtk_file),     cmocka_unit_test(test_truncated_prefixes),
        cmocka_unit_test(test_garbled),        cmocka_unit_test(test_single_byte_corruption),
        cmocka_unit_test(test_make_refuses),   cmocka_unit_test(test_frame_in_place),
        cmocka_unit_test(test_uid_characters), cmocka_unit_test(test_metadata_cut),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
