/* tls.h - DICOM TLS contexts (PS3.15 Annex B secure transport connection
 * profiles) over OpenSSL: the router's certificate, private key and CA
 * bundle, the BCP 195 non-downgrading profile (TLS 1.2 or later only,
 * ECDHE with AES-GCM for TLS 1.2, OpenSSL's TLS 1.3 suites), and re-reading
 * of the files when they change. The gate (router/gate.c) takes a server
 * context for every connection accepted on the TLS port; the C-MOVE
 * sub-associations (router/dicom_services.cc) take the same files through
 * DCMTK's TLS layer.
 *
 * Reload: tls_acquire() looks at the files' modification times at most once
 * a second; when one changed it builds a new context from all of them. A
 * file that does not load (bad PEM, key not matching the certificate,
 * missing) keeps the previous context and is logged once per change.
 * Connections keep the context they started with (OpenSSL counts
 * references).
 *
 * Threads: every function is thread-safe. */
#ifndef SP_TLS_H
#define SP_TLS_H

#include <stdbool.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The cipher suites of the BCP 195 non-downgrading profile for TLS 1.2
 * (RFC 9325 section 4.2, with forward secrecy from ECDHE only). */
#define TLS_BCP195_CIPHERS                                                                         \
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"                                   \
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384"

typedef struct {
    const char *certificate; /* PEM: this side's certificate (chain) */
    const char *key;         /* PEM: its private key, not encrypted */
    const char *ca;          /* PEM bundle of trusted CAs; NULL or "": none */
    bool verify_peer;        /* server: require a client certificate signed by ca */
    const char *ciphers;     /* TLS 1.2 cipher list; NULL: TLS_BCP195_CIPHERS */
} tls_config_t;

typedef struct tls tls_t;
struct ssl_ctx_st;
struct ssl_st;

/* Loads a server context. Strings are copied. Returns 0, or SP_ECONFIG with
 * the reason (file and OpenSSL's message) in err. */
int tls_new(const tls_config_t *cfg, tls_t **out, char *err, size_t errlen);
void tls_destroy(tls_t **tp);

/* The current server context, re-read first when a file changed (checked at
 * most once a second). The caller owns one reference: SSL_CTX_free() it. */
struct ssl_ctx_st *tls_acquire(tls_t *t);

/* Times a changed file was loaded, and refused (previous context kept). */
unsigned tls_reloads(tls_t *t);
unsigned tls_reload_failures(tls_t *t);

/* The verified peer certificate's subject as an RFC 2253 string, malloc'd
 * (the caller frees it), or NULL when the peer sent none. */
char *tls_peer_subject(struct ssl_st *ssl);

/* OpenSSL's error queue as text (emptied), for log lines. */
void tls_error_text(char *buf, size_t len);

#ifdef __cplusplus
}
#endif
#endif
