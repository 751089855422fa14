/*
 * migrate.h: the staging schema, versioned migrations from sql/ compiled in.
 *
 * wp_migrate_apply brings the staging database to the newest version in one
 * transaction per migration, recording each in walpipe.schema_migrations; an
 * already-applied version is skipped, so it is safe to run any number of times.
 * Optional indexes follow the configuration: the GIN on payload
 * (payload_gin_index) and the btree sinks read by (any [sink] section).
 */
#ifndef WP_MIGRATE_H
#define WP_MIGRATE_H

#include "wp_setup.h"

typedef struct wp_migration {
    int version;
    const char *name;
    const char *sql;
} wp_migration_t;

extern const wp_migration_t wp_migrations[];
extern const size_t wp_migrations_count;

#include "config.h"

/* The btree sinks read raw_events by, in (source, lsn, seq, id) order; `walpipe init` makes it when sinks are configured. */
#define WP_SINK_INDEX_SQL \
    "CREATE INDEX IF NOT EXISTS raw_events_source_order ON walpipe.raw_events (source, lsn, seq, id)"

/* The newest schema version this walpipe knows. */
int wp_migrate_latest_version(void);

#include <libpq-fe.h>

/* The schema version of the staging database on conn: 0 when never initialized, -1 on error (not logged). */
int wp_migrate_staging_version(PGconn *conn);

/*
 * Brings the staging database named in config to the newest version and
 * applies the configured index options (payload_gin_index) and partitions.
 * Returns 0, or -1 after logging why.
 */
int wp_migrate_apply(const wp_config_t *config);

#endif /* WP_MIGRATE_H */
