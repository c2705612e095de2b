"""``gvsl fetch-weights`` through the CLI: --list, fetching, --verify, --force, trust, usage errors."""

from __future__ import annotations

import hashlib

import pytest

from gvsl_cli.cli import run
from weights_server import Route, manifest_toml
from weights_server import cache_home, checkpoint_bytes, server  # noqa: F401, F811 - pytest fixtures used by name


def write_manifest(tmp_path, server, bodies: dict[str, bytes], *, unhashed: tuple[str, ...] = ()):
    entries = []
    for name, body in bodies.items():
        server.routes[f"/{name}.pt"] = Route(body=body)
        entries.append({
            "name": name,
            "urls": [server.url(f"/{name}.pt")],
            "sha256": "" if name in unhashed else hashlib.sha256(body).hexdigest(),
            "size": 0 if name in unhashed else len(body),
            "format": "gvsl",
            "width": 8,
            "modality": "mr",
            "licence": "CC0-1.0",
        })
    path = tmp_path / "manifest.toml"
    path.write_text(manifest_toml(entries))
    return path


def table_row(output: str, name: str) -> list[str]:
    line = next(line for line in output.splitlines() if f" {name} " in line)
    return [cell.strip() for cell in line.strip("│ ").split("│")]


def test_list_fetch_verify_force(tmp_path, server, cache_home, checkpoint_bytes, capsys):
    body = checkpoint_bytes["gvsl"]
    manifest = write_manifest(tmp_path, server, {"tiny": body})
    assert run(["fetch-weights", "--list", "--manifest", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert table_row(out, "tiny") == ["tiny", "8.2 MB", "gvsl w8", "mr", "no", "manifest", "CC0-1.0"]
    assert table_row(out, "gvsl-official-cardiac-ct")[4:6] == ["no", "none"]

    assert run(["fetch-weights", "--manifest", str(manifest), "tiny"]) == 0
    name, path, digest, size, state = capsys.readouterr().out.strip().split("\t")
    assert (name, digest, size) == ("tiny", f"sha256={hashlib.sha256(body).hexdigest()}", f"{len(body)} bytes")
    assert path == str(cache_home / "weights" / "tiny.pt") and state.startswith("downloaded")

    assert run(["fetch-weights", "--list", "--manifest", str(manifest)]) == 0
    assert table_row(capsys.readouterr().out, "tiny")[4] == "yes"

    assert run(["fetch-weights", "--manifest", str(manifest), "tiny"]) == 0  # cached: no request
    assert "\tcached" in capsys.readouterr().out and len(server.seen) == 1
    assert run(["fetch-weights", "--manifest", str(manifest), "--force", "tiny"]) == 0
    assert "\tdownloaded" in capsys.readouterr().out and len(server.seen) == 2

    assert run(["fetch-weights", "--verify", "--manifest", str(manifest)]) == 0
    assert table_row(capsys.readouterr().out, "tiny")[1] == "ok"
    cached = cache_home / "weights" / "tiny.pt"
    cached.write_bytes(b"x" + body[1:])
    assert run(["fetch-weights", "--verify", "--manifest", str(manifest), "tiny"]) == 4
    captured = capsys.readouterr()
    assert table_row(captured.out, "tiny")[1] == "MISMATCH: deleted"
    assert captured.err.startswith("error: sha256 mismatch") and not cached.exists()


def test_unverified_entry_needs_trust_then_pins(tmp_path, server, cache_home, checkpoint_bytes, capsys):
    body = checkpoint_bytes["gvsl"]
    manifest = write_manifest(tmp_path, server, {"nohash": body}, unhashed=("nohash",))
    assert run(["fetch-weights", "--manifest", str(manifest), "nohash"]) == 4
    err = capsys.readouterr().err
    assert err.startswith("error: weights 'nohash': no sha256 is known") and "--trust-unverified" in err
    assert len(err.strip().splitlines()) == 1 and server.seen == []
    assert run(["fetch-weights", "--manifest", str(manifest), "--trust-unverified", "nohash"]) == 0
    captured = capsys.readouterr()
    assert f"pinned sha256 {hashlib.sha256(body).hexdigest()}" in captured.err
    assert "(pinned hash)" in captured.out
    assert run(["fetch-weights", "--list", "--manifest", str(manifest)]) == 0
    assert table_row(capsys.readouterr().out, "nohash")[4:6] == ["yes", "pinned"]


def test_all_goes_on_after_a_failure(tmp_path, server, cache_home, checkpoint_bytes, capsys, monkeypatch):
    manifest = write_manifest(tmp_path, server, {"one": checkpoint_bytes["gvsl"]})
    monkeypatch.setenv("GVSL_MANIFEST", str(manifest))
    assert run(["fetch-weights", "--all"]) == 7  # some done, some failed (conventions.md); the official entry has no hash
    captured = capsys.readouterr()
    assert captured.out.startswith("one\t")
    assert "error: gvsl-official-cardiac-ct: " in captured.err
    assert "1 of 2 weights could not be fetched: gvsl-official-cardiac-ct" in captured.err
    assert run(["fetch-weights", "-q", "nosuch", "gvsl-official-cardiac-ct"]) == 4  # none fetched: the weights error
    captured = capsys.readouterr()
    assert captured.out == "" and "2 of 2 weights could not be fetched: nosuch, gvsl-official-cardiac-ct" in captured.err


def test_offline_cli_names_the_missing_entry(tmp_path, server, cache_home, checkpoint_bytes, capsys, monkeypatch):
    manifest = write_manifest(tmp_path, server, {"tiny": checkpoint_bytes["gvsl"]})
    monkeypatch.setenv("GVSL_OFFLINE", "1")
    assert run(["fetch-weights", "--manifest", str(manifest), "tiny"]) == 4
    assert "weights 'tiny' is not in the cache" in capsys.readouterr().err and server.seen == []


def test_usage_errors(capsys, cache_home):
    assert run(["fetch-weights"]) == 2
    assert "nothing to do" in capsys.readouterr().err
    assert run(["fetch-weights", "--list", "--verify"]) == 2
    assert run(["fetch-weights", "--all", "x"]) == 2
    assert run(["fetch-weights", "--force", "--list"]) == 2
    assert run(["fetch-weights", "unknown-weights"]) == 4
    assert "no weights named 'unknown-weights'" in capsys.readouterr().err


def test_quiet_keeps_the_warning_and_the_result_line_only(tmp_path, server, cache_home, checkpoint_bytes, capsys):
    body = checkpoint_bytes["gvsl"]
    manifest = write_manifest(tmp_path, server, {"nohash": body, "tiny": body}, unhashed=("nohash",))
    assert run(["fetch-weights", "--manifest", str(manifest), "tiny"]) == 0
    assert "tiny" in capsys.readouterr().err  # the progress bar, where -q shows nothing
    assert run(["fetch-weights", "-q", "--manifest", str(manifest), "--force", "tiny"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.startswith("tiny\t")
    assert run(["fetch-weights", "--quiet", "--manifest", str(manifest), "--trust-unverified", "nohash"]) == 0
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("warning: weights 'nohash': no published sha256; trusted on your request and pinned sha256")
    assert captured.out.startswith("nohash\t")


def test_list_and_verify_as_json_lines(tmp_path, server, cache_home, checkpoint_bytes, capsys):
    import json

    body = checkpoint_bytes["gvsl"]
    manifest = write_manifest(tmp_path, server, {"tiny": body})
    assert run(["fetch-weights", "--list", "--json", "--manifest", str(manifest)]) == 0
    rows = {row["name"]: row for row in map(json.loads, capsys.readouterr().out.splitlines())}
    assert rows["tiny"] == {"name": "tiny", "bytes": len(body), "format": "gvsl", "width": 8, "modality": "mr", "cached": False,
                            "path": str(cache_home / "weights" / "tiny.pt"), "hash": "manifest", "licence": "CC0-1.0"}
    assert run(["fetch-weights", "-q", "--manifest", str(manifest), "tiny"]) == 0
    capsys.readouterr()
    assert run(["fetch-weights", "--verify", "--json", "--manifest", str(manifest)]) == 0
    (row,) = map(json.loads, capsys.readouterr().out.splitlines())
    assert row == {"name": "tiny", "status": "ok", "sha256": hashlib.sha256(body).hexdigest(), "path": str(cache_home / "weights" / "tiny.pt")}
    assert run(["fetch-weights", "--json", "--manifest", str(manifest), "tiny"]) == 2
    assert "--json applies to --list and --verify" in capsys.readouterr().err


def test_quiet_commands_download_weights_without_a_progress_bar(tmp_path, server, cache_home, checkpoint_bytes, capsys):
    from pathlib import Path

    examples = Path(__file__).resolve().parent.parent / "gvsl_cli" / "examples"
    body = checkpoint_bytes["gvsl"]
    server.routes["/w.pt"] = Route(body=body)
    url = server.url("/w.pt") + f"#sha256={hashlib.sha256(body).hexdigest()}"
    fixed, moving = examples / "icbm152_t1_2mm.nii.gz", examples / "colin27_t1_2mm.nii.gz"
    args = ["register", str(fixed), str(moving), "--weights", url, "--iters", "0", "--spacing", "6", "--device", "cpu"]
    assert run([*args, "-o", str(tmp_path / "quiet"), "-q"]) == 0
    assert capsys.readouterr().err == ""  # the download happened (first use) and said nothing
    assert len(server.seen) == 1
    (cache_home / "urls").rename(tmp_path / "moved-cache")  # download again, not quiet
    assert run([*args, "-o", str(tmp_path / "loud")]) == 0
    assert "w.pt" in capsys.readouterr().err and len(server.seen) == 2


def test_weights_fetched_with_a_manifest_stay_usable_by_name_without_it(tmp_path, server, cache_home, checkpoint_bytes, capsys, monkeypatch):
    """fetch-weights --manifest site.toml NAME on a login node, then --weights NAME in a job
    that does not give the manifest: the cache record's sha256 vouches for the file."""
    import json

    from gvsl_cli.download import Reporter
    from gvsl_cli.weights import load_weights_spec

    body = checkpoint_bytes["gvsl"]
    manifest = write_manifest(tmp_path, server, {"site8": body})
    assert run(["fetch-weights", "-q", "--manifest", str(manifest), "site8"]) == 0
    capsys.readouterr()
    monkeypatch.setenv("GVSL_OFFLINE", "1")  # the job: no network, no manifest
    loaded = load_weights_spec("site8", reporter=Reporter())
    assert loaded.kind == "gvsl" and loaded.extra["weights_name"] == "site8" and loaded.extra["weights_sha256"] == hashlib.sha256(body).hexdigest()
    assert run(["fetch-weights", "site8"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("site8\t") and "\tcached (manifest hash)" in captured.out
    assert "no manifest lists it; using the cached file, which matches the sha256 in its record" in captured.err
    assert run(["fetch-weights", "--list"]) == 0
    assert table_row(capsys.readouterr().out, "site8") == ["site8", "8.2 MB", "-", "-", "yes", "record", "(in the cache; no manifest lists it)"]
    assert run(["fetch-weights", "--list", "--json", "site8"]) == 0
    assert json.loads(capsys.readouterr().out)["hash"] == "record"
    assert run(["fetch-weights", "--verify", "--json"]) == 0
    assert [json.loads(line)["status"] for line in capsys.readouterr().out.splitlines()] == ["ok"]
    # A damaged copy is refused (it cannot be downloaded again without the manifest) and kept...
    cached = cache_home / "weights" / "site8.pt"
    cached.write_bytes(b"x" + body[1:])
    assert run(["fetch-weights", "site8"]) == 4
    err = capsys.readouterr().err
    assert "does not match its sha256" in err and "no manifest lists it, so gvsl cannot download it again" in err and cached.exists()
    # ...until --verify removes it, like any damaged cached file.
    assert run(["fetch-weights", "--verify", "site8"]) == 4
    assert not cached.exists() and "MISMATCH: deleted" in capsys.readouterr().out
    assert len(server.seen) == 1
    # A file of that name without a record: the unknown-name error says where it is.
    cached.write_bytes(body)
    (cache_home / "weights" / "site8.pt.json").unlink()
    assert run(["fetch-weights", "site8"]) == 4
    err = capsys.readouterr().err
    assert "no weights named 'site8'" in err and f"{cached} is in the cache but has no record of the sha256" in err


def test_a_record_of_another_user_vouches_for_nothing(tmp_path, server, cache_home, checkpoint_bytes, capsys, monkeypatch):
    """In a cache the group can write, anyone could plant weights/NAME.pt and a matching
    record: a name no manifest lists resolves to it only when this user (or root) wrote
    both. The tests run as root, so "this user" is played by uid 1000 and the planter by
    uid 1234 (root may chown)."""
    import os

    body = checkpoint_bytes["gvsl"]
    manifest = write_manifest(tmp_path, server, {"site8": body})
    assert run(["fetch-weights", "-q", "--manifest", str(manifest), "site8"]) == 0
    capsys.readouterr()
    cached = cache_home / "weights" / "site8.pt"
    record = cache_home / "weights" / "site8.pt.json"
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    if os.stat(cached).st_uid not in (0, 1000):
        pytest.skip("the cache files belong to neither root nor the stand-in user")
    assert run(["fetch-weights", "site8"]) == 0  # root's files: trusted
    capsys.readouterr()
    try:
        os.chown(record, 1234, -1)
    except PermissionError:
        pytest.skip("cannot give a file to another user here (not root)")
    assert run(["fetch-weights", "site8"]) == 4
    err = capsys.readouterr().err
    assert f"{cached} is in the cache under that name, but it or its record belongs to another user (uid 1234)" in err
    assert "GVSL_MANIFEST=FILE" in err
    assert run(["fetch-weights", "--list", "--json", "site8"]) == 4  # not listed as a record-backed name either
    capsys.readouterr()
    # With the manifest, its sha256 decides, whoever wrote the file.
    assert run(["fetch-weights", "--manifest", str(manifest), "site8", "-q"]) == 0


def test_fetching_a_url_loads_the_file(tmp_path, server, cache_home, checkpoint_bytes, capsys):
    server.routes["/empty.pt"] = Route(body=b"")
    server.routes["/notes.txt"] = Route(body=b"not weights\n")
    empty = server.url("/empty.pt") + f"#sha256={hashlib.sha256(b'').hexdigest()}"
    assert run(["fetch-weights", "-q", empty]) == 3  # was "downloaded", exit 0, for a file no command can use
    assert "the file is empty" in capsys.readouterr().err
    # Trusted on first use and unusable: removed with its pin, as for manifest entries.
    assert run(["fetch-weights", "-q", "--trust-unverified", server.url("/notes.txt")]) == 3
    capsys.readouterr()
    from gvsl_cli.weights import url_target

    target = url_target(server.url("/notes.txt"))
    assert not target.path.exists() and not target.record_path.exists()
    body = checkpoint_bytes["gvsl"]
    server.routes["/w8.pt"] = Route(body=body)
    assert run(["fetch-weights", "-q", server.url("/w8.pt") + f"#sha256={hashlib.sha256(body).hexdigest()}"]) == 0
    assert "\tdownloaded (url hash)" in capsys.readouterr().out


def test_verify_of_a_url_without_its_fragment_uses_the_recorded_hash(server, cache_home, checkpoint_bytes, capsys):
    import json

    body = checkpoint_bytes["gvsl"]
    server.routes["/w8.pt"] = Route(body=body)
    url = server.url("/w8.pt")
    assert run(["fetch-weights", "-q", f"{url}#sha256={hashlib.sha256(body).hexdigest()}"]) == 0
    capsys.readouterr()
    assert run(["fetch-weights", "--verify", "--json", url]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "ok"  # was "unpinned" ("no known hash")
    from gvsl_cli.weights import url_target

    cached = url_target(url).path
    cached.write_bytes(body[:100] + bytes([body[100] ^ 1]) + body[101:])
    assert run(["fetch-weights", "--verify", "--json", url]) == 4
    assert json.loads(capsys.readouterr().out)["status"] == "deleted" and not cached.exists()
