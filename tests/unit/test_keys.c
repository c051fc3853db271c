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
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
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
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
