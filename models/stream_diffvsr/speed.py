"""Speed: convolution weight layouts that follow their inputs (exact), and the opt-in compiled path.

PyTorch runs a convolution in channels-last whenever its input *or* its weight is channels-last, and otherwise
in the default layout; the two give slightly different roundings. In the UNet and ControlNet a transformer block
returns channels-last strides, so every convolution after it runs channels-last, and PyTorch copies that
convolution's (default-layout) weight into channels-last on every call: for the 1024-channel 3x3 convolutions
that is 38 MB per call, a few GB per frame.

``pin_conv_layouts`` stores each convolution's weight in the layout its input has, so the copy is made once. The
rule PyTorch applies is unchanged (the input decides, the weight no longer has to be converted), so every
convolution runs exactly the kernel it ran before and the output is bit-identical; a convolution whose input
layout changes (another frame size) simply gets its weight converted back.

``compiled`` is the opt-in ``torch.compile`` path (``StreamEngine(compile=True)``): networks in channels-last,
shapes static per sequence, compiled once per session and frame size, eager with a warning where compilation is
unavailable. Its numbers differ from the eager ones by float rounding only (fused and reordered operations).
"""

from __future__ import annotations

import logging
import time

import torch
import torch.utils._pytree
from torch import nn

_HOOKED = "_streamvsr_layout_hook"


def _definitely_channels_last(x: torch.Tensor) -> bool:
    # Dense channels-last and not also contiguous (an input with one pixel or one channel is both: there the
    # convolution's own rule decides, so the weight is left as loaded).
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _match_weight_to_input(conv: nn.Conv2d, args) -> None:
    if not args or not torch.is_tensor(args[0]) or torch.compiler.is_compiling():
        return
    weight = getattr(conv, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or weight.device.type == "meta" \
            or weight.shape[-1] * weight.shape[-2] == 1:
        return  # a 1x1 kernel is channels-last and contiguous at once: never copied
    want = _definitely_channels_last(args[0])
    if want == _definitely_channels_last(weight):
        return
    # Channels-last only where the input already makes the convolution run channels-last; everywhere else the
    # weight keeps its loaded (contiguous) layout, so the convolution takes the path it always took.
    layout = torch.channels_last if want else torch.contiguous_format
    # A normal tensor even inside inference_mode, so the weight stays usable for ComfyUI's in-place patching.
    with torch.inference_mode(False), torch.no_grad():
        weight.data = weight.data.contiguous(memory_format=layout)


def pin_conv_layouts(module: nn.Module) -> nn.Module:
    """Make every Conv2d under ``module`` keep its weight in its input's layout (see the module docstring).
    Idempotent; returns ``module``."""
    for m in module.modules():
        # Plain torch layers only: ComfyUI's comfy.ops layers cast and patch their weights themselves, and swapping
        # the weight of one inside ComfyUI's inference mode breaks its convolutions.
        if type(m) is nn.Conv2d and not getattr(m, _HOOKED, False):
            m.register_forward_pre_hook(_match_weight_to_input)
            setattr(m, _HOOKED, True)
    return module


# ---------------------------------------------------------------------------------------------- compiled path

log = logging.getLogger(__name__)

# attribute of a network holding its compiled callables: they live (for the session) as long as the network
_COMPILED = "_streamvsr_compiled"


def _shape_key(args, kwargs) -> tuple:
    flat, _ = torch.utils._pytree.tree_flatten((args, kwargs))
    return tuple((tuple(a.shape), a.dtype, a.device.type) if torch.is_tensor(a) else type(a).__name__ for a in flat)


class CompiledCall:
    """``torch.compile(fn, dynamic=False)`` with a report and a way out.

    Shapes are static: each new set of input shapes (a new frame size) compiles once, and the time that took is
    logged and added to ``seconds``. If compilation is unavailable or fails, the call runs eagerly and one
    warning line says why; from then on this network runs eagerly.
    """

    def __init__(self, fn, label: str):
        self.eager, self.label = fn, label
        self.compiled = None
        self.failed = False
        self.seen: set = set()
        self.seconds = 0.0

    def __call__(self, *args, **kwargs):
        if self.failed:
            return self.eager(*args, **kwargs)
        key = _shape_key(args, kwargs)
        first = key not in self.seen
        start = time.perf_counter()
        try:
            if self.compiled is None:
                self.compiled = torch.compile(self.eager, dynamic=False)
            out = self.compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any failure of the compiler; the eager run below tells real errors
            out = self.eager(*args, **kwargs)  # an error of the inputs themselves raises here, as without compile
            self.failed = True
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            log.warning("torch.compile of the %s is unavailable (%s: %s); running it eagerly", self.label,
                        type(e).__name__, reason)
            return out
        if first:
            self.seen.add(key)
            elapsed = time.perf_counter() - start
            self.seconds += elapsed
            log.info("compiled the %s for %s in %.1f s (kept for this session)", self.label,
                     "x".join(str(s) for s in key[0][0]) if key and isinstance(key[0], tuple) else "its inputs",
                     elapsed)
        return out


def compiled(module: nn.Module, method: str, label: str, channels_last: bool = True) -> CompiledCall:
    """The session's compiled ``module.<method>`` (made on first use). ``channels_last`` stores the module's
    4-D weights channels-last, so its convolutions run channels-last (faster with oneDNN and cuDNN)."""
    calls = module.__dict__.setdefault(_COMPILED, {})
    if method not in calls:
        if channels_last:
            module.to(memory_format=torch.channels_last)
        calls[method] = CompiledCall(getattr(module, method), label)
    return calls[method]
