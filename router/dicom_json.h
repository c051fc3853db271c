/* dicom_json.h - what DICOMweb needs from DCMTK, behind a plain C interface
 * (router/dicom_json.cc): an instance's metadata as DICOM JSON (PS3.18
 * Annex F), frames sliced from its Pixel Data, one bulk data value, and a
 * rendered (windowed) JPEG or PNG. Every function takes a stored Part-10
 * object (as backend_fetch() returns it), parses it, and copies what it
 * returns into malloc'd buffers the caller frees; nothing is kept between
 * calls. Every exception is caught here and becomes an error code with a
 * message in err.
 *
 * Any thread may call any function at once. */
#ifndef SP_DICOM_JSON_H
#define SP_DICOM_JSON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Binary values (OB, OD, OF, OL, OV, OW, UN) at the top level longer than
 * this go out as BulkDataURI; shorter ones, and those inside sequences, as
 * InlineBinary. Pixel Data is always a BulkDataURI. */
#define DICOM_JSON_BULK_MIN 1024

/* The DICOM JSON object of one instance: every attribute of its data set
 * (not the file meta group), names converted to UTF-8 (what cannot be
 * converted is replaced by U+FFFD), AvailableTransferSyntaxUID (0008,3002)
 * set to the stored syntax, bulk values as "BulkDataURI":
 * "<instance_url>/bulkdata/GGGGEEEE". *out is malloc'd text without a
 * terminating NUL counted in *outlen (it has one). Returns 0, or SP_EINVAL
 * (not a Part-10 object, or a data set DCMTK cannot parse). */
int dicom_json_instance(const uint8_t *part10, size_t len, const char *instance_url, char **out,
                        size_t *outlen, char *err, size_t errlen);

/* One frame's bytes. */
typedef struct {
    uint8_t *data;
    size_t len;
} dicom_frame_t;

/* Extracts frames numbers[0..n) (1-based) of an instance's Pixel Data, into
 * out[0..n) (caller frees each data). want_ts: NULL or "*" sends frames in
 * the stored syntax (encapsulated frames are their fragments, found through
 * the Basic Offset Table, one fragment per frame, or JPEG/J2K start
 * markers; native frames are slices of Rows x Columns x SamplesPerPixel x
 * BitsAllocated/8); an uncompressed syntax UID decompresses an encapsulated
 * object first (JPEG, JPEG-LS, RLE; not JPEG 2000). The syntax the bytes are
 * in is copied into ts (65 bytes). Returns 0, SP_ENOTFOUND (no Pixel Data,
 * or a frame number out of range), SP_EINVAL (cannot slice or decode), or
 * SP_EUNKNOWN (want_ts is a syntax this server does not convert to). */
int dicom_frames(const uint8_t *part10, size_t len, const uint32_t *numbers, size_t n,
                 const char *want_ts, dicom_frame_t *out, char ts[65], char *err, size_t errlen);

/* The value of the top-level element `tag` (group << 16 | element): for
 * encapsulated Pixel Data every frame's fragments, one after the other.
 * Returns 0, SP_ENOTFOUND, or SP_EINVAL. The syntax the bytes are in goes to
 * ts. */
int dicom_bulkdata(const uint8_t *part10, size_t len, uint32_t tag, uint8_t **out, size_t *outlen,
                   char ts[65], char *err, size_t errlen);

/* Renders frame (1-based) as JPEG (png false; quality 1..100) or PNG,
 * windowed by the data set's first VOI window (else min/max), scaled down
 * to fit max_size x max_size when max_size > 0. Returns 0, SP_ENOTFOUND (no
 * such frame / no pixels), or SP_EINVAL. */
int dicom_render(const uint8_t *part10, size_t len, uint32_t frame, int max_size, bool png,
                 int quality, uint8_t **out, size_t *outlen, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif

#endif
