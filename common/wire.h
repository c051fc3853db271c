/* wire.h - the messages cluster members exchange, as plain C structs, and
 * their protobuf encoding (proto/shardpacs.proto).
 *
 * This is the only module that touches the code protoc-c generates. Decoding
 * validates before anything is used: sizes (each value at most
 * WIRE_MAX_VALUE bytes, a C-FIND's UID key at most WIRE_MAX_UID_LIST, at
 * most WIRE_MAX_ATTRS attributes), required fields
 * for the request kind, UID syntax, known attribute tags, digest length and
 * partition range, and for gossip messages the rules listed above
 * GossipMember in proto/shardpacs.proto (id and endpoint syntax, site, Z85
 * public key on every member record, enum ranges, weight, accuser, at most
 * GOSSIP_MAX_MEMBERS members). A message failing any check is SP_EPROTO
 * with a reason that names the field.
 *
 * A decoded message owns its strings and arrays; free it with
 * wire_request_free() / wire_reply_free(). Encoding only borrows. All
 * functions are thread-safe. */
#ifndef SP_WIRE_H
#define SP_WIRE_H

#include "attrs.h"
#include "base.h"
#include "gossip.h"
#include "transport.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define WIRE_MAX_VALUE 1024
#define WIRE_MAX_ATTRS 64
#define WIRE_PARTITIONS_MAX 65536

/* A C-FIND key of a UID attribute may be a list "uid1\uid2..." of any
 * length DICOM allows (thousands of UIDs), so it gets its own bound: 256 KiB
 * is about 4,000 UIDs of 64 characters, and a request holding one such key
 * and every other key at WIRE_MAX_VALUE stays far below the transport's
 * default frame limit (1 MiB + 64 KiB). Routers split longer lists
 * (router/backend.c). */
#define WIRE_MAX_UID_LIST (256 * 1024)

/* The byte budget of one page of LIST or PARTITION_LIST instances: a node
 * stops a page once its entries take this much encoded, so that a reply fits
 * one frame whatever the UIDs' lengths (an entry is at most about 330 bytes,
 * so a page never passes the budget by more than that). Half the default
 * frame limit leaves room for everything else; a node with a smaller
 * chunk_size uses half its own frame limit instead (node/node.c). */
#define WIRE_PAGE_BYTES (512 * 1024)

typedef enum {
    WIRE_NONE = 0,
    WIRE_PUT,
    WIRE_GET,
    WIRE_LIST,
    WIRE_FIND,
    WIRE_PARTITION_DIGEST,
    WIRE_PARTITION_LIST,
    WIRE_STATS,
    WIRE_GOSSIP,
    WIRE_STATUS,
    WIRE_DRAIN,
    WIRE_METADATA,
    WIRE_METADATA_LIST,
} wire_kind_t;

const char *wire_kind_name(wire_kind_t kind);

/* A put's duplicate policy (DuplicatePolicy in proto/shardpacs.proto; the
 * same numbers as store_policy_t in node/store.h). */
typedef enum {
    WIRE_POLICY_UNSET = 0,
    WIRE_POLICY_REJECT = 1,
    WIRE_POLICY_KEEP_FIRST = 2,
    WIRE_POLICY_KEEP_NEWEST = 3,
} wire_policy_t;

/* Latest version a message may carry: the last millisecond of year 9999, so
 * a corrupt or hostile value cannot win every keep-newest comparison by
 * being 2^64-1 without also being refused. */
#define WIRE_VERSION_MAX 253402300799999ull

/* "reject", "keep-first" or "keep-newest" (configuration and logs) to a
 * policy and back. wire_policy_parse returns 0 or SP_EINVAL; wire_policy_name
 * gives "unset" for WIRE_POLICY_UNSET and unknown values. */
int wire_policy_parse(const char *name, wire_policy_t *out);
const char *wire_policy_name(wire_policy_t policy);

/* One request; which fields count depends on kind (noted per field). */
typedef struct {
    wire_kind_t kind;
    uint32_t partition;            /* PUT, PARTITION_LIST */
    attrs_t attrs;                 /* PUT: the instance's attrs; FIND: the keys */
    uint8_t digest[SP_DIGEST_LEN]; /* PUT */
    uint64_t version;              /* PUT: router receive time, ms since the epoch; 0 = none */
    wire_policy_t policy;          /* PUT: set exactly when version is */
    char *sop_uid;                 /* GET, METADATA */
    char *study_uid;               /* LIST, METADATA_LIST (as LIST below) */
    char *series_uid;              /* LIST, optional (NULL = whole study) */
    level_t level;                 /* FIND */
    bool case_insensitive_names;   /* FIND */
    uint32_t limit;                /* FIND, LIST, PARTITION_LIST (0 = the node's cap) */
    uint32_t *partitions;          /* PARTITION_DIGEST */
    size_t npartitions;
    bool nonempty;       /* PARTITION_DIGEST: every non-empty one instead */
    bool cluster;        /* STATUS: cluster-wide */
    char *node_id;       /* DRAIN */
    char *cursor;        /* LIST, PARTITION_LIST: "study/series/sop", optional */
    gossip_msg_t gossip; /* GOSSIP: the message; its updates array is owned
                          * (malloc'd) and freed by wire_request_free() */
} wire_request_t;

/* The same numbers as store_outcome_t (node/store.h has their meaning). */
typedef enum {
    WIRE_STORED = 0,
    WIRE_DUPLICATE = 1,
    WIRE_CONFLICT = 2,
    WIRE_CONFLICT_LIMIT = 3,
    WIRE_REPLACED = 4,
    WIRE_KEPT_ASIDE = 5,
} wire_outcome_t;

typedef struct {
    uint32_t partition;
    char *study_uid;
    char *series_uid;
    char *sop_uid;
    char *sop_class_uid;
    char *transfer_syntax_uid;
    uint64_t size;
    uint8_t digest[SP_DIGEST_LEN];
    uint64_t version;       /* as put; 0 = none */
    wire_policy_t policy;   /* of the put that made this copy the instance */
    uint64_t metadata_size; /* METADATA_LIST: its metadata's bytes in the reply body */
} wire_instance_t;

typedef struct {
    uint32_t partition;
    uint64_t count;
    uint64_t bytes;
    uint8_t digest[SP_DIGEST_LEN];
} wire_partition_digest_t;

typedef struct {
    char *node_id;
    uint64_t instances, bytes, studies, conflicts, corrupt_reads, db_size_bytes, uptime_ms;
    uint64_t conflicts_refused;
    uint64_t object_bytes_read, metadata_rebuilt;
} wire_stats_t;

/* A member's status (StatusReply.members; see proto/shardpacs.proto). */
typedef struct {
    gossip_member_t member;
    bool reachable;
    uint32_t partitions_owned, partitions_held;
    uint64_t instances, bytes, disk_bytes, hints_pending;
    uint64_t repair_bytes_done, repair_bytes_pending;
    double repair_rate;
    uint64_t scrub_checked, scrub_corrupt, repaired;
    uint64_t disk_free;
    bool refusing_puts; /* free space below the node's [store] reserve */
} wire_member_status_t;

typedef struct {
    char *from_id;
    uint32_t replicas;
    uint64_t view_version;
    wire_member_status_t *members;
    size_t nmembers;
    uint32_t under_replicated_partitions;
    uint32_t partitions_with_data;
} wire_status_t;

/* One reply. status 0 means the body fields for kind are valid; otherwise
 * error explains and kind may be WIRE_NONE. */
typedef struct {
    wire_kind_t kind;
    int status;
    char *error;
    wire_outcome_t outcome;        /* PUT */
    uint32_t partition;            /* GET, METADATA (as GET below) */
    attrs_t attrs;                 /* GET */
    uint8_t digest[SP_DIGEST_LEN]; /* GET */
    uint64_t version;              /* GET: as in wire_instance_t */
    wire_policy_t policy;          /* GET */
    wire_instance_t *instances;    /* LIST, PARTITION_LIST, METADATA_LIST */
    size_t ninstances;
    char *next_cursor; /* LIST, PARTITION_LIST: NULL when exhausted */
    attrs_t *matches;  /* FIND: carried in the body (wire_decode_response) */
    size_t nmatches;
    size_t body_matches;              /* FIND, decoded: matches the head announces */
    bool truncated;                   /* FIND */
    wire_partition_digest_t *digests; /* PARTITION_DIGEST */
    size_t ndigests;
    wire_stats_t stats;        /* STATS */
    wire_status_t status_body; /* STATUS */
    gossip_msg_t gossip;       /* GOSSIP: the direct answer (the ACK to a PING, the
                                * SYNC to a SYNC_REQ), or all zero (kind 0) when the
                                * request has none; updates owned as in the request */
} wire_reply_t;

/* Encode into a malloc'd buffer (*out, caller frees). Returns 0, or
 * SP_EINVAL for an unknown kind. Encoding does not validate: it sends what it
 * is given (a gossip message's strings must be terminated), and the decoder
 * refuses what breaks the rules; except that a FIND request whose key is
 * longer than the decoder accepts (WIRE_MAX_VALUE, WIRE_MAX_UID_LIST) is
 * SP_ETOOBIG with nothing encoded, so that the sender reports the query as
 * too large rather than as a refusal by every node. A gossip message is not
 * size-checked here; a full SYNC that exceeds the transport's max_frame_bytes
 * is refused by the transport (see the size note in proto/shardpacs.proto).
 * A FIND reply's head carries only the count and the truncated flag: its
 * matches are the body, made by wire_encode_find_body() (wire_serve does). */
int wire_encode_request(const wire_request_t *req, uint8_t **out, size_t *len);
int wire_encode_reply(const wire_reply_t *rep, uint8_t **out, size_t *len);
int wire_encode_find_body(const wire_reply_t *rep, uint8_t **out, size_t *len);

/* The bytes one instance adds to an encoded LIST or PARTITION_LIST reply,
 * exactly: what node/node.c counts against WIRE_PAGE_BYTES. */
size_t wire_instance_size(const wire_instance_t *w);

/* Decode and validate. On failure returns SP_EPROTO with a reason in err,
 * and *out holds nothing to free. wire_decode_reply reads a head only: a
 * FIND reply then has body_matches set and no matches yet. */
int wire_decode_request(const uint8_t *buf, size_t len, wire_request_t *out, char *err,
                        size_t errlen);
int wire_decode_reply(const uint8_t *buf, size_t len, wire_reply_t *out, char *err, size_t errlen);

/* Decodes a whole response: the head as wire_decode_reply, and for a
 * successful FIND reply its matches from the body (exactly body_matches of
 * them, or SP_EPROTO); a METADATA_LIST reply's body must hold exactly the
 * metadata_size bytes its instances announce (else SP_EPROTO). The response keeps its buffers (the
 * caller frees them); *out is as wire_decode_reply leaves it. */
int wire_decode_response(const transport_response_t *resp, wire_reply_t *out, char *err,
                         size_t errlen);

/* Free everything the message owns (strings, arrays, a gossip message's
 * updates) and zero it. */
void wire_request_free(wire_request_t *req);
void wire_reply_free(wire_reply_t *rep);

/* One RPC over a transport client: encodes req, calls (timeout_ms <= 0: the
 * client's default), decodes and checks the reply (wire_decode_response). Returns 0 when the peer
 * answered status 0, with *rep and *raw (its body, if any) owned by the
 * caller (wire_reply_free, transport_response_free). Otherwise returns the
 * transport error, SP_EPROTO for a malformed reply, or the peer's status,
 * with a reason in err, and leaves nothing to free. */
int wire_call(transport_client_t *c, const wire_request_t *req, const uint8_t *body,
              size_t body_len, int timeout_ms, wire_reply_t *rep, transport_response_t *raw,
              char *err, size_t errlen);

/* Sets a reply's error status and text (replacing any earlier text). */
void wire_reply_error(wire_reply_t *rep, int code, const char *text);

/* Handles a request for a program's transport server: decodes it (a
 * malformed one is refused with the reason, and logged), refuses a body on
 * any kind but PUT, calls dispatch for a valid request with rep->kind set,
 * then encodes rep into out (a FIND reply's matches as the body). dispatch
 * may hand a body to out (GET). */
typedef void (*wire_dispatch_fn)(void *ctx, const transport_request_t *req, const wire_request_t *w,
                                 wire_reply_t *rep, transport_reply_t *out);
void wire_serve(const transport_request_t *req, transport_reply_t *out, wire_dispatch_fn dispatch,
                void *ctx);

/* Growable arrays for building replies. */
wire_instance_t *wire_reply_add_instance(wire_reply_t *rep);
attrs_t *wire_reply_add_match(wire_reply_t *rep);
wire_member_status_t *wire_reply_add_member(wire_reply_t *rep);

#endif
