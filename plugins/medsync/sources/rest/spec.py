"""The ``api:`` section of a ``protocol: rest`` source config, as pydantic models.

The docstring of every field is the reference of what a source config may say (B's and C's
configs in ``include/sources/`` are the worked examples). Every model refuses unknown keys and
is frozen. Cross-field rules (the four levels, a parent on every child level, fields naming A's
columns, a feed naming every level's resource) are checked here, so a config error reads as
``include/sources/c.yaml: api.levels.instance.fields.storage_key.convert: ...``.

Paths into JSON (``path``, ``records_path``, ``cursor_path``, ...) are dotted: ``object.bucket``
is ``record["object"]["bucket"]``; ``\\.`` is a dot inside a key (:func:`path_keys`).

Imported while DAG files are parsed: pydantic, the standard library and medsync's own light
``config``/``levels`` only. (Field docstrings are not turned into schema descriptions:
pydantic's ``use_attribute_docstrings`` reads the source at import, 0.1 s more per parse.)
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Iterator, Mapping
from datetime import date, datetime
from typing import TYPE_CHECKING, Annotated, ClassVar, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model, field_validator, model_validator
from pydantic_core import PydanticCustomError

from medsync.config import LEVELS
from medsync.levels import SPECS, Column

JsonPath = Annotated[str, Field(pattern=r"^(?:[^.\s\\]|\\[.\\])+(?:\.(?:[^.\s\\]|\\[.\\])+)*$")]
"""A dotted path into a JSON object: ``data``, ``error.code``, ``name.family``; ``\\.`` is a dot
inside a key (``@odata\\.nextLink``) and ``\\\\`` a backslash (:func:`path_keys`)."""

_PATH_KEY = re.compile(r"(?:[^.\\]|\\.)+")
_ESCAPED = re.compile(r"\\(.)")


def path_keys(path: str) -> tuple[str, ...]:
    """The keys a :data:`JsonPath` walks: ``error.code`` -> ``("error", "code")``.

    A key may contain a dot written ``\\.`` (OData's ``@odata\\.nextLink`` is one key) and a
    backslash written ``\\\\``: the escape of kubectl's, Helm's and gjson's paths. In YAML, single
    quotes keep a backslash as written (``next_path: '@odata\\.nextLink'``).
    """
    if "\\" not in path:
        return tuple(path.split("."))
    return tuple(_ESCAPED.sub(r"\1", key) for key in _PATH_KEY.findall(path))


def join_path(keys: tuple[str, ...]) -> str:
    """The :data:`JsonPath` of ``keys``, dots and backslashes in them escaped (``path_keys``' inverse)."""
    return ".".join(key.replace("\\", "\\\\").replace(".", "\\.") for key in keys)


QueryParam = Annotated[str, Field(min_length=1, pattern=r"^[^\s&=#?]+$")]
"""The name of a query parameter."""

Endpoint = Annotated[str, Field(pattern=r"^/[^\s?#]*$")]
"""A path below the API's base URL, starting with ``/`` (``/patients``)."""

TimeFormat = Literal["rfc3339", "epoch_seconds", "epoch_millis"]
"""How a moment is written: RFC 3339 text (any offset), or an integer count of seconds or
milliseconds since 1970-01-01T00:00:00Z."""

Converter = Literal[
    "rfc3339",
    "epoch_seconds",
    "epoch_millis",
    "iso_date",
    "dicom_da",
    "pn_comma",
    "pn_parts",
    "int_string",
    "absolute_key",
    "relative_key",
    "config_bucket",
    "allowed_bucket",
    "uuid_text",
]
"""The documented converters (``medsync.sources.rest.converters``)."""

CONVERTERS: frozenset[str] = frozenset(get_args(Converter))

OUTPUT_TYPES: dict[str, type] = {
    "rfc3339": datetime,
    "epoch_seconds": datetime,
    "epoch_millis": datetime,
    "iso_date": date,
    "dicom_da": date,
    "pn_comma": str,
    "pn_parts": str,
    "int_string": int,
    "absolute_key": str,
    "relative_key": str,
    "config_bucket": str,
    "allowed_bucket": str,
    "uuid_text": str,
}
"""What each converter returns when it returns a value (an aware ``datetime`` for the timestamps):
a field whose converter makes a type its A column does not store is refused when the spec loads
(``medsync.levels.Column.python_type``). Declared here, not in ``converters``, which DAG parsing
does not import; ``tests/test_rest_converters.py`` holds each converter to it."""

PYTHON_CONVERTER = re.compile(r"^python:\s*([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):([A-Za-z_]\w*)$")
"""``python: some_module.path:function``, the escape hatch; groups: module, function."""

_NO_INPUT_CONVERTERS = frozenset({"config_bucket"})
"""Converters that read nothing from the record."""


def _invalid(reason: str) -> PydanticCustomError:
    # A custom error reads as the reason alone (a ValueError would read "Value error, ...").
    return PydanticCustomError("medsync_rest", "{reason}", {"reason": reason})


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- auth ------------------------------------------------------------------------------------------


class HeaderAuth(_Spec):
    """The secret (the connection's password) sent as-is in a header of every request."""

    type: Literal["header"]
    header: str = Field(pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
    """The header's name, e.g. ``X-API-Key``."""


class BearerAuth(_Spec):
    """``Authorization: Bearer <secret>``; the secret is the connection's password."""

    type: Literal["bearer"]


class BasicAuth(_Spec):
    """HTTP basic auth: the connection's login and password."""

    type: Literal["basic"]


Auth = Annotated[HeaderAuth | BearerAuth | BasicAuth, Field(discriminator="type")]


# --- limits, identity, window ----------------------------------------------------------------------


class Limits(_Spec):
    """What the source allows and how it says "later".

    ``Retry-After`` on 429 and 503 is honoured in both of RFC 9110's forms, integer seconds or an
    HTTP date (judged against the response's own ``Date``, so clocks need not agree), whichever the
    source sends: there is nothing to declare (the wait is capped at ``max_backoff_seconds``).
    """

    max_page_size: int | None = Field(default=None, ge=1)
    """The largest page the source serves; the config's ``page_size`` is checked against it."""
    retry_statuses: tuple[int | Literal["5xx"], ...] = (429, "5xx")
    """Statuses retried with backoff (429 and 503 honour ``Retry-After``); ``5xx`` stands for every
    500-599. Default: 429 and every 5xx (B's and C's contracts). Dropped connections and timeouts
    are always retried."""

    @field_validator("retry_statuses")
    @classmethod
    def _statuses_are_errors(cls, value: tuple[int | str, ...]) -> tuple[int | str, ...]:
        bad = [s for s in value if s != "5xx" and (not isinstance(s, int) or not 400 <= s <= 599 or s in (401, 403))]
        if bad:
            raise _invalid(f"only 4xx/5xx statuses other than 401/403 (or 5xx) can be retried, got {bad}")
        return value

    @property
    def retried(self) -> frozenset[int]:
        """Every status retried, ``5xx`` spelled out."""
        statuses = {s for s in self.retry_statuses if isinstance(s, int)}
        return frozenset(statuses | (set(range(500, 600)) if "5xx" in self.retry_statuses else set()))


class KeySpec(_Spec):
    """Where a record's source key is (``source_key`` in A)."""

    path: JsonPath
    """The key's path in the record: a non-empty string (anything else holds the record back)."""
    type: Literal["string", "integer"] = "string"
    """``integer``: the key is a JSON integer (Django's, Spring's, OData's numeric ids), stored as
    its decimal text; anything else holds the record back."""
    format: Literal["uuid"] | None = None
    """``uuid``: must be lower-case UUID text (36 characters), else the record is held back."""
    max_length: int | None = Field(default=None, ge=1)
    """The longest key the source's contract allows; a longer one holds the record back."""
    identifies_patient: bool = False
    """True when the key names a patient outside the source (an MRN, a national id): it is PHI,
    and the medsync page shows it masked (``Source.keys_identify_patients``)."""

    @model_validator(mode="after")
    def _uuid_is_text(self) -> KeySpec:
        if self.type == "integer" and self.format is not None:
            raise _invalid("format: uuid is for a string key")
        return self


class VersionSpec(_Spec):
    """Where a record's version is: its modification time (``source_updated_at`` in A)."""

    path: JsonPath
    format: TimeFormat = "rfc3339"


Order = Literal["version_ascending", "unsorted"]
"""How a listing is sorted: ``version_ascending`` (by the version, oldest first; ties in any
order), or ``unsorted`` (any other order, or none the contract promises)."""

_WINDOW_PLACEHOLDERS = frozenset({"since", "until"})


class WindowSpec(_Spec):
    """The query parameters bounding a list by version: ``since <= version < until``.

    The lower bound is sent on every list request, in ``since_param`` or in a template (never
    open-ended). The upper one is sent when ``until_param`` or a template names it; a source that
    takes no upper bound (GitHub's ``since``) has its records at or after ``until`` dropped by the
    client, which then reads the listing to its end, or, when the listing is declared
    ``order: version_ascending``, stops after the first page that reaches ``until``.
    """

    since_param: QueryParam | None = None
    """The inclusive lower bound's parameter."""
    until_param: QueryParam | None = None
    """The exclusive upper bound's parameter; none: the source takes no upper bound."""
    templates: dict[QueryParam, str] = Field(default_factory=dict)
    """Parameters whose value is a template over ``{since}`` and ``{until}`` (the bounds, written in
    ``format``), for an API whose window is an expression: OData's ``$filter: "Modified ge {since}
    and Modified lt {until}"``. ``{{`` and ``}}`` are literal braces."""
    format: TimeFormat = "rfc3339"
    """How the bounds are written: RFC 3339 in UTC with microseconds, or integer epoch seconds or
    milliseconds (the lower bound rounded down, the upper one up: nothing in the window is missed)."""

    @field_validator("templates")
    @classmethod
    def _templates_name_the_bounds(cls, value: dict[str, str]) -> dict[str, str]:
        for param, template in value.items():
            if not _placeholders(template, param):
                raise _invalid(f"{param}: names neither {{since}} nor {{until}}; a fixed parameter goes in params")
        return value

    @model_validator(mode="after")
    def _since_is_sent(self) -> WindowSpec:
        if not self.sends("since"):
            raise _invalid("the lower bound is sent nowhere: give since_param, or a template with {since}")
        return self

    def sends(self, bound: Literal["since", "until"]) -> bool:
        """Whether the ``since`` or ``until`` bound is in the requests (its parameter or a template)."""
        if (self.since_param if bound == "since" else self.until_param) is not None:
            return True
        return any(bound in _placeholders(template, param) for param, template in self.templates.items())


def _placeholders(template: str, param: str) -> frozenset[str]:
    """The placeholders of a window template; only ``{since}`` and ``{until}``, unformatted."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise _invalid(f"{param}: {exc} (a literal brace is written {{{{ or }}}})") from None
    named: set[str] = set()
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if name not in _WINDOW_PLACEHOLDERS or spec or conversion:
            raise _invalid(f"{param}: only {{since}} and {{until}} can be filled in, got {{{name}}}")
        named.add(name)
    return frozenset(named)


# --- paging ----------------------------------------------------------------------------------------


class CursorPaging(_Spec):
    """The body carries an opaque cursor (a string) for the next page; null or empty on the last.

    A body without the cursor's key is not a page of this API (the pull fails), unless
    ``absent_on_last_page`` says the source leaves it out on the last page.
    """

    type: Literal["cursor"]
    cursor_param: QueryParam
    """The query parameter the cursor is sent back in."""
    cursor_path: JsonPath
    """The cursor's path in the body."""
    page_size_param: QueryParam | None = None
    """The query parameter of the page size (the config's ``page_size``); none: the source's default."""
    absent_on_last_page: bool = False
    """The last page leaves the cursor's key out instead of sending null; false: an absent key fails the pull."""


class NextLinkPaging(_Spec):
    """The body carries the next page's URL (absolute or relative to the request's); null on the last.

    An absent link fails the pull unless ``absent_on_last_page`` says the source leaves it out on
    the last page (JSON:API's ``links.next``, HAL's ``_links.next.href``).
    """

    type: Literal["next_link"]
    next_path: JsonPath
    page_size_param: QueryParam | None = None
    absent_on_last_page: bool = False
    """The last page leaves the link (or an object on its path) out instead of sending null."""


class LinkHeaderPaging(_Spec):
    """The next page is the RFC 8288 ``Link`` header's ``rel="next"`` URL, followed as given
    (resolved against the request's URL); no such link on the last page."""

    type: Literal["link_header"]
    page_size_param: QueryParam | None = None


class OffsetPaging(_Spec):
    """Pages by record offset: ends on a short or empty page, or when the offset reaches the total."""

    type: Literal["offset"]
    offset_param: QueryParam
    limit_param: QueryParam
    """The page size's query parameter."""
    total_path: JsonPath | None = None
    """The path of the window's total in the body, when the source gives one."""


class PageNumberPaging(_Spec):
    """Pages by number: ends on a short or empty page, or after the last page the body announces."""

    type: Literal["page_number"]
    page_param: QueryParam
    start: int = Field(default=1, ge=0)
    """The number of the first page."""
    page_size_param: QueryParam | None = None
    total_pages_path: JsonPath | None = None
    """The path of the number of pages in the body, when the source gives one."""


class LastRecordPaging(_Spec):
    """The next page starts after the last record of this one: Stripe's ``starting_after=<last id>``.

    The body says whether more pages follow (``has_more_path``, a boolean): the last page says
    false. An empty page also ends the listing (there is no record to continue after).
    """

    type: Literal["last_record"]
    cursor_param: QueryParam
    """The query parameter the last record's cursor is sent in (``starting_after``)."""
    cursor_path: JsonPath | None = None
    """The cursor's path in the last record (a string or an integer); none: the record's key."""
    has_more_path: JsonPath
    """The path of the body's "more pages follow" boolean (``has_more``)."""
    page_size_param: QueryParam | None = None


Paging = Annotated[
    CursorPaging | NextLinkPaging | LinkHeaderPaging | OffsetPaging | PageNumberPaging | LastRecordPaging,
    Field(discriminator="type"),
]


class ExpiredSpec(_Spec):
    """How the source says the paging state (cursor, snapshot) expired.

    The client then restarts the window without it: from the last version seen (inclusive) when
    the listing is declared ``order: version_ascending``, else from the window's start; either way
    nothing is skipped and records are seen again. Too many restarts without progress fail the pull.
    """

    status: int = Field(ge=400, le=499)
    code_path: JsonPath | None = None
    """The error code's path in the error body, e.g. ``error.code``; none: the status alone says it."""
    code: str | None = None
    """The code that means expired (with ``code_path``)."""

    @model_validator(mode="after")
    def _code_with_path(self) -> ExpiredSpec:
        if (self.code_path is None) != (self.code is None):
            raise _invalid("code_path and code go together")
        if self.status in (401, 403):
            raise _invalid("401 and 403 mean the secret was refused, not an expiry")
        return self


# --- deletions -------------------------------------------------------------------------------------


class FlagDeletions(_Spec):
    """Tombstones are in the lists: a record whose boolean ``path`` is true is deleted."""

    type: Literal["flag"]
    path: JsonPath


class DeletedAtDeletions(_Spec):
    """Tombstones are in the lists: a record whose ``path`` is not null is deleted."""

    type: Literal["deleted_at"]
    path: JsonPath


class NoDeletions(_Spec):
    """The source never says a record was deleted: the sync never deletes rows."""

    type: Literal["none"]


class FeedDeletions(_Spec):
    """A separate deletion feed: one item per deletion, for every resource, windowed like the lists.

    Each level's pull reads the feed for its window after its records, keeping the items of its
    own resource (items of resources not named here are skipped).
    """

    type: Literal["feed"]
    endpoint: Endpoint
    resource_path: JsonPath
    """The path of the item's resource name."""
    resources: dict[str, str]
    """Level -> the resource name its items carry (every level)."""
    key: KeySpec
    """The deleted record's key in an item."""
    version: VersionSpec
    """The deletion's time in an item."""
    window: WindowSpec | None = None
    """Default: the lists' (section-level) window."""
    paging: Paging | None = None
    """Default: the lists' paging."""
    records_path: JsonPath | None = None
    """Where the items are in the body; not given: the lists' ``records_path``; null: the body itself."""
    empty_page_omits_records: bool | None = None
    """An empty page leaves ``records_path`` out; default: as the lists say."""
    params: dict[str, str] = Field(default_factory=dict)
    """Fixed query parameters of every feed request (the lists' ``params`` are not sent)."""
    order: Order = "unsorted"
    """How the feed is sorted, by the deletion's time (``version`` here). Not inherited from the
    lists: their order is by another field. ``version_ascending`` lets an expired feed restart
    where it stopped; ``unsorted`` restarts it from the window's start."""

    @field_validator("resources")
    @classmethod
    def _every_level(cls, value: dict[str, str]) -> dict[str, str]:
        _check_level_keys(value, "resources")
        if len(set(value.values())) != len(value):
            raise _invalid("two levels name the same resource")
        return value


Deletions = Annotated[FlagDeletions | DeletedAtDeletions | FeedDeletions | NoDeletions, Field(discriminator="type")]


class CountsSpec(_Spec):
    """The endpoint giving the live records per level now (reconciliation)."""

    endpoint: Endpoint
    paths: dict[str, JsonPath]
    """Level -> the path of its count in the body (every level)."""

    @field_validator("paths")
    @classmethod
    def _every_level(cls, value: dict[str, str]) -> dict[str, str]:
        _check_level_keys(value, "paths")
        return value


# --- levels ----------------------------------------------------------------------------------------


class FieldSpec(_Spec):
    """How one A column is made from a record: a path, a type, a converter."""

    path: JsonPath | None = None
    """The source field's path; every converter but ``config_bucket`` and ``pn_parts`` needs one."""
    type: Literal["string", "integer", "boolean"] = "string"
    """The raw value's JSON type (without ``convert``): ``string`` (or null; NUL characters removed),
    ``integer`` (a JSON integer, range-checked against the column), ``boolean``."""
    required: bool = False
    """Missing, null or empty (after NUL removal) holds the record back."""
    convert: str | None = None
    """A converter (``medsync.sources.rest.converters``: rfc3339, epoch_seconds, epoch_millis,
    iso_date, dicom_da, pn_comma, pn_parts, int_string, absolute_key, relative_key, config_bucket,
    allowed_bucket, uuid_text), or ``python: module.path:function`` (importable from ``plugins/``; called with
    the raw value; raises ValueError to hold the record back)."""
    family: JsonPath | None = None
    """``pn_parts``: the family name's path."""
    given: JsonPath | None = None
    """``pn_parts``: the given name's path."""
    format: Literal["uuid"] | None = None
    """``uuid``: the text must be lower-case UUID text, else the record is held back."""
    minimum: int | None = None
    """``type: integer``: the smallest value allowed (e.g. 0 for a size); a smaller one holds the record back."""

    @property
    def python(self) -> str | None:
        """``module.path:function`` of a ``python:`` converter; None for the documented ones."""
        match = PYTHON_CONVERTER.match(self.convert or "")
        return f"{match[1]}:{match[2]}" if match else None

    @field_validator("convert")
    @classmethod
    def _known_converter(cls, value: str | None) -> str | None:
        if value is None or value in CONVERTERS or PYTHON_CONVERTER.match(value):
            return value
        raise _invalid(
            f"unknown converter {value!r}; one of {', '.join(sorted(CONVERTERS))}, or python: module.path:function"
        )

    @model_validator(mode="after")
    def _inputs_fit_the_converter(self) -> FieldSpec:
        parts = self.family is not None or self.given is not None
        if self.convert == "pn_parts":
            if self.family is None or self.given is None:
                raise _invalid("pn_parts needs both family and given paths")
            if self.path is not None:
                raise _invalid("pn_parts reads family and given, not path")
        elif parts:
            raise _invalid("family and given are for convert: pn_parts only")
        elif self.convert in _NO_INPUT_CONVERTERS:
            if self.path is not None or self.required:
                raise _invalid(f"{self.convert} reads nothing from the record: no path or required")
        elif self.path is None:
            raise _invalid("path is required" + (f" by {self.convert}" if self.convert else ""))
        if self.minimum is not None and (self.type != "integer" or self.convert is not None):
            raise _invalid("minimum is for type: integer without a converter")
        if self.format is not None and (self.type != "string" or self.convert is not None):
            raise _invalid("format is for type: string without a converter")
        if self.convert is not None and self.type != "string":
            raise _invalid("type is the raw value's type without a converter; a converter decides its own")
        return self


class MappedSpec(_Spec):
    """A source field that the mapping file (``include/mappings/<name>.yaml``) maps onto A's vocabulary."""

    path: JsonPath
    required: bool = False
    """Missing, null or empty holds the record back."""


class ParentSpec(_Spec):
    """How a child record names its parent."""

    path: JsonPath
    """The parent reference's path in the record."""
    by: str = "source_key"
    """The parent level's column the reference matches: its ``source_key`` (default) or a UID
    column such as ``series_uid``."""
    required: bool = False
    """Missing, null or empty holds the record back."""
    type: Literal["string", "integer"] = "string"
    """``integer``: the reference is a JSON integer (the parent's integer key), matched as its decimal text."""
    format: Literal["uuid"] | None = None
    """``uuid``: must be lower-case UUID text, else the record is held back."""

    @model_validator(mode="after")
    def _uuid_is_text(self) -> ParentSpec:
        if self.type == "integer" and self.format is not None:
            raise _invalid("format: uuid is for a string reference")
        return self


class LevelFields(_Spec):
    """A column -> :class:`FieldSpec`, for the columns of one level only (``medsync.levels.SPECS``).

    Read like a dict of the columns given: ``items()``, ``keys()``, ``in``, ``[column]``, ``len``.
    A's NOT NULL columns that are not vocabulary (the mapping file feeds those) must be given.
    """

    table: ClassVar[str] = ""
    """A's table of the level, for messages."""
    needed: ClassVar[tuple[str, ...]] = ()
    """A's NOT NULL columns of the level that only a field can make."""

    @model_validator(mode="after")
    def _not_null_columns_are_made(self) -> LevelFields:
        missing = [column for column in self.needed if column not in self]
        if missing:
            raise _invalid(
                f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} NOT NULL in A's imaging.{self.table}: "
                f"a field must make {'it' if len(missing) == 1 else 'each'}, with required: true"
            )
        return self

    def items(self) -> Iterator[tuple[str, FieldSpec]]:
        for column in type(self).model_fields:
            spec = getattr(self, column)
            if spec is not None:
                yield column, spec

    def keys(self) -> Iterator[str]:
        return (column for column, _ in self.items())

    def __iter__(self) -> Iterator[str]:  # type: ignore[override]  # a dict's iteration, not BaseModel's
        return self.keys()

    def __contains__(self, column: object) -> bool:
        return isinstance(column, str) and column in type(self).model_fields and getattr(self, column) is not None

    def __getitem__(self, column: str) -> FieldSpec:
        spec = getattr(self, column, None) if column in type(self).model_fields else None
        if spec is None:
            raise KeyError(column)
        return spec  # type: ignore[no-any-return]

    def get(self, column: str) -> FieldSpec | None:
        return self[column] if column in self else None

    def __len__(self) -> int:
        return sum(1 for _ in self.items())


class LevelApi(_Spec):
    """One A level's list endpoint and how its records map onto A's columns.

    ``key``, ``version``, ``window`` and ``order`` override the section's for this level only (an
    API whose resources name their modification time differently, or filter by other parameters).
    """

    endpoint: Endpoint
    records_path: JsonPath | None = None
    """Where the records are; not given: the section's ``records_path``; null: the body itself."""
    params: dict[str, str] = Field(default_factory=dict)
    """Fixed query parameters of this level, over the section's ``params`` (a level's value wins)."""
    key: KeySpec | None = None
    """Where this level's records have their key; none: the section's ``key``."""
    version: VersionSpec | None = None
    """Where this level's records have their version; none: the section's ``version``."""
    window: WindowSpec | None = None
    """This level's window parameters; none: the section's ``window``."""
    order: Order | None = None
    """How this level's listing is sorted; none: the section's ``order``."""
    parent: ParentSpec | None = None
    """Every child level has one; the top level (subject) none."""
    fields: LevelFields = LevelFields()
    """A column -> how it is made (columns of this level only; ``medsync.levels.SPECS``)."""
    mapped: dict[str, MappedSpec] = Field(default_factory=dict)
    """Source field name (as the mapping file's ``field:`` names it) -> where it is."""


class Levels(_Spec):
    """Exactly A's four levels; ``levels[level]`` and ``levels.items()`` read it like a dict."""

    def __getitem__(self, level: str) -> LevelApi:
        if level not in LEVELS:
            raise KeyError(level)
        api: LevelApi = getattr(self, level)
        return api

    def items(self) -> Iterator[tuple[str, LevelApi]]:
        return ((level, self[level]) for level in LEVELS)

    def keys(self) -> tuple[str, ...]:
        return LEVELS

    def __iter__(self) -> Iterator[str]:  # type: ignore[override]  # a dict's iteration, not BaseModel's
        return iter(LEVELS)

    def __contains__(self, level: object) -> bool:
        return level in LEVELS

    def __len__(self) -> int:
        return len(LEVELS)


_RAW_TYPES: dict[str, type] = {"string": str, "integer": int, "boolean": bool}
_TYPE_NAMES: dict[type, str] = {
    str: "text",
    int: "an integer",
    date: "a date",
    datetime: "a timestamp",
    bool: "a boolean",
}
_CONVERTERS_MAKING: dict[type, str] = {
    made: ", ".join(sorted(name for name, out in OUTPUT_TYPES.items() if out is made))
    for made in set(OUTPUT_TYPES.values())
}


def _column_check(table: str, column: Column) -> Callable[[FieldSpec | None], FieldSpec | None]:
    stored = column.python_type

    def check(field: FieldSpec | None) -> FieldSpec | None:
        if field is None:
            return None
        # A value of the wrong type would fail the binary COPY of the whole pull: refused here instead.
        if field.convert is None and _RAW_TYPES[field.type] is not stored:
            hint = "; use type: integer or convert: int_string" if stored is int else ""
            if stored in (date, datetime):
                hint = f"; use a converter ({_CONVERTERS_MAKING[stored]}) or python:"
            raise _invalid(f"type {field.type} does not fit the column's {column.pg_type}{hint}")
        if field.convert in OUTPUT_TYPES and OUTPUT_TYPES[field.convert] is not stored:
            made = OUTPUT_TYPES[field.convert]
            raise _invalid(
                f"convert: {field.convert} makes {_TYPE_NAMES[made]}, which the column's {column.pg_type} does not "
                f"store (converters making {_TYPE_NAMES[stored]}: {_CONVERTERS_MAKING.get(stored, 'none')})"
            )
        if not column.nullable and not field.required and field.convert not in _NO_INPUT_CONVERTERS:
            # A null would fail the merge of the whole batch; required holds the one record back instead.
            raise _invalid(f"{column.name} is NOT NULL in A's imaging.{table}: the field needs required: true")
        return field

    return check


def _parent_check(level: str) -> Callable[[ParentSpec | None], ParentSpec | None]:
    parent_level = SPECS[level].parent_level

    def check(parent: ParentSpec | None) -> ParentSpec | None:
        if parent_level is None:
            if parent is not None:
                raise _invalid(f"{level} is the top level: it has no parent")
            return None
        if parent is None:
            raise _invalid(f"a {level} must say how it names its {parent_level} (path, by, required)")
        if not parent.required:
            # A's foreign key is NOT NULL: a record without its parent could never be stored.
            where = f"imaging.{SPECS[level].table}.{SPECS[level].parent_fk}"
            raise _invalid(f"A's {where} is NOT NULL: the parent needs required: true")
        columns = SPECS[parent_level].column_names
        if parent.by != "source_key" and parent.by not in columns:
            raise _invalid(
                f"by: {parent.by!r} is neither source_key nor a column of {parent_level} ({', '.join(columns)})"
            )
        return parent

    return check


def _level_model(level: str) -> type[LevelApi]:
    table, columns = SPECS[level].table, SPECS[level].columns
    fields_model: type[LevelFields] = create_model(  # type: ignore[call-overload]
        f"{level.title()}Fields",
        __base__=LevelFields,
        __doc__=f"The columns of {level}: {', '.join(c.name for c in columns)}.",
        **{c.name: (Annotated[FieldSpec | None, AfterValidator(_column_check(table, c))], None) for c in columns},
    )
    fields_model.table = table
    fields_model.needed = tuple(c.name for c in columns if not c.nullable and not c.vocabulary)
    model: type[LevelApi] = create_model(
        f"{level.title()}Api",
        __base__=LevelApi,
        __doc__=f"The {level} level's list endpoint and fields.",
        parent=(
            Annotated[ParentSpec | None, AfterValidator(_parent_check(level))],
            Field(default=None, validate_default=True),
        ),
        fields=(fields_model, Field(default_factory=dict, validate_default=True)),  # no fields: NOT NULL ones missing
    )
    return model


_LevelsModel: type[Levels] = create_model(  # type: ignore[call-overload]
    "Levels", __base__=Levels, **{level: (_level_model(level), ...) for level in LEVELS}
)


class RestApi(_Spec):
    """The ``api:`` section of a ``protocol: rest`` source: everything medsync needs to talk to it.

    The connection (``connections.api_conn_id``) holds the host and the secret; this says the rest.
    """

    auth: Auth
    """How the secret (the connection's password; for basic, login too) is sent."""
    base_path: str = Field(default="", pattern=r"^(/[^\s?#]*)?$")
    """Appended to the connection's URL when that has no path (a bare host, or a URL ending at the host)."""
    limits: Limits = Limits()
    key: KeySpec | None = None
    """Where a record's key is; may be left out when every level says its own."""
    version: VersionSpec | None = None
    """Where a record's version is; may be left out when every level says its own."""
    window: WindowSpec | None = None
    """The lists' window parameters; may be left out when every level (and a feed) says its own."""
    order: Order = "unsorted"
    """How the lists are sorted. ``version_ascending`` (by ``version``, oldest first) lets a window
    whose cursor or snapshot expired restart at the last version received, and a window without an
    upper bound stop at ``until``; ``unsorted`` restarts from the window's start and reads an
    unbounded listing to its end."""
    params: dict[str, str] = Field(default_factory=dict)
    """Fixed query parameters of every list request (e.g. ``include_deleted: "true"``)."""
    records_path: JsonPath | None = None
    """Where a list page's records are (``data``); none: the body is the array."""
    empty_page_omits_records: bool = False
    """An empty page leaves ``records_path`` out altogether (Spring Data REST's HAL ``_embedded``):
    an absent records path then reads as no records. False: it fails the pull as a malformed page."""
    paging: Paging
    expired: ExpiredSpec | None = None
    """How the source says a cursor or snapshot expired; none: it never does."""
    deletions: Deletions
    counts: CountsSpec | None = None
    """Live counts per level, when the source has them; without, reports say they could not check."""
    if TYPE_CHECKING:
        levels: Levels
    else:
        levels: _LevelsModel
    """Exactly A's four levels: subject, study, sequence, instance."""

    @model_validator(mode="after")
    def _identity_and_window_everywhere(self) -> RestApi:
        for what in ("key", "version", "window"):
            if getattr(self, what) is None:
                lacking = [level for level in LEVELS if getattr(self.levels[level], what) is None]
                if lacking:
                    raise _invalid(f"{what} is needed here or in every level (not in {', '.join(lacking)})")
        feed = self.deletions
        if isinstance(feed, FeedDeletions) and feed.window is None and self.window is None:
            raise _invalid("deletions: the feed needs its own window when the section has none")
        return self

    @model_validator(mode="after")
    def _paging_reads_an_object(self) -> RestApi:
        # A cursor, a next link or a total is read from the body, so the body cannot be the bare array.
        if _reads_body(self.paging):
            bare = [level for level in LEVELS if self.level_records_path(level) is None]
            if bare:
                raise _invalid(
                    f"paging {self.paging.type} reads the body, so the records are in it: records_path is "
                    f"needed (none for {', '.join(bare)})"
                )
        feed = self.deletions
        if isinstance(feed, FeedDeletions) and _reads_body(feed.paging or self.paging) and not self.feed_records_path():
            raise _invalid("deletions: the feed's paging reads the body, so its records_path is needed")
        return self

    # --- resolved settings (defaults filled in), for the client and the parser ----------------------

    def level_records_path(self, level: str) -> str | None:
        """Where ``level``'s records are in a page (the level's override, else the section's)."""
        api = self.levels[level]
        return api.records_path if "records_path" in api.model_fields_set else self.records_path

    def level_params(self, level: str) -> dict[str, str]:
        """The fixed query parameters of ``level``'s list requests."""
        return {**self.params, **self.levels[level].params}

    def level_key(self, level: str) -> KeySpec:
        """Where ``level``'s records have their key."""
        key = self.levels[level].key or self.key
        assert key is not None  # _identity_and_window_everywhere
        return key

    def level_version(self, level: str) -> VersionSpec:
        """Where ``level``'s records have their version."""
        version = self.levels[level].version or self.version
        assert version is not None  # _identity_and_window_everywhere
        return version

    def level_window(self, level: str) -> WindowSpec:
        """``level``'s window parameters."""
        window = self.levels[level].window or self.window
        assert window is not None  # _identity_and_window_everywhere
        return window

    def level_order(self, level: str) -> Order:
        """How ``level``'s listing is sorted."""
        return self.levels[level].order or self.order

    def feed(self) -> FeedDeletions:
        """The deletion feed; ValueError when deletions are not a feed."""
        feed = self.deletions
        if not isinstance(feed, FeedDeletions):
            raise ValueError("the source has no deletion feed")
        return feed

    def feed_records_path(self) -> str | None:
        """Where the deletion feed's items are in a page."""
        feed = self.feed()
        return feed.records_path if "records_path" in feed.model_fields_set else self.records_path

    def feed_window(self) -> WindowSpec:
        """The deletion feed's window parameters."""
        window = self.feed().window or self.window
        assert window is not None  # _identity_and_window_everywhere
        return window

    def feed_omits_records(self) -> bool:
        """Whether an empty page of the deletion feed leaves its records path out."""
        omits = self.feed().empty_page_omits_records
        return self.empty_page_omits_records if omits is None else omits


def _reads_body(paging: Paging) -> bool:
    return (
        isinstance(paging, CursorPaging | NextLinkPaging | LastRecordPaging)
        or (isinstance(paging, OffsetPaging) and paging.total_path is not None)
        or (isinstance(paging, PageNumberPaging) and paging.total_pages_path is not None)
    )


def _check_level_keys(value: Mapping[str, object], what: str) -> None:
    missing = [level for level in LEVELS if level not in value]
    unknown = [key for key in value if key not in LEVELS]
    if missing or unknown:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unknown {', '.join(map(repr, unknown))}"] if unknown else []
        )
        raise _invalid(f"{what} must name exactly {', '.join(LEVELS)}: {'; '.join(parts)}")
