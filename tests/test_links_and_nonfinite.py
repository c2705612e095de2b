"""Symbolic links in inputs (loops, linked folders) and NaN/inf voxels in NIfTI files.

Small volumes (a few KB) and ``gvsl info`` / ``register`` refusals only: nothing trains.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from gvsl_cli import data, file_checks
from gvsl_cli.cli import run
from gvsl_cli.errors import InputError
from gvsl_cli.io import read_volume
from gvsl_cli.paths import LINK_LOOP, real_path
from test_dicom_series import write_series


def _volume(path: Path, value_at_corner: float | None = None, dtype=np.float32) -> Path:
    """A 6x5x4 (x, y, z) volume of ramp values; one voxel set to ``value_at_corner``."""
    array = (np.arange(120, dtype=np.float64).reshape(4, 5, 6) + 1).astype(dtype)
    if value_at_corner is not None:
        array[1, 2, 3] = value_at_corner
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((2.0, 2.0, 3.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture
def linked(tmp_path) -> Path:
    """cohort/p01 real, p02 and p03 links into store/, a looping pair of file links, a link
    back up (a/up -> ..), a second link to p02's folder and a linked DICOM-like folder."""
    cohort, store = tmp_path / "cohort", tmp_path / "store"
    _volume(cohort / "p01" / "ct.nii.gz")
    _volume(store / "p02" / "ct.nii.gz")
    _volume(store / "p03" / "ct.nii.gz")
    (cohort / "p02").symlink_to(store / "p02", target_is_directory=True)
    (cohort / "p03").symlink_to(Path("..") / "store" / "p03", target_is_directory=True)
    (cohort / "p01" / "up").symlink_to("..", target_is_directory=True)
    (cohort / "l1.nii.gz").symlink_to("l2.nii.gz")
    (cohort / "l2.nii.gz").symlink_to("l1.nii.gz")
    return cohort


def test_linked_folders_are_searched_named_by_the_link_and_loops_are_one_line(linked):
    sources, skipped = data.discover_named([linked])
    assert sorted(s.name for s in sources) == ["p01/ct", "p02/ct", "p03/ct"]
    assert all(s.path.parent.name in ("p01", "p02", "p03") and str(s.path).startswith(str(linked)) for s in sources)
    assert sorted((Path(s.path).name, s.reason) for s in skipped) == [("l1.nii.gz", LINK_LOOP), ("l2.nii.gz", LINK_LOOP)]
    # Outputs mirror the link's path below the input folder, not the target's.
    assert sorted(data.output_subfolders(sources, lambda p: p.name)) == ["p01", "p02", "p03"]


def test_a_folder_with_several_names_is_searched_once_under_its_own_name(linked):
    # A second link to a folder searched already, and a link that sorts before its target
    # beside it ("latest -> p01"): the folder is searched once, under its real name when it
    # has one in the tree; nothing is skipped, since nothing goes unsearched.
    (linked / "zz").symlink_to(linked.parent / "store" / "p02", target_is_directory=True)
    (linked / "latest").symlink_to("p01", target_is_directory=True)
    sources, skipped = data.discover_named([linked])
    assert sorted(s.name for s in sources) == ["p01/ct", "p02/ct", "p03/ct"]
    assert not [s for s in skipped if not s.path.endswith(("l1.nii.gz", "l2.nii.gz"))]


def test_a_link_to_a_folder_above_the_input_ends_and_a_dicom_series_behind_a_link_is_found(tmp_path, restore_locale):
    series = tmp_path / "store" / "series"
    series.mkdir(parents=True)
    image = sitk.GetImageFromArray(np.arange(60, dtype=np.int16).reshape(3, 4, 5))
    image.SetSpacing((1.0, 1.0, 2.0))
    write_series(series, image, name=lambda z: f"s{z}.dcm")
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "one").symlink_to(series, target_is_directory=True)
    (folder / "top").symlink_to(tmp_path, target_is_directory=True)  # holds the input folder: a loop
    sources, skipped = data.discover_named([folder])
    assert [s.name for s in sources] == ["one"] and sources[0].path == Path(os.path.abspath(folder / "one"))
    assert skipped == []


def test_gvsl_info_reports_a_looping_link_and_lists_the_rest(linked, capsys):
    code = run(["info", str(linked), "--json"])
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines() if line.strip()]
    assert len(rows) == 3 and code == 7
    assert f"{linked / 'l1.nii.gz'}: symbolic link loop" in captured.err
    assert "internal error" not in captured.err


def test_register_refuses_a_looping_link_in_one_line(linked, tmp_path, capsys):
    code = run(["register", str(linked / "l1.nii.gz"), str(linked / "p01" / "ct.nii.gz"), "-o", str(tmp_path / "reg"), "-q"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"error: {linked / 'l1.nii.gz'}: symbolic link loop")
    assert "internal error" not in err and len(err.strip().splitlines()) == 1
    with pytest.raises(InputError, match="symbolic link loop"):
        real_path(linked / "l2.nii.gz")


def test_a_looping_link_in_a_path_list_is_named_as_such(linked, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"{linked / 'p01' / 'ct.nii.gz'}\n{linked / 'l1.nii.gz'}\n")
    sources, skipped = data.discover_named([listing])
    assert len(sources) == 1
    assert [s.reason for s in skipped] == ["listed in list.txt line 2 but is a symbolic link loop"]


# --------------------------------------------------------------------------- NaN and inf in NIfTI


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_nifti_nan_and_inf_are_refused_like_metaimage(tmp_path, value, suffix):
    nifti = _volume(tmp_path / f"bad{suffix}", value)
    mha = _volume(tmp_path / "bad.mha", value)
    with pytest.raises(InputError) as from_mha:
        read_volume(mha)
    with pytest.raises(InputError) as from_nifti:
        read_volume(nifti)
    assert str(from_nifti.value) == f"{nifti}: 1 of 120 voxels are NaN or infinite"
    assert str(from_mha.value) == f"{mha}: 1 of 120 voxels are NaN or infinite"
    assert from_nifti.value.hint == from_mha.value.hint
    # gvsl info shows it, marked, with the range of the finite voxels (as for MetaImage).
    image = read_volume(nifti, finite=False)
    assert sitk.GetArrayViewFromImage(image)[1, 2, 3] == 0  # what ITK made of it


def test_gvsl_info_marks_nifti_nan_voxels_and_ranges_over_the_finite_ones(tmp_path, capsys):
    nifti = _volume(tmp_path / "nan.nii.gz", np.nan)
    good = _volume(tmp_path / "good.nii.gz")
    code = run(["info", str(nifti), str(good), "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert code == 0
    assert [r["nonfinite_voxels"] for r in rows] == [1, 0]
    assert rows[0]["min"] == 1.0 and rows[0]["max"] == 120.0  # ITK's 0 is not counted as a value


def test_nifti_scan_reads_the_file_data_in_any_byte_order_and_scaling(tmp_path):
    """A big-endian NIfTI-1 with scl_slope 2, scl_inter 5 (ITK gives NaN voxels the value
    5 then), a gzip of two members, and a float64 file."""
    plain = _volume(tmp_path / "le.nii", np.nan)
    raw = bytearray(plain.read_bytes())
    header, voxels = raw[:352], np.frombuffer(bytes(raw[352:]), "<f4")
    big = bytearray(header)
    # Swap every header field to big-endian: sizes of the NIfTI-1 fields in order.
    fields = "i10s18sihcB8h3f4h8f3fhBB4f2i80s24s2h6f12f16s4s"
    assert struct.calcsize("<" + fields) == 348
    swapped = struct.pack(">" + fields, *struct.unpack("<" + fields, bytes(header[:348])))
    big[:348] = swapped
    big[112:120] = struct.pack(">2f", 2.0, 5.0)
    (tmp_path / "be.nii").write_bytes(bytes(big) + voxels.astype(">f4").tobytes())
    image = sitk.ReadImage(str(tmp_path / "be.nii"))
    assert image.GetPixel(3, 2, 1) == 5.0 and image.GetPixel(0, 0, 0) == 7.0  # ITK: NaN -> 0, then scaled
    assert file_checks.nifti_nonfinite_values(tmp_path / "be.nii", sitk.GetArrayViewFromImage(image)) == (1, 120)
    with pytest.raises(InputError, match="1 of 120 voxels are NaN or infinite"):
        read_volume(tmp_path / "be.nii")
    data_bytes = bytes(raw)
    with gzip.open(tmp_path / "two.nii.gz", "wb") as first:
        first.write(data_bytes[:1000])
    with open(tmp_path / "two.nii.gz", "ab") as handle:
        handle.write(gzip.compress(data_bytes[1000:]))
    assert file_checks.nifti_nonfinite_values(tmp_path / "two.nii.gz") == (1, 120)
    double = _volume(tmp_path / "f64.nii.gz", -np.inf, dtype=np.float64)
    mask = file_checks.nifti_nonfinite_mask(double)
    assert mask.shape == (4, 5, 6) and mask.sum() == 1 and mask[1, 2, 3]


def test_nifti_scan_skips_integer_files_and_files_without_the_stand_in_value(tmp_path, monkeypatch):
    assert file_checks.nifti_nonfinite_values(_volume(tmp_path / "i.nii.gz", dtype=np.int16)) is None
    clean = _volume(tmp_path / "clean.nii.gz")  # values 1..120: no 0, so no NaN/inf was there
    monkeypatch.setattr(file_checks, "SCAN_CHUNK_BYTES", 64)  # many chunks and slabs
    array = sitk.GetArrayViewFromImage(sitk.ReadImage(str(clean)))
    assert file_checks.nifti_nonfinite_values(clean, array) == (0, 120)
    assert file_checks.nifti_nonfinite_values(_volume(tmp_path / "n.nii.gz", np.nan)) == (1, 120)


def test_a_nan_in_a_nifti_displacement_field_is_found(tmp_path):
    field = np.zeros((4, 5, 6, 3), np.float32)
    field[1, 2, 3, 2] = np.nan
    image = sitk.GetImageFromArray(field, isVector=True)
    sitk.WriteImage(image, str(tmp_path / "field.nii.gz"))
    with pytest.raises(InputError, match="1 of 360 voxels are NaN or infinite"):
        read_volume(tmp_path / "field.nii.gz", vector=True)
    mask = file_checks.nifti_nonfinite_mask(tmp_path / "field.nii.gz", components=3)
    assert mask.shape == (4, 5, 6, 3) and np.argwhere(mask).tolist() == [[1, 2, 3, 2]]
