/* gossip.c - SWIM-style membership as a pure state machine (gossip.h).
 *
 * The object owns a table of member records (index 0 is this member; records
 * are never removed, so indexes stay valid), a shuffled probe order over
 * those indexes, a dissemination queue with one entry per member whose
 * latest update still has retransmissions left, the probe in flight, the
 * PING_REQ relays this member is running for others, and the outbox. Member
 * lookup is a linear scan: clusters are tens to a few hundred members and a
 * lookup costs far less than the message that caused it. */
#include "gossip.h"

#include "base.h"
#include "log.h"
#include "placement.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ACCUSERS 8

typedef struct {
    gossip_member_t m;
    int64_t suspect_start_ms;                   /* SUSPECT: since when, locally */
    int64_t suspect_deadline_ms;                /* SUSPECT: when it becomes DOWN */
    char accusers[MAX_ACCUSERS][GOSSIP_ID_MAX]; /* SUSPECT: distinct accusers heard */
    unsigned n_accusers;
    int64_t out_deadline_ms; /* DOWN: earliest moment it may become OUT */
} record_t;

typedef struct {
    size_t rec;         /* record whose current contents are sent */
    unsigned transmits; /* times sent so far */
} bcast_t;

typedef struct {
    bool active;
    bool acked;
    bool indirect_sent;
    size_t rec;
    uint64_t seq;
    int64_t timeout_ms; /* no direct ACK by then: PING_REQ */
} probe_t;

/* A PING this member sends on behalf of another member's PING_REQ. */
typedef struct {
    uint64_t seq; /* of our PING to the target */
    uint64_t origin_seq;
    char origin_id[GOSSIP_ID_MAX];
    char origin_endpoint[GOSSIP_ENDPOINT_MAX];
    char target_id[GOSSIP_ID_MAX];
    int64_t deadline_ms;
} relay_t;

struct gossip {
    gossip_config_t cfg; /* string fields point into self's record or seeds */
    char **seeds;
    size_t n_seeds;

    record_t *recs; /* recs[0] is this member */
    size_t n_recs, cap_recs;
    size_t *order; /* probe order over record indexes other than 0 */
    size_t n_order, order_pos;
    bcast_t *bcast;
    size_t n_bcast;

    probe_t probe;
    relay_t *relays;
    size_t n_relays, cap_relays;

    gossip_msg_t *outbox;
    size_t out_head, out_n, out_cap;

    uint64_t rng;
    uint64_t next_seq;
    uint64_t view_version;
    int64_t next_probe_ms, next_sync_ms, next_join_ms, last_tick_ms;
    gossip_stats_t stats;
};

/* ---- states -------------------------------------------------------------- */

const char *gossip_state_name(gossip_state_t state)
{
    static const char *names[GOSSIP_STATE_COUNT] = {"alive",   "suspect",  "down", "out",
                                                    "joining", "draining", "left"};
    return (unsigned)state < GOSSIP_STATE_COUNT ? names[state] : "?";
}

bool gossip_state_placed(gossip_state_t s)
{
    return s == GOSSIP_ALIVE || s == GOSSIP_JOINING || s == GOSSIP_SUSPECT || s == GOSSIP_DOWN;
}

bool gossip_state_holds_data(gossip_state_t s)
{
    return gossip_state_placed(s) || s == GOSSIP_DRAINING;
}

bool gossip_state_reachable(gossip_state_t s)
{
    return s == GOSSIP_ALIVE || s == GOSSIP_JOINING || s == GOSSIP_DRAINING || s == GOSSIP_SUSPECT;
}

/* The states only the member itself announces. */
static bool state_live(gossip_state_t s)
{
    return s == GOSSIP_ALIVE || s == GOSSIP_JOINING || s == GOSSIP_DRAINING;
}

/* Precedence at equal incarnation (gossip.h). */
static int state_rank(gossip_state_t s)
{
    switch (s) {
    case GOSSIP_SUSPECT: return 1;
    case GOSSIP_DOWN: return 2;
    case GOSSIP_OUT: return 3;
    case GOSSIP_LEFT: return 4;
    default: return 0;
    }
}

/* ---- helpers ------------------------------------------------------------- */

/* splitmix64: small, fast and good enough to shuffle probe orders. */
static uint64_t rng_next(gossip_t *g)
{
    uint64_t z = (g->rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static size_t rng_below(gossip_t *g, size_t n)
{
    return n ? (size_t)(rng_next(g) % n) : 0;
}

static record_t *self_rec(gossip_t *g)
{
    SP_ASSERT(g->n_recs > 0); /* gossip_new() puts this member first, for good */
    return &g->recs[0];
}

static long find_rec(const gossip_t *g, const char *id)
{
    for (size_t i = 0; i < g->n_recs; i++)
        if (strcmp(g->recs[i].m.id, id) == 0)
            return (long)i;
    return -1;
}

/* Members that count for the log(n) scalings: those not gone for good. */
static size_t active_count(const gossip_t *g)
{
    size_t n = 0;
    for (size_t i = 0; i < g->n_recs; i++)
        if (g->recs[i].m.state != GOSSIP_OUT && g->recs[i].m.state != GOSSIP_LEFT)
            n++;
    return n ? n : 1;
}

static int64_t suspicion_timeout_ms(const gossip_t *g)
{
    double scale = log10((double)active_count(g));
    if (scale < 1.0)
        scale = 1.0;
    return (int64_t)(g->cfg.suspicion_mult * scale * (double)g->cfg.probe_interval_ms);
}

/* Lifeguard: confirmations needed to reach the minimum timeout. */
static unsigned confirmations_needed(const gossip_t *g)
{
    int k = (int)g->cfg.suspicion_mult - 2;
    if ((int)active_count(g) - 2 < k)
        k = 0;
    return k < 0 ? 0 : (unsigned)k;
}

/* max - (max - min) * log(c + 1) / log(k + 1), never below min, where c is
 * the number of accusers beyond the first. */
static int64_t suspicion_deadline(const gossip_t *g, const record_t *r)
{
    double min = (double)suspicion_timeout_ms(g);
    double max = min * g->cfg.suspicion_max_mult;
    double t = min;
    unsigned k = confirmations_needed(g);
    if (k >= 1 && max > min) {
        double c = r->n_accusers > 0 ? (double)(r->n_accusers - 1) : 0.0;
        t = max - (max - min) * log(c + 1.0) / log((double)k + 1.0);
        if (t < min)
            t = min;
    }
    return r->suspect_start_ms + (int64_t)t;
}

/* Records an accuser; returns true if it was not heard before. */
static bool add_accuser(record_t *r, const char *id)
{
    if (id[0] == '\0')
        return false;
    for (unsigned i = 0; i < r->n_accusers; i++)
        if (strcmp(r->accusers[i], id) == 0)
            return false;
    if (r->n_accusers == MAX_ACCUSERS)
        return false;
    sp_strlcpy(r->accusers[r->n_accusers++], id, GOSSIP_ID_MAX);
    return true;
}

static unsigned retransmit_limit(const gossip_t *g)
{
    double l = ceil(log10((double)active_count(g) + 1.0));
    return g->cfg.retransmit_mult * (unsigned)(l < 1.0 ? 1.0 : l);
}

static bool same_member(const gossip_member_t *a, const gossip_member_t *b)
{
    return a->incarnation == b->incarnation && a->state == b->state && a->role == b->role &&
           a->weight == b->weight && strcmp(a->id, b->id) == 0 &&
           strcmp(a->endpoint, b->endpoint) == 0 && strcmp(a->site, b->site) == 0 &&
           strcmp(a->public_key, b->public_key) == 0;
}

static bool same_attributes(const gossip_member_t *a, const gossip_member_t *b)
{
    return a->role == b->role && a->weight == b->weight && strcmp(a->endpoint, b->endpoint) == 0 &&
           strcmp(a->site, b->site) == 0 && strcmp(a->public_key, b->public_key) == 0;
}

/* ---- dissemination ------------------------------------------------------- */

/* Queues the current contents of record rec for piggybacking, restarting its
 * retransmission count: a newer update about a member supersedes the older
 * one still queued. */
static void bcast_enqueue(gossip_t *g, size_t rec)
{
    for (size_t i = 0; i < g->n_bcast; i++) {
        if (g->bcast[i].rec == rec) {
            g->bcast[i].transmits = 0;
            return;
        }
    }
    g->bcast[g->n_bcast++] = (bcast_t){rec, 0};
}

static int by_transmits(const void *a, const void *b)
{
    const bcast_t *x = a, *y = b;
    if (x->transmits != y->transmits)
        return x->transmits < y->transmits ? -1 : 1;
    return (x->rec > y->rec) - (x->rec < y->rec);
}

static void msg_add_update(gossip_msg_t *msg, const gossip_member_t *m, size_t cap)
{
    if (msg->n_updates < cap)
        msg->updates[msg->n_updates++] = *m;
}

/* Fills msg's piggyback: the recipient's own non-live record first (so it can
 * refute at once), then the least-sent queued updates. */
static void piggyback(gossip_t *g, gossip_msg_t *msg, long to_rec)
{
    size_t cap = g->cfg.max_piggyback + 1;
    msg->updates = sp_calloc(cap, sizeof *msg->updates);
    if (to_rec > 0 && !state_live(g->recs[to_rec].m.state))
        msg_add_update(msg, &g->recs[to_rec].m, cap);
    qsort(g->bcast, g->n_bcast, sizeof *g->bcast, by_transmits);
    unsigned limit = retransmit_limit(g);
    size_t taken = 0;
    for (size_t i = 0; i < g->n_bcast && taken < g->cfg.max_piggyback; i++, taken++) {
        msg_add_update(msg, &g->recs[g->bcast[i].rec].m, cap);
        g->bcast[i].transmits++;
    }
    size_t kept = 0;
    for (size_t i = 0; i < g->n_bcast; i++)
        if (g->bcast[i].transmits < limit)
            g->bcast[kept++] = g->bcast[i];
    g->n_bcast = kept;
}

/* ---- outbox -------------------------------------------------------------- */

/* Appends a message of this kind to the outbox, addressed to record to_rec,
 * or (to_rec < 0) to a bare endpoint; returns it for the caller to finish. */
static gossip_msg_t *outbox_push(gossip_t *g, gossip_kind_t kind, long to_rec, const char *to_id,
                                 const char *to_endpoint)
{
    if (g->out_head + g->out_n == g->out_cap) {
        if (g->out_head > 0) {
            memmove(g->outbox, g->outbox + g->out_head, g->out_n * sizeof *g->outbox);
            g->out_head = 0;
        } else {
            g->out_cap = g->out_cap ? 2 * g->out_cap : 16;
            g->outbox = sp_realloc(g->outbox, g->out_cap * sizeof *g->outbox);
        }
    }
    gossip_msg_t *msg = &g->outbox[g->out_head + g->out_n++];
    memset(msg, 0, sizeof *msg);
    msg->kind = kind;
    sp_strlcpy(msg->from_id, self_rec(g)->m.id, sizeof msg->from_id);
    sp_strlcpy(msg->from_endpoint, self_rec(g)->m.endpoint, sizeof msg->from_endpoint);
    if (to_rec >= 0) {
        to_id = g->recs[to_rec].m.id;
        to_endpoint = g->recs[to_rec].m.endpoint;
    }
    sp_strlcpy(msg->to_id, to_id ? to_id : "", sizeof msg->to_id);
    sp_strlcpy(msg->to_endpoint, to_endpoint, sizeof msg->to_endpoint);
    return msg;
}

/* A probe-family message (PING, ACK, PING_REQ, NACK) with piggyback. */
static gossip_msg_t *send_small(gossip_t *g, gossip_kind_t kind, long to_rec, const char *to_id,
                                const char *to_endpoint, uint64_t seq)
{
    gossip_msg_t *msg = outbox_push(g, kind, to_rec, to_id, to_endpoint);
    msg->seq = seq;
    if (to_rec < 0 && to_id)
        to_rec = find_rec(g, to_id);
    piggyback(g, msg, to_rec);
    return msg;
}

/* A SYNC_REQ or SYNC carrying every record this member knows. */
static void send_full_state(gossip_t *g, gossip_kind_t kind, long to_rec, const char *to_id,
                            const char *to_endpoint)
{
    gossip_msg_t *msg = outbox_push(g, kind, to_rec, to_id, to_endpoint);
    msg->updates = sp_calloc(g->n_recs, sizeof *msg->updates);
    for (size_t i = 0; i < g->n_recs; i++)
        msg->updates[i] = g->recs[i].m;
    msg->n_updates = g->n_recs;
}

/* ---- the member table ---------------------------------------------------- */

/* Inserts record index rec at a random place in the probe order, so a new
 * member is probed within one round without favouring it. */
static void order_insert(gossip_t *g, size_t rec)
{
    SP_ASSERT(rec > 0 && rec < g->n_recs && g->n_order < g->n_recs);
    size_t at = rng_below(g, g->n_order + 1);
    memmove(g->order + at + 1, g->order + at, (g->n_order - at) * sizeof *g->order);
    g->order[at] = rec;
    g->n_order++;
    if (at < g->order_pos)
        g->order_pos++;
}

static size_t add_rec(gossip_t *g, const gossip_member_t *m)
{
    if (g->n_recs == g->cap_recs) {
        g->cap_recs *= 2;
        g->recs = sp_realloc(g->recs, g->cap_recs * sizeof *g->recs);
        g->order = sp_realloc(g->order, g->cap_recs * sizeof *g->order);
        g->bcast = sp_realloc(g->bcast, g->cap_recs * sizeof *g->bcast);
    }
    SP_ASSERT(g->n_recs < g->cap_recs);
    size_t i = g->n_recs++;
    memset(&g->recs[i], 0, sizeof g->recs[i]);
    g->recs[i].m = *m;
    if (i > 0)
        order_insert(g, i);
    return i;
}

/* True if a DOWN member may become OUT now under the site rule (gossip.h). */
static bool may_go_out(const gossip_t *g, size_t rec)
{
    const gossip_member_t *m = &g->recs[rec].m;
    if (m->role != GOSSIP_STORAGE)
        return true;
    for (size_t i = 0; i < g->n_recs; i++) {
        const gossip_member_t *o = &g->recs[i].m;
        if (i != rec && o->role == GOSSIP_STORAGE && strcmp(o->site, m->site) == 0 &&
            state_live(o->state))
            return true;
    }
    return false;
}

/* Puts record rec into its new contents u (already accepted), starting the
 * timers its new state needs, bumping the view version if anything a user
 * of the view can see changed, and queueing it for dissemination. */
static void apply(gossip_t *g, size_t rec, const gossip_member_t *u, int64_t now_ms)
{
    /* Precedence was decided by the caller: never this member's own record,
     * never an older incarnation than the one held. */
    SP_ASSERT(rec > 0 && rec < g->n_recs);
    record_t *r = &g->recs[rec];
    SP_ASSERT(strcmp(r->m.id, u->id) == 0 && u->incarnation >= r->m.incarnation);
    bool visible = r->m.state != u->state || !same_attributes(&r->m, u);
    gossip_state_t was = r->m.state;
    r->m = *u;
    if (u->state != GOSSIP_SUSPECT)
        r->m.accuser[0] = '\0';
    if (u->state == GOSSIP_SUSPECT) {
        if (was != GOSSIP_SUSPECT) {
            r->suspect_start_ms = now_ms;
            r->n_accusers = 0;
        }
        add_accuser(r, u->accuser);
        r->suspect_deadline_ms = suspicion_deadline(g, r);
    }
    if (u->state == GOSSIP_DOWN && was != GOSSIP_DOWN)
        r->out_deadline_ms = now_ms + g->cfg.down_to_out_ms;
    if (visible) {
        g->view_version++;
        log_debug("gossip %s: member %s (%s, site %s) %s -> %s, incarnation %llu",
                  self_rec(g)->m.id, u->id, u->endpoint, u->site, gossip_state_name(was),
                  gossip_state_name(u->state), (unsigned long long)u->incarnation);
    }
    bcast_enqueue(g, rec);
}

/* A detector transition of another member at its current incarnation;
 * this member is the accuser of a suspicion. */
static void transition(gossip_t *g, size_t rec, gossip_state_t state, int64_t now_ms)
{
    gossip_member_t u = g->recs[rec].m;
    u.state = state;
    sp_strlcpy(u.accuser, state == GOSSIP_SUSPECT ? g->recs[0].m.id : "", sizeof u.accuser);
    apply(g, rec, &u, now_ms);
}

/* Another accuser of a member already SUSPECT at this incarnation: the
 * timeout shrinks, and the confirmation is passed on so others count it. */
static void confirm(gossip_t *g, size_t rec, const char *accuser)
{
    record_t *r = &g->recs[rec];
    if (!add_accuser(r, accuser))
        return;
    sp_strlcpy(r->m.accuser, accuser, sizeof r->m.accuser);
    r->suspect_deadline_ms = suspicion_deadline(g, r);
    bcast_enqueue(g, rec);
}

/* This member heard u about itself: if u is at least as new as what it says
 * of itself and differs, it takes a higher incarnation and re-announces. */
static void refute(gossip_t *g, const gossip_member_t *u)
{
    gossip_member_t *me = &self_rec(g)->m;
    if (u->incarnation < me->incarnation)
        return;
    if (u->incarnation == me->incarnation && same_member(u, me))
        return;
    me->incarnation = u->incarnation + 1;
    g->stats.refutations++;
    log_info("gossip %s: refuting %s at incarnation %llu with %llu", me->id,
             gossip_state_name(u->state), (unsigned long long)u->incarnation,
             (unsigned long long)me->incarnation);
    bcast_enqueue(g, 0);
}

/* Merges one gossiped update into the table by the precedence rules. */
static void merge(gossip_t *g, const gossip_member_t *u, int64_t now_ms)
{
    long found = find_rec(g, u->id);
    if (found == 0) {
        refute(g, u);
        return;
    }
    gossip_member_t v = *u;
    if (found < 0) {
        gossip_member_t blank = v;
        blank.state = GOSSIP_ALIVE;
        size_t rec = add_rec(g, &blank);
        g->view_version++; /* a new member is a visible change whatever its state */
        if (v.state == GOSSIP_OUT && !may_go_out(g, rec))
            v.state = GOSSIP_DOWN;
        apply(g, rec, &v, now_ms);
        return;
    }
    record_t *r = &g->recs[found];
    if (v.incarnation < r->m.incarnation)
        return;
    if (v.incarnation == r->m.incarnation && v.state == GOSSIP_SUSPECT &&
        r->m.state == GOSSIP_SUSPECT) {
        confirm(g, (size_t)found, v.accuser);
        return;
    }
    if (v.incarnation == r->m.incarnation && state_rank(v.state) <= state_rank(r->m.state))
        return;
    if (v.state == GOSSIP_OUT && !may_go_out(g, (size_t)found)) {
        v.state = GOSSIP_DOWN;
        if (v.incarnation == r->m.incarnation && r->m.state == GOSSIP_DOWN)
            return;
    }
    apply(g, (size_t)found, &v, now_ms);
}

/* ---- probing ------------------------------------------------------------- */

static bool probeable(const gossip_t *g, size_t rec)
{
    return rec != 0 && gossip_state_reachable(g->recs[rec].m.state);
}

static void shuffle_order(gossip_t *g)
{
    for (size_t i = g->n_order; i > 1; i--) {
        size_t j = rng_below(g, i);
        size_t t = g->order[i - 1];
        g->order[i - 1] = g->order[j];
        g->order[j] = t;
    }
    g->order_pos = 0;
}

/* Next target in the round-robin order, reshuffled after each full round;
 * returns -1 if no member is probeable. */
static long next_target(gossip_t *g)
{
    for (size_t seen = 0; seen < 2 * g->n_order + 1; seen++) {
        if (g->order_pos >= g->n_order) {
            if (g->n_order == 0)
                return -1;
            shuffle_order(g);
        }
        size_t rec = g->order[g->order_pos++];
        if (probeable(g, rec))
            return (long)rec;
    }
    return -1;
}

/* Picks up to k distinct records other than self and `except` whose state
 * passes `ok`, uniformly; returns how many went into out. */
static size_t pick_random(gossip_t *g, size_t k, long except, bool (*ok)(gossip_state_t),
                          size_t *out)
{
    size_t n = 0, seen = 0;
    for (size_t i = 1; i < g->n_recs; i++) {
        if ((long)i == except || !ok(g->recs[i].m.state))
            continue;
        seen++;
        if (n < k)
            out[n++] = i;
        else {
            size_t j = rng_below(g, seen);
            if (j < k)
                out[j] = i;
        }
    }
    return n;
}

/* The end of a probe period: a target that never answered becomes SUSPECT. */
static void finish_probe(gossip_t *g, int64_t now_ms)
{
    probe_t *p = &g->probe;
    if (p->active && !p->acked && state_live(g->recs[p->rec].m.state)) {
        g->stats.suspicions++;
        transition(g, p->rec, GOSSIP_SUSPECT, now_ms);
    } else if (p->active && !p->acked && g->recs[p->rec].m.state == GOSSIP_SUSPECT) {
        confirm(g, p->rec, g->recs[0].m.id);
    }
    p->active = false;
}

static void start_probe(gossip_t *g, int64_t now_ms)
{
    if (self_rec(g)->m.state == GOSSIP_LEFT)
        return;
    long rec = next_target(g);
    if (rec < 0)
        return;
    g->probe = (probe_t){.active = true,
                         .rec = (size_t)rec,
                         .seq = ++g->next_seq,
                         .timeout_ms = now_ms + g->cfg.probe_timeout_ms};
    g->stats.probes++;
    send_small(g, GOSSIP_PING, rec, NULL, NULL, g->probe.seq);
}

static bool ok_live(gossip_state_t s)
{
    return state_live(s);
}

static void send_indirect(gossip_t *g)
{
    probe_t *p = &g->probe;
    p->indirect_sent = true;
    size_t k = g->cfg.indirect_checks;
    if (k == 0)
        return;
    size_t *relays = sp_calloc(k, sizeof *relays);
    size_t n = pick_random(g, k, (long)p->rec, ok_live, relays);
    if (n > 0)
        g->stats.indirect_probes++;
    for (size_t i = 0; i < n; i++) {
        gossip_msg_t *msg = send_small(g, GOSSIP_PING_REQ, (long)relays[i], NULL, NULL, p->seq);
        sp_strlcpy(msg->target_id, g->recs[p->rec].m.id, sizeof msg->target_id);
        sp_strlcpy(msg->target_endpoint, g->recs[p->rec].m.endpoint, sizeof msg->target_endpoint);
    }
    free(relays);
}

static void expire_relays(gossip_t *g, int64_t now_ms)
{
    size_t kept = 0;
    for (size_t i = 0; i < g->n_relays; i++) {
        relay_t *r = &g->relays[i];
        if (now_ms < r->deadline_ms) {
            g->relays[kept++] = *r;
            continue;
        }
        gossip_msg_t *msg =
            send_small(g, GOSSIP_NACK, -1, r->origin_id, r->origin_endpoint, r->origin_seq);
        sp_strlcpy(msg->target_id, r->target_id, sizeof msg->target_id);
    }
    g->n_relays = kept;
}

/* ---- timers -------------------------------------------------------------- */

/* Detector timers: SUSPECT -> DOWN, DOWN -> OUT (site rule permitting). */
static void run_member_timers(gossip_t *g, int64_t now_ms)
{
    for (size_t i = 1; i < g->n_recs; i++) {
        record_t *r = &g->recs[i];
        if (r->m.state == GOSSIP_SUSPECT && now_ms >= r->suspect_deadline_ms)
            transition(g, i, GOSSIP_DOWN, now_ms);
        else if (r->m.state == GOSSIP_DOWN && now_ms >= r->out_deadline_ms && may_go_out(g, i))
            transition(g, i, GOSSIP_OUT, now_ms);
    }
}

static bool ok_gone(gossip_state_t s)
{
    return s == GOSSIP_DOWN || s == GOSSIP_OUT;
}

/* The periodic push-pull with a random reachable member, the reconnect
 * attempt, and the seed join of a member that knows nobody reachable. */
static void run_syncs(gossip_t *g, int64_t now_ms)
{
    if (now_ms >= g->next_sync_ms) {
        g->next_sync_ms = now_ms + g->cfg.sync_interval_ms;
        size_t pick = 0;
        if (pick_random(g, 1, -1, gossip_state_reachable, &pick) == 1) {
            g->stats.syncs++;
            send_full_state(g, GOSSIP_SYNC_REQ, (long)pick, NULL, NULL);
        }
        /* The reconnect attempt: heals a partition after both sides gave up
         * on each other, and finds a restarted member on its old address. */
        size_t gone = 0;
        if (pick_random(g, 1, -1, ok_gone, &gone) == 1) {
            g->stats.syncs++;
            send_full_state(g, GOSSIP_SYNC_REQ, (long)gone, NULL, NULL);
        }
    }
    bool alone = true;
    for (size_t i = 1; i < g->n_recs && alone; i++)
        if (gossip_state_reachable(g->recs[i].m.state))
            alone = false;
    if (alone && g->n_seeds > 0 && now_ms >= g->next_join_ms) {
        g->next_join_ms = now_ms + g->cfg.probe_interval_ms;
        for (size_t i = 0; i < g->n_seeds; i++) {
            g->stats.syncs++;
            send_full_state(g, GOSSIP_SYNC_REQ, -1, NULL, g->seeds[i]);
        }
    }
}

/* After a gap in our own ticks (a paused process), every timer is moved on
 * by the gap: the silence was ours, not the other members'. */
static void absorb_pause(gossip_t *g, int64_t now_ms)
{
    int64_t gap = now_ms - g->last_tick_ms;
    if (gap <= 2 * g->cfg.probe_interval_ms)
        return;
    log_warn("gossip %s: no tick for %lld ms; restarting timers", self_rec(g)->m.id,
             (long long)gap);
    for (size_t i = 1; i < g->n_recs; i++) {
        g->recs[i].suspect_deadline_ms += gap;
        g->recs[i].out_deadline_ms += gap;
    }
    g->probe.active = false;
    g->n_relays = 0;
    g->next_probe_ms = now_ms;
}

void gossip_tick(gossip_t *g, int64_t now_ms)
{
    absorb_pause(g, now_ms);
    g->last_tick_ms = now_ms;
    run_member_timers(g, now_ms);
    probe_t *p = &g->probe;
    if (p->active && !p->acked && !p->indirect_sent && now_ms >= p->timeout_ms)
        send_indirect(g);
    if (now_ms >= g->next_probe_ms) {
        finish_probe(g, now_ms);
        g->next_probe_ms = now_ms + g->cfg.probe_interval_ms;
        start_probe(g, now_ms);
    }
    expire_relays(g, now_ms);
    run_syncs(g, now_ms);
}

static void earlier(int64_t *d, int64_t t)
{
    if (t < *d)
        *d = t;
}

int64_t gossip_next_deadline(const gossip_t *g)
{
    int64_t d = g->next_probe_ms;
    if (g->probe.active && !g->probe.acked && !g->probe.indirect_sent)
        earlier(&d, g->probe.timeout_ms);
    for (size_t i = 0; i < g->n_relays; i++)
        earlier(&d, g->relays[i].deadline_ms);
    for (size_t i = 1; i < g->n_recs; i++) {
        const record_t *r = &g->recs[i];
        if (r->m.state == GOSSIP_SUSPECT)
            earlier(&d, r->suspect_deadline_ms);
        /* A DOWN member held back by the site rule is re-checked with the
         * next probe rather than in a busy loop. */
        else if (r->m.state == GOSSIP_DOWN && r->out_deadline_ms > g->last_tick_ms)
            earlier(&d, r->out_deadline_ms);
    }
    earlier(&d, g->next_sync_ms);
    return d;
}

/* ---- inbound ------------------------------------------------------------- */

/* True if s is terminated within cap bytes (and non-empty if required). */
static bool str_ok(const char *s, size_t cap, bool nonempty)
{
    const char *z = memchr(s, '\0', cap);
    return z != NULL && (!nonempty || z != s);
}

static bool member_valid(const gossip_member_t *m)
{
    size_t keylen = strnlen(m->public_key, sizeof m->public_key);
    return str_ok(m->id, sizeof m->id, true) && str_ok(m->endpoint, sizeof m->endpoint, true) &&
           str_ok(m->site, sizeof m->site, false) && str_ok(m->accuser, sizeof m->accuser, false) &&
           (keylen == 0 || keylen == GOSSIP_KEY_LEN) &&
           (m->role == GOSSIP_STORAGE || m->role == GOSSIP_ROUTER) &&
           (unsigned)m->state < GOSSIP_STATE_COUNT && isfinite(m->weight) && m->weight >= 0;
}

static bool msg_valid(const gossip_msg_t *msg)
{
    if (msg->kind < GOSSIP_PING || msg->kind > GOSSIP_SYNC)
        return false;
    if (!str_ok(msg->from_id, sizeof msg->from_id, true) ||
        !str_ok(msg->from_endpoint, sizeof msg->from_endpoint, true) ||
        !str_ok(msg->to_id, sizeof msg->to_id, false) ||
        !str_ok(msg->to_endpoint, sizeof msg->to_endpoint, false) ||
        !str_ok(msg->target_id, sizeof msg->target_id, false) ||
        !str_ok(msg->target_endpoint, sizeof msg->target_endpoint, false))
        return false;
    if (msg->kind == GOSSIP_PING_REQ &&
        (msg->target_id[0] == '\0' || msg->target_endpoint[0] == '\0'))
        return false;
    if (msg->n_updates > GOSSIP_MAX_MEMBERS || (msg->n_updates > 0 && msg->updates == NULL))
        return false;
    for (size_t i = 0; i < msg->n_updates; i++)
        if (!member_valid(&msg->updates[i]))
            return false;
    return true;
}

static void on_ack(gossip_t *g, const gossip_msg_t *msg)
{
    probe_t *p = &g->probe;
    if (p->active && msg->seq == p->seq) {
        const char *target = g->recs[p->rec].m.id;
        bool relayed = msg->target_id[0] != '\0';
        if (strcmp(relayed ? msg->target_id : msg->from_id, target) == 0) {
            p->acked = true;
            if (relayed)
                g->stats.indirect_acks++;
        }
        return;
    }
    for (size_t i = 0; i < g->n_relays; i++) {
        relay_t *r = &g->relays[i];
        if (r->seq != msg->seq || strcmp(r->target_id, msg->from_id) != 0)
            continue;
        gossip_msg_t *ack =
            send_small(g, GOSSIP_ACK, -1, r->origin_id, r->origin_endpoint, r->origin_seq);
        sp_strlcpy(ack->target_id, r->target_id, sizeof ack->target_id);
        g->relays[i] = g->relays[--g->n_relays];
        return;
    }
}

static void on_ping_req(gossip_t *g, const gossip_msg_t *msg, int64_t now_ms)
{
    if (strcmp(msg->target_id, self_rec(g)->m.id) == 0) {
        gossip_msg_t *ack =
            send_small(g, GOSSIP_ACK, -1, msg->from_id, msg->from_endpoint, msg->seq);
        sp_strlcpy(ack->target_id, msg->target_id, sizeof ack->target_id);
        return;
    }
    if (g->n_relays == g->cap_relays) {
        g->cap_relays = g->cap_relays ? 2 * g->cap_relays : 8;
        g->relays = sp_realloc(g->relays, g->cap_relays * sizeof *g->relays);
    }
    relay_t *r = &g->relays[g->n_relays++];
    memset(r, 0, sizeof *r);
    r->seq = ++g->next_seq;
    r->origin_seq = msg->seq;
    sp_strlcpy(r->origin_id, msg->from_id, sizeof r->origin_id);
    sp_strlcpy(r->origin_endpoint, msg->from_endpoint, sizeof r->origin_endpoint);
    sp_strlcpy(r->target_id, msg->target_id, sizeof r->target_id);
    r->deadline_ms = now_ms + g->cfg.probe_timeout_ms;
    send_small(g, GOSSIP_PING, -1, msg->target_id, msg->target_endpoint, r->seq);
}

int gossip_receive(gossip_t *g, int64_t now_ms, const gossip_msg_t *msg)
{
    const char *me = self_rec(g)->m.id;
    if (!msg_valid(msg) || (msg->to_id[0] != '\0' && strcmp(msg->to_id, me) != 0)) {
        g->stats.rejected++;
        log_warn("gossip %s: refused a malformed or misaddressed message (kind %d) from %.64s", me,
                 (int)msg->kind,
                 str_ok(msg->from_endpoint, sizeof msg->from_endpoint, false) ? msg->from_endpoint
                                                                              : "?");
        return SP_EPROTO;
    }
    if (strcmp(msg->from_id, me) == 0)
        return 0;
    for (size_t i = 0; i < msg->n_updates; i++)
        merge(g, &msg->updates[i], now_ms);
    switch (msg->kind) {
    case GOSSIP_PING:
        send_small(g, GOSSIP_ACK, -1, msg->from_id, msg->from_endpoint, msg->seq);
        break;
    case GOSSIP_ACK: on_ack(g, msg); break;
    case GOSSIP_PING_REQ: on_ping_req(g, msg, now_ms); break;
    case GOSSIP_NACK:
        if (g->probe.active && msg->seq == g->probe.seq)
            g->stats.nacks++;
        break;
    case GOSSIP_SYNC_REQ:
        send_full_state(g, GOSSIP_SYNC, -1, msg->from_id, msg->from_endpoint);
        break;
    case GOSSIP_SYNC: break;
    }
    return 0;
}

bool gossip_poll(gossip_t *g, gossip_msg_t *out)
{
    if (g->out_n == 0)
        return false;
    *out = g->outbox[g->out_head++];
    if (--g->out_n == 0)
        g->out_head = 0;
    return true;
}

void gossip_msg_clear(gossip_msg_t *msg)
{
    if (msg == NULL)
        return;
    free(msg->updates);
    memset(msg, 0, sizeof *msg);
}

/* ---- this member --------------------------------------------------------- */

int gossip_set_self_state(gossip_t *g, gossip_state_t state)
{
    if (!state_live(state) && state != GOSSIP_LEFT)
        return SP_EINVAL;
    gossip_member_t *me = &self_rec(g)->m;
    if (me->state == state)
        return 0;
    log_info("gossip %s: own state %s -> %s", me->id, gossip_state_name(me->state),
             gossip_state_name(state));
    me->state = state;
    me->incarnation++;
    g->view_version++;
    bcast_enqueue(g, 0);
    if (state == GOSSIP_LEFT)
        g->probe.active = false;
    return 0;
}

/* ---- lifecycle ----------------------------------------------------------- */

void gossip_config_defaults(gossip_config_t *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->role = GOSSIP_STORAGE;
    cfg->weight = 1.0;
    cfg->initial_state = GOSSIP_ALIVE;
    cfg->probe_interval_ms = 1000;
    cfg->probe_timeout_ms = 300;
    cfg->indirect_checks = 3;
    cfg->suspicion_mult = 4.0;
    cfg->suspicion_max_mult = 6.0;
    cfg->retransmit_mult = 4;
    cfg->max_piggyback = 8;
    cfg->sync_interval_ms = 30000;
    cfg->down_to_out_ms = 300000;
}

static const char *config_problem(const gossip_config_t *c)
{
    size_t keylen = c->public_key ? strlen(c->public_key) : 0;
    if (!c->id || !*c->id || strlen(c->id) >= GOSSIP_ID_MAX)
        return "id missing or too long";
    if (!c->endpoint || !*c->endpoint || strlen(c->endpoint) >= GOSSIP_ENDPOINT_MAX)
        return "endpoint missing or too long";
    if (c->site && strlen(c->site) >= GOSSIP_SITE_MAX)
        return "site too long";
    if (keylen != 0 && keylen != GOSSIP_KEY_LEN)
        return "public key is not 40 Z85 characters";
    if (c->role != GOSSIP_STORAGE && c->role != GOSSIP_ROUTER)
        return "bad role";
    if (!isfinite(c->weight) || c->weight < 0)
        return "bad weight";
    if (c->initial_state != GOSSIP_ALIVE && c->initial_state != GOSSIP_JOINING)
        return "initial state must be alive or joining";
    if (c->probe_interval_ms <= 0 || c->probe_timeout_ms <= 0 ||
        c->probe_timeout_ms >= c->probe_interval_ms)
        return "probe timeout must be positive and below the probe interval";
    if (c->sync_interval_ms <= 0 || c->down_to_out_ms < 0 || c->suspicion_mult <= 0 ||
        c->suspicion_max_mult < 1 || c->retransmit_mult == 0 || c->max_piggyback == 0)
        return "bad interval or multiplier";
    for (size_t i = 0; i < c->n_seeds; i++)
        if (!c->seeds[i] || !*c->seeds[i] || strlen(c->seeds[i]) >= GOSSIP_ENDPOINT_MAX)
            return "bad seed endpoint";
    return NULL;
}

gossip_t *gossip_new(const gossip_config_t *cfg, int64_t now_ms)
{
    const char *problem = config_problem(cfg);
    if (problem) {
        log_error("gossip: invalid configuration for member %s: %s", cfg->id ? cfg->id : "?",
                  problem);
        return NULL;
    }
    gossip_t *g = sp_calloc(1, sizeof *g);
    g->cfg = *cfg;
    g->rng = cfg->seed;
    g->cap_recs = 16;
    g->recs = sp_calloc(g->cap_recs, sizeof *g->recs);
    g->order = sp_calloc(g->cap_recs, sizeof *g->order);
    g->bcast = sp_calloc(g->cap_recs, sizeof *g->bcast);

    gossip_member_t me = {0};
    sp_strlcpy(me.id, cfg->id, sizeof me.id);
    sp_strlcpy(me.endpoint, cfg->endpoint, sizeof me.endpoint);
    sp_strlcpy(me.site, cfg->site ? cfg->site : "", sizeof me.site);
    sp_strlcpy(me.public_key, cfg->public_key ? cfg->public_key : "", sizeof me.public_key);
    me.role = cfg->role;
    me.weight = cfg->weight;
    me.incarnation = cfg->initial_incarnation;
    me.state = cfg->initial_state;
    add_rec(g, &me);
    g->cfg.id = g->recs[0].m.id; /* the caller's strings need not outlive us */
    g->cfg.endpoint = g->recs[0].m.endpoint;
    g->cfg.site = g->recs[0].m.site;
    g->cfg.public_key = g->recs[0].m.public_key;

    g->seeds = sp_calloc(cfg->n_seeds ? cfg->n_seeds : 1, sizeof *g->seeds);
    for (size_t i = 0; i < cfg->n_seeds; i++)
        if (strcmp(cfg->seeds[i], cfg->endpoint) != 0)
            g->seeds[g->n_seeds++] = sp_strdup(cfg->seeds[i]);
    g->cfg.seeds = NULL;
    g->cfg.n_seeds = g->n_seeds;

    g->view_version = 1;
    g->last_tick_ms = now_ms;
    /* Random phases keep members from probing and syncing in lockstep. */
    g->next_probe_ms = now_ms + (int64_t)rng_below(g, (size_t)cfg->probe_interval_ms);
    g->next_sync_ms = now_ms + (int64_t)rng_below(g, (size_t)cfg->sync_interval_ms);
    g->next_join_ms = now_ms;
    return g;
}

void gossip_destroy(gossip_t **gp)
{
    if (gp == NULL || *gp == NULL)
        return;
    gossip_t *g = *gp;
    for (size_t i = 0; i < g->out_n; i++)
        gossip_msg_clear(&g->outbox[g->out_head + i]);
    for (size_t i = 0; i < g->n_seeds; i++)
        free(g->seeds[i]);
    free(g->seeds);
    free(g->outbox);
    free(g->relays);
    free(g->bcast);
    free(g->order);
    free(g->recs);
    free(g);
    *gp = NULL;
}

/* ---- accessors ----------------------------------------------------------- */

size_t gossip_count(const gossip_t *g)
{
    return g->n_recs;
}

size_t gossip_snapshot(const gossip_t *g, gossip_member_t *out, size_t max)
{
    for (size_t i = 0; i < g->n_recs && i < max; i++)
        out[i] = g->recs[i].m;
    return g->n_recs;
}

int gossip_lookup(const gossip_t *g, const char *id, gossip_member_t *out)
{
    long i = find_rec(g, id);
    if (i < 0)
        return SP_ENOTFOUND;
    *out = g->recs[i].m;
    return 0;
}

static int by_id(const void *a, const void *b)
{
    return strcmp(((const gossip_member_t *)a)->id, ((const gossip_member_t *)b)->id);
}

size_t gossip_placement(const gossip_t *g, gossip_member_t *out, size_t max)
{
    gossip_member_t *all = sp_calloc(g->n_recs, sizeof *all);
    size_t n = 0;
    for (size_t i = 0; i < g->n_recs; i++) {
        const gossip_member_t *m = &g->recs[i].m;
        if (placement_is_placed(m))
            all[n++] = *m;
    }
    qsort(all, n, sizeof *all, by_id);
    for (size_t i = 0; i < n && i < max; i++)
        out[i] = all[i];
    free(all);
    return n;
}

uint64_t gossip_view_version(const gossip_t *g)
{
    return g->view_version;
}

gossip_stats_t gossip_stats(const gossip_t *g)
{
    return g->stats;
}
