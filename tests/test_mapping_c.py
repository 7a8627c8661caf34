"""``include/mappings/c.yaml`` against the agreed contract ``shared/contracts/c-to-a.md``.

The expected mapping is read from c-to-a.md's "Columns" and "Values" tables by the small reader
below, never from medsync's own code or files (as ``test_mapping.py`` does for B).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from medsync.config import get_source_config
from medsync.mapping import Mapping, UnknownValue, load_mapping

ROOT = Path(__file__).resolve().parents[1]
C_MAPPING = ROOT / "include" / "mappings" / "c.yaml"
CONTRACTS = Path(__file__).resolve().parents[2] / "shared" / "contracts"
C_TO_A = CONTRACTS / "c-to-a.md"
A_MODEL = CONTRACTS / "a-model.md"

Values = dict[str | None, tuple[str | None, ...]]


def _contract_text(path: Path) -> str:
    if not path.is_file():
        pytest.skip(f"contract {path} is not present (shared/ is expected beside the repo)")
    return path.read_text(encoding="utf-8")


def _table(text: str, heading: str) -> list[list[str]]:
    """Body rows (cells stripped) of the first table under ``## heading``."""
    sections = re.split(r"^## ", text, flags=re.M)
    body = next((s for s in sections if s.startswith(heading)), None)
    assert body is not None, f"no section {heading!r} in the contract"
    rows = [line.strip() for line in body.splitlines() if line.strip().startswith("|")]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    return [r for r in cells[1:] if not all(set(c) <= set("-: ") for c in r)]


def _ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]*)`", cell)


def _value(token: str) -> str | None:
    token = token.strip()
    if token in ("NULL", "null"):
        return None
    m = re.fullmatch(r"`([^`]+)`", token)
    assert m, f"cannot read contract token {token!r}"
    return m.group(1)


def contract_columns() -> dict[str, tuple[str, tuple[str, ...]]]:
    """C field -> (A level, A columns) for every field mapped "by the table below" / "by its table below"."""
    found: dict[str, tuple[str, tuple[str, ...]]] = {}
    for a_cell, c_cell in (row[:2] for row in _table(_contract_text(C_TO_A), "Columns")):
        if not re.search(r"by (the|its) table below", c_cell):
            continue
        level, column = _ticked(a_cell)[0].split(".", 1)
        field = _ticked(c_cell)[0].split(".", 1)[1]
        assert field not in found, f"{field} feeds two columns"
        found[field] = (level, (column,))
    return found


def contract_values() -> dict[str, Values]:
    """C field -> {C value -> A values}, as c-to-a.md's "Values" table says."""
    out: dict[str, Values] = {}
    for field_cell, rules in (row[:2] for row in _table(_contract_text(C_TO_A), "Values")):
        field = _ticked(field_cell)[0]  # `anatomy` -> `body_part`: the C field comes first
        table: Values = {}
        for item in re.split(r"[;,]", rules):
            if not item.strip():
                continue
            left, right = (s.strip() for s in item.split("->"))
            source = _value(left)
            assert source not in table, f"{field}: {source!r} twice in the contract"
            table[source] = (_value(right),)
        out[field] = table
    return out


def _file_values(mapping: Mapping) -> dict[str, tuple[str, tuple[str, ...], Values]]:
    return {
        entry.field: (level, entry.columns, dict(entry.values))
        for level in ("subject", "study", "sequence", "instance")
        for entry in mapping.entries(level)
    }


@pytest.fixture(scope="module")
def c_mapping() -> Mapping:
    return load_mapping(C_MAPPING)


def test_contract_reader_finds_every_code_field_and_the_tricky_rows() -> None:
    values = contract_values()
    assert set(values) == {"sex", "state", "modality", "anatomy", "side"}
    assert values["sex"]["u"] == (None,)
    assert values["sex"][None] == (None,)
    assert values["modality"]["pet_ct"] == ("PT",)
    assert values["anatomy"]["whole_body"] == ("WHOLEBODY",)
    assert values["anatomy"][None] == (None,)
    assert values["side"]["bilateral"] == ("B",)
    assert len(values["anatomy"]) == 16
    assert len(values["modality"]) == 9
    columns = contract_columns()
    assert columns["anatomy"] == ("sequence", ("body_part",))
    assert columns["side"] == ("sequence", ("laterality",))
    assert columns["state"] == ("study", ("status",))


def test_c_mapping_maps_the_same_c_fields_to_the_same_a_columns(c_mapping: Mapping) -> None:
    file = {field: (level, columns) for field, (level, columns, _) in _file_values(c_mapping).items()}
    assert file == contract_columns()


@pytest.mark.parametrize("field", ["sex", "state", "modality", "anatomy", "side"])
def test_c_mapping_maps_every_c_value_exactly_as_the_contract_and_nothing_else(c_mapping: Mapping, field: str) -> None:
    expected = contract_values()[field]
    _, _, actual = _file_values(c_mapping)[field]
    assert {k: v for k, v in actual.items() if k not in expected} == {}, "values the contract does not list"
    assert {k: v for k, v in expected.items() if k not in actual} == {}, "contract values missing in the file"
    assert actual == expected


def test_c_mapping_targets_are_in_as_vocabularies(c_mapping: Mapping) -> None:
    allowed: dict[str, set[str | None]] = {}
    for column_cell, values_cell in (row[:2] for row in _table(_contract_text(A_MODEL), "A's vocabularies")):
        column = _ticked(column_cell)[0].split(".", 1)[1]
        allowed[column] = set(_ticked(values_cell)) | ({None} if "NULL" in values_cell else set())
    for _level, column, value in c_mapping.targets():
        assert value in allowed[column], f"{column}={value!r} is not in A's vocabulary"


def test_c_mapping_is_for_source_c_and_its_config_names_it(c_mapping: Mapping) -> None:
    assert c_mapping.source == "c"
    assert get_source_config("c").mapping_path == C_MAPPING


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"modality": "mr", "anatomy": "knee", "side": "left"}, {"body_part": "KNEE", "laterality": "L"}),
        ({"modality": "ct", "anatomy": None, "side": "right"}, {"body_part": None, "laterality": "R"}),
        ({"modality": "us", "anatomy": "chest", "side": None}, {"body_part": "CHEST", "laterality": None}),
        ({"modality": "pet_ct"}, {"modality": "PT", "body_part": None, "laterality": None}),
    ],
)
def test_anatomy_and_side_are_mapped_each_on_its_own(
    c_mapping: Mapping, record: dict[str, str | None], expected: dict[str, str | None]
) -> None:
    applied = c_mapping.apply("sequence", record)
    assert {k: applied[k] for k in expected} == expected


@pytest.mark.parametrize(
    ("level", "record", "field"),
    [
        ("sequence", {"modality": "MR"}, "modality"),  # codes are compared exactly
        ("sequence", {"modality": "mr", "side": "Left"}, "side"),
        ("sequence", {"modality": "mr", "anatomy": "elbow"}, "anatomy"),
        ("subject", {"sex": "M"}, "sex"),
        ("study", {"state": "scheduled"}, "state"),
    ],
)
def test_an_unknown_code_is_unknown(c_mapping: Mapping, level: str, record: dict[str, str | None], field: str) -> None:
    with pytest.raises(UnknownValue) as caught:
        c_mapping.apply(level, record)
    assert caught.value.field == field
