/* bootstrap.c - `shardpacs bootstrap --out DIR --node n1=HOST:PORT[@SITE]
 * ... --router r1=HOST:PORT[@SITE] ...`: writes one folder per machine
 * (DIR/NAME/) holding everything that machine needs in /etc/shardpacs: its
 * CURVE key pair (NAME.key, 0600) and public key, the cluster key list
 * with every member's role (cluster.keys), and its configuration
 * (NAME.conf: listen endpoint, site, every node as a seed, the cluster's N
 * and W, state under --state-dir), plus DIR/admin/ with the operator's key
 * pair. Paths in the configurations are relative to the configuration's
 * folder (keys) or absolute (state), so a folder copied to
 * /etc/shardpacs/ runs as shardpacs-node@NAME / shardpacs-router@NAME.
 *
 * HOST:PORT is the member's cluster (gossip and RPC) endpoint; a router's
 * DICOM port is --dicom-port (default 11112). Refuses to write into a
 * folder that exists, so keys are never overwritten. Single-threaded. */
#include "bootstrap.h"

#include "../common/base.h"
#include "../common/keys.h"

#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define BOOT_MAX_MEMBERS 256

typedef struct {
    char name[64];
    char host[128];
    int port;
    char site[64];
    bool router;
    keys_pair_t kp;
} member_t;

typedef struct {
    member_t m[BOOT_MAX_MEMBERS];
    size_t n, nnodes;
    const char *out;
    const char *state_dir;
    int replicas, write_quorum, dicom_port;
} plan_t;

static void usage(void)
{
    fprintf(stderr,
            "usage: shardpacs bootstrap --out DIR --node NAME=HOST:PORT[@SITE] ...\n"
            "                           --router NAME=HOST:PORT[@SITE] ...\n"
            "                           [--replicas N] [--write-quorum W] [--dicom-port P]\n"
            "                           [--state-dir /var/lib/shardpacs]\n"
            "  writes DIR/NAME/ (key pair, cluster.keys, NAME.conf) per machine and DIR/admin/\n");
}

/* Parses NAME=HOST:PORT[@SITE] into m; returns 0 or SP_EINVAL with why. */
static int parse_member(const char *arg, bool router, member_t *m, char *why, size_t whylen)
{
    memset(m, 0, sizeof *m);
    m->router = router;
    const char *eq = strchr(arg, '=');
    size_t nl = eq ? (size_t)(eq - arg) : 0;
    if (eq == NULL || nl == 0 || nl >= sizeof m->name) {
        sp_fmt(why, whylen, "'%s': expected NAME=HOST:PORT[@SITE]", arg);
        return SP_EINVAL;
    }
    memcpy(m->name, arg, nl);
    for (size_t i = 0; i < nl; i++) {
        char c = m->name[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '-' || c == '_')) {
            sp_fmt(why, whylen, "'%s': a name is letters, digits, '-' and '_'", arg);
            return SP_EINVAL;
        }
    }
    if (strcmp(m->name, "admin") == 0) {
        sp_fmt(why, whylen, "'admin' is the operator key's name");
        return SP_EINVAL;
    }
    char rest[256];
    sp_strlcpy(rest, eq + 1, sizeof rest);
    char *at = strchr(rest, '@');
    if (at) {
        *at = '\0';
        if (at[1] == '\0' || strlen(at + 1) >= sizeof m->site) {
            sp_fmt(why, whylen, "'%s': bad site", arg);
            return SP_EINVAL;
        }
        sp_strlcpy(m->site, at + 1, sizeof m->site);
    }
    char *colon = strrchr(rest, ':');
    char *end = NULL;
    long port = colon ? strtol(colon + 1, &end, 10) : 0;
    if (colon == NULL || colon == rest || end == colon + 1 || *end != '\0' || port < 1 ||
        port > 65535 || (size_t)(colon - rest) >= sizeof m->host) {
        sp_fmt(why, whylen, "'%s': expected HOST:PORT with a port from 1 to 65535", arg);
        return SP_EINVAL;
    }
    *colon = '\0';
    sp_strlcpy(m->host, rest, sizeof m->host);
    m->port = (int)port;
    return 0;
}

static int make_dir(const char *path, mode_t mode)
{
    return mkdir(path, mode) == 0 ? 0 : -errno;
}

/* Writes DIR/who/cluster.keys: every member with its role, and the admin. */
static int write_keys_file(const plan_t *p, const char *dir, const keys_pair_t *admin)
{
    char path[4096];
    FILE *f = fopen(sp_fmt(path, sizeof path, "%s/cluster.keys", dir), "w");
    if (f == NULL)
        return -errno;
    fprintf(f, "# Every member's public key, name and role (README \"Access control\").\n");
    for (size_t i = 0; i < p->n; i++)
        fprintf(f, "%s %s %s\n", p->m[i].kp.public_z85, p->m[i].name,
                p->m[i].router ? "router" : "node");
    fprintf(f, "%s admin admin\n", admin->public_z85);
    return fclose(f) == 0 ? 0 : -errno;
}

/* The [cluster] seeds line: every node but `self`. */
static void write_seeds(FILE *f, const plan_t *p, const member_t *self)
{
    fprintf(f, "seeds = ");
    bool first = true;
    for (size_t i = 0; i < p->n; i++) {
        const member_t *m = &p->m[i];
        if (m->router || m == self)
            continue;
        fprintf(f, "%s%s@tcp://%s:%d", first ? "" : ",", m->name, m->host, m->port);
        first = false;
    }
    fprintf(f, "\n");
}

static int write_config(const plan_t *p, const member_t *m, const char *dir)
{
    char path[4096];
    FILE *f = fopen(sp_fmt(path, sizeof path, "%s/%s.conf", dir, m->name), "w");
    if (f == NULL)
        return -errno;
    fprintf(f, "# %s - written by shardpacs bootstrap; copy this folder to /etc/shardpacs/\n",
            m->name);
    fprintf(f, "# and run shardpacs-%s@%s. Every option: shardpacs-%s --help-config\n",
            m->router ? "router" : "node", m->name, m->router ? "router" : "node");
    fprintf(f, "[%s]\nid = %s\nlisten = tcp://%s:%d\n", m->router ? "router" : "node", m->name,
            m->host, m->port);
    if (m->site[0])
        fprintf(f, "site = %s\n", m->site);
    if (!m->router)
        fprintf(f, "data_dir = %s/%s/data\n", p->state_dir, m->name);
    else
        fprintf(f, "[dicom]\nae_title = SHARDPACS\nbind = 0.0.0.0\nport = %d\n", p->dicom_port);
    fprintf(f, "[keys]\nkey_pair = %s.key\ncluster_keys = cluster.keys\n", m->name);
    fprintf(f, "[cluster]\nreplicas = %d\n", p->replicas);
    if (m->router)
        fprintf(f, "write_quorum = %d\n", p->write_quorum);
    write_seeds(f, p, m);
    fprintf(f, "[audit]\nfile = %s/%s/audit.jsonl\n", p->state_dir, m->name);
    fprintf(f,
            "[admin]\n# metrics and health; loopback only (no authentication)\n"
            "listen = 127.0.0.1:%d\n",
            m->router ? 9102 : 9101);
    return fclose(f) == 0 ? 0 : -errno;
}

/* Writes one machine's folder. */
static int write_member(const plan_t *p, const member_t *m, const keys_pair_t *admin)
{
    char dir[4096], path[4096];
    sp_fmt(dir, sizeof dir, "%s/%s", p->out, m->name);
    int rc = make_dir(dir, 0750);
    if (rc == 0)
        rc = keys_write_pair(sp_fmt(path, sizeof path, "%s/%s.key", dir, m->name), &m->kp);
    if (rc == 0)
        rc = keys_write_public(sp_fmt(path, sizeof path, "%s/%s.pub", dir, m->name),
                               m->kp.public_z85);
    if (rc == 0)
        rc = write_keys_file(p, dir, admin);
    if (rc == 0)
        rc = write_config(p, m, dir);
    if (rc != 0)
        fprintf(stderr, "shardpacs: bootstrap: %s: %s\n", dir, sp_strerror(rc));
    return rc;
}

int bootstrap_main(int argc, char **argv)
{
    static const struct option longopts[] = {{"out", required_argument, NULL, 'o'},
                                             {"node", required_argument, NULL, 'n'},
                                             {"router", required_argument, NULL, 'r'},
                                             {"replicas", required_argument, NULL, 'N'},
                                             {"write-quorum", required_argument, NULL, 'W'},
                                             {"dicom-port", required_argument, NULL, 'd'},
                                             {"state-dir", required_argument, NULL, 's'},
                                             {NULL, 0, NULL, 0}};
    plan_t *p = sp_calloc(1, sizeof *p);
    p->state_dir = "/var/lib/shardpacs";
    p->dicom_port = 11112;
    int rc = 2, opt;
    char why[512];
    optind = 1;
    while ((opt = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (opt) {
        case 'o': p->out = optarg; break;
        case 's': p->state_dir = optarg; break;
        case 'N': p->replicas = atoi(optarg); break;
        case 'W': p->write_quorum = atoi(optarg); break;
        case 'd': p->dicom_port = atoi(optarg); break;
        case 'n':
        case 'r':
            if (p->n == BOOT_MAX_MEMBERS) {
                fprintf(stderr, "shardpacs: bootstrap: at most %d members\n", BOOT_MAX_MEMBERS);
                goto out;
            }
            if (parse_member(optarg, opt == 'r', &p->m[p->n], why, sizeof why) != 0) {
                fprintf(stderr, "shardpacs: bootstrap: %s\n", why);
                goto out;
            }
            p->nnodes += opt == 'n';
            p->n++;
            break;
        default: usage(); goto out;
        }
    }
    if (p->out == NULL || p->nnodes == 0 || optind != argc) {
        usage();
        goto out;
    }
    if (p->replicas == 0)
        p->replicas = p->nnodes < 3 ? (int)p->nnodes : 3;
    if (p->write_quorum == 0)
        p->write_quorum = p->replicas / 2 + 1;
    if (p->replicas < 1 || p->replicas > 16 || p->write_quorum < 1 ||
        p->write_quorum > p->replicas || p->dicom_port < 1 || p->dicom_port > 65535) {
        fprintf(stderr, "shardpacs: bootstrap: need 1 <= W <= N <= 16 and a DICOM port\n");
        goto out;
    }
    for (size_t i = 0; i < p->n; i++)
        for (size_t j = 0; j < i; j++)
            if (strcmp(p->m[i].name, p->m[j].name) == 0) {
                fprintf(stderr, "shardpacs: bootstrap: the name %s is given twice\n", p->m[i].name);
                goto out;
            }
    rc = 1;
    if (make_dir(p->out, 0700) != 0) {
        fprintf(stderr, "shardpacs: bootstrap: cannot make %s: %s (it must not exist yet)\n",
                p->out, strerror(errno));
        goto out;
    }
    keys_pair_t admin;
    if (keys_generate(&admin) != 0)
        goto out;
    for (size_t i = 0; i < p->n; i++)
        if (keys_generate(&p->m[i].kp) != 0)
            goto out;
    for (size_t i = 0; i < p->n; i++)
        if (write_member(p, &p->m[i], &admin) != 0)
            goto out;
    char dir[4096], path[4096];
    sp_fmt(dir, sizeof dir, "%s/admin", p->out);
    if (make_dir(dir, 0700) != 0 ||
        keys_write_pair(sp_fmt(path, sizeof path, "%s/admin.key", dir), &admin) != 0 ||
        write_keys_file(p, dir, &admin) != 0) {
        fprintf(stderr, "shardpacs: bootstrap: cannot write %s\n", dir);
        goto out;
    }
    printf("bootstrap: %zu nodes, %zu routers, N=%d W=%d in %s (one folder per machine, "
           "admin/ for the operator)\n",
           p->nnodes, p->n - p->nnodes, p->replicas, p->write_quorum, p->out);
    rc = 0;
out:
    free(p);
    return rc;
}
