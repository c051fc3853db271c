/* dicom_adapter.cc - the DICOM protocol behind router/dicom.h, built on
 * DCMTK 3.6.7 (dcmnet, dcmdata and the decompression codecs). This is the only
 * file of ShardPACS that sees C++ or DCMTK; every entry point catches all
 * exceptions and turns them into an error code or a DIMSE failure status.
 *
 * Threads: dicom_server_start() creates one accept thread, `workers` worker
 * threads and one reject thread. The accept thread only accept()s TCP
 * connections and queues the sockets; a worker then lets DCMTK read the
 * A-ASSOCIATE-RQ from the already accepted socket (dcmExternalSocketHandle,
 * see serve_socket()), negotiates and serves DIMSE requests on it, calling the
 * handlers on its own thread. When the queue is full the accept thread passes
 * the socket to the reject thread, which answers A-ASSOCIATE-RJ (transient,
 * local limit exceeded). Nagle is switched off on the listening socket (Linux
 * sockets inherit it) and again in our DcmTransportLayer for every connection
 * DCMTK makes, accepted or outgoing (C-MOVE sub-associations), so nothing
 * depends on the TCP_NODELAY environment variable.
 *
 * Ownership: the server owns its sockets, threads and DCMTK networks. Data
 * set bytes handed to handlers are owned by the worker and valid during the
 * call. The data dictionary and the decoders are process-wide DCMTK state,
 * set up once and never torn down. */
#include <dcmtk/config/osconfig.h>

#include <dcmtk/dcmdata/dcdatset.h>
#include <dcmtk/dcmdata/dcdeftag.h>
#include <dcmtk/dcmdata/dcdict.h>
#include <dcmtk/dcmdata/dcelem.h>
#include <dcmtk/dcmdata/dcistrmb.h>
#include <dcmtk/dcmdata/dcostrma.h>
#include <dcmtk/dcmdata/dcrledrg.h>
#include <dcmtk/dcmdata/dcuid.h>
#include <dcmtk/dcmdata/dcxfer.h>
#include <dcmtk/dcmjpeg/djdecode.h>
#include <dcmtk/dcmjpls/djdecode.h>
#include <dcmtk/dcmnet/assoc.h>
#include <dcmtk/dcmnet/dcmlayer.h>
#include <dcmtk/dcmnet/dcmtrans.h>
#include <dcmtk/dcmnet/dimse.h>
#include <dcmtk/dcmnet/dul.h>
#include <dcmtk/oflog/oflog.h>

extern "C" {
#include "dicom.h"

#include "../common/base.h"
#include "../common/log.h"
}

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

/* Our implementation class UID (a UUID-derived 2.25 UID) and version name. */
#define SP_IMPLEMENTATION_UID "2.25.150578371872791499775955047255267566374"
#define SP_IMPLEMENTATION_VERSION "SHARDPACS_010"

/* Read whole values into memory: a buffer stream cannot load values later. */
static const Uint32 READ_ALL = 0xFFFFFFFFu;

/* ---- small helpers ------------------------------------------------------ */

/* Removes DICOM padding (trailing spaces and NULs). */
static std::string trim_value(const OFString &s)
{
    size_t n = s.length();
    while (n > 0 && (s[n - 1] == ' ' || s[n - 1] == '\0'))
        n--;
    return std::string(s.c_str(), n);
}

static bool is_uncompressed(E_TransferSyntax x)
{
    return x == EXS_LittleEndianExplicit || x == EXS_LittleEndianImplicit ||
           x == EXS_BigEndianExplicit;
}

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
 * absent. */
static bool get_string(DcmItem &item, const DcmTagKey &tag, std::string &out)
{
    OFString v;
    if (item.findAndGetOFStringArray(tag, v).bad())
        return false;
    out = trim_value(v);
    return true;
}

/* One-time process-wide DCMTK set-up; returns false (with err) when the data
 * dictionary is missing. */
static std::once_flag g_init_once;
static bool g_dict_ok = false;

static void dcmtk_init_once()
{
    std::call_once(g_init_once, [] {
        OFLog::configure(log_get_level() <= LOG_DEBUG ? OFLogger::WARN_LOG_LEVEL
                                                      : OFLogger::ERROR_LOG_LEVEL);
        dcmDisableGethostbyaddr.set(OFTrue);
        g_dict_ok = dcmDataDict.isDictionaryLoaded();
        DJDecoderRegistration::registerCodecs();
        DJLSDecoderRegistration::registerCodecs();
        DcmRLEDecoderRegistration::registerCodecs();
    });
}

/* ---- Part-10 ------------------------------------------------------------ */

/* The file meta elements we care about, parsed by hand (explicit VR little
 * endian, group 0002 only). */
struct MetaInfo {
    size_t dataset_offset = 0;
    std::string ts, sop_class, sop_instance;
};

static bool long_vr(const char vr[2])
{
    static const char *const longs[] = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ",
                                        "SV", "UC", "UN", "UR", "UT", "UV"};
    for (const char *l : longs)
        if (vr[0] == l[0] && vr[1] == l[1])
            return true;
    return false;
}

static int parse_meta(const uint8_t *p, size_t len, MetaInfo &mi)
{
    if (p == NULL || len < 132 || memcmp(p + 128, "DICM", 4) != 0)
        return SP_EINVAL;
    size_t off = 132;
    while (off + 8 <= len) {
        uint16_t group = (uint16_t)(p[off] | p[off + 1] << 8);
        uint16_t elem = (uint16_t)(p[off + 2] | p[off + 3] << 8);
        if (group != 0x0002)
            break;
        char vr[2] = {(char)p[off + 4], (char)p[off + 5]};
        size_t hdr, vlen;
        if (long_vr(vr)) {
            if (off + 12 > len)
                return SP_EINVAL;
            vlen = (size_t)p[off + 8] | (size_t)p[off + 9] << 8 | (size_t)p[off + 10] << 16 |
                   (size_t)p[off + 11] << 24;
            hdr = 12;
        } else {
            vlen = (size_t)p[off + 6] | (size_t)p[off + 7] << 8;
            hdr = 8;
        }
        if (vlen == 0xFFFFFFFFu || off + hdr + vlen > len)
            return SP_EINVAL;
        std::string v((const char *)p + off + hdr, vlen);
        while (!v.empty() && (v.back() == '\0' || v.back() == ' '))
            v.pop_back();
        if (elem == 0x0002)
            mi.sop_class = v;
        else if (elem == 0x0003)
            mi.sop_instance = v;
        else if (elem == 0x0010)
            mi.ts = v;
        off += hdr + vlen;
    }
    if (mi.ts.empty() || mi.ts.size() > 64)
        return SP_EINVAL;
    mi.dataset_offset = off;
    return 0;
}

static void put_meta_element(std::vector<uint8_t> &b, uint16_t elem, const char *vr,
                             const std::string &value, char pad)
{
    std::string v = value;
    if (v.size() & 1)
        v.push_back(pad);
    b.push_back(0x02);
    b.push_back(0x00);
    b.push_back((uint8_t)(elem & 0xff));
    b.push_back((uint8_t)(elem >> 8));
    b.push_back((uint8_t)vr[0]);
    b.push_back((uint8_t)vr[1]);
    if (long_vr(vr)) {
        b.push_back(0);
        b.push_back(0);
        for (int i = 0; i < 4; i++)
            b.push_back((uint8_t)(v.size() >> (8 * i)));
    } else {
        b.push_back((uint8_t)(v.size() & 0xff));
        b.push_back((uint8_t)(v.size() >> 8));
    }
    b.insert(b.end(), v.begin(), v.end());
}

extern "C" int dicom_make_part10(const uint8_t *dataset, size_t len, const char *sop_class_uid,
                                 const char *sop_instance_uid, const char *transfer_syntax_uid,
                                 uint8_t **out, size_t *out_len)
{
    if (out == NULL || out_len == NULL || (dataset == NULL && len > 0) || !sop_class_uid ||
        !sop_instance_uid || !transfer_syntax_uid || strlen(sop_class_uid) > 64 ||
        strlen(sop_instance_uid) > 64 || strlen(transfer_syntax_uid) > 64)
        return SP_EINVAL;
    try {
        std::vector<uint8_t> g;
        put_meta_element(g, 0x0001, "OB", std::string("\0\1", 2), '\0');
        put_meta_element(g, 0x0002, "UI", sop_class_uid, '\0');
        put_meta_element(g, 0x0003, "UI", sop_instance_uid, '\0');
        put_meta_element(g, 0x0010, "UI", transfer_syntax_uid, '\0');
        put_meta_element(g, 0x0012, "UI", SP_IMPLEMENTATION_UID, '\0');
        put_meta_element(g, 0x0013, "SH", SP_IMPLEMENTATION_VERSION, ' ');
        size_t total = 128 + 4 + 12 + g.size() + len;
        uint8_t *b = (uint8_t *)sp_malloc(total);
        memset(b, 0, 128);
        memcpy(b + 128, "DICM", 4);
        static const uint8_t gl_hdr[8] = {0x02, 0x00, 0x00, 0x00, 'U', 'L', 0x04, 0x00};
        memcpy(b + 132, gl_hdr, 8);
        uint32_t gl = (uint32_t)g.size();
        for (int i = 0; i < 4; i++)
            b[140 + i] = (uint8_t)(gl >> (8 * i));
        memcpy(b + 144, g.data(), g.size());
        if (len > 0)
            memcpy(b + 144 + g.size(), dataset, len);
        *out = b;
        *out_len = total;
        return 0;
    } catch (...) {
        return SP_EINVAL;
    }
}

extern "C" int dicom_split_part10(const uint8_t *part10, size_t len, size_t *dataset_offset,
                                  char ts[65])
{
    try {
        MetaInfo mi;
        int rc = parse_meta(part10, len, mi);
        if (rc != 0)
            return rc;
        if (dataset_offset)
            *dataset_offset = mi.dataset_offset;
        if (ts)
            sp_strlcpy(ts, mi.ts.c_str(), 65);
        return 0;
    } catch (...) {
        return SP_EINVAL;
    }
}

/* ---- attributes ---------------------------------------------------------- */

/* Reads the stored attributes of ds (already converted to UTF-8). */
static void read_stored_attrs(DcmDataset &ds, attrs_t *out)
{
    for (int i = 0; i < ATTR_STORED_COUNT; i++) {
        const attr_info_t *ai = attr_info((attr_id_t)i);
        if ((ai->tag >> 16) == 0x0002 || ai->id == ATTR_SPECIFIC_CHARACTER_SET)
            continue;
        std::string v;
        if (get_string(ds, DcmTagKey((Uint16)(ai->tag >> 16), (Uint16)(ai->tag & 0xffff)), v))
            attrs_set(out, ai->id, v.c_str());
    }
}

/* Parses and converts; on success out holds the attributes (the original
 * Specific Character Set value included) and ds the parsed data set. */
static int parse_attrs_internal(const uint8_t *dataset, size_t len, const char *ts, DcmDataset &ds,
                                attrs_t *out, std::string &why)
{
    E_TransferSyntax xfer = DcmXfer(ts ? ts : "").getXfer();
    if (xfer == EXS_Unknown) {
        why = std::string("unknown transfer syntax ") + (ts ? ts : "(null)");
        return SP_EINVAL;
    }
    /* Parse to the end (Pixel Data included): a data set cut short must be
     * refused here, before anything is stored and acknowledged. */
    OFCondition cond = decode_dataset(dataset, len, xfer, false, ds);
    if (cond.bad()) {
        why = std::string("malformed data set: ") + cond.text();
        return SP_EINVAL;
    }
    std::string scs;
    bool has_scs = get_string(ds, DCM_SpecificCharacterSet, scs);
    cond = ds.convertToUTF8();
    if (cond.bad()) {
        why = "cannot convert character set '" + scs + "' to UTF-8: " + cond.text();
        return SP_EINVAL;
    }
    attrs_clear(out);
    if (has_scs)
        attrs_set(out, ATTR_SPECIFIC_CHARACTER_SET, scs.c_str());
    read_stored_attrs(ds, out);
    attrs_set(out, ATTR_TRANSFER_SYNTAX_UID, ts);
    return 0;
}

extern "C" int dicom_parse_attrs(const uint8_t *dataset, size_t len,
                                 const char *transfer_syntax_uid, attrs_t *out, char *err,
                                 size_t errlen)
{
    if (out == NULL || (dataset == NULL && len > 0)) {
        sp_fmt(err, errlen, "invalid argument");
        return SP_EINVAL;
    }
    try {
        dcmtk_init_once();
        DcmDataset ds;
        std::string why;
        int rc = parse_attrs_internal(dataset, len, transfer_syntax_uid, ds, out, why);
        if (rc != 0)
            sp_fmt(err, errlen, "%s", why.c_str());
        return rc;
    } catch (const std::exception &e) {
        sp_fmt(err, errlen, "exception: %s", e.what());
    } catch (...) {
        sp_fmt(err, errlen, "unknown exception");
    }
    return SP_EINVAL;
}

/* ---- transport: handing accepted sockets to DCMTK ------------------------ */

/* dcmExternalSocketHandle is one process-wide value that DCMTK reads at the
 * start of ASC_receiveAssociation(): "use this accepted socket instead of
 * calling accept()". Workers set it under g_ext_mu and release the mutex as
 * soon as DCMTK has taken the socket, which is when it calls our
 * createConnection() on the same thread - before it reads a single byte. So
 * the lock is never held while waiting for a (possibly silent) peer. Every
 * DICOM acceptor in the process must go through this adapter. */
static std::mutex g_ext_mu;
static thread_local bool t_ext_locked = false;
static thread_local bool t_fd_taken = false;

static void ext_release()
{
    if (t_ext_locked) {
        dcmExternalSocketHandle.set(-1);
        t_ext_locked = false;
        g_ext_mu.unlock();
    }
}

static void set_nodelay(int fd)
{
    int one = 1;
    (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

/* Plain TCP connections, with Nagle off, that also release g_ext_mu. */
class NodelayLayer : public DcmTransportLayer
{
  public:
    DcmTransportConnection *createConnection(DcmNativeSocketType sock, OFBool secure) override
    {
        ext_release();
        if (secure)
            return NULL;
        set_nodelay(sock);
        t_fd_taken = true;
        return new DcmTCPConnection(sock);
    }
};

/* Creates an acceptor network that has no listening socket of its own (our
 * accept thread owns the listening socket), or a requestor network. */
static OFCondition make_network(T_ASC_NetworkRole role, int timeout_s, int dummy_fd,
                                T_ASC_Network **net)
{
    OFCondition cond;
    if (role == NET_ACCEPTOR) {
        std::lock_guard<std::mutex> lk(g_ext_mu);
        dcmExternalSocketHandle.set(dummy_fd);
        cond = ASC_initializeNetwork(role, 0, timeout_s, net);
        dcmExternalSocketHandle.set(-1);
    } else {
        cond = ASC_initializeNetwork(role, 0, timeout_s, net);
    }
    if (cond.good()) {
        cond = ASC_setTransportLayer(*net, new NodelayLayer(), 1);
        if (cond.bad())
            ASC_dropNetwork(net);
    }
    return cond;
}

/* ---- server state ---------------------------------------------------------- */

struct dicom_server {
    std::string ae_title, bind_address;
    std::set<std::string> allowed_callers; /* empty: any calling AE title */
    dicom_config_t cfg;
    dicom_handlers_t h;
    int listen_fd = -1;
    int port = 0;
    int wake[2] = {-1, -1};
    std::atomic<bool> stopping{false};
    std::mutex mu;
    std::condition_variable cv;
    std::deque<int> queue;             /* accepted sockets waiting for a worker */
    std::deque<int> reject_queue;      /* sockets to answer with A-ASSOCIATE-RJ */
    std::vector<int> negotiating;      /* per worker: socket whose RQ is being read, or -1 */
    std::vector<T_ASC_Network *> nets; /* one per worker, then one for the rejecter */
    std::thread acceptor, rejecter;
    std::vector<std::thread> workers;
};

/* One association being served. */
struct Assoc {
    dicom_server *srv = nullptr;
    T_ASC_Association *as = nullptr;
    char calling[DIC_AE_LEN + 1] = {0};
    char called[DIC_AE_LEN + 1] = {0};
    char host[128] = {0};
    dicom_peer_t peer = {nullptr, nullptr, nullptr};
    DIC_US next_msg_id = 1;
    bool lost = false; /* association failed: abort instead of responding */
};

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
    OFCondition cond = id->convertToUTF8();
    if (cond.bad()) {
        why = "cannot convert character set '" + scs + "': " + cond.text();
        return DICOM_UNABLE_TO_PROCESS;
    }
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
        OFString v;
        if (e->getLength() > 0)
            e->getOFStringArray(v);
        attrs_set(keys, ai->id, trim_value(v).c_str());
    }
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

/* ---- C-ECHO and C-STORE -------------------------------------------------------- */

static bool handle_store(Assoc &a, T_ASC_PresentationContextID pres, T_DIMSE_C_StoreRQ &rq)
{
    dicom_server *srv = a.srv;
    T_ASC_PresentationContext pc;
    OFCondition cond = ASC_findAcceptedPresentationContext(a.as->params, pres, &pc);
    if (cond.bad())
        return false;
    MemOutputStream os;
    T_ASC_PresentationContextID dpres = 0;
    cond = DIMSE_receiveDataSetInFile(a.as, DIMSE_BLOCKING, srv->cfg.dimse_timeout_s, &dpres, &os,
                                      NULL, NULL);
    if (cond.bad()) {
        log_warn("dicom: C-STORE from %s (%s): receiving data set failed: %s", a.calling, a.host,
                 cond.text());
        return false;
    }
    std::vector<uint8_t> &bytes = os.bytes();
    std::string cmd_sop(rq.AffectedSOPInstanceUID);
    while (!cmd_sop.empty() && cmd_sop.back() == ' ')
        cmd_sop.pop_back();
    uint16_t status = DICOM_SUCCESS;
    char comment[256] = "";
    attrs_t attrs;
    memset(&attrs, 0, sizeof(attrs));
    {
        DcmDataset ds;
        std::string why;
        if (dpres != pres) {
            status = DICOM_CANNOT_UNDERSTAND;
            snprintf(comment, sizeof(comment), "data set on another presentation context");
        } else if (parse_attrs_internal(bytes.data(), bytes.size(), pc.acceptedTransferSyntax, ds,
                                        &attrs, why) != 0) {
            status = DICOM_CANNOT_UNDERSTAND;
            snprintf(comment, sizeof(comment), "%s", why.c_str());
        } else if (attrs_get(&attrs, ATTR_SOP_INSTANCE_UID) == NULL ||
                   attrs_str(&attrs, ATTR_SOP_INSTANCE_UID)[0] == 0) {
            status = DICOM_CANNOT_UNDERSTAND;
            snprintf(comment, sizeof(comment), "SOPInstanceUID missing in data set");
        } else if (cmd_sop != attrs_str(&attrs, ATTR_SOP_INSTANCE_UID)) {
            status = DICOM_DATASET_MISMATCH;
            snprintf(comment, sizeof(comment), "SOPInstanceUID in data set differs from command");
        } else if (attrs_str(&attrs, ATTR_STUDY_INSTANCE_UID)[0] == 0) {
            status = DICOM_CANNOT_UNDERSTAND;
            snprintf(comment, sizeof(comment), "StudyInstanceUID missing");
        } else if (attrs_str(&attrs, ATTR_SERIES_INSTANCE_UID)[0] == 0) {
            status = DICOM_CANNOT_UNDERSTAND;
            snprintf(comment, sizeof(comment), "SeriesInstanceUID missing");
        } else if (attrs_get(&attrs, ATTR_SOP_CLASS_UID) != NULL &&
                   strcmp(attrs_str(&attrs, ATTR_SOP_CLASS_UID), rq.AffectedSOPClassUID) != 0) {
            status = DICOM_DATASET_MISMATCH;
            snprintf(comment, sizeof(comment), "SOPClassUID in data set differs from command");
        }
    }
    if (status == DICOM_SUCCESS) {
        if (srv->h.store == NULL) {
            status = DICOM_OUT_OF_RESOURCES;
            snprintf(comment, sizeof(comment), "storage not configured");
        } else {
            dicom_store_t req;
            req.peer = &a.peer;
            req.sop_class_uid = rq.AffectedSOPClassUID;
            req.sop_instance_uid = cmd_sop.c_str();
            req.transfer_syntax_uid = pc.acceptedTransferSyntax;
            req.dataset = bytes.data();
            req.dataset_len = bytes.size();
            req.attrs = &attrs;
            status = srv->h.store(srv->h.ctx, &req, comment, sizeof(comment));
        }
    }
    if (status != DICOM_SUCCESS)
        log_warn("dicom: C-STORE from %s (%s) of %s: status 0x%04X %s", a.calling, a.host,
                 cmd_sop.c_str(), status, comment);
    attrs_clear(&attrs);

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

/* ---- C-FIND ---------------------------------------------------------------- */

extern "C" dicom_model_t dicom_find_model(const dicom_find_t *q)
{
    return q->model;
}
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

static bool handle_find(Assoc &a, T_ASC_PresentationContextID pres, T_DIMSE_C_FindRQ &rq)
{
    dicom_server *srv = a.srv;
    DcmDataset *ident = NULL;
    T_ASC_PresentationContextID ipres = 0;
    OFCondition cond = DIMSE_receiveDataSetInMemory(a.as, DIMSE_BLOCKING, srv->cfg.dimse_timeout_s,
                                                    &ipres, &ident, NULL, NULL);
    if (cond.bad()) {
        log_warn("dicom: C-FIND identifier from %s: %s", a.calling, cond.text());
        return false;
    }
    dicom_find_t q;
    q.a = &a;
    q.pres = pres;
    q.rq = rq;
    q.model = DICOM_MODEL_STUDY_ROOT;
    q.level = LEVEL_STUDY;
    memset(&q.keys, 0, sizeof(q.keys));
    q.cancelled = false;
    q.failed = false;
    uint16_t status = DICOM_SUCCESS;
    char comment[256] = "";
    std::string why;
    if (!model_of(rq.AffectedSOPClassUID, k_find_classes, &q.model)) {
        status = DICOM_DATASET_MISMATCH;
        snprintf(comment, sizeof(comment), "unsupported C-FIND SOP class");
    } else if ((status = parse_identifier(ident, q.model, &q.level, &q.keys, &q.extra, why)) != 0) {
        snprintf(comment, sizeof(comment), "%s", why.c_str());
    } else if (srv->h.find == NULL) {
        status = DICOM_UNABLE_TO_PROCESS;
        snprintf(comment, sizeof(comment), "query not configured");
    } else {
        status = srv->h.find(srv->h.ctx, &q, comment, sizeof(comment));
        if (q.cancelled)
            status = DICOM_CANCEL;
    }
    delete ident;
    attrs_clear(&q.keys);
    if (q.failed || a.lost)
        return false;
    if (status != DICOM_SUCCESS && status != DICOM_CANCEL)
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
    cond = DIMSE_sendFindResponse(a.as, pres, &rq, &rsp, NULL, detail);
    delete detail;
    return cond.good();
}

/* ---- C-MOVE and C-GET ---------------------------------------------------------- */

extern "C" dicom_model_t dicom_retrieve_model(const dicom_retrieve_t *r)
{
    return r->model;
}
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

/* Sends a C-MOVE or C-GET response with the current counts. */
static OFCondition send_retrieve_rsp(dicom_retrieve_t *r, uint16_t status, DcmDataset *ids,
                                     DcmDataset *detail)
{
    bool with_remaining = status == DICOM_PENDING || status == DICOM_CANCEL;
    if (r->is_get) {
        T_DIMSE_C_GetRSP rsp;
        memset(&rsp, 0, sizeof(rsp));
        rsp.MessageIDBeingRespondedTo = r->grq.MessageID;
        OFStandard::strlcpy(rsp.AffectedSOPClassUID, r->grq.AffectedSOPClassUID,
                            sizeof(rsp.AffectedSOPClassUID));
        rsp.DimseStatus = status;
        rsp.DataSetType = ids ? DIMSE_DATASET_PRESENT : DIMSE_DATASET_NULL;
        rsp.NumberOfRemainingSubOperations = clamp_us(remaining_of(r));
        rsp.NumberOfCompletedSubOperations = clamp_us(r->completed);
        rsp.NumberOfFailedSubOperations = clamp_us(r->failed);
        rsp.NumberOfWarningSubOperations = clamp_us(r->warning);
        rsp.opts = O_GET_AFFECTEDSOPCLASSUID | O_GET_NUMBEROFCOMPLETEDSUBOPERATIONS |
                   O_GET_NUMBEROFFAILEDSUBOPERATIONS | O_GET_NUMBEROFWARNINGSUBOPERATIONS |
                   (with_remaining ? O_GET_NUMBEROFREMAININGSUBOPERATIONS : 0);
        return DIMSE_sendGetResponse(r->a->as, r->pres, &r->grq, &rsp, ids, detail);
    }
    T_DIMSE_C_MoveRSP rsp;
    memset(&rsp, 0, sizeof(rsp));
    rsp.MessageIDBeingRespondedTo = r->mrq.MessageID;
    OFStandard::strlcpy(rsp.AffectedSOPClassUID, r->mrq.AffectedSOPClassUID,
                        sizeof(rsp.AffectedSOPClassUID));
    rsp.DimseStatus = status;
    rsp.DataSetType = ids ? DIMSE_DATASET_PRESENT : DIMSE_DATASET_NULL;
    rsp.NumberOfRemainingSubOperations = clamp_us(remaining_of(r));
    rsp.NumberOfCompletedSubOperations = clamp_us(r->completed);
    rsp.NumberOfFailedSubOperations = clamp_us(r->failed);
    rsp.NumberOfWarningSubOperations = clamp_us(r->warning);
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
        OFCondition cond = make_network(NET_REQUESTOR, srv->cfg.acse_timeout_s, -1, &r->subnet);
        if (cond.bad()) {
            sp_fmt(err, errlen, "cannot create network: %s", cond.text());
            return SP_EUNAVAIL;
        }
        T_ASC_Parameters *params = NULL;
        cond = ASC_createAssociationParameters(&params, srv->cfg.max_pdu);
        if (cond.bad()) {
            sp_fmt(err, errlen, "%s", cond.text());
            return SP_EUNAVAIL;
        }
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

/* Writes PDVs of one message part straight from memory, chunked to what the
 * peer accepts. This is how the stored bytes go out bit-exact: DIMSE itself
 * can only send a DcmDataset, which it re-encodes. */
static OFCondition send_pdvs(T_ASC_Association *as, T_ASC_PresentationContextID pres,
                             DUL_DATAPDV type, const uint8_t *data, size_t len)
{
    unsigned long max = as->sendPDVLength;
    Uint32 maxpdu = dcmMaxOutgoingPDUSize.get();
    if (max + 12 > maxpdu)
        max = maxpdu - 12;
    max &= ~1UL;
    if (max == 0 || (len & 1))
        return makeOFCondition(0, 2, OF_error, "cannot send odd-length data");
    size_t off = 0;
    do {
        size_t n = len - off < max ? len - off : max;
        DUL_PDV pdv;
        pdv.fragmentLength = (unsigned long)n;
        pdv.presentationContextID = pres;
        pdv.pdvType = type;
        pdv.lastPDV = (off + n == len) ? OFTrue : OFFalse;
        pdv.data = const_cast<uint8_t *>(data + off);
        DUL_PDVLIST list;
        list.count = 1;
        list.pdv = &pdv;
        OFCondition cond = DUL_WritePDVs(&as->DULassociation, &list);
        if (cond.bad())
            return cond;
        off += n;
    } while (off < len);
    return EC_Normal;
}

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
    if (cond.good())
        cond = send_pdvs(as, pres, DUL_COMMANDPDV, cbytes.data(), cbytes.size());
    if (cond.good())
        cond = send_pdvs(as, pres, DUL_DATASETPDV, data, len);
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
        MetaInfo mi;
        if (parse_meta(part10, len, mi) != 0 || mi.sop_class.empty() || mi.sop_instance.empty()) {
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
            pres = find_context(as, mi.sop_class.c_str(), mi.ts.c_str(), r->is_get, accepted_ts);
        const uint8_t *ds = part10 + mi.dataset_offset;
        size_t ds_len = len - mi.dataset_offset;
        std::vector<uint8_t> converted;
        if (pres == 0) {
            why = "no presentation context accepted for " + mi.sop_class;
        } else if (accepted_ts != mi.ts) {
            E_TransferSyntax from = DcmXfer(mi.ts.c_str()).getXfer();
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
                     mi.sop_instance.c_str(), why.c_str());
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

static bool handle_retrieve(Assoc &a, T_ASC_PresentationContextID pres, T_DIMSE_Message &msg)
{
    dicom_server *srv = a.srv;
    bool is_get = msg.CommandField == DIMSE_C_GET_RQ;
    DcmDataset *ident = NULL;
    T_ASC_PresentationContextID ipres = 0;
    OFCondition cond = DIMSE_receiveDataSetInMemory(a.as, DIMSE_BLOCKING, srv->cfg.dimse_timeout_s,
                                                    &ipres, &ident, NULL, NULL);
    if (cond.bad()) {
        log_warn("dicom: C-%s identifier from %s: %s", is_get ? "GET" : "MOVE", a.calling,
                 cond.text());
        return false;
    }
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
        r.dest = trim_value(OFString(r.mrq.MoveDestination));
    }
    r.model = DICOM_MODEL_STUDY_ROOT;
    r.level = LEVEL_STUDY;
    memset(&r.keys, 0, sizeof(r.keys));
    r.subnet = NULL;
    r.sub = NULL;
    r.begun = r.cancelled = r.lost = false;
    r.total = r.completed = r.failed = r.warning = 0;

    uint16_t status = DICOM_SUCCESS;
    char comment[256] = "";
    std::string why;
    if (!model_of(cls, is_get ? k_get_classes : k_move_classes, &r.model)) {
        status = DICOM_DATASET_MISMATCH;
        snprintf(comment, sizeof(comment), "unsupported retrieve SOP class");
    } else if ((status = parse_identifier(ident, r.model, &r.level, &r.keys, NULL, why)) != 0) {
        snprintf(comment, sizeof(comment), "%s", why.c_str());
    } else if ((is_get ? srv->h.get : srv->h.move) == NULL) {
        status = DICOM_UNABLE_TO_PROCESS;
        snprintf(comment, sizeof(comment), "retrieve not configured");
    } else {
        status = (is_get ? srv->h.get : srv->h.move)(srv->h.ctx, &r, comment, sizeof(comment));
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

    if (r.cancelled)
        status = DICOM_CANCEL;
    else if (status == DICOM_SUCCESS && r.failed > 0)
        status = DICOM_WARNING_SUBOPS;
    else if (status == DICOM_SUCCESS && r.warning > 0)
        status = DICOM_WARNING_SUBOPS;
    if (status != DICOM_SUCCESS)
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
    cond = send_retrieve_rsp(&r, status, ids, detail);
    delete ids;
    delete detail;
    return cond.good();
}

/* ---- association handling ------------------------------------------------------ */

static const char *const k_uncompressed_ts[] = {UID_LittleEndianExplicitTransferSyntax,
                                                UID_BigEndianExplicitTransferSyntax,
                                                UID_LittleEndianImplicitTransferSyntax};

/* Accepts what we serve: verification and the Q/R models with uncompressed
 * transfer syntaxes, and every storage class in the role the requester
 * proposed. For C-STORE to us we take the requester's first proposed transfer
 * syntax that DCMTK knows: the sender then need not convert what it sends
 * (storescu cannot decompress RLE, for one), and we keep what it meant to
 * send. For C-GET (requester proposes the SCP role, we will send) we take an
 * uncompressed one when offered, in the order storescp uses (explicit LE,
 * explicit BE, implicit LE): every stored syntax we can decode converts to
 * it; instances whose stored syntax was accepted go out verbatim. */
static OFCondition negotiate(T_ASC_Association *as)
{
    const char *services[] = {UID_VerificationSOPClass, k_find_classes[0], k_find_classes[1],
                              k_move_classes[0],        k_move_classes[1], k_get_classes[0],
                              k_get_classes[1]};
    const char *ts[] = {k_uncompressed_ts[0], k_uncompressed_ts[1], k_uncompressed_ts[2]};
    OFCondition cond = ASC_acceptContextsWithPreferredTransferSyntaxes(
        as->params, services, (int)(sizeof(services) / sizeof(services[0])), ts, 3);
    if (cond.bad())
        return cond;
    int n = ASC_countPresentationContexts(as->params);
    for (int i = 0; i < n; i++) {
        T_ASC_PresentationContext pc;
        if (ASC_getPresentationContext(as->params, i, &pc).bad())
            continue;
        if (!dcmIsaStorageSOPClassUID(pc.abstractSyntax, ESSC_All))
            continue;
        const char *chosen = NULL;
        if (pc.proposedRole == ASC_SC_ROLE_SCP || pc.proposedRole == ASC_SC_ROLE_SCUSCP) {
            /* C-GET: we will send, and can always decode to uncompressed */
            for (const char *pref : k_uncompressed_ts)
                for (int k = 0; k < pc.transferSyntaxCount && !chosen; k++)
                    if (strcmp(pc.proposedTransferSyntaxes[k], pref) == 0)
                        chosen = pref;
        }
        for (int k = 0; k < pc.transferSyntaxCount && !chosen; k++)
            if (DcmXfer(pc.proposedTransferSyntaxes[k]).getXfer() != EXS_Unknown)
                chosen = pc.proposedTransferSyntaxes[k];
        if (chosen == NULL) {
            ASC_refusePresentationContext(as->params, pc.presentationContextID,
                                          ASC_P_TRANSFERSYNTAXESNOTSUPPORTED);
            continue;
        }
        std::string chosen_ts(chosen);
        cond = ASC_acceptPresentationContext(as->params, pc.presentationContextID,
                                             chosen_ts.c_str(), pc.proposedRole);
        if (cond.bad())
            ASC_refusePresentationContext(as->params, pc.presentationContextID, ASC_P_NOREASON);
    }
    return EC_Normal;
}

/* Serves DIMSE requests until release, abort, timeout or server stop. */
static void serve_association(Assoc &a)
{
    dicom_server *srv = a.srv;
    int idle_s = 0;
    for (;;) {
        if (srv->stopping.load()) {
            ASC_abortAssociation(a.as);
            return;
        }
        if (!ASC_dataWaiting(a.as, 1)) {
            if (++idle_s >= srv->cfg.dimse_timeout_s) {
                log_info("dicom: association from %s idle for %d s, aborting", a.calling, idle_s);
                ASC_abortAssociation(a.as);
                return;
            }
            continue;
        }
        idle_s = 0;
        T_DIMSE_Message msg;
        T_ASC_PresentationContextID pres = 0;
        OFCondition cond =
            DIMSE_receiveCommand(a.as, DIMSE_BLOCKING, srv->cfg.dimse_timeout_s, &pres, &msg, NULL);
        if (cond == DUL_PEERREQUESTEDRELEASE) {
            ASC_acknowledgeRelease(a.as);
            return;
        }
        if (cond == DUL_PEERABORTEDASSOCIATION || cond == DUL_NETWORKCLOSED)
            return;
        if (cond.bad()) {
            log_warn("dicom: receiving from %s (%s): %s", a.calling, a.host, cond.text());
            ASC_abortAssociation(a.as);
            return;
        }
        bool ok = true;
        switch (msg.CommandField) {
        case DIMSE_C_ECHO_RQ:
            ok = DIMSE_sendEchoResponse(a.as, pres, &msg.msg.CEchoRQ, STATUS_Success, NULL).good();
            break;
        case DIMSE_C_STORE_RQ: ok = handle_store(a, pres, msg.msg.CStoreRQ); break;
        case DIMSE_C_FIND_RQ: ok = handle_find(a, pres, msg.msg.CFindRQ); break;
        case DIMSE_C_MOVE_RQ:
        case DIMSE_C_GET_RQ: ok = handle_retrieve(a, pres, msg); break;
        case DIMSE_C_CANCEL_RQ: break; /* for a request already answered */
        default:
            log_warn("dicom: unsupported DIMSE command 0x%04X from %s", (unsigned)msg.CommandField,
                     a.calling);
            ok = false;
            break;
        }
        if (!ok) {
            ASC_abortAssociation(a.as);
            return;
        }
    }
}

/* Lets DCMTK read the A-ASSOCIATE-RQ from an accepted socket (owned from here
 * on). Returns the association, or NULL (socket closed). */
static T_ASC_Association *receive_rq(dicom_server *srv, T_ASC_Network *net, int fd, int slot)
{
    if (slot >= 0) {
        std::lock_guard<std::mutex> lk(srv->mu);
        srv->negotiating[(size_t)slot] = fd;
        if (srv->stopping.load())
            shutdown(fd, SHUT_RDWR);
    }
    T_ASC_Association *as = NULL;
    g_ext_mu.lock();
    t_ext_locked = true;
    t_fd_taken = false;
    dcmExternalSocketHandle.set(fd);
    OFCondition cond = ASC_receiveAssociation(net, &as, srv->cfg.max_pdu, NULL, NULL, OFFalse,
                                              DUL_NOBLOCK, srv->cfg.acse_timeout_s);
    ext_release();
    if (slot >= 0) {
        std::lock_guard<std::mutex> lk(srv->mu);
        srv->negotiating[(size_t)slot] = -1;
    }
    if (!t_fd_taken)
        close(fd);
    if (cond.bad()) {
        if (cond != DUL_NETWORKCLOSED)
            log_warn("dicom: receiving association request: %s", cond.text());
        if (as) {
            ASC_dropAssociation(as);
            ASC_destroyAssociation(&as);
        }
        return NULL;
    }
    return as;
}

/* Splits "A, B C" into the set {A, B, C} of AE titles. */
static std::set<std::string> parse_ae_list(const char *text)
{
    std::set<std::string> out;
    std::string cur;
    for (const char *p = text ? text : "";; p++) {
        if (*p == ',' || *p == ' ' || *p == '\t' || *p == '\0') {
            if (!cur.empty())
                out.insert(cur);
            cur.clear();
            if (*p == '\0')
                break;
        } else {
            cur += *p;
        }
    }
    return out;
}

static void serve_socket(dicom_server *srv, T_ASC_Network *net, int fd, int slot)
{
    Assoc a;
    a.srv = srv;
    a.as = receive_rq(srv, net, fd, slot);
    if (a.as == NULL)
        return;
    ASC_getAPTitles(a.as->params, a.calling, sizeof(a.calling), a.called, sizeof(a.called), NULL,
                    0);
    OFStandard::strlcpy(a.host, a.as->params->DULparams.callingPresentationAddress, sizeof(a.host));
    a.peer.calling_ae = a.calling;
    a.peer.called_ae = a.called;
    a.peer.peer_host = a.host;
    if (srv->cfg.require_called_ae && srv->ae_title != trim_value(OFString(a.called))) {
        log_warn("dicom: association from %s (%s) to unknown AE '%s' rejected", a.calling, a.host,
                 a.called);
        T_ASC_RejectParameters rej = {ASC_RESULT_REJECTEDPERMANENT, ASC_SOURCE_SERVICEUSER,
                                      ASC_REASON_SU_CALLEDAETITLENOTRECOGNIZED};
        ASC_rejectAssociation(a.as, &rej);
    } else if (!srv->allowed_callers.empty() &&
               srv->allowed_callers.count(trim_value(OFString(a.calling)).c_str()) == 0 &&
               !(ASC_countPresentationContexts(a.as->params) == 0 && a.calling[0] == 0)) {
        log_warn("dicom: association from calling AE '%s' (%s) rejected: not in allowed_callers",
                 a.calling, a.host);
        T_ASC_RejectParameters rej = {ASC_RESULT_REJECTEDPERMANENT, ASC_SOURCE_SERVICEUSER,
                                      ASC_REASON_SU_CALLINGAETITLENOTRECOGNIZED};
        ASC_rejectAssociation(a.as, &rej);
    } else if (ASC_countPresentationContexts(a.as->params) == 0 && a.calling[0] == 0) {
        /* DCMTK reports a peer that closed before sending anything as an
         * empty request */
        log_debug("dicom: connection from %s closed before A-ASSOCIATE-RQ", a.host);
    } else {
        OFCondition cond = negotiate(a.as);
        if (cond.good())
            cond = ASC_acknowledgeAssociation(a.as);
        if (cond.good()) {
            log_debug("dicom: association from %s (%s) to %s", a.calling, a.host, a.called);
            serve_association(a);
        } else {
            log_warn("dicom: negotiating with %s (%s): %s", a.calling, a.host, cond.text());
        }
    }
    ASC_dropSCPAssociation(a.as);
    ASC_destroyAssociation(&a.as);
}

static void worker_main(dicom_server *srv, size_t slot)
{
    for (;;) {
        int fd;
        {
            std::unique_lock<std::mutex> lk(srv->mu);
            srv->cv.wait(lk, [srv] { return srv->stopping.load() || !srv->queue.empty(); });
            if (srv->stopping.load())
                return;
            fd = srv->queue.front();
            srv->queue.pop_front();
        }
        try {
            serve_socket(srv, srv->nets[slot], fd, (int)slot);
        } catch (const std::exception &e) {
            ext_release();
            log_error("dicom: worker caught exception: %s", e.what());
        } catch (...) {
            ext_release();
            log_error("dicom: worker caught unknown exception");
        }
    }
}

/* Answers connections beyond the queue with A-ASSOCIATE-RJ (transient, local
 * limit exceeded), one at a time. */
static void rejecter_main(dicom_server *srv)
{
    for (;;) {
        int fd;
        {
            std::unique_lock<std::mutex> lk(srv->mu);
            srv->cv.wait(lk, [srv] { return srv->stopping.load() || !srv->reject_queue.empty(); });
            if (srv->stopping.load())
                return;
            fd = srv->reject_queue.front();
            srv->reject_queue.pop_front();
        }
        try {
            T_ASC_Association *as = receive_rq(srv, srv->nets.back(), fd, -1);
            if (as) {
                T_ASC_RejectParameters rej = {ASC_RESULT_REJECTEDTRANSIENT,
                                              ASC_SOURCE_SERVICEPROVIDER_PRESENTATION_RELATED,
                                              ASC_REASON_SP_PRES_LOCALLIMITEXCEEDED};
                ASC_rejectAssociation(as, &rej);
                ASC_dropAssociation(as);
                ASC_destroyAssociation(&as);
                log_warn("dicom: association rejected, %d workers busy and queue full",
                         srv->cfg.workers);
            }
        } catch (...) {
            ext_release();
            log_error("dicom: rejecter caught exception");
        }
    }
}

static void acceptor_main(dicom_server *srv)
{
    while (!srv->stopping.load()) {
        struct pollfd pfd[2] = {{srv->listen_fd, POLLIN, 0}, {srv->wake[0], POLLIN, 0}};
        int n = poll(pfd, 2, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            log_error("dicom: poll on listening socket: %s", strerror(errno));
            return;
        }
        if (pfd[1].revents)
            return;
        if (!(pfd[0].revents & POLLIN))
            continue;
        int fd = accept4(srv->listen_fd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno != EINTR && errno != EAGAIN && errno != ECONNABORTED)
                log_warn("dicom: accept: %s", strerror(errno));
            if (errno == EMFILE || errno == ENFILE)
                usleep(100 * 1000);
            continue;
        }
        if (fd == 0) { /* DCMTK treats socket 0 as "none" */
            int d = fcntl(fd, F_DUPFD_CLOEXEC, 1);
            close(fd);
            if (d < 0)
                continue;
            fd = d;
        }
        set_nodelay(fd);
        std::lock_guard<std::mutex> lk(srv->mu);
        if (srv->queue.size() < (size_t)srv->cfg.queue) {
            srv->queue.push_back(fd);
        } else if (srv->reject_queue.size() < 16) {
            srv->reject_queue.push_back(fd);
        } else {
            close(fd);
            log_warn("dicom: connection dropped, queue and reject queue full");
            continue;
        }
        srv->cv.notify_all();
    }
}

/* ---- server life cycle ------------------------------------------------------------- */

extern "C" void dicom_config_defaults(dicom_config_t *cfg)
{
    memset(cfg, 0, sizeof(*cfg));
    cfg->port = 0;
    cfg->max_pdu = 116794;
    cfg->acse_timeout_s = 10;
    cfg->dimse_timeout_s = 60;
    cfg->workers = 16;
    cfg->queue = 64;
    cfg->require_called_ae = false;
}

static void server_free(dicom_server *srv)
{
    for (T_ASC_Network *&n : srv->nets)
        if (n)
            ASC_dropNetwork(&n);
    for (int fd : srv->queue)
        close(fd);
    for (int fd : srv->reject_queue)
        close(fd);
    if (srv->listen_fd >= 0)
        close(srv->listen_fd);
    for (int i = 0; i < 2; i++)
        if (srv->wake[i] >= 0)
            close(srv->wake[i]);
    delete srv;
}

static int open_listener(dicom_server *srv, std::string &why)
{
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)srv->cfg.port);
    const char *bind_addr = srv->bind_address.empty() ? "0.0.0.0" : srv->bind_address.c_str();
    if (inet_pton(AF_INET, bind_addr, &sa.sin_addr) != 1) {
        why = std::string("invalid bind address ") + bind_addr;
        return SP_EINVAL;
    }
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        why = strerror(errno);
        return -errno;
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    set_nodelay(fd); /* inherited by accepted sockets on Linux */
    if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0 || listen(fd, 128) != 0) {
        int e = errno;
        why = std::string("cannot listen on ") + bind_addr + ":" + std::to_string(srv->cfg.port) +
              ": " + strerror(e);
        close(fd);
        return -e;
    }
    socklen_t sl = sizeof(sa);
    getsockname(fd, (struct sockaddr *)&sa, &sl);
    srv->listen_fd = fd;
    srv->port = ntohs(sa.sin_port);
    return 0;
}

extern "C" int dicom_server_start(const dicom_config_t *cfg, const dicom_handlers_t *handlers,
                                  dicom_server_t **out, char *err, size_t errlen)
{
    dicom_server *srv = NULL;
    try {
        *out = NULL;
        dcmtk_init_once();
        if (!g_dict_ok) {
            sp_fmt(err, errlen, "DICOM data dictionary not loaded (check DCMDICTPATH)");
            return SP_ECONFIG;
        }
        if (cfg->ae_title == NULL || cfg->ae_title[0] == 0 || strlen(cfg->ae_title) > 16) {
            sp_fmt(err, errlen, "AE title must be 1-16 characters");
            return SP_EINVAL;
        }
        srv = new dicom_server;
        srv->cfg = *cfg;
        srv->ae_title = cfg->ae_title;
        srv->bind_address = cfg->bind_address ? cfg->bind_address : "";
        srv->allowed_callers = parse_ae_list(cfg->allowed_callers);
        srv->cfg.ae_title = NULL;
        srv->cfg.bind_address = NULL;
        srv->cfg.allowed_callers = NULL;
        if (srv->cfg.max_pdu <= 0)
            srv->cfg.max_pdu = 116794;
        if (srv->cfg.max_pdu < ASC_MINIMUMPDUSIZE)
            srv->cfg.max_pdu = ASC_MINIMUMPDUSIZE;
        if (srv->cfg.max_pdu > ASC_MAXIMUMPDUSIZE)
            srv->cfg.max_pdu = ASC_MAXIMUMPDUSIZE;
        if (srv->cfg.acse_timeout_s <= 0)
            srv->cfg.acse_timeout_s = 10;
        if (srv->cfg.dimse_timeout_s <= 0)
            srv->cfg.dimse_timeout_s = 60;
        if (srv->cfg.workers <= 0)
            srv->cfg.workers = 16;
        if (srv->cfg.queue <= 0)
            srv->cfg.queue = 64;
        srv->h = *handlers;
        std::string why;
        int rc = open_listener(srv, why);
        if (rc != 0) {
            sp_fmt(err, errlen, "%s", why.c_str());
            server_free(srv);
            return rc;
        }
        if (pipe2(srv->wake, O_CLOEXEC) != 0) {
            rc = -errno;
            sp_fmt(err, errlen, "pipe: %s", strerror(errno));
            server_free(srv);
            return rc;
        }
        for (int i = 0; i <= srv->cfg.workers; i++) {
            T_ASC_Network *net = NULL;
            OFCondition cond =
                make_network(NET_ACCEPTOR, srv->cfg.acse_timeout_s, srv->listen_fd, &net);
            if (cond.bad()) {
                sp_fmt(err, errlen, "cannot initialise DCMTK network: %s", cond.text());
                server_free(srv);
                return SP_EUNAVAIL;
            }
            srv->nets.push_back(net);
        }
        srv->negotiating.assign((size_t)srv->cfg.workers, -1);
        for (int i = 0; i < srv->cfg.workers; i++)
            srv->workers.emplace_back(worker_main, srv, (size_t)i);
        srv->rejecter = std::thread(rejecter_main, srv);
        srv->acceptor = std::thread(acceptor_main, srv);
        log_info("dicom: %s listening on %s:%d (%d workers, queue %d)", srv->ae_title.c_str(),
                 srv->bind_address.empty() ? "0.0.0.0" : srv->bind_address.c_str(), srv->port,
                 srv->cfg.workers, srv->cfg.queue);
        *out = srv;
        return 0;
    } catch (const std::exception &e) {
        sp_fmt(err, errlen, "exception: %s", e.what());
    } catch (...) {
        sp_fmt(err, errlen, "unknown exception");
    }
    /* Threads are started last; if starting one threw, stop the ones that run. */
    if (srv && (srv->acceptor.joinable() || !srv->workers.empty() || srv->rejecter.joinable())) {
        dicom_server_t *tmp = srv;
        dicom_server_stop(&tmp);
    } else if (srv) {
        server_free(srv);
    }
    return SP_EINVAL;
}

extern "C" int dicom_server_port(const dicom_server_t *srv)
{
    return srv ? srv->port : -1;
}

extern "C" void dicom_server_stop(dicom_server_t **srvp)
{
    if (srvp == NULL || *srvp == NULL)
        return;
    dicom_server *srv = *srvp;
    *srvp = NULL;
    try {
        srv->stopping.store(true);
        char c = 1;
        if (write(srv->wake[1], &c, 1) < 0)
            log_warn("dicom: waking the accept thread: %s", strerror(errno));
        {
            std::lock_guard<std::mutex> lk(srv->mu);
            /* unblock workers still reading an A-ASSOCIATE-RQ */
            for (int fd : srv->negotiating)
                if (fd >= 0)
                    shutdown(fd, SHUT_RDWR);
            srv->cv.notify_all();
        }
        if (srv->acceptor.joinable())
            srv->acceptor.join();
        for (std::thread &t : srv->workers)
            t.join();
        if (srv->rejecter.joinable())
            srv->rejecter.join();
        server_free(srv);
    } catch (...) {
        log_error("dicom: exception while stopping the server");
    }
}
