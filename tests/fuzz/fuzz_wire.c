/* fuzz_wire.c - libFuzzer target for the cluster message decoder.
 *
 * Every input goes through wire_decode_request() and wire_decode_reply():
 * each must decode or be refused with a reason (SP_EPROTO, or SP_EUNKNOWN
 * for a request of no known kind), never crash or leak. A message that decodes is encoded again,
 * and that encoding must decode: the decoder accepts only what the encoder can say. */
#include "wire.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char err[256];
    wire_request_t req;
    int rc = wire_decode_request(data, size, &req, err, sizeof err);
    if (rc == 0) {
        uint8_t *buf = NULL;
        size_t len = 0;
        if (wire_encode_request(&req, &buf, &len) != 0) {
            abort();
        }
        wire_request_t again;
        if (wire_decode_request(buf, len, &again, err, sizeof err) != 0) {
            fprintf(stderr, "re-encoded request refused: %s\n", err);
            abort();
        }
        wire_request_free(&again);
        free(buf);
        wire_request_free(&req);
    } else if ((rc != SP_EPROTO && rc != SP_EUNKNOWN) || err[0] == '\0') {
        abort();
    }

    wire_reply_t rep;
    rc = wire_decode_reply(data, size, &rep, err, sizeof err);
    if (rc == 0) {
        uint8_t *buf = NULL;
        size_t len = 0;
        if (wire_encode_reply(&rep, &buf, &len) != 0) {
            abort();
        }
        wire_reply_t again;
        if (wire_decode_reply(buf, len, &again, err, sizeof err) != 0) {
            fprintf(stderr, "re-encoded reply refused: %s\n", err);
            abort();
        }
        wire_reply_free(&again);
        free(buf);
        wire_reply_free(&rep);
    } else if (rc != SP_EPROTO || err[0] == '\0') {
        abort();
    }
    return 0;
}
