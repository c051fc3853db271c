/* keys.c - CURVE key pair files and the cluster's key allow-list (keys.h).
 *
 * Every function here may be called from any thread. Key files are small
 * "name = value" text files; a key pair file holds a secret, so it is created
 * with O_EXCL and mode 0600 and refused when group or others may touch it.
 * Buffers that held a secret key are wiped (explicit_bzero) before they are
 * freed. An allow-list is an array filled while loading and never changed
 * afterwards, which is what lets a ZAP thread read it without a lock. */
#include "keys.h"

#include "base.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
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

static void set_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
    if (err == NULL || errlen == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

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

static int write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
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
    int rc = write_all(fd, text, (size_t)len);
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
        rc = write_all(fd, text, (size_t)len);
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
            set_err(err, errlen, "%s:%u: expected 'public-key = <key>' or 'secret-key = <key>'",
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
            set_err(err, errlen, "%s:%u: unknown setting '%.40s'", path, lineno, line);
            return SP_EKEY;
        }
        if (*seen) {
            set_err(err, errlen, "%s:%u: %s given twice", path, lineno, line);
            return SP_EKEY;
        }
        if (!keys_z85_valid(value)) {
            set_err(err, errlen, "%s:%u: %s is not a valid 40-character Z85 key", path, lineno,
                    line);
            return SP_EKEY;
        }
        memcpy(dst, value, KEYS_Z85_LEN + 1);
        *seen = true;
    }
    return 0;
}

/* Opens and reads a key file. When secret is true the file must be a regular
 * file that group and others can neither read nor write. */
static int keyfile_load(const char *path, bool secret, keyfile_t *kf, char *err, size_t errlen)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        set_err(err, errlen, "%s: cannot open key file: %s", path, strerror(errno));
        return SP_EKEY;
    }
    int rc = 0;
    char *text = NULL;
    size_t len = 0;
    struct stat st;
    /* fstat on the open descriptor: the mode checked is the mode of the
     * file actually read, not of whatever the path names a moment later. */
    if (fstat(fd, &st) != 0) {
        set_err(err, errlen, "%s: cannot stat key file: %s", path, strerror(errno));
        rc = SP_EKEY;
        goto out;
    }
    if (!S_ISREG(st.st_mode)) {
        set_err(err, errlen, "%s: not a regular file", path);
        rc = SP_EKEY;
        goto out;
    }
    if (secret && (st.st_mode & 077) != 0) {
        set_err(err, errlen,
                "%s: key pair file has mode %04o, which lets group or others access the "
                "secret key; refusing it (run: chmod 600 %s)",
                path, (unsigned)(st.st_mode & 07777), path);
        rc = SP_EKEY;
        goto out;
    }
    rc = read_fd(fd, KEYS_FILE_MAX, &text, &len);
    if (rc != 0) {
        if (rc == SP_EKEY)
            set_err(err, errlen, "%s: not a key file (too large or binary)", path);
        else
            set_err(err, errlen, "%s: cannot read key file: %s", path, strerror(-rc));
        rc = SP_EKEY;
        goto out;
    }
    rc = keyfile_parse(path, text, kf, err, errlen);
out:
    if (text != NULL) {
        explicit_bzero(text, len);
        free(text);
    }
    close(fd);
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
        set_err(err, errlen, "%s: key pair file lacks %s", path,
                kf.has_public ? "secret-key" : "public-key");
        rc = SP_EKEY;
        goto out;
    }
    if (!pair_matches(kf.public_z85, kf.secret_z85)) {
        set_err(err, errlen, "%s: secret-key does not belong to the stated public-key", path);
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
        set_err(err, errlen, "%s: no public-key line", path);
        rc = SP_EKEY;
    }
    if (rc == 0)
        memcpy(out_z85, kf.public_z85, KEYS_Z85_LEN + 1);
    explicit_bzero(&kf, sizeof kf);
    return rc;
}

typedef struct {
    uint8_t raw[KEYS_RAW_LEN];
    char z85[KEYS_Z85_LEN + 1];
    char *name;
    unsigned line; /* where it was listed in the file; 0 when added in code */
} allow_entry_t;

struct keys_allowlist {
    allow_entry_t *entries;
    size_t count;
    size_t cap;
};

keys_allowlist_t *keys_allowlist_new(void)
{
    return sp_calloc(1, sizeof(keys_allowlist_t));
}

static const allow_entry_t *allowlist_lookup(const keys_allowlist_t *list,
                                             const uint8_t key[KEYS_RAW_LEN])
{
    /* A linear scan: a cluster lists tens or hundreds of members and the
     * lookup runs once per CURVE handshake, not per message. */
    for (size_t i = 0; i < list->count; i++)
        if (memcmp(list->entries[i].raw, key, KEYS_RAW_LEN) == 0)
            return &list->entries[i];
    return NULL;
}

static const allow_entry_t *allowlist_lookup_name(const keys_allowlist_t *list, const char *name)
{
    for (size_t i = 0; i < list->count; i++)
        if (strcmp(list->entries[i].name, name) == 0)
            return &list->entries[i];
    return NULL;
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

static int allowlist_add_at(keys_allowlist_t *list, const char *public_z85, const char *name,
                            unsigned line)
{
    uint8_t raw[KEYS_RAW_LEN];
    if (!z85_to_raw(public_z85, raw) || !name_valid(name))
        return SP_EINVAL;
    if (allowlist_lookup(list, raw) != NULL || allowlist_lookup_name(list, name) != NULL)
        return -EEXIST;
    if (list->count == list->cap) {
        list->cap = list->cap ? list->cap * 2 : 16;
        list->entries = sp_realloc(list->entries, list->cap * sizeof *list->entries);
    }
    allow_entry_t *e = &list->entries[list->count++];
    memcpy(e->raw, raw, KEYS_RAW_LEN);
    memcpy(e->z85, public_z85, sizeof e->z85);
    e->name = sp_strdup(name);
    e->line = line;
    return 0;
}

int keys_allowlist_add(keys_allowlist_t *list, const char *public_z85, const char *name)
{
    return allowlist_add_at(list, public_z85, name, 0);
}

/* Parses one non-comment line "<key> <name>" into the list. */
static int allowlist_parse_line(keys_allowlist_t *list, const char *path, unsigned lineno,
                                char *line, char *err, size_t errlen)
{
    size_t key_len = strcspn(line, " \t");
    char *name = line + key_len;
    if (*name != '\0')
        *name++ = '\0';
    while (*name == ' ' || *name == '\t')
        name++;
    uint8_t raw[KEYS_RAW_LEN];
    if (!z85_to_raw(line, raw)) {
        set_err(err, errlen,
                "%s:%u: first word is not a 40-character Z85 public key (it has %zu characters)",
                path, lineno, key_len);
        return SP_EKEY;
    }
    if (*name == '\0') {
        set_err(err, errlen, "%s:%u: missing member name after the key", path, lineno);
        return SP_EKEY;
    }
    if (!name_valid(name)) {
        set_err(err, errlen, "%s:%u: member name is too long or has control characters", path,
                lineno);
        return SP_EKEY;
    }
    const allow_entry_t *dup = allowlist_lookup(list, raw);
    if (dup != NULL) {
        set_err(err, errlen, "%s:%u: key already listed on line %u (as '%s')", path, lineno,
                dup->line, dup->name);
        return SP_EKEY;
    }
    dup = allowlist_lookup_name(list, name);
    if (dup != NULL) {
        set_err(err, errlen, "%s:%u: name '%s' already used on line %u", path, lineno, name,
                dup->line);
        return SP_EKEY;
    }
    return allowlist_add_at(list, line, name, lineno);
}

/* Only a '#' at the start of a line begins a comment: '#' is also a Z85
 * character and may appear inside a key (never as its first character,
 * since no valid 5-character group starts with '#'). */
keys_allowlist_t *keys_allowlist_load(const char *path, char *err, size_t errlen)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        set_err(err, errlen, "%s: cannot open allow-list: %s", path, strerror(errno));
        return NULL;
    }
    char *text = NULL;
    size_t len = 0;
    int rc = read_fd(fd, KEYS_ALLOWLIST_MAX, &text, &len);
    close(fd);
    if (rc != 0) {
        if (rc == SP_EKEY)
            set_err(err, errlen, "%s: not an allow-list (too large or binary)", path);
        else
            set_err(err, errlen, "%s: cannot read allow-list: %s", path, strerror(-rc));
        return NULL;
    }

    keys_allowlist_t *list = keys_allowlist_new();
    char *cursor = text;
    unsigned lineno = 0;
    for (char *line; (line = next_line(&cursor)) != NULL;) {
        lineno++;
        if (*line == '\0' || *line == '#')
            continue;
        if (allowlist_parse_line(list, path, lineno, line, err, errlen) != 0) {
            keys_allowlist_destroy(&list);
            break;
        }
    }
    free(text);
    return list;
}

bool keys_allowlist_find_raw(const keys_allowlist_t *list, const uint8_t key[KEYS_RAW_LEN],
                             const char **name)
{
    const allow_entry_t *e = list ? allowlist_lookup(list, key) : NULL;
    if (name != NULL)
        *name = e ? e->name : NULL;
    return e != NULL;
}

bool keys_allowlist_find_name(const keys_allowlist_t *list, const char *name,
                              char out_z85[KEYS_Z85_LEN + 1])
{
    const allow_entry_t *e = list && name ? allowlist_lookup_name(list, name) : NULL;
    if (e != NULL && out_z85 != NULL)
        memcpy(out_z85, e->z85, KEYS_Z85_LEN + 1);
    return e != NULL;
}

size_t keys_allowlist_count(const keys_allowlist_t *list)
{
    return list ? list->count : 0;
}

void keys_allowlist_destroy(keys_allowlist_t **listp)
{
    if (listp == NULL || *listp == NULL)
        return;
    keys_allowlist_t *list = *listp;
    for (size_t i = 0; i < list->count; i++)
        free(list->entries[i].name);
    free(list->entries);
    free(list);
    *listp = NULL;
}
