"""The one training loop of gvsl, shared by pre-training and fine-tuning.

A *task* says what one iteration computes (``TrainingTask.losses``: a dict of scalar
tensors, "loss" being the one minimised) and where batches come from
(``TrainingTask.batch(iteration)``); ``run_training`` does the rest, the same for every
task: mixed precision, optimizer and gradient-scaler steps, loss logging without
per-step host synchronisation, metrics as JSON lines, periodic checkpoints through a
callback, a time limit, stop requests, and agreement between ranks under
DistributedDataParallel.

Why losses are buffered: reading a loss with ``.item()`` makes the host wait for the GPU
every step, which stalls the pipeline (data copies, kernel launches). The loop keeps each
step's detached losses on the device and reads them every ``log_every`` steps in one copy;
the metrics file still holds one row per iteration.

Resuming exactly: everything random in an iteration derives from (seed, rank, iteration)
(see ``data.iteration_seed``), and a checkpoint holds model, optimizer, scaler and RNG
states; so a run resumed from iteration k repeats an uninterrupted run from k + 1 on.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch

from gvsl_cli import errors
from gvsl_cli.device import autocast
from gvsl_cli.distributed import DistContext
from gvsl_cli.errors import ConfigError, InputError, TrainingError
from gvsl_cli.io import atomic_path, remove_empty_folders
from gvsl_cli.locking import RemovableLock, take_folder_lock
from gvsl_cli.model import UNET_MULTIPLE
from gvsl_cli.temporaries import remove_abandoned

METRICS_FILE = "metrics.jsonl"
#: The lock file a pretrain or finetune run holds in its run folder while it runs.
RUN_LOCK_FILE = ".gvsl-run.lock"


class TrainingTask(Protocol):
    """What a training run computes; see ``gvsl_cli.pretraining.PretrainTask``."""

    #: Names of the logged loss terms; the first is the total that is minimised.
    loss_names: tuple[str, ...]
    #: Where the batches live and the step runs.
    device: torch.device

    def batch(self, iteration: int) -> Any:
        """The inputs of ``iteration`` (1-based), already on the training device."""

    def losses(self, model: torch.nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """Scalar loss tensors keyed by ``loss_names`` for one batch (called under autocast)."""


class Reporter(Protocol):
    """Where progress goes (the CLI renders it; the engine prints nothing).

    A reporter may also have ``downloads()``, the ``download.Reporter`` for a weights
    download the run starts (``download_reporter``); without it, the default console one.
    """

    def start(self, first_iteration: int, total: int) -> None: ...

    def update(self, iteration: int, row: dict[str, float]) -> None: ...

    def note(self, text: str) -> None: ...


def download_reporter(reporter) -> "object | None":
    """``reporter.downloads()`` when the reporter has it, else None (``load_weights_spec``'s
    default: a progress bar and notices on stderr)."""
    downloads = getattr(reporter, "downloads", None)
    return downloads() if callable(downloads) else None


class SilentReporter:
    """A reporter that drops everything (library use, --quiet, ranks other than 0).

    ``on_start``: called when training starts. Ranks other than 0 pass their command's
    reporter's ``mark_started``, so that their Ctrl-C handler knows training runs and asks
    for a clean stop (with a checkpoint) as rank 0's does, instead of aborting that rank.
    """

    def __init__(self, on_start: Callable[[], None] | None = None) -> None:
        self.on_start = on_start

    def downloads(self):
        from gvsl_cli.download import Reporter as Silent

        return Silent()

    def start(self, first_iteration: int, total: int) -> None:
        if self.on_start is not None:
            self.on_start()

    def update(self, iteration: int, row: dict[str, float]) -> None:
        pass

    def note(self, text: str) -> None:
        pass


def check_loop_counts(iters: int, save_every: int, log_every: int, *, save_flag: str = "--save-every") -> None:
    """Raise ConfigError unless the iteration counts of a run are all >= 1.

    Commands call this while reading their options, before any data is loaded;
    ``LoopOptions`` calls it again for library users. ``save_flag`` is the command's name
    for the checkpoint interval (``--val-every`` for finetune).
    """
    for flag, value in (("--iters", iters), (save_flag, save_every), ("--log-every", log_every)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")


#: Largest --seed: torch's generators take 64-bit seeds, and a seed is stored and compared
#: as a signed 64-bit JSON integer by many readers; 2**63 - 1 keeps every consumer exact.
MAX_SEED = 2**63 - 1


def check_seed(seed: int) -> None:
    """Raise ConfigError unless ``seed`` is in 0 .. ``MAX_SEED`` (a larger one was an
    internal error inside torch.manual_seed: "Overflow when unpacking long long")."""
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"--seed must be in 0..{MAX_SEED} (2**63 - 1), got {seed}")


def check_learning_rate(lr: float) -> None:
    """Raise ConfigError unless ``lr`` is a finite number > 0 (inf passes a plain ``> 0``
    and turned every weight into NaN at the first step)."""
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"--lr must be a finite number > 0, got {lr:g}", hint="e.g. --lr 1e-4")


def check_workers(workers: int) -> None:
    """Raise ConfigError unless ``workers`` (threads preparing data) is >= 0."""
    if workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {workers}")


@dataclass(frozen=True)
class LoopOptions:
    """How the loop runs.

    Attributes:
        iters: last iteration (1-based, inclusive) of the whole run.
        save_every: write a checkpoint every this many iterations (and at the end).
        log_every: read losses from the device and write metrics every this many steps.
        time_limit_s: stop cleanly (checkpoint, then return) once this much wall time has
            passed since the loop started; None for no limit.
        autocast_dtype: torch.bfloat16/float16 for mixed precision, None for float32.
        grad_clip: clip the global gradient norm to this value; None to leave gradients.
    """

    iters: int
    save_every: int = 1000
    log_every: int = 10
    time_limit_s: float | None = None
    autocast_dtype: torch.dtype | None = None
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        check_loop_counts(self.iters, self.save_every, self.log_every)


@dataclass
class LoopResult:
    """How a run ended.

    Attributes:
        iteration: last completed iteration.
        stopped: None when ``iters`` was reached, else why it stopped early
            ("time limit", "stop requested").
        seconds: wall time of the loop.
        training_seconds: the part of it spent in training steps (``seconds`` without the
            checkpoints and the validations done in ``save``): the time its rate is from.
        last_row: the metrics of the last iteration (mean over ranks).
        mean_rows: mean of each loss over the last ``log_every`` iterations.
    """

    iteration: int
    stopped: str | None
    seconds: float
    training_seconds: float = 0.0
    last_row: dict[str, float] = field(default_factory=dict)
    mean_rows: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- state


def check_cpu_bf16_patch(autocast_dtype, device: torch.device, patch: tuple[int, ...], *, shrunk: bool = False) -> None:
    """Refuse bf16 training on the CPU when a level of the U-Net would be 2 voxels deep.

    PyTorch's CPU convolutions (oneDNN, torch 2.13) compute the weight gradient of a bf16
    ``Conv3d`` wrongly when its input is 2 voxels deep (D = 2, whatever H and W): relative
    errors about 1, or inf and NaN, which make Adam's state inf so the weights stop
    learning while the loss looks normal. The forward pass and the input gradient are right.
    The U-Net halves its padded input four times, so a patch depth padded to 16 or 32 puts a
    level (and, at 32, the affine head at the bottleneck) at depth 2.

    Args:
        patch: training patch (D, H, W) in voxels.
        shrunk: the data made the patch smaller than ``--patch`` asked (then a larger
            ``--patch`` does not help).
    """
    if device.type != "cpu" or autocast_dtype is not torch.bfloat16:
        return
    padded = -(-patch[0] // UNET_MULTIPLE) * UNET_MULTIPLE
    if 2 in {padded >> level for level in range(5)}:
        way_out = "a finer --spacing (the volumes make the patch this shallow)" if shrunk else "--patch 48 or more"
        raise ConfigError(
            f"bf16 on the CPU with a patch {patch[0]} voxels deep: PyTorch's CPU bf16 convolutions compute wrong weight "
            f"gradients at the U-Net level that is 2 voxels deep; use --precision fp32 (the CPU default) or {way_out}"
        )


def rng_state(device: torch.device) -> dict[str, Any]:
    """Global RNG states (CPU, and the CUDA device's) as tensors: loadable with weights_only."""
    state = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["torch_cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    if "torch_cpu" in state:
        torch.set_rng_state(state["torch_cpu"])
    if device.type == "cuda" and "torch_cuda" in state:
        torch.cuda.set_rng_state(state["torch_cuda"], device)


def training_state(optimizer: torch.optim.Optimizer, scaler: "torch.amp.GradScaler", iteration: int, device: torch.device) -> dict[str, Any]:
    """The resumable state besides the model: optimizer, scaler, RNG, iteration."""
    return {
        "iteration": int(iteration),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng_state(device),
    }


def restore_training_state(state: dict[str, Any], optimizer: torch.optim.Optimizer, scaler: "torch.amp.GradScaler", device: torch.device) -> int:
    """Load what ``training_state`` saved; returns the iteration to continue after.

    The optimizer keeps its own implementation flags (``fused``, ``foreach``,
    ``capturable``: chosen for this device) instead of the checkpoint's, which
    ``load_state_dict`` would otherwise restore: a CPU or older checkpoint must not turn
    CUDA's fused Adam off (with fp16 that even breaks GradScaler), nor a CUDA checkpoint
    turn it on for the CPU. They are set before loading, so the step counters are placed
    where this implementation wants them.
    """
    saved = state["optimizer"]
    implementation = ("fused", "foreach", "capturable")
    groups = [
        {**saved_group, **{key: group[key] for key in implementation if key in group}}
        for saved_group, group in zip(saved["param_groups"], optimizer.param_groups)
    ]
    optimizer.load_state_dict({**saved, "param_groups": groups})
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    restore_rng_state(state.get("rng", {}), device)
    return int(state["iteration"])



@contextlib.contextmanager
def exclusive_run_folder(run_dir: Path, command: str, context: DistContext | None = None, reporter: "Reporter | None" = None) -> Iterator[None]:
    """Hold ``run_dir`` for one run of ``command`` ("pretrain" or "finetune") during the block.

    Two runs writing into one folder (a SLURM requeue while the preempted job still dies, a
    copied ``-o``) would leave one run's record beside the other's checkpoints, and
    ``--resume`` would continue from the mix. The run takes an exclusive advisory lock on
    ``RUN_LOCK_FILE`` in the folder (``locking.RemovableLock``) before it reads or writes
    anything there; the operating system drops it when the process dies, and a run that
    ends removes the file. A second run finds the lock taken and stops at once, having
    written nothing in the folder.

    The folder is created if needed (to hold the lock file); folders created here are
    removed again when the run leaves them empty (it failed before writing anything).
    A folder that cannot be created or written, and a file system without locks, are left
    to the run's own checks (``io.ensure_writable_folder`` names them) or, for the latter,
    reported as a warning: nothing can write into a read-only folder, and refusing to
    train on such file systems would be worse than training unguarded.

    Under several processes (``context.enabled``) only rank 0 takes the lock, and every
    rank learns its outcome by a broadcast before any other collective: all ranks raise the
    same error together instead of the others waiting for rank 0 forever.

    Raises:
        InputError: ``run_dir`` is a file, or another process holds the run folder.
    """
    main = context is None or context.is_main
    lock: RemovableLock | None = None
    created: list[Path] = []
    failure: BaseException | None = None
    if main:
        try:
            lock, created = _lock_run_folder(run_dir, command, reporter or SilentReporter())
        except Exception as exc:  # noqa: BLE001 - told to the other ranks, then raised
            failure = exc
    if context is not None and context.enabled:
        told = context.broadcast_object(None if failure is None else (type(failure).__name__, str(failure), getattr(failure, "hint", None)))
        if told is not None and failure is None:
            kind, message, hint = told
            error_class = getattr(errors, kind, None)
            if not (isinstance(error_class, type) and issubclass(error_class, errors.GvslError)):
                error_class, message = TrainingError, f"rank 0 could not take the run folder {run_dir}: {kind}: {message}"
            told = error_class(message, hint=hint)
            told.printed_by_rank_0 = True  # the CLI prints rank 0's line only, not one per rank
            raise told
    if failure is not None:
        raise failure
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
        remove_empty_folders(created)


def _lock_run_folder(run_dir: Path, command: str, reporter: "Reporter"):
    """(the lock held, or None when there is none to take; the folders created for it)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"{run_dir}: run folder is a file, not a folder", hint="point -o at a folder")
    created: list[Path] = []
    for _ in range(3):
        chain, missing = [], run_dir
        while not missing.exists() and missing != missing.parent:
            chain.append(missing)
            missing = missing.parent
        created = chain + [folder for folder in created if folder not in chain]  # deepest first
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError:
            remove_empty_folders(created)
            return None, []  # the run's ensure_writable_folder names the problem
        try:
            lock = take_folder_lock(run_dir / RUN_LOCK_FILE, command, busy="is running in this run folder", default_holder="gvsl pretrain or finetune")
            break
        except FileNotFoundError:
            continue  # a run that just failed removed its empty folder: create it again
        except OSError:
            # The folder cannot be written (read-only): no other run can write into it
            # either, and the run's own checks say what it cannot do.
            return None, created
    else:
        return None, created
    if lock is None:
        reporter.note(f"warning: {run_dir}: this file system has no file locks, so nothing stops a second run from writing into this run folder")
    else:
        remove_leftovers_of_killed_runs(run_dir)  # safe: no other run writes here now
    return lock, created


#: Files of a pretrain or finetune run folder, each written through ``io.atomic_path``.
RUN_FOLDER_FILES = ("last.pt", "model.pt", "best.pt", "run.json", "summary.json", METRICS_FILE)


def remove_leftovers_of_killed_runs(run_dir: Path) -> list[Path]:
    """Remove the temporary files (``.NAME.<random>.tmp<suffix>``) that runs killed while
    writing ``RUN_FOLDER_FILES`` left in ``run_dir``; returns them. A width-32 checkpoint's
    is ~390 MB, and SLURM's SIGKILL after a preemption's grace time can land in a write.
    Only for the holder of the run-folder lock: another run's files may be in flight."""
    return remove_abandoned([run_dir / name for name in RUN_FOLDER_FILES], unchanged_for_s=0.0)


def open_run(run_dir: Path, checkpoint_path: Path, *, resume: bool, command: str, required: tuple[str, ...] = ("training", "run"), state: str = "training state"):
    """The checkpoint a ``--resume`` run of ``command`` ("pretrain" or "finetune") continues
    from, or None for a new run.

    Raises:
        InputError: ``run_dir`` is a file.
        ConfigError: --resume without ``checkpoint_path``, with one of the other command's
            runs, or with one lacking any of the ``required`` entries (named ``state`` in
            the message); a new run into a folder already holding one.
    """
    from gvsl_cli.checkpoint import load_weights

    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"{run_dir}: run folder is a file, not a folder", hint="point -o at a folder")
    if not resume:
        if checkpoint_path.is_file():
            other = _run_kind(checkpoint_path)
            hint = "add --resume to continue it, or choose another -o" if other in (None, command) else f"it is a gvsl {other} run: choose another -o"
            raise ConfigError(f"{run_dir} already holds a {'' if other is None else f'gvsl {other} '}run ({checkpoint_path.name})", hint=hint)
        return None
    if not checkpoint_path.is_file():
        raise ConfigError(f"--resume: {checkpoint_path} does not exist", hint="start without --resume, or point -o at the run folder")
    resumed = load_weights(checkpoint_path)
    other = _kind_of(resumed.extra)
    if other != command:
        raise ConfigError(f"--resume: {run_dir} holds a gvsl {other} run, not a {command} run", hint=f"continue it with gvsl {other} --resume, or choose another -o")
    if any(key not in resumed.extra for key in required):
        raise ConfigError(f"--resume: {checkpoint_path} holds no {state}")
    return resumed


def _kind_of(extra: dict) -> str:
    """Which command wrote a run checkpoint: "finetune" (it holds a segmentation entry) or "pretrain"."""
    from gvsl_cli.checkpoint import SEGMENTATION_KEY

    return "finetune" if SEGMENTATION_KEY in extra else "pretrain"


def _run_kind(checkpoint_path: Path) -> str | None:
    """``_kind_of`` a checkpoint file; None when it cannot be read."""
    from gvsl_cli.checkpoint import load_weights
    from gvsl_cli.errors import GvslError

    try:
        return _kind_of(load_weights(checkpoint_path).extra)
    except (GvslError, OSError, RuntimeError, ValueError):
        return None


def iterations_remain(run_dir: Path, reached: int, iters: int, reporter: "Reporter") -> bool:
    """Whether a resumed run that reached ``reached`` has iterations left before ``iters``.

    A complete run is not a failure (a re-queued SLURM job, a job array): False, after a
    note. Raises ConfigError when ``iters`` is below what the run reached.
    """
    if reached == iters:
        reporter.note(f"nothing to do: the run in {run_dir} is already complete (iteration {reached} of --iters {iters})")
        return False
    if reached > iters:
        raise ConfigError(f"--iters {iters} is below the iteration the run in {run_dir} already reached ({reached})", hint=f"give --iters above {reached} to train further")
    return True


def schedule_of(config, names: tuple[str, ...]) -> dict[str, Any]:
    """The run's schedule (checkpoint and log intervals, time limit: ``names`` of
    ``config``), stored in its checkpoint so that a plain ``--resume`` keeps it."""
    return {name: getattr(config, name) for name in names}


def resumed_schedule(config, stored: dict | None):
    """``config`` with the schedule options the user did not give (``config.explicit``)
    taken from the run's stored ``schedule_of``: a requeue script that only adds
    ``--resume`` keeps the run's ``--time-limit`` (its guard before the scheduler's wall
    time) and ``--save-every``, instead of the defaults."""
    import dataclasses

    kept = {name: value for name, value in (stored or {}).items() if name not in config.explicit and hasattr(config, name)}
    return dataclasses.replace(config, **kept) if kept else config


def truncate_metrics(path: Path, iteration: int) -> None:
    """Drop metric rows after ``iteration`` (written after the last checkpoint of a killed run).

    Rewritten atomically; a last line cut off by the kill is dropped too.
    """
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("iteration", math.inf) <= iteration:
            kept.append(line)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


# --------------------------------------------------------------------------- the loop


#: ``--compile`` by default for CUDA runs with at least this many iterations to go: the
#: compile takes about a minute and then saves ~40 ms an iteration of pre-training at 128³
#: on an H100 (docs/performance.md), so it pays back after ~1500 iterations.
COMPILE_MIN_ITERATIONS = 2000


def compile_decision(asked: bool | None, device: torch.device, iterations_to_go: int) -> bool:
    """Whether to ``torch.compile`` the model: as asked, or ``_compile_by_default``."""
    return asked if asked is not None else _compile_by_default(device, iterations_to_go)


def _compile_by_default(device: torch.device, iterations_to_go: int) -> bool:
    """On CUDA (not on Windows, where inductor lacks its Triton backend) for runs of at
    least ``COMPILE_MIN_ITERATIONS`` iterations."""
    return device.type == "cuda" and sys.platform != "win32" and iterations_to_go >= COMPILE_MIN_ITERATIONS


def compiled_step_works(net: torch.nn.Module, model: torch.nn.Module, task: TrainingTask, batch: Any, autocast_dtype, reporter: Reporter, *, asked: bool | None) -> bool:
    """Run one forward + backward of the compiled ``net`` on ``batch``; whether to train with it.

    This compiles the forward and the backward graphs now, so a machine where inductor
    fails is found before training starts; ``batch`` must have the training batches'
    shapes and strides, so that the training step reuses the graphs instead of compiling
    again. The weights are untouched (no optimizer step) and ``model``'s gradients are
    cleared. On failure: with ``asked`` True (``--compile``) a ConfigError; otherwise
    (compiled by default) a warning, and False: train without the compiler.
    """
    try:
        with autocast(task.device, autocast_dtype):
            losses = task.losses(net, batch)
        losses[task.loss_names[0]].backward()
    except Exception as exc:  # noqa: BLE001 - any compiler failure means: train eagerly
        failure = f"torch.compile failed on this machine ({type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]})"
        torch._dynamo.reset()
        if asked:
            raise ConfigError(f"--compile: {failure}", hint="run without --compile") from exc
        reporter.note(f"warning: {failure}; training without it (--no-compile skips the attempt)")
        return False
    finally:
        model.zero_grad(set_to_none=True)
    return True


def run_training(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    task: TrainingTask,
    *,
    options: LoopOptions,
    context: DistContext,
    start_iteration: int,
    scaler: "torch.amp.GradScaler",
    save: Callable[[int, bool], None],
    metrics_path: Path | None,
    reporter: Reporter | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> LoopResult:
    """Train ``model`` from ``start_iteration`` + 1 to ``options.iters``.

    Args:
        model: the module the task calls (DDP-wrapped and/or compiled as wanted).
        save: ``save(iteration, final)`` writes a checkpoint; called on every rank (it should
            write on rank 0 only), every ``save_every`` iterations and when the loop ends.
        metrics_path: JSON-lines file rank 0 appends one row per iteration to.
        should_stop: polled every ``log_every`` steps (e.g. set by SIGTERM); any rank asking
            stops all ranks at the same iteration.

    Raises:
        TrainingError: a loss became NaN or infinite (nothing is saved after that point).
    """
    reporter = reporter or SilentReporter()
    names = task.loss_names
    device = context.device
    model.train()
    started = time.perf_counter()
    reporter.start(start_iteration, options.iters)
    buffer: list[torch.Tensor] = []
    buffer_start = start_iteration + 1
    result = LoopResult(iteration=start_iteration, stopped=None, seconds=0.0)
    saving_seconds = 0.0
    metrics = open(metrics_path, "a", encoding="utf-8") if (metrics_path is not None and context.is_main) else None
    last_flush_time = started
    try:
        for iteration in range(start_iteration + 1, options.iters + 1):
            batch = task.batch(iteration)
            with autocast(device, options.autocast_dtype):
                losses = task.losses(model, batch)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(losses[names[0]]).backward()
            if options.grad_clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), options.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            buffer.append(torch.stack([losses[name].detach().float() for name in names]))

            last = iteration == options.iters
            save_now = iteration % options.save_every == 0 or last
            # A single process stops at once when asked; several ranks must agree on the
            # iteration, which they do at log points.
            asked_alone = not context.enabled and should_stop()
            if not (iteration % options.log_every == 0 or save_now or asked_alone):
                continue
            # One host synchronisation per log_every steps: losses of all buffered steps.
            values = context.all_reduce_mean(torch.stack(buffer)).cpu()
            now = time.perf_counter()
            rate = len(buffer) / max(now - last_flush_time, 1e-9)
            last_flush_time = now
            if not torch.isfinite(values).all():
                bad = buffer_start + int((~torch.isfinite(values)).any(dim=1).nonzero()[0, 0])
                # A task may know a cause in its data (a damaged cache file) that no --lr fixes.
                damaged = getattr(task, "damaged_inputs", lambda iteration: None)(bad)
                if damaged:
                    raise TrainingError(f"the loss became {values[bad - buffer_start, 0].item()} at iteration {bad}: {damaged}", hint="delete that file (the volume is prepared again), then --resume")
                raise TrainingError(
                    f"the loss became {values[bad - buffer_start, 0].item()} at iteration {bad}",
                    hint="lower --lr, use --precision fp32, or --resume from the last checkpoint",
                )
            rows = []
            for offset, row_values in enumerate(values.tolist()):
                row = {"iteration": buffer_start + offset, **{n: v for n, v in zip(names, row_values)}}
                row["lr"] = optimizer.param_groups[0]["lr"]
                rows.append(row)
            rows[-1]["seconds"] = round(now - started, 3)
            rows[-1]["it_per_s"] = round(rate, 4)
            if metrics is not None:
                try:
                    metrics.write("".join(json.dumps(r) + "\n" for r in rows))
                    metrics.flush()
                except OSError as exc:  # a full disk: say which file (a cut row is dropped on resume)
                    raise OSError(exc.errno, exc.strerror, str(metrics_path)) from exc
            result.last_row = rows[-1]
            result.mean_rows = {n: sum(r[n] for r in rows) / len(rows) for n in names}
            reporter.update(iteration, rows[-1])
            buffer.clear()
            buffer_start = iteration + 1
            result.iteration = iteration

            out_of_time = options.time_limit_s is not None and now - started >= options.time_limit_s
            stop_asked = should_stop()
            stop = context.any(out_of_time or stop_asked) if not last else False
            if stop:
                # Both flags are decided on this rank; "stop requested" wins if any rank asked.
                result.stopped = "time limit" if out_of_time else "stop requested"
            if save_now or stop:
                saving_started = time.perf_counter()
                save(iteration, last or stop)
                saving_seconds += time.perf_counter() - saving_started
                # it/s (and the ETA drawn from it) count training steps only: a checkpoint
                # (with finetune's validation) would otherwise drag the next rate down.
                last_flush_time = time.perf_counter()
            if stop:
                break
    finally:
        if metrics is not None:
            metrics.close()
    result.seconds = time.perf_counter() - started
    result.training_seconds = result.seconds - saving_seconds
    return result
