/* test_wire.c - round trips of every message kind, and validated decoding
 * of truncated, random and semantically bad buffers. Gossip messages also
 * run through a simulated cluster (common/gossip.c) whose every message
 * crosses the wire, so the validation rules are checked against what the
 * membership protocol really sends. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "keys.h"
#include "wire.h"

#include <math.h>
#include <stdio.h>
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
    transport_response_t resp = {0};
    assert_int_equal(wire_encode_reply(&in, &resp.head, &resp.head_len), 0);
    assert_int_equal(wire_encode_find_body(&in, &resp.body, &resp.body_len), 0);
    char err[256];
    /* The head alone announces the matches but holds none. */
    assert_int_equal(wire_decode_reply(resp.head, resp.head_len, &out, err, sizeof err), 0);
    assert_int_equal(out.body_matches, 50);
    assert_int_equal(out.nmatches, 0);
    wire_reply_free(&out);
    assert_int_equal(wire_decode_response(&resp, &out, err, sizeof err), 0);
    assert_int_equal(out.nmatches, 50);
    assert_true(out.truncated);
    assert_string_equal(attrs_get(&out.matches[49], ATTR_MODALITIES_IN_STUDY), "CT\\MR");
    wire_reply_free(&out);
    /* A body holding fewer matches than the head says is refused. */
    in.nmatches = 49;
    transport_response_t short_body = {.head = resp.head, .head_len = resp.head_len};
    wire_encode_find_body(&in, &short_body.body, &short_body.body_len);
    in.nmatches = 50;
    assert_int_equal(wire_decode_response(&short_body, &out, err, sizeof err), SP_EPROTO);
    assert_non_null(strstr(err, "49"));
    free(short_body.body);
    /* No body at all, and a body that is not a message, are refused too. */
    transport_response_t no_body = {.head = resp.head, .head_len = resp.head_len};
    assert_int_equal(wire_decode_response(&no_body, &out, err, sizeof err), SP_EPROTO);
    uint8_t junk[] = {0xff, 0xff, 0xff};
    transport_response_t bad = {
        .head = resp.head, .head_len = resp.head_len, .body = junk, .body_len = sizeof junk};
    assert_int_equal(wire_decode_response(&bad, &out, err, sizeof err), SP_EPROTO);
    transport_response_free(&resp);
    wire_reply_free(&in);
}

/* A FIND reply of more matches than one frame holds: the head stays a few
 * bytes whatever the count, the body carries them all. */
static void test_find_reply_over_a_frame(void **state)
{
    (void)state;
    wire_reply_t in = {.kind = WIRE_FIND}, out;
    char sop[80];
    for (int i = 0; i < 20000; i++) {
        attrs_t *m = wire_reply_add_match(&in);
        snprintf(sop, sizeof sop, "%s.%d", SERIES, i + 1);
        attrs_set(m, ATTR_PATIENT_ID, "PID-0001");
        attrs_set(m, ATTR_STUDY_INSTANCE_UID, STUDY);
        attrs_set(m, ATTR_SERIES_INSTANCE_UID, SERIES);
        attrs_set(m, ATTR_SOP_INSTANCE_UID, sop);
    }
    transport_response_t resp = {0};
    assert_int_equal(wire_encode_reply(&in, &resp.head, &resp.head_len), 0);
    assert_int_equal(wire_encode_find_body(&in, &resp.body, &resp.body_len), 0);
    assert_true(resp.head_len < 64);
    assert_true(resp.body_len > (1u << 20) + 65536);
    char err[256];
    assert_int_equal(wire_decode_response(&resp, &out, err, sizeof err), 0);
    assert_int_equal(out.nmatches, 20000);
    snprintf(sop, sizeof sop, "%s.%d", SERIES, 20000);
    assert_string_equal(attrs_get(&out.matches[19999], ATTR_SOP_INSTANCE_UID), sop);
    wire_reply_free(&out);
    transport_response_free(&resp);
    wire_reply_free(&in);
}

/* LIST carries a cursor and a limit, its reply a next cursor; and
 * wire_instance_size() adds up to exactly the encoded reply (beyond the
 * cursor), which is what keeps a node's pages inside its byte budget. */
static void test_list_pages_round_trip(void **state)
{
    (void)state;
    wire_request_t rq = {.kind = WIRE_LIST,
                         .study_uid = STUDY,
                         .series_uid = SERIES,
                         .cursor = STUDY "/" SERIES "/" SOP,
                         .limit = 250},
                   rout;
    uint8_t *buf;
    size_t len;
    char err[256];
    assert_int_equal(wire_encode_request(&rq, &buf, &len), 0);
    assert_int_equal(wire_decode_request(buf, len, &rout, err, sizeof err), 0);
    assert_string_equal(rout.cursor, STUDY "/" SERIES "/" SOP);
    assert_int_equal(rout.limit, 250);
    assert_string_equal(rout.series_uid, SERIES);
    free(buf);
    wire_request_free(&rout);
    /* Without a cursor: from the start. */
    rq.cursor = NULL;
    rq.series_uid = NULL;
    wire_encode_request(&rq, &buf, &len);
    assert_int_equal(wire_decode_request(buf, len, &rout, err, sizeof err), 0);
    assert_null(rout.cursor);
    assert_null(rout.series_uid);
    free(buf);
    wire_request_free(&rout);
    /* A cursor longer than three UIDs is refused. */
    char *long_cursor = malloc(400);
    memset(long_cursor, '1', 399);
    long_cursor[399] = '\0';
    rq.cursor = long_cursor;
    wire_encode_request(&rq, &buf, &len);
    assert_int_equal(wire_decode_request(buf, len, &rout, err, sizeof err), SP_EPROTO);
    assert_non_null(strstr(err, "cursor"));
    free(buf);
    free(long_cursor);

    wire_reply_t in = {.kind = WIRE_LIST}, out;
    size_t sum = 0;
    char sop[80];
    for (int i = 0; i < 300; i++) {
        wire_instance_t *w = wire_reply_add_instance(&in);
        snprintf(sop, sizeof sop, "%s.%d", SERIES, i * 7919 + 1);
        w->partition = 4095;
        w->study_uid = strdup(STUDY);
        w->series_uid = strdup(SERIES);
        w->sop_uid = strdup(sop);
        w->sop_class_uid = strdup("1.2.840.10008.5.1.4.1.1.2");
        w->transfer_syntax_uid = strdup("1.2.840.10008.1.2.1");
        w->size = (uint64_t)i * 100000;
        w->version = i ? 1700000000000ull + (uint64_t)i : 0;
        w->policy = i ? WIRE_POLICY_REJECT : WIRE_POLICY_UNSET;
        sum += wire_instance_size(w);
    }
    wire_encode_reply(&in, &buf, &len);
    /* No cursor, status 0, no error: beyond the instances only the list's
     * own tag and length within the reply. */
    assert_true(len >= sum && len - sum <= 6);
    free(buf);
    in.next_cursor = strdup(STUDY "/" SERIES "/" SOP);
    wire_encode_reply(&in, &buf, &len);
    assert_int_equal(wire_decode_reply(buf, len, &out, err, sizeof err), 0);
    assert_int_equal(out.kind, WIRE_LIST);
    assert_int_equal(out.ninstances, 300);
    assert_string_equal(out.instances[299].sop_uid, sop);
    assert_string_equal(out.next_cursor, STUDY "/" SERIES "/" SOP);
    free(buf);
    wire_reply_free(&out);
    wire_reply_free(&in);
}

/* Builds a backslash-separated list of n distinct SOP Instance UIDs. */
static char *uid_list(int n)
{
    size_t cap = (size_t)n * 40 + 1, off = 0;
    char *v = malloc(cap);
    for (int i = 0; i < n; i++)
        off += (size_t)snprintf(v + off, cap - off, "%s%s.%d", i ? "\\" : "", SERIES, i + 1);
    return v;
}

/* A C-FIND UID key may list thousands of UIDs (up to WIRE_MAX_UID_LIST
 * bytes); other keys stay at WIRE_MAX_VALUE. The encoder refuses what the
 * decoder would, as SP_ETOOBIG, so a sender never mistakes it for nodes
 * refusing. */
static void test_find_uid_lists(void **state)
{
    (void)state;
    wire_request_t in = {.kind = WIRE_FIND, .level = LEVEL_IMAGE}, out;
    uint8_t *buf;
    size_t len;
    char err[256];
    char *list = uid_list(5000); /* about 170 KB */
    assert_true(strlen(list) > 100 * 1024 && strlen(list) <= WIRE_MAX_UID_LIST);
    attrs_take(&in.attrs, ATTR_SOP_INSTANCE_UID, list);
    attrs_set(&in.attrs, ATTR_STUDY_INSTANCE_UID, STUDY);
    assert_int_equal(wire_encode_request(&in, &buf, &len), 0);
    assert_int_equal(wire_decode_request(buf, len, &out, err, sizeof err), 0);
    assert_string_equal(attrs_get(&out.attrs, ATTR_SOP_INSTANCE_UID),
                        attrs_get(&in.attrs, ATTR_SOP_INSTANCE_UID));
    free(buf);
    wire_request_free(&out);
    /* Over the bound: refused by the encoder, nothing to free. */
    attrs_take(&in.attrs, ATTR_SOP_INSTANCE_UID, uid_list(8000));
    assert_true(strlen(attrs_get(&in.attrs, ATTR_SOP_INSTANCE_UID)) > WIRE_MAX_UID_LIST);
    buf = NULL;
    assert_int_equal(wire_encode_request(&in, &buf, &len), SP_ETOOBIG);
    assert_null(buf);
    /* A list is allowed only for UID keys: a long name key is refused. */
    attrs_set(&in.attrs, ATTR_SOP_INSTANCE_UID, SOP);
    char *name = malloc(WIRE_MAX_VALUE + 2);
    memset(name, 'A', WIRE_MAX_VALUE + 1);
    name[WIRE_MAX_VALUE + 1] = '\0';
    attrs_take(&in.attrs, ATTR_PATIENT_NAME, name);
    assert_int_equal(wire_encode_request(&in, &buf, &len), SP_ETOOBIG);
    /* A stored UID (a PUT's attrs) is still one value of at most
     * WIRE_MAX_VALUE bytes: the decoder refuses a list there. */
    wire_request_t put;
    fill_put(&put);
    attrs_take(&put.attrs, ATTR_SOP_CLASS_UID, uid_list(100));
    wire_encode_request(&put, &buf, &len);
    assert_int_equal(wire_decode_request(buf, len, &out, err, sizeof err), SP_EPROTO);
    assert_non_null(strstr(err, "SOPClassUID"));
    free(buf);
    wire_request_free(&put);
    wire_request_free(&in);
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

/* ---- gossip messages ----------------------------------------------------- */

#define NKEYS 8
static char test_keys[NKEYS][KEYS_Z85_LEN + 1];

/* Fresh CURVE public keys, made once per process. */
static const char *key(size_t i)
{
    if (test_keys[0][0] == '\0') {
        for (size_t k = 0; k < NKEYS; k++) {
            keys_pair_t kp;
            assert_int_equal(keys_generate(&kp), 0);
            assert_true(keys_z85_valid(kp.public_z85));
            memcpy(test_keys[k], kp.public_z85, sizeof test_keys[k]);
        }
    }
    return test_keys[i % NKEYS];
}

/* Member i: both roles, every state in turn (accuser only on SUSPECT),
 * distinct weights, incarnations near the top of the range. */
static void fill_member(gossip_member_t *m, size_t i)
{
    memset(m, 0, sizeof *m);
    snprintf(m->id, sizeof m->id, "node-%zu.a_b", i);
    snprintf(m->endpoint, sizeof m->endpoint, "tcp://10.1.%zu.%zu:%zu", i / 250, i % 250 + 1,
             7400 + i % 1000);
    snprintf(m->site, sizeof m->site, "site-%c", (char)('A' + i % 3));
    memcpy(m->public_key, key(i), sizeof m->public_key);
    m->role = i % 4 == 3 ? GOSSIP_ROUTER : GOSSIP_STORAGE;
    m->weight = m->role == GOSSIP_ROUTER ? (i % 8 == 3 ? 0.0 : 1.0) : 0.25 + (double)i * 0.5;
    m->incarnation = UINT64_MAX - i;
    m->state = (gossip_state_t)(i % GOSSIP_STATE_COUNT);
    if (m->state == GOSSIP_SUSPECT)
        snprintf(m->accuser, sizeof m->accuser, "node-%zu.a_b", i + 1);
}

/* A message of this kind carrying n member records; targets where the kind
 * allows them. */
static void fill_gossip(gossip_msg_t *g, gossip_kind_t kind, size_t n)
{
    memset(g, 0, sizeof *g);
    g->kind = kind;
    strcpy(g->from_id, "n1");
    strcpy(g->from_endpoint, "tcp://10.0.0.1:7401");
    if (kind != GOSSIP_SYNC_REQ) /* a join goes to a seed endpoint, id unknown */
        strcpy(g->to_id, "n2");
    strcpy(g->to_endpoint, "tcp://[fe80::1]:7402");
    g->seq = 0xfedcba9876543210ull + (uint64_t)kind;
    if (kind == GOSSIP_PING_REQ || kind == GOSSIP_ACK || kind == GOSSIP_NACK) {
        strcpy(g->target_id, "n3");
        strcpy(g->target_endpoint, "tcp://node-3.example.org:65535");
    }
    g->n_updates = n;
    g->updates = n ? calloc(n, sizeof *g->updates) : NULL;
    for (size_t i = 0; i < n; i++)
        fill_member(&g->updates[i], i);
}

static void assert_gossip_equal(const gossip_msg_t *a, const gossip_msg_t *b)
{
    assert_int_equal(a->kind, b->kind);
    assert_string_equal(a->from_id, b->from_id);
    assert_string_equal(a->from_endpoint, b->from_endpoint);
    assert_string_equal(a->to_id, b->to_id);
    assert_string_equal(a->to_endpoint, b->to_endpoint);
    assert_true(a->seq == b->seq);
    assert_string_equal(a->target_id, b->target_id);
    assert_string_equal(a->target_endpoint, b->target_endpoint);
    assert_int_equal(a->n_updates, b->n_updates);
    for (size_t i = 0; i < a->n_updates; i++) {
        const gossip_member_t *x = &a->updates[i], *y = &b->updates[i];
        assert_string_equal(x->id, y->id);
        assert_string_equal(x->endpoint, y->endpoint);
        assert_string_equal(x->site, y->site);
        assert_string_equal(x->public_key, y->public_key);
        assert_int_equal(x->role, y->role);
        assert_true(x->weight == y->weight);
        assert_true(x->incarnation == y->incarnation);
        assert_int_equal(x->state, y->state);
        assert_string_equal(x->accuser, y->accuser);
    }
}

/* Encodes g (borrowed) as a gossip request and decodes it into *out. */
static int gossip_request_trip(const gossip_msg_t *g, wire_request_t *out, char *err, size_t errlen,
                               size_t *enc_len)
{
    wire_request_t in = {.kind = WIRE_GOSSIP, .gossip = *g};
    uint8_t *buf;
    size_t len;
    assert_int_equal(wire_encode_request(&in, &buf, &len), 0);
    if (enc_len)
        *enc_len = len;
    err[0] = '\0';
    int rc = wire_decode_request(buf, len, out, err, errlen);
    free(buf);
    return rc;
}

static void test_gossip_round_trip(void **state)
{
    (void)state;
    char err[256];
    for (int k = GOSSIP_PING; k <= GOSSIP_SYNC; k++) {
        gossip_msg_t g;
        fill_gossip(&g, (gossip_kind_t)k, k == GOSSIP_SYNC ? 23 : 7);
        wire_request_t out;
        assert_int_equal(gossip_request_trip(&g, &out, err, sizeof err, NULL), 0);
        assert_int_equal(out.kind, WIRE_GOSSIP);
        assert_gossip_equal(&g, &out.gossip);
        wire_request_free(&out);
        assert_null(out.gossip.updates);

        /* The same message as the direct answer in a reply. */
        wire_reply_t rin = {.kind = WIRE_GOSSIP, .gossip = g}, rout;
        uint8_t *buf;
        size_t len;
        assert_int_equal(wire_encode_reply(&rin, &buf, &len), 0);
        assert_int_equal(wire_decode_reply(buf, len, &rout, err, sizeof err), 0);
        assert_int_equal(rout.kind, WIRE_GOSSIP);
        assert_gossip_equal(&g, &rout.gossip);
        free(buf);
        wire_reply_free(&rout);
        wire_reply_free(&rin); /* owns g.updates now; frees them once */
    }

    /* No members at all, and seq 0. */
    gossip_msg_t g;
    fill_gossip(&g, GOSSIP_PING, 0);
    g.seq = 0;
    wire_request_t out;
    assert_int_equal(gossip_request_trip(&g, &out, err, sizeof err, NULL), 0);
    assert_gossip_equal(&g, &out.gossip);
    assert_null(out.gossip.updates);
    wire_request_free(&out);

    /* A reply with no direct answer: kind WIRE_GOSSIP, zeroed message. */
    wire_reply_t rin = {.kind = WIRE_GOSSIP}, rout;
    uint8_t *buf;
    size_t len;
    assert_int_equal(wire_encode_reply(&rin, &buf, &len), 0);
    assert_int_equal(wire_decode_reply(buf, len, &rout, err, sizeof err), 0);
    assert_int_equal(rout.kind, WIRE_GOSSIP);
    assert_int_equal(rout.gossip.kind, 0);
    assert_int_equal(rout.gossip.n_updates, 0);
    assert_null(rout.gossip.updates);
    free(buf);
    wire_reply_free(&rout);
    assert_string_equal(wire_kind_name(WIRE_GOSSIP), "gossip");
}

/* The message the validation cases spoil: a PING_REQ (so targets are set)
 * with a storage member, a router of weight 0 and a suspect. */
static void fill_valid(gossip_msg_t *g)
{
    fill_gossip(g, GOSSIP_PING_REQ, 3);
    g->updates[1].role = GOSSIP_ROUTER;
    g->updates[1].weight = 0;
    g->updates[1].state = GOSSIP_ALIVE;
    g->updates[1].accuser[0] = '\0';
    g->updates[2].state = GOSSIP_SUSPECT;
    strcpy(g->updates[2].accuser, "n1");
}

/* The string field named like "from_id" or "members[2].site". */
static char *field_of(gossip_msg_t *g, const char *name)
{
    if (strncmp(name, "members[", 8) == 0) {
        gossip_member_t *m = &g->updates[name[8] - '0'];
        const char *f = name + 11;
        return strcmp(f, "id") == 0           ? m->id
               : strcmp(f, "endpoint") == 0   ? m->endpoint
               : strcmp(f, "site") == 0       ? m->site
               : strcmp(f, "public_key") == 0 ? m->public_key
                                              : m->accuser;
    }
    return strcmp(name, "from_id") == 0         ? g->from_id
           : strcmp(name, "from_endpoint") == 0 ? g->from_endpoint
           : strcmp(name, "to_id") == 0         ? g->to_id
           : strcmp(name, "to_endpoint") == 0   ? g->to_endpoint
           : strcmp(name, "target_id") == 0     ? g->target_id
                                                : g->target_endpoint;
}

/* Decodes the valid message with one string field replaced; expects
 * SP_EPROTO naming the field, or success when expect is NULL. */
static void expect_string_case(const char *field, const char *value, const char *expect)
{
    gossip_msg_t g;
    fill_valid(&g);
    strcpy(field_of(&g, field), value);
    wire_request_t out;
    char err[256];
    int rc = gossip_request_trip(&g, &out, err, sizeof err, NULL);
    if (expect == NULL) {
        if (rc != 0)
            fail_msg("%s = '%s' refused: %s", field, value, err);
        wire_request_free(&out);
    } else {
        if (rc != SP_EPROTO || strstr(err, expect) == NULL)
            fail_msg("%s = '%s': rc %d, err '%s' (expected mention of %s)", field, value, rc, err,
                     expect);
        assert_int_equal(out.kind, WIRE_NONE); /* nothing left to free */
        assert_null(out.gossip.updates);
    }
    gossip_msg_clear(&g);
}

typedef void (*gossip_spoil_fn)(gossip_msg_t *g);
static void kind_zero(gossip_msg_t *g)
{
    g->kind = 0;
}
static void kind_seven(gossip_msg_t *g)
{
    g->kind = (gossip_kind_t)7;
}
static void target_on_ping(gossip_msg_t *g)
{
    g->kind = GOSSIP_PING;
}
static void target_endpoint_on_sync(gossip_msg_t *g)
{
    g->kind = GOSSIP_SYNC;
    g->target_id[0] = '\0';
}
static void role_two(gossip_msg_t *g)
{
    g->updates[0].role = (gossip_role_t)2;
}
static void role_negative(gossip_msg_t *g)
{
    g->updates[0].role = (gossip_role_t)-1;
}
static void state_seven(gossip_msg_t *g)
{
    g->updates[0].state = (gossip_state_t)GOSSIP_STATE_COUNT;
}
static void weight_nan(gossip_msg_t *g)
{
    g->updates[0].weight = NAN;
}
static void weight_inf(gossip_msg_t *g)
{
    g->updates[1].weight = INFINITY;
}
static void weight_zero_storage(gossip_msg_t *g)
{
    g->updates[0].weight = 0;
}
static void weight_negative_storage(gossip_msg_t *g)
{
    g->updates[2].weight = -1;
}
static void weight_negative_router(gossip_msg_t *g)
{
    g->updates[1].weight = -0.5;
}
static void accuser_on_alive(gossip_msg_t *g)
{
    strcpy(g->updates[0].accuser, "n1");
}
static void too_many_members(gossip_msg_t *g)
{
    gossip_msg_clear(g);
    fill_gossip(g, GOSSIP_SYNC, GOSSIP_MAX_MEMBERS + 1);
}

static void test_gossip_validation(void **state)
{
    (void)state;
    static const struct {
        const char *field, *value, *expect;
    } strings[] = {
        {"from_id", "", "from_id is missing"},
        {"from_id", "n 1", "from_id"},
        {"from_id", "n/1", "from_id"},
        {"from_id", "n\x01", "from_id"},
        {"from_endpoint", "", "from_endpoint is missing"},
        {"from_endpoint", "udp://10.0.0.1:7401", "from_endpoint"},
        {"from_endpoint", "tcp://10.0.0.1", "from_endpoint"},
        {"from_endpoint", "tcp://10.0.0.1:", "from_endpoint"},
        {"from_endpoint", "tcp://10.0.0.1:0", "from_endpoint"},
        {"from_endpoint", "tcp://10.0.0.1:65536", "from_endpoint"},
        {"from_endpoint", "tcp://10.0.0.1:123456", "from_endpoint"},
        {"from_endpoint", "tcp://10.0.0.1:74x1", "from_endpoint"},
        {"from_endpoint", "tcp://*:7401", "from_endpoint"},
        {"from_endpoint", "tcp://:7401", "from_endpoint"},
        {"from_endpoint", "tcp://[]:7401", "from_endpoint"},
        {"from_endpoint", "tcp://[::1:7401", "from_endpoint"},
        {"from_endpoint", "tcp://h_st:7401", "from_endpoint"},
        {"from_endpoint", "tcp://a:1:2", "from_endpoint"},
        {"to_id", "n 2", "to_id"},
        {"to_endpoint", "", "to_endpoint is missing"},
        {"to_endpoint", "tcp://x y:1", "to_endpoint"},
        {"target_id", "", "target_id is missing"},
        {"target_id", "n3!", "target_id"},
        {"target_endpoint", "", "target_endpoint is missing"},
        {"target_endpoint", "tcp://n3", "target_endpoint"},
        {"members[0].id", "", "members[0].id is missing"},
        {"members[1].id", "a b", "members[1].id"},
        {"members[2].endpoint", "", "members[2].endpoint is missing"},
        {"members[2].endpoint", "tcp://n3:99999", "members[2].endpoint"},
        {"members[0].site", "", "members[0].site is missing"},
        {"members[0].site", "site A", "members[0].site"},
        {"members[1].public_key", "", "members[1].public_key is missing"},
        {"members[1].public_key", "abc", "members[1].public_key"},
        {"members[1].public_key", "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf ",
         "members[1].public_key"},
        {"members[1].public_key", "########################################",
         "members[1].public_key"},
        {"members[2].accuser", "", "members[2].accuser is missing"},
        {"members[2].accuser", "n 1", "members[2].accuser"},
        /* Accepted forms, so the rules are not stricter than meant. */
        {"from_endpoint", "tcp://[::ffff:10.0.0.1]:1", NULL},
        {"from_endpoint", "tcp://db-1.site-a.example:65535", NULL},
        {"to_id", "", NULL},
        {"members[0].id", "A.b_c-9", NULL},
        {"members[0].site", "eu-west/1#b", NULL},
        {"members[1].public_key", "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7", NULL},
    };
    for (size_t i = 0; i < SP_ARRAY_LEN(strings); i++)
        expect_string_case(strings[i].field, strings[i].value, strings[i].expect);

    static const struct {
        gossip_spoil_fn spoil;
        const char *expect;
    } others[] = {
        {kind_zero, "kind"},
        {kind_seven, "kind"},
        {target_on_ping, "target_id"},
        {target_endpoint_on_sync, "target_endpoint"},
        {role_two, "members[0].role"},
        {role_negative, "members[0].role"},
        {state_seven, "members[0].state"},
        {weight_nan, "members[0].weight"},
        {weight_inf, "members[1].weight"},
        {weight_zero_storage, "members[0].weight"},
        {weight_negative_storage, "members[2].weight"},
        {weight_negative_router, "members[1].weight"},
        {accuser_on_alive, "members[0].accuser"},
        {too_many_members, "members"},
    };
    for (size_t i = 0; i < SP_ARRAY_LEN(others); i++) {
        gossip_msg_t g;
        fill_valid(&g);
        others[i].spoil(&g);
        wire_request_t out;
        char err[256];
        int rc = gossip_request_trip(&g, &out, err, sizeof err, NULL);
        if (rc != SP_EPROTO || strstr(err, others[i].expect) == NULL)
            fail_msg("case %zu: rc %d, err '%s' (expected mention of %s)", i, rc, err,
                     others[i].expect);
        assert_null(out.gossip.updates);
        gossip_msg_clear(&g);
    }

    /* The valid message itself passes, and so do its replies' forms. */
    gossip_msg_t g;
    fill_valid(&g);
    wire_request_t out;
    char err[256];
    assert_int_equal(gossip_request_trip(&g, &out, err, sizeof err, NULL), 0);
    assert_gossip_equal(&g, &out.gossip);
    wire_request_free(&out);
    gossip_msg_clear(&g);
}

/* A hand-written protobuf encoder, so a test can send what the C structs
 * cannot hold (strings longer than their arrays), as a foreign peer could. */
typedef struct {
    uint8_t b[2048];
    size_t n;
} pb_t;

static void pb_varint(pb_t *p, uint64_t v)
{
    do {
        uint8_t c = v & 0x7f;
        v >>= 7;
        p->b[p->n++] = (uint8_t)(c | (v ? 0x80 : 0));
    } while (v);
}
static void pb_bytes(pb_t *p, unsigned field, const void *data, size_t len)
{
    pb_varint(p, field << 3 | 2);
    pb_varint(p, len);
    memcpy(p->b + p->n, data, len);
    p->n += len;
}
static void pb_str(pb_t *p, unsigned field, const char *s)
{
    pb_bytes(p, field, s, strlen(s));
}
static void pb_uint(pb_t *p, unsigned field, uint64_t v)
{
    pb_varint(p, field << 3);
    pb_varint(p, v);
}

/* Request{gossip(8): GossipMessage{kind PING, from_id, from_endpoint,
 * to_endpoint, members: [{id, endpoint, site, key, weight 1.5,
 * incarnation 9}]}}, decoded. */
static int decode_crafted(const char *from_id, const char *from_ep, const char *m_id,
                          const char *m_site, wire_request_t *out, char *err, size_t errlen)
{
    pb_t member = {0}, msg = {0}, req = {0};
    pb_str(&member, 1, m_id);
    pb_str(&member, 2, "tcp://10.0.0.9:7409");
    pb_str(&member, 3, m_site);
    pb_str(&member, 4, key(0));
    double w = 1.5;
    pb_varint(&member, 6 << 3 | 1);
    memcpy(member.b + member.n, &w, 8); /* little-endian hosts only, like protobuf-c */
    member.n += 8;
    pb_uint(&member, 7, 9);
    pb_uint(&msg, 1, GOSSIP_PING);
    pb_str(&msg, 2, from_id);
    pb_str(&msg, 3, from_ep);
    pb_str(&msg, 5, "tcp://10.0.0.2:7402");
    pb_uint(&msg, 6, 77);
    pb_bytes(&msg, 9, member.b, member.n);
    pb_bytes(&req, 8, msg.b, msg.n);
    err[0] = '\0';
    return wire_decode_request(req.b, req.n, out, err, errlen);
}

static void test_gossip_foreign_lengths(void **state)
{
    (void)state;
    char id63[64], id64[65], site64[65], ep127[128], ep128[129], err[256];
    memset(id63, 'i', 63);
    id63[63] = '\0';
    memset(id64, 'i', 64);
    id64[64] = '\0';
    memset(site64, 's', 64);
    site64[64] = '\0';
    /* "tcp://" + host + ":7400" of exactly 127 and 128 characters */
    memcpy(ep127, "tcp://", 6);
    memset(ep127 + 6, 'h', 127 - 6 - 5);
    memcpy(ep127 + 127 - 5, ":7400", 6);
    memcpy(ep128, "tcp://", 6);
    memset(ep128 + 6, 'h', 128 - 6 - 5);
    memcpy(ep128 + 128 - 5, ":7400", 6);

    wire_request_t out;
    /* The hand encoding matches the .proto's field numbers. */
    assert_int_equal(decode_crafted(id63, ep127, id63, "A", &out, err, sizeof err), 0);
    assert_int_equal(out.kind, WIRE_GOSSIP);
    assert_int_equal(out.gossip.kind, GOSSIP_PING);
    assert_string_equal(out.gossip.from_id, id63);
    assert_string_equal(out.gossip.from_endpoint, ep127);
    assert_true(out.gossip.seq == 77);
    assert_int_equal(out.gossip.n_updates, 1);
    assert_true(out.gossip.updates[0].weight == 1.5);
    assert_true(out.gossip.updates[0].incarnation == 9);
    assert_string_equal(out.gossip.updates[0].public_key, key(0));
    wire_request_free(&out);

    assert_int_equal(decode_crafted(id64, ep127, "m", "A", &out, err, sizeof err), SP_EPROTO);
    assert_non_null(strstr(err, "from_id"));
    assert_int_equal(decode_crafted("n1", ep128, "m", "A", &out, err, sizeof err), SP_EPROTO);
    assert_non_null(strstr(err, "from_endpoint"));
    assert_int_equal(decode_crafted("n1", ep127, id64, "A", &out, err, sizeof err), SP_EPROTO);
    assert_non_null(strstr(err, "members[0].id"));
    assert_int_equal(decode_crafted("n1", ep127, "m", site64, &out, err, sizeof err), SP_EPROTO);
    assert_non_null(strstr(err, "members[0].site"));
    assert_null(out.gossip.updates);
}

/* The transport's default frame limit (transport.h: chunk_bytes + 64 KiB). */
#define DEFAULT_FRAME (1024 * 1024 + 64 * 1024)

static void test_gossip_max_members(void **state)
{
    (void)state;
    char err[256];
    size_t len;
    wire_request_t out;

    /* Typical names: a full SYNC at the cap round-trips and fits a frame. */
    gossip_msg_t g;
    fill_gossip(&g, GOSSIP_SYNC, GOSSIP_MAX_MEMBERS);
    assert_int_equal(gossip_request_trip(&g, &out, err, sizeof err, &len), 0);
    assert_gossip_equal(&g, &out.gossip);
    print_message("SYNC of %d typical members: %zu bytes\n", GOSSIP_MAX_MEMBERS, len);
    assert_true(len < DEFAULT_FRAME);
    wire_request_free(&out);

    /* Every string at its maximum: still valid for the wire, but over the
     * default frame limit, as proto/shardpacs.proto documents. */
    for (size_t i = 0; i < g.n_updates; i++) {
        gossip_member_t *m = &g.updates[i];
        memset(m->id, 'i', GOSSIP_ID_MAX - 1);
        for (size_t d = 0, v = i; d < 5; d++, v /= 10) /* unique: last 5 digits = i */
            m->id[GOSSIP_ID_MAX - 2 - d] = (char)('0' + v % 10);
        memset(m->endpoint, 'h', GOSSIP_ENDPOINT_MAX - 1);
        memcpy(m->endpoint, "tcp://", 6);
        memcpy(m->endpoint + GOSSIP_ENDPOINT_MAX - 6, ":7400", 6);
        memset(m->site, 's', GOSSIP_SITE_MAX - 1);
        m->state = GOSSIP_SUSPECT;
        memset(m->accuser, 'a', GOSSIP_ID_MAX - 1);
    }
    assert_int_equal(gossip_request_trip(&g, &out, err, sizeof err, &len), 0);
    assert_gossip_equal(&g, &out.gossip);
    print_message("SYNC of %d maximal members: %zu bytes\n", GOSSIP_MAX_MEMBERS, len);
    assert_true(len > DEFAULT_FRAME && len < 1700 * 1000);
    wire_request_free(&out);
    gossip_msg_clear(&g);

    /* One over the cap is refused. */
    fill_gossip(&g, GOSSIP_SYNC, GOSSIP_MAX_MEMBERS + 1);
    assert_int_equal(gossip_request_trip(&g, &out, err, sizeof err, NULL), SP_EPROTO);
    assert_non_null(strstr(err, "members"));
    gossip_msg_clear(&g);
}

/* Four gossip members whose every message crosses the wire (ACK and SYNC as
 * replies, the rest as requests), then one of them dies: whatever the
 * protocol sends while joining, probing, suspecting and marking down must
 * pass validation and arrive unchanged. */
#define SIM_N 4
static void test_gossip_cluster_over_wire(void **state)
{
    (void)state;
    gossip_t *g[SIM_N];
    char ids[SIM_N][8], eps[SIM_N][32];
    int64_t now = 1000;
    for (size_t i = 0; i < SIM_N; i++) {
        snprintf(ids[i], sizeof ids[i], "n%zu", i + 1);
        snprintf(eps[i], sizeof eps[i], "tcp://127.0.0.1:%zu", 7401 + i);
        const char *seeds[] = {eps[0]};
        gossip_config_t c;
        gossip_config_defaults(&c);
        c.id = ids[i];
        c.endpoint = eps[i];
        c.site = i % 2 ? "B" : "A";
        c.public_key = key(i);
        c.role = i == 3 ? GOSSIP_ROUTER : GOSSIP_STORAGE;
        c.seeds = seeds;
        c.n_seeds = 1;
        c.seed = 42 + i;
        c.probe_interval_ms = 200;
        c.probe_timeout_ms = 60;
        c.sync_interval_ms = 1000;
        c.down_to_out_ms = 3000;
        g[i] = gossip_new(&c, now);
        assert_non_null(g[i]);
    }
    size_t dead = 2, sent = 0, suspect_records = 0, kinds[GOSSIP_SYNC + 1] = {0};
    for (int step = 0; step < 2000; step++, now += 10) {
        bool killed = step >= 500;
        for (size_t i = 0; i < SIM_N; i++) {
            if (killed && i == dead)
                continue;
            gossip_tick(g[i], now);
            gossip_msg_t m;
            while (gossip_poll(g[i], &m)) {
                uint8_t *buf;
                size_t len;
                char err[256] = "";
                gossip_msg_t got;
                int rc;
                if (m.kind == GOSSIP_ACK || m.kind == GOSSIP_SYNC) {
                    wire_reply_t rin = {.kind = WIRE_GOSSIP, .gossip = m}, rout;
                    assert_int_equal(wire_encode_reply(&rin, &buf, &len), 0);
                    rc = wire_decode_reply(buf, len, &rout, err, sizeof err);
                    got = rout.gossip; /* take ownership of the updates */
                } else {
                    wire_request_t rin = {.kind = WIRE_GOSSIP, .gossip = m}, rout;
                    assert_int_equal(wire_encode_request(&rin, &buf, &len), 0);
                    rc = wire_decode_request(buf, len, &rout, err, sizeof err);
                    got = rout.gossip;
                }
                free(buf);
                if (rc != 0)
                    fail_msg("kind %d from %s refused: %s", (int)m.kind, m.from_id, err);
                assert_gossip_equal(&m, &got);
                sent++;
                kinds[m.kind]++;
                for (size_t u = 0; u < got.n_updates; u++)
                    suspect_records += got.updates[u].state == GOSSIP_SUSPECT;
                long dst = -1;
                for (size_t j = 0; j < SIM_N; j++)
                    if (strcmp(eps[j], got.to_endpoint) == 0)
                        dst = (long)j;
                assert_true(dst >= 0);
                if (!(killed && (size_t)dst == dead))
                    assert_int_equal(gossip_receive(g[dst], now, &got), 0);
                gossip_msg_clear(&got);
                gossip_msg_clear(&m);
            }
        }
        if (step == 499) /* all joined and alive before the death */
            for (size_t i = 0; i < SIM_N; i++) {
                assert_int_equal(gossip_count(g[i]), SIM_N);
                gossip_member_t who;
                for (size_t j = 0; j < SIM_N; j++) {
                    assert_int_equal(gossip_lookup(g[i], ids[j], &who), 0);
                    assert_int_equal(who.state, GOSSIP_ALIVE);
                }
            }
    }
    print_message("%zu gossip messages crossed the wire, %zu suspect records\n", sent,
                  suspect_records);
    for (int k = GOSSIP_PING; k <= GOSSIP_SYNC; k++)
        if (kinds[k] == 0 && k != GOSSIP_NACK)
            fail_msg("no message of kind %d was exercised", k);
    assert_true(suspect_records > 0);
    for (size_t i = 0; i < SIM_N; i++) {
        if (i == dead)
            continue;
        gossip_member_t who;
        assert_int_equal(gossip_lookup(g[i], ids[dead], &who), 0);
        assert_true(who.state == GOSSIP_DOWN || who.state == GOSSIP_OUT);
    }
    for (size_t i = 0; i < SIM_N; i++)
        gossip_destroy(&g[i]);
}

/* Every prefix of a gossip request and of a gossip reply is refused or
 * decodes to a valid message (the existing put loop, for gossip). */
static void test_gossip_truncated_buffers(void **state)
{
    (void)state;
    gossip_msg_t g;
    fill_gossip(&g, GOSSIP_SYNC, 5);
    for (int as_reply = 0; as_reply <= 1; as_reply++) {
        uint8_t *buf;
        size_t len;
        if (as_reply) {
            wire_reply_t rin = {.kind = WIRE_GOSSIP, .gossip = g};
            wire_encode_reply(&rin, &buf, &len);
        } else {
            wire_request_t rin = {.kind = WIRE_GOSSIP, .gossip = g};
            wire_encode_request(&rin, &buf, &len);
        }
        size_t refused = 0;
        for (size_t cut = 0; cut < len; cut++) {
            uint8_t *copy = malloc(cut ? cut : 1);
            memcpy(copy, buf, cut);
            char err[256] = "";
            wire_request_t req;
            wire_reply_t rep;
            int rc = as_reply ? wire_decode_reply(copy, cut, &rep, err, sizeof err)
                              : wire_decode_request(copy, cut, &req, err, sizeof err);
            if (rc == 0) {
                const gossip_msg_t *m = as_reply ? &rep.gossip : &req.gossip;
                assert_int_equal(as_reply ? rep.kind : req.kind, WIRE_GOSSIP);
                assert_true(m->kind >= GOSSIP_PING && m->kind <= GOSSIP_SYNC);
                assert_true(m->n_updates <= g.n_updates);
                for (size_t i = 0; i < m->n_updates; i++)
                    assert_true(keys_z85_valid(m->updates[i].public_key));
                if (as_reply)
                    wire_reply_free(&rep);
                else
                    wire_request_free(&req);
            } else {
                refused++;
                assert_true(err[0] != '\0');
            }
            free(copy);
        }
        assert_true(refused >= len - 2);
        free(buf);
    }
    gossip_msg_clear(&g);
}

/* Random byte changes to valid gossip encodings (the random-buffer loop,
 * aimed where plain random bytes rarely reach): anything that still decodes
 * must satisfy the rules, and nothing leaks or reads out of bounds. */
static void test_gossip_mutated_buffers(void **state)
{
    (void)state;
    srand(54321);
    size_t accepted = 0, total = 0;
    for (int k = GOSSIP_PING; k <= GOSSIP_SYNC; k++) {
        gossip_msg_t g;
        fill_gossip(&g, (gossip_kind_t)k, 4);
        wire_request_t rin = {.kind = WIRE_GOSSIP, .gossip = g};
        uint8_t *buf;
        size_t len;
        wire_encode_request(&rin, &buf, &len);
        uint8_t *copy = malloc(len);
        for (int iter = 0; iter < 4000; iter++, total++) {
            memcpy(copy, buf, len);
            int flips = 1 + rand() % 4;
            for (int f = 0; f < flips; f++)
                copy[(size_t)rand() % len] = (uint8_t)rand();
            wire_request_t req;
            wire_reply_t rep;
            char err[256];
            if (wire_decode_request(copy, len, &req, err, sizeof err) == 0) {
                accepted++;
                if (req.kind == WIRE_GOSSIP) {
                    const gossip_msg_t *m = &req.gossip;
                    assert_true(m->kind >= GOSSIP_PING && m->kind <= GOSSIP_SYNC);
                    assert_true(m->from_id[0] != '\0' && m->to_endpoint[0] != '\0');
                    assert_true(m->n_updates <= GOSSIP_MAX_MEMBERS);
                    for (size_t i = 0; i < m->n_updates; i++) {
                        const gossip_member_t *u = &m->updates[i];
                        assert_true(keys_z85_valid(u->public_key));
                        assert_true((unsigned)u->state < GOSSIP_STATE_COUNT);
                        assert_true(u->role == GOSSIP_STORAGE || u->role == GOSSIP_ROUTER);
                        assert_true(isfinite(u->weight) && u->weight >= 0);
                        assert_true((u->state == GOSSIP_SUSPECT) == (u->accuser[0] != '\0'));
                    }
                }
                wire_request_free(&req);
            }
            if (wire_decode_reply(copy, len, &rep, err, sizeof err) == 0)
                wire_reply_free(&rep);
        }
        free(copy);
        free(buf);
        gossip_msg_clear(&g);
    }
    print_message("%zu of %zu mutated gossip requests still valid\n", accepted, total);
    assert_true(accepted < total);
}

/* Status and drain: admin messages survive a round trip with every field,
 * and a member record in a status reply is validated like a gossip one. */
static void test_status_and_drain_round_trip(void **state)
{
    (void)state;
    wire_request_t req = {.kind = WIRE_STATUS, .cluster = true}, back;
    uint8_t *buf = NULL;
    size_t len = 0;
    char err[256];
    assert_int_equal(wire_encode_request(&req, &buf, &len), 0);
    assert_int_equal(wire_decode_request(buf, len, &back, err, sizeof err), 0);
    assert_int_equal(back.kind, WIRE_STATUS);
    assert_true(back.cluster);
    wire_request_free(&back);
    free(buf);

    req = (wire_request_t){.kind = WIRE_DRAIN, .node_id = "n4"};
    assert_int_equal(wire_encode_request(&req, &buf, &len), 0);
    assert_int_equal(wire_decode_request(buf, len, &back, err, sizeof err), 0);
    assert_string_equal(back.node_id, "n4");
    wire_request_free(&back);
    free(buf);
    req.node_id = "n 4"; /* not a member id */
    assert_int_equal(wire_encode_request(&req, &buf, &len), 0);
    assert_int_equal(wire_decode_request(buf, len, &back, err, sizeof err), SP_EPROTO);
    free(buf);

    req = (wire_request_t){.kind = WIRE_PARTITION_DIGEST, .nonempty = true};
    assert_int_equal(wire_encode_request(&req, &buf, &len), 0);
    assert_int_equal(wire_decode_request(buf, len, &back, err, sizeof err), 0);
    assert_true(back.nonempty);
    assert_int_equal(back.npartitions, 0);
    wire_request_free(&back);
    free(buf);

    wire_reply_t rep = {.kind = WIRE_STATUS}, rback;
    rep.status_body.from_id = sp_strdup("node-0.a_b");
    rep.status_body.replicas = 3;
    rep.status_body.view_version = 77;
    rep.status_body.under_replicated_partitions = 12;
    rep.status_body.partitions_with_data = 4000;
    for (size_t i = 0; i < 5; i++) {
        wire_member_status_t *m = wire_reply_add_member(&rep);
        fill_member(&m->member, i);
        m->reachable = i % 2 == 0;
        m->partitions_owned = (uint32_t)(100 + i);
        m->partitions_held = (uint32_t)(200 + i);
        m->instances = 1000 + i;
        m->bytes = 1ULL << (30 + i);
        m->disk_bytes = 3 + i;
        m->hints_pending = 4 + i;
        m->repair_bytes_done = 5 + i;
        m->repair_bytes_pending = 6 + i;
        m->repair_rate = 1.5 * (double)i;
        m->scrub_checked = 7 + i;
        m->scrub_corrupt = 8 + i;
        m->repaired = 9 + i;
    }
    assert_int_equal(wire_encode_reply(&rep, &buf, &len), 0);
    assert_int_equal(wire_decode_reply(buf, len, &rback, err, sizeof err), 0);
    free(buf);
    assert_int_equal(rback.kind, WIRE_STATUS);
    assert_string_equal(rback.status_body.from_id, "node-0.a_b");
    assert_int_equal(rback.status_body.replicas, 3);
    assert_int_equal(rback.status_body.view_version, 77);
    assert_int_equal(rback.status_body.under_replicated_partitions, 12);
    assert_int_equal(rback.status_body.partitions_with_data, 4000);
    assert_int_equal(rback.status_body.nmembers, 5);
    for (size_t i = 0; i < 5; i++) {
        const wire_member_status_t *a = &rep.status_body.members[i];
        const wire_member_status_t *b = &rback.status_body.members[i];
        assert_string_equal(a->member.id, b->member.id);
        assert_string_equal(a->member.endpoint, b->member.endpoint);
        assert_int_equal(a->member.state, b->member.state);
        assert_int_equal(a->reachable, b->reachable);
        assert_int_equal(a->partitions_owned, b->partitions_owned);
        assert_int_equal(a->partitions_held, b->partitions_held);
        assert_int_equal(a->instances, b->instances);
        assert_int_equal(a->bytes, b->bytes);
        assert_int_equal(a->disk_bytes, b->disk_bytes);
        assert_int_equal(a->hints_pending, b->hints_pending);
        assert_int_equal(a->repair_bytes_done, b->repair_bytes_done);
        assert_int_equal(a->repair_bytes_pending, b->repair_bytes_pending);
        assert_true(a->repair_rate == b->repair_rate);
        assert_int_equal(a->scrub_checked, b->scrub_checked);
        assert_int_equal(a->scrub_corrupt, b->scrub_corrupt);
        assert_int_equal(a->repaired, b->repaired);
    }
    wire_reply_free(&rback);

    /* A member record breaking the gossip rules is refused. */
    sp_strlcpy(rep.status_body.members[2].member.endpoint, "tcp://*:1",
               sizeof rep.status_body.members[2].member.endpoint);
    assert_int_equal(wire_encode_reply(&rep, &buf, &len), 0);
    assert_int_equal(wire_decode_reply(buf, len, &rback, err, sizeof err), SP_EPROTO);
    assert_non_null(strstr(err, "members[2].endpoint"));
    free(buf);
    rep.status_body.members[2].repair_rate = -1;
    wire_reply_free(&rep);
}

/* A put's version and duplicate policy, a get reply's and a listing's
 * stored version, the new outcomes and conflicts_refused survive a round
 * trip; version and policy are refused apart, out of range or unknown. */
static void test_versions_round_trip(void **state)
{
    (void)state;
    char err[256];
    uint8_t *buf;
    size_t len;
    wire_request_t in, out;
    fill_put(&in);
    in.version = 1765000000123ull;
    in.policy = WIRE_POLICY_KEEP_NEWEST;
    assert_int_equal(wire_encode_request(&in, &buf, &len), 0);
    assert_int_equal(wire_decode_request(buf, len, &out, err, sizeof err), 0);
    assert_int_equal(out.version, 1765000000123ull);
    assert_int_equal(out.policy, WIRE_POLICY_KEEP_NEWEST);
    free(buf);
    wire_request_free(&out);
    /* A put without them (repair, an older router) stays valid. */
    in.version = 0;
    in.policy = WIRE_POLICY_UNSET;
    assert_int_equal(wire_encode_request(&in, &buf, &len), 0);
    assert_int_equal(wire_decode_request(buf, len, &out, err, sizeof err), 0);
    assert_int_equal(out.version, 0);
    assert_int_equal(out.policy, WIRE_POLICY_UNSET);
    free(buf);
    wire_request_free(&out);
    wire_request_free(&in);

    for (int o = WIRE_STORED; o <= WIRE_KEPT_ASIDE; o++) {
        wire_reply_t r = {.kind = WIRE_PUT, .outcome = (wire_outcome_t)o}, back;
        wire_encode_reply(&r, &buf, &len);
        assert_int_equal(wire_decode_reply(buf, len, &back, err, sizeof err), 0);
        assert_int_equal(back.outcome, o);
        free(buf);
        wire_reply_free(&back);
    }

    wire_reply_t g = {.kind = WIRE_GET,
                      .partition = 9,
                      .version = 42,
                      .policy = WIRE_POLICY_REJECT},
                 gb;
    attrs_set(&g.attrs, ATTR_SOP_INSTANCE_UID, SOP);
    wire_encode_reply(&g, &buf, &len);
    assert_int_equal(wire_decode_reply(buf, len, &gb, err, sizeof err), 0);
    assert_int_equal(gb.version, 42);
    assert_int_equal(gb.policy, WIRE_POLICY_REJECT);
    free(buf);
    wire_reply_free(&gb);
    wire_reply_free(&g);

    wire_reply_t l = {.kind = WIRE_PARTITION_LIST}, lb;
    wire_instance_t *w = wire_reply_add_instance(&l);
    w->study_uid = strdup(STUDY);
    w->series_uid = strdup(SERIES);
    w->sop_uid = strdup(SOP);
    w->version = WIRE_VERSION_MAX;
    w->policy = WIRE_POLICY_KEEP_FIRST;
    wire_encode_reply(&l, &buf, &len);
    assert_int_equal(wire_decode_reply(buf, len, &lb, err, sizeof err), 0);
    assert_int_equal(lb.instances[0].version, WIRE_VERSION_MAX);
    assert_int_equal(lb.instances[0].policy, WIRE_POLICY_KEEP_FIRST);
    free(buf);
    wire_reply_free(&lb);
    /* One past the maximum in a listing is refused like in a put. */
    l.instances[0].version = WIRE_VERSION_MAX + 1;
    wire_encode_reply(&l, &buf, &len);
    assert_int_equal(wire_decode_reply(buf, len, &lb, err, sizeof err), SP_EPROTO);
    assert_non_null(strstr(err, "version"));
    free(buf);
    wire_reply_free(&l);

    wire_reply_t st = {.kind = WIRE_STATS,
                       .stats = {.node_id = strdup("n1"), .conflicts = 4, .conflicts_refused = 7}},
                 sb;
    wire_encode_reply(&st, &buf, &len);
    assert_int_equal(wire_decode_reply(buf, len, &sb, err, sizeof err), 0);
    assert_int_equal(sb.stats.conflicts, 4);
    assert_int_equal(sb.stats.conflicts_refused, 7);
    free(buf);
    wire_reply_free(&sb);
    wire_reply_free(&st);

    wire_policy_t p = WIRE_POLICY_UNSET;
    assert_int_equal(wire_policy_parse("keep-newest", &p), 0);
    assert_int_equal(p, WIRE_POLICY_KEEP_NEWEST);
    assert_int_equal(wire_policy_parse("reject", &p), 0);
    assert_int_equal(p, WIRE_POLICY_REJECT);
    assert_int_equal(wire_policy_parse("unset", &p), SP_EINVAL);
    assert_int_equal(wire_policy_parse("newest", &p), SP_EINVAL);
    assert_string_equal(wire_policy_name(WIRE_POLICY_KEEP_FIRST), "keep-first");
}

/* METADATA: a SOP UID in the request (validated like GET's), a GetReply-shaped
 * answer that comes back as WIRE_METADATA, and the stats counters that show
 * whether pixels were read. */
static void test_metadata_round_trip(void **state)
{
    (void)state;
    char err[256];
    uint8_t *buf;
    size_t len;
    wire_request_t q = {.kind = WIRE_METADATA, .sop_uid = strdup(SOP)}, qb;
    assert_int_equal(wire_encode_request(&q, &buf, &len), 0);
    assert_int_equal(wire_decode_request(buf, len, &qb, err, sizeof err), 0);
    assert_int_equal(qb.kind, WIRE_METADATA);
    assert_string_equal(qb.sop_uid, SOP);
    assert_string_equal(wire_kind_name(qb.kind), "metadata");
    free(buf);
    wire_request_free(&qb);
    free(q.sop_uid);
    q.sop_uid = strdup("1.2.bad uid");
    wire_encode_request(&q, &buf, &len);
    assert_int_equal(wire_decode_request(buf, len, &qb, err, sizeof err), SP_EPROTO);
    assert_non_null(strstr(err, "SOPInstanceUID"));
    free(buf);
    free(q.sop_uid);

    wire_reply_t r = {.kind = WIRE_METADATA,
                      .partition = 77,
                      .version = 5,
                      .policy = WIRE_POLICY_KEEP_NEWEST},
                 rb;
    attrs_set(&r.attrs, ATTR_SOP_INSTANCE_UID, SOP);
    memset(r.digest, 0xAB, SP_DIGEST_LEN);
    wire_encode_reply(&r, &buf, &len);
    assert_int_equal(wire_decode_reply(buf, len, &rb, err, sizeof err), 0);
    assert_int_equal(rb.kind, WIRE_METADATA);
    assert_int_equal(rb.partition, 77);
    assert_int_equal(rb.policy, WIRE_POLICY_KEEP_NEWEST);
    assert_memory_equal(rb.digest, r.digest, SP_DIGEST_LEN);
    assert_string_equal(attrs_get(&rb.attrs, ATTR_SOP_INSTANCE_UID), SOP);
    free(buf);
    wire_reply_free(&rb);
    wire_reply_free(&r);

    wire_reply_t st = {.kind = WIRE_STATS,
                       .stats = {.node_id = strdup("n1"),
                                 .object_bytes_read = 1ull << 40,
                                 .metadata_rebuilt = 3}},
                 sb;
    wire_encode_reply(&st, &buf, &len);
    assert_int_equal(wire_decode_reply(buf, len, &sb, err, sizeof err), 0);
    assert_int_equal(sb.stats.object_bytes_read, 1ull << 40);
    assert_int_equal(sb.stats.metadata_rebuilt, 3);
    free(buf);
    wire_reply_free(&sb);
    wire_reply_free(&st);
}

/* METADATA_LIST: a LIST-shaped request, and a page whose body must hold
 * exactly the metadata bytes its instances announce. */
static void test_metadata_list_round_trip(void **state)
{
    (void)state;
    char err[256];
    uint8_t *buf;
    size_t len;
    wire_request_t q = {.kind = WIRE_METADATA_LIST,
                        .study_uid = strdup(STUDY),
                        .series_uid = strdup(SERIES),
                        .cursor = strdup(STUDY "/" SERIES "/" SOP),
                        .limit = 64},
                   qb;
    assert_int_equal(wire_encode_request(&q, &buf, &len), 0);
    assert_int_equal(wire_decode_request(buf, len, &qb, err, sizeof err), 0);
    assert_int_equal(qb.kind, WIRE_METADATA_LIST);
    assert_string_equal(qb.series_uid, SERIES);
    assert_string_equal(qb.cursor, STUDY "/" SERIES "/" SOP);
    assert_int_equal(qb.limit, 64);
    free(buf);
    wire_request_free(&qb);
    wire_request_free(&q);

    wire_reply_t r = {.kind = WIRE_METADATA_LIST, .next_cursor = strdup("a/b/c")}, rb;
    for (int i = 0; i < 2; i++) {
        wire_instance_t *w = wire_reply_add_instance(&r);
        w->study_uid = strdup(STUDY);
        w->series_uid = strdup(SERIES);
        w->sop_uid = strdup(SOP);
        w->metadata_size = 10 + (uint64_t)i;
    }
    uint8_t body[32] = {0};
    transport_response_t resp = {.body = body, .body_len = 21};
    wire_encode_reply(&r, &resp.head, &resp.head_len);
    assert_int_equal(wire_decode_response(&resp, &rb, err, sizeof err), 0);
    assert_int_equal(rb.ninstances, 2);
    assert_int_equal(rb.instances[1].metadata_size, 11);
    assert_string_equal(rb.next_cursor, "a/b/c");
    wire_reply_free(&rb);
    /* A body shorter or longer than announced is refused. */
    resp.body_len = 20;
    assert_int_equal(wire_decode_response(&resp, &rb, err, sizeof err), SP_EPROTO);
    resp.body_len = 22;
    assert_int_equal(wire_decode_response(&resp, &rb, err, sizeof err), SP_EPROTO);
    r.instances[0].metadata_size = UINT64_MAX - 5; /* no wrap-around to 21 */
    free(resp.head);
    wire_encode_reply(&r, &resp.head, &resp.head_len);
    resp.body_len = 21;
    assert_int_equal(wire_decode_response(&resp, &rb, err, sizeof err), SP_EPROTO);
    free(resp.head);
    wire_reply_free(&r);
}

static int decode_versioned_put(uint64_t version, int policy, char *err, size_t errlen)
{
    wire_request_t in, out;
    fill_put(&in);
    in.version = version;
    in.policy = (wire_policy_t)policy;
    uint8_t *buf;
    size_t len;
    wire_encode_request(&in, &buf, &len);
    int rc = wire_decode_request(buf, len, &out, err, errlen);
    free(buf);
    wire_request_free(&in);
    if (rc == 0)
        wire_request_free(&out);
    return rc;
}

static void test_versions_validated(void **state)
{
    (void)state;
    char err[256];
    assert_int_equal(decode_versioned_put(5, WIRE_POLICY_UNSET, err, sizeof err), SP_EPROTO);
    assert_non_null(strstr(err, "together"));
    assert_int_equal(decode_versioned_put(0, WIRE_POLICY_KEEP_FIRST, err, sizeof err), SP_EPROTO);
    assert_non_null(strstr(err, "together"));
    assert_int_equal(decode_versioned_put(5, 4, err, sizeof err), SP_EPROTO);
    assert_non_null(strstr(err, "policy"));
    assert_int_equal(decode_versioned_put(5, -1, err, sizeof err), SP_EPROTO);
    assert_int_equal(
        decode_versioned_put(WIRE_VERSION_MAX + 1, WIRE_POLICY_REJECT, err, sizeof err), SP_EPROTO);
    assert_non_null(strstr(err, "out of range"));
    assert_int_equal(decode_versioned_put(UINT64_MAX, WIRE_POLICY_KEEP_NEWEST, err, sizeof err),
                     SP_EPROTO);
    assert_int_equal(
        decode_versioned_put(WIRE_VERSION_MAX, WIRE_POLICY_KEEP_NEWEST, err, sizeof err), 0);
    /* An unknown put outcome from a peer is refused. */
    wire_reply_t r = {.kind = WIRE_PUT, .outcome = (wire_outcome_t)6}, back;
    uint8_t *buf;
    size_t len;
    wire_encode_reply(&r, &buf, &len);
    assert_int_equal(wire_decode_reply(buf, len, &back, err, sizeof err), SP_EPROTO);
    free(buf);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_put_round_trip),
        cmocka_unit_test(test_find_reply_round_trip),
        cmocka_unit_test(test_find_reply_over_a_frame),
        cmocka_unit_test(test_list_pages_round_trip),
        cmocka_unit_test(test_find_uid_lists),
        cmocka_unit_test(test_list_and_error_replies),
        cmocka_unit_test(test_truncated_buffers),
        cmocka_unit_test(test_random_buffers),
        cmocka_unit_test(test_semantic_validation),
        cmocka_unit_test(test_find_keys_validated),
        cmocka_unit_test(test_gossip_round_trip),
        cmocka_unit_test(test_gossip_validation),
        cmocka_unit_test(test_gossip_foreign_lengths),
        cmocka_unit_test(test_gossip_max_members),
        cmocka_unit_test(test_gossip_cluster_over_wire),
        cmocka_unit_test(test_gossip_truncated_buffers),
        cmocka_unit_test(test_gossip_mutated_buffers),
        cmocka_unit_test(test_status_and_drain_round_trip),
        cmocka_unit_test(test_versions_round_trip),
        cmocka_unit_test(test_versions_validated),
        cmocka_unit_test(test_metadata_round_trip),
        cmocka_unit_test(test_metadata_list_round_trip),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
