"""Shared fixtures: small real volumes shipped with the package, seeded generators."""

from __future__ import annotations

from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "gvsl_cli" / "examples"


@pytest.fixture
def colin_t1() -> Path:
    return EXAMPLES / "colin27_t1_2mm.nii.gz"


@pytest.fixture
def colin_labels() -> Path:
    return EXAMPLES / "colin27_tissue_2mm.nii.gz"


@pytest.fixture
def icbm_t1() -> Path:
    return EXAMPLES / "icbm152_t1_2mm.nii.gz"


@pytest.fixture
def icbm_labels() -> Path:
    return EXAMPLES / "icbm152_tissue_2mm.nii.gz"


@pytest.fixture(autouse=True)
def _few_threads():
    import torch

    torch.set_num_threads(2)
    yield


@pytest.fixture
def generator():
    import torch

    return torch.Generator().manual_seed(0)


@pytest.fixture
def broken_compiler(monkeypatch):
    """``torch.compile`` as on a machine without a working inductor: the compiled module
    raises "no C compiler found" when called."""
    import torch

    class BrokenCompiler(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args):
            raise RuntimeError("no C compiler found")

    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: BrokenCompiler(module))


@pytest.fixture
def restore_locale():
    """Put the process's LC_CTYPE back after a test that writes DICOM.

    GDCM's DICOM writer switches it to "C" (ASCII). Code that later opens text files in the
    locale's encoding (torch's inductor reads its kernel templates so) would fail in the
    tests that follow. gvsl itself only reads DICOM, which leaves the locale alone, and
    names the encoding of every text file it opens.
    """
    import locale

    saved = locale.setlocale(locale.LC_CTYPE)
    yield
    locale.setlocale(locale.LC_CTYPE, saved)
