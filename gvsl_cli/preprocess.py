"""The preprocessing contract: canonical grid, target spacing, intensity mapping, padding.

Before the network sees a volume it is resampled onto a *canonical grid*: identity
direction (index axes along ITK's L, P, S), isotropic ``spacing`` mm, covering the
volume's physical bounding box, each side a multiple of 16. Every patient then faces the
same way (the affine head learns ±20° rotations, not flips). Intensities are then mapped to
about [0, 1]. Results computed on the canonical grid go back onto the input's own grid by
``to_original_grid`` (a resampling in physical space, so nothing is lost but resolution).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from gvsl_cli.config import PreprocessConfig
from gvsl_cli.errors import GvslError, InputError
from gvsl_cli.geometry import Geometry

#: Below this minimum intensity a volume is taken for CT in Hounsfield units (air is -1000).
CT_MINIMUM_HU = -500.0


def detect_modality(array: np.ndarray) -> str:
    """"ct" when intensities look like Hounsfield units (minimum below -500), else "mr".

    A CT rescaled to 0..1 is not in HU, so it is treated as "mr" (percentile mapping), which
    is the right mapping for it.
    """
    return modality_of_minimum(float(np.min(array)))


def modality_of_minimum(minimum: float) -> str:
    """``detect_modality`` from a volume's minimum intensity alone (e.g. from SimpleITK's
    MinimumMaximumImageFilter, without an array)."""
    return "ct" if minimum < CT_MINIMUM_HU else "mr"


def modality_look(detected: str) -> str:
    """What intensities that look like ``detected`` ("ct"/"mr") look like, in words."""
    return "CT (minimum below -500: Hounsfield units)" if detected == "ct" else "MR (no Hounsfield-unit minimum)"


def modality_misfit(mapping: str, detected: str) -> str | None:
    """Why a fixed intensity ``mapping`` ("ct"/"mr", e.g. the weights' contract) does not fit
    a volume whose intensities look like ``detected``, in words; None when it fits or when
    ``mapping`` is "auto" (decided per volume, so it always fits).

    The one wording of this warning, used by finetune, embed, segment and register
    (pretrain counts the volumes, with ``modality_look``'s words): a HU
    CT mapped with MR percentiles (or an MR squeezed by the CT window) gives features and
    predictions of a network that never saw such inputs.
    """
    if mapping not in ("ct", "mr") or detected == mapping:
        return None
    return f"looks like {modality_look(detected)}, but its intensities are mapped as {mapping.upper()}"


def map_intensities(array: np.ndarray, modality: str, percentiles: tuple[float, float] = (0.5, 99.5)) -> np.ndarray:
    """Map raw intensities to about [0, 1] (float32, same shape).

    CT: clip(HU + 1024, 0, 2048) / 2048, the paper's mapping. MR: the ``percentiles`` of the
    non-background voxels (above the minimum) are mapped to 0 and 1, then clipped.
    """
    array = np.asarray(array, dtype=np.float32)
    if modality == "ct":
        return np.clip(array + 1024.0, 0.0, 2048.0) / 2048.0
    if modality != "mr":
        raise ValueError(f"modality must be 'ct' or 'mr', got {modality!r}")
    foreground = array[array > array.min()]
    if foreground.size == 0:  # constant volume: nothing to scale
        return np.zeros_like(array)
    low, high = np.percentile(foreground, percentiles)
    if high <= low:
        high = low + 1.0
    return np.clip((array - low) / (high - low), 0.0, 1.0).astype(np.float32)


def canonical_geometry(geometry: Geometry, spacing: float, multiple: int = 16) -> Geometry:
    """The canonical grid covering ``geometry``'s physical extent.

    Identity direction, isotropic ``spacing`` mm, each side rounded up to a multiple of
    ``multiple`` voxels with the extra split evenly on both sides (so the volume stays
    centred).
    """
    corners = geometry.physical_corners()
    # Extend by half a voxel of the source on each side so edge voxels are fully covered.
    half_voxel = 0.5 * np.abs(geometry.direction_matrix @ np.diag(geometry.spacing)).sum(axis=1)
    low = corners.min(axis=0) - half_voxel
    high = corners.max(axis=0) + half_voxel
    extent = high - low
    size = [max(multiple, int(math.ceil(e / spacing / multiple - 1e-6)) * multiple) for e in extent]
    centre = 0.5 * (low + high)
    origin = centre - 0.5 * (np.array(size) - 1) * spacing
    return Geometry(
        size=tuple(size),
        spacing=(spacing, spacing, spacing),
        origin=tuple(float(o) for o in origin),
        direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
    )


#: Largest working grid (voxels) of ``gvsl register`` (its optimisation holds several
#: float32 copies and their gradients).
MAX_GRID_VOXELS = 400_000_000
#: Largest canonical grid (voxels) the other commands build: 8 GB as float32. A whole-body
#: CT of 512×512×2000 at 0.5 mm holds 1.3 G voxels; a mistyped --spacing (0.01 for 1)
#: becomes one clear line instead of an allocation failure deep inside SimpleITK.
MAX_CANONICAL_GRID_VOXELS = 2_000_000_000
#: Longest side (mm) of a credible image: no body or specimen is 5 m long. A header in other
#: units (200 mm "voxels": a 9 m box) is refused by it, whatever the grid.
MAX_BOX_MM = 5000.0

#: Finest voxel spacing (mm) of an input that gvsl accepts: 1 nm. Nothing images finer; such
#: a spacing is a header in other units, and ITK's Gaussian refuses spacings below 1e-8.
MIN_INPUT_SPACING_MM = 1e-6


def _mm(values) -> str:
    """``values`` (mm) as "AxBxC", 3 significant digits each, without an exponent between
    0.01 and 1e6 (a 9 m box reads "9000", not "9e+03")."""
    def one(v: float) -> str:
        rounded = float(f"{v:.3g}")
        return f"{rounded:f}".rstrip("0").rstrip(".") if 0.01 <= abs(rounded) < 1e6 else f"{rounded:g}"

    return "x".join(one(float(v)) for v in values)


def check_grid(
    original: Geometry,
    spacing: float,
    multiple: int = 16,
    *,
    name: object = None,
    kind: str = "canonical",
    role: str = "",
    error: type[GvslError] = InputError,
    hint: str | None = None,
) -> Geometry:
    """The canonical grid of ``original`` at ``spacing`` mm (see ``canonical_geometry``),
    after checking that it can be built: the one check of grid geometry shared by embed,
    segment, finetune, pretrain (through ``prepare``) and register (``check_working_grids``).

    Refused: a ``spacing`` that is not a finite number > 0 (e.g. an automatic spacing
    rounded to 0), an input spacing below ``MIN_INPUT_SPACING_MM`` or not finite, an image
    whose box spans less than one grid voxel along two axes or more (a 4 µm header read as
    mm: the whole image would become one voxel or one line of voxels), a box longer than
    ``MAX_BOX_MM``, and a grid of more than ``MAX_GRID_VOXELS`` (working) or
    ``MAX_CANONICAL_GRID_VOXELS`` (canonical) voxels.

    Args:
        name: the file the geometry comes from, put first in the message ("PATH: ...").
        kind: "canonical" or "working", the grid's name in the message.
        role: e.g. "the fixed image", named after the grid size.
        error: the GvslError subclass raised (ConfigError where an option chose ``spacing``).
        hint: the hint of a too-large grid (default: a coarser --spacing).

    Raises:
        ``error``: one line naming the file, its spacing and physical extent.
    """
    lead = f"{name}: " if name is not None else ""
    for_role = f" for {role}" if role else ""
    spacings = np.asarray(original.spacing, dtype=np.float64)
    extent = np.asarray(original.size, dtype=np.float64) * spacings
    where = f"spacing {_mm(spacings)} mm, a box of {_mm(extent)} mm"
    if not (math.isfinite(spacing) and spacing > 0):
        raise error(f"{lead}a {kind} spacing of {spacing:g} mm cannot hold an image ({where})", hint="give a spacing in mm, e.g. --spacing 1")
    if not np.all(np.isfinite(spacings)) or spacings.min() < MIN_INPUT_SPACING_MM:
        raise InputError(
            f"{lead}{where}: voxels finer than {MIN_INPUT_SPACING_MM:g} mm are not credible (is the header's spacing in other units than mm?)",
            hint="set the voxel spacing in mm in the file's header (e.g. SimpleITK's SetSpacing), then rerun",
        )
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        # Sizes as canonical_geometry computes them, in floats: a 1e9 mm spacing must not
        # become an integer overflow before it can be refused.
        half_voxel = 0.5 * np.abs(original.direction_matrix @ np.diag(spacings)).sum(axis=1)
        corners = original.physical_corners()
        box = corners.max(axis=0) - corners.min(axis=0) + 2 * half_voxel
        sides = np.maximum(multiple, np.ceil(box / spacing / multiple - 1e-6) * multiple)
        voxels = float(np.prod(sides))
    if int(np.sum(box >= spacing)) < 2:
        raise InputError(
            f"{lead}{where}: the whole image fits in {'one voxel' if np.all(box < spacing) else 'one row of voxels'} of the {spacing:g} mm {kind} grid (is the header's spacing in other units than mm?)",
            hint=f"if the header is right (a micro-CT), give a spacing near the image's own ({spacings.min():.3g} mm) where the command takes --spacing; else set the voxel spacing in mm in the file's header",
        )
    if not np.all(np.isfinite(box)) or box.max() > MAX_BOX_MM:
        raise InputError(
            f"{lead}{where}: longer than any body or specimen ({MAX_BOX_MM / 1000:g} m at most; is the header's spacing in other units than mm?)",
            hint="set the voxel spacing in mm in the file's header (e.g. SimpleITK's SetSpacing), then rerun",
        )
    limit = MAX_GRID_VOXELS if kind == "working" else MAX_CANONICAL_GRID_VOXELS
    if not math.isfinite(voxels) or voxels > limit:
        size = "x".join(f"{s:.0f}" if s < 1e9 else f"{s:.3g}" for s in sides)
        raise error(
            f"{lead}a {kind} spacing of {spacing:g} mm makes a {size} {kind} grid ({voxels:.3g} voxels){for_role} ({where}); "
            f"at most {limit:.3g} are allowed",
            hint=hint or "use a coarser --spacing",
        )
    return canonical_geometry(original, spacing, multiple)


def reference_image(geometry: Geometry, pixel_type=sitk.sitkFloat32) -> sitk.Image:
    """An empty SimpleITK image on ``geometry`` (a target grid for ``sitk.Resample``)."""
    image = sitk.Image([int(s) for s in geometry.size], pixel_type)
    geometry.apply_to(image)
    return image


def resample(
    image: sitk.Image,
    target: Geometry,
    *,
    interpolator=sitk.sitkLinear,
    default_value: float | None = None,
    antialias: bool = True,
    transform: sitk.Transform | None = None,
) -> sitk.Image:
    """Resample ``image`` onto ``target`` in physical space.

    Args:
        interpolator: sitkLinear for images, sitkNearestNeighbor for label maps.
        default_value: value outside the input; the input's minimum by default (air for CT,
            background for MR).
        antialias: when the target is coarser than the input, blur first with a Gaussian
            whose FWHM makes up the difference, per axis: sigma = sqrt(t² - s²) / 2.355 mm
            for target spacing t and input spacing s, no blur along an axis already at
            least as coarse as the target (ignored for nearest-neighbour).
        transform: maps target points to input points; identity by default.
    """
    if default_value is None:
        default_value = float(np.min(sitk.GetArrayViewFromImage(image))) if interpolator != sitk.sitkNearestNeighbor else 0.0
    source = image
    if antialias and interpolator != sitk.sitkNearestNeighbor:
        target_mm = min(target.spacing)
        sigmas = [math.sqrt(max(target_mm**2 - s**2, 0.0)) / 2.355 for s in image.GetSpacing()]
        if any(s > 0.25 * sp for s, sp in zip(sigmas, image.GetSpacing())):
            source = _gaussian_blur(sitk.Cast(image, sitk.sitkFloat32), sigmas)
    pixel_type = sitk.sitkFloat32 if interpolator != sitk.sitkNearestNeighbor else image.GetPixelID()
    return sitk.Resample(
        source,
        reference_image(target, pixel_type),
        transform or sitk.Transform(),
        interpolator,
        default_value,
        pixel_type,
    )


#: ITK's recursive Gaussian needs at least this many voxels along an axis it blurs.
RECURSIVE_GAUSSIAN_MIN_VOXELS = 4


def _gaussian_blur(image: sitk.Image, sigmas: list[float]) -> sitk.Image:
    """Blur a float image with a Gaussian of ``sigmas`` mm along its index axes (x, y, z).

    A sigma of 0 leaves that axis alone: an axis already as coarse as the target (the 3 mm
    slices of a 0.7 x 0.7 x 3 mm CT resampled to 1 mm) needs no anti-aliasing, and ITK's
    recursive Gaussian refuses sigma 0 ("Sigma must be greater than zero"). So is an axis
    of fewer than 4 voxels (a 1-3 slice localizer), which the filter cannot process.
    """
    sigmas = [sigma if n >= RECURSIVE_GAUSSIAN_MIN_VOXELS else 0.0 for sigma, n in zip(sigmas, image.GetSize())]
    if all(sigma > 0 for sigma in sigmas):
        # One filter for all axes: the result stays bit-identical to earlier gvsl versions
        # (and so do cached preprocessing results); the per-axis path differs by ~1e-7.
        return sitk.SmoothingRecursiveGaussian(image, sigmas)
    for axis, sigma in enumerate(sigmas):
        if sigma > 0:
            image = sitk.RecursiveGaussian(image, sigma, False, sitk.RecursiveGaussianImageFilter.ZeroOrder, axis)
    return image


@dataclass(frozen=True)
class PreparedVolume:
    """A volume ready for the network, and how to get back to where it came from.

    Attributes:
        array: (D, H, W) float32 intensities in about [0, 1] on ``grid``; D = z.
        grid: the canonical grid (identity direction, isotropic spacing, sides % 16 == 0).
        original: the grid of the volume as read.
        modality: "ct" or "mr", the mapping actually used.
        detected: "ct" or "mr", what ``detect_modality`` makes of the raw intensities
            (differs from ``modality`` when a fixed mapping does not fit the volume).
    """

    array: np.ndarray
    grid: Geometry
    original: Geometry
    modality: str
    detected: str = ""

    def to_image(self) -> sitk.Image:
        """The prepared intensities as a SimpleITK image on the canonical grid."""
        image = sitk.GetImageFromArray(self.array)
        self.grid.apply_to(image)
        return image


def prepare(image: sitk.Image, config: PreprocessConfig, *, name: object = None) -> PreparedVolume:
    """Bring a 3D scalar image onto the canonical grid and map its intensities.

    Raises:
        InputError: from ``check_grid`` (named after ``name``, the file read), before any
            resampling, when the header's spacing makes no usable grid.
    """
    original = Geometry.of(image)
    grid = check_grid(original, config.spacing, config.multiple, name=name)
    raw = sitk.GetArrayViewFromImage(image)
    detected = detect_modality(raw)
    modality = detected if config.modality == "auto" else config.modality
    default = -1024.0 if modality == "ct" else float(np.min(raw))
    resampled = resample(sitk.Cast(image, sitk.sitkFloat32), grid, default_value=default)
    array = map_intensities(sitk.GetArrayFromImage(resampled), modality, config.mr_percentiles)
    return PreparedVolume(array=array, grid=grid, original=original, modality=modality, detected=detected)


def field_of_view_mask(original: Geometry, grid: Geometry) -> np.ndarray:
    """Which voxels of ``grid`` hold intensities of the image ``original``: (D, H, W) float32, 1 or 0.

    Inside means between the outermost voxel centres of ``original`` (continuous index in
    [0, n − 1) on every axis; an axis of one voxel keeps ITK's [−0.5, 0.5)). The rest of a
    canonical grid is the background ``prepare`` padded with (its sides are rounded up to a
    multiple of voxels, and an oblique image's box covers more than the image), and the
    half-voxel shell between the outer centres and the outer edges holds the edge voxels'
    values copied outwards (ITK's resampling clamps there), not anatomy: on a thin slab that
    copy is a large share of the voxels, and scoring it pulled the registration along z.
    """
    index_origin = [0.5 if n > 1 else 0.0 for n in original.size]
    inner = Geometry(
        size=tuple(max(n - 1, 1) for n in original.size),
        spacing=original.spacing,
        origin=tuple(float(v) for v in (original.index_to_physical() @ np.array([*index_origin, 1.0]))[:3]),
        direction=original.direction,
    )
    # ITK's inside rule [−0.5, m − 0.5) on the grid of the m = n − 1 cells between centres.
    ones = sitk.Image([int(s) for s in inner.size], sitk.sitkUInt8) + 1
    inner.apply_to(ones)
    mask = sitk.Resample(ones, reference_image(grid, sitk.sitkUInt8), sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(mask).astype(np.float32)


def to_original_grid(image_on_grid: sitk.Image, original: Geometry, *, labels: bool = False) -> sitk.Image:
    """Map an image computed on the canonical grid back onto the input's own grid.

    ``labels=True`` uses nearest neighbour so label values are kept.
    """
    interpolator = sitk.sitkNearestNeighbor if labels else sitk.sitkLinear
    return resample(image_on_grid, original, interpolator=interpolator, default_value=0.0, antialias=not labels)


def pad_to_multiple(shape: tuple[int, ...], multiple: int = 16) -> tuple[tuple[int, int], ...]:
    """(before, after) padding per axis that rounds each of ``shape`` up to ``multiple``."""
    pads = []
    for n in shape:
        extra = (-n) % multiple
        pads.append((extra // 2, extra - extra // 2))
    return tuple(pads)
