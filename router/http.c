/* http.c - the router's HTTP front door over libmicrohttpd (http.h).
 *
 * One request: on_access() runs first with the headers in (route(): CORS
 * preflight, /health, /auth/token, the viewer's static files, or the
 * DICOMweb root after authentication and the body-size check, handed to
 * the handlers' begin()), then once per body piece (handlers' body()),
 * then once more with the body complete (end()); on_completed() logs the
 * access line and frees the request. Every response goes through
 * queue_response(), which adds the CORS headers, so errors carry them too.
 *
 * Threads: libmicrohttpd's pool threads; an http_req_t is used by one of
 * them at a time. The server owns its copies of the configuration. */
#define _GNU_SOURCE /* strcasestr */
#include "http.h"

#include "auth.h"

#include "../common/base.h"
#include "../common/log.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <microhttpd.h>
#include <netdb.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#define HTTP_MAX_EXTRA_HEADERS 16

struct http_server {
    struct MHD_Daemon *daemon;
    http_handlers_t h;
    char *bind, *cors_origins, *public_root, *root, *viewer_dir;
    char *cert_pem, *key_pem;
    bool tls;
    int port;
    size_t max_body;
    auth_t *auth;
};

typedef enum {
    ROUTE_NONE = 0, /* answered at once (preflight, health, static, errors) */
    ROUTE_DICOMWEB, /* handed to the handlers */
    ROUTE_TOKEN,    /* POST /auth/token: answered once the (ignored) body is in */
} route_t;

struct http_req {
    http_server_t *srv;
    struct MHD_Connection *conn;
    char *method;
    char *url;  /* the whole path, decoded */
    char *path; /* below the DICOMweb root */
    route_t route;
    char user[72];
    char study[72];
    char *base;
    void *state;
    int64_t start_ms;
    unsigned status;
    uint64_t bytes;  /* response body bytes handed to the socket (before gzip: after) */
    uint64_t body_n; /* request body bytes received */
    bool responded;
    bool ended;
    bool began; /* the handlers saw begin(): they get cleanup() */
    char *hname[HTTP_MAX_EXTRA_HEADERS];
    char *hvalue[HTTP_MAX_EXTRA_HEADERS];
    size_t nheaders;
};

/* ---- request accessors ----------------------------------------------------- */

const char *http_req_method(const http_req_t *r)
{
    return r->method;
}

const char *http_req_path(const http_req_t *r)
{
    return r->path ? r->path : r->url;
}

const char *http_req_header(const http_req_t *r, const char *name)
{
    return MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, name);
}

typedef struct {
    int (*fn)(void *ctx, const char *key, const char *value);
    void *ctx;
} args_iter_t;

static enum MHD_Result args_each(void *cls, enum MHD_ValueKind kind, const char *key,
                                 const char *value)
{
    (void)kind;
    args_iter_t *it = cls;
    return it->fn(it->ctx, key, value) == 0 ? MHD_YES : MHD_NO;
}

void http_req_args(const http_req_t *r, int (*fn)(void *ctx, const char *key, const char *value),
                   void *ctx)
{
    args_iter_t it = {fn, ctx};
    MHD_get_connection_values(r->conn, MHD_GET_ARGUMENT_KIND, args_each, &it);
}

int64_t http_req_content_length(const http_req_t *r)
{
    const char *v = http_req_header(r, MHD_HTTP_HEADER_CONTENT_LENGTH);
    if (v == NULL)
        return -1;
    char *end = NULL;
    errno = 0;
    long long n = strtoll(v, &end, 10);
    if (errno != 0 || end == v || n < 0)
        return INT64_MAX; /* unparsable or beyond 64 bits: treat as too large */
    return n;
}

/* Copies the value of one Forwarded parameter (e.g. proto=https) into out. */
static bool forwarded_param(const char *fwd, const char *name, char *out, size_t outlen)
{
    size_t n = strlen(name);
    for (const char *p = fwd; p && *p;) {
        while (*p == ' ' || *p == ';' || *p == ',')
            p++;
        if (strncasecmp(p, name, n) == 0 && p[n] == '=') {
            p += n + 1;
            if (*p == '"')
                p++;
            size_t len = strcspn(p, "\";, ");
            if (len == 0 || len >= outlen)
                return false;
            memcpy(out, p, len);
            out[len] = '\0';
            return true;
        }
        p += strcspn(p, ";,");
    }
    return false;
}

/* Only characters a host[:port] may hold, so a forged header cannot inject
 * anything into the URLs we hand out. */
static bool host_ok(const char *h)
{
    if (h[0] == '\0')
        return false;
    for (const char *p = h; *p; p++)
        if (!(('a' <= *p && *p <= 'z') || ('A' <= *p && *p <= 'Z') || ('0' <= *p && *p <= '9') ||
              strchr(".-:[]_", *p)))
            return false;
    return true;
}

const char *http_req_base(const http_req_t *r)
{
    http_req_t *m = (http_req_t *)r;
    if (m->base)
        return m->base;
    const char *root = r->srv->root;
    if (r->srv->public_root[0]) {
        size_t n = strlen(r->srv->public_root);
        while (n > 0 && r->srv->public_root[n - 1] == '/')
            n--;
        char *b = sp_malloc(n + strlen(root) + 1);
        memcpy(b, r->srv->public_root, n);
        strcpy(b + n, root);
        m->base = b;
        return b;
    }
    char proto[16], host[256];
    sp_strlcpy(proto, r->srv->tls ? "https" : "http", sizeof proto);
    host[0] = '\0';
    const char *fwd = http_req_header(r, "Forwarded");
    const char *xp = http_req_header(r, "X-Forwarded-Proto");
    const char *xh = http_req_header(r, "X-Forwarded-Host");
    char tmp[256];
    if (fwd && forwarded_param(fwd, "proto", tmp, sizeof tmp) &&
        (strcmp(tmp, "http") == 0 || strcmp(tmp, "https") == 0))
        sp_strlcpy(proto, tmp, sizeof proto);
    else if (xp && (strcmp(xp, "http") == 0 || strcmp(xp, "https") == 0))
        sp_strlcpy(proto, xp, sizeof proto);
    if (fwd && forwarded_param(fwd, "host", tmp, sizeof tmp) && host_ok(tmp))
        sp_strlcpy(host, tmp, sizeof host);
    else if (xh && strlen(xh) < sizeof host && host_ok(xh))
        sp_strlcpy(host, xh, sizeof host);
    else {
        const char *h = http_req_header(r, MHD_HTTP_HEADER_HOST);
        if (h && strlen(h) < sizeof host && host_ok(h))
            sp_strlcpy(host, h, sizeof host);
        else
            sp_fmt(host, sizeof host, "%s:%d",
                   strcmp(r->srv->bind, "0.0.0.0") == 0 ? "127.0.0.1" : r->srv->bind, r->srv->port);
    }
    char *b = sp_malloc(strlen(proto) + 3 + strlen(host) + strlen(root) + 1);
    sprintf(b, "%s://%s%s", proto, host, root);
    m->base = b;
    return b;
}

const char *http_req_user(const http_req_t *r)
{
    return r->user[0] ? r->user : "-";
}

void http_req_set_study(http_req_t *r, const char *study_uid)
{
    sp_strlcpy(r->study, study_uid ? study_uid : "", sizeof r->study);
}

void *http_req_state(const http_req_t *r)
{
    return r->state;
}

void http_req_set_state(http_req_t *r, void *state)
{
    r->state = state;
}

bool http_req_accepts_gzip(const http_req_t *r)
{
    const char *ae = http_req_header(r, MHD_HTTP_HEADER_ACCEPT_ENCODING);
    if (ae == NULL)
        return false;
    for (const char *p = strcasestr(ae, "gzip"); p; p = strcasestr(p + 4, "gzip")) {
        const char *q = p + 4;
        while (*q == ' ')
            q++;
        if (strncmp(q, ";q=0", 4) == 0 &&
            (q[4] == '\0' || q[4] == ',' ||
             (q[4] == '.' && strspn(q + 5, "0") > 0 &&
              (q[5 + strspn(q + 5, "0")] == '\0' || q[5 + strspn(q + 5, "0")] == ','))))
            continue; /* gzip;q=0: refused */
        return true;
    }
    return false;
}

/* ---- responses -------------------------------------------------------------- */

void http_add_header(http_req_t *r, const char *name, const char *value)
{
    if (r->nheaders == HTTP_MAX_EXTRA_HEADERS)
        return;
    r->hname[r->nheaders] = sp_strdup(name);
    r->hvalue[r->nheaders++] = sp_strdup(value);
}

/* The CORS headers every response carries when the request's origin is
 * allowed ("*" allows any). */
static void add_cors(http_req_t *r, struct MHD_Response *resp)
{
    const char *allowed = r->srv->cors_origins;
    if (allowed[0] == '\0')
        return;
    const char *origin = http_req_header(r, "Origin");
    if (strcmp(allowed, "*") == 0) {
        MHD_add_response_header(resp, "Access-Control-Allow-Origin", "*");
    } else if (origin) {
        size_t olen = strlen(origin);
        for (const char *p = allowed; *p;) {
            p += strspn(p, ", ");
            size_t len = strcspn(p, ", ");
            if (len == olen && strncmp(p, origin, len) == 0) {
                MHD_add_response_header(resp, "Access-Control-Allow-Origin", origin);
                MHD_add_response_header(resp, "Vary", "Origin");
                break;
            }
            p += len;
        }
    }
    MHD_add_response_header(resp, "Access-Control-Expose-Headers",
                            "ETag, Content-Encoding, Content-Type, Warning");
}

static void queue_response(http_req_t *r, unsigned status, struct MHD_Response *resp,
                           const char *content_type)
{
    SP_ASSERT(!r->responded);
    r->responded = true;
    r->status = status;
    if (content_type)
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, content_type);
    add_cors(r, resp);
    for (size_t i = 0; i < r->nheaders; i++)
        MHD_add_response_header(resp, r->hname[i], r->hvalue[i]);
    if (MHD_queue_response(r->conn, status, resp) != MHD_YES)
        log_warn("http: cannot queue the %u response to %s %s", status, r->method, r->url);
    MHD_destroy_response(resp);
}

void http_respond_take(http_req_t *r, unsigned status, const char *content_type, void *data,
                       size_t len)
{
    struct MHD_Response *resp =
        data ? MHD_create_response_from_buffer(len, data, MHD_RESPMEM_MUST_FREE)
             : MHD_create_response_from_buffer(0, (void *)"", MHD_RESPMEM_PERSISTENT);
    r->bytes = data ? len : 0;
    queue_response(r, status, resp, content_type);
}

void http_respond(http_req_t *r, unsigned status, const char *content_type, const void *data,
                  size_t len)
{
    http_respond_take(r, status, content_type, len ? sp_memdup(data, len) : NULL, len);
}

void http_respond_error(http_req_t *r, unsigned status, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    json_t *o = json_pack("{s:s}", "error", msg);
    char *text = o ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    if (text == NULL)
        text = sp_strdup("{\"error\":\"(unprintable)\"}");
    if (status >= 500)
        log_warn("http: %s %s -> %u: %s", r->method, r->url, status, msg);
    http_respond_take(r, status, "application/json", text, strlen(text));
}

/* A streamed body, gzip-compressed on the way when asked. */
typedef struct {
    http_req_t *req; /* for the byte count only: reads stop before the request is freed */
    http_read_fn read;
    void (*free_fn)(void *ctx);
    void *ctx;
    bool gzip, zinit, eof, finished;
    z_stream z;
    uint8_t in[64 * 1024];
} stream_t;

static ssize_t stream_read(void *cls, uint64_t pos, char *buf, size_t max)
{
    (void)pos;
    stream_t *s = cls;
    if (!s->gzip) {
        ssize_t n = s->read(s->ctx, (uint8_t *)buf, max);
        if (n < 0)
            return MHD_CONTENT_READER_END_WITH_ERROR;
        if (n == 0)
            return MHD_CONTENT_READER_END_OF_STREAM;
        s->req->bytes += (uint64_t)n;
        return n;
    }
    if (s->finished)
        return MHD_CONTENT_READER_END_OF_STREAM;
    s->z.next_out = (Bytef *)buf;
    s->z.avail_out = (uInt)(max > UINT32_MAX ? UINT32_MAX : max);
    for (;;) {
        if (s->z.avail_in == 0 && !s->eof) {
            ssize_t n = s->read(s->ctx, s->in, sizeof s->in);
            if (n < 0)
                return MHD_CONTENT_READER_END_WITH_ERROR;
            if (n == 0)
                s->eof = true;
            s->z.next_in = s->in;
            s->z.avail_in = (uInt)n;
        }
        int zr = deflate(&s->z, s->eof ? Z_FINISH : Z_NO_FLUSH);
        size_t produced = max - s->z.avail_out;
        if (zr == Z_STREAM_END)
            s->finished = true;
        if (produced > 0) {
            s->req->bytes += produced;
            return (ssize_t)produced;
        }
        if (s->finished)
            return MHD_CONTENT_READER_END_OF_STREAM;
        if (zr != Z_OK && zr != Z_BUF_ERROR)
            return MHD_CONTENT_READER_END_WITH_ERROR;
    }
}

static void stream_free(void *cls)
{
    stream_t *s = cls;
    if (s->zinit)
        deflateEnd(&s->z);
    if (s->free_fn)
        s->free_fn(s->ctx);
    free(s);
}

void http_respond_stream(http_req_t *r, unsigned status, const char *content_type, bool gzip,
                         http_read_fn read, void (*free_fn)(void *ctx), void *ctx)
{
    stream_t *s = sp_calloc(1, sizeof *s);
    s->req = r;
    s->read = read;
    s->free_fn = free_fn;
    s->ctx = ctx;
    if (gzip && deflateInit2(&s->z, 6, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY) == Z_OK) {
        s->gzip = s->zinit = true;
        http_add_header(r, MHD_HTTP_HEADER_CONTENT_ENCODING, "gzip");
        http_add_header(r, MHD_HTTP_HEADER_VARY, "Accept-Encoding");
    }
    struct MHD_Response *resp =
        MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 64 * 1024, stream_read, s, stream_free);
    queue_response(r, status, resp, content_type);
}

/* ---- static files (the viewer) ------------------------------------------------ */

static const char *mime_of(const char *path)
{
    static const struct {
        const char *ext, *type;
    } types[] = {
        {".html", "text/html; charset=utf-8"},
        {".js", "text/javascript; charset=utf-8"},
        {".mjs", "text/javascript; charset=utf-8"},
        {".css", "text/css; charset=utf-8"},
        {".json", "application/json"},
        {".map", "application/json"},
        {".wasm", "application/wasm"},
        {".svg", "image/svg+xml"},
        {".png", "image/png"},
        {".jpg", "image/jpeg"},
        {".jpeg", "image/jpeg"},
        {".gif", "image/gif"},
        {".ico", "image/x-icon"},
        {".webp", "image/webp"},
        {".woff", "font/woff"},
        {".woff2", "font/woff2"},
        {".ttf", "font/ttf"},
        {".txt", "text/plain; charset=utf-8"},
        {".xml", "application/xml"},
        {".webmanifest", "application/manifest+json"},
        {".gz", "application/gzip"},
    };
    const char *dot = strrchr(path, '.');
    const char *slash = strrchr(path, '/');
    if (dot && (!slash || dot > slash))
        for (size_t i = 0; i < SP_ARRAY_LEN(types); i++)
            if (strcasecmp(dot, types[i].ext) == 0)
                return types[i].type;
    return "application/octet-stream";
}

/* Serves viewer_dir at /viewer/: a file that exists is sent with its MIME
 * type; a path without one that has no extension is the single-page app's
 * own route and gets index.html; anything else is 404. Paths with ".."
 * segments or NUL are refused. */
static void serve_static(http_req_t *r, const char *rel)
{
    if (strstr(rel, "..") || strchr(rel, '\\')) {
        http_respond_error(r, 400, "bad path");
        return;
    }
    while (*rel == '/')
        rel++;
    const char *dir = r->srv->viewer_dir;
    char path[4096];
    struct stat st;
    int fd = -1;
    if (rel[0]) {
        sp_fmt(path, sizeof path, "%s/%s", dir, rel);
        if (stat(path, &st) == 0 && S_ISREG(st.st_mode))
            fd = open(path, O_RDONLY | O_CLOEXEC);
    }
    if (fd < 0) {
        const char *last = strrchr(rel, '/');
        last = last ? last + 1 : rel;
        if (strchr(last, '.') != NULL && rel[0]) {
            http_respond_error(r, 404, "no such file");
            return;
        }
        sp_fmt(path, sizeof path, "%s/index.html", dir);
        if (stat(path, &st) != 0 || !S_ISREG(st.st_mode) ||
            (fd = open(path, O_RDONLY | O_CLOEXEC)) < 0) {
            http_respond_error(r, 404, "no viewer installed");
            return;
        }
    }
    struct MHD_Response *resp = MHD_create_response_from_fd((uint64_t)st.st_size, fd);
    r->bytes = (uint64_t)st.st_size;
    queue_response(r, 200, resp, mime_of(path));
}

/* ---- routing -------------------------------------------------------------------- */

static void respond_unauthorized(http_req_t *r, const char *why)
{
    http_add_header(r, MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Basic realm=\"ShardPACS\"");
    http_respond_error(r, 401, "%s", why);
}

/* Authenticates the request; false when it was refused (and answered). */
static bool authenticate(http_req_t *r)
{
    if (r->srv->auth == NULL)
        return true;
    const char *h = http_req_header(r, MHD_HTTP_HEADER_AUTHORIZATION);
    if (h == NULL) {
        respond_unauthorized(r, "authentication required");
        return false;
    }
    int rc = auth_check(r->srv->auth, h, r->user, sizeof r->user);
    if (rc != 0) {
        log_warn("http: %s %s refused: %s credentials", r->method, r->url,
                 rc == SP_EINVAL ? "malformed" : "bad");
        r->user[0] = '\0';
        respond_unauthorized(r, "bad credentials");
        return false;
    }
    return true;
}

static void route(http_req_t *r)
{
    http_server_t *s = r->srv;
    const char *url = r->url;
    if (strcmp(r->method, "OPTIONS") == 0) {
        /* CORS preflight: no authentication (browsers never send it here). */
        http_add_header(r, "Access-Control-Allow-Methods", "GET, POST, OPTIONS");
        const char *asked = http_req_header(r, "Access-Control-Request-Headers");
        http_add_header(r, "Access-Control-Allow-Headers",
                        asked && strlen(asked) < 512 ? asked
                                                     : "Accept, Authorization, Content-Type");
        http_add_header(r, "Access-Control-Max-Age", "600");
        http_respond(r, 204, NULL, NULL, 0);
        return;
    }
    if (strcmp(url, "/health") == 0) {
        http_respond(r, 200, "text/plain", "ok\n", 3);
        return;
    }
    if (s->viewer_dir[0] && (strcmp(url, "/viewer") == 0 || strncmp(url, "/viewer/", 8) == 0)) {
        if (strcmp(r->method, "GET") != 0 && strcmp(r->method, "HEAD") != 0) {
            http_respond_error(r, 405, "method not allowed");
        } else if (strcmp(url, "/viewer") == 0) {
            http_add_header(r, MHD_HTTP_HEADER_LOCATION, "/viewer/");
            http_respond(r, 301, NULL, NULL, 0);
        } else {
            serve_static(r, url + 7);
        }
        return;
    }
    if (strcmp(url, "/auth/token") == 0) {
        if (strcmp(r->method, "POST") != 0) {
            http_respond_error(r, 405, "POST /auth/token with Basic credentials");
            return;
        }
        if (s->auth == NULL) {
            http_respond_error(r, 404, "authentication is off");
            return;
        }
        const char *h = http_req_header(r, MHD_HTTP_HEADER_AUTHORIZATION);
        if (h == NULL || strncasecmp(h, "Basic ", 6) != 0) {
            respond_unauthorized(r, "POST /auth/token needs Basic credentials");
            return;
        }
        if (!authenticate(r))
            return;
        if (http_req_content_length(r) > 65536) {
            http_respond_error(r, 413, "no body expected");
            return;
        }
        r->route = ROUTE_TOKEN;
        return;
    }
    size_t rootlen = strlen(s->root);
    if (strncmp(url, s->root, rootlen) != 0 || (url[rootlen] != '/' && url[rootlen] != '\0')) {
        http_respond_error(r, 404, "no such resource");
        return;
    }
    r->path = sp_strdup(url[rootlen] ? url + rootlen : "/");
    if (!authenticate(r))
        return;
    int64_t cl = http_req_content_length(r);
    if (cl > 0 && (uint64_t)cl > s->max_body) {
        http_respond_error(r, 413, "request body of %lld bytes is over the limit of %zu",
                           (long long)cl, s->max_body);
        return;
    }
    r->route = ROUTE_DICOMWEB;
    r->began = true;
    s->h.begin(s->h.ctx, r);
}

static void answer_token(http_req_t *r)
{
    char *token = NULL;
    int64_t expires = 0;
    if (auth_issue_token(r->srv->auth, r->user, &token, &expires) != 0) {
        http_respond_error(r, 404, "bearer tokens are not configured ([http] token_key)");
        return;
    }
    json_t *o =
        json_pack("{s:s,s:s,s:I,s:I}", "access_token", token, "token_type", "Bearer", "expires_in",
                  (json_int_t)(expires - (int64_t)time(NULL)), "expires_at", (json_int_t)expires);
    char *text = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    free(token);
    http_add_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
    http_respond_take(r, 200, "application/json", text, strlen(text));
}

static enum MHD_Result on_access(void *cls, struct MHD_Connection *conn, const char *url,
                                 const char *method, const char *version, const char *upload_data,
                                 size_t *upload_data_size, void **con_cls)
{
    (void)version;
    http_server_t *s = cls;
    http_req_t *r = *con_cls;
    if (r == NULL) {
        r = sp_calloc(1, sizeof *r);
        r->srv = s;
        r->conn = conn;
        r->method = sp_strdup(method);
        r->url = sp_strdup(url);
        r->start_ms = sp_now_ms();
        *con_cls = r;
        route(r);
        return MHD_YES;
    }
    if (*upload_data_size > 0) {
        size_t n = *upload_data_size;
        *upload_data_size = 0;
        r->body_n += n;
        if (r->responded || r->route != ROUTE_DICOMWEB)
            return MHD_YES; /* a body nobody reads: discard */
        if (r->body_n > s->max_body) {
            log_warn("http: %s %s: body over %zu bytes, connection dropped", r->method, r->url,
                     s->max_body);
            return MHD_NO;
        }
        return s->h.body(s->h.ctx, r, (const uint8_t *)upload_data, n) == 0 ? MHD_YES : MHD_NO;
    }
    if (r->responded || r->ended)
        return MHD_YES;
    r->ended = true;
    if (r->route == ROUTE_TOKEN)
        answer_token(r);
    else if (r->route == ROUTE_DICOMWEB)
        s->h.end(s->h.ctx, r);
    if (!r->responded)
        http_respond_error(r, 500, "no response");
    return MHD_YES;
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    (void)conn;
    http_server_t *s = cls;
    http_req_t *r = *con_cls;
    if (r == NULL)
        return;
    if (r->began && s->h.cleanup)
        s->h.cleanup(s->h.ctx, r);
    const char *how =
        toe == MHD_REQUEST_TERMINATED_COMPLETED_OK ? ""
        : toe == MHD_REQUEST_TERMINATED_CLIENT_ABORT || toe == MHD_REQUEST_TERMINATED_READ_ERROR
            ? " (client went away)"
        : toe == MHD_REQUEST_TERMINATED_TIMEOUT_REACHED ? " (timed out)"
                                                        : " (cut)";
    log_info("http: %s %s %s study=%s status=%u bytes=%llu in=%llu ms=%lld%s", http_req_user(r),
             r->method, r->url, r->study[0] ? r->study : "-", r->responded ? r->status : 0,
             (unsigned long long)r->bytes, (unsigned long long)r->body_n,
             (long long)(sp_now_ms() - r->start_ms), how);
    for (size_t i = 0; i < r->nheaders; i++) {
        free(r->hname[i]);
        free(r->hvalue[i]);
    }
    free(r->method);
    free(r->url);
    free(r->path);
    free(r->base);
    free(r);
    *con_cls = NULL;
}

static void mhd_logger(void *cls, const char *fmt, va_list ap)
{
    (void)cls;
    char msg[512];
    vsnprintf(msg, sizeof msg, fmt, ap);
    size_t n = strlen(msg);
    while (n > 0 && msg[n - 1] == '\n')
        msg[--n] = '\0';
    log_warn("http: %s", msg);
}

static char *read_file(const char *path, char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        sp_fmt(err, errlen, "%s: %s", path, strerror(errno));
        return NULL;
    }
    size_t cap = 4096, len = 0;
    char *buf = sp_malloc(cap);
    size_t got;
    while ((got = fread(buf + len, 1, cap - len - 1, f)) > 0) {
        len += got;
        if (len + 1 == cap)
            buf = sp_realloc(buf, cap *= 2);
        if (len > (1 << 20))
            break;
    }
    fclose(f);
    buf[len] = '\0';
    return buf;
}

static void server_free(http_server_t *s)
{
    free(s->bind);
    free(s->cors_origins);
    free(s->public_root);
    free(s->root);
    free(s->viewer_dir);
    free(s->cert_pem);
    free(s->key_pem);
    free(s);
}

int http_server_start(const http_config_t *cfg, const http_handlers_t *h, http_server_t **out,
                      char *err, size_t errlen)
{
    http_server_t *s = sp_calloc(1, sizeof *s);
    s->h = *h;
    s->bind = sp_strdup(cfg->bind);
    s->cors_origins = sp_strdup(cfg->cors_origins ? cfg->cors_origins : "");
    s->public_root = sp_strdup(cfg->public_root ? cfg->public_root : "");
    /* The root without a trailing slash ("/" becomes ""). */
    const char *root = cfg->root ? cfg->root : "/dicom-web";
    size_t rl = strlen(root);
    while (rl > 0 && root[rl - 1] == '/')
        rl--;
    s->root = sp_strndup(root, rl);
    s->viewer_dir = sp_strdup(cfg->viewer_dir ? cfg->viewer_dir : "");
    s->port = cfg->port;
    s->max_body = cfg->max_body;
    s->auth = cfg->auth;
    if (s->root[0] != '\0' && s->root[0] != '/') {
        sp_fmt(err, errlen, "root '%s' must start with '/'", cfg->root);
        server_free(s);
        return SP_ECONFIG;
    }
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL | MHD_USE_ERROR_LOG;
    if (cfg->tls_cert && cfg->tls_cert[0]) {
        if ((s->cert_pem = read_file(cfg->tls_cert, err, errlen)) == NULL ||
            (s->key_pem = read_file(cfg->tls_key ? cfg->tls_key : "", err, errlen)) == NULL) {
            server_free(s);
            return SP_ECONFIG;
        }
        s->tls = true;
        flags |= MHD_USE_TLS;
    }
    struct addrinfo hints = {.ai_flags = AI_NUMERICHOST | AI_PASSIVE, .ai_socktype = SOCK_STREAM};
    struct addrinfo *ai = NULL;
    char portstr[16];
    sp_fmt(portstr, sizeof portstr, "%d", cfg->port);
    if (getaddrinfo(cfg->bind, portstr, &hints, &ai) != 0 || ai == NULL) {
        sp_fmt(err, errlen, "bind address '%s' is not a numeric IPv4 or IPv6 address", cfg->bind);
        server_free(s);
        return SP_ECONFIG;
    }
    if (ai->ai_family == AF_INET6)
        flags |= MHD_USE_IPv6;
    struct MHD_OptionItem opts[16];
    size_t n = 0;
    opts[n++] = (struct MHD_OptionItem){MHD_OPTION_EXTERNAL_LOGGER, (intptr_t)mhd_logger, NULL};
    opts[n++] = (struct MHD_OptionItem){MHD_OPTION_THREAD_POOL_SIZE, cfg->workers, NULL};
    opts[n++] = (struct MHD_OptionItem){MHD_OPTION_SOCK_ADDR, 0, ai->ai_addr};
    opts[n++] = (struct MHD_OptionItem){MHD_OPTION_CONNECTION_TIMEOUT, cfg->timeout_s, NULL};
    opts[n++] = (struct MHD_OptionItem){MHD_OPTION_CONNECTION_MEMORY_LIMIT, 256 * 1024, NULL};
    opts[n++] = (struct MHD_OptionItem){MHD_OPTION_CONNECTION_LIMIT, 2000, NULL};
    opts[n++] = (struct MHD_OptionItem){MHD_OPTION_NOTIFY_COMPLETED, (intptr_t)on_completed, s};
    if (s->tls) {
        opts[n++] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_MEM_CERT, 0, s->cert_pem};
        opts[n++] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_MEM_KEY, 0, s->key_pem};
    }
    opts[n++] = (struct MHD_OptionItem){MHD_OPTION_END, 0, NULL};
    s->daemon = MHD_start_daemon(flags, (uint16_t)cfg->port, NULL, NULL, on_access, s,
                                 MHD_OPTION_ARRAY, opts, MHD_OPTION_END);
    freeaddrinfo(ai);
    if (s->daemon == NULL) {
        sp_fmt(err, errlen, "cannot listen on %s:%d (port taken, or bad TLS certificate/key)",
               cfg->bind, cfg->port);
        server_free(s);
        return SP_EUNAVAIL;
    }
    *out = s;
    return 0;
}

void http_server_stop(http_server_t **sp)
{
    http_server_t *s = *sp;
    if (s == NULL)
        return;
    MHD_stop_daemon(s->daemon);
    server_free(s);
    *sp = NULL;
}
