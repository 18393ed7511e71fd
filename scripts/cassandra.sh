#!/usr/bin/env bash
# A real Apache Cassandra 5.0 for diadb's tests, on Java 17, without Docker or the binary tarball.
#
#   scripts/cassandra.sh install                      resolve the server jars with Maven (cached)
#   scripts/cassandra.sh up     [--nodes 1|3]         start the node(s) not yet running, wait for CQL
#   scripts/cassandra.sh down   [--nodes 1|3]         stop the nodes this script started (by pid)
#   scripts/cassandra.sh status [--nodes 1|3]         pid, CQL port and, with --ring, nodetool status
#   scripts/cassandra.sh reset  [--nodes 1|3]         down, then delete that cluster's data and logs
#   scripts/cassandra.sh nodetool [--nodes N] [--node I] ARGS...   run nodetool against node I
#   scripts/cassandra.sh contact [--nodes N]          print "host1,host2:port" for a diadb URL
#
# One node (the main test suite): 127.0.0.1, CQL port 9042, storage port 7000, JMX 7199.
# Three nodes (replication and failure tests): 127.0.0.1/.2/.3, CQL port 9043, storage port 7001,
# JMX 7201/7202/7203, num_tokens 1 with balanced initial tokens, seed 127.0.0.1. The two
# clusters use different ports so both can run at once. Data and logs: build/cassandra/n<N>/node<I>.
# Environment: DIADB_CASSANDRA_DIR (data root), DIADB_CASSANDRA_CACHE (jar cache),
# DIADB_CASSANDRA_HEAP (default 2G for one node, 512M per node of three), DIADB_CASSANDRA_WAIT (seconds per node, default 180).
set -euo pipefail

VERSION=5.0.4
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
CACHE="${DIADB_CASSANDRA_CACHE:-$HOME/.cache/diadb/cassandra-$VERSION}"
LIB="$CACHE/lib"
ROOT="${DIADB_CASSANDRA_DIR:-$repo/build/cassandra}"
WAIT="${DIADB_CASSANDRA_WAIT:-180}"

die() { echo "cassandra.sh: $*" >&2; exit 1; }

cmd="${1:-}"
[[ -n "$cmd" ]] || die "usage: $0 install|up|down|status|reset|nodetool|contact [--nodes 1|3] [--node I] [--ring]"
shift
NODES=1
NODE=1
RING=0
REST=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --nodes) NODES="$2"; shift 2 ;;
        --node) NODE="$2"; shift 2 ;;
        --ring) RING=1; shift ;;
        *) REST+=("$1"); shift ;;
    esac
done
[[ "$NODES" == 1 || "$NODES" == 3 ]] || die "--nodes must be 1 or 3, got $NODES"
# A full-density visit (~15k rows of ~100 columns) kept a 512M node busy in old-generation
# collections (~1 s each, measured); the single node gets 2G, the 3-node test cluster stays small.
if [[ "$NODES" == 1 ]]; then HEAP="${DIADB_CASSANDRA_HEAP:-2G}"; else HEAP="${DIADB_CASSANDRA_HEAP:-512M}"; fi

if [[ "$NODES" == 1 ]]; then
    NATIVE_PORT=9042; STORAGE_PORT=7000; JMX_BASE=7198
else
    NATIVE_PORT=9043; STORAGE_PORT=7001; JMX_BASE=7200
fi
CLUSTER_DIR="$ROOT/n$NODES"
# Balanced Murmur3 tokens: -2**63 + i * 2**64 / NODES.
TOKENS_1=(-9223372036854775808)
TOKENS_3=(-9223372036854775808 -3074457345618258603 3074457345618258602)

ip_of() { echo "127.0.0.$1"; }
node_dir() { echo "$CLUSTER_DIR/node$1"; }
jmx_port() { echo $((JMX_BASE + $1)); }

EXTRA_FLAGS=()
if [[ "$NODES" == 1 ]]; then
    # The single test node only: schema changes are not flushed at once (they stay in the commit
    # log), which makes CREATE/DROP ~4x faster; the suite makes a keyspace per test. Not for the
    # 3-node cluster: a node killed with SIGKILL comes back with a stale schema (observed:
    # INCOMPATIBLE_SCHEMA read failures), which is what that cluster's tests do.
    EXTRA_FLAGS+=(-Dcassandra.test.flush_local_schema_changes=false)
fi
JVM_FLAGS=(
    "-Xms$HEAP" "-Xmx$HEAP" -Xss256k -XX:+UseG1GC -XX:ParallelGCThreads=1 -XX:ConcGCThreads=1
    -Dcassandra.available_processors=2 -Dcassandra.ring_delay_ms=5000
    -Dcassandra.skip_wait_for_gossip_to_settle=0 -Djava.net.preferIPv4Stack=true
    -Djdk.attach.allowAttachSelf=true -Dio.netty.tryReflectionSetAccessible=true
    --add-exports java.base/jdk.internal.misc=ALL-UNNAMED
    --add-exports java.base/jdk.internal.ref=ALL-UNNAMED
    --add-exports java.base/sun.nio.ch=ALL-UNNAMED
    --add-exports java.base/java.lang.ref=ALL-UNNAMED
    --add-exports java.rmi/sun.rmi.registry=ALL-UNNAMED
    --add-exports java.rmi/sun.rmi.server=ALL-UNNAMED
    --add-exports java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED
    --add-exports java.sql/java.sql=ALL-UNNAMED
    --add-exports jdk.unsupported/sun.misc=ALL-UNNAMED
    --add-opens java.base/java.lang=ALL-UNNAMED
    --add-opens java.base/java.lang.module=ALL-UNNAMED
    --add-opens java.base/java.lang.reflect=ALL-UNNAMED
    --add-opens java.base/java.io=ALL-UNNAMED
    --add-opens java.base/java.nio=ALL-UNNAMED
    --add-opens java.base/java.util=ALL-UNNAMED
    --add-opens java.base/sun.nio.ch=ALL-UNNAMED
    --add-opens java.base/jdk.internal.loader=ALL-UNNAMED
    --add-opens java.base/jdk.internal.ref=ALL-UNNAMED
    --add-opens java.base/jdk.internal.reflect=ALL-UNNAMED
    --add-opens java.base/jdk.internal.math=ALL-UNNAMED
    --add-opens java.base/jdk.internal.module=ALL-UNNAMED
    --add-opens java.base/jdk.internal.util.jar=ALL-UNNAMED
    --add-opens jdk.management/com.sun.management.internal=ALL-UNNAMED
)

install() {
    if [[ -f "$LIB/cassandra-all-$VERSION.jar" && -f "$LIB/jamm-0.4.0.jar" ]]; then
        return 0
    fi
    command -v mvn >/dev/null || die "Maven (mvn) is needed to fetch the Cassandra jars"
    command -v java >/dev/null || die "Java 17 is needed to run Cassandra"
    rm -rf "$LIB.tmp"
    mkdir -p "$CACHE"
    mvn -q -f "$here/cassandra/pom.xml" -Dcassandra.version="$VERSION" \
        dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$LIB.tmp"
    mv "$LIB.tmp" "$LIB"
    echo "Cassandra $VERSION jars in $LIB ($(ls "$LIB" | wc -l) files)"
}

alive() {  # pid file -> 0 if that process is a Cassandra daemon we started
    local pidfile="$1" pid
    [[ -f "$pidfile" ]] || return 1
    pid="$(cat "$pidfile")"
    [[ -n "$pid" && -r "/proc/$pid/cmdline" ]] || return 1
    tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q "CassandraDaemon" || return 1
    tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q -- "$(node_dir_of_pidfile "$pidfile")" || return 1
}
node_dir_of_pidfile() { dirname "$1"; }

port_open() { timeout 1 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; }

write_config() {
    local i="$1" dir ip token
    dir="$(node_dir "$i")"
    ip="$(ip_of "$i")"
    if [[ "$NODES" == 1 ]]; then token="${TOKENS_1[0]}"; else token="${TOKENS_3[$((i - 1))]}"; fi
    mkdir -p "$dir"/{data,commitlog,saved_caches,hints,cdc_raw,logs}
    cat > "$dir/cassandra.yaml" <<EOF
# Written by scripts/cassandra.sh: a light node for a 2-core test machine.
cluster_name: diadb-n$NODES
num_tokens: 1
initial_token: $token
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
auto_bootstrap: false
endpoint_snitch: SimpleSnitch
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "127.0.0.1:$STORAGE_PORT"
listen_address: $ip
rpc_address: $ip
storage_port: $STORAGE_PORT
native_transport_port: $NATIVE_PORT
start_native_transport: true
data_file_directories:
  - $dir/data
commitlog_directory: $dir/commitlog
saved_caches_directory: $dir/saved_caches
hints_directory: $dir/hints
cdc_raw_directory: $dir/cdc_raw
commitlog_sync: periodic
commitlog_sync_period: 10000ms
commitlog_segment_size: 32MiB
commitlog_total_space: 512MiB
concurrent_reads: 4
concurrent_writes: 4
concurrent_counter_writes: 4
concurrent_materialized_view_writes: 4
concurrent_compactors: 1
memtable_heap_space: 64MiB
memtable_offheap_space: 64MiB
auto_snapshot: false
hinted_handoff_enabled: true
max_hint_window: 3h
read_request_timeout: 10000ms
range_request_timeout: 20000ms
write_request_timeout: 5000ms
request_timeout: 20000ms
batch_size_warn_threshold: 256KiB
batch_size_fail_threshold: 1MiB
disk_failure_policy: stop
commit_failure_policy: stop
authenticator: AllowAllAuthenticator
authorizer: AllowAllAuthorizer
EOF
    cat > "$dir/logback.xml" <<'EOF'
<configuration scan="false">
  <appender name="FILE" class="ch.qos.logback.core.FileAppender">
    <file>${cassandra.logdir}/system.log</file>
    <encoder><pattern>%-5level [%thread] %date{ISO8601} %F:%L - %msg%n</pattern></encoder>
  </appender>
  <root level="INFO"><appender-ref ref="FILE"/></root>
  <logger name="org.apache.cassandra" level="INFO"/>
</configuration>
EOF
}

start_node() {
    local i="$1" dir
    dir="$(node_dir "$i")"
    if alive "$dir/pid"; then
        return 0
    fi
    write_config "$i"
    (
        cd "$dir"
        # setsid: the node outlives the caller's process group (pytest, a shell) until `down`.
        setsid java "${JVM_FLAGS[@]}" ${EXTRA_FLAGS[@]+"${EXTRA_FLAGS[@]}"} "-javaagent:$LIB/jamm-0.4.0.jar" \
            "-Dcassandra.jmx.local.port=$(jmx_port "$i")" \
            "-Dcassandra.config=file://$dir/cassandra.yaml" \
            "-Dcassandra.storagedir=$dir" "-Dcassandra.logdir=$dir/logs" \
            "-Dlogback.configurationFile=file://$dir/logback.xml" -Dcassandra-foreground=yes \
            -cp "$LIB/*" org.apache.cassandra.service.CassandraDaemon \
            > "$dir/logs/stdout.log" 2>&1 < /dev/null &
        echo $! > "$dir/pid"
    )
}

wait_node() {
    local i="$1" dir ip waited=0
    dir="$(node_dir "$i")"
    ip="$(ip_of "$i")"
    until port_open "$ip" "$NATIVE_PORT"; do
        if ! alive "$dir/pid"; then
            echo "cassandra.sh: node $i ($ip) exited during start; last log lines:" >&2
            tail -n 30 "$dir/logs/system.log" "$dir/logs/stdout.log" >&2 2>/dev/null || true
            exit 1
        fi
        if (( waited >= WAIT )); then
            echo "cassandra.sh: node $i ($ip) has no CQL port $NATIVE_PORT after ${WAIT}s" >&2
            tail -n 30 "$dir/logs/system.log" >&2 2>/dev/null || true
            exit 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
}

up() {
    install
    local i
    start_node 1
    wait_node 1
    for ((i = 2; i <= NODES; i++)); do start_node "$i"; done
    for ((i = 2; i <= NODES; i++)); do wait_node "$i"; done
    echo "Cassandra $VERSION: $NODES node(s) up, CQL at $(contact)"
}

down() {
    local i dir pid n
    for ((i = NODES; i >= 1; i--)); do
        dir="$(node_dir "$i")"
        if alive "$dir/pid"; then
            pid="$(cat "$dir/pid")"
            kill -TERM "$pid" 2>/dev/null || true
            for ((n = 0; n < 60; n++)); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.5
            done
            kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
        fi
        rm -f "$dir/pid"
    done
}

contact() {
    local i hosts=()
    for ((i = 1; i <= NODES; i++)); do hosts+=("$(ip_of "$i")"); done
    local IFS=,
    echo "${hosts[*]}:$NATIVE_PORT"
}

nodetool() {
    java "${JVM_FLAGS[@]/-Xms$HEAP/-Xms64M}" -Xmx256M -cp "$LIB/*" \
        -Dlogback.configurationFile="file://$(node_dir "$NODE")/logback.xml" \
        -Dcassandra.logdir="$(node_dir "$NODE")/logs" \
        org.apache.cassandra.tools.NodeTool -h 127.0.0.1 -p "$(jmx_port "$NODE")" "${REST[@]}"
}

status() {
    local i dir state=0
    for ((i = 1; i <= NODES; i++)); do
        dir="$(node_dir "$i")"
        if alive "$dir/pid"; then
            if port_open "$(ip_of "$i")" "$NATIVE_PORT"; then
                echo "node $i $(ip_of "$i"): pid $(cat "$dir/pid"), CQL port $NATIVE_PORT open"
            else
                echo "node $i $(ip_of "$i"): pid $(cat "$dir/pid"), CQL port $NATIVE_PORT not open yet"
                state=1
            fi
        else
            echo "node $i $(ip_of "$i"): not running"
            state=1
        fi
    done
    if [[ "$RING" == 1 && "$state" == 0 ]]; then REST=(status); nodetool; fi
    return "$state"
}

case "$cmd" in
    install) install ;;
    up) up ;;
    down) down ;;
    status) status ;;
    nodetool) nodetool ;;
    contact) contact ;;
    reset) down; rm -rf "$CLUSTER_DIR" ;;
    *) die "unknown command $cmd (install|up|down|status|nodetool|contact)" ;;
esac
