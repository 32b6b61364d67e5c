"""Channels-last networks on the GPU: when to store them so (``prefers_channels_last``) and a group norm that keeps
that layout.

PyTorch's CUDA group norm works in NCHW only: it copies a channels-last input to NCHW and returns NCHW, so a network
stored channels-last (the layout in which cuDNN runs half-precision convolutions natively) pays two copies per norm,
that one and the next convolution's back to channels-last. ``group_norm`` computes such a norm in the input's
layout instead, with the layer's own weights: statistics in float32 (from sums of x and x^2, where PyTorch's kernel
uses Welford's method), then, as that kernel does, ``x * scale + shift`` per channel in float32, rounded once to
the input's dtype.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .errors import UserInputError
from .packed import managed

# Where the channels-last path runs (PyTorch's CPU group norm keeps the layout by itself); tests add "cpu".
CHANNELS_LAST_DEVICES = ("cuda",)
HALF_DTYPES = (torch.float16, torch.bfloat16)
# "off" keeps the eager networks NCHW (a compiled graph picks its own layout): a way out should some GPU or cuDNN
# version run NHWC worse
LAYOUT_ENV = "STREAMVSR_CHANNELS_LAST"


def prefers_channels_last(device, dtype: torch.dtype) -> bool:
    """Whether a convolutional network with group norms should store its weights channels-last to run on ``device``
    in ``dtype``: on a GPU in half precision. cuDNN's tensor-core convolutions work in NHWC, so NCHW costs a
    transpose on each side of every convolution or a slower kernel (in bf16 much slower: an SD UNet ran 1.75x
    faster in NHWC on an A100, as reported with TensorFlow's change to that layout), and ``group_norm`` below keeps
    the layout between them. On the CPU the oneDNN layers choose their own layouts (shared/packed.py). Not on ROCm,
    whose builds call their GPUs "cuda" too: MIOpen is another library (ComfyUI even turns it off on AMD GPUs).
    ``STREAMVSR_CHANNELS_LAST=off`` in the environment says never."""
    return (layout_setting() == "auto" and torch.device(device).type in CHANNELS_LAST_DEVICES
            and dtype in HALF_DTYPES and getattr(torch.version, "hip", None) is None)


def layout_setting() -> str:
    """``STREAMVSR_CHANNELS_LAST``: "auto" (the default, also where it is set empty, as a way of unsetting it) or
    "off"; anything else is a UserInputError."""
    setting = os.environ.get(LAYOUT_ENV, "").strip().lower() or "auto"
    if setting not in ("auto", "off"):
        raise UserInputError(f"{LAYOUT_ENV}={setting!r}: use auto (the default) or off (NCHW)")
    return setting


def _keeps_layout(norm: nn.GroupNorm, x: torch.Tensor) -> bool:
    # Half precision only: the statistics come from sums of x and x^2 (two reads, no copy), whose float32
    # cancellation error is far below a half-precision rounding but not below a float32 one.
    return (x.device.type in CHANNELS_LAST_DEVICES and x.dim() == 4 and x.dtype in HALF_DTYPES
            and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            and norm.affine and not managed(norm) and norm.weight.device == x.device
            and not torch.compiler.is_compiling())  # a compiled graph fuses the norm in any layout


def group_norm(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)``, computed in ``x``'s layout where that is channels-last in half precision on a GPU."""
    if _keeps_layout(norm, x):
        return group_norm_channels_last(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    return norm(x)


def group_norm_channels_last(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor,
                             eps: float) -> torch.Tensor:
    """``F.group_norm(x, groups, weight, bias, eps)`` of a channels-last (N, C, H, W) ``x``, returned channels-last
    in ``x``'s dtype."""
    n, c, h, w = x.shape
    per_group = c // groups
    rows = x.permute(0, 2, 3, 1).reshape(n, h * w, c)  # channels-last memory: a view
    count = h * w * per_group
    # per channel, then per group: column sums over the pixels read the memory in order
    total = rows.sum(dim=1, dtype=torch.float32).view(n, groups, per_group).sum(dim=2)
    squares = torch.linalg.vector_norm(rows, 2, dim=1, dtype=torch.float32).square()
    mean = total / count
    var = (squares.view(n, groups, per_group).sum(dim=2) / count - mean.square()).clamp_min(0)
    rstd = torch.rsqrt(var + eps)
    scale = weight.to(torch.float32).view(1, groups, per_group) * rstd[:, :, None]
    shift = bias.to(torch.float32).view(1, groups, per_group) - mean[:, :, None] * scale
    out = torch.empty_like(x)  # x's dtype and layout; the products and sums below run in float32
    return torch.addcmul(shift.reshape(n, c, 1, 1), x, scale.reshape(n, c, 1, 1), out=out)
