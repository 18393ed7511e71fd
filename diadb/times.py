"""Visit times: diadb works in MJD on the TAI scale, as the APDB schema's ``*MjdTai`` columns do."""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass
from typing import Any

from diadb.errors import ConfigError

#: Days in one month of history, the reference implementation's convention.
DAYS_PER_MONTH = 30.0


def mjd_tai(when: Any) -> float:
    """MJD (TAI) of a float MJD TAI, an ``astropy.time.Time`` or a ``datetime`` (naive means UTC)."""
    if isinstance(when, bool):
        raise ConfigError(f"not a time: {when!r}")
    if isinstance(when, int | float):
        value = float(when)
    elif isinstance(when, _dt.datetime):
        from astropy.time import Time

        dt = when if when.tzinfo is None else when.astimezone(_dt.UTC).replace(tzinfo=None)
        value = float(Time(dt, scale="utc").tai.mjd)
    elif hasattr(when, "tai") and hasattr(when, "mjd"):
        value = float(when.tai.mjd)
    else:
        raise ConfigError(f"not a time: {when!r} (give MJD TAI as a float, an astropy Time or a datetime)")
    if not math.isfinite(value):
        raise ConfigError(f"time must be finite, got {value}")
    return value


@dataclass(frozen=True)
class TimeWindow:
    """``start < time <= end`` in MJD TAI (either bound may be open-ended as +-inf)."""

    start: float
    end: float
