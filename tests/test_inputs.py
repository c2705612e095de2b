"""Inputs and options shared by the commands: ``-`` (paths on stdin), pipes and lists
without a suffix, --include/--exclude, label maps left out of pre-training, the modality
warning, ``-o``/``--output``/``--out`` and ``-q``.

Small on purpose: width-8 networks at 4-6 mm, one training iteration.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from gvsl_cli import data
from gvsl_cli.checkpoint import save_checkpoint
from gvsl_cli.cli import app, run
from gvsl_cli.config import ModelConfig, PreprocessConfig
from gvsl_cli.model import GVSL, SegmentationNet

EXAMPLES = Path(__file__).resolve().parent.parent / "gvsl_cli" / "examples"
SHARED = Path("/work/shared/data")
SMALL_PRETRAIN = ["--width", "8", "--patch", "32", "--spacing", "4", "--device", "cpu", "--workers", "1", "--iters", "1", "--log-every", "1"]


def _stdin(monkeypatch, text: str) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(text))


@pytest.fixture
def heads(tmp_path) -> Path:
    """Two MR heads and a tissue label map, in sub-folders."""
    root = tmp_path / "heads"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    shutil.copy(EXAMPLES / "colin27_t1_2mm.nii.gz", root / "a" / "t1.nii.gz")
    shutil.copy(EXAMPLES / "colin27_tissue_2mm.nii.gz", root / "a" / "tissue.nii.gz")
    shutil.copy(EXAMPLES / "icbm152_t1_2mm.nii.gz", root / "b" / "t1.nii.gz")
    return root


@pytest.fixture
def nnunet(tmp_path) -> Path:
    """An nnU-Net raw dataset: imagesTr/CASE_0000 next to labelsTr/CASE (tissue classes)."""
    root = tmp_path / "Dataset001_Tissue"
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    for case, stem in (("colin", "colin27"), ("icbm", "icbm152")):
        shutil.copy(EXAMPLES / f"{stem}_t1_2mm.nii.gz", root / "imagesTr" / f"{case}_0000.nii.gz")
        shutil.copy(EXAMPLES / f"{stem}_tissue_2mm.nii.gz", root / "labelsTr" / f"{case}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1"}, "labels": {"background": 0, "wm": 1}, "file_ending": ".nii.gz"}))
    return root


@pytest.fixture
def ct_hu(tmp_path) -> Path:
    """Colin27 rescaled to Hounsfield-like units (minimum -1024): looks like CT."""
    image = sitk.Cast(sitk.ReadImage(str(EXAMPLES / "colin27_t1_2mm.nii.gz")), sitk.sitkInt16) * 10 - 1024
    path = tmp_path / "ct_hu.nii.gz"
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture
def mr_weights(tmp_path) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "w8.pt", GVSL(ModelConfig(width=8)), PreprocessConfig(spacing=6.0, modality="mr"), extra={"patch": [32, 32, 32]})


# --------------------------------------------------------------------------- discovery


def test_dash_reads_paths_from_stdin_relative_to_the_working_folder(heads, monkeypatch):
    monkeypatch.chdir(heads)
    sources, skipped = data.discover(["-"], stdin_lines=io.StringIO("# heads\r\na/t1.nii.gz\n\n  b/t1.nii.gz  \n"))
    assert sources == [(heads / "a" / "t1.nii.gz").resolve(), (heads / "b" / "t1.nii.gz").resolve()]
    assert skipped == []


def test_a_pipe_is_a_list_of_paths(heads, monkeypatch):
    # What bash's <(find ...) hands over: /dev/fd/N, a pipe, relative paths from the working folder.
    monkeypatch.chdir(heads)
    read_end, write_end = os.pipe()
    os.write(write_end, b"a/t1.nii.gz\nb/t1.nii.gz\n")
    os.close(write_end)
    try:
        sources, skipped = data.discover([f"/dev/fd/{read_end}"])
    finally:
        os.close(read_end)
    assert [s.relative_to(heads.resolve()).as_posix() for s in sources] == ["a/t1.nii.gz", "b/t1.nii.gz"]
    assert skipped == []


def test_a_text_file_of_paths_without_suffix_is_a_list_and_other_files_are_not(heads, tmp_path):
    listing = tmp_path / "cases"  # no .txt
    listing.write_text(f"{heads / 'b' / 't1.nii.gz'}\nheads/a/t1.nii.gz\n")  # the second relative to the list
    sources, skipped = data.discover([listing])
    assert sources == [(heads / "b" / "t1.nii.gz").resolve(), (heads / "a" / "t1.nii.gz").resolve()] and skipped == []

    readme = tmp_path / "README"
    readme.write_text("Scans of 2024\nsee the wiki\n")  # text, but no entry exists
    binary = tmp_path / "slice"
    binary.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    sources, skipped = data.discover([readme, binary])
    assert sources == []
    assert [s.reason.split(" (")[0] for s in skipped] == ["not a volume file", "not a volume file"]


def test_include_and_exclude_match_names_and_file_names(heads):
    named, _ = data.discover_named([heads], exclude=["*tissue*"])
    assert [s.name for s in named] == ["a/t1", "b/t1"]
    named, _ = data.discover_named([heads], include=["a/*"])
    assert [s.name for s in named] == ["a/t1", "a/tissue"]
    named, _ = data.discover_named([heads], include=["t1.nii.gz"], exclude=["b/*"])
    assert [s.name for s in named] == ["a/t1"]


# --------------------------------------------------------------------------- label maps


def test_label_maps_are_integer_volumes_of_few_values(tmp_path):
    assert data.label_map_values(sitk.ReadImage(str(EXAMPLES / "colin27_tissue_2mm.nii.gz"))) == 7
    assert data.label_map_values(sitk.ReadImage(str(EXAMPLES / "icbm152_tissue_2mm.nii.gz"))) == 3
    assert data.label_map_values(sitk.ReadImage(str(EXAMPLES / "colin27_t1_2mm.nii.gz"))) is None  # uint8 MR, >64 values
    labels = sitk.ReadImage(str(EXAMPLES / "colin27_tissue_2mm.nii.gz"))
    assert data.label_map_values(sitk.Cast(labels, sitk.sitkFloat32)) is None  # only integer types
    ct = sitk.GetImageFromArray(np.arange(-1024, 1024, dtype=np.int16).reshape(8, 16, 16))
    assert data.label_map_values(ct) is None  # int16 HU: thousands of values
    assert data.label_map_values(sitk.GetImageFromArray(np.arange(64, dtype=np.int32).reshape(4, 4, 4))) == 64
    assert data.label_map_values(sitk.GetImageFromArray(np.concatenate([np.arange(65), np.zeros(63)]).astype(np.int32).reshape(2, 8, 8))) is None


def test_shared_data_label_maps_are_skipped_with_one_line_each(tmp_path):
    if not SHARED.is_dir():
        pytest.skip("needs /work/shared/data")
    sources, _ = data.discover([SHARED])
    dataset = data.prepare_dataset(sources, PreprocessConfig(spacing=8.0), data.VolumeCache(tmp_path / "cache"), workers=2, refuse_label_maps=True)
    reasons = {Path(s.path).name: s.reason for s in dataset.skipped}
    assert reasons == {
        "mr_colin27_tissue.nii.gz": "looks like a label map (7 distinct integer values)",
        "mr_icbm152_tissue.nii.gz": "looks like a label map (3 distinct integer values)",
        "mr_itk_t1_kmeans_labels.nii.gz": "looks like a label map (7 distinct integer values)",
    }
    assert sorted(Path(v.source).name for v in dataset.volumes) == ["ct_brain_atlas.nii.gz", "ct_head_scaled.nii.gz", "mr_colin27_t1.nii.gz", "mr_icbm152_t1.nii.gz", "mr_itk_t1.nii.gz"]


def test_the_label_map_check_runs_only_when_a_volume_is_prepared(tmp_path, monkeypatch):
    cache = data.VolumeCache(tmp_path / "cache")
    source = EXAMPLES / "colin27_t1_2mm.nii.gz"
    data.prepare_dataset([source], PreprocessConfig(spacing=8.0), cache, refuse_label_maps=True)

    def counted(image):
        raise AssertionError("a cache hit must not read the volume")

    monkeypatch.setattr(data, "label_map_values", counted)
    (volume,) = data.prepare_dataset([source], PreprocessConfig(spacing=8.0), cache, refuse_label_maps=True).volumes
    assert volume.from_cache


def test_pretrain_on_an_nnunet_folder_skips_labels_and_takes_include_exclude(nnunet, tmp_path, capsys):
    cache = tmp_path / "cache"
    code = run(["pretrain", str(nnunet), "-o", str(tmp_path / "run"), "--cache-dir", str(cache), *SMALL_PRETRAIN])
    assert code == 0
    err = capsys.readouterr().err
    for case, values in (("colin", 7), ("icbm", 3)):
        assert f"skipped {(nnunet / 'labelsTr' / f'{case}.nii.gz').resolve()}: looks like a label map ({values} distinct integer values)" in err
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert [Path(p).parent.name for p in record["dataset_sources"]] == ["imagesTr", "imagesTr"]

    # --exclude leaves them out before any reading; it is stored and used again on --resume.
    code = run(["pretrain", str(nnunet), "--output", str(tmp_path / "run2"), "--cache-dir", str(cache), "--exclude", "labelsTr/*", *SMALL_PRETRAIN])
    assert code == 0
    assert "skipped" not in capsys.readouterr().err
    assert json.loads((tmp_path / "run2" / "run.json").read_text())["exclude"] == ["labelsTr/*"]
    code = run(["pretrain", "--out", str(tmp_path / "run2"), "--resume", "--iters", "2", "--cache-dir", str(cache), "--device", "cpu", "--workers", "1"])
    assert code == 0
    assert "skipped" not in capsys.readouterr().err

    code = run(["pretrain", str(nnunet), "-o", str(tmp_path / "run3"), "--cache-dir", str(cache), "--include", "*.txt", *SMALL_PRETRAIN])
    assert code == 2
    assert "hint: check --include/--exclude" in capsys.readouterr().err


def test_pretrain_reads_paths_from_stdin_and_stores_them(heads, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(heads)
    _stdin(monkeypatch, "a/t1.nii.gz\nb/t1.nii.gz\n")
    code = run(["pretrain", "-", "-o", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), *SMALL_PRETRAIN])
    assert code == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["inputs"] == [str(heads / "a" / "t1.nii.gz"), str(heads / "b" / "t1.nii.gz")]  # not "-": --resume reads them again


# --------------------------------------------------------------------------- other commands and -


def test_info_reads_paths_from_stdin(monkeypatch, capsys):
    _stdin(monkeypatch, f"{EXAMPLES / 'colin27_t1_2mm.nii.gz'}\n{EXAMPLES / 'icbm152_t1_2mm.nii.gz'}\n")
    assert run(["info", "-", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [Path(r["path"]).name for r in rows] == ["colin27_t1_2mm.nii.gz", "icbm152_t1_2mm.nii.gz"]


def test_nul_separated_paths_on_stdin_are_read_exactly(monkeypatch, capsys, tmp_path):
    # find -print0: names with spaces, a leading space, even a newline, are kept as they are.
    names = ["my scan.nii.gz", " lead.nii.gz", "new\nline.nii.gz"]
    for name in names:
        shutil.copy(EXAMPLES / "colin27_t1_2mm.nii.gz", tmp_path / name)
    _stdin(monkeypatch, "".join(f"{tmp_path / name}\0" for name in names))
    assert run(["info", "-", "--json"]) == 0
    assert [Path(json.loads(line)["path"]).name for line in capsys.readouterr().out.splitlines()] == names


def test_apply_reads_labels_from_stdin_and_refuses_stdin_twice(tmp_path, monkeypatch, capsys):
    transform = tmp_path / "identity.tfm"
    sitk.WriteTransform(sitk.TranslationTransform(3), str(transform))
    reference = EXAMPLES / "colin27_t1_2mm.nii.gz"
    _stdin(monkeypatch, f"{EXAMPLES / 'colin27_tissue_2mm.nii.gz'}\n")
    code = run(["apply", "-l", "-", "-t", str(transform), "-r", str(reference), "--output", str(tmp_path / "out"), "--json", "-q"])
    captured = capsys.readouterr()
    assert code == 0 and captured.err == ""
    (row,) = [json.loads(line) for line in captured.out.splitlines()]
    assert row["labels"] and Path(row["output"]).name == "colin27_tissue_2mm_warped.nii.gz"
    warped = sitk.GetArrayFromImage(sitk.ReadImage(row["output"]))
    np.testing.assert_array_equal(warped, sitk.GetArrayFromImage(sitk.ReadImage(str(EXAMPLES / "colin27_tissue_2mm.nii.gz"))))

    _stdin(monkeypatch, "")
    assert run(["apply", "-", "-l", "-", "-t", str(transform), "-r", str(reference), "-o", str(tmp_path / "out2")]) == 2
    assert "stdin holds one list of paths" in capsys.readouterr().err


def test_dash_with_a_terminal_stdin_is_refused(monkeypatch, capsys):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stdin", Terminal())
    assert run(["info", "-"]) == 2
    assert "stdin is a terminal" in capsys.readouterr().err


def test_dash_with_a_closed_stdin_says_so():
    # `gvsl info - <&-`: Python starts without sys.stdin; the message must not say "terminal".
    done = subprocess.run(["sh", "-c", 'exec "$0" -m gvsl_cli info - <&-', sys.executable], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith("error: -: reads paths from stdin, but stdin is closed"), done.stderr


def test_output_dash_is_refused_before_any_work(tmp_path, mr_weights, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run(["embed", str(EXAMPLES / "colin27_t1_2mm.nii.gz"), "--weights", str(mr_weights), "-o", "-"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: -o -: outputs are files written into a folder") and "\n" not in err
    assert not (tmp_path / "-").exists()


@pytest.mark.parametrize("command", [["segment", "{image}", "--model", "{model}"], ["register", "{image}", "{image}"], ["embed", "{image}", "--weights", "{weights}"]])
def test_output_named_like_a_volume_file_is_refused_before_any_work(tmp_path, mr_weights, command, monkeypatch, capsys):
    # TotalSegmentator's `-o pred.nii.gz`: a folder of that name would break the next tool.
    monkeypatch.chdir(tmp_path)
    names = {"image": str(EXAMPLES / "colin27_t1_2mm.nii.gz"), "model": str(mr_weights), "weights": str(mr_weights)}
    assert run([part.format(**names) for part in command] + ["-o", "pred.nii.gz"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: -o pred.nii.gz: -o names a folder, and this is a volume file name") and "\n" not in err
    assert not (tmp_path / "pred.nii.gz").exists()
    # Nor a data file's name (`embed -o features.jsonl` made a folder of that name).
    assert run([part.format(**names) for part in command] + ["-o", "features.jsonl"]) == 2
    assert capsys.readouterr().err.startswith("error: -o features.jsonl: -o names a folder, and this is a .jsonl file name")
    assert not (tmp_path / "features.jsonl").exists()
    # An existing folder of such a name stays usable.
    from gvsl_cli.commands.inputs import refuse_stdout_folder

    (tmp_path / "odd.nii").mkdir()
    assert refuse_stdout_folder(Path("odd.nii")) == Path("odd.nii")


# --------------------------------------------------------------------------- segment


@pytest.fixture
def segmentation_model(tmp_path) -> Path:
    torch.manual_seed(0)
    model = SegmentationNet(ModelConfig(width=8), 2)
    meta = {"label_names": ["background", "a"], "label_values": [0, 1], "labels": {"background": 0, "a": 1}, "patch": [32, 32, 32]}
    return save_checkpoint(tmp_path / "best.pt", model, PreprocessConfig(spacing=6.0, modality="mr"), affine_trained=False, extra={"segmentation": meta})


def test_segment_reads_stdin_and_warns_when_the_model_contract_does_not_fit(tmp_path, ct_hu, segmentation_model, monkeypatch, capsys):
    _stdin(monkeypatch, f"{ct_hu}\n{EXAMPLES / 'colin27_t1_2mm.nii.gz'}\n")
    code = run(["segment", "-", "--model", str(segmentation_model), "--out", str(tmp_path / "pred"), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["colin27_t1_2mm.nii.gz", "ct_hu.nii.gz", "segment.json"]
    # -q: the warning only, one line, for the CT alone.
    assert err == [f"warning: {ct_hu} looks like CT (minimum below -500: Hounsfield units), but its intensities are mapped as MR (the model's contract): the model never saw such images, its labels may be wrong"]


# --------------------------------------------------------------------------- embed --modality


def test_embed_warns_on_a_misfit_and_modality_overrides_the_contract(tmp_path, ct_hu, mr_weights, capsys):
    out = tmp_path / "emb"
    assert run(["embed", str(ct_hu), "--weights", str(mr_weights), "-o", str(out), "--format", "jsonl", "-q"]) == 0
    err = capsys.readouterr().err
    assert f"warning: {ct_hu} looks like CT (minimum below -500: Hounsfield units), but its intensities are mapped as MR (the weights' contract); give --modality" in err
    assert json.loads((out / "embed.json").read_text())["preprocess"]["modality"] == "mr"

    # Another mapping into the same folder mixes vectors of different inputs: refused.
    assert run(["embed", str(ct_hu), "--weights", str(mr_weights), "-o", str(out), "--format", "jsonl", "--modality", "ct", "--overwrite"]) == 2
    assert "other preprocessing (spacing, intensity mapping)" in capsys.readouterr().err

    ct_out = tmp_path / "emb_ct"
    assert run(["embed", str(ct_hu), "--weights", str(mr_weights), "--output", str(ct_out), "--format", "jsonl", "--modality", "ct"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert json.loads((ct_out / "embed.json").read_text())["preprocess"]["modality"] == "ct"
    (row,) = [json.loads(line) for line in (ct_out / "embeddings.jsonl").read_text().splitlines()]
    (mr_row,) = [json.loads(line) for line in (out / "embeddings.jsonl").read_text().splitlines()]
    assert row["modality"] == "ct" and mr_row["modality"] == "mr" and row["vector"] != mr_row["vector"]


# --------------------------------------------------------------------------- register


def test_register_reports_its_intensity_mapping_and_warns_quietly(tmp_path, ct_hu, mr_weights, capsys):
    code = run(["register", str(ct_hu), str(ct_hu), "--weights", str(mr_weights), "--output", str(tmp_path / "reg"), "--iters", "0", "--device", "cpu", "--json", "-q"])
    captured = capsys.readouterr()
    assert code == 0
    report = json.loads(captured.out)  # the one JSON document, unchanged by -q
    mapping = report["intensity_mapping"]
    assert mapping["detected"] == {"fixed": "ct", "moving": "ct"}
    assert mapping["optimisation"] == {"fixed": "ct", "moving": "ct"}
    assert mapping["network"] == {"fixed": "mr", "moving": "mr", "from": "the weights' contract", "spacing_mm": 6.0}
    lines = captured.err.strip().splitlines()
    assert len(lines) == 2 and all("warning: " in line and "mapped as MR for the network (the weights' contract)" in line for line in lines)
    assert "fixed image" in lines[0] and "moving image" in lines[1]

    code = run(["register", str(ct_hu), str(ct_hu), "--weights", str(mr_weights), "-o", str(tmp_path / "reg_ct"), "--iters", "0", "--device", "cpu", "--modality", "ct", "--json", "-q"])
    captured = capsys.readouterr()
    assert code == 0 and captured.err == ""
    assert json.loads(captured.out)["intensity_mapping"]["network"] == {"fixed": "ct", "moving": "ct", "from": "--modality", "spacing_mm": 6.0}


# --------------------------------------------------------------------------- option names


def test_every_output_option_takes_both_long_names_and_every_command_has_quiet():
    import typer

    group = typer.main.get_command(app)
    with_output = []
    for name, command in group.commands.items():
        options = {opt for param in command.params for opt in getattr(param, "opts", [])}
        if "-o" in options:
            with_output.append(name)
            assert {"--output", "--out"} <= options, name
        if name not in ("info", "fetch-weights"):
            assert {"-q", "--quiet"} <= options, name
    assert sorted(with_output) == ["apply", "demo", "embed", "finetune", "pretrain", "register", "segment"]


def test_a_glob_inside_a_folder_whose_name_has_brackets(tmp_path):
    # "run [1]" is a character class to glob; the folder exists, so it is meant literally.
    folder = tmp_path / "run [1]" / "vols"
    folder.mkdir(parents=True)
    for name in ("a.nii.gz", "b.nii.gz", "c.txt"):
        (folder / name).write_bytes(b"")
    expanded, skipped = data.expand_inputs([str(folder / "*.nii.gz")])
    assert expanded == [str(folder / "a.nii.gz"), str(folder / "b.nii.gz")] and skipped == []
    expanded, skipped = data.expand_inputs([str(folder / "*.mha")])
    assert expanded == [] and [s.reason for s in skipped] == ["no file matches this pattern"]


def test_info_and_apply_take_folders_globs_and_lists_like_the_other_commands(tmp_path, capsys):
    folder = tmp_path / "scans"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(EXAMPLES / "colin27_t1_2mm.nii.gz", folder / "a.nii.gz")
    shutil.copy(EXAMPLES / "icbm152_t1_2mm.nii.gz", folder / "sub" / "b.nii.gz")
    listing = tmp_path / "list.txt"
    listing.write_text("scans/sub/b.nii.gz\n")  # relative to the list
    for inputs, names in (
        ([str(folder)], ["a.nii.gz", "b.nii.gz"]),
        ([str(folder / "*.nii.gz")], ["a.nii.gz"]),
        ([str(listing), str(folder / "a.nii.gz")], ["b.nii.gz", "a.nii.gz"]),
    ):
        assert run(["info", "--json", *inputs]) == 0
        assert [Path(json.loads(line)["path"]).name for line in capsys.readouterr().out.splitlines()] == names
    # A file given directly keeps the path as written.
    assert run(["info", "--json", str(folder / "sub" / ".." / "a.nii.gz")]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == str(folder / "sub" / ".." / "a.nii.gz")
    # A pattern that matches nothing next to a good volume: reported, the rest described, 7.
    assert run(["info", "--json", str(tmp_path / "*.mha"), str(folder / "a.nii.gz")]) == 7
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 1
    assert captured.err.strip() == f"error: {tmp_path / '*.mha'}: no file matches this pattern"

    transform = tmp_path / "identity.tfm"
    sitk.WriteTransform(sitk.TranslationTransform(3), str(transform))
    reference = EXAMPLES / "colin27_t1_2mm.nii.gz"
    code = run(["apply", str(folder), "-t", str(transform), "-r", str(reference), "-o", str(tmp_path / "out"), "--json", "-q"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0 and sorted(Path(r["output"]).name for r in rows) == ["a_warped.nii.gz", "b_warped.nii.gz"]
    # All or nothing: a glob that matches nothing stops apply before it writes anything.
    code = run(["apply", str(folder / "a.nii.gz"), str(tmp_path / "*.mha"), "-t", str(transform), "-r", str(reference), "-o", str(tmp_path / "out2")])
    assert code == 2 and not (tmp_path / "out2").exists()
    assert capsys.readouterr().err.strip().startswith(f"error: {tmp_path / '*.mha'}: no file matches this pattern")
