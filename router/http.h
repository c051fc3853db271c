/* http.h - the router's HTTP front door (libmicrohttpd in thread-pool mode):
 * HTTPS, authentication (router/auth.h), CORS, one access-log line per
 * request, a static directory with an SPA fallback (the web viewer), and the
 * DICOMweb routes under a root path handed to a set of handlers
 * (router/dicomweb.c). Stateless like the DICOM side: every router serves
 * any request from the same backend.
 *
 * Threads: libmicrohttpd's pool threads call the handlers, each request on
 * one thread at a time; handlers may block (a cluster call) and then hold
 * that thread's other connections back, so `workers` is sized like the
 * DICOM side's. Request bodies are handed over piece by piece as they
 * arrive (never buffered whole here); responses are either one buffer or a
 * stream pulled from a producer callback while the socket takes it.
 *
 * Ownership: an http_req_t belongs to the server; pointers it returns stay
 * valid until the request's cleanup callback returned. */
#ifndef SP_HTTP_H
#define SP_HTTP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

struct auth;

typedef struct {
    const char *bind;         /* address to listen on */
    int port;                 /* TCP port (must be > 0) */
    int workers;              /* pool threads */
    size_t max_body;          /* largest request body (Content-Length or streamed) */
    const char *cors_origins; /* "*" or origins separated by commas/spaces; "" sends none */
    const char *public_root;  /* absolute base URL clients reach the server at ("" = from
                                 the request's Host / Forwarded headers) */
    const char *root;         /* path the DICOMweb handlers are mounted at, e.g. "/dicom-web" */
    const char *viewer_dir;   /* static directory served at /viewer/ ("" = none) */
    const char *tls_cert;     /* PEM certificate file ("" = plain HTTP) */
    const char *tls_key;      /* PEM key file */
    int timeout_s;            /* idle connection timeout */
    struct auth *auth;        /* NULL: no authentication; borrowed, outlives the server */
} http_config_t;

typedef struct http_req http_req_t;

/* What the DICOMweb side plugs in. begin() runs once the headers are in,
 * body() for each piece of a request body, end() once it is complete (every
 * request gets exactly one end() unless begin() or body() responded or the
 * client went away), and cleanup() always, last. A handler responds exactly
 * once with one of the http_respond_*() calls: from begin() or end(), never
 * from body() (record the error and respond from end()). body() returns 0,
 * or non-zero to drop the connection at once. */
typedef struct {
    void *ctx;
    void (*begin)(void *ctx, http_req_t *r);
    int (*body)(void *ctx, http_req_t *r, const uint8_t *data, size_t n);
    void (*end)(void *ctx, http_req_t *r);
    void (*cleanup)(void *ctx, http_req_t *r);
} http_handlers_t;

typedef struct http_server http_server_t;

/* Starts listening. cfg's strings are copied. Returns 0, or a negative code
 * with a message in err. */
int http_server_start(const http_config_t *cfg, const http_handlers_t *h, http_server_t **out,
                      char *err, size_t errlen);
/* Stops accepting, ends connections, waits for the pool threads, frees. */
void http_server_stop(http_server_t **sp);

/* ---- requests ------------------------------------------------------------ */

const char *http_req_method(const http_req_t *r);
/* The path below the DICOMweb root ("/studies/1.2/series"), URL-decoded. */
const char *http_req_path(const http_req_t *r);
/* A request header (case-insensitive name), or NULL. */
const char *http_req_header(const http_req_t *r, const char *name);
/* Calls fn for each query argument in order (repeated keys included, values
 * URL-decoded, NULL for a key without '='); stops when fn returns non-zero. */
void http_req_args(const http_req_t *r, int (*fn)(void *ctx, const char *key, const char *value),
                   void *ctx);
/* Content-Length, or -1 when the request has none (chunked or no body). */
int64_t http_req_content_length(const http_req_t *r);
/* The absolute URL of the DICOMweb root as clients see it, without a
 * trailing slash: public_root when configured, else built from the
 * Forwarded / X-Forwarded-Proto / Host headers. */
const char *http_req_base(const http_req_t *r);
/* The authenticated user ("-" without authentication). */
const char *http_req_user(const http_req_t *r);
/* The study a request concerns, for the access log (copied). */
void http_req_set_study(http_req_t *r, const char *study_uid);
/* The handler's per-request state (NULL until set). */
void *http_req_state(const http_req_t *r);
void http_req_set_state(http_req_t *r, void *state);
/* Whether the client accepts a gzip-encoded response. */
bool http_req_accepts_gzip(const http_req_t *r);

/* ---- responses ----------------------------------------------------------- */

/* Adds a response header (copied) for the response about to be sent. */
void http_add_header(http_req_t *r, const char *name, const char *value);

/* Sends data[0..len) (copied). content_type may be NULL (no body type). */
void http_respond(http_req_t *r, unsigned status, const char *content_type, const void *data,
                  size_t len);
/* Sends a malloc'd buffer, which the server frees. */
void http_respond_take(http_req_t *r, unsigned status, const char *content_type, void *data,
                       size_t len);
/* Sends an error: a small JSON object {"error": message}, as every error
 * response is. */
void http_respond_error(http_req_t *r, unsigned status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* A streamed response body, pulled while the socket takes it: read() fills
 * up to max bytes of buf and returns how many (> 0), 0 at the end, or -1 on
 * failure (the connection is then cut: the client sees a truncated body,
 * never a complete-looking one). It runs on the request's pool thread and
 * may block. free() is called once, when the response is done. The body is
 * sent with chunked transfer encoding; gzip compresses it on the way
 * (Content-Encoding: gzip). */
typedef ssize_t (*http_read_fn)(void *ctx, uint8_t *buf, size_t max);
void http_respond_stream(http_req_t *r, unsigned status, const char *content_type, bool gzip,
                         http_read_fn read, void (*free_fn)(void *ctx), void *ctx);

#endif
