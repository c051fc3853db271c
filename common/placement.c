/* placement.c - owners, preference lists and previous owners of a
 * partition over a gossip view (placement.h). */
#include "placement.h"

#include "base.h"

#include <stdlib.h>
#include <string.h>

bool placement_is_placed(const gossip_member_t *m)
{
    return m->role == GOSSIP_STORAGE && gossip_state_placed(m->state);
}

bool placement_is_readable(const gossip_member_t *m)
{
    return m->role == GOSSIP_STORAGE && gossip_state_holds_data(m->state) &&
           gossip_state_reachable(m->state);
}

bool placement_is_writable(const gossip_member_t *m)
{
    return m->role == GOSSIP_STORAGE && gossip_state_reachable(m->state);
}

bool placement_is_previous(const gossip_member_t *m)
{
    return placement_is_readable(m) && m->state != GOSSIP_JOINING;
}

typedef struct {
    const char *id;
    size_t at;
} by_id_t;

static int by_id_cmp(const void *a, const void *b)
{
    return strcmp(((const by_id_t *)a)->id, ((const by_id_t *)b)->id);
}

/* Builds a ring of the members of view that pass `in`, sorted by id (the
 * order every member computes, whatever order its view lists them in).
 * Returns the count; *ring and *at are allocated. */
static size_t ring_build(const gossip_member_t *view, size_t n, bool (*in)(const gossip_member_t *),
                         ring_member_t **ring, size_t **at)
{
    by_id_t *sel = sp_calloc(n ? n : 1, sizeof *sel);
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (in(&view[i]))
            sel[k++] = (by_id_t){view[i].id, i};
    qsort(sel, k, sizeof *sel, by_id_cmp);
    *ring = sp_calloc(k ? k : 1, sizeof **ring);
    *at = sp_calloc(k ? k : 1, sizeof **at);
    for (size_t i = 0; i < k; i++) {
        const gossip_member_t *m = &view[sel[i].at];
        (*ring)[i] = (ring_member_t){.id = m->id, .site = m->site, .weight = m->weight};
        (*at)[i] = sel[i].at;
    }
    free(sel);
    return k;
}

void placement_init(placement_t *p, const gossip_member_t *view, size_t n, size_t replicas)
{
    memset(p, 0, sizeof *p);
    p->replicas = replicas < RING_MAX_REPLICAS ? replicas : RING_MAX_REPLICAS;
    p->nview = n;
    p->nplaced = ring_build(view, n, placement_is_placed, &p->ring, &p->ring_at);
    p->nprev = ring_build(view, n, placement_is_previous, &p->prev, &p->prev_at);
}

void placement_clear(placement_t *p)
{
    free(p->ring);
    free(p->ring_at);
    free(p->prev);
    free(p->prev_at);
    memset(p, 0, sizeof *p);
}

/* ring_owners() over one of the two rings, mapped to view indexes; the
 * result is checked against what ring_owners() promises: at most `want`
 * members, each once, each in the view. */
static size_t owners_over(const placement_t *p, const ring_member_t *ring, const size_t *at,
                          size_t n, uint32_t partition, size_t want, size_t *out)
{
    SP_ASSERT(partition < RING_PARTITIONS);
    SP_ASSERT(want <= RING_MAX_REPLICAS);
    size_t idx[RING_MAX_REPLICAS];
    size_t k = ring_owners(ring, n, partition, want, idx);
    SP_ASSERT(k <= want && k <= n);
    for (size_t i = 0; i < k; i++) {
        SP_ASSERT(idx[i] < n);
        out[i] = at[idx[i]];
        SP_ASSERT(out[i] < p->nview);
        for (size_t j = 0; j < i; j++)
            SP_ASSERT(out[j] != out[i]);
    }
    return k;
}

size_t placement_owners(const placement_t *p, uint32_t partition, size_t *owners)
{
    return owners_over(p, p->ring, p->ring_at, p->nplaced, partition, p->replicas, owners);
}

size_t placement_preference(const placement_t *p, uint32_t partition, size_t *out)
{
    return owners_over(p, p->ring, p->ring_at, p->nplaced, partition, RING_MAX_REPLICAS, out);
}

size_t placement_previous_owners(const placement_t *p, uint32_t partition, size_t *owners)
{
    return owners_over(p, p->prev, p->prev_at, p->nprev, partition, p->replicas, owners);
}
