"""The weights manifest: which pretrained weights gvsl knows, where to get them, what they are.

A manifest is a TOML file with one ``[[weights]]`` table per entry (schema in
docs/weights.md). gvsl reads the one shipped in the package and, when given, a user
manifest (``--manifest FILE`` or ``GVSL_MANIFEST``) whose entries are added to the built-in
ones and replace those of the same name (so a site can point an entry at a local mirror or
pin a hash). Every error names the manifest file and the entry.
"""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, published as tomli before it entered the stdlib
    import tomli as tomllib

from gvsl_cli.errors import WeightsError
from gvsl_cli.resources import bundled_manifest_path

#: Environment variable naming a user manifest read after the built-in one.
MANIFEST_ENV = "GVSL_MANIFEST"
FORMATS = ("gvsl", "official")
MODALITIES = ("ct", "mr", "any")
#: Names become cache file names, so they stay within a portable, shell-safe alphabet.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")

_REQUIRED = ("name", "urls", "sha256", "format", "width", "modality", "licence")
_OPTIONAL: dict[str, Any] = {"description": "", "size": 0, "spacing": 0.0, "intensity": "", "source": ""}


@dataclass(frozen=True)
class WeightsEntry:
    """One downloadable set of weights.

    Attributes:
        name: what users type (``gvsl fetch-weights NAME``, ``--weights NAME``).
        urls: mirrors, tried in order (http or https).
        sha256: lower-case hex digest of the file, or "" when the publisher gives none
            (such an entry is downloaded only when the user trusts it; see docs/weights.md).
        size: file size in bytes, 0 when unknown.
        format: "gvsl" (a gvsl checkpoint) or "official" (an official GVSL state_dict).
        width: U-Net width the weights fit (32 = the paper's network).
        modality: "ct", "mr" or "any": the images the weights were trained on.
        spacing: intended voxel size in mm, 0 when unspecified.
        intensity: the intensity mapping the weights expect, in words.
        licence: the terms under which the weights may be used.
        source: citation or page the weights come from.
        description: one line for ``--list``.
        manifest: the file this entry was read from.
    """

    name: str
    urls: tuple[str, ...]
    sha256: str
    format: str
    width: int
    modality: str
    licence: str
    manifest: Path
    description: str = ""
    size: int = 0
    spacing: float = 0.0
    intensity: str = ""
    source: str = ""

    @property
    def has_hash(self) -> bool:
        """True when the manifest pins the file's sha256."""
        return bool(self.sha256)


@dataclass(frozen=True)
class Manifest:
    """Entries by name (in file order) and the files they were read from."""

    entries: dict[str, WeightsEntry]
    paths: tuple[Path, ...]

    def get(self, name: str) -> WeightsEntry:
        """The entry called ``name``; WeightsError listing the known names otherwise."""
        try:
            return self.entries[name]
        except KeyError:
            raise self.unknown(name) from None

    def unknown(self, name: str) -> WeightsError:
        """The error for a name this manifest does not list."""
        known = ", ".join(self.entries) or "none"
        return WeightsError(
            f"no weights named {name!r} in {', '.join(str(p) for p in self.paths)} (known: {known})",
            hint="run `gvsl fetch-weights --list`, or give a file path or an http(s) URL",
        )


def _fail(path: Path, where: str, message: str) -> WeightsError:
    return WeightsError(f"{path}: {where}: {message}", hint="fix the manifest (schema in docs/weights.md)")


def _check_type(path: Path, where: str, key: str, value: Any, kind: type | tuple[type, ...]) -> None:
    # bool is an int in Python; a manifest saying `width = true` is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, kind):
        words = {str: "a string", int: "an integer", (int, float): "a number", list: "a list"}
        raise _fail(path, where, f"{key!r} must be {words[kind]}, got {value!r}")


def parse_entry(raw: Any, *, path: Path, index: int) -> WeightsEntry:
    """Validate one ``[[weights]]`` table; ``index`` (0-based) names it in errors."""
    where = f"[[weights]] #{index + 1}"
    if not isinstance(raw, dict):
        raise _fail(path, where, "must be a table")
    if isinstance(raw.get("name"), str):
        where = f"entry {raw['name']!r}"
    missing = [key for key in _REQUIRED if key not in raw]
    if missing:
        raise _fail(path, where, f"missing {', '.join(missing)}")
    unknown = sorted(set(raw) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:  # a typo (e.g. "sha-256") must not silently drop a check
        raise _fail(path, where, f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(_REQUIRED + tuple(_OPTIONAL))}")
    values = {**_OPTIONAL, **raw}

    for key in ("name", "sha256", "format", "modality", "licence", "description", "intensity", "source"):
        _check_type(path, where, key, values[key], str)
    for key in ("width", "size"):
        _check_type(path, where, key, values[key], int)
    _check_type(path, where, "spacing", values["spacing"], (int, float))
    _check_type(path, where, "urls", values["urls"], list)

    name = values["name"]
    if not NAME_PATTERN.match(name):
        raise _fail(path, where, f"name must match {NAME_PATTERN.pattern} (it becomes a file name)")
    urls = values["urls"]
    if not urls:
        raise _fail(path, where, "urls must list at least one http(s) URL")
    for url in urls:
        if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
            raise _fail(path, where, f"not an http(s) URL: {url!r}")
    sha256 = values["sha256"].strip().lower()
    if sha256 and not SHA256_PATTERN.match(sha256):
        raise _fail(path, where, f"sha256 must be 64 hex digits or \"\" (unknown), got {values['sha256']!r}")
    if values["format"] not in FORMATS:
        raise _fail(path, where, f"format must be one of {', '.join(FORMATS)}, got {values['format']!r}")
    if values["width"] < 8 or values["width"] % 8:
        raise _fail(path, where, f"width must be a positive multiple of 8, got {values['width']}")
    if values["modality"] not in MODALITIES:
        raise _fail(path, where, f"modality must be one of {', '.join(MODALITIES)}, got {values['modality']!r}")
    if values["size"] < 0:
        raise _fail(path, where, f"size must be >= 0 bytes (0 = unknown), got {values['size']}")
    if not math.isfinite(values["spacing"]) or values["spacing"] < 0:
        raise _fail(path, where, f"spacing must be >= 0 mm (0 = unspecified), got {values['spacing']}")
    if not values["licence"].strip():
        raise _fail(path, where, "licence must say under which terms the weights may be used")

    return WeightsEntry(
        name=name,
        urls=tuple(urls),
        sha256=sha256,
        format=values["format"],
        width=values["width"],
        modality=values["modality"],
        licence=values["licence"],
        manifest=path,
        description=values["description"],
        size=values["size"],
        spacing=float(values["spacing"]),
        intensity=values["intensity"],
        source=values["source"],
    )


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Parse and validate one manifest file.

    Raises:
        WeightsError: unreadable file, invalid TOML, invalid or duplicate entries.
    """
    path = Path(path).expanduser()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such manifest file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise WeightsError(f"{path}: cannot read the manifest ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise WeightsError(f"{path}: not valid TOML ({exc})", hint="fix the manifest (schema in docs/weights.md)") from None
    unknown = sorted(set(data) - {"weights"})
    if unknown:
        raise WeightsError(f"{path}: unknown top-level key(s) {', '.join(unknown)}; entries go in [[weights]] tables")
    raw_entries = data.get("weights", [])
    if not isinstance(raw_entries, list):
        raise WeightsError(f"{path}: 'weights' must be an array of tables ([[weights]])")
    entries: dict[str, WeightsEntry] = {}
    for index, raw in enumerate(raw_entries):
        entry = parse_entry(raw, path=path, index=index)
        if entry.name in entries:
            raise _fail(path, f"entry {entry.name!r}", "the name appears twice")
        entries[entry.name] = entry
    return Manifest(entries=entries, paths=(path,))


def user_manifest_path(explicit: str | os.PathLike | None = None) -> Path | None:
    """The user manifest: ``explicit`` if given, else ``$GVSL_MANIFEST`` if set, else None."""
    if explicit is not None and str(explicit) != "":
        return Path(explicit).expanduser()
    from_env = os.environ.get(MANIFEST_ENV, "").strip()
    return Path(from_env).expanduser() if from_env else None


def load_manifest(user: str | os.PathLike | None = None) -> Manifest:
    """The built-in manifest merged with the user manifest (see ``user_manifest_path``).

    User entries come after the built-in ones; an entry with a built-in name replaces it.
    """
    manifest = read_manifest(bundled_manifest_path())
    user_path = user_manifest_path(user)
    if user_path is None:
        return manifest
    extra = read_manifest(user_path)
    return Manifest(entries={**manifest.entries, **extra.entries}, paths=manifest.paths + extra.paths)
