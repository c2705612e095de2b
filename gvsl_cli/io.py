"""Reading and writing volumes, displacement fields and transforms with SimpleITK.

Everything read is checked (3D, scalar, non-empty, finite) and everything written keeps its
spacing, origin and direction. Writes go to a temporary name in the destination folder and
are renamed into place, so an interrupted run never leaves a half-written output.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import SimpleITK as sitk

from gvsl_cli.errors import InputError
from gvsl_cli.dicom_series import dicom_series_ids, read_dicom_series  # noqa: F401 (dicom_series_ids: part of io's API)
from gvsl_cli.file_checks import file_problem, nifti_nonfinite_values
from gvsl_cli.itk_paths import itk_can_take, itk_warnings_hidden, readable_by_itk, writable_by_itk  # noqa: F401 (itk_warnings_hidden: part of io's API)
from gvsl_cli.temporaries import held_staging_folder, held_temporary_file

#: File name endings gvsl reads as volumes (a folder is read as a DICOM series).
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
#: Formats whose header names a separate data file (.raw/.zraw): written as a pair.
DETACHED_HEADER_SUFFIXES = (".mhd", ".nhdr")


def volume_suffix(path: str | os.PathLike) -> str | None:
    """The recognised volume ending of ``path`` (".nii.gz", ".mha", ...), or None."""
    name = Path(path).name.lower()
    for suffix in VOLUME_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return None


def is_volume_path(path: str | os.PathLike) -> bool:
    """True for a file with a volume ending or a folder holding a DICOM series."""
    path = Path(path)
    if path.is_dir():
        return bool(dicom_series_ids(path))
    return path.is_file() and volume_suffix(path) is not None


def read_volume(path: str | os.PathLike, *, vector: bool | None = False, finite: bool = True) -> sitk.Image:
    """Read a 3D volume (NIfTI, NRRD, MHA/MHD, or a DICOM series folder).

    Args:
        path: a file or a folder holding one DICOM series.
        vector: accept a 3-component vector image (a displacement field) instead of a
            scalar one; None accepts any number of components (``gvsl info``).

    Returns:
        The SimpleITK image with its spacing, origin and direction as stored.

    Raises:
        InputError: missing or unreadable file; a file shorter than its header says (a
            truncated NIfTI, MetaImage or NRRD; a gzip stream that ends early); a detached
            header (.mhd, .nhdr) whose data file is missing; 2D or 4D image; multi-component
            image where a scalar one is expected; no voxels; any NaN or infinite voxel. The
            message names the file and gives the reason in words.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    try:
        if path.is_dir():
            image = read_dicom_series(path)
        else:
            if path.stat().st_size == 0:
                raise InputError(f"{path}: file is empty (0 bytes)")
            # Checks ITK does not make (a truncated NIfTI reads as zeros) or makes with a raw
            # line on stderr and a cryptic exception (an .mhd without its .raw).
            reason = file_problem(path, volume_suffix(path))
            if reason:
                raise InputError(f"{path}: cannot read: {reason}", hint=_reason_hint(reason))
            image = read_image_file(path)
    except OSError as exc:  # permission denied, I/O error while checking the file
        raise InputError(f"{path}: cannot open ({exc.strerror or type(exc).__name__})") from None
    except RuntimeError as exc:
        reason = _itk_read_reason(str(exc))
        raise InputError(f"{path}: cannot read: {reason}", hint=_reason_hint(reason)) from None
    check_volume(image, name=str(path), vector=vector, finite=finite)
    if finite and image.GetPixelID() in FLOAT_PIXEL_IDS and volume_suffix(path) in (".nii", ".nii.gz"):
        # ITK's NIfTI reader turns NaN and ±inf into 0 without a word: look in the file.
        bad, total = nifti_nonfinite_values(path, sitk.GetArrayViewFromImage(image)) or (0, 0)
        if bad:
            raise InputError(f"{path}: {bad} of {total} voxels are NaN or infinite", hint=NONFINITE_HINT)
    return image


def read_image_file(path: Path) -> sitk.Image:
    """``sitk.ReadImage(path)``, but surely of ``path`` itself, whatever its name.

    Asked for ``x.nii.gz``, ITK's NIfTI reader opens ``x.nii`` instead when both exist (as
    after ``gunzip -k``), silently returning the other file's voxels; and a name that is not
    valid UTF-8 would abort the interpreter inside SimpleITK (``itk_paths``). Such files are
    read through a link in a temporary folder, where the name is ASCII and has no sibling.
    """
    alone = volume_suffix(path) == ".nii.gz" and path.with_name(path.name[: -len(".gz")]).exists()
    with readable_by_itk(path, alone=alone) as readable:
        return sitk.ReadImage(readable)


def read_image_information(path: Path) -> sitk.ImageFileReader:
    """A ``sitk.ImageFileReader`` of ``path`` after ``ReadImageInformation()`` (the header
    only: size, spacing, origin, direction, metadata); safe for any file name.

    Raises:
        RuntimeError: ITK cannot read the header.
    """
    with readable_by_itk(path) as readable:
        reader = sitk.ImageFileReader()
        reader.SetFileName(readable)
        reader.ReadImageInformation()
    return reader


def read_transform_file(path: Path) -> sitk.Transform:
    """``sitk.ReadTransform(path)``, safe for any file name (RuntimeError as ITK's)."""
    with readable_by_itk(path) as readable:
        return sitk.ReadTransform(readable)


#: OS errors of an output disk rather than of one output (no space left, over quota,
#: read-only): a run over many inputs stops at the first, as every later one would fail too.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})

def refuse_single_slice_vectors(size, what: str) -> None:
    """Raise InputError when a vector image (a displacement field, a probability or
    feature map) of ``size`` (x, y, z) could not be stored as a 3D NIfTI: with one slice,
    ITK writes dims (x, y, 1, 1, C), and ITK (gvsl, SimpleITK, ANTs) reads that back as a
    2D image, losing the slice's position and the 3D direction."""
    if len(size) == 3 and int(size[2]) == 1:
        raise InputError(
            f"a single slice (size {tuple(int(n) for n in size)}): {what} cannot be stored as a 3D NIfTI (it reads back as a 2D image)",
            hint="give a 3D volume of at least 2 slices",
        )


#: Voxel shift (mm) from orthogonalising a direction above which the user is warned.
ORTHOGONALITY_TOLERANCE_MM = 1e-3


def nonorthogonal_direction_warning(grid, what: str | None) -> str | None:
    """The warning for NIfTI outputs on ``grid`` (a ``geometry.Geometry``) when its direction
    is not orthonormal, else None.

    NIfTI holds only a rotation, so ITK's writer stores the nearest orthonormal matrix; the
    warning says so and how far (mm) the written voxel centres lie from ``grid``'s.
    ``what`` names the grid ("fixed image's"); None words it about the input the warning
    line names ("has a direction matrix ... its grid").
    """
    shift = grid.orthogonalization_shift_mm()
    if shift <= ORTHOGONALITY_TOLERANCE_MM:
        return None
    subject, owner = (f"the {what} direction matrix is", f"the {what}") if what else ("has a direction matrix that is", "its")
    return (
        f"{subject} not orthonormal, which NIfTI cannot store: the NIfTI outputs carry the nearest "
        f"orthonormal direction, so their voxel centres lie up to {shift:.3g} mm from {owner} grid "
        "(resample the image onto an orthonormal grid first if that matters)"
    )


READ_HINT = "gvsl reads NIfTI, NRRD, MHA/MHD files and DICOM series folders"
#: Reasons that mean "the file is incomplete"; they get a hint about copying it again.
_TRUNCATED_WORDS = ("truncated", "ends early")


def _reason_hint(reason: str) -> str:
    """The hint shown under a read error, from its reason."""
    if any(word in reason for word in _TRUNCATED_WORDS):
        return "the file is incomplete (an interrupted copy or download?); copy it again"
    if "named by the header is missing" in reason:
        return "keep the data file next to its header, under the name the header gives"
    return READ_HINT


def _itk_read_reason(message: str) -> str:
    """A human reason from the text of a SimpleITK read exception (read_volume puts
    "cannot read: " before it).

    ITK's first line only names its own source file ("Exception thrown in ...cxx:99:");
    the useful part is on the lines that follow.
    """
    if "Unable to determine ImageIO reader" in message:
        return "not a NIfTI/NRRD/MetaImage file (unrecognised header)"
    nrrd = [line.strip() for line in message.splitlines() if line.strip().startswith("[nrrd]")]
    if nrrd:
        # The last line of teem's trace is the cause: "[nrrd] _nrrdEncodingRaw_read: fread got only ...".
        cause = nrrd[-1].split(":", 1)[-1].strip() or nrrd[-1]
        if "fread got only" in cause or "but received" in cause:
            return f"NRRD data ends early, the file is truncated ({cause[:120]})"
        return f"not a readable NRRD file ({cause[:120]})"
    lines = [line.strip() for line in message.splitlines() if line.strip() and not line.startswith("Exception thrown in")]
    # "ITK ERROR: MetaImageIO(0x...): File cannot be read: x.mha for reading." + "Reason: ..."
    # (the errno reason is stale, often "No such file or directory" for an existing file).
    detail = lines[0] if lines else message.strip().splitlines()[0] if message.strip() else "unknown error"
    detail = re.sub(r"^(?:s?itk::|ITK )?ERROR:\s*", "", detail)
    detail = re.sub(r"\w+IO\(0x[0-9a-f]+\):\s*", "", detail)
    return detail[:160]


FLOAT_PIXEL_IDS = (sitk.sitkFloat32, sitk.sitkFloat64, sitk.sitkVectorFloat32, sitk.sitkVectorFloat64)
NONFINITE_HINT = "fix or mask those voxels before using the volume"


def check_volume(image: sitk.Image, *, name: str, vector: bool | None = False, finite: bool = True) -> None:
    """Raise InputError unless ``image`` is a usable 3D volume (see ``read_volume``).

    ``finite=False`` lets NaN or infinite voxels through (``gvsl info`` counts them).
    """
    dim = image.GetDimension()
    if dim != 3:
        what = "2D image" if dim == 2 else f"{dim}D image"
        raise InputError(f"{name}: expected a 3D volume, got a {what} of size {image.GetSize()}")
    components = image.GetNumberOfComponentsPerPixel()
    if vector and components != 3:
        raise InputError(f"{name}: expected a 3-component vector field, got {components} component(s)")
    if vector is False and components != 1:
        raise InputError(f"{name}: expected a scalar volume, got {components} components per voxel")
    if min(image.GetSize()) < 1 or image.GetNumberOfPixels() == 0:
        raise InputError(f"{name}: volume has no voxels (size {image.GetSize()})")
    if finite and image.GetPixelID() in FLOAT_PIXEL_IDS:
        array = sitk.GetArrayViewFromImage(image)
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise InputError(f"{name}: {bad} of {array.size} voxels are NaN or infinite", hint=NONFINITE_HINT)
        if array.dtype == np.float64:
            # Every computation is float32: larger values would become infinite there (a
            # constant "image" to embed, NCC 0 to register).
            largest = float(np.abs(array).max())
            if largest > float(np.finfo(np.float32).max):
                raise InputError(f"{name}: values up to {largest:.3g} exceed float32's range (3.4e+38)", hint="rescale the intensities")


def ensure_writable_folder(path: str | os.PathLike, *, what: str = "output folder", hint: str = "give a writable folder with -o") -> list[Path]:
    """Create ``path`` if needed and prove it writable (a probe file written and removed).

    Called before any work, so a bad ``-o`` fails in a second, not after a long run.

    Returns:
        The folders it created, deepest first (``remove_empty_folders`` undoes them when the
        run fails before using them).

    Raises:
        InputError: naming ``path``: an existing file, or a folder that cannot be created or
            written.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: {what} is a file, not a folder", hint=hint)
    created = []
    missing = path
    while not missing.exists() and missing != missing.parent:
        created.append(missing)
        missing = missing.parent
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".gvsl-write-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        remove_empty_folders(created)
        raise InputError(f"{path}: {what} cannot be written ({exc.strerror or type(exc).__name__})", hint=hint) from None
    return created


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty; stop at the first that is not."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (same endings); rename it to ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left untouched. The data
    are flushed to the disk before the rename (and the rename after it), so a power cut
    leaves the old file or the new one, not a new name with missing data.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = volume_suffix(path) or "".join(path.suffixes[-1:])
    # ".NAME.<8 random>.tmp<suffix>": the output's name shows whose temporary file it is
    # (runs clean up after killed ones by it). A name near the 255-byte limit of file names
    # would fail only because of that, so it gets a short ".gvsl-<random>" instead.
    # A name that is not UTF-8 gets it too, so the temporary name ITK writes is ASCII.
    prefix = f".{path.name}." if itk_can_take(path.name) and len(os.fsencode(path.name)) + len(suffix) + 16 <= 255 else ".gvsl-"
    # Locked while it exists, so that a later run removes it only if this process was
    # killed before it could (``temporaries.remove_abandoned``).
    with held_temporary_file(path.parent, prefix, f".tmp{suffix}") as tmp:
        try:
            try:
                yield tmp
            except OSError as exc:
                if exc.filename is None and exc.errno is not None:
                    # Writers given a file handle (np.save, json) raise without a path; name the
                    # output the user asked for, so "No space left on device" says where.
                    raise OSError(exc.errno, exc.strerror, str(path)) from exc
                raise
            # mkstemp creates the file private (0600); give it the permissions of a normal file.
            umask = os.umask(0)
            os.umask(umask)
            if tmp.exists():
                os.chmod(tmp, 0o666 & ~umask)
                flush_to_disk(tmp)
            os.replace(tmp, path)
            flush_to_disk(path.parent)
        finally:
            if tmp.exists():
                tmp.unlink()


def flush_to_disk(path: Path) -> None:
    """fsync a file or (on POSIX) a folder; file systems that cannot are left as they are."""
    if path.is_dir() and os.name != "posix":
        return  # folders cannot be opened for fsync on Windows; NTFS journals renames itself
    try:
        fd = os.open(path, os.O_RDONLY if path.is_dir() else os.O_RDWR)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # e.g. EINVAL on file systems without fsync
        pass
    finally:
        os.close(fd)


def write_volume(image: sitk.Image, path: str | os.PathLike, *, compress: bool = True) -> Path:
    """Write ``image`` (scalar or vector) atomically with its geometry; returns ``path``."""
    path = Path(path)
    suffix = volume_suffix(path)
    if suffix is None:
        raise InputError(f"{path}: unknown output format; use one of {', '.join(VOLUME_SUFFIXES)}")
    compress = compress and suffix != ".nii"
    if suffix in DETACHED_HEADER_SUFFIXES:
        _write_detached(image, path, compress)
        return path
    with atomic_path(path) as tmp, writable_by_itk(tmp) as target:
        sitk.WriteImage(image, target, compress)
        if suffix in (".nii", ".nii.gz"):
            _check_nifti_complete(tmp, image, path)
    return path


#: Size of a NIfTI-1 header; the voxels follow it (at vox_offset, 352 as ITK writes them).
NIFTI_HEADER_BYTES = 348


def _check_nifti_complete(written: Path, image: sitk.Image, path: Path) -> None:
    """Raise when the NIfTI file ``written`` holds fewer bytes than ``image`` needs.

    ITK's NIfTI writer (niftilib) does not raise when the disk fills up: it prints
    "** ERROR: NWAD" and returns, leaving a short or empty file, which the rename would then
    publish as a finished output. NRRD and MHA writers do raise. The check reads the size of
    an uncompressed file, and decompresses a gzip file to its end (gzip checks its length
    and CRC there, so a cut file fails too).
    """
    needed = NIFTI_HEADER_BYTES + sitk.GetArrayViewFromImage(image).nbytes
    try:
        if written.name.endswith(".gz"):
            import gzip

            size = 0
            with gzip.open(written, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    size += len(block)
        else:
            size = written.stat().st_size
    except (OSError, EOFError):  # gzip.BadGzipFile is an OSError; a cut stream is an EOFError
        size = -1
    if size < needed:
        shown = "a damaged file" if size < 0 else f"{size} of {needed} bytes"
        raise InputError(f"{path}: the NIfTI writer left {shown} (no space left on the device?)", hint="free disk space there, or write the output elsewhere")


def write_vector_nifti(path: str | os.PathLike, geometry, channels: int, component: Callable[[int], np.ndarray]) -> Path:
    """Write a float32 vector NIfTI one component at a time, atomically; returns ``path``.

    A NIfTI vector image stores its components one after the other (dims x, y, z, 1, C,
    x fastest), so a map is written from ``component(c)`` (a (z, y, x) float32 array on
    ``geometry``, C-contiguous) without ever holding the whole map: building an ITK vector
    image of a fine CT's feature map would hold it two or three times over (the
    channels-last array, ITK's copy, its writer's planar copy).

    The header is ITK's own, written for a 1×1×1 image of the same grid and component
    count (origin, spacing and direction make its qform/sform; the size is only in dim[1..3],
    patched here), so gvsl, ITK, ANTs and nibabel read the geometry exactly as from
    ``write_volume``. The data are compressed on several threads
    (``parallel_gzip``), and a full disk raises, unlike ITK's NIfTI writer.
    """
    from gvsl_cli.parallel_gzip import ParallelGzipWriter

    path = Path(path)
    if volume_suffix(path) != ".nii.gz":
        raise InputError(f"{path}: streamed vector maps are written as .nii.gz only")
    header = _vector_nifti_header(geometry, channels)
    expected_shape = tuple(geometry.shape_zyx)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as raw, ParallelGzipWriter(raw) as handle:
            handle.write(header)
            for channel in range(channels):
                values = component(channel)
                if values.shape != expected_shape or values.dtype != np.float32:
                    raise ValueError(f"component {channel}: {values.dtype} {values.shape}, expected float32 {expected_shape}")
                # Native byte order, as ITK wrote the header (and says so in it).
                handle.write(memoryview(np.ascontiguousarray(values)).cast("B"))
    return path


def _vector_nifti_header(geometry, channels: int) -> bytes:
    """ITK's NIfTI header (and extension flag) of a float32 ``channels``-vector image on
    ``geometry``: written for a 1×1×1 image with the same spacing, origin and direction,
    then dim[1..3] set to the grid's size."""
    import struct

    if any(int(n) > 32767 for n in geometry.size):
        raise InputError(f"a grid of size {tuple(geometry.size)} does not fit a NIfTI-1 header (at most 32767 voxels a side)")
    probe = sitk.Image([1, 1, 1], sitk.sitkVectorFloat32, channels)
    probe.SetSpacing(geometry.spacing)
    probe.SetOrigin(geometry.origin)
    probe.SetDirection(geometry.direction)
    with tempfile.TemporaryDirectory(prefix="gvsl-header-") as folder:
        probe_path = os.path.join(folder, "probe.nii")
        sitk.WriteImage(probe, probe_path, False)
        with open(probe_path, "rb") as handle:
            written = handle.read()
    order = "<" if struct.unpack("<i", written[:4])[0] == NIFTI_HEADER_BYTES else ">"
    voxel_offset = int(struct.unpack(f"{order}f", written[108:112])[0])
    header = bytearray(written[:voxel_offset])
    struct.pack_into(f"{order}3h", header, 42, *(int(n) for n in geometry.size))
    return bytes(header)


def _write_detached(image: sitk.Image, path: Path, compress: bool) -> None:
    """Write a header + data pair under their final names in a staging folder, then move.

    The header names its data file, so both must carry their final names; the data file is
    moved first and the header last, so a reader never finds a header without its data.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}." if itk_can_take(path.name) else ".gvsl-"
    with held_staging_folder(path.parent, prefix) as staging:
        with writable_by_itk(staging / path.name) as target:
            sitk.WriteImage(image, target, compress)
        for written in sorted(staging.iterdir(), key=lambda p: p.name == path.name):
            os.replace(written, path.parent / written.name)


def write_transform(transform: sitk.Transform, path: str | os.PathLike) -> Path:
    """Write an ITK transform file (.tfm, .txt or .mat) atomically; returns ``path``."""
    path = Path(path)
    if path.suffix.lower() not in (".tfm", ".txt", ".mat", ".h5"):
        raise InputError(f"{path}: transform files must end in .tfm, .txt, .mat or .h5")
    with atomic_path(path) as tmp, writable_by_itk(tmp) as target:
        sitk.WriteTransform(transform, target)
    return path


def image_from_array(array: np.ndarray, reference: sitk.Image | None = None, *, geometry=None) -> sitk.Image:
    """A SimpleITK image from a (z, y, x) array (or (z, y, x, C) vectors) with a grid.

    The grid is taken from ``reference`` or from a ``geometry.Geometry``.
    """
    vector = array.ndim == 4
    image = sitk.GetImageFromArray(array, isVector=vector)
    if reference is not None:
        image.CopyInformation(reference)
    elif geometry is not None:
        geometry.apply_to(image)
    return image
