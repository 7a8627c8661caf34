"""Every YAML block of docs/rest-sources.md and README.md that is a source's config or its ``api:``
section is validated with the real models, so the documentation cannot drift from the code.

A block with ``protocol`` is a whole source config (``SourceConfig`` and then its protocol's
``api:`` model); a block with an ``api`` key, or the keys of one (``auth``, ``paging``,
``levels``), is an ``api:`` section; a mapping file's block (``source``) is parsed as a mapping.
A block that is none of these fails the test: a fragment cannot be checked, so the docs show
whole sections.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from medsync.config import SourceConfig
from medsync.mapping import parse_mapping
from medsync.sources import validate_api
from medsync.sources.rest.spec import RestApi

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("docs/rest-sources.md", "README.md")
_BLOCK = re.compile(r"^```yaml\n(.*?)^```", re.M | re.S)
_API_KEYS = frozenset({"auth", "paging", "levels", "window", "key", "version"})


def yaml_blocks(name: str) -> list[tuple[int, dict[str, Any]]]:
    """Every ```yaml block of ``name`` (its line number, the parsed mapping)."""
    text = (ROOT / name).read_text(encoding="utf-8")
    blocks = []
    for match in _BLOCK.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        parsed = yaml.safe_load(match.group(1))
        assert isinstance(parsed, dict), f"{name}:{line}: a YAML block that is not a mapping"
        blocks.append((line, parsed))
    return blocks


def _cases() -> list[Any]:
    return [pytest.param(name, line, block, id=f"{name}:{line}") for name in DOCS for line, block in yaml_blocks(name)]


@pytest.mark.parametrize(("name", "line", "block"), _cases())
def test_every_yaml_block_is_a_valid_config_api_section_or_mapping(name: str, line: int, block: dict[str, Any]) -> None:
    where = f"{name}:{line}"
    if "protocol" in block:
        config = SourceConfig.model_validate(block)
        validate_api(config.protocol, config.api, where)
    elif "api" in block:
        assert set(block) == {"api"}, f"{where}: an api: block holds the section only"
        assert isinstance(validate_api("rest", block["api"], where), RestApi)
    elif _API_KEYS & set(block):
        assert isinstance(validate_api("rest", block, where), RestApi)
    elif "source" in block:
        parse_mapping(block, where)
    else:
        pytest.fail(f"{where}: a YAML block that is neither a config, an api: section nor a mapping: {sorted(block)}")


def test_the_blocks_are_found() -> None:
    # Guards the extraction itself: the six API styles, the walkthrough's config and its mapping.
    assert len(yaml_blocks("docs/rest-sources.md")) >= 6
    assert sum("api" in block for _, block in yaml_blocks("docs/rest-sources.md")) >= 6
    readme = [block for _, block in yaml_blocks("README.md")]
    assert any("protocol" in block for block in readme) and any("source" in block for block in readme)
