/* ring.c - site-aware weighted rendezvous placement (ring.h). */
#include "ring.h"

#include "base.h"

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t hash64(const void *data, size_t len)
{
    uint8_t d[SP_DIGEST_LEN];
    sp_digest(data, len, d);
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = (v << 8) | d[i];
    return v;
}

uint32_t ring_partition(const char *study_uid)
{
    return (uint32_t)(hash64(study_uid, strlen(study_uid)) % RING_PARTITIONS);
}

/* Weighted rendezvous score: weight / -ln(u) with u uniform in (0,1) from
 * hash(partition, member). The member with the highest score wins; with
 * weights, each member's share of partitions is proportional to its weight. */
static double hrw_score(const ring_member_t *m, uint32_t partition)
{
    char key[512];
    int len = snprintf(key, sizeof key, "%u/%s", (unsigned)partition, m->id);
    uint64_t h = hash64(key, (size_t)(len < (int)sizeof key ? len : (int)sizeof key - 1));
    double u = ((double)(h >> 11) + 0.5) / 9007199254740992.0; /* 2^53 */
    return m->weight / -log(u);
}

typedef struct {
    size_t index;
    double score;
} ranked_t;

static int by_score_desc(const void *a, const void *b)
{
    const ranked_t *x = a, *y = b;
    return x->score < y->score   ? 1
           : x->score > y->score ? -1
                                 : (x->index > y->index) - (x->index < y->index);
}

static size_t site_count(const ring_member_t *members, const size_t *owners, size_t k,
                         const char *site)
{
    size_t c = 0;
    for (size_t i = 0; i < k; i++)
        if (strcmp(members[owners[i]].site, site) == 0)
            c++;
    return c;
}

size_t ring_owners(const ring_member_t *members, size_t n, uint32_t partition, size_t replicas,
                   size_t *owners)
{
    ranked_t *ranked = sp_calloc(n, sizeof *ranked);
    size_t m = 0;
    for (size_t i = 0; i < n; i++)
        if (members[i].weight > 0)
            ranked[m++] = (ranked_t){i, hrw_score(&members[i], partition)};
    qsort(ranked, m, sizeof *ranked, by_score_desc);
    if (replicas > RING_MAX_REPLICAS)
        replicas = RING_MAX_REPLICAS;
    bool *taken = sp_calloc(m ? m : 1, sizeof *taken);
    size_t k = 0, cap = (replicas + 1) / 2;

    /* Pass 1: the best node of each site, sites ordered by their best score. */
    for (size_t r = 0; r < m && k < replicas; r++) {
        if (site_count(members, owners, k, members[ranked[r].index].site) == 0) {
            owners[k++] = ranked[r].index;
            taken[r] = true;
        }
    }
    /* Pass 2: best remaining nodes, at most ceil(N/2) per site. Pass 3: if
     * the sites are too few for that cap, the best remaining nodes. */
    for (int pass = 2; pass <= 3; pass++) {
        for (size_t r = 0; r < m && k < replicas; r++) {
            if (taken[r])
                continue;
            if (pass == 2 && site_count(members, owners, k, members[ranked[r].index].site) >= cap)
                continue;
            owners[k++] = ranked[r].index;
            taken[r] = true;
        }
    }
    free(taken);
    free(ranked);
    return k;
}
