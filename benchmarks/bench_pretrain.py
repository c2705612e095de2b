"""GVSL pre-training speed: the full iteration and the model step alone.

    python benchmarks/bench_pretrain.py --device cuda --quick            # < 3 min on one GPU
    python benchmarks/bench_pretrain.py --device cuda --quick --compile  # + torch.compile rows
    python benchmarks/bench_pretrain.py --device cpu                     # 64³, widths 32 and 8

*Model step*: forward of GVSL on (A', B), moved image, NCC + MSE + smoothness, backward,
Adam step — on patches already on the device. *Full iteration*: the same plus everything
`gvsl pretrain` does per step: patches from the preprocessed-volume cache (memory-mapped,
prefetched by threads, pinned), copy to the device, the GPU-side augmentation (affine +
elastic warp of A, A', B; pixel shuffling, Bézier mapping, in-painting). *Loading +
augmentation alone*: the full iteration without the model step. Data are the real
example volumes resampled to 1 mm. Each cell is the median over ``--repeats`` timed
iterations after ``--warmup``; TFLOP/s counts 7.57 TFLOP per step at 128³, batch 1, width 32
(scaled by voxels × batch; shown for width 32 only). Peak memory is
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, median_ms, print_table, synchronize  # noqa: E402
from layer_variants import use_matmul_first_conv  # noqa: E402

from gvsl_cli import augment, data  # noqa: E402
from gvsl_cli.config import ModelConfig, PreprocessConfig  # noqa: E402
from gvsl_cli.device import autocast, resolve_precision  # noqa: E402
from gvsl_cli.model import CHANNEL_PADDINGS, GROUPNORM_IMPLEMENTATIONS, GVSL, LAYOUTS, set_channel_padding, set_groupnorm_impl, set_layout  # noqa: E402
from gvsl_cli.pretraining import PretrainTask, make_optimizer  # noqa: E402
from gvsl_cli.resources import example_path  # noqa: E402

TFLOP_128_B1 = 7.57
_APPLY_APPEARANCE, _SPATIAL_GRID, _APPLY_SPATIAL = augment.apply_appearance, augment.spatial_grid, augment.apply_spatial


def make_step(model, optimizer, task, autocast_dtype, device, losses_fn=None):
    """One training step on a ready batch, exactly as ``training.run_training`` does it.

    ``losses_fn(model, batch)`` replaces ``task.losses`` (e.g. compiled as a whole).
    """
    losses_fn = losses_fn or task.losses

    def step(batch):
        with autocast(device, autocast_dtype):
            losses = losses_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()

    return step


def peak_gib(device) -> str:
    if device.type != "cuda":
        return "–"
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f}"


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def cached_volumes(cache_dir: Path, spacing: float):
    sources = [example_path("colin27_t1_2mm.nii.gz"), example_path("icbm152_t1_2mm.nii.gz")]
    dataset = data.prepare_dataset(sources, PreprocessConfig(spacing=spacing, modality="mr"), data.VolumeCache(cache_dir), workers=2)
    return dataset.volumes


def bench_case(args, device, volumes, size, batch, width, compile_model, groupnorm="auto", layout="auto", channel_padding="auto") -> list:
    autocast_dtype = resolve_precision(args.precision, device)
    torch.manual_seed(0)
    model = GVSL(ModelConfig(width=width)).to(device)
    set_groupnorm_impl(model, groupnorm)
    set_layout(model, layout)
    set_channel_padding(model, channel_padding)
    if args.first_conv == "matmul":
        use_matmul_first_conv(model)
    if args.compile_augmentation:
        # PretrainAugmentation looks these up at call time; the draws stay eager (they use
        # an explicit generator, which dynamo does not trace).
        augment.apply_appearance = torch.compile(_APPLY_APPEARANCE)
        augment.spatial_grid = torch.compile(_SPATIAL_GRID)
        augment.apply_spatial = torch.compile(_APPLY_SPATIAL)
    optimizer = make_optimizer(model, 1e-4, device)
    compile_step = compile_model and args.compile_scope == "step"
    net = torch.compile(model, mode=args.compile_mode) if compile_model and not compile_step else model
    patch = (size,) * 3
    region = tuple(p + 2 * (p // 8) for p in patch)
    sampler = data.PairSampler(volumes, region, seed=0)
    loader = data.PrefetchLoader(sampler, batch, start=1, workers=args.workers, pin=device.type == "cuda")
    task = PretrainTask(loader, patch, seed=0, rank=0, device=device)
    losses_fn = torch.compile(task.losses, mode=args.compile_mode) if compile_step else None
    step = make_step(net, optimizer, task, autocast_dtype, device, losses_fn)
    iteration = [0]
    # --overlap-augmentation: the batch of iteration i + 1 (copy to the device, augmentation)
    # is made on a side CUDA stream while step i runs, so its kernels can fill the step's gaps.
    side = torch.cuda.Stream(device) if args.overlap_augmentation and device.type == "cuda" else None
    pending: dict[int, tuple] = {}

    def full():
        iteration[0] += 1
        current = iteration[0]
        if current in pending:
            ready, batch_now = pending.pop(current)
            main = torch.cuda.current_stream(device)
            main.wait_event(ready)
            for tensor in batch_now:
                tensor.record_stream(main)  # made on the side stream, used on this one
        else:
            batch_now = task.batch(current)
        step(batch_now)
        if side is not None:
            with torch.cuda.stream(side):
                upcoming = task.batch(current + 1)
                ready = torch.cuda.Event()
                ready.record(side)
            pending[current + 1] = (ready, upcoming)

    try:
        reset_peak(device)
        compile_s = 0.0
        if compile_model:
            start = time.perf_counter()
            full()
            synchronize(device)
            compile_s = time.perf_counter() - start
        full_ms = median_ms(full, device, repeats=args.repeats, warmup=args.warmup)
        if pending:  # the loader already gave the prefetched iteration's crops
            pending.clear()
            iteration[0] += 1

        def augmentation_only():
            iteration[0] += 1
            task.batch(iteration[0])

        augmentation_ms = median_ms(augmentation_only, device, repeats=args.repeats, warmup=1)
        fixed_batch = task.batch(iteration[0] + 1)
        iteration[0] += 1
        model_ms = median_ms(lambda: step(fixed_batch), device, repeats=args.repeats, warmup=1)
        peak = peak_gib(device)
    finally:
        loader.close()
    # The 7.57 TFLOP count is for width 32; other widths would need their own count.
    tflops = f"{TFLOP_128_B1 * (size / 128) ** 3 * batch / (model_ms / 1000):.1f}" if width == 32 else "n/a"
    variant = ((f"compile {args.compile_mode}" if args.compile_mode != "default" else "compile") + (" (model + losses)" if compile_step else "") if compile_model else "eager") + ("" if groupnorm == "auto" else f", GroupNorm {groupnorm}") + ("" if layout == "auto" else f", {layout}") + ("" if channel_padding == "auto" else f", channel padding {channel_padding}") + (", first conv by matmul" if args.first_conv == "matmul" else "") + (", augmentation compiled" if args.compile_augmentation else "") + (", augmentation on a side stream" if side is not None else "")
    precision = str(autocast_dtype).replace("torch.", "") if autocast_dtype else "fp32"
    row = [f"{size}³", batch, width, f"{variant}, {precision}", f"{full_ms:.1f}", f"{model_ms:.1f}", f"{augmentation_ms:.1f}", tflops, peak]
    if compile_model:
        row[3] += f" ({compile_s:.0f} s compile)"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+", help="patch sides (default: 96 128 on CUDA, 64 on CPU)")
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (default: 1 2 on CUDA, 1 on CPU)")
    parser.add_argument("--widths", type=int, nargs="+", help="U-Net widths (default: 32 on CUDA, 32 8 on CPU)")
    parser.add_argument("--precision", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=4, help="prefetch threads of the loader")
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows (128³ and the largest batch only with --quick)")
    parser.add_argument("--groupnorm", nargs="+", default=["auto"], choices=GROUPNORM_IMPLEMENTATIONS, help="GroupNorm implementations to compare (eager and compile rows)")
    parser.add_argument("--layout", nargs="+", default=["auto"], choices=LAYOUTS, help="activation layouts to compare (eager and compile rows)")
    parser.add_argument("--channel-padding", nargs="+", default=["auto"], choices=CHANNEL_PADDINGS, help="convolution channel padding to multiples of 8 to compare (eager and compile rows; model.AlignedConv3d)")
    parser.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"], help="torch.compile mode of the compile rows")
    parser.add_argument("--compile-batches", type=int, nargs="+", help="batch sizes of the torch.compile rows (default: the largest; all without --quick)")
    parser.add_argument("--compile-scope", default="model", choices=["model", "step"], help="compile rows: the model only (as gvsl pretrain does) or the model with grid, warp and losses as one graph")
    parser.add_argument("--first-conv", default="cudnn", choices=["cudnn", "matmul"], help="the U-Net's first convolution: cuDNN, or layer_variants.conv3d_by_matmul (im2col)")
    parser.add_argument("--overlap-augmentation", action="store_true", help="CUDA: make the next iteration's batch on a side stream while the step runs (full-iteration column)")
    parser.add_argument("--compile-augmentation", action="store_true", help="also torch.compile the augmentation's apply functions (all rows)")
    parser.add_argument("--no-eager", action="store_true", help="only the torch.compile rows")
    parser.add_argument("--quick", action="store_true", help="fewer repeats; finishes in under 3 minutes on one GPU")
    parser.add_argument("--spacing", type=float, default=1.0, help="spacing of the cached training volumes (mm)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    sizes = args.sizes or ([96, 128] if cuda else [64])
    batches = args.batches or ([1, 2] if cuda else [1])
    widths = args.widths or ([32] if cuda else [32, 8])
    if args.quick:
        args.repeats, args.warmup = min(args.repeats, 5), min(args.warmup, 2)
    if cuda:
        torch.backends.cudnn.benchmark = True
    rows = []
    with tempfile.TemporaryDirectory(prefix="gvsl-bench-cache-") as cache_dir:
        start = time.perf_counter()
        volumes = cached_volumes(Path(cache_dir), args.spacing)
        print(f"cached {len(volumes)} volumes ({', '.join('×'.join(map(str, v.shape)) for v in volumes)}) in {time.perf_counter() - start:.1f} s", flush=True)
        for width in widths if not args.no_eager else []:
            for size in sizes:
                for batch in batches:
                    for groupnorm in args.groupnorm:
                        for layout in args.layout:
                            for padding in args.channel_padding:
                                rows.append(bench_case(args, device, volumes, size, batch, width, False, groupnorm, layout, padding))
                                print("| " + " | ".join(map(str, rows[-1])) + " |", flush=True)
        if args.compile:
            if args.compile_batches:
                cases = [(max(sizes), b) for b in args.compile_batches]
            else:
                cases = [(max(sizes), max(batches))] if args.quick else [(s, b) for s in sizes for b in batches]
            for size, batch in cases:
                for groupnorm in args.groupnorm:
                    for layout in args.layout:
                        for padding in args.channel_padding:
                            rows.append(bench_case(args, device, volumes, size, batch, widths[0], True, groupnorm, layout, padding))
                            print("| " + " | ".join(map(str, rows[-1])) + " |", flush=True)
    print_table(
        f"GVSL pre-training, median of {args.repeats} — {device_name(device)}, torch {torch.__version__}",
        ["patch", "batch", "width", "variant", "full iteration (ms)", "model step (ms)", "loading + augmentation alone (ms)", "TFLOP/s (model step)", "peak GiB"],
        rows,
    )


if __name__ == "__main__":
    main()
