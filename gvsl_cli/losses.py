"""Losses of GVSL: local NCC (by box sums), MSE, smoothness of a displacement.

Shapes: images (B, 1, D, H, W); displacements (B, 3, D, H, W). Every loss returns a scalar
tensor averaged over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Added to var_I·var_J in the NCC denominator, as in the paper's code.
NCC_EPS = 1e-5


def _box_sum(volumes: torch.Tensor, window: int) -> torch.Tensor:
    """Sum over a window³ box around every voxel, zero outside: (N, C, D, H, W) -> same.

    Separable sliding sums: along each axis in turn, the zero-padded volume is viewed as
    windows (``unfold``) and each window summed, so the cost per voxel is 3·window additions
    (a dense 9³ convolution does 729 multiply-adds). Each sum only adds the window's own
    values, so small values next to bright regions keep their precision. (A running
    ``cumsum`` is cheaper still, but its total grows along the whole axis: in float32 the
    squares of faint voxels that follow bright ones vanished into it, the variances came out
    negative and the NCC of such windows went to -10⁴; measured on real MR, fixed here.)
    """
    pad = window // 2
    out = volumes
    for dim in (2, 3, 4):
        pads = [0, 0] * 3
        pads[2 * (4 - dim)] = pads[2 * (4 - dim) + 1] = pad
        out = F.pad(out, pads).unfold(dim, window, 1).sum(-1)
    return out


def _ncc_from_sums(i_sum, j_sum, i2_sum, j2_sum, ij_sum, window: int) -> torch.Tensor:
    size = float(window**3)
    u_i = i_sum / size
    u_j = j_sum / size
    cross = ij_sum - u_j * i_sum - u_i * j_sum + u_i * u_j * size
    # Variances are >= 0; rounding can make a flat window's slightly negative, which would
    # let the denominator cross zero, so clamp them.
    var_i = (i2_sum - 2 * u_i * i_sum + u_i * u_i * size).clamp(min=0)
    var_j = (j2_sum - 2 * u_j * j_sum + u_j * u_j * size).clamp(min=0)
    return cross * cross / (var_i * var_j + NCC_EPS)


def local_ncc_loss(fixed: torch.Tensor, moving: torch.Tensor, window: int = 9) -> torch.Tensor:
    """1 − mean of the squared local normalised cross-correlation in a window³ box.

    cc = cross² / (var_I·var_J + 1e-5), with zero padding at the borders: the value of the
    paper's five-convolution definition (``local_ncc_loss_dense``), computed with box sums.
    Always evaluated in float32 (or float64 if given), also under bf16 autocast, because the
    variance terms cancel catastrophically in low precision.

    Args:
        fixed, moving: (B, 1, D, H, W) images.
        window: odd box side in voxels.
    """
    if fixed.shape != moving.shape or fixed.dim() != 5 or fixed.shape[1] != 1:
        raise ValueError(f"fixed and moving must both be (B, 1, D, H, W); got {tuple(fixed.shape)} and {tuple(moving.shape)}")
    if window % 2 != 1:
        raise ValueError(f"window must be odd, got {window}")
    dtype = torch.float64 if fixed.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=fixed.device.type, enabled=False):
        i = fixed.to(dtype)
        j = moving.to(dtype)
        batch = i.shape[0]
        # One batched pass over the five maps instead of five separate filters.
        stacked = torch.cat([i, j, i * i, j * j, i * j], dim=0)
        sums = _box_sum(stacked, window).split(batch, dim=0)
        cc = _ncc_from_sums(*sums, window=window)
        return 1.0 - cc.mean()


def local_ncc_loss_dense(fixed: torch.Tensor, moving: torch.Tensor, window: int = 9) -> torch.Tensor:
    """The reference definition: five dense window³ convolutions (the official code's way).

    Kept for tests and benchmarks only; ``local_ncc_loss`` gives the same value much faster.
    """
    kernel = torch.ones(1, 1, window, window, window, device=fixed.device, dtype=fixed.dtype)
    pad = window // 2
    i, j = fixed, moving
    sums = [F.conv3d(x, kernel, padding=pad) for x in (i, j, i * i, j * j, i * j)]
    return 1.0 - _ncc_from_sums(*sums, window=window).mean()


def mse_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all voxels (float32 under autocast)."""
    return F.mse_loss(prediction.float(), target.float())


def smoothness_loss(displacement: torch.Tensor) -> torch.Tensor:
    """Mean of squared forward differences of u along each axis, summed and divided by 3.

    Args:
        displacement: (B, 3, D, H, W) voxel displacement.
    """
    if displacement.dim() != 5 or displacement.shape[1] != 3:
        raise ValueError(f"displacement must be (B, 3, D, H, W), got {tuple(displacement.shape)}")
    u = displacement.float()
    dz = u[:, :, 1:] - u[:, :, :-1]
    dy = u[:, :, :, 1:] - u[:, :, :, :-1]
    dx = u[:, :, :, :, 1:] - u[:, :, :, :, :-1]
    return ((dz * dz).mean() + (dy * dy).mean() + (dx * dx).mean()) / 3.0
