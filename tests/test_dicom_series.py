"""DICOM series: missing, duplicated or damaged slices are refused in one line, not
interpolated by ITK's series reader; file names that are not UTF-8 are read."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from gvsl_cli.dicom_series import uneven_gap
from gvsl_cli.errors import InputError
from gvsl_cli.io import is_volume_path, read_volume


def small_volume() -> sitk.Image:
    """A 6×5×9 int16 volume, 3 mm slices, axial."""
    array = np.random.default_rng(0).integers(-500, 500, size=(9, 5, 6)).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.9, 0.8, 3.0))
    image.SetOrigin((-10.0, 20.0, -4.5))
    return image


def write_series(folder: Path, image: sitk.Image, name=lambda k: f"s{k:03d}.dcm", staging: Path | None = None) -> list[Path]:
    """One DICOM file per slice with its position (IPP) and orientation (IOP)."""
    os.makedirs(folder, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    paths = []
    for k in range(image.GetDepth()):
        slice_ = image[:, :, k]
        for tag, value in (
            ("0020|000e", "1.2.826.0.1.3680043.2.1125.1.777"),
            ("0020|0032", "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k)))),
            ("0020|0037", "1\\0\\0\\0\\1\\0"),
            ("0020|0013", str(k + 1)),
            ("0028|0030", f"{image.GetSpacing()[1]:g}\\{image.GetSpacing()[0]:g}"),  # rows (y), then columns (x)
            ("0008|0060", "CT"),
        ):
            slice_.SetMetaData(tag, value)
        path = Path(folder) / name(k)
        # The writer's own path is ASCII (``staging``); the slice is moved after (names may not be UTF-8).
        written = Path(staging or folder) / "writing.dcm"
        writer.SetFileName(str(written))
        writer.Execute(slice_)
        os.replace(written, path)
        paths.append(path)
    return paths


def test_uneven_gap_names_the_gap_and_tolerates_rounding():
    assert uneven_gap([0.0, 3.0, 6.0, 9.0]) is None
    assert uneven_gap([0.0, 3.0, 6.004, 9.0]) is None  # 0.004 mm: DS rounding, under 0.01 mm
    assert uneven_gap([9.0, 0.0, 6.0, 3.0]) is None  # any order
    assert uneven_gap([0.0, 3.0]) is None  # two slices: nothing to compare
    assert uneven_gap(None) is None  # no positions in the headers
    assert uneven_gap([0.0, 3.0, 6.0, 15.0, 18.0]) == "gap of 9 mm after slice 3 of 5 (the others 3 mm)"
    assert uneven_gap([0.0, 3.0, 3.0, 6.0, 9.0]) == "two slices at the same position (after slice 2 of 5; the others 3 mm apart)"


def test_evenly_spaced_series_stored_with_few_decimals_are_read_and_echoes_are_named():
    # A complete 0.625 mm CT whose positions are stored to 0.01 mm was refused as uneven
    # (gaps 0.62 / 0.63 mm); so were oblique series stored to 0.1 mm.
    import math

    from gvsl_cli.dicom_series import _last_decimal_place, repeated_positions

    axial = [round(-54.375 + 0.625 * k, 2) for k in range(40)]
    assert uneven_gap(axial, rounding=0.005) is None
    angle = math.radians(30)
    normal = (0.0, math.sin(angle), math.cos(angle))
    stored = [[round(c, 1) for c in (0.0, -k * 0.5 * normal[1], k * 0.5 * normal[2])] for k in range(200)]
    oblique = [sum(n * c for n, c in zip(normal, point)) for point in stored]
    assert uneven_gap(oblique, rounding=0.5 * 0.1 * sum(map(abs, normal))) is None
    assert uneven_gap(axial[:20] + axial[21:], rounding=0.005) == "gap of 1.25 mm after slice 20 of 39 (the others 0.63 mm)"
    assert _last_decimal_place("-54.38") == 0.01 and _last_decimal_place("12") == 1.0 and _last_decimal_place("1.5e-2") == 0.001
    # Multi-echo or 4D: every position twice. Not a damaged series, and not one volume.
    assert repeated_positions([p for k in range(20) for p in (3.0 * k, 3.0 * k)]) == "2 slices at each of 20 positions"
    assert repeated_positions(axial) is None and repeated_positions([0.0, 3.0, 3.0, 6.0]) is None


def test_missing_slices_are_refused_naming_the_gap_without_itk_warnings(tmp_path, capfd, restore_locale):
    image = small_volume()
    folder = tmp_path / "series"
    paths = write_series(folder, image)
    back = read_volume(folder)  # whole: read as before
    assert np.allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-4)
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    for path in paths[4:6]:
        path.unlink()
    with pytest.raises(InputError, match=r"missing or unevenly spaced slices: gap of 9 mm after slice 4 of 7 \(the others 3 mm\)") as caught:
        read_volume(folder)
    assert str(folder) in str(caught.value)
    assert "WARNING" not in capfd.readouterr().err  # ITK's itkImageSeriesReader.hxx lines


def test_truncated_slice_is_named(tmp_path, restore_locale):
    folder = tmp_path / "series"
    paths = write_series(folder, small_volume())
    paths[3].write_bytes(paths[3].read_bytes()[:300])  # an interrupted copy
    with pytest.raises(InputError, match=r"gap of 6 mm after slice 3 of 8.*1 file\(s\) in the folder could not be read as slices \(s003.dcm"):
        read_volume(folder)
    # Beside evenly spaced slices, an unreadable file (here the last slice cut short; or an
    # object that is no slice: a structured report, an RT structure set) leaves the
    # geometry right: the series is read, without that slice.
    paths[-1].write_bytes(paths[-1].read_bytes()[:300])
    whole = small_volume()
    write_series(tmp_path / "whole", whole)
    (tmp_path / "whole" / "s008.dcm").write_bytes(paths[-1].read_bytes())
    (tmp_path / "whole" / "README.txt").write_text("not DICOM, ignored")
    back = read_volume(tmp_path / "whole")
    assert back.GetSize() == (6, 5, 8) and np.allclose(back.GetSpacing(), whole.GetSpacing())


def test_series_with_non_utf8_folder_and_slice_names(tmp_path, restore_locale):
    folder = Path(os.fsdecode(os.fsencode(tmp_path) + b"/s\xe9rie"))
    try:
        folder.mkdir()
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    image = small_volume()
    write_series(folder, image, name=lambda k: os.fsdecode(b"caf\xe9%03d.dcm" % k), staging=tmp_path)
    assert is_volume_path(folder)
    back = read_volume(folder)
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
