/* dsscan.h - a cheap, non-recursive pre-scan of a DICOM data set's bytes
 * that bounds nesting depth, element count and size before DCMTK parses
 * them.
 *
 * Why: DCMTK's data set parser recurses once per nested sequence, so about
 * 6,000 nested undefined-length sequences (some 200 KB) overflow a worker's
 * 8 MiB stack and kill the router. Every data set that arrives from outside
 * (C-STORE data sets, C-FIND/MOVE/GET identifiers, STOW-RS bodies) is fed
 * through a scanner first and handed to DCMTK only when it is accepted.
 *
 * The scanner reads the element structure only (tags, VRs, lengths, items,
 * delimiters); it never looks at values except for the first four bytes of
 * an implicit VR (or UN) value, to see whether it holds items. Input is a
 * data set without the Part-10 preamble and meta header, in one of the
 * syntaxes below. It may be fed in pieces of any size, down to one byte:
 * the result never depends on how the bytes were split (except where the
 * inflate ratio trips, see dsscan_limits_t). Memory is bounded by the depth
 * limit (plus zlib's 32 KiB window and a 16 KiB buffer for deflated input).
 *
 * What nests: a sequence (explicit VR SQ; explicit VR UN of undefined length,
 * whose items are implicit VR little endian per PS3.5 6.2.2; in implicit VR
 * any undefined-length element other than Pixel Data; and a defined-length
 * implicit VR or UN element whose value starts with an item tag) holds
 * items, and each item holds a data set. Undefined-length Pixel Data
 * (7FE0,0010) holds fragments (items that are raw bytes, not data sets) and
 * counts as one level. Defined-length sequences and items are scanned too,
 * bounded by their lengths.
 *
 * A scanner belongs to one thread at a time; separate scanners are
 * independent. */
#ifndef SP_DSSCAN_H
#define SP_DSSCAN_H

#include "base.h"

#include <stddef.h>
#include <stdint.h>

typedef enum {
    DSSCAN_IMPLICIT_LE = 0, /* 1.2.840.10008.1.2 */
    DSSCAN_EXPLICIT_LE,     /* 1.2.840.10008.1.2.1 and every encapsulated syntax */
    DSSCAN_EXPLICIT_BE,     /* 1.2.840.10008.1.2.2 (retired) */
    DSSCAN_DEFLATED_LE,     /* 1.2.840.10008.1.2.1.99: raw deflate of explicit VR LE */
} dsscan_syntax_t;

typedef struct {
    /* Most sequences (or encapsulated Pixel Data) open at once: a top-level
     * sequence is depth 1, a sequence in one of its items depth 2. */
    uint32_t max_depth;
    /* Most element headers in the whole data set, items and delimiters
     * included: bounds DCMTK's allocations for a data set of tiny
     * elements. */
    uint64_t max_elements;
    /* Most data set bytes (after inflating, for the deflated syntax; the
     * deflated input is held to the same bound). 0 means no limit. */
    uint64_t max_bytes;
    /* Deflated syntax only: inflated bytes may not exceed this many times
     * the compressed bytes consumed so far, once past 1 MiB (a deflate
     * bomb). Where exactly a borderline stream trips can depend on how the
     * input was split, by a few bytes. 0 means no ratio check. */
    uint32_t max_inflate_ratio;
} dsscan_limits_t;

/* What a scan saw, filled in by dsscan_finish() even on failure. */
typedef struct {
    uint64_t bytes;    /* data set bytes scanned (inflated, if deflated) */
    uint64_t elements; /* element, item and delimiter headers */
    uint32_t depth;    /* deepest nesting reached */
} dsscan_stats_t;

typedef struct dsscan dsscan_t;

/* Defaults: depth 64, 4,000,000 elements, 1 GiB, inflate ratio 200. Real
 * images rarely nest deeper than 5. */
dsscan_limits_t dsscan_limits_default(void);

/* The syntax a transfer syntax UID is scanned in: implicit VR LE, explicit
 * VR BE, deflated, and explicit VR LE for every other UID (all encapsulated
 * syntaxes are explicit VR LE). */
dsscan_syntax_t dsscan_syntax_of(const char *transfer_syntax_uid);

/* A new scanner (the caller owns it; free with dsscan_destroy()). lim NULL
 * means dsscan_limits_default(). A max_depth of 0 is raised to 1 so that
 * the limit test is the same for every depth. */
dsscan_t *dsscan_new(dsscan_syntax_t syntax, const dsscan_limits_t *lim);

/* Scans the next n bytes. Returns 0, SP_EINVAL for a malformed data set or
 * SP_ETOOBIG for one over a limit. After a failure every later call returns
 * the same code without reading; dsscan_finish() gives the reason. */
int dsscan_feed(dsscan_t *s, const uint8_t *p, size_t n);

/* How long the data set is known to be so far: the furthest end that an
 * element or container already read declares (e.g. the end of a Pixel Data
 * value whose header has arrived), at least the bytes fed. Lets a receiver
 * size its buffer once instead of growing it. The deflated syntax declares
 * nothing about its compressed size: the bytes fed. */
uint64_t dsscan_declared_end(const dsscan_t *s);

/* Where the first top-level Pixel Data element (7FE0,0010) lies in the
 * data set: the offsets of its header and value, and the offset just past
 * it (past its sequence delimiter when encapsulated). Lets a storage node
 * keep an instance's metadata without its pixels (part10_metadata). */
typedef struct {
    uint64_t header;
    uint64_t value;
    uint64_t end;
} dsscan_span_t;

/* Returns 0 with *out set once that element has been scanned to its end,
 * SP_ENOTFOUND when none has (yet), and for the deflated syntax, whose
 * offsets are of the inflated bytes. Valid after a failure too, for the
 * bytes scanned before it. */
int dsscan_pixel_data(const dsscan_t *s, dsscan_span_t *out);

/* Ends the scan: checks that the data ended at an element boundary with
 * every sequence and item closed (and the deflate stream complete). Returns
 * 0 when the data set may be parsed, or the first failure's code with its
 * reason in err (e.g. "nesting depth 65 over the limit 64 at offset 4242").
 * stats and err may be NULL. Calling it again returns the same result. */
int dsscan_finish(dsscan_t *s, dsscan_stats_t *stats, char *err, size_t errlen);

/* Frees a scanner and sets *sp to NULL; accepts NULL and *sp == NULL. */
void dsscan_destroy(dsscan_t **sp);

/* One-shot: new, feed, finish, destroy. */
int dsscan_check(const uint8_t *buf, size_t len, dsscan_syntax_t syntax, const dsscan_limits_t *lim,
                 char *err, size_t errlen);

#endif
