/* tls.c - DICOM TLS server contexts over OpenSSL (see tls.h): the BCP 195
 * non-downgrading profile, client certificate verification against the CA
 * bundle, and re-reading the certificate, key and CA files when they change.
 *
 * Threads: t->mu guards the current context and the files' signatures; a
 * context handed out by tls_acquire() carries its own reference, so a
 * reload never pulls one from under a connection. */
#include "tls.h"

#include "../common/base.h"
#include "../common/log.h"

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

enum { F_CERT, F_KEY, F_CA, F_COUNT };

struct tls {
    pthread_mutex_t mu;
    char *paths[F_COUNT]; /* NULL when not configured (only the CA may be) */
    bool verify_peer;
    char *ciphers;
    SSL_CTX *ctx;              /* the current context */
    sp_file_id_t sig[F_COUNT]; /* the versions ctx was built from (base.h: an
                                  editor or `mv` replaces the inode, `cp` keeps it) */
    int64_t checked_ms;        /* last look at the files */
    unsigned reloads, failures;
};

void tls_error_text(char *buf, size_t len)
{
    buf[0] = 0;
    unsigned long e;
    size_t used = 0;
    while ((e = ERR_get_error()) != 0) {
        char one[256];
        ERR_error_string_n(e, one, sizeof one);
        if (used + 3 < len) {
            sp_fmt(buf + used, len - used, "%s%s", used ? "; " : "", one);
            used = strlen(buf);
        }
    }
    if (buf[0] == 0)
        sp_strlcpy(buf, "unknown OpenSSL error", len);
}

/* Builds a server context from the files. Returns it, or NULL with the
 * reason in err. */
static SSL_CTX *build_ctx(const tls_t *t, char *err, size_t errlen)
{
    char ossl[512];
    ERR_clear_error();
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (ctx == NULL) {
        tls_error_text(ossl, sizeof ossl);
        sp_fmt(err, errlen, "cannot create a TLS context: %s", ossl);
        return NULL;
    }
    /* BCP 195 non-downgrading: nothing before TLS 1.2, no renegotiation,
     * no compression, forward-secret AEAD suites only. */
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE |
                                 SSL_OP_NO_COMPRESSION);
    /* A peer closing without close_notify (most DICOM peers after
     * A-RELEASE) is the end of the stream, not an error to log. */
    SSL_CTX_set_options(ctx, SSL_OP_IGNORE_UNEXPECTED_EOF);
    /* The gate retries a write with the rest of the buffer, maybe moved. */
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    /* DICOM clients do not resume sessions: no TLS 1.3 tickets to write
     * after the handshake. */
    SSL_CTX_set_num_tickets(ctx, 0);
    const char *what = "cipher list";
    if (SSL_CTX_set_cipher_list(ctx, t->ciphers) != 1)
        goto fail;
    what = t->paths[F_CERT];
    if (SSL_CTX_use_certificate_chain_file(ctx, t->paths[F_CERT]) != 1)
        goto fail;
    what = t->paths[F_KEY];
    if (SSL_CTX_use_PrivateKey_file(ctx, t->paths[F_KEY], SSL_FILETYPE_PEM) != 1)
        goto fail;
    what = "private key and certificate";
    if (SSL_CTX_check_private_key(ctx) != 1)
        goto fail;
    if (t->paths[F_CA]) {
        what = t->paths[F_CA];
        if (SSL_CTX_load_verify_locations(ctx, t->paths[F_CA], NULL) != 1)
            goto fail;
        if (t->verify_peer) {
            /* Tell clients which CAs we take (they pick a certificate). */
            STACK_OF(X509_NAME) *names = SSL_load_client_CA_file(t->paths[F_CA]);
            if (names == NULL)
                goto fail;
            SSL_CTX_set_client_CA_list(ctx, names);
        }
    }
    SSL_CTX_set_verify(
        ctx, t->verify_peer ? SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT : SSL_VERIFY_NONE,
        NULL);
    /* A session cache id, so a resumed TLS 1.2 session is one of ours. */
    static const unsigned char sid[] = "shardpacs-dicom";
    SSL_CTX_set_session_id_context(ctx, sid, sizeof sid - 1);
    return ctx;
fail:
    tls_error_text(ossl, sizeof ossl);
    sp_fmt(err, errlen, "%s: %s", what, ossl);
    SSL_CTX_free(ctx);
    return NULL;
}

int tls_new(const tls_config_t *cfg, tls_t **out, char *err, size_t errlen)
{
    *out = NULL;
    if (cfg->certificate == NULL || cfg->certificate[0] == 0 || cfg->key == NULL ||
        cfg->key[0] == 0) {
        sp_fmt(err, errlen, "TLS needs a certificate and a private key");
        return SP_ECONFIG;
    }
    if (cfg->verify_peer && (cfg->ca == NULL || cfg->ca[0] == 0)) {
        sp_fmt(err, errlen, "verifying peer certificates needs a CA bundle");
        return SP_ECONFIG;
    }
    tls_t *t = sp_calloc(1, sizeof(*t));
    pthread_mutex_init(&t->mu, NULL);
    t->paths[F_CERT] = sp_strdup(cfg->certificate);
    t->paths[F_KEY] = sp_strdup(cfg->key);
    t->paths[F_CA] = cfg->ca && cfg->ca[0] ? sp_strdup(cfg->ca) : NULL;
    t->verify_peer = cfg->verify_peer;
    t->ciphers = sp_strdup(cfg->ciphers && cfg->ciphers[0] ? cfg->ciphers : TLS_BCP195_CIPHERS);
    for (int i = 0; i < F_COUNT; i++)
        t->sig[i] = sp_file_id_stat(t->paths[i]);
    t->ctx = build_ctx(t, err, errlen);
    if (t->ctx == NULL) {
        tls_destroy(&t);
        return SP_ECONFIG;
    }
    t->checked_ms = sp_now_ms();
    *out = t;
    return 0;
}

void tls_destroy(tls_t **tp)
{
    if (tp == NULL || *tp == NULL)
        return;
    tls_t *t = *tp;
    *tp = NULL;
    SSL_CTX_free(t->ctx);
    for (int i = 0; i < F_COUNT; i++)
        free(t->paths[i]);
    free(t->ciphers);
    pthread_mutex_destroy(&t->mu);
    free(t);
}

/* Reloads when a file changed since the last look. t->mu held. */
static void maybe_reload(tls_t *t)
{
    sp_file_id_t now[F_COUNT];
    bool changed = false;
    for (int i = 0; i < F_COUNT; i++) {
        now[i] = sp_file_id_stat(t->paths[i]);
        changed = changed || !sp_file_id_equal(&now[i], &t->sig[i]);
    }
    if (!changed)
        return;
    memcpy(t->sig, now, sizeof now);
    char err[768];
    SSL_CTX *ctx = build_ctx(t, err, sizeof err);
    if (ctx == NULL) {
        t->failures++;
        log_warn("tls: certificate, key or CA changed but does not load, keeping the previous "
                 "ones: %s",
                 err);
        return;
    }
    SSL_CTX_free(t->ctx);
    t->ctx = ctx;
    t->reloads++;
    log_info("tls: certificate, key and CA re-read (%s, %s, %s)", t->paths[F_CERT], t->paths[F_KEY],
             t->paths[F_CA] ? t->paths[F_CA] : "no CA");
}

SSL_CTX *tls_acquire(tls_t *t)
{
    pthread_mutex_lock(&t->mu);
    int64_t ms = sp_now_ms();
    if (ms - t->checked_ms >= 1000) {
        t->checked_ms = ms;
        maybe_reload(t);
    }
    SSL_CTX *ctx = t->ctx;
    SSL_CTX_up_ref(ctx);
    pthread_mutex_unlock(&t->mu);
    return ctx;
}

unsigned tls_reloads(tls_t *t)
{
    pthread_mutex_lock(&t->mu);
    unsigned n = t->reloads;
    pthread_mutex_unlock(&t->mu);
    return n;
}

unsigned tls_reload_failures(tls_t *t)
{
    pthread_mutex_lock(&t->mu);
    unsigned n = t->failures;
    pthread_mutex_unlock(&t->mu);
    return n;
}

char *tls_peer_subject(SSL *ssl)
{
    X509 *cert = SSL_get1_peer_certificate(ssl);
    if (cert == NULL)
        return NULL;
    char *out = NULL;
    BIO *bio = BIO_new(BIO_s_mem());
    if (bio && X509_NAME_print_ex(bio, X509_get_subject_name(cert), 0, XN_FLAG_RFC2253) >= 0) {
        char *p = NULL;
        long n = BIO_get_mem_data(bio, &p);
        if (n >= 0)
            out = sp_strndup(p ? p : "", (size_t)n);
    }
    BIO_free(bio);
    X509_free(cert);
    return out;
}
