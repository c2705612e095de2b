"""Calls into SimpleITK made safe: paths it can take, whatever bytes the user's file names
hold, and its multi-line warnings kept off stderr where gvsl says the same in one line.

Python holds a file name that is not valid UTF-8 (a Latin-1 ``café.nii.gz`` from a Windows
zip or an old share) as a ``str`` with surrogate escapes. SimpleITK's SWIG layer cannot turn
such a ``str`` into a ``std::string``: the C++ exception it throws ends the interpreter
(SIGABRT, exit 134) instead of raising. So every path handed to SimpleITK goes through one of
these context managers, which pass it as it is when it encodes, and otherwise through a
temporary symbolic link with an ASCII name (ITK opens the link; the bytes of the real name
never reach SWIG).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def itk_warnings_hidden(hidden: bool = True) -> Iterator[None]:
    """Silence ITK's multi-line warnings in the block when ``hidden`` (gvsl said it in one line)."""
    import SimpleITK as sitk

    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    if hidden:
        sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def itk_can_take(path: str | os.PathLike) -> bool:
    """True when ``path`` encodes to UTF-8 (SimpleITK accepts it as it is)."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def link_or_copy(target: Path, link: Path) -> None:
    """Make ``link`` point at ``target`` (an absolute symbolic link; a copy where the file
    system has no links, as on some Windows setups)."""
    try:
        os.symlink(os.path.abspath(target), link)
    except OSError:
        if Path(target).is_dir():
            raise
        shutil.copyfile(target, link)


def _ascii_suffix(suffix: str) -> str:
    return suffix if suffix.isascii() and itk_can_take(suffix) else ""


def detached_data_names(header: Path) -> list[str]:
    """The data file names a MetaImage (.mhd) or detached NRRD (.nhdr) header gives, as
    file-system strings (surrogate-escaped like the names ``os.listdir`` returns); [] for
    other files or for data-file entries that name several files (LIST, patterns)."""
    name = header.name.lower()
    if not name.endswith((".mhd", ".nhdr")):
        return []
    separator, keys = (b"=", (b"elementdatafile",)) if name.endswith(".mhd") else (b":", (b"data file", b"datafile"))
    try:
        with open(header, "rb") as handle:
            head = handle.read(64 * 1024)
    except OSError:
        return []
    for line in head.splitlines():
        key, sep, value = line.partition(separator)
        if sep and key.strip().lower() in keys:
            value = value.strip()
            if not value or value.upper() in (b"LOCAL", b"LIST") or b"%" in value or b" " in value:
                return []
            return [os.fsdecode(value)]
    return []


@contextlib.contextmanager
def readable_by_itk(path: str | os.PathLike, *, alone: bool = False) -> Iterator[str]:
    """Yield a path string SimpleITK can open to read the file or folder ``path``.

    ``path`` itself when it encodes (and ``alone`` is False); else a link with an ASCII name
    in a temporary folder, which also holds links to the data files a detached header
    (.mhd, .nhdr) names, so ITK finds them beside the header. ``alone=True`` always reads
    through the link: a ``x.nii.gz`` whose ``x.nii`` sibling ITK would open instead.
    """
    from gvsl_cli.io import volume_suffix

    path = Path(path)
    if itk_can_take(path) and not alone:
        yield str(path)
        return
    with tempfile.TemporaryDirectory(prefix="gvsl-read-") as folder:
        suffix = "" if path.is_dir() else _ascii_suffix(volume_suffix(path) or "".join(path.suffixes[-1:]))
        link = Path(folder) / f"volume{suffix}"
        link_or_copy(path, link)
        for data_name in detached_data_names(path):
            first = Path(data_name).parts[0] if not os.path.isabs(data_name) else None
            source = path.parent / first if first else None
            if source is not None and source.exists() and not (Path(folder) / first).exists():
                link_or_copy(source, Path(folder) / first)
        yield str(link)


@contextlib.contextmanager
def writable_by_itk(path: str | os.PathLike) -> Iterator[str]:
    """Yield a path string SimpleITK can write to so that the file ends up at ``path``.

    ``path`` itself when it encodes. A name that encodes in a folder that does not is
    written through a link to the folder (no copy); a name that does not encode is written
    under an ASCII name in a temporary folder and moved to ``path`` afterwards (a detached
    header's data file is renamed with it and the header's entry rewritten).
    """
    path = Path(path)
    if itk_can_take(path):
        yield str(path)
        return
    with tempfile.TemporaryDirectory(prefix="gvsl-write-") as folder:
        if itk_can_take(path.name):
            link = Path(folder) / "folder"
            os.symlink(os.path.abspath(path.parent), link)
            yield str(link / path.name)
            return
        from gvsl_cli.io import volume_suffix

        suffix = _ascii_suffix(volume_suffix(path) or "".join(path.suffixes[-1:]))
        written = Path(folder) / f"volume{suffix}"
        yield str(written)
        _move_written(Path(folder), written, path, suffix)


def _move_written(folder: Path, header: Path, path: Path, suffix: str) -> None:
    """Move the files written as ``folder/volume<suffix>`` (and its data files) to ``path``'s
    folder under ``path``'s name; data files are moved first, the header last."""
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    data_files = [p for p in folder.iterdir() if p != header and p.name.startswith("volume")]
    if data_files:
        text = header.read_bytes()
        for data in data_files:
            final_name = stem + data.name[len("volume"):]
            text = text.replace(os.fsencode(data.name), os.fsencode(final_name))
            shutil.move(data, path.parent / final_name)
        header.write_bytes(text)
    if header.exists():
        shutil.move(header, path)
