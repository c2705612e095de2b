"""Augmentations of GVSL pre-training, batched, on the training device.

Like TorchIO, each augmentation first *draws* its random parameters (``draw_spatial``,
``draw_appearance``; every draw from one explicit ``torch.Generator`` on the device) and
then *applies* them deterministically (``spatial_grid`` + ``apply_spatial``,
``apply_appearance``). Random choices such as "apply with probability p" become per-item
masks, never Python branches, so nothing waits for the GPU.

What one pre-training step needs (DESIGN §1): one spatial transform per item, applied
identically to A, to its damaged copy A' and to B; appearance damage for A' only (local
pixel shuffling, a Bézier intensity curve, in-painted boxes of noise). Ranges are the
official code's (``Train_GVSL.py``), see ``SpatialConfig`` and ``AppearanceConfig``.

Shapes: images (B, C, D, H, W) with D = z; intensities in about [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gvsl_cli import spatial


@dataclass(frozen=True)
class SpatialConfig:
    """Ranges of the random spatial transform (the official training script's values).

    Attributes:
        rotation: maximum angle (rad) about each axis, uniform in ±rotation (π/9 = 20°).
        scale: (low, high) factor along each axis.
        translation: maximum shift along each axis in normalised units (1 = half the patch).
        shear: maximum shear angle (rad) of each of the six shear terms (π/18 = 10°).
        elastic_alpha: (low, high) amplitude of the elastic field (voxels per unit of
            smoothed uniform noise, as in the official code).
        elastic_sigma: (low, high) Gaussian smoothing of the elastic noise, in voxels.
        elastic_stride: the noise is drawn and smoothed on a grid this many times coarser,
            then upsampled (same statistics for sigma ≫ stride, a fraction of the cost).
    """

    rotation: float = math.pi / 9
    scale: tuple[float, float] = (0.75, 1.25)
    translation: float = 0.1
    shear: float = math.pi / 18
    elastic_alpha: tuple[float, float] = (0.0, 512.0)
    elastic_sigma: tuple[float, float] = (10.0, 13.0)
    elastic_stride: int = 4


@dataclass(frozen=True)
class AppearanceConfig:
    """Appearance damage of A' (the official ``AppearanceTransform`` rates).

    Attributes:
        shuffle_prob: probability that an item gets local pixel shuffling.
        shuffle_fraction: fraction of the tiles whose voxels are shuffled (the official
            5000 random 6³ blocks cover about 40 % of a 128³ patch).
        bezier_prob: probability of the non-linear Bézier intensity mapping.
        inpaint_boxes: at most this many in-painted boxes; each further box is drawn with
            probability ``inpaint_continue`` (official: 30 and 0.95).
        inpaint_size: (low, high) side of a box as a fraction of the image side.
    """

    shuffle_prob: float = 0.8
    shuffle_fraction: float = 0.4
    bezier_prob: float = 0.9
    inpaint_boxes: int = 30
    inpaint_continue: float = 0.95
    inpaint_size: tuple[float, float] = (0.1, 0.2)


def _uniform(generator: torch.Generator, shape, low, high, device) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, device=device)


# --------------------------------------------------------------------------- spatial


@dataclass
class SpatialParams:
    """Drawn spatial parameters of a batch.

    Attributes:
        rotation, scale, translation: (B, 3); shear: (B, 6) (see ``spatial.affine_matrix``).
        elastic: (B, 3, d, h, w) smoothed noise on the coarse grid, already multiplied by
            alpha: displacement in output voxels (channels z, y, x) before upsampling.
    """

    rotation: torch.Tensor
    scale: torch.Tensor
    translation: torch.Tensor
    shear: torch.Tensor
    elastic: torch.Tensor


def gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Normalised 1D Gaussians (N, 2·radius+1) for standard deviations ``sigma`` (N,)."""
    x = torch.arange(-radius, radius + 1, device=sigma.device, dtype=sigma.dtype)
    kernels = torch.exp(-0.5 * (x.view(1, -1) / sigma.view(-1, 1)) ** 2)
    return kernels / kernels.sum(dim=1, keepdim=True)


def _smooth_valid(noise: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Separable smoothing of (B, C, D, H, W) noise, one kernel per item, no padding.

    Each side shrinks by 2·radius: the noise is drawn that much larger, so the field
    near the borders is as strong as inside (zero padding would weaken it there).
    """
    batch, channels = noise.shape[:2]
    taps = kernels.shape[1]
    weight = kernels.repeat_interleave(channels, dim=0).view(batch * channels, 1, taps)
    x = noise.reshape(1, batch * channels, *noise.shape[2:])
    x = F.conv3d(x, weight.view(-1, 1, taps, 1, 1), groups=batch * channels)
    x = F.conv3d(x, weight.view(-1, 1, 1, taps, 1), groups=batch * channels)
    x = F.conv3d(x, weight.view(-1, 1, 1, 1, taps), groups=batch * channels)
    return x.view(batch, channels, *x.shape[2:])


def draw_spatial(config: SpatialConfig, batch: int, shape: tuple[int, int, int], generator: torch.Generator, device) -> SpatialParams:
    """Draw the spatial transforms of a batch whose output patches are ``shape`` (D, H, W)."""
    g, dev = generator, device
    rotation = _uniform(g, (batch, 3), -config.rotation, config.rotation, dev)
    scale = _uniform(g, (batch, 3), config.scale[0], config.scale[1], dev)
    translation = _uniform(g, (batch, 3), -config.translation, config.translation, dev)
    shear = _uniform(g, (batch, 6), -config.shear, config.shear, dev)
    alpha = _uniform(g, (batch,), config.elastic_alpha[0], config.elastic_alpha[1], dev)
    sigma = _uniform(g, (batch,), config.elastic_sigma[0], config.elastic_sigma[1], dev)
    stride = config.elastic_stride
    coarse_sigma = sigma / stride
    radius = int(math.ceil(4 * config.elastic_sigma[1] / stride))
    coarse = [int(math.ceil((n - 1) / stride)) + 1 for n in shape]
    noise = _uniform(g, (batch, 3, *(c + 2 * radius for c in coarse)), -1.0, 1.0, dev)
    coarse_kernels = gaussian_kernels(coarse_sigma, radius)
    smoothed = _smooth_valid(noise, coarse_kernels)
    # Smoothing white noise on a grid `stride` times coarser leaves it stride^1.5 times
    # stronger; rescale so the field has the amplitude of the full-resolution recipe.
    fine_kernels = gaussian_kernels(sigma, int(math.ceil(4 * config.elastic_sigma[1])))
    # Variance of smoothed noise is proportional to (sum of squared 1D weights)^3.
    std_ratio = (fine_kernels.square().sum(1) / coarse_kernels.square().sum(1)) ** 1.5
    elastic = smoothed * (alpha * std_ratio).view(batch, 1, 1, 1, 1)
    return SpatialParams(rotation=rotation, scale=scale, translation=translation, shear=shear, elastic=elastic)


def spatial_grid(params: SpatialParams, output: tuple[int, int, int], region: tuple[int, int, int]) -> torch.Tensor:
    """Sampling grid (B, D, H, W, 3) of the drawn transforms, into an input of size ``region``.

    out(p) = in(Aff(p + e(p))) with the elastic field e in output voxels and the affine about
    the patch centre, one resampling (``spatial.compose_grid``). The input crop ``region``
    may be larger than ``output`` (a margin, centred): the grid is scaled into its
    normalised coordinates, so rotations pull real anatomy instead of zeros into corners.

    The linear part (rotation, scaling, shear) acts on output voxels: drawn for normalised
    coordinates, where a voxel is 2/(n - 1) wide along an axis of n, it is conjugated by
    S = diag((n - 1) / 2), so that on a patch that is not cubic (small data shrink an axis)
    a rotation stays a rotation instead of adding a stretch of up to 10 %. Cubic patches
    are untouched (every ratio is exactly 1). The translation stays a fraction of the
    patch, as in the official code.
    """
    theta = spatial.affine_matrix(params.rotation, params.scale, params.translation, params.shear)
    half = [(n - 1) / 2 for n in reversed(output)]  # (x, y, z)
    if len(set(half)) > 1:
        # (S⁻¹ M S)_ij = M_ij · s_j / s_i
        ratios = [half[j] / half[i] if j < 3 else 1.0 for i in range(3) for j in range(4)]
        theta = theta * spatial.device_vector(ratios, device=theta.device, dtype=theta.dtype).view(3, 4)
    displacement = F.interpolate(params.elastic, size=tuple(output), mode="trilinear", align_corners=True)
    grid = spatial.compose_grid(theta, displacement)
    # Normalised (x, y, z) of the output grid -> of the centred, larger input region.
    factors = [(o - 1) / max(r - 1, 1) for o, r in zip(output, region)]  # (z, y, x)
    return grid * spatial.device_vector(factors[::-1], device=grid.device, dtype=grid.dtype)


def apply_spatial(images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Resample ``images`` (B, C, R...) at ``grid`` (B, D, H, W, 3) -> (B, C, D, H, W), trilinear, zeros outside."""
    return spatial.sample(images, grid)


# --------------------------------------------------------------------------- appearance


@dataclass
class AppearanceParams:
    """Drawn appearance damage of a batch of (B, 1, D, H, W) images.

    Attributes:
        tile: side of the shuffling tiles (voxels).
        shuffle_keys: (B, T, tile³) random keys; their argsort permutes each tile's voxels.
        shuffle_tiles: (B, T) bool, tiles to shuffle (already False for items not shuffled).
        curve_x, curve_y: (B, K) sorted Bézier samples (the intensity mapping x -> y).
        bezier: (B,) bool, items whose intensities are mapped.
        boxes: (B, N, 3, 2) int64 [start, stop) of each in-painted box along (z, y, x).
        box_active: (B, N) bool, boxes actually painted.
        noise: (B, 1, D, H, W) uniform noise that fills the boxes.
    """

    tile: int
    shuffle_keys: torch.Tensor
    shuffle_tiles: torch.Tensor
    curve_x: torch.Tensor
    curve_y: torch.Tensor
    bezier: torch.Tensor
    boxes: torch.Tensor
    box_active: torch.Tensor
    noise: torch.Tensor


def shuffle_tile_size(patch: tuple[int, int, int]) -> int:
    """Side of the pixel-shuffling tiles: a twentieth of the training patch (6 at 128³, the
    official block), at least 2."""
    return max(2, min(patch) // 20)


def bezier_curve(control: torch.Tensor, samples: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Points of cubic Bézier curves from (0, 0) to (1, 1).

    Args:
        control: (B, 2, 2) the two inner control points (x, y) per item.
    Returns:
        x, y: (B, samples) each sorted increasingly (the official code sorts both, which
        makes the mapping monotonic).
    """
    batch = control.shape[0]
    t = torch.linspace(0.0, 1.0, samples, device=control.device, dtype=control.dtype).view(1, -1)
    zero = torch.zeros(batch, 1, 2, device=control.device, dtype=control.dtype)
    points = torch.cat([zero, control, torch.ones_like(zero)], dim=1)  # (B, 4, 2)
    basis = torch.stack([(1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t**2 * (1 - t), t**3], dim=1)  # (1, 4, S)
    curve = torch.einsum("bps,bpc->bcs", basis.expand(batch, -1, -1), points)
    return curve[:, 0].sort(dim=1).values, curve[:, 1].sort(dim=1).values


def draw_appearance(config: AppearanceConfig, batch: int, shape: tuple[int, int, int], generator: torch.Generator, device, *, patch: tuple[int, int, int] | None = None) -> AppearanceParams:
    """Draw the appearance damage of a batch of images of ``shape`` (D, H, W).

    ``patch`` (default ``shape``): the training patch centred in ``shape`` that the damage
    is measured against. Pre-training damages the crop around the patch (``shape`` is the
    patch plus the spatial transform's margin) before warping it to the patch, so tile and
    box sizes follow the patch, as the official code's do (6³ tiles, boxes of 10–20 % of
    the side at 128³), and boxes lie in the patch's part of the crop.
    """
    g, dev = generator, device
    patch = shape if patch is None else patch
    tile = shuffle_tile_size(patch)
    tiles = math.prod(n // tile for n in shape)
    shuffled_items = torch.rand(batch, 1, generator=g, device=dev) < config.shuffle_prob
    shuffle_tiles = (torch.rand(batch, tiles, generator=g, device=dev) < config.shuffle_fraction) & shuffled_items
    shuffle_keys = torch.rand(batch, tiles, tile**3, generator=g, device=dev)
    curve_x, curve_y = bezier_curve(torch.rand(batch, 2, 2, generator=g, device=dev))
    bezier = torch.rand(batch, generator=g, device=dev) < config.bezier_prob
    n = config.inpaint_boxes
    keep_going = torch.rand(batch, n, generator=g, device=dev) < config.inpaint_continue
    box_active = torch.cumprod(keep_going.to(torch.int32), dim=1).bool()  # stop at the first failure
    sides = spatial.device_vector(patch, device=dev).view(1, 1, 3)
    margin = spatial.device_vector([(n - p) // 2 for n, p in zip(shape, patch)], device=dev).view(1, 1, 3)
    low = (sides * config.inpaint_size[0]).floor()
    high = (sides * config.inpaint_size[1]).floor().clamp(min=low + 1)
    size = (low + (high - low) * torch.rand(batch, n, 3, generator=g, device=dev)).floor().clamp(min=1)
    # Start in [3, side - size - 3) of the patch like the official code (kept inside it).
    room = (sides - size - 6).clamp(min=1)
    start = margin + (3 + room * torch.rand(batch, n, 3, generator=g, device=dev)).floor().clamp(max=sides - size).clamp(min=0)
    boxes = torch.stack([start, start + size], dim=-1).long()
    noise = torch.rand(batch, 1, *shape, generator=g, device=dev)
    return AppearanceParams(tile, shuffle_keys, shuffle_tiles, curve_x, curve_y, bezier, boxes, box_active, noise)


def _shuffle_tiles(images: torch.Tensor, params: AppearanceParams) -> torch.Tensor:
    b, _, d, h, w = images.shape
    s = params.tile
    nz, ny, nx = d // s, h // s, w // s
    core = images[:, 0, : nz * s, : ny * s, : nx * s]
    tiles = core.reshape(b, nz, s, ny, s, nx, s).permute(0, 1, 3, 5, 2, 4, 6).reshape(b, nz * ny * nx, s**3)
    permutation = params.shuffle_keys.argsort(dim=-1)
    shuffled = torch.where(params.shuffle_tiles.unsqueeze(-1), tiles.gather(-1, permutation), tiles)
    core = shuffled.reshape(b, nz, ny, nx, s, s, s).permute(0, 1, 4, 2, 5, 3, 6).reshape(b, nz * s, ny * s, nx * s)
    out = images.clone()
    out[:, 0, : nz * s, : ny * s, : nx * s] = core
    return out


def _map_intensities(images: torch.Tensor, params: AppearanceParams) -> torch.Tensor:
    """Piecewise-linear interpolation of the Bézier curve, like ``np.interp`` (flat outside)."""
    b = images.shape[0]
    x = images.reshape(b, -1).contiguous()
    xs, ys = params.curve_x, params.curve_y
    k = xs.shape[1]
    upper = torch.searchsorted(xs, x).clamp(1, k - 1)
    x0, x1 = xs.gather(1, upper - 1), xs.gather(1, upper)
    y0, y1 = ys.gather(1, upper - 1), ys.gather(1, upper)
    weight = ((x - x0) / (x1 - x0).clamp(min=1e-12)).clamp(0.0, 1.0)
    mapped = (y0 + weight * (y1 - y0)).view_as(images)
    return torch.where(params.bezier.view(b, 1, 1, 1, 1), mapped, images)


def box_mask(boxes: torch.Tensor, active: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """(B, 1, D, H, W) bool: voxels inside any active box. boxes (B, N, 3, 2), active (B, N)."""
    masks = []
    for axis, n in enumerate(shape):
        index = torch.arange(n, device=boxes.device).view(1, 1, n)
        inside = (index >= boxes[:, :, axis, 0:1]) & (index < boxes[:, :, axis, 1:2])
        masks.append(inside.float())
    masks[0] = masks[0] * active.float().unsqueeze(-1)
    # A voxel is covered if, for some box, it is inside along all three axes.
    count = torch.einsum("bnd,bnh,bnw->bdhw", *masks)
    return (count > 0).unsqueeze(1)


def apply_appearance(images: torch.Tensor, params: AppearanceParams) -> torch.Tensor:
    """The damaged copy A' of ``images`` (B, 1, D, H, W): shuffling, Bézier mapping, in-painting.

    Order as in the official code. Boxes are filled with independent uniform noise, so the
    order boxes are painted in does not matter: the union of boxes is painted at once.
    """
    if images.dim() != 5 or images.shape[1] != 1:
        raise ValueError(f"images must be (B, 1, D, H, W), got {tuple(images.shape)}")
    out = _shuffle_tiles(images, params)
    out = _map_intensities(out, params)
    mask = box_mask(params.boxes, params.box_active, tuple(images.shape[2:]))
    return torch.where(mask, params.noise.to(out.dtype), out)


# --------------------------------------------------------------------------- the GVSL triple


@dataclass(frozen=True)
class PretrainAugmentation:
    """The augmentation of one GVSL step: damage A, then warp A, A' and B identically."""

    spatial: SpatialConfig = SpatialConfig()
    appearance: AppearanceConfig = AppearanceConfig()

    def __call__(self, a: torch.Tensor, b: torch.Tensor, output: tuple[int, int, int], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A, A', B) patches (B, 1, *output) from crops ``a``, ``b`` (B, 1, *region) on the device.

        Every random number is drawn from ``generator`` (on the crops' device).
        """
        batch, region = a.shape[0], tuple(a.shape[2:])
        appearance = draw_appearance(self.appearance, batch, region, generator, a.device, patch=output)
        params = draw_spatial(self.spatial, batch, output, generator, a.device)
        damaged = apply_appearance(a, appearance)
        grid = spatial_grid(params, output, region)
        warped = apply_spatial(torch.cat([a, damaged, b], dim=1), grid)
        return warped[:, 0:1], warped[:, 1:2], warped[:, 2:3]
