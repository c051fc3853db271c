/* test_access.c - the DICOM access rules: parsing, first match, wildcards,
 * certificate subjects and addresses, move destinations, malformed files
 * refused with their line, reloads applied and refused. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "access.h"
#include "base.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char dir[] = "/tmp/test_access.XXXXXX";

/* Writes text to a new file renamed over path, as an operator should. */
static const char *write_rules(const char *name, const char *text)
{
    static char path[160];
    char tmp[180];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
    assert_int_equal(rename(tmp, path), 0);
    return path;
}

static const char *const locked_down =
    "# calling AE      conditions                          operations\n"
    "MODALITY_*        from=10.1.*                         allow=store,echo\n"
    "VIEWER            subject=\"CN=viewer, O=Hospital\"   allow=find,get,move,echo "
    "move_to=VIEWER,WS?\n"
    "VIEWER            allow=echo   # without its certificate, only echo\n"
    "ARCHIVE2          allow=all\n"
    "BLOCKED           allow=none\n";

static unsigned ops(access_rules_t *r, const char *ae, const char *addr, const char *subject)
{
    access_peer_t p = {ae, addr, subject};
    return access_ops(r, &p, NULL);
}

static void test_first_match(void **state)
{
    (void)state;
    char err[512] = "";
    access_rules_t *r = access_rules_load(write_rules("rules", locked_down), err, sizeof err);
    assert_non_null(r);
    assert_int_equal(ops(r, "MODALITY_CT1", "10.1.2.3", NULL), ACCESS_STORE | ACCESS_ECHO);
    assert_int_equal(ops(r, "MODALITY_CT1 ", "10.1.2.3", NULL), ACCESS_STORE | ACCESS_ECHO);
    assert_int_equal(ops(r, "MODALITY_CT1", "10.2.0.1", NULL), 0); /* wrong network */
    assert_int_equal(ops(r, "modality_ct1", "10.1.2.3", NULL), 0); /* AE titles are exact */
    assert_int_equal(ops(r, "VIEWER", "10.9.9.9", "CN=viewer, O=Hospital"),
                     ACCESS_FIND | ACCESS_GET | ACCESS_MOVE | ACCESS_ECHO);
    assert_int_equal(ops(r, "VIEWER", "10.9.9.9", NULL), ACCESS_ECHO);
    assert_int_equal(ops(r, "VIEWER", "10.9.9.9", "CN=mallory"), ACCESS_ECHO);
    assert_int_equal(ops(r, "ARCHIVE2", NULL, NULL), ACCESS_ALL);
    assert_int_equal(ops(r, "BLOCKED", NULL, NULL), 0);
    assert_int_equal(ops(r, "STRANGER", NULL, NULL), 0);
    unsigned line = 0;
    access_peer_t v = {"VIEWER", "10.9.9.9", NULL};
    access_ops(r, &v, &line);
    assert_int_equal(line, 4);

    char why[256];
    access_peer_t viewer = {"VIEWER", "10.9.9.9", "CN=viewer, O=Hospital"};
    assert_true(access_check(r, &viewer, ACCESS_MOVE, "VIEWER", why, sizeof why));
    assert_true(access_check(r, &viewer, ACCESS_MOVE, "WS1", why, sizeof why));
    assert_false(access_check(r, &viewer, ACCESS_MOVE, "WS12", why, sizeof why));
    assert_non_null(strstr(why, "line 3 does not allow moves to 'WS12'"));
    assert_false(access_check(r, &viewer, ACCESS_STORE, NULL, why, sizeof why));
    assert_non_null(strstr(why, "line 3 does not allow store"));
    access_peer_t archive = {"ARCHIVE2", NULL, NULL};
    assert_true(access_check(r, &archive, ACCESS_MOVE, "ANYWHERE", why, sizeof why));
    access_peer_t stranger = {"STRANGER", NULL, NULL};
    assert_false(access_check(r, &stranger, ACCESS_ECHO, NULL, why, sizeof why));
    assert_non_null(strstr(why, "no access rule matches calling AE 'STRANGER'"));
    access_rules_destroy(&r);
    assert_null(r);

    /* No rules: everyone, everything. */
    assert_int_equal(ops(NULL, "ANY", NULL, NULL), ACCESS_ALL);
    assert_true(access_check(NULL, &stranger, ACCESS_MOVE, "X", why, sizeof why));
    /* An empty file at start admits nobody. */
    r = access_rules_load(write_rules("empty", "# nothing yet\n"), err, sizeof err);
    assert_non_null(r);
    assert_int_equal(ops(r, "ANY", NULL, NULL), 0);
    access_rules_destroy(&r);
}

static void expect_bad(const char *text, const char *want)
{
    char err[512] = "";
    access_rules_t *r = access_rules_load(write_rules("bad", text), err, sizeof err);
    assert_null(r);
    if (strstr(err, want) == NULL)
        fail_msg("error '%s' lacks '%s'", err, want);
}

static void test_malformed(void **state)
{
    (void)state;
    expect_bad("A allow=store\nB\n", "bad:2: rule for 'B' has no allow=");
    expect_bad("A allow=store,delete\n", ":1: allow: 'delete' is not echo");
    expect_bad("A allow=store frobnicate=1\n", "'frobnicate' is not allow, move_to");
    expect_bad("A allow=store allow=find\n", "given twice");
    expect_bad("allow=store\n", "starts with a calling AE title pattern");
    expect_bad("THIS_AE_IS_TOO_LONG allow=store\n", "1 to 16 characters");
    expect_bad("A subject=\"CN=x allow=find\n", "unclosed quote");
    expect_bad("A allow=move move_to=,\n", "move_to lists no AE title");
    expect_bad("A allow=find store\n", "'store' is not KEY=VALUE");
    char err[64];
    assert_null(access_rules_load("/nonexistent/rules", err, sizeof err));
}

static void test_reload(void **state)
{
    (void)state;
    char err[512] = "";
    const char *path = write_rules("live", "A allow=store\n");
    access_rules_t *r = access_rules_load(path, err, sizeof err);
    assert_non_null(r);
    assert_int_equal(ops(r, "A", NULL, NULL), ACCESS_STORE);

    /* Changed: picked up by plain lookups within a few intervals. */
    write_rules("live", "A allow=find\nB allow=echo\n");
    int64_t t0 = sp_now_ms();
    while (ops(r, "A", NULL, NULL) != ACCESS_FIND && sp_now_ms() - t0 < 10000)
        usleep(20 * 1000);
    assert_int_equal(ops(r, "A", NULL, NULL), ACCESS_FIND);
    assert_int_equal(ops(r, "B", NULL, NULL), ACCESS_ECHO);

    /* Malformed, then empty: refused, the previous rules stay. */
    write_rules("live", "A allow=find\nB allow=echo,teleport\n");
    assert_int_equal(access_rules_refresh(r), SP_ECONFIG);
    assert_int_equal(access_rules_refresh(r), SP_ECONFIG); /* still refused, logged once */
    assert_int_equal(ops(r, "B", NULL, NULL), ACCESS_ECHO);
    write_rules("live", "");
    assert_int_equal(access_rules_refresh(r), SP_ECONFIG);
    assert_int_equal(ops(r, "A", NULL, NULL), ACCESS_FIND);
    /* Fixed: applied. */
    write_rules("live", "* allow=get\n");
    assert_int_equal(access_rules_refresh(r), 0);
    assert_int_equal(ops(r, "A", NULL, NULL), ACCESS_GET);
    assert_int_equal(ops(r, "B", NULL, NULL), ACCESS_GET);
    access_rules_destroy(&r);
}

int main(void)
{
    if (mkdtemp(dir) == NULL)
        return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_first_match),
        cmocka_unit_test(test_malformed),
        cmocka_unit_test(test_reload),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    char cmd[160];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd) != 0)
        rc = rc ? rc : 1;
    return rc;
}
