/* membership.h - the storage node's side of cluster membership: a SWIM state
 * machine (common/gossip.h) driven by one thread over the CURVE transport.
 *
 * membership_start() creates the state machine and a thread that ticks it,
 * sends what it hands out (one transport client per peer, owned by that
 * thread), feeds the direct answers back and sleeps until the next
 * deadline. membership_handle() is called by the node's transport workers
 * for WIRE_GOSSIP requests, concurrently; a mutex guards the state machine.
 * Every change of another member's state is logged as one line:
 *     member n2 alive -> suspect (incarnation 17)
 * ("new" as the old state when a member is first learned). */
#ifndef SP_MEMBERSHIP_H
#define SP_MEMBERSHIP_H

#include "../common/gossip.h"
#include "../common/keys.h"
#include "../common/transport.h"
#include "../common/wire.h"

#include <stddef.h>

/* A seed: a member name (its key comes from the allow-list) and its
 * endpoint. */
typedef struct {
    const char *name;
    const char *endpoint;
} membership_seed_t;

typedef struct membership membership_t;

/* Starts membership. gcfg describes this member (id, endpoint, site, role,
 * weight, timings); its seeds field is ignored and built from seeds (the own
 * endpoint or own name is skipped). self and allowed are borrowed and must
 * outlive the object; strings are copied. Returns 0 with *out owned by the
 * caller, or a negative code (with a log line). */
int membership_start(const gossip_config_t *gcfg, const membership_seed_t *seeds, size_t n_seeds,
                     const keys_pair_t *self, const keys_allowlist_t *allowed, membership_t **out);
/* Stops the thread, closes its clients and frees *mp (NULL accepted). */
void membership_stop(membership_t **mp);

/* Handles one WIRE_GOSSIP request on a transport worker thread. Refuses
 * (SP_EPROTO in rep, and a log line) a message whose from_id is not the
 * CURVE-authenticated caller's name; otherwise hands it to the state machine
 * and puts the direct answer addressed to the caller (ACK to a PING, SYNC to a
 * SYNC_REQ), if there is one, into rep->gossip. Returns the status also set in
 * rep->status. */
int membership_handle(membership_t *m, const transport_request_t *req, const wire_request_t *w,
                      wire_reply_t *rep);

#endif
