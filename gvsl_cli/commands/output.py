"""Where the commands print tables: stdout, never cut at 80 columns."""

from __future__ import annotations


def table_console():
    """A stdout rich Console for tables and reports that never cuts a value.

    Off a terminal (a pipe, a file, a CI or SLURM log) rich would assume 80 columns and end
    long values (paths, hashes) with "…"; there no width limit applies and a table takes its
    natural width. On a terminal the width is the terminal's. Markup is off: table cells and
    titles hold file names, and a name such as ``scan [ct].nii.gz`` or ``v[/b]`` must print
    as it is (rich would drop the brackets, or stop at an unmatched closing tag).
    """
    from rich.console import Console

    console = Console(highlight=False, markup=False)
    if not console.is_terminal:
        console = Console(highlight=False, markup=False, width=100_000)
    return console
