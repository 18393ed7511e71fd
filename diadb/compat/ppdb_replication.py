"""``diadb-ppdb-replication``: Rubin's ``ppdb-replication`` command with diadb's facade registered.

lsst-dax-ppdb's command opens the APDB with ``lsst.dax.apdb.ApdbReplica.from_uri``, which knows
diadb's config files (``implementation_type: diadb``) once :mod:`diadb.compat.dax` is imported.
This command imports it and runs the reference's own ``main`` (same subcommands and options:
``list-chunks-apdb``, ``list-chunks-ppdb``, ``run``); nothing else differs. Needs lsst-dax-ppdb
(not on the package index; see README, "Rubin's PPDB tools").
"""

from __future__ import annotations

import sys


def main() -> None:
    """Run ``ppdb-replication`` with ``implementation_type: diadb`` APDB configs understood."""
    import diadb.compat.dax  # noqa: F401  (registers the facade with lsst.dax.apdb's factories)

    try:
        from lsst.dax.ppdb.cli.ppdb_replication import main as reference_main
    except ImportError as e:
        sys.exit(f"diadb-ppdb-replication: lsst-dax-ppdb is not installed ({e}); see README")
    reference_main()


if __name__ == "__main__":
    main()
