"""A real HTTP server on 127.0.0.1 whose misbehaviour the download tests control.

Each path has a ``Route`` saying what to serve and how to fail: honour ``Range`` or not,
drop the connection mid-file, corrupt a byte, answer 503 first, hang (for timeouts),
trickle the body slowly, or put a Google-Drive-style confirmation page in front. The server
records every request (path, headers) so tests can assert what the client did, and it acts
as an HTTP proxy too (a request line with an absolute URL is served from its path).
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

DRIVE_TOKEN = "tok3n"


@dataclass
class Route:
    """What one path serves.

    Attributes:
        body: the file.
        status: answer this status (with a short text body) instead of the file.
        ranges: honour ``Range: bytes=N-`` (206) or ignore it (200, whole file).
        drop_after: body bytes sent before the connection is cut, for the next ``drops`` answers.
        drops: how many answers are cut.
        busy: how many answers are HTTP 503 before the file is served.
        corrupt: flip one byte in the middle of the body.
        hang: seconds to wait before answering.
        seconds: spread the body over this many seconds (to make downloads overlap).
        drive: "form", "cookie" or "quota": a Drive-style page comes first (quota: only it).
            As Drive does, every "form" page carries a new ``uuid``; the file is served to
            any uuid that was issued (``drive_uuids``, in order).
        etag: the strong validator sent with the file.
        content_type: of the file.
    """

    body: bytes = b""
    status: int = 200
    ranges: bool = True
    drop_after: int = 0
    drops: int = 0
    busy: int = 0
    corrupt: bool = False
    hang: float = 0.0
    seconds: float = 0.0
    drive: str = ""
    etag: str = '"v1"'
    content_type: str = "application/octet-stream"
    drive_uuids: list[str] = field(default_factory=list)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.body).hexdigest()


@dataclass
class Seen:
    """One request as the server received it."""

    path: str  # path and query, without scheme and host even when proxied
    headers: dict[str, str]
    proxied: bool = False

    @property
    def range(self) -> str | None:
        return self.headers.get("Range")


class WeightsServer:
    """Start with ``start()``, stop with ``stop()``; ``routes`` may change while running."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        handler = _make_handler(self)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True  # a hanging handler must not block shutdown
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def start(self) -> "WeightsServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def requests_to(self, path: str) -> list[Seen]:
        """Requests whose path (query ignored) is ``path``."""
        return [s for s in self.seen if urlsplit(s.path).path == path]

    def record(self, seen: Seen) -> None:
        with self._lock:
            self.seen.append(seen)


def _drive_page(server: WeightsServer, path: str, query: dict, route: Route, handler: BaseHTTPRequestHandler) -> bool:
    """Answer the confirmation page when the request has not confirmed yet; True if answered."""
    file_id = query.get("id", ["x"])[0]
    cookie = handler.headers.get("Cookie", "")
    if route.drive == "form" and query.get("confirm") == ["t"] and query.get("uuid", [""])[0] in route.drive_uuids:
        return False
    if route.drive == "cookie" and query.get("confirm") == [DRIVE_TOKEN] and f"download_warning_1_{file_id}={DRIVE_TOKEN}" in cookie:
        return False
    if route.drive == "form":
        route.drive_uuids.append(str(uuid.uuid4()))
        page = (
            "<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>"
            "<p>Google Drive can't scan this file for viruses.</p>"
            f'<form id="download-form" action="{server.url(path)}" method="get">'
            '<input type="submit" id="uc-download-link" value="Download anyway"/>'
            f'<input type="hidden" name="id" value="{file_id}"><input type="hidden" name="export" value="download">'
            f'<input type="hidden" name="confirm" value="t"><input type="hidden" name="uuid" value="{route.drive_uuids[-1]}"></form></body></html>'
        )
        cookies = []
    elif route.drive == "cookie":
        page = "<html><body><p>Google Drive - Virus scan warning</p></body></html>"
        cookies = [f"download_warning_1_{file_id}={DRIVE_TOKEN}; Path=/"]
    else:  # quota
        page = "<html><body><p>Sorry, you can't view or download this file at this time.</p><p>Too many users have viewed or downloaded this file recently.</p></body></html>"
        cookies = []
    data = page.encode()
    handler.send_response(200)
    handler.send_header("Content-Type", "text/html; charset=utf-8")
    handler.send_header("Content-Length", str(len(data)))
    for value in cookies:
        handler.send_header("Set-Cookie", value)
    handler.end_headers()
    handler.wfile.write(data)
    return True


def _make_handler(server: WeightsServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            proxied = self.path.startswith("http://")
            target = urlsplit(self.path)
            path_and_query = target.path + (f"?{target.query}" if target.query else "")
            server.record(Seen(path_and_query, dict(self.headers.items()), proxied))
            route = server.routes.get(target.path)
            if route is None:
                return self._plain(404, "not found")
            if route.hang:
                time.sleep(route.hang)
            if route.status != 200:
                return self._plain(route.status, "error")
            if route.busy:
                route.busy -= 1
                return self._plain(503, "busy")
            if route.drive and _drive_page(server, target.path, parse_qs(target.query), route, self):
                return
            body = bytearray(route.body)
            if route.corrupt:
                body[len(body) // 2] ^= 0xFF
            start = 0
            wanted = self.headers.get("Range", "")
            if_range = self.headers.get("If-Range")
            if route.ranges and wanted.startswith("bytes=") and (if_range is None or if_range == route.etag):
                start = int(wanted[len("bytes="):].split("-")[0])
            payload = bytes(body[start:])
            self.send_response(206 if start else 200)
            self.send_header("Content-Type", route.content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("ETag", route.etag)
            if route.ranges:
                self.send_header("Accept-Ranges", "bytes")
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.end_headers()
            if route.drops:
                route.drops -= 1
                self.wfile.write(payload[: route.drop_after])
                self.wfile.flush()
                self.close_connection = True
                return
            pieces = 10 if route.seconds else 1
            step = -(-len(payload) // pieces)
            try:
                for i in range(pieces):
                    self.wfile.write(payload[i * step:(i + 1) * step])
                    if route.seconds:
                        self.wfile.flush()
                        time.sleep(route.seconds / pieces)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (a test wanted that)
                self.close_connection = True

        def _plain(self, status: int, text: str) -> None:
            data = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


def manifest_toml(entries: list[dict]) -> str:
    """A manifest file's text from plain dicts (strings, ints, floats, lists of strings)."""
    import json

    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)  # a JSON string of ASCII is a TOML basic string
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    blocks = ["[[weights]]\n" + "".join(f"{k} = {value(v)}\n" for k, v in entry.items()) for entry in entries]
    return "\n".join(blocks)


# --------------------------------------------------------------------------- fixtures
# Imported by name into the test modules that need them (kept out of conftest.py, which the
# whole suite shares).

import pytest  # noqa: E402


@pytest.fixture
def server():
    running = WeightsServer().start()
    yield running
    running.stop()


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    """An empty GVSL_HOME, no gvsl or proxy settings from the environment of the test run."""
    home = tmp_path / "gvsl-home"
    monkeypatch.setenv("GVSL_HOME", str(home))
    for name in ("GVSL_OFFLINE", "GVSL_TRUST_UNVERIFIED", "GVSL_MANIFEST", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("COLUMNS", "250")  # rich tables unwrapped, for assertions
    return home


@pytest.fixture(scope="session")
def checkpoint_bytes(tmp_path_factory) -> dict[str, bytes]:
    """Real small weights files: two gvsl checkpoints (width 8; "gvsl", "gvsl-v2") and an
    official-format state_dict of width 8 ("official")."""
    import torch

    from gvsl_cli.checkpoint import save_checkpoint
    from gvsl_cli.config import ModelConfig, PreprocessConfig
    from gvsl_cli.model import GVSL

    folder = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    model = GVSL(ModelConfig(width=8))
    save_checkpoint(folder / "a.pt", model, PreprocessConfig(modality="mr", spacing=2.0))
    save_checkpoint(folder / "b.pt", model, PreprocessConfig(modality="mr", spacing=2.0), extra={"iteration": 2})
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, folder / "official.pth")
    return {"gvsl": (folder / "a.pt").read_bytes(), "gvsl-v2": (folder / "b.pt").read_bytes(), "official": (folder / "official.pth").read_bytes()}
