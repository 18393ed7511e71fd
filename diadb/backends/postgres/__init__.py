"""A shared PostgreSQL (>= 15) server: many detector processes write and read at once.

URL: ``postgresql://user@host:port/dbname?schema=NAME&partition_days=30&pool_size=4&packed=1``
(see :mod:`~diadb.backends.postgres.url`). Every table lives in the schema ``NAME`` (default
``public``), which ``create`` makes. Credentials come from libpq only (``PGPASSWORD``,
``~/.pgpass``, a service file); a URL that carries a secret is refused.

The engine is composed of parts that each get the :class:`~.connection.Connection` (the pool,
retries, the transaction runner) and what else they need:

- :mod:`.layout`: DDL, metadata, time partitions of DiaSource/DiaForcedSource, cluster, grants,
  stats, layout upgrades;
- :mod:`.store`: a visit's store in one idempotent transaction;
- :mod:`.read`: region/time reads through binary ``COPY``, key lookups;
- :mod:`.changelog`: the change log (replica chunks) in commit order;
- :mod:`.daytime`: the daytime updates (the algebra is :mod:`diadb.updates`'s);
- :mod:`.backend`: ``PostgresBackend``, the composition root implementing the protocol.

In schemas made with ``packed=1`` (the default), the fixed-width columns that no query filters
on and no update changes live in one ``apdb_packed`` BYTEA per row (see
:mod:`diadb.backends.common.packing`): a read's cost is per value sent through binary ``COPY``,
and a DiaSource row becomes ~20 values instead of 103. The packed list is frozen in the
metadata (``postgres.packed_columns``); schemas made before it, or with ``packed=0``, have none.

Importing this package loads no driver: the connection imports ADBC's when the backend opens.
"""

from diadb.backends.postgres.backend import PostgresBackend

__all__ = ["PostgresBackend"]
