"""Only voxels inside both fields of view are scored (review session 12, finding 1).

The working grids are the images' boxes rounded up to whole voxels of every level and filled
with background; a thin or cropped fixed image registered to the volume it was cut from
collapsed (Dice 1.000 -> 0.388 for a 5-slice slab) while the identity was the answer.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from gvsl_cli.geometry import Geometry
from gvsl_cli.preprocess import canonical_geometry, field_of_view_mask
from gvsl_cli.registration import RegistrationConfig
from gvsl_cli.similarity import Similarity, mutual_information_loss


def hand_weighted_ncc_loss(fixed: np.ndarray, moved: np.ndarray, weight: np.ndarray, window: int) -> float:
    """1 − Σ w·cc / Σ w with cc = cross²/(var_I·var_J + 1e-5) over the window³ box's valid
    points (each point y counted with w(y), none beyond the grid), the sums normalised to the
    full window (N/Σw), written with plain loops over (D, H, W) arrays."""
    radius = window // 2
    n = float(window**3)
    total = weighted = 0.0
    for z, y, x in itertools.product(*(range(s) for s in fixed.shape)):
        box = tuple(slice(max(c - radius, 0), c + radius + 1) for c in (z, y, x))
        v, i, j = weight[box], fixed[box], moved[box]
        count = v.sum()
        if count <= 1e-6:
            continue  # no valid point in the window: cc = 0 (and w = 0 at its centre)
        i_mean, j_mean = (v * i).sum() / count, (v * j).sum() / count
        scale = n / count
        cross = scale * (v * (i - i_mean) * (j - j_mean)).sum()
        var_i = scale * (v * (i - i_mean) ** 2).sum()
        var_j = scale * (v * (j - j_mean) ** 2).sum()
        cc = cross * cross / (var_i * var_j + 1e-5)
        weighted += weight[z, y, x] * cc
        total += weight[z, y, x]
    return 1.0 - weighted / total


def test_masked_similarities_equal_a_hand_computation(generator):
    fixed = torch.rand(1, 1, 4, 5, 6, generator=generator, dtype=torch.float64)
    moved = (0.5 * fixed + 0.5 * torch.rand(fixed.shape, generator=generator, dtype=torch.float64)).requires_grad_(True)
    weight = torch.ones_like(fixed)
    weight[:, :, 0] = 0.5  # coarse voxels half inside
    weight[..., :2] = 0.0  # "padding" columns
    expected = hand_weighted_ncc_loss(fixed[0, 0].numpy(), moved[0, 0].detach().numpy(), weight[0, 0].numpy(), 3)
    ncc = Similarity("ncc", 3)
    assert float(ncc.loss(fixed, moved.detach(), weight)) == pytest.approx(expected, abs=1e-12)
    assert float(ncc.against(fixed)(moved.detach(), weight)) == pytest.approx(expected, abs=1e-12)
    assert ncc.score(fixed, moved, weight) == pytest.approx(1.0 - expected, abs=1e-12)
    # The written-out gradient is the derivative of that value.
    assert torch.autograd.gradcheck(lambda m: ncc.against(fixed)(m, weight), (moved,), eps=1e-6, atol=1e-8)
    # A voxel of weight 0 is not scored at all: its moved value changes nothing.
    changed = moved.detach().clone()
    changed[..., :2] = 7.0
    assert float(ncc.loss(fixed, changed, weight)) == pytest.approx(expected, abs=1e-12)

    # MSE (and MIND, which compares descriptors with it): Σ w·Σ_c (m − f)² / (C·Σ w).
    features_f = torch.rand(1, 2, 4, 5, 6, generator=generator, dtype=torch.float64)
    features_m = torch.rand(1, 2, 4, 5, 6, generator=generator, dtype=torch.float64)
    squared = ((features_m - features_f) ** 2).sum(dim=1, keepdim=True)
    hand = float((squared * weight).sum() / (2 * weight.sum()))
    assert float(Similarity("mse").loss(features_f, features_m, weight)) == pytest.approx(hand, rel=1e-6)
    assert float(Similarity("mse").loss(features_f, features_m)) == pytest.approx(float(((features_m - features_f) ** 2).mean()), rel=1e-6)

    # Mutual information: weight 0 leaves a voxel out of the histogram, as if it were absent.
    inside = weight[0, 0] == 1.0
    binary = inside.to(fixed.dtype)[None, None]
    subset = mutual_information_loss(fixed[0, 0][inside].view(1, 1, -1), moved.detach()[0, 0][inside].view(1, 1, -1))
    assert float(mutual_information_loss(fixed, moved.detach(), weight=binary)) == pytest.approx(float(subset), abs=1e-6)


def test_field_of_view_mask_marks_the_voxels_between_the_outer_voxel_centres():
    # 5 slices of 2 mm: the canonical grid (multiple of 4) has 8 planes centred on the slab,
    # at continuous indices -1.5, -0.5, ..., 5.5 of the image, whose voxel centres are 0 .. 4.
    slab = Geometry(size=(6, 5, 5), spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    grid = canonical_geometry(slab, 2.0, 4)
    assert grid.size == (8, 8, 8)
    mask = field_of_view_mask(slab, grid)
    assert mask.shape == (8, 8, 8)
    # Along z (and y) planes 0.5 .. 3.5 hold interpolated anatomy; -0.5 only the copied edge
    # value, the rest padding. Along x (6 voxels) the planes sit at indices -1, 0, ..., 6:
    # 0 .. 4 count (index in [0, n − 1): the last centre itself, 5, is left out).
    assert mask[:, 4, 4].tolist() == [0, 0, 1, 1, 1, 1, 0, 0]
    assert mask[4, 4, :].tolist() == [0, 1, 1, 1, 1, 1, 0, 0]
    # A one-slice image keeps its slice thickness (ITK's inside rule on that axis).
    one = Geometry(size=(6, 5, 1), spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert field_of_view_mask(one, canonical_geometry(one, 1.0, 4))[:, 4, 4].tolist() == [0, 1, 1, 0]


def _cut(image: sitk.Image, size, start) -> sitk.Image:
    return sitk.RegionOfInterest(image, list(size), list(start))


def _register_cut(tmp_path, icbm_t1, icbm_labels, size, start, config: RegistrationConfig):
    """Register a cut of the 2 mm ICBM example (fixed) to the whole volume (moving)."""
    from gvsl_cli.registration_job import run_registration

    image, labels = sitk.ReadImage(str(icbm_t1)), sitk.ReadImage(str(icbm_labels))
    fixed, fixed_labels = tmp_path / "cut.nii.gz", tmp_path / "cut_labels.nii.gz"
    sitk.WriteImage(_cut(image, size, start), str(fixed))
    sitk.WriteImage(_cut(labels, size, start), str(fixed_labels))
    return run_registration(fixed, icbm_t1, tmp_path / "out", config=config, moving_labels_path=icbm_labels, fixed_labels_path=fixed_labels)


def test_thin_slab_registered_to_its_source_stays_at_the_identity(tmp_path, icbm_t1, icbm_labels):
    """5 slices (pads to 8 at 2 mm): before, Dice 1.000 -> 0.388 and a z scale of 0.858."""
    report = _register_cut(tmp_path, icbm_t1, icbm_labels, (98, 116, 5), (0, 0, 45), RegistrationConfig())
    affine = np.array(report["affine"])
    assert np.abs(affine[:3, :3] - np.eye(3)).max() < 0.01, affine
    assert np.abs(affine[:3, 3]).max() < 0.5, affine
    assert report["dice"]["mean_after"] > 0.98, report["dice"]
    # The reported similarity is scored on the same voxels: it does not fall below its start.
    similarity = report["similarity"]
    assert similarity["after"] >= similarity["before"] - 1e-3, similarity


def test_small_crop_registered_to_its_source_keeps_an_identity_affine(tmp_path, icbm_t1, icbm_labels):
    """A 20x20x5 crop (40 x 40 x 10 mm): before, the affine scaled z by 0.775 (Dice 0.642)."""
    report = _register_cut(tmp_path, icbm_t1, icbm_labels, (20, 20, 5), (35, 40, 40), RegistrationConfig(deformable=False))
    affine = np.array(report["affine"])
    assert np.abs(affine[:3, :3] - np.eye(3)).max() < 0.01, affine
    assert np.abs(affine[:3, 3]).max() < 0.5, affine
    assert report["dice"]["mean_after"] > 0.98, report["dice"]


def test_slab_moving_image_does_not_pull_its_edge_slices(icbm_t1):
    """A 12-slice slab as the *moving* image, registered onto the slab and 8 slices on each
    side of it: the identity is the answer. Before, fixed points mapped into the interpolated
    band at the slab's edge (a blend of the edge slice with the zeros beyond it) were scored
    by their share of the mask, and the edge slices moved by up to 3.3 mm (5.6 mm with the
    whole head as the fixed image); the middle ones by 0.8 mm, the self-registration drift."""
    from gvsl_cli.registration import register

    image = sitk.ReadImage(str(icbm_t1))
    width, height, _ = image.GetSize()
    moving = _cut(image, (width, height, 12), (0, 0, 41))
    fixed = _cut(image, (width, height, 28), (0, 0, 33))
    result = register(fixed, moving, RegistrationConfig())
    array = sitk.GetArrayViewFromImage(fixed)
    largest, means = [], []
    for z in range(8, 20):  # the slab's slices in the fixed image
        y, x = np.nonzero(array[z] > 0.1 * float(array.max()))
        index = np.stack([x, y, np.full_like(x, z)], axis=1).astype(float)
        points = np.array([fixed.TransformContinuousIndexToPhysicalPoint(tuple(p)) for p in index])
        distance = np.linalg.norm(result.transform.physical_points(torch.from_numpy(points).float()).double().numpy() - points, axis=1)
        largest.append(distance.max())
        means.append(distance.mean())
    edges = [0, 1, 2, 9, 10, 11]
    assert max(largest[i] for i in edges) < 2.0, largest
    assert max(means[i] for i in edges) < 0.5, means
    # The affine stage (mutual information, points counted by their mask share) is not
    # changed by this: it scales z by 0.990 here, as before.
    assert abs(result.transform.affine[2, 2] - 1.0) < 0.015, result.transform.affine


def test_a_moving_point_counts_only_where_its_interpolation_reads_no_background():
    """Between the outermost inside plane and the background fill (or the grid's end) the
    sampled intensity is a blend with zeros: such points are not scored, whatever their share."""
    from gvsl_cli.registration import Level

    grid_geometry = Geometry(size=(2, 2, 5), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    mask = torch.ones(1, 1, 5, 2, 2)
    mask[:, :, 4] = 0.0  # planes 0..3 inside (the half-open rule leaves the last centre out)
    volume = torch.zeros(1, 1, 5, 2, 2)
    level = Level(grid_geometry, grid_geometry, volume, volume, volume, volume, mask, mask)
    z = torch.tensor([-0.5, -1e-5, 0.0, 0.5, 3.0, 3.0004, 3.5, 4.0])  # continuous z indices
    grid = torch.zeros(1, z.numel(), 1, 1, 3)
    grid[..., 2] = (2.0 * z / 4.0 - 1.0).view(1, -1, 1, 1)
    inside = level.inside_moving(grid, whole=True).flatten().tolist()
    assert level.inside_moving(grid).flatten().tolist() == pytest.approx([0.5, 0.99999, 1.0, 1.0, 1.0, 0.9996, 0.5, 0.0], abs=1e-4)
    assert inside == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
