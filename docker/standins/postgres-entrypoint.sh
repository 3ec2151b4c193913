#!/bin/bash
# As the official image's entrypoint, for what a compose file uses: flags alone mean the
# server's; at first start (an empty PGDATA) initdb makes the superuser POSTGRES_USER with
# POSTGRES_PASSWORD and the database POSTGRES_DB, and password logins are allowed from any
# address; then the server runs as the postgres user. /docker-entrypoint-initdb.d is not run.
set -euo pipefail
[ "${1:0:1}" = - ] && set -- postgres "$@"
if [ "$1" != postgres ]; then
    exec "$@"
fi
if [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA" /var/run/postgresql
    chown postgres:postgres "$PGDATA" /var/run/postgresql
    chmod 700 "$PGDATA"
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ]; then
        echo "error: the database is uninitialized and POSTGRES_PASSWORD is not set" >&2
        exit 1
    fi
    user="${POSTGRES_USER:-postgres}"
    database="${POSTGRES_DB:-$user}"
    initdb --username="$user" --pwfile=<(printf '%s\n' "$POSTGRES_PASSWORD") \
        --auth-local=trust --auth-host=scram-sha-256 --encoding=UTF8 ${POSTGRES_INITDB_ARGS:-} >/dev/null
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
    echo "listen_addresses = '*'" >>"$PGDATA/postgresql.conf"
    # A private server on the socket only, to create the database, as the official image does.
    pg_ctl -D "$PGDATA" -w -o "-c listen_addresses=''" start >/dev/null
    if [ "$database" != postgres ]; then
        psql -v ON_ERROR_STOP=1 --username "$user" --dbname postgres \
            -c "CREATE DATABASE \"$database\"" >/dev/null
    fi
    pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
    echo "PostgreSQL init process complete; ready for start up."
fi
exec "$@"
