/* attrs.h - the DICOM attributes ShardPACS indexes, and a small record type
 * holding their values.
 *
 * The attribute table lists, for each query/retrieve level, the keys PS3.4
 * C.6 names for the Patient Root and Study Root models, plus the counts and
 * ModalitiesInStudy that a node computes at query time. Values are UTF-8
 * strings without DICOM padding; the router converts from the data set's
 * Specific Character Set before they reach a node. Thread-safe: the table is
 * constant, and an attrs_t belongs to one thread at a time. */
#ifndef SP_ATTRS_H
#define SP_ATTRS_H

#include "match.h"

#include <stdint.h>

typedef enum { LEVEL_PATIENT = 0, LEVEL_STUDY, LEVEL_SERIES, LEVEL_IMAGE } level_t;

typedef enum {
    /* Stored: extracted by the router from each instance. */
    ATTR_SPECIFIC_CHARACTER_SET = 0,
    ATTR_PATIENT_NAME,
    ATTR_PATIENT_ID,
    ATTR_PATIENT_BIRTH_DATE,
    ATTR_PATIENT_SEX,
    ATTR_STUDY_INSTANCE_UID,
    ATTR_STUDY_DATE,
    ATTR_STUDY_TIME,
    ATTR_ACCESSION_NUMBER,
    ATTR_STUDY_ID,
    ATTR_REFERRING_PHYSICIAN_NAME,
    ATTR_STUDY_DESCRIPTION,
    ATTR_MODALITY,
    ATTR_SERIES_NUMBER,
    ATTR_SERIES_INSTANCE_UID,
    ATTR_SERIES_DESCRIPTION,
    ATTR_SOP_INSTANCE_UID,
    ATTR_SOP_CLASS_UID,
    ATTR_INSTANCE_NUMBER,
    ATTR_TRANSFER_SYNTAX_UID,
    /* Added later: after every older stored id, whose numbers are on disk
     * (node/store.c index records). */
    ATTR_SERIES_DATE,
    ATTR_SERIES_TIME,
    ATTR_STORED_COUNT,
    /* Computed by the node when a query asks for them. */
    ATTR_MODALITIES_IN_STUDY = ATTR_STORED_COUNT,
    ATTR_NUM_PATIENT_STUDIES,
    ATTR_NUM_PATIENT_SERIES,
    ATTR_NUM_PATIENT_INSTANCES,
    ATTR_NUM_STUDY_SERIES,
    ATTR_NUM_STUDY_INSTANCES,
    ATTR_NUM_SERIES_INSTANCES,
    ATTR_COUNT
} attr_id_t;

typedef struct {
    attr_id_t id;
    uint32_t tag;        /* DICOM tag, group << 16 | element */
    const char *keyword; /* DICOM keyword, e.g. "PatientName" */
    const char *vr;      /* value representation, e.g. "PN" */
    match_kind_t kind;   /* how C-FIND keys on it match */
    level_t level;       /* the level whose record holds it */
} attr_info_t;

/* Returns the table entry of an attribute id (always valid for id < ATTR_COUNT). */
const attr_info_t *attr_info(attr_id_t id);
/* Returns the entry for a DICOM tag, or NULL if ShardPACS does not index it. */
const attr_info_t *attr_by_tag(uint32_t tag);
/* Returns the entry for a keyword, or NULL. */
const attr_info_t *attr_by_keyword(const char *keyword);
/* Parses "PATIENT", "STUDY", "SERIES", "IMAGE" (trailing spaces allowed). */
int attr_parse_level(const char *text, level_t *out);
const char *attr_level_name(level_t level);
/* The unique key of a level (PS3.4 C.6): PatientID, StudyInstanceUID,
 * SeriesInstanceUID or SOPInstanceUID. */
attr_id_t attr_unique_key(level_t level);

/* A record: one optional value per attribute. A NULL entry is absent, ""
 * is present but empty. The record owns its strings. */
typedef struct {
    char *v[ATTR_COUNT];
} attrs_t;

/* Sets (copies) a value; NULL clears it. */
void attrs_set(attrs_t *a, attr_id_t id, const char *value);
/* Sets a count (e.g. NumberOfStudyRelatedInstances) as its decimal text. */
void attrs_set_count(attrs_t *a, attr_id_t id, uint64_t n);
/* Takes ownership of a malloc'd value. */
void attrs_take(attrs_t *a, attr_id_t id, char *value);
/* Returns the value or NULL; valid until the entry is next set or cleared. */
const char *attrs_get(const attrs_t *a, attr_id_t id);
/* Returns the value or "" when absent. */
const char *attrs_str(const attrs_t *a, attr_id_t id);
/* Frees every value and zeroes the record (safe to reuse afterwards). */
void attrs_clear(attrs_t *a);
/* Deep-copies src into dst (dst is cleared first). */
void attrs_copy(attrs_t *dst, const attrs_t *src);

#endif
