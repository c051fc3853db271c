/* router.c - shardpacs-router: the DICOM front door. Loads its configuration
 * and keys, connects the backend (the storage nodes) and serves DICOM
 * associations through the adapter (dicom.h), answering C-ECHO, C-STORE,
 * C-FIND, C-MOVE and C-GET with the handlers in scp.c.
 *
 * Threads: the main thread sets up and waits for SIGINT/SIGTERM; the DICOM
 * worker threads call the handlers. Settings are read-only after start-up. */
#include "../common/base.h"
#include "../common/config.h"
#include "../common/keys.h"
#include "../common/log.h"
#include "backend.h"
#include "dicom.h"
#include "scp.h"

#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ROUTER_MAX_NODES 256
#define ROUTER_MAX_DESTS 256

typedef struct {
    char *ae_title;
    char *bind;
    int port;
    int workers;
    int queue;
    int acse_timeout;
    int dimse_timeout;
    int max_pdu;
    char *allowed_callers;
    char *key_pair;
    char *cluster_keys;
    int replicas;
    int write_quorum;
    int store_timeout;
    int query_timeout;
    int fetch_timeout;
    int retry_down;
    int max_results;
    bool case_insensitive_names;
    char *log_level;
    /* [nodes] entries, "name = tcp://host:port [site=S] [weight=W]" */
    backend_node_t nodes[ROUTER_MAX_NODES];
    size_t nnodes;
    /* [destinations] entries, "AE = host:port" */
    scp_destination_t dests[ROUTER_MAX_DESTS];
    size_t ndests;
} router_settings_t;

/* Parses one [nodes] line. The node's public key comes from the cluster key
 * file, looked up by name once the file is loaded. */
static int parse_node(void *target, const char *name, const char *value, char *why, size_t len)
{
    router_settings_t *s = target;
    if (s->nnodes == ROUTER_MAX_NODES) {
        sp_fmt(why, len, "is one node too many (at most %d)", ROUTER_MAX_NODES);
        return -1;
    }
    for (size_t i = 0; i < s->nnodes; i++) {
        if (strcmp(s->nodes[i].id, name) == 0) {
            sp_fmt(why, len, "is listed twice");
            return -1;
        }
    }
    char *copy = sp_strdup(value), *save = NULL;
    backend_node_t n = {.id = sp_strdup(name), .site = NULL, .weight = 1.0};
    int rc = 0;
    for (char *tok = strtok_r(copy, " \t", &save); tok && rc == 0;
         tok = strtok_r(NULL, " \t", &save)) {
        if (strncmp(tok, "tcp://", 6) == 0 && n.endpoint == NULL) {
            n.endpoint = sp_strdup(tok);
        } else if (strncmp(tok, "site=", 5) == 0 && tok[5] && n.site == NULL) {
            n.site = sp_strdup(tok + 5);
        } else if (strncmp(tok, "weight=", 7) == 0) {
            char *end;
            n.weight = strtod(tok + 7, &end);
            if (*end != '\0' || !(n.weight > 0 && n.weight <= 1000))
                rc = -1;
        } else {
            rc = -1;
        }
    }
    free(copy);
    if (rc != 0 || n.endpoint == NULL) {
        sp_fmt(why, len, "expects 'tcp://HOST:PORT [site=S] [weight=W]', not '%s'", value);
        free(n.id);
        free(n.endpoint);
        free(n.site);
        return -1;
    }
    if (n.site == NULL)
        n.site = sp_strdup("default");
    s->nodes[s->nnodes++] = n;
    return 0;
}

/* Parses one [destinations] line: "AE = host:port". */
static int parse_destination(void *target, const char *name, const char *value, char *why,
                             size_t len)
{
    router_settings_t *s = target;
    const char *colon = strrchr(value, ':');
    char *end = NULL;
    long port = colon ? strtol(colon + 1, &end, 10) : 0;
    if (s->ndests == ROUTER_MAX_DESTS || strlen(name) > 16 || colon == NULL || colon == value ||
        *end != '\0' || port < 1 || port > 65535) {
        sp_fmt(why, len, "expects an AE title of at most 16 characters = HOST:PORT, not '%s'",
               value);
        return -1;
    }
    scp_destination_t *d = &s->dests[s->ndests++];
    sp_strlcpy(d->ae_title, name, sizeof d->ae_title);
    d->host = sp_strndup(value, (size_t)(colon - value));
    d->port = (int)port;
    return 0;
}

#define OPT(sec, key, type, field, def, lo, hi, help)                                              \
    {                                                                                              \
        sec, key, type, offsetof(router_settings_t, field), def, lo, hi, help, NULL                \
    }

static const config_option_t router_options[] = {
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
    OPT("keys", "key_pair", CONFIG_PATH, key_pair, "router.key", 0, 0,
        "The router's CURVE key pair file (mode 0600)"),
    OPT("keys", "cluster_keys", CONFIG_PATH, cluster_keys, "cluster.keys", 0, 0,
        "Allow-list of member public keys; node keys are looked up here by name"),
    OPT("cluster", "replicas", CONFIG_INT, replicas, "3", 1, 16, "Copies of every study (N)"),
    OPT("cluster", "write_quorum", CONFIG_INT, write_quorum, "2", 1, 16,
        "Durable copies before C-STORE answers Success (W)"),
    OPT("cluster", "store_timeout", CONFIG_MS, store_timeout, "10s", 100, 600000,
        "Longest wait for W acknowledgements"),
    OPT("cluster", "query_timeout", CONFIG_MS, query_timeout, "10s", 100, 600000,
        "Longest wait for the nodes' answers to one query"),
    OPT("cluster", "fetch_timeout", CONFIG_MS, fetch_timeout, "30s", 100, 600000,
        "Longest wait for one replica to return one instance"),
    OPT("cluster", "retry_down", CONFIG_MS, retry_down, "5s", 0, 600000,
        "How long a node that failed to answer is skipped by queries"),
    OPT("query", "max_results", CONFIG_INT, max_results, "10000", 1, 10000000,
        "Most matches one C-FIND returns"),
    OPT("query", "case_insensitive_names", CONFIG_BOOL, case_insensitive_names, "true", 0, 0,
        "Person names match regardless of case"),
    OPT("log", "level", CONFIG_STRING, log_level, "info", 0, 0, "debug, info, warn or error"),
    {"nodes", "*", CONFIG_ENTRIES, 0, "n1 = tcp://127.0.0.1:7401 site=A weight=1", 0, 0,
     "Storage nodes: one line each, name = endpoint [site=S] [weight=W]", parse_node},
    {"destinations", "*", CONFIG_ENTRIES, 0, "VIEWER = 192.0.2.10:104", 0, 0,
     "C-MOVE destinations: AE title = host:port", parse_destination},
};

static void settings_free(router_settings_t *s)
{
    config_free(router_options, SP_ARRAY_LEN(router_options), s);
    for (size_t i = 0; i < s->nnodes; i++) {
        free(s->nodes[i].id);
        free(s->nodes[i].endpoint);
        free(s->nodes[i].site);
    }
    for (size_t i = 0; i < s->ndests; i++)
        free(s->dests[i].host);
}

/* Checks what the option table cannot: cross-field rules and node keys. */
static int settings_check(router_settings_t *s, const char *path, char *err, size_t errlen)
{
    log_level_t level;
    if (log_parse_level(s->log_level, &level) != 0) {
        sp_fmt(err, errlen, "%s: [log] level '%s' is not debug, info, warn or error", path,
               s->log_level);
        return SP_ECONFIG;
    }
    if (s->nnodes == 0) {
        sp_fmt(err, errlen, "%s: [nodes] lists no storage node", path);
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
    return 0;
}

/* Looks up every node's public key in the cluster key file by name. */
static int resolve_node_keys(router_settings_t *s, const keys_allowlist_t *keys, char *err,
                             size_t errlen)
{
    for (size_t i = 0; i < s->nnodes; i++) {
        if (!keys_allowlist_find_name(keys, s->nodes[i].id, s->nodes[i].public_z85)) {
            sp_fmt(err, errlen, "node %s is not listed in %s", s->nodes[i].id, s->cluster_keys);
            return SP_EKEY;
        }
    }
    return 0;
}

static int router_run(router_settings_t *s)
{
    char err[512];
    keys_allowlist_t *keys = NULL;
    backend_t *backend = NULL;
    dicom_server_t *server = NULL;
    backend_config_t bc = {.nodes = s->nodes,
                           .nnodes = s->nnodes,
                           .replicas = s->replicas,
                           .write_quorum = s->write_quorum,
                           .store_timeout_ms = s->store_timeout,
                           .query_timeout_ms = s->query_timeout,
                           .fetch_timeout_ms = s->fetch_timeout,
                           .retry_down_ms = s->retry_down,
                           .case_insensitive_names = s->case_insensitive_names};
    int rc = keys_load_pair(s->key_pair, &bc.self, err, sizeof err);
    if (rc == 0 && (keys = keys_allowlist_load(s->cluster_keys, err, sizeof err)) == NULL)
        rc = SP_EKEY;
    if (rc == 0)
        rc = resolve_node_keys(s, keys, err, sizeof err);
    if (rc != 0) {
        log_error("%s", err);
        goto out;
    }
    transport_config_defaults(&bc.transport);
    backend = backend_new(&bc);

    scp_t scp = {.backend = backend,
                 .ae_title = s->ae_title,
                 .dests = s->dests,
                 .ndests = s->ndests,
                 .max_results = (size_t)s->max_results};
    dicom_handlers_t handlers = {
        .ctx = &scp, .store = scp_store, .find = scp_find, .move = scp_move, .get = scp_get};
    dicom_config_t dc;
    dicom_config_defaults(&dc);
    dc.ae_title = s->ae_title;
    dc.bind_address = s->bind;
    dc.port = s->port;
    dc.workers = s->workers;
    dc.queue = s->queue;
    dc.max_pdu = s->max_pdu;
    dc.allowed_callers = s->allowed_callers;
    dc.acse_timeout_s = (s->acse_timeout + 999) / 1000;
    dc.dimse_timeout_s = (s->dimse_timeout + 999) / 1000;
    rc = dicom_server_start(&dc, &handlers, &server, err, sizeof err);
    if (rc != 0) {
        log_error("cannot start DICOM service on %s:%d: %s", s->bind, s->port, err);
        goto out;
    }
    log_info("router %s listening on %s:%d; %zu nodes, N=%d W=%d, %zu move destinations",
             s->ae_title, s->bind, dicom_server_port(server), s->nnodes, s->replicas,
             s->write_quorum, s->ndests);

    int sig = sp_signals_wait();
    log_info("signal %d: shutting down", sig);
out:
    dicom_server_stop(&server);
    backend_destroy(&backend);
    keys_allowlist_destroy(&keys);
    return rc;
}

static void usage(FILE *f)
{
    fprintf(f, "usage: shardpacs-router --config FILE\n"
               "       shardpacs-router --help-config   (print every option with its default)\n");
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {{"config", required_argument, NULL, 'c'},
                                             {"help-config", no_argument, NULL, 'H'},
                                             {"help", no_argument, NULL, 'h'},
                                             {NULL, 0, NULL, 0}};
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
    log_init("router", level);
    rc = router_run(s);
    settings_free(s);
    free(s);
    return rc == 0 ? 0 : 1;
}
