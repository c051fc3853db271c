/* dsscan.c - the data set pre-scanner (dsscan.h).
 *
 * A byte-driven state machine with an explicit stack of open containers
 * (the top-level data set, sequences, items, fragment lists), allocated
 * once from the depth limit: input can never make it recurse or allocate.
 * Everything read comes from outside, so every check here turns into an
 * error code and a reason; SP_ASSERT guards only the scanner's own
 * bookkeeping.
 *
 * The rules follow what DCMTK 3.6.7 would build from the same bytes, and
 * where they differ the scanner is the stricter one, because a structure
 * DCMTK nests but the scanner skipped would defeat the point: an unknown
 * explicit VR, undefined length on a VR that cannot have it, an item or
 * delimiter where none belongs, and a length running past its container are
 * all refused. */
#include "dsscan.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#define UNDEF_LEN 0xFFFFFFFFu
#define NO_END UINT64_MAX
#define INFLATE_CHUNK 16384
#define INFLATE_GRACE (1u << 20)
#define TRAILER_MAX 8u

#define TAG(g, e) (((uint32_t)(g) << 16) | (uint32_t)(e))
#define TAG_ITEM TAG(0xFFFE, 0xE000)
#define TAG_ITEM_END TAG(0xFFFE, 0xE00D)
#define TAG_SEQ_END TAG(0xFFFE, 0xE0DD)
#define TAG_PIXEL_DATA TAG(0x7FE0, 0x0010)

/* How the elements inside a container are encoded. */
typedef enum { ENC_IMPLICIT_LE, ENC_EXPLICIT_LE, ENC_EXPLICIT_BE } enc_t;

/* LIST holds elements (the data set or an item), SEQ holds items, FRAGS
 * holds the fragments of encapsulated Pixel Data. */
typedef enum { FRAME_LIST, FRAME_SEQ, FRAME_FRAGS } frame_kind_t;

typedef struct {
    frame_kind_t kind;
    enc_t enc;
    uint64_t start; /* offset of the header that opened it, for messages */
    uint64_t end;   /* offset its value ends at, NO_END when delimited */
    uint64_t limit; /* nearest end of this or any enclosing container */
} frame_t;

/* STATE_HEADER collects an element header into hdr; STATE_PEEK collects
 * the first four value bytes of an element that may hold items; STATE_SKIP
 * passes over a value. */
typedef enum { STATE_HEADER, STATE_PEEK, STATE_SKIP } state_t;

struct dsscan {
    dsscan_limits_t lim;
    dsscan_syntax_t syntax;
    int error;        /* first failure, sticky */
    char reason[160]; /* its text */
    state_t state;
    uint64_t off; /* data set bytes consumed (inflated) */
    uint8_t hdr[12];
    size_t hlen;
    uint64_t hoff;  /* offset of the header being collected */
    uint32_t tag;   /* of the last complete header */
    uint32_t len;   /* its value length */
    uint64_t skip;  /* STATE_SKIP: bytes left */
    uint64_t vend;  /* STATE_PEEK: where the peeked value ends */
    enc_t peek_enc; /* STATE_PEEK: encoding of the items, if they are */
    uint64_t elements;
    uint32_t depth, max_seen;
    /* The first top-level Pixel Data element: where its header and value
     * start and where it ends (px_end is 0 while its fragments are still
     * open), for dsscan_pixel_data(). */
    bool px_seen;
    uint64_t px_header, px_value, px_end;
    /* Grown on demand up to cap (what max_depth allows): a caller's generous
     * depth limit would otherwise cost a zeroed allocation per scan. */
    frame_t *stack;
    size_t nframes, allocated, cap;
    /* Deflated syntax only. */
    z_stream z;
    bool z_open, z_done;
    uint64_t z_in;
    uint8_t *zbuf;
};

uint64_t dsscan_declared_end(const dsscan_t *s)
{
    if (s->syntax == DSSCAN_DEFLATED_LE)
        return s->z_in;
    uint64_t end = s->off;
    if (s->state == STATE_SKIP && s->off + s->skip > end)
        end = s->off + s->skip;
    if (s->state == STATE_PEEK && s->vend > end)
        end = s->vend;
    for (size_t i = 0; i < s->nframes; i++)
        if (s->stack[i].end != NO_END && s->stack[i].end > end)
            end = s->stack[i].end;
    return end;
}

dsscan_limits_t dsscan_limits_default(void)
{
    dsscan_limits_t lim = {
        .max_depth = 64,
        .max_elements = 4000000,
        .max_bytes = (uint64_t)1 << 30,
        .max_inflate_ratio = 200,
    };
    return lim;
}

dsscan_syntax_t dsscan_syntax_of(const char *uid)
{
    if (uid == NULL) {
        return DSSCAN_EXPLICIT_LE;
    }
    if (strcmp(uid, "1.2.840.10008.1.2") == 0) {
        return DSSCAN_IMPLICIT_LE;
    }
    if (strcmp(uid, "1.2.840.10008.1.2.2") == 0) {
        return DSSCAN_EXPLICIT_BE;
    }
    if (strcmp(uid, "1.2.840.10008.1.2.1.99") == 0) {
        return DSSCAN_DEFLATED_LE;
    }
    return DSSCAN_EXPLICIT_LE;
}

/* Records the first failure; later ones are consequences and are dropped. */
__attribute__((format(printf, 3, 4))) static int fail(dsscan_t *s, int code, const char *fmt, ...)
{
    if (s->error == 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(s->reason, sizeof s->reason, fmt, ap);
        va_end(ap);
        s->error = code;
    }
    return s->error;
}

static const char *frame_name(const frame_t *f)
{
    switch (f->kind) {
    case FRAME_LIST: return "item";
    case FRAME_SEQ: return "sequence";
    case FRAME_FRAGS: return "pixel data fragments";
    }
    return "?";
}

static uint16_t get16(const uint8_t *p, enc_t enc)
{
    if (enc == ENC_EXPLICIT_BE) {
        return (uint16_t)((p[0] << 8) | p[1]);
    }
    return (uint16_t)(p[0] | (p[1] << 8));
}

static uint32_t get32(const uint8_t *p, enc_t enc)
{
    if (enc == ENC_EXPLICIT_BE) {
        return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
    }
    return p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static uint32_t get_tag(const uint8_t *p, enc_t enc)
{
    return TAG(get16(p, enc), get16(p + 2, enc));
}

/* Explicit VRs with 2 reserved bytes and a 32-bit length (PS3.5 7.1.2). */
static const char long_vrs[][3] = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ",
                                   "UC", "UN", "UR", "UT", "SV", "UV"};
static const char short_vrs[][3] = {"AE", "AS", "AT", "CS", "DA", "DS", "DT",
                                    "FL", "FD", "IS", "LO", "LT", "PN", "SH",
                                    "SL", "SS", "ST", "TM", "UI", "UL", "US"};

/* 12 for a long VR, 8 for a short one, 0 for a VR this scanner does not
 * know (refused: DCMTK guesses at those, and the guess could hide items). */
static size_t vr_header_len(const uint8_t *vr)
{
    for (size_t i = 0; i < SP_ARRAY_LEN(long_vrs); i++) {
        if (vr[0] == long_vrs[i][0] && vr[1] == long_vrs[i][1]) {
            return 12;
        }
    }
    for (size_t i = 0; i < SP_ARRAY_LEN(short_vrs); i++) {
        if (vr[0] == short_vrs[i][0] && vr[1] == short_vrs[i][1]) {
            return 8;
        }
    }
    return 0;
}

static bool vr_is(const uint8_t *vr, const char *name)
{
    return vr[0] == (uint8_t)name[0] && vr[1] == (uint8_t)name[1];
}

static frame_t *top(dsscan_t *s)
{
    SP_ASSERT(s->nframes > 0);
    return &s->stack[s->nframes - 1];
}

/* Opens a container whose value starts at vstart; len is its value length
 * or UNDEF_LEN. Sequences and fragment lists count against the depth. */
static int push(dsscan_t *s, frame_kind_t kind, enc_t enc, uint64_t vstart, uint32_t len)
{
    if (kind != FRAME_LIST) {
        if (s->depth + 1 > s->lim.max_depth) {
            return fail(s, SP_ETOOBIG, "nesting depth %u over the limit %u at offset %llu",
                        s->depth + 1, s->lim.max_depth, (unsigned long long)s->hoff);
        }
        s->depth++;
        if (s->depth > s->max_seen) {
            s->max_seen = s->depth;
        }
    }
    /* Two frames per level (a sequence and one of its items) plus the data
     * set itself: the depth check above keeps within cap. */
    SP_ASSERT(s->nframes < s->cap);
    if (s->nframes == s->allocated) {
        size_t grown = s->allocated * 2 < s->cap ? s->allocated * 2 : s->cap;
        s->stack = sp_realloc(s->stack, grown * sizeof *s->stack);
        s->allocated = grown;
    }
    const frame_t *parent = top(s);
    frame_t *f = &s->stack[s->nframes++];
    f->kind = kind;
    f->enc = enc;
    f->start = s->hoff;
    f->end = len == UNDEF_LEN ? NO_END : vstart + len;
    f->limit = f->end < parent->limit ? f->end : parent->limit;
    return 0;
}

static void pop(dsscan_t *s)
{
    SP_ASSERT(s->nframes > 1);
    if (s->nframes == 2 && top(s)->kind == FRAME_FRAGS && s->px_seen && s->px_end == 0) {
        s->px_end = s->off; /* the top-level Pixel Data's sequence delimiter was read */
    }
    if (top(s)->kind != FRAME_LIST) {
        SP_ASSERT(s->depth > 0);
        s->depth--;
    }
    s->nframes--;
}

/* At an element boundary: closes every defined-length container that ends
 * here, and gets ready for the next header. */
static void boundary(dsscan_t *s)
{
    while (s->nframes > 1 && top(s)->end == s->off) {
        pop(s);
    }
    s->state = STATE_HEADER;
    s->hlen = 0;
    s->hoff = s->off;
}

/* Whether a value of len bytes starting at vstart fits its container. */
static int check_fits(dsscan_t *s, uint64_t vstart, uint32_t len)
{
    const frame_t *f = top(s);
    uint64_t vend = vstart + len;
    if (f->limit != NO_END && vend > f->limit) {
        return fail(s, SP_EINVAL,
                    "element (%04X,%04X) length %lu at offset %llu past the end of its %s at "
                    "offset %llu",
                    s->tag >> 16, s->tag & 0xFFFF, (unsigned long)len, (unsigned long long)s->hoff,
                    frame_name(f), (unsigned long long)f->limit);
    }
    if (s->lim.max_bytes != 0 && vend > s->lim.max_bytes) {
        return fail(s, SP_ETOOBIG,
                    "element (%04X,%04X) length %lu at offset %llu past the limit of %llu bytes",
                    s->tag >> 16, s->tag & 0xFFFF, (unsigned long)len, (unsigned long long)s->hoff,
                    (unsigned long long)s->lim.max_bytes);
    }
    return 0;
}

/* How many header bytes the current header needs, judging from the hlen
 * bytes collected so far (it grows 4 -> 6 -> 8 or 12 as the tag and VR
 * become known); 0 after recording a failure. */
static size_t header_need(dsscan_t *s)
{
    const frame_t *f = top(s);
    if (s->hlen < 4) {
        return 4;
    }
    if (f->kind != FRAME_LIST || f->enc == ENC_IMPLICIT_LE || (get16(s->hdr, f->enc) == 0xFFFE)) {
        return 8;
    }
    if (s->hlen < 6) {
        return 6;
    }
    size_t n = vr_header_len(s->hdr + 4);
    if (n == 0) {
        uint32_t tag = get_tag(s->hdr, f->enc);
        fail(s, SP_EINVAL, "element (%04X,%04X) at offset %llu has an unknown VR 0x%02X%02X",
             tag >> 16, tag & 0xFFFF, (unsigned long long)s->hoff, s->hdr[4], s->hdr[5]);
    }
    return n;
}

/* Handles an item or delimiter header (group FFFE) in a container. */
static int item_header(dsscan_t *s, uint64_t vstart)
{
    frame_t *f = top(s);
    uint32_t tag = s->tag, len = s->len;
    if (tag == TAG_SEQ_END && f->kind != FRAME_LIST && f->end == NO_END) {
        if (len != 0) {
            return fail(s, SP_EINVAL, "sequence delimiter at offset %llu has length %lu",
                        (unsigned long long)s->hoff, (unsigned long)len);
        }
        pop(s);
        boundary(s);
        return 0;
    }
    if (tag == TAG_ITEM_END && f->kind == FRAME_LIST && s->nframes > 1 && f->end == NO_END) {
        if (len != 0) {
            return fail(s, SP_EINVAL, "item delimiter at offset %llu has length %lu",
                        (unsigned long long)s->hoff, (unsigned long)len);
        }
        pop(s);
        boundary(s);
        return 0;
    }
    if (tag == TAG_ITEM && f->kind == FRAME_SEQ) {
        if (len != UNDEF_LEN && check_fits(s, vstart, len) != 0) {
            return s->error;
        }
        push(s, FRAME_LIST, f->enc, vstart, len);
        boundary(s);
        return 0;
    }
    if (tag == TAG_ITEM && f->kind == FRAME_FRAGS) {
        if (len == UNDEF_LEN) {
            return fail(s, SP_EINVAL, "pixel data fragment at offset %llu has undefined length",
                        (unsigned long long)s->hoff);
        }
        if (check_fits(s, vstart, len) != 0) {
            return s->error;
        }
        s->state = STATE_SKIP;
        s->skip = len;
        return 0;
    }
    return fail(s, SP_EINVAL, "unexpected (%04X,%04X) at offset %llu in %s", tag >> 16,
                tag & 0xFFFF, (unsigned long long)s->hoff,
                s->nframes == 1 ? "the data set" : frame_name(f));
}

/* Handles a complete header of hl bytes. */
static int header(dsscan_t *s, size_t hl)
{
    frame_t *f = top(s);
    enc_t enc = f->enc;
    uint64_t vstart = s->hoff + hl;
    const uint8_t *vr = NULL;
    s->tag = get_tag(s->hdr, enc);
    if (++s->elements > s->lim.max_elements) {
        return fail(s, SP_ETOOBIG, "more than %llu elements at offset %llu",
                    (unsigned long long)s->lim.max_elements, (unsigned long long)s->hoff);
    }
    if (f->limit != NO_END && vstart > f->limit) {
        return fail(s, SP_EINVAL, "element header at offset %llu past the end of its %s",
                    (unsigned long long)s->hoff, frame_name(f));
    }
    if (hl == 8 && (f->kind != FRAME_LIST || enc == ENC_IMPLICIT_LE || s->tag >> 16 == 0xFFFE)) {
        s->len = get32(s->hdr + 4, enc);
    } else if (hl == 8) {
        vr = s->hdr + 4;
        s->len = get16(s->hdr + 6, enc);
    } else {
        vr = s->hdr + 4;
        s->len = get32(s->hdr + 8, enc);
    }
    if (s->tag >> 16 == 0xFFFE || f->kind != FRAME_LIST) {
        return item_header(s, vstart);
    }

    uint32_t len = s->len;
    if (s->nframes == 1 && s->tag == TAG_PIXEL_DATA && !s->px_seen) {
        s->px_seen = true;
        s->px_header = s->hoff;
        s->px_value = vstart;
        s->px_end = len == UNDEF_LEN ? 0 : vstart + len;
    }
    if (len == UNDEF_LEN) {
        if (vr == NULL) {
            /* Implicit VR: DCMTK reads any undefined-length element as a
             * sequence, except Pixel Data, which holds fragments. */
            frame_kind_t kind = s->tag == TAG_PIXEL_DATA ? FRAME_FRAGS : FRAME_SEQ;
            if (push(s, kind, ENC_IMPLICIT_LE, vstart, len) == 0) {
                boundary(s);
            }
            return s->error;
        }
        if (vr_is(vr, "SQ")) {
            push(s, FRAME_SEQ, enc, vstart, len);
        } else if (vr_is(vr, "UN")) {
            push(s, FRAME_SEQ, ENC_IMPLICIT_LE, vstart, len);
        } else if ((vr_is(vr, "OB") || vr_is(vr, "OW")) && s->tag == TAG_PIXEL_DATA) {
            push(s, FRAME_FRAGS, enc, vstart, len);
        } else {
            return fail(s, SP_EINVAL,
                        "element (%04X,%04X) at offset %llu has undefined length with VR %c%c",
                        s->tag >> 16, s->tag & 0xFFFF, (unsigned long long)s->hoff, vr[0], vr[1]);
        }
        if (s->error == 0) {
            boundary(s);
        }
        return s->error;
    }

    if (check_fits(s, vstart, len) != 0) {
        return s->error;
    }
    if (vr != NULL && vr_is(vr, "SQ")) {
        if (push(s, FRAME_SEQ, enc, vstart, len) == 0) {
            boundary(s);
        }
        return s->error;
    }
    /* A defined-length implicit VR element may be a sequence the dictionary
     * knows (DCMTK then parses its items), and an explicit UN may be one
     * DCMTK converts: scan either as a sequence when its value starts with
     * an item tag. Bulk data that DCMTK never reads as items is skipped. */
    uint16_t group = (uint16_t)(s->tag >> 16);
    bool bulk = s->tag == TAG_PIXEL_DATA || (group >= 0x6000 && group <= 0x60FF) ||
                s->tag == TAG(0x5400, 0x1010);
    if ((vr == NULL || vr_is(vr, "UN")) && len >= 8 && !bulk) {
        s->state = STATE_PEEK;
        s->vend = vstart + len;
        s->peek_enc = ENC_IMPLICIT_LE;
        s->hlen = 0;
        return 0;
    }
    s->state = STATE_SKIP;
    s->skip = len;
    return 0;
}

/* Scans n plain (inflated) data set bytes. */
static int scan(dsscan_t *s, const uint8_t *p, size_t n)
{
    /* Scan up to the limit first, so that the verdict (and the reason) is
     * the same however the bytes were split. */
    bool over = s->lim.max_bytes != 0 && n > s->lim.max_bytes - s->off;
    if (over) {
        n = (size_t)(s->lim.max_bytes - s->off);
    }
    while (n > 0 && s->error == 0) {
        size_t take = 0;
        switch (s->state) {
        case STATE_HEADER: {
            size_t need = header_need(s);
            if (need == 0) {
                return s->error;
            }
            take = need - s->hlen < n ? need - s->hlen : n;
            memcpy(s->hdr + s->hlen, p, take);
            s->hlen += take;
            s->off += take;
            if (s->hlen == need && header_need(s) == need) {
                header(s, need);
            }
            break;
        }
        case STATE_PEEK:
            take = 4 - s->hlen < n ? 4 - s->hlen : n;
            memcpy(s->hdr + s->hlen, p, take);
            s->hlen += take;
            s->off += take;
            if (s->hlen == 4) {
                uint64_t vstart = s->off - 4;
                if (get_tag(s->hdr, ENC_IMPLICIT_LE) == TAG_ITEM) {
                    /* The four bytes start the first item's header. */
                    if (push(s, FRAME_SEQ, s->peek_enc, vstart, (uint32_t)(s->vend - vstart)) ==
                        0) {
                        s->state = STATE_HEADER;
                        s->hoff = vstart;
                    }
                } else {
                    s->state = STATE_SKIP;
                    s->skip = s->vend - s->off;
                }
            }
            break;
        case STATE_SKIP:
            take = s->skip < n ? (size_t)s->skip : n;
            s->skip -= take;
            s->off += take;
            break;
        }
        p += take;
        n -= take;
        if (s->state == STATE_SKIP && s->skip == 0 && s->error == 0) {
            boundary(s);
        }
    }
    if (over) {
        return fail(s, SP_ETOOBIG, "data set over the limit of %llu bytes",
                    (unsigned long long)s->lim.max_bytes);
    }
    return s->error;
}

static int inflate_feed(dsscan_t *s, const uint8_t *p, size_t n)
{
    if (s->z_done) {
        /* Writers pad the compressed stream to an even length, and some
         * append a gzip-style trailer (CRC-32 and size: pydicom's
         * image_dfl.dcm does). DCMTK never parses what follows the stream,
         * so up to 8 bytes are let through; more is not a DICOM writer. */
        s->z_in += n;
        if (s->z_in > TRAILER_MAX) {
            return fail(s, SP_EINVAL, "more than %u bytes after the end of the deflated data",
                        TRAILER_MAX);
        }
        return 0;
    }
    s->z.next_in = (Bytef *)p;
    s->z.avail_in = 0;
    while (s->error == 0) {
        if (s->z.avail_in == 0 && n > 0) {
            uInt chunk = n > (1u << 30) ? (1u << 30) : (uInt)n;
            s->z.next_in = (Bytef *)p;
            s->z.avail_in = chunk;
            p += chunk;
            n -= chunk;
        }
        uInt before = s->z.avail_in;
        s->z.next_out = s->zbuf;
        s->z.avail_out = INFLATE_CHUNK;
        int zr = inflate(&s->z, Z_NO_FLUSH);
        size_t out = INFLATE_CHUNK - s->z.avail_out;
        s->z_in += before - s->z.avail_in;
        /* What inflated before a corrupt spot is scanned first, and the
         * spot is named by inflated offset: both are the same however the
         * input was split (how far zlib reads ahead is not). */
        if (out > 0 && scan(s, s->zbuf, out) != 0) {
            return s->error;
        }
        if (zr != Z_OK && zr != Z_STREAM_END && zr != Z_BUF_ERROR) {
            return fail(s, SP_EINVAL, "deflated data corrupt after %llu inflated bytes: %s",
                        (unsigned long long)s->off, s->z.msg ? s->z.msg : "error");
        }
        if (s->lim.max_inflate_ratio != 0 && s->off > INFLATE_GRACE &&
            s->off / s->lim.max_inflate_ratio > s->z_in) {
            return fail(s, SP_ETOOBIG, "inflate ratio over %u (%llu bytes from %llu)",
                        s->lim.max_inflate_ratio, (unsigned long long)s->off,
                        (unsigned long long)s->z_in);
        }
        if (zr == Z_STREAM_END) {
            s->z_done = true;
            s->z_in = 0;
            /* What follows the stream is contiguous: the rest of this chunk, then p. */
            return inflate_feed(s, s->z.next_in, s->z.avail_in + n);
        }
        if (out == 0 && zr == Z_BUF_ERROR && s->z.avail_in > 0) {
            /* No progress with input and output room: zlib wants nothing more. */
            return fail(s, SP_EINVAL, "deflated data stalled after %llu bytes",
                        (unsigned long long)s->z_in);
        }
        /* A full output buffer may leave output pending inside zlib, so go
         * round again even when the input is used up. */
        if (out < INFLATE_CHUNK && s->z.avail_in == 0 && n == 0) {
            break;
        }
    }
    return s->error;
}

dsscan_t *dsscan_new(dsscan_syntax_t syntax, const dsscan_limits_t *lim)
{
    dsscan_t *s = sp_calloc(1, sizeof *s);
    s->lim = lim ? *lim : dsscan_limits_default();
    if (s->lim.max_depth == 0) {
        s->lim.max_depth = 1;
    }
    if (s->lim.max_depth > 1u << 20) {
        s->lim.max_depth = 1u << 20; /* keeps the stack allocation sane */
    }
    s->syntax = syntax;
    s->cap = 2 * (size_t)s->lim.max_depth + 1;
    s->allocated = s->cap < 16 ? s->cap : 16;
    s->stack = sp_malloc(s->allocated * sizeof *s->stack);
    frame_t *f = &s->stack[s->nframes++];
    f->kind = FRAME_LIST;
    f->enc = syntax == DSSCAN_IMPLICIT_LE   ? ENC_IMPLICIT_LE
             : syntax == DSSCAN_EXPLICIT_BE ? ENC_EXPLICIT_BE
                                            : ENC_EXPLICIT_LE;
    f->start = 0;
    f->end = NO_END;
    f->limit = NO_END;
    s->state = STATE_HEADER;
    if (syntax == DSSCAN_DEFLATED_LE) {
        /* Raw deflate (no zlib header), as PS3.5 A.5 specifies. */
        if (inflateInit2(&s->z, -MAX_WBITS) != Z_OK) {
            fail(s, SP_EINVAL, "inflateInit2 failed");
        } else {
            s->z_open = true;
        }
        s->zbuf = sp_malloc(INFLATE_CHUNK);
    } else if (syntax != DSSCAN_IMPLICIT_LE && syntax != DSSCAN_EXPLICIT_LE &&
               syntax != DSSCAN_EXPLICIT_BE) {
        fail(s, SP_EINVAL, "unknown syntax %d", (int)syntax);
    }
    return s;
}

int dsscan_feed(dsscan_t *s, const uint8_t *p, size_t n)
{
    if (s->error != 0 || n == 0) {
        return s->error;
    }
    if (s->syntax == DSSCAN_DEFLATED_LE) {
        return inflate_feed(s, p, n);
    }
    return scan(s, p, n);
}

int dsscan_pixel_data(const dsscan_t *s, dsscan_span_t *out)
{
    if (!s->px_seen || s->px_end == 0 || s->px_end > s->off || s->syntax == DSSCAN_DEFLATED_LE) {
        return SP_ENOTFOUND;
    }
    out->header = s->px_header;
    out->value = s->px_value;
    out->end = s->px_end;
    return 0;
}

int dsscan_finish(dsscan_t *s, dsscan_stats_t *stats, char *err, size_t errlen)
{
    if (s->error == 0 && s->syntax == DSSCAN_DEFLATED_LE && !s->z_done && s->off + s->z_in > 0) {
        fail(s, SP_EINVAL, "deflated data truncated after %llu bytes", (unsigned long long)s->z_in);
    }
    if (s->error == 0 && s->state == STATE_HEADER && s->hlen > 0) {
        fail(s, SP_EINVAL, "truncated element header at offset %llu", (unsigned long long)s->hoff);
    }
    if (s->error == 0 && s->state != STATE_HEADER) {
        fail(s, SP_EINVAL,
             "element (%04X,%04X) length %lu at offset %llu past the end of the data (%llu "
             "bytes)",
             s->tag >> 16, s->tag & 0xFFFF, (unsigned long)s->len, (unsigned long long)s->hoff,
             (unsigned long long)s->off);
    }
    if (s->error == 0 && s->nframes > 1) {
        const frame_t *f = top(s);
        fail(s, SP_EINVAL, "data set ends inside the %s opened at offset %llu", frame_name(f),
             (unsigned long long)f->start);
    }
    if (stats != NULL) {
        stats->bytes = s->off;
        stats->elements = s->elements;
        stats->depth = s->max_seen;
    }
    if (s->error != 0) {
        sp_fmt(err, errlen, "%s", s->reason);
    } else if (err != NULL && errlen > 0) {
        err[0] = '\0';
    }
    return s->error;
}

void dsscan_destroy(dsscan_t **sp)
{
    if (sp == NULL || *sp == NULL) {
        return;
    }
    dsscan_t *s = *sp;
    if (s->z_open) {
        inflateEnd(&s->z);
    }
    free(s->zbuf);
    free(s->stack);
    free(s);
    *sp = NULL;
}

int dsscan_check(const uint8_t *buf, size_t len, dsscan_syntax_t syntax, const dsscan_limits_t *lim,
                 char *err, size_t errlen)
{
    dsscan_t *s = dsscan_new(syntax, lim);
    dsscan_feed(s, buf, len);
    int rc = dsscan_finish(s, NULL, err, errlen);
    dsscan_destroy(&s);
    return rc;
}
