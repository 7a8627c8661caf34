"""Source protocols: one subpackage per way of talking to a source.

A source config names its protocol (``protocol: b_rest``); :func:`get_protocol`
turns that name into the protocol's package, which holds its client and record
models. Importing this package imports no protocol: each is loaded on demand so
DAG parsing stays light.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from medsync.errors import ConfigError

_PROTOCOLS: dict[str, str] = {
    "b_rest": "medsync.sources.b_rest",
}


def known_protocols() -> tuple[str, ...]:
    """Every protocol name a source config may use, sorted."""
    return tuple(sorted(_PROTOCOLS))


def get_protocol(name: str) -> ModuleType:
    """The package of protocol ``name`` (e.g. ``medsync.sources.b_rest`` for ``"b_rest"``).

    Raises ``ConfigError`` for a name that is not a known protocol.
    """
    module_name = _PROTOCOLS.get(name)
    if module_name is None:
        raise ConfigError(f"unknown source protocol {name!r}; known protocols: {', '.join(known_protocols())}")
    return importlib.import_module(module_name)
