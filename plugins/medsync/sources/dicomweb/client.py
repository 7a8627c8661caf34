"""A PACS over DICOMweb: QIDO-RS listings with ``limit``/``offset``, Orthanc's change feed, WADO-RS files.

No Airflow import here: :mod:`medsync.sources.dicomweb.hook` builds the HTTP session from an
Airflow connection. The session retries transient failures itself (urllib3 ``Retry`` on its
adapter: connection errors, 429, 502-504, honouring ``Retry-After``); every request has a timeout.
Nothing here logs a URL with query values, a header, or any record content: QIDO filters carry
PHI (``PatientID``), so logs name the resource and counts only.

Each raw item handed on is a DICOM JSON object annotated with its version
(``item["_medsync"] = {"version": ...}``, see :mod:`medsync.sources.dicomweb.versions`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import requests
from psycopg.types.json import Jsonb

from medsync.errors import SourceApiError, SourceUnavailableError
from medsync.sources.base import RawPage, SourceClient
from medsync.sources.dicomweb import records, versions
from medsync.sources.dicomweb.feed import OrthancChangeFeed
from medsync.sources.dicomweb.spec import ChangeFeed, DicomwebApi
from medsync.sources.dicomweb.tags import PATIENT, QIDO_RESOURCE, READ
from medsync.windows import BEGINNING

log = logging.getLogger(__name__)

FILE_CHUNK = 1024 * 1024


def _boundary(content_type: str, source: str) -> bytes:
    for param in content_type.split(";")[1:]:
        name, _, value = param.strip().partition("=")
        if name.lower() == "boundary" and value:
            return value.strip('"').encode()
    raise SourceApiError(f"{source}: WADO-RS: a multipart answer without a boundary")


def multipart_first_part(chunks: Iterator[bytes], boundary: bytes) -> Iterator[bytes]:
    """The body of the first part of a multipart stream, streamed (memory: one chunk plus a delimiter)."""
    opening = b"--" + boundary
    closing = b"\r\n--" + boundary
    buffer = b""
    chunks = iter(chunks)
    # Up to the end of the first part's headers.
    for chunk in chunks:
        buffer += chunk
        start = buffer.find(opening)
        if start >= 0:
            headers_end = buffer.find(b"\r\n\r\n", start)
            if headers_end >= 0:
                buffer = buffer[headers_end + 4 :]
                break
    else:
        raise SourceApiError("WADO-RS: the multipart answer has no part")
    # The body, holding back what could be the start of the closing delimiter.
    keep = len(closing)
    while True:
        end = buffer.find(closing)
        if end >= 0:
            if end:
                yield buffer[:end]
            return
        if len(buffer) > keep:
            yield buffer[:-keep]
            buffer = buffer[-keep:]
        following = next(chunks, None)
        if following is None:
            raise SourceApiError("WADO-RS: the multipart answer ended inside its part")
        buffer += following


class DicomwebClient(SourceClient):
    """One PACS: an HTTP session (auth, retries) and a connection to A's database (versions)."""

    def __init__(
        self,
        *,
        source: str,
        api: DicomwebApi,
        session: requests.Session,
        base_url: str,
        db: psycopg.Connection,
        page_size: int,
        timeout: float,
        keep_marks_before_watermark: timedelta = timedelta(days=1),
    ) -> None:
        self.source = source
        self.api = api
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.qido_url = self.base_url + api.qido_path
        self.orthanc_url = self.base_url + api.orthanc_path
        self.db = db
        self.page_size = min(page_size, api.max_page_size)
        self.timeout = timeout
        self.zone = ZoneInfo(api.timezone)
        self._resources: dict[str, dict[str, Any] | None] = {}
        self.feed = OrthancChangeFeed(
            source=source,
            db=db,
            url=f"{self.orthanc_url}/changes",
            get=self._get,
            resource=self._orthanc,
            batch=api.change_batch,
            keep_before_watermark=keep_marks_before_watermark,
        )

    # -- HTTP ------------------------------------------------------------------------------

    def _get(self, url: str, what: str, params: dict[str, Any] | None = None, *, stream: bool = False) -> Any:
        headers = {"Accept": "application/dicom" if stream else "application/json"}
        try:
            answer = self.session.get(url, params=params, headers=headers, timeout=self.timeout, stream=stream)
        except requests.RequestException as exc:
            raise SourceUnavailableError(f"{self.source}: {what}: {type(exc).__name__}") from None
        if answer.status_code == 204:
            return []
        if answer.status_code in (429, 500, 502, 503, 504):
            raise SourceUnavailableError(f"{self.source}: {what}: HTTP {answer.status_code}")
        if answer.status_code == 404:
            return None
        if answer.status_code >= 400:
            raise SourceApiError(f"{self.source}: {what}: HTTP {answer.status_code}")
        if stream:
            return answer
        try:
            return answer.json()
        except ValueError:
            raise SourceApiError(f"{self.source}: {what}: the answer is not JSON") from None

    def _qido(
        self, path: str, level: str, filters: dict[str, str] | None = None, *, whole: bool = False
    ) -> Iterator[list[dict[str, Any]]]:
        """Pages of a QIDO-RS search (``limit``/``offset``), asking for every attribute the level reads.

        A page shorter than ``limit`` is the last one. With ``whole`` (a full listing, which a
        snapshot compares with A: a truncated one would delete what it misses) that is checked with
        one more request: a server that silently caps its pages below ``limit`` has more after a
        short page, and the listing fails with what to set instead of coming back truncated.
        """
        tags = sorted({*READ[level], *READ["instance"]} if level == "instance" else READ[level])
        what = f"QIDO {path.rsplit('/', 1)[-1]}"
        offset, short = 0, 0
        while True:
            # One includefield per attribute: Orthanc's plugin ignores the comma-separated form.
            params: dict[str, Any] = {"limit": self.page_size, "offset": offset, "includefield": tags}
            params.update(filters or {})
            page = self._get(f"{self.qido_url}{path}", what, params)
            if page is None:
                page = []
            if not isinstance(page, list):
                raise SourceApiError(f"{self.source}: QIDO {path}: the answer is not a list")
            if short and page:
                raise SourceApiError(
                    f"{self.source}: {what}: the PACS answered {short} items for limit={self.page_size} and has more "
                    f"after them: it caps its pages below page_size. Set api.max_page_size and page_size to at "
                    f"most {short} in the source's config"
                )
            if not page:
                return
            yield page
            if len(page) < self.page_size:
                if not whole:
                    return
                short = len(page)
            offset += len(page)

    # -- versions ---------------------------------------------------------------------------

    def _key(self, level: str, item: dict[str, Any]) -> str | None:
        try:
            if level == "subject":
                return records.subject_key(item)
            tag = {"study": "0020000D", "sequence": "0020000E", "instance": "00080018"}[level]
            return records.text(item, tag, tag)
        except ValueError:
            return None

    def _versioned(self, level: str, items: list[dict[str, Any]]) -> RawPage:
        keyed = [(key, item) for item in items if (key := self._key(level, item)) is not None]
        found = versions.assign(self.db, self.source, level, keyed)
        now = datetime.now(UTC).isoformat()
        for item in items:
            key = self._key(level, item)
            when = found.get(key) if key is not None else None
            # A record without a usable key is quarantined; it still needs a version to be kept.
            item[records.ANNOTATION] = {"version": when.isoformat() if when else now}
        return RawPage(items)

    # -- listings -----------------------------------------------------------------------------

    def iter_listing(self, level: str) -> Iterator[RawPage]:
        """Every record of ``level`` the PACS holds now."""
        if self.api.changes is ChangeFeed.ORTHANC:
            # Everything up to Orthanc's last event is in this listing: the next window's read of
            # the feed starts there (without the mark it would read Orthanc's whole history).
            self.feed.mark_last()
        if level == "subject":
            yield from self._subjects(self._qido("/studies", "study", whole=True))
            return
        for page in self._qido(f"/{QIDO_RESOURCE[level]}", level, whole=True):
            yield self._versioned(level, page)

    def iter_pages(self, level: str, since: datetime, until: datetime) -> Iterator[RawPage]:
        """With a change feed and a window after the beginning: what changed in it; otherwise everything."""
        if self.api.changes is ChangeFeed.NONE or since <= BEGINNING:
            yield from self.iter_listing(level)
            return
        yield from self._changed(level, since, until)

    def _subjects(self, study_pages: Iterator[list[dict[str, Any]]]) -> Iterator[RawPage]:
        """One subject per patient, from the patient attributes of its winning study (see the mapping doc).

        The candidates go through a temporary table of A's database, so memory holds one page
        whatever the number of patients.
        """
        db = self.db
        db.execute("CREATE TEMP TABLE IF NOT EXISTS dicomweb_subject_candidate (key text, rank text, item jsonb)")
        db.execute("TRUNCATE dicomweb_subject_candidate")
        for page in study_pages:
            rows = []
            for item in page:
                key = self._key("subject", item)
                rank = records.study_rank(item, self.zone)
                if key is None or rank is None:
                    continue  # a study that cannot be stored gives no patient attributes
                patient = {tag: item[tag] for tag in PATIENT if tag in item}
                rows.append((key, rank, patient))
            with db.cursor() as cur, cur.copy("COPY dicomweb_subject_candidate (key, rank, item) FROM STDIN") as copy:
                for key, rank, patient in rows:
                    copy.write_row((key, rank, Jsonb(patient)))
        with db.transaction(), db.cursor(name="dicomweb_subjects") as cur:
            cur.execute(
                "SELECT DISTINCT ON (key) item FROM dicomweb_subject_candidate ORDER BY key, rank DESC",
            )
            while chunk := cur.fetchmany(self.page_size):
                yield self._versioned("subject", [row[0] for row in chunk])
        db.execute("TRUNCATE dicomweb_subject_candidate")

    # -- Orthanc's change feed (medsync.sources.dicomweb.feed) ------------------------------------

    def _orthanc(self, path: str) -> dict[str, Any] | None:
        """An Orthanc resource (``/studies/<id>``, ...), read once per client: a pull asks for each several times."""
        if path not in self._resources:
            answer = self._get(f"{self.orthanc_url}{path}", path.split("/", 2)[1])
            self._resources[path] = answer if isinstance(answer, dict) else None
        return self._resources[path]

    def _changed(self, level: str, since: datetime, until: datetime) -> Iterator[RawPage]:
        touched = self.feed.touched(since, until)
        studies, series_info = touched.studies, touched.series  # studies: sorted, each once
        log.info(
            "%s %s: %d changes in the window: %d studies, %d series to fetch",
            self.source, level, touched.changes, len(studies), len(series_info),
        )  # fmt: skip
        if level == "study":
            items = list(self._studies_by_orthanc_id(studies))
            for start in range(0, len(items), self.page_size):
                yield self._versioned("study", items[start : start + self.page_size])
        elif level == "subject":
            yield from self._changed_subjects(studies)
        else:
            yield from self._changed_in_series(level, series_info)

    def _changed_subjects(self, studies: list[str]) -> Iterator[RawPage]:
        # A patient's subject is decided over all of its studies, changed or not.
        patients = set()
        for oid in studies:
            info = self._orthanc(f"/studies/{oid}")
            if info is not None:
                patients.add(str(info["ParentPatient"]))
        all_studies: list[str] = []
        for pid in sorted(patients):
            patient = self._orthanc(f"/patients/{pid}")
            if patient is not None:
                all_studies += [str(s) for s in patient.get("Studies", [])]
        yield from self._subjects(iter([list(self._studies_by_orthanc_id(all_studies))]))

    def _changed_in_series(self, level: str, series_info: dict[str, dict[str, Any]]) -> Iterator[RawPage]:
        by_study: dict[str, list[str]] = {}
        for info in series_info.values():
            study = self._orthanc(f"/studies/{info['ParentStudy']}")
            if study is not None:
                study_uid = study["MainDicomTags"]["StudyInstanceUID"]
                by_study.setdefault(study_uid, []).append(info["MainDicomTags"]["SeriesInstanceUID"])
        for study_uid, series_uids in sorted(by_study.items()):
            for series_uid in sorted(series_uids):
                if level == "sequence":
                    pages = self._qido(f"/studies/{study_uid}/series", "sequence", {"0020000E": series_uid})
                else:
                    pages = self._qido(f"/studies/{study_uid}/series/{series_uid}/instances", "instance")
                for page in pages:
                    yield self._versioned(level, page)

    def _studies_by_orthanc_id(self, oids: list[str]) -> Iterator[dict[str, Any]]:
        for oid in oids:
            info = self._orthanc(f"/studies/{oid}")
            if info is None:
                continue
            # UIDs are digits and dots: safe in a filter, which the plugin does not URL-decode.
            study_uid = info["MainDicomTags"]["StudyInstanceUID"]
            for page in self._qido("/studies", "study", {"0020000D": study_uid}):
                yield from page

    # -- counts and files ----------------------------------------------------------------------

    def counts(self) -> dict[str, int] | None:
        if self.api.changes is not ChangeFeed.ORTHANC:
            return None
        stats = self._orthanc("/statistics")
        if stats is None:
            raise SourceApiError(f"{self.source}: /statistics: not found")
        return {
            "subject": int(stats["CountPatients"]),
            "study": int(stats["CountStudies"]),
            "sequence": int(stats["CountSeries"]),
            "instance": int(stats["CountInstances"]),
        }

    def iter_file(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Iterator[bytes]:
        """The instance's file from WADO-RS (``application/dicom``), streamed out of its multipart answer."""
        url = f"{self.qido_url}/studies/{study_uid}/series/{series_uid}/instances/{sop_instance_uid}"
        what = "WADO-RS instance"
        try:
            answer = self.session.get(
                url,
                headers={"Accept": 'multipart/related; type="application/dicom"'},
                timeout=self.timeout,
                stream=True,
            )
        except requests.RequestException as exc:
            raise SourceUnavailableError(f"{self.source}: {what}: {type(exc).__name__}") from None
        with answer:
            if answer.status_code >= 400:
                error = SourceUnavailableError if answer.status_code in (429, 500, 502, 503, 504) else SourceApiError
                raise error(f"{self.source}: {what}: HTTP {answer.status_code}")
            content_type = answer.headers.get("Content-Type", "")
            try:
                chunks = answer.iter_content(chunk_size=FILE_CHUNK)
                if content_type.lower().startswith("multipart/"):
                    yield from multipart_first_part(chunks, _boundary(content_type, self.source))
                else:
                    yield from chunks
            except requests.RequestException as exc:
                raise SourceUnavailableError(f"{self.source}: {what}: {type(exc).__name__}") from None

    def close(self) -> None:
        self.session.close()
        if not self.db.closed:
            self.db.close()
