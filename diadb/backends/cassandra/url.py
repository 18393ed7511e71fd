"""Cassandra URLs and diadb's options in them (no driver import: ``diadb.backends.locate`` and
``diadb.sim.reference`` read a URL on machines without the driver)."""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from diadb.backends.base import Location
from diadb.errors import ConfigError

DEFAULT_PORT = 9042
#: Cassandra's own rule for keyspace names (48 characters since 4.x).
_KEYSPACE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,47}$")
CONSISTENCY_LEVELS = ("ONE", "TWO", "THREE", "QUORUM", "LOCAL_QUORUM", "LOCAL_ONE", "EACH_QUORUM", "ALL")
OPTION_NAMES = frozenset(
    {
        "rf",
        "consistency",
        "read_consistency",
        "write_consistency",
        "pixel_order",
        "time_partition_days",
        "id_bucket_bits",
        "auto_partitions",
        "concurrency",
        "batch_bytes",
        "timeout",
        "max_slices",
        "scan_pixels",
        "scan_splits",
        "speculative_retry",
        "gc_grace_seconds",
        "compaction",
        "compression",
        "packed",
    }
)


@dataclass(frozen=True)
class CassandraUrl:
    hosts: tuple[str, ...]
    port: int
    keyspace: str
    params: dict[str, str]


def parse_url(url: str) -> CassandraUrl:
    """``cassandra://host1,host2:9042/keyspace?rf=3&consistency=QUORUM``."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.split("+", 1)[0].lower() != "cassandra":
        raise ConfigError(f"not a Cassandra URL: {url!r}")
    netloc = parts.netloc
    port = DEFAULT_PORT
    if ":" in netloc.rsplit(",", 1)[-1]:
        netloc, port_text = netloc.rsplit(":", 1)
        try:
            port = int(port_text)
        except ValueError:
            raise ConfigError(f"bad port {port_text!r} in {url!r}") from None
    hosts = tuple(h for h in netloc.split(",") if h)
    keyspace = parts.path.lstrip("/")
    if not hosts or not keyspace:
        raise ConfigError(
            f"Cassandra URL {url!r} needs hosts and a keyspace: cassandra://host1,host2:9042/ks"
        )
    if not _KEYSPACE_RE.match(keyspace):
        raise ConfigError(f"bad keyspace name {keyspace!r}: letters, digits and _, at most 48, letter first")
    params = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    return CassandraUrl(hosts, port, keyspace, params)


def locate(url: str) -> Location:
    """The cluster's contact points and the keyspace (diadb's options kept apart)."""
    parsed = parse_url(url)
    return Location(
        scheme="cassandra",
        hosts=parsed.hosts,
        port=parsed.port,
        namespace=parsed.keyspace,
        options=dict(parsed.params),
    )


@dataclass(frozen=True)
class Options:
    """diadb's options of a Cassandra URL. The layout ones (``pixel_order``,
    ``time_partition_days``, ``id_bucket_bits``, ``packed``, ``rf``) apply at creation only:
    they are frozen into ``diadb_metadata`` and the URL's values are ignored on open."""

    rf: int | None
    read_consistency: str | None
    write_consistency: str | None
    pixel_order: int
    time_partition_days: float
    id_bucket_bits: int
    auto_partitions: bool
    concurrency: int
    batch_bytes: int
    timeout: float
    max_slices: int
    scan_pixels: int
    scan_splits: int
    speculative_retry: str
    #: Table options an operator sets (None: Cassandra's defaults), given to every table this
    #: client creates, like ``speculative_retry``.
    gc_grace_seconds: int | None
    compaction: str | None
    compression: bool
    packed: bool


def parse_options(params: Mapping[str, Any]) -> Options:
    """The options of a URL's query (and of keyword arguments), checked; ConfigError if not."""
    unknown = sorted(set(params) - OPTION_NAMES)
    if unknown:
        raise ConfigError(f"unknown Cassandra option(s) {unknown}; known: {sorted(OPTION_NAMES)}")

    def cl(name: str) -> str | None:
        value = params.get(name, params.get("consistency"))
        if value is None:
            return None
        text = str(value).upper()
        if text not in CONSISTENCY_LEVELS:
            raise ConfigError(f"{name} must be one of {CONSISTENCY_LEVELS}, got {value!r}")
        return text

    def number(name: str, default: float, lo: float, hi: float, kind: type = int) -> Any:
        try:
            value = kind(params.get(name, default))
        except (TypeError, ValueError):
            raise ConfigError(f"Cassandra option {name} must be a number, got {params[name]!r}") from None
        if not (lo <= value <= hi):
            raise ConfigError(f"Cassandra option {name} must be in [{lo}, {hi}], got {value}")
        return value

    compression = str(params.get("compression", "none")).lower()
    if compression not in ("none", "lz4"):
        raise ConfigError(f"compression must be none or lz4, got {compression!r}")
    auto = str(params.get("auto_partitions", "1")).lower()
    if auto not in ("1", "0", "true", "false", "yes", "no"):
        raise ConfigError(f"auto_partitions must be true or false, got {auto!r}")
    packed = str(params.get("packed", "1")).lower()
    if packed not in ("1", "0", "true", "false", "yes", "no"):
        raise ConfigError(f"packed must be true or false, got {packed!r}")
    return Options(
        rf=None if params.get("rf") is None else number("rf", 1, 1, 20),
        read_consistency=cl("read_consistency"),
        write_consistency=cl("write_consistency"),
        pixel_order=number("pixel_order", 6, 0, 14),
        time_partition_days=number("time_partition_days", 30.0, 0.01, 3650.0, float),
        id_bucket_bits=number("id_bucket_bits", 16, 0, 40),
        auto_partitions=auto in ("1", "true", "yes"),
        concurrency=number("concurrency", 16, 1, 2048),
        batch_bytes=number("batch_bytes", 40_000, 1_000, 10_000_000),
        timeout=number("timeout", 60.0, 1.0, 3600.0, float),
        max_slices=number("max_slices", 8, 1, 1000),
        scan_pixels=number("scan_pixels", 2000, 1, 10_000_000),
        scan_splits=number("scan_splits", 32, 1, 100_000),
        speculative_retry=_speculative(str(params.get("speculative_retry", "MIN(99p,50ms)"))),
        gc_grace_seconds=None
        if params.get("gc_grace_seconds") is None
        else number("gc_grace_seconds", 864000, 0, 10 * 365 * 86400),
        compaction=_compaction(params.get("compaction")),
        compression=compression == "lz4",
        packed=packed in ("1", "true", "yes"),
    )


#: The compaction strategies a table may be created with (Cassandra 5's own).
COMPACTION_STRATEGIES = (
    "SizeTieredCompactionStrategy",
    "LeveledCompactionStrategy",
    "TimeWindowCompactionStrategy",
    "UnifiedCompactionStrategy",
)


def _compaction(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value)
    if text not in COMPACTION_STRATEGIES:
        raise ConfigError(f"compaction must be one of {COMPACTION_STRATEGIES}, got {text!r}")
    return text


def _speculative(text: str) -> str:
    # The value is pasted into CREATE TABLE ... WITH speculative_retry = '...': only its grammar.
    if not re.fullmatch(r"(?i)[A-Z0-9(),.\s]+", text):
        raise ConfigError(f"speculative_retry {text!r} is not a Cassandra speculative_retry value")
    return text
