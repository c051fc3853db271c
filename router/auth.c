/* auth.c - users file, HTTP Basic and signed bearer tokens (auth.h). */
#include "auth.h"

#include "../common/base.h"
#include "../common/log.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define AUTH_NAME_MAX 64
#define AUTH_CACHE_SLOTS 64
#define AUTH_CACHE_MS 60000
#define TOKEN_PREFIX "spt1."

typedef struct {
    char name[AUTH_NAME_MAX + 1];
    char hash[crypto_pwhash_STRBYTES];
} auth_user_t;

/* A Basic header value that verified recently: its keyed digest, the user
 * and when it stops counting. */
typedef struct {
    uint8_t digest[32];
    char name[AUTH_NAME_MAX + 1];
    int64_t until_ms;
} auth_cached_t;

struct auth {
    char *users_path;
    pthread_mutex_t lock; /* guards everything below */
    auth_user_t *users;
    size_t nusers;
    struct timespec users_mtime;
    off_t users_size;
    int64_t checked_ms; /* last time the file's mtime was looked at */
    uint8_t cache_key[crypto_generichash_KEYBYTES];
    auth_cached_t cache[AUTH_CACHE_SLOTS];
    unsigned cache_next;
    /* read-only after auth_new */
    uint8_t token_key[crypto_auth_hmacsha256_KEYBYTES];
    int tokens;
    int token_ttl_s;
    char dummy_hash[crypto_pwhash_STRBYTES]; /* verified against for unknown users */
};

static bool name_valid(const char *name)
{
    size_t n = strlen(name);
    if (n == 0 || n > AUTH_NAME_MAX)
        return false;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)name[i];
        if (c <= ' ' || c == ':' || c >= 0x7f)
            return false;
    }
    return true;
}

/* Parses a users file into a fresh array. Returns 0 or a negative code. */
static int users_parse(const char *path, auth_user_t **out, size_t *n, struct stat *st, char *err,
                       size_t errlen)
{
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        sp_fmt(err, errlen, "users file %s: %s", path, strerror(errno));
        return -errno;
    }
    if (fstat(fileno(f), st) != 0) {
        fclose(f);
        return -errno;
    }
    auth_user_t *users = NULL;
    size_t count = 0, cap = 0;
    char line[512];
    int lineno = 0, rc = 0;
    while (fgets(line, sizeof line, f)) {
        lineno++;
        size_t len = strcspn(line, "\r\n");
        line[len] = '\0';
        if (line[0] == '\0' || line[0] == '#')
            continue;
        char *colon = strchr(line, ':');
        if (colon == NULL || strncmp(colon + 1, "$argon2id$", 10) != 0 ||
            strlen(colon + 1) >= crypto_pwhash_STRBYTES) {
            sp_fmt(err, errlen, "%s:%d: expected NAME:$argon2id$...", path, lineno);
            rc = SP_ECONFIG;
            break;
        }
        *colon = '\0';
        if (!name_valid(line)) {
            sp_fmt(err, errlen, "%s:%d: bad user name", path, lineno);
            rc = SP_ECONFIG;
            break;
        }
        if (count == cap) {
            cap = cap ? cap * 2 : 8;
            users = sp_realloc(users, cap * sizeof *users);
        }
        sp_strlcpy(users[count].name, line, sizeof users[count].name);
        sp_strlcpy(users[count].hash, colon + 1, sizeof users[count].hash);
        count++;
    }
    fclose(f);
    if (rc != 0) {
        free(users);
        return rc;
    }
    *out = users;
    *n = count;
    return 0;
}

/* Re-reads the users file when it changed (at most once a second). A file
 * that became unreadable or malformed keeps the users last loaded. Called
 * with the lock held. */
static void users_refresh(auth_t *a)
{
    int64_t now = sp_now_ms();
    if (now - a->checked_ms < 1000)
        return;
    a->checked_ms = now;
    struct stat st;
    if (stat(a->users_path, &st) != 0)
        return;
    if (st.st_mtim.tv_sec == a->users_mtime.tv_sec &&
        st.st_mtim.tv_nsec == a->users_mtime.tv_nsec && st.st_size == a->users_size)
        return;
    auth_user_t *users;
    size_t n;
    char err[256];
    if (users_parse(a->users_path, &users, &n, &st, err, sizeof err) != 0) {
        log_warn("auth: %s (keeping the %zu users loaded before)", err, a->nusers);
        return;
    }
    free(a->users);
    a->users = users;
    a->nusers = n;
    a->users_mtime = st.st_mtim;
    a->users_size = st.st_size;
    memset(a->cache, 0, sizeof a->cache); /* a changed password must not stay valid */
    log_info("auth: %zu users loaded from %s", n, a->users_path);
}

static int hex_value(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

auth_t *auth_new(const char *users_path, const char *token_key_path, int token_ttl_s, char *err,
                 size_t errlen)
{
    if (sodium_init() < 0) {
        sp_fmt(err, errlen, "libsodium did not initialise");
        return NULL;
    }
    auth_t *a = sp_calloc(1, sizeof *a);
    a->users_path = sp_strdup(users_path);
    a->token_ttl_s = token_ttl_s;
    pthread_mutex_init(&a->lock, NULL);
    randombytes_buf(a->cache_key, sizeof a->cache_key);
    uint8_t random_bytes[16];
    char random_password[33];
    randombytes_buf(random_bytes, sizeof random_bytes);
    sodium_bin2hex(random_password, sizeof random_password, random_bytes, sizeof random_bytes);
    if (crypto_pwhash_str(a->dummy_hash, random_password, 32, crypto_pwhash_OPSLIMIT_INTERACTIVE,
                          crypto_pwhash_MEMLIMIT_INTERACTIVE) != 0) {
        sp_fmt(err, errlen, "argon2id hashing failed (out of memory?)");
        goto fail;
    }
    struct stat st;
    if (users_parse(users_path, &a->users, &a->nusers, &st, err, errlen) != 0)
        goto fail;
    a->users_mtime = st.st_mtim;
    a->users_size = st.st_size;
    a->checked_ms = sp_now_ms();
    if (token_key_path && token_key_path[0]) {
        FILE *f = fopen(token_key_path, "r");
        char text[130] = {0};
        if (f == NULL) {
            sp_fmt(err, errlen, "token key %s: %s", token_key_path, strerror(errno));
            goto fail;
        }
        size_t got = fread(text, 1, sizeof text - 1, f);
        struct stat kst;
        int mode_ok = fstat(fileno(f), &kst) == 0 && (kst.st_mode & 077) == 0;
        fclose(f);
        while (got > 0 && (text[got - 1] == '\n' || text[got - 1] == ' ' || text[got - 1] == '\r'))
            got--;
        if (!mode_ok) {
            sp_fmt(err, errlen, "token key %s must not be readable by group or others (chmod 600)",
                   token_key_path);
            goto fail;
        }
        if (got != 2 * sizeof a->token_key) {
            sp_fmt(err, errlen, "token key %s: expected 64 hex digits", token_key_path);
            goto fail;
        }
        for (size_t i = 0; i < sizeof a->token_key; i++) {
            int hi = hex_value(text[2 * i]), lo = hex_value(text[2 * i + 1]);
            if (hi < 0 || lo < 0) {
                sp_fmt(err, errlen, "token key %s: expected 64 hex digits", token_key_path);
                goto fail;
            }
            a->token_key[i] = (uint8_t)(hi << 4 | lo);
        }
        sodium_memzero(text, sizeof text);
        a->tokens = 1;
    }
    return a;
fail:
    auth_destroy(&a);
    return NULL;
}

void auth_destroy(auth_t **ap)
{
    auth_t *a = *ap;
    if (a == NULL)
        return;
    sodium_memzero(a->token_key, sizeof a->token_key);
    free(a->users);
    free(a->users_path);
    pthread_mutex_destroy(&a->lock);
    free(a);
    *ap = NULL;
}

static int check_basic(auth_t *a, const char *b64, char *user, size_t userlen)
{
    uint8_t digest[32];
    crypto_generichash(digest, sizeof digest, (const uint8_t *)b64, strlen(b64), a->cache_key,
                       sizeof a->cache_key);
    int64_t now = sp_now_ms();
    pthread_mutex_lock(&a->lock);
    users_refresh(a);
    for (size_t i = 0; i < AUTH_CACHE_SLOTS; i++) {
        auth_cached_t *c = &a->cache[i];
        if (c->until_ms > now && sodium_memcmp(c->digest, digest, sizeof digest) == 0) {
            sp_strlcpy(user, c->name, userlen);
            pthread_mutex_unlock(&a->lock);
            return 0;
        }
    }
    pthread_mutex_unlock(&a->lock);

    char decoded[512];
    size_t dlen = 0;
    if (strlen(b64) >= 680 ||
        sodium_base642bin((unsigned char *)decoded, sizeof decoded - 1, b64, strlen(b64), " ",
                          &dlen, NULL, sodium_base64_VARIANT_ORIGINAL) != 0)
        return SP_EINVAL;
    decoded[dlen] = '\0';
    char *colon = memchr(decoded, ':', dlen);
    if (colon == NULL)
        return SP_EINVAL;
    *colon = '\0';
    const char *password = colon + 1;
    size_t plen = dlen - (size_t)(password - decoded);
    char hash[crypto_pwhash_STRBYTES] = {0};
    pthread_mutex_lock(&a->lock);
    for (size_t i = 0; i < a->nusers; i++)
        if (strcmp(a->users[i].name, decoded) == 0)
            memcpy(hash, a->users[i].hash, sizeof hash);
    pthread_mutex_unlock(&a->lock);
    /* An unknown user costs the same as a wrong password: verify against a
     * hash of a random password so the timing does not tell which names
     * exist. */
    bool known = hash[0] != '\0';
    int ok = crypto_pwhash_str_verify(known ? hash : a->dummy_hash, password, plen) == 0 && known;
    if (ok)
        sp_strlcpy(user, decoded, userlen); /* the name, before the colon */
    sodium_memzero(decoded, sizeof decoded);
    if (!ok)
        return SP_EKEY;
    pthread_mutex_lock(&a->lock);
    auth_cached_t *c = &a->cache[a->cache_next++ % AUTH_CACHE_SLOTS];
    memcpy(c->digest, digest, sizeof digest);
    sp_strlcpy(c->name, user, sizeof c->name);
    c->until_ms = now + AUTH_CACHE_MS;
    pthread_mutex_unlock(&a->lock);
    return 0;
}

static int check_bearer(auth_t *a, const char *token, char *user, size_t userlen)
{
    if (!a->tokens || strncmp(token, TOKEN_PREFIX, strlen(TOKEN_PREFIX)) != 0)
        return SP_EKEY;
    const char *payload = token + strlen(TOKEN_PREFIX);
    const char *dot = strchr(payload, '.');
    if (dot == NULL || (size_t)(dot - payload) > 400)
        return SP_EKEY;
    uint8_t mac[crypto_auth_hmacsha256_BYTES];
    size_t maclen = 0;
    if (sodium_base642bin(mac, sizeof mac, dot + 1, strlen(dot + 1), NULL, &maclen, NULL,
                          sodium_base64_VARIANT_URLSAFE_NO_PADDING) != 0 ||
        maclen != sizeof mac)
        return SP_EKEY;
    if (crypto_auth_hmacsha256_verify(mac, (const uint8_t *)token, (size_t)(dot - token),
                                      a->token_key) != 0)
        return SP_EKEY;
    char body[320];
    size_t blen = 0;
    if (sodium_base642bin((uint8_t *)body, sizeof body - 1, payload, (size_t)(dot - payload), NULL,
                          &blen, NULL, sodium_base64_VARIANT_URLSAFE_NO_PADDING) != 0)
        return SP_EKEY;
    body[blen] = '\0';
    char *end = NULL;
    long long expiry = strtoll(body, &end, 10);
    if (end == body || *end != ':' || !name_valid(end + 1))
        return SP_EKEY;
    if ((long long)time(NULL) >= expiry)
        return SP_EKEY;
    sp_strlcpy(user, end + 1, userlen);
    return 0;
}

int auth_check(auth_t *a, const char *authorization, char *user, size_t userlen)
{
    if (authorization == NULL)
        return SP_EINVAL;
    while (*authorization == ' ')
        authorization++;
    if (strncasecmp(authorization, "Basic ", 6) == 0) {
        const char *v = authorization + 6;
        while (*v == ' ')
            v++;
        return check_basic(a, v, user, userlen);
    }
    if (strncasecmp(authorization, "Bearer ", 7) == 0) {
        const char *v = authorization + 7;
        while (*v == ' ')
            v++;
        return check_bearer(a, v, user, userlen);
    }
    return SP_EINVAL;
}

int auth_issue_token(auth_t *a, const char *user, char **token, int64_t *expires_unix)
{
    if (!a->tokens)
        return SP_EINVAL;
    int64_t expiry = (int64_t)time(NULL) + a->token_ttl_s;
    char body[128];
    sp_fmt(body, sizeof body, "%lld:%s", (long long)expiry, user);
    size_t b64len =
        sodium_base64_ENCODED_LEN(strlen(body), sodium_base64_VARIANT_URLSAFE_NO_PADDING);
    size_t maclen64 = sodium_base64_ENCODED_LEN(crypto_auth_hmacsha256_BYTES,
                                                sodium_base64_VARIANT_URLSAFE_NO_PADDING);
    char *t = sp_malloc(strlen(TOKEN_PREFIX) + b64len + 1 + maclen64 + 1);
    strcpy(t, TOKEN_PREFIX);
    sodium_bin2base64(t + strlen(TOKEN_PREFIX), b64len, (const uint8_t *)body, strlen(body),
                      sodium_base64_VARIANT_URLSAFE_NO_PADDING);
    size_t signed_len = strlen(t);
    uint8_t mac[crypto_auth_hmacsha256_BYTES];
    crypto_auth_hmacsha256(mac, (const uint8_t *)t, signed_len, a->token_key);
    t[signed_len] = '.';
    sodium_bin2base64(t + signed_len + 1, maclen64, mac, sizeof mac,
                      sodium_base64_VARIANT_URLSAFE_NO_PADDING);
    *token = t;
    *expires_unix = expiry;
    return 0;
}

int auth_user_add(const char *path, const char *name, const char *password, char *err,
                  size_t errlen)
{
    if (sodium_init() < 0)
        return SP_EINVAL;
    if (!name_valid(name)) {
        sp_fmt(err, errlen, "user name must be 1 to %d printable characters without ':'",
               AUTH_NAME_MAX);
        return SP_EINVAL;
    }
    char hash[crypto_pwhash_STRBYTES];
    if (crypto_pwhash_str(hash, password, strlen(password), crypto_pwhash_OPSLIMIT_INTERACTIVE,
                          crypto_pwhash_MEMLIMIT_INTERACTIVE) != 0) {
        sp_fmt(err, errlen, "argon2id hashing failed (out of memory?)");
        return SP_EINVAL;
    }
    char tmp[4096];
    sp_fmt(tmp, sizeof tmp, "%s.tmp", path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) {
        sp_fmt(err, errlen, "%s: %s", tmp, strerror(errno));
        return -errno;
    }
    FILE *out = fdopen(fd, "w");
    FILE *in = fopen(path, "r");
    char line[512];
    size_t nlen = strlen(name);
    while (in && fgets(line, sizeof line, in)) {
        if (strncmp(line, name, nlen) == 0 && line[nlen] == ':')
            continue; /* replaced below */
        fputs(line, out);
    }
    if (in)
        fclose(in);
    fprintf(out, "%s:%s\n", name, hash);
    int rc = fflush(out) == 0 && fsync(fileno(out)) == 0 ? 0 : -errno;
    fclose(out);
    if (rc == 0 && rename(tmp, path) != 0)
        rc = -errno;
    if (rc != 0) {
        sp_fmt(err, errlen, "cannot write %s: %s", path, strerror(-rc));
        unlink(tmp);
    }
    return rc;
}

int auth_token_key_new(const char *path, char *err, size_t errlen)
{
    if (sodium_init() < 0)
        return SP_EINVAL;
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0600);
    if (fd < 0) {
        sp_fmt(err, errlen, "%s: %s", path, strerror(errno));
        return -errno;
    }
    uint8_t key[crypto_auth_hmacsha256_KEYBYTES];
    randombytes_buf(key, sizeof key);
    char hex[2 * sizeof key + 2];
    sodium_bin2hex(hex, sizeof hex, key, sizeof key);
    strcat(hex, "\n");
    ssize_t w = write(fd, hex, strlen(hex));
    sodium_memzero(key, sizeof key);
    sodium_memzero(hex, sizeof hex);
    int rc = w == (ssize_t)(2 * sizeof key + 1) && fsync(fd) == 0 ? 0 : -EIO;
    close(fd);
    if (rc != 0)
        sp_fmt(err, errlen, "cannot write %s", path);
    return rc;
}
