/* log.c - timestamped, levelled, one-line-per-event logging (log.h). */
#include "log.h"

#include "base.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>

static char log_component[64] = "shardpacs";
static atomic_int log_level = LOG_INFO;
static atomic_int log_format = LOG_FORMAT_TEXT;

void log_init(const char *component, log_level_t level)
{
    sp_strlcpy(log_component, component, sizeof log_component);
    atomic_store(&log_level, (int)level);
}

void log_set_level(log_level_t level)
{
    atomic_store(&log_level, (int)level);
}

log_level_t log_get_level(void)
{
    return (log_level_t)atomic_load(&log_level);
}

void log_set_format(log_format_t format)
{
    atomic_store(&log_format, (int)format);
}

int log_parse_format(const char *text, log_format_t *out)
{
    if (strcasecmp(text, "text") == 0)
        *out = LOG_FORMAT_TEXT;
    else if (strcasecmp(text, "json") == 0)
        *out = LOG_FORMAT_JSON;
    else
        return SP_EINVAL;
    return 0;
}

/* The length of the well-formed UTF-8 sequence at p (RFC 3629: no
 * overlong forms, surrogates or code points above U+10FFFF), or 0. */
static size_t utf8_len(const unsigned char *p)
{
    size_t len = p[0] >= 0xC2 && p[0] <= 0xDF   ? 2
                 : p[0] >= 0xE0 && p[0] <= 0xEF ? 3
                 : p[0] >= 0xF0 && p[0] <= 0xF4 ? 4
                                                : 0;
    unsigned char lo = 0x80, hi = 0xBF;
    if (p[0] == 0xE0)
        lo = 0xA0;
    else if (p[0] == 0xED)
        hi = 0x9F;
    else if (p[0] == 0xF0)
        lo = 0x90;
    else if (p[0] == 0xF4)
        hi = 0x8F;
    for (size_t i = 1; i < len; i++)
        if (p[i] < (i == 1 ? lo : 0x80) || p[i] > (i == 1 ? hi : 0xBF))
            return 0;
    return len;
}

/* Appends src to dst (capacity cap, length *n) as the inside of a JSON
 * string: quotes, backslashes and control characters escaped, and a byte
 * that is not part of well-formed UTF-8 (a peer's AE title, a raw value)
 * written as the Latin-1 character \u00XX, so every line parses whatever
 * a message quotes. Stops early, still terminated, when dst is full. */
static void json_escape(char *dst, size_t cap, size_t *n, const char *src)
{
    for (const unsigned char *p = (const unsigned char *)src; *p && *n + 7 < cap; p++) {
        size_t u = *p >= 0x80 ? utf8_len(p) : 1;
        if (*p >= 0x80 && u > 1) {
            memcpy(dst + *n, p, u);
            *n += u;
            p += u - 1;
        } else if (*p >= 0x80) {
            *n += (size_t)snprintf(dst + *n, cap - *n, "\\u%04x", *p);
        } else if (*p == '"' || *p == '\\') {
            dst[(*n)++] = '\\';
            dst[(*n)++] = (char)*p;
        } else if (*p < 0x20) {
            *n += (size_t)snprintf(dst + *n, cap - *n, "\\u%04x", *p);
        } else {
            dst[(*n)++] = (char)*p;
        }
    }
    dst[*n] = '\0';
}

int log_parse_level(const char *text, log_level_t *out)
{
    static const char *names[] = {"debug", "info", "warn", "error", "off"};
    for (size_t i = 0; i < SP_ARRAY_LEN(names); i++) {
        if (strcasecmp(text, names[i]) == 0) {
            *out = (log_level_t)i;
            return 0;
        }
    }
    return SP_EINVAL;
}

void log_write(log_level_t level, const char *fmt, ...)
{
    static const char *labels[] = {"DEBUG", "INFO ", "WARN ", "ERROR"};
    if ((int)level < atomic_load(&log_level) || level >= LOG_OFF)
        return;

    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);

    char stamp[80];
    snprintf(stamp, sizeof stamp, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ", tm.tm_year + 1900,
             tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000);
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);

    /* Format the whole line first so one fputs writes it atomically. */
    char line[2048 * 6 + 256];
    if (atomic_load(&log_format) == LOG_FORMAT_JSON) {
        static const char *names[] = {"debug", "info", "warn", "error"};
        size_t n =
            (size_t)snprintf(line, sizeof line, "{\"ts\":\"%s\",\"level\":\"%s\",\"component\":\"",
                             stamp, names[level]);
        json_escape(line, sizeof line, &n, log_component);
        n += (size_t)snprintf(line + n, sizeof line - n, "\",\"msg\":\"");
        json_escape(line, sizeof line, &n, msg);
        snprintf(line + n, sizeof line - n, "\"}");
    } else {
        snprintf(line, sizeof line, "%s %s %s %s", stamp, labels[level], log_component, msg);
        /* Keep one event on one line even if a message carries a newline. */
        for (char *p = line; *p; p++)
            if (*p == '\n' || *p == '\r')
                *p = ' ';
    }
    flockfile(stderr);
    fputs(line, stderr);
    fputc('\n', stderr);
    funlockfile(stderr);
}
