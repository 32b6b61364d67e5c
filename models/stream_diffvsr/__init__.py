"""Stream-DiffVSR (arXiv 2512.23709): a 4-step distilled x4 diffusion upscaler guided by the flow-warped previous
output, in plain PyTorch.

``unet``/``controlnet``/``tiny_vae``/``clip_text``/``scheduler`` the networks, ``pipeline`` the loaded set,
``loader`` the official folder and our single file, ``hub`` the download, ``engine`` the streaming inference.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..contract import Family
from ..raft import MEMORY_OPTIONS as RAFT_MEMORY_OPTIONS

SINGLE_FILE_FORMAT = "streamvsr/stream-diffvsr"
log = logging.getLogger(__name__)


def detect(path) -> bool:
    path = Path(path)
    if path.is_dir():
        return (path / "model_index.json").is_file() or all((path / sub).is_dir() for sub in ("unet", "controlnet"))
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == SINGLE_FILE_FORMAT
    except Exception:  # unreadable files are reported by the loader, with the reason
        return False


# said where compiling is asked for on the CPU
COMPILE_ON_CPU = ("compiling takes minutes, and the compiled networks ran as fast as the default CPU layers at small "
                  "sizes and up to 5 % faster at a 1280x736 output: it pays only on long videos; it is meant for GPUs")


def load_engine(path, device="cpu", dtype=torch.float32, flow=None, steps: int = 4, corr: str = "auto",
                flow_downscale: int = 1, compile: bool = False, plain_layers: bool = False,
                compile_mode: str | None = None, flow_iterations: int = 12):
    """The official folder or a single file, plus RAFT weights ``flow``, as a ready StreamEngine (``compile``:
    the torch.compile path, see speed.py, with ``torch.compile``'s ``compile_mode``; ``plain_layers``: torch's
    layers on the CPU too, for less memory). On the CPU it also tells glibc to keep freed large blocks for reuse,
    for the whole process (``shared.runtime.keep_freed_memory``; the environment can say otherwise)."""
    from ..raft.weights import load_raft
    from ..shared.errors import UserInputError
    from ..shared.norms import layout_setting
    from ..shared.packed import packed_operations, prepare_packed
    from ..shared.runtime import keep_freed_memory
    from .engine import StreamEngine
    from .loader import load_pipeline

    if not flow:
        raise UserInputError("Stream-DiffVSR needs optical flow: give --flow PATH (torchvision RAFT weights, "
                             "e.g. from `streamvsr download`)")
    layout_setting()  # a wrong STREAMVSR_CHANNELS_LAST is reported before the models load
    on_cpu = torch.device(device).type == "cpu"
    if on_cpu:  # its activations at video sizes are blocks of hundreds of MB: see keep_freed_memory
        keep_freed_memory()
    if compile and on_cpu:
        log.warning("--compile on the CPU: %s", COMPILE_ON_CPU)
    if plain_layers and not (on_cpu and dtype == torch.float32):
        log.warning("--plain-layers changes nothing here: the CPU layers it turns off are used on the CPU in fp32 "
                    "only")
    # On the CPU in fp32 the layers (RAFT's too) keep oneDNN-reordered weights and run wide 3x3 convolutions as
    # Winograd (see shared/packed.py): the same numbers up to float rounding, 1.7-2.3x faster per frame.
    operations = packed_operations() if on_cpu and dtype == torch.float32 and not plain_layers else None
    # RAFT first: 20 MB, so a wrong or damaged flow file is reported before gigabytes of the model are read
    estimator = load_raft(flow, operations=operations, device=device, corr=corr, downscale=flow_downscale,
                          num_flow_updates=flow_iterations)
    pipe = load_pipeline(path, device=device, dtype=dtype, operations=operations)
    if operations is not None:  # the linear layers' copies (independent of the frame size): now, not in frame 0
        prepare_packed(pipe)
    return StreamEngine(pipe, estimator, steps=steps, device=device, compute_dtype=dtype, compile=bool(compile),
                        compile_mode=compile_mode)


def convert(source, out_path, dtype=torch.float16, **_ignored) -> Path:
    from .loader import convert_to_single_file

    return convert_to_single_file(source, out_path, dtype=dtype)


FAMILY = Family(
    name="stream-diffvsr", title="Stream-DiffVSR", scale=4,
    frame_rule="one output frame per input frame, immediately", size_multiple=4,
    dtypes=(torch.float32, torch.float16, torch.bfloat16), detect=detect, load_engine=load_engine,
    options=("flow", "steps", "corr", "flow_downscale", "flow_iterations", "compile", "plain_layers"),
    convert=convert,
    memory_options=RAFT_MEMORY_OPTIONS)

__all__ = ["FAMILY", "SINGLE_FILE_FORMAT", "detect", "load_engine"]
