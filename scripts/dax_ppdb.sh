#!/usr/bin/env bash
# Rubin's PPDB tools (lsst-dax-ppdb) for the tests that replicate diadb into a PPDB.
#
#   scripts/dax_ppdb.sh install   pip-install the pinned commit into .venv from a local git mirror
#   scripts/dax_ppdb.sh status    is the pinned commit installed
#
# lsst-dax-ppdb is not on the package index; its source is public on GitHub (lsst/dax_ppdb), which
# this machine cannot reach. A local clone or bare mirror of it is installed with pip (its own
# dependencies, lsst-dax-apdb, lsst-felis, google-cloud-bigquery, ..., come from the package index).
# None of its code is copied into this repository.
#
# Environment: DIADB_DAX_PPDB_GIT (the mirror; default /work/.mirror/lsst+dax_ppdb/repo),
# DIADB_DAX_PPDB_COMMIT (default: the commit pinned below), DIADB_VENV (default <repo>/.venv).
# No mirror: a loud warning, exit 0, and the PPDB tests skip naming the reason (they fail under
# DIADB_REQUIRE_SERVICES=1, as in CI). A failing pip install is an error.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
mirror="${DIADB_DAX_PPDB_GIT:-/work/.mirror/lsst+dax_ppdb/repo}"
# lsst/dax_ppdb main of 2026-07-21 (PR 53); requires-python says >= 3.12 but it runs on 3.11.
commit="${DIADB_DAX_PPDB_COMMIT:-96cec3ed74da74e3c602724745e71f4503729493}"
venv="${DIADB_VENV:-$repo/.venv}"
python="$venv/bin/python"

say() { echo "dax_ppdb.sh: $*" >&2; }

installed_commit() {
    "$python" - <<'PY' 2>/dev/null || true
import json
from importlib.metadata import distribution
try:
    text = distribution("lsst-dax-ppdb").read_text("direct_url.json") or "{}"
except Exception:
    text = "{}"
print(json.loads(text).get("vcs_info", {}).get("commit_id", ""))
PY
}

case "${1:-}" in
install)
    [[ -x "$python" ]] || { say "no $python: run 'make install' first"; exit 2; }
    if [[ "$(installed_commit)" == "$commit" ]]; then
        exit 0
    fi
    if [[ ! -d "$mirror" ]] || ! git -C "$mirror" cat-file -e "$commit^{commit}" 2>/dev/null; then
        say "WARNING: no git mirror of lsst/dax_ppdb with commit $commit at $mirror"
        say "WARNING: the PPDB replication tests (tests/test_dax_ppdb.py) will skip;"
        say "WARNING: set DIADB_DAX_PPDB_GIT to a clone of lsst/dax_ppdb to run them"
        exit 0
    fi
    say "installing lsst-dax-ppdb $commit from $mirror"
    "$python" -m pip install --quiet --ignore-requires-python \
        "lsst-dax-ppdb @ git+file://$mirror@$commit" "testing.postgresql>=1.3"
    [[ "$(installed_commit)" == "$commit" ]] || { say "install did not record commit $commit"; exit 1; }
    ;;
status)
    got="$(installed_commit)"
    if [[ "$got" == "$commit" ]]; then
        echo "lsst-dax-ppdb $commit"
    else
        say "lsst-dax-ppdb $commit not installed (found: ${got:-none})"
        exit 1
    fi
    ;;
*)
    echo "usage: $0 install|status" >&2
    exit 2
    ;;
esac
