/* test_ring.c - placement by deterministic simulation: owners distinct, site
 * spread, proportional weights, and minimal movement when one node joins or
 * leaves. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "ring.h"

#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#define MAXN 16

typedef struct {
    char ids[MAXN][16];
    char sites[MAXN][16];
    ring_member_t m[MAXN];
    size_t n;
} cluster_t;

static void add_node(cluster_t *c, const char *site, double weight)
{
    size_t i = c->n++;
    snprintf(c->ids[i], sizeof c->ids[i], "n%zu", i + 1);
    snprintf(c->sites[i], sizeof c->sites[i], "%s", site);
    c->m[i] = (ring_member_t){c->ids[i], c->sites[i], weight};
}

/* Owners of every partition as a bitmask of member indexes (stable across a
 * join because members are only appended). */
static void owner_sets(const cluster_t *c, size_t replicas, uint32_t *sets)
{
    for (uint32_t p = 0; p < RING_PARTITIONS; p++) {
        size_t owners[RING_MAX_REPLICAS];
        size_t k = ring_owners(c->m, c->n, p, replicas, owners);
        sets[p] = 0;
        for (size_t i = 0; i < k; i++)
            sets[p] |= 1u << owners[i];
    }
}

static void test_partition_is_stable_and_in_range(void **state)
{
    (void)state;
    uint32_t p = ring_partition("1.2.826.0.1.3680043.8.498.1");
    assert_true(p < RING_PARTITIONS);
    assert_int_equal(p, ring_partition("1.2.826.0.1.3680043.8.498.1"));
    /* Spread: 40,000 study UIDs fill every partition. */
    static uint16_t hits[RING_PARTITIONS];
    char uid[64];
    for (int i = 0; i < 40000; i++) {
        snprintf(uid, sizeof uid, "1.2.3.%d", i);
        hits[ring_partition(uid)]++;
    }
    for (int i = 0; i < RING_PARTITIONS; i++)
        assert_true(hits[i] > 0 && hits[i] < 30);
}

static void test_owners_distinct_and_sites_spread(void **state)
{
    (void)state;
    cluster_t c = {0};
    for (int i = 0; i < 4; i++)
        add_node(&c, "A", 1);
    for (int i = 0; i < 3; i++)
        add_node(&c, "B", 1);
    for (uint32_t p = 0; p < RING_PARTITIONS; p++) {
        size_t owners[RING_MAX_REPLICAS];
        assert_int_equal(ring_owners(c.m, c.n, p, 3, owners), 3);
        assert_true(owners[0] != owners[1] && owners[1] != owners[2] && owners[0] != owners[2]);
        int at_a = 0;
        for (int i = 0; i < 3; i++)
            at_a += strcmp(c.m[owners[i]].site, "A") == 0;
        assert_true(at_a >= 1 && at_a <= 2); /* both sites, at most ceil(3/2) at one */
    }
    /* One site only: still three distinct nodes. Fewer nodes than N: all. */
    cluster_t one = {0};
    for (int i = 0; i < 3; i++)
        add_node(&one, "A", 1);
    size_t owners[RING_MAX_REPLICAS];
    assert_int_equal(ring_owners(one.m, one.n, 5, 3, owners), 3);
    assert_int_equal(ring_owners(one.m, 2, 5, 3, owners), 2);
}

static void test_weights_are_proportional(void **state)
{
    (void)state;
    cluster_t c = {0};
    add_node(&c, "A", 1);
    add_node(&c, "A", 1);
    add_node(&c, "A", 2);
    int primary[3] = {0};
    for (uint32_t p = 0; p < RING_PARTITIONS; p++) {
        size_t owners[1];
        ring_owners(c.m, c.n, p, 1, owners);
        primary[owners[0]]++;
    }
    /* Expected shares 1/4, 1/4, 1/2 of 4096, within 10%. */
    assert_in_range(primary[0], 920, 1130);
    assert_in_range(primary[1], 920, 1130);
    assert_in_range(primary[2], 1840, 2250);
}

static void test_join_and_leave_move_about_one_mth(void **state)
{
    (void)state;
    static uint32_t before[RING_PARTITIONS], after[RING_PARTITIONS];
    cluster_t c = {0};
    for (int i = 0; i < 5; i++)
        add_node(&c, "A", 1);
    owner_sets(&c, 3, before);
    add_node(&c, "A", 1); /* M = 6 */
    owner_sets(&c, 3, after);
    uint32_t newbit = 1u << 5;
    int changed = 0;
    for (int p = 0; p < RING_PARTITIONS; p++) {
        if (before[p] == after[p])
            continue;
        changed++;
        /* Only the newcomer gains; exactly one old owner gives way. */
        assert_true(after[p] & newbit);
        assert_int_equal(__builtin_popcount(before[p] & ~after[p]), 1);
    }
    /* A newcomer should own N/M = 3/6 of partitions' replica slots: about
     * half the partitions change one owner. */
    assert_in_range(changed, 1800, 2300);

    /* Leaving: remove the newcomer again, and compare with before. */
    c.n--;
    owner_sets(&c, 3, after);
    assert_memory_equal(before, after, sizeof before);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_partition_is_stable_and_in_range),
        cmocka_unit_test(test_owners_distinct_and_sites_spread),
        cmocka_unit_test(test_weights_are_proportional),
        cmocka_unit_test(test_join_and_leave_move_about_one_mth),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
