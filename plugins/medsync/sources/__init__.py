"""Source protocols: one subpackage per way of talking to a source, found by name.

A source config names its protocol (``protocol: rest``). :func:`open_source` turns a config
into the protocol's :class:`~medsync.sources.base.Source`; :func:`validate_api` checks a config's
``api:`` section with the protocol's own pydantic model. The interface every protocol implements
is :mod:`medsync.sources.base`. Importing this package imports no protocol: each is loaded on
demand, so DAG parsing stays light (a protocol's ``api_model`` module must import only pydantic).

Adding a protocol: a package ``medsync.sources.<name>`` with a ``Source`` subclass, and one line
in ``_PROTOCOLS`` below.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from medsync.errors import ConfigError

if TYPE_CHECKING:
    from medsync.config import SourceConfig
    from medsync.sources.base import Source

_PROTOCOLS: dict[str, tuple[str, str]] = {
    # name: (the api section's pydantic model, the Source class), as "module:attribute"
    "rest": ("medsync.sources.rest.spec:RestApi", "medsync.sources.rest.source:RestSource"),
    "dicomweb": ("medsync.sources.dicomweb.spec:DicomwebApi", "medsync.sources.dicomweb.source:DicomwebSource"),
}


def known_protocols() -> tuple[str, ...]:
    """Every protocol name a source config may use, sorted."""
    return tuple(sorted(_PROTOCOLS))


def _load(dotted: str) -> Any:
    module, _, attribute = dotted.partition(":")
    return getattr(importlib.import_module(module), attribute)


def _entry(protocol: str) -> tuple[str, str]:
    try:
        return _PROTOCOLS[protocol]
    except KeyError:
        raise ConfigError(
            f"unknown source protocol {protocol!r}; known protocols: {', '.join(known_protocols())}"
        ) from None


def api_model(protocol: str) -> type[BaseModel]:
    """The pydantic model of the ``api:`` section of a ``protocol`` source config."""
    model: type[BaseModel] = _load(_entry(protocol)[0])
    return model


def validate_api(protocol: str, raw: object, where: str) -> BaseModel:
    """``raw`` (a config's ``api:`` section) validated by the protocol's model.

    Raises ``ConfigError`` naming ``where`` (the file), each key path (``api.levels.study.paging``)
    and what is wrong with it.
    """
    from medsync.config import key_path

    section = raw if raw is not None else {}
    try:
        return api_model(protocol).model_validate(section)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(filter(None, ('api', key_path(e['loc'], section))))}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"{where}: {problems}") from exc


def open_source(cfg: SourceConfig, where: str | None = None) -> Source:
    """The :class:`~medsync.sources.base.Source` for ``cfg`` (its protocol imported on first use).

    Raises ``ConfigError`` naming ``where`` (default: the config's file) when the ``api:`` section
    or a setting that depends on the protocol (``page_size``) is wrong. A protocol's ``Source``
    module imports nothing heavy: configs are loaded while DAG files are parsed.
    """
    where = where or f"include/sources/{cfg.name}.yaml"
    source_cls: type[Source] = _load(_entry(cfg.protocol)[1])
    try:
        return source_cls(cfg, validate_api(cfg.protocol, cfg.api, where))
    except ConfigError as exc:
        raise ConfigError(str(exc) if str(exc).startswith(where) else f"{where}: {exc}") from exc
