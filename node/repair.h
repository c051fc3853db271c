/* repair.h - a storage node's self-healing: anti-entropy rounds that pull
 * what this node should hold from the members that hold it, hand-off of
 * what it holds but no longer owns, the scrubber, and the status and drain
 * requests of the admin CLI. Contract 5 (README "Contracts"): the last copy
 * is never the one deleted; contract 2: corrupt copies are replaced.
 *
 * Ownership comes from the gossiped view (membership.h): a partition's
 * owners are ring_owners() over the placed storage members, N = [cluster]
 * replicas. Every round (each [repair] interval, and at once when the view
 * changes):
 *  - the node asks every other reachable storage member for the digests of
 *    its non-empty partitions;
 *  - for each partition it owns whose digest differs at some holder, it
 *    lists both sides and copies what it lacks (GET from the holder, BLAKE2b
 *    verified by store_put), in [repair] streams parallel streams throttled
 *    to [repair] rate bytes/s. This one mechanism is re-replication after a
 *    member goes out, a joiner's fill, hinted hand-off back to a returning
 *    owner (stand-ins hold the data; the owner pulls it), drain, and
 *    anti-entropy between replicas;
 *  - for each partition it holds but does not own (it stood in for a down
 *    owner, lost the partition to a joiner, or is draining), it lists every
 *    owner and deletes a study only if all N owners hold each of its
 *    instances with the same digest (store_delete_study_if, under the
 *    study's gate): the last copy is never dropped (README "Contracts", 5).
 * A JOINING node announces ALIVE after its first complete round (every
 * holder answered, every copy succeeded). A DRAINING node announces LEFT
 * once it holds nothing, then asks the process to stop (SIGTERM to itself).
 *
 * The scrubber thread re-reads every stored object at [repair] scrub_rate
 * bytes/s, pausing [repair] scrub_interval between passes; a corrupt object
 * (also one found by a read, repair_note_corrupt) is replaced by a good copy
 * from another member (store_repair).
 *
 * Threads: repair_start() starts the round thread and the scrubber; the
 * other functions are called by transport worker threads. */
#ifndef SP_REPAIR_H
#define SP_REPAIR_H

#include "../common/keys.h"
#include "../common/membership.h"
#include "../common/transport.h"
#include "../common/wire.h"
#include "store.h"

#include <stdbool.h>
#include <stdint.h>

typedef struct {
    const char *self_id;
    int replicas;              /* N */
    int interval_ms;           /* anti-entropy round period */
    uint64_t rate_bytes;       /* copy streams, bytes/s in total */
    int streams;               /* parallel copy streams */
    int scrub_interval_ms;     /* pause between scrubber passes */
    uint64_t scrub_rate_bytes; /* scrubber reads, bytes/s */
    int call_timeout_ms;       /* one RPC to a member */
    bool expect_peers;         /* seeds configured: a joiner waits to learn the cluster */
    /* Optional: whether the node refuses new objects for want of disk
     * space, and the free bytes, for the status (node.c below_reserve). */
    bool (*disk_state)(void *ctx, uint64_t *free_bytes);
    void *disk_ctx;
    transport_config_t transport; /* for the clients */
} repair_config_t;

typedef struct repair repair_t;

/* Starts the round and scrubber threads. store, m, self and allowed are
 * borrowed and must outlive the repair module. Returns NULL (with a log line) on
 * failure. */
repair_t *repair_start(const repair_config_t *cfg, store_t *store, membership_t *m,
                       const keys_pair_t *self, const keys_allowlist_t *allowed);
/* Stops the threads (a running copy finishes its current object first)
 * and frees *hp; NULL accepted. */
void repair_stop(repair_t **hp);

/* This node's own figures (member fields filled from the view). */
void repair_member_status(repair_t *h, wire_member_status_t *out);
/* The cluster-wide status: asks every reachable storage member for its
 * figures and partition digests. Fills out (owned; freed by
 * wire_reply_free of the reply holding it). Returns 0 or an error. */
int repair_cluster_status(repair_t *h, wire_status_t *out);
/* Handles a drain request for this node: refused (SP_EINVAL with why) when
 * fewer than N other storage members are live, else announces DRAINING. */
int repair_drain(repair_t *h, const char *node_id, char *why, size_t whylen);
/* A read found this SOP's stored copy corrupt: the scrubber thread repairs
 * it from another member soon. */
void repair_note_corrupt(repair_t *h, const char *sop_uid);

/* An admin.h collector (ctx: the repair_t): under-replicated partitions at
 * the last round, hints pending, repair and scrub bytes and errors. */
struct admin_out;
void repair_collect(void *ctx, struct admin_out *o);

#endif
