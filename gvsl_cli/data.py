"""Training data: finding volumes, caching them preprocessed, sampling pairs of patches.

Three steps, each its own part of this module:

1. ``discover`` / ``discover_named`` turn what a user typed (folders searched recursively,
   volume files, DICOM series folders, lists of paths, pipes, glob patterns, ``-`` for
   stdin) into a list of volume sources with names, filtered by ``--include``/``--exclude``
   patterns, and list what they had to skip with the reason. Every command that takes many
   inputs uses them.
2. ``prepare_dataset`` brings every source through ``preprocess.prepare`` once and keeps the
   result in an on-disk cache (``VolumeCache``) keyed by the file's content and the
   preprocessing settings, so later epochs and later runs read no NIfTI/DICOM at all.
   Cached volumes are opened memory-mapped: a patch reads only its own bytes.
3. ``PairSampler`` draws, for training iteration ``i`` on rank ``r``, pairs (A, B) of two
   *different* volumes and a random patch of each. Its random numbers come from a
   generator seeded by (seed, rank, iteration) alone, so any iteration can be reproduced
   on its own (prefetching threads, resuming after a kill) and every rank sees other pairs.
   ``PrefetchLoader`` runs it in background threads.

Arrays are (z, y, x) = (D, H, W) like SimpleITK's; patches are float32 in about [0, 1].
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import fnmatch
import glob
import hashlib
import json
import os
import re
import stat
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from gvsl_cli.config import PreprocessConfig
from gvsl_cli.errors import GvslError, InputError
from gvsl_cli.io import atomic_path, dicom_series_ids, read_volume, volume_suffix
from gvsl_cli.paths import LINK_LOOP, absent_reason, try_real_path
from gvsl_cli.resources import cache_root

#: A given file with one of these endings is read as a list of paths, one a line.
PATH_LIST_SUFFIXES = (".txt", ".lst", ".list")
#: A file without a known suffix up to this size is read as a list of paths when it is text.
LIST_MAX_BYTES = 64 * 2**20
#: Characters that make an input a glob pattern (expanded by gvsl when the shell did not).
GLOB_CHARACTERS = "*?["
#: Files that never hold DICOM slices; a folder of only these is not probed for a series.
NOT_DICOM_SUFFIXES = (".raw", ".zraw", ".txt", ".json", ".jsonl", ".md", ".csv", ".py", ".pt", ".pth", ".npy", ".png", ".jpg", ".gz", ".zip")
#: Bump when the cached array layout or preprocessing code changes meaning.
CACHE_FORMAT = "gvsl-volume-cache-1"
#: Independent random streams drawn from one (seed, rank, iteration).
STREAM_DATA = 1
STREAM_AUGMENT = 2


# --------------------------------------------------------------------------- discovery


class CacheWriteError(InputError):
    """The preprocessed-volume cache cannot be written. Not a property of one input (every
    later volume would fail the same way), so it stops the whole preparation instead of
    skipping the volume."""


@dataclass(frozen=True)
class Skipped:
    """An input that cannot be used, and why (one line)."""

    path: str
    reason: str


def _looks_like_dicom_folder(folder: Path, files: list[str]) -> bool:
    candidates = [f for f in files if volume_suffix(f) is None and not f.lower().endswith(NOT_DICOM_SUFFIXES) and not f.startswith(".")]
    if not candidates:
        return False
    return bool(dicom_series_ids(folder))


def _walk_folder(folder: Path) -> list[Path]:
    """Volume files and DICOM series folders under ``folder`` (recursive, sorted).

    Symbolic links to folders are followed (a cohort is often a folder of links into a
    store), and the paths found keep the link's name (``cohort/p02/ct.nii.gz``, not the
    target's). Each real folder is searched once, under its own name when the walk reaches
    it without links (``latest -> run3`` beside ``run3`` is left out, whatever their order),
    else under the first link's. Left out silently, since nothing in them goes unsearched:
    a link back to a folder on the way down (``a/up -> ..``), a link to a folder of the
    tree, a second link to a folder searched already.
    """
    found: list[Path] = []
    # Folders reached without links (a link to one of them is a second name for it); listed
    # at the first folder link met, so a tree without links is walked once.
    direct: set[str] | None = None
    # Real path of each folder searched -> the path it is searched as.
    searched: dict[str, Path] = {os.path.realpath(folder): Path(folder)}
    for root, dirs, files in os.walk(folder, followlinks=True):
        root_path = Path(root)
        real_root = os.path.realpath(root)
        kept = []
        for name in sorted(d for d in dirs if not d.startswith(".")):
            child = root_path / name
            linked = os.path.islink(child)
            real = os.path.realpath(child) if linked else os.path.join(real_root, name)
            if linked and direct is None:
                direct = {os.path.realpath(root) for root, _, _ in os.walk(folder)}
            if real in searched or _holds(real, real_root) or (linked and real in direct):
                continue
            searched[real] = child
            kept.append(name)
        dirs[:] = kept
        files = sorted(files)
        found.extend(root_path / f for f in files if volume_suffix(f) is not None and not f.startswith("."))
        if _looks_like_dicom_folder(root_path, files):
            found.append(root_path)
    return found


def _holds(folder: str, path: str) -> bool:
    """Whether the real folder ``folder`` is ``path`` or holds it (both real paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _is_stream(path: Path) -> bool:
    """True for a pipe or character device (``<(find ...)`` gives ``/dev/fd/63``): a list
    that can be read once, whose relative paths are relative to the working folder."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)


def _path_lines(text: str) -> list[tuple[int, str]]:
    """(line number, entry) of a list of paths: one a line, blank lines and ``#`` comments
    ignored, surrounding spaces and CR line ends stripped."""
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            entries.append((number, line))
    return entries


def read_stream_lines(stream) -> list[str]:
    """The paths in a text stream (stdin, a pipe): see ``_path_lines``; or, when the text
    holds NUL characters (``find -print0``, ``xargs -0`` style), the NUL-separated paths
    exactly as they are (no comments, spaces kept)."""
    text = "".join(stream)
    if "\0" in text:
        return [entry for entry in text.split("\0") if entry]
    return [entry for _, entry in _path_lines(text)]


def inline_streams(inputs: Sequence[str | os.PathLike], stdin_lines: Iterable[str] = ()) -> list[str]:
    """``inputs`` with ``-`` replaced by the paths in ``stdin_lines`` and a pipe (``<(...)``)
    replaced by the paths it holds, one a line; other inputs unchanged.

    Paths read this way are relative to the working folder. ``-`` always means stdin (a
    file named ``-`` is ``./-``); stdin is read once, at the first ``-``.
    """
    expanded: list[str] = []
    stdin_read = False
    for item in inputs:
        text = os.fspath(item)
        if text == "-":
            if not stdin_read:
                expanded.extend(read_stream_lines(stdin_lines))
                stdin_read = True
        elif _is_stream(Path(text)):
            with open(text, encoding="utf-8", errors="replace") as handle:
                expanded.extend(read_stream_lines(handle))
        else:
            expanded.append(text)
    return expanded


def expand_inputs(inputs: Sequence[str | os.PathLike], stdin_lines: Iterable[str] = ()) -> tuple[list[str], list[Skipped]]:
    """The inputs with ``-`` and pipes replaced by the paths they list (``inline_streams``)
    and glob patterns the shell left alone expanded (``**`` matches sub-folders); a pattern
    that matches nothing is skipped with a reason."""
    expanded: list[str] = []
    skipped: list[Skipped] = []
    for item in inline_streams(inputs, stdin_lines):
        if any(c in item for c in GLOB_CHARACTERS) and not Path(item).expanduser().exists():
            matches = _glob(os.path.expanduser(item))
            if matches:
                expanded.extend(matches)
            else:
                skipped.append(Skipped(item, "no file matches this pattern"))
        else:
            expanded.append(item)
    return expanded, skipped


def _glob(pattern: str) -> list[str]:
    """The sorted matches of ``pattern`` (``**`` matches sub-folders).

    Folders whose names hold glob characters (``run [1]``) are taken literally when the
    pattern finds nothing as written: the longest leading part of the pattern that is an
    existing folder is escaped, so ``/data/run [1]/*.nii.gz`` matches that folder's files.
    """
    matches = glob.glob(pattern, recursive=True)
    if matches:
        return sorted(matches)
    parts = Path(pattern).parts
    for cut in range(len(parts) - 1, 0, -1):
        prefix = Path(*parts[:cut])
        if any(c in str(prefix) for c in GLOB_CHARACTERS) and prefix.is_dir():
            return sorted(glob.glob(os.path.join(glob.escape(str(prefix)), *parts[cut:]), recursive=True))
    return []


def _text_list(path: Path) -> str | None:
    """The content of ``path`` when it reads as a list of paths (UTF-8 text, no NUL byte,
    at most ``LIST_MAX_BYTES``, at least one entry that exists), else None.

    Lets a list without a .txt suffix be given; a binary file (a DICOM slice without a
    suffix, a zip) or a text file of other things (a README) is not a list.
    """
    try:
        if path.stat().st_size > LIST_MAX_BYTES:
            return None
        data = path.read_bytes()
    except OSError:
        return None
    if b"\0" in data:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    for _, entry in _path_lines(text):
        candidate = Path(entry).expanduser()
        if (candidate if candidate.is_absolute() else path.parent / candidate).exists():
            return text
    return None


def _read_path_list(list_file: Path, text: str | None = None) -> tuple[list[Path], list[Skipped]]:
    entries: list[Path] = []
    skipped: list[Skipped] = []
    if text is None:
        text = list_file.read_text(encoding="utf-8", errors="replace")
    for number, line in _path_lines(text):
        path = Path(line).expanduser()
        if not path.is_absolute():
            path = list_file.parent / path  # relative to the list, not to the working folder
        if not path.exists():
            reason = absent_reason(path)
            why = "is a symbolic link loop" if reason == LINK_LOOP else "does not exist"
            skipped.append(Skipped(str(path), f"listed in {list_file.name} line {number} but {why}"))
        elif path.is_dir():
            entries.extend(_walk_folder(path))
        else:
            entries.append(path)
    return entries, skipped


def _inside(path: Path, folders: set[Path]) -> bool:
    """Whether ``path`` (as given or resolved) is one of ``folders`` or below one."""
    for candidate in {Path(os.path.abspath(path)), try_real_path(path)[0] or Path(os.path.abspath(path))}:
        if candidate in folders or any(parent in folders for parent in candidate.parents):
            return True
    return False


@dataclass(frozen=True)
class Source:
    """A volume found by ``discover_named``.

    Attributes:
        path: absolute, as given or found (symbolic links not resolved).
        name: the path relative to the input folder it was found in (or, for volumes given
            as files, listed or read from stdin, to the deepest folder holding all of
            them), without the volume suffix: ``p1/ct`` for ``data/p1/ct.nii.gz``.
        folder: the input folder it was found in; None for a volume not found in a folder
            given as input.
    """

    path: Path
    name: str
    folder: Path | None


def strip_volume_suffix(name: str) -> str:
    """``p1/ct.nii.gz`` -> ``p1/ct`` (any volume suffix of ``io.volume_suffix``)."""
    suffix = volume_suffix(name)
    return name[: -len(suffix)] if suffix else name


def matches_any(source: Source, patterns: Sequence[str]) -> bool:
    """Whether a glob pattern matches the source's name (``p1/ct``) or its file name
    (``ct.nii.gz``); ``*`` also matches ``/``, as in ``fnmatch``."""
    return any(fnmatch.fnmatchcase(source.name, p) or fnmatch.fnmatchcase(source.path.name, p) for p in patterns)


def select(sources: Sequence[Source], include: Sequence[str] = (), exclude: Sequence[str] = ()) -> list[Source]:
    """``sources`` matching one of ``include`` (all when empty) and none of ``exclude``."""
    chosen = [s for s in sources if matches_any(s, include)] if include else list(sources)
    return [s for s in chosen if not matches_any(s, exclude)] if exclude else chosen


def discover_named(
    inputs: Sequence[str | os.PathLike],
    *,
    stdin_lines: Iterable[str] = (),
    skip_under: str | os.PathLike | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> tuple[list[Source], list[Skipped]]:
    """Volumes named by ``inputs`` with their names (``Source``), and the inputs skipped.

    Each input may be a folder (searched recursively for NIfTI, NRRD, MHA/MHD files and
    DICOM series folders), a volume file, a DICOM series folder, a text file listing such
    paths one a line (``.txt``/``.lst``/``.list``, or any other text file whose entries
    exist; relative paths are relative to the list; ``#`` starts a comment), a glob pattern
    the shell did not expand, ``-`` (the paths in ``stdin_lines``) or a pipe such as
    ``<(find ...)`` (paths relative to the working folder). A file reached twice (given
    twice, ``d/../d/a.nii.gz``, a symbolic link, a folder and a file in it) is used once;
    the later paths are reported as skipped ("same file as ..."), so that every path given
    is either used or reported.

    Args:
        skip_under: a command's output folder: volumes found in it while searching a
            folder or reading a list (an earlier run's outputs, when the output folder sits
            inside an input folder) are left out silently; files given directly are kept.
        include, exclude: glob patterns (``matches_any``): only volumes matching one of
            ``include`` are kept, then those matching one of ``exclude`` are left out,
            silently.
    """
    items, skipped = expand_inputs(inputs, stdin_lines)
    found: list[tuple[Path, Path | None, bool]] = []  # (path made absolute, input folder, given directly)
    for item in items:
        path = Path(item).expanduser()
        if not path.exists():
            skipped.append(Skipped(str(path), absent_reason(path)))
        elif path.is_dir():
            walked = _walk_folder(path)
            if not walked:
                skipped.append(Skipped(str(path), "folder holds no NIfTI, NRRD, MHA/MHD file or DICOM series"))
            folder = Path(os.path.abspath(path))
            found.extend((p, folder if p != path else None, p == path) for p in walked)
        elif path.name.lower().endswith(PATH_LIST_SUFFIXES):
            listed, bad = _read_path_list(path)
            found.extend((p, None, False) for p in listed)
            skipped.extend(bad)
        elif volume_suffix(path) is None:
            text = _text_list(path)
            if text is None:
                skipped.append(Skipped(str(path), "not a volume file (expected .nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd, a DICOM folder or a list of paths)"))
            else:
                listed, bad = _read_path_list(path, text)
                found.extend((p, None, False) for p in listed)
                skipped.extend(bad)
        else:
            found.append((path, None, True))
    if skip_under is not None:
        fence = {Path(os.path.abspath(skip_under)), try_real_path(skip_under)[0] or Path(os.path.abspath(skip_under))}
        found = [f for f in found if f[2] or not _inside(f[0], fence)]
    first_seen: dict[Path, Path] = {}  # resolved path -> the path it was first found as
    unique: list[tuple[Path, Path | None]] = []
    for path, folder, _ in found:
        resolved, problem = try_real_path(path)
        if resolved is None:  # a link loop (a dangling link resolves, and fails when read)
            skipped.append(Skipped(str(path), problem))
        elif resolved not in first_seen:
            first_seen[resolved] = path
            unique.append((Path(os.path.abspath(path)), folder))
        elif str(first_seen[resolved]) == str(path):
            skipped.append(Skipped(str(path), "given more than once"))
        else:
            skipped.append(Skipped(str(path), f"same file as {first_seen[resolved]}"))
    loose = [path for path, folder in unique if folder is None]
    common = _common_folder(loose)
    sources = [Source(path, strip_volume_suffix(_below(path, folder if folder is not None else common).as_posix()), folder) for path, folder in unique]
    return select(sources, include, exclude), skipped


def discover(
    inputs: Sequence[str | os.PathLike],
    *,
    resolve: bool = True,
    skip_under: str | os.PathLike | None = None,
    stdin_lines: Iterable[str] = (),
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> tuple[list[Path], list[Skipped]]:
    """The paths of the volumes of ``discover_named`` (same arguments), in a stable order,
    and the inputs skipped.

    Args:
        resolve: return real paths (symbolic links resolved); False returns the paths as
            given or found, made absolute, so names derived from them follow the links'
            names (a DataLad/git-annex data set is all links into ``.git/annex``).
    """
    sources, skipped = discover_named(inputs, stdin_lines=stdin_lines, skip_under=skip_under, include=include, exclude=exclude)
    return [s.path.resolve() if resolve else s.path for s in sources], skipped


def _common_folder(paths: Sequence[Path]) -> Path | None:
    """The deepest folder holding all ``paths`` (absolute); None when there is none (no
    paths, or on Windows paths on different drives)."""
    try:
        return Path(os.path.commonpath([str(p.parent) for p in paths])) if paths else None
    except ValueError:
        return None


def _below(path: Path, folder: Path | None) -> Path:
    """``path`` relative to ``folder``; without a folder, relative to its drive or root with
    the drive letter kept (``D:/x/a`` -> ``D/x/a``), so names from two drives differ."""
    if folder is not None:
        return path.relative_to(folder)
    return type(path)(path.drive.rstrip(":"), path.relative_to(path.anchor))


def volume_paths(inputs: Sequence[str | os.PathLike], stdin_lines: Iterable[str] = ()) -> tuple[list[Path], list[Skipped]]:
    """The volumes named by ``inputs``, in the order given, for commands that take volumes
    one by one (info, apply), and the inputs skipped.

    A volume file or a DICOM series folder stays as given, so messages and outputs show the
    user's path; a folder of volumes, a glob pattern, a list of paths, ``-`` and a pipe are
    expanded as ``discover_named`` does.
    """
    sources, skipped = volume_sources(inputs, stdin_lines)
    return [source.path for source in sources], skipped


def volume_sources(inputs: Sequence[str | os.PathLike], stdin_lines: Iterable[str] = (), *, skip_under: str | os.PathLike | None = None) -> tuple[list[Source], list[Skipped]]:
    """``volume_paths`` with names: the volumes named by ``inputs`` as ``Source``, in the
    order given, and the inputs skipped.

    Paths are as ``volume_paths`` gives them (a file given stays as written). A volume found
    in a folder given as input is named by its path below that folder (``Source.folder`` is
    that folder); every other volume (a file or DICOM folder given, a glob match, a list or
    stdin entry) by its path below the deepest folder holding all of those, as
    ``discover_named`` names them. ``skip_under``: as in ``discover_named`` (a command's
    output folder inside an input folder is not searched).
    """
    sources: list[Source] = []
    skipped: list[Skipped] = []
    for item in inline_streams(inputs, stdin_lines):
        path = Path(item).expanduser()
        if (path.is_file() and volume_suffix(path) is not None) or (path.is_dir() and _walk_folder(path) == [path]):
            sources.append(Source(path, path.name, None))
        else:
            found, bad = discover_named([item], skip_under=skip_under)
            sources.extend(found)
            skipped.extend(bad)
    loose = [Path(os.path.abspath(s.path)) for s in sources if s.folder is None]
    common = _common_folder(loose)
    named = []
    for source in sources:
        if source.folder is None:
            source = Source(source.path, strip_volume_suffix(_below(Path(os.path.abspath(source.path)), common).as_posix()), None)
        named.append(source)
    return named, skipped


def output_subfolders(sources: Sequence[Source], file_name: Callable[[Path], str]) -> list[str]:
    """The sub-folder of each source's output in a command's output folder (POSIX, "" for
    its top), for commands writing one output per input named after the input's file
    (``file_name(path)``: segment's ``CASE.nii.gz``, apply's ``scan_warped.nii.gz``).

    - A volume found in a folder given as input goes where it sits below that folder
      (``ds/p01/image.nii.gz`` -> ``p01``): one folder per patient is mirrored, a flat
      folder stays flat.
    - The other volumes (files given, glob matches, list or stdin entries) go to the top
      when their output file names all differ; when two would take the same name, each of
      them goes where it sits below the deepest folder holding them all
      (``ds/p01/image.nii.gz`` and ``ds/p02/image.nii.gz`` -> ``p01``, ``p02``), as
      ``Source.name`` names them.
    """
    loose = [Path(os.path.abspath(s.path)) for s in sources if s.folder is None]
    loose_names = [file_name(p) for p in loose]
    mirror_loose = len(set(loose_names)) < len(loose_names)
    common = _common_folder(loose)
    subfolders = []
    for source in sources:
        if source.folder is not None:
            parent = Path(os.path.abspath(source.path)).parent.relative_to(source.folder)
        elif mirror_loose:
            parent = _below(Path(os.path.abspath(source.path)).parent, common)
        else:
            parent = Path()
        subfolders.append("" if parent == Path() else parent.as_posix())
    return subfolders


# --------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """``preprocessed/`` in gvsl's cache root (``$GVSL_HOME`` or the user cache folder)."""
    return cache_root() / "preprocessed"


def content_stamp(source: Path, files: Sequence[Path] | None = None) -> list:
    """What identifies the bytes of the volume ``source`` without reading them: per file of
    ``_source_files`` (or ``files``), its resolved path, size, mtime, ctime and inode.

    ctime and inode too: new content of the same size copied with the old mtime (cp -p,
    rsync -a) changes them, and no tool can set them back. Equal stamps mean equal
    content; different ones only mean "read it to know" (``content_sha256``).

    Raises:
        OSError: a file cannot be examined.
    """
    stamps = []
    for f in _source_files(Path(source)) if files is None else files:
        st = f.stat()
        stamps.append([str(f.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])
    return stamps


def content_sha256(source: Path, files: Sequence[Path] | None = None) -> str:
    """Hex sha256 of the bytes of the volume ``source``: every file of ``_source_files``
    (or ``files``), with the file names for a DICOM folder (a renamed slice is another series).

    Raises:
        OSError: a file cannot be read.
    """
    source = Path(source)
    hasher = hashlib.sha256()
    for f in _source_files(source) if files is None else files:
        hasher.update(f.name.encode() if source.is_dir() else b"")
        with open(f, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                hasher.update(block)
    return hasher.hexdigest()


def _source_files(source: Path) -> list[Path]:
    """Every file whose bytes make up the volume ``source`` (header + data, DICOM slices).

    For a DICOM series folder this is every file in the folder (not recursive), a superset of
    the series' slices: asking GDCM which files form the series opens and parses every slice,
    which a cache hit must not cost (on network storage that is most of a run's start). Any
    change to a slice still changes the key; a change to an unrelated file there only costs
    one more preparation.
    """
    if source.is_dir():
        return sorted(p for p in source.iterdir() if p.is_file())
    files = [source]
    suffix = volume_suffix(source)
    if suffix in (".mhd", ".nhdr"):
        # The header names its data file; a change of the data must change the key too.
        pattern = r"^\s*ElementDataFile\s*=\s*(.+)$" if suffix == ".mhd" else r"^\s*data file\s*:\s*(.+)$"
        try:
            header = source.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return files
        match = re.search(pattern, header, flags=re.MULTILINE | re.IGNORECASE)
        if match and match.group(1).strip() not in ("LOCAL", "LIST"):
            data = source.parent / match.group(1).strip()
            if data.is_file():
                files.append(data)
    return files


def _npy_layout(path: Path) -> tuple[tuple[int, ...], np.dtype] | None:
    """(shape, dtype) of a complete C-order ``.npy`` file; None when unreadable or cut short.

    Reads only the header and compares the file size with header + shape x itemsize: a file
    cut short (a full disk, a crash before the data reached the disk, a bad copy) would
    otherwise fail later, inside training, when ``np.load`` maps it or reads its header.
    """
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(handle)
            elif version == (2, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(handle)
            else:
                return None
            expected = handle.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            actual = os.fstat(handle.fileno()).st_size
    except (OSError, ValueError, EOFError):
        return None
    if fortran_order or actual != expected:
        return None
    return tuple(shape), dtype


def _valid_meta(meta: object) -> bool:
    """True when a cache entry's JSON has what ``get`` reads, with the right types."""
    if not isinstance(meta, dict):
        return False
    shape = meta.get("shape")
    value_range = meta.get("range")
    return (
        isinstance(meta.get("source"), str)
        and meta.get("modality") in ("ct", "mr")
        and isinstance(shape, list)
        and len(shape) == 3
        and all(type(n) is int and n > 0 for n in shape)
        # "range" is absent in entries of gvsl versions before it was recorded.
        and (value_range is None or (isinstance(value_range, list) and len(value_range) == 2 and all(type(v) in (int, float) for v in value_range)))
    )


class VolumeCache:
    """Preprocessed volumes on disk, keyed by source content and preprocessing settings.

    Layout: ``<root>/<key[:2]>/<key>.npy`` (the (D, H, W) float32 array) and ``<key>.json``
    (what it came from: source, modality, shape, value range, canonical grid). The array is
    written first and the JSON last, each atomically (temporary file + rename), so a reader
    sees each file either whole or not at all; concurrent writers (ranks, runs) of the same
    key write the same content and the last rename wins. An entry that is incomplete or
    damaged anyway (a file cut short, edited or emptied) is a miss: ``get`` checks both
    files, and the volume is prepared again and the entry rewritten, by the same renames.
    Hashing a large file on every run would be slow, so ``<root>/stat/`` remembers the
    content digest of a file by (path, size, modification time, change time, inode).
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def _digest(self, source: Path) -> str:
        files = _source_files(source)
        signature = content_stamp(source, files)
        stat_key = hashlib.sha256(json.dumps(signature).encode()).hexdigest()
        stat_file = self.root / "stat" / f"{stat_key}.txt"
        try:
            remembered = stat_file.read_text(encoding="ascii", errors="replace").strip()
        except OSError:
            remembered = ""
        if re.fullmatch(r"[0-9a-f]{64}", remembered):
            return remembered
        digest = content_sha256(source, files)
        try:
            with atomic_path(stat_file) as tmp:
                tmp.write_text(digest, encoding="ascii")
        except OSError:
            pass  # only saves hashing next time (e.g. a read-only shared cache)
        return digest

    def key(self, source: Path, config: PreprocessConfig) -> str:
        """Cache key of ``source`` prepared with ``config`` (hex sha256)."""
        settings = json.dumps({"format": CACHE_FORMAT, "preprocess": config.to_dict()}, sort_keys=True)
        return hashlib.sha256((settings + self._digest(source)).encode()).hexdigest()

    def _paths(self, key: str) -> tuple[Path, Path]:
        folder = self.root / key[:2]
        return folder / f"{key}.npy", folder / f"{key}.json"

    def get(self, key: str) -> "CachedVolume | None":
        """The cached entry ``key``, or None when absent, incomplete or damaged.

        Damaged means: JSON unreadable or missing a field; ``.npy`` header unreadable, not
        float32 of the JSON's shape, or the file shorter or longer than that header says.
        """
        array_path, meta_path = self._paths(key)
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # absent, unreadable, not UTF-8, not JSON
            return None
        if not _valid_meta(meta):
            return None
        layout = _npy_layout(array_path)
        if layout is None or layout != (tuple(meta["shape"]), np.dtype(np.float32)):
            return None
        value_range = tuple(float(v) for v in meta["range"]) if "range" in meta else None
        return CachedVolume(
            key=key, array_path=array_path, source=meta["source"], modality=meta["modality"], shape=tuple(meta["shape"]), value_range=value_range,
            detected=str(meta.get("detected", "")),
        )

    def put(self, key: str, source: Path, array: np.ndarray, modality: str, grid: dict, detected: str = "") -> "CachedVolume":
        """Store a prepared (D, H, W) array under ``key``; returns the entry. ``detected``:
        what the raw intensities looked like ("ct"/"mr"), kept so that a run served from the
        cache can still warn about a mapping that does not fit.

        Raises:
            CacheWriteError: the entry could not be written (a full disk, a quota); nothing
                of it is left behind (atomic writes).
        """
        array_path, meta_path = self._paths(key)
        value_range = (float(array.min()), float(array.max()))
        meta = {"source": str(source), "modality": modality, "detected": detected, "shape": list(array.shape), "range": list(value_range), "grid": grid, "format": CACHE_FORMAT}
        try:
            with atomic_path(array_path) as tmp:
                with open(tmp, "wb") as handle:
                    np.save(handle, np.ascontiguousarray(array, dtype=np.float32))
            with atomic_path(meta_path) as tmp:
                tmp.write_text(json.dumps(meta), encoding="utf-8")
        except OSError as exc:
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            raise CacheWriteError(
                f"cannot write the preprocessed-volume cache in {self.root}: {exc.strerror or exc}",
                hint="free disk space there, or give another folder with --cache-dir" if full else "give a writable folder with --cache-dir",
            ) from exc
        return CachedVolume(key=key, array_path=array_path, source=str(source), modality=modality, shape=tuple(array.shape), value_range=value_range, detected=detected)

    def record_range(self, entry: "CachedVolume") -> tuple[float, float]:
        """Compute (min, max) of an entry made before ranges were stored, and store it.

        Reads the whole array once; the JSON is rewritten (atomically, best effort: a
        read-only cache just computes it again next time) so later runs do not.
        """
        value_range = (float(entry.array.min()), float(entry.array.max()))
        _, meta_path = self._paths(entry.key)
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            meta["range"] = list(value_range)
            with atomic_path(meta_path) as tmp:
                tmp.write_text(json.dumps(meta), encoding="utf-8")
        except (OSError, ValueError, TypeError):
            pass
        return value_range


@dataclass
class CachedVolume:
    """One preprocessed volume in the cache.

    Attributes:
        key: cache key (content + settings).
        array_path: the .npy file of the (D, H, W) float32 intensities on the canonical grid.
        source: where it was read from (for messages).
        modality: "ct" or "mr", the intensity mapping used.
        shape: (D, H, W).
        value_range: (min, max) of the array (after the intensity mapping, so about [0, 1]);
            None for entries of older gvsl versions until ``VolumeCache.record_range``.
        from_cache: True when this run found it in the cache, False when this process
            prepared it (read and resampled the source).
        detected: what the raw intensities look like, "ct" or "mr"
            (``preprocess.detect_modality``); "" for entries of older gvsl versions.
    """

    key: str
    array_path: Path
    source: str
    modality: str
    shape: tuple[int, int, int]
    value_range: tuple[float, float] | None = None
    from_cache: bool = False
    detected: str = ""
    # Not in repr or ==: printing a memory-mapped array reads the whole file.
    _array: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def array(self) -> np.ndarray:
        """The (D, H, W) float32 array, memory-mapped read-only (opened once)."""
        if self._array is None:
            self._array = np.load(self.array_path, mmap_mode="r")
        return self._array


def check_not_constant(low: float, high: float, where: str = "") -> None:
    """Raise InputError when ``low == high`` (a volume of one intensity)."""
    # A constant volume has no structure to register: its NCC with anything is constant
    # (1.0 against another constant patch), so it only adds pairs that teach nothing.
    if low == high:
        raise InputError(f"constant intensity (all voxels {low:g}{where})", hint="leave out empty or blank volumes")


#: An integer volume with at most this many distinct values is taken for a label map.
LABEL_MAP_MAX_VALUES = 64
#: Voxels looked at first by ``label_map_values``: a CT or MR stored as integers shows more
#: than LABEL_MAP_MAX_VALUES values among them, so only a likely label map is read whole.
LABEL_MAP_SAMPLE = 100_000


def label_map_values(image) -> int | None:
    """How many distinct values ``image`` holds when it looks like a label map (an integer
    pixel type and at most ``LABEL_MAP_MAX_VALUES`` distinct values), else None.

    Cheap: nothing is computed for a float image, and an integer one is first sampled
    (every n-th voxel); the whole array is counted only when the sample has few values.
    A CT in int16 Hounsfield units holds hundreds of values; an nnU-Net labelsTr map, a
    tissue classification or a k-means segmentation a handful.
    """
    import SimpleITK as sitk

    array = sitk.GetArrayViewFromImage(image)
    if array.dtype.kind not in "iu":
        return None
    flat = array.reshape(-1)
    step = max(1, flat.size // LABEL_MAP_SAMPLE)
    if np.unique(flat[::step]).size > LABEL_MAP_MAX_VALUES:
        return None
    count = int(np.unique(flat).size)
    return count if count <= LABEL_MAP_MAX_VALUES else None


def read_and_prepare(source: Path, config: PreprocessConfig, *, refuse_label_maps: bool = False):
    """Read ``source`` and run ``preprocess.prepare``; the one place training data is decoded.

    Raises InputError for a constant volume (see ``check_not_constant``) and, with
    ``refuse_label_maps``, for a volume that looks like a label map (``label_map_values``):
    pre-training on one teaches the network nothing about images.
    """
    import SimpleITK as sitk

    from gvsl_cli.preprocess import prepare

    image = read_volume(source)
    extremes = sitk.MinimumMaximumImageFilter()
    extremes.Execute(image)
    check_not_constant(extremes.GetMinimum(), extremes.GetMaximum())
    if refuse_label_maps:
        values = label_map_values(image)
        if values is not None:
            raise InputError(f"looks like a label map ({values} distinct integer values)", hint="leave label maps out, e.g. --exclude 'labelsTr/*'")
    return prepare(image, config)


def _prepare_one(source: Path, config: PreprocessConfig, cache: VolumeCache, refuse_label_maps: bool = False) -> CachedVolume:
    key = cache.key(source, config)
    entry = cache.get(key)
    if entry is None:
        # Checked only here, when the volume is read anyway: a cache hit reads no voxel.
        prepared = read_and_prepare(source, config, refuse_label_maps=refuse_label_maps)
        # Resampling and the intensity mapping can flatten a volume that was not constant
        # (e.g. a CT wholly above the +1024 HU clip); it is as useless then.
        check_not_constant(float(prepared.array.min()), float(prepared.array.max()), " after preprocessing")
        grid = {"size": list(prepared.grid.size), "spacing": list(prepared.grid.spacing), "origin": list(prepared.grid.origin)}
        return cache.put(key, source, prepared.array, prepared.modality, grid, detected=prepared.detected)
    # The entry remembers the path it was first made from; report this input's path.
    entry = dataclasses.replace(entry, source=str(source), from_cache=True)
    if entry.value_range is None:
        entry.value_range = cache.record_range(entry)
    check_not_constant(*entry.value_range, " after preprocessing")
    return entry


def failure_reason(exc: BaseException, source: Path) -> str:
    """Why ``source`` failed, in one line, without its path (the caller prints the path once).

    gvsl's own errors name the file first ("PATH: reason"); that prefix is dropped. Other
    errors keep their type name, except OSError whose ``strerror`` reads on its own.
    """
    if isinstance(exc, OSError) and exc.strerror:
        name = exc.filename
        return exc.strerror if name is None or os.fspath(name) == str(source) else f"{exc.strerror}: {os.fspath(name)}"
    lines = str(exc).strip().splitlines()
    text = lines[0].strip() if lines else ""
    for path in (str(source), str(try_real_path(source)[0] or source)):
        if text.startswith(path + ": "):
            text = text[len(path) + 2 :]
            break
    if isinstance(exc, GvslError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass
class Dataset:
    """The usable, preprocessed volumes of a run and the inputs skipped."""

    volumes: list[CachedVolume]
    skipped: list[Skipped]

    @property
    def prepared(self) -> int:
        """How many of ``volumes`` this process read and preprocessed (cache misses).

        Under distributed training each rank counts only its own work: volumes another
        rank prepared in this run count as ``from_cache`` here (sum over ranks for the run's).
        """
        return sum(not v.from_cache for v in self.volumes)

    @property
    def from_cache(self) -> int:
        """How many of ``volumes`` were found already preprocessed in the cache."""
        return sum(v.from_cache for v in self.volumes)

    def modality_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for volume in self.volumes:
            counts[volume.modality] = counts.get(volume.modality, 0) + 1
        return counts


def prepare_dataset(
    sources: Sequence[Path],
    config: PreprocessConfig,
    cache: VolumeCache,
    *,
    workers: int = 1,
    shard: tuple[int, int] = (0, 1),
    barrier: Callable[[], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    refuse_label_maps: bool = False,
) -> Dataset:
    """Preprocess (or find in ``cache``) every source; unreadable ones are skipped with reasons.

    Under distributed training each rank first prepares its ``shard`` = (rank, world) of
    the sources, then waits at ``barrier``, then takes the rest from the cache (preparing
    whatever it still misses itself, e.g. with a cache folder local to each node). The
    volumes keep the order of ``sources`` on every rank.

    Args:
        workers: threads used to read and resample (SimpleITK releases the GIL).
        on_progress: called with (done, total = len(sources)) after each source.
        refuse_label_maps: skip volumes that look like label maps (``label_map_values``),
            checked when a volume is prepared (a cached volume passed the check before).

    Returns:
        The volumes (each says whether it came from the cache, see ``Dataset.prepared``)
        and the sources skipped, with one-line reasons.
    """
    rank, world = shard
    results: dict[int, CachedVolume | Skipped] = {}

    def progress(done: int, _total: int) -> None:
        if on_progress:
            on_progress(len(results) + done, len(sources))

    if world > 1:
        mine = [i for i in range(len(sources)) if i % world == rank]
        # Keep these results: looking them up again after the barrier would re-hash them
        # and re-read the ones that failed.
        results.update(zip(mine, _prepare_many([sources[i] for i in mine], config, cache, workers, progress, refuse_label_maps)))
        if barrier is not None:
            barrier()
    rest = [i for i in range(len(sources)) if i not in results]
    results.update(zip(rest, _prepare_many([sources[i] for i in rest], config, cache, workers, progress, refuse_label_maps)))
    ordered = [results[i] for i in range(len(sources))]
    volumes = [r for r in ordered if isinstance(r, CachedVolume)]
    skipped = [r for r in ordered if isinstance(r, Skipped)]
    return Dataset(volumes=volumes, skipped=skipped)


def _prepare_many(sources, config, cache, workers, on_progress, refuse_label_maps=False) -> list["CachedVolume | Skipped"]:
    def job(source: Path) -> "CachedVolume | Skipped":
        try:
            return _prepare_one(source, config, cache, refuse_label_maps)
        except CacheWriteError:
            raise  # the cache's problem, not this input's: stop (see CacheWriteError)
        except (GvslError, RuntimeError, OSError, ValueError, MemoryError) as exc:
            return Skipped(str(source), failure_reason(exc, source))

    results: list = []
    if workers <= 1 or len(sources) <= 1:
        for done, source in enumerate(sources, start=1):
            results.append(job(source))
            if on_progress:
                on_progress(done, len(sources))
        return results
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
    try:
        for done, result in enumerate(pool.map(job, sources), start=1):
            results.append(result)
            if on_progress:
                on_progress(done, len(sources))
    except BaseException:
        # Do not prepare the thousands of volumes still queued before reporting the error.
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return results


# --------------------------------------------------------------------------- sampling


def iteration_seed(seed: int, rank: int, iteration: int, stream: int) -> int:
    """A 63-bit seed for one (run seed, rank, iteration, stream): counter-based randomness.

    Every random draw of an iteration derives from this alone, never from what ran before,
    which is what makes a resumed run repeat an uninterrupted one exactly.
    """
    state = np.random.SeedSequence([int(seed), int(rank), int(iteration), int(stream)]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def effective_patch(volumes: Sequence[CachedVolume], patch: tuple[int, int, int]) -> tuple[int, int, int]:
    """The patch actually used: ``patch`` shrunk on any axis where every volume is smaller.

    Canonical volumes have sides that are multiples of 16, so the result is too when
    ``patch`` is. Volumes still smaller than the patch on some axis are padded (see
    ``crop_with_padding``).
    """
    largest = [max(v.shape[axis] for v in volumes) for axis in range(3)]
    return tuple(min(p, n) for p, n in zip(patch, largest))


def crop_with_padding(array: np.ndarray, size: tuple[int, int, int], rng: np.random.Generator, out: np.ndarray) -> None:
    """Copy a random ``size`` box of ``array`` (D, H, W) into ``out`` (zeros where it overhangs).

    Along an axis longer than the box, the box start is uniform over all positions inside;
    along a shorter axis, the volume is placed at a uniform offset inside the box and the
    rest stays 0 (air for CT, background for MR after the intensity mapping).
    """
    src, dst = [], []
    for n, p in zip(array.shape, size):
        start = int(rng.integers(0, n - p + 1)) if n >= p else -int(rng.integers(0, p - n + 1))
        lo = max(start, 0)
        hi = min(start + p, n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
    out.fill(0.0)
    out[tuple(dst)] = array[tuple(src)]


class PairSampler:
    """Pairs of patches of two different volumes for one training iteration.

    Args:
        volumes: at least two cached volumes.
        region: (D, H, W) of the crops returned (the patch plus the augmentation margin).
        seed, rank: with the iteration, they alone decide the draws.
    """

    def __init__(self, volumes: Sequence[CachedVolume], region: tuple[int, int, int], *, seed: int, rank: int = 0) -> None:
        if len(volumes) < 2:
            raise InputError(f"pre-training pairs two different volumes; only {len(volumes)} usable volume found", hint="give at least two volumes")
        self.volumes = list(volumes)
        self.region = tuple(int(r) for r in region)
        self.seed = seed
        self.rank = rank

    def _rng(self, iteration: int) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64(iteration_seed(self.seed, self.rank, iteration, STREAM_DATA)))

    def _draw_pairs(self, rng: np.random.Generator, batch: int) -> list[tuple[int, int]]:
        n = len(self.volumes)
        result = []
        for _ in range(batch):
            a = int(rng.integers(n))
            b = int(rng.integers(n - 1))  # one of the n - 1 others: never A itself
            result.append((a, b + (b >= a)))
        return result

    def pairs(self, iteration: int, batch: int) -> list[tuple[int, int]]:
        """Indices (a, b), a ≠ b, of the ``batch`` pairs of ``iteration``."""
        return self._draw_pairs(self._rng(iteration), batch)

    def sample(self, iteration: int, batch: int, out_a: np.ndarray | None = None, out_b: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Crops of A and B, each (batch, 1, *region) float32, for ``iteration``.

        ``out_a``/``out_b`` (e.g. views of pinned tensors) are filled in place when given.
        """
        rng = self._rng(iteration)
        shape = (batch, 1, *self.region)
        out_a = np.empty(shape, np.float32) if out_a is None else out_a
        out_b = np.empty(shape, np.float32) if out_b is None else out_b
        for item, (a, b) in enumerate(self._draw_pairs(rng, batch)):
            crop_with_padding(self.volumes[a].array, self.region, rng, out_a[item, 0])
            crop_with_padding(self.volumes[b].array, self.region, rng, out_b[item, 0])
        return out_a, out_b


class PrefetchLoader:
    """Batches of ``PairSampler`` for iterations start, start+1, ... made ahead in threads.

    Each batch is two CPU tensors (batch, 1, *region), in pinned memory when ``pin`` (so the
    copy to the GPU can overlap compute). Batches depend only on their iteration number, so
    the order threads finish in does not matter. ``workers=0`` samples in the caller's
    thread.
    """

    def __init__(self, sampler: PairSampler, batch: int, *, start: int, workers: int = 2, pin: bool = False, depth: int | None = None) -> None:
        self.sampler = sampler
        self.batch = batch
        self.next_iteration = start
        self.workers = max(0, workers)
        self.pin = pin
        self.depth = depth or max(2, 2 * self.workers)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.workers) if self.workers else None
        self._pending: deque = deque()

    def _make(self, iteration: int):
        import torch

        shape = (self.batch, 1, *self.sampler.region)
        a = torch.empty(shape, dtype=torch.float32, pin_memory=self.pin)
        b = torch.empty(shape, dtype=torch.float32, pin_memory=self.pin)
        self.sampler.sample(iteration, self.batch, a.numpy(), b.numpy())
        return a, b

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        """(A, B) CPU tensors of the next iteration."""
        iteration = self.next_iteration
        self.next_iteration += 1
        if self._pool is None:
            return self._make(iteration)
        while len(self._pending) < self.depth:
            queued = iteration + len(self._pending)
            self._pending.append(self._pool.submit(self._make, queued))
        return self._pending.popleft().result()

    def close(self) -> None:
        if self._pool is not None:
            for future in self._pending:
                future.cancel()
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
