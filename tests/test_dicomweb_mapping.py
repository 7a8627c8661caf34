"""docs/dicomweb-mapping.md is the DICOM -> A mapping: the code and include/mappings/pacs.yaml follow its tables.

The tables are read from the document by the small parser below (as tests/test_mapping.py reads
b-to-a.md), the tags are checked against pydicom's copy of the DICOM data dictionary, and the
document's examples are run through the parser.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from pydicom.datadict import keyword_for_tag

from medsync.levels import COMMON_COLUMNS, SPECS
from medsync.mapping import load_mapping
from medsync.sources.base import RecordRejected
from medsync.sources.dicomweb import records
from medsync.sources.dicomweb.records import DicomwebRecordParser
from medsync.sources.dicomweb.tags import READ

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "dicomweb-mapping.md"
MAPPING = ROOT / "include" / "mappings" / "pacs.yaml"
TABLE_LEVEL = {"subject": "subject", "study": "study", "sequence": "sequence", "instance": "instance"}
VERSION = {records.ANNOTATION: {"version": "2026-01-01T00:00:00+00:00"}}


def _table(heading: str) -> list[list[str]]:
    sections = re.split(r"^## ", DOC.read_text(encoding="utf-8"), flags=re.M)
    body = next((s for s in sections if s.startswith(heading)), None)
    assert body is not None, f"no section {heading!r}"
    rows = [line.strip() for line in body.splitlines() if line.strip().startswith("|")]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    return [r for r in cells[1:] if not all(set(c) <= set("-: ") for c in r)]


def _ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]*)`", cell)


def _token(cell: str) -> str | None:
    value = _ticked(cell)
    if not value or value == ["~"] or cell.strip() in ("~", "NULL"):
        return None
    return value[0]


def parser(zone: str = "Asia/Seoul") -> DicomwebRecordParser:
    return DicomwebRecordParser(load_mapping(MAPPING), bucket="a-bucket", key_prefix="pacs", zone=ZoneInfo(zone))


def element(tag: str, value: Any, vr: str = "LO") -> dict[str, Any]:
    return {tag: {"vr": vr, "Value": [value]}}


# --- columns --------------------------------------------------------------------------------------


def test_every_a_column_is_in_the_columns_table_once() -> None:
    documented = [a for row in _table("Columns") for a in _ticked(row[0])]
    expected = {f"{level}.{c}" for level, s in SPECS.items() for c in s.column_names}
    expected |= {f"{level}.source_key" for level in SPECS}
    expected |= {f"{level}.{s.parent_fk}" for level, s in SPECS.items() if s.parent_fk}
    rows = {a for a in documented if "." in a}
    assert rows == expected
    assert len(documented) == len(set(documented))
    commons = " ".join(row[0] for row in _table("Columns"))
    for column in ("source_updated_at", "deleted_at"):
        assert f"every table's `{column}`" in commons
    assert {c.name for c in COMMON_COLUMNS} >= {"source_updated_at", "deleted_at"}


def test_tags_and_keywords_are_dicoms_and_exactly_what_the_client_reads() -> None:
    documented: dict[str, set[str]] = {level: set() for level in SPECS}
    for a_cell, keyword_cell, tag_cell, _ in _table("Columns"):
        keywords, tags = _ticked(keyword_cell), _ticked(tag_cell)
        assert len(keywords) == len(tags), a_cell
        for keyword, tag in zip(keywords, tags, strict=True):
            group, elem = re.fullmatch(r"\(([0-9A-F]{4}),([0-9A-F]{4})\)", tag).groups()  # type: ignore[union-attr]
            assert keyword_for_tag(int(group + elem, 16)) == keyword, f"{tag} is not {keyword} in DICOM"
            for a in _ticked(a_cell):
                if "." in a:
                    documented[a.split(".")[0]].add(group + elem)
    # The client asks for (and versions) every documented attribute; the mapped ones are documented too.
    documented["study"] |= documented["subject"]  # a study item carries its patient's attributes
    for level, tags in documented.items():
        assert tags <= set(READ[level]), level
    for level, by_keyword in records.MAPPED.items():
        assert set(by_keyword.values()) <= documented[level], level
    # Every attribute read for a level is in the document (the instance level's study UID makes its key).
    for level, tags in READ.items():
        assert set(tags) <= documented[level] | documented["instance"] | documented["study"], level


# --- values ---------------------------------------------------------------------------------------


def _documented_values() -> dict[str, dict[str | None, str | None]]:
    found: dict[str, dict[str | None, str | None]] = {}
    for keyword_cell, value_cell, _column, a_cell in _table("Values"):
        keyword = _ticked(keyword_cell)[0]
        value = _token(value_cell)
        assert value not in found.setdefault(keyword, {}), f"{keyword} {value} twice"
        found[keyword][value] = _token(a_cell)
    return found


def test_the_mapping_file_is_exactly_the_values_table() -> None:
    mapping = load_mapping(MAPPING)
    from_file: dict[str, dict[str | None, str | None]] = {}
    for level in SPECS:
        for entry in mapping.entries(level):
            assert len(entry.columns) == 1
            from_file[entry.field] = {k: v[0] for k, v in entry.values.items()}
    assert from_file == _documented_values()
    columns = {row[0].strip("`"): row[2].strip("`") for row in _table("Values")}
    for level in SPECS:
        for entry in mapping.entries(level):
            assert entry.columns == (columns[entry.field],)


def test_held_back_terms_are_not_mapped_and_are_quarantined() -> None:
    documented = _documented_values()
    p = parser()
    series = {
        **element("0020000D", "1.2.3", "UI"), **element("0020000E", "1.2.3.4", "UI"), **VERSION,
    }  # fmt: skip
    checked = 0
    for keyword_cell, terms_cell in _table("DICOM defined terms A has no value for"):
        keyword = _ticked(keyword_cell)[0]
        for term in _ticked(terms_cell):
            if term in ("M", "F", "O"):
                continue
            assert term not in documented.get(keyword, {}), f"{keyword} {term} is held back and mapped"
            if keyword in ("Modality", "BodyPartExamined"):
                tag = records.MAPPED["sequence"][keyword]
                raw = {**series, **element("00080060", "CT", "CS"), **element(tag, term, "CS")}
                with pytest.raises(RecordRejected, match=f"{keyword}: unknown value"):
                    p.parse("sequence", raw)
                checked += 1
    assert checked > 30


# --- patient name, study time, required attributes ------------------------------------------------


def test_patient_name_examples() -> None:
    rows = _table("Patient name")
    assert len(rows) >= 8
    for pn_cell, a_cell in rows:
        groups = json.loads(_ticked(pn_cell)[0])
        expected = None if a_cell.strip() == "NULL" else _ticked(a_cell)[0]
        assert records.patient_name(groups) == expected, pn_cell


def test_study_date_and_time_examples() -> None:
    rows = _table("Study date and time")
    assert len(rows) >= 6
    for day, moment, offset, zone, a_cell in rows:
        expected = None if a_cell.strip() == "NULL" else datetime.fromisoformat(_ticked(a_cell)[0])
        got = records.study_instant(_token(day), _token(moment), _token(offset), ZoneInfo(_ticked(zone)[0]))
        assert got == expected, (day, moment, offset, zone)
        assert got is None or got.tzinfo == UTC


def test_required_attributes_hold_a_record_back_with_the_attributes_named() -> None:
    p = parser()
    with pytest.raises(RecordRejected, match="required attribute missing or empty: PatientID"):
        p.parse("subject", {**element("00100010", {"Alphabetic": "Doe^John"}, "PN"), **VERSION})
    with pytest.raises(RecordRejected, match="StudyInstanceUID, PatientID"):
        p.parse("study", {**element("00080050", "A1"), **VERSION})
    with pytest.raises(RecordRejected, match="SeriesInstanceUID, Modality"):
        p.parse("sequence", {**element("0020000D", "1.2", "UI"), **VERSION})
    with pytest.raises(RecordRejected, match="StudyInstanceUID"):
        p.parse("instance", {**element("00080018", "1.2.3", "UI"), **element("0020000E", "1.2", "UI"), **VERSION})
    with pytest.raises(RecordRejected, match="StudyInstanceUID: is not a DICOM UID"):
        p.parse("study", {**element("0020000D", "1.2/../x", "UI"), **element("00100020", "P1"), **VERSION})


def test_a_whole_study_and_instance_as_the_document_says() -> None:
    p = parser()
    study = {
        **element("0020000D", "1.2.840.1", "UI"), **element("00100020", "P1"), **element("00100021", "HOSP"),
        **element("00080020", "20240301", "DA"), **element("00080030", "093015", "TM"),
        **element("00080201", "+0900", "SH"), **element("00080050", "ACC1  ", "SH"), **VERSION,
    }  # fmt: skip
    rec = p.parse("study", study)
    assert rec.source_key == "1.2.840.1"
    assert rec.values == ("HOSP\\P1", "1.2.840.1", "ACC1", datetime(2024, 3, 1, 0, 30, 15, tzinfo=UTC), None,
                          "COMPLETED")  # fmt: skip
    subject = p.parse("subject", study)
    assert subject.source_key == "HOSP\\P1" and subject.values == ("P1", None, None, None)
    instance = {
        **element("0020000D", "1.2.840.1", "UI"), **element("0020000E", "1.2.840.1.2", "UI"),
        **element("00080018", "1.2.840.1.2.3", "UI"), **element("00200013", 7, "IS"), **VERSION,
    }  # fmt: skip
    rec = p.parse("instance", instance)
    assert rec.values == ("1.2.840.1.2", "1.2.840.1.2.3", 7, "a-bucket",
                          "pacs/1.2.840.1/1.2.840.1.2/1.2.840.1.2.3.dcm", None, "application/dicom")  # fmt: skip
