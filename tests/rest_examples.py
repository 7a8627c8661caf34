"""The ``api:`` sections of protocol ``rest`` the tests use: B's and C's, as
``include/sources/b.yaml`` and ``include/sources/c.yaml`` say them."""

from __future__ import annotations

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
