"""The ``api:`` sections of protocol ``rest`` the tests use: B's and C's, as
``include/sources/b.yaml`` and ``include/sources/c.yaml`` say them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import yaml

from medsync.config import include_dir


def _api_of(name: str) -> dict[str, Any]:
    config = yaml.safe_load((include_dir() / "sources" / f"{name}.yaml").read_text())
    section: dict[str, Any] = config["api"]
    return section


def b_api() -> dict[str, Any]:
    """B's ``api:`` section (a fresh copy each call)."""
    return _api_of("b")


def c_api() -> dict[str, Any]:
    """C's ``api:`` section (a fresh copy each call)."""
    return _api_of("c")


# --- python: converters of a source's own, for tests of the escape hatch ------------------------------


def naive_time(value: object) -> datetime:
    """A converter with a bug: a datetime without its offset."""
    return datetime(2026, 11, 3, 9, 30)


def flag(value: object) -> bool:
    """A converter with a bug: a boolean, for any column."""
    return bool(value)


def huge(value: object) -> int:
    """A converter with a bug: an integer no integer column holds."""
    return 2**40


def text_with_nul(value: object) -> str:
    """Text with a NUL character, which PostgreSQL cannot store."""
    return f"a\x00{value}"
