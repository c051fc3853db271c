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

    /* Format the whole line first so one fputs writes it atomically. */
    char line[2048];
    int n = snprintf(line, sizeof line, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ %s %s ",
                     tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                     ts.tv_nsec / 1000000, labels[level], log_component);
    va_list ap;
    va_start(ap, fmt);
    if (n > 0 && (size_t)n < sizeof line)
        vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
    va_end(ap);

    /* Keep one event on one line even if a message carries a newline. */
    for (char *p = line; *p; p++)
        if (*p == '\n' || *p == '\r')
            *p = ' ';
    flockfile(stderr);
    fputs(line, stderr);
    fputc('\n', stderr);
    funlockfile(stderr);
}
