/* transport.c - CURVE-authenticated request/reply RPC over ZeroMQ (transport.h).
 *
 * A server owns one zmq context and these threads, each the only user of the
 * sockets handed to it (all sockets are made in transport_server_start()
 * and passed on through pthread_create, which is a full memory barrier):
 *   zap     REP on inproc://zeromq.zap.01: admits CURVE keys in the
 *           allow-list, answering with the Z85 key as the ZAP user id. The
 *           allow-list follows its file (keys.h), so a key appended there
 *           is admitted, and a removed one refused, from the next check on
 *           (at most a second later). ZAP is asked only at the handshake:
 *           an established session outlives the removal of its key, but
 *           the broker re-checks the key of every request and drops the
 *           requests of a removed one, and its reconnect is refused.
 *   broker  the TCP ROUTER facing clients ("frontend"), an inproc ROUTER
 *           facing the workers ("backend") and an inproc PAIR on which
 *           transport_server_destroy() says stop. It validates each request
 *           (frame 0, sizes, the peer's key), keeps a short queue of
 *           validated requests stamped with their deadline, and hands the
 *           oldest to the least recently used idle worker.
 *   worker  one DEALER each; joins the body, runs the handler, sends the
 *           reply back through the broker (which marks the worker idle).
 * Internal messages on the backend (after the ROUTER's worker id frame):
 *   broker -> worker  [client id][job_meta_t][frame 0][head][chunk...]
 *   worker -> broker  "R" (ready)  or  "P" [client id][frame 0][head][chunk...]
 *
 * Clients share one process-wide zmq context, made by the first
 * transport_client_new() and terminated by the last transport_client_destroy().
 * Each client owns a DEALER plus a PAIR receiving that DEALER's handshake
 * events from zmq_socket_monitor(), and is used by one thread at a time. */
#include "transport.h"

#include "base.h"
#include "log.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <zmq.h>

/* Declared by zmq.h only under the draft API, but accepted by the released
 * 4.3 library; without it a missing ZAP handler admits everyone. */
#ifndef ZMQ_ZAP_ENFORCE_DOMAIN
#define ZMQ_ZAP_ENFORCE_DOMAIN 93
#endif

#define HDR_LEN 20
#define HDR_MAGIC "SPK1"
#define KIND_REQUEST 1
#define KIND_REPLY 2

#define ZAP_ENDPOINT "inproc://zeromq.zap.01"
#define ZAP_DOMAIN "shardpacs"
#define BACKEND_ENDPOINT "inproc://sp-transport-workers"
#define CONTROL_ENDPOINT "inproc://sp-transport-control"

/* ZMQ_MAXMSGSIZE is checked against the frame as it travels, and CURVE wraps
 * each frame in a MESSAGE command (33 bytes more). Allow some slack so that
 * a frame of exactly max_frame_bytes still passes. */
#define WIRE_SLACK 256
/* No request has this many body frames legitimately (1 GiB in 4 KiB chunks
 * is 262144); past it the request is treated as too big. */
#define MAX_CHUNK_FRAMES (1u << 20)
#define MAX_WORKERS 1024
/* How often a refused key is logged again, at most. */
#define REFUSAL_LOG_MS (10 * 60 * 1000)
/* Consecutive handshakes that fail without a reason before a client gives up
 * (the server closes the connection on a wrong server key). */
#define CLIENT_MAX_BARE_FAILURES 3
/* Internal result of one client attempt that saw no reply in time; distinct
 * from SP_ETIMEOUT, which a server may also send as a status. */
#define ATTEMPT_TIMED_OUT 1
#define REPLY_NOT_OURS 2

/* A ZeroMQ context with one I/O thread per core, 2 to 4: the I/O threads
 * do the CURVE encryption of every frame, and with one thread all of a
 * process's traffic (three replicas' worth on a router) is encrypted on a
 * single core. Each connection stays on one I/O thread, so more threads
 * than a process has busy peers (3 replicas) would only idle. */
static void *transport_context_new(void)
{
    void *ctx = zmq_ctx_new();
    int n = sp_cores();
    if (ctx != NULL)
        zmq_ctx_set(ctx, ZMQ_IO_THREADS, n < 2 ? 2 : n > 4 ? 4 : n);
    return ctx;
}

void transport_config_defaults(transport_config_t *cfg)
{
    cfg->chunk_bytes = 1u << 20;
    cfg->max_frame_bytes = cfg->chunk_bytes + 64 * 1024;
    cfg->max_body_bytes = (size_t)1 << 30;
    cfg->sndhwm = 1000;
    cfg->rcvhwm = 1000;
    cfg->timeout_ms = 10000;
    cfg->retries = 2;
    cfg->workers = 8;
}

/* Replaces zero or nonsensical values with defaults, so that a half-filled
 * configuration still gives a working, bounded transport. */
static void config_normalize(transport_config_t *c)
{
    transport_config_t d;
    transport_config_defaults(&d);
    if (c->chunk_bytes == 0)
        c->chunk_bytes = d.chunk_bytes;
    if (c->max_frame_bytes == 0)
        c->max_frame_bytes = c->chunk_bytes + 64 * 1024;
    if (c->max_frame_bytes > (size_t)INT64_MAX - WIRE_SLACK)
        c->max_frame_bytes = (size_t)INT64_MAX - WIRE_SLACK;
    if (c->chunk_bytes > c->max_frame_bytes)
        c->chunk_bytes = c->max_frame_bytes;
    if (c->max_body_bytes == 0)
        c->max_body_bytes = d.max_body_bytes;
    if (c->sndhwm < 0)
        c->sndhwm = d.sndhwm;
    if (c->rcvhwm < 0)
        c->rcvhwm = d.rcvhwm;
    if (c->timeout_ms <= 0)
        c->timeout_ms = d.timeout_ms;
    if (c->retries < 0)
        c->retries = 0;
    if (c->workers <= 0)
        c->workers = d.workers;
    if (c->workers > MAX_WORKERS)
        c->workers = MAX_WORKERS;
}

/* ---- frame 0 ---------------------------------------------------------- */

typedef struct {
    uint8_t kind;
    uint64_t id;
    uint32_t word; /* request: timeout in ms; reply: status as i32 */
} hdr_t;

static void hdr_encode(uint8_t out[HDR_LEN], uint8_t kind, uint64_t id, uint32_t word)
{
    memcpy(out, HDR_MAGIC, 4);
    out[4] = kind;
    out[5] = out[6] = out[7] = 0;
    for (int i = 0; i < 8; i++)
        out[8 + i] = (uint8_t)(id >> (8 * i));
    for (int i = 0; i < 4; i++)
        out[16 + i] = (uint8_t)(word >> (8 * i));
}

/* Returns 0, or SP_EPROTO with *why set. h->id is filled whenever the magic
 * and length are right, so an error reply can still name the request. */
static int hdr_decode(const zmq_msg_t *msg, hdr_t *h, const char **why)
{
    const uint8_t *p = zmq_msg_data((zmq_msg_t *)msg);
    memset(h, 0, sizeof *h);
    if (zmq_msg_size((zmq_msg_t *)msg) != HDR_LEN) {
        *why = "frame 0 is not 20 bytes";
        return SP_EPROTO;
    }
    if (memcmp(p, HDR_MAGIC, 4) != 0) {
        *why = "bad magic";
        return SP_EPROTO;
    }
    for (int i = 0; i < 8; i++)
        h->id |= (uint64_t)p[8 + i] << (8 * i);
    for (int i = 0; i < 4; i++)
        h->word |= (uint32_t)p[16 + i] << (8 * i);
    h->kind = p[4];
    if (p[5] != 0 || p[6] != 0 || p[7] != 0) {
        *why = "reserved bytes not zero";
        return SP_EPROTO;
    }
    if (h->kind != KIND_REQUEST && h->kind != KIND_REPLY) {
        *why = "unknown kind";
        return SP_EPROTO;
    }
    return 0;
}

static int32_t word_to_status(uint32_t w)
{
    int32_t s;
    memcpy(&s, &w, sizeof s);
    return s;
}

static uint32_t status_to_word(int32_t s)
{
    uint32_t w;
    memcpy(&w, &s, sizeof w);
    return w;
}

/* ---- small zmq helpers ------------------------------------------------ */

/* A growable array of frames. zmq_msg_t may be moved bitwise (zmq_msg_move
 * does the same), so realloc is safe. */
typedef struct {
    zmq_msg_t *v;
    size_t n;
    size_t cap;
} msgvec_t;

static zmq_msg_t *msgvec_push(msgvec_t *mv)
{
    if (mv->n == mv->cap) {
        mv->cap = mv->cap ? mv->cap * 2 : 8;
        mv->v = sp_realloc(mv->v, mv->cap * sizeof *mv->v);
    }
    zmq_msg_t *m = &mv->v[mv->n++];
    zmq_msg_init(m);
    return m;
}

static void msgvec_clear(msgvec_t *mv)
{
    for (size_t i = 0; i < mv->n; i++)
        zmq_msg_close(&mv->v[i]);
    free(mv->v);
    memset(mv, 0, sizeof *mv);
}

/* Receives one frame into a fresh slot. Returns 0 or -errno (slot dropped). */
static int msgvec_recv(msgvec_t *mv, void *sock, int flags)
{
    zmq_msg_t *m = msgvec_push(mv);
    if (zmq_msg_recv(m, sock, flags) < 0) {
        int rc = -errno;
        zmq_msg_close(m);
        mv->n--;
        return rc;
    }
    return 0;
}

static bool sock_more(void *sock)
{
    int more = 0;
    size_t len = sizeof more;
    return zmq_getsockopt(sock, ZMQ_RCVMORE, &more, &len) == 0 && more;
}

/* Reads and discards the remaining frames of the message being received. */
static void drain_rest(void *sock)
{
    while (sock_more(sock)) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        int rc = zmq_msg_recv(&m, sock, 0);
        zmq_msg_close(&m);
        if (rc < 0)
            break;
    }
}

static int send_copy(void *sock, const void *data, size_t len, int flags)
{
    return zmq_send(sock, data, len, flags) < 0 ? -errno : 0;
}

/* Sends msg. Either way msg is left empty (on failure its content is
 * released here), so closing it again later is harmless. Returns 0 or -errno. */
static int send_msg(zmq_msg_t *msg, void *sock, int flags)
{
    if (zmq_msg_send(msg, sock, flags) < 0) {
        int rc = -errno;
        zmq_msg_close(msg);
        zmq_msg_init(msg);
        return rc;
    }
    return 0;
}

static int set_int(void *sock, int option, int value)
{
    return zmq_setsockopt(sock, option, &value, sizeof value);
}

static void close_sock(void **sockp)
{
    if (*sockp != NULL) {
        zmq_close(*sockp);
        *sockp = NULL;
    }
}

/* ---- server ----------------------------------------------------------- */

/* Handed from the broker to a worker with each request (same process, so a
 * plain struct copy; peer_name points into the allow-list). */
typedef struct {
    int64_t deadline_ms;
    const char *peer_name;
    keys_role_t peer_role;
    char peer_key[KEYS_Z85_LEN + 1];
    char peer_addr[64];
} job_meta_t;

typedef struct {
    transport_server_t *srv;
    void *sock;
    int index;
    bool running;
    pthread_t thread;
} worker_t;

struct transport_server {
    transport_config_t cfg;
    keys_pair_t self;
    const keys_allowlist_t *allowed;
    transport_handler_fn handler;
    void *handler_ctx;
    void *zctx;
    char endpoint[256]; /* as bound, for logs */
    bool started;

    void *zap;      /* ZAP thread's REP */
    void *frontend; /* broker's sockets */
    void *backend;
    void *control;
    worker_t *workers;
    int nworkers;

    pthread_t zap_thread;
    pthread_t broker_thread;
    bool zap_running;
    bool broker_running;
};

/* ZAP --------------------------------------------------------------------- */

typedef struct {
    uint8_t key[KEYS_RAW_LEN];
    int64_t logged_ms;
} refusal_t;

/* Refused peers reconnect every few hundred milliseconds; remember the last
 * few refused keys so each is logged once per REFUSAL_LOG_MS, not per try. */
typedef struct {
    refusal_t recent[32];
    size_t next;
} refusal_log_t;

static bool refusal_should_log(refusal_log_t *rl, const uint8_t key[KEYS_RAW_LEN])
{
    int64_t now = sp_now_ms();
    for (size_t i = 0; i < SP_ARRAY_LEN(rl->recent); i++) {
        refusal_t *r = &rl->recent[i];
        if (r->logged_ms != 0 && memcmp(r->key, key, KEYS_RAW_LEN) == 0) {
            if (now - r->logged_ms < REFUSAL_LOG_MS)
                return false;
            r->logged_ms = now;
            return true;
        }
    }
    refusal_t *r = &rl->recent[rl->next++ % SP_ARRAY_LEN(rl->recent)];
    memcpy(r->key, key, KEYS_RAW_LEN);
    r->logged_ms = now;
    return true;
}

static bool frame_is(zmq_msg_t *m, const char *text)
{
    size_t n = strlen(text);
    return zmq_msg_size(m) == n && memcmp(zmq_msg_data(m), text, n) == 0;
}

/* Answers one ZAP request (RFC 27): frames version, request id, domain,
 * address, routing id, mechanism, credentials. Anything but a well-formed
 * CURVE request for our domain with a listed key gets 400. */
static void zap_answer(transport_server_t *srv, refusal_log_t *rl, msgvec_t *req)
{
    const char *status = "400", *text = "malformed ZAP request";
    char user[KEYS_Z85_LEN + 1] = "";
    char addr[64] = "?";
    if (req->n >= 4)
        snprintf(addr, sizeof addr, "%.*s", (int)zmq_msg_size(&req->v[3]),
                 (const char *)zmq_msg_data(&req->v[3]));

    if (req->n == 7 && frame_is(&req->v[0], "1.0") && frame_is(&req->v[2], ZAP_DOMAIN) &&
        frame_is(&req->v[5], "CURVE") && zmq_msg_size(&req->v[6]) == KEYS_RAW_LEN) {
        const uint8_t *key = zmq_msg_data(&req->v[6]);
        const char *name = NULL;
        zmq_z85_encode(user, key, KEYS_RAW_LEN);
        if (keys_allowlist_find_raw(srv->allowed, key, &name)) {
            status = "200";
            text = "OK";
            log_debug("transport %s: admitted %s (%s) from %s", srv->endpoint, name, user, addr);
        } else {
            text = "key not in the allow-list";
            if (refusal_should_log(rl, key))
                log_warn("transport %s: refused CURVE key %s from %s: not in the allow-list",
                         srv->endpoint, user, addr);
            user[0] = '\0';
        }
    } else {
        log_warn("transport %s: malformed ZAP request (%zu frames) for %s", srv->endpoint, req->n,
                 addr);
    }

    /* The reply must echo version and request id, or libzmq drops it. */
    int rc = send_copy(srv->zap, "1.0", 3, ZMQ_SNDMORE);
    if (rc == 0 && req->n >= 2)
        rc = send_copy(srv->zap, zmq_msg_data(&req->v[1]), zmq_msg_size(&req->v[1]), ZMQ_SNDMORE);
    else if (rc == 0)
        rc = send_copy(srv->zap, "", 0, ZMQ_SNDMORE);
    if (rc == 0)
        rc = send_copy(srv->zap, status, 3, ZMQ_SNDMORE);
    if (rc == 0)
        rc = send_copy(srv->zap, text, strlen(text), ZMQ_SNDMORE);
    if (rc == 0)
        rc = send_copy(srv->zap, user, strlen(user), ZMQ_SNDMORE);
    if (rc == 0)
        rc = send_copy(srv->zap, "", 0, 0);
    if (rc != 0 && rc != -ETERM)
        log_error("transport %s: cannot send ZAP reply: %s", srv->endpoint, zmq_strerror(-rc));
}

static void *zap_main(void *arg)
{
    transport_server_t *srv = arg;
    refusal_log_t rl;
    memset(&rl, 0, sizeof rl);
    for (;;) {
        msgvec_t req = {0};
        int rc = msgvec_recv(&req, srv->zap, 0);
        while (rc == 0 && sock_more(srv->zap) && req.n < 16)
            rc = msgvec_recv(&req, srv->zap, 0);
        if (rc == 0)
            drain_rest(srv->zap); /* over 16 frames: answered as malformed */
        if (rc != 0) {
            msgvec_clear(&req);
            if (rc == -EINTR)
                continue;
            if (rc != -ETERM)
                log_error("transport %s: ZAP receive failed: %s", srv->endpoint, zmq_strerror(-rc));
            break;
        }
        zap_answer(srv, &rl, &req);
        msgvec_clear(&req);
    }
    close_sock(&srv->zap);
    return NULL;
}

/* Broker ------------------------------------------------------------------ */

typedef enum { WORKER_STARTING, WORKER_IDLE, WORKER_BUSY } worker_state_t;

typedef struct {
    msgvec_t frames; /* [client id][frame 0][head][chunk...] */
    uint64_t id;
    job_meta_t meta;
} pending_t;

typedef struct {
    transport_server_t *srv;
    worker_state_t *state;
    int *idle; /* FIFO of idle worker indexes: the head is least recently used */
    int idle_head;
    int idle_count;
    int busy;
    pending_t *queue; /* FIFO of validated requests waiting for a worker */
    int qhead;
    int qlen;
    int qcap;
    bool stopping;
} broker_t;

static void worker_id(int index, char out[16])
{
    snprintf(out, 16, "w%d", index);
}

static void broker_make_idle(broker_t *b, int w)
{
    if (b->state[w] == WORKER_IDLE)
        return;
    if (b->state[w] == WORKER_BUSY)
        b->busy--;
    b->state[w] = WORKER_IDLE;
    b->idle[(b->idle_head + b->idle_count) % b->srv->nworkers] = w;
    b->idle_count++;
}

/* Answers a request with a bare status reply [client id][frame 0]. Consumes
 * rid. Never blocks: a client that does not read its replies loses them. */
static void broker_reply_status(broker_t *b, zmq_msg_t *rid, uint64_t id, int status,
                                const char *peer)
{
    uint8_t hdr[HDR_LEN];
    hdr_encode(hdr, KIND_REPLY, id, status_to_word(status));
    int rc = send_msg(rid, b->srv->frontend, ZMQ_SNDMORE | ZMQ_DONTWAIT);
    if (rc == 0)
        rc = send_copy(b->srv->frontend, hdr, sizeof hdr, ZMQ_DONTWAIT);
    if (rc != 0)
        log_info("transport %s: status reply %s for request %" PRIu64 " to %s dropped: %s",
                 b->srv->endpoint, sp_strerror(status), id, peer, zmq_strerror(-rc));
}

static void pending_fail(broker_t *b, pending_t *p, int status)
{
    char peer[160];
    snprintf(peer, sizeof peer, "%s (%s) at %s", p->meta.peer_name, p->meta.peer_key,
             p->meta.peer_addr);
    broker_reply_status(b, &p->frames.v[0], p->id, status, peer);
    msgvec_clear(&p->frames);
}

/* Answers SP_ETIMEOUT for every queued request whose deadline has passed. */
static void broker_expire(broker_t *b)
{
    if (b->qlen == 0)
        return;
    int64_t now = sp_now_ms();
    int kept = 0;
    for (int i = 0; i < b->qlen; i++) {
        pending_t *p = &b->queue[(b->qhead + i) % b->qcap];
        if (p->meta.deadline_ms <= now) {
            log_warn("transport %s: request %" PRIu64 " from %s (%s) expired after waiting "
                     "for a worker; answered without running",
                     b->srv->endpoint, p->id, p->meta.peer_name, p->meta.peer_addr);
            pending_fail(b, p, SP_ETIMEOUT);
        } else {
            /* Compact in place, keeping arrival order. */
            b->queue[(b->qhead + kept++) % b->qcap] = *p;
        }
    }
    b->qlen = kept;
}

/* Milliseconds until the earliest queued deadline, or -1 for none. */
static long broker_poll_timeout(const broker_t *b)
{
    if (b->qlen == 0)
        return -1;
    int64_t first = INT64_MAX;
    for (int i = 0; i < b->qlen; i++) {
        const pending_t *p = &b->queue[(b->qhead + i) % b->qcap];
        if (p->meta.deadline_ms < first)
            first = p->meta.deadline_ms;
    }
    int64_t left = first - sp_now_ms();
    if (left < 0)
        return 0;
    return left > 60000 ? 60000 : (long)left;
}

/* Hands queued requests to idle workers, oldest request to the worker idle
 * the longest. */
static void broker_dispatch(broker_t *b)
{
    transport_server_t *srv = b->srv;
    while (b->qlen > 0 && b->idle_count > 0) {
        pending_t p = b->queue[b->qhead];
        b->qhead = (b->qhead + 1) % b->qcap;
        b->qlen--;
        int w = b->idle[b->idle_head];
        b->idle_head = (b->idle_head + 1) % srv->nworkers;
        b->idle_count--;

        char wid[16];
        worker_id(w, wid);
        int rc = send_copy(srv->backend, wid, strlen(wid), ZMQ_SNDMORE);
        if (rc == 0)
            rc = send_msg(&p.frames.v[0], srv->backend, ZMQ_SNDMORE);
        if (rc == 0)
            rc = send_copy(srv->backend, &p.meta, sizeof p.meta, ZMQ_SNDMORE);
        for (size_t i = 1; rc == 0 && i < p.frames.n; i++)
            rc = send_msg(&p.frames.v[i], srv->backend, i + 1 < p.frames.n ? ZMQ_SNDMORE : 0);
        msgvec_clear(&p.frames);
        if (rc != 0) {
            /* Only on shutdown (ETERM); the request is lost with the server. */
            log_error("transport %s: cannot hand request %" PRIu64 " to worker %d: %s",
                      srv->endpoint, p.id, w, zmq_strerror(-rc));
            b->state[w] = WORKER_STARTING;
            continue;
        }
        b->state[w] = WORKER_BUSY;
        b->busy++;
    }
}

/* Fills meta from the connection's ZAP user id. Returns false (and logs) if
 * the peer is not a listed key, which ZAP ensured at the handshake: this is
 * a second lock on the same door, and the one that stops a session opened
 * before its key was removed from the allow-list. meta->peer_name stays
 * valid while the allow-list lives, across reloads. */
static bool broker_identify(broker_t *b, zmq_msg_t *frame, job_meta_t *meta)
{
    const char *user = zmq_msg_gets(frame, "User-Id");
    const char *addr = zmq_msg_gets(frame, "Peer-Address");
    uint8_t raw[KEYS_RAW_LEN];
    memset(meta, 0, sizeof *meta);
    sp_strlcpy(meta->peer_addr, addr ? addr : "?", sizeof meta->peer_addr);
    if (user == NULL || !keys_z85_valid(user) || zmq_z85_decode(raw, user) == NULL ||
        !keys_allowlist_find_member(b->srv->allowed, raw, &meta->peer_name, &meta->peer_role)) {
        log_error("transport %s: request from %s without a listed key (user id '%.40s', "
                  "removed from the allow-list?); dropped",
                  b->srv->endpoint, meta->peer_addr, user ? user : "");
        return false;
    }
    sp_strlcpy(meta->peer_key, user, sizeof meta->peer_key);
    return true;
}

/* Reads one request from the frontend, validates it, and either queues it or
 * answers it with an error status. */
static void broker_on_request(broker_t *b)
{
    transport_server_t *srv = b->srv;
    pending_t p;
    memset(&p, 0, sizeof p);
    int rc = msgvec_recv(&p.frames, srv->frontend, ZMQ_DONTWAIT);
    if (rc != 0) {
        if (rc != -EAGAIN && rc != -EINTR && rc != -ETERM)
            log_error("transport %s: receive failed: %s", srv->endpoint, zmq_strerror(-rc));
        return;
    }
    if (!sock_more(srv->frontend)) {
        msgvec_clear(&p.frames); /* ROUTER always adds frames; cannot happen */
        return;
    }
    rc = msgvec_recv(&p.frames, srv->frontend, 0);
    if (rc != 0)
        goto drop;
    if (!broker_identify(b, &p.frames.v[1], &p.meta)) {
        drain_rest(srv->frontend);
        goto drop;
    }
    char peer[160];
    snprintf(peer, sizeof peer, "%s (%s) at %s", p.meta.peer_name, p.meta.peer_key,
             p.meta.peer_addr);

    hdr_t h;
    const char *why = NULL;
    rc = hdr_decode(&p.frames.v[1], &h, &why);
    if (rc == 0 && h.kind != KIND_REQUEST) {
        rc = SP_EPROTO;
        why = "frame 0 is not a request";
    }
    if (rc == 0 && !sock_more(srv->frontend)) {
        rc = SP_EPROTO;
        why = "no head frame";
    }
    if (rc != 0) {
        log_warn("transport %s: malformed request %" PRIu64 " from %s: %s", srv->endpoint, h.id,
                 peer, why);
        drain_rest(srv->frontend);
        broker_reply_status(b, &p.frames.v[0], h.id, SP_EPROTO, peer);
        goto drop;
    }
    p.id = h.id;
    rc = msgvec_recv(&p.frames, srv->frontend, 0);
    if (rc != 0)
        goto drop;

    /* Body chunks: count as they come, and stop keeping them once over the
     * limit, so an oversized request is drained rather than held. */
    size_t body = 0;
    bool too_big = false;
    while (sock_more(srv->frontend)) {
        if (too_big) {
            drain_rest(srv->frontend);
            break;
        }
        rc = msgvec_recv(&p.frames, srv->frontend, 0);
        if (rc != 0)
            goto drop;
        body += zmq_msg_size(&p.frames.v[p.frames.n - 1]);
        if (body > srv->cfg.max_body_bytes || p.frames.n - 3 > MAX_CHUNK_FRAMES)
            too_big = true;
    }
    if (too_big) {
        log_warn("transport %s: request %" PRIu64 " from %s has a body over %zu bytes; refused",
                 srv->endpoint, p.id, peer, srv->cfg.max_body_bytes);
        broker_reply_status(b, &p.frames.v[0], p.id, SP_ETOOBIG, peer);
        goto drop;
    }

    /* A timeout of 0 means the caller set no deadline. */
    p.meta.deadline_ms = h.word ? sp_now_ms() + h.word : INT64_MAX;
    b->queue[(b->qhead + b->qlen) % b->qcap] = p;
    b->qlen++;
    return;
drop:
    msgvec_clear(&p.frames);
}

/* Reads one message from a worker: "R" (ready) or "P" and a reply to pass
 * on to the client. Either way the worker is idle afterwards. */
static void broker_on_worker(broker_t *b)
{
    transport_server_t *srv = b->srv;
    msgvec_t m = {0};
    if (msgvec_recv(&m, srv->backend, ZMQ_DONTWAIT) != 0)
        return;
    char wid[16] = "";
    snprintf(wid, sizeof wid, "%.*s", (int)zmq_msg_size(&m.v[0]),
             (const char *)zmq_msg_data(&m.v[0]));
    int w = wid[0] == 'w' ? atoi(wid + 1) : -1;
    if (w < 0 || w >= srv->nworkers || !sock_more(srv->backend) ||
        msgvec_recv(&m, srv->backend, 0) != 0 || zmq_msg_size(&m.v[1]) != 1) {
        /* Our own workers never send this; keep going rather than crash. */
        log_error("transport %s: bad message from worker '%s'", srv->endpoint, wid);
        drain_rest(srv->backend);
        msgvec_clear(&m);
        return;
    }
    char tag = *(const char *)zmq_msg_data(&m.v[1]);
    msgvec_clear(&m);

    if (tag == 'P' && sock_more(srv->backend)) {
        msgvec_t r = {0};
        int rc = msgvec_recv(&r, srv->backend, 0); /* client id */
        if (rc == 0 && sock_more(srv->backend))
            rc = msgvec_recv(&r, srv->backend, 0); /* frame 0 */
        hdr_t h = {0};
        const char *why;
        if (rc == 0 && r.n == 2)
            hdr_decode(&r.v[1], &h, &why);
        int more = sock_more(srv->backend) ? ZMQ_SNDMORE : 0;
        if (rc == 0 && r.n != 2)
            rc = -EPROTO; /* our worker sent no frame 0: cannot happen */
        if (rc == 0)
            rc = send_msg(&r.v[0], srv->frontend, ZMQ_SNDMORE | ZMQ_DONTWAIT);
        if (rc == 0)
            rc = send_msg(&r.v[1], srv->frontend, more | ZMQ_DONTWAIT);
        /* Later frames of a message that has started always go through. */
        while (rc == 0 && more) {
            zmq_msg_t f;
            zmq_msg_init(&f);
            if (zmq_msg_recv(&f, srv->backend, 0) < 0) {
                rc = -errno;
                zmq_msg_close(&f);
                break;
            }
            more = sock_more(srv->backend) ? ZMQ_SNDMORE : 0;
            rc = send_msg(&f, srv->frontend, more | ZMQ_DONTWAIT);
        }
        if (rc != 0) {
            /* EHOSTUNREACH: the client went away (e.g. it timed out and
             * retried on a new connection); EAGAIN: it stopped reading. */
            log_info("transport %s: reply to request %" PRIu64 " dropped: %s", srv->endpoint, h.id,
                     zmq_strerror(-rc));
            drain_rest(srv->backend);
        }
        msgvec_clear(&r);
    } else {
        drain_rest(srv->backend);
    }
    broker_make_idle(b, w);
}

static void broker_on_control(broker_t *b)
{
    zmq_msg_t m;
    zmq_msg_init(&m);
    if (zmq_msg_recv(&m, b->srv->control, ZMQ_DONTWAIT) >= 0)
        drain_rest(b->srv->control);
    zmq_msg_close(&m);
    if (!b->stopping)
        log_info("transport %s: stopping; %d request(s) in progress", b->srv->endpoint, b->busy);
    b->stopping = true;
    /* Queued requests never started; their senders can go elsewhere. */
    while (b->qlen > 0) {
        pending_fail(b, &b->queue[b->qhead], SP_EUNAVAIL);
        b->qhead = (b->qhead + 1) % b->qcap;
        b->qlen--;
    }
}

/* The broker reads the frontend only while its queue has room: one request
 * per worker may wait, stamped with its deadline, and beyond that requests
 * stay in ZeroMQ's per-peer queues (bounded by rcvhwm) and TCP pushes back.
 * Reading a little ahead is what lets the broker see a request's deadline
 * pass while it waits, and answer malformed requests while workers are busy.
 * On stop it keeps forwarding replies until no worker is busy. */
static void *broker_main(void *arg)
{
    transport_server_t *srv = arg;
    broker_t b;
    memset(&b, 0, sizeof b);
    b.srv = srv;
    b.state = sp_calloc((size_t)srv->nworkers, sizeof *b.state);
    b.idle = sp_calloc((size_t)srv->nworkers, sizeof *b.idle);
    b.qcap = srv->nworkers;
    b.queue = sp_calloc((size_t)b.qcap, sizeof *b.queue);

    for (;;) {
        broker_expire(&b);
        broker_dispatch(&b);
        if (b.stopping && b.busy == 0)
            break;
        zmq_pollitem_t items[3] = {
            {srv->control, 0, ZMQ_POLLIN, 0},
            {srv->backend, 0, ZMQ_POLLIN, 0},
            {srv->frontend, 0, ZMQ_POLLIN, 0},
        };
        int nitems = (!b.stopping && b.qlen < b.qcap) ? 3 : 2;
        int rc = zmq_poll(items, nitems, broker_poll_timeout(&b));
        if (rc < 0) {
            if (errno == EINTR)
                continue;
            if (errno != ETERM)
                log_error("transport %s: broker poll failed: %s", srv->endpoint,
                          zmq_strerror(errno));
            break;
        }
        if (items[0].revents & ZMQ_POLLIN)
            broker_on_control(&b);
        if (items[1].revents & ZMQ_POLLIN)
            broker_on_worker(&b);
        if (nitems == 3 && (items[2].revents & ZMQ_POLLIN))
            broker_on_request(&b);
    }

    while (b.qlen > 0) {
        msgvec_clear(&b.queue[b.qhead].frames);
        b.qhead = (b.qhead + 1) % b.qcap;
        b.qlen--;
    }
    free(b.queue);
    free(b.idle);
    free(b.state);
    close_sock(&srv->frontend);
    close_sock(&srv->backend);
    close_sock(&srv->control);
    return NULL;
}

/* Workers ----------------------------------------------------------------- */

/* A body that travels as several zero-copy frames, which ZeroMQ releases
 * one by one, possibly on its I/O thread: the last reference frees it. Reply
 * bodies and shared request bodies (transport_body_t) are both this. */
struct transport_body {
    atomic_size_t refs;
    void *body;
    void (*body_free)(void *body, void *hint);
    void *hint;
    const uint8_t *data; /* the bytes sent: inside body */
    size_t len;
};
typedef struct transport_body body_ref_t;

static void body_ref_release(body_ref_t *ref)
{
    if (atomic_fetch_sub(&ref->refs, 1) != 1)
        return;
    if (ref->body_free != NULL)
        ref->body_free(ref->body, ref->hint);
    else
        free(ref->body);
    free(ref);
}

static void chunk_free(void *data, void *hint)
{
    (void)data;
    body_ref_release(hint);
}

transport_body_t *transport_body_new(void *body, const uint8_t *data, size_t len,
                                     void (*body_free)(void *body, void *hint), void *hint)
{
    SP_ASSERT(body != NULL && data != NULL);
    body_ref_t *ref = sp_calloc(1, sizeof *ref);
    atomic_init(&ref->refs, 1);
    ref->body = body;
    ref->body_free = body_free;
    ref->hint = hint;
    ref->data = data;
    ref->len = len;
    return ref;
}

const uint8_t *transport_body_data(const transport_body_t *b, size_t *len)
{
    *len = b->len;
    return b->data;
}

void transport_body_release(transport_body_t **bp)
{
    if (bp == NULL || *bp == NULL)
        return;
    body_ref_release(*bp);
    *bp = NULL;
}

/* Sends body[0..len) as zero-copy frames of at most chunk bytes, each
 * holding a reference to ref; the last frame goes without ZMQ_SNDMORE.
 * Returns 0 or -errno. */
static int send_chunks(void *sock, body_ref_t *ref, const uint8_t *body, size_t len, size_t chunk)
{
    int rc = 0;
    while (rc == 0 && len > 0) {
        size_t n = len < chunk ? len : chunk;
        zmq_msg_t m;
        atomic_fetch_add(&ref->refs, 1);
        zmq_msg_init_data(&m, (void *)body, n, chunk_free, ref);
        body += n;
        len -= n;
        rc = send_msg(&m, sock, len > 0 ? ZMQ_SNDMORE : 0);
    }
    return rc;
}

static void head_free(void *data, void *hint)
{
    (void)hint;
    free(data);
}

static void reply_free(transport_reply_t *rep)
{
    free(rep->head);
    if (rep->body != NULL) {
        if (rep->body_free != NULL)
            rep->body_free(rep->body, rep->body_hint);
        else
            free(rep->body);
    }
    memset(rep, 0, sizeof *rep);
}

/* Sends "P" [client id][frame 0] and, for status 0, the head and the body in
 * chunk_bytes frames. Takes ownership of rid and of rep's buffers. */
static int worker_send_reply(worker_t *w, zmq_msg_t *rid, uint64_t id, int status,
                             transport_reply_t *rep)
{
    transport_server_t *srv = w->srv;
    uint8_t hdr[HDR_LEN];
    hdr_encode(hdr, KIND_REPLY, id, status_to_word(status));
    int rc = send_copy(w->sock, "P", 1, ZMQ_SNDMORE);
    if (rc == 0)
        rc = send_msg(rid, w->sock, ZMQ_SNDMORE);
    if (rc == 0)
        rc = send_copy(w->sock, hdr, sizeof hdr, status == 0 ? ZMQ_SNDMORE : 0);
    if (rc != 0 || status != 0) {
        reply_free(rep);
        return rc;
    }

    zmq_msg_t m;
    int more = rep->body_len > 0 ? ZMQ_SNDMORE : 0;
    if (rep->head != NULL && rep->head_len > 0) {
        zmq_msg_init_data(&m, rep->head, rep->head_len, head_free, NULL);
    } else {
        free(rep->head);
        zmq_msg_init(&m);
    }
    rep->head = NULL;
    rc = send_msg(&m, w->sock, more);
    if (rep->body_len == 0 || rc != 0) {
        reply_free(rep);
        return rc;
    }

    /* ours until every chunk holds its own reference */
    body_ref_t *ref =
        transport_body_new(rep->body, rep->body, rep->body_len, rep->body_free, rep->body_hint);
    memset(rep, 0, sizeof *rep);
    rc = send_chunks(w->sock, ref, ref->data, ref->len, srv->cfg.chunk_bytes);
    body_ref_release(ref);
    return rc;
}

/* Runs one request: [client id][job_meta_t][frame 0][head][chunk...]. */
static int worker_run(worker_t *w, msgvec_t *job)
{
    transport_server_t *srv = w->srv;
    transport_reply_t rep;
    memset(&rep, 0, sizeof rep);
    hdr_t h = {0};
    const char *why;
    if (job->n < 4 || zmq_msg_size(&job->v[1]) != sizeof(job_meta_t) ||
        hdr_decode(&job->v[2], &h, &why) != 0) {
        /* The broker built this message, so this is our bug, not a peer's. */
        log_error("transport %s: worker %d got a malformed job", srv->endpoint, w->index);
        if (job->n == 0)
            return send_copy(w->sock, "R", 1, 0);
        return worker_send_reply(w, &job->v[0], h.id, SP_EPROTO, &rep);
    }
    job_meta_t meta;
    memcpy(&meta, zmq_msg_data(&job->v[1]), sizeof meta);

    transport_request_t req;
    memset(&req, 0, sizeof req);
    req.id = h.id;
    req.deadline_ms = meta.deadline_ms;
    req.head = zmq_msg_data(&job->v[3]);
    req.head_len = zmq_msg_size(&job->v[3]);
    req.peer_key = meta.peer_key;
    req.peer_name = meta.peer_name;
    req.peer_role = meta.peer_role;
    req.peer_addr = meta.peer_addr;
    uint8_t *joined = NULL;
    if (job->n == 5) {
        req.body = zmq_msg_data(&job->v[4]); /* one chunk: no copy needed */
        req.body_len = zmq_msg_size(&job->v[4]);
    } else if (job->n > 5) {
        for (size_t i = 4; i < job->n; i++)
            req.body_len += zmq_msg_size(&job->v[i]);
        /* Each chunk is released as soon as it is copied, so a large body
         * costs about its size once, not twice. */
        joined = sp_malloc(req.body_len);
        size_t off = 0;
        for (size_t i = 4; i < job->n; i++) {
            size_t n = zmq_msg_size(&job->v[i]);
            if (n)
                memcpy(joined + off, zmq_msg_data(&job->v[i]), n);
            off += n;
            zmq_msg_close(&job->v[i]);
            zmq_msg_init(&job->v[i]);
        }
        req.body = joined;
    }
    if (req.body_len == 0)
        req.body = NULL;

    srv->handler(srv->handler_ctx, &req, &rep);
    free(joined);

    int status = 0;
    if (rep.body_len > 0 && rep.body == NULL) {
        log_error("transport %s: handler returned a %zu-byte body without data (request %" PRIu64
                  " from %s)",
                  srv->endpoint, rep.body_len, h.id, meta.peer_name);
        status = SP_EPROTO;
    } else if (rep.head_len > srv->cfg.max_frame_bytes || rep.body_len > srv->cfg.max_body_bytes) {
        log_error("transport %s: reply to request %" PRIu64 " from %s is over the limits (head "
                  "%zu, body %zu bytes)",
                  srv->endpoint, h.id, meta.peer_name, rep.head_len, rep.body_len);
        status = SP_ETOOBIG;
    }
    return worker_send_reply(w, &job->v[0], h.id, status, &rep);
}

static void *worker_main(void *arg)
{
    worker_t *w = arg;
    int rc = send_copy(w->sock, "R", 1, 0);
    while (rc == 0) {
        msgvec_t job = {0};
        rc = msgvec_recv(&job, w->sock, 0);
        while (rc == 0 && sock_more(w->sock))
            rc = msgvec_recv(&job, w->sock, 0);
        if (rc == 0)
            rc = worker_run(w, &job);
        msgvec_clear(&job);
        if (rc == -EINTR)
            rc = 0;
    }
    if (rc != -ETERM)
        log_error("transport %s: worker %d stopped: %s", w->srv->endpoint, w->index,
                  zmq_strerror(-rc));
    close_sock(&w->sock);
    return NULL;
}

/* Server life cycle ------------------------------------------------------- */

transport_server_t *transport_server_new(const transport_config_t *cfg, const keys_pair_t *self,
                                         const keys_allowlist_t *allowed,
                                         transport_handler_fn handler, void *ctx)
{
    if (self == NULL || !keys_z85_valid(self->public_z85) || !keys_z85_valid(self->secret_z85) ||
        allowed == NULL || handler == NULL) {
        log_error("transport: server needs a valid key pair, an allow-list and a handler");
        return NULL;
    }
    if (!zmq_has("curve")) {
        log_error("transport: this libzmq has no CURVE support");
        return NULL;
    }
    transport_server_t *srv = sp_calloc(1, sizeof *srv);
    if (cfg != NULL)
        srv->cfg = *cfg;
    else
        transport_config_defaults(&srv->cfg);
    config_normalize(&srv->cfg);
    srv->self = *self;
    srv->allowed = allowed;
    srv->handler = handler;
    srv->handler_ctx = ctx;
    srv->nworkers = srv->cfg.workers;
    sp_strlcpy(srv->endpoint, "(not bound)", sizeof srv->endpoint);
    srv->zctx = transport_context_new();
    if (srv->zctx == NULL) {
        log_error("transport: zmq_ctx_new failed: %s", zmq_strerror(errno));
        free(srv);
        return NULL;
    }
    return srv;
}

/* Closes the sockets of threads that are not running (theirs close their
 * own), e.g. after a failed start. */
static void server_close_idle_sockets(transport_server_t *srv)
{
    if (!srv->zap_running)
        close_sock(&srv->zap);
    if (!srv->broker_running) {
        close_sock(&srv->frontend);
        close_sock(&srv->backend);
        close_sock(&srv->control);
    }
    for (int i = 0; srv->workers != NULL && i < srv->nworkers; i++)
        if (!srv->workers[i].running)
            close_sock(&srv->workers[i].sock);
}

/* Stops every running thread: the broker first, through the control socket,
 * so that in-flight handlers finish and their replies go out; then the
 * context is shut down, which wakes idle workers and the ZAP thread with
 * ETERM. */
static void server_stop(transport_server_t *srv)
{
    if (srv->broker_running) {
        void *ctl = zmq_socket(srv->zctx, ZMQ_PAIR);
        if (ctl != NULL) {
            set_int(ctl, ZMQ_LINGER, 0);
            if (zmq_connect(ctl, CONTROL_ENDPOINT) == 0)
                send_copy(ctl, "STOP", 4, ZMQ_DONTWAIT);
            zmq_close(ctl);
        }
        pthread_join(srv->broker_thread, NULL);
        srv->broker_running = false;
    }
    zmq_ctx_shutdown(srv->zctx);
    for (int i = 0; srv->workers != NULL && i < srv->nworkers; i++) {
        if (srv->workers[i].running) {
            pthread_join(srv->workers[i].thread, NULL);
            srv->workers[i].running = false;
        }
    }
    if (srv->zap_running) {
        pthread_join(srv->zap_thread, NULL);
        srv->zap_running = false;
    }
    server_close_idle_sockets(srv);
}

/* Makes and configures the TCP ROUTER, and binds it. Returns 0 or -errno. */
static int server_bind_frontend(transport_server_t *srv, const char *endpoint)
{
    void *s = zmq_socket(srv->zctx, ZMQ_ROUTER);
    if (s == NULL)
        return -errno;
    srv->frontend = s;
    int64_t maxmsg = (int64_t)(srv->cfg.max_frame_bytes + WIRE_SLACK);
    if (set_int(s, ZMQ_LINGER, 0) != 0 || set_int(s, ZMQ_ROUTER_MANDATORY, 1) != 0 ||
        set_int(s, ZMQ_SNDHWM, srv->cfg.sndhwm) != 0 ||
        set_int(s, ZMQ_RCVHWM, srv->cfg.rcvhwm) != 0 ||
        zmq_setsockopt(s, ZMQ_MAXMSGSIZE, &maxmsg, sizeof maxmsg) != 0 ||
        set_int(s, ZMQ_CURVE_SERVER, 1) != 0 ||
        zmq_setsockopt(s, ZMQ_CURVE_SECRETKEY, srv->self.secret_z85, KEYS_Z85_LEN + 1) != 0 ||
        zmq_setsockopt(s, ZMQ_ZAP_DOMAIN, ZAP_DOMAIN, strlen(ZAP_DOMAIN)) != 0) {
        return -errno;
    }
    /* Fail closed: refuse to listen if the library ignores the option. */
    if (set_int(s, ZMQ_ZAP_ENFORCE_DOMAIN, 1) != 0) {
        int rc = -errno;
        log_error("transport: libzmq refuses ZMQ_ZAP_ENFORCE_DOMAIN: %s", zmq_strerror(-rc));
        return rc;
    }
    if (zmq_bind(s, endpoint) != 0)
        return -errno;
    size_t len = sizeof srv->endpoint;
    if (zmq_getsockopt(s, ZMQ_LAST_ENDPOINT, srv->endpoint, &len) != 0)
        sp_strlcpy(srv->endpoint, endpoint, sizeof srv->endpoint);
    return 0;
}

/* Makes every socket before starting any thread, ZAP first: the ZAP handler
 * must be bound before the frontend accepts its first connection. */
static int server_make_sockets(transport_server_t *srv, const char *endpoint)
{
    srv->zap = zmq_socket(srv->zctx, ZMQ_REP);
    if (srv->zap == NULL || set_int(srv->zap, ZMQ_LINGER, 0) != 0 ||
        zmq_bind(srv->zap, ZAP_ENDPOINT) != 0)
        return -errno;

    srv->control = zmq_socket(srv->zctx, ZMQ_PAIR);
    if (srv->control == NULL || set_int(srv->control, ZMQ_LINGER, 0) != 0 ||
        zmq_bind(srv->control, CONTROL_ENDPOINT) != 0)
        return -errno;

    srv->backend = zmq_socket(srv->zctx, ZMQ_ROUTER);
    if (srv->backend == NULL || set_int(srv->backend, ZMQ_LINGER, 0) != 0 ||
        set_int(srv->backend, ZMQ_ROUTER_MANDATORY, 1) != 0 ||
        set_int(srv->backend, ZMQ_SNDHWM, 0) != 0 || set_int(srv->backend, ZMQ_RCVHWM, 0) != 0 ||
        zmq_bind(srv->backend, BACKEND_ENDPOINT) != 0)
        return -errno;

    srv->workers = sp_calloc((size_t)srv->nworkers, sizeof *srv->workers);
    for (int i = 0; i < srv->nworkers; i++) {
        worker_t *w = &srv->workers[i];
        char wid[16];
        worker_id(i, wid);
        w->srv = srv;
        w->index = i;
        w->sock = zmq_socket(srv->zctx, ZMQ_DEALER);
        if (w->sock == NULL || set_int(w->sock, ZMQ_LINGER, 0) != 0 ||
            set_int(w->sock, ZMQ_SNDHWM, 0) != 0 || set_int(w->sock, ZMQ_RCVHWM, 0) != 0 ||
            zmq_setsockopt(w->sock, ZMQ_ROUTING_ID, wid, strlen(wid)) != 0 ||
            zmq_connect(w->sock, BACKEND_ENDPOINT) != 0)
            return -errno;
    }
    return server_bind_frontend(srv, endpoint);
}

int transport_server_start(transport_server_t *srv, const char *endpoint, char *bound,
                           size_t bound_size)
{
    if (srv == NULL || endpoint == NULL || srv->started || srv->zctx == NULL)
        return SP_EINVAL;
    int rc = server_make_sockets(srv, endpoint);
    if (rc != 0) {
        log_error("transport: cannot listen on %s: %s", endpoint, zmq_strerror(-rc));
        goto fail;
    }
    rc = -pthread_create(&srv->zap_thread, NULL, zap_main, srv);
    if (rc != 0)
        goto fail_thread;
    srv->zap_running = true;
    for (int i = 0; i < srv->nworkers; i++) {
        rc = -pthread_create(&srv->workers[i].thread, NULL, worker_main, &srv->workers[i]);
        if (rc != 0)
            goto fail_thread;
        srv->workers[i].running = true;
    }
    rc = -pthread_create(&srv->broker_thread, NULL, broker_main, srv);
    if (rc != 0)
        goto fail_thread;
    srv->broker_running = true;
    srv->started = true;
    if (bound != NULL)
        sp_strlcpy(bound, srv->endpoint, bound_size);
    log_info("transport: listening on %s with %d workers", srv->endpoint, srv->nworkers);
    return 0;

fail_thread:
    log_error("transport: cannot start threads for %s: %s", endpoint, strerror(-rc));
fail:
    server_stop(srv);
    free(srv->workers);
    srv->workers = NULL;
    /* The context was shut down by server_stop; a later start needs a new
     * one (if that fails too, start keeps answering SP_EINVAL). */
    zmq_ctx_term(srv->zctx);
    srv->zctx = transport_context_new();
    return rc;
}

void transport_server_destroy(transport_server_t **srvp)
{
    if (srvp == NULL || *srvp == NULL)
        return;
    transport_server_t *srv = *srvp;
    if (srv->zctx != NULL) {
        server_stop(srv);
        zmq_ctx_term(srv->zctx);
    }
    if (srv->started)
        log_info("transport: %s closed", srv->endpoint);
    free(srv->workers);
    explicit_bzero(&srv->self, sizeof srv->self);
    free(srv);
    *srvp = NULL;
}

/* ---- client ----------------------------------------------------------- */

static pthread_mutex_t client_ctx_lock = PTHREAD_MUTEX_INITIALIZER;
static void *client_ctx;
static unsigned client_ctx_refs;
static atomic_uint client_monitor_seq;

static void *client_ctx_acquire(void)
{
    pthread_mutex_lock(&client_ctx_lock);
    if (client_ctx == NULL)
        client_ctx = transport_context_new();
    void *ctx = client_ctx;
    if (ctx != NULL)
        client_ctx_refs++;
    pthread_mutex_unlock(&client_ctx_lock);
    return ctx;
}

static void client_ctx_release(void)
{
    pthread_mutex_lock(&client_ctx_lock);
    if (--client_ctx_refs == 0) {
        zmq_ctx_term(client_ctx); /* every client socket is closed by now */
        client_ctx = NULL;
    }
    pthread_mutex_unlock(&client_ctx_lock);
}

struct transport_client {
    transport_config_t cfg;
    keys_pair_t self;
    char server_key[KEYS_Z85_LEN + 1];
    char *endpoint;
    void *zctx;
    void *sock;        /* DEALER; NULL until needed, and after a failed attempt */
    void *mon;         /* PAIR receiving sock's handshake events */
    bool up;           /* a session is established on sock now */
    bool ever_up;      /* a handshake has ever succeeded on sock */
    int bare_failures; /* consecutive handshake failures without a reason */
    uint64_t next_id;
};

transport_client_t *transport_client_new(const transport_config_t *cfg, const keys_pair_t *self,
                                         const char *server_public_z85, const char *endpoint)
{
    if (self == NULL || !keys_z85_valid(self->public_z85) || !keys_z85_valid(self->secret_z85) ||
        !keys_z85_valid(server_public_z85) || endpoint == NULL) {
        log_error("transport: client for %s needs a valid key pair and server key",
                  endpoint ? endpoint : "(null)");
        return NULL;
    }
    void *zctx = client_ctx_acquire();
    if (zctx == NULL) {
        log_error("transport: zmq_ctx_new failed: %s", zmq_strerror(errno));
        return NULL;
    }
    transport_client_t *c = sp_calloc(1, sizeof *c);
    if (cfg != NULL)
        c->cfg = *cfg;
    else
        transport_config_defaults(&c->cfg);
    config_normalize(&c->cfg);
    c->self = *self;
    memcpy(c->server_key, server_public_z85, sizeof c->server_key);
    c->endpoint = sp_strdup(endpoint);
    c->zctx = zctx;
    /* Ids need only differ between calls on one socket; starting from the
     * clock makes logs from different runs easier to tell apart. */
    c->next_id = ((uint64_t)sp_wall_ms() << 16) ^ (uint64_t)(uintptr_t)c;
    return c;
}

static void client_close(transport_client_t *c)
{
    if (c->sock != NULL)
        zmq_socket_monitor(c->sock, NULL, 0);
    close_sock(&c->mon);
    close_sock(&c->sock);
    c->up = false;
    c->ever_up = false;
    c->bare_failures = 0;
}

/* Makes a fresh DEALER and its monitor, then connects. ZMQ_IMMEDIATE stays
 * off: there is one server per socket and a fresh socket per attempt, so the
 * request should wait in the socket until the handshake completes rather
 * than fail to send; the monitor tells us if it never will. */
static int client_open(transport_client_t *c)
{
    int rc = 0;
    int64_t maxmsg = (int64_t)(c->cfg.max_frame_bytes + WIRE_SLACK);
    c->sock = zmq_socket(c->zctx, ZMQ_DEALER);
    if (c->sock == NULL || set_int(c->sock, ZMQ_LINGER, 0) != 0 ||
        set_int(c->sock, ZMQ_IMMEDIATE, 0) != 0 ||
        set_int(c->sock, ZMQ_SNDHWM, c->cfg.sndhwm) != 0 ||
        set_int(c->sock, ZMQ_RCVHWM, c->cfg.rcvhwm) != 0 ||
        zmq_setsockopt(c->sock, ZMQ_MAXMSGSIZE, &maxmsg, sizeof maxmsg) != 0 ||
        zmq_setsockopt(c->sock, ZMQ_CURVE_SERVERKEY, c->server_key, KEYS_Z85_LEN + 1) != 0 ||
        zmq_setsockopt(c->sock, ZMQ_CURVE_PUBLICKEY, c->self.public_z85, KEYS_Z85_LEN + 1) != 0 ||
        zmq_setsockopt(c->sock, ZMQ_CURVE_SECRETKEY, c->self.secret_z85, KEYS_Z85_LEN + 1) != 0) {
        rc = -errno;
        goto fail;
    }
    /* The monitor PAIR must be connected before the DEALER connects, or the
     * first handshake's events are dropped. */
    char addr[64];
    snprintf(addr, sizeof addr, "inproc://sp-transport-monitor-%u",
             atomic_fetch_add(&client_monitor_seq, 1));
    if (zmq_socket_monitor(c->sock, addr,
                           ZMQ_EVENT_HANDSHAKE_SUCCEEDED | ZMQ_EVENT_HANDSHAKE_FAILED_AUTH |
                               ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL |
                               ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL | ZMQ_EVENT_DISCONNECTED |
                               ZMQ_EVENT_CONNECT_RETRIED) != 0) {
        rc = -errno;
        goto fail;
    }
    c->mon = zmq_socket(c->zctx, ZMQ_PAIR);
    if (c->mon == NULL || set_int(c->mon, ZMQ_LINGER, 0) != 0 || zmq_connect(c->mon, addr) != 0) {
        rc = -errno;
        goto fail;
    }
    if (zmq_connect(c->sock, c->endpoint) != 0) {
        rc = -errno;
        log_error("transport: cannot connect to %s: %s", c->endpoint, zmq_strerror(-rc));
        client_close(c);
        return rc == -EINVAL ? SP_EINVAL : SP_EUNAVAIL;
    }
    return 0;
fail:
    log_error("transport: cannot make a socket for %s: %s", c->endpoint, zmq_strerror(-rc));
    client_close(c);
    return SP_EUNAVAIL;
}

/* Reads pending handshake events. Returns 0, or SP_EUNAVAIL when the server
 * refused us (ZAP said no, the handshake broke, or it keeps being cut off
 * without a reason, as happens with a wrong server key). */
static int client_read_events(transport_client_t *c)
{
    for (;;) {
        msgvec_t ev = {0};
        if (msgvec_recv(&ev, c->mon, ZMQ_DONTWAIT) != 0) {
            msgvec_clear(&ev);
            return 0;
        }
        while (sock_more(c->mon) && ev.n < 2)
            msgvec_recv(&ev, c->mon, 0);
        drain_rest(c->mon);
        if (zmq_msg_size(&ev.v[0]) < 6) {
            msgvec_clear(&ev);
            continue;
        }
        const uint8_t *d = zmq_msg_data(&ev.v[0]);
        uint16_t event;
        uint32_t value;
        memcpy(&event, d, sizeof event);
        memcpy(&value, d + 2, sizeof value);
        msgvec_clear(&ev);

        switch (event) {
        case ZMQ_EVENT_HANDSHAKE_SUCCEEDED:
            c->up = c->ever_up = true;
            c->bare_failures = 0;
            break;
        case ZMQ_EVENT_DISCONNECTED: c->up = false; break;
        case ZMQ_EVENT_CONNECT_RETRIED:
            /* A socket that never had a session was refused: nothing is
             * listening there, so waiting out the deadline would only delay
             * the caller's fallback to other replicas. (Once a session
             * existed, a reply may still be on its way: wait for it.) */
            if (!c->ever_up) {
                log_warn("transport: cannot connect to %s (connection refused or unreachable)",
                         c->endpoint);
                return SP_EUNAVAIL;
            }
            break;
        case ZMQ_EVENT_HANDSHAKE_FAILED_AUTH:
            log_error("transport: %s refused our key %s (ZAP status %u); is it in the "
                      "server's allow-list?",
                      c->endpoint, c->self.public_z85, value);
            return SP_EUNAVAIL;
        case ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL:
            log_error("transport: CURVE handshake with %s failed (protocol error 0x%x)",
                      c->endpoint, value);
            return SP_EUNAVAIL;
        case ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            if (++c->bare_failures >= CLIENT_MAX_BARE_FAILURES) {
                log_error("transport: CURVE handshake with %s failed %d times in a row; wrong "
                          "server key %s, or not a ShardPACS server?",
                          c->endpoint, c->bare_failures, c->server_key);
                return SP_EUNAVAIL;
            }
            break;
        default: break;
        }
    }
}

/* Sends frame 0, the head and the body in chunks. A plain body is copied:
 * after a timeout the socket is closed while ZeroMQ may still hold the
 * frames, and the caller's buffer must be free to go when transport_call()
 * returns. A shared body (transport_body_t) goes without copies: each frame
 * holds a reference, so the bytes live as long as ZeroMQ needs them. */
static int client_send(transport_client_t *c, uint64_t id, int timeout_ms, const uint8_t *head,
                       size_t head_len, const uint8_t *body, size_t body_len,
                       transport_body_t *shared)
{
    uint8_t hdr[HDR_LEN];
    hdr_encode(hdr, KIND_REQUEST, id, (uint32_t)timeout_ms);
    int rc = send_copy(c->sock, hdr, sizeof hdr, ZMQ_SNDMORE | ZMQ_DONTWAIT);
    if (rc == 0)
        rc = send_copy(c->sock, head, head_len, body_len ? ZMQ_SNDMORE : 0);
    if (shared != NULL)
        return rc == 0 ? send_chunks(c->sock, shared, body, body_len, c->cfg.chunk_bytes) : rc;
    for (size_t off = 0; rc == 0 && off < body_len;) {
        size_t n = body_len - off < c->cfg.chunk_bytes ? body_len - off : c->cfg.chunk_bytes;
        rc = send_copy(c->sock, body + off, n, off + n < body_len ? ZMQ_SNDMORE : 0);
        off += n;
    }
    return rc;
}

/* Reads one reply. Returns 0 with *out filled, REPLY_NOT_OURS for a reply
 * to another request id (discarded), or an error code. */
static int client_recv_reply(transport_client_t *c, uint64_t id, transport_response_t *out)
{
    msgvec_t f = {0};
    int rc = msgvec_recv(&f, c->sock, ZMQ_DONTWAIT);
    if (rc == -EAGAIN || rc == -EINTR) {
        msgvec_clear(&f);
        return REPLY_NOT_OURS;
    }
    if (rc != 0) {
        msgvec_clear(&f);
        log_error("transport: receive from %s failed: %s", c->endpoint, zmq_strerror(-rc));
        return SP_EUNAVAIL;
    }
    hdr_t h;
    const char *why = NULL;
    rc = hdr_decode(&f.v[0], &h, &why);
    if (rc == 0 && h.kind != KIND_REPLY) {
        rc = SP_EPROTO;
        why = "frame 0 is not a reply";
    }
    if (rc != 0) {
        log_warn("transport: malformed reply from %s: %s", c->endpoint, why);
        goto out;
    }
    if (h.id != id) {
        log_debug("transport: discarded reply to old request %" PRIu64 " from %s", h.id,
                  c->endpoint);
        rc = REPLY_NOT_OURS;
        goto out;
    }
    int32_t status = word_to_status(h.word);
    if (status != 0) {
        rc = status < 0 ? status : SP_EPROTO;
        goto out;
    }
    if (!sock_more(c->sock)) {
        log_warn("transport: reply %" PRIu64 " from %s has no head frame", id, c->endpoint);
        rc = SP_EPROTO;
        goto out;
    }
    rc = msgvec_recv(&f, c->sock, 0);
    size_t body_len = 0;
    while (rc == 0 && sock_more(c->sock)) {
        rc = msgvec_recv(&f, c->sock, 0);
        if (rc != 0)
            break;
        body_len += zmq_msg_size(&f.v[f.n - 1]);
        if (body_len > c->cfg.max_body_bytes || f.n - 2 > MAX_CHUNK_FRAMES) {
            log_warn("transport: reply %" PRIu64 " from %s has a body over %zu bytes", id,
                     c->endpoint, c->cfg.max_body_bytes);
            rc = SP_ETOOBIG;
        }
    }
    if (rc != 0) {
        if (rc != SP_ETOOBIG) {
            log_error("transport: receive from %s failed: %s", c->endpoint, zmq_strerror(-rc));
            rc = SP_EUNAVAIL;
        }
        goto out;
    }
    out->head_len = zmq_msg_size(&f.v[1]);
    out->head = out->head_len ? sp_memdup(zmq_msg_data(&f.v[1]), out->head_len) : NULL;
    out->body_len = body_len;
    if (body_len > 0) {
        out->body = sp_malloc(body_len);
        size_t off = 0;
        for (size_t i = 2; i < f.n; i++) {
            size_t n = zmq_msg_size(&f.v[i]);
            if (n)
                memcpy(out->body + off, zmq_msg_data(&f.v[i]), n);
            off += n;
        }
    }
out:
    drain_rest(c->sock);
    msgvec_clear(&f);
    return rc;
}

/* Waits for the reply to id until deadline. Returns 0, ATTEMPT_TIMED_OUT or
 * an error code. */
static int client_wait(transport_client_t *c, uint64_t id, int64_t deadline,
                       transport_response_t *out)
{
    for (;;) {
        int64_t left = deadline - sp_now_ms();
        if (left <= 0)
            return ATTEMPT_TIMED_OUT;
        zmq_pollitem_t items[2] = {
            {c->sock, 0, ZMQ_POLLIN, 0},
            {c->mon, 0, ZMQ_POLLIN, 0},
        };
        if (zmq_poll(items, 2, (long)left) < 0) {
            if (errno == EINTR)
                continue;
            log_error("transport: poll for %s failed: %s", c->endpoint, zmq_strerror(errno));
            return SP_EUNAVAIL;
        }
        if (items[1].revents & ZMQ_POLLIN) {
            int rc = client_read_events(c);
            if (rc != 0)
                return rc;
        }
        if (items[0].revents & ZMQ_POLLIN) {
            int rc = client_recv_reply(c, id, out);
            if (rc != REPLY_NOT_OURS)
                return rc;
        }
    }
}

/* Checks a request against the client's own limits. */
static int client_check_request(transport_client_t *c, const uint8_t *head, size_t head_len,
                                const uint8_t *body, size_t body_len)
{
    if ((head == NULL && head_len > 0) || (body == NULL && body_len > 0))
        return SP_EINVAL;
    if (head_len > c->cfg.max_frame_bytes || body_len > c->cfg.max_body_bytes) {
        log_error("transport: request to %s over the limits (head %zu, body %zu bytes)",
                  c->endpoint, head_len, body_len);
        return SP_ETOOBIG;
    }
    return 0;
}

/* Opens the socket if there is none and sends one request under a fresh id.
 * Returns 0 with *id set, or SP_EUNAVAIL (socket closed again) or SP_EINVAL. */
static int client_start(transport_client_t *c, const uint8_t *head, size_t head_len,
                        const uint8_t *body, size_t body_len, transport_body_t *shared,
                        int timeout_ms, uint64_t *id)
{
    int rc = c->sock == NULL ? client_open(c) : 0;
    if (rc != 0)
        return rc;
    rc = client_read_events(c); /* e.g. a refusal since the last call */
    *id = c->next_id++;
    if (rc == 0) {
        rc = client_send(c, *id, timeout_ms, head, head_len, body, body_len, shared);
        if (rc != 0) {
            log_error("transport: cannot send to %s: %s", c->endpoint, zmq_strerror(-rc));
            rc = SP_EUNAVAIL;
        }
    }
    if (rc != 0)
        client_close(c);
    return rc;
}

int transport_call(transport_client_t *c, const uint8_t *head, size_t head_len, const uint8_t *body,
                   size_t body_len, int timeout_ms, transport_response_t *out)
{
    memset(out, 0, sizeof *out);
    int rc = client_check_request(c, head, head_len, body, body_len);
    if (rc != 0)
        return rc;
    if (timeout_ms <= 0)
        timeout_ms = c->cfg.timeout_ms;

    int attempts = 1 + c->cfg.retries;
    bool reached = false;
    for (int attempt = 1; attempt <= attempts; attempt++) {
        uint64_t id;
        rc = client_start(c, head, head_len, body, body_len, NULL, timeout_ms, &id);
        if (rc != 0)
            return rc;
        rc = client_wait(c, id, sp_now_ms() + timeout_ms, out);
        if (rc != ATTEMPT_TIMED_OUT) {
            if (rc == SP_EUNAVAIL)
                client_close(c);
            return rc;
        }
        reached = c->up;
        log_warn("transport: no reply from %s within %d ms (request %" PRIu64
                 ", attempt %d of %d)%s",
                 c->endpoint, timeout_ms, id, attempt, attempts, reached ? "" : "; not connected");
        /* A fresh socket: the old one may hold a dead connection, and late
         * replies to this attempt die with it. */
        client_close(c);
    }
    if (!reached) {
        log_error("transport: %s unreachable after %d attempts", c->endpoint, attempts);
        return SP_EUNAVAIL;
    }
    return SP_ETIMEOUT;
}

/* One poll over every outstanding request's socket and monitor. A client
 * whose request was answered, or which returned early because enough others
 * were, keeps its socket: a late reply carries an old id and its next call
 * discards it. Only requests still unanswered at the deadline get a fresh
 * socket next time, as after a transport_call() timeout. */
size_t transport_call_many(transport_call_t *calls, size_t n, size_t need, int timeout_ms,
                           transport_accept_fn accept, void *ctx)
{
    if (n == 0)
        return 0;
    uint64_t *ids = sp_calloc(n, sizeof *ids);
    bool *waiting = sp_calloc(n, sizeof *waiting);
    zmq_pollitem_t *items = sp_calloc(2 * n, sizeof *items);
    size_t *owner = sp_calloc(2 * n, sizeof *owner);
    size_t outstanding = 0, accepted = 0;
    if (timeout_ms <= 0)
        timeout_ms = calls[0].client ? calls[0].client->cfg.timeout_ms : 10000;
    int64_t deadline = sp_now_ms() + timeout_ms;

    for (size_t i = 0; i < n; i++) {
        transport_call_t *call = &calls[i];
        memset(&call->resp, 0, sizeof call->resp);
        call->rc = call->client ? 0 : SP_EINVAL;
        for (size_t j = 0; call->rc == 0 && j < i; j++)
            if (calls[j].client == call->client)
                call->rc = SP_EINVAL; /* one socket cannot carry two waits */
        const uint8_t *body = call->body;
        size_t body_len = call->body_len;
        if (call->shared != NULL)
            body = transport_body_data(call->shared, &body_len);
        if (call->rc == 0)
            call->rc =
                client_check_request(call->client, call->head, call->head_len, body, body_len);
        if (call->rc == 0)
            call->rc = client_start(call->client, call->head, call->head_len, body, body_len,
                                    call->shared, timeout_ms, &ids[i]);
        if (call->rc == 0) {
            call->rc = SP_ETIMEOUT; /* until answered */
            waiting[i] = true;
            outstanding++;
        }
    }

    while (outstanding > 0 && accepted < need) {
        int64_t left = deadline - sp_now_ms();
        if (left <= 0)
            break;
        int nitems = 0;
        for (size_t i = 0; i < n; i++) {
            if (!waiting[i])
                continue;
            items[nitems] = (zmq_pollitem_t){calls[i].client->sock, 0, ZMQ_POLLIN, 0};
            owner[nitems++] = i;
            items[nitems] = (zmq_pollitem_t){calls[i].client->mon, 0, ZMQ_POLLIN, 0};
            owner[nitems++] = i;
        }
        if (zmq_poll(items, nitems, (long)left) < 0) {
            if (errno == EINTR)
                continue;
            log_error("transport: poll failed: %s", zmq_strerror(errno));
            break;
        }
        for (int k = 0; k < nitems; k++) {
            size_t i = owner[k];
            transport_call_t *call = &calls[i];
            if (!waiting[i] || !(items[k].revents & ZMQ_POLLIN))
                continue;
            int rc;
            if (k % 2 == 1) {
                rc = client_read_events(call->client);
                if (rc == 0)
                    continue;
            } else {
                rc = client_recv_reply(call->client, ids[i], &call->resp);
                if (rc == REPLY_NOT_OURS)
                    continue;
            }
            waiting[i] = false;
            outstanding--;
            call->rc = rc;
            if (rc == SP_EUNAVAIL)
                client_close(call->client);
            if (rc == 0 && (accept == NULL || accept(ctx, i, &call->resp)))
                accepted++;
        }
    }

    bool timed_out = sp_now_ms() >= deadline;
    for (size_t i = 0; i < n; i++) {
        if (waiting[i] && timed_out) {
            log_warn("transport: no reply from %s within %d ms (request %" PRIu64 ")%s",
                     calls[i].client->endpoint, timeout_ms, ids[i],
                     calls[i].client->up ? "" : "; not connected");
            client_close(calls[i].client);
        }
    }
    free(owner);
    free(items);
    free(waiting);
    free(ids);
    return accepted;
}

void transport_response_free(transport_response_t *r)
{
    if (r == NULL)
        return;
    free(r->head);
    free(r->body);
    memset(r, 0, sizeof *r);
}

void transport_client_destroy(transport_client_t **cp)
{
    if (cp == NULL || *cp == NULL)
        return;
    transport_client_t *c = *cp;
    client_close(c);
    free(c->endpoint);
    explicit_bzero(&c->self, sizeof c->self);
    free(c);
    client_ctx_release();
    *cp = NULL;
}
