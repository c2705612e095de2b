"""Checks of volume files that ITK does not make, or makes with a cryptic message.

ITK reads a truncated NIfTI without error and fills the missing voxels with zeros, and it
reports a MetaImage or NRRD header whose data file is missing with a raw line on stderr and
a stale errno. ``file_problem`` looks at the headers (and a gzip file's 4-byte trailer)
before ITK reads the file and returns the reason in words; ``io.read_volume`` turns it into
a one-line error. Only problems that are certain are reported; anything unusual is left to
ITK.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np


def file_problem(path: Path, suffix: str | None) -> str | None:
    """Why ``path`` (a volume file ending in ``suffix``: ".nii.gz", ".mhd", ...) surely cannot
    be read correctly, from its header; None when no problem is seen.

    Cheap: reads headers and, for a .nii.gz, the 4-byte gzip trailer (a full decompression
    only when the trailer disagrees, e.g. a multi-member gzip). Only formats whose problems
    ITK misses or reports cryptically are checked; anything unusual is left to ITK.
    """
    if suffix in (".nii", ".nii.gz"):
        return _nifti_problem(path)
    if suffix in (".mhd", ".mha"):
        return _metaimage_problem(path)
    if suffix == ".nhdr":
        return _nrrd_detached_problem(path)
    return None


GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class NiftiLayout:
    """Where a single-file NIfTI-1/2 keeps its voxels, from its header.

    Attributes:
        endian: "<" or ">", the byte order of the header and the data.
        datatype: the NIfTI datatype code (16 float32, 64 float64, ...).
        values: how many values the data holds (the product of dim[1..dim[0]]).
        bytes_per_value: bitpix / 8.
        data_start: byte offset of the first value (vox_offset, at least the header size).
        dims: dim[1..dim[0]], x fastest in the file.
        scaling: (scl_slope, scl_inter); values are raw * slope + inter unless slope is 0.
    """

    endian: str
    datatype: int
    values: int
    bytes_per_value: int
    data_start: int
    dims: tuple[int, ...]
    scaling: tuple[float, float] = (0.0, 0.0)

    @property
    def data_end(self) -> int:
        return self.data_start + self.values * self.bytes_per_value


@dataclass(frozen=True)
class _NiftiHeader:
    """The fields of a NIfTI-1/2 header that gvsl checks, as stored (see ``_read_nifti_header``)."""

    endian: str
    single_file: bool  # magic "n+1" / "n+2" (not a .hdr/.img pair)
    datatype: int
    bitpix: int
    dims: tuple[int, ...]  # dim[0..7]
    pixdim: tuple[float, ...]  # pixdim[0..7]
    vox_offset: float
    scaling: tuple[float, float]
    size: int  # 348 or 540


#: Where NIfTI-1 (a 348-byte header) and NIfTI-2 (540) keep each field: (offset, struct
#: format), and the single-file magic (offset, bytes).
_NIFTI_FIELDS = {
    348: {"magic": (344, b"n+1\0"), "datatype": (70, "2h"), "dims": (40, "8h"), "pixdim": (76, "8f"), "vox_offset": (108, "f"), "scaling": (112, "2f")},
    540: {"magic": (4, b"n+2\0"), "datatype": (12, "2h"), "dims": (16, "8q"), "pixdim": (104, "8d"), "vox_offset": (168, "q"), "scaling": (176, "2d")},
}


def _read_nifti_header(header: bytes) -> _NiftiHeader | None:
    """The header fields of a NIfTI-1 (348 bytes) or NIfTI-2 (540) header in either byte
    order, or None when ``header`` is neither."""
    for endian in "<>":
        for size, fields in _NIFTI_FIELDS.items():
            if len(header) < size or struct.unpack_from(endian + "i", header)[0] != size:
                continue

            def read(name):
                offset, layout = fields[name]
                return struct.unpack_from(endian + layout, header, offset)

            magic_at, magic = fields["magic"]
            datatype, bitpix = read("datatype")
            return _NiftiHeader(
                endian,
                header[magic_at : magic_at + 4] == magic,
                datatype,
                bitpix,
                read("dims"),
                read("pixdim"),
                float(read("vox_offset")[0]),
                read("scaling"),
                size,
            )
    return None


def _nifti_layout(header: bytes) -> NiftiLayout | None:
    """The data layout of a plain single-file NIfTI-1/2 header with sane values, or None
    (a .hdr/.img pair, sub-byte voxels, odd dims: such files are left to ITK)."""
    fields = _read_nifti_header(header)
    if fields is None or not fields.single_file or not math.isfinite(fields.vox_offset):
        return None
    rank, dims, bitpix = fields.dims[0], fields.dims, fields.bitpix
    if not 1 <= rank <= 7 or any(d < 1 for d in dims[1 : rank + 1]) or bitpix < 8 or bitpix % 8:
        return None
    values = math.prod(dims[1 : rank + 1])
    # nifticlib never reads data from inside the header, whatever vox_offset says.
    data_start = max(int(fields.vox_offset), fields.size)
    return NiftiLayout(fields.endian, fields.datatype, values, bitpix // 8, data_start, tuple(dims[1 : rank + 1]), fields.scaling)


def _nifti_header_problem(header: bytes) -> str | None:
    """Refuse dimensions and spacings that ITK reads as something else without a word.

    A dim[k] below 1 (k <= dim[0]) is read as a one-slice volume. A voxel size (pixdim[1..3])
    of 0, NaN or infinity is read as 1 mm, whatever the sform says (ITK 5.4 takes the
    spacing from pixdim); MHA and NRRD with such spacings are refused by ITK itself.
    """
    fields = _read_nifti_header(header)
    if fields is None or not 1 <= fields.dims[0] <= 7:
        return None  # left to ITK
    rank, dims, pixdim = fields.dims[0], fields.dims, fields.pixdim
    for axis in range(1, rank + 1):
        if dims[axis] < 1:
            return f"its NIfTI header gives {dims[axis]} voxels along dim[{axis}] (at least 1 expected)"
    for axis in range(1, min(rank, 3) + 1):
        if not (math.isfinite(pixdim[axis]) and pixdim[axis] != 0):
            return f"its NIfTI header gives a voxel size (pixdim[{axis}]) of {pixdim[axis]:g}, which ITK would read as 1 mm"
    return None


def _nifti_data_end(header: bytes) -> int | None:
    """Bytes a single-file NIfTI-1/2 needs (vox_offset + voxels x bytes per voxel), or None
    (see ``_nifti_layout``)."""
    layout = _nifti_layout(header)
    return None if layout is None else layout.data_end


def _nifti_problem(path: Path) -> str | None:
    """Refuse a NIfTI file that holds fewer bytes than its header describes.

    ITK reads such a file without error and fills the missing voxels with zeros. An
    uncompressed file is checked by its size. A gzip file ends with ISIZE, the uncompressed
    size mod 2^32 of its last member: equal to what the header needs for an ordinary
    single-member file. Otherwise (a truncated file, but also a multi-member gzip or one with
    trailing bytes, both valid) the stream is decompressed once to decide for sure.
    """
    with open(path, "rb") as handle:
        start = handle.read(2)
        handle.seek(0)
        if start != GZIP_MAGIC:  # a plain .nii (or an uncompressed file named .nii.gz: ITK reads it)
            header = handle.read(540)
            problem = _nifti_header_problem(header)
            if problem:
                return problem
            needed = _nifti_data_end(header)
            size = path.stat().st_size
            if needed is not None and size < needed:
                return f"file is truncated ({size} bytes; its NIfTI header needs {needed})"
            return None
        try:
            header = zlib.decompressobj(wbits=31).decompress(handle.read(64 * 1024), 540)
        except zlib.error:
            return "corrupt gzip data (the compressed stream is damaged at its start)"
        problem = _nifti_header_problem(header)
        if problem:
            return problem
        needed = _nifti_data_end(header)
        if needed is None:
            return None
        handle.seek(-4, os.SEEK_END)
        (isize,) = struct.unpack("<I", handle.read(4))
        if isize == needed % 2**32:
            return None
        handle.seek(0)
        total, problem = _gzip_uncompressed_size(handle)
    if problem:
        return f"truncated or corrupt gzip data ({problem})"
    if total < needed:
        return f"truncated or corrupt gzip data (it holds {total} bytes, the NIfTI header needs {needed})"
    return None


def _gzip_uncompressed_size(handle) -> tuple[int, str | None]:
    """Decompress a gzip file from ``handle``, all members, keeping no output.

    Returns:
        (uncompressed bytes, None) for a complete stream, or (bytes so far, what is wrong).
        Bytes after the last member that do not start another one are ignored, as zlib's
        gzread (which ITK uses) ignores them.
    """
    total = 0
    decoder = zlib.decompressobj(wbits=31)
    buffer = b""
    while True:
        # 64 KiB in at a time: deflate expands at most ~1000x, so at most ~64 MiB out.
        chunk = handle.read(1 << 16)
        buffer += chunk
        while buffer:
            if decoder.eof:  # between members: another one, or trailing bytes
                if len(buffer) < 2 and chunk:  # a magic may straddle two reads
                    break
                if buffer[:2] != GZIP_MAGIC:
                    return total, None
                decoder = zlib.decompressobj(wbits=31)
            try:
                total += len(decoder.decompress(buffer))
            except zlib.error as exc:
                return total, f"zlib: {exc}"
            buffer = decoder.unused_data if decoder.eof else b""
        if not chunk:
            return (total, None) if decoder.eof else (total, "the compressed stream ends early")


def _header_lines(path: Path, limit: int = 64 * 1024) -> list[str]:
    """The lines at the start of ``path`` (a MetaImage or NRRD header), up to ``limit`` bytes.

    Each line keeps its line ending, so their lengths add up to byte offsets in the file.
    """
    with open(path, "rb") as handle:
        head = handle.read(limit)
    return [line.decode("latin-1") for line in head.splitlines(keepends=True)]


def _single_data_file(name: str) -> bool:
    """True when a header's data-file entry names one separate file.

    Not: LOCAL (data in the header's own file), LIST, "%d" patterns and "pattern first last
    step" forms, which name several files; those are left to ITK.
    """
    name = name.strip()
    return bool(name) and name.upper() not in ("LOCAL", "LIST") and "%" not in name and " " not in name


def _missing_data_file(path: Path, name: str) -> str | None:
    """The reason when the single data file ``name`` named by ``path``'s header is missing."""
    name = name.strip()
    if not _single_data_file(name):
        return None
    # The header was decoded as Latin-1 (one character a byte); the file system's own
    # decoding of the same bytes finds a data file whose name is not ASCII.
    data = path.parent / os.fsdecode(name.encode("latin-1"))
    if not data.is_file():
        where = f" (looked for {data})" if str(data) != name else ""
        return f"data file {name} named by the header is missing{where}"
    return None


def _metaimage_problem(path: Path) -> str | None:
    """Missing data file (.mhd) or too few data bytes (uncompressed .mha/.mhd), else None.

    MetaIO reports both on stderr ("MetaImage: Read: Cannot open data file") and ITK then
    raises an exception whose reason is a stale errno; checking first gives one clear line.
    """
    fields: dict[str, str] = {}
    header_bytes = 0
    for line in _header_lines(path):
        header_bytes += len(line)
        key, sep, value = line.partition("=")
        if not sep:
            return None  # not a MetaImage header: left to ITK
        fields[key.strip().lower()] = value.strip()
        if key.strip().lower() == "elementdatafile":  # always the last header field
            break
    else:
        return None
    data_name = fields["elementdatafile"]
    missing = _missing_data_file(path, data_name)
    if missing:
        return missing
    element_bytes = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
                     "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}
    try:
        dims = [int(v) for v in fields["dimsize"].split()]
        channels = int(fields.get("elementnumberofchannels", "1"))
        voxel_bytes = element_bytes[fields["elementtype"].upper()]
        skip = int(fields.get("headersize", "0"))
    except (KeyError, ValueError):
        return None
    compressed = fields.get("compresseddata", "false").lower() == "true"
    if compressed:
        needed = int(fields["compresseddatasize"]) if fields.get("compresseddatasize", "").isdigit() else None
    else:
        needed = voxel_bytes * channels
        for d in dims:
            needed *= d
    if needed is None or skip < 0:  # HeaderSize -1: data at the end of the file, sized by it
        return None
    local = data_name.upper() == "LOCAL"
    if not local and not _single_data_file(data_name):
        return None
    data_path = path if local else path.parent / os.fsdecode(data_name.encode("latin-1"))
    if local:
        needed += header_bytes
    size = data_path.stat().st_size
    if size < needed + skip:
        return f"file is truncated ({data_path.name} holds {size} bytes; the MetaImage header needs {needed + skip})"
    return None


def _nrrd_detached_problem(path: Path) -> str | None:
    """The reason when the data file a detached NRRD header (.nhdr) names is missing."""
    for line in _header_lines(path):
        if not line.strip():  # the blank line ends a NRRD header
            return None
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("data file", "datafile"):
            return _missing_data_file(path, value)
    return None


# --------------------------------------------------------------------------- NaN and inf in NIfTI

#: NIfTI datatype codes of float voxels -> numpy type (without the byte order).
NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}
#: Bytes decompressed and examined at a time: memory stays this small whatever the volume.
SCAN_CHUNK_BYTES = 1 << 22


def _float_nifti_chunks(path: Path) -> tuple[NiftiLayout, Iterator[np.ndarray]] | None:
    """The layout of a float NIfTI file and an iterator over its voxel values, in file order
    (x fastest), ``SCAN_CHUNK_BYTES`` at a time; None for any other file.

    A .nii.gz is decompressed as a stream: no more than one chunk is held at a time.
    """
    with open(path, "rb") as handle:
        compressed = handle.read(2) == GZIP_MAGIC
    opener = gzip.open if compressed else open
    with opener(path, "rb") as handle:
        layout = _nifti_layout(handle.read(540))
    if layout is None or layout.datatype not in NIFTI_FLOAT_TYPES:
        return None
    dtype = np.dtype(layout.endian + NIFTI_FLOAT_TYPES[layout.datatype])

    def chunks() -> Iterator[np.ndarray]:
        with opener(path, "rb") as handle:
            handle.seek(layout.data_start)  # for gzip: decompresses up to there
            left = layout.values * dtype.itemsize
            step = SCAN_CHUNK_BYTES - SCAN_CHUNK_BYTES % dtype.itemsize
            while left > 0:
                data = handle.read(min(step, left))
                if not data:
                    return  # a short file: file_problem reports it before ITK reads
                usable = len(data) - len(data) % dtype.itemsize
                left -= len(data)
                yield np.frombuffer(data[:usable], dtype)

    return layout, chunks()


def nifti_nonfinite_values(path: str | os.PathLike, read: np.ndarray | None = None) -> tuple[int, int] | None:
    """(values that are NaN or ±inf, all values) in a float NIfTI file's own voxel data;
    None when ``path`` is not a float (float32/float64) single-file NIfTI.

    ITK's NIfTI reader turns NaN and ±inf into 0 (then scaled: ``scl_inter``) without a
    word (CT padding becomes water, a resampling tool's NaN border becomes tissue), so the
    file is examined itself: decompressed as a stream, one ``SCAN_CHUNK_BYTES`` chunk in
    memory at a time.

    Args:
        read: the values ITK read from the file (``sitk.GetArrayViewFromImage``). When
            none of them is the value ITK puts in place of NaN/inf, the file holds none and
            is not decompressed again (a float CT has no exact 0.0 outside its padding).
    """
    found = _float_nifti_chunks(Path(path))
    if found is None:
        return None
    layout, chunks = found
    if read is not None and not _holds_value(read, _nonfinite_stand_in(layout)):
        return 0, layout.values
    bad = sum(int(np.count_nonzero(~np.isfinite(chunk))) for chunk in chunks)
    return bad, layout.values


def nifti_nonfinite_mask(path: str | os.PathLike, components: int = 1) -> np.ndarray | None:
    """Where a float NIfTI file holds NaN or ±inf: a bool array shaped as SimpleITK's
    array of the image ((z, y, x), or (z, y, x, components) for a vector image), or None
    when the file is not a float NIfTI or holds no such value.

    For ``gvsl info``, which shows such volumes instead of refusing them: ITK's reader
    turned those voxels into 0. One byte per value, made only when there is one.
    """
    found = _float_nifti_chunks(Path(path))
    if found is None:
        return None
    layout, chunks = found
    mask = None
    start = 0
    for chunk in chunks:
        bad = ~np.isfinite(chunk)
        if bad.any():
            if mask is None:
                mask = np.zeros(layout.values, bool)
            mask[start : start + chunk.size] = bad
        start += chunk.size
    if mask is None:
        return None
    x, y, z = (tuple(layout.dims) + (1, 1, 1))[:3]
    # The file holds x fastest, then y, z (then t, then the vector components: planar).
    if components > 1:
        return mask.reshape(components, z, y, x).transpose(1, 2, 3, 0)
    return mask.reshape(z, y, x)


def _nonfinite_stand_in(layout: NiftiLayout) -> float | None:
    """The value ITK's reader gives a NaN/inf voxel of this file: 0, scaled (so
    ``scl_inter`` when ``scl_slope`` is neither 0 nor NaN/inf); None when unsure."""
    slope, inter = layout.scaling
    if slope == 0:
        return 0.0
    return float(inter) if math.isfinite(slope) and math.isfinite(inter) else None


def _holds_value(array: np.ndarray, value: float | None) -> bool:
    """Whether ``array`` holds ``value`` (True when ``value`` is None: unknown), looked for a
    slab at a time so that no full-size temporary is made."""
    if value is None:
        return True
    flat = array.reshape(-1)
    wanted = flat.dtype.type(value)
    step = max(1, SCAN_CHUNK_BYTES // max(1, flat.itemsize))
    return any(bool((flat[start : start + step] == wanted).any()) for start in range(0, flat.size, step))
