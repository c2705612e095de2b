"""Where gvsl's files are: shipped in the package (manifest, examples) and the user cache."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

#: Overrides the user cache folder (weights, preprocessed volumes).
HOME_ENV = "GVSL_HOME"


def cache_root() -> Path:
    """``$GVSL_HOME`` if set, else the user cache folder for "gvsl" (platformdirs).

    Downloaded weights live in ``weights/`` and ``urls/`` below it, preprocessed training
    volumes in ``preprocessed/``.
    """
    home = os.environ.get(HOME_ENV, "").strip()
    if home:
        return Path(home).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("gvsl", appauthor=False))

MANIFEST_NAME = "weights_manifest.toml"


def bundled_manifest_path() -> Path:
    """Path of the built-in ``weights_manifest.toml``.

    A wheel carries it inside the package (``gvsl_cli/weights_manifest.toml``); an editable
    install from a source checkout reads the one at the top of the checkout.
    """
    packaged = resources.files("gvsl_cli") / MANIFEST_NAME
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / MANIFEST_NAME


def example_path(name: str) -> Path:
    """Path of a shipped example volume, e.g. ``example_path("colin27_t1_2mm.nii.gz")``."""
    path = Path(str(resources.files("gvsl_cli") / "examples" / name))
    if not path.is_file():
        raise FileNotFoundError(f"no example volume named {name!r} in {path.parent}")
    return path
