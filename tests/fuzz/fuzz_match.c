/* fuzz_match.c - libFuzzer target for C-FIND matching (match.h).
 *
 * The first byte holds flags (case-insensitive names); the rest is split
 * at the first 0xFF byte into a key and a stored value (0xFF never occurs
 * in UTF-8, and a NUL would end the strings early, so NULs end them here
 * too, as C strings from the network would). Every kind is tried on the
 * pair with every function of the module; each string lives in its own
 * exact-size allocation so that ASan sees any over-read. */
#include "match.h"

#include "base.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char *cstr(const uint8_t *p, size_t n)
{
    char *s = malloc(n + 1);
    memcpy(s, p, n);
    s[n] = '\0';
    return s;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1) {
        return 0;
    }
    unsigned flags = data[0] & 1 ? MATCH_PN_CASE_INSENSITIVE : 0;
    const uint8_t *p = data + 1;
    size_t n = size - 1;
    const uint8_t *sep = memchr(p, 0xFF, n);
    size_t klen = sep ? (size_t)(sep - p) : n;
    char *key = cstr(p, klen);
    char *value = sep ? cstr(sep + 1, n - klen - 1) : cstr(p, 0);

    static const match_kind_t kinds[] = {MATCH_STRING, MATCH_PN,       MATCH_DATE,
                                         MATCH_TIME,   MATCH_DATETIME, MATCH_UID};
    for (size_t i = 0; i < SP_ARRAY_LEN(kinds); i++) {
        bool valid = match_key_valid(kinds[i], key) == 0;
        bool exact = match_key_is_exact(kinds[i], key);
        if (exact && !valid) {
            abort(); /* match.h: never exact for an invalid key */
        }
        bool m = match_value(kinds[i], key, value, flags);
        /* Universal keys match any non-empty value. */
        if (key[0] == '\0' && value[0] != '\0' && !m) {
            abort();
        }
        /* An exact key matches its own value. */
        if (exact && kinds[i] != MATCH_PN && !match_value(kinds[i], key, key, flags)) {
            abort();
        }
        (void)match_value(kinds[i], value, key, flags);
        (void)match_value(kinds[i], key, NULL, flags);
    }
    for (size_t cap = 1; cap <= 8; cap *= 2) {
        char *out = malloc(cap);
        size_t got = match_literal_prefix(key, out, cap);
        if (got >= cap || strlen(out) != got) {
            abort();
        }
        free(out);
    }
    char lo[9], hi[9];
    if (match_date_bounds(key, lo, hi) == 0 && (strlen(lo) > 8 || strlen(hi) > 8)) {
        abort();
    }
    char *folded = malloc(klen + 1);
    match_fold_name(key, folded);
    if (strlen(folded) != strlen(key)) {
        abort();
    }
    match_fold_name(folded, folded);
    free(folded);
    free(key);
    free(value);
    return 0;
}
