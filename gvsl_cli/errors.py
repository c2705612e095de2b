"""The error tree of gvsl.

The engine raises these; only ``cli.py`` turns them into a one-line message, a hint and an
exit code. Messages say what was expected and what came, and name the file involved.
"""

from __future__ import annotations


class GvslError(Exception):
    """Base of every error gvsl reports to a user.

    Attributes:
        hint: one sentence telling the user what to do, shown after the message.
        exit_code: the process exit code the CLI uses for this error.
    """

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class InputError(GvslError):
    """A file or argument given by the user cannot be used (unreadable, wrong shape, NaN...)."""

    exit_code = 2


class ConfigError(GvslError):
    """Options that contradict each other or are out of range."""

    exit_code = 2


class CheckpointError(GvslError):
    """A weights file that cannot be loaded into the model it claims to fit."""

    exit_code = 3


class WeightsError(GvslError):
    """Unknown weights name, download failure, checksum mismatch, offline and not cached."""

    exit_code = 4


class TrainingError(GvslError):
    """Training cannot go on (loss became NaN, run folder in an inconsistent state...)."""

    exit_code = 6


class DeviceError(GvslError):
    """The requested device is unavailable or ran out of memory."""

    exit_code = 5


class IncompleteError(GvslError):
    """A command over many inputs finished, but some inputs could not be processed (each
    reported on its own line); a distinct code lets a pipeline tell this from a run that
    did nothing."""

    exit_code = 7


#: Exit code of a training run (pretrain, finetune) that stopped before its last iteration
#: (SIGTERM, Ctrl-C, --time-limit) after writing a checkpoint: not an error, but not done
#: either, so that ``gvsl pretrain ... && gvsl finetune ...`` does not go on with a half-
#: trained model and a scheduler does not mark the job complete; ``--resume`` continues.
STOPPED_EXIT_CODE = 8


#: Words of the allocators' failures: CUDA's "out of memory", and the CPU allocator's
#: "DefaultCPUAllocator: can't allocate memory" (a --width 8192 model, a huge window).
_OUT_OF_MEMORY_WORDS = ("out of memory", "defaultcpuallocator", "can't allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a device or host allocation failure (torch's OutOfMemoryError, the
    CPU allocator's RuntimeError, Python's MemoryError), which gvsl reports as one
    out-of-memory line, not as an internal error."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return any(words in text for words in _OUT_OF_MEMORY_WORDS)
