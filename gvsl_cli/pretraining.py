"""GVSL self-supervised pre-training (DESIGN §1) on top of ``training.run_training``.

``pretrain(config)`` does the whole job behind ``gvsl pretrain``: joins the process group
when launched by torchrun/SLURM, finds and caches the volumes, builds (or resumes, or
initialises from weights) the model, and runs the loop with ``PretrainTask``:

    crops A, B  --(device)-->  A' = damage(A);  A, A', B warped by one random transform
    out = GVSL(A', B);  moved = B ∘ φ
    loss = NCC(moved, A) + MSE(restored, A) + smooth(u)

Run folder (``-o``): ``last.pt`` (resumable checkpoint: model, optimizer, scaler, RNG,
iteration, run settings), ``model.pt`` (the weights alone, for ``--weights`` elsewhere),
``metrics.jsonl`` (one row per iteration), ``run.json`` (settings), ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from gvsl_cli import data as data_mod
from gvsl_cli import distributed, spatial
from gvsl_cli.augment import PretrainAugmentation
from gvsl_cli.checkpoint import load_state_strict, load_weights, save_checkpoint, state_checksum
from gvsl_cli.config import ModelConfig, PreprocessConfig
from gvsl_cli.device import resolve_device, resolve_precision
from gvsl_cli.errors import ConfigError, GvslError, InputError, TrainingError
from gvsl_cli.io import atomic_path, ensure_writable_folder
from gvsl_cli.losses import local_ncc_loss, mse_loss, smoothness_loss
from gvsl_cli.model import GVSL
from gvsl_cli.preprocess import modality_look
from gvsl_cli.training import (
    METRICS_FILE,
    compile_decision,
    compiled_step_works,
    LoopOptions,
    LoopResult,
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

CHECKPOINT_FILE = "last.pt"
MODEL_FILE = "model.pt"
#: Options a plain --resume keeps from the run (``training.resumed_schedule``).
SCHEDULE = ("save_every", "log_every", "time_limit_s")
RUN_FILE = "run.json"
#: A model initialised from weights whose affine head was never trained (the official
#: checkpoint) is trusted for its affine output after this many iterations of gvsl training.
AFFINE_TRUST_ITERATIONS = 1000
#: Settings that define a run; on --resume they come from the checkpoint and may not change.
RUN_DEFINING = ("batch", "patch", "spacing", "modality", "width", "lr", "seed", "init")


@dataclass(frozen=True)
class PretrainConfig:
    """Options of one pre-training run (``gvsl pretrain``). The defaults are the paper's
    except ``iters``: 10 000 against the official 200 000 (docs/pretraining.md).

    Attributes:
        inputs: folders, files or path lists (see ``data.discover``); may be empty on resume
            (the run stores them as absolute paths, so --resume works from any folder).
        include, exclude: glob patterns selecting volumes (``data.select``), as ``gvsl
            embed``'s; stored with the inputs and used on resume when no input is given.
        run_dir: run folder.
        iters: last iteration of the run (a resumed run continues up to it; unless set
            explicitly, a resumed run keeps the one it was started with).
        batch: pairs per step and per process.
        patch: side of the cubic training patch in voxels (shrunk for small data).
        spacing, modality: the preprocessing contract.
        width: U-Net width (32 = the paper's network).
        lr: Adam learning rate.
        device, precision: see ``gvsl_cli.device``.
        workers: threads preparing volumes and sampling patches.
        seed: decides every random draw of the run.
        init: weights to start from (manifest name, file, official checkpoint).
        resume: continue the run in ``run_dir`` from its last checkpoint.
        save_every: checkpoint period in iterations.
        log_every: iterations between metric flushes (one host sync each).
        time_limit_s: stop cleanly after this many seconds of training.
        compile: wrap the model in ``torch.compile``; None decides (``training.compile_decision``).
        cache_dir: preprocessed-volume cache (default ``data.default_cache_dir()``).
        explicit: names of the options the user set (the rest may come from a checkpoint).
    """

    inputs: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    run_dir: str = "gvsl-pretrain"
    iters: int = 10000
    batch: int = 1
    patch: int = 128
    spacing: float = 1.0
    modality: str = "auto"
    width: int = 32
    lr: float = 1e-4
    device: str = "auto"
    precision: str = "auto"
    workers: int = 2
    seed: int = 0
    init: str | None = None
    resume: bool = False
    save_every: int = 500
    log_every: int = 10
    time_limit_s: float | None = None
    compile: bool | None = None
    cache_dir: str | None = None
    explicit: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        check_loop_counts(self.iters, self.save_every, self.log_every)
        if self.batch < 1:
            raise ConfigError(f"--batch must be >= 1, got {self.batch}")
        if self.patch < 16 or self.patch % 16:
            raise ConfigError(f"--patch must be a multiple of 16 and >= 16 (the U-Net halves it four times), got {self.patch}")
        check_learning_rate(self.lr)
        check_workers(self.workers)
        check_seed(self.seed)
        if self.time_limit_s is not None and self.time_limit_s <= 0:
            raise ConfigError(f"--time-limit must be > 0, got {self.time_limit_s} s")

    def run_settings(self) -> dict[str, Any]:
        """The run-defining settings, stored in the checkpoint and run.json."""
        return {name: getattr(self, name) for name in RUN_DEFINING}


@dataclass
class PretrainSummary:
    """What a run did (rank 0's view; also written to summary.json)."""

    run_dir: str
    iteration: int
    start_iteration: int
    stopped: str | None
    seconds: float
    iterations_per_second: float
    last: dict[str, float]
    mean_last: dict[str, float]
    volumes: int
    skipped: int
    modalities: dict[str, int]
    patch: tuple[int, int, int]
    device: str
    precision: str
    world_size: int
    compiled: bool = False
    rank_weight_checksums: list[str] = field(default_factory=list)
    checkpoint: str = ""
    model: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class PretrainTask:
    """One GVSL iteration: device-side augmentation of prefetched crops, then the three losses."""

    loss_names = ("loss", "ncc", "mse", "smooth")

    def __init__(self, loader: data_mod.PrefetchLoader, patch: tuple[int, int, int], *, seed: int, rank: int, device: torch.device, augmentation: PretrainAugmentation = PretrainAugmentation()) -> None:
        self.loader = loader
        self.patch = patch
        self.seed = seed
        self.rank = rank
        self.device = device
        self.augmentation = augmentation
        self.generator = torch.Generator(device=device)

    def batch(self, iteration: int):
        """(A, A', B), each (batch, 1, *patch) on the device, for ``iteration``."""
        if self.loader.next_iteration != iteration:
            raise RuntimeError(f"loader is at iteration {self.loader.next_iteration}, training asks for {iteration}")
        a, b = next(self.loader)
        a = a.to(self.device, non_blocking=True)
        b = b.to(self.device, non_blocking=True)
        self.generator.manual_seed(data_mod.iteration_seed(self.seed, self.rank, iteration, data_mod.STREAM_AUGMENT))
        return self.augmentation(a, b, self.patch, self.generator)

    def damaged_inputs(self, iteration: int) -> str | None:
        """Which cached volume of ``iteration``'s pairs holds NaN or infinite values (a
        cache file damaged on disk: prepared volumes are checked finite), in words; None
        when all are finite. Called only after the loss became NaN: it reads them whole."""
        sampler = self.loader.sampler
        used = sorted({index for pair in sampler.pairs(iteration, self.loader.batch) for index in pair})
        for index in used:
            volume = sampler.volumes[index]
            if not np.isfinite(volume.array).all():
                return f"{volume.array_path} (the cached volume of {volume.source}) holds NaN or infinite values: the cache file is damaged"
        return None

    def losses(self, model: torch.nn.Module, batch) -> dict[str, torch.Tensor]:
        a, damaged, b = batch
        out = model(damaged, b)
        # φ and the moved image in float32 (NCC's variances cancel badly in bf16).
        moved = spatial.sample(b, out.match.grid())
        ncc = local_ncc_loss(moved, a)
        mse = mse_loss(out.restored, a)
        smooth = smoothness_loss(out.match.displacement)
        return {"loss": ncc + mse + smooth, "ncc": ncc, "mse": mse, "smooth": smooth}


def _compiled_step_works(net: torch.nn.Module, model: torch.nn.Module, task: "PretrainTask", crop_shape: tuple[int, ...], autocast_dtype, reporter: Reporter, *, asked: bool | None) -> bool:
    """``training.compiled_step_works`` on a synthetic batch made by the task's own
    augmentation from synthetic crops of ``crop_shape`` (B, 1, *region), so its tensors have
    the training batches' shapes *and strides* and the training step reuses the graphs.
    Its random draws come from a local generator (the run's own are seeded per iteration).
    """
    device = task.device
    crops = torch.linspace(0.0, 1.0, math.prod(crop_shape), device=device).view(crop_shape)
    generator = torch.Generator(device=device)
    generator.manual_seed(0)
    batch = task.augmentation(crops, crops.flip(-1), task.patch, generator)
    return compiled_step_works(net, model, task, batch, autocast_dtype, reporter, asked=asked)


def make_optimizer(model: torch.nn.Module, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """Adam for ``model``; on CUDA the fused implementation (one kernel launch per step for
    all 32 M parameters instead of a series of multi-tensor launches; same update rule and
    state_dict format, so checkpoints resume across both)."""
    return torch.optim.Adam(model.parameters(), lr=lr, fused=device.type == "cuda")


#: Marks run settings that record the contract in effect (runs from 2026-11-26 on).
CONTRACT_IN_EFFECT = "contract_in_effect"


def _contract_kept_by_older_init_runs(stored: dict[str, Any], preprocess: PreprocessConfig) -> dict[str, Any]:
    """The stored run settings, with the contract a run started with ``--init`` trained with.

    Runs started before 2026-11-26 with --init and without --spacing/--modality recorded
    the command line's defaults (1 mm, auto), not the --init weights' contract they
    trained with, which their checkpoint holds; resumed as recorded, they went on at
    another spacing and mapping. Their checkpoint's spacing, and its modality where the
    record says auto, are taken instead. (Newer runs record the contract in effect.)
    """
    if not stored.get("init") or stored.get(CONTRACT_IN_EFFECT):
        return stored
    corrected = dict(stored)
    corrected["spacing"] = preprocess.spacing
    if stored.get("modality") == "auto" and preprocess.modality in ("ct", "mr"):
        corrected["modality"] = preprocess.modality
    return corrected


def _resolve_settings(config: PretrainConfig, stored: dict[str, Any]) -> PretrainConfig:
    """On resume: run-defining settings from the checkpoint; conflicting explicit ones refused."""
    changes = {}
    for name in RUN_DEFINING:
        if name not in stored:
            continue
        value = stored[name]
        if name in config.explicit and getattr(config, name) != value:
            raise ConfigError(
                f"--{name} {getattr(config, name)} differs from the run being resumed ({value})",
                hint=f"drop --{name}, or start a new run in another folder",
            )
        changes[name] = value
    return dataclasses.replace(config, **changes)


def _model_and_contract(config: PretrainConfig, reporter: Reporter):
    """(model config, preprocess config, initial state_dict or None, init affine trusted?,
    draw the affine head afresh?)."""
    preprocess_kwargs = {"spacing": config.spacing, "modality": config.modality}
    if config.init is None:
        # A new affine head is not trusted either until it has trained for a while.
        return ModelConfig(width=config.width), PreprocessConfig(**preprocess_kwargs), None, False, False
    from gvsl_cli.weights import load_weights_spec

    loaded = load_weights_spec(config.init, reporter=download_reporter(reporter))
    loaded.require_pretrained()  # a finetune run: one clear line, not a list of missing keys
    if "width" in config.explicit and config.width != loaded.model_config.width:
        raise ConfigError(f"--width {config.width} does not fit --init {config.init} (width {loaded.model_config.width})", hint="drop --width")
    # The contract the weights were trained with, unless the user set it.
    if "spacing" not in config.explicit:
        preprocess_kwargs["spacing"] = loaded.preprocess.spacing
    if "modality" not in config.explicit:
        preprocess_kwargs["modality"] = loaded.preprocess.modality
    # The official code never trained its affine head: its weights are PyTorch's random
    # defaults, not a start. A gvsl run's head trained from the identity, however short.
    fresh_affine = loaded.kind == "official"
    if fresh_affine:
        reporter.note(
            f"--init {config.init}: its affine head was never trained (official GVSL code), so it starts afresh near the identity "
            f"and is trusted after {AFFINE_TRUST_ITERATIONS} iterations"
        )
    return loaded.model_config, PreprocessConfig(**preprocess_kwargs), loaded.state_dict, loaded.affine_trained, fresh_affine


#: Seconds between "preparing volumes" notes (none for a preparation shorter than this).
PREPARATION_NOTE_INTERVAL_S = 30.0


def _check_cache_folder(cache_root: Path, hint: str, reporter: Reporter) -> None:
    """Prove the preprocessed-volume cache usable before any volume is read.

    A folder that exists but cannot be written (a shared cache a group prepared once, a
    read-only mount) is used as it is: its entries are read, and a volume missing from it
    stops the run at its first write with ``CacheWriteError``, naming the folder. Any
    other folder must be creatable and writable (``ensure_writable_folder``).
    """
    if cache_root.is_dir() and not os.access(cache_root, os.W_OK | os.X_OK):
        reporter.note(f"the cache folder {cache_root} is read-only: volumes already in it are used; one missing from it stops the run")
        return
    ensure_writable_folder(cache_root, what="cache folder", hint=hint)


def _preparation_progress(reporter: Reporter) -> Callable[[int, int], None]:
    """A ``prepare_dataset`` progress callback that notes "preparing volumes: done/total"
    every ``PREPARATION_NOTE_INTERVAL_S`` seconds, so a long first run is not silent."""
    last = {"at": time.monotonic()}

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last["at"] >= PREPARATION_NOTE_INTERVAL_S and done < total:
            last["at"] = now
            reporter.note(f"preparing volumes: {done}/{total}")

    return progress


def _load_dataset(config: PretrainConfig, preprocess: PreprocessConfig, context: distributed.DistContext, reporter: Reporter, cache_root: Path) -> data_mod.Dataset:
    sources, skipped = data_mod.discover(config.inputs, include=config.include, exclude=config.exclude)
    cache = data_mod.VolumeCache(cache_root)
    # Label maps next to their images (nnU-Net's labelsTr, tissue classes) are not images
    # to learn from: skipped, each with its reason.
    dataset = data_mod.prepare_dataset(
        sources, preprocess, cache, workers=max(1, config.workers), shard=(context.rank, context.world_size), barrier=context.barrier,
        on_progress=_preparation_progress(reporter), refuse_label_maps=True,
    )
    dataset.skipped = skipped + dataset.skipped
    for item in dataset.skipped:
        reporter.note(f"skipped {item.path}: {item.reason}")
    given = len(sources) + len(skipped)
    if not dataset.volumes:
        raise InputError(
            f"no usable volume among {given} input(s) ({len(dataset.skipped)} skipped)",
            hint="check --include/--exclude" if config.include or config.exclude else "give folders or files of NIfTI, NRRD, MHA/MHD or DICOM series",
        )
    # Files with the same content (copies) are one volume: a pair of them is no pair.
    first_of: dict[str, data_mod.CachedVolume] = {}
    for volume in dataset.volumes:
        if volume.key in first_of:
            reporter.note(f"skipped {volume.source}: same content as {first_of[volume.key].source}")
            dataset.skipped.append(data_mod.Skipped(str(volume.source), f"same content as {first_of[volume.key].source}"))
        else:
            first_of[volume.key] = volume
    dataset.volumes = list(first_of.values())
    on_rank = f" (rank {context.rank}'s share)" if context.enabled else ""
    reporter.note(f"{len(dataset.volumes)} volumes: {dataset.prepared} prepared now, {dataset.from_cache} from the cache{on_rank} ({cache_root})")
    if len(dataset.volumes) < 2:
        raise InputError(
            f"pre-training pairs two different volumes; only 1 usable volume among {given} input(s) ({len(dataset.skipped)} skipped)",
            hint="give at least two different volumes",
        )
    if preprocess.modality == "auto":
        counts = dataset.modality_counts()
        decided = ", ".join(f"{n} {m.upper()}" for m, n in sorted(counts.items()))
        if len(counts) > 1:
            # Mixed decisions are where a windowed CT or an odd MR was misjudged: name the
            # volumes of the smaller group so the user can check them.
            fewer = min(counts, key=lambda m: (counts[m], m))
            names = [Path(v.source).name for v in dataset.volumes if v.modality == fewer]
            decided += f"; {fewer.upper()}: " + ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        reporter.note(f"--modality auto: {decided} (CT when the minimum is below -500, i.e. Hounsfield units; MR otherwise; set --modality to override)")
    else:
        _warn_about_misfit_mapping(dataset, preprocess.modality, _mapping_source(config), reporter, on_rank, resumed=config.resume and "modality" not in config.explicit)
    return dataset


def _mapping_source(config: PretrainConfig) -> str:
    """Where a fixed intensity mapping came from, in the words of the misfit warning."""
    if "modality" in config.explicit:
        return "--modality"
    if config.init:
        return f"the contract of --init {config.init}" + (", kept by the run" if config.resume else "")
    return "the run's --modality"  # only a resumed run has a fixed mapping it was not given now


def _warn_about_misfit_mapping(dataset: data_mod.Dataset, mapping: str, mapping_source: str, reporter: Reporter, on_rank: str, *, resumed: bool = False) -> None:
    """One warning when volumes look like another modality than the fixed ``mapping``
    ("ct"/"mr") maps them as: an MR squeezed by the CT window (or a HU CT mapped by MR
    percentiles) trains the network on intensities it will never be given, and the weights'
    contract then names the wrong modality. Entries cached by older versions, which did
    not record what they looked like, are not judged."""
    misfits = [volume for volume in dataset.volumes if volume.detected and volume.detected != mapping]
    if not misfits:
        return
    names = ", ".join(Path(v.source).name for v in misfits[:3]) + (f" and {len(misfits) - 3} more" if len(misfits) > 3 else "")
    other = "ct" if mapping == "mr" else "mr"
    reporter.note(
        f"warning: {len(misfits)} of {len(dataset.volumes)} volumes{on_rank} look like {modality_look(other)} but are mapped as {mapping.upper()} "
        f"({mapping_source}): {names}; "
        + (f"if they are {other.upper()}, start a new run in another folder with --modality {other} (or auto)" if resumed else f"give --modality {other} (or auto) if they are {other.upper()}")
    )


def _contract_for_checkpoint(preprocess: PreprocessConfig, dataset: data_mod.Dataset) -> PreprocessConfig:
    """The contract stored with the weights: auto resolved when all volumes agreed."""
    counts = dataset.modality_counts()
    if preprocess.modality == "auto" and len(counts) == 1:
        return dataclasses.replace(preprocess, modality=next(iter(counts)))
    return preprocess


def pretrain(config: PretrainConfig, *, reporter: Reporter | None = None, should_stop: Callable[[], bool] = lambda: False) -> PretrainSummary | None:
    """Run (or resume) GVSL pre-training as ``config`` says; returns rank 0's summary.

    Returns None, after a "nothing to do" note, when ``config.resume`` finds the run already
    at ``config.iters`` (a re-queued job of a finished run).

    Raises:
        InputError: no usable volume, fewer than two different ones, unreadable list file,
            a run or cache folder that cannot be written.
        ConfigError: contradictory options; a checkpoint in the run folder without --resume.
        TrainingError: the loss became NaN.
    """
    device = resolve_device(config.device)
    context = distributed.setup(device)
    try:
        if not context.is_main or reporter is None:
            reporter = SilentReporter(on_start=getattr(reporter, "mark_started", None))
        # The run folder is this run's alone until it ends (rank 0 holds it for all ranks).
        with exclusive_run_folder(Path(config.run_dir), "pretrain", context, reporter):
            return _pretrain(config, context, reporter, should_stop)
    finally:
        distributed.teardown(context)


def _repair_final_model(run_dir: Path, resumed, reached: int, reporter: Reporter) -> None:
    """Rewrite ``model.pt`` from ``last.pt`` when a complete run's model.pt is missing or
    older (earlier gvsl wrote last.pt first, and a kill between the two files left
    that state; ``--weights RUN`` takes model.pt first)."""
    model_path = run_dir / MODEL_FILE
    try:
        current = load_weights(model_path).extra.get("iteration") if model_path.is_file() else None
    except GvslError:
        current = None  # damaged: rewritten below
    if current == reached:
        return
    model = GVSL(resumed.model_config)
    load_state_strict(model, resumed.state_dict, source=str(run_dir / CHECKPOINT_FILE))
    save_checkpoint(model_path, model, resumed.preprocess, affine_trained=resumed.affine_trained, extra={"patch": list(resumed.extra.get("patch", ())), "iteration": reached})
    reporter.note(f"{model_path} was {'missing' if current is None else f'from iteration {current}'} (the run was killed while finishing): rewritten from {CHECKPOINT_FILE} (iteration {reached})")


def _pretrain(config: PretrainConfig, context: distributed.DistContext, reporter: Reporter, should_stop) -> PretrainSummary | None:
    """Checks everything that can be checked before any work, then trains (``_train``)."""
    run_dir = Path(config.run_dir)
    checkpoint_path = run_dir / CHECKPOINT_FILE
    resumed = open_run(run_dir, checkpoint_path, resume=config.resume, command="pretrain")
    if resumed is not None:
        config = _resolve_settings(config, _contract_kept_by_older_init_runs(resumed.extra["run"], resumed.preprocess))
        if not config.inputs:
            stored = resumed.extra
            config = dataclasses.replace(
                config,
                inputs=tuple(stored.get("inputs", ())),
                include=config.include or tuple(stored.get("include", ())),
                exclude=config.exclude or tuple(stored.get("exclude", ())),
            )
        config = resumed_schedule(config, resumed.extra.get("schedule"))
        if "iters" not in config.explicit and "iters" in resumed.extra:
            # `--resume` alone continues the run to its own target (a stopped run's summary
            # says "continue with --resume"); --iters moves the target.
            config = dataclasses.replace(config, iters=int(resumed.extra["iters"]))
        reached = int(resumed.extra["training"].get("iteration", 0))
        if not iterations_remain(run_dir, reached, config.iters, reporter):
            if context.is_main:
                _repair_final_model(run_dir, resumed, reached, reporter)
            return None
    if not config.inputs:
        raise InputError("no input given", hint="gvsl pretrain FOLDER_OR_FILES... (folders, volumes, DICOM folders or .txt lists)")
    ensure_writable_folder(run_dir, what="run folder", hint="choose another -o")
    try:
        cache_root = Path(config.cache_dir) if config.cache_dir else data_mod.default_cache_dir()
        cache_hint = "choose another --cache-dir" if config.cache_dir else "give --cache-dir or set GVSL_HOME"
        _check_cache_folder(cache_root, cache_hint, reporter)
        return _train(config, context, reporter, should_stop, resumed, cache_root)
    except BaseException:
        # A new run that fails before its first checkpoint leaves no run record behind
        # (and ``exclusive_run_folder`` then removes the folder if it created it).
        if resumed is None and context.is_main and not checkpoint_path.is_file():
            (run_dir / RUN_FILE).unlink(missing_ok=True)
            (run_dir / METRICS_FILE).unlink(missing_ok=True)  # rows of iterations never saved
        raise


def _train(config: PretrainConfig, context: distributed.DistContext, reporter: Reporter, should_stop, resumed, cache_root: Path) -> PretrainSummary:
    device = context.device
    run_dir = Path(config.run_dir)
    checkpoint_path = run_dir / CHECKPOINT_FILE
    autocast_dtype = resolve_precision(config.precision, device)
    if device.type == "cuda":
        # Every step has the same shapes (fixed patch and batch), so cuDNN's one-time search
        # for the fastest convolution algorithms pays off from the first few iterations.
        torch.backends.cudnn.benchmark = True

    if resumed is not None:
        model_config = resumed.model_config
        preprocess = PreprocessConfig(spacing=config.spacing, modality=config.modality)
        init_state, init_affine_trained, fresh_affine = None, bool(resumed.extra.get("init_affine_trained", False)), False
    else:
        model_config, preprocess, init_state, init_affine_trained, fresh_affine = _model_and_contract(config, reporter)
        # The run records the contract and width in effect (from --init unless given), so
        # that --resume goes on with them, not with the command line's defaults.
        config = dataclasses.replace(config, spacing=preprocess.spacing, modality=preprocess.modality, width=model_config.width)
    dataset = _load_dataset(config, preprocess, context, reporter, cache_root)
    sampler_patch = data_mod.effective_patch(dataset.volumes, (config.patch,) * 3)
    if sampler_patch != (config.patch,) * 3:
        reporter.note(f"--patch {config.patch}: the volumes are smaller, using {'×'.join(map(str, sampler_patch))} (smaller volumes are padded)")
    check_cpu_bf16_patch(autocast_dtype, device, sampler_patch, shrunk=sampler_patch != (config.patch,) * 3)
    # Crop a margin around the patch so rotated/scaled patches show anatomy, not zeros.
    region = tuple(p + 2 * (p // 8) for p in sampler_patch)
    keys = [v.key for v in dataset.volumes]
    if resumed is not None and resumed.extra.get("dataset") and resumed.extra["dataset"] != keys:
        reporter.note("the data differ from the checkpoint's; the continuation will not repeat an uninterrupted run exactly")

    torch.manual_seed(config.seed)  # initial weights follow --seed (and agree across ranks)
    model = GVSL(model_config)
    if resumed is not None:
        load_state_strict(model, resumed.state_dict, source=str(checkpoint_path))
    elif init_state is not None:
        load_state_strict(model, init_state, source=str(config.init))
        if fresh_affine:
            model.reset_affine_head()
    model.to(device)
    optimizer = make_optimizer(model, config.lr, device)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype is torch.float16)
    start_iteration = 0
    if resumed is not None:
        start_iteration = restore_training_state(resumed.extra["training"], optimizer, scaler, device)
        if context.is_main:  # the folder's writer; other ranks never touch it
            truncate_metrics(run_dir / METRICS_FILE, start_iteration)
        reporter.note(f"resuming {run_dir} after iteration {start_iteration}")

    net: torch.nn.Module = model
    if context.enabled:
        # The model has no buffers, so DDP's buffer options do not matter (and
        # ``broadcast_buffers`` prints a deprecation warning on every rank from torch 2.13).
        # On the CPU, oneDNN returns the first convolution's weight gradient (one input
        # channel) channels_last: strides (27, 1, 9, 3, 1) against the bucket's (27, 27, 9,
        # 3, 1), which differ only along a dimension of size 1, i.e. the same memory order.
        # DDP compares the strides literally and warns on every rank; nothing to act on.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    compiled = compile_decision(config.compile, device, config.iters - start_iteration)
    compiled_net = None
    if compiled:
        reporter.note("compiling the model with torch.compile (about a minute before the first step; --no-compile skips it)")
        compiled_net = torch.compile(net)

    contract = _contract_for_checkpoint(preprocess, dataset)
    run_record = {
        "run": {**config.run_settings(), CONTRACT_IN_EFFECT: True},
        "inputs": [os.path.abspath(path) for path in config.inputs],
        "include": list(config.include),
        "exclude": list(config.exclude),
        "iters": config.iters,
        "schedule": schedule_of(config, SCHEDULE),
        "dataset": keys,
        "patch": list(sampler_patch),
        "init_affine_trained": init_affine_trained,
    }
    def save(iteration: int, final: bool) -> None:
        if not context.is_main:
            return
        affine_trained = init_affine_trained or iteration >= AFFINE_TRUST_ITERATIONS
        if final:
            # model.pt before last.pt: a kill between the two leaves a last.pt short of the
            # end, so --resume redoes those steps and writes both, rather than a "complete"
            # last.pt beside a missing or older model.pt.
            save_checkpoint(run_dir / MODEL_FILE, model, contract, affine_trained=affine_trained, extra={"patch": list(sampler_patch), "iteration": iteration})
        extra = {**run_record, "training": training_state(optimizer, scaler, iteration, device)}
        save_checkpoint(checkpoint_path, model, contract, affine_trained=affine_trained, extra=extra)

    options = LoopOptions(
        iters=config.iters,
        save_every=config.save_every,
        log_every=config.log_every,
        time_limit_s=config.time_limit_s,
        autocast_dtype=autocast_dtype,
    )
    sampler = data_mod.PairSampler(dataset.volumes, region, seed=config.seed, rank=context.rank)
    loader = data_mod.PrefetchLoader(sampler, config.batch, start=start_iteration + 1, workers=config.workers, pin=device.type == "cuda")
    task = PretrainTask(loader, sampler_patch, seed=config.seed, rank=context.rank, device=device)
    try:
        # Everything checked: only now the run folder gets its record (training starts).
        if context.is_main:
            if resumed is None:
                truncate_metrics(run_dir / METRICS_FILE, 0)  # rows of an earlier attempt that never saved a checkpoint
            with atomic_path(run_dir / RUN_FILE) as tmp:
                tmp.write_text(json.dumps({**run_record, "dataset_sources": [v.source for v in dataset.volumes], "world_size": context.world_size}, indent=2), encoding="utf-8")
        if compiled_net is not None:
            # A trial step compiles the graphs now: compiled by default, a machine where
            # inductor fails trains eagerly instead; asked for, the failure is one line.
            # Not under DDP, where a rank failing inside backward would leave the others
            # waiting in its gradient all-reduce; there the failure stops the run.
            if not context.enabled and not _compiled_step_works(compiled_net, model, task, (config.batch, 1, *region), autocast_dtype, reporter, asked=config.compile):
                compiled = False
            else:
                net = compiled_net
        result: LoopResult = run_training(
            net,
            optimizer,
            task,
            options=options,
            context=context,
            start_iteration=start_iteration,
            scaler=scaler,
            save=save,
            metrics_path=run_dir / METRICS_FILE if context.is_main else None,
            reporter=reporter,
            should_stop=should_stop,
        )
    finally:
        loader.close()

    checksums = context.all_gather_object(state_checksum(model.state_dict()))
    if len(set(checksums)) > 1:
        raise TrainingError(f"ranks ended with different weights ({', '.join(checksums)})", hint="report this with the launch command")
    done = result.iteration - start_iteration
    summary = PretrainSummary(
        run_dir=os.path.abspath(run_dir),  # absolute: summary.json is read from anywhere
        iteration=result.iteration,
        start_iteration=start_iteration,
        stopped=result.stopped,
        seconds=round(result.seconds, 3),
        iterations_per_second=round(done / result.training_seconds, 4) if result.training_seconds > 0 else 0.0,  # training steps only, as the progress line
        last=result.last_row,
        mean_last=result.mean_rows,
        volumes=len(dataset.volumes),
        skipped=len(dataset.skipped),
        modalities=dataset.modality_counts(),
        patch=sampler_patch,
        device=str(device),
        precision=str(autocast_dtype).replace("torch.", "") if autocast_dtype else "fp32",
        world_size=context.world_size,
        compiled=compiled,
        rank_weight_checksums=checksums,
        checkpoint=os.path.abspath(checkpoint_path),
        model=os.path.abspath(run_dir / MODEL_FILE),
    )
    if context.is_main:
        with atomic_path(run_dir / "summary.json") as tmp:
            tmp.write_text(json.dumps({**summary.to_dict(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2), encoding="utf-8")
    return summary
