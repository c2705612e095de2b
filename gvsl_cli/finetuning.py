"""Supervised segmentation from GVSL weights (``gvsl finetune``) on ``training.run_training``.

``finetune(config)`` finds and checks the labelled cases (``segmentation_data``), prepares
them with the weights' preprocessing contract, splits off validation cases, builds a
``SegmentationNet`` (the GVSL U-Net + a 1³ head) and trains it with ``FinetuneTask``:

    patches (1/3 centred on foreground)  --(device)-->  small rotation/scaling, brightness, gamma
    logits = SegmentationNet(patch);  loss = CE + (1 - mean foreground soft Dice)

Modes: ``finetune`` trains everything from the pre-trained U-Net, ``linear`` freezes the
U-Net and trains the head alone, ``scratch`` starts from random weights.

Every ``val_every`` iterations (and at the end) the validation cases are predicted whole
by sliding windows and scored by per-class Dice on the canonical grid; that is done in the
loop's checkpoint callback, so the loop itself is the one pre-training uses.

Run folder (``-o``): ``best.pt`` (highest mean foreground Dice; what ``gvsl segment``
uses), ``last.pt`` (resumable: model, optimizer, scaler, RNG, iteration, settings),
``metrics.jsonl`` (a loss row per iteration, a validation row per validation),
``run.json`` (settings and split), ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from gvsl_cli import spatial
from gvsl_cli.augment import SpatialConfig, apply_spatial, draw_spatial, spatial_grid
from gvsl_cli.checkpoint import load_state_strict, save_checkpoint
from gvsl_cli.config import ModelConfig, PreprocessConfig, check_spacing
from gvsl_cli.data import STREAM_AUGMENT, iteration_seed
from gvsl_cli.device import resolve_device, resolve_precision
from gvsl_cli.distributed import DistContext
from gvsl_cli.errors import CheckpointError, ConfigError, InputError
from gvsl_cli.io import atomic_path, ensure_writable_folder
from gvsl_cli.launcher import torchrun_world_size
from gvsl_cli.losses import dice_ce_loss
from gvsl_cli.model import SegmentationNet
from gvsl_cli.segmentation import BEST_FILE, LAST_FILE, SEGMENTATION_KEY, check_overlap, dice_per_class, predict_logits
from gvsl_cli.segmentation_data import LabelSet, PatchSampler, PreparedCase, effective_patch, find_cases, fold_split, prepare_cases, read_split_file, split_cases
from gvsl_cli.training import (
    METRICS_FILE,
    LoopOptions,
    compile_decision,
    compiled_step_works,
    Reporter,
    SilentReporter,
    check_cpu_bf16_patch,
    check_learning_rate,
    check_loop_counts,
    check_seed,
    check_workers,
    download_reporter,
    iterations_remain,
    exclusive_run_folder,
    open_run,
    restore_training_state,
    resumed_schedule,
    run_training,
    schedule_of,
    training_state,
    truncate_metrics,
)

MODES = ("finetune", "linear", "scratch")
#: Adam learning rates by mode: a pre-trained U-Net is moved gently; a network from
#: scratch takes larger steps; a lone 1³ head (a few dozen weights) needs much larger ones
#: (docs/finetuning.md: 1e-3 barely moved it in 300 iterations, 1e-2 did).
DEFAULT_LR = {"finetune": 1e-4, "linear": 1e-2, "scratch": 3e-4}
RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
#: Options a plain --resume keeps from the run (``training.resumed_schedule``).
SCHEDULE = ("val_every", "log_every", "time_limit_s")
#: Random rotation (±15° about each axis) and scaling (0.85-1.15 per axis) of training
#: patches; no flips (left/right labels) and no elastic deformation.
AUGMENTATION = SpatialConfig(rotation=math.pi / 12, scale=(0.85, 1.15), translation=0.0, shear=0.0, elastic_alpha=(0.0, 0.0))
#: Intensity augmentation of training patches (nnU-Net's multiplicative brightness and
#: gamma, each applied to a patch with its probability): subjects' intensities differ even
#: after the percentile mapping, and a network trained on few cases otherwise learns the
#: training cases' exact grey levels (seen in docs/finetuning.md's example).
BRIGHTNESS = (0.75, 1.25)
BRIGHTNESS_PROBABILITY = 0.3
GAMMA = (0.7, 1.5)
GAMMA_PROBABILITY = 0.3


def augment_intensities(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random brightness (x·b) and gamma (x^γ on [0, 1]) per patch of (B, 1, D, H, W) images.

    Each patch gets each change with its probability (per-item masks, no host branching);
    gamma acts on the patch's own [min, max] range so CT and MR alike keep their range.
    """
    batch, device = images.shape[0], images.device
    shape = (batch, 1, 1, 1, 1)

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, generator=generator, device=device)

    brightness = torch.where(torch.rand(shape, generator=generator, device=device) < BRIGHTNESS_PROBABILITY, uniform(*BRIGHTNESS), torch.ones(shape, device=device))
    gamma = torch.where(torch.rand(shape, generator=generator, device=device) < GAMMA_PROBABILITY, uniform(*GAMMA), torch.ones(shape, device=device))
    low = images.amin(dim=(1, 2, 3, 4), keepdim=True)
    span = (images.amax(dim=(1, 2, 3, 4), keepdim=True) - low).clamp_min(1e-6)
    images = low + span * ((images - low) / span).clamp(0.0, 1.0) ** gamma
    return images * brightness


#: Settings that define a run; on --resume they come from the checkpoint and may not change.
RUN_DEFINING = ("dataset", "images", "labels", "weights", "mode", "width", "spacing", "modality", "batch", "patch", "lr", "val_fraction", "fold", "folds", "splits", "augment", "seed")


@dataclass(frozen=True)
class FinetuneConfig:
    """Options of one ``gvsl finetune`` run.

    Attributes:
        dataset: nnU-Net raw dataset folder; or ``images`` and ``labels`` folders.
        run_dir: run folder.
        weights: pre-trained weights (manifest name, file, URL); None for ``mode="scratch"``.
        mode: "finetune", "linear" or "scratch".
        width: U-Net width for scratch (weights fix it otherwise).
        spacing, modality: override the weights' preprocessing contract (None: keep it;
            scratch defaults to 1 mm and auto).
        iters, batch, patch, lr (None: ``DEFAULT_LR[mode]``), seed: training.
        val_fraction: share of the cases held out for validation (deterministic from seed).
        fold, folds: validate on cross-validation fold ``fold`` of ``folds`` instead
            (``segmentation_data.fold_split``); with ``splits``, entry ``fold`` of that
            nnU-Net ``splits_final.json`` (``segmentation_data.read_split_file``).
        val_every: validate (and checkpoint) every this many iterations.
        overlap: sliding-window overlap of validation predictions.
        augment: random rotation, scaling, brightness and gamma of training patches.
        device, precision: see ``gvsl_cli.device``.
        workers: threads preparing cases.
        resume: continue the run in ``run_dir``.
        log_every: iterations between metric flushes.
        time_limit_s: stop cleanly (validation, checkpoint) after this many seconds of training.
        compile: ``torch.compile`` the network of the training step (validation and
            checkpoints use the plain module); None decides (``training.compile_decision``).
        explicit: names of the options the user set (on resume the rest come from the run).
    """

    dataset: str | None = None
    images: str | None = None
    labels: str | None = None
    run_dir: str = "gvsl-finetune"
    weights: str | None = None
    mode: str = "finetune"
    width: int = 32
    spacing: float | None = None
    modality: str | None = None
    iters: int = 5000
    batch: int = 2
    patch: int = 128
    lr: float | None = None
    val_fraction: float = 0.2
    fold: int | None = None
    folds: int = 5
    splits: str | None = None
    val_every: int = 250
    overlap: float = 0.5
    augment: bool = True
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    workers: int = 2
    resume: bool = False
    log_every: int = 10
    time_limit_s: float | None = None
    compile: bool | None = None
    explicit: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        check_loop_counts(self.iters, self.val_every, self.log_every, save_flag="--val-every")
        if self.mode not in MODES:
            raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.batch < 1:
            raise ConfigError(f"--batch must be >= 1, got {self.batch}")
        if self.patch < 16 or self.patch % 16:
            raise ConfigError(f"--patch must be a multiple of 16 and >= 16 (the U-Net halves it four times), got {self.patch}")
        if self.lr is not None:
            check_learning_rate(self.lr)
        check_workers(self.workers)
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must be in [0, 1), got {self.val_fraction:g}")
        check_overlap(self.overlap)
        if self.folds < 2:
            raise ConfigError(f"--folds must be >= 2, got {self.folds}")
        if self.splits is not None and self.fold is None:
            raise ConfigError("--splits needs --fold (which entry of the splits file to validate on)")
        if "folds" in self.explicit and self.fold is None and not self.resume:
            raise ConfigError(
                "--folds needs --fold (which fold to validate on); without --fold the validation cases are drawn with --val-fraction",
                hint="add --fold K (0-based), or leave out --folds",
            )
        if self.fold is not None:
            if "val_fraction" in self.explicit:
                raise ConfigError("--fold and --val-fraction both choose the validation cases; give one of them")
            if self.fold < 0:
                raise ConfigError(f"--fold must be >= 0, got {self.fold}")
            if self.splits is None and not 0 <= self.fold < self.folds:
                raise ConfigError(f"--fold must be in 0..{self.folds - 1} (with --folds {self.folds}), got {self.fold}")
        check_seed(self.seed)
        if self.time_limit_s is not None and self.time_limit_s <= 0:
            raise ConfigError(f"--time-limit must be > 0, got {self.time_limit_s} s")
        if self.spacing is not None:
            check_spacing(self.spacing)
        if self.modality is not None and self.modality not in ("ct", "mr", "auto"):
            raise ConfigError(f"--modality must be one of ct, mr, auto; got {self.modality!r}")
        ModelConfig(width=self.width)  # a width that is no multiple of 8: one line, now
        if not self.resume and self.dataset is None and (self.images is None or self.labels is None):
            raise ConfigError("no dataset given", hint="gvsl finetune DATASET_FOLDER (nnU-Net layout), or --images DIR --labels DIR")
        if self.mode == "scratch" and self.weights is not None:
            raise ConfigError("--mode scratch starts from random weights; drop --weights (or use --mode finetune)")
        if self.mode != "scratch" and self.weights is None and not self.resume:
            raise ConfigError(f"--mode {self.mode} needs --weights (a manifest name, a file or a URL)", hint="or use --mode scratch to train from random weights")
        if self.mode != "scratch" and "width" in self.explicit:
            raise ConfigError("--width is for --mode scratch; the weights decide the width otherwise")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.mode]

    def run_settings(self) -> dict[str, Any]:
        settings = {name: _comparable(name, getattr(self, name)) for name in RUN_DEFINING}
        settings["lr"] = self.learning_rate  # the effective value, so an explicit default matches
        return settings


def _comparable(name: str, value: Any) -> Any:
    """A run-defining setting as stored and compared on --resume: folders and a weights file
    as absolute paths (a requeue may start in another folder); everything else as given."""
    if value is None:
        return None
    if name in ("dataset", "images", "labels", "splits"):
        return os.path.abspath(value)
    if name == "weights" and Path(value).expanduser().is_file():
        return os.path.abspath(Path(value).expanduser())
    return value


@dataclass
class Validation:
    """Per-class Dice of one validation pass (NaN: class absent from prediction and truth)."""

    iteration: int
    dice: dict[str, float]
    per_case: dict[str, list[float]] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        """Mean foreground Dice over the classes (0 when no class was scored)."""
        values = [v for v in self.dice.values() if not math.isnan(v)]
        return float(np.mean(values)) if values else 0.0

    def to_row(self) -> dict[str, Any]:
        """A metrics.jsonl row: mean, per-class and per-case Dice (NaN written as null)."""

        def clean(value: float):
            return None if math.isnan(value) else round(value, 6)

        names = list(self.dice)
        return {
            "iteration": self.iteration,
            "val_mean_dice": round(self.mean, 6),
            "val_dice": {k: clean(v) for k, v in self.dice.items()},
            "val_case_dice": {case: dict(zip(names, map(clean, scores))) for case, scores in self.per_case.items()},
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Validation":
        return cls(iteration=int(row["iteration"]), dice={k: (float("nan") if v is None else float(v)) for k, v in row["val_dice"].items()})


@dataclass
class FinetuneSummary:
    """What a run did (also written to summary.json)."""

    run_dir: str
    mode: str
    iteration: int
    start_iteration: int
    stopped: str | None
    seconds: float
    iterations_per_second: float
    device: str
    precision: str
    compiled: bool
    patch: tuple[int, int, int]
    labels: dict[str, int]
    train_cases: list[str]
    val_cases: list[str]
    validated_on_training_cases: bool
    initial: dict[str, Any]
    best: dict[str, Any]
    last: dict[str, Any]
    last_losses: dict[str, float]
    best_checkpoint: str
    last_checkpoint: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class FinetuneTask:
    """One supervised step: sampled patches, device-side rotation/scaling/brightness/gamma, Dice + CE."""

    loss_names = ("loss", "dice_loss", "ce")  # dice_loss = 1 − soft Dice: it goes down

    def __init__(self, sampler: PatchSampler, batch: int, *, seed: int, device: torch.device, augment: bool) -> None:
        self.sampler = sampler
        self.batch_size = batch
        self.seed = seed
        self.device = device
        self.augment = augment
        self.generator = torch.Generator(device=device)

    def batch(self, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 1, *patch) float32 and class indices (B, *patch) int64 on the device."""
        images, targets = self.sampler.sample(iteration, self.batch_size)
        images = torch.from_numpy(images).to(self.device, non_blocking=True)
        targets = torch.from_numpy(targets).to(self.device, non_blocking=True)
        if not self.augment:
            return images, targets
        self.generator.manual_seed(iteration_seed(self.seed, 0, iteration, STREAM_AUGMENT))
        patch = self.sampler.patch
        params = draw_spatial(AUGMENTATION, images.shape[0], patch, self.generator, self.device)
        grid = spatial_grid(params, patch, self.sampler.region)
        images = augment_intensities(apply_spatial(images, grid), self.generator)
        # Labels by nearest neighbour: a class index is never averaged with its neighbour's.
        targets = spatial.sample(targets[:, None].float(), grid, mode="nearest")[:, 0].long()
        return images, targets

    def losses(self, model: torch.nn.Module, batch) -> dict[str, torch.Tensor]:
        images, targets = batch
        total, dice, ce = dice_ce_loss(model(images), targets)
        return {"loss": total, "dice_loss": dice, "ce": ce}


def validate(model: SegmentationNet, cases: list[PreparedCase], label_set: LabelSet, *, iteration: int, patch, device, autocast_dtype, overlap: float) -> Validation:
    """Per-class Dice (mean over ``cases``) of whole-volume predictions on the canonical grid."""
    per_case = {}
    for case in cases:
        logits = predict_logits(model, case.image, patch=patch, device=device, autocast_dtype=autocast_dtype, overlap=overlap)
        prediction = logits.argmax(dim=0).numpy()
        per_case[case.name] = dice_per_class(prediction, case.target, label_set.count)
    scores = np.array(list(per_case.values()), dtype=np.float64)  # (cases, K-1)
    with np.errstate(all="ignore"):
        means = [float(np.nanmean(column)) if not np.all(np.isnan(column)) else float("nan") for column in scores.T]
    return Validation(iteration=iteration, dice=dict(zip(label_set.names[1:], means)), per_case=per_case)


def _class(label_set: LabelSet, index: int) -> str:
    return f"{label_set.names[index]} ({label_set.values[index]})"


def _listed(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def coverage_warnings(cases: list[PreparedCase], label_set: LabelSet, spacing: float) -> list[str]:
    """Warnings for classes the model cannot learn from the label maps: one no label map
    holds (a class of dataset.json), and one that a label map holds but that resampling
    onto the canonical grid (``spacing`` mm) erased: a structure smaller than about one
    canonical voxel. The class stays in the model either way (segment can still write it).
    """
    warnings = []
    absent = [label_set.names[k] for k in range(1, label_set.count) if not any(k in c.classes_in_file for c in cases)]
    if absent:
        # The model would still learn to predict them (from nothing): say so.
        warnings.append(f"warning: no case holds any voxel of {', '.join(absent)}: the model cannot learn these classes; remove them from dataset.json or add cases that have them")
    for k in range(1, label_set.count):
        holding = [c.name for c in cases if k in c.classes_in_file]
        erased = [c.name for c in cases if k in c.classes_in_file and k not in c.classes_on_grid]
        if not erased:
            continue
        where = f"is present in {_listed(erased)} but vanishes at {spacing:g} mm (smaller than a voxel there)"
        if len(erased) == len(holding):
            warnings.append(f"warning: {_class(label_set, k)} {where}: no training patch shows it, so the model cannot learn it (a finer --spacing may keep it)")
        else:
            warnings.append(f"warning: {_class(label_set, k)} {where}: it is learnt from the {len(holding) - len(erased)} other case(s) holding it only")
    return warnings


def split_warnings(train_cases: list[PreparedCase], val_cases: list[PreparedCase], label_set: LabelSet) -> list[str]:
    """Warnings for classes on the canonical grid of validation cases only: with no training
    case holding them, the model cannot learn them, and their validation Dice stays 0.
    (Classes in no case at all are ``coverage_warnings``'.)"""
    warnings = []
    for k in range(1, label_set.count):
        if any(k in c.classes_on_grid for c in train_cases):
            continue
        validation_only = [c.name for c in val_cases if k in c.classes_on_grid]
        if validation_only:
            warnings.append(
                f"warning: no training case holds {_class(label_set, k)}, only the validation case(s) {_listed(validation_only)}: "
                "the model cannot learn it (another --seed, --val-fraction or --splits puts a case holding it into training)"
            )
    return warnings


def resumed_label_set(cases: list[PreparedCase], label_set: LabelSet, stored: dict[str, Any], spacing: float) -> tuple[LabelSet, str | None]:
    """The classes a resumed run goes on with, and a note when they are not the data's.

    They are the run's own (its head has one output per class). The data's label set
    (``prepare_cases``: from dataset.json, or from the label files as read) must be the
    same, with one exception: runs begun before gvsl took the classes from the files as
    read took them from the label maps resampled onto the canonical grid, where a structure
    smaller than a voxel vanishes. Such a run goes on with its classes when the data's
    extra classes are exactly ones that vanish on the grid in every case (so no voxel of
    the prepared cases holds them); ``cases`` are then re-indexed to the run's classes.

    Raises:
        ConfigError: other differences, one line saying which classes and why.
    """
    names, values = [str(n) for n in stored["label_names"]], [int(v) for v in stored["label_values"]]
    if values == list(label_set.values) and names == list(label_set.names):
        return label_set, None
    data_names = dict(zip(label_set.values, label_set.names))
    extra = [k for k, v in enumerate(label_set.values) if v not in values]
    on_grid = [k for k in extra if any(k in c.classes_on_grid for c in cases)]
    same_names = all(data_names.get(v) == n for n, v in zip(names, values))
    if not (set(values) <= set(label_set.values) and same_names and extra and not on_grid):
        missing = [f"{n} ({v})" for n, v in zip(names, values) if data_names.get(v) != n]
        why = "; ".join(
            part for part in (
                f"the data holds {', '.join(_class(label_set, k) for k in on_grid or extra)}, which the run has no class for" if extra else "",
                f"the run has {', '.join(missing)}, which the data does not" if missing else "",
            ) if part
        )
        raise ConfigError(
            f"the classes of the data ({label_set.to_dict()}) differ from the run being resumed ({dict(zip(names, values))}): {why}",
            hint="a run's classes cannot change: resume it with its own data, or start a new run in another -o folder",
        )
    run_set = LabelSet(names=tuple(names), values=tuple(values))
    remap = np.array([values.index(v) if v in values else 0 for v in label_set.values], dtype=np.uint8)
    for case in cases:
        case.target = remap[case.target]
        case.classes_in_file = frozenset(int(remap[k]) for k in case.classes_in_file if k not in extra)
        case.classes_on_grid = frozenset(int(remap[k]) for k in case.classes_on_grid)
    vanished = ", ".join(_class(label_set, k) for k in extra)
    return run_set, (
        f"note: the run being resumed has no class for {vanished}: it began before gvsl took the classes from the label files as read, "
        f"and {'it vanishes' if len(extra) == 1 else 'they vanish'} at {spacing:g} mm in every case; it goes on with its own classes "
        f"({', '.join(f'{n}={v}' for n, v in zip(names, values))}), so its models cannot write {'that value' if len(extra) == 1 else 'those values'} "
        "(a new run in another -o folder keeps it as a class)"
    )


def _resolve_settings(config: FinetuneConfig, stored: dict[str, Any], contract: PreprocessConfig) -> FinetuneConfig:
    """On resume: run-defining settings from the checkpoint; conflicting explicit ones refused.

    An explicit option equal to the run's effective value is accepted: the same learning
    rate as the mode's default, the contract's spacing or modality (``contract``, the
    resumed checkpoint's), the same weights file given by another relative path.
    """
    changes = {}
    for name in RUN_DEFINING:
        if name not in stored:
            continue
        value = stored[name]
        if name in config.explicit:
            mine = _comparable(name, getattr(config, name))
            if name == "lr" and value is None:  # runs stored before the effective lr was
                value = DEFAULT_LR[stored.get("mode", config.mode)]
            if name in ("spacing", "modality") and value is None:  # the contract's, unchanged
                accepted = mine == getattr(contract, name)
                value = getattr(contract, name)
            else:
                accepted = mine == value
            if not accepted:
                shown = "the default" if value is None else value
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(config, name)} differs from the run being resumed ({shown})", hint="drop it, or start a new run in another folder")
        changes[name] = value
    return dataclasses.replace(config, **changes)


def _split_of_named_cases(train_names: list[str], val_names: list[str], available: dict, reporter: Reporter, *, missing: str, hint: str, unused: str) -> tuple[list[str], list[str]]:
    """A split given by case names (a resumed run's, or a splits file's) checked against the
    cases of the dataset; ``missing`` and ``unused`` are message templates with {count}
    and {names}.

    Raises:
        InputError: cases of the split are not in the dataset.
    """
    def listed(names: list[str]) -> str:
        return ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")

    absent = [n for n in train_names + val_names if n not in available]
    if absent:
        raise InputError(missing.format(count=len(absent), names=listed(absent)), hint=hint)
    left_out = sorted(set(available) - set(train_names) - set(val_names))
    if left_out:
        reporter.note("note: " + unused.format(count=len(left_out), names=listed(left_out)))
    return train_names, val_names


def _stored_split(split: dict[str, list[str]], available: dict, reporter: Reporter) -> tuple[list[str], list[str]]:
    """The split a resumed run started with (so "best" keeps comparing one validation set)."""
    return _split_of_named_cases(
        list(split["train"]), list(split["val"]), available, reporter,
        missing="the dataset no longer holds {count} case(s) of the run being resumed: {names}",
        hint="restore them, or start a new run in another folder",
        unused="{count} case(s) added since the run started are not used ({names}): a resumed run keeps its split",
    )


def _new_split(config: FinetuneConfig, available: dict, reporter: Reporter) -> tuple[list[str], list[str]]:
    """(training, validation) names of a new run: a splits file's fold, a fold of our own,
    or a random share of the cases."""
    if config.splits is not None:
        train_names, val_names = read_split_file(config.splits, config.fold)
        where = f"{config.splits} fold {config.fold}".replace("{", "{{").replace("}", "}}")
        return _split_of_named_cases(
            train_names, val_names, available, reporter,
            missing="the dataset does not hold {count} case(s) of " + where + ": {names}",
            hint="give the splits file made for this dataset",
            unused="{count} case(s) in neither list of " + where + " are not used ({names})",
        )
    if config.fold is not None:
        return fold_split(list(available), config.fold, config.folds, config.seed)
    return split_cases(list(available), config.val_fraction, config.seed)


def _initial_state(config: FinetuneConfig, reporter: Reporter) -> tuple[ModelConfig, PreprocessConfig, dict[str, torch.Tensor] | None]:
    """(model config, contract, pre-trained state_dict or None for scratch)."""
    if config.mode == "scratch":
        contract = PreprocessConfig(spacing=config.spacing or 1.0, modality=config.modality or "auto")
        return ModelConfig(width=config.width), contract, None
    from gvsl_cli.weights import load_weights_spec

    loaded = load_weights_spec(config.weights, reporter=download_reporter(reporter))
    if not any(k.startswith("unet.") for k in loaded.state_dict):
        raise CheckpointError(f"{loaded.extra.get('path', config.weights)}: holds no GVSL U-Net weights (unet.*)")
    earlier = loaded.extra.get(SEGMENTATION_KEY)
    if isinstance(earlier, dict) and "labels" in earlier:
        # A fine-tuned model as the start: only its U-Net carries over; say so, since its
        # classes may look like this dataset's.
        reporter.note(f"note: {config.weights} is a segmentation model ({', '.join(f'{n}={v}' for n, v in earlier['labels'].items())}); its U-Net is the start, its head is not used: a new head is trained for this dataset's classes")
    contract = dataclasses.replace(
        loaded.preprocess,
        spacing=config.spacing if config.spacing is not None else loaded.preprocess.spacing,
        modality=config.modality if config.modality is not None else loaded.preprocess.modality,
    )
    return loaded.model_config, contract, loaded.state_dict


def finetune(config: FinetuneConfig, *, reporter: Reporter | None = None, should_stop: Callable[[], bool] = lambda: False) -> FinetuneSummary | None:
    """Run (or resume) a fine-tuning run as ``config`` says.

    Returns None, after a note, when ``config.resume`` finds the run already complete.

    Raises:
        InputError: dataset problems (named file, one line), unusable run folder.
        ConfigError: contradictory options; a run in the folder without --resume.
        CheckpointError, WeightsError: unusable --weights.
        TrainingError: the loss became NaN.
    """
    reporter = reporter or SilentReporter()
    workers = torchrun_world_size()
    if workers > 1:
        # torchrun gives every worker the same -o: each would train its own copy into it.
        # (srun tasks may each finetune into their own -o, e.g. one fold each: the run-folder
        # lock refuses tasks that share one.)
        raise ConfigError(f"gvsl finetune runs as one process on one device; torchrun launched {workers} (WORLD_SIZE={workers})", hint="run it without torchrun")
    # The run folder is this run's alone until it ends.
    with exclusive_run_folder(Path(config.run_dir), "finetune", reporter=reporter):
        return _finetune(config, reporter, should_stop)


def _finetune(config: FinetuneConfig, reporter: Reporter, should_stop) -> FinetuneSummary | None:
    """Checks everything that can be checked before any work, then trains (``_train``)."""
    run_dir = Path(config.run_dir)
    last_path = run_dir / LAST_FILE
    resumed = open_run(run_dir, last_path, resume=config.resume, command="finetune", required=("training", "run", SEGMENTATION_KEY), state="fine-tuning state")
    if resumed is not None:
        config = _resolve_settings(config, resumed.extra["run"], resumed.preprocess)
        config = resumed_schedule(config, resumed.extra.get("schedule"))
        if "iters" not in config.explicit:
            config = dataclasses.replace(config, iters=int(resumed.extra.get("iters", config.iters)))
        if not iterations_remain(run_dir, int(resumed.extra["training"]["iteration"]), config.iters, reporter):
            return None

    device = resolve_device(config.device)
    autocast_dtype = resolve_precision(config.precision, device)
    cases, label_set = find_cases(config.dataset, images=config.images, labels=config.labels)
    if resumed is not None:
        model_config, contract, init_state = resumed.model_config, resumed.preprocess, None
    else:
        model_config, contract, init_state = _initial_state(config, reporter)
    ensure_writable_folder(run_dir, what="run folder", hint="choose another -o")
    try:
        return _train(config, reporter, should_stop, resumed, cases, label_set, model_config, contract, init_state, device, autocast_dtype)
    except BaseException:
        # A new run that fails before its first full checkpoint leaves nothing behind
        # (``exclusive_run_folder`` then removes the folder if it created it).
        if resumed is None and not last_path.is_file():
            for name in (RUN_FILE, METRICS_FILE, BEST_FILE):
                (run_dir / name).unlink(missing_ok=True)
        raise


def _train(config, reporter, should_stop, resumed, cases, label_set, model_config, contract, init_state, device, autocast_dtype) -> FinetuneSummary:
    run_dir = Path(config.run_dir)
    config = dataclasses.replace(config, width=model_config.width)  # the weights' width, as run.json records it
    started_preparing = time.monotonic()
    prepared, label_set = prepare_cases(cases, contract, label_set, workers=config.workers)
    modalities = sorted({c.modality for c in prepared})
    reporter.note(f"{len(prepared)} cases prepared in {time.monotonic() - started_preparing:.1f} s ({', '.join(m.upper() for m in modalities)}; {contract.spacing:g} mm); labels: " + ", ".join(f"{n}={v}" for n, v in label_set.to_dict().items()))
    for warning in coverage_warnings(prepared, label_set, contract.spacing):
        reporter.note(warning)
    misfits = [c.name for c in prepared if c.detected is not None and c.detected != c.modality]
    if misfits:
        # E.g. official GVSL weights (CT, Hounsfield window) fine-tuned on MR: the window
        # squeezes MR intensities into a sliver of [0, 1].
        imposed = contract.modality.upper()
        reporter.note(
            f"warning: the weights' contract maps intensities as {imposed}, but {len(misfits)} of {len(prepared)} case(s) look like "
            f"{'MR' if imposed == 'CT' else 'CT'} ({', '.join(misfits[:3])}{' ...' if len(misfits) > 3 else ''}); give --modality if the contract does not fit the data"
        )
    if resumed is not None:
        label_set, note = resumed_label_set(prepared, label_set, resumed.extra[SEGMENTATION_KEY], contract.spacing)
        if note:
            reporter.note(note)
    elif contract.modality == "auto" and len(modalities) == 1:
        contract = dataclasses.replace(contract, modality=modalities[0])  # what segment will use
    by_name = {c.name: c for c in prepared}
    if resumed is not None and "split" in resumed.extra[SEGMENTATION_KEY]:
        train_names, val_names = _stored_split(resumed.extra[SEGMENTATION_KEY]["split"], by_name, reporter)
    else:
        train_names, val_names = _new_split(config, by_name, reporter)
    if config.fold is not None:
        source = config.splits if config.splits is not None else f"{config.folds} folds (--seed {config.seed})"
        reporter.note(f"validation: fold {config.fold} of {source}: {len(val_names)} case(s), {len(train_names)} for training")
    train_cases = [by_name[n] for n in train_names]
    val_cases = [by_name[n] for n in val_names] or train_cases
    on_training = not val_names
    if on_training:
        reporter.note("warning: no validation case (one case, or --val-fraction 0): Dice is measured on the training cases")
    else:
        for warning in split_warnings(train_cases, val_cases, label_set):
            reporter.note(warning)
    # Validation cases of background alone score no class: every validation's mean Dice
    # is 0, and "best" would stay the untrained start however long the run trains.
    blind_validation = not any(c.classes_on_grid - {0} for c in val_cases)
    if blind_validation:
        reporter.note(
            f"warning: the validation case(s) {_listed([c.name for c in val_cases])} hold no foreground voxel: Dice cannot choose "
            "a best model, so best.pt follows the latest validation (another --seed, --val-fraction or --splits gives validation cases with foreground)"
        )
    patch = effective_patch(prepared, config.patch)
    if patch != (config.patch,) * 3:
        reporter.note(f"--patch {config.patch}: the cases are smaller, using {'×'.join(map(str, patch))} (smaller cases are padded)")
    check_cpu_bf16_patch(autocast_dtype, device, patch, shrunk=patch != (config.patch,) * 3)

    torch.manual_seed(config.seed)  # the head's (and for scratch the U-Net's) initial weights
    model = SegmentationNet(model_config, label_set.count)
    if resumed is not None:
        load_state_strict(model, resumed.state_dict, source=str(run_dir / LAST_FILE))
    elif init_state is not None:
        model.load_unet(init_state)
    if config.mode == "linear":
        model.unet.requires_grad_(False)
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=config.learning_rate, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype is torch.float16)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed patch and batch: the search pays off

    meta = {
        "label_names": list(label_set.names),
        "label_values": list(label_set.values),
        "labels": label_set.to_dict(),
        "patch": list(patch),
        "mode": config.mode,
        "weights": config.weights,
        "split": {"train": train_names, "val": val_names},
    }
    run_record = {"run": config.run_settings(), "iters": config.iters, "schedule": schedule_of(config, SCHEDULE)}
    metrics_path = run_dir / METRICS_FILE
    state: dict[str, Any] = {}
    start_iteration = 0

    def validate_now(iteration: int) -> Validation:
        result = validate(model, val_cases, label_set, iteration=iteration, patch=patch, device=device, autocast_dtype=autocast_dtype, overlap=config.overlap)
        with open(metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(result.to_row()) + "\n")
        return result

    def save_best(result: Validation) -> None:
        state["best"] = result
        save_checkpoint(run_dir / BEST_FILE, model, contract, affine_trained=False, extra={SEGMENTATION_KEY: meta, "iteration": result.iteration, "validation": result.to_row()})

    if resumed is not None:
        start_iteration = restore_training_state(resumed.extra["training"], optimizer, scaler, device)
        truncate_metrics(metrics_path, start_iteration)
        state["initial"] = Validation.from_row(resumed.extra["initial"])
        state["best"] = Validation.from_row(resumed.extra["best"])
        state["last"] = Validation.from_row(resumed.extra["last"])
        reporter.note(f"resuming {run_dir} after iteration {start_iteration} (best mean Dice {state['best'].mean:.4f} at iteration {state['best'].iteration})")
    else:
        metrics_path.unlink(missing_ok=True)  # rows of an earlier attempt that never saved a checkpoint
    with atomic_path(run_dir / RUN_FILE) as tmp:
        tmp.write_text(json.dumps({**run_record, **meta, "preprocess": contract.to_dict(), "model_config": model_config.to_dict(), "cases": {c.name: str(c.image) for c in cases}}, indent=2), encoding="utf-8")
    if resumed is None:
        initial = validate_now(0)
        state["initial"] = state["last"] = initial
        save_best(initial)
        reporter.note(f"validation before training ({len(val_cases)} case(s)): mean Dice {initial.mean:.4f}")

    def save(iteration: int, final: bool) -> None:
        result = validate_now(iteration)
        state["last"] = result
        if result.mean > state["best"].mean or blind_validation:
            save_best(result)
        best = state["best"]
        reporter.note(f"validation at iteration {iteration}: mean Dice {result.mean:.4f} (best {best.mean:.4f} at iteration {best.iteration})")
        extra = {
            **run_record,
            SEGMENTATION_KEY: meta,
            "iteration": iteration,
            "training": training_state(optimizer, scaler, iteration, device),
            "initial": state["initial"].to_row(),
            "best": best.to_row(),
            "last": result.to_row(),
        }
        save_checkpoint(run_dir / LAST_FILE, model, contract, affine_trained=False, extra=extra)

    sampler = PatchSampler(train_cases, patch, seed=config.seed, margin=(max(patch) // 8) if config.augment else 0)
    task = FinetuneTask(sampler, config.batch, seed=config.seed, device=device, augment=config.augment)
    options = LoopOptions(iters=config.iters, save_every=config.val_every, log_every=config.log_every, time_limit_s=config.time_limit_s, autocast_dtype=autocast_dtype)
    net: torch.nn.Module = model
    compiled = compile_decision(config.compile, device, config.iters - start_iteration)
    if compiled:
        reporter.note("compiling the network with torch.compile (about a minute before the first step; --no-compile skips it)")
        compiled_net = torch.compile(model)
        # A trial step compiles the graphs now: compiled by default, a machine where
        # inductor fails trains eagerly instead; asked for, the failure is one line. It
        # runs on the first batch itself (same shapes and strides; ``batch`` depends on the
        # iteration only), without an optimizer step.
        if not compiled_step_works(compiled_net, model, task, task.batch(start_iteration + 1), autocast_dtype, reporter, asked=config.compile):
            compiled = False
        else:
            net = compiled_net
    result = run_training(
        net,
        optimizer,
        task,
        options=options,
        context=DistContext(device=device),
        start_iteration=start_iteration,
        scaler=scaler,
        save=save,
        metrics_path=metrics_path,
        reporter=reporter,
        should_stop=should_stop,
    )
    done = result.iteration - start_iteration
    summary = FinetuneSummary(
        run_dir=os.path.abspath(run_dir),  # absolute: summary.json is read from anywhere
        mode=config.mode,
        iteration=result.iteration,
        start_iteration=start_iteration,
        stopped=result.stopped,
        seconds=round(result.seconds, 3),
        iterations_per_second=round(done / result.training_seconds, 4) if result.training_seconds > 0 else 0.0,  # training steps only, as the progress line
        device=str(device),
        precision=str(autocast_dtype).replace("torch.", "") if autocast_dtype else "fp32",
        compiled=compiled,
        patch=patch,
        labels=label_set.to_dict(),
        train_cases=train_names,
        val_cases=val_names,
        validated_on_training_cases=on_training,
        initial=state["initial"].to_row(),
        best=state["best"].to_row(),
        last=state["last"].to_row(),
        last_losses=result.last_row,
        best_checkpoint=os.path.abspath(run_dir / BEST_FILE),
        last_checkpoint=os.path.abspath(run_dir / LAST_FILE),
    )
    with atomic_path(run_dir / SUMMARY_FILE) as tmp:
        tmp.write_text(json.dumps({**summary.to_dict(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2), encoding="utf-8")
    return summary
