/* audit.c - the process's audit trail (audit.h): records formatted as JSON
 * lines on the caller's thread, queued, and appended by one writer thread in
 * batches (group commit), optionally copied to syslog over UDP.
 *
 * Owns: the queue, the file descriptor, the syslog socket and the writer
 * thread, all in the one static trail below (started and stopped by
 * main()). Callers touch only the queue, under its mutex. */
#include "audit.h"

#include "base.h"
#include "log.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define AUDIT_DEFAULT_QUEUE 8192
/* How often the writer looks whether the file was renamed away. */
#define AUDIT_REOPEN_CHECK_MS 1000

typedef struct {
    const char *name; /* PS3.15 A.5 event name */
    const char *id;   /* its code, "DCM 1101xx" */
    const char *type; /* event type code and name, or NULL */
    char action;      /* usual event action code */
} event_info_t;

static const event_info_t events[] = {
    [AUDIT_APPLICATION_START] = {"Application Activity", "DCM 110100",
                                 "DCM 110120 Application Start", 'E'},
    [AUDIT_APPLICATION_STOP] = {"Application Activity", "DCM 110100", "DCM 110121 Application Stop",
                                'E'},
    [AUDIT_ASSOCIATION] = {"User Authentication", "DCM 110114", "DCM 110122 Login", 'E'},
    [AUDIT_STORE] = {"DICOM Instances Transferred", "DCM 110104", NULL, 'C'},
    [AUDIT_QUERY] = {"Query", "DCM 110112", NULL, 'E'},
    [AUDIT_RETRIEVE] = {"DICOM Instances Transferred", "DCM 110104", NULL, 'R'},
    [AUDIT_INSTANCES_ACCESSED] = {"DICOM Instances Accessed", "DCM 110103", NULL, 'R'},
    [AUDIT_RESTRICTED] = {"Security Alert", "DCM 110113", "DCM 110132 Use of Restricted Function",
                          'E'},
    [AUDIT_NETWORK_CONFIG] = {"Security Alert", "DCM 110113", "DCM 110128 Network Configuration",
                              'E'},
    [AUDIT_SECURITY_CONFIG] = {"Security Alert", "DCM 110113", "DCM 110129 Security Configuration",
                               'E'},
    [AUDIT_NETWORK_ATTACH] = {"Network Entry", "DCM 110108", "DCM 110124 Attach", 'E'},
    [AUDIT_NETWORK_DETACH] = {"Network Entry", "DCM 110108", "DCM 110125 Detach", 'E'},
};

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t work; /* the writer: records queued, or stop */
    pthread_cond_t room; /* callers: the queue has room */
    pthread_cond_t done; /* callers: done_seq moved */
    bool running;
    bool stop;
    char **ring; /* queued lines, oldest at head */
    size_t cap, head, count;
    uint64_t queued_seq; /* sequence number of the newest queued line */
    uint64_t done_seq;   /* every line up to here is written (or synced) */
    uint64_t bad_from;   /* lines bad_from..done_seq of the last batch failed */
    bool last_failed;
    bool writing;      /* a batch (or an fdatasync, a reopen) is under way, mu dropped */
    bool error_logged; /* the last batch failed and said so */
    int64_t sync_due;  /* sync = write: sp_now_ms() of the next fdatasync; 0: none due */
    pthread_t writer;
    /* Below: the writer's alone once started. */
    char *path;
    char *source;
    int fd;
    int udp;
    struct sockaddr_storage syslog_addr;
    socklen_t syslog_len;
    bool commit;
    int sync_interval_ms;
    /* Guards fd against a reopen or close while a record is written:
     * writers (the batch, and waiting callers writing their own record)
     * share it, a reopen or the final close takes it alone. */
    pthread_rwlock_t fd_lock;
} trail_t;

static trail_t trail = {.mu = PTHREAD_MUTEX_INITIALIZER,
                        .work = PTHREAD_COND_INITIALIZER,
                        .room = PTHREAD_COND_INITIALIZER,
                        .done = PTHREAD_COND_INITIALIZER,
                        .fd = -1,
                        .udp = -1,
                        .fd_lock = PTHREAD_RWLOCK_INITIALIZER};

/* ---- formatting ---------------------------------------------------------- */

typedef struct {
    char *p;
    size_t n, cap;
} sbuf_t;

static void sb_put(sbuf_t *b, const char *s, size_t n)
{
    if (b->n + n + 1 > b->cap) {
        b->cap = (b->n + n + 1) * 2;
        b->p = sp_realloc(b->p, b->cap);
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = '\0';
}

static void sb_printf(sbuf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_printf(sbuf_t *b, const char *fmt, ...)
{
    char tmp[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n > 0)
        sb_put(b, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

/* Length of the valid UTF-8 sequence at s (1..4), or 0 if it is not one. */
static size_t utf8_len(const unsigned char *s)
{
    if (s[0] < 0x80)
        return 1;
    size_t n = s[0] >= 0xF0 && s[0] <= 0xF4 ? 4 : s[0] >= 0xE0 ? 3 : s[0] >= 0xC2 ? 2 : 0;
    if (s[0] >= 0xF8)
        n = 0;
    for (size_t i = 1; i < n; i++)
        if ((s[i] & 0xC0) != 0x80)
            return 0;
    return n;
}

/* Appends s as a JSON string. Values come from peers (AE titles, patient
 * IDs, certificate subjects): control characters are escaped and bytes that
 * are not UTF-8 become U+FFFD, so every line stays valid JSON. */
static void sb_json_str(sbuf_t *b, const char *s)
{
    sb_put(b, "\"", 1);
    const unsigned char *p = (const unsigned char *)s;
    while (*p) {
        if (*p == '"' || *p == '\\') {
            char esc[2] = {'\\', (char)*p};
            sb_put(b, esc, 2);
            p++;
        } else if (*p < 0x20 || *p == 0x7f) {
            sb_printf(b, "\\u%04x", *p);
            p++;
        } else {
            size_t n = utf8_len(p);
            if (n == 0) {
                sb_put(b, "\\ufffd", 6);
                p++;
            } else {
                sb_put(b, (const char *)p, n);
                p += n;
            }
        }
    }
    sb_put(b, "\"", 1);
}

static void sb_field(sbuf_t *b, const char *key, const char *value)
{
    if (value == NULL)
        return;
    sb_printf(b, ",\"%s\":", key);
    sb_json_str(b, value);
}

/* ISO 8601 UTC with milliseconds, the log's format. */
static void format_time(char *out, size_t size)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    snprintf(out, size, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ", tm.tm_year + 1900, tm.tm_mon + 1,
             tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000);
}

/* Formats one record as a JSON line (with its newline); the caller frees. */
static char *format_record(const audit_record_t *r, const char *source)
{
    SP_ASSERT((size_t)r->event < SP_ARRAY_LEN(events));
    const event_info_t *ev = &events[r->event];
    char when[64];
    format_time(when, sizeof when);
    sbuf_t b = {0};
    sb_printf(&b, "{\"time\":\"%s\"", when);
    sb_field(&b, "source", source);
    sb_field(&b, "event", ev->name);
    sb_field(&b, "event_id", ev->id);
    sb_field(&b, "event_type", ev->type);
    sb_printf(&b, ",\"action\":\"%c\",\"outcome\":%d", r->action ? r->action : ev->action,
              r->outcome);
    sb_field(&b, "operation", r->operation);
    sb_put(&b, ",\"actor\":{", 10);
    size_t mark = b.n;
    sb_field(&b, "ae_title", r->ae_title);
    sb_field(&b, "called_ae", r->called_ae);
    sb_field(&b, "address", r->address);
    sb_field(&b, "subject", r->subject);
    sb_field(&b, "user", r->user);
    sb_field(&b, "role", r->role);
    if (b.n > mark) {
        /* Drop the comma sb_field put before the first actor field. */
        memmove(b.p + mark, b.p + mark + 1, b.n - mark);
        b.n--;
    }
    sb_put(&b, "}", 1);
    sb_field(&b, "patient_id", r->patient_id);
    size_t nstudies = r->studies ? r->nstudies : r->study ? 1 : 0;
    if (nstudies > 0) {
        sb_put(&b, ",\"studies\":[", 12);
        for (size_t i = 0; i < nstudies && i < AUDIT_MAX_STUDIES; i++) {
            if (i > 0)
                sb_put(&b, ",", 1);
            sb_json_str(&b, r->studies ? r->studies[i] : r->study);
        }
        sb_put(&b, "]", 1);
        if (nstudies > AUDIT_MAX_STUDIES)
            sb_printf(&b, ",\"studies_total\":%zu", nstudies);
    }
    sb_field(&b, "sop_instance_uid", r->sop_uid);
    if (r->instances >= 0)
        sb_printf(&b, ",\"instances\":%lld", r->instances);
    if (r->dimse_status >= 0)
        sb_printf(&b, ",\"status\":\"0x%04X\"", (unsigned)r->dimse_status);
    sb_field(&b, "destination", r->destination);
    sb_field(&b, "detail", r->detail);
    sb_put(&b, "}\n", 2);
    return b.p;
}

/* ---- writer ------------------------------------------------------------- */

static int open_file(const char *path)
{
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
    return fd < 0 ? -errno : fd;
}

/* Reopens the file when its path now names another one (renamed away by a
 * rotation, or deleted): later records go to a file at the path. */
static void maybe_reopen(trail_t *t)
{
    struct stat by_path, by_fd;
    if (t->fd >= 0 && stat(t->path, &by_path) == 0 && fstat(t->fd, &by_fd) == 0 &&
        by_path.st_dev == by_fd.st_dev && by_path.st_ino == by_fd.st_ino)
        return;
    int fd = open_file(t->path);
    if (fd < 0) {
        log_error("audit: cannot reopen %s: %s", t->path, sp_strerror(fd));
        return;
    }
    pthread_rwlock_wrlock(&t->fd_lock);
    if (t->fd >= 0) {
        fdatasync(t->fd);
        close(t->fd);
    }
    t->fd = fd;
    pthread_rwlock_unlock(&t->fd_lock);
    log_info("audit: %s reopened (rotated)", t->path);
}

/* RFC 5424 framing of one record for the collector: facility authpriv
 * (10), severity notice (5) for success and warning (4) otherwise. */
static void send_syslog(trail_t *t, const char *line, size_t len)
{
    static char host[256];
    if (host[0] == '\0' && gethostname(host, sizeof host - 1) != 0)
        sp_strlcpy(host, "-", sizeof host);
    bool ok = strstr(line, "\"outcome\":0,") != NULL;
    char when[64];
    format_time(when, sizeof when);
    char head[512];
    int n = snprintf(head, sizeof head, "<%d>1 %s %s shardpacs %ld AUDIT [origin source=\"%s\"] ",
                     10 * 8 + (ok ? 5 : 4), when, host, (long)getpid(), t->source);
    if (n < 0 || (size_t)n >= sizeof head)
        return;
    char *msg = sp_malloc((size_t)n + len);
    memcpy(msg, head, (size_t)n);
    memcpy(msg + n, line, len - 1); /* without the newline */
    /* Best effort by nature (UDP): a full socket buffer drops the copy, never
     * the file's record. */
    sendto(t->udp, msg, (size_t)n + len - 1, MSG_DONTWAIT, (struct sockaddr *)&t->syslog_addr,
           t->syslog_len);
    free(msg);
}

/* Writes everything queued as one batch. Called with mu held and no batch
 * being written; returns with mu held, having dropped it for the I/O. The
 * writer thread calls it for records nobody waits for; a caller waiting for
 * its record calls it itself when no batch is being written (it leads the
 * batch, and whoever queued meanwhile rides along), so a store never waits
 * for another thread to be scheduled, only for the I/O it needs anyway. */
static void flush_locked(trail_t *t)
{
    size_t n = t->count;
    char **batch = sp_calloc(n ? n : 1, sizeof *batch);
    for (size_t i = 0; i < n; i++) {
        batch[i] = t->ring[(t->head + i) % t->cap];
        t->ring[(t->head + i) % t->cap] = NULL;
    }
    t->head = (t->head + n) % t->cap;
    t->count = 0;
    uint64_t last = t->queued_seq;
    t->writing = true;
    pthread_cond_broadcast(&t->room);
    pthread_mutex_unlock(&t->mu);

    /* One write for the whole batch: the lines land in order, and the cost
     * of a record is a memcpy, not a system call. */
    sbuf_t all = {0};
    for (size_t i = 0; i < n; i++)
        sb_put(&all, batch[i], strlen(batch[i]));
    int rc = 0;
    pthread_rwlock_rdlock(&t->fd_lock);
    if (t->fd >= 0 && n > 0) {
        rc = sp_write_all(t->fd, all.p, all.n);
        if (rc == 0 && t->commit)
            rc = fdatasync(t->fd) == 0 ? 0 : -errno;
    }
    pthread_rwlock_unlock(&t->fd_lock);
    if (t->udp >= 0)
        for (size_t i = 0; i < n; i++)
            send_syslog(t, batch[i], strlen(batch[i]));
    for (size_t i = 0; i < n; i++)
        free(batch[i]);
    free(batch);
    free(all.p);

    pthread_mutex_lock(&t->mu);
    if (rc != 0 && !t->error_logged)
        log_error("audit: cannot write %zu records to %s: %s", n, t->path, sp_strerror(rc));
    else if (rc == 0 && t->error_logged)
        log_info("audit: writing to %s again", t->path);
    t->error_logged = rc != 0;
    if (rc == 0 && !t->commit && n > 0 && t->sync_due == 0) {
        t->sync_due = sp_now_ms() + t->sync_interval_ms;
        pthread_cond_signal(&t->work); /* the writer thread schedules the fdatasync */
    }
    t->last_failed = rc != 0;
    t->bad_from = t->done_seq + 1;
    t->done_seq = last;
    t->writing = false;
    pthread_cond_broadcast(&t->done);
    if (t->count > 0)
        pthread_cond_signal(&t->work);
}

/* Runs fn(t) as if it were a batch (no batch writes meanwhile). Called and
 * returns with mu held. */
static void exclusive_locked(trail_t *t, void (*fn)(trail_t *t))
{
    t->writing = true;
    pthread_mutex_unlock(&t->mu);
    fn(t);
    pthread_mutex_lock(&t->mu);
    t->writing = false;
    pthread_cond_broadcast(&t->done);
}

static void sync_now(trail_t *t)
{
    if (t->fd >= 0 && fdatasync(t->fd) != 0)
        log_error("audit: fdatasync %s: %s", t->path, strerror(errno));
}

static void *writer_main(void *arg)
{
    trail_t *t = arg;
    int64_t next_reopen_check = sp_now_ms() + AUDIT_REOPEN_CHECK_MS;
    pthread_mutex_lock(&t->mu);
    for (;;) {
        int64_t now = sp_now_ms();
        bool sync_due = t->sync_due != 0 && now >= t->sync_due;
        bool reopen_due = t->fd >= 0 && now >= next_reopen_check;
        if (!t->writing && t->count > 0) {
            flush_locked(t);
        } else if (!t->writing && (sync_due || (t->stop && t->sync_due != 0))) {
            t->sync_due = 0;
            exclusive_locked(t, sync_now);
        } else if (!t->writing && reopen_due) {
            next_reopen_check = now + AUDIT_REOPEN_CHECK_MS;
            exclusive_locked(t, maybe_reopen);
        } else if (t->stop && !t->writing && t->count == 0) {
            break;
        } else {
            /* Nothing to do now: sleep until work, the next fdatasync or the
             * next rotation check, whichever comes first. */
            int64_t until = next_reopen_check;
            if (t->sync_due != 0 && t->sync_due < until)
                until = t->sync_due;
            int64_t left = until - now;
            if (left < 1)
                left = 1;
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_sec += left / 1000;
            ts.tv_nsec += (left % 1000) * 1000000L;
            if (ts.tv_nsec >= 1000000000L) {
                ts.tv_sec++;
                ts.tv_nsec -= 1000000000L;
            }
            pthread_cond_timedwait(t->writing ? &t->done : &t->work, &t->mu, &ts);
        }
    }
    pthread_mutex_unlock(&t->mu);
    return NULL;
}

/* ---- public ------------------------------------------------------------- */

static int resolve_syslog(trail_t *t, const char *spec, char *err, size_t errlen)
{
    const char *colon = strrchr(spec, ':');
    if (colon == NULL || colon == spec || colon[1] == '\0') {
        sp_fmt(err, errlen, "audit syslog '%s' is not HOST:PORT", spec);
        return SP_ECONFIG;
    }
    char host[256];
    sp_strlcpy(host, spec,
               (size_t)(colon - spec) + 1 < sizeof host ? (size_t)(colon - spec) + 1 : sizeof host);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_DGRAM};
    struct addrinfo *res = NULL;
    int g = getaddrinfo(host, colon + 1, &hints, &res);
    if (g != 0 || res == NULL) {
        sp_fmt(err, errlen, "audit syslog '%s': %s", spec, gai_strerror(g));
        return SP_ECONFIG;
    }
    memcpy(&t->syslog_addr, res->ai_addr, res->ai_addrlen);
    t->syslog_len = res->ai_addrlen;
    t->udp = socket(res->ai_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    freeaddrinfo(res);
    if (t->udp < 0) {
        int rc = -errno;
        sp_fmt(err, errlen, "audit syslog socket: %s", strerror(errno));
        return rc;
    }
    return 0;
}

int audit_start(const audit_config_t *cfg, char *err, size_t errlen)
{
    trail_t *t = &trail;
    SP_ASSERT(!t->running);
    bool has_file = cfg->path != NULL && cfg->path[0] != '\0';
    bool has_syslog = cfg->syslog != NULL && cfg->syslog[0] != '\0';
    if (!has_file && !has_syslog)
        return 0;
    int rc = 0;
    t->fd = -1;
    t->udp = -1;
    if (has_file) {
        t->fd = open_file(cfg->path);
        if (t->fd < 0) {
            rc = t->fd;
            sp_fmt(err, errlen, "cannot open audit file %s: %s", cfg->path, sp_strerror(rc));
            return rc;
        }
    }
    if (has_syslog && (rc = resolve_syslog(t, cfg->syslog, err, errlen)) != 0) {
        if (t->fd >= 0)
            close(t->fd);
        t->fd = -1;
        return rc;
    }
    t->path = sp_strdup(has_file ? cfg->path : "(none)");
    t->source = sp_strdup(cfg->source ? cfg->source : "");
    t->commit = cfg->sync_commit;
    t->sync_interval_ms = cfg->sync_interval_ms > 0 ? cfg->sync_interval_ms : 1000;
    t->cap = cfg->queue ? cfg->queue : AUDIT_DEFAULT_QUEUE;
    t->ring = sp_calloc(t->cap, sizeof *t->ring);
    t->head = t->count = 0;
    t->queued_seq = t->done_seq = 0;
    t->last_failed = false;
    t->writing = false;
    t->error_logged = false;
    t->sync_due = 0;
    t->stop = false;
    rc = -pthread_create(&t->writer, NULL, writer_main, t);
    if (rc != 0) {
        sp_fmt(err, errlen, "cannot start the audit writer: %s", sp_strerror(rc));
        free(t->ring);
        return rc;
    }
    pthread_mutex_lock(&t->mu);
    t->running = true;
    pthread_mutex_unlock(&t->mu);
    return 0;
}

void audit_stop(void)
{
    trail_t *t = &trail;
    pthread_mutex_lock(&t->mu);
    if (!t->running) {
        pthread_mutex_unlock(&t->mu);
        return;
    }
    t->stop = true;
    pthread_cond_broadcast(&t->work);
    pthread_mutex_unlock(&t->mu);
    pthread_join(t->writer, NULL);
    pthread_mutex_lock(&t->mu);
    t->running = false;
    pthread_cond_broadcast(&t->room);
    pthread_cond_broadcast(&t->done);
    pthread_mutex_unlock(&t->mu);
    pthread_rwlock_wrlock(&t->fd_lock); /* a waiting caller may still be writing */
    if (t->fd >= 0) {
        fdatasync(t->fd);
        close(t->fd);
    }
    if (t->udp >= 0)
        close(t->udp);
    t->fd = t->udp = -1;
    pthread_rwlock_unlock(&t->fd_lock);
    free(t->ring);
    free(t->path);
    free(t->source);
    t->ring = NULL;
    t->path = t->source = NULL;
}

bool audit_enabled(void)
{
    pthread_mutex_lock(&trail.mu);
    bool on = trail.running;
    pthread_mutex_unlock(&trail.mu);
    return on;
}

/* sync = write, file only: a caller that waits for its record writes it
 * itself, one O_APPEND write of the whole line (lines never interleave),
 * instead of queueing it and waiting for the writer thread's batch: the
 * guarantee is the same (the record is in the kernel before the caller
 * answers, so it survives the process being killed), without the thread
 * hand-overs that a DIMSE response would otherwise wait for. The writer
 * thread still syncs the file every sync_interval. Such a record may land
 * before queued ones made just earlier; each carries its time. */
static int write_own(trail_t *t, char *line)
{
    pthread_rwlock_rdlock(&t->fd_lock);
    int rc = t->fd >= 0 ? sp_write_all(t->fd, line, strlen(line)) : 0;
    pthread_rwlock_unlock(&t->fd_lock);
    free(line);
    pthread_mutex_lock(&t->mu);
    if (rc != 0 && !t->error_logged)
        log_error("audit: cannot write a record to %s: %s", t->path, sp_strerror(rc));
    else if (rc == 0 && t->error_logged)
        log_info("audit: writing to %s again", t->path);
    t->error_logged = rc != 0;
    if (rc == 0 && t->sync_due == 0) {
        t->sync_due = sp_now_ms() + t->sync_interval_ms;
        pthread_cond_signal(&t->work); /* the writer thread schedules the fdatasync */
    }
    pthread_mutex_unlock(&t->mu);
    return rc != 0 ? SP_EUNAVAIL : 0;
}

int audit_record(const audit_record_t *r, bool wait)
{
    trail_t *t = &trail;
    pthread_mutex_lock(&t->mu);
    bool on = t->running && !t->stop;
    pthread_mutex_unlock(&t->mu);
    if (!on)
        return 0;
    /* source is set before running and never changes while it is. */
    char *line = format_record(r, t->source);
    if (wait && !t->commit && t->udp < 0)
        return write_own(t, line);
    pthread_mutex_lock(&t->mu);
    /* A full queue means the disk is far behind: the caller waits for room
     * rather than lose the record of what it is doing. */
    while (t->running && !t->stop && t->count == t->cap)
        pthread_cond_wait(&t->room, &t->mu);
    if (!t->running || t->stop) {
        pthread_mutex_unlock(&t->mu);
        free(line);
        return 0;
    }
    t->ring[(t->head + t->count) % t->cap] = line;
    t->count++;
    uint64_t seq = ++t->queued_seq;
    pthread_cond_signal(&t->work);
    int rc = 0;
    if (wait) {
        while (t->running && t->done_seq < seq) {
            if (!t->writing && t->count > 0)
                flush_locked(t); /* lead the next batch ourselves */
            else
                pthread_cond_wait(&t->done, &t->mu);
        }
        if (t->last_failed && seq >= t->bad_from && seq <= t->done_seq)
            rc = SP_EUNAVAIL;
    }
    pthread_mutex_unlock(&t->mu);
    return rc;
}

int audit_parse_sync(const char *text, bool *commit)
{
    if (strcmp(text, "write") == 0)
        *commit = false;
    else if (strcmp(text, "commit") == 0)
        *commit = true;
    else
        return SP_EINVAL;
    return 0;
}

int audit_start_settings(const audit_settings_t *s, const char *source, char *err, size_t errlen)
{
    audit_config_t cfg = {.path = s->file,
                          .source = source,
                          .syslog = s->syslog,
                          .sync_interval_ms = s->sync_interval_ms};
    if (audit_parse_sync(s->sync, &cfg.sync_commit) != 0) {
        sp_fmt(err, errlen, "[audit] sync '%s' is not write or commit", s->sync);
        return SP_ECONFIG;
    }
    return audit_start(&cfg, err, errlen);
}
