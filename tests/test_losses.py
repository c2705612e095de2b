"""NCC by box sums equals the five-convolution definition; known values of every loss."""

from __future__ import annotations

import math

import pytest
import torch

from gvsl_cli import losses


def test_box_ncc_equals_dense_definition_float64(generator):
    fixed = torch.rand(2, 1, 20, 18, 22, generator=generator, dtype=torch.float64)
    moving = 0.5 * fixed + 0.5 * torch.rand(2, 1, 20, 18, 22, generator=generator, dtype=torch.float64)
    fast = losses.local_ncc_loss(fixed, moving)
    dense = losses.local_ncc_loss_dense(fixed, moving)
    assert fast.dtype == torch.float64
    assert abs(fast.item() - dense.item()) < 1e-5
    assert abs(fast.item() - dense.item()) < 1e-10  # in fact to rounding


def test_ncc_of_image_with_itself_is_zero(generator):
    image = torch.rand(1, 1, 16, 16, 16, generator=generator)
    assert abs(losses.local_ncc_loss(image, image).item()) < 1e-3


def test_ncc_with_independent_noise_is_near_one(generator):
    # Zero-mean noise, so the zero padding at the borders does not correlate the two.
    a = torch.randn(1, 1, 32, 32, 32, generator=generator)
    b = torch.randn(1, 1, 32, 32, 32, generator=generator)
    # The squared correlation of independent noise over 729 samples is about 1/729.
    assert losses.local_ncc_loss(a, b).item() > 0.97


def test_ncc_is_invariant_to_intensity_scaling(generator):
    a = torch.rand(1, 1, 16, 16, 16, generator=generator, dtype=torch.float64)
    b = torch.rand(1, 1, 16, 16, 16, generator=generator, dtype=torch.float64)
    assert abs(losses.local_ncc_loss(a, b).item() - losses.local_ncc_loss(a, 3 * b).item()) < 1e-3


def test_ncc_gradient_flows(generator):
    a = torch.rand(1, 1, 12, 12, 12, generator=generator)
    b = torch.rand(1, 1, 12, 12, 12, generator=generator, requires_grad=True)
    losses.local_ncc_loss(a, b).backward()
    assert b.grad is not None and torch.count_nonzero(b.grad) > 0


def test_mse_known_value():
    assert losses.mse_loss(torch.zeros(1, 1, 2, 2, 2), torch.full((1, 1, 2, 2, 2), 3.0)).item() == 9.0


def test_smoothness_of_constant_and_linear_fields():
    assert losses.smoothness_loss(torch.full((1, 3, 5, 5, 5), 7.0)).item() == 0.0
    u = torch.zeros(1, 3, 5, 5, 5)
    u[:, 0] = torch.arange(5.0).view(5, 1, 1)  # forward differences of 1 along z only
    # mean over z-differences: component 0 has 1, components 1-2 have 0 -> 1/3; divided by 3.
    assert abs(losses.smoothness_loss(u).item() - (1 / 3) / 3) < 1e-7


def test_box_ncc_float32_stays_close_to_float64_reference(generator):
    fixed = torch.rand(1, 1, 40, 40, 40, generator=generator, dtype=torch.float64)
    moving = 0.7 * fixed + 0.3 * torch.rand(1, 1, 40, 40, 40, generator=generator, dtype=torch.float64)
    reference = losses.local_ncc_loss_dense(fixed, moving).item()
    assert abs(losses.local_ncc_loss(fixed.float(), moving.float()).item() - reference) < 1e-4


def test_ncc_stays_in_range_for_faint_voxels_after_bright_ones():
    # Real MR has faint background right after bright tissue along an axis. A running cumsum
    # in float32 lost the squares of the faint voxels, gave negative variances and cc of -1e4;
    # the squared NCC of every window must stay in [0, 1] and match float64.
    torch.manual_seed(0)
    fixed = torch.zeros(1, 1, 16, 16, 64)
    fixed[..., :40] = 1.0 + torch.rand(1, 1, 16, 16, 40)
    fixed[..., 44:] = 1e-3 * torch.rand(1, 1, 16, 16, 20)
    moving = torch.roll(fixed, 3, dims=-1) + 0.5 * torch.rand(1, 1, 16, 16, 64)
    sums = losses._box_sum(torch.cat([fixed, moving, fixed * fixed, moving * moving, fixed * moving]), 5).split(1)
    cc = losses._ncc_from_sums(*sums, window=5)
    assert cc.min() >= 0.0 and cc.max() <= 1.0 + 1e-4
    value32 = losses.local_ncc_loss(fixed, moving, 5).item()
    value64 = losses.local_ncc_loss_dense(fixed.double(), moving.double(), 5).item()
    assert abs(value32 - value64) < 1e-3


def test_box_sum_gradient_is_the_box_sum_of_the_gradient(generator):
    volume = torch.rand(1, 1, 7, 8, 9, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: losses._box_sum(v, 3), (volume,))


def test_ncc_analytic_gradient_matches_autograd_of_the_definition(generator):
    fixed = torch.rand(2, 1, 9, 10, 11, generator=generator, dtype=torch.float64, requires_grad=True)
    moving = (0.6 * fixed.detach() + 0.4 * torch.rand(2, 1, 9, 10, 11, generator=generator, dtype=torch.float64)).requires_grad_(True)
    fast_fixed, fast_moving = torch.autograd.grad(losses.local_ncc_loss(fixed, moving, 5), (fixed, moving))
    dense_fixed, dense_moving = torch.autograd.grad(losses.local_ncc_loss_dense(fixed, moving, 5), (fixed, moving))
    assert torch.allclose(fast_moving, dense_moving, atol=1e-10)
    assert torch.allclose(fast_fixed, dense_fixed, atol=1e-10)


def test_dice_ce_of_uniform_logits_has_the_known_value():
    # p = 1/2 everywhere, half the voxels of class 1: Dice_1 = 2·(N/4) / (N/2 + N/2) = 1/2,
    # cross-entropy = ln 2.
    logits = torch.zeros(1, 2, 4, 4, 4)
    target = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    target[..., :2] = 1
    total, dice_loss, ce = losses.dice_ce_loss(logits, target, smooth=0.0)
    assert abs(dice_loss.item() - 0.5) < 1e-6
    assert abs(ce.item() - math.log(2)) < 1e-6
    assert abs(total.item() - (0.5 + math.log(2))) < 1e-6


def test_dice_ce_of_a_confident_right_answer_is_near_zero_and_wrong_one_high():
    target = torch.randint(0, 3, (2, 6, 6, 6), generator=torch.Generator().manual_seed(1))
    one_hot = torch.nn.functional.one_hot(target, 3).movedim(-1, 1).float()
    right, _, _ = losses.dice_ce_loss(30.0 * one_hot, target)
    wrong, wrong_dice, _ = losses.dice_ce_loss(30.0 * one_hot.roll(1, dims=1), target)
    assert right.item() < 1e-6
    assert wrong_dice.item() > 0.99 and wrong.item() > 29


def test_soft_dice_per_class_and_smoothing_of_absent_classes():
    # Class 2 absent from target and (nearly) from the prediction: smoothing gives ~1, not 0/0.
    target = torch.zeros(1, 2, 2, 2, dtype=torch.long)
    target[0, 0] = 1
    logits = torch.full((1, 3, 2, 2, 2), -50.0)
    logits[:, 0][target == 0] = 50.0
    logits[:, 1][target == 1] = 50.0
    dice = losses.soft_dice(logits, target)
    assert dice.shape == (3,)
    assert torch.allclose(dice, torch.ones(3), atol=1e-4)
    with pytest.raises(ValueError):
        losses.soft_dice(logits, target[0])
