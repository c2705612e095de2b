"""The training loop's own behaviour, with a trivial task (no data, no GVSL network)."""

from __future__ import annotations

import time

import torch

from gvsl_cli.distributed import DistContext
from gvsl_cli.training import LoopOptions, check_cpu_bf16_patch, read_metrics, run_training


class _Quadratic:
    """Minimise (w - 3)²: one scalar loss, batches are nothing."""

    loss_names = ("loss",)

    def batch(self, iteration: int):
        return None

    def losses(self, model, batch):
        return {"loss": ((model.weight - 3.0) ** 2).sum()}


def test_checkpoint_time_is_left_out_of_the_iteration_rate(tmp_path):
    model = torch.nn.Linear(1, 1, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saves = []

    def slow_save(iteration: int, final: bool) -> None:
        saves.append(iteration)
        time.sleep(0.5)  # a validation or a large checkpoint

    result = run_training(
        model, optimizer, _Quadratic(), options=LoopOptions(iters=6, save_every=2, log_every=1), context=DistContext(),
        start_iteration=0, scaler=torch.amp.GradScaler("cpu", enabled=False), save=slow_save, metrics_path=tmp_path / "m.jsonl",
    )
    assert saves == [2, 4, 6] and result.iteration == 6
    rates = {row["iteration"]: row["it_per_s"] for row in read_metrics(tmp_path / "m.jsonl")}
    # Each row covers one step of well under 0.5 s: with the save's sleep counted the
    # rate after a save would be below 2 it/s.
    assert min(rates[3], rates[5]) > 20
    # The run's own rate (the summaries') leaves the saves out too.
    assert result.seconds > 1.5 and result.training_seconds < result.seconds - 1.4
    assert abs(model.weight.item() - 3.0) < 3.0


class _Notes:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def note(self, text: str) -> None:
        self.lines.append(text)


def test_a_run_folder_on_a_file_system_without_locks_is_used_after_a_warning(tmp_path, monkeypatch):
    import errno

    from gvsl_cli import locking
    from gvsl_cli.training import RUN_LOCK_FILE, exclusive_run_folder

    def no_locks(fd):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(locking, "try_lock", no_locks)
    notes, run_dir = _Notes(), tmp_path / "nfs" / "run"
    with exclusive_run_folder(run_dir, "pretrain", reporter=notes):
        assert run_dir.is_dir()
        (run_dir / "last.pt").write_text("a checkpoint")
    assert len(notes.lines) == 1 and notes.lines[0].startswith(f"warning: {run_dir}: this file system has no file locks")
    assert [p.name for p in run_dir.iterdir()] == ["last.pt"]
    # A run that leaves its new folder empty (it failed first) removes what it created.
    monkeypatch.undo()
    try:
        with exclusive_run_folder(tmp_path / "new" / "run", "finetune"):
            assert (tmp_path / "new" / "run" / RUN_LOCK_FILE).is_file()
            raise RuntimeError("failed before writing anything")
    except RuntimeError:
        pass
    assert not (tmp_path / "new").exists()


def test_an_output_folder_on_a_file_system_without_locks_keeps_no_lock_file(tmp_path, monkeypatch):
    import errno

    from gvsl_cli import locking

    def no_locks(fd):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(locking, "try_lock", no_locks)
    with locking.exclusive_output_folder(tmp_path, "segment"):
        assert list(tmp_path.iterdir()) == []  # the file guards nothing there: gone at once
    assert list(tmp_path.iterdir()) == []


def test_the_run_folder_holder_removes_temporary_files_of_killed_writes(tmp_path):
    from gvsl_cli.training import exclusive_run_folder

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # What SIGKILL during atomic writes of the run's files leaves (io.atomic_path's names).
    leftovers = [".last.pt.k3j9x2ab.tmp.pt", ".model.pt.q1w2e3r4.tmp.pt", ".metrics.jsonl.a1b2c3d4.tmp.jsonl"]
    for name in leftovers:
        (run_dir / name).write_bytes(b"partial")
    kept = ["last.pt", ".notes.tmp", "my.last.pt.backup"]  # the run's file, and files not its leftovers
    for name in kept:
        (run_dir / name).write_bytes(b"keep")
    with exclusive_run_folder(run_dir, "pretrain"):
        assert sorted(p.name for p in run_dir.iterdir()) == sorted(kept + [".gvsl-run.lock"])
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(kept)


def test_metrics_rewritten_by_two_processes_at_once_stay_whole(tmp_path):
    # Each rewrite goes through its own temporary name: one writer can no longer rename the
    # other's temporary file away ("No such file or directory" on a resume under torchrun).
    import json
    import subprocess
    import sys

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"iteration": i, "loss": 0.5}) + "\n" for i in range(1, 30001)))
    code = "import sys; from pathlib import Path; from gvsl_cli.training import truncate_metrics\n" "for _ in range(8): truncate_metrics(Path(sys.argv[1]), 20000)\n"
    writers = [subprocess.Popen([sys.executable, "-c", code, str(path)], stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [w.communicate()[1] for w in writers]
    assert [w.returncode for w in writers] == [0, 0], errors
    assert [row["iteration"] for row in read_metrics(path)] == list(range(1, 20001))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_cpu_bf16_is_refused_only_for_patches_with_a_level_2_voxels_deep():
    import pytest

    from gvsl_cli.errors import ConfigError

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for depth in (16, 32, 20, 30):  # padded to 16 or 32: a level of depth 2
        with pytest.raises(ConfigError, match=f"patch {depth} voxels deep"):
            check_cpu_bf16_patch(torch.bfloat16, cpu, (depth, 64, 64))
    for depth in (48, 64, 128):  # levels 3 or 4 voxels deep at the bottleneck
        check_cpu_bf16_patch(torch.bfloat16, cpu, (depth, 32, 32))  # H and W of 2 are fine
    with pytest.raises(ConfigError, match="or a finer --spacing"):  # --patch 48 would not help
        check_cpu_bf16_patch(torch.bfloat16, cpu, (32, 48, 48), shrunk=True)
    check_cpu_bf16_patch(None, cpu, (32, 32, 32))  # fp32
    check_cpu_bf16_patch(torch.bfloat16, cuda, (32, 32, 32))  # cuDNN, not oneDNN
