/* backend.h - the router's side of the cluster: placement of studies on
 * storage nodes, quorum writes, scatter/gather queries, and fetching
 * instances from any replica that has them.
 *
 * Threads: every function may be called from any DICOM worker thread at
 * once. Each thread gets its own transport clients (ZeroMQ sockets are not
 * thread-safe), created on first use and closed when the thread exits. The
 * node list and settings are read-only after backend_new(). */
#ifndef SP_BACKEND_H
#define SP_BACKEND_H

#include "../common/attrs.h"
#include "../common/keys.h"
#include "../common/transport.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct {
    char *id;       /* node name, as in the cluster key file */
    char *endpoint; /* tcp://host:port */
    char *site;
    double weight;
    char public_z85[KEYS_Z85_LEN + 1];
} backend_node_t;

typedef struct {
    const backend_node_t *nodes; /* copied */
    size_t nnodes;
    keys_pair_t self; /* the router's key pair */
    transport_config_t transport;
    int replicas;         /* N */
    int write_quorum;     /* W */
    int store_timeout_ms; /* waiting for W acknowledgements */
    int query_timeout_ms; /* waiting for find / list answers */
    int fetch_timeout_ms; /* per replica, reading one instance */
    int retry_down_ms;    /* skip a node that just failed for this long */
    bool case_insensitive_names;
} backend_config_t;

typedef struct backend backend_t;

backend_t *backend_new(const backend_config_t *cfg);
void backend_destroy(backend_t **bp);

typedef struct {
    int acknowledged; /* replicas that hold the instance durably (stored or duplicate) */
    int conflicts;    /* replicas holding different bytes under the same SOP UID */
    int failed;       /* replicas that answered an error or not at all */
    int pending;      /* replicas still writing when the quorum was reached */
    int needed;       /* W */
    char detail[256]; /* the first error, for logs and Error Comment */
} backend_put_result_t;

/* Stores Part-10 bytes on the study's N replicas and returns once W of them
 * acknowledged durably, or all answered, or the store timeout passed.
 * attrs must hold the Study/Series/SOP Instance UIDs. Returns 0 when at
 * least W acknowledged (and no replica reported a conflict), SP_ECONFLICT,
 * or SP_EUNAVAIL when fewer than W acknowledged in time. */
int backend_put(backend_t *b, const attrs_t *attrs, const uint8_t *part10, size_t len,
                backend_put_result_t *res);

/* Called for each merged, de-duplicated match; return non-zero to stop. */
typedef int (*backend_match_fn)(void *ctx, const attrs_t *match);

/* Runs a C-FIND over the cluster: sent to the study's replicas when keys name
 * StudyInstanceUID values, else scattered to every node; merged without
 * duplicates by the level's unique key, at most limit matches (0 = none).
 * Returns 0, SP_ELIMIT when the limit cut the result, SP_EUNAVAIL when no
 * node answered, or the callback's non-zero value. *partial (may be NULL)
 * is set when some node did not answer (results may then be incomplete only
 * if every replica of some study was among them). */
int backend_find(backend_t *b, level_t level, const attrs_t *keys, size_t limit,
                 backend_match_fn fn, void *ctx, bool *partial);

/* Reads one instance's Part-10 bytes from the first replica of its study
 * that has a good copy (digest verified by the node on read), trying
 * each replica in placement order rotated by `spread` (so concurrent readers
 * can share the load). *out is malloc'd. Returns 0,
 * SP_ENOTFOUND, or SP_EUNAVAIL. */
int backend_fetch(backend_t *b, const char *study_uid, const char *sop_uid, unsigned spread,
                  uint8_t **out, size_t *len);

/* The partition and replica node ids (at most RING_MAX_REPLICAS) of a study. */
size_t backend_locate(backend_t *b, const char *study_uid, uint32_t *partition,
                      const char **owners);

#endif
