"""One registration from files to files: read and check inputs, register, write outputs, report.

Outputs in the output folder (names fixed, so scripts can rely on them):

- ``moved.nii.gz``: the moving image resampled on the fixed image's grid (float32, the
  moving image's minimum outside it);
- ``displacement.nii.gz``: the complete transform as an ITK displacement field: a 3-vector
  float32 image in mm on the fixed grid, fixed point + d = moving point. SimpleITK's
  ``DisplacementFieldTransform`` and ANTs (``antsApplyTransforms -t displacement.nii.gz``)
  apply it directly, and reproduce ``moved.nii.gz``;
- ``affine.tfm``: the affine stage alone (fixed point -> moving point) as an ITK transform
  file; the deformable part is already included in ``displacement.nii.gz``, so do not chain
  the two;
- ``moved_labels.nii.gz``: with ``moving_labels``, the label map resampled by nearest
  neighbour on the fixed grid, label values and pixel type kept;
- ``report.json``: written last, so its presence means the run completed.

Before the registration starts, the inputs, the options, the output folder (created, and a
probe file written and removed) and every output path (none may be a folder) are all
checked. An earlier run's outputs in that folder stay untouched while the new run computes
and writes: the new outputs are written (atomically, ``io``) into a staging folder inside
the output folder, and only when all of them, the report included, are complete are they
moved in (``replace_outputs``): the old ``report.json`` is removed first, the new outputs
take their names, the old run's outputs the new run does not produce (``moved_labels.nii.gz``
after a run without labels) and temporary files of a killed run are removed, and the new
``report.json`` comes last. So a rerun that fails or is stopped (Ctrl-C, SIGTERM, a full
disk) leaves the earlier complete result as it was, and a folder never holds a
``report.json`` beside another run's files. An output folder the run created is removed
again when it fails and leaves it empty.

NIfTI can only store an orthonormal direction. A fixed image whose direction is not
orthonormal (valid in .mha/.nrrd) still gets its outputs, with the nearest orthonormal
direction (what ITK's NIfTI writer stores), after a ``warning:`` saying how far the voxel
centres move; the output names, and the format they promise, stay fixed.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

from gvsl_cli import __version__
from gvsl_cli.errors import ConfigError, InputError
from gvsl_cli.geometry import Geometry
from gvsl_cli.io import atomic_path, ensure_writable_folder, flush_to_disk, itk_warnings_hidden, nonorthogonal_direction_warning, read_volume, refuse_single_slice_vectors, remove_empty_folders, write_transform, write_volume
from gvsl_cli.locking import exclusive_output_folder
from gvsl_cli.paths import real_path
from gvsl_cli.registration import RegistrationConfig, check_working_grids, planned_spacing, register
from gvsl_cli.similarity import Similarity
from gvsl_cli.warping import (
    REGISTRATION_FIELD_NAME,
    REGISTRATION_REPORT_NAME,
    affine_transform,
    dice_scores,
    field_from_map,
    field_image,
    jacobian_statistics,
    resample_through_field,
)

OUTPUT_NAMES = {
    "moved": "moved.nii.gz",
    "displacement": REGISTRATION_FIELD_NAME,  # what ``gvsl apply -t FOLDER`` reads
    "affine": "affine.tfm",
    "moved_labels": "moved_labels.nii.gz",
    "report": REGISTRATION_REPORT_NAME,  # written last: a complete run
}


def device_description(device: torch.device) -> str:
    """The device in words: GPU model, or CPU with its thread count."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def read_label_map(path: Path, grid_of: sitk.Image, role: str) -> sitk.Image:
    """Read a label map and check it lies on the grid of the image it labels."""
    labels = read_volume(path)
    expected, got = Geometry.of(grid_of), Geometry.of(labels)
    differing = got.differences(expected, atol=1e-3)
    if differing:
        raise InputError(
            f"{path}: {role} label map is not on the {role} image's grid ({differing}; label map's first)",
            hint=f"give the label map that belongs to the {role} image, or resample it onto that image's grid",
        )
    return labels


def refuse_constant_image(image: sitk.Image, path, role: str) -> None:
    """Raise InputError when ``image`` has one intensity: a blank series, or a mask given
    where the image belongs. Nothing in it can be registered, yet the optimisation would
    run and write a transform (a centre-of-mass shift) as if it had found one."""
    from gvsl_cli.data import check_not_constant

    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(image)
    try:
        check_not_constant(stats.GetMinimum(), stats.GetMaximum())
    except InputError as exc:
        raise InputError(f"{path}: {role} image has {exc}; nothing to register", hint="check that the right file was given") from None


def refuse_folders_at(paths, *, hint: str) -> None:
    """Raise InputError naming the first of ``paths`` that is an existing folder.

    Writing renames a temporary file onto each path, which fails on a folder only after all
    the work is done; this check runs before it. A symlink is not a folder here: the rename
    replaces the link itself.
    """
    for path in paths:
        path = Path(path)
        if path.is_dir() and not path.is_symlink():
            raise InputError(f"{path}: output path is taken by a folder", hint=hint)


def strict_json(value, where: str = "", replaced: list | None = None):
    """``value`` with every NaN or infinite float replaced by None (JSON null).

    JSON has no NaN or Infinity; Python writes them anyway and strict parsers then reject the
    whole report. ``replaced`` collects the dotted keys of the values replaced.
    """
    if isinstance(value, float) and not math.isfinite(value):
        if replaced is not None:
            replaced.append(f"{where} ({value})")
        return None
    if isinstance(value, dict):
        return {k: strict_json(v, f"{where}.{k}" if where else str(k), replaced) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v, f"{where}[{i}]", replaced) for i, v in enumerate(value)]
    return value


def prepare_output_dir(out_dir: Path) -> list[Path]:
    """Create ``out_dir`` if needed and prove it writable, before any work (``io.ensure_writable_folder``).

    Returns:
        The folders created (``io.remove_empty_folders`` removes them after a failure).
    """
    return ensure_writable_folder(out_dir, what="output folder", hint="give a writable folder with -o")


#: Prefix of the staging folder a run writes its outputs into before they replace the old ones.
STAGING_PREFIX = ".gvsl-register-"


def leftovers_of_killed_runs(out_dir: Path) -> list[Path]:
    """Temporary files and staging folders that killed runs left in ``out_dir``."""
    found = [path for name in OUTPUT_NAMES.values() for path in sorted(out_dir.glob(f".{name}.*.tmp*"))]
    return found + sorted(path for path in out_dir.glob(f"{STAGING_PREFIX}*.tmp") if path.is_dir() and not path.is_symlink())


def replace_outputs(out_dir: Path, staging: Path, names: list[str]) -> list[str]:
    """Move the complete new outputs ``names`` from ``staging`` into ``out_dir``, replacing
    an earlier run's.

    The old ``report.json`` goes first (so the folder never claims a complete run while its
    files change), then the other new outputs take their names, then the earlier run's
    outputs that are not among ``names`` and files left by killed runs are removed, and the
    new ``report.json`` comes last. Nothing but ``OUTPUT_NAMES`` and those leftovers is
    touched.

    Returns:
        The earlier run's outputs that were replaced or removed (names).
    """
    report = OUTPUT_NAMES["report"]
    previous = [name for name in OUTPUT_NAMES.values() if _is_file(out_dir / name)]
    _remove(out_dir / report)
    for name in names:
        if name != report:
            os.replace(staging / name, out_dir / name)
    for name in OUTPUT_NAMES.values():
        if name not in names:
            _remove(out_dir / name)
    for path in leftovers_of_killed_runs(out_dir):
        if path == staging:
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            _remove(path)
    os.replace(staging / report, out_dir / report)
    flush_to_disk(out_dir)
    return previous


def _is_file(path: Path) -> bool:
    return path.is_file() or path.is_symlink()


def _remove(path: Path) -> None:
    if not _is_file(path):
        return
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise InputError(f"{path}: cannot remove the previous run's output ({exc.strerror or type(exc).__name__})") from None


def _write_json(data: dict, path: Path) -> None:
    # allow_nan=False: a report that slipped past strict_json fails here, not in a parser.
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def run_registration(
    fixed_path: Path,
    moving_path: Path,
    out_dir: Path,
    *,
    config: RegistrationConfig = RegistrationConfig(),
    weights_spec: str | None = None,
    moving_labels_path: Path | None = None,
    fixed_labels_path: Path | None = None,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] = lambda message: None,
    downloads=None,
) -> dict:
    """Register ``moving_path`` onto ``fixed_path``, write the outputs in ``out_dir``.

    ``downloads``: the ``download.Reporter`` of a weights download (default: a progress bar
    and notices on stderr).

    Returns:
        The report (also written as ``report.json``); see docs/registration.md.
    """
    start = time.perf_counter()
    device = torch.device(device)
    out_dir = Path(out_dir)
    # Everything that can be checked is checked before any work or any change on disk.
    if fixed_labels_path and not moving_labels_path:
        raise ConfigError(
            "--fixed-labels needs --moving-labels: Dice compares the warped moving labels with the fixed ones",
            hint="add --moving-labels (the label map on the moving image's grid), or leave out --fixed-labels",
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: output path exists and is not a folder", hint="give a folder with -o")
    output_keys = [key for key in OUTPUT_NAMES if key != "moved_labels" or moving_labels_path]
    refuse_folders_at([out_dir / OUTPUT_NAMES[key] for key in output_keys], hint="remove or rename that folder, or choose another -o folder")
    outputs_here = {real_path(out_dir / name) for name in OUTPUT_NAMES.values()}
    for path in (fixed_path, moving_path, moving_labels_path, fixed_labels_path):
        if path is not None and real_path(path) in outputs_here:  # InputError for a link loop
            raise InputError(f"{path}: input is an output of gvsl register in {out_dir} and would be replaced", hint="choose another -o folder, or copy the input elsewhere first")
    weights = None
    if weights_spec:
        from gvsl_cli.weights import load_weights_spec

        weights = load_weights_spec(weights_spec, reporter=downloads)
        weights.require_pretrained()  # a segmentation model: one line before reading the volumes
    fixed = read_volume(fixed_path)
    try:
        refuse_single_slice_vectors(fixed.GetSize(), "the displacement field on its grid")
    except InputError as exc:
        raise InputError(f"{fixed_path}: fixed image is {exc}", hint="register 3D volumes of at least 2 slices") from None
    moving = read_volume(moving_path)
    for image, path, role in ((fixed, fixed_path, "fixed"), (moving, moving_path, "moving")):
        refuse_constant_image(image, path, role)
    moving_labels = read_label_map(moving_labels_path, moving, "moving") if moving_labels_path else None
    fixed_labels = read_label_map(fixed_labels_path, fixed, "fixed") if fixed_labels_path else None
    check_working_grids(Geometry.of(fixed), Geometry.of(moving), planned_spacing(Geometry.of(fixed), config, device), config.levels, names=(fixed_path, moving_path), automatic=config.spacing is None)
    direction_warning = nonorthogonal_direction_warning(Geometry.of(fixed), "fixed image's")
    if direction_warning:
        log(f"warning: {direction_warning}")
    if weights is not None:
        log(f"weights: {weights.kind} checkpoint, width {weights.model_config.width}")
    created = prepare_output_dir(out_dir)
    try:
        # One registration at a time per folder: a second would replace the first's outputs
        # and remove its staging folder as a killed run's leftover.
        with exclusive_output_folder(out_dir, "register"):
            return _register_and_write(
                fixed_path, moving_path, out_dir, fixed, moving, moving_labels, fixed_labels, output_keys,
                config=config, weights=weights, weights_spec=weights_spec, moving_labels_path=moving_labels_path,
                fixed_labels_path=fixed_labels_path, device=device, direction_warning=direction_warning, log=log, start=start,
            )
    except BaseException:
        remove_empty_folders(created)  # stopped or failed before its outputs: no empty folder left
        raise


def _register_and_write(fixed_path, moving_path, out_dir, fixed, moving, moving_labels, fixed_labels, output_keys, *, config, weights, weights_spec, moving_labels_path, fixed_labels_path, device, direction_warning, log, start) -> dict:
    """The registration of checked inputs, and its outputs staged then swapped in (``replace_outputs``)."""
    result = register(fixed, moving, config, weights=weights, device=device, log=log)
    for note in result.notes:
        log(f"note: {note}")
    for warning in result.warnings:
        log(f"warning: {warning}")

    log("writing outputs on the fixed grid")
    fixed_grid = Geometry.of(fixed)
    field = field_from_map(result.transform.physical_points, fixed_grid, device=device)
    background = float(np.min(sitk.GetArrayViewFromImage(moving)))
    moved = resample_through_field(moving, field, fixed_grid, default_value=background)
    jacobian = jacobian_statistics(field, fixed_grid)
    moved_labels = resample_through_field(moving_labels, field, fixed_grid, labels=True) if moving_labels is not None else None

    dice = None
    if moved_labels is not None and fixed_labels is not None:
        fixed_array = sitk.GetArrayViewFromImage(fixed_labels)
        unmoved = resample_through_field(moving_labels, torch.zeros_like(field), fixed_grid, labels=True)
        before = dice_scores(fixed_array, sitk.GetArrayViewFromImage(unmoved))
        after = dice_scores(fixed_array, sitk.GetArrayViewFromImage(moved_labels))
        dice = {
            # Keys are the exact label values (dice_scores keeps 1.5 as 1.5, never "1").
            "labels": {str(label): {"before": before[label], "after": after[label]} for label in after},
            "mean_before": float(np.mean(list(before.values()))) if before else None,
            "mean_after": float(np.mean(list(after.values()))) if after else None,
        }

    outputs = {key: OUTPUT_NAMES[key] for key in output_keys}
    # The outputs are staged in the output folder (same file system: the swap is renames)
    # and replace an earlier run's only once all are written.
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, suffix=".tmp", dir=out_dir))
    try:
        with itk_warnings_hidden(direction_warning is not None):
            write_volume(moved, staging / OUTPUT_NAMES["moved"])
            write_volume(field_image(field, fixed_grid), staging / OUTPUT_NAMES["displacement"])
            write_transform(affine_transform(result.transform.affine), staging / OUTPUT_NAMES["affine"])
            if moved_labels is not None:
                write_volume(moved_labels, staging / OUTPUT_NAMES["moved_labels"])

        similarity = Similarity(config.similarity, config.ncc_window)
        report = {
            "gvsl_version": __version__,
            "fixed": str(fixed_path),
            "moving": str(moving_path),
            "moving_labels": str(moving_labels_path) if moving_labels_path else None,
            "fixed_labels": str(fixed_labels_path) if fixed_labels_path else None,
            "device": device_description(device),
            "weights": None
            if weights is None
            else {
                "source": weights_spec,
                "kind": weights.kind,
                "width": weights.model_config.width,
                "affine_trained": weights.affine_trained,
                "affine_used": weights.affine_trained,
            },
            "similarity": {
                "metric": config.similarity,
                "higher_is_better": similarity.higher_is_better,
                "measured_on": f"fixed working grid, {result.working_spacing:g} mm",
                **result.similarity,
            },
            "dice": dice,
            "jacobian": jacobian,
            "seconds": {"registration": result.seconds, "total": time.perf_counter() - start},
            "working_spacing_mm": result.working_spacing,
            "intensity_mapping": result.intensity_mapping,
            "iterations": config.iters,
            "stages": result.stages,
            "notes": [*result.notes, *result.warnings, *([direction_warning] if direction_warning else [])],
            "affine": [[float(v) for v in row] for row in result.transform.affine],
            "outputs": outputs,
        }
        report["seconds"]["total"] = time.perf_counter() - start
        replaced: list[str] = []
        report = strict_json(report, replaced=replaced)
        if replaced:
            report["notes"].append(f"not finite, written as null: {', '.join(replaced)}")
        _write_json(report, staging / OUTPUT_NAMES["report"])
        previous = replace_outputs(out_dir, staging, list(outputs.values()))
    finally:
        # A run that fails while writing (disk full, Ctrl-C) leaves none of its outputs, not
        # some, and the earlier run's outputs as they were.
        shutil.rmtree(staging, ignore_errors=True)
    if previous:
        log(f"replaced the previous run's outputs in {out_dir} ({', '.join(previous)})")
    return report
