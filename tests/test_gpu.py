"""Checks that need a CUDA GPU (skipped without one): GPU paths compute the CPU's function."""

from __future__ import annotations

import pytest
import torch

from gvsl_cli import losses
from gvsl_cli.config import ModelConfig
from gvsl_cli.model import GVSL, GroupNorm

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_groupnorm_matches_native(dtype):
    norm = GroupNorm(8, 64).cuda()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 64, 24, 24, 24, device="cuda").to(dtype) * 3 + 1
    ours = norm(x).float()
    native = torch.nn.functional.group_norm(x.float(), 8, norm.weight, norm.bias, norm.eps)
    relative = (ours - native).norm() / native.norm()
    assert relative < (1e-5 if dtype == torch.float32 else 1e-2)


def test_model_on_gpu_matches_cpu(monkeypatch):
    # TF32 convolutions (PyTorch's default on CUDA) differ from float32 by ~1e-3; compare
    # the same arithmetic.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    model = GVSL(ModelConfig(width=8)).eval()
    fixed = torch.rand(1, 1, 32, 32, 32)
    moving = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        cpu = model(fixed, moving)
        gpu = model.cuda()(fixed.cuda(), moving.cuda())
    assert torch.allclose(gpu.restored.cpu(), cpu.restored, atol=1e-3)
    assert torch.allclose(gpu.match.theta.cpu(), cpu.match.theta, atol=1e-4)


def test_box_ncc_matches_dense_on_gpu():
    a = torch.rand(1, 1, 48, 48, 48, device="cuda")
    b = 0.5 * a + 0.5 * torch.rand(1, 1, 48, 48, 48, device="cuda")
    assert abs(losses.local_ncc_loss(a, b).item() - losses.local_ncc_loss_dense(a.double(), b.double()).item()) < 1e-4


def test_model_layouts_agree_on_gpu():
    from gvsl_cli.model import is_channels_last, set_layout

    torch.manual_seed(0)
    model = GVSL(ModelConfig(width=8)).cuda().eval()
    fixed = torch.rand(1, 1, 32, 32, 32, device="cuda")
    moving = torch.rand(1, 1, 32, 32, 32, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        set_layout(model, "ncdhw")
        reference = model(fixed, moving)
        set_layout(model, "auto")  # ndhwc on CUDA
        assert is_channels_last(model.unet(torch.cat([fixed, moving])).local)
        ours = model(fixed, moving)
    relative = (ours.restored.float() - reference.restored.float()).norm() / reference.restored.float().norm()
    assert relative < 2e-2


def test_channel_padding_agrees_on_gpu():
    # cuDNN's tensor-core kernels (padded channels) against its generic ones, in bf16, with
    # the weight gradients of the padded layers.
    from gvsl_cli.model import set_channel_padding

    torch.manual_seed(0)
    model = GVSL(ModelConfig(width=8)).cuda()
    fixed = torch.rand(1, 1, 32, 32, 32, device="cuda")
    moving = torch.rand(1, 1, 32, 32, 32, device="cuda")
    results = {}
    for padding in ("off", "auto"):
        set_channel_padding(model, padding)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(fixed, moving)
            (out.restored.float().square().mean() + out.match.displacement.float().square().mean() * 1e6).backward()
        results[padding] = (out.restored.float(), model.unet.inc.double_conv[0].weight.grad.clone(), model.out_flow.weight.grad.clone())
    for ours, reference in zip(results["auto"], results["off"]):
        assert ours.shape == reference.shape
        assert (ours - reference).norm() / reference.norm() < 2e-2


def test_training_step_does_not_wait_for_the_gpu():
    # A host-device synchronisation inside the step (e.g. torch.tensor(..., device="cuda"),
    # .item()) lets the GPU run dry while Python queues the next kernels. Losses are read
    # only every --log-every steps, outside what is checked here.
    from gvsl_cli.pretraining import PretrainTask, make_optimizer

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = GVSL(ModelConfig(width=8)).to(device)
    optimizer = make_optimizer(model, 1e-4, device)
    task = PretrainTask(None, (32, 32, 32), seed=0, rank=0, device=device)
    crops = torch.rand(1, 1, 40, 40, 40, device=device)

    def step():
        task.generator.manual_seed(1)
        batch = task.augmentation(crops, crops.flip(-1), task.patch, task.generator)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            losses = task.losses(model, batch)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()

    step()  # cuDNN autotuning and optimizer state creation may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
