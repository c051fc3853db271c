/* ring.h - placement: which storage nodes hold a study.
 *
 * A study's partition is hash(StudyInstanceUID) mod the fixed partition
 * count; a partition's replicas are chosen by weighted rendezvous (HRW)
 * hashing over the member nodes, spread across sites: first the best-scoring
 * node of each site in score order (so as many distinct sites as possible),
 * then the best remaining nodes while no site holds more than ceil(N/2)
 * replicas, then (only if the sites are too few to satisfy that cap) the
 * best remaining nodes. Never two replicas on one node. Adding or removing a
 * node moves only the partitions whose owner sets include it.
 *
 * Pure functions of their arguments; thread-safe. */
#ifndef SP_RING_H
#define SP_RING_H

#include <stddef.h>
#include <stdint.h>

#define RING_PARTITIONS 4096
#define RING_MAX_REPLICAS 16

typedef struct {
    const char *id;   /* unique member name */
    const char *site; /* failure domain */
    double weight;    /* relative capacity, > 0 */
} ring_member_t;

/* The partition of a study. */
uint32_t ring_partition(const char *study_uid);

/* Picks up to `replicas` owners of `partition` from members[0..n), writing
 * their indexes into owners in preference order (the first is the primary).
 * Returns how many were chosen: min(replicas, n). Members with weight <= 0
 * are skipped. */
size_t ring_owners(const ring_member_t *members, size_t n, uint32_t partition, size_t replicas,
                   size_t *owners);

#endif
