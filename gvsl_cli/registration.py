"""Pairwise registration: GVSL network prediction refined by instance optimisation.

The result is a ``Transform``: a map φ from *physical* points of the fixed image (mm, LPS)
to physical points of the moving image,

    φ(x) = A · (x + v(x)),

the GVSL order (deformable first, then affine; ``spatial.compose_grid``). ``A`` is a 4x4
physical affine and v a displacement held on a working grid of the fixed image's physical
box. Because φ lives in physical space, the fixed and moving images may differ in size,
spacing, origin and direction, and the optimisation may run on coarser canonical grids of
each image: nothing ties the result to those grids. ``warping.displacement_on_grid`` then
evaluates φ on the original fixed grid (the full-resolution ITK field).

Stages (each optional):
1. Affine initialisation: the network's affine head when its checkpoint trained it,
   otherwise the identity or the translation between the intensity centres of mass,
   whichever has the lower affine-stage loss at the coarsest level.
2. Affine optimisation (Adam on a 12-parameter matrix), Mattes mutual information at the
   coarsest level, then refined with a smaller step at the finest.
3. Network deformable prediction (Z-matching local head), given the affine.
4. Deformable optimisation, coarse to fine, demons-style: each step follows the similarity
   gradient smoothed by a Gaussian ("fluid"), scaled so that no voxel moves more than
   ``step`` voxels, and is *composed* with the field (φ ← φ∘(id + δ)), which is then
   smoothed again ("elastic"). Small smooth compositive updates keep the map invertible:
   folded voxels stay far below 0.1 % (the report counts them).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from gvsl_cli import device as device_mod
from gvsl_cli import spatial
from gvsl_cli.config import PreprocessConfig, check_spacing
from gvsl_cli.errors import ConfigError, DeviceError
from gvsl_cli.geometry import Geometry
from gvsl_cli.preprocess import MAX_GRID_VOXELS, check_grid, detect_modality, field_of_view_mask, map_intensities, modality_misfit, prepare, resample
from gvsl_cli.similarity import AFFINE_METRICS, MutualInformation, Similarity
from gvsl_cli.warping import grid_points

Log = Callable[[str], None]


def _no_log(message: str) -> None:
    return None


@dataclass(frozen=True)
class RegistrationConfig:
    """Options of one registration; every default lives here.

    Attributes:
        similarity: "ncc" (default), "mse", or "mind" (MIND-SSC, for CT–MR pairs).
        iters: iterations of the affine stage and of each coarse deformable level; the
            finest level runs ``finest_iters`` (default 0.4·iters). 0 turns instance
            optimisation off (network prediction, or the moments initialisation, alone).
        finest_iters: iterations at the finest level; None = round(0.4·iters).
        spacing: finest optimisation spacing in mm; None picks it from the fixed image
            (its own finest spacing, coarsened until the working grid of its physical box
            holds at most ``max_working_voxels`` voxels: 1.76 mm for a 1 mm adult head on a
            CPU, 1.0 mm on a GPU).
        levels: resolution levels of the deformable stage, each twice as coarse as the last.
        affine: run the affine optimisation stage.
        affine_metric: the affine stage's measure: "auto" (Mattes mutual information, "mi",
            except with ``similarity="mind"``, whose CT–MR pairs keep MIND), "mi", or one of
            the similarity metrics ("ncc" with ``affine_ncc_window``: the earlier
            default, which settles on a 3–4 % scale between a skull-stripped template and a
            whole head; docs/registration.md).
        affine_bins: histogram bins of the mutual information.
        affine_samples: most fixed voxels (a fixed random subset) the mutual information
            reads at one affine level; a level with fewer voxels is read whole.
        affine_finest_iters: affine iterations at the finest level after the coarse ones;
            None = round(0.4·iters), 0 = coarse level only.
        affine_finest_learning_rate: Adam step at the finest level; it refines the coarse
            result, so it is a quarter of ``affine_learning_rate`` (a fresh Adam's first
            steps are about the full rate for every parameter, and at 0.02–0.03 they threw
            the mutual information out of its basin, measured on the demo pair).
        deformable: run the deformable stages (off: an affine registration).
        affine_ncc_window, ncc_window: NCC window side (voxels of the level) of the affine
            and of the deformable stages.
        affine_learning_rate: Adam step of the affine parameters (matrix entries; translation
            in units of ``translation_unit`` mm).
        step: largest displacement update of one deformable step, in voxels of the level.
        final_step: fraction of ``step`` reached, linearly, at the last step of a level.
        fluid_sigma: Gaussian sigma (voxels) applied to each update.
        elastic_sigma: Gaussian sigma (voxels) applied to the field after each update.
        max_working_voxels: size budget of the finest working grid when ``spacing`` is None;
            None picks it from the device (``WORKING_VOXELS``).
        modality: intensity mapping, "auto", "ct" or "mr" (see preprocess).
    """

    similarity: str = "ncc"
    iters: int = 100
    finest_iters: int | None = None
    spacing: float | None = None
    levels: int = 2
    affine: bool = True
    deformable: bool = True
    affine_metric: str = "auto"
    affine_bins: int = 32
    affine_samples: int = 262_144
    affine_finest_iters: int | None = None
    affine_finest_learning_rate: float = 0.0025
    affine_ncc_window: int = 5
    ncc_window: int = 3
    affine_learning_rate: float = 0.01
    step: float = 1.0
    final_step: float = 0.5
    fluid_sigma: float = 2.0
    elastic_sigma: float = 0.4
    max_working_voxels: int | None = None
    translation_unit: float = 100.0
    modality: str = "auto"

    def __post_init__(self) -> None:
        if self.iters < 0 or (self.finest_iters is not None and self.finest_iters < 0):
            raise ConfigError(f"iters must be >= 0, got {self.iters}")
        if self.spacing is not None:
            check_spacing(self.spacing)
        if not 1 <= self.levels <= 5:
            raise ConfigError(f"levels must be between 1 and 5, got {self.levels}")
        if self.step <= 0 or self.fluid_sigma < 0 or self.elastic_sigma < 0:
            raise ConfigError("step must be > 0 and the smoothing sigmas >= 0")
        if self.affine_metric not in ("auto", *AFFINE_METRICS):
            raise ConfigError(f"affine_metric must be one of auto, {', '.join(AFFINE_METRICS)}; got {self.affine_metric!r}")
        if self.affine_samples < 1 or (self.affine_finest_iters is not None and self.affine_finest_iters < 0):
            raise ConfigError("affine_samples must be >= 1 and affine_finest_iters >= 0")
        if self.modality not in ("auto", "ct", "mr"):
            raise ConfigError(f"modality must be one of auto, ct, mr; got {self.modality!r}")
        # Validates the metric and the windows.
        Similarity(self.similarity, self.ncc_window)
        self.affine_measure()

    def affine_measure(self) -> Similarity | MutualInformation:
        """The measure the affine start and the affine stage minimise (see ``affine_metric``)."""
        metric = self.affine_metric
        if metric == "auto":
            metric = "mind" if self.similarity == "mind" else "mi"
        if metric == "mi":
            return MutualInformation(self.affine_bins)
        return Similarity(metric, self.affine_ncc_window)

    def affine_iterations(self) -> tuple[int, int]:
        """Affine iterations (coarsest level, finest level)."""
        finest = round(0.4 * self.iters) if self.affine_finest_iters is None else self.affine_finest_iters
        return self.iters, finest

    def iterations_at(self, level_index: int) -> int:
        """Deformable iterations at level ``level_index`` (0 = finest)."""
        if level_index == 0:
            return round(0.4 * self.iters) if self.finest_iters is None else self.finest_iters
        return self.iters


@dataclass
class Transform:
    """φ(x) = A·(x + v(x)) from fixed physical points to moving physical points (mm, LPS).

    Attributes:
        affine: (4, 4) float64 homogeneous physical affine A (fixed side -> moving side).
        displacement: (1, 3, D, H, W) float32 voxel displacement of ``grid`` (channels
            z, y, x; see ``spatial``), or None for a purely affine transform.
        grid: the grid ``displacement`` lives on (covers the fixed image).
    """

    affine: np.ndarray
    displacement: torch.Tensor | None = None
    grid: Geometry | None = None

    def physical_points(self, points: torch.Tensor) -> torch.Tensor:
        """φ at physical points (N, 3) float32 (x, y, z) mm -> (N, 3) moving points (mm)."""
        points = points.float()
        if self.displacement is not None:
            points = points + displacement_at_points(self.displacement, self.grid, points)
        affine = torch.as_tensor(self.affine, dtype=torch.float32, device=points.device)
        return points @ affine[:3, :3].T + affine[:3, 3]


#: A moving point counts as inside when the interpolated moving mask there is at least
#: 1 − this: its sampled intensity is then at most 0.1 % background fill (``Level.inside_moving``).
WHOLE_INSIDE_TOLERANCE = 1e-3


@dataclass
class Level:
    """One resolution level of the optimisation.

    Attributes:
        fixed_grid, moving_grid: identity-direction grids of each image's physical box.
        fixed_image, moving_image: (1, 1, D, H, W) intensities (about [0, 1]) on them.
        fixed, moving: (1, C, D, H, W) similarity features on them (the images themselves
            for NCC and MSE).
        fixed_mask, moving_mask: (1, 1, D, H, W) float32 share of each voxel inside its own
            image's field of view (1 or 0 at the finest level, averaged below): the rest is
            the padding that rounds the grids up to whole voxels of every level.

    Every similarity is weighted by ``weight``: fixed voxels outside the fixed image, and
    fixed points mapped outside the moving image, are not scored (the padding would
    otherwise be matched as anatomy, and points beyond the moving image as zeros).
    """

    fixed_grid: Geometry
    moving_grid: Geometry
    fixed_image: torch.Tensor
    moving_image: torch.Tensor
    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_mask: torch.Tensor
    moving_mask: torch.Tensor

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.fixed_grid.shape_zyx

    def theta(self, affine: torch.Tensor) -> torch.Tensor:
        """(1, 3, 4) normalised affine of the physical affine (4, 4) between the level grids."""
        to_moving = torch.as_tensor(self.moving_grid.physical_to_normalized(), dtype=affine.dtype, device=affine.device)
        from_fixed = torch.as_tensor(self.fixed_grid.normalized_to_physical(), dtype=affine.dtype, device=affine.device)
        return (to_moving @ affine @ from_fixed)[:3].unsqueeze(0).float()

    def inside_moving(self, grid: torch.Tensor, whole: bool = False) -> torch.Tensor:
        """The moving field-of-view mask interpolated at ``grid`` (normalised moving x, y, z;
        (1, ..., 3)): (1, 1, ...) float32 in [0, 1], no gradient. With ``whole`` (the measure's
        ``whole_inside``): 1 where the moving features sampled there come from voxels inside
        the moving field of view alone, else 0.

        For ``whole`` the mask is kept where it is whole
        (>= 1 − ``WHOLE_INSIDE_TOLERANCE``), i.e. where every voxel the interpolation reads is
        inside. Where it is fractional, the sampled intensity is a blend of the edge voxels
        with the zero background beyond (or, on a coarse level, of a voxel half padding):
        counting such points by their share matched darkened copies of the edge: a 12-slice
        slab's edge slices were pulled by 3 mm, by 6–10 mm with NCC's valid-point windows
        (docs/registration.md, "Known limitations")."""
        with torch.no_grad():
            share = spatial.sample(self.moving_mask, grid.detach())
            return (share >= 1.0 - WHOLE_INSIDE_TOLERANCE).to(share.dtype) if whole else share

    def weight(self, grid: torch.Tensor, fixed_mask: torch.Tensor | None = None, *, whole: bool = False) -> torch.Tensor:
        """Similarity weights of the fixed points mapped to ``grid`` (1, D, H, W, 3) normalised
        moving (x, y, z): ``fixed_mask`` (default: the level's, (1, 1, D, H, W)) times
        ``inside_moving`` at the mapped points (0 beyond the moving grid). No gradient: the
        weights say which points are scored, they are not optimised."""
        return (self.fixed_mask if fixed_mask is None else fixed_mask) * self.inside_moving(grid, whole)

    def moved(self, affine: torch.Tensor, displacement: torch.Tensor | None, padding_mode: str = "zeros", *, with_weight: bool = True, whole: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Moving features resampled onto the fixed level grid through φ, and their weights
        (``weight``; None unless ``with_weight``): (1, C, D, H, W), (1, 1, D, H, W)."""
        grid = spatial.compose_grid(self.theta(affine), displacement, self.shape)
        return spatial.sample(self.moving, grid, padding_mode=padding_mode), self.weight(grid, whole=whole) if with_weight else None

    def moved_at(self, affine: torch.Tensor, points: torch.Tensor, padding_mode: str = "zeros", *, with_mask: bool = True, whole: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Moving features (1, C, N, 1, 1) at fixed points (N, 3) (normalised x, y, z of the
        fixed level grid) mapped through the physical affine (4, 4), and ``inside_moving``
        there (1, 1, N, 1, 1) (no gradient; None unless ``with_mask``)."""
        theta = self.theta(affine)[0]
        grid = (points @ theta[:, :3].T + theta[:, 3]).view(1, -1, 1, 1, 3)
        inside_moving = self.inside_moving(grid, whole) if with_mask else None
        return spatial.sample(self.moving, grid, padding_mode=padding_mode), inside_moving

    def sample_points(self, count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``count`` distinct fixed voxels inside the fixed field of view (``fixed_mask`` > 0)
        drawn at random (a generator seeded with ``seed``, so runs repeat): their normalised
        points (N, 3) (x, y, z), fixed features (1, C, N, 1, 1) and mask values (1, 1, N, 1, 1)."""
        depth, height, width = self.shape
        generator = torch.Generator().manual_seed(seed)
        inside = torch.nonzero(self.fixed_mask.flatten().cpu() > 0).squeeze(1)
        count = min(count, inside.numel())
        # Sorted: neighbouring samples read neighbouring memory (on 2 CPU cores 40 iterations of 262 144 samples took 1.1 s instead of 1.9 s).
        index = inside[torch.randperm(inside.numel(), generator=generator)[:count]].sort().values.to(self.fixed.device)
        zyx = torch.stack([index // (height * width), (index // width) % height, index % width], dim=1)
        sizes = torch.tensor([depth, height, width], device=index.device)
        normalized = 2.0 * zyx.float() / (sizes - 1).clamp(min=1).float() - 1.0  # align_corners=True
        features = self.fixed.flatten(2)[:, :, index]
        mask = self.fixed_mask.flatten(2)[:, :, index]
        return normalized.flip(1).contiguous(), features.view(1, -1, count, 1, 1), mask.view(1, 1, count, 1, 1)

    def loss(self, measure: "Similarity | MutualInformation", affine: torch.Tensor, displacement: torch.Tensor | None = None) -> torch.Tensor:
        """``measure``'s weighted loss of the moving features mapped through φ (scalar)."""
        moved, weight = self.moved(affine, displacement, measure.padding_mode, whole=measure.whole_inside)
        return measure.loss(self.fixed, moved, weight)

    def score(self, similarity: Similarity, affine: torch.Tensor, displacement: torch.Tensor | None = None) -> float:
        """The reported similarity (``Similarity.score``) through φ, weighted like the loss."""
        moved, weight = self.moved(affine, displacement, similarity.padding_mode, whole=similarity.whole_inside)
        return similarity.score(self.fixed, moved, weight)

    def overlap(self, affine: torch.Tensor, displacement: torch.Tensor | None = None) -> float:
        """Share (0..1) of the fixed field of view that φ maps inside the moving image."""
        _, weight = self.moved(affine, displacement)
        return float(weight.sum() / self.fixed_mask.sum().clamp(min=1e-12))


@dataclass
class RegistrationResult:
    """A ``Transform`` and what was learnt along the way (for the report)."""

    transform: Transform
    similarity: dict[str, float]
    stages: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: One line each, e.g. an image the weights' intensity mapping does not fit.
    warnings: list[str] = field(default_factory=list)
    #: {"optimisation": {"fixed", "moving"}, "network": {"fixed", "moving", "from",
    #: "spacing_mm"} or None, "detected": {"fixed", "moving"}}: "ct"/"mr" mappings used.
    intensity_mapping: dict = field(default_factory=dict)
    working_spacing: float = 0.0
    seconds: float = 0.0


# --------------------------------------------------------------------------- geometry


def displacement_at_points(displacement: torch.Tensor, grid: Geometry, points: torch.Tensor) -> torch.Tensor:
    """Physical displacement (N, 3) mm (x, y, z) of a voxel field on ``grid`` at points (N, 3) mm.

    The field is interpolated trilinearly and extended by its border values outside ``grid``.
    """
    matrix = torch.as_tensor(grid.physical_to_normalized(), dtype=torch.float32, device=points.device)
    normalized = points @ matrix[:3, :3].T + matrix[:3, 3]
    sampled = spatial.sample(displacement.float(), normalized.view(1, -1, 1, 1, 3), padding_mode="border")
    voxels_zyx = sampled.view(3, -1).T  # (N, 3) voxels along (z, y, x)
    index_to_mm = torch.as_tensor(grid.direction_matrix @ np.diag(grid.spacing), dtype=torch.float32, device=points.device)
    return voxels_zyx.flip(1) @ index_to_mm.T


def resample_displacement(displacement: torch.Tensor, source: Geometry, target: Geometry) -> torch.Tensor:
    """A voxel displacement on ``source`` as a voxel displacement (1, 3, D, H, W) on ``target``.

    Both grids must have the same direction; the physical displacement is kept.
    """
    if not np.allclose(source.direction, target.direction, atol=1e-6):
        raise ValueError("resample_displacement needs grids with the same direction")
    points = grid_points(target, device=displacement.device).view(-1, 3)
    mm = displacement_at_points(displacement, source, points)
    voxels_xyz = mm / torch.tensor(target.spacing, dtype=mm.dtype, device=mm.device)
    return voxels_xyz.flip(1).T.reshape(1, 3, *target.shape_zyx).contiguous()


#: Default size budget of the finest working grid, by device type. On 2 CPU cores 1.6 M voxels
#: (1.76 mm for an adult head) keeps a registration near 13 s; on an H200 a 1 mm grid of the
#: same head takes 1.2 s and raises the mean WM/GM Dice of the Colin27 -> ICBM152 benchmark
#: from 0.820 to 0.829 (docs/registration.md).
WORKING_VOXELS = {"cpu": 1_600_000, "cuda": 9_000_000}


def automatic_spacing(fixed: Geometry, max_voxels: int) -> float:
    """Finest working spacing (mm): the fixed image's finest spacing, coarsened until its
    physical box holds at most ``max_voxels`` voxels; rounded to 0.01 mm, and at least
    0.01 mm (a 4 µm micro-CT would otherwise round to 0 mm)."""
    extent = np.asarray(fixed.size) * np.asarray(fixed.spacing)
    budget = (float(np.prod(extent)) / max_voxels) ** (1.0 / 3.0)
    return max(MIN_AUTOMATIC_SPACING, round(max(min(fixed.spacing), budget), 2))


#: The finest automatic working spacing (mm): the rounding step of ``automatic_spacing``.
MIN_AUTOMATIC_SPACING = 0.01

#: Largest working grid (voxels, fixed or moving image) a registration accepts: the shared
#: limit of every grid gvsl builds (``preprocess.MAX_GRID_VOXELS``).
MAX_WORKING_VOXELS = MAX_GRID_VOXELS


def planned_spacing(fixed: Geometry, config: RegistrationConfig, device: torch.device) -> float:
    """The finest working spacing (mm) before any device-memory coarsening: ``config.spacing``
    or the automatic choice for ``device``."""
    budget = config.max_working_voxels or WORKING_VOXELS.get(device.type, WORKING_VOXELS["cpu"])
    return config.spacing or automatic_spacing(fixed, budget)


def check_working_grids(
    fixed: Geometry,
    moving: Geometry,
    spacing: float,
    levels: int = 2,
    names: tuple[object, object] = (None, None),
    *,
    automatic: bool = False,
) -> None:
    """Refuse a finest working spacing whose grids (the images' physical boxes, as ``prepare``
    builds them) cannot be built: ``preprocess.check_grid`` on both images, ``names`` the
    fixed and moving files (put first in the message when given); ``automatic``: the spacing
    was derived from the fixed image, not given with --spacing (the hint then points at the
    headers first).

    Raises:
        ConfigError: naming the grid size and a spacing that would fit.
        InputError: an image whose header spacing is not credible (below 1 nm).
    """
    for role, geometry, name in (("fixed", fixed, names[0]), ("moving", moving, names[1])):
        extent = np.asarray(geometry.size, dtype=np.float64) * np.asarray(geometry.spacing, dtype=np.float64)
        fitting = float(np.prod(extent) / MAX_WORKING_VOXELS) ** (1.0 / 3.0) if np.all(np.isfinite(extent)) else math.inf
        check_grid(
            geometry,
            spacing,
            2**levels,
            name=name,
            kind="working",
            role=f"the {role} image",
            error=ConfigError,
            hint=(
                f"the automatic working spacing comes from the fixed image: check that both headers' spacings are in mm, or give --spacing (at least {math.ceil(fitting * 100) / 100:.2f} mm)"
                if automatic
                else f"use a larger --spacing (at least {math.ceil(fitting * 100) / 100:.2f} mm), or leave it out for the automatic choice"
            ),
        )


def _downsample(volume: torch.Tensor, grid: Geometry) -> tuple[torch.Tensor, Geometry]:
    """Halve a level by 2x2x2 averaging; the new voxel centres sit between the old ones."""
    pooled = F.avg_pool3d(volume, kernel_size=2, stride=2)
    spacing = tuple(2.0 * s for s in grid.spacing)
    origin = grid.index_to_physical() @ np.array([0.5, 0.5, 0.5, 1.0])
    size = (pooled.shape[4], pooled.shape[3], pooled.shape[2])
    return pooled, Geometry(size=size, spacing=spacing, origin=tuple(float(o) for o in origin[:3]), direction=grid.direction)


def _downsample_with_mask(volume: torch.Tensor, mask: torch.Tensor, grid: Geometry) -> tuple[torch.Tensor, torch.Tensor, Geometry]:
    """``_downsample`` of a (1, 1, D, H, W) volume and its field-of-view mask alike: a coarse
    voxel half in the padding counts half (its intensity is half background as well)."""
    pooled, coarse = _downsample(torch.cat([volume, mask], dim=1), grid)
    return pooled[:, :1].contiguous(), pooled[:, 1:].contiguous(), coarse


def build_levels(fixed_image: sitk.Image, moving_image: sitk.Image, config: RegistrationConfig, spacing: float, similarity: Similarity, device: torch.device) -> list[Level]:
    """The image pyramid, finest level first (each level halves the one before)."""
    preprocess = PreprocessConfig(spacing=spacing, modality=config.modality, multiple=2 ** config.levels)
    fixed = prepare(fixed_image, preprocess, name="fixed image")
    moving = prepare(moving_image, preprocess, name="moving image")
    fixed_volume = torch.from_numpy(fixed.array)[None, None].to(device)
    moving_volume = torch.from_numpy(moving.array)[None, None].to(device)
    fixed_mask = torch.from_numpy(field_of_view_mask(fixed.original, fixed.grid))[None, None].to(device)
    moving_mask = torch.from_numpy(field_of_view_mask(moving.original, moving.grid))[None, None].to(device)
    fixed_grid, moving_grid = fixed.grid, moving.grid
    levels = []
    for index in range(config.levels):
        if index:
            fixed_volume, fixed_mask, fixed_grid = _downsample_with_mask(fixed_volume, fixed_mask, fixed_grid)
            moving_volume, moving_mask, moving_grid = _downsample_with_mask(moving_volume, moving_mask, moving_grid)
        levels.append(
            Level(fixed_grid, moving_grid, fixed_volume, moving_volume, similarity.features(fixed_volume), similarity.features(moving_volume), fixed_mask, moving_mask)
        )
    return levels


# --------------------------------------------------------------------------- stages


def centre_of_mass(level_volume: torch.Tensor, grid: Geometry) -> np.ndarray:
    """Intensity-weighted centre (x, y, z) mm of a (1, 1, D, H, W) non-negative volume."""
    weights = level_volume[0, 0].clamp(min=0).double()
    total = float(weights.sum())
    points = grid_points(grid, device=weights.device).double()
    if total <= 0:
        return points.view(-1, 3).mean(0).cpu().numpy()
    return (points * weights[..., None]).sum(dim=(0, 1, 2)).cpu().numpy() / total


def moments_affine(fixed: torch.Tensor, fixed_grid: Geometry, moving: torch.Tensor, moving_grid: Geometry) -> np.ndarray:
    """Translation aligning the intensity centres of mass: (4, 4) physical affine."""
    affine = np.eye(4)
    affine[:3, 3] = centre_of_mass(moving, moving_grid) - centre_of_mass(fixed, fixed_grid)
    return affine


def choose_start(level: Level, similarity: Similarity | MutualInformation) -> tuple[np.ndarray, str, str]:
    """The start of the affine stage without a trained network affine: (4, 4) affine, its
    stage name and a note saying which.

    Of the identity and the translation between the intensity centres of mass, the one with
    the lower ``similarity`` loss at ``level`` (the loss the affine stage minimises). The
    centres of mass misplace a skull-stripped image against a whole-head one (the skull and
    scalp pull one centre away), whereas for images far apart the identity has no overlap.
    """
    device = level.fixed.device
    moments = moments_affine(level.fixed_image, level.fixed_grid, level.moving_image, level.moving_grid)
    candidates = {"identity": np.eye(4), "moments": moments}
    with torch.no_grad():
        affines = {name: torch.as_tensor(a, dtype=torch.float64, device=device) for name, a in candidates.items()}
        losses = {name: float(level.loss(similarity, a)) for name, a in affines.items()}
        overlaps = {name: level.overlap(a) for name, a in affines.items()}
    # Losses are means over the points both images cover: a start that covers far fewer
    # (none, for images 400 mm apart) can score a mean as good as any (MIND's squared
    # differences over nothing are 0), so it loses whatever its loss.
    covered = max(overlaps.values())
    eligible = [name for name in candidates if overlaps[name] >= 0.5 * covered]
    use_identity = "identity" in eligible and ("moments" not in eligible or losses["identity"] < losses["moments"])
    shift = ", ".join(f"{v:.1f}" for v in moments[:3, 3])
    chosen, other = ("identity", "moments") if use_identity else ("moments", "identity")
    names = {"identity": "the identity", "moments": f"the centre-of-mass translation ({shift} mm)"}
    note = (
        f"affine start: {names[chosen]} (affine-stage loss at the coarse level {losses[chosen]:.4f}, overlap {overlaps[chosen]:.0%}; "
        f"{names[other]}: {losses[other]:.4f}, overlap {overlaps[other]:.0%})"
    )
    if use_identity:
        return np.eye(4), "identity start", note
    return moments, "moments", note


def _corrected_affine(initial: torch.Tensor, linear: torch.Tensor, shift: torch.Tensor, centre: torch.Tensor, unit: float) -> torch.Tensor:
    """A = C·A0 with C = (I + linear) about ``centre`` (moving side) plus ``shift``·unit mm."""
    correction = torch.eye(4, dtype=torch.float64, device=initial.device)
    matrix = torch.eye(3, dtype=torch.float64, device=initial.device) + linear
    correction = torch.cat(
        [
            torch.cat([matrix, (centre - matrix @ centre + unit * shift).unsqueeze(1)], dim=1),
            correction[3:],
        ],
        dim=0,
    )
    return correction @ initial


#: The affine and deformable stages resample the moving field-of-view mask (``Level.weight``)
#: every this many iterations, not at every one: sampling it cost 28 ms of a 100 ms iteration on 1.6 M
#: voxels (2 CPU threads), and a step moves points by at most ``step`` voxels (an affine step by about a millimetre), so the scored
#: set changes only in a thin band at the moving image's edge between two refreshes.
WEIGHT_REFRESH_ITERATIONS = 5


def optimise_affine(level: Level, initial: np.ndarray, similarity: Similarity | MutualInformation, config: RegistrationConfig, iters: int, learning_rate: float | None = None) -> np.ndarray:
    """Adam on the 12 parameters of an affine correction of ``initial`` (4, 4), at ``level``.

    The correction is (I + L) about the moved centre of the fixed box plus a translation, so
    rotations and scalings do not drag the image sideways; translation is counted in units
    of ``translation_unit`` mm, or of half the fixed box's longest side when that is
    shorter, so one learning rate suits every parameter at any scale (a 3.6 mm micro-CT
    moved by steps of 1 mm left its own field of view). A measure that
    allows it (mutual information) reads at most ``config.affine_samples`` fixed voxels.
    ``learning_rate`` defaults to ``config.affine_learning_rate``.
    """
    device = level.fixed.device
    initial_t = torch.as_tensor(initial, dtype=torch.float64, device=device)
    centre_fixed = torch.as_tensor(level.fixed_grid.normalized_to_physical()[:3, 3], dtype=torch.float64, device=device)
    centre = initial_t[:3, :3] @ centre_fixed + initial_t[:3, 3]  # the fixed box centre, moved
    grid = level.fixed_grid
    longest_side = max((n - 1) * s for n, s in zip(grid.size, grid.spacing))
    unit = min(config.translation_unit, 0.5 * longest_side) if longest_side > 0 else config.translation_unit
    linear = torch.zeros(3, 3, dtype=torch.float64, device=device, requires_grad=True)
    shift = torch.zeros(3, dtype=torch.float64, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([linear, shift], lr=config.affine_learning_rate if learning_rate is None else learning_rate)
    sampled = similarity.samplable and math.prod(level.shape) > config.affine_samples
    if sampled:
        points, fixed, fixed_weight = level.sample_points(config.affine_samples)
    # Adam's steps are about the learning rate whatever the gradient, so decay it (to a
    # tenth) or the matrix keeps wandering by ~lr around the optimum.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0 - 0.9 * i / max(iters - 1, 1))
    weight = None  # set at iteration 0 (a refresh)
    for iteration in range(iters):
        optimizer.zero_grad(set_to_none=True)
        affine = _corrected_affine(initial_t, linear, shift, centre, unit)
        # The scored points (moving field-of-view mask) are refreshed every few iterations,
        # as in optimise_deformable: sampling the mask cost a quarter of the stage.
        refresh = iteration % WEIGHT_REFRESH_ITERATIONS == 0
        if sampled:
            moved, inside_moving = level.moved_at(affine, points, similarity.padding_mode, with_mask=refresh, whole=similarity.whole_inside)
            weight = fixed_weight * inside_moving if refresh else weight
            loss = similarity.loss(fixed, moved, weight)
        else:
            moved, new_weight = level.moved(affine, None, similarity.padding_mode, with_weight=refresh, whole=similarity.whole_inside)
            weight = new_weight if refresh else weight
            loss = similarity.loss(level.fixed, moved, weight)
        loss.backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        return _corrected_affine(initial_t, linear, shift, centre, unit).cpu().numpy()


def gaussian_kernel(sigma: float, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """Normalised 1D Gaussian of ``sigma`` voxels, radius ceil(2.5·sigma) (at least 1): (2r+1,)."""
    radius = max(1, int(math.ceil(2.5 * sigma)))
    x = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def smoothing_matrix(size: int, kernel: torch.Tensor) -> torch.Tensor:
    """(size, size) matrix M of a 1D convolution with ``kernel`` (odd length), border-replicated:
    (M·v)[i] = Σ_j kernel[j]·v[clamp(i + j − r, 0, size − 1)]."""
    radius = kernel.numel() // 2
    rows = torch.arange(size, device=kernel.device).repeat_interleave(kernel.numel())
    taps = torch.arange(-radius, radius + 1, device=kernel.device).repeat(size)
    columns = (rows + taps).clamp(0, size - 1)
    matrix = torch.zeros(size * size, dtype=kernel.dtype, device=kernel.device)
    matrix.index_add_(0, rows * size + columns, kernel.repeat(size))
    return matrix.view(size, size)


#: Kernels longer than this are applied as matrix products (``gaussian_smooth``).
SHIFTED_SUM_MAX_TAPS = 5


def gaussian_smooth(field: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, D, H, W) with ``sigma`` voxels, border-replicated.

    The kernel is exp(−x²/2σ²) over |x| <= ceil(2.5σ), normalised. Each axis is one matrix
    product with a banded (n, n) matrix holding the kernel and the replicated border
    (``smoothing_matrix``) when the kernel is long, or a few shifted multiply-adds when it
    is short. Same values as padding and 1D convolutions to float rounding, several times
    faster on a CPU (σ = 2 on 3 × 1.6 M voxels, 1 thread: 41 ms against 196 ms; σ = 0.4:
    13 ms against 44 ms), where a depthwise conv3d with a 1D kernel is slow.
    """
    if sigma <= 0:
        return field
    kernel = gaussian_kernel(sigma, dtype=field.dtype, device=field.device)
    if kernel.numel() > SHIFTED_SUM_MAX_TAPS:
        batch, channels, depth, height, width = field.shape
        out = torch.matmul(field, smoothing_matrix(width, kernel).T)
        out = torch.matmul(smoothing_matrix(height, kernel), out)
        out = torch.matmul(smoothing_matrix(depth, kernel), out.reshape(batch * channels, depth, height * width))
        return out.view(batch, channels, depth, height, width)
    radius = kernel.numel() // 2
    weights = kernel.tolist()
    out = field
    for dim in (2, 3, 4):
        size = out.shape[dim]
        edge = list(out.shape)
        edge[dim] = radius
        padded = torch.cat([out.narrow(dim, 0, 1).expand(edge), out, out.narrow(dim, size - 1, 1).expand(edge)], dim=dim)
        summed = padded.narrow(dim, 0, size) * weights[0]
        for tap in range(1, kernel.numel()):
            summed.add_(padded.narrow(dim, tap, size), alpha=weights[tap])
        out = summed
    return out


def largest_vector_norm(field: torch.Tensor) -> torch.Tensor:
    """max over voxels of |v| for a (B, 3, D, H, W) field: scalar tensor.

    Through the squared components: ``field.norm(dim=1)`` reduces across the channel
    stride, which on a CPU took 135 ms for 1.6 M voxels against 5 ms.
    """
    return field.square().sum(dim=1).max().sqrt()


def displacement_to_grid_offset(theta: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """(3, 3) matrix taking a voxel displacement (z, y, x) of a fixed grid of ``shape`` to the
    change it makes in the sampling grid (normalised moving x, y, z) under ``theta`` (1, 3, 4).

    compose_grid(θ, u)(p) = θ·norm(p + u(p)) = θ·norm(p) + θ_linear·diag(2/(n−1))·u(p), so
    once the affine grid of θ is computed, every deformable step costs one 3x3 product.
    """
    scale = torch.tensor([2.0 / max(n - 1, 1) for n in reversed(shape)], dtype=theta.dtype, device=theta.device)
    # Columns ordered (z, y, x) to act on the displacement's channels directly.
    return (theta[0, :, :3] * scale).flip(1)


def optimise_deformable(level: Level, affine: np.ndarray, initial: torch.Tensor | None, similarity: Similarity, config: RegistrationConfig, iters: int) -> torch.Tensor:
    """Refine a voxel displacement (1, 3, D, H, W) of ``level``'s fixed grid (zeros if None).

    Demons-style compositive steps (see the module docstring): the similarity gradient is
    smoothed (``fluid_sigma``) and scaled to at most ``step`` voxels (decreasing linearly to
    a tenth of it over the level), composed with the field, and the field smoothed
    (``elastic_sigma``). Max-normalised steps behave the same
    for every metric whatever its scale, and no per-voxel step normalisation (as Adam's)
    amplifies noise in flat regions into folds. The similarity is weighted by
    ``level.weight`` (scored points only), refreshed every ``WEIGHT_REFRESH_ITERATIONS``.
    """
    device = level.fixed.device
    theta = level.theta(torch.as_tensor(affine, dtype=torch.float64, device=device))
    base = spatial.affine_grid(theta, level.shape)
    offset = displacement_to_grid_offset(theta, level.shape)
    # The fixed side of the similarity (NCC's fixed window sums) is computed once per level.
    loss_against_fixed = similarity.against(level.fixed)
    displacement = initial.clone() if initial is not None else torch.zeros(1, 3, *level.shape, device=device)
    for iteration in range(iters):
        displacement.requires_grad_(True)
        grid = base + torch.einsum("ij,bjdhw->bdhwi", offset, displacement)
        if iteration % WEIGHT_REFRESH_ITERATIONS == 0:
            weight = level.weight(grid, whole=similarity.whole_inside)
        loss = loss_against_fixed(spatial.sample(level.moving, grid, padding_mode=similarity.padding_mode), weight)
        (gradient,) = torch.autograd.grad(loss, displacement)
        with torch.no_grad():
            update = gaussian_smooth(gradient, config.fluid_sigma)
            # The step shrinks linearly to ``final_step`` of itself over the level: a constant
            # max-normalised step keeps jittering by ``step`` voxels around the optimum.
            step = config.step * (1.0 - (1.0 - config.final_step) * iteration / max(iters - 1, 1))
            update *= -step / largest_vector_norm(update).clamp(min=1e-12)
            # φ ← φ∘(id + δ): u_new(p) = δ(p) + u(p + δ(p)).
            displacement = update + spatial.warp(displacement.detach(), update, padding_mode="border")
            displacement = gaussian_smooth(displacement, config.elastic_sigma)
    return displacement.detach()


# --------------------------------------------------------------------------- memory


def available_memory(device: torch.device) -> int | None:
    """Free bytes on ``device`` (CUDA: free GPU memory; CPU: available RAM), None if unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:  # Linux: MemAvailable counts reclaimable page cache, unlike the "free" pages
        with open("/proc/meminfo", encoding="utf-8") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def optimisation_bytes(voxels: int, channels: int) -> int:
    """Rough peak memory of the finest optimisation level: features of both images plus about
    40 float32 maps (field, grid, gradients, NCC sums, smoothing temporaries)."""
    return int(voxels * (2 * channels + 40) * 4)


def network_bytes(voxels: int, width: int, *, half: bool) -> int:
    """Rough peak memory of one U-Net inference (no gradients) on ``voxels`` voxels: about
    eight full-resolution maps of ``width`` channels (skip, activation, concatenation, two
    kept feature maps); the coarser levels add less than a seventh."""
    return int(voxels * width * 8 * (2 if half else 4))


def _fit_spacing(spacing: float, fixed: Geometry, budget: int | None, bytes_at: Callable[[int], int], what: str, log: Log) -> tuple[float, str | None]:
    """Coarsen ``spacing`` until ``bytes_at(voxels)`` fits ``budget``; returns it and a note."""
    if budget is None:
        return spacing, None
    extent = np.asarray(fixed.size) * np.asarray(fixed.spacing)
    original = spacing
    for _ in range(8):
        voxels = int(np.prod(np.ceil(extent / spacing)))
        if bytes_at(voxels) <= budget:
            break
        spacing *= 1.26  # halves the voxel count
    else:
        raise DeviceError(
            f"{what} needs {bytes_at(voxels) / 2**30:.1f} GiB even at {spacing:.1f} mm; {budget / 2**30:.1f} GiB is free",
            hint="use --device cpu, or free memory on the device",
        )
    if spacing == original:
        return spacing, None
    note = f"{what} would not fit in the device's free memory at {original:g} mm; running at {spacing:.2f} mm instead"
    log(note)
    return round(spacing, 2), note


# --------------------------------------------------------------------------- network


@dataclass
class NetworkFeatures:
    """U-Net features of both images on the fixed image's canonical grid at the network's spacing.

    ``moving_grid`` is that same grid (the moving image is resampled onto it).
    """

    model: "torch.nn.Module"
    fixed: object
    moving: object
    fixed_grid: Geometry
    moving_grid: Geometry
    autocast: torch.dtype | None
    #: Intensity mapping used for the network's inputs: {"fixed": "ct"/"mr", "moving": ...}.
    mapping: dict[str, str] = field(default_factory=dict)

    def _theta(self, affine: np.ndarray) -> torch.Tensor:
        theta = self.moving_grid.physical_to_normalized() @ affine @ self.fixed_grid.normalized_to_physical()
        return torch.as_tensor(theta[:3], dtype=torch.float32, device=self.fixed.local.device).unsqueeze(0)

    def affine(self) -> np.ndarray:
        """The affine head's prediction as a (4, 4) physical affine (fixed -> moving, mm)."""
        with torch.no_grad(), device_mod.autocast(self.fixed.local.device, self.autocast):
            theta, _ = self.model.affine(self.fixed.global_, self.moving.global_)
        theta4 = np.eye(4)
        theta4[:3] = theta[0].double().cpu().numpy()
        return self.moving_grid.normalized_to_physical() @ theta4 @ self.fixed_grid.physical_to_normalized()

    def displacement(self, affine: np.ndarray) -> torch.Tensor:
        """The deformable head's voxel displacement (1, 3, D, H, W) on ``fixed_grid``, given the affine."""
        with torch.no_grad(), device_mod.autocast(self.fixed.local.device, self.autocast):
            return self.model.deformable(self.fixed.local, self.moving.local, self._theta(affine)).float()


def network_features(weights, fixed_image: sitk.Image, moving_image: sitk.Image, device: torch.device, log: Log, modality: str = "auto") -> tuple[NetworkFeatures, list[str]]:
    """Prepare both images as the weights were trained (``weights.preprocess``) and run the U-Net.

    The network runs at the checkpoint's spacing unless it would not fit the device's free
    memory; then at a coarser spacing (said in the notes), since instance optimisation
    refines the result anyway. ``modality`` "ct" or "mr" replaces the contract's intensity
    mapping ("auto" keeps the contract's).
    """
    from gvsl_cli.device import resolve_precision

    notes = []
    contract = weights.preprocess
    half = device.type == "cuda"
    spacing, note = _fit_spacing(
        contract.spacing,
        Geometry.of(fixed_image),
        available_memory(device),
        lambda voxels: network_bytes(voxels, weights.model_config.width, half=half),
        "the GVSL network",
        log,
    )
    if note:
        notes.append(note)
    mapping = contract.modality if modality == "auto" else modality
    preprocess = PreprocessConfig(spacing=spacing, modality=mapping, mr_percentiles=contract.mr_percentiles, multiple=contract.multiple)
    fixed = prepare(fixed_image, preprocess, name="fixed image")
    # The Z-matching head compares the two images voxel by voxel (its affine head
    # concatenates their bottleneck features), so both go onto the fixed canonical grid, as
    # the pairs of pre-training were; the moving image is resampled there in physical space.
    moving_raw = sitk.GetArrayViewFromImage(moving_image)
    modality = detect_modality(moving_raw) if mapping == "auto" else mapping
    background = -1024.0 if modality == "ct" else float(np.min(moving_raw))
    moving_on_grid = resample(sitk.Cast(moving_image, sitk.sitkFloat32), fixed.grid, default_value=background)
    moving_array = map_intensities(sitk.GetArrayFromImage(moving_on_grid), modality, contract.mr_percentiles)
    model = weights.build_model(device)
    autocast = resolve_precision("auto", device)
    # On a CPU a width-32 network on a 1 mm head takes minutes: say where the time goes.
    log(f"network: width {weights.model_config.width} at {spacing:.2f} mm on a {'×'.join(map(str, fixed.array.shape))} grid (intensities mapped as {fixed.modality.upper()} / {modality.upper()})")
    with torch.no_grad(), device_mod.autocast(device, autocast):
        fixed_features = model.unet(torch.from_numpy(fixed.array)[None, None].to(device))
        moving_features = model.unet(torch.from_numpy(moving_array)[None, None].to(device))
    return NetworkFeatures(model, fixed_features, moving_features, fixed.grid, fixed.grid, autocast, {"fixed": fixed.modality, "moving": modality}), notes


# --------------------------------------------------------------------------- driver


def untrained_affine_note(kind: str, *, optimised: bool) -> str:
    """The note said when a checkpoint's affine head is not trusted, worded by weights kind."""
    if kind == "official":
        why = "the checkpoint's affine head is untrained (the official GVSL code never trained it)"
    else:
        why = (
            "the checkpoint's affine head is untrained (this gvsl checkpoint is marked affine_trained = false: "
            "its pre-training stopped before the affine head was trusted)"
        )
    return f"{why}, so its affine output is not used; the affine comes from the identity or the centres of mass (whichever fits better)" + (" and optimisation" if optimised else "")


#: Below this share of the fixed image mapped inside the moving image, register warns.
LOW_OVERLAP = 0.5


def register(
    fixed_image: sitk.Image,
    moving_image: sitk.Image,
    config: RegistrationConfig = RegistrationConfig(),
    *,
    weights=None,
    device: torch.device | str = "cpu",
    log: Log = _no_log,
) -> RegistrationResult:
    """Register ``moving_image`` to ``fixed_image`` (any grids, physical space).

    Args:
        weights: ``checkpoint.LoadedWeights`` for a GVSL network prediction, or None for
            instance optimisation alone.
        log: called with one-line progress messages.

    Returns:
        The transform (fixed physical point -> moving physical point), the similarity
        before, after the affine, and at the end (on the finest working grid), the stages
        run and notes for the user.
    """
    start = time.perf_counter()
    device = torch.device(device)
    affine_similarity = config.affine_measure()
    similarity = Similarity(config.similarity, config.ncc_window)
    fixed_geometry = Geometry.of(fixed_image)
    spacing = planned_spacing(fixed_geometry, config, device)
    check_working_grids(fixed_geometry, Geometry.of(moving_image), spacing, config.levels, automatic=config.spacing is None)
    notes: list[str] = []
    if device.type == "cuda":
        channels = 12 if config.similarity == "mind" else 1
        spacing, note = _fit_spacing(spacing, fixed_geometry, available_memory(device), lambda v: optimisation_bytes(v, channels), "instance optimisation", log)
        notes += [note] if note else []
    levels = build_levels(fixed_image, moving_image, config, spacing, similarity, device)
    # The intensity mappings used, for the report (build_levels prepares with config.modality).
    detected = {role: detect_modality(sitk.GetArrayViewFromImage(image)) for role, image in (("fixed", fixed_image), ("moving", moving_image))}
    mapping: dict = {"optimisation": {role: d if config.modality == "auto" else config.modality for role, d in detected.items()}, "network": None, "detected": detected}
    warnings: list[str] = []
    finest, coarsest = levels[0], levels[-1]
    log(f"working grids: {' -> '.join(f'{lv.fixed_grid.spacing[0]:.2f} mm' for lv in reversed(levels))} (fixed {'x'.join(map(str, finest.fixed_grid.size))} voxels)")
    identity = torch.eye(4, dtype=torch.float64, device=device)
    scores = {"before": finest.score(similarity, identity)}
    stages: list[str] = []

    network = None
    if weights is not None:
        network, network_notes = network_features(weights, fixed_image, moving_image, device, log, config.modality)
        notes += network_notes
        mapping["network"] = {**network.mapping, "from": "the weights' contract" if config.modality == "auto" else "--modality", "spacing_mm": network.fixed_grid.spacing[0]}
        for role, image in (("fixed", fixed_image), ("moving", moving_image)):
            misfit = modality_misfit(network.mapping[role], mapping["detected"][role])
            if misfit:
                warnings.append(f"{role} image {misfit} for the network ({mapping['network']['from']}); give --modality if the contract does not fit the data")
    if network is not None and weights.affine_trained:
        affine = network.affine()
        stages.append("network affine")
    else:
        affine, start_stage, start_note = choose_start(coarsest, affine_similarity)
        stages.append(start_stage)
        if network is not None:
            notes.append(untrained_affine_note(weights.kind, optimised=bool(config.iters and config.affine)))
        notes.append(start_note)
    if config.iters and config.affine:
        coarse_iters, finest_iters = config.affine_iterations()
        schedule = [(coarsest, coarse_iters, config.affine_learning_rate)]
        if len(levels) > 1 and finest_iters:
            schedule.append((finest, finest_iters, config.affine_finest_learning_rate))
        for level, iters, learning_rate in schedule:
            log(f"affine: {iters} iterations at {level.fixed_grid.spacing[0]:.2f} mm")
            affine = optimise_affine(level, affine, affine_similarity, config, iters, learning_rate)
            stages.append(f"affine optimisation @ {level.fixed_grid.spacing[0]:.2f} mm")
    affine_t = torch.as_tensor(affine, dtype=torch.float64, device=device)
    scores["after_affine"] = finest.score(similarity, affine_t)

    displacement, grid = None, None
    if network is not None:
        displacement, grid = network.displacement(affine), network.fixed_grid
        stages.append("network deformable")
    if config.deformable:
        for index in reversed(range(len(levels))):
            iters = config.iterations_at(index) if config.iters else 0
            if iters == 0:
                continue
            level = levels[index]
            if displacement is not None:
                displacement = resample_displacement(displacement, grid, level.fixed_grid)
            log(f"deformable: {iters} iterations at {level.fixed_grid.spacing[0]:.2f} mm")
            displacement = optimise_deformable(level, affine, displacement, similarity, config, iters)
            grid = level.fixed_grid
            stages.append(f"deformable optimisation @ {grid.spacing[0]:.2f} mm")
    if displacement is not None and grid != finest.fixed_grid:
        displacement, grid = resample_displacement(displacement, grid, finest.fixed_grid), finest.fixed_grid
    scores["after"] = finest.score(similarity, affine_t, displacement)
    # Only points inside both images are scored ("What is scored"): say when few are left.
    covered = finest.overlap(affine_t, displacement)
    if covered < LOW_OVERLAP:
        warnings.append(
            f"only {covered:.0%} of the fixed image maps inside the moving image: the result rests on that part alone "
            "(partial fields of view; check the moved image)"
        )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return RegistrationResult(
        transform=Transform(affine=affine, displacement=displacement, grid=grid),
        similarity=scores,
        stages=stages,
        notes=notes,
        warnings=warnings,
        intensity_mapping=mapping,
        working_spacing=spacing,
        seconds=time.perf_counter() - start,
    )
