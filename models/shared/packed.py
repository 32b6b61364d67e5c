"""Convolution and linear layers for inference on the CPU with oneDNN weights reordered once.

PyTorch's CPU convolution reorders its weight into oneDNN's blocked layout on every call. Where the input is
small next to the weight (a 1024-channel 3x3 convolution on an 8x8 map: 38 MB of weight, 0.6 GFLOP) that
reorder costs several times the convolution itself; the same holds for a linear layer applied to a few hundred
tokens. ``PackedConv2d`` keeps the reordered weight for such inputs and runs larger ones channels-last through
oneDNN with the weight as stored; ``PackedLinear`` always keeps it (linear weights are small here, and oneDNN
with a reordered weight was as fast as or faster than the default matrix product at every size measured). They
are drop-in subclasses of ``nn.Conv2d`` / ``nn.Linear`` (same parameters, same state-dict keys), handed to a
network through its ``operations`` namespace (``packed_operations()``).

The numbers are the same as the plain layers' up to float rounding (oneDNN sums in another order than the
default path: about 1e-6 relative per layer), not bit-identical. Anything else runs the plain layer: another
device or dtype, autograd, ``torch.compile`` tracing, or a PyTorch without these oneDNN operators. The
reordered weight is an extra copy, so a convolution only keeps it where it pays: inputs of at most
``PACK_MAX_PIXELS`` positions; the phase kernels of ``upsampled`` (16/9 of the weight) are kept at every size.
Copies are rebuilt when the weight is replaced or changed in place.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

# Beyond this size the work per weight element dwarfs one reorder per call, and the copy is not worth its
# memory (measured on a 2-core EPYC: a 1024-channel 3x3 conv on 8x8 is 4x faster packed, on 90x160 no faster).
PACK_MAX_PIXELS = 64 * 64


def _ops_available() -> bool:
    ops = torch.ops.mkldnn
    return torch.backends.mkldnn.is_available() and all(
        hasattr(ops, name) for name in ("_convolution_pointwise", "_reorder_convolution_weight",
                                        "_linear_pointwise", "_reorder_linear_weight"))


def _eligible(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():  # first: nothing below needs tracing
        return False
    _check_available()
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and weight.device.type == "cpu" and not x.is_mkldnn
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and _AVAILABLE[0])


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter (and cannot be changed in place)
        return -1


def _fingerprint(weight: torch.Tensor, size) -> tuple:
    return (weight.data_ptr(), _version(weight), tuple(weight.shape), tuple(size))


_AVAILABLE = [None]  # filled on first use, not at import (no probing at import time)


def _check_available() -> None:
    if _AVAILABLE[0] is None:
        _AVAILABLE[0] = _ops_available()


class PackedConv2d(nn.Conv2d):
    """``nn.Conv2d`` that runs channels-last through oneDNN on the CPU, with its weight reordered once for small
    inputs (see the module docstring)."""

    _packed: tuple | None = None  # (fingerprint, reordered weight)
    _phases: tuple | None = None  # (fingerprint, 2x2 phase kernels, their bias) for ``upsampled``

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # traced as the plain layer: the compiler picks its own kernels
            return super().forward(x)
        if (x.dim() != 4 or self.padding_mode != "zeros" or isinstance(self.padding, str)
                or not _eligible(x, self.weight)):
            self._packed = self._phases = None  # stale after a move or a cast
            return super().forward(x)
        x = x.contiguous(memory_format=torch.channels_last)
        args = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
        weight = self.weight
        if x.shape[-1] * x.shape[-2] <= PACK_MAX_PIXELS:
            key = _fingerprint(weight, x.shape)
            if self._packed is None or self._packed[0] != key:
                self._packed = None  # the old copy goes before the new one is made
                self._packed = (key, torch.ops.mkldnn._reorder_convolution_weight(weight, *args, list(x.shape)))
            weight = self._packed[1]
        else:
            self._packed = None
        return torch.ops.mkldnn._convolution_pointwise(x, weight, self.bias, *args, "none", [], "")

    def can_fold_upsample(self, x: torch.Tensor) -> bool:
        """Whether ``upsampled(x)`` applies: a 3x3, stride-1, padding-1 convolution of one group."""
        return (x.dim() == 4 and self.kernel_size == (3, 3) and self.stride == (1, 1) and self.padding == (1, 1)
                and self.dilation == (1, 1) and self.groups == 1 and self.padding_mode == "zeros"
                and _eligible(x, self.weight))

    def upsampled(self, x: torch.Tensor) -> torch.Tensor:
        """This convolution of ``x`` upsampled 2x (nearest), computed at ``x``'s resolution: output pixel
        (2i+a, 2j+b) only sees rows i-1+a, i+a and columns j-1+b, j+b of ``x``, so each of the four phases (a, b)
        is a 2x2 convolution whose taps are sums of the 3x3 taps; 16 instead of 36 multiply-adds per input pixel
        and channel pair. Only where ``can_fold_upsample(x)``. The phase kernels (16/9 of the weight) are kept,
        reordered for small inputs like ``forward``'s weight."""
        n, _, h, w = x.shape
        x = x.contiguous(memory_format=torch.channels_last)
        key = _fingerprint(self.weight, x.shape)
        if self._phases is None or self._phases[0] != key:
            self._phases = None
            weight = self.weight
            # Phase 0 sees source rows i-1 (tap row 0) and i (tap rows 1 and 2), phase 1 sees rows i (tap rows 0
            # and 1) and i+1 (tap row 2); the same for columns. Slices and sums: a contraction with 0/1 matrices
            # costs seconds for the 1024-channel weights.
            def fold(k, dim):
                lo, mid, hi = k.unbind(dim)
                return torch.stack([lo, mid + hi], dim), torch.stack([lo + mid, hi], dim)

            with torch.no_grad():
                kernel = torch.stack([part for rows in fold(weight, 2) for part in fold(rows, 3)])
            kernel = kernel.reshape(4 * weight.shape[0], weight.shape[1], 2, 2).contiguous()
            if h * w <= PACK_MAX_PIXELS:
                kernel = torch.ops.mkldnn._reorder_convolution_weight(kernel, [1, 1], [1, 1], [1, 1], 1,
                                                                      list(x.shape))
            bias = None if self.bias is None else self.bias.repeat(4)
            self._phases = (key, kernel, bias)
        _, kernel, bias = self._phases
        # padding 1: output (p, q) of the 2x2 convolution sees source rows p-1, p and columns q-1, q
        z = torch.ops.mkldnn._convolution_pointwise(x, kernel, bias, [1, 1], [1, 1], [1, 1], 1, "none", [], "")
        c = self.out_channels
        z = z.view(n, 2, 2, c, h + 1, w + 1)
        out = x.new_empty(n, h, 2, w, 2, c)  # channels-last storage of (n, c, 2h, 2w)
        for a in (0, 1):
            for b in (0, 1):
                out[:, :, a, :, b, :] = z[:, a, b, :, a:a + h, b:b + w].permute(0, 2, 3, 1)
        return out.view(n, 2 * h, 2 * w, c).permute(0, 3, 1, 2)


class PackedLinear(nn.Linear):
    """``nn.Linear`` that runs through oneDNN on the CPU with its weight reordered once (see the module
    docstring)."""

    _packed: tuple | None = None
    _halves: tuple | None = None  # (fingerprint, reordered first and second halves, their biases)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return F.linear(x, self.weight, self.bias)
        rows = x.numel() // max(x.shape[-1], 1)
        if x.dim() < 2 or rows == 0 or not _eligible(x, self.weight):
            self._packed = None
            return F.linear(x, self.weight, self.bias)
        key = _fingerprint(self.weight, ())  # the reordered weight serves any number of rows
        if self._packed is None or self._packed[0] != key:
            self._packed = None
            self._packed = (key, torch.ops.mkldnn._reorder_linear_weight(self.weight, rows))
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self._packed[1], self.bias, "none", [], "")

    def gated_gelu(self, x: torch.Tensor) -> torch.Tensor:
        """``h * gelu(gate)`` where ``h, gate = self(x).chunk(2, -1)`` (a GEGLU), with oneDNN applying the GELU
        and the product inside the two halves' matrix products instead of in separate passes over the output."""
        if torch.compiler.is_compiling() or x.dim() < 2 or not _eligible(x, self.weight):
            if not torch.compiler.is_compiling():
                self._halves = None  # stale after a move or a cast
            h, gate = F.linear(x, self.weight, self.bias).chunk(2, dim=-1)
            return h * F.gelu(gate)
        key = _fingerprint(self.weight, ())
        if self._halves is None or self._halves[0] != key:
            self._halves = None
            n = self.out_features // 2
            rows = max(x.numel() // x.shape[-1], 1)
            halves = [torch.ops.mkldnn._reorder_linear_weight(part.contiguous(), rows)
                      for part in (self.weight[:n], self.weight[n:])]
            biases = [None, None] if self.bias is None else [self.bias[:n].contiguous(), self.bias[n:].contiguous()]
            self._halves = (key, *halves, *biases)
        _, weight_h, weight_gate, bias_h, bias_gate = self._halves
        x = x.contiguous()
        gate = torch.ops.mkldnn._linear_pointwise(x, weight_gate, bias_gate, "gelu", [], "none")  # exact (erf)
        return torch.ops.mkldnn._linear_pointwise.binary(x, gate, weight_h, bias_h, "mul")


def packed_operations() -> types.SimpleNamespace:
    """The ``torch.nn`` layer namespace with the packed ``Conv2d`` and ``Linear``."""
    names = {name: getattr(nn, name) for name in dir(nn) if not name.startswith("_")}
    return types.SimpleNamespace(**dict(names, Conv2d=PackedConv2d, Linear=PackedLinear))
