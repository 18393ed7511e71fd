"""A seeded, vectorised visit simulator with the workload of the ap_proto prototype.

The model
    Pointings are uniform on a band of declination (``dec_range_deg``) or dithered around given
    field centres. A fixed population of variable sources (``source_density_per_deg2``) is
    drawn once over all the sky the pointings can reach and is re-detected in every visit whose
    field covers it; each visit adds Poisson(``false_per_visit``) one-off false detections,
    each a new DiaObject. Association is by construction: a detection carries its object's id.
    Forced photometry follows ap_proto's current model: in each visit, one DiaForcedSource for
    every object in the field that, as the pipeline reads it before the visit, has more than one
    DiaSource and a DiaSource within the last ``forced_window_days``.

The focal plane
    189 CCD tiles on the tangent plane of the pointing (:mod:`diadb.sim.focal_plane`); a row is
    detected by the one tile that contains it, a detector reads its tile padded by 52 arcsec.

Everything is a function of the seed: the population comes from ``(seed, 0)`` and visit ``i``
from ``(seed, 1, i)``, so two simulators with one config produce identical visits.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from diadb.errors import ConfigError
from diadb.schema.domain import MJD_MAX, MJD_MIN
from diadb.schema.model import ApdbSchema
from diadb.sim.fill import BANDS, fill_table
from diadb.sim.focal_plane import FocalPlane, band_area_deg2, cap_area_deg2, random_in_cap
from diadb.sim.visit import Visit
from diadb.sky.regions import Circle, unit_vectors

FloatArray = npt.NDArray[np.float64]
Int64Array = npt.NDArray[np.int64]
Int32Array = npt.NDArray[np.int32]

SECONDS_PER_DAY = 86400.0
#: Seconds from the visit's mid-point to its processing, for ``timeProcessedMjdTai``.
PROCESSING_DELAY_S = 60.0
# Height of the declination strips the population is indexed by: a field spans a few strips.
_STRIP_DEG = 1.0
_N_STRIPS = round(180.0 / _STRIP_DEG)


# ---- configuration -----------------------------------------------------------------------
@dataclass(frozen=True)
class SimConfig:
    """What the simulator produces. Times are MJD on the TAI scale; angles are degrees."""

    #: Seed of every random draw; equal configs give identical visits.
    seed: int = 1
    #: Seconds between the starts of consecutive visits within a night.
    visit_interval_s: float = 45.0
    #: Hours of observing per night; each night starts one day after the previous one.
    night_hours: float = 10.0
    #: Radius of the field of view (1.75 deg: a field ~3.5 deg across, 9.6 deg^2).
    fov_radius_deg: float = 1.75
    #: Variable sources per square degree of sky, re-detected in every visit covering them.
    source_density_per_deg2: float = 1040.0
    #: Mean (Poisson) number of one-off false detections per visit.
    false_per_visit: float = 5150.0
    #: Declination band of uniform pointings; used when ``field_centres_deg`` is empty.
    dec_range_deg: tuple[float, float] = (-90.0, 0.0)
    #: (ra, dec) of fields to point at (chosen uniformly per visit); empty means uniform pointings.
    field_centres_deg: tuple[tuple[float, float], ...] = ()
    #: Pointings are uniform within this radius of the chosen field centre.
    dither_deg: float = 0.0
    #: Forced photometry only for objects with a DiaSource within this many days.
    forced_window_days: float = 30.0
    #: MJD (TAI) of the first visit.
    start_mjd: float = 60000.0
    #: In (0, 1]: multiplies the source density and the false detections, for small runs.
    scale: float = 1.0
    #: Padding of each detector's read region beyond its tile.
    padding_arcsec: float = 52.0

    def __post_init__(self) -> None:
        checks = [
            (self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
            (self.visit_interval_s > 0, f"visit_interval_s must be > 0, got {self.visit_interval_s}"),
            (0 < self.night_hours <= 24, f"night_hours must be in (0, 24], got {self.night_hours}"),
            (
                self.night_hours * 3600.0 >= self.visit_interval_s,
                "night_hours must hold at least one visit_interval_s",
            ),
            (0 < self.fov_radius_deg < 45, f"fov_radius_deg must be in (0, 45), got {self.fov_radius_deg}"),
            (self.source_density_per_deg2 >= 0, "source_density_per_deg2 must be >= 0"),
            (self.false_per_visit >= 0, "false_per_visit must be >= 0"),
            (0 <= self.dither_deg < 45, f"dither_deg must be in [0, 45), got {self.dither_deg}"),
            (self.forced_window_days >= 0, "forced_window_days must be >= 0"),
            (
                MJD_MIN <= self.start_mjd <= MJD_MAX,
                f"start_mjd must lie in [{MJD_MIN:g}, {MJD_MAX:g}] (MJD TAI), got {self.start_mjd}",
            ),
            (0 < self.scale <= 1, f"scale must be in (0, 1], got {self.scale}"),
            (self.padding_arcsec >= 0, "padding_arcsec must be >= 0"),
        ]
        lo, hi = self.dec_range_deg
        checks.append(
            (-90 <= lo < hi <= 90, f"dec_range_deg must satisfy -90 <= lo < hi <= 90, got {lo}, {hi}")
        )
        for ra, dec in self.field_centres_deg:
            checks.append(
                (0 <= ra < 360 and -90 <= dec <= 90, f"field centre ({ra}, {dec}) is not on the sky")
            )
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"SimConfig: {message}")

    @property
    def visits_per_night(self) -> int:
        return int(self.night_hours * 3600.0 // self.visit_interval_s)

    def visit_mjd(self, index: npt.ArrayLike) -> FloatArray:
        """MJD (TAI) of the visits with these 0-based indices."""
        i = np.asarray(index, dtype=np.int64)
        night, slot = np.divmod(i, self.visits_per_night)
        mjd: FloatArray = self.start_mjd + night + slot * (self.visit_interval_s / SECONDS_PER_DAY)
        return mjd


# ---- the population of variable sources --------------------------------------------------
def _strip_of(dec_deg: FloatArray) -> Int64Array:
    strips: Int64Array = np.clip(np.floor((dec_deg + 90.0) / _STRIP_DEG), 0, _N_STRIPS - 1).astype(np.int64)
    return strips


class _Population:
    """Positions of the variable sources, indexed by declination strip then ra, with their state.

    Object ``i`` (0-based, in this order) has ``diaObjectId = i + 1``. State is what the
    pipeline would read from the database: DiaSources so far and the first/last visit index
    that detected it (-1: never), kept as int32 so a full-sky population stays ~28 bytes/object.
    """

    def __init__(self, ra_deg: FloatArray, dec_deg: FloatArray, *, ordered: bool = False) -> None:
        strip = _strip_of(dec_deg)
        if not ordered:
            order = np.lexsort((ra_deg, strip))
            ra_deg, dec_deg, strip = ra_deg[order], dec_deg[order], strip[order]
        self.ra: FloatArray = np.ascontiguousarray(ra_deg)
        self.dec: FloatArray = np.ascontiguousarray(dec_deg)
        self.strip_start: Int64Array = np.searchsorted(strip, np.arange(_N_STRIPS + 1)).astype(np.int64)
        n = len(self.ra)
        self.n_sources: Int32Array = np.zeros(n, dtype=np.int32)
        self.first_visit: Int32Array = np.full(n, -1, dtype=np.int32)
        self.last_visit: Int32Array = np.full(n, -1, dtype=np.int32)

    def __len__(self) -> int:
        return len(self.ra)

    @classmethod
    def draw(cls, config: SimConfig) -> _Population:
        rng = np.random.default_rng([config.seed, 0])
        density = config.source_density_per_deg2 * config.scale
        ras: list[FloatArray] = []
        decs: list[FloatArray] = []
        if not config.field_centres_deg:
            # Fields of pointings at the band's edges reach one field radius beyond it.
            lo = max(-90.0, config.dec_range_deg[0] - config.fov_radius_deg)
            hi = min(90.0, config.dec_range_deg[1] + config.fov_radius_deg)
            # Drawn strip by strip, each sorted by ra, so the index needs no global sort
            # (a full-sky population has ~20 million sources).
            for s in range(int(_strip_of(np.array([lo]))[0]), int(_strip_of(np.array([hi]))[0]) + 1):
                s_lo = max(lo, -90.0 + s * _STRIP_DEG)
                s_hi = min(hi, -90.0 + (s + 1) * _STRIP_DEG)
                if s_hi <= s_lo:
                    continue
                n = int(rng.poisson(density * band_area_deg2(s_lo, s_hi)))
                sin_lo, sin_hi = math.sin(math.radians(s_lo)), math.sin(math.radians(s_hi))
                dec = np.degrees(np.arcsin(np.clip(sin_lo + rng.random(n) * (sin_hi - sin_lo), -1.0, 1.0)))
                ra = np.sort(rng.random(n) * 360.0)
                # Rounding can put a source drawn at a strip's edge into the next strip; the
                # index needs every source in its own strip, and losing one changes nothing.
                own = _strip_of(dec) == s
                ras.append(ra[own])
                decs.append(dec[own])
            return cls(np.concatenate(ras), np.concatenate(decs), ordered=True)
        radius = config.fov_radius_deg + config.dither_deg + 1e-6
        cos_r = math.cos(math.radians(radius))
        centres = np.asarray(config.field_centres_deg, dtype=np.float64)
        for k, (ra0, dec0) in enumerate(config.field_centres_deg):
            n = int(rng.poisson(density * cap_area_deg2(radius)))
            ra, dec = random_in_cap(rng, n, ra0, dec0, radius)
            # Overlapping caps would double the density: keep a point only in its first cap.
            if k:
                earlier = unit_vectors(centres[:k, 0], centres[:k, 1])
                fresh = np.all(unit_vectors(ra, dec) @ earlier.T < cos_r, axis=1)
                ra, dec = ra[fresh], dec[fresh]
            ras.append(ra)
            decs.append(dec)
        return cls(np.concatenate(ras), np.concatenate(decs))

    def in_field(self, field: Circle) -> Int64Array:
        """Sorted indices of the sources inside ``field``."""
        r = field.radius_deg
        lo_dec, hi_dec = max(-90.0, field.dec_deg - r), min(90.0, field.dec_deg + r)
        if abs(field.dec_deg) + r >= 89.999:
            intervals = [(0.0, 360.0)]
        else:
            # Widest ra extent of a cap not containing a pole, plus a hair for rounding.
            dra = math.degrees(math.asin(math.sin(math.radians(r)) / math.cos(math.radians(field.dec_deg))))
            a, b = field.ra_deg - dra - 1e-6, field.ra_deg + dra + 1e-6
            if a < 0.0:
                intervals = [(a + 360.0, 360.0), (0.0, b)]
            elif b >= 360.0:
                intervals = [(a, 360.0), (0.0, b - 360.0)]
            else:
                intervals = [(a, b)]
        pieces: list[Int64Array] = []
        first, last = _strip_of(np.array([lo_dec, hi_dec]))
        # A handful of strips times at most two ra intervals: each is one contiguous slice.
        for s in range(int(first), int(last) + 1):
            start, end = int(self.strip_start[s]), int(self.strip_start[s + 1])
            ras = self.ra[start:end]
            for a, b in intervals:
                i0 = int(np.searchsorted(ras, a, side="left"))
                i1 = int(np.searchsorted(ras, b, side="right"))
                pieces.append(np.arange(start + i0, start + i1, dtype=np.int64))
        if not pieces:
            return np.zeros(0, dtype=np.int64)
        candidates = np.unique(np.concatenate(pieces))
        inside = field.contains(self.ra[candidates], self.dec[candidates])
        found: Int64Array = candidates[inside]
        return found


class _Detections(NamedTuple):
    """One visit's draws that change the simulator's state (see ``VisitSimulator._detect``)."""

    visit_index: int
    visit_id: int
    rng: np.random.Generator
    mjd: float
    ra0: float
    dec0: float
    band: str
    field: Circle
    idx: Int64Array
    forced_idx: Int64Array
    forced_det: npt.NDArray[Any]
    ids: Int64Array
    ra: FloatArray
    dec: FloatArray
    det: npt.NDArray[np.int16]
    n_src: Int32Array
    first: FloatArray
    source_ids: Int64Array
    forced_ids: Int64Array
    real_x: FloatArray
    real_y: FloatArray
    f_x: FloatArray
    f_y: FloatArray


class VisitSimulator:
    """Produces the visits of :class:`SimConfig`'s model in order; see the module docstring."""

    def __init__(self, config: SimConfig, schema: ApdbSchema) -> None:
        self.config = config
        self.schema = schema
        self.focal_plane = FocalPlane(config.fov_radius_deg, config.padding_arcsec)
        self._population = _Population.draw(config)
        self._next_index = 0
        # False objects get ids after the population's, so ids never collide.
        self._next_false_id = len(self._population) + 1
        self._next_source_id = 1
        self._next_forced_id = 1

    @property
    def population_size(self) -> int:
        """Number of variable sources in the fixed population."""
        return len(self._population)

    @property
    def visits_done(self) -> int:
        """How many visits this simulator has produced so far."""
        return self._next_index

    def visits(self, n: int) -> Iterator[Visit]:
        """The next ``n`` visits (a second call continues where the first stopped)."""
        for _ in range(n):
            yield self.next_visit()

    def _pointing(self, rng: np.random.Generator) -> tuple[float, float]:
        cfg = self.config
        if not cfg.field_centres_deg:
            s_lo, s_hi = (math.sin(math.radians(d)) for d in cfg.dec_range_deg)
            ra = float(rng.random() * 360.0)
            dec = math.degrees(math.asin(min(1.0, max(-1.0, s_lo + rng.random() * (s_hi - s_lo)))))
            return ra, dec
        ra0, dec0 = cfg.field_centres_deg[int(rng.integers(len(cfg.field_centres_deg)))]
        if cfg.dither_deg <= 0.0:
            return float(ra0), float(dec0)
        dithered_ra, dithered_dec = random_in_cap(rng, 1, ra0, dec0, cfg.dither_deg)
        return float(dithered_ra[0]), float(dithered_dec[0])

    def skip(self, n: int) -> None:
        """Advance past the next ``n`` visits without making their tables: the state (what each
        object has had detected, the next ids) ends as if they had been produced (a benchmark
        continuing on a database built with :mod:`diadb.sim.build`)."""
        for _ in range(n):
            self._detect()
            self._next_index += 1

    def _detect(self) -> _Detections:
        """The next visit's detections and forced photometry; updates the population's state and
        the id counters (not the visit index). The rest of its random stream fills the tables."""
        cfg = self.config
        index = self._next_index
        visit_id = index + 1
        rng = np.random.default_rng([cfg.seed, 1, index])
        mjd = float(cfg.visit_mjd(index))
        ra0, dec0 = self._pointing(rng)
        band = str(BANDS[int(rng.integers(len(BANDS)))])
        field = Circle(ra0, dec0, cfg.fov_radius_deg)
        pop = self._population

        # The whole population in the field is re-detected, except what falls between tiles.
        idx = pop.in_field(field)
        real_det, real_x, real_y = self.focal_plane.assign(pop.ra[idx], pop.dec[idx], ra0, dec0)
        on_tile = real_det >= 0
        idx, real_det, real_x, real_y = idx[on_tile], real_det[on_tile], real_x[on_tile], real_y[on_tile]

        # Forced photometry is decided from the state before this visit, as the pipeline reads it.
        n_before = pop.n_sources[idx]
        last_before = pop.last_visit[idx]
        recent = (last_before >= 0) & (
            mjd - cfg.visit_mjd(np.maximum(last_before, 0)) < cfg.forced_window_days
        )
        wanted = (n_before > 1) & recent
        forced_idx, forced_det = idx[wanted], real_det[wanted]

        pop.n_sources[idx] += 1
        pop.first_visit[idx] = np.where(pop.first_visit[idx] < 0, index, pop.first_visit[idx])
        pop.last_visit[idx] = index

        # False detections are one-off objects: never re-detected, so they never get forced photometry.
        n_false = int(rng.poisson(cfg.false_per_visit * cfg.scale))
        f_ra, f_dec = random_in_cap(rng, n_false, ra0, dec0, cfg.fov_radius_deg)
        keep = field.contains(f_ra, f_dec)
        f_det, f_x, f_y = self.focal_plane.assign(f_ra[keep], f_dec[keep], ra0, dec0)
        on_tile = f_det >= 0
        f_ra, f_dec = f_ra[keep][on_tile], f_dec[keep][on_tile]
        f_det, f_x, f_y = f_det[on_tile], f_x[on_tile], f_y[on_tile]
        n_f = len(f_ra)
        false_ids = np.arange(self._next_false_id, self._next_false_id + n_f, dtype=np.int64)
        self._next_false_id += n_f

        ids = np.concatenate([idx + 1, false_ids])
        ra = np.concatenate([pop.ra[idx], f_ra])
        dec = np.concatenate([pop.dec[idx], f_dec])
        det = np.concatenate([real_det, f_det]).astype(np.int16)
        n_src = np.concatenate([pop.n_sources[idx], np.ones(n_f, dtype=np.int32)]).astype(np.int32)
        first = np.concatenate([cfg.visit_mjd(pop.first_visit[idx]), np.full(n_f, mjd)])
        n = len(ids)
        source_ids = np.arange(self._next_source_id, self._next_source_id + n, dtype=np.int64)
        self._next_source_id += n
        n_forced = len(forced_idx)
        forced_ids = np.arange(self._next_forced_id, self._next_forced_id + n_forced, dtype=np.int64)
        self._next_forced_id += n_forced

        return _Detections(
            index,
            visit_id,
            rng,
            mjd,
            ra0,
            dec0,
            band,
            field,
            idx,
            forced_idx,
            forced_det,
            ids,
            ra,
            dec,
            det,
            n_src,
            first,
            source_ids,
            forced_ids,
            real_x,
            real_y,
            f_x,
            f_y,
        )

    def next_visit(self) -> Visit:
        d = self._detect()
        pop = self._population
        rng, mjd, band, visit_id = d.rng, d.mjd, d.band, d.visit_id
        ra0, dec0, field = d.ra0, d.dec0, d.field
        forced_idx, forced_det, ids, ra, dec, det = d.forced_idx, d.forced_det, d.ids, d.ra, d.dec, d.det
        n_src, first, source_ids, forced_ids = d.n_src, d.first, d.source_ids, d.forced_ids
        real_x, real_y, f_x, f_y = d.real_x, d.real_y, d.f_x, d.f_y
        n = len(ids)
        n_forced = len(forced_idx)
        processed = mjd + PROCESSING_DELAY_S / SECONDS_PER_DAY
        objects = fill_table(
            self.schema.table("DiaObject"),
            n,
            rng,
            {
                "diaObjectId": ids,
                "ra": ra,
                "dec": dec,
                "validityStartMjdTai": np.full(n, mjd),
                "validityEndMjdTai": pa.nulls(n, pa.float64()),
                "nDiaSources": n_src,
                "firstDiaSourceMjdTai": first,
                "lastDiaSourceMjdTai": np.full(n, mjd),
            },
        )
        sources = fill_table(
            self.schema.table("DiaSource"),
            n,
            rng,
            {
                "diaSourceId": source_ids,
                "visit": np.full(n, visit_id, dtype=np.int64),
                "detector": det,
                "diaObjectId": ids,
                "ssObjectId": pa.nulls(n, pa.int64()),
                "parentDiaSourceId": pa.nulls(n, pa.int64()),
                "midpointMjdTai": np.full(n, mjd),
                "ra": ra,
                "dec": dec,
                "x": np.concatenate([real_x, f_x]).astype(np.float32),
                "y": np.concatenate([real_y, f_y]).astype(np.float32),
                "band": pa.array(np.full(n, band, dtype=object), pa.string()),
                "timeProcessedMjdTai": np.full(n, processed),
                "timeWithdrawnMjdTai": pa.nulls(n, pa.float64()),
            },
        )
        forced = fill_table(
            self.schema.table("DiaForcedSource"),
            n_forced,
            rng,
            {
                "diaForcedSourceId": forced_ids,
                "diaObjectId": forced_idx + 1,
                "ra": pop.ra[forced_idx],
                "dec": pop.dec[forced_idx],
                "visit": np.full(n_forced, visit_id, dtype=np.int64),
                "detector": forced_det.astype(np.int16),
                "midpointMjdTai": np.full(n_forced, mjd),
                "band": pa.array(np.full(n_forced, band, dtype=object), pa.string()),
                "timeProcessedMjdTai": np.full(n_forced, processed),
                "timeWithdrawnMjdTai": pa.nulls(n_forced, pa.float64()),
            },
        )
        self._next_index += 1
        return Visit(
            visit=visit_id,
            mjd_tai=mjd,
            pointing=(ra0, dec0),
            band=band,
            region=field,
            objects=objects,
            sources=sources,
            forced_sources=forced,
            focal_plane=self.focal_plane,
        )
