"""The test PACS itself: a real Orthanc, private, authenticated, loaded through STOW-RS."""

from __future__ import annotations

import io
import os
import socket
import subprocess
from pathlib import Path

import pydicom
import pytest
import requests
from pacs_fixtures import LoadedPacs, require_orthanc

from devstack.dicom_gen import Catalogue, generate
from devstack.orthanc import NAMESPACE_PORT, Orthanc

ROOT = Path(__file__).resolve().parents[1]


def test_generator_is_deterministic_and_varied() -> None:
    first, second = Catalogue(), Catalogue()
    a = list(generate(seed=3, patients=12, catalogue=first))
    b = list(generate(seed=3, patients=12, catalogue=second))
    assert a == b and first == second
    datasets = [pydicom.dcmread(io.BytesIO(f)) for f in a]
    names = {str(ds.get("PatientName", "")) for ds in datasets}
    assert any("=" in n and not n.startswith("=") for n in names)  # Alphabetic and Ideographic groups
    assert any(n.startswith("=") for n in names)  # Ideographic only
    assert any("TimezoneOffsetFromUTC" in ds for ds in datasets)
    assert any("TimezoneOffsetFromUTC" not in ds for ds in datasets)
    assert any("AccessionNumber" not in ds for ds in datasets)
    assert len({ds.Modality for ds in datasets}) >= 5
    assert len({ds.get("BodyPartExamined") for ds in datasets}) >= 4
    assert any(ds.get("IssuerOfPatientID") for ds in datasets)


def test_orthanc_needs_credentials_and_is_only_on_loopback(loaded_pacs: LoadedPacs) -> None:
    server = loaded_pacs.orthanc
    assert server.base_url.startswith("http://127.0.0.1:")
    assert requests.get(f"{server.base_url}/system", timeout=5).status_code == 401
    assert requests.get(f"{server.base_url}/system", auth=(server.user, "wrong"), timeout=5).status_code == 401
    with server.session() as session:
        assert session.get(f"{server.base_url}/system", timeout=5).status_code == 200
    # Orthanc's own port exists only inside its namespace.
    try:
        socket.create_connection(("127.0.0.1", NAMESPACE_PORT), timeout=1).close()
        reachable = True
    except OSError:
        reachable = False
    assert not reachable


def test_stow_loaded_everything_and_qido_pages_it(loaded_pacs: LoadedPacs) -> None:
    server, cat = loaded_pacs.orthanc, loaded_pacs.catalogue
    assert len(cat.instances) > 2000
    stats = server.get("/statistics")
    assert (stats["CountStudies"], stats["CountSeries"], stats["CountInstances"]) == (
        len(cat.studies), len(cat.series), len(cat.instances),
    )  # fmt: skip
    seen: list[str] = []
    with server.session() as session:
        offset = 0
        while True:
            page = session.get(
                f"{server.dicomweb_url}/studies", params={"limit": 50, "offset": offset}, timeout=30
            ).json()
            if not page:
                break
            seen += [item["0020000D"]["Value"][0] for item in page]
            offset += len(page)
    assert sorted(seen) == sorted(cat.studies)


def test_delete_and_add_again_through_orthanc(orthanc: Orthanc) -> None:
    cat = Catalogue()
    files = list(generate(seed=99, patients=2, catalogue=cat))
    orthanc.stow(files)
    study = sorted(cat.studies)[0]
    before = orthanc.get("/statistics")["CountStudies"]
    orthanc.delete("studies", study)
    assert orthanc.get("/statistics")["CountStudies"] == before - 1
    orthanc.stow(files)
    assert orthanc.get("/statistics")["CountStudies"] == before


def test_a_missing_orthanc_fails_on_ci_and_skips_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    def cannot() -> str:
        return "orthanc is not installed and installing it (apt-get) needs root"

    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"CI must run the PACS tests: .*needs root"):
        require_orthanc(cannot)
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="needs root"):
        require_orthanc(cannot)
    require_orthanc(lambda: None)  # installed: neither


def test_make_test_installs_orthanc_first() -> None:
    script = ROOT / "scripts" / "ensure-orthanc.sh"
    assert os.access(script, os.X_OK)
    recipes: dict[str, list[str]] = {}
    target = None
    for line in (ROOT / "Makefile").read_text().splitlines():
        if line and not line[0].isspace() and ":" in line and not line.startswith((".", "#")) and "=" not in line:
            target = line.split(":")[0]
            recipes[target] = []
        elif line.startswith("\t") and target:
            recipes[target].append(line.strip())
    for name in ("test", "test-slow"):
        steps = recipes[name]
        pytest_step = next(i for i, step in enumerate(steps) if "pytest" in step)
        assert "scripts/ensure-orthanc.sh" in steps[:pytest_step], name
    # Here Orthanc is installed (the PACS fixtures made sure): the script has nothing to do.
    require_orthanc()
    done = subprocess.run([str(script)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stderr == "", done.stderr
