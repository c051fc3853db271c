/* dicomweb.c - QIDO-RS, WADO-RS and STOW-RS handlers (dicomweb.h).
 *
 * A request is routed once its headers are in (dw_begin: the path split
 * into segments, UIDs checked, STOW's multipart parser set up) and answered
 * once its body is complete (dw_end). Retrievals that may be large
 * (study/series objects and metadata) stream: a pipeline of fetcher
 * threads reads instances from the replicas in order, a few ahead of the
 * socket, and the response is pulled from it while the client reads.
 * STOW-RS bodies are parsed as they arrive; each part (one object) is
 * checked and stored as soon as its closing boundary is seen, so at most
 * one object of a request is held at a time. */
#define _GNU_SOURCE /* memmem, strcasestr */
#include "dicomweb.h"

#include "dicom.h"
#include "dicom_json.h"
#include "part10.h"
#include "scp.h"

#include "../common/base.h"
#include "../common/dsscan.h"
#include "../common/log.h"

#include <ctype.h>
#include <jansson.h>
#include <pthread.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define DW_MAX_SEGMENTS 10
#define DW_MAX_FRAMES 4096
#define DW_PART_HEADERS_MAX (16 * 1024)
#define PIPE_THREADS 3
#define PIPE_DEPTH 8

/* ---- metadata cache ------------------------------------------------------------ */

/* Instance metadata JSON by object digest and instance URL (the URL is
 * part of the text, in BulkDataURIs), least recently used dropped first
 * once over the byte budget. */
typedef struct mcache_entry {
    uint8_t key[32]; /* BLAKE2b(digest || instance URL) */
    char *json;
    size_t len;
    struct mcache_entry *prev, *next; /* LRU list, most recent first */
    struct mcache_entry *chain;       /* hash bucket */
} mcache_entry_t;

#define MCACHE_BUCKETS 8192

typedef struct {
    pthread_mutex_t lock;
    size_t budget, used;
    mcache_entry_t *head, *tail;
    mcache_entry_t *buckets[MCACHE_BUCKETS];
    uint64_t hits, misses;
} mcache_t;

static void mcache_key(const uint8_t digest[SP_DIGEST_LEN], const char *url, uint8_t key[32])
{
    crypto_generichash_state st;
    crypto_generichash_init(&st, NULL, 0, 32);
    crypto_generichash_update(&st, digest, SP_DIGEST_LEN);
    crypto_generichash_update(&st, (const uint8_t *)url, strlen(url));
    crypto_generichash_final(&st, key, 32);
}

static unsigned mcache_bucket(const uint8_t key[32])
{
    return ((unsigned)key[0] | (unsigned)key[1] << 8) % MCACHE_BUCKETS;
}

static void mcache_unlink(mcache_t *c, mcache_entry_t *e)
{
    if (e->prev)
        e->prev->next = e->next;
    else
        c->head = e->next;
    if (e->next)
        e->next->prev = e->prev;
    else
        c->tail = e->prev;
    e->prev = e->next = NULL;
}

static void mcache_push(mcache_t *c, mcache_entry_t *e)
{
    e->next = c->head;
    e->prev = NULL;
    if (c->head)
        c->head->prev = e;
    c->head = e;
    if (c->tail == NULL)
        c->tail = e;
}

/* A malloc'd copy of the cached JSON, or NULL. */
static char *mcache_get(mcache_t *c, const uint8_t key[32], size_t *len)
{
    if (c->budget == 0)
        return NULL;
    char *out = NULL;
    pthread_mutex_lock(&c->lock);
    for (mcache_entry_t *e = c->buckets[mcache_bucket(key)]; e; e = e->chain) {
        if (memcmp(e->key, key, 32) == 0) {
            mcache_unlink(c, e);
            mcache_push(c, e);
            out = sp_memdup(e->json, e->len + 1);
            *len = e->len;
            break;
        }
    }
    if (out)
        c->hits++;
    else
        c->misses++;
    pthread_mutex_unlock(&c->lock);
    return out;
}

static void mcache_remove(mcache_t *c, mcache_entry_t *e)
{
    mcache_entry_t **pp = &c->buckets[mcache_bucket(e->key)];
    while (*pp != e)
        pp = &(*pp)->chain;
    *pp = e->chain;
    mcache_unlink(c, e);
    c->used -= e->len + sizeof *e;
    free(e->json);
    free(e);
}

static void mcache_put(mcache_t *c, const uint8_t key[32], const char *json, size_t len)
{
    if (c->budget == 0 || len + sizeof(mcache_entry_t) > c->budget / 4)
        return;
    pthread_mutex_lock(&c->lock);
    for (mcache_entry_t *e = c->buckets[mcache_bucket(key)]; e; e = e->chain)
        if (memcmp(e->key, key, 32) == 0) {
            pthread_mutex_unlock(&c->lock);
            return;
        }
    mcache_entry_t *e = sp_calloc(1, sizeof *e);
    memcpy(e->key, key, 32);
    e->json = sp_memdup(json, len + 1);
    e->len = len;
    unsigned b = mcache_bucket(key);
    e->chain = c->buckets[b];
    c->buckets[b] = e;
    mcache_push(c, e);
    c->used += len + sizeof *e;
    while (c->used > c->budget && c->tail)
        mcache_remove(c, c->tail);
    pthread_mutex_unlock(&c->lock);
}

static void mcache_free(mcache_t *c)
{
    while (c->head)
        mcache_remove(c, c->head);
    pthread_mutex_destroy(&c->lock);
}

struct dicomweb {
    dicomweb_config_t cfg;
    mcache_t cache;
};

dicomweb_t *dicomweb_new(const dicomweb_config_t *cfg)
{
    dicomweb_t *d = sp_calloc(1, sizeof *d);
    d->cfg = *cfg;
    pthread_mutex_init(&d->cache.lock, NULL);
    d->cache.budget = cfg->metadata_cache;
    return d;
}

void dicomweb_destroy(dicomweb_t **dp)
{
    dicomweb_t *d = *dp;
    if (d == NULL)
        return;
    mcache_free(&d->cache);
    free(d);
    *dp = NULL;
}

/* ---- fetch pipeline ------------------------------------------------------------ */

/* Work on item i of a list, on a fetcher thread: *out (malloc'd) or an error
 * code. spread rotates the replicas read first. */
typedef int (*pipe_work_fn)(void *ctx, size_t i, unsigned spread, uint8_t **out, size_t *len);

typedef struct {
    uint8_t *data;
    size_t len;
    int rc;
    bool ready;
} pipe_result_t;

typedef struct pipe_s pipe_t;

typedef struct {
    pipe_t *p;
    unsigned index;
    pthread_t thread;
} pipe_worker_t;

/* Items are claimed in order by up to PIPE_THREADS fetchers, at most
 * PIPE_DEPTH ahead of the consumer, and handed out in order (the same
 * scheme as C-GET's prefetch in router/scp.c). */
struct pipe_s {
    size_t n;
    pipe_work_fn work;
    void *ctx;
    pipe_result_t *results;
    size_t claimed, consumed;
    bool stop;
    pthread_mutex_t lock;
    pthread_cond_t changed;
    unsigned nworkers;
    pipe_worker_t workers[PIPE_THREADS];
};

static void *pipe_main(void *arg)
{
    pipe_worker_t *w = arg;
    pipe_t *p = w->p;
    pthread_mutex_lock(&p->lock);
    for (;;) {
        while (!p->stop && p->claimed < p->n && p->claimed >= p->consumed + PIPE_DEPTH)
            pthread_cond_wait(&p->changed, &p->lock);
        if (p->stop || p->claimed >= p->n)
            break;
        size_t i = p->claimed++;
        pthread_mutex_unlock(&p->lock);
        pipe_result_t r = {.ready = true};
        r.rc = p->work(p->ctx, i, w->index, &r.data, &r.len);
        pthread_mutex_lock(&p->lock);
        p->results[i] = r;
        pthread_cond_broadcast(&p->changed);
    }
    pthread_mutex_unlock(&p->lock);
    return NULL;
}

/* Starts fetchers over items [first, n): those before first are the
 * caller's business (never handed out by pipe_next). */
static pipe_t *pipe_start(size_t n, size_t first, pipe_work_fn work, void *ctx)
{
    pipe_t *p = sp_calloc(1, sizeof *p);
    p->n = n;
    p->claimed = p->consumed = first;
    p->work = work;
    p->ctx = ctx;
    p->results = sp_calloc(n ? n : 1, sizeof *p->results);
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->changed, NULL);
    unsigned want = n - first < PIPE_THREADS ? (unsigned)(n - first) : PIPE_THREADS;
    for (unsigned k = 0; k < want; k++) {
        p->workers[p->nworkers] = (pipe_worker_t){.p = p, .index = k};
        if (pthread_create(&p->workers[p->nworkers].thread, NULL, pipe_main,
                           &p->workers[p->nworkers]) != 0)
            break;
        p->nworkers++;
    }
    return p;
}

/* The next item in order (waiting for it, or working on it here when no
 * fetcher thread could start). Returns the work's code; *data is the
 * caller's. */
static int pipe_next(pipe_t *p, uint8_t **data, size_t *len)
{
    pthread_mutex_lock(&p->lock);
    SP_ASSERT(p->consumed < p->n);
    size_t i = p->consumed;
    if (p->nworkers == 0 && !p->results[i].ready) {
        p->claimed = i + 1;
        pthread_mutex_unlock(&p->lock);
        pipe_result_t r = {.ready = true};
        r.rc = p->work(p->ctx, i, 0, &r.data, &r.len);
        pthread_mutex_lock(&p->lock);
        p->results[i] = r;
    }
    while (!p->results[i].ready)
        pthread_cond_wait(&p->changed, &p->lock);
    pipe_result_t r = p->results[i];
    p->results[i].data = NULL;
    p->consumed++;
    pthread_cond_broadcast(&p->changed);
    pthread_mutex_unlock(&p->lock);
    *data = r.data;
    *len = r.len;
    return r.rc;
}

static void pipe_stop(pipe_t **pp)
{
    pipe_t *p = *pp;
    if (p == NULL)
        return;
    pthread_mutex_lock(&p->lock);
    p->stop = true;
    pthread_cond_broadcast(&p->changed);
    pthread_mutex_unlock(&p->lock);
    for (unsigned k = 0; k < p->nworkers; k++)
        pthread_join(p->workers[k].thread, NULL);
    for (size_t i = 0; i < p->n; i++)
        free(p->results[i].data);
    free(p->results);
    pthread_mutex_destroy(&p->lock);
    pthread_cond_destroy(&p->changed);
    free(p);
    *pp = NULL;
}

/* ---- DICOM JSON of indexed attributes ----------------------------------------------- */

/* Splits a stored value at backslashes into a JSON Value array of the VR's
 * JSON type: numbers for IS, DS, US, UL, SS, SL (text when not a number), person name
 * objects for PN, strings otherwise. */
static json_t *json_values(const char *vr, const char *value)
{
    json_t *arr = json_array();
    const char *p = value;
    for (;;) {
        size_t n = strcspn(p, "\\");
        char *v = sp_strndup(p, n);
        json_t *item;
        if (strcmp(vr, "PN") == 0) {
            item = json_object();
            static const char *groups[] = {"Alphabetic", "Ideographic", "Phonetic"};
            const char *g = v;
            for (int k = 0; k < 3; k++) {
                size_t gl = strcspn(g, "=");
                if (gl > 0) {
                    char *gs = sp_strndup(g, gl);
                    json_object_set_new(item, groups[k],
                                        json_string(gs) ? json_string(gs) : json_string("?"));
                    free(gs);
                }
                if (g[gl] != '=')
                    break;
                g += gl + 1;
            }
        } else if (n > 0 &&
                   (strcmp(vr, "IS") == 0 || strcmp(vr, "DS") == 0 || strcmp(vr, "US") == 0 ||
                    strcmp(vr, "UL") == 0 || strcmp(vr, "SS") == 0 || strcmp(vr, "SL") == 0)) {
            char *end = NULL;
            const char *s = v;
            while (*s == ' ')
                s++;
            if (strcmp(vr, "DS") != 0) {
                long long x = strtoll(s, &end, 10);
                item = end != s && *end == '\0' ? json_integer(x) : NULL;
            } else {
                double x = strtod(s, &end);
                item = end != s && *end == '\0' ? json_real(x) : NULL;
            }
            if (item == NULL)
                item = json_string(v);
        } else {
            item = json_string(v);
        }
        if (item == NULL)
            item = json_string("\xEF\xBF\xBD"); /* not UTF-8: cannot happen for indexed values */
        if (n == 0 && strcmp(vr, "PN") != 0) {
            json_decref(item);
            item = json_null();
        }
        json_array_append_new(arr, item);
        free(v);
        if (p[n] != '\\')
            break;
        p += n + 1;
    }
    return arr;
}

static void json_put_attr(json_t *obj, uint32_t tag, const char *vr, const char *value)
{
    char key[9];
    sp_fmt(key, sizeof key, "%08X", (unsigned)tag);
    json_t *a = json_object();
    json_object_set_new(a, "vr", json_string(vr));
    if (value && value[0])
        json_object_set_new(a, "Value", json_values(vr, value));
    json_object_set_new(obj, key, a);
}

/* ---- request state and helpers ------------------------------------------------------ */

typedef enum {
    OP_NONE = 0,
    OP_QIDO,
    OP_RETRIEVE,
    OP_METADATA,
    OP_FRAMES,
    OP_BULKDATA,
    OP_RENDERED,
    OP_THUMBNAIL,
    OP_STOW,
} op_t;

typedef struct mpart mpart_t;

typedef struct {
    op_t op;
    level_t level; /* of the resource (QIDO: of the search) */
    char *study, *series, *sop;
    char *extra; /* frame list, bulk data tag */
    mpart_t *mp; /* STOW */
} dw_req_t;

static void dw_req_free(dw_req_t *q);

static bool uid_ok(const char *s)
{
    return s && sp_uid_valid(s);
}

/* A value of a media-type parameter (type=..., transfer-syntax=...,
 * boundary=...) in one media range, quoted or not, copied into out. */
static bool media_param(const char *range, size_t range_len, const char *name, char *out,
                        size_t outlen)
{
    size_t nl = strlen(name);
    const char *end = range + range_len;
    for (const char *p = range; p < end;) {
        const char *semi = memchr(p, ';', (size_t)(end - p));
        if (semi == NULL)
            break;
        p = semi + 1;
        while (p < end && (*p == ' ' || *p == '\t'))
            p++;
        if ((size_t)(end - p) > nl && strncasecmp(p, name, nl) == 0 && p[nl] == '=') {
            const char *v = p + nl + 1;
            size_t vl;
            if (v < end && *v == '"') {
                v++;
                const char *q = memchr(v, '"', (size_t)(end - v));
                vl = q ? (size_t)(q - v) : (size_t)(end - v);
            } else {
                vl = 0;
                while (v + vl < end && v[vl] != ';' && v[vl] != ' ' && v[vl] != '\t')
                    vl++;
            }
            if (vl >= outlen)
                return false;
            memcpy(out, v, vl);
            out[vl] = '\0';
            return true;
        }
    }
    return false;
}

/* What an Accept header allows for a multipart answer whose parts are
 * part_type (e.g. "application/dicom"): true when some media range accepts
 * it (no header, * / *, multipart/related with that type or without one, or
 * the part type itself), with the transfer-syntax it asks for (or "*" when
 * none) in ts. */
static bool accept_multipart(const char *accept, const char *part_type, char *ts, size_t tslen)
{
    sp_strlcpy(ts, "*", tslen);
    if (accept == NULL || accept[0] == '\0')
        return true;
    for (const char *p = accept; *p;) {
        size_t len = strcspn(p, ",");
        const char *r = p;
        while (*r == ' ')
            r++;
        size_t rl = len - (size_t)(r - p);
        size_t mt = strcspn(r, ";,");
        if (mt > rl)
            mt = rl;
        while (mt > 0 && r[mt - 1] == ' ')
            mt--;
        char type[128] = "";
        bool has_type = media_param(r, rl, "type", type, sizeof type);
        bool ok = (mt == 3 && strncmp(r, "*/*", 3) == 0) ||
                  (mt == strlen(part_type) && strncasecmp(r, part_type, mt) == 0) ||
                  (mt == 17 && strncasecmp(r, "multipart/related", 17) == 0 &&
                   (!has_type || strcasecmp(type, part_type) == 0)) ||
                  (mt == 11 && strncasecmp(r, "multipart/*", 11) == 0);
        if (ok) {
            if (!media_param(r, rl, "transfer-syntax", ts, tslen))
                sp_strlcpy(ts, "*", tslen);
            return true;
        }
        p += len;
        if (*p == ',')
            p++;
    }
    return false;
}

static void boundary_new(char out[41])
{
    uint8_t rnd[20];
    randombytes_buf(rnd, sizeof rnd);
    sp_hex(rnd, sizeof rnd, out);
}

/* The URL of a resource under the DICOMweb root. */
static char *resource_url(http_req_t *r, const char *study, const char *series, const char *sop)
{
    const char *base = http_req_base(r);
    size_t n = strlen(base) + 40 + (study ? strlen(study) : 0) + (series ? strlen(series) : 0) +
               (sop ? strlen(sop) : 0);
    char *u = sp_malloc(n);
    if (sop)
        sprintf(u, "%s/studies/%s/series/%s/instances/%s", base, study, series, sop);
    else if (series)
        sprintf(u, "%s/studies/%s/series/%s", base, study, series);
    else
        sprintf(u, "%s/studies/%s", base, study);
    return u;
}

/* ---- QIDO-RS --------------------------------------------------------------------- */

typedef struct {
    level_t level;
    attrs_t keys;
    bool include[ATTR_COUNT];
    bool include_all;
    size_t limit, offset;
    bool has_limit;
    char bad[256]; /* a malformed matching value: 400 */
} qido_t;

/* The attribute a query key names (keyword or 8 hex digits), or NULL. At
 * study level Modality means ModalitiesInStudy (what viewers ask for). */
static const attr_info_t *qido_attr(const char *key, level_t level)
{
    const attr_info_t *ai = NULL;
    size_t n = strlen(key);
    if (n == 8 && strspn(key, "0123456789abcdefABCDEF") == 8)
        ai = attr_by_tag((uint32_t)strtoul(key, NULL, 16));
    else
        ai = attr_by_keyword(key);
    if (ai && ai->id == ATTR_MODALITY && level < LEVEL_SERIES)
        ai = attr_info(ATTR_MODALITIES_IN_STUDY);
    return ai;
}

static void qido_include(qido_t *q, const char *list)
{
    for (const char *p = list; *p;) {
        size_t n = strcspn(p, ", ");
        char *k = sp_strndup(p, n);
        if (strcasecmp(k, "all") == 0) {
            q->include_all = true;
        } else {
            const attr_info_t *ai = qido_attr(k, q->level);
            if (ai)
                q->include[ai->id] = true;
        }
        free(k);
        p += n;
        p += strspn(p, ", ");
    }
}

static int qido_arg(void *ctx, const char *key, const char *value)
{
    qido_t *q = ctx;
    if (value == NULL)
        value = "";
    if (strcasecmp(key, "limit") == 0 || strcasecmp(key, "offset") == 0) {
        char *end = NULL;
        unsigned long long v = strtoull(value, &end, 10);
        if (end != value && *end == '\0' && value[0] != '-') {
            if (tolower((unsigned char)key[0]) == 'l') {
                q->limit = (size_t)v;
                q->has_limit = true;
            } else {
                q->offset = (size_t)v;
            }
        }
        return 0;
    }
    if (strcasecmp(key, "includefield") == 0) {
        qido_include(q, value);
        return 0;
    }
    if (strcasecmp(key, "fuzzymatching") == 0)
        return 0; /* accepted; names match case-insensitively anyway (see README) */
    const attr_info_t *ai = qido_attr(key, q->level);
    if (ai == NULL || ai->id == ATTR_SPECIFIC_CHARACTER_SET || ai->id == ATTR_TRANSFER_SYNTAX_UID ||
        (ai->id >= ATTR_STORED_COUNT && ai->id != ATTR_MODALITIES_IN_STUDY))
        return 0; /* not indexed (or not matchable): ignored, never a 400 */
    if (ai->level > q->level && !(ai->id == ATTR_MODALITIES_IN_STUDY))
        return 0; /* a key of a lower level than the search: ignored */
    char *v = sp_strdup(value);
    if (ai->kind == MATCH_UID)
        for (char *c = v; *c; c++)
            if (*c == ',')
                *c = '\\'; /* PS3.18 allows comma-separated UID lists */
    if (v[0] && match_key_valid(ai->kind, v) != 0) {
        sp_fmt(q->bad, sizeof q->bad, "%s: malformed value '%.80s'", ai->keyword, v);
        free(v);
        return 1;
    }
    attrs_take(&q->keys, ai->id, v);
    q->include[ai->id] = true;
    return 0;
}

/* The attributes a search returns by default (PS3.18 6.7.1.2.2), plus what
 * viewers read (SeriesDate, StudyDescription, ...). */
static void qido_defaults(qido_t *q)
{
    static const attr_id_t study[] = {ATTR_PATIENT_NAME,       ATTR_PATIENT_ID,
                                      ATTR_PATIENT_BIRTH_DATE, ATTR_PATIENT_SEX,
                                      ATTR_STUDY_INSTANCE_UID, ATTR_STUDY_DATE,
                                      ATTR_STUDY_TIME,         ATTR_ACCESSION_NUMBER,
                                      ATTR_STUDY_ID,           ATTR_REFERRING_PHYSICIAN_NAME,
                                      ATTR_STUDY_DESCRIPTION,  ATTR_MODALITIES_IN_STUDY,
                                      ATTR_NUM_STUDY_SERIES,   ATTR_NUM_STUDY_INSTANCES};
    static const attr_id_t series[] = {ATTR_STUDY_INSTANCE_UID,  ATTR_MODALITY,
                                       ATTR_SERIES_INSTANCE_UID, ATTR_SERIES_NUMBER,
                                       ATTR_SERIES_DESCRIPTION,  ATTR_SERIES_DATE,
                                       ATTR_SERIES_TIME,         ATTR_NUM_SERIES_INSTANCES};
    static const attr_id_t image[] = {ATTR_STUDY_INSTANCE_UID, ATTR_SERIES_INSTANCE_UID,
                                      ATTR_SOP_CLASS_UID,      ATTR_SOP_INSTANCE_UID,
                                      ATTR_INSTANCE_NUMBER,    ATTR_TRANSFER_SYNTAX_UID};
    const attr_id_t *list = q->level == LEVEL_STUDY    ? study
                            : q->level == LEVEL_SERIES ? series
                                                       : image;
    size_t n = q->level == LEVEL_STUDY    ? SP_ARRAY_LEN(study)
               : q->level == LEVEL_SERIES ? SP_ARRAY_LEN(series)
                                          : SP_ARRAY_LEN(image);
    for (size_t i = 0; i < n; i++)
        q->include[list[i]] = true;
    if (q->include_all)
        for (unsigned id = 0; id < ATTR_COUNT; id++) {
            const attr_info_t *ai = attr_info((attr_id_t)id);
            bool computed = id >= ATTR_STORED_COUNT;
            bool fits = computed ? (q->level == LEVEL_STUDY ? ai->level == LEVEL_STUDY
                                                            : ai->level == q->level)
                                 : ai->level <= q->level;
            if (fits)
                q->include[id] = true;
        }
    /* Counts and ModalitiesInStudy exist at one level only. */
    for (unsigned id = ATTR_STORED_COUNT; id < ATTR_COUNT; id++) {
        const attr_info_t *ai = attr_info((attr_id_t)id);
        bool ok = (q->level == LEVEL_STUDY && ai->level == LEVEL_STUDY) ||
                  (q->level == LEVEL_SERIES && ai->level == LEVEL_SERIES);
        if (!ok)
            q->include[id] = false;
    }
}

typedef struct {
    http_req_t *r;
    qido_t *q;
    json_t *out;
    size_t seen;
} qido_collect_t;

static int qido_emit(void *ctx, const attrs_t *m)
{
    qido_collect_t *c = ctx;
    if (c->seen++ < c->q->offset)
        return 0;
    if (c->q->has_limit && json_array_size(c->out) >= c->q->limit)
        return 0; /* past the page: seen, not kept */
    json_t *o = json_object();
    for (unsigned id = 0; id < ATTR_COUNT; id++) {
        if (!c->q->include[id] || id == ATTR_TRANSFER_SYNTAX_UID)
            continue;
        const attr_info_t *ai = attr_info((attr_id_t)id);
        const char *v = attrs_get(m, (attr_id_t)id);
        json_put_attr(o, ai->tag, ai->vr, v);
    }
    if (c->q->include[ATTR_TRANSFER_SYNTAX_UID] && attrs_get(m, ATTR_TRANSFER_SYNTAX_UID))
        json_put_attr(o, 0x00083002, "UI", attrs_get(m, ATTR_TRANSFER_SYNTAX_UID));
    if (attrs_get(m, ATTR_SPECIFIC_CHARACTER_SET))
        json_put_attr(o, 0x00080005, "CS", "ISO_IR 192"); /* values are UTF-8 */
    const char *st = attrs_get(m, ATTR_STUDY_INSTANCE_UID);
    const char *se = c->q->level >= LEVEL_SERIES ? attrs_get(m, ATTR_SERIES_INSTANCE_UID) : NULL;
    const char *sop = c->q->level >= LEVEL_IMAGE ? attrs_get(m, ATTR_SOP_INSTANCE_UID) : NULL;
    if (uid_ok(st) && (c->q->level < LEVEL_SERIES || uid_ok(se)) &&
        (c->q->level < LEVEL_IMAGE || uid_ok(sop))) {
        char *url = resource_url(c->r, st, se, sop);
        json_put_attr(o, 0x00081190, "UR", url);
        free(url);
    }
    json_array_append_new(c->out, o);
    return 0;
}

static void do_qido(dicomweb_t *d, http_req_t *r, dw_req_t *w)
{
    qido_t q = {.level = w->level};
    if (w->study)
        attrs_set(&q.keys, ATTR_STUDY_INSTANCE_UID, w->study);
    if (w->series)
        attrs_set(&q.keys, ATTR_SERIES_INSTANCE_UID, w->series);
    http_req_args(r, qido_arg, &q);
    if (q.bad[0]) {
        http_respond_error(r, 400, "%s", q.bad);
        attrs_clear(&q.keys);
        return;
    }
    /* The path's UIDs win over the same keys in the query string. */
    if (w->study)
        attrs_set(&q.keys, ATTR_STUDY_INSTANCE_UID, w->study);
    if (w->series)
        attrs_set(&q.keys, ATTR_SERIES_INSTANCE_UID, w->series);
    qido_defaults(&q);
    for (unsigned id = 0; id < ATTR_COUNT; id++)
        if (q.include[id] && attrs_get(&q.keys, (attr_id_t)id) == NULL)
            attrs_set(&q.keys, (attr_id_t)id, "");
    /* The whole result (up to max_results) is asked for even with a
     * limit: which matches the nodes cut at a limit depends on their scan
     * order, while the merged result comes sorted by the unique key, so
     * offset/limit pages are only stable when taken from all of it. */
    size_t cap = d->cfg.max_results;
    qido_collect_t c = {.r = r, .q = &q, .out = json_array()};
    bool partial = false;
    int rc = q.has_limit && q.limit == 0
                 ? 0
                 : backend_find(d->cfg.backend, q.level, &q.keys, cap, qido_emit, &c, &partial);
    attrs_clear(&q.keys);
    if (rc != 0 && rc != SP_ELIMIT) {
        json_decref(c.out);
        if (rc == SP_EINVAL || rc == SP_ETOOBIG)
            http_respond_error(r, 400, "query refused: %s", sp_strerror(rc));
        else
            http_respond_error(r, 503, "search failed: %s", sp_strerror(rc));
        return;
    }
    if (rc == SP_ELIMIT) {
        char w299[160];
        sp_fmt(w299, sizeof w299,
               "299 ShardPACS \"The number of results exceeded the maximum supported by the "
               "server (%zu); narrow the query\"",
               cap);
        http_add_header(r, "Warning", w299);
    }
    if (partial)
        http_add_header(r, "Warning", "299 ShardPACS \"Some storage members did not answer\"");
    char *text = json_dumps(c.out, JSON_COMPACT | JSON_SORT_KEYS);
    json_decref(c.out);
    http_respond_take(r, 200, "application/dicom+json", text, strlen(text));
}

/* ---- instance lists ----------------------------------------------------------------- */

typedef struct {
    char *series, *sop, *ts;
    uint8_t digest[SP_DIGEST_LEN];
} dw_item_t;

typedef struct {
    dw_item_t *items;
    size_t n, cap;
} dw_list_t;

static int list_collect(void *ctx, const wire_instance_t *inst)
{
    dw_list_t *l = ctx;
    if (l->n == l->cap) {
        l->cap = l->cap ? l->cap * 2 : 64;
        l->items = sp_realloc(l->items, l->cap * sizeof *l->items);
    }
    dw_item_t *it = &l->items[l->n++];
    it->series = sp_strdup(inst->series_uid);
    it->sop = sp_strdup(inst->sop_uid);
    it->ts = sp_strdup(inst->transfer_syntax_uid ? inst->transfer_syntax_uid : "");
    memcpy(it->digest, inst->digest, SP_DIGEST_LEN);
    return 0;
}

static void list_free(dw_list_t *l)
{
    for (size_t i = 0; i < l->n; i++) {
        free(l->items[i].series);
        free(l->items[i].sop);
        free(l->items[i].ts);
    }
    free(l->items);
    memset(l, 0, sizeof *l);
}

/* Lists what a study / series / instance resource holds. Returns 0 (maybe
 * empty), or an error code. For an instance the list holds it alone when
 * the series' listing has it. */
static int list_resource(dicomweb_t *d, const dw_req_t *w, dw_list_t *out)
{
    bool partial = false;
    int rc = backend_list(d->cfg.backend, w->study, w->series, list_collect, out, &partial);
    if (rc != 0 || w->sop == NULL)
        return rc;
    size_t keep = 0;
    for (size_t i = 0; i < out->n; i++) {
        if (strcmp(out->items[i].sop, w->sop) == 0) {
            dw_item_t t = out->items[i];
            out->items[i] = out->items[keep];
            out->items[keep++] = t;
        }
    }
    for (size_t i = keep; i < out->n; i++) {
        free(out->items[i].series);
        free(out->items[i].sop);
        free(out->items[i].ts);
    }
    out->n = keep;
    return 0;
}

/* ---- streamed multipart and JSON array responses ------------------------------------ */

typedef enum { STREAM_MULTIPART, STREAM_JSON_ARRAY } stream_kind_t;

typedef struct {
    dicomweb_t *d;
    stream_kind_t kind;
    char *study;
    dw_list_t list;
    char *base; /* DICOMweb root URL, for metadata BulkDataURIs */
    pipe_t *pipe;
    char boundary[41];
    const char *part_type;
    size_t next;                            /* items handed out */
    uint8_t *cur, *head, *tail;             /* the item being sent, with its framing */
    size_t cur_len, head_len, tail_len, at; /* at: position in head+cur+tail */
    bool done;
    bool failed;    /* an item could not be read: the response is cut */
    int first_rc;   /* result of the first item, fetched before answering */
    uint8_t *first; /* ... and its bytes */
    size_t first_len;
    /* Metadata pages (backend_metadata_page), shared by the fetchers: the
     * instances of the last page fetched not yet taken. */
    char *series; /* the series asked for, NULL for a study */
    pthread_mutex_t page_lock;
    struct held {
        char *sop;
        uint8_t digest[SP_DIGEST_LEN];
        uint8_t *data;
        size_t len;
    } * held;
    size_t nheld;
} dw_stream_t;

/* Instances asked for per metadata page: the fetchers take them in order,
 * and a page not used up is dropped when the next one comes. */
#define META_PAGE 64

static void held_clear(dw_stream_t *s)
{
    for (size_t i = 0; i < s->nheld; i++) {
        free(s->held[i].sop);
        free(s->held[i].data);
    }
    free(s->held);
    s->held = NULL;
    s->nheld = 0;
}

/* Takes item i's metadata out of the pages held (under page_lock). */
static bool held_take(dw_stream_t *s, const dw_item_t *it, uint8_t **out, size_t *len)
{
    for (size_t k = 0; k < s->nheld; k++) {
        struct held *h = &s->held[k];
        if (h->data != NULL && strcmp(h->sop, it->sop) == 0 &&
            memcmp(h->digest, it->digest, SP_DIGEST_LEN) == 0) {
            *out = h->data;
            *len = h->len;
            h->data = NULL;
            return true;
        }
    }
    return false;
}

/* Item i's metadata from a page of the series' (or study's) metadata: one
 * request brings the metadata of the next META_PAGE instances from one
 * replica, so a series costs a request per page rather than per instance,
 * and no pixel data is read anywhere. Returns 0 with *out (malloc'd), or
 * SP_ENOTFOUND when the replica that answered lacks this version of the
 * instance or none answered: the caller then reads it on its own. */
static int page_take(dw_stream_t *s, size_t i, unsigned spread, uint8_t **out, size_t *len)
{
    const dw_item_t *it = &s->list.items[i];
    pthread_mutex_lock(&s->page_lock);
    if (held_take(s, it, out, len)) {
        pthread_mutex_unlock(&s->page_lock);
        return 0;
    }
    /* The page starts right after the item before this one, in the key
     * order the listing and the nodes share. */
    char *cursor = NULL;
    if (i > 0) {
        const dw_item_t *p = &s->list.items[i - 1];
        cursor = sp_malloc(strlen(s->study) + strlen(p->series) + strlen(p->sop) + 3);
        sprintf(cursor, "%s/%s/%s", s->study, p->series, p->sop);
    }
    wire_reply_t rep;
    uint8_t *body = NULL;
    size_t body_len = 0;
    int rc = backend_metadata_page(s->d->cfg.backend, s->study, s->series, cursor, META_PAGE,
                                   spread, &rep, &body, &body_len);
    free(cursor);
    if (rc == 0) {
        held_clear(s);
        s->held = sp_calloc(rep.ninstances + 1, sizeof *s->held);
        size_t at = 0;
        for (size_t k = 0; k < rep.ninstances; k++) {
            const wire_instance_t *w = &rep.instances[k];
            struct held *h = &s->held[s->nheld++];
            h->sop = sp_strdup(w->sop_uid);
            memcpy(h->digest, w->digest, SP_DIGEST_LEN);
            h->data = sp_memdup(body + at, w->metadata_size ? w->metadata_size : 1);
            h->len = w->metadata_size;
            at += w->metadata_size;
        }
        wire_reply_free(&rep);
        free(body);
        rc = held_take(s, it, out, len) ? 0 : SP_ENOTFOUND;
    }
    pthread_mutex_unlock(&s->page_lock);
    return rc == 0 ? 0 : SP_ENOTFOUND;
}

static int work_fetch(void *ctx, size_t i, unsigned spread, uint8_t **out, size_t *len)
{
    dw_stream_t *s = ctx;
    return backend_fetch(s->d->cfg.backend, s->study, s->list.items[i].sop, spread, out, len);
}

static int work_metadata(void *ctx, size_t i, unsigned spread, uint8_t **out, size_t *len)
{
    dw_stream_t *s = ctx;
    dw_item_t *it = &s->list.items[i];
    char *url =
        sp_malloc(strlen(s->base) + strlen(s->study) + strlen(it->series) + strlen(it->sop) + 64);
    sprintf(url, "%s/studies/%s/series/%s/instances/%s", s->base, s->study, it->series, it->sop);
    uint8_t key[32];
    mcache_key(it->digest, url, key);
    char *json = mcache_get(&s->d->cache, key, len);
    if (json) {
        free(url);
        *out = (uint8_t *)json;
        return 0;
    }
    /* The nodes keep each instance's metadata without its pixels (read
     * nothing else): a page of the series' metadata, else this instance's
     * alone; a node of an older version refuses both, and then the whole
     * object is read as before. Either bytes make the same JSON: Pixel
     * Data is a BulkDataURI whatever its value. */
    uint8_t *obj = NULL;
    size_t objlen = 0;
    int rc = s->list.n > 1 ? page_take(s, i, spread, &obj, &objlen) : SP_ENOTFOUND;
    if (rc != 0)
        rc = backend_fetch_metadata(s->d->cfg.backend, s->study, it->sop, spread, &obj, &objlen);
    if (rc != 0 && rc != SP_ENOTFOUND)
        rc = backend_fetch(s->d->cfg.backend, s->study, it->sop, spread, &obj, &objlen);
    if (rc == 0) {
        char err[256];
        rc = dicom_json_instance(obj, objlen, url, &json, len, err, sizeof err);
        free(obj);
        if (rc == 0)
            mcache_put(&s->d->cache, key, json, *len);
        else
            log_warn("dicomweb: metadata of %s (study %s): %s", it->sop, s->study, err);
    }
    free(url);
    *out = (uint8_t *)json;
    return rc;
}

static void stream_free(void *ctx)
{
    dw_stream_t *s = ctx;
    pipe_stop(&s->pipe);
    list_free(&s->list);
    held_clear(s);
    pthread_mutex_destroy(&s->page_lock);
    free(s->series);
    free(s->study);
    free(s->base);
    free(s->cur);
    free(s->head);
    free(s->tail);
    free(s->first);
    free(s);
}

/* Takes the next item and frames it; false at the end or on failure
 * (s->done set only at a proper end). */
static bool stream_advance(dw_stream_t *s, bool *failed)
{
    free(s->cur);
    free(s->head);
    free(s->tail);
    s->cur = s->head = s->tail = NULL;
    s->cur_len = s->head_len = s->tail_len = s->at = 0;
    if (s->next == s->list.n) {
        if (s->kind == STREAM_MULTIPART) {
            s->tail = (uint8_t *)sp_malloc(64);
            s->tail_len = (size_t)sprintf((char *)s->tail, "--%s--\r\n", s->boundary);
        } else {
            s->tail = (uint8_t *)sp_strdup("]");
            s->tail_len = 1;
        }
        s->next++;
        return true;
    }
    if (s->next > s->list.n) {
        s->done = true;
        return false;
    }
    size_t i = s->next++;
    int rc;
    if (i == 0) {
        rc = s->first_rc;
        s->cur = s->first;
        s->cur_len = s->first_len;
        s->first = NULL;
    } else {
        rc = pipe_next(s->pipe, &s->cur, &s->cur_len);
    }
    if (rc != 0) {
        log_error("dicomweb: %s of study %s unreadable on every replica (%s): response cut",
                  s->list.items[i].sop, s->study, sp_strerror(rc));
        *failed = true;
        return false;
    }
    if (s->kind == STREAM_MULTIPART) {
        s->head = (uint8_t *)sp_malloc(256);
        s->head_len = (size_t)sprintf(
            (char *)s->head, "--%s\r\nContent-Type: %s; transfer-syntax=%s\r\n\r\n", s->boundary,
            s->part_type, s->list.items[i].ts[0] ? s->list.items[i].ts : "*");
        s->tail = (uint8_t *)sp_strdup("\r\n");
        s->tail_len = 2;
    } else {
        s->head = (uint8_t *)sp_strdup(i == 0 ? "[" : ",");
        s->head_len = 1;
    }
    return true;
}

static ssize_t stream_read(void *ctx, uint8_t *buf, size_t max)
{
    dw_stream_t *s = ctx;
    size_t put = 0;
    if (s->failed)
        return -1;
    while (put < max) {
        size_t total = s->head_len + s->cur_len + s->tail_len;
        if (s->at >= total || (s->head == NULL && s->cur == NULL && s->tail == NULL)) {
            if (!stream_advance(s, &s->failed))
                return s->failed && put == 0 ? -1 : (ssize_t)put;
            continue;
        }
        const uint8_t *src;
        size_t off = s->at, avail;
        if (off < s->head_len) {
            src = s->head + off;
            avail = s->head_len - off;
        } else if (off < s->head_len + s->cur_len) {
            src = s->cur + (off - s->head_len);
            avail = s->cur_len - (off - s->head_len);
        } else {
            src = s->tail + (off - s->head_len - s->cur_len);
            avail = total - off;
        }
        size_t n = avail < max - put ? avail : max - put;
        memcpy(buf + put, src, n);
        put += n;
        s->at += n;
    }
    return (ssize_t)put;
}

/* Starts a streamed answer over the listed items: the first item is
 * fetched before answering, so a resource nobody can read gets an error
 * status instead of a cut 200. */
static void stream_respond(dicomweb_t *d, http_req_t *r, dw_req_t *w, dw_list_t *list,
                           stream_kind_t kind, const char *etag)
{
    dw_stream_t *s = sp_calloc(1, sizeof *s);
    s->d = d;
    s->kind = kind;
    s->study = sp_strdup(w->study);
    s->series = w->series ? sp_strdup(w->series) : NULL;
    pthread_mutex_init(&s->page_lock, NULL);
    s->list = *list;
    memset(list, 0, sizeof *list);
    s->base = sp_strdup(http_req_base(r));
    s->part_type = "application/dicom";
    boundary_new(s->boundary);
    pipe_work_fn work = kind == STREAM_MULTIPART ? work_fetch : work_metadata;
    s->first_rc = work(s, 0, 0, &s->first, &s->first_len);
    if (s->first_rc != 0) {
        unsigned status = s->first_rc == SP_ENOTFOUND ? 404 : s->first_rc == SP_EINVAL ? 500 : 503;
        http_respond_error(r, status, "cannot read %s: %s", s->list.items[0].sop,
                           sp_strerror(s->first_rc));
        stream_free(s);
        return;
    }
    /* Item 0 is here already: the fetchers start at item 1. */
    s->pipe = pipe_start(s->list.n, 1, work, s);
    if (etag)
        http_add_header(r, "ETag", etag);
    if (kind == STREAM_MULTIPART) {
        char ct[160];
        sp_fmt(ct, sizeof ct, "multipart/related; type=\"application/dicom\"; boundary=%s",
               s->boundary);
        http_respond_stream(r, 200, ct, false, stream_read, stream_free, s);
    } else {
        http_respond_stream(r, 200, "application/dicom+json", http_req_accepts_gzip(r), stream_read,
                            stream_free, s);
    }
}

/* ---- WADO-RS -------------------------------------------------------------------------- */

/* Lists a WADO-RS resource into list; on failure answers 503 (listing
 * failed) or 404 (nothing there) and returns false. */
static bool list_or_respond(dicomweb_t *d, http_req_t *r, const dw_req_t *w, dw_list_t *list)
{
    int rc = list_resource(d, w, list);
    if (rc != 0) {
        http_respond_error(r, 503, "cannot list the instances: %s", sp_strerror(rc));
        return false;
    }
    if (list->n == 0) {
        list_free(list);
        http_respond_error(r, 404, "no such %s",
                           w->sop      ? "instance"
                           : w->series ? "series"
                                       : "study");
        return false;
    }
    return true;
}

static void do_retrieve(dicomweb_t *d, http_req_t *r, dw_req_t *w)
{
    char ts[80];
    if (!accept_multipart(http_req_header(r, "Accept"), "application/dicom", ts, sizeof ts)) {
        http_respond_error(r, 406,
                           "this resource is available as multipart/related; "
                           "type=\"application/dicom\"");
        return;
    }
    dw_list_t list = {0};
    if (!list_or_respond(d, r, w, &list))
        return;
    if (strcmp(ts, "*") != 0)
        for (size_t i = 0; i < list.n; i++)
            if (strcmp(list.items[i].ts, ts) != 0) {
                http_respond_error(r, 406,
                                   "%s is stored as %s; this server sends objects as stored "
                                   "(ask for transfer-syntax=* or that syntax)",
                                   list.items[i].sop, list.items[i].ts);
                list_free(&list);
                return;
            }
    stream_respond(d, r, w, &list, STREAM_MULTIPART, NULL);
}

static void do_metadata(dicomweb_t *d, http_req_t *r, dw_req_t *w)
{
    dw_list_t list = {0};
    if (!list_or_respond(d, r, w, &list))
        return;
    /* ETag: the digests of what is listed and the base the URIs are built
     * from; the same listing gives the same bytes. */
    crypto_generichash_state st;
    crypto_generichash_init(&st, NULL, 0, 16);
    for (size_t i = 0; i < list.n; i++)
        crypto_generichash_update(&st, list.items[i].digest, SP_DIGEST_LEN);
    const char *base = http_req_base(r);
    crypto_generichash_update(&st, (const uint8_t *)base, strlen(base));
    uint8_t tag[16];
    crypto_generichash_final(&st, tag, sizeof tag);
    char etag[40];
    etag[0] = '"';
    sp_hex(tag, sizeof tag, etag + 1);
    strcat(etag, "\"");
    const char *inm = http_req_header(r, "If-None-Match");
    if (inm && strstr(inm, etag)) {
        list_free(&list);
        http_add_header(r, "ETag", etag);
        http_respond(r, 304, NULL, NULL, 0);
        return;
    }
    stream_respond(d, r, w, &list, STREAM_JSON_ARRAY, etag);
}

/* Parses "1,2,5" into frame numbers. */
static size_t parse_frames(const char *text, uint32_t *out, size_t max)
{
    size_t n = 0;
    for (const char *p = text; *p;) {
        char *end = NULL;
        unsigned long v = strtoul(p, &end, 10);
        if (end == p || v == 0 || v > UINT32_MAX || n == max)
            return 0;
        out[n++] = (uint32_t)v;
        p = end;
        if (*p == ',')
            p++;
        else if (*p)
            return 0;
    }
    return n;
}

/* Fetches the one instance of w; answers the error itself. */
static bool fetch_instance(dicomweb_t *d, http_req_t *r, dw_req_t *w, uint8_t **obj, size_t *len)
{
    int rc = backend_fetch(d->cfg.backend, w->study, w->sop, (unsigned)sp_now_ms(), obj, len);
    if (rc == SP_ENOTFOUND) {
        http_respond_error(r, 404, "no such instance");
        return false;
    }
    if (rc != 0) {
        http_respond_error(r, 503, "cannot read the instance: %s", sp_strerror(rc));
        return false;
    }
    return true;
}

/* Sends byte parts as multipart/related; type="application/octet-stream",
 * each part headed exactly as browsers' parsers expect. */
static void respond_octet_parts(http_req_t *r, dicom_frame_t *parts, size_t n, const char *ts)
{
    char boundary[41];
    boundary_new(boundary);
    size_t total = 0;
    for (size_t i = 0; i < n; i++)
        total += parts[i].len + 200 + strlen(ts);
    uint8_t *body = sp_malloc(total + 64);
    size_t at = 0;
    for (size_t i = 0; i < n; i++) {
        at += (size_t)sprintf((char *)body + at,
                              "--%s\r\nContent-Type: application/octet-stream; "
                              "transfer-syntax=%s\r\n\r\n",
                              boundary, ts);
        memcpy(body + at, parts[i].data, parts[i].len);
        at += parts[i].len;
        memcpy(body + at, "\r\n", 2);
        at += 2;
    }
    at += (size_t)sprintf((char *)body + at, "--%s--\r\n", boundary);
    char ct[160];
    sp_fmt(ct, sizeof ct, "multipart/related; type=\"application/octet-stream\"; boundary=%s",
           boundary);
    http_respond_take(r, 200, ct, body, at);
}

static void do_frames(dicomweb_t *d, http_req_t *r, dw_req_t *w)
{
    char want[80];
    if (!accept_multipart(http_req_header(r, "Accept"), "application/octet-stream", want,
                          sizeof want)) {
        http_respond_error(r, 406,
                           "frames are available as multipart/related; "
                           "type=\"application/octet-stream\"");
        return;
    }
    uint32_t *numbers = sp_malloc(DW_MAX_FRAMES * sizeof *numbers);
    size_t n = parse_frames(w->extra, numbers, DW_MAX_FRAMES);
    if (n == 0) {
        free(numbers);
        http_respond_error(r, 400, "bad frame list '%.60s'", w->extra);
        return;
    }
    uint8_t *obj;
    size_t len;
    if (!fetch_instance(d, r, w, &obj, &len)) {
        free(numbers);
        return;
    }
    dicom_frame_t *frames = sp_calloc(n, sizeof *frames);
    char ts[65], err[256];
    int rc = dicom_frames(obj, len, numbers, n, want, frames, ts, err, sizeof err);
    free(obj);
    if (rc == 0)
        respond_octet_parts(r, frames, n, ts);
    else if (rc == SP_ENOTFOUND)
        http_respond_error(r, 404, "%s", err);
    else if (rc == SP_EUNKNOWN)
        http_respond_error(r, 406, "%s", err);
    else
        http_respond_error(r, 500, "%s", err);
    for (size_t i = 0; i < n; i++)
        free(frames[i].data);
    free(frames);
    free(numbers);
}

static void do_bulkdata(dicomweb_t *d, http_req_t *r, dw_req_t *w)
{
    char want[80];
    if (!accept_multipart(http_req_header(r, "Accept"), "application/octet-stream", want,
                          sizeof want)) {
        http_respond_error(r, 406,
                           "bulk data is available as multipart/related; "
                           "type=\"application/octet-stream\"");
        return;
    }
    if (strlen(w->extra) != 8 || strspn(w->extra, "0123456789abcdefABCDEF") != 8) {
        http_respond_error(r, 400, "bulk data path must end in a tag, GGGGEEEE");
        return;
    }
    uint8_t *obj;
    size_t len;
    if (!fetch_instance(d, r, w, &obj, &len))
        return;
    dicom_frame_t part = {0};
    char ts[65], err[256];
    int rc = dicom_bulkdata(obj, len, (uint32_t)strtoul(w->extra, NULL, 16), &part.data, &part.len,
                            ts, err, sizeof err);
    free(obj);
    if (rc == 0)
        respond_octet_parts(r, &part, 1, ts);
    else
        http_respond_error(r, rc == SP_ENOTFOUND ? 404 : 500, "%s", err);
    free(part.data);
}

typedef struct {
    int quality;
    int size;
} render_args_t;

static int render_arg(void *ctx, const char *key, const char *value)
{
    render_args_t *a = ctx;
    if (value == NULL)
        return 0;
    if (strcasecmp(key, "quality") == 0)
        a->quality = atoi(value);
    else if (strcasecmp(key, "viewport") == 0) {
        int vw = atoi(value);
        const char *comma = strchr(value, ',');
        int vh = comma ? atoi(comma + 1) : vw;
        int m = vw > vh ? vw : vh;
        if (m > 0 && m <= 8192)
            a->size = m;
    }
    return 0;
}

static void do_rendered(dicomweb_t *d, http_req_t *r, dw_req_t *w, bool thumbnail)
{
    const char *accept = http_req_header(r, "Accept");
    bool png = accept && strcasestr(accept, "image/png") &&
               !(strcasestr(accept, "image/jpeg") &&
                 strcasestr(accept, "image/jpeg") < strcasestr(accept, "image/png"));
    if (accept && !png && !strcasestr(accept, "image/jpeg") && !strcasestr(accept, "image/*") &&
        !strstr(accept, "*/*")) {
        http_respond_error(r, 406, "rendered images are image/jpeg or image/png");
        return;
    }
    render_args_t a = {.quality = 90, .size = thumbnail ? 128 : 0};
    http_req_args(r, render_arg, &a);
    uint32_t frame = 1;
    if (w->extra && parse_frames(w->extra, &frame, 1) != 1) {
        http_respond_error(r, 400, "bad frame number");
        return;
    }
    dw_req_t one = *w;
    dw_list_t list = {0};
    if (w->sop == NULL) {
        /* Study or series thumbnail: the middle instance of the listing. */
        int rc = list_resource(d, w, &list);
        if (rc != 0 || list.n == 0) {
            list_free(&list);
            http_respond_error(r, rc ? 503 : 404, "nothing to render");
            return;
        }
        one.sop = list.items[list.n / 2].sop;
    }
    uint8_t *obj;
    size_t len;
    bool ok = fetch_instance(d, r, &one, &obj, &len);
    list_free(&list);
    if (!ok)
        return;
    uint8_t *img = NULL;
    size_t ilen = 0;
    char err[256];
    int rc = dicom_render(obj, len, frame, a.size, png, a.quality, &img, &ilen, err, sizeof err);
    free(obj);
    if (rc != 0) {
        http_respond_error(r, rc == SP_ENOTFOUND ? 404 : 500, "%s", err);
        return;
    }
    http_respond_take(r, 200, png ? "image/png" : "image/jpeg", img, ilen);
}

/* ---- STOW-RS ---------------------------------------------------------------------------- */

typedef enum { MP_PREAMBLE, MP_AFTER_DELIM, MP_HEADERS, MP_BODY, MP_DONE, MP_ERROR } mp_state_t;

/* A streaming multipart/related parser: bytes in, whole parts out (each
 * part's body handed to on_part once its closing delimiter is seen). Holds
 * at most one part and one delimiter's worth of what follows it. */
struct mpart {
    char delim[80]; /* "\r\n--" boundary */
    size_t dlen;
    mp_state_t state;
    uint8_t *buf;
    size_t len, cap, scanned;
    size_t max_part;
    char part_type[128];
    char err[160];
};

static mpart_t *mpart_new(const char *boundary, size_t max_part)
{
    mpart_t *m = sp_calloc(1, sizeof *m);
    m->dlen = (size_t)sprintf(m->delim, "\r\n--%s", boundary);
    m->max_part = max_part;
    m->cap = 64 * 1024;
    m->buf = sp_malloc(m->cap);
    /* A leading CRLF is optional before the first delimiter: pretend one. */
    memcpy(m->buf, "\r\n", 2);
    m->len = 2;
    return m;
}

static void mpart_destroy(mpart_t **mp)
{
    if (*mp) {
        free((*mp)->buf);
        free(*mp);
        *mp = NULL;
    }
}

static void mpart_drop(mpart_t *m, size_t n)
{
    memmove(m->buf, m->buf + n, m->len - n);
    m->len -= n;
}

static void mpart_fail(mpart_t *m, const char *why)
{
    m->state = MP_ERROR;
    sp_strlcpy(m->err, why, sizeof m->err);
}

/* Reads the Content-Type of a part's header block (lines before the blank
 * line, which is not included). */
static void mpart_headers(mpart_t *m, const char *h, size_t n)
{
    m->part_type[0] = '\0';
    for (const char *p = h; p < h + n;) {
        const char *eol = memmem(p, (size_t)(h + n - p), "\r\n", 2);
        size_t ll = eol ? (size_t)(eol - p) : (size_t)(h + n - p);
        if (ll > 13 && strncasecmp(p, "Content-Type:", 13) == 0) {
            const char *v = p + 13;
            while (v < p + ll && (*v == ' ' || *v == '\t'))
                v++;
            size_t vl = (size_t)(p + ll - v);
            if (vl >= sizeof m->part_type)
                vl = sizeof m->part_type - 1;
            memcpy(m->part_type, v, vl);
            m->part_type[vl] = '\0';
        }
        p += ll + 2;
    }
}

typedef void (*mpart_part_fn)(void *ctx, const char *part_type, uint8_t *data, size_t len);

static void mpart_feed(mpart_t *m, const uint8_t *data, size_t n, mpart_part_fn fn, void *ctx)
{
    if (m->state == MP_DONE || m->state == MP_ERROR)
        return;
    if (m->len + n > m->cap) {
        size_t cap = m->cap;
        while (cap < m->len + n)
            cap *= 2;
        m->buf = sp_realloc(m->buf, cap);
        m->cap = cap;
    }
    memcpy(m->buf + m->len, data, n);
    m->len += n;
    for (;;) {
        switch (m->state) {
        case MP_PREAMBLE: {
            uint8_t *at = memmem(m->buf, m->len, m->delim, m->dlen);
            if (at == NULL) {
                if (m->len > 64 * 1024) {
                    mpart_fail(m, "no multipart boundary in the first 64 KiB");
                    return;
                }
                return;
            }
            mpart_drop(m, (size_t)(at - m->buf) + m->dlen);
            m->state = MP_AFTER_DELIM;
            break;
        }
        case MP_AFTER_DELIM: {
            size_t ws = 0;
            while (ws < m->len && (m->buf[ws] == ' ' || m->buf[ws] == '\t'))
                ws++;
            if (m->len - ws < 2)
                return;
            if (m->buf[ws] == '-' && m->buf[ws + 1] == '-') {
                m->state = MP_DONE;
                m->len = 0;
                return;
            }
            if (m->buf[ws] != '\r' || m->buf[ws + 1] != '\n') {
                mpart_fail(m, "garbage after a multipart boundary");
                return;
            }
            mpart_drop(m, ws + 2);
            m->state = MP_HEADERS;
            break;
        }
        case MP_HEADERS: {
            size_t hl;
            if (m->len >= 2 && m->buf[0] == '\r' && m->buf[1] == '\n') {
                hl = 0; /* a part without headers */
                mpart_headers(m, "", 0);
                mpart_drop(m, 2);
            } else {
                uint8_t *end = memmem(m->buf, m->len, "\r\n\r\n", 4);
                if (end == NULL) {
                    if (m->len > DW_PART_HEADERS_MAX) {
                        mpart_fail(m, "part headers over 16 KiB");
                        return;
                    }
                    return;
                }
                hl = (size_t)(end - m->buf);
                mpart_headers(m, (const char *)m->buf, hl);
                mpart_drop(m, hl + 4);
            }
            m->state = MP_BODY;
            m->scanned = 0;
            break;
        }
        case MP_BODY: {
            uint8_t *at = NULL;
            if (m->len >= m->dlen)
                at = memmem(m->buf + m->scanned, m->len - m->scanned, m->delim, m->dlen);
            if (at == NULL) {
                m->scanned = m->len >= m->dlen ? m->len - m->dlen + 1 : 0;
                if (m->len > m->max_part + m->dlen) {
                    mpart_fail(m, "a part is larger than max_object_size");
                    return;
                }
                return;
            }
            size_t plen = (size_t)(at - m->buf);
            fn(ctx, m->part_type, m->buf, plen);
            mpart_drop(m, plen + m->dlen);
            m->state = MP_AFTER_DELIM;
            /* A large part left a large buffer: give memory back. */
            if (m->cap > 1024 * 1024 && m->len < 64 * 1024) {
                m->cap = 64 * 1024 > m->len ? 64 * 1024 : m->len;
                m->buf = sp_realloc(m->buf, m->cap);
            }
            break;
        }
        case MP_DONE:
        case MP_ERROR: return;
        }
    }
}

/* One STOW-RS request in progress. */
typedef struct {
    dicomweb_t *d;
    http_req_t *r;
    const char *study; /* the path's study, or NULL */
    json_t *referenced, *failed;
    size_t stored, refused;
    char first_study[65];
    bool several_studies;
} stow_t;

static void stow_fail(stow_t *s, const char *cls, const char *sop, unsigned reason, const char *why)
{
    json_t *item = json_object();
    if (cls && cls[0])
        json_put_attr(item, 0x00081150, "UI", cls);
    if (sop && sop[0])
        json_put_attr(item, 0x00081155, "UI", sop);
    char rs[16];
    sp_fmt(rs, sizeof rs, "%u", reason);
    json_put_attr(item, 0x00081197, "US", rs);
    json_array_append_new(s->failed, item);
    s->refused++;
    log_warn("dicomweb: STOW-RS from %s: %s refused (0x%04X): %s", http_req_user(s->r),
             sop && sop[0] ? sop : "(unidentified part)", reason, why);
}

/* Checks and stores one part, exactly as a C-STORE of the same object
 * would be: pre-scan, parse, archive policy, Part-10 framing with our
 * header, quorum put. */
static void stow_part(void *ctx, const char *part_type, uint8_t *data, size_t len)
{
    stow_t *s = ctx;
    dicomweb_t *d = s->d;
    if (part_type[0] && strncasecmp(part_type, "application/dicom", 17) != 0) {
        {
            stow_fail(s, NULL, NULL, DICOM_CANNOT_UNDERSTAND,
                      "part is not application/dicom (metadata + bulk data uploads are not "
                      "supported)");
            return;
        }
    }
    if (part_type[0] && part_type[17] != '\0' && part_type[17] != ';' && part_type[17] != ' ') {
        stow_fail(s, NULL, NULL, DICOM_CANNOT_UNDERSTAND, "part is not application/dicom");
        return;
    }
    part10_meta_t meta;
    if (part10_split(data, len, &meta) != 0) {
        stow_fail(s, NULL, NULL, DICOM_CANNOT_UNDERSTAND, "not a DICOM Part-10 object");
        return;
    }
    const uint8_t *ds = data + meta.dataset_offset;
    size_t dslen = len - meta.dataset_offset;
    char err[256];
    dsscan_limits_t lim = dsscan_limits_default();
    lim.max_depth = (uint32_t)d->cfg.max_depth;
    lim.max_bytes = d->cfg.max_object_size;
    if (dsscan_check(ds, dslen, dsscan_syntax_of(meta.ts), &lim, err, sizeof err) != 0) {
        stow_fail(s, meta.sop_class, meta.sop_instance, DICOM_CANNOT_UNDERSTAND, err);
        return;
    }
    attrs_t attrs = {0};
    if (dicom_parse_attrs(ds, dslen, meta.ts, &attrs, err, sizeof err) != 0) {
        attrs_clear(&attrs);
        {
            stow_fail(s, meta.sop_class, meta.sop_instance, DICOM_CANNOT_UNDERSTAND, err);
            return;
        }
    }
    const char *sop =
        meta.sop_instance[0] ? meta.sop_instance : attrs_str(&attrs, ATTR_SOP_INSTANCE_UID);
    const char *cls = meta.sop_class[0] ? meta.sop_class : attrs_str(&attrs, ATTR_SOP_CLASS_UID);
    dicom_peer_t peer = {
        .calling_ae = http_req_user(s->r), .called_ae = "DICOMWEB", .peer_host = "http"};
    dicom_store_t req = {.peer = &peer,
                         .sop_class_uid = cls,
                         .sop_instance_uid = sop,
                         .transfer_syntax_uid = meta.ts,
                         .dataset = ds,
                         .dataset_len = dslen,
                         .attrs = &attrs};
    uint16_t status = scp_check_store(&req, err, sizeof err);
    if (status == DICOM_SUCCESS && cls[0] == '\0') {
        status = DICOM_CANNOT_UNDERSTAND;
        sp_fmt(err, sizeof err, "SOPClassUID missing");
    }
    const char *study = attrs_str(&attrs, ATTR_STUDY_INSTANCE_UID);
    if (status == DICOM_SUCCESS && s->study && strcmp(study, s->study) != 0) {
        status = DICOM_DATASET_MISMATCH;
        sp_fmt(err, sizeof err, "StudyInstanceUID %.64s is not the study posted to", study);
    }
    if (status != DICOM_SUCCESS) {
        stow_fail(s, cls, sop, status, err);
        attrs_clear(&attrs);
        return;
    }
    uint8_t *object;
    size_t olen;
    if (part10_make(ds, dslen, cls, sop, meta.ts, &object, &olen) != 0) {
        stow_fail(s, cls, sop, DICOM_CANNOT_UNDERSTAND, "cannot frame the Part-10 object");
        attrs_clear(&attrs);
        return;
    }
    transport_body_t *body = transport_body_new(object, object, olen, NULL, NULL);
    backend_put_result_t res;
    int rc = backend_put(d->cfg.backend, &attrs, body, &res);
    transport_body_release(&body);
    if (rc == 0) {
        json_t *item = json_object();
        json_put_attr(item, 0x00081150, "UI", cls);
        json_put_attr(item, 0x00081155, "UI", sop);
        char *url = resource_url(s->r, study, attrs_str(&attrs, ATTR_SERIES_INSTANCE_UID), sop);
        json_put_attr(item, 0x00081190, "UR", url);
        free(url);
        json_array_append_new(s->referenced, item);
        s->stored++;
        if (s->first_study[0] == '\0')
            sp_strlcpy(s->first_study, study, sizeof s->first_study);
        else if (strcmp(s->first_study, study) != 0)
            s->several_studies = true;
        if (res.superseded > 0)
            log_warn("duplicate: %s of study %s from %s (STOW-RS) differs from the stored copy; "
                     "acknowledged by the duplicates policy (both versions kept)",
                     sop, study, http_req_user(s->r));
    } else if (rc == SP_ECONFLICT) {
        stow_fail(s, cls, sop, SCP_STATUS_DUPLICATE_SOP,
                  "SOP Instance UID already stored with different content");
    } else if (rc == SP_EINVAL) {
        sp_fmt(err, sizeof err, "refused by the replicas: %s", res.detail);
        stow_fail(s, cls, sop, DICOM_CANNOT_UNDERSTAND, err);
    } else {
        sp_fmt(err, sizeof err, "stored on %d replicas, %d needed: %s", res.acknowledged,
               res.needed, res.detail);
        stow_fail(s, cls, sop, DICOM_OUT_OF_RESOURCES, err);
    }
    attrs_clear(&attrs);
}

typedef struct {
    mpart_t *mp;
    stow_t stow;
    char error[200]; /* refused before any part: answered at end() */
} stow_state_t;

static void stow_begin(dicomweb_t *d, http_req_t *r, dw_req_t *w)
{
    const char *ct = http_req_header(r, "Content-Type");
    char boundary[128] = "", type[128] = "";
    size_t ctl = ct ? strlen(ct) : 0;
    if (ct == NULL || strncasecmp(ct, "multipart/related", 17) != 0 ||
        !media_param(ct, ctl, "boundary", boundary, sizeof boundary) || boundary[0] == '\0' ||
        strlen(boundary) > 70) {
        http_respond_error(r, 415,
                           "STOW-RS takes multipart/related; type=\"application/dicom\"; "
                           "boundary=...");
        return;
    }
    if (media_param(ct, ctl, "type", type, sizeof type) &&
        strcasecmp(type, "application/dicom") != 0) {
        http_respond_error(r, 415, "only type=\"application/dicom\" is supported, not '%s'", type);
        return;
    }
    stow_state_t *st = sp_calloc(1, sizeof *st);
    st->mp = mpart_new(boundary, d->cfg.max_object_size);
    st->stow = (stow_t){
        .d = d, .r = r, .study = w->study, .referenced = json_array(), .failed = json_array()};
    w->mp = (mpart_t *)st; /* owned through the request state */
}

static void stow_end(dicomweb_t *d, http_req_t *r, dw_req_t *w)
{
    (void)d;
    stow_state_t *st = (stow_state_t *)w->mp;
    stow_t *s = &st->stow;
    mpart_t *m = st->mp;
    if (m->state == MP_ERROR || m->state != MP_DONE) {
        const char *why = m->state == MP_ERROR ? m->err : "body ended before the closing boundary";
        if (s->stored == 0)
            http_respond_error(r, 400, "malformed multipart body: %s", why);
        else
            http_respond_error(r, 400,
                               "malformed multipart body: %s; the %zu instances before it were "
                               "stored",
                               why, s->stored);
        return;
    }
    if (s->stored + s->refused == 0) {
        http_respond_error(r, 400, "no parts in the body");
        return;
    }
    json_t *o = json_object();
    if (s->first_study[0] && !s->several_studies) {
        char *url = resource_url(r, s->first_study, NULL, NULL);
        json_put_attr(o, 0x00081190, "UR", url);
        free(url);
    } else if (w->study) {
        char *url = resource_url(r, w->study, NULL, NULL);
        json_put_attr(o, 0x00081190, "UR", url);
        free(url);
    }
    if (json_array_size(s->failed)) {
        json_t *a = json_object();
        json_object_set_new(a, "vr", json_string("SQ"));
        json_object_set(a, "Value", s->failed);
        json_object_set_new(o, "00081198", a);
    }
    if (json_array_size(s->referenced)) {
        json_t *a = json_object();
        json_object_set_new(a, "vr", json_string("SQ"));
        json_object_set(a, "Value", s->referenced);
        json_object_set_new(o, "00081199", a);
    }
    char *text = json_dumps(o, JSON_COMPACT | JSON_SORT_KEYS);
    json_decref(o);
    unsigned status = s->refused == 0 ? 200 : s->stored == 0 ? 409 : 202;
    log_info("dicomweb: STOW-RS from %s: %zu stored, %zu refused", http_req_user(r), s->stored,
             s->refused);
    http_respond_take(r, status, "application/dicom+json", text, strlen(text));
}

/* ---- routing ------------------------------------------------------------------------------ */

static void dw_req_free(dw_req_t *w)
{
    if (w == NULL)
        return;
    if (w->op == OP_STOW && w->mp) {
        stow_state_t *st = (stow_state_t *)w->mp;
        mpart_destroy(&st->mp);
        json_decref(st->stow.referenced);
        json_decref(st->stow.failed);
        free(st);
    }
    free(w->study);
    free(w->series);
    free(w->sop);
    free(w->extra);
    free(w);
}

/* Splits the path into at most DW_MAX_SEGMENTS segments; false when there
 * are more. */
static bool split_path(const char *path, char **seg, size_t *n)
{
    *n = 0;
    for (const char *p = path; *p;) {
        while (*p == '/')
            p++;
        if (*p == '\0')
            break;
        size_t len = strcspn(p, "/");
        if (*n == DW_MAX_SEGMENTS)
            return false;
        seg[(*n)++] = sp_strndup(p, len);
        p += len;
    }
    return true;
}

static bool seg_is(char **seg, size_t n, size_t i, const char *word)
{
    return i < n && strcmp(seg[i], word) == 0;
}

/* Routes a path to an operation; answers 404/400/405 itself and returns
 * false when there is nothing to do. */
static bool dw_route(http_req_t *r, dw_req_t *w, char **seg, size_t n)
{
    bool get = strcmp(http_req_method(r), "GET") == 0 || strcmp(http_req_method(r), "HEAD") == 0;
    bool post = strcmp(http_req_method(r), "POST") == 0;
    if (n == 0) {
        http_respond_error(r, 404, "no such resource: try /studies");
        return false;
    }
    /* Top-level searches. */
    if (n == 1 && (seg_is(seg, n, 0, "series") || seg_is(seg, n, 0, "instances"))) {
        w->op = OP_QIDO;
        w->level = seg_is(seg, n, 0, "series") ? LEVEL_SERIES : LEVEL_IMAGE;
        goto method;
    }
    if (!seg_is(seg, n, 0, "studies")) {
        http_respond_error(r, 404, "no such resource");
        return false;
    }
    if (n == 1) {
        w->op = post ? OP_STOW : OP_QIDO;
        w->level = LEVEL_STUDY;
        goto method;
    }
    w->study = sp_strdup(seg[1]);
    if (!uid_ok(w->study))
        goto bad_uid;
    http_req_set_study(r, w->study);
    size_t i = 2;
    w->level = LEVEL_STUDY;
    if (seg_is(seg, n, i, "series") && i + 1 < n) {
        w->series = sp_strdup(seg[i + 1]);
        if (!uid_ok(w->series))
            goto bad_uid;
        w->level = LEVEL_SERIES;
        i += 2;
        if (seg_is(seg, n, i, "instances") && i + 1 < n) {
            w->sop = sp_strdup(seg[i + 1]);
            if (!uid_ok(w->sop))
                goto bad_uid;
            w->level = LEVEL_IMAGE;
            i += 2;
        }
    }
    if (i == n) {
        w->op = post && w->level == LEVEL_STUDY ? OP_STOW : OP_RETRIEVE;
        goto method;
    }
    if (i + 1 == n && seg_is(seg, n, i, "series") && w->level == LEVEL_STUDY) {
        w->op = OP_QIDO;
        w->level = LEVEL_SERIES;
        goto method;
    }
    if (i + 1 == n && seg_is(seg, n, i, "instances") && w->level < LEVEL_IMAGE) {
        w->op = OP_QIDO;
        w->level = LEVEL_IMAGE;
        goto method;
    }
    if (i + 1 == n && seg_is(seg, n, i, "metadata")) {
        w->op = OP_METADATA;
        goto method;
    }
    if (i + 1 == n && (seg_is(seg, n, i, "rendered") || seg_is(seg, n, i, "thumbnail"))) {
        w->op = seg_is(seg, n, i, "rendered") ? OP_RENDERED : OP_THUMBNAIL;
        if (w->op == OP_RENDERED && w->level != LEVEL_IMAGE) {
            http_respond_error(r, 404, "rendered is served per instance or frame");
            return false;
        }
        goto method;
    }
    if (w->level == LEVEL_IMAGE && seg_is(seg, n, i, "frames") && i + 1 < n) {
        w->extra = sp_strdup(seg[i + 1]);
        if (i + 2 == n)
            w->op = OP_FRAMES;
        else if (i + 3 == n && seg_is(seg, n, i + 2, "rendered"))
            w->op = OP_RENDERED;
        else if (i + 3 == n && seg_is(seg, n, i + 2, "thumbnail"))
            w->op = OP_THUMBNAIL;
        else {
            http_respond_error(r, 404, "no such resource");
            return false;
        }
        goto method;
    }
    if (w->level == LEVEL_IMAGE && seg_is(seg, n, i, "bulkdata") && i + 2 == n) {
        w->extra = sp_strdup(seg[i + 1]);
        w->op = OP_BULKDATA;
        goto method;
    }
    http_respond_error(r, 404, "no such resource");
    return false;
method:
    if ((w->op == OP_STOW && !post) || (w->op != OP_STOW && !get)) {
        http_add_header(r, "Allow", w->op == OP_STOW ? "GET, POST" : "GET");
        http_respond_error(r, 405, "method %s not allowed here", http_req_method(r));
        return false;
    }
    return true;
bad_uid:
    http_respond_error(r, 400, "malformed UID in the path");
    return false;
}

static void dw_begin(void *ctx, http_req_t *r)
{
    dicomweb_t *d = ctx;
    dw_req_t *w = sp_calloc(1, sizeof *w);
    http_req_set_state(r, w);
    char *seg[DW_MAX_SEGMENTS];
    size_t n = 0;
    bool ok = split_path(http_req_path(r), seg, &n);
    if (!ok)
        http_respond_error(r, 404, "no such resource");
    else if (dw_route(r, w, seg, n) && w->op == OP_STOW)
        stow_begin(d, r, w);
    for (size_t i = 0; i < n; i++)
        free(seg[i]);
}

static int dw_body(void *ctx, http_req_t *r, const uint8_t *data, size_t n)
{
    (void)ctx;
    dw_req_t *w = http_req_state(r);
    if (w == NULL || w->op != OP_STOW || w->mp == NULL)
        return 0; /* a body nobody reads (the request is answered at the end) */
    stow_state_t *st = (stow_state_t *)w->mp;
    mpart_feed(st->mp, data, n, stow_part, &st->stow);
    return 0;
}

static void dw_end(void *ctx, http_req_t *r)
{
    dicomweb_t *d = ctx;
    dw_req_t *w = http_req_state(r);
    switch (w->op) {
    case OP_QIDO: do_qido(d, r, w); break;
    case OP_RETRIEVE: do_retrieve(d, r, w); break;
    case OP_METADATA: do_metadata(d, r, w); break;
    case OP_FRAMES: do_frames(d, r, w); break;
    case OP_BULKDATA: do_bulkdata(d, r, w); break;
    case OP_RENDERED: do_rendered(d, r, w, false); break;
    case OP_THUMBNAIL: do_rendered(d, r, w, true); break;
    case OP_STOW: stow_end(d, r, w); break;
    case OP_NONE: http_respond_error(r, 404, "no such resource"); break;
    }
}

static void dw_cleanup(void *ctx, http_req_t *r)
{
    (void)ctx;
    dw_req_free(http_req_state(r));
    http_req_set_state(r, NULL);
}

http_handlers_t dicomweb_handlers(dicomweb_t *d)
{
    return (http_handlers_t){
        .ctx = d, .begin = dw_begin, .body = dw_body, .end = dw_end, .cleanup = dw_cleanup};
}
