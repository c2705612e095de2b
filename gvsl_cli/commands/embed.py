"""``gvsl embed``: global feature vectors (and dense feature maps) of volumes, from GVSL weights."""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer

from gvsl_cli.commands.inputs import refuse_stdout_folder


def register(app: typer.Typer) -> None:
    app.command("embed")(embed_command)


class ConsoleReporter:
    """Progress on stderr: a bar over volumes on a terminal, one line per volume elsewhere
    (a SLURM log, a pipe); failures always, one line each."""

    def __init__(self, quiet: bool) -> None:
        from rich.console import Console

        self.quiet = quiet
        self.console = Console(stderr=True, highlight=False, soft_wrap=True)
        self.live = not quiet and self.console.is_terminal
        self.progress = None
        self.volume_task = None
        self.window_task = None
        self.started = time.monotonic()
        self.position = ""

    def _print(self, text: str) -> None:
        (self.progress.console if self.progress is not None else self.console).print(text, markup=False)

    def inputs_skipped(self, skipped) -> None:
        for item in skipped:
            duplicate = item.reason.startswith(("given more than once", "same file as"))
            if not (duplicate and self.quiet):
                self._print(f"skipped {item.path}: {item.reason}")

    def start(self, total: int, already_done: int) -> None:
        if already_done and not self.quiet:
            self._print(f"{already_done} volume(s) already embedded in this folder: skipped (--overwrite computes them again)")
        if self.live and total:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=True
            )
            self.progress.start()
            self.volume_task = self.progress.add_task("volumes", total=total)
            self.window_task = self.progress.add_task("windows", total=1)

    def volume_started(self, index: int, total: int, source) -> None:
        self.position = f"{index}/{total}"
        if self.progress is not None:
            self.progress.update(self.window_task, completed=0, total=1, description=f"  {source.name}"[-40:])

    def windows_done(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress.update(self.window_task, completed=done, total=total)

    def volume_done(self, source, seconds: float) -> None:
        if self.progress is not None:
            self.progress.advance(self.volume_task)
        elif not self.quiet:
            self._print(f"[{time.monotonic() - self.started:7.1f} s] {self.position} {source.name} ({seconds:.1f} s)")

    def volume_failed(self, source, reason: str) -> None:
        self._print(f"failed {source.path}: {reason}")
        if self.progress is not None:
            self.progress.advance(self.volume_task)

    def volume_warning(self, source, text: str) -> None:
        self._print(f"warning: {source.path} {text}")  # also under --quiet

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def embed_command(
    inputs: List[str] = typer.Argument(..., help="Volumes: files, folders (searched recursively), DICOM series folders, lists of paths (a .txt file or <(find ...)), glob patterns ('scans/**/*.nii.gz'), or - to read paths from stdin."),
    weights: str = typer.Option(..., "--weights", help="GVSL weights: a manifest name, a gvsl checkpoint (e.g. a pretrain run's model.pt) or run folder, an official .pth file, or an http(s) URL."),
    out_dir: Path = typer.Option(Path("gvsl_embeddings"), "-o", "--out", "--output", callback=refuse_stdout_folder, help="Output folder: NAME.npy per volume (or embeddings.jsonl), NAME_features.nii.gz with --dense, embed.json."),
    output_format: str = typer.Option("npy", "--format", help="npy (one float32 vector file per volume) or jsonl (one JSON line per volume in embeddings.jsonl)."),
    dense: bool = typer.Option(False, "--dense", help="Also write the dense feature map (the U-Net's last decoder feature, width channels) as a vector image with geometry."),
    dense_grid: str = typer.Option("input", "--dense-grid", help="Grid of the dense maps: input (the volume's own grid) or canonical (the network's isotropic grid; smaller for fine CTs)."),
    include: List[str] = typer.Option([], "--include", help="Only volumes whose name (e.g. p1/ct) or file name matches this glob pattern; repeatable."),
    exclude: List[str] = typer.Option([], "--exclude", help="Leave out volumes whose name or file name matches this glob pattern (e.g. '*seg*', 'labelsTr/*'); repeatable."),
    shard: str = typer.Option("0/1", "--shard", help="I/N: embed every N-th volume of the sorted list from the I-th (0-based), e.g. --shard $SLURM_ARRAY_TASK_ID/8."),
    window: Optional[int] = typer.Option(None, "--window", help="Dense maps: sliding-window side in voxels, a multiple of 16 (default: the weights' training patch, else 128). The global vector always pools the whole volume."),
    overlap: float = typer.Option(0.5, "--overlap", help="Dense maps: fraction shared by neighbouring windows."),
    modality: Optional[str] = typer.Option(None, "--modality", help="Intensity mapping ct, mr or auto instead of the weights' contract (recorded in embed.json; default: the contract's)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Compute again volumes whose outputs already exist (default: skip them)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only failures, warnings and the final line."),
) -> None:
    """One global feature vector per volume (and dense feature maps) from pre-trained GVSL weights.

    Volumes already embedded in the output folder are skipped, so a run can be resumed and
    split over SLURM array tasks with --shard.
    """

    from gvsl_cli.commands.inputs import stdin_for
    from gvsl_cli.device import resolve_device
    from gvsl_cli.embedding import EmbedConfig, embed, parse_shard
    from gvsl_cli.errors import IncompleteError
    from gvsl_cli.weights import load_weights_spec

    config = EmbedConfig(
        format=output_format,
        dense=dense,
        dense_grid=dense_grid,
        window=window,
        overlap=overlap,
        precision=precision,
        shard=parse_shard(shard),
        overwrite=overwrite,
        include=tuple(include),
        exclude=tuple(exclude),
        modality=modality.lower() if modality else None,
    )
    reporter = ConsoleReporter(quiet)
    if not dense and (window is not None or overlap != 0.5 or dense_grid != "input") and not quiet:
        reporter.console.print("note: --window, --overlap and --dense-grid apply to dense maps; without --dense they are not used", markup=False)
    torch_device = resolve_device(device)
    from gvsl_cli.download import ConsoleReporter as DownloadReporter

    loaded = load_weights_spec(weights, reporter=DownloadReporter(quiet=quiet))
    stdin_lines = stdin_for(inputs)

    # SIGTERM (SLURM's time limit, preemption) stops like Ctrl-C (cli.Terminated): the write
    # in progress removes its temporary file; finished volumes are kept and skipped next time.
    try:
        summary = embed(inputs, out_dir, loaded, config, torch_device, stdin_lines=stdin_lines, reporter=reporter)
    finally:
        reporter.close()
    problems = [s for s in summary.skipped_inputs if not s.reason.startswith(("given more than once", "same file as"))]
    problems += summary.failed
    line = f"embedded {len(summary.computed)} volume(s) ({summary.dim} values each) in {summary.seconds:.1f} s on {torch_device}"
    if summary.already_done:
        line += f"; {len(summary.already_done)} already done"
    typer.echo(f"{line} -> {summary.outputs}", err=True)
    if problems:
        raise IncompleteError(f"{len(problems)} input(s) could not be embedded (listed above)", hint="fix or remove them and run again: finished volumes are skipped")
