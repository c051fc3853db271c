/* backend.h - the router's side of the cluster: placement of studies on
 * storage members taken from the gossiped view, sloppy-quorum writes with
 * hinted stand-ins, scatter/gather queries, and fetching instances from any
 * member that has them. Contracts (README "Contracts"): 1, a put succeeds
 * only with W durable acknowledgements; 6, no state beyond caches.
 *
 * Placement comes from common/placement.h over the router's membership
 * view, exactly as the storage nodes compute it: a study's N owners are
 * placement_owners() of its partition. Members whose names are missing from
 * the router's cluster keys (their public key comes from there, by name)
 * still count in the placement; the router only cannot reach them, so it
 * treats them as unreachable (a stand-in takes their writes, reads skip
 * them) and logs a warning once per view version. The backend keeps an immutable,
 * reference-counted snapshot of this per view version (rebuilt when the
 * version moves, and at most once a second otherwise, so that a key added
 * to the key file is picked up); a request uses one snapshot from start to
 * end while other threads may already use a newer one.
 *
 * Writes (sloppy quorum). Each owner that is reachable (gossip says so and
 * its key is known) and that this router does not avoid (it just saw a call
 * to it fail, see avoid_failed_ms; this is the router's own judgement, not
 * gossip's DOWN state) gets the put; each other owner is replaced by a
 * stand-in: the next member of the partition's extended preference list
 * (placement_preference) that is reachable, not avoided and not already
 * a target. The stand-in stores the instance like any other; storage nodes
 * hand it back to the owner themselves once it is up (no hint message).
 * Success still needs W durable acknowledgements. An owner only avoided
 * (gossip still calls it reachable) for which no stand-in is
 * free gets the put anyway: it may be back already, and the put does not
 * wait for it once W others acknowledged. With fewer than W targets nothing
 * is sent and the put fails at once.
 *
 * Reads. A partition's candidates are, de-duplicated and skipping members
 * that are not reachable: the owners (those still JOINING, i.e. filling,
 * last), the stand-ins a put would use now, and the previous owners
 * (placement_previous_owners: the view without joiners but with members
 * that drain and still hold data). Avoided members come after all others.
 *
 * Threads: every function may be called from any DICOM worker thread at
 * once. Each thread gets its own transport clients (ZeroMQ sockets are not
 * thread-safe), one per member id and endpoint (a member that comes back on
 * another endpoint gets a new one), created on first use and closed when the
 * thread exits. Settings are read-only after backend_new(). */
#ifndef SP_BACKEND_H
#define SP_BACKEND_H

#include "../common/attrs.h"
#include "../common/gossip.h"
#include "../common/keys.h"
#include "../common/membership.h"
#include "../common/transport.h"
#include "../common/wire.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct {
    membership_t *membership;     /* the router's view; borrowed, outlives the backend */
    const keys_allowlist_t *keys; /* cluster keys; borrowed, outlives the backend */
    keys_pair_t self;             /* the router's key pair */
    transport_config_t transport;
    int replicas;          /* N */
    int write_quorum;      /* W */
    int store_timeout_ms;  /* waiting for W acknowledgements, plus: */
    size_t store_min_rate; /* bytes/s an object travels and is written at, at least: a put's
                              deadline is store_timeout_ms + size / store_min_rate */
    int query_timeout_ms;  /* waiting for find / list answers */
    int fetch_timeout_ms;  /* per replica, reading one instance */
    int avoid_failed_ms; /* avoid a member that just failed for this long ([cluster] retry_down) */
    bool case_insensitive_names;
    wire_policy_t duplicates; /* sent with every put: what replicas do with a SOP
                               * already stored with other bytes (node/store.h) */
} backend_config_t;

typedef struct backend backend_t;

backend_t *backend_new(const backend_config_t *cfg);
void backend_destroy(backend_t **bp);

/* The number of storage members placed in the current view (those that own
 * partitions). */
size_t backend_placed_count(backend_t *b);
/* Storage members this router can send to now (gossip says reachable and
 * the cluster keys list them): readiness needs at least W. */
size_t backend_reachable_storage(backend_t *b);

typedef struct {
    int acknowledged; /* replicas that hold the instance durably (stored or duplicate) */
    int conflicts;    /* replicas holding different bytes under the same SOP UID (reject), or
                       * refusing one more version (max_conflicts reached) */
    int superseded;   /* acknowledged replicas where this version replaced the stored one or
                       * was kept aside beside it (keep-first, keep-newest) */
    int failed;       /* replicas that answered an error or not at all */
    int permanent;    /* of those, the ones that refused the object itself (invalid, too
                       * large): sending it again cannot help */
    int pending;      /* replicas still writing when the quorum was reached */
    int needed;       /* W */
    int stand_ins;    /* targets that stood in for an owner */
    char detail[256]; /* the first error, for logs and Error Comment */
} backend_put_result_t;

/* Stores a Part-10 object on the study's N owners, or on stand-ins for
 * owners that are down (see above), and returns once W of them acknowledged
 * durably, or all answered, or the store deadline (which grows with the
 * object's size) passed. The object is sent to every target without copies;
 * it is borrowed (the transport takes references of its own while frames
 * are on their way). attrs must hold the Study/Series/SOP Instance UIDs.
 * Returns 0 when at least W acknowledged (and no replica reported a
 * conflict), SP_ECONFLICT, SP_EINVAL when fewer than W acknowledged and
 * every failure was a replica refusing the object itself (permanent), or
 * SP_EUNAVAIL when fewer than W acknowledged in time (res->detail says
 * why; retry later). */
int backend_put(backend_t *b, const attrs_t *attrs, transport_body_t *object,
                backend_put_result_t *res);

/* Called for each merged, de-duplicated match; return non-zero to stop. */
typedef int (*backend_match_fn)(void *ctx, const attrs_t *match);

/* Runs a C-FIND over the cluster: sent to the read candidates of each
 * study's partition when keys name StudyInstanceUID values, else scattered
 * to every reachable storage member (ALIVE, SUSPECT, JOINING, DRAINING);
 * merged without duplicates by the level's unique key, at most limit matches
 * (0 = none). A UID list key of any length is sent in batches of at most
 * 64 KiB of it, each to its own targets, and the answers merged as one.
 * Returns 0, SP_ELIMIT when the limit cut the result, SP_EUNAVAIL when no
 * member answered, SP_ETOOBIG when a key is over the wire limits even after
 * batching (e.g. a name key over 1 KiB), SP_EINVAL when the members refused
 * the keys as malformed, or the callback's non-zero value.
 * *partial (may be NULL) is set when some member did not answer (results may
 * then be incomplete only if every copy of some study was among them). */
int backend_find(backend_t *b, level_t level, const attrs_t *keys, size_t limit,
                 backend_match_fn fn, void *ctx, bool *partial);

/* Called for each listed instance (borrowed for the call); return non-zero
 * to stop. */
typedef int (*backend_instance_fn)(void *ctx, const wire_instance_t *inst);

/* Lists the instances of a study, or of one of its series (series_uid not
 * NULL), whatever their number: pages through LIST on every read candidate
 * of the study's partition (leaving out those this router saw fail while
 * another is up), in parallel, and merges the listings into their union,
 * each instance once, in key order (series UID, then SOP Instance UID).
 * Holds one page per candidate at a time. A candidate that fails part way
 * is left out from then on (*partial, may be NULL, is set). Returns 0 when
 * at least one candidate listed to the end, SP_EUNAVAIL when none did
 * (nothing is complete; fn may have been called), or fn's non-zero value. */
int backend_list(backend_t *b, const char *study_uid, const char *series_uid,
                 backend_instance_fn fn, void *ctx, bool *partial);

/* Reads one instance's Part-10 bytes from the first read candidate of its
 * study's partition that has a good copy (digest verified by the node on
 * read), the owners rotated by `spread` (so concurrent readers share the
 * load); as a last resort from every other reachable storage member (a
 * NOTFOUND on one is not final). *out is malloc'd. Returns 0, SP_ENOTFOUND
 * (every member asked answered it has none), or SP_EUNAVAIL. */
int backend_fetch(backend_t *b, const char *study_uid, const char *sop_uid, unsigned spread,
                  uint8_t **out, size_t *len);

/* As backend_fetch(), but reads the instance's metadata as its node keeps
 * it (METADATA: the Part-10 object without its Pixel Data value, or the
 * whole object when it has none), so no pixel data is read or sent. A node
 * of an older version refuses the request; the caller may then fall back
 * to backend_fetch(). Same results and ownership as backend_fetch(). */
int backend_fetch_metadata(backend_t *b, const char *study_uid, const char *sop_uid,
                           unsigned spread, uint8_t **out, size_t *len);

/* One page of a study's (series_uid NULL) or series' instance metadata
 * (METADATA_LIST), from the first read candidate of the study's partition
 * that answers, owners rotated by spread: *rep lists the instances in key
 * order after cursor ("study/series/sop", NULL or "" = from the start; at
 * most limit, 0 = the node's cap) with their metadata_size, and *body
 * (malloc'd, *body_len bytes) holds their metadata one after the other, as
 * backend_fetch_metadata() returns each. It is one replica's view: an
 * instance that replica lacks is not in it. Returns 0 (the caller frees
 * *rep with wire_reply_free and *body), or SP_EUNAVAIL when no candidate
 * answered (older nodes refuse the request). */
int backend_metadata_page(backend_t *b, const char *study_uid, const char *series_uid,
                          const char *cursor, size_t limit, unsigned spread, wire_reply_t *rep,
                          uint8_t **body, size_t *body_len);

/* The owner ids (at most RING_MAX_REPLICAS, copied into owners) a router
 * with cfg's cluster keys and replicas computes for a partition over a
 * membership view (view[0..n), borrowed, as membership_view() returns it):
 * the snapshot building every request uses, without a membership or a
 * backend, so that tests can compare it with the nodes' placement. */
size_t backend_view_owners(const backend_config_t *cfg, const gossip_member_t *view, size_t n,
                           uint32_t partition, char (*owners)[GOSSIP_ID_MAX]);

#endif
