"""``ApdbMetadata`` and ``ApdbAdmin`` of the ``lsst.dax.apdb`` facade (:mod:`diadb.compat.dax`).

The metadata is diadb's user metadata (key/value strings kept in the database); the admin
interface names diadb's spatial and time keys.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable
from typing import TYPE_CHECKING

import numpy as np
from lsst.dax.apdb.apdbAdmin import ApdbAdmin, DiaForcedSourceLocator, DiaObjectLocator, DiaSourceLocator
from lsst.dax.apdb.apdbMetadata import ApdbMetadata

from diadb.sky.healpix import radec_to_healpix29
from diadb.times import DAYS_PER_MONTH

if TYPE_CHECKING:
    import diadb


class DiadbApdbMetadata(ApdbMetadata):
    """``ApdbMetadata`` on diadb's metadata: key/value strings kept in the database.

    diadb's own keys (``diadb.*``, ``felis.*``) are not shown and cannot be changed here.
    """

    def __init__(self, db: diadb.Apdb) -> None:
        self._db = db

    def _all(self) -> dict[str, str]:
        return self._db.user_metadata()

    def get(self, key: str, default: str | None = None) -> str | None:
        return self._all().get(key, default)

    def set(self, key: str, value: str, *, force: bool = False) -> None:
        if not key or not value:
            raise ValueError("Empty key or value are not allowed")
        if not force and key in self._all():
            raise KeyError(f"Metadata key {key!r} already exists")
        self._db.set_user_metadata({key: value})

    def delete(self, key: str) -> bool:
        if key not in self._all():
            return False
        self._db.set_user_metadata({key: None})
        return True

    def items(self) -> Generator[tuple[str, str], None, None]:
        yield from self._all().items()

    def empty(self) -> bool:
        return not self._all()


class DiadbApdbAdmin(ApdbAdmin):
    """``ApdbAdmin``: diadb's spatial key is the HEALPix order-29 nested pixel (``_healpix_29``)."""

    def __init__(self, db: diadb.Apdb) -> None:
        self._db = db

    def apdb_part(self, ra_deg: float, dec_deg: float) -> int:
        return int(radec_to_healpix29(np.array([ra_deg]), np.array([dec_deg]))[0])

    def apdb_time_part(self, midpointMjdTai: float) -> int:
        # diadb's engines partition time by days of MJD TAI (30 days per partition by default).
        return int(np.floor(midpointMjdTai / DAYS_PER_MONTH))

    def delete_records(
        self,
        objects: Iterable[DiaObjectLocator],
        sources: Iterable[DiaSourceLocator],
        forced_sources: Iterable[DiaForcedSourceLocator],
    ) -> None:
        # diadb.Apdb has no deletion of single records (withdrawals and validity ends instead).
        raise NotImplementedError("diadb does not delete single records; withdraw them instead")


__all__ = ["DiadbApdbAdmin", "DiadbApdbMetadata"]
