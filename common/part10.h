/* part10.h - DICOM Part-10 framing (PS3.10 7.1), without DCMTK: the 128-byte
 * preamble, "DICM", the file meta information group (group 0002, explicit VR
 * little endian) and the data set bytes verbatim. ShardPACS stores every
 * instance in this form, so the framing must never touch the data set: what
 * part10_make() wraps, part10_split() hands back byte for byte.
 *
 * Pure functions over caller memory; any thread may call them. */
#ifndef SP_PART10_H
#define SP_PART10_H

#include <stddef.h>
#include <stdint.h>

/* What part10_split() reads from the file meta information. The strings are
 * copied, with DICOM padding (trailing NULs and spaces) removed; sop_class
 * and sop_instance are empty when the meta group lacks them. */
typedef struct {
    size_t dataset_offset; /* the data set starts here and runs to the end */
    char ts[65];           /* (0002,0010) Transfer Syntax UID, never empty */
    char sop_class[65];    /* (0002,0002) Media Storage SOP Class UID */
    char sop_instance[65]; /* (0002,0003) Media Storage SOP Instance UID */
} part10_meta_t;

/* Builds Part-10 bytes: a zero preamble, "DICM", a meta group (group length,
 * version 00 01, SOP class, SOP instance, transfer syntax, our implementation
 * class UID and version name) and the data set bytes verbatim. The UIDs may
 * be at most 64 characters. *out is malloc'd; the caller frees it. Returns 0 or
 * SP_EINVAL (bad argument). */
int part10_make(const uint8_t *dataset, size_t len, const char *sop_class_uid,
                const char *sop_instance_uid, const char *transfer_syntax_uid, uint8_t **out,
                size_t *out_len);

/* The most header bytes part10_make() and part10_frame_in_place() write:
 * the preamble, "DICM" and a meta group with three 64-character UIDs. */
#define PART10_HEADER_MAX 512

/* Writes the same header as part10_make() into the headroom bytes right
 * before dataset (which the caller's buffer must have), so a received data
 * set becomes a Part-10 object without being copied: the object starts at
 * *start and runs to the data set's end. Returns 0, or SP_EINVAL (bad
 * argument, or the header does not fit the headroom). */
int part10_frame_in_place(uint8_t *dataset, size_t headroom, const char *sop_class_uid,
                          const char *sop_instance_uid, const char *transfer_syntax_uid,
                          uint8_t **start);

/* Finds the data set inside Part-10 bytes. The meta group must start with
 * its group length (0002,0000), be complete within len, consist of whole
 * explicit-VR elements of group 0002 that end exactly at the length it
 * declares, and carry a transfer syntax; a UID value is digits and dots
 * (trailing padding aside), at most 64 of them. Never reads outside [part10, part10 + len). Returns
 * 0 with *meta filled, or SP_EINVAL (truncated, garbled, or not Part-10). */
int part10_split(const uint8_t *part10, size_t len, part10_meta_t *meta);

/* An instance's metadata without reading its pixels again: the Part-10
 * bytes with the value of the top-level Pixel Data element (7FE0,0010) left
 * out and its header saying length 0 (an encapsulated one keeps its header
 * with an empty offset table item and the delimiter instead of its
 * fragments), everything before and after it verbatim. The
 * result parses as the same data set with an empty Pixel Data, so DICOM
 * JSON made from it equals that of the whole object (Pixel Data is a
 * BulkDataURI either way). *out is malloc'd. Returns 0, SP_ENOTFOUND when
 * there is no top-level Pixel Data or the data set is deflated (the whole
 * object is its metadata), or SP_EINVAL (not Part-10, or a data set the
 * scanner refuses). */
int part10_metadata(const uint8_t *obj, size_t len, uint8_t **out, size_t *out_len);

#endif
