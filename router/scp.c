/* scp.c - DICOM service handlers of the router (scp.h): the access rules
 * (access.h), the archive's policy for what it stores, the calls into the
 * cluster (backend.h) and one audit record per operation (audit.h). Each
 * handler logs the failures it returns, once, with the calling AE and the
 * UIDs involved; the adapter does not log them again. */
#include "scp.h"

#include "part10.h"

#include "../common/admin.h"
#include "../common/audit.h"
#include "../common/base.h"
#include "../common/log.h"

#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

uint16_t scp_check_store(const dicom_store_t *req, char *comment, size_t comment_len)
{
    const attrs_t *a = req->attrs;
    const char *sop = attrs_get(a, ATTR_SOP_INSTANCE_UID);
    if (sop == NULL || sop[0] == '\0') {
        sp_fmt(comment, comment_len, "SOPInstanceUID missing in data set");
        return DICOM_CANNOT_UNDERSTAND;
    }
    if (strcmp(sop, req->sop_instance_uid) != 0) {
        sp_fmt(comment, comment_len, "SOPInstanceUID in data set differs from command");
        return DICOM_DATASET_MISMATCH;
    }
    if (attrs_str(a, ATTR_STUDY_INSTANCE_UID)[0] == '\0') {
        sp_fmt(comment, comment_len, "StudyInstanceUID missing");
        return DICOM_CANNOT_UNDERSTAND;
    }
    if (attrs_str(a, ATTR_SERIES_INSTANCE_UID)[0] == '\0') {
        sp_fmt(comment, comment_len, "SeriesInstanceUID missing");
        return DICOM_CANNOT_UNDERSTAND;
    }
    /* A malformed UID is a permanent error (the sender must not loop on a
     * retry-later status): the data set, not the archive, is at fault. */
    static const attr_id_t uids[] = {ATTR_STUDY_INSTANCE_UID, ATTR_SERIES_INSTANCE_UID,
                                     ATTR_SOP_INSTANCE_UID};
    for (size_t i = 0; i < SP_ARRAY_LEN(uids); i++) {
        const char *v = attrs_str(a, uids[i]);
        if (!sp_uid_valid(v)) {
            sp_fmt(comment, comment_len, "%s is not a valid UID: '%.64s'",
                   attr_info(uids[i])->keyword, v);
            return DICOM_CANNOT_UNDERSTAND;
        }
    }
    const char *cls = attrs_get(a, ATTR_SOP_CLASS_UID);
    if (cls != NULL && strcmp(cls, req->sop_class_uid) != 0) {
        sp_fmt(comment, comment_len, "SOPClassUID in data set differs from command");
        return DICOM_DATASET_MISMATCH;
    }
    return DICOM_SUCCESS;
}

/* The access rules see a DICOM peer as its calling AE, address and
 * certificate subject. */
static access_peer_t access_peer(const dicom_peer_t *p)
{
    return (access_peer_t){p->calling_ae, p->peer_host, p->cert_subject};
}

/* A DIMSE status as an audit outcome: refusals, cancels and warnings are
 * minor failures (nothing or part done, on purpose), the rest serious. */
static int outcome_of(uint16_t status)
{
    if (status == DICOM_SUCCESS)
        return AUDIT_SUCCESS;
    if (status == DICOM_NOT_AUTHORIZED || status == DICOM_CANCEL || (status & 0xF000) == 0xB000 ||
        status == DICOM_MOVE_DEST_UNKNOWN)
        return AUDIT_MINOR_FAILURE;
    return AUDIT_SERIOUS_FAILURE;
}

/* An audit record of a DICOM operation with its actor and status filled. */
static audit_record_t dicom_record(audit_event_t event, const char *operation,
                                   const dicom_peer_t *peer, uint16_t status)
{
    audit_record_t r = AUDIT_RECORD_INIT(event);
    r.operation = operation;
    r.outcome = outcome_of(status);
    r.dimse_status = status;
    r.ae_title = peer->calling_ae;
    r.address = peer->peer_host;
    r.subject = peer->cert_subject;
    return r;
}

/* Checks op (and a move's destination) against the rules; on refusal logs
 * it and fills comment. */
static bool allowed(scp_t *scp, const dicom_peer_t *peer, unsigned op, const char *dest,
                    char *comment, size_t comment_len)
{
    char why[256];
    access_peer_t ap = access_peer(peer);
    if (access_check(scp->access, &ap, op, dest, why, sizeof why))
        return true;
    sp_fmt(comment, comment_len, "not authorized: %s", why);
    log_warn("%s from calling AE '%s' (%s%s%s) refused: %s", access_op_name(op), peer->calling_ae,
             peer->peer_host, peer->cert_subject ? ", " : "",
             peer->cert_subject ? peer->cert_subject : "", why);
    return false;
}

bool scp_admit(void *ctx, const dicom_peer_t *peer, char *why, size_t why_len)
{
    scp_t *scp = ctx;
    unsigned line = 0;
    access_peer_t ap = access_peer(peer);
    if (access_ops(scp->access, &ap, &line) != 0)
        return true;
    if (line == 0)
        sp_fmt(why, why_len, "no access rule matches it");
    else
        sp_fmt(why, why_len, "its access rule (line %u) allows nothing", line);
    return false;
}

void scp_associated(void *ctx, const dicom_peer_t *peer, bool accepted, const char *why)
{
    (void)ctx;
    audit_record_t r = dicom_record(AUDIT_ASSOCIATION, "A-ASSOCIATE", peer, DICOM_SUCCESS);
    r.dimse_status = -1;
    r.outcome = accepted ? AUDIT_SUCCESS : AUDIT_MINOR_FAILURE;
    r.called_ae = peer->called_ae;
    r.detail = accepted ? NULL : why;
    audit_record(&r, false);
}

uint16_t scp_echo(void *ctx, const dicom_peer_t *peer)
{
    char comment[256];
    if (!allowed(ctx, peer, ACCESS_ECHO, NULL, comment, sizeof comment))
        return DICOM_NOT_AUTHORIZED;
    return DICOM_SUCCESS;
}

static uint16_t store_checked(scp_t *scp, const dicom_store_t *req, char *comment,
                              size_t comment_len);

uint16_t scp_store(void *ctx, const dicom_store_t *req, char *comment, size_t comment_len)
{
    scp_t *scp = ctx;
    uint16_t status = allowed(scp, req->peer, ACCESS_STORE, NULL, comment, comment_len)
                          ? store_checked(scp, req, comment, comment_len)
                          : DICOM_NOT_AUTHORIZED;
    audit_record_t r = dicom_record(AUDIT_STORE, "C-STORE", req->peer, status);
    r.patient_id = attrs_get(req->attrs, ATTR_PATIENT_ID);
    r.study = attrs_get(req->attrs, ATTR_STUDY_INSTANCE_UID);
    r.sop_uid = req->sop_instance_uid;
    r.instances = status == DICOM_SUCCESS ? 1 : 0;
    r.detail = status == DICOM_SUCCESS ? NULL : comment;
    /* The response waits for the record: a peer told Success can count on
     * its record being in the trail, even if the router is killed now. */
    audit_record(&r, true);
    return status;
}

/* A store the access rules allowed: the archive's policy, then the
 * replicas. */
static uint16_t store_checked(scp_t *scp, const dicom_store_t *req, char *comment,
                              size_t comment_len)
{
    const char *study = attrs_str(req->attrs, ATTR_STUDY_INSTANCE_UID);
    uint16_t status = scp_check_store(req, comment, comment_len);
    if (status != DICOM_SUCCESS) {
        log_warn("C-STORE of %s (study '%s') from %s (%s) refused, status 0x%04X: %s",
                 req->sop_instance_uid, study, req->peer->calling_ae, req->peer->peer_host, status,
                 comment);
        return status;
    }
    /* The received buffer becomes the stored object: its Part-10 header is
     * written into the headroom before the data set, and the cluster
     * transport sends it to every replica without a copy. */
    uint8_t *dataset, *object;
    void (*release)(void *owner, void *unused);
    void *owner;
    dicom_store_take(req, &dataset, &release, &owner);
    int rc = part10_frame_in_place(dataset, req->headroom, req->sop_class_uid,
                                   req->sop_instance_uid, req->transfer_syntax_uid, &object);
    if (rc != 0) {
        release(owner, NULL);
        sp_fmt(comment, comment_len, "cannot build the Part-10 object: %s", sp_strerror(rc));
        log_warn("C-STORE of %s (study %s) from %s refused: %s", req->sop_instance_uid, study,
                 req->peer->calling_ae, comment);
        return DICOM_CANNOT_UNDERSTAND;
    }
    transport_body_t *body = transport_body_new(
        owner, object, (size_t)(dataset - object) + req->dataset_len, release, NULL);
    backend_put_result_t res;
    rc = backend_put(scp->backend, req->attrs, body, &res);
    transport_body_release(&body);
    if (rc == 0) {
        log_debug("stored %s of study %s from %s on %d replicas (%d stand-ins among the "
                  "targets)",
                  req->sop_instance_uid, study, req->peer->calling_ae, res.acknowledged,
                  res.stand_ins);
        if (res.superseded > 0)
            log_warn("duplicate: %s of study %s from %s differs from the stored copy; "
                     "acknowledged by the duplicates policy (both versions kept)",
                     req->sop_instance_uid, study, req->peer->calling_ae);
        return DICOM_SUCCESS;
    }
    if (rc == SP_ECONFLICT) {
        sp_fmt(comment, comment_len, "SOP Instance UID already stored with different content");
        log_warn("conflict: %s of study %s from %s differs from the stored copy (kept aside on "
                 "%d replicas)",
                 req->sop_instance_uid, study, req->peer->calling_ae, res.conflicts);
        return SCP_STATUS_DUPLICATE_SOP;
    }
    if (rc == SP_EINVAL) {
        /* Every replica that answered refused the object itself: a retry
         * would be refused the same way, so the status says "do not". */
        sp_fmt(comment, comment_len, "refused by the replicas: %s", res.detail);
        log_error("store of %s of study %s from %s refused by the replicas (%s)",
                  req->sop_instance_uid, study, req->peer->calling_ae, res.detail);
        return DICOM_CANNOT_UNDERSTAND;
    }
    sp_fmt(comment, comment_len, "stored on %d replicas, %d needed: %s", res.acknowledged,
           res.needed, res.detail);
    log_error("store of %s of study %s from %s failed: %d replicas acknowledged (%s)",
              req->sop_instance_uid, study, req->peer->calling_ae, res.acknowledged, res.detail);
    return DICOM_OUT_OF_RESOURCES;
}

/* A C-FIND being answered: its matches are counted for the audit. */
typedef struct {
    dicom_find_t *q;
    size_t matches;
} find_run_t;

static int emit_match(void *ctx, const attrs_t *match)
{
    find_run_t *run = ctx;
    run->matches++;
    return dicom_find_emit(run->q, match);
}

static uint16_t find_checked(scp_t *scp, dicom_find_t *q, size_t *matches, char *comment,
                             size_t comment_len);

uint16_t scp_find(void *ctx, dicom_find_t *q, char *comment, size_t comment_len)
{
    scp_t *scp = ctx;
    const dicom_peer_t *peer = dicom_find_peer(q);
    size_t matches = 0;
    uint16_t status = allowed(scp, peer, ACCESS_FIND, NULL, comment, comment_len)
                          ? find_checked(scp, q, &matches, comment, comment_len)
                          : DICOM_NOT_AUTHORIZED;
    audit_record_t r = dicom_record(AUDIT_QUERY, "C-FIND", peer, status);
    const attrs_t *keys = dicom_find_keys(q);
    const char *patient = attrs_get(keys, ATTR_PATIENT_ID);
    const char *study = attrs_get(keys, ATTR_STUDY_INSTANCE_UID);
    r.patient_id = patient && patient[0] ? patient : NULL;
    r.study = study && study[0] ? study : NULL;
    char detail[320];
    r.detail = sp_fmt(detail, sizeof detail, "%s level, %zu matches%s%s",
                      attr_level_name(dicom_find_level(q)), matches,
                      status == DICOM_SUCCESS ? "" : "; ", status == DICOM_SUCCESS ? "" : comment);
    audit_record(&r, false);
    return status;
}

static uint16_t find_checked(scp_t *scp, dicom_find_t *q, size_t *matches, char *comment,
                             size_t comment_len)
{
    bool partial = false;
    find_run_t run = {.q = q};
    int rc = backend_find(scp->backend, dicom_find_level(q), dicom_find_keys(q), scp->max_results,
                          emit_match, &run, &partial);
    *matches = run.matches;
    if (dicom_find_cancelled(q))
        return DICOM_CANCEL;
    if (rc == SP_ELIMIT) {
        sp_fmt(comment, comment_len, "more than %zu matches; narrow the query", scp->max_results);
        log_warn("C-FIND from %s stopped at %zu matches", dicom_find_peer(q)->calling_ae,
                 scp->max_results);
        return DICOM_OUT_OF_RESOURCES;
    }
    if (rc == SP_EINVAL) {
        sp_fmt(comment, comment_len, "identifier refused: a key is malformed");
        log_warn("C-FIND from %s refused: the nodes found a key malformed",
                 dicom_find_peer(q)->calling_ae);
        return DICOM_DATASET_MISMATCH;
    }
    if (rc != 0) {
        sp_fmt(comment, comment_len, "query failed: %s",
               rc == SP_ETOOBIG ? "a key is longer than the archive accepts" : sp_strerror(rc));
        log_error("C-FIND from %s failed: %s", dicom_find_peer(q)->calling_ae, sp_strerror(rc));
        return rc > 0 ? DICOM_CANCEL : DICOM_UNABLE_TO_PROCESS;
    }
    if (partial)
        log_warn("C-FIND from %s answered without every node", dicom_find_peer(q)->calling_ae);
    return DICOM_SUCCESS;
}

/* The instances a retrieve resolves to, with what the sub-operations need
 * of each: its study (to find its replicas), SOP Instance UID, SOP class and
 * transfer syntax (to pick presentation contexts). Memory: about 250 bytes
 * per instance, so 20,000 instances take about 5 MB; it is bounded by the
 * instances of the studies the identifier names, and has to be held whole
 * because a retrieve announces its sub-operation count before the first
 * C-STORE. */
typedef struct {
    char *study;
    char *sop;
    char *sop_class;
    char *ts;
} retrieve_item_t;

typedef struct {
    retrieve_item_t *items;
    size_t n, cap;
} retrieve_list_t;

static void retrieve_add(retrieve_list_t *l, const char *study, const char *sop,
                         const char *sop_class, const char *ts)
{
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 64;
        l->items = sp_realloc(l->items, l->cap * sizeof *l->items);
    }
    l->items[l->n++] =
        (retrieve_item_t){sp_strdup(study), sp_strdup(sop), sp_strdup(sop_class), sp_strdup(ts)};
}

static int collect_instance(void *ctx, const attrs_t *m)
{
    retrieve_add(ctx, attrs_str(m, ATTR_STUDY_INSTANCE_UID), attrs_str(m, ATTR_SOP_INSTANCE_UID),
                 attrs_str(m, ATTR_SOP_CLASS_UID), attrs_str(m, ATTR_TRANSFER_SYNTAX_UID));
    return 0;
}

static int collect_listed(void *ctx, const wire_instance_t *w)
{
    retrieve_add(ctx, w->study_uid, w->sop_uid, w->sop_class_uid ? w->sop_class_uid : "",
                 w->transfer_syntax_uid ? w->transfer_syntax_uid : "");
    return 0;
}

static void retrieve_list_free(retrieve_list_t *l)
{
    for (size_t i = 0; i < l->n; i++) {
        free(l->items[i].study);
        free(l->items[i].sop);
        free(l->items[i].sop_class);
        free(l->items[i].ts);
    }
    free(l->items);
}

/* The studies (and series) a retrieve above IMAGE level names. */
typedef struct {
    char **study;
    char **series; /* NULL entries: the whole study */
    size_t n, cap;
} entity_list_t;

static int collect_entity(void *ctx, const attrs_t *m)
{
    entity_list_t *l = ctx;
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 16;
        l->study = sp_realloc(l->study, l->cap * sizeof *l->study);
        l->series = sp_realloc(l->series, l->cap * sizeof *l->series);
    }
    const char *series = attrs_get(m, ATTR_SERIES_INSTANCE_UID);
    l->study[l->n] = sp_strdup(attrs_str(m, ATTR_STUDY_INSTANCE_UID));
    l->series[l->n++] = series && series[0] ? sp_strdup(series) : NULL;
    return 0;
}

static void entity_list_free(entity_list_t *l)
{
    for (size_t i = 0; i < l->n; i++) {
        free(l->study[i]);
        free(l->series[i]);
    }
    free(l->study);
    free(l->series);
}

/* Resolves a retrieve identifier to its instances. IMAGE level: an
 * IMAGE-level find on the identifier's keys (the SOP Instance UID list, in
 * batches however long it is). Above it, the studies or series the
 * identifier names are found first (a STUDY-level find on the patient keys
 * for PATIENT, a find at the identifier's level for STUDY and SERIES, so its
 * keys match as before), then each is listed in pages from its replicas
 * (backend_list): a find would stop at the nodes' max_results, a listing
 * never does, so a study of any size is retrieved whole. */
static int resolve_retrieve(scp_t *scp, dicom_retrieve_t *r, retrieve_list_t *out, char *comment,
                            size_t comment_len)
{
    const attrs_t *id = dicom_retrieve_keys(r);
    level_t level = dicom_retrieve_level(r);
    const char *unique = attrs_get(id, attr_unique_key(level));
    if (unique == NULL || unique[0] == '\0') {
        sp_fmt(comment, comment_len, "%s-level retrieve without %s", attr_level_name(level),
               attr_info(attr_unique_key(level))->keyword);
        return SP_EINVAL;
    }
    attrs_t keys = {0};
    for (size_t i = 0; i < ATTR_STORED_COUNT; i++)
        if (id->v[i] && id->v[i][0] && attr_info((attr_id_t)i)->level <= level)
            attrs_set(&keys, (attr_id_t)i, id->v[i]);
    int rc;
    if (level == LEVEL_IMAGE) {
        static const attr_id_t wanted[] = {ATTR_STUDY_INSTANCE_UID, ATTR_SOP_INSTANCE_UID,
                                           ATTR_SOP_CLASS_UID, ATTR_TRANSFER_SYNTAX_UID};
        for (size_t i = 0; i < SP_ARRAY_LEN(wanted); i++)
            if (attrs_get(&keys, wanted[i]) == NULL)
                attrs_set(&keys, wanted[i], "");
        rc = backend_find(scp->backend, LEVEL_IMAGE, &keys, 0, collect_instance, out, NULL);
        attrs_clear(&keys);
        if (rc != 0)
            sp_fmt(comment, comment_len, "cannot list the instances: %s", sp_strerror(rc));
        return rc;
    }
    level_t find_level = level == LEVEL_PATIENT ? LEVEL_STUDY : level;
    if (attrs_get(&keys, ATTR_STUDY_INSTANCE_UID) == NULL)
        attrs_set(&keys, ATTR_STUDY_INSTANCE_UID, "");
    entity_list_t ents = {0};
    rc = backend_find(scp->backend, find_level, &keys, 0, collect_entity, &ents, NULL);
    attrs_clear(&keys);
    if (rc != 0)
        sp_fmt(comment, comment_len, "cannot find the %s: %s",
               find_level == LEVEL_SERIES ? "series" : "studies", sp_strerror(rc));
    for (size_t i = 0; rc == 0 && i < ents.n; i++) {
        bool partial = false;
        rc = backend_list(scp->backend, ents.study[i], ents.series[i], collect_listed, out,
                          &partial);
        if (rc != 0)
            sp_fmt(comment, comment_len, "cannot list study %s: %s", ents.study[i],
                   sp_strerror(rc));
        else if (partial)
            log_warn("retrieve for %s: study %s listed without every replica",
                     dicom_retrieve_peer(r)->calling_ae, ents.study[i]);
    }
    entity_list_free(&ents);
    return rc;
}

/* Fetcher threads read instances from the replicas while the association
 * thread sends earlier ones, so node reads and DIMSE sends overlap. Each
 * fetcher claims the next instance not yet claimed, at most PREFETCH_DEPTH
 * ahead of the sender, and fetcher k starts at replica k, spreading the
 * reads (and their digest checks) over the study's replicas. Because work is
 * claimed rather than assigned, any number of fetchers covers the list: when
 * the system refuses threads the retrieve goes on with those it got, or with
 * none, fetching each instance on the sender's thread. */
#define PREFETCH_THREADS 8 /* at most; prefetch_threads() says how many */
#define PREFETCH_DEPTH 8

/* Fetchers per retrieve: one per core plus one (a fetch mostly waits on a
 * node's read, digest check and the CURVE hops), at least 3. */
static unsigned prefetch_threads(void)
{
    int n = sp_cores() + 1;
    return n < 3 ? 3 : n > PREFETCH_THREADS ? PREFETCH_THREADS : (unsigned)n;
}

typedef struct {
    uint8_t *data; /* NULL when the fetch failed */
    size_t len;
    int rc;
    bool ready;
} fetched_t;

typedef struct prefetch prefetch_t;

typedef struct {
    prefetch_t *p;
    unsigned index;
    pthread_t thread;
} fetcher_t;

struct prefetch {
    scp_t *scp;
    const retrieve_list_t *list;
    fetched_t *results; /* one per listed instance */
    size_t claimed;     /* instances a fetcher has taken on */
    size_t consumed;    /* instances handed to the sender */
    bool stop;          /* set by the sender to end early */
    pthread_mutex_t lock;
    pthread_cond_t changed;
    unsigned nfetchers; /* threads actually running */
    fetcher_t fetchers[PREFETCH_THREADS];
};

static void *fetcher_main(void *arg)
{
    fetcher_t *f = arg;
    prefetch_t *p = f->p;
    pthread_mutex_lock(&p->lock);
    for (;;) {
        while (!p->stop && p->claimed < p->list->n && p->claimed >= p->consumed + PREFETCH_DEPTH)
            pthread_cond_wait(&p->changed, &p->lock);
        if (p->stop || p->claimed >= p->list->n)
            break;
        size_t i = p->claimed++;
        pthread_mutex_unlock(&p->lock);
        fetched_t r = {.ready = true};
        r.rc = backend_fetch(p->scp->backend, p->list->items[i].study, p->list->items[i].sop,
                             f->index, &r.data, &r.len);
        pthread_mutex_lock(&p->lock);
        p->results[i] = r;
        pthread_cond_broadcast(&p->changed);
    }
    pthread_mutex_unlock(&p->lock);
    return NULL;
}

static void prefetch_start(prefetch_t *p, scp_t *scp, const retrieve_list_t *list,
                           const char *calling_ae)
{
    *p = (prefetch_t){.scp = scp, .list = list};
    p->results = sp_calloc(list->n ? list->n : 1, sizeof *p->results);
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->changed, NULL);
    unsigned want = list->n < prefetch_threads() ? (unsigned)list->n : prefetch_threads();
    for (unsigned k = 0; k < want; k++) {
        p->fetchers[p->nfetchers] = (fetcher_t){.p = p, .index = k};
        int rc = pthread_create(&p->fetchers[p->nfetchers].thread, NULL, fetcher_main,
                                &p->fetchers[p->nfetchers]);
        if (rc != 0) {
            log_warn("retrieve for %s: cannot start a fetcher thread (%s); going on with %u",
                     calling_ae, sp_strerror(-rc), p->nfetchers);
            break;
        }
        p->nfetchers++;
    }
}

/* Hands the sender the next instance in list order, waiting for a fetcher,
 * or fetching it here when no fetcher runs. */
static fetched_t prefetch_next(prefetch_t *p)
{
    pthread_mutex_lock(&p->lock);
    size_t i = p->consumed;
    if (p->nfetchers == 0 && !p->results[i].ready) {
        p->claimed = i + 1;
        pthread_mutex_unlock(&p->lock);
        fetched_t r = {.ready = true};
        r.rc = backend_fetch(p->scp->backend, p->list->items[i].study, p->list->items[i].sop, 0,
                             &r.data, &r.len);
        pthread_mutex_lock(&p->lock);
        p->results[i] = r;
    }
    while (!p->results[i].ready)
        pthread_cond_wait(&p->changed, &p->lock);
    fetched_t r = p->results[i];
    p->results[i].data = NULL;
    p->consumed++;
    pthread_cond_broadcast(&p->changed);
    pthread_mutex_unlock(&p->lock);
    return r;
}

/* Stops the fetchers, joins them and frees what was fetched but not sent. */
static void prefetch_finish(prefetch_t *p)
{
    pthread_mutex_lock(&p->lock);
    p->stop = true;
    pthread_cond_broadcast(&p->changed);
    pthread_mutex_unlock(&p->lock);
    for (unsigned k = 0; k < p->nfetchers; k++)
        pthread_join(p->fetchers[k].thread, NULL);
    for (size_t i = 0; i < p->list->n; i++)
        free(p->results[i].data);
    free(p->results);
    pthread_mutex_destroy(&p->lock);
    pthread_cond_destroy(&p->changed);
}

/* Sends every listed instance, each fetched from the first replica that has
 * a good copy. Returns DICOM_SUCCESS, or DICOM_CANCEL when the requester
 * cancelled or the association failed. */
/* Retrieval throughput is rate() of these (admin.h); registered once. */
static admin_counter_t *scp_bytes_out, *scp_objects_out;
static pthread_once_t scp_metrics_once = PTHREAD_ONCE_INIT;

static void scp_metrics_init(void)
{
    scp_bytes_out = admin_counter("shardpacs_router_retrieve_bytes_total",
                                  "Object bytes sent by C-MOVE and C-GET sub-operations", "");
    scp_objects_out = admin_counter("shardpacs_router_retrieve_instances_total",
                                    "Instances sent by C-MOVE and C-GET sub-operations", "");
}

static uint16_t send_all(scp_t *scp, dicom_retrieve_t *r, const retrieve_list_t *list, size_t *sent)
{
    pthread_once(&scp_metrics_once, scp_metrics_init);
    const char *calling = dicom_retrieve_peer(r)->calling_ae;
    prefetch_t p;
    prefetch_start(&p, scp, list, calling);
    uint16_t status = DICOM_SUCCESS;
    for (size_t i = 0; i < list->n; i++) {
        fetched_t f = prefetch_next(&p);
        if (f.rc != 0) {
            log_error("retrieve for %s: %s of study %s unreadable on every replica: %s", calling,
                      list->items[i].sop, list->items[i].study, sp_strerror(f.rc));
            dicom_retrieve_fail(r, list->items[i].sop);
            continue;
        }
        int rc = dicom_retrieve_send(r, f.data, f.len);
        free(f.data);
        if (rc == 0) {
            (*sent)++;
            admin_add(scp_bytes_out, f.len);
            admin_add(scp_objects_out, 1);
        }
        if (rc < 0) {
            status = DICOM_CANCEL;
            break;
        }
    }
    prefetch_finish(&p);
    return status;
}

/* Writes a retrieve's audit record: the studies it resolved to (each once;
 * the list holds a study's instances together) and the instances sent. */
static void audit_retrieve(dicom_retrieve_t *r, const retrieve_list_t *list, size_t sent,
                           uint16_t status, const char *comment)
{
    const dicom_peer_t *peer = dicom_retrieve_peer(r);
    const char *dest = dicom_retrieve_destination(r);
    audit_record_t a = dicom_record(AUDIT_RETRIEVE, dest ? "C-MOVE" : "C-GET", peer, status);
    const char *studies[AUDIT_MAX_STUDIES];
    size_t n = 0;
    for (size_t i = 0; i < list->n; i++) {
        if (i > 0 && strcmp(list->items[i].study, list->items[i - 1].study) == 0)
            continue;
        if (n < AUDIT_MAX_STUDIES)
            studies[n] = list->items[i].study;
        n++;
    }
    const attrs_t *keys = dicom_retrieve_keys(r);
    const char *patient = attrs_get(keys, ATTR_PATIENT_ID);
    const char *study = attrs_get(keys, ATTR_STUDY_INSTANCE_UID);
    a.patient_id = patient && patient[0] ? patient : NULL;
    if (n > 0) {
        a.studies = studies;
        a.nstudies = n;
    } else if (study && study[0]) {
        a.study = study;
    }
    a.instances = (long long)sent;
    a.destination = dest;
    a.detail = status == DICOM_SUCCESS ? NULL : comment;
    audit_record(&a, false);
}

/* Shared by C-MOVE (host != NULL) and C-GET: resolve the identifier to
 * instances, start the sub-operations, send them, audit. */
static uint16_t retrieve(scp_t *scp, dicom_retrieve_t *r, const char *host, int port, char *comment,
                         size_t comment_len)
{
    retrieve_list_t list = {0};
    uint16_t status = DICOM_SUCCESS;
    size_t sent = 0;
    int rc = resolve_retrieve(scp, r, &list, comment, comment_len);
    if (rc != 0) {
        status = rc == SP_EINVAL ? DICOM_DATASET_MISMATCH : DICOM_UNABLE_TO_PROCESS;
        log_warn("retrieve for %s refused, status 0x%04X: %s", dicom_retrieve_peer(r)->calling_ae,
                 status, comment);
        goto out;
    }
    dicom_instance_kind_t *kinds = sp_calloc(list.n ? list.n : 1, sizeof *kinds);
    for (size_t i = 0; i < list.n; i++)
        kinds[i] = (dicom_instance_kind_t){list.items[i].sop_class, list.items[i].ts};
    char err[256];
    rc = dicom_retrieve_begin(r, host, port, kinds, list.n, err, sizeof err);
    free(kinds);
    if (rc != 0) {
        sp_fmt(comment, comment_len, "cannot start sub-operations: %s", err);
        log_error("retrieve for %s to '%s': %s", dicom_retrieve_peer(r)->calling_ae,
                  host ? dicom_retrieve_destination(r) : "(C-GET)", err);
        status = DICOM_REFUSED_SUBOPS;
        goto out;
    }
    status = send_all(scp, r, &list, &sent);
    if (status == DICOM_SUCCESS && sent < list.n)
        sp_fmt(comment, comment_len, "%zu of %zu instances sent", sent, list.n);
out:
    audit_retrieve(r, &list, sent,
                   status == DICOM_SUCCESS && sent < list.n ? DICOM_WARNING_SUBOPS : status,
                   comment);
    retrieve_list_free(&list);
    return status;
}

/* A retrieve refused before it started, audited as such. */
static uint16_t refuse_retrieve(dicom_retrieve_t *r, uint16_t status, const char *comment)
{
    retrieve_list_t none = {0};
    audit_retrieve(r, &none, 0, status, comment);
    return status;
}

uint16_t scp_move(void *ctx, dicom_retrieve_t *r, char *comment, size_t comment_len)
{
    scp_t *scp = ctx;
    const char *dest = dicom_retrieve_destination(r);
    const dicom_peer_t *peer = dicom_retrieve_peer(r);
    if (!allowed(scp, peer, ACCESS_MOVE, NULL, comment, comment_len))
        return refuse_retrieve(r, DICOM_NOT_AUTHORIZED, comment);
    /* A destination the peer may not use is one it does not know: PS3.4
     * C.4.2.1.4 has no other status for a destination refused. */
    if (!allowed(scp, peer, ACCESS_MOVE, dest ? dest : "", comment, comment_len))
        return refuse_retrieve(r, DICOM_MOVE_DEST_UNKNOWN, comment);
    for (size_t i = 0; dest && i < scp->ndests; i++)
        if (strcmp(scp->dests[i].ae_title, dest) == 0)
            return retrieve(scp, r, scp->dests[i].host, scp->dests[i].port, comment, comment_len);
    sp_fmt(comment, comment_len, "move destination '%s' is not in the AE table", dest ? dest : "");
    log_warn("C-MOVE from %s to unknown destination '%s'", peer->calling_ae, dest ? dest : "");
    return refuse_retrieve(r, DICOM_MOVE_DEST_UNKNOWN, comment);
}

uint16_t scp_get(void *ctx, dicom_retrieve_t *r, char *comment, size_t comment_len)
{
    if (!allowed(ctx, dicom_retrieve_peer(r), ACCESS_GET, NULL, comment, comment_len))
        return refuse_retrieve(r, DICOM_NOT_AUTHORIZED, comment);
    return retrieve(ctx, r, NULL, 0, comment, comment_len);
}
