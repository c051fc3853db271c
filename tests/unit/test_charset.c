/* test_charset.c - unit tests of DICOM string decoding (common/charset.c).
 *
 * The examples of PS3.5 Annex H (Japanese), I (Korean) and J (Chinese) byte
 * for byte, every single-byte set, the guesses without (0008,0005), and the
 * escaped form: undecodable bytes, truncated sequences, stray escapes, NUL,
 * round trips through charset_unescape and distinct outputs for distinct
 * inputs. Most cases are table rows; every failing row is printed before the
 * test fails. Expected UTF-8 is spelled in hex escapes so the source file's
 * own encoding cannot change a test. One process, threads in one test. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include "base.h"
#include "charset.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SIG CHARSET_ESCAPE_SIGIL
#define ESC "\x1B"

/* UTF-8 of the names in the Annexes. */
#define YAMADA "\xE5\xB1\xB1\xE7\x94\xB0"
#define TAROU "\xE5\xA4\xAA\xE9\x83\x8E"
#define H_YAMADA "\xE3\x82\x84\xE3\x81\xBE\xE3\x81\xA0"
#define H_TAROU "\xE3\x81\x9F\xE3\x82\x8D\xE3\x81\x86"
#define K_YAMADA "\xEF\xBE\x94\xEF\xBE\x8F\xEF\xBE\x80\xEF\xBE\x9E"
#define K_TAROU "\xEF\xBE\x80\xEF\xBE\x9B\xEF\xBD\xB3"
#define HONG_HANJA "\xE6\xB4\xAA"
#define GILDONG_HANJA "\xE5\x90\x89\xE6\xB4\x9E"
#define HONG "\xED\x99\x8D"
#define GILDONG "\xEA\xB8\xB8\xEB\x8F\x99"
#define WANG "\xE7\x8E\x8B"
#define XIAODONG_S "\xE5\xB0\x8F\xE4\xB8\x9C" /* simplified */
#define XIAODONG_T "\xE5\xB0\x8F\xE6\x9D\xB1" /* traditional */
#define ZHANG "\xE5\xBC\xA0"

#define PN CHARSET_VR_PN
#define LO CHARSET_VR_STRING
#define LT CHARSET_VR_TEXT

#define LOSSY CHARSET_LOSSY_ESCAPED
#define UNKNOWN CHARSET_UNKNOWN_TERM
#define GUESSED CHARSET_GUESSED
#define NONSTD CHARSET_NONSTANDARD_TERM
#define UNDECL CHARSET_UNDECLARED_ESCAPE

typedef struct {
    const char *name;
    const char *scs;
    const char *in; /* NUL-terminated unless len is set */
    size_t len;
    charset_vr_t vr;
    const char *expected;
    unsigned flags;
} cs_row_t;

static const cs_row_t rows[] = {
    /* PS3.5 H.3.1: ISO 2022 IR 87, G0 switched with ESC $ B and ESC ( B. */
    {"H.3.1", "\\ISO 2022 IR 87",
     "Yamada^Tarou=" ESC "$B;3ED" ESC "(B^" ESC "$BB@O:" ESC "(B=" ESC "$B$d$^$@" ESC "(B^" ESC
     "$B$?$m$&" ESC "(B",
     0, PN, "Yamada^Tarou=" YAMADA "^" TAROU "=" H_YAMADA "^" H_TAROU, 0},
    /* PS3.5 H.3.2: ISO 2022 IR 13 (Katakana in G1) with IR 87, back with ESC ( J. */
    {"H.3.2", "ISO 2022 IR 13\\ISO 2022 IR 87",
     "\xD4\xCF\xC0\xDE^\xC0\xDB\xB3=" ESC "$B;3ED" ESC "(J^" ESC "$BB@O:" ESC "(J=" ESC
     "$B$d$^$@" ESC "(J^" ESC "$B$?$m$&" ESC "(J",
     0, PN, K_YAMADA "^" K_TAROU "=" YAMADA "^" TAROU "=" H_YAMADA "^" H_TAROU, 0},
    /* PS3.5 I.2: KS X 1001 in G1, designated again after every delimiter. */
    {"I.2", "\\ISO 2022 IR 149",
     "Hong^Gildong=" ESC "$)C\xFB\xF3^" ESC "$)C\xD1\xCE\xD4\xD7=" ESC "$)C\xC8\xAB^" ESC
     "$)C\xB1\xE6\xB5\xBF",
     0, PN, "Hong^Gildong=" HONG_HANJA "^" GILDONG_HANJA "=" HONG "^" GILDONG, 0},
    /* The same without the repeated designations: the one G1 set declared is
     * assumed, with a warning. */
    {"I.2 lazy", "\\ISO 2022 IR 149", "Hong^Gildong=" ESC "$)C\xFB\xF3^\xD1\xCE\xD4\xD7", 0, PN,
     "Hong^Gildong=" HONG_HANJA "^" GILDONG_HANJA, GUESSED},
    /* PS3.5 J.1 (GB18030) and J.2 (UTF-8, traditional Dong), and GBK. */
    {"J.1", "GB18030", "Wang^XiaoDong=\xCD\xF5^\xD0\xA1\xB6\xAB=", 0, PN,
     "Wang^XiaoDong=" WANG "^" XIAODONG_S "=", 0},
    {"J.2", "ISO_IR 192", "Wang^XiaoDong=\xE7\x8E\x8B^\xE5\xB0\x8F\xE6\x9D\xB1=", 0, PN,
     "Wang^XiaoDong=" WANG "^" XIAODONG_T "=", 0},
    {"GBK", "GBK", "Wang^XiaoDong=\xCD\xF5^\xD0\xA1\xB6\xAB=", 0, PN,
     "Wang^XiaoDong=" WANG "^" XIAODONG_S "=", 0},
    {"GB18030 4-byte", "GB18030", "\x81\x30\x81\x30", 0, LO, "\xC2\x80", 0},
    /* PS3.5 J.3: GB 2312 in G1 through ISO 2022 IR 58. */
    {"J.3", "\\ISO 2022 IR 58", "Zhang^XiaoDong=" ESC "$)A\xD5\xC5^" ESC "$)A\xD0\xA1\xB6\xAB=", 0,
     PN, "Zhang^XiaoDong=" ZHANG "^" XIAODONG_S "=", 0},
    /* JIS X 0212 (ISO 2022 IR 159) through ESC $ ( D: 0x3021 is U+4E02. */
    {"IR 159", "\\ISO 2022 IR 87\\ISO 2022 IR 159", "A" ESC "$(D0!" ESC "(B", 0, LO,
     "A\xE4\xB8\x82", 0},

    /* Every single-byte set, without and with code extensions. */
    {"IR 100", "ISO_IR 100", "\xE9", 0, LO, "\xC3\xA9", 0},
    {"IR 101", "ISO_IR 101", "\xB1", 0, LO, "\xC4\x85", 0},
    {"IR 109", "ISO_IR 109", "\xB6", 0, LO, "\xC4\xA5", 0},
    {"IR 110", "ISO_IR 110", "\xA2", 0, LO, "\xC4\xB8", 0},
    {"IR 144", "ISO_IR 144", "\xD0", 0, LO, "\xD0\xB0", 0},
    {"IR 127", "ISO_IR 127", "\xC7", 0, LO, "\xD8\xA7", 0},
    {"IR 126", "ISO_IR 126", "\xC1", 0, LO, "\xCE\x91", 0},
    {"IR 138", "ISO_IR 138", "\xE0", 0, LO, "\xD7\x90", 0},
    {"IR 148", "ISO_IR 148", "\xFD", 0, LO, "\xC4\xB1", 0},
    {"IR 203", "ISO_IR 203", "\xA4", 0, LO, "\xE2\x82\xAC", 0},
    {"IR 166", "ISO_IR 166", "\xA1", 0, LO, "\xE0\xB8\x81", 0},
    {"IR 13", "ISO_IR 13", "\xB1", 0, LO, "\xEF\xBD\xB1", 0},
    {"2022 IR 100", "ISO 2022 IR 100", ESC "-A\xE9", 0, LO, "\xC3\xA9", 0},
    {"2022 IR 101", "\\ISO 2022 IR 101", ESC "-B\xB1", 0, LO, "\xC4\x85", 0},
    {"2022 IR 109", "\\ISO 2022 IR 109", ESC "-C\xB6", 0, LO, "\xC4\xA5", 0},
    {"2022 IR 110", "\\ISO 2022 IR 110", ESC "-D\xA2", 0, LO, "\xC4\xB8", 0},
    {"2022 IR 144", "\\ISO 2022 IR 144", ESC "-L\xD0", 0, LO, "\xD0\xB0", 0},
    {"2022 IR 127", "\\ISO 2022 IR 127", ESC "-G\xC7", 0, LO, "\xD8\xA7", 0},
    {"2022 IR 126", "\\ISO 2022 IR 126", ESC "-F\xC1", 0, LO, "\xCE\x91", 0},
    {"2022 IR 138", "\\ISO 2022 IR 138", ESC "-H\xE0", 0, LO, "\xD7\x90", 0},
    {"2022 IR 148", "\\ISO 2022 IR 148", ESC "-M\xFD", 0, LO, "\xC4\xB1", 0},
    {"2022 IR 203", "\\ISO 2022 IR 203", ESC "-b\xA4", 0, LO, "\xE2\x82\xAC", 0},
    {"2022 IR 166", "\\ISO 2022 IR 166", ESC "-T\xA1", 0, LO, "\xE0\xB8\x81", 0},
    {"2022 IR 13", "\\ISO 2022 IR 13", ESC ")I\xB1", 0, LO, "\xEF\xBD\xB1", 0},
    /* Two G1 sets in one value: Latin-1 then Greek, back to Latin-1. */
    {"G1 switch", "ISO 2022 IR 100\\ISO 2022 IR 126", "\xE9" ESC "-F\xC1" ESC "-A\xE9", 0, LO,
     "\xC3\xA9\xCE\x91\xC3\xA9", 0},

    /* No (0008,0005): Latin-1 unless the value is valid UTF-8, flagged. */
    {"no SCS latin-1", NULL, "M\xFCller^J\xFCrgen", 0, PN, "M\xC3\xBCller^J\xC3\xBCrgen", GUESSED},
    {"empty SCS latin-1", "", "M\xFCller", 0, PN, "M\xC3\xBCller", GUESSED},
    {"blank SCS latin-1", "  ", "M\xFCller", 0, PN, "M\xC3\xBCller", GUESSED},
    {"no SCS utf-8", NULL, "M\xC3\xBCller", 0, PN, "M\xC3\xBCller", GUESSED},
    {"no SCS ascii", NULL, "Doe^John", 0, PN, "Doe^John", 0},
    {"no SCS C1", NULL, "\x85", 0, LO, "\xC2\x85", GUESSED},

    /* Spelling of the terms. */
    {"lower case", "iso_ir 100", "\xE9", 0, LO, "\xC3\xA9", NONSTD},
    {"padded", "ISO_IR 100 ", "\xE9", 0, LO, "\xC3\xA9", 0},
    {"leading space", " ISO_IR 100", "\xE9", 0, LO, "\xC3\xA9", NONSTD},
    {"space for _", "ISO IR 100", "\xE9", 0, LO, "\xC3\xA9", NONSTD},
    {"lower 2022", "\\iso 2022 ir 87", ESC "$B;3ED", 0, LO, YAMADA, NONSTD},
    {"lower gb18030", "gb18030", "\xCD\xF5", 0, LO, WANG, NONSTD},
    {"ISO_IR 6", "ISO_IR 6", "abc", 0, LO, "abc", NONSTD},
    {"explicit IR 6", "ISO 2022 IR 6\\ISO 2022 IR 87", ESC "$B;3ED" ESC "(B", 0, LO, YAMADA, 0},
    {"utf-8 with others", "ISO_IR 192\\ISO 2022 IR 87", "\xC3\xA9", 0, LO, "\xC3\xA9", NONSTD},

    /* Unknown terms: ASCII decoded, the rest escaped. */
    {"unknown", "ISO_IR 999", "Ab\xE9", 0, LO, "Ab" SIG "E9", UNKNOWN | LOSSY},
    {"unknown ascii", "KOI8-R", "Ab", 0, LO, "Ab", UNKNOWN},
    {"unknown second", "ISO_IR 100\\FOO", "\xE9", 0, LO, "\xC3\xA9", UNKNOWN},

    /* Invalid UTF-8 under ISO_IR 192: each bad byte escaped on its own. */
    {"utf-8 bad lead", "ISO_IR 192", "A\xC3(", 0, LO, "A" SIG "C3(", LOSSY},
    {"utf-8 overlong", "ISO_IR 192", "\xC0\xAF", 0, LO, SIG "C0" SIG "AF", LOSSY},
    {"utf-8 surrogate", "ISO_IR 192", "\xED\xA0\x80", 0, LO, SIG "ED" SIG "A0" SIG "80", LOSSY},
    {"utf-8 too high", "ISO_IR 192", "\xF4\x90\x80\x80", 0, LO, SIG "F4" SIG "90" SIG "80" SIG "80",
     LOSSY},
    {"utf-8 literal sigil", "ISO_IR 192",
     "\xEF\xBF\xBD"
     "FC",
     0, LO, SIG SIG "FC", 0},

    /* Sequences cut off at the end of the value. */
    {"cut utf-8", "ISO_IR 192", "\xE7\x8E", 0, LO, SIG "E7" SIG "8E", LOSSY},
    {"cut gb18030", "GB18030", "\xCD\xF5\xCD", 0, LO, WANG SIG "CD", LOSSY},
    {"cut gb18030 4", "GB18030", "\x81\x30\x81", 0, LO, SIG "81" SIG "30" SIG "81", LOSSY},
    {"cut jis", "\\ISO 2022 IR 87", ESC "$B;3E", 0, LO, "\xE5\xB1\xB1" SIG "45", LOSSY},
    {"cut ksx", "\\ISO 2022 IR 149", ESC "$)C\xFB\xF3\xD1", 0, LO, HONG_HANJA SIG "D1", LOSSY},
    {"cut escape", "\\ISO 2022 IR 87", "A" ESC "$", 0, LO, "A" SIG "1B$", LOSSY},

    /* Stray escapes and bytes nothing is designated for. */
    {"stray ESC", "\\ISO 2022 IR 87", "A" ESC "Z", 0, LO, "A" SIG "1BZ", LOSSY},
    {"ESC in latin-1", "ISO_IR 100", "A" ESC "\xE9", 0, LO, "A" SIG "1B\xC3\xA9", LOSSY},
    {"undeclared escape", "ISO_IR 100", ESC "$B;3ED" ESC "(B", 0, LO, YAMADA, UNDECL},
    {"GR without G1", "\\ISO 2022 IR 87", "\xE9", 0, LO, SIG "E9", LOSSY},
    {"hole in 8859-3", "ISO_IR 109", "a\xA5z", 0, LO, "a" SIG "A5z", LOSSY},
    {"katakana range", "ISO_IR 13", "\xB1\xE0", 0, LO, "\xEF\xBD\xB1" SIG "E0", LOSSY},
    {"NUL", "ISO_IR 100", "A\0B", 3, LO, "A" SIG "00B", LOSSY},
    {"bad jis pair", "\\ISO 2022 IR 87", ESC "$B\x7F!", 0, LO, SIG "7F" SIG "21", LOSSY},

    /* Delimiters reset the state to value 1 (PS3.5 6.1.2.5.3): G1 here. */
    {"PN resets at ^ =", "ISO 2022 IR 100\\ISO 2022 IR 126", ESC "-F\xC1^\xC1=" ESC "-F\xC1", 0, PN,
     "\xCE\x91^\xC3\x81=\xCE\x91", 0},
    {"LO resets at \\", "ISO 2022 IR 100\\ISO 2022 IR 126", ESC "-F\xC1\\\xC1", 0, LO,
     "\xCE\x91\\\xC3\x81", 0},
    {"LO keeps ^", "ISO 2022 IR 100\\ISO 2022 IR 126", ESC "-F\xC1^\xC1", 0, LO,
     "\xCE\x91^\xCE\x91", 0},
    {"LT keeps \\", "ISO 2022 IR 100\\ISO 2022 IR 126", ESC "-F\xC1\\\xC1", 0, LT,
     "\xCE\x91\\\xCE\x91", 0},
    {"LT resets at CR LF", "ISO 2022 IR 100\\ISO 2022 IR 126", ESC "-F\xC1\r\n\xC1", 0, LT,
     "\xCE\x91\r\n\xC3\x81", 0},
    /* In a 94x94 G0 set the delimiter bytes are halves of characters (the
     * encoder had to switch back first); control characters still reset. */
    {"^ in JIS", "\\ISO 2022 IR 87", ESC "$B;3ED^;", 0, PN, YAMADA "\xE6\xB7\xB9", 0},
    {"\\ in JIS", "\\ISO 2022 IR 87", ESC "$B;3ED\\;", 0, LO, YAMADA "\xE6\xA4\xB9", 0},
    {"JIS, ASCII, ^", "\\ISO 2022 IR 87", ESC "$B;3ED" ESC "(B^;3", 0, PN, YAMADA "^;3", 0},
    {"JIS resets at CR LF", "\\ISO 2022 IR 87", ESC "$B;3ED\r\n;3", 0, LT, YAMADA "\r\n;3", 0},
    {"JIS resets at TAB", "\\ISO 2022 IR 87", ESC "$B;3\t;3", 0, LT, "\xE5\xB1\xB1\t;3", 0},
    {"space in JIS", "\\ISO 2022 IR 87", ESC "$B;3 ED", 0, LO, "\xE5\xB1\xB1 \xE7\x94\xB0", 0},
    {"G1 reset", "ISO 2022 IR 100\\ISO 2022 IR 126", ESC "-F\xC1\\\xC1", 0, LO,
     "\xCE\x91\\\xC3\x81", 0},
    {"empty", "ISO_IR 100", "", 0, LO, "", 0},
};

static void test_rows(void **state)
{
    (void)state;
    int failed = 0;
    for (size_t i = 0; i < SP_ARRAY_LEN(rows); i++) {
        const cs_row_t *r = &rows[i];
        size_t len = r->len ? r->len : strlen(r->in);
        char *out = NULL;
        unsigned flags = 99;
        int rc = charset_to_utf8(r->scs, (const uint8_t *)r->in, len, r->vr, &out, &flags);
        if (rc != 0 || !out || strcmp(out, r->expected) != 0 || flags != r->flags) {
            printf("row '%s': rc %d flags %#x (want %#x) out '%s' want '%s'\n", r->name, rc, flags,
                   r->flags, out ? out : "(null)", r->expected);
            failed++;
        }
        free(out);
    }
    assert_int_equal(failed, 0);
}

static void test_null_args(void **state)
{
    (void)state;
    char *out = NULL;
    unsigned flags;
    assert_int_equal(charset_to_utf8("", NULL, 1, LO, &out, &flags), SP_EINVAL);
    assert_int_equal(charset_to_utf8("", (const uint8_t *)"a", 1, LO, NULL, &flags), SP_EINVAL);
    assert_int_equal(charset_to_utf8("", (const uint8_t *)"a", 1, LO, &out, NULL), SP_EINVAL);
    /* An empty value may come as NULL and still gives "", never NULL. */
    assert_int_equal(charset_to_utf8(NULL, NULL, 0, PN, &out, &flags), 0);
    assert_non_null(out);
    assert_string_equal(out, "");
    assert_int_equal(flags, 0);
    free(out);
    uint8_t *raw;
    size_t n;
    assert_int_equal(charset_unescape(NULL, &raw, &n), SP_EINVAL);
    assert_string_equal(charset_flag_name(CHARSET_GUESSED), "character set guessed");
}

/* Ten thousand undecodable bytes: all escaped, and back to themselves. */
static void test_many_escapes(void **state)
{
    (void)state;
    size_t n = 10000;
    uint8_t *in = sp_malloc(n);
    for (size_t i = 0; i < n; i++)
        in[i] = (uint8_t)(0x80 + i % 64);
    char *out;
    unsigned flags;
    assert_int_equal(charset_to_utf8("ISO_IR 192", in, n, LO, &out, &flags), 0);
    assert_int_equal(flags, LOSSY);
    assert_int_equal(strlen(out), 5 * n);
    uint8_t *back;
    size_t back_len;
    assert_int_equal(charset_unescape(out, &back, &back_len), 0);
    assert_int_equal(back_len, n);
    assert_memory_equal(back, in, n);
    free(back);
    free(out);
    /* The same under ISO 2022: every byte after a stray ESC, escapes in between. */
    for (size_t i = 0; i < n; i++)
        in[i] = i % 3 == 0 ? 0x1B : (uint8_t)(0xA0 + i % 7);
    assert_int_equal(charset_to_utf8("\\ISO 2022 IR 87", in, n, PN, &out, &flags), 0);
    assert_int_equal(flags, LOSSY);
    assert_int_equal(charset_unescape(out, &back, &back_len), 0);
    assert_int_equal(back_len, n);
    assert_memory_equal(back, in, n);
    free(back);
    free(out);
    free(in);
}

static uint64_t rng_state = 0x9E3779B97F4A7C15u;

static uint32_t rng(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 16);
}

/* Bytes that stress the escaped form: the sigil's own bytes, hex digits,
 * delimiters, ESC, NUL, UTF-8 lead and continuation bytes. */
static const uint8_t alphabet[] = {'A',  'F',  '0',  '\\', '^',  0x00, 0x1B, 0x80, 0xBD,
                                   0xBF, 0xC3, 0xE7, 0xEF, 0xFF, '$',  'B',  '(',  ')'};

/* The same without what spells an escape sequence. */
static const uint8_t alphabet3[] = {'A',  'F',  '0',  '\\', '^',  0x00, 0x1B, 0x80,
                                    0xA1, 0xBD, 0xBF, 0xC3, 0xE7, 0xEF, 0xFF};

/* Where the decoded text is the input (UTF-8) or nothing but ASCII and
 * escapes (an unknown term), unescaping gives back the very input. */
static void test_round_trip(void **state)
{
    (void)state;
    static const char *const scs[] = {"ISO_IR 192", "ISO_IR 999"};
    for (int iter = 0; iter < 20000; iter++) {
        uint8_t in[24];
        size_t n = rng() % sizeof in;
        for (size_t i = 0; i < n; i++)
            in[i] = alphabet[rng() % sizeof alphabet];
        if (iter % 5 == 0 && n >= 3)
            memcpy(in + rng() % (n - 2), SIG, 3);
        const char *s = scs[iter % 2];
        char *out;
        unsigned flags;
        assert_int_equal(charset_to_utf8(s, in, n, PN, &out, &flags), 0);
        uint8_t *back;
        size_t back_len;
        assert_int_equal(charset_unescape(out, &back, &back_len), 0);
        if (back_len != n || memcmp(back, in, n) != 0) {
            printf("round trip under %s failed, output '%s'\n", s, out);
            fail();
        }
        free(back);
        free(out);
    }
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Every string of up to three bytes over the alphabet gives a distinct
 * output under each character set: no two inputs collide in the index. The
 * alphabet cannot spell an escape sequence on purpose: a redundant one ("A"
 * and "ESC ( B A") decodes to the same text by definition. Nor is the guess
 * without (0008,0005) here: UTF-8 "\xC3\xBF" and Latin-1 "\xFF" both are y
 * with diaeresis, the price of reading both. */
static void test_distinct(void **state)
{
    (void)state;
    static const char *const scs[] = {
        "ISO_IR 192", "ISO_IR 999", "ISO_IR 100", "GB18030",
        "GBK",        "ISO_IR 109", "ISO_IR 13",  "\\ISO 2022 IR 149"};
    size_t a = sizeof alphabet3, total = 1 + a + a * a + a * a * a;
    char **outs = sp_calloc(total, sizeof *outs);
    for (size_t s = 0; s < SP_ARRAY_LEN(scs); s++) {
        size_t k = 0;
        for (size_t len = 0; len <= 3; len++) {
            size_t count = len == 0 ? 1 : len == 1 ? a : len == 2 ? a * a : a * a * a;
            for (size_t c = 0; c < count; c++) {
                uint8_t in[3];
                size_t v = c;
                for (size_t i = 0; i < len; i++, v /= a)
                    in[i] = alphabet3[v % a];
                unsigned flags;
                assert_int_equal(charset_to_utf8(scs[s], in, len, LO, &outs[k++], &flags), 0);
            }
        }
        assert_int_equal(k, total);
        qsort(outs, total, sizeof *outs, cmp_str);
        for (size_t i = 1; i < total; i++) {
            if (strcmp(outs[i - 1], outs[i]) == 0) {
                printf("collision under %s: '%s'\n", scs[s] ? scs[s] : "(none)", outs[i]);
                fail();
            }
        }
        for (size_t i = 0; i < total; i++)
            free(outs[i]);
    }
    free(outs);
}

static void *thread_main(void *arg)
{
    const cs_row_t *r = arg;
    for (int i = 0; i < 5000; i++) {
        char *out;
        unsigned flags;
        if (charset_to_utf8(r->scs, (const uint8_t *)r->in, strlen(r->in), r->vr, &out, &flags) !=
                0 ||
            strcmp(out, r->expected) != 0)
            return (void *)1;
        free(out);
    }
    return NULL;
}

/* Worker threads convert at once with their own iconv descriptors. */
static void test_threads(void **state)
{
    (void)state;
    pthread_t t[4];
    for (size_t i = 0; i < 4; i++)
        assert_int_equal(pthread_create(&t[i], NULL, thread_main, (void *)&rows[i % 3]), 0);
    for (size_t i = 0; i < 4; i++) {
        void *res;
        assert_int_equal(pthread_join(t[i], &res), 0);
        assert_null(res);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rows),         cmocka_unit_test(test_null_args),
        cmocka_unit_test(test_many_escapes), cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_distinct),     cmocka_unit_test(test_threads),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
