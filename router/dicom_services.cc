/* dicom_services.cc - the DICOM services behind router/dicom.h, built on
 * DCMTK 3.6.7 (dcmnet, dcmdata and the decompression codecs): C-STORE
 * received bit-exact into memory, C-FIND, the C-STORE sub-operations of
 * C-MOVE and C-GET, and data set parsing with character set conversion.
 * dicom_server.cc's receive loop calls dicom_services_*() with a command it
 * read; everything here runs on that association's worker thread.
 *
 * The adapter reports what it received and parsed; the handlers (router/scp.c)
 * decide what to archive. It refuses on its own only what it cannot hand
 * over: a data set it cannot parse, one on another presentation context, an
 * identifier without a valid level.
 *
 * Ownership: data set bytes and attributes handed to handlers are owned by
 * the worker and valid during the call; find and retrieve state lives on the
 * worker's stack for the duration of one request. */
#include "dicom_int.h"

#include <dcmtk/dcmdata/dcdatset.h>
#include <dcmtk/dcmdata/dcdeftag.h>
#include <dcmtk/dcmdata/dcelem.h>
#include <dcmtk/dcmdata/dcistrmb.h>
#include <dcmtk/dcmdata/dcostrma.h>
#include <dcmtk/dcmdata/dcuid.h>
#include <dcmtk/dcmdata/dcxfer.h>
#include <dcmtk/dcmnet/dcmtrans.h>
#include <dcmtk/dcmnet/dul.h>

extern "C" {
#include "part10.h"

#include "../common/dsscan.h"

#include "../common/base.h"
#include "../common/charset.h"
#include "../common/log.h"
}

#include <cstring>
#include <algorithm>
#include <chrono>
#include <exception>
#include <memory>

/* Read whole values into memory: a buffer stream cannot load values later. */
static const Uint32 READ_ALL = 0xFFFFFFFFu;

static bool is_uncompressed(E_TransferSyntax x)
{
    return x == EXS_LittleEndianExplicit || x == EXS_LittleEndianImplicit ||
           x == EXS_BigEndianExplicit;
}

namespace
{
/* A DcmConsumer that appends everything written to a growing buffer. */
class MemConsumer : public DcmConsumer
{
  public:
    std::vector<uint8_t> bytes;
    OFBool good() const override { return OFTrue; }
    OFCondition status() const override { return EC_Normal; }
    OFBool isFlushed() const override { return OFTrue; }
    offile_off_t avail() const override { return OFstatic_cast(offile_off_t, 0x40000000); }
    offile_off_t write(const void *buf, offile_off_t buflen) override
    {
        const uint8_t *p = static_cast<const uint8_t *>(buf);
        bytes.insert(bytes.end(), p, p + buflen);
        return buflen;
    }
    void flush() override {}
};

struct MemHolder {
    MemConsumer consumer;
};

/* An output stream into memory: DIMSE_receiveDataSetInFile() writes the PDV
 * bytes of a data set through it verbatim, and dcmdata writes encoded data
 * sets through it. */
class MemOutputStream : private MemHolder, public DcmOutputStream
{
  public:
    MemOutputStream() : MemHolder(), DcmOutputStream(&consumer) {}
    std::vector<uint8_t> &bytes() { return consumer.bytes; }
};
} // namespace

/* ---- receive buffers ---------------------------------------------------- */

/* A received data set: its bytes in one malloc'd buffer (headroom bytes
 * first, then the data), grown as PDVs arrive and counted against the
 * server's receive_memory, and checked on the way by the pre-scan
 * (common/dsscan.h), so that nothing nested deeper than max_depth ever
 * reaches DCMTK's recursive parser. A receive that goes wrong - malformed,
 * too deep, too large, no memory in time - keeps reading the peer's PDVs
 * (so the association stays usable and the refusal can be answered) but
 * keeps none of them: status and why say what the answer is. */
struct dicom_rx {
    dicom_server *srv = nullptr;
    std::shared_ptr<RxBudget> budget;
    uint8_t *base = nullptr; /* malloc'd: headroom bytes, then len bytes of data */
    size_t headroom = 0;
    size_t cap = 0;     /* bytes allocated at base (all reserved in the budget) */
    size_t len = 0;     /* data bytes kept */
    size_t max_len = 0; /* more data than this is refused */
    uint64_t seen = 0;  /* data bytes received, kept or not */
    dsscan_t *scan = nullptr;
    uint16_t status = 0; /* 0, or the refusal decided while receiving */
    std::string why;
    const char *what = "data set"; /* for messages */
    uint16_t too_big_status = DICOM_CANNOT_UNDERSTAND;
};

/* True when no reservation can come free: every receive holding memory is
 * waiting for more, and no buffer handed on to the cluster is on its way
 * out. Waiting on would only end at receive_wait. */
static bool rx_budget_stuck(const RxBudget &b)
{
    return b.handed_on == 0 && b.stalled >= b.receiving;
}

/* Reserves n more bytes of receive memory for a receive that holds `held`
 * already, waiting up to receive_wait_s for other receives or sent objects
 * to free theirs. Gives up at once when nothing can come free (receives
 * that grow step by step could otherwise hold the whole budget between
 * them, each waiting for the others); the receive that gives up frees what
 * it holds, so the others go on. */
enum { RX_TAKEN, RX_TIMED_OUT, RX_STUCK };

static int rx_budget_take(RxBudget &b, size_t held, size_t n, int wait_s)
{
    std::unique_lock<std::mutex> lk(b.mu);
    auto fits = [&b, n] { return b.used + n <= b.limit; };
    if (!fits()) {
        if (held > 0)
            b.stalled++;
        b.cv.wait_for(lk, std::chrono::seconds(wait_s),
                      [&] { return fits() || rx_budget_stuck(b); });
        bool stuck = !fits() && rx_budget_stuck(b);
        if (held > 0)
            b.stalled--;
        if (!fits())
            return stuck ? RX_STUCK : RX_TIMED_OUT;
    }
    if (held == 0)
        b.receiving++;
    b.used += n;
    return RX_TAKEN;
}

/* Gives back n bytes; `all` when the receive holds nothing any more. */
static void rx_budget_give(RxBudget &b, size_t n, bool all)
{
    if (n == 0)
        return;
    std::lock_guard<std::mutex> lk(b.mu);
    SP_ASSERT(b.used >= n);
    b.used -= n;
    if (all) {
        SP_ASSERT(b.receiving > 0);
        b.receiving--;
    }
    b.cv.notify_all();
}

static void rx_drop_buffer(dicom_rx &rx)
{
    free(rx.base);
    rx.base = nullptr;
    rx_budget_give(*rx.budget, rx.cap, true);
    rx.cap = 0;
    rx.len = 0;
}

static void rx_refuse(dicom_rx &rx, uint16_t status, const std::string &why)
{
    if (rx.status != 0)
        return;
    rx.status = status;
    rx.why = why;
    rx_drop_buffer(rx);
}

static void rx_init(dicom_rx &rx, dicom_server *srv, const char *ts, size_t headroom,
                    size_t max_len, const char *what)
{
    rx.srv = srv;
    rx.budget = srv->rx_budget;
    rx.headroom = headroom;
    rx.max_len = max_len;
    rx.what = what;
    dsscan_limits_t lim = dsscan_limits_default();
    lim.max_depth = (uint32_t)srv->cfg.max_depth;
    /* The bytes received are bounded here (rx_append, with its own message);
     * the pre-scan bounds what a deflated data set inflates to. */
    dsscan_syntax_t syntax = dsscan_syntax_of(ts);
    lim.max_bytes = syntax == DSSCAN_DEFLATED_LE ? max_len : 0;
    rx.scan = dsscan_new(syntax, &lim);
}

static void rx_clear(dicom_rx &rx)
{
    if (rx.budget)
        rx_drop_buffer(rx);
    dsscan_destroy(&rx.scan);
}

/* Keeps n more received bytes (or counts them, once refused). */
static void rx_append(dicom_rx &rx, const uint8_t *p, size_t n)
{
    rx.seen += n;
    if (rx.status != 0)
        return;
    if (rx.seen > rx.max_len) {
        rx_refuse(rx, rx.too_big_status,
                  std::string(rx.what) + " over " + std::to_string(rx.max_len) +
                      " bytes, the largest accepted");
        return;
    }
    if (dsscan_feed(rx.scan, p, n) != 0) {
        char err[200];
        dsscan_finish(rx.scan, NULL, err, sizeof err);
        rx_refuse(rx, DICOM_CANNOT_UNDERSTAND, err);
        return;
    }
    size_t need = rx.headroom + rx.len + n;
    if (need > rx.cap) {
        /* Once an element header says how far the data set reaches (a
         * Pixel Data value, typically most of it), reserve that at once;
         * otherwise grow by half (glibc moves large blocks with mremap, not
         * copies). Never past what the largest accepted data set needs. */
        uint64_t declared = dsscan_declared_end(rx.scan);
        size_t want = std::max(need, std::max(rx.cap + rx.cap / 2, (size_t)64 << 10));
        if (declared > rx.len + n && declared <= rx.max_len)
            want = std::max(need, rx.headroom + (size_t)declared);
        want = std::min(want, rx.headroom + rx.max_len);
        int got = rx_budget_take(*rx.budget, rx.cap, want - rx.cap, rx.srv->cfg.receive_wait_s);
        if (got == RX_STUCK) {
            rx_refuse(rx, DICOM_OUT_OF_RESOURCES,
                      "receive memory held by other receives, retry later");
            return;
        }
        if (got != RX_TAKEN) {
            rx_refuse(rx, DICOM_OUT_OF_RESOURCES,
                      "no receive memory free within " +
                          std::to_string(rx.srv->cfg.receive_wait_s) + " s, retry later");
            return;
        }
        rx.base = (uint8_t *)sp_realloc(rx.base, want);
        rx.cap = want;
    }
    memcpy(rx.base + rx.headroom + rx.len, p, n);
    rx.len += n;
}

/* After the last PDV: the pre-scan's verdict on the whole data set, and the
 * buffer trimmed to what it holds. */
static void rx_finish(dicom_rx &rx)
{
    if (rx.status != 0)
        return;
    char err[200];
    if (dsscan_finish(rx.scan, NULL, err, sizeof err) != 0) {
        rx_refuse(rx, DICOM_CANNOT_UNDERSTAND, err);
        return;
    }
    size_t used = rx.headroom + rx.len;
    if (used == 0)
        used = 1;
    if (used < rx.cap) {
        rx.base = (uint8_t *)sp_realloc(rx.base, used);
        rx_budget_give(*rx.budget, rx.cap - used, false);
        rx.cap = used;
    }
}

/* What dicom_store_take() hands over: the buffer and its share of the
 * budget, released together. */
struct RxHold {
    std::shared_ptr<RxBudget> budget;
    uint8_t *base;
    size_t cap;
};

static void rx_hold_release(void *owner, void *unused)
{
    (void)unused;
    RxHold *h = static_cast<RxHold *>(owner);
    free(h->base);
    {
        std::lock_guard<std::mutex> lk(h->budget->mu);
        SP_ASSERT(h->budget->used >= h->cap && h->budget->handed_on >= h->cap);
        h->budget->used -= h->cap;
        h->budget->handed_on -= h->cap;
        h->budget->cv.notify_all();
    }
    delete h;
}

extern "C" void dicom_store_take(const dicom_store_t *req, uint8_t **dataset,
                                 void (**release)(void *owner, void *unused), void **owner)
{
    dicom_rx &rx = *req->rx;
    SP_ASSERT(rx.status == 0 && rx.base != nullptr);
    RxHold *h = new RxHold{rx.budget, rx.base, rx.cap};
    {
        /* the reservation moves from a receive to a buffer on its way out */
        std::lock_guard<std::mutex> lk(rx.budget->mu);
        SP_ASSERT(rx.budget->receiving > 0);
        rx.budget->receiving--;
        rx.budget->handed_on += rx.cap;
    }
    *dataset = rx.base + rx.headroom;
    *release = rx_hold_release;
    *owner = h;
    rx.base = nullptr; /* the hold owns the bytes and their budget now */
    rx.cap = 0;
    rx.len = 0;
}

namespace
{
/* Feeds what DIMSE_receiveDataSetInFile() writes into a dicom_rx. It always
 * takes everything, so DCMTK keeps reading the PDVs of a refused data set. */
class RxConsumer : public DcmConsumer
{
  public:
    explicit RxConsumer(dicom_rx &r) : rx(r) {}
    OFBool good() const override { return OFTrue; }
    OFCondition status() const override { return EC_Normal; }
    OFBool isFlushed() const override { return OFTrue; }
    offile_off_t avail() const override { return OFstatic_cast(offile_off_t, 0x40000000); }
    offile_off_t write(const void *buf, offile_off_t buflen) override
    {
        rx_append(rx, static_cast<const uint8_t *>(buf), (size_t)buflen);
        return buflen;
    }
    void flush() override {}

  private:
    dicom_rx &rx;
};

struct RxHolder {
    RxConsumer consumer;
    explicit RxHolder(dicom_rx &r) : consumer(r) {}
};

class RxOutputStream : private RxHolder, public DcmOutputStream
{
  public:
    explicit RxOutputStream(dicom_rx &r) : RxHolder(r), DcmOutputStream(&consumer) {}
};
} // namespace

/* Receives the data set that follows a command into rx (initialised for
 * it), on presentation context pres. Returns false when the association
 * failed (the caller aborts); true otherwise, with rx.status 0 and the
 * bytes, or the refusal to answer. */
static bool rx_receive(Assoc &a, T_ASC_PresentationContextID pres, dicom_rx &rx)
{
    T_ASC_PresentationContextID dpres = 0;
    OFCondition cond;
    {
        RxOutputStream os(rx);
        cond = DIMSE_receiveDataSetInFile(a.as, DIMSE_BLOCKING, a.srv->cfg.dimse_timeout_s, &dpres,
                                          &os, NULL, NULL);
    }
    if (cond.bad()) {
        log_warn("dicom: %s from %s (%s): receiving failed after %llu bytes: %s", rx.what,
                 a.calling, a.host, (unsigned long long)rx.seen, cond.text());
        return false;
    }
    dicom_server_request_received(a);
    if (dpres != pres)
        rx_refuse(rx, DICOM_CANNOT_UNDERSTAND,
                  std::string(rx.what) + " on another presentation context");
    rx_finish(rx);
    return true;
}

/* Serialises a data set in the given transfer syntax into memory. */
static OFCondition encode_dataset(DcmDataset &ds, E_TransferSyntax xfer, E_GrpLenEncoding gl,
                                  std::vector<uint8_t> &out)
{
    MemOutputStream os;
    ds.transferInit();
    OFCondition cond = ds.write(os, xfer, EET_ExplicitLength, NULL, gl, EPD_withoutPadding);
    ds.transferEnd();
    os.flush();
    if (cond.good())
        out.swap(os.bytes());
    return cond;
}

/* Parses a data set without meta header from memory. stop_at_pixels skips
 * everything from Pixel Data on (enough for attributes, and cheap). */
static OFCondition decode_dataset(const uint8_t *data, size_t len, E_TransferSyntax xfer,
                                  bool stop_at_pixels, DcmDataset &ds)
{
    DcmInputBufferStream in;
    in.setBuffer(data, OFstatic_cast(offile_off_t, len));
    in.setEos();
    if (xfer == EXS_DeflatedLittleEndianExplicit) {
#ifdef WITH_ZLIB
        OFCondition c = in.installCompressionFilter(ESC_zlib);
        if (c.bad())
            return c;
#else
        return makeOFCondition(0, 5, OF_error, "deflate not supported");
#endif
    }
    ds.transferInit();
    OFCondition cond = stop_at_pixels
                           ? ds.readUntilTag(in, xfer, EGL_noChange, READ_ALL, DCM_PixelData)
                           : ds.read(in, xfer, EGL_noChange, READ_ALL);
    ds.transferEnd();
    if (cond == EC_StreamNotifyClient)
        return makeOFCondition(0, 1, OF_error, "data set is truncated");
    return cond;
}

/* Reads the element at the top level of item as a trimmed string; false when
 * absent. For values that are ASCII by definition (UIDs, codes, dates). */
static bool get_string(DcmItem &item, const DcmTagKey &tag, std::string &out)
{
    OFString v;
    if (item.findAndGetOFStringArray(tag, v).bad())
        return false;
    out = dicom_trim(v);
    return true;
}

/* Whether Specific Character Set applies to values of this VR (PS3.5
 * 6.1.2.3: SH, LO, UC, ST, LT, UT and PN; every other string VR is in the
 * default repertoire). */
static bool affected_by_charset(DcmEVR vr)
{
    switch (vr) {
    case EVR_SH:
    case EVR_LO:
    case EVR_UC:
    case EVR_ST:
    case EVR_LT:
    case EVR_UT:
    case EVR_PN: return true;
    default: return false;
    }
}

/* The character repertoire rules that apply to an element's VR. */
static charset_vr_t charset_vr_of(DcmEVR vr)
{
    switch (vr) {
    case EVR_PN: return CHARSET_VR_PN;
    case EVR_ST:
    case EVR_LT:
    case EVR_UT: return CHARSET_VR_TEXT;
    default: return CHARSET_VR_STRING;
    }
}

/* Converts an element's raw value (all values, backslash-separated) from the
 * item's Specific Character Set to trimmed UTF-8. Never fails for the bytes
 * themselves: what cannot be decoded comes out in charset.h's lossless
 * escaped form, and the CHARSET_* warnings are ORed into *flags. The archive
 * stores the bytes it was given; only the index sees this text. */
static std::string element_utf8(DcmElement &e, const std::string &scs, unsigned *flags)
{
    if (!affected_by_charset(e.ident())) {
        /* UIDs, codes, dates and numbers are in the default repertoire
         * (and UIDs are padded with NUL, which DCMTK strips here). */
        OFString v;
        if (e.getLength() > 0)
            e.getOFStringArray(v);
        return dicom_trim(v);
    }
    /* The value's own length (padding removed by DCMTK), not the element
     * length: the bytes past it are not part of the value. */
    char *raw = NULL;
    Uint32 len = 0;
    if (e.getLength() == 0 || e.getString(raw, len).bad() || raw == NULL || len == 0)
        return std::string();
    char *utf8 = NULL;
    unsigned f = 0;
    int rc = charset_to_utf8(scs.c_str(), (const uint8_t *)raw, len, charset_vr_of(e.ident()),
                             &utf8, &f);
    SP_ASSERT(rc == 0); /* only NULL arguments fail */
    *flags |= f;
    std::string out = dicom_trim(OFString(utf8));
    free(utf8);
    return out;
}

/* Names the CHARSET_* warnings in flags, for one log line. */
static std::string charset_flags_text(unsigned flags)
{
    std::string out;
    for (unsigned bit = 1; bit != 0 && bit <= flags; bit <<= 1) {
        if (!(flags & bit))
            continue;
        if (!out.empty())
            out += ", ";
        out += charset_flag_name(bit);
    }
    return out;
}

/* ---- attributes ---------------------------------------------------------- */

/* Reads the stored attributes of ds, converted to UTF-8 from scs; ORs the
 * CHARSET_* warnings into *flags. */
static void read_stored_attrs(DcmDataset &ds, const std::string &scs, attrs_t *out, unsigned *flags)
{
    for (int i = 0; i < ATTR_STORED_COUNT; i++) {
        const attr_info_t *ai = attr_info((attr_id_t)i);
        if ((ai->tag >> 16) == 0x0002 || ai->id == ATTR_SPECIFIC_CHARACTER_SET)
            continue;
        DcmElement *e = NULL;
        DcmTagKey key((Uint16)(ai->tag >> 16), (Uint16)(ai->tag & 0xffff));
        if (ds.findAndGetElement(key, e, OFFalse).bad() || e == NULL)
            continue;
        attrs_set(out, ai->id, element_utf8(*e, scs, flags).c_str());
    }
}

/* Parses and converts; on success out holds the attributes (the original
 * Specific Character Set value included), ds the parsed data set and
 * *charset_flags the CHARSET_* warnings of the conversion (a name that could
 * not be decoded is indexed in escaped form; the image is still archived). */
static int parse_attrs_internal(const uint8_t *dataset, size_t len, const char *ts, DcmDataset &ds,
                                attrs_t *out, unsigned *charset_flags, std::string &why)
{
    E_TransferSyntax xfer = DcmXfer(ts ? ts : "").getXfer();
    if (xfer == EXS_Unknown) {
        why = std::string("unknown transfer syntax ") + (ts ? ts : "(null)");
        return SP_EINVAL;
    }
    /* Up to Pixel Data: the attributes are all before it, and the pre-scan
     * (common/dsscan.h) has already checked the whole data set's structure,
     * so a data set cut short never gets here. */
    OFCondition cond = decode_dataset(dataset, len, xfer, true, ds);
    if (cond.bad()) {
        why = std::string("malformed data set: ") + cond.text();
        return SP_EINVAL;
    }
    std::string scs;
    bool has_scs = get_string(ds, DCM_SpecificCharacterSet, scs);
    attrs_clear(out);
    if (has_scs)
        attrs_set(out, ATTR_SPECIFIC_CHARACTER_SET, scs.c_str());
    *charset_flags = 0;
    read_stored_attrs(ds, scs, out, charset_flags);
    attrs_set(out, ATTR_TRANSFER_SYNTAX_UID, ts);
    return 0;
}

extern "C" int dicom_parse_attrs(const uint8_t *dataset, size_t len,
                                 const char *transfer_syntax_uid, attrs_t *out, char *err,
                                 size_t errlen)
{
    try {
        DcmDataset ds;
        unsigned flags = 0;
        std::string why;
        int rc = parse_attrs_internal(dataset, len, transfer_syntax_uid, ds, out, &flags, why);
        if (rc != 0)
            snprintf(err, errlen, "%s", why.c_str());
        return rc;
    } catch (const std::exception &ex) {
        snprintf(err, errlen, "cannot parse: %s", ex.what());
    } catch (...) {
        snprintf(err, errlen, "cannot parse: unknown exception");
    }
    return SP_EINVAL;
}

/* The query/retrieve information model of a request's SOP class. */
typedef enum { DICOM_MODEL_PATIENT_ROOT, DICOM_MODEL_STUDY_ROOT } dicom_model_t;

struct dicom_find {
    Assoc *a;
    T_ASC_PresentationContextID pres;
    T_DIMSE_C_FindRQ rq;
    dicom_model_t model;
    level_t level;
    attrs_t keys;
    std::vector<DcmTagKey> extra; /* requested keys we do not index */
    bool cancelled;
    bool failed;
};

struct dicom_retrieve {
    Assoc *a;
    T_ASC_PresentationContextID pres;
    bool is_get;
    T_DIMSE_C_MoveRQ mrq;
    T_DIMSE_C_GetRQ grq;
    DIC_US msg_id;
    dicom_model_t model;
    level_t level;
    attrs_t keys;
    std::string dest;
    T_ASC_Network *subnet;
    T_ASC_Association *sub;
    bool begun, cancelled, lost;
    unsigned total, completed, failed, warning;
    std::vector<std::string> failed_uids;
};

/* ---- identifiers ------------------------------------------------------------ */

static const char *const k_find_classes[] = {UID_FINDPatientRootQueryRetrieveInformationModel,
                                             UID_FINDStudyRootQueryRetrieveInformationModel};
static const char *const k_move_classes[] = {UID_MOVEPatientRootQueryRetrieveInformationModel,
                                             UID_MOVEStudyRootQueryRetrieveInformationModel};
static const char *const k_get_classes[] = {UID_GETPatientRootQueryRetrieveInformationModel,
                                            UID_GETStudyRootQueryRetrieveInformationModel};

static bool model_of(const char *uid, const char *const classes[2], dicom_model_t *m)
{
    if (strcmp(uid, classes[0]) == 0) {
        *m = DICOM_MODEL_PATIENT_ROOT;
        return true;
    }
    if (strcmp(uid, classes[1]) == 0) {
        *m = DICOM_MODEL_STUDY_ROOT;
        return true;
    }
    return false;
}

/* Reads the level and the keys of a query/retrieve identifier, converted to
 * UTF-8. Returns 0, or a DIMSE failure status with a reason. */
/* The value of a UID key that arrived as UN: in explicit VR a UI value over
 * 64 KiB (a list of thousands of UIDs) cannot use the 16-bit length, so the
 * sender encodes it as UN (PS3.5 6.2.2), whose value is the same bytes. */
static std::string un_uid_value(DcmElement &e)
{
    Uint8 *bytes = NULL;
    if (e.getLength() == 0 || e.getUint8Array(bytes).bad() || bytes == NULL)
        return std::string();
    std::string v((const char *)bytes, e.getLength());
    while (!v.empty() && (v.back() == '\0' || v.back() == ' '))
        v.pop_back();
    return v;
}

static uint16_t parse_identifier(DcmDataset *id, dicom_model_t model, level_t *level, attrs_t *keys,
                                 std::vector<DcmTagKey> *extra, std::string &why)
{
    std::string lv;
    if (!get_string(*id, DCM_QueryRetrieveLevel, lv) || attr_parse_level(lv.c_str(), level) != 0) {
        why = "missing or invalid QueryRetrieveLevel '" + lv + "'";
        return DICOM_DATASET_MISMATCH;
    }
    if (model == DICOM_MODEL_STUDY_ROOT && *level == LEVEL_PATIENT) {
        why = "PATIENT level is not part of the Study Root model";
        return DICOM_DATASET_MISMATCH;
    }
    std::string scs;
    get_string(*id, DCM_SpecificCharacterSet, scs);
    unsigned flags = 0;
    for (unsigned long i = 0; i < id->card(); i++) {
        DcmElement *e = id->getElement(i);
        if (e == NULL)
            continue;
        DcmTagKey key = e->getTag().getXTag();
        if (key == DCM_QueryRetrieveLevel || key == DCM_SpecificCharacterSet ||
            key.getGroup() == 0x0002)
            continue;
        const attr_info_t *ai = attr_by_tag((uint32_t)key.getGroup() << 16 | key.getElement());
        if (ai == NULL || e->ident() == EVR_SQ) {
            if (extra)
                extra->push_back(key);
            continue;
        }
        if (e->ident() == EVR_UN && ai->kind == MATCH_UID)
            attrs_set(keys, ai->id, un_uid_value(*e).c_str());
        else
            attrs_set(keys, ai->id, element_utf8(*e, scs, &flags).c_str());
    }
    if (flags != 0)
        log_warn("dicom: query keys in character set '%s' decoded with warnings (%s)", scs.c_str(),
                 charset_flags_text(flags).c_str());
    return 0;
}

static DcmDataset *comment_detail(uint16_t status, const char *comment)
{
    if (status == DICOM_SUCCESS || status == DICOM_PENDING || comment == NULL || comment[0] == 0)
        return NULL;
    DcmDataset *d = new DcmDataset;
    std::string c(comment);
    if (c.size() > 64)
        c.resize(64); /* Error Comment is LO */
    d->putAndInsertString(DCM_ErrorComment, c.c_str());
    return d;
}

/* ---- C-STORE ------------------------------------------------------------------ */

/* Receives the data set bit-exact (checked by the pre-scan on the way),
 * parses its attributes (everything before Pixel Data: the pre-scan already
 * walked the whole data set) and hands both to the store handler, which
 * decides (router/scp.c checks the UIDs against the command). Only what
 * cannot be handed over - a data set on another presentation context, one
 * that is malformed, too deep or too large, or one that found no receive
 * memory in time - is refused here, and logged here. */
bool dicom_services_store(Assoc &a, T_ASC_PresentationContextID pres, T_DIMSE_C_StoreRQ &rq)
{
    dicom_server *srv = a.srv;
    T_ASC_PresentationContext pc;
    OFCondition cond = ASC_findAcceptedPresentationContext(a.as->params, pres, &pc);
    if (cond.bad())
        return false;
    dicom_rx rx;
    rx_init(rx, srv, pc.acceptedTransferSyntax, PART10_HEADER_MAX, srv->cfg.max_object_size,
            "C-STORE data set");
    if (!rx_receive(a, pres, rx)) {
        rx_clear(rx);
        return false;
    }
    std::string cmd_sop(rq.AffectedSOPInstanceUID);
    while (!cmd_sop.empty() && cmd_sop.back() == ' ')
        cmd_sop.pop_back();
    uint16_t status = rx.status;
    char comment[256] = "";
    snprintf(comment, sizeof(comment), "%s", rx.why.c_str());
    attrs_t attrs;
    memset(&attrs, 0, sizeof(attrs));
    unsigned charset_flags = 0;
    if (status == DICOM_SUCCESS) {
        DcmDataset ds;
        std::string why;
        if (parse_attrs_internal(rx.base + rx.headroom, rx.len, pc.acceptedTransferSyntax, ds,
                                 &attrs, &charset_flags, why) != 0) {
            status = DICOM_CANNOT_UNDERSTAND;
            snprintf(comment, sizeof(comment), "%s", why.c_str());
        } else if (srv->h.store == NULL) {
            status = DICOM_OUT_OF_RESOURCES;
            snprintf(comment, sizeof(comment), "storage not configured");
        }
    }
    if (status != DICOM_SUCCESS) {
        log_warn("dicom: C-STORE from %s (%s) of %s (%llu bytes): status 0x%04X %s", a.calling,
                 a.host, cmd_sop.c_str(), (unsigned long long)rx.seen, status, comment);
    } else {
        if (charset_flags != 0)
            log_warn("dicom: C-STORE from %s (%s) of %s: names in character set '%s' indexed "
                     "with warnings (%s); the object is stored as sent",
                     a.calling, a.host, cmd_sop.c_str(),
                     attrs_str(&attrs, ATTR_SPECIFIC_CHARACTER_SET),
                     charset_flags_text(charset_flags).c_str());
        dicom_store_t req;
        req.peer = &a.peer;
        req.sop_class_uid = rq.AffectedSOPClassUID;
        req.sop_instance_uid = cmd_sop.c_str();
        req.transfer_syntax_uid = pc.acceptedTransferSyntax;
        req.dataset = rx.base + rx.headroom;
        req.dataset_len = rx.len;
        req.attrs = &attrs;
        req.headroom = rx.headroom;
        req.rx = &rx;
        status = srv->h.store(srv->h.ctx, &req, comment, sizeof(comment));
    }
    attrs_clear(&attrs);
    rx_clear(rx);

    T_DIMSE_C_StoreRSP rsp;
    memset(&rsp, 0, sizeof(rsp));
    rsp.MessageIDBeingRespondedTo = rq.MessageID;
    OFStandard::strlcpy(rsp.AffectedSOPClassUID, rq.AffectedSOPClassUID,
                        sizeof(rsp.AffectedSOPClassUID));
    OFStandard::strlcpy(rsp.AffectedSOPInstanceUID, rq.AffectedSOPInstanceUID,
                        sizeof(rsp.AffectedSOPInstanceUID));
    rsp.opts = O_STORE_AFFECTEDSOPCLASSUID | O_STORE_AFFECTEDSOPINSTANCEUID;
    if (rq.opts & O_STORE_RQ_BLANK_PADDING)
        rsp.opts |= O_STORE_PEER_REQUIRES_EXACT_UID_COPY;
    rsp.DataSetType = DIMSE_DATASET_NULL;
    rsp.DimseStatus = status;
    DcmDataset *detail = comment_detail(status, comment);
    cond = DIMSE_sendStoreResponse(a.as, pres, &rq, &rsp, detail);
    delete detail;
    return cond.good();
}

/* ---- identifiers ------------------------------------------------------------ */

/* Receives a C-FIND/C-MOVE/C-GET identifier like a C-STORE data set (into
 * memory, checked by the pre-scan, so its nesting is bounded before DCMTK
 * parses it) and parses it. Returns false when the association failed;
 * true otherwise, with *ident set (the caller deletes it), or with *ident
 * NULL and the failure to answer in *status and why: 0xA900 for a
 * malformed, too deep or too large identifier (permanent), 0xA700 when no
 * receive memory came free in time (retry later). */
static bool receive_identifier(Assoc &a, T_ASC_PresentationContextID pres, const char *what,
                               DcmDataset **ident, uint16_t *status, std::string &why)
{
    *ident = NULL;
    *status = DICOM_SUCCESS;
    T_ASC_PresentationContext pc;
    if (ASC_findAcceptedPresentationContext(a.as->params, pres, &pc).bad())
        return false;
    dicom_rx rx;
    rx_init(rx, a.srv, pc.acceptedTransferSyntax, 0, a.srv->cfg.max_identifier_size, what);
    rx.too_big_status = DICOM_DATASET_MISMATCH;
    if (!rx_receive(a, pres, rx)) {
        rx_clear(rx);
        return false;
    }
    if (rx.status != 0) {
        *status =
            rx.status == DICOM_OUT_OF_RESOURCES ? DICOM_OUT_OF_RESOURCES : DICOM_DATASET_MISMATCH;
        why = rx.why;
    } else {
        DcmDataset *ds = new DcmDataset;
        OFCondition cond = decode_dataset(rx.base + rx.headroom, rx.len,
                                          DcmXfer(pc.acceptedTransferSyntax).getXfer(), false, *ds);
        if (cond.bad()) {
            delete ds;
            *status = DICOM_DATASET_MISMATCH;
            why = std::string("malformed identifier: ") + cond.text();
        } else {
            *ident = ds;
        }
    }
    rx_clear(rx);
    return true;
}

/* ---- C-FIND ---------------------------------------------------------------- */

extern "C" level_t dicom_find_level(const dicom_find_t *q)
{
    return q->level;
}
extern "C" const attrs_t *dicom_find_keys(const dicom_find_t *q)
{
    return &q->keys;
}
extern "C" const dicom_peer_t *dicom_find_peer(const dicom_find_t *q)
{
    return &q->a->peer;
}
extern "C" bool dicom_find_cancelled(dicom_find_t *q)
{
    return q->cancelled;
}

/* Polls the association for a C-CANCEL of this request without blocking.
 * Returns true when the association failed. */
static bool poll_cancel(Assoc &a, T_ASC_PresentationContextID pres, DIC_US msg_id, bool *cancelled)
{
    if (*cancelled)
        return false;
    OFCondition cond = DIMSE_checkForCancelRQ(a.as, pres, msg_id);
    if (cond.good()) {
        *cancelled = true;
        return false;
    }
    if (cond == DIMSE_NODATAAVAILABLE)
        return false;
    if (cond == DUL_PEERABORTEDASSOCIATION || cond == DUL_PEERREQUESTEDRELEASE ||
        cond == DUL_NETWORKCLOSED || cond == DUL_READTIMEOUT) {
        a.lost = true;
        return true;
    }
    /* some other command arrived: it is dropped, the operation goes on */
    log_warn("dicom: unexpected message from %s while checking for C-CANCEL: %s", a.calling,
             cond.text());
    return false;
}

extern "C" int dicom_find_emit(dicom_find_t *q, const attrs_t *match)
{
    try {
        if (q->failed)
            return -1;
        if (poll_cancel(*q->a, q->pres, q->rq.MessageID, &q->cancelled)) {
            q->failed = true;
            return -1;
        }
        if (q->cancelled)
            return 1;
        DcmDataset ds;
        ds.putAndInsertString(DCM_SpecificCharacterSet, "ISO_IR 192");
        ds.putAndInsertString(DCM_QueryRetrieveLevel, attr_level_name(q->level));
        for (int i = 0; i < ATTR_COUNT; i++) {
            if (q->keys.v[i] == NULL)
                continue;
            const attr_info_t *ai = attr_info((attr_id_t)i);
            DcmTagKey key((Uint16)(ai->tag >> 16), (Uint16)(ai->tag & 0xffff));
            const char *v = match ? attrs_str(match, (attr_id_t)i) : "";
            ds.putAndInsertString(key, v);
        }
        for (const DcmTagKey &k : q->extra)
            ds.insertEmptyElement(k);
        T_DIMSE_C_FindRSP rsp;
        memset(&rsp, 0, sizeof(rsp));
        rsp.MessageIDBeingRespondedTo = q->rq.MessageID;
        OFStandard::strlcpy(rsp.AffectedSOPClassUID, q->rq.AffectedSOPClassUID,
                            sizeof(rsp.AffectedSOPClassUID));
        rsp.opts = O_FIND_AFFECTEDSOPCLASSUID;
        rsp.DataSetType = DIMSE_DATASET_PRESENT;
        rsp.DimseStatus = DICOM_PENDING;
        OFCondition cond = DIMSE_sendFindResponse(q->a->as, q->pres, &q->rq, &rsp, &ds, NULL);
        if (cond.bad()) {
            log_warn("dicom: C-FIND response to %s failed: %s", q->a->calling, cond.text());
            q->failed = true;
            q->a->lost = true;
            return -1;
        }
        return 0;
    } catch (...) {
        q->failed = true;
        return -1;
    }
}

bool dicom_services_find(Assoc &a, T_ASC_PresentationContextID pres, T_DIMSE_C_FindRQ &rq)
{
    dicom_server *srv = a.srv;
    DcmDataset *ident = NULL;
    uint16_t status = DICOM_SUCCESS;
    std::string why;
    if (!receive_identifier(a, pres, "C-FIND identifier", &ident, &status, why))
        return false;
    dicom_find_t q;
    q.a = &a;
    q.pres = pres;
    q.rq = rq;
    q.model = DICOM_MODEL_STUDY_ROOT;
    q.level = LEVEL_STUDY;
    memset(&q.keys, 0, sizeof(q.keys));
    q.cancelled = false;
    q.failed = false;
    char comment[256] = "";
    bool by_handler = false; /* the handler logs the failures it decides */
    if (status != DICOM_SUCCESS) {
        snprintf(comment, sizeof(comment), "%s", why.c_str());
    } else if (!model_of(rq.AffectedSOPClassUID, k_find_classes, &q.model)) {
        status = DICOM_DATASET_MISMATCH;
        snprintf(comment, sizeof(comment), "unsupported C-FIND SOP class");
    } else if ((status = parse_identifier(ident, q.model, &q.level, &q.keys, &q.extra, why)) != 0) {
        snprintf(comment, sizeof(comment), "%s", why.c_str());
    } else if (srv->h.find == NULL) {
        status = DICOM_UNABLE_TO_PROCESS;
        snprintf(comment, sizeof(comment), "query not configured");
    } else {
        status = srv->h.find(srv->h.ctx, &q, comment, sizeof(comment));
        by_handler = true;
        if (q.cancelled)
            status = DICOM_CANCEL;
    }
    delete ident;
    attrs_clear(&q.keys);
    if (q.failed || a.lost)
        return false;
    if (!by_handler && status != DICOM_SUCCESS && status != DICOM_CANCEL)
        log_warn("dicom: C-FIND from %s: status 0x%04X %s", a.calling, status, comment);
    T_DIMSE_C_FindRSP rsp;
    memset(&rsp, 0, sizeof(rsp));
    rsp.MessageIDBeingRespondedTo = rq.MessageID;
    OFStandard::strlcpy(rsp.AffectedSOPClassUID, rq.AffectedSOPClassUID,
                        sizeof(rsp.AffectedSOPClassUID));
    rsp.opts = O_FIND_AFFECTEDSOPCLASSUID;
    rsp.DataSetType = DIMSE_DATASET_NULL;
    rsp.DimseStatus = status;
    DcmDataset *detail = comment_detail(status, comment);
    OFCondition cond = DIMSE_sendFindResponse(a.as, pres, &rq, &rsp, NULL, detail);
    delete detail;
    return cond.good();
}

/* ---- C-MOVE and C-GET ---------------------------------------------------------- */

extern "C" level_t dicom_retrieve_level(const dicom_retrieve_t *r)
{
    return r->level;
}
extern "C" const attrs_t *dicom_retrieve_keys(const dicom_retrieve_t *r)
{
    return &r->keys;
}
extern "C" const dicom_peer_t *dicom_retrieve_peer(const dicom_retrieve_t *r)
{
    return &r->a->peer;
}
extern "C" const char *dicom_retrieve_destination(const dicom_retrieve_t *r)
{
    return r->is_get ? NULL : r->dest.c_str();
}

static unsigned remaining_of(const dicom_retrieve_t *r)
{
    unsigned done = r->completed + r->failed + r->warning;
    return r->total > done ? r->total - done : 0;
}

static DIC_US clamp_us(unsigned v)
{
    return (DIC_US)(v > 0xffff ? 0xffff : v);
}

/* Fills what C-GET and C-MOVE responses share (their DCMTK structs have
 * the same fields under different types and option bits). */
template <typename Rsp>
static void fill_retrieve_rsp(Rsp &rsp, const dicom_retrieve_t *r, DIC_US msg_id,
                              const char *sop_class, uint16_t status, bool with_dataset)
{
    memset(&rsp, 0, sizeof(rsp));
    rsp.MessageIDBeingRespondedTo = msg_id;
    OFStandard::strlcpy(rsp.AffectedSOPClassUID, sop_class, sizeof(rsp.AffectedSOPClassUID));
    rsp.DimseStatus = status;
    rsp.DataSetType = with_dataset ? DIMSE_DATASET_PRESENT : DIMSE_DATASET_NULL;
    rsp.NumberOfRemainingSubOperations = clamp_us(remaining_of(r));
    rsp.NumberOfCompletedSubOperations = clamp_us(r->completed);
    rsp.NumberOfFailedSubOperations = clamp_us(r->failed);
    rsp.NumberOfWarningSubOperations = clamp_us(r->warning);
}

/* Sends a C-MOVE or C-GET response with the current counts. */
static OFCondition send_retrieve_rsp(dicom_retrieve_t *r, uint16_t status, DcmDataset *ids,
                                     DcmDataset *detail)
{
    bool with_remaining = status == DICOM_PENDING || status == DICOM_CANCEL;
    if (r->is_get) {
        T_DIMSE_C_GetRSP rsp;
        fill_retrieve_rsp(rsp, r, r->grq.MessageID, r->grq.AffectedSOPClassUID, status,
                          ids != NULL);
        rsp.opts = O_GET_AFFECTEDSOPCLASSUID | O_GET_NUMBEROFCOMPLETEDSUBOPERATIONS |
                   O_GET_NUMBEROFFAILEDSUBOPERATIONS | O_GET_NUMBEROFWARNINGSUBOPERATIONS |
                   (with_remaining ? O_GET_NUMBEROFREMAININGSUBOPERATIONS : 0);
        return DIMSE_sendGetResponse(r->a->as, r->pres, &r->grq, &rsp, ids, detail);
    }
    T_DIMSE_C_MoveRSP rsp;
    fill_retrieve_rsp(rsp, r, r->mrq.MessageID, r->mrq.AffectedSOPClassUID, status, ids != NULL);
    rsp.opts = O_MOVE_AFFECTEDSOPCLASSUID | O_MOVE_NUMBEROFCOMPLETEDSUBOPERATIONS |
               O_MOVE_NUMBEROFFAILEDSUBOPERATIONS | O_MOVE_NUMBEROFWARNINGSUBOPERATIONS |
               (with_remaining ? O_MOVE_NUMBEROFREMAININGSUBOPERATIONS : 0);
    return DIMSE_sendMoveResponse(r->a->as, r->pres, &r->mrq, &rsp, ids, detail);
}

extern "C" int dicom_retrieve_begin(dicom_retrieve_t *r, const char *host, int port,
                                    const dicom_instance_kind_t *kinds, size_t count, char *err,
                                    size_t errlen)
{
    try {
        if (r->begun) {
            sp_fmt(err, errlen, "retrieve already begun");
            return SP_EINVAL;
        }
        r->total = (unsigned)count;
        if (r->is_get) {
            r->begun = true;
            return 0;
        }
        if (host == NULL || port <= 0 || port > 65535) {
            sp_fmt(err, errlen, "invalid destination address");
            return SP_EINVAL;
        }
        dicom_server *srv = r->a->srv;
        /* Destinations marked tls in the AE table get DICOM TLS. */
        bool tls = srv->tls_destinations.count(std::make_pair(std::string(host), port)) > 0;
        OFCondition cond;
        if (tls) {
            std::string why;
            cond = dicom_server_tls_network(srv, srv->cfg.acse_timeout_s, &r->subnet, why);
            if (cond.bad()) {
                sp_fmt(err, errlen, "cannot set up TLS to %s: %s", r->dest.c_str(), why.c_str());
                return SP_EUNAVAIL;
            }
        } else {
            cond = dicom_server_network(NET_REQUESTOR, srv->cfg.acse_timeout_s, -1, &r->subnet);
            if (cond.bad()) {
                sp_fmt(err, errlen, "cannot create network: %s", cond.text());
                return SP_EUNAVAIL;
            }
        }
        T_ASC_Parameters *params = NULL;
        cond = ASC_createAssociationParameters(&params, srv->cfg.max_pdu);
        if (cond.bad()) {
            sp_fmt(err, errlen, "%s", cond.text());
            return SP_EUNAVAIL;
        }
        if (tls)
            ASC_setTransportLayerType(params, OFTrue);
        ASC_setAPTitles(params, srv->ae_title.c_str(), r->dest.c_str(), NULL);
        std::string addr = std::string(host) + ":" + std::to_string(port);
        ASC_setPresentationAddresses(params, "localhost", addr.c_str());
        /* One context per (SOP class, stored TS), then one uncompressed
         * context per SOP class as the fallback. */
        std::vector<std::pair<std::string, std::string>> pairs;
        std::vector<std::string> classes;
        for (size_t i = 0; i < count; i++) {
            if (!kinds[i].sop_class_uid || !kinds[i].transfer_syntax_uid)
                continue;
            std::pair<std::string, std::string> p(kinds[i].sop_class_uid,
                                                  kinds[i].transfer_syntax_uid);
            bool seen = false;
            for (auto &q : pairs)
                seen = seen || q == p;
            if (!seen)
                pairs.push_back(p);
            seen = false;
            for (auto &c : classes)
                seen = seen || c == p.first;
            if (!seen)
                classes.push_back(p.first);
        }
        int id = 1;
        size_t dropped = 0;
        for (auto &p : pairs) {
            if (id > 255) {
                dropped++;
                continue;
            }
            const char *ts[1] = {p.second.c_str()};
            ASC_addPresentationContext(params, (T_ASC_PresentationContextID)id, p.first.c_str(), ts,
                                       1);
            id += 2;
        }
        for (auto &c : classes) {
            if (id > 255) {
                dropped++;
                continue;
            }
            const char *ts[2] = {UID_LittleEndianExplicitTransferSyntax,
                                 UID_LittleEndianImplicitTransferSyntax};
            ASC_addPresentationContext(params, (T_ASC_PresentationContextID)id, c.c_str(), ts, 2);
            id += 2;
        }
        if (dropped > 0)
            log_warn("dicom: C-MOVE to %s: %zu presentation contexts over the limit of 128",
                     r->dest.c_str(), dropped);
        if (pairs.empty()) {
            ASC_destroyAssociationParameters(&params);
            r->begun = true;
            return 0;
        }
        cond = ASC_requestAssociation(r->subnet, params, &r->sub);
        if (cond.bad()) {
            std::string why = cond.text();
            if (cond == DUL_ASSOCIATIONREJECTED) {
                T_ASC_RejectParameters rej;
                ASC_getRejectParameters(params, &rej);
                OFString s;
                why = std::string("association rejected: ") +
                      ASC_printRejectParameters(s, &rej).c_str();
            }
            sp_fmt(err, errlen, "cannot associate with %s at %s: %s", r->dest.c_str(), addr.c_str(),
                   why.c_str());
            if (r->sub) {
                ASC_dropAssociation(r->sub);
                ASC_destroyAssociation(&r->sub);
            } else {
                ASC_destroyAssociationParameters(&params);
            }
            return SP_EUNAVAIL;
        }
        if (ASC_countAcceptedPresentationContexts(r->sub->params) == 0) {
            sp_fmt(err, errlen, "%s accepted no presentation context", r->dest.c_str());
            ASC_abortAssociation(r->sub);
            ASC_destroyAssociation(&r->sub);
            return SP_EUNAVAIL;
        }
        r->begun = true;
        return 0;
    } catch (const std::exception &e) {
        sp_fmt(err, errlen, "exception: %s", e.what());
    } catch (...) {
        sp_fmt(err, errlen, "unknown exception");
    }
    return SP_EUNAVAIL;
}

/* Finds an accepted presentation context for sop_class on as, preferring
 * transfer syntax ts; for C-GET only those where the requester takes the SCP
 * role. Returns 0 when there is none. */
static T_ASC_PresentationContextID find_context(T_ASC_Association *as, const char *sop_class,
                                                const char *ts, bool need_scp_role,
                                                std::string &accepted_ts)
{
    T_ASC_PresentationContextID any = 0;
    int n = ASC_countPresentationContexts(as->params);
    for (int i = 0; i < n; i++) {
        T_ASC_PresentationContext pc;
        if (ASC_getPresentationContext(as->params, i, &pc).bad())
            continue;
        if (pc.resultReason != ASC_P_ACCEPTANCE || strcmp(pc.abstractSyntax, sop_class) != 0)
            continue;
        if (need_scp_role && pc.acceptedRole != ASC_SC_ROLE_SCP &&
            pc.acceptedRole != ASC_SC_ROLE_SCUSCP)
            continue;
        if (strcmp(pc.acceptedTransferSyntax, ts) == 0) {
            accepted_ts = pc.acceptedTransferSyntax;
            return pc.presentationContextID;
        }
        if (any == 0) {
            any = pc.presentationContextID;
            accepted_ts = pc.acceptedTransferSyntax;
        }
    }
    return any;
}

/* Whole P-DATA-TF PDUs (one PDV each, sized to what the peer accepts)
 * written straight from memory: this is how the stored bytes go out
 * bit-exact (DIMSE itself can only send a DcmDataset, which it re-encodes).
 * DUL_WritePDVs would write each PDU's 12 header bytes and its data in two
 * system calls - two TCP segments with Nagle off, and two wake-ups of the
 * receiver, for every 16 KiB of a retrieve. Here PDUs are assembled into a
 * per-thread buffer and written SEND_BATCH bytes at a time. */
#define SEND_BATCH (256u << 10)

namespace
{
class PduWriter
{
  public:
    PduWriter(T_ASC_Association *as, T_ASC_PresentationContextID context) : pres(context)
    {
        conn = DUL_getTransportConnection(as->DULassociation);
        unsigned long m = as->sendPDVLength;
        Uint32 maxpdu = dcmMaxOutgoingPDUSize.get();
        if (m + 12 > maxpdu)
            m = maxpdu - 12;
        max = m & ~1UL;
        buf.clear();
    }

    /* Queues one message part (command or data set), flushing full batches. */
    OFCondition part(DUL_DATAPDV type, const uint8_t *data, size_t len)
    {
        if (!conn)
            return makeOFCondition(0, 1, OF_error, "association has no transport connection");
        if (max == 0 || (len & 1))
            return makeOFCondition(0, 2, OF_error, "cannot send odd-length data");
        size_t off = 0;
        do {
            size_t n = len - off < max ? len - off : max;
            bool last = off + n == len;
            uint8_t h[12] = {0x04, 0x00};
            put_be32(h + 2, (uint32_t)(n + 6));
            put_be32(h + 6, (uint32_t)(n + 2));
            h[10] = pres;
            h[11] = (uint8_t)((type == DUL_COMMANDPDV ? 0x01 : 0x00) | (last ? 0x02 : 0x00));
            buf.insert(buf.end(), h, h + sizeof h);
            buf.insert(buf.end(), data + off, data + off + n);
            off += n;
            if (buf.size() >= SEND_BATCH) {
                OFCondition cond = flush();
                if (cond.bad())
                    return cond;
            }
        } while (off < len);
        return EC_Normal;
    }

    OFCondition flush()
    {
        size_t done = 0;
        while (done < buf.size()) {
            ssize_t w = conn->write(buf.data() + done, buf.size() - done);
            if (w < 0 && errno == EINTR)
                continue;
            if (w <= 0)
                return DUL_NETWORKCLOSED;
            done += (size_t)w;
        }
        buf.clear();
        return EC_Normal;
    }

  private:
    DcmTransportConnection *conn;
    T_ASC_PresentationContextID pres;
    unsigned long max = 0;
    static thread_local std::vector<uint8_t> buf; /* kept: no allocation per object */

    static void put_be32(uint8_t *p, uint32_t v)
    {
        p[0] = (uint8_t)(v >> 24);
        p[1] = (uint8_t)(v >> 16);
        p[2] = (uint8_t)(v >> 8);
        p[3] = (uint8_t)v;
    }
};
thread_local std::vector<uint8_t> PduWriter::buf;
} // namespace

/* Sends a C-STORE-RQ whose data set is given as encoded bytes. */
static OFCondition send_store_rq(T_ASC_Association *as, T_ASC_PresentationContextID pres,
                                 DIC_US msg_id, const std::string &cls, const std::string &inst,
                                 const char *orig_ae, DIC_US orig_id, const uint8_t *data,
                                 size_t len)
{
    DcmDataset cmd;
    cmd.putAndInsertString(DCM_AffectedSOPClassUID, cls.c_str());
    cmd.putAndInsertUint16(DCM_CommandField, 0x0001);
    cmd.putAndInsertUint16(DCM_MessageID, msg_id);
    cmd.putAndInsertUint16(DCM_Priority, 0x0000);
    cmd.putAndInsertUint16(DCM_CommandDataSetType, 0x0000);
    cmd.putAndInsertString(DCM_AffectedSOPInstanceUID, inst.c_str());
    if (orig_ae) {
        cmd.putAndInsertString(DCM_MoveOriginatorApplicationEntityTitle, orig_ae);
        cmd.putAndInsertUint16(DCM_MoveOriginatorMessageID, orig_id);
    }
    std::vector<uint8_t> cbytes;
    OFCondition cond = encode_dataset(cmd, EXS_LittleEndianImplicit, EGL_withGL, cbytes);
    PduWriter w(as, pres);
    if (cond.good())
        cond = w.part(DUL_COMMANDPDV, cbytes.data(), cbytes.size());
    if (cond.good())
        cond = w.part(DUL_DATASETPDV, data, len);
    if (cond.good())
        cond = w.flush();
    return cond;
}

/* Waits for the C-STORE-RSP of msg_id on as. On the C-GET association a
 * C-CANCEL may arrive meanwhile; it is noted in r. Returns the status, or
 * -1 when the association failed. */
static int wait_store_rsp(dicom_retrieve_t *r, T_ASC_Association *as, DIC_US msg_id)
{
    int timeout = r->a->srv->cfg.dimse_timeout_s;
    for (;;) {
        T_DIMSE_Message msg;
        T_ASC_PresentationContextID pres = 0;
        DcmDataset *detail = NULL;
        OFCondition cond = DIMSE_receiveCommand(as, DIMSE_BLOCKING, timeout, &pres, &msg, &detail);
        delete detail;
        if (cond.bad())
            return -1;
        if (msg.CommandField == DIMSE_C_STORE_RSP &&
            msg.msg.CStoreRSP.MessageIDBeingRespondedTo == msg_id)
            return msg.msg.CStoreRSP.DimseStatus;
        if (r->is_get && msg.CommandField == DIMSE_C_CANCEL_RQ) {
            r->cancelled = true;
            continue;
        }
        log_warn("dicom: unexpected DIMSE command 0x%04X while waiting for C-STORE-RSP",
                 (unsigned)msg.CommandField);
    }
}

static void count_failed(dicom_retrieve_t *r, const std::string &uid)
{
    r->failed++;
    if (!uid.empty())
        r->failed_uids.push_back(uid);
}

extern "C" int dicom_retrieve_send(dicom_retrieve_t *r, const uint8_t *part10, size_t len)
{
    try {
        if (r->lost)
            return -1;
        if (r->cancelled)
            return -1;
        part10_meta_t mi;
        if (part10_split(part10, len, &mi) != 0 || mi.sop_class[0] == '\0' ||
            mi.sop_instance[0] == '\0') {
            log_warn("dicom: retrieve for %s: stored object has no usable meta header",
                     r->a->calling);
            count_failed(r, mi.sop_instance);
            return 1;
        }
        if (r->total < r->completed + r->failed + r->warning + 1)
            r->total = r->completed + r->failed + r->warning + 1;
        T_ASC_Association *as = r->is_get ? r->a->as : r->sub;
        int result = 1;
        std::string why;
        std::string accepted_ts;
        T_ASC_PresentationContextID pres = 0;
        if (as != NULL)
            pres = find_context(as, mi.sop_class, mi.ts, r->is_get, accepted_ts);
        const uint8_t *ds = part10 + mi.dataset_offset;
        size_t ds_len = len - mi.dataset_offset;
        std::vector<uint8_t> converted;
        if (pres == 0) {
            why = std::string("no presentation context accepted for ") + mi.sop_class;
        } else if (accepted_ts != mi.ts) {
            E_TransferSyntax from = DcmXfer(mi.ts).getXfer();
            E_TransferSyntax to = DcmXfer(accepted_ts.c_str()).getXfer();
            DcmDataset d;
            OFCondition cond = from == EXS_Unknown || to == EXS_Unknown
                                   ? makeOFCondition(0, 3, OF_error, "unknown transfer syntax")
                                   : decode_dataset(ds, ds_len, from, false, d);
            if (cond.good() && !(is_uncompressed(from) && is_uncompressed(to)))
                cond = d.chooseRepresentation(to, NULL);
            if (cond.good() && !d.canWriteXfer(to))
                cond = makeOFCondition(0, 4, OF_error, "cannot convert");
            if (cond.good())
                cond = encode_dataset(d, to, EGL_recalcGL, converted);
            if (cond.bad())
                why = std::string("cannot convert ") + mi.ts + " to " + accepted_ts + ": " +
                      cond.text();
            else {
                ds = converted.data();
                ds_len = converted.size();
            }
        }
        if (why.empty()) {
            DIC_US id = r->a->next_msg_id++;
            OFCondition cond =
                send_store_rq(as, pres, id, mi.sop_class, mi.sop_instance,
                              r->is_get ? NULL : r->a->calling, r->msg_id, ds, ds_len);
            int st = cond.good() ? wait_store_rsp(r, as, id) : -1;
            if (st < 0) {
                why = "sub-association failed";
                if (r->is_get) {
                    r->lost = true;
                    r->a->lost = true;
                } else {
                    ASC_abortAssociation(r->sub);
                    ASC_destroyAssociation(&r->sub);
                }
            } else if (st == 0) {
                r->completed++;
                result = 0;
            } else if ((st & 0xf000) == 0xb000) {
                r->warning++;
                result = 0;
            } else {
                why = "C-STORE status " + std::to_string(st);
            }
        }
        if (result != 0) {
            log_warn("dicom: retrieve sub-operation for %s of %s failed: %s", r->a->calling,
                     mi.sop_instance, why.c_str());
            count_failed(r, mi.sop_instance);
        }
        if (r->lost)
            return -1;
        if (!r->is_get && poll_cancel(*r->a, r->pres, r->msg_id, &r->cancelled)) {
            r->lost = true;
            return -1;
        }
        if (r->cancelled)
            return -1;
        if (remaining_of(r) > 0 && send_retrieve_rsp(r, DICOM_PENDING, NULL, NULL).bad()) {
            r->lost = true;
            r->a->lost = true;
            return -1;
        }
        return result;
    } catch (...) {
        count_failed(r, "");
        return 1;
    }
}

extern "C" void dicom_retrieve_fail(dicom_retrieve_t *r, const char *sop_instance_uid)
{
    try {
        if (r->total < r->completed + r->failed + r->warning + 1)
            r->total = r->completed + r->failed + r->warning + 1;
        count_failed(r, sop_instance_uid ? sop_instance_uid : "");
    } catch (...) {
        r->failed++;
    }
}

bool dicom_services_retrieve(Assoc &a, T_ASC_PresentationContextID pres, T_DIMSE_Message &msg)
{
    dicom_server *srv = a.srv;
    bool is_get = msg.CommandField == DIMSE_C_GET_RQ;
    DcmDataset *ident = NULL;
    uint16_t status = DICOM_SUCCESS;
    std::string why;
    if (!receive_identifier(a, pres, is_get ? "C-GET identifier" : "C-MOVE identifier", &ident,
                            &status, why))
        return false;
    dicom_retrieve_t r;
    r.a = &a;
    r.pres = pres;
    r.is_get = is_get;
    memset(&r.mrq, 0, sizeof(r.mrq));
    memset(&r.grq, 0, sizeof(r.grq));
    const char *cls;
    if (is_get) {
        r.grq = msg.msg.CGetRQ;
        r.msg_id = r.grq.MessageID;
        cls = r.grq.AffectedSOPClassUID;
    } else {
        r.mrq = msg.msg.CMoveRQ;
        r.msg_id = r.mrq.MessageID;
        cls = r.mrq.AffectedSOPClassUID;
        r.dest = dicom_trim(OFString(r.mrq.MoveDestination));
    }
    r.model = DICOM_MODEL_STUDY_ROOT;
    r.level = LEVEL_STUDY;
    memset(&r.keys, 0, sizeof(r.keys));
    r.subnet = NULL;
    r.sub = NULL;
    r.begun = r.cancelled = r.lost = false;
    r.total = r.completed = r.failed = r.warning = 0;

    char comment[256] = "";
    bool by_handler = false; /* the handler logs the failures it decides */
    if (status != DICOM_SUCCESS) {
        /* C-MOVE/C-GET know no 0xA700: out of resources is 0xA701 there */
        if (status == DICOM_OUT_OF_RESOURCES)
            status = DICOM_REFUSED_NO_MATCHES;
        snprintf(comment, sizeof(comment), "%s", why.c_str());
    } else if (!model_of(cls, is_get ? k_get_classes : k_move_classes, &r.model)) {
        status = DICOM_DATASET_MISMATCH;
        snprintf(comment, sizeof(comment), "unsupported retrieve SOP class");
    } else if ((status = parse_identifier(ident, r.model, &r.level, &r.keys, NULL, why)) != 0) {
        snprintf(comment, sizeof(comment), "%s", why.c_str());
    } else if ((is_get ? srv->h.get : srv->h.move) == NULL) {
        status = DICOM_UNABLE_TO_PROCESS;
        snprintf(comment, sizeof(comment), "retrieve not configured");
    } else {
        status = (is_get ? srv->h.get : srv->h.move)(srv->h.ctx, &r, comment, sizeof(comment));
        by_handler = true;
    }
    delete ident;
    attrs_clear(&r.keys);
    if (r.sub) {
        if (ASC_releaseAssociation(r.sub).bad())
            ASC_abortAssociation(r.sub);
        ASC_destroyAssociation(&r.sub);
    }
    if (r.subnet)
        ASC_dropNetwork(&r.subnet);
    if (r.lost || a.lost)
        return false;

    /* A cancel and a success with failed sub-operations are this file's
     * verdicts, logged here; any other failure the handler returned it has
     * logged itself. */
    if (r.cancelled) {
        status = DICOM_CANCEL;
        by_handler = false;
    } else if (status == DICOM_SUCCESS && (r.failed > 0 || r.warning > 0)) {
        status = DICOM_WARNING_SUBOPS;
        by_handler = false;
    }
    if (!by_handler && status != DICOM_SUCCESS)
        log_warn("dicom: C-%s from %s (dest '%s'): status 0x%04X, %u completed, %u failed: %s",
                 is_get ? "GET" : "MOVE", a.calling, r.dest.c_str(), status, r.completed, r.failed,
                 comment);
    DcmDataset *ids = NULL;
    if (!r.failed_uids.empty() && status != DICOM_SUCCESS) {
        ids = new DcmDataset;
        std::string list;
        for (size_t i = 0; i < r.failed_uids.size(); i++) {
            if (i)
                list += "\\";
            list += r.failed_uids[i];
        }
        ids->putAndInsertString(DCM_FailedSOPInstanceUIDList, list.c_str());
    }
    DcmDataset *detail = comment_detail(status, comment);
    OFCondition cond = send_retrieve_rsp(&r, status, ids, detail);
    delete ids;
    delete detail;
    return cond.good();
}
