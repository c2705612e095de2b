"""gvsl register / apply / demo end to end on the shipped volumes: files, geometry, ITK agreement."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from gvsl_cli import registration_job
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


def test_apply_reuses_a_registration_for_other_files(tmp_path, capsys, icbm_t1, colin_t1, colin_labels, icbm_labels):
    out = tmp_path / "reg"
    assert run(["register", str(icbm_t1), str(colin_t1), "-o", str(out), "--moving-labels", str(colin_labels), *FAST]) == 0
    warped = tmp_path / "warped"
    assert run(["apply", str(colin_t1), "-l", str(colin_labels), "-t", str(out), "-o", str(warped), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()[-2:]]
    assert [line["labels"] for line in lines] == [False, True]
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(warped / "colin27_t1_2mm_warped.nii.gz")))
    moved = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "moved.nii.gz")))
    # ITK's resampling through the written field and gvsl's own agree to float rounding.
    assert np.abs(image - moved).max() < 2e-3 * float(np.abs(moved).max())
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(warped / "colin27_tissue_2mm_warped.nii.gz")))
    assert np.array_equal(labels, sitk.GetArrayFromImage(sitk.ReadImage(str(out / "moved_labels.nii.gz"))))
    # The affine file alone needs an output grid.
    code = run(["apply", str(colin_t1), "-t", str(out / "affine.tfm"), "-o", str(warped)])
    assert code == 2 and "--reference" in capsys.readouterr().err
    assert run(["apply", str(colin_t1), "-t", str(out / "affine.tfm"), "-r", str(icbm_t1), "-o", str(warped)]) == 0

    # --inverse takes fixed-grid labels onto the moving image: ICBM's tissue labels land on
    # Colin's better than unregistered, and Colin's labels go there and back nearly intact.
    assert run(["apply", "-l", str(icbm_labels), "-t", str(out), "--inverse", "-r", str(colin_t1), "-o", str(tmp_path / "inv"), "-q"]) == 0
    assert run(["apply", "-l", str(warped / "colin27_tissue_2mm_warped.nii.gz"), "-t", str(out), "--inverse", "-r", str(colin_t1), "-o", str(tmp_path / "back"), "-q"]) == 0
    assert run(["apply", "-l", str(icbm_labels), "-t", str(_identity_transform(tmp_path)), "-r", str(colin_t1), "-o", str(tmp_path / "unregistered"), "-q"]) == 0
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(colin_labels)))

    def mean_dice(path: Path) -> float:
        found = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        return float(np.mean([2 * np.sum((found == k) & (truth == k)) / (np.sum(found == k) + np.sum(truth == k)) for k in (1, 2)]))  # the labels both maps have

    registered, unregistered = mean_dice(tmp_path / "inv" / "icbm152_tissue_2mm_warped.nii.gz"), mean_dice(tmp_path / "unregistered" / "icbm152_tissue_2mm_warped.nii.gz")
    round_trip = mean_dice(tmp_path / "back" / "colin27_tissue_2mm_warped_warped.nii.gz")
    icbm = sitk.GetArrayFromImage(sitk.ReadImage(str(icbm_labels)))
    moved_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "moved_labels.nii.gz")))
    forward = float(np.mean([2 * np.sum((moved_labels == k) & (icbm == k)) / (np.sum(moved_labels == k) + np.sum(icbm == k)) for k in (1, 2)]))
    print(f"inverse: Dice {unregistered:.3f} unregistered -> {registered:.3f}; forward {forward:.3f}; round trip {round_trip:.3f}")
    # As good as the forward direction (WM/GM: 0.729 against 0.727 forward, 0.655
    # unregistered, with these fast settings).
    assert registered > unregistered + 0.03 and abs(registered - forward) < 0.03 and round_trip > 0.9


def test_apply_inverse_inverts_the_whole_chain(tmp_path, capsys):
    """-t scale2 -t translate1 maps x to 2x + 1; --inverse maps y to (y - 1) / 2."""
    ramp = _ramp(tmp_path)
    scale = sitk.AffineTransform(3)
    scale.SetMatrix((2, 0, 0, 0, 1, 0, 0, 0, 1))
    sitk.WriteTransform(scale, str(tmp_path / "scale2.tfm"))
    sitk.WriteTransform(sitk.TranslationTransform(3, (1.0, 0.0, 0.0)), str(tmp_path / "translate1.tfm"))
    chain = ["-t", str(tmp_path / "scale2.tfm"), "-t", str(tmp_path / "translate1.tfm")]
    assert run(["apply", str(ramp), *chain, "--inverse", "-r", str(ramp), "-o", str(tmp_path / "inv"), "-q"]) == 0
    values = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "inv" / "ramp_warped.nii.gz")))[2, 2]
    np.testing.assert_allclose(values[[1, 3, 7, 11]], [0.0, 1.0, 3.0, 5.0])
    assert run(["apply", str(ramp), *chain, "--inverse", "-o", str(tmp_path / "no_reference")]) == 2
    assert "--inverse needs -r" in capsys.readouterr().err
    assert not (tmp_path / "no_reference").exists()


def test_inverse_chain_of_a_register_folder_undoes_it(tmp_path):
    """A register folder's [A, v] inverted (v numerically) composes with the forward chain to
    the identity, both ways, inside the field's grid."""
    from gvsl_cli.warping import read_transform_chain

    grid = sitk.Image([40, 44, 36], sitk.sitkVectorFloat64, 3)
    grid.SetSpacing((2.0, 2.0, 2.5))
    grid.SetOrigin((-40.0, -44.0, -45.0))
    rng = np.random.default_rng(1)
    v = sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(rng.normal(size=(36, 44, 40, 3)) * 15, isVector=True), 3.0)
    v = sitk.Cast(v, sitk.sitkVectorFloat64)
    v.CopyInformation(grid)
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(sitk.VersorTransform((0.2, 0.1, 1.0), 0.15).GetMatrix())
    affine.Scale((1.05, 0.97, 1.02))
    affine.SetTranslation((3.0, -2.0, 1.5))
    folder = tmp_path / "reg"
    folder.mkdir()
    sitk.WriteTransform(affine, str(folder / "affine.tfm"))
    total = sitk.CompositeTransform(3)
    total.AddTransform(affine)
    total.AddTransform(sitk.DisplacementFieldTransform(sitk.Image(v)))
    displacement = sitk.TransformToDisplacementField(total, sitk.sitkVectorFloat64, grid.GetSize(), grid.GetOrigin(), grid.GetSpacing(), grid.GetDirection())
    sitk.WriteImage(displacement, str(folder / "displacement.nii.gz"))
    (folder / "report.json").write_text("{}")
    # A real deformation (up to 6.5 mm) that does not fold (an inverse exists).
    assert np.abs(sitk.GetArrayViewFromImage(v)).max() > 5.0 and sitk.GetArrayViewFromImage(sitk.DisplacementFieldJacobianDeterminant(v)).min() > 0

    forward, _ = read_transform_chain([folder])
    backward, reference = read_transform_chain([folder], inverse=True)
    assert reference is None
    errors = []
    for _ in range(300):
        point = tuple(float(c) for c in grid.TransformContinuousIndexToPhysicalPoint(tuple(rng.uniform(8, n - 8) for n in grid.GetSize())))
        errors.append(np.linalg.norm(np.subtract(backward.TransformPoint(forward.TransformPoint(point)), point)))
        errors.append(np.linalg.norm(np.subtract(forward.TransformPoint(backward.TransformPoint(point)), point)))
    # Numerical inversion: a tenth of a millimetre at worst (a wrong order would be mm off).
    assert max(errors) < 0.1 and np.mean(errors) < 0.02, (max(errors), np.mean(errors))


def test_deformable_part_recomposes_the_total_field():
    from gvsl_cli.warping import deformable_part

    # A smooth v on an oblique grid and an affine with a centre: d(x) = A(x + v(x)) - x.
    rng = np.random.default_rng(0)
    v = sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(rng.normal(size=(9, 10, 11, 3)) * 20, isVector=True), 1.5)
    v.SetSpacing((1.5, 2.0, 2.5))
    v.SetOrigin((-10.0, 4.0, 7.5))
    v.SetDirection(sitk.VersorTransform((0.3, 0.2, 0.1), 0.4).GetMatrix())
    affine = sitk.AffineTransform(3)
    affine.SetMatrix((1.05, 0.1, 0.0, -0.05, 0.95, 0.02, 0.0, 0.03, 1.1))
    affine.SetTranslation((4.0, -3.0, 2.0))
    affine.SetCenter((1.0, 2.0, 3.0))
    velocity = sitk.GetArrayFromImage(v).astype(np.float64)
    total = np.empty_like(velocity)
    for index in np.ndindex(*velocity.shape[:3]):
        point = np.array(v.TransformIndexToPhysicalPoint(tuple(int(i) for i in index[::-1])))
        total[index] = np.array(affine.TransformPoint(tuple(point + velocity[index]))) - point
    field = sitk.GetImageFromArray(total, isVector=True)
    field.CopyInformation(v)
    np.testing.assert_allclose(sitk.GetArrayFromImage(deformable_part(field, affine)), velocity, atol=1e-9)


def test_apply_of_a_register_folder_maps_beyond_the_fixed_grid_by_the_affine(tmp_path, capsys, icbm_t1, colin_t1):
    # A cropped fixed image, and a reference grid larger than it: outside the crop, the
    # field alone would give the identity; the registration's affine applies there.
    fixed = sitk.ReadImage(str(icbm_t1))
    crop = fixed[20:70, 20:80, 20:70]
    sitk.WriteImage(crop, str(tmp_path / "crop.nii.gz"))
    out = tmp_path / "reg"
    assert run(["register", str(tmp_path / "crop.nii.gz"), str(colin_t1), "-o", str(out), *FAST]) == 0
    assert run(["apply", str(colin_t1), "-t", str(out), "-r", str(icbm_t1), "-o", str(tmp_path / "warped"), "-q"]) == 0
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "warped" / "colin27_t1_2mm_warped.nii.gz")))
    by_affine = sitk.Resample(sitk.ReadImage(str(colin_t1)), fixed, sitk.ReadTransform(str(out / "affine.tfm")), sitk.sitkLinear, float(sitk.GetArrayViewFromImage(sitk.ReadImage(str(colin_t1))).min()), sitk.sitkFloat32)
    outside = np.ones(warped.shape, dtype=bool)
    outside[18:72, 18:82, 18:72] = False  # (z, y, x): the crop and a margin of 2 voxels
    np.testing.assert_allclose(warped[outside], sitk.GetArrayFromImage(by_affine)[outside], atol=1e-3)
    # Inside the crop it is the registration's own result.
    moved = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "moved.nii.gz")))
    inside = warped[20:70, 20:80, 20:70]
    assert np.abs(inside - moved).max() < 2e-3 * float(np.abs(moved).max())


@pytest.mark.parametrize(
    "args, message, exit_code",
    [
        (["{icbm}", "{missing}"], "no such file", 2),
        (["{icbm}", "{broken}"], "cannot read", 2),
        (["{icbm}", "{colin}", "--moving-labels", "{icbm_labels}"], "not on the moving image's grid", 2),
        (["{icbm}", "{colin}", "--similarity", "mi"], "similarity must be one of", 2),
        (["{icbm}", "{colin}", "--weights", "{missing}"], "no such file", 4),  # WeightsError
        (["{icbm}", "{colin}", "--fixed-labels", "{icbm_labels}"], "--fixed-labels needs --moving-labels", 2),
        (["{icbm}", "{colin}", "--spacing", "1e-3"], "working grid", 2),
        (["{icbm}", "{colin}", "--spacing", "inf"], "spacing must be a finite number > 0 mm", 2),
        (["{icbm}", "{colin}", "--weights", "{folder}"], "is a folder without model.pt, best.pt, last.pt", 4),
    ],
)
def test_bad_inputs_give_one_line_errors(tmp_path, capsys, monkeypatch, args, message, exit_code, icbm_t1, icbm_labels, colin_t1):
    monkeypatch.setattr(registration_job, "register", _must_not_register)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    paths = {"icbm": icbm_t1, "colin": colin_t1, "icbm_labels": icbm_labels, "missing": tmp_path / "missing.nii.gz", "broken": broken, "folder": tmp_path}
    out = tmp_path / "out"
    fast = FAST if "--spacing" not in args else [a for a in FAST if a not in ("--spacing", "4")]
    code = run(["register", *[a.format(**paths) for a in args], "-o", str(out), *fast])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == exit_code, err
    assert len(err) == 1, err
    assert err[0].startswith("error: ") and message in err[0]
    assert not out.exists()  # checked before the output folder was even created


def _must_not_register(*args, **kwargs):
    raise AssertionError("the registration ran although the inputs or the output folder were bad")


def test_spacing_error_says_the_grid_and_a_spacing_that_fits(tmp_path, capsys, icbm_t1, colin_t1):
    code = run(["register", str(icbm_t1), str(colin_t1), "-o", str(tmp_path / "out"), "--spacing", "0.01", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "voxels" in err[0] and "x" in err[0].split("working grid")[0] and "use a larger --spacing (at least" in err[0]


@pytest.mark.parametrize("command", ["register", "demo", "apply"])
@pytest.mark.parametrize("where", ["existing file", "under a file"])
def test_bad_output_folder_is_refused_before_any_work(tmp_path, capsys, monkeypatch, command, where, icbm_t1, colin_t1):
    monkeypatch.setattr(registration_job, "register", _must_not_register)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker if where == "existing file" else blocker / "sub"
    if command == "register":
        args = ["register", str(icbm_t1), str(colin_t1), *FAST]
    elif command == "demo":
        args = ["demo", "--iters", "1", "--device", "cpu"]
    else:
        identity = tmp_path / "identity.tfm"
        sitk.WriteTransform(sitk.AffineTransform(3), str(identity))
        args = ["apply", str(colin_t1), "-t", str(identity), "-r", str(icbm_t1)]
    code = run([*args, "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith(f"error: {out}: ") and "folder" in err[0], err
    assert blocker.read_text() == "not a folder"


#: The quickest real registration (affine only, coarse grid, one iteration).
QUICK = ["--iters", "1", "--spacing", "8", "--device", "cpu", "--affine-only"]


def _files(folder):
    """Name -> bytes of every file in ``folder`` (recursively): what a rerun may not change."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_rerun_keeps_the_previous_outputs_until_its_own_replace_them(tmp_path, capsys, monkeypatch, icbm_t1, colin_t1):
    out = tmp_path / "out"
    out.mkdir()
    previous = ["report.json", "moved.nii.gz", "displacement.nii.gz", "affine.tfm", "moved_labels.nii.gz"]
    for name in previous:
        (out / name).write_text("previous run")
    # What killed runs leave: a temporary file of an atomic write, a staging folder.
    (out / ".moved.nii.gz.k3j2.tmp.nii.gz").write_text("killed run")
    (out / ".gvsl-register-x1y2.tmp").mkdir()
    (out / ".gvsl-register-x1y2.tmp" / "moved.nii.gz").write_text("killed run")
    mine = ["notes.txt", "moved_labels_v1.nii.gz", "report.json.bak"]
    for name in mine:
        (out / name).write_text("the user's")
    real_register, seen = registration_job.register, {}

    def watching_register(*args, **kwargs):
        seen["files"] = _files(out)
        return real_register(*args, **kwargs)

    monkeypatch.setattr(registration_job, "register", watching_register)
    before = _files(out)
    assert run(["register", str(icbm_t1), str(colin_t1), "-o", str(out), *QUICK]) == 0
    assert seen["files"].pop(".gvsl-output.lock").startswith(b"gvsl register (pid ")  # held while it runs
    assert seen["files"] == before  # nothing removed while the registration ran
    report = json.loads((out / "report.json").read_text())
    # The new outputs replaced the old; the old moved_labels (not produced now) and the
    # killed runs' leftovers are gone; the user's files are untouched.
    assert sorted(path.name for path in out.iterdir()) == sorted([*report["outputs"].values(), *mine])
    assert all((out / name).read_bytes() != b"previous run" for name in report["outputs"].values())
    assert all((out / name).read_text() == "the user's" for name in mine)
    assert "replaced the previous run's outputs in" in capsys.readouterr().err


@pytest.mark.parametrize("failure", ["SIGTERM while registering", "full disk while writing", "Ctrl-C while writing the report", "error swapping in"])
def test_a_failed_or_stopped_rerun_leaves_the_previous_complete_outputs(tmp_path, capsys, monkeypatch, failure, icbm_t1, colin_t1, colin_labels):
    import errno

    from gvsl_cli.cli import Terminated

    out = tmp_path / "out"
    assert run(["register", str(icbm_t1), str(colin_t1), "-o", str(out), "--moving-labels", str(colin_labels), *QUICK]) == 0
    before = _files(out)
    assert sorted(before) == ["affine.tfm", "displacement.nii.gz", "moved.nii.gz", "moved_labels.nii.gz", "report.json"]

    def raising(exception):
        def fail(*args, **kwargs):
            raise exception
        return fail

    if failure == "SIGTERM while registering":
        monkeypatch.setattr(registration_job, "register", raising(Terminated()))
        expected_code = 143
    elif failure == "full disk while writing":
        monkeypatch.setattr(registration_job, "write_transform", raising(OSError(errno.ENOSPC, "No space left on device", "affine.tfm")))
        expected_code = 2
    elif failure == "Ctrl-C while writing the report":
        monkeypatch.setattr(registration_job, "_write_json", raising(KeyboardInterrupt()))
        expected_code = 130
    else:
        real_replace = os.replace

        def failing_swap(source, target):
            if Path(target).parent == out:  # the staged outputs moving in, not the writes into staging
                raise OSError(errno.EIO, "Input/output error", str(target))
            real_replace(source, target)

        monkeypatch.setattr(os, "replace", failing_swap)
        expected_code = 2
    # A rerun without labels: had the old outputs been removed first, moved_labels would go too.
    assert run(["register", str(icbm_t1), str(colin_t1), "-o", str(out), *QUICK]) == expected_code
    if failure == "error swapping in":
        # Only the renames themselves failed: the old report went first, so the folder no
        # longer claims a complete run, and nothing of the new run is left behind.
        assert "report.json" not in _files(out) and {k: v for k, v in before.items() if k != "report.json"} == _files(out)
    else:
        assert _files(out) == before and sorted(p.name for p in out.iterdir()) == sorted(before)


def test_an_input_among_the_previous_outputs_is_refused(tmp_path, capsys, monkeypatch, icbm_t1, colin_t1):
    monkeypatch.setattr(registration_job, "register", _must_not_register)
    out = tmp_path / "out"
    out.mkdir()
    moving = out / "moved.nii.gz"
    moving.write_bytes(colin_t1.read_bytes())
    code = run(["register", str(icbm_t1), str(moving), "-o", str(out), *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "would be replaced" in err[0], err
    assert moving.read_bytes() == colin_t1.read_bytes()


def test_rerun_without_labels_leaves_no_stale_moved_labels(tmp_path, capsys, icbm_t1, colin_t1, colin_labels):
    out = tmp_path / "out"
    fast = ["--iters", "2", "--spacing", "8", "--device", "cpu", "--affine-only"]
    assert run(["register", str(icbm_t1), str(colin_t1), "-o", str(out), "--moving-labels", str(colin_labels), *fast]) == 0
    assert (out / "moved_labels.nii.gz").is_file()
    assert run(["register", str(icbm_t1), str(colin_t1), "-o", str(out), *fast]) == 0
    report = json.loads((out / "report.json").read_text())
    assert "moved_labels" not in report["outputs"]
    assert sorted(path.name for path in out.iterdir()) == sorted(report["outputs"].values())


def _identity_transform(tmp_path):
    path = tmp_path / "identity.tfm"
    sitk.WriteTransform(sitk.AffineTransform(3), str(path))
    return path


def test_apply_mirrors_a_folder_per_patient(tmp_path, capsys, icbm_t1, colin_t1, colin_labels):
    # Files of one name in per-patient folders: each output goes to its patient's sub-folder.
    for patient in ("p01", "p02"):
        for tree, name, source in (("ds", "image.nii.gz", colin_t1), ("labs", "seg.nii.gz", colin_labels)):
            (tmp_path / tree / patient).mkdir(parents=True, exist_ok=True)
            (tmp_path / tree / patient / name).write_bytes(source.read_bytes())
    transform = _identity_transform(tmp_path)

    def outputs(out: Path, *args: str) -> list[str]:
        assert run(["apply", *args, "-t", str(transform), "-r", str(icbm_t1), "-o", str(out), "--json", "-q"]) == 0
        return [Path(json.loads(line)["output"]).relative_to(out).as_posix() for line in capsys.readouterr().out.splitlines()]

    # Folders given: below each folder.
    assert outputs(tmp_path / "o1", str(tmp_path / "ds"), "-l", str(tmp_path / "labs")) == ["p01/image_warped.nii.gz", "p02/image_warped.nii.gz", "p01/seg_warped.nii.gz", "p02/seg_warped.nii.gz"]
    labels = sitk.ReadImage(str(tmp_path / "o1" / "p02" / "seg_warped.nii.gz"))
    assert labels.GetPixelID() == sitk.ReadImage(str(colin_labels)).GetPixelID()
    # Files given (a glob, find | gvsl apply -): below the deepest folder holding them all.
    assert outputs(tmp_path / "o2", str(tmp_path / "ds" / "*" / "image.nii.gz")) == ["p01/image_warped.nii.gz", "p02/image_warped.nii.gz"]
    # Files of distinct names stay at the top, as before.
    assert outputs(tmp_path / "o3", str(tmp_path / "ds" / "p01" / "image.nii.gz"), "-l", str(tmp_path / "labs" / "p02" / "seg.nii.gz")) == ["image_warped.nii.gz", "seg_warped.nii.gz"]
    assert sorted(p.name for p in (tmp_path / "o3").iterdir()) == ["image_warped.nii.gz", "seg_warped.nii.gz"]  # no staging folder left
    # An output folder inside the input folder: a rerun does not take its outputs as inputs.
    inside = tmp_path / "ds" / "warped"
    for _ in range(2):
        assert outputs(inside, str(tmp_path / "ds")) == ["p01/image_warped.nii.gz", "p02/image_warped.nii.gz"]


def test_names_without_a_common_folder_keep_their_drive():
    from pathlib import PureWindowsPath

    from gvsl_cli.data import _below

    # Windows: files on C: and D: have no common folder (os.path.commonpath raises).
    assert _below(PureWindowsPath("D:/scans/a.nii.gz"), None) == PureWindowsPath("D/scans/a.nii.gz")
    assert _below(PureWindowsPath("C:/scans/a.nii.gz"), None) != _below(PureWindowsPath("D:/scans/a.nii.gz"), None)


def test_apply_refuses_inputs_whose_outputs_collide(tmp_path, capsys, icbm_t1, colin_t1, colin_labels):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    image, labels = tmp_path / "a" / "s.nii.gz", tmp_path / "b" / "s.nii.gz"
    image.write_bytes(colin_t1.read_bytes())
    labels.write_bytes(colin_labels.read_bytes())
    out = tmp_path / "warped"
    # s.nii.gz at the top of a folder given and a file s.nii.gz given directly.
    code = run(["apply", str(tmp_path / "a"), "-l", str(labels), "-t", str(_identity_transform(tmp_path)), "-r", str(icbm_t1), "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert str(image) in err[0] and str(labels) in err[0] and "s_warped.nii.gz" in err[0]
    assert not out.exists()
    # The same file given twice is refused too, and an output may not overwrite the reference.
    assert run(["apply", str(image), str(image), "-t", str(_identity_transform(tmp_path)), "-r", str(icbm_t1), "-o", str(out)]) == 2
    assert "given twice" in capsys.readouterr().err
    reference = tmp_path / "s_warped.nii.gz"
    reference.write_bytes(icbm_t1.read_bytes())
    assert run(["apply", str(image), "-t", str(_identity_transform(tmp_path)), "-r", str(reference), "-o", str(tmp_path)]) == 2
    assert "would overwrite" in capsys.readouterr().err
    assert reference.read_bytes() == icbm_t1.read_bytes()


@pytest.mark.parametrize("bad", ["broken image", "broken label map", "missing label map"])
def test_apply_writes_nothing_when_a_later_input_is_bad(tmp_path, capsys, bad, icbm_t1, colin_t1):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    later = {"broken image": [str(broken)], "broken label map": ["-l", str(broken)], "missing label map": ["-l", str(tmp_path / "missing.nii.gz")]}[bad]
    out = tmp_path / "warped"
    code = run(["apply", str(colin_t1), *later, "-t", str(_identity_transform(tmp_path)), "-r", str(icbm_t1), "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert not out.exists()
    # With good inputs the same call writes its output.
    assert run(["apply", str(colin_t1), "-t", str(_identity_transform(tmp_path)), "-r", str(icbm_t1), "-o", str(out)]) == 0
    assert sorted(path.name for path in out.iterdir()) == ["colin27_t1_2mm_warped.nii.gz"]


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
    # A gvsl checkpoint is not an official one: the note must not blame the official code.
    assert not any("official" in note for note in report["notes"])
    if not affine_trained:
        assert any("gvsl checkpoint" in note and "affine_trained = false" in note for note in report["notes"])
    if not affine_trained:
        assert "untrained" in captured.err
    assert "network: width 8 at 4.00 mm on a " in captured.err  # where the minutes of a CPU run go
    # Network prediction only (--iters 0) also works.
    assert run(["register", str(icbm_t1), str(colin_t1), "-o", str(out), "--weights", str(weights), "--iters", "0", "--spacing", "4", "--device", "cpu"]) == 0


@pytest.mark.parametrize("taken", ["report.json", "moved.nii.gz", "moved_labels.nii.gz"])
def test_output_name_taken_by_a_folder_is_refused_before_any_work(tmp_path, capsys, monkeypatch, taken, icbm_t1, colin_t1, colin_labels):
    monkeypatch.setattr(registration_job, "register", _must_not_register)
    out = tmp_path / "out"
    (out / taken).mkdir(parents=True)
    code = run(["register", str(icbm_t1), str(colin_t1), "-o", str(out), "--moving-labels", str(colin_labels), *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"error: {out / taken}: output path is taken by a folder (hint: remove or rename that folder, or choose another -o folder)"]
    assert [path.name for path in out.iterdir()] == [taken]


def test_apply_output_taken_by_a_folder_is_refused_and_nothing_written(tmp_path, capsys, icbm_t1, colin_t1):
    out = tmp_path / "warped"
    (out / "icbm152_t1_2mm_warped.nii.gz").mkdir(parents=True)
    code = run(["apply", str(colin_t1), str(icbm_t1), "-t", str(_identity_transform(tmp_path)), "-r", str(icbm_t1), "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {out / 'icbm152_t1_2mm_warped.nii.gz'}: output path is taken by a folder"), err
    assert [path.name for path in out.iterdir()] == ["icbm152_t1_2mm_warped.nii.gz"]


def test_apply_failing_on_a_later_output_leaves_none(tmp_path, capsys, monkeypatch, icbm_t1, colin_t1):
    import errno

    from gvsl_cli import io

    real_write, calls = io.write_volume, []

    def full_disk_on_second(image, path, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(image, path, **kwargs)

    monkeypatch.setattr(io, "write_volume", full_disk_on_second)
    out = tmp_path / "warped"
    code = run(["apply", str(colin_t1), str(icbm_t1), "-t", str(_identity_transform(tmp_path)), "-r", str(icbm_t1), "-o", str(out)])
    assert code == 2 and "No space left on device" in capsys.readouterr().err
    assert len(calls) == 2 and not out.exists()  # the first output is not left behind, nor the folder it made
    out.mkdir()  # a folder that was there before stays
    calls.clear()
    assert run(["apply", str(colin_t1), str(icbm_t1), "-t", str(_identity_transform(tmp_path)), "-r", str(icbm_t1), "-o", str(out)]) == 2
    assert out.is_dir() and list(out.iterdir()) == []


def test_register_failing_while_writing_leaves_no_outputs(tmp_path, capsys, monkeypatch, icbm_t1, colin_t1):
    import errno

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "affine.tfm")

    monkeypatch.setattr(registration_job, "write_transform", full_disk)
    out = tmp_path / "out"
    code = run(["register", str(icbm_t1), str(colin_t1), "-o", str(out), "--iters", "1", "--spacing", "8", "--device", "cpu", "--affine-only"])
    assert code == 2 and "No space left on device" in capsys.readouterr().err
    assert not out.exists()  # moved.nii.gz and displacement.nii.gz removed, and the folder it created
    # A folder that existed before is kept, empty or not.
    out.mkdir()
    assert run(["register", str(icbm_t1), str(colin_t1), "-o", str(out), *QUICK]) == 2
    assert out.is_dir() and list(out.iterdir()) == []


def test_report_never_holds_nan_or_infinity(tmp_path, capsys, monkeypatch, icbm_t1, colin_t1):
    def nan_jacobian(*args, **kwargs):
        return {"nonpositive_percent": 0.0, "sd_log_j": float("nan"), "mean_log_j": float("-inf")}

    monkeypatch.setattr(registration_job, "jacobian_statistics", nan_jacobian)
    out = tmp_path / "out"
    code = run(["register", str(icbm_t1), str(colin_t1), "-o", str(out), "--json", "--iters", "1", "--spacing", "8", "--device", "cpu", "--affine-only"])
    captured = capsys.readouterr()
    assert code == 0, captured.err

    def refuse(constant):
        raise ValueError(f"non-JSON constant {constant}")

    for text in (captured.out, (out / "report.json").read_text()):
        report = json.loads(text, parse_constant=refuse)
        assert report["jacobian"]["sd_log_j"] is None and report["jacobian"]["mean_log_j"] is None
        assert any("jacobian.sd_log_j (nan)" in note for note in report["notes"])
    # The table shows n/a for them.
    assert run(["register", str(icbm_t1), str(colin_t1), "-o", str(out), "--iters", "1", "--spacing", "8", "--device", "cpu", "--affine-only"]) == 0
    assert "n/a" in capsys.readouterr().out


def test_non_orthonormal_fixed_direction_is_warned_about(tmp_path, capfd, icbm_t1, colin_t1):
    image = sitk.ReadImage(str(icbm_t1), sitk.sitkFloat32)
    direction = np.array([[-1.0, 0.2, 0.0], [0.0, -0.98, 0.0], [0.0, 0.0, 1.0]])
    image.SetDirection(tuple((direction / np.linalg.norm(direction, axis=0)).reshape(-1)))
    fixed = tmp_path / "sheared.mha"  # MetaImage keeps any direction; NIfTI does not
    sitk.WriteImage(image, str(fixed))
    capfd.readouterr()  # ITK's notes about the NIfTI header items .mha cannot hold
    out = tmp_path / "out"
    code = run(["register", str(fixed), str(colin_t1), "-o", str(out), "--json", "--iters", "1", "--spacing", "8", "--device", "cpu", "--affine-only"])
    captured = capfd.readouterr()
    assert code == 0, captured.err
    warnings = [line for line in captured.err.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and "not orthonormal" in warnings[0] and "nearest orthonormal direction" in warnings[0]
    assert "WARNING" not in captured.err  # ITK's own multi-line warning is replaced by gvsl's line
    assert any("not orthonormal" in note for note in json.loads(captured.out)["notes"])
    # The outputs carry exactly the direction the warning describes.
    written = np.array(sitk.ReadImage(str(out / "moved.nii.gz")).GetDirection()).reshape(3, 3)
    assert np.allclose(written, Geometry.of(image).nearest_orthogonal_direction(), atol=1e-5)
    shift = Geometry.of(image).orthogonalization_shift_mm()
    assert f"{shift:.3g} mm" in warnings[0]


def test_float_label_values_keep_their_exact_names(tmp_path, capsys, icbm_t1, colin_t1, icbm_labels, colin_labels):
    from gvsl_cli.warping import dice_scores

    assert dice_scores(np.array([0.0, 1.5, 1.0, 3.0]), np.array([0.0, 1.5, 1.0, 0.0])) == {1: 1.0, 1.5: 1.0, 3: 0.0}
    scaled = {}
    for name, path in (("fixed", icbm_labels), ("moving", colin_labels)):
        scaled[name] = tmp_path / f"{name}_labels.nii.gz"
        sitk.WriteImage(sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32) * 1.5, str(scaled[name]))
    out = tmp_path / "out"
    code = run(["register", str(icbm_t1), str(colin_t1), "-o", str(out), "--json", "--moving-labels", str(scaled["moving"]), "--fixed-labels", str(scaled["fixed"]), "--iters", "1", "--spacing", "8", "--device", "cpu", "--affine-only"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert set(json.loads(captured.out)["dice"]["labels"]) == {"1.5", "3"}


def test_apply_refuses_a_register_folder_without_report(tmp_path, capsys, icbm_t1, colin_t1):
    out = tmp_path / "reg"
    assert run(["register", str(icbm_t1), str(colin_t1), "-o", str(out), "--iters", "1", "--spacing", "8", "--device", "cpu", "--affine-only"]) == 0
    (out / "report.json").unlink()  # as after a run killed while writing
    capsys.readouterr()
    code = run(["apply", str(colin_t1), "-t", str(out), "-o", str(tmp_path / "warped")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no report.json, so no complete gvsl register run" in err[0], err
    assert not (tmp_path / "warped").exists()
    # Naming the field itself is the explicit way to use it.
    assert run(["apply", str(colin_t1), "-t", str(out / "displacement.nii.gz"), "-o", str(tmp_path / "warped")]) == 0


def test_sigterm_leaves_no_new_output_folder_and_the_previous_outputs(tmp_path, icbm_t1, colin_t1):
    # A real signal to a real process (SLURM's time limit, preemption, kill): the handler
    # of cli.run turns it into an exception while the registration works.
    import signal
    import subprocess
    import sys

    script = (
        "import sys, time\n"
        "from gvsl_cli import registration_job\n"
        "def slow(*args, **kwargs):\n"
        "    print('registering', flush=True)\n"
        "    time.sleep(120)\n"
        "registration_job.register = slow\n"
        "from gvsl_cli.cli import run\n"
        "sys.exit(run(sys.argv[1:]))\n"
    )
    previous = tmp_path / "previous"
    previous.mkdir()
    for name in ("report.json", "moved.nii.gz", "displacement.nii.gz", "affine.tfm"):
        (previous / name).write_text("previous run")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    for out in (tmp_path / "new" / "reg", previous):
        before = _files(out) if out.exists() else None
        process = subprocess.Popen([sys.executable, "-c", script, "register", str(icbm_t1), str(colin_t1), "-o", str(out), *QUICK],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            assert process.stdout.readline().strip() == "registering", process.stderr.read()
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == 143
        finally:
            if process.poll() is None:
                process.kill()
        assert process.stderr.read().strip().splitlines()[-1] == "aborted (SIGTERM)"
        if before is None:
            assert not (tmp_path / "new").exists()  # the folders it created, removed again
        else:
            assert _files(out) == before and sorted(p.name for p in out.iterdir()) == sorted(before)


def test_a_second_register_into_a_folder_in_use_is_refused(tmp_path, capsys, icbm_t1, colin_t1):
    from gvsl_cli.locking import exclusive_output_folder

    out = tmp_path / "out"
    out.mkdir()
    args = ["register", str(icbm_t1), str(colin_t1), "-o", str(out), "--iters", "1", "--spacing", "8", "--device", "cpu", "--affine-only"]
    with exclusive_output_folder(out, "register"):
        assert run(args) == 2
        assert "another gvsl register (pid " in capsys.readouterr().err
    assert list(out.iterdir()) == []
    assert run(args) == 0 and not (out / ".gvsl-output.lock").exists()


def test_a_single_slice_fixed_image_is_refused(tmp_path, capsys, icbm_t1, colin_t1):
    # Its displacement field would be written as (x, y, 1, 1, 3) and read back as 2D.
    sitk.WriteImage(sitk.ReadImage(str(icbm_t1))[:, :, 40:41], str(tmp_path / "slice.nii.gz"))
    out = tmp_path / "out"
    assert run(["register", str(tmp_path / "slice.nii.gz"), str(colin_t1), "-o", str(out), *QUICK]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path / 'slice.nii.gz'}: fixed image is a single slice (size (") and "\n" not in err
    assert not out.exists()


@pytest.mark.parametrize("role", ["fixed", "moving"])
def test_a_blank_image_is_refused_before_any_work(tmp_path, capsys, role, icbm_t1, colin_t1):
    # A blank series (or a mask given where the image belongs) was "registered": exit 0,
    # NCC 0 before and after, and a 17 mm centre-of-mass shift written as the affine.
    blank = sitk.ReadImage(str(colin_t1)) * 0
    sitk.WriteImage(blank, str(tmp_path / "blank.nii.gz"))
    images = [str(tmp_path / "blank.nii.gz"), str(colin_t1)] if role == "fixed" else [str(icbm_t1), str(tmp_path / "blank.nii.gz")]
    out = tmp_path / "out"
    assert run(["register", *images, "-o", str(out), *QUICK]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path / 'blank.nii.gz'}: {role} image has constant intensity (all voxels 0); nothing to register") and "\n" not in err
    assert not out.exists()


def _ramp(tmp_path) -> Path:
    """A 12×4×4 image of 1 mm voxels at the origin whose value is the voxel's x index."""
    ramp = np.broadcast_to(np.arange(12, dtype=np.float32), (4, 4, 12)).copy()
    path = tmp_path / "ramp.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(ramp), str(path))
    return path


def test_apply_chains_transforms_as_ants_does(tmp_path, capsys):
    """antsApplyTransforms -t A -t B maps an output point x to B(A(x)): the first -t acts
    first (ANTs' own registrations are applied as -t 1Warp.nii.gz -t 0GenericAffine.mat).
    Checked against ANTs (antspyx 0.6.3) in review: -t scale2 -t translate1 reads 7 at x = 3."""
    ramp = _ramp(tmp_path)
    scale = sitk.AffineTransform(3)
    scale.SetMatrix((2, 0, 0, 0, 1, 0, 0, 0, 1))
    sitk.WriteTransform(scale, str(tmp_path / "scale2.tfm"))
    sitk.WriteTransform(sitk.TranslationTransform(3, (1.0, 0.0, 0.0)), str(tmp_path / "translate1.tfm"))

    def value_at_3(*transforms: str) -> float:
        out = tmp_path / "-".join(transforms)
        chain = [arg for name in transforms for arg in ("-t", str(tmp_path / f"{name}.tfm"))]
        assert run(["apply", str(ramp), *chain, "-r", str(ramp), "-o", str(out), "-q"]) == 0
        return float(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "ramp_warped.nii.gz")))[2, 2, 3])

    assert value_at_3("scale2", "translate1") == 7.0  # translate1(scale2(3)) = 2·3 + 1
    assert value_at_3("translate1", "scale2") == 8.0  # scale2(translate1(3)) = 2·(3 + 1)


def test_apply_takes_its_grid_from_the_first_transform_only(tmp_path, capsys):
    """The first -t acts on output points, so its field's grid is the output grid; a field
    further down the chain lives in another image's space and gives no grid."""
    ramp = _ramp(tmp_path)
    field_grid = sitk.Image([6, 5, 4], sitk.sitkVectorFloat64, 3)
    field_grid.SetSpacing((2.0, 1.0, 1.0))
    field_grid.SetOrigin((0.5, 0.0, 0.0))
    field = tmp_path / "shift.nii.gz"
    sitk.WriteImage(field_grid + 0.0, str(field))  # a zero displacement on its own grid
    affine = tmp_path / "translate1.tfm"
    sitk.WriteTransform(sitk.TranslationTransform(3, (1.0, 0.0, 0.0)), str(affine))

    assert run(["apply", str(ramp), "-t", str(field), "-t", str(affine), "-o", str(tmp_path / "a"), "-q"]) == 0
    warped = sitk.ReadImage(str(tmp_path / "a" / "ramp_warped.nii.gz"))
    assert warped.GetSize() == (6, 5, 4) and warped.GetSpacing() == (2.0, 1.0, 1.0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(warped)[0, 0], [1.5, 3.5, 5.5, 7.5, 9.5, 0.0])  # x + 1; 11.5 is outside the ramp

    assert run(["apply", str(ramp), "-t", str(affine), "-t", str(field), "-o", str(tmp_path / "b")]) == 2
    assert "no output grid: the first -t is not a displacement field" in capsys.readouterr().err


def test_an_image_a_few_mm_wide_registered_to_itself_stays_in_place(tmp_path, colin_t1):
    # Micro-CT scale: the affine's translation moved by ~1 mm steps whatever the image's
    # size, so a 3.6 mm wide image registered to itself left its own field of view.
    image = sitk.ReadImage(str(colin_t1))
    image.SetSpacing((0.02, 0.02, 0.02))
    image.SetOrigin((0.0, 0.0, 0.0))
    sitk.WriteImage(image, str(tmp_path / "micro.nii.gz"))
    out = tmp_path / "out"
    assert run(["register", str(tmp_path / "micro.nii.gz"), str(tmp_path / "micro.nii.gz"), "-o", str(out), "--iters", "20", "--affine-only", "--device", "cpu", "-q"]) == 0
    affine = sitk.ReadTransform(str(out / "affine.tfm"))
    shift = np.abs(np.array(affine.GetParameters()[-3:])).max()
    assert shift < 0.05 * 0.02 * 90, shift  # under 5 % of the 1.8 mm box (it was 2.5 mm)
