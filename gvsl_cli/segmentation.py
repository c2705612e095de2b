"""Applying a segmentation model: whole-volume prediction and label maps on the input's grid.

``predict_logits`` runs a ``SegmentationNet`` over a prepared (canonical-grid) volume with
sliding windows of the training patch (Gaussian blending of the logits, as nnU-Net does).
``segment_image`` does the whole job for one image: preprocessing with the model's
contract, prediction, softmax, each class probability resampled linearly onto the input's
own grid, argmax there, class indices turned back into the dataset's label values. Mapping
probabilities rather than a label map back keeps boundaries smooth and sub-voxel accurate
where the input grid is finer than the canonical one (nearest-neighbour resampling of a
label map would give staircases).

``load_segmenter`` reads a model written by ``gvsl finetune`` (a run folder or a checkpoint);
``segment_files`` is ``gvsl segment``: many inputs, one label map each, atomic writes.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from gvsl_cli.checkpoint import SEGMENTATION_KEY
from gvsl_cli.data import Source, failure_reason
from gvsl_cli.config import PreprocessConfig
from gvsl_cli.device import autocast
from gvsl_cli.errors import CheckpointError, ConfigError, GvslError, InputError
from gvsl_cli.io import DISK_ERRNOS
from gvsl_cli.model import SegmentationNet
from gvsl_cli.segment_record import RUN_FILE, OutputRecord
from gvsl_cli.sliding_window import sliding_window_inference

BEST_FILE = "best.pt"
LAST_FILE = "last.pt"


def predict_logits(
    model: torch.nn.Module,
    image: np.ndarray | torch.Tensor,
    *,
    patch: tuple[int, int, int],
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    overlap: float = 0.5,
    batch: int = 1,
) -> torch.Tensor:
    """Class logits (K, D, H, W) float32 on the CPU of a prepared volume (D, H, W).

    The volume's sides must be multiples of 16 (canonical grids are); windows of ``patch``
    overlap by ``overlap`` and are blended with Gaussian weights.
    """
    volume = torch.as_tensor(image, dtype=torch.float32)[None]

    def predict(windows: torch.Tensor) -> dict[str, torch.Tensor]:
        with autocast(device, autocast_dtype):
            return {"logits": model(windows).float()}

    was_training = model.training
    model.eval()
    try:
        return sliding_window_inference(volume, predict, patch=patch, overlap=overlap, device=device, batch=batch, accumulate_device=device)["logits"]
    finally:
        model.train(was_training)


def dice_per_class(prediction: np.ndarray, target: np.ndarray, n_classes: int) -> list[float]:
    """Dice of classes 1..n_classes-1 between two class-index arrays of the same shape.

    A class absent from both scores NaN (nothing to find, nothing found), as in nnU-Net.
    """
    scores = []
    for k in range(1, n_classes):
        a, b = prediction == k, target == k
        total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
        scores.append(float(2.0 * np.count_nonzero(a & b) / total) if total else float("nan"))
    return scores


@dataclass
class Segmenter:
    """A trained segmentation model ready to apply.

    Attributes:
        model: the network (eval mode, on the CPU until ``segment_image`` moves it).
        preprocess: the contract the model was trained with (its modality resolved when
            all training cases agreed).
        label_names, label_values: class index i is ``label_names[i]``, written as
            ``label_values[i]``.
        patch: the training patch, used as the sliding window.
        source: where it was loaded from.
        trained_for: the training iteration the weights are from (None if not recorded).
        validation_dice: the run's validation mean foreground Dice for them, if recorded.
        checksum: ``checkpoint.state_checksum`` of the weights (equal for equal weights,
            whatever file they came from); recorded in ``segment.json``.
    """

    model: SegmentationNet
    preprocess: PreprocessConfig
    label_names: tuple[str, ...]
    label_values: tuple[int, ...]
    patch: tuple[int, int, int]
    source: str
    info: dict = field(default_factory=dict)
    trained_for: int | None = None
    validation_dice: float | None = None
    checksum: str = ""


def _checkpoint_of(spec: str) -> str:
    """A run folder means its best.pt (last.pt when there is none yet)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        for name in (BEST_FILE, LAST_FILE):
            if (path / name).is_file():
                return str(path / name)
        raise CheckpointError(f"{path}: folder holds no {BEST_FILE} or {LAST_FILE}", hint="give a gvsl finetune run folder or one of its checkpoints")
    return spec


def load_segmenter(spec: str, downloads=None) -> Segmenter:
    """The segmentation model of a ``gvsl finetune`` run folder, checkpoint file or URL.

    ``downloads``: the ``download.Reporter`` of a URL's download (None: a progress bar).

    Raises:
        CheckpointError: not a segmentation checkpoint (e.g. GVSL pre-trained weights), or
            damaged.
        WeightsError: no such file.
    """
    from gvsl_cli.checkpoint import load_state_strict, state_checksum
    from gvsl_cli.weights import load_weights_spec

    loaded = load_weights_spec(_checkpoint_of(spec), reporter=downloads)
    meta = loaded.extra.get(SEGMENTATION_KEY)
    where = loaded.extra.get("path", spec)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: not a segmentation model (GVSL pre-trained weights?)", hint="train one with gvsl finetune and give its run folder or best.pt")
    try:
        names = tuple(str(n) for n in meta["label_names"])
        values = tuple(int(v) for v in meta["label_values"])
        patch = tuple(int(p) for p in meta["patch"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{where}: incomplete segmentation entry in the checkpoint", hint="save it again with gvsl finetune") from None
    model = SegmentationNet(loaded.model_config, len(values))
    load_state_strict(model, loaded.state_dict, source=str(where))
    iteration = loaded.extra.get("iteration")
    # best.pt holds its validation row as "validation"; last.pt holds it as "last".
    validation = loaded.extra.get("validation") or loaded.extra.get("last")
    dice = validation.get("val_mean_dice") if isinstance(validation, dict) else None
    return Segmenter(
        model=model.eval(),
        preprocess=loaded.preprocess,
        label_names=names,
        label_values=values,
        patch=patch,
        source=str(where),
        info=meta,
        trained_for=int(iteration) if isinstance(iteration, int) else None,
        validation_dice=float(dice) if isinstance(dice, (int, float)) else None,
        checksum=state_checksum(loaded.state_dict),
    )


def check_ensemble(segmenters: Sequence[Segmenter]) -> None:
    """Models whose probabilities can be averaged: the same classes (names and values) and
    the same preprocessing contract (one canonical grid for all).

    Raises:
        ConfigError: naming the first model that differs and how.
    """
    first = segmenters[0]
    for other in segmenters[1:]:
        if (other.label_names, other.label_values) != (first.label_names, first.label_values):
            raise ConfigError(
                f"{other.source}: labels {dict(zip(other.label_names, other.label_values))} differ from {first.source}'s {dict(zip(first.label_names, first.label_values))}",
                hint="an ensemble averages the probabilities of the same classes: give models trained on one dataset",
            )
        if other.preprocess.to_dict() != first.preprocess.to_dict():
            raise ConfigError(
                f"{other.source}: preprocessing {other.preprocess.to_dict()} differs from {first.source}'s {first.preprocess.to_dict()}",
                hint="an ensemble averages on one grid: give models trained with the same --spacing and --modality",
            )


def segment_image(
    segmenters: Segmenter | Sequence[Segmenter],
    image,
    *,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    overlap: float = 0.5,
    batch: int = 1,
):
    """The label map (SimpleITK image on ``image``'s own grid, label values) of ``image``.

    Several models (``check_ensemble``) form an ensemble, as nnU-Net's folds do: their
    class probabilities are averaged on the canonical grid before the argmax.
    """
    return segment_image_with_probabilities(segmenters, image, device=device, autocast_dtype=autocast_dtype, overlap=overlap, batch=batch, keep_probabilities=False)[0]


@dataclass
class ClassProbabilities:
    """The K class probabilities of an image on its own grid, one (z, y, x) float32 array
    per class (index k = the model's ``label_names[k]``), before normalisation.

    Written by ``write`` as a K-component NIfTI, one component at a time
    (``io.write_vector_nifti``), each divided by the voxel's sum so that the file is a
    distribution everywhere (linear resampling keeps the sum at 1 up to rounding, except
    where the input reaches past the canonical grid). Memory: the K arrays and their sum,
    not the two or three extra copies a whole ITK vector image would need.
    """

    components: list
    geometry: object  # geometry.Geometry of the input image

    def write(self, path) -> None:
        from gvsl_cli.io import write_vector_nifti

        total = self.components[0].copy()
        for component in self.components[1:]:  # in place: np.sum of the list would stack all K
            total += component
        np.maximum(total, np.float32(1e-12), out=total)
        write_vector_nifti(path, self.geometry, len(self.components), lambda k: np.asarray(self.components[k] / total, dtype=np.float32))


def segment_image_with_probabilities(
    segmenters: Segmenter | Sequence[Segmenter],
    image,
    *,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    overlap: float = 0.5,
    batch: int = 1,
    keep_probabilities: bool = True,
):
    """(label map, class probabilities) of ``image``: a SimpleITK image on its own grid,
    and ``ClassProbabilities`` on that grid (None unless ``keep_probabilities``, which
    costs K input-sized float32 volumes of memory; the label map alone keeps a running
    maximum: two volumes).
    """
    import SimpleITK as sitk

    from gvsl_cli.preprocess import prepare, to_original_grid

    models = [segmenters] if isinstance(segmenters, Segmenter) else list(segmenters)
    check_ensemble(models)
    segmenter = models[0]
    prepared = prepare(image, segmenter.preprocess)
    probabilities = None
    for member in models:
        member.model.to(device)
        logits = predict_logits(member.model, prepared.array, patch=member.patch, device=device, autocast_dtype=autocast_dtype, overlap=overlap, batch=batch)
        softmax = torch.softmax(logits, dim=0)
        del logits
        probabilities = softmax if probabilities is None else probabilities.add_(softmax)
        if len(models) > 1:
            member.model.cpu()  # one model on the device at a time
    probabilities = probabilities.div_(len(models)).numpy()
    # Class by class, keeping a running maximum: memory of two input-sized volumes, not K
    # (unless the probabilities themselves are wanted).
    best_probability = None
    best_class = None
    kept = []
    for k in range(probabilities.shape[0]):
        on_grid = sitk.GetImageFromArray(np.ascontiguousarray(probabilities[k]))
        prepared.grid.apply_to(on_grid)
        resampled = sitk.GetArrayFromImage(to_original_grid(on_grid, prepared.original))
        if keep_probabilities:
            kept.append(resampled)
        if best_probability is None:
            best_probability, best_class = resampled, np.zeros(resampled.shape, dtype=np.int64)
        else:
            better = resampled > best_probability
            best_probability = np.where(better, resampled, best_probability)
            best_class[better] = k
    values = np.asarray(segmenter.label_values)
    dtype = np.uint8 if values.max() < 256 else (np.uint16 if values.max() < 65536 else np.int32)
    labels = sitk.GetImageFromArray(values[best_class].astype(dtype))
    labels.CopyInformation(image)
    if not keep_probabilities:
        return labels, None
    from gvsl_cli.geometry import Geometry

    return labels, ClassProbabilities([np.asarray(k, dtype=np.float32) for k in kept], Geometry.of(image))


def probabilities_name(label_map: Path) -> str:
    """CASE_probabilities.nii.gz for the label map CASE.nii.gz (``plan_outputs``' names)."""
    return label_map.name[: -len(".nii.gz")] + "_probabilities.nii.gz"


@dataclass(frozen=True)
class InputName:
    """How ``gvsl segment`` names an input's label map (``input_names``).

    Attributes:
        file_name: the label map's file name, ``CASE.nii.gz``.
        channel: the ``segmentation_data.Channel`` the input is when its folder holds a
            multi-channel nnU-Net dataset (``BRATS_001_0002``: channel 2 of ``BRATS_001``),
            else None.
    """

    file_name: str
    channel: object = None  # segmentation_data.Channel | None


def _volume_files(folder: Path) -> dict[str, Path]:
    """The volume files directly in ``folder`` by name (volume ending stripped), hidden
    ones (macOS ``._*``) left out; empty when it cannot be listed."""
    from gvsl_cli.data import strip_volume_suffix
    from gvsl_cli.io import volume_suffix

    try:
        with os.scandir(folder) as entries:
            return {strip_volume_suffix(e.name): folder / e.name for e in entries if not e.name.startswith(".") and volume_suffix(e.name) is not None}
    except OSError:
        return {}


def _confirmed_channels(channels: dict, files: dict[str, Path]) -> dict:
    """``nnunet_channels``' reading of one folder, kept only where the volumes agree.

    File names alone cannot tell nnU-Net's multi-channel cases from numbered families side
    by side (``img_0000`` … ``_0002`` beside ``mask_0000`` … ``_0002``: one export of images
    and masks). nnU-Net requires a case's channels to share one grid, while numbered files
    of different patients almost never do: a case counts as multi-channel only when the
    headers of all its channel files give one grid, and the pattern only while at least
    two such cases share a channel set. The headers are read lazily, a case at a time.
    """
    cases: dict[str, list[str]] = {}
    for stem, channel in channels.items():
        if channel is not None:
            cases.setdefault(channel.case, []).append(stem)
    confirmed: dict[str, bool] = {}

    def one_grid(case: str) -> bool:
        if case not in confirmed:
            grids = {_rounded(_grid_in_header(files[stem])) if stem in files else None for stem in cases[case]}
            confirmed[case] = len(grids) == 1 and None not in grids
        return confirmed[case]

    def pattern_holds(case: str, channel_set: tuple) -> bool:
        if not one_grid(case):
            return False
        return any(one_grid(other) for other in sorted(cases) if other != case and channels[cases[other][0]].channels == channel_set)

    return {stem: channel if channel is not None and pattern_holds(channel.case, channel.channels) else None for stem, channel in channels.items()}


def input_names(paths: Sequence[Path]) -> dict[Path, InputName]:
    """The label map's name of each input: ``CASE.nii.gz`` for ``CASE_0000.nii.gz`` or
    ``CASE.mha``, nnU-Net's naming where it is the plain reading of the file names **in the
    input's own folder on disk** (with the inputs of the call in it), never of the other
    inputs of the call, so a loop of one-file calls and one call on the folder agree.

    - ``CASE_0000`` is channel 0 of ``CASE`` (``CASE.nii.gz``) when its folder holds no
      other ``CASE_NNNN`` (``segmentation_data.nnunet_case_names``);
    - numbered files (``sub_0000``, ``sub_0001``, ``sub_0002`` in one folder, the one stem
      so numbered) keep their whole names;
    - in a folder of nnU-Net's multi-channel pattern (several cases sharing channels
      0..k, ``segmentation_data.nnunet_channels``, each case's channels on one grid:
      ``_confirmed_channels``) every channel is named by its case
      (``BRATS_001_0002`` -> ``BRATS_001.nii.gz``), and ``channel`` says which it is
      (``plan_outputs`` refuses two channels of one case).
    """
    from gvsl_cli.data import strip_volume_suffix
    from gvsl_cli.segmentation_data import nnunet_case_names, nnunet_channels

    by_folder: dict[Path, list[Path]] = {}
    for path in paths:
        by_folder.setdefault(Path(os.path.abspath(path)).parent, []).append(path)
    named: dict[Path, InputName] = {}
    for folder, members in by_folder.items():
        files = _volume_files(folder)
        files.update({strip_volume_suffix(Path(p).name): Path(p) for p in members})
        stems = set(files)
        cases, channels = nnunet_case_names(stems), _confirmed_channels(nnunet_channels(stems), files)
        for path in members:
            stem = strip_volume_suffix(Path(path).name)
            channel = channels[stem]
            named[path] = InputName(f"{channel.case if channel is not None else cases[stem]}.nii.gz", channel)
    return named


def output_names(paths: Sequence[Path]) -> dict[Path, str]:
    """The label map's file name of each input (``input_names``)."""
    return {path: name.file_name for path, name in input_names(paths).items()}


def output_name(path: Path) -> str:
    """``output_names`` of one input (CASE_0000.nii.gz -> CASE.nii.gz); the same whatever
    else a call is given."""
    return output_names([path])[path]


def refuse_several_channels(names: dict[Path, InputName]) -> None:
    """Refuse inputs holding two or more channels of one multi-channel nnU-Net case: a
    ``gvsl finetune`` model takes one image per case, and each channel would otherwise be
    segmented as a case of its own.

    Raises:
        InputError: naming the first such case, its folder and the channels given.
    """
    from gvsl_cli.io import volume_suffix

    given: dict[tuple[Path, str], list[tuple[int, Path]]] = {}
    for path, name in names.items():
        if name.channel is not None:
            given.setdefault((Path(os.path.abspath(path)).parent, name.channel.case), []).append((name.channel.channel, Path(path)))
    several = {key: sorted(found) for key, found in given.items() if len(found) > 1}
    if not several:
        return
    (folder, case), found = sorted(several.items(), key=lambda item: (str(item[0][0]), item[0][1]))[0]
    others = f" and of {len(several) - 1} other case(s)" if len(several) > 1 else ""
    raise InputError(
        f"{folder}: the inputs hold {len(found)} channels of the multi-channel nnU-Net case {case} ({', '.join(p.name for _, p in found)}){others}; "
        "a gvsl finetune model is single-channel: one image per case",
        hint=f"give only the channel the model was trained on, e.g. '{folder}/*_{found[0][0]:04d}{volume_suffix(found[0][1]) or ''}'; each label map is then named by its case ({case}.nii.gz)",
    )


@dataclass
class SegmentResult:
    """What ``segment_files`` did with one input: "written", "skipped" (output present) or
    "failed" (``reason`` says why); ``warning``: a remark on a written one (e.g. the model's
    intensity mapping does not fit the image, ``preprocess.modality_misfit``)."""

    input: str
    output: str
    status: str
    reason: str = ""
    seconds: float = 0.0
    warning: str = ""


def _as_sources(sources: Sequence[Path | Source]) -> list[Source]:
    """``sources`` as ``data.Source``; a bare path is taken as a file given directly."""
    return [s if isinstance(s, Source) else Source(Path(s), Path(s).name, None) for s in sources]


def plan_outputs(sources: Sequence[Path | Source], out_dir: Path, *, read: dict[Path, InputName] | None = None) -> list[tuple[Path, Path]]:
    """(input path, output path) pairs: ``output_name`` in the sub-folder that
    ``data.output_subfolders`` gives (a folder per patient is mirrored, ``out/p01/image.nii.gz``;
    a flat folder or files of distinct names stay flat, ``out/CASE.nii.gz``). A bare path is
    taken as a file given directly. Two channels of one multi-channel nnU-Net case
    (``refuse_several_channels``), and two inputs that would write the same file, are
    refused. ``read``: the sources' ``input_names``, when the caller has them already.
    """
    from gvsl_cli.data import output_subfolders

    sources = _as_sources(sources)
    read = input_names([source.path for source in sources]) if read is None else read
    refuse_several_channels(read)
    # By absolute path: output_subfolders names the loose inputs by theirs.
    names = {os.path.abspath(path): name.file_name for path, name in read.items()}

    def name(path: Path) -> str:
        return names[os.path.abspath(path)]

    planned: dict[Path, Path] = {}
    for source, subfolder in zip(sources, output_subfolders(sources, name)):
        target = out_dir / subfolder / name(source.path)
        if target in planned:
            raise ConfigError(f"{source.path} and {planned[target]} would both be written to {target}", hint="segment them into different -o folders, or rename one of them")
        planned[target] = source.path
    return [(source, target) for target, source in planned.items()]


def segment_files(
    segmenter: Segmenter | Sequence[Segmenter],
    sources: Sequence[Path | Source],
    out_dir: Path,
    *,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    overlap: float = 0.5,
    batch: int = 1,
    overwrite: bool = False,
    probabilities: bool = False,
    on_result: Callable[[SegmentResult], None] | None = None,
    record: OutputRecord | None = None,
) -> list[SegmentResult]:
    """Segment each source into ``out_dir`` with one model or an ensemble (``segment_image``),
    named by ``plan_outputs``; a failing input is reported and the others done. ``probabilities``: also write each
    input's class probabilities (``probabilities_name``); an input counts as done when all
    its outputs exist.

    ``record`` (``segment_record.check_output_folder``): ``segment.json`` is written before
    the first output; when the run replaces outputs of other settings, a failed input's
    earlier outputs are removed and a written one's earlier probability map too.

    Raises:
        OutputWriteError: an output could not be written for want of space (or a
            read-only or over-quota disk): the run stops there, as every later input would
            fail the same way after its minutes of work.
    """
    import SimpleITK as sitk

    from gvsl_cli.data import check_not_constant
    from gvsl_cli.geometry import Geometry
    from gvsl_cli.io import itk_warnings_hidden, nonorthogonal_direction_warning, read_volume, refuse_single_slice_vectors, remove_empty_folders, write_volume
    from gvsl_cli.preprocess import modality_misfit, modality_of_minimum

    mapping = (segmenter if isinstance(segmenter, Segmenter) else segmenter[0]).preprocess.modality

    results = []
    replacing = record is not None and record.replacing
    read = input_names([source.path for source in _as_sources(sources)])  # headers read once
    planned = plan_outputs(sources, out_dir, read=read)
    channels = {os.path.abspath(path): name.channel for path, name in read.items()}
    for source, target in planned:
        started = time.perf_counter()
        probability_target = target.with_name(probabilities_name(target)) if probabilities else None
        earlier_probabilities = target.with_name(probabilities_name(target))
        if target.exists() and (probability_target is None or probability_target.exists()) and not overwrite:
            other = _made_from_another_input(source, target, record, channels[os.path.abspath(source)])
            if other:
                result = SegmentResult(str(source), str(target), "failed", other)
            else:
                result = SegmentResult(str(source), str(target), "skipped", "output exists (--overwrite replaces it)")
        elif target.exists() and record is not None and channels[os.path.abspath(source)] is not None and (
            other := _made_by_another_channel(source, target, record.made_from_another_input(target, source), channels[os.path.abspath(source)])
        ):
            result = SegmentResult(str(source), str(target), "failed", other)
        else:
            try:
                image = read_volume(source)
                if probabilities:
                    refuse_single_slice_vectors(image.GetSize(), "its probability map")
                extremes = sitk.MinimumMaximumImageFilter()
                extremes.Execute(image)
                check_not_constant(extremes.GetMinimum(), extremes.GetMaximum())  # nothing to segment
                labels, probabilities_found = segment_image_with_probabilities(
                    segmenter, image, device=device, autocast_dtype=autocast_dtype, overlap=overlap, batch=batch, keep_probabilities=probabilities
                )
                direction = nonorthogonal_direction_warning(Geometry.of(image), None)
                with _stop_when_the_disk_fails(target, results), itk_warnings_hidden(direction is not None):
                    if record is not None:
                        record.before_first_output()
                    if probabilities_found is not None:
                        probabilities_found.write(probability_target)  # first: the label map marks the input as done
                    elif replacing:
                        earlier_probabilities.unlink(missing_ok=True)  # another model's
                    write_volume(labels, target)
                    if record is not None:
                        record.output_written(target, source)
                misfit = modality_misfit(mapping, modality_of_minimum(extremes.GetMinimum()))
                warnings = [f"{misfit} (the model's contract): the model never saw such images, its labels may be wrong"] if misfit else []
                warning = "; ".join(warnings + ([direction] if direction else []))
                result = SegmentResult(str(source), str(target), "written", seconds=round(time.perf_counter() - started, 3), warning=warning)
            except OutputWriteError:
                remove_empty_folders(_subfolders_of(target, out_dir))
                raise
            except Exception as exc:  # noqa: BLE001 - one image's failure must not end a run over many
                result = SegmentResult(str(source), str(target), "failed", failure_reason(exc, source))
                if replacing:  # left, they would pass for this run's
                    for stale in (target, earlier_probabilities):
                        stale.unlink(missing_ok=True)
                remove_empty_folders(_subfolders_of(target, out_dir))
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def _rounded(grid) -> tuple | None:
    """A ``_grid_in_header`` grid with spacing, origin and direction rounded to 1e-4 (mm),
    so that float noise in headers does not make two grids differ."""
    if grid is None:
        return None
    size, *rest = grid
    return (tuple(size), *(tuple(round(v, 4) for v in values) for values in rest))


def _grid_in_header(path: Path):
    """(size, spacing, origin, direction) from a volume file's header, or None (a DICOM
    folder, an unreadable header: no opinion)."""
    if path.is_dir():
        return None
    from gvsl_cli.io import read_image_information

    try:
        reader = read_image_information(path)
    except RuntimeError:
        return None
    return reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection()


def _made_from_another_input(source: Path, target: Path, record: OutputRecord | None, channel=None) -> str:
    """Why an existing output cannot be this input's ('' when it can be): by the folder's
    index of inputs (``segment_record``), else, for outputs the index does not know, by
    the grid (``_made_from_another_image``). ``channel``: the input's
    ``segmentation_data.Channel`` (a loop of one-file calls over a multi-channel folder
    meets the label map its case's other channel made)."""
    recorded = record.made_from_another_input(target, source) if record is not None else None
    if recorded is None:
        return _made_from_another_image(source, target)
    if recorded.startswith("an earlier version of "):
        return f"{target} exists but was made from {recorded} (see {RUN_FILE}); segment it again with --overwrite"
    another_channel = _made_by_another_channel(source, target, recorded, channel)
    if another_channel:
        return another_channel
    if recorded:
        return (
            f"{target} exists but was made from {recorded} (see {RUN_FILE}); "
            "give all inputs in one call (same-named files then get sub-folders), use another -o, or --overwrite"
        )
    return ""


def _made_by_another_channel(source: Path, target: Path, recorded: str | None, channel) -> str:
    """Why ``target`` may not be replaced by ``source``'s label map ('' when it may):
    ``recorded`` (the input the index says made it) is another channel of ``source``'s
    multi-channel case. Also under --overwrite, which replaces an input's own earlier
    output, not the one its case's other channel made: a loop of one-file calls would
    otherwise leave the last channel's labels, silently."""
    if recorded and channel is not None and _is_channel_of(Path(recorded), channel.case, Path(os.path.abspath(source)).parent):
        return (
            f"{target} exists, made from {Path(recorded).name}, another channel of the multi-channel nnU-Net case {channel.case} "
            f"(see {RUN_FILE}); a single-channel model segments one channel per case: give only the channel it was trained on"
        )
    return ""


def _is_channel_of(path: Path, case: str, folder: Path) -> bool:
    """Whether ``path`` is an image ``CASE_NNNN`` of ``case`` in ``folder``."""
    from gvsl_cli.data import strip_volume_suffix
    from gvsl_cli.segmentation_data import split_channel

    split = split_channel(strip_volume_suffix(path.name))
    return path.parent == folder and split is not None and split[0] == case


def _made_from_another_image(source: Path, target: Path) -> str:
    """Why an existing label map cannot be this input's ('' when it can be): a label map is
    written on its input's grid, so another grid means another input wrote it, e.g. a loop
    of one-file runs over ``p01/image.nii.gz``, ``p02/image.nii.gz`` into one ``-o``. Inputs
    on identical grids cannot be told apart this way."""
    mine, theirs = _grid_in_header(source), _grid_in_header(target)
    if mine is None or theirs is None:
        return ""
    same = mine[0] == theirs[0] and all(
        all(abs(a - b) <= tolerance for a, b in zip(m, t)) for m, t, tolerance in zip(mine[1:], theirs[1:], (1e-3, 1e-2, 1e-4))
    )
    if same:
        return ""
    return (
        f"{target} exists but was made from another image (its grid differs from this input's); "
        "give all inputs in one call (same-named files then get sub-folders), use another -o, or --overwrite"
    )


def _subfolders_of(target: Path, out_dir: Path) -> list[Path]:
    """The folders between ``out_dir`` (excluded) and ``target``, deepest first."""
    return [target.parent, *target.parent.parents][: len(target.relative_to(out_dir).parts) - 1]


class OutputWriteError(InputError):
    """An output cannot be written for a reason every later input shares (no space left,
    over quota, read-only disk): ``segment_files`` stops instead of failing each input."""


@contextlib.contextmanager
def _stop_when_the_disk_fails(target: Path, results: Sequence[SegmentResult]):
    """Turn a write failure of the disk (``DISK_ERRNOS``, or the NIfTI writer's short file,
    ``io.write_volume``'s GvslError) into ``OutputWriteError``; other errors (a name too
    long) stay one input's failure."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in DISK_ERRNOS:
            raise
        where = exc.filename if exc.filename is not None else target
        raise OutputWriteError(f"{where}: cannot write ({exc.strerror}); stopped after {_written(results)} written", hint=_DISK_HINT) from exc
    except GvslError as exc:  # "PATH: the NIfTI writer left a damaged file (no space left on the device?)"
        raise OutputWriteError(f"{str(exc).strip().splitlines()[0]}; stopped after {_written(results)} written", hint=_DISK_HINT) from exc


_DISK_HINT = "free space on that disk or write to another -o folder; a rerun skips the label maps written"


def _written(results: Sequence[SegmentResult]) -> str:
    return f"{sum(r.status == 'written' for r in results)} label map(s)"


def check_overlap(overlap: float) -> None:
    if not 0.0 <= overlap < 1.0:
        raise ConfigError(f"--overlap must be in [0, 1), got {overlap:g}")

