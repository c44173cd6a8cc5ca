#!/bin/sh
# Entrypoint of infra/compose/Dockerfile.postgres: the parts of the official postgres image's
# entrypoint this stack uses. Runs as the postgres user.
#   * POSTGRES_PASSWORD (required), POSTGRES_USER (default postgres), POSTGRES_DB (default: the user);
#   * on an empty data directory ($PGDATA): initdb (superuser POSTGRES_USER with that password),
#     create POSTGRES_DB, then run /docker-entrypoint-initdb.d/*.sh (executable: run, else sourced
#     in a subshell) and *.sql with a temporary server that listens on the Unix socket only;
#   * then `postgres` listening on all addresses, password (scram-sha-256) auth over TCP,
#     trust over the container-local Unix socket (pg_isready / psql inside the container).
set -eu

: "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD must be set}"
POSTGRES_USER=${POSTGRES_USER:-postgres}
POSTGRES_DB=${POSTGRES_DB:-$POSTGRES_USER}
PGDATA=${PGDATA:-/var/lib/postgresql/data}
export POSTGRES_USER POSTGRES_DB POSTGRES_PASSWORD PGDATA

if [ "$(id -u)" = 0 ]; then
    echo "docker-entrypoint: run this image as the postgres user" >&2
    exit 1
fi

if [ "${1:-postgres}" != postgres ]; then
    exec "$@"
fi
[ $# -gt 0 ] && shift

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    mkdir -p "$PGDATA"
    chmod 700 "$PGDATA"
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    initdb -D "$PGDATA" --username="$POSTGRES_USER" --pwfile="$pwfile" \
        --auth-local=trust --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8
    rm -f "$pwfile"
    printf '\n# docker-entrypoint: password auth from anywhere\nhost all all all scram-sha-256\n' \
        >> "$PGDATA/pg_hba.conf"

    pg_ctl -D "$PGDATA" -w -o "-c listen_addresses='' -c unix_socket_directories=/var/run/postgresql" start
    if [ "$POSTGRES_DB" != postgres ]; then
        # (psql -c does not interpolate variables; stdin does)
        echo 'CREATE DATABASE :"db";' | psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" \
            --dbname postgres -v db="$POSTGRES_DB"
    fi
    for f in /docker-entrypoint-initdb.d/*; do
        [ -e "$f" ] || continue
        case "$f" in
            *.sh)
                if [ -x "$f" ]; then echo "docker-entrypoint: running $f"; "$f"
                else echo "docker-entrypoint: sourcing $f"; (. "$f"); fi ;;
            *.sql)
                echo "docker-entrypoint: running $f"
                psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" -f "$f" ;;
            *) echo "docker-entrypoint: ignoring $f" ;;
        esac
    done
    pg_ctl -D "$PGDATA" -m fast -w stop
    echo "docker-entrypoint: database initialised"
fi

exec postgres -D "$PGDATA" -c listen_addresses='*' -c unix_socket_directories=/var/run/postgresql "$@"
