/* charset.h - DICOM string values to UTF-8 for the index (PS3.5 6.1, PS3.3
 * C.12.1.1.2), in plain C over glibc iconv.
 *
 * The archive stores the bytes it was given; only the index needs text. So
 * the conversion never refuses a value: bytes it cannot decode are written
 * in an escaped form that loses nothing (below) and a flag tells the caller
 * to log a warning. It understands the single-byte character sets, UTF-8,
 * GB18030 and GBK, and ISO 2022 code extensions (Japanese JIS X 0208/0212,
 * Korean KS X 1001, Chinese GB 2312) with its own escape-sequence state
 * machine; glibc's iconv only ever sees one character set at a time.
 *
 * Thread-safe: every thread keeps its own iconv descriptors (an iconv_t must
 * not be shared), opened on first use and closed when the thread exits.
 *
 * Escaped form. Each byte that cannot be decoded is written as U+FFFD
 * (REPLACEMENT CHARACTER, UTF-8 EF BF BD) followed by two upper-case hex
 * digits: the byte 0xFC becomes "\xEF\xBF\xBD" "FC". A U+FFFD that the input
 * itself encodes is written twice. The sigil is not ASCII, so clean text is
 * never changed and the DICOM delimiters '\\', '^' and '=' keep their
 * meaning in the output (callers may split values and name components after
 * conversion); a person reading a log sees at once where decoding failed.
 * charset_unescape() is the inverse: it turns each escape back into its raw
 * byte and each doubled U+FFFD into one. */
#ifndef SP_CHARSET_H
#define SP_CHARSET_H

#include <stddef.h>
#include <stdint.h>

/* Which delimiters reset the ISO 2022 state to value 1 of (0008,0005)
 * (PS3.5 6.1.2.5.3). Every VR resets at CR, LF, FF, TAB and other C0
 * controls except ESC; the delimiters below only while G0 holds a
 * single-byte set (in JIS X 0208 their bytes are halves of characters, the
 * encoder having had to switch back before a real delimiter). */
typedef enum {
    CHARSET_VR_PN,     /* person name: also at '^', '=' and '\\' */
    CHARSET_VR_STRING, /* SH, LO, UC, CS...: also at the value delimiter '\\' */
    CHARSET_VR_TEXT,   /* ST, LT, UT: single-valued, '\\' is an ordinary byte */
} charset_vr_t;

/* Bits of charset_to_utf8()'s *flags: warnings for the caller to log. */
enum {
    CHARSET_LOSSY_ESCAPED = 1u << 0, /* some bytes are in the escaped form */
    CHARSET_UNKNOWN_TERM = 1u << 1,  /* a value of (0008,0005) is not a defined term */
    /* No (0008,0005) and bytes >= 0x80: UTF-8 or Latin-1 guessed; or bytes
     * >= 0x80 while G1 was empty, read as the one G1 set (0008,0005) declares. */
    CHARSET_GUESSED = 1u << 2,
    CHARSET_NONSTANDARD_TERM = 1u << 3,  /* a term was accepted despite case, spaces, '_'/'-'/' '
                                            variants or a combination the standard forbids */
    CHARSET_UNDECLARED_ESCAPE = 1u << 4, /* an escape sequence designated a set that (0008,0005)
                                            did not declare; it was decoded anyway */
};

/* The sigil of the escaped form, U+FFFD in UTF-8. */
#define CHARSET_ESCAPE_SIGIL "\xEF\xBF\xBD"

/* Converts one raw string attribute value (all its values, with their '\\'
 * delimiters, padding already stripped or not) to UTF-8.
 *
 * specific_character_set is the raw (0008,0005) value in force for the
 * attribute (NULL or "" when absent); it may be multi-valued with '\\' and
 * its terms are matched case-insensitively with spaces trimmed. Without it,
 * bytes >= 0x80 are decoded as UTF-8 when the whole value is valid UTF-8 and
 * as Latin-1 (ISO_IR 100) otherwise, with CHARSET_GUESSED: PS3.5 says the
 * default is ASCII, but Latin-1 without (0008,0005) is common in practice and
 * a Latin-1 guess loses nothing. An unknown term decodes ASCII and escapes
 * the rest.
 *
 * On success returns 0, *out is a malloc'd NUL-terminated UTF-8 string the
 * caller frees (never NULL, "" for an empty value) and *flags holds the
 * CHARSET_* warnings (0 for a clean conversion). A NUL byte in the input is
 * escaped, so the output's length is its strlen(). Returns SP_EINVAL only
 * for NULL out, flags or in (in may be NULL when len is 0). */
int charset_to_utf8(const char *specific_character_set, const uint8_t *in, size_t len,
                    charset_vr_t vr, char **out, unsigned *flags);

/* The inverse of the escaped form: copies s into a malloc'd buffer in which
 * each U+FFFD + two hex digits is the raw byte again and each doubled U+FFFD
 * is one U+FFFD (any other U+FFFD is copied as it is). *out_len receives the
 * length, as the result may hold NUL bytes (also NUL-terminated). Returns 0,
 * or SP_EINVAL for NULL arguments. */
int charset_unescape(const char *s, uint8_t **out, size_t *out_len);

/* A short name of one CHARSET_* flag bit, for log lines. */
const char *charset_flag_name(unsigned flag);
#endif
