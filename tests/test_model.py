"""The network: official-compatible names and shapes, gradients into the affine head, batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gvsl_cli.config import ModelConfig
from gvsl_cli.errors import ConfigError
from gvsl_cli.model import GVSL, count_parameters

OFFICIAL_KEYS = Path(__file__).resolve().parent / "data" / "official_gvsl_state_dict.txt"


def official_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in OFFICIAL_KEYS.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, shape = line.split()
        shapes[name] = tuple(int(s) for s in shape.split("x"))
    return shapes


def test_default_width_matches_official_keys_and_shapes():
    model = GVSL(ModelConfig())
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == official_shapes()
    assert count_parameters(model) == 32_440_739  # as stated in the official key list


def test_official_format_state_dict_loads_strictly_and_runs_at_batch_2(generator):
    state = {name: torch.randn(shape, generator=generator) * 0.01 for name, shape in official_shapes().items()}
    model = GVSL(ModelConfig())
    model.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():
        fixed = torch.rand(2, 1, 16, 16, 16, generator=generator)
        out = model(fixed, torch.rand(2, 1, 16, 16, 16, generator=generator))
    assert out.match.theta.shape == (2, 3, 4)
    assert out.match.displacement.shape == (2, 3, 16, 16, 16)
    assert out.restored.shape == (2, 1, 16, 16, 16)


def test_gradients_reach_every_part_of_the_affine_head(generator):
    model = GVSL(ModelConfig(width=8))
    fixed = torch.rand(2, 1, 32, 32, 32, generator=generator)
    moving = torch.rand(2, 1, 32, 32, 32, generator=generator)
    out = model(fixed, moving)
    moved = torch.nn.functional.grid_sample(moving, out.match.grid(), align_corners=True)
    loss = (moved - fixed).square().mean() + (out.restored - fixed).square().mean()
    loss.backward()
    for name in ("fc_rot", "fc_scl", "fc_trans", "fc_shear", "f_conv", "sp_conv", "out_flow", "res_conv", "unet"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(name)]
        assert grads and all(g is not None for g in grads), name
        assert any(torch.count_nonzero(g) > 0 for g in grads), name


def test_any_input_size_is_padded_internally(generator):
    model = GVSL(ModelConfig(width=8)).eval()
    with torch.no_grad():
        feats = model.unet(torch.rand(1, 1, 20, 23, 17, generator=generator))
    assert feats.local.shape == (1, 8, 20, 23, 17)
    assert feats.global_.shape == (1, 128, 2, 2, 2)


def test_new_model_starts_near_identity(generator):
    model = GVSL(ModelConfig(width=8)).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 1, 16, 16, 16, generator=generator), torch.rand(1, 1, 16, 16, 16, generator=generator))
    assert out.match.displacement.abs().max() < 0.05
    assert (out.match.theta - torch.eye(3, 4)).abs().max() < 0.3


@pytest.mark.parametrize("width", [0, 12, -8])
def test_bad_width_is_refused(width):
    with pytest.raises(ConfigError, match="width"):
        ModelConfig(width=width)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["reduction", "channels"])
def test_reduction_groupnorm_matches_native_values_and_gradients(dtype, impl, generator):
    from gvsl_cli.model import GroupNorm

    native, ours = GroupNorm(4, 32), GroupNorm(4, 32)
    ours.impl = impl
    native.impl = "native"
    with torch.no_grad():
        native.weight.normal_(generator=generator)
        native.bias.normal_(generator=generator)
    ours.load_state_dict(native.state_dict())
    x = (torch.randn(2, 32, 6, 7, 8, generator=generator) * 3 + 2).to(dtype)
    x_native = x.float().detach().clone().requires_grad_(True)
    x_ours = x.detach().clone().requires_grad_(True)
    y_native = native(x_native)
    y_ours = ours(x_ours)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((y_ours.float() - y_native).norm() / y_native.norm()) < tolerance
    upstream = torch.randn(y_native.shape, generator=generator)
    y_native.backward(upstream)
    y_ours.backward(upstream.to(dtype))
    assert ((x_ours.grad.float() - x_native.grad).norm() / x_native.grad.norm()) < (1e-4 if dtype == torch.float32 else 3e-2)
    assert ((ours.weight.grad - native.weight.grad).norm() / native.weight.grad.norm()) < (1e-4 if dtype == torch.float32 else 3e-2)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(2, 5, 3, 4, 6), (1, 3, 1, 2, 7)])
def test_matrix_upsampling_matches_trilinear_interpolate(shape, channels_last, generator):
    from gvsl_cli.model import is_channels_last, upsample_trilinear2

    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    x.requires_grad_(True)
    ours = upsample_trilinear2(x)
    reference = torch.nn.functional.interpolate(x, scale_factor=2, mode="trilinear", align_corners=True)
    assert ours.shape == reference.shape
    assert torch.allclose(ours, reference, atol=1e-12)
    # The layout is kept (a one-voxel-thin or one-channel tensor is both layouts at once).
    assert is_channels_last(ours) == is_channels_last(x)
    upstream = torch.randn(reference.shape, generator=generator, dtype=torch.float64)
    (grad_ours,) = torch.autograd.grad(ours, x, upstream)
    (grad_reference,) = torch.autograd.grad(reference, x, upstream)
    assert torch.allclose(grad_ours, grad_reference, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["reduction", "channels"])
def test_reduction_groupnorm_on_channels_last_input(dtype, impl, generator):
    from gvsl_cli.model import GroupNorm, is_channels_last

    norm = GroupNorm(4, 32)
    norm.impl = impl
    with torch.no_grad():
        norm.weight.normal_(generator=generator)
        norm.bias.normal_(generator=generator)
    x = (torch.randn(2, 32, 6, 7, 8, generator=generator) * 3 + 2).to(dtype)
    x_last = x.contiguous(memory_format=torch.channels_last_3d).requires_grad_(True)
    y = norm(x_last)
    assert is_channels_last(y)
    reference = torch.nn.functional.group_norm(x.float(), 4, norm.weight, norm.bias, norm.eps)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((y.float() - reference).norm() / reference.norm()) < tolerance
    x_reference = x.float().detach().requires_grad_(True)
    upstream = torch.randn(reference.shape, generator=generator)
    torch.nn.functional.group_norm(x_reference, 4, norm.weight, norm.bias, norm.eps).backward(upstream)
    y.backward(upstream.to(dtype))
    gradient_tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    assert ((x_last.grad.float() - x_reference.grad).norm() / x_reference.grad.norm()) < gradient_tolerance


def test_channels_last_layout_computes_the_same_model(generator):
    from gvsl_cli.model import is_channels_last, set_groupnorm_impl, set_layout

    model = GVSL(ModelConfig(width=8)).eval()
    fixed = torch.rand(1, 1, 32, 32, 32, generator=generator)
    moving = torch.rand(1, 1, 32, 32, 32, generator=generator)
    with torch.no_grad():
        set_layout(model, "ncdhw")
        assert not is_channels_last(model.unet(fixed).local)
        reference = model(fixed, moving)
        set_layout(model, "ndhwc")
        set_groupnorm_impl(model, "reduction")  # the CUDA path, with its channels_last branch
        features = model.unet(torch.cat([fixed, moving]))
        ours = model(fixed, moving)
    assert is_channels_last(features.local) and is_channels_last(features.global_)
    with torch.no_grad():
        padded = model.unet(torch.rand(1, 1, 20, 23, 17, generator=generator))  # padded, then cropped
    assert padded.local.shape == (1, 8, 20, 23, 17) and is_channels_last(padded.local)
    assert torch.allclose(ours.restored, reference.restored, atol=1e-5)
    assert torch.allclose(ours.match.displacement, reference.match.displacement, atol=1e-7)
    assert torch.allclose(ours.match.theta, reference.match.theta, atol=1e-5)
    with pytest.raises(ValueError, match="layout must be one of"):
        set_layout(model, "nhwc")


def test_default_layout_is_channels_last_on_the_cpu_too():
    # oneDNN's convolution backward is faster in ndhwc (a 64³ training step 18-37 % faster,
    # docs/performance.md), so "auto" picks it on every device.
    from gvsl_cli.model import SegmentationNet, is_channels_last

    net = SegmentationNet(ModelConfig(width=8), 3)
    assert net.unet.layout == "auto"
    features = net.unet(torch.rand(2, 1, 32, 32, 32))
    assert is_channels_last(features.local) and is_channels_last(features.global_)
    # A 1³ bottleneck is both layouts at once; the decoder still goes on in ndhwc.
    assert is_channels_last(net.unet(torch.rand(2, 1, 16, 16, 16)).local)
    net.head(features.local).sum().backward()  # the backward runs in that layout as well
    assert net.unet.inc.double_conv[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize(("in_channels", "out_channels", "kernel_size", "channels_last"), [(1, 32, 3, True), (16, 3, 3, True), (16, 1, 1, False), (5, 3, 3, False), (16, 16, 3, True)])
def test_channel_padded_convolution_computes_the_same_values_and_gradients(in_channels, out_channels, kernel_size, channels_last, generator):
    # The CUDA path (padding "on"), forced on the CPU in float64, against nn.Conv3d.
    from gvsl_cli.model import AlignedConv3d, is_channels_last

    conv = AlignedConv3d(in_channels, out_channels, kernel_size=kernel_size, padding=kernel_size // 2).double()
    reference = torch.nn.Conv3d(in_channels, out_channels, kernel_size=kernel_size, padding=kernel_size // 2).double()
    reference.load_state_dict(conv.state_dict())
    assert list(conv.state_dict()) == ["weight", "bias"]
    x = torch.randn(2, in_channels, 9, 10, 11, generator=generator, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last_3d)  # as UNet3D._encode does; ``contiguous`` keeps one channel's strides
    x_ours = x.clone().requires_grad_()
    x_reference = x.clone().requires_grad_()
    conv.channel_padding = "on"
    ours = conv(x_ours)
    expected = reference(x_reference)
    assert ours.shape == expected.shape == (2, out_channels, 9, 10, 11)
    assert torch.allclose(ours, expected, atol=1e-12)
    upstream = torch.randn(expected.shape, generator=generator, dtype=torch.float64)
    (ours * upstream).sum().backward()
    (expected * upstream).sum().backward()
    assert conv.weight.grad.shape == conv.weight.shape
    assert torch.allclose(conv.weight.grad, reference.weight.grad, atol=1e-10)
    assert torch.allclose(conv.bias.grad, reference.bias.grad, atol=1e-10)
    assert torch.allclose(x_ours.grad, x_reference.grad, atol=1e-10)
    # The result is dense, and in the layout of the input: the padding and the cut keep it
    # (float32: the CPU's float64 convolution ignores channels_last).
    result = conv.float()(x.float())
    assert result.is_contiguous(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)
    if channels_last and out_channels > 1:
        assert is_channels_last(result)


def test_channel_padding_computes_the_same_model(generator):
    from gvsl_cli.model import AlignedConv3d, set_channel_padding

    model = GVSL(ModelConfig(width=8)).eval()  # float32: the affine head computes in it
    padded_layers = [m for m in model.modules() if isinstance(m, AlignedConv3d) and (m.in_channels % 8 or m.out_channels % 8)]
    assert {(m.in_channels, m.out_channels) for m in padded_layers} == {(1, 8), (16, 3), (16, 1)}  # first conv, flow, restoration
    fixed = torch.rand(1, 1, 32, 32, 32, generator=generator)
    moving = torch.rand(1, 1, 32, 32, 32, generator=generator)
    with torch.no_grad():
        reference = model(fixed, moving)  # "auto": no padding on the CPU
        set_channel_padding(model, "on")
        ours = model(fixed, moving)
    assert torch.allclose(ours.restored, reference.restored, atol=1e-5)
    assert torch.allclose(ours.match.displacement, reference.match.displacement, atol=1e-7)
    assert torch.allclose(ours.match.theta, reference.match.theta, atol=1e-5)
    with pytest.raises(ValueError, match="channel padding must be one of"):
        set_channel_padding(model, "yes")


@pytest.mark.parametrize("layout", ["ncdhw", "ndhwc"])
def test_model_compiles_as_one_graph(layout):
    # A graph break splits torch.compile's graph and stops kernel fusion across it: one in
    # GroupNorm (a generator expression) made the compiled 128³ step 30 ms slower on an H200.
    from gvsl_cli.model import set_channel_padding, set_groupnorm_impl, set_layout

    model = GVSL(ModelConfig(width=8))
    set_groupnorm_impl(model, "reduction")  # the CUDA path
    set_channel_padding(model, "on")  # the CUDA path
    set_layout(model, layout)
    image = torch.rand(1, 1, 16, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explanation = torch._dynamo.explain(model)(image, image)
    assert explanation.graph_break_count == 0, [reason.reason for reason in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_affine_head_is_float32_under_bf16_autocast(generator):
    # theta becomes sampling coordinates: computed in bf16 (as autocast runs nn.Linear) it
    # and the features' affine grid would be off by up to a quarter voxel at 128³.
    from gvsl_cli import spatial

    model = GVSL(ModelConfig(width=8))
    image = torch.rand(1, 1, 32, 32, 32, generator=generator)
    grids = []
    original_sample = spatial.sample

    def recording_sample(features, grid, **kwargs):
        grids.append(grid)
        return original_sample(features, grid, **kwargs)

    spatial.sample = recording_sample
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(image, image)
    finally:
        spatial.sample = original_sample
    assert out.match.theta.dtype == torch.float32
    assert all(value.dtype == torch.float32 for value in out.match.parameters.values())
    assert [grid.dtype for grid in grids] == [torch.float32]  # the head's warp of the moving features


def test_segmentation_net_gives_class_logits_on_the_input_grid_and_loads_gvsl_unet_weights():
    from gvsl_cli.model import SegmentationNet

    gvsl = GVSL(ModelConfig(width=8))
    net = SegmentationNet(ModelConfig(width=8), n_classes=4)
    net.load_unet(gvsl.state_dict())
    for name, value in gvsl.unet.state_dict().items():
        assert torch.equal(net.unet.state_dict()[name], value)
    assert set(net.state_dict()) == {f"unet.{k}" for k in gvsl.unet.state_dict()} | {"head.weight", "head.bias"}
    logits = net(torch.rand(2, 1, 20, 17, 16))  # any size: padded inside the U-Net
    assert logits.shape == (2, 4, 20, 17, 16)
    with pytest.raises(ValueError):
        SegmentationNet(ModelConfig(width=8), n_classes=1)


def test_unet_convolutions_start_from_the_official_he_normal_weights():
    # The official UNet_base draws kaiming_normal_ weights; PyTorch's default is 2.45x
    # smaller, which with Adam's ~lr-sized steps trains ~2.4x faster relative to the weights.
    import math

    torch.manual_seed(0)
    unet = GVSL(ModelConfig(width=32)).unet
    for name in ("inc.double_conv.0", "down2.maxpool_conv.1.double_conv.3", "up4.conv.double_conv.0"):
        weight = unet.get_submodule(name).weight
        fan_in = weight[0].numel()
        assert abs(weight.std().item() / math.sqrt(2.0 / fan_in) - 1.0) < 0.05, name


def test_a_float64_model_runs_in_float64():
    # gradcheck-style checks need float64 end to end, the affine head included.
    model = GVSL(ModelConfig(width=8)).double()
    image = torch.rand(1, 1, 32, 32, 32, dtype=torch.float64)
    output = model(image, image)
    assert output.match.theta.dtype == torch.float64 and output.restored.dtype == torch.float64
