/* dicom.h - the plain C interface to the DICOM protocol. Everything behind it
 * is DCMTK (C++) in two files sharing the private router/dicom_int.h:
 * router/dicom_server.cc (listening, worker pool, negotiation, the DIMSE
 * receive loop) and router/dicom_services.cc (C-STORE, C-FIND, C-MOVE/C-GET,
 * data set parsing). Nothing else in ShardPACS sees C++ or DCMTK types. Every
 * exception is caught at this boundary and turned into an error code and a
 * message in a caller buffer. The Part-10 framing of stored instances needs
 * no DCMTK and lives in common/part10.h.
 *
 * Server model: dicom_server_start() listens on a TCP port (Nagle off, no
 * reverse DNS). The gate (router/gate.h, one event loop) holds every
 * connection until a whole request is buffered - an A-ASSOCIATE-RQ, or an
 * association's next DIMSE message - and only then hands it to a pool of
 * worker threads, which negotiate (A-ASSOCIATE-AC or -RJ) or serve the
 * message, calling the handlers below, and park the association back to
 * the gate when no next message is buffered. Handlers therefore run
 * concurrently, on any worker thread, and must be thread-safe. Whole
 * requests wait in a bounded queue; new associations beyond it are
 * rejected (A-ASSOCIATE-RJ, transient, local limit exceeded). Silent, slow
 * and idle peers are bounded by whole-request deadlines and by the
 * per-address and total connection limits, never by a worker.
 *
 * DICOM TLS (PS3.15 Annex B, BCP 195 non-downgrading profile: TLS 1.2 or
 * later, ECDHE): with tls set the server listens on tls_port too (and with
 * plain false only there). The gate drives each TLS handshake itself
 * without blocking, under the acse_timeout deadline, and the adapter reads
 * and writes decrypted bytes through the gate, so every protection above
 * holds for TLS peers as well. The certificate, key and CA files are
 * re-read when they change (router/tls.h). C-MOVE destinations listed in
 * tls_destinations are reached over TLS, verified against the CA, with the
 * same certificate as client certificate.
 *
 * DCMTK takes an accepted socket through the process-global
 * dcmExternalSocketHandle; the adapter serialises its use, so every DICOM
 * acceptor in the process must be a dicom_server (any number of them).
 *
 * Presentation contexts accepted: Verification; every standard storage SOP
 * class DCMTK knows with every transfer syntax it knows (uncompressed,
 * deflate, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, RLE, ...);
 * Patient Root and Study Root FIND, MOVE and GET. For C-GET the storage
 * classes are also accepted in the SCP/SCU role-selection the requester asks
 * for.
 *
 * Data sets received by C-STORE are kept bit-exact: the adapter receives the
 * PDV bytes verbatim into memory and only parses a copy to read attributes.
 * It reports what it parsed and leaves the archive's policy (which UIDs must
 * be present and agree with the command) to the store handler. */
#ifndef SP_DICOM_H
#define SP_DICOM_H

#include "../common/attrs.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* DIMSE status codes the router uses (PS3.4 / PS3.7). */
#define DICOM_SUCCESS 0x0000
#define DICOM_PENDING 0xFF00
#define DICOM_CANCEL 0xFE00
#define DICOM_WARNING_SUBOPS 0xB000     /* retrieve: some sub-operations failed */
#define DICOM_OUT_OF_RESOURCES 0xA700   /* store: could not store (retry later) */
#define DICOM_REFUSED_NO_MATCHES 0xA701 /* retrieve: out of resources, number of matches */
#define DICOM_REFUSED_SUBOPS 0xA702     /* retrieve: out of resources, sub-ops */
#define DICOM_MOVE_DEST_UNKNOWN 0xA801  /* move destination unknown */
#define DICOM_DATASET_MISMATCH 0xA900   /* identifier / SOP class mismatch */
#define DICOM_CANNOT_UNDERSTAND 0xC000  /* store: cannot understand */
#define DICOM_UNABLE_TO_PROCESS 0xC001  /* query/retrieve: unable to process */
#define DICOM_NOT_AUTHORIZED 0x0124     /* PS3.7 C.5: Refused: Not Authorized */

/* A network address: a C-MOVE destination reached over TLS. */
typedef struct {
    const char *host;
    int port;
} dicom_endpoint_t;

typedef struct {
    char *ae_title;             /* AE title this server answers to */
    char *bind_address;         /* e.g. "0.0.0.0" or "127.0.0.1" */
    int port;                   /* 0 picks a free port; see dicom_server_port() */
    int max_pdu;                /* receive PDU size, bytes (default 116794) */
    int acse_timeout_s;         /* association negotiation and release (default 10) */
    int dimse_timeout_s;        /* waiting for the next DIMSE message (default 60) */
    int workers;                /* associations served at once (default 16) */
    int queue;                  /* accepted associations waiting for a worker (default 64) */
    bool require_called_ae;     /* reject associations addressed to another AE title */
    char *allowed_callers;      /* calling AE titles admitted, separated by commas or spaces;
                                   NULL or empty admits any */
    int max_per_address;        /* connections held from one IP address (default 32; 0 unlimited) */
    int max_connections;        /* connections held in all, idle ones included (default 1024) */
    size_t min_rate;            /* bytes/s a data set arrives at, at least (default 32K): its
                                   deadline is dimse_timeout + size / min_rate from its start */
    size_t max_object_size;     /* largest C-STORE data set accepted (default 1G); larger ones
                                   are read to their end, discarded and refused (0xC000) */
    size_t max_identifier_size; /* largest C-FIND/MOVE/GET identifier (default 16M) */
    size_t receive_memory;      /* bytes all receives of this server may hold at once, from the
                                   first byte until the store handler's object is freed (default
                                   2G); must be at least max_object_size */
    int receive_wait_s;         /* longest wait for receive memory before a receive is refused as
                                   out of resources, 0xA700 (default 30) */
    int max_depth;              /* sequence nesting depth accepted in any data set (default 64) */
    bool plain;                 /* serve plain DICOM on port (default true) */
    bool tls;                   /* serve DICOM TLS on tls_port (default false) */
    int tls_port;               /* 0 picks a free port; see dicom_server_tls_port() (default
                                   2762, the registered DICOM TLS port) */
    char *tls_certificate;      /* PEM certificate (chain) of this server */
    char *tls_key;              /* PEM private key, not encrypted */
    char *tls_ca;               /* PEM bundle of trusted CAs (clients, TLS destinations) */
    bool tls_verify_peer;       /* require a client certificate signed by tls_ca (default true) */
    char *tls_ciphers;          /* TLS 1.2 cipher list; NULL: BCP 195 (tls.h) */
    const dicom_endpoint_t *tls_destinations; /* C-MOVE destinations reached over TLS */
    size_t ntls_destinations;
} dicom_config_t;

void dicom_config_defaults(dicom_config_t *cfg); /* strings left NULL */

/* Who is on the other end of an association; valid during a handler call. */
typedef struct {
    const char *calling_ae;
    const char *called_ae;
    const char *peer_host;
    /* Subject (RFC 2253, e.g. "CN=modality1,O=Hospital") of the client
     * certificate the TLS handshake verified against the CA; NULL on the
     * plain port or when the TLS port does not ask for certificates. */
    const char *cert_subject;
} dicom_peer_t;

typedef struct dicom_rx dicom_rx_t;

/* One received C-STORE. The data set bytes are exactly what the peer sent
 * (in transfer_syntax_uid); attrs were parsed from them, the names converted
 * to UTF-8 from the data set's Specific Character Set (what cannot be
 * decoded is indexed in charset.h's escaped form, never refused). The
 * adapter has not compared them with the command: a data set may lack its
 * UIDs or carry others than the command (router/scp.c's scp_check_store()
 * decides). Data sets that are malformed, nest deeper than max_depth or are
 * larger than max_object_size never reach the handler (0xC000), nor those
 * that found no receive memory in time (0xA700).
 *
 * The bytes live in a buffer of the adapter's, counted against
 * receive_memory, with headroom writable bytes right before dataset (room
 * for a Part-10 header, see part10_frame_in_place()). The handler may take
 * the buffer over with dicom_store_take(), to hand it on without a copy. */
typedef struct {
    const dicom_peer_t *peer;
    const char *sop_class_uid;       /* from the C-STORE command */
    const char *sop_instance_uid;    /* from the C-STORE command */
    const char *transfer_syntax_uid; /* of the presentation context */
    const uint8_t *dataset;
    size_t dataset_len;
    const attrs_t *attrs; /* stored attrs incl. TransferSyntaxUID */
    size_t headroom;      /* writable bytes before dataset (at least 512) */
    dicom_rx_t *rx;       /* the buffer's owner, for dicom_store_take() */
} dicom_store_t;

/* Takes over the received buffer: *dataset is req->dataset made writable,
 * and the handler must call release(owner, anything) exactly once when done
 * with the bytes (from any thread, possibly after the handler returned);
 * that frees them and gives their memory back to receive_memory. The shape
 * is transport_body_new()'s body_free. Call at most once per request,
 * during the store handler. */
void dicom_store_take(const dicom_store_t *req, uint8_t **dataset,
                      void (**release)(void *owner, void *unused), void **owner);

/* Parses a data set's indexed attributes exactly as a received C-STORE's
 * are (names converted to UTF-8 from its Specific Character Set, the
 * transfer syntax added), for objects that arrive another way (STOW-RS).
 * The data set must have passed the pre-scan (common/dsscan.h) first. Any
 * thread. Returns 0, or SP_EINVAL with the reason in err. */
int dicom_parse_attrs(const uint8_t *dataset, size_t len, const char *transfer_syntax_uid,
                      attrs_t *out, char *err, size_t errlen);

typedef struct dicom_find dicom_find_t;
typedef struct dicom_retrieve dicom_retrieve_t;

/* Handlers, called on worker threads. Each returns the final DIMSE status
 * and may write a short explanation into comment (sent as Error Comment for
 * failures). A handler logs the failures it returns; the adapter logs only
 * those it decides itself (a request it cannot parse, a cancel, failed
 * sub-operations turning success into a warning). */
typedef struct {
    void *ctx;
    uint16_t (*store)(void *ctx, const dicom_store_t *req, char *comment, size_t comment_len);
    uint16_t (*find)(void *ctx, dicom_find_t *q, char *comment, size_t comment_len);
    uint16_t (*move)(void *ctx, dicom_retrieve_t *r, char *comment, size_t comment_len);
    uint16_t (*get)(void *ctx, dicom_retrieve_t *r, char *comment, size_t comment_len);
    /* Optional. Decides, once the AE titles are known and before the
     * presentation contexts are negotiated, whether an association request
     * is admitted: false rejects it (A-ASSOCIATE-RJ, permanent, calling AE
     * title not recognized), with the reason in why for the log. */
    bool (*admit)(void *ctx, const dicom_peer_t *peer, char *why, size_t why_len);
    /* Optional. Told once per association request the adapter parsed how it
     * ended: accepted (A-ASSOCIATE-AC sent) or rejected, and why. */
    void (*associated)(void *ctx, const dicom_peer_t *peer, bool accepted, const char *why);
    /* Optional. The status of a C-ECHO (Success when NULL). */
    uint16_t (*echo)(void *ctx, const dicom_peer_t *peer);
} dicom_handlers_t;

typedef struct dicom_server dicom_server_t;

/* Starts listening and serving. cfg and handlers are copied. Returns 0, or a
 * negative code with a message in err. */
int dicom_server_start(const dicom_config_t *cfg, const dicom_handlers_t *handlers,
                       dicom_server_t **out, char *err, size_t errlen);
/* The ports actually bound (useful with port 0); -1 when not served. */
int dicom_server_port(const dicom_server_t *srv);
int dicom_server_tls_port(const dicom_server_t *srv);
/* Stops accepting, aborts idle associations, waits for workers, frees. */
void dicom_server_stop(dicom_server_t **srvp);

/* ---- C-FIND ----------------------------------------------------------- */

/* The query: level, the requested keys (non-NULL entries; a non-empty
 * value is a matching key) converted to UTF-8, and the peer. Valid during the
 * find handler call. Keys ShardPACS does not index are remembered by the
 * adapter and returned empty in every response. */
level_t dicom_find_level(const dicom_find_t *q);
const attrs_t *dicom_find_keys(const dicom_find_t *q);
const dicom_peer_t *dicom_find_peer(const dicom_find_t *q);

/* Sends one pending response carrying the requested keys of match (plus
 * QueryRetrieveLevel and SpecificCharacterSet "ISO_IR 192"). Returns 0, or
 * a non-zero value when the requester sent C-CANCEL or the association
 * failed: the handler should then stop and return DICOM_CANCEL. */
int dicom_find_emit(dicom_find_t *q, const attrs_t *match);
/* True once a C-CANCEL for this request has arrived. */
bool dicom_find_cancelled(dicom_find_t *q);

/* ---- C-MOVE and C-GET --------------------------------------------------- */

level_t dicom_retrieve_level(const dicom_retrieve_t *r);
/* The identifier's unique keys (and any other keys it carried). */
const attrs_t *dicom_retrieve_keys(const dicom_retrieve_t *r);
const dicom_peer_t *dicom_retrieve_peer(const dicom_retrieve_t *r);
/* C-MOVE destination AE title; NULL for C-GET. */
const char *dicom_retrieve_destination(const dicom_retrieve_t *r);

/* What will be sent: one entry per instance, so the adapter can propose
 * presentation contexts (C-MOVE) or check the requester's (C-GET). */
typedef struct {
    const char *sop_class_uid;
    const char *transfer_syntax_uid;
} dicom_instance_kind_t;

/* Starts the sub-operations. For C-MOVE, opens an association to host:port
 * as calling AE our own title and called AE the destination, proposing each
 * SOP class with its stored transfer syntax and the uncompressed ones.
 * For C-GET, host and port are ignored (pass NULL, 0): the sub-operations go
 * over the requesting association, on the storage contexts it negotiated in
 * the SCP role. count is the number of instances to send (the remaining
 * count of pending responses). Call at most once per retrieve. Returns 0, or
 * a negative code with a message in err (then the handler returns
 * DICOM_REFUSED_SUBOPS or similar).
 *
 * Final status: the adapter sends the handler's status, except that
 * DICOM_SUCCESS becomes DICOM_WARNING_SUBOPS when any sub-operation failed or
 * warned, and any status becomes DICOM_CANCEL after a C-CANCEL. Failed SOP
 * Instance UIDs are listed in the final response whenever it is not
 * success. */
int dicom_retrieve_begin(dicom_retrieve_t *r, const char *host, int port,
                         const dicom_instance_kind_t *kinds, size_t count, char *err,
                         size_t errlen);

/* Sends one instance as a C-STORE sub-operation: the Part-10 bytes as
 * stored; the data set goes out verbatim when its transfer syntax was
 * accepted, otherwise converted by DCMTK to an accepted one, otherwise the
 * sub-operation counts as failed. Updates the completed/failed/warning
 * counts and sends a pending response with them. Returns 0 when the
 * sub-operation succeeded, a positive value when it failed (counted; go on),
 * or a negative value when the retrieve must stop (cancel, association
 * lost). */
int dicom_retrieve_send(dicom_retrieve_t *r, const uint8_t *part10, size_t len);

/* Counts one instance that could not be fetched from any replica. */
void dicom_retrieve_fail(dicom_retrieve_t *r, const char *sop_instance_uid);

#endif
