"""The ``gvsl`` command line: parse, call the engine, render; the only layer that prints or exits.

Each subcommand lives in ``gvsl_cli/commands/<name>.py`` and registers itself on ``app``;
heavy imports (torch, SimpleITK) happen inside the command functions so that
``gvsl --help`` and ``gvsl --version`` stay instant. Errors raised by the engine
(``gvsl_cli.errors.GvslError``) become one line on stderr and an exit code; a traceback is
shown only with ``--debug``.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import warnings

import typer

from gvsl_cli import __version__
from gvsl_cli.commands import COMMAND_MODULES
from gvsl_cli.errors import DeviceError, GvslError, InputError, TrainingError, is_out_of_memory


app = typer.Typer(
    name="gvsl",
    help="GVSL for 3D medical images: pre-train, register, apply transforms, embed, fine-tune and apply segmentation, fetch weights (CT and MR; NIfTI, NRRD, MHA, DICOM).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"gvsl {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    """GVSL (Geometric Visual Similarity Learning, CVPR 2023) for CT and MR volumes."""
    # --debug is read in run() (it must still be known when an exception escapes).


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, SLURM's time limit or preemption) while a command runs. A
    KeyboardInterrupt, so everything that cleans up after Ctrl-C (temporary files of atomic
    writes, empty output folders) does the same here; training commands turn SIGTERM into a
    clean stop with a checkpoint instead (``commands.stopping``)."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated


class _Escaped(Exception):
    """Carries an exception that Typer would otherwise swallow out of a command to ``run``."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(str(original))
        self.original = original


def _guarded(command):
    """``command`` with Ctrl-C and EOFError passed on to ``run``.

    Typer would turn the first into a silent exit 130 and the second (raised, e.g., when a
    truncated file is read) into a bare "Aborted." without a reason.
    """

    @functools.wraps(command)
    def guarded(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (KeyboardInterrupt, EOFError) as exc:
            raise _Escaped(exc) from exc

    return guarded


for _module in COMMAND_MODULES:
    _module.register(app)
for _command in app.registered_commands:
    _command.callback = _guarded(_command.callback)


# Typer 0.29 labels option values as ``<int range>``, ``<str>`` or ``<path>``, and labels
# on/off flags ``<bool>``, which reads as if the flag took a value. Click's plain labels.
_VALUE_LABELS = {"int": "INTEGER", "float": "FLOAT", "str": "TEXT", "path": "PATH", "file": "FILE"}


def _plain_value_labels(command) -> None:
    """Give every option of ``command`` (and its subcommands) a Click-style value label.

    Flags get none; options with a value get INTEGER, FLOAT, TEXT, PATH or their choices
    (``a|b|c``). Options that set their own ``metavar`` keep it.
    """
    for subcommand in getattr(command, "commands", {}).values():
        _plain_value_labels(subcommand)
    make_help_option = command.get_help_option

    def help_option_without_label(ctx):  # -h/--help is made per call, outside params
        option = make_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option

    command.get_help_option = help_option_without_label
    for param in command.params:
        kind = getattr(param, "param_type_name", None)
        if kind == "option" and param.metavar is None:
            if getattr(param, "is_flag", False) or getattr(param, "count", False):
                param.metavar = ""
            elif hasattr(param, "display_type"):  # Typer before 0.29: Click's labels are plain
                param.metavar = _plain_label(param.display_type(None))
        elif kind == "argument" and hasattr(param, "display_type_rich"):
            # An argument's metavar would rename it in the usage line; its type column is
            # what reads "<list[Path]>".
            label = _plain_label(param.display_type(None)) + ("..." if param.nargs != 1 else "")
            param.display_type_rich = lambda ctx, label=label: label


def _plain_label(typer_label: str) -> str:
    """``<int range>`` -> INTEGER, ``<list[Path]>`` -> PATH, ``<a|b>`` -> a|b."""
    label = typer_label.strip("<>").removeprefix("list[").removesuffix("]").removesuffix(" range")
    return _VALUE_LABELS.get(label.lower(), label)


def _command():
    """The Click command behind ``app``, with plain value labels in its help."""
    command = typer.main.get_command(app)
    _plain_value_labels(command)
    return command


def _error(message: str) -> None:
    # soft_wrap keeps the message on one line; markup off so paths with [brackets] survive.
    from rich.console import Console

    Console(stderr=True, soft_wrap=True, highlight=False).print(message, markup=False)


#: What makes each command's job smaller, for the out-of-memory hint (its own options only).
SMALLER_JOB = {
    "pretrain": "a smaller --patch, --batch or --width",
    "finetune": "a smaller --patch, --batch or --width",
    "register": "a coarser --spacing",
    "demo": "a machine with more memory",
    "segment": "--batch 1 and no --probabilities",
    "embed": "a smaller --window, or --dense-grid canonical",
    "apply": "fewer inputs per call",
}


def _command_of(args: list[str]) -> str | None:
    """The subcommand named in ``args`` (the first word that is one), or None."""
    return next((a for a in args if a in SMALLER_JOB), None)


def _as_gvsl_error(exc: BaseException, command: str | None = None) -> GvslError | None:
    """Map known foreign exceptions (out of memory, file system errors) to a GvslError;
    ``command`` chooses the out-of-memory hint."""
    if is_out_of_memory(exc):
        smaller = SMALLER_JOB.get(command or "", "a smaller job")
        if "defaultcpuallocator" in str(exc).lower() or isinstance(exc, MemoryError):
            return DeviceError("the CPU ran out of memory (host RAM)", hint=f"use {smaller}, or run where more memory is free")
        return DeviceError("the device ran out of memory", hint=f"use {smaller}, or --device cpu")
    if _one_of_several_processes() and _lost_peer(exc):
        # Under torchrun/srun: another process of the job died (OOM killer, a node lost, its
        # own error) and this one's next collective step failed; not a bug of this process.
        return TrainingError(
            "another process of this distributed job stopped, so this one cannot go on (" + _first_line(exc) + ")",
            hint="see that process's own error line; the run folder keeps its last checkpoint: continue with --resume",
        )
    if isinstance(exc, OSError) and exc.strerror:
        # A file-system problem the engine did not foresee (permissions, full disk, a path
        # that vanished): the user's environment, not a bug in gvsl.
        where = f"{exc.filename}: " if exc.filename else ""
        return InputError(f"{where}{exc.strerror}", hint="check the path, its permissions and the free disk space")
    return None


#: What gloo and NCCL say when the process at the other end of a collective step is gone.
_LOST_PEER_WORDS = ("connection reset by peer", "connection closed by peer", "broken pipe", "nccl communicator was aborted", "socket timeout")


def _lost_peer(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective step failing because another process is gone."""
    # By its words only: NCCL raises DistBackendError for its own refusals too (two ranks
    # on one GPU), which no --resume mends.
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("gloo" in text or "nccl" in text) and any(words in text for words in _LOST_PEER_WORDS)


def _first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s text, without the backends' source locations, at most 160 characters."""
    import re

    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return re.sub(r"\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", line)[:160]


def run(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default: sys.argv[1:]); returns the exit code.

    Typer runs in standalone mode, so help, usage errors and ``--version`` end in
    SystemExit with the right code; errors of the engine propagate here.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("GVSL_DEBUG") == "1"
    if not debug:
        # torch.compile's internals warn about their own deprecated calls on every compile;
        # nothing a gvsl user can act on.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\._inductor")
    try:
        previous_term = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave signals alone
        previous_term = None
    # Click's base exception, whether Typer vendors Click (0.20+) or depends on it.
    ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")

    try:
        try:
            # Not standalone: usage errors come here as exceptions (one line below, instead
            # of Typer's boxed usage text), and --help, --version and typer.Exit(code)
            # return their exit code.
            code = _command().main(args=args, prog_name="gvsl", standalone_mode=False)
        except _Escaped as escaped:
            raise escaped.original from None
        return code if isinstance(code, int) else 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except ClickException as exc:  # an unknown option, a missing argument, a bad value
        context = getattr(exc, "ctx", None)
        command = context.command_path if context is not None else "gvsl"
        message = " ".join(exc.format_message().split())
        _error(f"error: {message} (hint: {command} --help)")
        return exc.exit_code
    except typer.Abort:
        _error("aborted")
        return 1
    except Terminated:
        _error("aborted (SIGTERM)")
        return 128 + signal.SIGTERM  # 143, what a shell reports for a process killed by it
    except KeyboardInterrupt:
        _error("aborted")
        return 130
    except GvslError as exc:
        if debug:
            raise
        if not getattr(exc, "printed_by_rank_0", False):  # one line per job, not per rank
            _error(f"error: {exc}" + (f" (hint: {exc.hint})" if exc.hint else ""))
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - the one place that turns bugs into a message
        if debug:
            raise
        mapped = _as_gvsl_error(exc, _command_of(args))
        if mapped is not None:
            _error(f"error: {mapped} (hint: {mapped.hint})")
            return mapped.exit_code
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        _error(f"internal error: {type(exc).__name__}: {first_line} (rerun with --debug for the traceback and report it)")
        return 1
    finally:
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)


def _one_of_several_processes() -> bool:
    """True under torchrun or srun with more than one process (``launcher.several_processes``)."""
    from gvsl_cli.launcher import several_processes

    return several_processes() is not None


class _ReaderGone:
    """stdout or stderr that outlives its reader.

    When the reader of a pipe goes away (``| head``, ``| less`` quit early, a closed ssh
    session), the next write raises BrokenPipeError, and Click ends the command with exit
    code 1: a training run of hours lost for a log line. From the first such error on, the
    stream's file descriptor points at the null device and writing goes on there; the
    command's real outputs are files (and its exit code still tells how it ended).
    """

    def __init__(self, stream) -> None:
        self._stream = stream

    def _reader_gone(self) -> None:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._reader_gone()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._reader_gone()

    def __getattr__(self, name):  # isatty, fileno, encoding, ... of the real stream
        return getattr(self._stream, name)


def _fill_closed_standard_streams() -> None:
    """Point closed standard descriptors (``>&-``, ``2>&-``, some daemons) at the null device.

    Python then has no sys.stdout/sys.stderr (None), and, worse, the next file gvsl opens
    would get descriptor 1 or 2, so ITK's messages on stderr would land inside an output.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            opened = os.open(os.devnull, os.O_RDWR)  # the lowest free descriptor: this one
            if opened != fd:
                os.dup2(opened, fd)
                os.close(opened)
    if sys.stdout is None:
        sys.stdout = open(os.devnull, "w", encoding="utf-8")
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w", encoding="utf-8")


def main() -> None:
    """Console-script entry point."""
    _fill_closed_standard_streams()
    sys.stdout, sys.stderr = _ReaderGone(sys.stdout), _ReaderGone(sys.stderr)
    code = run()
    if _one_of_several_processes():
        # Everything is written and closed by now. In 2 of ~220 two-process gloo runs,
        # the interpreter's exit then aborted in a C++ destructor ("terminate called without
        # an active exception", after summary.json was complete), and torchrun reported the
        # finished run as failed. Leave without running those destructors.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
