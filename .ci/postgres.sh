#!/usr/bin/env bash
# Install (if absent) and start a local PostgreSQL for the storage tests and benchmark.
#
# Idempotent: safe to run again; it only does what is missing. Listens on 127.0.0.1 only.
# Creates the role and database `sphinx_test` (a throwaway test credential, not a secret),
# so the suite can use:
#   SPHINX_TEST_PG_URL=postgresql+psycopg2://sphinx_test:sphinx_test@127.0.0.1:5432/sphinx_test
# The port can be changed with PG_PORT (only when the cluster is first created).
set -euo pipefail

PG_USER=sphinx_test
PG_DB=sphinx_test
PG_PORT="${PG_PORT:-5432}"

as_postgres() { runuser -u postgres -- "$@"; }

if ! command -v pg_ctlcluster >/dev/null 2>&1 || [ -z "$(ls /usr/lib/postgresql 2>/dev/null)" ]; then
    echo "postgres.sh: installing PostgreSQL from Debian packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq postgresql >/dev/null
fi

PG_VERSION="$(ls /usr/lib/postgresql | sort -V | tail -n 1)"
CLUSTER=main

if ! pg_lsclusters -h | awk '{print $1" "$2}' | grep -qx "$PG_VERSION $CLUSTER"; then
    echo "postgres.sh: creating cluster $PG_VERSION/$CLUSTER on port $PG_PORT"
    pg_createcluster --port "$PG_PORT" "$PG_VERSION" "$CLUSTER" >/dev/null
fi
PG_PORT="$(pg_lsclusters -h | awk -v v="$PG_VERSION" -v c="$CLUSTER" '$1==v && $2==c {print $3}')"

# Local-only server; enough connections for the concurrency tests (12 writers + pools).
# Written to conf.d (included by Debian's postgresql.conf) so the main file stays untouched.
CONF_DIR="/etc/postgresql/$PG_VERSION/$CLUSTER/conf.d"
CONF="$CONF_DIR/sphinx-test.conf"
WANTED="listen_addresses = '127.0.0.1'
max_connections = 200"
changed=0
if [ "$(cat "$CONF" 2>/dev/null)" != "$WANTED" ]; then
    mkdir -p "$CONF_DIR"
    printf '%s\n' "$WANTED" > "$CONF"
    changed=1
fi

status="$(pg_lsclusters -h | awk -v v="$PG_VERSION" -v c="$CLUSTER" '$1==v && $2==c {print $4}')"
if [ "$status" != "online" ]; then
    echo "postgres.sh: starting cluster $PG_VERSION/$CLUSTER"
    pg_ctlcluster "$PG_VERSION" "$CLUSTER" start
elif [ "$changed" = 1 ]; then
    echo "postgres.sh: restarting cluster $PG_VERSION/$CLUSTER for the new settings"
    pg_ctlcluster "$PG_VERSION" "$CLUSTER" restart
fi

for _ in $(seq 1 60); do
    if pg_isready -q -h 127.0.0.1 -p "$PG_PORT"; then break; fi
    sleep 0.5
done
pg_isready -q -h 127.0.0.1 -p "$PG_PORT" || { echo "postgres.sh: server did not become ready" >&2; exit 1; }

psql_admin() { as_postgres psql -p "$PG_PORT" -X -q -v ON_ERROR_STOP=1 "$@"; }

if [ "$(psql_admin -tAc "SELECT 1 FROM pg_roles WHERE rolname = '$PG_USER'")" != "1" ]; then
    psql_admin -c "CREATE ROLE $PG_USER LOGIN PASSWORD '$PG_USER'"
fi
if [ "$(psql_admin -tAc "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'")" != "1" ]; then
    psql_admin -c "CREATE DATABASE $PG_DB OWNER $PG_USER"
fi

echo "postgres.sh: PostgreSQL $PG_VERSION ready on 127.0.0.1:$PG_PORT, database $PG_DB, role $PG_USER"
