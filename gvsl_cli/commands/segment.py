"""``gvsl segment``: apply a ``gvsl finetune`` model to new images, label maps with geometry."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer

from gvsl_cli.commands.inputs import refuse_stdout_folder


def register(app: typer.Typer) -> None:
    app.command("segment")(segment)


def segment(
    inputs: List[str] = typer.Argument(..., help="Images: files, folders (searched recursively), DICOM series folders, lists of paths (a .txt file or <(find ...)), glob patterns, or - to read paths from stdin."),
    model: List[str] = typer.Option(..., "--model", "-m", help="A gvsl finetune run folder (its best.pt) or a segmentation checkpoint file or URL. Give it several times for an ensemble (e.g. the runs of --fold 0..4): the class probabilities are averaged."),
    output: Path = typer.Option(..., "-o", "--output", "--out", callback=refuse_stdout_folder, help="Output folder: one CASE.nii.gz label map per input (CASE_0000 -> CASE, as nnU-Net names them), in the input's sub-folder below a folder given (DIR/p01/image.nii.gz -> OUT/p01/image.nii.gz)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16 or fp16."),
    overlap: float = typer.Option(0.5, "--overlap", help="Overlap of neighbouring sliding windows, in [0, 1) (more: smoother, slower)."),
    batch: int = typer.Option(1, "--batch", help="Windows per network call."),
    probabilities: bool = typer.Option(False, "--probabilities", help="Also write CASE_probabilities.nii.gz: the class probabilities on the input's grid, a float32 vector image (component k = class k of the model's labels), as nnU-Net's --save_probabilities."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace label maps already in the output folder (default: skip them)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only failures and warnings are reported."),
) -> None:
    """Segment images with a model trained by gvsl finetune; labels on each input's own grid."""
    import os

    from rich.console import Console

    from gvsl_cli.commands.inputs import stdin_for
    from gvsl_cli.data import discover_named
    from gvsl_cli.device import resolve_device, resolve_precision
    from gvsl_cli.errors import ConfigError, IncompleteError, InputError
    from gvsl_cli.io import ensure_writable_folder, remove_empty_folders
    from gvsl_cli.locking import exclusive_output_folder
    from gvsl_cli.paths import real_path
    from gvsl_cli.segment_record import RUN_FILE, check_output_folder, run_description
    from gvsl_cli.segmentation import check_ensemble, check_overlap, input_names, load_segmenter, plan_outputs, probabilities_name, segment_files
    from gvsl_cli.temporaries import remove_abandoned

    check_overlap(overlap)
    if batch < 1:
        raise ConfigError(f"--batch must be >= 1, got {batch}")
    torch_device = resolve_device(device)
    autocast_dtype = resolve_precision(precision, torch_device)
    out_real = real_path(os.path.abspath(output))
    for item in inputs:
        given = Path(item).expanduser()
        if given.is_dir() and (given.resolve() == out_real or out_real in given.resolve().parents):
            raise InputError(f"{output}: the output folder is (or holds) the input folder {item}; its label maps would be read as images by the next run", hint="choose another -o folder, e.g. a sub-folder of the input folder")
    # Earlier label maps in an output folder inside an input folder are not images to
    # segment; a file named on the command line is (the check below guards it).
    sources, skipped = discover_named(inputs, skip_under=output, stdin_lines=stdin_for(inputs))
    from gvsl_cli.download import ConsoleReporter

    segmenters = [load_segmenter(spec, downloads=ConsoleReporter(quiet=quiet)) for spec in model]
    check_ensemble(segmenters)  # before any work
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    duplicates = [s for s in skipped if s.reason.startswith(("given more than once", "same file as"))]
    unusable = [s for s in skipped if s not in duplicates]
    for item in unusable + ([] if quiet else duplicates):
        console.print(f"skipped {item.path}: {item.reason}", markup=False)
    if not sources:
        raise InputError(f"no image among {len(inputs)} input(s)", hint="give NIfTI, NRRD, MHA/MHD files, folders of them or DICOM series folders")
    planned = plan_outputs(sources, output)  # refuses two inputs with one output name, before any work
    channels = [(path, name.channel) for path, name in input_names([s for s, _ in planned]).items() if name.channel is not None]
    if channels and not quiet:
        path, channel = channels[0]
        console.print(
            f"note: {len(channels)} input(s) are one channel of a multi-channel nnU-Net case (e.g. {path.name}: channel {channel.channel} of {channel.case}, "
            f"whose folder holds channels {', '.join(f'{c:04d}' for c in channel.channels)}); each label map is named by its case ({channel.case}.nii.gz)",
            markup=False,
        )
    for source, target in planned:
        if real_path(os.path.abspath(target)) == real_path(source):
            # Without this, --overwrite would replace the image by its label map.
            raise InputError(f"{source}: its label map would be written over it ({target})", hint="choose another -o folder")
    created = ensure_writable_folder(output, what="output folder")
    had_record = (output / RUN_FILE).exists()

    def segment_into_folder() -> None:
        # segment.json: a rerun with other models or settings is refused, not skipped as done.
        description = run_description(segmenters, overlap=overlap, autocast_dtype=autocast_dtype, probabilities=probabilities)
        every_output = [t for _, t in planned] + ([t.with_name(probabilities_name(t)) for _, t in planned] if probabilities else [])
        record = check_output_folder(output, description, every_output, overwrite=overwrite)
        # Partial maps that runs killed by SIGKILL left under temporary names (GBs each).
        remove_abandoned([*every_output, output / RUN_FILE])
        if not quiet:
            if len(segmenters) > 1:
                console.print(f"ensemble of {len(segmenters)} models (class probabilities averaged)", markup=False)
            for member in segmenters:
                console.print(f"model {member.source}: labels " + ", ".join(f"{n}={v}" for n, v in zip(member.label_names, member.label_values)), markup=False)
                if member.trained_for is not None:
                    dice = "not recorded" if member.validation_dice is None else f"{member.validation_dice:.3f}"
                    console.print(f"model from iteration {member.trained_for}; validation mean Dice {dice}", markup=False)
        for member in segmenters:
            if member.trained_for == 0:
                console.print(f"warning: {'this model' if len(segmenters) == 1 else member.source} is untrained (iteration 0: the run's validation never improved on its start, or it was stopped before its first checkpoint)", markup=False)

        def report(result) -> None:
            if result.status == "failed":
                console.print(f"failed {result.input}: {result.reason}", markup=False)
            elif not quiet:
                detail = f" ({result.seconds:.1f} s)" if result.status == "written" else f" ({result.reason})"
                console.print(f"{result.status} {result.output}{detail}", markup=False)
            if result.warning:
                console.print(f"warning: {result.input} {result.warning}", markup=False)

        results = segment_files(segmenters, sources, output, device=torch_device, autocast_dtype=autocast_dtype, overlap=overlap, batch=batch, overwrite=overwrite, probabilities=probabilities, on_result=report, record=record)
        written = [Path(r.output) for r in results if r.status == "written"]
        left = record.finish(written + ([p.with_name(p.name[: -len(".nii.gz")] + "_probabilities.nii.gz") for p in written] if probabilities else []))
        if left:
            console.print(f"warning: {left}", markup=False)
        failed = [r for r in results if r.status == "failed"]
        if failed or unusable:
            written = sum(r.status == "written" for r in results)
            raise IncompleteError(f"{len(failed) + len(unusable)} of {len(results) + len(unusable)} input(s) could not be segmented ({written} written)", hint="see the lines above")

    try:
        # One run at a time per folder: two with other models would mix their label maps
        # under one segment.json.
        with exclusive_output_folder(output, "segment"):
            segment_into_folder()
    except BaseException:
        # With the lock released: a run that wrote no label map (stopped, or every input
        # failed) leaves neither the folders it created nor its segment.json, a record of
        # nothing.
        if not had_record and output.is_dir() and [p.name for p in output.iterdir()] == [RUN_FILE]:
            (output / RUN_FILE).unlink()
        remove_empty_folders(created)
        raise
