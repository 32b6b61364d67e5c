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


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "fp32" or mm.is_device_cpu(device):
        if precision in ("fp16", "bf16"):
            log.warning("StreamVSR: %s was asked for on the CPU; using fp32", precision)
        return torch.float32
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    if mm.should_use_bf16(device):
        return torch.bfloat16
    if mm.should_use_fp16(device):
        return torch.float16
    return torch.float32


def wrap(model: torch.nn.Module) -> "comfy.model_patcher.ModelPatcher":
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def operations_for(dtype: torch.dtype, device: torch.device):
    # disable_weight_init layers skip random init and take part in ComfyUI's low-VRAM partial loading.
    return comfy.ops.pick_operations(dtype, dtype, load_device=device)


def tensor_to_preview(frame: torch.Tensor):
    """(1, 3, H, W) [0,1] -> PIL image for the progress preview."""
    from PIL import Image

    arr = (frame[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(arr)
