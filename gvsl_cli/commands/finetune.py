"""``gvsl finetune``: supervised segmentation training from GVSL pre-trained weights."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer

from gvsl_cli.commands.inputs import refuse_stdout_folder


def register(app: typer.Typer) -> None:
    app.command("finetune")(finetune)


def _losses_text(row: dict) -> str:
    return f"loss {row['loss']:.4f} dice_loss {row['dice_loss']:.4f} ce {row['ce']:.4f}"


def _dice(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _summary_table(summary):
    from rich.table import Table

    where = "training cases" if summary.validated_on_training_cases else f"{len(summary.val_cases)} validation case(s)"
    status = "finished" if summary.stopped is None else f"stopped ({summary.stopped}); continue with --resume"
    table = Table(title=f"gvsl finetune ({summary.mode}): Dice on {where}, canonical grid")
    table.add_column("class", style="bold")
    table.add_column("value", justify="right")
    table.add_column(f"before (it {summary.initial['iteration']})", justify="right")
    table.add_column(f"best (it {summary.best['iteration']})", justify="right")
    table.add_column(f"last (it {summary.last['iteration']})", justify="right")
    for name, value in summary.labels.items():
        if value == 0:
            continue
        table.add_row(name, str(value), *(_dice(row["val_dice"].get(name)) for row in (summary.initial, summary.best, summary.last)))
    table.add_row("mean", "", *(_dice(row["val_mean_dice"]) for row in (summary.initial, summary.best, summary.last)), style="bold")
    # Below the table, not as its caption: a caption wraps at the table's width and would
    # cut the best model's path (what the user copies into gvsl segment) in a log.
    footer = [
        f"iterations {summary.start_iteration} → {summary.iteration} ({status}); {summary.seconds:.1f} s with validations, "
        f"{summary.iterations_per_second:.2f} it/s of training on {summary.device} ({summary.precision}{', compiled' if summary.compiled else ''}); patch {'×'.join(map(str, summary.patch))}; "
        f"{len(summary.train_cases)} training case(s)",
        f"best model: {summary.best_checkpoint}",
    ]
    return table, footer


def finetune(
    context: typer.Context,
    dataset: Optional[Path] = typer.Argument(None, help="nnU-Net raw dataset folder (imagesTr/CASE_0000.nii.gz, labelsTr/CASE.nii.gz, dataset.json). Or give --images and --labels."),
    images: Optional[Path] = typer.Option(None, "--images", help="Folder of images (instead of DATASET), matched to --labels by case name (CASE or CASE_0000)."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Folder of label maps (CASE.nii.gz, integer values; 0 is the background)."),
    output: Path = typer.Option(Path("gvsl-finetune"), "-o", "--output", "--out", callback=refuse_stdout_folder, help="Run folder: best.pt, last.pt, metrics.jsonl, summary.json."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Pre-trained GVSL weights: a manifest name, a gvsl checkpoint or run folder, an official .pth file, or a URL (not with --mode scratch)."),
    mode: str = typer.Option("finetune", "--mode", help="finetune (all weights from the pre-trained ones), linear (frozen U-Net, train the head only) or scratch (random weights)."),
    width: Optional[int] = typer.Option(None, "--width", help="U-Net width for --mode scratch (default: 32, the paper's)."),
    spacing: Optional[float] = typer.Option(None, "--spacing", help="Override the weights' resampling spacing in mm (default: the weights'; scratch: 1.0)."),
    modality: Optional[str] = typer.Option(None, "--modality", help="Override the weights' intensity mapping: ct, mr or auto."),
    iters: Optional[int] = typer.Option(None, "--iters", help="Train up to this iteration (default: 5000; with --resume, the run's own)."),
    batch: Optional[int] = typer.Option(None, "--batch", help="Patches per step (default: 2, as nnU-Net)."),
    patch: Optional[int] = typer.Option(None, "--patch", help="Training patch side in voxels, a multiple of 16; also the inference window (default: 128)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Adam learning rate (default: 1e-4 finetune, 1e-2 linear, 3e-4 scratch)."),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="Share of the cases held out for validation, drawn with --seed (default: 0.2; at least one case when there are two or more)."),
    fold: Optional[int] = typer.Option(None, "--fold", help="Validate on cross-validation fold K (0-based) of --folds instead of --val-fraction; with --splits, entry K of that file."),
    folds: Optional[int] = typer.Option(None, "--folds", help="Number of cross-validation folds for --fold (default: 5, as nnU-Net)."),
    splits: Optional[Path] = typer.Option(None, "--splits", help="nnU-Net's splits_final.json: --fold K validates on exactly the cases of nnU-Net's fold K."),
    val_every: int = typer.Option(250, "--val-every", help="Validate (per-class Dice, sliding window) and checkpoint every this many iterations."),
    overlap: float = typer.Option(0.5, "--overlap", help="Sliding-window overlap of validation predictions, in [0, 1)."),
    augment: Optional[bool] = typer.Option(None, "--augment/--no-augment", help="Random rotation (±15°), scaling (0.85-1.15), brightness and gamma of training patches; no flips (default: on)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the split, the head's initial weights and every random draw (default: 0)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16 or fp16."),
    workers: int = typer.Option(2, "--workers", help="Threads that read and prepare cases."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in the output folder from last.pt (a complete run: nothing to do, exit 0)."),
    log_every: int = typer.Option(10, "--log-every", help="Read losses from the device and log them every this many iterations."),
    time_limit: Optional[str] = typer.Option(None, "--time-limit", help="Stop cleanly (validation, checkpoint) after this long (3600, 90m, 2h, 1:30:00); continue with --resume."),
    compile_model: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the training step's network: faster steps after a compile of about a minute (default: on for CUDA runs of 2000 iterations or more)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress, notes or summary table (warnings are still shown)."),
) -> None:
    """Train a segmentation network from GVSL weights on labelled images (nnU-Net layout or two folders)."""
    from gvsl_cli.commands.inputs import given_on_command_line
    from gvsl_cli.commands.output import table_console
    from gvsl_cli.commands.pretrain import RichReporter, parse_duration
    from gvsl_cli.finetuning import FinetuneConfig, finetune as run_finetune

    given = {
        "dataset": str(dataset) if dataset else None,
        "images": str(images) if images else None,
        "labels": str(labels) if labels else None,
        "weights": weights,
        "width": width,
        "spacing": spacing,
        "modality": modality.lower() if modality else None,
        "iters": iters,
        "batch": batch,
        "patch": patch,
        "lr": lr,
        "val_fraction": val_fraction,
        "fold": fold,
        "folds": folds,
        "splits": str(splits) if splits else None,
        "augment": augment,
        "seed": seed,
    }
    explicit = frozenset(name for name, value in given.items() if value is not None)
    # The schedule too: a plain --resume keeps the run's own.
    explicit |= {{"time_limit": "time_limit_s"}.get(name, name) for name in given_on_command_line(context, ("val_every", "log_every", "time_limit"))}
    if mode != "finetune":
        explicit |= {"mode"}
    config = FinetuneConfig(
        run_dir=str(output),
        mode=mode.lower(),
        **{name: value for name, value in given.items() if value is not None},
        val_every=val_every,
        overlap=overlap,
        device=device,
        precision=precision,
        workers=workers,
        resume=resume,
        log_every=log_every,
        time_limit_s=parse_duration(time_limit) if time_limit else None,
        compile=compile_model,
        explicit=explicit,
    )

    # Ctrl-C or SIGTERM while training: validate, checkpoint and stop after this iteration.
    from gvsl_cli.commands.stopping import exit_if_stopped, stop_requests

    reporter = RichReporter(quiet, label="finetune", describe=_losses_text)
    try:
        with stop_requests(reporter) as should_stop:
            summary = run_finetune(config, reporter=reporter, should_stop=should_stop)
    finally:
        reporter.stop()
    if summary is not None and not quiet:
        console = table_console()
        table, footer = _summary_table(summary)
        console.print(table)
        for line in footer:
            console.print(line, markup=False, soft_wrap=True)
    exit_if_stopped(summary, "finetune")
