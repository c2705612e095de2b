"""Other formulations of the network's 3³ convolutions, measured by bench_layers.py.

Each computes exactly what ``F.conv3d(x, weight, bias, padding=1)`` computes (same
weights, same result up to floating-point rounding) with cuDNN's 2D kernels instead of its
3D ones. Measured on an H200 they lose to cuDNN 3D in channels_last_3d (docs/performance.md),
so the model does not use them; they stay here so the comparison can be rerun.

Layouts: "ncdhw" tensors are contiguous (N, C, D, H, W); "ndhwc" tensors are
(N, C, D, H, W) tensors stored channels_last_3d, i.e. contiguous as (N, D, H, W, C).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def conv3d_by_slices_out(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Conv3d 3³ (padding 1) as one 2D convolution over the z slices, taps folded into outputs.

    ``x`` (N, Cin, D, H, W) stored channels_last_3d; ``weight`` (Cout, Cin, 3, 3, 3).
    Every z slice goes through a 2D 3×3 convolution with 3·Cout outputs (one set per z tap
    kd); output slice d then sums tap 0 of slice d-1, tap 1 of slice d and tap 2 of slice
    d+1. Returns (N, Cout, D, H, W) stored channels_last_3d.
    """
    n, cin, d, h, w = x.shape
    cout = weight.shape[0]
    slices = x.permute(0, 2, 1, 3, 4).reshape(n * d, cin, h, w)  # a view: NHWC 2D batch
    taps = weight.permute(2, 0, 1, 3, 4).reshape(3 * cout, cin, 3, 3)
    z = F.conv2d(slices, taps, None, padding=1)  # (N·D, 3·Cout, H, W), NHWC
    z = z.permute(0, 2, 3, 1).reshape(n, d, h, w, 3, cout)
    y = z[..., 1, :] if bias is None else z[..., 1, :] + bias.to(z.dtype)
    y = y.contiguous()
    y[:, 1:] += z[:, :-1, ..., 0, :]
    y[:, :-1] += z[:, 1:, ..., 2, :]
    return y.permute(0, 4, 1, 2, 3)


def conv3d_by_slices_in(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Conv3d 3³ (padding 1) as one 2D convolution over z slices, taps folded into inputs.

    The input of slice d is the channel concatenation of slices d-1, d, d+1 (3·Cin channels).
    Same layouts as ``conv3d_by_slices_out``.
    """
    n, cin, d, h, w = x.shape
    cout = weight.shape[0]
    xl = x.permute(0, 2, 3, 4, 1)  # (N, D, H, W, C), contiguous
    padded = F.pad(xl, (0, 0, 0, 0, 0, 0, 1, 1))
    stacked = torch.stack([padded[:, 0:d], padded[:, 1 : d + 1], padded[:, 2 : d + 2]], dim=4)
    slices = stacked.reshape(n * d, h, w, 3 * cin).permute(0, 3, 1, 2)
    taps = weight.permute(0, 2, 1, 3, 4).reshape(cout, 3 * cin, 3, 3)
    y = F.conv2d(slices, taps, bias, padding=1)  # (N·D, Cout, H, W), NHWC
    return y.permute(0, 2, 3, 1).reshape(n, d, h, w, cout).permute(0, 4, 1, 2, 3)


def conv3d_padded_outputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, multiple: int = 8) -> torch.Tensor:
    """Conv3d 3³ (padding 1) with the output channels padded with zero filters to a multiple
    of ``multiple`` and cut off again (for out_flow's 3 outputs: cuDNN's kernels are built
    for channel counts that are multiples of 8)."""
    cout = weight.shape[0]
    extra = (-cout) % multiple
    if extra:
        weight = F.pad(weight, (0, 0, 0, 0, 0, 0, 0, 0, 0, extra))
        bias = F.pad(bias, (0, extra)) if bias is not None else None
    return F.conv3d(x, weight, bias, padding=1)[:, :cout]


def conv3d_by_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, multiple: int = 8) -> torch.Tensor:
    """Conv3d 3³ (padding 1) as one matrix product over the 27 shifted copies (im2col).

    For the U-Net's first convolution (one input channel): cuDNN runs 2×1→32 at 128³ at
    about 5 TFLOP/s (1.2 ms forward, 1.4 ms weight gradient on an H200) although it moves
    only ~0.3 GB. Here the 27·Cin taps of every voxel (padded with zero taps to a multiple
    of ``multiple``, so bf16 rows stay 16-byte aligned for the tensor cores) form a
    (N·D·H·W, K) matrix, and forward and weight gradient are two memory-bound products.
    Meant for small Cin only: the matrix holds 27·Cin values per voxel.

    ``x`` (N, Cin, D, H, W) in either layout; ``weight`` (Cout, Cin, 3, 3, 3). Returns
    (N, Cout, D, H, W) stored channels_last_3d.
    """
    n, cin, d, h, w = x.shape
    cout = weight.shape[0]
    padded = F.pad(x, (1, 1, 1, 1, 1, 1)).permute(0, 2, 3, 4, 1)  # (N, D+2, H+2, W+2, Cin)
    taps = [padded[:, i : i + d, j : j + h, k : k + w] for i in range(3) for j in range(3) for k in range(3)]
    columns = torch.stack(taps, dim=-1).reshape(n * d * h * w, cin * 27)  # K ordered (Cin, kd, kh, kw)
    matrix = weight.reshape(cout, cin * 27)
    extra = (-cin * 27) % multiple
    if extra:
        columns = F.pad(columns, (0, extra))
        matrix = F.pad(matrix, (0, extra))
    if bias is None:
        y = columns @ matrix.t()
    else:
        y = torch.addmm(bias, columns, matrix.t())
    return y.view(n, d, h, w, cout).permute(0, 4, 1, 2, 3)


class MatmulConv3d(torch.nn.Conv3d):
    """``nn.Conv3d`` (3³, padding 1; same parameters and state_dict) computed by ``conv3d_by_matmul``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv3d_by_matmul(x, self.weight, self.bias)


def use_matmul_first_conv(model: torch.nn.Module) -> None:
    """Swap the U-Net's first convolution (1 input channel) of a ``GVSL`` for ``MatmulConv3d``, same weights."""
    conv = model.unet.inc.double_conv[0]
    swapped = MatmulConv3d(conv.in_channels, conv.out_channels, kernel_size=3, padding=1, device=conv.weight.device, dtype=conv.weight.dtype)
    swapped.load_state_dict(conv.state_dict())
    model.unet.inc.double_conv[0] = swapped
