/* membership.h - a member's side of cluster membership (storage nodes and
 * routers alike): a SWIM state machine (gossip.h) driven by one thread over
 * the CURVE transport.
 *
 * membership_start_settings() creates the state machine and a thread that ticks it,
 * sends what it hands out (one transport client per peer, owned by that
 * thread), feeds the direct answers back and sleeps until the next
 * deadline. membership_handle() is called by the node's transport workers
 * for WIRE_GOSSIP requests, concurrently; a mutex guards the state machine.
 * Every change of another member's state is logged as one line:
 *     member n2 alive -> suspect (incarnation 17)
 * ("new" as the old state when a member is first learned). */
#ifndef SP_MEMBERSHIP_H
#define SP_MEMBERSHIP_H

#include "config.h"
#include "gossip.h"
#include "keys.h"
#include "transport.h"
#include "wire.h"

#include <stddef.h>
#include <stdint.h>

/* The [cluster] and [gossip] settings every member reads from its
 * configuration file; MEMBERSHIP_OPTIONS puts them into a program's
 * config_option_t table, so nodes and routers share one definition. */
typedef struct {
    char *seeds;
    char *advertise;
    char *weight;
    int probe_interval_ms;
    int probe_timeout_ms;
    int indirect_checks;
    int suspicion_mult;
    int suspicion_max_mult;
    int sync_interval_ms;
    int down_to_out_ms;
} membership_settings_t;

#define MEMBERSHIP_OPT_(type, member, sec, key, ctype, field, def, lo, hi, help)                   \
    {                                                                                              \
        sec, key, ctype, offsetof(type, member) + offsetof(membership_settings_t, field), def, lo, \
            hi, help, NULL                                                                         \
    }
/* Config table entries for the membership_settings_t field `member` of the
 * settings struct `type`; weight_default is "1" for storage, "0" for routers. */
#define MEMBERSHIP_OPTIONS(type, member, weight_default)                                           \
    MEMBERSHIP_OPT_(type, member, "cluster", "seeds", CONFIG_STRING, seeds, "", 0, 0,              \
                    "Members to join through: comma-separated NAME@tcp://HOST:PORT (NAME as in "   \
                    "the cluster keys, e.g. n1@tcp://10.0.0.5:7401); empty = a cluster of one "    \
                    "until others join"),                                                          \
        MEMBERSHIP_OPT_(type, member, "cluster", "advertise", CONFIG_STRING, advertise, "", 0, 0,  \
                        "Endpoint other members reach this one at; empty = the endpoint bound"),   \
        MEMBERSHIP_OPT_(type, member, "cluster", "weight", CONFIG_STRING, weight, weight_default,  \
                        0, 0, "Relative capacity for placement (storage: a number > 0)"),          \
        MEMBERSHIP_OPT_(type, member, "gossip", "probe_interval", CONFIG_MS, probe_interval_ms,    \
                        "1s", 10, 3600000, "A member is probed every this often"),                 \
        MEMBERSHIP_OPT_(type, member, "gossip", "probe_timeout", CONFIG_MS, probe_timeout_ms,      \
                        "300ms", 5, 3600000,                                                       \
                        "Wait for a direct ACK before asking others to probe (< probe_interval)"), \
        MEMBERSHIP_OPT_(type, member, "gossip", "indirect_checks", CONFIG_INT, indirect_checks,    \
                        "3", 0, 64, "Members asked to probe for us when a direct probe fails"),    \
        MEMBERSHIP_OPT_(type, member, "gossip", "suspicion_mult", CONFIG_INT, suspicion_mult, "4", \
                        1, 1000,                                                                   \
                        "Confirmed suspicion lasts this many probe intervals (times log10 of the " \
                        "size)"),                                                                  \
        MEMBERSHIP_OPT_(type, member, "gossip", "suspicion_max_mult", CONFIG_INT,                  \
                        suspicion_max_mult, "6", 1, 1000,                                          \
                        "An unconfirmed suspicion lasts this many times the confirmed one"),       \
        MEMBERSHIP_OPT_(type, member, "gossip", "sync_interval", CONFIG_MS, sync_interval_ms,      \
                        "30s", 10, 86400000,                                                       \
                        "Full-state exchange with a random member every this often"),              \
        MEMBERSHIP_OPT_(type, member, "gossip", "down_to_out", CONFIG_MS, down_to_out_ms, "5m", 0, \
                        2000000000,                                                                \
                        "A member down this long is out (its partitions are re-replicated)")

/* A seed: a member name (its key comes from the allow-list) and its
 * endpoint. */
typedef struct {
    const char *name;
    const char *endpoint;
} membership_seed_t;

typedef struct membership membership_t;

/* This member, as membership_start_settings() needs it. */
typedef struct {
    const char *id;
    const char *endpoint; /* the bound endpoint; [cluster] advertise overrides it */
    const char *site;
    gossip_role_t role;
    gossip_state_t initial_state; /* ALIVE or JOINING */
} membership_self_t;

/* Validates settings (weight, probe timeout < interval, seed syntax), builds
 * the gossip configuration (incarnation and PRNG seed from the clock) and
 * starts the state machine and its thread. self and allowed are borrowed
 * and must outlive the object. Returns 0 or SP_ECONFIG / a start error, with a
 * log line naming the setting. */
int membership_start_settings(const membership_settings_t *s, const membership_self_t *me,
                              const keys_pair_t *self, const keys_allowlist_t *allowed,
                              membership_t **out);

/* Stops the thread, closes its clients and frees *mp (NULL accepted). */
void membership_stop(membership_t **mp);

/* Handles one WIRE_GOSSIP request on a transport worker thread (m NULL:
 * SP_EUNAVAIL, membership not started yet). Refuses
 * (SP_EPROTO in rep, and a log line) a message whose from_id is not the
 * CURVE-authenticated caller's name; otherwise hands it to the state machine
 * and puts the direct answer addressed to the caller (ACK to a PING, SYNC to a
 * SYNC_REQ), if there is one, into rep->gossip. Returns the status also set in
 * rep->status. */
int membership_handle(membership_t *m, const transport_request_t *req, const wire_request_t *w,
                      wire_reply_t *rep);

/* Copies of the state machine's view (see gossip.h for each); safe from
 * any thread. */
uint64_t membership_view_version(membership_t *m);
/* This member's own record, and its state, as it announces them. */
void membership_self(membership_t *m, gossip_member_t *out);
gossip_state_t membership_self_state(membership_t *m);
/* Announces a state this member chooses for itself (gossip_set_self_state). */
int membership_set_self_state(membership_t *m, gossip_state_t state);
/* Allocates and fills a snapshot of the whole view (*out, caller frees);
 * returns the count. */
size_t membership_view(membership_t *m, gossip_member_t **out);

/* An admin.h collector (ctx: the membership_t): the members of this
 * member's view by role and state, shardpacs_gossip_members. Registered by
 * nodes and routers alike. */
struct admin_out;
void membership_collect(void *ctx, struct admin_out *o);

#endif
