"""The Middlebury colour-wheel picture of an optical flow field."""

from __future__ import annotations

import numpy as np
import torch

# The Middlebury colour wheel (Baker et al. 2011): number of hues between consecutive primaries/secondaries,
# red -> yellow -> green -> cyan -> blue -> magenta -> red.
_WHEEL_SEGMENTS = (15, 6, 4, 11, 13, 6)


def _colour_wheel() -> np.ndarray:
    rows = []
    corners = [(255, 0, 0), (255, 255, 0), (0, 255, 0), (0, 255, 255), (0, 0, 255), (255, 0, 255), (255, 0, 0)]
    for n, start, end in zip(_WHEEL_SEGMENTS, corners, corners[1:]):
        i = np.arange(n)
        # the channel that changes moves in integer steps floor(255 * i / n), as in the reference tables
        seg = np.empty((n, 3))
        for ch in range(3):
            if start[ch] == end[ch]:
                seg[:, ch] = start[ch]
            elif end[ch] > start[ch]:
                seg[:, ch] = np.floor(255 * i / n)
            else:
                seg[:, ch] = 255 - np.floor(255 * i / n)
        rows.append(seg)
    return np.concatenate(rows) / 255.0


def _components(flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x and y of ``flow`` (... x 2) in float64, NaN as no motion."""
    return np.nan_to_num(flow[..., 0].astype(np.float64)), np.nan_to_num(flow[..., 1].astype(np.float64))


def _speed(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # an infinite (NaN-cleaned: largest float) component is an infinite speed
        return np.sqrt(u * u + v * v)


def _finite_max(magnitude: np.ndarray) -> float:
    finite = magnitude[np.isfinite(magnitude)]  # (one infinite speed would make every other one white)
    return float(finite.max()) if finite.size else 0.0


def largest_speed(flows) -> float:
    """The largest finite speed in ``flows`` (... x 2), as ``flow_to_image`` computes it: the scale of a batch
    drawn alike (a float32 peak differs in its last bit and darkens the fastest pixel as if beyond it)."""
    u, v = _components(np.asarray(flows, dtype=np.float32))
    return _finite_max(_speed(u, v))


def flow_to_image(flow, max_magnitude: float | None = None) -> np.ndarray:
    """Colour-wheel visualisation (Middlebury, Baker et al.) of an H x W x 2 or 2 x H x W flow -> uint8 H x W x 3.

    Hue is the direction (right red, down orange-yellow, left cyan, up blue-violet), saturation the speed
    relative to ``max_magnitude`` (default: the largest in the flow); white is no motion. Speeds beyond
    ``max_magnitude`` are drawn at full saturation and darkened by 25%, as in the Middlebury code.
    """
    if torch.is_tensor(flow):
        flow = flow.detach().to("cpu", torch.float32).numpy()
    flow = np.asarray(flow, dtype=np.float32)
    if flow.ndim == 3 and flow.shape[0] == 2 and flow.shape[-1] != 2:
        flow = flow.transpose(1, 2, 0)
    if flow.ndim != 3 or flow.shape[-1] != 2:
        raise ValueError(f"flow must be H x W x 2 or 2 x H x W, got {flow.shape}")
    u, v = _components(flow)
    magnitude = _speed(u, v)
    scale = float(max_magnitude) if max_magnitude else _finite_max(magnitude)
    scale = max(scale, float(np.finfo(np.float32).eps))  # (a float32 would round a huge scale to infinity)
    radius = magnitude / scale
    wheel = _colour_wheel()
    n = wheel.shape[0]
    angle = np.arctan2(-v, -u) / np.pi  # in [-1, 1]
    position = (angle + 1) / 2 * (n - 1)
    k0 = np.floor(position).astype(np.int64)
    k1 = (k0 + 1) % n
    frac = (position - k0)[..., None]
    colour = (1 - frac) * wheel[k0] + frac * wheel[k1]
    inside = (radius <= 1)[..., None]
    colour = np.where(inside, 1 - np.minimum(radius, 1)[..., None] * (1 - colour), colour * 0.75)
    return np.floor(255 * colour).clip(0, 255).astype(np.uint8)
