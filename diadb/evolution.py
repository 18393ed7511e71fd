"""Schema evolution: upgrading a database's diadb layout and its Felis schema in place.

Versions are ``major.minor.patch``. diadb's layout: a different major is refused; a database
of an older minor must be upgraded (``diadb upgrade``); a newer minor opens read-only.
A Felis schema may evolve within its major version by adding nullable columns; removing a
column, changing a type or adding a non-nullable column needs a new database.
"""

from __future__ import annotations

from pathlib import Path

from diadb.backends import open_backend
from diadb.config import LAYOUT_VERSION
from diadb.errors import SchemaVersionError
from diadb.schema.felis import load_schema, schema_from_yaml
from diadb.schema.model import ApdbSchema

STORED_TABLES = ("DiaObject", "DiaSource", "DiaForcedSource")


def version_tuple(text: str) -> tuple[int, int, int]:
    try:
        parts = [*(int(p) for p in text.split(".")[:3]), 0, 0, 0]
    except ValueError:
        raise SchemaVersionError(f"not a version: {text!r}") from None
    return parts[0], parts[1], parts[2]


def upgrade(url: str, schema: str | Path | None = None) -> list[str]:
    """Bring the database at ``url`` to this diadb's layout and, when given, to a newer Felis
    schema. Returns the steps taken (empty when there was nothing to do)."""
    backend = open_backend(url, create=False)
    try:
        meta = backend.read_metadata()
        if "diadb.layout_version" not in meta:
            raise SchemaVersionError(f"{url} is not a diadb APDB (no diadb metadata)")
        have_text = meta["diadb.layout_version"]
        have, mine = version_tuple(have_text), version_tuple(LAYOUT_VERSION)
        if have[0] != mine[0]:
            raise SchemaVersionError(
                f"{url} has layout {have_text}; this diadb cannot upgrade across major versions"
            )
        if have > mine:
            raise SchemaVersionError(
                f"{url} has layout {have_text}, newer than this diadb's {LAYOUT_VERSION}"
            )
        steps: list[str] = []
        if have[:2] < mine[:2]:
            steps += backend.upgrade_layout(have_text)
        if have != mine:
            backend.set_metadata({"diadb.layout_version": LAYOUT_VERSION})
        if schema is not None:
            old = schema_from_yaml(meta["felis.schema_yaml"], origin=f"{url} (frozen schema)")
            new = load_schema(schema)
            steps += evolve_schema(backend, old, new)
            backend.set_metadata(
                {
                    "felis.schema_yaml": new.yaml_text,
                    "felis.schema_version": new.version,
                    "felis.schema_name": new.name,
                }
            )
        return steps
    finally:
        backend.close()


def evolve_schema(backend: object, old: ApdbSchema, new: ApdbSchema) -> list[str]:
    """Add the new nullable columns of ``new``; refuse any other difference."""
    if version_tuple(new.version)[0] != version_tuple(old.version)[0]:
        raise SchemaVersionError(
            f"schema {new.name} {new.version} changes the major version of {old.version}: make a new database"
        )
    if version_tuple(new.version) < version_tuple(old.version):
        raise SchemaVersionError(f"schema version {new.version} is older than the database's {old.version}")
    plan = []
    for table in STORED_TABLES:
        before, after = old.table(table), new.table(table)
        removed = [c for c in before.column_names if c not in after]
        if removed:
            raise SchemaVersionError(f"{table}: schema {new.version} removes columns {removed}")
        changed = [c.name for c in before.columns if after.column(c.name).datatype != c.datatype]
        if changed:
            raise SchemaVersionError(f"{table}: schema {new.version} changes the type of {changed}")
        added = [c for c in after.columns if c.name not in before]
        required = [c.name for c in added if not c.nullable]
        if required:
            raise SchemaVersionError(
                f"{table}: schema {new.version} adds non-nullable columns {required}; "
                "existing rows have no value"
            )
        if added:
            plan.append((table, added))
    steps = []
    for table, added in plan:
        backend.add_columns(table, added)  # type: ignore[attr-defined]
        steps.append(f"{table}: added nullable column(s) {[c.name for c in added]}")
    if not steps and new.version != old.version:
        steps.append(f"schema version {old.version} -> {new.version} (no column changes)")
    return steps
