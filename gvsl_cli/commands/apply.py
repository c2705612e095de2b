"""``gvsl apply``: warp more images and label maps with a saved transform (register once, warp many)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("apply")(apply)


def output_name(path: Path) -> str:
    """``scan.nii.gz`` -> ``scan_warped.nii.gz``; a DICOM folder -> ``<folder>_warped.nii.gz``."""
    from gvsl_cli.io import volume_suffix

    suffix = volume_suffix(path)
    if suffix is None:
        return f"{path.name}_warped.nii.gz"
    return f"{path.name[: -len(suffix)]}_warped{suffix}"


def apply(
    images: Optional[List[Path]] = typer.Argument(None, help="Images to warp (linear interpolation, float32 output)."),
    transform: List[Path] = typer.Option(..., "-t", "--transform", help="A gvsl register output folder, a displacement field, or an ITK transform file; repeat to chain (the last is applied first, as antsApplyTransforms)."),
    labels: List[Path] = typer.Option([], "-l", "--labels", help="Label maps to warp (nearest neighbour, values and pixel type kept); repeatable."),
    reference: Optional[Path] = typer.Option(None, "-r", "--reference", help="Image whose grid the outputs take; default: the displacement field's grid (the fixed image of gvsl register)."),
    out_dir: Path = typer.Option(Path("."), "-o", "--out", help="Output folder; each output is named <input>_warped.<ext>."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON line per output on stdout."),
) -> None:
    """Warp IMAGES (and --labels maps) with a saved transform onto the fixed grid."""
    from rich.console import Console

    from gvsl_cli.errors import InputError
    from gvsl_cli.geometry import Geometry
    from gvsl_cli.io import read_volume, write_volume
    from gvsl_cli.warping import apply_transform, read_transform_chain

    jobs = [(path, False) for path in images or []] + [(path, True) for path in labels]
    if not jobs:
        raise InputError("nothing to warp", hint="give image paths and/or --labels label maps")
    chain, field_grid = read_transform_chain(list(transform))
    if reference is not None:
        grid = Geometry.of(read_volume(reference))
    elif field_grid is not None:
        grid = field_grid
    else:
        raise InputError("no output grid: the transforms hold no displacement field", hint="give --reference (the fixed image)")
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    for path, is_labels in jobs:
        target = out_dir / output_name(path)
        if target.resolve() == path.resolve():
            raise InputError(f"{path}: output would overwrite the input", hint="choose another -o folder")
        warped = apply_transform(read_volume(path), chain, grid, labels=is_labels)
        write_volume(warped, target)
        if as_json:
            typer.echo(json.dumps({"input": str(path), "output": str(target), "labels": is_labels}))
        else:
            err.print(f"{path} -> {target} ({'nearest, labels' if is_labels else 'linear'})", markup=False)
