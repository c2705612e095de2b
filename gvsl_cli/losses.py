"""Losses of GVSL: local NCC (by box sums), MSE, smoothness of a displacement.

Shapes: images (B, 1, D, H, W); displacements (B, 3, D, H, W). Every loss returns a scalar
tensor averaged over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Added to var_I·var_J in the NCC denominator, as in the paper's code.
NCC_EPS = 1e-5


class _BoxSum(torch.autograd.Function):
    """``_sliding_box_sum`` with a hand-written backward.

    A zero-padded box sum with an odd window is a symmetric linear operator, so its
    backward is the same box sum of the incoming gradient: half the cost of letting autograd
    differentiate ``unfold`` (which scatters through a strided view).
    """

    @staticmethod
    def forward(ctx, volumes: torch.Tensor, window: int) -> torch.Tensor:
        ctx.window = window
        return _sliding_box_sum(volumes, window)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _sliding_box_sum(grad, ctx.window), None


def _box_sum(volumes: torch.Tensor, window: int) -> torch.Tensor:
    """Sum over a window³ box around every voxel, zero outside: (N, C, D, H, W) -> same."""
    return _BoxSum.apply(volumes, window)


def _sliding_box_sum(volumes: torch.Tensor, window: int) -> torch.Tensor:
    """The box sum of ``_box_sum`` (no autograd of its own).

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


class _LocalNCC(torch.autograd.Function):
    """Local squared NCC with an analytic gradient (box sums only, few elementwise passes).

    With window sums Σ over W(x) of n voxels, cross = ΣIJ − ΣI·ΣJ/n,
    var_I = ΣI² − (ΣI)²/n, D = var_I·var_J + ε and cc = cross²/D, the derivative of cc(x)
    with respect to J(y) for y in W(x) is a(x)·I(y) + b(x)·J(y) + c(x), with
    a = 2·cross/D, b = −2·cc·var_I/D, c = −(a·Ī + b·J̄) (Ī, J̄ the window means). Summing over
    the windows containing y is a box sum (the operator is symmetric), so the gradient of
    mean(cc) is (I·box(a) + J·box(b) + box(c))/N: three box sums. Autograd through the same
    formula builds dozens of full-volume temporaries and was 2–3× slower on the CPU.
    """

    @staticmethod
    def forward(ctx, fixed: torch.Tensor, moving: torch.Tensor, window: int) -> torch.Tensor:
        batch = fixed.shape[0]
        n = float(window**3)
        stacked = torch.cat([fixed, moving, fixed * fixed, moving * moving, fixed * moving], dim=0)
        i_sum, j_sum, i2_sum, j2_sum, ij_sum = _sliding_box_sum(stacked, window).split(batch, dim=0)
        del stacked
        i_mean, j_mean = i_sum / n, j_sum / n
        cross = ij_sum - i_sum * j_mean
        # Variances are >= 0; rounding can make a flat window's slightly negative, which would
        # let the denominator cross zero, so clamp them (and give them no gradient there).
        var_i = i2_sum - i_sum * i_mean
        var_j = j2_sum - j_sum * j_mean
        free_i, free_j = var_i > 0, var_j > 0
        var_i.clamp_(min=0)
        var_j.clamp_(min=0)
        denominator = var_i * var_j + NCC_EPS
        cc = cross * cross / denominator
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            ctx.save_for_backward(fixed, moving, cross, denominator, cc, var_i, var_j, free_i, free_j, i_mean, j_mean)
            ctx.window = window
        return 1.0 - cc.mean()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        fixed, moving, cross, denominator, cc, var_i, var_j, free_i, free_j, i_mean, j_mean = ctx.saved_tensors
        scale = -grad_output / cc.numel()
        a = 2.0 * cross / denominator
        grad_fixed = grad_moving = None
        if ctx.needs_input_grad[1]:
            b = (-2.0 * cc * var_i / denominator) * free_j
            c = -(a * i_mean + b * j_mean)
            box_a, box_b, box_c = _sliding_box_sum(torch.cat([a, b, c]), ctx.window).split(a.shape[0])
            grad_moving = scale * (fixed * box_a + moving * box_b + box_c)
        if ctx.needs_input_grad[0]:
            b = (-2.0 * cc * var_j / denominator) * free_i
            c = -(a * j_mean + b * i_mean)
            box_a, box_b, box_c = _sliding_box_sum(torch.cat([a, b, c]), ctx.window).split(a.shape[0])
            grad_fixed = scale * (moving * box_a + fixed * box_b + box_c)
        return grad_fixed, grad_moving, None


def local_ncc_loss(fixed: torch.Tensor, moving: torch.Tensor, window: int = 9) -> torch.Tensor:
    """1 − mean of the squared local normalised cross-correlation in a window³ box.

    cc = cross² / (var_I·var_J + 1e-5), with zero padding at the borders: the value of the
    paper's five-convolution definition (``local_ncc_loss_dense``), computed with box sums
    and an analytic gradient (``_LocalNCC``). Always evaluated in float32 (or float64 if
    given), also under bf16 autocast, because the variance terms cancel catastrophically in
    low precision.

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
        return _LocalNCC.apply(fixed.to(dtype), moving.to(dtype), window)


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


#: Added to the numerator and denominator of the soft Dice (nnU-Net's smoothing): a class
#: absent from both prediction and target scores 1 instead of 0/0.
DICE_SMOOTH = 1e-5


def soft_dice(logits: torch.Tensor, target: torch.Tensor, *, smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """Soft Dice of each class over the whole batch (nnU-Net's "batch Dice"), shape (K,).

    Args:
        logits: (B, K, D, H, W) unnormalised class scores.
        target: (B, D, H, W) integer class indices in [0, K).

    Dice_k = (2·Σ p_k·t_k + smooth) / (Σ p_k + Σ t_k + smooth), p = softmax(logits),
    t = one-hot(target), sums over the batch and all voxels; computed in float32.
    """
    if logits.dim() != 5 or target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"logits must be (B, K, D, H, W) and target (B, D, H, W), got {tuple(logits.shape)} and {tuple(target.shape)}")
    probabilities = torch.softmax(logits.float(), dim=1)
    one_hot = F.one_hot(target.long(), logits.shape[1]).movedim(-1, 1).to(probabilities.dtype)
    dims = (0, 2, 3, 4)
    intersection = (probabilities * one_hot).sum(dims)
    total = probabilities.sum(dims) + one_hot.sum(dims)
    return (2.0 * intersection + smooth) / (total + smooth)


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, *, smooth: float = DICE_SMOOTH) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """nnU-Net's segmentation loss: cross-entropy + (1 - mean soft Dice of the foreground classes).

    Args:
        logits: (B, K, D, H, W) unnormalised class scores (class 0 is the background).
        target: (B, D, H, W) integer class indices in [0, K).

    Returns:
        (total, dice_loss, ce): scalar tensors, total = dice_loss + ce. The background is
        left out of the Dice term (as nnU-Net does), since it dominates the voxel count.
    """
    dice_loss = 1.0 - soft_dice(logits, target, smooth=smooth)[1:].mean()
    ce = F.cross_entropy(logits.float(), target.long())
    return dice_loss + ce, dice_loss, ce
