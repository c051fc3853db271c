/* membership.c - drives the node's SWIM state machine (common/gossip.h) over
 * the CURVE transport.
 *
 * Threads: one membership thread ticks the state machine, sends every
 * outbound message with a blocking transport_call() (one client per peer,
 * owned by this thread only) and feeds the direct answer in each reply back.
 * Transport worker threads call membership_handle() for inbound gossip. The
 * mutex guards the gossip_t, the queue of polled-but-unsent messages and the
 * last logged view; no lock is held during network I/O.
 *
 * Owns: the gossip_t, the queue, copies of the seeds, the thread and its
 * clients. Borrows the key pair and the allow-list from the node. */
#include "membership.h"

#include "admin.h"
#include "audit.h"
#include "base.h"
#include "log.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MEMBERSHIP_MAX_SLEEP_MS 10 /* the thread also sends what handlers queued */

typedef struct {
    char *name;
    char *endpoint;
} seed_t;

/* A transport client for one peer, keyed by name and endpoint (a restarted
 * member may come back on another port). Owned by the membership thread. */
typedef struct {
    char name[GOSSIP_ID_MAX];
    char endpoint[GOSSIP_ENDPOINT_MAX];
    transport_client_t *client;
} peer_t;

struct membership {
    pthread_mutex_t lock;
    gossip_t *g;             /* under lock */
    gossip_msg_t *pending;   /* under lock: polled from g, not yet sent */
    size_t npending, cap;    /* under lock */
    gossip_member_t *view;   /* under lock: the view last logged */
    size_t nview;            /* under lock */
    uint64_t logged_version; /* under lock */

    char self_id[GOSSIP_ID_MAX];
    seed_t *seeds;
    size_t nseeds;
    keys_pair_t self;
    const keys_allowlist_t *allowed;
    transport_config_t tc; /* for the clients */
    int call_timeout_ms;

    peer_t *peers; /* membership thread only */
    size_t npeers;

    pthread_t thread;
    bool thread_started;
    atomic_bool stop;
};

/* Logs one line per member whose state changed since the last call, if the
 * view version moved. Called with the lock held. */
/* Audits a member joining (first seen) or leaving (left, or out: its data
 * re-replicated elsewhere) as this member saw it. */
static void audit_change(const gossip_member_t *old, const gossip_member_t *now)
{
    bool gone = now->state == GOSSIP_LEFT || now->state == GOSSIP_OUT;
    if (old != NULL && (old->state == now->state || !gone))
        return;
    char detail[160];
    audit_record_t r = AUDIT_RECORD_INIT(gone ? AUDIT_NETWORK_DETACH : AUDIT_NETWORK_ATTACH);
    r.operation = "membership";
    r.user = now->id;
    r.address = now->endpoint;
    r.detail = sp_fmt(detail, sizeof detail, "member %s %s -> %s (site %s)", now->id,
                      old ? gossip_state_name(old->state) : "new", gossip_state_name(now->state),
                      now->site);
    audit_record(&r, false);
}

static void log_changes(membership_t *m)
{
    uint64_t version = gossip_view_version(m->g);
    if (version == m->logged_version)
        return;
    m->logged_version = version;
    size_t n = gossip_count(m->g);
    gossip_member_t *now = sp_calloc(n ? n : 1, sizeof *now);
    n = gossip_snapshot(m->g, now, n);
    for (size_t i = 0; i < n; i++) {
        if (strcmp(now[i].id, m->self_id) == 0)
            continue;
        const gossip_member_t *old = NULL;
        for (size_t j = 0; j < m->nview; j++)
            if (strcmp(m->view[j].id, now[i].id) == 0)
                old = &m->view[j];
        if (old == NULL)
            log_info("member %s new -> %s (incarnation %llu, %s, site %s)", now[i].id,
                     gossip_state_name(now[i].state), (unsigned long long)now[i].incarnation,
                     now[i].endpoint, now[i].site);
        else if (old->state != now[i].state)
            log_info("member %s %s -> %s (incarnation %llu)", now[i].id,
                     gossip_state_name(old->state), gossip_state_name(now[i].state),
                     (unsigned long long)now[i].incarnation);
        audit_change(old, &now[i]);
    }
    free(m->view);
    m->view = now;
    m->nview = n;
}

/* Moves everything in the state machine's outbox to the pending queue.
 * Called with the lock held. */
static void drain_outbox(membership_t *m)
{
    gossip_msg_t msg;
    while (gossip_poll(m->g, &msg)) {
        if (m->npending == m->cap) {
            m->cap = m->cap ? 2 * m->cap : 16;
            m->pending = sp_realloc(m->pending, m->cap * sizeof *m->pending);
        }
        m->pending[m->npending++] = msg;
    }
}

/* The seed name configured for an endpoint, or NULL. */
static const char *seed_name(const membership_t *m, const char *endpoint)
{
    for (size_t i = 0; i < m->nseeds; i++)
        if (strcmp(m->seeds[i].endpoint, endpoint) == 0)
            return m->seeds[i].name;
    return NULL;
}

/* The client for a peer at an endpoint, created on first use; NULL if the
 * peer's name is not in the allow-list. Membership thread only. */
static transport_client_t *peer_client(membership_t *m, const char *name, const char *endpoint)
{
    peer_t *p = NULL;
    for (size_t i = 0; i < m->npeers; i++)
        if (strcmp(m->peers[i].name, name) == 0)
            p = &m->peers[i];
    if (p != NULL && strcmp(p->endpoint, endpoint) == 0)
        return p->client;
    char key[KEYS_Z85_LEN + 1];
    if (!keys_allowlist_find_name(m->allowed, name, key)) {
        log_warn("gossip: member %s (%s) is not in the cluster keys; not sending to it", name,
                 endpoint);
        return NULL;
    }
    if (p == NULL) {
        m->peers = sp_realloc(m->peers, (m->npeers + 1) * sizeof *m->peers);
        p = &m->peers[m->npeers++];
        memset(p, 0, sizeof *p);
        sp_strlcpy(p->name, name, sizeof p->name);
    }
    transport_client_destroy(&p->client);
    sp_strlcpy(p->endpoint, endpoint, sizeof p->endpoint);
    p->client = transport_client_new(&m->tc, &m->self, key, endpoint);
    return p->client;
}

/* Sends one message and feeds the direct answer in the reply, if any, back
 * to the state machine. Failures are normal (the peer may be dead: that is
 * what the detector finds out) and logged at debug level only. */
static void send_one(membership_t *m, const gossip_msg_t *msg)
{
    const char *name = msg->to_id[0] ? msg->to_id : seed_name(m, msg->to_endpoint);
    if (name == NULL) {
        log_debug("gossip: no name for endpoint %s; message dropped", msg->to_endpoint);
        return;
    }
    transport_client_t *c = peer_client(m, name, msg->to_endpoint);
    if (c == NULL)
        return;
    wire_request_t req = {.kind = WIRE_GOSSIP, .gossip = *msg};
    uint8_t *head = NULL;
    size_t len = 0;
    if (wire_encode_request(&req, &head, &len) != 0)
        return;
    transport_response_t resp = {0};
    int rc = transport_call(c, head, len, NULL, 0, m->call_timeout_ms, &resp);
    free(head);
    if (rc != 0) {
        log_debug("gossip %d to %s (%s): %s", (int)msg->kind, name, msg->to_endpoint,
                  sp_strerror(rc));
        return;
    }
    wire_reply_t rep;
    char err[256];
    rc = wire_decode_reply(resp.head, resp.head_len, &rep, err, sizeof err);
    transport_response_free(&resp);
    if (rc != 0) {
        log_warn("gossip: malformed reply from %s (%s): %s", name, msg->to_endpoint, err);
        return;
    }
    if (rep.status != 0) {
        log_warn("gossip: %s (%s) refused message kind %d: %s", name, msg->to_endpoint,
                 (int)msg->kind, rep.error ? rep.error : sp_strerror(rep.status));
    } else if (rep.gossip.kind != 0) {
        /* The reply came over a CURVE link to the key listed for name, so its
         * sender must call itself name. */
        if (strcmp(rep.gossip.from_id, name) != 0) {
            log_warn("gossip: reply from %s (%s) claims to come from '%s'; ignored", name,
                     msg->to_endpoint, rep.gossip.from_id);
        } else {
            pthread_mutex_lock(&m->lock);
            rc = gossip_receive(m->g, sp_now_ms(), &rep.gossip);
            drain_outbox(m);
            log_changes(m);
            pthread_mutex_unlock(&m->lock);
            if (rc != 0)
                log_warn("gossip: reply from %s refused: %s", name, sp_strerror(rc));
        }
    }
    wire_reply_free(&rep);
}

static void sleep_ms(int64_t ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void *membership_main(void *arg)
{
    membership_t *m = arg;
    while (!atomic_load(&m->stop)) {
        pthread_mutex_lock(&m->lock);
        int64_t now = sp_now_ms();
        if (now >= gossip_next_deadline(m->g))
            gossip_tick(m->g, now);
        drain_outbox(m);
        log_changes(m);
        gossip_msg_t *batch = m->pending;
        size_t n = m->npending;
        m->pending = NULL;
        m->npending = m->cap = 0;
        int64_t deadline = gossip_next_deadline(m->g);
        pthread_mutex_unlock(&m->lock);

        for (size_t i = 0; i < n; i++) {
            if (!atomic_load(&m->stop))
                send_one(m, &batch[i]);
            gossip_msg_clear(&batch[i]);
        }
        free(batch);
        if (n == 0) {
            int64_t wait = deadline - sp_now_ms();
            if (wait > 0)
                sleep_ms(wait < MEMBERSHIP_MAX_SLEEP_MS ? wait : MEMBERSHIP_MAX_SLEEP_MS);
        }
    }
    return NULL;
}

/* Starts membership. gcfg describes this member (id, endpoint, site, role,
 * weight, timings); its seeds field is ignored and built from seeds (the own
 * endpoint or own name is skipped). self and allowed are borrowed and must
 * outlive the object; strings are copied. Returns 0 with *out owned by the
 * caller, or a negative code (with a log line). */
static int membership_start(const gossip_config_t *gcfg, const membership_seed_t *seeds,
                            size_t n_seeds, const keys_pair_t *self,
                            const keys_allowlist_t *allowed, membership_t **out)
{
    *out = NULL;
    membership_t *m = sp_calloc(1, sizeof *m);
    pthread_mutex_init(&m->lock, NULL);
    atomic_init(&m->stop, false);
    sp_strlcpy(m->self_id, gcfg->id, sizeof m->self_id);
    m->self = *self;
    m->allowed = allowed;
    const char **endpoints = sp_calloc(n_seeds ? n_seeds : 1, sizeof *endpoints);
    m->seeds = sp_calloc(n_seeds ? n_seeds : 1, sizeof *m->seeds);
    for (size_t i = 0; i < n_seeds; i++) {
        if (strcmp(seeds[i].name, gcfg->id) == 0 || strcmp(seeds[i].endpoint, gcfg->endpoint) == 0)
            continue;
        m->seeds[m->nseeds].name = sp_strdup(seeds[i].name);
        m->seeds[m->nseeds].endpoint = sp_strdup(seeds[i].endpoint);
        endpoints[m->nseeds] = m->seeds[m->nseeds].endpoint;
        m->nseeds++;
    }
    gossip_config_t cfg = *gcfg;
    cfg.seeds = endpoints;
    cfg.n_seeds = m->nseeds;
    cfg.public_key = self->public_z85;

    /* A probe's ACK is useless after probe_timeout, and a call blocks this
     * thread, so calls wait no longer than that and are not retried. */
    transport_config_defaults(&m->tc);
    m->tc.retries = 0;
    m->call_timeout_ms = (int)(gcfg->probe_timeout_ms > 0 ? gcfg->probe_timeout_ms : 300);
    m->tc.timeout_ms = m->call_timeout_ms;

    int rc = 0;
    m->g = gossip_new(&cfg, sp_now_ms());
    free(endpoints);
    if (m->g == NULL) {
        log_error("membership: invalid gossip configuration for %s", gcfg->id);
        rc = SP_ECONFIG;
        goto out;
    }
    m->logged_version = 0;
    log_info("membership: %s at %s (site %s, weight %g), incarnation %llu, %zu seeds", gcfg->id,
             gcfg->endpoint, gcfg->site, gcfg->weight,
             (unsigned long long)gcfg->initial_incarnation, m->nseeds);
    int err = pthread_create(&m->thread, NULL, membership_main, m);
    if (err != 0) {
        log_error("membership: cannot start thread: %s", strerror(err));
        rc = -err;
        goto out;
    }
    m->thread_started = true;
out:
    if (rc != 0)
        membership_stop(&m);
    *out = m;
    return rc;
}

/* Parses [cluster] seeds ("NAME@ENDPOINT, ...") into seeds (pointing into
 * buf, a copy the caller frees). Returns the count, or -1 with err filled. */
static int parse_seeds(const char *text, char **buf, membership_seed_t **seeds, char *err,
                       size_t errlen)
{
    *buf = sp_strdup(text);
    size_t cap = 1;
    for (const char *c = text; *c; c++)
        cap += *c == ',';
    *seeds = sp_calloc(cap, sizeof **seeds);
    int n = 0;
    char *save = NULL;
    for (char *tok = strtok_r(*buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        while (*tok == ' ' || *tok == '\t')
            tok++;
        char *end = tok + strlen(tok);
        while (end > tok && (end[-1] == ' ' || end[-1] == '\t'))
            *--end = '\0';
        if (*tok == '\0')
            continue;
        char *at = strchr(tok, '@');
        if (at == NULL || at == tok || strncmp(at + 1, "tcp://", 6) != 0) {
            sp_fmt(err, errlen, "[cluster] seeds: '%s' is not NAME@tcp://HOST:PORT", tok);
            return -1;
        }
        *at = '\0';
        (*seeds)[n].name = tok;
        (*seeds)[n].endpoint = at + 1;
        n++;
    }
    return n;
}

int membership_start_settings(const membership_settings_t *s, const membership_self_t *me,
                              const keys_pair_t *self, const keys_allowlist_t *allowed,
                              membership_t **out)
{
    char err[512];
    char *end = NULL;
    double weight = strtod(s->weight, &end);
    bool storage = me->role == GOSSIP_STORAGE;
    if (end == s->weight || *end != '\0' || !isfinite(weight) || weight < 0 ||
        (storage && weight == 0)) {
        log_error("[cluster] weight '%s' is not a number %s 0", s->weight, storage ? ">" : ">=");
        return SP_ECONFIG;
    }
    if (s->probe_timeout_ms >= s->probe_interval_ms) {
        log_error("[gossip] probe_timeout (%d ms) must be shorter than probe_interval (%d ms)",
                  s->probe_timeout_ms, s->probe_interval_ms);
        return SP_ECONFIG;
    }
    char *buf = NULL;
    membership_seed_t *seeds = NULL;
    int n = parse_seeds(s->seeds, &buf, &seeds, err, sizeof err);
    int rc = 0;
    if (n < 0) {
        log_error("%s", err);
        rc = SP_ECONFIG;
        goto out;
    }
    gossip_config_t gc;
    gossip_config_defaults(&gc);
    gc.id = me->id;
    gc.endpoint = s->advertise[0] ? s->advertise : me->endpoint;
    gc.site = me->site;
    gc.role = me->role;
    gc.weight = weight;
    gc.initial_state = me->initial_state;
    /* Wall-clock milliseconds outrank any incarnation of a previous life. */
    gc.initial_incarnation = (uint64_t)sp_wall_ms();
    gc.seed = (uint64_t)sp_wall_ms() ^ ((uint64_t)getpid() << 32);
    gc.probe_interval_ms = s->probe_interval_ms;
    gc.probe_timeout_ms = s->probe_timeout_ms;
    gc.indirect_checks = (unsigned)s->indirect_checks;
    gc.suspicion_mult = s->suspicion_mult;
    gc.suspicion_max_mult = s->suspicion_max_mult;
    gc.sync_interval_ms = s->sync_interval_ms;
    gc.down_to_out_ms = s->down_to_out_ms;
    rc = membership_start(&gc, seeds, (size_t)n, self, allowed, out);
out:
    free(seeds);
    free(buf);
    return rc;
}

void membership_stop(membership_t **mp)
{
    membership_t *m = *mp;
    if (m == NULL)
        return;
    atomic_store(&m->stop, true);
    if (m->thread_started)
        pthread_join(m->thread, NULL);
    for (size_t i = 0; i < m->npeers; i++)
        transport_client_destroy(&m->peers[i].client);
    free(m->peers);
    for (size_t i = 0; i < m->npending; i++)
        gossip_msg_clear(&m->pending[i]);
    free(m->pending);
    for (size_t i = 0; i < m->nseeds; i++) {
        free(m->seeds[i].name);
        free(m->seeds[i].endpoint);
    }
    free(m->seeds);
    free(m->view);
    gossip_destroy(&m->g);
    pthread_mutex_destroy(&m->lock);
    free(m);
    *mp = NULL;
}

int membership_handle(membership_t *m, const transport_request_t *req, const wire_request_t *w,
                      wire_reply_t *rep)
{
    const gossip_msg_t *msg = &w->gossip;
    char text[384];
    rep->kind = WIRE_GOSSIP;
    if (m == NULL) {
        wire_reply_error(rep, SP_EUNAVAIL, "membership not started yet");
        return SP_EUNAVAIL;
    }
    if (req->peer_name == NULL || strcmp(msg->from_id, req->peer_name) != 0) {
        sp_fmt(text, sizeof text, "gossip from_id '%s' is not the caller's name '%s'", msg->from_id,
               req->peer_name ? req->peer_name : "");
        log_warn("refused gossip message (kind %d) from %s (%s): %s", (int)msg->kind,
                 req->peer_name ? req->peer_name : "?", req->peer_key ? req->peer_key : "?", text);
        wire_reply_error(rep, SP_EPROTO, text);
        return SP_EPROTO;
    }
    pthread_mutex_lock(&m->lock);
    int rc = gossip_receive(m->g, sp_now_ms(), msg);
    if (rc == 0) {
        drain_outbox(m);
        gossip_kind_t want = msg->kind == GOSSIP_PING       ? GOSSIP_ACK
                             : msg->kind == GOSSIP_SYNC_REQ ? GOSSIP_SYNC
                                                            : (gossip_kind_t)0;
        for (size_t i = 0; want != 0 && i < m->npending; i++) {
            gossip_msg_t *p = &m->pending[i];
            if (p->kind != want || strcmp(p->to_id, msg->from_id) != 0)
                continue;
            if (want == GOSSIP_ACK && p->seq != msg->seq)
                continue;
            rep->gossip = *p; /* the reply now owns its updates */
            memmove(p, p + 1, (m->npending - i - 1) * sizeof *p);
            m->npending--;
            break;
        }
        log_changes(m);
    }
    pthread_mutex_unlock(&m->lock);
    if (rc != 0) {
        sp_fmt(text, sizeof text, "gossip message (kind %d) from %s refused: %s", (int)msg->kind,
               req->peer_name, sp_strerror(rc));
        log_warn("%s", text);
        wire_reply_error(rep, rc, text);
        return rc;
    }
    return 0;
}

size_t membership_view(membership_t *m, gossip_member_t **out)
{
    pthread_mutex_lock(&m->lock);
    size_t n = gossip_count(m->g);
    *out = sp_calloc(n ? n : 1, sizeof **out);
    n = gossip_snapshot(m->g, *out, n);
    pthread_mutex_unlock(&m->lock);
    return n;
}

uint64_t membership_view_version(membership_t *m)
{
    pthread_mutex_lock(&m->lock);
    uint64_t v = gossip_view_version(m->g);
    pthread_mutex_unlock(&m->lock);
    return v;
}

void membership_self(membership_t *m, gossip_member_t *out)
{
    pthread_mutex_lock(&m->lock);
    gossip_lookup(m->g, m->self_id, out); /* a member always knows itself */
    pthread_mutex_unlock(&m->lock);
}

gossip_state_t membership_self_state(membership_t *m)
{
    gossip_member_t me;
    membership_self(m, &me);
    return me.state;
}

int membership_set_self_state(membership_t *m, gossip_state_t state)
{
    pthread_mutex_lock(&m->lock);
    int rc = gossip_set_self_state(m->g, state);
    drain_outbox(m);
    pthread_mutex_unlock(&m->lock);
    if (rc == 0)
        log_info("membership: %s announces itself %s", m->self_id, gossip_state_name(state));
    return rc;
}

void membership_collect(void *ctx, admin_out_t *o)
{
    membership_t *m = ctx;
    gossip_member_t *view = NULL;
    size_t n = membership_view(m, &view);
    size_t count[2][GOSSIP_STATE_COUNT] = {{0}};
    for (size_t i = 0; i < n; i++)
        if ((unsigned)view[i].role < 2 && (unsigned)view[i].state < GOSSIP_STATE_COUNT)
            count[view[i].role][view[i].state]++;
    free(view);
    /* Every role and state, zeros too, so a query sees a state empty out. */
    admin_out_family(o, "shardpacs_gossip_members",
                     "Members in this process's gossip view by role and state", "gauge");
    for (int r = 0; r < 2; r++)
        for (int st = 0; st < GOSSIP_STATE_COUNT; st++) {
            char labels[96];
            sp_fmt(labels, sizeof labels, "role=\"%s\",state=\"%s\"",
                   r == GOSSIP_STORAGE ? "storage" : "router", gossip_state_name(st));
            admin_out_sample(o, "shardpacs_gossip_members", labels, (double)count[r][st]);
        }
    admin_out_family(o, "shardpacs_gossip_view_version",
                     "Version of this process's gossip view (rises at each change)", "gauge");
    admin_out_sample(o, "shardpacs_gossip_view_version", "", (double)membership_view_version(m));
}
