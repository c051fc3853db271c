/* test_gate.c - the DICOM front door's gatekeeper (router/gate.c): the PDU
 * stream tracker fed whole, byte by byte and in random pieces gives the same
 * answer; truncated, garbage and oversize streams are refused; and the
 * event loop, over socket pairs, closes silent and trickling new
 * connections and expires idle and trickling parked associations at their
 * deadlines while a complete request is handed over at once. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "base.h"
#include "gate.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_PDU 16384

/* ---- building PDU streams ------------------------------------------------ */

typedef struct {
    uint8_t *p;
    size_t len, cap;
} buf_t;

static void put(buf_t *b, const void *p, size_t n)
{
    if (b->len + n > b->cap) {
        b->cap = (b->len + n) * 2 + 64;
        b->p = sp_realloc(b->p, b->cap);
    }
    memcpy(b->p + b->len, p, n);
    b->len += n;
}

static void put_be32(buf_t *b, uint32_t v)
{
    uint8_t x[4] = {(uint8_t)(v >> 24), (uint8_t)(v >> 16), (uint8_t)(v >> 8), (uint8_t)v};
    put(b, x, 4);
}

static void put_pdu_header(buf_t *b, uint8_t type, uint32_t len)
{
    uint8_t h[2] = {type, 0};
    put(b, h, 2);
    put_be32(b, len);
}

/* An A-ASSOCIATE-RQ with a body of body_len bytes (only its framing counts). */
static void put_assoc_rq(buf_t *b, uint32_t body_len)
{
    put_pdu_header(b, 0x01, body_len);
    for (uint32_t i = 0; i < body_len; i++) {
        uint8_t z = (uint8_t)(i < 2 ? (i == 1) : 0x20);
        put(b, &z, 1);
    }
}

/* A command set (implicit VR LE) with CommandField and CommandDataSetType. */
static void make_command(buf_t *cmd, uint16_t field, uint16_t dstype)
{
    uint8_t e1[10] = {0x00, 0x00, 0x00, 0x01, 2, 0, 0, 0, (uint8_t)field, (uint8_t)(field >> 8)};
    uint8_t uid[8 + 18] = {0x00, 0x00, 0x02, 0x00, 18, 0, 0, 0};
    memcpy(uid + 8, "1.2.840.10008.1.1", 18);
    uint8_t e2[10] = {0x00, 0x00, 0x00, 0x08, 2, 0, 0, 0, (uint8_t)dstype, (uint8_t)(dstype >> 8)};
    put(cmd, uid, sizeof(uid));
    put(cmd, e1, sizeof(e1));
    put(cmd, e2, sizeof(e2));
}

/* Sends bytes as PDVs of at most frag bytes, pdvs_per_pdu PDVs per P-DATA-TF. */
static void put_pdvs(buf_t *b, const uint8_t *data, size_t n, bool command, size_t frag,
                     int pdvs_per_pdu)
{
    size_t off = 0;
    while (off < n || n == 0) {
        buf_t pdu = {0};
        for (int k = 0; k < pdvs_per_pdu && (off < n || n == 0); k++) {
            size_t f = n - off < frag ? n - off : frag;
            bool last = off + f == n;
            put_be32(&pdu, (uint32_t)(f + 2));
            uint8_t ctl[2] = {1, (uint8_t)((command ? 1 : 0) | (last ? 2 : 0))};
            put(&pdu, ctl, 2);
            put(&pdu, data + off, f);
            off += f;
            if (n == 0)
                n = 1, off = 1; /* one empty last fragment */
        }
        put_pdu_header(b, 0x04, (uint32_t)pdu.len);
        put(b, pdu.p, pdu.len);
        free(pdu.p);
    }
}

static void put_echo(buf_t *b)
{
    buf_t cmd = {0};
    make_command(&cmd, 0x0030, 0x0101);
    put_pdvs(b, cmd.p, cmd.len, true, 1000, 1);
    free(cmd.p);
}

/* A C-STORE-RQ with a data set of n bytes sent in frag-byte PDVs. */
static void put_store(buf_t *b, size_t n, size_t frag, int pdvs_per_pdu)
{
    buf_t cmd = {0};
    make_command(&cmd, 0x0001, 0x0000);
    put_pdvs(b, cmd.p, cmd.len, true, 7, 3); /* a fragmented command too */
    free(cmd.p);
    uint8_t *ds = sp_malloc(n);
    for (size_t i = 0; i < n; i++)
        ds[i] = (uint8_t)(i * 31);
    put_pdvs(b, ds, n, false, frag, pdvs_per_pdu);
    free(ds);
}

/* Feeds the stream in pieces of the given sizes (cycled); returns the result
 * and sets *used to the bytes the unit took. */
static int feed_pieces(gate_expect_t expect, const buf_t *b, const size_t *sizes, size_t nsizes,
                       size_t handoff, size_t *used)
{
    gate_tracker_t t;
    gate_tracker_init(&t, expect, MAX_PDU, handoff);
    size_t off = 0, k = 0;
    int rc = GATE_MORE;
    *used = 0;
    while (off < b->len) {
        size_t n = sizes[k++ % nsizes];
        if (n > b->len - off)
            n = b->len - off;
        size_t u = 0;
        rc = gate_tracker_feed(&t, b->p + off, n, &u);
        assert_true(u <= n);
        *used += u;
        off += n;
        if (rc != GATE_MORE) {
            assert_true(rc < 0 || u <= n);
            break;
        }
        assert_int_equal(u, n);
    }
    return rc;
}

/* The answer for the whole stream at once, byte by byte, and in 200
 * random chunkings must agree. */
static int feed_all_ways(gate_expect_t expect, const buf_t *b, size_t handoff, size_t *used)
{
    size_t whole_used, one_used;
    size_t all = b->len ? b->len : 1, one = 1;
    int rc = feed_pieces(expect, b, &all, 1, handoff, &whole_used);
    int rc1 = feed_pieces(expect, b, &one, 1, handoff, &one_used);
    assert_int_equal(rc, rc1);
    if (rc >= 0)
        assert_int_equal(whole_used, one_used);
    for (int round = 0; round < 200; round++) {
        size_t sizes[16], u;
        for (int i = 0; i < 16; i++)
            sizes[i] = 1 + (size_t)rand() % (round < 100 ? 9 : 3000);
        assert_int_equal(feed_pieces(expect, b, sizes, 16, handoff, &u), rc);
        if (rc >= 0)
            assert_int_equal(u, whole_used);
    }
    *used = whole_used;
    return rc;
}

/* ---- tracker tests ---------------------------------------------------------- */

static void test_assoc_rq_complete(void **state)
{
    (void)state;
    buf_t b = {0};
    put_assoc_rq(&b, 300);
    size_t used;
    buf_t part = {0};
    put(&part, b.p, b.len - 1);
    assert_int_equal(feed_all_ways(GATE_EXPECT_ASSOC_RQ, &part, 0, &used), GATE_MORE);
    assert_int_equal(feed_all_ways(GATE_EXPECT_ASSOC_RQ, &b, 0, &used), GATE_COMPLETE);
    assert_int_equal(used, b.len);
    /* Bytes after the request belong to what follows. */
    size_t rq_len = b.len;
    put_echo(&b);
    assert_int_equal(feed_all_ways(GATE_EXPECT_ASSOC_RQ, &b, 0, &used), GATE_COMPLETE);
    assert_int_equal(used, rq_len);
    free(b.p);
    free(part.p);
}

static void test_assoc_rq_refused(void **state)
{
    (void)state;
    size_t used;
    buf_t b = {0};
    put_echo(&b); /* a P-DATA-TF before any association */
    assert_int_equal(feed_all_ways(GATE_EXPECT_ASSOC_RQ, &b, 0, &used), SP_EPROTO);
    b.len = 0;
    put_pdu_header(&b, 0x01, GATE_MAX_ASSOC_RQ + 1);
    assert_int_equal(feed_all_ways(GATE_EXPECT_ASSOC_RQ, &b, 0, &used), SP_ETOOBIG);
    b.len = 0;
    put_assoc_rq(&b, 10); /* shorter than the fixed fields */
    assert_int_equal(feed_all_ways(GATE_EXPECT_ASSOC_RQ, &b, 0, &used), SP_EPROTO);
    b.len = 0;
    put(&b, "GET / HTTP/1.1\r\n\r\n", 18);
    assert_int_equal(feed_all_ways(GATE_EXPECT_ASSOC_RQ, &b, 0, &used), SP_EPROTO);
    free(b.p);
}

static void test_messages_complete(void **state)
{
    (void)state;
    size_t used;
    buf_t b = {0};
    put_echo(&b);
    assert_int_equal(feed_all_ways(GATE_EXPECT_MESSAGE, &b, 0, &used), GATE_COMPLETE);
    assert_int_equal(used, b.len);

    /* A store in 2-byte PDVs, five per PDU: complete only with its last. */
    b.len = 0;
    put_store(&b, 501, 2, 5);
    buf_t part = {0};
    put(&part, b.p, b.len - 1);
    assert_int_equal(feed_all_ways(GATE_EXPECT_MESSAGE, &part, 0, &used), GATE_MORE);
    assert_int_equal(feed_all_ways(GATE_EXPECT_MESSAGE, &b, 0, &used), GATE_COMPLETE);
    assert_int_equal(used, b.len);

    /* Pipelined: echo, store, release - each unit found in turn. */
    buf_t pipe = {0};
    put_echo(&pipe);
    size_t first = pipe.len;
    put_store(&pipe, 3000, 1000, 1);
    size_t second = pipe.len - first;
    uint8_t rel[10] = {0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0};
    put(&pipe, rel, sizeof(rel));
    assert_int_equal(feed_all_ways(GATE_EXPECT_MESSAGE, &pipe, 0, &used), GATE_COMPLETE);
    assert_int_equal(used, first);
    buf_t rest = {0};
    put(&rest, pipe.p + first, pipe.len - first);
    assert_int_equal(feed_all_ways(GATE_EXPECT_MESSAGE, &rest, 0, &used), GATE_COMPLETE);
    assert_int_equal(used, second);
    buf_t last = {0};
    put(&last, pipe.p + first + second, sizeof(rel));
    assert_int_equal(feed_all_ways(GATE_EXPECT_MESSAGE, &last, 0, &used), GATE_COMPLETE);
    assert_int_equal(used, sizeof(rel));

    /* An A-ABORT is a unit of its own. */
    uint8_t ab[10] = {0x07, 0, 0, 0, 0, 4, 0, 0, 2, 0};
    last.len = 0;
    put(&last, ab, sizeof(ab));
    assert_int_equal(feed_all_ways(GATE_EXPECT_MESSAGE, &last, 0, &used), GATE_COMPLETE);
    free(b.p);
    free(part.p);
    free(pipe.p);
    free(rest.p);
    free(last.p);
}

static void test_big_message_handed_off(void **state)
{
    (void)state;
    size_t used;
    buf_t b = {0};
    put_store(&b, 300000, 16000, 1);
    assert_int_equal(feed_all_ways(GATE_EXPECT_MESSAGE, &b, 100000, &used), GATE_HANDOFF);
    assert_int_equal(used, 100000);
    assert_int_equal(feed_all_ways(GATE_EXPECT_MESSAGE, &b, 0, &used), GATE_COMPLETE);
    free(b.p);
}

static void test_messages_refused(void **state)
{
    (void)state;
    size_t used;
    buf_t b = {0};
    /* A data set fragment with no command before it. */
    uint8_t ds[4] = {1, 2, 3, 4};
    put_pdvs(&b, ds, 4, false, 4, 1);
    assert_int_equal(feed_all_ways(GATE_EXPECT_MESSAGE, &b, 0, &used), SP_EPROTO);
    /* One PDU holding an echo command and, after it, a data set PDV. */
    buf_t two = {0};
    buf_t cmd = {0};
    make_command(&cmd, 0x0030, 0x0101);
    buf_t pdu = {0};
    put_be32(&pdu, (uint32_t)cmd.len + 2);
    uint8_t c1[2] = {1, 3};
    put(&pdu, c1, 2);
    put(&pdu, cmd.p, cmd.len);
    put_pdu_header(&two, 0x04, (uint32_t)pdu.len + 6);
    put(&two, pdu.p, pdu.len);
    put_be32(&two, 4);
    uint8_t d1[2] = {1, 2};
    put(&two, d1, 2);
    put(&two, ds, 2);
    /* The message ended inside this PDU; what follows in it is the next
     * message's business (DCMTK keeps it), so this is complete. */
    assert_int_equal(feed_all_ways(GATE_EXPECT_MESSAGE, &two, 0, &used), GATE_COMPLETE);
    /* A PDV item longer than its PDU. */
    b.len = 0;
    put_pdu_header(&b, 0x04, 10);
    put_be32(&b, 100);
    uint8_t c3[6] = {1, 3, 0, 0, 0, 0};
    put(&b, c3, 6);
    assert_int_equal(feed_all_ways(GATE_EXPECT_MESSAGE, &b, 0, &used), SP_EPROTO);
    /* A PDU over the size we accept. */
    b.len = 0;
    put_pdu_header(&b, 0x04, MAX_PDU + 1);
    assert_int_equal(feed_all_ways(GATE_EXPECT_MESSAGE, &b, 0, &used), SP_ETOOBIG);
    /* An A-ASSOCIATE-RQ inside an association, an unknown PDU type. */
    b.len = 0;
    put_assoc_rq(&b, 100);
    assert_int_equal(feed_all_ways(GATE_EXPECT_MESSAGE, &b, 0, &used), SP_EPROTO);
    b.len = 0;
    put_pdu_header(&b, 0x09, 4);
    assert_int_equal(feed_all_ways(GATE_EXPECT_MESSAGE, &b, 0, &used), SP_EPROTO);
    /* A command set over 64 KiB (never the last fragment). */
    b.len = 0;
    uint8_t *junk = sp_calloc(1, 8000);
    for (int i = 0; i < 10; i++) {
        put_pdu_header(&b, 0x04, 8006);
        put_be32(&b, 8002);
        uint8_t c[2] = {1, 1};
        put(&b, c, 2);
        put(&b, junk, 8000);
    }
    free(junk);
    assert_int_equal(feed_all_ways(GATE_EXPECT_MESSAGE, &b, 0, &used), SP_ETOOBIG);
    /* A release PDU with a huge body. */
    b.len = 0;
    put_pdu_header(&b, 0x05, 1000000);
    assert_int_equal(feed_all_ways(GATE_EXPECT_MESSAGE, &b, 0, &used), SP_ETOOBIG);
    free(b.p);
    free(two.p);
    free(cmd.p);
    free(pdu.p);
}

/* ---- the event loop --------------------------------------------------------- */

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    gate_conn_t *ready[64];
    int64_t ready_at[64];
    int nready;
    int expired_why[64];
    int64_t expired_at[64];
    void *expired_assoc[64];
    int nexpired;
} events_t;

static void on_ready(void *ctx, gate_conn_t *c)
{
    events_t *e = ctx;
    pthread_mutex_lock(&e->mu);
    e->ready_at[e->nready] = sp_now_ms();
    e->ready[e->nready++] = c;
    pthread_cond_broadcast(&e->cv);
    pthread_mutex_unlock(&e->mu);
}

static void on_expired(void *ctx, gate_conn_t *c, int why)
{
    events_t *e = ctx;
    pthread_mutex_lock(&e->mu);
    e->expired_at[e->nexpired] = sp_now_ms();
    e->expired_assoc[e->nexpired] = gate_conn_assoc(c);
    e->expired_why[e->nexpired++] = why;
    pthread_cond_broadcast(&e->cv);
    pthread_mutex_unlock(&e->mu);
    gate_conn_close(&c);
}

/* Waits until at least n ready (or expired) events; returns whether they came. */
static bool wait_events(events_t *e, int *counter, int n, int timeout_ms)
{
    int64_t until = sp_now_ms() + timeout_ms;
    pthread_mutex_lock(&e->mu);
    while (*counter < n && sp_now_ms() < until) {
        pthread_mutex_unlock(&e->mu);
        usleep(2000);
        pthread_mutex_lock(&e->mu);
    }
    bool ok = *counter >= n;
    pthread_mutex_unlock(&e->mu);
    return ok;
}

/* A connected pair: the gate gets one end, the test peer keeps the other. */
static int add_peer(gate_t *g, const char *addr, int *gate_end)
{
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    if (gate_end)
        *gate_end = sv[0];
    int rc = gate_add(g, sv[0], addr);
    if (rc != 0) {
        close(sv[1]);
        return rc;
    }
    return sv[1];
}

/* True when the gate closed its end: a read sees the end of stream. */
static bool peer_closed(int fd, int timeout_ms)
{
    int64_t until = sp_now_ms() + timeout_ms;
    while (sp_now_ms() < until) {
        char c;
        ssize_t r = recv(fd, &c, 1, MSG_DONTWAIT);
        if (r == 0 || (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK))
            return true;
        usleep(5000);
    }
    return false;
}

static gate_t *start_gate(events_t *e, int acse_ms, int dimse_ms)
{
    memset(e, 0, sizeof(*e));
    pthread_mutex_init(&e->mu, NULL);
    pthread_cond_init(&e->cv, NULL);
    gate_config_t cfg;
    gate_config_defaults(&cfg);
    cfg.acse_timeout_ms = acse_ms;
    cfg.dimse_timeout_ms = dimse_ms;
    cfg.max_pdu = MAX_PDU;
    cfg.max_per_address = 3;
    cfg.max_connections = 50;
    cfg.min_rate = 1000000;
    cfg.ready = on_ready;
    cfg.expired = on_expired;
    cfg.ctx = e;
    gate_t *g = NULL;
    assert_int_equal(gate_new(&cfg, &g), 0);
    return g;
}

static void test_loop_new_connections(void **state)
{
    (void)state;
    events_t e;
    gate_t *g = start_gate(&e, 400, 500);
    int64_t t0 = sp_now_ms();
    int silent = add_peer(g, "10.0.0.1", NULL);
    int trickle = add_peer(g, "10.0.0.2", NULL);
    buf_t rq = {0};
    put_assoc_rq(&rq, 200);
    /* Trickle the request while a good client sends its own at once. */
    assert_int_equal(write(trickle, rq.p, 1), 1);
    int good = add_peer(g, "10.0.0.3", NULL);
    assert_int_equal(write(good, rq.p, rq.len), (ssize_t)rq.len);
    assert_true(wait_events(&e, &e.nready, 1, 2000));
    printf("complete A-ASSOCIATE-RQ handed over after %lld ms\n", (long long)(e.ready_at[0] - t0));
    assert_true(e.ready_at[0] - t0 < 300); /* long before the silent ones expire */
    gate_conn_t *c = e.ready[0];
    assert_null(gate_conn_assoc(c));
    assert_string_equal(gate_conn_peer(c), "10.0.0.3");
    assert_int_equal(gate_conn_buffered(c), rq.len);
    uint8_t back[512];
    assert_int_equal(gate_conn_read(c, back, sizeof(back)), (ssize_t)rq.len);
    assert_memory_equal(back, rq.p, rq.len);
    for (int i = 1; i < 6; i++) {
        usleep(60 * 1000);
        (void)!write(trickle, rq.p + i, 1);
    }
    /* Silent and trickling connections are closed at the ACSE deadline,
     * counted from accept, however often the trickler sends. */
    assert_true(peer_closed(silent, 1500));
    assert_true(peer_closed(trickle, 1500));
    int64_t t = sp_now_ms() - t0;
    printf("silent and trickling connections closed after %lld ms\n", (long long)t);
    assert_true(t >= 350);
    assert_int_equal(e.nexpired, 0); /* new connections never reach the owner */
    assert_int_equal(gate_count(g), 1);
    gate_conn_close(&c);
    assert_int_equal(gate_count(g), 0);

    /* Garbage is closed at once, not at the deadline. */
    int64_t t1 = sp_now_ms();
    int junk = add_peer(g, "10.0.0.4", NULL);
    assert_int_equal(write(junk, "GET / HTTP/1.0\r\n\r\n", 18), 18);
    assert_true(peer_closed(junk, 1000));
    assert_true(sp_now_ms() - t1 < 300);
    close(silent);
    close(trickle);
    close(good);
    close(junk);
    free(rq.p);
    gate_destroy(&g);
}

/* Takes a new connection through to "associated": sends the request,
 * waits for the hand-over and reads the request as the owner would. */
static gate_conn_t *associate(gate_t *g, events_t *e, const char *addr, int *peer)
{
    buf_t rq = {0};
    put_assoc_rq(&rq, 100);
    *peer = add_peer(g, addr, NULL);
    assert_true(*peer >= 0);
    int before = e->nready;
    assert_int_equal(write(*peer, rq.p, rq.len), (ssize_t)rq.len);
    assert_true(wait_events(e, &e->nready, before + 1, 2000));
    gate_conn_t *c = e->ready[before];
    uint8_t back[256];
    assert_int_equal(gate_conn_read(c, back, sizeof(back)), (ssize_t)rq.len);
    free(rq.p);
    return c;
}

static void test_loop_parked_associations(void **state)
{
    (void)state;
    events_t e;
    gate_t *g = start_gate(&e, 400, 400);
    int idle, slow, good;
    gate_conn_t *ci = associate(g, &e, "10.0.1.1", &idle);
    gate_conn_t *cs = associate(g, &e, "10.0.1.2", &slow);
    gate_conn_t *cg = associate(g, &e, "10.0.1.3", &good);
    int64_t t0 = sp_now_ms();
    gate_park(ci, (void *)1);
    gate_park(cs, (void *)2);
    gate_park(cg, (void *)3);
    buf_t store = {0};
    put_store(&store, 400, 2, 1);
    /* The slow one sends a store in 2-byte PDVs every 50 ms; the good one
     * sends an echo at once, which is handed over at once. */
    int ready_before = e.nready;
    buf_t echo = {0};
    put_echo(&echo);
    assert_int_equal(write(good, echo.p, echo.len), (ssize_t)echo.len);
    size_t sent = 0;
    for (int i = 0; i < 20 && e.nexpired < 2; i++) {
        (void)!write(slow, store.p + sent, 8);
        sent += 8;
        usleep(50 * 1000);
    }
    assert_true(wait_events(&e, &e.nready, ready_before + 1, 100));
    assert_ptr_equal(e.ready[ready_before], cg);
    assert_ptr_equal(gate_conn_assoc(cg), (void *)3);
    assert_true(e.ready_at[ready_before] - t0 < 300);
    assert_int_equal(gate_conn_buffered(cg), echo.len);
    /* Idle and slow associations go back to the owner to abort. */
    assert_true(wait_events(&e, &e.nexpired, 2, 2000));
    for (int i = 0; i < 2; i++) {
        printf("association %p expired after %lld ms (why %d)\n", e.expired_assoc[i],
               (long long)(e.expired_at[i] - t0), e.expired_why[i]);
        assert_int_equal(e.expired_why[i], GATE_WHY_TIMEOUT);
        assert_true(e.expired_at[i] - t0 >= 350 && e.expired_at[i] - t0 < 1500);
    }

    /* A served association reads under its deadline: a trickle cannot
     * stretch it, and an expired connection does not wait at all. */
    uint8_t back[256];
    assert_int_equal(gate_conn_read(cg, back, sizeof(back)), (ssize_t)echo.len);
    assert_int_equal(gate_conn_next_ready(cg, 10), 0);
    gate_conn_set_deadline(cg, sp_now_ms(), 300, 0);
    int64_t t1 = sp_now_ms();
    ssize_t r = 0;
    for (int i = 0; i < 40; i++) {
        (void)!write(good, "x", 1);
        r = gate_conn_read(cg, back, 1);
        if (r < 0)
            break;
        usleep(20 * 1000);
    }
    assert_int_equal(r, SP_ETIMEOUT);
    assert_true(sp_now_ms() - t1 >= 280 && sp_now_ms() - t1 < 600);
    gate_conn_expire(cg);
    t1 = sp_now_ms();
    char drain[64];
    while (gate_conn_buffered(cg) > 0)
        (void)gate_conn_read(cg, drain, sizeof(drain));
    assert_int_equal(gate_conn_read(cg, back, 1), SP_ETIMEOUT);
    assert_false(gate_conn_wait(cg, 1000));
    assert_true(sp_now_ms() - t1 < 100);

    /* next_ready sees a message arrive in pieces, and a release. */
    gate_conn_set_deadline(cg, sp_now_ms(), 1000, 0);
    while (gate_conn_wait(cg, 0))
        (void)gate_conn_read(cg, drain, sizeof(drain));
    assert_int_equal(write(good, echo.p, 5), 5);
    assert_int_equal(gate_conn_next_ready(cg, 10), 0);
    assert_int_equal(write(good, echo.p + 5, echo.len - 5), (ssize_t)(echo.len - 5));
    assert_int_equal(gate_conn_next_ready(cg, 200), 1);
    assert_int_equal(gate_conn_buffered(cg), echo.len);
    /* Parked with the whole message buffered: handed back at once. */
    ready_before = e.nready;
    gate_park(cg, (void *)4);
    assert_true(wait_events(&e, &e.nready, ready_before + 1, 500));
    assert_ptr_equal(gate_conn_assoc(e.ready[ready_before]), (void *)4);
    /* Closed by the peer while parked: expired with GATE_WHY_CLOSED. */
    while (gate_conn_buffered(cg) > 0)
        (void)gate_conn_read(cg, drain, sizeof(drain));
    int exp_before = e.nexpired;
    gate_park(cg, (void *)5);
    close(good);
    assert_true(wait_events(&e, &e.nexpired, exp_before + 1, 1000));
    assert_int_equal(e.expired_why[exp_before], GATE_WHY_CLOSED);
    assert_int_equal(gate_count(g), 0);
    close(idle);
    close(slow);
    free(store.p);
    free(echo.p);
    gate_destroy(&g);
}

static void test_loop_limits(void **state)
{
    (void)state;
    events_t e;
    gate_t *g = start_gate(&e, 5000, 5000);
    int fds[60];
    int n = 0;
    /* Three per address: the fourth from one address is refused. */
    for (int i = 0; i < 3; i++)
        fds[n++] = add_peer(g, "10.0.2.1", NULL);
    assert_int_equal(add_peer(g, "10.0.2.1", NULL), SP_ELIMIT);
    assert_int_equal(gate_count_address(g, "10.0.2.1"), 3);
    assert_int_equal(gate_refused(g), 1);
    /* 50 in all: a newcomer pushes out the oldest pending connection. */
    char addr[32];
    for (int i = 0; n < 50; i++) {
        snprintf(addr, sizeof(addr), "10.0.3.%d", i);
        fds[n++] = add_peer(g, addr, NULL);
        assert_true(fds[n - 1] >= 0);
    }
    assert_int_equal(gate_count(g), 50);
    int newcomer = add_peer(g, "10.0.4.1", NULL);
    assert_true(newcomer >= 0);
    assert_true(peer_closed(fds[0], 1000));
    int64_t until = sp_now_ms() + 1000;
    while (gate_count(g) > 50 && sp_now_ms() < until)
        usleep(2000);
    assert_int_equal(gate_count(g), 50);
    assert_int_equal(gate_count_address(g, "10.0.2.1"), 2);
    for (int i = 0; i < n; i++)
        close(fds[i]);
    close(newcomer);
    gate_destroy(&g);
}

/* Shutdown closes new connections and hands parked ones to the owner. */
static void test_loop_shutdown(void **state)
{
    (void)state;
    events_t e;
    gate_t *g = start_gate(&e, 5000, 5000);
    int pending = add_peer(g, "10.0.5.1", NULL);
    int peer;
    gate_conn_t *c = associate(g, &e, "10.0.5.2", &peer);
    gate_park(c, (void *)7);
    usleep(50 * 1000);
    gate_shutdown(g);
    assert_int_equal(e.nexpired, 1);
    assert_int_equal(e.expired_why[0], GATE_WHY_STOP);
    assert_ptr_equal(e.expired_assoc[0], (void *)7);
    assert_true(peer_closed(pending, 100));
    assert_true(peer_closed(peer, 100));
    assert_int_equal(gate_count(g), 0);
    close(pending);
    close(peer);
    gate_destroy(&g);
}

int main(void)
{
    srand(12345);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_assoc_rq_complete),
        cmocka_unit_test(test_assoc_rq_refused),
        cmocka_unit_test(test_messages_complete),
        cmocka_unit_test(test_big_message_handed_off),
        cmocka_unit_test(test_messages_refused),
        cmocka_unit_test(test_loop_new_connections),
        cmocka_unit_test(test_loop_parked_associations),
        cmocka_unit_test(test_loop_limits),
        cmocka_unit_test(test_loop_shutdown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
