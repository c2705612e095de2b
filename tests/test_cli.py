"""The command line: instant help without torch, version, one-line errors with exit codes."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import SimpleITK as sitk

from gvsl_cli import __version__
from gvsl_cli.cli import run


def test_help_does_not_import_torch():
    code = "import sys\nfrom gvsl_cli.cli import run\ntry:\n    run(['--help'])\nfinally:\n    print('torch' in sys.modules, 'SimpleITK' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False False"


def test_version(capsys):
    assert run(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"gvsl {__version__}"


def test_info_json_on_real_volume(capsys, colin_t1):
    assert run(["info", "--json", str(colin_t1)]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["size"] == [90, 108, 90] and row["spacing"] == [2.0, 2.0, 2.0]
    assert row["modality"] == "mr"
    assert row["orientation"] == "RAS" and row["oblique"] is False


def test_info_says_when_a_grid_is_oblique(capsys, tmp_path, colin_t1):
    image = sitk.ReadImage(str(colin_t1))
    image.SetDirection(sitk.VersorTransform((1.0, 1.0, 1.0), math.radians(25)).GetMatrix())
    sitk.WriteImage(image, str(tmp_path / "oblique.nii.gz"))
    assert run(["info", "--json", str(tmp_path / "oblique.nii.gz")]) == 0
    assert json.loads(capsys.readouterr().out)["oblique"] is True
    assert run(["info", str(tmp_path / "oblique.nii.gz"), str(colin_t1)]) == 0
    table = capsys.readouterr().out
    assert table.count("(oblique)") == 1


def test_file_names_with_brackets_print_as_they_are_in_tables(capsys, tmp_path, colin_t1):
    # rich markup: "[ct]" and "[red]" were dropped from names, and "[/b]" (a closing tag
    # with nothing open) stopped the command with an internal error.
    import shutil

    names = ["patient [ct].nii.gz", "[red]x.nii.gz", "v[/b]/x.nii.gz"]
    (tmp_path / "v[" / "b]").mkdir(parents=True)
    for name in names:
        shutil.copy(colin_t1, tmp_path / name)
    assert run(["info", *(str(tmp_path / name) for name in names)]) == 0
    table = capsys.readouterr().out
    assert all(name in table for name in names), table


def test_info_describes_vector_outputs_such_as_displacement_fields(capsys, tmp_path, colin_t1):
    """gvsl's own vector outputs (a displacement field, probability and feature maps) are
    described: their grid is what one checks when a field "does not line up"."""
    reference = sitk.ReadImage(str(colin_t1))
    field = sitk.Compose(*[sitk.Cast(reference, sitk.sitkFloat32) * 0.0 + value for value in (-1.5, 0.0, 2.5)])
    field.CopyInformation(reference)
    values = sitk.GetArrayFromImage(field)
    values[3, 4, 5, 1] = np.nan
    broken = sitk.GetImageFromArray(values, isVector=True)
    broken.CopyInformation(reference)
    sitk.WriteImage(broken, str(tmp_path / "displacement.mha"))  # NIfTI would read NaN back as 0
    assert run(["info", "--json", str(tmp_path / "displacement.mha"), str(colin_t1)]) == 0
    field_row, image_row = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert field_row["components"] == 3 and field_row["size"] == [90, 108, 90] and field_row["modality"] == "n/a"
    assert (field_row["min"], field_row["max"], field_row["nonfinite_voxels"]) == (-1.5, 2.5, 1)
    assert image_row["components"] == 1 and image_row["modality"] == "mr"
    assert run(["info", str(tmp_path / "displacement.mha")]) == 0
    assert "3-vector" in capsys.readouterr().out


def test_bad_input_is_one_line_error_with_exit_code(capsys, tmp_path):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not an image")
    code = run(["info", str(broken)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "broken.nii.gz" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_debug_shows_the_exception(tmp_path):
    import pytest

    from gvsl_cli.errors import InputError

    with pytest.raises(InputError):
        run(["--debug", "info", str(tmp_path / "missing.nii.gz")])


def test_console_script_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "gvsl_cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"gvsl {__version__}"


def test_closed_stdout_or_stderr_is_not_an_error(tmp_path, colin_t1):
    # `>&-` / `2>&-`: Python has no sys.stdout/sys.stderr then; the command still succeeds.
    def shell(redirect: str, *args: str) -> subprocess.CompletedProcess:
        script = f'"$0" -m gvsl_cli "$@" {redirect}'
        return subprocess.run(["sh", "-c", script, sys.executable, *args], capture_output=True, text=True)

    assert shell(">&-", "info", "--json", str(colin_t1)).returncode == 0
    closed_err = shell("2>&-", "info", str(colin_t1))
    assert closed_err.returncode == 0 and "colin27_t1_2mm" in closed_err.stdout
    assert shell("2>&-", "info", str(tmp_path / "missing.nii.gz")).returncode == 2  # failures still tell


def test_folder_without_dicom_is_one_line_without_itk_warnings(capfd, tmp_path, colin_t1):
    empty = tmp_path / "empty"
    empty.mkdir()
    code = run(["register", str(empty), str(colin_t1), "-o", str(tmp_path / "out")])  # read as a DICOM series
    err = capfd.readouterr().err.strip()
    assert code == 2
    assert err.splitlines() == [err] and err.startswith("error: ") and "no DICOM series" in err
    assert run(["info", str(empty)]) == 2  # searched for volumes first
    assert capfd.readouterr().err.strip() == f"error: {empty}: folder holds no NIfTI, NRRD, MHA/MHD file or DICOM series"


def test_file_system_errors_are_one_line_user_errors(capsys, monkeypatch, colin_t1):
    import errno

    from gvsl_cli.commands import info

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out.nii.gz")

    monkeypatch.setattr(info, "describe_volume", full_disk)
    code = run(["info", str(colin_t1)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == "error: /data/out.nii.gz: No space left on device (hint: check the path, its permissions and the free disk space)"


def test_ctrl_c_and_eof_errors_are_reported_not_swallowed(capsys, monkeypatch, colin_t1):
    # Typer turns KeyboardInterrupt into a silent exit 130 and EOFError (e.g. np.load of a
    # truncated file) into a bare "Aborted."; both must reach gvsl's own handling.
    from gvsl_cli.commands import info

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    def truncated(*args, **kwargs):
        raise EOFError("Ran out of input")

    monkeypatch.setattr(info, "describe_volume", interrupted)
    assert run(["info", str(colin_t1)]) == 130
    assert capsys.readouterr().err.strip() == "aborted"
    monkeypatch.setattr(info, "describe_volume", truncated)
    assert run(["info", str(colin_t1)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("internal error: EOFError: Ran out of input") and len(err.splitlines()) == 1


def _nan_volume(tmp_path, colin_t1):
    import numpy as np
    import SimpleITK as sitk

    image = sitk.ReadImage(str(colin_t1), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    array[5, 6, 7] = np.nan
    nan = sitk.GetImageFromArray(array)
    nan.CopyInformation(image)
    path = tmp_path / "with_nan.mha"
    sitk.WriteImage(nan, str(path))
    return path


import pytest  # noqa: E402 - the tests above import it locally


@pytest.mark.parametrize("spacing", ["0", "-1", "nan", "inf"])
def test_info_spacing_must_be_a_finite_positive_number(capsys, colin_t1, spacing):
    code = run(["info", "--json", "--spacing", spacing, str(colin_t1)])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.strip().splitlines() == [captured.err.strip()]
    assert captured.err.startswith("error: spacing must be a finite number > 0 mm")


def test_info_describes_a_nan_volume_and_lists_the_others_past_a_bad_path(capsys, tmp_path, colin_t1):
    nan = _nan_volume(tmp_path, colin_t1)
    code = run(["info", "--json", str(nan), str(tmp_path / "missing.nii.gz"), str(colin_t1)])
    captured = capsys.readouterr()
    assert code == 7  # some of several inputs failed, the others were described (conventions.md)
    rows = [json.loads(line) for line in captured.out.strip().splitlines()]
    assert [row["path"] for row in rows] == [str(nan), str(colin_t1)]
    assert rows[0]["nonfinite_voxels"] == 1 and rows[0]["max"] == 248.0 and rows[0]["modality"] == "mr"
    assert rows[1]["nonfinite_voxels"] == 0
    assert captured.err.strip().splitlines() == [f"error: {tmp_path / 'missing.nii.gz'}: no such file or folder"]
    # The table says so in words; other commands still refuse the volume.
    assert run(["info", str(tmp_path / "missing.nii.gz"), str(tmp_path / "missing2.nii.gz")]) == 2  # all failed: the failure's code
    capsys.readouterr()
    assert run(["info", str(nan)]) == 0
    assert "1 of 874800 voxels are NaN or infinite" in capsys.readouterr().out
    assert run(["register", str(nan), str(colin_t1), "-o", str(tmp_path / "out")]) == 2
    assert "NaN or infinite" in capsys.readouterr().err


def test_info_table_keeps_long_values_off_a_terminal(capsys, tmp_path, colin_t1):
    long_name = tmp_path / ("a_rather_long_file_name_that_does_not_fit_in_eighty_columns_" + colin_t1.name)
    long_name.write_bytes(colin_t1.read_bytes())
    assert run(["info", str(long_name), "--spacing", "0.25"]) == 0
    out = capsys.readouterr().out  # captured: not a terminal, as in a pipe or a CI log
    assert long_name.name in out and "720×864×720" in out and "…" not in out


def test_one_of_several_processes_leaves_without_interpreter_teardown(monkeypatch, capsys):
    # torchrun / srun processes skip the C++ destructors that once aborted a finished run.
    import os

    import pytest

    from gvsl_cli import cli

    left = []

    def record_exit(code):
        left.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", record_exit)
    monkeypatch.setattr(sys, "argv", ["gvsl", "--version"])
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        cli.main()
    assert left == [0]
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SystemExit):
        cli.main()
    assert left == [0]  # a single process exits normally


def test_tables_are_not_cut_off_a_terminal(capsys):
    # Pipes, files and CI/SLURM logs: rich would assume 80 columns and end values with "…".
    from rich.table import Table

    from gvsl_cli.commands.output import table_console

    long_path = "/data/" + "very_long_folder_name/" * 8 + "scan.nii.gz"
    table = Table("file", "sha256")
    table.add_row(long_path, "ab" * 32)
    table_console().print(table)
    out = capsys.readouterr().out
    assert long_path in out and "ab" * 32 in out and "…" not in out


def test_sigterm_aborts_any_command_with_143_and_cleans_up_like_ctrl_c(tmp_path, capsys, monkeypatch, colin_t1):
    # kill / SLURM's time limit: the same clean-up as Ctrl-C (atomic writes drop their
    # temporary file), one line, and the exit code a shell reports for SIGTERM.
    import os
    import signal

    import SimpleITK as sitk

    from gvsl_cli import io

    real_write = sitk.WriteImage

    def killed_while_writing(image, name, *args):
        real_write(image, name, *args)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(sitk, "WriteImage", killed_while_writing)
    image = io.read_volume(colin_t1)
    from gvsl_cli.commands import info

    monkeypatch.setattr(info, "describe_volume", lambda *args, **kwargs: io.write_volume(image, tmp_path / "out.nii.gz"))
    before = signal.getsignal(signal.SIGTERM)
    assert run(["info", str(colin_t1)]) == 143
    assert capsys.readouterr().err.strip() == "aborted (SIGTERM)"
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone, no output under its name
    assert signal.getsignal(signal.SIGTERM) is before  # run() leaves the handler as it found it


def test_usage_errors_are_one_line_with_the_commands_help_as_hint(capsys):
    assert run(["embed", "x.nii.gz", "--modalty", "ct"]) == 2
    assert capsys.readouterr().err.strip() == "error: No such option: --modalty (Possible options: --modality) (hint: gvsl embed --help)"
    assert run(["info", "--spacing", "abc", "x.nii.gz"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: Invalid value for '--spacing'") and err[0].endswith("(hint: gvsl info --help)")
    assert run(["nosuchcommand"]) == 2
    assert capsys.readouterr().err.strip() == "error: No such command 'nosuchcommand'. (hint: gvsl --help)"
    # Help and --version still print and succeed.
    assert run(["register", "--help"]) == 0 and "Usage: gvsl register" in capsys.readouterr().out
    assert run(["--version"]) == 0 and capsys.readouterr().out.startswith("gvsl ")


def test_help_labels_values_plainly_and_flags_not_at_all(capsys, monkeypatch):
    # Typer 0.29 would print "--json <bool>" (as if the flag took a value) and "<int range>".
    monkeypatch.setenv("COLUMNS", "200")
    assert run(["register", "--help"]) == 0
    rows = {line.split()[1]: line for line in capsys.readouterr().out.splitlines() if line.startswith("│ --")}
    assert "<" not in "".join(rows.values())
    assert rows["--iters"].split()[2:4] == ["INTEGER", "[x>=0]"]
    assert rows["--spacing"].split()[2] == "FLOAT" and rows["--moving-labels"].split()[2] == "PATH"
    assert rows["--json"].split()[2] == "Print"  # no label between the flag and its help
    assert rows["--help"].split()[3] == "Show"  # after "-h"
    assert run(["apply", "--help"]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("│")]
    assert ["│", "images...", "PATH..."] in [words[:3] for words in lines]  # was <list[Path]>
    assert ["--transform", "-t", "PATH"] in [words[2:5] for words in lines]  # was Path


def test_info_table_tells_same_named_files_apart(capsys, tmp_path, colin_t1, monkeypatch):
    for patient in ("p01", "p02"):
        (tmp_path / patient).mkdir()
        (tmp_path / patient / "image.nii.gz").write_bytes(colin_t1.read_bytes())
    monkeypatch.chdir(tmp_path)
    assert run(["info", "p01/image.nii.gz", str(tmp_path / "p02")]) == 0  # relative and absolute
    out = capsys.readouterr().out
    assert "p01/image.nii.gz" in out and "p02/image.nii.gz" in out


def test_a_lost_peer_under_torchrun_is_a_training_error_not_a_bug_report(monkeypatch):
    from gvsl_cli.cli import _as_gvsl_error
    from gvsl_cli.errors import TrainingError

    gone = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:52643: Connection reset by peer. This is typically caused by a remote worker hanging")
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    error = _as_gvsl_error(gone)
    assert isinstance(error, TrainingError) and error.exit_code == 6
    assert str(error) == "another process of this distributed job stopped, so this one cannot go on (Read error [127.0.0.1]:52643: Connection reset by peer. This is typically caused by a remote worker hanging)"
    assert "--resume" in error.hint
    # Alone, the same text is no lost peer: it stays an internal error (a bug to report).
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert _as_gvsl_error(gone) is None


def test_cpu_allocator_failures_are_the_out_of_memory_line():
    from gvsl_cli.cli import _as_gvsl_error
    from gvsl_cli.errors import DeviceError, is_out_of_memory

    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to allocate 4000000000000000 bytes. Error code 12 (Cannot allocate memory)")
    mapped = _as_gvsl_error(cpu, "pretrain")
    assert isinstance(mapped, DeviceError) and str(mapped) == "the CPU ran out of memory (host RAM)" and "--width" in mapped.hint
    # Each command's hint names its own options: register has no --patch or --width.
    assert _as_gvsl_error(cpu, "register").hint == "use a coarser --spacing, or run where more memory is free"
    assert isinstance(_as_gvsl_error(MemoryError()), DeviceError)
    assert str(_as_gvsl_error(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))) == "the device ran out of memory"
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


@pytest.mark.parametrize("name", ["-q", "--quiet", "--probabilities", "--help"])
def test_output_folder_that_is_an_option_name_is_refused(name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run(["segment", "x.nii.gz", "--model", "m.pt", "-o", name]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: -o {name}: -o needs a folder name, and {name} is an option of this command") and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
