"""Keys for values computed once from some tensors (reordered weights, a prompt's keys and values) and kept while
those tensors stay the same."""

from __future__ import annotations

import weakref

import torch


def version(t: torch.Tensor) -> int:
    """``t``'s version counter (bumped by every in-place change PyTorch tracks); -1 for an inference tensor, which
    keeps none."""
    try:
        return t._version
    except RuntimeError:
        return -1


class TensorKey:
    """What a value computed from ``tensors`` (``None`` allowed) depends on, plus any hashable ``extra`` values.

    Two keys are equal while the tensors are the same objects, with the same data pointer, version counter, shape,
    dtype and device. Identity is checked through weak references (the key keeps no tensor alive): without it, a
    weight replaced by a new tensor that the allocator put at the just-freed address of the old one, with the same
    version, would pass for the old one (ComfyUI's weight patching replaces parameters and puts the originals back).

    What no key can see is an in-place change that PyTorch does not count: one made through ``.data`` (which has
    its own counter; ComfyUI's in-place weight patches do that), or to an inference tensor inside
    ``torch.inference_mode`` (inference tensors have none).
    Whoever changes weights that way must drop the values kept from them (``packed.forget_packed``; a new engine).
    """

    __slots__ = ("_refs", "_marks")

    def __init__(self, tensors, extra=()):
        tensors = tuple(tensors)
        self._refs = tuple(None if t is None else weakref.ref(t) for t in tensors)
        self._marks = (tuple(None if t is None else (t.data_ptr(), version(t), tuple(t.shape), t.dtype, t.device)
                             for t in tensors), tuple(extra))

    def __eq__(self, other) -> bool:
        if not isinstance(other, TensorKey) or self._marks != other._marks:
            return False
        # equal marks: the same tensors are None in both; a dead reference is a tensor that is gone
        return all(a is b or (a() is not None and a() is b()) for a, b in zip(self._refs, other._refs))

    __hash__ = None  # compared, never used as a dict key (the weak references would not hash the tensors)
