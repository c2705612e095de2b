"""gvsl embed: known feature values, names, shards, resuming, formats, geometry, errors."""

from __future__ import annotations

import errno
import gzip
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from gvsl_cli.checkpoint import load_weights, save_checkpoint
from gvsl_cli.cli import run
from gvsl_cli.config import ModelConfig, PreprocessConfig
from gvsl_cli.embedding import EmbedConfig, JsonLinesOutput, collect_sources, embed, parse_shard, shard_of
from gvsl_cli.errors import ConfigError, InputError
from gvsl_cli.model import GVSL
from gvsl_cli.preprocess import prepare


def _checkpoint(path: Path, seed: int = 0, patch=(32, 32, 32)) -> Path:
    torch.manual_seed(seed)
    save_checkpoint(path, GVSL(ModelConfig(width=8)), PreprocessConfig(spacing=4.0, modality="mr"), extra={"patch": list(patch)})
    return path


@pytest.fixture
def weights_file(tmp_path) -> Path:
    return _checkpoint(tmp_path / "w8.pt")


def _volume(path: Path, seed: int, size=(40, 44, 36), spacing=(2.0, 2.0, 2.5)) -> Path:
    """A smooth random volume with a non-trivial grid (origin, oblique-free direction)."""
    rng = np.random.default_rng(seed)
    array = rng.normal(size=size[::-1]).astype(np.float32)
    image = sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(array), 2.0)
    image = sitk.RescaleIntensity(image, 0, 200)
    image.SetSpacing(spacing)
    image.SetOrigin((-30.0, 12.5, 7.0))
    image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture
def volumes(tmp_path) -> Path:
    root = tmp_path / "data"
    _volume(root / "p1" / "scan.nii.gz", 1)
    _volume(root / "p2" / "scan.nii.gz", 2)
    _volume(root / "p3.mha", 3)
    return root


def test_the_global_vector_is_the_average_pool_of_f_g_of_the_whole_volume(tmp_path, weights_file, colin_t1):
    loaded = load_weights(weights_file)
    # --window changes the dense maps' windows only: the global pass takes the whole volume.
    for window in (32, 64):
        summary = embed([str(colin_t1)], tmp_path / f"out{window}", loaded, EmbedConfig(window=window), torch.device("cpu"))
        assert summary.computed == ["colin27_t1_2mm"]
    vector = np.load(tmp_path / "out32" / "colin27_t1_2mm.npy")
    np.testing.assert_array_equal(vector, np.load(tmp_path / "out64" / "colin27_t1_2mm.npy"))

    prepared = prepare(sitk.ReadImage(str(colin_t1)), loaded.preprocess)
    assert prepared.array.shape == (48, 64, 48)  # Colin at the 4 mm contract
    with torch.no_grad():
        f_g = loaded.build_model().unet(torch.from_numpy(prepared.array)[None, None]).global_[0]
    assert vector.shape == (128,) and vector.dtype == np.float32
    np.testing.assert_allclose(vector, f_g.mean(dim=(1, 2, 3)).numpy(), rtol=1e-4, atol=1e-6)


def test_only_sides_above_the_limit_are_split_for_the_global_pass(weights_file):
    from gvsl_cli.embedding import GLOBAL_MAX_SIDE, FeatureExtractor

    assert FeatureExtractor.global_window((48, 400, 256)) == (48, GLOBAL_MAX_SIDE, 256)
    extractor = FeatureExtractor(load_weights(weights_file), EmbedConfig(dense=True, window=32), torch.device("cpu"))

    class Prepared:  # a PreparedVolume's fields that features_of reads
        array = np.random.default_rng(0).random((32, 64, 32), dtype=np.float32)
        grid = original = None
        modality = detected = "mr"

    counts = []
    features = extractor.features_of(Prepared(), on_window=lambda done, total: counts.append((done, total)))
    # One global pass, then the dense windows: 1 x 3 x 1 at overlap 0.5.
    assert counts == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert features.windows == 4 and features.dense.shape == (8, 32, 64, 32)


def test_dense_features_keep_the_input_geometry_and_equal_f_l_on_the_canonical_grid(tmp_path, weights_file, volumes):
    loaded = load_weights(weights_file)
    source = volumes / "p3.mha"
    embed([str(source)], tmp_path / "in", loaded, EmbedConfig(dense=True, window=32), torch.device("cpu"))
    embed([str(source)], tmp_path / "can", loaded, EmbedConfig(dense=True, dense_grid="canonical", window=32), torch.device("cpu"))

    original = sitk.ReadImage(str(source))
    on_input = sitk.ReadImage(str(tmp_path / "in" / "p3_features.nii.gz"))
    assert on_input.GetNumberOfComponentsPerPixel() == 8
    assert on_input.GetSize() == original.GetSize()
    np.testing.assert_allclose(on_input.GetSpacing(), original.GetSpacing())
    np.testing.assert_allclose(on_input.GetOrigin(), original.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(on_input.GetDirection(), original.GetDirection())

    prepared = prepare(original, loaded.preprocess)
    assert prepared.array.shape == (32, 32, 32)
    canonical = sitk.ReadImage(str(tmp_path / "can" / "p3_features.nii.gz"))
    assert canonical.GetSize() == prepared.grid.size
    np.testing.assert_allclose(canonical.GetOrigin(), prepared.grid.origin, atol=1e-5)
    with torch.no_grad():
        f_l = loaded.build_model().unet(torch.from_numpy(prepared.array)[None, None]).local[0]
    written = np.moveaxis(sitk.GetArrayFromImage(canonical), -1, 0)
    # One window is the whole volume, so the Gaussian blend gives f_l itself.
    np.testing.assert_allclose(written, f_l.numpy(), rtol=1e-4, atol=1e-5)


def test_names_keep_sub_folders_and_files_take_their_stem(tmp_path, volumes):
    sources, skipped = collect_sources([str(volumes), str(volumes / "p3.mha")], tmp_path / "out")
    assert sorted(s.name for s in sources) == ["p1/scan", "p2/scan", "p3"]
    assert [s.reason for s in skipped] == ["given more than once"]


def test_loose_files_are_named_from_their_common_folder(tmp_path, volumes):
    # What find | gvsl embed - or a quoted glob gives: p1/scan and p2/scan, not two "scan".
    sources, skipped = collect_sources([str(volumes / "p1" / "scan.nii.gz"), str(volumes / "p2" / "scan.nii.gz")], tmp_path / "out")
    assert sorted(s.name for s in sources) == ["p1/scan", "p2/scan"] and not skipped
    sources, _ = collect_sources([str(volumes / "p1" / "scan.nii.gz")], tmp_path / "out")
    assert [s.name for s in sources] == ["scan"]


def test_volumes_taking_one_name_are_skipped_and_the_others_kept(tmp_path, volumes):
    shutil.copy(volumes / "p3.mha", volumes / "p3.nii.gz")
    sources, skipped = collect_sources([str(volumes)], tmp_path / "out")
    assert sorted(s.name for s in sources) == ["p1/scan", "p2/scan"]
    assert sorted(Path(s.path).name for s in skipped) == ["p3.mha", "p3.nii.gz"]
    assert all("takes the output name 'p3'" in s.reason for s in skipped)
    sources, skipped = collect_sources([str(volumes)], tmp_path / "out", exclude=("*.mha",))
    assert sorted(s.name for s in sources) == ["p1/scan", "p2/scan", "p3"] and not skipped


def test_include_and_exclude_match_names_and_file_names(tmp_path, volumes):
    sources, _ = collect_sources([str(volumes)], tmp_path / "out", include=("p1/*", "*.mha"))
    assert sorted(s.name for s in sources) == ["p1/scan", "p3"]
    sources, _ = collect_sources([str(volumes)], tmp_path / "out", exclude=("scan.nii.gz",))
    assert [s.name for s in sources] == ["p3"]


def test_names_follow_symbolic_links_as_given(tmp_path, volumes):
    # A DataLad/git-annex data set: every file a link into a hidden store elsewhere.
    store = tmp_path / "store" / ".git" / "annex"
    store.mkdir(parents=True)
    shutil.move(volumes / "p3.mha", store / "MD5E-s1--abc.mha")
    (volumes / "p3.mha").symlink_to(store / "MD5E-s1--abc.mha")
    sources, _ = collect_sources([str(volumes)], tmp_path / "out")
    assert sorted(s.name for s in sources) == ["p1/scan", "p2/scan", "p3"]
    assert (volumes / "p3.mha") in [s.path for s in sources]


def test_outputs_inside_an_input_folder_are_not_read_back(tmp_path, weights_file, volumes, capsys):
    out = volumes / "features"
    assert run(["embed", str(volumes), "--weights", str(weights_file), "-o", str(out), "--dense", "--window", "32"]) == 0
    sources, _ = collect_sources([str(volumes)], out)
    assert sorted(s.name for s in sources) == ["p1/scan", "p2/scan", "p3"]
    # Run again: all three are already done, and the features written into the input folder are not inputs.
    assert run(["embed", str(volumes), "--weights", str(weights_file), "-o", str(out), "--dense", "--window", "32"]) == 0
    assert "3 volume(s) already embedded" in capsys.readouterr().err
    # Nor for a run with another output folder: a folder holding an embed.json is an output.
    sources, _ = collect_sources([str(volumes)], tmp_path / "elsewhere")
    assert sorted(s.name for s in sources) == ["p1/scan", "p2/scan", "p3"]


def test_shards_split_the_work_and_give_the_same_vectors(tmp_path, weights_file, volumes):
    loaded = load_weights(weights_file)
    whole = embed([str(volumes)], tmp_path / "whole", loaded, EmbedConfig(), torch.device("cpu"))
    parts = [embed([str(volumes)], tmp_path / "sharded", loaded, EmbedConfig(shard=(i, 2)), torch.device("cpu")) for i in range(2)]
    assert sorted(parts[0].computed + parts[1].computed) == sorted(whole.computed) == ["p1/scan", "p2/scan", "p3"]
    assert not set(parts[0].computed) & set(parts[1].computed)
    for name in whole.computed:
        np.testing.assert_array_equal(np.load(tmp_path / "whole" / f"{name}.npy"), np.load(tmp_path / "sharded" / f"{name}.npy"))
    sources, _ = collect_sources([str(volumes)], tmp_path / "x")
    assert [s.name for s in shard_of(sources, (1, 2))] == ["p2/scan"]


def test_finished_volumes_are_skipped_and_overwrite_computes_them_again(tmp_path, weights_file, volumes):
    loaded = load_weights(weights_file)
    out = tmp_path / "out"
    embed([str(volumes)], out, loaded, EmbedConfig(), torch.device("cpu"))
    good = np.load(out / "p3.npy")
    np.save(out / "p3.npy", np.zeros(3, np.float32))  # a stale value, to see whether it is redone
    (out / "p1" / "scan.npy").unlink()
    again = embed([str(volumes)], out, loaded, EmbedConfig(), torch.device("cpu"))
    assert again.computed == ["p1/scan"] and sorted(again.already_done) == ["p2/scan", "p3"]
    assert np.load(out / "p3.npy").shape == (3,)
    forced = embed([str(volumes)], out, loaded, EmbedConfig(overwrite=True), torch.device("cpu"))
    assert len(forced.computed) == 3
    np.testing.assert_array_equal(np.load(out / "p3.npy"), good)


def test_json_lines_of_other_shards_count_as_done_and_a_second_writer_is_refused(tmp_path, weights_file, volumes):
    loaded = load_weights(weights_file)
    out = tmp_path / "out"
    first = embed([str(volumes)], out, loaded, EmbedConfig(format="jsonl", shard=(0, 2)), torch.device("cpu"))
    # An unsharded clean-up run computes only what shard 0 did not.
    rest = embed([str(volumes)], out, loaded, EmbedConfig(format="jsonl"), torch.device("cpu"))
    assert sorted(rest.computed + first.computed) == ["p1/scan", "p2/scan", "p3"]
    assert sorted(rest.already_done) == sorted(first.computed)

    from gvsl_cli.embedding import JsonLinesOutput as Lines

    holder = Lines(out / "embeddings.jsonl")
    try:
        with pytest.raises(InputError, match="another gvsl embed is writing this file now"):
            Lines(out / "embeddings.jsonl")
    finally:
        holder.close()
    Lines(out / "embeddings.jsonl").close()  # free again once the first writer is done
    assert sorted(p.name for p in out.glob("*.lock")) == []  # no lock file left behind


def test_a_removable_lock_is_exclusive_and_a_lock_on_a_removed_file_is_not_taken(tmp_path, monkeypatch):
    from gvsl_cli.locking import RemovableLock

    path = tmp_path / "x.lock"
    first, second = RemovableLock(path), RemovableLock(path)
    assert first.try_acquire() and path.exists()
    assert not second.try_acquire()
    first.release()
    assert not path.exists()
    assert second.try_acquire()
    second.release()

    # A process that opened the file just before its holder removed it must not count
    # the lock on that removed file as the lock: it takes the new file's lock instead.
    import os
    from gvsl_cli import locking

    stale = os.open(path, os.O_RDWR | os.O_CREAT)
    os.unlink(path)
    opened = []
    real_open = os.open

    def open_the_removed_file_first(name, flags, mode=0o777):
        if not opened:
            opened.append(name)
            return os.dup(stale)
        return real_open(name, flags, mode)

    third = RemovableLock(path)
    with monkeypatch.context() as patch:
        patch.setattr(locking.os, "open", open_the_removed_file_first)
        assert third.try_acquire()
    assert path.exists() and os.stat(path).st_ino != os.fstat(stale).st_ino
    assert not RemovableLock(path).try_acquire()  # the lock is on the file at the path
    third.release()
    os.close(stale)


def test_json_lines_hold_one_line_per_volume_and_a_torn_line_is_dropped(tmp_path, weights_file, volumes):
    loaded = load_weights(weights_file)
    out = tmp_path / "out"
    embed([str(volumes)], out, loaded, EmbedConfig(format="jsonl"), torch.device("cpu"))
    path = out / "embeddings.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["name"] for r in rows] == ["p1/scan", "p2/scan", "p3"]
    assert all(len(r["vector"]) == 128 and r["modality"] == "mr" for r in rows)
    np.testing.assert_allclose(rows[2]["vector"], np.load(_npy_of(tmp_path, loaded, volumes / "p3.mha")), rtol=1e-6)

    # A kill in the middle of the third line: that line is cut, the volume done again.
    text = path.read_text()
    torn = text[: text.rindex("\n", 0, len(text) - 1) + 1] + '{"name": "p3", "vec'
    path.write_text(torn)
    lines = JsonLinesOutput(path)
    assert lines.done == {"p1/scan", "p2/scan"}
    lines.close()
    again = embed([str(volumes)], out, loaded, EmbedConfig(format="jsonl"), torch.device("cpu"))
    assert again.computed == ["p3"]
    assert path.read_text() == text
    # A damaged line in the middle costs that volume only, not the lines after it.
    rows = text.splitlines(keepends=True)
    path.write_text(rows[0] + "garbage\n" + "".join(rows[2:]))
    again = embed([str(volumes)], out, loaded, EmbedConfig(format="jsonl"), torch.device("cpu"))
    assert again.computed == ["p2/scan"]


def _npy_of(tmp_path, loaded, source) -> Path:
    embed([str(source)], tmp_path / "npy", loaded, EmbedConfig(), torch.device("cpu"))
    return tmp_path / "npy" / "p3.npy"


def test_a_folder_of_other_weights_is_refused(tmp_path, weights_file, volumes, capsys):
    out = tmp_path / "out"
    assert run(["embed", str(volumes / "p3.mha"), "--weights", str(weights_file), "-o", str(out)]) == 0
    other = _checkpoint(tmp_path / "other.pt", seed=1)
    assert run(["embed", str(volumes / "p3.mha"), "--weights", str(other), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {out} holds embeddings made with other weights (checksum ")


def test_a_folder_without_outputs_is_not_claimed(tmp_path, weights_file, volumes, capsys):
    out = tmp_path / "out"
    (volumes / "bad.nii.gz").write_bytes(b"not an image")
    assert run(["embed", str(volumes / "bad.nii.gz"), "--weights", str(weights_file), "-o", str(out), "-q"]) == 7
    assert not (out / "embed.json").exists()
    # A failed first run with other weights does not lock the folder either.
    out.mkdir()
    (out / "embed.json").write_text(json.dumps({"weights_checksum": "0" * 16}))
    assert run(["embed", str(volumes / "p3.mha"), "--weights", str(weights_file), "-o", str(out), "-q"]) == 0
    assert json.loads((out / "embed.json").read_text())["weights_checksum"] != "0" * 16


def test_precision_is_recorded_and_must_agree(tmp_path, weights_file, volumes, capsys):
    out = tmp_path / "out"
    assert run(["embed", str(volumes / "p3.mha"), "--weights", str(weights_file), "-o", str(out), "-q"]) == 0
    assert json.loads((out / "embed.json").read_text())["precision"] == "fp32"
    assert run(["embed", str(volumes), "--weights", str(weights_file), "-o", str(out), "--precision", "bf16", "-q"]) == 2
    assert "other precision (fp32 here, bf16 given)" in capsys.readouterr().err


def test_dense_maps_of_other_settings_are_refused_vectors_alone_are_not(tmp_path, weights_file, volumes, capsys):
    out = tmp_path / "out"
    source = str(volumes / "p3.mha")
    assert run(["embed", source, "--weights", str(weights_file), "-o", str(out), "-q"]) == 0
    assert json.loads((out / "embed.json").read_text())["dense"] is None
    assert run(["embed", source, "--weights", str(weights_file), "-o", str(out), "--dense", "--window", "32", "-q"]) == 0
    assert json.loads((out / "embed.json").read_text())["dense"]["window"] == 32
    assert run(["embed", source, "--weights", str(weights_file), "-o", str(out), "--dense", "--window", "32", "--overlap", "0.25"]) == 2
    assert "made with other dense-map settings" in capsys.readouterr().err
    assert run(["embed", source, "--weights", str(weights_file), "-o", str(out), "--window", "64", "-q"]) == 0


def test_unreadable_volumes_are_reported_and_the_others_done(tmp_path, weights_file, volumes, capsys):
    (volumes / "p4.nii.gz").write_bytes(b"not an image at all")
    out = tmp_path / "out"
    # A localizer of 3 slices (ITK's blur used to raise on it and end the run) is embedded;
    # one of 1 slice between the grid's planes is constant on the canonical grid: skipped.
    for slices, name in ((3, "p5.nii.gz"), (1, "p6.nii.gz")):
        image = sitk.GetImageFromArray(np.random.default_rng(0).random((slices, 40, 40)).astype(np.float32) * 100)
        image.SetSpacing((1.0, 1.0, 3.0))  # 6 mm thick: the 4 mm grid has planes inside it
        sitk.WriteImage(image, str(volumes / name))
    code = run(["embed", str(volumes), str(tmp_path / "missing.nii.gz"), "--weights", str(weights_file), "-o", str(out), "-q"])
    assert code == 7
    err = capsys.readouterr().err
    assert f"failed {volumes / 'p4.nii.gz'}:" in err
    assert f"skipped {tmp_path / 'missing.nii.gz'}: no such file or folder" in err
    assert f"failed {volumes / 'p6.nii.gz'}: constant intensity" in err
    assert "error: 3 input(s) could not be embedded" in err
    assert "Traceback" not in err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.npy")) == ["p1/scan.npy", "p2/scan.npy", "p3.npy", "p5.npy"]


def test_an_output_name_the_file_system_refuses_fails_that_volume_only(tmp_path, weights_file, volumes, capsys):
    # A 240-byte stem is a valid input and vector name, but its dense map's name
    # (stem + "_features.nii.gz") is over the usual 255-byte limit.
    long_stem = "x" * 240
    _volume(volumes / f"{long_stem}.nii.gz", 4)
    out = tmp_path / "out"
    code = run(["embed", str(volumes), "--weights", str(weights_file), "-o", str(out), "--dense", "--window", "32", "-q"])
    err = capsys.readouterr().err
    assert code == 7
    assert f"failed {volumes / (long_stem + '.nii.gz')}: File name too long" in err
    assert "Traceback" not in err
    # The other volumes are all done, and the refused one left nothing behind.
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.npy")) == ["p1/scan.npy", "p2/scan.npy", "p3.npy"]
    assert not any(long_stem in p.name for p in out.rglob("*"))


def test_paths_from_stdin_and_quoted_globs(tmp_path, weights_file, volumes, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(f"# a list\r\n{volumes / 'p3.mha'}\r\n\n"))
    assert run(["embed", "-", str(volumes / "p*" / "*.nii.gz"), "--weights", str(weights_file), "-o", str(tmp_path / "out"), "-q"]) == 0
    names = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.npy"))
    assert names == ["p1/scan.npy", "p2/scan.npy", "p3.npy"]


def test_a_pattern_matching_nothing_is_reported(tmp_path, weights_file, capsys):
    assert run(["embed", str(tmp_path / "nothing*.nii.gz"), str(tmp_path / "typo"), "--weights", str(weights_file), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"skipped {tmp_path / 'nothing*.nii.gz'}: no file matches this pattern" in err
    assert f"skipped {tmp_path / 'typo'}: no such file or folder" in err
    assert "error: no volume to embed: 2 input(s) skipped (listed above)" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--shard", "2/2"], "shard must be I/N with 0 <= I < N"),
        (["--shard", "a/b"], "shard must be I/N (two whole numbers)"),
        (["--window", "40"], "window must be a multiple of 16"),
        (["--window", "0"], "at least 16"),
        (["--format", "csv"], "format must be one of npy, jsonl"),
        (["--dense-grid", "fixed"], "dense grid must be one of input, canonical"),
    ],
)
def test_bad_options_give_one_line_errors(tmp_path, weights_file, volumes, capsys, args, message):
    assert run(["embed", str(volumes), "--weights", str(weights_file), "-o", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "out").exists()


def test_weights_are_required(tmp_path, volumes, capsys):
    assert run(["embed", str(volumes)]) == 2
    assert "--weights" in capsys.readouterr().err


def test_parse_shard():
    assert parse_shard("3/8") == (3, 8)
    with pytest.raises(ConfigError):
        EmbedConfig(shard=(0, 0))


def test_window_defaults_to_the_training_patch(tmp_path, volumes):
    from gvsl_cli.embedding import FeatureExtractor

    for patch, window in (((48, 48, 48), 48), ((40, 40, 40), 48), (None, 128)):
        path = tmp_path / f"w{window}.pt"
        torch.manual_seed(0)
        save_checkpoint(path, GVSL(ModelConfig(width=8)), PreprocessConfig(spacing=4.0), extra={"patch": list(patch)} if patch else {})
        assert FeatureExtractor(load_weights(path), EmbedConfig(), torch.device("cpu")).window == window
    shutil.rmtree(tmp_path / "data")


def _dense_features(seed: int = 3):
    """VolumeFeatures with a random 5-channel map on a 2 mm canonical grid, and an oblique
    input grid of another size and spacing."""
    from gvsl_cli.embedding import VolumeFeatures
    from gvsl_cli.geometry import Geometry

    rng = np.random.default_rng(seed)
    canonical = Geometry(size=(16, 32, 16), spacing=(2.0, 2.0, 2.0), origin=(-10.0, -20.0, -5.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    c, s = np.cos(0.4), np.sin(0.4)
    original = Geometry(size=(20, 30, 11), spacing=(1.3, 1.5, 2.5), origin=(-8.0, -15.0, 0.0), direction=(c, -s, 0, s, c, 0, 0, 0, 1))
    dense = rng.normal(size=(5, 16, 32, 16)).astype(np.float32)
    return VolumeFeatures(vector=np.zeros(1, np.float32), dense=dense, grid=canonical, original=original, modality="mr", windows=1)


def _itk_written_bytes(image, path) -> bytes:
    """The decompressed bytes of ``image`` as ITK writes it to a .nii.gz file."""
    sitk.WriteImage(image, str(path), True)
    return gzip.open(path).read()


@pytest.mark.parametrize("grid", ["input", "canonical"])
def test_streamed_dense_maps_equal_itk_writing_the_whole_vector_image(tmp_path, grid):
    """Written one component at a time, the file holds exactly the bytes ITK writes for the
    whole vector image (resampled as a vector image on the input grid): same header, so the
    same geometry for every reader, and the same values."""
    from gvsl_cli.embedding import write_dense_map

    features = _dense_features()
    vector_image = sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(features.dense, 0, -1)), isVector=True)
    features.grid.apply_to(vector_image)
    if grid == "input":
        reference = sitk.Image([int(n) for n in features.original.size], sitk.sitkVectorFloat32, 5)
        features.original.apply_to(reference)
        expected = sitk.Resample(vector_image, reference, sitk.Transform(), sitk.sitkLinear, 0.0)
    else:
        expected = vector_image

    written = write_dense_map(features, grid, tmp_path / "case_features.nii.gz")
    assert gzip.open(written).read() == _itk_written_bytes(expected, tmp_path / "itk.nii.gz")
    read_back = sitk.ReadImage(str(written))
    assert read_back.GetNumberOfComponentsPerPixel() == 5 and read_back.GetSize() == expected.GetSize()
    for got, wanted in ((read_back.GetSpacing(), expected.GetSpacing()), (read_back.GetOrigin(), expected.GetOrigin()), (read_back.GetDirection(), expected.GetDirection())):
        np.testing.assert_allclose(got, wanted, atol=1e-5)  # NIfTI stores float32
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_back), sitk.GetArrayFromImage(expected))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_a_streamed_map_that_fails_midway_leaves_no_file(tmp_path):
    from gvsl_cli.io import write_vector_nifti

    features = _dense_features()
    target = tmp_path / "case_features.nii.gz"

    def component(channel):
        if channel == 3:
            raise OSError(errno.ENOSPC, "No space left on device")  # as gzip's write on a full disk
        return features.dense[channel]

    with pytest.raises(OSError) as raised:
        write_vector_nifti(target, features.grid, 5, component)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []


def test_a_run_that_embeds_nothing_leaves_no_output_folder(tmp_path, weights_file, capsys):
    (tmp_path / "broken.nii.gz").write_bytes(b"not an image at all")
    out = tmp_path / "new" / "out"
    assert run(["embed", str(tmp_path / "broken.nii.gz"), "--weights", str(weights_file), "-o", str(out), "-q"]) == 7
    assert "failed" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_dense_window_is_clamped_to_the_volume():
    from types import SimpleNamespace

    from gvsl_cli.embedding import FeatureExtractor

    # --window 100000 asked for a 4 PB window of padding; the volume's largest side is enough.
    assert FeatureExtractor.dense_window(SimpleNamespace(window=100000), (48, 64, 32)) == (64, 64, 64)
    assert FeatureExtractor.dense_window(SimpleNamespace(window=32), (48, 64, 32)) == (32, 32, 32)
