"""The configuration that points an ``lsst.dax.apdb`` client at diadb, and its registration.

A pipeline that builds its APDB with ``lsst.dax.apdb.Apdb.from_uri(path)`` (or
``Apdb.from_config(config)``) switches to diadb with a YAML file like::

    implementation_type: diadb
    db_url: sqlite:////data/apdb.db

The reference's factory chooses an implementation by the exact type of the config object
(``ApdbSqlConfig`` or ``ApdbCassandraConfig``) and by the YAML's ``implementation_type``; it has
no plugin registry. :func:`register` wraps its three factory functions so that a
:class:`DiadbApdbConfig`, or ``implementation_type: diadb``, makes diadb's facade; every other
config still goes to the reference unchanged. :mod:`diadb.compat.dax` calls it with the facade
when it is imported (this module knows the facade only as that argument: it imports nothing of
the facade's).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from lsst.dax.apdb import ApdbConfig
from pydantic import Field

#: The ``implementation_type`` a YAML file names to get diadb.
IMPLEMENTATION_TYPE = "diadb"
#: The reference's default schema location; diadb then uses the same file, shipped by lsst-sdm-schemas.
DEFAULT_SCHEMA = "resource://lsst.sdm.schemas/apdb.yaml"


class DiadbApdbConfig(ApdbConfig):
    """``lsst.dax.apdb`` configuration for diadb (``implementation_type: diadb``).

    The fields of ``ApdbConfig`` keep their meaning (``schema_file``, ``read_sources_months``,
    ``read_forced_sources_months``, ``enable_replica``, ``replica_chunk_seconds``).
    """

    _implementation_type: ClassVar[str] = IMPLEMENTATION_TYPE

    db_url: str = Field(
        description=(
            "diadb database URL: a SQLite path or sqlite:///path, postgresql://..., cassandra://... "
            "(see the diadb README)."
        ),
    )
    diadb_config: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "Options of diadb.ApdbConfig used when the database is created (e.g. sqlite_synchronous, "
            "history_tier); they are frozen into the database and ignored afterwards."
        ),
    )
    dia_object_columns: list[str] = Field(
        default_factory=list,
        description="DiaObject columns getDiaObjects returns; empty means all columns of the schema.",
    )


_MARK = "_diadb_wrapped"


def _wrap(original: Callable[..., Any], replacement: Callable[..., Any]) -> Callable[..., Any]:
    if getattr(original, _MARK, False):
        return original
    setattr(replacement, _MARK, True)
    replacement.__wrapped__ = original  # type: ignore[attr-defined]
    replacement.__doc__ = original.__doc__
    return replacement


def register(facade: Callable[[DiadbApdbConfig], Any]) -> None:
    """Teach ``lsst.dax.apdb``'s factory to make ``facade(config)`` (an ``Apdb``) of a
    :class:`DiadbApdbConfig` (idempotent: a second call changes nothing)."""
    import lsst.dax.apdb.apdb as dax_apdb_module
    import lsst.dax.apdb.apdbReplica as dax_replica_module
    import lsst.dax.apdb.config as dax_config_module
    import lsst.dax.apdb.factory as dax_factory

    make_apdb = dax_factory.make_apdb
    make_apdb_replica = dax_factory.make_apdb_replica
    config_type_for_name = dax_factory.config_type_for_name

    def diadb_make_apdb(config: Any) -> Any:
        if isinstance(config, DiadbApdbConfig):
            return facade(config)
        return make_apdb(config)

    def diadb_make_apdb_replica(config: Any) -> Any:
        if isinstance(config, DiadbApdbConfig):
            return facade(config).get_replica()
        return make_apdb_replica(config)

    def diadb_config_type_for_name(type_name: str) -> Any:
        if type_name == IMPLEMENTATION_TYPE:
            return DiadbApdbConfig
        return config_type_for_name(type_name)

    new_make = _wrap(make_apdb, diadb_make_apdb)
    new_replica = _wrap(make_apdb_replica, diadb_make_apdb_replica)
    new_type = _wrap(config_type_for_name, diadb_config_type_for_name)
    # The factory module, and the reference's modules that imported these functions by name.
    for module, name, function in (
        (dax_factory, "make_apdb", new_make),
        (dax_factory, "make_apdb_replica", new_replica),
        (dax_factory, "config_type_for_name", new_type),
        (dax_apdb_module, "make_apdb", new_make),
        (dax_replica_module, "make_apdb_replica", new_replica),
        (dax_config_module, "config_type_for_name", new_type),
    ):
        setattr(module, name, function)


__all__ = ["DEFAULT_SCHEMA", "IMPLEMENTATION_TYPE", "DiadbApdbConfig", "register"]
