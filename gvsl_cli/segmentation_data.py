"""Labelled training data for ``gvsl finetune``: finding cases, checking and preparing them,
splitting them, and sampling training patches.

1. ``find_cases`` reads an nnU-Net raw dataset folder (``imagesTr/CASE_0000.nii.gz``,
   ``labelsTr/CASE.nii.gz``, ``dataset.json``, or its v1 "training" list) or two folders
   matched by file name (by path below each folder where file names repeat), and
   returns the (image, label) pairs and the label set, refusing anything nnU-Net would
   refuse (multi-channel data, an image without its label) in one line naming the file.
   A ``_NNNN`` ending is nnU-Net's channel only where that reading is the plain one
   (``nnunet_case_names``): numbered cases (``amos_0001``) are not channels;
   ``nnunet_channels`` finds nnU-Net's multi-channel pattern (``gvsl segment`` refuses it).
2. ``prepare_cases`` reads every pair once, checks the label map (same grid as its image,
   integer values, values of the label set; the values as read are kept, since a
   structure smaller than a canonical voxel vanishes in resampling) and brings both
   onto the canonical grid of the weights' preprocessing contract: the image through
   ``preprocess.prepare``, the labels by nearest neighbour onto the same grid. Prepared
   cases are kept in memory (a dataset of tens of cases at 1 mm is a few GiB at most);
   nothing is cached on disk.
3. ``split_cases`` makes a deterministic training/validation split from a seed.
4. ``PatchSampler`` draws the training patches of iteration ``i`` from a generator seeded
   by (seed, i) alone (so a resumed run draws what an uninterrupted one would), one third
   of them centred on a foreground voxel (nnU-Net's oversampling).

Arrays are (z, y, x) = (D, H, W). Class *indices* 0..K-1 are what the network predicts;
label *values* are what the files hold (``LabelSet`` maps one to the other).
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from gvsl_cli.config import PreprocessConfig
from gvsl_cli.data import STREAM_DATA, Source, discover_named, iteration_seed
from gvsl_cli.paths import LINK_LOOP, LINK_LOOP_HINT
from gvsl_cli.errors import InputError
from gvsl_cli.io import read_volume, volume_suffix

DATASET_JSON = "dataset.json"
#: nnU-Net's channel suffix of an image file name: CASE_0000.nii.gz is channel 0 of CASE.
CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
#: Fraction of training patches centred on a foreground voxel (nnU-Net's 0.33).
FOREGROUND_FRACTION = 1.0 / 3.0
#: Class indices are stored as uint8.
MAX_CLASSES = 256
#: At most this many voxel positions are kept per class and case for foreground sampling
#: (a random subset, as nnU-Net does): enough to reach every part of a structure.
MAX_FOREGROUND_POSITIONS = 10000


# --------------------------------------------------------------------------- label sets


@dataclass(frozen=True)
class LabelSet:
    """The classes of a dataset: class index i has ``names[i]`` and file value ``values[i]``.

    ``values[0]`` is 0, the background; values are sorted and distinct.
    """

    names: tuple[str, ...]
    values: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.values) or len(self.values) < 2:
            raise InputError(f"a label set needs a background and at least one class, got {dict(zip(self.names, self.values))}")
        if self.values[0] != 0 or list(self.values) != sorted(set(self.values)):
            raise InputError(f"label values must be distinct and >= 0, with background 0, got {list(self.values)}")
        if len(self.values) > MAX_CLASSES:
            raise InputError(f"{len(self.values)} classes; gvsl finetune handles at most {MAX_CLASSES}")

    @property
    def count(self) -> int:
        return len(self.values)

    def to_dict(self) -> dict[str, int]:
        """{name: value}, the form of nnU-Net's dataset.json "labels"."""
        return dict(zip(self.names, self.values))

    @classmethod
    def from_dict(cls, labels: dict[str, int]) -> "LabelSet":
        ordered = sorted(labels.items(), key=lambda item: item[1])
        return cls(names=tuple(n for n, _ in ordered), values=tuple(int(v) for _, v in ordered))

    @classmethod
    def from_values(cls, values: Sequence[int]) -> "LabelSet":
        """Names for values found in label files (no dataset.json): background, label_1, ..."""
        values = sorted(set(int(v) for v in values) | {0})
        return cls(names=tuple("background" if v == 0 else f"label_{v}" for v in values), values=tuple(values))

    def indices(self, label_values: np.ndarray) -> np.ndarray:
        """Class indices (uint8) of an array of label values, all of which are in the set."""
        return np.searchsorted(np.asarray(self.values), label_values).astype(np.uint8)


def read_dataset_json(path: Path) -> LabelSet:
    """The label set of an nnU-Net dataset.json (v2 {"name": value} or v1 {"value": "name"}).

    Raises:
        InputError: unreadable JSON, no "labels", region-based labels, non-integer values,
            no background 0, or more than one input channel.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read dataset.json ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("labels"), dict) or not data["labels"]:
        raise InputError(f"{path}: no \"labels\" in dataset.json", hint='add "labels": {"background": 0, "organ": 1, ...}')
    channels = data.get("channel_names", data.get("modality", {"0": "image"}))
    if isinstance(channels, dict) and len(channels) > 1:
        raise InputError(
            f"{path}: the dataset has {len(channels)} input channels ({', '.join(map(str, channels.values()))}); gvsl finetune supports single-channel datasets only",
            hint="make one dataset per channel, or give one channel with --images/--labels",
        )
    raw = data["labels"]
    labels: dict[str, int] = {}
    for key, value in raw.items():
        if isinstance(value, list):
            raise InputError(f"{path}: label {key!r} is a region (a list of values); gvsl finetune supports plain labels only")
        if isinstance(value, str) and str(key).lstrip("-").isdigit():
            key, value = value, int(key)  # nnU-Net v1: {"0": "background", "1": "liver"}
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{path}: label {key!r} has value {value!r}; expected an integer")
        labels[str(key)] = value
    if "ignore" in labels:
        raise InputError(f"{path}: nnU-Net's \"ignore\" label (partial annotations) is not supported by gvsl finetune", hint="label every voxel, or leave those cases out")
    if 0 not in labels.values():
        raise InputError(f"{path}: no label with value 0 (the background)", hint='add "background": 0 to "labels"')
    if len(set(labels.values())) != len(labels):
        raise InputError(f"{path}: two labels share a value ({labels})")
    try:
        return LabelSet.from_dict(labels)
    except InputError as exc:
        raise InputError(f"{path}: {exc}", hint=exc.hint) from None


# --------------------------------------------------------------------------- finding cases


@dataclass(frozen=True)
class Case:
    """One training case: its name (nnU-Net's case identifier), image and label map."""

    name: str
    image: Path
    label: Path


def split_channel(name: str) -> tuple[str, int] | None:
    """(case, channel) of a name ending in nnU-Net's channel suffix (``liver_3_0000`` ->
    ("liver_3", 0)), else None. Whether the suffix *is* a channel depends on the names
    around it (``nnunet_case_names``)."""
    match = CHANNEL_SUFFIX.match(name)
    return (match.group("case"), int(match.group("channel"))) if match else None


def _channel_sets(names: list[str]) -> dict[str, set[int]]:
    """The ``_NNNN`` numbers found for each stem among ``names`` (``split_channel``)."""
    channels: dict[str, set[int]] = {}
    for name in names:
        split = split_channel(name)
        if split is not None:
            channels.setdefault(split[0], set()).add(split[1])
    return channels


def nnunet_case_names(names: Iterable[str]) -> dict[str, str]:
    """The case name of each image name (a file name or path without its volume ending),
    reading nnU-Net's channel suffix only where that reading is the plain one.

    ``CASE_0000`` is channel 0 of case ``CASE`` (named ``CASE``) when no other
    ``CASE_NNNN`` is among ``names``: nnU-Net's single-channel naming (``liver_3_0000`` ->
    ``liver_3``). Every other name is a case of its own, whole: ``amos_0001`` with no
    ``amos_0000`` beside it is a numbered case, and ``sub_0000`` beside ``sub_0001`` is
    either numbered cases or channels of one multi-channel case, never a single-channel
    case ``sub`` (the label maps, when there are any, tell which: see ``_pair``).
    """
    names = list(names)
    channels = _channel_sets(names)
    result = {}
    for name in names:
        split = split_channel(name)
        single_channel = split is not None and channels[split[0]] == {0}
        result[name] = split[0] if single_channel else name
    return result


@dataclass(frozen=True)
class Channel:
    """An image that is one channel of a multi-channel nnU-Net case (``nnunet_channels``):
    ``BRATS_001_0002`` is channel 2 of case ``BRATS_001``, whose ``channels`` are (0, 1, 2, 3)."""

    case: str
    channel: int
    channels: tuple[int, ...]


def nnunet_channels(names: Iterable[str]) -> dict[str, Channel | None]:
    """For each image name of one folder (without its volume ending): the ``Channel`` it is
    when the names show nnU-Net's multi-channel pattern, else None.

    The pattern is several cases sharing one channel set 0..k with k >= 1
    (``BRATS_001_0000`` … ``_0003`` and ``BRATS_002_0000`` … ``_0003``): each of their
    images is a channel. One stem with ``_0000``, ``_0001``, ``_0002`` and nothing else is
    ambiguous (numbered cases ``sub_0000`` … or the channels of one case) and is not read
    as channels, as ``nnunet_case_names`` names such images whole; nor is ``CASE_0000``
    alone (single-channel nnU-Net naming).
    """
    names = list(names)
    channels = _channel_sets(names)
    shared: dict[tuple[int, ...], int] = {}
    for found in channels.values():
        key = tuple(sorted(found))
        shared[key] = shared.get(key, 0) + 1
    result: dict[str, Channel | None] = {}
    for name in names:
        split = split_channel(name)
        found = tuple(sorted(channels[split[0]])) if split is not None else ()
        pattern = len(found) >= 2 and found == tuple(range(len(found))) and shared[found] >= 2
        result[name] = Channel(split[0], split[1], found) if pattern else None
    return result


def _volumes_in(folder: Path, what: str) -> list[Source]:
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder ({what})")
    sources, skipped = discover_named([folder])
    for item in skipped:
        if item.reason == LINK_LOOP:
            # Not dropped silently: the case it stood for would be missing from training.
            raise InputError(f"{item.path}: {LINK_LOOP} (in the {what} folder)", hint=LINK_LOOP_HINT)
    if not sources:
        raise InputError(f"{folder}: holds no volume ({what})", hint="NIfTI, NRRD, MHA/MHD files or DICOM series folders")
    return sources


def _file_name_repeats(sources: Sequence[Source]) -> bool:
    stems = [s.name.rsplit("/", 1)[-1] for s in sources]
    return len(set(stems)) < len(stems)


def _keyed(sources: Sequence[Source], folder: Path, *, by_path: bool) -> dict[str, Path]:
    """{key: real path}; ``by_path``: keys are paths below ``folder`` (``p01/ct``), else
    file names (``ct``), both without the volume ending.

    Raises:
        InputError: two volumes with one key (``ct.nii.gz`` and ``ct.mha``).
    """
    found: dict[str, Path] = {}
    for source in sources:
        key = source.name if by_path else source.name.rsplit("/", 1)[-1]
        if key in found:
            raise InputError(f"{source.path}: case {key} appears twice in {folder} (also {found[key]})", hint="keep one of the two files")
        found[key] = source.path.resolve()
    return found


def _pair(images: dict[str, Path], labels: dict[str, Path], labels_folder: Path, *, by_path: bool) -> list[Case]:
    """Cases of images and label maps (both keyed as ``_keyed`` keys them).

    An image pairs with the label map of its own key first (``sub_0001`` in both folders,
    ``CASE_0000`` in both, ``p01/ct`` in both); failing that, ``CASE_NNNN`` with the label
    map ``CASE`` (nnU-Net's naming), where a channel other than 0 is a multi-channel case
    and refused. Case names follow ``nnunet_case_names``.
    """
    names = nnunet_case_names(images)
    cases: dict[str, Case] = {}
    label_of: dict[Path, str] = {}
    for key, image in sorted(images.items()):
        label, name = labels.get(key), names[key]
        split = split_channel(key)
        if label is None and split is not None and split[0] in labels:
            case, channel = split
            if channel != 0:
                raise InputError(
                    f"{image}: channel {channel} of case {case} (its label map is {labels[case]}); gvsl finetune supports single-channel datasets only",
                    hint="give a dataset with one image (CASE_0000) per case",
                )
            label, name = labels[case], case
        if label is None:
            how = "the path below each folder (file names repeat)" if by_path else "file name"
            wanted = [key] + ([split[0]] if split is not None and split[1] == 0 else [])
            raise InputError(
                f"{image}: no label map for case {name} in {labels_folder} (matched by {how}: looked for {' or '.join(w + '.*' for w in wanted)})",
                hint=f"add {labels_folder / (name + '.nii.gz')} or remove the image",
            )
        if name in cases:
            raise InputError(f"{image}: case {name} has two images: this one and {cases[name].image}", hint="keep one of the two files")
        if label in label_of:
            raise InputError(f"{label}: the label map of two images ({cases[label_of[label]].image} and {image})", hint="give each image its own label map")
        cases[name] = Case(name=name, image=image, label=label)
        label_of[label] = name
    for key, path in sorted(labels.items()):
        if path not in label_of:
            raise InputError(f"{path}: label map without an image (case {key})", hint="add the image or remove the label map")
    return [cases[name] for name in sorted(cases)]


def _listed_cases(json_path: Path, root: Path) -> list[Case] | None:
    """The cases of a dataset.json "training" list (nnU-Net v1: [{"image": "./imagesTr/X.nii.gz",
    "label": "./labelsTr/X.nii.gz"}, ...]), or None when it has none.

    The list names each case's image without its channel suffix even where the file has one
    (nnU-Net v1's converted datasets: "./imagesTr/la_003.nii.gz" for la_003_0000.nii.gz),
    so an image that is not there is looked for with ``_0000``.

    Raises:
        InputError: an entry that is not an image/label pair, a file that is not there, a
            case listed twice.
    """
    data = json.loads(json_path.read_text(encoding="utf-8"))  # read_dataset_json read it already
    entries = data.get("training")
    if entries is None:
        return None
    if not isinstance(entries, list) or not entries:
        raise InputError(f"{json_path}: \"training\" is not a list of {{\"image\": PATH, \"label\": PATH}}", hint="fix it, or remove it to match imagesTr and labelsTr by file name")
    cases: dict[str, Case] = {}
    for number, entry in enumerate(entries):
        if not (isinstance(entry, dict) and isinstance(entry.get("image"), str) and isinstance(entry.get("label"), str)):
            raise InputError(f"{json_path}: \"training\" entry {number} is not {{\"image\": PATH, \"label\": PATH}} ({json.dumps(entry)[:80]})")
        image, label = root / entry["image"], root / entry["label"]
        suffix = volume_suffix(image) or ""
        name = image.name[: len(image.name) - len(suffix)]
        if not image.exists() and (image.parent / f"{name}_0000{suffix}").exists():
            image = image.parent / f"{name}_0000{suffix}"
        for path in (image, label):
            if not path.exists():
                raise InputError(f"{json_path}: \"training\" entry {number} names {path}, which does not exist", hint="fix the list, or remove \"training\" to match imagesTr and labelsTr by file name")
        if name in cases:
            raise InputError(f"{json_path}: \"training\" lists case {name} twice")
        cases[name] = Case(name=name, image=image.resolve(), label=label.resolve())
    return [cases[name] for name in sorted(cases)]


def find_cases(dataset: str | Path | None = None, *, images: str | Path | None = None, labels: str | Path | None = None) -> tuple[list[Case], LabelSet | None]:
    """The cases of an nnU-Net dataset folder, or of an image folder and a label folder.

    Images and label maps are matched by file name without the volume ending, or, when
    file names repeat in a folder (a folder per patient: ``imgs/p01/ct.nii.gz``), by the
    path below each folder (``p01/ct``, also the case name); see ``_pair`` for nnU-Net's
    ``CASE_0000`` / ``CASE`` naming. A dataset.json with a "training" list of image/label
    pairs (nnU-Net v1) gives the cases instead.

    Returns the cases sorted by name and the label set of dataset.json (None for two
    folders without one: the label set then comes from the values in the label maps).

    Raises:
        InputError: a missing folder or dataset.json, a multi-channel dataset, an image
            without a label map or a label map without an image, a case given twice.
    """
    if dataset is not None:
        if images is not None or labels is not None:
            raise InputError("give either a dataset folder or --images and --labels, not both")
        root = Path(dataset)
        if root.is_file():
            raise InputError(f"{root}: is a file; give the dataset folder (holding imagesTr, labelsTr and dataset.json)")
        if not root.is_dir():
            raise InputError(f"{root}: no such dataset folder", hint="give an nnU-Net raw dataset folder (imagesTr, labelsTr, dataset.json)")
        json_path = root / DATASET_JSON
        if not json_path.is_file():
            raise InputError(f"{root}: no {DATASET_JSON} (not an nnU-Net raw dataset folder)", hint="give one, or use --images DIR --labels DIR")
        label_set = read_dataset_json(json_path)
        listed = _listed_cases(json_path, root)
        if listed is not None:
            return listed, label_set
        image_dir, label_dir = root / "imagesTr", root / "labelsTr"
    else:
        if images is None or labels is None:
            raise InputError("no dataset given", hint="gvsl finetune DATASET_FOLDER, or --images DIR --labels DIR")
        image_dir, label_dir = Path(images), Path(labels)
        label_set = None
    image_sources = _volumes_in(image_dir, "images")
    label_sources = _volumes_in(label_dir, "label maps")
    by_path = _file_name_repeats(image_sources) or _file_name_repeats(label_sources)
    cases = _pair(_keyed(image_sources, image_dir, by_path=by_path), _keyed(label_sources, label_dir, by_path=by_path), label_dir, by_path=by_path)
    return cases, label_set


# --------------------------------------------------------------------------- preparing


@dataclass
class PreparedCase:
    """A case on the canonical grid.

    Attributes:
        name: the case name.
        image: (D, H, W) float32 intensities in about [0, 1].
        values: (D, H, W) int64 label values (file values, not yet class indices).
        target: (D, H, W) uint8 class indices (set by ``prepare_cases``).
        modality: the intensity mapping used ("ct" or "mr").
        file_values: the label values of the label map as read (before resampling: a
            structure smaller than a voxel of the canonical grid may be in the file and not
            in ``values``).
        classes_in_file, classes_on_grid: class indices present in the label map as read
            and on the canonical grid (set by ``prepare_cases``).
        detected: what ``preprocess.detect_modality`` makes of the raw intensities (differs
            from ``modality`` when the contract imposes a mapping that does not fit).
    """

    name: str
    image: np.ndarray
    values: np.ndarray
    modality: str
    target: np.ndarray | None = None
    detected: str | None = None
    file_values: tuple[int, ...] = ()
    classes_in_file: frozenset[int] = frozenset()
    classes_on_grid: frozenset[int] = frozenset()


#: A label map read without a dataset.json with more distinct values than this is checked
#: for being an image given as --labels (an integer MR holds hundreds of values, and
#: trained a model of as many classes).
LABEL_VALUES_CHECKED = 32
#: ... and taken for one when fewer of its labelled voxels than this share their value with
#: their neighbour along x. Label maps are piecewise constant (FreeSurfer's aparc+aseg,
#: TotalSegmentator's 117 classes: most voxels lie inside a region); an image's values
#: change from voxel to voxel. A count alone cannot tell them apart.
PIECEWISE_CONSTANT_FRACTION = 0.5


def _refuse_image_like_labels(where: str, values: np.ndarray, array: np.ndarray) -> None:
    """Raise InputError when the label map ``array`` (z, y, x), of sorted distinct
    ``values``, looks like an image: many values that change from voxel to voxel."""
    if values.size <= LABEL_VALUES_CHECKED or array.shape[-1] < 2:
        return
    labelled = array[..., :-1] != 0
    if not labelled.any():
        return
    same = float(np.count_nonzero((array[..., :-1] == array[..., 1:]) & labelled)) / float(np.count_nonzero(labelled))
    if same < PIECEWISE_CONSTANT_FRACTION:
        raise InputError(
            f"{where}: holds {values.size} distinct values ({int(values[0])}..{int(values[-1])}) that change from voxel to voxel "
            f"(only {same:.0%} of its labelled voxels share their neighbour's value): it looks like an image, not a label map",
            hint="check --labels: it must hold label maps, not images",
        )


def _check_label_map(label, image, case: Case):
    """The label map's values as an int64 array, after checking grid and integrality."""
    import SimpleITK as sitk

    from gvsl_cli.geometry import Geometry

    image_grid, label_grid = Geometry.of(image), Geometry.of(label)
    if image_grid.size != label_grid.size:
        raise InputError(f"{case.label}: label grid {label_grid.size} does not match its image {case.image.name} {image_grid.size} (x, y, z voxels)")
    differing = label_grid.differences(image_grid, atol=1e-3)
    if differing:
        raise InputError(
            f"{case.label}: label map is not on the grid of its image {case.image.name} ({differing}; label map's first)",
            hint="resample the label map onto its image's grid",
        )
    array = sitk.GetArrayFromImage(label)
    if not np.issubdtype(array.dtype, np.integer):
        rounded = np.round(array)
        if not np.array_equal(rounded, array):
            off = rounded != array
            bad = float(array[off].flat[0])
            raise InputError(f"{case.label}: label map holds non-integer values ({int(off.sum())} voxels, e.g. {bad!r}); expected integer labels (a label map resampled linearly?)")
        array = rounded
    if array.size and array.min() < 0:
        raise InputError(f"{case.label}: label map holds the negative value {int(array.min())}; label values are 0 (background) and positive integers")
    return array.astype(np.int64)


def prepare_case(case: Case, preprocess: PreprocessConfig, label_set: LabelSet | None) -> PreparedCase:
    """Read, check and bring one case onto the canonical grid (see the module docstring).

    Raises:
        InputError: unreadable files, a label map on another grid than its image, non-integer
            labels, label values not in ``label_set``, without a ``label_set`` a label map
            that looks like an image (``_refuse_image_like_labels``).
    """
    import SimpleITK as sitk

    from gvsl_cli.preprocess import prepare, resample

    image = read_volume(case.image)
    label = read_volume(case.label)
    values = _check_label_map(label, image, case)
    file_values = np.unique(values)
    if label_set is None:
        _refuse_image_like_labels(str(case.label), file_values, values)
    if label_set is not None:
        unknown = np.setdiff1d(file_values, np.asarray(label_set.values))
        if unknown.size:
            raise InputError(
                f"{case.label}: label value(s) {', '.join(map(str, unknown[:5].tolist()))} not in dataset.json's labels ({', '.join(map(str, label_set.values))})",
                hint="fix the label map or add the value to dataset.json",
            )
    prepared = prepare(image, preprocess, name=case.image)
    label_image = sitk.GetImageFromArray(values.astype(np.int32))
    label_image.CopyInformation(label)
    on_grid = resample(label_image, prepared.grid, interpolator=sitk.sitkNearestNeighbor)
    return PreparedCase(
        name=case.name,
        image=prepared.array,
        values=sitk.GetArrayFromImage(on_grid).astype(np.int64),
        modality=prepared.modality,
        detected=prepared.detected,
        file_values=tuple(int(v) for v in file_values),
    )


def prepare_cases(
    cases: Sequence[Case],
    preprocess: PreprocessConfig,
    label_set: LabelSet | None,
    *,
    workers: int = 2,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[list[PreparedCase], LabelSet]:
    """Prepare every case (``prepare_case``, in ``workers`` threads) and set class indices.

    Without a label set, it is made of the values found in all label maps as read (not
    as resampled: a class smaller than a canonical voxel stays a class). The first
    failing case stops everything with its error (a training set with a broken case is
    not silently trained on without it). Without a label set, a label map that looks like
    an image is refused (``_refuse_image_like_labels``).
    """
    prepared: list[PreparedCase] = []
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        futures = [pool.submit(prepare_case, case, preprocess, label_set) for case in cases]
        for done, future in enumerate(futures, start=1):
            prepared.append(future.result())
            if on_progress is not None:
                on_progress(done, len(futures))
    finally:
        # On the first error, cases not yet started are dropped rather than read for nothing.
        pool.shutdown(wait=True, cancel_futures=True)
    if label_set is None:
        found = set().union(*({int(v) for v in p.file_values} for p in prepared))
        if found <= {0}:
            raise InputError(f"no label map holds a foreground voxel: all {len(prepared)} are background (0) only", hint="check --labels: these label maps are empty")
        label_set = LabelSet.from_values(sorted(found))
    for case in prepared:
        case.target = label_set.indices(case.values)
        case.values = np.empty(0, dtype=np.int64)  # the indices are all that is needed now
        case.classes_in_file = frozenset(label_set.indices(np.asarray(case.file_values, dtype=np.int64)).tolist())
        case.classes_on_grid = frozenset(np.flatnonzero(np.bincount(case.target.ravel(), minlength=label_set.count)).tolist())
    return prepared, label_set


# --------------------------------------------------------------------------- splitting


def split_cases(names: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(training, validation) case names: a random ``val_fraction`` of the cases, drawn
    with ``seed`` from the sorted names (so the split does not depend on file order).

    At least one validation case when there are two cases or more and the fraction is
    above 0; with one case, or fraction 0, there is no validation case.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"--val-fraction must be in [0, 1), got {val_fraction:g}")
    ordered = sorted(names)
    count = 0 if (len(ordered) < 2 or val_fraction == 0) else min(len(ordered) - 1, max(1, round(val_fraction * len(ordered))))
    order = np.random.default_rng(seed).permutation(len(ordered))
    validation = sorted(ordered[i] for i in order[:count])
    return [n for n in ordered if n not in validation], validation


def fold_split(names: Sequence[str], fold: int, folds: int, seed: int) -> tuple[list[str], list[str]]:
    """(training, validation) case names of cross-validation fold ``fold`` of ``folds``.

    The sorted names are shuffled with ``seed`` and cut into ``folds`` parts of nearly equal
    size; part ``fold`` is the validation set. Every case is validated in exactly one fold.
    """
    ordered = sorted(names)
    if folds < 2:
        raise InputError(f"--folds must be >= 2, got {folds}")
    if not 0 <= fold < folds:
        raise InputError(f"--fold must be in 0..{folds - 1} (with --folds {folds}), got {fold}")
    if len(ordered) < folds:
        raise InputError(f"{folds}-fold cross-validation needs at least {folds} cases; the dataset has {len(ordered)}", hint="use fewer --folds, or --val-fraction")
    order = np.random.default_rng(seed).permutation(len(ordered))
    validation = sorted(ordered[i] for i in np.array_split(order, folds)[fold])
    return [n for n in ordered if n not in validation], validation


def read_split_file(path: str | Path, fold: int) -> tuple[list[str], list[str]]:
    """(training, validation) case names of entry ``fold`` of an nnU-Net ``splits_final.json``
    (a JSON list of {"train": [...], "val": [...]}), so that a run validates on exactly the
    cases an nnU-Net fold does.

    Raises:
        InputError: unreadable file, not that layout, or no entry ``fold``.
    """
    path = Path(path).expanduser()
    try:
        splits = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path}: cannot read the splits file ({exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__})", hint="give nnU-Net's splits_final.json") from None
    layout_ok = isinstance(splits, list) and all(
        isinstance(entry, dict) and all(isinstance(entry.get(key), list) and all(isinstance(n, str) for n in entry[key]) for key in ("train", "val")) for entry in splits
    )
    if not layout_ok or not splits:
        raise InputError(f"{path}: not an nnU-Net splits file (a list of {{\"train\": [case, ...], \"val\": [case, ...]}})", hint="give nnU-Net's splits_final.json")
    if not 0 <= fold < len(splits):
        raise InputError(f"{path}: holds folds 0..{len(splits) - 1}, not --fold {fold}")
    return sorted(splits[fold]["train"]), sorted(splits[fold]["val"])


# --------------------------------------------------------------------------- sampling


def _crop(array: np.ndarray, start: Sequence[int], size: Sequence[int], out: np.ndarray) -> None:
    """Copy the box ``start``..``start + size`` of ``array`` into ``out`` (0 where it overhangs)."""
    src, dst = [], []
    for n, s, p in zip(array.shape, start, size):
        lo, hi = max(s, 0), min(s + p, n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out.fill(0)
    out[tuple(dst)] = array[tuple(src)]


class PatchSampler:
    """Random training patches of prepared cases, one third centred on foreground.

    A patch of ``patch`` voxels is drawn at a uniform position (inside the volume along
    axes longer than the patch, the volume at a uniform offset inside the patch along
    shorter ones), or, with probability ``foreground_fraction``, centred on a random voxel
    of a random foreground class present in the case. ``margin`` voxels are added on each
    side of the returned crops, around the same centre, for spatial augmentation.
    """

    def __init__(self, cases: Sequence[PreparedCase], patch: tuple[int, int, int], *, seed: int, margin: int = 0, foreground_fraction: float = FOREGROUND_FRACTION) -> None:
        self.cases = list(cases)
        self.patch = tuple(patch)
        self.seed = seed
        self.margin = margin
        self.foreground_fraction = foreground_fraction
        rng = np.random.default_rng(seed)
        # Per case: (class index, flat voxel positions) of each foreground class present.
        self.foreground: list[list[tuple[int, np.ndarray]]] = []
        for case in self.cases:
            classes = []
            for k in np.unique(case.target):
                if k == 0:
                    continue
                positions = np.flatnonzero(case.target == k)
                if positions.size > MAX_FOREGROUND_POSITIONS:
                    positions = np.sort(rng.choice(positions, MAX_FOREGROUND_POSITIONS, replace=False))
                classes.append((int(k), positions))
            self.foreground.append(classes)

    @property
    def region(self) -> tuple[int, int, int]:
        return tuple(p + 2 * self.margin for p in self.patch)

    def _start(self, rng: np.random.Generator, case: int, forced: bool) -> list[int]:
        shape = self.cases[case].target.shape
        classes = self.foreground[case]
        if forced and classes:
            _, positions = classes[int(rng.integers(len(classes)))]
            centre = np.unravel_index(int(positions[int(rng.integers(positions.size))]), shape)
            # Centred on the voxel, moved (not past it) so the patch stays inside the volume.
            return [int(np.clip(c - p // 2, min(0, n - p), max(0, n - p))) for c, p, n in zip(centre, self.patch, shape)]
        return [int(rng.integers(0, n - p + 1)) if n >= p else -int(rng.integers(0, p - n + 1)) for n, p in zip(shape, self.patch)]

    def sample(self, iteration: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Images (batch, 1, *region) float32 and class indices (batch, *region) int64."""
        rng = np.random.default_rng(iteration_seed(self.seed, 0, iteration, STREAM_DATA))
        region = self.region
        images = np.zeros((batch, 1, *region), dtype=np.float32)
        targets = np.zeros((batch, *region), dtype=np.uint8)
        for item in range(batch):
            case = int(rng.integers(len(self.cases)))
            forced = bool(rng.random() < self.foreground_fraction)
            start = [s - self.margin for s in self._start(rng, case, forced)]
            _crop(self.cases[case].image, start, region, images[item, 0])
            _crop(self.cases[case].target, start, region, targets[item])
        return images, targets.astype(np.int64)


def effective_patch(cases: Sequence[PreparedCase], patch: int, multiple: int = 16) -> tuple[int, int, int]:
    """``patch``³ shrunk along axes where every case is smaller (canonical sides are
    multiples of 16, so the result is too); smaller cases are padded."""
    largest = [max(c.target.shape[axis] for c in cases) for axis in range(3)]
    return tuple(min(patch, int(math.ceil(n / multiple)) * multiple) for n in largest)
