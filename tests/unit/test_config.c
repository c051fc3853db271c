/* test_config.c - defaults, typed values, and errors that name file, line
 * and key. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "base.h"
#include "config.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct {
    char *name;
    char *dir;
    int workers;
    bool sync;
    size_t cache;
    int timeout;
    int ndest;
    char dest[4][64];
} settings_t;

/* Entry parser for [dest]: "AE = host:port", the port must be a number. */
static int parse_dest(void *target, const char *name, const char *value, char *why, size_t whylen)
{
    settings_t *s = target;
    const char *colon = strrchr(value, ':');
    if (colon == NULL || atoi(colon + 1) <= 0 || s->ndest == 4) {
        snprintf(why, whylen, "expects HOST:PORT, not '%s'", value);
        return -1;
    }
    snprintf(s->dest[s->ndest++], sizeof s->dest[0], "%s@%s", name, value);
    return 0;
}

static const config_option_t opts[] = {
    {"node", "name", CONFIG_STRING, offsetof(settings_t, name), "n1", 0, 0, "name", NULL},
    {"node", "dir", CONFIG_PATH, offsetof(settings_t, dir), "data", 0, 0, "folder", NULL},
    {"node", "workers", CONFIG_INT, offsetof(settings_t, workers), "8", 1, 64, "threads", NULL},
    {"store", "sync", CONFIG_BOOL, offsetof(settings_t, sync), "true", 0, 0, "fsync", NULL},
    {"store", "cache", CONFIG_SIZE, offsetof(settings_t, cache), "128M", 0, 0, "cache", NULL},
    {"store", "timeout", CONFIG_MS, offsetof(settings_t, timeout), "10s", 0, 3600000, "timeout",
     NULL},
    {"dest", "*", CONFIG_ENTRIES, 0, "AE = HOST:PORT", 0, 0, "destinations", parse_dest},
};

static char dir_template[] = "/tmp/test_config.XXXXXX";
static char path[512];

static int load_text(const char *text, settings_t *s, char *err, size_t errlen)
{
    FILE *f = fopen(path, "w");
    fputs(text, f);
    fclose(f);
    memset(s, 0, sizeof *s);
    return config_load(path, opts, SP_ARRAY_LEN(opts), s, err, errlen);
}

static int setup(void **state)
{
    (void)state;
    assert_non_null(mkdtemp(dir_template));
    snprintf(path, sizeof path, "%s/t.conf", dir_template);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    unlink(path);
    rmdir(dir_template);
    return 0;
}

static void test_defaults_and_values(void **state)
{
    (void)state;
    settings_t s;
    char err[512];
    assert_int_equal(load_text("; comment\n[node]\nname = n7\n", &s, err, sizeof err), 0);
    assert_string_equal(s.name, "n7");
    assert_int_equal(s.workers, 8);
    assert_true(s.sync);
    assert_int_equal(s.cache, 128u << 20);
    assert_int_equal(s.timeout, 10000);
    char expect[600];
    snprintf(expect, sizeof expect, "%s/data", dir_template);
    assert_string_equal(s.dir, expect); /* relative to the file's folder */
    config_free(opts, SP_ARRAY_LEN(opts), &s);

    assert_int_equal(load_text("[node]\nworkers=64\ndir=/abs\n[store]\nsync = off\n"
                               "cache = 2G\ntimeout = 250ms\n",
                               &s, err, sizeof err),
                     0);
    assert_int_equal(s.workers, 64);
    assert_string_equal(s.dir, "/abs");
    assert_false(s.sync);
    assert_int_equal(s.cache, (size_t)2 << 30);
    assert_int_equal(s.timeout, 250);
    config_free(opts, SP_ARRAY_LEN(opts), &s);
}

/* Each bad file must fail with "FILE:LINE: ..." naming the key. */
static void expect_error(const char *text, int line, const char *needle)
{
    settings_t s;
    char err[512], prefix[600];
    assert_int_equal(load_text(text, &s, err, sizeof err), SP_ECONFIG);
    snprintf(prefix, sizeof prefix, "%s:%d: ", path, line);
    if (strncmp(err, prefix, strlen(prefix)) != 0 || strstr(err, needle) == NULL)
        fail_msg("error '%s' lacks '%s' or '%s'", err, prefix, needle);
    config_free(opts, SP_ARRAY_LEN(opts), &s);
}

static void test_errors_name_file_line_key(void **state)
{
    (void)state;
    expect_error("[node]\nname = a\nport = 5\n", 3, "unknown key 'port'");
    expect_error("[nodes]\nname = a\n", 2, "section [nodes]");
    expect_error("[node]\nworkers = many\n", 2, "'workers'");
    expect_error("[node]\nworkers = 65\n", 2, "outside");
    expect_error("[node]\nworkers = 0\n", 2, "outside");
    expect_error("[store]\nsync = perhaps\n", 2, "'sync'");
    expect_error("[store]\ncache = 12Q\n", 2, "'cache'");
    expect_error("[store]\ntimeout = -5s\n", 2, "'timeout'");
    expect_error("[store]\ntimeout = 2h\n", 2, "outside");
    expect_error("[node]\nname = a\nname = b\n", 3, "twice");
    expect_error("[node]\nthis line has no equals sign\n", 2, "syntax");
}

static void test_entries(void **state)
{
    (void)state;
    settings_t s;
    char err[512];
    assert_int_equal(
        load_text("[dest]\nVIEWER = 127.0.0.1:104\nPACS2 = host:11112\n", &s, err, sizeof err), 0);
    assert_int_equal(s.ndest, 2);
    assert_string_equal(s.dest[0], "VIEWER@127.0.0.1:104");
    assert_string_equal(s.dest[1], "PACS2@host:11112");
    config_free(opts, SP_ARRAY_LEN(opts), &s);
    expect_error("[dest]\nVIEWER = 127.0.0.1:104\nBAD = nowhere\n", 3, "entry 'BAD' in [dest]");
}

static void test_missing_file(void **state)
{
    (void)state;
    settings_t s = {0};
    char err[512];
    assert_int_equal(
        config_load("/nonexistent/x.conf", opts, SP_ARRAY_LEN(opts), &s, err, sizeof err),
        -2 /* -ENOENT */);
    assert_non_null(strstr(err, "/nonexistent/x.conf"));
    config_free(opts, SP_ARRAY_LEN(opts), &s);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults_and_values),
        cmocka_unit_test(test_errors_name_file_line_key),
        cmocka_unit_test(test_entries),
        cmocka_unit_test(test_missing_file),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
