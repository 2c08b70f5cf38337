"""The monitor's one HTTP server, read-only: /metrics, /healthz, /status,
/api/history and the dashboard's files, served from a thread of its own."""
from __future__ import annotations

import json
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from .. import __version__
from .views import QueryError

LINGER_SECONDS = 3.0        # at the end, how long a watched run waits for a last poll
POLL_SECONDS = 0.05         # how often the HTTP loop checks for shutdown
WATCHED_SECONDS = 10.0      # a request this recent means someone is watching
DASHBOARD = Path(__file__).resolve().parents[1] / "dashboard"   # ddp/dashboard, package data
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml",
                 ".ico": "image/x-icon", ".txt": "text/plain; charset=utf-8",
                 ".md": "text/plain; charset=utf-8", ".json": "application/json"}
CSP = "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:"


def static_files() -> dict[str, Path]:
    """/static/<relative path> → file, for exactly the files the dashboard ships."""
    if not DASHBOARD.is_dir():
        return {}
    return {p.relative_to(DASHBOARD).as_posix(): p for p in DASHBOARD.rglob("*") if p.is_file()}


class MonitorServer:
    """The HTTP thread serving `views` on addr:port (port 0: any free one; `port` is the
    one it got). When the run ends, someone who was watching gets a moment to see the
    final state before the server stops.

    Parameters
    ----------
    views : views.RunViews or views.ServiceViews
        What is served: its `registry` at /metrics, `health()` at /healthz, and
        `status(query)`, `history(query)` (given the query string; QueryError refuses
        it) at /status and /api/history.
    addr, port : str, int
        Where to listen; OSError if it cannot.
    linger : float
        At the end, the most seconds to wait for a watcher's last poll.
    """

    def __init__(self, views, addr: str, port: int, linger: float = LINGER_SECONDS):
        self.views, self.linger = views, linger
        self.last_request = -math.inf        # monotonic time of the last request that came in
        self.ended = False                   # the run's final state is recorded
        self.final_seen = threading.Event()  # a poll after the end saw the final state
        handler = type("Handler", (_Handler,), {"site": self, "static": static_files()})
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        server_class = type("Server", (ThreadingHTTPServer,), {"address_family": family,
                                                               "daemon_threads": True})
        self.httpd = server_class((addr, port), handler)
        self.port = self.httpd.server_address[1]
        # the loop looks for shutdown every POLL_SECONDS: close() (the end of every run) waits
        # that long at most, instead of the standard library's half second
        threading.Thread(target=self.httpd.serve_forever, args=(POLL_SECONDS,), name="ddp-metrics",
                         daemon=True).start()

    def arrived(self) -> bool:
        """A request came in: someone watches (noted before it is answered, so that a
        client holding its answer is always known to close()). Whether the run had
        ended by then: only then can the answer show the final state."""
        self.last_request = time.monotonic()
        return self.ended

    def served(self, path: str, after_end: bool) -> None:
        """A request was answered; `after_end` as `arrived` said."""
        if after_end and path in ("/api/history", "/metrics"):  # the dashboard's last poll, a scrape
            self.final_seen.set()

    def run_ended(self) -> None:
        """The final state is recorded: the next poll or scrape shows it."""
        self.ended = True

    def close(self) -> None:
        """Stop serving, after up to `linger` seconds for a last poll if someone watches."""
        if time.monotonic() - self.last_request < WATCHED_SECONDS:
            self.final_seen.wait(self.linger)
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    """GET and HEAD only: nothing on this port changes training."""

    site: MonitorServer
    static: dict = {}
    timeout = 10               # an idle connection is closed after this many seconds
    server_version = f"ddp-train/{__version__}"
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 — quiet: the trainer's log is for training
        pass

    def _send(self, code: int, body: bytes, ctype: str, extra: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-store")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _text(self, code: int, text: str) -> None:
        self._send(code, (text + "\n").encode(), "text/plain; charset=utf-8")

    def _json(self, obj) -> None:
        self._send(200, json.dumps(obj, allow_nan=False).encode(), "application/json")

    def do_GET(self):  # noqa: N802
        url, after_end = urlsplit(self.path), self.site.arrived()
        try:
            self._route(url)
        except (BrokenPipeError, ConnectionResetError):
            return
        self.site.served(url.path, after_end)

    def _route(self, url) -> None:
        path, views = url.path, self.site.views
        if path == "/metrics":
            from prometheus_client.exposition import choose_encoder

            encode, ctype = choose_encoder(self.headers.get("Accept"))
            return self._send(200, encode(views.registry), ctype)
        if path == "/healthz":
            ok, text = views.health()
            return self._text(200 if ok else 503, text)
        try:
            if path == "/status":
                return self._json(views.status(url.query))
            if path == "/api/history":
                return self._json(views.history(url.query))
        except QueryError as e:
            return self._text(e.code, str(e))
        if path in ("/", "/index.html"):
            path = "/static/index.html"
        name = path[len("/static/"):]
        if path.startswith("/static/") and name in self.static:
            file = self.static[name]
            return self._send(200, file.read_bytes(),
                              CONTENT_TYPES.get(file.suffix, "application/octet-stream"),
                              {"Content-Security-Policy": CSP})
        return self._text(404, f"not found: {path} (try /, /metrics, /healthz, /status)")

    do_HEAD = do_GET

    def _read_only(self):
        self.send_response(405)
        self.send_header("Allow", "GET, HEAD")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _read_only
