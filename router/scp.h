/* scp.h - the router's DICOM service handlers: C-STORE with quorum
 * replication, C-FIND over the cluster, C-MOVE and C-GET from any replica,
 * each behind the access rules (access.h) and audited (audit.h).
 * They are plugged into the adapter (dicom.h) and run on its worker threads,
 * concurrently; scp_t is read-only after start-up. */
#ifndef SP_SCP_H
#define SP_SCP_H

#include "access.h"
#include "backend.h"
#include "dicom.h"

#include <stddef.h>
#include <stdint.h>

/* PS3.7 C.4 general status "Duplicate SOP Instance": the SOP Instance UID is
 * already stored with different content (the new copy is kept aside as a
 * conflict on the nodes, never overwriting the original). */
#define SCP_STATUS_DUPLICATE_SOP 0x0111

/* One C-MOVE destination of the AE table. */
typedef struct {
    char ae_title[17];
    char *host;
    int port;
} scp_destination_t;

typedef struct {
    backend_t *backend;
    const char *ae_title;
    const scp_destination_t *dests;
    size_t ndests;
    size_t max_results;     /* C-FIND cap */
    access_rules_t *access; /* access rules; NULL admits everyone to everything */
} scp_t;

/* The archive's policy for a received C-STORE, before anything is stored:
 * the data set must carry a SOP Instance UID equal to the command's, a
 * Study and a Series Instance UID, and (when it has one) the command's SOP
 * Class UID. Returns DICOM_SUCCESS, or the failure status (0xC000 for a
 * missing UID, 0xA900 for a mismatch) with the reason in comment. Pure: no
 * logging, no backend, so the adapter's test harness applies it too. */
uint16_t scp_check_store(const dicom_store_t *req, char *comment, size_t comment_len);

/* Association and C-ECHO hooks (dicom_handlers_t): access rules and the
 * audit trail. A peer whose first matching rule allows nothing is not
 * admitted; a C-ECHO its rule does not allow answers 0x0124. */
bool scp_admit(void *ctx, const dicom_peer_t *peer, char *why, size_t why_len);
void scp_associated(void *ctx, const dicom_peer_t *peer, bool accepted, const char *why);
uint16_t scp_echo(void *ctx, const dicom_peer_t *peer);

/* The service handlers. Each checks the access rules first (0x0124 Refused:
 * Not Authorized; a C-MOVE destination the rule does not list: 0xA801) and
 * writes one audit record with its outcome; a C-STORE answers only once its
 * record is written (audit.h, Durability). */
uint16_t scp_store(void *ctx, const dicom_store_t *req, char *comment, size_t comment_len);
uint16_t scp_find(void *ctx, dicom_find_t *q, char *comment, size_t comment_len);
uint16_t scp_move(void *ctx, dicom_retrieve_t *r, char *comment, size_t comment_len);
uint16_t scp_get(void *ctx, dicom_retrieve_t *r, char *comment, size_t comment_len);

#endif
