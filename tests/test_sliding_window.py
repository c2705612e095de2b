"""Sliding-window inference: known answers for linear predictors, padding, errors."""

import pytest
import torch
import torch.nn.functional as F

from gvsl_cli.errors import ConfigError
from gvsl_cli.sliding_window import gaussian_weights, sliding_window_inference, window_starts


def test_window_starts_cover_and_end_at_the_edge():
    assert window_starts(64, 64, 32) == [0]
    assert window_starts(48, 64, 32) == [0]
    assert window_starts(160, 64, 32) == [0, 32, 64, 96]
    starts = window_starts(176, 64, 48)
    assert starts == [0, 48, 96, 112]
    assert all(s % 16 == 0 for s in starts)


def test_gaussian_weights_peak_in_the_middle_and_symmetric():
    w = gaussian_weights((16, 16, 32))
    assert w.shape == (16, 16, 32)
    assert w.max() == pytest.approx(1.0, abs=1e-2)
    assert torch.allclose(w, w.flip(0)) and torch.allclose(w, w.flip(2))
    assert w[0, 0, 0] < w[8, 8, 16]
    assert w.min() >= 1e-3


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_pointwise_predictor_gives_its_value_everywhere(blend):
    volume = torch.rand(2, 48, 80, 64, generator=torch.Generator().manual_seed(0))
    out = sliding_window_inference(volume, lambda x: {"y": 3 * x[:, :1] - x[:, 1:]}, patch=(32, 32, 32), overlap=0.5, blend={"y": blend})
    assert out["y"].shape == (1, 48, 80, 64)
    torch.testing.assert_close(out["y"], 3 * volume[:1] - volume[1:], rtol=1e-5, atol=1e-5)


def test_coarse_output_lines_up_with_the_whole_volume_pooling():
    volume = torch.rand(1, 64, 96, 48, generator=torch.Generator().manual_seed(1))
    out = sliding_window_inference(volume, lambda x: {"pooled": F.avg_pool3d(x, 16)}, patch=(32, 32, 32), overlap=0.5, batch=3)
    expected = F.avg_pool3d(volume[None], 16)[0]
    assert out["pooled"].shape == expected.shape == (1, 4, 6, 3)
    torch.testing.assert_close(out["pooled"], expected, rtol=1e-5, atol=1e-6)


def test_volume_smaller_than_the_window_is_padded_then_cropped():
    volume = torch.rand(1, 16, 48, 32, generator=torch.Generator().manual_seed(2))
    seen = []

    def predict(x):
        seen.append(tuple(x.shape))
        return {"y": x + 1}

    out = sliding_window_inference(volume, predict, patch=(32, 32, 32), overlap=0.5, pad_value=-5.0)
    assert all(s[2:] == (32, 32, 32) for s in seen)
    torch.testing.assert_close(out["y"], volume + 1)


def test_windows_are_blended_not_overwritten():
    # A predictor that sees only its own window: its output is the window's mean. Constant
    # blending must average the overlapping windows' means, so the result is not any single
    # window's value near the middle of the volume.
    volume = torch.zeros(1, 16, 16, 64)
    volume[..., 32:] = 1.0
    out = sliding_window_inference(volume, lambda x: {"m": x.mean(dim=(2, 3, 4), keepdim=True).expand_as(x).contiguous()}, patch=(16, 16, 32), overlap=0.5, blend={"m": "constant"})["m"]
    # windows start at 0, 16, 32: means 0, 0.5, 1. Voxel 20 is covered by windows 0 and 16.
    assert out[0, 0, 0, 5].item() == pytest.approx(0.0)
    assert out[0, 0, 0, 20].item() == pytest.approx(0.25)
    assert out[0, 0, 0, 40].item() == pytest.approx(0.75)
    assert out[0, 0, 0, 60].item() == pytest.approx(1.0)


def test_progress_is_reported_per_batch():
    calls = []
    sliding_window_inference(torch.zeros(1, 32, 32, 64), lambda x: {"y": x}, patch=(32, 32, 32), overlap=0.5, batch=2, on_window=lambda d, t: calls.append((d, t)))
    assert calls == [(2, 3), (3, 3)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(patch=(30, 32, 32)), "multiples of 16"),
        (dict(patch=(32, 32, 32), overlap=1.0), "overlap"),
        (dict(patch=(32, 32, 32), batch=0), "batch"),
        (dict(patch=(32, 32, 32), blend={"y": "median"}), "blend"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        sliding_window_inference(torch.zeros(1, 32, 32, 32), lambda x: {"y": x}, **kwargs)


def test_volume_sides_must_be_multiples():
    with pytest.raises(ConfigError, match="multiples of 16"):
        sliding_window_inference(torch.zeros(1, 33, 32, 32), lambda x: {"y": x}, patch=(32, 32, 32))
    with pytest.raises(ConfigError, match="does not divide"):
        sliding_window_inference(torch.zeros(1, 32, 32, 32), lambda x: {"y": x[..., :5]}, patch=(32, 32, 32))
