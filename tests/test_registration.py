"""Registration engine: known affines and deformations recovered, physical-space outputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from gvsl_cli.errors import ConfigError, DeviceError
from gvsl_cli.geometry import Geometry
from gvsl_cli.io import read_volume
from gvsl_cli.registration import RegistrationConfig, _fit_spacing, register, resample_displacement
from gvsl_cli.similarity import MutualInformation, Similarity, mind_ssc, mutual_information_loss
from gvsl_cli.warping import field_from_map, grid_points, jacobian_statistics

#: Quick settings for tests: 4 mm working grid, one level.
QUICK = dict(spacing=4.0, levels=1)


def oblique_grid(image: sitk.Image, spacing=(2.5, 2.2, 3.0), angle_deg=12.0) -> Geometry:
    """A grid over the same anatomy with another spacing, origin and an oblique direction."""
    geometry = Geometry.of(image)
    a = math.radians(angle_deg)
    rotation = np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])
    direction = geometry.direction_matrix @ rotation
    centre = geometry.physical_corners().mean(axis=0)
    extent = np.asarray(geometry.size) * np.asarray(geometry.spacing)
    size = tuple(int(e / s) for e, s in zip(extent, spacing))
    origin = centre - direction @ (np.asarray(spacing) * (np.asarray(size) - 1) / 2.0)
    return Geometry(size=size, spacing=tuple(spacing), origin=tuple(origin), direction=tuple(direction.reshape(-1)))


def resample_on(image: sitk.Image, grid: Geometry, transform=None, *, labels=False) -> sitk.Image:
    reference = sitk.Image([int(s) for s in grid.size], sitk.sitkUInt8)
    grid.apply_to(reference)
    interpolator = sitk.sitkNearestNeighbor if labels else sitk.sitkLinear
    return sitk.Resample(image, reference, transform or sitk.Transform(), interpolator, 0.0, image.GetPixelID() if labels else sitk.sitkFloat32)


def brain_points(fixed: sitk.Image, threshold: float = 40.0) -> torch.Tensor:
    """Physical points (N, 3) of the fixed voxels brighter than ``threshold`` (head tissue)."""
    points = grid_points(Geometry.of(fixed))
    mask = torch.from_numpy(sitk.GetArrayFromImage(fixed) > threshold)
    return points[mask]


def test_known_affine_between_real_volumes_on_different_grids_is_recovered(icbm_t1):
    fixed = read_volume(icbm_t1)
    # φ_true maps fixed points to moving points: 5° about z, 4 % larger, shifted (mm).
    a = math.radians(5.0)
    true = np.eye(4)
    true[:3, :3] = 1.04 * np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    true[:3, 3] = (4.0, -6.0, 3.0)
    inverse = np.linalg.inv(true)
    to_fixed = sitk.AffineTransform(3)
    to_fixed.SetMatrix(inverse[:3, :3].reshape(-1).tolist())
    to_fixed.SetTranslation(inverse[:3, 3].tolist())
    # The moving image: the same anatomy seen through φ_true, on an oblique anisotropic grid.
    moving = resample_on(fixed, oblique_grid(fixed), to_fixed)
    result = register(fixed, moving, RegistrationConfig(iters=150, deformable=False, **QUICK))
    points = brain_points(fixed).double().numpy()
    estimated = points @ result.transform.affine[:3, :3].T + result.transform.affine[:3, 3]
    expected = points @ true[:3, :3].T + true[:3, 3]
    error = np.linalg.norm(estimated - expected, axis=1)
    assert error.mean() < 1.0, f"mean error {error.mean():.2f} mm"
    assert np.percentile(error, 95) < 2.0
    assert result.similarity["after"] > result.similarity["before"]


def test_default_affine_stage_recovers_a_known_anisotropic_scale_and_rotation(icbm_t1):
    fixed = read_volume(icbm_t1)
    # φ_true: 6° about x, 5 % smaller along x, 4 % larger along y, shifted (mm).
    a = math.radians(6.0)
    true = np.eye(4)
    true[:3, :3] = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]]) @ np.diag([0.95, 1.04, 1.0])
    true[:3, 3] = (-3.0, 2.0, 5.0)
    inverse = np.linalg.inv(true)
    to_fixed = sitk.AffineTransform(3)
    to_fixed.SetMatrix(inverse[:3, :3].reshape(-1).tolist())
    to_fixed.SetTranslation(inverse[:3, 3].tolist())
    moving = resample_on(fixed, Geometry.of(fixed), to_fixed)
    # The default affine stage (mutual information, 8 mm then 4 mm), the finer level read
    # through a random subset of its voxels.
    config = RegistrationConfig(spacing=4.0, deformable=False, affine_samples=20_000)
    assert isinstance(config.affine_measure(), MutualInformation)
    result = register(fixed, moving, config)
    assert result.stages[1:] == ["affine optimisation @ 8.00 mm", "affine optimisation @ 4.00 mm"]
    points = brain_points(fixed).double().numpy()
    estimated = points @ result.transform.affine[:3, :3].T + result.transform.affine[:3, 3]
    error = np.linalg.norm(estimated - (points @ true[:3, :3].T + true[:3, 3]), axis=1)
    assert error.mean() < 1.0, f"mean error {error.mean():.2f} mm"
    assert np.percentile(error, 95) < 1.5


def test_affine_only_beats_the_identity_between_a_skull_stripped_template_and_a_whole_head(tmp_path, icbm_t1, icbm_labels, colin_t1, colin_labels):
    """The demo pair: an NCC affine stage scaled Colin27 by 3–4 % (Dice 0.674 < 0.697 before).

    A linear map gains little on this pair (an affine fitted to the label maps themselves
    reaches 0.700, docs/registration.md): 0.703 while the padding and the points outside
    Colin27 were scored, 0.697 since only voxels inside both fields of view are.
    """
    from gvsl_cli.registration_job import run_registration

    report = run_registration(icbm_t1, colin_t1, tmp_path / "out", config=RegistrationConfig(deformable=False), moving_labels_path=colin_labels, fixed_labels_path=icbm_labels)
    assert report["dice"]["mean_after"] > report["dice"]["mean_before"] - 0.003, report["dice"]
    assert abs(np.linalg.det(np.array(report["affine"])[:3, :3]) - 1.0) < 0.05


def test_mutual_information_known_values(generator):
    image = torch.rand(1, 1, 16, 16, 16, generator=generator, dtype=torch.float64)
    same = mutual_information_loss(image, image)
    # MI depends on the joint histogram only: a one-to-one intensity map (1 − x maps bin k
    # onto bin 31 − k exactly) keeps it; independent noise has almost none.
    assert float(mutual_information_loss(image, 1.0 - image)) == pytest.approx(float(same), abs=1e-5)
    independent = mutual_information_loss(image, torch.rand(image.shape, generator=generator, dtype=torch.float64))
    assert float(same) < -2.0 and -0.6 < float(independent) < 0.0
    # Differentiable with respect to the moved image, and smallest at alignment.
    smooth = torch.nn.functional.avg_pool3d(image, 5, stride=1, padding=2)
    moved = smooth.clone().requires_grad_(True)
    mutual_information_loss(smooth, moved).backward()
    assert torch.isfinite(moved.grad).all() and moved.grad.abs().sum() > 0
    shifted = [float(mutual_information_loss(smooth, torch.roll(smooth, s, dims=4))) for s in (1, 2, 4)]
    assert float(mutual_information_loss(smooth, smooth)) < min(shifted)
    with pytest.raises(ConfigError, match="at least 4 bins"):
        MutualInformation(bins=2)
    with pytest.raises(ConfigError, match="affine_metric"):
        RegistrationConfig(affine_metric="cc")


def test_known_smooth_deformation_is_recovered(icbm_t1):
    fixed = read_volume(icbm_t1)
    geometry = Geometry.of(fixed)
    points = grid_points(geometry).double()
    # A smooth displacement (mm) D on the fixed grid; the moving image is M(y) = F(y + D(y)).
    centre = points.view(-1, 3).mean(0)
    relative = (points - centre) / 40.0
    true_d = torch.stack(
        [3.0 * torch.sin(relative[..., 1]), 2.5 * torch.cos(relative[..., 2]) - 2.5, 2.0 * torch.sin(relative[..., 0])], dim=-1
    )
    field = sitk.GetImageFromArray(true_d.numpy(), isVector=True)
    field.CopyInformation(fixed)
    moving = sitk.Resample(fixed, fixed, sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64)), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    # φ (fixed -> moving) is the inverse of y -> y + D(y): solve φ(x) = x − D(φ(x)) by fixed-point iteration.
    def d_at(p: torch.Tensor) -> torch.Tensor:
        q = p - centre
        r = q / 40.0
        return torch.stack([3.0 * torch.sin(r[:, 1]), 2.5 * torch.cos(r[:, 2]) - 2.5, 2.0 * torch.sin(r[:, 0])], dim=-1)

    x = brain_points(fixed).double()
    phi = x.clone()
    for _ in range(30):
        phi = x - d_at(phi)
    expected = (phi - x).float()
    result = register(fixed, moving, RegistrationConfig(iters=120, affine=False, spacing=2.0, levels=2))
    estimated = result.transform.physical_points(x.float()) - x.float()
    error = (estimated - expected).norm(dim=1)
    magnitude = expected.norm(dim=1)
    assert magnitude.mean() > 2.0  # a real deformation
    assert error.mean() < 0.35 * magnitude.mean(), f"mean error {error.mean():.2f} mm for {magnitude.mean():.2f} mm"
    assert result.similarity["after"] > result.similarity["after_affine"]


def test_identical_images_give_an_identity_map(icbm_t1):
    fixed = read_volume(icbm_t1)
    result = register(fixed, fixed, RegistrationConfig(iters=60, **QUICK))
    x = brain_points(fixed)
    error = (result.transform.physical_points(x) - x).norm(dim=1)
    # Sub-voxel on the 4 mm working grid.
    assert error.mean() < 0.5 and error.max() < 2.0, (float(error.mean()), float(error.max()))


def test_mse_and_mind_register_a_shifted_pair(icbm_t1):
    fixed = read_volume(icbm_t1)
    shift = sitk.TranslationTransform(3, (0.0, 6.0, 0.0))  # moving point y shows fixed point y + 6 mm
    moving = sitk.Resample(fixed, fixed, shift, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    for metric in ("mse", "mind"):
        result = register(fixed, moving, RegistrationConfig(similarity=metric, iters=100, deformable=False, **QUICK))
        # φ(x) = x − 6 mm along y.
        assert abs(result.transform.affine[1, 3] + 6.0) < 1.5, (metric, result.transform.affine[:3, 3])
        assert result.similarity["after"] < result.similarity["before"]


def test_mind_is_invariant_to_intensity_scaling_and_shift(generator):
    image = torch.rand(1, 1, 12, 13, 14, generator=generator)
    a = mind_ssc(image)
    b = mind_ssc(3.0 * image + 7.0)
    assert a.shape == (1, 12, 12, 13, 14)
    assert torch.allclose(a, b, atol=1e-4)
    assert a.max() <= 1.0 and a.min() > 0.0


def test_resample_displacement_keeps_physical_displacement():
    coarse = Geometry(size=(8, 9, 10), spacing=(4.0, 4.0, 4.0), origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    fine = Geometry(size=(16, 18, 20), spacing=(2.0, 2.0, 2.0), origin=(1.0, 1.0, 1.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    u = torch.zeros(1, 3, 10, 9, 8)
    u[:, 2] = 1.5  # 1.5 voxels of 4 mm along x = 6 mm
    resized = resample_displacement(u, coarse, fine)
    assert resized.shape == (1, 3, 20, 18, 16)
    assert torch.allclose(resized[:, 2], torch.full_like(resized[:, 2], 3.0), atol=1e-5)  # 3 voxels of 2 mm
    assert torch.allclose(resized[:, :2], torch.zeros_like(resized[:, :2]))


def test_jacobian_statistics_of_known_maps():
    grid = Geometry(size=(10, 11, 12), spacing=(2.0, 1.0, 3.0), origin=(5.0, -3.0, 1.0), direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))
    scaling = field_from_map(lambda p: 1.1 * p, grid)
    stats = jacobian_statistics(scaling, grid)
    assert stats["nonpositive_percent"] == 0.0
    assert abs(stats["mean_log_j"] - 3 * math.log(1.1)) < 1e-4 and stats["sd_log_j"] < 1e-4
    mirrored = field_from_map(lambda p: p * torch.tensor([-1.0, 1.0, 1.0]), grid)
    assert jacobian_statistics(mirrored, grid)["nonpositive_percent"] == 100.0


def test_memory_check_coarsens_or_refuses():
    grid = Geometry(size=(200, 200, 200), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    spacing, note = _fit_spacing(1.0, grid, 100 * 2**20, lambda voxels: voxels * 40, "test", lambda m: None)
    assert spacing > 1.0 and "not fit" in note
    assert _fit_spacing(1.0, grid, 2**40, lambda voxels: voxels * 40, "test", lambda m: None) == (1.0, None)
    with pytest.raises(DeviceError, match="GiB"):
        _fit_spacing(1.0, grid, 1000, lambda voxels: voxels * 40, "test", lambda m: None)


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="similarity"):
        RegistrationConfig(similarity="mutual-information")
    with pytest.raises(ConfigError, match="iters"):
        RegistrationConfig(iters=-1)
    with pytest.raises(ConfigError, match="window"):
        Similarity("ncc", 4)


def test_absurd_working_grids_are_config_errors_before_any_work(icbm_t1):
    from gvsl_cli.registration import MAX_WORKING_VOXELS, check_working_grids

    fixed = read_volume(icbm_t1)
    geometry = Geometry.of(fixed)
    check_working_grids(geometry, geometry, 1.0)  # a sensible grid passes
    with pytest.raises(ConfigError, match=r"working grid \(\S+ voxels\) for the fixed image") as caught:
        register(fixed, fixed, RegistrationConfig(spacing=1e-3, iters=1))
    assert "at least" in caught.value.hint and "--spacing" in caught.value.hint
    # The suggested spacing is accepted.
    suggested = float(caught.value.hint.split("at least ")[1].split(" mm")[0])
    check_working_grids(geometry, geometry, suggested)
    assert MAX_WORKING_VOXELS >= 100_000_000


def test_untrained_affine_note_depends_on_the_weights_kind():
    from gvsl_cli.registration import untrained_affine_note

    official = untrained_affine_note("official", optimised=True)
    own = untrained_affine_note("gvsl", optimised=False)
    assert "official GVSL code never trained it" in official and official.endswith("and optimisation")
    assert "official" not in own and "gvsl checkpoint" in own and not own.endswith("and optimisation")


def test_start_is_the_identity_or_the_centres_of_mass_whichever_fits_better(tmp_path, icbm_t1, icbm_labels, colin_t1, colin_labels):
    from gvsl_cli.registration_job import run_registration

    config = RegistrationConfig(iters=0)  # the start alone
    # Skull-stripped template vs whole head: the scalp pulls the centre of mass away, the
    # identity fits better (Dice 0.697, against 0.541 from the centre-of-mass translation).
    report = run_registration(icbm_t1, colin_t1, tmp_path / "same", config=config, moving_labels_path=colin_labels, fixed_labels_path=icbm_labels)
    assert report["stages"] == ["identity start"]
    assert any(note.startswith("affine start: the identity") for note in report["notes"])
    assert np.allclose(report["affine"], np.eye(4))
    assert report["dice"]["mean_after"] > 0.69
    # The moving image (and its labels) 30 mm away along x: the identity barely overlaps,
    # so the centre-of-mass translation is the start.
    shifted = {}
    for name, path in (("t1", colin_t1), ("labels", colin_labels)):
        image = sitk.ReadImage(str(path))
        origin = list(image.GetOrigin())
        origin[0] += 30.0
        image.SetOrigin(origin)
        shifted[name] = tmp_path / f"shifted_{name}.nii.gz"
        sitk.WriteImage(image, str(shifted[name]))
    report = run_registration(icbm_t1, shifted["t1"], tmp_path / "shifted", config=config, moving_labels_path=shifted["labels"], fixed_labels_path=icbm_labels)
    assert report["stages"] == ["moments"]
    assert any(note.startswith("affine start: the centre-of-mass translation") for note in report["notes"])
    assert abs(report["affine"][0][3] - 30.0) < 1.0
    assert report["dice"]["mean_after"] > report["dice"]["mean_before"] + 0.15


def test_a_start_without_overlap_loses_whatever_its_loss(tmp_path, icbm_t1, colin_t1):
    # 400 mm apart, the identity maps no fixed point into the moving image: MIND's mean of
    # squared differences over no point is 0, which would look like a perfect start.
    from gvsl_cli.registration_job import run_registration

    image = sitk.ReadImage(str(colin_t1))
    origin = list(image.GetOrigin())
    origin[0] += 400.0
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(tmp_path / "far.nii.gz"))
    report = run_registration(icbm_t1, tmp_path / "far.nii.gz", tmp_path / "far", config=RegistrationConfig(iters=0, similarity="mind"))
    assert report["stages"] == ["moments"], report["notes"]
    assert any(note.startswith("affine start: the centre-of-mass translation") and "overlap 0%)" in note for note in report["notes"])
    assert abs(report["affine"][0][3] - 400.0) < 10.0


def test_a_registration_resting_on_a_small_overlap_is_warned_about(tmp_path, icbm_t1, colin_t1):
    from gvsl_cli.registration_job import run_registration

    slab = sitk.ReadImage(str(colin_t1))[:, :, 40:50]  # 10 of 90 slices
    sitk.WriteImage(slab, str(tmp_path / "slab.nii.gz"))
    report = run_registration(icbm_t1, tmp_path / "slab.nii.gz", tmp_path / "slab", config=RegistrationConfig(iters=0))
    assert any(note.startswith("only ") and "of the fixed image maps inside the moving image" in note for note in report["notes"]), report["notes"]
    whole = run_registration(icbm_t1, colin_t1, tmp_path / "whole", config=RegistrationConfig(iters=0))
    assert not any("maps inside the moving image" in note for note in whole["notes"])


def test_automatic_spacing_of_a_micrometre_image_is_not_zero_and_grids_are_named():
    from gvsl_cli.errors import InputError
    from gvsl_cli.registration import automatic_spacing, check_working_grids

    identity = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    micro = Geometry(size=(45, 54, 45), spacing=(0.004, 0.004, 0.004), origin=(0.0, 0.0, 0.0), direction=identity)
    assert automatic_spacing(micro, 1_600_000) == 0.01  # rounded to 0.01 mm, never to 0
    head = Geometry(size=(45, 54, 45), spacing=(4.0, 4.0, 4.0), origin=(0.0, 0.0, 0.0), direction=identity)
    with pytest.raises(ConfigError, match=r"^head.nii.gz: a working spacing of 0.01 mm makes .* for the moving image \(spacing 4x4x4 mm") as caught:
        check_working_grids(micro, head, 0.01, names=("micro.nii.gz", "head.nii.gz"), automatic=True)
    assert "headers" in caught.value.hint
    tiny = Geometry(size=(45, 54, 45), spacing=(1e-9, 4.0, 4.0), origin=(0.0, 0.0, 0.0), direction=identity)
    with pytest.raises(InputError, match=r"^tiny.mha: spacing 1e-09x4x4 mm"):
        check_working_grids(tiny, head, 4.0, names=("tiny.mha", "head.nii.gz"))
