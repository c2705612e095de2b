"""Transforms on real grids: ITK displacement fields, resampling that matches ITK, quality metrics.

A *field* here is ITK's displacement convention: a (D, H, W, 3) float32 tensor of physical
displacements (x, y, z) in mm on a target grid, such that target point x maps to the source
point x + d(x) (``DisplacementFieldTransform``, ANTs). Resampling through a field follows
ITK's rules exactly (so a field written by gvsl and applied by SimpleITK or ANTs reproduces
gvsl's own output):

- linear: a point is inside when its continuous index lies in [−0.5, n − 0.5) on every
  axis; neighbours beyond the edge are clamped to it; outside points get a default value;
- nearest: the index is rounded half up (floor(i + 0.5)), same inside rule; label values are
  copied, never interpolated.

Large grids are processed in slabs of z slices, so memory stays bounded.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

from gvsl_cli import spatial
from gvsl_cli.geometry import Geometry

#: z slices per slab: about 40 MB of float32 points per slab for a 256 x 256 in-plane grid.
SLAB_VOXELS = 4_000_000


def _slabs(geometry: Geometry):
    per_slice = geometry.size[0] * geometry.size[1]
    step = max(1, SLAB_VOXELS // max(per_slice, 1))
    for start in range(0, geometry.size[2], step):
        yield start, min(start + step, geometry.size[2])


def grid_points(geometry: Geometry, z_range: tuple[int, int] | None = None, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Physical points (mm, x y z) of the voxels of ``geometry``: (D, H, W, 3) of ``dtype``.

    ``z_range`` = (start, stop) restricts to a slab of z slices.
    """
    start, stop = z_range or (0, geometry.size[2])
    nx, ny, _ = geometry.size
    k, j, i = torch.meshgrid(
        torch.arange(start, stop, device=device, dtype=torch.float64),
        torch.arange(ny, device=device, dtype=torch.float64),
        torch.arange(nx, device=device, dtype=torch.float64),
        indexing="ij",
    )
    index = torch.stack([i, j, k], dim=-1)
    matrix = torch.as_tensor(geometry.index_to_physical(), dtype=torch.float64, device=device)
    return (index @ matrix[:3, :3].T + matrix[:3, 3]).to(dtype)


def field_from_map(point_map: Callable[[torch.Tensor], torch.Tensor], target: Geometry, *, device=None) -> torch.Tensor:
    """Evaluate a point map (N, 3) mm -> (N, 3) mm on ``target``: the field (D, H, W, 3) mm."""
    slabs = []
    for start, stop in _slabs(target):
        points = grid_points(target, (start, stop), device=device)
        mapped = point_map(points.view(-1, 3)).view(points.shape)
        slabs.append(mapped - points)
    return torch.cat(slabs, dim=0)


def _continuous_index(points: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    matrix = torch.as_tensor(geometry.physical_to_index(), dtype=points.dtype, device=points.device)
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def _inside(index: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    size = torch.tensor(geometry.size, dtype=index.dtype, device=index.device)
    return ((index >= -0.5) & (index < size - 0.5)).all(dim=-1)


def _volume_tensor(image: sitk.Image, *, labels: bool, device) -> torch.Tensor:
    array = sitk.GetArrayFromImage(image)
    if labels and array.dtype.kind in "iu":
        # torch lacks some unsigned types; int64 holds every ITK integer label exactly.
        array = array.astype(np.int64)
    elif not labels:
        array = array.astype(np.float32)
    return torch.from_numpy(array).to(device)


def resample_through_field(
    image: sitk.Image,
    field: torch.Tensor,
    target: Geometry,
    *,
    labels: bool = False,
    default_value: float = 0.0,
) -> sitk.Image:
    """``image`` resampled on ``target`` through ``field`` (D, H, W, 3) mm, as ITK would.

    Images are interpolated linearly into float32; label maps (``labels=True``) by nearest
    neighbour into their own pixel type, so label values survive unchanged.
    """
    device = field.device
    source = Geometry.of(image)
    volume = _volume_tensor(image, labels=labels, device=device)
    out = torch.empty(target.shape_zyx, dtype=volume.dtype, device=device)
    for start, stop in _slabs(target):
        # float64 points and indices, as ITK computes them: rounding to the nearest label
        # then agrees with SimpleITK even for points that fall almost halfway.
        points = grid_points(target, (start, stop), device=device, dtype=torch.float64) + field[start:stop].double()
        index = _continuous_index(points.view(-1, 3), source)
        inside = _inside(index, source)
        if labels:
            nearest = torch.floor(index + 0.5).long()
            for axis in range(3):
                nearest[:, axis].clamp_(0, source.size[axis] - 1)
            values = volume[nearest[:, 2], nearest[:, 1], nearest[:, 0]]
        else:
            sizes = torch.tensor(source.size, dtype=index.dtype, device=device)
            normalized = 2.0 * index / (sizes - 1).clamp(min=1) - 1.0
            # Border padding clamps the neighbours to the edge: ITK's rule inside [−0.5, n−0.5).
            values = spatial.sample(volume[None, None], normalized.float().view(1, -1, 1, 1, 3), padding_mode="border").view(-1)
        values = torch.where(inside, values, torch.as_tensor(default_value, dtype=values.dtype, device=device))
        out[start:stop] = values.view(stop - start, *target.shape_zyx[1:])
    result = sitk.GetImageFromArray(out.cpu().numpy())
    if labels:
        result = sitk.Cast(result, image.GetPixelID())
    target.apply_to(result)
    return result


def field_image(field: torch.Tensor, target: Geometry) -> sitk.Image:
    """The field as an ITK displacement image (3-vector float32 per voxel, mm) on ``target``."""
    image = sitk.GetImageFromArray(field.detach().float().cpu().numpy(), isVector=True)
    target.apply_to(image)
    return image


def field_from_image(image: sitk.Image, *, device=None) -> torch.Tensor:
    """A displacement image (vector, mm) as a (D, H, W, 3) float32 tensor."""
    return torch.from_numpy(sitk.GetArrayFromImage(image).astype(np.float32)).to(device)


def affine_transform(affine: np.ndarray) -> sitk.AffineTransform:
    """A (4, 4) physical affine (fixed point -> moving point) as an ITK AffineTransform."""
    transform = sitk.AffineTransform(3)
    transform.SetMatrix([float(v) for v in affine[:3, :3].reshape(-1)])
    transform.SetTranslation([float(v) for v in affine[:3, 3]])
    return transform


def jacobian_statistics(field: torch.Tensor, target: Geometry) -> dict[str, float]:
    """Folding and smoothness of the map x ↦ x + d(x) over the interior voxels of ``target``.

    The Jacobian is J = I + ∂d/∂x in physical units (central differences on the index grid,
    times the inverse of direction·spacing), so it includes the affine part's volume change.

    Returns:
        nonpositive_percent: % of voxels with det J <= 0 (folding);
        sd_log_j: standard deviation of log(det J), det J clipped to [1e-9, 1e9];
        mean_log_j: its mean (0 = no overall volume change).
    """
    if min(field.shape[:3]) < 3:
        return {"nonpositive_percent": 0.0, "sd_log_j": 0.0, "mean_log_j": 0.0}
    index_to_mm = target.direction_matrix @ np.diag(target.spacing)
    # float32 is plenty for determinants of near-identity 3x3 matrices; sums go to float64.
    inverse = torch.as_tensor(np.linalg.inv(index_to_mm), dtype=torch.float32, device=field.device)
    eye = torch.eye(3, dtype=torch.float32, device=field.device)
    count = folded = 0
    total = total_sq = 0.0
    depth = field.shape[0]
    for start, stop in _slabs(target):
        lo, hi = max(start, 1), min(stop, depth - 1)
        if lo >= hi:
            continue
        slab = field[lo - 1 : hi + 1].float()
        # ∂d/∂index along x (W), y (H), z (D), interior voxels: (n, h, w, 3 components).
        dx = (slab[1:-1, 1:-1, 2:] - slab[1:-1, 1:-1, :-2]) / 2.0
        dy = (slab[1:-1, 2:, 1:-1] - slab[1:-1, :-2, 1:-1]) / 2.0
        dz = (slab[2:, 1:-1, 1:-1] - slab[:-2, 1:-1, 1:-1]) / 2.0
        gradient = torch.stack([dx, dy, dz], dim=-1)  # [..., component, index axis]
        determinant = torch.linalg.det(eye + gradient @ inverse)
        folded += int((determinant <= 0).sum())
        log_j = torch.log(determinant.clamp(1e-9, 1e9))
        total += float(log_j.double().sum())
        total_sq += float((log_j.double() ** 2).sum())
        count += determinant.numel()
    mean = total / max(count, 1)
    variance = max(total_sq / max(count, 1) - mean * mean, 0.0)
    return {"nonpositive_percent": 100.0 * folded / max(count, 1), "sd_log_j": math.sqrt(variance), "mean_log_j": mean}


def label_key(value) -> int | float:
    """A label value as a Python number: an int when it is integral (2.0 -> 2), else the exact
    float (1.5 stays 1.5), so two labels of a float label map never share a name."""
    number = value.item() if hasattr(value, "item") else value
    if isinstance(number, float) and number.is_integer():
        return int(number)
    return number


def dice_scores(fixed_labels: np.ndarray, moved_labels: np.ndarray) -> dict[int | float, float]:
    """Dice of every non-zero label of ``fixed_labels`` against ``moved_labels`` (same shape).

    Keys are ``label_key`` of the values: ints for integral labels, exact floats otherwise.
    """
    scores = {}
    for label in np.unique(fixed_labels):
        if label == 0:
            continue
        a = fixed_labels == label
        b = moved_labels == label
        scores[label_key(label)] = float(2.0 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1))
    return scores


# --------------------------------------------------------------------------- saved transforms

#: The file a ``gvsl register`` output folder holds the complete transform in.
REGISTRATION_FIELD_NAME = "displacement.nii.gz"
#: Written last by ``gvsl register``: its presence means the folder holds a complete run.
REGISTRATION_REPORT_NAME = "report.json"
#: The affine stage A alone (fixed point -> moving point), already inside the field.
REGISTRATION_AFFINE_NAME = "affine.tfm"


def deformable_part(field: sitk.Image, affine: sitk.Transform) -> sitk.Image:
    """The field v with x + d(x) = A(x + v(x)) at every node x of ``field`` (d, mm).

    ``gvsl register``'s field d holds the whole transform φ(x) = A·(x + v(x)). Applied as
    the ITK composite [A, v] it gives the same points on the field's grid (trilinear
    interpolation commutes with the affine map, so between nodes too), and outside the
    grid, where a displacement field transform gives 0, the affine A still applies instead
    of the identity: a larger ``-r`` grid than the fixed image's is mapped by the affine
    there, as ANTs' separate affine and warp are.

    Args:
        field: 3-vector image (float64), fixed point + d = moving point.
        affine: an ITK affine transform (matrix M, centre c, translation t).

    Returns:
        A 3-vector float64 image on ``field``'s grid.
    """
    affine = sitk.AffineTransform(affine)
    matrix = np.array(affine.GetMatrix(), dtype=np.float64).reshape(3, 3)
    centre = np.array(affine.GetCenter(), dtype=np.float64)
    offset = centre + np.array(affine.GetTranslation(), dtype=np.float64)
    inverse = np.linalg.inv(matrix)
    geometry = Geometry.of(field)
    total = sitk.GetArrayViewFromImage(field)  # (z, y, x, 3), x y z components
    residual = np.empty(total.shape, dtype=np.float64)
    to_physical = np.array(geometry.direction, dtype=np.float64).reshape(3, 3) * np.array(geometry.spacing, dtype=np.float64)
    nx, ny, nz = (int(n) for n in geometry.size)
    ix, iy = np.meshgrid(np.arange(nx, dtype=np.float64), np.arange(ny, dtype=np.float64), indexing="xy")
    for z in range(nz):  # a slice at a time: a 1 mm field is ~17 M points
        index = np.stack([ix, iy, np.full_like(ix, z)], axis=-1)  # (y, x, 3)
        points = index @ to_physical.T + np.array(geometry.origin, dtype=np.float64)
        moving = points + total[z]
        residual[z] = (moving - offset) @ inverse.T + centre - points
    image = sitk.GetImageFromArray(residual, isVector=True)
    image.CopyInformation(field)
    return image


#: Fixed-point iterations and tolerances (mm) of a displacement field's inversion (ITK's
#: InvertDisplacementFieldImageFilter, its defaults). The boundary, held at 0, keeps the
#: largest error above any tolerance, so all iterations run; inside, a smooth field of up to
#: 6 mm composed with its inverse is within 0.004 mm of the identity after 20 iterations,
#: as after 100, in a fifth of the time.
INVERSION_ITERATIONS = 20
INVERSION_MEAN_TOLERANCE_MM = 1e-3
INVERSION_MAX_TOLERANCE_MM = 0.1


def inverse_field(field: sitk.Image) -> sitk.Image:
    """The displacement field u on ``field``'s grid with y + u(y) = x wherever y = x + d(x)
    (d = ``field``, mm, float64 3-vectors): the inverse transform, on the same grid.

    The inverse is found there only: it is right for fields that move points by less than
    the grid's extent minus the anatomy (a register folder's deformable part v), not for
    one that holds a large affine (``displacement.nii.gz`` of a pair far apart).
    """
    inverter = sitk.InvertDisplacementFieldImageFilter()
    inverter.SetMaximumNumberOfIterations(INVERSION_ITERATIONS)
    inverter.SetMeanErrorToleranceThreshold(INVERSION_MEAN_TOLERANCE_MM)
    inverter.SetMaxErrorToleranceThreshold(INVERSION_MAX_TOLERANCE_MM)
    return inverter.Execute(sitk.Cast(field, sitk.sitkVectorFloat64))


def _inverted_unit(unit: list[sitk.Transform], path) -> list[sitk.Transform]:
    """The inverse of one path's transforms, in CompositeTransform add order: the unit
    [T1, T2] maps x to T1(T2(x)), so its inverse is [T2⁻¹, T1⁻¹]."""
    from gvsl_cli.errors import InputError

    inverted = []
    for transform in reversed(unit):
        if isinstance(transform, sitk.DisplacementFieldTransform):
            inverted.append(sitk.DisplacementFieldTransform(inverse_field(transform.GetDisplacementField())))
            continue
        try:
            inverted.append(transform.GetInverse())
        except RuntimeError:
            raise InputError(f"{path}: this transform cannot be inverted ({transform.GetName()})", hint="give transforms that are affine, displacement fields or gvsl register folders") from None
    return inverted


def read_transform_chain(paths: list, *, inverse: bool = False) -> tuple[sitk.Transform, Geometry | None]:
    """Read transforms given like ``antsApplyTransforms -t``: the first one is applied first
    to output points.

    ``-t warp -t affine`` maps an output point x to affine(warp(x)), as ANTs does (its
    registrations are applied as ``-t 1Warp.nii.gz -t 0GenericAffine.mat``): seen from the
    moving image, the last transform acts first, which is what ANTs' "applied in reverse
    order" means. ITK's CompositeTransform applies the transform added *last* first, so the
    paths are added in reverse order; a register folder's pair [A, v] stays one unit.

    ``inverse``: the inverse of the whole chain (each transform inverted, the order
    reversed), which maps fixed-image data (atlas labels) onto the moving image's grid;
    displacement fields are inverted numerically (``inverse_field``). No output grid is
    returned then: the fields live on the fixed grid, the outputs belong on another.

    Each path is a complete ``gvsl register`` output folder (its ``displacement.nii.gz``; the
    folder must hold ``report.json``), a displacement field image (3-vector, mm; ITK
    convention), or an ITK transform file (.tfm, .txt, .mat, .h5).

    Returns:
        The composite transform (output point -> input point) and, when the first path
        is a displacement field or a register folder, its field's grid: the natural output
        grid, since the first transform acts on output points. None otherwise (a field
        further down the chain lives in another image's space).

    Raises:
        InputError: a path that is missing or is neither of those, or a register folder
            without ``report.json``.
    """
    from pathlib import Path

    from gvsl_cli.errors import InputError
    from gvsl_cli.io import read_transform_file, read_volume, volume_suffix

    if not paths:
        raise InputError("no transform given", hint="pass -t with a gvsl register output folder, a displacement field or an ITK transform file")
    units: list[list[sitk.Transform]] = []  # per path, in CompositeTransform add order
    reference = None
    for raw in paths:
        path = Path(raw)
        first = not units
        if path.is_dir():
            field_path = path / REGISTRATION_FIELD_NAME
            if not field_path.is_file():
                raise InputError(f"{path}: folder holds no {REGISTRATION_FIELD_NAME}", hint="give the output folder of gvsl register, or the transform files themselves")
            # gvsl register writes report.json last: without it the folder holds no complete
            # run (interrupted, or left from an earlier run), so its field is not trusted
            # silently; naming the file itself is the explicit way to use it anyway.
            if not (path / REGISTRATION_REPORT_NAME).is_file():
                raise InputError(
                    f"{path}: folder holds no {REGISTRATION_REPORT_NAME}, so no complete gvsl register run",
                    hint=f"rerun gvsl register into it, or give {field_path} itself to use that field anyway",
                )
            affine_path = path / REGISTRATION_AFFINE_NAME
            if affine_path.is_file():
                # As [A, v]: the same transform on the field's grid, the affine beyond it.
                field = sitk.Cast(read_volume(field_path, vector=True), sitk.sitkVectorFloat64)
                try:
                    affine = sitk.AffineTransform(read_transform_file(affine_path))
                except RuntimeError as exc:
                    detail = (str(exc).strip().splitlines() or [""])[-1][:160]
                    raise InputError(f"{affine_path}: cannot read as an ITK affine transform ({detail})") from None
                if first:
                    reference = Geometry.of(field)
                units.append([affine, sitk.DisplacementFieldTransform(deformable_part(field, affine))])  # v first, then A
                continue
            path = field_path
        if not path.exists():
            raise InputError(f"{path}: no such transform file or folder")
        if volume_suffix(path) is not None:
            field = read_volume(path, vector=True)
            if first:
                reference = Geometry.of(field)
            units.append([sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))])
            continue
        if path.suffix.lower() not in (".tfm", ".txt", ".mat", ".h5"):
            raise InputError(f"{path}: not a transform: expected a displacement field image or an ITK transform file (.tfm, .txt, .mat, .h5)")
        try:
            units.append([read_transform_file(path)])
        except RuntimeError as exc:
            detail = (str(exc).strip().splitlines() or [""])[-1][:160]
            raise InputError(f"{path}: cannot read as an ITK transform ({detail})") from None
    # ITK applies the transform added last first.
    if inverse:
        # (T1 ∘ ... ∘ Tn)⁻¹ = Tn⁻¹ ∘ ... ∘ T1⁻¹: Tn⁻¹ acts first on output points, so the
        # inverted units go in path order.
        add_order = [_inverted_unit(unit, path) for unit, path in zip(units, paths)]
        reference = None
    else:
        add_order = units[::-1]  # the first path acts first on output points: added last
    composite = sitk.CompositeTransform(3)
    for unit in add_order:
        for transform in unit:
            composite.AddTransform(transform)
    return composite, reference


def apply_transform(image: sitk.Image, transform: sitk.Transform, reference: Geometry, *, labels: bool) -> sitk.Image:
    """Resample ``image`` on ``reference`` through ``transform`` (reference point -> image point).

    Label maps by nearest neighbour in their own pixel type (values kept, 0 outside); images
    linearly into float32 with the image's minimum outside, exactly as ``gvsl register``
    writes ``moved.nii.gz``.
    """
    grid = sitk.Image([int(s) for s in reference.size], sitk.sitkUInt8)
    reference.apply_to(grid)
    if labels:
        return sitk.Resample(image, grid, transform, sitk.sitkNearestNeighbor, 0, image.GetPixelID())
    background = float(np.min(sitk.GetArrayViewFromImage(image)))
    return sitk.Resample(image, grid, transform, sitk.sitkLinear, background, sitk.sitkFloat32)
