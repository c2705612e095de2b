"""The weights manifest: the shipped one is valid, bad entries are named, user manifests merge."""

from __future__ import annotations

import pytest

from gvsl_cli.errors import WeightsError
from gvsl_cli.manifest import load_manifest, read_manifest
from gvsl_cli.resources import bundled_manifest_path
from weights_server import manifest_toml

GOOD = {
    "name": "mine",
    "urls": ["https://example.org/mine.pt"],
    "sha256": "a" * 64,
    "format": "gvsl",
    "width": 16,
    "modality": "mr",
    "licence": "CC-BY-4.0",
}


def test_shipped_manifest_holds_the_official_weights():
    manifest = read_manifest(bundled_manifest_path())
    entry = manifest.get("gvsl-official-cardiac-ct")
    assert entry.format == "official" and entry.width == 32 and entry.modality == "ct"
    assert entry.urls[0].endswith("id=12VJbif6Q9KRfVTKWeku2lgDrXl9aoLeX")
    assert entry.sha256 == "" and not entry.has_hash  # none published: the trust policy applies
    assert entry.spacing == 1.0 and "2048" in entry.intensity and "CVPR 2023" in entry.source


def test_optional_fields_default(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text(manifest_toml([GOOD]))
    entry = read_manifest(path).get("mine")
    assert entry.size == 0 and entry.spacing == 0.0 and entry.description == "" and entry.manifest == path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sha256": None}, "missing sha256"),
        ({"sha-256": "x"}, r"unknown key\(s\) sha-256"),
        ({"sha256": "abc"}, "sha256 must be 64 hex digits"),
        ({"format": "onnx"}, "format must be one of gvsl, official"),
        ({"urls": ["ftp://example.org/x"]}, "not an http\\(s\\) URL"),
        ({"urls": []}, "at least one"),
        ({"width": 12}, "positive multiple of 8"),
        ({"width": True}, "'width' must be an integer, got True"),
        ({"spacing": "1mm"}, "'spacing' must be a number, got '1mm'"),
        ({"modality": "pet"}, "modality must be one of"),
        ({"name": "../escape"}, "name must match"),
        ({"licence": " "}, "licence must say"),
        ({"size": -1}, "size must be >= 0"),
    ],
)
def test_bad_entries_are_named(tmp_path, change, message):
    entry = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    path = tmp_path / "m.toml"
    path.write_text(manifest_toml([entry]))
    with pytest.raises(WeightsError, match=message) as error:
        read_manifest(path)
    assert str(error.value).startswith(f"{path}: ")
    assert "entry" in str(error.value)


def test_duplicates_and_bad_toml(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text(manifest_toml([GOOD, GOOD]))
    with pytest.raises(WeightsError, match="entry 'mine': the name appears twice"):
        read_manifest(path)
    path.write_text("[[weights]\nname = ")
    with pytest.raises(WeightsError, match=f"{path}: not valid TOML"):
        read_manifest(path)
    with pytest.raises(WeightsError, match="no such manifest file"):
        read_manifest(tmp_path / "absent.toml")


def test_user_manifest_adds_and_overrides(tmp_path, monkeypatch):
    mirror = {**GOOD, "name": "gvsl-official-cardiac-ct", "format": "official", "width": 32, "modality": "ct", "urls": ["https://mirror.example.org/gvsl.pth"]}
    path = tmp_path / "site.toml"
    path.write_text(manifest_toml([GOOD, mirror]))
    monkeypatch.setenv("GVSL_MANIFEST", str(path))
    manifest = load_manifest()
    assert list(manifest.entries) == ["gvsl-official-cardiac-ct", "mine"]
    assert manifest.get("gvsl-official-cardiac-ct").urls == ("https://mirror.example.org/gvsl.pth",)
    assert manifest.paths == (bundled_manifest_path(), path)
    monkeypatch.delenv("GVSL_MANIFEST")
    assert list(load_manifest().entries) == ["gvsl-official-cardiac-ct"]
    assert list(load_manifest(path).entries) == ["gvsl-official-cardiac-ct", "mine"]
