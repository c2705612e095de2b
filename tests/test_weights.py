"""Weights: download, resume, verify, Drive confirmation, locking, offline mode, hash policy.

Every test talks to a real HTTP server on 127.0.0.1 (tests/weights_server.py); none touches
the internet. The files served are real small gvsl checkpoints, so loading is end to end.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gvsl_cli.download import DownloadOptions, Reporter, drive_confirmation_url
from gvsl_cli.errors import CheckpointError, WeightsError
from gvsl_cli.weights import cache_root, load_weights_spec, url_target
from weights_server import Route, manifest_toml
from weights_server import cache_home, checkpoint_bytes, server  # noqa: F401, F811 - pytest fixtures used by name

FAST = DownloadOptions(connect_timeout=2.0, read_timeout=2.0, retries=2, backoff=0.01, lock_timeout=60.0)


class Recorder(Reporter):
    """Keeps notices and the progress totals it was given."""

    def __init__(self) -> None:
        self.notices: list[str] = []
        self.starts: list[tuple[int | None, int]] = []

    def notice(self, message: str, *, warning: bool = False) -> None:
        self.notices.append(message)

    def start(self, description: str, total: int | None, done: int) -> None:
        self.starts.append((total, done))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def add_entry(tmp_path: Path, server, body: bytes, *, name: str = "tiny", known_hash: bool = True, route: Route | None = None, **fields) -> Path:
    """Serve ``body`` at /NAME.pt and write a manifest with one entry for it; returns the manifest."""
    server.routes[f"/{name}.pt"] = route or Route(body=body)
    server.routes[f"/{name}.pt"].body = body
    entry = {
        "name": name,
        "urls": [server.url(f"/{name}.pt")],
        "sha256": sha(body) if known_hash else "",
        "size": len(body) if known_hash else 0,
        "format": "gvsl",
        "width": 8,
        "modality": "mr",
        "licence": "CC0-1.0",
        **fields,
    }
    path = tmp_path / "manifest.toml"
    previous = path.read_text() + "\n" if path.exists() else ""
    path.write_text(previous + manifest_toml([entry]))
    return path


def cache_files(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file())


def test_download_verifies_loads_and_then_uses_the_cache(tmp_path, server, cache_home, checkpoint_bytes):
    body = checkpoint_bytes["gvsl"]
    manifest = add_entry(tmp_path, server, body)
    recorder = Recorder()
    loaded = load_weights_spec("tiny", manifest=manifest, reporter=recorder, options=FAST)
    assert loaded.kind == "gvsl" and loaded.model_config.width == 8 and loaded.preprocess.spacing == 2.0
    assert loaded.extra["weights_name"] == "tiny" and loaded.extra["weights_sha256"] == sha(body)
    assert (cache_home / "weights" / "tiny.pt").read_bytes() == body
    record = json.loads((cache_home / "weights" / "tiny.pt.json").read_text())
    assert record["sha256"] == sha(body) and record["hash_source"] == "manifest" and record["size"] == len(body)
    assert recorder.starts == [(len(body), 0)]  # a progress bar with the right total
    assert not any(name.endswith(".part") for name in cache_files(cache_home))
    load_weights_spec("tiny", manifest=manifest, reporter=recorder, options=FAST)
    assert len(server.seen) == 1  # the second load came from the cache


def test_resume_after_the_connection_drops(tmp_path, server, cache_home, checkpoint_bytes):
    body = checkpoint_bytes["gvsl"]
    manifest = add_entry(tmp_path, server, body, route=Route(drop_after=3_000_000, drops=1))
    loaded = load_weights_spec("tiny", manifest=manifest, reporter=Reporter(), options=FAST)
    assert loaded.kind == "gvsl"
    first, second = server.seen
    assert first.range is None
    start = int(second.range.removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= 3_000_000  # only the missing bytes were asked for...
    assert second.headers.get("If-Range") == '"v1"'  # ...and only if the file is unchanged
    assert (cache_home / "weights" / "tiny.pt").read_bytes() == body


def test_a_connection_that_drops_every_few_hundred_kilobytes_still_completes(tmp_path, server, cache_home, checkpoint_bytes):
    body = checkpoint_bytes["gvsl"]
    manifest = add_entry(tmp_path, server, body, route=Route(drop_after=300_000, drops=1000))
    loaded = load_weights_spec("tiny", manifest=manifest, reporter=Reporter(), options=FAST)
    assert loaded.kind == "gvsl" and (cache_home / "weights" / "tiny.pt").read_bytes() == body
    starts = [int(seen.range.removeprefix("bytes=").rstrip("-")) for seen in server.seen[1:]]
    assert starts == sorted(set(starts)) and len(starts) >= len(body) // 300_000  # progress every time


def test_server_ignoring_range_restarts_cleanly(tmp_path, server, cache_home, checkpoint_bytes):
    body = checkpoint_bytes["gvsl"]
    manifest = add_entry(tmp_path, server, body, route=Route(drop_after=3_000_000, drops=1, ranges=False))
    load_weights_spec("tiny", manifest=manifest, reporter=Reporter(), options=FAST)
    assert server.seen[1].range is not None  # asked to resume, got the whole file instead
    assert (cache_home / "weights" / "tiny.pt").read_bytes() == body


def test_interrupted_run_resumes_in_the_next_run(tmp_path, server, cache_home, checkpoint_bytes):
    body = checkpoint_bytes["gvsl"]
    manifest = add_entry(tmp_path, server, body, route=Route(drop_after=3_000_000, drops=1))
    no_retry = DownloadOptions(read_timeout=2.0, retries=0, backoff=0.01)
    with pytest.raises(WeightsError, match="connection broke"):
        load_weights_spec("tiny", manifest=manifest, reporter=Reporter(), options=no_retry)
    assert (cache_home / "weights" / ".tiny.pt.part").is_file()
    assert not (cache_home / "weights" / "tiny.pt").exists()
    load_weights_spec("tiny", manifest=manifest, reporter=Reporter(), options=no_retry)
    assert server.seen[1].range.startswith("bytes=") and server.seen[1].range != "bytes=0-"
    assert (cache_home / "weights" / "tiny.pt").read_bytes() == body


def test_corrupted_download_is_deleted_and_reported(tmp_path, server, cache_home, checkpoint_bytes):
    body = checkpoint_bytes["gvsl"]
    manifest = add_entry(tmp_path, server, body, route=Route(corrupt=True))
    with pytest.raises(WeightsError, match=rf"sha256 mismatch: expected {sha(body)}.*deleted"):
        load_weights_spec("tiny", manifest=manifest, reporter=Reporter(), options=FAST)
    assert [f for f in cache_files(cache_home) if not f.endswith(".lock")] == []


def test_wrong_size_announced_by_server_is_refused_before_download(tmp_path, server, cache_home, checkpoint_bytes):
    body = checkpoint_bytes["gvsl"]
    manifest = add_entry(tmp_path, server, body, size=len(body) + 1)
    with pytest.raises(WeightsError, match=f"size mismatch: the server offers {len(body)} bytes, expected {len(body) + 1}"):
        load_weights_spec("tiny", manifest=manifest, reporter=Reporter(), options=FAST)
    assert [f for f in cache_files(cache_home) if not f.endswith(".lock")] == []


def test_404_is_a_clear_error_without_retries(tmp_path, server, cache_home, checkpoint_bytes):
    manifest = add_entry(tmp_path, server, checkpoint_bytes["gvsl"], route=Route(status=404))
    with pytest.raises(WeightsError, match=r"weights 'tiny': download failed: http://127\.0\.0\.1:\d+/tiny\.pt: HTTP 404"):
        load_weights_spec("tiny", manifest=manifest, reporter=Reporter(), options=FAST)
    assert len(server.seen) == 1


def test_second_mirror_is_used_when_the_first_fails(tmp_path, server, cache_home, checkpoint_bytes):
    body = checkpoint_bytes["gvsl"]
    server.routes["/good.pt"] = Route(body=body)
    manifest = add_entry(tmp_path, server, body, route=Route(status=404), urls=[server.url("/tiny.pt"), server.url("/good.pt")])
    assert load_weights_spec("tiny", manifest=manifest, reporter=Reporter(), options=FAST).kind == "gvsl"
    assert [s.path for s in server.seen] == ["/tiny.pt", "/good.pt"]


def test_busy_server_is_retried_with_backoff(tmp_path, server, cache_home, checkpoint_bytes):
    body = checkpoint_bytes["gvsl"]
    manifest = add_entry(tmp_path, server, body, route=Route(busy=2))
    recorder = Recorder()
    load_weights_spec("tiny", manifest=manifest, reporter=recorder, options=FAST)
    assert len(server.seen) == 3
    assert sum("HTTP 503" in n and "retrying in" in n for n in recorder.notices) == 2


def test_timeout_is_a_clear_error(tmp_path, server, cache_home, checkpoint_bytes):
    manifest = add_entry(tmp_path, server, checkpoint_bytes["gvsl"], route=Route(hang=3.0))
    options = DownloadOptions(connect_timeout=1.0, read_timeout=0.3, retries=1, backoff=0.01)
    start = time.monotonic()
    with pytest.raises(WeightsError, match=r"timed out: no data for 0\.3 s"):
        load_weights_spec("tiny", manifest=manifest, reporter=Reporter(), options=options)
    assert time.monotonic() - start < 2.5
    assert len(server.seen) == 2  # the first try and one retry


@pytest.mark.parametrize("style", ["form", "cookie"])
def test_google_drive_confirmation_page(style, tmp_path, server, cache_home, checkpoint_bytes):
    body = checkpoint_bytes["gvsl"]
    server.routes["/uc"] = Route(body=body, drive=style)
    manifest = add_entry(tmp_path, server, body, urls=[server.url("/uc?export=download&id=FILEID")])
    loaded = load_weights_spec("tiny", manifest=manifest, reporter=Reporter(), options=FAST)
    assert loaded.kind == "gvsl"
    page, confirmed = server.requests_to("/uc")
    assert "confirm" not in page.path and "id=FILEID" in confirmed.path
    assert ("uuid=" in confirmed.path) == (style == "form")


@pytest.mark.parametrize("changed", [False, True], ids=["same-file", "file-changed"])
def test_google_drive_download_resumes_in_the_next_run(changed, tmp_path, server, cache_home, checkpoint_bytes):
    """Drive puts a new uuid in every warning page, so the .part must belong to the manifest's
    URL; If-Range keeps a file that changed meanwhile from being spliced."""
    from urllib.parse import parse_qs, urlsplit

    old, new = checkpoint_bytes["gvsl"], checkpoint_bytes["gvsl-v2"] if changed else checkpoint_bytes["gvsl"]
    server.routes["/uc"] = Route(body=old, drive="form", drop_after=3_000_000, drops=1)
    mirror = server.url("/uc?export=download&id=FILEID")
    manifest = add_entry(tmp_path, server, new, urls=[mirror])
    no_retry = DownloadOptions(read_timeout=2.0, retries=0, backoff=0.01)
    with pytest.raises(WeightsError, match="connection broke"):  # a run killed mid-file, as far as the cache knows
        load_weights_spec("tiny", manifest=manifest, reporter=Reporter(), options=no_retry)
    kept = (cache_home / "weights" / ".tiny.pt.part").stat().st_size
    assert 0 < kept <= 3_000_000
    if changed:
        server.routes["/uc"].body, server.routes["/uc"].etag = new, '"v2"'
    load_weights_spec("tiny", manifest=manifest, reporter=Reporter(), options=no_retry)
    page1, file1, page2, file2 = server.requests_to("/uc")
    uuids = [parse_qs(urlsplit(seen.path).query)["uuid"][0] for seen in (file1, file2)]
    assert uuids[0] != uuids[1]  # a new confirmation URL in the second run...
    assert file2.range == f"bytes={kept}-" and file2.headers.get("If-Range") == '"v1"'  # ...yet it resumed
    assert (cache_home / "weights" / "tiny.pt").read_bytes() == new  # whole, not spliced, when the file changed
    assert json.loads((cache_home / "weights" / "tiny.pt.json").read_text())["url"] == mirror


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL")
def test_a_killed_google_drive_download_resumes_in_the_next_run(tmp_path, server, cache_home, checkpoint_bytes):
    """The SLURM case: the process is killed (-9) mid-file; the next run asks Drive again,
    gets a new uuid, and still resumes the .part with a Range request."""
    import signal

    body = checkpoint_bytes["gvsl"]
    server.routes["/uc"] = Route(body=body, drive="form", seconds=20.0)  # slow enough to be killed mid-file
    manifest = add_entry(tmp_path, server, body, urls=[server.url("/uc?export=download&id=FILEID")])
    part = cache_home / "weights" / ".tiny.pt.part"
    command = [sys.executable, "-m", "gvsl_cli", "fetch-weights", "-q", "--manifest", str(manifest), "tiny"]
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while not (part.is_file() and part.stat().st_size > 0) and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.05)
        job.send_signal(signal.SIGKILL)
    finally:
        job.wait(timeout=30)
    kept = part.stat().st_size
    assert 0 < kept < len(body)
    server.routes["/uc"].seconds = 0.0
    load_weights_spec("tiny", manifest=manifest, reporter=Reporter(), options=FAST)
    resumed = server.requests_to("/uc")[-1]
    assert "uuid=" in resumed.path and resumed.range == f"bytes={kept}-"
    assert (cache_home / "weights" / "tiny.pt").read_bytes() == body


def test_without_a_validator_or_a_hash_a_partial_file_is_not_resumed(server, cache_home, checkpoint_bytes):
    """Trusting an unverified file pins whatever arrives: bytes of two versions spliced
    together would be pinned, so without If-Range the download starts over."""
    body = checkpoint_bytes["gvsl"]
    server.routes["/nv.pt"] = Route(body=body, etag="", drop_after=3_000_000, drops=1)
    no_retry = DownloadOptions(read_timeout=2.0, retries=0, backoff=0.01)
    with pytest.raises(WeightsError, match="connection broke"):
        load_weights_spec(server.url("/nv.pt"), trust_unverified=True, reporter=Reporter(), options=no_retry)
    load_weights_spec(server.url("/nv.pt"), trust_unverified=True, reporter=Reporter(), options=no_retry)
    assert [seen.range for seen in server.seen] == [None, None]
    assert url_target(server.url("/nv.pt")).path.read_bytes() == body


def test_google_drive_quota_page_is_explained(tmp_path, server, cache_home, checkpoint_bytes):
    body = checkpoint_bytes["gvsl"]
    server.routes["/uc"] = Route(body=body, drive="quota")
    manifest = add_entry(tmp_path, server, body, urls=[server.url("/uc?export=download&id=FILEID")])
    with pytest.raises(WeightsError, match="download quota exceeded"):
        load_weights_spec("tiny", manifest=manifest, reporter=Reporter(), options=FAST)


def test_drive_confirmation_url_forms():
    page = '<a id="uc-download-link" href="/uc?export=download&amp;confirm=AbCd&amp;id=X">Download anyway</a>'
    assert drive_confirmation_url("https://drive.google.com/uc?export=download&id=X", page, {}) == "https://drive.google.com/uc?export=download&confirm=AbCd&id=X"
    assert drive_confirmation_url("https://drive.google.com/uc?id=X", "<p>nothing</p>", {}) is None


def test_offline_never_connects_and_names_the_missing_entry(tmp_path, server, cache_home, checkpoint_bytes, monkeypatch):
    import requests

    body = checkpoint_bytes["gvsl"]
    manifest = add_entry(tmp_path, server, body)
    with monkeypatch.context() as offline:
        offline.setenv("GVSL_OFFLINE", "1")
        offline.setattr(requests, "Session", lambda: pytest.fail("a session was opened while offline"))
        with pytest.raises(WeightsError, match=r"weights 'tiny' is not in the cache .*GVSL_OFFLINE=1"):
            load_weights_spec("tiny", manifest=manifest, reporter=Reporter(), options=FAST)
    assert server.seen == []
    load_weights_spec("tiny", manifest=manifest, reporter=Reporter(), options=FAST)  # online: fetched once
    monkeypatch.setenv("GVSL_OFFLINE", "1")
    assert load_weights_spec("tiny", manifest=manifest, reporter=Reporter(), options=FAST).kind == "gvsl"
    assert len(server.seen) == 1


def test_unknown_hash_is_refused_then_trusted_pinned_and_enforced(tmp_path, server, cache_home, checkpoint_bytes):
    body, changed = checkpoint_bytes["gvsl"], checkpoint_bytes["gvsl-v2"]
    manifest = add_entry(tmp_path, server, body, known_hash=False)
    with pytest.raises(WeightsError, match="no sha256 is known") as refused:
        load_weights_spec("tiny", manifest=manifest, reporter=Reporter(), options=FAST)
    assert "`gvsl fetch-weights tiny --trust-unverified`" in refused.value.hint and server.seen == []

    recorder = Recorder()
    load_weights_spec("tiny", manifest=manifest, trust_unverified=True, reporter=recorder, options=FAST)
    assert any(f"pinned sha256 {sha(body)}" in n for n in recorder.notices)
    record = json.loads((cache_home / "weights" / "tiny.pt.json").read_text())
    assert record["hash_source"] == "pinned" and record["sha256"] == sha(body)

    # Later loads need no trust: the pin vouches for the file.
    assert load_weights_spec("tiny", manifest=manifest, reporter=Reporter(), options=FAST).extra["weights_sha256"] == sha(body)

    # The publisher's file changes: a forced download no longer matches the pin...
    server.routes["/tiny.pt"].body = changed
    with pytest.raises(WeightsError, match=f"sha256 mismatch: expected {sha(body)}"):
        load_weights_spec("tiny", manifest=manifest, force=True, reporter=Reporter(), options=FAST)
    assert (cache_home / "weights" / "tiny.pt").read_bytes() == body  # the good file stays
    # ...unless the user trusts the new one, which replaces the pin.
    load_weights_spec("tiny", manifest=manifest, force=True, trust_unverified=True, reporter=Reporter(), options=FAST)
    assert json.loads((cache_home / "weights" / "tiny.pt.json").read_text())["sha256"] == sha(changed)


def test_trust_can_come_from_the_environment(tmp_path, server, cache_home, checkpoint_bytes, monkeypatch):
    manifest = add_entry(tmp_path, server, checkpoint_bytes["gvsl"], known_hash=False)
    monkeypatch.setenv("GVSL_TRUST_UNVERIFIED", "1")
    assert load_weights_spec("tiny", manifest=manifest, reporter=Reporter(), options=FAST).kind == "gvsl"


def test_damaged_cache_file_is_detected_deleted_and_fetched_again(tmp_path, server, cache_home, checkpoint_bytes, monkeypatch):
    body = checkpoint_bytes["gvsl"]
    manifest = add_entry(tmp_path, server, body)
    load_weights_spec("tiny", manifest=manifest, reporter=Reporter(), options=FAST)
    cached = cache_home / "weights" / "tiny.pt"
    cached.write_bytes(body[:-10] + b"0123456789")
    # Offline, the damage is reported and the file left alone (an offline look-up writes nothing).
    monkeypatch.setenv("GVSL_OFFLINE", "1")
    with pytest.raises(WeightsError, match="does not match its sha256"):
        load_weights_spec("tiny", manifest=manifest, reporter=Reporter(), options=FAST)
    assert cached.exists()
    # Online, it is deleted (and said so) and fetched again.
    monkeypatch.delenv("GVSL_OFFLINE")
    recorder = Recorder()
    load_weights_spec("tiny", manifest=manifest, reporter=recorder, options=FAST)
    assert "does not match its sha256" in recorder.notices[0] and "deleted it" in recorder.notices[0]
    assert cached.read_bytes() == body and len(server.seen) == 2


def test_file_must_have_the_manifest_format_and_width(tmp_path, server, cache_home, checkpoint_bytes):
    manifest = add_entry(tmp_path, server, checkpoint_bytes["gvsl"], format="official")
    with pytest.raises(CheckpointError, match=r"says weights 'tiny' are a 'official' file, but it is a 'gvsl' one"):
        load_weights_spec("tiny", manifest=manifest, reporter=Reporter(), options=FAST)
    manifest.unlink()
    manifest = add_entry(tmp_path, server, checkpoint_bytes["official"], name="official8", format="official", width=32)
    with pytest.raises(CheckpointError, match=r"official8.pt: manifest .* says weights 'official8' have width 32, but the file has width 8"):
        load_weights_spec("official8", manifest=manifest, reporter=Reporter(), options=FAST)


def test_official_state_dict_served_and_loaded(tmp_path, server, cache_home, checkpoint_bytes):
    manifest = add_entry(tmp_path, server, checkpoint_bytes["official"], name="official8", format="official", width=8)
    loaded = load_weights_spec("official8", manifest=manifest, reporter=Reporter(), options=FAST)
    assert loaded.kind == "official" and loaded.affine_trained is False
    loaded.build_model()  # strict load


def test_pinned_file_that_is_not_the_entry_is_removed_with_its_pin(tmp_path, server, cache_home, checkpoint_bytes):
    manifest = add_entry(tmp_path, server, checkpoint_bytes["official"], known_hash=False)  # entry says gvsl
    with pytest.raises(CheckpointError):
        load_weights_spec("tiny", manifest=manifest, trust_unverified=True, reporter=Reporter(), options=FAST)
    assert [f for f in cache_files(cache_home) if not f.endswith(".lock")] == []


def test_url_spec_needs_a_hash_or_trust_and_is_cached_by_url(server, cache_home, checkpoint_bytes):
    body = checkpoint_bytes["gvsl"]
    server.routes["/files/model.pt"] = Route(body=body)
    url = server.url("/files/model.pt")
    with pytest.raises(WeightsError, match="no sha256 is known") as refused:
        load_weights_spec(url, reporter=Reporter(), options=FAST)
    assert "#sha256=" in refused.value.hint
    loaded = load_weights_spec(f"{url}#sha256={sha(body)}", reporter=Reporter(), options=FAST)
    assert loaded.kind == "gvsl" and loaded.extra["weights_sha256"] == sha(body)
    cached = url_target(url).path
    assert cached.parent.parent == cache_home / "urls" and cached.name == "model.pt" and cached.read_bytes() == body
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        load_weights_spec(f"{url}#sha256={'0' * 64}", reporter=Reporter(), options=FAST)


def test_proxy_from_the_environment_is_used(server, cache_home, checkpoint_bytes, monkeypatch):
    body = checkpoint_bytes["gvsl"]
    server.routes["/w.pt"] = Route(body=body)
    monkeypatch.setenv("HTTP_PROXY", server.url(""))
    monkeypatch.setenv("NO_PROXY", "")
    monkeypatch.setenv("no_proxy", "")
    # .invalid never resolves: the file can only arrive through the proxy.
    loaded = load_weights_spec(f"http://weights.invalid/w.pt#sha256={sha(body)}", reporter=Reporter(), options=FAST)
    assert loaded.kind == "gvsl" and server.seen[0].proxied


def test_paths_and_unknown_names(tmp_path, cache_home, checkpoint_bytes):
    path = tmp_path / "local.pt"
    path.write_bytes(checkpoint_bytes["gvsl"])
    assert load_weights_spec(str(path)).kind == "gvsl"
    with pytest.raises(WeightsError, match="no such file"):
        load_weights_spec(str(tmp_path / "missing.pt"))
    with pytest.raises(WeightsError, match=r"no weights named 'nope' .*known: gvsl-official-cardiac-ct"):
        load_weights_spec("nope")


def test_cache_root_follows_gvsl_home(cache_home, monkeypatch):
    assert cache_root() == cache_home
    monkeypatch.delenv("GVSL_HOME")
    assert cache_root().name == "gvsl"


def test_two_processes_download_once_and_both_succeed(tmp_path, server, cache_home, checkpoint_bytes):
    body = checkpoint_bytes["gvsl"]
    manifest = add_entry(tmp_path, server, body, route=Route(seconds=3.0))  # slow: the runs overlap
    command = [sys.executable, "-m", "gvsl_cli", "fetch-weights", "--manifest", str(manifest), "tiny"]
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}  # rich draws the progress bar with box characters
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, encoding="utf-8", errors="replace") for _ in range(2)]
    outputs = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert len(server.requests_to("/tiny.pt")) == 1  # one download
    states = sorted(out.split("\t")[4].split()[0] for out, _ in outputs)
    assert states == ["cached", "downloaded"]
    assert any("another process is downloading it" in err for _, err in outputs)
    assert (cache_home / "weights" / "tiny.pt").read_bytes() == body


def test_read_only_cache_is_verified_without_locking(tmp_path, server, cache_home, checkpoint_bytes, monkeypatch):
    import gvsl_cli.weights as weights

    body = checkpoint_bytes["gvsl"]
    manifest = add_entry(tmp_path, server, body)
    load_weights_spec("tiny", manifest=manifest, reporter=Reporter(), options=FAST)
    (cache_home / "weights" / "tiny.pt.lock").unlink()
    monkeypatch.setattr(weights.os, "access", lambda path, mode: False)  # as if a shared, read-only cache
    assert load_weights_spec("tiny", manifest=manifest, reporter=Reporter(), options=FAST).kind == "gvsl"
    assert not (cache_home / "weights" / "tiny.pt.lock").exists()
    (cache_home / "weights" / "tiny.pt").write_bytes(body[:-1] + b"!")
    with pytest.raises(WeightsError, match="does not match its sha256 .* and the cache is read-only"):
        load_weights_spec("tiny", manifest=manifest, reporter=Reporter(), options=FAST)
    assert len(server.seen) == 1
    # --verify of a read-only cache: re-hashed without a lock, the damaged file kept.
    from gvsl_cli.manifest import load_manifest

    target = weights.entry_target(load_manifest(manifest).get("tiny"))
    assert weights.verify(target).status == "mismatch"
    assert target.path.exists() and not target.lock_path.exists()
    target.path.write_bytes(body)
    assert weights.verify(target).status == "ok" and not target.lock_path.exists()


def test_offline_look_up_writes_nothing_into_the_cache(tmp_path, server, cache_home, checkpoint_bytes, monkeypatch):
    body = checkpoint_bytes["gvsl"]
    manifest = add_entry(tmp_path, server, body)
    monkeypatch.setenv("GVSL_OFFLINE", "1")
    # Not cached: refused without a lock file or a folder (a read-only cache would fail on those).
    with pytest.raises(WeightsError, match="not in the cache"):
        load_weights_spec("tiny", manifest=manifest, reporter=Reporter(), options=FAST)
    with pytest.raises(WeightsError, match="not in the cache") as refused:
        load_weights_spec(server.url("/tiny.pt") + f"#sha256={sha(body)}", reporter=Reporter(), options=FAST)
    assert refused.value.hint.endswith(f"copy the cache folder {cache_home}, or unset GVSL_OFFLINE")  # the root, also for URLs
    assert cache_files(cache_home) == [] and not any(cache_home.rglob("*"))
    # Cached: verified and used; a damaged copy is reported, not deleted, and no lock appears.
    monkeypatch.delenv("GVSL_OFFLINE")
    load_weights_spec("tiny", manifest=manifest, reporter=Reporter(), options=FAST)
    (cache_home / "weights" / "tiny.pt.lock").unlink()
    monkeypatch.setenv("GVSL_OFFLINE", "1")
    assert load_weights_spec("tiny", manifest=manifest, reporter=Reporter(), options=FAST).kind == "gvsl"
    (cache_home / "weights" / "tiny.pt").write_bytes(body[:-1] + b"!")
    with pytest.raises(WeightsError, match="does not match its sha256 .*GVSL_OFFLINE=1 forbids downloading it again"):
        load_weights_spec("tiny", manifest=manifest, reporter=Reporter(), options=FAST)
    assert cache_files(cache_home) == ["weights/tiny.pt", "weights/tiny.pt.json"]
    assert len(server.seen) == 1


def test_a_folder_given_as_weights_is_named_as_a_folder(tmp_path, cache_home, monkeypatch):
    with pytest.raises(WeightsError, match=r"is a folder without model.pt, best.pt, last.pt, not a run folder or a weights file"):
        load_weights_spec(str(tmp_path))
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsError, match=r"data: is a folder"):  # a bare name too, not "no weights named"
        load_weights_spec("data")


def test_a_run_folder_given_as_weights_means_its_final_or_best_weights(tmp_path, cache_home):
    from gvsl_cli.checkpoint import save_checkpoint
    from gvsl_cli.config import ModelConfig, PreprocessConfig
    from gvsl_cli.model import GVSL

    run = tmp_path / "run"
    save_checkpoint(run / "last.pt", GVSL(ModelConfig(width=8)), PreprocessConfig(spacing=4.0), extra={"iteration": 5})
    assert load_weights_spec(str(run)).extra["iteration"] == 5  # an unfinished run: its latest checkpoint
    save_checkpoint(run / "model.pt", GVSL(ModelConfig(width=8)), PreprocessConfig(spacing=4.0), extra={"iteration": 10})
    loaded = load_weights_spec(str(run))
    assert loaded.extra["iteration"] == 10 and loaded.extra["weights_spec"] == str(run)  # a finished pretrain run: model.pt


def test_a_full_cache_disk_is_a_weights_error_naming_the_cache(tmp_path, server, cache_home, checkpoint_bytes, monkeypatch):
    import errno

    from gvsl_cli import download
    from gvsl_cli.errors import WeightsError as Error

    body = checkpoint_bytes["gvsl"]
    manifest = add_entry(tmp_path, server, body)

    def full(self, url, validator):  # a write() on a full disk: an OSError without a file name
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(download._Partial, "begin", full)
    with pytest.raises(Error) as refused:
        load_weights_spec("tiny", manifest=manifest, reporter=Reporter(), options=FAST)
    assert str(refused.value) == f"weights 'tiny': cannot write the weights cache ({cache_home / 'weights'}): No space left on device"
    assert refused.value.exit_code == 4 and "resumes next time" in refused.value.hint


def test_a_refused_connection_is_said_in_the_systems_words(tmp_path, cache_home, checkpoint_bytes):
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/w.pt#sha256={sha(checkpoint_bytes['gvsl'])}"
    with pytest.raises(WeightsError) as failed:
        load_weights_spec(url, reporter=Reporter(), options=DownloadOptions(connect_timeout=2.0, retries=0, backoff=0.01))
    import re

    assert re.search(r"cannot connect \(\[Errno \d+\] Connection refused\)", str(failed.value))


# --------------------------------------------------------------------------- a group-shared cache


def refuse_opening(monkeypatch, path: Path, *, writable_only: bool) -> None:
    """Make ``os.open`` of ``path`` fail with EACCES as for another user's lock file:
    opening for writing only (``writable_only``: a 0644 file of a colleague), or at all (0600).

    The tests also chmod the file; that alone is what a non-root user meets, but root
    (whom these tests may run as) bypasses file modes, hence the stand-in.
    """
    import errno

    real_open = os.open

    def fake_open(file, flags, *args, **kwargs):
        exclusive = flags & os.O_EXCL  # an existing file: EEXIST comes before any permission check
        if Path(file) == path and path.exists() and not exclusive and (not writable_only or flags & os.O_ACCMODE != os.O_RDONLY):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)


def test_lock_files_are_created_open_to_every_user_whatever_the_umask(tmp_path):
    import stat

    from gvsl_cli.download import file_lock

    previous = os.umask(0o022)  # the usual umask: without the fix the file is 0644, the first fetcher's only
    try:
        with file_lock(tmp_path / "w.pt.lock", timeout=1.0):
            pass
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "w.pt.lock").stat().st_mode) == 0o666


@pytest.mark.skipif(os.name == "nt", reason="flock semantics (POSIX)")
def test_another_users_read_only_lock_file_still_locks(tmp_path, server, cache_home, checkpoint_bytes, monkeypatch):
    """A colleague's 0644 lock file: opened read-only, and flock on that still excludes."""
    from gvsl_cli.download import file_lock
    from gvsl_cli.locking import try_lock

    body = checkpoint_bytes["gvsl"]
    manifest = add_entry(tmp_path, server, body)
    load_weights_spec("tiny", manifest=manifest, reporter=Reporter(), options=FAST)
    lock = cache_home / "weights" / "tiny.pt.lock"
    lock.chmod(0o444)
    refuse_opening(monkeypatch, lock, writable_only=True)
    with pytest.raises(PermissionError):
        os.open(lock, os.O_RDWR)  # what the old code did, and failed on
    # The verified file is used (before the fix: "cannot create the lock file ... Permission denied").
    assert load_weights_spec("tiny", manifest=manifest, reporter=Reporter(), options=FAST).extra["weights_sha256"] == sha(body)
    # The lock taken through a read-only descriptor is a real one: a holder keeps others out.
    holder = os.open(lock, os.O_RDONLY)
    try:
        assert try_lock(holder)
        with pytest.raises(WeightsError, match="another process is still downloading"):
            with file_lock(lock, timeout=0.3):
                pass
    finally:
        os.close(holder)
    # A damaged file is replaced as in a cache of one's own (delete and download: the folder is writable).
    (cache_home / "weights" / "tiny.pt").write_bytes(body[:-1] + b"!")
    load_weights_spec("tiny", manifest=manifest, reporter=Reporter(), options=FAST)
    assert (cache_home / "weights" / "tiny.pt").read_bytes() == body and len(server.seen) == 2


def test_a_lock_file_that_cannot_be_opened_leaves_the_verified_file_usable(tmp_path, server, cache_home, checkpoint_bytes, monkeypatch, capsys):
    from gvsl_cli.cli import run
    from gvsl_cli.manifest import load_manifest
    from gvsl_cli.weights import entry_target, verify

    body = checkpoint_bytes["gvsl"]
    manifest = add_entry(tmp_path, server, body)
    load_weights_spec("tiny", manifest=manifest, reporter=Reporter(), options=FAST)
    lock = cache_home / "weights" / "tiny.pt.lock"
    lock.chmod(0o600)  # another user's lock file with a strict umask: not even readable
    refuse_opening(monkeypatch, lock, writable_only=False)
    assert load_weights_spec("tiny", manifest=manifest, reporter=Reporter(), options=FAST).kind == "gvsl"
    assert run(["fetch-weights", "-q", "--manifest", str(manifest), "tiny"]) == 0
    assert "\tcached (manifest hash)" in capsys.readouterr().out
    target = entry_target(load_manifest(manifest).get("tiny"))
    assert verify(target).status == "ok"
    # Damaged: reported, not deleted (without the lock gvsl may not replace it), and the hint
    # does not tell a user whose cache folder is writable to make it writable.
    target.path.write_bytes(body[:-1] + b"!")
    with pytest.raises(WeightsError, match="does not match its sha256 .* and its lock file cannot be opened") as refused:
        load_weights_spec("tiny", manifest=manifest, reporter=Reporter(), options=FAST)
    assert f"chmod a+rw {lock}" in refused.value.hint and "make the cache" not in refused.value.hint
    assert verify(target).status == "mismatch" and target.path.exists()
    # Not cached at all: a clear error with the same hint.
    target.path.unlink()
    with pytest.raises(WeightsError, match=f"cannot open the lock file {lock} \\(Permission denied\\)") as refused:
        load_weights_spec("tiny", manifest=manifest, reporter=Reporter(), options=FAST)
    assert "make the cache" not in refused.value.hint and len(server.seen) == 1


@pytest.mark.skipif(os.name == "nt", reason="POSIX modes")
def test_cache_folders_made_in_a_group_folder_stay_writable_for_the_group(tmp_path, monkeypatch):
    import stat

    from gvsl_cli.download import file_lock

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o2775)  # a setgid group folder, as labs share them
    private = tmp_path / "private"
    previous = os.umask(0o022)
    try:
        with file_lock(shared / "urls" / "0123" / "w.pt.lock", timeout=1.0):
            pass
        with file_lock(private / "weights" / "w.pt.lock", timeout=1.0):
            pass
    finally:
        os.umask(previous)
    assert [stat.S_IMODE((shared / sub).stat().st_mode) for sub in ("urls", "urls/0123")] == [0o2775, 0o2775]
    assert stat.S_IMODE((private / "weights").stat().st_mode) == 0o755  # elsewhere: the umask, as before


def test_a_dead_proxy_is_named_with_the_systems_reason(cache_home, checkpoint_bytes, monkeypatch):
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("HTTP_PROXY", f"http://someone:s3cret@127.0.0.1:{port}")
    monkeypatch.setenv("NO_PROXY", "")
    monkeypatch.setenv("no_proxy", "")
    url = f"http://weights.invalid/w.pt#sha256={sha(checkpoint_bytes['gvsl'])}"
    with pytest.raises(WeightsError) as failed:
        load_weights_spec(url, reporter=Reporter(), options=DownloadOptions(connect_timeout=2.0, retries=0, backoff=0.01))
    message = str(failed.value)
    # Was: "proxy error (HTTPConnectionPool(host='127.0.0.1', port=…): Max retries exceeded … NewConnectionError("HTTPConnection(host='1"
    import re

    assert re.search(rf"http://weights\.invalid/w\.pt: cannot connect through the proxy http://127\.0\.0\.1:{port} \(\[Errno \d+\] Connection refused\)$", message)
    assert "s3cret" not in message  # the proxy's credentials are not printed
    assert "HTTP_PROXY" in failed.value.hint and "HTTPS_PROXY" not in failed.value.hint  # the variable of an http:// URL


def test_a_proxy_refusal_without_an_errno_is_said_in_whole():
    import requests
    import urllib3

    from gvsl_cli.download import _describe

    refused = urllib3.exceptions.ProxyError("Unable to connect to proxy", OSError("Tunnel connection failed: 407 Proxy Authentication Required"))
    wrapped = requests.exceptions.ProxyError(urllib3.exceptions.MaxRetryError(None, "/w.pt", reason=refused))
    assert _describe(wrapped, DownloadOptions()) == "cannot connect through the proxy (Tunnel connection failed: 407 Proxy Authentication Required)"
