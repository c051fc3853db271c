/* test_wire.c - round trips of every message kind, and validated decoding
 * of truncated, random and semantically bad buffers. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "wire.h"

#include <stdlib.h>
#include <string.h>

#define STUDY "1.2.826.0.1.3680043.8.498.10"
#define SERIES STUDY ".1"
#define SOP SERIES ".1"

static void fill_put(wire_request_t *r)
{
    memset(r, 0, sizeof *r);
    r->kind = WIRE_PUT;
    r->partition = 4095;
    attrs_set(&r->attrs, ATTR_STUDY_INSTANCE_UID, STUDY);
    attrs_set(&r->attrs, ATTR_SERIES_INSTANCE_UID, SERIES);
    attrs_set(&r->attrs, ATTR_SOP_INSTANCE_UID, SOP);
    attrs_set(&r->attrs, ATTR_PATIENT_NAME, "M\xc3\xbcller^Hans");
    attrs_set(&r->attrs, ATTR_STUDY_DATE, "20260101");
    for (int i = 0; i < SP_DIGEST_LEN; i++)
        r->digest[i] = (uint8_t)i;
}

static void test_put_round_trip(void **state)
{
    (void)state;
    wire_request_t in, out;
    fill_put(&in);
    uint8_t *buf;
    size_t len;
    assert_int_equal(wire_encode_request(&in, &buf, &len), 0);
    char err[256];
    assert_int_equal(wire_decode_request(buf, len, &out, err, sizeof err), 0);
    assert_int_equal(out.kind, WIRE_PUT);
    assert_int_equal(out.partition, 4095);
    assert_string_equal(attrs_get(&out.attrs, ATTR_PATIENT_NAME), "M\xc3\xbcller^Hans");
    assert_string_equal(attrs_get(&out.attrs, ATTR_SOP_INSTANCE_UID), SOP);
    assert_null(attrs_get(&out.attrs, ATTR_MODALITY));
    assert_memory_equal(out.digest, in.digest, SP_DIGEST_LEN);
    free(buf);
    wire_request_free(&in);
    wire_request_free(&out);
}

static void test_find_reply_round_trip(void **state)
{
    (void)state;
    wire_reply_t in = {.kind = WIRE_FIND, .truncated = true}, out;
    for (int i = 0; i < 50; i++) {
        attrs_t *m = wire_reply_add_match(&in);
        attrs_set(m, ATTR_STUDY_INSTANCE_UID, STUDY);
        attrs_set(m, ATTR_NUM_STUDY_INSTANCES, "12");
        attrs_set(m, ATTR_MODALITIES_IN_STUDY, "CT\\MR");
    }
    uint8_t *buf;
    size_t len;
    assert_int_equal(wire_encode_reply(&in, &buf, &len), 0);
    char err[256];
    assert_int_equal(wire_decode_reply(buf, len, &out, err, sizeof err), 0);
    assert_int_equal(out.nmatches, 50);
    assert_true(out.truncated);
    assert_string_equal(attrs_get(&out.matches[49], ATTR_MODALITIES_IN_STUDY), "CT\\MR");
    free(buf);
    wire_reply_free(&in);
    wire_reply_free(&out);
}

static void test_list_and_error_replies(void **state)
{
    (void)state;
    wire_reply_t in = {.kind = WIRE_PARTITION_LIST}, out;
    wire_instance_t *w = wire_reply_add_instance(&in);
    w->partition = 3;
    w->study_uid = strdup(STUDY);
    w->series_uid = strdup(SERIES);
    w->sop_uid = strdup(SOP);
    w->size = 1234;
    in.next_cursor = strdup(STUDY "/" SERIES "/" SOP);
    uint8_t *buf;
    size_t len;
    char err[256];
    wire_encode_reply(&in, &buf, &len);
    assert_int_equal(wire_decode_reply(buf, len, &out, err, sizeof err), 0);
    assert_int_equal(out.ninstances, 1);
    assert_int_equal(out.instances[0].size, 1234);
    assert_string_equal(out.next_cursor, STUDY "/" SERIES "/" SOP);
    free(buf);
    wire_reply_free(&out);
    wire_reply_free(&in);

    wire_reply_t e = {.status = SP_ENOTFOUND, .error = strdup("no such instance")};
    wire_encode_reply(&e, &buf, &len);
    assert_int_equal(wire_decode_reply(buf, len, &out, err, sizeof err), 0);
    assert_int_equal(out.status, SP_ENOTFOUND);
    assert_string_equal(out.error, "no such instance");
    free(buf);
    wire_reply_free(&out);
    wire_reply_free(&e);
}

/* Every prefix of a valid message either decodes to something valid or is
 * refused; under ASan this also proves no out-of-bounds read. */
static void test_truncated_buffers(void **state)
{
    (void)state;
    wire_request_t in, out;
    fill_put(&in);
    uint8_t *buf;
    size_t len;
    wire_encode_request(&in, &buf, &len);
    size_t refused = 0;
    for (size_t cut = 0; cut < len; cut++) {
        uint8_t *copy = malloc(cut ? cut : 1);
        memcpy(copy, buf, cut);
        char err[256];
        int rc = wire_decode_request(copy, cut, &out, err, sizeof err);
        if (rc == 0) {
            /* A prefix that parses must still satisfy the put invariants. */
            assert_int_equal(out.kind, WIRE_PUT);
            assert_non_null(attrs_get(&out.attrs, ATTR_SOP_INSTANCE_UID));
            wire_request_free(&out);
        } else {
            refused++;
            assert_true(err[0] != '\0');
        }
        free(copy);
    }
    assert_true(refused >= len - 2);
    free(buf);
    wire_request_free(&in);
}

static void test_random_buffers(void **state)
{
    (void)state;
    srand(12345);
    uint8_t buf[512];
    for (int iter = 0; iter < 20000; iter++) {
        size_t len = (size_t)(rand() % (int)sizeof buf);
        for (size_t i = 0; i < len; i++)
            buf[i] = (uint8_t)rand();
        wire_request_t req;
        wire_reply_t rep;
        char err[256];
        if (wire_decode_request(buf, len, &req, err, sizeof err) == 0)
            wire_request_free(&req);
        if (wire_decode_reply(buf, len, &rep, err, sizeof err) == 0)
            wire_reply_free(&rep);
    }
}

static int decode_put_after(void (*spoil)(wire_request_t *), char *err, size_t errlen)
{
    wire_request_t in, out;
    fill_put(&in);
    spoil(&in);
    uint8_t *buf;
    size_t len;
    wire_encode_request(&in, &buf, &len);
    int rc = wire_decode_request(buf, len, &out, err, errlen);
    if (rc == 0)
        wire_request_free(&out);
    free(buf);
    wire_request_free(&in);
    return rc;
}

static void bad_uid(wire_request_t *r)
{
    attrs_set(&r->attrs, ATTR_SOP_INSTANCE_UID, "1.02.x");
}
static void no_study(wire_request_t *r)
{
    attrs_set(&r->attrs, ATTR_STUDY_INSTANCE_UID, NULL);
}
static void big_partition(wire_request_t *r)
{
    r->partition = 70000;
}
static void long_value(wire_request_t *r)
{
    char *v = malloc(WIRE_MAX_VALUE + 2);
    memset(v, 'A', WIRE_MAX_VALUE + 1);
    v[WIRE_MAX_VALUE + 1] = '\0';
    attrs_take(&r->attrs, ATTR_STUDY_DESCRIPTION, v);
}
static void computed_attr(wire_request_t *r)
{
    attrs_set(&r->attrs, ATTR_NUM_STUDY_SERIES, "3");
}

static void test_semantic_validation(void **state)
{
    (void)state;
    char err[256];
    assert_int_equal(decode_put_after(bad_uid, err, sizeof err), SP_EPROTO);
    assert_non_null(strstr(err, "SOPInstanceUID"));
    assert_int_equal(decode_put_after(no_study, err, sizeof err), SP_EPROTO);
    assert_non_null(strstr(err, "StudyInstanceUID"));
    assert_int_equal(decode_put_after(big_partition, err, sizeof err), SP_EPROTO);
    assert_int_equal(decode_put_after(long_value, err, sizeof err), SP_EPROTO);
    assert_int_equal(decode_put_after(computed_attr, err, sizeof err), SP_EPROTO);
}

static void test_find_keys_validated(void **state)
{
    (void)state;
    wire_request_t in = {.kind = WIRE_FIND, .level = LEVEL_STUDY}, out;
    attrs_set(&in.attrs, ATTR_STUDY_DATE, "20260231-20250101");
    uint8_t *buf;
    size_t len;
    char err[256];
    wire_encode_request(&in, &buf, &len);
    assert_int_equal(wire_decode_request(buf, len, &out, err, sizeof err), SP_EPROTO);
    free(buf);
    attrs_set(&in.attrs, ATTR_STUDY_DATE, "20250101-20260101");
    attrs_set(&in.attrs, ATTR_PATIENT_NAME, "M*");
    attrs_set(&in.attrs, ATTR_NUM_STUDY_INSTANCES, "");
    wire_encode_request(&in, &buf, &len);
    assert_int_equal(wire_decode_request(buf, len, &out, err, sizeof err), 0);
    assert_string_equal(attrs_get(&out.attrs, ATTR_NUM_STUDY_INSTANCES), "");
    free(buf);
    wire_request_free(&out);
    wire_request_free(&in);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_put_round_trip),         cmocka_unit_test(test_find_reply_round_trip),
        cmocka_unit_test(test_list_and_error_replies), cmocka_unit_test(test_truncated_buffers),
        cmocka_unit_test(test_random_buffers),         cmocka_unit_test(test_semantic_validation),
        cmocka_unit_test(test_find_keys_validated),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
