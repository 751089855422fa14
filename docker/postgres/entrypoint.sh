#!/bin/sh
# Starts PostgreSQL 15 for docker/compose.yaml.  On an empty $PGDATA it first runs initdb and
# creates the role $PG_USER (LOGIN REPLICATION, password $PG_PASSWORD) and the database $PG_DB
# owned by it.  Then it runs the server in the foreground on $PG_PORT, listening on
# $PG_LISTEN, with wal_level=logical; clients authenticate with scram-sha-256.
# Arguments are passed to postgres (-c name=value ...).
set -eu
: "${PG_PORT:=5432}" "${PG_LISTEN:=127.0.0.1}" "${PG_DB:=app}" "${PG_USER:=walpipe}"
: "${PG_PASSWORD:?PG_PASSWORD must be set}"

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  pwfile="$(mktemp)"
  printf '%s\n' "$PG_PASSWORD" >"$pwfile"
  initdb -D "$PGDATA" -U postgres --encoding=UTF8 --locale=C.UTF-8 \
    --auth-local=peer --auth-host=scram-sha-256 --pwfile="$pwfile" >/dev/null
  rm -f "$pwfile"
  cat >>"$PGDATA/pg_hba.conf" <<HBA
host    replication     all             all                     scram-sha-256
host    all             all             all                     scram-sha-256
HBA
  # First start on the Unix socket only, to create the role and the database.
  sock="$(mktemp -d)"
  pg_ctl -D "$PGDATA" -w -o "-c listen_addresses='' -k $sock -p $PG_PORT" start >/dev/null
  psql -v ON_ERROR_STOP=1 -h "$sock" -p "$PG_PORT" -U postgres -d postgres -q \
    -v user="$PG_USER" -v pw="$PG_PASSWORD" -v db="$PG_DB" <<'SQL'
CREATE ROLE :"user" LOGIN REPLICATION PASSWORD :'pw';
CREATE DATABASE :"db" OWNER :"user";
SQL
  pg_ctl -D "$PGDATA" -w -m fast stop >/dev/null
  rmdir "$sock"
  echo "walpipe-postgres: initialized $PGDATA (database $PG_DB, role $PG_USER)"
fi

exec postgres -D "$PGDATA" -p "$PG_PORT" -c listen_addresses="$PG_LISTEN" \
  -c unix_socket_directories=/tmp -c wal_level=logical "$@"
