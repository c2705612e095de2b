"""Running one training on several processes: torchrun, SLURM, or a single device.

``torchrun --nproc_per_node=N`` (one or many nodes) sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT. Under ``srun`` without torchrun, SLURM_PROCID, SLURM_NTASKS
and SLURM_LOCALID are used instead (MASTER_ADDR must then be exported by the job script,
see docs/pretraining.md). Without either, training runs as one plain process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from gvsl_cli.errors import ConfigError
from gvsl_cli.launcher import is_srun_task


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job.

    Attributes:
        rank, world_size, local_rank: as torch.distributed names them.
        device: the device this process trains on.
        enabled: True when a process group is initialised (world_size > 1).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    enabled: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            if self.device.type == "cuda":
                torch.distributed.barrier(device_ids=[self.device.index or 0])
            else:
                torch.distributed.barrier()

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Mean of ``tensor`` over ranks (in place; returned for chaining)."""
        if self.enabled:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
            tensor /= self.world_size
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is True on any rank (a stop request, say)."""
        if not self.enabled:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item() > 0)

    def all_gather_object(self, obj) -> list:
        if not self.enabled:
            return [obj]
        gathered: list = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, obj)
        return gathered

    def broadcast_object(self, obj):
        """``obj`` of rank 0 on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def launch_environment() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) from torchrun's or SLURM's variables; None when alone.

    SLURM's variables count only in tasks that ``srun`` started: the batch script of an
    allocation of several tasks runs gvsl as one process (waiting for peers that never
    come would hang it for the rendezvous timeout, 30 minutes, deaf to signals).

    Raises:
        ConfigError: several processes are announced but MASTER_ADDR, which they need to
            meet, is not set.
    """
    env = os.environ
    if "WORLD_SIZE" in env and "RANK" in env:
        world = int(env["WORLD_SIZE"])
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in env]
        if world > 1 and missing:
            raise ConfigError(
                f"WORLD_SIZE={world} announces several processes but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set",
                hint="launch with torchrun, which sets them, or export MASTER_ADDR and MASTER_PORT",
            )
        return (int(env["RANK"]), world, int(env.get("LOCAL_RANK", 0))) if world > 1 else None
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env and is_srun_task(env):
        if "MASTER_ADDR" not in env:
            raise ConfigError(
                "running as one of several SLURM tasks but MASTER_ADDR is not set",
                hint="export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1) in the job script, or launch with torchrun",
            )
        # A port of this job's own (two jobs on one node must not meet at one port).
        env.setdefault("MASTER_PORT", str(10000 + int(env["SLURM_JOB_ID"]) % 20000 if env.get("SLURM_JOB_ID", "").isdigit() else 29500))
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return None


def setup(device: torch.device) -> DistContext:
    """Join the process group when launched as several processes; otherwise a plain context.

    ``device`` is the device asked for; with CUDA each process takes GPU ``local_rank`` and
    the NCCL backend, on the CPU the gloo backend.
    """
    launch = launch_environment()
    if launch is None:
        return DistContext(device=device)
    rank, world, local_rank = launch
    if device.type == "cuda":
        visible = torch.cuda.device_count()
        # An srun task that sees one GPU has it bound to it by the site (--gpus-per-task,
        # --gpu-bind): it is this task's whatever its local rank. torchrun's workers (it sets
        # LOCAL_WORLD_SIZE) all see the node's GPUs and take GPU local_rank of them.
        bound_to_task = visible == 1 and "LOCAL_WORLD_SIZE" not in os.environ
        if local_rank >= visible and not bound_to_task:
            raise ConfigError(f"process {rank} has local rank {local_rank} but this node has {visible} GPU(s)", hint="start at most one process per GPU")
        device = torch.device("cuda", 0 if bound_to_task else local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not torch.distributed.is_initialized():
        init_kwargs = {"backend": backend, "rank": rank, "world_size": world}
        if device.type == "cuda":
            init_kwargs["device_id"] = device
        torch.distributed.init_process_group(**init_kwargs)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device, enabled=True)


def teardown(context: DistContext) -> None:
    if context.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
