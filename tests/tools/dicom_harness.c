/* dicom_harness.c - a tiny in-memory PACS on top of router/dicom.h, for
 * tests/cluster/test_dicom_adapter.py. It starts the adapter, prints the
 * bound port on stdout, keeps every stored instance in memory as Part-10
 * bytes, answers C-FIND by matching (common/match.h) over what it holds, and
 * serves C-MOVE (destinations from the command line, AE=host:port) and C-GET
 * from memory. It applies the router's own store policy (scp_check_store()
 * from router/scp.c), so the adapter's tests see the archive's answers. Stops cleanly on SIGTERM or
 * SIGINT, freeing everything.
 *
 * Usage: dicom_harness [--ae TITLE] [--port N] [--workers N] [--queue N]
 *                      [--acse-timeout S] [--dimse-timeout S] [--max-per-address N]
 *                      [--max-connections N] [--min-rate BYTES] [--find-delay-ms MS]
 *                      [--max-object-size BYTES] [--receive-memory BYTES]
 *                      [--receive-wait S] [--max-depth N]
 *                      [--tls-cert PEM --tls-key PEM [--tls-ca PEM] [--tls-port N]
 *                       [--no-verify-peer] [--no-plain] [--tls-dest AE=host:port ...]]
 *                      [AE=host:port ...]
 *
 * With --tls-cert it also serves DICOM TLS and prints the TLS port on a
 * second line (the first is the plain port, -1 with --no-plain). Each
 * accepted C-STORE logs the peer's certificate subject ("cert=...").
 *
 * Threads: handlers run on adapter worker threads; the instance list is
 * guarded by one mutex. Instances are never removed or replaced before exit,
 * so pointers into them stay valid without the lock. */
#include "dicom.h"
#include "part10.h"
#include "scp.h"

#include "attrs.h"
#include "base.h"
#include "log.h"
#include "match.h"

#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct {
    uint8_t *part10;
    size_t len;
    attrs_t attrs;
} instance_t;

typedef struct {
    char ae[17];
    char host[128];
    int port;
} dest_t;

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static instance_t *g_inst;
static size_t g_count, g_cap;
static dest_t g_dests[16];
static size_t g_ndests;
static dicom_endpoint_t g_tls_dests[16]; /* those of g_dests reached over TLS */
static size_t g_ntls_dests;
static int g_find_delay_ms; /* test knob: pause before each C-FIND match */

static uint16_t on_store(void *ctx, const dicom_store_t *req, char *comment, size_t comment_len)
{
    (void)ctx;
    log_info("C-STORE of %s from %s cert=%s", req->sop_instance_uid, req->peer->calling_ae,
             req->peer->cert_subject ? req->peer->cert_subject : "(none)");
    uint16_t status = scp_check_store(req, comment, comment_len);
    if (status != DICOM_SUCCESS) {
        log_warn("C-STORE of %s from %s refused, status 0x%04X: %s", req->sop_instance_uid,
                 req->peer->calling_ae, status, comment);
        return status;
    }
    uint8_t *p10 = NULL;
    size_t len = 0;
    if (part10_make(req->dataset, req->dataset_len, req->sop_class_uid, req->sop_instance_uid,
                    req->transfer_syntax_uid, &p10, &len) != 0) {
        sp_strlcpy(comment, "cannot build Part-10", comment_len);
        return DICOM_OUT_OF_RESOURCES;
    }
    pthread_mutex_lock(&g_mu);
    for (size_t i = 0; i < g_count; i++) {
        if (strcmp(attrs_str(&g_inst[i].attrs, ATTR_SOP_INSTANCE_UID), req->sop_instance_uid) ==
            0) {
            pthread_mutex_unlock(&g_mu);
            free(p10);
            return DICOM_SUCCESS; /* first copy wins */
        }
    }
    if (g_count == g_cap) {
        g_cap = g_cap ? 2 * g_cap : 16;
        g_inst = sp_realloc(g_inst, g_cap * sizeof(*g_inst));
    }
    instance_t *in = &g_inst[g_count++];
    memset(in, 0, sizeof(*in));
    in->part10 = p10;
    in->len = len;
    attrs_copy(&in->attrs, req->attrs);
    pthread_mutex_unlock(&g_mu);
    return DICOM_SUCCESS;
}

/* True when the instance matches every non-empty key whose attribute lives
 * at or above the query level. */
static bool inst_matches(const instance_t *in, const attrs_t *keys, level_t level)
{
    for (int i = 0; i < ATTR_COUNT; i++) {
        const char *k = attrs_get(keys, (attr_id_t)i);
        if (k == NULL || k[0] == 0 || i == ATTR_SPECIFIC_CHARACTER_SET)
            continue;
        const attr_info_t *ai = attr_info((attr_id_t)i);
        if (ai->level > level || i >= ATTR_STORED_COUNT)
            continue;
        if (!match_value(ai->kind, k, attrs_get(&in->attrs, (attr_id_t)i),
                         MATCH_PN_CASE_INSENSITIVE))
            return false;
    }
    return true;
}

/* The attribute that identifies a record at a level. */
static attr_id_t level_key(level_t level)
{
    switch (level) {
    case LEVEL_PATIENT: return ATTR_PATIENT_ID;
    case LEVEL_STUDY: return ATTR_STUDY_INSTANCE_UID;
    case LEVEL_SERIES: return ATTR_SERIES_INSTANCE_UID;
    default: return ATTR_SOP_INSTANCE_UID;
    }
}

/* Collects indexes of matching instances, one per record at the level when
 * dedup is set. The caller frees *out. */
static size_t collect(const attrs_t *keys, level_t level, bool dedup, size_t **out)
{
    pthread_mutex_lock(&g_mu);
    size_t n = 0;
    size_t *idx = sp_calloc(g_count + 1, sizeof(size_t));
    attr_id_t uk = level_key(level);
    for (size_t i = 0; i < g_count; i++) {
        if (!inst_matches(&g_inst[i], keys, level))
            continue;
        bool dup = false;
        for (size_t j = 0; dedup && j < n && !dup; j++)
            dup =
                strcmp(attrs_str(&g_inst[idx[j]].attrs, uk), attrs_str(&g_inst[i].attrs, uk)) == 0;
        if (!dup)
            idx[n++] = i;
    }
    pthread_mutex_unlock(&g_mu);
    *out = idx;
    return n;
}

static uint16_t on_find(void *ctx, dicom_find_t *q, char *comment, size_t comment_len)
{
    (void)ctx;
    (void)comment;
    (void)comment_len;
    size_t *idx;
    size_t n = collect(dicom_find_keys(q), dicom_find_level(q), true, &idx);
    uint16_t status = DICOM_SUCCESS;
    for (size_t i = 0; i < n; i++) {
        if (g_find_delay_ms > 0) {
            struct timespec ts = {g_find_delay_ms / 1000,
                                  (long)(g_find_delay_ms % 1000) * 1000000L};
            nanosleep(&ts, NULL);
        }
        if (dicom_find_emit(q, &g_inst[idx[i]].attrs) != 0) {
            status = DICOM_CANCEL;
            break;
        }
    }
    free(idx);
    return status;
}

static uint16_t retrieve(dicom_retrieve_t *r, const dest_t *d, char *comment, size_t comment_len)
{
    size_t *idx;
    size_t n = collect(dicom_retrieve_keys(r), dicom_retrieve_level(r), false, &idx);
    dicom_instance_kind_t *kinds = sp_calloc(n + 1, sizeof(*kinds));
    for (size_t i = 0; i < n; i++) {
        kinds[i].sop_class_uid = attrs_str(&g_inst[idx[i]].attrs, ATTR_SOP_CLASS_UID);
        kinds[i].transfer_syntax_uid = attrs_str(&g_inst[idx[i]].attrs, ATTR_TRANSFER_SYNTAX_UID);
    }
    char err[256];
    uint16_t status = DICOM_SUCCESS;
    if (dicom_retrieve_begin(r, d ? d->host : NULL, d ? d->port : 0, kinds, n, err, sizeof(err)) !=
        0) {
        sp_strlcpy(comment, err, comment_len);
        status = DICOM_REFUSED_SUBOPS;
    } else {
        for (size_t i = 0; i < n; i++) {
            if (dicom_retrieve_send(r, g_inst[idx[i]].part10, g_inst[idx[i]].len) < 0) {
                status = DICOM_CANCEL;
                break;
            }
        }
    }
    free(kinds);
    free(idx);
    return status;
}

static uint16_t on_move(void *ctx, dicom_retrieve_t *r, char *comment, size_t comment_len)
{
    (void)ctx;
    const char *dest = dicom_retrieve_destination(r);
    for (size_t i = 0; i < g_ndests; i++)
        if (strcmp(g_dests[i].ae, dest) == 0)
            return retrieve(r, &g_dests[i], comment, comment_len);
    snprintf(comment, comment_len, "unknown move destination '%s'", dest);
    return DICOM_MOVE_DEST_UNKNOWN;
}

static uint16_t on_get(void *ctx, dicom_retrieve_t *r, char *comment, size_t comment_len)
{
    (void)ctx;
    return retrieve(r, NULL, comment, comment_len);
}

static int parse_dest(const char *arg, dest_t *d)
{
    const char *eq = strchr(arg, '=');
    const char *colon = eq ? strrchr(eq, ':') : NULL;
    if (!eq || !colon || eq == arg || (size_t)(eq - arg) > 16 || colon == eq + 1)
        return SP_EINVAL;
    memset(d, 0, sizeof(*d));
    memcpy(d->ae, arg, (size_t)(eq - arg));
    size_t hl = (size_t)(colon - eq - 1);
    if (hl >= sizeof(d->host))
        return SP_EINVAL;
    memcpy(d->host, eq + 1, hl);
    d->port = atoi(colon + 1);
    return d->port > 0 ? 0 : SP_EINVAL;
}

int main(int argc, char **argv)
{
    log_init("dicom_harness", LOG_INFO);
    dicom_config_t cfg;
    dicom_config_defaults(&cfg);
    char *ae = "SHARDPACS";
    int tls_port = 0;
    cfg.bind_address = "127.0.0.1";
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--ae") == 0 && i + 1 < argc) {
            ae = argv[++i];
        } else if (strcmp(argv[i], "--port") == 0 && i + 1 < argc) {
            cfg.port = atoi(argv[++i]);
        } else if (strcmp(argv[i], "--workers") == 0 && i + 1 < argc) {
            cfg.workers = atoi(argv[++i]);
        } else if (strcmp(argv[i], "--queue") == 0 && i + 1 < argc) {
            cfg.queue = atoi(argv[++i]);
        } else if (strcmp(argv[i], "--find-delay-ms") == 0 && i + 1 < argc) {
            g_find_delay_ms = atoi(argv[++i]);
        } else if (strcmp(argv[i], "--acse-timeout") == 0 && i + 1 < argc) {
            cfg.acse_timeout_s = atoi(argv[++i]);
        } else if (strcmp(argv[i], "--dimse-timeout") == 0 && i + 1 < argc) {
            cfg.dimse_timeout_s = atoi(argv[++i]);
        } else if (strcmp(argv[i], "--max-per-address") == 0 && i + 1 < argc) {
            cfg.max_per_address = atoi(argv[++i]);
        } else if (strcmp(argv[i], "--max-connections") == 0 && i + 1 < argc) {
            cfg.max_connections = atoi(argv[++i]);
        } else if (strcmp(argv[i], "--min-rate") == 0 && i + 1 < argc) {
            cfg.min_rate = (size_t)atol(argv[++i]);
        } else if (strcmp(argv[i], "--max-object-size") == 0 && i + 1 < argc) {
            cfg.max_object_size = (size_t)atol(argv[++i]);
        } else if (strcmp(argv[i], "--receive-memory") == 0 && i + 1 < argc) {
            cfg.receive_memory = (size_t)atol(argv[++i]);
        } else if (strcmp(argv[i], "--receive-wait") == 0 && i + 1 < argc) {
            cfg.receive_wait_s = atoi(argv[++i]);
        } else if (strcmp(argv[i], "--max-depth") == 0 && i + 1 < argc) {
            cfg.max_depth = atoi(argv[++i]);
        } else if (strcmp(argv[i], "--tls-cert") == 0 && i + 1 < argc) {
            cfg.tls = true;
            cfg.tls_certificate = argv[++i];
            cfg.tls_port = 0;
        } else if (strcmp(argv[i], "--tls-key") == 0 && i + 1 < argc) {
            cfg.tls_key = argv[++i];
        } else if (strcmp(argv[i], "--tls-ca") == 0 && i + 1 < argc) {
            cfg.tls_ca = argv[++i];
        } else if (strcmp(argv[i], "--tls-port") == 0 && i + 1 < argc) {
            tls_port = atoi(argv[++i]);
        } else if (strcmp(argv[i], "--no-verify-peer") == 0) {
            cfg.tls_verify_peer = false;
        } else if (strcmp(argv[i], "--no-plain") == 0) {
            cfg.plain = false;
        } else if (strcmp(argv[i], "--tls-dest") == 0 && i + 1 < argc &&
                   g_ndests < SP_ARRAY_LEN(g_dests) &&
                   parse_dest(argv[i + 1], &g_dests[g_ndests]) == 0) {
            i++;
            g_tls_dests[g_ntls_dests++] =
                (dicom_endpoint_t){g_dests[g_ndests].host, g_dests[g_ndests].port};
            g_ndests++;
        } else if (g_ndests < SP_ARRAY_LEN(g_dests) &&
                   parse_dest(argv[i], &g_dests[g_ndests]) == 0) {
            g_ndests++;
        } else {
            fprintf(stderr,
                    "usage: %s [--ae T] [--port N] [--workers N] [--queue N] "
                    "[--acse-timeout S] [--dimse-timeout S] [--max-per-address N] "
                    "[--max-connections N] [--min-rate B] [--find-delay-ms MS] "
                    "[--max-object-size B] [--receive-memory B] [--receive-wait S] "
                    "[--max-depth N] [--tls-cert PEM --tls-key PEM [--tls-ca PEM] "
                    "[--tls-port N] [--no-verify-peer] [--no-plain] [--tls-dest AE=host:port]] "
                    "[AE=host:port ...]\n",
                    argv[0]);
            return 2;
        }
    }
    cfg.ae_title = ae;
    cfg.tls_port = tls_port;
    cfg.tls_destinations = g_tls_dests;
    cfg.ntls_destinations = g_ntls_dests;

    /* Block the stop signals in every thread; main waits for them. */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);

    dicom_handlers_t h = {.store = on_store, .find = on_find, .move = on_move, .get = on_get};
    dicom_server_t *srv = NULL;
    char err[256];
    int rc = dicom_server_start(&cfg, &h, &srv, err, sizeof(err));
    if (rc != 0) {
        fprintf(stderr, "dicom_harness: %s\n", err);
        return 1;
    }
    printf("%d\n", dicom_server_port(srv));
    if (cfg.tls)
        printf("%d\n", dicom_server_tls_port(srv));
    fflush(stdout);

    int sig = 0;
    sigwait(&set, &sig);
    dicom_server_stop(&srv);
    for (size_t i = 0; i < g_count; i++) {
        free(g_inst[i].part10);
        attrs_clear(&g_inst[i].attrs);
    }
    free(g_inst);
    log_info("stopped after signal %d with %zu instances", sig, g_count);
    return 0;
}
