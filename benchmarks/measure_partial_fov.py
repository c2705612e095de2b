"""Edge pull of a partial-field-of-view moving image: a slab of a head registered onto the head.

    python benchmarks/measure_partial_fov.py [--slices 12] [--start 41] [--similarity ncc]
        [--device cpu|cuda] [--threads 2] [--iters 100]

The fixed image is the shipped 2 mm ICBM152 example, the moving image ``--slices`` axial
slices of it (from slice ``--start``), so the identity is the right answer. Registers them
with ``register()``'s defaults and prints, for each slice of the slab, the largest and the
mean displacement |φ(x) − x| (mm) over the fixed voxels of that slice inside the head (above a
tenth of the maximum intensity), and the affine's z scale. Before the NCC windows counted only
valid points, the three slices at one edge moved by up to 5.6, 4.1 and 2.7 mm
(docs/registration.md, "Known limitations").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, print_table  # noqa: E402

from gvsl_cli.registration import RegistrationConfig, register  # noqa: E402

EXAMPLE = Path(__file__).resolve().parent.parent / "gvsl_cli" / "examples" / "icbm152_t1_2mm.nii.gz"


def slab_displacements(fixed: sitk.Image, start: int, slices: int, transform) -> list[tuple[float, float]]:
    """(max, mean) of |φ(x) − x| in mm over the head voxels of each fixed slice start .. start + slices − 1."""
    array = sitk.GetArrayViewFromImage(fixed)  # (z, y, x)
    head = array > 0.1 * float(array.max())
    rows = []
    for z in range(start, start + slices):
        y, x = np.nonzero(head[z])
        index = np.stack([x, y, np.full_like(x, z)], axis=1).astype(np.float64)
        points = np.array([fixed.TransformContinuousIndexToPhysicalPoint(tuple(map(float, p))) for p in index])
        moved = transform.physical_points(torch.from_numpy(points).float()).double().numpy()
        distance = np.linalg.norm(moved - points, axis=1)
        rows.append((float(distance.max()), float(distance.mean())))
    return rows


def slab_pair(slices: int, start: int, margin: int | None = None) -> tuple[sitk.Image, sitk.Image, int]:
    """(fixed, moving, first slab slice in the fixed image): the moving image is ``slices``
    axial slices of the 2 mm ICBM152 example from slice ``start``; the fixed image the whole
    example, or with ``margin`` the slab and ``margin`` slices on each side of it."""
    image = sitk.ReadImage(str(EXAMPLE))
    size = list(image.GetSize())
    moving = sitk.RegionOfInterest(image, [size[0], size[1], slices], [0, 0, start])
    if margin is None:
        return image, moving, start
    low = max(start - margin, 0)
    high = min(start + slices + margin, size[2])
    return sitk.RegionOfInterest(image, [size[0], size[1], high - low], [0, 0, low]), moving, start - low


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=12)
    parser.add_argument("--start", type=int, default=41, help="first slice (z index) of the slab")
    parser.add_argument("--margin", type=int, default=None, help="fixed image: the slab and this many slices on each side (default: the whole image)")
    parser.add_argument("--similarity", default="ncc", choices=("ncc", "mse", "mind"))
    parser.add_argument("--iters", type=int, default=RegistrationConfig.iters)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    fixed, moving, first = slab_pair(args.slices, args.start, args.margin)
    begin = time.perf_counter()
    result = register(fixed, moving, RegistrationConfig(similarity=args.similarity, iters=args.iters), device=device)
    seconds = time.perf_counter() - begin
    rows = slab_displacements(fixed, first, args.slices, result.transform)
    table = [[str(args.start + i), f"{largest:.2f}", f"{mean:.2f}"] for i, (largest, mean) in enumerate(rows)]
    z_scale = float(result.transform.affine[2, 2])
    print_table(
        f"{args.slices}-slice slab (z {args.start}..{args.start + args.slices - 1}) of {EXAMPLE.name} registered onto "
        f"{'the whole image' if args.margin is None else f'the slab ± {args.margin} slices'}, "
        f"{args.similarity}, {args.iters} iters — affine z scale {z_scale:.4f}, {seconds:.1f} s, {device_name(device)}",
        ["fixed slice", "max |φ(x) − x| mm", "mean mm"],
        table,
    )


if __name__ == "__main__":
    main()
