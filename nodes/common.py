"""Shared ComfyUI glue: model folders, custom types, model loading through ModelPatcher."""

from __future__ import annotations

import contextlib
import logging
import math
import os

import folder_paths
import torch
from comfy_api.latest import io

import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.utils

from ..models.shared.errors import UserInputError, WeightsError
from ..models.shared.image import to_rgb
from ..models.shared.packed import packed_operations
from ..models.shared.runtime import FP16_ON_CPU, PRECISIONS, is_out_of_memory, weights_checksum
from ..models.shared.weights import safetensors_numel
from ..video.outputs import LOCK_TAG, PARTIAL_TAG, TMP_TAG

log = logging.getLogger(__name__)

MODEL_FOLDER = "streamvsr"        # ComfyUI/models/streamvsr: Stream-DiffVSR folders and single files
FLOW_FOLDER = "streamvsr_flow"    # ComfyUI/models/streamvsr/raft: torchvision RAFT weights
FLASHVSR_FOLDER = "flashvsr"      # ComfyUI/models/flashvsr: FlashVSR folders (official or repackaged), converted files
DOWNLOAD_MODEL = "(download) Jamichsu/Stream-DiffVSR"
DOWNLOAD_RAFT = {"(download) raft_large": "raft_large", "(download) raft_small": "raft_small"}
CATEGORY = "StreamVSR"

VSRModel = io.Custom("STREAMVSR_MODEL")
FlowModel = io.Custom("STREAMVSR_FLOW_MODEL")
StreamStateType = io.Custom("STREAMVSR_STATE")
FlowField = io.Custom("STREAMVSR_FLOW")
FlashVSRModelType = io.Custom("STREAMVSR_FLASHVSR_MODEL")
FlashVSRSettingsType = io.Custom("STREAMVSR_FLASHVSR_SETTINGS")


def continuation_inputs(node_name: str) -> list:
    """The ``state`` and ``start_frame`` inputs of a stateful upscale node called ``node_name``."""
    return [
        StreamStateType.Input("state", optional=True,
                              tooltip=f"Continue from this state (from another {node_name}) instead; takes "
                                      "precedence over continue_sequence. With start_frame connected too, the "
                                      "two must agree on where the chunk starts."),
        io.Int.Input("start_frame", optional=True, force_input=True, min=0, max=2**31 - 1,
                     tooltip="From Load Video Chunk: the chunk's first frame. 0 starts a new sequence; any other "
                             "value continues this node's sequence, which must have ended exactly there (else an "
                             "error says which chunk to queue). Replaces continue_sequence when connected."),
    ]


def register_folders() -> None:
    """Add our folders, keeping whatever extra_model_paths.yaml already registered under the same names."""
    base = os.path.join(folder_paths.models_dir, "streamvsr")
    for name, path, exts in ((MODEL_FOLDER, base, {".safetensors", ".json"}),
                             (FLOW_FOLDER, os.path.join(base, "raft"), {".pth", ".safetensors"}),
                             (FLASHVSR_FOLDER, os.path.join(folder_paths.models_dir, "flashvsr"),
                              {".safetensors", ".ckpt", ".pth"})):
        folder_paths.add_model_folder_path(name, path)
        folder_paths.folder_names_and_paths[name] = (folder_paths.get_folder_paths(name), exts)


SUPPORTED_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def params_in(path) -> int:
    """How many numbers a .safetensors file holds, from its header, for ComfyUI's precision choice (which weighs the
    model's size); 0 for a file that cannot hold weights, which the model's loader, reading every file next,
    reports with what to download."""
    try:
        return safetensors_numel(path)
    except WeightsError:
        return 0


def pick_precision(precision: str, device: torch.device, params: int = 0) -> tuple[torch.dtype, torch.dtype]:
    """(weight dtype, compute dtype). auto asks ComfyUI, so --fp32-unet/--bf16-unet and --cpu are honoured (on a
    CPU: fp32 unless such a flag says otherwise); a precision chosen on the node is used as chosen, as on the
    command line, except fp16 on a CPU, which is refused: it would look like a hang."""
    if precision in PRECISIONS:
        if precision == "fp16" and mm.is_device_cpu(device):
            raise UserInputError(FP16_ON_CPU + ": choose bf16 (the same memory) or auto on the loader")
        return PRECISIONS[precision], PRECISIONS[precision]
    # bf16 first: same speed as fp16 where it exists, without fp16's overflow risk in attention.
    weight = mm.unet_dtype(device=device, model_params=params, supported_dtypes=SUPPORTED_DTYPES)
    compute = mm.unet_manual_cast(weight, device, SUPPORTED_DTYPES) or weight
    return weight, compute


def wrap(model: torch.nn.Module) -> "comfy.model_patcher.ModelPatcher":
    # weight_inplace_update stays off: ComfyUI's in-place patches write through ``.data``, which the CPU layers'
    # kept weight copies cannot notice (models/shared/tensor_key.py); replaced parameters they do notice.
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def operations_for(weight_dtype: torch.dtype, compute_dtype: torch.dtype, device: torch.device,
                   cpu_layers: bool = False):
    # disable_weight_init (equal dtypes) or manual_cast layers skip random init and take part in ComfyUI's
    # low-VRAM partial loading (weights cast to the input's device and dtype on the fly).
    ops = comfy.ops.pick_operations(weight_dtype, compute_dtype, load_device=device, disable_fast_fp8=True)
    if uses_cpu_layers(weight_dtype, compute_dtype, device, cpu_layers):
        # A CPU-only ComfyUI: the same CPU layers as the command line (reordered weights, Winograd), mixed under
        # ComfyUI's classes so that its cast path still runs wherever it casts or patches weights.
        return packed_operations(base=ops)
    return ops


def uses_cpu_layers(weight_dtype: torch.dtype, compute_dtype: torch.dtype, device: torch.device,
                    cpu_layers: bool) -> bool:
    """Whether ``operations_for`` gives the CPU layers: asked for, on a CPU, in fp32."""
    return cpu_layers and device.type == "cpu" and weight_dtype == compute_dtype == torch.float32


def memory_before(activations: int, patcher) -> int:
    """``memory_required`` for the big model, loaded before the small ``patcher`` (the flow model, FlashVSR's TC
    decoder), which is then loaded asking for ``activations``: room for what ``load_models_gpu`` frees for that
    load, so that it does not push part of the big model off the device again. ComfyUI 0.3.64 frees 1.1 times the
    model's size plus the larger of the memory asked for and its minimum for inference (both with its reserve,
    which the big model's load keeps free as well)."""
    if patcher is None:
        return activations
    floor = mm.minimum_inference_memory() - mm.extra_reserved_memory()
    return max(activations, math.ceil(floor)) + math.ceil(1.1 * patcher.model_size())


def load_flow_patcher(flow_patcher, memory_required: int = 0):
    """Load a small model fully on its device and return it (the flow estimator; FlashVSR's TC decoder).

    RAFT is only 20 MB and runs 12 update iterations per frame: casting its layers on the fly each time would
    cost far more than it saves, so it is always loaded whole, also under --novram (where load_models_gpu
    ignores force_full_load). The same holds for FlashVSR's 180 MB TC decoder, which runs once per latent frame.
    """
    mm.load_models_gpu([flow_patcher], memory_required=memory_required, force_full_load=True)
    if getattr(flow_patcher.model, "model_lowvram", False):
        flow_patcher.partially_load(flow_patcher.load_device, extra_memory=flow_patcher.model_size())
    return flow_patcher.model


def as_rgb(images: torch.Tensor, what: str) -> torch.Tensor:
    """IMAGE (B, H, W, C) with C in 1/3/4 -> (B, H, W, 3) (a view or a new tensor; the input is not modified).
    Empty, malformed or non-finite batches are refused with a message that names the node."""
    if images.ndim == 3:  # a single H x W x C frame
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[0] == 0 or images.shape[1] == 0 or images.shape[2] == 0:
        raise UserInputError(f"{what} got an empty or malformed image batch of shape {tuple(images.shape)}; "
                             "expected (frames, height, width, channels) with at least one frame")
    try:
        frames = to_rgb(images, channel_dim=-1)
    except UserInputError as e:
        raise UserInputError(f"{what}: {e}") from None
    bad = (~torch.isfinite(frames)).flatten(1).any(1).nonzero()
    if len(bad):
        raise UserInputError(f"{what}: frame {int(bad[0])} of the batch (and {len(bad) - 1} more) contains NaN or "
                             "infinite values; fix the node that produced these images")
    return frames


def out_of_memory(error: BaseException) -> bool:
    """ComfyUI's out-of-memory type (CUDA's) or any other sign of memory running out: on the CPU, PyTorch's
    allocator raises a plain RuntimeError."""
    # (ComfyUI falls back to Exception itself where torch has no CUDA error type: that would take every error)
    return (mm.OOM_EXCEPTION is not Exception and isinstance(error, mm.OOM_EXCEPTION)) or is_out_of_memory(error)


@contextlib.contextmanager
def out_of_memory_advice(message: str):
    """Turn a device out-of-memory error inside the block into ``message`` (what to change), after unloading the
    models and freeing the failed attempt's cached memory, as ComfyUI does after its own out-of-memory errors
    (which it only recognises by their type)."""
    try:
        yield
        return
    except Exception as e:
        if not out_of_memory(e):
            raise
        # raised again outside the except block, so the failed attempt's tensors can be freed first
    mm.unload_all_models()
    mm.soft_empty_cache()
    raise RuntimeError(message)


def whole_file(video, node: str, reads: str = "upscales whole video files"):
    """What a VIDEO input reads (``get_stream_source()``: a path or a file object), refused where the VIDEO is a
    trimmed view of it (newer ComfyUI's Trim Video / Video Slice keep the whole file behind the VIDEO): upscaling
    the whole file would spend hours on frames not asked for, and give another video."""
    window = getattr(video, "get_active_trim_window", None)
    start, duration = window() if callable(window) else (0, 0)
    if start or duration:
        span = f"{duration:g} s from {start:g} s" if duration else f"from {start:g} s on"
        raise UserInputError(f"{node} {reads}, and this VIDEO is a trimmed view of one ({span}): save it first "
                             "(Save Video) and load that file, or upscale the whole file")
    return video.get_stream_source()


def check_not_cropped(video, width: int, height: int, node: str, reads: str = "upscales whole video files") -> None:
    """Refuse a VIDEO whose size is not its file's ``width`` x ``height`` (turned as shown or not): a cropped view
    (newer ComfyUI's Crop Video keeps the whole file behind it), which the file's frames would not be."""
    try:
        size = tuple(video.get_dimensions())
    except Exception:  # noqa: BLE001 - a VIDEO that cannot say: its file is what it is
        return
    if size not in ((width, height), (height, width)):
        raise UserInputError(f"{node} {reads}, and this VIDEO is a {size[0]}x{size[1]} view of a {width}x{height} "
                             "one (cropped): save it first (Save Video) and load that file, or upscale the whole file")


def show_text(node_id, text: str) -> None:
    """Text under the node in the ComfyUI frontend (and in the log)."""
    log.info("StreamVSR: %s", text)
    try:
        from server import PromptServer

        PromptServer.instance.send_progress_text(text, node_id)
    except Exception:  # no server (tests, scripts)
        pass


def find_in_model_folders(choice: str, folder: str, download: str, setting: str = "") -> str:
    """The path of a listed model (a file or a folder) under any of ``folder``'s model folders; a one-line error
    when it is not there: deleted or renamed since the list was made, or named by a workflow from another machine
    (the shipped workflows name the folders that the ``download`` entry of the list makes, with ``setting``, e.g.
    " with version v1", where the entry needs one to fetch what the name says). A name reaches this
    unchecked from a prompt sent to ComfyUI's API (a V3 combo's value is not checked against its list): as
    ComfyUI's own folder_paths does, "../" and absolute names are read inside the model folders."""
    try:
        inside = os.path.relpath(os.path.join("/", choice), "/")
    except ValueError:  # (another drive, on Windows)
        inside = None
    for root in folder_paths.get_folder_paths(folder) if inside is not None else ():
        path = os.path.join(root, inside)
        if os.path.exists(path):
            return path
    raise UserInputError(f"{choice} is not in any {folder} model folder "
                         f"({', '.join(folder_paths.get_folder_paths(folder))}): pick '{download}'{setting} in the "
                         "list to fetch the official weights, or put it there and press r to refresh the list")


LOADERS = {"stream-diffvsr": "Load Stream-DiffVSR Model", "flashvsr": "Load FlashVSR Model"}


def other_family(path: str, family: str, root: str | None = None, seen: dict | None = None):
    """The other model family that ``path`` is (part of), or None: the model lists hold any .safetensors file, and
    another family's model is better refused by name than by a missing key. With ``root`` (the model folder that
    ``path`` is listed under) the folders between them count too, as a hub folder's component files are part of
    it; the folders above the root do not (ComfyUI's models folder has unet/ and controlnet/ folders too).
    ``seen``: what was found for each folder, kept across the calls of one listing (each folder's files would
    otherwise have it look at the folder again, reading its files' headers each time)."""
    from ..models.registry import families

    others = [f for f in families() if f.name != family]
    candidates = [path]
    if root is not None:
        parts = os.path.relpath(path, root).replace("\\", "/").split("/")[:-1]
        candidates += [os.path.join(root, *parts[:i]) for i in range(1, len(parts) + 1)]
    seen = {} if seen is None else seen
    for candidate in candidates:
        if candidate not in seen:
            seen[candidate] = next((f for f in others if f.detect(candidate)), None)
        if seen[candidate] is not None:
            return seen[candidate]
    return None


def check_family(path: str, family: str) -> None:
    """A one-line error when the model at ``path`` is not of ``family`` but of another that this pack loads."""
    from ..models.registry import family_by_name

    if family_by_name(family).detect(path):
        return
    other = other_family(path, family)
    if other is not None:
        raise UserInputError(f"{path} is a {other.title} model: load it with {LOADERS[other.name]}")


# in the names of the files a conversion writes or keeps next to its result (``streamvsr convert``)
WORK_TAGS = (TMP_TAG, PARTIAL_TAG, LOCK_TAG)


def listed_models(folder: str, family: str) -> list[str]:
    """``folder``'s file list (``/``-separated) without another family's models and their files."""
    listed, seen = [], {}
    for root in folder_paths.get_folder_paths(folder):
        if not os.path.isdir(root):
            continue
        for name in folder_paths.get_filename_list(folder):
            path = os.path.join(root, name)
            if any(tag in os.path.basename(name) for tag in WORK_TAGS):
                continue  # (a conversion's temporary or kept partial result: not a model to pick)
            if os.path.exists(path) and other_family(path, family, root, seen) is None:
                listed.append(name.replace("\\", "/"))
    return sorted(set(listed))


def download_progress():
    """A ``progress(done, total)`` for the model downloads: ComfyUI's progress bar counts the files, and Cancel
    stops the download between two files (those done are kept: the next run downloads the rest)."""
    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        mm.throw_exception_if_processing_interrupted()
        if bar is None:
            bar = comfy.utils.ProgressBar(total)
        bar.update_absolute(done, total)

    return update


def tensor_to_preview(frame: torch.Tensor):
    """(1, 3, H, W) [0,1] -> PIL image for the progress preview."""
    from PIL import Image

    arr = (frame[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(arr)


def remember_source(network, path) -> None:
    """Record where a loader read ``network`` from (the real path: a "(download) …" entry and the folder it made
    are the same model, and a sequence started with one continues with the other) and its weights' checksum."""
    network.streamvsr_source = os.path.realpath(path)
    network.streamvsr_weights = f"{weights_checksum(network):.10g}"


def loaded_from(network) -> str:
    """``remember_source``'s record, for a sequence's settings: other weights put in the same place (downloaded
    again, or `streamvsr convert --overwrite`) are another model."""
    return f"{getattr(network, 'streamvsr_source', id(network))}#{getattr(network, 'streamvsr_weights', '')}"
