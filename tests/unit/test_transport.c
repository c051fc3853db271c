/* test_transport.c - CURVE RPC between a server and clients on loopback
 * (common/transport.c). Every server binds "tcp://127.0.0.1:*"; raw ZeroMQ
 * sockets play the misbehaving peers. No test asserts on elapsed time: a
 * handler held at a gate (the "block" commands) stays busy exactly until the
 * test opens it, and the tests check what happened meanwhile (an answer came,
 * a request expired, a handler was still held). Call timeouts only bound how
 * long a failing test waits; NEVER_MS outlasts the CTest timeout, so a call
 * with it returns only through the event under test. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "base.h"
#include "keys.h"
#include "log.h"
#include "transport.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <zmq.h>

/* Longer than the CTest timeout of a unit test: a call given this timeout
 * never ends by timing out in a run that passes. */
#define NEVER_MS (10 * 60 * 1000)
/* The longest a handler stays at the gate before passing on its own, so a
 * failing test cannot hold a server forever; far beyond any passing test. */
#define GATE_MAX_MS 20000

static keys_pair_t server_keys, alice_keys, mallory_keys;
static keys_allowlist_t *allowed; /* alice only */

/* What the handler saw; reset by start_server(). */
static struct {
    atomic_int calls;
    atomic_int count_calls;
    atomic_int sleepers;
    atomic_int blocked;      /* handlers that reached the gate */
    atomic_int released;     /* handlers that left it (opened or GATE_MAX_MS) */
    atomic_int gate_expired; /* handlers that left it after GATE_MAX_MS */
    atomic_int block_once_seen;
    atomic_int body_frees;
    size_t big_reply_len;
    pthread_mutex_t lock;
    char peer_name[64];
    char peer_key[KEYS_Z85_LEN + 1];
} hs = {.lock = PTHREAD_MUTEX_INITIALIZER};

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0)
        ;
}

/* The gate "block" handlers wait at; closed by start_server(). */
static struct {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    bool open;
} gate = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, false};

static void gate_set(bool open)
{
    pthread_mutex_lock(&gate.lock);
    gate.open = open;
    pthread_cond_broadcast(&gate.cond);
    pthread_mutex_unlock(&gate.lock);
}

/* Called by a handler: waits until the test opens the gate, or GATE_MAX_MS. */
static void gate_pass(void)
{
    atomic_fetch_add(&hs.blocked, 1);
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += GATE_MAX_MS / 1000;
    bool expired = false;
    pthread_mutex_lock(&gate.lock);
    while (!gate.open && !expired)
        expired = pthread_cond_timedwait(&gate.cond, &gate.lock, &until) != 0 && !gate.open;
    pthread_mutex_unlock(&gate.lock);
    if (expired)
        atomic_fetch_add(&hs.gate_expired, 1);
    atomic_fetch_add(&hs.released, 1);
}

static void counting_free(void *body, void *hint)
{
    (void)hint;
    atomic_fetch_add(&hs.body_frees, 1);
    free(body);
}

/* Commands (the head): "echo", "sleep:<ms>", "block" (waits at the gate),
 * "block-once" (waits at the gate on its first call only), "count",
 * "big-reply". All reply with the head and body they got, except big-reply. */
static void test_handler(void *ctx, const transport_request_t *req, transport_reply_t *rep)
{
    (void)ctx;
    atomic_fetch_add(&hs.calls, 1);
    char cmd[64] = "";
    size_t n = req->head_len < sizeof cmd - 1 ? req->head_len : sizeof cmd - 1;
    if (n)
        memcpy(cmd, req->head, n);

    pthread_mutex_lock(&hs.lock);
    snprintf(hs.peer_name, sizeof hs.peer_name, "%s", req->peer_name ? req->peer_name : "");
    snprintf(hs.peer_key, sizeof hs.peer_key, "%s", req->peer_key ? req->peer_key : "");
    pthread_mutex_unlock(&hs.lock);

    if (strncmp(cmd, "sleep:", 6) == 0) {
        atomic_fetch_add(&hs.sleepers, 1);
        sleep_ms(atoi(cmd + 6));
    } else if (strcmp(cmd, "block") == 0) {
        gate_pass();
    } else if (strcmp(cmd, "block-once") == 0) {
        if (atomic_fetch_add(&hs.block_once_seen, 1) == 0)
            gate_pass();
    } else if (strcmp(cmd, "count") == 0) {
        atomic_fetch_add(&hs.count_calls, 1);
    } else if (strcmp(cmd, "big-reply") == 0) {
        rep->body = sp_calloc(1, hs.big_reply_len);
        rep->body_len = hs.big_reply_len;
        return;
    }
    rep->head = req->head_len ? sp_memdup(req->head, req->head_len) : NULL;
    rep->head_len = req->head_len;
    /* No cmocka asserts here: this runs on a server thread. A missing body
     * makes the reply differ, which the caller checks. */
    if (req->body_len > 0 && req->body != NULL) {
        rep->body = sp_memdup(req->body, req->body_len);
        rep->body_len = req->body_len;
        rep->body_free = counting_free;
    }
}

static void server_config(transport_config_t *cfg)
{
    transport_config_defaults(cfg);
    cfg->chunk_bytes = 4096;
    cfg->max_frame_bytes = 64 * 1024;
    cfg->max_body_bytes = 4 << 20;
    cfg->workers = 4;
}

static transport_server_t *start_server(const transport_config_t *cfg, char *ep, size_t ep_size)
{
    atomic_store(&hs.calls, 0);
    atomic_store(&hs.count_calls, 0);
    atomic_store(&hs.sleepers, 0);
    atomic_store(&hs.blocked, 0);
    atomic_store(&hs.released, 0);
    atomic_store(&hs.gate_expired, 0);
    atomic_store(&hs.block_once_seen, 0);
    atomic_store(&hs.body_frees, 0);
    gate_set(false);
    transport_server_t *srv = transport_server_new(cfg, &server_keys, allowed, test_handler, NULL);
    assert_non_null(srv);
    assert_int_equal(transport_server_start(srv, "tcp://127.0.0.1:*", ep, ep_size), 0);
    assert_non_null(strstr(ep, "tcp://127.0.0.1:"));
    return srv;
}

static transport_client_t *make_client(const keys_pair_t *kp, const char *server_key,
                                       const char *ep, int timeout_ms, int retries)
{
    transport_config_t cfg;
    transport_config_defaults(&cfg);
    cfg.chunk_bytes = 4096;
    cfg.max_frame_bytes = 64 * 1024;
    cfg.max_body_bytes = 8 << 20;
    cfg.timeout_ms = timeout_ms;
    cfg.retries = retries;
    transport_client_t *c = transport_client_new(&cfg, kp, server_key, ep);
    assert_non_null(c);
    return c;
}

static int call(transport_client_t *c, const char *head, const void *body, size_t len,
                transport_response_t *r)
{
    return transport_call(c, (const uint8_t *)head, strlen(head), body, len, 0, r);
}

static bool wait_for(atomic_int *v, int want, int ms)
{
    for (int i = 0; i < ms / 10 && atomic_load(v) < want; i++)
        sleep_ms(10);
    return atomic_load(v) >= want;
}

/* A call made on another thread. */
typedef struct {
    const char *ep;
    const char *head;
    int timeout_ms;
    int rc;
    transport_response_t resp;
    pthread_t thread;
} async_call_t;

static void *async_call_main(void *arg)
{
    async_call_t *a = arg;
    transport_client_t *c =
        make_client(&alice_keys, server_keys.public_z85, a->ep, a->timeout_ms, 0);
    a->rc = call(c, a->head, "x", 1, &a->resp);
    transport_client_destroy(&c);
    return NULL;
}

static void async_start(async_call_t *a, const char *ep, const char *head, int timeout_ms)
{
    memset(a, 0, sizeof *a);
    a->ep = ep;
    a->head = head;
    a->timeout_ms = timeout_ms;
    assert_int_equal(pthread_create(&a->thread, NULL, async_call_main, a), 0);
}

static int async_finish(async_call_t *a)
{
    pthread_join(a->thread, NULL);
    transport_response_free(&a->resp);
    return a->rc;
}

/* ---- raw ZeroMQ peers ------------------------------------------------- */

static void *raw_dealer(void *zctx, const char *ep, const keys_pair_t *curve)
{
    void *s = zmq_socket(zctx, ZMQ_DEALER);
    assert_non_null(s);
    int zero = 0;
    assert_int_equal(zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof zero), 0);
    if (curve != NULL) {
        assert_int_equal(zmq_setsockopt(s, ZMQ_CURVE_SERVERKEY, server_keys.public_z85, 41), 0);
        assert_int_equal(zmq_setsockopt(s, ZMQ_CURVE_PUBLICKEY, curve->public_z85, 41), 0);
        assert_int_equal(zmq_setsockopt(s, ZMQ_CURVE_SECRETKEY, curve->secret_z85, 41), 0);
    }
    assert_int_equal(zmq_connect(s, ep), 0);
    return s;
}

static void make_hdr(uint8_t out[20], uint8_t kind, uint64_t id, uint32_t word)
{
    memcpy(out, "SPK1", 4);
    out[4] = kind;
    out[5] = out[6] = out[7] = 0;
    for (int i = 0; i < 8; i++)
        out[8 + i] = (uint8_t)(id >> (8 * i));
    for (int i = 0; i < 4; i++)
        out[16 + i] = (uint8_t)(word >> (8 * i));
}

/* Waits up to ms for a reply on a raw socket. Returns the number of frames
 * (0 when nothing came); frame 0 is copied into hdr, frame 1 into head. */
static int raw_recv(void *s, int ms, uint8_t hdr[20], char *head, size_t head_size)
{
    zmq_pollitem_t item = {s, 0, ZMQ_POLLIN, 0};
    if (zmq_poll(&item, 1, ms) <= 0)
        return 0;
    int frames = 0, more = 1;
    size_t len = sizeof more;
    while (more) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        assert_true(zmq_msg_recv(&m, s, 0) >= 0);
        if (frames == 0) {
            assert_int_equal(zmq_msg_size(&m), 20);
            memcpy(hdr, zmq_msg_data(&m), 20);
        } else if (frames == 1 && head != NULL) {
            snprintf(head, head_size, "%.*s", (int)zmq_msg_size(&m),
                     (const char *)zmq_msg_data(&m));
        }
        zmq_msg_close(&m);
        frames++;
        assert_int_equal(zmq_getsockopt(s, ZMQ_RCVMORE, &more, &len), 0);
    }
    return frames;
}

static uint64_t hdr_id(const uint8_t h[20])
{
    uint64_t id = 0;
    for (int i = 0; i < 8; i++)
        id |= (uint64_t)h[8 + i] << (8 * i);
    return id;
}

static int32_t hdr_status(const uint8_t h[20])
{
    uint32_t w = 0;
    for (int i = 0; i < 4; i++)
        w |= (uint32_t)h[16 + i] << (8 * i);
    int32_t s;
    memcpy(&s, &w, sizeof s);
    return s;
}

/* ---- tests ------------------------------------------------------------ */

static void test_round_trip(void **state)
{
    (void)state;
    transport_config_t cfg;
    server_config(&cfg);
    char ep[256];
    transport_server_t *srv = start_server(&cfg, ep, sizeof ep);
    transport_client_t *c = make_client(&alice_keys, server_keys.public_z85, ep, 5000, 0);
    transport_response_t r;

    /* Empty body. */
    assert_int_equal(call(c, "echo", NULL, 0, &r), 0);
    assert_int_equal(r.head_len, 4);
    assert_memory_equal(r.head, "echo", 4);
    assert_int_equal(r.body_len, 0);
    assert_null(r.body);
    transport_response_free(&r);

    /* Empty head and body. */
    assert_int_equal(transport_call(c, NULL, 0, NULL, 0, 0, &r), 0);
    assert_int_equal(r.head_len, 0);
    assert_int_equal(r.body_len, 0);
    transport_response_free(&r);

    /* Small body, one chunk. */
    assert_int_equal(call(c, "echo", "hello", 5, &r), 0);
    assert_int_equal(r.body_len, 5);
    assert_memory_equal(r.body, "hello", 5);
    transport_response_free(&r);

    /* 1 MiB in 256 chunks of 4 KiB, and a size that leaves a short last
     * chunk: bytes must come back exactly. */
    static const size_t sizes[] = {1u << 20, 10007};
    for (size_t s = 0; s < SP_ARRAY_LEN(sizes); s++) {
        size_t len = sizes[s];
        uint8_t *body = sp_malloc(len);
        uint32_t x = 2463534242u + (uint32_t)s;
        for (size_t i = 0; i < len; i++) {
            x ^= x << 13, x ^= x >> 17, x ^= x << 5;
            body[i] = (uint8_t)x;
        }
        assert_int_equal(call(c, "echo", body, len, &r), 0);
        assert_int_equal(r.body_len, len);
        assert_memory_equal(r.body, body, len);
        transport_response_free(&r);
        free(body);
    }

    /* The handler saw who called, and every reply body was freed through
     * body_free (ZeroMQ releases the frames asynchronously). */
    pthread_mutex_lock(&hs.lock);
    assert_string_equal(hs.peer_name, "alice");
    assert_string_equal(hs.peer_key, alice_keys.public_z85);
    pthread_mutex_unlock(&hs.lock);
    assert_int_equal(atomic_load(&hs.calls), 5);
    assert_true(wait_for(&hs.body_frees, 3, 2000));
    assert_int_equal(atomic_load(&hs.body_frees), 3);

    transport_client_destroy(&c);
    assert_null(c);
    transport_server_destroy(&srv);
    assert_null(srv);
}

static void test_unlisted_key_refused(void **state)
{
    (void)state;
    transport_config_t cfg;
    server_config(&cfg);
    char ep[256];
    transport_server_t *srv = start_server(&cfg, ep, sizeof ep);

    /* No attempt can time out (NEVER_MS), so only the refusal seen in the
     * handshake can end this call; without that check it would hang. */
    transport_client_t *c = make_client(&mallory_keys, server_keys.public_z85, ep, NEVER_MS, 2);
    transport_response_t r;
    assert_int_equal(call(c, "echo", "hi", 2, &r), SP_EUNAVAIL);
    /* Again, on a fresh socket. */
    assert_int_equal(call(c, "echo", "hi", 2, &r), SP_EUNAVAIL);
    transport_client_destroy(&c);
    assert_int_equal(atomic_load(&hs.calls), 0);

    c = make_client(&alice_keys, server_keys.public_z85, ep, 5000, 0);
    assert_int_equal(call(c, "echo", "hi", 2, &r), 0);
    transport_response_free(&r);
    transport_client_destroy(&c);
    assert_int_equal(atomic_load(&hs.calls), 1);
    transport_server_destroy(&srv);
}

static void test_wrong_server_key(void **state)
{
    (void)state;
    transport_config_t cfg;
    server_config(&cfg);
    char ep[256];
    transport_server_t *srv = start_server(&cfg, ep, sizeof ep);
    /* Alice is listed, but talks to the server with the wrong key. */
    transport_client_t *c = make_client(&alice_keys, mallory_keys.public_z85, ep, 1000, 1);
    transport_response_t r;
    assert_int_equal(call(c, "echo", "hi", 2, &r), SP_EUNAVAIL);
    transport_client_destroy(&c);
    assert_int_equal(atomic_load(&hs.calls), 0);
    transport_server_destroy(&srv);
}

static void test_plain_dealer_ignored(void **state)
{
    (void)state;
    transport_config_t cfg;
    server_config(&cfg);
    char ep[256];
    transport_server_t *srv = start_server(&cfg, ep, sizeof ep);

    void *zctx = zmq_ctx_new();
    void *s = raw_dealer(zctx, ep, NULL);
    uint8_t hdr[20];
    make_hdr(hdr, 1, 7, 1000);
    assert_int_equal(zmq_send(s, hdr, sizeof hdr, ZMQ_SNDMORE), 20);
    assert_int_equal(zmq_send(s, "echo", 4, 0), 4);
    assert_int_equal(raw_recv(s, 700, hdr, NULL, 0), 0);
    zmq_close(s);
    zmq_ctx_term(zctx);
    assert_int_equal(atomic_load(&hs.calls), 0);
    transport_server_destroy(&srv);
}

static void test_body_too_big(void **state)
{
    (void)state;
    transport_config_t cfg;
    server_config(&cfg);
    cfg.max_body_bytes = 64 * 1024;
    char ep[256];
    transport_server_t *srv = start_server(&cfg, ep, sizeof ep);

    /* The client allows 8 MiB, so the server is the one to refuse. */
    transport_client_t *c = make_client(&alice_keys, server_keys.public_z85, ep, 5000, 0);
    size_t len = 200 * 1024;
    uint8_t *body = sp_calloc(1, len);
    transport_response_t r;
    assert_int_equal(call(c, "echo", body, len, &r), SP_ETOOBIG);
    assert_int_equal(atomic_load(&hs.calls), 0);
    /* Exactly at the limit is fine, and the oversized request was drained. */
    assert_int_equal(call(c, "echo", body, cfg.max_body_bytes, &r), 0);
    assert_int_equal(r.body_len, cfg.max_body_bytes);
    transport_response_free(&r);
    assert_int_equal(atomic_load(&hs.calls), 1);

    /* A reply over the server's limit is refused by the server too. */
    hs.big_reply_len = cfg.max_body_bytes + 1;
    assert_int_equal(call(c, "big-reply", NULL, 0, &r), SP_ETOOBIG);
    transport_client_destroy(&c);

    /* A client refuses to send over its own limit. */
    transport_config_t small;
    transport_config_defaults(&small);
    small.max_body_bytes = 1000;
    c = transport_client_new(&small, &alice_keys, server_keys.public_z85, ep);
    assert_non_null(c);
    assert_int_equal(call(c, "echo", body, 1001, &r), SP_ETOOBIG);
    transport_client_destroy(&c);
    assert_int_equal(atomic_load(&hs.calls), 2);
    free(body);
    transport_server_destroy(&srv);
}

static void test_malformed_frame0(void **state)
{
    (void)state;
    transport_config_t cfg;
    server_config(&cfg);
    char ep[256];
    transport_server_t *srv = start_server(&cfg, ep, sizeof ep);

    void *zctx = zmq_ctx_new();
    void *s = raw_dealer(zctx, ep, &alice_keys);
    uint8_t good[20], bad[20], got[20];
    make_hdr(good, 1, 42, 1000);

    /* Each of these gets an SP_EPROTO reply of frame 0 alone. */
    struct {
        const char *what;
        size_t len;
        int patch_at;
        uint8_t patch;
        bool head;
    } cases[] = {
        {"short frame 0", 7, -1, 0, true},
        {"long frame 0", 20, -1, 0, true}, /* sent with 1 extra byte below */
        {"bad magic", 20, 0, 'X', true},
        {"kind reply", 20, 4, 2, true},
        {"kind unknown", 20, 4, 9, true},
        {"reserved byte", 20, 6, 1, true},
        {"no head frame", 20, -1, 0, false},
    };
    for (size_t i = 0; i < SP_ARRAY_LEN(cases); i++) {
        uint8_t frame[21];
        memcpy(frame, good, 20);
        frame[20] = 0;
        size_t len = cases[i].len + (i == 1 ? 1 : 0);
        if (cases[i].patch_at >= 0)
            frame[cases[i].patch_at] = cases[i].patch;
        assert_int_equal(zmq_send(s, frame, len, cases[i].head ? ZMQ_SNDMORE : 0), (int)len);
        if (cases[i].head)
            assert_int_equal(zmq_send(s, "echo", 4, 0), 4);
        int frames = raw_recv(s, 2000, got, NULL, 0);
        if (frames != 1)
            fail_msg("%s: expected an error reply, got %d frames", cases[i].what, frames);
        assert_memory_equal(got, "SPK1\x02\0\0\0", 8);
        assert_int_equal(hdr_status(got), SP_EPROTO);
    }
    /* An empty message, and one frame of garbage: no crash. */
    assert_int_equal(zmq_send(s, "", 0, 0), 0);
    raw_recv(s, 500, got, NULL, 0);
    memset(bad, 0xff, sizeof bad);
    assert_int_equal(zmq_send(s, bad, sizeof bad, 0), 20);
    raw_recv(s, 500, got, NULL, 0);
    assert_int_equal(atomic_load(&hs.calls), 0);

    /* The same connection still gets served, with its request id echoed. */
    char head[16] = "";
    assert_int_equal(zmq_send(s, good, 20, ZMQ_SNDMORE), 20);
    assert_int_equal(zmq_send(s, "echo", 4, ZMQ_SNDMORE), 4);
    assert_int_equal(zmq_send(s, "abc", 3, 0), 3);
    assert_int_equal(raw_recv(s, 2000, got, head, sizeof head), 3);
    assert_int_equal(hdr_id(got), 42);
    assert_int_equal(hdr_status(got), 0);
    assert_string_equal(head, "echo");
    zmq_close(s);
    zmq_ctx_term(zctx);

    transport_client_t *c = make_client(&alice_keys, server_keys.public_z85, ep, 5000, 0);
    transport_response_t r;
    assert_int_equal(call(c, "echo", "ok", 2, &r), 0);
    transport_response_free(&r);
    transport_client_destroy(&c);
    assert_int_equal(atomic_load(&hs.calls), 2);
    transport_server_destroy(&srv);
}

static void test_slow_handler_does_not_block(void **state)
{
    (void)state;
    transport_config_t cfg;
    server_config(&cfg);
    char ep[256];
    transport_server_t *srv = start_server(&cfg, ep, sizeof ep);

    async_call_t slow;
    async_start(&slow, ep, "block", NEVER_MS);
    assert_true(wait_for(&hs.blocked, 1, 5000));

    /* The slow request is held until the gate opens. Queued behind it, the
     * fast one would be answered only after the slow handler left. */
    transport_client_t *c = make_client(&alice_keys, server_keys.public_z85, ep, NEVER_MS, 0);
    transport_response_t r;
    assert_int_equal(call(c, "echo", "fast", 4, &r), 0);
    int released = atomic_load(&hs.released);
    transport_response_free(&r);
    transport_client_destroy(&c);
    if (released != 0)
        fail_msg("the fast request was answered only after the slow one finished");
    gate_set(true);
    assert_int_equal(async_finish(&slow), 0);
    transport_server_destroy(&srv);
}

static void test_expired_request_not_run(void **state)
{
    (void)state;
    transport_config_t cfg;
    server_config(&cfg);
    cfg.workers = 1;
    char ep[256];
    transport_server_t *srv = start_server(&cfg, ep, sizeof ep);

    async_call_t slow;
    async_start(&slow, ep, "block", NEVER_MS);
    assert_true(wait_for(&hs.blocked, 1, 5000));

    /* The only worker is held until the gate opens, longer than this
     * request may wait. */
    transport_client_t *c = make_client(&alice_keys, server_keys.public_z85, ep, 200, 0);
    transport_response_t r;
    assert_int_equal(call(c, "count", NULL, 0, &r), SP_ETIMEOUT);
    transport_client_destroy(&c);

    /* A second request with a 200 ms deadline, from a raw socket that sees
     * the server's own answer: the broker reads it only once the first has
     * left its queue (one slot per worker), so its SP_ETIMEOUT, given while
     * the worker is still held, means both expired without running. */
    void *zctx = zmq_ctx_new();
    void *s = raw_dealer(zctx, ep, &alice_keys);
    uint8_t hdr[20];
    make_hdr(hdr, 1, 9, 200);
    assert_int_equal(zmq_send(s, hdr, sizeof hdr, ZMQ_SNDMORE), 20);
    assert_int_equal(zmq_send(s, "count", 5, 0), 5);
    assert_int_equal(raw_recv(s, 10000, hdr, NULL, 0), 1);
    assert_int_equal(hdr_status(hdr), SP_ETIMEOUT);
    assert_int_equal(hdr_id(hdr), 9);
    assert_int_equal(atomic_load(&hs.released), 0);
    zmq_close(s);
    zmq_ctx_term(zctx);

    gate_set(true);
    assert_int_equal(async_finish(&slow), 0);
    /* Served in arrival order by the one worker: once a later request is
     * answered, an expired one would have run before it, if it wrongly would. */
    c = make_client(&alice_keys, server_keys.public_z85, ep, NEVER_MS, 0);
    assert_int_equal(call(c, "echo", "after", 5, &r), 0);
    transport_response_free(&r);
    transport_client_destroy(&c);
    assert_int_equal(atomic_load(&hs.count_calls), 0);
    transport_server_destroy(&srv);
}

static void test_timeout_then_retry(void **state)
{
    (void)state;
    transport_config_t cfg;
    server_config(&cfg);
    char ep[256];
    transport_server_t *srv = start_server(&cfg, ep, sizeof ep);

    /* The first attempt is held at the gate until the call has returned, so
     * the answer can only have come from the retry. */
    transport_client_t *c = make_client(&alice_keys, server_keys.public_z85, ep, 1000, 2);
    transport_response_t r;
    assert_int_equal(call(c, "block-once", "x", 1, &r), 0);
    assert_int_equal(atomic_load(&hs.released), 0);
    assert_int_equal(r.body_len, 1);
    transport_response_free(&r);
    assert_int_equal(atomic_load(&hs.block_once_seen), 2);
    gate_set(true);

    /* The same client carries on normally afterwards. */
    assert_int_equal(call(c, "echo", "y", 1, &r), 0);
    assert_memory_equal(r.body, "y", 1);
    transport_response_free(&r);
    transport_client_destroy(&c);
    transport_server_destroy(&srv);
}

static void test_timeout_exhausted(void **state)
{
    (void)state;
    transport_config_t cfg;
    server_config(&cfg);
    char ep[256];
    transport_server_t *srv = start_server(&cfg, ep, sizeof ep);

    /* Both attempts are held at the gate: the call gives up before any
     * handler answered, after sending the retry. */
    transport_client_t *c = make_client(&alice_keys, server_keys.public_z85, ep, 200, 1);
    transport_response_t r;
    assert_int_equal(call(c, "block", "x", 1, &r), SP_ETIMEOUT);
    assert_int_equal(atomic_load(&hs.released), 0);
    assert_null(r.head);
    transport_client_destroy(&c);
    gate_set(true);
    transport_server_destroy(&srv); /* waits for both held handlers */
    assert_int_equal(atomic_load(&hs.blocked), 2);
    assert_int_equal(atomic_load(&hs.gate_expired), 0);
}

static void test_unreachable(void **state)
{
    (void)state;
    /* A port that was free a moment ago, with nothing listening on it. */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(fd >= 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t slen = sizeof sa;
    assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&sa, &slen), 0);
    close(fd);
    char ep[64];
    snprintf(ep, sizeof ep, "tcp://127.0.0.1:%u", ntohs(sa.sin_port));

    transport_client_t *c = make_client(&alice_keys, server_keys.public_z85, ep, 200, 1);
    transport_response_t r;
    assert_int_equal(call(c, "echo", NULL, 0, &r), SP_EUNAVAIL);
    transport_client_destroy(&c);
}

typedef struct {
    const char *ep;
    int index;
    int errors;
    pthread_t thread;
} worker_arg_t;

static void *concurrent_main(void *arg)
{
    worker_arg_t *w = arg;
    transport_client_t *c = make_client(&alice_keys, server_keys.public_z85, w->ep, 10000, 0);
    uint8_t *body = sp_malloc(20000);
    for (int i = 0; i < 200; i++) {
        size_t len = (size_t)(i * 97 + w->index * 13) % 20000;
        for (size_t k = 0; k < len; k++)
            body[k] = (uint8_t)(k * 31 + (size_t)i + (size_t)w->index * 7);
        char head[32];
        snprintf(head, sizeof head, "echo %d/%d", w->index, i);
        transport_response_t r;
        int rc = call(c, head, body, len, &r);
        if (rc != 0 || r.head_len != strlen(head) || memcmp(r.head, head, r.head_len) != 0 ||
            r.body_len != len || (len && memcmp(r.body, body, len) != 0))
            w->errors++;
        transport_response_free(&r);
    }
    free(body);
    transport_client_destroy(&c);
    return NULL;
}

static void test_concurrent_clients(void **state)
{
    (void)state;
    transport_config_t cfg;
    server_config(&cfg);
    char ep[256];
    transport_server_t *srv = start_server(&cfg, ep, sizeof ep);
    worker_arg_t w[4];
    for (int i = 0; i < 4; i++) {
        w[i] = (worker_arg_t){.ep = ep, .index = i};
        assert_int_equal(pthread_create(&w[i].thread, NULL, concurrent_main, &w[i]), 0);
    }
    int errors = 0;
    for (int i = 0; i < 4; i++) {
        pthread_join(w[i].thread, NULL);
        errors += w[i].errors;
    }
    assert_int_equal(errors, 0);
    assert_int_equal(atomic_load(&hs.calls), 800);
    transport_server_destroy(&srv);
}

static void test_destroy_finishes_inflight(void **state)
{
    (void)state;
    transport_config_t cfg;
    server_config(&cfg);
    char ep[256];
    transport_server_t *srv = start_server(&cfg, ep, sizeof ep);
    async_call_t slow;
    async_start(&slow, ep, "sleep:500", 5000);
    assert_true(wait_for(&hs.sleepers, 1, 5000));
    transport_server_destroy(&srv);
    /* The handler finished and its reply went out before the server closed. */
    pthread_join(slow.thread, NULL);
    assert_int_equal(slow.rc, 0);
    assert_int_equal(slow.resp.body_len, 1);
    transport_response_free(&slow.resp);
}

static bool accept_not_first(void *ctx, size_t index, const transport_response_t *resp)
{
    (void)ctx;
    return index != 0 && resp->head_len > 0;
}

static void test_call_many(void **state)
{
    (void)state;
    transport_config_t cfg;
    server_config(&cfg);
    char ep[256];
    transport_server_t *srv = start_server(&cfg, ep, sizeof ep);
    transport_client_t *c[4];
    for (int i = 0; i < 3; i++)
        c[i] = make_client(&alice_keys, server_keys.public_z85, ep, 5000, 0);
    c[3] = make_client(&mallory_keys, server_keys.public_z85, ep, 5000, 0);
    static const char *heads[] = {"echo", "echo", "block", "echo"};
    transport_call_t calls[4];
    for (int i = 0; i < 4; i++)
        calls[i] = (transport_call_t){.client = c[i],
                                      .head = (const uint8_t *)heads[i],
                                      .head_len = strlen(heads[i]),
                                      .body = (const uint8_t *)"abc",
                                      .body_len = 3};

    /* Two of four suffice: return without waiting for the slow one, which is
     * held at the gate until after the return (and would have answered, had
     * the call waited GATE_MAX_MS for it). */
    assert_int_equal(transport_call_many(calls, 4, 2, NEVER_MS, NULL, NULL), 2);
    assert_int_equal(atomic_load(&hs.released), 0);
    for (int i = 0; i < 2; i++) {
        assert_int_equal(calls[i].rc, 0);
        assert_int_equal(calls[i].resp.body_len, 3);
        assert_memory_equal(calls[i].resp.body, "abc", 3);
        transport_response_free(&calls[i].resp);
    }
    assert_int_equal(calls[2].rc, SP_ETIMEOUT);
    assert_null(calls[2].resp.head);
    /* Mallory may or may not have been refused before quorum was reached. */
    assert_true(calls[3].rc == SP_EUNAVAIL || calls[3].rc == SP_ETIMEOUT);

    /* Once the slow reply has gone out, the client's next call skips it. */
    assert_true(wait_for(&hs.calls, 3, 3000));
    gate_set(true);
    assert_true(wait_for(&hs.body_frees, 3, 5000)); /* the third echo's body was sent */
    transport_response_t r;
    assert_int_equal(call(c[2], "echo", "next", 4, &r), 0);
    assert_int_equal(r.body_len, 4);
    assert_memory_equal(r.body, "next", 4);
    transport_response_free(&r);

    /* accept() decides what counts; all answered ends the wait early (with
     * NEVER_MS, waiting for the deadline instead would never return). */
    for (int i = 0; i < 3; i++)
        calls[i].head = (const uint8_t *)"echo", calls[i].head_len = 4;
    assert_int_equal(transport_call_many(calls, 3, 3, NEVER_MS, accept_not_first, NULL), 2);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(calls[i].rc, 0);
        transport_response_free(&calls[i].resp);
    }

    /* The same client twice is refused for the second entry; a refused key
     * is reported as such once everything is awaited. */
    calls[1].client = c[0];
    calls[2].client = c[3];
    assert_int_equal(transport_call_many(calls, 3, 3, 5000, NULL, NULL), 1);
    assert_int_equal(calls[0].rc, 0);
    transport_response_free(&calls[0].resp);
    assert_int_equal(calls[1].rc, SP_EINVAL);
    assert_int_equal(calls[2].rc, SP_EUNAVAIL);

    /* Deadline: nothing counts, every request is marked timed out (its
     * handler is held at the gate past the deadline). */
    gate_set(false);
    calls[0].client = c[1];
    calls[0].head = (const uint8_t *)"block";
    calls[0].head_len = 5;
    assert_int_equal(transport_call_many(calls, 1, 1, 200, NULL, NULL), 0);
    assert_int_equal(calls[0].rc, SP_ETIMEOUT);
    gate_set(true);

    for (int i = 0; i < 4; i++)
        transport_client_destroy(&c[i]);
    transport_server_destroy(&srv);
}

static void test_start_errors(void **state)
{
    (void)state;
    transport_config_t cfg;
    server_config(&cfg);
    char ep[256];
    transport_server_t *a = start_server(&cfg, ep, sizeof ep);
    transport_server_t *b = transport_server_new(&cfg, &server_keys, allowed, test_handler, NULL);
    assert_non_null(b);
    assert_true(transport_server_start(b, ep, NULL, 0) < 0); /* port taken */
    assert_true(transport_server_start(b, "nonsense://x", NULL, 0) < 0);
    transport_server_destroy(&b);

    transport_server_t *never =
        transport_server_new(NULL, &server_keys, allowed, test_handler, NULL);
    transport_server_destroy(&never);
    transport_server_destroy(&never);
    assert_null(transport_server_new(&cfg, &server_keys, allowed, NULL, NULL));
    keys_pair_t broken = server_keys;
    broken.secret_z85[3] = '~';
    assert_null(transport_server_new(&cfg, &broken, allowed, test_handler, NULL));
    assert_null(transport_client_new(&cfg, &alice_keys, "not-a-key", ep));

    /* The first server is unaffected. */
    transport_client_t *c = make_client(&alice_keys, server_keys.public_z85, ep, 5000, 0);
    transport_response_t r;
    assert_int_equal(call(c, "echo", "z", 1, &r), 0);
    transport_response_free(&r);
    transport_client_destroy(&c);
    transport_server_destroy(&a);
}

/* Replaces a cluster keys file atomically (temporary file + rename). */
static void replace_keys_file(const char *path, const char *text)
{
    char tmp[256];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    assert_non_null(f);
    assert_int_equal(fputs(text, f) >= 0, 1);
    assert_int_equal(fchmod(fileno(f), 0644), 0);
    assert_int_equal(fclose(f), 0);
    assert_int_equal(rename(tmp, path), 0);
}

/* Calls with a fresh client for kp until the outcome is want (0 or
 * SP_EUNAVAIL) or deadline_ms passed; returns how long that took (for the
 * log only), or -1. */
static int64_t call_until(const keys_pair_t *kp, const char *ep, int want, int deadline_ms)
{
    int64_t t0 = sp_now_ms();
    for (;;) {
        transport_client_t *c = make_client(kp, server_keys.public_z85, ep, 1000, 0);
        transport_response_t r;
        int rc = call(c, "echo", "k", 1, &r);
        if (rc == 0)
            transport_response_free(&r);
        transport_client_destroy(&c);
        int64_t took = sp_now_ms() - t0;
        if (rc == want)
            return took;
        if (took > deadline_ms)
            return -1;
        sleep_ms(50);
    }
}

/* The server's allow-list follows its file: a key appended there is
 * admitted by a running server without a restart, a removed one refused. */
static void test_allowlist_reload(void **state)
{
    (void)state;
    char dir[] = "/tmp/sp-test-transport-XXXXXX";
    assert_non_null(mkdtemp(dir));
    char path[128], text[512], err[512] = "";
    snprintf(path, sizeof path, "%s/cluster.keys", dir);
    snprintf(text, sizeof text, "%s alice\n", alice_keys.public_z85);
    replace_keys_file(path, text);
    keys_allowlist_t *from_file = keys_allowlist_load(path, err, sizeof err);
    assert_non_null(from_file);

    keys_allowlist_t *saved = allowed;
    allowed = from_file; /* start_server() serves the global list */
    transport_config_t cfg;
    server_config(&cfg);
    char ep[256];
    transport_server_t *srv = start_server(&cfg, ep, sizeof ep);
    allowed = saved;

    transport_response_t r;
    transport_client_t *c = make_client(&mallory_keys, server_keys.public_z85, ep, 1000, 0);
    assert_int_equal(call(c, "echo", "hi", 2, &r), SP_EUNAVAIL);
    transport_client_destroy(&c);

    /* Appended: admitted by the running server (the deadline, many reload
     * intervals, only tells "reloaded" from "never reloaded"). */
    snprintf(text, sizeof text, "%s alice\n%s mallory\n", alice_keys.public_z85,
             mallory_keys.public_z85);
    replace_keys_file(path, text);
    int64_t took = call_until(&mallory_keys, ep, 0, 20 * KEYS_RELOAD_INTERVAL_MS);
    print_message("appended key admitted after %lld ms\n", (long long)took);
    assert_true(took >= 0);
    pthread_mutex_lock(&hs.lock);
    assert_string_equal(hs.peer_name, "mallory");
    assert_string_equal(hs.peer_key, mallory_keys.public_z85);
    pthread_mutex_unlock(&hs.lock);

    /* A session opened while the key was listed. */
    transport_client_t *old = make_client(&mallory_keys, server_keys.public_z85, ep, 800, 0);
    assert_int_equal(call(old, "echo", "s", 1, &r), 0);
    transport_response_free(&r);

    /* Removed: new handshakes are refused. */
    snprintf(text, sizeof text, "%s alice\n", alice_keys.public_z85);
    replace_keys_file(path, text);
    took = call_until(&mallory_keys, ep, SP_EUNAVAIL, 20 * KEYS_RELOAD_INTERVAL_MS);
    print_message("removed key refused after %lld ms\n", (long long)took);
    assert_true(took >= 0);

    /* The established session is not torn down (ZeroMQ authenticates at the
     * handshake only), but the broker re-checks every request's key: the
     * request is dropped unanswered, the handler never runs. */
    int calls_before = atomic_load(&hs.calls);
    int rc = call(old, "echo", "s", 1, &r);
    assert_true(rc == SP_ETIMEOUT || rc == SP_EUNAVAIL);
    assert_int_equal(atomic_load(&hs.calls), calls_before);
    transport_client_destroy(&old);

    /* Alice was listed throughout and still is. */
    c = make_client(&alice_keys, server_keys.public_z85, ep, 5000, 0);
    assert_int_equal(call(c, "echo", "a", 1, &r), 0);
    transport_response_free(&r);
    transport_client_destroy(&c);

    transport_server_destroy(&srv);
    keys_allowlist_destroy(&from_file);
    unlink(path);
    assert_int_equal(rmdir(dir), 0);
}

static int group_setup(void **state)
{
    (void)state;
    if (keys_generate(&server_keys) || keys_generate(&alice_keys) || keys_generate(&mallory_keys))
        return -1;
    allowed = keys_allowlist_new();
    return keys_allowlist_add(allowed, alice_keys.public_z85, "alice");
}

static int group_teardown(void **state)
{
    (void)state;
    keys_allowlist_destroy(&allowed);
    return 0;
}

int main(void)
{
    log_init("test_transport", getenv("SP_TEST_LOG") ? LOG_DEBUG : LOG_ERROR);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_unlisted_key_refused),
        cmocka_unit_test(test_wrong_server_key),
        cmocka_unit_test(test_plain_dealer_ignored),
        cmocka_unit_test(test_body_too_big),
        cmocka_unit_test(test_malformed_frame0),
        cmocka_unit_test(test_slow_handler_does_not_block),
        cmocka_unit_test(test_expired_request_not_run),
        cmocka_unit_test(test_timeout_then_retry),
        cmocka_unit_test(test_timeout_exhausted),
        cmocka_unit_test(test_unreachable),
        cmocka_unit_test(test_concurrent_clients),
        cmocka_unit_test(test_destroy_finishes_inflight),
        cmocka_unit_test(test_call_many),
        cmocka_unit_test(test_start_errors),
        cmocka_unit_test(test_allowlist_reload),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
