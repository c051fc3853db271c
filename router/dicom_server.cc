/* dicom_server.cc - the association server behind router/dicom.h, built on
 * DCMTK 3.6.7 (dcmnet): the listening socket, the accept thread, the worker
 * pool and its queue, negotiation (presentation contexts, A-ASSOCIATE-RJ) and
 * the DIMSE receive loop that hands each command to dicom_services.cc. With
 * dicom_services.cc it is the only code of ShardPACS that sees C++ or DCMTK;
 * every entry point catches all exceptions and turns them into an error code.
 *
 * Threads: dicom_server_start() creates one accept thread, `workers` worker
 * threads and one reject thread. The accept thread only accept()s TCP
 * connections and queues the sockets; a worker then lets DCMTK read the
 * A-ASSOCIATE-RQ from the already accepted socket (dcmExternalSocketHandle,
 * see receive_rq()), negotiates and serves DIMSE requests on it, calling the
 * handlers on its own thread. When the queue is full the accept thread passes
 * the socket to the reject thread, which answers A-ASSOCIATE-RJ (transient,
 * local limit exceeded). Nagle is switched off on the listening socket (Linux
 * sockets inherit it) and again in our DcmTransportLayer for every connection
 * DCMTK makes, accepted or outgoing (C-MOVE sub-associations), so nothing
 * depends on the TCP_NODELAY environment variable.
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
#include <dcmtk/oflog/oflog.h>

extern "C" {
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

namespace
{
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
} // namespace

/* Creates an acceptor network that has no listening socket of its own (our
 * accept thread owns the listening socket), or a requestor network. */
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
        case DIMSE_C_STORE_RQ: ok = dicom_services_store(a, pres, msg.msg.CStoreRQ); break;
        case DIMSE_C_FIND_RQ: ok = dicom_services_find(a, pres, msg.msg.CFindRQ); break;
        case DIMSE_C_MOVE_RQ:
        case DIMSE_C_GET_RQ: ok = dicom_services_retrieve(a, pres, msg); break;
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
    if (srv->cfg.require_called_ae && srv->ae_title != dicom_trim(OFString(a.called))) {
        log_warn("dicom: association from %s (%s) to unknown AE '%s' rejected", a.calling, a.host,
                 a.called);
        T_ASC_RejectParameters rej = {ASC_RESULT_REJECTEDPERMANENT, ASC_SOURCE_SERVICEUSER,
                                      ASC_REASON_SU_CALLEDAETITLENOTRECOGNIZED};
        ASC_rejectAssociation(a.as, &rej);
    } else if (!srv->allowed_callers.empty() &&
               srv->allowed_callers.count(dicom_trim(OFString(a.calling)).c_str()) == 0 &&
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
                dicom_server_network(NET_ACCEPTOR, srv->cfg.acse_timeout_s, srv->listen_fd, &net);
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
