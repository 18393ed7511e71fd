"""Sky regions and HEALPix order-29 pixel ranges."""

from diadb.sky.healpix import ORDER, radec_to_healpix29
from diadb.sky.regions import Box, Circle, Polygon, Region, as_region, parse_region

__all__ = ["ORDER", "Box", "Circle", "Polygon", "Region", "as_region", "parse_region", "radec_to_healpix29"]
