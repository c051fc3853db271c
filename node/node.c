/* node.c - shardpacs-node: a storage node. Loads its configuration and keys,
 * opens the RocksDB store and answers cluster RPCs (put, get, list, find,
 * partition digest/list, stats, gossip) over the CURVE transport, and takes
 * part in cluster membership (membership.c). Each request is checked
 * against its key's role (keys.h) before it runs; refusals and everything
 * an operator's key asks go to the audit trail (audit.h).
 *
 * Threads: the main thread sets up, then waits for SIGINT/SIGTERM; the
 * transport's worker threads run node_handle() concurrently, which is safe
 * because the store and membership are thread-safe and everything else here
 * is read-only after start-up; membership runs one thread of its own. */
#include "../common/admin.h"
#include "../common/audit.h"
#include "../common/base.h"
#include "../common/config.h"
#include "../common/keys.h"
#include "../common/log.h"
#include "../common/transport.h"
#include "../common/wire.h"
#include "../common/membership.h"
#include "../common/notify.h"
#include "repair.h"
#include "store.h"

#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <sys/statvfs.h>
#include <time.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct {
    char *id;
    char *listen;
    char *site;
    char *data_dir;
    char *key_pair;
    char *cluster_keys;
    size_t blob_min_size;
    size_t write_buffer;
    size_t block_cache;
    int background_jobs;
    int max_conflicts;
    size_t reserve;
    int workers;
    size_t max_object_size;
    size_t chunk_size;
    int hwm;
    int max_find_results;
    char *log_level;
    char *log_format;
    int replicas;
    membership_settings_t cluster;
    int repair_interval_ms;
    size_t repair_rate;
    int repair_streams;
    int scrub_interval_ms;
    size_t scrub_rate;
    audit_settings_t audit;
    admin_settings_t admin;
} node_settings_t;

#define OPT(sec, key, type, field, def, lo, hi, help)                                              \
    {                                                                                              \
        sec, key, type, offsetof(node_settings_t, field), def, lo, hi, help, NULL                  \
    }

static const config_option_t node_options[] = {
    OPT("node", "id", CONFIG_STRING, id, "n1", 0, 0, "Name of this node, unique in the cluster"),
    OPT("node", "listen", CONFIG_STRING, listen, "tcp://127.0.0.1:7401", 0, 0,
        "ZeroMQ endpoint for cluster RPCs (tcp://HOST:PORT; PORT * picks a free one)"),
    OPT("node", "site", CONFIG_STRING, site, "default", 0, 0,
        "Failure domain (data centre, building) this node is in"),
    OPT("node", "data_dir", CONFIG_PATH, data_dir, "data", 0, 0,
        "RocksDB database folder (relative to this file)"),
    OPT("keys", "key_pair", CONFIG_PATH, key_pair, "node.key", 0, 0,
        "This node's CURVE key pair file (mode 0600)"),
    OPT("keys", "cluster_keys", CONFIG_PATH, cluster_keys, "cluster.keys", 0, 0,
        "Allow-list of the public keys of every cluster member"),
    OPT("store", "blob_min_size", CONFIG_SIZE, blob_min_size, "2K", 0, 1 << 30,
        "Objects this size or larger go to RocksDB blob files"),
    OPT("store", "write_buffer", CONFIG_SIZE, write_buffer, "64M", 1 << 20, 1LL << 34,
        "RocksDB memtable size per column family"),
    OPT("store", "block_cache", CONFIG_SIZE, block_cache, "128M", 0, 1LL << 40,
        "RocksDB block cache for index records"),
    OPT("store", "background_jobs", CONFIG_INT, background_jobs, "0", 0, 64,
        "RocksDB flush and compaction threads; 0: one per core, at least 2"),
    OPT("store", "max_conflicts", CONFIG_INT, max_conflicts, "4", 0, 1000,
        "Versions of one SOP Instance UID kept aside besides the stored one (different bytes "
        "sent again); a put needing more is refused, answered 0x0111"),
    OPT("store", "reserve", CONFIG_SIZE, reserve, "1G", 0, 1LL << 50,
        "Free space kept on the data folder's file system: below it new objects are refused "
        "(SP_ENOSPACE, the router answers 0xA700 naming this node) while reads, repair and "
        "hand-off go on; 0 = no reserve"),
    OPT("transport", "workers", CONFIG_INT, workers, "8", 1, 256,
        "Threads answering requests; concurrent puts share fsyncs"),
    OPT("transport", "max_object_size", CONFIG_SIZE, max_object_size, "1G", 1024, 1LL << 34,
        "Largest object accepted"),
    OPT("transport", "chunk_size", CONFIG_SIZE, chunk_size, "1M", 4096, 64 << 20,
        "Objects travel in frames of at most this size"),
    OPT("transport", "hwm", CONFIG_INT, hwm, "1000", 10, 1000000,
        "ZeroMQ high-water mark (messages queued per peer)"),
    OPT("query", "max_results", CONFIG_INT, max_find_results, "10000", 1, 10000000,
        "Most matches one find request returns"),
    OPT("log", "level", CONFIG_STRING, log_level, "info", 0, 0, "debug, info, warn or error"),
    OPT("log", "format", CONFIG_STRING, log_format, "text", 0, 0,
        "text (one timestamped line per event) or json (one JSON object per line: ts, level, "
        "component, msg; for log shippers)"),
    OPT("cluster", "replicas", CONFIG_INT, replicas, "3", 1, 16,
        "Copies of every study (N); the same value on every node and router"),
    MEMBERSHIP_OPTIONS(node_settings_t, cluster, "1"),
    OPT("repair", "interval", CONFIG_MS, repair_interval_ms, "30s", 100, 86400000,
        "Anti-entropy round period (a round also starts when membership changes)"),
    OPT("repair", "rate", CONFIG_SIZE, repair_rate, "50M", 0, 1LL << 40,
        "Re-replication, hand-off and repair copies: bytes per second in total (0 = unlimited)"),
    OPT("repair", "streams", CONFIG_INT, repair_streams, "2", 1, 64,
        "Partitions copied in parallel"),
    OPT("repair", "scrub_interval", CONFIG_MS, scrub_interval_ms, "24h", 100, 2000000000,
        "Pause between two scrubber passes over every stored object"),
    OPT("repair", "scrub_rate", CONFIG_SIZE, scrub_rate, "20M", 0, 1LL << 40,
        "Scrubber reads: bytes per second (0 = unlimited)"),
    AUDIT_OPTIONS(node_settings_t, audit),
    ADMIN_OPTIONS(node_settings_t, admin),
};

typedef struct {
    const node_settings_t *settings;
    store_t *store;
    int64_t started_ms;
    size_t page_bytes;                  /* byte budget of a LIST / PARTITION_LIST page (wire.h) */
    _Atomic(membership_t *) membership; /* set once serving; NULL before */
    _Atomic(repair_t *) repair;         /* likewise */
    atomic_bool refusing;               /* free space below [store] reserve at the last put */
} node_t;

/* Whether new objects must be refused: the data folder's file system has
 * less free space than [store] reserve. Repair copies do not come here
 * (they call store_put directly), so a full node still receives what it
 * must hold and hands off what it stood in for. Logs each change of state
 * once. avail gets the free bytes (0 when statvfs fails: then the put is
 * tried, and RocksDB reports a real disk-full). */
static bool below_reserve(node_t *node, uint64_t *avail)
{
    struct statvfs vfs;
    *avail = 0;
    if (node->settings->reserve == 0 || statvfs(node->settings->data_dir, &vfs) != 0)
        return false;
    *avail = (uint64_t)vfs.f_bavail * vfs.f_frsize;
    bool below = *avail < node->settings->reserve;
    if (atomic_exchange(&node->refusing, below) != below) {
        if (below)
            log_warn("free space %llu MiB on %s is below the reserve of %zu MiB: refusing new "
                     "objects (reads and repair go on)",
                     (unsigned long long)(*avail >> 20), node->settings->data_dir,
                     node->settings->reserve >> 20);
        else
            log_info("free space %llu MiB on %s is above the reserve again: accepting new objects",
                     (unsigned long long)(*avail >> 20), node->settings->data_dir);
    }
    return below;
}

/* repair_config_t.disk_state: the reserve check, for the status. */
static bool disk_state(void *ctx, uint64_t *free_bytes)
{
    return below_reserve(ctx, free_bytes);
}

static void handle_put(node_t *node, const transport_request_t *req, const wire_request_t *w,
                       wire_reply_t *rep)
{
    uint64_t avail;
    if (below_reserve(node, &avail)) {
        char text[320];
        wire_reply_error(rep, SP_ENOSPACE,
                         sp_fmt(text, sizeof text,
                                "node %s refuses new objects: %llu MiB free on its data disk, "
                                "below its [store] reserve of %zu MiB",
                                node->settings->id, (unsigned long long)(avail >> 20),
                                node->settings->reserve >> 20));
        return;
    }
    store_put_t put = {
        .partition = w->partition, .attrs = &w->attrs, .data = req->body, .len = req->body_len};
    memcpy(put.digest, w->digest, SP_DIGEST_LEN);
    put.version = w->version;
    put.policy = (store_policy_t)w->policy; /* the same numbers */
    store_outcome_t outcome;
    int rc = store_put(node->store, &put, &outcome);
    if (rc != 0) {
        char text[320];
        wire_reply_error(rep, rc,
                         sp_fmt(text, sizeof text,
                                "put of SOP %s of study %s (partition %u) from %s failed: %s",
                                attrs_str(&w->attrs, ATTR_SOP_INSTANCE_UID),
                                attrs_str(&w->attrs, ATTR_STUDY_INSTANCE_UID),
                                (unsigned)w->partition, req->peer_name, sp_strerror(rc)));
        /* The store logged a database failure with RocksDB's message
         * already; a refused instance is logged here, naming the sender. */
        if (rc != SP_EDB && rc != SP_ENOSPACE)
            log_warn("%s", text);
        return;
    }
    rep->outcome = (wire_outcome_t)outcome;
}

/* transport_reply_t.body_free for a body the store allocated. */
static void body_free_store(void *body, void *hint)
{
    (void)hint;
    store_buffer_free(body);
}

/* GET answers the stored object; METADATA the instance's metadata without
 * its pixels (store_metadata), in the same reply shape. */
static void handle_get(node_t *node, const wire_request_t *w, wire_reply_t *rep,
                       transport_reply_t *out)
{
    store_object_t obj;
    int rc = w->kind == WIRE_METADATA ? store_metadata(node->store, w->sop_uid, &obj)
                                      : store_get(node->store, w->sop_uid, &obj);
    repair_t *h = atomic_load(&node->repair);
    if (rc == SP_EDIGEST && h != NULL)
        repair_note_corrupt(h, w->sop_uid); /* repaired from a replica soon */
    if (rc != 0) {
        char text[256];
        wire_reply_error(rep, rc,
                         sp_fmt(text, sizeof text, "%s %s: %s", wire_kind_name(w->kind), w->sop_uid,
                                sp_strerror(rc)));
        return;
    }
    rep->partition = obj.partition;
    attrs_copy(&rep->attrs, &obj.attrs);
    memcpy(rep->digest, obj.digest, SP_DIGEST_LEN);
    rep->version = obj.version;
    rep->policy = (wire_policy_t)obj.policy;
    out->body = obj.data; /* handed to the transport, which frees it with the store's free */
    out->body_len = obj.len;
    out->body_free = body_free_store;
    obj.data = NULL;
    store_object_free(&obj);
}

/* Most instances one LIST or PARTITION_LIST page holds, whatever the request
 * asks: with the byte budget it bounds the work and memory of one request. */
#define PAGE_MAX 10000

/* A page being filled: the reply and the bytes its instances take encoded. */
typedef struct {
    wire_reply_t *rep;
    size_t bytes;
    size_t budget;
} page_t;

/* Copies one index entry into a reply (store_list and partition_list
 * callback); asks to stop once the page holds its byte budget, so the
 * cursor resumes right after this entry. */
static int add_entry(void *ctx, const store_entry_t *e)
{
    page_t *pg = ctx;
    wire_instance_t *w = wire_reply_add_instance(pg->rep);
    w->partition = e->partition;
    w->study_uid = sp_strdup(e->study_uid);
    w->series_uid = sp_strdup(e->series_uid);
    w->sop_uid = sp_strdup(e->sop_uid);
    w->sop_class_uid = sp_strdup(e->sop_class_uid ? e->sop_class_uid : "");
    w->transfer_syntax_uid = sp_strdup(e->transfer_syntax_uid ? e->transfer_syntax_uid : "");
    w->size = e->size;
    memcpy(w->digest, e->digest, SP_DIGEST_LEN);
    w->version = e->version;
    w->policy = (wire_policy_t)e->policy;
    pg->bytes += wire_instance_size(w);
    return pg->bytes >= pg->budget ? 1 : 0;
}

/* A page of a study's or series' instances (LIST). */
static void handle_list(node_t *node, const wire_request_t *w, wire_reply_t *rep)
{
    size_t limit = w->limit == 0 || w->limit > PAGE_MAX ? PAGE_MAX : w->limit;
    page_t pg = {.rep = rep, .budget = node->page_bytes};
    int rc = store_list(node->store, w->study_uid, w->series_uid, w->cursor, limit, add_entry, &pg,
                        &rep->next_cursor);
    if (rc != 0)
        wire_reply_error(rep, rc, sp_strerror(rc));
}

/* Most metadata bytes one METADATA_LIST page carries in its body: enough
 * for a few hundred CT headers, small next to a page of objects. */
#define META_PAGE_BODY (4u << 20)

/* A METADATA_LIST page being filled: the instances as a LIST page, and
 * their metadata, one after the other, for the reply body. */
typedef struct {
    page_t pg;
    node_t *node;
    uint8_t *body;
    size_t len, cap;
} meta_page_t;

/* store_list callback: adds one instance and its metadata (store_metadata,
 * no pixels read); stops at the page's head or body budget. An instance
 * deleted since it was listed is left out; another failure ends the page
 * with an error, and the router reads those instances one by one. */
static int add_metadata(void *ctx, const store_entry_t *e)
{
    meta_page_t *mp = ctx;
    store_object_t m;
    int rc = store_metadata(mp->node->store, e->sop_uid, &m);
    if (rc == SP_ENOTFOUND)
        return 0;
    if (rc != 0) {
        repair_t *h = atomic_load(&mp->node->repair);
        if (rc == SP_EDIGEST && h != NULL)
            repair_note_corrupt(h, e->sop_uid);
        return rc;
    }
    int stop = add_entry(&mp->pg, e);
    mp->pg.rep->instances[mp->pg.rep->ninstances - 1].metadata_size = m.len;
    if (mp->len + m.len > mp->cap) {
        mp->cap = 2 * (mp->len + m.len);
        mp->body = sp_realloc(mp->body, mp->cap);
    }
    memcpy(mp->body + mp->len, m.data, m.len);
    mp->len += m.len;
    store_object_free(&m);
    return stop || mp->len >= META_PAGE_BODY ? 1 : 0;
}

/* A page of a study's or series' instance metadata (METADATA_LIST). */
static void handle_metadata_list(node_t *node, const wire_request_t *w, wire_reply_t *rep,
                                 transport_reply_t *out)
{
    size_t limit = w->limit == 0 || w->limit > PAGE_MAX ? PAGE_MAX : w->limit;
    meta_page_t mp = {.pg = {.rep = rep, .budget = node->page_bytes}, .node = node};
    int rc = store_list(node->store, w->study_uid, w->series_uid, w->cursor, limit, add_metadata,
                        &mp, &rep->next_cursor);
    if (rc != 0) {
        free(mp.body);
        wire_reply_error(rep, rc, sp_strerror(rc));
        return;
    }
    out->body = mp.body; /* freed by the transport with free() */
    out->body_len = mp.len;
}

static int add_match(void *ctx, const attrs_t *result)
{
    attrs_copy(wire_reply_add_match(ctx), result);
    return 0;
}

static void handle_find(node_t *node, const wire_request_t *w, wire_reply_t *rep)
{
    size_t cap = (size_t)node->settings->max_find_results;
    store_query_t q = {.level = w->level,
                       .keys = &w->attrs,
                       .match_flags = w->case_insensitive_names ? MATCH_PN_CASE_INSENSITIVE : 0,
                       .limit = w->limit && w->limit < cap ? w->limit : cap};
    int rc = store_find(node->store, &q, add_match, rep);
    if (rc == SP_ELIMIT)
        rep->truncated = true;
    else if (rc != 0)
        wire_reply_error(rep, rc, sp_strerror(rc));
}

static int add_summary(void *ctx, const store_partition_summary_t *p)
{
    wire_reply_t *rep = ctx;
    if (rep->ndigests % 256 == 0)
        rep->digests = sp_realloc(rep->digests, (rep->ndigests + 256) * sizeof *rep->digests);
    wire_partition_digest_t *d = &rep->digests[rep->ndigests++];
    d->partition = p->partition;
    d->count = p->count;
    d->bytes = p->bytes;
    memcpy(d->digest, p->digest, SP_DIGEST_LEN);
    return 0;
}

static void handle_partition_digest(node_t *node, const wire_request_t *w, wire_reply_t *rep)
{
    if (w->nonempty) {
        int rc = store_partition_summaries(node->store, add_summary, rep);
        if (rc != 0)
            wire_reply_error(rep, rc, sp_strerror(rc));
        return;
    }
    rep->digests = sp_calloc(w->npartitions, sizeof *rep->digests);
    rep->ndigests = w->npartitions;
    for (size_t i = 0; i < w->npartitions; i++) {
        wire_partition_digest_t *d = &rep->digests[i];
        d->partition = w->partitions[i];
        int rc = store_partition_digest(node->store, d->partition, d->digest, &d->count, &d->bytes);
        if (rc != 0) {
            wire_reply_error(rep, rc, sp_strerror(rc));
            return;
        }
    }
}

static void handle_status(node_t *node, const wire_request_t *w, wire_reply_t *rep)
{
    repair_t *h = atomic_load(&node->repair);
    membership_t *m = atomic_load(&node->membership);
    if (h == NULL || m == NULL) {
        wire_reply_error(rep, SP_EUNAVAIL, "starting up");
        return;
    }
    if (w->cluster) {
        int rc = repair_cluster_status(h, &rep->status_body);
        if (rc != 0)
            wire_reply_error(rep, rc, sp_strerror(rc));
        return;
    }
    rep->status_body.from_id = sp_strdup(node->settings->id);
    rep->status_body.replicas = (uint32_t)node->settings->replicas;
    rep->status_body.view_version = membership_view_version(m);
    repair_member_status(h, wire_reply_add_member(rep));
}

static void handle_drain(node_t *node, const wire_request_t *w, wire_reply_t *rep)
{
    repair_t *h = atomic_load(&node->repair);
    char why[256];
    int rc = h ? repair_drain(h, w->node_id, why, sizeof why) : SP_EUNAVAIL;
    if (rc != 0) {
        wire_reply_error(rep, rc, h ? why : "starting up");
        log_warn("drain request from %s: %s", node->settings->id, h ? why : "starting up");
    }
}

static void handle_partition_list(node_t *node, const wire_request_t *w, wire_reply_t *rep)
{
    size_t limit = w->limit == 0 || w->limit > PAGE_MAX ? PAGE_MAX : w->limit;
    page_t pg = {.rep = rep, .budget = node->page_bytes};
    int rc = store_partition_list(node->store, w->partition, w->cursor, limit, add_entry, &pg,
                                  &rep->next_cursor);
    if (rc != 0)
        wire_reply_error(rep, rc, sp_strerror(rc));
}

static void handle_stats(node_t *node, wire_reply_t *rep)
{
    store_stats_t st;
    int rc = store_stats(node->store, &st);
    if (rc != 0) {
        wire_reply_error(rep, rc, sp_strerror(rc));
        return;
    }
    rep->stats = (wire_stats_t){.node_id = sp_strdup(node->settings->id),
                                .instances = st.instances,
                                .bytes = st.bytes,
                                .studies = st.studies,
                                .conflicts = st.conflicts,
                                .conflicts_refused = st.conflicts_refused,
                                .corrupt_reads = st.corrupt_reads,
                                .db_size_bytes = st.db_size_bytes,
                                .object_bytes_read = st.object_bytes_read,
                                .metadata_rebuilt = st.metadata_rebuilt,
                                .uptime_ms = (uint64_t)(sp_now_ms() - node->started_ms)};
}

/* Which role may send which request (README "Access control and audit"):
 * routers store, read, list and find; nodes repair (partition digests and
 * lists, reads) and ask each other's member status for a cluster status;
 * operators run status, drain, stats and the per-node object commands. A
 * key without a role word (member) has a node's and a router's rights,
 * never an operator's. Gossip is for members only. */
static bool role_allows(keys_role_t role, const wire_request_t *w)
{
    bool admin = role == KEYS_ROLE_ADMIN;
    bool node = role == KEYS_ROLE_NODE || role == KEYS_ROLE_MEMBER;
    bool router = role == KEYS_ROLE_ROUTER || role == KEYS_ROLE_MEMBER;
    switch (w->kind) {
    case WIRE_GOSSIP: return node || router;
    case WIRE_PUT:
    case WIRE_LIST:
    case WIRE_METADATA_LIST:
    case WIRE_FIND: return router || admin;
    case WIRE_GET:
    case WIRE_METADATA: return true;
    case WIRE_PARTITION_DIGEST:
    case WIRE_PARTITION_LIST: return node || admin;
    case WIRE_STATUS: return admin || (node && !w->cluster);
    case WIRE_STATS:
    case WIRE_DRAIN: return admin;
    default: return true; /* answered as unknown */
    }
}

/* One audit record for a request: refused ones (any role) and whatever an
 * operator's key ran. Members' own traffic (puts, repair, gossip) is not
 * recorded here: the router records the DICOM operation behind it. */
static void audit_request(const transport_request_t *req, const wire_request_t *w,
                          const wire_reply_t *rep, bool refused)
{
    if (!refused && req->peer_role != KEYS_ROLE_ADMIN)
        return;
    audit_record_t r = AUDIT_RECORD_INIT(AUDIT_INSTANCES_ACCESSED);
    char detail[160] = "";
    switch (w->kind) {
    case WIRE_STATUS:
    case WIRE_STATS: r.event = AUDIT_RESTRICTED; break;
    case WIRE_DRAIN:
        r.event = AUDIT_NETWORK_CONFIG;
        sp_fmt(detail, sizeof detail, "drain %s", w->node_id ? w->node_id : "");
        break;
    case WIRE_PUT:
        r.action = 'C';
        r.patient_id = attrs_get(&w->attrs, ATTR_PATIENT_ID);
        r.study = attrs_get(&w->attrs, ATTR_STUDY_INSTANCE_UID);
        r.sop_uid = attrs_get(&w->attrs, ATTR_SOP_INSTANCE_UID);
        r.instances = 1;
        break;
    case WIRE_GET:
    case WIRE_METADATA:
        r.sop_uid = w->sop_uid;
        r.instances = 1;
        break;
    case WIRE_LIST:
    case WIRE_METADATA_LIST: r.study = w->study_uid; break;
    case WIRE_FIND: r.study = attrs_get(&w->attrs, ATTR_STUDY_INSTANCE_UID); break;
    case WIRE_GOSSIP: r.event = AUDIT_RESTRICTED; break;
    default: break;
    }
    if (refused) {
        r.event = AUDIT_RESTRICTED;
        r.action = 0;
        r.outcome = AUDIT_MINOR_FAILURE;
        sp_fmt(detail, sizeof detail, "refused: role %s may not send %s",
               keys_role_name(req->peer_role), wire_kind_name(w->kind));
    } else if (rep->status != 0) {
        r.outcome = AUDIT_SERIOUS_FAILURE;
    }
    r.operation = wire_kind_name(w->kind);
    r.user = req->peer_name;
    r.role = keys_role_name(req->peer_role);
    r.address = req->peer_addr;
    r.detail = detail[0] ? detail : NULL;
    audit_record(&r, false);
}

/* ---- metrics (admin.h) ---------------------------------------------------- */

#define KIND_COUNT (WIRE_DRAIN + 1)

/* The series node_dispatch updates, registered by metrics_register()
 * before the transport starts, so the hot path only adds. */
static struct {
    admin_counter_t *requests[KIND_COUNT][2]; /* [kind][failed] */
    admin_hist_t *seconds[KIND_COUNT];
    admin_counter_t *bytes_in, *bytes_out;
} node_metrics;

static void metrics_register(void)
{
    for (int k = WIRE_PUT; k < KIND_COUNT; k++) {
        char labels[96];
        const char *name = wire_kind_name((wire_kind_t)k);
        for (int f = 0; f < 2; f++)
            node_metrics.requests[k][f] = admin_counter(
                "shardpacs_node_requests_total", "Cluster requests answered, by kind and result",
                sp_fmt(labels, sizeof labels, "kind=\"%s\",result=\"%s\"", name,
                       f ? "error" : "ok"));
        node_metrics.seconds[k] =
            admin_histogram("shardpacs_node_request_duration_seconds",
                            "Time to answer one cluster request (a put includes its synced write)",
                            sp_fmt(labels, sizeof labels, "kind=\"%s\"", name));
    }
    node_metrics.bytes_in = admin_counter("shardpacs_node_received_bytes_total",
                                          "Request body bytes received (objects put)", "");
    node_metrics.bytes_out = admin_counter("shardpacs_node_sent_bytes_total",
                                           "Reply body bytes sent (objects read, lists)", "");
}

static int64_t mono_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* Disk space of the data folder and RocksDB's own figures, read at each
 * scrape (a statvfs and a few property reads). */
static void node_collect(void *ctx, admin_out_t *o)
{
    node_t *node = ctx;
    struct statvfs vfs;
    if (statvfs(node->settings->data_dir, &vfs) == 0) {
        double size = (double)vfs.f_blocks * (double)vfs.f_frsize;
        double avail = (double)vfs.f_bavail * (double)vfs.f_frsize;
        double used = size - (double)vfs.f_bfree * (double)vfs.f_frsize;
        admin_out_family(o, "shardpacs_disk_size_bytes", "Size of the data folder's file system",
                         "gauge");
        admin_out_sample(o, "shardpacs_disk_size_bytes", "", size);
        admin_out_family(o, "shardpacs_disk_used_bytes", "Used space of that file system", "gauge");
        admin_out_sample(o, "shardpacs_disk_used_bytes", "", used);
        admin_out_family(o, "shardpacs_disk_free_bytes",
                         "Space of that file system available to this process", "gauge");
        admin_out_sample(o, "shardpacs_disk_free_bytes", "", avail);
    }
    store_stats_t st;
    if (store_stats(node->store, &st) == 0) {
        admin_out_family(o, "shardpacs_store_instances", "Instances stored on this node", "gauge");
        admin_out_sample(o, "shardpacs_store_instances", "", (double)st.instances);
        admin_out_family(o, "shardpacs_store_object_bytes", "Bytes of the stored objects", "gauge");
        admin_out_sample(o, "shardpacs_store_object_bytes", "", (double)st.bytes);
        admin_out_family(o, "shardpacs_store_db_bytes", "RocksDB SST and blob files on disk",
                         "gauge");
        admin_out_sample(o, "shardpacs_store_db_bytes", "", (double)st.db_size_bytes);
        admin_out_family(o, "shardpacs_store_corrupt_reads_total",
                         "Corrupt objects seen by reads, scrubs and repairs", "counter");
        admin_out_sample(o, "shardpacs_store_corrupt_reads_total", "", (double)st.corrupt_reads);
        admin_out_family(o, "shardpacs_store_blob_garbage_bytes",
                         "Deleted object bytes still in blob files (as far as compaction counted)",
                         "gauge");
        admin_out_sample(o, "shardpacs_store_blob_garbage_bytes", "",
                         (double)st.blob_garbage_bytes);
        admin_out_family(o, "shardpacs_store_blob_gc",
                         "1 while blob garbage collection runs (after deletes), else 0", "gauge");
        admin_out_sample(o, "shardpacs_store_blob_gc", "", st.blob_gc ? 1.0 : 0.0);
    }
    admin_out_family(o, "shardpacs_disk_reserve_bytes",
                     "[store] reserve: free space below which new objects are refused", "gauge");
    admin_out_sample(o, "shardpacs_disk_reserve_bytes", "", (double)node->settings->reserve);
    uint64_t avail;
    admin_out_family(o, "shardpacs_node_refusing_puts",
                     "1 while free space is below the reserve and new objects are refused",
                     "gauge");
    admin_out_sample(o, "shardpacs_node_refusing_puts", "", below_reserve(node, &avail) ? 1 : 0);
    admin_out_family(o, "shardpacs_rocksdb_pending_compaction_bytes",
                     "RocksDB's estimate of bytes compaction still has to rewrite", "gauge");
    admin_out_sample(
        o, "shardpacs_rocksdb_pending_compaction_bytes", "",
        (double)store_property_sum(node->store, "rocksdb.estimate-pending-compaction-bytes"));
    admin_out_family(o, "shardpacs_rocksdb_write_stopped",
                     "1 while RocksDB stops writes (a write stall), else 0", "gauge");
    admin_out_sample(o, "shardpacs_rocksdb_write_stopped", "",
                     store_property_sum(node->store, "rocksdb.is-write-stopped") > 0 ? 1.0 : 0.0);
    admin_out_family(o, "shardpacs_rocksdb_delayed_write_rate_bytes",
                     "Write rate RocksDB slows writers to while stalling (0 = not delayed)",
                     "gauge");
    admin_out_sample(o, "shardpacs_rocksdb_delayed_write_rate_bytes", "",
                     (double)store_property_sum(node->store, "rocksdb.actual-delayed-write-rate"));
    admin_out_family(o, "shardpacs_rocksdb_running_compactions", "Compactions running now",
                     "gauge");
    admin_out_sample(o, "shardpacs_rocksdb_running_compactions", "",
                     (double)store_property_sum(node->store, "rocksdb.num-running-compactions"));
}

/* /readyz: ready once the node has joined (announced alive after its first
 * complete repair round) and while it is not draining. */
static bool node_ready(void *ctx, char *why, size_t whylen)
{
    node_t *node = ctx;
    membership_t *m = atomic_load(&node->membership);
    if (m == NULL || atomic_load(&node->repair) == NULL) {
        sp_fmt(why, whylen, "not ready: starting up");
        return false;
    }
    gossip_state_t st = membership_self_state(m);
    if (st == GOSSIP_ALIVE)
        return true;
    sp_fmt(why, whylen, "not ready: this node is %s", gossip_state_name(st));
    return false;
}

/* Runs one valid request (wire_serve decoded it) on a worker thread. */
static void node_dispatch(void *ctx, const transport_request_t *req, const wire_request_t *w,
                          wire_reply_t *rep, transport_reply_t *out)
{
    node_t *node = ctx;
    if (!role_allows(req->peer_role, w)) {
        char text[256];
        wire_reply_error(
            rep, SP_EDENIED,
            sp_fmt(text, sizeof text, "%s refused: key '%s' has role %s, which may not send it",
                   wire_kind_name(w->kind), req->peer_name, keys_role_name(req->peer_role)));
        log_warn("%s request from %s (%s) refused: key role %s", wire_kind_name(w->kind),
                 req->peer_name, req->peer_addr ? req->peer_addr : "?",
                 keys_role_name(req->peer_role));
        audit_request(req, w, rep, true);
        return;
    }
    int64_t start = mono_us();
    switch (w->kind) {
    case WIRE_PUT: handle_put(node, req, w, rep); break;
    case WIRE_GET: handle_get(node, w, rep, out); break;
    case WIRE_METADATA: handle_get(node, w, rep, out); break;
    case WIRE_METADATA_LIST: handle_metadata_list(node, w, rep, out); break;
    case WIRE_LIST: handle_list(node, w, rep); break;
    case WIRE_FIND: handle_find(node, w, rep); break;
    case WIRE_PARTITION_DIGEST: handle_partition_digest(node, w, rep); break;
    case WIRE_PARTITION_LIST: handle_partition_list(node, w, rep); break;
    case WIRE_STATS: handle_stats(node, rep); break;
    case WIRE_STATUS: handle_status(node, w, rep); break;
    case WIRE_DRAIN: handle_drain(node, w, rep); break;
    case WIRE_GOSSIP: membership_handle(atomic_load(&node->membership), req, w, rep); break;
    default: wire_reply_error(rep, SP_EUNKNOWN, "unknown request"); break;
    }
    if (w->kind > WIRE_NONE && w->kind < KIND_COUNT) {
        admin_add(node_metrics.requests[w->kind][rep->status != 0], 1);
        admin_observe(node_metrics.seconds[w->kind], (double)(mono_us() - start) / 1e6);
    }
    audit_request(req, w, rep, false);
}

static void node_handle(void *ctx, const transport_request_t *req, transport_reply_t *out)
{
    admin_add(node_metrics.bytes_in, req->body_len);
    wire_serve(req, out, node_dispatch, ctx);
    admin_add(node_metrics.bytes_out, out->body_len);
}

static void usage(FILE *f)
{
    fprintf(f, "usage: shardpacs-node --config FILE [--ready-file FILE]\n"
               "       shardpacs-node --help-config   (print every option with its default)\n");
}

/* Writes the bound endpoint once the node answers, so scripts and tests that
 * asked for a free port (tcp://127.0.0.1:*) learn which one it got. */
static int write_ready_file(const char *path, const char *endpoint)
{
    char tmp[4096];
    sp_fmt(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (f == NULL)
        return -errno;
    fprintf(f, "%s\n", endpoint);
    if (fclose(f) != 0 || rename(tmp, path) != 0)
        return -errno;
    return 0;
}

/* Loads keys, opens the store and serves until a signal arrives. */
static int node_run(const node_settings_t *s, const char *ready_file)
{
    char err[512];
    keys_pair_t self;
    keys_allowlist_t *allowed = NULL;
    transport_server_t *srv = NULL;
    membership_t *m = NULL;
    repair_t *h = NULL;
    /* Half the frame limit: a page may pass its budget by one entry, and the
     * rest of the reply is small. */
    size_t frame = s->chunk_size + 65536;
    node_t node = {.settings = s,
                   .started_ms = sp_now_ms(),
                   .page_bytes = frame / 2 < WIRE_PAGE_BYTES ? frame / 2 : WIRE_PAGE_BYTES};
    atomic_init(&node.membership, NULL);
    atomic_init(&node.repair, NULL);
    atomic_init(&node.refusing, false);
    int rc = audit_start_settings(&s->audit, s->id, err, sizeof err);
    if (rc != 0) {
        log_error("%s", err);
        return rc;
    }
    audit_record_t started = AUDIT_RECORD_INIT(AUDIT_APPLICATION_START);
    started.operation = "shardpacs-node";
    audit_record(&started, false);
    rc = keys_load_pair(s->key_pair, &self, err, sizeof err);
    if (rc != 0) {
        log_error("%s", err);
        goto out;
    }
    allowed = keys_allowlist_load(s->cluster_keys, err, sizeof err);
    if (allowed == NULL) {
        log_error("%s", err);
        rc = SP_EKEY;
        goto out;
    }
    store_config_t sc;
    store_config_defaults(&sc);
    sc.path = s->data_dir;
    sc.blob_min_bytes = s->blob_min_size;
    sc.write_buffer_bytes = s->write_buffer;
    sc.block_cache_bytes = s->block_cache;
    sc.background_jobs = s->background_jobs;
    sc.max_conflicts = s->max_conflicts;
    rc = store_open(&sc, &node.store, err, sizeof err);
    if (rc != 0) {
        log_error("cannot open store %s: %s", s->data_dir, err);
        goto out;
    }
    transport_config_t tc;
    transport_config_defaults(&tc);
    tc.workers = s->workers;
    tc.chunk_bytes = s->chunk_size;
    tc.max_frame_bytes = s->chunk_size + 65536;
    tc.max_body_bytes = s->max_object_size;
    tc.sndhwm = tc.rcvhwm = s->hwm;
    metrics_register();
    srv = transport_server_new(&tc, &self, allowed, node_handle, &node);
    char bound[256];
    rc = transport_server_start(srv, s->listen, bound, sizeof bound);
    if (rc != 0) {
        log_error("cannot listen on %s: %s", s->listen, sp_strerror(rc));
        goto out;
    }
    log_info("node %s (site %s) serving on %s, data in %s, %zu cluster keys", s->id, s->site, bound,
             s->data_dir, keys_allowlist_count(allowed));
    membership_self_t me = {.id = s->id,
                            .endpoint = bound,
                            .site = s->site,
                            .role = GOSSIP_STORAGE,
                            .initial_state = GOSSIP_JOINING};
    rc = membership_start_settings(&s->cluster, &me, &self, allowed, &m);
    if (rc != 0)
        goto out;
    atomic_store(&node.membership, m);
    repair_config_t hc = {.self_id = s->id,
                          .replicas = s->replicas,
                          .interval_ms = s->repair_interval_ms,
                          .rate_bytes = s->repair_rate,
                          .streams = s->repair_streams,
                          .scrub_interval_ms = s->scrub_interval_ms,
                          .scrub_rate_bytes = s->scrub_rate,
                          .call_timeout_ms = 10000,
                          .expect_peers = s->cluster.seeds[0] != '\0',
                          .disk_state = disk_state,
                          .disk_ctx = &node};
    transport_config_defaults(&hc.transport);
    hc.transport.chunk_bytes = s->chunk_size;
    hc.transport.max_frame_bytes = s->chunk_size + 65536;
    hc.transport.max_body_bytes = s->max_object_size;
    hc.transport.retries = 0;
    h = repair_start(&hc, node.store, m, &self, allowed);
    if (h == NULL) {
        rc = SP_EUNKNOWN;
        goto out;
    }
    atomic_store(&node.repair, h);
    admin_add_collector(membership_collect, m);
    admin_add_collector(repair_collect, h);
    admin_add_collector(node_collect, &node);
    rc = admin_start(s->admin.listen, "node", node_ready, &node, err, sizeof err);
    if (rc != 0) {
        log_error("%s", err);
        goto out;
    }
    if (ready_file && (rc = write_ready_file(ready_file, bound)) != 0) {
        log_error("cannot write %s: %s", ready_file, sp_strerror(rc));
        goto out;
    }
    /* Type=notify units: systemctl start returns now that requests are
     * answered (the node may still be joining: /readyz says when it is). */
    notify_send("READY=1\nSTATUS=serving");

    int sig = sp_signals_wait();
    log_info("signal %d: shutting down", sig);
    notify_send("STOPPING=1");
out:
    admin_stop();                   /* its collectors read the store, repair and membership */
    transport_server_destroy(&srv); /* no handler uses membership after this */
    repair_stop(&h);
    membership_stop(&m);
    store_close(&node.store);
    keys_allowlist_destroy(&allowed);
    audit_record_t stopped = AUDIT_RECORD_INIT(AUDIT_APPLICATION_STOP);
    stopped.operation = "shardpacs-node";
    stopped.outcome = rc == 0 ? AUDIT_SUCCESS : AUDIT_SERIOUS_FAILURE;
    audit_record(&stopped, false);
    audit_stop();
    return rc;
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {{"config", required_argument, NULL, 'c'},
                                             {"ready-file", required_argument, NULL, 'r'},
                                             {"help-config", no_argument, NULL, 'H'},
                                             {"help", no_argument, NULL, 'h'},
                                             {NULL, 0, NULL, 0}};
    const char *config_path = NULL, *ready_file = NULL;
    int opt;
    while ((opt = getopt_long(argc, argv, "c:r:h", longopts, NULL)) != -1) {
        switch (opt) {
        case 'c': config_path = optarg; break;
        case 'r': ready_file = optarg; break;
        case 'H':
            config_print_reference(stdout, node_options, SP_ARRAY_LEN(node_options));
            return 0;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (config_path == NULL || optind != argc) {
        usage(stderr);
        return 2;
    }
    sp_signals_block(); /* before any thread starts */
    /* No sp_malloc_tune() here, unlike the router: a node's heap also holds
     * RocksDB's block cache and memtables, and with glibc's dynamic mmap
     * threshold fixed the free lists fragmented as the archive grew
     * (_int_malloc per put doubled from 100,000 to 400,000 instances in
     * tests/bench/growth.py). glibc's own dynamic threshold still keeps
     * repeated object-sized buffers in the heap after the first one. */

    node_settings_t s;
    memset(&s, 0, sizeof s);
    char err[512];
    int rc =
        config_load(config_path, node_options, SP_ARRAY_LEN(node_options), &s, err, sizeof err);
    log_level_t level = LOG_INFO;
    if (rc == 0 && log_parse_level(s.log_level, &level) != 0) {
        sp_fmt(err, sizeof err, "%s: [log] level '%s' is not debug, info, warn or error",
               config_path, s.log_level);
        rc = SP_ECONFIG;
    }
    log_format_t format = LOG_FORMAT_TEXT;
    if (rc == 0 && log_parse_format(s.log_format, &format) != 0) {
        sp_fmt(err, sizeof err, "%s: [log] format '%s' is not text or json", config_path,
               s.log_format);
        rc = SP_ECONFIG;
    }
    if (rc != 0) {
        fprintf(stderr, "shardpacs-node: %s\n", err);
        config_free(node_options, SP_ARRAY_LEN(node_options), &s);
        return 1;
    }
    char component[96];
    log_set_format(format);
    log_init(sp_fmt(component, sizeof component, "node[%s]", s.id), level);
    rc = node_run(&s, ready_file);
    config_free(node_options, SP_ARRAY_LEN(node_options), &s);
    return rc == 0 ? 0 : 1;
}
