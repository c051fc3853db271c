/* test_admin.c - the metric registry and its exposition (admin.c): series
 * found again by name and labels, counters from many threads, histogram
 * buckets cumulative, collectors' families, the process metrics; and the
 * JSON log format (log.c): every line one JSON object, messages with
 * quotes, control characters and bytes that are not UTF-8. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "admin.h"
#include "base.h"
#include "log.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void test_series_found_again(void **state)
{
    (void)state;
    admin_counter_t *a = admin_counter("t_requests_total", "Requests", "kind=\"a\"");
    admin_counter_t *b = admin_counter("t_requests_total", "Requests", "kind=\"b\"");
    assert_ptr_not_equal(a, b);
    assert_ptr_equal(a, admin_counter("t_requests_total", "Requests", "kind=\"a\""));
}

static void *add_many(void *arg)
{
    for (int i = 0; i < 100000; i++)
        admin_add(arg, 1);
    return NULL;
}

static void test_counters_from_threads(void **state)
{
    (void)state;
    admin_counter_t *c = admin_counter("t_threads_total", "Adds from 4 threads", "");
    pthread_t t[4];
    for (int i = 0; i < 4; i++)
        pthread_create(&t[i], NULL, add_many, c);
    for (int i = 0; i < 4; i++)
        pthread_join(t[i], NULL);
    char *text = admin_render();
    assert_non_null(strstr(text, "# TYPE t_threads_total counter\nt_threads_total 400000\n"));
    free(text);
}

static void test_histogram_cumulative(void **state)
{
    (void)state;
    admin_hist_t *h = admin_histogram("t_seconds", "Durations", "op=\"x\"");
    admin_observe(h, 0.0002);
    admin_observe(h, 0.003);
    admin_observe(h, 0.003);
    admin_observe(h, 60);
    char *text = admin_render();
    assert_non_null(strstr(text, "# TYPE t_seconds histogram\n"));
    assert_non_null(strstr(text, "t_seconds_bucket{op=\"x\",le=\"0.0005\"} 1\n"));
    assert_non_null(strstr(text, "t_seconds_bucket{op=\"x\",le=\"0.0025\"} 1\n"));
    assert_non_null(strstr(text, "t_seconds_bucket{op=\"x\",le=\"0.005\"} 3\n"));
    assert_non_null(strstr(text, "t_seconds_bucket{op=\"x\",le=\"10\"} 3\n"));
    assert_non_null(strstr(text, "t_seconds_bucket{op=\"x\",le=\"+Inf\"} 4\n"));
    assert_non_null(strstr(text, "t_seconds_count{op=\"x\"} 4\n"));
    assert_non_null(strstr(text, "t_seconds_sum{op=\"x\"} 60.006200\n"));
    free(text);
}

static void collect(void *ctx, admin_out_t *o)
{
    admin_out_family(o, "t_collected", "From a collector", "gauge");
    admin_out_sample(o, "t_collected", "a=\"1\"", *(double *)ctx);
}

static void test_collector_and_process(void **state)
{
    (void)state;
    double v = 2.5;
    admin_add_collector(collect, &v);
    char *text = admin_render();
    assert_non_null(strstr(text, "# TYPE t_collected gauge\nt_collected{a=\"1\"} 2.5\n"));
    assert_non_null(strstr(text, "\nprocess_resident_memory_bytes "));
    assert_non_null(strstr(text, "\nprocess_cpu_seconds_total "));
    assert_non_null(strstr(text, "shardpacs_build_info{version="));
    free(text);
    admin_stop(); /* forgets the collector */
    text = admin_render();
    assert_null(strstr(text, "t_collected"));
    free(text);
}

/* Runs fn with stderr sent to a file; returns what it wrote. */
static char *capture_stderr(void (*fn)(void))
{
    char path[] = "/tmp/test_admin_logXXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    fflush(stderr);
    int saved = dup(2);
    dup2(fd, 2);
    fn();
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    off_t len = lseek(fd, 0, SEEK_END);
    char *buf = calloc(1, (size_t)len + 1);
    assert_int_equal(pread(fd, buf, (size_t)len, 0), len);
    close(fd);
    unlink(path);
    return buf;
}

static void log_some(void)
{
    log_info("plain");
    log_warn("quote \" backslash \\ newline\nnext tab\t é end");
    log_error("bad byte \xff and \xc3 alone");
    log_debug("not shown at info");
}

static void test_json_log(void **state)
{
    (void)state;
    log_format_t f;
    assert_int_equal(log_parse_format("JSON", &f), 0);
    assert_int_equal(f, LOG_FORMAT_JSON);
    assert_int_equal(log_parse_format("xml", &f), SP_EINVAL);
    log_init("node[n\"1]", LOG_INFO);
    log_set_format(LOG_FORMAT_JSON);
    char *out = capture_stderr(log_some);
    log_set_format(LOG_FORMAT_TEXT);
    /* Three lines, each a whole object. */
    char *l1 = out, *l2 = strchr(l1, '\n') + 1, *l3 = strchr(l2, '\n') + 1;
    assert_non_null(l3);
    assert_string_equal(strchr(l3, '\n'), "\n");
    assert_memory_equal(l1, "{\"ts\":\"", 7);
    assert_non_null(strstr(l1, "\",\"level\":\"info\",\"component\":\"node[n\\\"1]\",\"msg\":"
                               "\"plain\"}\n"));
    assert_non_null(strstr(
        l2, "\"level\":\"warn\",\"component\":\"node[n\\\"1]\",\"msg\":\"quote \\\" backslash "
            "\\\\ newline\\u000anext tab\\u0009 \xc3\xa9 end\"}\n"));
    assert_non_null(strstr(l3, "\"msg\":\"bad byte \\u00ff and \\u00c3 alone\"}\n"));
    free(out);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_series_found_again),
        cmocka_unit_test(test_counters_from_threads),
        cmocka_unit_test(test_histogram_cumulative),
        cmocka_unit_test(test_collector_and_process),
        cmocka_unit_test(test_json_log),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
