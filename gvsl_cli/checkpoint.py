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

import hashlib
import os
import pickle
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gvsl_cli.config import ModelConfig, PreprocessConfig
from gvsl_cli.errors import CheckpointError, ConfigError, InputError
from gvsl_cli.io import atomic_path
from gvsl_cli.model import GVSL

FORMAT = "gvsl-checkpoint"
FORMAT_VERSION = 1
#: The key that identifies an official GVSL state_dict (first convolution of the U-Net).
OFFICIAL_PROBE_KEY = "unet.inc.double_conv.0.weight"
#: The checkpoint entry that makes a gvsl checkpoint a segmentation model (gvsl finetune).
SEGMENTATION_KEY = "segmentation"
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

    def require_pretrained(self) -> None:
        """Raise CheckpointError when these weights are a segmentation model (no Z-matching
        heads): commands that need GVSL weights call it before any work."""
        if SEGMENTATION_KEY in self.extra:
            raise CheckpointError(
                f"{self.extra.get('path', 'weights')}: is a gvsl finetune segmentation model, not GVSL pre-trained weights",
                hint="use it with gvsl segment (or as --weights of gvsl finetune); give pre-trained weights here",
            )

    def build_model(self, device: torch.device | str = "cpu") -> GVSL:
        """A ``GVSL`` with these weights loaded strictly, in eval mode, on ``device``.

        Raises:
            CheckpointError: the weights are a segmentation model (no Z-matching heads).
        """
        self.require_pretrained()
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


#: First bytes of a PyTorch file: a zip archive (torch >= 1.6) or a legacy pickle stream
#: (protocol 2+ starts with the PROTO opcode 0x80).
PYTORCH_MAGICS = (b"PK\x03\x04", b"\x80")
CHECKPOINT_HINT = "give a gvsl checkpoint (.pt) or an official GVSL .pth file"


def state_checksum(state_dict: dict[str, torch.Tensor]) -> str:
    """A short sha256 of parameter names and values: equal for equal weights, whatever file
    or device they came from (16 hex digits)."""
    hasher = hashlib.sha256()
    for name, tensor in sorted(state_dict.items()):
        hasher.update(name.encode())
        hasher.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return hasher.hexdigest()[:16]


def _not_pytorch_reason(head: bytes) -> str | None:
    """What a file starting with ``head`` (its first KiB) is, when it is surely not PyTorch.

    None when it starts like a PyTorch file (then it is damaged rather than of another kind).
    """
    if head.startswith(PYTORCH_MAGICS):
        return None
    if not head:
        return "the file is empty (0 bytes)"
    stripped = head.lstrip().lower()
    if stripped.startswith((b"<!doctype html", b"<html")):
        return "an HTML page, not a checkpoint (a failed download?)"
    kinds = (
        (head.startswith(b"\x1f\x8b"), "gzip-compressed data (a .nii.gz image?)"),
        (head.startswith(b"NRRD"), "a NRRD image"),
        (head.startswith(b"ObjectType"), "a MetaImage image"),
        (head[344:348] in (b"n+1\0", b"ni1\0") or head[4:8] == b"n+2\0", "a NIfTI image"),
        (head[128:132] == b"DICM", "a DICOM file"),
    )
    for matched, what in kinds:
        if matched:
            return f"not a PyTorch checkpoint: the file is {what}"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut at the end of the 1 KiB read is still text.
        is_text = exc.start >= len(head) - 3 and b"\0" not in head
    else:
        is_text = b"\0" not in head
    return "not a PyTorch checkpoint: the file is text" if is_text else "not a PyTorch checkpoint file (unrecognised content)"


#: Terminal escape codes (torch puts bold text in its messages).
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _unpickling_detail(message: str) -> str:
    """What torch's weights-only refusal is about, in a few clean words ("" when unknown).

    Its message is a paragraph with escape codes; the useful part is the global it met
    ("Unsupported global: GLOBAL pathlib.PosixPath was not an allowed global...").
    """
    message = _ANSI_ESCAPE.sub("", message)
    found = re.search(r"GLOBAL ([\w.]+)", message)
    if found:
        return f"it references {found.group(1)}"
    found = re.search(r"WeightsUnpickler error: ([^\n.]+)", message)
    return found.group(1).strip()[:120] if found else ""


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds on a non-PyTorch file
        error = exc
    # torch reports every failure of the weights-only unpickler as UnpicklingError; only a
    # forbidden global means "a real pickle that needs code".
    if isinstance(error, pickle.UnpicklingError) and "global" in str(error).lower():
        detail = _unpickling_detail(str(error))
        raise CheckpointError(
            f"{path}: refused to load: the file needs arbitrary code to unpickle" + (f" ({detail})" if detail else ""),
            hint="gvsl only loads plain tensors and dicts (torch.load weights_only=True); re-save the state_dict alone",
        )
    # torch's errors on a file of another kind are meaningless to a user ("101" for a text
    # file, "list index out of range" for a NRRD image): say what the file is instead.
    with open(path, "rb") as handle:
        reason = _not_pytorch_reason(handle.read(1024))
    if reason:
        raise CheckpointError(f"{path}: {reason}", hint=CHECKPOINT_HINT)
    if isinstance(error, pickle.UnpicklingError):  # starts like a pickle, not one torch wrote
        raise CheckpointError(f"{path}: not a PyTorch checkpoint file (pickle data that torch did not write)", hint=CHECKPOINT_HINT)
    # It starts like a PyTorch file, so it is most likely cut short or damaged. torch's own
    # first sentence helps when it is one ("...failed finding central directory").
    lines = str(error).strip().splitlines()
    detail = lines[0].split(". ")[0][:160] if lines else ""
    suffix = f" ({detail})" if " " in detail else ""
    raise CheckpointError(f"{path}: damaged or truncated PyTorch file{suffix}", hint="download or copy the checkpoint again")


def _strip_prefix(state_dict: dict[str, Any], prefix: str) -> dict[str, Any]:
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def _checked_gvsl_entries(data: dict, path: Path) -> tuple[ModelConfig, PreprocessConfig, dict[str, torch.Tensor]]:
    """model_config, preprocess and state_dict of a gvsl checkpoint, each checked.

    Raises:
        CheckpointError: an entry missing, of the wrong type, or with invalid values (a file
            cut down or written by something else must not end in a KeyError).
    """
    incomplete = f"{path}: not a complete gvsl checkpoint"
    hint = "save it again with gvsl (gvsl pretrain writes complete checkpoints), or give another weights file"
    for key in ("model_config", "state_dict"):
        if key not in data:
            raise CheckpointError(f"{incomplete}: missing {key!r}", hint=hint)
    for key in ("model_config", "preprocess", "state_dict"):
        if key in data and not isinstance(data[key], dict):
            raise CheckpointError(f"{incomplete}: {key!r} is a {type(data[key]).__name__}, expected a dict", hint=hint)
    not_tensors = [k for k, v in data["state_dict"].items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{incomplete}: 'state_dict' entry {not_tensors[0]!r} is not a tensor", hint=hint)
    configs = []
    for key, cls, default in (("model_config", ModelConfig, None), ("preprocess", PreprocessConfig, {})):
        try:
            configs.append(cls.from_dict(data.get(key, default)))
        except ConfigError as exc:
            raise CheckpointError(f"{path}: invalid {key!r} in the gvsl checkpoint: {exc}", hint=hint) from None
    return configs[0], configs[1], data["state_dict"]


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
        model_config, preprocess, state_dict = _checked_gvsl_entries(data, path)
        extra = {k: v for k, v in data.items() if k not in ("format", "format_version", "model_config", "preprocess", "state_dict", "affine_trained")}
        extra["path"] = str(path)
        return LoadedWeights(
            kind="gvsl",
            model_config=model_config,
            preprocess=preprocess,
            state_dict=state_dict,
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
    try:
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
    except (OSError, RuntimeError) as exc:
        # On a full disk torch.save raises a RuntimeError from its zip writer ("[enforce
        # fail at inline_container.cc] unexpected pos ..."), which says nothing to a user.
        raise InputError(f"{path}: cannot write the checkpoint ({_write_failure(exc, path.parent)})", hint="free disk space there; an earlier checkpoint of that name is left intact") from exc
    return path


def _write_failure(exc: BaseException, folder: Path) -> str:
    """Why writing into ``folder`` failed, in a few words."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if free is not None and free < 64 * 2**20:
        return f"no space left on the device: {free // 2**20} MB free"
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
