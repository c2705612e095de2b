"""Where the GVSL training step spends its time, and what other layer implementations gain.

    python benchmarks/bench_layers.py --device cuda                       # all sections
    python benchmarks/bench_layers.py --device cuda --sections profile

Sections (each prints a Markdown table; times are medians of ``--repeats`` after warm-up):
  convs    every 3³ convolution shape of the 128³ step, bf16: cuDNN 3D (ncdhw and ndhwc)
           against the formulations of ``layer_variants`` (z-slice 2D convolutions,
           padded outputs, im2col matrix product; forward, and forward + backward)
  upsample trilinear ×2 upsampling: PyTorch's kernel against ``model.upsample_trilinear2``
  warp     the Z-matching head's affine warp of the moving features (grid_sample,
           forward + backward) in bf16 and in float32, in both layouts
  profile  torch.profiler of the eager step (``--profile-compiled``: the compiled one): the
           kernels and operators that take the time
(bench_pretrain.py times the model step and the whole iteration: --layout, --compile.)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, median_ms, print_table, synchronize  # noqa: E402
from layer_variants import conv3d_by_matmul, conv3d_by_slices_in, conv3d_by_slices_out, conv3d_padded_outputs  # noqa: E402
from bench_pretrain import make_step  # noqa: E402

from gvsl_cli.config import ModelConfig  # noqa: E402
from gvsl_cli.device import resolve_precision  # noqa: E402
from gvsl_cli.model import GVSL, LAYOUTS, set_layout, upsample_trilinear2  # noqa: E402
from gvsl_cli.pretraining import PretrainTask, make_optimizer  # noqa: E402

#: (batch, Cin, Cout, side, needs input gradient) of the 3³ convolutions of a 128³ step at
#: width 32: the U-Net runs on A' and B together (batch 2), the heads on one pair.
CONV_SHAPES = [
    (2, 1, 32, 128, False),  # inc, first conv
    (2, 32, 32, 128, True),  # inc second conv, up4 second conv
    (2, 96, 32, 128, True),  # up4 first conv (skip 32 + upsampled 64)
    (1, 64, 16, 128, True),  # sp_conv first conv
    (1, 32, 16, 128, True),  # res_conv
    (1, 16, 16, 128, True),  # sp_conv second conv
    (1, 16, 3, 128, True),  # out_flow
    (2, 64, 64, 64, True),  # down1 second conv, up3 second conv
    (2, 192, 64, 64, True),  # up3 first conv
]

CONV_VARIANTS = {
    "cuDNN 3D ncdhw": (torch.contiguous_format, lambda x, w, b: F.conv3d(x, w, b, padding=1)),
    "cuDNN 3D ndhwc": (torch.channels_last_3d, lambda x, w, b: F.conv3d(x, w, b, padding=1)),
    "cuDNN 3D ndhwc, Cout padded to 8": (torch.channels_last_3d, conv3d_padded_outputs),
    "z-slices, taps→outputs": (torch.channels_last_3d, conv3d_by_slices_out),
    "z-slices, taps→inputs": (torch.channels_last_3d, conv3d_by_slices_in),
    "matmul over 27 taps": (torch.channels_last_3d, conv3d_by_matmul),
}

#: Variants that only make sense for some shapes: (batch, cin, cout) -> bool.
CONV_VARIANT_APPLIES = {
    "cuDNN 3D ndhwc, Cout padded to 8": lambda batch, cin, cout: cout % 8 != 0,
    "matmul over 27 taps": lambda batch, cin, cout: cin <= 2,  # the matrix holds 27·Cin values per voxel
}

def bench_convs(args, device) -> None:
    rows = []
    for batch, cin, cout, side, input_grad in CONV_SHAPES:
        flops = 2 * batch * side**3 * cin * cout * 27
        for name, (layout, fn) in CONV_VARIANTS.items():
            if name not in args.conv_variants or not CONV_VARIANT_APPLIES.get(name, lambda *_: True)(batch, cin, cout):
                continue
            x = torch.randn(batch, cin, side, side, side, device=device, dtype=torch.bfloat16).contiguous(memory_format=layout)
            x.requires_grad_(input_grad)
            w = (torch.randn(cout, cin, 3, 3, 3, device=device) * 0.05).to(torch.bfloat16).requires_grad_()
            b = torch.zeros(cout, device=device, dtype=torch.bfloat16, requires_grad=True)
            grad = None

            def forward():
                with torch.no_grad():
                    fn(x, w, b)

            def forward_backward():
                nonlocal grad
                y = fn(x, w, b)
                if grad is None:
                    grad = torch.randn_like(y)
                y.backward(grad)
                x.grad = w.grad = b.grad = None

            try:
                fwd = median_ms(forward, device, repeats=args.repeats, warmup=3)
                both = median_ms(forward_backward, device, repeats=args.repeats, warmup=3)
                passes = 3 if input_grad else 2
                rows.append([f"{batch}×{cin}→{cout} @ {side}³", name, f"{fwd:.2f}", f"{flops / fwd / 1e9:.0f}", f"{both:.2f}", f"{passes * flops / both / 1e9:.0f}"])
            except RuntimeError as error:  # e.g. out of memory: report, keep going
                rows.append([f"{batch}×{cin}→{cout} @ {side}³", name, "error", str(error).splitlines()[0][:60], "", ""])
            print("| " + " | ".join(rows[-1]) + " |", flush=True)
    print_table(
        f"3³ convolutions, bf16, median of {args.repeats} — {device_name(device)}, torch {torch.__version__}, cudnn {torch.backends.cudnn.version()}, benchmark_limit {torch.backends.cudnn.benchmark_limit}",
        ["shape", "implementation", "forward ms", "TFLOP/s", "fwd+bwd ms", "TFLOP/s"],
        rows,
    )


def bench_upsample(args, device) -> None:
    rows = []
    for batch, channels, side in [(2, 64, 64), (2, 128, 32), (2, 256, 16)]:
        for name, fn in {"F.interpolate": lambda t: F.interpolate(t, scale_factor=2, mode="trilinear", align_corners=True), "matrix products": upsample_trilinear2}.items():
            x = torch.randn(batch, channels, side, side, side, device=device, dtype=torch.bfloat16, requires_grad=True)
            grad = torch.randn(batch, channels, 2 * side, 2 * side, 2 * side, device=device, dtype=torch.bfloat16)

            def forward_backward():
                fn(x).backward(grad)
                x.grad = None

            fwd = median_ms(lambda: fn(x.detach()), device, repeats=args.repeats, warmup=3)
            both = median_ms(forward_backward, device, repeats=args.repeats, warmup=3)
            rows.append([f"{batch}×{channels} @ {side}³→{2 * side}³", name, f"{fwd:.2f}", f"{both:.2f}"])
            print("| " + " | ".join(rows[-1]) + " |", flush=True)
    print_table(f"Trilinear ×2 upsampling, bf16, median of {args.repeats} — {device_name(device)}", ["shape", "implementation", "forward ms", "fwd+bwd ms"], rows)


def bench_warp(args, device) -> None:
    from gvsl_cli import spatial

    rows = []
    theta = torch.tensor([[[0.98, 0.05, 0.0, 0.02], [-0.05, 0.98, 0.03, 0.0], [0.0, -0.03, 1.01, -0.01]]], device=device)
    grid = spatial.affine_grid(theta, (128, 128, 128))
    for dtype in (torch.bfloat16, torch.float32):
        for layout in (torch.contiguous_format, torch.channels_last_3d):
            features = torch.randn(1, 32, 128, 128, 128, device=device, dtype=dtype).contiguous(memory_format=layout).requires_grad_(True)
            grad = torch.randn(1, 32, 128, 128, 128, device=device, dtype=dtype)
            sample_grid = grid.to(dtype)

            def forward_backward():
                spatial.sample(features, sample_grid).backward(grad)
                features.grad = None

            fwd = median_ms(lambda: spatial.sample(features.detach(), sample_grid), device, repeats=args.repeats, warmup=3)
            both = median_ms(forward_backward, device, repeats=args.repeats, warmup=3)
            rows.append(["1×32 @ 128³", str(dtype).replace("torch.", ""), "ndhwc" if layout == torch.channels_last_3d else "ncdhw", f"{fwd:.2f}", f"{both:.2f}"])
            print("| " + " | ".join(rows[-1]) + " |", flush=True)
    print_table(f"Affine warp of features (grid_sample), median of {args.repeats} — {device_name(device)}", ["shape", "dtype", "layout", "forward ms", "fwd+bwd ms"], rows)


def make_profiled_step(device, layout: str, side: int, compiled: bool = False):
    """``bench_pretrain.make_step`` (128³ by default, batch 1, width 32) on fixed synthetic inputs.

    ``compiled``: the model under ``torch.compile``, as ``gvsl pretrain`` runs it on CUDA.
    """
    torch.manual_seed(0)
    model = GVSL(ModelConfig(width=32)).to(device)
    set_layout(model, layout)
    optimizer = make_optimizer(model, 1e-4, device)
    task = PretrainTask(None, (side,) * 3, seed=0, rank=0, device=device)
    a = torch.rand(1, 1, side, side, side, device=device)
    batch = (a, (a + 0.1 * torch.rand_like(a)).clamp(0, 1), torch.rand_like(a))
    net = torch.compile(model) if compiled else model
    step = make_step(net, optimizer, task, resolve_precision("auto", device), device)
    return lambda: step(batch)


def profile_step(args, device, layout: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    step = make_profiled_step(device, layout, args.side, args.profile_compiled)
    for _ in range(3):
        step()
    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        synchronize(device)
    events = prof.key_averages()
    kind = "compiled" if args.profile_compiled else "eager"
    for sort in ("self_cuda_time_total", "cuda_time_total") if device.type == "cuda" else ("self_cpu_time_total",):
        print(f"\n### Profile of 3 {kind} steps ({layout} layout), sorted by {sort}\n")
        print(events.table(sort_by=sort, row_limit=args.profile_rows, max_name_column_width=90))
    if device.type == "cuda":
        print_kernels(events, steps=3, title=f"GPU kernels of one {kind} step ({layout} layout), full names")
    if args.profile_trace:
        prof.export_chrome_trace(str(args.profile_trace))
        print(f"\nchrome trace: {args.profile_trace}")


#: Kernel-name patterns of the categories in ``print_kernels``, first match wins.
KERNEL_CATEGORIES = (
    # cuDNN's convolution kernels are implicit GEMMs; cuBLAS's plain GEMMs come next.
    ("convolution (cuDNN)", ("implicit_gemm", "implicit_convolve", "cudnn", "conv2d_", "conv3d_", "wgrad", "dgrad", "fprop")),
    ("grid sampling", ("grid_sampler",)),
    ("matrix products (cuBLAS)", ("gemm", "cutlass", "cublas", "splitk", "nvjet")),
    ("inductor reductions", ("triton_red", "triton_per")),
    ("inductor pointwise", ("triton_poi",)),
    ("max-pooling", ("max_pool",)),
    ("optimizer", ("multi_tensor", "fused_adam", "FusedAdam")),
)


def kernel_category(name: str) -> str:
    lowered = name.lower()
    for category, patterns in KERNEL_CATEGORIES:
        if any(p.lower() in lowered for p in patterns):
            return category
    return "other"


def print_kernels(events, steps: int, title: str) -> None:
    """GPU kernels only (``self_device_time_total`` of the events that ran on the device),
    per step, with untruncated names, then totals by ``kernel_category``."""
    kernels = [e for e in events if getattr(e, "device_type", None) is not None and "CUDA" in str(e.device_type)]
    kernels.sort(key=lambda e: e.self_device_time_total, reverse=True)
    total_us = sum(e.self_device_time_total for e in kernels) / steps
    rows = [[f"{e.self_device_time_total / steps / 1000:.3f}", f"{e.count / steps:g}", f"{100 * e.self_device_time_total / steps / total_us:.1f}", e.key[:240]] for e in kernels]
    print_table(f"{title}: {total_us / 1000:.1f} ms of kernels a step", ["ms / step", "calls / step", "%", "kernel"], rows)
    by_category: dict[str, float] = {}
    for e in kernels:
        by_category[kernel_category(e.key)] = by_category.get(kernel_category(e.key), 0.0) + e.self_device_time_total / steps
    print_table("By category", ["category", "ms / step", "%"], [[c, f"{t / 1000:.2f}", f"{100 * t / total_us:.1f}"] for c, t in sorted(by_category.items(), key=lambda item: -item[1])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sections", nargs="+", default=["convs", "upsample", "warp", "profile"], choices=["convs", "upsample", "warp", "profile"])
    parser.add_argument("--profile-layout", default="auto", choices=LAYOUTS)
    parser.add_argument("--profile-compiled", action="store_true", help="profile the step with the model under torch.compile")
    parser.add_argument("--conv-variants", nargs="+", default=list(CONV_VARIANTS), choices=list(CONV_VARIANTS), metavar="NAME", help=f"convs section: implementations to compare (default: all of {list(CONV_VARIANTS)})")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--side", type=int, default=128, help="patch side of the profile section")
    parser.add_argument("--profile-rows", type=int, default=40, help="rows of the profiler's operator tables")
    parser.add_argument("--profile-trace", type=Path, default=None, help="also write the profile as a Chrome trace (JSON) here")
    parser.add_argument("--benchmark-limit", type=int, default=None, help="torch.backends.cudnn.benchmark_limit (0: try every algorithm)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    if args.benchmark_limit is not None:
        torch.backends.cudnn.benchmark_limit = args.benchmark_limit
    for section in args.sections:
        start = time.perf_counter()
        if section == "convs":
            bench_convs(args, device)
        elif section == "upsample":
            bench_upsample(args, device)
        elif section == "warp":
            bench_warp(args, device)
        elif section == "profile":
            profile_step(args, device, args.profile_layout)
        print(f"[{section}: {time.perf_counter() - start:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
