"""The ``api:`` section of a ``dicomweb`` source config. Imports pydantic only (DAG parse time)."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, field_validator

from medsync.config import IanaTimeZone


class ChangeFeed(StrEnum):
    NONE = "none"
    """The PACS has no change feed: every run lists every level (DICOMweb has no modified-since search)."""
    ORTHANC = "orthanc"
    """Orthanc's ``/changes`` (REST API beside DICOMweb): incremental runs fetch what changed in the window."""


class FilesMode(StrEnum):
    MIRROR = "mirror"
    """Each new or changed instance's file is copied from WADO-RS into A's own bucket."""
    NONE = "none"
    """Files are not copied (instances still point at where a mirror would put them)."""


class DicomwebApi(BaseModel):
    """What a ``dicomweb`` source needs besides its connection (base URL and credentials)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    qido_path: str = "/dicom-web"
    """Path of the DICOMweb root under the connection's base URL (QIDO-RS and WADO-RS)."""
    timezone: IanaTimeZone = "Asia/Seoul"
    """The PACS's local time zone: a study date and time without TimezoneOffsetFromUTC is read in it."""
    changes: ChangeFeed = ChangeFeed.NONE
    orthanc_path: str = ""
    """Path of Orthanc's REST API under the base URL (``changes: orthanc``); usually its root."""
    files: FilesMode = FilesMode.MIRROR
    key_prefix: str = ""
    """Prefix of the mirrored files' keys in A's bucket; default: the source's name."""
    max_page_size: int = Field(default=1000, ge=1)
    """The largest ``limit`` the PACS honours (Orthanc: no cap; dcm4chee: its QIDO limit)."""
    mirror_workers: int = Field(default=4, ge=1, le=32)
    """Files copied at once (threads)."""
    multipart_threshold_mb: int = Field(default=16, ge=5)
    """Files larger than this go to S3 in parts of this size."""
    change_batch: int = Field(default=1000, ge=1, le=10000)
    """Changes read per ``/changes`` request."""

    @field_validator("qido_path", "orthanc_path")
    @classmethod
    def _path(cls, value: str) -> str:
        value = value.strip()
        if value and not value.startswith("/"):
            raise ValueError("must start with '/' (a path under the connection's base URL)")
        return value.rstrip("/")
