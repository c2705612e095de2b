"""Image grids in physical space: the numbers that place voxels in the patient (NumPy only).

ITK conventions throughout: physical points are (x, y, z) in mm in LPS; an index is
(i, j, k) along (x, y, z); ``point = origin + direction @ (spacing * index)``.
NumPy arrays from SimpleITK are indexed (z, y, x); torch tensors (B, C, D, H, W) with D = z.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Geometry:
    """The grid of a 3D image.

    Attributes:
        size: voxels along (x, y, z).
        spacing: mm per voxel along (x, y, z).
        origin: physical position (mm, LPS) of the centre of voxel (0, 0, 0).
        direction: 3x3 row-major direction cosines; column c is the physical direction of
            index axis c.
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image) -> "Geometry":
        """Geometry of a 3D SimpleITK image."""
        return cls(
            size=tuple(int(s) for s in image.GetSize()),
            spacing=tuple(float(s) for s in image.GetSpacing()),
            origin=tuple(float(o) for o in image.GetOrigin()),
            direction=tuple(float(d) for d in image.GetDirection()),
        )

    def apply_to(self, image) -> None:
        """Copy spacing, origin and direction onto a SimpleITK image of the same size."""
        if tuple(image.GetSize()) != self.size:
            raise ValueError(f"image size {image.GetSize()} differs from geometry size {self.size}")
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)

    @property
    def direction_matrix(self) -> np.ndarray:
        """(3, 3) float64 direction cosines."""
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        """Array shape (D, H, W) = (z, y, x) of this grid."""
        return (self.size[2], self.size[1], self.size[0])

    def index_to_physical(self) -> np.ndarray:
        """(4, 4) homogeneous matrix mapping an index (i, j, k, 1) along (x, y, z) to mm."""
        matrix = np.eye(4)
        matrix[:3, :3] = self.direction_matrix @ np.diag(self.spacing)
        matrix[:3, 3] = self.origin
        return matrix

    def physical_to_index(self) -> np.ndarray:
        """(4, 4) homogeneous matrix mapping a physical point (mm) to a continuous index."""
        return np.linalg.inv(self.index_to_physical())

    def normalized_to_physical(self) -> np.ndarray:
        """(4, 4) map from normalised (x, y, z, 1) coordinates (align_corners=True: -1 and +1
        are the centres of the first and last voxels) to a physical point in mm."""
        scale = np.eye(4)
        for axis, n in enumerate(self.size):
            half = max(n - 1, 1) / 2.0
            scale[axis, axis] = half
            scale[axis, 3] = half
        return self.index_to_physical() @ scale

    def physical_to_normalized(self) -> np.ndarray:
        """(4, 4) map from a physical point (x, y, z, 1) in mm to normalised coordinates."""
        return np.linalg.inv(self.normalized_to_physical())

    def physical_corners(self) -> np.ndarray:
        """(8, 3) physical positions of the centres of the eight corner voxels."""
        nx, ny, nz = (s - 1 for s in self.size)
        idx = np.array([[i, j, k, 1.0] for i in (0, nx) for j in (0, ny) for k in (0, nz)])
        return (idx @ self.index_to_physical().T)[:, :3]

    def nearest_orthogonal_direction(self) -> np.ndarray:
        """(3, 3) orthonormal matrix closest to the direction (polar decomposition U·Vᵀ).

        This is what ITK's NIfTI writer stores for a direction that is not orthonormal
        (NIfTI's qform can only hold a rotation), so it predicts a .nii.gz output's grid.
        """
        u, _, vt = np.linalg.svd(self.direction_matrix)
        return u @ vt

    def orthogonalization_shift_mm(self) -> float:
        """Largest distance (mm) a voxel centre moves when the direction is replaced by its
        nearest orthonormal matrix (0 for an orthonormal direction).

        The shift is linear in the index, so it is largest at one of the eight corners.
        """
        difference = (self.direction_matrix - self.nearest_orthogonal_direction()) @ np.diag(self.spacing)
        nx, ny, nz = (s - 1 for s in self.size)
        corners = np.array([[i, j, k] for i in (0, nx) for j in (0, ny) for k in (0, nz)], dtype=np.float64)
        return float(np.max(np.linalg.norm(corners @ difference.T, axis=1)))

    def is_close(self, other: "Geometry", *, atol: float = 1e-4) -> bool:
        """Same size, and spacing, origin and direction equal within ``atol``."""
        return not self.differences(other, atol=atol)

    def differences(self, other: "Geometry", *, atol: float = 1e-4) -> str:
        """What differs between this grid and ``other`` (''  when ``is_close``), in words:
        only the fields that differ, ``self``'s value first; a direction as its orientation
        code (RAS vs LPS) when those differ, else as rounded cosines (an oblique grid)."""
        parts = []
        if self.size != other.size:
            parts.append(f"size {self.size} vs {other.size}")
        if not np.allclose(self.spacing, other.spacing, atol=atol):
            parts.append(f"spacing {_rounded(self.spacing, 4)} vs {_rounded(other.spacing, 4)}")
        if not np.allclose(self.origin, other.origin, atol=atol):
            parts.append(f"origin {_rounded(self.origin, 3)} vs {_rounded(other.origin, 3)}")
        if not np.allclose(self.direction, other.direction, atol=atol):
            import SimpleITK as sitk

            codes = [sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(g.direction) for g in (self, other)]
            if codes[0] != codes[1]:
                parts.append(f"direction {codes[0]} vs {codes[1]}")
            else:
                parts.append(f"direction {_rounded(self.direction, 4)} vs {_rounded(other.direction, 4)}")
        return ", ".join(parts)


def _rounded(values, digits: int) -> tuple:
    """``values`` rounded for a message (+0.0 for -0.0)."""
    return tuple(round(float(v), digits) + 0.0 for v in values)
