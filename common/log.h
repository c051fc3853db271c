/* log.h - one line per event on stderr:
 *   2026-11-28T12:00:00.123Z INFO  node[n1] message
 * or, with the JSON format (for log shippers), one JSON object per line:
 *   {"ts":"2026-11-28T12:00:00.123Z","level":"info","component":"node[n1]","msg":"message"}
 * Thread-safe: each line is written with a single locked stdio call, so lines
 * from different threads never interleave. The level and component are
 * process-wide and set once at start-up by log_init(). */
#ifndef SP_LOG_H
#define SP_LOG_H

typedef enum { LOG_DEBUG = 0, LOG_INFO, LOG_WARN, LOG_ERROR, LOG_OFF } log_level_t;

/* Sets the component label (e.g. "node[n1]") and the minimum level. */
void log_init(const char *component, log_level_t level);
void log_set_level(log_level_t level);

typedef enum { LOG_FORMAT_TEXT = 0, LOG_FORMAT_JSON } log_format_t;
/* Chooses the line format; set once at start-up, before threads log. */
void log_set_format(log_format_t format);
/* Parses "text" or "json"; returns 0 or SP_EINVAL. */
int log_parse_format(const char *text, log_format_t *out);
log_level_t log_get_level(void);

/* Parses "debug", "info", "warn", "error", "off"; returns 0 or SP_EINVAL. */
int log_parse_level(const char *text, log_level_t *out);

void log_write(log_level_t level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define log_debug(...) log_write(LOG_DEBUG, __VA_ARGS__)
#define log_info(...) log_write(LOG_INFO, __VA_ARGS__)
#define log_warn(...) log_write(LOG_WARN, __VA_ARGS__)
#define log_error(...) log_write(LOG_ERROR, __VA_ARGS__)

#endif
