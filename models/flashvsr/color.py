"""FlashVSR's colour correction of decoded frames against the bicubic-upscaled LR frames, both in [-1, 1].

Everything is per frame, so correcting a video chunk by chunk gives the same result as all at once. As in the
official pipelines the result is clamped to [-1, 1] (for both methods), and the arithmetic runs in the dtype of the
inputs (the official runs it in the pipeline dtype, bf16 on GPU).

* ``adain`` (the official default): per frame and channel, the output's mean and standard deviation (population
  variance + 1e-5) are replaced by the LR frame's.
* ``wavelet``: 5 levels of a 3x3 binomial blur ([1,2,1]^T[1,2,1]/16, dilation 2^i, replicate padding); the
  output keeps its high frequencies and takes the LR frame's lowest band.
* ``none``: unchanged, not clamped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

METHODS = ("adain", "wavelet", "none")
ADAIN_EPS = 1e-5
WAVELET_LEVELS = 5
CLAMP = (-1.0, 1.0)


def _mean_std(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    n, c = x.shape[:2]
    flat = x.reshape(n, c, -1)
    std = (flat.var(dim=2, unbiased=False) + eps).sqrt().view(n, c, 1, 1)
    return flat.mean(dim=2).view(n, c, 1, 1), std


def adain(content: torch.Tensor, reference: torch.Tensor, eps: float = ADAIN_EPS) -> torch.Tensor:
    """(N, C, H, W) frames re-coloured to the per-channel mean/std of ``reference`` (N, C, H', W'); unclamped."""
    ref_mean, ref_std = _mean_std(reference, eps)
    mean, std = _mean_std(content, eps)
    return (content - mean) / std * ref_std + ref_mean


def _blur(x: torch.Tensor, dilation: int) -> torch.Tensor:
    taps = torch.tensor([[0.0625, 0.125, 0.0625], [0.125, 0.25, 0.125], [0.0625, 0.125, 0.0625]],
                        dtype=x.dtype, device=x.device)
    c = x.shape[1]
    x = F.pad(x, (dilation,) * 4, mode="replicate")
    return F.conv2d(x, taps.view(1, 1, 3, 3).repeat(c, 1, 1, 1), dilation=dilation, groups=c)


def wavelet_split(x: torch.Tensor, levels: int = WAVELET_LEVELS) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) of (N, C, H, W) frames: the sum of the band differences, and the last blur."""
    high = torch.zeros_like(x)
    low = x
    for i in range(levels):
        blurred = _blur(low, 2 ** i)
        high = high + (low - blurred)
        low = blurred
    return high, low


def wavelet(content: torch.Tensor, reference: torch.Tensor, levels: int = WAVELET_LEVELS) -> torch.Tensor:
    """(N, C, H, W) frames with their low band replaced by ``reference``'s (same shape); unclamped."""
    return wavelet_split(content, levels)[0] + wavelet_split(reference, levels)[1]


def color_fix(frames: torch.Tensor, reference: torch.Tensor, method: str = "adain") -> torch.Tensor:
    """Colour-correct ``frames`` against ``reference``, both (B, C, F, H, W) or (N, C, H, W) in [-1, 1]."""
    if method not in METHODS:
        raise ValueError(f"colour fix {method!r} is not one of {METHODS}")
    if frames.shape != reference.shape:
        raise ValueError(f"colour fix needs frames and reference of one shape, got {tuple(frames.shape)} and "
                         f"{tuple(reference.shape)}")
    if method == "none":
        return frames
    video = frames.ndim == 5
    if video:
        b, c, f, h, w = frames.shape
        frames = frames.transpose(1, 2).reshape(b * f, c, h, w)
        reference = reference.transpose(1, 2).reshape(b * f, c, h, w)
    fixed = adain(frames, reference) if method == "adain" else wavelet(frames, reference)
    fixed = fixed.clamp(*CLAMP)
    if video:
        fixed = fixed.reshape(b, f, c, h, w).transpose(1, 2)
    return fixed
