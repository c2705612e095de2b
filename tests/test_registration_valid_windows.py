"""Local NCC over the valid points of each window (partial fields of view).

The fast NCC (``similarity._NCCAgainstFixed`` with ``ValidWindowStatistics``) is checked
against a plain implementation differentiated by autograd, in float64; with every point
valid it gives today's NCC; and a moving image that stops inside the fixed one no longer
pulls the fixed edge.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gvsl_cli.losses import NCC_EPS, _ncc_from_sums, _sliding_box_sum, local_ncc_loss
from gvsl_cli.similarity import FixedWindowStatistics, Similarity, ValidWindowStatistics, ncc_against_fixed


def plain_window_sum(volume: torch.Tensor, window: int) -> torch.Tensor:
    """Sum over a window³ box around every voxel (zero outside the grid): one dense convolution."""
    kernel = torch.ones(1, 1, window, window, window, dtype=volume.dtype)
    return F.conv3d(volume, kernel, padding=window // 2)


def plain_valid_ncc_map(fixed: torch.Tensor, moved: torch.Tensor, weight: torch.Tensor, window: int) -> torch.Tensor:
    """Squared local NCC (B, 1, D, H, W) with each window point counted with ``weight`` v:
    weighted means Ī = Σv·I/Σv (J̄ alike), cross = N/Σv·Σv·(I − Ī)(J − J̄), var_I and var_J
    alike (N = window³), cc = cross²/(var_I·var_J + ε); 0 where Σv = 0. Written the direct way
    (centred products) for autograd."""
    count = plain_window_sum(weight, window)
    safe = count.clamp(min=1e-300)
    i_mean = plain_window_sum(weight * fixed, window) / safe
    j_mean = plain_window_sum(weight * moved, window) / safe
    scale = torch.where(count > 1e-6, window**3 / safe, torch.zeros_like(count))
    # Σ v·(I − Ī)(J − J̄) = Σ v·IJ − Ī·Σ v·J (the centre's means are constants of its window).
    cross = scale * (plain_window_sum(weight * fixed * moved, window) - i_mean * plain_window_sum(weight * moved, window))
    var_i = (scale * (plain_window_sum(weight * fixed * fixed, window) - i_mean * plain_window_sum(weight * fixed, window))).clamp(min=0)
    var_j = (scale * (plain_window_sum(weight * moved * moved, window) - j_mean * plain_window_sum(weight * moved, window))).clamp(min=0)
    return cross * cross / (var_i * var_j + NCC_EPS)


def plain_valid_ncc_loss(fixed, moved, weight, window) -> torch.Tensor:
    return 1.0 - (weight * plain_valid_ncc_map(fixed, moved, weight, window)).sum() / weight.sum()


def _pair(generator, shape=(1, 1, 5, 6, 7)):
    fixed = torch.rand(shape, generator=generator, dtype=torch.float64)
    moved = 0.6 * fixed + 0.4 * torch.rand(shape, generator=generator, dtype=torch.float64)
    return fixed, moved


@pytest.mark.parametrize("window", [3, 5])
def test_valid_window_ncc_equals_the_plain_formula_value_and_gradient(generator, window):
    fixed, moved = _pair(generator)
    # Fractional weights (coarse levels average the masks), a zero band (outside the moving
    # image) and a flat fixed patch (clamped variance).
    weight = torch.rand(fixed.shape, generator=generator, dtype=torch.float64)
    weight[:, :, 0] = 1.0
    weight[..., :2] = 0.0
    fixed[:, :, 2:, :3, 3:] = 0.25
    moved.requires_grad_(True)
    expected = plain_valid_ncc_loss(fixed, moved, weight, window)
    (expected_gradient,) = torch.autograd.grad(expected, moved)
    loss = Similarity("ncc", window).against(fixed)(moved, weight)
    (gradient,) = torch.autograd.grad(loss, moved)
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), abs=1e-12)
    assert torch.allclose(gradient, expected_gradient, rtol=1e-9, atol=1e-14)
    assert torch.autograd.gradcheck(lambda m: Similarity("ncc", window).against(fixed)(m, weight), (moved,), eps=1e-6, atol=1e-8)
    # Points of weight 0 get no gradient and change nothing.
    assert torch.all(gradient[..., :2] == 0)
    changed = moved.detach().clone()
    changed[..., :2] = 7.0
    assert float(Similarity("ncc", window).loss(fixed, changed, weight)) == pytest.approx(float(expected.detach()), abs=1e-12)


@pytest.mark.parametrize("window", [3, 5])
def test_all_points_valid_gives_todays_ncc(generator, window):
    fixed, moved = _pair(generator, (1, 1, 8, 9, 10))
    weight = torch.ones_like(fixed)
    # Per voxel: every window that lies inside the grid is today's window, to rounding.
    today = _ncc_from_sums(*_sliding_box_sum(torch.cat([fixed, moved, fixed * fixed, moved * moved, fixed * moved]), window).split(1), window)
    valid = plain_valid_ncc_map(fixed, moved, weight, window)
    r = window // 2
    inner = (slice(None), slice(None), slice(r, -r), slice(r, -r), slice(r, -r))
    assert torch.allclose(valid[inner], today[inner], rtol=0, atol=1e-12)
    # The fast path gives the plain formula's value, windows at the grid border included
    # (there the points beyond the grid are not counted: they are not valid points).
    fast = float(ncc_against_fixed(FixedWindowStatistics.of(fixed, window), moved, weight))
    assert fast == pytest.approx(float(plain_valid_ncc_loss(fixed, moved, weight, window)), abs=1e-12)
    # The fast path's fixed statistics are today's inside the grid.
    statistics = ValidWindowStatistics.of(FixedWindowStatistics.of(fixed, window), weight)
    today_fixed = FixedWindowStatistics.of(fixed, window)
    assert torch.equal(statistics.scale[inner], torch.ones_like(statistics.scale[inner]))
    assert torch.allclose(statistics.variance[inner], today_fixed.variance[inner], rtol=0, atol=1e-12)
    # At the grid border the two differ by design: today's windows count the points beyond
    # the grid as zeros, the valid windows leave them out.
    assert float(local_ncc_loss(fixed, moved, window)) != pytest.approx(fast, abs=1e-6)


def test_the_valid_statistics_are_reused_until_the_weight_changes(generator, monkeypatch):
    import gvsl_cli.similarity as similarity

    fixed, moved = _pair(generator)
    weight = torch.ones_like(fixed)
    calls = []
    original = similarity.ValidWindowStatistics.of
    monkeypatch.setattr(similarity.ValidWindowStatistics, "of", classmethod(lambda cls, f, w: calls.append(1) or original(f, w)))
    loss = Similarity("ncc", 3).against(fixed)
    first = float(loss(moved, weight))
    loss(moved, weight)
    assert len(calls) == 1
    weight[..., :3] = 0.0  # changed in place: recomputed
    second = float(loss(moved, weight))
    assert len(calls) == 2
    assert second == pytest.approx(float(plain_valid_ncc_loss(fixed, moved, weight, 3)), abs=1e-12)
    assert second != pytest.approx(first, abs=1e-6)
    loss(moved, weight.clone())
    assert len(calls) == 3


def test_zeros_beyond_the_moving_edge_do_not_pull_a_window(generator):
    """A moved image that stops inside the fixed one: the windows at its edge are scored on
    the moved anatomy alone, so the identity stays the best match (the NCC of the valid part
    is 1), where zero-filled windows preferred a shifted edge."""
    fixed = torch.rand(1, 1, 10, 6, 6, generator=generator, dtype=torch.float64) + 0.5
    inside = torch.zeros_like(fixed)
    inside[:, :, :6] = 1.0  # the moving image covers slices 0..5 only
    moved = fixed * inside  # sampled with zero padding beyond its edge
    valid = Similarity("ncc", 3).loss(fixed, moved, inside)
    # Every scored window holds the fixed intensities on its valid points: cc = var²/(var² + ε).
    statistics = ValidWindowStatistics.of(FixedWindowStatistics.of(fixed, 3), inside)
    perfect = statistics.variance**2 / (statistics.variance**2 + NCC_EPS)
    assert float(valid) == pytest.approx(float(1 - (perfect * inside).sum() / inside.sum()), abs=1e-12)
