"""Geometry survives read/write for every format; bad files raise errors that name them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from gvsl_cli.errors import InputError
from gvsl_cli.geometry import Geometry
from gvsl_cli.io import is_volume_path, read_volume, write_transform, write_volume


def oblique_volume(pixel_type=sitk.sitkInt16) -> sitk.Image:
    rng = np.random.default_rng(0)
    array = rng.integers(-1000, 1000, size=(7, 8, 9)).astype(np.int16)
    image = sitk.Cast(sitk.GetImageFromArray(array), pixel_type)
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((-12.5, 30.25, 4.0))
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    image.SetDirection(rotation.flatten().tolist())
    return image


@pytest.mark.parametrize("name", ["v.nii.gz", "v.nii", "v.nrrd", "v.mha", "v.mhd"])
def test_geometry_and_values_survive_round_trip(tmp_path, name):
    image = oblique_volume()
    path = write_volume(image, tmp_path / name)
    back = read_volume(path)
    assert Geometry.of(back).is_close(Geometry.of(image), atol=1e-5)
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # no temporary left


def test_dicom_series_round_trip(tmp_path, restore_locale):
    image = oblique_volume()
    # Keep a plain axial orientation: DICOM slices are written along the normal.
    image.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))
    folder = tmp_path / "series"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125.1.12345"
    for k in range(image.GetDepth()):
        slice_ = image[:, :, k]
        for tag, value in (
            ("0020|000e", series_uid),
            ("0020|0032", "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k)))),
            ("0020|0037", "1\\0\\0\\0\\1\\0"),
            ("0020|0013", str(k + 1)),
            ("0028|0030", "0.8\\0.7"),
            ("0018|0050", "2.5"),
            ("0008|0060", "CT"),
        ):
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_)
    assert is_volume_path(folder)
    back = read_volume(folder)
    assert back.GetSize() == image.GetSize()
    assert np.allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-4)
    assert np.allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-4)
    assert np.allclose(back.GetDirection(), image.GetDirection(), atol=1e-6)
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


def test_vector_field_round_trip(tmp_path):
    field = np.random.default_rng(1).normal(size=(5, 6, 7, 3))
    image = sitk.GetImageFromArray(field, isVector=True)
    image.SetSpacing((1.5, 1.5, 2.0))
    path = write_volume(image, tmp_path / "field.nii.gz")
    back = read_volume(path, vector=True)
    assert np.allclose(sitk.GetArrayFromImage(back), field)
    with pytest.raises(InputError, match="expected a scalar volume"):
        read_volume(path)


def test_transform_written_atomically(tmp_path):
    transform = sitk.AffineTransform(3)
    transform.SetTranslation((1.0, 2.0, 3.0))
    path = write_transform(transform, tmp_path / "affine.tfm")
    assert np.allclose(sitk.ReadTransform(str(path)).GetParameters()[-3:], (1, 2, 3))


def test_2d_image_refused(tmp_path):
    path = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.Image(5, 5, sitk.sitkFloat32), str(path))
    with pytest.raises(InputError, match=r"flat\.nii\.gz: expected a 3D volume, got a 2D image"):
        read_volume(path)


def test_4d_image_refused(tmp_path):
    path = tmp_path / "time.nii.gz"
    sitk.WriteImage(sitk.Image([4, 4, 4, 3], sitk.sitkFloat32), str(path))
    with pytest.raises(InputError, match=r"time\.nii\.gz: expected a 3D volume, got a 4D image"):
        read_volume(path)


def test_multicomponent_image_refused(tmp_path):
    path = tmp_path / "rgb.mha"
    sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkVectorUInt8, 3), str(path))
    with pytest.raises(InputError, match=r"rgb\.mha: expected a scalar volume, got 3 components"):
        read_volume(path)


@pytest.mark.parametrize("name", ["nan.mha", "nan.nrrd"])
def test_nan_volume_refused(tmp_path, name):
    # (ITK's NIfTI reader itself turns NaN into 0, so NIfTI never shows NaN to gvsl.)
    array = np.zeros((4, 4, 4), np.float32)
    array[1, 2, 3] = np.nan
    path = tmp_path / name
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    with pytest.raises(InputError, match=name.replace(".", r"\.") + ": 1 of 64 voxels are NaN"):
        read_volume(path)


@pytest.mark.parametrize("content", [b"", b"this is not an image"])
def test_unreadable_and_empty_files_refused(tmp_path, content):
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(content)
    with pytest.raises(InputError, match=r"broken\.nii\.gz"):
        read_volume(path)


def test_missing_file_and_empty_folder(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_volume(tmp_path / "missing.nii.gz")
    with pytest.raises(InputError, match="no DICOM series"):
        read_volume(tmp_path)


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(InputError, match="unknown output format"):
        write_volume(oblique_volume(), tmp_path / "out.xyz")
    assert list(tmp_path.iterdir()) == []


def test_written_files_get_normal_permissions_not_private(tmp_path):
    import os

    import SimpleITK as sitk

    from gvsl_cli.io import write_volume

    path = write_volume(sitk.Image(4, 4, 4, sitk.sitkUInt8), tmp_path / "out.nii.gz")
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~umask)


# --- Incomplete files: ITK reads a truncated NIfTI without error, filling zeros. ---


def nifti_bytes(tmp_path, compress: bool) -> bytes:
    """An intact NIfTI file (the oblique int16 volume) as bytes."""
    path = write_volume(oblique_volume(), tmp_path / ("whole.nii.gz" if compress else "whole.nii"), compress=compress)
    return path.read_bytes()


@pytest.mark.parametrize("name", ["cut.nii.gz", "cut.nii"])
def test_truncated_nifti_refused(tmp_path, name):
    data = nifti_bytes(tmp_path, compress=name.endswith(".gz"))
    path = tmp_path / name
    path.write_bytes(data[: len(data) * 2 // 3])
    reason = "truncated or corrupt gzip data" if name.endswith(".gz") else r"file is truncated \(\d+ bytes; its NIfTI header needs \d+\)"
    with pytest.raises(InputError, match=name.replace(".", r"\.") + ": cannot read: " + reason) as info:
        read_volume(path)
    assert "copy it again" in info.value.hint


def test_gzip_stream_complete_but_short_refused(tmp_path):
    # A valid gzip whose content stops 10 bytes early (a writer that died): ISIZE differs, so
    # the stream is decompressed and found shorter than the header needs.
    import gzip

    raw = gzip.decompress(nifti_bytes(tmp_path, compress=True))
    path = tmp_path / "short.nii.gz"
    path.write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(InputError, match=r"short\.nii\.gz: cannot read: truncated or corrupt gzip data \(it holds \d+ bytes, the NIfTI header needs \d+\)"):
        read_volume(path)


@pytest.mark.parametrize("layout", ["two members", "zero padding", "trailing garbage", "extra data", "uncompressed under .gz"])
def test_unusual_but_complete_nifti_gz_still_read(tmp_path, layout):
    # The gzip trailer (ISIZE) only describes the last member, so these layouts fail the
    # quick check; the full check must then accept them, as ITK reads them whole.
    import gzip

    raw = gzip.decompress(nifti_bytes(tmp_path, compress=True))
    data = {
        "two members": gzip.compress(raw[:500]) + gzip.compress(raw[500:]),
        "zero padding": gzip.compress(raw) + b"\0" * 100,
        "trailing garbage": gzip.compress(raw) + b"garbage!",
        "extra data": gzip.compress(raw + b"bytes after the voxels"),
        "uncompressed under .gz": raw,
    }[layout]
    path = tmp_path / "odd.nii.gz"
    path.write_bytes(data)
    back = read_volume(path)
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(oblique_volume()))


@pytest.mark.parametrize("name", ["cut.mha", "cut.nrrd"])
def test_truncated_metaimage_and_nrrd_refused(tmp_path, name):
    whole = write_volume(oblique_volume(), tmp_path / ("whole" + name[3:]), compress=False)
    data = whole.read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InputError, match=name.replace(".", r"\.") + r": cannot read: .*truncated") as info:
        read_volume(tmp_path / name)
    assert "Exception thrown" not in str(info.value)


# --- Read errors in words, without ITK's own lines on stderr. ---


@pytest.mark.parametrize("name", ["fake.nii", "fake.nii.gz", "fake.nrrd"])
def test_non_image_file_reason(tmp_path, name):
    path = tmp_path / name
    path.write_text("this is text\n", encoding="utf-8")
    with pytest.raises(InputError) as info:
        read_volume(path)
    assert str(info.value) == f"{path}: cannot read: not a NIfTI/NRRD/MetaImage file (unrecognised header)"
    assert "Exception thrown" not in str(info.value) and ".cxx" not in str(info.value)


@pytest.mark.parametrize("name", ["x.mhd", "x.nhdr"])
def test_missing_data_file_named(tmp_path, name, capfd):
    header = write_volume(oblique_volume(), tmp_path / name, compress=False)
    data_file = next(p for p in tmp_path.iterdir() if p != header)
    data_file.unlink()
    with pytest.raises(InputError) as info:
        read_volume(header)
    assert str(info.value) == f"{header}: cannot read: data file {data_file.name} named by the header is missing (looked for {data_file})"
    # MetaIO used to print "MetaImage: Read: Cannot open data file" on stderr.
    assert capfd.readouterr().err == ""


def big_endian_nifti(array: np.ndarray) -> bytes:
    """A minimal single-file NIfTI-1 in big-endian byte order (SimpleITK writes only little)."""
    import struct

    header = bytearray(352)  # 348-byte header + 4-byte extension flag; data at 352
    struct.pack_into(">i", header, 0, 348)
    struct.pack_into(">8h", header, 40, 3, *array.shape[::-1], 1, 1, 1, 1)  # dim
    struct.pack_into(">hh", header, 70, 4, 16)  # datatype int16, bitpix
    struct.pack_into(">8f", header, 76, *[1.0] * 8)  # pixdim
    struct.pack_into(">ff", header, 108, 352.0, 1.0)  # vox_offset, scl_slope
    header[344:348] = b"n+1\0"
    return bytes(header) + array.astype(">i2").tobytes()


@pytest.mark.parametrize("name", ["be.nii", "be.nii.gz"])
def test_big_endian_nifti_checked_too(tmp_path, name):
    import gzip

    array = np.arange(7 * 8 * 9, dtype=np.int16).reshape(7, 8, 9)
    data = big_endian_nifti(array)
    data = gzip.compress(data) if name.endswith(".gz") else data
    whole, cut = tmp_path / f"whole_{name}", tmp_path / f"cut_{name}"
    whole.write_bytes(data)
    cut.write_bytes(data[:-40])
    assert np.array_equal(sitk.GetArrayFromImage(read_volume(whole)), array)
    with pytest.raises(InputError, match="truncated"):
        read_volume(cut)


def test_nii_gz_is_read_even_when_a_nii_of_the_same_name_exists(tmp_path):
    # ITK, asked for x.nii.gz, reads x.nii when both exist (e.g. after `gunzip -k`).
    import numpy as np
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6), np.float32)), str(tmp_path / "x.nii"))
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((4, 5, 6), np.float32)), str(tmp_path / "x.nii.gz"))
    assert sitk.GetArrayFromImage(read_volume(tmp_path / "x.nii.gz")).min() == 1.0
    assert sitk.GetArrayFromImage(read_volume(tmp_path / "x.nii")).max() == 0.0


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names open files through /proc")
def test_atomic_writes_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    import os

    from gvsl_cli.io import atomic_path

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b))[1])
    target = tmp_path / "out.json"
    with atomic_path(target) as tmp:
        tmp.write_text("{}")
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync", "replace", "fsync"], events
    assert events[0][1].startswith(str(tmp_path / ".out.json.")) and events[2][1] == str(tmp_path)
    assert target.read_text() == "{}"


@pytest.mark.parametrize("name", ["out.nii", "out.nii.gz"])
@pytest.mark.parametrize("keep", [0, 0.5])
def test_a_short_nifti_write_is_an_error_not_a_finished_file(tmp_path, monkeypatch, name, keep):
    # ITK's NIfTI writer prints "** ERROR: NWAD" on a full disk and returns normally,
    # leaving an empty or cut file: that must not be renamed into place as the output.
    from gvsl_cli.io import write_volume

    image = sitk.GetImageFromArray(np.arange(16 * 16 * 16, dtype=np.float32).reshape(16, 16, 16))
    target = tmp_path / name
    write_volume(image, target)
    previous = target.read_bytes()
    real_write = sitk.WriteImage

    def write_then_run_out_of_space(img, file_name, *args):
        real_write(img, file_name, *args)
        data = Path(file_name).read_bytes()
        Path(file_name).write_bytes(data[: int(len(data) * keep)])

    monkeypatch.setattr(sitk, "WriteImage", write_then_run_out_of_space)
    with pytest.raises(InputError, match=r"the NIfTI writer left .* \(no space left on the device\?\)"):
        write_volume(image, target)
    assert target.read_bytes() == previous  # the earlier output is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporary file left


def test_an_error_without_a_path_inside_an_atomic_write_names_the_output(tmp_path):
    import errno

    from gvsl_cli.io import atomic_path

    target = tmp_path / "vector.npy"
    with pytest.raises(OSError) as raised:
        with atomic_path(target) as tmp:
            with open(tmp, "wb"):
                raise OSError(errno.ENOSPC, "No space left on device")  # as np.save on a full disk
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []


def test_an_output_name_near_the_file_name_limit_is_written(tmp_path):
    # 249 bytes fit in a file name (255); the temporary name must not push it over.
    target = tmp_path / ("n" * 242 + ".nii.gz")
    image = sitk.GetImageFromArray(np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    write_volume(image, target)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(target))), np.arange(24).reshape(2, 3, 4))
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_grid_differences_name_only_what_differs():
    image = sitk.Image(10, 12, 8, sitk.sitkUInt8)
    image.SetSpacing((2.0, 2.0, 3.0))
    image.SetOrigin((1.0, -2.0, 3.5))
    lps = Geometry.of(image)
    assert lps.differences(lps) == "" and lps.is_close(lps)
    # Only the direction differs (a label map saved through numpy without its direction).
    flipped = sitk.Image(image)
    flipped.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    assert Geometry.of(flipped).differences(lps) == "direction RAS vs LPS"
    # Same orientation code, another oblique angle: the cosines.
    oblique = sitk.Image(image)
    oblique.SetDirection(sitk.VersorTransform((0.0, 0.0, 1.0), 0.1).GetMatrix())
    assert Geometry.of(oblique).differences(lps).startswith("direction (0.995, -0.0998, 0.0,")
    moved = sitk.Image(image)
    moved.SetOrigin((1.0, -2.0, 4.0))
    assert Geometry.of(moved).differences(lps) == "origin (1.0, -2.0, 4.0) vs (1.0, -2.0, 3.5)"
    assert Geometry.of(moved).differences(lps, atol=1.0) == ""


@pytest.fixture
def latin1_folder(tmp_path):
    """A folder named ``dossier_é`` in Latin-1 bytes (not UTF-8), as from an old share."""
    folder = Path(os.fsdecode(os.fsencode(tmp_path) + b"/dossier_\xe9"))
    try:
        folder.mkdir()
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    return folder


@pytest.mark.parametrize("suffix", [".nii.gz", ".mhd", ".nhdr"])
def test_non_utf8_names_read_and_write(latin1_folder, suffix):
    # SimpleITK aborted the interpreter (SIGABRT) on such names; a crash here kills pytest.
    image = oblique_volume()
    path = latin1_folder / os.fsdecode(b"caf\xe9" + suffix.encode())
    write_volume(image, path)  # an output named after such an input, in such a folder
    back = read_volume(path)
    assert Geometry.of(back).is_close(Geometry.of(image), atol=1e-5)
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    assert not [p for p in latin1_folder.iterdir() if ".tmp" in p.name]
    transform = sitk.TranslationTransform(3, (1.0, -2.0, 3.5))
    transform_path = write_transform(transform, latin1_folder / os.fsdecode(b"caf\xe9.tfm"))
    from gvsl_cli.io import read_transform_file

    assert read_transform_file(transform_path).GetParameters() == (1.0, -2.0, 3.5)


def test_gvsl_info_lists_a_non_utf8_name(latin1_folder):
    import subprocess
    import sys

    write_volume(oblique_volume(), latin1_folder / "a.nii.gz")
    write_volume(oblique_volume(), latin1_folder / os.fsdecode(b"caf\xe9.nii.gz"))
    result = subprocess.run([sys.executable, "-m", "gvsl_cli", "info", latin1_folder], capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout.count(b"9\xc3\x978\xc3\x977") == 2  # "9×8×7" in both rows


@pytest.mark.parametrize("gzip_it", [False, True])
def test_nifti_headers_with_zero_voxel_sizes_or_dims_are_refused(tmp_path, gzip_it):
    # ITK read pixdim 0 (or NaN) as 1 mm, with an sform too, and dim[3] = 0 as one slice.
    import gzip
    import struct

    image = sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6))
    image.SetSpacing((2.0, 2.0, 3.0))
    sitk.WriteImage(image, str(tmp_path / "good.nii"))
    good = bytearray((tmp_path / "good.nii").read_bytes())
    cases = {
        "no_sform_zero_pixdim": {254: struct.pack("<h", 0), 80: struct.pack("<f", 0.0)},
        "nan_pixdim": {84: struct.pack("<f", float("nan"))},
        "zero_dim": {46: struct.pack("<h", 0)},
        "sform_zero_pixdim": {80: struct.pack("<f", 0.0)},
        "good": {},
    }
    for name, patches in cases.items():
        data = bytearray(good)
        for offset, value in patches.items():
            data[offset : offset + len(value)] = value
        path = tmp_path / (name + (".nii.gz" if gzip_it else ".nii"))
        path.write_bytes(gzip.compress(bytes(data)) if gzip_it else bytes(data))
        if name == "good":
            assert read_volume(path).GetSpacing() == pytest.approx((2.0, 2.0, 3.0))
            continue
        with pytest.raises(InputError, match="cannot read: its NIfTI header gives") as caught:
            read_volume(path)
        assert ("dim[3]" if name == "zero_dim" else "which ITK would read as 1 mm") in str(caught.value)


def test_float64_values_beyond_float32_are_refused(tmp_path):
    # They became inf in float32: embed saw a constant image, register NCC 0 / 0.
    array = np.ones((4, 5, 6), dtype=np.float64)
    array[1, 2, 3] = 1e302
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "huge.nii.gz"))
    with pytest.raises(InputError, match="values up to 1e\\+302 exceed float32's range"):
        read_volume(tmp_path / "huge.nii.gz")
    array[1, 2, 3] = 1e30  # within float32
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "large.nii.gz"))
    assert read_volume(tmp_path / "large.nii.gz").GetPixelID() == sitk.sitkFloat64
