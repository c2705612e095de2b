"""Temporaries of killed writers: removed by a later run, those of live writers kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gvsl_cli.temporaries import ABANDONED_AFTER_S, remove_abandoned

pytestmark = pytest.mark.skipif(os.name != "posix", reason="flock: nothing is locked or removed on Windows")

#: A writer inside ``atomic_path`` that has written part of its file, then waits.
WRITER = """
import sys, time
from gvsl_cli.io import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"partial")
    print(tmp, flush=True)
    time.sleep(60)
"""


def _start_writer(output: Path) -> tuple[subprocess.Popen, Path]:
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(output)], stdout=subprocess.PIPE, text=True)
    temporary = Path(writer.stdout.readline().strip())
    assert temporary.read_bytes() == b"partial" and temporary.name.startswith(f".{output.name}.")
    return writer, temporary


def _age(path: Path, seconds: float = 2 * ABANDONED_AFTER_S) -> None:
    """Make ``path`` look unchanged for ``seconds``."""
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_the_temporary_of_a_killed_writer_is_removed_and_a_live_ones_kept(tmp_path):
    output = tmp_path / "scan [ct]_features.nii.gz"  # brackets: no glob pattern in the way
    writer, temporary = _start_writer(output)
    _age(temporary)  # the lock alone must keep it
    try:
        assert remove_abandoned([output]) == [] and temporary.exists()  # being written
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
        assert temporary.exists()  # nothing could remove it
        _age(temporary, 10.0)
        assert remove_abandoned([output]) == [] and temporary.exists()  # changed lately: kept
        _age(temporary)
        assert remove_abandoned([output]) == [temporary] and not temporary.exists()
    finally:
        writer.kill()
        writer.wait()


def test_only_temporaries_of_the_given_outputs_are_touched(tmp_path):
    ours = tmp_path / "a.nii.gz"
    left = [tmp_path / ".a.nii.gz.k2j4x9q1.tmp.nii.gz", tmp_path / ".b.nii.gz.k2j4x9q1.tmp.nii.gz", tmp_path / ".gvsl-abcdefgh.tmp.nii.gz", tmp_path / ".a.nii.gz"]
    register_staging = tmp_path / ".gvsl-register-ab12cd34.tmp"  # another command's, unlocked
    register_staging.mkdir()
    for path in left:
        path.write_bytes(b"x")
        _age(path)
    (tmp_path / ".gvsl-apply.zz1y2x3w.tmp").mkdir()
    (tmp_path / ".gvsl-apply.zz1y2x3w.tmp" / "warped.nii.gz").write_bytes(b"x")
    for path in (tmp_path / ".gvsl-apply.zz1y2x3w.tmp" / "warped.nii.gz", tmp_path / ".gvsl-apply.zz1y2x3w.tmp", register_staging):
        _age(path)
    removed = remove_abandoned([ours], prefixes=(".gvsl-apply.",))
    assert sorted(p.name for p in removed) == [".a.nii.gz.k2j4x9q1.tmp.nii.gz", ".gvsl-abcdefgh.tmp.nii.gz", ".gvsl-apply.zz1y2x3w.tmp"]
    assert (tmp_path / ".b.nii.gz.k2j4x9q1.tmp.nii.gz").exists() and (tmp_path / ".a.nii.gz").exists() and register_staging.exists()
    assert remove_abandoned([tmp_path / "missing" / "c.nii.gz"]) == []  # a folder not made yet


def test_a_rerun_of_segment_removes_what_a_killed_run_left(tmp_path):
    # gvsl segment killed by SIGKILL while writing its probabilities: the hidden partial map
    # (GBs for a big CT) stayed after every later run.
    from gvsl_cli.cli import run
    from test_segment import EXAMPLES, _segmentation_checkpoint

    model = _segmentation_checkpoint(tmp_path / "model" / "best.pt")
    out = tmp_path / "out"
    out.mkdir()
    killed = out / ".colin_probabilities.nii.gz.a1b2c3d4.tmp.nii.gz"
    killed.write_bytes(b"\x1f\x8b partial")
    _age(killed)
    image = EXAMPLES / "colin27_t1_2mm.nii.gz"
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "colin.nii.gz").write_bytes(image.read_bytes())
    assert run(["segment", str(tmp_path / "in" / "colin.nii.gz"), "--model", str(model), "-o", str(out), "--overlap", "0", "--probabilities", "-q"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["colin.nii.gz", "colin_probabilities.nii.gz", "segment.json"]


def test_writes_go_on_where_the_file_system_has_no_flock(tmp_path, monkeypatch):
    # Lustre mounted without "flock" answers ENOSYS: outputs must still be written.
    import errno

    from gvsl_cli import temporaries
    from gvsl_cli.io import atomic_path

    def no_flock(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(temporaries.fcntl, "flock", no_flock)
    with atomic_path(tmp_path / "out.npy") as tmp:
        tmp.write_bytes(b"data")
    assert (tmp_path / "out.npy").read_bytes() == b"data"
    left = tmp_path / ".x.nii.gz.abcdefgh.tmp.nii.gz"
    left.write_bytes(b"x")
    _age(left)
    assert remove_abandoned([tmp_path / "x.nii.gz"]) == [] and left.exists()  # cannot tell: kept
