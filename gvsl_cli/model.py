"""The GVSL network: a 3D U-Net, the Z-matching head and the restoration head.

Module and parameter names follow the official GVSL code exactly, so an official
checkpoint (``../shared/official_gvsl_state_dict.txt``) loads with ``strict=True`` into
``GVSL(ModelConfig(width=32))``. Shapes: images (B, C, D, H, W) with D = z; see
``gvsl_cli.spatial`` for the displacement and affine conventions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gvsl_cli.config import ModelConfig
from gvsl_cli import spatial

#: The U-Net halves the grid four times; inputs are padded to a multiple of this.
UNET_MULTIPLE = 16
#: Ranges of the affine head (DESIGN §1): ±20° rotation, ±25 % scale, ±10° shear.
MAX_ROTATION = math.pi / 9
MAX_SCALE_CHANGE = 0.25
MAX_SHEAR = math.pi / 18


#: GroupNorm implementations: "native" (PyTorch's kernel), "reduction" (statistics by a
#: parallel reduction over each group), "channels" (the same statistics from per-channel
#: sums, which read channels_last memory contiguously; a candidate, see ``GroupNorm``),
#: "auto" (reduction on CUDA, native elsewhere).
GROUPNORM_IMPLEMENTATIONS = ("auto", "native", "reduction", "channels")

#: Memory layouts of the activations: "ncdhw" (contiguous (N, C, D, H, W)), "ndhwc"
#: (channels_last_3d: channels innermost), "auto" (ndhwc, on CUDA and on the CPU). The
#: values are the same either way; only the kernels differ. On CUDA, cuDNN's 3D
#: convolutions work in ndhwc, so ncdhw activations are transposed there and back at every
#: convolution (12 ms of a 128³ training step on an H200). On the CPU, oneDNN's convolution
#: backward is faster in ndhwc: a training step at 64³ takes 18-37 % less time, inference
#: the same (docs/performance.md).
LAYOUTS = ("auto", "ncdhw", "ndhwc")


def is_channels_last(x: torch.Tensor) -> bool:
    """True when the 5D tensor ``x`` is stored channels_last_3d and not also contiguous."""
    return x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d)


def like_layout(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``x`` with ``reference``'s dtype, stored channels_last_3d if ``reference`` is (one copy
    at most; none if ``x`` already is both)."""
    if is_channels_last(reference):
        return x.to(dtype=reference.dtype, memory_format=torch.channels_last_3d)
    return x.to(dtype=reference.dtype)


def _linear_upsampling_matrix(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(2n, n) matrix of linear ×2 upsampling along one axis with align_corners=True.

    Row i holds the weights of output i at source position i·(n-1)/(2n-1), the mapping of
    ``F.interpolate(..., scale_factor=2, mode="trilinear", align_corners=True)``.
    """
    if n == 1:
        return torch.ones(2, 1, dtype=dtype, device=device)
    exact = torch.float64 if dtype == torch.float64 else torch.float32
    position = torch.arange(2 * n, device=device, dtype=exact) * ((n - 1) / (2 * n - 1))
    low = position.floor().clamp(max=n - 2)
    frac = position - low
    columns = torch.arange(n, device=device, dtype=exact)
    matrix = (1 - frac)[:, None] * (columns == low[:, None]) + frac[:, None] * (columns == low[:, None] + 1)
    return matrix.to(dtype)


def upsample_trilinear2(x: torch.Tensor) -> torch.Tensor:
    """Trilinear ×2 upsampling with align_corners=True, as three matrix products.

    Same values as ``F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=True)``
    (up to rounding: in bf16 the weights are bf16 too), for (N, C, D, H, W) in either layout,
    which is kept. PyTorch's CUDA kernel accumulates its backward with atomic adds (5.5 ms of
    a 128³ step on an H200); here forward and backward are matrix products (1.6 ms).
    """
    n, c, d, h, w = x.shape
    md = _linear_upsampling_matrix(d, x.dtype, x.device)
    mh = _linear_upsampling_matrix(h, x.dtype, x.device)
    mw = _linear_upsampling_matrix(w, x.dtype, x.device)
    if is_channels_last(x):
        y = x.permute(0, 2, 3, 4, 1)  # (N, D, H, W, C), contiguous
        y = torch.matmul(mw, y.reshape(n * d * h, w, c))  # (N·D·H, 2W, C)
        y = torch.matmul(mh, y.reshape(n * d, h, 2 * w * c))  # (N·D, 2H, 2W·C)
        y = torch.matmul(md, y.reshape(n, d, 4 * h * w * c))  # (N, 2D, 4H·W·C)
        return y.reshape(n, 2 * d, 2 * h, 2 * w, c).permute(0, 4, 1, 2, 3)
    y = torch.matmul(x, mw.t())  # (N, C, D, H, 2W)
    y = torch.matmul(mh, y)  # (N, C, D, 2H, 2W)
    y = torch.matmul(md, y.reshape(n, c, d, 4 * h * w))  # (N, C, 2D, 4H·W)
    return y.reshape(n, c, 2 * d, 2 * h, 2 * w)


class GroupNorm(nn.GroupNorm):
    """GroupNorm with the statistics computed by a parallel reduction on CUDA.

    Same parameters and state_dict keys as ``nn.GroupNorm``. PyTorch's native CUDA kernel
    reduces each of the only N·G rows on one block, which made it about half of the
    official training step at 128³ (DESIGN §5); reducing over an (N, G, -1) view spreads the
    work over the whole GPU. Statistics are always accumulated in float32, so bf16 autocast
    does not lose precision, but without a float32 copy of the activation: a bf16 input is
    reduced with float32 accumulators (``sum``/``vector_norm`` with ``dtype``), which saves
    a full read+write pass and keeps the autograd graph from storing a 4-byte copy of every
    activation. Channels_last_3d inputs are reduced in place over an (N, S, G, C/G) view,
    without a layout change (``_group_statistics``). On the CPU the native kernel is already
    parallel and is used as is.

    Attributes:
        impl: one of ``GROUPNORM_IMPLEMENTATIONS`` (see ``set_groupnorm_impl``).
    """

    impl: str = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        impl = self.impl
        if impl == "auto":
            impl = "reduction" if x.device.type == "cuda" else "native"
        if impl == "native":
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        n, c = x.shape[:2]
        groups = self.num_groups
        statistics = _group_statistics_from_channels if impl == "channels" else _group_statistics
        mean, var = statistics(x, groups)  # (N, G) each
        scale = torch.rsqrt(var + self.eps)[:, :, None]
        mean = mean[:, :, None]
        # Fold normalisation and affine into one multiply-add per channel.
        weight = self.weight.to(mean.dtype).view(1, groups, c // groups)
        bias = self.bias.to(mean.dtype).view(1, groups, c // groups)
        channel_scale = scale * weight  # (N, G, C/G)
        channel_shift = bias - mean * channel_scale
        shape = (n, c) + (1,) * (x.dim() - 2)
        return x * channel_scale.reshape(shape).to(x.dtype) + channel_shift.reshape(shape).to(x.dtype)


#: Channel padding of convolutions whose channel counts are not multiples of 8: "auto"
#: (on CUDA), "on", "off". See ``AlignedConv3d``.
CHANNEL_PADDINGS = ("auto", "on", "off")
#: cuDNN's tensor-core kernels for bf16 want channel counts that are multiples of this.
CHANNEL_MULTIPLE = 8


class AlignedConv3d(nn.Conv3d):
    """``nn.Conv3d`` (same parameters, state_dict and result) that runs on CUDA with its
    input and output channel counts padded with zeros to multiples of 8.

    cuDNN has no tensor-core kernel for a channel count that is not a multiple of 8: the
    U-Net's first convolution (1 input channel) and the flow and restoration outputs (3 and
    1 output channels) fell back to a generic kernel, slower than convolutions doing 30×
    their arithmetic (docs/performance.md). Zero input channels with zero filter taps, and
    zero filters whose outputs are cut off again, add exactly nothing; the gradient of the
    real weights is unchanged and the padded ones are dropped by the padding's backward.

    Attributes:
        channel_padding: one of ``CHANNEL_PADDINGS`` (see ``set_channel_padding``).
    """

    channel_padding: str = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        extra_in = (-self.in_channels) % CHANNEL_MULTIPLE
        extra_out = (-self.out_channels) % CHANNEL_MULTIPLE
        padding = self.channel_padding
        if padding == "auto":
            padding = "on" if x.device.type == "cuda" else "off"
        if padding == "off" or not (extra_in or extra_out) or self.groups != 1:
            return super().forward(x)
        weight, bias = self.weight, self.bias
        if extra_in:
            # Channel stride 1 marks channels_last_3d also for one channel, which counts as
            # contiguous in both layouts (``UNet3D._encode`` sets it for cuDNN's sake).
            channels_last = x.stride(1) == 1 and x.is_contiguous(memory_format=torch.channels_last_3d)
            # F.pad's last pair pads dimension 1 (channels) of (N, C, D, H, W).
            x = F.pad(x, (0, 0, 0, 0, 0, 0, 0, extra_in))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            weight = F.pad(weight, (0, 0, 0, 0, 0, 0, 0, extra_in))
        if extra_out:
            weight = F.pad(weight, (0, 0, 0, 0, 0, 0, 0, 0, 0, extra_out))
            bias = F.pad(bias, (0, extra_out)) if bias is not None else None
        y = self._conv_forward(x, weight, bias)
        if not extra_out:
            return y
        # A dense tensor again (3 or K channels: a small copy), in the layout of the
        # convolution's output, so code downstream may view or flatten it.
        layout = torch.channels_last_3d if y.dim() == 5 and is_channels_last(y) else torch.contiguous_format
        return y[:, : self.out_channels].contiguous(memory_format=layout)


def _group_statistics(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, var), each (N, G), of the groups of ``x`` (N, C, *spatial) by one parallel
    reduction per group; float32 for bf16/fp16 inputs (accumulated without a float32 copy of
    ``x``, var = E[x²] − E[x]²), the input's dtype for float32/float64 (``var_mean``).
    Channels_last_3d inputs are reduced in place over an (N, S, G, C/G) view."""
    n, c = x.shape[:2]
    if is_channels_last(x):
        grouped = x.permute(0, 2, 3, 4, 1).reshape(n, -1, groups, c // groups)  # a view
        dims = (1, 3)
    else:
        grouped = x.reshape(n, groups, -1)  # (N, G, C/G·S): one row per group
        dims = (2,)
    if x.dtype in (torch.float32, torch.float64):
        var, mean = torch.var_mean(grouped, dim=dims, unbiased=False)
        return mean, var
    count = grouped.numel() // (n * groups)  # values per group
    mean = grouped.sum(dim=dims, dtype=torch.float32) / count
    norm = torch.linalg.vector_norm(grouped, 2, dim=dims, dtype=torch.float32)
    return mean, (norm * norm / count - mean * mean).clamp(min=0.0)


def _group_statistics_from_channels(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``_group_statistics`` computed from per-channel sums and sums of squares over the
    voxels (var = E[x²] − E[x]² in every dtype; float64 stays float64, the rest float32).

    In channels_last memory a per-channel reduction reads every voxel's channels as one
    contiguous run, where a per-group one reads runs of C/G channels at a stride of C; the
    group totals are then sums of C/G numbers. A candidate for CUDA (profile: the per-group
    statistics kernels read at about a third of the memory bandwidth), not yet measured.
    """
    n, c = x.shape[:2]
    dims = tuple(range(2, x.dim()))
    accumulate = torch.float64 if x.dtype == torch.float64 else torch.float32
    count = x[0, 0].numel() * (c // groups)  # values per group
    sums = x.sum(dim=dims, dtype=accumulate).view(n, groups, c // groups)
    norms = torch.linalg.vector_norm(x, 2, dim=dims, dtype=accumulate).view(n, groups, c // groups)
    mean = sums.sum(dim=2) / count
    return mean, ((norms * norms).sum(dim=2) / count - mean * mean).clamp(min=0.0)


def set_channel_padding(model: nn.Module, padding: str) -> None:
    """Choose the channel padding (one of ``CHANNEL_PADDINGS``) of every ``AlignedConv3d``."""
    if padding not in CHANNEL_PADDINGS:
        raise ValueError(f"channel padding must be one of {CHANNEL_PADDINGS}, got {padding!r}")
    for module in model.modules():
        if isinstance(module, AlignedConv3d):
            module.channel_padding = padding


def set_layout(model: nn.Module, layout: str) -> None:
    """Choose the activation layout (one of ``LAYOUTS``) of every U-Net in ``model``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    for module in model.modules():
        if isinstance(module, UNet3D):
            module.layout = layout


def set_groupnorm_impl(model: nn.Module, impl: str) -> None:
    """Choose the GroupNorm implementation of every GroupNorm in ``model`` (for benchmarks)."""
    if impl not in GROUPNORM_IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {GROUPNORM_IMPLEMENTATIONS}, got {impl!r}")
    for module in model.modules():
        if isinstance(module, GroupNorm):
            module.impl = impl


class DoubleConv(nn.Module):
    """(Conv3d 3³ → GroupNorm(C/8) → LeakyReLU(0.2)) × 2; keys double_conv.{0,1,3,4}."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.double_conv = nn.Sequential(
            AlignedConv3d(in_channels, out_channels, kernel_size=3, padding=1),
            GroupNorm(out_channels // 8, out_channels),
            nn.LeakyReLU(0.2, inplace=True),
            AlignedConv3d(out_channels, out_channels, kernel_size=3, padding=1),
            GroupNorm(out_channels // 8, out_channels),
            nn.LeakyReLU(0.2, inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class Down(nn.Module):
    """Max-pool ×2 then DoubleConv; keys maxpool_conv.1.*."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool3d(2), DoubleConv(in_channels, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool_conv(x)  # max-pooling keeps channels_last_3d (CPU and CUDA)


class Up(nn.Module):
    """Trilinear ×2 upsampling (align_corners=True), concatenation with the skip feature,
    DoubleConv; keys conv.*."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        # The upsampling keeps x's layout, but a 1³ bottleneck (inputs of 16 voxels a side)
        # counts as contiguous after max-pooling; in the skip's layout, the concatenation
        # (which falls back to ncdhw on mixed inputs) keeps the U-Net's layout.
        return self.conv(torch.cat([skip, like_layout(upsample_trilinear2(x), skip)], dim=1))


@dataclass
class UNetFeatures:
    """Features of one image.

    Attributes:
        global_: bottleneck feature f_g, (B, 16·width, D/16, H/16, W/16) of the padded input.
        local: last decoder feature f_l, (B, width, D, H, W) on the input's own grid.
    """

    global_: torch.Tensor
    local: torch.Tensor


class UNet3D(nn.Module):
    """The shared 3D U-Net N of GVSL (widths w·(1, 2, 4, 8, 16) down, w·(8, 4, 2, 1) up).

    Attributes:
        layout: activation layout, one of ``LAYOUTS`` (see ``set_layout``); the features
            come out in it.
    """

    layout: str = "auto"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c1, c2, c3, c4, c5 = config.level_channels
        self.inc = DoubleConv(config.in_channels, c1)
        self.down1 = Down(c1, c2)
        self.down2 = Down(c2, c3)
        self.down3 = Down(c3, c4)
        self.down4 = Down(c4, c5)
        self.up1 = Up(c5 + c4, c4)
        self.up2 = Up(c4 + c3, c3)
        self.up3 = Up(c3 + c2, c2)
        self.up4 = Up(c2 + c1, c1)
        # The official UNet_base's initialisation: He-normal convolution weights (std
        # sqrt(2 / fan_in)), 2.45x PyTorch's default. The convolutions feed GroupNorms, so
        # the forward pass does not depend on this scale, but Adam's steps are about lr in
        # size whatever the weights' scale: lr 1e-4 trains as the paper's run only from
        # weights of the paper's scale.
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight)

    def _encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], tuple[int, ...], str]:
        """Encoder levels x1..x5 of ``x`` padded to a multiple of 16, the unpadded spatial
        shape, and the layout used."""
        if x.dim() != 5:
            raise ValueError(f"input must be (B, C, D, H, W), got shape {tuple(x.shape)}")
        shape = tuple(x.shape[2:])
        pads = [(-n) % UNET_MULTIPLE for n in shape]
        if any(pads):
            # F.pad takes (W_before, W_after, H_before, H_after, D_before, D_after).
            x = F.pad(x, [p for n in reversed(pads) for p in (0, n)])
        layout = self.layout
        if layout == "auto":
            layout = "ndhwc"
        if layout == "ndhwc":
            # ``to`` rather than ``contiguous``: a one-channel tensor already counts as
            # channels_last contiguous, but only channel strides of 1 make cuDNN pick that
            # layout; every later activation then keeps it.
            x = x.to(memory_format=torch.channels_last_3d)
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)
        return [x1, x2, x3, x4, x5], shape, layout

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """f_g of ``x`` alone (the encoder; about half the work of ``forward``), the same
        tensor as ``forward(x).global_``."""
        return self._encode(x)[0][-1]

    def forward(self, x: torch.Tensor) -> UNetFeatures:
        """Features of ``x`` (B, C, D, H, W); any size, padded internally to a multiple of 16."""
        (x1, x2, x3, x4, x5), shape, layout = self._encode(x)
        y = self.up1(x5, x4)
        y = self.up2(y, x3)
        y = self.up3(y, x2)
        y = self.up4(y, x1)
        if tuple(y.shape[2:]) != shape:
            y = y[:, :, : shape[0], : shape[1], : shape[2]]
            if layout == "ndhwc":
                y = y.contiguous(memory_format=torch.channels_last_3d)  # the crop is neither layout
        return UNetFeatures(global_=x5, local=y)


@dataclass
class ZMatch:
    """Output of the Z-matching head for a (fixed A, moving B) pair.

    Attributes:
        theta: (B, 3, 4) normalised affine Aff (see ``spatial``).
        displacement: (B, 3, D, H, W) voxel displacement u on A's grid.
        parameters: rotation (B, 3) rad, scale (B, 3), translation (B, 3), shear (B, 6) rad.
    """

    theta: torch.Tensor
    displacement: torch.Tensor
    parameters: dict[str, torch.Tensor]

    def grid(self) -> torch.Tensor:
        """Sampling grid of φ(p) = Aff(p + u(p)) into B, (B, D, H, W, 3)."""
        return spatial.compose_grid(self.theta, self.displacement)


@dataclass
class GVSLOutput:
    """Output of one GVSL forward pass: the Z-matching of (A, B) and the restoration of A."""

    match: ZMatch
    restored: torch.Tensor


class GVSL(nn.Module):
    """The whole pre-training model: U-Net, Z-matching head and restoration head.

    Attribute names are the official ones (``unet``, ``f_conv``, ``fc_rot``, ``fc_scl``,
    ``fc_trans``, ``fc_shear``, ``sp_conv``, ``out_flow``, ``res_conv``).
    """

    def __init__(self, config: ModelConfig = ModelConfig()) -> None:
        super().__init__()
        self.config = config
        w, h = config.width, config.head_channels
        bottleneck = config.level_channels[-1]
        affine_channels = 8 * w  # 256 at the default width
        self.unet = UNet3D(config)
        # Affine (global) head.
        self.f_conv = DoubleConv(2 * bottleneck, affine_channels)
        self.fc_rot = nn.Linear(affine_channels, 3)
        self.fc_scl = nn.Linear(affine_channels, 3)
        self.fc_trans = nn.Linear(affine_channels, 3)
        self.fc_shear = nn.Linear(affine_channels, 6)
        # Deformable (local) head.
        self.sp_conv = DoubleConv(2 * w, h)
        self.out_flow = AlignedConv3d(h, 3, kernel_size=3, padding=1)
        # Restoration head.
        self.res_conv = nn.Sequential(
            AlignedConv3d(w, h, kernel_size=3, padding=1),
            GroupNorm(h // 4, h),
            nn.LeakyReLU(0.2, inplace=True),
            AlignedConv3d(h, 1, kernel_size=1),
        )
        self._init_heads()

    def _init_heads(self) -> None:
        # Start close to the identity mapping: small affine outputs (yet non-zero weights, so
        # gradients still reach f_conv) and a near-zero flow, as VoxelMorph does.
        self._init_affine_outputs()
        nn.init.normal_(self.out_flow.weight, std=1e-5)
        nn.init.zeros_(self.out_flow.bias)

    def _init_affine_outputs(self) -> None:
        for fc in (self.fc_rot, self.fc_scl, self.fc_trans, self.fc_shear):
            with torch.no_grad():
                fc.weight.mul_(0.1)
                fc.bias.zero_()

    def reset_affine_head(self) -> None:
        """Draw ``f_conv`` and ``fc_*`` afresh, as for a new model (near the identity).

        For weights whose affine head was never trained (the official code's): theirs is
        PyTorch's default initialisation, read by gvsl as translations of up to a quarter
        of the patch and rotations of several degrees, which carry no information.
        """
        for module in (*self.f_conv.modules(), self.fc_rot, self.fc_scl, self.fc_trans, self.fc_shear):
            if isinstance(module, (nn.Conv3d, nn.Linear, nn.GroupNorm)):
                module.reset_parameters()
        self._init_affine_outputs()

    def affine(self, fixed_global: torch.Tensor, moving_global: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Affine head: (B, 3, 4) theta and its parameters from two bottleneck features."""
        x = self.f_conv(torch.cat([moving_global, fixed_global], dim=1))
        # Theta becomes sampling coordinates, so the head's last layers run in float32 also
        # under autocast: in bf16 (8-bit mantissa) theta and the grid built from it would
        # move voxels by up to a quarter voxel at 128³. These are 15 outputs; no cost.
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.mean(dim=(2, 3, 4))
            x = x.to(torch.promote_types(x.dtype, torch.float32))  # float64 models stay float64
            params = {
                "rotation": torch.clamp(self.fc_rot(x), -1, 1) * MAX_ROTATION,
                "scale": 1.0 + MAX_SCALE_CHANGE * torch.clamp(self.fc_scl(x), -1, 1),
                "translation": self.fc_trans(x),
                "shear": torch.clamp(self.fc_shear(x), -1, 1) * MAX_SHEAR,
            }
            theta = spatial.affine_matrix(params["rotation"], params["scale"], params["translation"], params["shear"])
        return theta, params

    def deformable(self, fixed_local: torch.Tensor, moving_local: torch.Tensor, theta: torch.Tensor | None) -> torch.Tensor:
        """Deformable head: voxel displacement (B, 3, D, H, W) on the fixed grid.

        ``moving_local`` is first warped by ``theta`` (unless None) onto the fixed grid.
        """
        if theta is not None:
            # float32 theta and grid (see ``affine``): the features are sampled in float32.
            moving_local = spatial.sample(moving_local, spatial.affine_grid(theta, tuple(fixed_local.shape[2:])))
        # grid_sample returns ncdhw float32; back to the features' layout and dtype in one copy
        # (the convolution would cast to bf16 anyway), so the concatenation keeps both.
        moving_local = like_layout(moving_local, fixed_local)
        x = self.sp_conv(torch.cat([moving_local, fixed_local], dim=1))
        return self.out_flow(x)

    def match(self, fixed: UNetFeatures, moving: UNetFeatures, *, use_affine: bool = True) -> ZMatch:
        """Z-matching of two feature sets; ``use_affine=False`` fixes Aff to the identity."""
        if use_affine:
            theta, params = self.affine(fixed.global_, moving.global_)
        else:
            batch = fixed.local.shape[0]
            theta = spatial.identity_theta(batch, device=fixed.local.device)
            params = {}
        displacement = self.deformable(fixed.local, moving.local, theta if use_affine else None)
        return ZMatch(theta=theta, displacement=displacement, parameters=params)

    def restore(self, local: torch.Tensor) -> torch.Tensor:
        """Restoration head: (B, width, D, H, W) -> (B, 1, D, H, W) image."""
        return self.res_conv(local)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> GVSLOutput:
        """One GVSL pass on a fixed image A (the damaged copy A' in training) and a moving B.

        Args:
            fixed, moving: (B, 1, D, H, W) images on grids of the same size.
        """
        if fixed.shape != moving.shape:
            raise ValueError(f"fixed and moving must have the same shape, got {tuple(fixed.shape)} and {tuple(moving.shape)}")
        batch = fixed.shape[0]
        # One U-Net pass over both images: same weights, better GPU occupancy.
        features = self.unet(torch.cat([fixed, moving], dim=0))
        fixed_features = UNetFeatures(features.global_[:batch], features.local[:batch])
        moving_features = UNetFeatures(features.global_[batch:], features.local[batch:])
        return GVSLOutput(match=self.match(fixed_features, moving_features), restored=self.restore(fixed_features.local))


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())


class SegmentationNet(nn.Module):
    """The GVSL U-Net with a segmentation head: logits of ``n_classes`` classes per voxel.

    The head is a Conv3d 1³ (width -> n_classes) on the last decoder feature f_l, the
    smallest head the pre-trained features can be read by (``gvsl finetune --mode linear``
    trains it alone). Parameter names: ``unet.*`` as in ``GVSL`` (so pre-trained U-Net
    weights load unchanged), ``head.*``.
    """

    def __init__(self, config: ModelConfig, n_classes: int) -> None:
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"a segmentation needs at least 2 classes (background and one more), got {n_classes}")
        self.config = config
        self.n_classes = n_classes
        self.unet = UNet3D(config)
        self.head = AlignedConv3d(config.width, n_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_classes, D, H, W) of images ``x`` (B, C, D, H, W); any size."""
        return self.head(self.unet(x).local)

    def load_unet(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load the ``unet.*`` entries of a GVSL (or segmentation) state_dict, strictly."""
        prefix = "unet."
        unet_state = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        self.unet.load_state_dict(unet_state, strict=True)
