/* auth.h - who may use the router's HTTP front door: a users file of
 * argon2id password hashes (libsodium's crypto_pwhash_str) for HTTP Basic,
 * and bearer tokens signed with a key the routers share (HMAC-SHA256), so
 * any router verifies a token another one issued without asking anybody.
 *
 * Users file: one "NAME:HASH" line per user (HASH as crypto_pwhash_str
 * writes it, "$argon2id$..."); '#' starts a comment. It is re-read when it
 * changes (checked at most once a second), so adding a user needs no
 * restart. Token key file: 64 hex digits (32 bytes), mode 0600.
 *
 * Token: "spt1.<payload>.<mac>", base64url without padding, payload
 * "<expiry unix seconds>:<user>", mac HMAC-SHA256(key, "spt1." payload).
 *
 * argon2id is slow on purpose (tens of ms, 64 MiB): a Basic credential that
 * verified is remembered (a keyed BLAKE2b of the header value, for 60 s) so
 * a viewer sending it on every request pays once.
 *
 * Thread-safe: every function may be called from any pool thread. */
#ifndef SP_AUTH_H
#define SP_AUTH_H

#include <stddef.h>
#include <stdint.h>

typedef struct auth auth_t;

/* Loads the users file (must exist and be readable; may be empty) and the
 * token key file (token_key_path NULL or "": bearer tokens disabled).
 * Returns NULL with a message in err. */
auth_t *auth_new(const char *users_path, const char *token_key_path, int token_ttl_s, char *err,
                 size_t errlen);
void auth_destroy(auth_t **ap);

/* Checks an Authorization header value ("Basic ..." or "Bearer ...").
 * Returns 0 with the user's name in user, SP_EKEY when refused (bad or
 * unknown credentials, expired or forged token), SP_EINVAL when the header
 * is malformed or missing (NULL). */
int auth_check(auth_t *a, const char *authorization, char *user, size_t userlen);

/* Issues a token for user (malloc'd, caller frees) valid token_ttl_s.
 * Returns 0, or SP_EINVAL when tokens are disabled. */
int auth_issue_token(auth_t *a, const char *user, char **token, int64_t *expires_unix);

/* Adds or replaces NAME in a users file (created 0600 if missing) with the
 * argon2id hash of password; the file is rewritten atomically. Returns 0 or
 * a negative code with a message in err. */
int auth_user_add(const char *path, const char *name, const char *password, char *err,
                  size_t errlen);

/* Writes a new random token key file (0600; refuses to overwrite). */
int auth_token_key_new(const char *path, char *err, size_t errlen);

#endif
