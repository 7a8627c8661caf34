"""Source vocabulary -> A vocabulary, read from ``include/mappings/<source>.yaml``.

A mapping file lists, per level, entries of the form::

    - field: body_part            # the source record's field
      columns: [body_part, laterality]   # A columns it feeds
      values:                     # every known source value -> A value(s); ~ is null
        KNEE_LEFT: [KNEE, L]
        ~: [~, ~]

A value missing from ``values`` is unknown: ``Mapping.apply`` raises ``UnknownValue``
and the record is quarantined, never stored with a guess. ``prepare`` checks every
target value against A's own constraints (``medsync.schema.check_mapping``).
"""

from __future__ import annotations

from collections.abc import Mapping as AbcMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from medsync.config import LEVELS, read_yaml
from medsync.errors import MappingError
from medsync.levels import spec


class UnknownValue(ValueError):
    """A source value that the mapping does not list."""

    def __init__(self, field: str, value: object) -> None:
        super().__init__(f"{field}: unknown value {value!r} (not in the mapping file)")
        self.field = field
        self.value = value


@dataclass(frozen=True)
class EnumMapping:
    field: str
    columns: tuple[str, ...]
    values: dict[str | None, tuple[str | None, ...]]

    def apply(self, value: object) -> tuple[str | None, ...]:
        if isinstance(value, str) or value is None:
            try:
                return self.values[value]
            except KeyError:
                pass
        raise UnknownValue(self.field, value)


@dataclass(frozen=True)
class Mapping:
    source: str
    levels: dict[str, tuple[EnumMapping, ...]]
    path: Path | None = None

    def entries(self, level: str) -> tuple[EnumMapping, ...]:
        return self.levels.get(level, ())

    def apply(self, level: str, record: AbcMapping[str, Any]) -> dict[str, str | None]:
        """A column -> A value for every mapped field of ``record``; raises ``UnknownValue``."""
        out: dict[str, str | None] = {}
        for entry in self.levels.get(level, ()):
            out.update(zip(entry.columns, entry.apply(record.get(entry.field)), strict=True))
        return out

    def targets(self) -> list[tuple[str, str, str | None]]:
        """Every (level, A column, A value) the file can produce, for checks against A's tables."""
        found = {
            (level, column, value)
            for level, entries in self.levels.items()
            for entry in entries
            for values in entry.values.values()
            for column, value in zip(entry.columns, values, strict=True)
        }
        return sorted(found, key=lambda t: (t[0], t[1], t[2] or ""))


def _entry(where: str, raw: object, level: str) -> EnumMapping:
    if not isinstance(raw, dict) or set(raw) != {"field", "columns", "values"}:
        raise MappingError(f"{where}: an entry has exactly the keys field, columns, values")
    field, columns, values = raw["field"], raw["columns"], raw["values"]
    if not isinstance(field, str) or not field:
        raise MappingError(f"{where}: field must be a field name")
    if isinstance(columns, str):
        columns = [columns]
    if not isinstance(columns, list) or not columns or not all(isinstance(c, str) for c in columns):
        raise MappingError(f"{where} ({field}): columns must be a list of A column names")
    known = spec(level).column_names
    unknown_columns = [c for c in columns if c not in known]
    if unknown_columns:
        raise MappingError(f"{where} ({field}): {unknown_columns} are not columns of A's {level} table")
    if not isinstance(values, dict) or not values:
        raise MappingError(f"{where} ({field}): values must map source values to A values")
    table: dict[str | None, tuple[str | None, ...]] = {}
    for source_value, target in values.items():
        if source_value is not None and not isinstance(source_value, str):
            raise MappingError(f"{where} ({field}): source value {source_value!r} must be a string or ~")
        targets = tuple(target) if isinstance(target, list) else (target,)
        if len(targets) != len(columns):
            raise MappingError(
                f"{where} ({field}): {source_value!r} maps to {len(targets)} values for {len(columns)} columns"
            )
        if not all(t is None or isinstance(t, str) for t in targets):
            raise MappingError(f"{where} ({field}): {source_value!r} must map to strings or ~")
        table[source_value] = targets
    return EnumMapping(field=field, columns=tuple(columns), values=table)


def parse_mapping(raw: object, where: str = "mapping") -> Mapping:
    if not isinstance(raw, dict) or not isinstance(raw.get("source"), str):
        raise MappingError(f"{where}: a mapping file is a YAML mapping with a 'source' name")
    extra = set(raw) - {"source", *LEVELS}
    if extra:
        raise MappingError(f"{where}: unknown keys {sorted(extra)}; levels are {', '.join(LEVELS)}")
    levels: dict[str, tuple[EnumMapping, ...]] = {}
    for level in LEVELS:
        entries = raw.get(level) or []
        if not isinstance(entries, list):
            raise MappingError(f"{where}: {level} must be a list of entries")
        parsed = tuple(_entry(f"{where}: {level}[{i}]", e, level) for i, e in enumerate(entries))
        fed = [c for e in parsed for c in e.columns]
        if len(fed) != len(set(fed)):
            raise MappingError(f"{where}: {level}: an A column is fed by more than one entry")
        levels[level] = parsed
    return Mapping(source=raw["source"], levels=levels)


def load_mapping(path: Path) -> Mapping:
    try:
        raw = read_yaml(path)
    except (OSError, yaml.YAMLError) as exc:
        raise MappingError(f"{path}: cannot read mapping: {exc}") from exc
    mapping = parse_mapping(raw, where=str(path))
    return Mapping(source=mapping.source, levels=mapping.levels, path=path)
