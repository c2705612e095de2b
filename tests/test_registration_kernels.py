"""The registration's fast kernels give the values of their plain formulations.

Each fast path (box sums by shifted additions, NCC with the fixed side precomputed, Gaussian
smoothing by matrix products, the B-spline histogram with a written-out gradient) is checked
against the straightforward code it replaced, values and gradients, on tiny volumes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gvsl_cli.losses import _sliding_box_sum, local_ncc_loss
from gvsl_cli.registration import gaussian_smooth, largest_vector_norm, smoothing_matrix
from gvsl_cli.similarity import Similarity, _cubic_bspline, box_sum, mutual_information_loss


def padded_gaussian(field: torch.Tensor, sigma: float) -> torch.Tensor:
    """The earlier ``gaussian_smooth``: replicate padding and a depthwise 1D conv3d per axis."""
    radius = max(1, int(math.ceil(2.5 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=field.dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = field.shape[1]
    out = field
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = kernel.numel()
        weight = kernel.view(1, 1, *shape).expand(channels, 1, *shape)
        pads = [0] * 6
        pads[2 * (2 - axis)] = pads[2 * (2 - axis) + 1] = radius
        out = F.conv3d(F.pad(out, pads, mode="replicate"), weight, groups=channels)
    return out


def per_offset_mutual_information(fixed: torch.Tensor, moved: torch.Tensor, bins: int = 32) -> torch.Tensor:
    """The earlier ``mutual_information_loss``: autograd through β³ at each of the four offsets."""
    width = bins + 2
    fixed_bin = (fixed.detach().float().clamp(0.0, 1.0) * (bins - 1)).round().long().reshape(-1) + 1
    position = moved.float().clamp(0.0, 1.0).reshape(-1) * (bins - 1)
    first = position.detach().floor().long() - 1
    joint = torch.zeros(width * width, dtype=position.dtype)
    for offset in range(4):
        moved_bin = first + offset
        weight = _cubic_bspline(position - moved_bin.to(position.dtype))
        joint = joint.index_add(0, fixed_bin * width + (moved_bin + 1).clamp(0, width - 1), weight)
    p = joint.view(width, width) / joint.sum()
    ratio = p / (p.sum(dim=1, keepdim=True) * p.sum(dim=0, keepdim=True)).clamp(min=1e-12)
    return -(p * torch.log(ratio.clamp(min=1e-12))).sum()


@pytest.mark.parametrize("window", [3, 5, 9])
def test_box_sum_equals_padded_window_sums(generator, window):
    # The z axis (3 voxels) is shorter than a 9³ window's radius.
    volumes = torch.rand(2, 1, 3, 7, 11, generator=generator, dtype=torch.float64)
    assert torch.allclose(box_sum(volumes, window), _sliding_box_sum(volumes, window), rtol=0, atol=1e-12)


@pytest.mark.parametrize("window", [3, 5])
def test_ncc_against_fixed_equals_local_ncc_value_and_gradient(generator, window):
    fixed = torch.rand(1, 1, 6, 9, 8, generator=generator, dtype=torch.float64)
    fixed[..., :2] = 0.25  # flat windows: clamped variances
    moved = (0.6 * fixed + 0.4 * torch.rand(fixed.shape, generator=generator, dtype=torch.float64)).requires_grad_(True)
    expected = local_ncc_loss(fixed, moved, window)
    (expected_gradient,) = torch.autograd.grad(expected, moved)
    loss = Similarity("ncc", window).against(fixed)(moved)
    (gradient,) = torch.autograd.grad(loss, moved)
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), abs=1e-14)
    assert torch.allclose(gradient, expected_gradient, rtol=1e-10, atol=1e-16)
    with torch.no_grad():  # no gradient wanted: the value alone
        assert float(Similarity("ncc", window).against(fixed)(moved)) == pytest.approx(float(expected.detach()), abs=1e-14)


def test_against_keeps_the_loss_of_other_metrics(generator):
    fixed = torch.rand(1, 1, 5, 6, 7, generator=generator)
    moved = torch.rand(1, 1, 5, 6, 7, generator=generator)
    similarity = Similarity("mse")
    assert float(similarity.against(fixed)(moved)) == float(similarity.loss(fixed, moved))


@pytest.mark.parametrize("sigma", [0.4, 0.8, 2.0])
def test_gaussian_smooth_equals_padded_convolutions(generator, sigma):
    # sigma 0.4 and 0.8 take the shifted sums, 2.0 the matrix products; the x axis (2
    # voxels) is shorter than the radius of sigma 2.0 (5 voxels).
    field = torch.randn(2, 3, 9, 7, 2, generator=generator, dtype=torch.float64)
    assert torch.allclose(gaussian_smooth(field, sigma), padded_gaussian(field, sigma), rtol=0, atol=1e-13)
    assert gaussian_smooth(field, 0.0) is field


def test_smoothing_matrix_rows_sum_to_one_and_replicate_the_border():
    kernel = torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64)
    matrix = smoothing_matrix(4, kernel)
    assert torch.allclose(matrix.sum(dim=1), torch.ones(4, dtype=torch.float64))
    assert matrix[0].tolist() == [0.75, 0.25, 0.0, 0.0]  # v[-1] is v[0]
    assert matrix[2].tolist() == [0.0, 0.25, 0.5, 0.25]


def test_largest_vector_norm(generator):
    field = torch.randn(1, 3, 4, 5, 6, generator=generator, dtype=torch.float64)
    assert float(largest_vector_norm(field)) == pytest.approx(float(field.norm(dim=1).max()), rel=1e-12)


def test_mutual_information_equals_the_per_offset_histogram(generator):
    fixed = torch.rand(1, 1, 10, 8, 6, generator=generator)
    moved = 0.7 * fixed + 0.3 * torch.rand(fixed.shape, generator=generator)
    # Both ends of the intensity range (clipped MR has many voxels exactly at 1), and beyond.
    moved[0, 0, 0, 0, :4] = torch.tensor([0.0, 1.0, 1.3, -0.2])
    moved.requires_grad_(True)
    for bins in (8, 32):
        expected = per_offset_mutual_information(fixed, moved, bins)
        (expected_gradient,) = torch.autograd.grad(expected, moved)
        loss = mutual_information_loss(fixed, moved, bins)
        (gradient,) = torch.autograd.grad(loss, moved)
        assert float(loss.detach()) == pytest.approx(float(expected.detach()), abs=1e-6)
        assert torch.allclose(gradient, expected_gradient, rtol=1e-4, atol=1e-7)
        assert gradient[0, 0, 0, 0, 2] == 0 and gradient[0, 0, 0, 0, 3] == 0  # clipped: no gradient
