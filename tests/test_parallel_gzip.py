"""Parallel gzip members: the same bytes back through Python's gzip and ITK's reader."""

from __future__ import annotations

import gzip
import io

import numpy as np
import pytest
import SimpleITK as sitk

from gvsl_cli.parallel_gzip import ParallelGzipWriter


@pytest.mark.parametrize("pieces", [[b""], [b"abc"], [b"x" * 10, b"y" * 7, b"", b"z" * 25], [bytes(range(256)) * 3]])
def test_members_decompress_to_the_written_bytes_whatever_the_cuts(pieces):
    out = io.BytesIO()
    with ParallelGzipWriter(out, threads=3, block_bytes=8) as writer:
        for piece in pieces:
            writer.write(piece)
    data = b"".join(pieces)
    assert gzip.decompress(out.getvalue()) == data
    # One member per started block of 8 bytes (an empty stream is one empty member).
    assert out.getvalue().count(b"\x1f\x8b\x08") >= max(1, -(-len(data) // 8))


def test_a_buffer_changed_after_write_does_not_change_the_file():
    values = np.arange(1000, dtype=np.float32)
    out = io.BytesIO()
    with ParallelGzipWriter(out, threads=2, block_bytes=512) as writer:
        writer.write(memoryview(values))
        values[:] = -1  # the caller reuses its array at once
    assert np.array_equal(np.frombuffer(gzip.decompress(out.getvalue()), dtype=np.float32), np.arange(1000, dtype=np.float32))


def test_itk_reads_a_many_member_vector_nifti(tmp_path, monkeypatch):
    """ITK's NIfTI reader (zlib's gzread) reads a file of many members as one stream."""
    from gvsl_cli import parallel_gzip
    from gvsl_cli.geometry import Geometry
    from gvsl_cli.io import write_vector_nifti

    monkeypatch.setattr(parallel_gzip, "BLOCK_BYTES", 4096)  # 12 members of the 46 kB
    grid = Geometry(size=(20, 16, 12), spacing=(1.0, 2.0, 1.5), origin=(3.0, -4.0, 5.0), direction=(1, 0, 0, 0, 0, -1, 0, 1, 0))
    rng = np.random.default_rng(0)
    components = rng.normal(size=(3, 12, 16, 20)).astype(np.float32)
    path = write_vector_nifti(tmp_path / "map.nii.gz", grid, 3, lambda k: components[k])
    assert path.read_bytes().count(b"\x1f\x8b\x08") >= 12
    image = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), np.moveaxis(components, 0, -1))
    np.testing.assert_allclose(image.GetDirection(), grid.direction, atol=1e-6)
