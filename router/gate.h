/* gate.h - the DICOM front door's gatekeeper: it holds every connection that
 * is not being served by a worker (new sockets still sending their
 * A-ASSOCIATE-RQ, and established associations idle between two messages)
 * in one event loop, and hands a connection to its owner only when a
 * complete unit of work is buffered: a whole A-ASSOCIATE-RQ PDU, a whole
 * DIMSE message (command and data set), a release or abort PDU, or, for a
 * big data set, the first gate_config_t.handoff_bytes of it. Silent,
 * trickling and idle peers therefore cost a file descriptor and a small
 * buffer each, never a worker thread, and each waits under a deadline that
 * covers the whole unit, not a single read.
 *
 * Pure C over POSIX sockets and OpenSSL (no DCMTK): the DICOM server in
 * router/dicom_server.cc reads through gate_conn_read() and friends, which
 * serve the bytes the gate read ahead first and enforce the connection's
 * deadline on every read and write.
 *
 * TLS: connections accepted on tls_listen_fd (or added with gate_add_tls())
 * get an OpenSSL object from tls_acquire(). The loop drives the handshake
 * without blocking (epoll on whatever OpenSSL wants next: to read or to
 * write) under the same acse_timeout deadline as the A-ASSOCIATE-RQ that
 * follows it, and feeds the tracker and the read-ahead with decrypted
 * bytes; gate_conn_read() and friends then read and write through the same
 * object. A connection (and so its one SSL object) belongs to one thread at
 * a time, as below, so OpenSSL never sees two threads on one connection.
 *
 * Threads: gate_new() starts one loop thread. The ready and expired
 * callbacks run on it (or, for gate_shutdown(), on the caller's thread) and
 * must only queue the connection for a worker. A connection handed to the
 * owner belongs to exactly one thread at a time until it calls gate_park()
 * (back to the loop) or gate_conn_close(); the gate_conn_* I/O functions
 * are for that thread only. Everything else here is thread-safe. */
#ifndef SP_GATE_H
#define SP_GATE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- PDU stream tracker ------------------------------------------------- */

/* Largest A-ASSOCIATE-RQ accepted: a request proposing all 128 presentation
 * contexts with a dozen transfer syntaxes each stays far below it. */
#define GATE_MAX_ASSOC_RQ (256u * 1024u)
/* Largest command set accepted (a command set is a few hundred bytes). */
#define GATE_MAX_COMMAND (64u * 1024u)
/* Largest A-RELEASE or A-ABORT PDU body accepted (the standard's is 4). */
#define GATE_MAX_SMALL_PDU 64u

typedef enum {
    GATE_EXPECT_ASSOC_RQ, /* a new connection: one A-ASSOCIATE-RQ PDU */
    GATE_EXPECT_MESSAGE,  /* an association: the next DIMSE message or release/abort */
} gate_expect_t;

/* What gate_tracker_feed() found. */
enum {
    GATE_MORE = 0,     /* the unit is not complete yet */
    GATE_COMPLETE = 1, /* a whole unit is buffered */
    GATE_HANDOFF = 2,  /* handoff bytes of a message are buffered (big data set) */
};

/* The incremental parser of a PDU stream. It stores no payload, only the
 * few header bytes it needs, so it is cheap for many connections. */
typedef struct {
    gate_expect_t expect;
    size_t max_pdu;     /* largest P-DATA-TF PDU length accepted */
    size_t handoff;     /* message bytes after which GATE_HANDOFF is reported (0: never) */
    size_t fed;         /* bytes consumed for the current unit */
    int result;         /* GATE_COMPLETE/GATE_HANDOFF once reached, or a negative error */
    uint8_t hdr[6];     /* PDU header being read */
    unsigned hdr_len;   /* bytes of hdr read; 6 while inside a PDU body */
    uint8_t pdu_type;   /* type of the PDU whose body is being read */
    uint32_t pdu_left;  /* body bytes of that PDU not yet consumed */
    uint8_t item[6];    /* PDV item header being read (length, context id, control) */
    unsigned item_len;  /* bytes of item read; 6 while inside a PDV's fragment */
    uint32_t pdv_left;  /* fragment bytes of the current PDV not yet consumed */
    bool pdv_command;   /* the current PDV is a command fragment */
    bool cmd_done;      /* the command's last fragment has been consumed */
    bool data_done;     /* the data set's last fragment has been consumed */
    bool msg_done;      /* the message is complete; finishing its PDU */
    size_t cmd_bytes;   /* command set bytes seen */
    uint8_t elem[8];    /* command element header being read (tag, length) */
    unsigned elem_len;  /* bytes of elem read */
    uint32_t elem_left; /* value bytes of the current command element not yet seen */
    bool in_dstype;     /* the current element is CommandDataSetType (0000,0800) */
    unsigned dstype_len;
    uint16_t dstype; /* its value (0x0101: no data set follows) */
    bool has_dstype;
} gate_tracker_t;

/* Starts a tracker for one unit. max_pdu bounds P-DATA-TF PDU lengths (the
 * receive size we advertise plus slack); handoff is the message size after
 * which a partial message is handed over anyway (0: never). */
void gate_tracker_init(gate_tracker_t *t, gate_expect_t expect, size_t max_pdu, size_t handoff);

/* Consumes bytes of the stream, stopping at the end of the unit. Returns
 * GATE_MORE (all n consumed), GATE_COMPLETE or GATE_HANDOFF (the first *used
 * bytes belong to the unit; the rest is the next unit's), SP_EPROTO for a
 * stream that is not DICOM or not allowed here, or SP_ETOOBIG for a PDU or
 * command over its bound. Once it returned anything but GATE_MORE, further
 * calls return the same and consume nothing. used may be NULL. */
int gate_tracker_feed(gate_tracker_t *t, const uint8_t *p, size_t n, size_t *used);

/* ---- the event loop -------------------------------------------------------- */

typedef struct gate gate_t;
typedef struct gate_conn gate_conn_t;

/* Why a parked association is handed back through the expired callback. */
enum {
    GATE_WHY_TIMEOUT = 1, /* idle or message deadline passed */
    GATE_WHY_CLOSED = 2,  /* the peer closed the connection */
    GATE_WHY_INVALID = 3, /* the peer sent something that is not a valid next PDU */
    GATE_WHY_STOP = 4,    /* gate_shutdown() */
};

struct tls;

typedef struct {
    int listen_fd;        /* listening socket the loop accepts on (not owned); -1: none */
    int tls_listen_fd;    /* listening socket for DICOM TLS (not owned); -1: none */
    struct tls *tls;      /* server contexts for TLS connections (not owned); NULL: no TLS */
    int acse_timeout_ms;  /* a new connection's whole A-ASSOCIATE-RQ */
    int dimse_timeout_ms; /* a parked association's idle time, and a message's base time */
    int write_timeout_ms; /* one write (one PDU) to a peer that does not read */
    uint64_t min_rate;    /* bytes/s a message arrives at, at least (0: no growth) */
    size_t max_pdu;       /* largest P-DATA-TF PDU length accepted */
    size_t handoff_bytes; /* a partial message this big goes to a worker */
    int max_per_address;  /* connections per peer IP address (0: unlimited) */
    int max_connections;  /* connections held, served ones included (0: unlimited) */
    /* A complete unit is buffered on c: the owner now owns c. For a new
     * connection gate_conn_assoc(c) is NULL. */
    void (*ready)(void *ctx, gate_conn_t *c);
    /* A parked association expired, closed or sent garbage (why): the owner
     * owns c again and must abort its association and gate_conn_close() it. */
    void (*expired)(void *ctx, gate_conn_t *c, int why);
    void *ctx;
} gate_config_t;

/* Fills in the defaults (no listening socket, no callbacks). */
void gate_config_defaults(gate_config_t *cfg);

/* Starts the loop thread. cfg is copied. Returns 0 or a negative code. */
int gate_new(const gate_config_t *cfg, gate_t **out);
/* Stops the loop thread (no more callbacks from it), closes every new
 * connection it holds, hands every parked association to expired (why
 * GATE_WHY_STOP, on this thread) and shuts down (SHUT_RDWR) the sockets of
 * served connections so their workers' reads fail at once. Idempotent. */
void gate_shutdown(gate_t *g);
/* Shuts down, then frees. Every served connection must have been closed. */
void gate_destroy(gate_t **gp);

/* Adds an accepted socket (ownership passes to the gate) from peer (an IP
 * address string) as a new connection. Returns 0, or SP_ELIMIT when a
 * limit refused it (the socket is closed). The loop does this itself for
 * connections on listen_fd. */
int gate_add(gate_t *g, int fd, const char *peer);
/* The same for a connection that starts with a TLS handshake (cfg.tls must
 * be set). */
int gate_add_tls(gate_t *g, int fd, const char *peer);
/* Hands an association back to the loop until its next complete message.
 * Bytes still buffered on c stay its read-ahead. assoc is the owner's
 * handle, returned by gate_conn_assoc() when c is handed over again. */
void gate_park(gate_conn_t *c, void *assoc);
/* Closes the socket, forgets c and frees it. */
void gate_conn_close(gate_conn_t **cp);

/* Counts: connections held (pending, parked and served) in total, and from
 * one peer address. */
size_t gate_count(gate_t *g);
int gate_count_address(gate_t *g, const char *peer);
/* Connections refused by a limit since start. */
uint64_t gate_refused(gate_t *g);

/* ---- a handed-over connection (its owner thread only) -------------------- */

int gate_conn_fd(const gate_conn_t *c);
const char *gate_conn_peer(const gate_conn_t *c); /* valid until gate_conn_close() */
void *gate_conn_assoc(const gate_conn_t *c);
/* True for a TLS connection (its handshake is done once it is handed over). */
bool gate_conn_is_tls(const gate_conn_t *c);
/* The subject of the peer's verified certificate (RFC 2253), or NULL (plain
 * connection, or TLS without a client certificate). Valid until
 * gate_conn_close(). */
const char *gate_conn_cert_subject(const gate_conn_t *c);
/* Bytes read ahead and not yet read by the owner. */
size_t gate_conn_buffered(const gate_conn_t *c);

/* Sets the read deadline: start_ms + base_ms + bytes read from now on *
 * 1000 / min_rate (min_rate 0: fixed). Times are sp_now_ms() milliseconds. */
void gate_conn_set_deadline(gate_conn_t *c, int64_t start_ms, int64_t base_ms, uint64_t min_rate);
/* The read deadline now (it grows as bytes arrive). */
int64_t gate_conn_deadline(const gate_conn_t *c);
/* Ends all waiting: reads fail once the read-ahead is used up and writes
 * send only what the socket takes at once. For abort and release. */
void gate_conn_expire(gate_conn_t *c);

/* Reads up to n bytes: read-ahead first, then the socket until the
 * deadline. Returns the count (> 0), 0 when the peer closed, SP_ETIMEOUT,
 * or -errno. */
ssize_t gate_conn_read(gate_conn_t *c, void *buf, size_t n);
/* Writes all n bytes within write_timeout_ms (0 after gate_conn_expire()).
 * Returns n, SP_ETIMEOUT or -errno. */
ssize_t gate_conn_write(gate_conn_t *c, const void *buf, size_t n);
/* True when bytes can be read at once, waiting at most timeout_ms and never
 * past the deadline. */
bool gate_conn_wait(gate_conn_t *c, int timeout_ms);
/* Reads what arrives within wait_ms into the read-ahead and says whether
 * it holds the whole next message (or handoff bytes of it, or a release or
 * abort PDU): 1 yes, 0 not yet (park it), or a negative code (peer closed:
 * 0 bytes; protocol error). */
int gate_conn_next_ready(gate_conn_t *c, int wait_ms);

#ifdef __cplusplus
}
#endif
#endif
