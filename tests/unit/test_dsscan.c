/* test_dsscan.c - the data set pre-scanner: data sets built here in every
 * syntax (flat, nested with defined and undefined lengths, encapsulated
 * pixel data, deflated), the depth limit at and past its edge, the deep
 * nesting that crashes DCMTK, every truncation, byte-at-a-time feeding
 * against one-shot, deflate bombs, and every file pydicom ships. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "dsscan.h"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#define UNDEF 0xFFFFFFFFu

/* A growable byte buffer the emitters append to. */
typedef struct {
    uint8_t *p;
    size_t n, cap;
} buf_t;

static void put(buf_t *b, const void *src, size_t n)
{
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
        assert_non_null(b->p);
    }
    if (n > 0) {
        memcpy(b->p + b->n, src, n);
    }
    b->n += n;
}

static void put16(buf_t *b, dsscan_syntax_t sx, uint16_t v)
{
    uint8_t x[2] = {(uint8_t)v, (uint8_t)(v >> 8)};
    if (sx == DSSCAN_EXPLICIT_BE) {
        x[0] = (uint8_t)(v >> 8);
        x[1] = (uint8_t)v;
    }
    put(b, x, 2);
}

static void put32(buf_t *b, dsscan_syntax_t sx, uint32_t v)
{
    if (sx == DSSCAN_EXPLICIT_BE) {
        put16(b, sx, (uint16_t)(v >> 16));
        put16(b, sx, (uint16_t)v);
    } else {
        put16(b, sx, (uint16_t)v);
        put16(b, sx, (uint16_t)(v >> 16));
    }
}

static bool long_vr(const char *vr)
{
    return strstr("OB OD OF OL OV OW SQ UC UN UR UT SV UV", vr) != NULL;
}

/* An element header in syntax sx (the deflated syntax emits explicit VR LE
 * and is compressed afterwards); len may be UNDEF. */
static void hdr(buf_t *b, dsscan_syntax_t sx, uint16_t g, uint16_t e, const char *vr, uint32_t len)
{
    put16(b, sx, g);
    put16(b, sx, e);
    if (sx == DSSCAN_IMPLICIT_LE) {
        put32(b, sx, len);
    } else if (long_vr(vr)) {
        put(b, vr, 2);
        put16(b, sx, 0);
        put32(b, sx, len);
    } else {
        put(b, vr, 2);
        put16(b, sx, (uint16_t)len);
    }
}

static void el(buf_t *b, dsscan_syntax_t sx, uint16_t g, uint16_t e, const char *vr,
               const char *value)
{
    size_t n = strlen(value);
    hdr(b, sx, g, e, vr, (uint32_t)(n + (n & 1)));
    put(b, value, n);
    if (n & 1) {
        put(b, " ", 1);
    }
}

/* Item and delimiter headers: tag and 32-bit length in the syntax's byte
 * order, no VR. */
static void tagged(buf_t *b, dsscan_syntax_t sx, uint16_t e, uint32_t len)
{
    put16(b, sx, 0xFFFE);
    put16(b, sx, e);
    put32(b, sx, len);
}
#define ITEM(b, sx, len) tagged(b, sx, 0xE000, len)
#define ITEM_END(b, sx) tagged(b, sx, 0xE00D, 0)
#define SEQ_END(b, sx) tagged(b, sx, 0xE0DD, 0)

/* depth nested sequences with undefined lengths, a leaf in the innermost
 * item. Built iteratively, like the hostile inputs it stands for. */
static void nest_undef(buf_t *b, dsscan_syntax_t sx, int depth)
{
    for (int i = 0; i < depth; i++) {
        hdr(b, sx, 0x0040, 0xA730, "SQ", UNDEF);
        ITEM(b, sx, UNDEF);
    }
    el(b, sx, 0x0010, 0x0010, "PN", "Leaf^Name");
    for (int i = 0; i < depth; i++) {
        ITEM_END(b, sx);
        SEQ_END(b, sx);
    }
}

/* depth nested sequences with defined lengths, built inside out. */
static void nest_defined(buf_t *b, dsscan_syntax_t sx, int depth)
{
    buf_t in = {0};
    el(&in, sx, 0x0010, 0x0010, "PN", "Leaf^Name");
    for (int i = 0; i < depth; i++) {
        buf_t out = {0};
        hdr(&out, sx, 0x0040, 0xA730, "SQ", (uint32_t)(in.n + 8));
        ITEM(&out, sx, (uint32_t)in.n);
        put(&out, in.p, in.n);
        free(in.p);
        in = out;
    }
    put(b, in.p, in.n);
    free(in.p);
}

/* Raw deflate, as the deflated transfer syntax stores a data set. */
static buf_t deflate_raw(const uint8_t *p, size_t n)
{
    z_stream z = {0};
    assert_int_equal(deflateInit2(&z, 9, Z_DEFLATED, -MAX_WBITS, 8, Z_DEFAULT_STRATEGY), Z_OK);
    buf_t out = {0};
    out.cap = deflateBound(&z, n) + 16;
    out.p = malloc(out.cap);
    z.next_in = (Bytef *)p;
    z.avail_in = (uInt)n;
    z.next_out = out.p;
    z.avail_out = (uInt)out.cap;
    assert_int_equal(deflate(&z, Z_FINISH), Z_STREAM_END);
    out.n = out.cap - z.avail_out;
    deflateEnd(&z);
    return out;
}

static const dsscan_syntax_t plain[] = {DSSCAN_IMPLICIT_LE, DSSCAN_EXPLICIT_LE, DSSCAN_EXPLICIT_BE};

/* Scans in chunks of `chunk` bytes (0 = whole). */
static int scan_chunked(const buf_t *b, dsscan_syntax_t sx, const dsscan_limits_t *lim,
                        size_t chunk, dsscan_stats_t *st, char *err, size_t errlen)
{
    dsscan_t *s = dsscan_new(sx, lim);
    if (chunk == 0) {
        dsscan_feed(s, b->p, b->n);
    } else {
        for (size_t i = 0; i < b->n; i += chunk) {
            dsscan_feed(s, b->p + i, b->n - i < chunk ? b->n - i : chunk);
        }
    }
    int rc = dsscan_finish(s, st, err, errlen);
    dsscan_destroy(&s);
    return rc;
}

/* Scans whole and one byte at a time, checks that both agree (code and
 * reason), and returns the code. */
static int scan_both(const buf_t *b, dsscan_syntax_t sx, const dsscan_limits_t *lim, char *err,
                     size_t errlen)
{
    char e1[256], e2[256];
    dsscan_stats_t s1, s2;
    int r1 = scan_chunked(b, sx, lim, 0, &s1, e1, sizeof e1);
    int r2 = scan_chunked(b, sx, lim, 1, &s2, e2, sizeof e2);
    if (r1 != r2 || strcmp(e1, e2) != 0) {
        print_error("whole: %d '%s', bytewise: %d '%s'\n", r1, e1, r2, e2);
    }
    assert_int_equal(r1, r2);
    assert_string_equal(e1, e2);
    if (r1 == 0) {
        assert_int_equal(s1.elements, s2.elements);
        assert_int_equal(s1.depth, s2.depth);
    }
    if (err != NULL) {
        sp_strlcpy(err, e1, errlen);
    }
    return r1;
}

/* A data set with a bit of everything: flat elements, defined and
 * undefined sequences nested three deep, an empty sequence, an empty item,
 * encapsulated pixel data in an item (an icon) and at the top. */
static void rich(buf_t *b, dsscan_syntax_t sx)
{
    el(b, sx, 0x0008, 0x0016, "UI", "1.2.840.10008.5.1.4.1.1.2");
    el(b, sx, 0x0010, 0x0010, "PN", "Doe^Jane");
    hdr(b, sx, 0x0008, 0x1140, "SQ", 0); /* empty sequence */
    hdr(b, sx, 0x0008, 0x1115, "SQ", UNDEF);
    ITEM(b, sx, UNDEF);
    el(b, sx, 0x0020, 0x000E, "UI", "1.2.3.4");
    nest_defined(b, sx, 2);
    ITEM_END(b, sx);
    ITEM(b, sx, 0); /* empty item */
    ITEM(b, sx, UNDEF);
    nest_undef(b, sx, 2);
    if (sx != DSSCAN_IMPLICIT_LE) {
        hdr(b, sx, 0x0088, 0x0200, "SQ", UNDEF); /* icon image sequence */
        ITEM(b, sx, UNDEF);
        hdr(b, sx, 0x7FE0, 0x0010, "OB", UNDEF);
        ITEM(b, sx, 0);
        ITEM(b, sx, 4);
        put(b, "\xfe\xff\x00\xe0", 4); /* fragments are bytes, not items */
        SEQ_END(b, sx);
        ITEM_END(b, sx);
        SEQ_END(b, sx);
    }
    ITEM_END(b, sx);
    SEQ_END(b, sx);
    el(b, sx, 0x0028, 0x0010, "US", "\x02");
    hdr(b, sx, 0x7FE0, 0x0010, "OB", UNDEF);
    ITEM(b, sx, 4);
    put(b, "\0\0\0\0", 4);
    ITEM(b, sx, 6);
    put(b, "\xff\xd8\xff\xd9\0\0", 6);
    SEQ_END(b, sx);
}

static void test_flat(void **state)
{
    (void)state;
    for (size_t i = 0; i < SP_ARRAY_LEN(plain); i++) {
        buf_t b = {0};
        el(&b, plain[i], 0x0008, 0x0060, "CS", "CT");
        el(&b, plain[i], 0x0010, 0x0010, "PN", "Doe^John");
        hdr(&b, plain[i], 0x0010, 0x0020, "LO", 0);
        hdr(&b, plain[i], 0x7FE0, 0x0010, "OW", 8);
        put(&b, "\xfe\xff\x00\xe0\0\0\0\0", 8); /* pixel bytes that look like an item */
        char err[256];
        assert_int_equal(scan_both(&b, plain[i], NULL, err, sizeof err), 0);
        dsscan_stats_t st;
        assert_int_equal(scan_chunked(&b, plain[i], NULL, 0, &st, NULL, 0), 0);
        assert_int_equal(st.elements, 4);
        assert_int_equal(st.depth, 0);
        assert_int_equal(st.bytes, b.n);
        free(b.p);
    }
    /* An empty data set is a data set. */
    assert_int_equal(dsscan_check(NULL, 0, DSSCAN_EXPLICIT_LE, NULL, NULL, 0), 0);
}

/* The declared end: as soon as a value's header has arrived, the scanner
 * knows how far the data set reaches at least (a receiver sizes its buffer
 * once); an undefined-length container declares nothing beyond the bytes
 * fed; it never goes backwards. */
static void test_declared_end(void **state)
{
    (void)state;
    for (size_t i = 0; i < SP_ARRAY_LEN(plain); i++) {
        buf_t b = {0};
        el(&b, plain[i], 0x0010, 0x0010, "PN", "Doe^John");
        size_t before_pixels = b.n;
        hdr(&b, plain[i], 0x7FE0, 0x0010, "OW", 1 << 20);
        size_t header_end = b.n;
        dsscan_t *s = dsscan_new(plain[i], NULL);
        assert_int_equal(dsscan_feed(s, b.p, before_pixels), 0);
        assert_int_equal(dsscan_declared_end(s), before_pixels);
        assert_int_equal(dsscan_feed(s, b.p + before_pixels, header_end - before_pixels), 0);
        assert_int_equal(dsscan_declared_end(s), header_end + (1u << 20));
        uint8_t *zero = calloc(1, 4096);
        assert_int_equal(dsscan_feed(s, zero, 4096), 0);
        assert_int_equal(dsscan_declared_end(s), header_end + (1u << 20));
        free(zero);
        dsscan_destroy(&s);
        free(b.p);

        /* encapsulated: each fragment's header declares only itself */
        buf_t e = {0};
        hdr(&e, plain[i], 0x7FE0, 0x0010, "OB", UNDEF);
        ITEM(&e, plain[i], 0);
        ITEM(&e, plain[i], 100);
        s = dsscan_new(plain[i], NULL);
        assert_int_equal(dsscan_feed(s, e.p, e.n), 0);
        assert_int_equal(dsscan_declared_end(s), e.n + 100);
        dsscan_destroy(&s);
        free(e.p);
    }
}

static void test_rich_nested(void **state)
{
    (void)state;
    for (size_t i = 0; i < SP_ARRAY_LEN(plain); i++) {
        buf_t b = {0};
        rich(&b, plain[i]);
        char err[256];
        assert_int_equal(scan_both(&b, plain[i], NULL, err, sizeof err), 0);
        dsscan_stats_t st;
        assert_int_equal(scan_chunked(&b, plain[i], NULL, 7, &st, NULL, 0), 0);
        /* The sequence at the top, then two undefined levels below its item. */
        assert_int_equal(st.depth, 3);
        free(b.p);
    }
}

/* Explicit VR UN of undefined length holds implicit VR LE items, even in a
 * big endian data set (PS3.5 6.2.2), and a defined-length UN or implicit
 * element whose value starts with an item is scanned as a sequence. */
static void test_un_and_implicit_sequences(void **state)
{
    (void)state;
    for (size_t i = 1; i < SP_ARRAY_LEN(plain); i++) {
        buf_t b = {0};
        hdr(&b, plain[i], 0x0009, 0x1010, "UN", UNDEF);
        ITEM(&b, DSSCAN_IMPLICIT_LE, UNDEF);
        nest_undef(&b, DSSCAN_IMPLICIT_LE, 3);
        ITEM_END(&b, DSSCAN_IMPLICIT_LE);
        SEQ_END(&b, DSSCAN_IMPLICIT_LE);
        buf_t in = {0};
        nest_defined(&in, DSSCAN_IMPLICIT_LE, 2);
        hdr(&b, plain[i], 0x0009, 0x1011, "UN", (uint32_t)in.n + 8);
        ITEM(&b, DSSCAN_IMPLICIT_LE, (uint32_t)in.n);
        put(&b, in.p, in.n);
        free(in.p);
        dsscan_stats_t st;
        assert_int_equal(scan_both(&b, plain[i], NULL, NULL, 0), 0);
        assert_int_equal(scan_chunked(&b, plain[i], NULL, 0, &st, NULL, 0), 0);
        assert_int_equal(st.depth, 4);
        free(b.p);
    }
    /* Implicit: a defined-length sequence nests 3 deep. */
    buf_t b = {0};
    nest_defined(&b, DSSCAN_IMPLICIT_LE, 3);
    dsscan_stats_t st;
    assert_int_equal(scan_chunked(&b, DSSCAN_IMPLICIT_LE, NULL, 0, &st, NULL, 0), 0);
    assert_int_equal(st.depth, 3);
    free(b.p);
}

static void test_depth_limit(void **state)
{
    (void)state;
    dsscan_limits_t lim = dsscan_limits_default();
    assert_int_equal(lim.max_depth, 64);
    for (size_t i = 0; i < SP_ARRAY_LEN(plain); i++) {
        for (int defined = 0; defined < 2; defined++) {
            for (int extra = 0; extra < 2; extra++) {
                buf_t b = {0};
                if (defined) {
                    nest_defined(&b, plain[i], 64 + extra);
                } else {
                    nest_undef(&b, plain[i], 64 + extra);
                }
                char err[256];
                int rc = scan_both(&b, plain[i], &lim, err, sizeof err);
                if (extra == 0) {
                    assert_int_equal(rc, 0);
                } else {
                    assert_int_equal(rc, SP_ETOOBIG);
                    /* The 65th sequence header: 64 (sequence + item) pairs in. */
                    size_t pair = plain[i] == DSSCAN_IMPLICIT_LE ? 16 : 20;
                    char want[128];
                    snprintf(want, sizeof want, "nesting depth 65 over the limit 64 at offset %zu",
                             64 * pair);
                    assert_string_equal(err, want);
                }
                free(b.p);
            }
        }
    }
    /* Another limit, and encapsulated pixel data counting as a level. */
    lim.max_depth = 3;
    buf_t b = {0};
    nest_undef(&b, DSSCAN_EXPLICIT_LE, 3);
    assert_int_equal(scan_both(&b, DSSCAN_EXPLICIT_LE, &lim, NULL, 0), 0);
    b.n = 0;
    rich(&b, DSSCAN_EXPLICIT_LE); /* depth 3 */
    assert_int_equal(scan_both(&b, DSSCAN_EXPLICIT_LE, &lim, NULL, 0), 0);
    lim.max_depth = 2;
    assert_int_equal(scan_both(&b, DSSCAN_EXPLICIT_LE, &lim, NULL, 0), SP_ETOOBIG);
    free(b.p);
}

/* The inputs that overflow DCMTK's stack are refused as soon as the 65th
 * level opens, having read only about 1.3 KB of them. */
static void test_deep_nesting_refused(void **state)
{
    (void)state;
    int depths[] = {6000, 10000};
    for (size_t d = 0; d < SP_ARRAY_LEN(depths); d++) {
        for (size_t i = 0; i < SP_ARRAY_LEN(plain); i++) {
            buf_t b = {0};
            nest_undef(&b, plain[i], depths[d]);
            char err[256];
            dsscan_stats_t st;
            assert_int_equal(scan_chunked(&b, plain[i], NULL, 0, &st, err, sizeof err), SP_ETOOBIG);
            assert_non_null(strstr(err, "nesting depth 65 over the limit 64"));
            assert_true(st.bytes < 2000);
            assert_int_equal(scan_both(&b, plain[i], NULL, NULL, 0), SP_ETOOBIG);
            free(b.p);
        }
    }
    buf_t b = {0};
    nest_undef(&b, DSSCAN_EXPLICIT_LE, 6000);
    buf_t z = deflate_raw(b.p, b.n);
    char err[256];
    assert_int_equal(dsscan_check(z.p, z.n, DSSCAN_DEFLATED_LE, NULL, err, sizeof err), SP_ETOOBIG);
    assert_non_null(strstr(err, "nesting depth 65"));
    free(z.p);
    free(b.p);
}

/* Every proper prefix of a data set that does not end at a top-level
 * element boundary is refused, identically whole and byte by byte; ASan
 * watches that none is read past its end (each prefix is its own
 * allocation). */
static void test_truncations(void **state)
{
    (void)state;
    for (size_t i = 0; i < SP_ARRAY_LEN(plain); i++) {
        buf_t b = {0};
        el(&b, plain[i], 0x0008, 0x0060, "CS", "MR");
        size_t first = b.n;
        /* The rest inside one sequence, so that no other prefix ends at a
         * top-level boundary. */
        hdr(&b, plain[i], 0x0040, 0xA730, "SQ", UNDEF);
        ITEM(&b, plain[i], UNDEF);
        rich(&b, plain[i]);
        ITEM_END(&b, plain[i]);
        SEQ_END(&b, plain[i]);
        for (size_t n = 0; n < b.n; n++) {
            uint8_t *copy = malloc(n ? n : 1);
            memcpy(copy, b.p, n);
            buf_t pre = {copy, n, n};
            char err[256];
            int rc = scan_both(&pre, plain[i], NULL, err, sizeof err);
            if (n == 0 || n == first) {
                assert_int_equal(rc, 0);
            } else {
                if (rc != SP_EINVAL) {
                    print_error("syntax %zu prefix %zu: %d\n", i, n, rc);
                }
                assert_int_equal(rc, SP_EINVAL);
                assert_true(strlen(err) > 0);
            }
            free(copy);
        }
        /* Deflated: every prefix of the compressed stream. */
        if (plain[i] == DSSCAN_EXPLICIT_LE) {
            buf_t z = deflate_raw(b.p, b.n);
            for (size_t n = 1; n < z.n; n++) {
                uint8_t *copy = malloc(n);
                memcpy(copy, z.p, n);
                buf_t pre = {copy, n, n};
                assert_int_equal(scan_both(&pre, DSSCAN_DEFLATED_LE, NULL, NULL, 0), SP_EINVAL);
                free(copy);
            }
            assert_int_equal(scan_both(&z, DSSCAN_DEFLATED_LE, NULL, NULL, 0), 0);
            free(z.p);
        }
        free(b.p);
    }
}

/* Bit flips of a valid data set: whatever the verdict, whole and byte by
 * byte agree, and nothing is read out of bounds. */
static void test_mutations_agree(void **state)
{
    (void)state;
    srand(42);
    for (size_t i = 0; i < SP_ARRAY_LEN(plain); i++) {
        buf_t b = {0};
        rich(&b, plain[i]);
        for (int round = 0; round < 2000; round++) {
            uint8_t *copy = malloc(b.n);
            memcpy(copy, b.p, b.n);
            for (int k = 0; k < 1 + round % 4; k++) {
                copy[(size_t)rand() % b.n] ^= (uint8_t)(1u << (rand() % 8));
            }
            buf_t m = {copy, b.n, b.n};
            scan_both(&m, plain[i], NULL, NULL, 0);
            free(copy);
        }
        free(b.p);
    }
}

static void test_malformed(void **state)
{
    (void)state;
    struct {
        const char *name;
        int code;
        const char *reason;
    } cases[] = {
        {"unknown VR", SP_EINVAL, "unknown VR"},
        {"item at top level", SP_EINVAL, "unexpected (FFFE,E000) at offset 0 in the data set"},
        {"delimiter in defined sequence", SP_EINVAL, "unexpected (FFFE,E0DD)"},
        {"length past its item", SP_EINVAL, "past the end of its item"},
        {"undefined UT", SP_EINVAL, "undefined length with VR UT"},
        {"element past the limit", SP_ETOOBIG, "length 4294967000 at offset 0 past the limit"},
        {"non-item in a sequence", SP_EINVAL, "unexpected (0010,0010)"},
        {"open at the end", SP_EINVAL, "data set ends inside the item opened at offset 12"},
        {"undefined fragment", SP_EINVAL, "fragment at offset 12 has undefined length"},
        {"truncated header", SP_EINVAL, "truncated element header at offset 0"},
        {"undefined OB not pixel data", SP_EINVAL, "undefined length with VR OB"},
    };
    for (size_t c = 0; c < SP_ARRAY_LEN(cases); c++) {
        dsscan_syntax_t sx = DSSCAN_EXPLICIT_LE;
        buf_t b = {0};
        switch (c) {
        case 0: hdr(&b, sx, 0x0010, 0x0010, "ZZ", 0); break;
        case 1: ITEM(&b, sx, 0); break;
        case 2:
            hdr(&b, sx, 0x0008, 0x1115, "SQ", 8);
            SEQ_END(&b, sx);
            break;
        case 3:
            hdr(&b, sx, 0x0008, 0x1115, "SQ", 8 + 10);
            ITEM(&b, sx, 10);
            el(&b, sx, 0x0010, 0x0010, "PN", "Name^Too^Long");
            break;
        case 4: hdr(&b, sx, 0x0008, 0x0070, "UT", UNDEF); break;
        case 5:
            hdr(&b, sx, 0x7FE0, 0x0010, "OW", 4294967000u);
            put(&b, "\0\0\0\0", 4);
            break;
        case 6:
            hdr(&b, sx, 0x0008, 0x1115, "SQ", UNDEF);
            el(&b, sx, 0x0010, 0x0010, "PN", "X");
            break;
        case 7:
            hdr(&b, sx, 0x0008, 0x1115, "SQ", UNDEF);
            ITEM(&b, sx, UNDEF);
            break;
        case 8:
            hdr(&b, sx, 0x7FE0, 0x0010, "OB", UNDEF);
            ITEM(&b, sx, UNDEF);
            break;
        case 9: put(&b, "\x10\x00\x10\x00PN", 6); break;
        case 10: hdr(&b, sx, 0x0009, 0x1001, "OB", UNDEF); break;
        }
        char err[256];
        int rc = scan_both(&b, sx, NULL, err, sizeof err);
        if (rc != cases[c].code || strstr(err, cases[c].reason) == NULL) {
            print_error("%s: %d '%s'\n", cases[c].name, rc, err);
        }
        assert_int_equal(rc, cases[c].code);
        assert_non_null(strstr(err, cases[c].reason));
        free(b.p);
    }
}

static void test_counts_and_bytes(void **state)
{
    (void)state;
    buf_t b = {0};
    for (int i = 0; i < 1000; i++) {
        hdr(&b, DSSCAN_EXPLICIT_LE, 0x0011, (uint16_t)(0x1000 + i), "US", 0);
    }
    dsscan_limits_t lim = dsscan_limits_default();
    lim.max_elements = 1000;
    assert_int_equal(scan_both(&b, DSSCAN_EXPLICIT_LE, &lim, NULL, 0), 0);
    lim.max_elements = 999;
    char err[256];
    assert_int_equal(scan_both(&b, DSSCAN_EXPLICIT_LE, &lim, err, sizeof err), SP_ETOOBIG);
    assert_string_equal(err, "more than 999 elements at offset 7992");
    lim = dsscan_limits_default();
    lim.max_bytes = 8000;
    assert_int_equal(scan_both(&b, DSSCAN_EXPLICIT_LE, &lim, NULL, 0), 0);
    lim.max_bytes = 7999;
    assert_int_equal(scan_both(&b, DSSCAN_EXPLICIT_LE, &lim, err, sizeof err), SP_ETOOBIG);
    /* A declared length over the limit is refused before its bytes come. */
    b.n = 0;
    hdr(&b, DSSCAN_EXPLICIT_LE, 0x7FE0, 0x0010, "OB", 1u << 20);
    assert_int_equal(scan_both(&b, DSSCAN_EXPLICIT_LE, &lim, err, sizeof err), SP_ETOOBIG);
    assert_non_null(strstr(err, "past the limit of 7999 bytes"));
    free(b.p);
}

static void test_deflated(void **state)
{
    (void)state;
    buf_t b = {0};
    rich(&b, DSSCAN_EXPLICIT_LE);
    buf_t z = deflate_raw(b.p, b.n);
    dsscan_stats_t st;
    assert_int_equal(scan_both(&z, DSSCAN_DEFLATED_LE, NULL, NULL, 0), 0);
    assert_int_equal(scan_chunked(&z, DSSCAN_DEFLATED_LE, NULL, 3, &st, NULL, 0), 0);
    assert_int_equal(st.bytes, b.n);
    assert_int_equal(st.depth, 3);
    /* A pad byte or a gzip-style trailer after the stream is allowed
     * (8 bytes), more is not. */
    put(&z, "\0\0\0\0\0\0\0\0", 8);
    assert_int_equal(scan_both(&z, DSSCAN_DEFLATED_LE, NULL, NULL, 0), 0);
    put(&z, "\0", 1);
    assert_int_equal(scan_both(&z, DSSCAN_DEFLATED_LE, NULL, NULL, 0), SP_EINVAL);
    /* Garbage is not deflate. */
    char err[256];
    assert_int_equal(dsscan_check((const uint8_t *)"\xff\xff\xff\xff", 4, DSSCAN_DEFLATED_LE, NULL,
                                  err, sizeof err),
                     SP_EINVAL);
    free(z.p);
    free(b.p);
}

/* 64 MiB of zeros in one element deflates to about 64 KB: refused by the
 * ratio early, and by the byte limit when the ratio is off. */
static void test_deflate_bomb(void **state)
{
    (void)state;
    size_t big = (size_t)64 << 20;
    buf_t b = {0};
    hdr(&b, DSSCAN_EXPLICIT_LE, 0x7FE0, 0x0010, "OB", (uint32_t)big);
    b.p = realloc(b.p, b.n + big);
    memset(b.p + b.n, 0, big);
    b.n += big;
    buf_t z = deflate_raw(b.p, b.n);
    free(b.p);
    assert_true(z.n < big / 500);
    char err[256];
    dsscan_stats_t st;
    assert_int_equal(scan_chunked(&z, DSSCAN_DEFLATED_LE, NULL, 0, &st, err, sizeof err),
                     SP_ETOOBIG);
    assert_non_null(strstr(err, "inflate ratio over 200"));
    assert_true(st.bytes < (3u << 20));
    assert_int_equal(scan_chunked(&z, DSSCAN_DEFLATED_LE, NULL, 1, &st, err, sizeof err),
                     SP_ETOOBIG);
    dsscan_limits_t lim = dsscan_limits_default();
    lim.max_inflate_ratio = 0;
    lim.max_bytes = 4u << 20;
    assert_int_equal(scan_chunked(&z, DSSCAN_DEFLATED_LE, &lim, 0, &st, err, sizeof err),
                     SP_ETOOBIG);
    assert_non_null(strstr(err, "past the limit of 4194304 bytes"));
    lim.max_bytes = 0;
    assert_int_equal(scan_chunked(&z, DSSCAN_DEFLATED_LE, &lim, 0, &st, err, sizeof err), 0);
    free(z.p);
}

/* Reads a Part-10 file (or a bare data set, as some pydicom files are)
 * and returns where its data set starts and its syntax. */
static bool load_part10(const char *path, buf_t *file, size_t *start, dsscan_syntax_t *sx)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        return false;
    }
    uint8_t tmp[65536];
    size_t n;
    while ((n = fread(tmp, 1, sizeof tmp, f)) > 0) {
        put(file, tmp, n);
    }
    fclose(f);
    const uint8_t *p = file->p;
    size_t len = file->n, pos = 0;
    if (len >= 132 && memcmp(p + 128, "DICM", 4) == 0) {
        pos = 132;
    }
    char ts[65] = "";
    bool meta = false;
    while (pos + 8 <= len && p[pos] == 0x02 && p[pos + 1] == 0x00) {
        meta = true;
        uint16_t e = (uint16_t)(p[pos + 2] | (p[pos + 3] << 8));
        bool letters =
            p[pos + 4] >= 'A' && p[pos + 4] <= 'Z' && p[pos + 5] >= 'A' && p[pos + 5] <= 'Z';
        size_t h, vlen;
        char vr[3] = {(char)p[pos + 4], (char)p[pos + 5], 0};
        if (letters && long_vr(vr)) {
            if (pos + 12 > len) {
                break;
            }
            h = 12;
            vlen = p[pos + 8] | (p[pos + 9] << 8) | ((size_t)p[pos + 10] << 16) |
                   ((size_t)p[pos + 11] << 24);
        } else if (letters) {
            h = 8;
            vlen = p[pos + 6] | (p[pos + 7] << 8);
        } else {
            h = 8;
            vlen = p[pos + 4] | (p[pos + 5] << 8) | ((size_t)p[pos + 6] << 16) |
                   ((size_t)p[pos + 7] << 24);
        }
        if (e == 0x0010 && vlen < sizeof ts && pos + h + vlen <= len) {
            memcpy(ts, p + pos + h, vlen);
            ts[vlen] = 0;
            for (size_t k = vlen; k > 0 && (ts[k - 1] == 0 || ts[k - 1] == ' '); k--) {
                ts[k - 1] = 0;
            }
        }
        if (vlen > len - pos - h) {
            pos = len;
            break;
        }
        pos += h + vlen;
    }
    *start = pos;
    if (meta && ts[0] != 0) {
        *sx = dsscan_syntax_of(ts);
    } else {
        /* No transfer syntax: guess as pydicom does, from the first VR. */
        bool letters = pos + 6 <= len && p[pos + 4] >= 'A' && p[pos + 4] <= 'Z' &&
                       p[pos + 5] >= 'A' && p[pos + 5] <= 'Z';
        bool big = pos + 2 <= len && p[pos] == 0 && p[pos + 1] != 0;
        *sx = !letters ? DSSCAN_IMPLICIT_LE : big ? DSSCAN_EXPLICIT_BE : DSSCAN_EXPLICIT_LE;
    }
    return true;
}

/* Files pydicom ships that are broken on purpose, with the reason the
 * scanner gives. */
static const char *const known_bad[] = {
    /* Cut short on purpose (pydicom's truncation tests): "element
     * (7FE0,0010) length 8192 at offset 1154 past the end of the data". */
    "MR_truncated.dcm",
    /* Likewise: "element (300A,012C) length 50 at offset 1792 past the end". */
    "rtplan_truncated.dcm",
    /* Its meta header says JPEG Baseline (explicit VR) but the data set is
     * implicit VR; pydicom warns and guesses. "unknown VR 0x1800". */
    "SC_rgb_jpeg.dcm",
    /* A bare data set that starts with a stray 0x20 byte; pydicom itself
     * reads one bogus element (0820,0500) from it. */
    "no_meta.dcm",
    NULL,
};

static bool is_known_bad(const char *name)
{
    for (size_t i = 0; known_bad[i] != NULL; i++) {
        if (strcmp(known_bad[i], name) == 0) {
            return true;
        }
    }
    return false;
}

static void test_pydicom_files(void **state)
{
    (void)state;
    const char *dirs[] = {"/usr/lib/python3/dist-packages/pydicom/data/test_files",
                          "/usr/lib/python3/dist-packages/pydicom/data/charset_files"};
    int scanned = 0, refused = 0, unexpected = 0;
    for (size_t d = 0; d < SP_ARRAY_LEN(dirs); d++) {
        DIR *dir = opendir(dirs[d]);
        if (dir == NULL) {
            continue;
        }
        struct dirent *de;
        while ((de = readdir(dir)) != NULL) {
            size_t nl = strlen(de->d_name);
            if (nl < 4 || strcmp(de->d_name + nl - 4, ".dcm") != 0) {
                continue;
            }
            char path[1024];
            snprintf(path, sizeof path, "%s/%s", dirs[d], de->d_name);
            buf_t file = {0};
            size_t start;
            dsscan_syntax_t sx;
            if (!load_part10(path, &file, &start, &sx)) {
                continue;
            }
            buf_t ds = {file.p + start, file.n - start, 0};
            char err[256];
            int rc = scan_chunked(&ds, sx, NULL, 0, NULL, err, sizeof err);
            if (ds.n < 200000) {
                assert_int_equal(scan_both(&ds, sx, NULL, NULL, 0), rc);
            }
            scanned++;
            if (rc != 0) {
                refused++;
                bool bad = is_known_bad(de->d_name);
                print_message("%s %s (syntax %d): %s\n", bad ? "refused" : "UNEXPECTED", de->d_name,
                              (int)sx, err);
                unexpected += !bad;
            } else if (is_known_bad(de->d_name)) {
                print_message("UNEXPECTED accepted %s\n", de->d_name);
                unexpected++;
            }
            free(file.p);
        }
        closedir(dir);
    }
    if (scanned == 0) {
        skip(); /* python3-pydicom not installed */
    }
    print_message("pydicom files: %d scanned, %d refused\n", scanned, refused);
    assert_int_equal(unexpected, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_flat),          cmocka_unit_test(test_declared_end),
        cmocka_unit_test(test_rich_nested),   cmocka_unit_test(test_un_and_implicit_sequences),
        cmocka_unit_test(test_depth_limit),   cmocka_unit_test(test_deep_nesting_refused),
        cmocka_unit_test(test_truncations),   cmocka_unit_test(test_mutations_agree),
        cmocka_unit_test(test_malformed),     cmocka_unit_test(test_counts_and_bytes),
        cmocka_unit_test(test_deflated),      cmocka_unit_test(test_deflate_bomb),
        cmocka_unit_test(test_pydicom_files),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
