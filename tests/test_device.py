"""Device and precision choices."""

from __future__ import annotations

import pytest
import torch

from gvsl_cli.device import resolve_device, resolve_precision
from gvsl_cli.errors import ConfigError, DeviceError


def test_cpu_and_auto():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(DeviceError, match="no CUDA GPU is available"):
        resolve_device("cuda")


def test_unknown_device_and_precision():
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("tpu9")
    with pytest.raises(ConfigError, match="precision must be one of"):
        resolve_precision("int4", torch.device("cpu"))


def test_precision_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) is None
    assert resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", cpu)
