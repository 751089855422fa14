/*
 * fuzz_decoder.c: libFuzzer target for the wal2json v2 message decoder.
 *
 * Job: hand arbitrary bytes to wp_decoder_parse, first as one message and
 * then split on '\n' as a session through one decoder, and check every
 * output with fuzz_checks.c.  Invariant: a run that ends without a crash,
 * a sanitizer report or an abort here kept every promise of decoder.h.
 */
#include "wp_setup.h"

#include <stdio.h>
#include <stdlib.h>

#include "fuzz_checks.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char why[1024];

    if (wp_fuzz_check_decoder(data, size, why, sizeof why) != NULL) {
        fprintf(stderr, "fuzz_decoder: invariant violated: %s\n", why);
        abort(); /* libFuzzer saves the input as crash-<sha1> */
    }
    return 0;
}
