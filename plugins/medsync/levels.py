"""A's hierarchy as medsync writes it: per level, its table, columns and parent link.

Everything that is generic over levels (staging tables, merge SQL, checks of A's
tables, reports) is driven by these specs, so the four levels share one code path.
The column types are A's (``a-schema.sql``); ``prepare`` checks the live database
against them before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from uuid import UUID

from medsync.config import LEVELS
from medsync.errors import ConfigError

PYTHON_TYPES: dict[str, type] = {
    "text": str,
    "character": str,
    "integer": int,
    "bigint": int,
    "date": date,
    "timestamp with time zone": datetime,
    "uuid": UUID,
}
"""The Python type a value of each of A's column types is staged as (binary COPY takes nothing else)."""


@dataclass(frozen=True)
class Column:
    name: str
    pg_type: str
    """As ``information_schema.columns.data_type`` spells it."""
    nullable: bool = True
    """False for A's NOT NULL columns: a null there fails the merge of a whole batch, so a source
    must make them and hold back a record without a value (``prepare`` checks A's DDL agrees)."""
    vocabulary: bool = False
    """A allows a fixed list of codes (a CHECK ... IN): the source's mapping file feeds it."""

    @property
    def python_type(self) -> type:
        """What a value of this column is in Python: ``str``, ``int``, ``date`` or ``datetime`` (aware)."""
        return PYTHON_TYPES[self.pg_type]


@dataclass(frozen=True)
class LevelSpec:
    level: str
    table: str
    """Table in A's ``imaging`` schema."""
    columns: tuple[Column, ...]
    """The content columns the source's records map onto (not ids, versions or timestamps)."""
    parent_level: str | None = None
    parent_fk: str | None = None
    """A's column that references the parent row's id."""

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    @property
    def child_level(self) -> str | None:
        index = LEVELS.index(self.level)
        return LEVELS[index + 1] if index + 1 < len(LEVELS) else None


SPECS: dict[str, LevelSpec] = {
    "subject": LevelSpec(
        level="subject",
        table="subject",
        columns=(
            Column("patient_code", "text", nullable=False),
            Column("patient_name", "text"),
            Column("sex", "character", vocabulary=True),
            Column("birth_date", "date"),
        ),
    ),
    "study": LevelSpec(
        level="study",
        table="study",
        columns=(
            Column("study_uid", "text", nullable=False),
            Column("accession_number", "text"),
            Column("study_at", "timestamp with time zone"),
            Column("description", "text"),
            Column("status", "text", nullable=False, vocabulary=True),
        ),
        parent_level="subject",
        parent_fk="subject_id",
    ),
    "sequence": LevelSpec(
        level="sequence",
        table="sequence",
        columns=(
            Column("series_uid", "text", nullable=False),
            Column("series_number", "integer"),
            Column("modality", "text", nullable=False, vocabulary=True),
            Column("body_part", "text", vocabulary=True),
            Column("laterality", "character", vocabulary=True),
            Column("description", "text"),
        ),
        parent_level="study",
        parent_fk="study_id",
    ),
    "instance": LevelSpec(
        level="instance",
        table="instance",
        columns=(
            Column("sop_instance_uid", "text", nullable=False),
            Column("instance_number", "integer"),
            Column("storage_bucket", "text", nullable=False),
            Column("storage_key", "text", nullable=False),
            Column("size_bytes", "bigint"),
            Column("content_type", "text"),
        ),
        parent_level="sequence",
        parent_fk="sequence_id",
    ),
}

COMMON_COLUMNS: tuple[Column, ...] = (
    Column("id", "uuid"),
    Column("source_system", "text"),
    Column("source_key", "text"),
    Column("source_updated_at", "timestamp with time zone"),
    Column("deleted_at", "timestamp with time zone"),
    Column("created_at", "timestamp with time zone"),
    Column("updated_at", "timestamp with time zone"),
)


def spec(level: str) -> LevelSpec:
    try:
        return SPECS[level]
    except KeyError:
        raise ConfigError(f"unknown level {level!r}; levels are {', '.join(LEVELS)}") from None


def staged_columns(level: str) -> tuple[str, ...]:
    """Columns of a staging row after the fixed ones, in the order parsers produce them."""
    s = spec(level)
    return (("parent_key",) if s.parent_level else ()) + s.column_names


STAGE_FIXED_COLUMNS: tuple[str, ...] = ("source_key", "source_updated_at", "deleted", "new_id", "slice", "chunk")
