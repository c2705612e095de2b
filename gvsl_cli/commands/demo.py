"""``gvsl demo``: register the built-in example pair (no network, no download) and show the result."""

from __future__ import annotations

from pathlib import Path

import typer

from gvsl_cli.commands.inputs import refuse_stdout_folder

#: The example pair shipped in gvsl_cli/examples (2 mm copies; see NOTICE.md there).
DEMO_FILES = {
    "moving": "colin27_t1_2mm.nii.gz",
    "fixed": "icbm152_t1_2mm.nii.gz",
    "moving_labels": "colin27_tissue_2mm.nii.gz",
    "fixed_labels": "icbm152_tissue_2mm.nii.gz",
}


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


def demo(
    out_dir: Path = typer.Option(Path("gvsl_demo"), "-o", "--out", "--output", callback=refuse_stdout_folder, help="Output folder for the demo's registration outputs."),
    iters: int = typer.Option(100, "--iters", min=0, help="Instance-optimisation iterations per stage."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only warnings (and the --json report); no progress, no table."),
) -> None:
    """Register Colin27 onto the ICBM152 template (2 mm, shipped) and report the tissue Dice."""
    from gvsl_cli.commands.register import run_and_render
    from gvsl_cli.resources import example_path

    files = {role: example_path(name) for role, name in DEMO_FILES.items()}
    run_and_render(
        files["fixed"],
        files["moving"],
        out_dir,
        weights=None,
        moving_labels=files["moving_labels"],
        fixed_labels=files["fixed_labels"],
        iters=iters,
        similarity="ncc",
        spacing=None,
        affine_only=False,
        modality="auto",
        device=device,
        as_json=as_json,
        quiet=quiet,
    )
