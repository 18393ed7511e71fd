"""Which latest-object rows changed since the DiaObject snapshot was written (PostgreSQL).

Statement-level triggers with transition tables note every changed ``diaObjectId`` in
``diadb_object_changed`` (one INSERT per statement, not per row: a store replaces thousands).
Each note carries a number from a sequence, renewed by every later change of the object: a
compaction forgets only the notes it read, *at the number it read* (:func:`forget_sql`). Stores
run while a compaction writes the snapshot, and under READ COMMITTED a plain ``DELETE`` would
also remove a note written after the compaction read that object's row, leaving the snapshot's
older version in place of the newer one with nothing to say so.
"""

from __future__ import annotations

from diadb.backends.common.names import LATEST_TABLE
from diadb.backends.postgres.connection import Connection, q

CHANGED_TABLE = "diadb_object_changed"
CHANGE_SEQUENCE = "diadb_object_change_seq"
FUNCTION = "diadb_note_object_changes"


def _notes_ddl(conn: Connection) -> list[str]:
    """The table, its sequence and the trigger function (idempotent; also the upgrade of a
    table made before the numbers)."""
    changed, seq = conn.t(CHANGED_TABLE), conn.t(CHANGE_SEQUENCE)
    body = (
        f'BEGIN INSERT INTO {changed} ("diaObjectId", seq) SELECT DISTINCT "diaObjectId", '
        f"nextval('{seq}') FROM changed_rows ON CONFLICT (\"diaObjectId\") DO UPDATE SET seq = EXCLUDED.seq; "
        "RETURN NULL; END"
    )
    return [
        f"CREATE SEQUENCE IF NOT EXISTS {seq}",
        f'CREATE TABLE IF NOT EXISTS {changed} ("diaObjectId" BIGINT PRIMARY KEY)',
        f"ALTER TABLE {changed} ADD COLUMN IF NOT EXISTS seq BIGINT NOT NULL DEFAULT 0",
        f"CREATE OR REPLACE FUNCTION {conn.t(FUNCTION)}() RETURNS trigger LANGUAGE plpgsql "
        f"AS $body${body}$body$",
    ]


def tracking_ddl(conn: Connection) -> list[str]:
    """Change tracking of the latest-object table: the notes and one trigger per event."""
    latest = conn.t(LATEST_TABLE)
    ddl = _notes_ddl(conn)
    for event, rows in (("INSERT", "NEW"), ("UPDATE", "NEW"), ("DELETE", "OLD")):
        name = q(f"diadb_object_changed_{event.lower()}")
        ddl.append(f"DROP TRIGGER IF EXISTS {name} ON {latest}")
        ddl.append(
            f"CREATE TRIGGER {name} AFTER {event} ON {latest} REFERENCING {rows} TABLE AS changed_rows "
            f"FOR EACH STATEMENT EXECUTE FUNCTION {conn.t(FUNCTION)}()"
        )
    return ddl


def upgrade_ddl(conn: Connection) -> list[str]:
    """For tracking made before the numbers: they are added; the triggers stay."""
    return _notes_ddl(conn)


def numbered_sql(conn: Connection) -> str:
    """Whether the notes carry numbers (a query returning one boolean)."""
    return (
        "SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = $1::text "
        f"AND table_name = '{CHANGED_TABLE}' AND column_name = 'seq')"
    )


def forget_sql(conn: Connection) -> str:
    """Forget the notes read (``$1`` ids, ``$2`` their numbers) that no change renewed since."""
    return (
        f"DELETE FROM {conn.t(CHANGED_TABLE)} c USING unnest($1::bigint[], $2::bigint[]) AS k(id, seq) "
        'WHERE c."diaObjectId" = k.id AND c.seq = k.seq'
    )
