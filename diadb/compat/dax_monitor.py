"""The facade's monitoring records: the reference's own ``MonAgent`` and ``Timer``, with the
reference's metric names and tags, so dashboards fed by ``apdb-cli metrics log-to-influx`` keep
working after a pipeline switches to diadb.

``DAX_APDB_MONITOR_CONFIG`` configures them as for the reference (``logging:<logger>[:LEVEL]``
handlers, agent filters); the agent is named ``lsst.dax.apdb.diadb``. Records:

* ``select_time`` (tags ``table``, ``method``; value ``row_count``) for each read;
* ``insert_time`` (tag ``table``; value ``row_count``) per table of a ``store``. diadb writes
  the three tables in one transaction: each record carries the whole store's times;
* ``contains_visit_detector_time``, ``source_reassign_time`` (value ``source_count``) and
  ``update_time`` (tags ``table``, ``method``; value ``row_count``) for the daytime calls.

Each record's values hold ``real``, ``user`` and ``sys`` seconds, as the reference's ``Timer``
makes them.
"""

from __future__ import annotations

from collections.abc import Mapping

from lsst.dax.apdb.monitor import MonAgent
from lsst.dax.apdb.timer import Timer

#: The agent name of the facade's records (``DAX_APDB_MONITOR_CONFIG`` filters use it).
AGENT_NAME = "lsst.dax.apdb.diadb"
_MON = MonAgent(AGENT_NAME)


def timer(name: str, table: str | None = None, method: str | None = None) -> Timer:
    """A reference ``Timer`` reporting to the facade's agent."""
    tags: dict[str, str | int] = {}
    if table is not None:
        tags["table"] = table
    if method is not None:
        tags["method"] = method
    return Timer(name, _MON, tags=tags or None)


def store_records(done: Timer, rows: Mapping[str, int]) -> None:
    """One ``insert_time`` record per table of a finished store, with that table's rows."""
    times = done.as_dict()
    for table, count in rows.items():
        _MON.add_record("insert_time", values={**times, "row_count": count}, tags={"table": table})


__all__ = ["AGENT_NAME", "store_records", "timer"]
