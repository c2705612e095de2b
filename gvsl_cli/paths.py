"""Paths users give, resolved without tripping over symbolic link loops.

``Path.resolve()`` raises on a link that points back at itself (``a -> b``, ``b -> a``):
RuntimeError up to Python 3.12, OSError (ELOOP) from 3.13. Such links turn up in shared
data sets (a broken relinking, a moved DataLad/git-annex tree), so every ``resolve()`` of a
path a user gave (or that gvsl found in a folder a user gave) goes through ``real_path``
or ``try_real_path``, and a missing path is explained by ``absent_reason``.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from gvsl_cli.errors import InputError

LINK_LOOP = "symbolic link loop"
LINK_LOOP_HINT = "the link (or a folder link on its path) points back at itself; fix or remove it"


def absent_reason(path: str | os.PathLike) -> str:
    """Why ``path``, which ``Path.exists()`` calls absent, cannot be opened: a symbolic link
    loop, or "no such file or folder" (also for a link whose target is missing)."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return LINK_LOOP
    except ValueError:  # a NUL byte in the path
        pass
    return "no such file or folder"


def _resolve_failure(exc: BaseException) -> str:
    """The reason in words for an exception of ``Path.resolve()``."""
    if isinstance(exc, RuntimeError) or getattr(exc, "errno", None) == errno.ELOOP:
        return LINK_LOOP
    return getattr(exc, "strerror", None) or type(exc).__name__


def try_real_path(path: str | os.PathLike) -> tuple[Path | None, str | None]:
    """(``path.resolve()``, None), or (None, the reason) when it cannot be resolved
    (``LINK_LOOP`` for a link loop; an OS error's text otherwise)."""
    try:
        return Path(path).resolve(), None
    except (RuntimeError, OSError) as exc:
        return None, _resolve_failure(exc)


def real_path(path: str | os.PathLike) -> Path:
    """``Path(path).resolve()`` (symbolic links resolved, made absolute).

    Raises:
        InputError: ``PATH: symbolic link loop`` (or the OS error's text) when the path
            cannot be resolved.
    """
    resolved, reason = try_real_path(path)
    if resolved is None:
        raise InputError(f"{path}: {reason}", hint=LINK_LOOP_HINT if reason == LINK_LOOP else None)
    return resolved
