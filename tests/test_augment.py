"""Augmentations: draw then apply, deterministic per generator, identical warp for A, A', B."""

from __future__ import annotations

import torch

from gvsl_cli import augment
from gvsl_cli.augment import AppearanceConfig, PretrainAugmentation, SpatialConfig


def _images(generator, shape=(2, 1, 24, 24, 24)):
    return torch.rand(shape, generator=generator)


def test_zero_ranges_give_the_identity_warp(generator):
    still = SpatialConfig(rotation=0.0, scale=(1.0, 1.0), translation=0.0, shear=0.0, elastic_alpha=(0.0, 0.0))
    params = augment.draw_spatial(still, 2, (24, 24, 24), generator, "cpu")
    grid = augment.spatial_grid(params, (24, 24, 24), (24, 24, 24))
    images = _images(generator)
    assert torch.allclose(augment.apply_spatial(images, grid), images, atol=1e-5)


def test_margin_region_maps_the_patch_onto_the_centre_of_the_crop(generator):
    still = SpatialConfig(rotation=0.0, scale=(1.0, 1.0), translation=0.0, shear=0.0, elastic_alpha=(0.0, 0.0))
    params = augment.draw_spatial(still, 1, (16, 16, 16), generator, "cpu")
    grid = augment.spatial_grid(params, (16, 16, 16), (20, 20, 20))
    crop = _images(generator, (1, 1, 20, 20, 20))
    assert torch.allclose(augment.apply_spatial(crop, grid), crop[:, :, 2:18, 2:18, 2:18], atol=1e-5)


def test_rotations_stay_rigid_in_voxels_on_a_patch_that_is_not_cubic(generator):
    # Small data shrink one axis of the patch (48×64×64); a rotation drawn for normalised
    # coordinates used to become a ±10 % stretch there (singular values 1.107 / 0.904).
    import math

    turn = SpatialConfig(rotation=math.pi / 9, scale=(1.0, 1.0), translation=0.0, shear=0.0, elastic_alpha=(0.0, 0.0))
    shape = (48, 64, 64)
    params = augment.draw_spatial(turn, 3, shape, generator, "cpu")
    params.rotation = torch.tensor([[math.pi / 9, 0.0, 0.0], [0.0, math.pi / 9, 0.0], [0.1, -0.2, 0.3]])
    grid = augment.spatial_grid(params, shape, shape).double()  # (B, D, H, W, 3) normalised (x, y, z)
    voxels = (grid + 1) / 2 * torch.tensor([n - 1 for n in reversed(shape)], dtype=torch.float64)
    # Jacobian in voxels along x, y, z from unit steps of the output grid.
    origin = voxels[:, 10, 10, 10]
    jacobian = torch.stack([voxels[:, 10, 10, 11] - origin, voxels[:, 10, 11, 10] - origin, voxels[:, 11, 10, 10] - origin], dim=-1)
    singular = torch.linalg.svdvals(jacobian)
    assert torch.allclose(singular, torch.ones_like(singular), atol=1e-4), singular
    # A cubic patch keeps the drawn matrix exactly.
    cubic = augment.spatial_grid(params, (32, 32, 32), (32, 32, 32))
    from gvsl_cli import spatial

    theta = spatial.affine_matrix(params.rotation, params.scale, params.translation, params.shear)
    assert torch.equal(cubic, spatial.compose_grid(theta, torch.zeros(3, 3, 32, 32, 32)))


def test_same_generator_seed_same_output_and_other_seed_differs():
    a = _images(torch.Generator().manual_seed(1))
    b = _images(torch.Generator().manual_seed(2))
    run = PretrainAugmentation()
    first = run(a, b, (16, 16, 16), torch.Generator().manual_seed(7))
    again = run(a, b, (16, 16, 16), torch.Generator().manual_seed(7))
    other = run(a, b, (16, 16, 16), torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert not torch.allclose(first[0], other[0])


def test_one_spatial_transform_for_a_damaged_a_and_b(generator):
    # With B = A and no damage, the three outputs must be identical: one shared warp.
    no_damage = AppearanceConfig(shuffle_prob=0.0, bezier_prob=0.0, inpaint_continue=0.0)
    run = PretrainAugmentation(appearance=no_damage)
    a = _images(generator)
    out_a, out_damaged, out_b = run(a, a.clone(), (16, 16, 16), generator)
    assert torch.equal(out_a, out_b) and torch.equal(out_a, out_damaged)
    assert not torch.allclose(out_a, a[:, :, 4:20, 4:20, 4:20])  # it did move


def test_pixel_shuffling_permutes_within_tiles_only(generator):
    config = AppearanceConfig(shuffle_prob=1.0, shuffle_fraction=1.0, bezier_prob=0.0, inpaint_continue=0.0)
    images = _images(generator, (1, 1, 16, 16, 16))
    params = augment.draw_appearance(config, 1, (16, 16, 16), generator, "cpu")
    damaged = augment.apply_appearance(images, params)
    assert not torch.equal(damaged, images)
    s = params.tile
    for z in range(0, 16 - s + 1, s):
        tile_in = images[0, 0, z : z + s, :s, :s].flatten().sort().values
        tile_out = damaged[0, 0, z : z + s, :s, :s].flatten().sort().values
        assert torch.equal(tile_in, tile_out)


def test_bezier_mapping_is_monotonic_and_keeps_the_ends(generator):
    config = AppearanceConfig(shuffle_prob=0.0, bezier_prob=1.0, inpaint_continue=0.0)
    ramp = torch.linspace(0, 1, 16**3).view(1, 1, 16, 16, 16)
    params = augment.draw_appearance(config, 1, (16, 16, 16), generator, "cpu")
    mapped = augment.apply_appearance(ramp, params).flatten()
    assert (mapped[1:] - mapped[:-1] >= -1e-6).all()
    assert abs(mapped[0].item()) < 1e-3 and abs(mapped[-1].item() - 1) < 1e-3
    assert not torch.allclose(mapped, ramp.flatten(), atol=1e-2)


def test_inpainting_fills_boxes_with_noise_and_nothing_else(generator):
    config = AppearanceConfig(shuffle_prob=0.0, bezier_prob=0.0, inpaint_boxes=3, inpaint_continue=1.0)
    zeros = torch.zeros(2, 1, 20, 20, 20)
    params = augment.draw_appearance(config, 2, (20, 20, 20), generator, "cpu")
    damaged = augment.apply_appearance(zeros, params)
    mask = augment.box_mask(params.boxes, params.box_active, (20, 20, 20))
    assert mask.any()
    assert torch.equal(damaged[mask], params.noise[mask]) and (damaged[~mask] == 0).all()
    z0, z1 = params.boxes[0, 0, 0].tolist()
    y0, y1 = params.boxes[0, 0, 1].tolist()
    x0, x1 = params.boxes[0, 0, 2].tolist()
    assert mask[0, 0, z0:z1, y0:y1, x0:x1].all()


def test_elastic_field_is_smooth_and_in_the_official_amplitude(generator):
    config = SpatialConfig(elastic_alpha=(512.0, 512.0), elastic_sigma=(11.5, 11.5))
    params = augment.draw_spatial(config, 2, (48, 48, 48), generator, "cpu")
    field = torch.nn.functional.interpolate(params.elastic, size=(48, 48, 48), mode="trilinear", align_corners=True)
    # Official recipe (uniform noise, Gaussian σ 11.5, α 512) has a std of about 1.1 voxel.
    assert 0.5 < field.std().item() < 2.5
    assert (field[:, :, 1:] - field[:, :, :-1]).abs().max() < 0.5  # smooth: < 0.5 voxel per voxel


def test_damage_sizes_follow_the_patch_not_the_crop_around_it(generator, monkeypatch):
    # Pre-training damages the 160³ crop of a 128³ patch: tiles and boxes must have the
    # official sizes at 128³ (6³ tiles, box sides 12-25 voxels) and lie in the patch's part.
    config = AppearanceConfig(inpaint_boxes=30, inpaint_continue=1.0)
    params = augment.draw_appearance(config, 2, (160, 160, 160), generator, "cpu", patch=(128, 128, 128))
    assert params.tile == 6 and augment.shuffle_tile_size((160, 160, 160)) == 8
    sizes = params.boxes[..., 1] - params.boxes[..., 0]
    assert sizes.min() >= 12 and sizes.max() <= 25
    assert params.boxes[..., 0].min() >= 16 + 3 and params.boxes[..., 1].max() <= 16 + 128 - 3
    # The training augmentation measures the damage against its output patch.
    seen = []
    draw = augment.draw_appearance

    def spy(*args, **kwargs):
        seen.append((args[2], kwargs.get("patch")))
        return draw(*args, **kwargs)

    monkeypatch.setattr(augment, "draw_appearance", spy)
    crop = _images(generator, (1, 1, 20, 20, 20))
    PretrainAugmentation()(crop, crop.clone(), (16, 16, 16), generator)
    assert seen == [((20, 20, 20), (16, 16, 16))]
