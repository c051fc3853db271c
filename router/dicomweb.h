/* dicomweb.h - DICOMweb (PS3.18) on the router: QIDO-RS searches through
 * backend_find() with the same matching as C-FIND, WADO-RS retrieval of
 * stored objects (bit-exact), metadata, frames, bulk data and rendered
 * images, and STOW-RS stores with the same archive policy and quorum as
 * C-STORE. Plugged into the HTTP front door (http.h) as its handlers; the
 * routes and what is honoured are listed in the README ("DICOMweb").
 *
 * Threads: the HTTP pool threads call the handlers concurrently; streamed
 * responses start fetcher threads of their own for the duration of the
 * response. The metadata cache is shared and locked. Settings are read-only
 * after dicomweb_new(). */
#ifndef SP_DICOMWEB_H
#define SP_DICOMWEB_H

#include "backend.h"
#include "http.h"

#include <stddef.h>

typedef struct {
    backend_t *backend;     /* borrowed, outlives the dicomweb_t */
    size_t max_results;     /* QIDO cap ([query] max_results) */
    size_t max_object_size; /* largest STOW-RS part ([dicom] max_object_size) */
    int max_depth;          /* deepest nesting in a STOW-RS data set ([dicom] max_depth) */
    size_t metadata_cache;  /* bytes of instance metadata JSON kept (0: none) */
} dicomweb_config_t;

typedef struct dicomweb dicomweb_t;

dicomweb_t *dicomweb_new(const dicomweb_config_t *cfg);
void dicomweb_destroy(dicomweb_t **dp);

/* The handlers to give http_server_start(); ctx is d. */
http_handlers_t dicomweb_handlers(dicomweb_t *d);

#endif
