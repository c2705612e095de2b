"""Stopping a training command cleanly: SIGTERM and Ctrl-C turned into a stop request."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Callable, Iterator


@contextmanager
def stop_requests(reporter) -> Iterator[Callable[[], bool]]:
    """Within the block, SIGTERM (SLURM's warning before a time limit, or ``kill``) asks the
    training loop to checkpoint and stop after the current iteration; so does Ctrl-C while
    training, and a second Ctrl-C aborts at once. Before training starts (preparing data)
    Ctrl-C aborts, as there is nothing to save.

    Yields the ``should_stop`` callable for the engine. ``reporter`` needs
    ``training_started`` and ``note``.
    """
    requested = {"flag": False}

    def request_stop(signum, frame) -> None:
        if not requested["flag"]:
            reporter.note("warning: SIGTERM: stopping after this iteration with a checkpoint")
        requested["flag"] = True

    def interrupt(signum, frame) -> None:
        if requested["flag"] or not reporter.training_started:
            raise KeyboardInterrupt
        requested["flag"] = True
        reporter.note("warning: stopping after this iteration with a checkpoint (Ctrl-C again to abort without one)")

    previous_term = signal.signal(signal.SIGTERM, request_stop)
    previous_int = signal.signal(signal.SIGINT, interrupt)
    try:
        yield lambda: requested["flag"]
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)


def exit_if_stopped(summary, command: str, *, announce: bool = True) -> None:
    """End a training command whose run stopped before its last iteration with
    ``STOPPED_EXIT_CODE``, after one line on stderr that --quiet does not hide."""
    import typer

    from gvsl_cli.errors import STOPPED_EXIT_CODE

    if summary is None or summary.stopped is None:
        return
    if announce:
        typer.echo(f"stopped at iteration {summary.iteration} ({summary.stopped}): the run is not finished; continue it with gvsl {command} --resume", err=True)
    raise typer.Exit(STOPPED_EXIT_CODE)
