"""gvsl pretrain end to end on real MR volumes (CPU, width 8, 32³ patches, few iterations)."""

from __future__ import annotations

import errno
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
    assert a.keys() == b.keys() and len(a) > 0
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
    # A re-queued job of the finished run: nothing to do, exit 0, one line, nothing rewritten.
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    assert run(["pretrain", "-o", str(run_dir), "--cache-dir", str(cache_dir), "--resume", "--iters", "1", "--quiet"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nothing to do") and "already complete" in err[0]
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before
    # Below the iteration reached: an error, not a silent success.
    assert run(["pretrain", "-o", str(run_dir), "--cache-dir", str(cache_dir), "--resume", "--iters", "0", "--quiet"]) == 2
    assert "--iters must be >= 1" in capsys.readouterr().err


def test_second_run_reads_no_volume(volumes, cache_dir, tmp_path, monkeypatch):
    # A first run fills the cache (if the module's earlier tests have not); decoding a
    # volume in the second would be a miss.
    first = PretrainConfig(inputs=(str(volumes),), run_dir=str(tmp_path / "first"), iters=1, width=8, patch=32, spacing=4.0, device="cpu", workers=0, cache_dir=str(cache_dir))
    assert pretrain(first).iteration == 1

    def fail(source, config, **kw):
        raise AssertionError(f"read {source} although it is cached")

    monkeypatch.setattr(data, "read_and_prepare", fail)

    class Notes:
        lines: list[str] = []

        def start(self, first, total): pass

        def update(self, iteration, row): pass

        def note(self, text): self.lines.append(text)

    notes = Notes()
    assert pretrain(PretrainConfig(inputs=(str(volumes),), run_dir=str(tmp_path / "run"), iters=1, width=8, patch=32, spacing=4.0, device="cpu", workers=0, cache_dir=str(cache_dir)), reporter=notes).iteration == 1
    assert f"2 volumes: 0 prepared now, 2 from the cache ({cache_dir})" in notes.lines, notes.lines


def test_the_final_model_is_written_before_the_checkpoint_that_marks_the_run_complete(volumes, cache_dir, tmp_path, monkeypatch):
    from gvsl_cli import pretraining

    written = []
    real_save = pretraining.save_checkpoint

    def save(path, *args, **kwargs):
        written.append(Path(path).name)
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(pretraining, "save_checkpoint", save)
    assert run(_args(volumes, tmp_path / "run", cache_dir, "--iters", "2", "--save-every", "1")) == 0
    assert written == ["last.pt", "model.pt", "last.pt"]


def test_a_complete_run_without_its_model_gets_it_back_on_resume(volumes, cache_dir, tmp_path, capsys):
    from gvsl_cli.checkpoint import state_checksum

    run_dir = tmp_path / "run"
    assert run(_args(volumes, run_dir, cache_dir, "--iters", "2")) == 0
    last = load_weights(run_dir / "last.pt")
    (run_dir / "model.pt").unlink()  # killed between last.pt and model.pt (the earlier write order)
    capsys.readouterr()
    assert run(["pretrain", "-o", str(run_dir), "--cache-dir", str(cache_dir), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "nothing to do" in err and f"{run_dir / 'model.pt'} was missing" in err
    model = load_weights(run_dir / "model.pt")
    assert model.extra["iteration"] == 2 and model.extra["patch"] == last.extra["patch"]
    assert state_checksum(model.state_dict) == state_checksum(last.state_dict)


def test_a_plain_resume_keeps_the_runs_schedule(volumes, cache_dir, tmp_path):
    # A requeue script that only adds --resume must keep --time-limit (its guard before the
    # scheduler's wall time) and the checkpoint interval.
    run_dir = tmp_path / "run"
    assert run(_args(volumes, run_dir, cache_dir, "--iters", "2", "--save-every", "1", "--log-every", "1", "--time-limit", "2h")) == 0
    assert load_weights(run_dir / "last.pt").extra["schedule"] == {"save_every": 1, "log_every": 1, "time_limit_s": 7200.0}
    assert run(["pretrain", "-o", str(run_dir), "--cache-dir", str(cache_dir), "--resume", "--iters", "3", "-q"]) == 0
    assert load_weights(run_dir / "last.pt").extra["schedule"] == {"save_every": 1, "log_every": 1, "time_limit_s": 7200.0}
    # Given again, they change.
    assert run(["pretrain", "-o", str(run_dir), "--cache-dir", str(cache_dir), "--resume", "--iters", "4", "--save-every", "500", "-q"]) == 0
    assert load_weights(run_dir / "last.pt").extra["schedule"] == {"save_every": 500, "log_every": 1, "time_limit_s": 7200.0}


def test_init_from_a_segmentation_model_is_refused_in_one_line(volumes, cache_dir, tmp_path, capsys):
    from gvsl_cli.checkpoint import save_checkpoint
    from gvsl_cli.config import ModelConfig, PreprocessConfig
    from gvsl_cli.model import SegmentationNet

    meta = {"label_names": ["background", "a"], "label_values": [0, 1], "labels": {"background": 0, "a": 1}, "patch": [32, 32, 32]}
    model = save_checkpoint(tmp_path / "best.pt", SegmentationNet(ModelConfig(width=8), 2), PreprocessConfig(spacing=4.0), affine_trained=False, extra={"segmentation": meta})
    assert run(_args(volumes, tmp_path / "run", cache_dir, "--iters", "1", "--init", str(model))) == 3
    err = capsys.readouterr().err.strip()
    assert "is a gvsl finetune segmentation model, not GVSL pre-trained weights" in err and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_init_from_official_weights_draws_the_untrained_affine_head_afresh(volumes, cache_dir, tmp_path, capsys):
    # The official code never trained f_conv / fc_*: their random defaults read as big
    # shifts and rotations. The rest of the file (U-Net, deformable and restoration heads)
    # is kept.
    from test_model import official_shapes

    generator = torch.Generator().manual_seed(0)
    state = {name: 0.05 * torch.randn(shape, generator=generator) for name, shape in official_shapes().items()}
    state["fc_trans.bias"] = torch.tensor([0.4, -0.3, 0.5])  # a shift of a fifth of the patch
    official = tmp_path / "GVSL_epoch_1000.pth"
    torch.save(state, official)
    run_dir = tmp_path / "run"
    assert run(["pretrain", str(volumes), "-o", str(run_dir), "--cache-dir", str(cache_dir), "--patch", "32", "--spacing", "4", "--device", "cpu",
                "--workers", "0", "--iters", "1", "--init", str(official)]) == 0
    assert "its affine head was never trained (official GVSL code), so it starts afresh near the identity" in capsys.readouterr().err
    trained = load_weights(run_dir / "last.pt").state_dict
    assert trained["fc_trans.bias"].abs().max() <= 2e-4  # zero, then one Adam step of lr 1e-4
    assert (trained["f_conv.double_conv.0.weight"] - state["f_conv.double_conv.0.weight"]).abs().max() > 0.01
    for kept in ("unet.inc.double_conv.0.weight", "sp_conv.double_conv.0.weight", "res_conv.0.weight"):
        assert (trained[kept] - state[kept]).abs().max() <= 2e-4, kept


def test_cpu_bf16_with_a_patch_that_makes_a_level_2_voxels_deep_is_refused(volumes, cache_dir, tmp_path, capsys):
    # PyTorch's CPU bf16 Conv3d weight gradient is wrong at depth 2 (the 2³ bottleneck of a
    # 32³ patch): Adam's state became inf and the affine head stopped learning, silently.
    assert run(_args(volumes, tmp_path / "run", cache_dir, "--iters", "1", "--precision", "bf16")) == 2
    err = capsys.readouterr().err.strip()
    assert "bf16 on the CPU with a patch 32 voxels deep" in err and "--precision fp32" in err and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_a_cache_file_damaged_into_nan_is_named_when_the_loss_becomes_nan(volumes, tmp_path, capsys):
    import numpy as np

    cache = tmp_path / "cache"
    assert run(_args(volumes, tmp_path / "fill", cache, "--iters", "1")) == 0
    damaged = sorted(cache.rglob("*.npy"))[0]
    voxels = np.load(damaged, mmap_mode="r+")  # header and size intact, as a disk error leaves them
    voxels[:] = np.nan
    voxels.flush()
    del voxels
    assert run(_args(volumes, tmp_path / "run", cache, "--iters", "2", "--log-every", "1")) == 6
    err = capsys.readouterr().err.strip()
    assert f"{damaged} (the cached volume of " in err and "holds NaN or infinite values: the cache file is damaged" in err
    assert "delete that file" in err and "lower --lr" not in err


def _cache_made_read_only(monkeypatch, cache_root):
    """Act as if ``cache_root`` were on a read-only mount (the tests run as root, for whom
    permission bits do not stop a write): ``os.access`` says no, and every atomic write
    into it fails as the kernel would."""
    cache_root = Path(cache_root).resolve()
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if Path(path).resolve() == cache_root and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    real_atomic_path = data.atomic_path

    def atomic_path(path, *args, **kwargs):
        if cache_root in Path(path).resolve().parents:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_atomic_path(path, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(data, "atomic_path", atomic_path)


def test_read_only_cache_is_used_when_it_holds_every_volume(volumes, cache_dir, tmp_path, monkeypatch, capsys):
    assert run(_args(volumes, tmp_path / "fill", cache_dir, "--iters", "1")) == 0  # fills the cache
    _cache_made_read_only(monkeypatch, cache_dir)
    capsys.readouterr()
    loud = [arg for arg in _args(volumes, tmp_path / "run", cache_dir, "--iters", "1") if arg != "--quiet"]
    assert run(loud) == 0
    err = capsys.readouterr().err
    assert f"the cache folder {cache_dir} is read-only" in err
    assert (tmp_path / "run" / "last.pt").is_file()


def test_read_only_cache_missing_a_volume_stops_with_one_line(volumes, cache_dir, tmp_path, monkeypatch, capsys):
    import SimpleITK as sitk

    assert run(_args(volumes, tmp_path / "fill", cache_dir, "--iters", "1")) == 0
    image = sitk.ReadImage(str(volumes / "colin27_t1_2mm.nii.gz"))
    new = tmp_path / "new"
    new.mkdir()
    sitk.WriteImage(sitk.Flip(image, [True, False, False]), str(new / "flipped.nii.gz"))  # content not in the cache
    _cache_made_read_only(monkeypatch, cache_dir)
    code = run(_args(volumes, tmp_path / "run", cache_dir, str(new), "--iters", "1"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert err == [f"error: cannot write the preprocessed-volume cache in {cache_dir}: Read-only file system (hint: give a writable folder with --cache-dir)"]
    assert not (tmp_path / "run").exists()


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
    assert not (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "run" / "run.json").exists()
    assert not (tmp_path / "run").exists()  # the folder this run created is removed again


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail the test if a volume is decoded: the checks must come before any preprocessing."""
    def fail(source, config, **kw):
        raise AssertionError(f"read {source} before the options were checked")

    monkeypatch.setattr(data, "read_and_prepare", fail)


@pytest.mark.parametrize("extra, message", [
    (["--save-every", "0"], "--save-every must be >= 1, got 0"),
    (["--log-every", "0"], "--log-every must be >= 1, got 0"),
    (["--iters", "-1"], "--iters must be >= 1, got -1"),
    (["--iters", "0"], "--iters must be >= 1, got 0"),
    (["--seed", "-1"], "--seed must be in 0..9223372036854775807 (2**63 - 1), got -1"),
    (["--seed", "99999999999999999999999"], "--seed must be in 0..9223372036854775807 (2**63 - 1), got 99999999999999999999999"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--spacing", "inf"], "spacing must be a finite number > 0 mm, got inf"),
])
def test_bad_options_fail_before_any_work(volumes, tmp_path, capsys, no_decoding, extra, message):
    run_dir = tmp_path / "run"
    assert run(_args(volumes, run_dir, tmp_path / "cache", *extra)) == 2
    assert message in _one_line_error(capsys)
    assert not run_dir.exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_unusable_run_folder_is_named_before_any_work(volumes, tmp_path, capsys, no_decoding):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for output, said in ((a_file, "is a file, not a folder"), ("/proc/gvsl-run", "cannot be written"), (a_file / "run", "cannot be written")):
        assert run(_args(volumes, output, tmp_path / "cache", "--iters", "1")) == 2
        line = _one_line_error(capsys)
        assert f"{output}: run folder" in line and said in line and "internal error" not in line
    assert a_file.read_text() == "x"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_unusable_cache_folder_is_named_not_blamed_on_the_volumes(volumes, tmp_path, capsys, no_decoding):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for cache, said in (("/proc/gvsl-cache", "cannot be written"), (a_file, "is a file, not a folder")):
        assert run(_args(volumes, tmp_path / "run", cache, "--iters", "1")) == 2
        line = _one_line_error(capsys)
        assert f"{cache}: cache folder" in line and said in line and "skipped" not in line
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_full_cache_disk_stops_the_run_instead_of_skipping_every_volume(volumes, tmp_path, capsys, monkeypatch, workers):
    import errno

    import numpy as np

    real_save = np.save
    saved = []

    def save_then_fill_the_disk(handle, array, *args, **kwargs):
        if saved:  # the second entry finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device", str(handle.name))
        saved.append(1)
        return real_save(handle, array, *args, **kwargs)

    monkeypatch.setattr(np, "save", save_then_fill_the_disk)
    cache = tmp_path / "cache"
    args = _args(volumes, tmp_path / "run", cache, "--iters", "1")
    args[args.index("--workers") + 1] = workers
    assert run(args) == 2
    line = _one_line_error(capsys)
    assert line == f"error: cannot write the preprocessed-volume cache in {cache}: No space left on device (hint: free disk space there, or give another folder with --cache-dir)"
    assert not (tmp_path / "run").exists()
    # Nothing half-written: one complete entry (array + metadata), no temporary files.
    entries = sorted(p.name for p in cache.rglob("*") if p.is_file() and p.parent.name != "stat")
    assert len(entries) == 2 and {Path(e).suffix for e in entries} == {".npy", ".json"}, entries


def test_fewer_than_two_different_volumes_leave_no_run_record(volumes, cache_dir, tmp_path, capsys):
    one = volumes / "colin27_t1_2mm.nii.gz"
    copy = tmp_path / "copy.nii.gz"
    shutil.copy(one, copy)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not an image")
    existing = tmp_path / "existing"
    existing.mkdir()
    cases = {"one": [one], "twice": [one, one], "copy": [one, copy], "broken": [one, broken]}
    for name, inputs in cases.items():
        for run_dir in (tmp_path / name, existing):
            code = run(["pretrain", *map(str, inputs), "-o", str(run_dir), "--cache-dir", str(cache_dir), *SMALL, "--iters", "1"])
            err = capsys.readouterr().err.strip().splitlines()
            assert code == 2, (name, err)
            assert err[-1].startswith("error: pre-training pairs two different volumes; only 1 usable volume"), (name, err)
            assert not (run_dir / "run.json").exists() and not (run_dir / "last.pt").exists(), name
    assert not any((tmp_path / name).exists() for name in cases)  # folders it created are removed
    assert existing.is_dir() and list(existing.iterdir()) == []  # a folder given is kept, empty


def test_help_shows_the_defaults(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "250")
    assert run(["pretrain", "--help"]) == 0
    text = capsys.readouterr().out
    lines = {name: next(line for line in text.splitlines() if f" {name} " in line) for name in ("--batch", "--patch", "--spacing", "--modality", "--width", "--lr", "--seed")}
    # Rich markup ate "[default: ...]" in help strings, leaving "per process ." behind.
    assert "(default: 1)" in lines["--batch"] and "(default: 128)" in lines["--patch"] and "(default: 1e-4)" in lines["--lr"]
    assert "(default: 1.0, or --init's)" in lines["--spacing"] and "(default: 0)" in lines["--seed"]
    assert "(default: auto, or --init's)" in lines["--modality"] and "(default: 32, or --init's)" in lines["--width"]
    assert not any(" ." in line for line in lines.values()), lines
    assert "[default: 500]" in next(line for line in text.splitlines() if " --save-every " in line)  # Typer's own


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
    logs = tmp_path / "rank-logs"  # each rank's own stderr, for the failure message
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--log-dir", str(logs), "--redirects", "2",
               "-m", "gvsl_cli", *_args(volumes, run_dir, cache_dir, "--iters", "3", "--save-every", "3", "--log-every", "3")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    rank_errors = "".join(f"\n--- {log.relative_to(logs)}\n{log.read_text(encoding='utf-8', errors='replace')[-1500:]}" for log in sorted(logs.rglob("stderr.log")))
    assert done.returncode == 0, done.stderr[-1500:] + rank_errors
    assert "Warning" not in rank_errors  # e.g. DDP's "Grad strides do not match" on channels_last
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["iteration"] == 3
    checksums = summary["rank_weight_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert [r["iteration"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3]


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_stop_signal_to_torchrun_checkpoints_every_rank_at_one_iteration(volumes, cache_dir, tmp_path, signal_name):
    # What SLURM does before a time limit (or scancel): SIGTERM to the launcher, whose
    # agent forwards it to the workers; Ctrl-C (SIGINT) reaches every worker the same way.
    # Both ranks must stop at the same iteration (or the next collective would hang) and
    # leave a checkpoint that --resume continues. (SIGINT used to abort every rank but 0,
    # which did not know training had started.)
    import signal
    import time

    run_dir = tmp_path / "ddp-term"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gvsl_cli",
               *_args(volumes, run_dir, cache_dir, "--iters", "100000", "--save-every", "100000", "--log-every", "1")]
    log = (tmp_path / "torchrun.log").open("w")
    launcher = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while not (metrics.exists() and len(read_metrics(metrics)) >= 2):
            assert launcher.poll() is None and time.monotonic() < deadline, (tmp_path / "torchrun.log").read_text()[-2000:]
            time.sleep(0.5)
        launcher.send_signal(getattr(signal, signal_name))
        launcher.wait(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
        log.close()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped"] == "stop requested", summary
    stopped_at = summary["iteration"]
    assert 2 <= stopped_at < 100000
    checksums = summary["rank_weight_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    checkpoint = torch.load(run_dir / "last.pt", weights_only=True)
    assert checkpoint["training"]["iteration"] == stopped_at
    assert [r["iteration"] for r in read_metrics(run_dir / "metrics.jsonl")] == list(range(1, stopped_at + 1))


def test_compiled_run_writes_plain_weights_and_resumes_uncompiled(volumes, cache_dir, tmp_path):
    # torch.compile wraps the model (its state_dict keys gain "_orig_mod."); the files must
    # keep the official keys so they load anywhere, and a run may resume without --compile.
    run_dir = tmp_path / "compiled"
    assert run(_args(volumes, run_dir, cache_dir, "--iters", "2", "--save-every", "2", "--log-every", "1", "--compile")) == 0
    assert json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))["compiled"] is True
    trained = load_weights(run_dir / "model.pt")
    assert not any("_orig_mod" in key for key in trained.state_dict)
    trained.build_model()  # strict load into a plain model
    assert run(_args(volumes, run_dir, cache_dir, "--iters", "3", "--log-every", "1", "--resume")) == 0
    assert [r["iteration"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3]


def test_compile_is_chosen_for_long_cuda_runs_only(monkeypatch):
    from gvsl_cli.training import COMPILE_MIN_ITERATIONS, compile_decision

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.setattr(sys, "platform", "linux")
    assert compile_decision(None, cuda, COMPILE_MIN_ITERATIONS) is True
    assert compile_decision(None, cuda, COMPILE_MIN_ITERATIONS - 1) is False  # a short run: the compile would not pay back
    assert compile_decision(None, cpu, 10**6) is False
    assert compile_decision(False, cuda, 10**6) is False and compile_decision(True, cpu, 1) is True
    monkeypatch.setattr(sys, "platform", "win32")
    assert compile_decision(None, cuda, 10**6) is False


def test_default_compile_is_kept_off_by_no_compile_and_falls_back_when_it_fails(volumes, cache_dir, tmp_path, monkeypatch, capsys, request):
    from gvsl_cli import training

    monkeypatch.setattr(training, "_compile_by_default", lambda device, iterations: True)  # as on a GPU
    run_dir = tmp_path / "no-compile"
    assert run(_args(volumes, run_dir, cache_dir, "--iters", "1", "--no-compile")) == 0
    assert json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))["compiled"] is False

    request.getfixturevalue("broken_compiler")  # from here on, as on a machine without a working inductor
    run_dir = tmp_path / "fallback"
    assert run(_args(volumes, run_dir, cache_dir, "--iters", "2", "--log-every", "1")) == 0
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    assert summary["compiled"] is False and summary["iteration"] == 2
    # A warning that --quiet does not hide.
    assert "warning: torch.compile failed on this machine (RuntimeError: no C compiler found); training without it" in capsys.readouterr().err
    # Asked for explicitly, the failure is an error, not a silent fallback.
    capsys.readouterr()
    assert run(_args(volumes, tmp_path / "explicit", cache_dir, "--iters", "1", "--compile")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: --compile: torch.compile failed on this machine (RuntimeError: no C compiler found) (hint: run without --compile)"


@pytest.mark.parametrize("saved_fused, now_fused", [(False, True), (True, False)])
def test_resumed_optimizer_keeps_this_devices_adam_implementation(saved_fused, now_fused):
    # CUDA runs use fused Adam, CPU runs do not; a checkpoint from either must resume on
    # the other with the resuming device's implementation (load_state_dict would restore
    # the saved one, and GradScaler's fp16 path then fails against non-fused Adam).
    from gvsl_cli.training import restore_training_state, training_state

    cpu = torch.device("cpu")
    saved_param = torch.nn.Parameter(torch.arange(4.0))
    saved_optimizer = torch.optim.Adam([saved_param], lr=1e-3, fused=saved_fused)
    saved_param.grad = torch.ones(4)
    saved_optimizer.step()
    state = training_state(saved_optimizer, torch.amp.GradScaler("cpu", enabled=False), 7, cpu)

    param = torch.nn.Parameter(saved_param.detach().clone())
    optimizer = torch.optim.Adam([param], lr=1e-3, fused=now_fused)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    assert restore_training_state(state, optimizer, scaler, cpu) == 7
    assert bool(optimizer.param_groups[0]["fused"]) is now_fused
    assert torch.equal(optimizer.state[param]["exp_avg"], saved_optimizer.state[saved_param]["exp_avg"])
    scaler.scale(param.sum()).backward()
    scaler.step(optimizer)  # the fused path takes the scaler's grad_scale/found_inf
    scaler.update()
    assert optimizer.state[param]["step"].item() == 2


def test_default_compile_warms_up_then_trains_compiled(volumes, cache_dir, tmp_path, monkeypatch):
    from gvsl_cli import training

    monkeypatch.setattr(training, "_compile_by_default", lambda device, iterations: True)  # as on a GPU
    # The warm-up must compile the graphs the training step uses (same strides too):
    # a second compile would double the minute of compiling.
    run_dir = tmp_path / "default-compiled"
    with torch._dynamo.config.patch(error_on_recompile=True):  # monkeypatch's undo deletes a torch config entry
        assert run(_args(volumes, run_dir, cache_dir, "--iters", "2", "--log-every", "1")) == 0
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    assert summary["compiled"] is True and summary["iteration"] == 2
    # The warm-up step left the weights alone: iteration 1's loss is that of the initial model.
    plain_dir = tmp_path / "plain-reference"
    assert run(_args(volumes, plain_dir, cache_dir, "--iters", "1", "--no-compile")) == 0
    first = read_metrics(run_dir / "metrics.jsonl")[0]["loss"]
    reference = read_metrics(plain_dir / "metrics.jsonl")[0]["loss"]
    assert abs(first - reference) < 1e-4 * abs(reference)


def test_resume_alone_continues_to_the_runs_own_target_from_another_folder(volumes, cache_dir, tmp_path, monkeypatch, capsys):
    # The stopped run's summary says "continue with --resume": that alone must finish the run
    # it started (not train to the default 10000), also when a requeued job starts elsewhere.
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    relative = os.path.relpath(volumes, tmp_path)
    # Stopped is not finished: exit code 8 and one line that --quiet does not hide, so a
    # shell chain (pretrain && finetune) does not go on with a half-trained model.
    assert run(["pretrain", relative, "-o", str(run_dir), "--cache-dir", str(cache_dir), *SMALL, "--iters", "4", "--log-every", "2", "--time-limit", "0.01"]) == 8
    assert capsys.readouterr().err.strip().splitlines()[-1] == "stopped at iteration 2 (time limit): the run is not finished; continue it with gvsl pretrain --resume"
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    assert summary["stopped"] == "time limit" and summary["iteration"] == 2
    assert json.loads((run_dir / "run.json").read_text(encoding="utf-8"))["inputs"] == [str(volumes)]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert run(["pretrain", "-o", str(run_dir), "--cache-dir", str(cache_dir), "--device", "cpu", "--workers", "1", "--quiet", "--resume"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    assert summary["stopped"] is None and summary["iteration"] == 4


def test_new_run_failing_before_its_first_checkpoint_leaves_no_folder(volumes, cache_dir, tmp_path, monkeypatch, capsys):
    def failing_step(self, model, batch):
        raise RuntimeError("the step failed")

    monkeypatch.setattr(PretrainTask, "losses", failing_step)
    run_dir = tmp_path / "new-run"
    assert run(_args(volumes, run_dir, cache_dir, "--iters", "3")) == 1
    assert "the step failed" in capsys.readouterr().err
    assert not run_dir.exists()  # run.json and the (empty) metrics.jsonl removed with it


def _reporter_output(width: int | None, terminal: bool, updates: list[int], interval: float = 60.0) -> str:
    import io

    from rich.console import Console

    from gvsl_cli.commands.pretrain import RichReporter

    out = io.StringIO()
    console = Console(file=out, width=width or 80, force_terminal=terminal, color_system=None, highlight=False, soft_wrap=not terminal)
    reporter = RichReporter(quiet=False, console=console, log_interval_s=interval)
    reporter.start(0, 30)
    for iteration in updates:
        reporter.update(iteration, {"loss": 0.9096, "ncc": 0.8285, "mse": 0.0811, "smooth": 2.09e-5, "it_per_s": 1.5})
    reporter.stop()
    return out.getvalue()


def test_progress_bar_keeps_iteration_and_eta_in_80_columns():
    import re

    frames = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", _reporter_output(80, True, [10, 12])).replace("\r", "\n")
    last = [line for line in frames.splitlines() if line.startswith("pretrain")][-1]
    assert "12/30" in last and "1.50 it/s" in last and "eta 0:00:12" in last and "loss 0.9" in last, last
    assert len(last.rstrip()) <= 80


def test_progress_without_a_terminal_is_a_plain_line_now_and_then():
    lines = _reporter_output(None, False, [2, 4, 6, 30], interval=3600).strip().splitlines()
    # The first log point and the last iteration; the ones between fall within the interval.
    assert [line.split()[1] for line in lines] == ["2/30", "30/30"], lines
    assert "eta 0:00:18" in lines[0] and "loss 0.9096" in lines[0] and "\x1b" not in "".join(lines)


def test_ctrl_c_stops_training_with_a_checkpoint(volumes, cache_dir, tmp_path):
    import signal
    import time

    run_dir = tmp_path / "interrupted"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "gvsl_cli", *_args(volumes, run_dir, cache_dir, "--iters", "100000", "--save-every", "100000", "--log-every", "1")]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and len(read_metrics(metrics)) >= 2):
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()[-2000:]
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 8, err
    assert "stopping after this iteration with a checkpoint" in err
    assert "the run is not finished; continue it with gvsl pretrain --resume" in err
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    assert summary["stopped"] == "stop requested"
    assert torch.load(run_dir / "last.pt", weights_only=True)["training"]["iteration"] == summary["iteration"]


def test_mixed_modality_decisions_name_the_smaller_group(volumes, cache_dir, tmp_path, capsys):
    import SimpleITK as sitk

    mixed = tmp_path / "mixed"
    shutil.copytree(volumes, mixed)
    image = sitk.ReadImage(str(volumes / "colin27_t1_2mm.nii.gz"), sitk.sitkFloat32)
    sitk.WriteImage(image * 2.0 - 1000.0, str(mixed / "as_ct.nii.gz"))  # Hounsfield-like: air at -1000
    assert run(["pretrain", str(mixed), "-o", str(tmp_path / "run"), "--cache-dir", str(cache_dir), *SMALL[:-1], "--iters", "1"]) == 0
    note = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("--modality auto"))
    assert note.startswith("--modality auto: 1 CT, 2 MR; CT: as_ct.nii.gz ("), note


def test_a_closed_output_pipe_does_not_end_the_training(volumes, cache_dir, tmp_path):
    # gvsl pretrain ... 2>&1 | head -1: once head has quit, every progress line would raise
    # BrokenPipeError; the run must go on (its progress is in metrics.jsonl) and finish.
    run_dir = tmp_path / "piped"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = [a for a in _args(volumes, run_dir, cache_dir, "--iters", "6", "--log-every", "1") if a != "--quiet"]
    process = subprocess.Popen([sys.executable, "-m", "gvsl_cli", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert process.stdout.readline()  # the first line, then the reader goes away
        process.stdout.close()
        assert process.wait(timeout=240) == 0
    finally:
        if process.poll() is None:
            process.kill()
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    assert summary["iteration"] == 6 and summary["stopped"] is None


def test_a_run_folder_in_use_is_refused_untouched_and_free_again_after(volumes, cache_dir, tmp_path, capsys, monkeypatch):
    from run_folder_holder import folder_state, held_run_folder, lock_seen_while_training

    import socket

    from gvsl_cli import pretraining
    from gvsl_cli.training import RUN_LOCK_FILE

    run_dir = tmp_path / "run"
    assert run(_args(volumes, run_dir, cache_dir, "--iters", "2", "--save-every", "2")) == 0
    assert not (run_dir / RUN_LOCK_FILE).exists()  # a finished run leaves no lock file
    before = folder_state(run_dir)
    capsys.readouterr()
    with held_run_folder(run_dir, "gvsl pretrain (pid 4242 on node7)"):
        held = folder_state(run_dir)
        # A new run (as a copied -o), a --resume (as a SLURM requeue) and a finetune alike.
        for args in (_args(volumes, run_dir, cache_dir, "--iters", "2", "--width", "16"),
                     ["pretrain", "-o", str(run_dir), "--cache-dir", str(cache_dir), "--resume", "--iters", "4", "--quiet"],
                     ["finetune", str(volumes), "--mode", "scratch", "-o", str(run_dir), "--quiet"]):
            code = run(args)
            err = capsys.readouterr().err.strip().splitlines()
            assert code == 2 and err == [f"error: {run_dir}: another gvsl pretrain (pid 4242 on node7) is running in this run folder (hint: wait for it to finish, or choose another -o)"], err
            assert folder_state(run_dir) == held  # nothing read into a mix, nothing written
        # A folder a starting run has just created is refused the same way.
        with held_run_folder(tmp_path / "starting"):
            assert run(_args(volumes, tmp_path / "starting", cache_dir, "--iters", "1")) == 2
            assert [p.name for p in (tmp_path / "starting").iterdir()] == [RUN_LOCK_FILE]
    assert folder_state(run_dir) == before and list((tmp_path / "starting").iterdir()) == []

    # Free again: the resumed run holds the folder while it trains, and lets it go.
    seen = lock_seen_while_training(monkeypatch, pretraining, run_dir)
    assert run(["pretrain", "-o", str(run_dir), "--cache-dir", str(cache_dir), "--resume", "--iters", "4", "--quiet"]) == 0
    assert seen == [False, f"gvsl pretrain (pid {os.getpid()} on {socket.gethostname()})\n"]
    assert not (run_dir / RUN_LOCK_FILE).exists()
    assert [r["iteration"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3, 4]


def test_torchrun_ranks_all_stop_when_the_run_folder_is_in_use(volumes, cache_dir, tmp_path):
    # Only rank 0 takes the lock; the other rank must learn of the refusal, not wait for it.
    from run_folder_holder import folder_state, held_run_folder

    run_dir = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    logs = tmp_path / "rank-logs"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--log-dir", str(logs), "--redirects", "2",
               "-m", "gvsl_cli", *_args(volumes, run_dir, cache_dir, "--iters", "3")]
    with held_run_folder(run_dir):
        held = folder_state(run_dir)
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
        assert folder_state(run_dir) == held
    assert done.returncode != 0
    rank_errors = sorted(log.read_text(encoding="utf-8", errors="replace") for log in logs.rglob("stderr.log"))
    assert len(rank_errors) == 2, done.stderr[-1500:]
    # The error is printed once for the job (by rank 0), not once per rank.
    refusal = f"error: {run_dir}: another gvsl pretrain (pid 4242 on node7) is running in this run folder"
    assert sum(refusal in text for text in rank_errors) == 1, rank_errors
    assert list(run_dir.iterdir()) == []


def test_mr_volumes_mapped_by_ct_init_weights_are_warned_about_also_from_the_cache(volumes, tmp_path, capsys):
    """--init weights with a CT contract map MR volumes with the CT window unless --modality
    is given: one warning (also under --quiet, also when every volume comes from the
    cache), none with --modality mr."""
    from gvsl_cli.checkpoint import save_checkpoint
    from gvsl_cli.config import ModelConfig, PreprocessConfig
    from gvsl_cli.model import GVSL

    ct_weights = tmp_path / "ct8.pt"
    torch.manual_seed(0)
    save_checkpoint(ct_weights, GVSL(ModelConfig(width=8)), PreprocessConfig(spacing=4.0, modality="ct"))
    cache = tmp_path / "cache"
    for attempt in ("prepared", "cached"):
        assert run(_args(volumes, tmp_path / f"run_{attempt}", cache, "--iters", "1", "--init", str(ct_weights))) == 0
        warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
        assert warnings == [
            f"warning: 2 of 2 volumes look like MR (no Hounsfield-unit minimum) but are mapped as CT (the contract of --init {ct_weights}): "
            "colin27_t1_2mm.nii.gz, icbm152_t1_2mm.nii.gz; give --modality mr (or auto) if they are MR"
        ], attempt
    assert run(_args(volumes, tmp_path / "run_mr", cache, "--iters", "1", "--init", str(ct_weights), "--modality", "mr")) == 0
    assert "warning:" not in capsys.readouterr().err


def test_a_run_started_from_init_weights_resumes_with_their_contract(volumes, tmp_path, capsys):
    """--init without --spacing/--modality trains with the weights' contract (4 mm, CT here);
    --resume goes on with it, not with the command line's defaults (1 mm, auto), and the
    misfit warning then names the run's contract and a way that works."""
    from gvsl_cli.checkpoint import load_weights, save_checkpoint
    from gvsl_cli.config import ModelConfig, PreprocessConfig
    from gvsl_cli.model import GVSL

    ct_weights = tmp_path / "ct8.pt"
    torch.manual_seed(0)
    save_checkpoint(ct_weights, GVSL(ModelConfig(width=8)), PreprocessConfig(spacing=4.0, modality="ct"))
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    common = ["--cache-dir", str(cache), "--device", "cpu", "--workers", "1", "--quiet"]
    assert run(["pretrain", str(volumes), "-o", str(run_dir), "--init", str(ct_weights), "--patch", "32", "--iters", "1", *common]) == 0
    capsys.readouterr()
    assert run(["pretrain", "-o", str(run_dir), "--resume", "--iters", "2", *common]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings and f"(the contract of --init {ct_weights}, kept by the run)" in warnings[0]
    assert "start a new run in another folder with --modality mr" in warnings[0]
    final = load_weights(run_dir / "model.pt")
    assert (final.preprocess.spacing, final.preprocess.modality) == (4.0, "ct")

    # A run recorded before 2026-11-26 kept the command line's defaults in its settings:
    # its checkpoint's contract wins on resume.
    from gvsl_cli.pretraining import CONTRACT_IN_EFFECT, _contract_kept_by_older_init_runs

    older = {"spacing": 1.0, "modality": "auto", "init": str(ct_weights), "width": 32}
    assert _contract_kept_by_older_init_runs(older, final.preprocess) == {**older, "spacing": 4.0, "modality": "ct"}
    assert _contract_kept_by_older_init_runs({**older, CONTRACT_IN_EFFECT: True}, final.preprocess)["modality"] == "auto"
