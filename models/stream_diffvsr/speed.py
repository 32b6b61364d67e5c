"""The opt-in compiled path (``StreamEngine(compile=True)``): networks in channels-last, ``torch.compile`` with
shapes static per sequence, compiled once per session and frame size, eager with a one-line warning where
compilation is unavailable. The CPU layers (shared/packed.py) stay whole as operators of the compiled graph, so
their Winograd and reordered weights are kept; what lies between them is fused. Its numbers differ from the eager
ones by float rounding only (fused and reordered operations, channels-last convolutions).

``mode`` is handed to ``torch.compile`` (None: its default). The modes that replay CUDA graphs on a GPU
("reduce-overhead", "max-autotune") keep their outputs in memory that the next replay overwrites, and the engine
holds outputs across calls (the ControlNet's residuals into the UNet, the decoder's output into the next frame), so
the device outputs of those modes are copied out of the graph's memory before they are returned.
"""

from __future__ import annotations

import itertools
import logging
import time
import types

import torch
import torch.utils._pytree
from torch import nn

from ..shared.errors import first_line
from ..shared.packed import as_operators
from ..shared.runtime import is_out_of_memory, recompile_limit, recompile_limit_hit

# ---------------------------------------------------------------------------------------------- compiled path

log = logging.getLogger(__name__)

# attribute of a network holding its compiled callables: they live (for the session) as long as the network
_COMPILED = "_streamvsr_compiled"
# torch.compile modes that capture CUDA graphs on a GPU
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
# graphs (frame sizes) kept per compiled network (Dynamo's default is 8 per code object)
RECOMPILE_LIMIT = 64
# Why torch.compile failed in this process, once it has: a missing C++ compiler or Triton fails every network the
# same way, each after tracing it (minutes for the real ones), so the others are not tried again.
_COMPILER_FAILURE: str | None = None


def _own_device_outputs(out):
    """``out`` with its tensors off the CPU copied: a CUDA graph's outputs live in memory that its next replay
    reuses (the CPU has no graphs)."""
    return torch.utils._pytree.tree_map(
        lambda t: t.clone() if torch.is_tensor(t) and t.device.type != "cpu" else t, out)


def _reason(error: BaseException) -> str:
    """The innermost cause of a compiler failure, in one line: Dynamo's own first line is only "backend='inductor'
    raised:", which says nothing about why (a missing C++ compiler, a missing Triton)."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = getattr(error, "inner_exception", None) or error.__cause__
        if inner is None:
            break
        error = inner
    return f"{type(error).__name__}: {first_line(error)}"


def _shape_key(args, kwargs) -> tuple:
    """What a static-shape graph is specialised to: each tensor's shape, strides, dtype and device."""
    flat, _ = torch.utils._pytree.tree_flatten((args, kwargs))
    return tuple((tuple(a.shape), a.stride(), a.dtype, a.device.type) if torch.is_tensor(a) else type(a).__name__
                 for a in flat)


_CALLS = itertools.count(1)


def _own_code(fn, label: str):
    """A function calling ``fn`` whose code object is its own. Dynamo keeps graphs, and counts them against its
    limits, per code object: compiled as it is, every loaded copy of a network (a model loaded again in ComfyUI)
    would add to one count for the session, freed copies included, until the network ran eagerly."""
    def call(*args, **kwargs):
        return fn(*args, **kwargs)

    name = f"{call.__name__}_{''.join(c if c.isalnum() else '_' for c in label)}_{next(_CALLS)}"
    code = call.__code__.replace(co_name=name)  # (a code object unequal to any other: names are compared too)
    return types.FunctionType(code, call.__globals__, name, call.__defaults__, call.__closure__)


class CompiledCall:
    """``torch.compile(fn, dynamic=False)`` with a report and a way out.

    Shapes are static: each new set of input shapes (a new frame size) compiles once, and the time that took is
    logged and added to ``seconds``. If compilation is unavailable or fails, the call runs eagerly and one
    warning line says why; from then on every network runs eagerly, for the rest of the session.
    """

    def __init__(self, fn, label: str, mode: str | None = None):
        self.eager, self.label, self.mode = fn, label, mode
        self.compiled = None
        self.failed = False
        self.seen: set = set()
        self.seconds = 0.0

    def __call__(self, *args, **kwargs):
        global _COMPILER_FAILURE
        if self.failed or _COMPILER_FAILURE is not None:
            return self.eager(*args, **kwargs)
        key = _shape_key(args, kwargs)
        first = key not in self.seen
        start = time.perf_counter()
        try:
            if self.compiled is None:
                self.compiled = torch.compile(_own_code(self.eager, self.label), dynamic=False, mode=self.mode)
            with recompile_limit(RECOMPILE_LIMIT):
                out = self.compiled(*args, **kwargs)
            if self.mode in CUDA_GRAPH_MODES:
                out = _own_device_outputs(out)
        except recompile_limit_hit():
            # (Dynamo then runs this code eagerly for every shape, the compiled ones too)
            self.failed = True
            log.warning("the %s has been compiled for as many frame sizes as this session keeps (%d); it runs "
                        "eagerly from now on (a restart compiles it again)", self.label, len(self.seen))
            return self.eager(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any failure of the compiler; the eager run below tells real errors
            if is_out_of_memory(e):
                raise  # the frame's own failure (handled by the caller), not the compiler's
            out = self.eager(*args, **kwargs)  # an error of the inputs themselves raises here, as without compile
            self.failed = True
            _COMPILER_FAILURE = _reason(e)
            log.warning("torch.compile is unavailable (it failed on the %s: %s); running the networks eagerly for "
                        "the rest of this session", self.label, _COMPILER_FAILURE)
            return out
        if first:
            self.seen.add(key)
            elapsed = time.perf_counter() - start
            self.seconds += elapsed
            log.info("compiled the %s for %s in %.1f s (kept for this session)", self.label,
                     "x".join(str(s) for s in key[0][0]) if key and isinstance(key[0], tuple) else "its inputs",
                     elapsed)
        return out


def failed_before(module: nn.Module) -> str | None:
    """Why torch.compile failed earlier in this session, where ``module`` has not been compiled since (a model
    loaded after the failure, which runs eagerly too: the failure was said for another model), else None."""
    return _COMPILER_FAILURE if _COMPILER_FAILURE is not None and _COMPILED not in module.__dict__ else None


def compiled(module: nn.Module, method: str, label: str, channels_last: bool = True,
             mode: str | None = None) -> CompiledCall:
    """The session's compiled ``module.<method>`` for ``mode`` (made on first use). ``channels_last`` stores the
    module's 4-D weights channels-last, so its convolutions run channels-last (faster with oneDNN and cuDNN),
    unless its layers are the CPU layers."""
    calls = module.__dict__.setdefault(_COMPILED, {})
    key = (method, mode)
    if key not in calls:
        # The CPU layers stay whole (see shared/packed.py) and choose their own layouts: channels-last copies of
        # their weights would only cost memory. Plain layers are traced.
        if not as_operators(module) and channels_last:
            module.to(memory_format=torch.channels_last)
        calls[key] = CompiledCall(getattr(module, method), label, mode)
    return calls[key]
