/* attrs.c - the indexed attribute table and the attrs_t record (attrs.h). */
#include "attrs.h"

#include "base.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define TAG(g, e) (((uint32_t)(g) << 16) | (uint32_t)(e))

/* Order must follow attr_id_t. */
static const attr_info_t attr_table[ATTR_COUNT] = {
    {ATTR_SPECIFIC_CHARACTER_SET, TAG(0x0008, 0x0005), "SpecificCharacterSet", "CS", MATCH_STRING,
     LEVEL_PATIENT},
    {ATTR_PATIENT_NAME, TAG(0x0010, 0x0010), "PatientName", "PN", MATCH_PN, LEVEL_PATIENT},
    {ATTR_PATIENT_ID, TAG(0x0010, 0x0020), "PatientID", "LO", MATCH_STRING, LEVEL_PATIENT},
    {ATTR_PATIENT_BIRTH_DATE, TAG(0x0010, 0x0030), "PatientBirthDate", "DA", MATCH_DATE,
     LEVEL_PATIENT},
    {ATTR_PATIENT_SEX, TAG(0x0010, 0x0040), "PatientSex", "CS", MATCH_STRING, LEVEL_PATIENT},
    {ATTR_STUDY_INSTANCE_UID, TAG(0x0020, 0x000D), "StudyInstanceUID", "UI", MATCH_UID,
     LEVEL_STUDY},
    {ATTR_STUDY_DATE, TAG(0x0008, 0x0020), "StudyDate", "DA", MATCH_DATE, LEVEL_STUDY},
    {ATTR_STUDY_TIME, TAG(0x0008, 0x0030), "StudyTime", "TM", MATCH_TIME, LEVEL_STUDY},
    {ATTR_ACCESSION_NUMBER, TAG(0x0008, 0x0050), "AccessionNumber", "SH", MATCH_STRING,
     LEVEL_STUDY},
    {ATTR_STUDY_ID, TAG(0x0020, 0x0010), "StudyID", "SH", MATCH_STRING, LEVEL_STUDY},
    {ATTR_REFERRING_PHYSICIAN_NAME, TAG(0x0008, 0x0090), "ReferringPhysicianName", "PN", MATCH_PN,
     LEVEL_STUDY},
    {ATTR_STUDY_DESCRIPTION, TAG(0x0008, 0x1030), "StudyDescription", "LO", MATCH_STRING,
     LEVEL_STUDY},
    {ATTR_MODALITY, TAG(0x0008, 0x0060), "Modality", "CS", MATCH_STRING, LEVEL_SERIES},
    {ATTR_SERIES_NUMBER, TAG(0x0020, 0x0011), "SeriesNumber", "IS", MATCH_STRING, LEVEL_SERIES},
    {ATTR_SERIES_INSTANCE_UID, TAG(0x0020, 0x000E), "SeriesInstanceUID", "UI", MATCH_UID,
     LEVEL_SERIES},
    {ATTR_SERIES_DESCRIPTION, TAG(0x0008, 0x103E), "SeriesDescription", "LO", MATCH_STRING,
     LEVEL_SERIES},
    {ATTR_SOP_INSTANCE_UID, TAG(0x0008, 0x0018), "SOPInstanceUID", "UI", MATCH_UID, LEVEL_IMAGE},
    {ATTR_SOP_CLASS_UID, TAG(0x0008, 0x0016), "SOPClassUID", "UI", MATCH_UID, LEVEL_IMAGE},
    {ATTR_INSTANCE_NUMBER, TAG(0x0020, 0x0013), "InstanceNumber", "IS", MATCH_STRING, LEVEL_IMAGE},
    {ATTR_TRANSFER_SYNTAX_UID, TAG(0x0002, 0x0010), "TransferSyntaxUID", "UI", MATCH_UID,
     LEVEL_IMAGE},
    {ATTR_SERIES_DATE, TAG(0x0008, 0x0021), "SeriesDate", "DA", MATCH_DATE, LEVEL_SERIES},
    {ATTR_SERIES_TIME, TAG(0x0008, 0x0031), "SeriesTime", "TM", MATCH_TIME, LEVEL_SERIES},
    {ATTR_MODALITIES_IN_STUDY, TAG(0x0008, 0x0061), "ModalitiesInStudy", "CS", MATCH_STRING,
     LEVEL_STUDY},
    {ATTR_NUM_PATIENT_STUDIES, TAG(0x0020, 0x1200), "NumberOfPatientRelatedStudies", "IS",
     MATCH_STRING, LEVEL_PATIENT},
    {ATTR_NUM_PATIENT_SERIES, TAG(0x0020, 0x1202), "NumberOfPatientRelatedSeries", "IS",
     MATCH_STRING, LEVEL_PATIENT},
    {ATTR_NUM_PATIENT_INSTANCES, TAG(0x0020, 0x1204), "NumberOfPatientRelatedInstances", "IS",
     MATCH_STRING, LEVEL_PATIENT},
    {ATTR_NUM_STUDY_SERIES, TAG(0x0020, 0x1206), "NumberOfStudyRelatedSeries", "IS", MATCH_STRING,
     LEVEL_STUDY},
    {ATTR_NUM_STUDY_INSTANCES, TAG(0x0020, 0x1208), "NumberOfStudyRelatedInstances", "IS",
     MATCH_STRING, LEVEL_STUDY},
    {ATTR_NUM_SERIES_INSTANCES, TAG(0x0020, 0x1209), "NumberOfSeriesRelatedInstances", "IS",
     MATCH_STRING, LEVEL_SERIES},
};

const attr_info_t *attr_info(attr_id_t id)
{
    return &attr_table[id];
}

const attr_info_t *attr_by_tag(uint32_t tag)
{
    for (size_t i = 0; i < ATTR_COUNT; i++)
        if (attr_table[i].tag == tag)
            return &attr_table[i];
    return NULL;
}

const attr_info_t *attr_by_keyword(const char *keyword)
{
    for (size_t i = 0; i < ATTR_COUNT; i++)
        if (strcmp(attr_table[i].keyword, keyword) == 0)
            return &attr_table[i];
    return NULL;
}

static const char *level_names[] = {"PATIENT", "STUDY", "SERIES", "IMAGE"};

int attr_parse_level(const char *text, level_t *out)
{
    size_t len = strlen(text);
    while (len > 0 && text[len - 1] == ' ')
        len--;
    for (size_t i = 0; i < SP_ARRAY_LEN(level_names); i++) {
        if (strlen(level_names[i]) == len && strncasecmp(text, level_names[i], len) == 0) {
            *out = (level_t)i;
            return 0;
        }
    }
    return SP_EINVAL;
}

const char *attr_level_name(level_t level)
{
    return (unsigned)level < SP_ARRAY_LEN(level_names) ? level_names[level] : "?";
}

attr_id_t attr_unique_key(level_t level)
{
    static const attr_id_t keys[] = {ATTR_PATIENT_ID, ATTR_STUDY_INSTANCE_UID,
                                     ATTR_SERIES_INSTANCE_UID, ATTR_SOP_INSTANCE_UID};
    return keys[level];
}

void attrs_take(attrs_t *a, attr_id_t id, char *value)
{
    free(a->v[id]);
    a->v[id] = value;
}

void attrs_set(attrs_t *a, attr_id_t id, const char *value)
{
    attrs_take(a, id, value ? sp_strdup(value) : NULL);
}

void attrs_set_count(attrs_t *a, attr_id_t id, uint64_t n)
{
    char text[24];
    attrs_set(a, id, sp_fmt(text, sizeof text, "%llu", (unsigned long long)n));
}

const char *attrs_get(const attrs_t *a, attr_id_t id)
{
    return a->v[id];
}

const char *attrs_str(const attrs_t *a, attr_id_t id)
{
    return a->v[id] ? a->v[id] : "";
}

void attrs_clear(attrs_t *a)
{
    for (size_t i = 0; i < ATTR_COUNT; i++)
        free(a->v[i]);
    memset(a, 0, sizeof *a);
}

void attrs_copy(attrs_t *dst, const attrs_t *src)
{
    attrs_clear(dst);
    for (size_t i = 0; i < ATTR_COUNT; i++)
        if (src->v[i])
            dst->v[i] = sp_strdup(src->v[i]);
}
