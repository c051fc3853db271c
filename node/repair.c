/* repair.c - anti-entropy, re-replication, hand-off, drain and scrubbing
 * for a storage node (repair.h).
 *
 * Threads: the round thread runs rounds and, per round with work, up to
 * [repair] streams copy threads; the scrubber thread scrubs and repairs.
 * Each thread owns the transport clients it makes. Shared counters are
 * atomics; the throttles and the corrupt-SOP queue have their own mutexes.
 *
 * Owns: the threads, their clients, the corrupt queue. Borrows the store,
 * the membership, the key pair and the allow-list from the node. */
#include "repair.h"

#include "../common/admin.h"
#include "../common/base.h"
#include "../common/log.h"
#include "../common/placement.h"
#include "../common/ring.h"

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define LIST_PAGE 500      /* instances per PARTITION_LIST request */
#define SCRUB_STEP 32      /* objects per store_scrub call */
#define CORRUPT_QUEUE 1024 /* SOPs waiting for repair; more are found again by the next pass */
/* A partition that is being written is not pulled until it has settled (see
 * partition_settled()), for at most this many rounds: 30 s at the default
 * 2 s interval. */
#define SETTLE_MAX_ROUNDS 15

/* One partition's summary as a member reported it. */
typedef struct {
    bool present;
    uint64_t count, bytes;
    uint8_t digest[SP_DIGEST_LEN];
} psum_t;

/* Paces a stream of bytes to a rate: each caller waits for its turn. */
typedef struct {
    pthread_mutex_t lock;
    uint64_t rate;   /* bytes per second; 0 = unlimited */
    int64_t next_us; /* when the next caller may go */
} throttle_t;

struct repair {
    repair_config_t cfg;
    char self_id[GOSSIP_ID_MAX];
    store_t *store;
    membership_t *m;
    keys_pair_t self;
    const keys_allowlist_t *allowed;

    throttle_t copy_throttle, scrub_throttle;
    pthread_mutex_t queue_lock;
    char (*corrupt)[65]; /* under queue_lock */
    size_t ncorrupt;     /* under queue_lock */

    _Atomic uint64_t bytes_done, bytes_pending, hints_pending;
    _Atomic uint64_t scrub_checked, scrub_corrupt, repaired;
    _Atomic uint64_t copy_errors, scrub_bytes;               /* since start, for the metrics */
    _Atomic uint32_t under_replicated, partitions_with_data; /* at the last round's gather */
    _Atomic uint32_t partitions_owned;
    _Atomic double rate; /* bytes/s of the copy streams, last window */
    pthread_mutex_t rate_lock;
    int64_t window_start_ms; /* under rate_lock */
    uint64_t window_bytes;   /* under rate_lock */

    /* Round thread only: per partition, a fingerprint of every member's
     * summary at the last round and for how many rounds it has kept changing
     * while the copies differed (partition_settled). */
    uint64_t *seen;
    uint16_t *busy_rounds;
    bool seen_valid;

    pthread_t round_thread, scrub_thread;
    bool round_started, scrub_started;
    atomic_bool stop;
};

/* ---- small tools -------------------------------------------------------- */

static int64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* Sleeps up to ms, in short steps so that repair_stop() is prompt. */
static void nap(repair_t *h, int64_t ms)
{
    int64_t end = sp_now_ms() + ms;
    while (!atomic_load(&h->stop)) {
        int64_t left = end - sp_now_ms();
        if (left <= 0)
            return;
        int64_t step = left < 50 ? left : 50;
        struct timespec ts = {.tv_sec = 0, .tv_nsec = (long)step * 1000000L};
        nanosleep(&ts, NULL);
    }
}

static void throttle_init(throttle_t *t, uint64_t rate)
{
    pthread_mutex_init(&t->lock, NULL);
    t->rate = rate;
    t->next_us = 0;
}

static void throttle_take(repair_t *h, throttle_t *t, uint64_t bytes)
{
    if (t->rate == 0)
        return;
    pthread_mutex_lock(&t->lock);
    int64_t now = now_us();
    if (t->next_us < now)
        t->next_us = now;
    int64_t start = t->next_us;
    t->next_us += (int64_t)((double)bytes * 1e6 / (double)t->rate);
    pthread_mutex_unlock(&t->lock);
    if (start > now)
        nap(h, (start - now + 999) / 1000);
}

/* The copy rate: the open window's once it spans 200 ms (short repairs
 * finish inside one window), else the last closed window's. */
static double copy_rate(repair_t *h)
{
    pthread_mutex_lock(&h->rate_lock);
    int64_t span = sp_now_ms() - h->window_start_ms;
    double rate = h->window_bytes > 0 && span >= 200
                      ? (double)h->window_bytes * 1000.0 / (double)span
                      : atomic_load(&h->rate);
    pthread_mutex_unlock(&h->rate_lock);
    return rate;
}

static void note_copied(repair_t *h, uint64_t bytes)
{
    atomic_fetch_add(&h->bytes_done, bytes);
    pthread_mutex_lock(&h->rate_lock);
    int64_t now = sp_now_ms();
    /* A window opens with its first copy: idle time before it is not
     * repair time (it made the first rate after a quiet spell tiny). */
    if (h->window_bytes == 0)
        h->window_start_ms = now;
    h->window_bytes += bytes;
    if (now - h->window_start_ms >= 1000) {
        atomic_store(&h->rate,
                     (double)h->window_bytes * 1000.0 / (double)(now - h->window_start_ms));
        h->window_start_ms = now;
        h->window_bytes = 0;
    }
    pthread_mutex_unlock(&h->rate_lock);
}

/* A client for a member, or NULL if its name is not in the allow-list. */
static transport_client_t *client_new(repair_t *h, const gossip_member_t *peer)
{
    char key[KEYS_Z85_LEN + 1];
    if (!keys_allowlist_find_name(h->allowed, peer->id, key)) {
        log_warn("repair: member %s is not in the cluster keys; skipped", peer->id);
        return NULL;
    }
    return transport_client_new(&h->cfg.transport, &h->self, key, peer->endpoint);
}

/* A sorted set of (SOP UID, digest), for comparing partition listings. */
typedef struct {
    char sop[65];
    uint8_t digest[SP_DIGEST_LEN];
    uint64_t size;
    uint64_t version;      /* of the put that stored this copy (store.h, Duplicates) */
    store_policy_t policy; /* likewise */
} item_t;

typedef struct {
    item_t *v;
    size_t n, cap;
} set_t;

static void set_add(set_t *s, const char *sop, const uint8_t *digest, uint64_t size,
                    uint64_t version, int policy)
{
    if (s->n == s->cap) {
        s->cap = s->cap ? 2 * s->cap : 64;
        s->v = sp_realloc(s->v, s->cap * sizeof *s->v);
    }
    item_t *it = &s->v[s->n++];
    sp_strlcpy(it->sop, sop, sizeof it->sop);
    memcpy(it->digest, digest, SP_DIGEST_LEN);
    it->size = size;
    it->version = version;
    it->policy = (store_policy_t)policy;
}

static int item_cmp(const void *a, const void *b)
{
    return strcmp(((const item_t *)a)->sop, ((const item_t *)b)->sop);
}

static void set_sort(set_t *s)
{
    if (s->n > 1)
        qsort(s->v, s->n, sizeof *s->v, item_cmp);
}

static const item_t *set_find(const set_t *s, const char *sop)
{
    item_t key;
    sp_strlcpy(key.sop, sop, sizeof key.sop);
    return s->n ? bsearch(&key, s->v, s->n, sizeof *s->v, item_cmp) : NULL;
}

static void set_free(set_t *s)
{
    free(s->v);
    memset(s, 0, sizeof *s);
}

static int set_add_entry(void *ctx, const store_entry_t *e)
{
    set_add(ctx, e->sop_uid, e->digest, e->size, e->version, e->policy);
    return 0;
}

/* Lists a whole partition of a member into a sorted set. */
static int remote_list(repair_t *h, transport_client_t *c, uint32_t part, set_t *out, char *err,
                       size_t errlen)
{
    char *cursor = NULL;
    int rc = 0;
    do {
        wire_request_t req = {
            .kind = WIRE_PARTITION_LIST, .partition = part, .cursor = cursor, .limit = LIST_PAGE};
        wire_reply_t rep;
        transport_response_t raw;
        rc = wire_call(c, &req, NULL, 0, h->cfg.call_timeout_ms, &rep, &raw, err, errlen);
        free(cursor);
        cursor = NULL;
        if (rc != 0)
            break;
        for (size_t i = 0; i < rep.ninstances; i++)
            set_add(out, rep.instances[i].sop_uid, rep.instances[i].digest, rep.instances[i].size,
                    rep.instances[i].version, rep.instances[i].policy);
        cursor = rep.next_cursor;
        rep.next_cursor = NULL;
        wire_reply_free(&rep);
        transport_response_free(&raw);
    } while (cursor != NULL && !atomic_load(&h->stop));
    free(cursor);
    set_sort(out);
    return rc;
}

/* Reads one instance from a member and stores it here (store_put checks the
 * digest of the bytes). repair: replace a corrupt local copy. *outcome (may
 * be NULL) tells whether anything was written. */
static int copy_instance(repair_t *h, transport_client_t *c, const char *sop, bool repair,
                         const uint8_t *want_digest, store_outcome_t *outcome_out, char *err,
                         size_t errlen)
{
    wire_request_t req = {.kind = WIRE_GET, .sop_uid = (char *)sop};
    wire_reply_t rep;
    transport_response_t raw;
    int rc = wire_call(c, &req, NULL, 0, h->cfg.call_timeout_ms, &rep, &raw, err, errlen);
    if (rc != 0)
        return rc;
    if (want_digest && memcmp(rep.digest, want_digest, SP_DIGEST_LEN) != 0) {
        sp_fmt(err, errlen, "%s changed at the source", sop);
        rc = SP_ECONFLICT;
    } else {
        store_put_t put = {
            .partition = rep.partition, .attrs = &rep.attrs, .data = raw.body, .len = raw.body_len};
        memcpy(put.digest, rep.digest, SP_DIGEST_LEN);
        put.version = rep.version;
        put.policy = (store_policy_t)rep.policy; /* the same numbers */
        store_outcome_t outcome;
        rc = repair ? store_repair(h->store, &put, &outcome) : store_put(h->store, &put, &outcome);
        if (rc != 0)
            sp_fmt(err, errlen, "storing %s (partition %u): %s", sop, (unsigned)rep.partition,
                   sp_strerror(rc));
        else if (outcome == STORE_CONFLICT)
            log_warn("repair: %s differs from the copy already here; kept as a conflict", sop);
        else if (outcome == STORE_STORED && !repair)
            note_copied(h, raw.body_len);
        if (rc == 0 && outcome_out)
            *outcome_out = outcome;
    }
    wire_reply_free(&rep);
    transport_response_free(&raw);
    return rc;
}

/* ---- one round ---------------------------------------------------------- */

/* What a round knows: the view, placement, owners, and every summary. */
typedef struct {
    gossip_member_t *view;
    size_t nview;
    placement_t pl;         /* over view */
    size_t replicas;        /* min(N, placed members) */
    size_t *owners;         /* RING_PARTITIONS * replicas indexes into view */
    long self_at;           /* index of this node in view, or -1 */
    psum_t *mine;           /* RING_PARTITIONS */
    gossip_member_t *peers; /* other reachable storage members */
    psum_t **sums;          /* per peer; NULL if it did not answer */
    size_t npeers;
} round_t;

static int mine_add(void *ctx, const store_partition_summary_t *p)
{
    psum_t *mine = ctx;
    if (p->partition < RING_PARTITIONS) {
        mine[p->partition] = (psum_t){.present = true, .count = p->count, .bytes = p->bytes};
        memcpy(mine[p->partition].digest, p->digest, SP_DIGEST_LEN);
    }
    return 0;
}

/* Fills the view, placement and owners of every partition. The owners come
 * from placement.c over one copy of the view, as routers and the CLI compute
 * them. */
static void round_placement(repair_t *h, round_t *r)
{
    r->nview = membership_view(h->m, &r->view);
    placement_init(&r->pl, r->view, r->nview, (size_t)h->cfg.replicas);
    r->self_at = -1;
    for (size_t i = 0; i < r->nview; i++)
        if (strcmp(r->view[i].id, h->self_id) == 0)
            r->self_at = (long)i;
    r->replicas = r->pl.replicas < r->pl.nplaced ? r->pl.replicas : r->pl.nplaced;
    r->owners = sp_calloc(RING_PARTITIONS * (r->replicas ? r->replicas : 1), sizeof *r->owners);
    for (uint32_t p = 0; r->replicas && p < RING_PARTITIONS; p++) {
        size_t k = placement_owners(&r->pl, p, &r->owners[p * r->replicas]);
        SP_ASSERT(k == r->replicas);
    }
}

static bool owns(const round_t *r, uint32_t p, long who)
{
    for (size_t i = 0; who >= 0 && i < r->replicas; i++)
        if (r->owners[p * r->replicas + i] == (size_t)who)
            return true;
    return false;
}

/* Asks a member for the summaries of its non-empty partitions. */
static psum_t *remote_sums(repair_t *h, transport_client_t *c, char *err, size_t errlen)
{
    wire_request_t req = {.kind = WIRE_PARTITION_DIGEST, .nonempty = true};
    wire_reply_t rep;
    transport_response_t raw;
    if (wire_call(c, &req, NULL, 0, h->cfg.call_timeout_ms, &rep, &raw, err, errlen) != 0)
        return NULL;
    psum_t *sums = sp_calloc(RING_PARTITIONS, sizeof *sums);
    for (size_t i = 0; i < rep.ndigests; i++) {
        const wire_partition_digest_t *d = &rep.digests[i];
        if (d->partition >= RING_PARTITIONS || d->count == 0)
            continue;
        sums[d->partition] = (psum_t){.present = true, .count = d->count, .bytes = d->bytes};
        memcpy(sums[d->partition].digest, d->digest, SP_DIGEST_LEN);
    }
    wire_reply_free(&rep);
    transport_response_free(&raw);
    return sums;
}

/* Gathers this node's summaries and every reachable peer's. Returns the
 * number of peers that did not answer. */
static size_t round_gather(repair_t *h, round_t *r, transport_client_t **clients)
{
    r->mine = sp_calloc(RING_PARTITIONS, sizeof *r->mine);
    if (store_partition_summaries(h->store, mine_add, r->mine) != 0)
        log_error("repair: cannot summarise the local partitions");
    r->peers = sp_calloc(r->nview ? r->nview : 1, sizeof *r->peers);
    r->sums = sp_calloc(r->nview ? r->nview : 1, sizeof *r->sums);
    size_t missing = 0;
    for (size_t i = 0; i < r->nview; i++) {
        if (strcmp(r->view[i].id, h->self_id) == 0 || !placement_is_readable(&r->view[i]))
            continue;
        size_t k = r->npeers++;
        r->peers[k] = r->view[i];
        clients[k] = client_new(h, &r->peers[k]);
        char err[512] = "not in the cluster keys";
        r->sums[k] = clients[k] ? remote_sums(h, clients[k], err, sizeof err) : NULL;
        if (r->sums[k] == NULL) {
            log_debug("repair: no digests from %s: %s", r->peers[k].id, err);
            missing++;
        }
    }
    return missing;
}

static void round_free(round_t *r)
{
    for (size_t i = 0; i < r->npeers; i++)
        free(r->sums[i]);
    free(r->sums);
    free(r->peers);
    free(r->mine);
    free(r->owners);
    placement_clear(&r->pl);
    free(r->view);
    memset(r, 0, sizeof *r);
}

/* ---- pulling what this node owns ---------------------------------------- */

/* One owned partition to fill, from every peer whose digest differs (one
 * task per partition, so two streams never copy the same instance). */
typedef struct {
    uint32_t partition;
    size_t *peers;
    size_t npeers;
} pull_t;

typedef struct {
    repair_t *h;
    const round_t *r;
    const pull_t *tasks;
    size_t ntasks;
    atomic_size_t next;
    atomic_size_t failed;
} pull_run_t;

/* Copies from a peer every instance of a partition this node lacks. */
static int pull_partition(repair_t *h, transport_client_t *c, const char *peer, uint32_t part)
{
    set_t mine = {0}, theirs = {0};
    char *cursor = NULL, err[512];
    /* Listed afresh per peer: what the previous peer gave is not copied twice. */
    int rc = store_partition_list(h->store, part, NULL, 0, set_add_entry, &mine, &cursor);
    free(cursor);
    set_sort(&mine);
    if (rc == 0)
        rc = remote_list(h, c, part, &theirs, err, sizeof err);
    else
        sp_fmt(err, sizeof err, "local listing: %s", sp_strerror(rc));
    uint64_t want = 0, copied = 0, conflicts = 0;
    for (size_t i = 0; rc == 0 && i < theirs.n; i++)
        if (set_find(&mine, theirs.v[i].sop) == NULL)
            want += theirs.v[i].size;
    atomic_fetch_add(&h->bytes_pending, want);
    for (size_t i = 0; rc == 0 && i < theirs.n && !atomic_load(&h->stop); i++) {
        const item_t *have = set_find(&mine, theirs.v[i].sop), *t = &theirs.v[i];
        /* A differing copy is taken only when the peer's version wins by its
         * policy (store.h, Convergence), through store_repair, which keeps the
         * local version aside; any other difference stays a local conflict. */
        bool newer =
            have != NULL && memcmp(have->digest, t->digest, SP_DIGEST_LEN) != 0 &&
            store_version_wins(t->policy, t->version, t->digest, have->version, have->digest);
        if (have != NULL && !newer) {
            conflicts += memcmp(have->digest, t->digest, SP_DIGEST_LEN) != 0;
            continue;
        }
        throttle_take(h, &h->copy_throttle, theirs.v[i].size);
        int one =
            copy_instance(h, c, theirs.v[i].sop, newer, theirs.v[i].digest, NULL, err, sizeof err);
        if (!newer) {
            atomic_fetch_sub(&h->bytes_pending, theirs.v[i].size);
            want -= theirs.v[i].size;
        }
        if (one == 0)
            copied++;
        else if (one != SP_ENOTFOUND && one != SP_ECONFLICT)
            rc = one; /* NOTFOUND: handed off meanwhile; the next round sees it */
    }
    atomic_fetch_sub(&h->bytes_pending, want);
    if (copied)
        log_info("repair: partition %u: copied %llu instances from %s", (unsigned)part,
                 (unsigned long long)copied, peer);
    if (conflicts)
        log_debug("repair: partition %u: %llu SOPs differ from %s (conflicts)", (unsigned)part,
                  (unsigned long long)conflicts, peer);
    if (rc != 0)
        log_warn("repair: partition %u from %s: %s", (unsigned)part, peer, err);
    set_free(&mine);
    set_free(&theirs);
    return rc;
}

static void *pull_main(void *arg)
{
    pull_run_t *run = arg;
    repair_t *h = run->h;
    transport_client_t **clients = sp_calloc(run->r->npeers ? run->r->npeers : 1, sizeof *clients);
    for (;;) {
        size_t i = atomic_fetch_add(&run->next, 1);
        if (i >= run->ntasks || atomic_load(&h->stop))
            break;
        const pull_t *t = &run->tasks[i];
        for (size_t j = 0; j < t->npeers && !atomic_load(&h->stop); j++) {
            size_t k = t->peers[j];
            if (clients[k] == NULL)
                clients[k] = client_new(h, &run->r->peers[k]);
            if (clients[k] == NULL ||
                pull_partition(h, clients[k], run->r->peers[k].id, t->partition) != 0)
                atomic_fetch_add(&run->failed, 1);
        }
    }
    for (size_t i = 0; i < run->r->npeers; i++)
        transport_client_destroy(&clients[i]);
    free(clients);
    return NULL;
}

/* A fingerprint of partition p's summaries on this node and every peer. */
static uint64_t partition_fingerprint(const round_t *r, uint32_t p)
{
    uint64_t fp = 0;
    for (size_t k = 0; k <= r->npeers; k++) {
        const psum_t *s = k == r->npeers ? &r->mine[p] : r->sums[k] ? &r->sums[k][p] : NULL;
        uint64_t lane = 0;
        if (s != NULL && s->present)
            memcpy(&lane, s->digest, sizeof lane);
        fp = (fp ^ lane ^ (s != NULL && s->present ? s->count : 0)) * 0x100000001b3ull + k;
    }
    return fp;
}

/* Notes every partition's fingerprint for the next round and says whether
 * partition p, whose copies differ, may be pulled now. Copies that differ
 * because writes are in flight (W of N acknowledged, the rest arriving) are
 * the rule during ingest, not damage: pulling them would list the whole
 * partition on both sides - work that grows with the archive - and copy
 * instances whose own write is about to land. So a partition is pulled only
 * when no member's summary of it changed since the last round, or when it
 * has kept changing for SETTLE_MAX_ROUNDS rounds (written without pause:
 * pulled anyway, so repair is late by at most that). The first round after
 * a start pulls whatever differs, as there is no last round to compare
 * with. */
static bool partition_settled(repair_t *h, const round_t *r, uint32_t p, bool differs)
{
    uint64_t fp = partition_fingerprint(r, p);
    bool changed = h->seen_valid && fp != h->seen[p];
    h->seen[p] = fp;
    if (!differs || !changed || ++h->busy_rounds[p] >= SETTLE_MAX_ROUNDS) {
        h->busy_rounds[p] = 0;
        return true;
    }
    return false;
}

/* Pulls every owned partition whose digest differs at a holder and has
 * settled (partition_settled), in parallel streams. Returns the number of
 * failed pulls. */
static size_t round_pull(repair_t *h, const round_t *r)
{
    pull_t *tasks = NULL;
    size_t ntasks = 0, cap = 0;
    for (uint32_t p = 0; p < RING_PARTITIONS; p++) {
        pull_t t = {.partition = p};
        bool owned = owns(r, p, r->self_at);
        for (size_t k = 0; owned && k < r->npeers; k++) {
            const psum_t *s = r->sums[k] ? &r->sums[k][p] : NULL;
            if (s == NULL || !s->present ||
                (r->mine[p].present && memcmp(s->digest, r->mine[p].digest, SP_DIGEST_LEN) == 0))
                continue;
            t.peers = sp_realloc(t.peers, (t.npeers + 1) * sizeof *t.peers);
            t.peers[t.npeers++] = k;
        }
        /* Every partition's fingerprint is noted, owned or not, so one that
         * becomes this node's (a member went out) and is quiet is pulled at
         * once. */
        if (!partition_settled(h, r, p, t.npeers > 0) || t.npeers == 0) {
            free(t.peers);
            continue;
        }
        if (ntasks == cap) {
            cap = cap ? 2 * cap : 64;
            tasks = sp_realloc(tasks, cap * sizeof *tasks);
        }
        tasks[ntasks++] = t;
    }
    h->seen_valid = true;
    if (ntasks == 0)
        return 0;
    pull_run_t run = {.h = h, .r = r, .tasks = tasks, .ntasks = ntasks};
    atomic_init(&run.next, 0);
    atomic_init(&run.failed, 0);
    size_t nthreads = (size_t)h->cfg.streams < ntasks ? (size_t)h->cfg.streams : ntasks;
    pthread_t *threads = sp_calloc(nthreads, sizeof *threads);
    size_t started = 0;
    for (; started < nthreads; started++)
        if (pthread_create(&threads[started], NULL, pull_main, &run) != 0)
            break;
    if (started == 0)
        pull_main(&run);
    for (size_t i = 0; i < started; i++)
        pthread_join(threads[i], NULL);
    free(threads);
    for (size_t i = 0; i < ntasks; i++)
        free(tasks[i].peers);
    free(tasks);
    return atomic_load(&run.failed);
}

/* ---- handing off what this node does not own ---------------------------- */

typedef struct {
    set_t *owner_sets;
    size_t nowners;
} held_t;

/* Every owner holds this instance with the same digest. */
static bool held_by_owners(void *ctx, const store_entry_t *e)
{
    const held_t *hd = ctx;
    for (size_t i = 0; i < hd->nowners; i++) {
        const item_t *it = set_find(&hd->owner_sets[i], e->sop_uid);
        if (it == NULL || memcmp(it->digest, e->digest, SP_DIGEST_LEN) != 0)
            return false;
    }
    return true;
}

typedef struct {
    char **v;
    size_t n;
} studies_t;

static int add_study(void *ctx, const char *study_uid)
{
    studies_t *s = ctx;
    s->v = sp_realloc(s->v, (s->n + 1) * sizeof *s->v);
    s->v[s->n++] = sp_strdup(study_uid);
    return 0;
}

/* Deletes the studies of a partition this node no longer owns that every
 * owner holds completely. Returns 0 when the partition is now empty here. */
static int handoff_partition(repair_t *h, const round_t *r, transport_client_t **clients,
                             uint32_t part)
{
    size_t n = r->replicas;
    set_t *sets = sp_calloc(n ? n : 1, sizeof *sets);
    int rc = n > 0 ? 0 : SP_EUNAVAIL;
    char err[512] = "no owners";
    for (size_t i = 0; rc == 0 && i < n; i++) {
        const gossip_member_t *owner = &r->view[r->owners[part * n + i]];
        size_t k = 0;
        while (k < r->npeers && strcmp(r->peers[k].id, owner->id) != 0)
            k++;
        /* An owner that is down or did not answer cannot confirm: keep the copy. */
        if (k == r->npeers || clients[k] == NULL || r->sums[k] == NULL) {
            sp_fmt(err, sizeof err, "owner %s is not reachable", owner->id);
            rc = SP_EUNAVAIL;
        } else {
            rc = remote_list(h, clients[k], part, &sets[i], err, sizeof err);
        }
    }
    studies_t studies = {0};
    uint64_t deleted = 0, kept = 0;
    if (rc == 0)
        rc = store_partition_studies(h->store, part, add_study, &studies);
    held_t hd = {.owner_sets = sets, .nowners = n};
    for (size_t i = 0; rc == 0 && i < studies.n; i++) {
        uint64_t d = 0;
        int one = store_delete_study_if(h->store, part, studies.v[i], held_by_owners, &hd, &d);
        if (one == 0)
            deleted += d;
        else if (one == SP_ECONFLICT)
            kept++; /* an owner still lacks something: it pulls it, we retry next round */
        else
            rc = one;
    }
    if (deleted)
        log_info("hand-off: partition %u: deleted %llu instances every owner holds", (unsigned)part,
                 (unsigned long long)deleted);
    if (rc != 0)
        log_debug("hand-off: partition %u kept: %s", (unsigned)part,
                  rc == SP_EUNAVAIL ? err : sp_strerror(rc));
    for (size_t i = 0; i < studies.n; i++)
        free(studies.v[i]);
    free(studies.v);
    for (size_t i = 0; i < n; i++)
        set_free(&sets[i]);
    free(sets);
    return rc == 0 && kept == 0 ? 0 : rc ? rc : SP_ECONFLICT;
}

/* Hands off every partition held here and not owned. Returns how many are
 * still held. */
static size_t round_handoff(repair_t *h, const round_t *r, transport_client_t **clients)
{
    size_t still = 0;
    for (uint32_t p = 0; p < RING_PARTITIONS && !atomic_load(&h->stop); p++)
        if (r->mine[p].present && !owns(r, p, r->self_at))
            still += handoff_partition(h, r, clients, p) != 0;
    return still;
}

/* ---- the round thread --------------------------------------------------- */

static bool knows_other_storage(const round_t *r, const char *self_id)
{
    for (size_t i = 0; i < r->nview; i++)
        if (r->view[i].role == GOSSIP_STORAGE && strcmp(r->view[i].id, self_id) != 0)
            return true;
    return false;
}

static void round_figures(repair_t *h, const round_t *r)
{
    uint64_t hints = 0;
    uint32_t owned = 0;
    for (uint32_t p = 0; p < RING_PARTITIONS; p++) {
        bool mine = owns(r, p, r->self_at);
        owned += mine;
        if (!mine && r->mine[p].present)
            hints += r->mine[p].count;
    }
    atomic_store(&h->partitions_owned, owned);
    atomic_store(&h->hints_pending, hints);
}

/* Announces the state this round earned: a joiner that caught up is
 * ALIVE; a drained node is LEFT and stops its process. */
static int any_partition(void *ctx, const store_partition_summary_t *p)
{
    (void)p;
    *(bool *)ctx = true;
    return 1; /* one is enough */
}

static bool holds_nothing(repair_t *h)
{
    bool any = false;
    return store_partition_summaries(h->store, any_partition, &any) == 0 && !any;
}

static void round_transitions(repair_t *h, const round_t *r, bool complete, size_t still_held)
{
    gossip_state_t state = membership_self_state(h->m);
    /* Without seeds this is the first member: there is nobody to catch up
     * with. With seeds it must have learned the cluster first. */
    if (state == GOSSIP_JOINING && complete &&
        (!h->cfg.expect_peers || knows_other_storage(r, h->self_id))) {
        log_info("repair: caught up with every holder; %s is alive", h->self_id);
        membership_set_self_state(h->m, GOSSIP_ALIVE);
    }
    /* Re-read after the hand-off: a put from a router with an older view
     * may have landed since the round's summaries were taken. */
    if (state == GOSSIP_DRAINING && complete && still_held == 0 && holds_nothing(h)) {
        log_info("drain: every partition is held by its owners; %s leaves the cluster", h->self_id);
        membership_set_self_state(h->m, GOSSIP_LEFT);
        nap(h, 3LL * h->cfg.interval_ms > 2000 ? 3LL * h->cfg.interval_ms : 2000);
        kill(getpid(), SIGTERM); /* the node's signal wait shuts it down cleanly */
    }
}

static void count_under_replicated(const round_t *r, wire_status_t *out);

static void round_run(repair_t *h)
{
    round_t r = {0};
    round_placement(h, &r);
    transport_client_t **clients = sp_calloc(r.nview ? r.nview : 1, sizeof *clients);
    size_t missing = round_gather(h, &r, clients);
    round_figures(h, &r);
    /* The cluster-wide figure the status command computes, from the
     * digests this round gathered anyway: the metrics read it for free. */
    wire_status_t counted = {.replicas = (uint32_t)h->cfg.replicas};
    count_under_replicated(&r, &counted);
    atomic_store(&h->under_replicated, counted.under_replicated_partitions);
    atomic_store(&h->partitions_with_data, counted.partitions_with_data);
    size_t failed = round_pull(h, &r);
    atomic_fetch_add(&h->copy_errors, failed);
    size_t still = round_handoff(h, &r, clients);
    round_transitions(h, &r, missing == 0 && failed == 0, still);
    for (size_t i = 0; i < r.npeers; i++)
        transport_client_destroy(&clients[i]);
    free(clients);
    round_free(&r);
    if (atomic_load(&h->bytes_pending) == 0) {
        pthread_mutex_lock(&h->rate_lock);
        h->window_bytes = 0;
        atomic_store(&h->rate, 0.0);
        pthread_mutex_unlock(&h->rate_lock);
    }
}

static void *round_main(void *arg)
{
    repair_t *h = arg;
    uint64_t seen_version = 0;
    while (!atomic_load(&h->stop)) {
        seen_version = membership_view_version(h->m);
        round_run(h);
        /* Wait for the interval, or less when the view changes. */
        int64_t next = sp_now_ms() + h->cfg.interval_ms;
        while (!atomic_load(&h->stop) && sp_now_ms() < next &&
               membership_view_version(h->m) == seen_version)
            nap(h, 100);
    }
    return NULL;
}

/* ---- scrubbing and repair of corrupt copies ----------------------------- */

void repair_note_corrupt(repair_t *h, const char *sop_uid)
{
    pthread_mutex_lock(&h->queue_lock);
    bool known = false;
    for (size_t i = 0; i < h->ncorrupt && !known; i++)
        known = strcmp(h->corrupt[i], sop_uid) == 0;
    if (!known && h->ncorrupt < CORRUPT_QUEUE)
        sp_strlcpy(h->corrupt[h->ncorrupt++], sop_uid, sizeof h->corrupt[0]);
    pthread_mutex_unlock(&h->queue_lock);
}

static int scrub_found(void *ctx, const store_entry_t *e)
{
    repair_t *h = ctx;
    atomic_fetch_add(&h->scrub_corrupt, 1);
    log_warn("scrub: %s (study %s, partition %u) fails its digest; repairing from a replica",
             e->sop_uid, e->study_uid, (unsigned)e->partition);
    repair_note_corrupt(h, e->sop_uid);
    return 0;
}

/* Replaces a corrupt local copy with a good one from any live member. */
static void repair_one(repair_t *h, const char *sop)
{
    gossip_member_t *view = NULL;
    size_t n = membership_view(h->m, &view);
    char err[512] = "no other live storage member";
    bool done = false;
    for (size_t i = 0; i < n && !done && !atomic_load(&h->stop); i++) {
        if (strcmp(view[i].id, h->self_id) == 0 || !placement_is_readable(&view[i]))
            continue;
        transport_client_t *c = client_new(h, &view[i]);
        if (c == NULL)
            continue;
        store_outcome_t outcome = STORE_DUPLICATE;
        if (copy_instance(h, c, sop, true, NULL, &outcome, err, sizeof err) == 0) {
            done = true;
            /* DUPLICATE: the local copy verified after all (e.g. repaired by
             * an earlier report of the same SOP). */
            if (outcome == STORE_STORED) {
                atomic_fetch_add(&h->repaired, 1);
                log_info("repair: replaced the corrupt copy of %s with %s's", sop, view[i].id);
            }
        }
        transport_client_destroy(&c);
    }
    if (!done)
        log_error("repair: no good copy of %s found (%s); retried by the next scrub pass", sop,
                  err);
    free(view);
}

static void repair_queued(repair_t *h)
{
    for (;;) {
        char sop[65];
        pthread_mutex_lock(&h->queue_lock);
        bool any = h->ncorrupt > 0;
        if (any) {
            sp_strlcpy(sop, h->corrupt[0], sizeof sop);
            memmove(h->corrupt, h->corrupt + 1, (h->ncorrupt - 1) * sizeof h->corrupt[0]);
            h->ncorrupt--;
        }
        pthread_mutex_unlock(&h->queue_lock);
        if (!any || atomic_load(&h->stop))
            return;
        repair_one(h, sop);
    }
}

static void *scrub_main(void *arg)
{
    repair_t *h = arg;
    char *cursor = NULL;
    while (!atomic_load(&h->stop)) {
        repair_queued(h);
        char *next = NULL;
        uint64_t checked = 0, bytes = 0;
        int rc = store_scrub(h->store, cursor, SCRUB_STEP, scrub_found, h, &next, &checked, &bytes);
        free(cursor);
        cursor = next;
        atomic_fetch_add(&h->scrub_checked, checked);
        atomic_fetch_add(&h->scrub_bytes, bytes);
        if (rc != 0)
            log_error("scrub: %s", sp_strerror(rc));
        throttle_take(h, &h->scrub_throttle, bytes);
        if (cursor == NULL || rc != 0) {
            store_blob_gc_tune(h->store, false);
            /* End of a pass: rest, but answer reported corruption promptly. */
            int64_t end = sp_now_ms() + h->cfg.scrub_interval_ms;
            while (!atomic_load(&h->stop) && sp_now_ms() < end) {
                repair_queued(h);
                nap(h, 100);
            }
        }
    }
    free(cursor);
    return NULL;
}

/* ---- life cycle --------------------------------------------------------- */

repair_t *repair_start(const repair_config_t *cfg, store_t *store, membership_t *m,
                       const keys_pair_t *self, const keys_allowlist_t *allowed)
{
    repair_t *h = sp_calloc(1, sizeof *h);
    h->cfg = *cfg;
    if (h->cfg.streams < 1)
        h->cfg.streams = 1;
    sp_strlcpy(h->self_id, cfg->self_id, sizeof h->self_id);
    h->cfg.self_id = h->self_id;
    h->store = store;
    h->m = m;
    h->self = *self;
    h->allowed = allowed;
    throttle_init(&h->copy_throttle, cfg->rate_bytes);
    throttle_init(&h->scrub_throttle, cfg->scrub_rate_bytes);
    pthread_mutex_init(&h->queue_lock, NULL);
    pthread_mutex_init(&h->rate_lock, NULL);
    h->window_start_ms = sp_now_ms();
    h->corrupt = sp_calloc(CORRUPT_QUEUE, sizeof *h->corrupt);
    h->seen = sp_calloc(RING_PARTITIONS, sizeof *h->seen);
    h->busy_rounds = sp_calloc(RING_PARTITIONS, sizeof *h->busy_rounds);
    atomic_init(&h->stop, false);
    if (pthread_create(&h->round_thread, NULL, round_main, h) == 0)
        h->round_started = true;
    if (h->round_started && pthread_create(&h->scrub_thread, NULL, scrub_main, h) == 0)
        h->scrub_started = true;
    if (!h->scrub_started) {
        log_error("repair: cannot start threads");
        repair_stop(&h);
        return NULL;
    }
    log_info("repair: rounds every %d ms, %d streams at %llu bytes/s; scrub at %llu bytes/s, "
             "pause %d ms",
             cfg->interval_ms, h->cfg.streams, (unsigned long long)cfg->rate_bytes,
             (unsigned long long)cfg->scrub_rate_bytes, cfg->scrub_interval_ms);
    return h;
}

void repair_stop(repair_t **hp)
{
    repair_t *h = *hp;
    if (h == NULL)
        return;
    atomic_store(&h->stop, true);
    if (h->round_started)
        pthread_join(h->round_thread, NULL);
    if (h->scrub_started)
        pthread_join(h->scrub_thread, NULL);
    pthread_mutex_destroy(&h->copy_throttle.lock);
    pthread_mutex_destroy(&h->scrub_throttle.lock);
    pthread_mutex_destroy(&h->queue_lock);
    pthread_mutex_destroy(&h->rate_lock);
    free(h->corrupt);
    free(h->seen);
    free(h->busy_rounds);
    free(h);
    *hp = NULL;
}

/* ---- status and drain --------------------------------------------------- */

/* This node's figures, with the partitions held counted from mine. */
static void own_figures(repair_t *h, const psum_t *mine, wire_member_status_t *out)
{
    memset(out, 0, sizeof *out);
    membership_self(h->m, &out->member);
    out->reachable = true;
    store_stats_t st;
    if (store_stats(h->store, &st) == 0) {
        out->instances = st.instances;
        out->bytes = st.bytes;
        out->disk_bytes = st.db_size_bytes;
    }
    for (uint32_t p = 0; p < RING_PARTITIONS; p++)
        out->partitions_held += mine[p].present;
    out->partitions_owned = atomic_load(&h->partitions_owned);
    out->hints_pending = atomic_load(&h->hints_pending);
    out->repair_bytes_done = atomic_load(&h->bytes_done);
    out->repair_bytes_pending = atomic_load(&h->bytes_pending);
    out->repair_rate = copy_rate(h);
    out->scrub_checked = atomic_load(&h->scrub_checked);
    out->scrub_corrupt = atomic_load(&h->scrub_corrupt);
    out->repaired = atomic_load(&h->repaired);
    if (h->cfg.disk_state)
        out->refusing_puts = h->cfg.disk_state(h->cfg.disk_ctx, &out->disk_free);
}

void repair_member_status(repair_t *h, wire_member_status_t *out)
{
    psum_t *mine = sp_calloc(RING_PARTITIONS, sizeof *mine);
    store_partition_summaries(h->store, mine_add, mine);
    own_figures(h, mine, out);
    free(mine);
}

/* Asks one member for its own status; fills *out's figures (keeps the
 * member record from this node's view). */
static bool remote_status(repair_t *h, transport_client_t *c, wire_member_status_t *out)
{
    wire_request_t req = {.kind = WIRE_STATUS, .cluster = false};
    wire_reply_t rep;
    transport_response_t raw;
    char err[512];
    if (wire_call(c, &req, NULL, 0, h->cfg.call_timeout_ms, &rep, &raw, err, sizeof err) != 0) {
        log_debug("status: %s", err);
        return false;
    }
    bool ok = rep.status_body.nmembers == 1;
    if (ok) {
        gossip_member_t keep = out->member;
        *out = rep.status_body.members[0];
        out->member = keep;
        out->reachable = true;
    }
    wire_reply_free(&rep);
    transport_response_free(&raw);
    return ok;
}

/* Partitions with data somewhere whose owners are not all answering with
 * one and the same digest. */
static void count_under_replicated(const round_t *r, wire_status_t *out)
{
    for (uint32_t p = 0; p < RING_PARTITIONS; p++) {
        bool data = r->mine[p].present;
        for (size_t k = 0; k < r->npeers && !data; k++)
            data = r->sums[k] && r->sums[k][p].present;
        if (!data)
            continue;
        out->partitions_with_data++;
        const psum_t *first = NULL;
        bool under = r->replicas < (size_t)out->replicas;
        for (size_t i = 0; i < r->replicas && !under; i++) {
            size_t at = r->owners[p * r->replicas + i];
            const gossip_member_t *owner = &r->view[at];
            const psum_t *s = NULL;
            if (r->self_at >= 0 && at == (size_t)r->self_at)
                s = &r->mine[p];
            for (size_t k = 0; k < r->npeers && s == NULL; k++)
                if (strcmp(r->peers[k].id, owner->id) == 0 && r->sums[k])
                    s = &r->sums[k][p];
            if (s == NULL || !s->present)
                under = true;
            else if (first == NULL)
                first = s;
            else
                under = memcmp(first->digest, s->digest, SP_DIGEST_LEN) != 0;
        }
        out->under_replicated_partitions += under;
    }
}

int repair_cluster_status(repair_t *h, wire_status_t *out)
{
    round_t r = {0};
    round_placement(h, &r);
    transport_client_t **clients = sp_calloc(r.nview ? r.nview : 1, sizeof *clients);
    round_gather(h, &r, clients);
    memset(out, 0, sizeof *out);
    out->from_id = sp_strdup(h->self_id);
    out->replicas = (uint32_t)h->cfg.replicas;
    out->view_version = membership_view_version(h->m);
    out->members = sp_calloc(r.nview ? r.nview : 1, sizeof *out->members);
    for (size_t i = 0; i < r.nview; i++) {
        wire_member_status_t *ms = &out->members[out->nmembers++];
        if (strcmp(r.view[i].id, h->self_id) == 0) {
            own_figures(h, r.mine, ms); /* the summaries round_gather just took */
            continue;
        }
        ms->member = r.view[i];
        ms->reachable = r.view[i].role != GOSSIP_STORAGE && gossip_state_reachable(r.view[i].state);
        for (size_t k = 0; k < r.npeers; k++)
            if (strcmp(r.peers[k].id, r.view[i].id) == 0 && clients[k] && r.sums[k])
                remote_status(h, clients[k], ms);
    }
    count_under_replicated(&r, out);
    for (size_t i = 0; i < r.npeers; i++)
        transport_client_destroy(&clients[i]);
    free(clients);
    round_free(&r);
    return 0;
}

int repair_drain(repair_t *h, const char *node_id, char *why, size_t whylen)
{
    if (strcmp(node_id, h->self_id) != 0) {
        sp_fmt(why, whylen, "this is %s, not %s: send the drain to the node itself", h->self_id,
               node_id);
        return SP_EINVAL;
    }
    gossip_state_t state = membership_self_state(h->m);
    if (state == GOSSIP_DRAINING)
        return 0;
    gossip_member_t *view = NULL;
    size_t n = membership_view(h->m, &view), others = 0;
    for (size_t i = 0; i < n; i++)
        others += strcmp(view[i].id, h->self_id) != 0 && placement_is_placed(&view[i]) &&
                  placement_is_writable(&view[i]); /* ALIVE, JOINING or SUSPECT */
    free(view);
    if (others < (size_t)h->cfg.replicas) {
        sp_fmt(why, whylen,
               "refused: only %zu other live storage members, fewer than the %d replicas every "
               "partition needs",
               others, h->cfg.replicas);
        return SP_EINVAL;
    }
    log_info("drain: %s starts draining to %zu other members", h->self_id, others);
    return membership_set_self_state(h->m, GOSSIP_DRAINING);
}

/* ---- metrics ------------------------------------------------------------ */

/* One gauge or counter family of a single sample. */
static void one(admin_out_t *o, const char *name, const char *help, const char *type, double v)
{
    admin_out_family(o, name, help, type);
    admin_out_sample(o, name, "", v);
}

void repair_collect(void *ctx, admin_out_t *o)
{
    repair_t *h = ctx;
    one(o, "shardpacs_under_replicated_partitions",
        "Partitions with data whose owners do not all hold it with one digest (cluster-wide, "
        "at this node's last repair round)",
        "gauge", atomic_load(&h->under_replicated));
    one(o, "shardpacs_partitions_with_data", "Partitions holding data anywhere (last round)",
        "gauge", atomic_load(&h->partitions_with_data));
    one(o, "shardpacs_node_partitions_owned", "Partitions this node owns in the current view",
        "gauge", atomic_load(&h->partitions_owned));
    one(o, "shardpacs_node_hints_pending",
        "Instances this node holds for partitions it does not own (stand-in copies to hand off)",
        "gauge", (double)atomic_load(&h->hints_pending));
    one(o, "shardpacs_repair_copied_bytes_total",
        "Bytes copied by re-replication, hand-off and anti-entropy", "counter",
        (double)atomic_load(&h->bytes_done));
    one(o, "shardpacs_repair_pending_bytes", "Bytes the current repair round still has to copy",
        "gauge", (double)atomic_load(&h->bytes_pending));
    one(o, "shardpacs_repair_errors_total", "Partition pulls that failed in a repair round",
        "counter", (double)atomic_load(&h->copy_errors));
    one(o, "shardpacs_repair_repaired_total", "Corrupt copies replaced from a replica", "counter",
        (double)atomic_load(&h->repaired));
    one(o, "shardpacs_scrub_checked_total", "Objects the scrubber re-read", "counter",
        (double)atomic_load(&h->scrub_checked));
    one(o, "shardpacs_scrub_read_bytes_total", "Bytes the scrubber re-read", "counter",
        (double)atomic_load(&h->scrub_bytes));
    one(o, "shardpacs_scrub_corrupt_total", "Objects the scrubber found failing their digest",
        "counter", (double)atomic_load(&h->scrub_corrupt));
}
