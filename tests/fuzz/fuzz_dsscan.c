/* fuzz_dsscan.c - libFuzzer target for the data set pre-scanner.
 *
 * The first byte picks the syntax (0-3 as dsscan_syntax_t; 4 deflates the
 * rest here first, so that the scanner behind the inflater is explored
 * too) and the second a chunk size. The rest is scanned one-shot, in those
 * chunks, and (when short) one byte at a time: the three verdicts and
 * reasons must agree. The depth limit is small so that it is often hit;
 * the inflate ratio check is off because where it trips may depend on the
 * split (dsscan.h says so); the byte limit stands in for it. */
#include "dsscan.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int scan(const uint8_t *p, size_t n, dsscan_syntax_t sx, const dsscan_limits_t *lim,
                size_t chunk, char *err, size_t errlen)
{
    dsscan_t *s = dsscan_new(sx, lim);
    for (size_t i = 0; i < n; i += chunk) {
        dsscan_feed(s, p + i, n - i < chunk ? n - i : chunk);
    }
    dsscan_stats_t st;
    int rc = dsscan_finish(s, &st, err, errlen);
    if (rc == 0 && st.depth > lim->max_depth) {
        abort(); /* accepted deeper than allowed */
    }
    dsscan_destroy(&s);
    return rc;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2) {
        return 0;
    }
    unsigned mode = data[0] % 5;
    size_t chunk = (size_t)data[1] + 1;
    const uint8_t *p = data + 2;
    size_t n = size - 2;
    uint8_t *packed = NULL;
    dsscan_syntax_t sx = (dsscan_syntax_t)(mode < 4 ? mode : DSSCAN_DEFLATED_LE);
    if (mode == 4) {
        uLongf cap = compressBound(n) + 64;
        packed = malloc(cap);
        z_stream z = {0};
        if (deflateInit2(&z, 6, Z_DEFLATED, -MAX_WBITS, 8, Z_DEFAULT_STRATEGY) != Z_OK) {
            abort();
        }
        z.next_in = (Bytef *)p;
        z.avail_in = (uInt)n;
        z.next_out = packed;
        z.avail_out = (uInt)cap;
        if (deflate(&z, Z_FINISH) != Z_STREAM_END) {
            abort();
        }
        n = cap - z.avail_out;
        deflateEnd(&z);
        p = packed;
    }
    dsscan_limits_t lim = dsscan_limits_default();
    lim.max_depth = 16;
    lim.max_elements = 100000;
    lim.max_bytes = 1u << 20;
    lim.max_inflate_ratio = 0;

    char e1[256], e2[256], e3[256];
    int r1 = dsscan_check(p, n, sx, &lim, e1, sizeof e1);
    int r2 = scan(p, n, sx, &lim, chunk, e2, sizeof e2);
    if (r1 != r2 || strcmp(e1, e2) != 0) {
        fprintf(stderr, "one-shot %d '%s' != chunks of %zu: %d '%s'\n", r1, e1, chunk, r2, e2);
        abort();
    }
    if (n <= 4096) {
        int r3 = scan(p, n, sx, &lim, 1, e3, sizeof e3);
        if (r1 != r3 || strcmp(e1, e3) != 0) {
            fprintf(stderr, "one-shot %d '%s' != bytewise %d '%s'\n", r1, e1, r3, e3);
            abort();
        }
    }
    if (r1 != 0 && r1 != SP_EINVAL && r1 != SP_ETOOBIG) {
        abort();
    }
    free(packed);
    return 0;
}
