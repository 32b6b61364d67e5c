"""Wan2.1's 3-axis rotary position embedding (time, height, width) as FlashVSR uses it.

Each head's 128 channels form 64 adjacent (real, imaginary) pairs: the first 22 pairs rotate with the latent-frame
index, the next 21 with the token row, the last 21 with the token column; theta 10000, and every axis's
frequencies use that axis's own width (44, 42, 42) as the exponent denominator.

The official model precomputes a 1024-position complex128 table per axis. Here the angles are computed for the
positions asked for, with the same float64 arithmetic (position times inverse frequency), so positions below
1024 give the official values bit for bit and there is no upper limit: a stream longer than 4,093 output frames
simply keeps counting.
"""

from __future__ import annotations

import torch

THETA = 10000.0


def axis_widths(head_dim: int) -> tuple[int, int, int]:
    """Channels per axis (time, height, width); 44/42/42 for head_dim 128."""
    third = head_dim // 3
    widths = (head_dim - 2 * third, third, third)
    if head_dim % 2 or any(w % 2 for w in widths):
        raise ValueError(f"head_dim {head_dim} does not split into even time/height/width widths {widths}")
    return widths


def inverse_frequencies(width: int, theta: float = THETA) -> torch.Tensor:
    """The ``width // 2`` float64 inverse frequencies of one axis."""
    return 1.0 / (theta ** (torch.arange(0, width, 2, dtype=torch.float64)[: width // 2] / width))


def axis_angles(positions: torch.Tensor, width: int, theta: float = THETA) -> torch.Tensor:
    """float64 rotation angles (len(positions), width // 2) of one axis."""
    return torch.outer(positions.to(torch.float64), inverse_frequencies(width, theta))


def grid_angles(t_start: int, frames: int, rows: int, cols: int, head_dim: int,
                theta: float = THETA) -> torch.Tensor:
    """float64 angles (frames*rows*cols, head_dim // 2) for tokens in (frame, row, col) order.

    Frames take the absolute temporal positions ``t_start .. t_start+frames-1``; rows and columns start at 0 in
    every chunk.
    """
    if t_start < 0:
        raise ValueError(f"t_start must be >= 0, got {t_start}")
    wt, wh, ww = axis_widths(head_dim)
    at = axis_angles(torch.arange(t_start, t_start + frames), wt, theta)
    ah = axis_angles(torch.arange(rows), wh, theta)
    aw = axis_angles(torch.arange(cols), ww, theta)
    grid = torch.cat([
        at[:, None, None, :].expand(frames, rows, cols, -1),
        ah[None, :, None, :].expand(frames, rows, cols, -1),
        aw[None, None, :, :].expand(frames, rows, cols, -1),
    ], dim=-1)
    return grid.reshape(frames * rows * cols, head_dim // 2)


def rotation_dtype(device) -> torch.dtype:
    """float64, the official rotation's precision, on the CPU and CUDA (ROCm included); float32 on devices without
    a usable float64 (Apple's MPS, Intel's XPU, DirectML)."""
    return torch.float64 if torch.device(device or "cpu").type in ("cpu", "cuda") else torch.float32


class RopeTable:
    """The rotations of one chunk's token grid, ready for :func:`apply_rope`, shaped (tokens, 1, head_dim // 2)
    (the 1 broadcasts over heads).

    Where the device has float64 (``rotation_dtype``), ``rotation`` is the official table: complex128
    ``torch.polar(1, angle)``, applied by the same complex multiply, so the results are the official ones bit for
    bit. Elsewhere ``cos``/``sin`` in float32 rotate the pairs in real arithmetic, a few float32 ulps from it (in
    bf16 one ulp on about one element in 60,000); the other representation is None.
    """

    def __init__(self, t_start: int, frames: int, rows: int, cols: int, head_dim: int, device=None,
                 theta: float = THETA):
        angles = grid_angles(t_start, frames, rows, cols, head_dim, theta)
        self.key = (t_start, frames, rows, cols, head_dim, theta)
        self.rotation = self.cos = self.sin = None
        if rotation_dtype(device) == torch.float64:
            self.rotation = torch.polar(torch.ones_like(angles), angles).to(device)[:, None, :]
        else:
            self.cos = torch.cos(angles).to(device=device, dtype=torch.float32)[:, None, :]
            self.sin = torch.sin(angles).to(device=device, dtype=torch.float32)[:, None, :]


# Values rotated per step: the float64 temporaries of a step take about 16 bytes per value (130 MB), where a
# 1080p output's first chunk has 80 M values per q or k.
ROPE_STEP_VALUES = 1 << 23


def apply_rope(x: torch.Tensor, table: RopeTable, heads: int) -> torch.Tensor:
    """Rotate ``x`` (..., tokens, heads*head_dim) by ``table``; the result has ``x``'s dtype. Done a band of
    tokens at a time, so the high-precision temporaries stay bounded (each value is rotated on its own, so the
    result does not depend on the bands)."""
    tokens = x.shape[-2]
    band = max(1, ROPE_STEP_VALUES // max(1, x[..., 0, :].numel()))
    if band >= tokens:
        return _rotate(x, table, heads, slice(None))
    out = torch.empty_like(x)
    for start in range(0, tokens, band):
        rows = slice(start, min(start + band, tokens))
        out[..., rows, :] = _rotate(x[..., rows, :], table, heads, rows)
    return out


def _rotate(x: torch.Tensor, table: RopeTable, heads: int, rows: slice) -> torch.Tensor:
    if table.rotation is not None:
        pairs = torch.view_as_complex(x.to(torch.float64).unflatten(-1, (heads, -1, 2)))
        return torch.view_as_real(pairs * table.rotation[rows]).reshape(x.shape).to(x.dtype)
    re, im = x.float().unflatten(-1, (heads, -1, 2)).unbind(-1)
    cos, sin = table.cos[rows], table.sin[rows]
    return torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1).reshape(x.shape).to(x.dtype)
