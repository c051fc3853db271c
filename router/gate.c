/* gate.c - the DICOM front door's gatekeeper (see gate.h): a PDU stream
 * tracker that says when a whole unit of work is buffered, and an epoll loop
 * that holds every connection no worker is serving until it has one.
 *
 * Threads: one loop thread per gate owns the pending (new) and parked
 * connections: their buffers, trackers and epoll registrations. A served
 * connection belongs to the owner's thread that received it. g->mu guards
 * the connection list, the state field of every connection, the per-address
 * counts and the list of connections being parked; callbacks are always
 * called without it.
 *
 * Ownership: the gate owns every socket it was given until gate_conn_close()
 * closes it, and the SSL object of a TLS connection with it; the owner of a
 * served connection owns only its association handle.
 *
 * TLS: every read and write goes through conn_recv()/conn_send(), which use
 * read()/send() on a plain connection and SSL_read()/SSL_write() on a TLS
 * one, never block, and say which readiness (POLLIN or POLLOUT) to wait for
 * when they cannot go on: OpenSSL may need to write while reading (alerts,
 * key updates) and to read while writing. Waits are epoll in the loop and
 * poll() on the owner's thread; both first let OpenSSL use the bytes it
 * already holds, as those never make the socket readable again. */
#define _GNU_SOURCE /* accept4 */
#include "gate.h"

#include "../common/base.h"
#include "../common/log.h"
#include "tls.h"

#include <openssl/err.h>
#include <openssl/ssl.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

/* ---- PDU stream tracker ------------------------------------------------- */

#define PDU_ASSOC_RQ 0x01
#define PDU_DATA 0x04
#define PDU_RELEASE_RQ 0x05
#define PDU_RELEASE_RP 0x06
#define PDU_ABORT 0x07

/* The fixed part of an A-ASSOCIATE-RQ (protocol version, reserved, called
 * and calling AE titles, reserved): anything shorter is not one. */
#define ASSOC_RQ_FIXED 68u

/* CommandDataSetType value meaning "no data set follows". */
#define DATASET_NULL 0x0101

static uint32_t be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint32_t le32(const uint8_t *p)
{
    return (uint32_t)p[3] << 24 | (uint32_t)p[2] << 16 | (uint32_t)p[1] << 8 | p[0];
}

void gate_tracker_init(gate_tracker_t *t, gate_expect_t expect, size_t max_pdu, size_t handoff)
{
    memset(t, 0, sizeof(*t));
    t->expect = expect;
    t->max_pdu = max_pdu;
    t->handoff = handoff;
    t->result = GATE_MORE;
}

/* Checks a PDU header against what may come next; sets up its body. */
static int tracker_pdu_start(gate_tracker_t *t)
{
    uint8_t type = t->hdr[0];
    uint32_t len = be32(t->hdr + 2);
    if (t->expect == GATE_EXPECT_ASSOC_RQ) {
        if (type != PDU_ASSOC_RQ)
            return SP_EPROTO;
        if (len < ASSOC_RQ_FIXED)
            return SP_EPROTO;
        if (len > GATE_MAX_ASSOC_RQ)
            return SP_ETOOBIG;
    } else if (type == PDU_DATA) {
        /* A P-DATA-TF carries at least one PDV item header. */
        if (len < 6)
            return SP_EPROTO;
        if (len > t->max_pdu)
            return SP_ETOOBIG;
    } else if (type == PDU_RELEASE_RQ || type == PDU_RELEASE_RP || type == PDU_ABORT) {
        if (len > GATE_MAX_SMALL_PDU)
            return SP_ETOOBIG;
    } else {
        return SP_EPROTO;
    }
    t->pdu_type = type;
    t->pdu_left = len;
    t->item_len = 0;
    return GATE_MORE;
}

/* Follows the command set's elements (implicit VR little endian: group,
 * element, 4-byte length, value) just far enough to read
 * CommandDataSetType, which says whether a data set follows. */
static void tracker_command_bytes(gate_tracker_t *t, const uint8_t *p, size_t k)
{
    while (k > 0) {
        if (t->elem_len < 8) {
            t->elem[t->elem_len++] = *p++;
            k--;
            if (t->elem_len == 8) {
                uint16_t group = (uint16_t)(t->elem[0] | t->elem[1] << 8);
                uint16_t element = (uint16_t)(t->elem[2] | t->elem[3] << 8);
                t->elem_left = le32(t->elem + 4);
                t->in_dstype = group == 0x0000 && element == 0x0800 && t->elem_left == 2;
                t->dstype_len = 0;
                if (t->elem_left == 0)
                    t->elem_len = 0;
            }
            continue;
        }
        size_t take = k < t->elem_left ? k : t->elem_left;
        for (size_t i = 0; t->in_dstype && i < take; i++, t->dstype_len++)
            t->dstype |= (uint16_t)(p[i] << (8 * t->dstype_len));
        p += take;
        k -= take;
        t->elem_left -= (uint32_t)take;
        if (t->elem_left == 0) {
            if (t->in_dstype)
                t->has_dstype = true;
            t->in_dstype = false;
            t->elem_len = 0;
        }
    }
}

/* A PDV's fragment ended: notes the end of the command or data set. */
static void tracker_fragment_end(gate_tracker_t *t)
{
    bool last = (t->item[5] & 2) != 0;
    t->item_len = 0;
    if (!last)
        return;
    if (t->pdv_command) {
        t->cmd_done = true;
        /* A command without CommandDataSetType cannot be served; hand it
         * over as it is so the DIMSE layer refuses it. */
        if (!t->has_dstype || t->dstype == DATASET_NULL)
            t->msg_done = true;
    } else {
        t->data_done = true;
        t->msg_done = true;
    }
}

/* Consumes bytes of a P-DATA-TF body: PDV item headers and fragments. */
static int tracker_pdata(gate_tracker_t *t, const uint8_t *p, size_t n, size_t *i)
{
    if (t->item_len < 6) {
        t->item[t->item_len++] = p[(*i)++];
        t->fed++;
        t->pdu_left--;
        if (t->item_len < 6)
            return GATE_MORE;
        uint32_t plen = be32(t->item);
        /* The length covers the context id and control header, and the
         * whole item lies inside its PDU. */
        if (plen < 2 || plen - 2 > t->pdu_left)
            return SP_EPROTO;
        t->pdv_command = (t->item[5] & 1) != 0;
        if (t->pdv_command && t->cmd_done)
            return SP_EPROTO; /* a second command before the data set ended */
        if (!t->pdv_command && (!t->cmd_done || t->msg_done))
            return SP_EPROTO; /* a data set fragment without a command wanting one */
        t->pdv_left = plen - 2;
        if (t->pdv_left == 0)
            tracker_fragment_end(t);
        return GATE_MORE;
    }
    size_t k = n - *i < t->pdv_left ? n - *i : t->pdv_left;
    if (t->pdv_command) {
        if (t->cmd_bytes + k > GATE_MAX_COMMAND)
            return SP_ETOOBIG;
        t->cmd_bytes += k;
        tracker_command_bytes(t, p + *i, k);
    }
    *i += k;
    t->fed += k;
    t->pdv_left -= (uint32_t)k;
    t->pdu_left -= (uint32_t)k;
    if (t->pdv_left == 0)
        tracker_fragment_end(t);
    return GATE_MORE;
}

/* A PDU body ended: is the unit complete? */
static int tracker_pdu_end(gate_tracker_t *t)
{
    t->hdr_len = 0;
    if (t->pdu_type != PDU_DATA)
        return GATE_COMPLETE;
    if (t->item_len != 0)
        return SP_EPROTO; /* an item header cut by the PDU's end */
    return t->msg_done ? GATE_COMPLETE : GATE_MORE;
}

int gate_tracker_feed(gate_tracker_t *t, const uint8_t *p, size_t n, size_t *used)
{
    size_t i = 0;
    int rc = t->result;
    while (rc == GATE_MORE && i < n) {
        /* Stop exactly at the hand-off size, however the bytes were cut. */
        size_t end = n;
        if (t->expect == GATE_EXPECT_MESSAGE && t->handoff > 0 && t->handoff - t->fed < n - i)
            end = i + (t->handoff - t->fed);
        if (t->hdr_len < 6) {
            t->hdr[t->hdr_len++] = p[i++];
            t->fed++;
            if (t->hdr_len == 6) {
                rc = tracker_pdu_start(t);
                if (rc == GATE_MORE && t->pdu_left == 0)
                    rc = tracker_pdu_end(t);
            }
        } else if (t->pdu_type == PDU_DATA && !t->msg_done) {
            rc = tracker_pdata(t, p, end, &i);
            if (rc == GATE_MORE && t->pdu_left == 0)
                rc = tracker_pdu_end(t);
        } else {
            /* The body of a release or abort PDU, of an A-ASSOCIATE-RQ, or
             * PDVs after the end of the message in its last PDU. */
            size_t k = end - i < t->pdu_left ? end - i : t->pdu_left;
            i += k;
            t->fed += k;
            t->pdu_left -= (uint32_t)k;
            if (t->pdu_left == 0)
                rc = tracker_pdu_end(t);
        }
        if (rc == GATE_MORE && t->expect == GATE_EXPECT_MESSAGE && t->handoff > 0 &&
            t->fed >= t->handoff)
            rc = GATE_HANDOFF;
    }
    if (rc != GATE_MORE)
        t->result = rc;
    if (used)
        *used = i;
    return rc;
}

/* ---- connections and the loop ---------------------------------------------- */

enum { CONN_PENDING, CONN_PARKED, CONN_RETURNING, CONN_SERVED };

/* Read-ahead is read from the socket in pieces of this size. */
#define READ_CHUNK (64u * 1024u)
/* Refusals are logged at most once per address per this many ms. */
#define REFUSAL_LOG_MS 60000
#define ADDR_BUCKETS 256

struct gate_conn {
    gate_t *g;
    int fd;
    SSL *ssl;           /* TLS connections: the one OpenSSL object; NULL for plain */
    bool tls_ready;     /* the handshake is done */
    char *cert_subject; /* verified peer certificate's subject, or NULL */
    uint32_t ep_events; /* loop: the epoll events it is registered for */
    char peer[INET6_ADDRSTRLEN];
    int state;    /* CONN_*; changed under g->mu */
    void *assoc;  /* the owner's association handle; NULL for a new connection */
    uint8_t *buf; /* read-ahead; bytes [off, len) not yet read by the owner */
    size_t off, len, cap;
    gate_tracker_t tr; /* loop: progress of the unit being buffered */
    int64_t since_ms;  /* loop: accepted, parked, or first byte of a message */
    bool msg_started;  /* loop: a parked association's next message has begun */
    int64_t dl_start;  /* owner: read deadline = start + base + bytes * 1000 / rate */
    int64_t dl_base;
    uint64_t dl_rate;
    uint64_t dl_bytes;
    bool expired;             /* owner: gate_conn_expire() was called */
    bool evicted;             /* pending, shut down to make room; the loop closes it */
    gate_conn_t *prev, *next; /* g->conns */
    gate_conn_t *ret_next;    /* g->returns */
};

/* Connections held from one peer address. Entries stay while connections
 * exist or a refusal was logged in the last minute (so the log stays quiet). */
typedef struct addr_entry {
    char ip[INET6_ADDRSTRLEN];
    int count;
    int64_t last_log_ms;
    uint64_t refused_unlogged;
    struct addr_entry *next;
} addr_entry_t;

struct gate {
    gate_config_t cfg;
    pthread_mutex_t mu;
    pthread_t thread;
    bool thread_started;
    atomic_bool stopping;
    bool shut;          /* gate_shutdown() finished */
    int ep;             /* epoll instance */
    int wake_fd;        /* eventfd that wakes the loop */
    gate_conn_t *conns; /* every connection held, newest first */
    size_t nconns;
    gate_conn_t *returns; /* parked by owners, not yet taken by the loop */
    addr_entry_t *addrs[ADDR_BUCKETS];
    uint64_t refused;
    int64_t global_log_ms;                        /* last log of a max_connections refusal */
    uint8_t listen_tag, tls_listen_tag, wake_tag; /* epoll data pointers of the special fds */
    /* Loop thread only: no held connection's deadline is earlier than this,
     * so the scan for expired ones (every connection, under mu) runs only
     * when it is due, not after every wake-up: a busy association wakes the
     * loop for each message it parks. INT64_MAX: nothing to expire. */
    int64_t next_expire_ms;
};

void gate_config_defaults(gate_config_t *cfg)
{
    memset(cfg, 0, sizeof(*cfg));
    cfg->listen_fd = -1;
    cfg->tls_listen_fd = -1;
    cfg->acse_timeout_ms = 10000;
    cfg->dimse_timeout_ms = 60000;
    cfg->write_timeout_ms = 60000;
    cfg->min_rate = 64 * 1024;
    cfg->max_pdu = 116794 + 1024;
    cfg->handoff_bytes = 1024 * 1024;
    cfg->max_per_address = 32;
    cfg->max_connections = 1024;
}

static unsigned addr_hash(const char *ip)
{
    unsigned h = 2166136261u;
    for (const char *p = ip; *p; p++)
        h = (h ^ (uint8_t)*p) * 16777619u;
    return h % ADDR_BUCKETS;
}

/* Finds (and with create, makes) the entry of ip. g->mu held. */
static addr_entry_t *addr_find(gate_t *g, const char *ip, bool create)
{
    addr_entry_t **head = &g->addrs[addr_hash(ip)];
    for (addr_entry_t *e = *head; e; e = e->next)
        if (strcmp(e->ip, ip) == 0)
            return e;
    if (!create)
        return NULL;
    addr_entry_t *e = sp_calloc(1, sizeof(*e));
    sp_strlcpy(e->ip, ip, sizeof(e->ip));
    e->next = *head;
    *head = e;
    return e;
}

/* Drops the entry of ip when nothing needs it any more. g->mu held. */
static void addr_prune(gate_t *g, const char *ip, int64_t now)
{
    addr_entry_t **pp = &g->addrs[addr_hash(ip)];
    for (; *pp; pp = &(*pp)->next) {
        addr_entry_t *e = *pp;
        if (strcmp(e->ip, ip) != 0)
            continue;
        if (e->count == 0 && (e->last_log_ms == 0 || now - e->last_log_ms >= REFUSAL_LOG_MS)) {
            *pp = e->next;
            free(e);
        }
        return;
    }
}

static void wake(gate_t *g)
{
    uint64_t one = 1;
    if (write(g->wake_fd, &one, sizeof(one)) < 0 && errno != EAGAIN)
        log_warn("gate: waking the loop: %s", strerror(errno));
}

/* Unlinks c from the list and its address count. g->mu held. */
static void conn_unlink(gate_t *g, gate_conn_t *c)
{
    if (c->prev)
        c->prev->next = c->next;
    else
        g->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    c->prev = c->next = NULL;
    g->nconns--;
    addr_entry_t *e = addr_find(g, c->peer, false);
    if (e) {
        e->count--;
        addr_prune(g, c->peer, sp_now_ms());
    }
}

static void conn_free(gate_conn_t *c)
{
    if (c->ssl) {
        /* A close_notify if the socket takes it at once; never waits. */
        if (c->tls_ready && c->fd >= 0)
            (void)SSL_shutdown(c->ssl);
        SSL_free(c->ssl);
        ERR_clear_error();
    }
    if (c->fd >= 0)
        close(c->fd);
    free(c->cert_subject);
    free(c->buf);
    free(c);
}

/* ---- I/O that never blocks, plain or TLS ----------------------------------- */

/* conn_recv() and conn_send() could not go on: wait for *ev, then retry. */
#define CONN_AGAIN (-EAGAIN)

/* Maps an OpenSSL result r <= 0 to 0 (the peer closed), CONN_AGAIN with
 * *ev set, or an error (-errno, or SP_EPROTO for a TLS failure). */
static ssize_t ssl_result(gate_conn_t *c, int r, short *ev)
{
    int e = SSL_get_error(c->ssl, r);
    switch (e) {
    case SSL_ERROR_WANT_READ: *ev = POLLIN; return CONN_AGAIN;
    case SSL_ERROR_WANT_WRITE: *ev = POLLOUT; return CONN_AGAIN;
    case SSL_ERROR_ZERO_RETURN: return 0;
    case SSL_ERROR_SYSCALL:
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
            *ev = POLLIN;
            return CONN_AGAIN;
        }
        return errno != 0 ? -errno : 0;
    default: return SP_EPROTO;
    }
}

/* Reads up to n bytes without blocking: the count, 0 when the peer closed,
 * CONN_AGAIN (wait for *ev), or a negative code. */
static ssize_t conn_recv(gate_conn_t *c, void *buf, size_t n, short *ev)
{
    if (c->ssl == NULL) {
        ssize_t r = read(c->fd, buf, n);
        if (r >= 0)
            return r;
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
            *ev = POLLIN;
            return CONN_AGAIN;
        }
        return -errno;
    }
    ERR_clear_error();
    errno = 0;
    int r = SSL_read(c->ssl, buf, n > INT_MAX ? INT_MAX : (int)n);
    return r > 0 ? r : ssl_result(c, r, ev);
}

/* Writes some of n bytes without blocking: the count, CONN_AGAIN (wait for
 * *ev, then retry with the same bytes) or a negative code. */
static ssize_t conn_send(gate_conn_t *c, const void *buf, size_t n, short *ev)
{
    if (c->ssl == NULL) {
        ssize_t w = send(c->fd, buf, n, MSG_NOSIGNAL);
        if (w >= 0)
            return w;
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
            *ev = POLLOUT;
            return CONN_AGAIN;
        }
        return -errno;
    }
    ERR_clear_error();
    errno = 0;
    int w = SSL_write(c->ssl, buf, n > INT_MAX ? INT_MAX : (int)n);
    if (w > 0)
        return w;
    ssize_t r = ssl_result(c, w, ev);
    return r == 0 ? -EPIPE : r;
}

/* True when OpenSSL holds bytes of c it has not handed out: decrypted ones,
 * or records read from the socket and not yet processed. */
static bool conn_tls_holds_input(const gate_conn_t *c)
{
    return c->ssl != NULL && (SSL_pending(c->ssl) > 0 || SSL_has_pending(c->ssl));
}

/* Drives the TLS handshake one step: 1 done, CONN_AGAIN (wait for *ev), or
 * a negative code (logged: the peer is not a TLS client we accept). */
static int conn_handshake(gate_conn_t *c, short *ev)
{
    ERR_clear_error();
    errno = 0;
    int r = SSL_accept(c->ssl);
    if (r == 1) {
        c->tls_ready = true;
        c->cert_subject = tls_peer_subject(c->ssl);
        log_debug("gate: TLS from %s: %s, %s, peer certificate %s", c->peer,
                  SSL_get_version(c->ssl), SSL_get_cipher_name(c->ssl),
                  c->cert_subject ? c->cert_subject : "(none)");
        return 1;
    }
    ssize_t rc = ssl_result(c, r, ev);
    if (rc == CONN_AGAIN)
        return CONN_AGAIN;
    char why[512];
    long vr = SSL_get_verify_result(c->ssl);
    if (vr != X509_V_OK)
        sp_fmt(why, sizeof why, "certificate refused: %s", X509_verify_cert_error_string(vr));
    else if (rc == 0)
        sp_strlcpy(why, "closed by the peer", sizeof why);
    else if (rc == SP_EPROTO)
        tls_error_text(why, sizeof why);
    else
        sp_strlcpy(why, strerror((int)-rc), sizeof why);
    log_info("gate: TLS handshake with %s failed: %s", c->peer, why);
    return rc == 0 ? SP_EPROTO : (int)rc;
}

/* The loop's deadline for a pending or parked connection. */
static int64_t conn_loop_deadline(const gate_t *g, const gate_conn_t *c)
{
    if (c->state == CONN_PENDING)
        return c->since_ms + g->cfg.acse_timeout_ms;
    int64_t dl = c->since_ms + g->cfg.dimse_timeout_ms;
    if (c->msg_started && g->cfg.min_rate > 0)
        dl += (int64_t)((uint64_t)c->tr.fed * 1000u / g->cfg.min_rate);
    return dl;
}

/* Loop thread: c's deadline was (re)started; the next expiry scan must not
 * come later than it. */
static void loop_note_deadline(gate_t *g, const gate_conn_t *c)
{
    int64_t dl = conn_loop_deadline(g, c);
    if (dl < g->next_expire_ms)
        g->next_expire_ms = dl;
}

/* Sets the owner's read deadline to what remains of the loop's, so a
 * handed-over unit keeps one budget from its first byte. */
static void conn_hand_over_deadline(gate_t *g, gate_conn_t *c)
{
    c->dl_start = c->since_ms;
    c->expired = false;
    if (c->state == CONN_PENDING) {
        c->dl_base = g->cfg.acse_timeout_ms;
        c->dl_rate = 0;
        c->dl_bytes = 0;
    } else {
        c->dl_base = g->cfg.dimse_timeout_ms;
        c->dl_rate = g->cfg.min_rate;
        c->dl_bytes = c->tr.fed;
    }
}

/* Makes sure the read-ahead has room for want more bytes. */
static void conn_reserve(gate_conn_t *c, size_t want)
{
    if (c->off > 0 && c->off == c->len)
        c->off = c->len = 0;
    if (c->cap - c->len >= want)
        return;
    if (c->off > 0) {
        memmove(c->buf, c->buf + c->off, c->len - c->off);
        c->len -= c->off;
        c->off = 0;
    }
    if (c->cap - c->len < want) {
        size_t cap = c->cap ? c->cap : 4096;
        while (cap - c->len < want)
            cap *= 2;
        c->buf = sp_realloc(c->buf, cap);
        c->cap = cap;
    }
}

/* Removes c from epoll and marks it served. Loop thread. */
static void loop_release(gate_t *g, gate_conn_t *c)
{
    (void)epoll_ctl(g->ep, EPOLL_CTL_DEL, c->fd, NULL);
    pthread_mutex_lock(&g->mu);
    conn_hand_over_deadline(g, c);
    c->state = CONN_SERVED;
    pthread_mutex_unlock(&g->mu);
}

/* Closes a pending connection. Loop thread. */
static void loop_close_pending(gate_t *g, gate_conn_t *c)
{
    (void)epoll_ctl(g->ep, EPOLL_CTL_DEL, c->fd, NULL);
    pthread_mutex_lock(&g->mu);
    conn_unlink(g, c);
    pthread_mutex_unlock(&g->mu);
    conn_free(c);
}

/* Watches c for what its next step waits on: POLLIN (also the peer's
 * half-close) or POLLOUT (a TLS handshake or read that must write first).
 * Loop thread; c is registered with epoll. */
static void loop_watch(gate_t *g, gate_conn_t *c, short ev)
{
    uint32_t want = ev == POLLOUT ? EPOLLOUT : EPOLLIN | EPOLLRDHUP;
    if (want == c->ep_events)
        return;
    struct epoll_event e = {.events = want, .data.ptr = c};
    if (epoll_ctl(g->ep, EPOLL_CTL_MOD, c->fd, &e) == 0)
        c->ep_events = want;
    else
        log_warn("gate: watching connection from %s: %s", c->peer, strerror(errno));
}

/* A pending connection failed, or a parked association ended. */
static void loop_fail(gate_t *g, gate_conn_t *c, int why)
{
    if (c->state == CONN_PENDING) {
        log_debug("gate: connection from %s closed before a complete A-ASSOCIATE-RQ (%s)", c->peer,
                  why == GATE_WHY_TIMEOUT  ? "timeout"
                  : why == GATE_WHY_CLOSED ? "closed"
                                           : "invalid");
        loop_close_pending(g, c);
        return;
    }
    loop_release(g, c);
    g->cfg.expired(g->cfg.ctx, c, why);
}

/* Reads what the socket has and feeds the tracker; hands c over when its
 * unit is complete, fails it when the peer closed or sent garbage. */
static void loop_readable(gate_t *g, gate_conn_t *c)
{
    short ev = POLLIN;
    if (c->ssl && !c->tls_ready) {
        int hr = conn_handshake(c, &ev);
        if (hr == CONN_AGAIN) {
            loop_watch(g, c, ev);
            return;
        }
        if (hr < 0) {
            loop_fail(g, c, GATE_WHY_INVALID);
            return;
        }
    }
    for (;;) {
        conn_reserve(c, READ_CHUNK);
        ssize_t r = conn_recv(c, c->buf + c->len, READ_CHUNK, &ev);
        if (r == CONN_AGAIN) {
            loop_watch(g, c, ev);
            return;
        }
        if (r < 0) {
            if (r == SP_EPROTO) {
                char why[512];
                tls_error_text(why, sizeof why);
                log_info("gate: TLS from %s: %s", c->peer, why);
            }
            loop_fail(g, c, GATE_WHY_CLOSED);
            return;
        }
        if (r == 0) {
            loop_fail(g, c, GATE_WHY_CLOSED);
            return;
        }
        if (c->state == CONN_PARKED && !c->msg_started) {
            c->msg_started = true;
            c->since_ms = sp_now_ms();
            loop_note_deadline(g, c);
        }
        int rc = gate_tracker_feed(&c->tr, c->buf + c->len, (size_t)r, NULL);
        c->len += (size_t)r;
        if (rc < 0) {
            log_info("gate: %s from %s: %s",
                     c->state == CONN_PENDING ? "new connection" : "association", c->peer,
                     rc == SP_ETOOBIG ? "PDU over its size limit" : "not a valid next PDU");
            loop_fail(g, c, GATE_WHY_INVALID);
            return;
        }
        if (rc != GATE_MORE) {
            loop_release(g, c);
            g->cfg.ready(g->cfg.ctx, c);
            return;
        }
    }
}

/* Takes an association an owner parked: hands it straight back when its
 * read-ahead already holds the next message, otherwise watches it. */
static void loop_take_parked(gate_t *g, gate_conn_t *c)
{
    gate_tracker_init(&c->tr, GATE_EXPECT_MESSAGE, g->cfg.max_pdu, g->cfg.handoff_bytes);
    c->since_ms = sp_now_ms();
    c->msg_started = c->len > c->off;
    loop_note_deadline(g, c);
    int rc = gate_tracker_feed(&c->tr, c->buf + c->off, c->len - c->off, NULL);
    if (rc != GATE_MORE) {
        pthread_mutex_lock(&g->mu);
        conn_hand_over_deadline(g, c);
        c->state = CONN_SERVED;
        pthread_mutex_unlock(&g->mu);
        if (rc < 0)
            g->cfg.expired(g->cfg.ctx, c, GATE_WHY_INVALID);
        else
            g->cfg.ready(g->cfg.ctx, c);
        return;
    }
    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = c};
    c->ep_events = ev.events;
    if (epoll_ctl(g->ep, EPOLL_CTL_ADD, c->fd, &ev) != 0) {
        log_warn("gate: watching association from %s: %s", c->peer, strerror(errno));
        pthread_mutex_lock(&g->mu);
        conn_hand_over_deadline(g, c);
        c->state = CONN_SERVED;
        pthread_mutex_unlock(&g->mu);
        g->cfg.expired(g->cfg.ctx, c, GATE_WHY_INVALID);
        return;
    }
    pthread_mutex_lock(&g->mu);
    c->state = CONN_PARKED;
    pthread_mutex_unlock(&g->mu);
    /* Records OpenSSL already took off the socket never wake epoll. */
    if (conn_tls_holds_input(c))
        loop_readable(g, c);
}

/* Logs a refusal of peer at most once a minute per address. g->mu held. */
static void note_refusal(gate_t *g, const char *peer, const char *why, int held)
{
    int64_t now = sp_now_ms();
    g->refused++;
    addr_entry_t *e = addr_find(g, peer, true);
    if (e->last_log_ms != 0 && now - e->last_log_ms < REFUSAL_LOG_MS) {
        e->refused_unlogged++;
        return;
    }
    log_warn("gate: refusing connections from %s: %s (%d held; %llu more refused since the "
             "last message)",
             peer, why, held, (unsigned long long)e->refused_unlogged);
    e->last_log_ms = now;
    e->refused_unlogged = 0;
}

/* Admits a new socket if the limits allow it; the oldest pending connection
 * gives way when the gate is full. */
static int gate_admit(gate_t *g, int fd, const char *peer, SSL *ssl)
{
    gate_conn_t *evict = NULL;
    pthread_mutex_lock(&g->mu);
    if (g->shut || atomic_load(&g->stopping)) {
        pthread_mutex_unlock(&g->mu);
        SSL_free(ssl);
        close(fd);
        return SP_EUNAVAIL;
    }
    addr_entry_t *e = addr_find(g, peer, false);
    int held = e ? e->count : 0;
    if (g->cfg.max_per_address > 0 && held >= g->cfg.max_per_address) {
        note_refusal(g, peer, "over [dicom] max_per_address", held);
        pthread_mutex_unlock(&g->mu);
        SSL_free(ssl);
        close(fd);
        return SP_ELIMIT;
    }
    if (g->cfg.max_connections > 0 && g->nconns >= (size_t)g->cfg.max_connections) {
        for (gate_conn_t *c = g->conns; c; c = c->next)
            if (c->state == CONN_PENDING && !c->evicted)
                evict = c; /* the list is newest first: the last one is the oldest */
        if (evict == NULL) {
            note_refusal(g, peer, "over [dicom] max_connections", (int)g->nconns);
            pthread_mutex_unlock(&g->mu);
            SSL_free(ssl);
            close(fd);
            return SP_ELIMIT;
        }
        /* Shut down, not closed: the loop may be reading it right now
         * (gate_add() runs on any thread); it sees the end and closes it. */
        evict->evicted = true;
        (void)shutdown(evict->fd, SHUT_RDWR);
        g->refused++;
        int64_t now = sp_now_ms();
        if (now - g->global_log_ms >= REFUSAL_LOG_MS) {
            log_warn("gate: %zu connections held ([dicom] max_connections): closing the oldest "
                     "that has not sent its association request (%s)",
                     g->nconns, evict->peer);
            g->global_log_ms = now;
        }
    }
    gate_conn_t *c = sp_calloc(1, sizeof(*c));
    c->g = g;
    c->fd = fd;
    c->ssl = ssl;
    sp_strlcpy(c->peer, peer, sizeof(c->peer));
    c->state = CONN_PENDING;
    c->since_ms = sp_now_ms();
    loop_note_deadline(g, c);
    gate_tracker_init(&c->tr, GATE_EXPECT_ASSOC_RQ, g->cfg.max_pdu, 0);
    c->next = g->conns;
    if (g->conns)
        g->conns->prev = c;
    g->conns = c;
    g->nconns++;
    addr_find(g, peer, true)->count++;
    pthread_mutex_unlock(&g->mu);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = c};
    c->ep_events = ev.events;
    if (epoll_ctl(g->ep, EPOLL_CTL_ADD, fd, &ev) != 0) {
        int rc = -errno;
        pthread_mutex_lock(&g->mu);
        conn_unlink(g, c);
        pthread_mutex_unlock(&g->mu);
        conn_free(c);
        return rc;
    }
    return 0;
}

/* The peer's address as text ("?" when unknown). */
static void peer_address(int fd, char *out, size_t outlen)
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    sp_strlcpy(out, "?", outlen);
    if (getpeername(fd, (struct sockaddr *)&ss, &sl) != 0)
        return;
    if (ss.ss_family == AF_INET)
        inet_ntop(AF_INET, &((struct sockaddr_in *)&ss)->sin_addr, out, (socklen_t)outlen);
    else if (ss.ss_family == AF_INET6)
        inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&ss)->sin6_addr, out, (socklen_t)outlen);
}

static int prepare_socket(int fd)
{
    /* DCMTK takes socket 0 for "no socket": move such a socket elsewhere. */
    if (fd == 0) {
        int d = fcntl(fd, F_DUPFD_CLOEXEC, 1);
        close(fd);
        if (d < 0)
            return -1;
        fd = d;
    }
    /* Every read and write waits in poll() under a deadline; a blocking
     * socket could block past it. */
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

int gate_add(gate_t *g, int fd, const char *peer)
{
    fd = prepare_socket(fd);
    if (fd < 0)
        return -errno;
    return gate_admit(g, fd, peer ? peer : "?", NULL);
}

int gate_add_tls(gate_t *g, int fd, const char *peer)
{
    SP_ASSERT(g->cfg.tls != NULL);
    fd = prepare_socket(fd);
    if (fd < 0)
        return -errno;
    /* The current context (re-read first if its files changed). */
    SSL_CTX *ctx = tls_acquire(g->cfg.tls);
    SSL *ssl = SSL_new(ctx);
    SSL_CTX_free(ctx); /* the SSL object holds its own reference */
    if (ssl == NULL || SSL_set_fd(ssl, fd) != 1) {
        char why[256];
        tls_error_text(why, sizeof why);
        log_warn("gate: TLS connection from %s: %s", peer ? peer : "?", why);
        SSL_free(ssl);
        close(fd);
        return SP_EPROTO;
    }
    SSL_set_accept_state(ssl);
    return gate_admit(g, fd, peer ? peer : "?", ssl);
}

static void loop_accept(gate_t *g, int listen_fd, bool tls)
{
    /* A bounded batch, so a flood of connections cannot starve the reads
     * of connections already held. */
    for (int i = 0; i < 64; i++) {
        int fd = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EMFILE || errno == ENFILE)
                log_warn("gate: accept: %s", strerror(errno));
            else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR &&
                     errno != ECONNABORTED)
                log_warn("gate: accept: %s", strerror(errno));
            return;
        }
        char peer[INET6_ADDRSTRLEN];
        peer_address(fd, peer, sizeof(peer));
        if (tls)
            (void)gate_add_tls(g, fd, peer);
        else
            (void)gate_add(g, fd, peer);
    }
}

/* Expires connections whose deadline passed; returns the time until the
 * next deadline in ms (-1: none). */
static int loop_expire(gate_t *g)
{
    int64_t now = sp_now_ms(), next = -1;
    gate_conn_t *expired = NULL;
    pthread_mutex_lock(&g->mu);
    for (gate_conn_t *c = g->conns; c; c = c->next) {
        if (c->state != CONN_PENDING && c->state != CONN_PARKED)
            continue;
        int64_t dl = conn_loop_deadline(g, c);
        if (dl <= now) {
            c->ret_next = expired; /* ret_next is free while pending or parked */
            expired = c;
        } else if (next < 0 || dl - now < next) {
            next = dl - now;
        }
    }
    pthread_mutex_unlock(&g->mu);
    while (expired) {
        gate_conn_t *c = expired;
        expired = c->ret_next;
        c->ret_next = NULL;
        if (c->state == CONN_PARKED)
            log_debug("gate: association from %s %s, aborting", c->peer,
                      c->msg_started ? "sent too slowly" : "idle too long");
        loop_fail(g, c, GATE_WHY_TIMEOUT);
    }
    if (next > 0 && next > 1000)
        next = 1000; /* a coarse tick bounds drift of the growing deadlines */
    return (int)next;
}

static void *loop_main(void *arg)
{
    gate_t *g = arg;
    struct epoll_event evs[64];
    int timeout = -1;
    while (!atomic_load(&g->stopping)) {
        int n = epoll_wait(g->ep, evs, (int)SP_ARRAY_LEN(evs), timeout);
        if (n < 0 && errno != EINTR) {
            log_error("gate: epoll_wait: %s", strerror(errno));
            break;
        }
        for (int i = 0; i < n && !atomic_load(&g->stopping); i++) {
            void *p = evs[i].data.ptr;
            if (p == &g->listen_tag) {
                loop_accept(g, g->cfg.listen_fd, false);
            } else if (p == &g->tls_listen_tag) {
                loop_accept(g, g->cfg.tls_listen_fd, true);
            } else if (p == &g->wake_tag) {
                uint64_t v;
                (void)!read(g->wake_fd, &v, sizeof(v));
            } else {
                loop_readable(g, p);
            }
        }
        if (atomic_load(&g->stopping))
            break;
        pthread_mutex_lock(&g->mu);
        gate_conn_t *ret = g->returns;
        g->returns = NULL;
        pthread_mutex_unlock(&g->mu);
        while (ret) {
            gate_conn_t *c = ret;
            ret = c->ret_next;
            c->ret_next = NULL;
            loop_take_parked(g, c);
        }
        int64_t now = sp_now_ms();
        if (now >= g->next_expire_ms) {
            int next = loop_expire(g);
            g->next_expire_ms = next < 0 ? INT64_MAX : now + next;
        }
        timeout = g->next_expire_ms == INT64_MAX ? -1
                  : g->next_expire_ms > now      ? (int)(g->next_expire_ms - now)
                                                 : 0;
    }
    return NULL;
}

int gate_new(const gate_config_t *cfg, gate_t **out)
{
    *out = NULL;
    SP_ASSERT(cfg->ready != NULL && cfg->expired != NULL);
    gate_t *g = sp_calloc(1, sizeof(*g));
    g->cfg = *cfg;
    if (g->cfg.handoff_bytes < 64 * 1024)
        g->cfg.handoff_bytes = 64 * 1024;
    pthread_mutex_init(&g->mu, NULL);
    atomic_init(&g->stopping, false);
    g->ep = epoll_create1(EPOLL_CLOEXEC);
    g->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    int rc = 0;
    if (g->ep < 0 || g->wake_fd < 0) {
        rc = -errno;
        goto out;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &g->wake_tag};
    if (epoll_ctl(g->ep, EPOLL_CTL_ADD, g->wake_fd, &ev) != 0) {
        rc = -errno;
        goto out;
    }
    SP_ASSERT(g->cfg.tls_listen_fd < 0 || g->cfg.tls != NULL);
    int lfds[2] = {g->cfg.listen_fd, g->cfg.tls_listen_fd};
    void *tags[2] = {&g->listen_tag, &g->tls_listen_tag};
    for (int i = 0; i < 2; i++) {
        if (lfds[i] < 0)
            continue;
        int fl = fcntl(lfds[i], F_GETFL);
        ev.data.ptr = tags[i];
        if (fl < 0 || fcntl(lfds[i], F_SETFL, fl | O_NONBLOCK) != 0 ||
            epoll_ctl(g->ep, EPOLL_CTL_ADD, lfds[i], &ev) != 0) {
            rc = -errno;
            goto out;
        }
    }
    rc = -pthread_create(&g->thread, NULL, loop_main, g);
    if (rc != 0)
        goto out;
    g->thread_started = true;
    *out = g;
    return 0;
out:
    g->shut = true;
    gate_destroy(&g);
    return rc;
}

void gate_shutdown(gate_t *g)
{
    if (g == NULL || g->shut)
        return;
    atomic_store(&g->stopping, true);
    if (g->thread_started) {
        wake(g);
        pthread_join(g->thread, NULL);
        g->thread_started = false;
    }
    gate_conn_t *parked = NULL, *pending = NULL;
    pthread_mutex_lock(&g->mu);
    g->returns = NULL; /* those are in the list as CONN_RETURNING */
    for (gate_conn_t *c = g->conns, *next; c; c = next) {
        next = c->next;
        if (c->state == CONN_PENDING) {
            conn_unlink(g, c);
            c->ret_next = pending;
            pending = c;
        } else if (c->state == CONN_PARKED || c->state == CONN_RETURNING) {
            conn_hand_over_deadline(g, c);
            c->state = CONN_SERVED;
            c->ret_next = parked;
            parked = c;
        } else {
            (void)shutdown(c->fd, SHUT_RDWR);
        }
    }
    g->shut = true;
    pthread_mutex_unlock(&g->mu);
    while (pending) {
        gate_conn_t *c = pending;
        pending = c->ret_next;
        conn_free(c);
    }
    while (parked) {
        gate_conn_t *c = parked;
        parked = c->ret_next;
        c->ret_next = NULL;
        g->cfg.expired(g->cfg.ctx, c, GATE_WHY_STOP);
    }
}

void gate_destroy(gate_t **gp)
{
    if (gp == NULL || *gp == NULL)
        return;
    gate_t *g = *gp;
    *gp = NULL;
    gate_shutdown(g);
    SP_ASSERT(g->conns == NULL); /* every served connection was closed by its owner */
    for (int i = 0; i < ADDR_BUCKETS; i++) {
        while (g->addrs[i]) {
            addr_entry_t *e = g->addrs[i];
            g->addrs[i] = e->next;
            free(e);
        }
    }
    if (g->ep >= 0)
        close(g->ep);
    if (g->wake_fd >= 0)
        close(g->wake_fd);
    pthread_mutex_destroy(&g->mu);
    free(g);
}

void gate_park(gate_conn_t *c, void *assoc)
{
    gate_t *g = c->g;
    bool shut;
    pthread_mutex_lock(&g->mu);
    SP_ASSERT(c->state == CONN_SERVED);
    c->assoc = assoc;
    shut = g->shut || atomic_load(&g->stopping);
    if (!shut) {
        c->state = CONN_RETURNING;
        c->ret_next = g->returns;
        g->returns = c;
    }
    pthread_mutex_unlock(&g->mu);
    if (shut)
        g->cfg.expired(g->cfg.ctx, c, GATE_WHY_STOP);
    else
        wake(g);
}

void gate_conn_close(gate_conn_t **cp)
{
    if (cp == NULL || *cp == NULL)
        return;
    gate_conn_t *c = *cp;
    *cp = NULL;
    gate_t *g = c->g;
    pthread_mutex_lock(&g->mu);
    SP_ASSERT(c->state == CONN_SERVED);
    conn_unlink(g, c);
    pthread_mutex_unlock(&g->mu);
    conn_free(c);
}

size_t gate_count(gate_t *g)
{
    pthread_mutex_lock(&g->mu);
    size_t n = g->nconns;
    pthread_mutex_unlock(&g->mu);
    return n;
}

int gate_count_address(gate_t *g, const char *peer)
{
    pthread_mutex_lock(&g->mu);
    addr_entry_t *e = addr_find(g, peer, false);
    int n = e ? e->count : 0;
    pthread_mutex_unlock(&g->mu);
    return n;
}

uint64_t gate_refused(gate_t *g)
{
    pthread_mutex_lock(&g->mu);
    uint64_t n = g->refused;
    pthread_mutex_unlock(&g->mu);
    return n;
}

/* ---- a handed-over connection ---------------------------------------------- */

int gate_conn_fd(const gate_conn_t *c)
{
    return c->fd;
}

const char *gate_conn_peer(const gate_conn_t *c)
{
    return c->peer;
}

void *gate_conn_assoc(const gate_conn_t *c)
{
    return c->assoc;
}

bool gate_conn_is_tls(const gate_conn_t *c)
{
    return c->ssl != NULL;
}

const char *gate_conn_cert_subject(const gate_conn_t *c)
{
    return c->cert_subject;
}

size_t gate_conn_buffered(const gate_conn_t *c)
{
    return c->len - c->off;
}

void gate_conn_set_deadline(gate_conn_t *c, int64_t start_ms, int64_t base_ms, uint64_t min_rate)
{
    c->dl_start = start_ms;
    c->dl_base = base_ms;
    c->dl_rate = min_rate;
    c->dl_bytes = 0;
    c->expired = false;
}

int64_t gate_conn_deadline(const gate_conn_t *c)
{
    if (c->expired)
        return 0;
    int64_t dl = c->dl_start + c->dl_base;
    if (c->dl_rate > 0)
        dl += (int64_t)(c->dl_bytes * 1000u / c->dl_rate);
    return dl;
}

void gate_conn_expire(gate_conn_t *c)
{
    c->expired = true;
}

/* Milliseconds until the deadline, clamped to [0, INT_MAX/2]. */
static int remaining_ms(const gate_conn_t *c)
{
    int64_t left = gate_conn_deadline(c) - sp_now_ms();
    if (left < 0)
        return 0;
    if (left > 1 << 30)
        return 1 << 30;
    return (int)left;
}

ssize_t gate_conn_read(gate_conn_t *c, void *buf, size_t n)
{
    if (n == 0)
        return 0;
    if (c->len > c->off) {
        size_t k = c->len - c->off < n ? c->len - c->off : n;
        memcpy(buf, c->buf + c->off, k);
        c->off += k;
        if (c->off == c->len)
            c->off = c->len = 0;
        return (ssize_t)k;
    }
    for (;;) {
        int left = remaining_ms(c);
        if (left == 0)
            return SP_ETIMEOUT;
        /* Reading first lets OpenSSL serve what it holds before any poll. */
        short ev = POLLIN;
        ssize_t r = conn_recv(c, buf, n, &ev);
        if (r > 0) {
            c->dl_bytes += (uint64_t)r;
            return r;
        }
        if (r != CONN_AGAIN)
            return r;
        struct pollfd pfd = {c->fd, ev, 0};
        if (poll(&pfd, 1, left) < 0 && errno != EINTR)
            return -errno;
    }
}

ssize_t gate_conn_write(gate_conn_t *c, const void *buf, size_t n)
{
    const uint8_t *p = buf;
    size_t done = 0;
    int64_t until = sp_now_ms() + (c->expired ? 0 : c->g->cfg.write_timeout_ms);
    while (done < n) {
        short ev = POLLOUT;
        ssize_t w = conn_send(c, p + done, n - done, &ev);
        if (w > 0) {
            done += (size_t)w;
            continue;
        }
        if (w != CONN_AGAIN && w != 0)
            return w;
        int64_t left = until - sp_now_ms();
        if (left <= 0)
            return SP_ETIMEOUT;
        struct pollfd pfd = {c->fd, ev, 0};
        if (poll(&pfd, 1, (int)(left > 1 << 30 ? 1 << 30 : left)) < 0 && errno != EINTR)
            return -errno;
    }
    return (ssize_t)n;
}

bool gate_conn_wait(gate_conn_t *c, int timeout_ms)
{
    if (c->len > c->off)
        return true;
    int left = remaining_ms(c);
    if (left == 0)
        return false; /* as gate_conn_read() would fail, whatever is in flight */
    if (timeout_ms < 0)
        timeout_ms = 0;
    if (timeout_ms > left)
        timeout_ms = left;
    struct pollfd pfd = {c->fd, POLLIN, 0};
    int64_t until = sp_now_ms() + timeout_ms;
    for (;;) {
        if (c->ssl) {
            /* A readable socket may hold only part of a record: decrypt
             * into the read-ahead, and say yes only for real bytes (or an
             * end or error, which a read reports at once too). */
            conn_reserve(c, READ_CHUNK);
            ssize_t r = conn_recv(c, c->buf + c->len, READ_CHUNK, &pfd.events);
            if (r > 0)
                c->len += (size_t)r;
            if (r != CONN_AGAIN)
                return true;
        }
        int pr = poll(&pfd, 1, timeout_ms);
        if (pr > 0 && c->ssl == NULL)
            return true;
        if (pr < 0 && errno != EINTR)
            return false;
        timeout_ms = (int)(until - sp_now_ms());
        if (timeout_ms < 0)
            timeout_ms = 0;
        if (pr == 0 && (c->ssl == NULL || timeout_ms == 0))
            return false;
    }
}

int gate_conn_next_ready(gate_conn_t *c, int wait_ms)
{
    gate_t *g = c->g;
    gate_tracker_t t;
    gate_tracker_init(&t, GATE_EXPECT_MESSAGE, g->cfg.max_pdu, g->cfg.handoff_bytes);
    int rc = gate_tracker_feed(&t, c->buf + c->off, c->len - c->off, NULL);
    int64_t until = sp_now_ms() + (wait_ms > 0 ? wait_ms : 0);
    while (rc == GATE_MORE) {
        /* Read before polling: OpenSSL may hold decrypted bytes already. */
        conn_reserve(c, READ_CHUNK);
        short ev = POLLIN;
        ssize_t r = conn_recv(c, c->buf + c->len, READ_CHUNK, &ev);
        if (r > 0) {
            rc = gate_tracker_feed(&t, c->buf + c->len, (size_t)r, NULL);
            c->len += (size_t)r;
            continue;
        }
        if (r == 0)
            return SP_EUNAVAIL;
        if (r != CONN_AGAIN)
            return r;
        int64_t left = until - sp_now_ms();
        struct pollfd pfd = {c->fd, ev, 0};
        int pr = poll(&pfd, 1, left > 0 ? (int)left : 0);
        if (pr < 0 && errno == EINTR)
            continue;
        if (pr < 0)
            return -errno;
        if (pr == 0)
            return 0;
    }
    return rc < 0 ? rc : 1;
}
