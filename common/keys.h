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
 *     <40 Z85 characters> <member name> [node|router|admin]
 * Keys and names are both unique within a list. The optional last word is
 * the key's role (README "Access control and audit": what each role may ask
 * of a node). Without one the name is the rest of the line, as before roles
 * existed, and the role follows from it: a name beginning with "admin" is
 * an admin, any other key a member (what a node or a router may ask, never
 * admin requests), so a key file written before roles keeps working and
 * only its admin keys may run status and drain.
 *
 * Reload. An allow-list loaded from a file follows the file while the
 * process runs, so a machine joins a running cluster when its key is
 * appended to the file on every member, and leaves it when its line is
 * deleted. Every lookup (keys_allowlist_find_raw, _find_name, _count) first
 * checks, at most once per KEYS_RELOAD_INTERVAL_MS of the monotonic clock,
 * whether the file changed (one stat: device, inode, size, mtime); if it did,
 * the file is read and validated in full and its members replace the current
 * ones at once (lookups on other threads see either the old list or the new
 * one, never a mix). A new version that cannot be read or parsed, is not a
 * regular file, is writable by others, or lists no keys at all (likely a
 * file caught between truncation and rewrite) is refused: the previous
 * members stay in force, one error is logged per refused version ("cluster
 * keys FILE:LINE: ...; keeping the previous N keys"), and the next edit is
 * tried afresh. Each applied reload logs one info line with the members
 * added and removed. Replace the file atomically (write a temporary file in
 * the same directory, then rename it over the old one); an in-place rewrite
 * is picked up as well, but a check landing mid-write may briefly see part
 * of it. Lists built in code (keys_allowlist_new) never reload.
 *
 * What a removal does to connections: ZeroMQ authenticates a CURVE peer only
 * during the handshake, and offers no way to close one peer's established
 * session, so removing a key refuses its new handshakes but does not tear
 * down a session already open. (The transport also re-checks the key of
 * every request, so requests on such a session are dropped from the next
 * check on, and the peer's next reconnect is refused.)
 *
 * Every function may be called from any thread, concurrently (a ZAP handler
 * thread, the membership thread and worker threads all look up), while the
 * list lives. */
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

/* What a listed key may ask of a node (node/node.c enforces it). */
typedef enum {
    KEYS_ROLE_MEMBER = 0, /* no role word, name not "admin...": node or router rights */
    KEYS_ROLE_NODE,       /* storage node: gossip, repair (partition digests/lists, get),
                             member status for a cluster status */
    KEYS_ROLE_ROUTER,     /* router: gossip, put, get, list, find */
    KEYS_ROLE_ADMIN,      /* operator: status, drain, stats and direct object access */
} keys_role_t;

/* "member", "node", "router" or "admin". */
const char *keys_role_name(keys_role_t role);
/* The role a key without a role word gets from its name. */
keys_role_t keys_role_default(const char *name);

/* How often lookups look at the allow-list file for changes. */
#define KEYS_RELOAD_INTERVAL_MS 1000

/* Loads an allow-list file, which the list then follows (see Reload above).
 * Returns NULL and fills err (file, line, reason) on a malformed line, a
 * duplicate key or a duplicate name, or a file that is not a regular file or
 * is writable by others. The caller owns the result. */
keys_allowlist_t *keys_allowlist_load(const char *path, char *err, size_t errlen);
/* An empty list, for building one in code (tests, tools). */
keys_allowlist_t *keys_allowlist_new(void);
/* Adds a member; returns 0, SP_EINVAL for a bad key or name (empty, over 128
 * characters, or with control characters), or -EEXIST if the key or the
 * name is already listed. On a list loaded from a file, the next reload
 * replaces what was added with the file's contents. keys_allowlist_add
 * gives the member its name's default role. */
int keys_allowlist_add(keys_allowlist_t *list, const char *public_z85, const char *name);
int keys_allowlist_add_role(keys_allowlist_t *list, const char *public_z85, const char *name,
                            keys_role_t role);
/* Re-reads the file now if it changed, regardless of when it was last
 * checked. Returns 0 if the file is unchanged or was reloaded, SP_EKEY if
 * the current version was refused (also on later calls, until it changes
 * again; the error is logged only the first time), or -EAGAIN if the file
 * kept changing while it was read (nothing was decided; try again). A list
 * built in code returns 0. */
int keys_allowlist_refresh(keys_allowlist_t *al);

/* Looks up a raw 32-byte public key (as a ZAP handler receives it). Returns
 * true if listed; *name (may be NULL) then points at the member's name,
 * valid while the list lives, even after a reload removed the member. */
bool keys_allowlist_find_raw(const keys_allowlist_t *list, const uint8_t key[KEYS_RAW_LEN],
                             const char **name);
/* Like keys_allowlist_find_raw, and also gives the member's current role
 * (which a reload may change: look it up per request, not per session). */
bool keys_allowlist_find_member(const keys_allowlist_t *list, const uint8_t key[KEYS_RAW_LEN],
                                const char **name, keys_role_t *role);
/* The number of members now listed. */
size_t keys_allowlist_count(const keys_allowlist_t *list);
/* Looks up a member by name; copies its Z85 public key into out and returns
 * true if listed. */
bool keys_allowlist_find_name(const keys_allowlist_t *list, const char *name,
                              char out_z85[KEYS_Z85_LEN + 1]);
void keys_allowlist_destroy(keys_allowlist_t **listp);

#endif
