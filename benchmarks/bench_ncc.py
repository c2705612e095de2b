"""Local NCC (9³): box sums (gvsl) vs five dense 9³ convolutions (the official definition).

    python benchmarks/bench_ncc.py [--sizes 64 96] [--device cpu|cuda] [--repeats 5]

Times forward + backward, checks both give the same value, prints a table with the device.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, median_ms, print_table  # noqa: E402

from gvsl_cli.losses import local_ncc_loss, local_ncc_loss_dense  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    generator = torch.Generator(device=device).manual_seed(0)
    rows = []
    for n in args.sizes:
        fixed = torch.rand(1, 1, n, n, n, device=device, generator=generator)
        moving = (0.6 * fixed + 0.4 * torch.rand(1, 1, n, n, n, device=device, generator=generator)).requires_grad_(True)

        def step(loss_fn):
            def run():
                moving.grad = None
                loss_fn(fixed, moving).backward()

            return run

        dense_ms = median_ms(step(local_ncc_loss_dense), device, repeats=args.repeats)
        box_ms = median_ms(step(local_ncc_loss), device, repeats=args.repeats)
        with torch.no_grad():
            difference = abs(local_ncc_loss(fixed.double(), moving.double()).item() - local_ncc_loss_dense(fixed.double(), moving.double()).item())
        rows.append([f"{n}³", f"{dense_ms:.1f}", f"{box_ms:.1f}", f"{dense_ms / box_ms:.1f}×", f"{difference:.1e}"])
    print_table(
        f"Local NCC 9³, forward + backward, median of {args.repeats} — {device_name(device)}, torch {torch.__version__}",
        ["size", "5 dense convs (ms)", "box sums (ms)", "speed-up", "|Δ loss| float64"],
        rows,
    )


if __name__ == "__main__":
    main()
