/* part10.c - Part-10 framing of stored instances (part10.h). Kept apart from
 * the DCMTK adapter because it is a storage format, not protocol: the bytes
 * it writes live on the storage nodes for years, and it can be tested for
 * bit-exactness without a DICOM stack. In common/ because storage nodes
 * also read it: they cut an instance's metadata out of the stored object. */
#include "part10.h"

#include "base.h"
#include "dsscan.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

/* Our implementation class UID (a UUID-derived 2.25 UID) and version name,
 * written into every meta group we make. */
#define PART10_IMPLEMENTATION_UID "2.25.150578371872791499775955047255267566374"
#define PART10_IMPLEMENTATION_VERSION "SHARDPACS_010"

/* The preamble and "DICM" come before the meta group. */
#define PART10_PREFIX 132
/* (0002,0000) UL, 4: the group length element's fixed header and value. */
#define PART10_GROUP_LENGTH_SIZE 12
#define PART10_UID_MAX 64

/* True for the VRs whose explicit-VR header has two reserved bytes and a
 * 32-bit length (PS3.5 7.1.2); the others carry a 16-bit length. */
static bool part10_long_vr(const uint8_t vr[2])
{
    static const char longs[][2] = {{'O', 'B'}, {'O', 'D'}, {'O', 'F'}, {'O', 'L'}, {'O', 'V'},
                                    {'O', 'W'}, {'S', 'Q'}, {'S', 'V'}, {'U', 'C'}, {'U', 'N'},
                                    {'U', 'R'}, {'U', 'T'}, {'U', 'V'}};
    for (size_t i = 0; i < SP_ARRAY_LEN(longs); i++)
        if (vr[0] == (uint8_t)longs[i][0] && vr[1] == (uint8_t)longs[i][1])
            return true;
    return false;
}

static uint32_t part10_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void part10_put_le32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

/* Writes one meta element at p (when p is not NULL) and returns its encoded
 * size, so the same code both measures and writes the group. Values are
 * padded to even length with pad, as PS3.5 6.2 asks (NUL for UI, space for
 * text). */
static size_t part10_put_element(uint8_t *p, uint16_t elem, const char vr[2], const void *value,
                                 size_t vlen, char pad)
{
    size_t padded = vlen + (vlen & 1);
    bool is_long = part10_long_vr((const uint8_t *)vr);
    size_t hdr = is_long ? 12 : 8;
    if (p == NULL)
        return hdr + padded;
    p[0] = 0x02;
    p[1] = 0x00;
    p[2] = (uint8_t)(elem & 0xff);
    p[3] = (uint8_t)(elem >> 8);
    p[4] = (uint8_t)vr[0];
    p[5] = (uint8_t)vr[1];
    if (is_long) {
        p[6] = 0;
        p[7] = 0;
        part10_put_le32(p + 8, (uint32_t)padded);
    } else {
        p[6] = (uint8_t)(padded & 0xff);
        p[7] = (uint8_t)(padded >> 8);
    }
    if (vlen > 0)
        memcpy(p + hdr, value, vlen);
    if (padded != vlen)
        p[hdr + vlen] = (uint8_t)pad;
    return hdr + padded;
}

/* Writes (or, with p NULL, measures) the meta elements after the group
 * length. */
static size_t part10_put_meta(uint8_t *p, const char *sop_class, const char *sop_instance,
                              const char *ts)
{
    size_t n = 0;
    n += part10_put_element(p ? p + n : NULL, 0x0001, "OB", "\0\1", 2, '\0');
    n += part10_put_element(p ? p + n : NULL, 0x0002, "UI", sop_class, strlen(sop_class), '\0');
    n += part10_put_element(p ? p + n : NULL, 0x0003, "UI", sop_instance, strlen(sop_instance),
                            '\0');
    n += part10_put_element(p ? p + n : NULL, 0x0010, "UI", ts, strlen(ts), '\0');
    n += part10_put_element(p ? p + n : NULL, 0x0012, "UI", PART10_IMPLEMENTATION_UID,
                            strlen(PART10_IMPLEMENTATION_UID), '\0');
    n += part10_put_element(p ? p + n : NULL, 0x0013, "SH", PART10_IMPLEMENTATION_VERSION,
                            strlen(PART10_IMPLEMENTATION_VERSION), ' ');
    return n;
}

static bool part10_uid_arg_ok(const char *uid)
{
    return uid != NULL && strlen(uid) <= PART10_UID_MAX;
}

/* The header's size for these UIDs, or 0 when an argument is bad. */
static size_t part10_header_size(const char *sop_class_uid, const char *sop_instance_uid,
                                 const char *transfer_syntax_uid)
{
    if (!part10_uid_arg_ok(sop_class_uid) || !part10_uid_arg_ok(sop_instance_uid) ||
        !part10_uid_arg_ok(transfer_syntax_uid))
        return 0;
    return PART10_PREFIX + PART10_GROUP_LENGTH_SIZE +
           part10_put_meta(NULL, sop_class_uid, sop_instance_uid, transfer_syntax_uid);
}

/* Writes the header (size bytes, from part10_header_size) at b. */
static void part10_write_header(uint8_t *b, size_t size, const char *sop_class_uid,
                                const char *sop_instance_uid, const char *transfer_syntax_uid)
{
    size_t group = size - PART10_PREFIX - PART10_GROUP_LENGTH_SIZE;
    memset(b, 0, 128);
    memcpy(b + 128, "DICM", 4);
    static const uint8_t gl_hdr[8] = {0x02, 0x00, 0x00, 0x00, 'U', 'L', 0x04, 0x00};
    memcpy(b + PART10_PREFIX, gl_hdr, sizeof gl_hdr);
    part10_put_le32(b + PART10_PREFIX + 8, (uint32_t)group);
    size_t written = part10_put_meta(b + PART10_PREFIX + PART10_GROUP_LENGTH_SIZE, sop_class_uid,
                                     sop_instance_uid, transfer_syntax_uid);
    SP_ASSERT(written == group);
}

int part10_make(const uint8_t *dataset, size_t len, const char *sop_class_uid,
                const char *sop_instance_uid, const char *transfer_syntax_uid, uint8_t **out,
                size_t *out_len)
{
    if (out == NULL || out_len == NULL || (dataset == NULL && len > 0))
        return SP_EINVAL;
    size_t head = part10_header_size(sop_class_uid, sop_instance_uid, transfer_syntax_uid);
    if (head == 0 || len > SIZE_MAX - head)
        return SP_EINVAL;
    uint8_t *b = sp_malloc(head + len);
    part10_write_header(b, head, sop_class_uid, sop_instance_uid, transfer_syntax_uid);
    if (len > 0)
        memcpy(b + head, dataset, len);
    *out = b;
    *out_len = head + len;
    return 0;
}

int part10_frame_in_place(uint8_t *dataset, size_t headroom, const char *sop_class_uid,
                          const char *sop_instance_uid, const char *transfer_syntax_uid,
                          uint8_t **start)
{
    if (dataset == NULL || start == NULL)
        return SP_EINVAL;
    size_t head = part10_header_size(sop_class_uid, sop_instance_uid, transfer_syntax_uid);
    if (head == 0 || head > headroom)
        return SP_EINVAL;
    *start = dataset - head;
    part10_write_header(*start, head, sop_class_uid, sop_instance_uid, transfer_syntax_uid);
    return 0;
}

/* Copies a UI value without its padding into dst (65 bytes). Returns false
 * when it is longer than a UID may be or holds other characters. */
static bool part10_copy_uid(char dst[65], const uint8_t *v, size_t vlen)
{
    while (vlen > 0 && (v[vlen - 1] == '\0' || v[vlen - 1] == ' '))
        vlen--;
    if (vlen > PART10_UID_MAX)
        return false;
    /* A UID is digits and dots: a NUL or space inside would make the value
     * read back as another (shorter) UID than the one stored. */
    for (size_t i = 0; i < vlen; i++)
        if (!(v[i] == '.' || (v[i] >= '0' && v[i] <= '9')))
            return false;
    memcpy(dst, v, vlen);
    dst[vlen] = '\0';
    return true;
}

int part10_split(const uint8_t *p, size_t len, part10_meta_t *meta)
{
    if (p == NULL || meta == NULL || len < PART10_PREFIX + PART10_GROUP_LENGTH_SIZE ||
        memcmp(p + 128, "DICM", 4) != 0)
        return SP_EINVAL;
    memset(meta, 0, sizeof *meta);
    const uint8_t *gl = p + PART10_PREFIX;
    if (gl[0] != 0x02 || gl[1] != 0x00 || gl[2] != 0x00 || gl[3] != 0x00 || gl[4] != 'U' ||
        gl[5] != 'L' || gl[6] != 0x04 || gl[7] != 0x00)
        return SP_EINVAL;
    /* Compare lengths by subtraction: start + group could overflow. */
    size_t start = PART10_PREFIX + PART10_GROUP_LENGTH_SIZE;
    uint32_t group = part10_le32(gl + 8);
    if ((size_t)group > len - start)
        return SP_EINVAL;
    size_t end = start + group;
    size_t off = start;
    while (off < end) {
        if (end - off < 8)
            return SP_EINVAL;
        const uint8_t *e = p + off;
        if (e[0] != 0x02 || e[1] != 0x00)
            return SP_EINVAL;
        uint16_t elem = (uint16_t)(e[2] | e[3] << 8);
        size_t hdr, vlen;
        if (part10_long_vr(e + 4)) {
            if (end - off < 12)
                return SP_EINVAL;
            vlen = part10_le32(e + 8);
            hdr = 12;
        } else {
            vlen = (size_t)e[6] | (size_t)e[7] << 8;
            hdr = 8;
        }
        /* Undefined length (0xFFFFFFFF) fails here too: it never fits. */
        if (vlen > end - off - hdr)
            return SP_EINVAL;
        const uint8_t *v = e + hdr;
        bool ok = true;
        if (elem == 0x0002)
            ok = part10_copy_uid(meta->sop_class, v, vlen);
        else if (elem == 0x0003)
            ok = part10_copy_uid(meta->sop_instance, v, vlen);
        else if (elem == 0x0010)
            ok = part10_copy_uid(meta->ts, v, vlen);
        if (!ok)
            return SP_EINVAL;
        off += hdr + vlen;
    }
    if (meta->ts[0] == '\0')
        return SP_EINVAL;
    meta->dataset_offset = end;
    return 0;
}

int part10_metadata(const uint8_t *obj, size_t len, uint8_t **out, size_t *out_len)
{
    part10_meta_t meta;
    *out = NULL;
    *out_len = 0;
    if (part10_split(obj, len, &meta) != 0)
        return SP_EINVAL;
    dsscan_syntax_t syntax = dsscan_syntax_of(meta.ts);
    if (syntax == DSSCAN_DEFLATED_LE)
        return SP_ENOTFOUND; /* the offsets would be of the inflated bytes */
    /* The object was checked with the router's limits before it was stored;
     * here only its structure matters, so size and element count are not
     * bounded (the depth still is: it sizes the scanner's stack). */
    dsscan_limits_t lim = dsscan_limits_default();
    lim.max_bytes = 0;
    lim.max_elements = UINT64_MAX;
    lim.max_depth = 4096;
    dsscan_t *sc = dsscan_new(syntax, &lim);
    const uint8_t *ds = obj + meta.dataset_offset;
    size_t dslen = len - meta.dataset_offset;
    int rc = dsscan_feed(sc, ds, dslen);
    if (rc == 0)
        rc = dsscan_finish(sc, NULL, NULL, 0);
    dsscan_span_t px;
    if (rc == 0)
        rc = dsscan_pixel_data(sc, &px);
    dsscan_destroy(&sc);
    if (rc != 0)
        return rc == SP_ENOTFOUND ? SP_ENOTFOUND : SP_EINVAL;
    size_t hl = (size_t)(px.value - px.header);
    SP_ASSERT(hl == 8 || hl == 12);
    SP_ASSERT(px.end <= dslen && px.value <= px.end);
    size_t head = meta.dataset_offset + (size_t)px.header;
    size_t tail = dslen - (size_t)px.end;
    /* The length field is the header's last four bytes (implicit VR, and
     * explicit VR with a 4-byte length) or last two (a 2-byte-length VR,
     * which Pixel Data never has in a valid object). */
    size_t lenbytes = hl == 12 || syntax == DSSCAN_IMPLICIT_LE ? 4 : 2;
    bool encapsulated = lenbytes == 4 && memcmp(obj + head + hl - 4, "\xFF\xFF\xFF\xFF", 4) == 0;
    /* Encapsulated Pixel Data keeps its form, emptied: an empty Basic
     * Offset Table item and the sequence delimiter (DCMTK refuses a
     * defined-length Pixel Data in a compressed syntax). Native Pixel Data
     * gets length 0. */
    static const uint8_t empty_frags[16] = {0xFE, 0xFF, 0x00, 0xE0, 0, 0, 0, 0,
                                            0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0};
    size_t mid = encapsulated ? sizeof empty_frags : 0;
    uint8_t *m = sp_malloc(head + hl + mid + tail + 1);
    memcpy(m, obj, head + hl);
    if (encapsulated)
        memcpy(m + head + hl, empty_frags, mid);
    else
        memset(m + head + hl - lenbytes, 0, lenbytes);
    memcpy(m + head + hl + mid, ds + px.end, tail);
    *out = m;
    *out_len = head + hl + mid + tail;
    return 0;
}
