/* config.h - INI configuration files, parsed with Debian's libinih and
 * checked against a table of known options.
 *
 * Each program describes its options in a config_option_t table: section,
 * key, type, where the value goes in the program's settings struct, the
 * default (every option has one), bounds and a one-line description. Loading
 * applies every default, then the file; an unknown section or key, a key
 * given twice, or a bad value is an error naming the file, line and key.
 * A CONFIG_ENTRIES option makes a section a list of named entries (e.g.
 * [destinations] with one "AE = host:port" line each) parsed by a callback.
 * The same table prints the configuration reference (--help-config), so the
 * documentation cannot drift from the parser.
 *
 * Not thread-safe: load once at start-up. */
#ifndef SP_CONFIG_H
#define SP_CONFIG_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

typedef enum {
    CONFIG_STRING,  /* char *, owned by the settings struct */
    CONFIG_PATH,    /* char *, relative paths resolved against the file's folder */
    CONFIG_INT,     /* int, within [min, max] */
    CONFIG_BOOL,    /* bool: true/false, yes/no, on/off, 1/0 */
    CONFIG_SIZE,    /* size_t bytes: a number with optional K, M, G (powers of 1024) */
    CONFIG_MS,      /* int milliseconds: a number with optional ms, s, m, h */
    CONFIG_ENTRIES, /* key "*": every key of the section is a name handed to entry() */
} config_type_t;

typedef struct {
    const char *section;
    const char *key;
    config_type_t type;
    size_t offset;             /* offsetof(settings struct, field) */
    const char *default_value; /* text, parsed like a file value; "" for an empty string */
    int64_t min, max;          /* bounds for INT, SIZE and MS (ignored when both 0) */
    const char *help;
    /* CONFIG_ENTRIES only: parses one "name = value" line into target.
     * Returns 0, or non-zero with a reason in why (the loader adds file,
     * line and key). */
    int (*entry)(void *target, const char *name, const char *value, char *why, size_t whylen);
} config_option_t;

/* Applies every default to the settings struct at target. Returns 0, or
 * SP_ECONFIG if a default is malformed (a bug in the table). */
int config_defaults(const config_option_t *opts, size_t n, void *target);

/* Applies defaults, then the file. path NULL means defaults only. Returns 0,
 * or SP_ECONFIG / -errno with "FILE:LINE: key 'K' ..." in err. On error the
 * struct may be partly filled: free it with config_free(). */
int config_load(const char *path, const config_option_t *opts, size_t n, void *target, char *err,
                size_t errlen);

/* Frees the strings the loader allocated in target. */
void config_free(const config_option_t *opts, size_t n, void *target);

/* Prints an annotated example file with every option and its default. */
void config_print_reference(FILE *out, const config_option_t *opts, size_t n);

#endif
