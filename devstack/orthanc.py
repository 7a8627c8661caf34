"""A private Orthanc (with its DICOMweb plugin) reachable only on 127.0.0.1, for tests and the demo.

Orthanc has no bind-address setting: it listens on every interface of its network namespace
(field notes). So it runs inside a private network namespace (``unshare -n``, only a loopback
there), and the only way in is a listening socket this process opens on 127.0.0.1 (port 0) in
the host's namespace and hands to the namespace's helper (:mod:`devstack.orthanc_netns`), which
forwards each connection to Orthanc. Nothing else on the machine can reach it.

:func:`ensure_installed` installs the Debian packages ``orthanc`` and ``orthanc-dicomweb`` when
they are missing (apt-get, as root, as ``scripts/ensure-orthanc.sh`` does for ``make test``), and
otherwise says why it cannot: the tests skip with that reason, or fail on CI
(``tests/pacs_fixtures.require_orthanc``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
PACKAGES = ("orthanc", "orthanc-dicomweb")
NAMESPACE_PORT = 8042
"""Orthanc's HTTP port inside its private namespace (nothing else listens there)."""
APT_TIMEOUT = 900
STOW_BATCH = 40
"""Instances per STOW-RS request."""
ROOT = Path(__file__).resolve().parents[1]


def installed() -> bool:
    return ORTHANC.is_file() and DICOMWEB_PLUGIN.is_file()


def ensure_installed() -> str | None:
    """Installs Orthanc and its DICOMweb plugin when missing; None when present, else why not."""
    if installed():
        return None
    apt = shutil.which("apt-get")
    if apt is None:
        return "orthanc is not installed and there is no apt-get to install it"
    if os.geteuid() != 0:
        return "orthanc is not installed and installing it (apt-get) needs root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Another apt-get (a parallel test run installing the same packages) may hold dpkg's lock: wait.
    lock = ["-o", f"DPkg::Lock::Timeout={APT_TIMEOUT // 2}"]
    install = [apt, *lock, "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT, check=False)
    if done.returncode != 0:  # the package lists may be missing or stale: update once, then again
        subprocess.run([apt, *lock, "update", "-q"], env=env, capture_output=True, timeout=APT_TIMEOUT, check=False)
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT, check=False)
    if done.returncode != 0 or not installed():
        return f"apt-get install {' '.join(PACKAGES)} failed: {done.stderr.strip()[-300:]}"
    return None


def unshare_command() -> list[str] | None:
    """The command prefix that enters a private network namespace, or None when none can be made."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    # Unprivileged users need a user namespace as well to own the network namespace.
    prefix = [unshare, "-n"] if os.geteuid() == 0 else [unshare, "-r", "-n"]
    probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=30, check=False)
    return prefix if probe.returncode == 0 else None


@dataclass(frozen=True)
class Orthanc:
    """A running private Orthanc."""

    base_url: str
    """``http://127.0.0.1:<port>`` (Orthanc's REST API)."""
    user: str
    password: str
    storage: Path

    @property
    def dicomweb_url(self) -> str:
        return f"{self.base_url}/dicom-web"

    def session(self) -> requests.Session:
        session = requests.Session()
        session.auth = (self.user, self.password)
        return session

    # -- loading and editing through the APIs a PACS offers ----------------------------------

    def stow(self, files: Iterable[bytes], batch: int = STOW_BATCH) -> int:
        """Stores DICOM files through STOW-RS (multipart/related), ``batch`` per request; returns how many."""
        stored = 0
        chunk: list[bytes] = []
        with self.session() as session:
            for data in files:
                chunk.append(data)
                if len(chunk) >= batch:
                    stored += _stow_chunk(session, self.dicomweb_url, chunk)
                    chunk = []
            if chunk:
                stored += _stow_chunk(session, self.dicomweb_url, chunk)
        return stored

    def orthanc_id(self, uid: str) -> str:
        """Orthanc's own id of the resource with DICOM UID ``uid``."""
        with self.session() as session:
            answer = session.post(f"{self.base_url}/tools/lookup", data=uid, timeout=30)
            answer.raise_for_status()
            found = answer.json()
        if not found:
            raise LookupError("no resource with that UID")
        return str(found[0]["ID"])

    def delete(self, level: str, uid: str) -> None:
        """Deletes a study, series or instance (``level``: studies, series, instances) by its UID."""
        oid = self.orthanc_id(uid)
        with self.session() as session:
            session.delete(f"{self.base_url}/{level}/{oid}", timeout=60).raise_for_status()

    def get(self, path: str, **params: Any) -> Any:
        with self.session() as session:
            answer = session.get(f"{self.base_url}{path}", params=params, timeout=60)
            answer.raise_for_status()
            return answer.json()

    def wait_until_stable(self, quiet_seconds: float = 1.5, timeout: float = 60) -> None:
        """Returns once Orthanc's change feed had no new event for ``quiet_seconds`` (Stable* events included)."""
        deadline = time.monotonic() + timeout
        last = self.last_change()
        while time.monotonic() < deadline:
            time.sleep(quiet_seconds)
            now = self.last_change()
            if now == last:
                return
            last = now
        raise RuntimeError("orthanc's change feed did not settle")

    def last_change(self) -> int:
        return int(self.get("/changes", last="")["Last"])


def _stow_chunk(session: requests.Session, url: str, files: list[bytes]) -> int:
    boundary = uuid.uuid4().hex
    body = (
        b"".join(
            b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n"
            for data in files
        )
        + b"--"
        + boundary.encode()
        + b"--\r\n"
    )
    answer = session.post(
        f"{url}/studies",
        data=body,
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        },
        timeout=120,
    )
    answer.raise_for_status()
    failed = answer.json().get("00081198", {}).get("Value", [])
    if failed:
        raise RuntimeError(f"STOW-RS refused {len(failed)} of {len(files)} instances")
    return len(files)


def _config(storage: Path, user: str, password: str) -> dict[str, Any]:
    return {
        "Name": "medsync-test-pacs",
        "StorageDirectory": str(storage / "db"),
        "IndexDirectory": str(storage / "db"),
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "HttpPort": NAMESPACE_PORT,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {user: password},
        "DicomServerEnabled": False,
        "SaveJobs": False,
        # QIDO answers are converted to this encoding: Latin1 (the default) drops Korean and Japanese.
        "DefaultEncoding": "Utf8",
        "StableAge": 1,
        "HttpThreadsCount": 8,
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Host": "127.0.0.1"},
    }


@contextmanager
def orthanc_server(
    user: str = "medsync", password: str | None = None, storage: Path | None = None, startup_timeout: float = 60
) -> Iterator[Orthanc]:
    """Starts a private Orthanc with its own storage; yields it; stops it (and its namespace) cleanly.

    Raises RuntimeError when Orthanc is missing (call :func:`ensure_installed` first), no private
    network namespace can be made, or Orthanc does not answer in ``startup_timeout`` seconds.
    """
    if not installed():
        raise RuntimeError("orthanc is not installed (devstack.orthanc.ensure_installed)")
    prefix = unshare_command()
    if prefix is None:
        raise RuntimeError("cannot create a private network namespace (unshare -n) to keep Orthanc on loopback")
    password = password or uuid.uuid4().hex
    owned = storage is None
    storage = storage or Path(tempfile.mkdtemp(prefix="medsync-orthanc-"))
    (storage / "db").mkdir(parents=True, exist_ok=True)
    config_path = storage / "orthanc.json"
    config_path.write_text(json.dumps(_config(storage, user, password), indent=2))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    log_path = storage / "orthanc.log"
    helper = [sys.executable, "-m", "devstack.orthanc_netns", str(listener.fileno()), str(config_path), str(log_path)]
    process = subprocess.Popen(
        [*prefix, *helper],
        pass_fds=(listener.fileno(),),
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=open(storage / "netns.log", "wb"),
        start_new_session=True,
    )
    listener.close()  # the helper holds its own copy
    server = Orthanc(f"http://127.0.0.1:{port}", user, password, storage)
    try:
        _wait_until_up(server, process, startup_timeout)
        yield server
    finally:
        _stop(process)
        if owned:
            shutil.rmtree(storage, ignore_errors=True)


def _wait_until_up(server: Orthanc, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"orthanc exited with {process.returncode}: see {server.storage}/orthanc.log")
        try:
            with server.session() as session:
                if session.get(f"{server.base_url}/system", timeout=2).status_code == 200:
                    return
        except requests.RequestException:
            pass  # not listening yet
        time.sleep(0.1)
    raise RuntimeError(f"orthanc did not answer within {timeout:.0f}s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)  # the helper stops Orthanc, then exits
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def main() -> None:
    """``python -m devstack.orthanc``: installs if needed, starts one, prints its URL until Ctrl-C."""
    reason = ensure_installed()
    if reason:
        raise SystemExit(reason)
    with orthanc_server() as server:
        print(f"orthanc on {server.base_url} (user {server.user}); Ctrl-C stops it", flush=True)  # noqa: T201
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
