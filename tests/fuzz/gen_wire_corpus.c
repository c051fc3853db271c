/* gen_wire_corpus.c - writes the seed corpus of fuzz_wire: one file per
 * message, encoded with the real encoders so that the fuzzer starts from
 * messages the decoder accepts. Usage: gen_wire_corpus DIR. */
#include "wire.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#define STUDY "1.2.826.0.1.3680043.8.498.10"

static void save(const char *dir, const char *name, const uint8_t *buf, size_t len)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (f == NULL || fwrite(buf, 1, len, f) != len || fclose(f) != 0) {
        perror(path);
        exit(1);
    }
}

static void request(const char *dir, const char *name, const wire_request_t *r)
{
    uint8_t *buf;
    size_t len;
    if (wire_encode_request(r, &buf, &len) != 0) {
        exit(1);
    }
    save(dir, name, buf, len);
    free(buf);
}

static void reply(const char *dir, const char *name, const wire_reply_t *r)
{
    uint8_t *buf;
    size_t len;
    if (wire_encode_reply(r, &buf, &len) != 0) {
        exit(1);
    }
    save(dir, name, buf, len);
    free(buf);
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: gen_wire_corpus DIR\n");
        return 2;
    }
    const char *dir = argv[1];
    wire_request_t put = {.kind = WIRE_PUT, .partition = 4095};
    attrs_set(&put.attrs, ATTR_STUDY_INSTANCE_UID, STUDY);
    attrs_set(&put.attrs, ATTR_SERIES_INSTANCE_UID, STUDY ".1");
    attrs_set(&put.attrs, ATTR_SOP_INSTANCE_UID, STUDY ".1.1");
    attrs_set(&put.attrs, ATTR_PATIENT_NAME, "M\xc3\xbcller^Hans");
    attrs_set(&put.attrs, ATTR_STUDY_DATE, "20260101");
    request(dir, "req_put", &put);
    wire_request_free(&put);

    wire_request_t find = {.kind = WIRE_FIND, .level = LEVEL_STUDY, .limit = 100};
    attrs_set(&find.attrs, ATTR_PATIENT_NAME, "Doe*");
    attrs_set(&find.attrs, ATTR_STUDY_DATE, "20200101-20201231");
    request(dir, "req_find", &find);
    wire_request_free(&find);

    wire_request_t get = {.kind = WIRE_GET, .sop_uid = STUDY ".1.1"};
    request(dir, "req_get", &get);
    wire_request_t list = {.kind = WIRE_LIST, .study_uid = STUDY};
    request(dir, "req_list", &list);
    uint32_t parts[] = {0, 7, 4095};
    wire_request_t dig = {.kind = WIRE_PARTITION_DIGEST, .partitions = parts, .npartitions = 3};
    request(dir, "req_partition_digest", &dig);

    char pub[41], sec[41];
    if (zmq_curve_keypair(pub, sec) != 0) {
        return 1;
    }
    gossip_member_t m = {
        .role = GOSSIP_STORAGE, .weight = 1.0, .incarnation = 3, .state = GOSSIP_ALIVE};
    strcpy(m.id, "n1");
    strcpy(m.endpoint, "tcp://127.0.0.1:7401");
    strcpy(m.site, "default");
    memcpy(m.public_key, pub, 41);
    wire_request_t gsp = {.kind = WIRE_GOSSIP};
    gsp.gossip.kind = GOSSIP_SYNC_REQ;
    strcpy(gsp.gossip.from_id, "n1");
    strcpy(gsp.gossip.from_endpoint, "tcp://127.0.0.1:7401");
    strcpy(gsp.gossip.to_endpoint, "tcp://127.0.0.1:7402");
    gsp.gossip.updates = &m;
    gsp.gossip.n_updates = 1;
    request(dir, "req_gossip_sync", &gsp);

    wire_reply_t rfind = {.kind = WIRE_FIND, .truncated = true};
    attrs_t *a = wire_reply_add_match(&rfind);
    attrs_set(a, ATTR_STUDY_INSTANCE_UID, STUDY);
    attrs_set(a, ATTR_MODALITIES_IN_STUDY, "CT\\MR");
    reply(dir, "rep_find", &rfind);
    wire_reply_free(&rfind);

    wire_reply_t rlist = {.kind = WIRE_LIST};
    wire_instance_t *in = wire_reply_add_instance(&rlist);
    in->study_uid = strdup(STUDY);
    in->series_uid = strdup(STUDY ".1");
    in->sop_uid = strdup(STUDY ".1.1");
    in->sop_class_uid = strdup("1.2.840.10008.5.1.4.1.1.2");
    in->transfer_syntax_uid = strdup("1.2.840.10008.1.2.1");
    in->size = 1234;
    reply(dir, "rep_list", &rlist);
    wire_reply_free(&rlist);

    wire_reply_t rerr = {.kind = WIRE_NONE};
    wire_reply_error(&rerr, SP_ENOTFOUND, "no such instance");
    reply(dir, "rep_error", &rerr);
    wire_reply_free(&rerr);
    return 0;
}
