/* cli.c - shardpacs: the administration command line.
 *
 *   shardpacs keygen KEYFILE [PUBFILE]       make a CURVE key pair
 *   shardpacs node CONNECTION stats          a node's counters (JSON)
 *   shardpacs node CONNECTION put --study UID --series UID --sop UID
 *                                 [--partition P] FILE  (P: the study's by default)
 *   shardpacs node CONNECTION get SOP_UID OUTFILE
 *   shardpacs node CONNECTION list STUDY_UID [SERIES_UID]
 *   shardpacs node CONNECTION find LEVEL Keyword=value ...
 *   shardpacs node CONNECTION digest PARTITION ...
 *   shardpacs status CONNECTION [--json]    the cluster, as one member sees it
 *   shardpacs locate CONNECTION STUDY_UID [--json]
 *   shardpacs drain CONNECTION NODE_ID
 *   shardpacs bootstrap --out DIR --node NAME=HOST:PORT[@SITE] ... --router ...
 *                                            a new cluster's files (bootstrap.c)
 * where CONNECTION is --connect ENDPOINT --server-key FILE --key FILE: any
 * member (its public key file) and the operator's key pair, which must be
 * listed in the cluster keys.
 *
 * The node commands speak to one storage node directly over the CURVE
 * transport with the operator's own listed key; they exist for inspection
 * and repair by hand, and the process tests use them as a real client.
 * Single-threaded. */
#include "../common/attrs.h"
#include "../common/base.h"
#include "../common/keys.h"
#include "../common/log.h"
#include "../common/placement.h"
#include "../common/ring.h"
#include "../common/transport.h"
#include "../common/wire.h"
#include "bootstrap.h"

#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static void usage(void)
{
    fprintf(stderr,
            "usage: shardpacs keygen KEYFILE [PUBFILE]\n"
            "       shardpacs node --connect ENDPOINT --server-key FILE --key FILE COMMAND ...\n"
            "  COMMAND: stats | put --study UID --series UID --sop UID [--partition P] FILE\n"
            "         | get SOP_UID OUTFILE | list STUDY_UID [SERIES_UID]\n"
            "         | find LEVEL Keyword=value ... | digest PARTITION ...\n"
            "       shardpacs status CONNECTION [--json]\n"
            "       shardpacs locate CONNECTION STUDY_UID [--json]\n"
            "       shardpacs drain CONNECTION NODE_ID\n"
            "       shardpacs bootstrap --out DIR --node NAME=HOST:PORT[@SITE] ... --router ...\n"
            "  CONNECTION: --connect ENDPOINT --server-key FILE --key FILE\n");
}

static int cmd_keygen(int argc, char **argv)
{
    if (argc < 1 || argc > 2) {
        usage();
        return 2;
    }
    keys_pair_t kp;
    int rc = keys_generate(&kp);
    if (rc == 0)
        rc = keys_write_pair(argv[0], &kp);
    if (rc == 0 && argc == 2)
        rc = keys_write_public(argv[1], kp.public_z85);
    if (rc != 0) {
        fprintf(stderr, "shardpacs: keygen %s: %s\n", argv[0], sp_strerror(rc));
        return 1;
    }
    printf("%s\n", kp.public_z85);
    return 0;
}

static int read_file(const char *path, uint8_t **data, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        return -errno;
    struct stat st;
    if (fstat(fileno(f), &st) != 0) {
        int rc = -errno;
        fclose(f);
        return rc;
    }
    *len = (size_t)st.st_size;
    *data = sp_malloc(*len);
    size_t got = fread(*data, 1, *len, f);
    fclose(f);
    if (got != *len) {
        free(*data);
        return -EIO;
    }
    return 0;
}

static int write_file(const char *path, const uint8_t *data, size_t len)
{
    FILE *f = fopen(path, "wb");
    if (f == NULL)
        return -errno;
    size_t put = fwrite(data, 1, len, f);
    if (fclose(f) != 0 || put != len)
        return -EIO;
    return 0;
}

/* Sends one request and decodes the reply. Returns 0 when the node answered
 * with status 0; otherwise prints why and returns the error. */
static int call(transport_client_t *c, const wire_request_t *req, const uint8_t *body,
                size_t body_len, wire_reply_t *rep, transport_response_t *raw)
{
    char err[512];
    int rc = wire_call(c, req, body, body_len, 0, rep, raw, err, sizeof err);
    if (rc != 0)
        fprintf(stderr, "shardpacs: %s\n", err);
    return rc;
}

static void print_instance(const wire_instance_t *w)
{
    char hex[2 * SP_DIGEST_LEN + 1];
    sp_hex(w->digest, SP_DIGEST_LEN, hex);
    printf("%u %s %s %s %s %s %llu %s\n", (unsigned)w->partition, w->study_uid, w->series_uid,
           w->sop_uid, w->sop_class_uid, w->transfer_syntax_uid, (unsigned long long)w->size, hex);
}

/* Lists a study (or series) page by page (LIST), calling fn for each
 * instance, until the node says the listing is exhausted. Returns 0 or the
 * first error, with the reason in err. */
static int list_pages(transport_client_t *c, const char *study, const char *series,
                      void (*fn)(void *ctx, const wire_instance_t *w), void *ctx, char *err,
                      size_t errlen)
{
    char *cursor = NULL;
    int rc = 0;
    do {
        wire_request_t req = {
            .kind = WIRE_LIST, .study_uid = (char *)study, .series_uid = (char *)series};
        req.cursor = cursor;
        wire_reply_t rep;
        transport_response_t raw;
        rc = wire_call(c, &req, NULL, 0, 0, &rep, &raw, err, errlen);
        free(cursor);
        cursor = NULL;
        if (rc != 0)
            break;
        for (size_t i = 0; i < rep.ninstances; i++)
            fn(ctx, &rep.instances[i]);
        cursor = rep.next_cursor;
        rep.next_cursor = NULL;
        wire_reply_free(&rep);
        transport_response_free(&raw);
    } while (cursor != NULL);
    return rc;
}

static void print_listed(void *ctx, const wire_instance_t *w)
{
    (void)ctx;
    print_instance(w);
}

static void print_match(const attrs_t *a)
{
    const char *sep = "";
    for (size_t i = 0; i < ATTR_COUNT; i++) {
        if (a->v[i] == NULL)
            continue;
        printf("%s%s=%s", sep, attr_info((attr_id_t)i)->keyword, a->v[i]);
        sep = "\t";
    }
    printf("\n");
}

static void print_stats(const wire_stats_t *s)
{
    printf("{\"node_id\": \"%s\", \"instances\": %llu, \"bytes\": %llu, \"studies\": %llu, "
           "\"conflicts\": %llu, \"conflicts_refused\": %llu, \"corrupt_reads\": %llu, "
           "\"db_size_bytes\": %llu, \"uptime_ms\": %llu, \"object_bytes_read\": %llu, "
           "\"metadata_rebuilt\": %llu}\n",
           s->node_id ? s->node_id : "", (unsigned long long)s->instances,
           (unsigned long long)s->bytes, (unsigned long long)s->studies,
           (unsigned long long)s->conflicts, (unsigned long long)s->conflicts_refused,
           (unsigned long long)s->corrupt_reads, (unsigned long long)s->db_size_bytes,
           (unsigned long long)s->uptime_ms, (unsigned long long)s->object_bytes_read,
           (unsigned long long)s->metadata_rebuilt);
}

/* Parses "put --study UID --series UID --sop UID [--partition P] FILE" into a
 * request and reads the file. */
static int parse_put(int argc, char **argv, wire_request_t *req, uint8_t **data, size_t *len)
{
    const char *file = NULL;
    bool partition_given = false;
    static const struct {
        const char *flag;
        attr_id_t id;
    } uid_flags[] = {{"--study", ATTR_STUDY_INSTANCE_UID},
                     {"--series", ATTR_SERIES_INSTANCE_UID},
                     {"--sop", ATTR_SOP_INSTANCE_UID},
                     {"--sop-class", ATTR_SOP_CLASS_UID}};
    for (int i = 0; i < argc; i++) {
        bool known = false;
        for (size_t k = 0; k < SP_ARRAY_LEN(uid_flags) && i + 1 < argc; k++) {
            if (strcmp(argv[i], uid_flags[k].flag) == 0) {
                attrs_set(&req->attrs, uid_flags[k].id, argv[++i]);
                known = true;
            }
        }
        if (known)
            continue;
        if (strcmp(argv[i], "--partition") == 0 && i + 1 < argc) {
            req->partition = (uint32_t)strtoul(argv[++i], NULL, 10);
            partition_given = true;
        } else if (file == NULL && argv[i][0] != '-')
            file = argv[i];
        else
            return SP_EINVAL;
    }
    if (file == NULL)
        return SP_EINVAL;
    const char *study = attrs_get(&req->attrs, ATTR_STUDY_INSTANCE_UID);
    if (!partition_given && study != NULL)
        req->partition = ring_partition(study); /* where the router would place it */
    int rc = read_file(file, data, len);
    if (rc != 0) {
        fprintf(stderr, "shardpacs: %s: %s\n", file, sp_strerror(rc));
        return rc;
    }
    sp_digest(*data, *len, req->digest);
    return 0;
}

static int parse_find(int argc, char **argv, wire_request_t *req)
{
    if (argc < 1 || attr_parse_level(argv[0], &req->level) != 0)
        return SP_EINVAL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--ci") == 0) {
            req->case_insensitive_names = true;
            continue;
        }
        char *eq = strchr(argv[i], '=');
        if (eq == NULL)
            return SP_EINVAL;
        *eq = '\0';
        const attr_info_t *info = attr_by_keyword(argv[i]);
        if (info == NULL) {
            fprintf(stderr, "shardpacs: unknown attribute %s\n", argv[i]);
            return SP_EINVAL;
        }
        attrs_set(&req->attrs, info->id, eq + 1);
    }
    return 0;
}

/* Runs one node command on an open client. */
static int node_command(transport_client_t *c, int argc, char **argv)
{
    wire_request_t req = {0};
    wire_reply_t rep = {0};
    transport_response_t raw = {0};
    uint8_t *data = NULL;
    size_t len = 0;
    int rc = SP_EINVAL;
    const char *cmd = argv[0];
    argc--, argv++;

    if (strcmp(cmd, "stats") == 0 && argc == 0) {
        req.kind = WIRE_STATS;
    } else if (strcmp(cmd, "put") == 0) {
        req.kind = WIRE_PUT;
        if ((rc = parse_put(argc, argv, &req, &data, &len)) != 0)
            goto out;
    } else if (strcmp(cmd, "get") == 0 && argc == 2) {
        req.kind = WIRE_GET;
        req.sop_uid = sp_strdup(argv[0]);
    } else if (strcmp(cmd, "list") == 0 && (argc == 1 || argc == 2)) {
        char err[512];
        rc =
            list_pages(c, argv[0], argc == 2 ? argv[1] : NULL, print_listed, NULL, err, sizeof err);
        if (rc != 0)
            fprintf(stderr, "shardpacs: %s\n", err);
        return rc;
    } else if (strcmp(cmd, "find") == 0) {
        req.kind = WIRE_FIND;
        if ((rc = parse_find(argc, argv, &req)) != 0)
            goto out;
    } else if (strcmp(cmd, "digest") == 0 && argc >= 1) {
        req.kind = WIRE_PARTITION_DIGEST;
        req.npartitions = (size_t)argc;
        req.partitions = sp_calloc((size_t)argc, sizeof(uint32_t));
        for (int i = 0; i < argc; i++)
            req.partitions[i] = (uint32_t)strtoul(argv[i], NULL, 10);
    } else {
        goto out;
    }

    rc = call(c, &req, data, len, &rep, &raw);
    if (rc != 0)
        goto out;
    switch (rep.kind) {
    case WIRE_PUT:
        printf("%s\n", rep.outcome == WIRE_STORED      ? "stored"
                       : rep.outcome == WIRE_DUPLICATE ? "duplicate"
                                                       : "conflict");
        rc = rep.outcome == WIRE_CONFLICT || rep.outcome == WIRE_CONFLICT_LIMIT ? SP_ECONFLICT : 0;
        break;
    case WIRE_GET: rc = write_file(argv[1], raw.body, raw.body_len); break;
    case WIRE_FIND:
        for (size_t i = 0; i < rep.nmatches; i++)
            print_match(&rep.matches[i]);
        break;
    case WIRE_PARTITION_DIGEST:
        for (size_t i = 0; i < rep.ndigests; i++) {
            char hex[2 * SP_DIGEST_LEN + 1];
            sp_hex(rep.digests[i].digest, SP_DIGEST_LEN, hex);
            printf("%u %llu %llu %s\n", (unsigned)rep.digests[i].partition,
                   (unsigned long long)rep.digests[i].count,
                   (unsigned long long)rep.digests[i].bytes, hex);
        }
        break;
    case WIRE_STATS: print_stats(&rep.stats); break;
    default: break;
    }
    wire_reply_free(&rep);
    transport_response_free(&raw);
out:
    if (rc == SP_EINVAL && rep.kind == WIRE_NONE)
        usage();
    free(data);
    wire_request_free(&req);
    return rc;
}

/* Parses CONNECTION (the leading --connect/--server-key/--key pairs) and
 * makes a client. Returns the client, with *used set to the arguments
 * consumed, or NULL after printing why (*used = -1 for a usage error). */
static transport_client_t *connect_from_args(int argc, char **argv, int *used, keys_pair_t *self,
                                             transport_config_t *tc)
{
    const char *endpoint = NULL, *server_key = NULL, *key = NULL;
    int i = 0;
    for (; i + 1 < argc && strncmp(argv[i], "--", 2) == 0; i += 2) {
        if (strcmp(argv[i], "--connect") == 0)
            endpoint = argv[i + 1];
        else if (strcmp(argv[i], "--server-key") == 0)
            server_key = argv[i + 1];
        else if (strcmp(argv[i], "--key") == 0)
            key = argv[i + 1];
        else
            break;
    }
    *used = -1;
    if (!endpoint || !server_key || !key)
        return NULL;
    char err[512], server_pub[KEYS_Z85_LEN + 1];
    if (keys_load_pair(key, self, err, sizeof err) != 0 ||
        keys_load_public(server_key, server_pub, err, sizeof err) != 0) {
        fprintf(stderr, "shardpacs: %s\n", err);
        *used = 0;
        return NULL;
    }
    transport_config_defaults(tc);
    const char *timeout = getenv("SHARDPACS_TIMEOUT_MS");
    if (timeout)
        tc->timeout_ms = atoi(timeout);
    tc->retries = 1;
    *used = i;
    return transport_client_new(tc, self, server_pub, endpoint);
}

static int cmd_node(int argc, char **argv)
{
    keys_pair_t self;
    transport_config_t tc;
    int used;
    transport_client_t *c = connect_from_args(argc, argv, &used, &self, &tc);
    if (c == NULL || used >= argc) {
        transport_client_destroy(&c);
        if (used != 0)
            usage();
        return used == 0 ? 1 : 2;
    }
    int rc = node_command(c, argc - used, argv + used);
    transport_client_destroy(&c);
    return rc == 0 ? 0 : rc == SP_EINVAL ? 2 : 1;
}

/* ---- cluster commands ---------------------------------------------------- */

static const char *role_name(gossip_role_t role)
{
    return role == GOSSIP_ROUTER ? "router" : "storage";
}

static json_t *member_json(const wire_member_status_t *m)
{
    json_t *o = json_object();
    json_object_set_new(o, "id", json_string(m->member.id));
    json_object_set_new(o, "endpoint", json_string(m->member.endpoint));
    json_object_set_new(o, "site", json_string(m->member.site));
    json_object_set_new(o, "role", json_string(role_name(m->member.role)));
    json_object_set_new(o, "state", json_string(gossip_state_name(m->member.state)));
    json_object_set_new(o, "incarnation", json_integer((json_int_t)m->member.incarnation));
    json_object_set_new(o, "weight", json_real(m->member.weight));
    json_object_set_new(o, "reachable", json_boolean(m->reachable));
    json_object_set_new(o, "partitions_owned", json_integer(m->partitions_owned));
    json_object_set_new(o, "partitions_held", json_integer(m->partitions_held));
    json_object_set_new(o, "instances", json_integer((json_int_t)m->instances));
    json_object_set_new(o, "bytes", json_integer((json_int_t)m->bytes));
    json_object_set_new(o, "disk_bytes", json_integer((json_int_t)m->disk_bytes));
    json_object_set_new(o, "disk_free", json_integer((json_int_t)m->disk_free));
    json_object_set_new(o, "refusing_puts", json_boolean(m->refusing_puts));
    json_object_set_new(o, "hints_pending", json_integer((json_int_t)m->hints_pending));
    json_object_set_new(o, "repair_bytes_done", json_integer((json_int_t)m->repair_bytes_done));
    json_object_set_new(o, "repair_bytes_pending",
                        json_integer((json_int_t)m->repair_bytes_pending));
    json_object_set_new(o, "repair_rate_bytes_per_s", json_real(m->repair_rate));
    json_object_set_new(o, "scrub_checked", json_integer((json_int_t)m->scrub_checked));
    json_object_set_new(o, "scrub_corrupt", json_integer((json_int_t)m->scrub_corrupt));
    json_object_set_new(o, "repaired", json_integer((json_int_t)m->repaired));
    return o;
}

/* Cluster totals of the per-member figures. */
typedef struct {
    uint64_t hints, done, pending;
    double rate, eta_s;
} totals_t;

static totals_t status_totals(const wire_status_t *st)
{
    totals_t t = {0};
    for (size_t i = 0; i < st->nmembers; i++) {
        t.hints += st->members[i].hints_pending;
        t.done += st->members[i].repair_bytes_done;
        t.pending += st->members[i].repair_bytes_pending;
        t.rate += st->members[i].repair_rate;
    }
    t.eta_s = t.pending == 0 ? 0 : t.rate > 0 ? (double)t.pending / t.rate : -1;
    return t;
}

static void print_status_json(const wire_status_t *st)
{
    totals_t t = status_totals(st);
    json_t *o = json_object();
    json_object_set_new(o, "from", json_string(st->from_id));
    json_object_set_new(o, "replicas", json_integer(st->replicas));
    json_object_set_new(o, "view_version", json_integer((json_int_t)st->view_version));
    json_object_set_new(o, "under_replicated_partitions",
                        json_integer(st->under_replicated_partitions));
    json_object_set_new(o, "partitions_with_data", json_integer(st->partitions_with_data));
    json_object_set_new(o, "hints_pending", json_integer((json_int_t)t.hints));
    json_t *repair = json_object();
    json_object_set_new(repair, "bytes_done", json_integer((json_int_t)t.done));
    json_object_set_new(repair, "bytes_pending", json_integer((json_int_t)t.pending));
    json_object_set_new(repair, "rate_bytes_per_s", json_real(t.rate));
    json_object_set_new(repair, "eta_s", t.eta_s >= 0 ? json_real(t.eta_s) : json_null());
    json_object_set_new(o, "repair", repair);
    json_t *members = json_array();
    for (size_t i = 0; i < st->nmembers; i++)
        json_array_append_new(members, member_json(&st->members[i]));
    json_object_set_new(o, "members", members);
    char *text = json_dumps(o, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    printf("%s\n", text);
    free(text);
    json_decref(o);
}

static void human_bytes(uint64_t n, char *out, size_t size)
{
    const char *units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    double v = (double)n;
    size_t u = 0;
    while (v >= 1024 && u + 1 < SP_ARRAY_LEN(units)) {
        v /= 1024;
        u++;
    }
    snprintf(out, size, u ? "%.1f %s" : "%.0f %s", v, units[u]);
}

static void print_status_text(const wire_status_t *st)
{
    totals_t t = status_totals(st);
    printf("cluster seen from %s (view %llu), N=%u\n", st->from_id,
           (unsigned long long)st->view_version, (unsigned)st->replicas);
    printf("%-12s %-8s %-9s %-10s %6s %6s %10s %10s %10s %7s\n", "MEMBER", "ROLE", "STATE", "SITE",
           "OWNS", "HOLDS", "INSTANCES", "DATA", "DISK", "HINTS");
    for (size_t i = 0; i < st->nmembers; i++) {
        const wire_member_status_t *m = &st->members[i];
        char data[32], disk[32];
        human_bytes(m->bytes, data, sizeof data);
        human_bytes(m->disk_bytes, disk, sizeof disk);
        if (m->member.role == GOSSIP_ROUTER)
            printf("%-12s %-8s %-9s %-10s\n", m->member.id, "router",
                   gossip_state_name(m->member.state), m->member.site);
        else
            printf("%-12s %-8s %-9s %-10s %6u %6u %10llu %10s %10s %7llu%s\n", m->member.id,
                   "storage", gossip_state_name(m->member.state), m->member.site,
                   m->partitions_owned, m->partitions_held, (unsigned long long)m->instances,
                   m->reachable ? data : "-", m->reachable ? disk : "-",
                   (unsigned long long)m->hints_pending,
                   !m->reachable      ? "  (no answer)"
                   : m->refusing_puts ? "  (disk below reserve: refusing new objects)"
                                      : "");
    }
    printf("partitions with data: %u, under-replicated: %u, hints pending: %llu\n",
           st->partitions_with_data, st->under_replicated_partitions, (unsigned long long)t.hints);
    if (t.pending > 0 || t.rate > 0) {
        char pending[32], done[32];
        human_bytes(t.pending, pending, sizeof pending);
        human_bytes(t.done, done, sizeof done);
        printf("repair: %s copied, %s to go at %.1f MB/s", done, pending, t.rate / 1e6);
        if (t.eta_s >= 0)
            printf(", about %.0f s left", t.eta_s);
        printf("\n");
    }
}

/* Asks the connected member for the cluster status. */
static int cluster_status(transport_client_t *c, wire_reply_t *rep, transport_response_t *raw)
{
    wire_request_t req = {.kind = WIRE_STATUS, .cluster = true};
    return call(c, &req, NULL, 0, rep, raw);
}

static bool flag_json(int argc, char **argv)
{
    for (int i = 0; i < argc; i++)
        if (strcmp(argv[i], "--json") == 0)
            return true;
    return false;
}

/* The first argument that is not --json, or NULL. */
static const char *first_operand(int argc, char **argv)
{
    for (int i = 0; i < argc; i++)
        if (strcmp(argv[i], "--json") != 0)
            return argv[i];
    return NULL;
}

/* Placement as the nodes compute it (placement.c), over a status reply's
 * members; writes indexes into st->members. */
static size_t locate_owners(const wire_status_t *st, uint32_t partition, size_t *owners)
{
    gossip_member_t *view = sp_calloc(st->nmembers ? st->nmembers : 1, sizeof *view);
    for (size_t i = 0; i < st->nmembers; i++)
        view[i] = st->members[i].member;
    placement_t pl;
    placement_init(&pl, view, st->nmembers, st->replicas);
    size_t k = placement_owners(&pl, partition, owners);
    placement_clear(&pl);
    free(view);
    return k;
}

static void count_listed(void *ctx, const wire_instance_t *w)
{
    (void)w;
    (*(long *)ctx)++;
}

/* How many instances of a study a member holds, or -1 if it did not say. */
static long study_count(const keys_pair_t *self, const transport_config_t *tc,
                        const gossip_member_t *m, const char *study)
{
    transport_client_t *c = transport_client_new(tc, self, m->public_key, m->endpoint);
    char err[512];
    long n = 0;
    if (list_pages(c, study, NULL, count_listed, &n, err, sizeof err) != 0)
        n = -1;
    transport_client_destroy(&c);
    return n;
}

static int locate(const keys_pair_t *self, const transport_config_t *tc, const wire_status_t *st,
                  const char *study, bool json)
{
    if (!sp_uid_valid(study)) {
        fprintf(stderr, "shardpacs: '%s' is not a valid Study Instance UID\n", study);
        return SP_EINVAL;
    }
    uint32_t partition = ring_partition(study);
    size_t owners[RING_MAX_REPLICAS];
    size_t k = locate_owners(st, partition, owners);
    json_t *o = json_object(), *reps = json_array();
    json_object_set_new(o, "study", json_string(study));
    json_object_set_new(o, "partition", json_integer(partition));
    if (!json)
        printf("study %s\npartition %u, replicas (in preference order):\n", study,
               (unsigned)partition);
    for (size_t i = 0; i < k; i++) {
        const gossip_member_t *m = &st->members[owners[i]].member;
        long n = gossip_state_reachable(m->state) ? study_count(self, tc, m, study) : -1;
        json_t *r = json_object();
        json_object_set_new(r, "id", json_string(m->id));
        json_object_set_new(r, "state", json_string(gossip_state_name(m->state)));
        json_object_set_new(r, "site", json_string(m->site));
        json_object_set_new(r, "instances", n >= 0 ? json_integer(n) : json_null());
        json_array_append_new(reps, r);
        if (!json)
            printf("  %-12s %-9s site %-10s %s%ld instances\n", m->id, gossip_state_name(m->state),
                   m->site, n >= 0 ? "" : "? ", n >= 0 ? n : 0);
    }
    json_object_set_new(o, "replicas", reps);
    if (json) {
        char *text = json_dumps(o, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
        printf("%s\n", text);
        free(text);
    }
    json_decref(o);
    return 0;
}

static int drain(const keys_pair_t *self, const transport_config_t *tc, const wire_status_t *st,
                 const char *node)
{
    const gossip_member_t *target = NULL;
    for (size_t i = 0; i < st->nmembers; i++)
        if (strcmp(st->members[i].member.id, node) == 0)
            target = &st->members[i].member;
    if (target == NULL || target->role != GOSSIP_STORAGE) {
        fprintf(stderr, "shardpacs: %s is not a storage member of this cluster\n", node);
        return SP_EINVAL;
    }
    transport_client_t *c = transport_client_new(tc, self, target->public_key, target->endpoint);
    wire_request_t req = {.kind = WIRE_DRAIN, .node_id = (char *)node};
    wire_reply_t rep;
    transport_response_t raw;
    int rc = call(c, &req, NULL, 0, &rep, &raw);
    transport_client_destroy(&c);
    if (rc != 0)
        return rc;
    wire_reply_free(&rep);
    transport_response_free(&raw);
    printf("%s is draining: its partitions stream to their new owners, then it leaves\n", node);
    return 0;
}

/* status, locate and drain: each starts from the connected member's view. */
static int cmd_cluster(const char *cmd, int argc, char **argv)
{
    keys_pair_t self;
    transport_config_t tc;
    int used;
    transport_client_t *c = connect_from_args(argc, argv, &used, &self, &tc);
    const char *operand = c ? first_operand(argc - used, argv + used) : NULL;
    bool json = c && flag_json(argc - used, argv + used);
    if (c == NULL || (strcmp(cmd, "status") != 0 && operand == NULL)) {
        transport_client_destroy(&c);
        if (used != 0)
            usage();
        return used == 0 ? 1 : 2;
    }
    wire_reply_t rep;
    transport_response_t raw;
    int rc = cluster_status(c, &rep, &raw);
    transport_client_destroy(&c);
    if (rc != 0)
        return 1;
    if (strcmp(cmd, "status") == 0) {
        if (json)
            print_status_json(&rep.status_body);
        else
            print_status_text(&rep.status_body);
    } else if (strcmp(cmd, "locate") == 0) {
        rc = locate(&self, &tc, &rep.status_body, operand, json);
    } else {
        rc = drain(&self, &tc, &rep.status_body, operand);
    }
    wire_reply_free(&rep);
    transport_response_free(&raw);
    return rc == 0 ? 0 : rc == SP_EINVAL ? 2 : 1;
}

int main(int argc, char **argv)
{
    log_init("shardpacs", LOG_WARN);
    if (argc >= 2 && strcmp(argv[1], "bootstrap") == 0)
        return bootstrap_main(argc - 1, argv + 1);
    if (argc >= 2 && strcmp(argv[1], "keygen") == 0)
        return cmd_keygen(argc - 2, argv + 2);
    if (argc >= 3 && strcmp(argv[1], "node") == 0)
        return cmd_node(argc - 2, argv + 2);
    if (argc >= 3 && (strcmp(argv[1], "status") == 0 || strcmp(argv[1], "locate") == 0 ||
                      strcmp(argv[1], "drain") == 0))
        return cmd_cluster(argv[1], argc - 2, argv + 2);
    usage();
    return 2;
}
