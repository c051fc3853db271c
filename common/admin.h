/* admin.h - the admin HTTP port of nodes and routers: Prometheus metrics
 * (text format 0.0.4) on /metrics, liveness on /healthz and readiness on
 * /readyz, over libmicrohttpd.
 *
 * The metric registry is process-wide. A module registers its counters,
 * gauges and histograms once (admin_counter() and friends take a lock and
 * return a pointer valid until the process exits), then updates them on the
 * hot path with atomics only (admin_add(), admin_set(), admin_observe()).
 * Figures that are cheaper to read when scraped (disk space, RocksDB
 * properties, gossip states) come from collectors, callbacks that run on
 * the admin thread at each scrape and write whole metric families with
 * admin_out_family() / admin_out_sample(). Every process also gets the
 * standard process_* metrics (CPU, memory, file descriptors from
 * /proc/self).
 *
 * Threads: registration and collectors from any thread; updates from any
 * thread; the HTTP server runs one thread of its own. */
#ifndef SP_ADMIN_H
#define SP_ADMIN_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* The [admin] settings of nodes and routers; ADMIN_OPTIONS puts them into a
 * program's config_option_t table (config.h). */
typedef struct {
    char *listen; /* HOST:PORT; "", "0" or "off" = no admin port */
} admin_settings_t;

#define ADMIN_OPTIONS(type, member)                                                                \
    {                                                                                              \
        "admin", "listen", CONFIG_STRING,                                                          \
            offsetof(type, member) + offsetof(admin_settings_t, listen), "", 0, 0,                 \
            "Metrics (/metrics, Prometheus) and health (/healthz, /readyz) over HTTP on "          \
            "HOST:PORT; "                                                                          \
            "empty or 0 = off. Keep it on loopback or a management network: it has no "            \
            "authentication",                                                                      \
            NULL                                                                                   \
    }

/* A counter or a gauge: one series (a metric name with one label set). */
typedef struct {
    _Atomic uint64_t value; /* counters; gauges set with admin_set() */
} admin_counter_t;

/* Latency histogram buckets, in seconds (upper bounds; +Inf implied). */
#define ADMIN_BUCKETS 14
typedef struct {
    _Atomic uint64_t bucket[ADMIN_BUCKETS + 1]; /* not cumulative; the last is +Inf */
    _Atomic uint64_t sum_us;
    _Atomic uint64_t count;
} admin_hist_t;

/* Register (or find, when the same name and labels were registered before)
 * one series. name is the full metric name ("shardpacs_router_bytes_in_total"),
 * help one line, labels the label set without braces ("op=\"store\"") or
 * "" for none; the strings are copied. The series with one name must share
 * one kind. Returns a pointer valid for the life of the process; aborts
 * when the registry is full (a bug: the number of series is fixed by the
 * code, never by input). */
admin_counter_t *admin_counter(const char *name, const char *help, const char *labels);
admin_counter_t *admin_gauge(const char *name, const char *help, const char *labels);
admin_hist_t *admin_histogram(const char *name, const char *help, const char *labels);

static inline void admin_add(admin_counter_t *c, uint64_t n)
{
    atomic_fetch_add_explicit(&c->value, n, memory_order_relaxed);
}
static inline void admin_set(admin_counter_t *c, uint64_t v)
{
    atomic_store_explicit(&c->value, v, memory_order_relaxed);
}
/* Records one duration in seconds. */
void admin_observe(admin_hist_t *h, double seconds);

/* A scrape being written; only collectors see one. */
typedef struct admin_out admin_out_t;
/* Starts a family: # HELP and # TYPE lines (type "gauge" or "counter"). */
void admin_out_family(admin_out_t *o, const char *name, const char *help, const char *type);
/* One sample of the family just started; labels as for admin_counter(). */
void admin_out_sample(admin_out_t *o, const char *name, const char *labels, double value);

/* Adds a collector run at every scrape, in the order added. ctx is
 * borrowed until admin_stop(). */
void admin_add_collector(void (*fn)(void *ctx, admin_out_t *o), void *ctx);

/* The whole exposition, as served on /metrics; the caller frees it. */
char *admin_render(void);

/* Readiness: returns true when ready, else false with a reason in why. */
typedef bool (*admin_ready_fn)(void *ctx, char *why, size_t whylen);

/* Starts the admin HTTP server on listen ("HOST:PORT"; port 0 picks a free
 * one). process names the program in shardpacs_build_info. An empty
 * listen, "0" or "off" starts nothing and returns 0. Returns 0, or
 * SP_ECONFIG / SP_EUNAVAIL with the reason in err. */
int admin_start(const char *listen, const char *process, admin_ready_fn ready, void *ready_ctx,
                char *err, size_t errlen);
/* The bound port, or 0 when the server is off. */
int admin_port(void);
/* Stops the server and forgets the collectors (the registered series stay:
 * modules keep pointers to them). Safe when not started. */
void admin_stop(void);

#endif
