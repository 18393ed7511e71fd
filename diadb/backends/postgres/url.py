"""PostgreSQL URLs: libpq's URI plus diadb's own options (no driver import: see
``diadb.backends.locate``).

``postgresql://user@host:port/dbname?schema=NAME&partition_days=30&pool_size=4&retry_seconds=120&packed=1``.
diadb reads the options named in :data:`DIADB_PARAMS`; every other query parameter is a libpq
connection parameter. Secrets are refused: a password (``user:secret@``, ``password=``) or a
client key's passphrase (``sslpassword=``) in the URL would reach the frozen metadata, error
messages and logs; libpq reads them from ``PGPASSWORD``, ``~/.pgpass`` or a service file
instead. No error message here contains the URL unmasked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from diadb.backends.base import Location
from diadb.errors import ConfigError

#: URL query parameters read by diadb; every other one goes to libpq.
DIADB_PARAMS = ("schema", "partition_days", "pool_size", "retry_seconds", "packed")
#: libpq parameters that carry a secret (``passfile`` is a path, not a secret).
SECRET_PARAMS = ("password", "sslpassword")
DEFAULT_SCHEMA = "public"
DEFAULT_POOL_SIZE = 4
DEFAULT_RETRY_SECONDS = 120.0
#: PostgreSQL truncates identifiers to NAMEDATALEN - 1 bytes: two longer schema names that share
#: their first 63 bytes would silently name the same schema, hence the same APDB.
MAX_IDENTIFIER_BYTES = 63
_WHERE_SECRETS_GO = (
    "give it to libpq through PGPASSWORD, ~/.pgpass (PGPASSFILE) or a service file (PGSERVICEFILE)"
)
_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")


def masked(url: str) -> str:
    """``url`` with any secret replaced by ``***``: the only form of a URL an error may show."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            user, _, hosts = netloc.rpartition("@")
            if ":" in user:
                user = user.split(":", 1)[0] + ":***"
            netloc = f"{user}@{hosts}"
        query = [
            (k, "***" if k.lower() in SECRET_PARAMS else v)
            for k, v in parse_qsl(parts.query, keep_blank_values=True)
        ]
        return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query, safe="*"), ""))
    except ValueError:
        return "(an unparsable URL)"


def parse_url(url: str) -> tuple[str, dict[str, str]]:
    """Split a diadb PostgreSQL URL into the libpq URI and diadb's own options.

    Refuses a secret in the URL (user info, ``password=``, ``sslpassword=``): libpq reads it
    from ``PGPASSWORD``, ``~/.pgpass`` or a service file instead, and diadb never sees it.
    """
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        raise ConfigError("not a PostgreSQL URL (postgresql://user@host:port/dbname?schema=NAME)") from None
    scheme = parts.scheme.split("+", 1)[0].lower()
    if scheme != "postgresql":
        raise ConfigError(
            f"not a PostgreSQL URL (postgresql://user@host:port/dbname?schema=NAME): {masked(url)}"
        )
    if password is not None:
        raise ConfigError(
            f"the URL {masked(url)} carries a password; diadb refuses to hold one: {_WHERE_SECRETS_GO}"
        )
    query = parse_qsl(parts.query, keep_blank_values=True)
    secrets = sorted({k.lower() for k, _ in query if k.lower() in SECRET_PARAMS})
    if secrets:
        named = ", ".join(f"{k}=" for k in secrets)
        raise ConfigError(
            f"the URL carries a secret ({named}); diadb refuses to hold one: {_WHERE_SECRETS_GO}"
        )
    options = {k: v for k, v in query if k in DIADB_PARAMS}
    libpq = [(k, v) for k, v in query if k not in DIADB_PARAMS]
    if not any(k == "application_name" for k, _ in libpq):
        libpq.append(("application_name", "diadb"))
    # Not urlunsplit: it drops the "//" of an empty host list (postgresql:///db?host=/socket),
    # and libpq then fails to parse the URI.
    uri = f"postgresql://{parts.netloc}{parts.path}?{urlencode(libpq, quote_via=quote)}"
    return uri, options


def check_schema_name(name: str) -> str:
    """``name`` if PostgreSQL keeps it as given (ConfigError otherwise).

    The server truncates longer identifiers (with only a NOTICE), so two names that differ
    after byte 63 would open the same APDB; control characters survive quoting but not logs
    or ``search_path`` parsing; ``pg_`` names are reserved for the server's own schemas.
    """
    size = len(name.encode("utf-8"))
    if not name:
        raise ConfigError("the PostgreSQL schema name is empty")
    if size > MAX_IDENTIFIER_BYTES:
        raise ConfigError(
            f"the PostgreSQL schema name {name[:20]!r}... is {size} bytes in UTF-8; the server keeps "
            f"only the first {MAX_IDENTIFIER_BYTES} bytes of a name, so use at most {MAX_IDENTIFIER_BYTES}"
        )
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise ConfigError(f"the PostgreSQL schema name {name!r} holds control characters")
    if name.startswith("pg_"):
        raise ConfigError(f"the PostgreSQL schema name {name!r} is reserved (pg_ names are the server's)")
    return name


@dataclass(frozen=True)
class PostgresUrl:
    """A parsed URL: the libpq URI and diadb's options, checked."""

    uri: str
    schema: str
    #: 0: not given (a new APDB takes the default, an existing one its frozen value).
    partition_days: float
    pool_size: int
    retry_seconds: float
    #: Whether a new APDB packs its fixed-width columns (see ``diadb.backends.common.packing``).
    packed: bool

    @property
    def where(self) -> str:
        """Names the database in messages (the URI without its query, and the schema)."""
        return f"{self.uri.split('?', 1)[0]} (schema {self.schema})"


def parse(
    url: str,
    *,
    schema: str | None = None,
    partition_days: float | None = None,
    pool_size: int | None = None,
    retry_seconds: float | None = None,
) -> PostgresUrl:
    """``url`` parsed and checked; the keyword arguments, when given, override its options."""
    uri, opts = parse_url(url)
    name = check_schema_name(schema or opts.get("schema") or DEFAULT_SCHEMA)
    values = {
        "partition_days": partition_days if partition_days is not None else opts.get("partition_days", 0),
        "pool_size": pool_size if pool_size is not None else opts.get("pool_size", DEFAULT_POOL_SIZE),
        "retry_seconds": retry_seconds
        if retry_seconds is not None
        else opts.get("retry_seconds", DEFAULT_RETRY_SECONDS),
    }
    try:
        days = float(values["partition_days"])
        size = int(values["pool_size"])
        retry = float(values["retry_seconds"])
    except ValueError as e:
        raise ConfigError(f"bad PostgreSQL URL option ({e})") from None
    if size < 1:
        raise ConfigError(f"pool_size must be >= 1, got {size}")
    if days < 0 or not math.isfinite(days):
        raise ConfigError(f"partition_days must be > 0, got {days}")
    packed = str(opts.get("packed", "1")).lower()
    if packed not in _TRUE + _FALSE:
        raise ConfigError(f"packed must be true or false, got {packed!r}")
    return PostgresUrl(uri, name, days, size, retry, packed in _TRUE)


def _host_port(item: str) -> tuple[str, int | None]:
    """``host``, ``host:port`` or ``[v6]:port`` of a URI's host list."""
    if item.startswith("["):
        host, _, rest = item[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = item.partition(":")
    number = int(port) if port.isdigit() else None
    if port and (number is None or not 0 < number < 65536):
        raise ConfigError(f"bad port {port!r} in a PostgreSQL URL")
    return unquote(host), number


def locate(url: str) -> Location:
    """The server, database and schema of ``url`` (``port`` None: libpq's default)."""
    parsed = parse(url)
    parts = urlsplit(parsed.uri)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    hosts: list[str] = []
    port: int | None = None
    listed = parts.netloc.rpartition("@")[2]
    for item in [*(listed.split(",") if listed else []), *query.get("host", "").split(",")]:
        if not item:
            continue
        host, p = _host_port(item)
        if host:
            hosts.append(host)
        port = port if port is not None else p
    if query.get("port"):
        port = _host_port(":" + query["port"].split(",", 1)[0])[1]
    database = query.get("dbname") or unquote(parts.path.lstrip("/")) or None
    _, options = parse_url(url)
    return Location(
        scheme="postgresql",
        hosts=tuple(hosts),
        port=port,
        database=database,
        namespace=parsed.schema,
        uri=parsed.uri,
        options=options,
    )
