"""The HTTP endpoint: /metrics (Prometheus text format), /healthz and
/readyz. prometheus_client renders the metrics; the standard library's WSGI
server serves them from a thread, so that a scrape never waits for the
event loop and a stalled loop still gets an honest 503 from /healthz."""

from __future__ import annotations

import logging
import socketserver
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

from overlayd.errors import ConfigError
from overlayd.surfaces.telemetry import Telemetry

log = logging.getLogger(__name__)

StartResponse = Callable[..., Any]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds are not events worth a log line."""


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


def wsgi_app(telemetry: Telemetry) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    metrics = make_wsgi_app(telemetry.registry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path in ("/healthz", "/readyz"):
            ok, why = telemetry.healthy() if path == "/healthz" else telemetry.ready()
            start_response(
                "200 OK" if ok else "503 Service Unavailable",
                [("Content-Type", "text/plain; charset=utf-8")],
            )
            return [f"{why}\n".encode()]
        if path == "/metrics":
            return metrics(environ, start_response)  # type: ignore[no-any-return]
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: try /metrics, /healthz or /readyz\n"]

    return app


class MetricsServer:
    def __init__(self, address: tuple[str, int], telemetry: Telemetry) -> None:
        try:
            self._server = make_server(
                address[0],
                address[1],
                wsgi_app(telemetry),
                server_class=_ThreadingServer,
                handler_class=_QuietHandler,
            )
        except OSError as exc:
            raise ConfigError(
                "metrics-address", f"cannot listen on {address[0]}:{address[1]}: {exc.strerror}"
            ) from exc
        self.address = address
        self.port = self._server.server_port  # the real one when asked for port 0
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        log.info("event=metrics_listening address=%s:%d", *self.address)

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() waits for a serve_forever() that must run
            self._server.shutdown()
        self._server.server_close()
