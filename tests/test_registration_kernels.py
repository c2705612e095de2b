"""The registration's fast kernels give the values of their plain formulations.

Each fast path (Gaussian smoothing by matrix products or shifted sums, the largest vector
norm) is checked against the straightforward code it replaced, on tiny volumes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gvsl_cli.registration import gaussian_smooth, largest_vector_norm, smoothing_matrix


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
