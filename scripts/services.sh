#!/usr/bin/env bash
# Installs what the server-backed tests need. Each engine has its own script
# (scripts/<engine>.sh install|up|down|status); the tests start and stop the servers.
# scripts/dax_ppdb.sh installs Rubin's PPDB tools (lsst-dax-ppdb) from a local git mirror.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
for engine in postgres cassandra dax_ppdb; do
    if [[ -x "$here/$engine.sh" ]]; then
        "$here/$engine.sh" install
    fi
done
