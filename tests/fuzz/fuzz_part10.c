/* fuzz_part10.c - libFuzzer target for the Part-10 framing (common/part10.h).
 *
 * Every input is split as if it were a stored object: part10_split() must
 * either refuse it or name a data set inside the input and a transfer
 * syntax. Whatever it accepts is framed again with part10_make() from the
 * meta it read, and split once more: the data set must come back byte for
 * byte at the new offset (the framing never touches the data set). */
#include "part10.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* An exact-size copy, so ASan sees any read past the end. */
    uint8_t *in = malloc(size ? size : 1);
    memcpy(in, data, size);
    part10_meta_t meta;
    if (part10_split(in, size, &meta) == 0) {
        if (meta.dataset_offset > size || meta.ts[0] == '\0')
            abort();
        const uint8_t *ds = in + meta.dataset_offset;
        size_t n = size - meta.dataset_offset;
        const char *cls = meta.sop_class[0] ? meta.sop_class : "1.2.3";
        const char *sop = meta.sop_instance[0] ? meta.sop_instance : "1.2.3.4";
        uint8_t *again = NULL;
        size_t again_len = 0;
        if (part10_make(ds, n, cls, sop, meta.ts, &again, &again_len) == 0) {
            part10_meta_t m2;
            if (part10_split(again, again_len, &m2) != 0 || again_len - m2.dataset_offset != n ||
                memcmp(again + m2.dataset_offset, ds, n) != 0 || strcmp(m2.ts, meta.ts) != 0)
                abort();
            free(again);
        }
    }
    free(in);
    return 0;
}
