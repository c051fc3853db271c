/* config.c - table-driven INI configuration over libinih (config.h). */
#include "config.h"

#include "base.h"

#include <errno.h>
#include <ini.h>
#include <limits.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define CONFIG_MAX_OPTIONS 256

/* State shared with the libinih callback while one file is parsed. */
typedef struct {
    const config_option_t *opts;
    size_t n;
    void *target;
    const char *path;
    char *base_dir; /* folder of the file, for CONFIG_PATH */
    bool seen[CONFIG_MAX_OPTIONS];
    char err[512]; /* first error, without the "file:line:" prefix */
} parse_state_t;

static void *field(void *target, const config_option_t *o)
{
    return (char *)target + o->offset;
}

static bool parse_int64(const char *text, int64_t *out, const char **rest)
{
    errno = 0;
    char *end;
    long long v = strtoll(text, &end, 10);
    if (end == text || errno != 0)
        return false;
    *out = v;
    *rest = end;
    return true;
}

/* Multiplies by a unit, refusing overflow. */
static bool scale(int64_t v, int64_t unit, int64_t *out)
{
    if (v > INT64_MAX / unit || v < INT64_MIN / unit)
        return false;
    *out = v * unit;
    return true;
}

static bool parse_unit(const char *rest, const char *const *names, const int64_t *units,
                       size_t count, int64_t v, int64_t *out)
{
    while (*rest == ' ')
        rest++;
    if (*rest == '\0')
        return scale(v, units[0], out);
    for (size_t i = 0; i < count; i++)
        if (strcasecmp(rest, names[i]) == 0)
            return scale(v, units[i], out);
    return false;
}

static bool parse_bool(const char *text, bool *out)
{
    static const char *yes[] = {"true", "yes", "on", "1"};
    static const char *no[] = {"false", "no", "off", "0"};
    for (size_t i = 0; i < SP_ARRAY_LEN(yes); i++) {
        if (strcasecmp(text, yes[i]) == 0) {
            *out = true;
            return true;
        }
        if (strcasecmp(text, no[i]) == 0) {
            *out = false;
            return true;
        }
    }
    return false;
}

static char *resolve_path(const char *value, const char *base_dir)
{
    if (value[0] == '/' || value[0] == '\0' || base_dir == NULL)
        return sp_strdup(value);
    size_t len = strlen(base_dir) + strlen(value) + 2;
    char *p = sp_malloc(len);
    snprintf(p, len, "%s/%s", base_dir, value);
    return p;
}

/* Parses one value into its field. Returns 0, or SP_ECONFIG with a reason. */
static int set_value(const config_option_t *o, const char *value, void *target,
                     const char *base_dir, char *why, size_t whylen)
{
    static const char *size_names[] = {"", "K", "M", "G", "KiB", "MiB", "GiB"};
    static const int64_t size_units[] = {1, 1 << 10, 1 << 20, 1 << 30, 1 << 10, 1 << 20, 1 << 30};
    static const char *ms_names[] = {"ms", "s", "m", "h"};
    static const int64_t ms_units[] = {1, 1000, 60000, 3600000};
    int64_t v = 0;
    const char *rest = "";
    bool bounded = o->min != 0 || o->max != 0;

    switch (o->type) {
    case CONFIG_ENTRIES: return 0; /* entries have no default; each line goes to o->entry */
    case CONFIG_STRING:
    case CONFIG_PATH: {
        char **slot = field(target, o);
        free(*slot);
        *slot = o->type == CONFIG_PATH ? resolve_path(value, base_dir) : sp_strdup(value);
        return 0;
    }
    case CONFIG_BOOL:
        if (!parse_bool(value, field(target, o))) {
            sp_fmt(why, whylen, "expects true or false, not '%s'", value);
            return SP_ECONFIG;
        }
        return 0;
    case CONFIG_INT:
        if (!parse_int64(value, &v, &rest) || *rest != '\0') {
            sp_fmt(why, whylen, "expects an integer, not '%s'", value);
            return SP_ECONFIG;
        }
        break;
    case CONFIG_SIZE:
        if (!parse_int64(value, &v, &rest) || v < 0 ||
            !parse_unit(rest, size_names, size_units, SP_ARRAY_LEN(size_names), v, &v)) {
            sp_fmt(why, whylen, "expects a size such as 512K, 64M or 2G, not '%s'", value);
            return SP_ECONFIG;
        }
        break;
    case CONFIG_MS:
        if (!parse_int64(value, &v, &rest) || v < 0 ||
            !parse_unit(rest, ms_names, ms_units, SP_ARRAY_LEN(ms_names), v, &v)) {
            sp_fmt(why, whylen, "expects a duration such as 250ms, 10s or 5m, not '%s'", value);
            return SP_ECONFIG;
        }
        break;
    }
    if (bounded && (v < o->min || v > o->max)) {
        sp_fmt(why, whylen, "value '%s' is outside [%lld, %lld]", value, (long long)o->min,
               (long long)o->max);
        return SP_ECONFIG;
    }
    if (o->type == CONFIG_SIZE) {
        *(size_t *)field(target, o) = (size_t)v;
    } else {
        if (v > INT_MAX || v < INT_MIN) {
            sp_fmt(why, whylen, "value '%s' is too large", value);
            return SP_ECONFIG;
        }
        *(int *)field(target, o) = (int)v;
    }
    return 0;
}

int config_defaults(const config_option_t *opts, size_t n, void *target)
{
    char why[256];
    for (size_t i = 0; i < n; i++) {
        if (set_value(&opts[i], opts[i].default_value, target, NULL, why, sizeof why) != 0) {
            fprintf(stderr, "shardpacs: bad default for [%s] %s: %s\n", opts[i].section,
                    opts[i].key, why);
            return SP_ECONFIG;
        }
    }
    return 0;
}

/* libinih callback: returns 1 to continue, 0 to flag this line as an error. */
static int on_entry(void *user, const char *section, const char *key, const char *value)
{
    parse_state_t *st = user;
    if (st->err[0] != '\0')
        return 0;
    for (size_t i = 0; i < st->n; i++) {
        const config_option_t *o = &st->opts[i];
        if (o->type == CONFIG_ENTRIES || strcmp(o->section, section) != 0 ||
            strcmp(o->key, key) != 0)
            continue;
        if (st->seen[i]) {
            sp_fmt(st->err, sizeof st->err, "key '%s' in [%s] is given twice", key, section);
            return 0;
        }
        st->seen[i] = true;
        char why[256];
        if (set_value(o, value, st->target, st->base_dir, why, sizeof why) != 0) {
            sp_fmt(st->err, sizeof st->err, "key '%s' in [%s] %s", key, section, why);
            return 0;
        }
        return 1;
    }
    for (size_t i = 0; i < st->n; i++) {
        const config_option_t *o = &st->opts[i];
        if (o->type != CONFIG_ENTRIES || strcmp(o->section, section) != 0)
            continue;
        char why[256] = "is malformed";
        if (o->entry(st->target, key, value, why, sizeof why) != 0) {
            sp_fmt(st->err, sizeof st->err, "entry '%s' in [%s] %s", key, section, why);
            return 0;
        }
        return 1;
    }
    sp_fmt(st->err, sizeof st->err, "unknown key '%s' in section [%s]", key, section);
    return 0;
}

int config_load(const char *path, const config_option_t *opts, size_t n, void *target, char *err,
                size_t errlen)
{
    if (n > CONFIG_MAX_OPTIONS) {
        sp_fmt(err, errlen, "too many options in table");
        return SP_ECONFIG;
    }
    int rc = config_defaults(opts, n, target);
    if (rc != 0 || path == NULL) {
        if (rc != 0)
            sp_fmt(err, errlen, "bad built-in default");
        return rc;
    }
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        rc = -errno;
        sp_fmt(err, errlen, "%s: cannot open: %s", path, strerror(errno));
        return rc;
    }
    parse_state_t *st = sp_calloc(1, sizeof *st);
    st->opts = opts;
    st->n = n;
    st->target = target;
    st->path = path;
    const char *slash = strrchr(path, '/');
    st->base_dir = slash ? sp_strndup(path, (size_t)(slash - path)) : sp_strdup(".");
    if (slash == path)
        st->base_dir[0] = '/', st->base_dir[1] = '\0';

    int line = ini_parse_file(f, on_entry, st);
    fclose(f);
    /* Default paths, like given ones, are relative to the file's folder. */
    for (size_t i = 0; i < n && line == 0; i++) {
        char why[256];
        if (opts[i].type == CONFIG_PATH && !st->seen[i])
            set_value(&opts[i], opts[i].default_value, target, st->base_dir, why, sizeof why);
    }
    if (line != 0) {
        if (st->err[0] == '\0')
            sp_fmt(st->err, sizeof st->err, "syntax error (expected [section] or key = value)");
        sp_fmt(err, errlen, "%s:%d: %s", path, line, st->err);
        rc = SP_ECONFIG;
    }
    free(st->base_dir);
    free(st);
    return rc;
}

void config_free(const config_option_t *opts, size_t n, void *target)
{
    for (size_t i = 0; i < n; i++) {
        if (opts[i].type == CONFIG_STRING || opts[i].type == CONFIG_PATH) {
            char **slot = field(target, &opts[i]);
            free(*slot);
            *slot = NULL;
        }
    }
}

void config_print_reference(FILE *out, const config_option_t *opts, size_t n)
{
    const char *section = NULL;
    for (size_t i = 0; i < n; i++) {
        const config_option_t *o = &opts[i];
        if (section == NULL || strcmp(section, o->section) != 0) {
            fprintf(out, "%s[%s]\n", section ? "\n" : "", o->section);
            section = o->section;
        }
        if (o->type == CONFIG_ENTRIES)
            fprintf(out, "# %s\n# %s\n", o->help, o->default_value);
        else
            fprintf(out, "# %s\n%s = %s\n", o->help, o->key, o->default_value);
    }
}
