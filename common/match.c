/* match.c - C-FIND attribute matching (match.h), per PS3.4 C.2.2.2.
 *
 * Pure functions over borrowed strings: no allocation, no global state, so
 * any thread may call them. Keys come from the network, so nothing here
 * asserts on input; malformed keys and values simply fail to match, and
 * match_key_valid() is how a caller turns a bad key into SP_EINVAL.
 *
 * Decisions PS3.4 leaves to the implementation (to be stated in the
 * Conformance Statement):
 * - Times and datetimes compare on their common precision. PS3.5 6.2 says
 *   trailing null components make a TM or DT imprecise, so "1015" stands for
 *   any moment of the minute 10:15. Both sides are reduced to their digits
 *   (HHMMSSFFFFFF, or YYYYMMDDHHMMSSFFFFFF) and only the digits both have are
 *   compared. Hence a single TM key "1015" matches "1015", "101500" and
 *   "101559.999"; a key "101530" also matches a stored "1015"; the range
 *   "1000-1200" includes "115959.123" and "120059", but not "120100".
 *   Because of this a single TM/DT key is not an exact index probe.
 * - UTC offsets of DT values are accepted and ignored: datetimes compare as
 *   written. In a DT key '-' always separates a range, so only "+ZZXX"
 *   offsets can be written in keys. ShardPACS indexes no DT attribute.
 * - Stored values in the old ACR-NEMA forms "YYYY.MM.DD" and "HH:MM:SS" are
 *   understood; keys must use the PS3.5 forms.
 * - A key with several values ("CT\\MR") matches when any of its values
 *   matches any stored value, for every kind: List of UID Matching for UIDs,
 *   and the same rule for strings (e.g. ModalitiesInStudy). Date and time
 *   keys may not be lists (match_key_valid rejects them).
 * - Person names, when MATCH_PN_CASE_INSENSITIVE is set, compare after
 *   folding ASCII and Latin-1 lower-case letters to upper case, the same
 *   mapping as match_fold_name(), so folded index keys agree with matching.
 *   U+00FF and U+00DF have no Latin-1 upper case and stay as they are.
 * - '?' matches one UTF-8 code point. A byte that does not begin a
 *   well-formed UTF-8 sequence counts as one character equal only to itself,
 *   so invalid input never crashes and still matches byte for byte.
 * - An empty stored value (or an empty component of a multi-valued one)
 *   matches only a universal key. */
#include "match.h"

#include "base.h"

#include <stdint.h>
#include <string.h>

/* A borrowed piece of a NUL-terminated key or value; not itself terminated. */
typedef struct {
    const char *p;
    size_t n;
} span_t;

/* Longest digit string of a reduced date, time or datetime:
 * YYYYMMDDHHMMSS plus six fraction digits. */
#define STAMP_MAX 20

/* A DA, TM or DT value reduced to its digits, most significant first, so
 * that comparing two stamps is comparing bytes. n is its precision. */
typedef struct {
    char d[STAMP_MAX];
    size_t n;
} stamp_t;

static span_t span_of(const char *s)
{
    span_t sp = {s, s ? strlen(s) : 0};
    return sp;
}

static bool span_eq(span_t a, span_t b)
{
    return a.n == b.n && (a.n == 0 || memcmp(a.p, b.p, a.n) == 0);
}

static bool span_has(span_t s, char c)
{
    return s.n > 0 && memchr(s.p, c, s.n) != NULL;
}

/* Takes the next backslash-separated value off the front of *rest into
 * *item. Returns false once *rest is used up; "" yields one empty item. */
static bool split_next(span_t *rest, span_t *item)
{
    if (rest->p == NULL)
        return false;
    const char *sep = rest->n ? memchr(rest->p, '\\', rest->n) : NULL;
    item->p = rest->p;
    if (sep == NULL) {
        item->n = rest->n;
        rest->p = NULL;
        rest->n = 0;
    } else {
        item->n = (size_t)(sep - rest->p);
        rest->n -= item->n + 1;
        rest->p = sep + 1;
    }
    return true;
}

static bool kind_known(match_kind_t kind)
{
    return kind == MATCH_STRING || kind == MATCH_PN || kind == MATCH_DATE || kind == MATCH_TIME ||
           kind == MATCH_DATETIME || kind == MATCH_UID;
}

static bool kind_has_wildcards(match_kind_t kind)
{
    return kind == MATCH_STRING || kind == MATCH_PN;
}

/* Universal Matching (C.2.2.2.3): an empty key, or "*". For the kinds with
 * wildcards any run of '*' alone is equivalent, so it is universal too. */
static bool key_is_universal(match_kind_t kind, const char *key)
{
    if (key == NULL || key[0] == '\0' || strcmp(key, "*") == 0)
        return true;
    if (!kind_has_wildcards(kind))
        return false;
    return key[strspn(key, "*")] == '\0';
}

/* ---- UTF-8 ---------------------------------------------------------- */

/* Code points given to bytes that do not start a well-formed sequence: above
 * U+10FFFF, so they equal only the same invalid byte. */
#define CP_INVALID_BASE 0x110000u

/* Returns the length of the sequence a lead byte announces (0 when b cannot
 * start one) and, in *min, the smallest code point allowed that length:
 * anything smaller would be an overlong form. */
static size_t utf8_lead(unsigned char b, uint32_t *min)
{
    static const struct {
        unsigned char first, last;
        size_t len;
        uint32_t min;
    } leads[] = {
        {0x00, 0x7F, 1, 0},
        {0xC2, 0xDF, 2, 0x80},
        {0xE0, 0xEF, 3, 0x800},
        {0xF0, 0xF4, 4, 0x10000},
    };
    for (size_t i = 0; i < SP_ARRAY_LEN(leads); i++) {
        if (b >= leads[i].first && b <= leads[i].last) {
            *min = leads[i].min;
            return leads[i].len;
        }
    }
    *min = 0;
    return 0;
}

/* Decodes the code point at s (n >= 1 bytes available) into *cp and returns
 * its length in bytes. Overlong forms, surrogates, values past U+10FFFF and
 * truncated sequences decode as one invalid byte. */
static size_t utf8_next(const char *s, size_t n, uint32_t *cp)
{
    const unsigned char *u = (const unsigned char *)s;
    uint32_t min;
    size_t len = utf8_lead(u[0], &min);
    uint32_t c = len > 1 ? u[0] & (0x7Fu >> len) : u[0];
    for (size_t i = 1; i < len; i++) {
        if (i >= n || (u[i] & 0xC0) != 0x80) {
            len = 0;
            break;
        }
        c = (c << 6) | (u[i] & 0x3Fu);
    }
    if (len == 0 || c < min || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF)) {
        *cp = CP_INVALID_BASE + u[0];
        return 1;
    }
    *cp = c;
    return len;
}

static bool utf8_valid(span_t s)
{
    size_t i = 0;
    while (i < s.n) {
        uint32_t cp;
        i += utf8_next(s.p + i, s.n - i, &cp);
        if (cp >= CP_INVALID_BASE)
            return false;
    }
    return true;
}

/* The case folding of match_fold_name() on one code point. */
static uint32_t fold_cp(uint32_t c)
{
    if ((c >= 'a' && c <= 'z') || (c >= 0xE0 && c <= 0xFE && c != 0xF7))
        return c - 0x20;
    return c;
}

/* ---- strings: single value and wild card matching -------------------- */

/* Matches one value against one key over code points, '*' and '?' being
 * wildcards when `wild` is set. This is the classic greedy glob with a
 * single backtrack point: on a mismatch only the most recent '*' absorbs one
 * more character, because any earlier '*' could only retry splits that the
 * later one already covers. That bounds the work by len(key) * len(value),
 * never exponential, whatever the key. */
static bool glob_match(span_t key, span_t val, bool wild, bool fold)
{
    size_t ki = 0, vi = 0, star_k = SIZE_MAX, star_v = 0;
    while (vi < val.n) {
        if (wild && ki < key.n && key.p[ki] == '*') {
            star_k = ++ki;
            star_v = vi;
            continue;
        }
        if (ki < key.n) {
            uint32_t kc, vc;
            size_t kl = utf8_next(key.p + ki, key.n - ki, &kc);
            size_t vl = utf8_next(val.p + vi, val.n - vi, &vc);
            bool any = wild && key.p[ki] == '?';
            if (any || kc == vc || (fold && fold_cp(kc) == fold_cp(vc))) {
                ki += kl;
                vi += vl;
                continue;
            }
        }
        if (star_k == SIZE_MAX)
            return false;
        uint32_t skipped;
        star_v += utf8_next(val.p + star_v, val.n - star_v, &skipped);
        ki = star_k;
        vi = star_v;
    }
    while (wild && ki < key.n && key.p[ki] == '*')
        ki++;
    return ki == key.n;
}

static bool match_text(match_kind_t kind, span_t key, span_t val, unsigned flags)
{
    bool fold = kind == MATCH_PN && (flags & MATCH_PN_CASE_INSENSITIVE);
    bool wild = span_has(key, '*') || span_has(key, '?');
    if (!wild && !fold)
        return span_eq(key, val);
    return glob_match(key, val, wild, fold);
}

/* ---- dates, times and datetimes -------------------------------------- */

static bool is_digit(char c)
{
    return c >= '0' && c <= '9';
}

static int two_digits(const char *d)
{
    return (d[0] - '0') * 10 + (d[1] - '0');
}

static bool leap_year(int y)
{
    return (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
}

static int days_in_month(int y, int m)
{
    static const int days[12] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    return m == 2 && leap_year(y) ? 29 : days[m - 1];
}

/* Checks the fields of YYYY[MM[DD]] (n = 4, 6 or 8 digits). */
static bool date_fields_ok(const char *d, size_t n)
{
    int y = two_digits(d) * 100 + two_digits(d + 2);
    if (n < 6)
        return true;
    int m = two_digits(d + 4);
    if (m < 1 || m > 12)
        return false;
    if (n < 8)
        return true;
    int day = two_digits(d + 6);
    return day >= 1 && day <= days_in_month(y, m);
}

/* Checks the fields of HH[MM[SS[F...]]]. Second 60 is allowed: PS3.5 keeps
 * it for leap seconds. */
static bool time_fields_ok(const char *d, size_t n)
{
    if (n >= 2 && two_digits(d) > 23)
        return false;
    if (n >= 4 && two_digits(d + 2) > 59)
        return false;
    return n < 6 || two_digits(d + 4) <= 60;
}

/* Appends the fraction digits s.p[i..] (1 to 6 of them, to the end of s) to
 * out. */
static bool take_fraction(span_t s, size_t i, stamp_t *out)
{
    size_t digits = s.n - i;
    if (digits < 1 || digits > 6)
        return false;
    for (; i < s.n; i++) {
        if (!is_digit(s.p[i]))
            return false;
        out->d[out->n++] = s.p[i];
    }
    return true;
}

/* Appends up to `max` leading digits of s to out, skipping a ':' between
 * pairs when `colons` is set (the ACR-NEMA time form). Returns the index of
 * the first character not taken. */
static size_t take_digits(span_t s, size_t max, bool colons, stamp_t *out)
{
    size_t i = 0;
    while (i < s.n && out->n < max) {
        if (is_digit(s.p[i])) {
            out->d[out->n++] = s.p[i++];
        } else if (colons && s.p[i] == ':' && out->n % 2 == 0 && out->n > 0 && i + 1 < s.n &&
                   is_digit(s.p[i + 1])) {
            i++;
        } else {
            break;
        }
    }
    return i;
}

/* DA: YYYYMMDD, or in a stored value also the ACR-NEMA "YYYY.MM.DD". */
static bool parse_date(span_t s, bool strict, stamp_t *out)
{
    out->n = 0;
    if (!strict && s.n == 10 && s.p[4] == '.' && s.p[7] == '.') {
        char compact[8];
        memcpy(compact, s.p, 4);
        memcpy(compact + 4, s.p + 5, 2);
        memcpy(compact + 6, s.p + 8, 2);
        span_t c = {compact, sizeof compact};
        return parse_date(c, true, out);
    }
    if (s.n != 8 || take_digits(s, 8, false, out) != 8)
        return false;
    return date_fields_ok(out->d, 8);
}

/* TM: HH[MM[SS[.F{1,6}]]]; a stored value may also use "HH:MM:SS". */
static bool parse_time(span_t s, bool strict, stamp_t *out)
{
    out->n = 0;
    size_t i = take_digits(s, 6, !strict, out);
    if (out->n != 2 && out->n != 4 && out->n != 6)
        return false;
    if (i < s.n && (out->n != 6 || s.p[i] != '.' || !take_fraction(s, i + 1, out)))
        return false;
    return time_fields_ok(out->d, out->n);
}

/* Strips a trailing UTC offset "&ZZXX" from a DT. '-' offsets appear only in
 * stored values: in a key '-' has already been taken as the range mark. */
static bool strip_offset(span_t *s)
{
    if (s->n < 5 || (s->p[s->n - 5] != '+' && s->p[s->n - 5] != '-'))
        return true;
    const char *z = s->p + s->n - 4;
    for (int i = 0; i < 4; i++) {
        if (!is_digit(z[i]))
            return false;
    }
    int hours = two_digits(z), minutes = two_digits(z + 2);
    if (minutes > 59 || hours > (s->p[s->n - 5] == '+' ? 14 : 12))
        return false;
    s->n -= 5;
    return true;
}

/* DT: YYYY[MM[DD[HH[MM[SS[.F{1,6}]]]]]][&ZZXX]; the offset is ignored. */
static bool parse_datetime(span_t s, stamp_t *out)
{
    out->n = 0;
    if (!strip_offset(&s))
        return false;
    size_t i = take_digits(s, 14, false, out);
    if (out->n < 4 || out->n % 2 != 0)
        return false;
    if (i < s.n && (out->n != 14 || s.p[i] != '.' || !take_fraction(s, i + 1, out)))
        return false;
    size_t date_n = out->n < 8 ? out->n : 8;
    return date_fields_ok(out->d, date_n) &&
           (out->n <= 8 || time_fields_ok(out->d + 8, out->n - 8));
}

/* Reduces a date, time or datetime to its digits. `strict` (for keys)
 * refuses the old ACR-NEMA separators that stored values may still carry. */
static bool parse_stamp(match_kind_t kind, span_t s, bool strict, stamp_t *out)
{
    switch (kind) {
    case MATCH_DATE: return parse_date(s, strict, out);
    case MATCH_TIME: return parse_time(s, strict, out);
    case MATCH_DATETIME: return parse_datetime(s, out);
    default: return false;
    }
}

/* Compares on the common precision: the digits both stamps have. */
static int stamp_cmp(const stamp_t *a, const stamp_t *b)
{
    size_t n = a->n < b->n ? a->n : b->n;
    return memcmp(a->d, b->d, n);
}

/* Splits a range "lo-hi" at its '-' (either side may be empty). Returns false
 * when there is no '-' or more than one. */
static bool split_range(span_t key, span_t *lo, span_t *hi)
{
    const char *dash = key.n ? memchr(key.p, '-', key.n) : NULL;
    if (dash == NULL)
        return false;
    lo->p = key.p;
    lo->n = (size_t)(dash - key.p);
    hi->p = dash + 1;
    hi->n = key.n - lo->n - 1;
    return !span_has(*hi, '-');
}

/* One bound of a range: an empty bound is open, an unreadable one matches
 * nothing. `sign` is the comparison result that puts v out of range. */
static bool within_bound(match_kind_t kind, span_t bound, const stamp_t *v, int sign)
{
    stamp_t b;
    if (bound.n == 0)
        return true;
    if (!parse_stamp(kind, bound, false, &b))
        return false;
    int c = stamp_cmp(v, &b);
    return sign < 0 ? c >= 0 : c <= 0;
}

/* Range Matching (C.2.2.2.5): inclusive, on the common precision. A single
 * value is the range from itself to itself, which is what makes "1015" match
 * "101530". A key that cannot be read as a date or time falls back to
 * comparing the strings, so it can still find an identical stored value. */
static bool match_temporal(match_kind_t kind, span_t key, span_t val)
{
    span_t lo = key, hi = key;
    bool range = span_has(key, '-');
    stamp_t v, k;
    if (range && !split_range(key, &lo, &hi))
        return false;
    if (!range && !parse_stamp(kind, key, false, &k))
        return span_eq(key, val);
    if (!parse_stamp(kind, val, false, &v))
        return false;
    return within_bound(kind, lo, &v, -1) && within_bound(kind, hi, &v, 1);
}

/* ---- match_value ------------------------------------------------------ */

/* Matches one key value against one stored value. */
static bool match_one(match_kind_t kind, span_t key, span_t val, unsigned flags)
{
    if (val.n == 0)
        return false;
    switch (kind) {
    case MATCH_STRING:
    case MATCH_PN: return match_text(kind, key, val, flags);
    case MATCH_DATE:
    case MATCH_TIME:
    case MATCH_DATETIME: return match_temporal(kind, key, val);
    case MATCH_UID: return span_eq(key, val);
    }
    return false;
}

bool match_value(match_kind_t kind, const char *key, const char *value, unsigned flags)
{
    if (!kind_known(kind))
        return false;
    if (key_is_universal(kind, key))
        return true;
    if (value == NULL || value[0] == '\0')
        return false;
    span_t keys = span_of(key), k;
    while (split_next(&keys, &k)) {
        span_t vals = span_of(value), v;
        while (split_next(&vals, &v)) {
            if (match_one(kind, k, v, flags))
                return true;
        }
    }
    return false;
}

/* ---- key validation --------------------------------------------------- */

/* A date or time key: one value or one range with at least one bound, each
 * bound in the strict PS3.5 form, the lower not after the upper. */
static bool temporal_key_valid(match_kind_t kind, span_t key)
{
    span_t lo, hi;
    stamp_t a, b;
    if (span_has(key, '\\'))
        return false;
    if (!span_has(key, '-'))
        return parse_stamp(kind, key, true, &a);
    if (!split_range(key, &lo, &hi) || (lo.n == 0 && hi.n == 0))
        return false;
    if (lo.n > 0 && !parse_stamp(kind, lo, true, &a))
        return false;
    if (hi.n > 0 && !parse_stamp(kind, hi, true, &b))
        return false;
    return lo.n == 0 || hi.n == 0 || stamp_cmp(&a, &b) <= 0;
}

static bool uid_list_valid(span_t key)
{
    span_t rest = key, item;
    char uid[65];
    while (split_next(&rest, &item)) {
        if (item.n == 0 || item.n >= sizeof uid)
            return false;
        memcpy(uid, item.p, item.n);
        uid[item.n] = '\0';
        if (!sp_uid_valid(uid))
            return false;
    }
    return true;
}

int match_key_valid(match_kind_t kind, const char *key)
{
    if (!kind_known(kind))
        return SP_EINVAL;
    if (key_is_universal(kind, key))
        return 0;
    span_t k = span_of(key);
    bool ok = false;
    switch (kind) {
    case MATCH_STRING:
    case MATCH_PN: ok = utf8_valid(k); break;
    case MATCH_DATE:
    case MATCH_TIME:
    case MATCH_DATETIME: ok = temporal_key_valid(kind, k); break;
    case MATCH_UID: ok = uid_list_valid(k); break;
    }
    return ok ? 0 : SP_EINVAL;
}

/* Times and datetimes are never exact: on the common precision a key
 * matches stored values longer or shorter than itself, which an index lookup
 * of the key's bytes would miss. */
bool match_key_is_exact(match_kind_t kind, const char *key)
{
    if (key_is_universal(kind, key) || match_key_valid(kind, key) != 0)
        return false;
    span_t k = span_of(key);
    if (span_has(k, '\\'))
        return false;
    switch (kind) {
    case MATCH_STRING:
    case MATCH_PN: return !span_has(k, '*') && !span_has(k, '?');
    case MATCH_DATE: return !span_has(k, '-');
    case MATCH_UID: return true;
    case MATCH_TIME:
    case MATCH_DATETIME: return false;
    }
    return false;
}

/* A list key's values have no common prefix to scan by, so it yields "".
 * A prefix cut short by out_size is backed off to a code point boundary so
 * the result stays valid UTF-8 for match_fold_name() and index keys. */
size_t match_literal_prefix(const char *key, char *out, size_t out_size)
{
    if (out == NULL || out_size == 0)
        return 0;
    out[0] = '\0';
    if (key == NULL || strchr(key, '\\') != NULL)
        return 0;
    size_t n = strcspn(key, "*?");
    if (n > out_size - 1) {
        n = out_size - 1;
        while (n > 0 && ((unsigned char)key[n] & 0xC0) == 0x80)
            n--;
    }
    memcpy(out, key, n);
    out[n] = '\0';
    return n;
}

int match_date_bounds(const char *key, char lo[9], char hi[9])
{
    if (lo == NULL || hi == NULL)
        return SP_EINVAL;
    lo[0] = hi[0] = '\0';
    if (key_is_universal(MATCH_DATE, key))
        return 0;
    if (match_key_valid(MATCH_DATE, key) != 0)
        return SP_EINVAL;
    span_t k = span_of(key), lo_s = k, hi_s = k;
    stamp_t st;
    if (span_has(k, '-'))
        split_range(k, &lo_s, &hi_s);
    if (lo_s.n > 0 && parse_date(lo_s, true, &st)) {
        memcpy(lo, st.d, 8);
        lo[8] = '\0';
    }
    if (hi_s.n > 0 && parse_date(hi_s, true, &st)) {
        memcpy(hi, st.d, 8);
        hi[8] = '\0';
    }
    return 0;
}

/* Works byte by byte on the UTF-8 form: the folded letters are exactly the
 * two-byte sequences C3 A0..C3 BE (less C3 B7, the division sign), and upper
 * case is 0x20 lower in the second byte, so the length never changes and out
 * may be the same buffer as in. */
void match_fold_name(const char *in, char *out)
{
    if (out == NULL)
        return;
    if (in == NULL) {
        out[0] = '\0';
        return;
    }
    size_t i = 0;
    for (; in[i] != '\0'; i++) {
        unsigned char b = (unsigned char)in[i], next = (unsigned char)in[i + 1];
        if (b >= 'a' && b <= 'z') {
            out[i] = (char)(b - 0x20);
        } else if (b == 0xC3 && next >= 0xA0 && next <= 0xBE && next != 0xB7) {
            out[i] = (char)b;
            out[i + 1] = (char)(next - 0x20);
            i++;
        } else {
            out[i] = (char)b;
        }
    }
    out[i] = '\0';
}
