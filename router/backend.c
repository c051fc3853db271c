/* backend.c - placement from the gossiped view, sloppy-quorum writes with
 * stand-ins, scatter/gather queries and fallback reads for the router
 * (backend.h).
 *
 * Owns: the current view snapshot (view_t, reference-counted: a request
 * holds the one it started with while the backend moves on to a newer one),
 * the per-member avoid records (avoid_rec_t: members this router saw fail
 * and skips for a while - its own judgement, not gossip's DOWN state; kept
 * until the backend is destroyed so that every snapshot may point at them)
 * and a thread-local
 * table of transport clients per worker thread. Borrows the membership and
 * the key allow-list. */
#include "backend.h"

#include "../common/admin.h"
#include "../common/base.h"
#include "../common/log.h"
#include "../common/placement.h"
#include "../common/ring.h"
#include "../common/wire.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A view older than this is rebuilt even if its version did not move, so
 * that keys added to (or changed in) the cluster key file are picked up. */
#define VIEW_MAX_AGE_MS KEYS_RELOAD_INTERVAL_MS

/* What this router saw of one member at one endpoint: a call to it failed
 * (timeout, unreachable), so requests avoid it until `until`, unless gossip
 * has since seen it come back with a higher incarnation. After `until` the
 * member stays doubted until it answers a call: a write still goes to it,
 * but with a stand-in beside it, because gossip can call a member alive
 * (others reach it) while this router cannot (a partition between the two
 * alone), and a write counting on it would wait out the store timeout and
 * fail. Shared by every snapshot listing the member there; freed with the
 * backend. */
typedef struct avoid_rec {
    char id[GOSSIP_ID_MAX];
    char endpoint[GOSSIP_ENDPOINT_MAX];
    _Atomic int64_t until;        /* sp_now_ms() */
    _Atomic uint64_t incarnation; /* the member's incarnation when marked */
    _Atomic bool doubted;         /* failed a call and has not answered one since */
    struct avoid_rec *next;
} avoid_rec_t;

/* One storage member of a snapshot. */
typedef struct {
    char id[GOSSIP_ID_MAX];
    char endpoint[GOSSIP_ENDPOINT_MAX];
    char site[GOSSIP_SITE_MAX];
    char key[KEYS_Z85_LEN + 1]; /* from the cluster keys, by name; empty if absent */
    bool keyed;                 /* listed in the cluster keys: this router can reach it */
    uint64_t incarnation;
    gossip_state_t state;
    avoid_rec_t *avoid;
} member_t;

/* An immutable snapshot of the storage members (placed or readable, keyed
 * or not) and their placement. */
typedef struct {
    atomic_uint refs;
    uint64_t version; /* membership_view_version() it was built at */
    int64_t built_ms;
    gossip_member_t *g; /* the members as gossiped, sorted by id */
    member_t *m;        /* m[i] is this router's record of g[i] */
    size_t n;
    placement_t pl; /* over g: its indexes are indexes into m */
} view_t;

struct backend {
    backend_config_t cfg;
    pthread_mutex_t view_mu; /* guards view, avoids, warned_version */
    view_t *view;
    avoid_rec_t *avoids;
    uint64_t warned_version; /* members without a key were logged at this version */
    pthread_key_t conn_key;
};

/* Metrics (admin.h): process-wide series, registered by backend_new(). */
static admin_counter_t *backend_shortfalls, *backend_stand_ins;

/* ---- per-thread clients ------------------------------------------------- */

typedef struct {
    char id[GOSSIP_ID_MAX];
    char endpoint[GOSSIP_ENDPOINT_MAX];
    char key[KEYS_Z85_LEN + 1];
    transport_client_t *client;
} conn_entry_t;

/* One thread's connections: a transport client per member id, remade when
 * the member's endpoint or key changes. */
typedef struct {
    conn_entry_t *v;
    size_t n;
} conn_t;

static void conn_destroy(void *p)
{
    conn_t *c = p;
    for (size_t i = 0; i < c->n; i++)
        transport_client_destroy(&c->v[i].client);
    free(c->v);
    free(c);
}

static transport_client_t *client_for(backend_t *b, const member_t *m)
{
    conn_t *c = pthread_getspecific(b->conn_key);
    if (c == NULL) {
        c = sp_calloc(1, sizeof *c);
        pthread_setspecific(b->conn_key, c);
    }
    conn_entry_t *e = NULL;
    for (size_t i = 0; i < c->n && e == NULL; i++)
        if (strcmp(c->v[i].id, m->id) == 0)
            e = &c->v[i];
    if (e != NULL && strcmp(e->endpoint, m->endpoint) == 0 && strcmp(e->key, m->key) == 0)
        return e->client;
    if (e == NULL) {
        c->v = sp_realloc(c->v, (c->n + 1) * sizeof *c->v);
        e = &c->v[c->n++];
        memset(e, 0, sizeof *e);
        sp_strlcpy(e->id, m->id, sizeof e->id);
    }
    transport_client_destroy(&e->client);
    sp_strlcpy(e->endpoint, m->endpoint, sizeof e->endpoint);
    sp_strlcpy(e->key, m->key, sizeof e->key);
    e->client = transport_client_new(&b->cfg.transport, &b->cfg.self, m->key, m->endpoint);
    return e->client;
}

/* ---- views -------------------------------------------------------------- */

static void view_release(view_t *v)
{
    if (v == NULL || atomic_fetch_sub(&v->refs, 1) != 1)
        return;
    placement_clear(&v->pl);
    free(v->m);
    free(v->g);
    free(v);
}

/* The avoid record of a member at an endpoint, made on first use. Called
 * with view_mu held. */
static avoid_rec_t *avoid_rec(backend_t *b, const char *id, const char *endpoint)
{
    for (avoid_rec_t *d = b->avoids; d; d = d->next)
        if (strcmp(d->id, id) == 0 && strcmp(d->endpoint, endpoint) == 0)
            return d;
    avoid_rec_t *d = sp_calloc(1, sizeof *d);
    sp_strlcpy(d->id, id, sizeof d->id);
    sp_strlcpy(d->endpoint, endpoint, sizeof d->endpoint);
    atomic_init(&d->until, 0);
    atomic_init(&d->incarnation, 0);
    d->next = b->avoids;
    b->avoids = d;
    return d;
}

static int gossip_member_cmp(const void *a, const void *b)
{
    return strcmp(((const gossip_member_t *)a)->id, ((const gossip_member_t *)b)->id);
}

/* Builds a snapshot at `version` from a membership view (all[0..nall), as
 * membership_view() returns it): the storage members that are placed or
 * readable, whether or not their names are in the cluster keys. A member
 * without a key keeps its place in the placement, so this router computes
 * the same owners as the nodes; it is only unreachable from here (a
 * stand-in takes its writes). Called with view_mu held, or on a private
 * backend. */
static view_t *view_from(backend_t *b, const gossip_member_t *all, size_t nall, uint64_t version)
{
    view_t *v = sp_calloc(1, sizeof *v);
    atomic_init(&v->refs, 1);
    v->version = version;
    v->built_ms = sp_now_ms();
    v->g = sp_calloc(nall + 1, sizeof *v->g);
    for (size_t i = 0; i < nall; i++)
        if (placement_is_placed(&all[i]) || placement_is_readable(&all[i]))
            v->g[v->n++] = all[i];
    qsort(v->g, v->n, sizeof *v->g, gossip_member_cmp);
    v->m = sp_calloc(v->n + 1, sizeof *v->m);
    size_t unkeyed = 0;
    for (size_t i = 0; i < v->n; i++) {
        const gossip_member_t *g = &v->g[i];
        member_t *m = &v->m[i];
        sp_strlcpy(m->id, g->id, sizeof m->id);
        sp_strlcpy(m->endpoint, g->endpoint, sizeof m->endpoint);
        m->keyed = keys_allowlist_find_name(b->cfg.keys, g->id, m->key);
        if (!m->keyed) {
            m->key[0] = '\0';
            if (b->warned_version != version)
                log_warn("storage member %s (%s) is not in the cluster keys: it keeps its "
                         "partitions, but this router cannot reach it",
                         g->id, g->endpoint);
            unkeyed++;
        }
        m->incarnation = g->incarnation;
        m->state = g->state;
        m->avoid = avoid_rec(b, g->id, g->endpoint);
    }
    b->warned_version = version;
    placement_init(&v->pl, v->g, v->n, b->cfg.replicas > 0 ? (size_t)b->cfg.replicas : 0);
    log_debug("view %llu: %zu storage members, %zu placed, %zu previous owners, %zu without key",
              (unsigned long long)version, v->n, v->pl.nplaced, v->pl.nprev, unkeyed);
    return v;
}

/* Builds a snapshot of the membership view at `version` (read before the
 * view, so a change during the build only makes the next request rebuild).
 * Called with view_mu held. */
static view_t *view_build(backend_t *b, uint64_t version)
{
    gossip_member_t *all = NULL;
    size_t nall = membership_view(b->cfg.membership, &all);
    view_t *v = view_from(b, all, nall, version);
    free(all);
    return v;
}

/* The current snapshot, rebuilt first if the view moved on or the snapshot
 * is old; the caller releases it with view_release(). */
static view_t *view_acquire(backend_t *b)
{
    uint64_t version = membership_view_version(b->cfg.membership);
    pthread_mutex_lock(&b->view_mu);
    view_t *v = b->view;
    if (v == NULL || v->version != version || sp_now_ms() - v->built_ms > VIEW_MAX_AGE_MS) {
        v = view_build(b, version);
        view_release(b->view);
        b->view = v;
    }
    atomic_fetch_add(&v->refs, 1);
    pthread_mutex_unlock(&b->view_mu);
    return v;
}

backend_t *backend_new(const backend_config_t *cfg)
{
    backend_t *b = sp_calloc(1, sizeof *b);
    b->cfg = *cfg;
    /* The backend falls back across replicas itself; a transport-level
     * retry would only multiply the wait on a dead node. */
    b->cfg.transport.retries = 0;
    pthread_mutex_init(&b->view_mu, NULL);
    pthread_key_create(&b->conn_key, conn_destroy);
    /* Process-wide series: a second backend (tests) gets the same ones. */
    backend_shortfalls =
        admin_counter("shardpacs_router_quorum_shortfalls_total",
                      "Cluster puts that ended with fewer than W durable acknowledgements", "");
    backend_stand_ins = admin_counter("shardpacs_router_stand_ins_total",
                                      "Put copies sent to a stand-in for an unreachable owner", "");
    return b;
}

void backend_destroy(backend_t **bp)
{
    backend_t *b = *bp;
    if (b == NULL)
        return;
    /* Worker threads have exited by now, so their connections are closed;
     * the calling thread may still hold one. */
    conn_t *c = pthread_getspecific(b->conn_key);
    if (c) {
        conn_destroy(c);
        pthread_setspecific(b->conn_key, NULL);
    }
    pthread_key_delete(b->conn_key);
    view_release(b->view);
    while (b->avoids) {
        avoid_rec_t *d = b->avoids;
        b->avoids = d->next;
        free(d);
    }
    pthread_mutex_destroy(&b->view_mu);
    free(b);
    *bp = NULL;
}

size_t backend_placed_count(backend_t *b)
{
    view_t *v = view_acquire(b);
    size_t n = v->pl.nplaced;
    view_release(v);
    return n;
}

/* ---- placement ---------------------------------------------------------- */

/* Whether this router may send to a member: gossip says it is reachable
 * and the cluster keys list it (without its key, CURVE cannot connect). */
static bool reachable(const member_t *m)
{
    return m->keyed && gossip_state_reachable(m->state);
}
size_t backend_reachable_storage(backend_t *b)
{
    view_t *v = view_acquire(b);
    size_t n = 0;
    for (size_t i = 0; i < v->n; i++)
        n += reachable(&v->m[i]);
    view_release(v);
    return n;
}

/* Whether this router saw the member fail lately (see avoid_rec_t). */
static bool is_avoided(const member_t *m)
{
    return atomic_load(&m->avoid->until) > sp_now_ms() &&
           m->incarnation <= atomic_load(&m->avoid->incarnation);
}

/* Whether the member failed a call and has not answered one since (see
 * avoid_rec_t). Unlike avoidance, a higher incarnation does not end it: a
 * member this router alone cannot reach is suspected by it, refutes
 * through the others and so comes "back" again and again. */
static bool is_doubted(const member_t *m)
{
    return atomic_load(&m->avoid->doubted);
}

/* Records that the member answered a call: it is no longer doubted. */
static void avoid_answered(const member_t *m)
{
    if (atomic_load(&m->avoid->doubted) && atomic_exchange(&m->avoid->doubted, false))
        log_info("node %s (%s) answers again", m->id, m->endpoint);
}

/* Records that a call to the member failed with rc: requests avoid it for
 * avoid_failed_ms unless gossip sees it come back, and writes doubt it
 * until it answers. */
static void avoid_failed(backend_t *b, const member_t *m, int rc)
{
    int64_t now = sp_now_ms();
    atomic_store(&m->avoid->incarnation, m->incarnation);
    atomic_store(&m->avoid->doubted, true);
    if (atomic_exchange(&m->avoid->until, now + b->cfg.avoid_failed_ms) < now)
        log_warn("node %s (%s) did not answer: %s; requests skip it for %d ms unless gossip "
                 "sees it back",
                 m->id, m->endpoint, sp_strerror(rc), b->cfg.avoid_failed_ms);
}

static bool contains(const size_t *set, size_t n, size_t x)
{
    for (size_t i = 0; i < n; i++)
        if (set[i] == x)
            return true;
    return false;
}

/* A partition's write plan: the owners that get the put themselves, and a
 * stand-in for each owner that is unreachable (DOWN, or not in this
 * router's keys), avoided or doubted, taken from the extended preference
 * list (placement_preference) among members that are reachable, neither
 * avoided nor doubted, and not owners themselves. A doubted owner is a
 * target too: the put does not wait for it once W others answered. */
typedef struct {
    size_t owners[RING_MAX_REPLICAS];
    size_t nowners;
    size_t targets[2 * RING_MAX_REPLICAS]; /* owners first, then stand-ins */
    size_t ntargets;
    size_t nstand_ins;
    size_t missing[RING_MAX_REPLICAS]; /* owners without a target of their own, or doubted */
    size_t nmissing;
} plan_t;

static void plan_partition(const view_t *v, uint32_t partition, const char *study, plan_t *p)
{
    memset(p, 0, sizeof *p);
    p->nowners = placement_owners(&v->pl, partition, p->owners);
    bool failed[RING_MAX_REPLICAS]; /* judged once: the clock moves */
    for (size_t i = 0; i < p->nowners; i++) {
        const member_t *o = &v->m[p->owners[i]];
        failed[i] = reachable(o) && is_avoided(o);
        if (reachable(o) && !failed[i])
            p->targets[p->ntargets++] = p->owners[i];
        else if (!reachable(o))
            p->missing[p->nmissing++] = p->owners[i];
    }
    /* Owners only this router saw fail come last: when stand-ins are too
     * few, those are the ones a put may still try (backend_put). Doubted
     * owners, targets already, get a stand-in only after all of them. */
    for (size_t i = 0; i < p->nowners; i++)
        if (failed[i])
            p->missing[p->nmissing++] = p->owners[i];
    for (size_t i = 0; i < p->nowners; i++)
        if (reachable(&v->m[p->owners[i]]) && !failed[i] && is_doubted(&v->m[p->owners[i]]))
            p->missing[p->nmissing++] = p->owners[i];
    if (p->nmissing == 0)
        return;
    size_t ext[RING_MAX_REPLICAS];
    size_t k = placement_preference(&v->pl, partition, ext);
    for (size_t i = 0; i < k && p->nstand_ins < p->nmissing; i++) {
        size_t c = ext[i];
        const member_t *m = &v->m[c];
        if (!reachable(m) || is_avoided(m) || is_doubted(m) || contains(p->owners, p->nowners, c))
            continue;
        if (study)
            log_debug("study %s partition %u: %s stands in for %s", study, partition, m->id,
                      v->m[p->missing[p->nstand_ins]].id);
        p->targets[p->ntargets++] = c;
        p->nstand_ins++;
    }
}

/* The read candidates of a partition, in the order they are asked (see
 * backend.h), de-duplicated; members not reachable are left out. The
 * owners that are neither joining nor avoided come first, rotated by
 * spread. Writes at most v->n indexes into out and returns the count. */
static size_t read_candidates(const view_t *v, uint32_t partition, unsigned spread, size_t *out)
{
    plan_t p;
    plan_partition(v, partition, NULL, &p);
    size_t n = 0;
    /* The owners that should have everything, rotated among themselves. */
    size_t first[RING_MAX_REPLICAS], nfirst = 0;
    for (size_t i = 0; i < p.nowners; i++) {
        const member_t *o = &v->m[p.owners[i]];
        if (reachable(o) && o->state != GOSSIP_JOINING)
            first[nfirst++] = p.owners[i];
    }
    for (size_t i = 0; i < nfirst; i++)
        out[n++] = first[(i + spread) % nfirst];
    for (size_t i = p.ntargets - p.nstand_ins; i < p.ntargets; i++)
        if (!contains(out, n, p.targets[i]))
            out[n++] = p.targets[i];
    size_t prev[RING_MAX_REPLICAS];
    size_t k = placement_previous_owners(&v->pl, partition, prev);
    for (size_t i = 0; i < k; i++)
        if (reachable(&v->m[prev[i]]) && !contains(out, n, prev[i]))
            out[n++] = prev[i];
    /* Joining owners are still filling: asked after the previous owners. */
    for (size_t i = 0; i < p.nowners; i++)
        if (reachable(&v->m[p.owners[i]]) && !contains(out, n, p.owners[i]))
            out[n++] = p.owners[i];
    return n;
}

/* ---- put ---------------------------------------------------------------- */

/* transport_call_many acceptance test: the replica stored the instance, or
 * already held identical bytes. */
static bool put_acknowledged(void *ctx, size_t index, const transport_response_t *resp)
{
    (void)ctx;
    (void)index;
    wire_reply_t rep;
    char err[128];
    if (wire_decode_reply(resp->head, resp->head_len, &rep, err, sizeof err) != 0)
        return false;
    bool ok = rep.status == 0 && rep.kind == WIRE_PUT && rep.outcome != WIRE_CONFLICT &&
              rep.outcome != WIRE_CONFLICT_LIMIT;
    wire_reply_free(&rep);
    return ok;
}

/* Counts one replica's answer into res. A replica still writing when the
 * quorum was reached is neither acknowledged nor failed: its copy lands
 * later (its reply is discarded), so it must not be avoided. */
static void tally_put(backend_t *b, const member_t *m, transport_call_t *call, bool quorum,
                      backend_put_result_t *res)
{
    wire_reply_t rep;
    char err[256];
    int rc = call->rc;
    if (quorum && rc == SP_ETIMEOUT) {
        res->pending++;
        return;
    }
    if (rc == 0) {
        avoid_answered(m);
        rc = wire_decode_reply(call->resp.head, call->resp.head_len, &rep, err, sizeof err);
    } else {
        sp_fmt(err, sizeof err, "%s", sp_strerror(rc));
    }
    if (rc == 0 && rep.status == 0 && rep.outcome != WIRE_CONFLICT &&
        rep.outcome != WIRE_CONFLICT_LIMIT) {
        res->acknowledged++;
        res->superseded += rep.outcome == WIRE_REPLACED || rep.outcome == WIRE_KEPT_ASIDE;
    } else if (rc == 0 && rep.status == 0) {
        res->conflicts++;
    } else {
        res->failed++;
        /* The replica read the object and refused it: malformed, or over a
         * size limit. Another attempt would be refused the same way. */
        int why = rc == 0 ? rep.status : rc;
        if (why == SP_EINVAL || why == SP_ETOOBIG)
            res->permanent++;
        if (rc == 0)
            sp_fmt(err, sizeof err, "%s", rep.error ? rep.error : sp_strerror(rep.status));
        if (res->detail[0] == '\0')
            sp_fmt(res->detail, sizeof res->detail, "%s: %s", m->id, err);
        if (call->rc == SP_ETIMEOUT || call->rc == SP_EUNAVAIL)
            avoid_failed(b, m, call->rc);
    }
    if (rc == 0)
        wire_reply_free(&rep);
}

/* res->detail for a put that cannot reach W targets: the owners without a
 * target of their own and why, shortest first (it ends up in a 64-character
 * Error Comment). */
static void describe_shortage(const view_t *v, const plan_t *p, backend_put_result_t *res)
{
    if (p->nowners == 0) {
        sp_fmt(res->detail, sizeof res->detail, "no storage member known");
        return;
    }
    size_t at = 0;
    for (size_t i = 0; i < p->nmissing && at < sizeof res->detail; i++) {
        const member_t *m = &v->m[p->missing[i]];
        at += (size_t)snprintf(res->detail + at, sizeof res->detail - at, "%s%s %s",
                               i == 0 ? "" : ", ", m->id,
                               reachable(m) ? "not answering"
                               : m->keyed   ? gossip_state_name(m->state)
                                            : "without key");
    }
    if (at < sizeof res->detail)
        snprintf(res->detail + at, sizeof res->detail - at, "%sonly %zu targets", at ? "; " : "",
                 p->ntargets);
}

/* A put's deadline: the store timeout, and the time its bytes take at the
 * slowest rate a healthy cluster writes at, so a large object is not
 * answered "retry later" while the replicas are still writing it. */
static int put_timeout_ms(const backend_t *b, size_t len)
{
    int64_t ms = b->cfg.store_timeout_ms;
    if (b->cfg.store_min_rate > 0)
        ms += (int64_t)(len / b->cfg.store_min_rate * 1000 +
                        len % b->cfg.store_min_rate * 1000 / b->cfg.store_min_rate);
    return ms > INT32_MAX ? INT32_MAX : (int)ms;
}

int backend_put(backend_t *b, const attrs_t *attrs, transport_body_t *object,
                backend_put_result_t *res)
{
    size_t len;
    const uint8_t *part10 = transport_body_data(object, &len);
    memset(res, 0, sizeof *res);
    res->needed = b->cfg.write_quorum;
    const char *study = attrs_get(attrs, ATTR_STUDY_INSTANCE_UID);
    if (study == NULL)
        return SP_EINVAL;
    view_t *v = view_acquire(b);
    wire_request_t req = {.kind = WIRE_PUT, .partition = ring_partition(study)};
    plan_t p;
    plan_partition(v, req.partition, study, &p);
    /* An owner only this router saw fail (gossip still calls it reachable)
     * and left without a stand-in gets the put anyway: it may be back
     * already, and the put does not wait for it once W others answered. */
    for (size_t i = p.nstand_ins; i < p.nmissing; i++)
        if (reachable(&v->m[p.missing[i]]) && !contains(p.targets, p.ntargets, p.missing[i]))
            p.targets[p.ntargets++] = p.missing[i];
    res->stand_ins = (int)p.nstand_ins;
    admin_add(backend_stand_ins, p.nstand_ins);
    if (p.ntargets < (size_t)b->cfg.write_quorum) {
        /* W cannot be reached: nothing is written, the modality retries. */
        admin_add(backend_shortfalls, 1);
        describe_shortage(v, &p, res);
        view_release(v);
        return SP_EUNAVAIL;
    }
    for (size_t i = 0; i < ATTR_STORED_COUNT; i++)
        req.attrs.v[i] = attrs->v[i]; /* borrowed for encoding only */
    sp_digest(part10, len, req.digest);
    /* Replicas order versions of a SOP by this time, never by arrival. */
    req.version = (uint64_t)sp_wall_ms();
    req.policy = b->cfg.duplicates;
    uint8_t *head;
    size_t head_len;
    wire_encode_request(&req, &head, &head_len);

    size_t n = p.ntargets;
    transport_call_t calls[2 * RING_MAX_REPLICAS];
    for (size_t i = 0; i < n; i++)
        calls[i] = (transport_call_t){.client = client_for(b, &v->m[p.targets[i]]),
                                      .head = head,
                                      .head_len = head_len,
                                      .shared = object};
    size_t acked = transport_call_many(calls, n, (size_t)b->cfg.write_quorum,
                                       put_timeout_ms(b, len), put_acknowledged, NULL);
    bool quorum = acked >= (size_t)b->cfg.write_quorum;
    free(head);
    for (size_t i = 0; i < n; i++) {
        tally_put(b, &v->m[p.targets[i]], &calls[i], quorum, res);
        if (calls[i].rc == 0)
            transport_response_free(&calls[i].resp);
    }
    view_release(v);
    if (res->conflicts > 0)
        return SP_ECONFLICT;
    if (res->acknowledged >= b->cfg.write_quorum)
        return 0;
    admin_add(backend_shortfalls, 1);
    return res->permanent > 0 && res->permanent == res->failed ? SP_EINVAL : SP_EUNAVAIL;
}

/* ---- find --------------------------------------------------------------- */

/* A UID list longer than this is sent in several requests, each listing at
 * most this many bytes of it (about 1,000 UIDs): far within what a node
 * accepts (WIRE_MAX_UID_LIST), so a request stays small whatever the
 * requester sent, and each batch goes only to the replicas of its studies. */
#define UID_BATCH_BYTES (64 * 1024)

/* The read candidates of one study, leaving out the members this router saw
 * fail while another is up, so that a query (and every retrieve) does not
 * wait out the timeout on a dead node. Writes at most v->n indexes into out
 * and returns the count. */
static size_t study_candidates(const view_t *v, const char *study, size_t *out)
{
    size_t *cand = sp_calloc(v->n + 1, sizeof *cand);
    size_t k = read_candidates(v, ring_partition(study), 0, cand);
    size_t up = 0, n = 0;
    for (size_t i = 0; i < k; i++)
        up += !is_avoided(&v->m[cand[i]]);
    for (size_t i = 0; i < k; i++)
        if (up == 0 || !is_avoided(&v->m[cand[i]]))
            out[n++] = cand[i];
    free(cand);
    return n;
}

/* Marks as targets the read candidates of every study UID in a
 * "uid1\uid2" list; returns how many members were added. */
static size_t study_targets(const view_t *v, const char *list, bool *target)
{
    size_t count = 0;
    size_t *cand = sp_calloc(v->n + 1, sizeof *cand);
    char *copy = sp_strdup(list), *save = NULL;
    for (char *uid = strtok_r(copy, "\\", &save); uid; uid = strtok_r(NULL, "\\", &save)) {
        size_t k = study_candidates(v, uid, cand);
        for (size_t i = 0; i < k; i++) {
            count += !target[cand[i]];
            target[cand[i]] = true;
        }
    }
    free(copy);
    free(cand);
    return count;
}

/* Whether a failed call says the member is down (then it is avoided for a
 * while) rather than that this one request was refused or too big. */
static bool member_failure(int rc)
{
    return rc == SP_ETIMEOUT || rc == SP_EUNAVAIL;
}

typedef struct {
    const char *key;
    const attrs_t *match;
} merged_t;

static int merged_cmp(const void *a, const void *b)
{
    return strcmp(((const merged_t *)a)->key, ((const merged_t *)b)->key);
}

/* Sends one find to the chosen members and collects every decoded reply
 * (replies[i] for member i). Returns 0 when at least one member answered;
 * otherwise SP_ETOOBIG when the query cannot be encoded (a key over the wire
 * limits), SP_EINVAL when the members refused it as malformed, another
 * refusal's code, or SP_EUNAVAIL when none answered at all. A member that
 * did not answer is avoided for a while; one that refused is not. */
static int find_gather(backend_t *b, const view_t *v, level_t level, const attrs_t *keys,
                       size_t limit, const bool *target, wire_reply_t *replies, bool *partial,
                       bool *truncated)
{
    wire_request_t req = {.kind = WIRE_FIND,
                          .level = level,
                          .case_insensitive_names = b->cfg.case_insensitive_names,
                          .limit = limit > UINT32_MAX ? 0 : (uint32_t)limit};
    for (size_t i = 0; i < ATTR_COUNT; i++)
        req.attrs.v[i] = keys->v[i];
    uint8_t *head;
    size_t head_len;
    int rc = wire_encode_request(&req, &head, &head_len);
    if (rc != 0) {
        log_warn("find at %s level not sent: %s", attr_level_name(level), sp_strerror(rc));
        return rc;
    }
    transport_call_t *calls = sp_calloc(v->n + 1, sizeof *calls);
    size_t *which = sp_calloc(v->n + 1, sizeof *which);
    size_t n = 0;
    for (size_t i = 0; i < v->n; i++) {
        if (!target[i])
            continue;
        which[n] = i;
        calls[n++] = (transport_call_t){
            .client = client_for(b, &v->m[i]), .head = head, .head_len = head_len};
    }
    transport_call_many(calls, n, n, b->cfg.query_timeout_ms, NULL, NULL);
    free(head);
    size_t answered = 0;
    int refused = 0;
    for (size_t i = 0; i < n; i++) {
        char err[256];
        const member_t *m = &v->m[which[i]];
        wire_reply_t *rep = &replies[which[i]];
        rc = calls[i].rc;
        if (rc == 0) {
            avoid_answered(m);
            rc = wire_decode_response(&calls[i].resp, rep, err, sizeof err);
            transport_response_free(&calls[i].resp);
            if (rc == 0 && rep->status != 0) {
                log_warn("find on node %s failed: %s", m->id,
                         rep->error ? rep->error : sp_strerror(rep->status));
                rc = rep->status;
                /* The node could not decode or check the query: the
                 * requester's identifier is at fault, not the node. */
                refused = rc == SP_EPROTO || rc == SP_EINVAL ? SP_EINVAL : rc;
                wire_reply_free(rep);
            } else if (rc != 0) {
                log_warn("find on node %s: malformed reply: %s", m->id, err);
            }
        } else if (member_failure(rc)) {
            avoid_failed(b, m, rc);
        } else {
            log_warn("find on node %s failed: %s", m->id, sp_strerror(rc));
        }
        if (rc == 0) {
            answered++;
            *truncated |= rep->truncated;
        } else {
            *partial = true;
        }
    }
    free(calls);
    free(which);
    return answered ? 0 : refused ? refused : SP_EUNAVAIL;
}

/* The UID key of a query to split into batches: the longest UID list over
 * UID_BATCH_BYTES, or ATTR_COUNT when every key is short enough to send as
 * it is. */
static attr_id_t split_key(const attrs_t *q)
{
    attr_id_t best = ATTR_COUNT;
    size_t longest = UID_BATCH_BYTES;
    for (size_t i = 0; i < ATTR_COUNT; i++) {
        const char *v = q->v[i];
        if (v && attr_info((attr_id_t)i)->kind == MATCH_UID && strlen(v) > longest) {
            longest = strlen(v);
            best = (attr_id_t)i;
        }
    }
    return best;
}

/* The next batch of a UID list, from *pos: whole UIDs up to UID_BATCH_BYTES
 * (at least one). Returns a malloc'd "uid1\uid2" list, or NULL when the list
 * is used up. */
static char *next_batch(const char *list, size_t *pos)
{
    size_t len = strlen(list);
    if (*pos >= len)
        return NULL;
    size_t start = *pos, end = start, at = start;
    while (at <= len) {
        const char *sep = strchr(list + at, '\\');
        size_t uid_end = sep ? (size_t)(sep - list) : len;
        if (end > start && uid_end - start > UID_BATCH_BYTES)
            break; /* this UID starts the next batch */
        end = uid_end;
        at = uid_end + 1;
    }
    *pos = end + 1; /* past the separator */
    return sp_strndup(list + start, end - start);
}

/* Among the replicas' records for one key (all[i..] while the key is equal)
 * picks the one counting the most instances: a replica that missed writes
 * while it was down answers with smaller counts until it is repaired, and the
 * larger count is the one the cluster can serve. */
static const attrs_t *most_complete(const merged_t *all, size_t i, size_t k, level_t level)
{
    static const attr_id_t count_of[] = {ATTR_NUM_PATIENT_INSTANCES, ATTR_NUM_STUDY_INSTANCES,
                                         ATTR_NUM_SERIES_INSTANCES};
    const attrs_t *best = all[i].match;
    if (level == LEVEL_IMAGE)
        return best;
    for (size_t j = i + 1; j < k && strcmp(all[j].key, all[i].key) == 0; j++) {
        const char *have = attrs_get(best, count_of[level]);
        const char *other = attrs_get(all[j].match, count_of[level]);
        if (have && other && strtoull(other, NULL, 10) > strtoull(have, NULL, 10))
            best = all[j].match;
    }
    return best;
}

static bool wants_patient_counts(const attrs_t *keys)
{
    return attrs_get(keys, ATTR_NUM_PATIENT_STUDIES) || attrs_get(keys, ATTR_NUM_PATIENT_SERIES) ||
           attrs_get(keys, ATTR_NUM_PATIENT_INSTANCES);
}

typedef struct {
    uint64_t studies, series, instances;
} patient_totals_t;

static int add_study_counts(void *ctx, const attrs_t *study)
{
    patient_totals_t *t = ctx;
    t->studies++;
    t->series += strtoull(attrs_str(study, ATTR_NUM_STUDY_SERIES), NULL, 10);
    t->instances += strtoull(attrs_str(study, ATTR_NUM_STUDY_INSTANCES), NULL, 10);
    return 0;
}

/* A node counts only the studies it holds, so once a patient's studies are
 * spread over more nodes than one replica set, the NumberOfPatientRelated*
 * counts must be summed over the patient's studies cluster-wide: a
 * STUDY-level query (merged without duplicates) gives each study once. */
static int emit_with_patient_totals(backend_t *b, const attrs_t *patient, backend_match_fn fn,
                                    void *ctx)
{
    attrs_t q = {0}, out = {0};
    attrs_set(&q, ATTR_PATIENT_ID, attrs_str(patient, ATTR_PATIENT_ID));
    attrs_set(&q, ATTR_NUM_STUDY_SERIES, "");
    attrs_set(&q, ATTR_NUM_STUDY_INSTANCES, "");
    patient_totals_t t = {0};
    int rc = backend_find(b, LEVEL_STUDY, &q, 0, add_study_counts, &t, NULL);
    attrs_clear(&q);
    if (rc != 0)
        return rc;
    attrs_copy(&out, patient);
    if (attrs_get(patient, ATTR_NUM_PATIENT_STUDIES))
        attrs_set_count(&out, ATTR_NUM_PATIENT_STUDIES, t.studies);
    if (attrs_get(patient, ATTR_NUM_PATIENT_SERIES))
        attrs_set_count(&out, ATTR_NUM_PATIENT_SERIES, t.series);
    if (attrs_get(patient, ATTR_NUM_PATIENT_INSTANCES))
        attrs_set_count(&out, ATTR_NUM_PATIENT_INSTANCES, t.instances);
    rc = fn(ctx, &out);
    attrs_clear(&out);
    return rc;
}

/* Sorts every match of replies[0..n) by the level's unique key into a new
 * array (*all, caller frees; entries borrow the replies), equal keys
 * adjacent. Returns the count. */
static size_t merge_replies(const wire_reply_t *replies, size_t n, level_t level, merged_t **all)
{
    size_t total = 0, k = 0;
    for (size_t i = 0; i < n; i++)
        total += replies[i].nmatches;
    *all = sp_calloc(total ? total : 1, sizeof **all);
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < replies[i].nmatches; j++)
            (*all)[k++] = (merged_t){attrs_str(&replies[i].matches[j], attr_unique_key(level)),
                                     &replies[i].matches[j]};
    qsort(*all, k, sizeof **all, merged_cmp);
    return k;
}

/* Whether replies[0..n) hold more than limit distinct matches. */
static bool over_limit(const wire_reply_t *replies, size_t n, level_t level, size_t limit)
{
    merged_t *all;
    size_t k = merge_replies(replies, n, level, &all), distinct = 0;
    for (size_t i = 0; i < k && distinct <= limit; i++)
        distinct += i == 0 || strcmp(all[i].key, all[i - 1].key) != 0;
    free(all);
    return distinct > limit;
}

/* Chooses the members one request of a query goes to: the read candidates
 * of the studies its StudyInstanceUID key names, else every reachable
 * storage member not avoided (if all are, every reachable one anyway). */
static void find_targets(const view_t *v, const attrs_t *q, bool *target)
{
    memset(target, 0, (v->n + 1) * sizeof *target);
    const char *studies = attrs_get(q, ATTR_STUDY_INSTANCE_UID);
    size_t ntarget = 0;
    if (studies && studies[0] && !strchr(studies, '*') && !strchr(studies, '?'))
        ntarget = study_targets(v, studies, target);
    if (ntarget == 0) {
        for (size_t i = 0; i < v->n; i++)
            ntarget += target[i] = reachable(&v->m[i]) && !is_avoided(&v->m[i]);
        if (ntarget == 0)
            for (size_t i = 0; i < v->n; i++)
                target[i] = reachable(&v->m[i]);
    }
}

int backend_find(backend_t *b, level_t level, const attrs_t *keys, size_t limit,
                 backend_match_fn fn, void *ctx, bool *partial)
{
    view_t *v = view_acquire(b);
    bool *target = sp_calloc(v->n + 1, sizeof *target);
    /* The unique key is always needed to merge replicas' answers. */
    attrs_t q = {0};
    attrs_copy(&q, keys);
    if (attrs_get(&q, attr_unique_key(level)) == NULL)
        attrs_set(&q, attr_unique_key(level), "");
    /* A long UID list goes out in batches, one request per batch; the
     * replies of all batches are merged as one (a match found through two
     * batches, or on two replicas, counts once). Memory: each batch brings
     * at most limit + 1 matches per member asked, and batching stops once
     * more than limit distinct matches arrived. */
    attr_id_t split = split_key(&q);
    char *whole = NULL;
    if (split < ATTR_COUNT) {
        whole = q.v[split];
        q.v[split] = NULL;
    }
    size_t pos = 0, nrep = 0;
    wire_reply_t *replies = NULL;
    bool part = false, truncated = false;
    int rc = 0;
    for (;;) {
        if (whole) {
            char *batch = next_batch(whole, &pos);
            if (batch == NULL)
                break;
            attrs_take(&q, split, batch);
        }
        find_targets(v, &q, target);
        replies = sp_realloc(replies, (nrep + v->n + 1) * sizeof *replies);
        memset(replies + nrep, 0, (v->n + 1) * sizeof *replies);
        rc = find_gather(b, v, level, &q, limit ? limit + 1 : 0, target, replies + nrep, &part,
                         &truncated);
        nrep += v->n;
        if (rc != 0 || whole == NULL || (limit && truncated) ||
            (limit && over_limit(replies, nrep, level, limit)))
            break;
    }
    free(whole);

    merged_t *all;
    size_t k = rc == 0 ? merge_replies(replies, nrep, level, &all) : 0;
    if (rc != 0)
        all = NULL;
    size_t emitted = 0;
    for (size_t i = 0; rc == 0 && i < k; i++) {
        if (i > 0 && strcmp(all[i].key, all[i - 1].key) == 0)
            continue;
        all[i].match = most_complete(all, i, k, level);
        if (limit && emitted == limit) {
            rc = SP_ELIMIT;
            break;
        }
        emitted++;
        rc = level == LEVEL_PATIENT && wants_patient_counts(keys)
                 ? emit_with_patient_totals(b, all[i].match, fn, ctx)
                 : fn(ctx, all[i].match);
    }
    if (rc == 0 && truncated)
        rc = SP_ELIMIT;
    free(all);
    for (size_t i = 0; i < nrep; i++)
        wire_reply_free(&replies[i]);
    free(replies);
    free(target);
    attrs_clear(&q);
    view_release(v);
    if (partial)
        *partial = part;
    return rc;
}

/* ---- list --------------------------------------------------------------- */

/* Instances asked for per LIST page; a node also ends a page at its byte
 * budget (WIRE_PAGE_BYTES), so a page is at most about 512 KiB. */
#define LIST_PAGE 4000

/* One read candidate's listing while backend_list merges them. */
typedef struct {
    size_t member;    /* index into the view */
    wire_reply_t rep; /* the current page */
    size_t pos;       /* its next instance to merge */
    char *cursor;     /* where the next page starts; NULL: no more pages */
    bool started;     /* the first page was asked for */
    bool failed;      /* did not answer, or refused: left out from then on */
} lister_t;

/* Whether a lister has no instance ready but more to ask for. */
static bool lister_empty(const lister_t *l)
{
    return !l->failed && l->pos == l->rep.ninstances && (!l->started || l->cursor != NULL);
}

/* Asks every lister that ran out for its next page, all at once. Returns
 * how many were asked. */
static size_t list_refill(backend_t *b, const view_t *v, lister_t *ls, size_t n, const char *study,
                          const char *series)
{
    transport_call_t *calls = sp_calloc(n + 1, sizeof *calls);
    size_t *which = sp_calloc(n + 1, sizeof *which);
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        if (!lister_empty(&ls[i]))
            continue;
        wire_request_t req = {.kind = WIRE_LIST,
                              .study_uid = (char *)study,
                              .series_uid = (char *)series,
                              .cursor = ls[i].cursor,
                              .limit = LIST_PAGE};
        uint8_t *head;
        size_t head_len;
        int erc = wire_encode_request(&req, &head, &head_len);
        SP_ASSERT(erc == 0); /* UIDs and a cursor: no size check applies */
        which[k] = i;
        calls[k++] = (transport_call_t){
            .client = client_for(b, &v->m[ls[i].member]), .head = head, .head_len = head_len};
    }
    if (k > 0)
        transport_call_many(calls, k, k, b->cfg.query_timeout_ms, NULL, NULL);
    for (size_t j = 0; j < k; j++) {
        lister_t *l = &ls[which[j]];
        const member_t *m = &v->m[l->member];
        char err[256];
        int rc = calls[j].rc;
        wire_reply_free(&l->rep);
        l->pos = 0;
        l->started = true;
        free(l->cursor);
        l->cursor = NULL;
        if (rc == 0) {
            rc = wire_decode_response(&calls[j].resp, &l->rep, err, sizeof err);
            transport_response_free(&calls[j].resp);
            if (rc == 0 && l->rep.status != 0) {
                sp_fmt(err, sizeof err, "%s", l->rep.error ? l->rep.error : "");
                rc = l->rep.status;
            } else if (rc == 0 && l->rep.kind != WIRE_LIST) {
                sp_fmt(err, sizeof err, "a %s reply", wire_kind_name(l->rep.kind));
                rc = SP_EPROTO;
            } else if (rc == 0 && l->rep.ninstances == 0 && l->rep.next_cursor != NULL) {
                /* An empty page that is not the last would never end. */
                sp_fmt(err, sizeof err, "an empty page with a cursor");
                rc = SP_EPROTO;
            }
        } else {
            sp_fmt(err, sizeof err, "%s", sp_strerror(rc));
            if (member_failure(rc))
                avoid_failed(b, m, rc);
        }
        if (rc != 0) {
            log_warn("listing study %s on node %s failed: %s (%s)", study, m->id, err,
                     sp_strerror(rc));
            wire_reply_free(&l->rep);
            l->failed = true;
        } else {
            l->cursor = l->rep.next_cursor;
            l->rep.next_cursor = NULL;
        }
        free((void *)calls[j].head);
    }
    free(calls);
    free(which);
    return k;
}

/* Orders two listed instances of one study as a node's key order does:
 * series UID, then SOP Instance UID (UIDs have no NUL, so strcmp on each
 * part equals comparing the keys bytewise). */
static int listed_cmp(const wire_instance_t *a, const wire_instance_t *b)
{
    int c = strcmp(a->series_uid, b->series_uid);
    return c ? c : strcmp(a->sop_uid, b->sop_uid);
}

int backend_list(backend_t *b, const char *study_uid, const char *series_uid,
                 backend_instance_fn fn, void *ctx, bool *partial)
{
    view_t *v = view_acquire(b);
    size_t *cand = sp_calloc(v->n + 1, sizeof *cand);
    size_t n = study_candidates(v, study_uid, cand);
    lister_t *ls = sp_calloc(n + 1, sizeof *ls);
    for (size_t i = 0; i < n; i++)
        ls[i].member = cand[i];
    free(cand);
    /* A k-way merge of the candidates' listings, which all come in the same
     * key order: the smallest instance at the heads is passed on once, and
     * every head equal to it moves on. The union is what the cluster holds:
     * a replica that missed a write (down, or the quorum reached without
     * it) is completed by the others. Only one page per candidate is held
     * at a time. */
    int rc = 0;
    for (;;) {
        list_refill(b, v, ls, n, study_uid, series_uid);
        const wire_instance_t *min = NULL;
        for (size_t i = 0; i < n; i++)
            if (!ls[i].failed && ls[i].pos < ls[i].rep.ninstances) {
                const wire_instance_t *h = &ls[i].rep.instances[ls[i].pos];
                if (min == NULL || listed_cmp(h, min) < 0)
                    min = h;
            }
        if (min == NULL)
            break;
        rc = fn(ctx, min);
        if (rc != 0)
            break;
        wire_instance_t key = *min; /* borrowed: the heads move below */
        key.series_uid = sp_strdup(min->series_uid);
        key.sop_uid = sp_strdup(min->sop_uid);
        for (size_t i = 0; i < n; i++)
            if (!ls[i].failed && ls[i].pos < ls[i].rep.ninstances &&
                listed_cmp(&ls[i].rep.instances[ls[i].pos], &key) == 0)
                ls[i].pos++;
        free(key.series_uid);
        free(key.sop_uid);
    }
    /* Complete only if some candidate went through its whole listing. */
    size_t whole = 0, failed = 0;
    for (size_t i = 0; i < n; i++) {
        failed += ls[i].failed;
        whole += !ls[i].failed && ls[i].started;
        wire_reply_free(&ls[i].rep);
        free(ls[i].cursor);
    }
    free(ls);
    view_release(v);
    if (partial)
        *partial = failed > 0;
    if (rc == 0 && whole == 0) {
        log_warn("study %s: no replica could list it (%zu candidates)", study_uid, n);
        rc = SP_EUNAVAIL;
    }
    return rc;
}

/* ---- fetch -------------------------------------------------------------- */

/* Reads one instance from one member. Returns 0 with *out set, or an error. */
static int fetch_from(backend_t *b, const member_t *m, const uint8_t *head, size_t head_len,
                      const char *sop_uid, uint8_t **out, size_t *len)
{
    transport_response_t resp;
    int rc =
        transport_call(client_for(b, m), head, head_len, NULL, 0, b->cfg.fetch_timeout_ms, &resp);
    if (rc != 0) {
        avoid_failed(b, m, rc);
        return rc;
    }
    avoid_answered(m);
    wire_reply_t rep;
    char err[256];
    rc = wire_decode_reply(resp.head, resp.head_len, &rep, err, sizeof err);
    if (rc != 0) {
        log_warn("node %s: malformed reply to get %s: %s", m->id, sop_uid, err);
        transport_response_free(&resp);
        return rc;
    }
    rc = rep.status;
    if (rc == 0) {
        /* The node re-checked the digest before answering, and CURVE
         * authenticates every frame, so the bytes arrive as stored; hashing
         * them again here would only double the CPU cost of a retrieve. */
        *out = resp.body; /* taken over from the response */
        *len = resp.body_len;
        resp.body = NULL;
    } else if (rc != SP_ENOTFOUND) {
        log_warn("node %s cannot return %s: %s", m->id, sop_uid,
                 rep.error ? rep.error : sp_strerror(rc));
    }
    wire_reply_free(&rep);
    transport_response_free(&resp);
    return rc;
}

/* backend_fetch and backend_fetch_metadata: kind is WIRE_GET or
 * WIRE_METADATA, asked of the same members in the same order. */
static int fetch_kind(backend_t *b, wire_kind_t kind, const char *study_uid, const char *sop_uid,
                      unsigned spread, uint8_t **out, size_t *len)
{
    view_t *v = view_acquire(b);
    size_t *order = sp_calloc(v->n + 1, sizeof *order);
    size_t n = read_candidates(v, ring_partition(study_uid), spread, order);
    /* The last resort: every other reachable storage member (a study may
     * sit anywhere while the view moves). */
    for (size_t i = 0; i < v->n; i++)
        if (reachable(&v->m[i]) && !contains(order, n, i))
            order[n++] = i;
    wire_request_t req = {.kind = kind, .sop_uid = (char *)sop_uid};
    uint8_t *head;
    size_t head_len;
    wire_encode_request(&req, &head, &head_len);
    bool all_missing = true;
    int rc = SP_EUNAVAIL;
    /* Members not seen failing first, in candidate order; then the others
     * (judged once: one that fails in the first pass is not asked again).
     * A member gossip suspects counts as failing: it is most likely dead,
     * and asking it first would stall the retrieve for a fetch timeout. */
    bool *avoid = sp_calloc(n + 1, sizeof *avoid);
    for (size_t k = 0; k < n; k++)
        avoid[k] = is_avoided(&v->m[order[k]]) || v->m[order[k]].state == GOSSIP_SUSPECT;
    for (int pass = 0; pass < 2 && rc != 0; pass++) {
        for (size_t k = 0; k < n && rc != 0; k++) {
            if (avoid[k] != (pass == 1))
                continue;
            rc = fetch_from(b, &v->m[order[k]], head, head_len, sop_uid, out, len);
            all_missing &= rc == SP_ENOTFOUND;
        }
    }
    free(avoid);
    free(head);
    free(order);
    view_release(v);
    if (rc != 0)
        rc = all_missing && n > 0 ? SP_ENOTFOUND : SP_EUNAVAIL;
    return rc;
}

int backend_fetch(backend_t *b, const char *study_uid, const char *sop_uid, unsigned spread,
                  uint8_t **out, size_t *len)
{
    return fetch_kind(b, WIRE_GET, study_uid, sop_uid, spread, out, len);
}

int backend_fetch_metadata(backend_t *b, const char *study_uid, const char *sop_uid,
                           unsigned spread, uint8_t **out, size_t *len)
{
    return fetch_kind(b, WIRE_METADATA, study_uid, sop_uid, spread, out, len);
}

int backend_metadata_page(backend_t *b, const char *study_uid, const char *series_uid,
                          const char *cursor, size_t limit, unsigned spread, wire_reply_t *rep,
                          uint8_t **body, size_t *body_len)
{
    view_t *v = view_acquire(b);
    size_t *order = sp_calloc(v->n + 1, sizeof *order);
    size_t n = read_candidates(v, ring_partition(study_uid), spread, order);
    wire_request_t req = {.kind = WIRE_METADATA_LIST,
                          .study_uid = (char *)study_uid,
                          .series_uid = (char *)series_uid,
                          .cursor = (char *)cursor,
                          .limit = (uint32_t)limit};
    int rc = SP_EUNAVAIL;
    for (size_t k = 0; k < n && rc != 0; k++) {
        const member_t *m = &v->m[order[k]];
        if (is_avoided(m) || m->state == GOSSIP_SUSPECT)
            continue;
        transport_response_t raw;
        char err[256];
        rc = wire_call(client_for(b, m), &req, NULL, 0, b->cfg.query_timeout_ms, rep, &raw, err,
                       sizeof err);
        if (rc == 0 && rep->kind != WIRE_METADATA_LIST) {
            wire_reply_free(rep);
            transport_response_free(&raw);
            rc = SP_EPROTO;
        }
        if (rc != 0) {
            /* An older node does not know the request: not a failure of
             * the member, and the caller reads instance by instance. */
            log_debug("metadata of study %s from node %s: %s", study_uid, m->id, err);
            if (member_failure(rc))
                avoid_failed(b, m, rc);
            continue;
        }
        *body = raw.body; /* taken over from the response */
        *body_len = raw.body_len;
        raw.body = NULL;
        transport_response_free(&raw);
    }
    free(order);
    view_release(v);
    return rc == 0 ? 0 : SP_EUNAVAIL;
}

size_t backend_view_owners(const backend_config_t *cfg, const gossip_member_t *view, size_t n,
                           uint32_t partition, char (*owners)[GOSSIP_ID_MAX])
{
    backend_t b = {.cfg = *cfg, .warned_version = 1};
    view_t *v = view_from(&b, view, n, 1);
    size_t idx[RING_MAX_REPLICAS];
    size_t k = placement_owners(&v->pl, partition, idx);
    for (size_t i = 0; i < k; i++)
        sp_strlcpy(owners[i], v->m[idx[i]].id, GOSSIP_ID_MAX);
    view_release(v);
    while (b.avoids) {
        avoid_rec_t *d = b.avoids;
        b.avoids = d->next;
        free(d);
    }
    return k;
}
