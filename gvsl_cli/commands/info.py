"""``gvsl info``: what gvsl sees in a volume (grid, orientation, intensities, modality)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import typer


def register(app: typer.Typer) -> None:
    app.command("info")(info)


def describe_volume(path: Path, spacing: float) -> dict:
    """Geometry, intensity range, detected modality and canonical grid of one volume."""
    import numpy as np
    import SimpleITK as sitk

    from gvsl_cli.geometry import Geometry
    from gvsl_cli.io import read_volume
    from gvsl_cli.preprocess import canonical_geometry, detect_modality

    image = read_volume(path)
    geometry = Geometry.of(image)
    array = sitk.GetArrayViewFromImage(image)
    orientation = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(geometry.direction)
    canonical = canonical_geometry(geometry, spacing)
    return {
        "path": str(path),
        "size": list(geometry.size),
        "spacing": list(geometry.spacing),
        "origin": list(geometry.origin),
        "direction": list(geometry.direction),
        "orientation": orientation,
        "pixel_type": image.GetPixelIDTypeAsString(),
        "min": float(np.min(array)),
        "max": float(np.max(array)),
        "modality": detect_modality(array),
        "canonical_size": list(canonical.size),
        "canonical_spacing": spacing,
    }


def info(
    inputs: List[Path] = typer.Argument(..., help="Volumes: NIfTI, NRRD, MHA/MHD files or DICOM series folders."),
    spacing: float = typer.Option(1.0, help="Target spacing (mm) used to show the canonical grid."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per volume instead of a table."),
) -> None:
    """Show a volume's grid, orientation, intensity range and the modality gvsl detects."""
    from rich.console import Console
    from rich.table import Table

    rows = [describe_volume(path, spacing) for path in inputs]
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row))
        return
    table = Table("file", "size (x,y,z)", "spacing mm", "orientation", "range", "modality", f"grid at {spacing:g} mm")
    for row in rows:
        table.add_row(
            Path(row["path"]).name,
            "×".join(str(s) for s in row["size"]),
            "×".join(f"{s:.3g}" for s in row["spacing"]),
            row["orientation"],
            f"{row['min']:.4g} .. {row['max']:.4g}",
            row["modality"],
            "×".join(str(s) for s in row["canonical_size"]),
        )
    Console().print(table)
