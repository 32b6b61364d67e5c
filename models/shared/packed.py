"""Convolution and linear layers for fp32 inference on the CPU: oneDNN weights reordered once, Winograd for wide
3x3 convolutions.

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
device or dtype, autograd, ``torch.compile`` tracing (unless ``as_operators`` marked the layers: then each is one
opaque operator of the compiled graph), a PyTorch without these oneDNN operators, or (mixed under ComfyUI's
classes, ``packed_operations(base=...)``) a layer ComfyUI casts or patches on the fly, which runs ComfyUI's own cast
path. The reordered weight is an extra copy, so a convolution only keeps it where it pays: inputs of at most
``PACK_MAX_PIXELS`` positions; the phase kernels of ``upsampled`` (16/9 of the weight) are kept at every size.
Copies are rebuilt when the weight (or a bias they copy) is replaced or changed in place, as far as PyTorch counts
in-place changes (``TensorKey``); after a change it does not count, ``forget_packed`` drops them.

Wide 3x3 convolutions (stride 1, padding 1, at least ``WINOGRAD_MIN_CHANNELS`` channels in and out, at least
``WINOGRAD_MIN_PIXELS`` positions) run as Winograd F(4x4, 3x3) (Lavin and Gray, "Fast Algorithms for
Convolutional Neural Networks", 2016): each 6x6 input tile and each kernel go to a 36-point transform domain where
the convolution is 36 independent matrix products per 16 output pixels: 2.25 multiply-adds per output pixel and
channel pair instead of 9. oneDNN runs the 36 products as one grouped 1x1 convolution. The rounding differs more
than oneDNN's direct convolution (about 1e-5 relative instead of 1e-6, from the transforms' coefficients up to
8); the transformed kernel (36/9 of the weight), reordered for the input size, is kept instead of a reordered
weight, and the transform-domain buffers are kept per thread between calls (a few times ``WINOGRAD_BAND_BYTES``
at most).
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
import types
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .tensor_key import TensorKey

# Beyond this size the work per weight element dwarfs one reorder per call, and the copy is not worth its
# memory (measured on a 2-core EPYC: a 1024-channel 3x3 conv on 8x8 is 4x faster packed, on 90x160 no faster).
PACK_MAX_PIXELS = 64 * 64


# Winograd pays where the matrix products are big enough to run near the CPU's peak; measured on a 2-core EPYC
# against the packed direct convolution: 1.8-2.3x for 256-1024 channels on 32x32-64x64, 1.3x for 512 channels on
# 16x16 and 128 channels on 128x128, 0.8x for 64 channels (the transforms then cost more than they save).
WINOGRAD_MIN_CHANNELS = 96
WINOGRAD_MIN_PIXELS = 16 * 16
# The transformed input and product of one band of tile rows stay under this many bytes each, so memory does not
# grow 2.25x with the frame and the buffers can be kept between calls.
WINOGRAD_BAND_BYTES = 64 << 20

# F(4x4, 3x3) with interpolation points 0, 1, -1, 2, -2 and infinity. Y = A^T [(G g G^T) * (B^T d B)] A.
_WINOGRAD_BT = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
                (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))
_WINOGRAD_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
               (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))
_WINOGRAD_AT = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))
_WINOGRAD: dict = {}  # the Kronecker forms of the transforms, made on first use


def _winograd_matrices() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input 36x36, kernel 9x36, output 16x36): with row-major flattened tiles, vec(B^T d B) = input @ vec(d),
    vec(G g G^T) = vec(g) @ kernel, vec(A^T m A) = output @ vec(m)."""
    if not _WINOGRAD:
        bt, g, at = (torch.tensor(m, dtype=torch.float64) for m in (_WINOGRAD_BT, _WINOGRAD_G, _WINOGRAD_AT))
        _WINOGRAD.update(input=torch.kron(bt, bt).float(), kernel=torch.kron(g, g).t().float().contiguous(),
                         output=torch.kron(at, at).float())
    return _WINOGRAD["input"], _WINOGRAD["kernel"], _WINOGRAD["output"]


def winograd_kernel(weight: torch.Tensor) -> torch.Tensor:
    """A (out, in, 3, 3) weight in the transform domain, laid out as the weight of a 1x1 convolution with 36
    groups, (36 * out, in, 1, 1): group k is transform point k's (out, in) matrix."""
    out_c, in_c = weight.shape[:2]
    _, kernel, _ = _winograd_matrices()
    with torch.no_grad():
        taps = weight.detach().reshape(out_c * in_c, 9)
        return (kernel.t().to(weight.dtype) @ taps.t()).view(36 * out_c, in_c, 1, 1)


# the 36 products as one grouped 1x1 convolution: padding, stride, dilation, groups
_WINOGRAD_PRODUCTS = ([0, 0], [1, 1], [1, 1], 36)


def winograd_layout(kernel: torch.Tensor, tiles: int) -> torch.Tensor:
    """``winograd_kernel``'s result reordered by oneDNN for bands of ``tiles`` tiles. The layout oneDNN picks
    depends on the number of tiles, and a kernel in another one is reordered on every call (measured: 100x
    slower), so a kernel serves one band size."""
    return torch.ops.mkldnn._reorder_convolution_weight(kernel, *_WINOGRAD_PRODUCTS,
                                                        [1, kernel.shape[1] * 36, tiles, 1])


def winograd_bands(h: int, w: int, channels: int, itemsize: int) -> tuple[int, int]:
    """(tile rows per band, number of bands) for an h x w map: bands stay under ``WINOGRAD_BAND_BYTES`` and all
    have the same size (the last one is padded with zero tiles), so one kernel layout serves them all."""
    th, tw = -(-h // 4), -(-w // 4)
    most = max(1, WINOGRAD_BAND_BYTES // (36 * tw * channels * itemsize))
    bands = -(-th // most)
    return -(-th // bands), bands


_SCRATCH = threading.local()


def _scratch(slot: str, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """A buffer kept between calls (per thread): the transform-domain tensors run to tens of MB, and a fresh
    allocation of that size is fresh pages from the kernel on every call (page faults cost as much as the
    transforms). Grows to the largest request up to ``WINOGRAD_BAND_BYTES``; larger requests get a buffer of their
    own, so no more than a few bands' worth stays allocated."""
    numel = math.prod(shape)
    if numel * like.element_size() > WINOGRAD_BAND_BYTES:
        return like.new_empty(shape)
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    buffer = buffers.get(slot)
    if buffer is None or buffer.numel() < numel or buffer.dtype != like.dtype or buffer.device != like.device:
        buffers[slot] = None  # the old one goes first
        with torch.inference_mode(False):  # a normal tensor: usable inside and outside inference mode
            buffer = buffers[slot] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return buffer[:numel].view(shape)


def winograd_conv3x3(x: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The 3x3, stride-1, padding-1 convolution of ``x`` (n, c, h, w) by ``winograd_kernel(weight)`` (best in
    ``winograd_layout`` for this size's bands); the result is channels-last. Tiles of 4x4 output pixels,
    processed in bands of tile rows (``winograd_bands``)."""
    n, c, h, w = x.shape
    out_c = kernel.shape[0] // 36
    to_tiles, _, from_tiles = _winograd_matrices()
    th, tw = -(-h // 4), -(-w // 4)
    band, bands = winograd_bands(h, w, max(c, out_c), x.element_size())
    tiles = band * tw
    # zero padding: 1 on the top and left, up to the last band's whole tiles (plus the kernel's 1) on the bottom
    # and right
    hp, wp = 4 * band * bands + 2, 4 * tw + 2
    padded = _scratch("padded", (n, hp, wp, c), x)
    for border in (padded[:, :1], padded[:, h + 1:], padded[:, 1:h + 1, :1], padded[:, 1:h + 1, w + 1:]):
        border.zero_()
    padded[:, 1:h + 1, 1:w + 1].copy_(x.permute(0, 2, 3, 1))
    out = x.new_empty(n, h, w, out_c)
    for i in range(n):
        image = padded[i]
        for r0 in range(0, th, band):
            # overlapping 6x6 tiles with stride 4, gathered as (tiles, 36, c); two buffers take turns
            d = _scratch("a", (tiles, 36, c), x)
            d.view(band, tw, 6, 6, c).copy_(image.as_strided(
                (band, tw, 6, 6, c), (4 * wp * c, 4 * c, wp * c, c, 1), image.storage_offset() + 4 * r0 * wp * c))
            v = torch.bmm(to_tiles.expand(tiles, 36, 36), d, out=_scratch("b", (tiles, 36, c), x))
            # the 36 independent (tiles, c) x (c, out_c) products: one 1x1 convolution with 36 groups over a
            # channels-last (1, 36 c, tiles, 1) map, which is v as it lies; oneDNN ran them 2.4x faster than bmm
            m = torch.ops.mkldnn._convolution_pointwise(v.view(1, tiles, 1, 36 * c).permute(0, 3, 1, 2), kernel,
                                                        None, *_WINOGRAD_PRODUCTS, "none", [], "")
            m = m.permute(0, 2, 3, 1).reshape(tiles, 36, out_c)
            y = torch.bmm(from_tiles.expand(tiles, 16, 36), m, out=_scratch("b", (tiles, 16, out_c), x))
            del m
            # (tile row, pixel row, tile column, pixel column, channel) as a view, stored without a reshape copy
            _store_tiles(y.view(band, tw, 4, 4, out_c).permute(0, 2, 1, 3, 4), out[i, 4 * r0: 4 * (r0 + band)],
                         bias)
    return out.permute(0, 3, 1, 2)


def _store_tiles(tiles: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None) -> None:
    """``target`` (h, w, c) = ``tiles`` (rows, 4, columns, 4, c) (+ ``bias``), cropped: the whole tiles through a
    5-d view of ``target``, the partial ones on the bottom and right edges through small reshapes."""
    h, w, c = target.shape
    rows, cols = h // 4, w // 4
    parts = [(tiles[:rows, :, :cols], target[: 4 * rows, : 4 * cols].view(rows, 4, cols, 4, c))]
    if h > 4 * rows:
        parts.append((tiles[rows].reshape(4, -1, c)[: h - 4 * rows, :w], target[4 * rows:]))
    if w > 4 * cols:
        parts.append((tiles[:rows, :, cols].reshape(4 * rows, 4, c)[:, : w - 4 * cols], target[: 4 * rows, 4 * cols:]))
    for source, dest in parts:
        if bias is None:
            dest.copy_(source)
        else:
            torch.add(source, bias, out=dest)


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


def managed(layer: nn.Module) -> bool:
    """Whether ComfyUI casts or patches this layer's weights on the fly: then its ``comfy.ops`` path must run."""
    return bool(getattr(layer, "comfy_cast_weights", False) or getattr(layer, "weight_function", None)
                or getattr(layer, "bias_function", None))


def _fingerprint(weight: torch.Tensor, size, bias: torch.Tensor | None = None) -> TensorKey:
    """The key of a copy made from ``weight`` (and ``bias``, where the copy holds it) for inputs of ``size``."""
    return TensorKey((weight, bias), tuple(size))


_AVAILABLE = [None]  # filled on first use, not at import (no probing at import time)


def _check_available() -> None:
    if _AVAILABLE[0] is None:
        _AVAILABLE[0] = _ops_available()


class _DerivedCopies:
    """What both packed layers do with their weight copies (``COPIES``), which are derived data: drop them when
    moving or casting the layer replaces its weights (``Module._apply``: ``.to``, ``.half``, ``.float``; the new
    tensor can get the freed address of the old one, with the same version, which no key can tell apart), and leave
    them out of copies and pickles (oneDNN's reordered tensors cannot be copied), together with the operator
    handle, which names this layer and not its copy."""

    COPIES: tuple = ()

    def _weights_now(self) -> tuple:
        return tuple(None if t is None else (t.data_ptr(), t.dtype, t.device)
                     for t in (self.weight, getattr(self, "bias", None)))

    def _apply(self, fn, *args, **kwargs):
        before = self._weights_now()  # (the old tensors live until replaced: no address is reused meanwhile)
        result = super()._apply(fn, *args, **kwargs)
        if self._weights_now() != before:
            for slot in self.COPIES:
                setattr(self, slot, None)
        return result

    def __getstate__(self):
        state = dict(self.__dict__)
        for slot in (*self.COPIES, "_operator"):
            state.pop(slot, None)
        return state


class PackedConv2d(_DerivedCopies, nn.Conv2d):
    """``nn.Conv2d`` that runs channels-last through oneDNN on the CPU, with its weight reordered once for small
    inputs, or as Winograd F(4x4, 3x3) where that pays (see the module docstring)."""

    _packed: tuple | None = None  # (fingerprint, reordered weight)
    _phases: tuple | None = None  # (fingerprint, 2x2 phase kernels, their bias) for ``upsampled``
    _winograd: tuple | None = None  # (fingerprint with the tiles per band, kernel laid out for them)
    COPIES = ("_packed", "_phases", "_winograd")

    _operator: int | None = None  # handle of the layer while ``as_operators`` marks it (see there)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            if x.dim() == 4 and self.padding_mode == "zeros" and _traced_as_operator(self, x):
                return _OPERATORS["packed_conv2d"](x, self.weight, self.bias, self._operator)
            return super().forward(x)  # traced as the plain layer: the compiler picks its own kernels
        return self._run(x)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dim() != 4 or self.padding_mode != "zeros" or isinstance(self.padding, str)
                or not _eligible(x, self.weight)):
            self._packed = self._phases = self._winograd = None  # stale after a move or a cast
            return super().forward(x)
        if self.uses_winograd(x):
            self._packed = None  # a layer sees one size per model level: no need for both copies
            return winograd_conv3x3(x, self._winograd_kernel(x), self.bias)
        self._winograd = None  # made for another frame size
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

    def _winograd_kernel(self, x: torch.Tensor) -> torch.Tensor:
        """The transformed kernel, in the layout for ``x``'s bands. Made on the first call, not at load: the layout
        depends on the input size, and a kernel made at load in the transform's own layout (4x the weight) stayed
        allocated beside its laid-out copy (freed, but kept by ``keep_freed_memory``'s heap): measured on the
        real-size model, 0.9 GB (64x64 input) to 1.9 GB (184x320) more peak memory and 1-7 s more loading, for no
        faster first frames."""
        band, _ = winograd_bands(*x.shape[-2:], max(self.in_channels, self.out_channels), x.element_size())
        tiles = band * -(-x.shape[-1] // 4)
        key = _fingerprint(self.weight, (tiles,))
        if self._winograd is None or self._winograd[0] != key:
            self._winograd = None  # the old copy goes before the new one is made
            self._winograd = (key, winograd_layout(winograd_kernel(self.weight), tiles))
        return self._winograd[1]

    def _wide_3x3(self) -> bool:
        return self._is_same_3x3() and min(self.in_channels, self.out_channels) >= WINOGRAD_MIN_CHANNELS

    def _is_same_3x3(self) -> bool:
        return (self.kernel_size == (3, 3) and self.stride == (1, 1) and self.padding == (1, 1)
                and self.dilation == (1, 1) and self.groups == 1 and self.padding_mode == "zeros")

    def uses_winograd(self, x: torch.Tensor) -> bool:
        """Whether ``forward`` runs Winograd F(4x4, 3x3) for an input shaped like ``x`` (see the module
        docstring)."""
        return self._wide_3x3() and x.dim() == 4 and x.shape[-1] * x.shape[-2] >= WINOGRAD_MIN_PIXELS

    def can_fold_upsample(self, x: torch.Tensor) -> bool:
        """Whether ``upsampled(x)`` applies: a 3x3, stride-1, padding-1 convolution of one group."""
        return x.dim() == 4 and self._is_same_3x3() and not managed(self) and _eligible(x, self.weight)

    def upsampled(self, x: torch.Tensor) -> torch.Tensor:
        """This convolution of ``x`` upsampled 2x (nearest), computed at ``x``'s resolution: output pixel
        (2i+a, 2j+b) only sees rows i-1+a, i+a and columns j-1+b, j+b of ``x``, so each of the four phases (a, b)
        is a 2x2 convolution whose taps are sums of the 3x3 taps; 16 instead of 36 multiply-adds per input pixel
        and channel pair. Only where ``can_fold_upsample(x)``. The phase kernels (16/9 of the weight) are kept,
        reordered for small inputs like ``forward``'s weight."""
        n, _, h, w = x.shape
        x = x.contiguous(memory_format=torch.channels_last)
        self._winograd = None  # made for a call without the upsample, not needed here
        key = _fingerprint(self.weight, x.shape, self.bias)  # the phases' bias is a copy too
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


class PackedLinear(_DerivedCopies, nn.Linear):
    """``nn.Linear`` that runs through oneDNN on the CPU with its weight reordered once (see the module
    docstring)."""

    _packed: tuple | None = None
    _halves: tuple | None = None  # (fingerprint, reordered first and second halves, their biases)
    COPIES = ("_packed", "_halves")
    gated = False  # only ever called through ``gated_gelu`` (set by its owner): ``prepare`` makes the halves
    # called once per weight (set by its owner; e.g. the keys and values of a constant prompt, which the engine
    # computes once and keeps): PyTorch's product, no reordered copy kept
    single_use = False

    _operator: int | None = None  # handle of the layer while ``as_operators`` marks it (see there)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            if _traced_as_operator(self, x):
                return _OPERATORS["packed_linear"](x, self.weight, self.bias, self._operator)
            return F.linear(x, self.weight, self.bias)
        return self._run(x)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(x.shape[-1], 1)
        if self.single_use or x.dim() < 2 or rows == 0 or not _eligible(x, self.weight):
            self._packed = None
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self._reordered(), self.bias, "none", [], "")

    def _reordered(self) -> torch.Tensor:
        # one reordered weight serves any number of rows (oneDNN's row hint made no difference, measured)
        key = _fingerprint(self.weight, ())
        if self._packed is None or self._packed[0] != key:
            self._packed = None
            self._packed = (key, torch.ops.mkldnn._reorder_linear_weight(self.weight))
        return self._packed[1]

    def _reordered_halves(self) -> tuple:
        key = _fingerprint(self.weight, (), self.bias)  # the halves' biases are views of this one
        if self._halves is None or self._halves[0] != key:
            self._halves = None
            n = self.out_features // 2
            halves = [torch.ops.mkldnn._reorder_linear_weight(part.contiguous())
                      for part in (self.weight[:n], self.weight[n:])]
            biases = [None, None] if self.bias is None else [self.bias[:n].contiguous(), self.bias[n:].contiguous()]
            self._halves = (key, *halves, *biases)
        return self._halves[1:]

    def prepare(self) -> bool:
        """Make the reordered weight now (the halves if ``gated``) rather than on the first call, where the packed
        path would run; whether it did. The copy does not depend on the input, so loading can pay for it instead
        of the first frame."""
        with torch.no_grad():  # eligible as under the engine's inference mode
            if (self.single_use or managed(self) or self.weight.dim() != 2
                    or not _eligible(self.weight, self.weight)):
                return False
            if self.gated:
                self._reordered_halves()
            else:
                self._reordered()
        return True

    def gated_gelu(self, x: torch.Tensor) -> torch.Tensor:
        """``h * gelu(gate)`` where ``h, gate = self(x).chunk(2, -1)`` (a GEGLU), from the two halves' reordered
        weights: no (rows, 2 * width) intermediate and no chunk copies."""
        if torch.compiler.is_compiling() and _traced_as_operator(self, x):
            return _OPERATORS["packed_gated_gelu"](x, self.weight, self.bias, self._operator)
        return self._run_gated_gelu(x)

    def _run_gated_gelu(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() or x.dim() < 2 or managed(self) or not _eligible(x, self.weight):
            if not torch.compiler.is_compiling():
                self._halves = None  # stale after a move or a cast
            h, gate = self(x).chunk(2, dim=-1)  # through the layer's own forward (ComfyUI's cast path)
            return h * F.gelu(gate)
        weight_h, weight_gate, bias_h, bias_gate = self._reordered_halves()
        x = x.contiguous()
        # GELU and the product as separate passes: as oneDNN post-ops both ran slower (on a 1024x512x2048
        # product: 23 vs 17 ms for the GELU on a Zen 3 EPYC; 9.3 vs 4.9 ms for the product on a Zen 5 one)
        gate = F.gelu(torch.ops.mkldnn._linear_pointwise(x, weight_gate, bias_gate, "none", [], ""))
        return torch.ops.mkldnn._linear_pointwise(x, weight_h, bias_h, "none", [], "").mul_(gate)


# ---------------------------------------------------------------------------------------------- under torch.compile
# Traced as plain layers, these convolutions and matrix products would run as torch's (a weight reorder per call,
# no Winograd): compiled networks ran about 2x slower than eager ones with the packed layers. ``as_operators``
# marks a network's packed layers so that torch.compile keeps each one as a single operator whose call runs the
# packed layer itself; the compiler still fuses and schedules everything between them (normalisations,
# activations, residual sums).

_OPERATOR_LAYERS: dict = {}  # handle -> weakref of the layer
_OPERATOR_HANDLES = itertools.count(1)
_OPERATORS: dict = {}  # name -> this module's registered operator


def _traced_as_operator(layer: nn.Module, x: torch.Tensor) -> bool:
    weight = layer.weight
    return (layer._operator is not None and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.device.type == "cpu" and weight.dtype == torch.float32 and not managed(layer)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def _operator_layer(handle: int) -> nn.Module:
    layer = _OPERATOR_LAYERS[handle]()
    if layer is None:
        raise RuntimeError("a compiled network called a packed layer that no longer exists")
    return layer


def _register_operators() -> None:
    """Defines the ``streamvsr::packed_*`` operators (on the first ``as_operators``). Each output is laid out as
    its fake (shape-only) version promises the compiler: channels-last for convolutions, contiguous for the rest.
    Another copy of this module in the process (the pack imported under a second name) has its own handles, so
    it gets its own namespace: ``streamvsr_2`` and so on."""
    if _OPERATORS:
        return
    namespace = "streamvsr"
    for n in itertools.count(2):
        if not hasattr(getattr(torch.ops, namespace), "packed_conv2d"):
            break
        namespace = f"streamvsr_{n}"
    args = "(Tensor x, Tensor weight, Tensor? bias, int layer) -> Tensor"

    def conv(x, weight, bias, layer):
        return _operator_layer(layer)._run(x).contiguous(memory_format=torch.channels_last)

    def conv_shape(x, weight, bias, layer):
        conv = _operator_layer(layer)
        y = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        return y.contiguous(memory_format=torch.channels_last)

    def linear(x, weight, bias, layer):
        return _operator_layer(layer)._run(x).contiguous()

    def linear_shape(x, weight, bias, layer):
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    def gated_gelu(x, weight, bias, layer):
        return _operator_layer(layer)._run_gated_gelu(x).contiguous()

    def gated_gelu_shape(x, weight, bias, layer):
        return x.new_empty(*x.shape[:-1], weight.shape[0] // 2)

    for name, run, shape in (("packed_conv2d", conv, conv_shape), ("packed_linear", linear, linear_shape),
                             ("packed_gated_gelu", gated_gelu, gated_gelu_shape)):
        op = torch.library.custom_op(f"{namespace}::{name}", run, mutates_args=(), schema=args)
        op.register_fake(shape)
        _OPERATORS[name] = getattr(getattr(torch.ops, namespace), name)


def as_operators(module: nn.Module) -> int:
    """Marks the packed layers of ``module`` so that torch.compile keeps each as one operator running the packed
    layer (see above); how many. Eager calls are unchanged. Without packed layers (a GPU) nothing is registered."""
    layers = [layer for layer in module.modules() if isinstance(layer, (PackedConv2d, PackedLinear))]
    if layers:
        _register_operators()
    for layer in layers:
        if layer._operator is None:
            layer._operator = next(_OPERATOR_HANDLES)
            _OPERATOR_LAYERS[layer._operator] = weakref.ref(layer, functools.partial(_forget_operator, layer._operator))
    return len(layers)


def _forget_operator(handle: int, _ref) -> None:
    _OPERATOR_LAYERS.pop(handle, None)


def prepare_packed(module: nn.Module) -> int:
    """``prepare`` the packed linear layers of ``module`` (``PackedLinear.prepare``): the weight copies that do not
    depend on the input, which loading can make instead of the first frame; how many layers made one. (The
    convolutions' copies depend on the input size: see ``PackedConv2d._winograd_kernel``.)"""
    return sum(layer.prepare() for layer in module.modules() if isinstance(layer, PackedLinear))


def forget_packed(module: nn.Module) -> int:
    """Drop the weight copies kept by the packed layers of ``module``; how many layers held one. For whoever changes
    weights in place in a way PyTorch does not count (see ``TensorKey``); the next call makes them again."""
    held = 0
    for layer in module.modules():
        if isinstance(layer, (PackedLinear, PackedConv2d)):
            held += any(getattr(layer, slot) is not None for slot in layer.COPIES)
            for slot in layer.COPIES:
                setattr(layer, slot, None)
    return held


def packed_operations(base=None) -> types.SimpleNamespace:
    """The layer namespace ``base`` (``torch.nn`` by default) with ``Conv2d`` and ``Linear`` that run as the packed
    layers. ``base`` may be one of ComfyUI's ``comfy.ops`` classes: its layers come first in the mixed classes, so
    ComfyUI's forward still decides, and its cast path runs whenever ComfyUI casts or patches the weights on the
    fly; the packed path runs otherwise (a CPU-only ComfyUI keeps fp32 weights in place)."""
    source = nn if base is None else base
    names = {name: getattr(source, name) for name in dir(source) if not name.startswith("_")}
    return types.SimpleNamespace(**dict(names, Conv2d=_mixed(source.Conv2d, PackedConv2d),
                                        Linear=_mixed(source.Linear, PackedLinear)))


@functools.lru_cache(maxsize=None)
def _mixed(layer: type, packed: type) -> type:
    if issubclass(packed, layer):  # torch.nn's own layer
        return packed
    return type(packed.__name__, (layer, packed), {"__module__": __name__, "__qualname__": packed.__name__})
