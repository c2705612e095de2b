"""Another process holding a run folder, as a running ``gvsl pretrain``/``finetune`` does.

The holder is a real second process (advisory locks belong to processes) that takes the
run folder's lock the way ``training.exclusive_run_folder`` does, says so on stdout, and
keeps it until its stdin is closed.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent

_HOLDER = r"""
import sys
from pathlib import Path
from gvsl_cli.locking import RemovableLock
RUN_LOCK_FILE = ".gvsl-run.lock"  # training.RUN_LOCK_FILE (spelt out: the tests run before it existed too)
folder = Path(sys.argv[1])
folder.mkdir(parents=True, exist_ok=True)
lock = RemovableLock(folder / RUN_LOCK_FILE)
assert lock.try_acquire()
(folder / RUN_LOCK_FILE).write_text(sys.argv[2] + "\n")  # who holds it, as a run notes it
print("holding", flush=True)
sys.stdin.read()
lock.release()
"""


@contextlib.contextmanager
def held_run_folder(folder: Path, note: str = "gvsl pretrain (pid 4242 on node7)") -> Iterator[subprocess.Popen]:
    """Hold ``folder``'s run lock in another process for the block; released at its end."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder), note], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "holding"
        yield holder
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


def folder_state(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Name -> (size, mtime_ns, first bytes) of everything in ``folder`` (recursively)."""
    return {
        str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns, path.read_bytes()[:64] if path.is_file() else b"")
        for path in sorted(folder.rglob("*"))
    }


def lock_seen_while_training(monkeypatch, module, run_dir: Path) -> list:
    """Filled, when ``module`` (pretraining or finetuning) starts training, with whether
    another process could take ``run_dir``'s lock then and what the lock file says."""
    from gvsl_cli.locking import RemovableLock

    lock_file = run_dir / ".gvsl-run.lock"
    real_run_training, seen = module.run_training, []

    def checking_run_training(*args, **kwargs):
        seen.append(RemovableLock(lock_file).try_acquire())
        seen.append(lock_file.read_text())
        return real_run_training(*args, **kwargs)

    monkeypatch.setattr(module, "run_training", checking_run_training)
    return seen
