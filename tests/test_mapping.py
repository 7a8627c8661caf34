"""``include/mappings/b.yaml`` against the agreed contract, and the mapping file format.

The expected mapping is read from ``shared/contracts/b-to-a.md`` ("Columns" and "Values"
tables) by the small parser below, never from medsync's own code or files.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest

from medsync.errors import ConfigError, MappingError
from medsync.mapping import Mapping, UnknownValue, load_mapping, parse_mapping

ROOT = Path(__file__).resolve().parents[1]
B_MAPPING = ROOT / "include" / "mappings" / "b.yaml"
CONTRACTS = Path(__file__).resolve().parents[2] / "shared" / "contracts"
B_TO_A = CONTRACTS / "b-to-a.md"
A_MODEL = CONTRACTS / "a-model.md"

Values = dict[str | None, tuple[str | None, ...]]


# --- a small reader for the contract's markdown tables -----------------------------------------


def _contract_text(path: Path) -> str:
    if not path.is_file():
        pytest.skip(f"contract {path} is not present (shared/ is expected beside the repo)")
    return path.read_text(encoding="utf-8")


def _table(text: str, heading: str) -> list[list[str]]:
    """Body rows (cells stripped) of the first table under ``## heading``."""
    section = re.split(r"^## ", text, flags=re.M)
    body = next((s for s in section if s.startswith(heading)), None)
    assert body is not None, f"no section {heading!r} in the contract"
    rows = [line.strip() for line in body.splitlines() if line.strip().startswith("|")]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    return [r for r in cells[1:] if not all(set(c) <= set("-: ") for c in r)]  # drop header + rule


def _ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]*)`", cell)


def _value(token: str) -> str | None:
    token = token.strip()
    if token in ("NULL", "null"):
        return None
    m = re.fullmatch(r"`([^`]+)`", token)
    assert m, f"cannot read contract token {token!r}"
    return m.group(1)


def _alternatives(side: str) -> list[str | None]:
    """```KNEE_LEFT`/`_RIGHT``` -> [KNEE_LEFT, KNEE_RIGHT]; ```L`/`R``` -> [L, R]; null -> [None]."""
    parts = [_value(p) for p in side.split("/")]
    first = parts[0]
    out: list[str | None] = [first]
    for p in parts[1:]:
        if p is not None and p.startswith("_") and first is not None:
            out.append(first.rsplit("_", 1)[0] + p)
        else:
            out.append(p)
    return out


def contract_columns() -> dict[str, tuple[str, tuple[str, ...]]]:
    """B field -> (A level, A columns) for every field mapped "by the table below"."""
    found: dict[str, tuple[str, tuple[str, ...]]] = {}
    for a_cell, b_cell in (row[:2] for row in _table(_contract_text(B_TO_A), "Columns")):
        if "by the table below" not in b_cell:
            continue
        targets = [t.split(".", 1) for t in _ticked(a_cell)]
        levels = {level for level, _ in targets}
        assert len(levels) == 1, a_cell
        field = _ticked(b_cell)[0].split(".", 1)[1]
        found[field] = (levels.pop(), tuple(column for _, column in targets))
    return found


def contract_values() -> dict[str, Values]:
    """B field -> {B value -> A values}, as b-to-a.md's "Values" table says."""
    text = _contract_text(B_TO_A)
    columns = contract_columns()
    out: dict[str, Values] = {}
    for field_cell, rules in (row[:2] for row in _table(text, "Values")):
        field = _ticked(field_cell)[0]
        width = len(columns[field][1])
        # "(laterality is NULL wherever not given)": missing trailing targets are NULL.
        pad_with_null = "NULL wherever not given" in rules
        table: Values = {}
        for item in re.split(r"[;,]", re.sub(r"\([^)]*\)", "", rules)):
            if not item.strip():
                continue
            left, right = (s.strip() for s in item.split("->"))
            sources = _alternatives(left)
            targets = [_alternatives(part) for part in right.split("+")]
            for i, source in enumerate(sources):
                row = tuple(t[i] if len(t) > 1 else t[0] for t in targets)
                if len(row) < width:
                    assert pad_with_null, f"{field}: {item!r} gives fewer values than columns"
                    row = row + (None,) * (width - len(row))
                assert source not in table, f"{field}: {source!r} twice in the contract"
                table[source] = row
        out[field] = table
    return out


def _file_values(mapping: Mapping) -> dict[str, tuple[str, tuple[str, ...], Values]]:
    return {
        entry.field: (level, entry.columns, dict(entry.values))
        for level in ("subject", "study", "sequence", "instance")
        for entry in mapping.entries(level)
    }


@pytest.fixture(scope="module")
def b_mapping() -> Mapping:
    return load_mapping(B_MAPPING)


# --- the contract reader reads what a human reads ------------------------------------------------


def test_contract_reader_finds_every_enum_field_and_the_tricky_rows() -> None:
    values = contract_values()
    assert set(values) == {"gender", "status", "modality", "body_part"}
    assert values["body_part"]["KNEE_LEFT"] == ("KNEE", "L")
    assert values["body_part"]["BREAST_BOTH"] == ("BREAST", "B")
    assert values["body_part"]["HEAD"] == ("HEAD", None)
    assert values["body_part"][None] == (None, None)
    assert values["gender"]["UNKNOWN"] == (None,)
    assert values["gender"][None] == (None,)
    assert len(values["body_part"]) == 22
    assert len(values["modality"]) == 10
    assert contract_columns()["body_part"] == ("sequence", ("body_part", "laterality"))


# --- b.yaml says exactly what the contract says ------------------------------------------------------


def test_b_mapping_maps_the_same_b_fields_to_the_same_a_columns(b_mapping: Mapping) -> None:
    file = {field: (level, columns) for field, (level, columns, _) in _file_values(b_mapping).items()}
    assert file == contract_columns()


@pytest.mark.parametrize("field", ["gender", "status", "modality", "body_part"])
def test_b_mapping_maps_every_b_value_exactly_as_the_contract_and_nothing_else(b_mapping: Mapping, field: str) -> None:
    expected = contract_values()[field]
    _, _, actual = _file_values(b_mapping)[field]
    assert {k: v for k, v in actual.items() if k not in expected} == {}, "values the contract does not list"
    assert {k: v for k, v in expected.items() if k not in actual} == {}, "contract values missing in the file"
    assert actual == expected


def test_b_mapping_targets_are_in_as_vocabularies(b_mapping: Mapping) -> None:
    allowed: dict[str, set[str | None]] = {}
    for column_cell, values_cell in (row[:2] for row in _table(_contract_text(A_MODEL), "A's vocabularies")):
        column = _ticked(column_cell)[0].split(".", 1)[1]
        allowed[column] = set(_ticked(values_cell)) | ({None} if "NULL" in values_cell else set())
    for _level, column, value in b_mapping.targets():
        assert value in allowed[column], f"{column}={value!r} is not in A's vocabulary"


def test_b_mapping_is_for_source_b(b_mapping: Mapping) -> None:
    assert b_mapping.source == "b"


@pytest.mark.parametrize(
    ("level", "record", "expected"),
    [
        ("sequence", {"body_part": "KNEE_LEFT", "modality": "MRI"}, {"body_part": "KNEE", "laterality": "L"}),
        ("sequence", {"body_part": "SPINE_LUMBAR", "modality": "CT"}, {"body_part": "LSPINE", "laterality": None}),
        ("sequence", {"body_part": None, "modality": "XRAY"}, {"body_part": None, "laterality": None}),
        ("sequence", {"modality": "PET"}, {"modality": "PT", "body_part": None, "laterality": None}),
        ("subject", {"gender": "UNKNOWN"}, {"sex": None}),
        ("subject", {"gender": None}, {"sex": None}),
        ("subject", {"gender": "FEMALE"}, {"sex": "F"}),
        ("study", {"status": "ORDERED"}, {"status": "REQUESTED"}),
        ("study", {"status": "IN_PROGRESS"}, {"status": "ACQUIRING"}),
    ],
)
def test_apply_maps_a_record_per_contract(
    b_mapping: Mapping, level: str, record: dict[str, Any], expected: dict[str, str | None]
) -> None:
    applied = b_mapping.apply(level, record)
    assert {k: applied[k] for k in expected} == expected


def test_apply_on_instance_maps_nothing(b_mapping: Mapping) -> None:
    assert b_mapping.apply("instance", {"file_path": "/x"}) == {}


@pytest.mark.parametrize(
    ("level", "record", "field"),
    [
        ("subject", {"gender": "NONBINARY"}, "gender"),
        ("subject", {"gender": "male"}, "gender"),  # B's vocabulary is case-sensitive
        ("study", {"status": "SCHEDULED"}, "status"),
        ("study", {"status": None}, "status"),  # null is not listed for status
        ("study", {}, "status"),
        ("sequence", {"modality": "MRI", "body_part": "ELBOW_LEFT"}, "body_part"),
        ("sequence", {"modality": "MR"}, "modality"),  # A's code is not a B value
        ("sequence", {"modality": 3}, "modality"),
    ],
)
def test_unknown_value_raises_unknown_value_naming_the_field(
    b_mapping: Mapping, level: str, record: dict[str, Any], field: str
) -> None:
    with pytest.raises(UnknownValue) as caught:
        b_mapping.apply(level, record)
    assert caught.value.field == field
    assert field in str(caught.value)


# --- malformed mapping files ---------------------------------------------------------------------------


def _valid_raw() -> dict[str, Any]:
    return {
        "source": "x",
        "subject": [{"field": "gender", "columns": ["sex"], "values": {"MALE": "M", None: None}}],
        "sequence": [
            {"field": "body_part", "columns": ["body_part", "laterality"], "values": {"KNEE_LEFT": ["KNEE", "L"]}}
        ],
    }


def test_the_valid_base_used_below_parses() -> None:
    mapping = parse_mapping(_valid_raw())
    assert mapping.apply("sequence", {"body_part": "KNEE_LEFT"}) == {"body_part": "KNEE", "laterality": "L"}


def _broken(change: str) -> dict[str, Any]:
    raw = copy.deepcopy(_valid_raw())
    subject, sequence = raw["subject"][0], raw["sequence"][0]
    if change == "too few values":
        sequence["values"]["KNEE_LEFT"] = ["KNEE"]
    elif change == "scalar for two columns":
        sequence["values"]["KNEE_LEFT"] = "KNEE"
    elif change == "too many values":
        subject["values"]["MALE"] = ["M", "X"]
    elif change == "unknown A column":
        subject["columns"] = ["gender_code"]
    elif change == "column of another level":
        subject["columns"] = ["modality"]
    elif change == "column fed by two entries":
        raw["subject"].append({"field": "sex_at_birth", "columns": ["sex"], "values": {"M": "M"}})
    elif change == "column fed twice by one entry":
        sequence["columns"] = ["body_part", "body_part"]
    elif change == "integer target":
        subject["values"]["MALE"] = 1
    elif change == "boolean target":
        subject["values"]["MALE"] = True
    elif change == "nested list target":
        sequence["values"]["KNEE_LEFT"] = [["KNEE"], "L"]
    elif change == "integer source value":
        subject["values"][3] = "M"
    elif change == "boolean source value":
        subject["values"][True] = "M"
    elif change == "unknown level key":
        raw["patient"] = raw.pop("subject")
    elif change == "level is not a list":
        raw["subject"] = subject
    elif change == "entry with an extra key":
        subject["default"] = "O"
    elif change == "entry without values":
        del subject["values"]
    elif change == "empty values":
        subject["values"] = {}
    elif change == "no source":
        del raw["source"]
    else:
        raise AssertionError(change)
    return raw


@pytest.mark.parametrize(
    "change",
    [
        "too few values",
        "scalar for two columns",
        "too many values",
        "unknown A column",
        "column of another level",
        "column fed by two entries",
        "column fed twice by one entry",
        "integer target",
        "boolean target",
        "nested list target",
        "integer source value",
        "boolean source value",
        "unknown level key",
        "level is not a list",
        "entry with an extra key",
        "entry without values",
        "empty values",
        "no source",
    ],
)
def test_malformed_mapping_raises_mapping_error(change: str) -> None:
    with pytest.raises(MappingError):
        parse_mapping(_broken(change), where="x.yaml")


def test_mapping_error_names_where_the_problem_is() -> None:
    with pytest.raises(MappingError) as caught:
        parse_mapping(_broken("unknown A column"), where="include/mappings/x.yaml")
    assert "include/mappings/x.yaml" in str(caught.value)
    assert "gender_code" in str(caught.value)


def test_mapping_error_is_a_config_error() -> None:
    assert issubclass(MappingError, ConfigError)


def test_yaml_booleans_in_a_mapping_file_are_refused(tmp_path: Path) -> None:
    # YAML 1.1 reads an unquoted ON / YES / NO as a boolean, never as the string.
    path = tmp_path / "x.yaml"
    path.write_text("source: x\nsubject:\n  - field: gender\n    columns: [sex]\n    values: {ON: M}\n")
    with pytest.raises(MappingError):
        load_mapping(path)


def test_unreadable_mapping_yaml_raises_mapping_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text("source: x\nsubject: [\n", encoding="utf-8")
    with pytest.raises(MappingError) as caught:
        load_mapping(path)
    assert str(path) in str(caught.value)


def test_missing_mapping_file_raises_mapping_error(tmp_path: Path) -> None:
    with pytest.raises(MappingError):
        load_mapping(tmp_path / "nope.yaml")
