"""gvsl pretrain end to end on real MR volumes (CPU, width 8, 32³ patches, few iterations)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gvsl_cli import data
from gvsl_cli.checkpoint import load_weights
from gvsl_cli.cli import run
from gvsl_cli.commands.pretrain import parse_duration
from gvsl_cli.pretraining import PretrainConfig, PretrainTask, pretrain
from gvsl_cli.training import read_metrics

SMALL = ["--width", "8", "--patch", "32", "--spacing", "4", "--device", "cpu", "--workers", "1", "--quiet"]
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("volumes")
    for name in ("colin27_t1_2mm.nii.gz", "icbm152_t1_2mm.nii.gz"):
        shutil.copy(REPO / "gvsl_cli" / "examples" / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _args(volumes, run_dir, cache_dir, *extra):
    return ["pretrain", str(volumes), "-o", str(run_dir), "--cache-dir", str(cache_dir), *SMALL, *extra]


def _losses(run_dir):
    return [(r["iteration"], r["loss"], r["ncc"], r["mse"], r["smooth"]) for r in read_metrics(run_dir / "metrics.jsonl")]


def _fixed_batch_loss(model, volumes_dir, cache_dir):
    """Total GVSL loss of ``model`` on one fixed augmented batch (same for every model)."""
    sources, _ = data.discover([volumes_dir])
    from gvsl_cli.config import PreprocessConfig

    dataset = data.prepare_dataset(sources, PreprocessConfig(spacing=4.0), data.VolumeCache(cache_dir))
    sampler = data.PairSampler(dataset.volumes, (40, 40, 40), seed=123)
    loader = data.PrefetchLoader(sampler, 2, start=1, workers=0)
    task = PretrainTask(loader, (32, 32, 32), seed=123, rank=0, device=torch.device("cpu"))
    model.eval()
    with torch.no_grad():
        return task.losses(model, task.batch(1))["loss"].item()


def test_training_on_real_volumes_reduces_the_loss(volumes, cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    assert run(_args(volumes, run_dir, cache_dir, "--iters", "10", "--save-every", "10", "--log-every", "5", "--seed", "0")) == 0
    trained = load_weights(run_dir / "model.pt")
    assert trained.affine_trained is False  # 10 iterations: the affine head is not trusted yet
    torch.manual_seed(0)  # the run's initial weights come from --seed
    from gvsl_cli.model import GVSL

    initial = GVSL(trained.model_config)
    before = _fixed_batch_loss(initial, volumes, cache_dir)
    after = _fixed_batch_loss(trained.build_model(), volumes, cache_dir)
    assert after < before - 0.05, (before, after)
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == list(range(1, 11))
    assert all(set(r) >= {"loss", "ncc", "mse", "smooth"} for r in rows)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["iteration"] == 10 and summary["volumes"] == 2 and summary["modalities"] == {"mr": 2}
    checkpoint = torch.load(run_dir / "last.pt", weights_only=True)
    assert checkpoint["training"]["iteration"] == 10 and "optimizer" in checkpoint["training"]
    assert checkpoint["preprocess"]["modality"] == "mr" and checkpoint["patch"] == [32, 32, 32]


def test_resumed_run_repeats_the_uninterrupted_loss_curve(volumes, cache_dir, tmp_path):
    whole = tmp_path / "whole"
    assert run(_args(volumes, whole, cache_dir, "--iters", "6", "--save-every", "2", "--log-every", "2")) == 0
    parts = tmp_path / "parts"
    assert run(_args(volumes, parts, cache_dir, "--iters", "4", "--save-every", "2", "--log-every", "2")) == 0
    # What a kill after the checkpoint leaves behind: later metric rows and a cut-off line.
    with open(parts / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({"iteration": 5, "loss": 9.0, "ncc": 9.0, "mse": 0.0, "smooth": 0.0}) + "\n{\"iterat")
    assert run(_args(volumes, parts, cache_dir, "--iters", "6", "--save-every", "2", "--log-every", "2", "--resume")) == 0
    assert _losses(parts) == _losses(whole)
    a = torch.load(whole / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(parts / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_run_folder_guards(volumes, cache_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run(_args(volumes, run_dir, cache_dir, "--iters", "1")) == 0
    capsys.readouterr()
    assert run(_args(volumes, run_dir, cache_dir, "--iters", "2")) == 2
    assert "--resume" in capsys.readouterr().err
    code = run(["pretrain", "-o", str(run_dir), "--cache-dir", str(cache_dir), "--resume", "--width", "16", "--iters", "2", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "--width 16 differs" in err and len(err.strip().splitlines()) == 1


def test_second_run_reads_no_volume(volumes, cache_dir, tmp_path, monkeypatch):
    # The module's earlier runs filled the cache; decoding a volume now would be a miss.
    def fail(source, config):
        raise AssertionError(f"read {source} although it is cached")

    monkeypatch.setattr(data, "read_and_prepare", fail)
    assert pretrain(PretrainConfig(inputs=(str(volumes),), run_dir=str(tmp_path / "run"), iters=1, width=8, patch=32, spacing=4.0, device="cpu", workers=0, cache_dir=str(cache_dir))).iteration == 1


def test_bad_inputs_are_reported_and_skipped(volumes, cache_dir, tmp_path, capsys):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not an image")
    code = run(_args(volumes, tmp_path / "run", cache_dir, str(broken), str(tmp_path / "missing.nrrd"), "--iters", "1"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 0
    assert any(line.startswith(f"skipped {broken}") and "cannot read" in line for line in err)
    assert any("missing.nrrd" in line and "no such file" in line for line in err)


def test_no_usable_volume_is_a_one_line_error(tmp_path, capsys):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not an image")
    code = run(["pretrain", str(broken), "-o", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: no usable volume among 1 input") and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_parse_duration():
    assert parse_duration("90") == 90 and parse_duration("45m") == 2700 and parse_duration("1.5h") == 5400
    assert parse_duration("1:30:00") == 5400 and parse_duration("2-00:00:00") == 172800


def test_time_limit_stops_with_a_checkpoint(volumes, cache_dir, tmp_path):
    summary = pretrain(PretrainConfig(inputs=(str(volumes),), run_dir=str(tmp_path / "run"), iters=50, width=8, patch=32, spacing=4.0, device="cpu", workers=0, cache_dir=str(cache_dir), time_limit_s=0.01, log_every=2))
    assert summary.stopped == "time limit" and summary.iteration == 2
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["training"]["iteration"] == 2


def test_two_processes_under_torchrun_agree_on_the_weights(volumes, cache_dir, tmp_path):
    run_dir = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gvsl_cli",
               *_args(volumes, run_dir, cache_dir, "--iters", "3", "--save-every", "3", "--log-every", "3")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["iteration"] == 3
    checksums = summary["rank_weight_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert [r["iteration"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3]
