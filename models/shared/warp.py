"""Backward warping with optical flow.

``flow_warp_official`` reproduces Stream-DiffVSR's warp exactly, quirk included (spec §3.5, Q1): the sampling
grid is normalised with the align_corners=True formula ``2v/(S-1) - 1`` but sampled with align_corners=False,
which stretches the image by S/(S-1), shifts it by half a pixel and halves the border pixels. The model was
trained with it, so the engine must use it. ``backward_warp`` is the geometrically correct warp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _pixel_grid(flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Float32 always: in fp16 the absolute pixel coordinates (up to a few thousand) lose sub-pixel precision (Q13).
    _, _, h, w = flow.shape
    ys = torch.arange(h, device=flow.device, dtype=torch.float32).view(1, h, 1)
    xs = torch.arange(w, device=flow.device, dtype=torch.float32).view(1, 1, w)
    flow = flow.to(torch.float32)
    return xs + flow[:, 0], ys + flow[:, 1]


def _check(x: torch.Tensor, flow: torch.Tensor) -> None:
    if flow.ndim != 4 or flow.shape[1] != 2 or flow.shape[-2:] != x.shape[-2:] or flow.shape[0] != x.shape[0]:
        raise ValueError(f"flow must be (B, 2, H, W) matching x {tuple(x.shape)}, got {tuple(flow.shape)}")


def flow_warp_official(x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """The official Stream-DiffVSR warp: x (B, C, H, W), flow (B, 2, H, W) in pixels (x then y).

    The grid is computed and sampled in float32; the result is cast back to x's dtype.
    """
    _check(x, flow)
    h, w = x.shape[-2:]
    gx, gy = _pixel_grid(flow)
    grid = torch.stack((2 * gx / max(w - 1, 1) - 1, 2 * gy / max(h - 1, 1) - 1), dim=-1)
    out = F.grid_sample(x.to(torch.float32), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.to(x.dtype)


def backward_warp(x: torch.Tensor, flow: torch.Tensor, padding_mode: str = "border",
                  mode: str = "bilinear") -> torch.Tensor:
    """out(p) = x(p + flow(p)), with pixel centres at integer coordinates (align_corners=True convention)."""
    _check(x, flow)
    h, w = x.shape[-2:]
    gx, gy = _pixel_grid(flow)
    grid = torch.stack((2 * gx / max(w - 1, 1) - 1, 2 * gy / max(h - 1, 1) - 1), dim=-1)
    out = F.grid_sample(x.to(torch.float32), grid, mode=mode, padding_mode=padding_mode, align_corners=True)
    return out.to(x.dtype)
