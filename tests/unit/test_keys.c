/* test_keys.c - key pair files and the allow-list (common/keys.c). Each test
 * works in its own temporary directory. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "base.h"
#include "keys.h"
#include "log.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <zmq.h>

typedef struct {
    char dir[64];
    char path[128];
} tmp_t;

static int tmp_setup(void **state)
{
    tmp_t *t = sp_calloc(1, sizeof *t);
    snprintf(t->dir, sizeof t->dir, "/tmp/sp-test-keys-XXXXXX");
    if (mkdtemp(t->dir) == NULL)
        return -1;
    *state = t;
    return 0;
}

static int tmp_teardown(void **state)
{
    tmp_t *t = *state;
    char cmd[160];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", t->dir);
    int rc = system(cmd);
    free(t);
    return rc == 0 ? 0 : -1;
}

static const char *tmp_file(tmp_t *t, const char *name)
{
    snprintf(t->path, sizeof t->path, "%s/%s", t->dir, name);
    return t->path;
}

static void write_text(const char *path, const char *text, mode_t mode)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, mode);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    assert_int_equal(fchmod(fd, mode), 0);
    close(fd);
}

static void test_generate(void **state)
{
    (void)state;
    keys_pair_t a, b;
    assert_int_equal(keys_generate(&a), 0);
    assert_int_equal(keys_generate(&b), 0);
    assert_true(keys_z85_valid(a.public_z85));
    assert_true(keys_z85_valid(a.secret_z85));
    assert_string_not_equal(a.public_z85, b.public_z85);
    char derived[KEYS_Z85_LEN + 1];
    assert_int_equal(zmq_curve_public(derived, a.secret_z85), 0);
    assert_string_equal(derived, a.public_z85);
}

static void test_z85_valid(void **state)
{
    (void)state;
    keys_pair_t kp;
    assert_int_equal(keys_generate(&kp), 0);
    char text[64];
    assert_false(keys_z85_valid(NULL));
    assert_false(keys_z85_valid(""));
    memcpy(text, kp.public_z85, 41);
    text[39] = '\0'; /* 39 characters */
    assert_false(keys_z85_valid(text));
    snprintf(text, sizeof text, "%sA", kp.public_z85); /* 41 characters */
    assert_false(keys_z85_valid(text));
    memcpy(text, kp.public_z85, 41);
    text[7] = '~'; /* not in the Z85 alphabet */
    assert_false(keys_z85_valid(text));
    memcpy(text, kp.public_z85, 41);
    memcpy(text + 5, "#####", 5); /* a group above 2^32 - 1 */
    assert_false(keys_z85_valid(text));
}

static void test_pair_round_trip(void **state)
{
    tmp_t *t = *state;
    keys_pair_t kp, loaded;
    char err[512] = "";
    assert_int_equal(keys_generate(&kp), 0);
    const char *path = tmp_file(t, "node.key");
    assert_int_equal(keys_write_pair(path, &kp), 0);

    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0600);

    assert_int_equal(keys_load_pair(path, &loaded, err, sizeof err), 0);
    assert_string_equal(loaded.public_z85, kp.public_z85);
    assert_string_equal(loaded.secret_z85, kp.secret_z85);

    char pub[KEYS_Z85_LEN + 1];
    assert_int_equal(keys_load_public(path, pub, err, sizeof err), 0);
    assert_string_equal(pub, kp.public_z85);

    const char *pub_path = tmp_file(t, "node.pub");
    assert_int_equal(keys_write_public(pub_path, kp.public_z85), 0);
    assert_int_equal(stat(pub_path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0644);
    memset(pub, 0, sizeof pub);
    assert_int_equal(keys_load_public(pub_path, pub, err, sizeof err), 0);
    assert_string_equal(pub, kp.public_z85);

    /* A public key file is replaced in place. */
    keys_pair_t other;
    assert_int_equal(keys_generate(&other), 0);
    assert_int_equal(keys_write_public(pub_path, other.public_z85), 0);
    assert_int_equal(keys_load_public(pub_path, pub, err, sizeof err), 0);
    assert_string_equal(pub, other.public_z85);
    /* ...but it is not a key pair file. */
    assert_int_equal(keys_load_pair(pub_path, &loaded, err, sizeof err), SP_EKEY);
}

static void test_write_pair_refuses_overwrite(void **state)
{
    tmp_t *t = *state;
    keys_pair_t first, second, loaded;
    char err[512] = "";
    assert_int_equal(keys_generate(&first), 0);
    assert_int_equal(keys_generate(&second), 0);
    const char *path = tmp_file(t, "node.key");
    assert_int_equal(keys_write_pair(path, &first), 0);
    assert_int_equal(keys_write_pair(path, &second), -EEXIST);
    assert_int_equal(keys_load_pair(path, &loaded, err, sizeof err), 0);
    assert_string_equal(loaded.public_z85, first.public_z85);

    /* A pair whose halves do not match is never written. */
    keys_pair_t mixed = first;
    memcpy(mixed.secret_z85, second.secret_z85, sizeof mixed.secret_z85);
    assert_int_equal(keys_write_pair(tmp_file(t, "mixed.key"), &mixed), SP_EINVAL);
    assert_int_equal(access(t->path, F_OK), -1);
}

static void test_loose_mode_refused(void **state)
{
    tmp_t *t = *state;
    keys_pair_t kp, loaded;
    assert_int_equal(keys_generate(&kp), 0);
    const char *path = tmp_file(t, "node.key");
    assert_int_equal(keys_write_pair(path, &kp), 0);

    static const mode_t bad[] = {0644, 0640, 0604, 0620, 0602, 0700 | 0010};
    for (size_t i = 0; i < SP_ARRAY_LEN(bad); i++) {
        char err[512] = "";
        assert_int_equal(chmod(path, bad[i]), 0);
        assert_int_equal(keys_load_pair(path, &loaded, err, sizeof err), SP_EKEY);
        assert_non_null(strstr(err, path));
        assert_non_null(strstr(err, "chmod 600"));
        assert_string_equal(loaded.secret_z85, "");
    }
    char err[512] = "";
    assert_int_equal(chmod(path, 0400), 0);
    assert_int_equal(keys_load_pair(path, &loaded, err, sizeof err), 0);
    /* The public half may still be read from a loose file. */
    char pub[KEYS_Z85_LEN + 1];
    assert_int_equal(chmod(path, 0644), 0);
    assert_int_equal(keys_load_public(path, pub, err, sizeof err), 0);
    assert_string_equal(pub, kp.public_z85);
}

static void test_corrupt_pair_refused(void **state)
{
    tmp_t *t = *state;
    keys_pair_t kp, loaded;
    assert_int_equal(keys_generate(&kp), 0);
    char text[512], bad[KEYS_Z85_LEN + 1], err[512];

    /* One character of the secret replaced by one outside the alphabet. */
    memcpy(bad, kp.secret_z85, sizeof bad);
    bad[10] = '"';
    snprintf(text, sizeof text, "public-key = %s\nsecret-key = %s\n", kp.public_z85, bad);
    const char *path = tmp_file(t, "corrupt.key");
    write_text(path, text, 0600);
    assert_int_equal(keys_load_pair(path, &loaded, err, sizeof err), SP_EKEY);
    assert_non_null(strstr(err, path));
    assert_non_null(strstr(err, ":2:"));
    assert_null(strstr(err, bad)); /* never echo a secret */

    /* Truncated public key. */
    snprintf(text, sizeof text, "# comment\npublic-key = %.39s\nsecret-key = %s\n", kp.public_z85,
             kp.secret_z85);
    path = tmp_file(t, "short.key");
    write_text(path, text, 0600);
    assert_int_equal(keys_load_pair(path, &loaded, err, sizeof err), SP_EKEY);
    assert_non_null(strstr(err, ":2:"));

    /* Valid characters, but a different secret: still a wrong key. */
    memcpy(bad, kp.secret_z85, sizeof bad);
    bad[20] = bad[20] == 'a' ? 'b' : 'a';
    snprintf(text, sizeof text, "public-key = %s\nsecret-key = %s\n", kp.public_z85, bad);
    path = tmp_file(t, "flipped.key");
    write_text(path, text, 0600);
    assert_int_equal(keys_load_pair(path, &loaded, err, sizeof err), SP_EKEY);
    assert_non_null(strstr(err, "does not belong"));

    /* Missing secret, unknown setting, duplicate setting, missing file. */
    snprintf(text, sizeof text, "public-key = %s\n", kp.public_z85);
    path = tmp_file(t, "nosecret.key");
    write_text(path, text, 0600);
    assert_int_equal(keys_load_pair(path, &loaded, err, sizeof err), SP_EKEY);
    assert_non_null(strstr(err, "secret-key"));

    snprintf(text, sizeof text, "public-key = %s\nsecret-key = %s\ncolour = blue\n", kp.public_z85,
             kp.secret_z85);
    path = tmp_file(t, "unknown.key");
    write_text(path, text, 0600);
    assert_int_equal(keys_load_pair(path, &loaded, err, sizeof err), SP_EKEY);
    assert_non_null(strstr(err, ":3:"));

    snprintf(text, sizeof text, "public-key = %s\npublic-key = %s\nsecret-key = %s\n",
             kp.public_z85, kp.public_z85, kp.secret_z85);
    path = tmp_file(t, "twice.key");
    write_text(path, text, 0600);
    assert_int_equal(keys_load_pair(path, &loaded, err, sizeof err), SP_EKEY);
    assert_non_null(strstr(err, ":2:"));

    path = tmp_file(t, "absent.key");
    assert_int_equal(keys_load_pair(path, &loaded, err, sizeof err), SP_EKEY);
    assert_non_null(strstr(err, path));
}

static void test_mismatched_pair_refused(void **state)
{
    tmp_t *t = *state;
    keys_pair_t a, b, loaded;
    char text[512], err[512];
    assert_int_equal(keys_generate(&a), 0);
    assert_int_equal(keys_generate(&b), 0);
    /* CRLF line ends and blanks are fine; the mismatch is not. */
    snprintf(text, sizeof text, "# pair\r\n\r\n  public-key=%s  \r\nsecret-key =\t%s\r\n",
             a.public_z85, b.secret_z85);
    const char *path = tmp_file(t, "mixed.key");
    write_text(path, text, 0600);
    assert_int_equal(keys_load_pair(path, &loaded, err, sizeof err), SP_EKEY);
    assert_non_null(strstr(err, path));
    assert_non_null(strstr(err, "does not belong"));

    snprintf(text, sizeof text, "# pair\r\n\r\n  public-key=%s  \r\nsecret-key =\t%s\r\n",
             b.public_z85, b.secret_z85);
    write_text(path, text, 0600);
    assert_int_equal(keys_load_pair(path, &loaded, err, sizeof err), 0);
    assert_string_equal(loaded.public_z85, b.public_z85);
    assert_string_equal(loaded.secret_z85, b.secret_z85);
}

static void test_allowlist_parse(void **state)
{
    tmp_t *t = *state;
    keys_pair_t k[3];
    for (int i = 0; i < 3; i++)
        assert_int_equal(keys_generate(&k[i]), 0);
    char text[1024], err[512] = "";
    snprintf(text, sizeof text,
             "# cluster members\n"
             "\n"
             "%s node-a\n"
             "   %s\tnode b (site B)  \r\n"
             "# %s retired\n",
             k[0].public_z85, k[1].public_z85, k[2].public_z85);
    const char *path = tmp_file(t, "cluster.keys");
    write_text(path, text, 0644);
    keys_allowlist_t *list = keys_allowlist_load(path, err, sizeof err);
    assert_non_null(list);
    assert_int_equal(keys_allowlist_count(list), 2);

    uint8_t raw[KEYS_RAW_LEN];
    const char *name = NULL;
    assert_non_null(zmq_z85_decode(raw, k[0].public_z85));
    assert_true(keys_allowlist_find_raw(list, raw, &name));
    assert_string_equal(name, "node-a");
    assert_non_null(zmq_z85_decode(raw, k[1].public_z85));
    assert_true(keys_allowlist_find_raw(list, raw, &name));
    assert_string_equal(name, "node b (site B)");
    assert_non_null(zmq_z85_decode(raw, k[2].public_z85));
    assert_false(keys_allowlist_find_raw(list, raw, &name));
    assert_null(name);

    /* Adding in code: duplicate and bad keys are refused. */
    assert_int_equal(keys_allowlist_add(list, k[0].public_z85, "again"), -EEXIST);
    assert_int_equal(keys_allowlist_add(list, "short", "x"), SP_EINVAL);
    assert_int_equal(keys_allowlist_add(list, k[2].public_z85, ""), SP_EINVAL);
    assert_int_equal(keys_allowlist_add(list, k[2].public_z85, "node-c"), 0);
    assert_true(keys_allowlist_find_raw(list, raw, &name));
    assert_string_equal(name, "node-c");
    assert_int_equal(keys_allowlist_count(list), 3);
    assert_int_equal(keys_allowlist_add(list, k[0].public_z85, "node-c"), -EEXIST);

    /* By name, as a router finds the key of the node it calls. */
    char z85[KEYS_Z85_LEN + 1] = "";
    assert_true(keys_allowlist_find_name(list, "node b (site B)", z85));
    assert_string_equal(z85, k[1].public_z85);
    assert_true(keys_allowlist_find_name(list, "node-c", z85));
    assert_string_equal(z85, k[2].public_z85);
    assert_false(keys_allowlist_find_name(list, "node-z", z85));
    assert_false(keys_allowlist_find_name(list, "node", z85));
    keys_allowlist_destroy(&list);
    assert_null(list);
    keys_allowlist_destroy(&list);

    list = keys_allowlist_new();
    assert_int_equal(keys_allowlist_count(list), 0);
    assert_false(keys_allowlist_find_raw(list, raw, NULL));
    keys_allowlist_destroy(&list);
}

static void expect_bad_allowlist(tmp_t *t, const char *text, const char *want)
{
    char err[512] = "";
    const char *path = tmp_file(t, "bad.keys");
    write_text(path, text, 0644);
    keys_allowlist_t *list = keys_allowlist_load(path, err, sizeof err);
    assert_null(list);
    assert_non_null(strstr(err, path));
    if (strstr(err, want) == NULL)
        fail_msg("error '%s' lacks '%s'", err, want);
}

static void test_allowlist_bad_lines(void **state)
{
    tmp_t *t = *state;
    keys_pair_t a, b;
    assert_int_equal(keys_generate(&a), 0);
    assert_int_equal(keys_generate(&b), 0);
    char text[1024];

    snprintf(text, sizeof text, "# members\n%s node-a\n\n%.39s node-b\n", a.public_z85,
             b.public_z85);
    expect_bad_allowlist(t, text, ":4:");

    snprintf(text, sizeof text, "%s node-a\n%s\n", a.public_z85, b.public_z85);
    expect_bad_allowlist(t, text, ":2: missing member name");

    snprintf(text, sizeof text, "%s node-a\n# x\n%s node-a-again\n", a.public_z85, a.public_z85);
    expect_bad_allowlist(t, text, ":3: key already listed on line 1");

    snprintf(text, sizeof text, "%s node-a\n%s node-a\n", a.public_z85, b.public_z85);
    expect_bad_allowlist(t, text, ":2: name 'node-a' already used on line 1");

    snprintf(text, sizeof text, "%s node-a\nnot-a-key node-b\n", a.public_z85);
    expect_bad_allowlist(t, text, ":2:");

    char err[512] = "";
    assert_null(keys_allowlist_load(tmp_file(t, "absent.keys"), err, sizeof err));
    assert_non_null(strstr(err, t->path));
}

/* ---- reload ------------------------------------------------------------ */

/* Replaces path atomically, as an operator's tool should: a temporary file
 * in the same directory, renamed over the old one. */
static void replace_text(const char *path, const char *text)
{
    char tmp[256];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    write_text(tmp, text, 0644);
    assert_int_equal(rename(tmp, path), 0);
}

/* Rewrites path in place (same inode): truncate, write, and set the
 * modification time to mtime_sec so same-size rewrites differ too. */
static void rewrite_in_place(const char *path, const char *text, time_t mtime_sec)
{
    int fd = open(path, O_WRONLY | O_TRUNC);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    struct timespec times[2] = {{0, UTIME_OMIT}, {mtime_sec, 0}};
    assert_int_equal(futimens(fd, times), 0);
    close(fd);
}

static bool listed(const keys_allowlist_t *list, const keys_pair_t *k, const char **name)
{
    uint8_t raw[KEYS_RAW_LEN];
    assert_non_null(zmq_z85_decode(raw, k->public_z85));
    return keys_allowlist_find_raw(list, raw, name);
}

/* Collects what the library logs to stderr between capture_start() and
 * capture_end(), at info level and above. */
typedef struct {
    int saved_fd;
    char path[160];
    char text[8192];
} capture_t;

static void capture_start(capture_t *c, tmp_t *t)
{
    snprintf(c->path, sizeof c->path, "%s/stderr.log", t->dir);
    fflush(stderr);
    c->saved_fd = dup(STDERR_FILENO);
    int fd = open(c->path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    assert_true(c->saved_fd >= 0 && fd >= 0);
    assert_int_equal(dup2(fd, STDERR_FILENO), STDERR_FILENO);
    close(fd);
    log_set_level(LOG_INFO);
}

static void capture_end(capture_t *c)
{
    fflush(stderr);
    log_set_level(LOG_WARN);
    assert_int_equal(dup2(c->saved_fd, STDERR_FILENO), STDERR_FILENO);
    close(c->saved_fd);
    FILE *f = fopen(c->path, "r");
    assert_non_null(f);
    size_t n = fread(c->text, 1, sizeof c->text - 1, f);
    c->text[n] = '\0';
    fclose(f);
    fputs(c->text, stderr); /* still visible when a test fails */
}

static int count_of(const char *text, const char *needle)
{
    int n = 0;
    for (const char *p = text; (p = strstr(p, needle)) != NULL; p += strlen(needle))
        n++;
    return n;
}

/* Roles: an explicit last word, the compatible default from the name, a
 * name with blanks whose last word is no role, and a role changed by a
 * reload (looked up per request, so it applies at once). */
static keys_role_t role_of(const keys_allowlist_t *list, const keys_pair_t *k, const char **name)
{
    uint8_t raw[KEYS_RAW_LEN];
    assert_non_null(zmq_z85_decode(raw, k->public_z85));
    keys_role_t role = KEYS_ROLE_NODE;
    assert_true(keys_allowlist_find_member(list, raw, name, &role));
    return role;
}

static void test_allowlist_roles(void **state)
{
    tmp_t *t = *state;
    keys_pair_t k[6];
    for (int i = 0; i < 6; i++)
        assert_int_equal(keys_generate(&k[i]), 0);
    char path[160], text[2048], err[512] = "";
    snprintf(path, sizeof path, "%s", tmp_file(t, "cluster.keys"));
    snprintf(text, sizeof text,
             "%s n1 node\n%s router1\trouter  \n%s ops admin\n%s admin-backup\n%s legacy name\n"
             "%s node\n",
             k[0].public_z85, k[1].public_z85, k[2].public_z85, k[3].public_z85, k[4].public_z85,
             k[5].public_z85);
    write_text(path, text, 0644);
    keys_allowlist_t *list = keys_allowlist_load(path, err, sizeof err);
    assert_non_null(list);
    const char *name = NULL;
    assert_int_equal(role_of(list, &k[0], &name), KEYS_ROLE_NODE);
    assert_string_equal(name, "n1");
    assert_int_equal(role_of(list, &k[1], &name), KEYS_ROLE_ROUTER);
    assert_string_equal(name, "router1");
    assert_int_equal(role_of(list, &k[2], &name), KEYS_ROLE_ADMIN);
    assert_string_equal(name, "ops");
    assert_int_equal(role_of(list, &k[3], &name), KEYS_ROLE_ADMIN); /* default by name */
    assert_string_equal(name, "admin-backup");
    assert_int_equal(role_of(list, &k[4], &name), KEYS_ROLE_MEMBER); /* no role word */
    assert_string_equal(name, "legacy name");
    assert_int_equal(role_of(list, &k[5], &name), KEYS_ROLE_MEMBER); /* a name, not a role */
    assert_string_equal(name, "node");
    assert_string_equal(keys_role_name(KEYS_ROLE_MEMBER), "member");
    assert_string_equal(keys_role_name(KEYS_ROLE_ADMIN), "admin");

    /* The role changes with the file; the change is logged as a swap. */
    capture_t cap;
    capture_start(&cap, t);
    snprintf(text, sizeof text, "%s n1 node\n%s router1 admin\n", k[0].public_z85, k[1].public_z85);
    replace_text(path, text);
    assert_int_equal(keys_allowlist_refresh(list), 0);
    capture_end(&cap);
    assert_int_equal(role_of(list, &k[1], &name), KEYS_ROLE_ADMIN);
    assert_int_equal(count_of(cap.text, "1 added (router1)"), 1);

    /* In code: the default from the name, or the one given. */
    keys_allowlist_t *mem = keys_allowlist_new();
    assert_int_equal(keys_allowlist_add(mem, k[0].public_z85, "admin"), 0);
    assert_int_equal(keys_allowlist_add_role(mem, k[1].public_z85, "r1", KEYS_ROLE_ROUTER), 0);
    assert_int_equal(role_of(mem, &k[0], NULL), KEYS_ROLE_ADMIN);
    assert_int_equal(role_of(mem, &k[1], NULL), KEYS_ROLE_ROUTER);
    keys_allowlist_destroy(&mem);
    keys_allowlist_destroy(&list);
}

static void test_allowlist_reload_append_remove(void **state)
{
    tmp_t *t = *state;
    keys_pair_t k[3];
    for (int i = 0; i < 3; i++)
        assert_int_equal(keys_generate(&k[i]), 0);
    char path[160], text[1024], err[512] = "";
    snprintf(path, sizeof path, "%s", tmp_file(t, "cluster.keys"));
    snprintf(text, sizeof text, "%s node-a\n%s node-b\n", k[0].public_z85, k[1].public_z85);
    write_text(path, text, 0644);
    keys_allowlist_t *list = keys_allowlist_load(path, err, sizeof err);
    assert_non_null(list);
    assert_int_equal(keys_allowlist_count(list), 2);
    assert_false(listed(list, &k[2], NULL));
    assert_int_equal(keys_allowlist_refresh(list), 0); /* unchanged */

    /* Appended (atomically): picked up by plain lookups, no refresh call.
     * The deadline, many reload intervals, only tells "reloaded" from "never
     * reloaded"; how long it took is printed, not asserted. */
    capture_t cap;
    capture_start(&cap, t);
    snprintf(text, sizeof text, "%s node-a\n%s node-b\n%s node-c\n", k[0].public_z85,
             k[1].public_z85, k[2].public_z85);
    replace_text(path, text);
    int64_t t0 = sp_now_ms();
    const char *name = NULL;
    while (!listed(list, &k[2], &name) && sp_now_ms() - t0 < 20 * KEYS_RELOAD_INTERVAL_MS)
        usleep(20 * 1000);
    int64_t took = sp_now_ms() - t0;
    capture_end(&cap);
    assert_non_null(name);
    assert_string_equal(name, "node-c");
    print_message("appended key found by lookups after %lld ms\n", (long long)took);
    assert_int_equal(keys_allowlist_count(list), 3);
    char z85[KEYS_Z85_LEN + 1] = "";
    assert_true(keys_allowlist_find_name(list, "node-c", z85));
    assert_string_equal(z85, k[2].public_z85);
    assert_int_equal(count_of(cap.text, "reloaded: 3 keys, 1 added (node-c), 0 removed"), 1);

    /* Removed: gone after refresh, while a name handed out before stays
     * valid (a request in flight may still carry it). */
    const char *b_name = NULL;
    assert_true(listed(list, &k[1], &b_name));
    capture_start(&cap, t);
    snprintf(text, sizeof text, "# node-b retired\n%s node-a\n%s node-c\n", k[0].public_z85,
             k[2].public_z85);
    replace_text(path, text);
    assert_int_equal(keys_allowlist_refresh(list), 0);
    capture_end(&cap);
    assert_int_equal(count_of(cap.text, "reloaded: 2 keys, 0 added, 1 removed (node-b)"), 1);
    assert_false(listed(list, &k[1], &name));
    assert_null(name);
    assert_false(keys_allowlist_find_name(list, "node-b", z85));
    assert_int_equal(keys_allowlist_count(list), 2);
    assert_string_equal(b_name, "node-b");

    /* Re-listed under the same name: the same interned string. */
    snprintf(text, sizeof text, "%s node-a\n%s node-b\n", k[0].public_z85, k[1].public_z85);
    replace_text(path, text);
    assert_int_equal(keys_allowlist_refresh(list), 0);
    assert_true(listed(list, &k[1], &name));
    assert_ptr_equal(name, b_name);
    assert_false(listed(list, &k[2], NULL));
    keys_allowlist_destroy(&list);
}

static void test_allowlist_reload_in_place(void **state)
{
    tmp_t *t = *state;
    keys_pair_t k[3];
    for (int i = 0; i < 3; i++)
        assert_int_equal(keys_generate(&k[i]), 0);
    char path[160], text[1024], err[512] = "";
    snprintf(path, sizeof path, "%s", tmp_file(t, "cluster.keys"));
    snprintf(text, sizeof text, "%s node-a\n", k[0].public_z85);
    write_text(path, text, 0644);
    struct stat before, after;
    assert_int_equal(stat(path, &before), 0);
    keys_allowlist_t *list = keys_allowlist_load(path, err, sizeof err);
    assert_non_null(list);

    /* Same inode, different size. */
    snprintf(text, sizeof text, "%s node-a\n%s node-b\n", k[0].public_z85, k[1].public_z85);
    rewrite_in_place(path, text, before.st_mtim.tv_sec + 10);
    assert_int_equal(stat(path, &after), 0);
    assert_int_equal(after.st_ino, before.st_ino);
    assert_int_equal(keys_allowlist_refresh(list), 0);
    assert_true(listed(list, &k[1], NULL));
    assert_int_equal(keys_allowlist_count(list), 2);

    /* Same inode and size, only the content and mtime differ. */
    snprintf(text, sizeof text, "%s node-a\n%s node-c\n", k[0].public_z85, k[2].public_z85);
    rewrite_in_place(path, text, before.st_mtim.tv_sec + 20);
    assert_int_equal(stat(path, &after), 0);
    assert_int_equal(after.st_ino, before.st_ino);
    assert_int_equal(keys_allowlist_refresh(list), 0);
    assert_false(listed(list, &k[1], NULL));
    assert_true(listed(list, &k[2], NULL));
    keys_allowlist_destroy(&list);
}

static void test_allowlist_reload_refused(void **state)
{
    tmp_t *t = *state;
    keys_pair_t k[3];
    for (int i = 0; i < 3; i++)
        assert_int_equal(keys_generate(&k[i]), 0);
    char path[160], text[1024], err[512] = "";
    snprintf(path, sizeof path, "%s", tmp_file(t, "cluster.keys"));
    snprintf(text, sizeof text, "%s node-a\n%s node-b\n", k[0].public_z85, k[1].public_z85);
    write_text(path, text, 0644);
    keys_allowlist_t *list = keys_allowlist_load(path, err, sizeof err);
    assert_non_null(list);

    /* Malformed (line 3 has a truncated key, and it would add node-c):
     * refused, the previous list stays, the error is logged once however
     * often the file is checked. */
    capture_t cap;
    capture_start(&cap, t);
    snprintf(text, sizeof text, "%s node-a\n%s node-b\n%.39s node-c\n%s node-d\n", k[0].public_z85,
             k[1].public_z85, k[2].public_z85, k[2].public_z85);
    replace_text(path, text);
    assert_int_equal(keys_allowlist_refresh(list), SP_EKEY);
    assert_int_equal(keys_allowlist_refresh(list), SP_EKEY);
    assert_int_equal(keys_allowlist_refresh(list), SP_EKEY);
    capture_end(&cap);
    char want[256];
    snprintf(want, sizeof want, "cluster keys %s:3: first word is not", path);
    assert_int_equal(count_of(cap.text, want), 1);
    assert_int_equal(count_of(cap.text, "; keeping the previous 2 keys"), 1);
    assert_int_equal(keys_allowlist_count(list), 2);
    assert_true(listed(list, &k[0], NULL));
    assert_true(listed(list, &k[1], NULL));
    assert_false(listed(list, &k[2], NULL));

    /* Another bad version is a new error, logged again. */
    capture_start(&cap, t);
    snprintf(text, sizeof text, "%s node-a\n%s node-a\n", k[0].public_z85, k[2].public_z85);
    replace_text(path, text);
    assert_int_equal(keys_allowlist_refresh(list), SP_EKEY);
    assert_int_equal(keys_allowlist_refresh(list), SP_EKEY);
    capture_end(&cap);
    assert_int_equal(count_of(cap.text, ":2: name 'node-a' already used on line 1"), 1);
    assert_int_equal(count_of(cap.text, "keeping the previous 2 keys"), 1);

    /* Empty (as between truncation and rewrite), writable by others,
     * missing: each refused, nothing changes. */
    replace_text(path, "# nobody\n");
    assert_int_equal(keys_allowlist_refresh(list), SP_EKEY);
    snprintf(text, sizeof text, "%s node-a\n%s node-c\n", k[0].public_z85, k[2].public_z85);
    replace_text(path, text);
    assert_int_equal(chmod(path, 0666), 0);
    assert_int_equal(keys_allowlist_refresh(list), SP_EKEY);
    assert_int_equal(unlink(path), 0);
    assert_int_equal(keys_allowlist_refresh(list), SP_EKEY);
    assert_int_equal(keys_allowlist_count(list), 2);
    assert_true(listed(list, &k[1], NULL));
    assert_false(listed(list, &k[2], NULL));

    /* Fixed: applied. */
    replace_text(path, text);
    assert_int_equal(keys_allowlist_refresh(list), 0);
    assert_false(listed(list, &k[1], NULL));
    assert_true(listed(list, &k[2], NULL));
    keys_allowlist_destroy(&list);

    /* The same safety checks hold at load time, except that an empty file
     * loads (as an empty list admitting nobody). */
    assert_int_equal(chmod(path, 0646), 0);
    assert_null(keys_allowlist_load(path, err, sizeof err));
    assert_non_null(strstr(err, "chmod o-w"));
    replace_text(path, "");
    list = keys_allowlist_load(path, err, sizeof err);
    assert_non_null(list);
    assert_int_equal(keys_allowlist_count(list), 0);
    keys_allowlist_destroy(&list);
    assert_null(keys_allowlist_load(t->dir, err, sizeof err));
}

static void test_allowlist_memory_no_reload(void **state)
{
    (void)state;
    keys_pair_t k;
    assert_int_equal(keys_generate(&k), 0);
    keys_allowlist_t *list = keys_allowlist_new();
    assert_int_equal(keys_allowlist_add(list, k.public_z85, "solo"), 0);
    assert_int_equal(keys_allowlist_refresh(list), 0);
    assert_int_equal(keys_allowlist_count(list), 1);
    assert_true(listed(list, &k, NULL));
    keys_allowlist_destroy(&list);
    assert_int_equal(keys_allowlist_refresh(NULL), 0);
}

/* Lookups from several threads while the file is replaced over and over.
 * Versions alternate between {a, b} and {a, c, d}; whatever version a
 * lookup sees, these hold. Under ASan/TSan this also checks that nothing is
 * freed or written while being read. */
#define RELOAD_THREADS 4
#define RELOAD_REWRITES 200

typedef struct {
    keys_allowlist_t *list;
    const keys_pair_t *k;
    atomic_bool *stop;
    long lookups;
    long seen_b; /* lookups that found the {a, b} version's b */
    long seen_d; /* and the {a, c, d} version's d */
    int failures;
    pthread_t thread;
} reader_t;

static void *reader_main(void *arg)
{
    reader_t *r = arg;
    uint8_t raw[4][KEYS_RAW_LEN];
    for (int i = 0; i < 4; i++)
        zmq_z85_decode(raw[i], r->k[i].public_z85);
    static const char *names[] = {"node-a", "node-b", "node-c", "node-d"};
    char z85[KEYS_Z85_LEN + 1];
    while (!atomic_load(r->stop)) {
        const char *name = NULL;
        /* No cmocka asserts off the main thread: count failures. */
        if (!keys_allowlist_find_raw(r->list, raw[0], &name) || strcmp(name, "node-a") != 0)
            r->failures++;
        for (int i = 1; i < 4; i++) {
            if (!keys_allowlist_find_raw(r->list, raw[i], &name))
                continue;
            if (strcmp(name, names[i]) != 0)
                r->failures++;
            r->seen_b += i == 1;
            r->seen_d += i == 3;
        }
        if (keys_allowlist_find_name(r->list, "node-d", z85) &&
            strcmp(z85, r->k[3].public_z85) != 0)
            r->failures++;
        size_t n = keys_allowlist_count(r->list);
        if (n != 2 && n != 3)
            r->failures++;
        r->lookups++;
    }
    return NULL;
}

static void test_allowlist_reload_concurrent(void **state)
{
    tmp_t *t = *state;
    keys_pair_t k[4];
    for (int i = 0; i < 4; i++)
        assert_int_equal(keys_generate(&k[i]), 0);
    char path[160], va[512], vb[512], err[512] = "";
    snprintf(path, sizeof path, "%s", tmp_file(t, "cluster.keys"));
    snprintf(va, sizeof va, "%s node-a\n%s node-b\n", k[0].public_z85, k[1].public_z85);
    snprintf(vb, sizeof vb, "%s node-a\n%s node-c\n%s node-d\n", k[0].public_z85, k[2].public_z85,
             k[3].public_z85);
    write_text(path, va, 0644);
    keys_allowlist_t *list = keys_allowlist_load(path, err, sizeof err);
    assert_non_null(list);

    atomic_bool stop;
    atomic_init(&stop, false);
    reader_t r[RELOAD_THREADS];
    for (int i = 0; i < RELOAD_THREADS; i++) {
        r[i] = (reader_t){.list = list, .k = k, .stop = &stop};
        assert_int_equal(pthread_create(&r[i].thread, NULL, reader_main, &r[i]), 0);
    }
    int reloaded = 0;
    for (int i = 1; i <= RELOAD_REWRITES; i++) {
        replace_text(path, i % 2 ? vb : va);
        if (keys_allowlist_refresh(list) == 0)
            reloaded++;
        bool want_d = i % 2;
        uint8_t raw[KEYS_RAW_LEN];
        zmq_z85_decode(raw, k[3].public_z85);
        assert_int_equal(keys_allowlist_find_raw(list, raw, NULL), want_d);
    }
    atomic_store(&stop, true);
    long lookups = 0, seen_b = 0, seen_d = 0;
    for (int i = 0; i < RELOAD_THREADS; i++) {
        pthread_join(r[i].thread, NULL);
        assert_int_equal(r[i].failures, 0);
        assert_true(r[i].lookups > 0);
        lookups += r[i].lookups;
        seen_b += r[i].seen_b;
        seen_d += r[i].seen_d;
    }
    /* The readers saw both versions, not one list that never changed. */
    assert_true(seen_b > 0 && seen_d > 0);
    assert_int_equal(reloaded, RELOAD_REWRITES);
    assert_int_equal(keys_allowlist_count(list), 2); /* the last version: va */
    print_message("%d reloads, %ld lookups from %d threads\n", reloaded, lookups, RELOAD_THREADS);
    keys_allowlist_destroy(&list);
}

int main(void)
{
    log_init("test_keys", LOG_WARN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_generate),
        cmocka_unit_test(test_z85_valid),
        cmocka_unit_test_setup_teardown(test_pair_round_trip, tmp_setup, tmp_teardown),
        cmocka_unit_test_setup_teardown(test_write_pair_refuses_overwrite, tmp_setup, tmp_teardown),
        cmocka_unit_test_setup_teardown(test_loose_mode_refused, tmp_setup, tmp_teardown),
        cmocka_unit_test_setup_teardown(test_corrupt_pair_refused, tmp_setup, tmp_teardown),
        cmocka_unit_test_setup_teardown(test_mismatched_pair_refused, tmp_setup, tmp_teardown),
        cmocka_unit_test_setup_teardown(test_allowlist_parse, tmp_setup, tmp_teardown),
        cmocka_unit_test_setup_teardown(test_allowlist_bad_lines, tmp_setup, tmp_teardown),
        cmocka_unit_test_setup_teardown(test_allowlist_roles, tmp_setup, tmp_teardown),
        cmocka_unit_test_setup_teardown(test_allowlist_reload_append_remove, tmp_setup,
                                        tmp_teardown),
        cmocka_unit_test_setup_teardown(test_allowlist_reload_in_place, tmp_setup, tmp_teardown),
        cmocka_unit_test_setup_teardown(test_allowlist_reload_refused, tmp_setup, tmp_teardown),
        cmocka_unit_test(test_allowlist_memory_no_reload),
        cmocka_unit_test_setup_teardown(test_allowlist_reload_concurrent, tmp_setup, tmp_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
