/* charset_tool.c - charset_to_utf8() from the command line, for tests that
 * compare it with other decoders (tests/cluster/test_charset_files.py).
 *
 *   charset_tool SCS VR HEX
 *
 * SCS is the raw (0008,0005) value ("-" when the attribute is absent), VR a
 * DICOM VR (PN; ST, LT and UT are text; anything else a string VR) and HEX
 * the value's bytes in hex. Prints the UTF-8 text and a newline on stdout
 * and "flags=0xN" on stderr; exits 0, or 2 on bad arguments. */
#include "base.h"
#include "charset.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int hex_digit(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: charset_tool SCS|- VR HEX\n");
        return 2;
    }
    const char *scs = strcmp(argv[1], "-") == 0 ? NULL : argv[1];
    const char *vr = argv[2], *hex = argv[3];
    charset_vr_t kind = CHARSET_VR_STRING;
    if (strcmp(vr, "PN") == 0)
        kind = CHARSET_VR_PN;
    else if (strcmp(vr, "ST") == 0 || strcmp(vr, "LT") == 0 || strcmp(vr, "UT") == 0)
        kind = CHARSET_VR_TEXT;
    size_t n = strlen(hex);
    if (n % 2 != 0) {
        fprintf(stderr, "charset_tool: odd number of hex digits\n");
        return 2;
    }
    uint8_t *in = sp_malloc(n / 2 + 1);
    for (size_t i = 0; i < n / 2; i++) {
        int hi = hex_digit(hex[2 * i]), lo = hex_digit(hex[2 * i + 1]);
        if (hi < 0 || lo < 0) {
            fprintf(stderr, "charset_tool: bad hex digit\n");
            free(in);
            return 2;
        }
        in[i] = (uint8_t)(hi << 4 | lo);
    }
    char *out;
    unsigned flags;
    if (charset_to_utf8(scs, in, n / 2, kind, &out, &flags) != 0) {
        free(in);
        return 2;
    }
    printf("%s\n", out);
    fprintf(stderr, "flags=%#x\n", flags);
    free(out);
    free(in);
    return 0;
}
