"""Reading a folder of DICOM slices as one volume, refusing series that are not whole.

ITK's series reader stacks the slices GDCM found and takes the slice spacing from the
first and last positions; a series with missing slices (an interrupted PACS export or
copy) or a damaged slice GDCM skipped is then read as evenly spaced, slices landing up to
half the gap from their true positions, with only a two-line warning on stderr. gvsl
checks the slice positions itself and refuses such a series in one line.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import SimpleITK as sitk

from gvsl_cli.errors import InputError
from gvsl_cli.itk_paths import itk_can_take, itk_warnings_hidden, link_or_copy, readable_by_itk

#: Slice gaps may differ from the series' typical gap (the median) by this fraction of it,
#: by what the rounding of the stored positions allows, or by SLICE_GAP_TOLERANCE_MM,
#: whichever is largest. A missing slice makes a gap of twice the median (100 %); ITK's own
#: reader warns from about 10 %. The positions are decimal strings, often of 1 or 2
#: decimals: two gaps of an evenly spaced 0.625 mm series stored to 0.01 mm differ by up to
#: 0.01 mm, and more on an oblique normal, which a tighter rule refused as "uneven".
SLICE_GAP_TOLERANCE_FRACTION = 0.1
SLICE_GAP_TOLERANCE_MM = 0.01
#: DICOM files carry "DICM" at this byte offset (after the 128-byte preamble).
_DICM_OFFSET = 128


def dicom_series_ids(folder: str | os.PathLike) -> list[str]:
    """The DICOM series UIDs found in ``folder`` (not recursive); [] when there are none.

    ITK prints a warning on stderr for a folder without series; gvsl reports that itself in
    one line, so the warning is silenced for this call.
    """
    with itk_warnings_hidden(), readable_by_itk(folder) as readable:
        return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(readable))


def read_dicom_series(folder: Path) -> sitk.Image:
    """The one DICOM series in ``folder`` as a 3D image, its slices checked to be whole.

    Raises:
        InputError: no series, several series, or slices whose positions along the slice
            normal are not evenly spaced (missing slices, duplicates); the message names
            the files that look like DICOM but could not be read as slices (truncated or
            damaged), the likely cause.
    """
    folder = Path(folder)
    series_ids = dicom_series_ids(folder)
    if not series_ids:
        raise InputError(f"{folder}: folder holds no DICOM series", hint="give a volume file or a folder of DICOM slices")
    if len(series_ids) > 1:
        raise InputError(
            f"{folder}: folder holds {len(series_ids)} DICOM series ({', '.join(series_ids[:3])}...); expected one",
            hint="put each series in its own folder",
        )
    with readable_by_itk(folder) as readable_folder, itk_warnings_hidden():
        files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(readable_folder, series_ids[0]))
        # The names GDCM returns are under the path it was given: map them back to the
        # user's folder to name unread files.
        names = {os.path.basename(f) for f in files}
        unreadable = _unreadable_dicom_files(folder, names)
        with _names_itk_can_take(files) as readable_files:
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(readable_files)
            reader.MetaDataDictionaryArrayUpdateOn()
            image = reader.Execute()
            positions, rounding = _positions_along_normal(reader, len(readable_files))
    repeats = repeated_positions(positions)
    if repeats:
        raise InputError(
            f"{folder}: DICOM series has {repeats}: a multi-echo, multi-phase or 4D series, not one volume",
            hint="split it by echo or temporal position (dcm2niix does), and give one volume",
        )
    gap = uneven_gap(positions, rounding)
    unread = ""
    if unreadable:
        shown = ", ".join(unreadable[:3]) + (f" and {len(unreadable) - 3} more" if len(unreadable) > 3 else "")
        unread = f"{len(unreadable)} file(s) in the folder could not be read as slices ({shown}; truncated or damaged?)"
    if gap:
        raise InputError(
            f"{folder}: DICOM series has missing or unevenly spaced slices: {gap}" + (f"; {unread}" if unread else ""),
            hint="copy or export the whole series again; gvsl does not interpolate missing slices",
        )
    # Unreadable files beside evenly spaced slices are not refused: the geometry is right,
    # and series folders often hold objects that are not slices (structured reports,
    # presentation states, RT structures) which ITK cannot read as images either.
    return image


@contextlib.contextmanager
def _names_itk_can_take(files: list[str]) -> Iterator[list[str]]:
    """``files`` themselves when all encode; else links to them, in order, with ASCII names."""
    if all(itk_can_take(f) for f in files):
        yield files
        return
    with tempfile.TemporaryDirectory(prefix="gvsl-dicom-") as folder:
        links = []
        for index, name in enumerate(files):
            link = Path(folder) / f"slice{index:05d}.dcm"
            link_or_copy(Path(name), link)
            links.append(str(link))
        yield links


def _positions_along_normal(reader: sitk.ImageSeriesReader, count: int) -> tuple[list[float] | None, float]:
    """Each slice's ImagePositionPatient (0020,0032) projected on the slice normal (the
    cross product of the ImageOrientationPatient (0020,0037) rows), in mm, in the reader's
    slice order; None when a slice lacks either tag (no positions to check). Also the most
    a projected position can be off by the rounding of the stored decimals (mm)."""
    positions = []
    normal = None
    step = 0.0  # the coarsest last decimal place among the stored coordinates
    for index in range(count):
        try:
            if not (reader.HasMetaDataKey(index, "0020|0032") and reader.HasMetaDataKey(index, "0020|0037")):
                return None, 0.0
            texts = reader.GetMetaData(index, "0020|0032").strip().split("\\")
            position = [float(v) for v in texts]
            if normal is None:
                rows = [float(v) for v in reader.GetMetaData(index, "0020|0037").split("\\")]
                normal = np.cross(rows[:3], rows[3:6])
        except (RuntimeError, ValueError, IndexError):
            return None, 0.0
        if len(position) != 3:
            return None, 0.0
        step = max(step, *(_last_decimal_place(text) for text in texts))
        positions.append(float(np.dot(normal, position)))
    # Each coordinate is off by up to half its last place; projected on the normal, the
    # errors add up to at most half a place times the normal's 1-norm.
    return positions, 0.5 * step * float(np.abs(normal).sum())


def _last_decimal_place(text: str) -> float:
    """The value of the last digit of a DICOM decimal string: 0.01 for "-54.38", 1 for "12"."""
    mantissa = text.strip().lower().split("e")[0]
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    exponent = int(text.strip().lower().split("e")[1]) if "e" in text.lower() else 0
    return 10.0 ** (exponent - decimals)


def repeated_positions(positions: list[float] | None) -> str | None:
    """Words for a series whose slices share their positions evenly (every position held
    by the same number k > 1 of slices), e.g. "2 slices at each of 20 positions"; None
    otherwise."""
    if positions is None or len(positions) < 2:
        return None
    ordered = np.sort(np.asarray(positions, dtype=np.float64))
    groups = np.split(ordered, np.nonzero(np.diff(ordered) > SLICE_GAP_TOLERANCE_MM)[0] + 1)
    counts = {len(group) for group in groups}
    if len(counts) == 1 and counts != {1}:
        return f"{counts.pop()} slices at each of {len(groups)} positions"
    return None


def uneven_gap(positions: list[float] | None, rounding: float = 0.0) -> str | None:
    """Words for the worst slice gap that differs from the series' median gap beyond the
    tolerance (SLICE_GAP_TOLERANCE_*), e.g. "gap of 24 mm after slice 19 of 40 (the
    others 4 mm)"; None when the gaps are even (or there are fewer than 3 slices).

    ``positions`` are the slice positions along the normal (mm) in any order; each may be
    off by ``rounding`` (mm, the stored decimals'), so a gap by twice that.
    """
    if positions is None or len(positions) < 3:
        return None
    ordered = np.sort(np.asarray(positions, dtype=np.float64))
    gaps = np.diff(ordered)
    typical = float(np.median(gaps))
    tolerance = max(SLICE_GAP_TOLERANCE_MM, SLICE_GAP_TOLERANCE_FRACTION * abs(typical), 2.0 * rounding + 1e-9)
    deviation = np.abs(gaps - typical)
    worst = int(np.argmax(deviation))
    if deviation[worst] <= tolerance:
        return None
    where = f"after slice {worst + 1} of {len(ordered)}"
    if gaps[worst] <= SLICE_GAP_TOLERANCE_MM:
        return f"two slices at the same position ({where}; the others {typical:.3g} mm apart)"
    return f"gap of {gaps[worst]:.3g} mm {where} (the others {typical:.3g} mm)"


def _unreadable_dicom_files(folder: Path, series_names: set[str]) -> list[str]:
    """Names of the files in ``folder`` outside the series that look like DICOM (the
    "DICM" mark, or a .dcm/.ima ending) but that ITK cannot read at all: slices cut short
    by an interrupted copy, which GDCM leaves out of the series without a word."""
    found = []
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return []
    for entry in entries:
        if entry.name in series_names or entry.name.startswith(".") or entry.name.upper() == "DICOMDIR":
            continue
        try:
            if not entry.is_file():
                continue
            with open(entry.path, "rb") as handle:
                head = handle.read(_DICM_OFFSET + 4)
        except OSError:
            continue
        if head[_DICM_OFFSET:] != b"DICM" and not entry.name.lower().endswith((".dcm", ".ima")):
            continue
        with readable_by_itk(entry.path) as readable:
            probe = sitk.ImageFileReader()
            probe.SetFileName(readable)
            try:
                probe.ReadImageInformation()
                continue
            except RuntimeError:
                pass
        found.append(entry.name)
    return found
