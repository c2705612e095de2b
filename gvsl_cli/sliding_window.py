"""Sliding-window inference: run a network on a whole volume one patch at a time.

A network trained on 128³ patches is applied to volumes of any size by tiling them with
overlapping windows, running each window, and blending the windows' outputs back into
whole-volume maps. Memory is bounded by one window batch, not by the volume.

Outputs may be coarser than the input: the U-Net's bottleneck f_g is 1/16 of the window
per side. Each output's downsampling factor f is read from its shape (window / output);
window positions are multiples of every factor, so a window's output lands exactly on
the coarse grid. Blending: ``"gaussian"`` weights each window's voxels by a Gaussian
centred on the window (sigma = 1/8 of its side, as nnU-Net does), so the less reliable
window borders count less; ``"constant"`` averages overlapping windows equally.

Shapes: a volume is (C, D, H, W) with D = z; the predictor receives (B, C, d, h, w)
windows and returns, per output name, (B, K, d/f, h/f, w/f).
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from gvsl_cli.errors import ConfigError

Predictor = Callable[[torch.Tensor], Mapping[str, torch.Tensor]]
BLENDS = ("gaussian", "constant")


def window_starts(size: int, window: int, step: int) -> list[int]:
    """Start indices of windows of ``window`` voxels covering ``range(size)``.

    Windows advance by ``step`` and the last one ends exactly at ``size`` (so every window
    lies inside the volume); ``size <= window`` gives the single start 0. With ``size``,
    ``window`` and ``step`` multiples of f, every start is a multiple of f too.
    """
    if size <= window:
        return [0]
    count = math.ceil((size - window) / step) + 1
    starts = [min(i * step, size - window) for i in range(count)]
    return sorted(set(starts))


def window_positions(shape: tuple[int, int, int], patch: tuple[int, int, int], overlap: float, multiple: int = 16) -> list[tuple[int, int, int]]:
    """(z, y, x) starts of the windows ``sliding_window_inference`` runs on a volume of
    ``shape`` (D, H, W): steps of ``patch · (1 - overlap)`` rounded to ``multiple`` (at
    least ``multiple``), axes shorter than the window padded up to it."""
    steps = [max(multiple, int(round(p * (1.0 - overlap) / multiple)) * multiple) for p in patch]
    return list(itertools.product(*(window_starts(max(n, p), p, s) for n, p, s in zip(shape, patch, steps))))


def gaussian_weights(shape: tuple[int, int, int], sigma_fraction: float = 0.125) -> torch.Tensor:
    """(d, h, w) float32 weights: a Gaussian centred on the window, sigma = fraction · side,
    scaled to a maximum of 1 and kept above 1e-3 so no voxel of the volume ends with zero
    total weight."""
    axes = []
    for n in shape:
        centre = (n - 1) / 2
        sigma = max(sigma_fraction * n, 1e-6)
        coords = torch.arange(n, dtype=torch.float64)
        axes.append(torch.exp(-0.5 * ((coords - centre) / sigma) ** 2))
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    weights = weights / weights.max()
    return weights.clamp_min(1e-3).to(torch.float32)


def sliding_window_inference(
    volume: torch.Tensor,
    predict: Predictor,
    *,
    patch: tuple[int, int, int],
    overlap: float = 0.5,
    blend: Mapping[str, str] | None = None,
    device: torch.device | str = "cpu",
    batch: int = 1,
    pad_value: float = 0.0,
    multiple: int = 16,
    accumulate_device: torch.device | str = "cpu",
    on_window: Callable[[int, int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Apply ``predict`` to ``volume`` window by window and blend the results.

    Args:
        volume: (C, D, H, W) float32, on any device (windows are copied to ``device``).
        predict: called on (B, C, d, h, w) windows on ``device``; returns a mapping of
            output name -> (B, K, d/f, h/f, w/f) tensors (f an integer per output).
        patch: window size (d, h, w) in voxels, each a multiple of ``multiple``. A volume
            smaller than the window along an axis is padded with ``pad_value`` up to it
            for the network and cropped back afterwards.
        overlap: fraction of a window shared with its neighbour, in [0, 1).
        blend: per output name, "gaussian" or "constant" (default "gaussian" for outputs
            at full resolution, "constant" for coarser ones).
        device: where ``predict`` runs.
        batch: windows per ``predict`` call.
        multiple: volume sides must be multiples of it (so are window starts and steps),
            so coarse outputs line up with the volume; 16 for the GVSL U-Net.
        accumulate_device: where the blended sums are kept. The predictor's device saves a
            copy per window and the CPU's multiply-adds (which, for a GPU predictor, take
            longer than the network); if the sums do not fit there, the CPU is used.
        on_window: called as on_window(done, total) after each batch of windows.

    Returns:
        output name -> (K, D/f, H/f, W/f) float32 on the CPU.
    """
    if volume.dim() != 4:
        raise ConfigError(f"sliding-window input must be (C, D, H, W), got shape {tuple(volume.shape)}")
    if not 0.0 <= overlap < 1.0:
        raise ConfigError(f"overlap must be in [0, 1), got {overlap:g}")
    if batch < 1:
        raise ConfigError(f"window batch must be >= 1, got {batch}")
    patch = tuple(int(p) for p in patch)
    if len(patch) != 3 or any(p < multiple or p % multiple for p in patch):
        raise ConfigError(f"window size must be three multiples of {multiple}, got {patch}")
    shape = tuple(int(n) for n in volume.shape[1:])
    if any(n % multiple for n in shape):
        raise ConfigError(f"volume sides must be multiples of {multiple} for sliding-window inference, got {shape}")

    # Pad axes shorter than the window (the windows then cover the padded volume exactly).
    padded_shape = tuple(max(n, p) for n, p in zip(shape, patch))
    if padded_shape != shape:
        pads = [p for n, m in zip(reversed(shape), reversed(padded_shape)) for p in (0, m - n)]
        volume = F.pad(volume[None], pads, value=pad_value)[0]
    window = patch
    starts = window_positions(shape, window, overlap, multiple)

    sums: dict[str, torch.Tensor] = {}
    weight_sums: dict[str, torch.Tensor] = {}
    window_weights: dict[str, torch.Tensor] = {}
    factors: dict[str, int] = {}
    total = len(starts)
    for first in range(0, total, batch):
        group = starts[first : first + batch]
        windows = torch.stack([volume[:, z : z + window[0], y : y + window[1], x : x + window[2]] for z, y, x in group])
        with torch.no_grad():
            outputs = predict(windows.to(device, non_blocking=True))
        for name, out in outputs.items():
            if name not in sums:
                factors[name] = _factor(name, tuple(out.shape[2:]), window)
                f = factors[name]
                kind = (blend or {}).get(name, "gaussian" if f == 1 else "constant")
                if kind not in BLENDS:
                    raise ConfigError(f"blend for {name!r} must be one of {', '.join(BLENDS)}, got {kind!r}")
                coarse = tuple(n // f for n in window)
                sums[name], weight_sums[name] = _accumulators((out.shape[1],) + tuple(n // f for n in padded_shape), accumulate_device)
                weights = gaussian_weights(coarse) if kind == "gaussian" else torch.ones(coarse)
                window_weights[name] = weights.to(sums[name].device)
            f = factors[name]
            w = window_weights[name]
            values = out.detach().to(sums[name].device, torch.float32)
            for k, (z, y, x) in enumerate(group):
                region = (slice(z // f, (z + window[0]) // f), slice(y // f, (y + window[1]) // f), slice(x // f, (x + window[2]) // f))
                sums[name][(slice(None),) + region] += values[k] * w
                weight_sums[name][region] += w
        if on_window is not None:
            on_window(min(first + batch, total), total)

    results = {}
    for name, total_sum in sums.items():
        f = factors[name]
        blended = total_sum / weight_sums[name]
        results[name] = blended[:, : shape[0] // f, : shape[1] // f, : shape[2] // f].cpu().contiguous()
    return results


def _accumulators(shape: tuple[int, ...], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed float32 sums (K, D, H, W) and weight sums (D, H, W) on ``device``, or on the
    CPU when ``device`` is a GPU without room for them."""
    device = torch.device(device)
    try:
        return torch.zeros(shape, dtype=torch.float32, device=device), torch.zeros(shape[1:], dtype=torch.float32, device=device)
    except torch.cuda.OutOfMemoryError:
        if device.type == "cpu":
            raise
        return torch.zeros(shape, dtype=torch.float32), torch.zeros(shape[1:], dtype=torch.float32)


def _factor(name: str, out_shape: tuple[int, ...], window: tuple[int, int, int]) -> int:
    """The integer downsampling factor of an output, the same along every axis."""
    if len(out_shape) != 3 or any(o < 1 or w % o for o, w in zip(out_shape, window)):
        raise ConfigError(f"output {name!r} of shape {out_shape} does not divide the window {window}")
    factors = {w // o for o, w in zip(out_shape, window)}
    if len(factors) != 1:
        raise ConfigError(f"output {name!r} of shape {out_shape} is not the window {window} scaled equally on every axis")
    return factors.pop()
