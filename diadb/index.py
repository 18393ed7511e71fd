"""The label index: well-known databases by label, so no URL with a host is typed by hand.

``DIADB_INDEX_URI`` names a YAML file (a path or a ``file://`` URI) mapping labels to URLs::

    prod: "postgresql://apdb@db.example.org/apdb?schema=night"
    dev: "/data/apdb/dev.db"

``@prod`` then stands for that URL in every ``diadb`` command taking one (:func:`resolve_url`).
Passwords do not belong in the file: diadb refuses URLs that carry one (use ``~/.pgpass``).
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlsplit

import yaml

from diadb.errors import ConfigError

#: The environment variable naming the index file.
INDEX_ENV = "DIADB_INDEX_URI"


def index_path() -> Path:
    """The index file named by ``DIADB_INDEX_URI``.

    Raises
    ------
    ConfigError
        The variable is not set, or is a URI of a scheme other than ``file``.
    """
    uri = os.environ.get(INDEX_ENV, "").strip()
    if not uri:
        raise ConfigError(f"{INDEX_ENV} is not set: it names the YAML file of labels and URLs")
    if "://" in uri:
        parts = urlsplit(uri)
        if parts.scheme != "file":
            raise ConfigError(f"{INDEX_ENV} must be a path or a file:// URI, got scheme {parts.scheme!r}")
        return Path(unquote(parts.path))
    return Path(uri).expanduser()


def read_index() -> dict[str, str]:
    """The labels and their URLs.

    Raises
    ------
    ConfigError
        The file is missing, unreadable, not YAML, or not a mapping of text to text.
    """
    path = index_path()
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read the label index {path} ({INDEX_ENV}): {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"the label index {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise ConfigError(f"the label index {path} must map labels to URLs (text to text)")
    return dict(data)


def resolve_url(url: str) -> str:
    """``url`` itself, or, for ``@label``, the URL the index gives that label.

    Raises
    ------
    ConfigError
        An unknown label (the known ones are named).
    """
    if not url.startswith("@"):
        return url
    label = url[1:]
    index = read_index()
    if label not in index:
        known = ", ".join(sorted(index)) or "none"
        raise ConfigError(f"label {label!r} is not in the label index {index_path()}; known: {known}")
    return index[label]


__all__ = ["INDEX_ENV", "index_path", "read_index", "resolve_url"]
