/* access.h - the router's DICOM access rules: per calling AE title (and
 * peer address, and TLS client certificate subject), which operations a
 * peer may use and to which C-MOVE destinations (README "Access control and
 * audit").
 *
 * Rule file ([access] rules), one rule per line, first match wins:
 *     AE_PATTERN  [from=ADDRESS_PATTERN]  [subject=SUBJECT_PATTERN]
 *                 allow=OP[,OP...]  [move_to=AE[,AE...]]
 * OP is echo, store, find, get, move, all or none. A pattern matches the
 * whole value; '*' stands for any run of characters, '?' for one. A rule
 * with subject= matches only TLS connections whose client certificate
 * subject matches (subject=* : any certificate); one without matches plain
 * and TLS connections alike. move_to lists the C-MOVE destinations (AE
 * titles of the [destinations] table, or patterns) the rule's peers may
 * move to; without it, any destination of the table. A value holding blanks
 * is written in double quotes (subject="CN=viewer, O=Hospital"). A '#'
 * starting a word starts a comment, to the end of the line.
 *
 * A peer no rule matches may do nothing: its association is rejected
 * (A-ASSOCIATE-RJ, calling AE title not recognized), as is one whose first
 * matching rule allows nothing. Without a rules file every peer may do
 * everything (what a new install admits: [dicom] allowed_callers still
 * applies before the rules).
 *
 * Reload: like the cluster key file (keys.h), lookups check the file at
 * most once a second (one stat); a changed file is read and validated in
 * full, then replaces the rules in force at once. A new version that cannot
 * be read, has a malformed line, or holds no rule at all (likely a file
 * caught between truncation and rewrite) is refused and logged once, and
 * the previous rules stay in force.
 *
 * Every function may be called from any thread, concurrently. */
#ifndef SP_ACCESS_H
#define SP_ACCESS_H

#include <stdbool.h>
#include <stddef.h>

/* Operations, as bits of a rule's allow set. */
#define ACCESS_ECHO 0x01u
#define ACCESS_STORE 0x02u
#define ACCESS_FIND 0x04u
#define ACCESS_GET 0x08u
#define ACCESS_MOVE 0x10u
#define ACCESS_ALL 0x1Fu

/* Who asks. Every field may be NULL (subject: a plain connection). */
typedef struct {
    const char *ae_title;
    const char *address;
    const char *subject;
} access_peer_t;

typedef struct access_rules access_rules_t;

/* Loads a rules file, which the rules then follow. Returns NULL with the
 * file, line and reason in err for a file that cannot be read or has a
 * malformed line. An empty file (no rule) admits nobody. The caller owns
 * the result. */
access_rules_t *access_rules_load(const char *path, char *err, size_t errlen);
void access_rules_destroy(access_rules_t **rulesp);

/* Re-reads the file now if it changed. Returns 0 (unchanged or reloaded) or
 * SP_ECONFIG (the current version was refused; the previous rules apply). */
int access_rules_refresh(access_rules_t *rules);

/* The operations the first rule matching peer allows (0 when none
 * matches); with rules NULL, every operation. *line (may be NULL) gets the
 * rule's line in the file, or 0. */
unsigned access_ops(access_rules_t *rules, const access_peer_t *peer, unsigned *line);

/* Whether peer may run op (one ACCESS_* bit) and, for a C-MOVE, move to
 * dest (NULL: no destination check). On false, why says which rule refused
 * it. With rules NULL, always true. */
bool access_check(access_rules_t *rules, const access_peer_t *peer, unsigned op, const char *dest,
                  char *why, size_t whylen);

/* "echo", "store", ... for one ACCESS_* bit. */
const char *access_op_name(unsigned op);

/* Called with a short description after each applied or refused reload
 * (the router audits it); may be NULL. Set before the rules are shared. */
void access_rules_on_reload(access_rules_t *rules,
                            void (*fn)(void *ctx, bool applied, const char *what), void *ctx);

#endif
