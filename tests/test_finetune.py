"""gvsl finetune on real labelled MR: datasets, modes, validation Dice, checkpoints, resume, errors.

Datasets are built in tmp folders from the shipped Colin27 / ICBM152 volumes (tissue labels
reduced to background, white matter, grey matter) and /work/shared/data's small ITK T1
with its k-means classes. Weights: a width-8 GVSL checkpoint with a 4 mm contract, so the
canonical grids are about 48×64×48 and a few dozen iterations run in seconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from gvsl_cli.checkpoint import load_weights, save_checkpoint
from gvsl_cli.cli import run
from gvsl_cli.config import ModelConfig, PreprocessConfig
from gvsl_cli.errors import InputError
from gvsl_cli.model import GVSL, SegmentationNet
from gvsl_cli.segmentation_data import LabelSet, PatchSampler, PreparedCase, find_cases, fold_split, read_dataset_json, read_split_file, split_cases
from gvsl_cli.training import read_metrics

EXAMPLES = Path(__file__).resolve().parent.parent / "gvsl_cli" / "examples"
SHARED = Path("/work/shared/data")
LABELS = {"background": 0, "white_matter": 1, "grey_matter": 2}


def _write_case(root: Path, name: str, t1: Path, labels: Path) -> None:
    sitk.WriteImage(sitk.ReadImage(str(t1)), str(root / "imagesTr" / f"{name}_0000.nii.gz"))
    label = sitk.ReadImage(str(labels))
    values = sitk.GetArrayFromImage(label)
    values[values > 2] = 0  # Colin27's CSF, skull, scalp, other: background here
    out = sitk.GetImageFromArray(values)
    out.CopyInformation(label)
    sitk.WriteImage(out, str(root / "labelsTr" / f"{name}.nii.gz"))


def make_dataset(root: Path, labels: dict | None = None) -> Path:
    """An nnU-Net raw dataset of Colin27 and ICBM152 with WM/GM labels."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    _write_case(root, "colin", EXAMPLES / "colin27_t1_2mm.nii.gz", EXAMPLES / "colin27_tissue_2mm.nii.gz")
    _write_case(root, "icbm", EXAMPLES / "icbm152_t1_2mm.nii.gz", EXAMPLES / "icbm152_tissue_2mm.nii.gz")
    description = {"channel_names": {"0": "T1"}, "labels": labels or LABELS, "numTraining": 2, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(description), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("finetune") / "Dataset001_Brain")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("weights") / "gvsl.pt", GVSL(ModelConfig(width=8)), PreprocessConfig(spacing=4.0, modality="mr"))


@pytest.fixture(scope="module")
def itk_folders(tmp_path_factory) -> tuple[Path, Path]:
    """--images/--labels folders with the one ITK T1 case (CASE_0000 image, CASE label)."""
    root = tmp_path_factory.mktemp("itk")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    shutil.copy(SHARED / "mr_itk_t1.nii.gz", root / "images" / "knee_0000.nii.gz")
    shutil.copy(SHARED / "mr_itk_t1_kmeans_labels.nii.gz", root / "labels" / "knee.nii.gz")
    return root / "images", root / "labels"


SMALL = ["--patch", "32", "--overlap", "0", "--quiet"]
ITERS = 40


@pytest.fixture(scope="module")
def trained_run(dataset, weights, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "brain"
    code = run(["finetune", str(dataset), "-o", str(run_dir), "--weights", str(weights), "--iters", str(ITERS), "--val-every", "20",
                "--lr", "1e-3", "--val-fraction", "0", *SMALL])
    assert code == 0
    return run_dir


def test_finetune_raises_validation_dice_and_keeps_the_best_checkpoint(trained_run):
    rows = read_metrics(trained_run / "metrics.jsonl")
    losses = [r for r in rows if "loss" in r]
    validations = [r for r in rows if "val_mean_dice" in r]
    assert [r["iteration"] for r in losses] == list(range(1, ITERS + 1))
    assert {"loss", "dice_loss", "ce"} <= set(losses[0]) and "dice" not in losses[0]  # a loss, named as one
    assert json.loads((trained_run / "run.json").read_text())["run"]["width"] == 8  # the weights' width, not the default
    assert [r["iteration"] for r in validations] == [0, 20, 40]
    assert set(validations[0]["val_dice"]) == {"white_matter", "grey_matter"}
    assert set(validations[0]["val_case_dice"]) == {"colin", "icbm"}
    per_case = validations[-1]["val_case_dice"]  # the class Dice is the mean over the cases
    assert abs(validations[-1]["val_dice"]["white_matter"] - (per_case["colin"]["white_matter"] + per_case["icbm"]["white_matter"]) / 2) < 1e-5
    # Validation here is on the two training cases (--val-fraction 0). Seen: 0.156 -> 0.459.
    initial, best = validations[0]["val_mean_dice"], max(r["val_mean_dice"] for r in validations)
    assert best > initial + 0.2
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["best"]["val_mean_dice"] == best and summary["validated_on_training_cases"]
    loaded = load_weights(trained_run / "best.pt")
    assert loaded.extra["segmentation"]["label_names"] == ["background", "white_matter", "grey_matter"]
    assert loaded.extra["segmentation"]["patch"] == [32, 32, 32]
    assert loaded.extra["validation"]["val_mean_dice"] == best
    assert loaded.preprocess == PreprocessConfig(spacing=4.0, modality="mr")
    last = load_weights(trained_run / "last.pt")
    assert last.extra["training"]["iteration"] == ITERS
    assert not list(trained_run.glob(".*tmp*"))


def test_segmenting_a_training_image_reproduces_its_labels(trained_run, dataset, tmp_path):
    out = tmp_path / "seg"
    assert run(["segment", str(dataset / "imagesTr" / "colin_0000.nii.gz"), "--model", str(trained_run), "-o", str(out), "--quiet"]) == 0
    predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "colin.nii.gz")))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset / "labelsTr" / "colin.nii.gz")))
    assert predicted.shape == truth.shape
    dice = [2 * np.sum((predicted == k) & (truth == k)) / (np.sum(predicted == k) + np.sum(truth == k)) for k in (1, 2)]
    # Seen after 40 iterations: white matter 0.62, grey matter 0.41, voxel agreement 0.84
    # (all background would agree on 0.76 of the voxels).
    assert dice[0] > 0.5 and dice[1] > 0.3
    assert np.mean(predicted == truth) > 0.8


def test_linear_mode_trains_the_head_only(dataset, weights, tmp_path):
    run_dir = tmp_path / "linear"
    assert run(["finetune", str(dataset), "-o", str(run_dir), "--weights", str(weights), "--mode", "linear", "--iters", "2", "--val-every", "2", *SMALL]) == 0
    pretrained = load_weights(weights).state_dict
    trained = load_weights(run_dir / "last.pt").state_dict
    unet = [k for k in trained if k.startswith("unet.")]
    assert unet and all(torch.equal(trained[k], pretrained[k]) for k in unet)
    torch.manual_seed(0)  # the run's --seed: the head it started from
    start = SegmentationNet(ModelConfig(width=8), 3).state_dict()
    assert not torch.equal(trained["head.weight"], start["head.weight"])


def test_scratch_mode_needs_no_weights_and_refuses_them(itk_folders, weights, tmp_path, capsys):
    images, labels = itk_folders
    run_dir = tmp_path / "scratch"
    code = run(["finetune", "--images", str(images), "--labels", str(labels), "-o", str(run_dir), "--mode", "scratch", "--width", "8",
                "--spacing", "4", "--modality", "mr", "--iters", "2", "--val-every", "2", *SMALL])
    assert code == 0
    loaded = load_weights(run_dir / "best.pt")
    assert loaded.model_config.width == 8
    # No dataset.json: the classes are the values found in the label map.
    assert loaded.extra["segmentation"]["label_values"] == [0, 1, 2, 3, 4, 5, 6]
    assert loaded.extra["segmentation"]["label_names"][:2] == ["background", "label_1"]
    capsys.readouterr()
    assert run(["finetune", "--images", str(images), "--labels", str(labels), "-o", str(tmp_path / "x"), "--mode", "scratch", "--weights", str(weights)]) == 2
    assert "drop --weights" in capsys.readouterr().err
    assert run(["finetune", "--images", str(images), "--labels", str(labels), "-o", str(tmp_path / "y")]) == 2
    assert "needs --weights" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_resumed_run_repeats_the_uninterrupted_one(itk_folders, weights, tmp_path):
    images, labels = itk_folders
    common = ["--images", str(images), "--labels", str(labels), "--weights", str(weights), "--val-every", "2", "--batch", "1", *SMALL]
    assert run(["finetune", *common, "-o", str(tmp_path / "whole"), "--iters", "4"]) == 0
    assert run(["finetune", *common, "-o", str(tmp_path / "parts"), "--iters", "2"]) == 0
    assert run(["finetune", "-o", str(tmp_path / "parts"), "--resume", "--iters", "4", "--quiet"]) == 0
    whole = load_weights(tmp_path / "whole" / "last.pt").state_dict
    parts = load_weights(tmp_path / "parts" / "last.pt").state_dict
    assert all(torch.equal(whole[k], parts[k]) for k in whole)
    rows = [r["iteration"] for r in read_metrics(tmp_path / "parts" / "metrics.jsonl")]
    assert rows == [r["iteration"] for r in read_metrics(tmp_path / "whole" / "metrics.jsonl")]
    # A complete run: nothing to do, exit 0; a run in the folder without --resume: refused.
    assert run(["finetune", "-o", str(tmp_path / "parts"), "--resume", "--quiet"]) == 0
    assert run(["finetune", *common, "-o", str(tmp_path / "parts"), "--iters", "4"]) == 2


def test_resume_keeps_the_split_and_accepts_the_effective_settings(dataset, weights, tmp_path, capsys, monkeypatch):
    grown = tmp_path / "grown"
    shutil.copytree(dataset, grown)
    run_dir = tmp_path / "run"
    assert run(["finetune", str(grown), "-o", str(run_dir), "--weights", str(weights), "--iters", "2", "--val-every", "2", "--batch", "1", *SMALL]) == 0
    split = json.loads((run_dir / "run.json").read_text())["split"]
    assert len(split["val"]) == 1
    # A case added to the dataset is not used; the validation case stays the same.
    for sub, suffix in (("imagesTr", "_0000"), ("labelsTr", "")):
        shutil.copy(grown / sub / f"colin{suffix}.nii.gz", grown / sub / f"added{suffix}.nii.gz")
    # Explicit values equal to the run's effective ones (the mode's default lr, the
    # contract's modality, the weights by another relative path) are accepted.
    monkeypatch.chdir(weights.parent.parent)
    relative = weights.relative_to(weights.parent.parent)
    assert run(["finetune", "-o", str(run_dir), "--resume", "--iters", "4", "--lr", "1e-4", "--modality", "mr", "--weights", str(relative)]) == 0
    err = capsys.readouterr().err
    assert "1 case(s) added since the run started are not used (added)" in err
    assert json.loads((run_dir / "run.json").read_text())["split"] == split
    assert run(["finetune", "-o", str(run_dir), "--resume", "--iters", "6", "--lr", "1e-3", "--quiet"]) == 2
    assert "--lr 0.001 differs from the run being resumed (0.0001)" in capsys.readouterr().err
    # A case of the run gone from the dataset: refused, naming it.
    (grown / "imagesTr" / f"{split['val'][0]}_0000.nii.gz").unlink()
    (grown / "labelsTr" / f"{split['val'][0]}.nii.gz").unlink()
    assert run(["finetune", "-o", str(run_dir), "--resume", "--iters", "6", "--quiet"]) == 2
    assert f"no longer holds 1 case(s) of the run being resumed: {split['val'][0]}" in capsys.readouterr().err


def test_val_every_zero_names_its_own_option(dataset, weights, tmp_path, capsys):
    assert run(["finetune", str(dataset), "-o", str(tmp_path / "r"), "--weights", str(weights), "--val-every", "0"]) == 2
    assert "--val-every must be >= 1, got 0" in capsys.readouterr().err


def test_time_limit_stops_with_a_validated_checkpoint(itk_folders, weights, tmp_path):
    images, labels = itk_folders
    run_dir = tmp_path / "limited"
    args = ["finetune", "--images", str(images), "--labels", str(labels), "--weights", str(weights), "-o", str(run_dir), "--batch", "1", "--log-every", "1", *SMALL]
    assert run([*args, "--iters", "5", "--val-every", "5", "--time-limit", "0.001"]) == 8  # stopped, not finished
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped"] == "time limit" and summary["iteration"] == 1 and summary["last"]["iteration"] == 1
    assert load_weights(run_dir / "last.pt").extra["training"]["iteration"] == 1


def test_several_processes_are_refused(itk_folders, weights, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    images, labels = itk_folders
    assert run(["finetune", "--images", str(images), "--labels", str(labels), "--weights", str(weights), "-o", str(tmp_path / "r")]) == 2
    assert "runs as one process on one device; torchrun launched 2 (WORLD_SIZE=2)" in capsys.readouterr().err


# --------------------------------------------------------------------------- dataset errors


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    return err


def _break_multichannel(root: Path) -> str:
    data = json.loads((root / "dataset.json").read_text())
    data["channel_names"] = {"0": "T1", "1": "T2"}
    (root / "dataset.json").write_text(json.dumps(data))
    return "single-channel datasets only"


def _break_second_channel_file(root: Path) -> str:
    shutil.copy(root / "imagesTr" / "icbm_0000.nii.gz", root / "imagesTr" / "icbm_0001.nii.gz")
    return "icbm_0001.nii.gz: channel 1"


def _break_missing_label(root: Path) -> str:
    (root / "labelsTr" / "icbm.nii.gz").unlink()
    return "icbm_0000.nii.gz: no label map for case icbm"


def _break_label_grid(root: Path) -> str:
    path = root / "labelsTr" / "icbm.nii.gz"
    image = sitk.ReadImage(str(path))
    sitk.WriteImage(image[:-1, :, :], str(path))
    return "labelsTr/icbm.nii.gz: label grid (97, 116, 94) does not match its image icbm_0000.nii.gz (98, 116, 94)"


def _break_label_origin(root: Path) -> str:
    path = root / "labelsTr" / "icbm.nii.gz"
    image = sitk.ReadImage(str(path))
    image.SetOrigin((0.0, 0.0, 0.0))
    sitk.WriteImage(image, str(path))
    return "labelsTr/icbm.nii.gz: label map is not on the grid of its image icbm_0000.nii.gz (origin (0.0, 0.0, 0.0) vs ("


def _break_label_values(root: Path) -> str:
    path = root / "labelsTr" / "colin.nii.gz"
    image = sitk.ReadImage(str(path))
    image[40, 50, 40] = 7
    sitk.WriteImage(image, str(path))
    return "labelsTr/colin.nii.gz: label value(s) 7 not in dataset.json's labels (0, 1, 2)"


def _break_non_integer_labels(root: Path) -> str:
    path = root / "labelsTr" / "colin.nii.gz"
    image = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32)
    image[40, 50, 40] = 0.5
    sitk.WriteImage(image, str(path))
    return "labelsTr/colin.nii.gz: label map holds non-integer values (1 voxels, e.g. 0.5)"


def _break_label_direction(root: Path) -> str:
    # Saved through numpy without its direction: same size, spacing and origin.
    path = root / "labelsTr" / "colin.nii.gz"
    image = sitk.ReadImage(str(path))
    image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(image, str(path))
    return "labelsTr/colin.nii.gz: label map is not on the grid of its image colin_0000.nii.gz (direction LPS vs RAS; label map's first)"


def _break_negative_labels(root: Path) -> str:
    path = root / "labelsTr" / "colin.nii.gz"
    image = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkInt16)
    image[40, 50, 40] = -1
    sitk.WriteImage(image, str(path))
    return "labelsTr/colin.nii.gz: label map holds the negative value -1"


@pytest.mark.parametrize(
    "breaker",
    [_break_multichannel, _break_second_channel_file, _break_missing_label, _break_label_grid, _break_label_origin, _break_label_values, _break_non_integer_labels, _break_label_direction, _break_negative_labels],
)
def test_dataset_errors_are_one_line_and_leave_no_run_folder(breaker, weights, tmp_path, capsys):
    root = make_dataset(tmp_path / "Dataset002_Broken")
    expected = breaker(root)
    run_dir = tmp_path / "run"
    assert run(["finetune", str(root), "-o", str(run_dir), "--weights", str(weights), "--iters", "2", *SMALL]) == 2
    assert expected in _one_line_error(capsys)
    assert not run_dir.exists()


def test_not_a_dataset_and_both_layouts_at_once_are_refused(dataset, itk_folders, weights, tmp_path, capsys):
    images, labels = itk_folders
    assert run(["finetune", str(images), "-o", str(tmp_path / "r"), "--weights", str(weights)]) == 2
    assert "no dataset.json" in _one_line_error(capsys)
    assert run(["finetune", str(dataset), "--images", str(images), "--labels", str(labels), "-o", str(tmp_path / "r"), "--weights", str(weights)]) == 2
    assert "not both" in _one_line_error(capsys)


# --------------------------------------------------------------------------- pieces


def test_dataset_json_v1_and_v2_give_the_same_label_set(tmp_path):
    v2, v1 = tmp_path / "v2.json", tmp_path / "v1.json"
    v2.write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "tumour": 2}}))
    v1.write_text(json.dumps({"modality": {"0": "CT"}, "labels": {"0": "background", "2": "tumour", "1": "liver"}}))
    assert read_dataset_json(v2) == read_dataset_json(v1) == LabelSet(("background", "liver", "tumour"), (0, 1, 2))
    region = tmp_path / "region.json"
    region.write_text(json.dumps({"labels": {"background": 0, "whole": [1, 2]}}))
    with pytest.raises(InputError, match="region"):
        read_dataset_json(region)


def test_two_folders_match_case_names_with_and_without_the_channel_suffix(itk_folders, tmp_path):
    cases, label_set = find_cases(images=itk_folders[0], labels=itk_folders[1])
    assert [c.name for c in cases] == ["knee"] and label_set is None
    # The same file name in both folders (CASE_0000.nii.gz) is a match too.
    shutil.copytree(itk_folders[0], tmp_path / "images")
    (tmp_path / "labels").mkdir()
    shutil.copy(itk_folders[1] / "knee.nii.gz", tmp_path / "labels" / "knee_0000.nii.gz")
    cases, _ = find_cases(images=tmp_path / "images", labels=tmp_path / "labels")
    assert [(c.name, c.label.name) for c in cases] == [("knee", "knee_0000.nii.gz")]


def test_split_is_deterministic_with_at_least_one_validation_case():
    names = [f"case{i:02d}" for i in range(10)]
    train, val = split_cases(names, 0.2, seed=3)
    assert len(val) == 2 and sorted(train + val) == names
    assert split_cases(list(reversed(names)), 0.2, seed=3) == (train, val)
    assert split_cases(names, 0.2, seed=4) != (train, val)
    assert len(split_cases(names[:2], 0.2, seed=0)[1]) == 1
    assert split_cases(names[:1], 0.2, seed=0) == (names[:1], [])


def test_patch_sampler_centres_a_third_of_the_patches_on_foreground():
    target = np.zeros((48, 48, 48), dtype=np.uint8)
    target[40:44, 4:8, 30:34] = 1  # a small structure far from the centre
    case = PreparedCase(name="a", image=np.random.default_rng(0).random((48, 48, 48), dtype=np.float32), values=np.empty(0), modality="mr", target=target)
    sampler = PatchSampler([case], (16, 16, 16), seed=0)
    hits = []
    for iteration in range(1, 301):
        images, targets = sampler.sample(iteration, 1)
        hits.append(bool(targets[0].any()))
    # A uniform patch holds part of this corner structure 3 % of the time; the forced ones
    # (one third) always do: about 0.36 in all.
    assert 0.28 < np.mean(hits) < 0.45
    again, _ = sampler.sample(7, 1)
    first, _ = PatchSampler([case], (16, 16, 16), seed=0).sample(7, 1)
    assert np.array_equal(again, first)


def test_augmented_patches_keep_images_and_labels_aligned(monkeypatch):
    # The image encodes its label (intensity = class / 4): after the random rotation and
    # scaling (trilinear for the image, nearest for the labels) they must still agree,
    # except on a thin layer along class boundaries. (Intensity changes off for this.)
    from gvsl_cli import finetuning
    from gvsl_cli.finetuning import FinetuneTask

    monkeypatch.setattr(finetuning, "BRIGHTNESS_PROBABILITY", 0.0)
    monkeypatch.setattr(finetuning, "GAMMA_PROBABILITY", 0.0)

    z, y, x = np.mgrid[:64, :64, :64]
    target = ((z // 8 + y // 16 + x // 32) % 3).astype(np.uint8)
    case = PreparedCase(name="a", image=(target / 4.0).astype(np.float32), values=np.empty(0), modality="mr", target=target)
    sampler = PatchSampler([case], (32, 32, 32), seed=0, margin=4)
    task = FinetuneTask(sampler, 2, seed=0, device=torch.device("cpu"), augment=True)
    plain = FinetuneTask(PatchSampler([case], (32, 32, 32), seed=0, margin=4), 2, seed=0, device=torch.device("cpu"), augment=False)
    for iteration in (1, 2, 3):
        images, targets = task.batch(iteration)
        assert images.shape == (2, 1, 32, 32, 32) and targets.shape == (2, 32, 32, 32) and targets.dtype == torch.int64
        agree = (images[:, 0] - targets / 4.0).abs() < 0.05
        assert agree.float().mean() > 0.8
        # ...and it did move voxels: the centre of the un-augmented crop (patch + margins) differs.
        region, _ = plain.batch(iteration)
        assert region.shape == (2, 1, 40, 40, 40)
        assert not torch.allclose(images, region[:, :, 4:36, 4:36, 4:36], atol=1e-3)


def test_intensity_augmentation_keeps_the_range_and_order_and_is_seeded():
    from gvsl_cli.finetuning import augment_intensities

    images = torch.linspace(0.0, 1.0, 8 * 4**3).view(8, 1, 4, 4, 4)
    out = augment_intensities(images, torch.Generator().manual_seed(0))
    again = augment_intensities(images, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    flat_in, flat_out = images.view(8, -1), out.view(8, -1)
    assert (flat_out.diff(dim=1) >= 0).all()  # monotone: tissue contrast keeps its order
    changed = ~torch.isclose(flat_out, flat_in, atol=1e-6).all(dim=1)
    assert 0 < int(changed.sum()) < 8  # some patches changed (probabilities 0.3 each), not all
    assert (flat_out.min(dim=1).values >= flat_in.min(dim=1).values * 0.75 - 1e-6).all()


def test_a_contract_that_does_not_fit_the_images_is_warned_about(itk_folders, tmp_path, capsys):
    # Official GVSL weights carry a CT contract; fine-tuned on MR as is, the HU window
    # would squeeze the MR intensities: the run says so (and still runs, as asked).
    torch.manual_seed(0)
    ct_weights = save_checkpoint(tmp_path / "ct.pt", GVSL(ModelConfig(width=8)), PreprocessConfig(spacing=4.0, modality="ct"))
    images, labels = itk_folders
    args = ["finetune", "--images", str(images), "--labels", str(labels), "-o", str(tmp_path / "r"), "--iters", "1", "--val-every", "1", *SMALL]
    assert run([*args, "--weights", str(ct_weights)]) == 0
    assert "maps intensities as CT, but 1 of 1 case(s) look like MR (knee)" in capsys.readouterr().err
    assert run([*args, "--weights", str(ct_weights), "--modality", "mr", "-o", str(tmp_path / "r2")]) == 0
    assert "look like" not in capsys.readouterr().err


def test_a_class_no_case_holds_is_warned_about(weights, tmp_path, capsys):
    root = make_dataset(tmp_path / "Dataset002", labels={**LABELS, "csf": 3})  # _write_case removes value 3
    assert run(["finetune", str(root), "-o", str(tmp_path / "r"), "--weights", str(weights), "--iters", "1", "--val-every", "1", "--batch", "1", *SMALL]) == 0
    assert "warning: no case holds any voxel of csf" in capsys.readouterr().err


def test_default_compile_trains_compiled_with_the_warm_up_graphs_and_plain_checkpoints(itk_folders, weights, tmp_path, monkeypatch):
    from gvsl_cli import training

    images, labels = itk_folders
    common = ["--images", str(images), "--labels", str(labels), "--weights", str(weights), "--val-every", "2", "--batch", "1", "--iters", "2", *SMALL]
    monkeypatch.setattr(training, "_compile_by_default", lambda device, iterations: True)  # as on a GPU
    # The trial step must compile the graphs the training step uses: no second compile.
    # (dynamo's own patch: monkeypatch's undo deletes a torch config entry.)
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert run(["finetune", *common, "-o", str(tmp_path / "compiled")]) == 0
    assert json.loads((tmp_path / "compiled" / "summary.json").read_text(encoding="utf-8"))["compiled"] is True
    assert run(["finetune", *common, "-o", str(tmp_path / "plain"), "--no-compile"]) == 0
    assert json.loads((tmp_path / "plain" / "summary.json").read_text(encoding="utf-8"))["compiled"] is False
    compiled = load_weights(tmp_path / "compiled" / "last.pt")
    plain = load_weights(tmp_path / "plain" / "last.pt").state_dict
    assert set(compiled.state_dict) == set(plain)  # no "_orig_mod." keys
    # The trial step changed nothing: the same losses as the plain run, up to the compiler's rounding.
    ours = [r["loss"] for r in read_metrics(tmp_path / "compiled" / "metrics.jsonl") if "loss" in r]
    reference = [r["loss"] for r in read_metrics(tmp_path / "plain" / "metrics.jsonl") if "loss" in r]
    assert len(ours) == len(reference) == 2
    assert all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(ours, reference))


def test_a_failing_compiler_falls_back_to_eager_unless_compile_was_asked_for(itk_folders, weights, tmp_path, monkeypatch, capsys, broken_compiler):
    from gvsl_cli import training

    images, labels = itk_folders
    common = ["--images", str(images), "--labels", str(labels), "--weights", str(weights), "--val-every", "1", "--batch", "1", "--iters", "1", *SMALL]
    monkeypatch.setattr(training, "_compile_by_default", lambda device, iterations: True)  # as on a GPU
    assert run(["finetune", *common, "-o", str(tmp_path / "fallback")]) == 0
    assert json.loads((tmp_path / "fallback" / "summary.json").read_text(encoding="utf-8"))["compiled"] is False
    assert "warning: torch.compile failed on this machine (RuntimeError: no C compiler found); training without it" in capsys.readouterr().err
    assert run(["finetune", *common, "-o", str(tmp_path / "explicit"), "--compile"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: --compile: torch.compile failed on this machine (RuntimeError: no C compiler found) (hint: run without --compile)"
    assert not (tmp_path / "explicit" / "last.pt").exists()


def test_folds_validate_every_case_exactly_once():
    names = [f"case{i:02d}" for i in range(12)]
    validated = []
    for fold in range(5):
        train, val = fold_split(names, fold, 5, seed=0)
        assert sorted(train + val) == names and not set(train) & set(val)
        assert len(val) in (2, 3)  # 12 cases in 5 folds: sizes differ by one at most
        validated += val
        assert fold_split(list(reversed(names)), fold, 5, seed=0) == (train, val)  # file order does not matter
    assert sorted(validated) == names
    assert fold_split(names, 0, 5, seed=1) != fold_split(names, 0, 5, seed=0)
    with pytest.raises(InputError, match="needs at least 5 cases; the dataset has 3"):
        fold_split(names[:3], 0, 5, seed=0)
    with pytest.raises(InputError, match=r"--fold must be in 0..4"):
        fold_split(names, 5, 5, seed=0)


def test_nnunet_splits_file_is_read_and_checked(tmp_path):
    good = tmp_path / "splits_final.json"
    good.write_text(json.dumps([{"train": ["b", "a"], "val": ["c"]}, {"train": ["c"], "val": ["a", "b"]}]), encoding="utf-8")
    assert read_split_file(good, 0) == (["a", "b"], ["c"])
    assert read_split_file(good, 1) == (["c"], ["a", "b"])
    with pytest.raises(InputError, match=r"holds folds 0..1, not --fold 2"):
        read_split_file(good, 2)
    bad = tmp_path / "bad.json"
    for text in ('{"train": ["a"]}', "[]", '[{"train": ["a"], "val": [1]}]', "not json"):
        bad.write_text(text, encoding="utf-8")
        with pytest.raises(InputError, match="not an nnU-Net splits file|cannot read the splits file"):
            read_split_file(bad, 0)


def test_finetune_validates_on_the_fold_of_an_nnunet_splits_file(dataset, weights, tmp_path, capsys):
    splits = tmp_path / "splits_final.json"
    splits.write_text(json.dumps([{"train": ["colin"], "val": ["icbm"]}, {"train": ["icbm"], "val": ["colin"]}]), encoding="utf-8")
    common = ["finetune", str(dataset), "--weights", str(weights), "--iters", "2", "--val-every", "2", *SMALL]
    for fold, val in ((0, ["icbm"]), (1, ["colin"])):
        run_dir = tmp_path / f"fold{fold}"
        assert run([*common, "-o", str(run_dir), "--splits", str(splits), "--fold", str(fold)]) == 0
        assert json.loads((run_dir / "run.json").read_text())["split"] == {"train": [n for n in ("colin", "icbm") if n not in val], "val": val}
        assert load_weights(run_dir / "best.pt").extra["segmentation"]["split"]["val"] == val
    # Our own folds: 2 cases in 2 folds validate each case once.
    own = [json.loads((tmp_path / f"own{k}" / "run.json").read_text())["split"]["val"] for k in (0, 1) if run([*common, "-o", str(tmp_path / f"own{k}"), "--fold", str(k), "--folds", "2"]) == 0]
    assert sorted(own) == [["colin"], ["icbm"]]
    capsys.readouterr()
    wrong = tmp_path / "other_dataset_splits.json"
    wrong.write_text(json.dumps([{"train": ["colin"], "val": ["liver_007"]}]), encoding="utf-8")
    refusals = (
        (["--splits", str(wrong), "--fold", "0"], f"the dataset does not hold 1 case(s) of {wrong} fold 0: liver_007"),
        (["--splits", str(splits)], "--splits needs --fold"),
        (["--fold", "0", "--val-fraction", "0.5"], "--fold and --val-fraction both choose the validation cases"),
        (["--fold", "2", "--folds", "2"], "--fold must be in 0..1 (with --folds 2), got 2"),
        (["--fold", "0"], "5-fold cross-validation needs at least 5 cases; the dataset has 2"),
    )
    for extra, said in refusals:
        assert run([*common, "-o", str(tmp_path / "refused"), *extra]) == 2, extra
        assert said in _one_line_error(capsys)
        assert not (tmp_path / "refused").exists()


def test_a_run_folder_of_the_other_command_is_named_as_such(dataset, weights, tmp_path, capsys):
    finetune_run, pretrain_run = tmp_path / "ft", tmp_path / "pt"
    assert run(["finetune", str(dataset), "-o", str(finetune_run), "--weights", str(weights), "--iters", "1", "--val-every", "1", *SMALL]) == 0
    assert run(["pretrain", str(EXAMPLES), "-o", str(pretrain_run), "--width", "8", "--patch", "32", "--spacing", "4", "--iters", "1", "--workers", "1", "--cache-dir", str(tmp_path / "cache"), "--quiet"]) == 0
    before = {p.name: p.read_bytes() for p in finetune_run.iterdir()}
    capsys.readouterr()
    cases = (
        (["pretrain", "-o", str(finetune_run), "--resume"], f"error: --resume: {finetune_run} holds a gvsl finetune run, not a pretrain run (hint: continue it with gvsl finetune --resume, or choose another -o)"),
        (["pretrain", str(EXAMPLES), "-o", str(finetune_run), "--cache-dir", str(tmp_path / "cache")], f"error: {finetune_run} already holds a gvsl finetune run (last.pt) (hint: it is a gvsl finetune run: choose another -o)"),
        (["finetune", "-o", str(pretrain_run), "--resume"], f"error: --resume: {pretrain_run} holds a gvsl pretrain run, not a finetune run (hint: continue it with gvsl pretrain --resume, or choose another -o)"),
    )
    for args, said in cases:
        assert run(args) == 2, args
        assert _one_line_error(capsys) == said
    assert {p.name: p.read_bytes() for p in finetune_run.iterdir()} == before  # untouched


def test_the_summary_prints_the_best_model_path_whole_in_a_log(itk_folders, weights, tmp_path, capsys, monkeypatch):
    # Off a terminal (SLURM logs, | tee) the path a user copies into gvsl segment must not be
    # wrapped at the table's width.
    images, labels = itk_folders
    monkeypatch.chdir(tmp_path)
    relative = Path("a_rather_long_project_name_" * 4) / "experiment_2026_11_26_width8_spacing4_finetune"
    run_dir = tmp_path / relative
    args = ["finetune", "--images", str(images), "--labels", str(labels), "--weights", str(weights), "-o", str(relative),
            "--batch", "1", "--iters", "1", "--val-every", "1", "--patch", "32", "--overlap", "0"]
    assert run(args) == 0
    assert f"best model: {run_dir / 'best.pt'}" in capsys.readouterr().out.splitlines()
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    assert summary["best_checkpoint"] == str(run_dir / "best.pt") and Path(summary["run_dir"]).is_absolute()


def test_segment_with_last_pt_shows_its_validation_dice(trained_run, tmp_path):
    from gvsl_cli.segmentation import load_segmenter

    last = load_segmenter(str(trained_run / "last.pt"))
    rows = read_metrics(trained_run / "metrics.jsonl")
    final = [r for r in rows if "val_mean_dice" in r and r["iteration"] == ITERS][0]
    assert last.trained_for == ITERS and last.validation_dice == pytest.approx(final["val_mean_dice"])


def test_starting_from_a_segmentation_model_says_its_head_is_not_used(trained_run, dataset, tmp_path, capsys):
    args = ["finetune", str(dataset), "--weights", str(trained_run / "best.pt"), "-o", str(tmp_path / "again"),
            "--iters", "1", "--val-every", "1", "--patch", "32", "--overlap", "0"]
    assert run(args) == 0
    err = capsys.readouterr().err
    assert f"note: {trained_run / 'best.pt'} is a segmentation model (background=0, white_matter=1, grey_matter=2); its U-Net is the start, its head is not used" in err


def test_a_run_folder_in_use_is_refused_untouched_and_free_again_after(itk_folders, weights, tmp_path, capsys, monkeypatch):
    import os
    import socket

    from run_folder_holder import folder_state, held_run_folder, lock_seen_while_training

    from gvsl_cli import finetuning
    from gvsl_cli.training import RUN_LOCK_FILE

    images, labels = itk_folders
    run_dir = tmp_path / "run"
    common = ["--images", str(images), "--labels", str(labels), "--val-every", "2", "--batch", "1", *SMALL]
    assert run(["finetune", *common, "--weights", str(weights), "-o", str(run_dir), "--iters", "2"]) == 0
    before = folder_state(run_dir)
    capsys.readouterr()
    with held_run_folder(run_dir, "gvsl finetune (pid 4242 on node7)"):
        held = folder_state(run_dir)
        for args in (["finetune", *common, "--mode", "scratch", "--width", "8", "-o", str(run_dir), "--iters", "2"],
                     ["finetune", "-o", str(run_dir), "--resume", "--iters", "4", "--quiet"]):
            code = run(args)
            err = capsys.readouterr().err.strip().splitlines()
            assert code == 2 and err == [f"error: {run_dir}: another gvsl finetune (pid 4242 on node7) is running in this run folder (hint: wait for it to finish, or choose another -o)"], err
            assert folder_state(run_dir) == held
    assert folder_state(run_dir) == before

    seen = lock_seen_while_training(monkeypatch, finetuning, run_dir)
    assert run(["finetune", "-o", str(run_dir), "--resume", "--iters", "4", "--quiet"]) == 0
    assert seen == [False, f"gvsl finetune (pid {os.getpid()} on {socket.gethostname()})\n"]
    assert not (run_dir / RUN_LOCK_FILE).exists()
    assert load_weights(run_dir / "last.pt").extra["training"]["iteration"] == 4


# --------------------------------------------------------------------------- case names and label coverage


def _tiny_volume(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.Image(4, 4, 4, sitk.sitkUInt8), str(path))


def _pairs(images: list[str], labels: list[str], root: Path):
    """find_cases on tiny files ``images`` in root/imgs and ``labels`` in root/labs."""
    for name in images:
        _tiny_volume(root / "imgs" / name)
    for name in labels:
        _tiny_volume(root / "labs" / name)
    cases, _ = find_cases(images=root / "imgs", labels=root / "labs")
    return [(c.name, c.image.relative_to((root / "imgs").resolve()).as_posix(), c.label.relative_to((root / "labs").resolve()).as_posix()) for c in cases]


def test_numbered_case_names_are_not_taken_for_channels(tmp_path):
    # AMOS-style numbered cases, the same file name in both folders: whole names, no channels.
    assert _pairs(["sub_0001.nii.gz", "sub_0002.nii.gz"], ["sub_0001.nii.gz", "sub_0002.nii.gz"], tmp_path / "a") == [
        ("sub_0001", "sub_0001.nii.gz", "sub_0001.nii.gz"), ("sub_0002", "sub_0002.nii.gz", "sub_0002.nii.gz")]
    zero_based = ["sub_0000.nii.gz", "sub_0001.nii.gz", "sub_0002.nii.gz"]
    assert [name for name, _, _ in _pairs(zero_based, zero_based, tmp_path / "b")] == ["sub_0000", "sub_0001", "sub_0002"]
    # nnU-Net's naming still reads as such: CASE_0000 / CASE, and CASE_0000 in both folders.
    assert _pairs(["liver_3_0000.nii.gz", "liver_4_0000.nii.gz"], ["liver_3.nii.gz", "liver_4.nii.gz"], tmp_path / "c") == [
        ("liver_3", "liver_3_0000.nii.gz", "liver_3.nii.gz"), ("liver_4", "liver_4_0000.nii.gz", "liver_4.nii.gz")]
    assert [name for name, _, _ in _pairs(["knee_0000.nii.gz"], ["knee_0000.nii.gz"], tmp_path / "d")] == ["knee"]
    # A real multi-channel case (two images, one label map CASE) keeps its clear refusal.
    with pytest.raises(InputError, match=r"ct_0001.nii.gz: channel 1 of case ct .*single-channel datasets only"):
        _pairs(["ct_0000.nii.gz", "ct_0001.nii.gz"], ["ct.nii.gz"], tmp_path / "e")
    with pytest.raises(InputError, match=r"sub_0003.nii.gz: no label map for case sub_0003 .*looked for sub_0003\.\*"):
        _pairs(["sub_0002.nii.gz", "sub_0003.nii.gz"], ["sub_0002.nii.gz"], tmp_path / "f")


def test_a_folder_per_patient_pairs_by_the_path_below_each_folder(tmp_path):
    # The layout gvsl segment writes (seg/p01/ct.nii.gz): predict, correct, retrain.
    layout = ["p01/ct.nii.gz", "p02/ct.nii.gz"]
    assert _pairs(layout, layout, tmp_path / "a") == [("p01/ct", "p01/ct.nii.gz", "p01/ct.nii.gz"), ("p02/ct", "p02/ct.nii.gz", "p02/ct.nii.gz")]
    assert _pairs(["p01/ct_0000.nii.gz", "p02/ct_0000.nii.gz"], ["p01/ct.nii.gz", "p02/ct.nii.gz"], tmp_path / "b")[0] == ("p01/ct", "p01/ct_0000.nii.gz", "p01/ct.nii.gz")
    # Unique file names: sub-folders do not matter (as before).
    assert _pairs(["x.nii.gz"], ["train/x.nii.gz"], tmp_path / "c") == [("x", "x.nii.gz", "train/x.nii.gz")]
    # Repeated names that do not pair: the message names the image's full path and says how it matched.
    with pytest.raises(InputError) as error:
        _pairs(layout, ["p01/ct.nii.gz", "p03/ct.nii.gz"], tmp_path / "d")
    assert f"{(tmp_path / 'd' / 'imgs' / 'p02' / 'ct.nii.gz').resolve()}: no label map for case p02/ct" in str(error.value)
    assert "the path below each folder (file names repeat)" in str(error.value)
    # One case twice (two volume formats): both full paths.
    with pytest.raises(InputError, match="case p01/ct appears twice in ") as error:
        _pairs([*layout, "p01/ct.mha"], layout, tmp_path / "e")
    assert all(str((tmp_path / "e" / "imgs" / "p01" / name).resolve()) in str(error.value) for name in ("ct.mha", "ct.nii.gz"))


def test_a_v1_training_list_gives_the_cases(tmp_path):
    root = tmp_path / "Dataset010_Amos"
    for name in ("imagesTr/amos_0001.nii.gz", "imagesTr/amos_0005_0000.nii.gz", "labelsTr/amos_0001.nii.gz", "labelsTr/amos_0005.nii.gz", "imagesTr/._amos_0001.nii.gz"):
        _tiny_volume(root / name)
    # The list names amos_0005's image without the _0000 its file has (nnU-Net v1); the
    # macOS "._" file next to the images is not listed, so not read.
    training = [{"image": "./imagesTr/amos_0001.nii.gz", "label": "./labelsTr/amos_0001.nii.gz"}, {"image": "./imagesTr/amos_0005.nii.gz", "label": "./labelsTr/amos_0005.nii.gz"}]
    (root / "dataset.json").write_text(json.dumps({"modality": {"0": "CT"}, "labels": {"0": "background", "1": "spleen"}, "training": training}))
    cases, label_set = find_cases(root)
    assert [(c.name, c.image.name, c.label.name) for c in cases] == [("amos_0001", "amos_0001.nii.gz", "amos_0001.nii.gz"), ("amos_0005", "amos_0005_0000.nii.gz", "amos_0005.nii.gz")]
    assert label_set.values == (0, 1)
    training.append({"image": "./imagesTr/amos_0009.nii.gz", "label": "./labelsTr/amos_0009.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"modality": {"0": "CT"}, "labels": {"0": "background", "1": "spleen"}, "training": training}))
    with pytest.raises(InputError, match=r"\"training\" entry 2 names .*imagesTr/amos_0009.nii.gz, which does not exist"):
        find_cases(root)


def _labelled_folders(root: Path, image_names: tuple[str, str], label_names: tuple[str, str], *, dot: bool = False) -> tuple[Path, Path]:
    """Colin27 and ICBM152 (2 mm) as --images/--labels folders under the given file names;
    values 2 (WM), 7 (GM), 255 (CSF, Colin27 only); ``dot``: Colin27 also holds one voxel
    of 11 (2 mm: it vanishes at 4 mm)."""
    sources = [("colin27_t1_2mm", "colin27_tissue_2mm", {1: 2, 2: 7, 3: 255}), ("icbm152_t1_2mm", "icbm152_tissue_2mm", {1: 2, 2: 7})]
    for (t1, tissue, mapping), image_name, label_name in zip(sources, image_names, label_names):
        for path in (root / "imgs" / image_name, root / "labs" / label_name):
            path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(sitk.ReadImage(str(EXAMPLES / f"{t1}.nii.gz")), str(root / "imgs" / image_name))
        label = sitk.ReadImage(str(EXAMPLES / f"{tissue}.nii.gz"))
        tissue_values = sitk.GetArrayFromImage(label)
        values = np.zeros(tissue_values.shape, dtype=np.uint8)
        for old, new in mapping.items():
            values[tissue_values == old] = new
        if dot and "colin" in t1:
            values[40, 50, 40] = 11
        out = sitk.GetImageFromArray(values)
        out.CopyInformation(label)
        sitk.WriteImage(out, str(root / "labs" / label_name))
    return root / "imgs", root / "labs"


SCRATCH = ["--mode", "scratch", "--width", "8", "--spacing", "4", "--modality", "mr", "--iters", "2", "--val-every", "2", "--batch", "1", *SMALL]


def test_a_numbered_two_folder_dataset_trains(tmp_path, capsys):
    images, labels = _labelled_folders(tmp_path, ("sub_0001.nii.gz", "sub_0002.nii.gz"), ("sub_0001.nii.gz", "sub_0002.nii.gz"))
    assert run(["finetune", "--images", str(images), "--labels", str(labels), "-o", str(tmp_path / "run"), *SCRATCH]) == 0, capsys.readouterr().err
    assert set(json.loads((tmp_path / "run" / "run.json").read_text())["cases"]) == {"sub_0001", "sub_0002"}


def test_label_values_come_from_the_files_and_a_class_erased_by_resampling_is_warned_about(tmp_path, capsys):
    # A one-voxel structure (11) at 2 mm vanishes on the 4 mm grid; 255 is in Colin27 alone,
    # which --seed 0 puts into validation.
    images, labels = _labelled_folders(tmp_path, ("colin.nii.gz", "icbm.nii.gz"), ("colin.nii.gz", "icbm.nii.gz"), dot=True)
    assert run(["finetune", "--images", str(images), "--labels", str(labels), "-o", str(tmp_path / "run"), *SCRATCH]) == 0
    err = capsys.readouterr().err
    # The model keeps the class: segment can write it.
    assert load_weights(tmp_path / "run" / "best.pt").extra["segmentation"]["label_values"] == [0, 2, 7, 11, 255]
    assert "warning: label_11 (11) is present in colin but vanishes at 4 mm" in err and "the model cannot learn it" in err
    assert "warning: no training case holds label_255 (255), only the validation case(s) colin" in err
    assert "no case holds any voxel" not in err


def test_dataset_json_classes_are_checked_against_the_label_files_not_the_resampled_maps(tmp_path, capsys):
    from gvsl_cli.finetuning import coverage_warnings, split_warnings
    from gvsl_cli.segmentation_data import prepare_cases

    images, labels = _labelled_folders(tmp_path, ("colin.nii.gz", "icbm.nii.gz"), ("colin.nii.gz", "icbm.nii.gz"), dot=True)
    label_set = LabelSet.from_dict({"background": 0, "wm": 2, "gm": 7, "dot": 11, "csf": 255, "tumour": 12})
    cases, _ = find_cases(images=images, labels=labels)
    prepared, label_set = prepare_cases(cases, PreprocessConfig(spacing=4.0, modality="mr"), label_set)
    warnings = coverage_warnings(prepared, label_set, 4.0)
    assert warnings[0].startswith("warning: no case holds any voxel of tumour:")  # 12: in no file
    assert warnings[1].startswith("warning: dot (11) is present in colin but vanishes at 4 mm")
    assert len(warnings) == 2
    colin, icbm = prepared
    assert split_warnings([colin], [icbm], label_set) == []
    assert [w.split(":")[1] for w in split_warnings([icbm], [colin], label_set)] == [" no training case holds csf (255), only the validation case(s) colin"]


def _brain_folders(root: Path, *, empty: tuple[str, ...] = ()) -> None:
    """``root/images`` and ``root/labels`` with the colin and icbm cases; the label maps of
    the cases in ``empty`` are background only."""
    (root / "images").mkdir()
    (root / "labels").mkdir()
    for name, source in (("colin", "colin27_tissue_2mm.nii.gz"), ("icbm", "icbm152_tissue_2mm.nii.gz")):
        shutil.copy(EXAMPLES / source.replace("tissue", "t1"), root / "images" / f"{name}.nii.gz")
        labels = sitk.ReadImage(str(EXAMPLES / source))
        sitk.WriteImage(labels * 0 if name in empty else labels, str(root / "labels" / f"{name}.nii.gz"))


def test_label_maps_that_are_all_background_are_named_as_such(weights, tmp_path, capsys):
    _brain_folders(tmp_path, empty=("colin", "icbm"))
    code = run(["finetune", "--images", str(tmp_path / "images"), "--labels", str(tmp_path / "labels"), "-o", str(tmp_path / "run"), "--weights", str(weights), "--iters", "2", *SMALL])
    assert code == 2
    assert _one_line_error(capsys).startswith("error: no label map holds a foreground voxel: all 2 are background (0) only")
    assert not (tmp_path / "run").exists()


def test_a_plain_resume_keeps_the_runs_validation_interval_and_time_limit(dataset, weights, tmp_path):
    from gvsl_cli.checkpoint import load_weights

    run_dir = tmp_path / "run"
    assert run(["finetune", str(dataset), "-o", str(run_dir), "--weights", str(weights), "--iters", "2", "--val-every", "1", "--time-limit", "2h", *SMALL]) == 0
    schedule = {"val_every": 1, "log_every": 10, "time_limit_s": 7200.0}
    assert load_weights(run_dir / "last.pt").extra["schedule"] == schedule
    assert run(["finetune", "-o", str(run_dir), "--resume", "--iters", "3", *SMALL]) == 0
    assert load_weights(run_dir / "last.pt").extra["schedule"] == schedule


def test_validation_without_foreground_makes_best_follow_the_latest_validation(weights, tmp_path, capsys):
    # Every validation's mean Dice is 0 there: "best" would stay the untrained start.
    from gvsl_cli.checkpoint import load_weights

    _brain_folders(tmp_path, empty=("icbm",))
    (tmp_path / "splits_final.json").write_text(json.dumps([{"train": ["colin"], "val": ["icbm"]}]))
    run_dir = tmp_path / "run"
    code = run(["finetune", "--images", str(tmp_path / "images"), "--labels", str(tmp_path / "labels"), "-o", str(run_dir), "--weights", str(weights),
                "--splits", str(tmp_path / "splits_final.json"), "--fold", "0", "--iters", "2", "--val-every", "1", "--patch", "32", "--overlap", "0"])
    assert code == 0
    assert "warning: the validation case(s) icbm hold no foreground voxel: Dice cannot choose a best model, so best.pt follows the latest validation" in capsys.readouterr().err
    assert load_weights(run_dir / "best.pt").extra["iteration"] == 2


def _as_an_older_run(checkpoint: Path, dropped_value: int) -> None:
    """Rewrite a finetune checkpoint as a run begun before the classes came from the label
    files as read would have it: without the class ``dropped_value`` (its head output
    removed), as if it had vanished in resampling."""
    data = torch.load(checkpoint, map_location="cpu", weights_only=True)
    meta = data["segmentation"]
    index = meta["label_values"].index(dropped_value)
    keep = [k for k in range(len(meta["label_values"])) if k != index]
    meta["label_names"] = [meta["label_names"][k] for k in keep]
    meta["label_values"] = [meta["label_values"][k] for k in keep]
    meta["labels"] = dict(zip(meta["label_names"], meta["label_values"]))
    for key in ("head.weight", "head.bias"):
        data["state_dict"][key] = data["state_dict"][key][keep].clone()
    optimizer = data["training"]["optimizer"]
    for param in optimizer["param_groups"][0]["params"][-2:]:  # the head's weight and bias, last
        for key in ("exp_avg", "exp_avg_sq"):
            optimizer["state"][param][key] = optimizer["state"][param][key][keep].clone()
    torch.save(data, checkpoint)


def test_an_older_run_whose_classes_lost_a_voxel_sized_structure_resumes(tmp_path, capsys):
    # Colin27's one voxel of 11 vanishes at 4 mm: a run begun before the classes came from
    # the label files has no class 11; the data now has one.
    images, labels = _labelled_folders(tmp_path, ("colin.nii.gz", "icbm.nii.gz"), ("colin.nii.gz", "icbm.nii.gz"), dot=True)
    run_dir = tmp_path / "run"
    assert run(["finetune", "--images", str(images), "--labels", str(labels), "-o", str(run_dir), *SCRATCH]) == 0
    shutil.copytree(run_dir, tmp_path / "other")
    _as_an_older_run(run_dir / "last.pt", 11)
    capsys.readouterr()
    assert run(["finetune", "-o", str(run_dir), "--resume", "--iters", "4", "--log-every", "100"]) == 0
    err = capsys.readouterr().err
    assert "note: the run being resumed has no class for label_11 (11): it began before gvsl took the classes from the label files as read" in err
    assert "it vanishes at 4 mm in every case; it goes on with its own classes (background=0, label_2=2, label_7=7, label_255=255)" in err
    resumed = load_weights(run_dir / "last.pt")
    assert resumed.extra["training"]["iteration"] == 4
    assert resumed.extra["segmentation"]["label_values"] == [0, 2, 7, 255]
    assert json.loads((run_dir / "run.json").read_text())["labels"] == {"background": 0, "label_2": 2, "label_7": 7, "label_255": 255}
    # A class that is on the grid (7: grey matter) is no such leftover: refused, saying which.
    _as_an_older_run(tmp_path / "other" / "last.pt", 7)
    assert run(["finetune", "-o", str(tmp_path / "other"), "--resume", "--iters", "4", "--quiet"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the warning about 11
    assert error.startswith("error: the classes of the data ({'background': 0, 'label_2': 2, 'label_7': 7, 'label_11': 11, 'label_255': 255}) differ from the run being resumed")
    assert ": the data holds label_7 (7), which the run has no class for (hint: a run's classes cannot change" in error


# --------------------------------------------------------------------------- images given as labels (review_inputs_s14 I10)


def _write_pair(root: Path, name: str, labels: np.ndarray) -> None:
    """An image and a label map of ``labels`` (z, y, x) on the same 2 mm grid."""
    for folder, array in (("imgs", np.linspace(0, 1000, labels.size, dtype=np.float32).reshape(labels.shape)), ("labs", labels)):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((2.0, 2.0, 2.0))
        (root / folder).mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(root / folder / f"{name}.nii.gz"))


def test_a_label_map_that_looks_like_an_image_is_refused_and_parcellations_are_not(tmp_path):
    # An integer MR given as --labels trained a model of hundreds of classes; a count of
    # values cannot tell it from FreeSurfer's ~110 regions or TotalSegmentator's 117.
    from gvsl_cli.segmentation_data import prepare_cases

    contract = PreprocessConfig(spacing=4.0)
    rng = np.random.default_rng(0)
    mr = rng.integers(0, 150, size=(16, 16, 16)).astype(np.uint8)  # values change voxel to voxel
    _write_pair(tmp_path / "mr", "mr", mr)
    cases, label_set = find_cases(images=tmp_path / "mr" / "imgs", labels=tmp_path / "mr" / "labs")
    with pytest.raises(InputError, match=r"mr.nii.gz: holds 150 distinct values \(0..149\) that change from voxel to voxel .*looks like an image") as caught:
        prepare_cases(cases, contract, label_set, workers=1)
    assert "check --labels" in caught.value.hint
    # A parcellation: 112 regions of sparse values up to 2035, each a run of voxels.
    z, y, x = np.meshgrid(np.arange(16), np.arange(16), np.arange(16), indexing="ij")
    region = (z // 2) * 14 + (y * 14 // 16)  # 112 regions, constant along x
    values = np.concatenate([[0], np.arange(2, 60), np.arange(1001, 1035), np.arange(2001, 2020)])[:112]
    _write_pair(tmp_path / "fs", "aseg", values[region].astype(np.uint16))
    cases, label_set = find_cases(images=tmp_path / "fs" / "imgs", labels=tmp_path / "fs" / "labs")
    prepared, found = prepare_cases(cases, contract, label_set, workers=1)
    assert found.count == 112


@pytest.mark.parametrize(
    "options, words",
    [
        (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
        (["--workers", "-1"], "--workers must be >= 0, got -1"),
        (["--fold", "0", "--folds", "0"], "--folds must be >= 2, got 0"),
        (["--folds", "3"], "--folds needs --fold"),
        (["--seed", str(2**63)], "--seed must be in 0..9223372036854775807"),
    ],
)
def test_out_of_range_options_are_refused_before_any_work(options, words, tmp_path, capsys):
    code = run(["finetune", "--images", str(tmp_path / "i"), "--labels", str(tmp_path / "l"), "--mode", "scratch", "-o", str(tmp_path / "run"), *options])
    assert code == 2
    assert words in _one_line_error(capsys)
    assert not (tmp_path / "run").exists()
