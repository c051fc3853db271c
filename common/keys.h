/* keys.h - CURVE key pairs and the cluster's key allow-list.
 *
 * Key pair file (secret; must be mode 0600 or stricter, else refused):
 *     # ShardPACS CURVE key pair
 *     public-key = <40 Z85 characters>
 *     secret-key = <40 Z85 characters>
 * Public key file (what other members need to reach this one):
 *     public-key = <40 Z85 characters>
 * Cluster allow-list file, one member per line; a line whose first
 * non-blank character is '#' is a comment ('#' is also a Z85 character, so
 * there are no trailing comments):
 *     <40 Z85 characters> <member name: the rest of the line>
 * Keys and names are both unique within a list.
 *
 * A keys_allowlist_t is immutable once loaded, so any thread (including a
 * ZAP handler thread) may query it while it lives. */
#ifndef SP_KEYS_H
#define SP_KEYS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define KEYS_Z85_LEN 40
#define KEYS_RAW_LEN 32

typedef struct {
    char public_z85[KEYS_Z85_LEN + 1];
    char secret_z85[KEYS_Z85_LEN + 1];
} keys_pair_t;

/* Makes a fresh key pair (zmq_curve_keypair). Returns 0 or a negative code. */
int keys_generate(keys_pair_t *out);

/* Writes a key pair file with mode 0600, refusing to replace an existing
 * file (-EEXIST). Returns 0 or a negative code. */
int keys_write_pair(const char *path, const keys_pair_t *kp);
/* Writes a public key file (mode 0644), replacing any existing one. */
int keys_write_public(const char *path, const char *public_z85);

/* Loads a key pair file. Refuses (SP_EKEY) a file readable or writable by
 * group or others, a malformed file, or a secret that does not produce the
 * stated public key. On error a message naming the file goes into err. */
int keys_load_pair(const char *path, keys_pair_t *out, char *err, size_t errlen);
/* Loads a public key file, or accepts a key pair file and takes its public
 * half. */
int keys_load_public(const char *path, char out_z85[KEYS_Z85_LEN + 1], char *err, size_t errlen);

/* True if text is 40 valid Z85 characters that decode to a 32-byte key. */
bool keys_z85_valid(const char *text);

typedef struct keys_allowlist keys_allowlist_t;

/* Loads an allow-list file. Returns NULL and fills err (file, line, reason)
 * on a malformed line, a duplicate key or a duplicate name. The caller owns
 * the result. */
keys_allowlist_t *keys_allowlist_load(const char *path, char *err, size_t errlen);
/* An empty list, for building one in code (tests, tools). */
keys_allowlist_t *keys_allowlist_new(void);
/* Adds a member; returns 0, SP_EINVAL for a bad key or name (empty, over 128
 * characters, or with control characters), or -EEXIST if the key or the
 * name is already listed. */
int keys_allowlist_add(keys_allowlist_t *list, const char *public_z85, const char *name);
/* Looks up a raw 32-byte public key (as a ZAP handler receives it). Returns
 * true if listed; *name (may be NULL) then points at the member's name,
 * valid while the list lives. */
bool keys_allowlist_find_raw(const keys_allowlist_t *list, const uint8_t key[KEYS_RAW_LEN],
                             const char **name);
size_t keys_allowlist_count(const keys_allowlist_t *list);
/* Looks up a member by name; copies its Z85 public key into out and returns
 * true if listed. */
bool keys_allowlist_find_name(const keys_allowlist_t *list, const char *name,
                              char out_z85[KEYS_Z85_LEN + 1]);
void keys_allowlist_destroy(keys_allowlist_t **listp);

#endif
