/* admin.c - metric registry, Prometheus text exposition and the admin HTTP
 * server (admin.h).
 *
 * The registry is two fixed arrays (families, series) filled under a mutex
 * at registration; a series never moves once registered, so the hot path
 * updates its atomics without a lock, and a scrape reads them under the
 * same mutex only to walk the arrays. The HTTP server is libmicrohttpd with
 * its own polling thread, answering one request at a time: a scrape is a
 * few kilobytes and Prometheus scrapes seldom. */
#include "admin.h"

#include "base.h"
#include "log.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <microhttpd.h>
#include <netdb.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define ADMIN_MAX_FAMILIES 128
#define ADMIN_MAX_SERIES 1024
#define ADMIN_MAX_COLLECTORS 16

/* Upper bounds of the latency buckets: DIMSE operations and cluster calls
 * range from a fraction of a millisecond (C-ECHO, a cached find) to seconds
 * (a quorum write of a large object). */
static const double admin_bounds[ADMIN_BUCKETS] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                                   0.1,    0.25,  0.5,    1,     2.5,  5,     10};

typedef enum { KIND_COUNTER, KIND_GAUGE, KIND_HISTOGRAM } kind_t;

typedef struct {
    char *name;
    char *help;
    kind_t kind;
} family_t;

typedef struct {
    int family;
    char *labels;
    union {
        admin_counter_t counter;
        admin_hist_t hist;
    } u;
} series_t;

struct admin_out {
    char *buf;
    size_t len, cap;
};

typedef struct {
    void (*fn)(void *ctx, admin_out_t *o);
    void *ctx;
} collector_t;

static pthread_mutex_t admin_lock = PTHREAD_MUTEX_INITIALIZER;
static family_t admin_families[ADMIN_MAX_FAMILIES];
static size_t admin_nfamilies;
static series_t *admin_series; /* ADMIN_MAX_SERIES, allocated at the first registration */
static size_t admin_nseries;
static collector_t admin_collectors[ADMIN_MAX_COLLECTORS];
static size_t admin_ncollectors;

static struct MHD_Daemon *admin_daemon;
static int admin_bound_port;
static char admin_process[32] = "shardpacs";
static admin_ready_fn admin_ready;
static void *admin_ready_ctx;
static int64_t admin_start_wall_ms;

/* ---- registry ----------------------------------------------------------- */

/* Finds or adds a series; the caller holds admin_lock. */
static series_t *series_get(const char *name, const char *help, const char *labels, kind_t kind)
{
    int fam = -1;
    for (size_t i = 0; i < admin_nfamilies && fam < 0; i++)
        if (strcmp(admin_families[i].name, name) == 0)
            fam = (int)i;
    if (fam < 0) {
        SP_ASSERT(admin_nfamilies < ADMIN_MAX_FAMILIES);
        admin_families[admin_nfamilies] =
            (family_t){.name = sp_strdup(name), .help = sp_strdup(help), .kind = kind};
        fam = (int)admin_nfamilies++;
    }
    SP_ASSERT(admin_families[fam].kind == kind);
    if (admin_series == NULL)
        admin_series = sp_calloc(ADMIN_MAX_SERIES, sizeof *admin_series);
    for (size_t i = 0; i < admin_nseries; i++)
        if (admin_series[i].family == fam && strcmp(admin_series[i].labels, labels) == 0)
            return &admin_series[i];
    SP_ASSERT(admin_nseries < ADMIN_MAX_SERIES);
    series_t *s = &admin_series[admin_nseries++];
    s->family = fam;
    s->labels = sp_strdup(labels);
    return s;
}

admin_counter_t *admin_counter(const char *name, const char *help, const char *labels)
{
    pthread_mutex_lock(&admin_lock);
    series_t *s = series_get(name, help, labels, KIND_COUNTER);
    pthread_mutex_unlock(&admin_lock);
    return &s->u.counter;
}

admin_counter_t *admin_gauge(const char *name, const char *help, const char *labels)
{
    pthread_mutex_lock(&admin_lock);
    series_t *s = series_get(name, help, labels, KIND_GAUGE);
    pthread_mutex_unlock(&admin_lock);
    return &s->u.counter;
}

admin_hist_t *admin_histogram(const char *name, const char *help, const char *labels)
{
    pthread_mutex_lock(&admin_lock);
    series_t *s = series_get(name, help, labels, KIND_HISTOGRAM);
    pthread_mutex_unlock(&admin_lock);
    return &s->u.hist;
}

void admin_observe(admin_hist_t *h, double seconds)
{
    size_t b = 0;
    while (b < ADMIN_BUCKETS && seconds > admin_bounds[b])
        b++;
    atomic_fetch_add_explicit(&h->bucket[b], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&h->sum_us, seconds > 0 ? (uint64_t)(seconds * 1e6) : 0,
                              memory_order_relaxed);
    atomic_fetch_add_explicit(&h->count, 1, memory_order_relaxed);
}

void admin_add_collector(void (*fn)(void *ctx, admin_out_t *o), void *ctx)
{
    pthread_mutex_lock(&admin_lock);
    SP_ASSERT(admin_ncollectors < ADMIN_MAX_COLLECTORS);
    admin_collectors[admin_ncollectors++] = (collector_t){fn, ctx};
    pthread_mutex_unlock(&admin_lock);
}

/* ---- exposition --------------------------------------------------------- */

static void out_printf(admin_out_t *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void out_printf(admin_out_t *o, const char *fmt, ...)
{
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(o->buf + o->len, o->cap - o->len, fmt, ap);
        va_end(ap);
        SP_ASSERT(n >= 0);
        if ((size_t)n < o->cap - o->len) {
            o->len += (size_t)n;
            return;
        }
        o->cap = o->cap * 2 + (size_t)n;
        o->buf = sp_realloc(o->buf, o->cap);
    }
}

/* A sample value: integers without an exponent, so counters read exactly. */
static void out_value(admin_out_t *o, double v)
{
    if (v == (double)(int64_t)v && v < 9e15 && v > -9e15)
        out_printf(o, "%lld\n", (long long)v);
    else
        out_printf(o, "%.9g\n", v);
}

void admin_out_family(admin_out_t *o, const char *name, const char *help, const char *type)
{
    out_printf(o, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

void admin_out_sample(admin_out_t *o, const char *name, const char *labels, double value)
{
    if (labels && labels[0])
        out_printf(o, "%s{%s} ", name, labels);
    else
        out_printf(o, "%s ", name);
    out_value(o, value);
}

static void render_histogram(admin_out_t *o, const char *name, const char *labels, admin_hist_t *h)
{
    const char *sep = labels[0] ? "," : "";
    uint64_t cum = 0;
    for (size_t b = 0; b <= ADMIN_BUCKETS; b++) {
        cum += atomic_load_explicit(&h->bucket[b], memory_order_relaxed);
        if (b < ADMIN_BUCKETS)
            out_printf(o, "%s_bucket{%s%sle=\"%g\"} %llu\n", name, labels, sep, admin_bounds[b],
                       (unsigned long long)cum);
        else
            out_printf(o, "%s_bucket{%s%sle=\"+Inf\"} %llu\n", name, labels, sep,
                       (unsigned long long)cum);
    }
    double sum = (double)atomic_load_explicit(&h->sum_us, memory_order_relaxed) / 1e6;
    if (labels[0])
        out_printf(o, "%s_sum{%s} %.6f\n%s_count{%s} %llu\n", name, labels, sum, name, labels,
                   (unsigned long long)cum);
    else
        out_printf(o, "%s_sum %.6f\n%s_count %llu\n", name, sum, name, (unsigned long long)cum);
}

/* The standard process metrics (the names every Prometheus client library
 * uses), from /proc/self/stat and the file descriptor folder. */
static void render_process(admin_out_t *o)
{
    char buf[1024];
    FILE *f = fopen("/proc/self/stat", "r");
    size_t n = f ? fread(buf, 1, sizeof buf - 1, f) : 0;
    if (f)
        fclose(f);
    buf[n] = '\0';
    /* Fields after the command name, which may hold spaces: from the last ')'. */
    const char *p = strrchr(buf, ')');
    unsigned long long utime = 0, stime = 0, vsize = 0;
    long long rss = 0;
    if (p && sscanf(p + 2,
                    "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu %*d %*d %*d %*d %*d %*d "
                    "%*u %llu %lld",
                    &utime, &stime, &vsize, &rss) == 4) {
        double tick = (double)sysconf(_SC_CLK_TCK);
        admin_out_family(o, "process_cpu_seconds_total", "User and system CPU time spent",
                         "counter");
        admin_out_sample(o, "process_cpu_seconds_total", "", (double)(utime + stime) / tick);
        admin_out_family(o, "process_resident_memory_bytes", "Resident memory size", "gauge");
        admin_out_sample(o, "process_resident_memory_bytes", "",
                         (double)rss * (double)sysconf(_SC_PAGESIZE));
        admin_out_family(o, "process_virtual_memory_bytes", "Virtual memory size", "gauge");
        admin_out_sample(o, "process_virtual_memory_bytes", "", (double)vsize);
    }
    size_t fds = 0;
    DIR *d = opendir("/proc/self/fd");
    if (d) {
        for (struct dirent *e; (e = readdir(d)) != NULL;)
            fds += e->d_name[0] != '.';
        closedir(d);
        admin_out_family(o, "process_open_fds", "Open file descriptors", "gauge");
        admin_out_sample(o, "process_open_fds", "", (double)(fds > 0 ? fds - 1 : 0));
    }
    admin_out_family(o, "process_start_time_seconds", "Start time since the epoch", "gauge");
    admin_out_sample(o, "process_start_time_seconds", "", (double)(admin_start_wall_ms / 1000));
}

char *admin_render(void)
{
    admin_out_t o = {.cap = 16384};
    o.buf = sp_malloc(o.cap);
    o.buf[0] = '\0';
    pthread_mutex_lock(&admin_lock);
    admin_out_family(&o, "shardpacs_build_info", "Version of this ShardPACS process", "gauge");
    char labels[96];
    admin_out_sample(
        &o, "shardpacs_build_info",
        sp_fmt(labels, sizeof labels, "version=\"%s\",process=\"%s\"", SP_VERSION, admin_process),
        1);
    for (size_t f = 0; f < admin_nfamilies; f++) {
        const family_t *fam = &admin_families[f];
        static const char *types[] = {"counter", "gauge", "histogram"};
        admin_out_family(&o, fam->name, fam->help, types[fam->kind]);
        for (size_t i = 0; i < admin_nseries; i++) {
            series_t *s = &admin_series[i];
            if (s->family != (int)f)
                continue;
            if (fam->kind == KIND_HISTOGRAM)
                render_histogram(&o, fam->name, s->labels, &s->u.hist);
            else
                admin_out_sample(
                    &o, fam->name, s->labels,
                    (double)atomic_load_explicit(&s->u.counter.value, memory_order_relaxed));
        }
    }
    for (size_t i = 0; i < admin_ncollectors; i++)
        admin_collectors[i].fn(admin_collectors[i].ctx, &o);
    pthread_mutex_unlock(&admin_lock);
    render_process(&o);
    return o.buf;
}

/* ---- HTTP --------------------------------------------------------------- */

static enum MHD_Result respond(struct MHD_Connection *conn, unsigned status, const char *type,
                               char *body)
{
    struct MHD_Response *r =
        MHD_create_response_from_buffer(strlen(body), body, MHD_RESPMEM_MUST_FREE);
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, type);
    enum MHD_Result ret = MHD_queue_response(conn, status, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version, const char *upload,
                                  size_t *upload_len, void **con_cls)
{
    (void)cls, (void)version, (void)upload, (void)con_cls;
    if (*upload_len != 0) /* a body is never expected: refuse without reading it */
        return MHD_NO;
    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0)
        return respond(conn, 405, "text/plain", sp_strdup("GET only\n"));
    if (strcmp(url, "/metrics") == 0)
        return respond(conn, 200, "text/plain; version=0.0.4; charset=utf-8", admin_render());
    if (strcmp(url, "/healthz") == 0)
        return respond(conn, 200, "text/plain", sp_strdup("ok\n"));
    if (strcmp(url, "/readyz") == 0) {
        char why[256] = "ready";
        bool ok = admin_ready == NULL || admin_ready(admin_ready_ctx, why, sizeof why);
        char *body = sp_malloc(strlen(why) + 2);
        sprintf(body, "%s\n", ok ? "ready" : why);
        return respond(conn, ok ? 200 : 503, "text/plain", body);
    }
    return respond(conn, 404, "text/plain", sp_strdup("not found: /metrics, /healthz, /readyz\n"));
}

static void mhd_logger(void *cls, const char *fmt, va_list ap)
{
    (void)cls;
    char line[512];
    vsnprintf(line, sizeof line, fmt, ap);
    log_debug("admin http: %s", line);
}

int admin_start(const char *listen, const char *process, admin_ready_fn ready, void *ready_ctx,
                char *err, size_t errlen)
{
    admin_start_wall_ms = sp_wall_ms();
    sp_strlcpy(admin_process, process, sizeof admin_process);
    admin_ready = ready;
    admin_ready_ctx = ready_ctx;
    if (listen == NULL || listen[0] == '\0' || strcmp(listen, "0") == 0 ||
        strcmp(listen, "off") == 0)
        return 0;
    /* HOST:PORT, HOST possibly a bracketed IPv6 address. */
    char host[128];
    const char *colon = strrchr(listen, ':');
    if (colon == NULL || colon == listen || (size_t)(colon - listen) >= sizeof host) {
        sp_fmt(err, errlen, "[admin] listen '%s' is not HOST:PORT", listen);
        return SP_ECONFIG;
    }
    const char *h = listen;
    size_t hl = (size_t)(colon - listen);
    if (h[0] == '[' && hl >= 2 && h[hl - 1] == ']')
        h++, hl -= 2;
    memcpy(host, h, hl);
    host[hl] = '\0';
    char *end = NULL;
    long port = strtol(colon + 1, &end, 10);
    if (end == colon + 1 || *end != '\0' || port < 0 || port > 65535) {
        sp_fmt(err, errlen, "[admin] listen '%s': bad port", listen);
        return SP_ECONFIG;
    }
    struct addrinfo hints = {.ai_flags = AI_NUMERICHOST | AI_PASSIVE, .ai_socktype = SOCK_STREAM};
    struct addrinfo *ai = NULL;
    if (getaddrinfo(host, colon + 1, &hints, &ai) != 0 || ai == NULL) {
        sp_fmt(err, errlen, "[admin] listen '%s': '%s' is not a numeric IP address", listen, host);
        return SP_ECONFIG;
    }
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ERROR_LOG;
    if (ai->ai_family == AF_INET6)
        flags |= MHD_USE_IPv6;
    admin_daemon = MHD_start_daemon(flags, (uint16_t)port, NULL, NULL, on_request, NULL,
                                    MHD_OPTION_SOCK_ADDR, ai->ai_addr, MHD_OPTION_EXTERNAL_LOGGER,
                                    mhd_logger, NULL, MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)10,
                                    MHD_OPTION_CONNECTION_LIMIT, (unsigned)64, MHD_OPTION_END);
    freeaddrinfo(ai);
    if (admin_daemon == NULL) {
        sp_fmt(err, errlen, "[admin] cannot listen on %s (port taken?)", listen);
        return SP_EUNAVAIL;
    }
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(admin_daemon, MHD_DAEMON_INFO_BIND_PORT);
    admin_bound_port = info ? info->port : (int)port;
    log_info("admin: metrics on http://%s:%d/metrics, health on /healthz and /readyz", host,
             admin_bound_port);
    return 0;
}

int admin_port(void)
{
    return admin_bound_port;
}

void admin_stop(void)
{
    if (admin_daemon)
        MHD_stop_daemon(admin_daemon);
    admin_daemon = NULL;
    admin_bound_port = 0;
    pthread_mutex_lock(&admin_lock);
    admin_ncollectors = 0;
    pthread_mutex_unlock(&admin_lock);
}
