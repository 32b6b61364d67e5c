"""The engine contract every model family implements, and the family descriptor.

An engine turns low-resolution frames into upscaled frames, causally, with all it carries between calls in an
explicit, immutable *state* (so a sequence can be split anywhere, stored between ComfyUI queue runs, or saved to
disk for resuming, and the output does not change):

``new_state(seed) -> state``
    A fresh sequence.
``push(state, frames, consume=False) -> (outputs, state)``
    ``frames``: (n, 3, h, w) float in [0, 1] (any device). ``outputs``: the frames that became final, (m, 3, H, W)
    float32 in [0, 1], in order. A one-in-one-out model (Stream-DiffVSR) returns m = n; a chunked, look-ahead
    model (FlashVSR) returns nothing until it has a chunk and then several frames at once, ``pending(state)``
    frames behind the input. ``consume=True``: the caller will not use ``state`` again, so the engine may take it
    apart while it works (FlashVSR then holds one attention cache instead of two); a state that is kept (stored
    between queue runs, queued for a checkpoint) must be a copy (``to``) or not be consumed.
``flush(state, consume=False) -> (outputs, state)``
    The end of the sequence: every frame still held back. Afterwards the total output count equals the input count.
``reset_temporal(state, consume=False) -> (outputs, state)``
    A scene cut: the frames pushed so far are finished (returned, as at a flush) and the next frame starts a new
    shot without temporal guidance from the previous one.
``pending(state) -> int``
    Frames pushed but not yet returned.
``identity() -> str``
    Model, precision and every option that changes the output: two engines with equal identities render
    the same frames (used to refuse resuming a job with other settings): "family|field|...". Fields added in
    a later release go last, named in ``LATER_IDENTITY_FIELDS``: an identity saved without one is compared
    without it.
``estimate_memory(h, w) -> int``
    Rough peak activation bytes for LR frames of h x w, beyond the weights.
``state_from_dict(tensors, meta) -> state``; states have ``to(device)`` and ``to_dict() -> (tensors, meta)``
    (safetensors-ready) for resume files. A restored state is ready for ``push`` (the engine moves what it
    needs to its device, when restoring or when stepping).
``scale``
    Output side / input side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

# "name=" of the fields an engine identity gained after resume files held it (see ``identity()`` above)
PARTS_FIELD = "parts="  # Stream-DiffVSR: a checksum of every network's first and last weights
LATER_IDENTITY_FIELDS = (PARTS_FIELD,)


class Engine(Protocol):
    scale: int

    def new_state(self, seed: int) -> Any: ...

    def push(self, state: Any, frames: torch.Tensor, consume: bool = False) -> tuple[torch.Tensor, Any]: ...

    def flush(self, state: Any, consume: bool = False) -> tuple[torch.Tensor, Any]: ...

    def reset_temporal(self, state: Any, consume: bool = False) -> tuple[torch.Tensor, Any]: ...

    def pending(self, state: Any) -> int: ...

    def identity(self) -> str: ...

    def estimate_memory(self, h: int, w: int) -> int: ...

    def state_from_dict(self, tensors: dict, meta: dict) -> Any: ...


@dataclass(frozen=True)
class Family:
    """What the command line, the video loop and the nodes need to know about a model family.

    name: short id used in options and messages; title: for people.
    scale: default output/input ratio. frame_rule: how frames come out (one line, for documentation and errors).
    size_multiple: LR sides are padded to a multiple of this internally (and cropped back).
    dtypes: compute precisions the family supports.
    detect(path) -> bool: whether a file or folder holds this family's weights (checked cheaply: names, keys).
    load_engine(path, device, dtype, **options) -> Engine; options: the family-specific option names it takes.
    convert(source, out_path, dtype, **options) -> Path: pack the weights into one file (None if not offered).
    check_size(h, w, **options): raises a one-line error when the options cannot run LR frames of h x w, without
    any weights (None: any size runs).
    memory_options: (option, value) pairs of its options that lower the memory a frame takes, the most useful
    first (the advice after running out of memory).
    """

    name: str
    title: str
    scale: int
    frame_rule: str
    size_multiple: int
    dtypes: tuple[torch.dtype, ...]
    detect: Callable[[Path], bool]
    load_engine: Callable[..., Engine]
    options: tuple[str, ...] = field(default=())
    convert: Callable[..., Path] | None = None
    check_size: Callable[..., None] | None = None
    memory_options: tuple[tuple[str, Any], ...] = field(default=())
