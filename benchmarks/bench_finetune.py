"""Fine-tuning step and segmentation inference: how long `gvsl finetune` and `gvsl segment` take.

    python benchmarks/bench_finetune.py [--device cpu|cuda] [--width 32] [--patch 128]
        [--batch 2] [--classes 3] [--image PATH] [--repeats 5] [--compile]
        [--layouts auto ncdhw ndhwc] [--threads N] [--no-segment]

Rows: one training step (sampling + augmentation + forward + backward + Adam) for each
mode, with the precision `gvsl finetune` would use on the device (bf16 autocast on CUDA,
fp32 on CPU); and `segment_image` on a real volume (preprocessing, sliding windows with
overlap 0.5, probabilities back onto the input grid), default the 1 mm Colin27 T1 of
../shared/data. Random weights: speed does not depend on them. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, median_ms, print_table, synchronize  # noqa: E402

from gvsl_cli.config import ModelConfig, PreprocessConfig  # noqa: E402
from gvsl_cli.device import autocast, resolve_precision  # noqa: E402
from gvsl_cli.finetuning import FinetuneTask  # noqa: E402
from gvsl_cli.io import read_volume  # noqa: E402
from gvsl_cli.model import LAYOUTS, SegmentationNet, set_layout  # noqa: E402
from gvsl_cli.segmentation import Segmenter, segment_image  # noqa: E402
from gvsl_cli.segmentation_data import PatchSampler, PreparedCase  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
EXAMPLE = Path(__file__).resolve().parents[1] / "gvsl_cli" / "examples" / "colin27_t1_2mm.nii.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--patch", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--image", type=Path, default=DATA / "mr_colin27_t1.nii.gz" if (DATA / "mr_colin27_t1.nii.gz").is_file() else EXAMPLE)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layouts", nargs="+", default=["auto"], choices=LAYOUTS, help="activation layouts to compare (model.set_layout); auto is ndhwc")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on the CPU")
    parser.add_argument("--no-segment", action="store_true", help="training steps only")
    parser.add_argument("--compile", action="store_true", help="also time the training steps with the network under torch.compile (as gvsl finetune does by default on CUDA); the compile time is reported")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = resolve_precision("auto", device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    patch = (args.patch,) * 3
    side = args.patch + args.patch // 2
    rng = np.random.default_rng(0)
    target = rng.integers(0, args.classes, (side, side, side)).astype(np.uint8)
    case = PreparedCase(name="synthetic", image=rng.random((side, side, side), dtype=np.float32), values=np.empty(0), modality="mr", target=target)
    rows = []
    modes = [(mode, False) for mode in ("finetune", "linear")] + ([(mode, True) for mode in ("finetune", "linear")] if args.compile else [])
    cases = [(mode, compiled, layout) for mode, compiled in modes for layout in args.layouts]
    for mode, compiled, layout in cases:
        model = SegmentationNet(ModelConfig(width=args.width), args.classes).to(device)
        set_layout(model, layout)
        if mode == "linear":
            model.unet.requires_grad_(False)
        net = torch.compile(model) if compiled else model
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=device.type == "cuda")
        task = FinetuneTask(PatchSampler([case], patch, seed=0, margin=args.patch // 8), args.batch, seed=0, device=device, augment=True)
        counter = {"iteration": 0}

        def step() -> None:
            counter["iteration"] += 1
            batch = task.batch(counter["iteration"])
            with autocast(device, dtype):
                loss = task.losses(net, batch)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        label = f"training step, --mode {mode}" + (f", {layout}" if len(args.layouts) > 1 else "")
        if compiled:
            start = time.perf_counter()
            step()  # compiles forward and backward
            synchronize(device)
            label += f", compiled ({time.perf_counter() - start:.0f} s compile)"
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ms = median_ms(step, device, repeats=args.repeats, warmup=2)
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}" if device.type == "cuda" else "-"
        rows.append([label, f"batch {args.batch} × {args.patch}³", f"{ms:.0f}", peak])
    image = read_volume(args.image)
    for layout in [] if args.no_segment else args.layouts:
        model = SegmentationNet(ModelConfig(width=args.width), args.classes)
        set_layout(model, layout)
        segmenter = Segmenter(model=model, preprocess=PreprocessConfig(spacing=1.0, modality="mr"), label_names=tuple(f"c{k}" for k in range(args.classes)), label_values=tuple(range(args.classes)), patch=patch, source="random")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ms = median_ms(lambda: segment_image(segmenter, image, device=device, autocast_dtype=dtype), device, repeats=max(1, args.repeats // 2), warmup=1)
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}" if device.type == "cuda" else "-"
        label = "segment_image (overlap 0.5)" + (f", {layout}" if len(args.layouts) > 1 else "")
        rows.append([label, f"{args.image.name} {'×'.join(map(str, image.GetSize()))}", f"{ms:.0f}", peak])
    precision = str(dtype).replace("torch.", "") if dtype else "fp32"
    print_table(
        f"gvsl finetune / segment, width {args.width}, {args.classes} classes, {precision} — {device_name(device)}, torch {torch.__version__}",
        ["what", "size", "median ms", "peak GiB"],
        rows,
    )


if __name__ == "__main__":
    main()
