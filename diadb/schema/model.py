"""Small immutable descriptions of the tables diadb stores, built from a Felis schema."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow as pa

from diadb.schema.types import arrow_type

#: The spatial key column diadb adds to every stored table (HEALPix order 29, nested).
HEALPIX_COLUMN = "_healpix_29"


@dataclass(frozen=True)
class ColumnSpec:
    """One column of a Felis table."""

    name: str
    datatype: str
    nullable: bool
    length: int | None = None
    unit: str | None = None
    ucd: str | None = None
    description: str | None = None

    @property
    def arrow_type(self) -> pa.DataType:
        return arrow_type(self.datatype)

    def arrow_field(self) -> pa.Field:
        meta = {
            k: v for k, v in (("unit", self.unit), ("ucd", self.ucd), ("description", self.description)) if v
        }
        return pa.field(self.name, self.arrow_type, nullable=self.nullable, metadata=meta or None)


@dataclass(frozen=True)
class TableSpec:
    """One Felis table: its columns in schema order and its primary key."""

    name: str
    columns: tuple[ColumnSpec, ...]
    primary_key: tuple[str, ...]
    description: str | None = None
    _by_name: dict[str, ColumnSpec] = field(init=False, repr=False, compare=False)
    _schemas: dict[bool, pa.Schema] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {c.name: c for c in self.columns})
        # Built once: every read and store asks for it, 189 times a visit in per-detector mode.
        object.__setattr__(self, "_schemas", {flag: self._build_arrow_schema(flag) for flag in (True, False)})

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def column(self, name: str) -> ColumnSpec:
        return self._by_name[name]

    def arrow_schema(self, *, with_healpix: bool = True) -> pa.Schema:
        """The Arrow schema of this table as diadb returns it (``_healpix_29`` last)."""
        return self._schemas[with_healpix]

    def cast(self, data: pa.Table, names: Sequence[str] | None = None) -> pa.Table:
        """``data`` with its columns named ``names`` (default: as they are) and cast to this
        table's Arrow types and metadata; engines return types that cast losslessly."""
        names = list(data.column_names if names is None else names)
        full = self.arrow_schema()
        target = pa.schema([full.field(n) for n in names], metadata=full.metadata)
        # One cast of the whole table (per-column casts cost ~40 us each in Python, x104).
        return data.rename_columns(names).cast(target)

    def _build_arrow_schema(self, with_healpix: bool) -> pa.Schema:
        fields = [c.arrow_field() for c in self.columns]
        if with_healpix:
            fields.append(
                pa.field(
                    HEALPIX_COLUMN,
                    pa.int64(),
                    nullable=False,
                    metadata={"description": "HEALPix order 29 nested pixel of (ra, dec)"},
                )
            )
        meta = {"table": self.name}
        if self.description:
            meta["description"] = self.description
        return pa.schema(fields, metadata=meta)


@dataclass(frozen=True)
class ApdbSchema:
    """A loaded Felis schema: its identity, its tables and the YAML it came from."""

    name: str
    version: str
    tables: dict[str, TableSpec]
    yaml_text: str = field(repr=False)

    def table(self, name: str) -> TableSpec:
        return self.tables[name]
