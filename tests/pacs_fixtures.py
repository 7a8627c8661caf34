"""pytest fixtures for a real PACS: a private Orthanc with its DICOMweb plugin, loaded with synthetic DICOM.

Import the fixtures a test module needs (``from pacs_fixtures import orthanc, loaded_pacs``).
Orthanc is installed when missing (``devstack.orthanc.ensure_installed``; ``make test`` runs
``scripts/ensure-orthanc.sh`` first). When that is impossible on the machine (no apt-get, not
root) the tests skip with the reason, except on CI (``CI`` set), where they fail: CI must run them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from devstack.dicom_gen import Catalogue, generate
from devstack.orthanc import Orthanc, ensure_installed, orthanc_server

PACS_SEED = 7
PACS_PATIENTS = 120
"""About 2,900 instances in 120 patients, 240 studies, 480 series."""


@dataclass(frozen=True)
class LoadedPacs:
    orthanc: Orthanc
    catalogue: Catalogue


def pacs_connection(orthanc: Orthanc, base_url: str | None = None) -> str:
    """``AIRFLOW_CONN_MEDSYNC_PACS_API`` for ``orthanc`` (reached at ``base_url``, e.g. a proxy in front of it)."""
    return json.dumps(
        {"conn_type": "http", "host": base_url or orthanc.base_url, "login": orthanc.user, "password": orthanc.password}
    )


def require_orthanc(install: Callable[[], str | None] = ensure_installed) -> None:
    """Installs Orthanc when missing; when it cannot, skips the test saying why, or fails it on CI."""
    reason = install()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"Orthanc is missing and could not be installed, and CI must run the PACS tests: {reason}")
        pytest.skip(reason)


def start_orthanc() -> Iterator[Orthanc]:
    require_orthanc()
    with orthanc_server() as server:
        yield server


@pytest.fixture(scope="module")
def orthanc() -> Iterator[Orthanc]:
    """An empty private Orthanc, one per test module."""
    yield from start_orthanc()


@pytest.fixture(scope="module")
def loaded_pacs(orthanc: Orthanc) -> LoadedPacs:
    """The module's Orthanc loaded through STOW-RS with ~2,900 synthetic instances."""
    catalogue = Catalogue()
    stored = orthanc.stow(generate(seed=PACS_SEED, patients=PACS_PATIENTS, catalogue=catalogue))
    assert stored == len(catalogue.instances)
    return LoadedPacs(orthanc, catalogue)
