"""Known answers for the grid convention, warping, affines and physical conversions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gvsl_cli import spatial
from gvsl_cli.geometry import Geometry


def smooth_volume(shape=(12, 14, 16), generator=None) -> torch.Tensor:
    g = generator or torch.Generator().manual_seed(1)
    coarse = torch.rand(1, 1, 4, 4, 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)


def test_zero_displacement_is_identity(generator):
    image = torch.rand(2, 3, 9, 10, 11, generator=generator)
    warped = spatial.warp(image, torch.zeros(2, 3, 9, 10, 11))
    assert torch.allclose(warped, image, atol=1e-6)


def test_integer_shift_is_reproduced_exactly(generator):
    image = torch.rand(1, 1, 10, 12, 14, generator=generator)
    shift = (2, -1, 3)  # voxels along (z, y, x)
    u = torch.zeros(1, 3, 10, 12, 14)
    for axis, s in enumerate(shift):
        u[:, axis] = s
    warped = spatial.warp(image, u)
    # out(p) = image(p + s) where p + s is inside the image.
    expected = image[:, :, 2:, : 12 - 1, 3:]
    got = warped[:, :, : 10 - 2, 1:, : 14 - 3]
    assert torch.allclose(got, expected, atol=1e-5)
    # Outside the moving image: zeros.
    assert torch.all(warped[:, :, 10 - 2 :] == 0)


def test_identity_parameters_give_identity_matrix():
    b = 3
    theta = spatial.affine_matrix(torch.zeros(b, 3), torch.ones(b, 3), torch.zeros(b, 3), torch.zeros(b, 6))
    assert theta.shape == (b, 3, 4)
    assert torch.allclose(theta, spatial.identity_theta(b), atol=1e-7)


def test_affine_matrix_rotation_about_z():
    angle = 0.3
    rotation = torch.tensor([[0.0, 0.0, angle]])
    theta = spatial.affine_matrix(rotation, torch.ones(1, 3), torch.tensor([[0.1, 0.2, 0.3]]), torch.zeros(1, 6))
    c, s = math.cos(angle), math.sin(angle)
    expected = torch.tensor([[[c, -s, 0, 0.1], [s, c, 0, 0.2], [0, 0, 1, 0.3]]])
    assert torch.allclose(theta, expected, atol=1e-6)


def test_affine_matrix_batched_and_differentiable():
    rotation = torch.randn(4, 3, requires_grad=True)
    scale = torch.ones(4, 3, requires_grad=True)
    translation = torch.randn(4, 3, requires_grad=True)
    shear = torch.randn(4, 6, requires_grad=True) * 0.1
    shear.retain_grad()
    theta = spatial.affine_matrix(rotation, scale, translation, shear)
    theta.square().sum().backward()
    for t in (rotation, scale, translation, shear):
        assert t.grad is not None and torch.count_nonzero(t.grad) > 0


def test_identity_affine_warp_is_identity(generator):
    image = torch.rand(2, 1, 8, 9, 10, generator=generator)
    assert torch.allclose(spatial.warp_affine(image, spatial.identity_theta(2)), image, atol=1e-5)


def test_compose_matches_two_step_warp():
    # A linear ramp is interpolated exactly, so one resampling and two agree wherever
    # every sample falls inside the image.
    shape = (12, 14, 16)
    coords = spatial.voxel_grid(shape)
    image = (0.3 * coords[:, :1] + 0.2 * coords[:, 1:2] - 0.1 * coords[:, 2:]) / 10
    theta = spatial.affine_matrix(torch.tensor([[0.05, -0.03, 0.1]]), torch.tensor([[1.05, 0.95, 1.0]]), torch.tensor([[0.02, 0.0, -0.03]]), torch.zeros(1, 6))
    u = 0.8 * torch.sin(coords / 4.0)
    grid = spatial.compose_grid(theta, u)
    one_step = spatial.sample(image, grid)
    # B∘Aff first, then by u: (B∘Aff)(p + u(p)).
    two_step = spatial.warp(spatial.warp_affine(image, theta), u)
    inside = (grid.abs() < 0.75).all(dim=-1) & (spatial.voxel_to_normalized(coords + u).abs() < 0.75).all(dim=-1)
    assert inside.sum() > 200
    assert torch.allclose(one_step[0, 0][inside[0]], two_step[0, 0][inside[0]], atol=1e-5)


def test_voxel_normalized_round_trip():
    coords = spatial.voxel_grid((5, 6, 7)) + 0.3
    grid = spatial.voxel_to_normalized(coords)
    assert grid.shape == (1, 5, 6, 7, 3)
    # The corner voxel (0, 0, 0) maps to (-1, -1, -1) plus the offset.
    back = spatial.normalized_to_voxel(grid, (5, 6, 7))
    assert torch.allclose(back, coords, atol=1e-5)


def test_theta_to_voxel_matrix_agrees_with_sampling():
    theta = spatial.affine_matrix(torch.tensor([[0.1, 0.0, 0.2]]), torch.tensor([[1.1, 1.0, 0.9]]), torch.tensor([[0.1, -0.1, 0.0]]), torch.zeros(1, 6))
    fixed_shape, moving_shape = (6, 7, 8), (9, 10, 11)
    grid = spatial.affine_grid(theta, fixed_shape)
    from_grid = spatial.normalized_to_voxel(grid, moving_shape)
    matrix = spatial.theta_to_voxel_matrix(theta, fixed_shape, moving_shape)[0]
    coords = spatial.voxel_grid(fixed_shape)[0].reshape(3, -1)
    mapped = (matrix[:3, :3] @ coords + matrix[:3, 3:]).reshape(3, *fixed_shape)
    assert torch.allclose(mapped, from_grid[0], atol=1e-4)


def test_resize_displacement_keeps_a_constant_shift_in_physical_terms():
    u = torch.zeros(1, 3, 9, 9, 9)
    u[:, 2] = 2.0  # 2 voxels along x over 9 voxels (8 intervals)
    resized = spatial.resize_displacement(u, (17, 17, 17))
    assert torch.allclose(resized[:, 2], torch.full_like(resized[:, 2], 4.0), atol=1e-5)


def test_jacobian_of_zero_and_of_scaling():
    assert torch.allclose(spatial.jacobian_determinant(torch.zeros(1, 3, 6, 6, 6)), torch.ones(1, 4, 4, 4))
    coords = spatial.voxel_grid((6, 6, 6))
    u = 0.5 * coords  # p -> 1.5 p: determinant 1.5³
    assert torch.allclose(spatial.jacobian_determinant(u), torch.full((1, 4, 4, 4), 1.5**3), atol=1e-5)


def test_physical_displacement_of_identity_is_zero_across_different_grids():
    fixed = Geometry(size=(4, 5, 6), spacing=(2.0, 1.0, 3.0), origin=(10.0, -5.0, 3.0), direction=(-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
    # Moving grid: another spacing/origin/direction; map each fixed voxel to the moving voxel at the same point.
    moving = Geometry(size=(8, 8, 8), spacing=(1.0, 1.0, 1.0), origin=(0.0, -20.0, -5.0), direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    coords = spatial.voxel_grid(fixed.shape_zyx, dtype=torch.float64)[0].reshape(3, -1).numpy()
    xyz = coords[::-1]
    points = fixed.index_to_physical() @ np.vstack([xyz, np.ones((1, xyz.shape[1]))])
    moving_xyz = (moving.physical_to_index() @ points)[:3]
    moving_zyx = torch.from_numpy(moving_xyz[::-1].copy()).reshape(1, 3, *fixed.shape_zyx)
    field = spatial.voxel_map_to_physical_displacement(moving_zyx, fixed, moving)
    assert field.shape == (*fixed.shape_zyx, 3)
    assert np.abs(field).max() < 1e-9
    # A one-voxel shift along moving x is +1 mm along physical x (identity direction).
    field = spatial.voxel_map_to_physical_displacement(moving_zyx + torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).view(1, 3, 1, 1, 1), fixed, moving)
    assert np.allclose(field[..., 0], 1.0) and np.allclose(field[..., 1:], 0.0)


def test_shape_errors_name_the_expected_shape():
    with pytest.raises(ValueError, match=r"\(B, 3, D, H, W\)"):
        spatial.warp(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 2, 4, 4, 4))


def test_grid_stays_float32_under_bf16_autocast():
    # A bf16 grid is off by up to half a voxel at 128 voxels; compose_grid must not round.
    displacement = torch.zeros(1, 3, 8, 8, 128, dtype=torch.bfloat16)
    theta = torch.eye(3, 4).unsqueeze(0)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        grid = spatial.compose_grid(theta, displacement)
    assert grid.dtype == torch.float32
    x = torch.arange(128, dtype=torch.float32) * 2 / 127 - 1
    assert torch.allclose(grid[0, 0, 0, :, 0], x, atol=1e-6)
    image = torch.rand(1, 2, 8, 8, 128).to(torch.bfloat16)
    assert spatial.sample(image, grid).dtype == torch.float32
