/*
 * fuzz_config.c: libFuzzer target for the INI configuration parser.
 *
 * Job: hand arbitrary text to wp_config_parse_string and check the result
 * (or the error) with fuzz_checks.c; the configuration is always destroyed,
 * so LeakSanitizer sees every path.  ${VAR} expands from the environment:
 * the variables the seeds use are set once, the rest are unset (an error).
 * Invariant: a run that ends without a crash, a sanitizer report or an abort
 * here kept every promise of config.h.
 */
#include "wp_setup.h"

#include <stdio.h>
#include <stdlib.h>

#include "fuzz_checks.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    wp_fuzz_init();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char why[1024];

    if (wp_fuzz_check_config(data, size, why, sizeof why) != NULL) {
        fprintf(stderr, "fuzz_config: invariant violated: %s\n", why);
        abort(); /* libFuzzer saves the input as crash-<sha1> */
    }
    return 0;
}
