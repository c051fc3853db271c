/* transport.h - request/reply RPC between cluster members over ZeroMQ,
 * CURVE-encrypted and authenticated on every socket (contract 7, README
 * "Contracts": only listed keys pass, failing closed).
 *
 * Wire framing (all frames of one ZeroMQ multipart message):
 *   frame 0: transport header, 20 bytes, little-endian:
 *            magic "SPK1", kind (u8: 1 request, 2 reply), 3 zero bytes,
 *            request id (u64), then for a request the timeout in ms (u32;
 *            0 = no deadline), for a reply a status (i32: 0, or a
 *            transport-level error code such as SP_ETOOBIG, SP_EPROTO,
 *            SP_ETIMEOUT - then no more frames)
 *   frame 1: the message head (an encoded protobuf, opaque here)
 *   frame 2..: the body (e.g. an object's bytes) in chunks of at most
 *            chunk_bytes; absent when the body is empty.
 * Both ends refuse frames over max_frame_bytes (ZMQ_MAXMSGSIZE) and bodies
 * over max_body_bytes.
 *
 * Server: a ROUTER socket bound on TCP with CURVE server keys; a ZAP handler
 * thread admits only public keys in the allow-list, with ZMQ_ZAP_DOMAIN and
 * ZMQ_ZAP_ENFORCE_DOMAIN set so that a missing handler fails closed. A broker
 * thread hands each request to the next idle worker thread (least recently
 * used), so one slow request never queues others behind it. The broker reads
 * ahead at most one request per worker, stamping each with its deadline
 * (arrival + timeout); requests whose deadline passed while queued are
 * answered SP_ETIMEOUT without running. Beyond that, requests wait in
 * ZeroMQ's queues (rcvhwm per peer) and TCP pushes back. A request whose
 * ZAP user id is not a listed key is dropped even if ZAP let it through.
 * Handlers run on worker threads, concurrently: they must be thread-safe.
 *
 * Client: a DEALER socket with CURVE client keys; one client belongs to one
 * thread. A call that times out closes the socket and retries on a fresh one
 * (bounded), discarding late replies by request id. */
#ifndef SP_TRANSPORT_H
#define SP_TRANSPORT_H

#include "keys.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct {
    size_t max_frame_bytes; /* ZMQ_MAXMSGSIZE, default chunk_bytes + 64 KiB */
    size_t max_body_bytes;  /* default 1 GiB */
    size_t chunk_bytes;     /* default 1 MiB */
    int sndhwm;             /* messages, default 1000 */
    int rcvhwm;             /* messages, default 1000 */
    int timeout_ms;         /* per attempt, default 10000 */
    int retries;            /* extra attempts after a timeout, default 2 */
    int workers;            /* server worker threads, default 8 */
} transport_config_t;

void transport_config_defaults(transport_config_t *cfg);

/* What a handler receives; every pointer is valid until the handler returns. */
typedef struct {
    uint64_t id;
    int64_t deadline_ms; /* on sp_now_ms()'s clock */
    const uint8_t *head;
    size_t head_len;
    const uint8_t *body; /* chunks joined; NULL when empty */
    size_t body_len;
    const char *peer_key;  /* Z85 public key of the caller */
    const char *peer_name; /* its name in the allow-list */
    keys_role_t peer_role; /* its role there, as listed when the request arrived */
    const char *peer_addr; /* its address, as ZeroMQ reports it */
} transport_request_t;

/* Filled by a handler. The transport takes ownership of head (freed with
 * free()) and body (freed with body_free(body, body_hint), or free() when
 * body_free is NULL) once the handler returns. The body is sent without
 * copying, so body_free runs later, on whichever thread ZeroMQ releases the
 * last chunk on: it must be thread-safe. */
typedef struct {
    uint8_t *head;
    size_t head_len;
    uint8_t *body;
    size_t body_len;
    void (*body_free)(void *body, void *hint);
    void *body_hint;
} transport_reply_t;

typedef void (*transport_handler_fn)(void *ctx, const transport_request_t *req,
                                     transport_reply_t *rep);

typedef struct transport_server transport_server_t;

/* Creates a server (not yet listening). self is copied; allowed is borrowed
 * and must outlive the server. */
transport_server_t *transport_server_new(const transport_config_t *cfg, const keys_pair_t *self,
                                         const keys_allowlist_t *allowed,
                                         transport_handler_fn handler, void *ctx);
/* Binds (e.g. "tcp://127.0.0.1:7001", or "tcp://127.0.0.1:*" for a free
 * port) and starts the ZAP, broker and worker threads. The endpoint actually
 * bound is copied into bound (may be NULL). Returns 0 or a negative code. */
int transport_server_start(transport_server_t *srv, const char *endpoint, char *bound,
                           size_t bound_size);
/* Stops all threads (in-flight handlers finish first) and frees the server. */
void transport_server_destroy(transport_server_t **srvp);

typedef struct transport_client transport_client_t;

/* A reply received by a client; owned by the caller, freed with
 * transport_response_free(). */
typedef struct {
    uint8_t *head;
    size_t head_len;
    uint8_t *body;
    size_t body_len;
} transport_response_t;

/* Creates a client for one server, identified by its endpoint and its Z85
 * public key. Connects lazily. */
transport_client_t *transport_client_new(const transport_config_t *cfg, const keys_pair_t *self,
                                         const char *server_public_z85, const char *endpoint);
/* Sends one request and waits for its reply. timeout_ms <= 0 uses the
 * configured per-attempt timeout. Returns 0 with *out filled, or:
 * SP_ETIMEOUT (no reply after all attempts), SP_EUNAVAIL (the server refused
 * our key during the CURVE handshake, or could not be reached), SP_ETOOBIG,
 * SP_EPROTO (malformed reply), or the server's transport-level status. */
int transport_call(transport_client_t *c, const uint8_t *head, size_t head_len, const uint8_t *body,
                   size_t body_len, int timeout_ms, transport_response_t *out);
void transport_response_free(transport_response_t *r);

/* A request body several requests send without copying it: each frame on
 * its way holds a reference, so the bytes outlive a call that timed out
 * while ZeroMQ still queues them. transport_body_new() takes ownership of
 * body (released with body_free(body, hint) - free() when NULL - on
 * whichever thread drops the last reference) and sends data[0..len), which
 * lies inside it; the caller holds the first reference and drops it with
 * transport_body_release(), which sets *bp to NULL. Thread-safe. */
typedef struct transport_body transport_body_t;
transport_body_t *transport_body_new(void *body, const uint8_t *data, size_t len,
                                     void (*body_free)(void *body, void *hint), void *hint);
/* The bytes a shared body sends; valid while a reference is held. */
const uint8_t *transport_body_data(const transport_body_t *b, size_t *len);
void transport_body_release(transport_body_t **bp);

/* One request of a parallel call (transport_call_many). */
typedef struct {
    transport_client_t *client; /* distinct clients: one request per client */
    const uint8_t *head;
    size_t head_len;
    const uint8_t *body; /* copied into the frames; or, instead: */
    size_t body_len;
    transport_body_t *shared;  /* when set, the body, sent without copies (borrowed) */
    int rc;                    /* out: 0 with resp filled, or an error (SP_ETIMEOUT if
                                  unanswered when the call returned) */
    transport_response_t resp; /* out, when rc == 0; the caller frees it */
} transport_call_t;

/* Decides whether a reply counts towards `need` (e.g. "stored durably").
 * NULL counts every reply. */
typedef bool (*transport_accept_fn)(void *ctx, size_t index, const transport_response_t *resp);

/* Sends every request at once (no retries) and waits until `need` replies
 * were accepted, every request was answered, or timeout_ms passed. Returns
 * the number accepted. Replies arriving after the return are discarded by
 * the clients' next calls (request ids differ). */
size_t transport_call_many(transport_call_t *calls, size_t n, size_t need, int timeout_ms,
                           transport_accept_fn accept, void *ctx);
void transport_client_destroy(transport_client_t **cp);

#endif
