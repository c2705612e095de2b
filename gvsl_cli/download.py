"""HTTP downloads that either produce the exact expected file or leave nothing at its name.

``download`` streams a file from a list of mirrors into a hidden ``.part`` file next to the
destination, resumes it with an HTTP ``Range`` request when a transfer breaks, retries
transient failures with exponential backoff, passes Google Drive's "cannot scan this file
for viruses" confirmation page, checks size and sha256, then renames the file into place
(atomic on one file system). A file that fails its checks is deleted, never renamed.
``file_lock`` serialises processes that want the same file (a SLURM array starting).

Networking goes through ``requests`` with ``trust_env`` (its default): ``HTTPS_PROXY``,
``HTTP_PROXY``, ``NO_PROXY``, ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` and ``.netrc``
work as users expect.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

from gvsl_cli import __version__
from gvsl_cli.errors import WeightsError
from gvsl_cli.locking import open_lock_file, try_lock, unlock

if TYPE_CHECKING:
    import requests

#: Bytes read and written at a time. A chunk cut short by a dropped connection is lost, so
#: this is also what an attempt may lose: with 1 MiB, a connection that drops every few
#: hundred kB (a flaky proxy or VPN) made no progress at all, retry after retry.
CHUNK_BYTES = 1 << 16
#: Responses a server gives when it is busy or briefly broken: worth another try.
TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
#: Enough to hold any confirmation page; weights files are never HTML.
MAX_HTML_BYTES = 2 << 20
#: Drive may answer the confirmed URL with yet another page; give up after this many.
MAX_HTML_HOPS = 3


def env_flag(name: str) -> bool:
    """True when environment variable ``name`` is 1, true, yes or on (any case)."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class DownloadOptions:
    """How patient a download is.

    Attributes:
        connect_timeout: seconds to wait for a TCP/TLS connection.
        read_timeout: seconds without receiving a byte before the attempt counts as failed.
        retries: further attempts per mirror after a transient failure (timeouts, dropped
            connections, HTTP 429/5xx). An attempt that received bytes resets the count, so
            a flaky link finishes a large file as long as it makes progress.
        backoff: seconds before the first retry; doubled for each further one.
        backoff_max: the longest wait between two attempts, in seconds.
        lock_timeout: seconds to wait while another process downloads the same file.
    """

    connect_timeout: float = 20.0
    read_timeout: float = 60.0
    retries: int = 5
    backoff: float = 1.0
    backoff_max: float = 60.0
    lock_timeout: float = 6 * 3600.0


class Reporter:
    """Where progress and notices go. This base class is silent (used by tests and libraries)."""

    def notice(self, message: str, *, warning: bool = False) -> None:
        """One line for the user: a state of the transfer (waiting, retrying) or, with
        ``warning``, something to know (a hash that was pinned, a file that was deleted)."""

    def start(self, description: str, total: int | None, done: int) -> None:
        """A transfer begins; ``total`` bytes (None if unknown), ``done`` already on disk."""

    def advance(self, done: int) -> None:
        """``done`` bytes of the current transfer are on disk."""

    def stop(self) -> None:
        """The current transfer ended (finished or failed)."""


class ConsoleReporter(Reporter):
    """Notices and a rich progress bar (bytes, speed, time left) on stderr; ``quiet``: the
    warnings only (``-q``)."""

    def __init__(self, quiet: bool = False) -> None:
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False, soft_wrap=True)
        self.quiet = quiet
        self._progress = None
        self._task = None

    def notice(self, message: str, *, warning: bool = False) -> None:
        if warning or not self.quiet:
            self.console.print(f"warning: {message}" if warning else message, markup=False)

    def start(self, description: str, total: int | None, done: int) -> None:
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

        self.stop()
        if self.quiet:
            return
        self._progress = Progress(
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=self.console,
        )
        self._progress.start()
        self._task = self._progress.add_task(description, total=total, completed=done)

    def advance(self, done: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=done)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


@dataclass(frozen=True)
class Downloaded:
    """A verified file now at ``path``: its sha256, size in bytes and the mirror URL it came
    from (as listed: not a one-time URL such as Drive's confirmed one)."""

    path: Path
    sha256: str
    size: int
    url: str


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def new_session() -> "requests.Session":
    """A requests session that honours proxies, CA bundles and .netrc from the environment."""
    import requests

    session = requests.Session()
    session.trust_env = True  # the default, stated: proxies and CA bundles come from the environment
    session.headers["User-Agent"] = f"gvsl/{__version__} (+https://github.com/YutingHe-list/GVSL)"
    return session


# --------------------------------------------------------------------------- locking


def make_shared_folder(folder: Path) -> None:
    """Create ``folder`` and its missing parents; in a group-shared tree, as shared as it.

    A folder with the setgid bit is the usual way to share files with a group (new files
    get the folder's group). Linux passes that bit on to subfolders, but their permissions
    come from the creating user's umask (typically 022: no group write), so the first
    user to fetch would make ``weights/`` or ``urls/<key>/`` read-only for everyone else.
    A new folder under a setgid folder therefore gets that folder's permissions.
    """
    import stat

    missing = []
    probe = folder
    while not probe.exists() and probe.parent != probe:
        missing.append(probe)
        probe = probe.parent
    folder.mkdir(parents=True, exist_ok=True)
    for new in reversed(missing):  # from the top down, each like the one above it
        try:
            parent_mode = stat.S_IMODE(new.parent.stat().st_mode)
            if parent_mode & stat.S_ISGID:
                os.chmod(new, parent_mode & 0o2777)  # not the sticky bit: it would stop replacing files
        except OSError:  # a file system without modes, or a folder another process made: keep what mkdir gave
            pass


class LockUnavailable(WeightsError):
    """The lock file of a cached file can be neither created nor opened (a read-only
    folder, or another user's lock file without read permission for this one).

    Attributes:
        path: the lock file.
    """

    def __init__(self, path: Path, exc: OSError) -> None:
        if path.exists() and os.access(path.parent, os.W_OK):
            hint = f"the folder is writable but this lock file is not readable for you: ask its owner to run `chmod a+rw {path}`, or point GVSL_HOME at a folder of your own"
        else:
            hint = "make the cache folder writable for you, or point GVSL_HOME at a writable folder"
        super().__init__(f"cannot open the lock file {path} ({exc.strerror or exc})", hint=hint)
        self.path = path


@contextmanager
def file_lock(path: Path, *, timeout: float, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed) for the ``with`` block.

    The operating system releases the lock when its process ends, even on a crash, so a
    lock is never stale. The lock file itself stays (removing it would let a third process
    lock a fresh file while a second still waits on the old one). ``on_wait`` is called
    once if another process holds the lock.

    The lock file is created readable and writable by all, and an existing one this user
    may not write is locked through a read-only descriptor (``locking.open_lock_file``), so
    a group-shared cache works for every member, not only for the one who fetched first.

    Raises:
        LockUnavailable: the lock file can be neither created nor opened.
        WeightsError: ``timeout`` seconds passed.
    """
    try:
        make_shared_folder(path.parent)
        fd = open_lock_file(path)
    except OSError as exc:
        raise LockUnavailable(path, exc) from None
    try:
        deadline = time.monotonic() + timeout
        waiting = False
        while not try_lock(fd):
            if not waiting and on_wait is not None:
                on_wait()
            waiting = True
            if time.monotonic() > deadline:
                raise WeightsError(
                    f"waited {timeout:.0f} s for {path}: another process is still downloading the same file",
                    hint="wait for it to finish; the lock is released when that process ends",
                )
            time.sleep(0.1)
        try:
            yield
        finally:
            unlock(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- Google Drive


class _ConfirmPageParser(HTMLParser):
    """Collect the forms (action + inputs) and links of an HTML page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.forms: list[tuple[str, list[tuple[str, str]]]] = []
        self.links: list[str] = []
        self._in_form = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: (v or "") for k, v in attrs}
        if tag == "form":
            self.forms.append((values.get("action", ""), []))
            self._in_form = True
        elif tag == "input" and self._in_form and values.get("name"):
            self.forms[-1][1].append((values["name"], values.get("value", "")))
        elif tag == "a" and values.get("href"):
            self.links.append(values["href"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._in_form = False


def _with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    query.update(params)
    return urlunsplit(parts._replace(query=urlencode(query)))


def drive_confirmation_url(page_url: str, html: str, cookies: dict[str, str]) -> str | None:
    """The URL that fetches the file behind a Google Drive confirmation page, or None.

    Drive answers a large file with an HTML warning ("can't scan this file for viruses")
    instead of the file. Three generations of that page exist and all are handled:
    a form (``id``, ``export``, ``confirm``, ``uuid`` inputs) whose GET gives the file;
    a "download anyway" link carrying ``confirm=``; and a ``download_warning*`` cookie whose
    value is the confirm token.
    """
    parser = _ConfirmPageParser()
    parser.feed(html)
    for action, inputs in parser.forms:
        names = {name for name, _ in inputs}
        if "confirm" in names or "uuid" in names:
            target = urljoin(page_url, action or page_url)
            parts = urlsplit(target)
            return urlunsplit(parts._replace(query=urlencode(inputs)))
    for href in parser.links:
        if "confirm=" in href and ("export=download" in href or "/download" in href):
            return urljoin(page_url, href)
    for name, value in cookies.items():
        if name.startswith("download_warning"):
            return _with_query(page_url, confirm=value)
    return None


def _html_failure(html: str) -> str:
    """Why an HTML page came instead of a file, in the user's terms."""
    text = html.lower()
    if "quota exceeded" in text or "too many users have viewed or downloaded this file" in text:
        return "Google Drive refuses the download for now (download quota exceeded); try again in a few hours or use another mirror"
    if "accounts.google.com" in text or "sign in" in text:
        return "the server asks to sign in (the file is not public)"
    return "the server sent an HTML page instead of a weights file"


# --------------------------------------------------------------------------- download


class _Transient(Exception):
    """This attempt failed in a way another attempt may not (timeout, 5xx, dropped link)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _MirrorFailed(Exception):
    """This mirror cannot provide the file (404, HTML page, size or hash mismatch...)."""


def _retry_after(response: "requests.Response") -> float | None:
    value = response.headers.get("Retry-After", "").strip()
    return float(value) if value.isdigit() else None


def _validator(response: "requests.Response") -> str | None:
    """A strong ETag or Last-Modified: what If-Range needs to resume only the same file."""
    etag = response.headers.get("ETag", "")
    if etag and not etag.startswith("W/"):
        return etag
    return response.headers.get("Last-Modified") or None


def _content_range(response: "requests.Response") -> tuple[int, int | None] | None:
    """(first byte, total or None) of a 206 response's ``Content-Range``."""
    value = response.headers.get("Content-Range", "")
    try:
        unit, _, spec = value.partition(" ")
        span, _, total = spec.partition("/")
        first = int(span.split("-")[0])
        return (first, None if total == "*" else int(total)) if unit == "bytes" else None
    except ValueError:
        return None


@dataclass
class _Partial:
    """The hidden ``.part`` file of a destination and what is known about its bytes."""

    path: Path
    meta: Path

    @classmethod
    def of(cls, dest: Path) -> "_Partial":
        return cls(dest.parent / f".{dest.name}.part", dest.parent / f".{dest.name}.part.json")

    def resumable_from(self, url: str) -> tuple[int, str | None]:
        """Bytes already fetched from ``url`` and their validator; (0, None) starts afresh."""
        try:
            meta = json.loads(self.meta.read_text(encoding="utf-8"))
            size = self.path.stat().st_size
        except (OSError, ValueError):
            return 0, None
        if meta.get("url") != url or not os.access(self.path, os.W_OK):
            return 0, None  # another mirror's bytes, or another user's file we cannot append to
        return size, meta.get("validator")

    def begin(self, url: str, validator: str | None) -> None:
        """Start the file afresh for ``url``. The old files are removed rather than
        overwritten: in a shared cache they may be another user's, which we may replace
        (the folder is writable) but not write into."""
        self.discard()
        self.meta.write_text(json.dumps({"url": url, "validator": validator}), encoding="utf-8")

    def discard(self) -> None:
        for path in (self.path, self.meta):
            path.unlink(missing_ok=True)


def _fetch_into(
    url: str,
    partial: _Partial,
    *,
    expected_size: int,
    hash_known: bool,
    session: "requests.Session",
    options: DownloadOptions,
    reporter: Reporter,
    label: str,
) -> None:
    """Make ``partial.path`` hold the complete body of ``url`` (a mirror URL as listed).

    ``hash_known``: the caller checks the result against a known sha256; without one, bytes
    are only resumed when the server gave a validator for If-Range.

    Raises:
        _MirrorFailed: the mirror cannot give the file, or transient failures outlasted
            ``options.retries``; a partial file worth resuming is kept.
    """
    import requests

    # The .part file belongs to the mirror URL, not to the URL that serves its bytes: Drive's
    # confirmed URL carries a one-time uuid, new on every warning page, so keying on it would
    # never resume across runs. If-Range (the file's ETag / Last-Modified) is what makes sure
    # the bytes still come from the same file.
    current = url  # becomes Drive's confirmed URL after a confirmation page
    failures_in_a_row = 0
    html_hops = 0
    while True:
        offset, validator = partial.resumable_from(url)
        if offset and validator is None and not hash_known:
            offset = 0  # nothing would tell a spliced file from the real one: start over
        headers = {"Accept-Encoding": "identity"}  # byte offsets must be those of the file itself
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if validator:
                headers["If-Range"] = validator  # a changed file comes back whole (200), not spliced
        received = 0
        try:
            with session.get(current, headers=headers, stream=True, timeout=(options.connect_timeout, options.read_timeout)) as response:
                status = response.status_code
                if status in TRANSIENT_STATUS:
                    raise _Transient(f"HTTP {status} {response.reason}", _retry_after(response))
                if status == 416:  # our partial file does not fit the server's file: start over
                    partial.discard()
                    raise _Transient("HTTP 416 (range not satisfiable); starting over")
                if status >= 400:
                    raise _MirrorFailed(f"HTTP {status} {response.reason}")
                if "text/html" in response.headers.get("Content-Type", "").lower():
                    html = response.raw.read(MAX_HTML_BYTES, decode_content=True).decode("utf-8", "replace")
                    confirmed = drive_confirmation_url(response.url, html, dict(session.cookies.items()) | dict(response.cookies.items()))
                    if confirmed is None or html_hops >= MAX_HTML_HOPS:
                        raise _MirrorFailed(_html_failure(html))
                    html_hops += 1
                    current = confirmed
                    continue

                if status == 206 and offset:
                    span = _content_range(response)
                    if span is None or span[0] != offset:
                        partial.discard()
                        raise _Transient(f"the server resumed at the wrong place ({response.headers.get('Content-Range')!r}); starting over")
                    total = span[1]
                    mode = "ab"
                else:  # 200: a fresh start (or the server ignored Range / the file changed)
                    offset = 0
                    length = response.headers.get("Content-Length", "")
                    total = int(length) if length.isdigit() else None
                    mode = "wb"
                    partial.begin(url, _validator(response))
                if expected_size and total is not None and total != expected_size:
                    partial.discard()
                    raise _MirrorFailed(f"size mismatch: the server offers {total} bytes, expected {expected_size}; nothing was kept")

                done = offset
                reporter.start(label, total or expected_size or None, done)
                try:
                    with open(partial.path, mode) as handle:
                        for chunk in response.iter_content(CHUNK_BYTES):
                            handle.write(chunk)
                            done += len(chunk)
                            received += len(chunk)
                            if expected_size and done > expected_size:
                                partial.discard()
                                raise _MirrorFailed(f"size mismatch: the server sent more than the expected {expected_size} bytes; the download was deleted")
                            reporter.advance(done)
                finally:
                    reporter.stop()
                if total is not None and done < total:  # an older urllib3 may end short silently
                    raise _Transient(f"connection closed after {done} of {total} bytes")
                return
        except requests.exceptions.SSLError as exc:
            raise _MirrorFailed(f"TLS error ({_first_line(exc)})") from None
        except (requests.exceptions.Timeout, requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError, _Transient) as exc:
            failures_in_a_row = 1 if received else failures_in_a_row + 1
            if failures_in_a_row > options.retries:
                raise _MirrorFailed(_describe(exc, options, url=current, session=session)) from None
            wait = min(options.backoff * 2 ** (failures_in_a_row - 1), options.backoff_max)
            if isinstance(exc, _Transient) and exc.retry_after is not None:
                wait = min(max(wait, exc.retry_after), options.backoff_max)
            reporter.notice(f"{label}: {_describe(exc, options, url=current, session=session)}; retrying in {wait:.1f} s")
            time.sleep(wait)
        except requests.exceptions.RequestException as exc:
            raise _MirrorFailed(_first_line(exc)) from None


def _first_line(exc: BaseException) -> str:
    return _shortened((str(exc).strip().splitlines() or [type(exc).__name__])[0])


def _shortened(text: str, limit: int = 200) -> str:
    """``text`` cut at a word boundary to at most about ``limit`` characters, marked "…"."""
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(",;:(") + " …"


def _innermost(exc: BaseException) -> BaseException:
    """The exception at the bottom of requests' and urllib3's wrappers (MaxRetryError's
    ``reason``, urllib3 ProxyError's ``original_error``, an exception among ``args``)."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "reason", None)
        if not isinstance(inner, BaseException):
            inner = getattr(exc, "original_error", None)
        if not isinstance(inner, BaseException):
            inner = next((arg for arg in exc.args if isinstance(arg, BaseException)), None)
        if inner is None:
            return exc
        exc = inner
    return exc


def _connection_reason(exc: BaseException) -> str:
    """The operating system's reason inside urllib3's long wrapper text ("[Errno 111]
    Connection refused"), else the message of the innermost exception, whole sentences
    rather than 200 characters of nested reprs."""
    import re

    found = re.search(r"\[Errno -?\d+\][^'\")\]]*", str(exc))
    if found:
        return found.group(0).strip()
    inner = _innermost(exc)
    text = re.sub(r"^\w+\(host=[^)]*\):\s*", "", str(inner).strip())  # urllib3's "HTTPConnection(host=..., port=...): "
    return _shortened(text.splitlines()[0]) if text else type(inner).__name__


def _proxy_for(url: str, session: "requests.Session") -> str | None:
    """The proxy requests uses for ``url`` (environment and session), without credentials."""
    import requests

    try:
        proxies = session.merge_environment_settings(url, {}, None, None, None)["proxies"]
        proxy = requests.utils.select_proxy(url, proxies)
        if not proxy:
            return None
        parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host = parts.hostname or ""
        netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    except Exception:  # noqa: BLE001 - naming the proxy is a courtesy (a malformed proxy URL): the error is reported anyway
        return None
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def proxy_variable(urls: Sequence[str]) -> str:
    """The environment variable(s) that set the proxy for these URLs' schemes."""
    schemes = sorted({urlsplit(url).scheme.lower() for url in urls} & {"http", "https"}) or ["https"]
    return " or ".join(f"{scheme.upper()}_PROXY" for scheme in schemes)


def _describe(exc: BaseException, options: DownloadOptions, *, url: str = "", session: "requests.Session | None" = None) -> str:
    import requests

    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return f"no connection within {options.connect_timeout:g} s"
    if isinstance(exc, requests.exceptions.Timeout):
        return f"timed out: no data for {options.read_timeout:g} s"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return "the connection broke during the transfer"
    if isinstance(exc, requests.exceptions.ProxyError):
        proxy = _proxy_for(url, session) if url and session is not None else None
        return f"cannot connect through the proxy{' ' + proxy if proxy else ''} ({_connection_reason(exc)})"
    if isinstance(exc, requests.exceptions.ConnectionError):
        return f"cannot connect ({_connection_reason(exc)})"
    return str(exc)


def download(
    urls: Sequence[str],
    dest: Path,
    *,
    sha256: str | None,
    size: int = 0,
    label: str,
    session: "requests.Session",
    options: DownloadOptions = DownloadOptions(),
    reporter: Reporter = Reporter(),
) -> Downloaded:
    """Download the file at the first mirror of ``urls`` that gives it correctly to ``dest``.

    The caller holds the lock of ``dest`` (``file_lock``). Bytes go to a hidden ``.part``
    file in ``dest``'s folder; a transfer interrupted by a dropped connection, a timeout or
    a killed process resumes from it (HTTP Range, guarded by If-Range) on the next attempt
    or run. The complete file is checked against ``size`` (bytes, 0 = unknown) and
    ``sha256`` (None = unknown: the caller decides what to trust) and only then renamed to
    ``dest``.

    Raises:
        WeightsError: every mirror failed; the message says how each one did. A file that
            failed its checks has been deleted.
    """
    partial = _Partial.of(dest)
    failures = []
    for url in urls:
        try:
            _fetch_into(url, partial, expected_size=size, hash_known=sha256 is not None, session=session, options=options, reporter=reporter, label=label)
        except _MirrorFailed as exc:
            failures.append(f"{url}: {exc}")
            continue
        actual_size = partial.path.stat().st_size
        digest = sha256_file(partial.path)
        if size and actual_size != size:
            partial.discard()
            failures.append(f"{url}: size mismatch: expected {size} bytes, got {actual_size}; the download was deleted")
            continue
        if sha256 and digest != sha256:
            partial.discard()
            failures.append(
                f"{url}: sha256 mismatch: expected {sha256}, got {digest}; the download was deleted "
                "(the file may be corrupted, or the server's file or the known hash changed)"
            )
            continue
        os.replace(partial.path, dest)
        partial.meta.unlink(missing_ok=True)
        return Downloaded(path=dest, sha256=digest, size=actual_size, url=url)
    raise WeightsError(f"{label}: download failed: " + "; ".join(failures), hint=f"check the URL and your network (proxy: {proxy_variable(urls)}; CA bundle: REQUESTS_CA_BUNDLE), or use another mirror")
