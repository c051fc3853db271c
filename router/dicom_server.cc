/* dicom_server.cc - the association server behind router/dicom.h, built on
 * DCMTK 3.6.7 (dcmnet): the listening socket, the accept thread, the worker
 * pool and its queue, negotiation (presentation contexts, A-ASSOCIATE-RJ) and
 * the DIMSE receive loop that hands each command to dicom_services.cc. With
 * dicom_services.cc it is the only code of ShardPACS that sees C++ or DCMTK;
 * every entry point catches all exceptions and turns them into an error code.
 *
 * Threads: dicom_server_start() creates the gate (router/gate.c: one event
 * loop thread that accepts, and holds every connection no worker serves),
 * `workers` worker threads and one reject thread. The gate queues a
 * connection only once a whole request is buffered: a new connection's
 * A-ASSOCIATE-RQ, or a parked association's next DIMSE message (or its
 * first MiB), release or abort. A worker then lets DCMTK read it through
 * GateConnection (the read-ahead first, then the socket, always under one
 * deadline for the whole request: DCMTK's own timeouts restart on every
 * read), negotiates, answers A-ASSOCIATE-AC or -RJ, and serves messages
 * while whole ones are buffered; then it parks the association back to the
 * gate. So silent, trickling and idle peers hold no worker. When the queue
 * is full a new association goes to the reject thread, which answers
 * A-ASSOCIATE-RJ (transient, local limit exceeded) from the buffered
 * request. An ended association is dropped at once, never waiting for the
 * peer to close. Nagle is switched off on the listening socket (Linux
 * sockets inherit it) and again in our DcmTransportLayer for every
 * connection DCMTK makes, accepted or outgoing (C-MOVE sub-associations),
 * so nothing depends on the TCP_NODELAY environment variable.
 *
 * DICOM TLS: the TLS port is a second listening socket of the same gate, so
 * the limits count both ports together. The gate does the handshake and
 * decrypts (router/gate.c); GateConnection reads and writes through the
 * gate either way, so DCMTK sees a plain transparent connection. C-MOVE
 * sub-associations to TLS destinations use DCMTK's own TLS layer
 * (dicom_server_tls_network) with the same certificate, key and CA.
 *
 * Ownership: the server owns its sockets, threads and DCMTK networks. The
 * data dictionary and the decoders are process-wide DCMTK state, set up once
 * and never torn down. */
#include "dicom_int.h"

#include <dcmtk/dcmdata/dcdict.h>
#include <dcmtk/dcmdata/dcrledrg.h>
#include <dcmtk/dcmdata/dcuid.h>
#include <dcmtk/dcmdata/dcxfer.h>
#include <dcmtk/dcmjpeg/djdecode.h>
#include <dcmtk/dcmjpls/djdecode.h>
#include <dcmtk/dcmnet/dcmlayer.h>
#include <dcmtk/dcmnet/dcmtrans.h>
#include <dcmtk/dcmnet/dul.h>
#include <dcmtk/dcmnet/dulstruc.h>
#include <dcmtk/dcmtls/tlslayer.h>
#include <dcmtk/oflog/oflog.h>

extern "C" {
#include "../common/base.h"
#include "part10.h"
#include "tls.h"
#include "../common/log.h"
}

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <exception>

/* One-time process-wide DCMTK set-up: logging, no reverse DNS, the data
 * dictionary (g_dict_ok says whether it loaded) and the decoders that
 * C-MOVE/C-GET conversions need. */
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

/* ---- transport: handing accepted sockets to DCMTK ------------------------ */

/* dcmExternalSocketHandle is one process-wide value that DCMTK reads at the
 * start of ASC_receiveAssociation(): "use this accepted socket instead of
 * calling accept()". Workers set it under g_ext_mu, with the gate connection
 * in t_conn, and release the mutex as soon as DCMTK has taken the socket,
 * which is when it calls our createConnection() on the same thread. The
 * whole request is already buffered, so the lock is held only briefly.
 * Every DICOM acceptor in the process must go through this adapter. */
static std::mutex g_ext_mu;
static thread_local bool t_ext_locked = false;
static thread_local gate_conn_t *t_conn = nullptr;
static thread_local GateConnection *t_link = nullptr;

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

/* DCMTK's view of a gate connection: reads serve the gate's read-ahead
 * first, then the socket, and fail once the connection's deadline passed
 * (read() -1 with ETIMEDOUT, which DCMTK reports as the network closed), so
 * no per-read timeout of DCMTK's can be stretched by a trickling peer. In
 * per-read mode (a request's handler running) each read waits at most
 * per_read_ms instead. The gate owns and closes the socket. */
class GateConnection : public DcmTransportConnection
{
  public:
    GateConnection(gate_conn_t *c) : DcmTransportConnection(gate_conn_fd(c)), conn(c) {}
    int per_read_ms = 0; /* 0: the gate connection's deadline applies */

    OFCondition serverSideHandshake() override { return EC_Normal; }
    OFCondition clientSideHandshake() override { return EC_Normal; }
    OFCondition renegotiate(const char *) override { return EC_Normal; }
    ssize_t read(void *buf, size_t nbyte) override
    {
        if (per_read_ms > 0)
            gate_conn_set_deadline(conn, sp_now_ms(), per_read_ms, 0);
        ssize_t r = gate_conn_read(conn, buf, nbyte);
        return r >= 0 ? r : fail(r);
    }
    ssize_t write(void *buf, size_t nbyte) override
    {
        ssize_t r = gate_conn_write(conn, buf, nbyte);
        return r >= 0 ? r : fail(r);
    }
    void close() override { closeTransportConnection(); }
    void closeTransportConnection() override { setSocket(OFstatic_cast(DcmNativeSocketType, -1)); }
    unsigned long getPeerCertificateLength() override { return 0; }
    unsigned long getPeerCertificate(void *, unsigned long) override { return 0; }
    OFBool networkDataAvailable(int timeout_s) override
    {
        if (per_read_ms > 0) /* the wait, then a read, each within its own bound */
            gate_conn_set_deadline(conn, sp_now_ms(),
                                   per_read_ms + (int64_t)(timeout_s > 0 ? timeout_s : 0) * 1000,
                                   0);
        return gate_conn_wait(conn, timeout_s > 0 ? timeout_s * 1000 : 0) ? OFTrue : OFFalse;
    }
    /* Bytes of a TLS connection may wait inside OpenSSL, where a select()
     * on the socket cannot see them. */
    OFBool isTransparentConnection() override { return gate_conn_is_tls(conn) ? OFFalse : OFTrue; }
    OFString &dumpConnectionParameters(OFString &str) override
    {
        str = gate_conn_is_tls(conn) ? "Transport connection: TLS through the gate"
                                     : "Transport connection: TCP through the gate";
        return str;
    }

  private:
    gate_conn_t *conn;

    /* DCMTK retries on EINTR; everything else ends the association. */
    static ssize_t fail(ssize_t code)
    {
        errno = code == SP_ETIMEOUT ? ETIMEDOUT : code < 0 && code > -4096 ? (int)-code : EIO;
        if (errno == EINTR || errno == EAGAIN)
            errno = EIO;
        return -1;
    }
};

namespace
{
/* Connections with Nagle off; an accepted one (t_conn set by the worker)
 * reads through its gate connection. Also releases g_ext_mu. */
class NodelayLayer : public DcmTransportLayer
{
  public:
    DcmTransportConnection *createConnection(DcmNativeSocketType sock, OFBool secure) override
    {
        ext_release();
        if (secure)
            return NULL;
        set_nodelay(sock);
        if (t_conn != nullptr && gate_conn_fd(t_conn) == sock) {
            t_link = new GateConnection(t_conn);
            t_conn = nullptr;
            return t_link;
        }
        return new DcmTCPConnection(sock);
    }
};
} // namespace

namespace
{
/* DCMTK's TLS layer for outgoing connections, with Nagle off. */
class NodelayTLSLayer : public DcmTLSTransportLayer
{
  public:
    NodelayTLSLayer() : DcmTLSTransportLayer(NET_REQUESTOR, NULL, OFTrue) {}
    DcmTransportConnection *createConnection(DcmNativeSocketType sock, OFBool secure) override
    {
        set_nodelay(sock);
        return DcmTLSTransportLayer::createConnection(sock, secure);
    }
};
} // namespace

OFCondition dicom_server_tls_network(dicom_server *srv, int timeout_s, T_ASC_Network **net,
                                     std::string &why)
{
    OFCondition cond = ASC_initializeNetwork(NET_REQUESTOR, 0, timeout_s, net);
    if (cond.bad()) {
        why = cond.text();
        return cond;
    }
    NodelayTLSLayer *layer = new NodelayTLSLayer();
    /* Read on every C-MOVE, so a renewed certificate or CA is used at once. */
    const char *step = "TLS profile";
    cond = layer->setTLSProfile(TSP_Profile_BCP195_ND);
    if (cond.good()) {
        step = srv->tls_certificate.c_str();
        cond = layer->setCertificateFile(srv->tls_certificate.c_str(), DCF_Filetype_PEM);
    }
    if (cond.good()) {
        step = srv->tls_key.c_str();
        cond = layer->setPrivateKeyFile(srv->tls_key.c_str(), DCF_Filetype_PEM);
    }
    if (cond.good() && !layer->checkPrivateKeyMatchesCertificate()) {
        step = "private key and certificate";
        cond = EC_IllegalCall;
    }
    if (cond.good() && !srv->tls_ca.empty()) {
        step = srv->tls_ca.c_str();
        cond = layer->addTrustedCertificateFile(srv->tls_ca.c_str(), DCF_Filetype_PEM);
    }
    if (cond.good()) {
        step = "cipher suites";
        cond = layer->activateCipherSuites();
    }
    if (cond.bad()) {
        why = std::string(step) + ": " + cond.text();
        delete layer;
        ASC_dropNetwork(net);
        return cond;
    }
    layer->setCertificateVerification(DCV_requireCertificate);
    cond = ASC_setTransportLayer(*net, layer, 1);
    if (cond.bad()) {
        why = cond.text();
        delete layer;
        ASC_dropNetwork(net);
    }
    return cond;
}

/* Creates an acceptor network that has no listening socket of its own (the
 * gate owns the listening socket), or a requestor network. */
OFCondition dicom_server_network(T_ASC_NetworkRole role, int timeout_s, int dummy_fd,
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

void dicom_server_request_received(Assoc &a)
{
    if (a.link)
        a.link->per_read_ms = a.srv->cfg.dimse_timeout_s * 1000;
}

/* Puts the next request of a under one deadline: dimse_timeout from now,
 * growing by the bytes received at min_rate. */
static void expect_request(Assoc &a)
{
    a.link->per_read_ms = 0;
    gate_conn_set_deadline(a.conn, sp_now_ms(), (int64_t)a.srv->cfg.dimse_timeout_s * 1000,
                           a.srv->cfg.min_rate);
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
    const char *services[] = {UID_VerificationSOPClass,
                              UID_FINDPatientRootQueryRetrieveInformationModel,
                              UID_FINDStudyRootQueryRetrieveInformationModel,
                              UID_MOVEPatientRootQueryRetrieveInformationModel,
                              UID_MOVEStudyRootQueryRetrieveInformationModel,
                              UID_GETPatientRootQueryRetrieveInformationModel,
                              UID_GETStudyRootQueryRetrieveInformationModel};
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

/* Ends an association without waiting for the peer: aborts it first when
 * abort is set (an A-ABORT, sent only if the socket takes it at once),
 * drops it, closes the socket and frees a. */
static void finish(Assoc *a, bool abort)
{
    if (a->as) {
        if (a->link)
            a->link->per_read_ms = 0;
        gate_conn_expire(a->conn);
        if (abort)
            ASC_abortAssociation(a->as);
        ASC_dropSCPAssociation(a->as, 0);
        ASC_destroyAssociation(&a->as);
    }
    gate_conn_close(&a->conn);
    delete a;
}

/* True when DCMTK holds bytes of the association it has read but not yet
 * handed out (PDVs of a PDU already read, or a PDU header): such an
 * association cannot be parked, as the gate would start mid-message. */
static bool dul_holds_input(T_ASC_Association *as)
{
    const PRIVATE_ASSOCIATIONKEY *k = (const PRIVATE_ASSOCIATIONKEY *)as->DULassociation;
    return k != NULL && (k->pdvIndex != -1 || k->inputPDU != NO_PDU);
}

/* How long a worker waits for the next whole message after answering one,
 * before it parks the association: long enough for a client that sends
 * its next request right after our response, short enough that a worker
 * is never held. */
static const int k_next_message_grace_ms = 10;

/* Serves DIMSE requests while whole ones are buffered: returns true when
 * the association was parked with the gate (a is then the gate's), false
 * when it ended (a is freed). fresh: the gate just handed it over with a
 * request buffered and its deadline running. */
static bool serve_association(Assoc *a, bool fresh)
{
    dicom_server *srv = a->srv;
    for (;;) {
        if (srv->stopping.load()) {
            finish(a, true);
            return false;
        }
        if (!fresh && !dul_holds_input(a->as)) {
            int rc = gate_conn_next_ready(a->conn, k_next_message_grace_ms);
            if (rc == 0) {
                a->link->per_read_ms = 0;
                gate_park(a->conn, a);
                return true;
            }
            if (rc < 0) {
                if (rc != SP_EUNAVAIL)
                    log_warn("dicom: association from %s (%s): %s, aborting", a->calling, a->host,
                             rc == SP_ETOOBIG ? "PDU over its size limit" : "invalid PDU");
                finish(a, true);
                return false;
            }
        }
        if (!fresh)
            expect_request(*a);
        fresh = false;
        T_DIMSE_Message msg;
        T_ASC_PresentationContextID pres = 0;
        OFCondition cond = DIMSE_receiveCommand(a->as, DIMSE_BLOCKING, srv->cfg.dimse_timeout_s,
                                                &pres, &msg, NULL);
        if (cond == DUL_PEERREQUESTEDRELEASE) {
            ASC_acknowledgeRelease(a->as);
            finish(a, false);
            return false;
        }
        if (cond == DUL_PEERABORTEDASSOCIATION || cond == DUL_NETWORKCLOSED) {
            if (cond == DUL_NETWORKCLOSED)
                log_debug("dicom: association from %s (%s) closed or too slow", a->calling,
                          a->host);
            finish(a, cond == DUL_NETWORKCLOSED);
            return false;
        }
        if (cond.bad()) {
            log_warn("dicom: receiving from %s (%s): %s", a->calling, a->host, cond.text());
            finish(a, true);
            return false;
        }
        bool ok = true;
        switch (msg.CommandField) {
        case DIMSE_C_ECHO_RQ:
            ok = DIMSE_sendEchoResponse(
                     a->as, pres, &msg.msg.CEchoRQ,
                     srv->h.echo ? srv->h.echo(srv->h.ctx, &a->peer) : STATUS_Success, NULL)
                     .good();
            break;
        case DIMSE_C_STORE_RQ: ok = dicom_services_store(*a, pres, msg.msg.CStoreRQ); break;
        case DIMSE_C_FIND_RQ: ok = dicom_services_find(*a, pres, msg.msg.CFindRQ); break;
        case DIMSE_C_MOVE_RQ:
        case DIMSE_C_GET_RQ: ok = dicom_services_retrieve(*a, pres, msg); break;
        case DIMSE_C_CANCEL_RQ: break; /* for a request already answered */
        default:
            log_warn("dicom: unsupported DIMSE command 0x%04X from %s", (unsigned)msg.CommandField,
                     a->calling);
            ok = false;
            break;
        }
        if (!ok) {
            finish(a, true);
            return false;
        }
    }
}

/* Lets DCMTK read the buffered A-ASSOCIATE-RQ of a new gate connection.
 * Returns the association with a->link set, or NULL (the request was not
 * acceptable to DCMTK; the connection is then still a's to close). */
static T_ASC_Association *receive_rq(dicom_server *srv, T_ASC_Network *net, Assoc *a)
{
    T_ASC_Association *as = NULL;
    g_ext_mu.lock();
    t_ext_locked = true;
    t_conn = a->conn;
    t_link = nullptr;
    dcmExternalSocketHandle.set(gate_conn_fd(a->conn));
    OFCondition cond = ASC_receiveAssociation(net, &as, srv->cfg.max_pdu, NULL, NULL, OFFalse,
                                              DUL_NOBLOCK, srv->cfg.acse_timeout_s);
    ext_release();
    t_conn = nullptr;
    a->link = t_link;
    t_link = nullptr;
    if (cond.bad() || a->link == nullptr) {
        log_info("dicom: association request from %s: %s", gate_conn_peer(a->conn), cond.text());
        if (as) {
            gate_conn_expire(a->conn);
            ASC_dropAssociation(as);
            ASC_destroyAssociation(&as);
        }
        return NULL;
    }
    return as;
}

/* Answers A-ASSOCIATE-RJ and ends the association. */
static void reject(Assoc *a, T_ASC_RejectParametersResult result,
                   T_ASC_RejectParametersSource source, T_ASC_RejectParametersReason reason)
{
    T_ASC_RejectParameters rej = {result, source, reason};
    OFCondition cond = ASC_rejectAssociation(a->as, &rej);
    if (cond.bad())
        log_debug("dicom: sending A-ASSOCIATE-RJ to %s: %s", a->host, cond.text());
    finish(a, false);
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

/* A new connection with its A-ASSOCIATE-RQ buffered: checks the AE titles,
 * asks the admit hook, negotiates and answers A-ASSOCIATE-AC (then serves
 * it) or -RJ; the associated hook hears which, and why. */
static void serve_new(dicom_server *srv, T_ASC_Network *net, gate_conn_t *c)
{
    Assoc *a = new Assoc;
    a->srv = srv;
    a->conn = c;
    a->as = receive_rq(srv, net, a);
    if (a->as == NULL) {
        finish(a, false);
        return;
    }
    ASC_getAPTitles(a->as->params, a->calling, sizeof(a->calling), a->called, sizeof(a->called),
                    NULL, 0);
    OFStandard::strlcpy(a->host, gate_conn_peer(c), sizeof(a->host));
    a->peer.calling_ae = a->calling;
    a->peer.called_ae = a->called;
    a->peer.peer_host = a->host;
    if (gate_conn_cert_subject(c) != NULL) {
        a->cert_subject = gate_conn_cert_subject(c);
        a->peer.cert_subject = a->cert_subject.c_str();
    }
    auto refuse = [srv, a](const char *why, T_ASC_RejectParametersReason reason) {
        log_warn("dicom: association from calling AE '%s' (%s) to '%s' rejected: %s", a->calling,
                 a->host, a->called, why);
        if (srv->h.associated)
            srv->h.associated(srv->h.ctx, &a->peer, false, why);
        reject(a, ASC_RESULT_REJECTEDPERMANENT, ASC_SOURCE_SERVICEUSER, reason);
    };
    if (srv->cfg.require_called_ae && srv->ae_title != dicom_trim(OFString(a->called))) {
        refuse("unknown called AE title", ASC_REASON_SU_CALLEDAETITLENOTRECOGNIZED);
        return;
    }
    if (!srv->allowed_callers.empty() &&
        srv->allowed_callers.count(dicom_trim(OFString(a->calling)).c_str()) == 0) {
        refuse("not in allowed_callers", ASC_REASON_SU_CALLINGAETITLENOTRECOGNIZED);
        return;
    }
    char why[256] = "";
    if (srv->h.admit && !srv->h.admit(srv->h.ctx, &a->peer, why, sizeof why)) {
        refuse(why[0] ? why : "refused by the access rules",
               ASC_REASON_SU_CALLINGAETITLENOTRECOGNIZED);
        return;
    }
    OFCondition cond = negotiate(a->as);
    if (cond.bad() || ASC_countAcceptedPresentationContexts(a->as->params) == 0) {
        /* DCMTK would answer nothing at all (the peer would wait for its
         * own timeout); say no. */
        refuse(cond.bad() ? cond.text() : "no presentation context accepted",
               ASC_REASON_SU_NOREASON);
        return;
    }
    cond = ASC_acknowledgeAssociation(a->as);
    if (cond.bad()) {
        log_warn("dicom: acknowledging association from %s (%s): %s", a->calling, a->host,
                 cond.text());
        if (srv->h.associated)
            srv->h.associated(srv->h.ctx, &a->peer, false, cond.text());
        finish(a, true);
        return;
    }
    log_debug("dicom: association from %s (%s) to %s", a->calling, a->host, a->called);
    if (srv->h.associated)
        srv->h.associated(srv->h.ctx, &a->peer, true, "accepted");
    serve_association(a, false);
}

/* One unit of work from the gate: a new association or a parked one's next
 * request. Exceptions end the association. */
static void serve_conn(dicom_server *srv, T_ASC_Network *net, gate_conn_t *c)
{
    Assoc *a = (Assoc *)gate_conn_assoc(c);
    try {
        if (a == NULL)
            serve_new(srv, net, c);
        else
            serve_association(a, true);
    } catch (const std::exception &e) {
        ext_release();
        log_error("dicom: worker caught exception: %s", e.what());
    } catch (...) {
        ext_release();
        log_error("dicom: worker caught unknown exception");
    }
}

static void worker_main(dicom_server *srv, size_t slot)
{
    for (;;) {
        gate_conn_t *c;
        {
            std::unique_lock<std::mutex> lk(srv->mu);
            srv->cv.wait(lk, [srv] { return srv->stopping.load() || !srv->queue.empty(); });
            if (srv->stopping.load())
                return;
            c = srv->queue.front();
            srv->queue.pop_front();
        }
        serve_conn(srv, srv->nets[slot], c);
    }
}

/* Answers new associations beyond the queue with A-ASSOCIATE-RJ (transient,
 * local limit exceeded), one at a time; their requests are buffered, so
 * this never waits for a peer. */
static void rejecter_main(dicom_server *srv)
{
    for (;;) {
        gate_conn_t *c;
        {
            std::unique_lock<std::mutex> lk(srv->mu);
            srv->cv.wait(lk, [srv] { return srv->stopping.load() || !srv->reject_queue.empty(); });
            if (srv->stopping.load())
                return;
            c = srv->reject_queue.front();
            srv->reject_queue.pop_front();
        }
        Assoc *a = new Assoc;
        a->srv = srv;
        a->conn = c;
        try {
            a->as = receive_rq(srv, srv->nets.back(), a);
            if (a->as) {
                OFStandard::strlcpy(a->host, gate_conn_peer(c), sizeof(a->host));
                log_warn("dicom: association from %s rejected, %d workers busy and queue full",
                         a->host, srv->cfg.workers);
                reject(a, ASC_RESULT_REJECTEDTRANSIENT,
                       ASC_SOURCE_SERVICEPROVIDER_PRESENTATION_RELATED,
                       ASC_REASON_SP_PRES_LOCALLIMITEXCEEDED);
            } else {
                finish(a, false);
            }
        } catch (...) {
            ext_release();
            log_error("dicom: rejecter caught exception");
        }
    }
}

/* Gate callback (loop thread): a whole request is buffered on c. New
 * associations beyond the queue go to the reject thread; a parked
 * association's request always gets a worker, as refusing it would abort
 * an association the peer uses correctly. */
static void on_ready(void *ctx, gate_conn_t *c)
{
    dicom_server *srv = (dicom_server *)ctx;
    std::lock_guard<std::mutex> lk(srv->mu);
    if (gate_conn_assoc(c) != NULL || srv->queue.size() < (size_t)srv->cfg.queue)
        srv->queue.push_back(c);
    else
        srv->reject_queue.push_back(c);
    srv->cv.notify_all();
}

/* Gate callback (loop thread, or the stopping thread): a parked association
 * idled or trickled past its deadline, closed, or sent garbage. Aborting
 * does not wait for the peer, so it is done right here. */
static void on_expired(void *ctx, gate_conn_t *c, int why)
{
    (void)ctx;
    Assoc *a = (Assoc *)gate_conn_assoc(c);
    SP_ASSERT(a != NULL);
    if (why == GATE_WHY_TIMEOUT)
        log_info("dicom: association from %s (%s) idle or too slow, aborting", a->calling, a->host);
    try {
        finish(a, why != GATE_WHY_CLOSED);
    } catch (...) {
        log_error("dicom: exception while aborting an association");
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
    cfg->max_per_address = 32;
    cfg->max_connections = 1024;
    cfg->min_rate = 32 * 1024;
    cfg->max_object_size = (size_t)1 << 30;
    cfg->max_identifier_size = (size_t)16 << 20;
    cfg->receive_memory = (size_t)2 << 30;
    cfg->receive_wait_s = 30;
    cfg->max_depth = 64;
    cfg->plain = true;
    cfg->tls = false;
    cfg->tls_port = 2762;
    cfg->tls_verify_peer = true;
}

/* Frees a server whose threads are not running (or never ran). Requests
 * still queued are ended here. */
static void server_free(dicom_server *srv)
{
    for (std::deque<gate_conn_t *> *q : {&srv->queue, &srv->reject_queue}) {
        for (gate_conn_t *c : *q) {
            Assoc *a = (Assoc *)gate_conn_assoc(c);
            if (a)
                finish(a, true);
            else
                gate_conn_close(&c);
        }
        q->clear();
    }
    gate_destroy(&srv->gate);
    for (T_ASC_Network *&n : srv->nets)
        if (n)
            ASC_dropNetwork(&n);
    if (srv->listen_fd >= 0)
        close(srv->listen_fd);
    if (srv->tls_listen_fd >= 0)
        close(srv->tls_listen_fd);
    tls_destroy(&srv->tls);
    delete srv;
}

/* Listens on the bind address at port (0: a free one): the socket in *fd
 * and the port bound in *bound. */
static int open_listener(dicom_server *srv, int port, int *fd_out, int *bound, std::string &why)
{
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
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
        why = std::string("cannot listen on ") + bind_addr + ":" + std::to_string(port) + ": " +
              strerror(e);
        close(fd);
        return -e;
    }
    socklen_t sl = sizeof(sa);
    getsockname(fd, (struct sockaddr *)&sa, &sl);
    *fd_out = fd;
    *bound = ntohs(sa.sin_port);
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
        srv->tls_certificate = cfg->tls_certificate ? cfg->tls_certificate : "";
        srv->tls_key = cfg->tls_key ? cfg->tls_key : "";
        srv->tls_ca = cfg->tls_ca ? cfg->tls_ca : "";
        srv->tls_ciphers = cfg->tls_ciphers ? cfg->tls_ciphers : "";
        for (size_t i = 0; i < cfg->ntls_destinations; i++)
            if (cfg->tls_destinations[i].host)
                srv->tls_destinations.insert(std::make_pair(
                    std::string(cfg->tls_destinations[i].host), cfg->tls_destinations[i].port));
        srv->cfg.tls_certificate = srv->cfg.tls_key = srv->cfg.tls_ca = NULL;
        srv->cfg.tls_ciphers = NULL;
        srv->cfg.tls_destinations = NULL;
        srv->cfg.ntls_destinations = 0;
        if (!srv->cfg.plain && !srv->cfg.tls) {
            sp_fmt(err, errlen, "neither the plain nor the TLS port is served");
            server_free(srv);
            return SP_ECONFIG;
        }
        if ((srv->cfg.tls || !srv->tls_destinations.empty()) &&
            (srv->tls_certificate.empty() || srv->tls_key.empty())) {
            sp_fmt(err, errlen, "DICOM TLS needs a certificate and a private key");
            server_free(srv);
            return SP_ECONFIG;
        }
        if (!srv->tls_destinations.empty() && srv->tls_ca.empty()) {
            sp_fmt(err, errlen, "C-MOVE destinations over TLS need a CA to verify them against");
            server_free(srv);
            return SP_ECONFIG;
        }
        if (srv->cfg.tls) {
            tls_config_t tc = {srv->tls_certificate.c_str(), srv->tls_key.c_str(),
                               srv->tls_ca.c_str(), srv->cfg.tls_verify_peer,
                               srv->tls_ciphers.c_str()};
            int trc = tls_new(&tc, &srv->tls, err, errlen);
            if (trc != 0) {
                server_free(srv);
                return trc;
            }
        }
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
        if (srv->cfg.max_per_address < 0)
            srv->cfg.max_per_address = 0;
        if (srv->cfg.max_connections <= 0)
            srv->cfg.max_connections = 1024;
        dicom_config_t d;
        dicom_config_defaults(&d);
        if (srv->cfg.max_object_size == 0)
            srv->cfg.max_object_size = d.max_object_size;
        if (srv->cfg.max_identifier_size == 0)
            srv->cfg.max_identifier_size = d.max_identifier_size;
        if (srv->cfg.receive_memory == 0)
            srv->cfg.receive_memory = d.receive_memory;
        if (srv->cfg.receive_wait_s <= 0)
            srv->cfg.receive_wait_s = d.receive_wait_s;
        if (srv->cfg.max_depth <= 0)
            srv->cfg.max_depth = d.max_depth;
        /* One receive may always fit: an identifier is cut to the budget. */
        if (srv->cfg.max_identifier_size > srv->cfg.receive_memory)
            srv->cfg.max_identifier_size = srv->cfg.receive_memory;
        if (srv->cfg.receive_memory < srv->cfg.max_object_size + PART10_HEADER_MAX) {
            sp_fmt(err, errlen,
                   "receive_memory (%zu bytes) is smaller than one object (max_object_size %zu "
                   "bytes and its Part-10 header)",
                   srv->cfg.receive_memory, srv->cfg.max_object_size);
            server_free(srv);
            return SP_ECONFIG;
        }
        srv->rx_budget = std::make_shared<RxBudget>();
        srv->rx_budget->limit = srv->cfg.receive_memory;
        srv->h = *handlers;
        std::string why;
        int rc = 0;
        if (srv->cfg.plain)
            rc = open_listener(srv, srv->cfg.port, &srv->listen_fd, &srv->port, why);
        if (rc == 0 && srv->cfg.tls)
            rc = open_listener(srv, srv->cfg.tls_port, &srv->tls_listen_fd, &srv->tls_port, why);
        if (rc != 0) {
            sp_fmt(err, errlen, "%s", why.c_str());
            server_free(srv);
            return rc;
        }
        /* DCMTK's acceptor networks want a socket to stand for their own
         * listening one; either of ours does. */
        int dummy_fd = srv->listen_fd >= 0 ? srv->listen_fd : srv->tls_listen_fd;
        for (int i = 0; i <= srv->cfg.workers; i++) {
            T_ASC_Network *net = NULL;
            OFCondition cond =
                dicom_server_network(NET_ACCEPTOR, srv->cfg.acse_timeout_s, dummy_fd, &net);
            if (cond.bad()) {
                sp_fmt(err, errlen, "cannot initialise DCMTK network: %s", cond.text());
                server_free(srv);
                return SP_EUNAVAIL;
            }
            srv->nets.push_back(net);
        }
        for (int i = 0; i < srv->cfg.workers; i++)
            srv->workers.emplace_back(worker_main, srv, (size_t)i);
        srv->rejecter = std::thread(rejecter_main, srv);
        gate_config_t gc;
        gate_config_defaults(&gc);
        gc.listen_fd = srv->listen_fd;
        gc.tls_listen_fd = srv->tls_listen_fd;
        gc.tls = srv->tls;
        gc.acse_timeout_ms = srv->cfg.acse_timeout_s * 1000;
        gc.dimse_timeout_ms = srv->cfg.dimse_timeout_s * 1000;
        gc.write_timeout_ms = srv->cfg.dimse_timeout_s * 1000;
        gc.min_rate = srv->cfg.min_rate;
        /* Peers must keep to the PDU size we advertise; a little slack for
         * the ones that count the header in. */
        gc.max_pdu = (size_t)srv->cfg.max_pdu + 1024;
        gc.max_per_address = srv->cfg.max_per_address;
        gc.max_connections = srv->cfg.max_connections;
        gc.ready = on_ready;
        gc.expired = on_expired;
        gc.ctx = srv;
        rc = gate_new(&gc, &srv->gate);
        if (rc != 0) {
            sp_fmt(err, errlen, "cannot start the gate: %s", sp_strerror(rc));
            dicom_server_t *tmp = srv;
            dicom_server_stop(&tmp);
            return rc;
        }
        std::string ports;
        if (srv->port >= 0)
            ports = std::to_string(srv->port);
        if (srv->tls_port >= 0)
            ports += (ports.empty() ? "" : ", ") + std::string("TLS ") +
                     std::to_string(srv->tls_port) +
                     (srv->cfg.tls_verify_peer ? " (client certificates required)"
                                               : " (no client certificates)");
        log_info("dicom: %s listening on %s port %s (%d workers, queue %d, %d connections, %d "
                 "per address)",
                 srv->ae_title.c_str(),
                 srv->bind_address.empty() ? "0.0.0.0" : srv->bind_address.c_str(), ports.c_str(),
                 srv->cfg.workers, srv->cfg.queue, srv->cfg.max_connections,
                 srv->cfg.max_per_address);
        *out = srv;
        return 0;
    } catch (const std::exception &e) {
        sp_fmt(err, errlen, "exception: %s", e.what());
    } catch (...) {
        sp_fmt(err, errlen, "unknown exception");
    }
    /* Threads are started last; if starting one threw, stop the ones that run. */
    if (srv && (!srv->workers.empty() || srv->rejecter.joinable())) {
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

extern "C" int dicom_server_tls_port(const dicom_server_t *srv)
{
    return srv ? srv->tls_port : -1;
}

extern "C" void dicom_server_stop(dicom_server_t **srvp)
{
    if (srvp == NULL || *srvp == NULL)
        return;
    dicom_server *srv = *srvp;
    *srvp = NULL;
    try {
        srv->stopping.store(true);
        /* No more requests from the gate; parked associations are aborted
         * (on_expired, on this thread) and the sockets of served ones shut
         * down, so their workers' reads fail at once. */
        gate_shutdown(srv->gate);
        {
            std::lock_guard<std::mutex> lk(srv->mu);
            srv->cv.notify_all();
        }
        for (std::thread &t : srv->workers)
            t.join();
        if (srv->rejecter.joinable())
            srv->rejecter.join();
        server_free(srv);
    } catch (...) {
        log_error("dicom: exception while stopping the server");
    }
}
