"""What the commands share in their input and output options.

- ``-`` among a command's inputs reads paths from stdin, one a line (``find ... | gvsl
  segment - ...``); ``stdin_for`` hands stdin to ``data.discover`` only then.
- ``-o`` names a folder in every command; ``-o -`` (stdout) is refused by
  ``refuse_stdout_folder`` before anything runs, rather than creating a folder named
  ``-`` that a later ``-`` input would then not mean; so is a volume file name (``-o
  pred.nii.gz``, a TotalSegmentator habit), which would become a folder of that name,
  and one of the command's option names (``-o -q`` would eat the ``-q``).
- Every ``-o`` accepts both ``--output`` and ``--out`` (the command's own first).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterable, Optional, Sequence

import typer


def stdin_for(inputs: Sequence[str | os.PathLike]) -> Iterable[str]:
    """``sys.stdin`` when one of ``inputs`` is ``-``, else an empty tuple.

    Raises:
        InputError: ``-`` is given but stdin is a terminal (the command would wait for
            typed paths, which is never what a ``-`` in a script means) or closed.
    """
    from gvsl_cli.errors import InputError

    if not any(os.fspath(item) == "-" for item in inputs):
        return ()
    hint = "pipe the paths in, e.g. find DIR -name '*.nii.gz' | gvsl COMMAND - ..."
    if sys.stdin is None:  # started with stdin closed (``<&-``)
        raise InputError("-: reads paths from stdin, but stdin is closed", hint=hint)
    if sys.stdin.isatty():
        raise InputError("-: reads paths from stdin, but stdin is a terminal", hint=hint)
    return sys.stdin


def refuse_stdout_folder(value: Optional[Path], context: typer.Context = None) -> Optional[Path]:
    """Typer callback of ``-o``: refuses ``-`` (gvsl writes files into a folder, never to
    stdout), one of the command's own option names (``-o -q`` took ``-q`` as the folder and
    dropped the option) and a volume file name that is not an existing folder; other values
    pass unchanged. Typer passes ``context``; without it (a direct call) option names are
    not checked."""
    from gvsl_cli.errors import InputError
    from gvsl_cli.io import volume_suffix

    if value is not None and os.fspath(value) == "-":
        raise InputError("-o -: outputs are files written into a folder, not a stream on stdout", hint="give a folder name with -o")
    if value is not None and context is not None and os.fspath(value) in option_names(context):
        raise InputError(
            f"-o {value}: -o needs a folder name, and {value} is an option of this command",
            # Typer hands over a Path, in which "./-q" is "-q" again: only a full path tells them apart.
            hint=f'give the folder right after -o (a folder really named so: its full path, -o "$PWD/{value}")',
        )
    if value is not None and not Path(value).is_dir():
        volume, suffix = volume_suffix(Path(value)), Path(value).suffix.lower()
        if volume is not None or suffix in DATA_FILE_SUFFIXES:
            # TotalSegmentator's `-o file.nii.gz` habit (or `embed -o features.jsonl`): a
            # folder of that name would break the next tool that opens it as a file.
            what = "a volume file name" if volume is not None else f"a {suffix} file name"
            raise InputError(
                f"-o {value}: -o names a folder, and this is {what}",
                hint="give a folder (outputs are written into it under their own names, e.g. OUT/CASE.nii.gz or OUT/embeddings.jsonl)",
            )
    return value


def option_names(context: typer.Context) -> set[str]:
    """Every option name of ``context``'s command (``-q``, ``--quiet``, ``--no-augment``,
    ``--help``...)."""
    names = set(context.help_option_names)
    for parameter in context.command.params:
        names.update(getattr(parameter, "opts", ()))
        names.update(getattr(parameter, "secondary_opts", ()))
    return {name for name in names if name.startswith("-")}


#: File endings of gvsl's data outputs that a folder given with -o should not carry.
DATA_FILE_SUFFIXES = (".jsonl", ".json", ".npy", ".npz", ".csv", ".pt", ".pth", ".tfm", ".mat", ".h5")


def given_on_command_line(context, names: Sequence[str]) -> frozenset[str]:
    """Which of the options ``names`` (parameter names) the user gave, not left at their
    defaults: a resumed run takes the others from its checkpoint."""
    given = set()
    for name in names:
        source = context.get_parameter_source(name)
        if source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP"):
            given.add(name)
    return frozenset(given)
