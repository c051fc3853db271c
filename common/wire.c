/* wire.c - protobuf-c encoding and validated decoding of cluster messages
 * (wire.h). The only file that uses the generated shardpacs.pb-c.h names. */
#include "wire.h"

#include "keys.h"
#include "log.h"
#include "shardpacs.pb-c.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *wire_kind_name(wire_kind_t kind)
{
    static const char *names[] = {
        "none",  "put",    "get",    "list",  "find",     "partition-digest", "partition-list",
        "stats", "gossip", "status", "drain", "metadata", "metadata-list"};
    return (unsigned)kind < SP_ARRAY_LEN(names) ? names[kind] : "?";
}

/* ---- attribute lists ---------------------------------------------------- */

/* Points pb entries at a record's values (borrowed). Returns how many. */
static size_t attrs_to_pb(const attrs_t *a, Shardpacs__Attr *cells, Shardpacs__Attr **ptrs)
{
    size_t n = 0;
    for (size_t i = 0; i < ATTR_COUNT; i++) {
        if (a->v[i] == NULL)
            continue;
        shardpacs__attr__init(&cells[n]);
        cells[n].tag = attr_info((attr_id_t)i)->tag;
        cells[n].value = a->v[i];
        ptrs[n] = &cells[n];
        n++;
    }
    return n;
}

/* The longest value an attribute may have: a C-FIND key of a UID attribute
 * may be a list of thousands of UIDs, everything else is one short value. */
static size_t value_max(const attr_info_t *info, bool query)
{
    return query && info->kind == MATCH_UID ? WIRE_MAX_UID_LIST : WIRE_MAX_VALUE;
}

/* Whether every value of a record is within what attrs_from_pb() accepts. */
static bool attrs_fit(const attrs_t *a, bool query)
{
    for (size_t i = 0; i < ATTR_COUNT; i++)
        if (a->v[i] != NULL && strlen(a->v[i]) > value_max(attr_info((attr_id_t)i), query))
            return false;
    return true;
}

/* Stored: an instance's own attrs. Query: C-FIND keys. Result: a C-FIND
 * match, which may carry computed attributes too. */
typedef enum { ATTRS_STORED, ATTRS_QUERY, ATTRS_RESULT } attrs_use_t;

/* Copies a decoded attribute list into a record, refusing unknown or
 * repeated tags, oversized values, and values whose syntax the use forbids:
 * stored UIDs must be valid UIDs, query keys must be valid matching keys. */
static int attrs_from_pb(Shardpacs__Attr **list, size_t n, attrs_use_t use, attrs_t *out, char *err,
                         size_t errlen)
{
    if (n > WIRE_MAX_ATTRS) {
        sp_fmt(err, errlen, "%zu attributes (at most %d)", n, WIRE_MAX_ATTRS);
        return SP_EPROTO;
    }
    for (size_t i = 0; i < n; i++) {
        const attr_info_t *info = attr_by_tag(list[i]->tag);
        const char *value = list[i]->value ? list[i]->value : "";
        if (info == NULL || (use == ATTRS_STORED && info->id >= ATTR_STORED_COUNT)) {
            sp_fmt(err, errlen, "attribute tag %08x not accepted here", (unsigned)list[i]->tag);
            return SP_EPROTO;
        }
        if (out->v[info->id] != NULL) {
            sp_fmt(err, errlen, "attribute %s given twice", info->keyword);
            return SP_EPROTO;
        }
        size_t max = value_max(info, use == ATTRS_QUERY);
        if (strlen(value) > max) {
            sp_fmt(err, errlen, "attribute %s longer than %zu bytes", info->keyword, max);
            return SP_EPROTO;
        }
        bool ok = use == ATTRS_QUERY ? match_key_valid(info->kind, value) == 0
                  : info->kind == MATCH_UID && value[0] != '\0' ? sp_uid_valid(value)
                                                                : true;
        if (!ok) {
            sp_fmt(err, errlen, "attribute %s has a malformed value '%.80s'", info->keyword, value);
            return SP_EPROTO;
        }
        attrs_set(out, info->id, value);
    }
    return 0;
}

static int copy_digest(const ProtobufCBinaryData *d, uint8_t out[SP_DIGEST_LEN], char *err,
                       size_t errlen)
{
    if (d->len != SP_DIGEST_LEN) {
        sp_fmt(err, errlen, "digest of %zu bytes (expected %d)", d->len, SP_DIGEST_LEN);
        return SP_EPROTO;
    }
    memcpy(out, d->data, SP_DIGEST_LEN);
    return 0;
}

static int check_uid(const char *uid, const char *what, bool required, char *err, size_t errlen)
{
    if ((uid == NULL || uid[0] == '\0') && !required)
        return 0;
    if (uid == NULL || !sp_uid_valid(uid)) {
        sp_fmt(err, errlen, "%s '%.80s' is not a valid UID", what, uid ? uid : "");
        return SP_EPROTO;
    }
    return 0;
}

static char *dup_or_null(const char *s)
{
    return s && s[0] ? sp_strdup(s) : NULL;
}

/* ---- gossip messages ---------------------------------------------------- */

/* A gossip message's protobuf view; it borrows the C message's strings and
 * owns only the member arrays, until gossip_scratch_free(). */
typedef struct {
    Shardpacs__GossipMessage msg;
    Shardpacs__GossipMember *cells;
    Shardpacs__GossipMember **ptrs;
} gossip_scratch_t;

/* Points a protobuf member record at a C member's strings (borrowed). */
static void gossip_member_to_pb(const gossip_member_t *m, Shardpacs__GossipMember *c)
{
    shardpacs__gossip_member__init(c);
    c->id = (char *)m->id;
    c->endpoint = (char *)m->endpoint;
    c->site = (char *)m->site;
    c->public_key = (char *)m->public_key;
    c->role = (Shardpacs__GossipMember__Role)m->role;
    c->weight = m->weight;
    c->incarnation = m->incarnation;
    c->state = (Shardpacs__GossipMember__State)m->state;
    c->accuser = (char *)m->accuser;
}

static void gossip_to_pb(const gossip_msg_t *g, gossip_scratch_t *s)
{
    Shardpacs__GossipMessage *p = &s->msg;
    shardpacs__gossip_message__init(p);
    p->kind = (Shardpacs__GossipMessage__Kind)g->kind;
    p->from_id = (char *)g->from_id;
    p->from_endpoint = (char *)g->from_endpoint;
    p->to_id = (char *)g->to_id;
    p->to_endpoint = (char *)g->to_endpoint;
    p->seq = g->seq;
    p->target_id = (char *)g->target_id;
    p->target_endpoint = (char *)g->target_endpoint;
    if (g->n_updates == 0)
        return;
    s->cells = sp_calloc(g->n_updates, sizeof *s->cells);
    s->ptrs = sp_calloc(g->n_updates, sizeof *s->ptrs);
    for (size_t i = 0; i < g->n_updates; i++) {
        gossip_member_to_pb(&g->updates[i], &s->cells[i]);
        s->ptrs[i] = &s->cells[i];
    }
    p->n_members = g->n_updates;
    p->members = s->ptrs;
}

static void gossip_scratch_free(gossip_scratch_t *s)
{
    free(s->cells);
    free(s->ptrs);
    s->cells = NULL;
    s->ptrs = NULL;
}

static bool ascii_alnum(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
}

static bool ascii_hex(char c)
{
    return (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F') || (c >= '0' && c <= '9');
}

/* A member id: 1..63 characters of [A-Za-z0-9._-]. */
static bool gossip_id_ok(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n >= GOSSIP_ID_MAX)
        return false;
    for (size_t i = 0; i < n; i++)
        if (!ascii_alnum(s[i]) && s[i] != '.' && s[i] != '_' && s[i] != '-')
            return false;
    return true;
}

/* "tcp://HOST:PORT" under GOSSIP_ENDPOINT_MAX: HOST a name or IPv4 address
 * of [A-Za-z0-9.-] or an IPv6 address in brackets, PORT 1..65535. No
 * wildcards: this is where others connect to. */
static bool gossip_endpoint_ok(const char *s)
{
    if (strlen(s) >= GOSSIP_ENDPOINT_MAX || strncmp(s, "tcp://", 6) != 0)
        return false;
    const char *host = s + 6, *colon;
    if (host[0] == '[') {
        const char *close = strchr(host, ']');
        if (close == NULL || close == host + 1 || close[1] != ':')
            return false;
        for (const char *c = host + 1; c < close; c++)
            if (!ascii_hex(*c) && *c != ':' && *c != '.')
                return false;
        colon = close + 1;
    } else {
        colon = strchr(host, ':');
        if (colon == NULL || colon == host)
            return false;
        for (const char *c = host; c < colon; c++)
            if (!ascii_alnum(*c) && *c != '.' && *c != '-')
                return false;
    }
    const char *port = colon + 1;
    size_t digits = strlen(port);
    if (digits == 0 || digits > 5)
        return false;
    unsigned value = 0;
    for (size_t i = 0; i < digits; i++) {
        if (port[i] < '0' || port[i] > '9')
            return false;
        value = value * 10 + (unsigned)(port[i] - '0');
    }
    return value >= 1 && value <= 65535;
}

/* A site: 1..63 printable ASCII characters, no spaces. */
static bool gossip_site_ok(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n >= GOSSIP_SITE_MAX)
        return false;
    for (size_t i = 0; i < n; i++)
        if (s[i] < 0x21 || s[i] > 0x7e)
            return false;
    return true;
}

typedef enum { SYNTAX_ID, SYNTAX_ENDPOINT, SYNTAX_SITE, SYNTAX_KEY } gossip_syntax_t;

/* Checks one string field. Empty passes only if !required; anything else
 * must match the syntax. On failure the reason names field and quotes the
 * value with unprintable bytes masked (it goes into logs). */
static int gossip_check(const char *value, gossip_syntax_t syntax, bool required, const char *field,
                        char *err, size_t errlen)
{
    if (value == NULL || value[0] == '\0') {
        if (required) {
            sp_fmt(err, errlen, "gossip %s is missing", field);
            return SP_EPROTO;
        }
        return 0;
    }
    static const char *const rules[] = {
        [SYNTAX_ID] = "is not 1..63 characters of [A-Za-z0-9._-]",
        [SYNTAX_ENDPOINT] = "is not tcp://HOST:PORT of at most 127 characters",
        [SYNTAX_SITE] = "is not 1..63 printable characters without spaces",
        [SYNTAX_KEY] = "is not a Z85 public key of 40 characters",
    };
    bool ok = syntax == SYNTAX_ID         ? gossip_id_ok(value)
              : syntax == SYNTAX_ENDPOINT ? gossip_endpoint_ok(value)
              : syntax == SYNTAX_SITE     ? gossip_site_ok(value)
                                          : keys_z85_valid(value);
    if (ok)
        return 0;
    char shown[81];
    size_t n = strnlen(value, sizeof shown - 1);
    for (size_t i = 0; i < n; i++)
        shown[i] = value[i] >= 0x20 && value[i] < 0x7f ? value[i] : '?';
    shown[n] = '\0';
    sp_fmt(err, errlen, "gossip %s '%s' %s", field, shown, rules[syntax]);
    return SP_EPROTO;
}

/* Validates member record i and copies it into *m. */
static int gossip_member_from_pb(const Shardpacs__GossipMember *p, size_t i, gossip_member_t *m,
                                 char *err, size_t errlen)
{
    char f[48];
#define FIELD(name) (snprintf(f, sizeof f, "members[%zu].%s", i, name), f)
    int rc = gossip_check(p->id, SYNTAX_ID, true, FIELD("id"), err, errlen);
    if (rc == 0)
        rc = gossip_check(p->endpoint, SYNTAX_ENDPOINT, true, FIELD("endpoint"), err, errlen);
    if (rc == 0)
        rc = gossip_check(p->site, SYNTAX_SITE, true, FIELD("site"), err, errlen);
    if (rc == 0)
        rc = gossip_check(p->public_key, SYNTAX_KEY, true, FIELD("public_key"), err, errlen);
    if (rc != 0)
        return rc;
    if ((unsigned)p->role > GOSSIP_ROUTER) {
        sp_fmt(err, errlen, "gossip %s %d is unknown", FIELD("role"), (int)p->role);
        return SP_EPROTO;
    }
    if ((unsigned)p->state >= GOSSIP_STATE_COUNT) {
        sp_fmt(err, errlen, "gossip %s %d is unknown", FIELD("state"), (int)p->state);
        return SP_EPROTO;
    }
    bool storage = p->role == SHARDPACS__GOSSIP_MEMBER__ROLE__STORAGE;
    if (!isfinite(p->weight) || (storage ? !(p->weight > 0) : p->weight < 0)) {
        sp_fmt(err, errlen, "gossip %s %g is not finite and %s", FIELD("weight"), p->weight,
               storage ? "> 0 (storage)" : ">= 0 (router)");
        return SP_EPROTO;
    }
    bool suspect = p->state == SHARDPACS__GOSSIP_MEMBER__STATE__SUSPECT;
    rc = gossip_check(p->accuser, SYNTAX_ID, suspect, FIELD("accuser"), err, errlen);
    if (rc == 0 && !suspect && p->accuser && p->accuser[0] != '\0') {
        sp_fmt(err, errlen, "gossip %s must be empty unless the state is suspect",
               FIELD("accuser"));
        rc = SP_EPROTO;
    }
#undef FIELD
    if (rc != 0)
        return rc;
    sp_strlcpy(m->id, p->id, sizeof m->id);
    sp_strlcpy(m->endpoint, p->endpoint, sizeof m->endpoint);
    sp_strlcpy(m->site, p->site, sizeof m->site);
    sp_strlcpy(m->public_key, p->public_key, sizeof m->public_key);
    m->role = (gossip_role_t)p->role;
    m->weight = p->weight;
    m->incarnation = p->incarnation;
    m->state = (gossip_state_t)p->state;
    sp_strlcpy(m->accuser, suspect ? p->accuser : "", sizeof m->accuser);
    return 0;
}

/* Validates a gossip message and copies it into *g, which then owns a
 * malloc'd updates array (also on failure: the caller frees *g with
 * gossip_msg_clear()). */
static int gossip_from_pb(const Shardpacs__GossipMessage *p, gossip_msg_t *g, char *err,
                          size_t errlen)
{
    if ((int)p->kind < GOSSIP_PING || (int)p->kind > GOSSIP_SYNC) {
        sp_fmt(err, errlen, "gossip kind %d is unknown", (int)p->kind);
        return SP_EPROTO;
    }
    gossip_kind_t kind = (gossip_kind_t)p->kind;
    /* A target names the member a PING_REQ is about; ACK and NACK may echo
     * it when they answer one; nothing else has a target. */
    bool target_needed = kind == GOSSIP_PING_REQ;
    bool target_allowed = target_needed || kind == GOSSIP_ACK || kind == GOSSIP_NACK;
    int rc = gossip_check(p->from_id, SYNTAX_ID, true, "from_id", err, errlen);
    if (rc == 0)
        rc = gossip_check(p->from_endpoint, SYNTAX_ENDPOINT, true, "from_endpoint", err, errlen);
    if (rc == 0)
        rc = gossip_check(p->to_id, SYNTAX_ID, false, "to_id", err, errlen);
    if (rc == 0)
        rc = gossip_check(p->to_endpoint, SYNTAX_ENDPOINT, true, "to_endpoint", err, errlen);
    if (rc == 0)
        rc = gossip_check(p->target_id, SYNTAX_ID, target_needed, "target_id", err, errlen);
    if (rc == 0)
        rc = gossip_check(p->target_endpoint, SYNTAX_ENDPOINT, target_needed, "target_endpoint",
                          err, errlen);
    if (rc != 0)
        return rc;
    if (!target_allowed && ((p->target_id && p->target_id[0] != '\0') ||
                            (p->target_endpoint && p->target_endpoint[0] != '\0'))) {
        sp_fmt(err, errlen, "gossip target_id/target_endpoint given on a kind %d message",
               (int)kind);
        return SP_EPROTO;
    }
    if (p->n_members > GOSSIP_MAX_MEMBERS) {
        sp_fmt(err, errlen, "gossip members: %zu records (at most %d)", p->n_members,
               GOSSIP_MAX_MEMBERS);
        return SP_EPROTO;
    }
    g->kind = kind;
    sp_strlcpy(g->from_id, p->from_id, sizeof g->from_id);
    sp_strlcpy(g->from_endpoint, p->from_endpoint, sizeof g->from_endpoint);
    sp_strlcpy(g->to_id, p->to_id ? p->to_id : "", sizeof g->to_id);
    sp_strlcpy(g->to_endpoint, p->to_endpoint, sizeof g->to_endpoint);
    g->seq = p->seq;
    sp_strlcpy(g->target_id, p->target_id ? p->target_id : "", sizeof g->target_id);
    sp_strlcpy(g->target_endpoint, p->target_endpoint ? p->target_endpoint : "",
               sizeof g->target_endpoint);
    if (p->n_members == 0)
        return 0;
    g->updates = sp_calloc(p->n_members, sizeof *g->updates);
    g->n_updates = p->n_members;
    for (size_t i = 0; i < p->n_members && rc == 0; i++)
        rc = gossip_member_from_pb(p->members[i], i, &g->updates[i], err, errlen);
    return rc;
}

static const char *const policy_names[] = {"unset", "reject", "keep-first", "keep-newest"};

int wire_policy_parse(const char *name, wire_policy_t *out)
{
    for (size_t i = WIRE_POLICY_REJECT; name != NULL && i < SP_ARRAY_LEN(policy_names); i++)
        if (strcmp(name, policy_names[i]) == 0) {
            *out = (wire_policy_t)i;
            return 0;
        }
    return SP_EINVAL;
}

const char *wire_policy_name(wire_policy_t policy)
{
    return (unsigned)policy < SP_ARRAY_LEN(policy_names) ? policy_names[policy] : "unset";
}

/* ---- requests ----------------------------------------------------------- */

int wire_encode_request(const wire_request_t *req, uint8_t **out, size_t *len)
{
    Shardpacs__Request msg = SHARDPACS__REQUEST__INIT;
    Shardpacs__PutRequest put = SHARDPACS__PUT_REQUEST__INIT;
    Shardpacs__GetRequest get = SHARDPACS__GET_REQUEST__INIT;
    Shardpacs__MetadataRequest meta = SHARDPACS__METADATA_REQUEST__INIT;
    Shardpacs__MetadataListRequest mlist = SHARDPACS__METADATA_LIST_REQUEST__INIT;
    Shardpacs__ListRequest list = SHARDPACS__LIST_REQUEST__INIT;
    Shardpacs__FindRequest find = SHARDPACS__FIND_REQUEST__INIT;
    Shardpacs__PartitionDigestRequest pdig = SHARDPACS__PARTITION_DIGEST_REQUEST__INIT;
    Shardpacs__PartitionListRequest plist = SHARDPACS__PARTITION_LIST_REQUEST__INIT;
    Shardpacs__StatsRequest stats = SHARDPACS__STATS_REQUEST__INIT;
    Shardpacs__StatusRequest status = SHARDPACS__STATUS_REQUEST__INIT;
    Shardpacs__DrainRequest drain = SHARDPACS__DRAIN_REQUEST__INIT;
    Shardpacs__Attr cells[ATTR_COUNT];
    Shardpacs__Attr *ptrs[ATTR_COUNT];
    gossip_scratch_t gossip = {0};

    switch (req->kind) {
    case WIRE_PUT:
        put.partition = req->partition;
        put.n_attrs = attrs_to_pb(&req->attrs, cells, ptrs);
        put.attrs = ptrs;
        put.digest.data = (uint8_t *)req->digest;
        put.digest.len = SP_DIGEST_LEN;
        put.version = req->version;
        put.policy = (Shardpacs__DuplicatePolicy)req->policy;
        msg.body_case = SHARDPACS__REQUEST__BODY_PUT;
        msg.put = &put;
        break;
    case WIRE_GET:
        get.sop_instance_uid = req->sop_uid ? req->sop_uid : "";
        msg.body_case = SHARDPACS__REQUEST__BODY_GET;
        msg.get = &get;
        break;
    case WIRE_METADATA:
        meta.sop_instance_uid = req->sop_uid ? req->sop_uid : "";
        msg.body_case = SHARDPACS__REQUEST__BODY_METADATA;
        msg.metadata = &meta;
        break;
    case WIRE_METADATA_LIST:
        mlist.study_instance_uid = req->study_uid ? req->study_uid : "";
        mlist.series_instance_uid = req->series_uid ? req->series_uid : "";
        mlist.cursor = req->cursor ? req->cursor : "";
        mlist.limit = req->limit;
        msg.body_case = SHARDPACS__REQUEST__BODY_METADATA_LIST;
        msg.metadata_list = &mlist;
        break;
    case WIRE_LIST:
        list.study_instance_uid = req->study_uid ? req->study_uid : "";
        list.series_instance_uid = req->series_uid ? req->series_uid : "";
        list.cursor = req->cursor ? req->cursor : "";
        list.limit = req->limit;
        msg.body_case = SHARDPACS__REQUEST__BODY_LIST;
        msg.list = &list;
        break;
    case WIRE_FIND:
        /* Every node would refuse it: say so here, once, as too big. */
        if (!attrs_fit(&req->attrs, true))
            return SP_ETOOBIG;
        find.level = (Shardpacs__FindRequest__Level)req->level;
        find.n_keys = attrs_to_pb(&req->attrs, cells, ptrs);
        find.keys = ptrs;
        find.case_insensitive_names = req->case_insensitive_names;
        find.limit = req->limit;
        msg.body_case = SHARDPACS__REQUEST__BODY_FIND;
        msg.find = &find;
        break;
    case WIRE_PARTITION_DIGEST:
        pdig.n_partitions = req->npartitions;
        pdig.partitions = req->partitions;
        pdig.nonempty = req->nonempty;
        msg.body_case = SHARDPACS__REQUEST__BODY_PARTITION_DIGEST;
        msg.partition_digest = &pdig;
        break;
    case WIRE_PARTITION_LIST:
        plist.partition = req->partition;
        plist.cursor = req->cursor ? req->cursor : "";
        plist.limit = req->limit;
        msg.body_case = SHARDPACS__REQUEST__BODY_PARTITION_LIST;
        msg.partition_list = &plist;
        break;
    case WIRE_STATS:
        msg.body_case = SHARDPACS__REQUEST__BODY_STATS;
        msg.stats = &stats;
        break;
    case WIRE_GOSSIP:
        gossip_to_pb(&req->gossip, &gossip);
        msg.body_case = SHARDPACS__REQUEST__BODY_GOSSIP;
        msg.gossip = &gossip.msg;
        break;
    case WIRE_STATUS:
        status.cluster = req->cluster;
        msg.body_case = SHARDPACS__REQUEST__BODY_MEMBER_STATUS;
        msg.member_status = &status;
        break;
    case WIRE_DRAIN:
        drain.node_id = req->node_id ? req->node_id : "";
        msg.body_case = SHARDPACS__REQUEST__BODY_DRAIN;
        msg.drain = &drain;
        break;
    default: return SP_EINVAL;
    }
    *len = shardpacs__request__get_packed_size(&msg);
    *out = sp_malloc(*len);
    shardpacs__request__pack(&msg, *out);
    gossip_scratch_free(&gossip);
    return 0;
}

/* A version and its policy, as a put, a get reply and a listing carry them:
 * a known policy, a version no later than WIRE_VERSION_MAX, and both set or
 * both unset (a policy needs a version to order by, and a version without a
 * policy would be ignored, which hides a router's bug). */
static int version_from_pb(uint64_t version, int policy, uint64_t *vout, wire_policy_t *pout,
                           char *err, size_t errlen)
{
    if (policy < WIRE_POLICY_UNSET || policy > WIRE_POLICY_KEEP_NEWEST) {
        sp_fmt(err, errlen, "unknown duplicate policy %d", policy);
        return SP_EPROTO;
    }
    if (version > WIRE_VERSION_MAX) {
        sp_fmt(err, errlen, "version %llu out of range", (unsigned long long)version);
        return SP_EPROTO;
    }
    if ((version == 0) != (policy == WIRE_POLICY_UNSET)) {
        sp_fmt(err, errlen, "version and duplicate policy must be set together");
        return SP_EPROTO;
    }
    *vout = version;
    *pout = (wire_policy_t)policy;
    return 0;
}

static int decode_put(const Shardpacs__PutRequest *m, wire_request_t *out, char *err, size_t errlen)
{
    if (m->partition >= WIRE_PARTITIONS_MAX) {
        sp_fmt(err, errlen, "partition %u out of range", (unsigned)m->partition);
        return SP_EPROTO;
    }
    out->partition = m->partition;
    int rc = attrs_from_pb(m->attrs, m->n_attrs, ATTRS_STORED, &out->attrs, err, errlen);
    if (rc == 0)
        rc = copy_digest(&m->digest, out->digest, err, errlen);
    if (rc == 0)
        rc = version_from_pb(m->version, (int)m->policy, &out->version, &out->policy, err, errlen);
    static const attr_id_t required[] = {ATTR_STUDY_INSTANCE_UID, ATTR_SERIES_INSTANCE_UID,
                                         ATTR_SOP_INSTANCE_UID};
    for (size_t i = 0; rc == 0 && i < SP_ARRAY_LEN(required); i++)
        rc = check_uid(attrs_get(&out->attrs, required[i]), attr_info(required[i])->keyword, true,
                       err, errlen);
    return rc;
}

static int decode_request_body(const Shardpacs__Request *m, wire_request_t *out, char *err,
                               size_t errlen)
{
    int rc = 0;
    switch (m->body_case) {
    case SHARDPACS__REQUEST__BODY_PUT:
        out->kind = WIRE_PUT;
        return decode_put(m->put, out, err, errlen);
    case SHARDPACS__REQUEST__BODY_GET:
        out->kind = WIRE_GET;
        rc = check_uid(m->get->sop_instance_uid, "SOPInstanceUID", true, err, errlen);
        out->sop_uid = rc == 0 ? sp_strdup(m->get->sop_instance_uid) : NULL;
        return rc;
    case SHARDPACS__REQUEST__BODY_METADATA_LIST: {
        const Shardpacs__MetadataListRequest *l = m->metadata_list;
        out->kind = WIRE_METADATA_LIST;
        rc = check_uid(l->study_instance_uid, "StudyInstanceUID", true, err, errlen);
        if (rc == 0)
            rc = check_uid(l->series_instance_uid, "SeriesInstanceUID", false, err, errlen);
        if (rc == 0 && strlen(l->cursor) > 3 * 65) {
            sp_fmt(err, errlen, "metadata list cursor of %zu bytes", strlen(l->cursor));
            rc = SP_EPROTO;
        }
        if (rc == 0) {
            out->study_uid = sp_strdup(l->study_instance_uid);
            out->series_uid = dup_or_null(l->series_instance_uid);
            out->cursor = dup_or_null(l->cursor);
            out->limit = l->limit;
        }
        return rc;
    }
    case SHARDPACS__REQUEST__BODY_METADATA:
        out->kind = WIRE_METADATA;
        rc = check_uid(m->metadata->sop_instance_uid, "SOPInstanceUID", true, err, errlen);
        out->sop_uid = rc == 0 ? sp_strdup(m->metadata->sop_instance_uid) : NULL;
        return rc;
    case SHARDPACS__REQUEST__BODY_LIST:
        out->kind = WIRE_LIST;
        rc = check_uid(m->list->study_instance_uid, "StudyInstanceUID", true, err, errlen);
        if (rc == 0)
            rc = check_uid(m->list->series_instance_uid, "SeriesInstanceUID", false, err, errlen);
        if (rc == 0 && strlen(m->list->cursor) > 3 * 65) {
            sp_fmt(err, errlen, "list cursor of %zu bytes", strlen(m->list->cursor));
            rc = SP_EPROTO;
        }
        if (rc == 0) {
            out->study_uid = sp_strdup(m->list->study_instance_uid);
            out->series_uid = dup_or_null(m->list->series_instance_uid);
            out->cursor = dup_or_null(m->list->cursor);
            out->limit = m->list->limit;
        }
        return rc;
    case SHARDPACS__REQUEST__BODY_FIND:
        out->kind = WIRE_FIND;
        if ((unsigned)m->find->level > LEVEL_IMAGE) {
            sp_fmt(err, errlen, "unknown query level %d", (int)m->find->level);
            return SP_EPROTO;
        }
        out->level = (level_t)m->find->level;
        out->case_insensitive_names = m->find->case_insensitive_names;
        out->limit = m->find->limit;
        return attrs_from_pb(m->find->keys, m->find->n_keys, ATTRS_QUERY, &out->attrs, err, errlen);
    case SHARDPACS__REQUEST__BODY_PARTITION_DIGEST:
        out->kind = WIRE_PARTITION_DIGEST;
        if (m->partition_digest->n_partitions > WIRE_PARTITIONS_MAX) {
            sp_fmt(err, errlen, "too many partitions");
            return SP_EPROTO;
        }
        for (size_t i = 0; i < m->partition_digest->n_partitions; i++) {
            if (m->partition_digest->partitions[i] >= WIRE_PARTITIONS_MAX) {
                sp_fmt(err, errlen, "partition %u out of range",
                       (unsigned)m->partition_digest->partitions[i]);
                return SP_EPROTO;
            }
        }
        out->nonempty = m->partition_digest->nonempty;
        out->npartitions = m->partition_digest->n_partitions;
        out->partitions =
            sp_memdup(m->partition_digest->partitions, out->npartitions * sizeof(uint32_t));
        return 0;
    case SHARDPACS__REQUEST__BODY_PARTITION_LIST:
        out->kind = WIRE_PARTITION_LIST;
        if (m->partition_list->partition >= WIRE_PARTITIONS_MAX ||
            strlen(m->partition_list->cursor) > 3 * 65) {
            sp_fmt(err, errlen, "partition or cursor out of range");
            return SP_EPROTO;
        }
        out->partition = m->partition_list->partition;
        out->limit = m->partition_list->limit;
        out->cursor = dup_or_null(m->partition_list->cursor);
        return 0;
    case SHARDPACS__REQUEST__BODY_STATS: out->kind = WIRE_STATS; return 0;
    case SHARDPACS__REQUEST__BODY_GOSSIP:
        out->kind = WIRE_GOSSIP;
        return gossip_from_pb(m->gossip, &out->gossip, err, errlen);
    case SHARDPACS__REQUEST__BODY_MEMBER_STATUS:
        out->kind = WIRE_STATUS;
        out->cluster = m->member_status->cluster;
        return 0;
    case SHARDPACS__REQUEST__BODY_DRAIN:
        out->kind = WIRE_DRAIN;
        rc = gossip_check(m->drain->node_id, SYNTAX_ID, true, "drain node_id", err, errlen);
        out->node_id = rc == 0 ? sp_strdup(m->drain->node_id) : NULL;
        return rc;
    default:
        sp_fmt(err, errlen, "request of unknown kind %d", (int)m->body_case);
        return SP_EUNKNOWN;
    }
}

int wire_decode_request(const uint8_t *buf, size_t len, wire_request_t *out, char *err,
                        size_t errlen)
{
    memset(out, 0, sizeof *out);
    Shardpacs__Request *m = shardpacs__request__unpack(NULL, len, buf);
    if (m == NULL) {
        sp_fmt(err, errlen, "request of %zu bytes is not a valid message", len);
        return SP_EPROTO;
    }
    int rc = decode_request_body(m, out, err, errlen);
    shardpacs__request__free_unpacked(m, NULL);
    if (rc != 0)
        wire_request_free(out);
    return rc;
}

void wire_request_free(wire_request_t *req)
{
    attrs_clear(&req->attrs);
    free(req->sop_uid);
    free(req->study_uid);
    free(req->series_uid);
    free(req->partitions);
    free(req->cursor);
    free(req->node_id);
    gossip_msg_clear(&req->gossip);
    memset(req, 0, sizeof *req);
}

/* ---- replies ------------------------------------------------------------ */

static void instance_to_pb(const wire_instance_t *w, Shardpacs__InstanceRef *p)
{
    shardpacs__instance_ref__init(p);
    p->partition = w->partition;
    p->study_instance_uid = w->study_uid ? w->study_uid : "";
    p->series_instance_uid = w->series_uid ? w->series_uid : "";
    p->sop_instance_uid = w->sop_uid ? w->sop_uid : "";
    p->sop_class_uid = w->sop_class_uid ? w->sop_class_uid : "";
    p->transfer_syntax_uid = w->transfer_syntax_uid ? w->transfer_syntax_uid : "";
    p->size = w->size;
    p->digest.data = (uint8_t *)w->digest;
    p->digest.len = SP_DIGEST_LEN;
    p->version = w->version;
    p->policy = (Shardpacs__DuplicatePolicy)w->policy;
    p->metadata_size = w->metadata_size;
}

/* Scratch space an encoded reply borrows until it is packed. */
typedef struct {
    Shardpacs__InstanceRef *refs;
    Shardpacs__InstanceRef **ref_ptrs;
    Shardpacs__FindMatch *matches;
    Shardpacs__FindMatch **match_ptrs;
    Shardpacs__Attr *cells;
    Shardpacs__Attr **cell_ptrs;
    Shardpacs__PartitionDigest *digests;
    Shardpacs__PartitionDigest **digest_ptrs;
    Shardpacs__MemberStatus *mstat;
    Shardpacs__MemberStatus **mstat_ptrs;
    Shardpacs__GossipMember *mcells;
} reply_scratch_t;

static void scratch_instances(reply_scratch_t *s, const wire_reply_t *rep)
{
    s->refs = sp_calloc(rep->ninstances, sizeof *s->refs);
    s->ref_ptrs = sp_calloc(rep->ninstances, sizeof *s->ref_ptrs);
    for (size_t i = 0; i < rep->ninstances; i++) {
        instance_to_pb(&rep->instances[i], &s->refs[i]);
        s->ref_ptrs[i] = &s->refs[i];
    }
}

static void scratch_matches(reply_scratch_t *s, const wire_reply_t *rep)
{
    s->matches = sp_calloc(rep->nmatches, sizeof *s->matches);
    s->match_ptrs = sp_calloc(rep->nmatches, sizeof *s->match_ptrs);
    s->cells = sp_calloc(rep->nmatches * ATTR_COUNT, sizeof *s->cells);
    s->cell_ptrs = sp_calloc(rep->nmatches * ATTR_COUNT, sizeof *s->cell_ptrs);
    for (size_t i = 0; i < rep->nmatches; i++) {
        shardpacs__find_match__init(&s->matches[i]);
        s->matches[i].attrs = &s->cell_ptrs[i * ATTR_COUNT];
        s->matches[i].n_attrs =
            attrs_to_pb(&rep->matches[i], &s->cells[i * ATTR_COUNT], &s->cell_ptrs[i * ATTR_COUNT]);
        s->match_ptrs[i] = &s->matches[i];
    }
}

static void scratch_digests(reply_scratch_t *s, const wire_reply_t *rep)
{
    s->digests = sp_calloc(rep->ndigests, sizeof *s->digests);
    s->digest_ptrs = sp_calloc(rep->ndigests, sizeof *s->digest_ptrs);
    for (size_t i = 0; i < rep->ndigests; i++) {
        Shardpacs__PartitionDigest *d = &s->digests[i];
        shardpacs__partition_digest__init(d);
        d->partition = rep->digests[i].partition;
        d->count = rep->digests[i].count;
        d->bytes = rep->digests[i].bytes;
        d->digest.data = (uint8_t *)rep->digests[i].digest;
        d->digest.len = SP_DIGEST_LEN;
        s->digest_ptrs[i] = d;
    }
}

static void scratch_status(reply_scratch_t *s, const wire_status_t *st, Shardpacs__StatusReply *p)
{
    s->mstat = sp_calloc(st->nmembers, sizeof *s->mstat);
    s->mstat_ptrs = sp_calloc(st->nmembers, sizeof *s->mstat_ptrs);
    s->mcells = sp_calloc(st->nmembers, sizeof *s->mcells);
    for (size_t i = 0; i < st->nmembers; i++) {
        const wire_member_status_t *w = &st->members[i];
        Shardpacs__MemberStatus *c = &s->mstat[i];
        shardpacs__member_status__init(c);
        gossip_member_to_pb(&w->member, &s->mcells[i]);
        c->member = &s->mcells[i];
        c->reachable = w->reachable;
        c->partitions_owned = w->partitions_owned;
        c->partitions_held = w->partitions_held;
        c->instances = w->instances;
        c->bytes = w->bytes;
        c->disk_bytes = w->disk_bytes;
        c->hints_pending = w->hints_pending;
        c->repair_bytes_done = w->repair_bytes_done;
        c->repair_bytes_pending = w->repair_bytes_pending;
        c->repair_rate = w->repair_rate;
        c->scrub_checked = w->scrub_checked;
        c->scrub_corrupt = w->scrub_corrupt;
        c->repaired = w->repaired;
        c->disk_free = w->disk_free;
        c->refusing_puts = w->refusing_puts;
        s->mstat_ptrs[i] = c;
    }
    p->from_id = st->from_id ? st->from_id : "";
    p->replicas = st->replicas;
    p->view_version = st->view_version;
    p->n_members = st->nmembers;
    p->members = s->mstat_ptrs;
    p->under_replicated_partitions = st->under_replicated_partitions;
    p->partitions_with_data = st->partitions_with_data;
}

static void scratch_free(reply_scratch_t *s)
{
    free(s->mstat);
    free(s->mstat_ptrs);
    free(s->mcells);
    free(s->refs);
    free(s->ref_ptrs);
    free(s->matches);
    free(s->match_ptrs);
    free(s->cells);
    free(s->cell_ptrs);
    free(s->digests);
    free(s->digest_ptrs);
}

int wire_encode_reply(const wire_reply_t *rep, uint8_t **out, size_t *len)
{
    Shardpacs__Reply msg = SHARDPACS__REPLY__INIT;
    Shardpacs__PutReply put = SHARDPACS__PUT_REPLY__INIT;
    Shardpacs__GetReply get = SHARDPACS__GET_REPLY__INIT;
    Shardpacs__ListReply list = SHARDPACS__LIST_REPLY__INIT;
    Shardpacs__FindReply find = SHARDPACS__FIND_REPLY__INIT;
    Shardpacs__PartitionDigestReply pdig = SHARDPACS__PARTITION_DIGEST_REPLY__INIT;
    Shardpacs__PartitionListReply plist = SHARDPACS__PARTITION_LIST_REPLY__INIT;
    Shardpacs__MetadataListReply mlist = SHARDPACS__METADATA_LIST_REPLY__INIT;
    Shardpacs__StatsReply stats = SHARDPACS__STATS_REPLY__INIT;
    Shardpacs__GossipReply gossip_reply = SHARDPACS__GOSSIP_REPLY__INIT;
    Shardpacs__StatusReply status = SHARDPACS__STATUS_REPLY__INIT;
    Shardpacs__DrainReply drain = SHARDPACS__DRAIN_REPLY__INIT;
    Shardpacs__Attr cells[ATTR_COUNT];
    Shardpacs__Attr *ptrs[ATTR_COUNT];
    reply_scratch_t scratch = {0};
    gossip_scratch_t gossip = {0};

    msg.status = rep->status;
    msg.error = rep->error ? rep->error : "";
    if (rep->status == 0) {
        switch (rep->kind) {
        case WIRE_PUT:
            put.outcome = (Shardpacs__PutReply__Outcome)rep->outcome;
            msg.body_case = SHARDPACS__REPLY__BODY_PUT;
            msg.put = &put;
            break;
        case WIRE_GET:
        case WIRE_METADATA:
            get.partition = rep->partition;
            get.n_attrs = attrs_to_pb(&rep->attrs, cells, ptrs);
            get.attrs = ptrs;
            get.digest.data = (uint8_t *)rep->digest;
            get.digest.len = SP_DIGEST_LEN;
            get.version = rep->version;
            get.policy = (Shardpacs__DuplicatePolicy)rep->policy;
            if (rep->kind == WIRE_GET) {
                msg.body_case = SHARDPACS__REPLY__BODY_GET;
                msg.get = &get;
            } else {
                msg.body_case = SHARDPACS__REPLY__BODY_METADATA;
                msg.metadata = &get;
            }
            break;
        case WIRE_LIST:
            scratch_instances(&scratch, rep);
            list.n_instances = rep->ninstances;
            list.instances = scratch.ref_ptrs;
            list.next_cursor = rep->next_cursor ? rep->next_cursor : "";
            msg.body_case = SHARDPACS__REPLY__BODY_LIST;
            msg.list = &list;
            break;
        case WIRE_PARTITION_LIST:
            scratch_instances(&scratch, rep);
            plist.n_instances = rep->ninstances;
            plist.instances = scratch.ref_ptrs;
            plist.next_cursor = rep->next_cursor ? rep->next_cursor : "";
            msg.body_case = SHARDPACS__REPLY__BODY_PARTITION_LIST;
            msg.partition_list = &plist;
            break;
        case WIRE_METADATA_LIST:
            scratch_instances(&scratch, rep);
            mlist.n_instances = rep->ninstances;
            mlist.instances = scratch.ref_ptrs;
            mlist.next_cursor = rep->next_cursor ? rep->next_cursor : "";
            msg.body_case = SHARDPACS__REPLY__BODY_METADATA_LIST;
            msg.metadata_list = &mlist;
            break;
        case WIRE_FIND:
            /* The matches go in the body (wire_encode_find_body). */
            find.count = (uint32_t)rep->nmatches;
            find.truncated = rep->truncated;
            msg.body_case = SHARDPACS__REPLY__BODY_FIND;
            msg.find = &find;
            break;
        case WIRE_PARTITION_DIGEST:
            scratch_digests(&scratch, rep);
            pdig.n_digests = rep->ndigests;
            pdig.digests = scratch.digest_ptrs;
            msg.body_case = SHARDPACS__REPLY__BODY_PARTITION_DIGEST;
            msg.partition_digest = &pdig;
            break;
        case WIRE_STATS:
            stats.node_id = rep->stats.node_id ? rep->stats.node_id : "";
            stats.instances = rep->stats.instances;
            stats.bytes = rep->stats.bytes;
            stats.studies = rep->stats.studies;
            stats.conflicts = rep->stats.conflicts;
            stats.corrupt_reads = rep->stats.corrupt_reads;
            stats.db_size_bytes = rep->stats.db_size_bytes;
            stats.uptime_ms = rep->stats.uptime_ms;
            stats.conflicts_refused = rep->stats.conflicts_refused;
            stats.object_bytes_read = rep->stats.object_bytes_read;
            stats.metadata_rebuilt = rep->stats.metadata_rebuilt;
            msg.body_case = SHARDPACS__REPLY__BODY_STATS;
            msg.stats = &stats;
            break;
        case WIRE_GOSSIP:
            /* kind 0: the request has no direct answer; send no message. */
            if (rep->gossip.kind != 0) {
                gossip_to_pb(&rep->gossip, &gossip);
                gossip_reply.message = &gossip.msg;
            }
            msg.body_case = SHARDPACS__REPLY__BODY_GOSSIP;
            msg.gossip = &gossip_reply;
            break;
        case WIRE_STATUS:
            scratch_status(&scratch, &rep->status_body, &status);
            msg.body_case = SHARDPACS__REPLY__BODY_MEMBER_STATUS;
            msg.member_status = &status;
            break;
        case WIRE_DRAIN:
            msg.body_case = SHARDPACS__REPLY__BODY_DRAIN;
            msg.drain = &drain;
            break;
        default: return SP_EINVAL;
        }
    }
    *len = shardpacs__reply__get_packed_size(&msg);
    *out = sp_malloc(*len);
    shardpacs__reply__pack(&msg, *out);
    scratch_free(&scratch);
    gossip_scratch_free(&gossip);
    return 0;
}

int wire_encode_find_body(const wire_reply_t *rep, uint8_t **out, size_t *len)
{
    Shardpacs__FindMatches body = SHARDPACS__FIND_MATCHES__INIT;
    reply_scratch_t scratch = {0};
    scratch_matches(&scratch, rep);
    body.n_matches = rep->nmatches;
    body.matches = scratch.match_ptrs;
    *len = shardpacs__find_matches__get_packed_size(&body);
    *out = sp_malloc(*len ? *len : 1);
    shardpacs__find_matches__pack(&body, *out);
    scratch_free(&scratch);
    return 0;
}

/* The bytes a length-delimited field of n bytes takes: its tag (one byte for
 * the field numbers used here), the varint length and the bytes. */
static size_t field_size(size_t n)
{
    size_t v = 1;
    for (size_t x = n; x >= 0x80; x >>= 7)
        v++;
    return 1 + v + n;
}

size_t wire_instance_size(const wire_instance_t *w)
{
    Shardpacs__InstanceRef p;
    instance_to_pb(w, &p);
    return field_size(shardpacs__instance_ref__get_packed_size(&p));
}

static int instance_from_pb(const Shardpacs__InstanceRef *p, wire_instance_t *w, char *err,
                            size_t errlen)
{
    int rc = check_uid(p->study_instance_uid, "StudyInstanceUID", true, err, errlen);
    if (rc == 0)
        rc = check_uid(p->series_instance_uid, "SeriesInstanceUID", true, err, errlen);
    if (rc == 0)
        rc = check_uid(p->sop_instance_uid, "SOPInstanceUID", true, err, errlen);
    if (rc == 0)
        rc = check_uid(p->sop_class_uid, "SOPClassUID", false, err, errlen);
    if (rc == 0)
        rc = check_uid(p->transfer_syntax_uid, "TransferSyntaxUID", false, err, errlen);
    if (rc == 0)
        rc = copy_digest(&p->digest, w->digest, err, errlen);
    if (rc == 0)
        rc = version_from_pb(p->version, (int)p->policy, &w->version, &w->policy, err, errlen);
    if (rc != 0)
        return rc;
    w->partition = p->partition;
    w->study_uid = sp_strdup(p->study_instance_uid);
    w->series_uid = sp_strdup(p->series_instance_uid);
    w->sop_uid = sp_strdup(p->sop_instance_uid);
    w->sop_class_uid = sp_strdup(p->sop_class_uid);
    w->transfer_syntax_uid = sp_strdup(p->transfer_syntax_uid);
    w->size = p->size;
    w->metadata_size = p->metadata_size;
    return 0;
}

static int instances_from_pb(Shardpacs__InstanceRef **list, size_t n, wire_reply_t *out, char *err,
                             size_t errlen)
{
    for (size_t i = 0; i < n; i++) {
        wire_instance_t *w = wire_reply_add_instance(out);
        int rc = instance_from_pb(list[i], w, err, errlen);
        if (rc != 0)
            return rc;
    }
    return 0;
}

static int status_from_pb(const Shardpacs__StatusReply *p, wire_status_t *st, char *err,
                          size_t errlen)
{
    int rc = gossip_check(p->from_id, SYNTAX_ID, true, "status from_id", err, errlen);
    if (rc != 0)
        return rc;
    if (p->n_members > GOSSIP_MAX_MEMBERS || p->replicas > 64 ||
        p->under_replicated_partitions > WIRE_PARTITIONS_MAX ||
        p->partitions_with_data > WIRE_PARTITIONS_MAX) {
        sp_fmt(err, errlen, "status: counts out of range");
        return SP_EPROTO;
    }
    st->from_id = sp_strdup(p->from_id);
    st->replicas = p->replicas;
    st->view_version = p->view_version;
    st->under_replicated_partitions = p->under_replicated_partitions;
    st->partitions_with_data = p->partitions_with_data;
    st->members = sp_calloc(p->n_members ? p->n_members : 1, sizeof *st->members);
    for (size_t i = 0; i < p->n_members; i++) {
        const Shardpacs__MemberStatus *c = p->members[i];
        wire_member_status_t *w = &st->members[i];
        if (c->member == NULL) {
            sp_fmt(err, errlen, "status members[%zu] has no member record", i);
            return SP_EPROTO;
        }
        if ((rc = gossip_member_from_pb(c->member, i, &w->member, err, errlen)) != 0)
            return rc;
        if (!isfinite(c->repair_rate) || c->repair_rate < 0) {
            sp_fmt(err, errlen, "status members[%zu].repair_rate is not finite and >= 0", i);
            return SP_EPROTO;
        }
        st->nmembers = i + 1;
        w->reachable = c->reachable;
        w->partitions_owned = c->partitions_owned;
        w->partitions_held = c->partitions_held;
        w->instances = c->instances;
        w->bytes = c->bytes;
        w->disk_bytes = c->disk_bytes;
        w->hints_pending = c->hints_pending;
        w->repair_bytes_done = c->repair_bytes_done;
        w->repair_bytes_pending = c->repair_bytes_pending;
        w->repair_rate = c->repair_rate;
        w->scrub_checked = c->scrub_checked;
        w->scrub_corrupt = c->scrub_corrupt;
        w->disk_free = c->disk_free;
        w->refusing_puts = c->refusing_puts;
        w->repaired = c->repaired;
    }
    return 0;
}

static int decode_reply_body(const Shardpacs__Reply *m, wire_reply_t *out, char *err, size_t errlen)
{
    int rc = 0;
    switch (m->body_case) {
    case SHARDPACS__REPLY__BODY__NOT_SET:
        if (m->status == 0) {
            sp_fmt(err, errlen, "success reply without a body");
            return SP_EPROTO;
        }
        return 0;
    case SHARDPACS__REPLY__BODY_PUT:
        out->kind = WIRE_PUT;
        if ((unsigned)m->put->outcome > WIRE_KEPT_ASIDE) {
            sp_fmt(err, errlen, "unknown put outcome %d", (int)m->put->outcome);
            return SP_EPROTO;
        }
        out->outcome = (wire_outcome_t)m->put->outcome;
        return 0;
    case SHARDPACS__REPLY__BODY_GET:
    case SHARDPACS__REPLY__BODY_METADATA: {
        const Shardpacs__GetReply *g =
            m->body_case == SHARDPACS__REPLY__BODY_GET ? m->get : m->metadata;
        out->kind = m->body_case == SHARDPACS__REPLY__BODY_GET ? WIRE_GET : WIRE_METADATA;
        out->partition = g->partition;
        rc = attrs_from_pb(g->attrs, g->n_attrs, ATTRS_STORED, &out->attrs, err, errlen);
        if (rc == 0)
            rc = copy_digest(&g->digest, out->digest, err, errlen);
        if (rc == 0)
            rc = version_from_pb(g->version, (int)g->policy, &out->version, &out->policy, err,
                                 errlen);
        return rc;
    }
    case SHARDPACS__REPLY__BODY_LIST:
        out->kind = WIRE_LIST;
        out->next_cursor = dup_or_null(m->list->next_cursor);
        return instances_from_pb(m->list->instances, m->list->n_instances, out, err, errlen);
    case SHARDPACS__REPLY__BODY_METADATA_LIST:
        out->kind = WIRE_METADATA_LIST;
        out->next_cursor = dup_or_null(m->metadata_list->next_cursor);
        return instances_from_pb(m->metadata_list->instances, m->metadata_list->n_instances, out,
                                 err, errlen);
    case SHARDPACS__REPLY__BODY_PARTITION_LIST:
        out->kind = WIRE_PARTITION_LIST;
        out->next_cursor = dup_or_null(m->partition_list->next_cursor);
        return instances_from_pb(m->partition_list->instances, m->partition_list->n_instances, out,
                                 err, errlen);
    case SHARDPACS__REPLY__BODY_FIND:
        out->kind = WIRE_FIND;
        out->truncated = m->find->truncated;
        out->body_matches = m->find->count;
        return 0;
    case SHARDPACS__REPLY__BODY_PARTITION_DIGEST:
        out->kind = WIRE_PARTITION_DIGEST;
        out->ndigests = m->partition_digest->n_digests;
        out->digests = sp_calloc(out->ndigests, sizeof *out->digests);
        for (size_t i = 0; i < out->ndigests && rc == 0; i++) {
            const Shardpacs__PartitionDigest *d = m->partition_digest->digests[i];
            out->digests[i].partition = d->partition;
            out->digests[i].count = d->count;
            out->digests[i].bytes = d->bytes;
            rc = copy_digest(&d->digest, out->digests[i].digest, err, errlen);
        }
        return rc;
    case SHARDPACS__REPLY__BODY_STATS:
        out->kind = WIRE_STATS;
        out->stats.node_id = sp_strdup(m->stats->node_id);
        out->stats.instances = m->stats->instances;
        out->stats.bytes = m->stats->bytes;
        out->stats.studies = m->stats->studies;
        out->stats.conflicts = m->stats->conflicts;
        out->stats.corrupt_reads = m->stats->corrupt_reads;
        out->stats.db_size_bytes = m->stats->db_size_bytes;
        out->stats.uptime_ms = m->stats->uptime_ms;
        out->stats.conflicts_refused = m->stats->conflicts_refused;
        out->stats.object_bytes_read = m->stats->object_bytes_read;
        out->stats.metadata_rebuilt = m->stats->metadata_rebuilt;
        return 0;
    case SHARDPACS__REPLY__BODY_GOSSIP:
        out->kind = WIRE_GOSSIP;
        return m->gossip->message ? gossip_from_pb(m->gossip->message, &out->gossip, err, errlen)
                                  : 0;
    case SHARDPACS__REPLY__BODY_MEMBER_STATUS:
        out->kind = WIRE_STATUS;
        return status_from_pb(m->member_status, &out->status_body, err, errlen);
    case SHARDPACS__REPLY__BODY_DRAIN: out->kind = WIRE_DRAIN; return 0;
    default: sp_fmt(err, errlen, "reply of unknown kind %d", (int)m->body_case); return SP_EPROTO;
    }
}

int wire_decode_reply(const uint8_t *buf, size_t len, wire_reply_t *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    Shardpacs__Reply *m = shardpacs__reply__unpack(NULL, len, buf);
    if (m == NULL) {
        sp_fmt(err, errlen, "reply of %zu bytes is not a valid message", len);
        return SP_EPROTO;
    }
    out->status = m->status;
    out->error = dup_or_null(m->error);
    if (m->status > 0) {
        sp_fmt(err, errlen, "reply status %d is not a ShardPACS code", (int)m->status);
        shardpacs__reply__free_unpacked(m, NULL);
        wire_reply_free(out);
        return SP_EPROTO;
    }
    int rc = decode_reply_body(m, out, err, errlen);
    shardpacs__reply__free_unpacked(m, NULL);
    if (rc != 0)
        wire_reply_free(out);
    return rc;
}

int wire_decode_response(const transport_response_t *resp, wire_reply_t *out, char *err,
                         size_t errlen)
{
    int rc = wire_decode_reply(resp->head, resp->head_len, out, err, errlen);
    if (rc == 0 && out->status == 0 && out->kind == WIRE_METADATA_LIST) {
        uint64_t sum = 0;
        for (size_t i = 0; i < out->ninstances && sum <= resp->body_len; i++)
            sum += out->instances[i].metadata_size > resp->body_len
                       ? (uint64_t)resp->body_len + 1
                       : out->instances[i].metadata_size;
        if (sum != resp->body_len) {
            sp_fmt(err, errlen, "metadata list body of %zu bytes, the head announces more or less",
                   resp->body_len);
            wire_reply_free(out);
            return SP_EPROTO;
        }
        return 0;
    }
    if (rc != 0 || out->status != 0 || out->kind != WIRE_FIND)
        return rc;
    if (out->body_matches == 0 && resp->body_len == 0)
        return 0;
    Shardpacs__FindMatches *m = shardpacs__find_matches__unpack(NULL, resp->body_len, resp->body);
    if (m == NULL) {
        sp_fmt(err, errlen, "find reply body of %zu bytes is not a valid message", resp->body_len);
        wire_reply_free(out);
        return SP_EPROTO;
    }
    if (m->n_matches != out->body_matches) {
        sp_fmt(err, errlen, "find reply body holds %zu matches, the head says %zu", m->n_matches,
               out->body_matches);
        rc = SP_EPROTO;
    }
    if (rc == 0) {
        out->matches = sp_calloc(m->n_matches ? m->n_matches : 1, sizeof *out->matches);
        for (size_t i = 0; i < m->n_matches && rc == 0; i++) {
            rc = attrs_from_pb(m->matches[i]->attrs, m->matches[i]->n_attrs, ATTRS_RESULT,
                               &out->matches[i], err, errlen);
            out->nmatches = i + 1;
        }
    }
    shardpacs__find_matches__free_unpacked(m, NULL);
    if (rc != 0)
        wire_reply_free(out);
    return rc;
}

static void instance_free(wire_instance_t *w)
{
    free(w->study_uid);
    free(w->series_uid);
    free(w->sop_uid);
    free(w->sop_class_uid);
    free(w->transfer_syntax_uid);
}

void wire_reply_free(wire_reply_t *rep)
{
    free(rep->error);
    attrs_clear(&rep->attrs);
    for (size_t i = 0; i < rep->ninstances; i++)
        instance_free(&rep->instances[i]);
    free(rep->instances);
    free(rep->next_cursor);
    for (size_t i = 0; i < rep->nmatches; i++)
        attrs_clear(&rep->matches[i]);
    free(rep->matches);
    free(rep->digests);
    free(rep->stats.node_id);
    free(rep->status_body.from_id);
    free(rep->status_body.members);
    gossip_msg_clear(&rep->gossip);
    memset(rep, 0, sizeof *rep);
}

/* Grows an array by one zeroed element, doubling capacity at powers of two. */
static void *grow(void *array, size_t *count, size_t elem)
{
    size_t n = *count;
    if (n == 0 || (n & (n - 1)) == 0)
        array = sp_realloc(array, (n ? 2 * n : 1) * elem);
    memset((char *)array + n * elem, 0, elem);
    *count = n + 1;
    return array;
}

wire_instance_t *wire_reply_add_instance(wire_reply_t *rep)
{
    rep->instances = grow(rep->instances, &rep->ninstances, sizeof *rep->instances);
    return &rep->instances[rep->ninstances - 1];
}

attrs_t *wire_reply_add_match(wire_reply_t *rep)
{
    rep->matches = grow(rep->matches, &rep->nmatches, sizeof *rep->matches);
    return &rep->matches[rep->nmatches - 1];
}

wire_member_status_t *wire_reply_add_member(wire_reply_t *rep)
{
    wire_status_t *st = &rep->status_body;
    st->members = grow(st->members, &st->nmembers, sizeof *st->members);
    return &st->members[st->nmembers - 1];
}

int wire_call(transport_client_t *c, const wire_request_t *req, const uint8_t *body,
              size_t body_len, int timeout_ms, wire_reply_t *rep, transport_response_t *raw,
              char *err, size_t errlen)
{
    memset(rep, 0, sizeof *rep);
    memset(raw, 0, sizeof *raw);
    uint8_t *head = NULL;
    size_t head_len = 0;
    int rc = wire_encode_request(req, &head, &head_len);
    if (rc != 0) {
        sp_fmt(err, errlen, "cannot encode a %s request: %s", wire_kind_name(req->kind),
               sp_strerror(rc));
        return rc;
    }
    rc = transport_call(c, head, head_len, body, body_len, timeout_ms, raw);
    free(head);
    if (rc != 0) {
        sp_fmt(err, errlen, "%s request failed: %s", wire_kind_name(req->kind), sp_strerror(rc));
        return rc;
    }
    char why[256];
    rc = wire_decode_response(raw, rep, why, sizeof why);
    if (rc == 0 && rep->status != 0) {
        sp_fmt(err, errlen, "%s refused: %s (%s)", wire_kind_name(req->kind),
               rep->error ? rep->error : "", sp_strerror(rep->status));
        rc = rep->status;
        wire_reply_free(rep);
    } else if (rc != 0) {
        sp_fmt(err, errlen, "malformed %s reply: %s", wire_kind_name(req->kind), why);
    }
    if (rc != 0)
        transport_response_free(raw);
    return rc;
}

void wire_reply_error(wire_reply_t *rep, int code, const char *text)
{
    rep->status = code;
    free(rep->error);
    rep->error = sp_strdup(text);
}

void wire_serve(const transport_request_t *req, transport_reply_t *out, wire_dispatch_fn dispatch,
                void *ctx)
{
    wire_request_t w;
    wire_reply_t rep = {0};
    char err[256];
    int rc = wire_decode_request(req->head, req->head_len, &w, err, sizeof err);
    if (rc != 0) {
        log_warn("refused request %llu from %s (%s): %s", (unsigned long long)req->id,
                 req->peer_name, req->peer_key, err);
        wire_reply_error(&rep, rc, err);
    } else {
        if (w.kind != WIRE_PUT && req->body_len != 0) {
            wire_reply_error(&rep, SP_EPROTO, "unexpected body");
        } else {
            rep.kind = w.kind;
            dispatch(ctx, req, &w, &rep, out);
        }
        wire_request_free(&w);
    }
    wire_encode_reply(&rep, &out->head, &out->head_len);
    if (rep.status == 0 && rep.kind == WIRE_FIND) {
        SP_ASSERT(out->body == NULL);
        wire_encode_find_body(&rep, &out->body, &out->body_len);
    }
    wire_reply_free(&rep);
}
