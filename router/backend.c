/* backend.c - placement, quorum writes, scatter/gather queries and replica
 * fallback for the router (backend.h). */
#include "backend.h"

#include "../common/base.h"
#include "../common/log.h"
#include "../common/ring.h"
#include "../common/wire.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

struct backend {
    backend_config_t cfg;
    backend_node_t *nodes; /* deep copy of cfg.nodes */
    ring_member_t *members;
    _Atomic int64_t *down_until; /* per node: skip in queries until then (sp_now_ms) */
    pthread_key_t conn_key;
};

/* One thread's connections: a transport client per node, made on first use. */
typedef struct {
    backend_t *b;
    transport_client_t **clients;
} conn_t;

static void conn_destroy(void *p)
{
    conn_t *c = p;
    for (size_t i = 0; i < c->b->cfg.nnodes; i++)
        transport_client_destroy(&c->clients[i]);
    free(c->clients);
    free(c);
}

static transport_client_t *client_for(backend_t *b, size_t node)
{
    conn_t *c = pthread_getspecific(b->conn_key);
    if (c == NULL) {
        c = sp_calloc(1, sizeof *c);
        c->b = b;
        c->clients = sp_calloc(b->cfg.nnodes, sizeof *c->clients);
        pthread_setspecific(b->conn_key, c);
    }
    if (c->clients[node] == NULL)
        c->clients[node] = transport_client_new(&b->cfg.transport, &b->cfg.self,
                                                b->nodes[node].public_z85, b->nodes[node].endpoint);
    return c->clients[node];
}

backend_t *backend_new(const backend_config_t *cfg)
{
    backend_t *b = sp_calloc(1, sizeof *b);
    b->cfg = *cfg;
    /* The backend falls back across replicas itself; a transport-level
     * retry would only multiply the wait on a dead node. */
    b->cfg.transport.retries = 0;
    b->nodes = sp_calloc(cfg->nnodes, sizeof *b->nodes);
    b->members = sp_calloc(cfg->nnodes, sizeof *b->members);
    b->down_until = sp_calloc(cfg->nnodes, sizeof *b->down_until);
    for (size_t i = 0; i < cfg->nnodes; i++) {
        b->nodes[i] = cfg->nodes[i];
        b->nodes[i].id = sp_strdup(cfg->nodes[i].id);
        b->nodes[i].endpoint = sp_strdup(cfg->nodes[i].endpoint);
        b->nodes[i].site = sp_strdup(cfg->nodes[i].site);
        b->members[i] = (ring_member_t){b->nodes[i].id, b->nodes[i].site, b->nodes[i].weight};
    }
    b->cfg.nodes = b->nodes;
    pthread_key_create(&b->conn_key, conn_destroy);
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
    if (c)
        conn_destroy(c);
    pthread_key_delete(b->conn_key);
    for (size_t i = 0; i < b->cfg.nnodes; i++) {
        free(b->nodes[i].id);
        free(b->nodes[i].endpoint);
        free(b->nodes[i].site);
    }
    free(b->nodes);
    free(b->members);
    free((void *)b->down_until);
    free(b);
    *bp = NULL;
}

static size_t owners_of(backend_t *b, const char *study_uid, uint32_t *partition, size_t *owners)
{
    *partition = ring_partition(study_uid);
    return ring_owners(b->members, b->cfg.nnodes, *partition, (size_t)b->cfg.replicas, owners);
}

size_t backend_locate(backend_t *b, const char *study_uid, uint32_t *partition, const char **owners)
{
    size_t idx[RING_MAX_REPLICAS];
    size_t k = owners_of(b, study_uid, partition, idx);
    for (size_t i = 0; i < k; i++)
        owners[i] = b->nodes[idx[i]].id;
    return k;
}

static void mark_down(backend_t *b, size_t node, int rc)
{
    int64_t until = sp_now_ms() + b->cfg.retry_down_ms;
    if (atomic_exchange(&b->down_until[node], until) < sp_now_ms())
        log_warn("node %s (%s) did not answer: %s; queries skip it for %d ms", b->nodes[node].id,
                 b->nodes[node].endpoint, sp_strerror(rc), b->cfg.retry_down_ms);
}

static bool is_down(backend_t *b, size_t node)
{
    return atomic_load(&b->down_until[node]) > sp_now_ms();
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
    bool ok = rep.status == 0 && rep.kind == WIRE_PUT &&
              (rep.outcome == WIRE_STORED || rep.outcome == WIRE_DUPLICATE);
    wire_reply_free(&rep);
    return ok;
}

/* Counts one replica's answer into res. A replica still writing when the
 * quorum was reached is neither acknowledged nor failed: its copy lands
 * later (its reply is discarded), so it must not be marked down. */
static void tally_put(backend_t *b, size_t node, transport_call_t *call, bool quorum,
                      backend_put_result_t *res)
{
    wire_reply_t rep;
    char err[256];
    int rc = call->rc;
    if (quorum && rc == SP_ETIMEOUT) {
        res->pending++;
        return;
    }
    if (rc == 0)
        rc = wire_decode_reply(call->resp.head, call->resp.head_len, &rep, err, sizeof err);
    else
        sp_fmt(err, sizeof err, "%s", sp_strerror(rc));
    if (rc == 0 && rep.status == 0 && rep.outcome != WIRE_CONFLICT) {
        res->acknowledged++;
    } else if (rc == 0 && rep.status == 0) {
        res->conflicts++;
    } else {
        res->failed++;
        if (rc == 0)
            sp_fmt(err, sizeof err, "%s", rep.error ? rep.error : sp_strerror(rep.status));
        if (res->detail[0] == '\0')
            sp_fmt(res->detail, sizeof res->detail, "%s: %s", b->nodes[node].id, err);
        if (call->rc == SP_ETIMEOUT || call->rc == SP_EUNAVAIL)
            mark_down(b, node, call->rc);
    }
    if (rc == 0)
        wire_reply_free(&rep);
}

int backend_put(backend_t *b, const attrs_t *attrs, const uint8_t *part10, size_t len,
                backend_put_result_t *res)
{
    memset(res, 0, sizeof *res);
    res->needed = b->cfg.write_quorum;
    const char *study = attrs_get(attrs, ATTR_STUDY_INSTANCE_UID);
    if (study == NULL)
        return SP_EINVAL;
    wire_request_t req = {.kind = WIRE_PUT};
    size_t owners[RING_MAX_REPLICAS];
    size_t n = owners_of(b, study, &req.partition, owners);
    for (size_t i = 0; i < ATTR_STORED_COUNT; i++)
        req.attrs.v[i] = attrs->v[i]; /* borrowed for encoding only */
    sp_digest(part10, len, req.digest);
    uint8_t *head;
    size_t head_len;
    wire_encode_request(&req, &head, &head_len);

    transport_call_t calls[RING_MAX_REPLICAS];
    for (size_t i = 0; i < n; i++)
        calls[i] = (transport_call_t){.client = client_for(b, owners[i]),
                                      .head = head,
                                      .head_len = head_len,
                                      .body = part10,
                                      .body_len = len};
    size_t acked = transport_call_many(calls, n, (size_t)b->cfg.write_quorum,
                                       b->cfg.store_timeout_ms, put_acknowledged, NULL);
    bool quorum = acked >= (size_t)b->cfg.write_quorum;
    free(head);
    for (size_t i = 0; i < n; i++) {
        tally_put(b, owners[i], &calls[i], quorum, res);
        if (calls[i].rc == 0)
            transport_response_free(&calls[i].resp);
    }
    if (n < (size_t)b->cfg.write_quorum && res->detail[0] == '\0')
        sp_fmt(res->detail, sizeof res->detail, "only %zu storage nodes configured", n);
    if (res->conflicts > 0)
        return SP_ECONFLICT;
    return res->acknowledged >= b->cfg.write_quorum ? 0 : SP_EUNAVAIL;
}

/* ---- find --------------------------------------------------------------- */

/* Adds to targets the replicas of every study UID in a "uid1\uid2" list. */
static size_t study_targets(backend_t *b, const char *list, bool *target)
{
    size_t count = 0;
    char *copy = sp_strdup(list), *save = NULL;
    for (char *uid = strtok_r(copy, "\\", &save); uid; uid = strtok_r(NULL, "\\", &save)) {
        uint32_t partition;
        size_t owners[RING_MAX_REPLICAS];
        size_t k = owners_of(b, uid, &partition, owners);
        /* Replicas known to be down are left out while another is up, so a
         * query (and every retrieve, which resolves through one) does not
         * wait out the timeout on a dead node. */
        size_t up = 0;
        for (size_t i = 0; i < k; i++)
            up += !is_down(b, owners[i]);
        for (size_t i = 0; i < k; i++) {
            if (up > 0 && is_down(b, owners[i]))
                continue;
            count += !target[owners[i]];
            target[owners[i]] = true;
        }
    }
    free(copy);
    return count;
}

typedef struct {
    const char *key;
    const attrs_t *match;
} merged_t;

static int merged_cmp(const void *a, const void *b)
{
    return strcmp(((const merged_t *)a)->key, ((const merged_t *)b)->key);
}

/* Sends one find to the chosen nodes and collects every decoded reply. */
static int find_gather(backend_t *b, level_t level, const attrs_t *keys, size_t limit,
                       const bool *target, wire_reply_t *replies, bool *partial, bool *truncated)
{
    wire_request_t req = {.kind = WIRE_FIND,
                          .level = level,
                          .case_insensitive_names = b->cfg.case_insensitive_names,
                          .limit = limit > UINT32_MAX ? 0 : (uint32_t)limit};
    for (size_t i = 0; i < ATTR_COUNT; i++)
        req.attrs.v[i] = keys->v[i];
    uint8_t *head;
    size_t head_len;
    wire_encode_request(&req, &head, &head_len);
    transport_call_t *calls = sp_calloc(b->cfg.nnodes, sizeof *calls);
    size_t *which = sp_calloc(b->cfg.nnodes, sizeof *which);
    size_t n = 0;
    for (size_t i = 0; i < b->cfg.nnodes; i++) {
        if (!target[i])
            continue;
        which[n] = i;
        calls[n++] =
            (transport_call_t){.client = client_for(b, i), .head = head, .head_len = head_len};
    }
    transport_call_many(calls, n, n, b->cfg.query_timeout_ms, NULL, NULL);
    free(head);
    size_t answered = 0;
    for (size_t i = 0; i < n; i++) {
        char err[256];
        int rc = calls[i].rc;
        if (rc == 0) {
            rc = wire_decode_reply(calls[i].resp.head, calls[i].resp.head_len, &replies[i], err,
                                   sizeof err);
            transport_response_free(&calls[i].resp);
            if (rc == 0 && replies[i].status != 0) {
                log_warn("find on node %s failed: %s", b->nodes[which[i]].id,
                         replies[i].error ? replies[i].error : sp_strerror(replies[i].status));
                rc = replies[i].status;
                wire_reply_free(&replies[i]);
            } else if (rc != 0) {
                log_warn("find on node %s: malformed reply: %s", b->nodes[which[i]].id, err);
            }
        } else {
            mark_down(b, which[i], rc);
        }
        if (rc == 0) {
            answered++;
            *truncated |= replies[i].truncated;
        } else {
            *partial = true;
        }
    }
    free(calls);
    free(which);
    return answered ? 0 : SP_EUNAVAIL;
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

int backend_find(backend_t *b, level_t level, const attrs_t *keys, size_t limit,
                 backend_match_fn fn, void *ctx, bool *partial)
{
    bool *target = sp_calloc(b->cfg.nnodes, sizeof *target);
    const char *studies = attrs_get(keys, ATTR_STUDY_INSTANCE_UID);
    size_t ntarget = 0;
    if (studies && studies[0] && !strchr(studies, '*') && !strchr(studies, '?'))
        ntarget = study_targets(b, studies, target);
    if (ntarget == 0) {
        /* Scatter to every node that is not known to be down; if all are,
         * try them all anyway. */
        for (size_t i = 0; i < b->cfg.nnodes; i++)
            ntarget += target[i] = !is_down(b, i);
        if (ntarget == 0)
            for (size_t i = 0; i < b->cfg.nnodes; i++)
                target[i] = true;
    }
    /* The unique key is always needed to merge replicas' answers. */
    attrs_t q = {0};
    attrs_copy(&q, keys);
    if (attrs_get(&q, attr_unique_key(level)) == NULL)
        attrs_set(&q, attr_unique_key(level), "");

    wire_reply_t *replies = sp_calloc(b->cfg.nnodes, sizeof *replies);
    bool part = false, truncated = false;
    int rc = find_gather(b, level, &q, limit ? limit + 1 : 0, target, replies, &part, &truncated);
    size_t total = 0;
    for (size_t i = 0; i < b->cfg.nnodes; i++)
        total += replies[i].nmatches;
    merged_t *all = sp_calloc(total ? total : 1, sizeof *all);
    size_t k = 0;
    for (size_t i = 0; i < b->cfg.nnodes; i++)
        for (size_t j = 0; j < replies[i].nmatches; j++)
            all[k++] = (merged_t){attrs_str(&replies[i].matches[j], attr_unique_key(level)),
                                  &replies[i].matches[j]};
    qsort(all, k, sizeof *all, merged_cmp);
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
    for (size_t i = 0; i < b->cfg.nnodes; i++)
        wire_reply_free(&replies[i]);
    free(replies);
    free(target);
    attrs_clear(&q);
    if (partial)
        *partial = part;
    return rc;
}

/* ---- fetch -------------------------------------------------------------- */

/* Reads one instance from one node. Returns 0 with *out set, or an error. */
static int fetch_from(backend_t *b, size_t node, const uint8_t *head, size_t head_len,
                      const char *sop_uid, uint8_t **out, size_t *len)
{
    transport_response_t resp;
    int rc = transport_call(client_for(b, node), head, head_len, NULL, 0, b->cfg.fetch_timeout_ms,
                            &resp);
    if (rc != 0) {
        mark_down(b, node, rc);
        return rc;
    }
    wire_reply_t rep;
    char err[256];
    rc = wire_decode_reply(resp.head, resp.head_len, &rep, err, sizeof err);
    if (rc != 0) {
        log_warn("node %s: malformed reply to get %s: %s", b->nodes[node].id, sop_uid, err);
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
        log_warn("node %s cannot return %s: %s", b->nodes[node].id, sop_uid,
                 rep.error ? rep.error : sp_strerror(rc));
    }
    wire_reply_free(&rep);
    transport_response_free(&resp);
    return rc;
}

int backend_fetch(backend_t *b, const char *study_uid, const char *sop_uid, unsigned spread,
                  uint8_t **out, size_t *len)
{
    uint32_t partition;
    size_t owners[RING_MAX_REPLICAS];
    size_t n = owners_of(b, study_uid, &partition, owners);
    wire_request_t req = {.kind = WIRE_GET, .sop_uid = (char *)sop_uid};
    uint8_t *head;
    size_t head_len;
    wire_encode_request(&req, &head, &head_len);
    bool all_missing = true;
    int rc = SP_EUNAVAIL;
    /* Replicas believed up first, in placement order; then the others. */
    for (int pass = 0; pass < 2 && rc != 0; pass++) {
        for (size_t k = 0; k < n && rc != 0; k++) {
            size_t node = owners[(k + spread) % n];
            if (is_down(b, node) != (pass == 1))
                continue;
            rc = fetch_from(b, node, head, head_len, sop_uid, out, len);
            all_missing &= rc == SP_ENOTFOUND;
        }
    }
    free(head);
    if (rc != 0)
        rc = all_missing ? SP_ENOTFOUND : SP_EUNAVAIL;
    return rc;
}
