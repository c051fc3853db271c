/* access.c - DICOM access rules (access.h): parsing, first-match lookup and
 * reload of the rules file.
 *
 * The rules in force are an immutable ruleset_t behind a read-write lock:
 * lookups hold the read lock while they match, a reload builds a whole new
 * ruleset and swaps the pointer under the write lock, so a lookup sees the
 * old rules or the new ones, never a mix. One reload at a time (reload_mu,
 * only try-locked by lookups, so no lookup waits for a file read). */
#include "access.h"

#include "../common/base.h"
#include "../common/log.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define ACCESS_RELOAD_INTERVAL_MS 1000
#define ACCESS_FILE_MAX (4 * 1024 * 1024)
#define ACCESS_TOKENS_MAX 32

typedef struct {
    char *ae;      /* calling AE title pattern */
    char *from;    /* address pattern, or NULL for any */
    char *subject; /* certificate subject pattern, or NULL for any connection */
    unsigned ops;
    char **move_to; /* destination patterns; NULL: any destination */
    size_t nmove_to;
    unsigned line;
} rule_t;

typedef struct {
    rule_t *v;
    size_t n;
} ruleset_t;

struct access_rules {
    pthread_rwlock_t lock;
    ruleset_t *cur;
    pthread_mutex_t reload_mu;
    char *path;
    sp_file_id_t applied;
    bool refused;
    sp_file_id_t refused_id;
    _Atomic int64_t next_check_ms;
    void (*on_reload)(void *ctx, bool applied, const char *what);
    void *on_reload_ctx;
};

static const struct {
    const char *name;
    unsigned bits;
} op_names[] = {{"echo", ACCESS_ECHO},
                {"store", ACCESS_STORE},
                {"find", ACCESS_FIND},
                {"get", ACCESS_GET},
                {"move", ACCESS_MOVE},
                {"all", ACCESS_ALL},
                {"none", 0}};

const char *access_op_name(unsigned op)
{
    for (size_t i = 0; i < SP_ARRAY_LEN(op_names) - 2; i++)
        if (op_names[i].bits == op)
            return op_names[i].name;
    return "?";
}

/* '*' any run, '?' one character, everything else itself; the whole text. */
static bool glob_match(const char *pat, const char *text)
{
    const char *star = NULL, *resume = NULL;
    while (*text) {
        if (*pat == '*') {
            star = pat++;
            resume = text;
        } else if (*pat == '?' || *pat == *text) {
            pat++;
            text++;
        } else if (star != NULL) {
            pat = star + 1;
            text = ++resume;
        } else {
            return false;
        }
    }
    while (*pat == '*')
        pat++;
    return *pat == '\0';
}

static void rule_clear(rule_t *r)
{
    free(r->ae);
    free(r->from);
    free(r->subject);
    for (size_t j = 0; j < r->nmove_to; j++)
        free(r->move_to[j]);
    free(r->move_to);
    memset(r, 0, sizeof *r);
}

static void ruleset_free(ruleset_t *rs)
{
    if (rs == NULL)
        return;
    for (size_t i = 0; i < rs->n; i++)
        rule_clear(&rs->v[i]);
    free(rs->v);
    free(rs);
}

/* Splits a line into words at blanks; a double-quoted run is one word
 * (quotes removed) and may hold blanks. Stops at a word starting with '#'.
 * Writes into line. Returns the word count, or -1 for an unclosed quote or
 * too many words. */
static int tokenize(char *line, char **words)
{
    int n = 0;
    char *p = line;
    for (;;) {
        while (*p == ' ' || *p == '\t' || *p == '\r')
            p++;
        if (*p == '\0' || *p == '#')
            return n;
        if (n == ACCESS_TOKENS_MAX)
            return -1;
        words[n++] = p;
        char *out = p;
        bool quoted = false;
        while (*p != '\0' && (quoted || (*p != ' ' && *p != '\t' && *p != '\r'))) {
            if (*p == '"')
                quoted = !quoted;
            else
                *out++ = *p;
            p++;
        }
        if (quoted)
            return -1;
        bool end = *p == '\0';
        *out = '\0';
        if (end)
            return n;
        p++;
    }
}

/* Parses "a,b,c" into an array of copies. */
static char **split_list(const char *text, size_t *n)
{
    char **v = NULL;
    *n = 0;
    const char *p = text;
    while (*p) {
        size_t len = strcspn(p, ",");
        if (len > 0) {
            v = sp_realloc(v, (*n + 1) * sizeof *v);
            v[(*n)++] = sp_strndup(p, len);
        }
        p += len;
        if (*p == ',')
            p++;
    }
    return v;
}

static int parse_ops(const char *text, unsigned *ops, char *bad, size_t badlen)
{
    *ops = 0;
    size_t n;
    char **words = split_list(text, &n);
    int rc = 0;
    for (size_t i = 0; i < n; i++) {
        size_t k = 0;
        while (k < SP_ARRAY_LEN(op_names) && strcmp(op_names[k].name, words[i]) != 0)
            k++;
        if (k == SP_ARRAY_LEN(op_names)) {
            sp_strlcpy(bad, words[i], badlen);
            rc = SP_EINVAL;
        } else {
            *ops |= op_names[k].bits;
        }
    }
    for (size_t i = 0; i < n; i++)
        free(words[i]);
    free(words);
    return rc;
}

/* Parses one rule line into r. Returns 0, 1 for a blank or comment line,
 * or SP_ECONFIG with the reason in err. */
static int parse_rule(char *line, unsigned lineno, rule_t *r, char *err, size_t errlen)
{
    char *w[ACCESS_TOKENS_MAX];
    memset(r, 0, sizeof *r);
    int n = tokenize(line, w);
    if (n < 0) {
        sp_fmt(err, errlen, "unclosed quote or more than %d words", ACCESS_TOKENS_MAX);
        return SP_ECONFIG;
    }
    if (n == 0)
        return 1;
    r->line = lineno;
    if (strchr(w[0], '=') != NULL || strlen(w[0]) > 16 || w[0][0] == '\0') {
        sp_fmt(err, errlen,
               "a rule starts with a calling AE title pattern (1 to 16 characters), "
               "not '%.40s'",
               w[0]);
        return SP_ECONFIG;
    }
    r->ae = sp_strdup(w[0]);
    bool has_allow = false;
    for (int i = 1; i < n; i++) {
        char *eq = strchr(w[i], '=');
        if (eq == NULL) {
            sp_fmt(err, errlen, "'%.40s' is not KEY=VALUE", w[i]);
            return SP_ECONFIG;
        }
        *eq = '\0';
        const char *key = w[i], *value = eq + 1;
        char bad[64];
        if (strcmp(key, "allow") == 0 && !has_allow) {
            has_allow = true;
            if (parse_ops(value, &r->ops, bad, sizeof bad) != 0) {
                sp_fmt(err, errlen, "allow: '%s' is not echo, store, find, get, move, all or none",
                       bad);
                return SP_ECONFIG;
            }
        } else if (strcmp(key, "move_to") == 0 && r->move_to == NULL) {
            r->move_to = split_list(value, &r->nmove_to);
            if (r->nmove_to == 0) {
                sp_fmt(err, errlen, "move_to lists no AE title");
                return SP_ECONFIG;
            }
            for (size_t j = 0; j < r->nmove_to; j++)
                if (strlen(r->move_to[j]) > 16) {
                    sp_fmt(err, errlen, "move_to: '%s' is longer than an AE title", r->move_to[j]);
                    return SP_ECONFIG;
                }
        } else if (strcmp(key, "subject") == 0 && r->subject == NULL && value[0]) {
            r->subject = sp_strdup(value);
        } else if (strcmp(key, "from") == 0 && r->from == NULL && value[0]) {
            r->from = sp_strdup(value);
        } else {
            sp_fmt(err, errlen,
                   "'%s' is not allow, move_to, subject or from, is empty, or is given twice", key);
            return SP_ECONFIG;
        }
    }
    if (!has_allow) {
        sp_fmt(err, errlen, "rule for '%s' has no allow= (write allow=none to refuse)", r->ae);
        return SP_ECONFIG;
    }
    return 0;
}

/* Reads and validates the whole file. Returns the rules (caller frees) and
 * the file's identity from before the read, or NULL with err. */
static ruleset_t *rules_read(const char *path, sp_file_id_t *id, char *err, size_t errlen)
{
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        sp_fmt(err, errlen, "%s: cannot open access rules: %s", path, strerror(errno));
        return NULL;
    }
    struct stat st;
    if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode) || st.st_size > ACCESS_FILE_MAX) {
        sp_fmt(err, errlen, "%s: not a regular file of at most %d bytes", path, ACCESS_FILE_MAX);
        fclose(f);
        return NULL;
    }
    *id = sp_file_id_of(&st);
    ruleset_t *rs = sp_calloc(1, sizeof *rs);
    char line[4096];
    unsigned lineno = 0;
    while (fgets(line, sizeof line, f) != NULL) {
        lineno++;
        size_t len = strlen(line);
        if (len == sizeof line - 1 && line[len - 1] != '\n') {
            sp_fmt(err, errlen, "%s:%u: line longer than %zu characters", path, lineno,
                   sizeof line - 2);
            goto fail;
        }
        line[strcspn(line, "\n")] = '\0';
        rule_t r;
        char why[256];
        int rc = parse_rule(line, lineno, &r, why, sizeof why);
        if (rc == 1)
            continue;
        if (rc != 0) {
            rule_clear(&r);
            sp_fmt(err, errlen, "%s:%u: %s", path, lineno, why);
            goto fail;
        }
        rs->v = sp_realloc(rs->v, (rs->n + 1) * sizeof *rs->v);
        rs->v[rs->n++] = r;
    }
    if (ferror(f)) {
        sp_fmt(err, errlen, "%s: read error", path);
        goto fail;
    }
    fclose(f);
    return rs;
fail:
    fclose(f);
    ruleset_free(rs);
    return NULL;
}

access_rules_t *access_rules_load(const char *path, char *err, size_t errlen)
{
    sp_file_id_t id;
    ruleset_t *rs = rules_read(path, &id, err, errlen);
    if (rs == NULL)
        return NULL;
    access_rules_t *ar = sp_calloc(1, sizeof *ar);
    if (pthread_rwlock_init(&ar->lock, NULL) != 0 || pthread_mutex_init(&ar->reload_mu, NULL) != 0)
        abort(); /* only for lack of resources, fatal like the allocation wrappers */
    ar->cur = rs;
    ar->path = sp_strdup(path);
    ar->applied = id;
    atomic_init(&ar->next_check_ms, sp_now_ms() + ACCESS_RELOAD_INTERVAL_MS);
    return ar;
}

void access_rules_destroy(access_rules_t **rulesp)
{
    if (rulesp == NULL || *rulesp == NULL)
        return;
    access_rules_t *ar = *rulesp;
    ruleset_free(ar->cur);
    free(ar->path);
    pthread_rwlock_destroy(&ar->lock);
    pthread_mutex_destroy(&ar->reload_mu);
    free(ar);
    *rulesp = NULL;
}

void access_rules_on_reload(access_rules_t *rules,
                            void (*fn)(void *ctx, bool applied, const char *what), void *ctx)
{
    rules->on_reload = fn;
    rules->on_reload_ctx = ctx;
}

/* Compares the file with the version in force and swaps in a changed one.
 * Called with reload_mu held. */
static int rules_check(access_rules_t *ar)
{
    sp_file_id_t now = sp_file_id_stat(ar->path);
    if (sp_file_id_equal(&now, &ar->applied)) {
        ar->refused = false;
        return 0;
    }
    if (ar->refused && sp_file_id_equal(&now, &ar->refused_id))
        return SP_ECONFIG;
    char err[512];
    sp_file_id_t id = now;
    ruleset_t *rs = now.missing ? NULL : rules_read(ar->path, &id, err, sizeof err);
    if (now.missing)
        sp_fmt(err, sizeof err, "%s: access rules file missing", ar->path);
    if (rs != NULL && rs->n == 0) {
        /* At start an empty file admits nobody; replacing working rules,
         * it is far likelier a file caught mid-rewrite. */
        sp_fmt(err, sizeof err, "%s: holds no rule", ar->path);
        ruleset_free(rs);
        rs = NULL;
    }
    char what[600];
    if (rs == NULL) {
        ar->refused = true;
        ar->refused_id = id;
        pthread_rwlock_rdlock(&ar->lock);
        size_t kept = ar->cur->n;
        pthread_rwlock_unlock(&ar->lock);
        log_error("access rules %s; keeping the previous %zu rules", err, kept);
        if (ar->on_reload)
            ar->on_reload(
                ar->on_reload_ctx, false,
                sp_fmt(what, sizeof what, "refused: %s; previous %zu rules kept", err, kept));
        return SP_ECONFIG;
    }
    pthread_rwlock_wrlock(&ar->lock);
    ruleset_t *old = ar->cur;
    ar->cur = rs;
    pthread_rwlock_unlock(&ar->lock);
    ruleset_free(old);
    ar->applied = id;
    ar->refused = false;
    log_info("access rules %s reloaded: %zu rules", ar->path, rs->n);
    if (ar->on_reload)
        ar->on_reload(ar->on_reload_ctx, true,
                      sp_fmt(what, sizeof what, "%s reloaded: %zu rules", ar->path, rs->n));
    return 0;
}

static void rules_maybe_check(access_rules_t *ar)
{
    int64_t now = sp_now_ms();
    if (now < atomic_load_explicit(&ar->next_check_ms, memory_order_relaxed))
        return;
    if (pthread_mutex_trylock(&ar->reload_mu) != 0)
        return; /* another thread is checking: that covers us */
    if (now >= atomic_load_explicit(&ar->next_check_ms, memory_order_relaxed)) {
        atomic_store_explicit(&ar->next_check_ms, now + ACCESS_RELOAD_INTERVAL_MS,
                              memory_order_relaxed);
        rules_check(ar);
    }
    pthread_mutex_unlock(&ar->reload_mu);
}

int access_rules_refresh(access_rules_t *rules)
{
    pthread_mutex_lock(&rules->reload_mu);
    atomic_store_explicit(&rules->next_check_ms, sp_now_ms() + ACCESS_RELOAD_INTERVAL_MS,
                          memory_order_relaxed);
    int rc = rules_check(rules);
    pthread_mutex_unlock(&rules->reload_mu);
    return rc;
}

/* AE titles arrive padded with blanks; a rule names the title without. */
static void trimmed(const char *in, char *out, size_t size)
{
    while (in != NULL && *in == ' ')
        in++;
    sp_strlcpy(out, in ? in : "", size);
    size_t n = strlen(out);
    while (n > 0 && out[n - 1] == ' ')
        out[--n] = '\0';
}

static bool rule_matches(const rule_t *r, const char *ae, const access_peer_t *p)
{
    if (!glob_match(r->ae, ae))
        return false;
    if (r->from != NULL && (p->address == NULL || !glob_match(r->from, p->address)))
        return false;
    if (r->subject != NULL && (p->subject == NULL || !glob_match(r->subject, p->subject)))
        return false;
    return true;
}

/* The first rule matching p, or NULL. Called with the read lock held; the
 * rule lives while it is held. */
static const rule_t *first_match(const ruleset_t *rs, const access_peer_t *p)
{
    char ae[65];
    trimmed(p->ae_title, ae, sizeof ae);
    for (size_t i = 0; i < rs->n; i++)
        if (rule_matches(&rs->v[i], ae, p))
            return &rs->v[i];
    return NULL;
}

unsigned access_ops(access_rules_t *rules, const access_peer_t *peer, unsigned *line)
{
    if (line != NULL)
        *line = 0;
    if (rules == NULL)
        return ACCESS_ALL;
    rules_maybe_check(rules);
    pthread_rwlock_rdlock(&rules->lock);
    const rule_t *r = first_match(rules->cur, peer);
    unsigned ops = r ? r->ops : 0;
    if (line != NULL && r != NULL)
        *line = r->line;
    pthread_rwlock_unlock(&rules->lock);
    return ops;
}

bool access_check(access_rules_t *rules, const access_peer_t *peer, unsigned op, const char *dest,
                  char *why, size_t whylen)
{
    if (rules == NULL)
        return true;
    rules_maybe_check(rules);
    pthread_rwlock_rdlock(&rules->lock);
    const rule_t *r = first_match(rules->cur, peer);
    bool ok = r != NULL && (r->ops & op) != 0;
    if (r == NULL) {
        sp_fmt(why, whylen, "no access rule matches calling AE '%s'",
               peer->ae_title ? peer->ae_title : "");
    } else if (!ok) {
        sp_fmt(why, whylen, "access rule on line %u does not allow %s", r->line,
               access_op_name(op));
    } else if (dest != NULL && r->move_to != NULL) {
        char d[65];
        trimmed(dest, d, sizeof d);
        ok = false;
        for (size_t i = 0; i < r->nmove_to && !ok; i++)
            ok = glob_match(r->move_to[i], d);
        if (!ok)
            sp_fmt(why, whylen, "access rule on line %u does not allow moves to '%s'", r->line, d);
    }
    pthread_rwlock_unlock(&rules->lock);
    return ok;
}
