#!/usr/bin/env bash
# A throw-away PostgreSQL cluster for diadb's tests and benchmarks.
#
#   scripts/postgres.sh install   apt-get install PostgreSQL when its binaries are missing (needs root)
#   scripts/postgres.sh up        initdb a fresh cluster in $DIADB_PG_DIR and start it (idempotent)
#   scripts/postgres.sh restart   pg_ctl restart (the fault-injection tests use it)
#   scripts/postgres.sh down      stop the cluster and delete its directory
#   scripts/postgres.sh status    is it running; prints the URL
#   scripts/postgres.sh url       prints the URL of the superuser connection
#
# Environment: DIADB_PG_DIR (default: /tmp/diadb-postgres-<port> as root, else <repo>/build/postgres),
# DIADB_PG_PORT (default 54329).
# The server listens on 127.0.0.1:$DIADB_PG_PORT and on a Unix socket in $DIADB_PG_DIR/sock, with
# trust authentication for local connections only (a throw-away test cluster), except the role
# diadb_password_user, which must give a password (scram-sha-256). initdb refuses to
# run as root, so as root the cluster belongs to the OS user `postgres` (created when missing).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
port="${DIADB_PG_PORT:-54329}"
if [[ -n "${DIADB_PG_DIR:-}" ]]; then
    dir="$DIADB_PG_DIR"
elif [[ "$(id -u)" == 0 ]]; then
    # As root the cluster belongs to the OS user postgres, which must reach its directory; a
    # clone may sit under a root-only directory (mktemp -d is 0700), so use /tmp, per port.
    dir="/tmp/diadb-postgres-$port"
else
    dir="$repo/build/postgres"
fi
data="$dir/data"
sock="$dir/sock"
log="$dir/server.log"
url="postgresql://postgres@127.0.0.1:$port/postgres"

say() { echo "postgres.sh: $*" >&2; }

find_bindir() {
    local d
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k4 -V -r); do
        if [[ -x "$d/initdb" && -x "$d/pg_ctl" ]]; then
            echo "$d"
            return 0
        fi
    done
    if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        dirname "$(command -v initdb)"
        return 0
    fi
    return 1
}

# Run a command as the cluster's owner (root cannot own a cluster).
as_owner() {
    if [[ "$(id -u)" == 0 ]]; then
        (cd "$dir" && runuser -u postgres -- "$@")
    else
        (cd "$dir" && "$@")
    fi
}

cmd_install() {
    if bindir="$(find_bindir)"; then
        say "PostgreSQL found in $bindir"
        return 0
    fi
    if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        say "WARNING: PostgreSQL is not installed and cannot be installed here (needs root and apt-get);"
        say "         the PostgreSQL tests will be skipped (or fail under DIADB_REQUIRE_SERVICES=1)"
        return 0
    fi
    say "installing PostgreSQL from Debian's packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends postgresql postgresql-contrib >/dev/null
    # Debian's package creates and starts a system cluster on port 5432; diadb does not use it.
    find_bindir >/dev/null || { say "PostgreSQL installed but initdb/pg_ctl not found"; return 1; }
}

is_running() {
    local bindir="$1"
    [[ -f "$data/PG_VERSION" ]] && as_owner "$bindir/pg_ctl" -D "$data" status >/dev/null 2>&1
}

wait_ready() {
    local bindir="$1" i
    for i in $(seq 1 120); do
        if "$bindir/pg_isready" -q -h 127.0.0.1 -p "$port" -U postgres -d postgres; then
            return 0
        fi
        sleep 0.5
    done
    say "server did not become ready; see $log"
    tail -n 20 "$log" >&2 || true
    return 1
}

cmd_up() {
    local bindir
    bindir="$(find_bindir)" || { say "PostgreSQL is not installed (run: $0 install)"; return 1; }
    mkdir -p "$dir"
    if [[ "$(id -u)" == 0 ]]; then
        id postgres >/dev/null 2>&1 || useradd --system --user-group --no-create-home --shell /usr/sbin/nologin postgres
        chown postgres: "$dir"
    fi
    if is_running "$bindir"; then
        wait_ready "$bindir"
        echo "$url"
        return 0
    fi
    rm -rf "$data" "$sock"
    mkdir -p "$sock"
    if [[ "$(id -u)" == 0 ]]; then
        chown postgres: "$sock"
        touch "$log" && chown postgres: "$log"
    fi
    as_owner "$bindir/initdb" -D "$data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 --no-sync >/dev/null
    # One role must authenticate with a password (the tests check that it never reaches metadata).
    sed -i '1i host all diadb_password_user 127.0.0.1/32 scram-sha-256' "$data/pg_hba.conf"
    cat >>"$data/postgresql.conf" <<EOF
# diadb throw-away test cluster
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$sock'
max_connections = 500
shared_buffers = 256MB
max_locks_per_transaction = 256
max_wal_size = 4GB
checkpoint_timeout = 15min
log_min_messages = warning
log_min_error_statement = panic
EOF
    as_owner "$bindir/pg_ctl" -D "$data" -l "$log" -w -t 120 start >/dev/null
    wait_ready "$bindir"
    echo "$url"
}

cmd_restart() {
    local bindir
    bindir="$(find_bindir)"
    as_owner "$bindir/pg_ctl" -D "$data" -l "$log" -m fast -w -t 120 restart >/dev/null
    wait_ready "$bindir"
}

cmd_down() {
    local bindir
    if bindir="$(find_bindir)" && is_running "$bindir"; then
        as_owner "$bindir/pg_ctl" -D "$data" -m fast -w -t 120 stop >/dev/null
    fi
    rm -rf "$dir"
}

cmd_status() {
    local bindir
    if bindir="$(find_bindir)" && is_running "$bindir"; then
        echo "running: $url (data in $data)"
    else
        echo "stopped"
        return 3
    fi
}

case "${1:-}" in
install) cmd_install ;;
up) cmd_up ;;
restart) cmd_restart ;;
down) cmd_down ;;
status) cmd_status ;;
url) echo "$url" ;;
*)
    echo "usage: $0 install|up|restart|down|status|url" >&2
    exit 2
    ;;
esac
