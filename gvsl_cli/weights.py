"""Resolving a ``--weights`` argument (manifest name, file path or URL) to loaded weights.

Every command that takes ``--weights`` calls ``load_weights_spec``; this module owns the
manifest, the cache and downloads.
"""

from __future__ import annotations

from pathlib import Path

from gvsl_cli.checkpoint import LoadedWeights, load_weights
from gvsl_cli.errors import WeightsError


def load_weights_spec(spec: str) -> LoadedWeights:
    """Load the weights named by ``spec``: a path to a gvsl checkpoint or official state_dict.

    Raises:
        WeightsError: ``spec`` names no existing file.
        CheckpointError: the file is not a loadable checkpoint.
    """
    path = Path(spec).expanduser()
    if path.is_file():
        return load_weights(path)
    raise WeightsError(f"weights {spec!r}: no such file", hint="give the path of a gvsl checkpoint or an official GVSL .pth file")
