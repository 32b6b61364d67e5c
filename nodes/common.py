"""Shared ComfyUI glue: model folders, custom types, model loading through ModelPatcher."""

from __future__ import annotations

import logging
import os

import folder_paths
import torch
from comfy_api.latest import io

import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops

log = logging.getLogger(__name__)

MODEL_FOLDER = "streamvsr"        # ComfyUI/models/streamvsr: Stream-DiffVSR folders and single files
FLOW_FOLDER = "streamvsr_flow"    # ComfyUI/models/streamvsr/raft: torchvision RAFT weights
DOWNLOAD_MODEL = "(download) Jamichsu/Stream-DiffVSR"
DOWNLOAD_RAFT = {"(download) raft_large": "raft_large", "(download) raft_small": "raft_small"}
CATEGORY = "StreamVSR"

VSRModel = io.Custom("STREAMVSR_MODEL")
FlowModel = io.Custom("STREAMVSR_FLOW_MODEL")
StreamStateType = io.Custom("STREAMVSR_STATE")
FlowField = io.Custom("STREAMVSR_FLOW")


def register_folders() -> None:
    """Add our folders, keeping whatever extra_model_paths.yaml already registered under the same names."""
    base = os.path.join(folder_paths.models_dir, "streamvsr")
    for name, path, exts in ((MODEL_FOLDER, base, {".safetensors", ".json"}),
                             (FLOW_FOLDER, os.path.join(base, "raft"), {".pth", ".safetensors"})):
        folder_paths.add_model_folder_path(name, path)
        folder_paths.folder_names_and_paths[name] = (folder_paths.get_folder_paths(name), exts)


def model_choices() -> list[str]:
    """Official hub folders (found by their model_index.json) and single .safetensors files."""
    components = {"unet", "controlnet", "vae", "text_encoder"}
    choices = set()
    for name in folder_paths.get_filename_list(MODEL_FOLDER):
        parts = name.replace("\\", "/").split("/")
        if parts[0] == "raft":  # the flow folder lies inside ours
            continue
        if parts[-1] == "model_index.json" and len(parts) > 1:
            choices.add("/".join(parts[:-1]))
        elif parts[-1].endswith(".safetensors") and not (len(parts) > 1 and parts[-2] in components):
            choices.add("/".join(parts))
    return sorted(choices) + [DOWNLOAD_MODEL]


def resolve_model_path(choice: str) -> str:
    if choice == DOWNLOAD_MODEL:
        from ..models.hub import download_stream_diffvsr

        return str(download_stream_diffvsr(os.path.join(folder_paths.get_folder_paths(MODEL_FOLDER)[0],
                                                        "Stream-DiffVSR")))
    for root in folder_paths.get_folder_paths(MODEL_FOLDER):
        path = os.path.join(root, choice)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"{choice} is not in any {MODEL_FOLDER} model folder "
                            f"({', '.join(folder_paths.get_folder_paths(MODEL_FOLDER))})")


def flow_choices() -> list[str]:
    return sorted(folder_paths.get_filename_list(FLOW_FOLDER)) + list(DOWNLOAD_RAFT)


def resolve_flow_path(choice: str) -> str:
    if choice in DOWNLOAD_RAFT:
        from ..models.flow import download_raft

        return str(download_raft(DOWNLOAD_RAFT[choice], folder_paths.get_folder_paths(FLOW_FOLDER)[0]))
    return folder_paths.get_full_path_or_raise(FLOW_FOLDER, choice)


SUPPORTED_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_precision(precision: str, device: torch.device, params: int = 0) -> tuple[torch.dtype, torch.dtype]:
    """(weight dtype, compute dtype). auto asks ComfyUI, so --fp32-unet/--bf16-unet and --cpu are honoured."""
    if mm.is_device_cpu(device):
        if precision in ("fp16", "bf16"):
            log.warning("StreamVSR: %s was asked for but the model runs on the CPU; using fp32", precision)
        return torch.float32, torch.float32
    if precision in PRECISIONS:
        return PRECISIONS[precision], PRECISIONS[precision]
    # bf16 first: same speed as fp16 where it exists, without fp16's overflow risk in attention.
    weight = mm.unet_dtype(device=device, model_params=params, supported_dtypes=SUPPORTED_DTYPES)
    compute = mm.unet_manual_cast(weight, device, SUPPORTED_DTYPES) or weight
    return weight, compute


def weights_params(path: str) -> int:
    """Parameter count estimated from the fp32 weight files (ComfyUI's dtype choice takes model size into account)."""
    total = 0
    if os.path.isdir(path):
        for sub in ("unet", "controlnet", "vae"):
            folder = os.path.join(path, sub)
            if os.path.isdir(folder):
                total += sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
                             if f.endswith((".safetensors", ".bin")))
    elif os.path.isfile(path):
        total = os.path.getsize(path) * 2  # single files are written in fp16
    return total // 4


def wrap(model: torch.nn.Module) -> "comfy.model_patcher.ModelPatcher":
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def operations_for(weight_dtype: torch.dtype, compute_dtype: torch.dtype, device: torch.device):
    # disable_weight_init (equal dtypes) or manual_cast layers skip random init and take part in ComfyUI's
    # low-VRAM partial loading (weights cast to the input's device and dtype on the fly).
    return comfy.ops.pick_operations(weight_dtype, compute_dtype, load_device=device, disable_fast_fp8=True)


def load_flow_patcher(flow_patcher, memory_required: int = 0):
    """Load the flow model fully on its device and return the estimator.

    RAFT is only 20 MB and runs 12 update iterations per frame: casting its layers on the fly each time would
    cost far more than it saves, so it is always loaded whole, also under --novram (where load_models_gpu
    ignores force_full_load).
    """
    mm.load_models_gpu([flow_patcher], memory_required=memory_required, force_full_load=True)
    if getattr(flow_patcher.model, "model_lowvram", False):
        flow_patcher.partially_load(flow_patcher.load_device, extra_memory=flow_patcher.model_size())
    return flow_patcher.model


def load_for_inference(model_patcher, flow_patcher, memory_required: int):
    """Make room for both models plus one frame's activations; ComfyUI offloads other models as needed.

    The denoiser goes first (it may be partially loaded under --lowvram/--novram); the small flow model last,
    so that loading the big one cannot push it off the device again.
    """
    flow_size = flow_patcher.model_size() if flow_patcher is not None else 0
    mm.load_models_gpu([model_patcher], memory_required=memory_required + flow_size)
    if flow_patcher is not None:
        load_flow_patcher(flow_patcher, memory_required)


def prepare_engine(model_patcher, flow_patcher, steps: int, lr_size: tuple[int, int]):
    """A StreamEngine in the loader's compute precision, with both models loaded for frames of ``lr_size``."""
    from ..models.engine import StreamEngine

    pipe = model_patcher.model
    compute_dtype = getattr(pipe, "streamvsr_compute_dtype", None) or pipe.dtype
    engine = StreamEngine(pipe, flow_patcher.model, steps=steps, device=model_patcher.load_device,
                          compute_dtype=compute_dtype)
    load_for_inference(model_patcher, flow_patcher, engine.estimate_memory(*lr_size))
    return engine


def as_rgb(images: torch.Tensor, what: str) -> torch.Tensor:
    """IMAGE (B, H, W, C) with C in 1/3/4 -> (B, H, W, 3) (a view or a new tensor; the input is not modified)."""
    if images.ndim == 3:  # a single H x W x C frame
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[0] == 0 or images.shape[1] == 0 or images.shape[2] == 0:
        raise ValueError(f"{what} got an empty or malformed image batch of shape {tuple(images.shape)}; "
                         "expected (frames, height, width, channels) with at least one frame")
    channels = images.shape[-1]
    if channels == 1:
        return images.expand(-1, -1, -1, 3)
    if channels == 4:
        return images[..., :3]  # alpha is dropped, as PIL's RGBA->RGB conversion does
    if channels != 3:
        raise ValueError(f"{what} expects RGB, RGBA or grayscale frames, got {channels} channels")
    return images


def tensor_to_preview(frame: torch.Tensor):
    """(1, 3, H, W) [0,1] -> PIL image for the progress preview."""
    from PIL import Image

    arr = (frame[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(arr)
