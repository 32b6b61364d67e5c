"""FlashVSR (arXiv 2510.12747): one-step streaming video super-resolution on a Wan2.1 DiT with
locality-constrained sparse attention and a tiny conditional decoder, in plain PyTorch.

``dit`` the DiT, ``attention`` the exact block-sparse attention and KV cache, ``rope`` the 3-axis RoPE,
``lq_proj`` the LR conditioning projection (v1 and v1.1 arithmetic), ``tc_decoder`` the TC decoder, ``color``
the colour fixes, ``frames`` frame and size arithmetic and the conditioning video, ``weights`` the official and
repackaged files and our single file, ``engine`` the streaming inference.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..contract import Family

DEFAULT_VERSION = "v1.1"

log = logging.getLogger(__name__)


def detect(path) -> bool:
    from .weights import detect as detect_files

    return detect_files(path)


def _version_or_default(path, version: str | None) -> str | None:
    """``version``, else what the files say (``weights.stated_version``: kijai's v1 file by its name, the published
    v1.1 LQ file, a folder named for v1.1 or v1), else v1.1, except for an official LQ file that is not the published
    v1.1 one (the v1 file, most likely): a one-line error asks which. None for a converted file, which records its
    own."""
    from ..shared.errors import UserInputError
    from .weights import find_files, stated_version, unpublished_lq

    if version is not None:
        return version
    files = find_files(path)
    if files.single:
        return None
    stated = stated_version(files)
    if stated is None and unpublished_lq(files):
        raise UserInputError(f"{path} does not say which FlashVSR release it holds, and its {files.lq_proj.name} is "
                             "not the published v1.1 file (the official v1 one has no published hash): choose the "
                             "version, v1 or v1.1 (the loader's version, --flashvsr-version on the command line); "
                             "v1 files run as v1.1 give ghosting")
    return stated or DEFAULT_VERSION


def load_pipeline(path, version: str | None = None, device="cpu", dtype=torch.float32, operations=None):
    """The FlashVSR model at ``path`` as a ``FlashVSRPipeline``. ``version`` defaults to what a converted file
    records, else what the files say, else v1.1."""
    from .engine import FlashVSRPipeline
    from .weights import load_flashvsr

    model = load_flashvsr(path, _version_or_default(path, version), device=device, dtype=dtype, operations=operations)
    return FlashVSRPipeline(model.dit, model.lq_proj, model.tc_decoder, model.prompt.to(device), model.version,
                            model.facts)


def load_engine(path, device="cpu", dtype=torch.float32, version: str | None = None, scale: int = 4,
                sparse_ratio: float = 2.0, local_range: int = 11, kv_ratio: float = 3.0, color_fix: str = "adain",
                attention: str = "auto"):
    """attention: see ``attention.choose_attention`` (checked before the weights are read)."""
    from .attention import choose_attention
    from .engine import FlashVSREngine

    attention = choose_attention(attention, device)
    pipeline = load_pipeline(path, version, device=device, dtype=dtype)
    log.info("loaded FlashVSR %s from %s (%s, %s, %s attention)", pipeline.version, path, dtype, device, attention)
    return FlashVSREngine(pipeline, device=device, compute_dtype=dtype, scale=scale, sparse_ratio=sparse_ratio,
                          local_range=local_range, kv_ratio=kv_ratio, color_fix=color_fix, attention=attention)


def check_size(h: int, w: int, **options) -> None:
    from .engine import check_size as check

    check(h, w, **options)


def convert(source, out_path, dtype=None, version: str | None = None, **_ignored) -> Path:
    """No default version here: the converted file records it for good, so where the files do not say (the
    official names are the same for both releases) the user must."""
    from ..shared.errors import UserInputError
    from .weights import convert_flashvsr, find_files, stated_version

    if version is None:
        files = find_files(source)
        version = None if files.single else stated_version(files)
        if version is None and not files.single:
            raise UserInputError(f"{source} does not say which FlashVSR release it holds (v1 and v1.1 files have the "
                                 "same names and keys): give --flashvsr-version v1 or v1.1, which the converted "
                                 "file records")
    return convert_flashvsr(source, out_path, dtype=dtype, version=version)


FAMILY = Family(
    name="flashvsr", title="FlashVSR", scale=4,
    frame_rule="one output frame per input frame, in chunks of 21 then 8 frames, 4 frames behind the input",
    size_multiple=128, dtypes=(torch.float32, torch.float16, torch.bfloat16), detect=detect,
    load_engine=load_engine,
    options=("version", "scale", "sparse_ratio", "local_range", "kv_ratio", "color_fix", "attention"),
    convert=convert, check_size=check_size, memory_options=(("kv_ratio", 2), ("sparse_ratio", 1.5)))
