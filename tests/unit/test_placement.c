/* test_placement.c - placement over a gossip view (placement.h): golden
 * vectors that pin where studies live, the state sets, previous owners and
 * stand-in order, and agreement between the nodes' computation and the
 * router's (router/backend.c) over the same view, also when a member is
 * missing from the router's cluster keys. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "base.h"
#include "gossip.h"
#include "keys.h"
#include "placement.h"
#include "ring.h"

#include "../../router/backend.h"

#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#define MAXN 16

/* A fixed membership: ids, sites and weights must not change, or the golden
 * vectors below no longer mean anything. */
static const struct {
    const char *id, *site;
    double weight;
} FIXED[] = {{"n1", "A", 1}, {"n2", "A", 1}, {"n3", "B", 2},
             {"n4", "B", 1}, {"n5", "C", 1}, {"n6", "C", 0.5}};
#define NFIXED (sizeof FIXED / sizeof FIXED[0])

static void member_set(gossip_member_t *m, const char *id, const char *site, double weight,
                       gossip_role_t role, gossip_state_t state)
{
    memset(m, 0, sizeof *m);
    sp_strlcpy(m->id, id, sizeof m->id);
    snprintf(m->endpoint, sizeof m->endpoint, "tcp://127.0.0.1:%d", 7400 + (int)strlen(id));
    sp_strlcpy(m->site, site, sizeof m->site);
    m->role = role;
    m->weight = weight;
    m->state = state;
    m->incarnation = 1;
}

/* The fixed membership, listed in reverse and with a router first, so that
 * the placement's own ordering is what the vectors pin. */
static size_t fixed_view(gossip_member_t *view)
{
    size_t n = 0;
    member_set(&view[n++], "router1", "A", 0, GOSSIP_ROUTER, GOSSIP_ALIVE);
    for (size_t i = NFIXED; i-- > 0;)
        member_set(&view[n++], FIXED[i].id, FIXED[i].site, FIXED[i].weight, GOSSIP_STORAGE,
                   GOSSIP_ALIVE);
    return n;
}

static size_t find(const gossip_member_t *view, size_t n, const char *id)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(view[i].id, id) == 0)
            return i;
    fail_msg("no member %s", id);
    return 0;
}

/* Computed once with ring.c as of this test's creation: if one of these
 * changes, every stored study would move to other nodes. */
static void test_partition_golden(void **state)
{
    (void)state;
    static const struct {
        const char *uid;
        uint32_t partition;
    } gold[] = {
        {"1.2.3", 244},
        {"1.2.826.0.1.3680043.8.498.1", 115},
        {"1.2.826.0.1.3680043.8.498.72.0.1.1", 638},
        {"2.25.1234567890", 3929},
        {"1.3.6.1.4.1.5962.99.1.1", 2183},
        {"1.2.840.113619.2.55.3.1", 3805},
        {"1.2.276.0.7230010.3.1.2.1", 3239},
        {"9.9", 1932},
    };
    for (size_t i = 0; i < sizeof gold / sizeof gold[0]; i++)
        assert_int_equal(ring_partition(gold[i].uid), gold[i].partition);
}

static void test_owners_golden(void **state)
{
    (void)state;
    static const struct {
        uint32_t partition;
        const char *owners[3];
    } gold[] = {
        {0, {"n3", "n1", "n6"}},    {1, {"n2", "n3", "n5"}},    {7, {"n4", "n1", "n6"}},
        {100, {"n3", "n1", "n5"}},  {1000, {"n3", "n5", "n1"}}, {2047, {"n5", "n4", "n2"}},
        {3000, {"n5", "n4", "n1"}}, {4095, {"n3", "n2", "n5"}},
    };
    gossip_member_t view[MAXN];
    size_t n = fixed_view(view);
    placement_t pl;
    placement_init(&pl, view, n, 3);
    assert_int_equal(pl.nplaced, NFIXED);
    for (size_t i = 0; i < sizeof gold / sizeof gold[0]; i++) {
        size_t owners[RING_MAX_REPLICAS];
        assert_int_equal(placement_owners(&pl, gold[i].partition, owners), 3);
        for (size_t k = 0; k < 3; k++)
            assert_string_equal(view[owners[k]].id, gold[i].owners[k]);
        /* The preference list starts with the owners and covers everyone. */
        size_t pref[RING_MAX_REPLICAS];
        assert_int_equal(placement_preference(&pl, gold[i].partition, pref), NFIXED);
        assert_memory_equal(pref, owners, 3 * sizeof *owners);
    }
    placement_clear(&pl);
}

static void test_state_sets(void **state)
{
    (void)state;
    gossip_member_t m;
    static const struct {
        gossip_state_t s;
        bool placed, readable, writable, previous;
    } table[] = {
        {GOSSIP_ALIVE, true, true, true, true},     {GOSSIP_JOINING, true, true, true, false},
        {GOSSIP_SUSPECT, true, true, true, true},   {GOSSIP_DOWN, true, false, false, false},
        {GOSSIP_DRAINING, false, true, true, true}, {GOSSIP_OUT, false, false, false, false},
        {GOSSIP_LEFT, false, false, false, false},
    };
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++) {
        member_set(&m, "n1", "A", 1, GOSSIP_STORAGE, table[i].s);
        assert_int_equal(placement_is_placed(&m), table[i].placed);
        assert_int_equal(placement_is_readable(&m), table[i].readable);
        assert_int_equal(placement_is_writable(&m), table[i].writable);
        assert_int_equal(placement_is_previous(&m), table[i].previous);
        m.role = GOSSIP_ROUTER; /* never placed, never asked for data */
        assert_false(placement_is_placed(&m) || placement_is_readable(&m) ||
                     placement_is_writable(&m) || placement_is_previous(&m));
    }
}

/* A joiner takes partitions at once; the previous owners are those of the
 * view without it, and a DOWN member keeps its partitions while a DRAINING
 * one counts only among the previous owners. */
static void test_previous_owners(void **state)
{
    (void)state;
    gossip_member_t view[MAXN], before[MAXN];
    size_t n = fixed_view(view);
    size_t nb = fixed_view(before);
    member_set(&view[n++], "n7", "C", 4, GOSSIP_STORAGE, GOSSIP_JOINING);
    view[find(view, n, "n2")].state = GOSSIP_DOWN;
    before[find(before, nb, "n2")].state = GOSSIP_DOWN;
    placement_t now, old;
    placement_init(&now, view, n, 3);
    placement_init(&old, before, nb, 3);
    assert_int_equal(now.nplaced, NFIXED + 1);
    assert_int_equal(now.nprev, NFIXED - 1);
    size_t moved = 0;
    for (uint32_t p = 0; p < RING_PARTITIONS; p++) {
        size_t a[RING_MAX_REPLICAS], b[RING_MAX_REPLICAS], c[RING_MAX_REPLICAS];
        size_t ka = placement_previous_owners(&now, p, a);
        /* Previous owners leave the DOWN member out: it cannot be read. */
        assert_int_equal(ka, 3);
        for (size_t i = 0; i < ka; i++)
            assert_true(placement_is_previous(&view[a[i]]));
        size_t kb = placement_owners(&old, p, b);
        size_t kc = placement_owners(&now, p, c);
        assert_int_equal(kb, 3);
        assert_int_equal(kc, 3);
        bool has7 = false;
        for (size_t i = 0; i < kc; i++)
            has7 |= strcmp(view[c[i]].id, "n7") == 0;
        moved += has7;
    }
    assert_true(moved > 0);
    /* Draining: n4 leaves the owners but stays among the previous owners. */
    view[find(view, n, "n4")].state = GOSSIP_DRAINING;
    placement_clear(&now);
    placement_init(&now, view, n, 3);
    assert_int_equal(now.nplaced, NFIXED);
    assert_int_equal(now.nprev, NFIXED - 1);
    placement_clear(&now);
    placement_clear(&old);
}

/* The router's snapshot (backend_view_owners) and the nodes' placement give
 * the same owners over the same view, whether or not every member's key is
 * in the router's cluster keys. */
static void test_router_and_nodes_agree(void **state)
{
    (void)state;
    gossip_member_t view[MAXN];
    size_t n = fixed_view(view);
    member_set(&view[n++], "n8", "B", 1, GOSSIP_STORAGE, GOSSIP_SUSPECT);
    member_set(&view[n++], "n9", "A", 1, GOSSIP_STORAGE, GOSSIP_DRAINING);
    view[find(view, n, "n5")].state = GOSSIP_DOWN;

    keys_allowlist_t *all = keys_allowlist_new(), *some = keys_allowlist_new();
    for (size_t i = 0; i < n; i++) {
        keys_pair_t kp;
        assert_int_equal(keys_generate(&kp), 0);
        assert_int_equal(keys_allowlist_add(all, kp.public_z85, view[i].id), 0);
        /* n3 (weight 2: an owner of many partitions) has no key here. */
        if (strcmp(view[i].id, "n3") != 0)
            assert_int_equal(keys_allowlist_add(some, kp.public_z85, view[i].id), 0);
    }
    backend_config_t with_all = {.keys = all, .replicas = 3, .write_quorum = 2};
    backend_config_t with_some = {.keys = some, .replicas = 3, .write_quorum = 2};

    placement_t pl;
    placement_init(&pl, view, n, 3);
    size_t with_n3 = 0;
    for (uint32_t p = 0; p < RING_PARTITIONS; p++) {
        size_t owners[RING_MAX_REPLICAS];
        size_t k = placement_owners(&pl, p, owners);
        char a[RING_MAX_REPLICAS][GOSSIP_ID_MAX], b[RING_MAX_REPLICAS][GOSSIP_ID_MAX];
        assert_int_equal(backend_view_owners(&with_all, view, n, p, a), k);
        assert_int_equal(backend_view_owners(&with_some, view, n, p, b), k);
        for (size_t i = 0; i < k; i++) {
            assert_string_equal(a[i], view[owners[i]].id);
            assert_string_equal(b[i], view[owners[i]].id);
            with_n3 += strcmp(b[i], "n3") == 0;
        }
    }
    assert_true(with_n3 > 0); /* the keyless member really owns partitions */
    placement_clear(&pl);
    keys_allowlist_destroy(&all);
    keys_allowlist_destroy(&some);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_partition_golden),
        cmocka_unit_test(test_owners_golden),
        cmocka_unit_test(test_state_sets),
        cmocka_unit_test(test_previous_owners),
        cmocka_unit_test(test_router_and_nodes_agree),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
