"""Grids, warping and transforms on tensors: geometry without weights.

One convention everywhere (tested in tests/test_spatial.py):

- Images and features are (B, C, D, H, W), D = z, H = y, W = x.
- A *displacement* ``u`` is (B, 3, D, H, W) in **voxels**, channels ordered (z, y, x) like
  the spatial axes: the voxel at index p is mapped to p + u(p).
- An *affine* ``theta`` is (B, 3, 4) acting on **normalised** coordinates ordered (x, y, z)
  in [-1, 1], exactly like ``torch.nn.functional.affine_grid``.
- Normalised coordinates use ``align_corners=True``: -1 and +1 are the centres of the first
  and last voxels, so voxel i of n sits at 2·i/(n−1) − 1. Every ``grid_sample`` here is
  called with ``align_corners=True`` as well (the official code mixed the two: a half-voxel
  shift).
- A *sampling grid* is (B, D, H, W, 3) in normalised (x, y, z) coordinates of the image
  being sampled, as ``grid_sample`` takes it.

The GVSL mapping from the fixed grid into the moving image is φ(p) = Aff(p + u(p)); the
moved image is B∘φ (``compose_grid`` then ``sample``). Conversions between these grids and
physical space (mm) are ``Geometry.normalized_to_physical`` / ``index_to_physical``; the
ITK displacement fields on disk are made in ``registration`` and ``warping``.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F



def _check_5d(name: str, tensor: torch.Tensor, channels: int | None = None) -> None:
    if tensor.dim() != 5 or (channels is not None and tensor.shape[1] != channels):
        expected = f"(B, {channels}, D, H, W)" if channels else "(B, C, D, H, W)"
        raise ValueError(f"{name} must be {expected}, got shape {tuple(tensor.shape)}")


def device_vector(values, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """A small 1D tensor of Python numbers, made on ``device`` without a host-to-device copy.

    ``torch.tensor(values, device="cuda")`` copies from pageable host memory, which in
    PyTorch waits for the GPU to finish all queued work: a host-device synchronisation in
    every training step that uses it. Filling each element on the device queues kernels
    instead.
    """
    return torch.stack([torch.full((), float(v), device=device, dtype=dtype) for v in values])


def voxel_grid(shape: tuple[int, int, int], *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Voxel coordinates of every voxel: (1, 3, D, H, W), channels (z, y, x)."""
    axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0).unsqueeze(0)


def voxel_to_normalized(coords: torch.Tensor) -> torch.Tensor:
    """Voxel coordinates (B, 3, D, H, W) of the same grid, channels (z, y, x), to a sampling grid.

    Returns (B, D, H, W, 3) normalised coordinates ordered (x, y, z) (align_corners=True).
    """
    _check_5d("coords", coords, 3)
    sizes = device_vector(coords.shape[2:], device=coords.device, dtype=coords.dtype).view(1, 3, 1, 1, 1)
    normalized = 2.0 * coords / (sizes - 1).clamp(min=1) - 1.0
    return normalized.flip(1).permute(0, 2, 3, 4, 1)


def normalized_to_voxel(grid: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """A sampling grid (B, D, H, W, 3) into an image of ``shape`` (D, H, W) to voxel coordinates.

    Returns (B, 3, D, H, W) voxel coordinates of the sampled image, channels (z, y, x).
    """
    if grid.dim() != 5 or grid.shape[-1] != 3:
        raise ValueError(f"grid must be (B, D, H, W, 3), got shape {tuple(grid.shape)}")
    zyx = grid.flip(-1).permute(0, 4, 1, 2, 3)
    sizes = device_vector(shape, device=grid.device, dtype=grid.dtype).view(1, 3, 1, 1, 1)
    return (zyx + 1.0) * 0.5 * (sizes - 1)


def identity_theta(batch: int = 1, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """(B, 3, 4) identity affine."""
    return torch.eye(3, 4, device=device, dtype=dtype).unsqueeze(0).expand(batch, 3, 4).clone()


def affine_grid(theta: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Sampling grid (B, D, H, W, 3) of the affine ``theta`` (B, 3, 4) over a grid of ``shape``.

    The grid is float32 (or float64 for a float64 theta), also under autocast, whose bf16
    matrix product would put coordinates off by up to a quarter voxel at 128 voxels.
    """
    if theta.dim() != 3 or theta.shape[1:] != (3, 4):
        raise ValueError(f"theta must be (B, 3, 4), got shape {tuple(theta.shape)}")
    with torch.autocast(device_type=theta.device.type, enabled=False):
        theta = theta.to(torch.promote_types(theta.dtype, torch.float32))
        return F.affine_grid(theta, [theta.shape[0], 1, *shape], align_corners=True)


def apply_affine_to_grid(theta: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Apply ``theta`` (B, 3, 4) to normalised points ``grid`` (B, D, H, W, 3) -> same shape."""
    linear, translation = theta[:, :, :3], theta[:, :, 3]
    return torch.einsum("bij,bdhwj->bdhwi", linear, grid) + translation.view(-1, 1, 1, 1, 3)


def compose_grid(theta: torch.Tensor | None, displacement: torch.Tensor | None, shape=None) -> torch.Tensor:
    """Sampling grid of φ(p) = Aff(p + u(p)) over the fixed grid.

    Args:
        theta: (B, 3, 4) normalised affine, or None for the identity.
        displacement: (B, 3, D, H, W) voxel displacement u on the fixed grid, or None.
        shape: (D, H, W) of the fixed grid; needed only when ``displacement`` is None.

    Returns:
        (B, D, H, W, 3) sampling grid in normalised coordinates of the moving image.
    """
    if displacement is not None:
        _check_5d("displacement", displacement, 3)
    elif theta is None:
        raise ValueError("compose_grid needs theta, displacement or both")
    elif shape is None:
        raise ValueError("compose_grid needs shape when displacement is None")
    reference = displacement if displacement is not None else theta
    # Coordinates in bf16 would be off by up to half a voxel at 128 voxels (8-bit mantissa),
    # so the grid is always built in float32 or better, also under autocast.
    dtype = torch.promote_types(reference.dtype, torch.float32)
    with torch.autocast(device_type=reference.device.type, enabled=False):
        if displacement is None:
            return affine_grid(theta.to(dtype), tuple(shape))
        displacement = displacement.to(dtype)
        coords = voxel_grid(displacement.shape[2:], device=displacement.device, dtype=dtype) + displacement
        grid = voxel_to_normalized(coords)
        return grid if theta is None else apply_affine_to_grid(theta.to(dtype), grid)


def sample(image: torch.Tensor, grid: torch.Tensor, *, mode: str = "bilinear", padding_mode: str = "zeros") -> torch.Tensor:
    """Sample ``image`` (B, C, D', H', W') at ``grid`` (B, D, H, W, 3) -> (B, C, D, H, W).

    ``mode`` is "bilinear" (trilinear in 3D) or "nearest" (for labels). The result has the
    wider of the two dtypes (float32 for a bf16 image and a float32 grid).
    """
    _check_5d("image", image)
    if grid.shape[0] != image.shape[0]:
        grid = grid.expand(image.shape[0], *grid.shape[1:])
    # Never round a float32 grid down to a bf16/fp16 image's precision: sample in the wider type.
    dtype = torch.promote_types(image.dtype, grid.dtype)
    return F.grid_sample(image.to(dtype), grid.to(dtype), mode=mode, padding_mode=padding_mode, align_corners=True)


def warp(image: torch.Tensor, displacement: torch.Tensor, *, mode: str = "bilinear", padding_mode: str = "zeros") -> torch.Tensor:
    """Warp ``image`` (B, C, D, H, W) by a voxel displacement (B, 3, D, H, W): out(p) = image(p + u(p))."""
    return sample(image, compose_grid(None, displacement), mode=mode, padding_mode=padding_mode)


def warp_affine(image: torch.Tensor, theta: torch.Tensor, *, mode: str = "bilinear", padding_mode: str = "zeros") -> torch.Tensor:
    """Warp ``image`` (B, C, D, H, W) by a normalised affine (B, 3, 4) onto the same grid size."""
    theta = theta.to(torch.promote_types(theta.dtype, image.dtype))  # float64 images: a float64 grid
    return sample(image, affine_grid(theta, tuple(image.shape[2:])), mode=mode, padding_mode=padding_mode)


def affine_matrix(rotation: torch.Tensor, scale: torch.Tensor, translation: torch.Tensor, shear: torch.Tensor) -> torch.Tensor:
    """Batched, differentiable affine: (B, 3, 4) = [Shear · Scale · Rz · Ry · Rx | translation].

    Args:
        rotation: (B, 3) angles in radians about x, y, z.
        scale: (B, 3) factors along x, y, z (1 = no scaling).
        translation: (B, 3) in normalised units (x, y, z); 1.0 is half the field of view.
        shear: (B, 6) shear angles in radians; the off-diagonal entries of the shear matrix
            are their tangents, in row-major order (xy, xz, yx, yz, zx, zy).

    Built only with ``torch.stack`` of tensor entries, so gradients reach every input and
    any batch size works (the official code rebuilt it from Python floats, which cut the
    graph and crashed above batch 1).
    """
    for name, tensor, n in (("rotation", rotation, 3), ("scale", scale, 3), ("translation", translation, 3), ("shear", shear, 6)):
        if tensor.dim() != 2 or tensor.shape[1] != n:
            raise ValueError(f"{name} must be (B, {n}), got shape {tuple(tensor.shape)}")
    one = torch.ones_like(rotation[:, 0])
    zero = torch.zeros_like(one)

    def matrix(rows) -> torch.Tensor:
        return torch.stack([torch.stack(row, dim=-1) for row in rows], dim=-2)

    cx, cy, cz = torch.cos(rotation).unbind(1)
    sx, sy, sz = torch.sin(rotation).unbind(1)
    rx = matrix([(one, zero, zero), (zero, cx, -sx), (zero, sx, cx)])
    ry = matrix([(cy, zero, sy), (zero, one, zero), (-sy, zero, cy)])
    rz = matrix([(cz, -sz, zero), (sz, cz, zero), (zero, zero, one)])
    scaling = torch.diag_embed(scale)
    t = torch.tan(shear).unbind(1)
    shearing = matrix([(one, t[0], t[1]), (t[2], one, t[3]), (t[4], t[5], one)])
    linear = shearing @ scaling @ rz @ ry @ rx
    return torch.cat([linear, translation.unsqueeze(-1)], dim=-1)
