"""``gvsl info``: what gvsl sees in a volume (grid, orientation, intensities, modality).

``info`` is the diagnostic command, so it describes what it can: a volume with NaN or
infinite voxels (which every other command refuses) is shown with their count, and with
several paths an unusable one is reported in one line while the others are still listed;
the exit code is non-zero when any path failed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List

import typer


def register(app: typer.Typer) -> None:
    app.command("info")(info)


def describe_volume(path: Path, spacing: float) -> dict:
    """Geometry, intensity range, detected modality and canonical grid of one volume.

    ``nonfinite_voxels`` counts NaN/inf voxels; range and modality use the finite ones (None
    and "unknown" when there are none). Vector images (gvsl's displacement fields,
    probability and feature maps) are described too: ``components`` > 1, the range over
    all components, and modality "n/a" (intensities of no scanner).
    """
    import numpy as np
    import SimpleITK as sitk

    from gvsl_cli.geometry import Geometry
    from gvsl_cli.file_checks import nifti_nonfinite_mask
    from gvsl_cli.io import read_volume, volume_suffix
    from gvsl_cli.preprocess import canonical_geometry, detect_modality

    # info is the diagnostic command: NaN/inf voxels, which every other command refuses, are
    # counted and shown instead.
    image = read_volume(path, vector=None, finite=False)
    components = image.GetNumberOfComponentsPerPixel()
    geometry = Geometry.of(image)
    array = sitk.GetArrayViewFromImage(image)
    bad = ~np.isfinite(array) if array.dtype.kind == "f" else None
    if bad is not None and volume_suffix(path) in (".nii", ".nii.gz"):
        # ITK's NIfTI reader turned the file's NaN/inf voxels into 0: find them in the file.
        hidden = nifti_nonfinite_mask(path, components)
        if hidden is not None and hidden.shape == bad.shape:
            bad |= hidden
    # Voxels with a NaN/inf value (in any component of a vector image).
    nonfinite = 0 if bad is None else int(np.count_nonzero(bad.any(axis=-1) if components > 1 else bad))
    finite = array[~bad] if nonfinite else array
    orientation = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(geometry.direction)
    # The code names the nearest axes only: an axis more than 0.5° off them is oblique.
    oblique = bool(np.abs(np.asarray(geometry.direction).reshape(3, 3)).max(axis=0).min() < np.cos(np.radians(0.5)))
    canonical = canonical_geometry(geometry, spacing)
    return {
        "path": str(path),
        "size": list(geometry.size),
        "spacing": list(geometry.spacing),
        "origin": list(geometry.origin),
        "direction": list(geometry.direction),
        "orientation": orientation,
        "oblique": oblique,
        "pixel_type": image.GetPixelIDTypeAsString(),
        "components": components,
        "min": float(np.min(finite)) if finite.size else None,
        "max": float(np.max(finite)) if finite.size else None,
        "nonfinite_voxels": nonfinite,
        "modality": "n/a" if components > 1 else detect_modality(finite) if finite.size else "unknown",
        "canonical_size": list(canonical.size),
        "canonical_spacing": spacing,
    }


def _debug_requested(context: typer.Context) -> bool:
    """True under ``gvsl --debug`` or GVSL_DEBUG=1: errors then propagate with their traceback."""
    import os

    return bool(context.find_root().params.get("debug")) or os.environ.get("GVSL_DEBUG") == "1"


def info(
    context: typer.Context,
    inputs: List[str] = typer.Argument(..., help="Volumes: NIfTI, NRRD, MHA/MHD files, DICOM series folders, folders of volumes (searched recursively), glob patterns or lists of paths; - reads their paths from stdin, one a line."),
    spacing: float = typer.Option(1.0, help="Target spacing (mm) used to show the canonical grid."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per volume instead of a table."),
) -> None:
    """Show a volume's grid, orientation, intensity range and the modality gvsl detects."""
    from rich.console import Console

    from gvsl_cli.commands.inputs import stdin_for
    from gvsl_cli.config import check_spacing
    from gvsl_cli.data import volume_paths
    from gvsl_cli.errors import GvslError, InputError

    check_spacing(spacing)
    paths, skipped = volume_paths(inputs, stdin_for(inputs))  # folders, globs, lists, "-"
    if not paths and not skipped:
        raise InputError("no path on stdin", hint="pipe volume paths in, one a line")
    if not paths and len(skipped) == 1:
        raise InputError(f"{skipped[0].path}: {skipped[0].reason}")
    err = Console(stderr=True, soft_wrap=True, highlight=False)
    for bad in skipped:
        err.print(f"error: {bad.path}: {bad.reason}", markup=False)
    rows, exit_code = [], InputError.exit_code if skipped else 0
    for path in paths:
        try:
            rows.append(describe_volume(path, spacing))
        except GvslError as exc:
            # One bad path does not hide the others: report it in one line and go on. The
            # exit code is 7 when others were described (conventions.md), else the first
            # failure's.
            if (len(paths) == 1 and not skipped) or _debug_requested(context):
                raise
            err.print(f"error: {exc}" + (f" (hint: {exc.hint})" if exc.hint else ""), markup=False)
            exit_code = exit_code or exc.exit_code
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row))
    elif rows:
        render_table(rows, spacing)
    if exit_code:
        from gvsl_cli.errors import IncompleteError

        raise typer.Exit(IncompleteError.exit_code if rows else exit_code)


def _shown_path(path: str) -> str:
    """``path`` relative to the working folder when it lies below it, else as it is: file
    names alone would not tell ``p01/image.nii.gz`` from ``p02/image.nii.gz``."""
    import os

    try:
        relative = os.path.relpath(path)
    except ValueError:  # Windows: another drive than the working folder's
        return path
    return path if relative.startswith("..") else relative


def render_table(rows: list[dict], spacing: float) -> None:
    """The rows as a table on stdout, then a note per volume with NaN/inf voxels."""
    from rich.table import Table

    table = Table("file", "size (x,y,z)", "spacing mm", "orientation", "range", "modality", f"grid at {spacing:g} mm")
    for column in table.columns:
        column.overflow = "fold"  # a narrow terminal wraps values; it never cuts them
    for row in rows:
        value_range = "n/a" if row["min"] is None else f"{row['min']:.4g} .. {row['max']:.4g}"
        if row["nonfinite_voxels"]:
            value_range += " *"
        table.add_row(
            _shown_path(row["path"]),
            "×".join(str(s) for s in row["size"]),
            "×".join(f"{s:.3g}" for s in row["spacing"]),
            row["orientation"] + (" (oblique)" if row["oblique"] else ""),
            value_range,
            f"{row['components']}-vector" if row["components"] > 1 else row["modality"],
            "×".join(str(s) for s in row["canonical_size"]),
        )
    from gvsl_cli.commands.output import table_console

    console = table_console()  # off a terminal no value is cut at 80 columns
    console.print(table)
    for row in rows:
        if row["nonfinite_voxels"]:
            console.print(
                f"* {row['path']}: {row['nonfinite_voxels']} of {math.prod(row['size'])} voxels are NaN or infinite; "
                "range and modality use the finite ones (other gvsl commands refuse this volume)",
                markup=False,
                soft_wrap=True,
            )
