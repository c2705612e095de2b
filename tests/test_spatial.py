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


def test_normalized_to_physical_maps_the_corner_voxels():
    geometry = Geometry(size=(4, 5, 6), spacing=(2.0, 1.0, 3.0), origin=(10.0, -5.0, 3.0), direction=(-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
    to_mm = geometry.normalized_to_physical()
    # (-1, -1, -1) is the centre of voxel (0, 0, 0): the origin; (1, 1, 1) the last voxel.
    assert np.allclose(to_mm @ [-1, -1, -1, 1], [*geometry.origin, 1])
    last = geometry.index_to_physical() @ [3, 4, 5, 1]
    assert np.allclose(to_mm @ [1, 1, 1, 1], last)
    assert np.allclose(geometry.physical_to_normalized() @ last, [1, 1, 1, 1])


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
