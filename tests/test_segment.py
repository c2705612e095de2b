"""gvsl segment: label maps on each input's own grid, label values, skip/overwrite, failures.

Models here are made in the test (no training): a width-8 ``SegmentationNet`` saved as a
segmentation checkpoint, and a network with a known answer (a threshold on intensity) to
check the probability resampling back onto the input grid.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from gvsl_cli import data
from gvsl_cli.checkpoint import save_checkpoint
from gvsl_cli.cli import run
from gvsl_cli.config import ModelConfig, PreprocessConfig
from gvsl_cli.geometry import Geometry
from gvsl_cli.model import GVSL, SegmentationNet
from gvsl_cli.preprocess import prepare, to_original_grid
from gvsl_cli.segmentation import Segmenter, output_name, predict_logits, segment_image

EXAMPLES = Path(__file__).resolve().parent.parent / "gvsl_cli" / "examples"
SHARED = Path("/work/shared/data")
VALUES = [0, 1, 5]  # not consecutive: class index 2 is written as 5


def _segmentation_checkpoint(path: Path, *, favour: int | None = None) -> Path:
    torch.manual_seed(0)
    model = SegmentationNet(ModelConfig(width=8), len(VALUES))
    if favour is not None:
        with torch.no_grad():
            model.head.bias[favour] = 100.0
    meta = {"label_names": ["background", "a", "b"], "label_values": VALUES, "labels": dict(zip(["background", "a", "b"], VALUES)), "patch": [32, 32, 32]}
    return save_checkpoint(path, model, PreprocessConfig(spacing=6.0, modality="mr"), affine_trained=False, extra={"segmentation": meta})


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return _segmentation_checkpoint(tmp_path_factory.mktemp("model") / "best.pt")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Colin27 (x axis flipped, 2 mm, nnU-Net name) and the ITK T1 (2×2×3 mm) as a rotated MHA."""
    folder = tmp_path_factory.mktemp("inputs")
    shutil.copy(EXAMPLES / "colin27_t1_2mm.nii.gz", folder / "colin_0000.nii.gz")
    image = sitk.ReadImage(str(SHARED / "mr_itk_t1.nii.gz"))
    c, s = math.cos(0.3), math.sin(0.3)
    image.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    image.SetOrigin((12.5, -40.0, 7.0))
    sitk.WriteImage(image, str(folder / "itk.mha"))
    return folder


def test_labels_have_the_inputs_geometry_and_the_models_values(model_path, inputs, tmp_path):
    out = tmp_path / "out"
    assert run(["segment", str(inputs), "--model", str(model_path), "-o", str(out), "--overlap", "0", "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["colin.nii.gz", "itk.nii.gz", "segment.json"]
    for source, written in ((inputs / "colin_0000.nii.gz", out / "colin.nii.gz"), (inputs / "itk.mha", out / "itk.nii.gz")):
        image, labels = sitk.ReadImage(str(source)), sitk.ReadImage(str(written))
        assert Geometry.of(labels).is_close(Geometry.of(image), atol=1e-5)
        assert labels.GetPixelID() == sitk.sitkUInt8
        assert set(np.unique(sitk.GetArrayViewFromImage(labels))) <= set(VALUES)


def test_class_indices_are_written_as_label_values(inputs, tmp_path):
    model = _segmentation_checkpoint(tmp_path / "b.pt", favour=2)
    out = tmp_path / "out"
    assert run(["segment", str(inputs / "itk.mha"), "--model", str(model), "-o", str(out), "--overlap", "0", "--quiet"]) == 0
    assert np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "itk.nii.gz")))).tolist() == [5]


class _Threshold(torch.nn.Module):
    """Logits of a known answer: class 1 where the prepared intensity is above 0.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([-(x - 0.5) * 20, (x - 0.5) * 20], dim=1)


def test_probabilities_mapped_back_to_a_finer_rotated_grid_recover_the_shape():
    # A ball on a 1 mm grid rotated by 30°, segmented on the 2 mm canonical grid: linear
    # resampling of the class probabilities back onto the input grid, then argmax, recovers
    # it better than nearest-neighbour resampling of the canonical label map (staircases).
    size = 40
    z, y, x = np.mgrid[:size, :size, :size]
    ball = ((z - 19.5) ** 2 + (y - 21.0) ** 2 + (x - 18.0) ** 2) < 11.0**2
    image = sitk.GetImageFromArray(np.where(ball, 1024.0, -1024.0).astype(np.float32))
    c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    image.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    image.SetOrigin((3.0, -2.0, 1.0))
    segmenter = Segmenter(model=_Threshold(), preprocess=PreprocessConfig(spacing=2.0, modality="ct"), label_names=("background", "ball"), label_values=(0, 1), patch=(16, 16, 16), source="test")
    labels = segment_image(segmenter, image, device=torch.device("cpu"))
    assert Geometry.of(labels) == Geometry.of(image)

    def dice(found):
        return 2 * np.sum(found & ball) / (np.sum(found) + np.sum(ball))

    prepared = prepare(image, segmenter.preprocess)
    canonical = predict_logits(_Threshold(), prepared.array, patch=(16, 16, 16), device=torch.device("cpu")).argmax(0)
    label_map = sitk.GetImageFromArray(canonical.numpy().astype(np.uint8))
    prepared.grid.apply_to(label_map)
    nearest = sitk.GetArrayFromImage(to_original_grid(label_map, prepared.original, labels=True)) == 1
    ours = dice(sitk.GetArrayFromImage(labels) == 1)
    assert ours > 0.955 and ours > dice(nearest) + 0.015  # seen: 0.966 and 0.938


def test_existing_outputs_are_skipped_unless_overwrite(model_path, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    source = str(inputs / "colin_0000.nii.gz")
    assert run(["segment", source, "--model", str(model_path), "-o", str(out), "--overlap", "0", "--quiet"]) == 0
    target = out / "colin.nii.gz"
    target.write_bytes(b"placeholder")
    assert run(["segment", source, "--model", str(model_path), "-o", str(out), "--overlap", "0"]) == 0
    assert "skipped" in capsys.readouterr().err and target.read_bytes() == b"placeholder"
    assert run(["segment", source, "--model", str(model_path), "-o", str(out), "--overlap", "0", "--overwrite", "--quiet"]) == 0
    assert sitk.ReadImage(str(target)).GetSize() == (90, 108, 90)


def test_unreadable_input_is_one_line_the_others_are_done_and_the_exit_is_non_zero(model_path, inputs, tmp_path, capsys):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes((inputs / "colin_0000.nii.gz").read_bytes()[:2000])
    out = tmp_path / "out"
    assert run(["segment", str(broken), str(inputs / "itk.mha"), "--model", str(model_path), "-o", str(out), "--quiet"]) == 7
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"failed {broken}: ") and len(err) == 2 and err[1].startswith("error: 1 of 2 input(s)")
    assert sorted(p.name for p in out.iterdir()) == ["itk.nii.gz", "segment.json"]  # nothing half-written


def test_pretrained_weights_are_not_a_segmentation_model(inputs, tmp_path, capsys):
    weights = save_checkpoint(tmp_path / "gvsl.pt", GVSL(ModelConfig(width=8)), PreprocessConfig())
    assert run(["segment", str(inputs), "--model", str(weights), "-o", str(tmp_path / "out")]) == 3
    assert "not a segmentation model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_two_inputs_with_one_output_name_are_refused_before_any_work(model_path, inputs, tmp_path, capsys):
    # CASE_0000.nii.gz and CASE.nii.gz in one folder both give CASE.nii.gz (nnU-Net names).
    folder = tmp_path / "flat"
    folder.mkdir()
    shutil.copy(inputs / "colin_0000.nii.gz", folder / "colin_0000.nii.gz")
    shutil.copy(inputs / "colin_0000.nii.gz", folder / "colin.nii.gz")
    for given in ([str(folder)], [str(folder / "colin_0000.nii.gz"), str(folder / "colin.nii.gz")]):
        assert run(["segment", *given, "--model", str(model_path), "-o", str(tmp_path / "out")]) == 2
        assert "would both be written to" in capsys.readouterr().err
        assert not (tmp_path / "out").exists()


def _patients(inputs: Path, root: Path) -> Path:
    """root/p01/image.mha and root/p02/image.mha: one folder per patient, one file name
    (small noise volumes, 20³ voxels of 5 mm)."""
    rng = np.random.default_rng(0)
    for patient in ("p01", "p02"):
        (root / patient).mkdir(parents=True)
        image = sitk.GetImageFromArray(rng.uniform(0, 100, (20, 20, 20)).astype(np.float32))
        image.SetSpacing((5.0, 5.0, 5.0))
        sitk.WriteImage(image, str(root / patient / "image.mha"))
    return root


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_a_folder_per_patient_is_mirrored_and_resumes(model_path, inputs, tmp_path, capsys):
    ds = _patients(inputs, tmp_path / "ds")
    out = tmp_path / "out"
    args = ["segment", str(ds), "--model", str(model_path), "-o", str(out), "--overlap", "0", "--probabilities"]
    assert run([*args, "-q"]) == 0
    expected = ["p01/image.nii.gz", "p01/image_probabilities.nii.gz", "p02/image.nii.gz", "p02/image_probabilities.nii.gz"]
    assert [f for f in _files(out) if f.endswith(".nii.gz")] == expected
    first = (out / "p02" / "image.nii.gz").stat().st_mtime_ns
    (out / "p01" / "image_probabilities.nii.gz").unlink()  # p01 is not done any more
    assert run(args) == 0
    err = capsys.readouterr().err
    assert f"skipped {out / 'p02' / 'image.nii.gz'} (output exists" in err and f"written {out / 'p01' / 'image.nii.gz'}" in err
    assert (out / "p02" / "image.nii.gz").stat().st_mtime_ns == first
    assert [f for f in _files(out) if f.endswith(".nii.gz")] == expected
    # The same files given one by one (a glob, find | gvsl segment -) take the same names.
    assert run(["segment", str(ds / "p01" / "image.mha"), str(ds / "p02" / "image.mha"), "--model", str(model_path), "-o", str(tmp_path / "given"), "--overlap", "0", "-q"]) == 0
    assert [f for f in _files(tmp_path / "given") if f.endswith(".nii.gz")] == ["p01/image.nii.gz", "p02/image.nii.gz"]


def test_files_of_distinct_names_stay_flat_wherever_they_are(tmp_path):
    from gvsl_cli.data import Source, output_subfolders

    def loose(*paths):
        return output_subfolders([Source(tmp_path / p, Path(p).name, None) for p in paths], output_name)

    assert loose("a/x_0000.nii.gz", "b/c/y.mha") == ["", ""]  # as before: OUT/x.nii.gz, OUT/y.nii.gz
    assert loose("a/x_0000.nii.gz", "b/c/x.mha") == ["a", "b/c"]  # both x.nii.gz: mirrored
    in_folder = Source(tmp_path / "ds" / "p1" / "ct.nii.gz", "p1/ct", tmp_path / "ds")
    assert output_subfolders([in_folder, Source(tmp_path / "z.nii.gz", "z", None)], output_name) == ["p1", ""]


def test_output_names_follow_nnunet():
    assert output_name(Path("a/liver_003_0000.nii.gz")) == "liver_003.nii.gz"
    assert output_name(Path("b/case.mha")) == "case.nii.gz"
    assert output_name(Path("c/ct_0001.nrrd")) == "ct_0001.nii.gz"


def test_numbered_inputs_keep_their_numbers(tmp_path):
    from gvsl_cli.segmentation import plan_outputs

    def planned(*names):
        return [target.name for _, target in plan_outputs([tmp_path / n for n in names], tmp_path / "out")]

    # nnU-Net's imagesTs (one channel): _0000 dropped, as before.
    assert planned("ts/liver_3_0000.nii.gz", "ts/liver_4_0000.nii.gz") == ["liver_3.nii.gz", "liver_4.nii.gz"]
    # Zero-based numbered cases given together: sub_0000 is not taken for channel 0 of "sub".
    assert planned("num/sub_0000.nii.gz", "num/sub_0001.nii.gz", "num/sub_0002.nii.gz") == ["sub_0000.nii.gz", "sub_0001.nii.gz", "sub_0002.nii.gz"]
    # Another folder's sub_0001 says nothing about this folder's sub_0000.
    assert planned("a/sub_0000.nii.gz", "b/sub_0001.nii.gz") == ["sub.nii.gz", "sub_0001.nii.gz"]


def test_an_input_is_never_overwritten_by_its_label_map(model_path, tmp_path, capsys):
    # scan.nii.gz segmented into its own folder: the output name is the input's own name.
    folder = tmp_path / "ts"
    folder.mkdir()
    shutil.copy(EXAMPLES / "colin27_t1_2mm.nii.gz", folder / "scan.nii.gz")
    before = (folder / "scan.nii.gz").read_bytes()
    for extra in ([], ["--overwrite"]):
        assert run(["segment", str(folder), "--model", str(model_path), "-o", str(folder), "-q", *extra]) == 2
        assert "the output folder is (or holds) the input folder" in capsys.readouterr().err
        assert run(["segment", str(folder / "scan.nii.gz"), "--model", str(model_path), "-o", str(folder), "-q", *extra]) == 2
        assert "its label map would be written over it" in capsys.readouterr().err
    assert (folder / "scan.nii.gz").read_bytes() == before


def test_label_maps_in_an_output_folder_inside_the_inputs_are_not_inputs(model_path, inputs, tmp_path, capsys):
    folder = tmp_path / "ts"
    shutil.copytree(inputs, folder)
    out = folder / "pred"
    for _ in range(2):  # the second run finds the first run's label maps: not images, all skipped
        assert run(["segment", str(folder), "--model", str(model_path), "-o", str(out), "--overlap", "0"]) == 0
    err = capsys.readouterr().err
    assert err.count("skipped ") == 2 and "output exists" in err


def test_a_file_given_twice_is_not_a_failure_and_the_model_iteration_is_shown(inputs, tmp_path, capsys):
    torch.manual_seed(0)
    model = SegmentationNet(ModelConfig(width=8), len(VALUES))
    meta = {"label_names": ["background", "a", "b"], "label_values": VALUES, "patch": [32, 32, 32]}
    path = save_checkpoint(tmp_path / "best.pt", model, PreprocessConfig(spacing=6.0, modality="mr"), affine_trained=False, extra={"segmentation": meta, "iteration": 0, "validation": {"val_mean_dice": 0.25}})
    mha = str(inputs / "itk.mha")
    assert run(["segment", mha, mha, "--model", str(tmp_path), "-o", str(tmp_path / "out"), "--overlap", "0"]) == 0
    err = capsys.readouterr().err
    assert f"skipped {mha}: given more than once" in err
    assert "model from iteration 0; validation mean Dice 0.250" in err
    assert "warning: this model is untrained" in err


def test_other_commands_refuse_a_segmentation_model(model_path, inputs, tmp_path, capsys):
    assert run(["embed", str(inputs / "itk.mha"), "--weights", str(model_path), "-o", str(tmp_path / "e")]) == 3
    assert "is a gvsl finetune segmentation model, not GVSL pre-trained weights" in capsys.readouterr().err
    # register says so before reading the volumes, and creates no output folder.
    image = inputs / "colin_0000.nii.gz"
    assert run(["register", str(image), str(image), "--weights", str(model_path), "-o", str(tmp_path / "r")]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {model_path}: is a gvsl finetune segmentation model, not GVSL pre-trained weights (hint: use it with gvsl segment (or as --weights of gvsl finetune); give pre-trained weights here)"], err
    assert not (tmp_path / "r").exists()


def test_a_constant_image_is_reported_not_segmented(model_path, tmp_path, capsys):
    blank = sitk.Image([40, 40, 40], sitk.sitkFloat32)
    sitk.WriteImage(blank, str(tmp_path / "blank.nii.gz"))
    assert run(["segment", str(tmp_path / "blank.nii.gz"), "--model", str(model_path), "-o", str(tmp_path / "out"), "-q"]) == 7
    assert f"failed {tmp_path / 'blank.nii.gz'}: constant intensity (all voxels 0)" in capsys.readouterr().err
    assert not (tmp_path / "out" / "blank.nii.gz").exists()


def _constant_checkpoint(path: Path, logits: list[float], *, values=VALUES, spacing: float = 6.0) -> Path:
    """A model whose class logits are ``logits`` at every voxel (head weights zero)."""
    torch.manual_seed(0)
    model = SegmentationNet(ModelConfig(width=8), len(values))
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor(logits))
    names = ["background", "a", "b"][: len(values)]
    meta = {"label_names": names, "label_values": list(values), "labels": dict(zip(names, values)), "patch": [32, 32, 32]}
    return save_checkpoint(path, model, PreprocessConfig(spacing=spacing, modality="mr"), affine_trained=False, extra={"segmentation": meta})


def test_an_ensemble_averages_class_probabilities(inputs, tmp_path, capsys):
    sure_a = _constant_checkpoint(tmp_path / "sure_a.pt", [0.0, 100.0, 0.0])  # p(a) = 1
    leaning_b = _constant_checkpoint(tmp_path / "leaning_b.pt", [0.0, 99.0, 100.0])  # p(a) = 0.27, p(b) = 0.73
    image = inputs / "colin_0000.nii.gz"

    def label(*models: Path) -> set[int]:
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        args = ["segment", str(image), "-o", str(out), "--quiet"]
        for model in models:
            args += ["--model", str(model)]
        assert run(args) == 0
        return set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "colin.nii.gz")))).tolist())

    assert label(leaning_b) == {5}
    # Mean p(a) = (1 + 0.27 + 0.27) / 3 = 0.51 > mean p(b) = 0.49, although two of the three
    # models vote for b: probabilities are averaged, not votes.
    assert label(sure_a, leaning_b, leaning_b) == {1}
    assert label(leaning_b, leaning_b, sure_a) == {1}  # the order does not matter
    capsys.readouterr()
    other_labels = _constant_checkpoint(tmp_path / "two_classes.pt", [0.0, 1.0], values=[0, 1])
    other_grid = _constant_checkpoint(tmp_path / "coarse.pt", [0.0, 1.0, 0.0], spacing=8.0)
    for other, said in ((other_labels, "labels {'background': 0, 'a': 1} differ from"), (other_grid, "preprocessing")):
        assert run(["segment", str(image), "-o", str(tmp_path / "refused"), "--model", str(sure_a), "--model", str(other)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {other}: ") and said in err[0], err
        assert not (tmp_path / "refused").exists()


def test_probabilities_are_written_on_the_input_grid_and_sum_to_one(inputs, tmp_path):
    model = _constant_checkpoint(tmp_path / "leaning_b.pt", [0.0, 99.0, 100.0])  # softmax: 2e-44, 0.269, 0.731
    source = inputs / "itk.mha"
    out = tmp_path / "out"
    assert run(["segment", str(source), "--model", str(model), "-o", str(out), "--probabilities", "--quiet"]) == 0
    image, labels = sitk.ReadImage(str(source)), sitk.ReadImage(str(out / "itk.nii.gz"))
    probabilities = sitk.ReadImage(str(out / "itk_probabilities.nii.gz"))
    assert probabilities.GetNumberOfComponentsPerPixel() == 3 and probabilities.GetPixelID() == sitk.sitkVectorFloat32
    assert Geometry.of(probabilities).is_close(Geometry.of(image), atol=1e-5)
    values = sitk.GetArrayFromImage(probabilities)  # (z, y, x, 3)
    expected = torch.softmax(torch.tensor([0.0, 99.0, 100.0]), dim=0).numpy()
    assert np.allclose(values, expected, atol=1e-5)
    assert np.allclose(values.sum(axis=-1), 1.0, atol=1e-6)
    assert np.unique(sitk.GetArrayFromImage(labels)).tolist() == [5]  # class index 2, written as its value
    # A folder with label maps but without probabilities is not done for a --probabilities run.
    (out / "itk_probabilities.nii.gz").unlink()
    assert run(["segment", str(source), "--model", str(model), "-o", str(out), "--probabilities", "--quiet"]) == 0
    assert (out / "itk_probabilities.nii.gz").is_file()


def test_a_rerun_with_another_model_or_overlap_is_refused_and_overwrite_replaces(model_path, inputs, tmp_path, capsys):
    out, source = tmp_path / "out", str(inputs / "itk.mha")
    other = _constant_checkpoint(tmp_path / "other.pt", [0.0, 0.0, 100.0])  # all class b (5)
    assert run(["segment", source, "--model", str(model_path), "-o", str(out), "--overlap", "0", "-q"]) == 0
    record = json.loads((out / "segment.json").read_text())
    assert record["overlap"] == 0.0 and record["precision"] == "fp32" and record["probabilities"] is False
    assert record["models"][0]["model"] == str(model_path) and len(record["models"][0]["weights_checksum"]) == 16
    before = (out / "itk.nii.gz").read_bytes()
    for args, said in (
        (["--model", str(other), "--overlap", "0"], "other models (weights checksums"),
        (["--model", str(model_path)], "other --overlap (0.0 here, 0.5 given)"),
        (["--model", str(model_path), "--model", str(other), "--overlap", "0"], "other models"),  # an ensemble
    ):
        assert run(["segment", source, *args, "-o", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {out} holds label maps made with other") and said in err[0], err
        assert "--overwrite" in err[0]
    assert (out / "itk.nii.gz").read_bytes() == before
    # The same model from another path, and --probabilities added, are no mismatch.
    shutil.copy(model_path, tmp_path / "moved.pt")
    assert run(["segment", source, "--model", str(tmp_path / "moved.pt"), "-o", str(out), "--overlap", "0", "--probabilities", "-q"]) == 0
    assert (out / "itk_probabilities.nii.gz").is_file() and json.loads((out / "segment.json").read_text())["probabilities"] is True
    # --overwrite replaces: the other model's labels, its record; the earlier probabilities go.
    assert run(["segment", source, "--model", str(other), "-o", str(out), "--overlap", "0", "--overwrite", "-q"]) == 0
    assert capsys.readouterr().err == ""
    assert np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "itk.nii.gz")))).tolist() == [5]
    assert not (out / "itk_probabilities.nii.gz").exists()
    record = json.loads((out / "segment.json").read_text())
    assert record["models"][0]["model"] == str(other) and "replacing" not in record
    assert run(["segment", source, "--model", str(other), "-o", str(out), "--overlap", "0"]) == 0
    assert "skipped" in capsys.readouterr().err


def test_an_unfinished_overwrite_is_not_taken_as_done(model_path, inputs, tmp_path, capsys):
    ds = _patients(inputs, tmp_path / "ds")
    out = tmp_path / "out"
    other = _constant_checkpoint(tmp_path / "other.pt", [0.0, 0.0, 100.0])
    assert run(["segment", str(ds), "--model", str(model_path), "-o", str(out), "--overlap", "0", "-q"]) == 0
    # --overwrite with the other model on p01 and a new p03: p02's label map is still the first model's.
    shutil.copytree(ds / "p01", ds / "p03")
    assert run(["segment", str(ds / "p01" / "image.mha"), str(ds / "p03" / "image.mha"), "--model", str(other), "-o", str(out), "--overlap", "0", "--overwrite", "-q"]) == 0
    err = capsys.readouterr().err
    assert "warning: " in err and "did not replace" in err and str(out / "p02" / "image.nii.gz") in err
    assert json.loads((out / "segment.json").read_text())["replacing"]["earlier"]["overlap"] == 0.0
    assert run(["segment", str(ds), "--model", str(other), "-o", str(out), "--overlap", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "may hold label maps of two settings" in err[0], err
    # Rerun with --overwrite over every input: the marker goes, a plain rerun skips all.
    assert run(["segment", str(ds), "--model", str(other), "-o", str(out), "--overlap", "0", "--overwrite", "-q"]) == 0
    assert "replacing" not in json.loads((out / "segment.json").read_text())
    assert run(["segment", str(ds), "--model", str(other), "-o", str(out), "--overlap", "0"]) == 0
    assert capsys.readouterr().err.count("skipped") == 3


def test_label_maps_without_a_record_are_not_taken_as_done(model_path, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "itk.nii.gz").write_bytes(b"someone else's")
    assert run(["segment", str(inputs / "itk.mha"), "--model", str(model_path), "-o", str(out), "-q"]) == 2
    assert "holds label maps without a segment.json" in capsys.readouterr().err
    assert run(["segment", str(inputs / "itk.mha"), "--model", str(model_path), "-o", str(out), "--overwrite", "-q", "--overlap", "0"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["itk.nii.gz", "segment.json"]
    assert "replacing" not in json.loads((out / "segment.json").read_text())


def test_a_full_disk_stops_the_run_at_the_first_output(model_path, inputs, tmp_path, capsys, monkeypatch):
    import errno

    from gvsl_cli import io

    real_write, calls = io.write_volume, []

    def full_disk(image, path, **kwargs):
        calls.append(path)
        Path(path).parent.mkdir(parents=True, exist_ok=True)  # as atomic_path does
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(io, "write_volume", full_disk)
    ds = _patients(inputs, tmp_path / "ds")
    out = tmp_path / "out"
    assert run(["segment", str(ds), "--model", str(model_path), "-o", str(out), "--overlap", "0", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(calls) == 1 and len(err) == 1 and err[0].startswith(f"error: {out / 'p01' / 'image.nii.gz'}: cannot write (No space left on device); stopped after 0 label map(s) written"), err
    assert not (out / "p01").exists()
    # ITK's NIfTI writer does not raise on a full disk; io.write_volume finds the short file.
    from gvsl_cli.errors import InputError

    def short_file(image, path, **kwargs):
        raise InputError(f"{path}: the NIfTI writer left a damaged file (no space left on the device?)")

    monkeypatch.setattr(io, "write_volume", short_file)
    assert run(["segment", str(ds), "--model", str(model_path), "-o", str(out), "--overlap", "0", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the NIfTI writer left a damaged file (no space left on the device?); stopped after 0 label map(s) written" in err[0], err
    # A name too long stays one input's failure: the others are done (exit 7).
    monkeypatch.setattr(io, "write_volume", lambda image, path, **kw: (_ for _ in ()).throw(OSError(errno.ENAMETOOLONG, "File name too long", str(path))) if "p01" in str(path) else real_write(image, path, **kw))
    assert run(["segment", str(ds), "--model", str(model_path), "-o", str(out), "--overlap", "0", "-q"]) == 7
    assert "failed" in capsys.readouterr().err and (out / "p02" / "image.nii.gz").is_file() and not (out / "p01").exists()


def test_failed_inputs_leave_no_output_folder_it_created(model_path, inputs, tmp_path, capsys, monkeypatch):
    import errno

    from gvsl_cli import io

    def name_too_long(image, path, **kwargs):  # one input's failure, not the disk's
        raise OSError(errno.ENAMETOOLONG, "File name too long", str(path))

    monkeypatch.setattr(io, "write_volume", name_too_long)
    out = tmp_path / "new" / "labels"
    assert run(["segment", str(inputs / "colin_0000.nii.gz"), "--model", str(model_path), "-o", str(out), "--overlap", "0", "--quiet"]) == 7
    assert "File name too long" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    # A folder that was there before stays, even empty.
    out.mkdir(parents=True)
    assert run(["segment", str(inputs / "colin_0000.nii.gz"), "--model", str(model_path), "-o", str(out), "--overlap", "0", "--quiet"]) == 7
    assert out.is_dir() and list(out.iterdir()) == []


def test_one_file_per_call_into_one_folder_does_not_take_anothers_label_map(model_path, tmp_path, capsys):
    # for f in p*/image.nii.gz; do gvsl segment $f -o out; done: the second call's output
    # name is the first's; its label map must not pass for the second patient's.
    for patient, volume in (("p01", "colin27_t1_2mm.nii.gz"), ("p02", "icbm152_t1_2mm.nii.gz")):
        (tmp_path / patient).mkdir()
        shutil.copy(EXAMPLES / volume, tmp_path / patient / "image.nii.gz")
    out = tmp_path / "out"
    assert run(["segment", str(tmp_path / "p01" / "image.nii.gz"), "--model", str(model_path), "-o", str(out), "--overlap", "0", "-q"]) == 0
    assert run(["segment", str(tmp_path / "p02" / "image.nii.gz"), "--model", str(model_path), "-o", str(out), "--overlap", "0", "-q"]) == 7
    err = capsys.readouterr().err
    assert f"failed {tmp_path / 'p02' / 'image.nii.gz'}: {out / 'image.nii.gz'} exists but was made from {tmp_path / 'p01' / 'image.nii.gz'} (see segment.json)" in err
    # The same input again is still skipped as done.
    assert run(["segment", str(tmp_path / "p01" / "image.nii.gz"), "--model", str(model_path), "-o", str(out), "--overlap", "0"]) == 0
    assert "skipped" in capsys.readouterr().err
    # Label maps of gvsl versions before the index: told apart by their grid.
    record = json.loads((out / "segment.json").read_text())
    first = tmp_path / "p01" / "image.nii.gz"
    assert record["inputs"] == {"image.nii.gz": {"input": str(first), "sha256": data.content_sha256(first), "stamp": data.content_stamp(first)}}
    del record["inputs"]
    (out / "segment.json").write_text(json.dumps(record))
    assert run(["segment", str(tmp_path / "p02" / "image.nii.gz"), "--model", str(model_path), "-o", str(out), "--overlap", "0", "-q"]) == 7
    assert f"{out / 'image.nii.gz'} exists but was made from another image" in capsys.readouterr().err


def test_one_file_per_call_on_identical_grids_is_told_apart_by_the_index(model_path, tmp_path, capsys, monkeypatch):
    # Two patients on one grid (resampled datasets): only the record of inputs tells them apart.
    image = sitk.ReadImage(str(EXAMPLES / "colin27_t1_2mm.nii.gz"))
    other = sitk.Flip(image, [True, False, False])
    other.CopyInformation(image)
    for patient, volume in (("p01", image), ("p02", other)):
        (tmp_path / "data" / patient).mkdir(parents=True)
        sitk.WriteImage(volume, str(tmp_path / "data" / patient / "image.nii.gz"))
    out = tmp_path / "out"
    segment = ["--model", str(model_path), "-o", str(out), "--overlap", "0", "-q"]
    assert run(["segment", str(tmp_path / "data" / "p01" / "image.nii.gz"), *segment]) == 0
    assert run(["segment", str(tmp_path / "data" / "p02" / "image.nii.gz"), *segment]) == 7
    assert f"exists but was made from {tmp_path / 'data' / 'p01' / 'image.nii.gz'}" in capsys.readouterr().err
    # A moved input folder is the same input (same content): skipped as done.
    (tmp_path / "data").rename(tmp_path / "moved")
    before = json.loads((out / "segment.json").read_text())
    moved = tmp_path / "moved" / "p01" / "image.nii.gz"
    assert run(["segment", str(moved), *segment[:-1]]) == 0
    assert f"skipped {out / 'image.nii.gz'}" in capsys.readouterr().err
    # ... and its index entry now names the input where it is (the record rewritten whole).
    after = json.loads((out / "segment.json").read_text())
    assert after["inputs"] == {"image.nii.gz": {"input": str(moved), "sha256": before["inputs"]["image.nii.gz"]["sha256"], "stamp": data.content_stamp(moved)}}
    assert {k: v for k, v in after.items() if k != "inputs"} == {k: v for k, v in before.items() if k != "inputs"}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left
    # Known by its stamp at the new path from now on: the content is not read again.
    monkeypatch.setattr(data, "content_sha256", lambda *a, **k: pytest.fail("content read again"))
    assert run(["segment", str(moved), *segment]) == 0
    monkeypatch.undo()
    # New content at the same path (a re-export) is not the input that made the map.
    scan = tmp_path / "moved" / "p02" / "image.nii.gz"
    again = ["--model", str(model_path), "-o", str(tmp_path / "out2"), "--overlap", "0", "-q"]
    assert run(["segment", str(scan), *again]) == 0
    sitk.WriteImage(image, str(scan))
    assert run(["segment", str(scan), *again]) == 7
    assert f"exists but was made from an earlier version of {scan} (see segment.json)" in capsys.readouterr().err


def test_a_second_segment_into_a_folder_in_use_is_refused(model_path, inputs, tmp_path, capsys):
    from gvsl_cli.locking import exclusive_output_folder

    out = tmp_path / "out"
    out.mkdir()
    with exclusive_output_folder(out, "segment"):  # another run, writing now
        code = run(["segment", str(inputs / "itk.mha"), "--model", str(model_path), "-o", str(out), "-q"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith(f"error: {out}: another gvsl segment (pid ") and "is writing into this output folder" in err
        assert sorted(p.name for p in out.iterdir()) == [".gvsl-output.lock"]
    assert run(["segment", str(inputs / "itk.mha"), "--model", str(model_path), "-o", str(out), "-q", "--overlap", "0"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["itk.nii.gz", "segment.json"]  # no lock file left


def test_single_slice_probabilities_and_non_orthonormal_directions(model_path, tmp_path, capfd):
    image = sitk.ReadImage(str(EXAMPLES / "colin27_t1_2mm.nii.gz"))
    one_slice = image[:, :, 45:46]
    sitk.WriteImage(one_slice, str(tmp_path / "slice.nii.gz"))
    sheared = sitk.Image(image)
    columns = np.array([[-1.0, 0.2, 0.0], [0.0, -0.98, 0.0], [0.0, 0.0, 1.0]])
    columns /= np.linalg.norm(columns, axis=0)
    sheared.SetDirection(tuple(columns.reshape(-1)))
    sitk.WriteImage(sheared, str(tmp_path / "shear.mha"))
    out = tmp_path / "out"
    code = run(["segment", str(tmp_path / "slice.nii.gz"), str(tmp_path / "shear.mha"), "--model", str(model_path), "-o", str(out), "--overlap", "0", "--probabilities", "-q"])
    err = capfd.readouterr().err
    assert code == 7
    # A probability map of one slice would read back as a 2D image: that input fails.
    assert f"failed {tmp_path / 'slice.nii.gz'}: a single slice (size (90, 108, 1)): its probability map cannot be stored as a 3D NIfTI" in err
    assert not (out / "slice.nii.gz").exists()
    # gvsl says in one line that NIfTI cannot hold the sheared direction; ITK's own
    # multi-line warning is not shown.
    assert f"warning: {tmp_path / 'shear.mha'} has a direction matrix that is not orthonormal, which NIfTI cannot store" in err
    assert "WARNING" not in err and (out / "shear.nii.gz").is_file()
    # The label map alone of the single slice is fine.
    assert run(["segment", str(tmp_path / "slice.nii.gz"), "--model", str(model_path), "-o", str(tmp_path / "labels"), "--overlap", "0", "-q"]) == 0


def _noise_volumes(folder: Path, names: list[str]) -> Path:
    """Small noise volumes (16³ voxels of 5 mm) named ``names`` in ``folder``."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        image = sitk.GetImageFromArray(rng.uniform(0, 100, (16, 16, 16)).astype(np.float32))
        image.SetSpacing((5.0, 5.0, 5.0))
        sitk.WriteImage(image, str(folder / name))
    return folder


def test_a_multichannel_imagests_is_refused_and_one_chosen_channel_is_named_by_case(model_path, tmp_path, capsys):
    # nnU-Net's multi-channel pattern: several cases sharing channels 0000..0003.
    ts = _noise_volumes(tmp_path / "imagesTs", [f"BRATS_00{case}_{k:04d}.nii.gz" for case in (1, 2) for k in range(4)])
    out = tmp_path / "out"
    segment = ["--model", str(model_path), "-o", str(out), "--overlap", "0"]
    for given in ([str(ts)], [str(ts / "BRATS_001_0000.nii.gz"), str(ts / "BRATS_001_0002.nii.gz")]):
        assert run(["segment", *given, *segment]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith(f"error: {ts}: the inputs hold ")
        assert "channels of the multi-channel nnU-Net case BRATS_001 (BRATS_001_0000.nii.gz, " in err
        assert f"(hint: give only the channel the model was trained on, e.g. '{ts}/*_0000.nii.gz'" in err
        assert not out.exists()  # refused before any work
    # One channel per case, chosen by the user: each label map is named by its case.
    assert run(["segment", str(ts / "*_0002.nii.gz"), *segment]) == 0
    assert "note: 2 input(s) are one channel of a multi-channel nnU-Net case (e.g. BRATS_001_0002.nii.gz: channel 2 of BRATS_001" in capsys.readouterr().err
    assert _files(out) == ["BRATS_001.nii.gz", "BRATS_002.nii.gz", "segment.json"]
    # A loop of one-file calls meets the label map another channel made: a failure that says so.
    assert run(["segment", str(ts / "BRATS_001_0001.nii.gz"), *segment, "-q"]) == 7
    assert "exists, made from BRATS_001_0002.nii.gz, another channel of the multi-channel nnU-Net case BRATS_001" in capsys.readouterr().err
    # Also with --overwrite, which replaces an input's own output, not its case's other channel's.
    assert run(["segment", str(ts / "BRATS_001_0001.nii.gz"), *segment, "-q", "--overwrite"]) == 7
    assert "another channel of the multi-channel nnU-Net case BRATS_001" in capsys.readouterr().err
    assert run(["segment", str(ts / "BRATS_001_0002.nii.gz"), *segment, "-q", "--overwrite"]) == 0
    # One stem numbered 0000, 0001, 0002 and nothing else: three numbered cases, as before.
    numbered = _noise_volumes(tmp_path / "numbered", ["sub_0000.nii.gz", "sub_0001.nii.gz", "sub_0002.nii.gz"])
    assert run(["segment", str(numbered), "--model", str(model_path), "-o", str(tmp_path / "num_out"), "--overlap", "0", "-q"]) == 0
    assert _files(tmp_path / "num_out") == ["segment.json", "sub_0000.nii.gz", "sub_0001.nii.gz", "sub_0002.nii.gz"]


def test_numbered_images_beside_their_masks_are_not_channels(model_path, tmp_path, capsys):
    """img_0000..0002 beside mask_0000..0002 (an export of images and masks of three
    patients) match the multi-channel names, but a case's channels share one grid and these
    do not: the images are numbered cases, given by a glob or one by one."""
    side = tmp_path / "side"
    _noise_volumes(side, [f"{stem}_{k:04d}.nii.gz" for stem in ("img", "mask") for k in range(3)])
    for k in range(3):  # each patient its own grid
        for stem in ("img", "mask"):
            image = sitk.ReadImage(str(side / f"{stem}_{k:04d}.nii.gz"))
            image.SetOrigin((10.0 * k, 0.0, 0.0))
            sitk.WriteImage(image, str(side / f"{stem}_{k:04d}.nii.gz"))
    segment = ["--model", str(model_path), "--overlap", "0", "-q"]
    assert run(["segment", str(side / "img_*.nii.gz"), "-o", str(tmp_path / "glob"), *segment]) == 0
    assert _files(tmp_path / "glob") == ["img_0000.nii.gz", "img_0001.nii.gz", "img_0002.nii.gz", "segment.json"]
    assert run(["segment", str(side / "img_0002.nii.gz"), "-o", str(tmp_path / "one"), *segment]) == 0
    assert _files(tmp_path / "one") == ["img_0002.nii.gz", "segment.json"]
    assert capsys.readouterr().err == ""


def test_a_one_file_per_call_loop_and_a_folder_call_write_the_same_names(model_path, tmp_path):
    # The name of a file's label map follows the file names in its own folder, not the
    # other inputs of the call: CASE_0000 -> CASE in nnU-Net's imagesTs; numbered files
    # (sub_0000 beside sub_0001) keep their names, also when given one by one.
    from gvsl_cli.data import discover_named
    from gvsl_cli.segmentation import plan_outputs

    folders = {
        "imagesTs": ["la_003_0000.nii.gz", "la_004_0000.nii.gz", "spleen.mha"],
        "numbered": ["sub_0000.nii.gz", "sub_0001.nii.gz", "sub_0002.nii.gz"],
        "channels": ["BRATS_001_0000.nii.gz", "BRATS_001_0001.nii.gz", "BRATS_002_0000.nii.gz", "BRATS_002_0001.nii.gz"],
    }
    for folder, names in folders.items():
        _noise_volumes(tmp_path / folder, names)
    expected = {
        "imagesTs": ["la_003.nii.gz", "la_004.nii.gz", "spleen.nii.gz"],
        "numbered": ["sub_0000.nii.gz", "sub_0001.nii.gz", "sub_0002.nii.gz"],
        "channels": ["BRATS_001.nii.gz", "BRATS_002.nii.gz"],  # channel 0 chosen: '*_0000.nii.gz'
    }
    for folder, names in folders.items():
        given = [str(tmp_path / folder)] if folder != "channels" else [str(tmp_path / folder / "*_0000.nii.gz")]
        sources, _ = discover_named(given)
        whole_call = sorted(target.name for _, target in plan_outputs(sources, tmp_path / "out"))
        one_by_one = sorted(target.name for source in sources for _, target in plan_outputs([source.path], tmp_path / "out"))
        assert whole_call == one_by_one == expected[folder], folder
    # The numbered folder through the command: a loop of one-file calls and one folder call.
    segment = ["--model", str(model_path), "--overlap", "0", "-q"]
    assert run(["segment", str(tmp_path / "numbered"), "-o", str(tmp_path / "call"), *segment]) == 0
    for name in folders["numbered"]:
        assert run(["segment", str(tmp_path / "numbered" / name), "-o", str(tmp_path / "loop"), *segment]) == 0
    assert _files(tmp_path / "loop") == _files(tmp_path / "call") == ["segment.json", *expected["numbered"]]


def test_the_multi_channel_pattern_is_several_cases_sharing_channels_from_zero():
    from gvsl_cli.segmentation_data import Channel, nnunet_channels

    brats = [f"BRATS_00{c}_{k:04d}" for c in (1, 2) for k in range(4)]
    assert nnunet_channels(brats)["BRATS_002_0003"] == Channel("BRATS_002", 3, (0, 1, 2, 3))
    # Not the pattern: one stem numbered 0000..0002 (numbered cases or one case: ambiguous),
    # CASE_0000 alone, cases with different channel sets, channels not starting at 0.
    for names in (["sub_0000", "sub_0001", "sub_0002"], ["liver_3_0000", "liver_4_0000"], ["a_0000", "a_0001", "b_0000"], ["a_0001", "a_0002", "b_0001", "b_0002"]):
        assert set(nnunet_channels(names).values()) == {None}, names


def test_quiet_segment_draws_no_download_bar_for_a_model_url(tmp_path, model_path, inputs, capsys, monkeypatch):
    """-q: a model given as a URL downloads without its progress bar (as embed, register,
    finetune and pretrain do); without -q the bar names the file."""
    from weights_server import Route, WeightsServer

    monkeypatch.setenv("GVSL_HOME", str(tmp_path / "home"))
    server = WeightsServer().start()
    try:
        route = Route(body=model_path.read_bytes())
        server.routes["/models/liver.pt"] = route
        url = f"{server.url('/models/liver.pt')}#sha256={route.sha256}"
        image = str(inputs / "colin_0000.nii.gz")
        assert run(["segment", image, "--model", url, "-o", str(tmp_path / "quiet"), "-q"]) == 0
        assert capsys.readouterr().err == ""
        monkeypatch.setenv("GVSL_HOME", str(tmp_path / "home2"))  # downloaded again
        assert run(["segment", image, "--model", url, "-o", str(tmp_path / "loud")]) == 0
        assert "liver.pt" in capsys.readouterr().err
    finally:
        server.stop()
