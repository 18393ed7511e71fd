"""The distributed engine: Apache Cassandra through the DataStax driver (imported only when a
backend is made). See :mod:`.layout` for the tables and :mod:`.changelog` for the change log."""

from diadb.backends.cassandra.backend import CassandraBackend

__all__ = ["CassandraBackend"]
