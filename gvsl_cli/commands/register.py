"""``gvsl register``: register a moving volume onto a fixed one; outputs on the fixed grid."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from gvsl_cli.commands.inputs import refuse_stdout_folder


def register(app: typer.Typer) -> None:
    app.command("register")(register_command)


def run_and_render(
    fixed: Path,
    moving: Path,
    out_dir: Path,
    *,
    weights: Optional[str],
    moving_labels: Optional[Path],
    fixed_labels: Optional[Path],
    iters: int,
    similarity: str,
    spacing: Optional[float],
    affine_only: bool,
    modality: str,
    device: str,
    as_json: bool,
    quiet: bool = False,
) -> dict:
    """Run one registration and print its report (shared by ``register`` and ``demo``).

    Progress goes to stderr; the report goes to stdout, as JSON with ``as_json`` (nothing
    else is printed on stdout then) or as a table. ``quiet``: only warnings on stderr and
    no table (the JSON report is still printed).
    """
    import time

    from rich.console import Console

    from gvsl_cli.device import resolve_device
    from gvsl_cli.download import ConsoleReporter
    from gvsl_cli.registration import RegistrationConfig
    from gvsl_cli.registration_job import run_registration

    config = RegistrationConfig(similarity=similarity, iters=iters, spacing=spacing, deformable=not affine_only, modality=modality)
    torch_device = resolve_device(device)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    start = time.perf_counter()

    def log(message: str) -> None:
        if quiet and not message.startswith("warning:"):
            return
        err.print(f"[{time.perf_counter() - start:5.1f} s] {message}", markup=False)

    report = run_registration(
        fixed,
        moving,
        out_dir,
        config=config,
        weights_spec=weights,
        moving_labels_path=moving_labels,
        fixed_labels_path=fixed_labels,
        device=torch_device,
        log=log,
        downloads=ConsoleReporter(quiet=quiet),
    )
    if as_json:
        # The report holds no NaN/Infinity (run_registration writes them as null): strict JSON.
        typer.echo(json.dumps(report, allow_nan=False))
    elif not quiet:
        render_report(report, out_dir)
    return report


def _number(value: float | None, spec: str) -> str:
    """``value`` formatted with ``spec``; "n/a" for None (a value that was not finite)."""
    return "n/a" if value is None else format(value, spec)


def render_report(report: dict, out_dir: Path) -> None:
    """The report as a short table on stdout."""
    from rich.table import Table

    sim = report["similarity"]
    better = "higher is better" if sim["higher_is_better"] else "lower is better"
    table = Table("measure", "before", "after", title=f"gvsl register -> {out_dir}", title_justify="left")
    table.add_row(f"{sim['metric'].upper()} ({better})", _number(sim["before"], ".4f"), _number(sim["after"], ".4f"))
    if report["dice"]:
        for label, values in report["dice"]["labels"].items():
            table.add_row(f"Dice label {label}", _number(values["before"], ".3f"), _number(values["after"], ".3f"))
        table.add_row("Dice mean", _number(report["dice"]["mean_before"], ".3f"), _number(report["dice"]["mean_after"], ".3f"))
    jac = report["jacobian"]
    table.add_row("voxels with det J <= 0", "", f"{_number(jac['nonpositive_percent'], '.3f')} %")
    table.add_row("SD of log det J", "", _number(jac["sd_log_j"], ".3f"))
    table.add_row("seconds (registration / total)", "", f"{report['seconds']['registration']:.1f} / {report['seconds']['total']:.1f}")
    table.add_row("device", "", report["device"])
    from gvsl_cli.commands.output import table_console

    console = table_console()  # off a terminal no value is cut at 80 columns
    console.print(table)
    for note in report["notes"]:
        console.print(f"note: {note}", markup=False, soft_wrap=True)
    console.print(f"outputs: {', '.join(report['outputs'].values())} in {out_dir}", markup=False, soft_wrap=True)


def register_command(
    fixed: Path = typer.Argument(..., help="Fixed volume: the outputs live on its grid (NIfTI, NRRD, MHA/MHD or DICOM folder)."),
    moving: Path = typer.Argument(..., help="Moving volume, resampled onto the fixed grid. Sizes, spacings, origins and directions may differ."),
    out_dir: Path = typer.Option(Path("gvsl_registration"), "-o", "--out", "--output", callback=refuse_stdout_folder, help="Output folder: moved.nii.gz, displacement.nii.gz, affine.tfm, moved_labels.nii.gz, report.json."),
    weights: Optional[str] = typer.Option(None, "--weights", help="GVSL weights for a network prediction refined by optimisation: a manifest name, a gvsl checkpoint or run folder, an official .pth file, or an http(s) URL; none = optimisation alone."),
    moving_labels: Optional[Path] = typer.Option(None, "--moving-labels", help="Label map on the moving grid, warped by nearest neighbour (values kept)."),
    fixed_labels: Optional[Path] = typer.Option(None, "--fixed-labels", help="Label map on the fixed grid, for Dice per label in the report (needs --moving-labels)."),
    iters: int = typer.Option(100, "--iters", min=0, help="Instance-optimisation iterations per stage (affine, each coarse level; the finest level runs 0.4x). 0 = network prediction only."),
    similarity: str = typer.Option("ncc", "--similarity", help="ncc (same modality), mse (same intensity scale) or mind (MIND-SSC, CT-MR pairs)."),
    spacing: Optional[float] = typer.Option(None, "--spacing", help="Finest optimisation spacing in mm (default: automatic; for a 1 mm head 1.76 mm on a CPU, 1.0 mm on a GPU). Finer is more accurate and slower."),
    affine_only: bool = typer.Option(False, "--affine-only", help="Stop after the affine stage (no deformable part)."),
    modality: str = typer.Option("auto", "--modality", help="Intensity mapping: auto, ct or mr; ct or mr also replaces the --weights' contract for the network (auto keeps it)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout (progress stays on stderr)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only warnings (and the --json report); no progress, no table."),
) -> None:
    """Register MOVING onto FIXED in physical space: moved image, ITK displacement field, affine, warped labels, report."""
    run_and_render(
        fixed,
        moving,
        out_dir,
        weights=weights,
        moving_labels=moving_labels,
        fixed_labels=fixed_labels,
        iters=iters,
        similarity=similarity,
        spacing=spacing,
        affine_only=affine_only,
        modality=modality,
        device=device,
        as_json=as_json,
        quiet=quiet,
    )
