"""``gvsl apply``: warp more images and label maps with a saved transform (register once, warp many)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from gvsl_cli.commands.inputs import refuse_stdout_folder


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
    images: Optional[List[Path]] = typer.Argument(None, help="Images to warp (linear interpolation, float32 output): files, DICOM series folders, folders of volumes, glob patterns or lists of paths; - reads their paths from stdin, one a line."),
    transform: List[Path] = typer.Option(..., "-t", "--transform", help="A gvsl register output folder, a displacement field, or an ITK transform file; repeat to chain as antsApplyTransforms: the first -t acts first on output points (-t warp -t affine)."),
    labels: List[Path] = typer.Option([], "-l", "--labels", help="Label maps to warp (nearest neighbour, values and pixel type kept), named as the images are; repeatable; -l - reads their paths from stdin."),
    reference: Optional[Path] = typer.Option(None, "-r", "--reference", help="Image whose grid the outputs take; default: the grid of the first -t when it is a displacement field or a register folder (the fixed image of gvsl register)."),
    out_dir: Path = typer.Option(Path("."), "-o", "--out", "--output", callback=refuse_stdout_folder, help="Output folder; each output is named <input>_warped.<ext>, in the input's sub-folder below a folder given (DIR/p01/ct.nii.gz -> OUT/p01/ct_warped.nii.gz); files given directly go to its top unless two share a name."),
    inverse: bool = typer.Option(False, "--inverse", help="Apply the inverse of the whole chain (fields inverted numerically): fixed-image data (atlas labels) onto the moving image; needs -r (the moving image)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON line per output on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only warnings and errors (the --json lines are still printed)."),
) -> None:
    """Warp IMAGES (and --labels maps) with a saved transform onto the fixed grid (with
    --inverse: fixed-grid data onto the moving image's grid)."""
    from rich.console import Console

    from gvsl_cli.data import output_subfolders
    from gvsl_cli.errors import InputError
    from gvsl_cli.geometry import Geometry
    from gvsl_cli.io import itk_warnings_hidden, nonorthogonal_direction_warning, read_volume, remove_empty_folders, volume_suffix
    from gvsl_cli.registration_job import prepare_output_dir
    from gvsl_cli.warping import read_transform_chain

    image_sources, label_sources = _paths_read(images or [], labels, out_dir)
    jobs = [(source.path, False) for source in image_sources] + [(source.path, True) for source in label_sources]
    if not jobs:
        raise InputError("nothing to warp", hint="give image paths and/or --labels label maps")
    # Everything is checked before the first output is written: output names and paths,
    # transforms, reference and every input volume; then the output folder.
    subfolders = output_subfolders([*image_sources, *label_sources], output_name)
    targets = planned_outputs(jobs, out_dir, protected=[*transform, *([reference] if reference is not None else [])], subfolders=subfolders)
    if inverse and reference is None:
        raise InputError("--inverse needs -r: the outputs belong on the moving image's grid, not on the fixed grid of the fields", hint="give -r MOVING_IMAGE")
    reference_grid = Geometry.of(read_volume(reference)) if reference is not None else None  # before a field's inversion (seconds)
    chain, field_grid = read_transform_chain(list(transform), inverse=inverse)
    if reference_grid is not None:
        grid = reference_grid
    elif field_grid is not None:
        grid = field_grid
    else:
        raise InputError("no output grid: the first -t is not a displacement field or a gvsl register folder", hint="give --reference (the fixed image)")
    # Inputs are read once to check them; they are kept in memory up to KEEP_BYTES and read
    # again for the warp beyond that, so many large inputs never fill the memory.
    kept: dict[int, object] = {}
    kept_bytes = 0
    for index, (path, _) in enumerate(jobs):
        volume = read_volume(path)
        size = volume.GetNumberOfPixels() * volume.GetNumberOfComponentsPerPixel() * volume.GetSizeOfPixelComponent()
        if kept_bytes + size <= KEEP_BYTES:
            kept[index] = volume
            kept_bytes += size
    created = prepare_output_dir(out_dir)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    nifti_outputs = any(volume_suffix(target) in (".nii", ".nii.gz") for target in targets)
    direction_warning = nonorthogonal_direction_warning(grid, "output grid's") if nifti_outputs else None
    if direction_warning:
        err.print(f"warning: {direction_warning}", markup=False)
    try:
        with itk_warnings_hidden(direction_warning is not None):
            warp_all(jobs, targets, out_dir, read=lambda index, path: kept.pop(index) if index in kept else read_volume(path), transform=chain, grid=grid)
    except BaseException:
        remove_empty_folders(created)  # nothing was published (all or nothing): no empty folder
        raise
    for (path, is_labels), target in zip(jobs, targets):
        if as_json:
            typer.echo(json.dumps({"input": str(path), "output": str(target), "labels": is_labels}))
        elif not quiet:
            err.print(f"{path} -> {target} ({'nearest, labels' if is_labels else 'linear'})", markup=False)


def _paths_read(images: list[Path], labels: list[Path], out_dir: Path | None = None) -> tuple[list, list]:
    """``images`` and ``labels`` with ``-`` (stdin), pipes (``<(...)``), folders of volumes,
    glob patterns and lists replaced by the volumes they name, as ``data.Source`` (with the
    folder each was found in, ``data.volume_sources``); stdin can feed one of the two. A
    folder searched skips ``out_dir`` inside it (a rerun does not warp its own outputs).

    Raises:
        InputError: an input names no volume (nothing is warped then).
    """
    from gvsl_cli.commands.inputs import stdin_for
    from gvsl_cli.data import volume_sources
    from gvsl_cli.errors import ConfigError, InputError

    if "-" in map(str, images) and "-" in map(str, labels):
        raise ConfigError("- is given both as an image and as --labels; stdin holds one list of paths", hint="give the other list through a pipe, e.g. -l <(cat labels.txt)")
    found = []
    for inputs in (images, labels):
        sources, skipped = volume_sources(inputs, stdin_for(inputs), skip_under=out_dir)
        if skipped:
            more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
            raise InputError(f"{skipped[0].path}: {skipped[0].reason}{more}", hint="every input must be warped; remove or fix it")
        found.append(sources)
    return found[0], found[1]


#: Prefix of the hidden folder ``warp_all`` stages its outputs in.
STAGING_PREFIX = ".gvsl-apply."


def warp_all(jobs: list, targets: list[Path], out_dir: Path, *, read, transform, grid) -> None:
    """Warp every (input, is_labels) job to its target (in ``out_dir`` or a sub-folder of
    it), all or nothing.

    Outputs are written in a hidden staging folder inside ``out_dir`` and moved into place
    only when all of them are written, so a failure on a later input (disk full, Ctrl-C)
    leaves none of the earlier outputs. ``read(index, path)`` gives the input volume.
    """
    import os

    from gvsl_cli.io import DETACHED_HEADER_SUFFIXES, volume_suffix, write_volume
    from gvsl_cli.temporaries import held_staging_folder, remove_abandoned
    from gvsl_cli.warping import apply_transform

    # Staging folders of runs killed by SIGKILL (which holds finished warps) and temporaries
    # of outputs moved into place when the kill came; live runs' ones are locked and kept.
    remove_abandoned(targets, staging_in=out_dir, prefixes=(STAGING_PREFIX,))
    with held_staging_folder(out_dir, STAGING_PREFIX) as staging:
        for index, ((path, is_labels), target) in enumerate(zip(jobs, targets)):
            warped = apply_transform(read(index, path), transform, grid, labels=is_labels)
            write_volume(warped, staging / target.relative_to(out_dir))
        staged = [path for path in staging.rglob("*") if path.is_file()]
        # A detached header (.mhd, .nhdr) goes in after its data file, as io writes them.
        for written in sorted(staged, key=lambda p: volume_suffix(p) in DETACHED_HEADER_SUFFIXES):
            final = out_dir / written.relative_to(staging)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(written, final)


#: Inputs up to this many bytes in all are kept in memory between the check and the warp.
KEEP_BYTES = 2 * 2**30


def planned_outputs(jobs: list, out_dir: Path, *, protected: list, subfolders: list[str] | None = None) -> list[Path]:
    """The output path of each (input, is_labels) job, checked before anything is read:
    ``output_name`` in the job's sub-folder of ``out_dir`` (``subfolders``, from
    ``data.output_subfolders``: a folder per patient is mirrored; none: all at the top).

    Raises:
        InputError: two inputs map to the same output (e.g. ``s.nii.gz`` in a folder given
            and a file ``other/s.nii.gz`` given directly), an input is given twice, an
            output would overwrite an input, the reference or a transform, or an output
            path is taken by a folder.
    """
    from gvsl_cli.errors import InputError
    from gvsl_cli.paths import real_path
    from gvsl_cli.registration_job import refuse_folders_at

    # real_path: a symbolic link loop given as an input, -r or -t is one line, not a traceback.
    inputs = {real_path(path): path for path, _ in jobs}
    inputs.update({real_path(path): path for path in protected})
    seen: dict[Path, Path] = {}
    targets = []
    for (path, _), subfolder in zip(jobs, subfolders or [""] * len(jobs)):
        target = out_dir / subfolder / output_name(path)
        key = real_path(target)
        if key in inputs:
            raise InputError(f"{inputs[key]}: output {target} would overwrite this input", hint="choose another -o folder")
        if key in seen:
            first = seen[key]
            if real_path(first) == real_path(path):
                raise InputError(f"{path}: given twice", hint="give each input once")
            raise InputError(
                f"{first} and {path} would both be written to {target} (outputs are named <input name>_warped, in the sub-folder below a folder given)",
                hint="warp them in separate runs with different -o folders, or rename one of them",
            )
        seen[key] = path
        targets.append(target)
    refuse_folders_at(targets, hint="remove or rename that folder, or choose another -o folder")
    return targets
