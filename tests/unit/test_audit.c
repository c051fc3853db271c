/* test_audit.c - the audit trail: one JSON line per record with the PS3.15
 * event codes, peer text escaped, concurrent writers each getting their
 * line, a waiting caller's record in the file when it returns, rotation by
 * rename, syslog over UDP. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "audit.h"
#include "base.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

static char dir[] = "/tmp/test_audit.XXXXXX";

static char *read_all(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        return sp_strdup("");
    char *buf = NULL;
    size_t len = 0, cap = 0;
    char chunk[4096];
    size_t n;
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0) {
        if (len + n + 1 > cap) {
            cap = (len + n + 1) * 2;
            buf = sp_realloc(buf, cap);
        }
        memcpy(buf + len, chunk, n);
        len += n;
    }
    fclose(f);
    if (buf == NULL)
        return sp_strdup("");
    buf[len] = '\0';
    return buf;
}

static size_t count_of(const char *text, const char *needle)
{
    size_t n = 0;
    for (const char *p = text; (p = strstr(p, needle)) != NULL; p += strlen(needle))
        n++;
    return n;
}

static void start(const char *path, bool commit, const char *syslog)
{
    char err[256] = "";
    audit_config_t cfg = {.path = path,
                          .source = "unit",
                          .syslog = syslog,
                          .sync_commit = commit,
                          .sync_interval_ms = 50,
                          .queue = 16};
    assert_int_equal(audit_start(&cfg, err, sizeof err), 0);
    assert_true(audit_enabled());
}

static void test_record_format(void **state)
{
    (void)state;
    char path[128];
    snprintf(path, sizeof path, "%s/format.jsonl", dir);
    start(path, true, NULL);
    audit_record_t r = AUDIT_RECORD_INIT(AUDIT_STORE);
    r.operation = "C-STORE";
    r.ae_title = "MOD\"A\\1";
    r.address = "127.0.0.1";
    r.patient_id = "P\x01\xff-1"; /* a control character and a byte that is no UTF-8 */
    r.study = "1.2.3";
    r.instances = 1;
    r.dimse_status = 0;
    assert_int_equal(audit_record(&r, true), 0);
    /* Written by the time a waiting caller returns, before any stop. */
    char *text = read_all(path);
    assert_non_null(strstr(text, "\"source\":\"unit\""));
    assert_non_null(strstr(text, "\"event\":\"DICOM Instances Transferred\""));
    assert_non_null(strstr(text, "\"event_id\":\"DCM 110104\""));
    assert_non_null(strstr(text, "\"action\":\"C\",\"outcome\":0"));
    assert_non_null(strstr(text, "\"actor\":{\"ae_title\":\"MOD\\\"A\\\\1\",\"address\":"));
    assert_non_null(strstr(text, "\"patient_id\":\"P\\u0001\\ufffd-1\""));
    assert_non_null(strstr(text, "\"studies\":[\"1.2.3\"],\"instances\":1,\"status\":\"0x0000\""));
    assert_int_equal(count_of(text, "\n"), 1);
    free(text);

    audit_record_t q = AUDIT_RECORD_INIT(AUDIT_RESTRICTED);
    q.outcome = AUDIT_MINOR_FAILURE;
    q.user = "router1";
    q.role = "router";
    q.operation = "drain";
    assert_int_equal(audit_record(&q, true), 0);
    audit_stop();
    assert_false(audit_enabled());
    text = read_all(path);
    assert_non_null(strstr(text, "\"event_type\":\"DCM 110132 Use of Restricted Function\""));
    assert_non_null(strstr(text, "\"actor\":{\"user\":\"router1\",\"role\":\"router\"}"));
    assert_null(strstr(text, "\"instances\":-1"));
    assert_int_equal(count_of(text, "\n"), 2);
    free(text);
    /* Stopped: records go nowhere, and nothing breaks. */
    assert_int_equal(audit_record(&q, true), 0);
}

typedef struct {
    int index;
    int count;
} writer_arg_t;

static void *writer(void *arg)
{
    writer_arg_t *w = arg;
    for (int i = 0; i < w->count; i++) {
        char study[64];
        snprintf(study, sizeof study, "1.2.%d.%d", w->index, i);
        audit_record_t r = AUDIT_RECORD_INIT(AUDIT_QUERY);
        r.study = study;
        audit_record(&r, i % 3 == 0);
    }
    return NULL;
}

/* Eight threads through a queue of 16: every record lands once, whole. */
static void test_concurrent_writers(void **state)
{
    (void)state;
    for (int commit = 0; commit < 2; commit++) {
        char path[128];
        snprintf(path, sizeof path, "%s/many%d.jsonl", dir, commit);
        start(path, commit, NULL);
        pthread_t th[8];
        writer_arg_t args[8];
        for (int i = 0; i < 8; i++) {
            args[i] = (writer_arg_t){i, 500};
            assert_int_equal(pthread_create(&th[i], NULL, writer, &args[i]), 0);
        }
        for (int i = 0; i < 8; i++)
            pthread_join(th[i], NULL);
        audit_stop();
        char *text = read_all(path);
        assert_int_equal(count_of(text, "\n"), 4000);
        assert_int_equal(count_of(text, "{\"time\""), 4000);
        assert_int_equal(count_of(text, "\"1.2.7.499\""), 1);
        assert_int_equal(count_of(text, "\"1.2.0.0\""), 1);
        free(text);
    }
}

/* Renamed away (rotation): later records go to a new file at the path. */
static void test_rotation(void **state)
{
    (void)state;
    char path[128], old[140];
    snprintf(path, sizeof path, "%s/rot.jsonl", dir);
    snprintf(old, sizeof old, "%s.1", path);
    start(path, false, NULL);
    audit_record_t r = AUDIT_RECORD_INIT(AUDIT_APPLICATION_START);
    assert_int_equal(audit_record(&r, true), 0);
    assert_int_equal(rename(path, old), 0);
    struct stat st;
    for (int i = 0; i < 60 && stat(path, &st) != 0; i++) {
        usleep(50 * 1000);
        assert_int_equal(audit_record(&r, true), 0);
    }
    r.event = AUDIT_APPLICATION_STOP;
    assert_int_equal(audit_record(&r, true), 0);
    audit_stop();
    char *a = read_all(old), *b = read_all(path);
    assert_true(count_of(a, "Application Start") >= 1);
    assert_int_equal(count_of(b, "DCM 110121 Application Stop"), 1);
    assert_int_equal(count_of(a, "Application Stop"), 0);
    free(a);
    free(b);
}

/* RFC 5424 over UDP to a loopback collector, besides the file. */
static void test_syslog(void **state)
{
    (void)state;
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    assert_true(s >= 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(bind(s, (struct sockaddr *)&a, sizeof a), 0);
    socklen_t len = sizeof a;
    assert_int_equal(getsockname(s, (struct sockaddr *)&a, &len), 0);
    struct timeval tv = {.tv_sec = 5};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    char spec[64], path[128];
    snprintf(spec, sizeof spec, "127.0.0.1:%u", (unsigned)ntohs(a.sin_port));
    snprintf(path, sizeof path, "%s/sys.jsonl", dir);
    start(path, false, spec);
    audit_record_t r = AUDIT_RECORD_INIT(AUDIT_ASSOCIATION);
    r.outcome = AUDIT_MINOR_FAILURE;
    r.ae_title = "INTRUDER";
    assert_int_equal(audit_record(&r, true), 0);
    char buf[4096];
    ssize_t n = recv(s, buf, sizeof buf - 1, 0);
    assert_true(n > 0);
    buf[n] = '\0';
    assert_memory_equal(buf, "<84>1 ", 6); /* authpriv.warning: a failure */
    assert_non_null(strstr(buf, " shardpacs "));
    assert_non_null(strstr(buf, "{\"time\""));
    assert_non_null(strstr(buf, "\"ae_title\":\"INTRUDER\""));
    audit_stop();
    close(s);

    char err[256] = "";
    audit_config_t bad = {.syslog = "no-port"};
    assert_int_equal(audit_start(&bad, err, sizeof err), SP_ECONFIG);
    assert_non_null(strstr(err, "HOST:PORT"));
    audit_config_t none = {0};
    assert_int_equal(audit_start(&none, err, sizeof err), 0);
    assert_false(audit_enabled());
}

int main(void)
{
    if (mkdtemp(dir) == NULL)
        return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_record_format),
        cmocka_unit_test(test_concurrent_writers),
        cmocka_unit_test(test_rotation),
        cmocka_unit_test(test_syslog),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    char cmd[160];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd) != 0)
        rc = rc ? rc : 1;
    return rc;
}
