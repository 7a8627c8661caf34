"""Driving a simulator that runs in another process: start it, and call its admin API.

``spawn`` starts ``python -m simulator`` and waits for its JSON line; ``SimAdminClient``
wraps ``/_sim/`` with the standard library only, so a demo, a benchmark or an Airflow
worker test can use it without extra packages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from simulator.api import ADMIN_PREFIX, API_PREFIX

_REPO_ROOT = Path(__file__).resolve().parents[1]


class SimAdminError(RuntimeError):
    """The admin API answered with an error status."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"simulator admin API answered {status}: {body}")
        self.status = status
        self.body = body


class SimAdminClient:
    """Admin API of a running simulator. ``base_url`` is B's base URL (``.../api/v1``)."""

    def __init__(self, base_url: str, api_key: str, timeout: float = 60.0) -> None:
        root = base_url.rstrip("/")
        root = root.removesuffix(API_PREFIX)
        self.admin_url = root + ADMIN_PREFIX
        self._key = api_key
        self._timeout = timeout

    def call(self, name: str, payload: dict[str, Any] | None = None, method: str = "POST") -> Any:
        """POST ``payload`` (JSON) to ``/_sim/<name>`` and return the decoded answer."""
        data = json.dumps(payload or {}).encode() if method == "POST" else None
        req = urllib.request.Request(  # noqa: S310 (URL is the simulator's own http://127.0.0.1)
            f"{self.admin_url}/{name}",
            data=data,
            method=method,
            headers={"X-API-Key": self._key, "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=self._timeout) as resp:  # noqa: S310
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise SimAdminError(exc.code, exc.read().decode(errors="replace")) from None
        if name.startswith("files/"):
            return raw
        return json.loads(raw)

    def mutate(self, op: str, **args: Any) -> Any:
        """``/_sim/mutate`` with ``{"op": op, **args}``."""
        return self.call("mutate", {"op": op, **args})

    def update(self, resource: str, rid: str, remove: list[str] | None = None, **fields: Any) -> dict[str, Any]:
        """New version of a record with ``fields`` set and ``remove`` keys dropped."""
        return self.mutate("update", resource=resource, id=rid, fields=fields, remove=remove or [])["record"]

    def delete(self, resource: str, rid: str) -> list[str]:
        """Tombstone a record and its live descendants; the ids tombstoned."""
        return self.mutate("delete", resource=resource, id=rid)["ids"]

    def undelete(self, resource: str, rid: str, cascade: bool = False) -> list[str]:
        """Bring a record back (and, with cascade, the descendants its delete took)."""
        return self.mutate("undelete", resource=resource, id=rid, cascade=cascade)["ids"]

    def add_patient_tree(self, studies: int | None = None, series: int | None = None, images: int | None = None) -> Any:
        """A new patient with descendants; returns the new ids per resource."""
        return self.mutate("add_patient_tree", studies=studies, series=series, images=images)

    def mutate_fraction(self, fraction: float, seed: int = 0) -> dict[str, dict[str, int]]:
        """Change ~fraction of every level; counts per kind and resource."""
        return self.mutate("mutate_fraction", fraction=fraction, seed=seed)

    def make_invalid(self, resource: str, rid: str, kind: str) -> dict[str, Any]:
        """New version of a record carrying defect ``kind``."""
        return self.mutate("make_invalid", resource=resource, id=rid, kind=kind)["record"]

    def repair(self, resource: str, rid: str) -> dict[str, Any]:
        """New version of a record without defects."""
        return self.mutate("repair", resource=resource, id=rid)["record"]

    def set_faults(self, **fields: Any) -> dict[str, Any]:
        """Replace the faults in force (no arguments: all off)."""
        return self.call("faults", fields)["faults"]

    def advance(self, seconds: float) -> str:
        """Move the simulator's clock; returns now (RFC 3339)."""
        return self.call("clock", {"advance": seconds})["now"]

    def set_now(self, when: str) -> str:
        """Set the simulator's clock to an RFC 3339 instant; returns now."""
        return self.call("clock", {"set_now": when})["now"]

    def stats(self, reset: bool = False) -> dict[str, Any]:
        """Counters (then zero them if ``reset``)."""
        return self.call("stats", {"reset": reset})

    def reset(self) -> None:
        """Data, clock, faults and counters as at start."""
        self.call("reset", {})

    def config(self) -> dict[str, Any]:
        """The simulator's SimConfig, faults and now."""
        return self.call("config", method="GET")

    def file_bytes(self, image_id: str) -> bytes:
        """Content of an image's file."""
        return self.call(f"files/{image_id}", method="GET")


class SpawnedSimulator:
    """A ``python -m simulator`` child process. Use as a context manager or call ``stop()``."""

    def __init__(self, proc: subprocess.Popen[str], base_url: str, api_key: str) -> None:
        self.proc = proc
        self.base_url = base_url
        self.admin = SimAdminClient(base_url, api_key)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the child and wait for it (SIGKILL after ``timeout``)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)

    def __enter__(self) -> SpawnedSimulator:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def spawn(api_key: str, *cli_args: str, python: str | None = None) -> SpawnedSimulator:
    """Start ``python -m simulator --port 0 --api-key KEY <cli_args>`` and wait until it listens.

    The key is passed in the child's environment (``BSIM_API_KEY``), not on its command line,
    so it does not show in process listings.
    """
    env = dict(os.environ, BSIM_API_KEY=api_key)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(  # noqa: S603 (fixed argv: this interpreter and our own module)
        [python or sys.executable, "-m", "simulator", "--port", "0", *cli_args],
        stdout=subprocess.PIPE,
        stderr=None,
        text=True,
        env=env,
        cwd=str(_REPO_ROOT),
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(10)
        raise RuntimeError(f"simulator exited with {proc.returncode} before listening")
    info = json.loads(line)
    return SpawnedSimulator(proc, info["base_url"], api_key)
