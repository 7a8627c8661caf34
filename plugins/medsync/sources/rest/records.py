"""A REST source's records -> staged rows, compiled once per task from the ``api:`` spec and the mapping.

:class:`RestRecordParser` implements :class:`medsync.sources.base.RecordParser`. Building it turns
the spec (``RestApi``), the mapping file (``Mapping``) and the resolved buckets into, per level, a
tuple of small closures over plain dict lookups: a good record costs one closure call per A column
and no pydantic at all. A record any closure refuses is parsed again by the *explaining* path
(``_LevelParser.explained``), which applies the same rules in the phases below and is the only
place reasons are made (held-back records are rare, so its cost does not matter). The two are
compiled from the same spec and ``tests/test_records_fast_path.py`` holds them to the same result
on every record.

A live record is judged in phases; the first phase with a problem holds it back, with its reason:

1. envelope: the key, the version and the deletion flag (every problem listed, ``; ``-joined);
   a tombstone needs nothing else;
2. shape: every field's JSON type and converter (``rfc3339``, ``iso_date``, ...), all listed
   (``performed_at: Value error, is not an RFC 3339 date-time``);
3. required fields missing, null or empty after NUL removal, all in one reason
   (``required field missing or empty: mrn``), in the order fields, mapped fields, parent;
4. vocabulary: the first mapped field whose value the mapping file does not list
   (``modality: unknown value 'MRI_3T' (not in the mapping file)``; codes are not PHI);
5. checks: A's integer ranges, then keys, buckets and uuid formats (``file_path: has a '.' or '..' segment``).

Reasons name source field paths and rules, never values of record fields (phase 4 names the
vocabulary code, as B's parser always did). Messages follow pydantic's ``loc: msg`` style, as the
earlier B parser's did (``tests/test_records.py`` holds them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from medsync.errors import MappingError
from medsync.levels import Column, staged_columns
from medsync.levels import spec as level_spec
from medsync.mapping import EnumMapping, Mapping, UnknownValue
from medsync.sources.base import Buckets, RawPage, RecordRejected, StagedRecord, synthetic_key
from medsync.sources.rest import converters
from medsync.sources.rest.spec import (
    DeletedAtDeletions,
    FeedDeletions,
    FieldSpec,
    FlagDeletions,
    KeySpec,
    LevelApi,
    ParentSpec,
    RestApi,
    VersionSpec,
    join_path,
    path_keys,
)

DELETION_ITEM = "medsync_deletion_item"
"""A rejected deletion-feed item is quarantined as ``{DELETION_ITEM: item}``, so that a retry
(:meth:`RestRecordParser.parse`) knows it from a record."""

_MISSING: Any = object()


class _Refused(Exception):
    """A rule refused a value; ``args[0]`` is the reason (already prefixed with the field path)."""


Getter = Callable[[dict[str, Any]], Any]
"""Reads one value out of a record dict; ``_MISSING`` when a path segment is absent or null."""


def _getter(path: str) -> Getter:
    """A reader of ``path`` (dotted); an intermediate that is not an object is a shape error."""
    parts = path_keys(path)
    if len(parts) == 1:
        name = parts[0]

        def get_one(raw: dict[str, Any]) -> Any:
            return raw.get(name, _MISSING)

        return get_one

    def get_nested(raw: dict[str, Any]) -> Any:
        node: Any = raw
        for depth, part in enumerate(parts):
            if node is None:
                return _MISSING
            if type(node) is not dict:
                raise _Refused(f"{join_path(parts[:depth])}: Input should be a valid dictionary")
            node = node.get(part, _MISSING)
            if node is _MISSING:
                return _MISSING
        return node

    return get_nested


# --- phase 2 extractors: one source value -> what the column takes (before checks) ------------------


def _string(path: str) -> Getter:
    """A ``string`` value: a JSON string or null/missing (None); NUL removed."""
    get = _getter(path)
    refused = f"{path}: Input should be a valid string"

    def extract(raw: dict[str, Any]) -> str | None:
        value = get(raw)
        if value is _MISSING or value is None:
            return None
        if type(value) is not str:
            raise _Refused(refused)
        return value.replace("\x00", "") if "\x00" in value else value

    return extract


def _typed(path: str, kind: type, message: str) -> Getter:
    get = _getter(path)
    refused = f"{path}: {message}"

    def extract(raw: dict[str, Any]) -> Any:
        value = get(raw)
        if value is _MISSING or value is None:
            return None
        if type(value) is not kind:  # exact: a JSON true is not an integer, 1 is not a boolean
            raise _Refused(refused)
        return value

    return extract


def _converted(path: str, convert: Callable[[Any], Any]) -> Getter:
    """A value made by a converter from the raw value (NUL removed from text first); null stays None."""
    get = _getter(path)

    def extract(raw: dict[str, Any]) -> Any:
        value = get(raw)
        if value is _MISSING or value is None:
            return None
        if type(value) is str and "\x00" in value:
            value = value.replace("\x00", "")
        try:
            return convert(value)
        except ValueError as exc:
            raise _Refused(f"{path}: Value error, {exc}") from None

    return extract


def _pn_parts(family_path: str, given_path: str) -> Getter:
    family, given = _string(family_path), _string(given_path)

    def extract(raw: dict[str, Any]) -> str | None:
        return converters.pn_parts(family(raw), given(raw))

    return extract


# Converters of the raw value, applied in the shape phase.
_VALUE_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "rfc3339": converters.rfc3339,
    "epoch_seconds": converters.epoch_seconds,
    "epoch_millis": converters.epoch_millis,
    "iso_date": converters.iso_date,
    "dicom_da": converters.dicom_da,
    "pn_comma": converters.pn_comma,
    "int_string": converters.int_string,
}
# Checks of a text value, applied in the checks phase (after required and vocabulary).
_TEXT_CHECKS: dict[str, Callable[[str], str]] = {
    "absolute_key": converters.absolute_key,
    "relative_key": converters.relative_key,
    "uuid_text": converters.uuid_text,
}
_TIME_FORMATS: dict[str, Callable[[Any], datetime]] = {
    "rfc3339": converters.rfc3339,
    "epoch_seconds": converters.epoch_seconds,
    "epoch_millis": converters.epoch_millis,
}


@dataclass(frozen=True, slots=True)
class _Input:
    """One value a record contributes: how to read it, whether it must be there, how it is checked."""

    path: str
    extract: Getter
    required: bool = False
    check: Callable[[Any], Any] | None = None
    """Applied to a non-null value in the checks phase; raises ValueError(rule)."""
    range_check: bool = False
    """``check`` is a range check (run before the other checks, as B's parser did)."""

    kind: str = "other"
    """``string``/``integer``/``boolean`` for a plain typed value (the fast path reads it inline)."""
    bounds: tuple[int, int] | None = None
    """An integer's inclusive range (``check`` says the same with a reason); the fast path tests it inline."""
    bare_check: Callable[[Any], Any] | None = None
    """``check`` without the path prefix on its message: one call less on the fast path."""

    def fast(self) -> Getter:
        """Extract, required and check in one call; raises on any problem (the explaining path says which)."""
        keys = path_keys(self.path)
        if self.kind != "other" and len(keys) == 1:  # a top-level key: read inline
            if self.bounds is not None:
                return _fast_integer(keys[0], self.required, self.bounds)
            return _fast_plain(keys[0], self.kind, self.required, self.bare_check or self.check)
        extract, required, check = self.extract, self.required, self.check
        if check is None and not required:
            return extract

        def fast(raw: dict[str, Any]) -> Any:
            value = extract(raw)
            if value is None or value == "":
                if required:
                    raise _Refused
                return value
            return check(value) if check is not None else value

        return fast


def _fast_integer(name: str, required: bool, bounds: tuple[int, int]) -> Getter:
    """The fast reader of a top-level integer field: one dict lookup, the exact type, the range."""
    low, high = bounds

    def fast(raw: dict[str, Any]) -> Any:
        value: Any = raw.get(name)
        if value is None:
            if required:
                raise _Refused
            return None
        if type(value) is not int or not low <= value <= high:  # exact: a JSON true is not an integer
            raise _Refused
        return value

    return fast


def _fast_plain(name: str, kind: str, required: bool, check: Callable[[Any], Any] | None) -> Getter:
    """The fast reader of a top-level plain field: one dict lookup, the type test, NUL removal, checks."""
    expected: Any = {"string": str, "integer": int, "boolean": bool}[kind]
    text = expected is str

    def fast(raw: dict[str, Any]) -> Any:
        value: Any = raw.get(name)
        if value is None:
            if required:
                raise _Refused
            return None
        if type(value) is not expected:  # exact: a JSON true is not an integer
            raise _Refused
        if text:
            if "\x00" in value:
                value = value.replace("\x00", "")
            if not value:
                if required:
                    raise _Refused
                return value
        return check(value) if check is not None else value

    return fast


def _range_check(path: str, bounds: tuple[int, int], message: str) -> Callable[[int], int]:
    low, high = bounds
    refused = f"{path}: {message}"

    def check(value: int) -> int:
        if not low <= value <= high:
            raise ValueError(refused)
        return value

    return check


def _prefixed(path: str, check: Callable[[str], str]) -> Callable[[str], str]:
    def prefixed(value: str) -> str:
        try:
            return check(value)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    return prefixed


def _field_input(level: str, column: str, field: FieldSpec, buckets: Buckets) -> _Input | Any:
    """The input of one A column, or a constant (``config_bucket``)."""
    convert = field.convert
    path = field.path or column
    if convert == "config_bucket":
        return _Constant(buckets.default)
    if convert == "pn_parts":
        assert field.family is not None and field.given is not None  # the spec requires both
        return _Input(field.family, _pn_parts(field.family, field.given), field.required)
    assert field.path is not None  # the spec requires a path for every other converter
    column_spec = next(c for c in level_spec(level).columns if c.name == column)
    if convert is None:
        if field.type == "integer":
            return _integer_input(column_spec, field)
        if field.type == "boolean":
            return _Input(path, _typed(path, bool, "Input should be a valid boolean"), field.required, kind="boolean")
        check = _uuid_check(path) if field.format == "uuid" else None
        return _Input(path, _string(path), field.required, check, kind="string")
    return _converted_input(path, convert, field.required, buckets, column_spec)


def _converted_input(path: str, convert: str, required: bool, buckets: Buckets, column: Column) -> _Input:
    """The input of a field with a converter that reads ``path``."""
    check: Callable[[str], str]
    if convert in _VALUE_CONVERTERS:
        return _Input(path, _converted(path, _VALUE_CONVERTERS[convert]), required)
    if convert in _TEXT_CHECKS:
        check = _TEXT_CHECKS[convert]
    elif convert == "allowed_bucket":
        allowed = buckets.allowed

        def check(value: str) -> str:
            return converters.allowed_bucket(value, allowed)
    else:
        # python: module.path:function, the escape hatch (spec.py checked its form).
        dotted = convert.removeprefix("python:").strip()  # FieldSpec.python
        function = _typed_output(converters.load_python(dotted), dotted, column)
        return _Input(path, _converted(path, function), required)
    return _Input(path, _string(path), required, _prefixed(path, check), kind="string", bare_check=check)


def _integer_bounds(column: Column) -> tuple[int, int]:
    """The values A's integer ``column`` can hold."""
    return converters.INTEGER_RANGE if column.pg_type == "integer" else converters.BIGINT_RANGE


def _integer_input(column: Column, field: FieldSpec) -> _Input:
    """A JSON integer checked against its A column's type (and the field's ``minimum``)."""
    path = field.path or column.name
    bounds = _integer_bounds(column)
    message = "out of range for an integer column" if column.pg_type == "integer" else "out of range"
    minimum = field.minimum
    if minimum is not None:
        bounds, message = (max(bounds[0], minimum), bounds[1]), "out of range"
    return _Input(
        path,
        _typed(path, int, "Input should be a valid integer"),
        field.required,
        _range_check(path, bounds, message),
        range_check=True,
        kind="integer",
        bounds=bounds,
    )


_TYPE_NAMES: dict[type, str] = {str: "text", int: "an integer", date: "a date", datetime: "an aware datetime"}


def _typed_output(function: Callable[[Any], Any], dotted: str, column: Column) -> Callable[[Any], Any]:
    """``function`` (a ``python:`` converter) with what it returns checked against A's ``column``.

    Its result goes into a binary COPY, which fails the whole pull on a value of another type: a
    wrong type (a naive datetime, a ``datetime`` for a date, a bool or an out-of-range integer)
    raises ValueError, so the one record is held back with the reason. Text has NUL removed as
    every text does. None is NULL.
    """
    stored = column.python_type
    bounds = _integer_bounds(column)
    refused = (
        f"python converter {dotted} returned {{}}, but the {column.name} column ({column.pg_type}) takes "
        f"{_TYPE_NAMES[stored]}"
    )

    def checked(value: Any) -> Any:
        out = function(value)
        if out is None:
            return None
        if stored is str:
            fits = type(out) is str
            if fits:
                out = converters.remove_nul(out)
        elif stored is int:
            fits = type(out) is int and bounds[0] <= out <= bounds[1]
        elif stored is datetime:
            fits = type(out) is datetime and out.utcoffset() is not None
        else:
            fits = type(out) is date
        if not fits:
            what = type(out).__name__
            if stored is int and type(out) is int:
                what = "an integer out of range"
            elif type(out) is datetime and out.utcoffset() is None:
                what = "a naive datetime"
            raise ValueError(refused.format(what))
        return out

    return checked


def _integer_text(value: Any) -> str:
    """An integer reference (``parent.type: integer``) as the decimal text its parent's key is stored as."""
    if type(value) is not int:
        raise ValueError("must be an integer (a JSON integer)")
    return str(value)


@dataclass(frozen=True, slots=True)
class _Constant:
    value: Any


def _uuid_check(path: str) -> Callable[[str], str]:
    return _prefixed(path, converters.uuid_text)


# --- envelope --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Envelope:
    """Key, version and deletion of a record (or of a deletion-feed item)."""

    key_path: str
    key: Getter
    key_max_length: int | None
    key_uuid: bool
    key_integer: bool
    version_path: str
    version: Getter
    convert_version: Callable[[Any], datetime]
    deletion: str  # flag | deleted_at | live (none/feed)
    deletion_path: str
    deleted: Getter

    @classmethod
    def of(cls, key: KeySpec, version: VersionSpec, deletion: str, deletion_path: str = "") -> _Envelope:
        return cls(
            key.path,
            _getter(key.path),
            key.max_length,
            key.format == "uuid",
            key.type == "integer",
            version.path,
            _getter(version.path),
            _TIME_FORMATS[version.format],
            deletion,
            deletion_path,
            _getter(deletion_path) if deletion_path else _getter(key.path),
        )

    def fast(self, raw: dict[str, Any]) -> tuple[str, datetime, bool]:
        """Key, version, deleted; raises (anything) when the explaining path must say why."""
        key = self.key(raw)
        if self.key_integer:
            if type(key) is not int:  # exact: a JSON true is not an integer
                raise _Refused
            key = str(key)
        elif type(key) is not str:
            raise _Refused
        if "\x00" in key:
            key = key.replace("\x00", "")
        if not key or (self.key_max_length is not None and len(key) > self.key_max_length):
            raise _Refused
        if self.key_uuid:
            converters.uuid_text(key)
        version = self.version(raw)
        if version is _MISSING:
            raise _Refused
        when = self.convert_version(version)
        if self.deletion == "flag":
            deleted = self.deleted(raw)
            if type(deleted) is not bool:
                raise _Refused
            return key, when, deleted
        if self.deletion == "deleted_at":
            value = self.deleted(raw)
            return key, when, value is not _MISSING and value is not None
        return key, when, False

    def explained(self, raw: dict[str, Any]) -> tuple[str, datetime, bool] | tuple[str, datetime | None, str]:
        """``(key, version, deleted)`` or ``(key to quarantine under, version or None, reason)``."""
        problems: list[str] = []
        clean = self._explain_key(raw, problems)
        when = self._explain_version(raw, problems)
        deleted = self._explain_deletion(raw, problems)
        if problems:
            return (clean or synthetic_key(raw), when, "; ".join(problems))
        assert clean is not None and when is not None
        return clean, when, deleted

    def _explain_key(self, raw: dict[str, Any], problems: list[str]) -> str | None:
        """The key as text (NUL removed) when it is a string; its problems appended."""
        try:
            key = self.key(raw)
        except _Refused as exc:
            problems.append(exc.args[0])
            return None
        if key is _MISSING:
            problems.append(f"{self.key_path}: Field required")
            return None
        if self.key_integer:
            if type(key) is not int:
                problems.append(f"{self.key_path}: Input should be a valid integer")
                return None
            key = str(key)
        if type(key) is not str:
            problems.append(f"{self.key_path}: Input should be a valid string")
            return None
        clean = converters.remove_nul(key)
        if not clean:
            problems.append(f"{self.key_path}: String should have at least 1 character")
        elif self.key_max_length is not None and len(clean) > self.key_max_length:
            problems.append(f"{self.key_path}: String should have at most {self.key_max_length} characters")
        elif self.key_uuid:
            try:
                converters.uuid_text(clean)
            except ValueError as exc:
                problems.append(f"{self.key_path}: {exc}")
        return clean

    def _explain_version(self, raw: dict[str, Any], problems: list[str]) -> datetime | None:
        try:
            version = self.version(raw)
        except _Refused as exc:
            problems.append(exc.args[0])
            return None
        if version is _MISSING:
            problems.append(f"{self.version_path}: Field required")
            return None
        try:
            return self.convert_version(version)
        except ValueError as exc:
            problems.append(f"{self.version_path}: Value error, {exc}")
            return None

    def _explain_deletion(self, raw: dict[str, Any], problems: list[str]) -> bool:
        if self.deletion not in ("flag", "deleted_at"):
            return False
        try:
            flag = self.deleted(raw)
        except _Refused as exc:
            problems.append(exc.args[0])
            return False
        if self.deletion == "deleted_at":
            return flag is not _MISSING and flag is not None
        if flag is _MISSING:
            problems.append(f"{self.deletion_path}: Field required")
        elif type(flag) is not bool:
            problems.append(f"{self.deletion_path}: Input should be a valid boolean")
        else:
            return flag
        return False


# --- one level -------------------------------------------------------------------------------------


def _compile_mapped(level: str, level_api: LevelApi, mapping: Mapping, index: dict[str, int]) -> list[_Mapped]:
    """The level's mapping entries bound to the spec's ``mapped`` fields; MappingError when they do not fit.

    A declared field the mapping does not name is not read: nothing is stored from it. Every
    vocabulary column (A's coded ones: the mapping file's to feed) and every NOT NULL one must be
    fed; another column that no field makes (a source without accession numbers) is stored NULL.
    """
    where = str(mapping.path) if mapping.path else "the mapping"
    declared = level_api.mapped
    mapped: list[_Mapped] = []
    for entry in mapping.entries(level):
        if entry.field not in declared:
            raise MappingError(
                f"{where}: {level}: field {entry.field!r} is not a field the source's api maps "
                f"(api.levels.{level}.mapped: {', '.join(declared) or 'none'})"
            )
        clash = [c for c in entry.columns if c in level_api.fields]
        if clash:
            raise MappingError(
                f"{where}: {level}: {', '.join(clash)} are made by api.levels.{level}.fields, not the mapping"
            )
        source = declared[entry.field]
        mapped.append(
            _Mapped(
                entry,
                _Input(source.path, _string(source.path), source.required, kind="string"),
                tuple(index[c] for c in entry.columns),
            )
        )
    fed = {c for m in mapped for c in m.entry.columns} | set(level_api.fields.keys()) | {"parent_key"}
    must_feed = {c.name for c in level_spec(level).columns if c.vocabulary or not c.nullable}
    unfed = [c for c in index if c not in fed and c in must_feed]
    if unfed:
        raise MappingError(f"{where}: {level} has no entry feeding {', '.join(unfed)}")
    return mapped


@dataclass(frozen=True, slots=True)
class _Mapped:
    """One mapping entry: the source field it reads and the staged positions of the columns it feeds."""

    entry: EnumMapping
    input: _Input
    positions: tuple[int, ...]


class _LevelParser:
    """Everything one level's records need, compiled: the fast closures and the explaining inputs."""

    def __init__(self, api: RestApi, level: str, mapping: Mapping, buckets: Buckets) -> None:
        level_api = api.levels[level]
        deletions = api.deletions
        key, version = api.level_key(level), api.level_version(level)
        if isinstance(deletions, FlagDeletions | DeletedAtDeletions):
            self.envelope = _Envelope.of(key, version, deletions.type, deletions.path)
        else:
            self.envelope = _Envelope.of(key, version, "live")
        self.feed: _Envelope | None = None
        self.feed_resource: str | None = None
        self.resource_get: Getter | None = None
        self.resource_path = ""
        if isinstance(deletions, FeedDeletions):
            self.feed = _Envelope.of(deletions.key, deletions.version, "live")
            self.feed_resource = deletions.resources[level]
            self.resource_path = deletions.resource_path
            self.resource_get = _getter(deletions.resource_path)

        columns = staged_columns(level)
        index = {column: i for i, column in enumerate(columns)}
        self.width = len(columns)
        constants: list[tuple[int, Any]] = []
        fields: list[tuple[int, _Input]] = []
        parent: tuple[int, _Input] | None = None
        if level_api.parent is not None:
            parent = (index["parent_key"], self._parent_input(level_api.parent))
        for column, field in level_api.fields.items():
            made = _field_input(level, column, field, buckets)
            if isinstance(made, _Constant):
                constants.append((index[column], made.value))
            else:
                fields.append((index[column], made))

        mapped = _compile_mapped(level, level_api, mapping, index)

        self.constants = tuple(constants)
        self.fields = tuple(fields)
        self.parent = parent
        self.mapped = tuple(mapped)
        # The explaining path's order: fields, mapped fields, parent (B's parser's order of reasons).
        inputs: list[tuple[int | None, _Input]] = [(i, inp) for i, inp in fields]
        inputs += [(None, m.input) for m in mapped]
        if parent is not None:
            inputs.append(parent)
        self._inputs = tuple(inputs)
        self._fast_fields = tuple((i, inp.fast()) for i, inp in fields)
        self._fast_parent = (parent[0], parent[1].fast()) if parent else None
        self._fast_mapped = tuple((m.entry.values, m.input.fast(), m.positions) for m in mapped)
        template: list[Any] = [None] * self.width
        for i, value in constants:
            template[i] = value
        self._template = template

    def _shape(self, raw: dict[str, Any], key: str, when: datetime) -> list[Any]:
        """Every input's extracted value (phase 2), or RecordRejected listing every shape problem."""
        values: list[Any] = []
        problems: list[str] = []
        for _, inp in self._inputs:
            try:
                values.append(inp.extract(raw))
            except _Refused as exc:
                values.append(None)
                if exc.args[0] not in problems:
                    problems.append(exc.args[0])
        if problems:
            raise RecordRejected("; ".join(problems), key, when)
        return values

    @staticmethod
    def _parent_input(parent: ParentSpec) -> _Input:
        if parent.type == "integer":
            return _Input(parent.path, _converted(parent.path, _integer_text), parent.required)
        check = _uuid_check(parent.path) if parent.format == "uuid" else None
        return _Input(parent.path, _string(parent.path), parent.required, check, kind="string")

    # --- records ------------------------------------------------------------------------------------

    def fast(self, raw: Any) -> StagedRecord:
        """The record staged; raises (anything) when it is not a clean live record or tombstone."""
        if type(raw) is not dict:
            raise _Refused
        key, when, deleted = self.envelope.fast(raw)
        if deleted:
            return StagedRecord(key, when, True, ())
        out = self._template.copy()
        for i, get in self._fast_fields:
            out[i] = get(raw)
        if self._fast_parent is not None:
            out[self._fast_parent[0]] = self._fast_parent[1](raw)
        for values, get, positions in self._fast_mapped:
            mapped = values[get(raw)]  # KeyError: unknown value
            for position, value in zip(positions, mapped, strict=True):
                out[position] = value
        return StagedRecord(key, when, False, tuple(out))

    def explained(self, raw: object) -> StagedRecord:
        """The phased path: the record staged, or RecordRejected with the reason of its first failing phase."""
        if not isinstance(raw, dict):
            raise RecordRejected("record: is not a JSON object", synthetic_key(raw), None)
        envelope = self.envelope.explained(raw)
        key, when = envelope[0], envelope[1]
        if isinstance(envelope[2], str):
            raise RecordRejected(envelope[2], key, when)
        assert when is not None
        if envelope[2]:
            return StagedRecord(key, when, True, ())

        inputs = self._inputs
        by_input = self._shape(raw, key, when)
        missing = [inp.path for n, (_, inp) in enumerate(inputs) if inp.required and by_input[n] in (None, "")]
        if missing:
            raise RecordRejected(f"required field missing or empty: {', '.join(missing)}", key, when)
        out = self._template.copy()
        n_fields = len(self.fields)
        for offset, m in enumerate(self.mapped):
            try:
                mapped = m.entry.apply(by_input[n_fields + offset])
            except UnknownValue as exc:
                raise RecordRejected(str(exc), key, when) from None
            for position, code in zip(m.positions, mapped, strict=True):
                out[position] = code
        # Checks: ranges first, then keys, buckets and formats, each in field order.
        ordered = sorted(enumerate(inputs), key=lambda item: not item[1][1].range_check)
        for n, (at, inp) in ordered:
            value = by_input[n]
            if inp.check is not None and value is not None and value != "":
                try:
                    value = inp.check(value)
                except ValueError as exc:
                    raise RecordRejected(str(exc), key, when) from None
            if at is not None:
                out[at] = value
        return StagedRecord(key, when, False, tuple(out))

    # --- deletion-feed items ------------------------------------------------------------------------

    def feed_item(self, raw: object) -> StagedRecord:
        """A deletion-feed item of this level -> a tombstone; RecordRejected (payload kept) otherwise."""
        assert self.feed is not None and self.resource_get is not None
        payload = {DELETION_ITEM: raw}
        if type(raw) is dict:
            try:
                if self.resource_get(raw) == self.feed_resource:
                    key, when, _ = self.feed.fast(raw)
                    return StagedRecord(key, when, True, ())
            except (_Refused, ValueError, TypeError):
                pass
        if not isinstance(raw, dict):
            raise RecordRejected("deletion item: is not a JSON object", synthetic_key(payload), None, payload)
        envelope = self.feed.explained(raw)
        if isinstance(envelope[2], str):
            raise RecordRejected(f"deletion item: {envelope[2]}", envelope[0], envelope[1], payload)
        raise RecordRejected(
            f"deletion item: {self.resource_path}: is not this level's resource", envelope[0], envelope[1], payload
        )


class RestRecordParser:
    """Validates and maps one REST source's records (``RecordParser``), compiled once per task.

    Raises ``MappingError`` when the mapping file names a field the spec does not declare under a
    level's ``mapped``, feeds a column the spec makes itself, or leaves a column unfed.
    """

    def __init__(self, api: RestApi, mapping: Mapping, buckets: Buckets) -> None:
        self.api = api
        self.mapping = mapping
        self.buckets = buckets
        self._levels = {level: _LevelParser(api, level, mapping, buckets) for level in api.levels.keys()}

    def parse_page(self, level: str, page: RawPage) -> Iterator[StagedRecord | RecordRejected]:
        """Every item of ``page`` staged or held back, in page order; never raises for a bad item."""
        parser = self._levels[level]
        if page.deletions:
            for raw in page.items:
                try:
                    yield parser.feed_item(raw)
                except RecordRejected as rejected:
                    yield rejected
            return
        fast, explained = parser.fast, parser.explained
        for raw in page.items:
            try:
                yield fast(raw)
            except (_Refused, ValueError, KeyError, TypeError):
                try:
                    yield explained(raw)
                except RecordRejected as rejected:
                    yield rejected

    def parse(self, level: str, raw: object) -> StagedRecord:
        """One item (a quarantine payload being retried); raises :class:`RecordRejected`."""
        parser = self._levels[level]
        if type(raw) is dict and len(raw) == 1 and DELETION_ITEM in raw and parser.feed is not None:
            return parser.feed_item(raw[DELETION_ITEM])
        try:
            return parser.fast(raw)
        except (_Refused, ValueError, KeyError, TypeError):
            return parser.explained(raw)
