/* dicom_int.h - what the two halves of the DCMTK adapter share, and nothing
 * else may include: dicom_server.cc (listening socket, worker pool,
 * negotiation, the DIMSE receive loop) and dicom_services.cc (C-STORE,
 * C-FIND, C-MOVE and C-GET, data set parsing). Like sqliteInt.h, it holds the
 * server's state and the few functions one half calls in the other; every
 * other helper stays local to its file (static or an anonymous namespace).
 *
 * Threads: a dicom_server is shared by all its threads (fields below say
 * which are read-only after start-up); an Assoc belongs to the one worker
 * thread serving it. */
#ifndef SP_DICOM_INT_H
#define SP_DICOM_INT_H

#include <dcmtk/config/osconfig.h>

#include <dcmtk/dcmnet/assoc.h>
#include <dcmtk/dcmnet/dimse.h>

extern "C" {
#include "dicom.h"
#include "gate.h"
}

#include <atomic>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

/* One listening DICOM server (the opaque dicom_server_t of dicom.h). The
 * strings, cfg and h are read-only once dicom_server_start() returns; the
 * queues are guarded by mu. Connections reach the queues only from the gate
 * (router/gate.c), with a whole request buffered. */
struct dicom_server {
    std::string ae_title, bind_address;
    std::set<std::string> allowed_callers; /* empty: any calling AE title */
    dicom_config_t cfg;                    /* with its strings set to NULL */
    dicom_handlers_t h;
    int listen_fd = -1;
    int port = 0;
    gate_t *gate = nullptr; /* holds every connection no worker is serving */
    std::atomic<bool> stopping{false};
    std::mutex mu;
    std::condition_variable cv;
    std::deque<gate_conn_t *> queue;        /* requests waiting for a worker */
    std::deque<gate_conn_t *> reject_queue; /* new associations to answer A-ASSOCIATE-RJ */
    std::vector<T_ASC_Network *> nets;      /* one per worker, then one for the rejecter */
    std::thread rejecter;
    std::vector<std::thread> workers;
    std::shared_ptr<struct RxBudget> rx_budget; /* receive_memory (dicom_services.cc) */
};

/* receive_memory: the bytes every receive buffer of one server holds, from
 * its first byte until it is freed. Shared with the buffers, because a
 * buffer the store handler took over may be freed after the server stopped
 * (the cluster transport lets go of it when ZeroMQ drops its last frame). */
struct RxBudget {
    std::mutex mu;
    std::condition_variable cv;
    size_t limit = 0;
    size_t used = 0;      /* reserved by receives and by buffers handed on */
    size_t receiving = 0; /* receives holding a reservation */
    size_t stalled = 0;   /* of those, the ones waiting for more */
    size_t handed_on = 0; /* bytes of buffers a store handler took: freed in time */
};

class GateConnection;

/* One association, owned by the worker thread serving it, or by the gate
 * while it is parked between two messages. */
struct Assoc {
    dicom_server *srv = nullptr;
    T_ASC_Association *as = nullptr;
    gate_conn_t *conn = nullptr;    /* its socket and read-ahead */
    GateConnection *link = nullptr; /* DCMTK's view of conn (owned by as) */
    char calling[DIC_AE_LEN + 1] = {0};
    char called[DIC_AE_LEN + 1] = {0};
    char host[128] = {0};
    dicom_peer_t peer = {nullptr, nullptr, nullptr, nullptr};
    DIC_US next_msg_id = 1; /* for the C-STORE sub-operations of C-GET */
    bool lost = false;      /* association failed: abort instead of responding */
};

/* Removes DICOM padding (trailing spaces and NULs). Both halves read AE
 * titles and values padded this way. */
inline std::string dicom_trim(const OFString &s)
{
    size_t n = s.length();
    while (n > 0 && (s[n - 1] == ' ' || s[n - 1] == '\0'))
        n--;
    return std::string(s.c_str(), n);
}

/* dicom_server.cc: creates an acceptor network without a listening socket
 * of its own (dummy_fd stands in for it while DCMTK initialises), or a
 * requestor network (dummy_fd -1); either way every connection it makes has
 * Nagle off. The caller drops it with ASC_dropNetwork(). */
OFCondition dicom_server_network(T_ASC_NetworkRole role, int timeout_s, int dummy_fd,
                                 T_ASC_Network **net);

/* dicom_server.cc: the request (command and data set) has been received
 * whole; from now on reads wait at most dimse_timeout each (C-CANCEL polls,
 * C-STORE-RSP of C-GET sub-operations) instead of the request's deadline. */
void dicom_server_request_received(Assoc &a);

/* dicom_services.cc: serve one request whose command the receive loop has
 * read (the data set, if any, is still on the wire). Each returns false when
 * the association must be aborted (receive or send failed), true otherwise;
 * failures they decide themselves they log, those a handler decides the
 * handler logs. They may throw; the worker catches. */
bool dicom_services_store(Assoc &a, T_ASC_PresentationContextID pres, T_DIMSE_C_StoreRQ &rq);
bool dicom_services_find(Assoc &a, T_ASC_PresentationContextID pres, T_DIMSE_C_FindRQ &rq);
bool dicom_services_retrieve(Assoc &a, T_ASC_PresentationContextID pres, T_DIMSE_Message &msg);

#endif
