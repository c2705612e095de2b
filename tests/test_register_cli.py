"""gvsl register / apply / demo end to end on the shipped volumes: files, geometry, ITK agreement."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from gvsl_cli.cli import run
from gvsl_cli.geometry import Geometry
from gvsl_cli.io import write_volume

#: Fast settings for the command line tests (coarse grid, few iterations).
FAST = ["--iters", "20", "--spacing", "4", "--device", "cpu"]


def assert_geometry(image: sitk.Image, expected: sitk.Image) -> None:
    assert image.GetSize() == expected.GetSize()
    assert np.allclose(image.GetSpacing(), expected.GetSpacing())
    assert np.allclose(image.GetOrigin(), expected.GetOrigin())
    assert np.allclose(image.GetDirection(), expected.GetDirection())


@pytest.fixture
def oblique_fixed(tmp_path, icbm_t1, icbm_labels):
    """ICBM152 and its labels on an oblique, anisotropic grid (tests physical-space handling)."""
    image = sitk.ReadImage(str(icbm_t1))
    labels = sitk.ReadImage(str(icbm_labels))
    a = math.radians(10.0)
    direction = np.array(image.GetDirection()).reshape(3, 3) @ np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    spacing = (2.4, 2.0, 2.8)
    size = (80, 110, 68)
    centre = np.mean([image.TransformContinuousIndexToPhysicalPoint((i, j, k)) for i in (0, image.GetSize()[0] - 1) for j in (0, image.GetSize()[1] - 1) for k in (0, image.GetSize()[2] - 1)], axis=0)
    origin = centre - direction @ (np.array(spacing) * (np.array(size) - 1) / 2)
    grid = Geometry(size=size, spacing=spacing, origin=tuple(origin), direction=tuple(direction.reshape(-1)))
    reference = sitk.Image(list(size), sitk.sitkUInt8)
    grid.apply_to(reference)
    image_path, labels_path = tmp_path / "fixed.nrrd", tmp_path / "fixed_labels.nii.gz"
    write_volume(sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32), image_path)
    write_volume(sitk.Resample(labels, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, labels.GetPixelID()), labels_path)
    return image_path, labels_path


def test_register_writes_outputs_that_simpleitk_reproduces(tmp_path, capsys, oblique_fixed, colin_t1, colin_labels):
    fixed_path, fixed_labels_path = oblique_fixed
    out = tmp_path / "out"
    code = run(["register", str(fixed_path), str(colin_t1), "-o", str(out), "--moving-labels", str(colin_labels), "--fixed-labels", str(fixed_labels_path), "--json", *FAST])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)  # stdout holds the JSON report and nothing else
    assert json.loads((out / "report.json").read_text()) == report
    assert set(report["outputs"].values()) == {"moved.nii.gz", "displacement.nii.gz", "affine.tfm", "moved_labels.nii.gz", "report.json"}
    assert report["dice"]["mean_after"] > report["dice"]["mean_before"]
    assert report["similarity"]["after"] > report["similarity"]["before"]
    assert report["jacobian"]["nonpositive_percent"] < 0.1

    fixed = sitk.ReadImage(str(fixed_path))
    moving = sitk.ReadImage(str(colin_t1))
    moved = sitk.ReadImage(str(out / "moved.nii.gz"))
    field = sitk.ReadImage(str(out / "displacement.nii.gz"))
    moved_labels = sitk.ReadImage(str(out / "moved_labels.nii.gz"))
    for image in (moved, field, moved_labels):
        assert_geometry(image, fixed)
    assert field.GetNumberOfComponentsPerPixel() == 3

    # The written field, applied by SimpleITK, reproduces gvsl's moved image and labels.
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    background = float(sitk.GetArrayViewFromImage(moving).min())
    by_itk = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, background, sitk.sitkFloat32)
    difference = np.abs(sitk.GetArrayFromImage(by_itk) - sitk.GetArrayFromImage(moved))
    assert difference.max() < 1e-3 * float(sitk.GetArrayViewFromImage(moving).max())
    labels = sitk.ReadImage(str(colin_labels))
    labels_by_itk = sitk.Resample(labels, fixed, transform, sitk.sitkNearestNeighbor, 0, labels.GetPixelID())
    assert np.array_equal(sitk.GetArrayFromImage(labels_by_itk), sitk.GetArrayFromImage(moved_labels))

    # Label values survive (nearest neighbour, same pixel type), and most of them are present.
    assert moved_labels.GetPixelID() == labels.GetPixelID()
    values = set(np.unique(sitk.GetArrayFromImage(moved_labels)))
    assert values <= set(np.unique(sitk.GetArrayFromImage(labels))) and {1, 2, 3} <= values

    # The affine file is the affine stage: it reads back as the report's matrix.
    affine = sitk.AffineTransform(sitk.ReadTransform(str(out / "affine.tfm")))
    assert np.allclose(np.array(affine.GetMatrix()).reshape(3, 3), np.array(report["affine"])[:3, :3])


def test_apply_reuses_a_registration_for_other_files(tmp_path, capsys, icbm_t1, colin_t1, colin_labels):
    out = tmp_path / "reg"
    assert run(["register", str(icbm_t1), str(colin_t1), "-o", str(out), "--moving-labels", str(colin_labels), *FAST]) == 0
    warped = tmp_path / "warped"
    assert run(["apply", str(colin_t1), "-l", str(colin_labels), "-t", str(out), "-o", str(warped), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()[-2:]]
    assert [line["labels"] for line in lines] == [False, True]
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(warped / "colin27_t1_2mm_warped.nii.gz")))
    assert np.abs(image - sitk.GetArrayFromImage(sitk.ReadImage(str(out / "moved.nii.gz")))).max() < 0.5
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(warped / "colin27_tissue_2mm_warped.nii.gz")))
    assert np.array_equal(labels, sitk.GetArrayFromImage(sitk.ReadImage(str(out / "moved_labels.nii.gz"))))
    # The affine file alone needs an output grid.
    code = run(["apply", str(colin_t1), "-t", str(out / "affine.tfm"), "-o", str(warped)])
    assert code == 2 and "--reference" in capsys.readouterr().err
    assert run(["apply", str(colin_t1), "-t", str(out / "affine.tfm"), "-r", str(icbm_t1), "-o", str(warped)]) == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["{icbm}", "{missing}"], "no such file"),
        (["{icbm}", "{broken}"], "cannot read"),
        (["{icbm}", "{colin}", "--moving-labels", "{icbm_labels}"], "not on the moving image's grid"),
        (["{icbm}", "{colin}", "--similarity", "mi"], "similarity must be one of"),
        (["{icbm}", "{colin}", "--weights", "{missing}"], "no such file"),
    ],
)
def test_bad_inputs_give_one_line_errors(tmp_path, capsys, args, message, icbm_t1, icbm_labels, colin_t1):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    paths = {"icbm": icbm_t1, "colin": colin_t1, "icbm_labels": icbm_labels, "missing": tmp_path / "missing.nii.gz", "broken": broken}
    out = tmp_path / "out"
    code = run(["register", *[a.format(**paths) for a in args], "-o", str(out), *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 or code == 4
    assert err[-1].startswith("error: ") and message in err[-1] and "Traceback" not in "\n".join(err)
    assert not (out / "report.json").exists()


def test_demo_runs_and_prints_json_with_dice(tmp_path, capsys):
    code = run(["demo", "-o", str(tmp_path / "demo"), "--iters", "10", "--device", "cpu", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert set(report["dice"]["labels"]) == {"1", "2"}
    assert report["dice"]["mean_after"] > report["dice"]["mean_before"]
    assert (tmp_path / "demo" / "moved_labels.nii.gz").is_file()


@pytest.mark.parametrize("affine_trained", [False, True])
def test_register_with_gvsl_weights(tmp_path, capsys, icbm_t1, colin_t1, affine_trained):
    from gvsl_cli.checkpoint import save_checkpoint
    from gvsl_cli.config import ModelConfig, PreprocessConfig
    from gvsl_cli.model import GVSL

    torch.manual_seed(0)
    weights = save_checkpoint(tmp_path / "w.pt", GVSL(ModelConfig(width=8)), PreprocessConfig(spacing=4.0, modality="mr"), affine_trained=affine_trained)
    out = tmp_path / "out"
    code = run(["register", str(icbm_t1), str(colin_t1), "-o", str(out), "--weights", str(weights), "--json", "--iters", "5", "--spacing", "4", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert "network deformable" in report["stages"]
    assert report["weights"]["affine_used"] is affine_trained
    assert ("network affine" in report["stages"]) is affine_trained
    assert any("untrained" in note for note in report["notes"]) is (not affine_trained)
    if not affine_trained:
        assert "untrained" in captured.err
    # Network prediction only (--iters 0) also works.
    assert run(["register", str(icbm_t1), str(colin_t1), "-o", str(out), "--weights", str(weights), "--iters", "0", "--spacing", "4", "--device", "cpu"]) == 0
