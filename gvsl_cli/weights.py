"""Resolving a ``--weights`` argument (manifest name, file path or URL) to loaded weights.

Every command that takes ``--weights`` calls ``load_weights_spec``; this module owns the
weights cache. Cache layout (root: ``$GVSL_HOME``, else the platform's user cache folder
for "gvsl", e.g. ``~/.cache/gvsl`` on Linux)::

    weights/<name>.pt          a manifest entry, verified
    weights/<name>.pt.json     its record: sha256, size, URL, time, where the hash came from
    weights/<name>.pt.lock     lock file (held while a process checks or downloads it)
    weights/.<name>.pt.part    an unfinished download (resumed by the next attempt)
    urls/<key>/<file>          a ``--weights URL`` download (key: sha256 of the URL), same files

Hash policy: a file is only ever used after its sha256 matched a known value: the
manifest's, a ``#sha256=`` fragment of a URL, or a hash pinned by the user. When no hash is
known (e.g. the official GVSL weights, published without one), gvsl refuses to download
unless the user opts in (``trust_unverified``; ``--trust-unverified`` or
``GVSL_TRUST_UNVERIFIED=1``); it then reports the sha256 it received and pins it in the
record, and every later load is verified against that pin. Every load re-hashes the cached
file (about 2 GB/s with SHA extensions), so a file damaged in the cache is caught. Without a
hash known now, the record's vouches for the file (the sha256 it was verified against when
fetched): a bare URL fetched before with ``#sha256=``, or a name fetched with a manifest that
is not given now (``open_name``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable
from urllib.parse import urlsplit, urlunsplit

from gvsl_cli.download import (
    ConsoleReporter,
    DownloadOptions,
    LockUnavailable,
    Reporter,
    download,
    env_flag,
    file_lock,
    new_session,
    sha256_file,
)
from gvsl_cli.errors import CheckpointError, WeightsError
from gvsl_cli.manifest import NAME_PATTERN, SHA256_PATTERN, Manifest, WeightsEntry, load_manifest
from gvsl_cli.resources import cache_root

if TYPE_CHECKING:
    from gvsl_cli.checkpoint import LoadedWeights

OFFLINE_ENV = "GVSL_OFFLINE"
TRUST_ENV = "GVSL_TRUST_UNVERIFIED"
#: Where a record says its hash came from.
HASH_FROM_MANIFEST, HASH_FROM_URL, HASH_PINNED = "manifest", "url", "pinned"


def is_url(spec: str) -> bool:
    return spec.lower().startswith(("http://", "https://"))


@dataclass(frozen=True)
class Target:
    """One file the cache can hold: where it lives and how to get and check it.

    Attributes:
        label: how messages name it ("weights 'name'" or the URL).
        urls: mirrors, tried in order.
        sha256: the hash known in advance ("" = none; a pinned one may exist in the record).
        hash_source: where ``sha256`` comes from (manifest or url).
        size: expected bytes, 0 = unknown.
        path: the verified file in the cache.
        root: the cache folder that holds it (what to copy to an offline machine).
    """

    label: str
    urls: tuple[str, ...]
    sha256: str
    hash_source: str
    size: int
    path: Path
    root: Path

    @property
    def record_path(self) -> Path:
        return self.path.with_name(self.path.name + ".json")

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    def read_record(self) -> dict | None:
        """The record written when the file was fetched, or None."""
        try:
            record = json.loads(self.record_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def expected_hash(self) -> tuple[str | None, str | None]:
        """(sha256, where it comes from); (None, None) when nothing vouches for the file.

        The hash known in advance wins. Without one, the record's: the sha256 the cached file
        was verified against when it was fetched (a pin, or the hash a manifest or a
        ``#sha256=`` fragment gave then), so a name or bare URL fetched once with a hash
        stays verifiable without repeating it.
        """
        if self.sha256:
            return self.sha256, self.hash_source
        record = self.read_record() or {}
        recorded, source = record.get("sha256", ""), record.get("hash_source")
        if source in (HASH_FROM_MANIFEST, HASH_FROM_URL, HASH_PINNED) and isinstance(recorded, str) and SHA256_PATTERN.match(recorded):
            return recorded, source
        return None, None


def entry_target(entry: WeightsEntry, root: Path | None = None) -> Target:
    """The cache slot of a manifest entry."""
    root = cache_root() if root is None else root
    return Target(
        label=f"weights {entry.name!r}",
        urls=entry.urls,
        sha256=entry.sha256,
        hash_source=HASH_FROM_MANIFEST,
        size=entry.size,
        path=root / "weights" / f"{entry.name}.pt",
        root=root,
    )


def url_target(url: str, root: Path | None = None) -> Target:
    """The cache slot of a URL; a ``#sha256=<hex>`` fragment gives its known hash."""
    root = cache_root() if root is None else root
    parts = urlsplit(url)
    sha256 = ""
    if parts.fragment:
        key, _, value = parts.fragment.partition("=")
        if key != "sha256" or not SHA256_PATTERN.match(value.lower()):
            raise WeightsError(f"{url}: the only URL fragment gvsl understands is #sha256=<64 hex digits>")
        sha256 = value.lower()
    bare = urlunsplit(parts._replace(fragment=""))
    filename = re.sub(r"[^A-Za-z0-9._-]", "_", parts.path.rstrip("/").rsplit("/", 1)[-1])[:100].lstrip(".") or "weights.pt"
    key = hashlib.sha256(bare.encode("utf-8")).hexdigest()[:16]
    return Target(label=bare, urls=(bare,), sha256=sha256, hash_source=HASH_FROM_URL, size=0, path=root / "urls" / key / filename, root=root)


@dataclass(frozen=True)
class Fetched:
    """A verified file in the cache.

    Attributes:
        path: the file.
        sha256: its hash (checked against ``hash_source``: manifest, url or pinned).
        size: bytes.
        downloaded: False when it was already cached.
        pinned_now: True when this call trusted an unverified file and pinned its hash.
    """

    path: Path
    sha256: str
    size: int
    hash_source: str
    downloaded: bool
    pinned_now: bool = False


def _refuse_unverified(target: Target) -> WeightsError:
    if target.hash_source == HASH_FROM_URL:
        how = f"append #sha256=<hex> to the URL, or rerun with {TRUST_ENV}=1"
    else:
        # Only fetch-weights has the flag; other commands (--weights, --init) take the variable.
        name = target.path.stem
        how = f"run `gvsl fetch-weights {name} --trust-unverified` once (or set {TRUST_ENV}=1)"
    return WeightsError(
        f"{target.label}: no sha256 is known for this file, so gvsl cannot check what it would download; refused",
        hint=f"if you trust {target.urls[0]}, {how}: gvsl prints the sha256 it receives and pins it, "
        "and checks every later load against it",
    )


def _offline_not_cached(target: Target) -> WeightsError:
    return WeightsError(
        f"{target.label} is not in the cache ({target.path}) and {OFFLINE_ENV}=1 forbids downloading",
        hint=f"fetch it where there is network (gvsl fetch-weights) and copy the cache folder {target.root}, or unset {OFFLINE_ENV}",
    )


def _write_record(target: Target, *, sha256: str, size: int, url: str, hash_source: str) -> None:
    record = {"sha256": sha256, "size": size, "url": url, "hash_source": hash_source, "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = target.record_path.with_name(f".{target.record_path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, target.record_path)


def _pin_notice(target: Target, sha256: str, size: int) -> str:
    return f"{target.label}: no published sha256; trusted on your request and pinned sha256 {sha256} ({size} bytes) in {target.record_path}"


#: Why a cached file is verified without the lock (``_use_read_only``): the end of the
#: message when the file does not match, and the hint.
_READ_ONLY_REASONS = {
    "read-only": ("the cache is read-only", "ask whoever maintains the cache to run gvsl fetch-weights --verify, or set GVSL_HOME to a writable folder"),
    "offline": (f"{OFFLINE_ENV}=1 forbids downloading it again", f"unset {OFFLINE_ENV} so gvsl replaces it, or copy a good cache folder"),
    "unlockable": ("its lock file cannot be opened, so gvsl may not replace it", "ask whoever fetched it to run gvsl fetch-weights --verify, or set GVSL_HOME to a folder of your own"),
    "unlisted": ("no manifest lists it, so gvsl cannot download it again", "give the manifest you fetched it with (GVSL_MANIFEST=FILE) so gvsl replaces it, or delete the file"),
}


def _use_read_only(target: Target, *, why: str = "read-only", lock_hint: str | None = None) -> Fetched:
    """Verify a cached file without taking its lock; nothing is pinned or deleted.

    ``why`` says why (a key of ``_READ_ONLY_REASONS``): a cache this process cannot write
    (a shared site cache); ``offline``, a look-up that cannot download and so touches
    nothing; ``unlockable``, a writable cache whose lock file this user cannot open;
    ``unlisted``, a name no manifest knows, vouched for by its cache record alone.
    """
    expected, source = target.expected_hash()
    if expected is None and why == "offline":
        raise _refuse_unverified(target)
    if expected is None:
        if why == "unlockable":
            raise WeightsError(
                f"{target.label}: {target.path} has no known or pinned sha256 and its lock file {target.lock_path} cannot be opened to pin one",
                hint=lock_hint,
            )
        raise WeightsError(
            f"{target.label}: {target.path} is in a read-only cache without a known or pinned sha256",
            hint="ask whoever maintains the cache to pin it (gvsl fetch-weights --trust-unverified), or set GVSL_HOME to a writable folder",
        )
    digest = sha256_file(target.path)
    size = target.path.stat().st_size
    if digest != expected or (target.size and size != target.size):
        tail, hint = _READ_ONLY_REASONS[why]
        raise WeightsError(
            f"{target.label}: the cached file {target.path} does not match its sha256 (expected {expected}, got {digest}) and {tail}",
            hint=lock_hint or hint,
        )
    return Fetched(target.path, digest, size, source, downloaded=False)


def fetch(
    target: Target,
    *,
    force: bool = False,
    trust_unverified: bool = False,
    offline: bool = False,
    reporter: Reporter = Reporter(),
    options: DownloadOptions = DownloadOptions(),
    session_factory: Callable[[], object] = new_session,
) -> Fetched:
    """Make ``target`` present and verified in the cache; download it only if needed.

    Holds the target's lock throughout, so concurrent processes download once and the
    others wait, then find the verified file. A cached file that no longer matches its hash
    is deleted (and said so) and downloaded again. ``force`` downloads again even when the
    cached file is good (the old file stays until the new one is verified); with
    ``trust_unverified`` it also replaces a pinned hash by the one received. ``offline``
    writes nothing into the cache (no lock file, no deletion), except the pin that
    ``trust_unverified`` asks for.

    Raises:
        WeightsError: offline and not cached (or cached but not matching its hash), no known hash and not trusted, download failed
            or the file failed its checks (nothing is left at ``target.path`` then).
    """
    # Offline refusals come before the lock: a look-up that cannot download creates no lock
    # file and no folder (nothing is written into the cache, which may be read-only).
    if offline and not target.path.is_file():
        raise _offline_not_cached(target)
    if offline and force:
        raise WeightsError(f"{target.label}: {OFFLINE_ENV}=1 forbids downloading it again (--force)", hint=f"unset {OFFLINE_ENV}, or leave out --force to use the cached file")
    if not force and target.path.is_file() and not os.access(target.path.parent, os.W_OK):
        return _use_read_only(target)
    if offline and not trust_unverified:
        # Pinning a hash (trust_unverified) is the one write an offline look-up may make,
        # on the user's request; it takes the locked path below.
        return _use_read_only(target, why="offline")

    def waiting() -> None:
        reporter.notice(f"{target.label}: another process is downloading it; waiting")

    try:
        return _fetch_locked(target, force=force, trust_unverified=trust_unverified, offline=offline, reporter=reporter, options=options, session_factory=session_factory, on_wait=waiting)
    except LockUnavailable as exc:
        # A writable, shared cache whose lock file another user made unreadable for us:
        # the verified file can still be used as it is, like in a read-only cache.
        if force or not target.path.is_file():
            raise
        return _use_read_only(target, why="unlockable", lock_hint=exc.hint)
    except OSError as exc:  # the cache's file system: full, quota, permissions (network errors are WeightsErrors by now)
        where = exc.filename or target.path.parent
        raise WeightsError(
            f"{target.label}: cannot write the weights cache ({where}): {exc.strerror or exc}",
            hint=f"free space in {target.path.parent} or set GVSL_HOME to another folder; a partial download resumes next time",
        ) from None


def _fetch_locked(target: Target, *, force, trust_unverified, offline, reporter, options, session_factory, on_wait) -> Fetched:
    """``fetch`` from the point where the target's lock is needed."""
    with file_lock(target.lock_path, timeout=options.lock_timeout, on_wait=on_wait):
        expected, source = target.expected_hash()
        if target.path.is_file() and not force:
            digest = sha256_file(target.path)
            size = target.path.stat().st_size
            if expected is None:
                if not trust_unverified:
                    raise _refuse_unverified(target)
                _write_record(target, sha256=digest, size=size, url="(already in the cache)", hash_source=HASH_PINNED)
                reporter.notice(_pin_notice(target, digest, size), warning=True)
                return Fetched(target.path, digest, size, HASH_PINNED, downloaded=False, pinned_now=True)
            if digest == expected and (not target.size or size == target.size):
                return Fetched(target.path, digest, size, source, downloaded=False)
            target.path.unlink()
            reporter.notice(f"{target.label}: the cached file {target.path} does not match its sha256 (expected {expected}, got {digest}); deleted it", warning=True)
        if offline:  # the cached file failed its check and was deleted
            raise _offline_not_cached(target)
        if force and trust_unverified and not target.sha256:
            expected, source = None, None  # only the record vouched: the user asked to trust what the server gives now
        if expected is None and not trust_unverified:
            raise _refuse_unverified(target)
        got = download(
            target.urls,
            target.path,
            sha256=expected,
            size=target.size,
            label=target.label,
            session=session_factory(),
            options=options,
            reporter=reporter,
        )
        hash_source = source or HASH_PINNED
        _write_record(target, sha256=got.sha256, size=got.size, url=got.url, hash_source=hash_source)
        if source is None:
            reporter.notice(_pin_notice(target, got.sha256, got.size), warning=True)
        return Fetched(got.path, got.sha256, got.size, hash_source, downloaded=True, pinned_now=source is None)


@dataclass(frozen=True)
class Verified:
    """Outcome of re-hashing a cached file: status is ok, missing, unpinned, deleted, or
    mismatch (a damaged file in a read-only cache, left in place)."""

    status: str
    path: Path
    sha256: str = ""
    expected: str = ""


def verify(target: Target, *, options: DownloadOptions = DownloadOptions()) -> Verified:
    """Re-hash the cached file of ``target``; a file that does not match is deleted.

    In a cache this process cannot write (a shared site cache) nothing is locked or
    deleted: a file that does not match is reported with status ``mismatch``.
    """
    if target.path.is_file() and not os.access(target.path.parent, os.W_OK):
        return _rehash(target, delete=False)
    try:
        with file_lock(target.lock_path, timeout=options.lock_timeout):
            return _rehash(target, delete=True)
    except LockUnavailable:  # another user's lock file we cannot open: check, change nothing
        if not target.path.is_file():
            raise
        return _rehash(target, delete=False)


def _rehash(target: Target, *, delete: bool) -> Verified:
    if not target.path.is_file():
        return Verified("missing", target.path)
    expected, _ = target.expected_hash()
    digest = sha256_file(target.path)
    if expected is None:
        return Verified("unpinned", target.path, digest)
    size_ok = not target.size or target.path.stat().st_size == target.size
    if digest == expected and size_ok:
        return Verified("ok", target.path, digest, expected)
    if not delete:
        return Verified("mismatch", target.path, digest, expected)
    target.path.unlink()
    return Verified("deleted", target.path, digest, expected)


def cached_url_targets(root: Path | None = None) -> list[Target]:
    """Targets of the URL downloads present in the cache (from their records)."""
    root = cache_root() if root is None else root
    targets = []
    for record_path in sorted((root / "urls").glob("*/*.json")):
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
            url = record["url"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        target = url_target(url, root)
        if target.record_path == record_path:
            known = record.get("sha256", "") if record.get("hash_source") == HASH_FROM_URL else ""
            targets.append(Target(target.label, target.urls, known, HASH_FROM_URL, 0, target.path, target.root))
    return targets


def _flag(value: bool | None, env: str) -> bool:
    return env_flag(env) if value is None else value


def _check_against_entry(loaded: "LoadedWeights", entry: WeightsEntry, path: Path) -> None:
    """The file must be what the manifest says it is (format and network width)."""
    if loaded.kind != entry.format:
        raise CheckpointError(
            f"{path}: manifest {entry.manifest} says weights {entry.name!r} are a {entry.format!r} file, but it is a {loaded.kind!r} one",
            hint="fix the entry's format in the manifest",
        )
    if loaded.model_config.width != entry.width:
        raise CheckpointError(
            f"{path}: manifest {entry.manifest} says weights {entry.name!r} have width {entry.width}, but the file has width {loaded.model_config.width}",
            hint="fix the entry's width in the manifest",
        )


def _load_fetched(target: Target, fetched: Fetched, check: Callable[["LoadedWeights"], None] | None = None) -> "LoadedWeights":
    """Load a fetched file (and ``check`` it). When this very call pinned it and it fails,
    file and pin are removed: what the server gave is not weights gvsl can use.

    Raises:
        CheckpointError: unloadable file, or ``check`` refused it.
    """
    from gvsl_cli.checkpoint import load_weights

    try:
        loaded = load_weights(fetched.path)
        if check is not None:
            check(loaded)
    except CheckpointError:
        if fetched.pinned_now:
            with file_lock(target.lock_path, timeout=DownloadOptions().lock_timeout):
                target.path.unlink(missing_ok=True)
                target.record_path.unlink(missing_ok=True)
        raise
    loaded.extra["weights_sha256"] = fetched.sha256
    return loaded


def open_entry(entry: WeightsEntry, *, root: Path | None = None, **fetch_options) -> tuple[Fetched, "LoadedWeights"]:
    """Fetch a manifest entry (see ``fetch``), load it and check it is what the entry says.

    A hash only proves the file is the one published (or pinned); the manifest also states
    its format and width, checked here so a wrong entry fails at fetch time, not in a job.
    When the file was pinned by this very call and fails the check, file and pin are
    removed: what the server gave is not the weights the entry describes.

    Raises:
        WeightsError: see ``fetch``.
        CheckpointError: unloadable file, or format/width other than the entry's.
    """
    target = entry_target(entry, root)
    fetched = fetch(target, **fetch_options)
    loaded = _load_fetched(target, fetched, lambda loaded: _check_against_entry(loaded, entry, fetched.path))
    loaded.extra["weights_name"] = entry.name
    return fetched, loaded


def open_url(url: str, *, root: Path | None = None, **fetch_options) -> tuple[Fetched, "LoadedWeights"]:
    """Fetch the file at an http(s) URL (see ``fetch``; ``#sha256=`` gives its hash) and load it.

    Raises:
        WeightsError: see ``fetch``.
        CheckpointError: not a loadable gvsl checkpoint or official GVSL state_dict (a file
            pinned by this call is then removed with its pin).
    """
    target = url_target(url, root)
    fetched = fetch(target, **fetch_options)
    return fetched, _load_fetched(target, fetched)


def cached_name_target(name: str, root: Path | None = None) -> Target | None:
    """The cache slot ``weights/NAME.pt`` of a name no manifest lists, when the file is
    there and its record holds the sha256 it was verified against; else None.

    Such a file was fetched with a manifest that is not given now (``fetch-weights
    --manifest site.toml NAME`` on a login node, then ``--weights NAME`` in a job): its
    record vouches for it as the manifest did, so the name still means it.
    """
    bare = _cached_name_slot(name, cache_root() if root is None else root)
    if bare is None:
        return None
    path, root = bare.path, bare.root
    record = bare.read_record() or {}
    if bare.expected_hash()[0] is None or _other_owner(bare) is not None:
        return None
    url, size = record.get("url"), record.get("size")
    return Target(
        label=bare.label,
        urls=(url,) if isinstance(url, str) and is_url(url) else (),
        sha256="",  # expected_hash() takes the record's
        hash_source=HASH_FROM_MANIFEST,
        size=size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else 0,
        path=path,
        root=root,
    )


def _cached_name_slot(name: str, root: Path) -> Target | None:
    """The cache slot ``weights/NAME.pt`` of a name, without a hash of its own (its
    record's is taken), when ``name`` is a valid name and the file is there; else None."""
    path = root / "weights" / f"{name}.pt"
    if not (NAME_PATTERN.match(name) and path.is_file()):
        return None
    return Target(label=f"weights {name!r}", urls=(), sha256="", hash_source=HASH_FROM_MANIFEST, size=0, path=path, root=root)


def _other_owner(target: Target) -> int | None:
    """The uid of another user who owns ``target``'s file or its record, else None.

    A record vouches for a file only as far as its writer is trusted: in a cache the
    group can write, anyone could put a file and a matching record under a name no
    manifest lists. Files of this user or of root (an administrator) are trusted; on
    systems without uids (Windows) every file is.
    """
    if not hasattr(os, "geteuid"):
        return None
    for path in (target.path, target.record_path):
        try:
            owner = path.stat().st_uid
        except OSError:
            continue
        if owner not in (os.geteuid(), 0):
            return owner
    return None


def cached_name_targets(manifest: Manifest, root: Path | None = None) -> list[tuple[str, Target]]:
    """(name, target) of each verified-on-fetch file in ``weights/`` that ``manifest`` does not list."""
    root = cache_root() if root is None else root
    found = []
    for path in sorted((root / "weights").glob("*.pt")):
        name = path.name[: -len(".pt")]
        target = None if name in manifest.entries else cached_name_target(name, root)
        if target is not None:
            found.append((name, target))
    return found


def _unknown_name(name: str, manifest: Manifest, root: Path) -> WeightsError:
    """The error for a name neither the manifest nor a cache record knows."""
    unknown = manifest.unknown(name)
    slot = _cached_name_slot(name, root)
    if slot is None:
        return unknown
    orphan = slot.path
    owner = _other_owner(slot)
    if owner is not None and slot.expected_hash()[0] is not None:
        return WeightsError(
            f"{unknown}; {orphan} is in the cache under that name, but it or its record belongs to another user (uid {owner}), so the record vouches for nothing",
            hint=f"give the manifest it was fetched with (GVSL_MANIFEST=FILE: its sha256 is then checked), or its path {orphan} to load it as a plain file",
        )
    return WeightsError(
        f"{unknown}; {orphan} is in the cache but has no record of the sha256 it was verified against",
        hint=f"give the manifest you fetched it with (GVSL_MANIFEST=FILE), or its path {orphan} to load it as a plain file",
    )


def open_name(name: str, manifest: Manifest, *, root: Path | None = None, reporter: Reporter = Reporter(), **fetch_options) -> tuple[Fetched, "LoadedWeights"]:
    """Fetch and load the weights called ``name``: a manifest entry (``open_entry``), else a
    file in the cache that was verified when fetched under that name (``cached_name_target``:
    verified against its record, never downloaded, nothing written).

    Raises:
        WeightsError: unknown name (the message says so when the cache holds a file of
            that name without a record), or see ``fetch``.
        CheckpointError: see ``open_entry``.
    """
    if name in manifest.entries:
        return open_entry(manifest.get(name), root=root, reporter=reporter, **fetch_options)
    target = cached_name_target(name, root)
    if target is None:
        raise _unknown_name(name, manifest, cache_root() if root is None else root)
    if fetch_options.get("force"):
        raise WeightsError(
            f"{target.label}: no manifest lists it, so gvsl cannot download it again (--force); the cached {target.path} stays",
            hint="give the manifest you fetched it with (--manifest FILE or GVSL_MANIFEST=FILE)",
        )
    reporter.notice(f"{target.label}: no manifest lists it; using the cached file, which matches the sha256 in its record {target.record_path}")
    fetched = _use_read_only(target, why="unlisted")
    loaded = _load_fetched(target, fetched)
    loaded.extra["weights_name"] = name
    return fetched, loaded


def _looks_like_path(spec: str) -> bool:
    return "/" in spec or os.sep in spec or spec.startswith(("~", ".")) or spec.lower().endswith((".pt", ".pth", ".ckpt", ".tar"))


#: What a run folder given as weights stands for, first found: the final weights of
#: gvsl pretrain, the best model of gvsl finetune, the latest checkpoint of either.
RUN_FOLDER_WEIGHTS = ("model.pt", "best.pt", "last.pt")


def load_weights_spec(
    spec: str,
    *,
    manifest: Manifest | str | os.PathLike | None = None,
    trust_unverified: bool | None = None,
    offline: bool | None = None,
    force: bool = False,
    reporter: Reporter | None = None,
    options: DownloadOptions = DownloadOptions(),
) -> "LoadedWeights":
    """Load the weights named by ``spec``: an http(s) URL, a file path, or a manifest name.

    A URL or name is fetched into the cache when needed (``fetch``: verified, locked,
    resumable) and its cached copy is re-hashed before loading. A manifest entry's file must
    also have the entry's format and width. ``extra`` of the result gains ``weights_spec``
    and, for cached files, ``weights_sha256`` (and ``weights_name`` for manifest entries).
    Order: a URL, then a run folder (``RUN_FOLDER_WEIGHTS``), then an existing file, then a
    manifest name.

    Args:
        spec: what the user gave to ``--weights``.
        manifest: a loaded Manifest, or the path of a user manifest (default:
            ``$GVSL_MANIFEST``); the built-in manifest is always included.
        trust_unverified: accept and pin a file with no known sha256 (default:
            ``$GVSL_TRUST_UNVERIFIED``).
        offline: never open a connection (default: ``$GVSL_OFFLINE``).
        force: download again even if cached.
        reporter: progress and notices (default: a progress bar and messages on stderr).
        options: timeouts and retries.

    Raises:
        WeightsError: unknown name, no such file, offline and not cached, untrusted file
            without a hash, download or verification failure.
        CheckpointError: the file is not a loadable checkpoint, or not what the manifest says.
    """
    from gvsl_cli.checkpoint import load_weights

    fetch_options = dict(
        force=force,
        trust_unverified=_flag(trust_unverified, TRUST_ENV),
        offline=_flag(offline, OFFLINE_ENV),
        reporter=ConsoleReporter() if reporter is None else reporter,
        options=options,
    )
    if is_url(spec):
        _, loaded = open_url(spec, **fetch_options)
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            # A run folder means its weights: a pretrain run's model.pt (its final weights),
            # a finetune run's best.pt, else the latest checkpoint of an unfinished run.
            found = next((path / name for name in RUN_FOLDER_WEIGHTS if (path / name).is_file()), None)
            if found is None:
                raise WeightsError(f"{spec}: is a folder without {', '.join(RUN_FOLDER_WEIGHTS)}, not a run folder or a weights file", hint="give a gvsl run folder, the path of a gvsl checkpoint or an official GVSL .pth file, a manifest name or a URL")
            path = found
        if path.is_file():
            loaded = load_weights(path)
        elif _looks_like_path(spec):
            raise WeightsError(f"weights {spec!r}: no such file", hint="give the path of a gvsl checkpoint or an official GVSL .pth file, a manifest name or a URL")
        else:
            known = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
            _, loaded = open_name(spec, known, **fetch_options)
    loaded.extra["weights_spec"] = spec
    return loaded
