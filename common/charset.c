/* charset.c - DICOM string values to UTF-8 (see charset.h for the contract
 * and the escaped form).
 *
 * The value of (0008,0005) is parsed into an initial ISO 2022 state (what G0
 * and G1 hold at the start of the value and after every delimiter) and the
 * set of code elements it declares. A small state machine then walks the
 * bytes: escape sequences (PS3.3 Table C.12-3/C.12-4) change G0 or G1,
 * delimiters reset both, and each run of bytes between them is decoded by
 * whatever G0 (bytes < 0x80) and G1 (bytes >= 0x80) hold. glibc's iconv
 * decodes one code element at a time: JIS X 0208 and 0212 through EUC-JP
 * (high bits set, 0x8F prefix for 0212), KS X 1001 through EUC-KR, GB 2312
 * through EUC-CN, the 96-character sets through ISO-8859-n. UTF-8, GB18030
 * and GBK admit no code extensions and are decoded whole.
 *
 * Any thread may call it; iconv descriptors are per thread (an iconv_t keeps
 * conversion state and must not be shared) and closed at thread exit. */
#include "charset.h"

#include "base.h"

#include <ctype.h>
#include <errno.h>
#include <iconv.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ESC 0x1B

/* The converters this file asks glibc for, by index. */
enum {
    CV_8859_1,
    CV_8859_2,
    CV_8859_3,
    CV_8859_4,
    CV_8859_5,
    CV_8859_6,
    CV_8859_7,
    CV_8859_8,
    CV_8859_9,
    CV_8859_11,
    CV_8859_15,
    CV_EUC_JP,
    CV_EUC_KR,
    CV_EUC_CN,
    CV_GB18030,
    CV_GBK,
    CV_COUNT,
    CV_NONE = -1,
};

/* ISO-8859-11 rather than TIS-620 for ISO-IR 166: only the former has NBSP
 * at 0xA0, which the DICOM repertoire includes. */
static const char *const cv_names[CV_COUNT] = {
    [CV_8859_1] = "ISO-8859-1",   [CV_8859_2] = "ISO-8859-2",
    [CV_8859_3] = "ISO-8859-3",   [CV_8859_4] = "ISO-8859-4",
    [CV_8859_5] = "ISO-8859-5",   [CV_8859_6] = "ISO-8859-6",
    [CV_8859_7] = "ISO-8859-7",   [CV_8859_8] = "ISO-8859-8",
    [CV_8859_9] = "ISO-8859-9",   [CV_8859_11] = "ISO-8859-11",
    [CV_8859_15] = "ISO-8859-15", [CV_EUC_JP] = "EUC-JP",
    [CV_EUC_KR] = "EUC-KR",       [CV_EUC_CN] = "EUC-CN",
    [CV_GB18030] = "GB18030",     [CV_GBK] = "GBK",
};

/* How a code element turns bytes into characters. */
typedef enum {
    K_NONE,     /* nothing designated: every byte is escaped */
    K_ASCII,    /* ISO-IR 6, and JIS X 0201 Romaji (see E_ROMAJI) */
    K_KATAKANA, /* JIS X 0201 Katakana in GR: 0xA1..0xDF are U+FF61..U+FF9F */
    K_SB,       /* a 96-character set in GR, decoded by iconv */
    K_JIS,      /* 94x94 set in GL (JIS X 0208): EUC-JP with high bits set */
    K_JIS3,     /* JIS X 0212 in GL: EUC-JP's 0x8F single shift, high bits set */
    K_DBGR,     /* 94x94 set in GR (KS X 1001, GB 2312): EUC bytes as they are */
} kind_t;

/* Code elements, the things G0 and G1 can hold. */
enum {
    E_NONE,
    E_ASCII,
    /* JIS X 0201 Romaji differs from ASCII only at 0x5C (YEN SIGN) and 0x7E
     * (OVERLINE). It is decoded as ASCII: 0x5C is DICOM's value delimiter
     * whatever G0 holds, and queries typed in ASCII must find these names. */
    E_ROMAJI,
    E_KATAKANA,
    E_LATIN1,
    E_LATIN2,
    E_LATIN3,
    E_LATIN4,
    E_CYRILLIC,
    E_ARABIC,
    E_GREEK,
    E_HEBREW,
    E_LATIN5,
    E_LATIN9,
    E_THAI,
    E_JIS0208,
    E_JIS0212,
    E_KSX1001,
    E_GB2312,
    E_COUNT,
};

typedef struct {
    kind_t kind;
    int cv;    /* converter for K_SB, K_JIS*, K_DBGR */
    bool g1;   /* designated to G1 (else G0) */
    bool wide; /* a multi-byte set: never G0 at the start of a value */
} element_t;

static const element_t elements[E_COUNT] = {
    [E_NONE] = {K_NONE, CV_NONE, true, false},
    [E_ASCII] = {K_ASCII, CV_NONE, false, false},
    [E_ROMAJI] = {K_ASCII, CV_NONE, false, false},
    [E_KATAKANA] = {K_KATAKANA, CV_NONE, true, false},
    [E_LATIN1] = {K_SB, CV_8859_1, true, false},
    [E_LATIN2] = {K_SB, CV_8859_2, true, false},
    [E_LATIN3] = {K_SB, CV_8859_3, true, false},
    [E_LATIN4] = {K_SB, CV_8859_4, true, false},
    [E_CYRILLIC] = {K_SB, CV_8859_5, true, false},
    [E_ARABIC] = {K_SB, CV_8859_6, true, false},
    [E_GREEK] = {K_SB, CV_8859_7, true, false},
    [E_HEBREW] = {K_SB, CV_8859_8, true, false},
    [E_LATIN5] = {K_SB, CV_8859_9, true, false},
    [E_LATIN9] = {K_SB, CV_8859_15, true, false},
    [E_THAI] = {K_SB, CV_8859_11, true, false},
    [E_JIS0208] = {K_JIS, CV_EUC_JP, false, true},
    [E_JIS0212] = {K_JIS3, CV_EUC_JP, false, true},
    [E_KSX1001] = {K_DBGR, CV_EUC_KR, true, true},
    [E_GB2312] = {K_DBGR, CV_EUC_CN, true, true},
};

/* The escape sequences of PS3.3 Table C.12-3 and C.12-4 (bytes after ESC). */
static const struct {
    const char *seq;
    int element;
} escapes[] = {
    {"(B", E_ASCII},    {"(J", E_ROMAJI},   {")I", E_KATAKANA}, {"-A", E_LATIN1}, {"-B", E_LATIN2},
    {"-C", E_LATIN3},   {"-D", E_LATIN4},   {"-L", E_CYRILLIC}, {"-G", E_ARABIC}, {"-F", E_GREEK},
    {"-H", E_HEBREW},   {"-M", E_LATIN5},   {"-b", E_LATIN9},   {"-T", E_THAI},   {"$B", E_JIS0208},
    {"$(D", E_JIS0212}, {"$)C", E_KSX1001}, {"$)A", E_GB2312},
};

/* How a whole value is decoded. */
typedef enum {
    MODE_ISO2022, /* the state machine (also single-byte sets without extensions) */
    MODE_UTF8,    /* ISO_IR 192 */
    MODE_GB18030,
    MODE_GBK,
    MODE_GUESS,   /* no (0008,0005): UTF-8 when valid, else Latin-1 */
    MODE_UNKNOWN, /* no term known: ASCII, everything else escaped (ESC too) */
} decode_mode_t;

/* The defined terms by their registration number: what G0 and G1 hold when
 * the term is value 1. A multi-byte G0 set (87, 159) as value 1 still starts
 * in ASCII, as in every implementation: its characters always follow an
 * escape sequence. */
static const struct {
    const char *ir;
    int g0, g1;
    decode_mode_t mode;
    bool ext_only; /* defined only as "ISO 2022 IR n" */
} terms[] = {
    {"6", E_ASCII, E_NONE, MODE_ISO2022, false},
    {"100", E_ASCII, E_LATIN1, MODE_ISO2022, false},
    {"101", E_ASCII, E_LATIN2, MODE_ISO2022, false},
    {"109", E_ASCII, E_LATIN3, MODE_ISO2022, false},
    {"110", E_ASCII, E_LATIN4, MODE_ISO2022, false},
    {"144", E_ASCII, E_CYRILLIC, MODE_ISO2022, false},
    {"127", E_ASCII, E_ARABIC, MODE_ISO2022, false},
    {"126", E_ASCII, E_GREEK, MODE_ISO2022, false},
    {"138", E_ASCII, E_HEBREW, MODE_ISO2022, false},
    {"148", E_ASCII, E_LATIN5, MODE_ISO2022, false},
    {"203", E_ASCII, E_LATIN9, MODE_ISO2022, false},
    {"166", E_ASCII, E_THAI, MODE_ISO2022, false},
    {"13", E_ROMAJI, E_KATAKANA, MODE_ISO2022, false},
    {"87", E_JIS0208, E_NONE, MODE_ISO2022, true},
    {"159", E_JIS0212, E_NONE, MODE_ISO2022, true},
    {"149", E_ASCII, E_KSX1001, MODE_ISO2022, true},
    {"58", E_ASCII, E_GB2312, MODE_ISO2022, true},
    {"192", E_ASCII, E_NONE, MODE_UTF8, false},
};

/* The parsed (0008,0005). */
typedef struct {
    decode_mode_t mode;
    int g0, g1;        /* state at the start and after each delimiter */
    uint32_t declared; /* bit per element the attribute names */
    int fallback_g1;   /* the one declared G1 set, for GR bytes with G1 empty */
} spec_t;

/* The growing output and the warnings found so far. */
typedef struct {
    char *p;
    size_t len, cap;
    unsigned flags;
} out_t;

static void out_reserve(out_t *o, size_t n)
{
    if (o->cap - o->len >= n + 1)
        return;
    size_t cap = o->cap ? o->cap : 64;
    while (cap - o->len < n + 1)
        cap *= 2;
    o->p = sp_realloc(o->p, cap);
    o->cap = cap;
}

static void out_mem(out_t *o, const void *p, size_t n)
{
    /* An empty value may come as NULL, which memcpy must never see. */
    if (n == 0)
        return;
    out_reserve(o, n);
    memcpy(o->p + o->len, p, n);
    o->len += n;
}

static void out_byte(out_t *o, uint8_t b)
{
    out_reserve(o, 1);
    o->p[o->len++] = (char)b;
}

/* Writes one undecodable byte in the escaped form (see charset.h). */
static void out_escape(out_t *o, uint8_t b)
{
    static const char hex[] = "0123456789ABCDEF";
    char e[5] = {'\xEF', '\xBF', '\xBD', hex[b >> 4], hex[b & 15]};
    out_mem(o, e, sizeof e);
    o->flags |= CHARSET_LOSSY_ESCAPED;
}

static void out_escape_all(out_t *o, const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        out_escape(o, p[i]);
}

/* A code point below U+10000 in UTF-8. */
static void out_bmp(out_t *o, unsigned cp)
{
    uint8_t u[3];
    if (cp < 0x80) {
        out_byte(o, (uint8_t)cp);
    } else if (cp < 0x800) {
        u[0] = (uint8_t)(0xC0 | (cp >> 6));
        u[1] = (uint8_t)(0x80 | (cp & 0x3F));
        out_mem(o, u, 2);
    } else {
        u[0] = (uint8_t)(0xE0 | (cp >> 12));
        u[1] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
        u[2] = (uint8_t)(0x80 | (cp & 0x3F));
        out_mem(o, u, 3);
    }
}

/* Doubles every U+FFFD that decoding wrote from offset start on, so that a
 * replacement character the input really contains cannot be mistaken for
 * the sigil of an escaped byte. Rare: only a memchr in the common case. */
static void out_double_sigils(out_t *o, size_t start)
{
    for (size_t pos = start; pos + 3 <= o->len;) {
        const char *hit = memchr(o->p + pos, '\xEF', o->len - pos - 2);
        if (!hit)
            return;
        pos = (size_t)(hit - o->p);
        if (memcmp(hit, CHARSET_ESCAPE_SIGIL, 3) != 0) {
            pos++;
            continue;
        }
        out_reserve(o, 3);
        memmove(o->p + pos + 3, o->p + pos, o->len - pos);
        o->len += 3;
        pos += 6;
    }
}

/* Per-thread iconv descriptors, opened on first use. */
typedef struct {
    iconv_t cd[CV_COUNT];
    bool tried[CV_COUNT];
} cv_cache_t;

static pthread_key_t cv_key;
static pthread_once_t cv_once = PTHREAD_ONCE_INIT;

static void cv_cache_free(void *p)
{
    cv_cache_t *c = p;
    for (int i = 0; i < CV_COUNT; i++)
        if (c->tried[i] && c->cd[i] != (iconv_t)-1)
            iconv_close(c->cd[i]);
    free(c);
}

static void cv_key_init(void)
{
    SP_ASSERT(pthread_key_create(&cv_key, cv_cache_free) == 0);
}

/* The calling thread's descriptor for converter cv to UTF-8, or (iconv_t)-1
 * when this glibc lacks it (its bytes are then escaped). */
static iconv_t cv_get(int cv)
{
    SP_ASSERT(cv >= 0 && cv < CV_COUNT);
    pthread_once(&cv_once, cv_key_init);
    cv_cache_t *c = pthread_getspecific(cv_key);
    if (!c) {
        c = sp_calloc(1, sizeof *c);
        SP_ASSERT(pthread_setspecific(cv_key, c) == 0);
    }
    if (!c->tried[cv]) {
        c->cd[cv] = iconv_open("UTF-8", cv_names[cv]);
        c->tried[cv] = true;
    }
    return c->cd[cv];
}

/* Converts in[0..len) with converter cv, appending to o. Returns 0 when all
 * of it converted, else EILSEQ (an invalid sequence starts at in[*done]),
 * EINVAL (in[*done..len) is an incomplete sequence) or ENOENT (no such
 * converter, *done = 0). */
static int conv(out_t *o, int cv, const uint8_t *in, size_t len, size_t *done)
{
    iconv_t cd = cv_get(cv);
    *done = 0;
    if (cd == (iconv_t)-1)
        return ENOENT;
    iconv(cd, NULL, NULL, NULL, NULL);
    char *ip = (char *)(uintptr_t)in;
    size_t il = len;
    for (;;) {
        /* Four output bytes per input byte covers every converter here. */
        out_reserve(o, il * 4 + 8);
        size_t start = o->len;
        char *op = o->p + o->len;
        size_t ol = o->cap - o->len - 1;
        size_t r = iconv(cd, &ip, &il, &op, &ol);
        int err = errno;
        o->len = (size_t)(op - o->p);
        out_double_sigils(o, start);
        if (r != (size_t)-1) {
            *done = len;
            return 0;
        }
        if (err == E2BIG)
            continue;
        *done = len - il;
        return err == EINVAL ? EINVAL : EILSEQ;
    }
}

/* Decodes a run with converter cv, escaping what it refuses: `unit` bytes
 * for an invalid sequence (2 keeps a double-byte set aligned) and the rest
 * for an incomplete one at the end. */
static void conv_run(out_t *o, int cv, const uint8_t *p, size_t n, size_t unit)
{
    while (n > 0) {
        size_t done;
        int err = conv(o, cv, p, n, &done);
        if (err == 0)
            return;
        p += done;
        n -= done;
        size_t bad = err == EILSEQ ? (unit < n ? unit : n) : n;
        out_escape_all(o, p, bad);
        p += bad;
        n -= bad;
    }
}

/* conv_run over a whole value that may hold NUL bytes, which are escaped:
 * iconv would copy them and cut the output string short. */
static void conv_nul(out_t *o, int cv, const uint8_t *p, size_t n)
{
    while (n > 0) {
        const uint8_t *nul = memchr(p, 0, n);
        size_t k = nul ? (size_t)(nul - p) : n;
        conv_run(o, cv, p, k, 1);
        if (!nul)
            return;
        out_escape(o, 0);
        p += k + 1;
        n -= k + 1;
    }
}

/* Bytes < 0x80 under G0 element g0 (no ESC, no delimiter among them). */
static void decode_gl(out_t *o, int g0, const uint8_t *p, size_t n)
{
    const element_t *e = &elements[g0];
    if (e->kind == K_ASCII) {
        out_mem(o, p, n);
        return;
    }
    SP_ASSERT(e->kind == K_JIS || e->kind == K_JIS3);
    size_t i = 0;
    while (i < n) {
        /* SPACE is not part of a 94x94 set: it stays a space in ISO 2022. */
        if (p[i] == ' ') {
            out_byte(o, ' ');
            i++;
            continue;
        }
        if (i + 1 >= n || p[i] < 0x21 || p[i] > 0x7E || p[i + 1] < 0x21 || p[i + 1] > 0x7E) {
            out_escape(o, p[i]);
            i++;
            continue;
        }
        uint8_t euc[3];
        size_t k = 0, done;
        if (e->kind == K_JIS3)
            euc[k++] = 0x8F;
        euc[k++] = (uint8_t)(p[i] | 0x80);
        euc[k++] = (uint8_t)(p[i + 1] | 0x80);
        if (conv(o, e->cv, euc, k, &done) != 0)
            out_escape_all(o, p + i, 2);
        i += 2;
    }
}

/* Bytes >= 0x80 under G1 element g1. */
static void decode_gr(out_t *o, const spec_t *sp, int g1, const uint8_t *p, size_t n)
{
    if (g1 == E_NONE && sp->fallback_g1 != E_NONE) {
        /* A producer that designated G1 once per value rather than once
         * per name component: the only G1 set declared is the one meant. */
        g1 = sp->fallback_g1;
        o->flags |= CHARSET_GUESSED;
    }
    const element_t *e = &elements[g1];
    switch (e->kind) {
    case K_SB: conv_run(o, e->cv, p, n, 1); return;
    case K_DBGR: conv_run(o, e->cv, p, n, 2); return;
    case K_KATAKANA:
        for (size_t i = 0; i < n; i++) {
            if (p[i] >= 0xA1 && p[i] <= 0xDF)
                out_bmp(o, 0xFF61u + (p[i] - 0xA1u));
            else
                out_escape(o, p[i]);
        }
        return;
    default: out_escape_all(o, p, n); return;
    }
}

/* True when byte b ends a component or value for this VR, so the ISO 2022
 * state returns to value 1 (PS3.5 6.1.2.5.3). C0 controls (CR, LF, FF, TAB)
 * always do. The delimiters '\\', '^' and '=' do only while G0 holds a
 * single-byte set: the encoder must switch back before writing one, so in a
 * 94x94 set these bytes are halves of characters (the Annex H "ma" is 0x245E,
 * '$' '^'), as pydicom reads them too. */
static bool is_reset(uint8_t b, charset_vr_t vr, bool g0_wide)
{
    if (b < 0x20)
        return b != ESC;
    if (g0_wide)
        return false;
    if (b == '\\')
        return vr != CHARSET_VR_TEXT;
    return vr == CHARSET_VR_PN && (b == '^' || b == '=');
}

/* Recognises an escape sequence at p (p[0] is ESC): returns its length and
 * sets *element, or returns 0. */
static size_t match_escape(const uint8_t *p, size_t n, int *element)
{
    for (size_t i = 0; i < SP_ARRAY_LEN(escapes); i++) {
        size_t l = strlen(escapes[i].seq);
        if (n >= l + 1 && memcmp(p + 1, escapes[i].seq, l) == 0) {
            *element = escapes[i].element;
            return l + 1;
        }
    }
    return 0;
}

static void decode_2022(out_t *o, const spec_t *sp, const uint8_t *in, size_t len, charset_vr_t vr)
{
    int g0 = sp->g0, g1 = sp->g1;
    size_t i = 0;
    while (i < len) {
        uint8_t b = in[i];
        if (b == ESC) {
            int e;
            size_t l = match_escape(in + i, len - i, &e);
            if (l == 0) {
                out_escape(o, b);
                i++;
                continue;
            }
            if (!(sp->declared & (1u << e)))
                o->flags |= CHARSET_UNDECLARED_ESCAPE;
            if (elements[e].g1)
                g1 = e;
            else
                g0 = e;
            i += l;
            continue;
        }
        if (is_reset(b, vr, elements[g0].wide)) {
            g0 = sp->g0;
            g1 = sp->g1;
            if (b == 0)
                out_escape(o, b);
            else
                out_byte(o, b);
            i++;
            continue;
        }
        /* A run under one state, split into its GL and GR parts. */
        size_t j = i;
        while (j < len && in[j] != ESC && !is_reset(in[j], vr, elements[g0].wide))
            j++;
        while (i < j) {
            size_t k = i;
            bool gr = in[i] >= 0x80;
            while (k < j && (in[k] >= 0x80) == gr)
                k++;
            if (gr)
                decode_gr(o, sp, g1, in + i, k - i);
            else
                decode_gl(o, g0, in + i, k - i);
            i = k;
        }
    }
}

/* Length of the valid UTF-8 sequence at p (1..4), or 0 when it is not one
 * (overlong forms, surrogates and code points above U+10FFFF included). */
static size_t utf8_seq(const uint8_t *p, size_t n)
{
    uint8_t b = p[0];
    if (b < 0x80)
        return 1;
    size_t l;
    uint8_t lo = 0x80, hi = 0xBF;
    if (b >= 0xC2 && b <= 0xDF) {
        l = 2;
    } else if (b >= 0xE0 && b <= 0xEF) {
        l = 3;
        if (b == 0xE0)
            lo = 0xA0;
        if (b == 0xED)
            hi = 0x9F;
    } else if (b >= 0xF0 && b <= 0xF4) {
        l = 4;
        if (b == 0xF0)
            lo = 0x90;
        if (b == 0xF4)
            hi = 0x8F;
    } else {
        return 0;
    }
    if (n < l || p[1] < lo || p[1] > hi)
        return 0;
    for (size_t i = 2; i < l; i++)
        if (p[i] < 0x80 || p[i] > 0xBF)
            return 0;
    return l;
}

static bool utf8_valid(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n;) {
        size_t l = utf8_seq(p + i, n - i);
        if (l == 0 || p[i] == 0)
            return false;
        i += l;
    }
    return true;
}

static void decode_utf8(out_t *o, const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n;) {
        size_t l = utf8_seq(p + i, n - i);
        if (l == 0 || p[i] == 0) {
            out_escape(o, p[i]);
            i++;
            continue;
        }
        out_mem(o, p + i, l);
        if (l == 3 && memcmp(p + i, CHARSET_ESCAPE_SIGIL, 3) == 0)
            out_mem(o, p + i, l);
        i += l;
    }
}

/* Fills norm with s[0..n) trimmed of spaces, in upper case, with '_' and '-'
 * as spaces and runs of spaces as one: the forms senders actually write. */
static void term_normalise(const char *s, size_t n, char *norm, size_t size)
{
    while (n > 0 && (*s == ' ' || *s == '\t'))
        s++, n--;
    while (n > 0 && (s[n - 1] == ' ' || s[n - 1] == '\t'))
        n--;
    size_t k = 0;
    for (size_t i = 0; i < n && k + 1 < size; i++) {
        char c = (char)toupper((unsigned char)s[i]);
        if (c == '_' || c == '-')
            c = ' ';
        /* Runs of spaces count as one. */
        if (c == ' ' && k > 0 && norm[k - 1] == ' ')
            continue;
        norm[k++] = c;
    }
    norm[k] = '\0';
}

/* Looks one value of (0008,0005) up. Returns the index into terms[], -1 for
 * an empty value, -2 for an unknown term, -3 for GB18030, -4 for GBK.
 * Sets CHARSET_NONSTANDARD_TERM in *flags when the spelling is not exact. */
static int term_lookup(const char *s, size_t n, unsigned *flags)
{
    char norm[64], canon[64];
    if (n >= sizeof norm)
        return -2;
    term_normalise(s, n, norm, sizeof norm);
    /* The exact spelling of the value, for the non-standard check: only
     * trailing spaces (DICOM padding) are allowed. */
    size_t m = n;
    while (m > 0 && s[m - 1] == ' ')
        m--;
    if (norm[0] == '\0')
        return -1;
    int found = -2;
    bool ext = false;
    if (strcmp(norm, "GB18030") == 0) {
        snprintf(canon, sizeof canon, "GB18030");
        found = -3;
    } else if (strcmp(norm, "GBK") == 0) {
        snprintf(canon, sizeof canon, "GBK");
        found = -4;
    } else {
        const char *num = NULL;
        if (strncmp(norm, "ISO 2022 IR ", 12) == 0) {
            num = norm + 12;
            ext = true;
        } else if (strncmp(norm, "ISO IR ", 7) == 0) {
            num = norm + 7;
        }
        for (size_t i = 0; num && i < SP_ARRAY_LEN(terms); i++) {
            if (strcmp(num, terms[i].ir) == 0) {
                found = (int)i;
                break;
            }
        }
        if (found < 0)
            return -2;
        snprintf(canon, sizeof canon, ext ? "ISO 2022 IR %s" : "ISO_IR %s", terms[found].ir);
        /* "ISO_IR 6" is no defined term; "ISO 2022 IR 192" and "ISO_IR 87" neither. */
        if ((!ext && terms[found].ext_only) || (ext && terms[found].mode != MODE_ISO2022) ||
            (!ext && strcmp(terms[found].ir, "6") == 0))
            *flags |= CHARSET_NONSTANDARD_TERM;
    }
    if (m != strlen(canon) || memcmp(s, canon, m) != 0)
        *flags |= CHARSET_NONSTANDARD_TERM;
    return found;
}

/* Parses the raw (0008,0005) value into the decoder's initial state. */
static void spec_parse(const char *scs, spec_t *sp, unsigned *flags)
{
    memset(sp, 0, sizeof *sp);
    sp->mode = MODE_ISO2022;
    sp->g0 = E_ASCII;
    sp->g1 = E_NONE;
    sp->declared = 1u << E_ASCII;
    sp->fallback_g1 = E_NONE;
    bool any = false;
    for (const char *s = scs; s && *s; s++)
        if (*s != ' ')
            any = true;
    if (!any) {
        sp->mode = MODE_GUESS;
        sp->g1 = E_LATIN1;
        sp->declared |= 1u << E_LATIN1;
        return;
    }
    int g1_declared = 0, g1_last = E_NONE;
    bool known = false;
    const char *s = scs;
    for (int index = 0;; index++) {
        const char *end = strchr(s, '\\');
        size_t n = end ? (size_t)(end - s) : strlen(s);
        int t = term_lookup(s, n, flags);
        if (t == -2)
            *flags |= CHARSET_UNKNOWN_TERM;
        else if (t != -1)
            known = true;
        if (t == -2) {
            /* Ignored: value 1 stays ASCII, a later value adds nothing. */
        } else if (t == -3 || t == -4 || (t >= 0 && terms[t].mode != MODE_ISO2022)) {
            /* UTF-8, GB18030 and GBK admit no code extensions: as value 1
             * they decode the whole value, later they are ignored. */
            if (index == 0)
                sp->mode = t == -3 ? MODE_GB18030 : t == -4 ? MODE_GBK : terms[t].mode;
            if (index > 0 || end)
                *flags |= CHARSET_NONSTANDARD_TERM;
        } else if (t >= 0) {
            int g0 = terms[t].g0, g1 = terms[t].g1;
            sp->declared |= (1u << g0) | (1u << g1);
            if (g1 != E_NONE && g1 != g1_last) {
                g1_declared++;
                g1_last = g1;
            }
            if (index == 0) {
                sp->g0 = elements[g0].wide ? E_ASCII : g0;
                sp->g1 = g1;
            }
        }
        if (!end)
            break;
        s = end + 1;
    }
    if (sp->g1 == E_NONE && g1_declared == 1)
        sp->fallback_g1 = g1_last;
    /* With nothing but unknown terms even escape sequences are not read:
     * whatever they meant, the value then comes out whole and lossless. */
    if (!known && (*flags & CHARSET_UNKNOWN_TERM))
        sp->mode = MODE_UNKNOWN;
}

int charset_to_utf8(const char *specific_character_set, const uint8_t *in, size_t len,
                    charset_vr_t vr, char **out, unsigned *flags)
{
    if (!out || !flags || (!in && len > 0))
        return SP_EINVAL;
    spec_t sp;
    out_t o = {0};
    spec_parse(specific_character_set, &sp, &o.flags);
    out_reserve(&o, len + 16);

    /* ASCII without ESC or NUL reads the same in every character set here
     * (JIS X 0201 Romaji is read as ASCII, see E_ROMAJI). */
    bool ascii = true;
    for (size_t i = 0; i < len && ascii; i++)
        ascii = in[i] > 0 && in[i] < 0x80 && in[i] != ESC;
    if (ascii) {
        out_mem(&o, in, len);
    } else {
        switch (sp.mode) {
        case MODE_UTF8: decode_utf8(&o, in, len); break;
        case MODE_GB18030: conv_nul(&o, CV_GB18030, in, len); break;
        case MODE_GBK: conv_nul(&o, CV_GBK, in, len); break;
        case MODE_GUESS:
            o.flags |= CHARSET_GUESSED;
            if (!memchr(in, ESC, len) && utf8_valid(in, len))
                decode_utf8(&o, in, len);
            else
                decode_2022(&o, &sp, in, len, vr);
            break;
        case MODE_ISO2022: decode_2022(&o, &sp, in, len, vr); break;
        case MODE_UNKNOWN:
            for (size_t i = 0; i < len; i++) {
                if (in[i] > 0 && in[i] < 0x80 && in[i] != ESC)
                    out_byte(&o, in[i]);
                else
                    out_escape(&o, in[i]);
            }
            break;
        }
    }
    o.p[o.len] = '\0';
    *out = o.p;
    *flags = o.flags;
    return 0;
}

static int hexval(uint8_t c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

int charset_unescape(const char *s, uint8_t **out, size_t *out_len)
{
    if (!s || !out || !out_len)
        return SP_EINVAL;
    size_t n = strlen(s), k = 0;
    uint8_t *r = sp_malloc(n + 1);
    const uint8_t *p = (const uint8_t *)s;
    for (size_t i = 0; i < n;) {
        if (n - i >= 3 && memcmp(p + i, CHARSET_ESCAPE_SIGIL, 3) == 0) {
            if (n - i >= 6 && memcmp(p + i + 3, CHARSET_ESCAPE_SIGIL, 3) == 0) {
                memcpy(r + k, p + i, 3);
                k += 3;
                i += 6;
                continue;
            }
            if (n - i >= 5 && hexval(p[i + 3]) >= 0 && hexval(p[i + 4]) >= 0) {
                r[k++] = (uint8_t)(hexval(p[i + 3]) << 4 | hexval(p[i + 4]));
                i += 5;
                continue;
            }
        }
        r[k++] = p[i++];
    }
    r[k] = '\0';
    *out = r;
    *out_len = k;
    return 0;
}

const char *charset_flag_name(unsigned flag)
{
    switch (flag) {
    case CHARSET_LOSSY_ESCAPED: return "undecodable bytes escaped";
    case CHARSET_UNKNOWN_TERM: return "unknown Specific Character Set term";
    case CHARSET_GUESSED: return "character set guessed";
    case CHARSET_NONSTANDARD_TERM: return "non-standard Specific Character Set";
    case CHARSET_UNDECLARED_ESCAPE: return "escape sequence to an undeclared character set";
    default: return "unknown flag";
    }
}
