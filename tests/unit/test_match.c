/* test_match.c - unit tests of C-FIND attribute matching (common/match.c).
 *
 * Most cases are rows of tables, one table per function, so a new rule is one
 * more line. Every failing row is printed before the test fails, so one run
 * shows all of them. Single process, no I/O. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include "base.h"
#include "match.h"

#include <stdio.h>
#include <string.h>

#define CI MATCH_PN_CASE_INSENSITIVE

typedef struct {
    match_kind_t kind;
    const char *key;
    const char *value;
    unsigned flags;
    bool expected;
} match_row_t;

/* UTF-8 spelled out so the source file's own encoding cannot change a test. */
#define U_UML "\xC3\xBC"        /* U+00FC u with diaeresis */
#define U_UML_UP "\xC3\x9C"     /* U+00DC */
#define Y_UML "\xC3\xBF"        /* U+00FF, no Latin-1 upper case */
#define Y_UML_UP "\xC5\xB8"     /* U+0178 */
#define SZLIG "\xC3\x9F"        /* U+00DF */
#define DIVIDE "\xC3\xB7"       /* U+00F7 */
#define TIMES "\xC3\x97"        /* U+00D7 */
#define NICHI "\xE6\x97\xA5"    /* U+65E5, three bytes */
#define GRIN "\xF0\x9F\x98\x80" /* U+1F600, four bytes */

static const match_row_t match_rows[] = {
    /* Universal matching: "", "*" and (for strings) any run of '*'. */
    {MATCH_STRING, "", "CT", 0, true},
    {MATCH_STRING, "", "", 0, true},
    {MATCH_STRING, "", NULL, 0, true},
    {MATCH_STRING, NULL, NULL, 0, true},
    {MATCH_STRING, "*", "CT", 0, true},
    {MATCH_STRING, "*", NULL, 0, true},
    {MATCH_STRING, "**", "", 0, true},
    {MATCH_PN, "*", NULL, CI, true},
    {MATCH_DATE, "", NULL, 0, true},
    {MATCH_DATE, "*", "20200101", 0, true},
    {MATCH_TIME, "*", NULL, 0, true},
    {MATCH_DATETIME, "", "2020", 0, true},
    {MATCH_UID, "", NULL, 0, true},
    {MATCH_UID, "*", "1.2.3", 0, true},

    /* A non-universal key never matches an empty or absent value. */
    {MATCH_STRING, "CT", "", 0, false},
    {MATCH_STRING, "CT", NULL, 0, false},
    {MATCH_STRING, "?*", "", 0, false},
    {MATCH_PN, "DOE", NULL, CI, false},
    {MATCH_DATE, "20200101", "", 0, false},
    {MATCH_DATE, "20200101-", NULL, 0, false},
    {MATCH_TIME, "1015", "", 0, false},
    {MATCH_UID, "1.2.3", "", 0, false},
    {MATCH_STRING, "CT", "\\", 0, false},
    {MATCH_STRING, "CT\\", "MR\\", 0, false}, /* empty components too */
    {MATCH_STRING, "CT\\**", "MR\\", 0, true},
    {MATCH_STRING, "CT\\*?", "\\", 0, false},

    /* Single value matching of strings: exact and case-sensitive. */
    {MATCH_STRING, "CT", "CT", 0, true},
    {MATCH_STRING, "CT", "ct", 0, false},
    {MATCH_STRING, "CT", "CTX", 0, false},
    {MATCH_STRING, "CTX", "CT", 0, false},
    {MATCH_STRING, "ct", "CT", CI, false}, /* the flag is for PN only */
    {MATCH_STRING, " CT", "CT", 0, false}, /* leading spaces are significant */

    /* Multi-valued stored values match when any value matches. */
    {MATCH_STRING, "MR", "CT\\MR", 0, true},
    {MATCH_STRING, "CT", "CT\\MR", 0, true},
    {MATCH_STRING, "PT", "CT\\MR", 0, false},
    {MATCH_STRING, "M*", "CT\\MR", 0, true},
    {MATCH_STRING, "CT\\MR", "MR", 0, true}, /* a key list: any of its values */
    {MATCH_STRING, "CT\\MR", "PT\\MR", 0, true},
    {MATCH_STRING, "CT\\MR", "PT", 0, false},
    {MATCH_STRING, "CT", "CT\\", 0, true},
    {MATCH_PN, "DOE^J*", "SMITH\\DOE^JOHN", 0, true},

    /* Wild card matching: '*' at start, middle and end; '?' exactly one. */
    {MATCH_STRING, "AB*", "ABC", 0, true},
    {MATCH_STRING, "AB*", "AB", 0, true},
    {MATCH_STRING, "AB*", "A", 0, false},
    {MATCH_STRING, "AB*", "XABC", 0, false},
    {MATCH_STRING, "*BC", "ABC", 0, true},
    {MATCH_STRING, "*BC", "BC", 0, true},
    {MATCH_STRING, "*BC", "ABCD", 0, false},
    {MATCH_STRING, "A*C", "ABBBC", 0, true},
    {MATCH_STRING, "A*C", "AC", 0, true},
    {MATCH_STRING, "A*C", "ACB", 0, false},
    {MATCH_STRING, "A*C", "ACBC", 0, true},
    {MATCH_STRING, "*B*", "ABC", 0, true},
    {MATCH_STRING, "*B*", "AXC", 0, false},
    {MATCH_STRING, "A?C", "ABC", 0, true},
    {MATCH_STRING, "A?C", "AC", 0, false},
    {MATCH_STRING, "A?C", "ABBC", 0, false},
    {MATCH_STRING, "??", "AB", 0, true},
    {MATCH_STRING, "??", "A", 0, false},
    {MATCH_STRING, "??", "ABC", 0, false},
    {MATCH_STRING, "?*", "A", 0, true},
    {MATCH_STRING, "*?", "AB", 0, true},
    {MATCH_STRING, "A**B", "AB", 0, true},
    {MATCH_STRING, "*A*B*C*", "xxAyyBzzC", 0, true},
    {MATCH_STRING, "*A*B*C*", "xxCyyBzzA", 0, false},
    {MATCH_STRING, "ab*", "ABC", 0, false}, /* wildcards stay case-sensitive */

    /* '?' is one UTF-8 code point, not one byte. */
    {MATCH_STRING, "M?ller", "M" U_UML "ller", 0, true},
    {MATCH_STRING, "M??ller", "M" U_UML "ller", 0, false},
    {MATCH_STRING, "M?ller", "Mueller", 0, false},
    {MATCH_STRING, "M*r", "M" U_UML "ller", 0, true},
    {MATCH_STRING, "*" U_UML "*", "M" U_UML "ller", 0, true},
    {MATCH_STRING, "?", NICHI, 0, true}, /* a 3-byte character */
    {MATCH_STRING, "?", GRIN, 0, true},  /* a 4-byte character */
    {MATCH_STRING, "??", GRIN, 0, false},
    {MATCH_PN, "M?LLER", "M" U_UML_UP "LLER", 0, true},
    /* After a mismatch '*' gives up whole characters, never part of one. */
    {MATCH_STRING, "*??b?", NICHI "ba", 0, false},
    {MATCH_STRING, "*???b?", GRIN "xba", 0, false},
    {MATCH_STRING, "*??b?", "x" NICHI "ba", 0, true},

    /* Invalid UTF-8: each stray byte is one character equal only to itself. */
    {MATCH_STRING, "M?ller", "M\xFFller", 0, true},
    {MATCH_STRING, "\xFF", "\xFF", 0, true},
    {MATCH_STRING, "\xFE", "\xFF", 0, false},
    {MATCH_STRING, "\xC3", "\xC3", 0, true},
    {MATCH_STRING, "??", "\xC3\x28", 0, true}, /* C3 without a continuation */
    {MATCH_STRING, "?", "\xC0\x80", 0, false}, /* overlong NUL: two bytes */
    {MATCH_PN, "m?ller", "M\xC3ller", CI, true},

    /* Person names: case-sensitive unless the flag asks otherwise. */
    {MATCH_PN, "DOE^JOHN", "DOE^JOHN", 0, true},
    {MATCH_PN, "doe^john", "DOE^JOHN", 0, false},
    {MATCH_PN, "doe^john", "DOE^JOHN", CI, true},
    {MATCH_PN, "M" U_UML "ller", "m" U_UML "ller", 0, false},
    {MATCH_PN, "M" U_UML "ller", "m" U_UML "ller", CI, true},
    {MATCH_PN, "m" U_UML "ller", "M" U_UML_UP "LLER", 0, false},
    {MATCH_PN, "m" U_UML "ller", "M" U_UML_UP "LLER", CI, true},
    {MATCH_PN, "M" U_UML_UP "LLER^H*", "m" U_UML "ller^hans", CI, true},
    {MATCH_PN, "M" U_UML_UP "LLER^H*", "m" U_UML "ller^hans", 0, false},
    {MATCH_PN, "m?ller", "M" U_UML_UP "LLER", CI, true},
    {MATCH_PN, "mueller", "M" U_UML_UP "LLER", CI, false},
    {MATCH_PN, "\xC3\xA0\xC3\xBE", "\xC3\x80\xC3\x9E", CI, true}, /* both ends of the range */
    {MATCH_PN, Y_UML, Y_UML_UP, CI, false},                       /* U+00FF is not folded */
    {MATCH_PN, DIVIDE, TIMES, CI, false},                         /* nor is U+00F7 */
    {MATCH_PN, SZLIG, SZLIG, CI, true},
    {MATCH_PN, "doe", "DOEX", CI, false},

    /* Dates: single value and inclusive ranges with open ends. */
    {MATCH_DATE, "20200101", "20200101", 0, true},
    {MATCH_DATE, "20200101", "20200102", 0, false},
    {MATCH_DATE, "20200101", "2020.01.01", 0, true}, /* ACR-NEMA stored form */
    {MATCH_DATE, "2020.01.01", "20200101", 0, true}, /* read, though not a valid key */
    {MATCH_DATE, "20200101-20201231", "20200615", 0, true},
    {MATCH_DATE, "20200101-20201231", "20200101", 0, true},
    {MATCH_DATE, "20200101-20201231", "20201231", 0, true},
    {MATCH_DATE, "20200101-20201231", "20191231", 0, false},
    {MATCH_DATE, "20200101-20201231", "20210101", 0, false},
    {MATCH_DATE, "-20200101", "19991231", 0, true},
    {MATCH_DATE, "-20200101", "20200101", 0, true},
    {MATCH_DATE, "-20200101", "20200102", 0, false},
    {MATCH_DATE, "20200101-", "20250101", 0, true},
    {MATCH_DATE, "20200101-", "20200101", 0, true},
    {MATCH_DATE, "20200101-", "20191231", 0, false},
    {MATCH_DATE, "20201231-20200101", "20200615", 0, false}, /* reversed: nothing */
    {MATCH_DATE, "20200101-20201231", "19990101\\20200505", 0, true},
    {MATCH_DATE, "20200101-20201231", "garbage", 0, false},
    {MATCH_DATE, "20200101-20201231", "2020", 0, false},
    {MATCH_DATE, "2020*", "20200101", 0, false}, /* '*' is literal for dates */
    {MATCH_DATE, "2020?101", "20200101", 0, false},
    {MATCH_DATE, "20200101--20200102", "20200101", 0, false},

    /* Times: compared on the common precision of key and value. */
    {MATCH_TIME, "1000-1200", "115959.123", 0, true},
    {MATCH_TIME, "1000-1200", "115959.123456", 0, true},
    {MATCH_TIME, "1000-1200", "1000", 0, true},
    {MATCH_TIME, "1000-1200", "100000", 0, true},
    {MATCH_TIME, "1000-1200", "120059.999999", 0, true}, /* "1200" is the whole minute */
    {MATCH_TIME, "1000-1200", "120100", 0, false},
    {MATCH_TIME, "1000-1200", "095959.999999", 0, false},
    {MATCH_TIME, "1000-1200", "13", 0, false},
    {MATCH_TIME, "1000-1200", "11:59:59", 0, true}, /* ACR-NEMA stored form */
    {MATCH_TIME, "1000-1200", "1159xx", 0, false},
    {MATCH_TIME, "-1200", "080000", 0, true},
    {MATCH_TIME, "-1200", "120100", 0, false},
    {MATCH_TIME, "1200-", "235959", 0, true},
    {MATCH_TIME, "1200-", "115959", 0, false},
    {MATCH_TIME, "101500.5-101501", "101500.49", 0, false},
    {MATCH_TIME, "101500.5-101501", "101500.5", 0, true},
    {MATCH_TIME, "101500.5-101501", "101500.55", 0, true},
    {MATCH_TIME, "101500.5-101501", "101501.999", 0, true},
    {MATCH_TIME, "101500.5-101501", "101502", 0, false},
    {MATCH_TIME, "1015", "1015", 0, true},
    {MATCH_TIME, "1015", "101500", 0, true},
    {MATCH_TIME, "1015", "101559.999999", 0, true},
    {MATCH_TIME, "1015", "1016", 0, false},
    {MATCH_TIME, "1015", "101600", 0, false},
    {MATCH_TIME, "101530", "1015", 0, true}, /* the stored value is imprecise */
    {MATCH_TIME, "101530", "101500", 0, false},
    {MATCH_TIME, "101530.25", "101530.250000", 0, true},
    {MATCH_TIME, "101530.25", "101530.26", 0, false},
    {MATCH_TIME, "1200-1000", "1100", 0, false},

    /* Datetimes: like times, over YYYYMMDDHHMMSS.FFFFFF; offsets ignored. */
    {MATCH_DATETIME, "20200101-20200131", "20200115103000", 0, true},
    {MATCH_DATETIME, "20200101-20200131", "20200131235959.999", 0, true},
    {MATCH_DATETIME, "20200101-20200131", "20200201000000", 0, false},
    {MATCH_DATETIME, "2020", "20200315", 0, true},
    {MATCH_DATETIME, "2020", "2021", 0, false},
    {MATCH_DATETIME, "20200101-20200131", "20200115103000+0100", 0, true},
    {MATCH_DATETIME, "20200101-20200131", "20200115103000-0500", 0, true},
    {MATCH_DATETIME, "20200115103000+0100", "20200115103000", 0, true},
    {MATCH_DATETIME, "20200115103000.5-", "20200115103000.4", 0, false},
    {MATCH_DATETIME, "20200115103000.5-", "20200115103001", 0, true},

    /* UIDs: exact, or any of a list; no wildcards. */
    {MATCH_UID, "1.2.3", "1.2.3", 0, true},
    {MATCH_UID, "1.2.3", "1.2.30", 0, false},
    {MATCH_UID, "1.2.30", "1.2.3", 0, false},
    {MATCH_UID, "1.2.3\\1.2.4", "1.2.4", 0, true},
    {MATCH_UID, "1.2.3\\1.2.4", "1.2.3", 0, true},
    {MATCH_UID, "1.2.3\\1.2.4", "1.2.5", 0, false},
    {MATCH_UID, "1.2.*", "1.2.3", 0, false},
    {MATCH_UID, "1.2.?", "1.2.3", 0, false},
    {MATCH_UID, "1.2.*", "1.2.*", 0, true},

    /* An unknown kind matches nothing, not even a universal key. */
    {(match_kind_t)99, "CT", "CT", 0, false},
};

static void test_match_value_table(void **state)
{
    (void)state;
    int failures = 0;
    for (size_t i = 0; i < SP_ARRAY_LEN(match_rows); i++) {
        const match_row_t *r = &match_rows[i];
        bool got = match_value(r->kind, r->key, r->value, r->flags);
        if (got != r->expected) {
            print_error("row %zu: kind %d key \"%s\" value \"%s\" flags %u: got %d, want %d\n", i,
                        (int)r->kind, r->key ? r->key : "(null)", r->value ? r->value : "(null)",
                        r->flags, got, r->expected);
            failures++;
        }
    }
    assert_int_equal(failures, 0);
}

typedef struct {
    match_kind_t kind;
    const char *key;
    int expected;
} valid_row_t;

static const valid_row_t valid_rows[] = {
    {MATCH_DATE, NULL, 0},
    {MATCH_DATE, "", 0},
    {MATCH_DATE, "*", 0},
    {MATCH_DATE, "20200101", 0},
    {MATCH_DATE, "20200229", 0},
    {MATCH_DATE, "20000229", 0},
    {MATCH_DATE, "20210229", SP_EINVAL},
    {MATCH_DATE, "19000229", SP_EINVAL},
    {MATCH_DATE, "20201301", SP_EINVAL},
    {MATCH_DATE, "20200001", SP_EINVAL},
    {MATCH_DATE, "20200132", SP_EINVAL},
    {MATCH_DATE, "20200431", SP_EINVAL},
    {MATCH_DATE, "20200100", SP_EINVAL},
    {MATCH_DATE, "2020010", SP_EINVAL},
    {MATCH_DATE, "202001011", SP_EINVAL},
    {MATCH_DATE, "2020010a", SP_EINVAL},
    {MATCH_DATE, "2020.01.01", SP_EINVAL},
    {MATCH_DATE, "2020-01-01", SP_EINVAL},
    {MATCH_DATE, "20200101-20201231", 0},
    {MATCH_DATE, "20200101-20200101", 0},
    {MATCH_DATE, "-20200101", 0},
    {MATCH_DATE, "20200101-", 0},
    {MATCH_DATE, "20201231-20200101", SP_EINVAL},
    {MATCH_DATE, "20200101--20200102", SP_EINVAL},
    {MATCH_DATE, "-20200101-", SP_EINVAL},
    {MATCH_DATE, "-", SP_EINVAL},
    {MATCH_DATE, "20200101-2020", SP_EINVAL},
    {MATCH_DATE, "20200101\\20200102", SP_EINVAL},
    {MATCH_DATE, "2020*", SP_EINVAL},
    {MATCH_DATE, "**", SP_EINVAL},
    {MATCH_TIME, "10", 0},
    {MATCH_TIME, "1015", 0},
    {MATCH_TIME, "101530", 0},
    {MATCH_TIME, "101530.1", 0},
    {MATCH_TIME, "101530.123456", 0},
    {MATCH_TIME, "235960", 0},
    {MATCH_TIME, "101530.1234567", SP_EINVAL},
    {MATCH_TIME, "101530.", SP_EINVAL},
    {MATCH_TIME, "1015.5", SP_EINVAL},
    {MATCH_TIME, "101", SP_EINVAL},
    {MATCH_TIME, "1", SP_EINVAL},
    {MATCH_TIME, "24", SP_EINVAL},
    {MATCH_TIME, "1060", SP_EINVAL},
    {MATCH_TIME, "101561", SP_EINVAL},
    {MATCH_TIME, "10:15", SP_EINVAL},
    {MATCH_TIME, "1000-1200", 0},
    {MATCH_TIME, "1030-10", 0},
    {MATCH_TIME, "-1200", 0},
    {MATCH_TIME, "1200-", 0},
    {MATCH_TIME, "1200-1000", SP_EINVAL},
    {MATCH_TIME, "10-11-12", SP_EINVAL},
    {MATCH_DATETIME, "2020", 0},
    {MATCH_DATETIME, "202001", 0},
    {MATCH_DATETIME, "20200101120000.123456", 0},
    {MATCH_DATETIME, "20200101120000+0100", 0},
    {MATCH_DATETIME, "20200101-20200131", 0},
    {MATCH_DATETIME, "202", SP_EINVAL},
    {MATCH_DATETIME, "20201", SP_EINVAL},
    {MATCH_DATETIME, "20201301", SP_EINVAL},
    {MATCH_DATETIME, "2020010125", SP_EINVAL},
    {MATCH_DATETIME, "20200101.5", SP_EINVAL},
    {MATCH_DATETIME, "20200101120000+1500", SP_EINVAL},
    {MATCH_DATETIME, "20200101-20191231", SP_EINVAL},
    {MATCH_UID, "", 0},
    {MATCH_UID, "*", 0},
    {MATCH_UID, "1.2.3", 0},
    {MATCH_UID, "1.2.3\\1.2.4", 0},
    {MATCH_UID, "1.2.03", SP_EINVAL},
    {MATCH_UID, "1..2", SP_EINVAL},
    {MATCH_UID, ".1.2", SP_EINVAL},
    {MATCH_UID, "1.2.", SP_EINVAL},
    {MATCH_UID, "1.2.a", SP_EINVAL},
    {MATCH_UID, "1.2.3\\", SP_EINVAL},
    {MATCH_UID, "\\1.2.3", SP_EINVAL},
    {MATCH_UID, "1.2.*", SP_EINVAL},
    {MATCH_UID, "1.2.3-1.2.4", SP_EINVAL},
    {MATCH_UID, "1.23456789012345678901234567890123456789012345678901234567890123", 0},
    {MATCH_UID, "1.234567890123456789012345678901234567890123456789012345678901234", SP_EINVAL},
    {MATCH_STRING, "CT", 0},
    {MATCH_STRING, "A*B?", 0},
    {MATCH_STRING, "CT\\MR", 0},
    {MATCH_STRING, "M" U_UML "ller", 0},
    {MATCH_STRING, "\xFF", SP_EINVAL},
    {MATCH_STRING, "M\xC3", SP_EINVAL},
    {MATCH_STRING, "\xC0\x80", SP_EINVAL},
    {MATCH_STRING, "\xE0\x80\x80", SP_EINVAL}, /* overlong three-byte NUL */
    {MATCH_STRING, "\xED\xA0\x80", SP_EINVAL},
    {MATCH_STRING, "\xF4\x90\x80\x80", SP_EINVAL},
    {MATCH_PN, "M" U_UML_UP "LLER^H*", 0},
    {MATCH_PN, "DOE\xFF", SP_EINVAL},
    {(match_kind_t)99, "", SP_EINVAL},
    {(match_kind_t)-1, "CT", SP_EINVAL},
};

static void test_key_valid_table(void **state)
{
    (void)state;
    int failures = 0;
    for (size_t i = 0; i < SP_ARRAY_LEN(valid_rows); i++) {
        const valid_row_t *r = &valid_rows[i];
        int got = match_key_valid(r->kind, r->key);
        if (got != r->expected) {
            print_error("row %zu: kind %d key \"%s\": got %d, want %d\n", i, (int)r->kind,
                        r->key ? r->key : "(null)", got, r->expected);
            failures++;
        }
    }
    assert_int_equal(failures, 0);
}

typedef struct {
    match_kind_t kind;
    const char *key;
    bool expected;
} exact_row_t;

static const exact_row_t exact_rows[] = {
    {MATCH_STRING, "CT", true},
    {MATCH_STRING, "M" U_UML "ller", true},
    {MATCH_STRING, NULL, false},
    {MATCH_STRING, "", false},
    {MATCH_STRING, "*", false},
    {MATCH_STRING, "C*", false},
    {MATCH_STRING, "C?", false},
    {MATCH_STRING, "CT\\MR", false},
    {MATCH_STRING, "\xFF", false},
    {MATCH_PN, "DOE^JOHN", true},
    {MATCH_PN, "DOE*", false},
    {MATCH_DATE, "20200101", true},
    {MATCH_DATE, "20200101-20200102", false},
    {MATCH_DATE, "-20200101", false},
    {MATCH_DATE, "20200101-", false},
    {MATCH_DATE, "2020", false},
    {MATCH_DATE, "*", false},
    {MATCH_TIME, "101500", false},
    {MATCH_TIME, "1015", false},
    {MATCH_DATETIME, "20200101120000", false},
    {MATCH_UID, "1.2.3", true},
    {MATCH_UID, "1.2.3\\1.2.4", false},
    {MATCH_UID, "1.2.03", false},
    {MATCH_UID, "", false},
};

static void test_key_is_exact_table(void **state)
{
    (void)state;
    int failures = 0;
    for (size_t i = 0; i < SP_ARRAY_LEN(exact_rows); i++) {
        const exact_row_t *r = &exact_rows[i];
        bool got = match_key_is_exact(r->kind, r->key);
        if (got != r->expected) {
            print_error("row %zu: kind %d key \"%s\": got %d, want %d\n", i, (int)r->kind,
                        r->key ? r->key : "(null)", got, r->expected);
            failures++;
        }
    }
    assert_int_equal(failures, 0);
}

typedef struct {
    const char *key;
    size_t out_size;
    const char *expected;
} prefix_row_t;

static const prefix_row_t prefix_rows[] = {
    {"DOE*", 64, "DOE"},
    {"DOE^J*", 64, "DOE^J"},
    {"DO?E", 64, "DO"},
    {"D*O?", 64, "D"},
    {"*DOE", 64, ""},
    {"?DOE", 64, ""},
    {"DOE", 64, "DOE"},
    {"", 64, ""},
    {NULL, 64, ""},
    {"ABCDEF*", 4, "ABC"},
    {"ABC*", 4, "ABC"},
    {"ABC*", 1, ""},
    {"M" U_UML "ller*", 64, "M" U_UML "ller"},
    {"M" U_UML "ller*", 3, "M"}, /* never half a character */
    {"M" U_UML "ller*", 4, "M" U_UML},
    {"A*\\B*", 64, ""}, /* a list has no common prefix */
};

static void test_literal_prefix(void **state)
{
    (void)state;
    for (size_t i = 0; i < SP_ARRAY_LEN(prefix_rows); i++) {
        const prefix_row_t *r = &prefix_rows[i];
        char out[64];
        memset(out, 'x', sizeof out);
        size_t n = match_literal_prefix(r->key, out, r->out_size);
        assert_string_equal(out, r->expected);
        assert_int_equal(n, strlen(r->expected));
    }
    /* A zero-sized buffer is left alone. */
    char out[4] = "zzz";
    assert_int_equal(match_literal_prefix("ABC*", out, 0), 0);
    assert_string_equal(out, "zzz");
    assert_int_equal(match_literal_prefix("ABC*", NULL, 10), 0);
}

typedef struct {
    const char *key;
    int rc;
    const char *lo;
    const char *hi;
} bounds_row_t;

static const bounds_row_t bounds_rows[] = {
    {"20200101-20201231", 0, "20200101", "20201231"},
    {"-20200101", 0, "", "20200101"},
    {"20200101-", 0, "20200101", ""},
    {"20200101", 0, "20200101", "20200101"},
    {"20200101-20200101", 0, "20200101", "20200101"},
    {"", 0, "", ""},
    {"*", 0, "", ""},
    {NULL, 0, "", ""},
    {"2020", SP_EINVAL, "", ""},
    {"20201231-20200101", SP_EINVAL, "", ""},
    {"20200101--", SP_EINVAL, "", ""},
    {"-", SP_EINVAL, "", ""},
    {"20200101\\20200102", SP_EINVAL, "", ""},
    {"20200230", SP_EINVAL, "", ""},
    {"2020.01.01", SP_EINVAL, "", ""},
};

static void test_date_bounds(void **state)
{
    (void)state;
    for (size_t i = 0; i < SP_ARRAY_LEN(bounds_rows); i++) {
        const bounds_row_t *r = &bounds_rows[i];
        char lo[9], hi[9];
        memset(lo, 'x', sizeof lo);
        memset(hi, 'x', sizeof hi);
        assert_int_equal(match_date_bounds(r->key, lo, hi), r->rc);
        assert_string_equal(lo, r->lo);
        assert_string_equal(hi, r->hi);
    }
}

static void test_fold_name(void **state)
{
    (void)state;
    static const struct {
        const char *in, *out;
    } rows[] = {
        {"m" U_UML "ller", "M" U_UML_UP "LLER"},
        {"doe^john=", "DOE^JOHN="},
        {"ALREADY UPPER 123", "ALREADY UPPER 123"},
        /* All of U+00E0..U+00FE but U+00F7. */
        {"\xC3\xA0\xC3\xA1\xC3\xA2\xC3\xA3\xC3\xA4\xC3\xA5\xC3\xA6\xC3\xA7"
         "\xC3\xA8\xC3\xA9\xC3\xAA\xC3\xAB\xC3\xAC\xC3\xAD\xC3\xAE\xC3\xAF"
         "\xC3\xB0\xC3\xB1\xC3\xB2\xC3\xB3\xC3\xB4\xC3\xB5\xC3\xB6\xC3\xB7"
         "\xC3\xB8\xC3\xB9\xC3\xBA\xC3\xBB\xC3\xBC\xC3\xBD\xC3\xBE",
         "\xC3\x80\xC3\x81\xC3\x82\xC3\x83\xC3\x84\xC3\x85\xC3\x86\xC3\x87"
         "\xC3\x88\xC3\x89\xC3\x8A\xC3\x8B\xC3\x8C\xC3\x8D\xC3\x8E\xC3\x8F"
         "\xC3\x90\xC3\x91\xC3\x92\xC3\x93\xC3\x94\xC3\x95\xC3\x96\xC3\xB7"
         "\xC3\x98\xC3\x99\xC3\x9A\xC3\x9B\xC3\x9C\xC3\x9D\xC3\x9E"},
        {Y_UML SZLIG DIVIDE, Y_UML SZLIG DIVIDE},
        {"\xC3\x9C", "\xC3\x9C"},
        {"a\xFF"
         "b\xC3",
         "A\xFF"
         "B\xC3"},                          /* invalid bytes are copied */
        {"\xE3\x81\xA1z", "\xE3\x81\xA1Z"}, /* other scripts are copied */
        {"", ""},
    };
    for (size_t i = 0; i < SP_ARRAY_LEN(rows); i++) {
        char out[128];
        match_fold_name(rows[i].in, out);
        assert_string_equal(out, rows[i].out);
        /* In place gives the same result. */
        char buf[128];
        strcpy(buf, rows[i].in);
        match_fold_name(buf, buf);
        assert_string_equal(buf, rows[i].out);
    }
    char out[4] = "zzz";
    match_fold_name(NULL, out);
    assert_string_equal(out, "");
    match_fold_name("abc", NULL); /* must not crash */
}

/* Keys built to make naive backtracking exponential. The test has the CTest
 * timeout as its only clock; what it asserts is the answer. */
static void test_hostile_wildcards(void **state)
{
    (void)state;
    enum { LEN = 20000 };
    static char value[LEN + 2];
    memset(value, 'a', LEN);
    value[LEN] = '\0';
    assert_false(match_value(MATCH_STRING, "*a*a*a*a*a*a*a*a*a*a*a*a*b", value, 0));
    assert_false(match_value(MATCH_PN, "*a*a*a*a*a*a*a*a*a*a*a*a*b", value, CI));
    assert_true(match_value(MATCH_STRING, "*a*a*a*a*a*a*a*a*a*a*a*a*", value, 0));
    assert_false(match_value(MATCH_STRING, "*?*?*?*?*?*?*?*?*?*?*?*?b", value, 0));
    value[LEN] = 'b';
    value[LEN + 1] = '\0';
    assert_true(match_value(MATCH_STRING, "*a*a*a*a*a*a*a*a*a*a*a*a*b", value, 0));
    assert_true(match_value(MATCH_PN, "*A*A*A*A*A*A*A*A*A*A*A*A*B", value, CI));
    assert_false(match_value(MATCH_PN, "*A*A*A*A*A*A*A*A*A*A*A*A*B", value, 0));

    /* A long key of stars and '?' against a long value of multibyte text. */
    static char key[2 * LEN + 2], text[2 * LEN + 1];
    for (size_t i = 0; i < LEN; i++) {
        key[2 * i] = '*';
        key[2 * i + 1] = '?';
        text[2 * i] = '\xC3';
        text[2 * i + 1] = '\xBC';
    }
    key[2 * LEN] = 'x';
    key[2 * LEN + 1] = '\0';
    text[2 * LEN] = '\0';
    assert_false(match_value(MATCH_STRING, key, text, 0));
    key[2 * LEN] = '\0';
    assert_true(match_value(MATCH_STRING, key, text, 0)); /* LEN '?' over LEN characters */
}

/* A small deterministic generator, so a failure reproduces. */
static uint32_t rng_next(uint32_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 17;
    *s ^= *s << 5;
    return *s;
}

static void random_string(uint32_t *seed, const char *const *alphabet, size_t n_alpha,
                          size_t max_parts, char *out, size_t out_size)
{
    size_t parts = rng_next(seed) % (max_parts + 1), len = 0;
    out[0] = '\0';
    for (size_t i = 0; i < parts; i++) {
        const char *piece = alphabet[rng_next(seed) % n_alpha];
        size_t pl = strlen(piece);
        if (len + pl + 1 > out_size)
            break;
        memcpy(out + len, piece, pl + 1);
        len += pl;
    }
}

/* Random and hostile bytes through every function and kind (run under the
 * sanitizers), checking properties that must hold for any input. */
static void test_random_inputs(void **state)
{
    (void)state;
    static const char *const alphabet[] = {
        "*", "?", "-", "\\",  ".",      ":",    "+",    "0",    "1",        "2",  "5", "9",
        "a", "A", "Z", U_UML, U_UML_UP, "\xC3", "\xBC", "\xFF", "\xE6\x97", GRIN, "^", " ",
    };
    static const match_kind_t kinds[] = {MATCH_STRING, MATCH_PN,       MATCH_DATE,
                                         MATCH_TIME,   MATCH_DATETIME, MATCH_UID};
    uint32_t seed = 0x2545F491u;
    for (int iter = 0; iter < 20000; iter++) {
        char key[64], value[64], prefix[16], folded[64];
        random_string(&seed, alphabet, SP_ARRAY_LEN(alphabet), 12, key, sizeof key);
        random_string(&seed, alphabet, SP_ARRAY_LEN(alphabet), 12, value, sizeof value);
        for (size_t k = 0; k < SP_ARRAY_LEN(kinds); k++) {
            match_kind_t kind = kinds[k];
            (void)match_value(kind, key, value, 0);
            (void)match_value(kind, key, value, CI);
            (void)match_value(kind, key, NULL, CI);
            if (match_key_is_exact(kind, key)) {
                assert_int_equal(match_key_valid(kind, key), 0);
                assert_true(match_value(kind, key, key, 0));
            }
        }
        size_t n = match_literal_prefix(key, prefix, sizeof prefix);
        assert_int_equal(n, strlen(prefix));
        assert_memory_equal(prefix, key, n);
        match_fold_name(key, folded);
        assert_int_equal(strlen(folded), strlen(key));
        char lo[9], hi[9];
        if (match_date_bounds(key, lo, hi) == 0)
            assert_int_equal(match_key_valid(MATCH_DATE, key), 0);
    }
}

/* Length in bytes of the character starting with lead byte b; the
 * reference matcher below only sees valid UTF-8. */
static size_t char_len(unsigned char b)
{
    return b < 0x80 ? 1 : b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4;
}

/* Obviously correct (and exponential) wild card matching by recursion over
 * characters, to check the linear one against on short strings. */
static bool naive_glob(const char *k, const char *v)
{
    if (*k == '\0')
        return *v == '\0';
    if (*k == '*')
        return naive_glob(k + 1, v) || (*v != '\0' && naive_glob(k, v + char_len(*v)));
    if (*v == '\0')
        return false;
    size_t kl = char_len(*k), vl = char_len(*v);
    if (*k == '?')
        return naive_glob(k + 1, v + vl);
    return kl == vl && memcmp(k, v, kl) == 0 && naive_glob(k + kl, v + vl);
}

static void test_wildcards_agree_with_reference(void **state)
{
    (void)state;
    static const char *const key_alpha[] = {"*", "?", "a", "b", U_UML, NICHI, GRIN};
    static const char *const val_alpha[] = {"a", "b", U_UML, NICHI, GRIN};
    uint32_t seed = 0x12345678u;
    int matches = 0;
    for (int iter = 0; iter < 50000; iter++) {
        char key[64], value[64];
        random_string(&seed, key_alpha, SP_ARRAY_LEN(key_alpha), 6, key, sizeof key);
        random_string(&seed, val_alpha, SP_ARRAY_LEN(val_alpha), 6, value, sizeof value);
        if (key[0] == '\0' || key[strspn(key, "*")] == '\0' || value[0] == '\0')
            continue; /* universal keys and empty values have their own rules */
        bool want = naive_glob(key, value);
        matches += want;
        if (match_value(MATCH_STRING, key, value, 0) != want)
            fail_msg("key \"%s\" value \"%s\": want %d", key, value, want);
    }
    assert_true(matches > 1000);
}

/* Case-insensitive PN matching must agree with comparing folded names, or
 * an index of folded names would disagree with the matcher. */
static void test_fold_agrees_with_match(void **state)
{
    (void)state;
    static const char *const alphabet[] = {"a",   "A",      U_UML,  U_UML_UP,
                                           Y_UML, Y_UML_UP, "\xFF", "\xC3"};
    uint32_t seed = 0x9E3779B9u;
    int equal_pairs = 0;
    for (int iter = 0; iter < 20000; iter++) {
        char a[32], b[32], fa[32], fb[32];
        random_string(&seed, alphabet, SP_ARRAY_LEN(alphabet), 3, a, sizeof a);
        random_string(&seed, alphabet, SP_ARRAY_LEN(alphabet), 3, b, sizeof b);
        if (a[0] == '\0' || b[0] == '\0')
            continue;
        match_fold_name(a, fa);
        match_fold_name(b, fb);
        bool same = strcmp(fa, fb) == 0;
        equal_pairs += same;
        assert_int_equal(match_value(MATCH_PN, a, b, CI), same);
    }
    /* The alphabet is small enough that the equal case was exercised. */
    assert_true(equal_pairs > 100);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_match_value_table),
        cmocka_unit_test(test_key_valid_table),
        cmocka_unit_test(test_key_is_exact_table),
        cmocka_unit_test(test_literal_prefix),
        cmocka_unit_test(test_date_bounds),
        cmocka_unit_test(test_fold_name),
        cmocka_unit_test(test_hostile_wildcards),
        cmocka_unit_test(test_random_inputs),
        cmocka_unit_test(test_fold_agrees_with_match),
        cmocka_unit_test(test_wildcards_agree_with_reference),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
