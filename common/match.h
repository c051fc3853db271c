/* match.h - DICOM attribute matching for C-FIND, per PS3.4 C.2.2.2.
 *
 * Pure functions over NUL-terminated UTF-8 strings, safe from any thread.
 * Values are given without DICOM padding (trailing spaces removed by the
 * caller, leading spaces kept except for dates/times/UIDs which never have
 * them). A stored value may be multi-valued (components separated by '\\',
 * e.g. ModalitiesInStudy "CT\\MR"): it matches if any one value matches. */
#ifndef SP_MATCH_H
#define SP_MATCH_H

#include <stdbool.h>
#include <stddef.h>

typedef enum {
    MATCH_STRING,   /* AE, CS, LO, SH, IS, LT ...: single value, wildcard, universal */
    MATCH_PN,       /* person name: as MATCH_STRING, optionally case-insensitive */
    MATCH_DATE,     /* DA: single value or range "A-B", "A-", "-B" */
    MATCH_TIME,     /* TM: single value or range; fractional seconds allowed */
    MATCH_DATETIME, /* DT: single value or range */
    MATCH_UID,      /* UI: single value or a list "uid1\\uid2" (no wildcards) */
} match_kind_t;

/* Person names compare case-insensitively (ASCII and Latin-1 letters). */
#define MATCH_PN_CASE_INSENSITIVE 1u

/* Returns true when `value` matches `key` under the rules for `kind`:
 * - empty key (or a key that is only "*") is universal matching: true;
 * - a key with '*' (any run, possibly empty) or '?' (exactly one character,
 *   counted in UTF-8 code points) is wildcard matching (STRING and PN only;
 *   for other kinds '*' and '?' are literal characters);
 * - DATE/TIME/DATETIME keys containing '-' are range matching, inclusive,
 *   with an open end allowed; times compare on their common precision so
 *   "1000-1200" includes "115959.123456", and a single TM key "1015" matches
 *   "101500" and "101530" (it stands for the whole minute);
 * - UID keys containing '\\' match any UID in the list; other keys with
 *   several values match when any one of them matches;
 * - otherwise single value matching: equal strings (PN case-insensitive if
 *   `flags` says so).
 * A non-universal key never matches an empty or NULL value. */
bool match_value(match_kind_t kind, const char *key, const char *value, unsigned flags);

/* Checks a key's syntax before a query runs: dates are YYYYMMDD, times
 * HHMMSS.FFFFFF or a prefix of it (HH, HHMM...), ranges have at most one '-'
 * and ordered bounds, UIDs valid per PS3.5. Returns 0 or SP_EINVAL. */
int match_key_valid(match_kind_t kind, const char *key);

/* True when the key is a single value with no wildcard and no range or list:
 * an index can be probed for it exactly. Never true for TIME and DATETIME,
 * whose keys also match values of other precisions, nor for invalid keys. */
bool match_key_is_exact(match_kind_t kind, const char *key);

/* Copies into out (NUL-terminated, at most out_size-1 bytes) the literal
 * prefix of a wildcard key: everything before the first '*' or '?'. Returns
 * the length in bytes of what was copied (cut short on a code point boundary
 * when out is too small). A list key ("A*\\B*") has no prefix: 0. Used to
 * narrow index scans. */
size_t match_literal_prefix(const char *key, char *out, size_t out_size);

/* Splits a DATE range key into inclusive bounds "YYYYMMDD"; an open end is
 * the empty string. A single date gives lo == hi; a universal key gives two
 * open ends. Returns 0 or SP_EINVAL (lo and hi then empty). */
int match_date_bounds(const char *key, char lo[9], char hi[9]);

/* Case-folds a person name for case-insensitive comparison and index keys:
 * ASCII a-z and the Latin-1 letters U+00E0..U+00FE (but not U+00F7) become
 * upper case; every other byte is copied. out must hold strlen(in)+1 bytes;
 * it may be the same buffer as in. */
void match_fold_name(const char *in, char *out);

#endif
