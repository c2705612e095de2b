"""Features of pre-trained GVSL networks: one global vector per volume, and dense maps.

For each volume: read, bring onto the weights' canonical grid (``preprocess.prepare`` with
the checkpoint's preprocessing contract), run the U-Net, and keep

- the global vector: the global average pool of the bottleneck feature f_g of the whole
  volume (16·width values, 512 for the paper's network), float32. The encoder runs on
  the whole canonical volume in one pass, so the vector does not depend on how the volume
  would be cut into windows: with a trained width-8 network, the vectors of tilings with
  64-voxel windows at overlaps 0, 0.5 and 0.75 differed from each other by more than two
  different heads' vectors did (docs/embedding.md). Only sides above ``GLOBAL_MAX_SIDE``
  voxels are split, into windows of that side at overlap 0.5, averaged equally on f_g's
  1/16 grid.
- with ``dense``: the last decoder feature f_l (width channels, 32 for the paper's
  network) by sliding windows of the training patch (``sliding_window``), blended with
  Gaussian weights, as a vector image carrying the geometry of the grid it lies on: the
  input's own grid (linear interpolation back from the canonical grid) or the canonical
  grid itself.

Outputs go to one folder and are named after the inputs (``name`` below): a file given
directly is named by its file name without the extension; a volume found in a folder
keeps its path relative to that folder (``patient7/ct``), so equal file names in
different sub-folders do not collide. Volumes whose outputs exist are skipped, so an
interrupted run, or a SLURM array of ``--shard`` runs, resumes where it stopped.
``embed.json`` in the folder records the weights and settings; a later run with other
weights or settings into the same folder is refused, so vectors of different networks
never mix.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from gvsl_cli import __version__
from gvsl_cli.config import PreprocessConfig
from gvsl_cli.data import Skipped, check_not_constant, discover_named, failure_reason, read_and_prepare
from gvsl_cli.device import autocast, resolve_precision
from gvsl_cli.errors import ConfigError, InputError, is_out_of_memory
from gvsl_cli.geometry import Geometry
from gvsl_cli.preprocess import modality_misfit
from gvsl_cli.io import (
    DISK_ERRNOS,
    atomic_path,
    ensure_writable_folder,
    itk_warnings_hidden,
    nonorthogonal_direction_warning,
    refuse_single_slice_vectors,
    remove_empty_folders,
    write_vector_nifti,
)
from gvsl_cli.locking import RemovableLock
from gvsl_cli.temporaries import remove_abandoned
from gvsl_cli.sliding_window import sliding_window_inference, window_positions

FORMATS = ("npy", "jsonl")
DENSE_GRIDS = ("input", "canonical")
RUN_FILE = "embed.json"
DENSE_SUFFIX = "_features.nii.gz"
#: Dense-map window side when the weights do not record their training patch (the paper's 128³).
DEFAULT_WINDOW = 128
#: The global vector's encoder pass takes whole volumes up to this side (voxels, a multiple
#: of 16). At 256³ and width 32 its largest activation is 2 GiB in float32 (1 GiB in bf16).
GLOBAL_MAX_SIDE = 256
#: Overlap of the global pass's windows on volumes with a side above GLOBAL_MAX_SIDE.
GLOBAL_OVERLAP = 0.5


@dataclass(frozen=True)
class EmbedConfig:
    """Settings of ``gvsl embed``.

    Attributes:
        format: "npy" (``NAME.npy`` per volume) or "jsonl" (one line per volume in
            ``embeddings.jsonl``, or ``embeddings.shard-I-of-N.jsonl`` under ``--shard``).
        dense: also write the dense feature map f_l (``NAME_features.nii.gz``).
        dense_grid: "input" (the volume's own grid) or "canonical" (the network's grid).
        window: dense maps' sliding-window side in voxels (multiple of 16); None = the
            patch the weights were trained with, else 128.
        overlap: fraction shared by neighbouring dense-map windows.
        precision: autocast spec (``device.resolve_precision``): bf16 on CUDA by default.
        shard: (i, n): embed only the volumes whose position in the sorted list is i mod n.
        overwrite: compute and write again volumes whose outputs exist.
        include: glob patterns; when given, only volumes whose name or file name matches one.
        exclude: glob patterns; volumes whose name or file name matches one are left out.
        modality: intensity mapping "ct", "mr" or "auto" replacing the weights' contract's;
            None keeps the contract's.
    """

    format: Literal["npy", "jsonl"] = "npy"
    dense: bool = False
    dense_grid: Literal["input", "canonical"] = "input"
    window: int | None = None
    overlap: float = 0.5
    precision: str = "auto"
    shard: tuple[int, int] = (0, 1)
    overwrite: bool = False
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    modality: str | None = None

    def __post_init__(self) -> None:
        if self.modality is not None and self.modality not in ("ct", "mr", "auto"):
            raise ConfigError(f"modality must be one of ct, mr, auto; got {self.modality!r}")
        if self.format not in FORMATS:
            raise ConfigError(f"format must be one of {', '.join(FORMATS)}; got {self.format!r}")
        if self.dense_grid not in DENSE_GRIDS:
            raise ConfigError(f"dense grid must be one of {', '.join(DENSE_GRIDS)}; got {self.dense_grid!r}")
        if self.window is not None and (self.window < 16 or self.window % 16):
            raise ConfigError(f"window must be a multiple of 16 voxels, at least 16; got {self.window}", hint="e.g. --window 128")
        if not 0.0 <= self.overlap < 1.0:
            raise ConfigError(f"overlap must be in [0, 1), got {self.overlap:g}")
        index, count = self.shard
        if not (count >= 1 and 0 <= index < count):
            raise ConfigError(f"shard must be I/N with 0 <= I < N, got {index}/{count}", hint="e.g. --shard 0/4 ... --shard 3/4")


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N); e.g. ``--shard $SLURM_ARRAY_TASK_ID/4`` with ``--array=0-3``."""
    parts = text.strip().split("/")
    try:
        index, count = (int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"shard must be I/N (two whole numbers), got {text!r}", hint="e.g. --shard 0/4") from None
    return index, count


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class EmbedSource:
    """A volume to embed and the name its outputs take (a relative path, no extension)."""

    path: Path
    name: str


def _inside_embed_output(path: Path, root: Path, cache: dict[Path, bool]) -> bool:
    """True when a folder between ``root`` (excluded) and ``path`` holds an ``embed.json``:
    the output folder of an earlier ``gvsl embed`` run inside a data folder."""
    for folder in path.parents:
        if folder == root or root not in folder.parents:
            return False
        if folder not in cache:
            cache[folder] = (folder / RUN_FILE).is_file()
        if cache[folder]:
            return True
    return False


def collect_sources(
    inputs: Sequence[str],
    out_dir: Path,
    stdin_lines: Iterable[str] = (),
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> tuple[list[EmbedSource], list[Skipped]]:
    """Volumes named by ``inputs`` (folders, files, DICOM folders, lists, globs, ``-``,
    pipes; ``data.discover_named``) with their output names, and the inputs skipped.

    Names are ``data.Source.name``: a volume found in a folder given as input is named by
    its path relative to that folder; every other volume (a file given, a glob match, a
    list or stdin entry) by its path relative to the deepest folder holding all of them,
    so ``find ds -name ct.nii.gz | gvsl embed -`` names them ``p1/ct``, ``p2/ct``. Names
    follow the paths as given (symbolic links are not resolved for naming).

    Left out silently: volumes found inside ``out_dir`` (``skip_under``) or inside another
    folder holding an ``embed.json`` (earlier outputs within a data folder), and with
    ``include`` / ``exclude`` (``data.select``) the volumes not included or excluded.
    Volumes that would take the same name are all skipped, with a reason naming the other
    one.
    """
    found, skipped = discover_named(inputs, stdin_lines=stdin_lines, skip_under=out_dir, include=include, exclude=exclude)
    embed_folders: dict[Path, bool] = {}
    sources = [EmbedSource(s.path, s.name) for s in found if s.folder is None or not _inside_embed_output(s.path, s.folder, embed_folders)]

    by_name: dict[str, list[EmbedSource]] = {}
    for source in sources:
        by_name.setdefault(source.name, []).append(source)
    unique = []
    for name, group in by_name.items():
        if len(group) == 1:
            unique.append(group[0])
            continue
        for source in group:
            others = ", ".join(str(o.path) for o in group if o is not source)
            skipped.append(Skipped(str(source.path), f"takes the output name {name!r} as {others} does (use --exclude to leave one out)"))
    return unique, skipped


def shard_of(sources: Sequence[EmbedSource], shard: tuple[int, int]) -> list[EmbedSource]:
    """The sources of shard (i, n): every n-th volume of the list sorted by name, from i."""
    index, count = shard
    ordered = sorted(sources, key=lambda s: s.name)
    return ordered[index::count]


# --------------------------------------------------------------------------- features


@dataclass
class VolumeFeatures:
    """Features of one volume.

    Attributes:
        vector: (16·width,) float32, the mean of f_g over the volume.
        dense: (width, D, H, W) float32 f_l on ``grid`` (D = z), or None.
        grid: the canonical grid the features were computed on.
        original: the grid of the volume as read.
        modality: the intensity mapping used ("ct" or "mr").
        windows: network passes run (global, then dense).
        detected: what the raw intensities look like ("ct" or "mr", ``preprocess.detect_modality``).
    """

    vector: np.ndarray
    dense: np.ndarray | None
    grid: Geometry
    original: Geometry
    modality: str
    windows: int
    detected: str = ""


class FeatureExtractor:
    """A pre-trained U-Net applied by sliding windows; see the module docstring."""

    def __init__(self, weights, config: EmbedConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        # The weights' contract, with --modality's intensity mapping when given.
        self.preprocess: PreprocessConfig = weights.preprocess if config.modality is None else dataclasses.replace(weights.preprocess, modality=config.modality)
        self.mapping_source = "the weights' contract" if config.modality is None else "--modality"
        self.unet = weights.build_model(device).unet
        self.width = weights.model_config.width
        self.autocast_dtype = resolve_precision(config.precision, device)
        trained = weights.extra.get("patch")
        if config.window is not None:
            self.window = config.window
        elif trained:
            # The training patch, rounded up to the U-Net's multiple of 16.
            self.window = max(16, int(math.ceil(max(int(p) for p in trained) / 16)) * 16)
        else:
            self.window = DEFAULT_WINDOW

    def _global(self, windows: torch.Tensor) -> dict[str, torch.Tensor]:
        with autocast(self.device, self.autocast_dtype):
            return {"global": self.unet.bottleneck(windows)}  # the encoder alone: no decoder work

    def _dense(self, windows: torch.Tensor) -> dict[str, torch.Tensor]:
        with autocast(self.device, self.autocast_dtype):
            return {"dense": self.unet(windows).local}

    def __call__(self, path: Path, on_window: Callable[[int, int], None] | None = None) -> VolumeFeatures:
        """Read ``path``, prepare it with the weights' contract, and compute its features.

        Raises:
            InputError: unreadable, or constant on the canonical grid (e.g. a single slice
                that falls between the grid's planes): its features would mean nothing.
        """
        prepared = read_and_prepare(path, self.preprocess)
        check_not_constant(float(prepared.array.min()), float(prepared.array.max()), " after preprocessing")
        return self.features_of(prepared, on_window)

    def features_of(self, prepared, on_window: Callable[[int, int], None] | None = None) -> VolumeFeatures:
        """Features of a ``preprocess.PreparedVolume``; ``on_window(done, total)`` counts the
        network passes (global ones first)."""
        volume = torch.from_numpy(prepared.array)[None]
        shape = tuple(prepared.array.shape)
        common = dict(device=self.device, pad_value=float(prepared.array.min()), accumulate_device=self.device)
        global_windows = len(window_positions(shape, self.global_window(shape), GLOBAL_OVERLAP))
        dense_window = self.dense_window(shape)
        dense_windows = len(window_positions(shape, dense_window, self.config.overlap)) if self.config.dense else 0
        total = global_windows + dense_windows

        def progress(offset: int) -> Callable[[int, int], None]:
            return lambda done, _: on_window(offset + done, total) if on_window else None

        pooled = sliding_window_inference(volume, self._global, patch=self.global_window(shape), overlap=GLOBAL_OVERLAP, on_window=progress(0), **common)
        vector = pooled["global"].mean(dim=(1, 2, 3)).numpy().astype(np.float32)
        dense = None
        if self.config.dense:
            blended = sliding_window_inference(volume, self._dense, patch=dense_window, overlap=self.config.overlap, on_window=progress(global_windows), **common)
            dense = blended["dense"].numpy()
        return VolumeFeatures(vector=vector, dense=dense, grid=prepared.grid, original=prepared.original, modality=prepared.modality, windows=total, detected=prepared.detected)

    def dense_window(self, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """The dense pass's cubic window: ``self.window`` voxels a side, at most the largest
        side of the (D, H, W) volume (a multiple of 16 on the canonical grid): a larger one
        would only pad (``--window 100000`` asked for a 4 PB window)."""
        return (min(self.window, max(shape)),) * 3

    @staticmethod
    def global_window(shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """The global pass's window: the whole (D, H, W) volume, each side capped at
        ``GLOBAL_MAX_SIDE``."""
        return tuple(min(n, GLOBAL_MAX_SIDE) for n in shape)


def dense_geometry(features: VolumeFeatures, grid: str) -> Geometry:
    """The grid a dense map is written on: the canonical one or the volume's own."""
    return features.grid if grid == "canonical" else features.original


def write_dense_map(features: VolumeFeatures, grid: str, path: Path) -> Path:
    """Write the dense features as a float32 vector NIfTI on the canonical or the input grid.

    Back on the input grid each component is interpolated linearly (the features are
    smooth at the canonical spacing); outside the canonical grid the value is 0. The
    components are resampled and written one at a time (``io.write_vector_nifti``), so
    memory holds the canonical map and one input-grid component, never the whole map on
    the input grid (a fine CT's map on its own grid is gigabytes).
    """
    target = dense_geometry(features, grid)
    channels = features.dense.shape[0]
    if grid == "canonical":
        return write_vector_nifti(path, target, channels, lambda channel: features.dense[channel])
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(n) for n in target.size])
    resampler.SetOutputSpacing(target.spacing)
    resampler.SetOutputOrigin(target.origin)
    resampler.SetOutputDirection(target.direction)
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetDefaultPixelValue(0.0)

    def resampled(channel: int) -> np.ndarray:
        component = sitk.GetImageFromArray(features.dense[channel])
        features.grid.apply_to(component)
        return sitk.GetArrayFromImage(resampler.Execute(component))

    return write_vector_nifti(path, target, channels, resampled)


# --------------------------------------------------------------------------- outputs


def run_description(weights, config: EmbedConfig, window: int, precision: str, preprocess: PreprocessConfig | None = None) -> dict:
    """What ``embed.json`` records: everything that decides the outputs' values.

    ``preprocess`` is the contract in effect (the weights' with ``--modality`` applied;
    default the weights'), so a folder made with another intensity mapping is refused.
    """
    preprocess = weights.preprocess if preprocess is None else preprocess
    return {
        "gvsl_version": __version__,
        "weights": weights.extra.get("weights_spec"),
        "weights_checksum": _weights_checksum(weights),
        "model_config": weights.model_config.to_dict(),
        "preprocess": preprocess.to_dict(),
        "precision": precision,
        "global_vector": {
            "feature": "global average pool of the U-Net bottleneck f_g of the whole canonical volume",
            "max_side_per_pass": GLOBAL_MAX_SIDE,
            "overlap_above_it": GLOBAL_OVERLAP,
            "dim": 16 * weights.model_config.width,
            "dtype": "float32",
        },
        "dense": {"feature": "last decoder feature f_l", "channels": weights.model_config.width, "window": window, "overlap": config.overlap, "grid": config.dense_grid}
        if config.dense
        else None,
        "format": config.format,
    }


def _weights_checksum(weights) -> str:
    from gvsl_cli.checkpoint import state_checksum

    return state_checksum(weights.state_dict)


#: Entries of embed.json that must agree for two runs to share an output folder (the
#: outputs' values depend on them; the version and the weights' spelling do not matter),
#: with the words the refusal uses. "dense" is compared only when both runs write dense maps.
_MUST_AGREE = {
    "weights_checksum": "weights (checksum {stored} here, {given} given)",
    "model_config": "network shape",
    "preprocess": "preprocessing (spacing, intensity mapping)",
    "precision": "precision ({stored} here, {given} given)",
    "global_vector": "global-vector definition (another gvsl version)",
    "format": "format ({stored} here, {given} given)",
}


def _holds_outputs(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds any vector, JSON line or dense map of an earlier run."""
    for pattern in ("**/*.npy", f"**/*{DENSE_SUFFIX}"):
        if next(out_dir.glob(pattern), None) is not None:
            return True
    return any(path.stat().st_size > 0 for path in out_dir.glob("embeddings*.jsonl"))


def check_output_folder(out_dir: Path, description: dict) -> bool:
    """Refuse ``out_dir`` if it holds outputs made with other weights or settings.

    Returns:
        True when ``embed.json`` must be (re)written before the first output: there is
        none, it belongs to a folder without outputs (a first run that failed or was
        stopped early), or this run adds the first dense maps to a folder of vectors.

    Raises:
        InputError: naming what differs.
    """
    record = out_dir / RUN_FILE
    if not record.exists():
        return True
    try:
        stored = json.loads(record.read_text())
    except (OSError, ValueError):
        raise InputError(f"{record}: not a readable gvsl embed record", hint="choose another -o folder, or remove that file") from None
    description = json.loads(json.dumps(description))  # tuples as lists, as stored
    if not _holds_outputs(out_dir):
        return True
    differing = [words.format(stored=stored.get(key), given=description.get(key)) for key, words in _MUST_AGREE.items() if stored.get(key) != description.get(key)]
    if stored.get("dense") and description.get("dense") and stored["dense"] != description["dense"]:
        differing.append("dense-map settings (window, overlap, grid)")
    if differing:
        raise InputError(
            f"{out_dir} holds embeddings made with other {'; other '.join(differing)} (see {RUN_FILE})",
            hint="choose another -o folder, or give the same weights and settings",
        )
    return bool(description.get("dense")) and not stored.get("dense")


def write_description(out_dir: Path, description: dict) -> None:
    with atomic_path(out_dir / RUN_FILE) as tmp:
        tmp.write_text(json.dumps(description, indent=2) + "\n")


def _complete_lines(data: bytes) -> tuple[set[str], int]:
    """Names on the whole lines of JSON-lines ``data`` and the length of its complete part
    (everything up to the last newline). Lines that are not a gvsl row are ignored."""
    names: set[str] = set()
    end = data.rfind(b"\n") + 1
    for line in data[:end].splitlines():
        try:
            names.add(json.loads(line)["name"])
        except (ValueError, KeyError, TypeError):
            continue
    return names, end


class JsonLinesOutput:
    """One shard's ``embeddings*.jsonl``: a line per volume, appended and flushed to disk
    as each volume finishes, by one process at a time (a lock file next to it while it writes).

    A last line torn by a kill (no final newline) is cut off when the file is opened again.
    ``done`` holds the names on the complete lines of every ``embeddings*.jsonl`` in the
    folder, so a run with other shards (or none) skips what any shard wrote.

    Raises:
        InputError: another process is writing this file.
    """

    def __init__(self, path: Path, *, fresh: bool = False) -> None:
        self.path = path
        self._lock = RemovableLock(path.with_name(path.name + ".lock"))
        if not self._lock.try_acquire():
            raise InputError(f"{path}: another gvsl embed is writing this file now", hint="wait for it, or give each run its own --shard or -o")
        try:
            self.done = self._read_done(fresh)
        except BaseException:
            self.close()
            raise

    def _read_done(self, fresh: bool) -> set[str]:
        if fresh:
            self.path.unlink(missing_ok=True)
        done: set[str] = set()
        for other in sorted(self.path.parent.glob("embeddings*.jsonl")):
            data = other.read_bytes()
            names, end = _complete_lines(data)
            if other == self.path and end != len(data):
                with open(self.path, "r+b") as handle:
                    handle.truncate(end)
            if other != self.path and fresh:
                continue  # --overwrite: this run computes its volumes again
            done |= names
        return done

    def write(self, row: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, allow_nan=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.done.add(row["name"])

    def close(self) -> None:
        self._lock.release()


def jsonl_name(shard: tuple[int, int]) -> str:
    index, count = shard
    return "embeddings.jsonl" if count == 1 else f"embeddings.shard-{index}-of-{count}.jsonl"


# --------------------------------------------------------------------------- the job


@dataclass
class EmbedSummary:
    """What a run did. ``failed`` holds one (path, reason) per volume that could not be done."""

    computed: list[str] = field(default_factory=list)
    already_done: list[str] = field(default_factory=list)
    failed: list[Skipped] = field(default_factory=list)
    skipped_inputs: list[Skipped] = field(default_factory=list)
    seconds: float = 0.0
    dim: int = 0
    outputs: str = ""


class Reporter:
    """Progress of an embedding run (the CLI renders it; the default prints nothing)."""

    def inputs_skipped(self, skipped: Sequence[Skipped]) -> None: ...

    def start(self, total: int, already_done: int) -> None: ...

    def volume_started(self, index: int, total: int, source: EmbedSource) -> None: ...

    def windows_done(self, done: int, total: int) -> None: ...

    def volume_done(self, source: EmbedSource, seconds: float) -> None: ...

    def volume_failed(self, source: EmbedSource, reason: str) -> None: ...

    def volume_warning(self, source: EmbedSource, text: str) -> None: ...


def _volume_failure(exc: Exception, source: EmbedSource, device: torch.device) -> str:
    """One line saying why ``source`` could not be embedded."""
    if is_out_of_memory(exc):
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if device.type == "cpu":
            return "the CPU ran out of memory for this volume (try --dense-grid canonical, or a smaller --window)"
        return f"the {device.type.upper()} ran out of memory for this volume (try --device cpu, or --dense-grid canonical)"
    return failure_reason(exc, source.path)


def embed(
    inputs: Sequence[str],
    out_dir: Path,
    weights,
    config: EmbedConfig,
    device: torch.device,
    *,
    stdin_lines: Iterable[str] = (),
    reporter: Reporter | None = None,
) -> EmbedSummary:
    """Embed every volume named by ``inputs`` (its shard) into ``out_dir``.

    Args:
        weights: a ``checkpoint.LoadedWeights``.

    Raises:
        InputError: no volume to embed, an output folder that cannot be written or holds
            outputs of other weights/settings, or another process writing the same JSON
            lines. A volume that fails (unreadable, constant, out of memory) is reported
            through ``reporter`` and listed in the summary, not raised: the others are
            still done.
    """
    reporter = reporter or Reporter()
    start = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: output path exists and is not a folder", hint="give a folder with -o")
    sources, skipped_inputs = collect_sources(inputs, out_dir, stdin_lines, include=config.include, exclude=config.exclude)
    reporter.inputs_skipped(skipped_inputs)
    if not sources:
        raise InputError("no volume to embed" + (f": {len(skipped_inputs)} input(s) skipped (listed above)" if skipped_inputs else ""), hint="give NIfTI, NRRD, MHA/MHD files, DICOM folders, folders holding them, or - with paths on stdin")
    mine = shard_of(sources, config.shard)
    extractor = FeatureExtractor(weights, config, device)
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[extractor.autocast_dtype]
    description = run_description(weights, config, extractor.window, precision, extractor.preprocess)
    created = ensure_writable_folder(out_dir)
    try:
        describe_first = check_output_folder(out_dir, description)
    except BaseException:
        remove_empty_folders(created)
        raise
    summary = EmbedSummary(skipped_inputs=skipped_inputs, dim=16 * extractor.width)

    lines = None
    try:
        if config.format == "jsonl":
            lines = JsonLinesOutput(out_dir / jsonl_name(config.shard), fresh=config.overwrite)
        summary.outputs = str(lines.path) if lines else str(out_dir)
        try:
            _embed_all(mine, extractor, config, out_dir, lines, summary, reporter, description if describe_first else None)
        finally:
            if lines is not None:
                lines.close()
    finally:
        remove_empty_folders(created)  # every volume failed or it was stopped: no empty folder left
    summary.seconds = time.perf_counter() - start
    return summary


def _embed_all(mine, extractor: FeatureExtractor, config: EmbedConfig, out_dir: Path, lines, summary: EmbedSummary, reporter: Reporter, description: dict | None) -> None:
    def vector_path(source: EmbedSource) -> Path:
        return out_dir / f"{source.name}.npy"

    def dense_path(source: EmbedSource) -> Path:
        return out_dir / f"{source.name}{DENSE_SUFFIX}"

    def is_done(source: EmbedSource) -> bool:
        vector_done = source.name in lines.done if lines else vector_path(source).exists()
        return vector_done and (not config.dense or dense_path(source).exists())

    todo = []
    for source in mine:
        if not config.overwrite and is_done(source):
            summary.already_done.append(source.name)
        else:
            todo.append(source)
    # Partial maps that runs killed by SIGKILL left under temporary names (a dense map is
    # GBs). Shards of a SLURM array share the folder: each looks at its own volumes' names,
    # and a live shard's temporaries are kept (locked, and written lately).
    remove_abandoned([out_dir / RUN_FILE, *(path for source in todo for path in (vector_path(source), dense_path(source)))])
    reporter.start(len(todo), len(summary.already_done))
    for index, source in enumerate(todo, 1):
        reporter.volume_started(index, len(todo), source)
        began = time.perf_counter()
        try:
            features = extractor(source.path, on_window=reporter.windows_done)
        except Exception as exc:  # noqa: BLE001 - one volume's failure must not end a run over thousands
            reason = _volume_failure(exc, source, extractor.device)
            summary.failed.append(Skipped(str(source.path), reason))
            reporter.volume_failed(source, reason)
            continue
        dense = features.dense is not None
        if dense:
            try:
                refuse_single_slice_vectors(dense_geometry(features, config.dense_grid).size, "its dense feature map")
            except InputError as exc:
                summary.failed.append(Skipped(str(source.path), str(exc)))
                reporter.volume_failed(source, str(exc))
                continue
        misfit = modality_misfit(extractor.preprocess.modality, features.detected)
        if misfit:
            reporter.volume_warning(source, f"{misfit} ({extractor.mapping_source}); give --modality if the contract does not fit the data")
        direction = nonorthogonal_direction_warning(features.original, None) if dense and config.dense_grid == "input" else None
        if direction:
            reporter.volume_warning(source, direction)
        if description is not None:
            # Written with the first output, so a run that embedded nothing leaves no claim.
            write_description(out_dir, description)
            description = None
        # The dense map first: a volume counts as done when its vector exists, so the
        # vector is written last.
        dense_written = False
        try:
            if dense:
                with itk_warnings_hidden(direction is not None):
                    write_dense_map(features, config.dense_grid, dense_path(source))
                dense_written = True
            if lines is None:
                with atomic_path(vector_path(source)) as tmp:
                    with open(tmp, "wb") as handle:
                        np.save(handle, features.vector)
        except OSError as exc:
            if exc.errno in DISK_ERRNOS:
                raise  # every later volume would fail the same way: stop here
            # This volume's own name (too long, a character the file system refuses).
            if dense_written:  # half of this volume's outputs
                dense_path(source).unlink(missing_ok=True)
            reason = failure_reason(exc, source.path)
            summary.failed.append(Skipped(str(source.path), reason))
            reporter.volume_failed(source, reason)
            continue
        if lines is not None:
            lines.write({"name": source.name, "input": str(source.path), "modality": features.modality, "vector": [float(v) for v in features.vector]})
        summary.computed.append(source.name)
        reporter.volume_done(source, time.perf_counter() - began)
