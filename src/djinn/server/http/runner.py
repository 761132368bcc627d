"""Serving the app: uvicorn on a background thread, started and stopped from the caller's.

``run_http`` binds the socket itself (port 0 picks a free one) so the caller learns the real
port before any request can arrive; ``djinn serve --http-port`` calls it next to the native server.
"""

from __future__ import annotations

import logging
import socket
import threading

import uvicorn

from djinn.server.http.app import create_app

log = logging.getLogger("djinn.http")


class HttpServer:
    """A running HTTP front end. ``stop()`` finishes in-flight requests and joins the thread."""

    def __init__(self, server: uvicorn.Server, thread: threading.Thread, sock: socket.socket):
        self._server, self._thread, self._sock = server, thread, sock
        self.host, self.port = sock.getsockname()[:2]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout)
        self._sock.close()

    def wait(self) -> None:
        self._thread.join()


def run_http(engine, config, port: int = 8000, host: str = "127.0.0.1", log_level: str = "warning",
             journal=None) -> HttpServer:
    """Serve the OpenAI-compatible API for ``engine`` on ``host:port`` from a background thread.
    ``journal``: the server's session journal (``djinn serve --journal``), see ``create_app``."""
    token = getattr(getattr(config, "server", None), "token", None)
    keys = getattr(config, "api_keys", None)
    if host not in ("127.0.0.1", "localhost", "::1") and not (token or keys):
        from djinn.errors import InvalidRequest

        raise InvalidRequest(f"refusing to serve HTTP on {host} without an API key: pass --token")
    app = create_app(engine, config, journal=journal)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=5))
    started = threading.Event()

    def serve() -> None:
        import asyncio

        asyncio.run(server.serve(sockets=[sock]))

    thread = threading.Thread(target=serve, name="djinn-http", daemon=True)
    thread.start()
    for _ in range(500):
        if server.started or not thread.is_alive():
            break
        started.wait(0.01)
    if not server.started:
        raise RuntimeError("the HTTP server did not start; see the log above")
    handle = HttpServer(server, thread, sock)
    log.info("OpenAI-compatible API on %s", handle.url)
    return handle
