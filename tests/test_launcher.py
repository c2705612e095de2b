"""How a process was launched: torchrun, an srun task, or alone (also in a SLURM batch script)."""

from __future__ import annotations

import pytest

from gvsl_cli import distributed
from gvsl_cli.errors import ConfigError
from gvsl_cli.launcher import is_srun_task, several_processes

#: What the batch script of `sbatch --ntasks=4` sees: one process, though SLURM_NTASKS says 4.
BATCH_SCRIPT = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "MASTER_ADDR": "node1"}
#: What task 2 of `srun --ntasks=4` sees.
SRUN_TASK = {**BATCH_SCRIPT, "SLURM_PROCID": "2", "SLURM_LOCALID": "2", "SLURM_STEP_ID": "0"}


def test_only_numbered_steps_are_srun_tasks():
    assert is_srun_task(SRUN_TASK)
    assert not is_srun_task(BATCH_SCRIPT)
    assert not is_srun_task({**BATCH_SCRIPT, "SLURM_STEP_ID": "extern"})
    assert not is_srun_task({**BATCH_SCRIPT, "SLURM_STEP_ID": str(0xFFFFFFFB)})  # Slurm's batch step number
    assert is_srun_task({**BATCH_SCRIPT, "SLURM_STEPID": "3"})  # the older name


def test_several_processes_names_the_launcher():
    assert several_processes({}) is None
    assert several_processes(BATCH_SCRIPT) is None
    assert several_processes(SRUN_TASK) == "SLURM_NTASKS=4 (srun)"
    assert several_processes({"WORLD_SIZE": "2", "RANK": "1"}) == "WORLD_SIZE=2 (torchrun)"


def test_launch_environment(monkeypatch):
    def launched(env):
        for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_ID", "SLURM_STEPID", "SLURM_JOB_ID"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        return distributed.launch_environment()

    # A batch script of an allocation of 4 tasks runs gvsl alone instead of waiting for 3
    # peers for the 30-minute rendezvous timeout.
    assert launched(BATCH_SCRIPT) is None
    assert launched(SRUN_TASK) == (2, 4, 2)
    assert launched({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29400"}) == (1, 2, 1)
    with pytest.raises(ConfigError, match="WORLD_SIZE=2 announces several processes but MASTER_ADDR and MASTER_PORT are not set"):
        launched({"WORLD_SIZE": "2", "RANK": "0"})
    with pytest.raises(ConfigError, match="but MASTER_PORT is not set"):
        launched({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1"})
    # srun tasks without MASTER_PORT meet at a port of their job's own.
    assert launched({**SRUN_TASK, "SLURM_JOB_ID": "123456"}) == (2, 4, 2)
    import os

    assert os.environ["MASTER_PORT"] == str(10000 + 123456 % 20000)
    with pytest.raises(ConfigError, match="MASTER_ADDR is not set"):
        launched({k: v for k, v in SRUN_TASK.items() if k != "MASTER_ADDR"})


def test_gpu_choice_under_torchrun_and_srun(monkeypatch):
    # No GPU here: device_count, set_device and the process group are stood in for.
    import torch

    chosen = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: chosen.append(device))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kwargs: None)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_ID"):
        monkeypatch.delenv(name, raising=False)
    # torchrun with 2 workers on a node with 1 GPU: the second refuses in one line (two
    # ranks on one GPU would fail inside NCCL).
    for name, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29400"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match="process 1 has local rank 1 but this node has 1 GPU"):
        distributed.setup(torch.device("cuda"))
    # An srun task with one GPU bound to it (--gpus-per-task=1) takes that GPU.
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name)
    for name, value in SRUN_TASK.items():
        monkeypatch.setenv(name, value)
    context = distributed.setup(torch.device("cuda"))
    assert context.device == torch.device("cuda", 0) and (context.rank, context.world_size, context.local_rank) == (2, 4, 2)
