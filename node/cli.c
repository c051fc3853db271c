/* cli.c - shardpacs: the administration command line.
 *
 *   shardpacs keygen KEYFILE [PUBFILE]       make a CURVE key pair
 *   shardpacs node CONNECTION stats          a node's counters (JSON)
 *   shardpacs node CONNECTION put --study UID --series UID --sop UID
 *                                 [--partition P] FILE
 *   shardpacs node CONNECTION get SOP_UID OUTFILE
 *   shardpacs node CONNECTION list STUDY_UID [SERIES_UID]
 *   shardpacs node CONNECTION find LEVEL Keyword=value ...
 *   shardpacs node CONNECTION digest PARTITION ...
 * where CONNECTION is --connect ENDPOINT --server-key FILE --key FILE.
 *
 * The node commands speak to one storage node directly over the CURVE
 * transport with the operator's own listed key; they exist for inspection
 * and repair by hand, and the process tests use them as a real client.
 * Single-threaded. */
#include "../common/attrs.h"
#include "../common/base.h"
#include "../common/keys.h"
#include "../common/log.h"
#include "../common/transport.h"
#include "../common/wire.h"

#include <errno.h>
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
            "         | find LEVEL Keyword=value ... | digest PARTITION ...\n");
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
           "\"conflicts\": %llu, \"corrupt_reads\": %llu, \"db_size_bytes\": %llu, "
           "\"uptime_ms\": %llu}\n",
           s->node_id ? s->node_id : "", (unsigned long long)s->instances,
           (unsigned long long)s->bytes, (unsigned long long)s->studies,
           (unsigned long long)s->conflicts, (unsigned long long)s->corrupt_reads,
           (unsigned long long)s->db_size_bytes, (unsigned long long)s->uptime_ms);
}

/* Parses "put --study UID --series UID --sop UID [--partition P] FILE" into a
 * request and reads the file. */
static int parse_put(int argc, char **argv, wire_request_t *req, uint8_t **data, size_t *len)
{
    const char *file = NULL;
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
        if (strcmp(argv[i], "--partition") == 0 && i + 1 < argc)
            req->partition = (uint32_t)strtoul(argv[++i], NULL, 10);
        else if (file == NULL && argv[i][0] != '-')
            file = argv[i];
        else
            return SP_EINVAL;
    }
    if (file == NULL)
        return SP_EINVAL;
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
        req.kind = WIRE_LIST;
        req.study_uid = sp_strdup(argv[0]);
        req.series_uid = argc == 2 ? sp_strdup(argv[1]) : NULL;
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
        rc = rep.outcome == WIRE_CONFLICT ? SP_ECONFLICT : 0;
        break;
    case WIRE_GET: rc = write_file(argv[1], raw.body, raw.body_len); break;
    case WIRE_LIST:
        for (size_t i = 0; i < rep.ninstances; i++)
            print_instance(&rep.instances[i]);
        break;
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

static int cmd_node(int argc, char **argv)
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
    if (!endpoint || !server_key || !key || i >= argc) {
        usage();
        return 2;
    }
    char err[512], server_pub[KEYS_Z85_LEN + 1];
    keys_pair_t self;
    if (keys_load_pair(key, &self, err, sizeof err) != 0 ||
        keys_load_public(server_key, server_pub, err, sizeof err) != 0) {
        fprintf(stderr, "shardpacs: %s\n", err);
        return 1;
    }
    transport_config_t tc;
    transport_config_defaults(&tc);
    const char *timeout = getenv("SHARDPACS_TIMEOUT_MS");
    if (timeout)
        tc.timeout_ms = atoi(timeout);
    tc.retries = 1;
    transport_client_t *c = transport_client_new(&tc, &self, server_pub, endpoint);
    int rc = node_command(c, argc - i, argv + i);
    transport_client_destroy(&c);
    return rc == 0 ? 0 : rc == SP_EINVAL ? 2 : 1;
}

int main(int argc, char **argv)
{
    log_init("shardpacs", LOG_WARN);
    if (argc >= 2 && strcmp(argv[1], "keygen") == 0)
        return cmd_keygen(argc - 2, argv + 2);
    if (argc >= 3 && strcmp(argv[1], "node") == 0)
        return cmd_node(argc - 2, argv + 2);
    usage();
    return 2;
}
