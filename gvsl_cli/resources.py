"""Files shipped inside the package: the weights manifest and the example volumes."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

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
