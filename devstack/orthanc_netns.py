"""Runs inside Orthanc's private network namespace: brings up loopback, starts Orthanc, forwards.

``python -m devstack.orthanc_netns <listening fd> <config> <log>``. The listening socket was
opened on 127.0.0.1 in the host's namespace (see :mod:`devstack.orthanc`) and inherited here:
a socket keeps the namespace it was made in, so connections accepted on it come from the host's
loopback, and each is forwarded to Orthanc on this namespace's loopback. On SIGTERM it stops
Orthanc and exits.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from types import FrameType

from devstack.orthanc import NAMESPACE_PORT, ORTHANC

BUFFER = 256 * 1024


def _pipe(source: socket.socket, target: socket.socket) -> None:
    try:
        while data := source.recv(BUFFER):
            target.sendall(data)
    except OSError:
        pass  # the other side closed: the connection is over either way
    finally:
        for end in (source, target):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already shut
            end.close()


def _forward(client: socket.socket) -> None:
    try:
        upstream = socket.create_connection(("127.0.0.1", NAMESPACE_PORT), timeout=10)
    except OSError:
        client.close()
        return
    upstream.settimeout(None)
    threading.Thread(target=_pipe, args=(client, upstream), daemon=True).start()
    threading.Thread(target=_pipe, args=(upstream, client), daemon=True).start()


def main() -> None:
    fd, config, log = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=30)  # noqa: S607 - ip from PATH, as unshare
    with open(log, "wb") as out:
        orthanc = subprocess.Popen([str(ORTHANC), config], stdout=out, stderr=subprocess.STDOUT)

    def stop(signum: int, frame: FrameType | None) -> None:
        orthanc.terminate()
        try:
            orthanc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            orthanc.kill()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    listener = socket.socket(fileno=fd)
    # Accept only once Orthanc listens, so the first request is not refused.
    for _ in range(600):
        try:
            socket.create_connection(("127.0.0.1", NAMESPACE_PORT), timeout=1).close()
            break
        except OSError:
            if orthanc.poll() is not None:
                raise SystemExit(f"orthanc exited with {orthanc.returncode}") from None
            time.sleep(0.05)
    while True:
        client, _ = listener.accept()
        _forward(client)


if __name__ == "__main__":
    main()
