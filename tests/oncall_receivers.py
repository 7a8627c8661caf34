"""Real alert receivers on loopback for the on-call tests: an SMTP server (aiosmtpd) and an HTTP webhook.

Both bind 127.0.0.1 on a port the OS chooses and keep what they received, so a test can read
the messages medsync's notifiers sent and check what they say and what they must not say.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    mails: list[dict[str, str]] = field(default_factory=list)
    posts: list[dict[str, Any]] = field(default_factory=list)

    def texts(self) -> list[str]:
        """Everything received, as text (for 'carries no secret' checks)."""
        return [m["raw"] for m in self.mails] + [json.dumps(p) for p in self.posts]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def smtp_server(received: Received) -> Iterator[int]:
    """An SMTP server on loopback (no TLS, no auth); yields its port."""
    from aiosmtpd.controller import Controller

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            msg = message_from_bytes(envelope.content, policy=policy.default)
            body = msg.get_body(preferencelist=("html", "plain"))
            received.mails.append(
                {
                    "from": envelope.mail_from,
                    "to": ",".join(envelope.rcpt_tos),
                    "subject": str(msg["subject"]),
                    "body": body.get_content() if body is not None else "",
                    "raw": envelope.content.decode("utf-8", "replace"),
                }
            )
            return "250 OK"

    # aiosmtpd needs a port up front; the race between choosing and binding it is harmless here.
    controller = Controller(Handler(), hostname="127.0.0.1", port=_free_port())
    controller.start()
    try:
        yield int(controller.port)
    finally:
        controller.stop()


@contextmanager
def webhook_server(received: Received) -> Iterator[int]:
    """An HTTP server on loopback that keeps every JSON body POSTed to it; yields its port."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            received.posts.append({"path": self.path, "json": json.loads(self.rfile.read(length) or b"null")})
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            return  # quiet: the test reads what was received

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def alert_connections(smtp_port: int, webhook_port: int) -> dict[str, str]:
    """``AIRFLOW_CONN_*`` values of the two receivers (ids as in ``ALERTS`` below)."""
    return {
        "AIRFLOW_CONN_MEDSYNC_ALERT_SMTP": json.dumps(
            {
                "conn_type": "smtp",
                "host": "127.0.0.1",
                "port": smtp_port,
                "extra": {"disable_ssl": True, "disable_tls": True, "timeout": 10, "retry_limit": 0},
            }
        ),
        "AIRFLOW_CONN_MEDSYNC_ALERT_WEBHOOK": json.dumps(
            {"conn_type": "http", "host": f"http://127.0.0.1:{webhook_port}"}
        ),
    }


ALERTS: dict[str, Any] = {
    "email": {"smtp_conn_id": "medsync_alert_smtp", "to": ["oncall@example.org"], "from_email": "medsync@example.org"},
    "webhook": {"http_conn_id": "medsync_alert_webhook", "endpoint": "/hooks/medsync"},
    "ui_base_url": "http://airflow.example.internal",
}
"""The ``alerts`` section the tests give include/sources/b.yaml."""
