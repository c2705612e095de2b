"""How this process was launched, read from the environment (no torch import, so the CLI
may ask at any time).

``torchrun`` sets WORLD_SIZE and RANK in each worker; ``srun`` sets SLURM_NTASKS,
SLURM_PROCID and SLURM_STEP_ID in each task. The batch script of an allocation of several
tasks (and an ``salloc`` shell) also carries SLURM_NTASKS and SLURM_PROCID, but is one
process: only a numbered step (SLURM_STEP_ID) is an srun task.
"""

from __future__ import annotations

import os
from typing import Mapping

#: Slurm numbers its special steps (batch, extern, interactive) just below 2**32.
_SPECIAL_STEPS = 0xFFFFFFF0


def _count(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env.get(name, "1") or 1)
    except ValueError:
        return 1


def is_srun_task(env: Mapping[str, str] | None = None) -> bool:
    """True in a task that ``srun`` started (SLURM_STEP_ID a step number)."""
    env = os.environ if env is None else env
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID", ""))
    return step.isdigit() and int(step) < _SPECIAL_STEPS


def torchrun_world_size(env: Mapping[str, str] | None = None) -> int:
    """WORLD_SIZE of a torchrun (or torchrun-like) launch; 1 for a process on its own."""
    return _count(os.environ if env is None else env, "WORLD_SIZE")


def several_processes(env: Mapping[str, str] | None = None) -> str | None:
    """How this process is one of several ("WORLD_SIZE=4 (torchrun)", "SLURM_NTASKS=2
    (srun)"), or None when it runs alone."""
    env = os.environ if env is None else env
    if torchrun_world_size(env) > 1:
        return f"WORLD_SIZE={torchrun_world_size(env)} (torchrun)"
    if _count(env, "SLURM_NTASKS") > 1 and "SLURM_PROCID" in env and is_srun_task(env):
        return f"SLURM_NTASKS={_count(env, 'SLURM_NTASKS')} (srun)"
    return None
