"""Checks of volume files that ITK does not make, or makes with a cryptic message.

ITK reads a truncated NIfTI without error and fills the missing voxels with zeros, and it
reports a MetaImage or NRRD header whose data file is missing with a raw line on stderr and
a stale errno. ``file_problem`` looks at the headers (and a gzip file's 4-byte trailer)
before ITK reads the file and returns the reason in words; ``io.read_volume`` turns it into
a one-line error. Only problems that are certain are reported; anything unusual is left to
ITK.
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from pathlib import Path


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


def _nifti_data_end(header: bytes) -> int | None:
    """Bytes a single-file NIfTI-1/2 needs (vox_offset + voxels x bytes per voxel), or None.

    None when ``header`` is not a plain single-file NIfTI header with sane values (a .hdr/.img
    pair, sub-byte voxels, odd dims): such files are left to ITK.
    """
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            if header[344:348] != b"n+1\0":
                return None
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            vox_offset = struct.unpack(endian + "f", header[108:112])[0]
            if not math.isfinite(vox_offset):
                return None
            vox_offset = int(vox_offset)
            header_size = 348
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            if header[4:8] != b"n+2\0":
                return None
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            dims = struct.unpack(endian + "8q", header[16:80])
            vox_offset = struct.unpack(endian + "q", header[168:176])[0]
            header_size = 540
            break
    else:
        return None
    rank = dims[0]
    if not 1 <= rank <= 7 or any(d < 1 for d in dims[1 : rank + 1]) or bitpix < 8 or bitpix % 8:
        return None
    voxels = 1
    for d in dims[1 : rank + 1]:
        voxels *= d
    # nifticlib never reads data from inside the header, whatever vox_offset says.
    return max(vox_offset, header_size) + voxels * (bitpix // 8)


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
            needed = _nifti_data_end(handle.read(540))
            size = path.stat().st_size
            if needed is not None and size < needed:
                return f"file is truncated ({size} bytes; its NIfTI header needs {needed})"
            return None
        try:
            header = zlib.decompressobj(wbits=31).decompress(handle.read(64 * 1024), 540)
        except zlib.error:
            return "corrupt gzip data (the compressed stream is damaged at its start)"
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
