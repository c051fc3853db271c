/* bench_node.c - puts per second and MB/s into one real shardpacs-node over
 * the real CURVE transport, beside the disk's raw fdatasync rate measured in
 * the same run. Prints numbers; asserts nothing about speed.
 *
 *   bench_node [--node PATH] [--dir DIR] [--seconds S]
 *
 * Starts the node as a child process on a free port with fresh keys in a
 * temporary folder, runs 12 KB and 512 KB puts with 1 and 4 concurrent
 * clients (one thread and one transport client each), and reports bytes the
 * node process wrote to disk per byte stored (/proc/PID/io), which shows the
 * WAL + blob-file write amplification. */
#include "../../common/base.h"
#include "../../common/keys.h"
#include "../../common/transport.h"
#include "../../common/wire.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

typedef struct {
    const char *endpoint;
    const keys_pair_t *client;
    const char *server_pub;
    size_t object_size;
    int64_t end_ms;
    int thread_no;
    int run_no;
    uint64_t puts;
    uint64_t failures;
} worker_t;

static void die(const char *what, int rc)
{
    fprintf(stderr, "bench_node: %s: %s\n", what, sp_strerror(rc));
    exit(1);
}

/* Appends 4 KiB (or `size` bytes) and fdatasyncs, for `ms` milliseconds.
 * Returns operations per second. */
static double fdatasync_rate(const char *dir, size_t size, int ms)
{
    char path[PATH_MAX];
    sp_fmt(path, sizeof path, "%s/fdatasync.probe", dir);
    int fd = open(path, O_CREAT | O_TRUNC | O_WRONLY, 0600);
    if (fd < 0)
        die("open probe", -errno);
    uint8_t *buf = sp_calloc(1, size);
    int64_t start = sp_now_ms(), now = start;
    uint64_t ops = 0;
    while ((now = sp_now_ms()) - start < ms) {
        if (write(fd, buf, size) != (ssize_t)size || fdatasync(fd) != 0)
            die("probe write", -errno);
        ops++;
    }
    close(fd);
    unlink(path);
    free(buf);
    return (double)ops * 1000.0 / (double)(now - start);
}

static uint64_t proc_write_bytes(pid_t pid)
{
    char path[64], line[256];
    sp_fmt(path, sizeof path, "/proc/%d/io", (int)pid);
    FILE *f = fopen(path, "r");
    uint64_t v = 0;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "write_bytes: %lu", &v) == 1)
            break;
    if (f)
        fclose(f);
    return v;
}

static void *worker_main(void *arg)
{
    worker_t *w = arg;
    transport_config_t tc;
    transport_config_defaults(&tc);
    transport_client_t *c = transport_client_new(&tc, w->client, w->server_pub, w->endpoint);
    uint8_t *data = sp_malloc(w->object_size);
    for (size_t i = 0; i < w->object_size; i++)
        data[i] = (uint8_t)(i * 131 + (size_t)w->thread_no);
    char study[65], series[65], sop[65];
    sp_fmt(study, sizeof study, "1.2.826.0.1.3680043.8.498.%d.%d", w->run_no, w->thread_no);
    sp_fmt(series, sizeof series, "%s.1", study);
    while (sp_now_ms() < w->end_ms) {
        /* Distinct bytes per instance so every put is a real write. */
        memcpy(data, &w->puts, sizeof w->puts);
        wire_request_t req = {.kind = WIRE_PUT, .partition = (uint32_t)(w->thread_no * 7 + 1)};
        sp_fmt(sop, sizeof sop, "%s.%llu", series, (unsigned long long)w->puts + 1);
        attrs_set(&req.attrs, ATTR_STUDY_INSTANCE_UID, study);
        attrs_set(&req.attrs, ATTR_SERIES_INSTANCE_UID, series);
        attrs_set(&req.attrs, ATTR_SOP_INSTANCE_UID, sop);
        attrs_set(&req.attrs, ATTR_SOP_CLASS_UID, "1.2.840.10008.5.1.4.1.1.2");
        sp_digest(data, w->object_size, req.digest);
        uint8_t *head;
        size_t head_len;
        wire_encode_request(&req, &head, &head_len);
        transport_response_t r;
        int rc = transport_call(c, head, head_len, data, w->object_size, 0, &r);
        free(head);
        wire_request_free(&req);
        wire_reply_t rep;
        char err[128];
        if (rc == 0 && wire_decode_reply(r.head, r.head_len, &rep, err, sizeof err) == 0) {
            if (rep.status == 0 && rep.outcome == WIRE_STORED)
                w->puts++;
            else
                w->failures++;
            wire_reply_free(&rep);
        } else {
            w->failures++;
        }
        if (rc == 0)
            transport_response_free(&r);
    }
    free(data);
    transport_client_destroy(&c);
    return NULL;
}

/* Writes keys and a config, starts the node and waits for its ready file. */
static pid_t start_node(const char *node_bin, const char *dir, const keys_pair_t *client,
                        keys_pair_t *node_keys, char *endpoint, size_t endpoint_size)
{
    char path[PATH_MAX], ready[PATH_MAX];
    int rc = keys_generate(node_keys);
    if (rc == 0)
        rc = keys_write_pair(sp_fmt(path, sizeof path, "%s/node.key", dir), node_keys);
    if (rc != 0)
        die("node keys", rc);
    FILE *f = fopen(sp_fmt(path, sizeof path, "%s/cluster.keys", dir), "w");
    fprintf(f, "%s n1\n%s bench\n", node_keys->public_z85, client->public_z85);
    fclose(f);
    f = fopen(sp_fmt(path, sizeof path, "%s/node.conf", dir), "w");
    fprintf(f, "[node]\nid = n1\nlisten = tcp://127.0.0.1:*\ndata_dir = data\n"
               "[transport]\nworkers = 8\n[log]\nlevel = warn\n");
    fclose(f);
    sp_fmt(ready, sizeof ready, "%s/ready", dir);
    pid_t pid = fork();
    if (pid == 0) {
        execl(node_bin, node_bin, "--config", path, "--ready-file", ready, (char *)NULL);
        _exit(127);
    }
    for (int i = 0; i < 1000; i++) {
        f = fopen(ready, "r");
        if (f) {
            if (fgets(endpoint, (int)endpoint_size, f))
                endpoint[strcspn(endpoint, "\n")] = '\0';
            fclose(f);
            return pid;
        }
        if (waitpid(pid, NULL, WNOHANG) == pid)
            break;
        usleep(20000);
    }
    die("node did not start", SP_EUNAVAIL);
    return -1;
}

static void run_case(pid_t node_pid, const char *endpoint, const keys_pair_t *client,
                     const char *server_pub, size_t size, int clients, int seconds, int run_no,
                     double fsync_rate)
{
    worker_t w[16];
    pthread_t th[16];
    uint64_t written_before = proc_write_bytes(node_pid);
    int64_t start = sp_now_ms();
    for (int i = 0; i < clients; i++) {
        w[i] = (worker_t){.endpoint = endpoint,
                          .client = client,
                          .server_pub = server_pub,
                          .object_size = size,
                          .end_ms = start + seconds * 1000,
                          .thread_no = i,
                          .run_no = run_no};
        pthread_create(&th[i], NULL, worker_main, &w[i]);
    }
    uint64_t puts = 0, failures = 0;
    for (int i = 0; i < clients; i++) {
        pthread_join(th[i], NULL);
        puts += w[i].puts;
        failures += w[i].failures;
    }
    double secs = (double)(sp_now_ms() - start) / 1000.0;
    uint64_t written = proc_write_bytes(node_pid) - written_before;
    double rate = (double)puts / secs;
    printf("| %6zu KB | %d | %9.0f | %8.1f | %5.2f | %6.2f | %llu |\n", size / 1000, clients, rate,
           rate * (double)size / 1e6, rate / fsync_rate,
           puts ? (double)written / ((double)puts * (double)size) : 0.0,
           (unsigned long long)failures);
    fflush(stdout);
}

int main(int argc, char **argv)
{
    char self_dir[PATH_MAX], node_bin[PATH_MAX], dir[PATH_MAX] = "/tmp/bench_node.XXXXXX";
    ssize_t n = readlink("/proc/self/exe", self_dir, sizeof self_dir - 1);
    self_dir[n > 0 ? n : 0] = '\0';
    *strrchr(self_dir, '/') = '\0';
    sp_fmt(node_bin, sizeof node_bin, "%s/shardpacs-node", self_dir);
    int seconds = 5;
    const char *base = NULL;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--node") == 0)
            sp_strlcpy(node_bin, argv[i + 1], sizeof node_bin);
        else if (strcmp(argv[i], "--dir") == 0)
            base = argv[i + 1];
        else if (strcmp(argv[i], "--seconds") == 0)
            seconds = atoi(argv[i + 1]);
    }
    if (base)
        sp_fmt(dir, sizeof dir, "%s/bench_node.XXXXXX", base);
    if (mkdtemp(dir) == NULL)
        die("mkdtemp", -errno);

    keys_pair_t client, node_keys;
    if (keys_generate(&client) != 0)
        die("client keys", SP_EKEY);
    char endpoint[256];
    pid_t pid = start_node(node_bin, dir, &client, &node_keys, endpoint, sizeof endpoint);

    double sync4k = fdatasync_rate(dir, 4096, 2000);
    double sync512k = fdatasync_rate(dir, 512 * 1024, 2000);
    printf("raw disk in %s: 4 KiB append+fdatasync %.0f/s; 512 KiB append+fdatasync %.0f/s "
           "(%.0f MB/s)\n\n",
           dir, sync4k, sync512k, sync512k * 512 * 1024 / 1e6);
    printf("| object | clients | puts/s | MB/s | x fdatasync rate | disk bytes per byte | "
           "failed |\n|---|---|---|---|---|---|---|\n");
    static const size_t sizes[] = {12000, 512000};
    static const int client_counts[] = {1, 4};
    int run_no = 1;
    for (size_t s = 0; s < SP_ARRAY_LEN(sizes); s++)
        for (size_t c = 0; c < SP_ARRAY_LEN(client_counts); c++)
            run_case(pid, endpoint, &client, node_keys.public_z85, sizes[s], client_counts[c],
                     seconds, run_no++, sizes[s] > 100000 ? sync512k : sync4k);
    printf("\n'x fdatasync rate' divides puts/s by the raw append+fdatasync rate for a write\n"
           "of the same size class; 1.0 means one put per fdatasync.\n");

    kill(pid, SIGTERM);
    waitpid(pid, NULL, 0);
    char cmd[PATH_MAX + 16];
    if (system(sp_fmt(cmd, sizeof cmd, "rm -rf '%s'", dir)) != 0)
        fprintf(stderr, "bench_node: could not remove %s\n", dir);
    return 0;
}
