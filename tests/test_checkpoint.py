"""Checkpoints: official state_dicts load strictly, gvsl checkpoints round-trip, bad files refused."""

from __future__ import annotations

import pytest
import torch

from gvsl_cli.checkpoint import load_weights, save_checkpoint
from gvsl_cli.config import ModelConfig, PreprocessConfig
from gvsl_cli.errors import CheckpointError
from gvsl_cli.model import GVSL

from test_model import official_shapes


def test_official_state_dict_file_loads_and_affine_is_untrusted(tmp_path, generator):
    state = {name: torch.randn(shape, generator=generator) for name, shape in official_shapes().items()}
    path = tmp_path / "GVSL_epoch_1000.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)  # DataParallel prefixes
    loaded = load_weights(path)
    assert loaded.kind == "official" and loaded.model_config.width == 32
    assert loaded.affine_trained is False
    assert loaded.preprocess.modality == "ct"
    model = loaded.build_model()
    assert torch.equal(model.state_dict()["fc_rot.weight"], state["fc_rot.weight"])


def test_gvsl_checkpoint_round_trip(tmp_path):
    model = GVSL(ModelConfig(width=8))
    path = save_checkpoint(tmp_path / "run" / "model.pt", model, PreprocessConfig(spacing=1.5, modality="mr"), extra={"iteration": 7})
    loaded = load_weights(path)
    assert loaded.kind == "gvsl" and loaded.model_config == ModelConfig(width=8)
    assert loaded.preprocess.spacing == 1.5 and loaded.extra["iteration"] == 7
    rebuilt = loaded.build_model()
    for key, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value)


def test_unsafe_pickle_refused(tmp_path):
    import argparse

    path = tmp_path / "evil.pt"
    torch.save({"object": argparse.Namespace(x=1)}, path)  # any class: needs full unpickling
    with pytest.raises(CheckpointError, match="refused to load"):
        load_weights(path)


def test_wrong_shapes_named(tmp_path):
    state = GVSL(ModelConfig(width=8)).state_dict()
    state["out_flow.weight"] = torch.zeros(3, 16, 1, 1, 1)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    loaded = load_weights(path)
    with pytest.raises(CheckpointError, match=r"out_flow\.weight"):
        loaded.build_model()


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "random.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="neither a gvsl checkpoint nor an official"):
        load_weights(path)
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(CheckpointError, match="text.pt: not a PyTorch checkpoint: the file is text$"):
        load_weights(tmp_path / "text.pt")
    (tmp_path / "page.pth").write_text("<!DOCTYPE html><html><body>Google Drive can't scan this file</body></html>")
    with pytest.raises(CheckpointError, match="page.pth: an HTML page, not a checkpoint"):
        load_weights(tmp_path / "page.pth")
    (tmp_path / "noise.pt").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CheckpointError, match=r"noise.pt: not a PyTorch checkpoint file \(unrecognised content\)$"):
        load_weights(tmp_path / "noise.pt")


def test_files_of_other_kinds_are_named(tmp_path, colin_t1):
    # torch's own errors were "101" (text) and "list index out of range" (NRRD).
    import SimpleITK as sitk

    (tmp_path / "notes.txt").write_text("hello\nweights are elsewhere\n", encoding="utf-8")
    sitk.WriteImage(sitk.ReadImage(str(colin_t1)), str(tmp_path / "colin.nrrd"))
    sitk.WriteImage(sitk.ReadImage(str(colin_t1)), str(tmp_path / "colin.nii"))
    (tmp_path / "empty.pt").write_bytes(b"")
    expected = {
        "notes.txt": "not a PyTorch checkpoint: the file is text",
        "colin.nrrd": "not a PyTorch checkpoint: the file is a NRRD image",
        "colin.nii": "not a PyTorch checkpoint: the file is a NIfTI image",
        "empty.pt": r"the file is empty \(0 bytes\)",
    }
    for name, reason in expected.items():
        with pytest.raises(CheckpointError, match=f"{name}: {reason}$"):
            load_weights(tmp_path / name)
    with pytest.raises(CheckpointError, match=r"colin27_t1_2mm.nii.gz: not a PyTorch checkpoint: the file is gzip-compressed data"):
        load_weights(colin_t1)


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_checkpoint_named_as_such(tmp_path, legacy):
    path = tmp_path / "model.pt"
    torch.save(GVSL(ModelConfig(width=8)).state_dict(), path, _use_new_zipfile_serialization=not legacy)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.pt: damaged or truncated PyTorch file") as info:
        load_weights(path)
    assert "This is an internal" not in str(info.value)  # torch's sentences after the first are cut


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda c: c.pop("model_config"), "not a complete gvsl checkpoint: missing 'model_config'"),
        (lambda c: c.pop("state_dict"), "not a complete gvsl checkpoint: missing 'state_dict'"),
        (lambda c: c.update(state_dict=[1, 2]), "'state_dict' is a list, expected a dict"),
        (lambda c: c.update(preprocess="mr"), "'preprocess' is a str, expected a dict"),
        (lambda c: c["state_dict"].update(extra=3), "'state_dict' entry 'extra' is not a tensor"),
        (lambda c: c["model_config"].update(width=12), "invalid 'model_config'.*multiple of 8"),
        (lambda c: c["preprocess"].update(spacing=-1), "invalid 'preprocess'.*spacing must be a finite number > 0"),
    ],
)
def test_incomplete_gvsl_checkpoint_is_a_checkpoint_error(tmp_path, damage, reason):
    path = save_checkpoint(tmp_path / "model.pt", GVSL(ModelConfig(width=8)), PreprocessConfig())
    content = torch.load(path, weights_only=True)
    damage(content)
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=reason):
        load_weights(path)


def test_unsafe_pickle_message_is_one_clean_sentence(tmp_path):
    import pathlib

    path = tmp_path / "pickled.pt"
    torch.save({"where": pathlib.PurePosixPath("x")}, path)
    with pytest.raises(CheckpointError) as refused:
        load_weights(path)
    message = str(refused.value)
    assert "\x1b" not in message and "\n" not in message
    assert message.endswith("needs arbitrary code to unpickle (it references pathlib.PurePosixPath)")


def test_a_checkpoint_that_cannot_be_written_is_one_clear_error_and_keeps_the_old_one(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from gvsl_cli.errors import InputError

    path = tmp_path / "last.pt"
    model = GVSL(ModelConfig(width=8))
    save_checkpoint(path, model, PreprocessConfig(spacing=4.0), extra={"iteration": 2})

    def full_disk_save(obj, f, *args, **kwargs):  # what torch.save raises when the disk fills up
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 5939328 vs 5939248")

    monkeypatch.setattr(torch, "save", full_disk_save)
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: namedtuple("usage", "total used free")(10 * 2**30, 10 * 2**30, 2**20))
    with pytest.raises(InputError, match=r"last.pt: cannot write the checkpoint \(no space left on the device: 1 MB free\)"):
        save_checkpoint(path, model, PreprocessConfig(spacing=4.0), extra={"iteration": 4})
    monkeypatch.undo()
    assert load_weights(path).extra["iteration"] == 2  # the earlier checkpoint is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
