/*
 * envelope_ref.c: the Debezium encoder exactly as it was before the speed work (envelope.c at
 * bd83cf0, kept verbatim in envelope_ref.inc), under other names (wp_dbz_ref_*).  Job: be the
 * byte-for-byte oracle of test_dbz_oracle.c, so a faster envelope.c is proven to write the
 * same bytes.  Invariant: envelope_ref.inc is never edited (a fix to the format changes both,
 * and then this oracle is retired or refreshed on purpose, in its own commit).
 */
#define wp_dbz_encode wp_dbz_ref_encode
#define wp_dbz_tables_new wp_dbz_ref_tables_new
#define wp_dbz_tables_free wp_dbz_ref_tables_free
#define wp_dbz_record_free wp_dbz_ref_record_free
#include "envelope_ref.inc"
