"""The repo's copy of A's DDL is the contract's, so the demo and tests run against A's real tables."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = ROOT.parent / "shared" / "contracts" / "a-schema.sql"


@pytest.mark.skipif(not CONTRACT.exists(), reason="shared/contracts is not beside this checkout")
def test_a_schema_copy_matches_the_contract() -> None:
    copy = (ROOT / "include" / "sql" / "a_schema.sql").read_text()
    body = "".join(line for line in copy.splitlines(keepends=True) if not line.startswith("-- A copy of")
                   and not line.startswith("-- tests/test_contracts.py"))  # fmt: skip
    assert body == CONTRACT.read_text()
