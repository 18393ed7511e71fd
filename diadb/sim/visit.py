"""One simulated visit (:class:`Visit`): its catalogs, its region and time, and its split into the
189 detectors' shares (what each of the pipeline's per-detector jobs reads and stores).
:class:`diadb.sim.model.VisitSimulator` makes them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from diadb.errors import ConfigError
from diadb.sim.focal_plane import N_DETECTORS, FocalPlane
from diadb.sky.regions import Region

Int64Array = npt.NDArray[np.int64]


def _split_rows(table: pa.Table, detectors: Int64Array) -> list[pa.Table]:
    """One slice of ``table`` per detector id 0..N-1 (rows with -1 are left out)."""
    order = np.argsort(detectors, kind="stable")
    ordered = table.take(pa.array(order))
    bounds = np.searchsorted(detectors[order], np.arange(N_DETECTORS + 1), side="left")
    return [ordered.slice(int(bounds[d]), int(bounds[d + 1] - bounds[d])) for d in range(N_DETECTORS)]


def _to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    data: bytes = sink.getvalue().to_pybytes()
    return data


def _from_ipc(data: bytes) -> pa.Table:
    table: pa.Table = pa.ipc.open_stream(pa.py_buffer(data)).read_all()
    return table


_TABLE_FIELDS = ("objects", "sources", "forced_sources")


def _int_column(table: pa.Table, name: str) -> Int64Array:
    return np.asarray(table.column(name).to_numpy(), dtype=np.int64)


@dataclass(frozen=True)
class Visit:
    """One visit (``detector=None``) or one detector's share of it, ready for ``Apdb.store``.

    Every table has every schema column. ``objects`` holds one new version of each object
    detected here; ``region`` is the field (a Circle) or the detector's padded tile.
    """

    visit: int
    mjd_tai: float
    #: (ra, dec) of the field centre, degrees.
    pointing: tuple[float, float]
    band: str
    region: Region
    objects: pa.Table
    sources: pa.Table
    forced_sources: pa.Table
    focal_plane: FocalPlane
    detector: int | None = None

    # Pickled (to send a detector's share to a worker process) through Arrow IPC: pickling a
    # sliced Arrow table would carry the whole visit's buffers, 189 times over.
    def __getstate__(self) -> dict[str, object]:
        state: dict[str, object] = dict(self.__dict__)
        for name in _TABLE_FIELDS:
            state[name] = _to_ipc(getattr(self, name))
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        for name, value in state.items():
            if name in _TABLE_FIELDS and isinstance(value, bytes):
                value = _from_ipc(value)
            object.__setattr__(self, name, value)

    def _object_detectors(self) -> Int64Array:
        """Each object's detector: that of its DiaSource in this visit (-1 if it has none)."""
        obj_ids = _int_column(self.objects, "diaObjectId")
        src_ids = _int_column(self.sources, "diaObjectId")
        src_det = _int_column(self.sources, "detector")
        if not len(src_ids):
            return np.full(len(obj_ids), -1, dtype=np.int64)
        order = np.argsort(src_ids, kind="stable")
        sorted_ids = src_ids[order]
        pos = np.clip(np.searchsorted(sorted_ids, obj_ids), 0, len(sorted_ids) - 1)
        found = sorted_ids[pos] == obj_ids
        result: Int64Array = np.where(found, src_det[order][pos], -1)
        return result

    def _whole(self) -> None:
        if self.detector is not None:
            raise ConfigError(f"visit {self.visit} is already detector {self.detector}'s share")

    def for_detector(self, detector: int) -> Visit:
        """The rows on ``detector`` and the objects whose DiaSources are there."""
        self._whole()
        region = self.focal_plane.region(detector, *self.pointing)
        obj_mask = self._object_detectors() == detector
        src_mask = _int_column(self.sources, "detector") == detector
        forced_mask = _int_column(self.forced_sources, "detector") == detector
        return replace(
            self,
            detector=detector,
            region=region,
            objects=self.objects.filter(pa.array(obj_mask)),
            sources=self.sources.filter(pa.array(src_mask)),
            forced_sources=self.forced_sources.filter(pa.array(forced_mask)),
        )

    def split_by_detector(self) -> list[Visit]:
        """:meth:`for_detector` of every detector (0..188, empty ones included), sorting once."""
        self._whole()
        objects = _split_rows(self.objects, self._object_detectors())
        sources = _split_rows(self.sources, _int_column(self.sources, "detector"))
        forced = _split_rows(self.forced_sources, _int_column(self.forced_sources, "detector"))
        return [
            replace(
                self,
                detector=d,
                region=poly,
                objects=objects[d],
                sources=sources[d],
                forced_sources=forced[d],
            )
            for d, poly in self.focal_plane.regions(*self.pointing)
        ]


__all__ = ["Visit"]
