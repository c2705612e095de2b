"""Checkpoint files: one file holding everything needed to rebuild and use a model.

A gvsl checkpoint is a dict saved with ``torch.save``::

    {"format": "gvsl-checkpoint", "format_version": 1,
     "model_config": {...}, "preprocess": {...},     # plain dicts of config.py dataclasses
     "state_dict": {...}, "affine_trained": bool,    # may the affine head be trusted?
     ...extra entries (training state, metadata)}

An official GVSL checkpoint is a bare state_dict of the default-width model (optionally
with ``module.`` prefixes from DataParallel). Both load with ``weights_only=True``: a file
that needs arbitrary unpickling is refused, never executed.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gvsl_cli.config import ModelConfig, PreprocessConfig
from gvsl_cli.errors import CheckpointError
from gvsl_cli.io import atomic_path
from gvsl_cli.model import GVSL

FORMAT = "gvsl-checkpoint"
FORMAT_VERSION = 1
#: The key that identifies an official GVSL state_dict (first convolution of the U-Net).
OFFICIAL_PROBE_KEY = "unet.inc.double_conv.0.weight"
#: The official code trains with CT mapped as clip(HU+1024, 0, 2048)/2048 at 1 mm.
OFFICIAL_PREPROCESS = PreprocessConfig(spacing=1.0, modality="ct")


@dataclass
class LoadedWeights:
    """What a weights file holds, already checked.

    Attributes:
        kind: "gvsl" (a gvsl checkpoint) or "official" (an official GVSL state_dict).
        model_config: the network shape the weights fit.
        preprocess: the preprocessing the weights were trained with.
        state_dict: parameters, keys as in ``GVSL``.
        affine_trained: False for official checkpoints, whose affine head never received a
            gradient (the official code cut the graph); callers must not trust its output.
        extra: the remaining entries (training state, metadata).
    """

    kind: str
    model_config: ModelConfig
    preprocess: PreprocessConfig
    state_dict: dict[str, torch.Tensor]
    affine_trained: bool
    extra: dict[str, Any] = field(default_factory=dict)

    def build_model(self, device: torch.device | str = "cpu") -> GVSL:
        """A ``GVSL`` with these weights loaded strictly, in eval mode, on ``device``."""
        model = GVSL(self.model_config)
        load_state_strict(model, self.state_dict, source=self.extra.get("path", "weights"))
        return model.to(device).eval()


def load_state_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], *, source: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming what did not fit."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if mismatched:
            parts.append(f"{len(mismatched)} with other shapes (e.g. {mismatched[0]})")
        raise CheckpointError(f"{source}: parameters do not fit a width-{getattr(model, 'config', ModelConfig()).width} GVSL model: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch reports every failure of the weights-only unpickler this way; only a
        # forbidden global means "a real pickle that needs code". Other failures (random
        # bytes, a saved HTML page) are files that are not PyTorch files at all.
        if "global" not in str(exc).lower():
            with open(path, "rb") as handle:
                head = handle.read(64).lstrip().lower()
            what = "an HTML page" if head.startswith((b"<!doctype html", b"<html")) else "not a readable PyTorch file"
            raise CheckpointError(f"{path}: {what}, not a checkpoint (the weights-only unpickler stopped at an unknown opcode)") from None
        raise CheckpointError(
            f"{path}: refused to load: the file needs arbitrary code to unpickle ({str(exc).splitlines()[0][:120]})",
            hint="gvsl only loads plain tensors and dicts (torch.load weights_only=True); re-save the state_dict alone",
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds on a non-PyTorch file
        raise CheckpointError(f"{path}: not a readable PyTorch file ({str(exc).splitlines()[0][:160]})") from None


def _strip_prefix(state_dict: dict[str, Any], prefix: str) -> dict[str, Any]:
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def load_weights(path: str | os.PathLike) -> LoadedWeights:
    """Read a gvsl checkpoint or an official GVSL state_dict from ``path``.

    Raises:
        CheckpointError: unreadable file, unsafe pickle, or a dict that is neither format.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    data = _torch_load(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a gvsl checkpoint or a GVSL state_dict, got a {type(data).__name__}")
    if data.get("format") == FORMAT:
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(f"{path}: checkpoint format version {version} is not supported (this gvsl reads {FORMAT_VERSION})", hint="upgrade gvsl")
        extra = {k: v for k, v in data.items() if k not in ("format", "format_version", "model_config", "preprocess", "state_dict", "affine_trained")}
        extra["path"] = str(path)
        return LoadedWeights(
            kind="gvsl",
            model_config=ModelConfig.from_dict(data["model_config"]),
            preprocess=PreprocessConfig.from_dict(data.get("preprocess", {})),
            state_dict=data["state_dict"],
            affine_trained=bool(data.get("affine_trained", True)),
            extra=extra,
        )
    state_dict = data.get("state_dict", data) if isinstance(data.get("state_dict"), dict) else data
    state_dict = _strip_prefix(state_dict, "module.")
    probe = state_dict.get(OFFICIAL_PROBE_KEY)
    if not isinstance(probe, torch.Tensor):
        raise CheckpointError(
            f"{path}: neither a gvsl checkpoint nor an official GVSL state_dict (no key {OFFICIAL_PROBE_KEY!r})"
        )
    width = int(probe.shape[0])
    return LoadedWeights(
        kind="official",
        model_config=ModelConfig(width=width, in_channels=int(probe.shape[1])),
        preprocess=OFFICIAL_PREPROCESS,
        state_dict=state_dict,
        affine_trained=False,
        extra={"path": str(path)},
    )


def save_checkpoint(
    path: str | os.PathLike,
    model: GVSL,
    preprocess: PreprocessConfig,
    *,
    affine_trained: bool = True,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a gvsl checkpoint atomically (temporary file, then rename); returns ``path``.

    ``extra`` must hold only tensors, numbers, strings, lists and dicts so that the file
    loads with ``weights_only=True``.
    """
    path = Path(path)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_config": model.config.to_dict(),
        "preprocess": preprocess.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "affine_trained": affine_trained,
        **(extra or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path
