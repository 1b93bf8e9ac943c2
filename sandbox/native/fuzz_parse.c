/* Fuzz target: parse_run on every input. Built with AddressSanitizer and UBSan
 * (sandbox/native/build.py), so a read outside the input aborts the process.
 *
 * Inputs arrive on stdin, each as a little-endian u32 length and that many bytes (one process
 * serves a whole fuzzing session); for each, one line goes to stdout: "ok" or the parser's
 * reason. The input is copied to a heap block of exactly its size, so reading one byte past
 * its end is a sanitizer error. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "parse.h"

int main(void)
{
    static struct run run;
    unsigned char size_bytes[4];
    while (fread(size_bytes, 1, 4, stdin) == 4) {
        uint32_t size = (uint32_t)size_bytes[0] | (uint32_t)size_bytes[1] << 8 |
                        (uint32_t)size_bytes[2] << 16 | (uint32_t)size_bytes[3] << 24;
        if (size > BOXINIT_MAX_REQUEST)
            return 2;
        unsigned char *buf = malloc(size ? size : 1);
        if (!buf || fread(buf, 1, size, stdin) != size)
            return 2;
        const char *why = NULL;
        int rc = parse_run(buf, size, &run, &why);
        printf("%s\n", rc == 0 ? "ok" : why);
        fflush(stdout);
        free(buf);
    }
    return 0;
}
