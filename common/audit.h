/* audit.h - the audit trail of one process (a router or a node): one
 * structured record per association, store, query, retrieve, admin action
 * and membership change, appended as one JSON line to a file and optionally
 * sent to a syslog collector (README "Access control and audit").
 *
 * Vocabulary: each record names its DICOM PS3.15 A.5 audit event (name and
 * code, e.g. "DICOM Instances Transferred", "DCM 110104"), its event type
 * code where A.5 gives one, the event action code (C, R, U, D, E) and the
 * outcome indicator (0 success, 4 minor failure, 8 serious failure, 12 major
 * failure).
 *
 * Threads: audit_record() may be called from any thread. It formats the
 * record on the caller's thread and queues the line; one writer thread
 * appends queued lines in batches (one write(2) per batch), so callers
 * never wait on the disk, except a caller that asks to wait for its record
 * (a C-STORE waits before answering Success) and callers of a full queue.
 *
 * Durability: with sync = write, a waiting caller writes its own record
 * (one O_APPEND write, when no syslog copy is configured; otherwise it
 * waits for its batch) and returns once the kernel holds it: it survives
 * the process being killed, and reaches the disk with the next fdatasync,
 * at most sync_interval later. With sync = commit it returns once its
 * batch was written and fdatasync'd (it survives a machine crash too);
 * many concurrent callers share one write and one fdatasync (group
 * commit).
 *
 * A record that cannot be written (disk full, I/O error) is logged; it
 * never changes the outcome of the operation it describes. The file is
 * opened O_APPEND and reopened when its path names another file (checked
 * once a second), so it can be rotated by renaming it.
 *
 * The trail is process-wide, like the log (log.h): every subsystem writes to
 * the same one, started once by main(). Without audit_start() (or with no
 * file and no syslog) audit_record() does nothing. */
#ifndef SP_AUDIT_H
#define SP_AUDIT_H

#include <stdbool.h>
#include <stddef.h>

/* What happened; each maps to one PS3.15 A.5 event (audit.c, events[]). */
typedef enum {
    AUDIT_APPLICATION_START,  /* Application Activity 110100, Application Start 110120 */
    AUDIT_APPLICATION_STOP,   /* Application Activity 110100, Application Stop 110121 */
    AUDIT_ASSOCIATION,        /* User Authentication 110114, Login 110122: accepted or refused */
    AUDIT_STORE,              /* DICOM Instances Transferred 110104, action C (C-STORE) */
    AUDIT_QUERY,              /* Query 110112, action E (C-FIND) */
    AUDIT_RETRIEVE,           /* DICOM Instances Transferred 110104, action R (C-GET, C-MOVE) */
    AUDIT_INSTANCES_ACCESSED, /* DICOM Instances Accessed 110103 (an operator's object access) */
    AUDIT_RESTRICTED,         /* Security Alert 110113, Use of Restricted Function 110132 */
    AUDIT_NETWORK_CONFIG,     /* Security Alert 110113, Network Configuration 110128 (drain) */
    AUDIT_SECURITY_CONFIG,    /* Security Alert 110113, Security Configuration 110129 */
    AUDIT_NETWORK_ATTACH,     /* Network Entry 110108, Attach 110124 (a member joined) */
    AUDIT_NETWORK_DETACH,     /* Network Entry 110108, Detach 110125 (a member left) */
} audit_event_t;

/* RFC 3881 / PS3.15 event outcome indicators. */
#define AUDIT_SUCCESS 0
#define AUDIT_MINOR_FAILURE 4   /* refused, or done with warnings */
#define AUDIT_SERIOUS_FAILURE 8 /* failed */
#define AUDIT_MAJOR_FAILURE 12

/* One record. Every pointer is borrowed for the call only (the record is
 * formatted before audit_record returns); NULL fields are left out. */
typedef struct {
    audit_event_t event;
    int outcome;           /* AUDIT_SUCCESS ... */
    char action;           /* event action code; 0: the event's usual one */
    const char *operation; /* what was asked: "C-STORE", "A-ASSOCIATE", "drain", ... */
    /* The actor: who asked. */
    const char *ae_title;  /* calling AE title */
    const char *called_ae; /* called AE title (associations) */
    const char *address;   /* peer address */
    const char *subject;   /* TLS client certificate subject */
    const char *user;      /* cluster key name (requests to a node) */
    const char *role;      /* that key's role */
    /* The participant objects. */
    const char *patient_id;
    const char *sop_uid;        /* one SOP Instance UID (a store, an object read) */
    const char *study;          /* one Study Instance UID, or: */
    const char *const *studies; /* several (at most AUDIT_MAX_STUDIES are written) */
    size_t nstudies;            /*   their count */
    long long instances;        /* number of instances; negative: not applicable */
    int dimse_status;           /* DIMSE status sent; negative: none */
    const char *destination;    /* C-MOVE destination AE title */
    const char *detail;         /* free text: why refused, member state, ... */
} audit_record_t;

#define AUDIT_MAX_STUDIES 64

/* A record with nothing but its event: instances and status "none". */
#define AUDIT_RECORD_INIT(ev)                                                                      \
    {                                                                                              \
        .event = (ev), .instances = -1, .dimse_status = -1                                         \
    }

typedef struct {
    const char *path;     /* JSON-lines file; NULL or "" for none */
    const char *source;   /* this process, e.g. "router1" or "n2" (the "source" field) */
    const char *syslog;   /* "HOST:PORT" of an RFC 5424 collector over UDP; NULL or "" for none */
    bool sync_commit;     /* wait for fdatasync (commit) rather than write (write) */
    int sync_interval_ms; /* write mode: fdatasync at most this long after a write */
    size_t queue;         /* records queued at most before callers wait (default 8192) */
} audit_config_t;

/* Opens the file (creating it, mode 0640) and the syslog socket and starts
 * the writer thread. Returns 0, or a negative code with the reason in err
 * (cannot open the file, bad syslog address). Call once, from main(). */
int audit_start(const audit_config_t *cfg, char *err, size_t errlen);
/* Writes and syncs what is queued, stops the writer, closes the file. */
void audit_stop(void);
/* True while a trail is started with a file or a syslog address. */
bool audit_enabled(void);

/* Queues one record. With wait, returns only once the record is written
 * (see Durability). Returns 0, or a negative code when the trail could not
 * write the batch holding it (logged by the writer). */
int audit_record(const audit_record_t *r, bool wait);

/* Parses "write" or "commit" (the [audit] sync setting). Returns 0 or
 * SP_EINVAL. */
int audit_parse_sync(const char *text, bool *commit);

/* The [audit] settings of nodes and routers; AUDIT_OPTIONS puts them into a
 * program's config_option_t table (config.h), so both share one
 * definition. */
typedef struct {
    char *file;
    char *syslog;
    char *sync;
    int sync_interval_ms;
} audit_settings_t;

#define AUDIT_OPT_(type, member, key, ctype, field, def, lo, hi, help)                             \
    {                                                                                              \
        "audit", key, ctype, offsetof(type, member) + offsetof(audit_settings_t, field), def, lo,  \
            hi, help, NULL                                                                         \
    }
#define AUDIT_OPTIONS(type, member)                                                                \
    AUDIT_OPT_(type, member, "file", CONFIG_PATH, file, "audit.jsonl", 0, 0,                       \
               "Audit trail, one JSON line per record (relative to this file; empty: none)"),      \
        AUDIT_OPT_(type, member, "syslog", CONFIG_STRING, syslog, "", 0, 0,                        \
                   "Also send each record to this RFC 5424 collector, HOST:PORT over UDP "         \
                   "(empty: none)"),                                                               \
        AUDIT_OPT_(type, member, "sync", CONFIG_STRING, sync, "write", 0, 0,                       \
                   "An acknowledged store waits until its record is written (write: survives "     \
                   "the process being killed) or written and fdatasync'd (commit: survives a "     \
                   "machine crash)"),                                                              \
        AUDIT_OPT_(type, member, "sync_interval", CONFIG_MS, sync_interval_ms, "1s", 1, 3600000,   \
                   "With sync = write, records reach the disk at most this long after")

/* Starts the trail from [audit] settings; source names this process.
 * Returns 0, or SP_ECONFIG / a negative code with the reason in err. */
int audit_start_settings(const audit_settings_t *s, const char *source, char *err, size_t errlen);

#endif
