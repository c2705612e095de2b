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
