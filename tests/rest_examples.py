"""Example ``api:`` sections of protocol ``rest`` used by the tests: C's (shared/contracts/source-c/,
c-to-a.md) as its source config will say it, and B's as ``include/sources/b.yaml`` says it."""

from __future__ import annotations

from typing import Any

import yaml

from medsync.config import include_dir

C_API_YAML = """
auth: {type: bearer}
limits: {max_page_size: 500, retry_after: http_date}
key: {path: uuid, format: uuid}
version: {path: modified, format: epoch_millis}
window: {since_param: modified_from, until_param: modified_to, format: epoch_millis}
paging: {type: link_header, page_size_param: page_size}
expired: {status: 410, code_path: error.code, code: snapshot_expired}
deletions:
  type: feed
  endpoint: /deletions
  resource_path: resource
  key: {path: uuid, format: uuid}
  version: {path: deleted, format: epoch_millis}
  resources: {subject: participants, study: visits, sequence: acquisitions, instance: files}
counts:
  endpoint: /stats
  paths: {subject: participants, study: visits, sequence: acquisitions, instance: files}
levels:
  subject:
    endpoint: /participants
    fields:
      patient_code: {path: identifiers.mrn}
      patient_name: {path: display_name, convert: pn_comma}
      birth_date: {path: dob, convert: dicom_da}
    mapped:
      sex: {path: sex}
  study:
    endpoint: /visits
    parent: {path: participant, required: true, format: uuid}
    fields:
      study_uid: {path: study_instance_uid, required: true}
      accession_number: {path: accession}
      study_at: {path: started, convert: rfc3339}
      description: {path: label}
    mapped:
      state: {path: state, required: true}
  sequence:
    endpoint: /acquisitions
    parent: {path: visit, required: true, format: uuid}
    fields:
      series_uid: {path: series_instance_uid, required: true}
      series_number: {path: series_no, convert: int_string}
      description: {path: notes}
    mapped:
      modality: {path: modality, required: true}
      anatomy: {path: anatomy}
      side: {path: side}
  instance:
    endpoint: /files
    parent: {path: acquisition, required: true, format: uuid}
    fields:
      sop_instance_uid: {path: sop_instance_uid, required: true}
      instance_number: {path: index, type: integer}
      storage_bucket: {path: object.bucket, required: true, convert: allowed_bucket}
      storage_key: {path: object.key, required: true, convert: relative_key}
      size_bytes: {path: bytes, type: integer, minimum: 0}
      content_type: {path: mime}
"""


def c_api() -> dict[str, Any]:
    """C's ``api:`` section, as plain data (a fresh copy each call)."""
    section: dict[str, Any] = yaml.safe_load(C_API_YAML)
    return section


def b_api() -> dict[str, Any]:
    """B's ``api:`` section as ``include/sources/b.yaml`` says it (a fresh copy each call)."""
    config = yaml.safe_load((include_dir() / "sources" / "b.yaml").read_text())
    section: dict[str, Any] = config["api"]
    return section
