"""The preprocessing contract: canonical grid, intensity mappings, and the way back."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from gvsl_cli.config import PreprocessConfig
from gvsl_cli.errors import ConfigError
from gvsl_cli.geometry import Geometry
from gvsl_cli.io import read_volume
from gvsl_cli.preprocess import canonical_geometry, detect_modality, map_intensities, prepare, to_original_grid


def test_ct_mapping_is_the_papers():
    hu = np.array([-2000.0, -1024.0, 0.0, 1024.0, 3000.0])
    assert np.allclose(map_intensities(hu, "ct"), [0.0, 0.0, 0.5, 1.0, 1.0])


def test_mr_mapping_uses_robust_percentiles():
    array = np.concatenate([np.zeros(1000), np.linspace(10, 110, 10001), [1e6]])
    mapped = map_intensities(array, "mr", (0.0, 100.0 * 10000 / 10001))
    assert mapped.min() == 0.0 and mapped.max() == 1.0
    assert abs(mapped[1000 + 5000] - 0.5) < 0.01  # the median of the foreground maps to about 0.5


def test_detect_modality():
    assert detect_modality(np.array([-1024.0, 40.0])) == "ct"
    assert detect_modality(np.array([0.0, 0.8])) == "mr"


def test_canonical_grid_is_isotropic_identity_multiple_of_16_and_covers_the_volume():
    geometry = Geometry(size=(50, 60, 20), spacing=(0.8, 0.8, 3.0), origin=(10, 20, 30), direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))
    grid = canonical_geometry(geometry, spacing=1.5)
    assert grid.spacing == (1.5, 1.5, 1.5)
    assert grid.direction == (1, 0, 0, 0, 1, 0, 0, 0, 1)
    assert all(s % 16 == 0 for s in grid.size)
    corners = geometry.physical_corners()
    centre_low = np.array(grid.origin)
    centre_high = centre_low + 1.5 * (np.array(grid.size) - 1)
    # The canonical voxels (boxes of 1.5 mm) cover every source voxel centre.
    assert np.all(corners >= centre_low - 0.75) and np.all(corners <= centre_high + 0.75)
    # Centred: the two grids share their centre.
    assert np.allclose(0.5 * (centre_low + centre_high), 0.5 * (corners.min(0) + corners.max(0)), atol=1e-6)


def test_prepare_real_mr_then_back_to_original_grid(colin_t1):
    image = read_volume(colin_t1)
    prepared = prepare(image, PreprocessConfig(spacing=2.0, modality="auto"))
    assert prepared.modality == "mr"
    assert prepared.array.shape == prepared.grid.shape_zyx
    assert all(s % 16 == 0 for s in prepared.array.shape)
    assert 0.0 <= prepared.array.min() and prepared.array.max() <= 1.0
    back = to_original_grid(prepared.to_image(), prepared.original)
    assert Geometry.of(back).is_close(Geometry.of(image))
    # Going to the canonical grid and back at the same spacing costs little: correlation ~1.
    original = map_intensities(sitk.GetArrayFromImage(image), "mr")
    restored = sitk.GetArrayFromImage(back)
    assert np.corrcoef(original.ravel(), restored.ravel())[0, 1] > 0.97


def test_labels_go_back_with_their_values(colin_labels):
    labels = read_volume(colin_labels)
    image = sitk.Cast(labels, sitk.sitkFloat32)
    grid = canonical_geometry(Geometry.of(image), spacing=2.0)
    from gvsl_cli.preprocess import resample

    on_grid = resample(labels, grid, interpolator=sitk.sitkNearestNeighbor)
    back = to_original_grid(on_grid, Geometry.of(labels), labels=True)
    assert set(np.unique(sitk.GetArrayFromImage(back))) <= set(np.unique(sitk.GetArrayFromImage(labels)))
    # Same spacing, grids aligned on voxel centres: the round trip is exact.
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(labels))


def test_bad_preprocess_config():
    for spacing in (0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ConfigError, match="spacing must be a finite number > 0 mm"):
            PreprocessConfig(spacing=spacing)
    with pytest.raises(ConfigError, match="modality must be one of"):
        PreprocessConfig(modality="pet")


def anisotropic_volume() -> sitk.Image:
    """A 0.7 x 0.7 x 3 mm volume (the usual clinical CT) of fine in-plane noise, one
    constant offset per slice (10 * k), so a blur across slices would show."""
    rng = np.random.default_rng(3)
    array = rng.normal(size=(12, 40, 40)).astype(np.float32) + 10.0 * np.arange(12, dtype=np.float32)[:, None, None]
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 0.7, 3.0))
    return image


def test_anisotropic_volume_is_blurred_in_plane_only():
    # The slice axis (3 mm) is already coarser than the 1 mm target: its sigma is 0, which
    # ITK's Gaussian refuses; gvsl must skip that axis and blur the in-plane ones.
    from gvsl_cli.preprocess import resample

    image = anisotropic_volume()
    source = Geometry.of(image)
    # Target: 1 mm, origin on the source's, so every third target slice lies on a source slice.
    target = Geometry(size=(28, 28, 34), spacing=(1.0, 1.0, 1.0), origin=source.origin, direction=source.direction)
    out = sitk.GetArrayFromImage(resample(image, target))
    plain = sitk.GetArrayFromImage(resample(image, target, antialias=False))
    # No blur across slices: on a source slice the mean is that slice's offset exactly.
    assert np.allclose(out[::3].mean(axis=(1, 2)), plain[::3].mean(axis=(1, 2)), atol=0.05)
    assert np.allclose(out[::3].mean(axis=(1, 2)), 10.0 * np.arange(12), atol=0.2)
    # In-plane blur: the 0.7 mm noise is smoothed before going to 1 mm.
    assert out[::3].std(axis=(1, 2)).mean() < 0.9 * plain[::3].std(axis=(1, 2)).mean()


@pytest.mark.parametrize("spacing", [1.0, 2.5])
def test_prepare_anisotropic_volume(spacing):
    prepared = prepare(anisotropic_volume(), PreprocessConfig(spacing=spacing, modality="mr"))
    assert all(s % 16 == 0 for s in prepared.array.shape)
    assert np.isfinite(prepared.array).all()


def test_isotropic_blur_unchanged():
    # Where every axis needs a blur the result is today's: one SmoothingRecursiveGaussian.
    from gvsl_cli.preprocess import resample

    image = sitk.GetImageFromArray(np.random.default_rng(4).normal(size=(20, 20, 20)).astype(np.float32))
    image.SetSpacing((0.8, 0.8, 0.8))
    target = canonical_geometry(Geometry.of(image), spacing=2.0)
    sigma = np.sqrt(2.0**2 - 0.8**2) / 2.355
    reference = sitk.Image([int(s) for s in target.size], sitk.sitkFloat32)
    target.apply_to(reference)
    expected = sitk.Resample(
        sitk.SmoothingRecursiveGaussian(image, [sigma] * 3), reference, sitk.Transform(), sitk.sitkLinear,
        float(sitk.GetArrayViewFromImage(image).min()), sitk.sitkFloat32,
    )
    assert np.array_equal(sitk.GetArrayFromImage(resample(image, target)), sitk.GetArrayFromImage(expected))


@pytest.mark.parametrize("slices", [1, 2, 3])
def test_a_localizer_of_few_slices_is_prepared(slices):
    # ITK's recursive Gaussian cannot blur an axis of fewer than 4 voxels (it raised for
    # 1-3 slices); that axis is left unblurred, the others are still anti-aliased.
    image = sitk.GetImageFromArray(np.random.default_rng(5).random((slices, 64, 64)).astype(np.float32) * 100)
    image.SetSpacing((0.5, 0.5, 1.0))
    prepared = prepare(image, PreprocessConfig(spacing=2.0, modality="mr"))
    assert prepared.array.shape == (16, 16, 16)
    assert np.isfinite(prepared.array).all()
    if slices > 1:  # one slice lies between the 2 mm grid's planes: nothing of it is sampled
        assert prepared.array.max() > 0


# --------------------------------------------------------------------------- extreme header geometry (review_inputs_s14 I8)


def _geometry(spacing, size=(45, 54, 45)):
    from gvsl_cli.geometry import Geometry

    return Geometry(size=size, spacing=spacing, origin=(0.0, 0.0, 0.0), direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))


@pytest.mark.parametrize(
    "spacing, words",
    [
        ((1e-9, 4.0, 4.0), r"scan.nii: spacing 1e-09x4x4 mm, a box of 4.5e-08x216x180 mm: voxels finer than 1e-06 mm are not credible"),
        ((0.004, 0.004, 0.004), r"scan.nii: spacing 0.004x0.004x0.004 mm, a box of 0.18x0.216x0.18 mm: the whole image fits in one voxel of the 1 mm canonical grid"),
        ((200.0, 200.0, 200.0), r"scan.nii: spacing 200x200x200 mm, a box of 9000x10800x9000 mm: longer than any body or specimen \(5 m at most"),
        ((1e9, 4.0, 4.0), r"scan.nii: spacing 1e\+09x4x4 mm, a box of 4.5e\+10x216x180 mm: longer than any body"),
    ],
)
def test_grid_check_refuses_extreme_header_spacing_in_one_line(spacing, words):
    from gvsl_cli.errors import InputError
    from gvsl_cli.preprocess import check_grid

    with pytest.raises(InputError, match=words) as caught:
        check_grid(_geometry(spacing), 1.0, name="scan.nii")
    assert "\n" not in str(caught.value) and "mm" in caught.value.hint


def test_whole_body_ct_at_a_fine_spacing_is_not_refused_but_a_mistyped_spacing_is():
    # A 512×512×2000 CT (0.8×0.8×0.5 mm, a 1 m box) at 0.75 mm is 421 M voxels: resampled,
    # not dropped (pretrain) or blamed on its header; --spacing 0.1 is refused, naming the way.
    from gvsl_cli.errors import InputError
    from gvsl_cli.preprocess import check_grid

    body = _geometry((0.8, 0.8, 0.5), size=(512, 512, 2000))
    assert check_grid(body, 0.75).size == (560, 560, 1344)
    with pytest.raises(InputError, match="at most 2e\\+09 are allowed") as caught:
        check_grid(body, 0.1)
    assert caught.value.hint == "use a coarser --spacing"


def test_grid_check_passes_ordinary_grids_and_refuses_a_zero_spacing():
    from gvsl_cli.errors import ConfigError
    from gvsl_cli.preprocess import canonical_geometry, check_grid

    geometry = _geometry((4.0, 4.0, 4.0))
    assert check_grid(geometry, 1.0) == canonical_geometry(geometry, 1.0)
    thin = _geometry((0.8, 0.8, 3.0), size=(256, 256, 1))  # a one-slice localizer stays usable
    assert check_grid(thin, 4.0).size == (64, 64, 16)
    with pytest.raises(ConfigError, match="a working spacing of 0 mm cannot hold an image"):
        check_grid(geometry, 0.0, kind="working", error=ConfigError)


def test_prepare_refuses_a_nanometre_spacing_before_itk_does():
    from gvsl_cli.errors import InputError

    image = sitk.Image(8, 8, 8, sitk.sitkFloat32)
    image.SetSpacing((1e-9, 4.0, 4.0))
    with pytest.raises(InputError, match="not credible"):
        prepare(image, PreprocessConfig(spacing=4.0), name="tiny.mha")
