/* store.h - a storage node's objects and indexes in one RocksDB database.
 *
 * Contracts kept here (README "Contracts"): 1, an instance is acknowledged
 * only after its synced write, and a different version never overwrites
 * silently; 2, the digest is verified before the write and on every read.
 *
 * Column families:
 *   objects   key P|study\0series\0sop -> the Part-10 bytes, verbatim
 *             (integrated BlobDB keeps large values out of the LSM tree)
 *   index     'T'|P|study                 -> study record (patient+study attrs)
 *             'R'|P|study\0series         -> series record
 *             'I'|P|study\0series\0sop    -> instance record (all of the
 *                                            instance's attrs, digest, size)
 *             'M'|P|study\0series\0sop    -> the instance's metadata: format,
 *                                            kind, object digest, and the
 *                                            object without its Pixel Data
 *                                            value (part10_metadata), or
 *                                            nothing when the object itself
 *                                            is its metadata; derived from
 *                                            the object in the put's batch
 *   secondary 'U'|sop -> P|study\0series (locate an instance by SOP UID)
 *             'S'|study -> P             (locate a study)
 *             'p'|PatientID\0study, 'n'|folded PatientName\0study,
 *             'd'|StudyDate\0study, 'a'|AccessionNumber\0study -> P
 *             (written with the study record, from the first instance of
 *             the study; one entry per backslash-separated value; names
 *             folded by match_fold_name(), dates as YYYYMMDD; every study
 *             has a 'p' entry, an empty PatientID too)
 *   conflicts key sop\0hex(digest) -> version, P, varint record length,
 *             instance record of the conflicting copy, its bytes (at most
 *             max_conflicts per SOP from puts; see "Duplicates" below)
 *   meta      "format" -> "1"; node metadata
 * P is the partition number, 2 bytes big-endian, so one partition, one study
 * and one series are each a contiguous key range in objects and index.
 * Index records are a versioned, length-prefixed encoding of attrs_t (see
 * store.c), validated on every read: a malformed record is SP_EDB.
 *
 * An object and all its index entries are written in one WriteBatch with
 * sync=true: when store_put() returns 0 the object survives a crash.
 * Concurrent store_put() calls from many threads share fsyncs (RocksDB's
 * group commit); puts of the same SOP Instance UID are serialised by a
 * striped lock so idempotence and conflict detection hold under races, and
 * a study's deletion (store_delete_partition, store_delete_study_if)
 * excludes puts of that study.
 *
 * Duplicates. A put of a SOP Instance UID already stored with the same
 * digest is STORE_DUPLICATE (nothing written). With other bytes, the two
 * versions are ordered by (version, digest): version is the router's
 * receive time carried in the put (store_put_t.version), the digest breaks
 * ties bytewise. Never by arrival at this node, so every replica that
 * received the same versions ends with the same instance whatever order
 * they came in. The put's policy picks the instance:
 *   REJECT      the earliest version is the instance; a different version
 *               is kept aside in the conflicts family (if it is earlier
 *               than the stored one, the two swap: it becomes the instance
 *               and the stored one is kept aside). STORE_CONFLICT: the
 *               router answers 0x0111 (Duplicate SOP Instance).
 *   KEEP_FIRST  the same choice as REJECT, but the put is acknowledged
 *               (STORE_KEPT_ASIDE, or STORE_REPLACED for the swap): the
 *               router answers Success and logs a warning. The new version
 *               is kept aside rather than dropped, because a Success must
 *               mean the bytes are durable somewhere (README "Contracts", 1).
 *   KEEP_NEWEST the latest version is the instance: a later one replaces
 *               it (STORE_REPLACED: object and instance record now hold the
 *               new bytes, attributes, digest and version; the replaced one
 *               is kept aside so nothing acknowledged is destroyed), an
 *               earlier one arriving late is kept aside (STORE_KEPT_ASIDE).
 *   UNSET       (version 0: repair copies, older routers) today's rule:
 *               the stored version stays, the new one is kept aside,
 *               STORE_CONFLICT. A stored version 0 orders before any
 *               versioned one.
 * A version identical to one already kept aside is not kept twice. A
 * re-send carries its new receive time, so under REJECT and KEEP_FIRST it
 * never wins and is answered as the first time (STORE_CONFLICT,
 * STORE_KEPT_ASIDE); under KEEP_NEWEST it is the latest send and swaps back
 * in (STORE_REPLACED; the two versions trade places, the count stays): the
 * last version a modality sent is the one served, on every replica that
 * received the send, and repair brings it to the others. Each put applies
 * its own policy against the stored instance; routers should all use the
 * same one.
 *
 * The bound. At most max_conflicts versions are kept aside per SOP by puts.
 * A put that would need one more slot (a new losing version, or a winning
 * one whose replaced version must go aside) is refused with nothing written:
 * STORE_CONFLICT_LIMIT, counted in conflicts_refused, logged once, and the
 * router answers 0x0111. Only the instance's location is ever replaced: a
 * version naming another study or series than the stored one is kept
 * aside, never moved (the study and series records keep the attributes of
 * their first instance, as everywhere in this store).
 *
 * Convergence. Anti-entropy compares instance digests only; conflicts are
 * local. Replicas that received the same versions agree, except when the
 * bound refuses different versions on different replicas (concurrent puts
 * arriving in different orders to replicas whose conflict slots are full),
 * or a replica missed a version (down, a stand-in, a quorum reached
 * without it). Repair then converges: store_repair() with the peer's
 * version and policy applies the same rule as a put, and may go beyond
 * max_conflicts to keep the version it replaces (so the bound is per put;
 * a node can hold at most the versions the other replicas accepted on top,
 * N x (max_conflicts + 1) in all). node/repair.c copies a peer's instance
 * over a differing local one only when the peer's would win by the peer's
 * policy, so a REJECT/KEEP_FIRST replica that missed the first version
 * takes it (the later one goes aside) and a KEEP_NEWEST replica takes the
 * newest; an unversioned difference stays as today (logged, not copied).
 *
 * Every function is thread-safe unless noted. */
#ifndef SP_STORE_H
#define SP_STORE_H

#include "../common/attrs.h"
#include "../common/base.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct store store_t;

typedef struct {
    char *path;                /* database directory (created if missing) */
    size_t blob_min_bytes;     /* values this size or more go to blob files; default 2 KiB */
    size_t write_buffer_bytes; /* memtable size per column family; default 64 MiB */
    size_t block_cache_bytes;  /* default 128 MiB */
    int background_jobs;       /* RocksDB flush/compaction threads; default 2 */
    int max_conflicts;         /* versions kept aside per SOP by puts; default 4,
                                * negative = the default, 0 = none (every other
                                * version is refused) */
} store_config_t;

void store_config_defaults(store_config_t *cfg);

/* Opens (creating if needed) the database; zero fields of cfg take the
 * defaults. Counts the stored instances, bytes, studies and conflicts for
 * store_stats() by scanning index keys (time grows with the store). Returns
 * 0, or a negative code (SP_EDB, SP_ENOSPACE, SP_EINVAL; SP_EDB also for a
 * database of an unknown format) with a message in err. */
int store_open(const store_config_t *cfg, store_t **out, char *err, size_t errlen);
/* Closes the database; accepts NULL and sets *sp to NULL. No other call may
 * be running on the store. */
void store_close(store_t **sp);

/* What to do with a different version of a stored SOP (see Duplicates
 * above); the same numbers as wire_policy_t. */
typedef enum {
    STORE_POLICY_UNSET = 0,
    STORE_POLICY_REJECT = 1,
    STORE_POLICY_KEEP_FIRST = 2,
    STORE_POLICY_KEEP_NEWEST = 3,
} store_policy_t;

typedef struct {
    uint32_t partition;   /* < 65536 */
    const attrs_t *attrs; /* stored attrs; Study/Series/SOP Instance UIDs required */
    const uint8_t *data;  /* the Part-10 bytes */
    size_t len;
    uint8_t digest[SP_DIGEST_LEN]; /* BLAKE2b-256 of data, as the sender computed it */
    uint64_t version;              /* router receive time, ms since the epoch; 0 = none */
    store_policy_t policy;         /* UNSET exactly when version is 0 */
} store_put_t;

/* The same numbers as wire_outcome_t. */
typedef enum {
    STORE_STORED = 0,     /* new instance, now durable */
    STORE_DUPLICATE,      /* same UID, same bytes: nothing written */
    STORE_CONFLICT,       /* different bytes under REJECT or UNSET: both kept */
    STORE_CONFLICT_LIMIT, /* different bytes, max_conflicts reached: nothing written */
    STORE_REPLACED,       /* KEEP_*: this version is now the instance, the old one kept aside */
    STORE_KEPT_ASIDE,     /* KEEP_*: the stored version stays, this one is kept aside */
} store_outcome_t;

/* "reject", "keep-first", "keep-newest" ("unset" for UNSET). */
const char *store_policy_name(store_policy_t policy);

/* Stores one instance durably. Verifies the digest (SP_EDIGEST), the UIDs
 * (SP_EINVAL), the version and policy (set together; SP_EINVAL), that
 * len > 0 and no value exceeds 64 KiB (SP_EINVAL), and that the study is
 * not already in another partition (SP_EINVAL). Applies the duplicate rules
 * above to a SOP already stored. Returns 0
 * with *outcome set, or a negative code (SP_EDB, SP_ENOSPACE) after which
 * nothing of the instance was written. A RocksDB failure (SP_EDB,
 * SP_ENOSPACE) is logged here with RocksDB's message; a refused instance
 * (SP_EINVAL, SP_EDIGEST) is not: the caller logs it with the sender. The
 * study and series records keep
 * the attributes of the first instance stored for them; the instance record
 * keeps all of this instance's attrs (returned by store_get). */
int store_put(store_t *s, const store_put_t *in, store_outcome_t *outcome);

/* One stored instance as read back. Owned by the caller; release with
 * store_object_free(). */
typedef struct {
    uint32_t partition;
    attrs_t attrs; /* the instance's stored attrs (study, series and image level) */
    uint8_t digest[SP_DIGEST_LEN];
    uint64_t version;      /* of the put that stored it; 0 = none */
    store_policy_t policy; /* likewise */
    uint8_t *data;
    size_t len;
} store_object_t;

/* Reads an instance by SOP Instance UID and re-checks its digest.
 * Returns 0, SP_ENOTFOUND, SP_EINVAL (malformed UID), SP_EDIGEST (corrupt:
 * digest mismatch or a RocksDB checksum failure; logged, counted in
 * corrupt_reads, no bytes returned) or SP_EDB. *out is zeroed on failure. */
int store_get(store_t *s, const char *sop_uid, store_object_t *out);
void store_object_free(store_object_t *o);

/* Reads an instance's metadata by SOP Instance UID, without its pixels:
 * out->data is Part-10 bytes that parse as the instance's data set with an
 * empty Pixel Data (part10_metadata), or the whole object when it has no
 * top-level Pixel Data (or is deflated); attrs, digest, version, policy and
 * partition as store_get(). Served from the 'M' record written with the
 * object; an instance stored before such records existed, or whose record
 * does not match its object's digest, gets it rebuilt from the verified
 * object (counted in metadata_rebuilt, written unsynced: it is derived).
 * Returns 0, SP_ENOTFOUND, SP_EINVAL (malformed UID), SP_EDIGEST (the
 * object had to be read and is corrupt) or SP_EDB. *out is zeroed on
 * failure; release it with store_object_free(). */
int store_metadata(store_t *s, const char *sop_uid, store_object_t *out);
/* Frees a buffer the store allocated (RocksDB's allocator, not necessarily
 * malloc), e.g. a store_object_t's data taken over by the caller; NULL
 * accepted. Thread-safe. */
void store_buffer_free(void *data);

/* An instance entry from an index scan; valid only during the callback.
 * sop_class_uid and transfer_syntax_uid are "" when they were not stored. */
typedef struct {
    uint32_t partition;
    const char *study_uid;
    const char *series_uid;
    const char *sop_uid;
    const char *sop_class_uid;
    const char *transfer_syntax_uid;
    uint64_t size;
    uint8_t digest[SP_DIGEST_LEN];
    uint64_t version; /* as in store_object_t */
    store_policy_t policy;
} store_entry_t;

/* Return 0 to continue, non-zero to stop the scan early; a negative value
 * is also passed back as the scanning function's result. */
typedef int (*store_entry_fn)(void *ctx, const store_entry_t *e);

/* Lists a study's instances, or one series' when series_uid is not NULL, in
 * key order (series UID, then SOP Instance UID, bytewise), a page at a time
 * as store_partition_list() does: at most limit (0 = all), starting after the
 * cursor "study/series/sop" (NULL or "" = from the start; the named instance
 * need not exist any more, but it must lie in this study, and series when
 * given); *next_cursor (may be NULL; caller frees; NULL when the listing is
 * exhausted) resumes after the last entry passed to fn, including one for
 * which fn asked to stop. The order and the cursor depend only on the UIDs,
 * so a cursor from one replica resumes on another. Returns 0 (also when
 * nothing matched), fn's negative answer, SP_EDB (also for a corrupt
 * record), or SP_EINVAL for a bad UID or cursor. */
int store_list(store_t *s, const char *study_uid, const char *series_uid, const char *cursor,
               size_t limit, store_entry_fn fn, void *ctx, char **next_cursor);

/* A C-FIND query. Non-NULL entries of keys are the attributes requested;
 * those with a non-empty value are also matching keys (PS3.4 C.4.1.1.3).
 * Keys of attributes below `level` are ignored. SpecificCharacterSet in keys
 * is never a matching key (it describes the query, and values reaching a
 * node are UTF-8). Results carry the requested attributes of the matched
 * entity at `level` and the levels above it ("" when not stored), the
 * unique keys down to `level` (PatientID always, then StudyInstanceUID,
 * SeriesInstanceUID, SOPInstanceUID), and SpecificCharacterSet when the
 * study record has one. Study level attributes come from the study record
 * (the first instance stored of the study), series ones from the series
 * record. PATIENT level results are grouped by the whole PatientID value.
 * The counts and ModalitiesInStudy are computed only when requested. */
typedef struct {
    level_t level;
    const attrs_t *keys;  /* NULL: no keys (only unique keys come back) */
    unsigned match_flags; /* MATCH_PN_CASE_INSENSITIVE */
    size_t limit;         /* stop after this many results; 0 = no limit */
    bool no_index;        /* ignore the secondary indexes and scan study
                           * records (tests and verification); same results */
} store_query_t;

/* Return 0 to continue, non-zero to stop. result is valid only during the call. */
typedef int (*store_result_fn)(void *ctx, const attrs_t *result);

/* Runs a query on one snapshot of the database. Uses the secondary indexes
 * for SOPInstanceUID (image level) and StudyInstanceUID (single or list),
 * PatientID, PatientName prefix, StudyDate range and AccessionNumber when
 * the query has them, and scans study records otherwise; every candidate is
 * re-checked with match_value(). Returns 0 (also when fn asked to stop),
 * SP_ELIMIT when a result beyond the limit was found (the first `limit`
 * were delivered), SP_EINVAL for a malformed key (match_key_valid) or level,
 * or SP_EDB (also for a corrupt record). */
int store_find(store_t *s, const store_query_t *q, store_result_fn fn, void *ctx);

/* Per-partition digest for anti-entropy, read from the database: the sum
 * (four 64-bit little-endian lanes, mod 2^64) of BLAKE2b-256(SOP UID \0
 * object digest) over the partition's instances, with their count and total
 * size. Order-independent, so writes keep store_partition_summaries() current
 * without rescanning. An empty partition has count 0 and digest 0. */
int store_partition_digest(store_t *s, uint32_t partition, uint8_t digest[SP_DIGEST_LEN],
                           uint64_t *count, uint64_t *bytes);

/* One non-empty partition as store_partition_summaries() reports it: the
 * same count, bytes and digest as store_partition_digest() returns. */
typedef struct {
    uint32_t partition;
    uint64_t count;
    uint64_t bytes;
    uint8_t digest[SP_DIGEST_LEN];
} store_partition_summary_t;

/* Return 0 to continue, non-zero to stop; a negative value is also passed
 * back. p is valid only during the call. */
typedef int (*store_summary_fn)(void *ctx, const store_partition_summary_t *p);

/* Calls fn for each non-empty partition, in ascending order, with its
 * store_partition_digest() values, from memory: the summaries (about 5 MiB
 * per store) are summed once by store_open and then updated by every put,
 * replacement and deletion, so a call costs the same however large the
 * archive (rescanning changed partitions made ingest slower as it grew). A
 * partition with a corrupt instance record (found at open) is skipped and
 * the walk goes on. Returns 0 (also when fn asked to stop), fn's negative
 * answer, or SP_EDB when a partition was skipped. Safe against every other
 * call; a write is in its partition's summary once it has returned. */
int store_partition_summaries(store_t *s, store_summary_fn fn, void *ctx);

/* Lists a partition's instances in key order, at most limit (0 = all),
 * starting after the cursor "study/series/sop" (NULL or "" = from the start;
 * the named instance need not exist any more). *next_cursor (caller frees;
 * NULL when the partition is exhausted) resumes after the last entry passed
 * to fn, including one for which fn asked to stop. Returns 0, SP_EINVAL for
 * a malformed cursor or partition, or SP_EDB. */
int store_partition_list(store_t *s, uint32_t partition, const char *cursor, size_t limit,
                         store_entry_fn fn, void *ctx, char **next_cursor);

/* Deletes every instance of a partition: objects, study/series/instance
 * records, the secondary entries that point into the partition (SOP and
 * study locators, patient/name/date/accession entries of its studies) and
 * the kept conflicts of its SOPs; other partitions are untouched. Meant for
 * an old owner once the new owners confirmed a verified full copy (README
 * "Contracts", 5). *deleted (may be NULL) gets the number of instances deleted,
 * also when the call fails part way. Returns 0, SP_EINVAL (partition), or
 * SP_EDB / SP_ENOSPACE; calling it again finishes an interrupted deletion.
 *
 * Crash safety: each study is deleted in one synced WriteBatch (range
 * deletes for its records and objects, point deletes for its locators,
 * index entries and conflicts), so after a crash or an error every study is
 * either wholly present or wholly gone; never a locator without its object
 * or an object without its records.
 *
 * Concurrency: safe against store_put() of the same partition. Each study
 * is deleted while its study stripe is held exclusively; puts hold it
 * shared from their first read to their write, so a put lands wholly before
 * the study's deletion (and is deleted with it) or wholly after (and is
 * stored as new, STORE_STORED). Studies first stored after the call began
 * are not visited and survive, whole: a caller that wants the partition
 * empty stops routing writes to it first. Puts of other partitions that
 * share a stripe wait at most for one study's synced batch. */
int store_delete_partition(store_t *s, uint32_t partition, uint64_t *deleted);

/* Return 0 to continue, non-zero to stop; a negative value is also passed
 * back. study_uid is valid only during the call. */
typedef int (*store_study_fn)(void *ctx, const char *study_uid);

/* Calls fn with the UID of each study that has anything (a record or an
 * object) in the partition, in ascending order, as of the call's start
 * (one snapshot). Returns 0 (also when fn asked to stop), fn's negative
 * answer, SP_EINVAL (partition), or SP_EDB (also for a corrupt key). Takes
 * no lock; fn may call into the store. */
int store_partition_studies(store_t *s, uint32_t partition, store_study_fn fn, void *ctx);

/* Answers whether an instance (valid only during the call) is held where
 * it should be, e.g. by every owner of its partition with this digest. */
typedef bool (*store_held_fn)(void *ctx, const store_entry_t *e);

/* Deletes one study of a partition only if held() is true for each of its
 * instances, for a non-owner handing a study off. With the study's gate
 * closed (no put of the study runs), calls held() for every instance of
 * the study in key order; if all are held, deletes the study exactly as
 * store_delete_partition() deletes each study (one synced WriteBatch, so
 * the study is wholly present or wholly gone after a crash) and returns 0
 * with *deleted (may be NULL) set. Returns SP_ECONFLICT when not every
 * instance is held elsewhere (held() returned false; nothing deleted, the
 * remaining instances not asked about), 0 with *deleted = 0 for a study
 * without instances in the partition, SP_EINVAL (partition, UID, NULL
 * held), or SP_EDB (also for a corrupt record) / SP_ENOSPACE with nothing
 * deleted.
 *
 * Concurrency: a put of the study racing with the call lands wholly before
 * the gate closes (and then held() is asked about it) or after it opens
 * (and is stored as new, STORE_STORED); an instance held() was not asked
 * about is never deleted. held() runs with the gate closed: it must be
 * quick and must not put into the study (that would deadlock); puts of
 * other studies sharing the gate's stripe wait for it too. */
int store_delete_study_if(store_t *s, uint32_t partition, const char *study_uid, store_held_fn held,
                          void *ctx, uint64_t *deleted);

/* Repairs a corrupt local copy with verified bytes from elsewhere, or
 * brings a differing copy to the version a peer holds. Same
 * input, validation, errors and locking as store_put(); when the SOP is
 * already stored with the same recorded digest but its stored object fails
 * verification (digest mismatch, a RocksDB checksum or read error, or a
 * missing object), rewrites the object (synced), logs it and returns 0 with
 * STORE_STORED. When the stored copy verifies, STORE_DUPLICATE (nothing
 * written); a different recorded digest is handled exactly as in
 * store_put() (Duplicates above), except that a winning version replaces
 * the instance even beyond max_conflicts; an absent SOP is stored as
 * store_put() would. Only the
 * object is rewritten: the index records, the only copy of the digest, are
 * kept. Crash safety: the rewrite is one synced put, so after a crash the
 * object is the old (corrupt) value or the repaired one. */
int store_repair(store_t *s, const store_put_t *in, store_outcome_t *outcome);

/* Verifies stored objects in the background, a bounded step per call.
 * Reads up to max_objects (0 = no limit) instances in key order across all
 * partitions, starting after `cursor` (NULL or "" = from the beginning;
 * otherwise a *next_cursor of an earlier call, an opaque string), checks
 * each object against the size and BLAKE2b digest of its instance record,
 * and calls on_corrupt (may be NULL) with the instance's entry for each
 * mismatch or unreadable (missing, RocksDB checksum or read error) object;
 * each such object is also counted in corrupt_reads and logged. Instances
 * whose index record is corrupt are logged and skipped. *next_cursor gets a
 * cursor to continue from (caller frees), or NULL when the pass reached the
 * end; on_corrupt returning non-zero stops the step early (a negative
 * answer is returned) and the cursor resumes after that instance.
 * *checked and *bytes_read (each may be NULL) get the objects and bytes
 * read, for the caller's throttle. Returns 0, SP_EINVAL (malformed
 * cursor), on_corrupt's negative answer, or SP_EDB.
 *
 * Concurrency: reads one snapshot per call and takes no lock, so puts and
 * deletions proceed; an instance deleted since the snapshot is still
 * checked as it was, never reported missing. */
int store_scrub(store_t *s, const char *cursor, size_t max_objects, store_entry_fn on_corrupt,
                void *ctx, char **next_cursor, uint64_t *checked, uint64_t *bytes_read);

typedef struct {
    uint64_t instances;
    uint64_t bytes;
    uint64_t studies;
    uint64_t conflicts;
    uint64_t corrupt_reads;      /* corrupt objects seen since start (reads,
                                  * scrubs, repairs) */
    uint64_t conflicts_refused;  /* puts refused since start: max_conflicts reached */
    uint64_t db_size_bytes;      /* SST + blob file size on disk, from RocksDB;
                                  * data still only in the WAL is not counted */
    uint64_t object_bytes_read;  /* object bytes read from the objects family
                                  * since start (gets, scrubs, repairs,
                                  * metadata rebuilds) */
    uint64_t metadata_rebuilt;   /* metadata records derived at read time */
    uint64_t blob_garbage_bytes; /* deleted or replaced object bytes still in
                                  * blob files (as far as compaction counted) */
    bool blob_gc;                /* blob garbage collection on (store_blob_gc_tune) */
} store_stats_t;

/* instances, bytes and studies count what store_put() stored (maintained
 * since open); conflicts counts distinct conflicting copies kept. */
/* Turns blob garbage collection of the objects on while their blob files
 * hold garbage (deleted is true right after a delete, before compaction has
 * counted it) and off again once it is reclaimed: GC rewrites valid blobs,
 * pure cost while nothing is deleted. Called at open, after deletes, and
 * periodically (the scrub's passes). */
void store_blob_gc_tune(store_t *s, bool deleted);

int store_stats(store_t *s, store_stats_t *out);

/* An integer RocksDB property (rocksdb_property_int_cf, e.g.
 * "rocksdb.estimate-pending-compaction-bytes") summed over the column
 * families; a property RocksDB does not know counts 0. For the metrics. */
uint64_t store_property_sum(store_t *s, const char *name);

/* Orders two versions of one SOP as every replica does: by version, then by
 * digest bytewise. Returns <0, 0 or >0. */
int store_version_cmp(uint64_t va, const uint8_t *da, uint64_t vb, const uint8_t *db);

/* Whether a put of version (v, d) under policy takes the place of the
 * stored (sv, sd) (see Duplicates above); false for UNSET or version 0 and
 * for the same version. Repair asks it before copying over a local copy. */
bool store_version_wins(store_policy_t policy, uint64_t v, const uint8_t *d, uint64_t sv,
                        const uint8_t *sd);

#endif
