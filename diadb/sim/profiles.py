"""The named sizes of ``diadb bench`` and ``diadb build``: one simulator config each."""

from __future__ import annotations

from dataclasses import dataclass

from diadb.sim.model import SimConfig

# Three fields 15 deg apart, chosen at random per visit: with one visit a night each spot
# is revisited about 120 times in 12 months (ap_proto's model: ~134).
_FIELDS = ((40.0, -30.0), (55.0, -30.0), (70.0, -30.0))


@dataclass(frozen=True)
class Profile:
    """A named benchmark size."""

    name: str
    visits: int
    sim: SimConfig
    #: Reads of the systems beside diadb are slow at depth: they read every this many visits
    #: (and on the last); they store every visit.
    reference_read_every: int
    description: str


def _patch(scale: float, seed: int = 1) -> SimConfig:
    return SimConfig(
        seed=seed,
        scale=scale,
        field_centres_deg=_FIELDS,
        dither_deg=0.3,
        night_hours=1.0,
        visit_interval_s=3600.0,  # one visit per night: 12 months of revisits in a few hundred visits
    )


PROFILES = {
    "ci": Profile("ci", 8, _patch(0.01), 1, "seconds; used by the tests"),
    "demo": Profile("demo", 90, _patch(0.05), 3, "a minute or two; run by make demo"),
    "year": Profile("year", 420, _patch(1.0), 20, "12-month revisit depth at full density; up to an hour"),
}


__all__ = ["PROFILES", "Profile"]
