"""Speed of ``gvsl embed`` per volume, and how much the window overlap changes the vectors.

    python benchmarks/bench_embed.py [--device cpu|cuda] [--weights W | --width 32]
        [--spacing 1.0] [--windows 128] [--overlaps 0 0.5] [--repeats 3] [--dense] [VOLUME ...]

For each volume (default: the MR and CT volumes in /work/shared/data) and each (window,
overlap), times ``FeatureExtractor`` on the prepared volume (reading and preprocessing
excluded: they do not depend on the network) as the median of ``--repeats`` runs after a
warm-up, and prints a Markdown table with the device named: windows per volume, ms per
volume, and the cosine similarity of the global vector to the one at the first overlap
listed. Without ``--weights`` the network has random weights (seeded) at ``--width`` with
the ``--spacing`` contract: the timing does not depend on the weights, the cosine does.
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

DATA = Path("/work/shared/data")
DEFAULT_VOLUMES = ["mr_colin27_t1.nii.gz", "mr_icbm152_t1.nii.gz", "ct_head_scaled.nii.gz"]


def random_weights(width: int, spacing: float) -> LoadedWeights:
    torch.manual_seed(0)
    model = GVSL(ModelConfig(width=width))
    return LoadedWeights("gvsl", model.config, PreprocessConfig(spacing=spacing), model.state_dict(), True, {"weights_spec": f"random width {width}"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("volumes", nargs="*", type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weights", type=Path)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--spacing", type=float, default=1.0)
    parser.add_argument("--windows", type=int, nargs="+", default=[128])
    parser.add_argument("--overlaps", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dense", action="store_true", help="also blend the dense map (time only)")
    args = parser.parse_args()
    device = torch.device(args.device)
    weights = load_weights(args.weights) if args.weights else random_weights(args.width, args.spacing)
    volumes = args.volumes or [DATA / name for name in DEFAULT_VOLUMES]

    rows = []
    for path in volumes:
        prepared = read_and_prepare(path, weights.preprocess)
        reference = None
        for window in args.windows:
            for overlap in args.overlaps:
                extractor = FeatureExtractor(weights, EmbedConfig(window=window, overlap=overlap, dense=args.dense), device)
                features = None
                times = []
                for repeat in range(args.repeats + 1):
                    synchronize(device)
                    start = time.perf_counter()
                    features = extractor.features_of(prepared)
                    synchronize(device)
                    if repeat:
                        times.append((time.perf_counter() - start) * 1000.0)
                if reference is None:
                    reference = features.vector
                cosine = float(np.dot(reference, features.vector) / (np.linalg.norm(reference) * np.linalg.norm(features.vector)))
                rows.append([path.name, "x".join(str(n) for n in prepared.array.shape), window, overlap, features.windows, f"{statistics.median(times):.0f}", f"{cosine:.5f}"])
    title = f"gvsl embed, {weights.extra.get('weights_spec', args.weights)} (width {weights.model_config.width}), {weights.preprocess.spacing:g} mm, {device_name(device)}, torch {torch.__version__}"
    print_table(title, ["volume", "grid (z,y,x)", "window", "overlap", "windows", "ms / volume (median)", "cosine to first overlap"], rows)


if __name__ == "__main__":
    main()
