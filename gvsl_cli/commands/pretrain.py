"""``gvsl pretrain``: GVSL self-supervised pre-training on folders of unlabeled volumes."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import List, Optional

import typer

from gvsl_cli.commands.inputs import refuse_stdout_folder
from gvsl_cli.errors import ConfigError


def register(app: typer.Typer) -> None:
    app.command("pretrain")(pretrain)


def parse_duration(text: str) -> float:
    """Seconds in "3600", "90s", "45m", "2h", "1.5h", "1:30:00" or SLURM's "2-00:00:00"."""
    value = text.strip().lower()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd]?)", value)
    if match:
        return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    match = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", value)
    if match:
        days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
        return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)
    raise ConfigError(f"--time-limit {text!r} is not a duration", hint="use seconds, 90m, 2h, H:MM:SS or D-HH:MM:SS")


def _clock(seconds: float) -> str:
    """H:MM:SS of a duration in seconds."""
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _losses_text(row: dict) -> str:
    return f"loss {row['loss']:.4f} ncc {row['ncc']:.4f} mse {row['mse']:.4f} smooth {row['smooth']:.2e}"


class RichReporter:
    """Progress (iteration, it/s, elapsed, ETA, loss terms) and notes on stderr, via rich.

    On a terminal: a live progress bar whose loss text is cut first when the terminal is
    narrow. Otherwise (a SLURM log, a pipe): a plain line at the first log point and then
    every ``log_interval_s`` seconds, so a long job's log shows where it is.
    """

    def __init__(self, quiet: bool, console=None, log_interval_s: float = 60.0, *, label: str = "pretrain", describe=None) -> None:
        """``label`` names the run in the progress line; ``describe(row)`` renders a metrics
        row's losses (default: pre-training's loss terms)."""
        from rich.console import Console

        self.label = label
        self.describe = describe or _losses_text
        self.quiet = quiet
        self.console = console or Console(stderr=True, highlight=False, soft_wrap=True)
        self.log_interval_s = log_interval_s
        self.progress = None
        self.task = None
        self.total = 0
        self.started_at: float | None = None
        self.last_line_at: float | None = None

    @property
    def training_started(self) -> bool:
        return self.started_at is not None

    def mark_started(self) -> None:
        """Training has started (``start`` without the display: ranks other than 0)."""
        if self.started_at is None:
            self.started_at = time.monotonic()

    def downloads(self):
        """Where a weights download (``--init``/``--weights`` by name or URL) reports:
        its progress bar and notices, warnings only under ``--quiet``."""
        from gvsl_cli.download import ConsoleReporter

        return ConsoleReporter(quiet=self.quiet)

    def note(self, text: str) -> None:
        if self.quiet and not text.startswith(("skipped", "nothing to do", "warning:")):
            return
        target = self.progress.console if self.progress is not None else self.console
        target.print(text, markup=False)

    def start(self, first_iteration: int, total: int) -> None:
        self.mark_started()
        self.total = total
        if self.quiet or not self.console.is_terminal:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        from rich.table import Column

        def fixed() -> Column:
            return Column(no_wrap=True)  # never squeezed: the loss text gives way first

        self.progress = Progress(
            TextColumn(self.label, table_column=fixed()),
            BarColumn(bar_width=10),
            MofNCompleteColumn(table_column=fixed()),
            TextColumn("{task.fields[rate]}", table_column=fixed()),
            TimeElapsedColumn(table_column=fixed()),
            TextColumn("eta {task.fields[eta]}", table_column=fixed()),
            TextColumn("{task.fields[losses]}", table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
            console=self.console,
            expand=True,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(self.label, total=total, completed=first_iteration, rate="", eta="-:--:--", losses="")

    def update(self, iteration: int, row: dict) -> None:
        if self.quiet:
            return
        rate = row.get("it_per_s", 0.0)
        # The rate of the last log block: it follows the run's real speed (compile, warm-up).
        eta = _clock((self.total - iteration) / rate) if rate > 0 else "-:--:--"
        if self.progress is not None:
            self.progress.update(self.task, completed=iteration, rate=f"{rate:.2f} it/s", eta=eta, losses=self.describe(row))
            return
        now = time.monotonic()
        if self.last_line_at is not None and now - self.last_line_at < self.log_interval_s and iteration < self.total:
            return
        self.last_line_at = now
        self.console.print(
            f"{self.label} {iteration}/{self.total} ({100 * iteration / self.total:.1f} %)  {rate:.2f} it/s  "
            f"elapsed {_clock(now - self.started_at)}  eta {eta}  {self.describe(row)}",
            markup=False,
        )

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _summary_table(summary):
    from rich.table import Table

    table = Table(title="gvsl pretrain", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    status = "finished" if summary.stopped is None else f"stopped ({summary.stopped}); continue with --resume"
    table.add_row("iterations", f"{summary.start_iteration} → {summary.iteration}  ({status})")
    compiled = ", compiled" if summary.compiled else ""
    table.add_row("time", f"{summary.seconds:.1f} s, {summary.iterations_per_second:.2f} it/s on {summary.device} ({summary.precision}{compiled}, {summary.world_size} process(es))")
    table.add_row("volumes", f"{summary.volumes} used, {summary.skipped} skipped; " + ", ".join(f"{n} {m.upper()}" for m, n in sorted(summary.modalities.items())))
    table.add_row("patch", "×".join(map(str, summary.patch)))
    for name in ("loss", "ncc", "mse", "smooth"):
        if name in summary.last:
            table.add_row(name, f"{summary.last[name]:.5g} (last), {summary.mean_last.get(name, float('nan')):.5g} (mean of last log block)")
    table.add_row("checkpoint", summary.checkpoint)
    if summary.model:
        table.add_row("weights", summary.model)
    return table


def pretrain(
    context: typer.Context,
    inputs: Optional[List[str]] = typer.Argument(None, help="Folders (searched recursively), volume files, DICOM series folders, lists of paths (a .txt file or <(find ...)), glob patterns, or - to read paths from stdin. Label maps (integer volumes of at most 64 values) are skipped. Optional with --resume."),
    output: Path = typer.Option(Path("gvsl-pretrain"), "-o", "--output", "--out", callback=refuse_stdout_folder, help="Run folder: checkpoints, metrics.jsonl, summary."),
    include: List[str] = typer.Option([], "--include", help="Only volumes whose name (e.g. p1/ct) or file name matches this glob pattern; repeatable."),
    exclude: List[str] = typer.Option([], "--exclude", help="Leave out volumes whose name or file name matches this glob pattern (e.g. '*seg*', 'labelsTr/*'); repeatable."),
    iters: Optional[int] = typer.Option(None, "--iters", help="Train up to this iteration (default: 10000; with --resume, the run's own)."),
    batch: Optional[int] = typer.Option(None, "--batch", help="Pairs per step and per process (default: 1)."),
    patch: Optional[int] = typer.Option(None, "--patch", help="Training patch side in voxels, a multiple of 16 (default: 128)."),
    spacing: Optional[float] = typer.Option(None, "--spacing", help="Resample volumes to this isotropic spacing in mm (default: 1.0, or --init's)."),
    modality: Optional[str] = typer.Option(None, "--modality", help="Intensity mapping: ct, mr or auto, decided per volume and reported (default: auto, or --init's)."),
    width: Optional[int] = typer.Option(None, "--width", help="U-Net width: 32 is the paper's network, 8 or 16 for small runs (default: 32, or --init's)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Adam learning rate (default: 1e-4)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N (torchrun: one GPU per process)."),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16 or fp16."),
    workers: int = typer.Option(2, "--workers", help="Threads that preprocess volumes and prefetch patches (0 = none)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of every random draw; the same seed gives the same run (default: 0)."),
    init: Optional[str] = typer.Option(None, "--init", help="Start from weights: a manifest name (gvsl fetch-weights --list), a gvsl checkpoint or run folder, an official GVSL .pth file, or an http(s) URL."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in the output folder from its last checkpoint (a run already at --iters: nothing to do, exit 0)."),
    save_every: int = typer.Option(500, "--save-every", help="Write a checkpoint every this many iterations (and at the end)."),
    log_every: int = typer.Option(10, "--log-every", help="Read losses from the device and log them every this many iterations."),
    time_limit: Optional[str] = typer.Option(None, "--time-limit", help="Stop cleanly with a checkpoint after this long (3600, 90m, 2h, 1:30:00)."),
    compile_model: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the model: faster steps after a compile of about a minute (default: on for CUDA runs of 2000 iterations or more)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Cache of preprocessed volumes (default: $GVSL_HOME/preprocessed or the user cache)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary (warnings, skipped inputs and 'nothing to do' are still reported)."),
) -> None:
    """Pre-train the GVSL network on unlabeled CT/MR volumes (single device, torchrun or SLURM)."""
    from gvsl_cli.commands.inputs import given_on_command_line, stdin_for
    from gvsl_cli.commands.output import table_console
    from gvsl_cli.data import inline_streams
    from gvsl_cli.pretraining import PretrainConfig, pretrain as run_pretrain

    # Paths on stdin or in a pipe are read now: the run stores its inputs for --resume.
    inputs = inline_streams(inputs or (), stdin_for(inputs or ()))

    # Options left unset may come from --init or, on --resume, from the checkpoint.
    given = {"iters": iters, "batch": batch, "patch": patch, "spacing": spacing, "modality": modality.lower() if modality else None, "width": width, "lr": lr, "seed": seed, "init": init}
    explicit = frozenset(name for name, value in given.items() if value is not None)
    # The schedule too: a plain --resume keeps the run's own.
    explicit |= {{"time_limit": "time_limit_s"}.get(name, name) for name in given_on_command_line(context, ("save_every", "log_every", "time_limit"))}
    config = PretrainConfig(
        inputs=tuple(inputs),
        include=tuple(include),
        exclude=tuple(exclude),
        run_dir=str(output),
        **{name: value for name, value in given.items() if value is not None},
        device=device,
        precision=precision,
        workers=workers,
        resume=resume,
        save_every=save_every,
        log_every=log_every,
        time_limit_s=parse_duration(time_limit) if time_limit else None,
        compile=compile_model,
        cache_dir=str(cache_dir) if cache_dir else None,
        explicit=explicit,
    )
    from gvsl_cli.config import PreprocessConfig

    PreprocessConfig(spacing=config.spacing, modality=config.modality)  # validate early, one-line errors

    from gvsl_cli.commands.stopping import exit_if_stopped, stop_requests

    reporter = RichReporter(quiet)
    try:
        with stop_requests(reporter) as should_stop:
            summary = run_pretrain(config, reporter=reporter, should_stop=should_stop)
    finally:
        reporter.stop()
    if summary is not None and not quiet and summary.rank_weight_checksums and _is_main_process():
        table_console().print(_summary_table(summary))
    exit_if_stopped(summary, "pretrain", announce=_is_main_process())


def _is_main_process() -> bool:
    import os

    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0) == 0
