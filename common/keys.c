/* keys.c - CURVE key pair files and the cluster's key allow-list (keys.h).
 *
 * Every function here may be called from any thread. Key files are small
 * "name = value" text files; a key pair file holds a secret, so it is created
 * with O_EXCL and mode 0600 and refused when group or others may touch it.
 * Buffers that held a secret key are wiped (explicit_bzero) before they are
 * freed.
 *
 * An allow-list loaded from a file follows that file: lookups check it at
 * most once per KEYS_RELOAD_INTERVAL_MS (one stat), and a changed file is
 * read and validated in full before its entries replace the current ones
 * under a write lock; a bad file leaves the current ones in force. Lookups
 * take the read lock (the ZAP thread, the broker, membership and workers all
 * look up concurrently). Member names are interned per list and kept until
 * the list is destroyed, so a name handed out stays valid across reloads. */
#include "keys.h"

#include "base.h"
#include "log.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <zmq.h>

/* A key file is a few lines; an allow-list one line per member. Anything
 * bigger is not what we expect and is refused rather than read. */
#define KEYS_FILE_MAX (64 * 1024)
#define KEYS_ALLOWLIST_MAX (16 * 1024 * 1024)
#define KEYS_NAME_MAX 128

static const char z85_alphabet[] = "0123456789"
                                   "abcdefghijklmnopqrstuvwxyz"
                                   "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                   ".-:+=^!/*?&<>()[]{}@%$#";

/* Checks the alphabet and that every 5-character group stays below 2^32:
 * zmq_z85_decode would otherwise wrap around silently, so two different
 * strings could name the same key. */
bool keys_z85_valid(const char *text)
{
    if (text == NULL || strnlen(text, KEYS_Z85_LEN + 1) != KEYS_Z85_LEN)
        return false;
    for (size_t g = 0; g < KEYS_Z85_LEN; g += 5) {
        uint64_t value = 0;
        for (size_t i = g; i < g + 5; i++) {
            const char *p = strchr(z85_alphabet, text[i]);
            if (p == NULL)
                return false;
            value = value * 85 + (uint64_t)(p - z85_alphabet);
        }
        if (value > UINT32_MAX)
            return false;
    }
    uint8_t raw[KEYS_RAW_LEN];
    return zmq_z85_decode(raw, text) != NULL;
}

static bool z85_to_raw(const char *text, uint8_t raw[KEYS_RAW_LEN])
{
    return keys_z85_valid(text) && zmq_z85_decode(raw, text) != NULL;
}

int keys_generate(keys_pair_t *out)
{
    memset(out, 0, sizeof *out);
    if (zmq_curve_keypair(out->public_z85, out->secret_z85) != 0)
        return errno == ENOTSUP ? SP_EKEY : -errno;
    return 0;
}

/* True if secret_z85 is the secret half of public_z85. */
static bool pair_matches(const char *public_z85, const char *secret_z85)
{
    char derived[KEYS_Z85_LEN + 1];
    uint8_t stated_raw[KEYS_RAW_LEN], derived_raw[KEYS_RAW_LEN];
    if (!keys_z85_valid(secret_z85) || zmq_curve_public(derived, secret_z85) != 0)
        return false;
    return z85_to_raw(public_z85, stated_raw) && z85_to_raw(derived, derived_raw) &&
           memcmp(stated_raw, derived_raw, KEYS_RAW_LEN) == 0;
}

int keys_write_pair(const char *path, const keys_pair_t *kp)
{
    if (!keys_z85_valid(kp->public_z85) || !pair_matches(kp->public_z85, kp->secret_z85))
        return SP_EINVAL;

    char text[256];
    int len = snprintf(text, sizeof text,
                       "# ShardPACS CURVE key pair\npublic-key = %s\nsecret-key = %s\n",
                       kp->public_z85, kp->secret_z85);
    /* O_EXCL: never replace a secret that may already be in use; O_NOFOLLOW:
     * never write a secret through a symlink someone else planted. */
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0) {
        explicit_bzero(text, sizeof text);
        return -errno;
    }
    int rc = sp_write_all(fd, text, (size_t)len);
    if (rc == 0 && fsync(fd) != 0)
        rc = -errno;
    if (close(fd) != 0 && rc == 0)
        rc = -errno;
    if (rc != 0)
        unlink(path);
    explicit_bzero(text, sizeof text);
    return rc;
}

/* Written to a temporary file and renamed, so readers never see half a key. */
int keys_write_public(const char *path, const char *public_z85)
{
    if (!keys_z85_valid(public_z85))
        return SP_EINVAL;
    size_t tmp_size = strlen(path) + 16;
    char *tmp = sp_malloc(tmp_size);
    snprintf(tmp, tmp_size, "%s.tmp.XXXXXX", path);

    int rc = 0;
    int fd = mkstemp(tmp);
    if (fd < 0) {
        rc = -errno;
        goto out;
    }
    char text[128];
    int len =
        snprintf(text, sizeof text, "# ShardPACS CURVE public key\npublic-key = %s\n", public_z85);
    if (fchmod(fd, 0644) != 0)
        rc = -errno;
    if (rc == 0)
        rc = sp_write_all(fd, text, (size_t)len);
    if (rc == 0 && fsync(fd) != 0)
        rc = -errno;
    if (close(fd) != 0 && rc == 0)
        rc = -errno;
    if (rc == 0 && rename(tmp, path) != 0)
        rc = -errno;
    if (rc != 0)
        unlink(tmp);
out:
    free(tmp);
    return rc;
}

/* Reads all of an open file into a NUL-terminated buffer the caller frees.
 * Returns 0, SP_EKEY (over max bytes, or a NUL byte inside) or -errno. */
static int read_fd(int fd, size_t max, char **out, size_t *out_len)
{
    size_t cap = 4096, len = 0;
    char *buf = sp_malloc(cap);
    for (;;) {
        if (len + 1 >= cap) {
            if (cap > max) {
                explicit_bzero(buf, len);
                free(buf);
                return SP_EKEY;
            }
            /* Grow by copying so a secret never lingers in a freed block. */
            char *bigger = sp_malloc(cap * 2);
            memcpy(bigger, buf, len);
            explicit_bzero(buf, len);
            free(buf);
            buf = bigger;
            cap *= 2;
        }
        ssize_t n = read(fd, buf + len, cap - 1 - len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            int rc = -errno;
            explicit_bzero(buf, len);
            free(buf);
            return rc;
        }
        if (n == 0)
            break;
        len += (size_t)n;
    }
    if (len > max || memchr(buf, '\0', len) != NULL) {
        explicit_bzero(buf, len);
        free(buf);
        return SP_EKEY;
    }
    buf[len] = '\0';
    *out = buf;
    *out_len = len;
    return 0;
}

/* Cuts the next line out of *cursor (in place) and trims blanks and a
 * trailing '\r'. Returns NULL at the end of the text. */
static char *next_line(char **cursor)
{
    char *line = *cursor;
    if (line == NULL || *line == '\0')
        return NULL;
    char *nl = strchr(line, '\n');
    if (nl != NULL) {
        *nl = '\0';
        *cursor = nl + 1;
    } else {
        *cursor = line + strlen(line);
    }
    while (*line == ' ' || *line == '\t')
        line++;
    size_t n = strlen(line);
    while (n > 0 && (line[n - 1] == ' ' || line[n - 1] == '\t' || line[n - 1] == '\r'))
        line[--n] = '\0';
    return line;
}

typedef struct {
    char public_z85[KEYS_Z85_LEN + 1];
    char secret_z85[KEYS_Z85_LEN + 1];
    bool has_public;
    bool has_secret;
} keyfile_t;

/* Parses "public-key = ..." / "secret-key = ..." lines. Values are never
 * echoed into err: the file may hold a secret. */
static int keyfile_parse(const char *path, char *text, keyfile_t *kf, char *err, size_t errlen)
{
    memset(kf, 0, sizeof *kf);
    char *cursor = text;
    unsigned lineno = 0;
    for (char *line; (line = next_line(&cursor)) != NULL;) {
        lineno++;
        if (*line == '\0' || *line == '#')
            continue;
        char *eq = strchr(line, '=');
        if (eq == NULL) {
            sp_fmt(err, errlen, "%s:%u: expected 'public-key = <key>' or 'secret-key = <key>'",
                   path, lineno);
            return SP_EKEY;
        }
        char *name_end = eq;
        while (name_end > line && (name_end[-1] == ' ' || name_end[-1] == '\t'))
            name_end--;
        *name_end = '\0';
        char *value = eq + 1;
        while (*value == ' ' || *value == '\t')
            value++;

        char *dst;
        bool *seen;
        if (strcmp(line, "public-key") == 0) {
            dst = kf->public_z85;
            seen = &kf->has_public;
        } else if (strcmp(line, "secret-key") == 0) {
            dst = kf->secret_z85;
            seen = &kf->has_secret;
        } else {
            sp_fmt(err, errlen, "%s:%u: unknown setting '%.40s'", path, lineno, line);
            return SP_EKEY;
        }
        if (*seen) {
            sp_fmt(err, errlen, "%s:%u: %s given twice", path, lineno, line);
            return SP_EKEY;
        }
        if (!keys_z85_valid(value)) {
            sp_fmt(err, errlen, "%s:%u: %s is not a valid 40-character Z85 key", path, lineno,
                   line);
            return SP_EKEY;
        }
        memcpy(dst, value, KEYS_Z85_LEN + 1);
        *seen = true;
    }
    return 0;
}

/* What a file read by read_checked() must be, and how its messages name
 * it. A refused mode reads "PATH: SUBJECT has mode M, which lets RISK;
 * refusing it (run: FIX PATH)". */
typedef struct {
    const char *what;   /* "key file" */
    const char *a_what; /* "a key file" */
    size_t max;         /* largest size accepted */
    mode_t forbidden;   /* mode bits that refuse the file */
    const char *subject, *risk, *fix;
} file_rule_t;

/* Opens path, checks that the open file is a regular file with none of the
 * forbidden mode bits (fstat on the descriptor: the mode checked is the mode
 * of the file actually read, not of whatever the path names a moment
 * later), and reads it whole. *st gets the fstat result, *statted whether
 * it was taken (also when the file is then refused). Returns 0 with *text
 * (NUL-terminated; the caller clears and frees it) and *len, or SP_EKEY with
 * the reason in err. */
static int read_checked(const char *path, const file_rule_t *rule, struct stat *st, bool *statted,
                        char **text, size_t *len, char *err, size_t errlen)
{
    *statted = false;
    *text = NULL;
    *len = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        sp_fmt(err, errlen, "%s: cannot open %s: %s", path, rule->what, strerror(errno));
        return SP_EKEY;
    }
    int rc = SP_EKEY;
    if (fstat(fd, st) != 0) {
        sp_fmt(err, errlen, "%s: cannot stat %s: %s", path, rule->what, strerror(errno));
        goto out;
    }
    *statted = true;
    if (!S_ISREG(st->st_mode)) {
        sp_fmt(err, errlen, "%s: not a regular file", path);
        goto out;
    }
    if ((st->st_mode & rule->forbidden) != 0) {
        sp_fmt(err, errlen, "%s: %s has mode %04o, which lets %s; refusing it (run: %s %s)", path,
               rule->subject, (unsigned)(st->st_mode & 07777), rule->risk, rule->fix, path);
        goto out;
    }
    rc = read_fd(fd, rule->max, text, len);
    if (rc == SP_EKEY)
        sp_fmt(err, errlen, "%s: not %s (too large or binary)", path, rule->a_what);
    else if (rc != 0)
        sp_fmt(err, errlen, "%s: cannot read %s: %s", path, rule->what, strerror(-rc));
    rc = rc == 0 ? 0 : SP_EKEY;
out:
    close(fd);
    return rc;
}

/* Opens and reads a key file. When secret is true the file must be a regular
 * file that group and others can neither read nor write. */
static int keyfile_load(const char *path, bool secret, keyfile_t *kf, char *err, size_t errlen)
{
    const file_rule_t rule = {.what = "key file",
                              .a_what = "a key file",
                              .max = KEYS_FILE_MAX,
                              .forbidden = secret ? 077 : 0,
                              .subject = "key pair file",
                              .risk = "group or others access the secret key",
                              .fix = "chmod 600"};
    struct stat st;
    bool statted;
    char *text;
    size_t len;
    int rc = read_checked(path, &rule, &st, &statted, &text, &len, err, errlen);
    if (rc == 0)
        rc = keyfile_parse(path, text, kf, err, errlen);
    if (text != NULL) {
        explicit_bzero(text, len);
        free(text);
    }
    return rc;
}

int keys_load_pair(const char *path, keys_pair_t *out, char *err, size_t errlen)
{
    keyfile_t kf;
    memset(out, 0, sizeof *out);
    int rc = keyfile_load(path, true, &kf, err, errlen);
    if (rc != 0)
        goto out;
    if (!kf.has_public || !kf.has_secret) {
        sp_fmt(err, errlen, "%s: key pair file lacks %s", path,
               kf.has_public ? "secret-key" : "public-key");
        rc = SP_EKEY;
        goto out;
    }
    if (!pair_matches(kf.public_z85, kf.secret_z85)) {
        sp_fmt(err, errlen, "%s: secret-key does not belong to the stated public-key", path);
        rc = SP_EKEY;
        goto out;
    }
    memcpy(out->public_z85, kf.public_z85, sizeof out->public_z85);
    memcpy(out->secret_z85, kf.secret_z85, sizeof out->secret_z85);
out:
    explicit_bzero(&kf, sizeof kf);
    return rc;
}

int keys_load_public(const char *path, char out_z85[KEYS_Z85_LEN + 1], char *err, size_t errlen)
{
    keyfile_t kf;
    out_z85[0] = '\0';
    int rc = keyfile_load(path, false, &kf, err, errlen);
    if (rc == 0 && !kf.has_public) {
        sp_fmt(err, errlen, "%s: no public-key line", path);
        rc = SP_EKEY;
    }
    if (rc == 0)
        memcpy(out_z85, kf.public_z85, KEYS_Z85_LEN + 1);
    explicit_bzero(&kf, sizeof kf);
    return rc;
}

/* ---- allow-list ------------------------------------------------------- */

typedef struct {
    uint8_t raw[KEYS_RAW_LEN];
    char z85[KEYS_Z85_LEN + 1];
    /* In a list: an interned name (allowlist_intern), never freed before the
     * list. In an entries_t being parsed: owned by that entries_t. */
    char *name;
    keys_role_t role;
    unsigned line; /* where it was listed in the file; 0 when added in code */
} allow_entry_t;

/* A growable array of entries: a list's current members, or a file's being
 * parsed before it replaces them. */
typedef struct {
    allow_entry_t *v;
    size_t n;
    size_t cap;
} entries_t;

struct keys_allowlist {
    /* Guards cur: read-locked by every lookup, write-locked only for the
     * moment a reload or keys_allowlist_add() changes it. */
    pthread_rwlock_t lock;
    entries_t cur;

    /* Guards the fields below but next_check_ms (an atomic), and serialises
     * writers of cur (taken before the rwlock, never the other way round). A
     * lookup only try-locks it, so it never waits for another reload to
     * finish reading the file. */
    pthread_mutex_t reload_mu;
    char *path;              /* NULL for a list built in code: never reloads */
    sp_file_id_t applied;    /* the version cur was read from */
    bool refused;            /* a later version was refused: */
    sp_file_id_t refused_id; /*   which one (logged once per version) */
    int refused_rc;          /*   and what refresh returns while it stays */
    char **names;            /* interned member names, freed with the list */
    size_t nnames;
    size_t names_cap;
    _Atomic int64_t next_check_ms; /* sp_now_ms() of the next file check */
};

static const allow_entry_t *entries_find(const entries_t *es, const uint8_t key[KEYS_RAW_LEN])
{
    /* A linear scan: a cluster lists tens or hundreds of members and the
     * lookup runs once per CURVE handshake or request, not per frame. */
    for (size_t i = 0; i < es->n; i++)
        if (memcmp(es->v[i].raw, key, KEYS_RAW_LEN) == 0)
            return &es->v[i];
    return NULL;
}

static const allow_entry_t *entries_find_name(const entries_t *es, const char *name)
{
    for (size_t i = 0; i < es->n; i++)
        if (strcmp(es->v[i].name, name) == 0)
            return &es->v[i];
    return NULL;
}

static allow_entry_t *entries_push(entries_t *es)
{
    if (es->n == es->cap) {
        es->cap = es->cap ? es->cap * 2 : 16;
        es->v = sp_realloc(es->v, es->cap * sizeof *es->v);
    }
    allow_entry_t *e = &es->v[es->n++];
    memset(e, 0, sizeof *e);
    return e;
}

/* Frees a parsed (not yet applied) array and the names it owns. */
static void entries_free_owned(entries_t *es)
{
    for (size_t i = 0; i < es->n; i++)
        free(es->v[i].name);
    free(es->v);
    memset(es, 0, sizeof *es);
}

/* Returns the list's copy of name, making one if needed. Names handed out by
 * keys_allowlist_find_raw() must outlive the reload that drops their member
 * (a request in flight still carries its peer's name), so they are kept
 * until the list is destroyed; the pool grows only with names never seen
 * before. Called with reload_mu held. */
static char *allowlist_intern(keys_allowlist_t *al, const char *name)
{
    for (size_t i = 0; i < al->nnames; i++)
        if (strcmp(al->names[i], name) == 0)
            return al->names[i];
    if (al->nnames == al->names_cap) {
        al->names_cap = al->names_cap ? al->names_cap * 2 : 16;
        al->names = sp_realloc(al->names, al->names_cap * sizeof *al->names);
    }
    al->names[al->nnames] = sp_strdup(name);
    return al->names[al->nnames++];
}

keys_allowlist_t *keys_allowlist_new(void)
{
    keys_allowlist_t *al = sp_calloc(1, sizeof *al);
    /* Both initialisers only fail for lack of memory or resources, which
     * the allocation wrappers treat as fatal too. */
    if (pthread_rwlock_init(&al->lock, NULL) != 0 || pthread_mutex_init(&al->reload_mu, NULL) != 0)
        abort();
    atomic_init(&al->next_check_ms, 0);
    return al;
}

/* A name appears in logs, so it must be printable and of sane length. */
static bool name_valid(const char *name)
{
    size_t n = name ? strnlen(name, KEYS_NAME_MAX + 1) : 0;
    if (n == 0 || n > KEYS_NAME_MAX)
        return false;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)name[i] < 0x20 || (unsigned char)name[i] == 0x7f)
            return false;
    return true;
}

const char *keys_role_name(keys_role_t role)
{
    switch (role) {
    case KEYS_ROLE_NODE: return "node";
    case KEYS_ROLE_ROUTER: return "router";
    case KEYS_ROLE_ADMIN: return "admin";
    case KEYS_ROLE_MEMBER: break;
    }
    return "member";
}

keys_role_t keys_role_default(const char *name)
{
    /* Key files written before roles existed name the operator's key
     * "admin" (deploy/local-cluster.sh, the tests): those keep their
     * rights, and every other key loses only the admin requests. */
    return name != NULL && strncmp(name, "admin", 5) == 0 ? KEYS_ROLE_ADMIN : KEYS_ROLE_MEMBER;
}

/* Parses an explicit role word; returns false for anything else. */
static bool role_parse(const char *word, keys_role_t *role)
{
    static const keys_role_t roles[] = {KEYS_ROLE_NODE, KEYS_ROLE_ROUTER, KEYS_ROLE_ADMIN};
    for (size_t i = 0; i < SP_ARRAY_LEN(roles); i++)
        if (strcmp(word, keys_role_name(roles[i])) == 0) {
            *role = roles[i];
            return true;
        }
    return false;
}

int keys_allowlist_add(keys_allowlist_t *list, const char *public_z85, const char *name)
{
    return keys_allowlist_add_role(list, public_z85, name, keys_role_default(name));
}

int keys_allowlist_add_role(keys_allowlist_t *list, const char *public_z85, const char *name,
                            keys_role_t role)
{
    uint8_t raw[KEYS_RAW_LEN];
    if (list == NULL || !z85_to_raw(public_z85, raw) || !name_valid(name))
        return SP_EINVAL;
    int rc = 0;
    pthread_mutex_lock(&list->reload_mu);
    if (entries_find(&list->cur, raw) != NULL || entries_find_name(&list->cur, name) != NULL) {
        rc = -EEXIST;
        goto out;
    }
    char *interned = allowlist_intern(list, name);
    /* entries_push may move the array under a reader: write-lock for it. */
    pthread_rwlock_wrlock(&list->lock);
    allow_entry_t *e = entries_push(&list->cur);
    memcpy(e->raw, raw, KEYS_RAW_LEN);
    memcpy(e->z85, public_z85, sizeof e->z85);
    e->name = interned;
    e->role = role;
    pthread_rwlock_unlock(&list->lock);
out:
    pthread_mutex_unlock(&list->reload_mu);
    return rc;
}

/* Parses one non-comment line "<key> <name> [role]" into es. */
static int allowlist_parse_line(entries_t *es, const char *path, unsigned lineno, char *line,
                                char *err, size_t errlen)
{
    size_t key_len = strcspn(line, " \t");
    char *name = line + key_len;
    if (*name != '\0')
        *name++ = '\0';
    while (*name == ' ' || *name == '\t')
        name++;
    /* A last word naming a role is the role; otherwise the whole rest is the
     * name, as in files written before roles (names may hold blanks). */
    size_t end = strlen(name);
    while (end > 0 && (name[end - 1] == ' ' || name[end - 1] == '\t'))
        name[--end] = '\0';
    char *last = strrchr(name, ' ');
    char *tab = strrchr(name, '\t');
    if (tab != NULL && (last == NULL || tab > last))
        last = tab;
    keys_role_t role = KEYS_ROLE_MEMBER;
    bool explicit_role = false;
    if (last != NULL && role_parse(last + 1, &role)) {
        explicit_role = true;
        while (last > name && (last[-1] == ' ' || last[-1] == '\t'))
            last--;
        *last = '\0';
    }
    if (!explicit_role)
        role = keys_role_default(name);
    uint8_t raw[KEYS_RAW_LEN];
    if (!z85_to_raw(line, raw)) {
        sp_fmt(err, errlen,
               "%s:%u: first word is not a 40-character Z85 public key (it has %zu characters)",
               path, lineno, key_len);
        return SP_EKEY;
    }
    if (*name == '\0') {
        sp_fmt(err, errlen, "%s:%u: missing member name after the key", path, lineno);
        return SP_EKEY;
    }
    if (!name_valid(name)) {
        sp_fmt(err, errlen, "%s:%u: member name is too long or has control characters", path,
               lineno);
        return SP_EKEY;
    }
    const allow_entry_t *dup = entries_find(es, raw);
    if (dup != NULL) {
        sp_fmt(err, errlen, "%s:%u: key already listed on line %u (as '%s')", path, lineno,
               dup->line, dup->name);
        return SP_EKEY;
    }
    dup = entries_find_name(es, name);
    if (dup != NULL) {
        sp_fmt(err, errlen, "%s:%u: name '%s' already used on line %u", path, lineno, name,
               dup->line);
        return SP_EKEY;
    }
    allow_entry_t *e = entries_push(es);
    memcpy(e->raw, raw, KEYS_RAW_LEN);
    memcpy(e->z85, line, sizeof e->z85);
    e->name = sp_strdup(name);
    e->role = role;
    e->line = lineno;
    return 0;
}

/* A file that changes while it is read is read again, up to this many times
 * in a row, before the attempt is given up until the next check. */
#define ALLOWLIST_READ_TRIES 3

/* Reads and validates the allow-list at path into out (names owned by out)
 * and its identity, as fstat'ed before reading, into id. Refuses (SP_EKEY,
 * message in err) what cannot be opened or read, anything but a regular
 * file, a file others may write (anyone on the machine could let himself
 * in), and a malformed line or duplicate. Returns -EAGAIN, with *id_known
 * false, when the file kept changing while being read. Comments: only a '#'
 * at the start of a line begins one, since '#' is also a Z85 character (never
 * the first of a valid key, as no valid 5-character group starts with it). */
static int allowlist_read(const char *path, entries_t *out, sp_file_id_t *id, bool *id_known,
                          char *err, size_t errlen)
{
    static const file_rule_t rule = {.what = "allow-list",
                                     .a_what = "an allow-list",
                                     .max = KEYS_ALLOWLIST_MAX,
                                     .forbidden = S_IWOTH,
                                     .subject = "allow-list",
                                     .risk = "anyone on this machine add a key",
                                     .fix = "chmod o-w"};
    memset(out, 0, sizeof *out);
    *id_known = false;
    int rc = 0;
    char *text = NULL;
    size_t len = 0;
    for (int attempt = 0; attempt < ALLOWLIST_READ_TRIES; attempt++) {
        free(text);
        /* The identity comes from before the read: if the file changes
         * during it, the next check sees a different identity and reads it
         * again, rather than trusting a half-read version forever. */
        struct stat st;
        rc = read_checked(path, &rule, &st, id_known, &text, &len, err, errlen);
        if (*id_known)
            *id = sp_file_id_of(&st);
        if (rc != 0)
            goto out;
        if ((off_t)len == st.st_size)
            break;
        /* Written to in place while we read: what we got may be half of
         * one version and half of another. */
        *id_known = false;
        rc = -EAGAIN;
    }
    if (rc == -EAGAIN) {
        sp_fmt(err, errlen, "%s: allow-list kept changing while being read", path);
        goto out;
    }

    char *cursor = text;
    unsigned lineno = 0;
    for (char *line; (line = next_line(&cursor)) != NULL;) {
        lineno++;
        if (*line == '\0' || *line == '#')
            continue;
        rc = allowlist_parse_line(out, path, lineno, line, err, errlen);
        if (rc != 0) {
            entries_free_owned(out);
            break;
        }
    }
out:
    free(text);
    return rc;
}

keys_allowlist_t *keys_allowlist_load(const char *path, char *err, size_t errlen)
{
    entries_t es;
    sp_file_id_t id;
    bool id_known;
    if (allowlist_read(path, &es, &id, &id_known, err, errlen) != 0)
        return NULL;
    keys_allowlist_t *al = keys_allowlist_new();
    /* No other thread can see al yet, but intern's contract wants the lock. */
    pthread_mutex_lock(&al->reload_mu);
    for (size_t i = 0; i < es.n; i++) {
        char *owned = es.v[i].name;
        es.v[i].name = allowlist_intern(al, owned);
        free(owned);
    }
    al->cur = es;
    al->path = sp_strdup(path);
    al->applied = id;
    atomic_store(&al->next_check_ms, sp_now_ms() + KEYS_RELOAD_INTERVAL_MS);
    pthread_mutex_unlock(&al->reload_mu);
    return al;
}

/* Appends "name, name, ..." of the entries of a that b lacks to buf
 * (truncated with "..." when long); returns how many there were. */
static size_t entries_diff(const entries_t *a, const entries_t *b, char *buf, size_t size)
{
    size_t count = 0, used = 0;
    buf[0] = '\0';
    for (size_t i = 0; i < a->n; i++) {
        /* A key whose role changed counts as removed and added again. */
        const allow_entry_t *same = entries_find(b, a->v[i].raw);
        if (same != NULL && same->role == a->v[i].role)
            continue;
        count++;
        if (used + 4 >= size)
            continue;
        int n = snprintf(buf + used, size - used, "%s%s", count > 1 ? ", " : "", a->v[i].name);
        if (n < 0 || (size_t)n >= size - used) {
            snprintf(buf + (size - 4), 4, "...");
            used = size;
        } else {
            used += (size_t)n;
        }
    }
    return count;
}

/* Records a refused version and logs it unless this version was already
 * refused (a bad file stays bad until someone edits it again). Called with
 * reload_mu held. Returns rc. */
static int allowlist_refuse(keys_allowlist_t *al, const sp_file_id_t *id, int rc, const char *err)
{
    if (!al->refused || !sp_file_id_equal(id, &al->refused_id)) {
        /* cur.n is only changed under reload_mu, which we hold. */
        log_error("cluster keys %s; keeping the previous %zu keys", err, al->cur.n);
    }
    al->refused = true;
    al->refused_id = *id;
    al->refused_rc = rc;
    return rc;
}

/* Swaps in a freshly read version (names interned, old array freed) and
 * logs what changed. Called with reload_mu held. */
static void allowlist_apply(keys_allowlist_t *al, entries_t *es, const sp_file_id_t *id)
{
    for (size_t i = 0; i < es->n; i++) {
        char *owned = es->v[i].name;
        es->v[i].name = allowlist_intern(al, owned);
        free(owned);
    }
    char added[256], removed[256];
    size_t nadded = entries_diff(es, &al->cur, added, sizeof added);
    size_t nremoved = entries_diff(&al->cur, es, removed, sizeof removed);

    pthread_rwlock_wrlock(&al->lock);
    entries_t old = al->cur;
    al->cur = *es;
    pthread_rwlock_unlock(&al->lock);
    free(old.v); /* names are interned: only the array goes */
    memset(es, 0, sizeof *es);

    al->applied = *id;
    al->refused = false;
    log_info("cluster keys %s reloaded: %zu keys, %zu added%s%s%s, %zu removed%s%s%s", al->path,
             al->cur.n, nadded, nadded ? " (" : "", added, nadded ? ")" : "", nremoved,
             nremoved ? " (" : "", removed, nremoved ? ")" : "");
}

/* Compares the file with the version in force and reloads it if it
 * changed. Called with reload_mu held, on a list with a path. */
static int allowlist_check(keys_allowlist_t *al)
{
    char err[512];
    sp_file_id_t now = sp_file_id_stat(al->path);
    if (sp_file_id_equal(&now, &al->applied)) {
        al->refused = false; /* e.g. a bad version was renamed away again */
        return 0;
    }
    if (al->refused && sp_file_id_equal(&now, &al->refused_id))
        return al->refused_rc;
    if (now.missing) {
        snprintf(err, sizeof err, "%s: cannot stat allow-list: %s", al->path, strerror(now.err));
        return allowlist_refuse(al, &now, SP_EKEY, err);
    }

    entries_t es;
    sp_file_id_t id;
    bool id_known;
    int rc = allowlist_read(al->path, &es, &id, &id_known, err, sizeof err);
    if (rc == -EAGAIN)
        return rc; /* being written to: look again at the next check */
    if (rc == 0 && es.n == 0) {
        /* At start-up an empty file simply admits nobody; replacing a
         * working list, it is far likelier a file caught between truncation
         * and rewrite (or emptied by mistake) than a wish to lock every
         * member out of a running cluster. */
        snprintf(err, sizeof err, "%s: lists no keys", al->path);
        entries_free_owned(&es);
        rc = SP_EKEY;
    }
    if (rc != 0)
        return allowlist_refuse(al, id_known ? &id : &now, rc, err);
    if (sp_file_id_equal(&id, &al->applied)) {
        entries_free_owned(&es); /* replaced by itself between stat and open */
        return 0;
    }
    allowlist_apply(al, &es, &id);
    return 0;
}

/* The lookups' entry point: at most once per KEYS_RELOAD_INTERVAL_MS, one
 * thread checks the file. Lookups are logically const; the list is always
 * heap-allocated and never a const object, so casting const away is sound. */
static void allowlist_maybe_check(const keys_allowlist_t *list)
{
    keys_allowlist_t *al = (keys_allowlist_t *)list;
    if (al->path == NULL)
        return;
    int64_t now = sp_now_ms();
    if (now < atomic_load_explicit(&al->next_check_ms, memory_order_relaxed))
        return;
    /* Another thread checking right now covers us too. */
    if (pthread_mutex_trylock(&al->reload_mu) != 0)
        return;
    if (now >= atomic_load_explicit(&al->next_check_ms, memory_order_relaxed)) {
        atomic_store_explicit(&al->next_check_ms, now + KEYS_RELOAD_INTERVAL_MS,
                              memory_order_relaxed);
        allowlist_check(al);
    }
    pthread_mutex_unlock(&al->reload_mu);
}

int keys_allowlist_refresh(keys_allowlist_t *al)
{
    if (al == NULL || al->path == NULL)
        return 0;
    pthread_mutex_lock(&al->reload_mu);
    atomic_store_explicit(&al->next_check_ms, sp_now_ms() + KEYS_RELOAD_INTERVAL_MS,
                          memory_order_relaxed);
    int rc = allowlist_check(al);
    pthread_mutex_unlock(&al->reload_mu);
    return rc;
}

bool keys_allowlist_find_member(const keys_allowlist_t *list, const uint8_t key[KEYS_RAW_LEN],
                                const char **name, keys_role_t *role)
{
    const char *found = NULL;
    keys_role_t found_role = KEYS_ROLE_MEMBER;
    if (list != NULL) {
        allowlist_maybe_check(list);
        keys_allowlist_t *al = (keys_allowlist_t *)list;
        pthread_rwlock_rdlock(&al->lock);
        const allow_entry_t *e = entries_find(&al->cur, key);
        found = e ? e->name : NULL; /* interned: outlives the entry */
        found_role = e ? e->role : KEYS_ROLE_MEMBER;
        pthread_rwlock_unlock(&al->lock);
    }
    if (name != NULL)
        *name = found;
    if (role != NULL)
        *role = found_role;
    return found != NULL;
}

bool keys_allowlist_find_raw(const keys_allowlist_t *list, const uint8_t key[KEYS_RAW_LEN],
                             const char **name)
{
    return keys_allowlist_find_member(list, key, name, NULL);
}

bool keys_allowlist_find_name(const keys_allowlist_t *list, const char *name,
                              char out_z85[KEYS_Z85_LEN + 1])
{
    if (list == NULL || name == NULL)
        return false;
    allowlist_maybe_check(list);
    keys_allowlist_t *al = (keys_allowlist_t *)list;
    pthread_rwlock_rdlock(&al->lock);
    const allow_entry_t *e = entries_find_name(&al->cur, name);
    if (e != NULL && out_z85 != NULL)
        memcpy(out_z85, e->z85, KEYS_Z85_LEN + 1);
    pthread_rwlock_unlock(&al->lock);
    return e != NULL;
}

size_t keys_allowlist_count(const keys_allowlist_t *list)
{
    if (list == NULL)
        return 0;
    allowlist_maybe_check(list);
    keys_allowlist_t *al = (keys_allowlist_t *)list;
    pthread_rwlock_rdlock(&al->lock);
    size_t n = al->cur.n;
    pthread_rwlock_unlock(&al->lock);
    return n;
}

void keys_allowlist_destroy(keys_allowlist_t **listp)
{
    if (listp == NULL || *listp == NULL)
        return;
    keys_allowlist_t *al = *listp;
    free(al->cur.v);
    for (size_t i = 0; i < al->nnames; i++)
        free(al->names[i]);
    free(al->names);
    free(al->path);
    pthread_rwlock_destroy(&al->lock);
    pthread_mutex_destroy(&al->reload_mu);
    free(al);
    *listp = NULL;
}
