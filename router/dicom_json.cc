/* dicom_json.cc - DCMTK for DICOMweb (dicom_json.h): DICOM JSON metadata,
 * frame slicing, bulk data and rendering of stored Part-10 objects.
 *
 * Each call parses the object's data set from memory into a DcmDataset of
 * its own (the pre-scan ran when the object was stored, so its nesting is
 * bounded) and copies what it returns out of DCMTK's memory. Codecs
 * (JPEG, JPEG-LS, RLE decoders) are registered once, on first use. */
#include <dcmtk/config/osconfig.h>

#include <dcmtk/dcmdata/dcdeftag.h>
#include <dcmtk/dcmdata/dcistrmb.h>
#include <dcmtk/dcmdata/dcjson.h>
#include <dcmtk/dcmdata/dcpixel.h>
#include <dcmtk/dcmdata/dcpixseq.h>
#include <dcmtk/dcmdata/dcpxitem.h>
#include <dcmtk/dcmdata/dcrledrg.h>
#include <dcmtk/dcmdata/dctk.h>
#include <dcmtk/dcmimage/diregist.h>
#include <dcmtk/dcmimage/dipipng.h>
#include <dcmtk/dcmimgle/dcmimage.h>
#include <dcmtk/dcmjpeg/dipijpeg.h>
#include <dcmtk/dcmjpeg/djdecode.h>
#include <dcmtk/dcmjpls/djdecode.h>

extern "C" {
#include "../common/base.h"
#include "dicom_json.h"
#include "part10.h"
}

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

namespace
{

const Uint32 READ_ALL = 0xFFFFFFFFu; /* read every value into memory, however long */

void set_err(char *err, size_t errlen, const std::string &msg)
{
    if (err && errlen)
        snprintf(err, errlen, "%s", msg.c_str());
}

void register_codecs()
{
    static std::once_flag once;
    std::call_once(once, [] {
        DJDecoderRegistration::registerCodecs();
        DJLSDecoderRegistration::registerCodecs();
        DcmRLEDecoderRegistration::registerCodecs();
    });
}

/* A parsed stored object. */
struct Parsed {
    DcmDataset ds;
    E_TransferSyntax xfer = EXS_Unknown;
    std::string ts;
};

int parse(const uint8_t *part10, size_t len, Parsed &p, char *err, size_t errlen)
{
    part10_meta_t meta;
    if (part10_split(part10, len, &meta) != 0) {
        set_err(err, errlen, "not a Part-10 object");
        return SP_EINVAL;
    }
    p.ts = meta.ts;
    p.xfer = DcmXfer(meta.ts).getXfer();
    if (p.xfer == EXS_Unknown) {
        set_err(err, errlen, std::string("unknown transfer syntax ") + meta.ts);
        return SP_EINVAL;
    }
    DcmInputBufferStream in;
    in.setBuffer(part10 + meta.dataset_offset,
                 OFstatic_cast(offile_off_t, len - meta.dataset_offset));
    in.setEos();
    if (p.xfer == EXS_DeflatedLittleEndianExplicit) {
#ifdef WITH_ZLIB
        if (in.installCompressionFilter(ESC_zlib).bad()) {
            set_err(err, errlen, "cannot inflate");
            return SP_EINVAL;
        }
#else
        set_err(err, errlen, "deflate not supported");
        return SP_EINVAL;
#endif
    }
    p.ds.transferInit();
    OFCondition cond = p.ds.read(in, p.xfer, EGL_noChange, READ_ALL);
    p.ds.transferEnd();
    if (cond.bad() && cond != EC_StreamNotifyClient) {
        set_err(err, errlen, std::string("malformed data set: ") + cond.text());
        return SP_EINVAL;
    }
    if (cond == EC_StreamNotifyClient) {
        set_err(err, errlen, "data set is truncated");
        return SP_EINVAL;
    }
    return 0;
}

bool is_binary_vr(DcmEVR vr)
{
    switch (vr) {
    case EVR_OB:
    case EVR_OD:
    case EVR_OF:
    case EVR_OL:
    case EVR_OV:
    case EVR_OW:
    case EVR_ox:
    case EVR_px:
    case EVR_UN: return true;
    default: return false;
    }
}

/* Replaces bytes that are not UTF-8 by U+FFFD, so the JSON is always valid
 * text (a name DCMTK could not convert from its character set). */
std::string utf8_sanitize(const std::string &in)
{
    std::string out;
    out.reserve(in.size());
    size_t i = 0, n = in.size();
    while (i < n) {
        unsigned char c = (unsigned char)in[i];
        size_t need = c < 0x80         ? 0
                      : (c >> 5) == 6  ? 1
                      : (c >> 4) == 14 ? 2
                      : (c >> 3) == 30 ? 3
                                       : 9;
        bool ok = need != 9 && i + need < n && !(need == 1 && c < 0xC2);
        for (size_t k = 1; ok && k <= need; k++)
            if (((unsigned char)in[i + k] >> 6) != 2)
                ok = false;
        if (ok) {
            out.append(in, i, need + 1);
            i += need + 1;
        } else {
            out.append("\xEF\xBF\xBD");
            i++;
        }
    }
    return out;
}

std::string tag_hex(const DcmTagKey &t)
{
    char buf[9];
    snprintf(buf, sizeof buf, "%04X%04X", t.getGroup(), t.getElement());
    return buf;
}

/* The VR name DICOM JSON uses for an element (DCMTK's internal ox/px/... as
 * the standard VR they stand for). */
const char *json_vr(DcmElement *e)
{
    DcmEVR vr = e->getTag().getEVR();
    switch (vr) {
    case EVR_ox:
    case EVR_px: return e->getTag().getEVR() == EVR_OW ? "OW" : "OB";
    case EVR_UNKNOWN:
    case EVR_UNKNOWN2B: return "UN";
    default: return DcmVR(vr).getValidVRName();
    }
}

/* The frames of Pixel Data stored encapsulated: the fragments making up
 * each frame, found from the Basic Offset Table, one fragment per frame, or
 * the JPEG / JPEG 2000 start markers; a single frame is every fragment. */
int encapsulated_frames(DcmPixelSequence *seq, unsigned long nframes,
                        std::vector<std::vector<DcmPixelItem *>> &frames, std::string &why)
{
    unsigned long card = seq->card();
    if (card < 2) {
        why = "encapsulated Pixel Data without fragments";
        return SP_EINVAL;
    }
    std::vector<DcmPixelItem *> frags;
    for (unsigned long i = 1; i < card; i++) {
        DcmPixelItem *it = nullptr;
        if (seq->getItem(it, i).bad() || it == nullptr) {
            why = "unreadable fragment";
            return SP_EINVAL;
        }
        frags.push_back(it);
    }
    frames.assign(nframes, {});
    if (nframes == 1) {
        frames[0] = frags;
        return 0;
    }
    if (frags.size() == nframes) {
        for (size_t i = 0; i < nframes; i++)
            frames[i].push_back(frags[i]);
        return 0;
    }
    DcmPixelItem *bot = nullptr;
    Uint8 *botv = nullptr;
    unsigned long botlen = 0;
    if (seq->getItem(bot, 0).good() && bot && (botlen = bot->getLength()) >= 4 * nframes &&
        bot->getUint8Array(botv).good() && botv) {
        std::vector<Uint64> offsets;
        for (unsigned long k = 0; k + 4 <= botlen; k += 4)
            offsets.push_back((Uint64)botv[k] | (Uint64)botv[k + 1] << 8 |
                              (Uint64)botv[k + 2] << 16 | (Uint64)botv[k + 3] << 24);
        if (offsets.size() == nframes) {
            Uint64 pos = 0;
            size_t f = 0;
            for (DcmPixelItem *it : frags) {
                while (f + 1 < nframes && pos >= offsets[f + 1])
                    f++;
                if (pos < offsets[f]) {
                    why = "fragments do not match the Basic Offset Table";
                    return SP_EINVAL;
                }
                frames[f].push_back(it);
                pos += 8 + it->getLength();
            }
            for (auto &fr : frames)
                if (fr.empty()) {
                    why = "a frame without fragments in the Basic Offset Table";
                    return SP_EINVAL;
                }
            return 0;
        }
    }
    /* No usable offset table: a frame starts at each fragment that begins
     * with a JPEG SOI (FFD8) or a JPEG 2000 SOC (FF4F). */
    size_t f = 0;
    bool started = false;
    for (DcmPixelItem *it : frags) {
        Uint8 *v = nullptr;
        bool start = it->getLength() >= 2 && it->getUint8Array(v).good() && v && v[0] == 0xFF &&
                     (v[1] == 0xD8 || v[1] == 0x4F);
        if (start && started)
            f++;
        if (f >= nframes) {
            why = "more frame starts than NumberOfFrames";
            return SP_EINVAL;
        }
        started = true;
        frames[f].push_back(it);
    }
    if (f + 1 != nframes) {
        why = "cannot find every frame's fragments (no offset table)";
        return SP_EINVAL;
    }
    return 0;
}

struct Geometry {
    Uint16 rows = 0, cols = 0, spp = 1, bits = 0;
    unsigned long frames = 1;
    size_t frame_bytes = 0;
};

void geometry(DcmDataset &ds, Geometry &g)
{
    ds.findAndGetUint16(DCM_Rows, g.rows);
    ds.findAndGetUint16(DCM_Columns, g.cols);
    if (ds.findAndGetUint16(DCM_SamplesPerPixel, g.spp).bad() || g.spp == 0)
        g.spp = 1;
    ds.findAndGetUint16(DCM_BitsAllocated, g.bits);
    Sint32 nf = 1;
    if (ds.findAndGetSint32(DCM_NumberOfFrames, nf).bad() || nf < 1)
        nf = 1;
    g.frames = (unsigned long)nf;
    g.frame_bytes = (size_t)g.rows * g.cols * g.spp * g.bits / 8;
}

/* Points at the bytes of a native Pixel Data value (host order, which is
 * little endian here). */
bool native_bytes(DcmElement *pd, const Uint8 *&p, size_t &n)
{
    n = pd->getLength();
    if (pd->getTag().getEVR() == EVR_OW || pd->getVR() == EVR_OW) {
        Uint16 *w = nullptr;
        if (pd->getUint16Array(w).bad() || w == nullptr)
            return false;
        p = reinterpret_cast<const Uint8 *>(w);
        return true;
    }
    Uint8 *b = nullptr;
    if (pd->getUint8Array(b).bad() || b == nullptr)
        return false;
    p = b;
    return true;
}

uint8_t *copy_bytes(const void *p, size_t n)
{
    uint8_t *out = (uint8_t *)malloc(n ? n : 1);
    if (out == nullptr)
        abort();
    if (n)
        memcpy(out, p, n);
    return out;
}

bool is_uncompressed(const char *ts)
{
    return strcmp(ts, "1.2.840.10008.1.2") == 0 || strcmp(ts, "1.2.840.10008.1.2.1") == 0 ||
           strcmp(ts, "1.2.840.10008.1.2.2") == 0;
}

} // namespace

extern "C" int dicom_json_instance(const uint8_t *part10, size_t len, const char *instance_url,
                                   char **out, size_t *outlen, char *err, size_t errlen)
{
    try {
        Parsed p;
        int rc = parse(part10, len, p, err, errlen);
        if (rc != 0)
            return rc;
        /* Names in UTF-8: what cannot be converted stays as it was and the
         * sanitizer below replaces its bytes. */
        (void)p.ds.convertToUTF8();
        p.ds.putAndInsertString(DCM_AvailableTransferSyntaxUID, p.ts.c_str());
        DcmJsonFormatCompact fmt(OFFalse);
        std::ostringstream os;
        os << "{";
        bool first = true;
        for (unsigned long i = 0; i < p.ds.card(); i++) {
            DcmElement *e = p.ds.getElement(i);
            if (e == nullptr)
                continue;
            const DcmTag &tag = e->getTag();
            if (tag.getElement() == 0x0000)
                continue; /* group lengths are not attributes */
            if (!first)
                os << ",";
            first = false;
            bool bulk = tag == DCM_PixelData ||
                        (is_binary_vr(e->getVR()) && e->getLength() > DICOM_JSON_BULK_MIN);
            if (bulk) {
                os << "\"" << tag_hex(tag) << "\":{\"vr\":\"" << json_vr(e)
                   << "\",\"BulkDataURI\":\"" << instance_url << "/bulkdata/" << tag_hex(tag)
                   << "\"}";
            } else {
                OFCondition c = e->writeJson(os, fmt);
                if (c.bad()) {
                    set_err(err, errlen,
                            std::string("cannot write ") + tag_hex(tag) + " as JSON: " + c.text());
                    return SP_EINVAL;
                }
            }
        }
        os << "}";
        std::string text = utf8_sanitize(os.str());
        *out = (char *)copy_bytes(text.c_str(), text.size() + 1);
        *outlen = text.size();
        return 0;
    } catch (const std::exception &ex) {
        set_err(err, errlen, std::string("metadata: ") + ex.what());
        return SP_EINVAL;
    } catch (...) {
        set_err(err, errlen, "metadata: unknown exception");
        return SP_EINVAL;
    }
}

extern "C" int dicom_frames(const uint8_t *part10, size_t len, const uint32_t *numbers, size_t n,
                            const char *want_ts, dicom_frame_t *out, char ts[65], char *err,
                            size_t errlen)
{
    for (size_t i = 0; i < n; i++)
        out[i] = {nullptr, 0};
    try {
        Parsed p;
        int rc = parse(part10, len, p, err, errlen);
        if (rc != 0)
            return rc;
        bool any = want_ts == nullptr || want_ts[0] == '\0' || strcmp(want_ts, "*") == 0;
        if (!any && want_ts != p.ts && !is_uncompressed(want_ts)) {
            set_err(err, errlen, std::string("cannot convert ") + p.ts + " to " + want_ts);
            return SP_EUNKNOWN;
        }
        Geometry g;
        geometry(p.ds, g);
        DcmElement *pe = nullptr;
        if (p.ds.findAndGetElement(DCM_PixelData, pe).bad() || pe == nullptr) {
            set_err(err, errlen, "no Pixel Data");
            return SP_ENOTFOUND;
        }
        for (size_t i = 0; i < n; i++)
            if (numbers[i] < 1 || numbers[i] > g.frames) {
                set_err(err, errlen,
                        "frame " + std::to_string(numbers[i]) + " out of 1.." +
                            std::to_string(g.frames));
                return SP_ENOTFOUND;
            }
        DcmPixelData *pd = OFstatic_cast(DcmPixelData *, pe);
        bool encapsulated = DcmXfer(p.xfer).isEncapsulated();
        std::string out_ts = p.ts;
        if (encapsulated && !any && want_ts != p.ts) {
            /* The client wants it uncompressed: decode the whole object. */
            register_codecs();
            E_TransferSyntax target = DcmXfer(want_ts).getXfer();
            if (target == EXS_BigEndianExplicit || target == EXS_LittleEndianImplicit)
                target = EXS_LittleEndianExplicit;
            if (p.ds.chooseRepresentation(EXS_LittleEndianExplicit, nullptr).bad() ||
                !p.ds.canWriteXfer(EXS_LittleEndianExplicit)) {
                set_err(err, errlen, "cannot decompress " + p.ts);
                return SP_EUNKNOWN;
            }
            encapsulated = false;
            out_ts = UID_LittleEndianExplicitTransferSyntax;
            if (p.ds.findAndGetElement(DCM_PixelData, pe).bad() || pe == nullptr)
                return SP_EINVAL;
        } else if (!encapsulated) {
            /* Native bytes are sent as little endian, whatever was stored. */
            out_ts = p.xfer == EXS_LittleEndianImplicit && (any || want_ts == p.ts)
                         ? p.ts
                         : std::string(UID_LittleEndianExplicitTransferSyntax);
        }
        if (encapsulated) {
            DcmPixelSequence *seq = nullptr;
            if (pd->getEncapsulatedRepresentation(p.xfer, nullptr, seq).bad() || seq == nullptr) {
                set_err(err, errlen, "cannot read the encapsulated Pixel Data");
                return SP_EINVAL;
            }
            std::vector<std::vector<DcmPixelItem *>> frames;
            std::string why;
            if ((rc = encapsulated_frames(seq, g.frames, frames, why)) != 0) {
                set_err(err, errlen, why);
                return rc;
            }
            for (size_t i = 0; i < n; i++) {
                size_t total = 0;
                for (DcmPixelItem *it : frames[numbers[i] - 1])
                    total += it->getLength();
                uint8_t *buf = (uint8_t *)malloc(total ? total : 1);
                if (buf == nullptr)
                    abort();
                size_t at = 0;
                for (DcmPixelItem *it : frames[numbers[i] - 1]) {
                    Uint8 *v = nullptr;
                    if (it->getLength() && it->getUint8Array(v).good() && v) {
                        memcpy(buf + at, v, it->getLength());
                        at += it->getLength();
                    }
                }
                out[i] = {buf, at};
            }
        } else {
            const Uint8 *bytes = nullptr;
            size_t nbytes = 0;
            if (!native_bytes(pe, bytes, nbytes)) {
                set_err(err, errlen, "cannot read Pixel Data");
                return SP_EINVAL;
            }
            if (g.bits % 8 != 0 || g.frame_bytes == 0) {
                if (g.frames != 1) {
                    set_err(err, errlen,
                            "cannot slice frames of " + std::to_string(g.bits) + " bits allocated");
                    return SP_EINVAL;
                }
                g.frame_bytes = nbytes;
            }
            for (size_t i = 0; i < n; i++) {
                size_t off = (size_t)(numbers[i] - 1) * g.frame_bytes;
                if (off + g.frame_bytes > nbytes) {
                    for (size_t k = 0; k < i; k++)
                        free(out[k].data), out[k] = {nullptr, 0};
                    set_err(err, errlen, "Pixel Data shorter than its frames");
                    return SP_EINVAL;
                }
                out[i] = {copy_bytes(bytes + off, g.frame_bytes), g.frame_bytes};
            }
        }
        snprintf(ts, 65, "%s", out_ts.c_str());
        return 0;
    } catch (const std::exception &ex) {
        set_err(err, errlen, std::string("frames: ") + ex.what());
    } catch (...) {
        set_err(err, errlen, "frames: unknown exception");
    }
    for (size_t i = 0; i < n; i++)
        free(out[i].data), out[i] = {nullptr, 0};
    return SP_EINVAL;
}

extern "C" int dicom_bulkdata(const uint8_t *part10, size_t len, uint32_t tag, uint8_t **out,
                              size_t *outlen, char ts[65], char *err, size_t errlen)
{
    try {
        DcmTagKey key((Uint16)(tag >> 16), (Uint16)(tag & 0xffff));
        if (key == DCM_PixelData) {
            Parsed probe;
            int rc = parse(part10, len, probe, err, errlen);
            if (rc != 0)
                return rc;
            Geometry g;
            geometry(probe.ds, g);
            std::vector<uint32_t> all(g.frames);
            for (unsigned long i = 0; i < g.frames; i++)
                all[i] = (uint32_t)i + 1;
            std::vector<dicom_frame_t> frames(g.frames);
            rc = dicom_frames(part10, len, all.data(), all.size(), "*", frames.data(), ts, err,
                              errlen);
            if (rc != 0)
                return rc;
            size_t total = 0;
            for (auto &f : frames)
                total += f.len;
            uint8_t *buf = (uint8_t *)malloc(total ? total : 1);
            if (buf == nullptr)
                abort();
            size_t at = 0;
            for (auto &f : frames) {
                memcpy(buf + at, f.data, f.len);
                at += f.len;
                free(f.data);
            }
            *out = buf;
            *outlen = total;
            return 0;
        }
        Parsed p;
        int rc = parse(part10, len, p, err, errlen);
        if (rc != 0)
            return rc;
        DcmElement *e = nullptr;
        if (p.ds.findAndGetElement(key, e, OFFalse).bad() || e == nullptr) {
            set_err(err, errlen, "no such attribute");
            return SP_ENOTFOUND;
        }
        const Uint8 *bytes = nullptr;
        size_t n = 0;
        if (!native_bytes(e, bytes, n)) {
            /* Any other VR: its value as DICOM would encode it. */
            OFString v;
            if (e->getOFStringArray(v).bad()) {
                set_err(err, errlen, "cannot read the attribute's value");
                return SP_EINVAL;
            }
            *out = copy_bytes(v.c_str(), v.length());
            *outlen = v.length();
        } else {
            *out = copy_bytes(bytes, n);
            *outlen = n;
        }
        snprintf(ts, 65, "%s", UID_LittleEndianExplicitTransferSyntax);
        return 0;
    } catch (const std::exception &ex) {
        set_err(err, errlen, std::string("bulkdata: ") + ex.what());
    } catch (...) {
        set_err(err, errlen, "bulkdata: unknown exception");
    }
    return SP_EINVAL;
}

extern "C" int dicom_render(const uint8_t *part10, size_t len, uint32_t frame, int max_size,
                            bool png, int quality, uint8_t **out, size_t *outlen, char *err,
                            size_t errlen)
{
    try {
        register_codecs();
        Parsed p;
        int rc = parse(part10, len, p, err, errlen);
        if (rc != 0)
            return rc;
        Geometry g;
        geometry(p.ds, g);
        if (frame < 1 || frame > g.frames) {
            set_err(err, errlen, "no frame " + std::to_string(frame));
            return SP_ENOTFOUND;
        }
        std::unique_ptr<DicomImage> img(
            new DicomImage(&p.ds, p.xfer, CIF_UsePartialAccessToPixelData, frame - 1, 1));
        if (img->getStatus() != EIS_Normal) {
            set_err(err, errlen,
                    std::string("cannot render: ") + DicomImage::getString(img->getStatus()));
            return img->getStatus() == EIS_MissingAttribute ? SP_ENOTFOUND : SP_EINVAL;
        }
        if (img->isMonochrome()) {
            if (img->getWindowCount() > 0)
                img->setWindow(0);
            else
                img->setMinMaxWindow();
        }
        unsigned long w = img->getWidth(), h = img->getHeight();
        if (max_size > 0 && (w > (unsigned long)max_size || h > (unsigned long)max_size)) {
            double f = (double)max_size / (double)(w > h ? w : h);
            unsigned long nw = (unsigned long)(w * f + 0.5), nh = (unsigned long)(h * f + 0.5);
            DicomImage *scaled = img->createScaledImage(nw ? nw : 1, nh ? nh : 1, 1);
            if (scaled)
                img.reset(scaled);
        }
        char *buf = nullptr;
        size_t blen = 0;
        FILE *f = open_memstream(&buf, &blen);
        if (f == nullptr) {
            set_err(err, errlen, "open_memstream failed");
            return SP_EINVAL;
        }
        int ok;
        if (png) {
            DiPNGPlugin plugin;
            ok = img->writePluginFormat(&plugin, f, 0);
        } else {
            DiJPEGPlugin plugin;
            plugin.setQuality((unsigned)(quality < 1 ? 1 : quality > 100 ? 100 : quality));
            ok = img->writePluginFormat(&plugin, f, 0);
        }
        fclose(f);
        if (!ok) {
            free(buf);
            set_err(err, errlen, "cannot encode the image");
            return SP_EINVAL;
        }
        *out = (uint8_t *)buf;
        *outlen = blen;
        return 0;
    } catch (const std::exception &ex) {
        set_err(err, errlen, std::string("render: ") + ex.what());
    } catch (...) {
        set_err(err, errlen, "render: unknown exception");
    }
    return SP_EINVAL;
}
