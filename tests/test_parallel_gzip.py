"""Parallel gzip: one gzip member, the written bytes back through every kind of reader."""

from __future__ import annotations

import gzip
import io
import zlib

import numpy as np
import pytest
import SimpleITK as sitk

from gvsl_cli.parallel_gzip import ParallelGzipWriter


def _first_member(data: bytes) -> bytes:
    """What a reader that stops after the first gzip member gets (Rust's flate2
    GzDecoder, older fflate, a plain zlib inflate loop)."""
    return zlib.decompressobj(31).decompress(data)


@pytest.mark.parametrize("pieces", [[b""], [b"abc"], [b"x" * 10, b"y" * 7, b"", b"z" * 25], [bytes(range(256)) * 3]])
def test_one_member_decompresses_to_the_written_bytes_whatever_the_cuts(pieces):
    out = io.BytesIO()
    with ParallelGzipWriter(out, threads=3, block_bytes=8) as writer:
        for piece in pieces:
            writer.write(piece)
    data = b"".join(pieces)
    assert gzip.decompress(out.getvalue()) == data
    assert _first_member(out.getvalue()) == data  # a single member: nothing after it


def test_a_buffer_changed_after_write_does_not_change_the_file():
    values = np.arange(1000, dtype=np.float32)
    out = io.BytesIO()
    with ParallelGzipWriter(out, threads=2, block_bytes=512) as writer:
        writer.write(memoryview(values))
        values[:] = -1  # the caller reuses its array at once
    assert np.array_equal(np.frombuffer(gzip.decompress(out.getvalue()), dtype=np.float32), np.arange(1000, dtype=np.float32))


def test_itk_and_a_first_member_reader_read_a_many_block_vector_nifti(tmp_path, monkeypatch):
    """A map compressed in many blocks reads back whole through ITK's NIfTI reader and a
    reader that stops after the first gzip member."""
    from gvsl_cli import parallel_gzip
    from gvsl_cli.geometry import Geometry
    from gvsl_cli.io import write_vector_nifti

    monkeypatch.setattr(parallel_gzip, "BLOCK_BYTES", 4096)  # 12 blocks of the 46 kB
    grid = Geometry(size=(20, 16, 12), spacing=(1.0, 2.0, 1.5), origin=(3.0, -4.0, 5.0), direction=(1, 0, 0, 0, 0, -1, 0, 1, 0))
    rng = np.random.default_rng(0)
    components = rng.normal(size=(3, 12, 16, 20)).astype(np.float32)
    path = write_vector_nifti(tmp_path / "map.nii.gz", grid, 3, lambda k: components[k])
    assert len(_first_member(path.read_bytes())) == 352 + components.nbytes
    image = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), np.moveaxis(components, 0, -1))
    np.testing.assert_allclose(image.GetDirection(), grid.direction, atol=1e-6)
