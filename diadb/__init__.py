"""diadb: an Alert Production Database for prompt processing in time-domain astronomy."""

from diadb.apdb import Apdb
from diadb.config import ApdbConfig
from diadb.errors import (
    BackendUnavailable,
    CatalogError,
    ConfigError,
    DuplicateVisitError,
    Error,
    SchemaError,
    SchemaVersionError,
    StorageError,
    UnknownIdError,
)
from diadb.sky.regions import Box, Circle, Polygon, Region

__version__ = "0.1.0"

__all__ = [
    "Apdb",
    "ApdbConfig",
    "BackendUnavailable",
    "Box",
    "CatalogError",
    "Circle",
    "ConfigError",
    "DuplicateVisitError",
    "Error",
    "Polygon",
    "Region",
    "SchemaError",
    "SchemaVersionError",
    "StorageError",
    "UnknownIdError",
    "__version__",
]
