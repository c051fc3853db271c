/* router.c - shardpacs-router: the DICOM front door. Loads its configuration
 * and keys, joins cluster gossip as a non-storage member (membership.c, over
 * a transport server of its own that answers gossip only), takes placement
 * from the gossiped view (backend.c) and serves DICOM associations through
 * the adapter (dicom.h), answering C-ECHO, C-STORE, C-FIND, C-MOVE and C-GET
 * with the handlers in scp.c.
 *
 * Threads: the main thread sets up, waits for the first storage members and
 * then for SIGINT/SIGTERM; the DICOM worker threads call the handlers, the
 * transport's workers answer gossip, membership runs a thread of its own.
 * Settings are read-only after start-up. */
#include "../common/admin.h"
#include "../common/audit.h"
#include "../common/base.h"
#include "../common/config.h"
#include "../common/keys.h"
#include "../common/log.h"
#include "../common/membership.h"
#include "../common/notify.h"
#include "../common/transport.h"
#include "../common/wire.h"
#include "access.h"
#include "auth.h"
#include "backend.h"
#include "dicom.h"
#include "dicomweb.h"
#include "http.h"
#include "scp.h"

#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define ROUTER_MAX_DESTS 256

typedef struct {
    char *id;
    char *listen;
    char *site;
    char *ae_title;
    char *bind;
    int port;
    int workers;
    int queue;
    int acse_timeout;
    int dimse_timeout;
    int max_pdu;
    char *allowed_callers;
    char *duplicates;
    wire_policy_t duplicates_policy; /* parsed from duplicates by settings_check */
    int max_per_address;
    int max_connections;
    size_t min_rate;
    size_t max_object_size;
    size_t max_identifier_size;
    size_t receive_memory;
    int receive_wait;
    int max_depth;
    char *key_pair;
    char *cluster_keys;
    int replicas;
    int write_quorum;
    int store_timeout;
    size_t store_min_rate;
    int query_timeout;
    int fetch_timeout;
    int avoid_failed_ms;
    int join_timeout;
    membership_settings_t cluster;
    int max_results;
    bool case_insensitive_names;
    char *log_level;
    char *log_format;
    bool plain;
    bool tls;
    int tls_port;
    char *tls_certificate;
    char *tls_key;
    char *tls_ca;
    bool tls_verify_peer;
    char *tls_ciphers;
    char *access_rules;
    audit_settings_t audit;
    admin_settings_t admin;
    /* [http]: the HTTP front door (DICOMweb, the viewer) */
    struct {
        char *bind;
        int port;
        int workers;
        size_t max_body;
        char *cors_origins;
        char *public_root;
        char *root;
        char *viewer_dir;
        char *tls_cert;
        char *tls_key;
        bool auth;
        char *users;
        char *token_key;
        int token_ttl;
        int timeout;
        size_t metadata_cache;
    } http;
    /* [destinations] entries, "AE = host:port [tls]" */
    scp_destination_t dests[ROUTER_MAX_DESTS];
    size_t ndests;
    dicom_endpoint_t tls_dests[ROUTER_MAX_DESTS]; /* those marked tls (host borrowed) */
    size_t ntls_dests;
} router_settings_t;

/* Parses one [destinations] line: "AE = host:port", or "AE = host:port tls"
 * for a destination reached over DICOM TLS. */
static int parse_destination(void *target, const char *name, const char *value, char *why,
                             size_t len)
{
    router_settings_t *s = target;
    char addr[300];
    sp_strlcpy(addr, value, sizeof addr);
    bool tls = false;
    char *space = strpbrk(addr, " \t");
    if (space != NULL) {
        char *flag = space + strspn(space, " \t");
        tls = strcmp(flag, "tls") == 0;
        *space = 0;
        if (!tls)
            flag = NULL;
        if (flag == NULL) {
            sp_fmt(why, len, "expects HOST:PORT, optionally followed by 'tls', not '%s'", value);
            return -1;
        }
    }
    const char *colon = strrchr(addr, ':');
    char *end = NULL;
    long port = colon ? strtol(colon + 1, &end, 10) : 0;
    if (s->ndests == ROUTER_MAX_DESTS || strlen(name) > 16 || colon == NULL || colon == addr ||
        *end != '\0' || port < 1 || port > 65535) {
        sp_fmt(why, len, "expects an AE title of at most 16 characters = HOST:PORT [tls], not '%s'",
               value);
        return -1;
    }
    scp_destination_t *d = &s->dests[s->ndests++];
    sp_strlcpy(d->ae_title, name, sizeof d->ae_title);
    d->host = sp_strndup(addr, (size_t)(colon - addr));
    d->port = (int)port;
    if (tls)
        s->tls_dests[s->ntls_dests++] = (dicom_endpoint_t){d->host, d->port};
    return 0;
}

#define OPT(sec, key, type, field, def, lo, hi, help)                                              \
    {                                                                                              \
        sec, key, type, offsetof(router_settings_t, field), def, lo, hi, help, NULL                \
    }

static const config_option_t router_options[] = {
    OPT("router", "id", CONFIG_STRING, id, "router1", 0, 0,
        "Member name of this router, as listed in the cluster keys"),
    OPT("router", "listen", CONFIG_STRING, listen, "tcp://127.0.0.1:7400", 0, 0,
        "ZeroMQ endpoint for gossip (tcp://HOST:PORT; PORT * picks a free one)"),
    OPT("router", "site", CONFIG_STRING, site, "default", 0, 0,
        "Failure domain (data centre, building) this router is in"),
    OPT("dicom", "ae_title", CONFIG_STRING, ae_title, "SHARDPACS", 0, 0,
        "AE title this archive answers to"),
    OPT("dicom", "bind", CONFIG_STRING, bind, "0.0.0.0", 0, 0, "Address the DICOM port listens on"),
    OPT("dicom", "port", CONFIG_INT, port, "11112", 0, 65535, "DICOM port (0 picks a free one)"),
    OPT("dicom", "workers", CONFIG_INT, workers, "16", 1, 1024, "Associations served at once"),
    OPT("dicom", "queue", CONFIG_INT, queue, "64", 0, 100000,
        "Connections waiting for a worker before new ones are rejected"),
    OPT("dicom", "acse_timeout", CONFIG_MS, acse_timeout, "10s", 1000, 3600000,
        "Association negotiation and release timeout"),
    OPT("dicom", "dimse_timeout", CONFIG_MS, dimse_timeout, "60s", 1000, 86400000,
        "Longest wait for the next DIMSE message on an association"),
    OPT("dicom", "max_pdu", CONFIG_INT, max_pdu, "116794", 4096, 131072,
        "Largest PDU received, bytes"),
    OPT("dicom", "allowed_callers", CONFIG_STRING, allowed_callers, "", 0, 0,
        "Calling AE titles admitted, separated by commas (empty admits any)"),
    OPT("dicom", "duplicates", CONFIG_STRING, duplicates, "reject", 0, 0,
        "A SOP Instance UID sent again with different bytes: reject (0x0111, kept aside), "
        "keep-first (Success, stored one stays) or keep-newest (Success, the later version "
        "replaces it); at most [store] max_conflicts versions are kept aside"),
    OPT("dicom", "max_per_address", CONFIG_INT, max_per_address, "32", 0, 100000,
        "Connections held from one IP address, idle ones included (0: unlimited)"),
    OPT("dicom", "max_connections", CONFIG_INT, max_connections, "1024", 1, 1000000,
        "Connections held in all; when full, the oldest one still silent is closed"),
    OPT("dicom", "min_rate", CONFIG_SIZE, min_rate, "32K", 1, 1LL << 40,
        "Bytes/s a DIMSE message arrives at, at least: its deadline is dimse_timeout + size / "
        "min_rate"),
    OPT("dicom", "max_object_size", CONFIG_SIZE, max_object_size, "1G", 1024, 1LL << 40,
        "Largest C-STORE data set accepted; a larger one is read to its end, discarded and "
        "refused with 0xC000"),
    OPT("dicom", "max_identifier_size", CONFIG_SIZE, max_identifier_size, "16M", 1024, 1LL << 32,
        "Largest C-FIND, C-MOVE or C-GET identifier accepted (0xA900 above it)"),
    OPT("dicom", "receive_memory", CONFIG_SIZE, receive_memory, "2G", 4096, 1LL << 44,
        "Memory all DICOM receives may hold at once, from their first byte until the object is "
        "on its replicas; at least max_object_size"),
    OPT("dicom", "receive_wait", CONFIG_MS, receive_wait, "30s", 1000, 3600000,
        "Longest wait for receive memory; then the store is refused with 0xA700 (retry later)"),
    OPT("dicom", "max_depth", CONFIG_INT, max_depth, "64", 4, 4096,
        "Deepest sequence nesting accepted in a data set or identifier (checked before "
        "parsing)"),
    OPT("dicom", "plain", CONFIG_BOOL, plain, "true", 0, 0,
        "Serve plain (unencrypted) DICOM on port; false serves DICOM TLS only"),
    OPT("tls", "enabled", CONFIG_BOOL, tls, "false", 0, 0,
        "Serve DICOM TLS (BCP 195 non-downgrading: TLS 1.2+, ECDHE) on [tls] port"),
    OPT("tls", "port", CONFIG_INT, tls_port, "2762", 0, 65535,
        "DICOM TLS port (0 picks a free one)"),
    OPT("tls", "certificate", CONFIG_PATH, tls_certificate, "", 0, 0,
        "PEM certificate (chain) of this router; also its client certificate for C-MOVE over "
        "TLS; re-read when it changes"),
    OPT("tls", "key", CONFIG_PATH, tls_key, "", 0, 0,
        "PEM private key of the certificate (not encrypted); re-read when it changes"),
    OPT("tls", "ca", CONFIG_PATH, tls_ca, "", 0, 0,
        "PEM bundle of the CAs that sign client certificates and TLS destinations; re-read when "
        "it changes"),
    OPT("tls", "verify_peer", CONFIG_BOOL, tls_verify_peer, "true", 0, 0,
        "Require a client certificate signed by [tls] ca (false: no client certificate asked)"),
    OPT("tls", "ciphers", CONFIG_STRING, tls_ciphers, "", 0, 0,
        "TLS 1.2 cipher suites, OpenSSL names (empty: the BCP 195 ECDHE AES-GCM suites)"),
    OPT("keys", "key_pair", CONFIG_PATH, key_pair, "router.key", 0, 0,
        "The router's CURVE key pair file (mode 0600)"),
    OPT("keys", "cluster_keys", CONFIG_PATH, cluster_keys, "cluster.keys", 0, 0,
        "Allow-list of member public keys; storage members' keys are looked up here by name"),
    OPT("cluster", "replicas", CONFIG_INT, replicas, "3", 1, 16, "Copies of every study (N)"),
    OPT("cluster", "write_quorum", CONFIG_INT, write_quorum, "2", 1, 16,
        "Durable copies before C-STORE answers Success (W)"),
    OPT("cluster", "store_timeout", CONFIG_MS, store_timeout, "10s", 100, 600000,
        "Longest wait for W acknowledgements, plus the object's size / store_min_rate"),
    OPT("cluster", "store_min_rate", CONFIG_SIZE, store_min_rate, "8M", 1024, 1LL << 40,
        "Bytes/s a stored object is taken at, at least: large objects get that much longer"),
    OPT("cluster", "query_timeout", CONFIG_MS, query_timeout, "10s", 100, 600000,
        "Longest wait for the nodes' answers to one query"),
    OPT("cluster", "fetch_timeout", CONFIG_MS, fetch_timeout, "30s", 100, 600000,
        "Longest wait for one replica to return one instance"),
    OPT("cluster", "retry_down", CONFIG_MS, avoid_failed_ms, "5s", 0, 600000,
        "How long a node that failed to answer is skipped (unless gossip sees it back)"),
    OPT("cluster", "join_timeout", CONFIG_MS, join_timeout, "30s", 0, 3600000,
        "At start, longest wait for the first storage member before serving DICOM anyway"),
    MEMBERSHIP_OPTIONS(router_settings_t, cluster, "0"),
    OPT("query", "max_results", CONFIG_INT, max_results, "10000", 1, 10000000,
        "Most matches one C-FIND returns"),
    OPT("query", "case_insensitive_names", CONFIG_BOOL, case_insensitive_names, "true", 0, 0,
        "Person names match regardless of case"),
    OPT("log", "level", CONFIG_STRING, log_level, "info", 0, 0, "debug, info, warn or error"),
    OPT("log", "format", CONFIG_STRING, log_format, "text", 0, 0,
        "text (one timestamped line per event) or json (one JSON object per line: ts, level, "
        "component, msg; for log shippers)"),
    OPT("access", "rules", CONFIG_PATH, access_rules, "", 0, 0,
        "DICOM access rules file: per calling AE (address, certificate subject) the operations "
        "and C-MOVE destinations allowed, re-read when it changes; empty: everyone may do "
        "everything"),
    AUDIT_OPTIONS(router_settings_t, audit),
    ADMIN_OPTIONS(router_settings_t, admin),
    OPT("http", "port", CONFIG_INT, http.port, "0", 0, 65535,
        "HTTP(S) port of DICOMweb and the viewer (0: no HTTP front door)"),
    OPT("http", "bind", CONFIG_STRING, http.bind, "0.0.0.0", 0, 0,
        "Address the HTTP port listens on (numeric IPv4 or IPv6)"),
    OPT("http", "workers", CONFIG_INT, http.workers, "16", 1, 1024,
        "HTTP threads; a request being computed (a cluster call) holds one"),
    OPT("http", "max_body", CONFIG_SIZE, http.max_body, "4G", 1024, 1LL << 44,
        "Largest request body (STOW-RS); larger ones are refused with 413"),
    OPT("http", "cors_origins", CONFIG_STRING, http.cors_origins, "*", 0, 0,
        "Origins allowed to call from a browser: * (any), a comma-separated list, or empty "
        "(no CORS headers)"),
    OPT("http", "public_root", CONFIG_STRING, http.public_root, "", 0, 0,
        "Base URL clients reach this router at behind a proxy, e.g. https://pacs.example.org "
        "(empty: from the Host / Forwarded headers); used in BulkDataURIs and RetrieveURLs"),
    OPT("http", "root", CONFIG_STRING, http.root, "/dicom-web", 0, 0,
        "Path DICOMweb is served under"),
    OPT("http", "viewer_dir", CONFIG_PATH, http.viewer_dir, "", 0, 0,
        "Static directory served at /viewer/ (a web viewer's built site; unknown paths without "
        "an extension get its index.html); empty: none"),
    OPT("http", "tls_cert", CONFIG_PATH, http.tls_cert, "", 0, 0,
        "PEM certificate (chain) for HTTPS; empty: plain HTTP"),
    OPT("http", "tls_key", CONFIG_PATH, http.tls_key, "", 0, 0, "PEM private key for HTTPS"),
    OPT("http", "auth", CONFIG_BOOL, http.auth, "on", 0, 0,
        "Require authentication (HTTP Basic against the users file, or a bearer token); off "
        "only for tests and trusted networks"),
    OPT("http", "users", CONFIG_PATH, http.users, "users", 0, 0,
        "Users file: NAME:argon2id-hash lines (shardpacs-router user add FILE NAME)"),
    OPT("http", "token_key", CONFIG_PATH, http.token_key, "", 0, 0,
        "Key file shared by the routers to sign bearer tokens (shardpacs-router token-key FILE); "
        "empty: no tokens"),
    OPT("http", "token_ttl", CONFIG_MS, http.token_ttl, "1h", 1000, 30LL * 86400000,
        "How long a token from POST /auth/token is valid"),
    OPT("http", "timeout", CONFIG_MS, http.timeout, "60s", 1000, 3600000,
        "An HTTP connection idle this long is closed"),
    OPT("http", "metadata_cache", CONFIG_SIZE, http.metadata_cache, "256M", 0, 1LL << 40,
        "Instance metadata (DICOM JSON) kept in memory, by object digest"),
    {"destinations", "*", CONFIG_ENTRIES, 0, "VIEWER = 192.0.2.10:104", 0, 0,
     "C-MOVE destinations: AE title = host:port, with ' tls' for DICOM TLS", parse_destination},
};

static void settings_free(router_settings_t *s)
{
    config_free(router_options, SP_ARRAY_LEN(router_options), s);
    for (size_t i = 0; i < s->ndests; i++)
        free(s->dests[i].host);
}

/* Checks what the option table cannot: cross-field rules. */
static int settings_check(router_settings_t *s, const char *path, char *err, size_t errlen)
{
    log_level_t level;
    if (log_parse_level(s->log_level, &level) != 0) {
        sp_fmt(err, errlen, "%s: [log] level '%s' is not debug, info, warn or error", path,
               s->log_level);
        return SP_ECONFIG;
    }
    log_format_t format;
    if (log_parse_format(s->log_format, &format) != 0) {
        sp_fmt(err, errlen, "%s: [log] format '%s' is not text or json", path, s->log_format);
        return SP_ECONFIG;
    }
    if (wire_policy_parse(s->duplicates, &s->duplicates_policy) != 0) {
        sp_fmt(err, errlen, "%s: [dicom] duplicates '%s' is not reject, keep-first or keep-newest",
               path, s->duplicates);
        return SP_ECONFIG;
    }
    if (strlen(s->id) == 0 || strlen(s->id) >= GOSSIP_ID_MAX) {
        sp_fmt(err, errlen, "%s: [router] id must be 1 to %d characters", path, GOSSIP_ID_MAX - 1);
        return SP_ECONFIG;
    }
    if (strlen(s->site) == 0 || strlen(s->site) >= GOSSIP_SITE_MAX) {
        sp_fmt(err, errlen, "%s: [router] site must be 1 to %d characters", path,
               GOSSIP_SITE_MAX - 1);
        return SP_ECONFIG;
    }
    if (strncmp(s->listen, "tcp://", 6) != 0) {
        sp_fmt(err, errlen, "%s: [router] listen '%s' is not tcp://HOST:PORT", path, s->listen);
        return SP_ECONFIG;
    }
    if (s->write_quorum > s->replicas) {
        sp_fmt(err, errlen, "%s: [cluster] write_quorum %d exceeds replicas %d", path,
               s->write_quorum, s->replicas);
        return SP_ECONFIG;
    }
    if (strlen(s->ae_title) == 0 || strlen(s->ae_title) > 16) {
        sp_fmt(err, errlen, "%s: [dicom] ae_title must be 1 to 16 characters", path);
        return SP_ECONFIG;
    }
    if (!s->plain && !s->tls) {
        sp_fmt(err, errlen, "%s: [dicom] plain = false needs [tls] enabled = true", path);
        return SP_ECONFIG;
    }
    bool need_cert = s->tls || s->ntls_dests > 0;
    if (need_cert && (s->tls_certificate[0] == 0 || s->tls_key[0] == 0)) {
        sp_fmt(err, errlen, "%s: DICOM TLS needs [tls] certificate and key", path);
        return SP_ECONFIG;
    }
    if (((s->tls && s->tls_verify_peer) || s->ntls_dests > 0) && s->tls_ca[0] == 0) {
        sp_fmt(err, errlen,
               "%s: [tls] ca is needed to verify client certificates (verify_peer) and TLS "
               "destinations",
               path);
        return SP_ECONFIG;
    }
    if (s->tls && s->plain && s->tls_port == s->port && s->port != 0) {
        sp_fmt(err, errlen, "%s: [tls] port and [dicom] port are both %d", path, s->port);
        return SP_ECONFIG;
    }
    if ((s->http.tls_cert[0] != '\0') != (s->http.tls_key[0] != '\0')) {
        sp_fmt(err, errlen, "%s: [http] tls_cert and tls_key go together", path);
        return SP_ECONFIG;
    }
    if (s->http.root[0] != '/' || strchr(s->http.root, '?')) {
        sp_fmt(err, errlen, "%s: [http] root '%s' must be a path starting with /", path,
               s->http.root);
        return SP_ECONFIG;
    }
    return 0;
}

/* What the transport workers share: the membership, once started. */
typedef struct {
    _Atomic(membership_t *) membership;
} router_t;

/* The router's cluster port answers gossip and refuses everything else
 * (it stores nothing): runs on the transport's worker threads. */
static void router_dispatch(void *ctx, const transport_request_t *req, const wire_request_t *w,
                            wire_reply_t *rep, transport_reply_t *out)
{
    (void)out;
    router_t *r = ctx;
    if (w->kind != WIRE_GOSSIP)
        wire_reply_error(rep, SP_EUNKNOWN, "a router answers gossip only");
    else
        membership_handle(atomic_load(&r->membership), req, w, rep);
}

static void router_handle(void *ctx, const transport_request_t *req, transport_reply_t *out)
{
    wire_serve(req, out, router_dispatch, ctx);
}

/* Waits up to timeout_ms for SIGINT/SIGTERM (blocked in every thread);
 * returns the signal, or 0 when none came. */
static int wait_signal_ms(int timeout_ms)
{
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    struct timespec ts = {.tv_sec = timeout_ms / 1000,
                          .tv_nsec = (long)(timeout_ms % 1000) * 1000000L};
    int sig = sigtimedwait(&set, NULL, &ts);
    return sig > 0 ? sig : 0;
}

/* Waits until the view places at least one storage member, at most
 * timeout_ms. Returns a shutdown signal that arrived meanwhile, or 0. */
static int wait_for_storage(backend_t *backend, int timeout_ms)
{
    int64_t start = sp_now_ms(), next_log = start + 5000;
    size_t n;
    while ((n = backend_placed_count(backend)) == 0) {
        int64_t now = sp_now_ms();
        if (now - start >= timeout_ms) {
            log_warn("no storage member in the view after %d ms ([cluster] join_timeout); "
                     "serving DICOM anyway (stores fail until members are known)",
                     timeout_ms);
            return 0;
        }
        if (now >= next_log) {
            log_info("waiting for storage members to show up in gossip (%lld s so far)",
                     (long long)((now - start) / 1000));
            next_log = now + 5000;
        }
        int sig = wait_signal_ms(50);
        if (sig != 0)
            return sig;
    }
    log_info("view holds %zu storage members after %lld ms", n, (long long)(sp_now_ms() - start));
    return 0;
}

/* Audits each reload of the access rules, applied or refused. */
static void audit_rules_reload(void *ctx, bool applied, const char *what)
{
    (void)ctx;
    audit_record_t r = AUDIT_RECORD_INIT(AUDIT_SECURITY_CONFIG);
    r.operation = "access rules reload";
    r.outcome = applied ? AUDIT_SUCCESS : AUDIT_MINOR_FAILURE;
    r.detail = what;
    audit_record(&r, false);
}

/* Starts the HTTP front door ([http] port > 0): users and token key when
 * authentication is on, the DICOMweb handlers over the same backend as the
 * DICOM side. Returns 0 or an error (logged). */
static int http_start(router_settings_t *s, const scp_t *scp, dicomweb_t **dw, auth_t **auth,
                      http_server_t **web)
{
    char err[512];
    if (s->http.auth) {
        *auth =
            auth_new(s->http.users, s->http.token_key, s->http.token_ttl / 1000, err, sizeof err);
        if (*auth == NULL) {
            log_error("[http] auth: %s (create users with 'shardpacs-router user add FILE NAME', "
                      "or set [http] auth = off)",
                      err);
            return SP_ECONFIG;
        }
    } else {
        log_warn("[http] auth = off: DICOMweb is open to anyone who reaches port %d", s->http.port);
    }
    dicomweb_config_t dc = {.backend = scp->backend,
                            .max_results = scp->max_results,
                            .max_object_size = s->max_object_size,
                            .max_depth = s->max_depth,
                            .metadata_cache = s->http.metadata_cache};
    *dw = dicomweb_new(&dc);
    http_config_t hc = {.bind = s->http.bind,
                        .port = s->http.port,
                        .workers = s->http.workers,
                        .max_body = s->http.max_body,
                        .cors_origins = s->http.cors_origins,
                        .public_root = s->http.public_root,
                        .root = s->http.root,
                        .viewer_dir = s->http.viewer_dir,
                        .tls_cert = s->http.tls_cert,
                        .tls_key = s->http.tls_key,
                        .timeout_s = (s->http.timeout + 999) / 1000,
                        .auth = *auth};
    http_handlers_t h = dicomweb_handlers(*dw);
    int rc = http_server_start(&hc, &h, web, err, sizeof err);
    if (rc != 0) {
        log_error("cannot start HTTP on %s:%d: %s", s->http.bind, s->http.port, err);
        return rc;
    }
    log_info("http listening on %s:%d (%s, auth %s, DICOMweb at %s%s%s)", s->http.bind,
             s->http.port, s->http.tls_cert[0] ? "https" : "http", s->http.auth ? "on" : "off",
             s->http.root, s->http.viewer_dir[0] ? ", viewer at /viewer/ from " : "",
             s->http.viewer_dir);
    return 0;
}

/* ---- metrics (admin.h) ---------------------------------------------------- */

/* The DIMSE services, in the order of router_ops. */
enum { OP_ECHO, OP_STORE, OP_FIND, OP_MOVE, OP_GET, OP_COUNT };
static const char *const router_op_names[OP_COUNT] = {"echo", "store", "find", "move", "get"};

/* A final DIMSE status's class (PS3.7 C.4): a bounded label, where the raw
 * codes would be as many series as peers can provoke. */
enum { CLASS_SUCCESS, CLASS_WARNING, CLASS_FAILURE, CLASS_CANCEL, CLASS_COUNT };
static const char *const router_class_names[CLASS_COUNT] = {"success", "warning", "failure",
                                                            "cancel"};

/* Every series the DIMSE wrappers touch, registered before the first
 * association so the hot path only adds. */
typedef struct {
    admin_counter_t *ops[OP_COUNT][CLASS_COUNT];
    admin_hist_t *seconds[OP_COUNT];
    admin_counter_t *bytes_in;
} router_metrics_t;

static router_metrics_t router_metrics;

static void metrics_register(void)
{
    for (int op = 0; op < OP_COUNT; op++) {
        char labels[96];
        for (int c = 0; c < CLASS_COUNT; c++)
            router_metrics.ops[op][c] =
                admin_counter("shardpacs_router_dimse_operations_total",
                              "DIMSE operations answered, by service and final status class",
                              sp_fmt(labels, sizeof labels, "op=\"%s\",status=\"%s\"",
                                     router_op_names[op], router_class_names[c]));
        router_metrics.seconds[op] =
            admin_histogram("shardpacs_router_dimse_duration_seconds",
                            "Time from a DIMSE request to its final response, by service",
                            sp_fmt(labels, sizeof labels, "op=\"%s\"", router_op_names[op]));
    }
    router_metrics.bytes_in = admin_counter("shardpacs_router_received_bytes_total",
                                            "C-STORE data set bytes received", "");
}

static int status_class(uint16_t status)
{
    if (status == DICOM_SUCCESS)
        return CLASS_SUCCESS;
    if (status == DICOM_CANCEL)
        return CLASS_CANCEL;
    if (status == 0x0001 || status == 0x0107 || status == 0x0116 || (status & 0xF000) == 0xB000)
        return CLASS_WARNING;
    return CLASS_FAILURE;
}

static int64_t metrics_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* Counts one answered operation and its latency; returns its status. */
static uint16_t metrics_done(int op, int64_t start_us, uint16_t status)
{
    admin_add(router_metrics.ops[op][status_class(status)], 1);
    admin_observe(router_metrics.seconds[op], (double)(metrics_now_us() - start_us) / 1e6);
    return status;
}

static uint16_t metered_echo(void *ctx, const dicom_peer_t *peer)
{
    int64_t t = metrics_now_us();
    return metrics_done(OP_ECHO, t, scp_echo(ctx, peer));
}

static uint16_t metered_store(void *ctx, const dicom_store_t *req, char *comment,
                              size_t comment_len)
{
    int64_t t = metrics_now_us();
    admin_add(router_metrics.bytes_in, req->dataset_len);
    return metrics_done(OP_STORE, t, scp_store(ctx, req, comment, comment_len));
}

static uint16_t metered_find(void *ctx, dicom_find_t *q, char *comment, size_t comment_len)
{
    int64_t t = metrics_now_us();
    return metrics_done(OP_FIND, t, scp_find(ctx, q, comment, comment_len));
}

static uint16_t metered_move(void *ctx, dicom_retrieve_t *r, char *comment, size_t comment_len)
{
    int64_t t = metrics_now_us();
    return metrics_done(OP_MOVE, t, scp_move(ctx, r, comment, comment_len));
}

static uint16_t metered_get(void *ctx, dicom_retrieve_t *r, char *comment, size_t comment_len)
{
    int64_t t = metrics_now_us();
    return metrics_done(OP_GET, t, scp_get(ctx, r, comment, comment_len));
}

/* What readiness and the router's collector look at. */
typedef struct {
    _Atomic(backend_t *) backend; /* NULL until built */
    int write_quorum;
} router_health_t;

/* /readyz: ready once W storage members are reachable (a C-STORE can
 * succeed). */
static bool router_ready(void *ctx, char *why, size_t whylen)
{
    router_health_t *h = ctx;
    backend_t *b = atomic_load(&h->backend);
    size_t n = b ? backend_reachable_storage(b) : 0;
    if (n >= (size_t)h->write_quorum)
        return true;
    sp_fmt(why, whylen, "not ready: %zu reachable storage members, W = %d", n, h->write_quorum);
    return false;
}

static void router_collect(void *ctx, admin_out_t *o)
{
    router_health_t *h = ctx;
    backend_t *b = atomic_load(&h->backend);
    admin_out_family(o, "shardpacs_router_storage_members_reachable",
                     "Storage members this router can write to now", "gauge");
    admin_out_sample(o, "shardpacs_router_storage_members_reachable", "",
                     b ? (double)backend_reachable_storage(b) : 0);
}

static int router_run(router_settings_t *s)
{
    char err[512];
    keys_allowlist_t *keys = NULL;
    access_rules_t *access = NULL;
    backend_t *backend = NULL;
    dicom_server_t *server = NULL;
    transport_server_t *srv = NULL;
    http_server_t *web = NULL;
    dicomweb_t *dw = NULL;
    auth_t *auth = NULL;
    membership_t *m = NULL;
    router_t router;
    atomic_init(&router.membership, NULL);
    router_health_t health = {.write_quorum = s->write_quorum};
    atomic_init(&health.backend, NULL);
    backend_config_t bc = {.replicas = s->replicas,
                           .write_quorum = s->write_quorum,
                           .store_timeout_ms = s->store_timeout,
                           .store_min_rate = s->store_min_rate,
                           .query_timeout_ms = s->query_timeout,
                           .fetch_timeout_ms = s->fetch_timeout,
                           .avoid_failed_ms = s->avoid_failed_ms,
                           .case_insensitive_names = s->case_insensitive_names,
                           .duplicates = s->duplicates_policy};
    int rc = audit_start_settings(&s->audit, s->id, err, sizeof err);
    if (rc != 0) {
        log_error("%s", err);
        return rc;
    }
    audit_record_t started = AUDIT_RECORD_INIT(AUDIT_APPLICATION_START);
    started.operation = "shardpacs-router";
    audit_record(&started, false);
    rc = keys_load_pair(s->key_pair, &bc.self, err, sizeof err);
    if (rc == 0 && (keys = keys_allowlist_load(s->cluster_keys, err, sizeof err)) == NULL)
        rc = SP_EKEY;
    if (rc == 0 && s->access_rules[0] != '\0' &&
        (access = access_rules_load(s->access_rules, err, sizeof err)) == NULL)
        rc = SP_ECONFIG;
    if (rc != 0) {
        log_error("%s", err);
        goto out;
    }
    if (access != NULL) {
        access_rules_on_reload(access, audit_rules_reload, NULL);
        log_info("access rules from %s", s->access_rules);
    }

    /* Gossip: a transport server of its own, then membership. */
    transport_config_t tc;
    transport_config_defaults(&tc);
    tc.workers = 2;
    srv = transport_server_new(&tc, &bc.self, keys, router_handle, &router);
    char bound[256];
    rc = transport_server_start(srv, s->listen, bound, sizeof bound);
    if (rc != 0) {
        log_error("cannot listen on %s: %s", s->listen, sp_strerror(rc));
        goto out;
    }
    membership_self_t me = {.id = s->id,
                            .endpoint = bound,
                            .site = s->site,
                            .role = GOSSIP_ROUTER,
                            .initial_state = GOSSIP_ALIVE};
    rc = membership_start_settings(&s->cluster, &me, &bc.self, keys, &m);
    if (rc != 0)
        goto out;
    atomic_store(&router.membership, m);
    log_info("router %s (site %s) gossiping on %s, %zu cluster keys", s->id, s->site, bound,
             keys_allowlist_count(keys));

    bc.membership = m;
    bc.keys = keys;
    transport_config_defaults(&bc.transport);
    backend = backend_new(&bc);
    atomic_store(&health.backend, backend);
    /* The admin port comes up before storage is found, so /healthz answers
     * and /readyz says what the router still waits for. */
    admin_add_collector(membership_collect, m);
    admin_add_collector(router_collect, &health);
    rc = admin_start(s->admin.listen, "router", router_ready, &health, err, sizeof err);
    if (rc != 0) {
        log_error("%s", err);
        goto out;
    }
    int sig = wait_for_storage(backend, s->join_timeout);
    if (sig != 0) {
        log_info("signal %d: shutting down", sig);
        goto out;
    }

    scp_t scp = {.backend = backend,
                 .ae_title = s->ae_title,
                 .dests = s->dests,
                 .ndests = s->ndests,
                 .max_results = (size_t)s->max_results,
                 .access = access};
    metrics_register();
    dicom_handlers_t handlers = {.ctx = &scp,
                                 .store = metered_store,
                                 .find = metered_find,
                                 .move = metered_move,
                                 .get = metered_get,
                                 .admit = scp_admit,
                                 .associated = scp_associated,
                                 .echo = metered_echo};
    dicom_config_t dc;
    dicom_config_defaults(&dc);
    dc.ae_title = s->ae_title;
    dc.bind_address = s->bind;
    dc.port = s->port;
    dc.workers = s->workers;
    dc.queue = s->queue;
    dc.max_pdu = s->max_pdu;
    dc.allowed_callers = s->allowed_callers;
    dc.max_per_address = s->max_per_address;
    dc.max_connections = s->max_connections;
    dc.min_rate = s->min_rate;
    dc.max_object_size = s->max_object_size;
    dc.max_identifier_size = s->max_identifier_size;
    dc.receive_memory = s->receive_memory;
    dc.receive_wait_s = (s->receive_wait + 999) / 1000;
    dc.max_depth = s->max_depth;
    dc.acse_timeout_s = (s->acse_timeout + 999) / 1000;
    dc.dimse_timeout_s = (s->dimse_timeout + 999) / 1000;
    dc.plain = s->plain;
    dc.tls = s->tls;
    dc.tls_port = s->tls_port;
    dc.tls_certificate = s->tls_certificate;
    dc.tls_key = s->tls_key;
    dc.tls_ca = s->tls_ca;
    dc.tls_verify_peer = s->tls_verify_peer;
    dc.tls_ciphers = s->tls_ciphers;
    dc.tls_destinations = s->tls_dests;
    dc.ntls_destinations = s->ntls_dests;
    rc = dicom_server_start(&dc, &handlers, &server, err, sizeof err);
    if (rc != 0) {
        log_error("cannot start DICOM service on %s:%d: %s", s->bind, s->port, err);
        goto out;
    }
    /* Tests and scripts wait for "listening on HOST:PORT;" (the TLS port
     * when plain DICOM is off). */
    char tls_text[300] = "";
    if (s->tls && s->plain)
        sp_fmt(tls_text, sizeof tls_text, "DICOM TLS on %s:%d; ", s->bind,
               dicom_server_tls_port(server));
    else if (s->tls)
        sp_fmt(tls_text, sizeof tls_text, "DICOM TLS only; ");
    log_info("router %s listening on %s:%d; %s%zu storage members, N=%d W=%d, %zu move "
             "destinations (%zu over TLS)",
             s->ae_title, s->bind,
             s->plain ? dicom_server_port(server) : dicom_server_tls_port(server), tls_text,
             backend_placed_count(backend), s->replicas, s->write_quorum, s->ndests, s->ntls_dests);
    if (s->http.port > 0) {
        rc = http_start(s, &scp, &dw, &auth, &web);
        if (rc != 0)
            goto out;
    }

    /* Type=notify units: systemctl start returns once DICOM (and HTTP)
     * are served. */
    notify_send("READY=1\nSTATUS=serving");
    sig = sp_signals_wait();
    log_info("signal %d: shutting down", sig);
    notify_send("STOPPING=1");
out:
    admin_stop(); /* before the backend and membership its collectors read */
    http_server_stop(&web);
    dicomweb_destroy(&dw);
    auth_destroy(&auth);
    dicom_server_stop(&server);
    transport_server_destroy(&srv); /* no handler uses membership after this */
    membership_stop(&m);
    backend_destroy(&backend);
    keys_allowlist_destroy(&keys);
    access_rules_destroy(&access);
    audit_record_t stopped = AUDIT_RECORD_INIT(AUDIT_APPLICATION_STOP);
    stopped.operation = "shardpacs-router";
    stopped.outcome = rc == 0 ? AUDIT_SUCCESS : AUDIT_SERIOUS_FAILURE;
    audit_record(&stopped, false);
    audit_stop();
    return rc;
}

static void usage(FILE *f)
{
    fprintf(f, "usage: shardpacs-router --config FILE\n"
               "       shardpacs-router --help-config   (print every option with its default)\n"
               "       shardpacs-router user add USERS_FILE NAME   (password from "
               "SHARDPACS_PASSWORD or the first line of standard input)\n"
               "       shardpacs-router token-key FILE   (a new key to sign bearer tokens)\n");
}

/* The subcommands that manage the HTTP front door's users and token key. */
static int admin_command(int argc, char **argv)
{
    char err[512];
    if (argc == 5 && strcmp(argv[1], "user") == 0 && strcmp(argv[2], "add") == 0) {
        char line[1024];
        const char *pw = getenv("SHARDPACS_PASSWORD");
        if (pw == NULL) {
            if (fgets(line, sizeof line, stdin) == NULL) {
                fprintf(stderr, "shardpacs-router: no password on standard input\n");
                return 1;
            }
            line[strcspn(line, "\r\n")] = '\0';
            pw = line;
        }
        if (strlen(pw) < 8) {
            fprintf(stderr, "shardpacs-router: the password must have at least 8 characters\n");
            return 1;
        }
        if (auth_user_add(argv[3], argv[4], pw, err, sizeof err) != 0) {
            fprintf(stderr, "shardpacs-router: %s\n", err);
            return 1;
        }
        printf("user %s written to %s\n", argv[4], argv[3]);
        return 0;
    }
    if (argc == 3 && strcmp(argv[1], "token-key") == 0) {
        if (auth_token_key_new(argv[2], err, sizeof err) != 0) {
            fprintf(stderr, "shardpacs-router: %s\n", err);
            return 1;
        }
        printf("token key written to %s (copy it to every router)\n", argv[2]);
        return 0;
    }
    usage(stderr);
    return 2;
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {{"config", required_argument, NULL, 'c'},
                                             {"help-config", no_argument, NULL, 'H'},
                                             {"help", no_argument, NULL, 'h'},
                                             {NULL, 0, NULL, 0}};
    if (argc > 1 && (strcmp(argv[1], "user") == 0 || strcmp(argv[1], "token-key") == 0))
        return admin_command(argc, argv);
    const char *config_path = NULL;
    int opt;
    while ((opt = getopt_long(argc, argv, "c:h", longopts, NULL)) != -1) {
        switch (opt) {
        case 'c': config_path = optarg; break;
        case 'H':
            config_print_reference(stdout, router_options, SP_ARRAY_LEN(router_options));
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
    sp_malloc_tune();

    router_settings_t *s = sp_calloc(1, sizeof *s);
    char err[512];
    int rc =
        config_load(config_path, router_options, SP_ARRAY_LEN(router_options), s, err, sizeof err);
    if (rc == 0)
        rc = settings_check(s, config_path, err, sizeof err);
    if (rc != 0) {
        fprintf(stderr, "shardpacs-router: %s\n", err);
        settings_free(s);
        free(s);
        return 1;
    }
    log_level_t level = LOG_INFO;
    log_parse_level(s->log_level, &level);
    log_format_t format = LOG_FORMAT_TEXT;
    log_parse_format(s->log_format, &format);
    log_set_format(format);
    log_init("router", level);
    rc = router_run(s);
    settings_free(s);
    free(s);
    return rc == 0 ? 0 : 1;
}
