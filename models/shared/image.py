"""The one channel normalisation: grayscale, RGB and RGBA frames in, RGB out."""

from __future__ import annotations

import torch

from .errors import UserInputError


def to_rgb(frames: torch.Tensor, channel_dim: int = -1) -> torch.Tensor:
    """1 channel -> replicated to 3 (a view), 4 -> alpha dropped (as PIL's RGBA->RGB conversion in the official
    preprocessing does: not composited), 3 -> unchanged. The input is never modified."""
    channels = frames.shape[channel_dim]
    if channels == 3:
        return frames
    if channels == 1:
        shape = [-1] * frames.ndim
        shape[channel_dim] = 3
        return frames.expand(*shape)
    if channels == 4:
        return frames.narrow(channel_dim, 0, 3)
    raise UserInputError(f"expected RGB, RGBA or grayscale frames (1, 3 or 4 channels), got {channels} channels")
