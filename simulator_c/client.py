"""Driving a C simulator that runs in another process: start it, and call its admin API.

``spawn`` starts ``python -m simulator_c`` and waits for its JSON line; ``CSimAdminClient``
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
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from simulator_c.api import ADMIN_PREFIX, API_PREFIX

_REPO_ROOT = Path(__file__).resolve().parents[1]


class CSimAdminError(RuntimeError):
    """The admin API answered with an error status."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"C simulator admin API answered {status}: {body}")
        self.status = status
        self.body = body


class CSimAdminClient:
    """Admin API of a running C simulator. ``base_url`` is C's base URL (``.../v2``)."""

    def __init__(self, base_url: str, token: str, timeout: float = 60.0) -> None:
        root = base_url.rstrip("/").removesuffix(API_PREFIX)
        self.admin_url = root + ADMIN_PREFIX
        self._token = token
        self._timeout = timeout

    def call(self, name: str, payload: dict[str, Any] | None = None, method: str = "POST") -> Any:
        """POST ``payload`` (JSON) to ``/_sim/<name>`` (or GET it) and return the decoded answer."""
        data = json.dumps(payload or {}).encode() if method == "POST" else None
        req = urllib.request.Request(  # noqa: S310 (URL is the simulator's own http://127.0.0.1)
            f"{self.admin_url}/{name}",
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self._token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=self._timeout) as resp:  # noqa: S310
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise CSimAdminError(exc.code, exc.read().decode(errors="replace")) from None
        if name.startswith("files/"):
            return raw
        return json.loads(raw)

    def mutate(self, op: str, **args: Any) -> Any:
        """``/_sim/mutate`` with ``{"op": op, **args}``."""
        return self.call("mutate", {"op": op, **args})

    def uuid(self, resource: str, index: int) -> str:
        """uuid of record ``index`` of a resource."""
        return self.mutate("uuid", resource=resource, index=index)["uuid"]

    def get(self, resource: str, uuid: str) -> dict[str, Any] | None:
        """The live record, or None."""
        return self.mutate("get", resource=resource, uuid=uuid)["record"]

    def update(self, resource: str, uuid: str, remove: list[str] | None = None, **fields: Any) -> dict[str, Any]:
        """New version of a record with ``fields`` set and ``remove`` keys dropped."""
        return self.mutate("update", resource=resource, uuid=uuid, fields=fields, remove=remove or [])["record"]

    def delete(self, resource: str, uuid: str) -> dict[str, Any] | None:
        """Delete a record; its deletion item (None if already deleted)."""
        return self.mutate("delete", resource=resource, uuid=uuid)["item"]

    def restore(self, resource: str, uuid: str) -> dict[str, Any] | None:
        """Bring a deleted record back (newer modified); None if it was live."""
        return self.mutate("restore", resource=resource, uuid=uuid)["record"]

    def move(self, resource: str, uuid: str, parent: str) -> dict[str, Any]:
        """Move a visit, acquisition or file to another parent."""
        return self.mutate("move", resource=resource, uuid=uuid, parent=parent)["record"]

    def merge_participants(self, source: str, target: str) -> dict[str, Any]:
        """Merge participant ``source`` into ``target`` (visits moved, source deleted)."""
        return self.mutate("merge_participants", source=source, target=target)

    def move_file(self, uuid: str, bucket: str | None = None) -> dict[str, Any]:
        """Move a file to the other (or the given) bucket."""
        return self.mutate("move_file", uuid=uuid, bucket=bucket)["record"]

    def add_participant_tree(
        self, visits: int | None = None, acquisitions: int | None = None, files: int | None = None
    ) -> dict[str, Any]:
        """A new participant with descendants; returns the new uuids per resource."""
        return self.mutate("add_participant_tree", visits=visits, acquisitions=acquisitions, files=files)

    def mutate_fraction(self, fraction: float, seed: int = 0) -> dict[str, dict[str, int]]:
        """Change ~fraction of every resource; counts per kind and resource."""
        return self.mutate("mutate_fraction", fraction=fraction, seed=seed)

    def make_invalid(self, resource: str, uuid: str, kind: str) -> dict[str, Any]:
        """New version of a record carrying defect ``kind``."""
        return self.mutate("make_invalid", resource=resource, uuid=uuid, kind=kind)["record"]

    def repair(self, resource: str, uuid: str) -> dict[str, Any]:
        """New version of a record without defects."""
        return self.mutate("repair", resource=resource, uuid=uuid)["record"]

    def defects(self, resource: str) -> dict[str, str]:
        """uuid -> defect kind of live records of a resource."""
        return self.call("defects", {"resource": resource})["defects"]

    def set_faults(self, **fields: Any) -> dict[str, Any]:
        """Replace the faults in force (no arguments: none injected, C's rate limit on)."""
        return self.call("faults", fields)["faults"]

    def advance(self, seconds: float) -> str:
        """Move the simulator's clock; returns now (RFC 3339)."""
        return self.call("clock", {"advance": seconds})["now"]

    def set_now(self, when: str) -> str:
        """Set the simulator's clock to an RFC 3339 instant; returns now."""
        return self.call("clock", {"set_now": when})["now"]

    def expire_snapshots(self) -> int:
        """Forget every snapshot (their next use gets 410)."""
        return self.call("snapshots", {"expire_all": True})["expired"]

    def stats(self, reset: bool = False) -> dict[str, Any]:
        """Counters (then zero them if ``reset``)."""
        return self.call("stats", {"reset": reset})

    def reset(self) -> None:
        """Data, clock, faults and counters as at start."""
        self.call("reset", {})

    def config(self) -> dict[str, Any]:
        """The simulator's SimConfig, faults and now."""
        return self.call("config", method="GET")

    def file_bytes(self, uuid: str) -> bytes:
        """Content of a file's object."""
        return self.call(f"files/{uuid}", method="GET")

    def iter_files(self) -> Iterator[tuple[tuple[str, str], bytes]]:
        """((bucket, key), bytes) of every object C's buckets hold (for seeding S3)."""
        for obj in self.call("objects", {})["objects"]:
            yield (obj["bucket"], obj["key"]), self.file_bytes(obj["uuid"])


class SpawnedCSimulator:
    """A ``python -m simulator_c`` child process. Use as a context manager or call ``stop()``."""

    def __init__(self, proc: subprocess.Popen[str], info: dict[str, Any], token: str) -> None:
        self.proc = proc
        self.base_url: str = info["base_url"]
        self.admin_url: str = info["admin_url"]
        self.pid: int = info["pid"]
        self.admin = CSimAdminClient(self.base_url, token)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the child and wait for it (SIGKILL after ``timeout``)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)

    def __enter__(self) -> SpawnedCSimulator:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def spawn(token: str, *cli_args: str, python: str | None = None) -> SpawnedCSimulator:
    """Start ``python -m simulator_c --port 0 <cli_args>`` with ``token`` and wait until it listens.

    The token is passed in the child's environment (``CSIM_TOKEN``), not on its command line,
    so it does not show in process listings.
    """
    env = dict(os.environ, CSIM_TOKEN=token)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(  # noqa: S603 (fixed argv: this interpreter and our own module)
        [python or sys.executable, "-m", "simulator_c", "--port", "0", *cli_args],
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
        raise RuntimeError(f"C simulator exited with {proc.returncode} before listening")
    return SpawnedCSimulator(proc, json.loads(line), token)
