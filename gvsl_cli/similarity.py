"""Image similarity for registration: local NCC, MSE, and MIND-SSC for CT–MR pairs; Mattes
mutual information for the affine stage.

Every metric works in two steps so that expensive features are computed once per image:
``features(image)`` turns a (1, 1, D, H, W) image into (1, C, D, H, W) features (the image
itself for NCC and MSE, 12 MIND-SSC descriptor channels for MIND), and ``loss(fixed,
moved)`` compares features on the same grid (lower is better). The moving image's features
are computed on its own grid and then warped, as ConvexAdam does for MIND.

Every loss takes optional voxel weights (``weight``, (B, 1, D, H, W) in [0, 1], no gradient):
registration passes the fixed image's field-of-view mask times the moving image's, warped
(``registration.Level.weight``), so that neither the padding of the working grids nor fixed
points mapped outside the moving image are scored, as ITK's, ANTs' and elastix's metrics
count only valid points. Each loss is then the weighted *mean* of its per-voxel terms (the
weighted histogram for mutual information): dividing by Σ weight, not by the voxel count,
so that moving out of the field of view neither lowers nor raises the loss by itself. Local
NCC also takes each window's statistics over the valid points alone (``ValidWindowStatistics``):
a window at the edge of the moving image compares the anatomy on both sides of it, not the
anatomy with the zeros beyond the edge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from gvsl_cli.errors import ConfigError
from gvsl_cli.losses import NCC_EPS, local_ncc_loss, mse_loss

METRICS = ("ncc", "mse", "mind")

#: Measures the affine stage accepts: the metrics above and Mattes mutual information.
AFFINE_METRICS = ("mi", *METRICS)

#: Displacements (z, y, x) of the six face neighbours, in units of the MIND dilation.
_SIX_NEIGHBOURS = ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))


def _mind_pairs() -> list[tuple[tuple[int, int, int], tuple[int, int, int]]]:
    """The 12 neighbour pairs of MIND-SSC: face neighbours at squared distance 2 (not opposite)."""
    pairs = []
    for i, a in enumerate(_SIX_NEIGHBOURS):
        for b in _SIX_NEIGHBOURS[i + 1 :]:
            if sum((p - q) ** 2 for p, q in zip(a, b)) == 2:
                pairs.append((a, b))
    return pairs


def _shifted(padded: torch.Tensor, offset: tuple[int, int, int], pad: int, shape) -> torch.Tensor:
    """View of ``padded`` (replicate-padded by ``pad``) shifted by ``offset`` voxels (z, y, x)."""
    d, h, w = shape
    z, y, x = (pad + o for o in offset)
    return padded[:, :, z : z + d, y : y + h, x : x + w]


def mind_ssc(image: torch.Tensor, *, radius: int = 1, dilation: int = 2) -> torch.Tensor:
    """MIND-SSC descriptor (Heinrich et al., MICCAI 2013): (1, 1, D, H, W) -> (1, 12, D, H, W).

    For each of 12 pairs of face neighbours (at ``dilation`` voxels), the patch distance
    D = box mean over (2·radius+1)³ of (I(x+a) − I(x+b))²; then
    MIND = exp(−(D − min D) / V) with V the mean over the 12 channels, clamped to
    [0.001, 1000] times its global mean. Modality-independent: it describes local structure,
    not intensities, so CT and MR descriptors can be compared with a squared difference.
    """
    if image.dim() != 5 or image.shape[1] != 1:
        raise ValueError(f"image must be (B, 1, D, H, W), got shape {tuple(image.shape)}")
    image = image.float()
    shape = image.shape[2:]
    padded = F.pad(image, [dilation] * 6, mode="replicate")
    squared = torch.cat(
        [
            (_shifted(padded, tuple(dilation * o for o in a), dilation, shape) - _shifted(padded, tuple(dilation * o for o in b), dilation, shape)) ** 2
            for a, b in _mind_pairs()
        ],
        dim=1,
    )
    kernel = 2 * radius + 1
    distance = F.avg_pool3d(F.pad(squared, [radius] * 6, mode="replicate"), kernel, stride=1)
    distance = distance - distance.min(dim=1, keepdim=True).values
    variance = distance.mean(dim=1, keepdim=True)
    mean_variance = variance.mean()
    variance = variance.clamp(min=float(mean_variance) * 1e-3 + 1e-12, max=float(mean_variance) * 1e3 + 1e-12)
    return torch.exp(-distance / variance)


def box_sum(volumes: torch.Tensor, window: int) -> torch.Tensor:
    """Sum over a window³ box around every voxel, zero outside: (N, C, D, H, W) -> same.

    Separable, by shifted in-place additions along each axis: no padded copy of the volume
    (the padding and the strided window view of ``losses._sliding_box_sum`` cost more than
    the additions themselves on a CPU; 3³ window on 5 × 1.6 M voxels, 2 threads: 68 ms
    against 114 ms). Like it, each sum adds only the window's own values (no running
    cumulative sum), so faint voxels next to bright ones keep their precision.
    """
    radius = window // 2
    out = volumes
    for dim in (2, 3, 4):
        size = out.shape[dim]
        summed = out.clone()
        for shift in range(1, min(radius, size - 1) + 1):
            summed.narrow(dim, shift, size - shift).add_(out.narrow(dim, 0, size - shift))
            summed.narrow(dim, 0, size - shift).add_(out.narrow(dim, shift, size - shift))
        out = summed
    return out


@dataclass(frozen=True)
class FixedWindowStatistics:
    """The fixed image's side of local NCC, computed once and reused for every moved image.

    Attributes:
        image: (B, 1, D, H, W) fixed intensities I (float32, or float64 if given so).
        mean: window means Ī; variance: window sums of (I − Ī)², clamped at 0 (both same shape).
        window: odd window side in voxels.
    """

    image: torch.Tensor
    mean: torch.Tensor
    variance: torch.Tensor
    window: int

    @classmethod
    def of(cls, fixed: torch.Tensor, window: int) -> "FixedWindowStatistics":
        image = fixed.detach().to(torch.float64 if fixed.dtype == torch.float64 else torch.float32)
        sums = box_sum(torch.cat([image, image * image]), window)
        i_sum, i2_sum = sums.split(image.shape[0])
        mean = i_sum / float(window**3)
        variance = (i2_sum - i_sum * mean).clamp_(min=0)
        return cls(image, mean, variance, window)


@dataclass(frozen=True)
class ValidWindowStatistics:
    """The fixed side of local NCC over the *valid* points of each window, for one set of
    point weights v (``weight``, the mask product F(y)·M(φ(y)) of ``registration.Level.weight``).

    Each point y of the window W(x) counts with v(y), and the window sums are normalised by the
    valid count: with S_v = Σ_W v, a window sum Σ_W v·X stands for N·(Σ_W v·X)/S_v, N = window³,
    the sum the full window would hold if its invalid points were like its valid ones. So a
    window half outside the moving image (or the fixed image, or the grid) is scored on its
    anatomy alone instead of on anatomy mixed with zeros, and where v = 1 on the whole window
    the statistics are exactly ``FixedWindowStatistics``'s (ε keeps its meaning).

    Attributes:
        weight: (B, 1, D, H, W) v in [0, 1], in the fixed statistics' dtype.
        scale: N / S_v, 0 where the window holds no valid point.
        mean: valid-point window means Ī = Σ_W v·I / S_v.
        variance: N/S_v · Σ_W v·(I − Ī)², clamped at 0.
        inverse: 1 / S_v, 0 where the window holds no valid point.
    """

    weight: torch.Tensor
    scale: torch.Tensor
    mean: torch.Tensor
    variance: torch.Tensor
    inverse: torch.Tensor

    @classmethod
    def of(cls, fixed: FixedWindowStatistics, weight: torch.Tensor) -> "ValidWindowStatistics":
        weight = weight.detach().to(fixed.image.dtype)
        weighted = weight * fixed.image
        count, i_sum, i2_sum = box_sum(torch.cat([weight, weighted, weighted * fixed.image]), fixed.window).split(weight.shape[0])
        # A window of no valid point (or float dust of one: S_v is a sum of products of
        # trilinear mask values) is left out: scale 0 makes its cc 0, and its centre has v = 0.
        valid = count > _EMPTY_WINDOW
        inverse = torch.where(valid, count.clamp(min=_EMPTY_WINDOW).reciprocal(), torch.zeros_like(count))
        mean = i_sum * inverse
        scale = inverse * float(fixed.window**3)
        variance = ((i2_sum - i_sum * mean) * scale).clamp_(min=0)
        return cls(weight, scale, mean, variance, inverse)


#: A window whose valid points weigh less than this in all is empty (``ValidWindowStatistics``).
_EMPTY_WINDOW = 1e-6


class _NCCAgainstFixed(torch.autograd.Function):
    """``losses.local_ncc_loss(fixed, moved, window)`` with the fixed side precomputed
    (``FixedWindowStatistics``) and a gradient for ``moved`` only.

    Same formula and analytic gradient as ``losses._LocalNCC`` (see there): with window sums
    of the moved image J, cross = ΣIJ − ΣI·J̄, var_J = ΣJ² − ΣJ·J̄, D = var_I·var_J + ε and
    cc = cross²/D, d mean(cc)/dJ = (I·box(a) + J·box(b) + box(c))/N with a = 2·cross/D,
    b = −2·cc·var_I/D, c = −(a·Ī + b·J̄). Per call: three box sums forward (J, J², IJ) and
    three backward, instead of five and three.

    With point weights v (``valid``, ``ValidWindowStatistics``): the window sums count each
    point with v(y) and are normalised by the valid count (n = N/S_v): cross = n·(Σv·IJ − Ī·Σv·J),
    var_J = n·(Σv·J² − J̄·Σv·J) with Ī, J̄ the valid-point means; the loss is
    1 − Σ v·cc / Σ v. A point of weight 0 (padding, or outside the moving image) adds nothing
    to its neighbours' windows, is not scored and receives no gradient. The gradient is the
    one above with a and b multiplied by v·n at the window centre, the box sums then
    multiplied by v at the point and divided by Σ v instead of N: d cross/dJ(y) =
    n·v(y)·(I(y) − Ī) and d var_J/dJ(y) = 2·n·v(y)·(J(y) − J̄), as without weights.
    """

    @staticmethod
    def forward(ctx, moved: torch.Tensor, fixed: FixedWindowStatistics, valid: ValidWindowStatistics | None) -> torch.Tensor:
        if valid is None:
            count = float(fixed.window**3)
            i_mean, var_i, weighted = fixed.mean, fixed.variance, moved
        else:
            i_mean, var_i, weighted = valid.mean, valid.variance, moved * valid.weight
        sums = box_sum(torch.cat([weighted, weighted * moved, fixed.image * weighted]), fixed.window)
        j_sum, j2_sum, ij_sum = sums.split(moved.shape[0])
        if valid is None:
            j_mean = j_sum / count
            cross = ij_sum - j_sum * i_mean
            var_j = j2_sum - j_sum * j_mean
        else:
            # Sums normalised to the full window: n·(Σv·X) with n = N/S_v (0 for an empty window).
            j_mean = j_sum * valid.inverse
            cross = (ij_sum - j_sum * i_mean) * valid.scale
            var_j = (j2_sum - j_sum * j_mean) * valid.scale
        free_j = var_j > 0  # a clamped variance passes no gradient, as in losses._LocalNCC
        var_j.clamp_(min=0)
        denominator = var_i * var_j + NCC_EPS
        cc = cross * cross / denominator
        if valid is None:
            total, value = float(cc.numel()), cc.mean()
        else:
            total = valid.weight.sum().clamp(min=1e-12)
            value = torch.dot(cc.flatten(), valid.weight.flatten()) / total
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(moved, cross, denominator, cc, free_j, j_mean, *(() if valid is None else (total,)))
            ctx.fixed, ctx.valid = fixed, valid
            ctx.total = total if valid is None else None
        return 1.0 - value

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        moved, cross, denominator, cc, free_j, j_mean, *weighted = ctx.saved_tensors
        fixed, valid = ctx.fixed, ctx.valid
        if valid is None:
            total = ctx.total
            i_mean, var_i = fixed.mean, fixed.variance
            inverse = denominator.reciprocal()
        else:
            (total,) = weighted
            i_mean, var_i = valid.mean, valid.variance
            # v·n at the window centre folded into 1/D once: a, b and so c carry it.
            inverse = valid.weight * valid.scale / denominator
        a = 2.0 * cross * inverse
        b = (-2.0 * cc * var_i * inverse) * free_j
        c = -(a * i_mean + b * j_mean)
        box_a, box_b, box_c = box_sum(torch.cat([a, b, c]), fixed.window).split(a.shape[0])
        grad_moved = (fixed.image * box_a + moved * box_b + box_c) * (-grad_output / total)
        if valid is not None:
            grad_moved = grad_moved * valid.weight
        return grad_moved, None, None


def ncc_against_fixed(fixed: FixedWindowStatistics, moved: torch.Tensor, weight: torch.Tensor | ValidWindowStatistics | None = None) -> torch.Tensor:
    """1 − mean squared local NCC of ``moved`` (B, 1, D, H, W) against precomputed fixed statistics.

    ``weight``: (B, 1, D, H, W) point weights v in [0, 1] (no gradient), or their
    ``ValidWindowStatistics`` (computed once for many moved images), or None for all ones
    with today's zero padding at the grid border: each window counts its valid points only
    and the loss is the v-weighted mean (see ``_NCCAgainstFixed``).
    """
    if moved.shape != fixed.image.shape:
        raise ValueError(f"moved must have the fixed image's shape {tuple(fixed.image.shape)}, got {tuple(moved.shape)}")
    if isinstance(weight, torch.Tensor):
        if weight.shape != moved.shape:
            raise ValueError(f"weight must have the moved image's shape {tuple(moved.shape)}, got {tuple(weight.shape)}")
    with torch.autocast(device_type=moved.device.type, enabled=False):
        if isinstance(weight, torch.Tensor):
            weight = ValidWindowStatistics.of(fixed, weight)
        return _NCCAgainstFixed.apply(moved.to(fixed.image.dtype), fixed, weight)


class _AgainstFixed:
    """``Similarity.against`` for NCC: (moved, weight=None) -> loss with the fixed window sums
    computed once, and the valid-point statistics of the last weight tensor kept until another
    one (or the same one changed in place) comes: the registration stages pass one weight
    tensor for ``WEIGHT_REFRESH_ITERATIONS`` iterations, so its three box sums are taken once
    per refresh, not once per iteration."""

    def __init__(self, fixed: torch.Tensor, window: int):
        self.fixed = FixedWindowStatistics.of(fixed, window)
        self._weight: torch.Tensor | None = None
        self._version = -1
        self._valid: ValidWindowStatistics | None = None

    def __call__(self, moved: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        if weight is None:
            return ncc_against_fixed(self.fixed, moved)
        if weight is not self._weight or weight._version != self._version:
            if weight.shape != moved.shape:
                raise ValueError(f"weight must have the moved image's shape {tuple(moved.shape)}, got {tuple(weight.shape)}")
            self._valid = ValidWindowStatistics.of(self.fixed, weight)
            self._weight, self._version = weight, weight._version
        return ncc_against_fixed(self.fixed, moved, self._valid)


def weighted_mean_squared_error(fixed: torch.Tensor, moved: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over voxels and channels of (moved − fixed)², each voxel counted with ``weight``.

    Args:
        fixed, moved: (B, C, D, H, W) features on the same grid.
        weight: (B, 1, D, H, W) in [0, 1] (no gradient), or None: ``losses.mse_loss``.
    """
    if weight is None:
        return mse_loss(moved, fixed)
    squared = (moved.float() - fixed.float()).square().sum(dim=1, keepdim=True)
    weight = weight.detach().float()
    return (squared * weight).sum() / (weight.sum().clamp(min=1e-12) * fixed.shape[1])


@dataclass(frozen=True)
class Similarity:
    """One similarity metric with its parameters.

    Attributes:
        metric: "ncc" (local normalised cross-correlation, same modality), "mse" (same
            modality and intensity scale), "mind" (MIND-SSC descriptors; CT–MR pairs).
        ncc_window: odd window side in voxels for NCC.
    """

    metric: str = "ncc"
    ncc_window: int = 5

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ConfigError(f"similarity must be one of {', '.join(METRICS)}; got {self.metric!r}")
        if self.ncc_window < 3 or self.ncc_window % 2 == 0:
            raise ConfigError(f"NCC window must be an odd number >= 3, got {self.ncc_window}")

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """(1, 1, D, H, W) image -> (1, C, D, H, W) features compared by ``loss``."""
        return mind_ssc(image) if self.metric == "mind" else image

    def loss(self, fixed: torch.Tensor, moved: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Scalar, lower is better; ``fixed`` and ``moved`` are features on the same grid.

        ``weight`` (B, 1, D, H, W) in [0, 1] (no gradient): voxel weights of the mean (module
        docstring); None counts every voxel alike.
        """
        if self.metric == "ncc":
            if weight is None:
                return local_ncc_loss(fixed, moved, self.ncc_window)
            return ncc_against_fixed(FixedWindowStatistics.of(fixed, self.ncc_window), moved, weight)
        return weighted_mean_squared_error(fixed, moved, weight)

    def against(self, fixed: torch.Tensor) -> Callable[..., torch.Tensor]:
        """``loss`` with its first argument fixed: (moved features, weight=None) -> scalar loss.

        For NCC the fixed image's window sums are computed here once, not at every call
        (an optimisation loop compares many moved images with one fixed image), the fixed
        valid-point statistics once per weight tensor (``_AgainstFixed``), and the gradient
        is computed for the moved image only; same value as ``loss``.
        """
        if self.metric == "ncc" and fixed.shape[1] == 1:
            return _AgainstFixed(fixed, self.ncc_window)
        return lambda moved, weight=None: self.loss(fixed, moved, weight)

    def score(self, fixed: torch.Tensor, moved: torch.Tensor, weight: torch.Tensor | None = None) -> float:
        """The number reported to users: mean squared local NCC (higher is better) for NCC,
        the mean squared difference (lower is better) for MSE and MIND; weighted by
        ``weight`` as in ``loss``."""
        with torch.no_grad():
            value = float(self.loss(fixed, moved, weight))
        return 1.0 - value if self.metric == "ncc" else value

    @property
    def padding_mode(self) -> str:
        """How moving features are extended outside their grid when warped.

        Intensities are mapped so that background is 0, so "zeros" is the background. MIND
        descriptors of a flat background are 1, not 0: zero padding would put a false edge
        at the border of the moving image and bias the optimum (measured: a 6 mm shift was
        found as 4 mm), so they are extended by their border values.
        """
        return "border" if self.metric == "mind" else "zeros"

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "ncc"

    #: Local windows (NCC) and descriptors (MIND) need the whole grid: no voxel sampling.
    samplable = False

    @property
    def whole_inside(self) -> bool:
        """Count a moving point only where its interpolated intensity reads no voxel outside
        the moving field of view (``registration.Level.inside_moving``), not by its share.
        NCC: its valid-point windows give a point at the edge, blended with the zeros beyond
        it, full say in its window (a 12-slice slab's edge slices moved by 6–10 mm with shares,
        about 1 mm with whole points; docs/registration.md). MSE and MIND keep the shares
        (not measured to need it)."""
        return self.metric == "ncc"


def _cubic_bspline(x: torch.Tensor) -> torch.Tensor:
    """The cubic B-spline kernel β³(x) (support |x| < 2, partition of unity on integer shifts)."""
    a = x.abs()
    inner = (4.0 - 6.0 * a**2 + 3.0 * a**3) / 6.0
    outer = (2.0 - a).clamp(min=0.0) ** 3 / 6.0
    return torch.where(a < 1.0, inner, outer)


def _bspline_weights(t: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """β³ at t + 1, t, t − 1, t − 2 for t in [0, 1] and their derivatives in t: two lists of
    four tensors shaped like ``t``, for the four bins k − 1 .. k + 2 that a position k + t reaches."""
    s = 1.0 - t
    t2, s2 = t * t, s * s
    weights = [s2 * s / 6.0, (4.0 - 6.0 * t2 + 3.0 * t2 * t) / 6.0, (4.0 - 6.0 * s2 + 3.0 * s2 * s) / 6.0, t2 * t / 6.0]
    derivatives = [-0.5 * s2, 1.5 * t2 - 2.0 * t, 2.0 * s - 1.5 * s2, 0.5 * t2]
    return weights, derivatives


class _BSplineJointHistogram(torch.autograd.Function):
    """Joint histogram (width²,) of fixed bins and moved positions spread by a cubic B-spline,
    with the gradient for the positions written out.

    A position p in [0, width − 3] (in bins, N values) adds β³(p − k) to column k + 1 for
    its four bins k (``_bspline_weights``), in the row of its fixed bin. The gradient of a
    position is Σ_k grad[row, k + 1]·β³'(p − k): four gathers from the small histogram
    gradient, instead of autograd through the spline's dozen full-length temporaries
    (262 144 samples, 1 thread: forward + backward 25 ms before, see the commit).
    ``sample_weight`` (N,) or None scales each position's contribution and its gradient.
    """

    @staticmethod
    def forward(ctx, position: torch.Tensor, fixed_bin: torch.Tensor, width: int, sample_weight: torch.Tensor | None = None) -> torch.Tensor:
        # The top position (width − 3) is taken as t = 1 past the bin below it: the same four
        # spline values (one of them 0), and every column stays inside the row.
        floor = position.floor().clamp_(max=width - 4)
        weights, derivatives = _bspline_weights(position - floor)
        if sample_weight is not None:
            weights = [weight * sample_weight for weight in weights]
            derivatives = [derivative * sample_weight for derivative in derivatives]
        first = fixed_bin * width + floor.long()  # column of bin floor − 1 in the flat histogram
        joint = torch.zeros(width * width, dtype=position.dtype, device=position.device)
        for offset, weight in enumerate(weights):
            joint[offset:].index_add_(0, first, weight)
        ctx.save_for_backward(first, *derivatives)
        return joint

    @staticmethod
    def backward(ctx, grad_joint: torch.Tensor):
        first, *derivatives = ctx.saved_tensors
        grad_position = sum(grad_joint[offset:][first] * derivative for offset, derivative in enumerate(derivatives))
        return grad_position, None, None, None


def mutual_information_loss(fixed: torch.Tensor, moved: torch.Tensor, bins: int = 32, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Negative Mattes mutual information of two images at the same points (lower is better).

    Mattes et al. (2003), as ITK and ANTs compute it: intensities (clipped to [0, 1]) fall into
    ``bins`` bins; the fixed image's voxels count in their own bin (zero-order Parzen window),
    the moved image's are spread over four neighbouring bins with a cubic B-spline, so the
    joint histogram, and MI, are differentiable with respect to the moved intensities.
    MI = Σ p(f, m) · log(p(f, m) / (p(f)·p(m))), in nats.

    Args:
        fixed, moved: (B, 1, D, H, W) images, intensities about [0, 1] (or samples of them
            at the same points, any shape with one channel).
        bins: histogram bins per image.
        weight: same shape as ``fixed``, in [0, 1] (no gradient), or None: how much each
            voxel counts in the joint histogram (0: left out, as ITK leaves out points
            outside a mask or outside the moving image).
    """
    if fixed.shape != moved.shape or fixed.shape[1] != 1:
        raise ValueError(f"fixed and moved must both be (B, 1, D, H, W); got {tuple(fixed.shape)} and {tuple(moved.shape)}")
    if weight is not None and weight.shape != fixed.shape:
        raise ValueError(f"weight must have the images' shape {tuple(fixed.shape)}, got {tuple(weight.shape)}")
    width = bins + 2  # the B-spline of a value at either end reaches one bin beyond
    fixed_bin = (fixed.detach().float().clamp(0.0, 1.0) * (bins - 1)).round().long().reshape(-1) + 1
    position = moved.float().clamp(0.0, 1.0).reshape(-1) * (bins - 1)
    sample_weight = None if weight is None else weight.detach().float().reshape(-1)
    joint = _BSplineJointHistogram.apply(position, fixed_bin, width, sample_weight)
    p = joint.view(width, width) / joint.sum().clamp(min=1e-12)
    p_fixed = p.sum(dim=1, keepdim=True)
    p_moved = p.sum(dim=0, keepdim=True)
    ratio = p / (p_fixed * p_moved).clamp(min=1e-12)
    return -(p * torch.log(ratio.clamp(min=1e-12))).sum()


@dataclass(frozen=True)
class MutualInformation:
    """Mattes mutual information (``mutual_information_loss``), the affine stage's measure.

    It compares the joint intensity histogram, not intensities voxel by voxel, so it is not
    pulled by tissue one image has and the other lacks (a skull-stripped template against a
    whole head), which biases local NCC towards a 3–4 % scale on such pairs (docs/registration.md).

    Attributes:
        bins: histogram bins per image.
    """

    bins: int = 32

    def __post_init__(self) -> None:
        if self.bins < 4:
            raise ConfigError(f"mutual information needs at least 4 bins, got {self.bins}")

    def features(self, image: torch.Tensor) -> torch.Tensor:
        return image

    def loss(self, fixed: torch.Tensor, moved: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Negative MI (lower is better) of (B, 1, ...) images on the same points, each
        point counted with ``weight`` (same shape, no gradient; None: all alike)."""
        return mutual_information_loss(fixed, moved, self.bins, weight)

    #: Intensities are mapped so that background is 0 (see ``Similarity.padding_mode``).
    padding_mode = "zeros"
    #: Points are counted by their share of the moving mask (``Similarity.whole_inside``):
    #: whole points only moved a 12-slice slab's affine z scale from 0.990 to 0.995 but
    #: lowered the demo pair's affine-only Dice from 0.697 to 0.694.
    whole_inside = False
    #: A histogram of a random subset of voxels estimates the whole image's (as ITK's and
    #: ANTs' sampling strategies do), so the affine stage may sample large levels.
    samplable = True
