"""``segment.json``: what made the label maps in a ``gvsl segment`` output folder.

``gvsl segment`` skips inputs whose outputs exist, so that a stopped run resumes. Without a
record, a rerun with another model (after retraining), another ensemble or another
``--overlap`` would skip every case and keep the earlier model's label maps with exit 0.
The record names what decides the label maps' values: the models (their paths and a
checksum of their weights, ``checkpoint.state_checksum``), their labels and preprocessing
contract, the sliding-window overlap and the precision. A run whose settings differ from a
folder's record is refused in one line (as ``gvsl embed`` refuses a folder of other
weights); ``--overwrite`` replaces the outputs instead.

Not compared (the label maps do not depend on them): the model's path (a moved run folder
is the same model), the order of an ensemble's models, ``--batch``, the device, the gvsl
version (recorded), and ``--probabilities``: adding it to a folder made without it writes
the missing probability maps next to still valid label maps; leaving it out keeps the
earlier probability maps, which the same models made.

Replacing: while an ``--overwrite`` run replaces outputs made with other settings (or
found without a record), the record carries ``"replacing"``. A run stopped midway leaves
the marker, and a later run without ``--overwrite`` is refused rather than taking the
earlier model's label maps as done; the marker goes when a run has replaced every output
in the folder.

Inputs: ``"inputs"`` maps each label map written (its path below the folder) to the
input it was made from (absolute path and content sha256). Two inputs of one name given
in separate calls (``for f in p*/image.nii.gz; do gvsl segment $f -o out; done``) map to
the same output; without the index, the second would pass for done whenever its grid
equals the first's. An existing output counts as this input's when the recorded path is
this input's with the same file stamp (size, times, inode), or when the content is the same (a
moved input folder; the entry is then rewritten with the input's new path and stamp). An
input changed at the same path fails, as one of another name does.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from gvsl_cli.errors import InputError

RUN_FILE = "segment.json"
OUTPUT_SUFFIX = ".nii.gz"


def run_description(segmenters: Sequence, *, overlap: float, autocast_dtype, probabilities: bool) -> dict:
    """What ``segment.json`` records for a run with ``segmenters`` (``segmentation.Segmenter``);
    ``autocast_dtype``: None (fp32), torch.bfloat16 or torch.float16."""
    import torch

    from gvsl_cli import __version__

    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[autocast_dtype]
    first = segmenters[0]
    return {
        "gvsl_version": __version__,
        "models": [{"model": s.source if "://" in s.source else os.path.abspath(s.source), "weights_checksum": s.checksum} for s in segmenters],
        "labels": dict(zip(first.label_names, first.label_values)),
        "preprocess": first.preprocess.to_dict(),
        "overlap": overlap,
        "precision": precision,
        "probabilities": probabilities,
    }


def _checksums(description: dict) -> list[str]:
    """The models' weights checksums, sorted: an ensemble's order does not change its average."""
    return sorted(str(m.get("weights_checksum")) for m in description.get("models") or [] if isinstance(m, dict))


#: What must agree for a run to add to a folder, and the words a refusal uses.
_MUST_AGREE = {
    "models": (_checksums, "models (weights checksums {stored} here, {given} given)"),
    "labels": (lambda d: d.get("labels"), "labels ({stored} here, {given} given)"),
    "preprocess": (lambda d: d.get("preprocess"), "preprocessing contract (spacing, intensity mapping)"),
    "overlap": (lambda d: d.get("overlap"), "--overlap ({stored} here, {given} given)"),
    "precision": (lambda d: d.get("precision"), "precision ({stored} here, {given} given; give --precision)"),
}


def output_files(out_dir: Path) -> list[Path]:
    """The label and probability maps in ``out_dir`` and its sub-folders (hidden temporary
    files and folders left out)."""
    found = []
    for root, dirs, files in os.walk(out_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(Path(root) / f for f in files if f.endswith(OUTPUT_SUFFIX) and not f.startswith("."))
    return found


def _holds_outputs(out_dir: Path) -> bool:
    for root, dirs, files in os.walk(out_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if any(f.endswith(OUTPUT_SUFFIX) and not f.startswith(".") for f in files):
            return True
    return False


def write_record(out_dir: Path, description: dict) -> None:
    from gvsl_cli.io import atomic_path

    with atomic_path(out_dir / RUN_FILE) as tmp:
        tmp.write_text(json.dumps(description, indent=2) + "\n")


def _stamp(source: Path) -> list | None:
    """``data.content_stamp`` of ``source``, or None when it cannot be examined."""
    from gvsl_cli.data import content_stamp

    try:
        return content_stamp(Path(source))
    except OSError:
        return None


def _index_key(out_dir: Path, output: Path) -> str:
    return Path(os.path.abspath(output)).relative_to(Path(os.path.abspath(out_dir))).as_posix()


@dataclass
class OutputRecord:
    """What a run does with ``segment.json``.

    Attributes:
        description: the record this run's outputs belong to.
        write_first: write ``description`` (with the ``replacing`` marker when replacing)
            before the first output, so a run that writes nothing leaves no claim.
        replacing: this ``--overwrite`` run replaces outputs made with other (or unknown)
            settings: a failed input's earlier outputs are removed, not left as this run's.
    """

    out_dir: Path
    description: dict
    write_first: bool
    replacing: bool = False
    replaced_from: dict | None = None
    #: output path below ``out_dir`` (posix) -> {"input": absolute path, "sha256": content}
    inputs: dict = field(default_factory=dict)
    _marked: bool = field(default=False, repr=False)

    def _write(self) -> None:
        marker = {"replacing": {"earlier": self.replaced_from}} if self._marked else {}
        write_record(self.out_dir, {**self.description, **marker, "inputs": self.inputs})

    def before_first_output(self) -> None:
        if not self.write_first:
            return
        self._marked = self.replacing
        self._write()
        self.write_first = False

    def output_written(self, output: Path, source: Path) -> None:
        """Index ``output`` as made from ``source`` (the record is rewritten: a few ms).

        Raises:
            OSError: the record cannot be written (a full disk).
        """
        from gvsl_cli.data import content_sha256

        self.inputs[_index_key(self.out_dir, output)] = {"input": os.path.abspath(source), "sha256": content_sha256(source), "stamp": _stamp(source)}
        self._write()

    def made_from_another_input(self, output: Path, source: Path) -> str | None:
        """The input that made ``output`` when it is not ``source``; '' when it is ``source``;
        None when the index does not know (outputs of gvsl versions before the index).

        An entry that matches by content only (a moved input folder, or the same bytes
        written again) is brought up to date, the record rewritten atomically: the index
        names the input where it is now, and the next run knows it by its stamp without
        reading it. (When the record cannot be written, a full disk, it keeps the old path:
        the output is this input's all the same.)
        """
        from gvsl_cli.data import content_sha256

        key = _index_key(self.out_dir, output)
        entry = self.inputs.get(key)
        if not isinstance(entry, dict) or "input" not in entry:
            return None
        same_path = entry["input"] == os.path.abspath(source)
        stamp = _stamp(source)
        if same_path and entry.get("stamp") == stamp:
            return ""  # unchanged since: no need to read it
        try:
            same_content = entry.get("sha256") == content_sha256(source)
        except OSError:
            same_content = False
        if same_content:
            self.inputs[key] = {**entry, "input": os.path.abspath(source), "stamp": stamp}
            if not self.write_first:  # else the first output writes it, with the new settings
                try:
                    self._write()
                except OSError:
                    pass  # a full disk: the stale path stays on disk (as before); the outputs are still this input's
            return ""
        return f"an earlier version of {source}" if same_path else str(entry["input"])

    def finish(self, written: Sequence[Path]) -> str | None:
        """After a run that returned: drop the ``replacing`` marker when every output in
        the folder is one this run wrote; else keep it and return a warning."""
        if not self._marked:
            return None
        mine = {Path(os.path.abspath(p)) for p in written}
        others = sorted(p for p in output_files(self.out_dir) if Path(os.path.abspath(p)) not in mine)
        if others:
            return (
                f"{self.out_dir} still holds {len(others)} file(s) made with other settings that this --overwrite run did not replace "
                f"(e.g. {others[0]}); segment those inputs too with --overwrite, or remove them"
            )
        self._marked = False
        self._write()
        return None


def check_output_folder(out_dir: Path, description: dict, targets: Sequence[Path], *, overwrite: bool) -> OutputRecord:
    """How this run may use ``out_dir`` (see the module docstring), before any work.

    Args:
        targets: every output this run may write (label maps and probability maps).

    Raises:
        InputError: the folder holds outputs of other settings, outputs without a record,
            or the leftovers of an unfinished ``--overwrite``, and ``overwrite`` is off; or
            an unreadable record.
    """
    hint = "give --overwrite to replace them, or choose another -o folder"
    record = out_dir / RUN_FILE
    stored = None
    if record.exists():
        try:
            stored = json.loads(record.read_text())
            if not isinstance(stored, dict):
                raise ValueError
        except (OSError, ValueError):
            raise InputError(f"{record}: not a readable gvsl segment record", hint="choose another -o folder, or remove that file") from None
        inputs = stored.pop("inputs", None)
        inputs = inputs if isinstance(inputs, dict) else {}
    given = json.loads(json.dumps(description))  # tuples as lists, as stored
    if stored is None:
        existing = [t for t in targets if t.exists()]
        if existing and not overwrite:
            raise InputError(f"{out_dir} holds label maps without a {RUN_FILE} (e.g. {existing[0]}): which model made them is unknown", hint=hint)
        return OutputRecord(out_dir, given, write_first=True, replacing=overwrite and _holds_outputs(out_dir))
    if not _holds_outputs(out_dir):
        return OutputRecord(out_dir, given, write_first=True)
    if stored.get("replacing") and not overwrite:
        raise InputError(
            f"{out_dir} may hold label maps of two settings: an --overwrite run with other settings did not replace them all (see {RUN_FILE})",
            hint="rerun it with --overwrite, or choose another -o folder",
        )
    differing = [words.format(stored=key(stored), given=key(given)) for key, words in _MUST_AGREE.values() if key(stored) != key(given)]
    if differing and not overwrite:
        raise InputError(f"{out_dir} holds label maps made with other {'; other '.join(differing)} (see {RUN_FILE})", hint=hint)
    if differing or stored.get("replacing"):
        marker = stored.get("replacing")
        earlier = (marker.get("earlier") if isinstance(marker, dict) else None) if marker else {k: v for k, v in stored.items() if k != "replacing"}
        return OutputRecord(out_dir, given, write_first=True, replacing=True, replaced_from=earlier, inputs=inputs)
    if given["probabilities"] and not stored.get("probabilities"):
        return OutputRecord(out_dir, {**stored, "probabilities": True}, write_first=True, inputs=inputs)  # probability maps join the label maps
    return OutputRecord(out_dir, stored, write_first=False, inputs=inputs)
