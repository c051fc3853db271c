/* placement.h - which storage members own a partition, computed from a
 * gossip view: the one place storage nodes (node/repair.c), routers
 * (router/backend.c) and the admin CLI (node/cli.c) take owners from, so
 * that they agree whenever their views agree (contract 3, README
 * "Contracts").
 *
 * Input is a view: an array of gossip_member_t as membership_view() or a
 * status reply lists them (any order, routers and storage members mixed).
 * Nothing else counts: in particular not whether the caller can reach a
 * member or holds its key. A member the caller cannot talk to still owns its
 * partitions; the caller treats it as unreachable (a stand-in takes its
 * writes) and never leaves it out of the placement.
 *
 *  - Placed members: storage members in a placed state (ALIVE, JOINING,
 *    SUSPECT, DOWN; gossip.h), sorted by id.
 *  - Owners of a partition: ring_owners() over the placed members, N =
 *    [cluster] replicas (ring.h: weighted rendezvous spread over sites).
 *  - Preference list: the same ranking extended over every placed member
 *    (at most RING_MAX_REPLICAS); a write for an owner that cannot take it
 *    goes to the next member of this list.
 *  - Previous owners: ring_owners() over the storage members that are
 *    ALIVE, SUSPECT or DRAINING, i.e. the view without its joiners (still
 *    filling) but with the members that drain (still holding data): where a
 *    study sat before the joiners came.
 *
 * Every index these functions return is an index into the caller's view.
 * Pure functions of their arguments; a placement_t is immutable after
 * placement_init() and may be read by many threads at once. */
#ifndef SP_PLACEMENT_H
#define SP_PLACEMENT_H

#include "gossip.h"
#include "ring.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* The state sets placement and traffic use, each defined once here in
 * terms of gossip.h's state table. */
/* Owns partitions: a storage member ALIVE, JOINING, SUSPECT or DOWN. */
bool placement_is_placed(const gossip_member_t *m);
/* May be asked for what it holds: a storage member that holds data and is
 * reachable (ALIVE, JOINING, DRAINING, SUSPECT). */
bool placement_is_readable(const gossip_member_t *m);
/* May be sent a write: a reachable storage member (ALIVE, JOINING,
 * DRAINING, SUSPECT). */
bool placement_is_writable(const gossip_member_t *m);
/* Counts for the previous owners: a storage member ALIVE, SUSPECT or
 * DRAINING. */
bool placement_is_previous(const gossip_member_t *m);

/* The placement of one view. The rings' strings point into the view, which
 * must outlive the placement_t. */
typedef struct {
    size_t replicas;     /* N, at most RING_MAX_REPLICAS */
    size_t nview;        /* members in the view */
    ring_member_t *ring; /* the placed members, sorted by id */
    size_t *ring_at;     /* ring[i] is view[ring_at[i]] */
    size_t nplaced;
    ring_member_t *prev; /* the previous owners' ring, sorted by id */
    size_t *prev_at;     /* prev[i] is view[prev_at[i]] */
    size_t nprev;
} placement_t;

/* Builds the placement of view[0..n) for `replicas` copies per partition
 * (capped at RING_MAX_REPLICAS). view is borrowed; placement_clear()
 * releases what this allocates. */
void placement_init(placement_t *p, const gossip_member_t *view, size_t n, size_t replicas);
/* Frees the arrays and zeroes *p. */
void placement_clear(placement_t *p);

/* Writes the view indexes of the partition's owners, in preference order
 * (the first is the primary), into owners (room for RING_MAX_REPLICAS);
 * returns their count, min(N, placed members). */
size_t placement_owners(const placement_t *p, uint32_t partition, size_t *owners);
/* Writes the partition's extended preference list (the owners first, then
 * the placed members that would own it next) into out (room for
 * RING_MAX_REPLICAS); returns its length, min(RING_MAX_REPLICAS, placed
 * members). */
size_t placement_preference(const placement_t *p, uint32_t partition, size_t *out);
/* Writes the partition's previous owners (see above) into owners (room for
 * RING_MAX_REPLICAS); returns their count. */
size_t placement_previous_owners(const placement_t *p, uint32_t partition, size_t *owners);

#endif
