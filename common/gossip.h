/* gossip.h - cluster membership: a SWIM-style failure detector and
 * dissemination protocol, written as a pure, deterministic state machine.
 * Contract 4 (README "Contracts"): the member states and when down may
 * become out.
 *
 * There is no I/O, no thread and no clock in here. The caller passes the
 * current monotonic time (now_ms) into every call, feeds inbound messages to
 * gossip_receive(), calls gossip_tick() at or after gossip_next_deadline(),
 * and sends whatever gossip_poll() hands out. Randomness comes from a PRNG
 * seeded by the configuration, so a test can simulate a whole cluster
 * exactly. A gossip_t is not thread-safe: one thread (the node's or router's
 * event loop) owns it.
 *
 * Protocol (SWIM with the memberlist refinements):
 *  - Every probe_interval_ms a member PINGs the next member of a shuffled
 *    round-robin list. With no ACK after probe_timeout_ms it asks
 *    indirect_checks other members to PING the target for it (PING_REQ);
 *    they relay the ACK, or send a NACK if the target did not answer them
 *    either. With no ACK at all by the end of the interval the target
 *    becomes SUSPECT.
 *  - A SUSPECT member becomes DOWN after the suspicion timeout unless it
 *    refutes first. The timeout is Lifeguard's (as in memberlist): it starts
 *    at suspicion_max_mult * min, where min = suspicion_mult * max(1,
 *    log10(n)) * probe_interval_ms, and shrinks towards min as independent
 *    accusers confirm the suspicion (each SUSPECT update names its accuser;
 *    suspicion_mult - 2 confirmations reach min). A dead member is probed
 *    and accused by many members and goes DOWN after about min; a false
 *    suspicion from one lossy link leaves the member time to refute. A
 *    member refutes so: a member that hears a rumour about itself (suspect, down, out, or
 *    anything differing from what it says about itself) at an incarnation >=
 *    its own takes incarnation = rumour + 1 and re-announces itself.
 *  - A DOWN storage member becomes OUT after down_to_out_ms, subject to the
 *    site rule below. Other members stop sending to DOWN, OUT and LEFT
 *    members, except for one reconnect SYNC_REQ per sync interval to a
 *    random DOWN or OUT member, so that two halves of a healed partition
 *    find each other again.
 *  - Every message carries up to max_piggyback member updates, those sent
 *    the fewest times first; each update is sent retransmit_mult *
 *    ceil(log10(n + 1)) times. A message to a member this one believes
 *    suspect/down/out also carries that belief first, so the member learns
 *    of it and refutes at once.
 *  - Every sync_interval_ms a member exchanges its full state with a random
 *    reachable member (SYNC_REQ carries the sender's state, the SYNC reply the
 *    receiver's). A member that knows no reachable member sends SYNC_REQ to
 *    every seed endpoint each probe interval: that is how it joins.
 *  - A member whose own ticks stop for more than two probe intervals (the
 *    process was paused, e.g. SIGSTOP) shifts all its running timers by the
 *    gap and drops its in-flight probe, so it does not accuse others of a
 *    silence that was its own.
 *
 * States and what they mean for placement (ring.h) and traffic:
 *
 *   state     set by        placed (owns      holds data  reachable
 *                           partitions, gets  (serves     (send to it)
 *                           new writes)       reads)
 *   ALIVE     the member    yes               yes         yes
 *   JOINING   the member    yes (reads fall   filling     yes
 *                           back to previous
 *                           owners)
 *   DRAINING  the member    no                yes         yes
 *   SUSPECT   detector      yes               yes         yes
 *   DOWN      detector      yes (writes go    yes         no
 *                           to a hinted
 *                           stand-in)
 *   OUT       detector      no (its data is   no          no
 *                           re-replicated)
 *   LEFT      the member    no                no          no
 *
 * Only members with role GOSSIP_STORAGE are ever placed; routers are
 * members for the failure detector only.
 *
 * Precedence of an update u over the local record r of the same member
 * (memberlist's rules, extended to the extra states):
 *  - u.incarnation > r.incarnation: u wins, whatever the states.
 *  - u.incarnation < r.incarnation: u is stale and ignored.
 *  - equal incarnations: u wins only if rank(u.state) > rank(r.state), with
 *    rank ALIVE = JOINING = DRAINING = 0 < SUSPECT = 1 < DOWN = 2 < OUT = 3 <
 *    LEFT = 4. The three live states never compete at one incarnation because
 *    only the member itself announces them, bumping its incarnation each
 *    time. LEFT outranks OUT and DOWN because it is the member's own word
 *    that it went away after handing over its data.
 *  - A member never accepts an update about itself; it refutes instead (see
 *    above), which is also how a restarted member with a fresh incarnation
 *    overrides its previous life's record.
 *  - Member attributes (endpoint, site, role, weight, key) change only
 *    together with an accepted update.
 *
 * Site rule (never mark a whole site out automatically): a DOWN storage
 * member becomes OUT - whether by its own timer or by an OUT update from a
 * peer - only if at least one other storage member of the same site is live
 * (ALIVE, JOINING or DRAINING) in the local view at that moment. Otherwise it
 * stays DOWN (an OUT update is applied as DOWN) and is re-checked on every
 * tick, so its site-mates, once alive again, let it go out. Consequently the
 * last live storage member of a site can never go out automatically, and a
 * site with a single storage member never loses it to OUT. Members whose
 * role is not storage hold no partitions and go OUT after the delay without
 * this check.
 *
 * The view version increases by one whenever a member is added or any
 * member's state or attributes change in the local view; an incarnation
 * change alone (e.g. a refutation of a suspicion this member never held) does
 * not change it. */
#ifndef SP_GOSSIP_H
#define SP_GOSSIP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define GOSSIP_ID_MAX 64        /* member id, including the terminator */
#define GOSSIP_ENDPOINT_MAX 128 /* e.g. "tcp://10.0.0.5:7400" */
#define GOSSIP_SITE_MAX 64
#define GOSSIP_KEY_LEN 40       /* Z85 CURVE public key; empty if unknown */
#define GOSSIP_MAX_MEMBERS 4096 /* upper bound on updates in one message */

typedef enum {
    GOSSIP_ALIVE = 0,
    GOSSIP_SUSPECT,
    GOSSIP_DOWN,
    GOSSIP_OUT,
    GOSSIP_JOINING,
    GOSSIP_DRAINING,
    GOSSIP_LEFT,
} gossip_state_t;
#define GOSSIP_STATE_COUNT 7

typedef enum {
    GOSSIP_STORAGE = 0, /* holds partitions */
    GOSSIP_ROUTER,      /* DICOM front door; never placed */
} gossip_role_t;

/* One member as gossiped: identity, attributes, incarnation and state. Also
 * the element of snapshots handed to callers (plain copies). */
typedef struct {
    char id[GOSSIP_ID_MAX];
    char endpoint[GOSSIP_ENDPOINT_MAX];
    char site[GOSSIP_SITE_MAX];
    char public_key[GOSSIP_KEY_LEN + 1];
    gossip_role_t role;
    double weight;        /* relative capacity for placement, >= 0 */
    uint64_t incarnation; /* only the member itself raises it */
    gossip_state_t state;
    char accuser[GOSSIP_ID_MAX]; /* SUSPECT: a member that suspects it; else empty */
} gossip_member_t;

typedef enum {
    GOSSIP_PING = 1, /* are you there? answered by ACK with the same seq */
    GOSSIP_ACK,      /* target set when relayed for a PING_REQ */
    GOSSIP_PING_REQ, /* please ping target for me */
    GOSSIP_NACK,     /* relay: the target did not answer me either */
    GOSSIP_SYNC_REQ, /* push-pull: here is my full state, send me yours */
    GOSSIP_SYNC,     /* the reply: full state */
} gossip_kind_t;

/* A protocol message. Plain data; common/wire.c will encode it. The updates
 * array belongs to the message: gossip_poll() hands a message whose array
 * the caller releases with gossip_msg_clear(); gossip_receive() only reads
 * the message it is given. */
typedef struct {
    gossip_kind_t kind;
    char from_id[GOSSIP_ID_MAX];
    char from_endpoint[GOSSIP_ENDPOINT_MAX]; /* where replies go */
    char to_id[GOSSIP_ID_MAX];               /* empty when sent to a seed endpoint */
    char to_endpoint[GOSSIP_ENDPOINT_MAX];
    uint64_t seq;                  /* PING/ACK/PING_REQ/NACK matching */
    char target_id[GOSSIP_ID_MAX]; /* PING_REQ, and the ACK/NACK answering it */
    char target_endpoint[GOSSIP_ENDPOINT_MAX];
    gossip_member_t *updates;
    size_t n_updates;
} gossip_msg_t;

typedef struct {
    /* This member. Strings are copied by gossip_new(). */
    const char *id;
    const char *endpoint;
    const char *site;
    const char *public_key; /* Z85, or NULL/"" */
    gossip_role_t role;
    double weight;
    gossip_state_t initial_state; /* ALIVE or JOINING */
    uint64_t initial_incarnation; /* e.g. wall-clock seconds, to outrank a previous life */
    const char *const *seeds;     /* endpoints to join through; own endpoint is skipped */
    size_t n_seeds;
    uint64_t seed; /* PRNG seed; distinct per member */

    int64_t probe_interval_ms;
    int64_t probe_timeout_ms;  /* direct-ACK wait before PING_REQ; < probe_interval_ms */
    unsigned indirect_checks;  /* k relays per failed direct probe */
    double suspicion_mult;     /* minimum suspicion timeout = mult * max(1, log10 n) * probe
                                * interval */
    double suspicion_max_mult; /* an unconfirmed suspicion lasts max_mult * minimum */
    unsigned retransmit_mult;  /* sends per update = mult * ceil(log10(n + 1)) */
    unsigned max_piggyback;    /* updates per PING/ACK/PING_REQ/NACK */
    int64_t sync_interval_ms;  /* push-pull full-state exchange */
    int64_t down_to_out_ms;    /* DOWN for this long before OUT */
} gossip_config_t;

/* Statistics since gossip_new(), for logs and tests. */
typedef struct {
    uint64_t probes;          /* direct probes started */
    uint64_t indirect_probes; /* probes that needed PING_REQ */
    uint64_t indirect_acks;   /* ACKs received through a relay */
    uint64_t nacks;           /* NACKs received */
    uint64_t suspicions;      /* members this one made SUSPECT */
    uint64_t refutations;     /* incarnation bumps against rumours about itself */
    uint64_t syncs;           /* SYNC_REQ sent */
    uint64_t rejected;        /* inbound messages refused as malformed */
} gossip_stats_t;

typedef struct gossip gossip_t;

/* LAN defaults: probe 1 s, probe timeout 300 ms, k = 3, suspicion 4 probe
 * intervals (scaled by log10 n) when confirmed, 6 times that unconfirmed, 4 * ceil(log10(n+1))
 * retransmits, 8 piggybacked updates, full sync every 30 s, DOWN -> OUT after 5 minutes. Identity
 * fields are zeroed; role storage, weight 1, state ALIVE. */
void gossip_config_defaults(gossip_config_t *cfg);

/* Creates the membership state of one member, knowing only itself, at time
 * now_ms. Returns an owned object, or NULL (with a log line) if the
 * configuration is invalid: missing or over-long id/endpoint/site, a public
 * key that is not 40 characters, an initial state other than ALIVE or
 * JOINING, or non-positive intervals. */
gossip_t *gossip_new(const gossip_config_t *cfg, int64_t now_ms);
/* Frees *gp (NULL accepted) and the messages still in its outbox; sets *gp
 * to NULL. */
void gossip_destroy(gossip_t **gp);

/* Runs the timers due at now_ms: probes, indirect probes, suspicion and
 * down->out expiry, relays, syncs and seed joins. */
void gossip_tick(gossip_t *g, int64_t now_ms);
/* The time at which gossip_tick() next has work; never later than one probe
 * interval ahead. */
int64_t gossip_next_deadline(const gossip_t *g);

/* Handles one inbound message (borrowed). Returns 0, or SP_EPROTO if the
 * message is malformed (bad kind/state/role, unterminated or empty strings,
 * too many updates) or addressed to another member id; nothing is changed
 * then. */
int gossip_receive(gossip_t *g, int64_t now_ms, const gossip_msg_t *msg);

/* Moves the next outbound message into *out and returns true, or returns
 * false when the outbox is empty. The caller owns out->updates and releases
 * it with gossip_msg_clear(). */
bool gossip_poll(gossip_t *g, gossip_msg_t *out);
/* Frees a message's updates array and zeroes it. */
void gossip_msg_clear(gossip_msg_t *msg);

/* Announces a state this member chooses for itself: ALIVE, JOINING,
 * DRAINING or LEFT (e.g. at an admin's drain request). Raises the
 * incarnation and disseminates. Returns 0 (also when the state is already
 * the current one: nothing happens), or SP_EINVAL for a detector state. */
int gossip_set_self_state(gossip_t *g, gossip_state_t state);

/* Number of known members, this one included. */
size_t gossip_count(const gossip_t *g);
/* Copies up to max members (this one first, then in learning order) into
 * out; returns the total count, which may exceed max. */
size_t gossip_snapshot(const gossip_t *g, gossip_member_t *out, size_t max);
/* Copies the member with this id into *out; returns 0 or SP_ENOTFOUND. */
int gossip_lookup(const gossip_t *g, const char *id, gossip_member_t *out);
/* Copies up to max storage members that are placed (placement_is_placed:
 * ALIVE, JOINING, SUSPECT, DOWN) into out, sorted by id; returns their total
 * count. Owners themselves come from placement.h over a whole view. */
size_t gossip_placement(const gossip_t *g, gossip_member_t *out, size_t max);
/* Increases whenever the local view changes (see above). Starts at 1. */
uint64_t gossip_view_version(const gossip_t *g);
/* Counters since creation. */
gossip_stats_t gossip_stats(const gossip_t *g);

/* "alive", "suspect", ...; "?" for an unknown value. */
const char *gossip_state_name(gossip_state_t state);
/* The columns of the state table above. */
bool gossip_state_placed(gossip_state_t state);
bool gossip_state_holds_data(gossip_state_t state);
bool gossip_state_reachable(gossip_state_t state);

#endif
