"""Frozen dataclasses holding every default of the engine.

Commands build one of these from their options and pass it down; nothing in the engine
reads module-level mutable settings. ``to_dict``/``from_dict`` give the plain form that
checkpoints store, so a model and its preprocessing can be rebuilt from the file alone.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from gvsl_cli.errors import ConfigError


def check_spacing(spacing: float) -> None:
    """Raise ConfigError unless ``spacing`` (mm) is a finite number > 0 (inf passes a plain
    ``> 0`` test and then gives NaN transforms and grids)."""
    if not (math.isfinite(spacing) and spacing > 0):
        raise ConfigError(f"spacing must be a finite number > 0 mm, got {spacing:g}", hint="give --spacing in mm, e.g. 1")

Modality = Literal["ct", "mr", "auto"]


def _from_dict(cls, data: dict[str, Any]):
    """Build dataclass ``cls`` from ``data``, ignoring unknown keys, naming bad ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in names}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"cannot build {cls.__name__} from {data!r}: {exc}") from None


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the GVSL network.

    Attributes:
        width: channels of the first U-Net level; levels have width·(1, 2, 4, 8, 16).
            32 reproduces the paper's (and the official checkpoint's) network; 8 or 16 make
            small models for CPUs and tests.
        in_channels: image channels (1 for CT/MR).
        head_channels: channels inside the deformable and restoration heads (16 in the paper).
    """

    width: int = 32
    in_channels: int = 1
    head_channels: int = 16

    def __post_init__(self) -> None:
        if self.width < 8 or self.width % 8:
            raise ConfigError(f"width must be a positive multiple of 8 (GroupNorm uses C/8 groups), got {self.width}")
        if self.head_channels < 4 or self.head_channels % 4:
            raise ConfigError(f"head_channels must be a positive multiple of 4, got {self.head_channels}")
        if self.in_channels < 1:
            raise ConfigError(f"in_channels must be >= 1, got {self.in_channels}")

    @property
    def level_channels(self) -> tuple[int, int, int, int, int]:
        """Channels of the five encoder levels, finest first (32-64-128-256-512 by default)."""
        w = self.width
        return (w, 2 * w, 4 * w, 8 * w, 16 * w)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return _from_dict(cls, data)


@dataclass(frozen=True)
class PreprocessConfig:
    """The preprocessing contract: what a volume goes through before the network sees it.

    Attributes:
        spacing: target isotropic voxel size in mm (the paper resamples to 1 mm).
        modality: "ct" maps Hounsfield units as clip(HU + 1024, 0, 2048) / 2048;
            "mr" maps the robust range [p_low, p_high] percentiles to [0, 1];
            "auto" decides per volume from its intensities (see ``preprocess.detect_modality``).
        mr_percentiles: (low, high) percentiles for the MR mapping, in percent.
        multiple: volumes are padded so every side is a multiple of this (the U-Net halves
            the grid four times, so 16).
    """

    spacing: float = 1.0
    modality: Modality = "auto"
    mr_percentiles: tuple[float, float] = (0.5, 99.5)
    multiple: int = 16

    def __post_init__(self) -> None:
        check_spacing(self.spacing)
        if self.modality not in ("ct", "mr", "auto"):
            raise ConfigError(f"modality must be one of ct, mr, auto; got {self.modality!r}")
        low, high = self.mr_percentiles
        if not 0 <= low < high <= 100:
            raise ConfigError(f"mr_percentiles must satisfy 0 <= low < high <= 100, got {self.mr_percentiles}")
        if self.multiple < 1:
            raise ConfigError(f"multiple must be >= 1, got {self.multiple}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PreprocessConfig":
        return _from_dict(cls, data)
