"""Speed of ``gvsl embed`` per volume, and why the global vector pools the whole volume.

    python benchmarks/bench_embed.py [--device cpu|cuda] [--weights W | --width 32 --spacing 1]
        [--repeats 3] [--dense-window 128] [--overlaps 0.5] [--tiling WINDOW] [VOLUME ...]

Speed table: for each volume (default: the MR and CT volumes in /work/shared/data), the
global vector's pass (the encoder on the whole canonical volume) and, per overlap, the
dense map (the full U-Net by sliding windows of ``--dense-window``, Gaussian blending),
each the median of ``--repeats`` runs after a warm-up, on the prepared volume (reading and
preprocessing excluded: they do not depend on the network), device named.

``--tiling WINDOW``: how much the global vector would change if it were pooled from
sliding windows of WINDOW voxels instead (overlaps 0, 0.5, 0.75): the Euclidean distance
between those vectors and the whole-volume one, next to the distance from each volume to
the nearest other volume. Tiled vectors are the mean of f_g over the 1/16 grid with
overlapping windows averaged equally.

Without ``--weights`` the network has random weights (seeded) at ``--width`` with the
``--spacing`` contract: the timing does not depend on the weights, the distances do.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, print_table, synchronize  # noqa: E402

from gvsl_cli.checkpoint import LoadedWeights, load_weights  # noqa: E402
from gvsl_cli.config import ModelConfig, PreprocessConfig  # noqa: E402
from gvsl_cli.data import read_and_prepare  # noqa: E402
from gvsl_cli.embedding import EmbedConfig, FeatureExtractor  # noqa: E402
from gvsl_cli.model import GVSL  # noqa: E402
from gvsl_cli.sliding_window import sliding_window_inference  # noqa: E402

DATA = Path("/work/shared/data")
DEFAULT_VOLUMES = ["mr_colin27_t1.nii.gz", "mr_icbm152_t1.nii.gz", "ct_head_scaled.nii.gz"]


def random_weights(width: int, spacing: float) -> LoadedWeights:
    torch.manual_seed(0)
    model = GVSL(ModelConfig(width=width))
    return LoadedWeights("gvsl", model.config, PreprocessConfig(spacing=spacing), model.state_dict(), True, {"weights_spec": f"random width {width}"})


def timed(fn, device: torch.device, repeats: int):
    """(median ms over ``repeats`` runs after one warm-up, last result)."""
    times, result = [], None
    for repeat in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        if repeat:
            times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times), result


def tiled_vector(extractor: FeatureExtractor, prepared, window: int, overlap: float) -> np.ndarray:
    """The global vector pooled from sliding windows (what gvsl embed does not do)."""
    volume = torch.from_numpy(prepared.array)[None]
    pooled = sliding_window_inference(volume, extractor._global, patch=(window,) * 3, overlap=overlap, device=extractor.device, pad_value=float(prepared.array.min()))
    return pooled["global"].mean(dim=(1, 2, 3)).numpy().astype(np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("volumes", nargs="*", type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weights", type=Path)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--spacing", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dense-window", type=int, default=128)
    parser.add_argument("--overlaps", type=float, nargs="*", default=[0.5], help="dense-map overlaps to time (none: no dense rows)")
    parser.add_argument("--tiling", type=int, metavar="WINDOW", help="also measure tiled global vectors at this window")
    args = parser.parse_args()
    device = torch.device(args.device)
    weights = load_weights(args.weights) if args.weights else random_weights(args.width, args.spacing)
    volumes = args.volumes or [DATA / name for name in DEFAULT_VOLUMES]
    about = f"{weights.extra.get('weights_spec', args.weights)} (width {weights.model_config.width}), {weights.preprocess.spacing:g} mm, {device_name(device)}, torch {torch.__version__}"

    rows, whole = [], {}
    tiled: dict[tuple[str, float], np.ndarray] = {}
    for path in volumes:
        prepared = read_and_prepare(path, weights.preprocess)
        grid = "x".join(str(n) for n in prepared.array.shape)
        plain = FeatureExtractor(weights, EmbedConfig(), device)
        ms, features = timed(lambda: plain.features_of(prepared), device, args.repeats)
        whole[path.name] = features.vector.astype(np.float64)
        rows.append([path.name, grid, "global (whole volume)", features.windows, f"{ms:.0f}"])
        for overlap in args.overlaps:
            dense = FeatureExtractor(weights, EmbedConfig(dense=True, window=args.dense_window, overlap=overlap), device)
            ms, features = timed(lambda: dense.features_of(prepared), device, args.repeats)
            rows.append([path.name, grid, f"global + dense, window {args.dense_window}, overlap {overlap:g}", features.windows, f"{ms:.0f}"])
        if args.tiling:
            for overlap in (0.0, 0.5, 0.75):
                tiled[path.name, overlap] = tiled_vector(plain, prepared, args.tiling, overlap)
    print_table(f"gvsl embed, {about}", ["volume", "grid (z,y,x)", "outputs", "network passes", "ms / volume (median)"], rows)

    if args.tiling:
        names = list(whole)
        table = []
        for name in names:
            nearest = min((np.linalg.norm(whole[name] - whole[other]) for other in names if other != name), default=float("nan"))
            table.append([name, f"{np.linalg.norm(whole[name]):.3f}", *(f"{np.linalg.norm(tiled[name, o] - whole[name]):.3f}" for o in (0.0, 0.5, 0.75)), f"{nearest:.3f}"])
        print_table(
            f"global vector pooled from {args.tiling}-voxel windows instead of the whole volume, {about}",
            ["volume", "norm", "distance at overlap 0", "at 0.5", "at 0.75", "distance to the nearest other volume"],
            table,
        )


if __name__ == "__main__":
    main()
