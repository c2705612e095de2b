"""Choosing the device and the numeric precision from user options."""

from __future__ import annotations

import torch

from gvsl_cli.errors import ConfigError, DeviceError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` (first CUDA GPU, else CPU), ``cpu``, ``cuda`` or ``cuda:N`` to a torch.device.

    Raises:
        DeviceError: a CUDA device is asked for but not available.
    """
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"unknown device {spec!r}; expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {spec!r} requested but no CUDA GPU is available", hint="use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {spec!r} requested but only {torch.cuda.device_count()} GPU(s) exist")
    elif device.type != "cpu":
        raise ConfigError(f"unsupported device {spec!r}; expected auto, cpu, cuda or cuda:N")
    return device


def resolve_precision(spec: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``spec`` on ``device``; None means plain float32.

    ``auto`` is bf16 on CUDA GPUs that support it and fp32 elsewhere (CPU autocast is slower
    than fp32 for 3D convolutions on most machines).
    """
    spec = (spec or "auto").lower()
    if spec not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}; got {spec!r}")
    if spec == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    if spec == "fp32":
        return None
    if spec == "fp16" and device.type != "cuda":
        raise ConfigError("fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    return torch.bfloat16 if spec == "bf16" else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The autocast context of ``resolve_precision``'s result: ``dtype`` on ``device``, or
    plain float32 (autocast disabled) when ``dtype`` is None."""
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
