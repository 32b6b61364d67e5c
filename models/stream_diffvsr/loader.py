"""Load Stream-DiffVSR from the official hub folder or from our single-file format, with strict validation.

Official layout (``Jamichsu/Stream-DiffVSR``)::

    model_index.json  scheduler/scheduler_config.json
    unet/{config.json, diffusion_pytorch_model.safetensors}
    controlnet/{config.json, diffusion_pytorch_model.safetensors}
    vae/{config.json, diffusion_pytorch_model.safetensors}
    text_encoder/{config.json, model.safetensors}
    tokenizer/{vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json}

Single file: one ``.safetensors`` with ``unet.*``, ``controlnet.*``, ``vae.*`` tensors and the precomputed
``prompt_embeds``; the component configs are JSON strings in its metadata. ``convert_to_single_file`` writes it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from ..shared.errors import WeightsError
from ..shared.hub import set_aside_note
from ..shared.runtime import check_torch_version
from ..shared.weights import check_weights_file, load_into, save_safetensors
from ..shared.weights import read_state_dict as _read
from ..shared.weights import summary
from . import SINGLE_FILE_FORMAT
from .clip_text import KNOWN_LEFTOVER_KEYS as CLIP_LEFTOVERS
from .clip_text import CLIPTextTower, empty_prompt_ids
from .controlnet import ControlNet
from .pipeline import StreamDiffVSRPipeline
from .scheduler import DDIMScheduler
from .tiny_vae import TemporalAutoencoderTiny
from .unet import UNet

log = logging.getLogger(__name__)

HUB_REPO = "Jamichsu/Stream-DiffVSR"
DOWNLOAD_HINT = (
    f"Download the official checkpoint from the Hugging Face repository {HUB_REPO} (all folders: unet, "
    "controlnet, vae, text_encoder, tokenizer, scheduler and model_index.json) into the model's folder, or convert "
    "it to one file with `streamvsr convert`.")
# The folder the ComfyUI loader's "(download) …" entry and `streamvsr download` fill (in their models folder)
DOWNLOAD_FOLDER = "Stream-DiffVSR"


def download_commands(folder: Path) -> str:
    """The commands that finish a download of ``folder``: the hub client's for any folder, and this pack's own
    where ``folder`` is the one they fill (they fill no other)."""
    from ..shared.hub import download_command, shell_command

    folder = Path(os.path.abspath(folder))
    text = f"E.g. `{download_command(HUB_REPO, folder)}` (the whole repository)"
    if folder.name == DOWNLOAD_FOLDER:
        text += (f", or `{shell_command(['streamvsr', 'download', '--dest', folder.parent])}`, or, where it is "
                 "ComfyUI's models/streamvsr/Stream-DiffVSR, the loader's '(download) …' entry")
    return text + " finishes a download that stopped there."


SINGLE_FILE_VERSION = "1"
COMPONENTS = ("unet", "controlnet", "vae")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                "diffusion_pytorch_model.bin", "pytorch_model.bin")
# Tensors some exports carry that the model does not use; anything else unexpected is an error.
KNOWN_LEFTOVERS = {
    "unet": ("class_embedding.",),  # the SD x4 upscaler's noise-level embedding (spec §1.8)
    "controlnet": ("class_embedding.",),
    "vae": (),
    "text_encoder": tuple(CLIP_LEFTOVERS),
}


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise WeightsError(f"missing file {path}. {DOWNLOAD_HINT}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path} is not valid JSON ({e}). Re-download it. {DOWNLOAD_HINT}") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path} holds a JSON {type(data).__name__}, not an object. Re-download it. "
                           f"{DOWNLOAD_HINT}")
    return data


def _meta_json(meta: dict, key: str, path: Path) -> dict:
    """A config stored as a JSON string in a single file's metadata."""
    if key not in meta:
        raise WeightsError(f"{path} has no {key} in its metadata; convert it again with `streamvsr convert`.")
    try:
        data = json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: the {key} in its metadata is not valid JSON ({e}); "
                           "convert it again with `streamvsr convert`.") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: the {key} in its metadata is not a JSON object; "
                           "convert it again with `streamvsr convert`.")
    return data


def _check_scheduler(config: dict, source) -> None:
    # Found before the large components are built: a bad value would otherwise fail after minutes of loading.
    try:
        DDIMScheduler(config)
    except (ValueError, TypeError) as e:
        raise WeightsError(f"scheduler config from {source} is not supported: {e}") from None


def _check_prompt_embeds(embeds: torch.Tensor, unet_config: dict, source) -> None:
    width = unet_config.get("cross_attention_dim")
    # Per-block lists are allowed by the config; every block attends to the same embedding.
    widths = set(width) if isinstance(width, (list, tuple)) else {width} if isinstance(width, int) else set()
    if embeds.ndim != 3 or embeds.shape[0] != 1 or any(w != embeds.shape[-1] for w in widths):
        raise WeightsError(
            f"the prompt embedding from {source} has shape {tuple(embeds.shape)}; the UNet expects (1, tokens, "
            f"{width}). Is this the right text encoder? {DOWNLOAD_HINT}")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    return _read(path, DOWNLOAD_HINT, unwrap=False)


def component_weights(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).exists():
            return folder / name
    raise WeightsError(f"no weights in {folder} (expected one of {', '.join(WEIGHT_FILES)})."
                       f"{set_aside_note(folder)} {DOWNLOAD_HINT}")


def build_component(cls, config: dict, state_dict: dict, component: str, source, device, dtype,
                    operations=None) -> nn.Module:
    """Build a module from its config without random init (meta device) and load ``state_dict`` strictly."""
    operations = operations or nn
    try:
        module = cls(config, operations=operations, device="meta", dtype=dtype)
    except (ValueError, TypeError, ZeroDivisionError, RuntimeError) as e:  # (a damaged or edited config.json)
        raise WeightsError(f"the {component} config that comes with {source} is not supported ({type(e).__name__}: "
                           f"{e}). {DOWNLOAD_HINT}") from None
    return load_into(module, state_dict, component, source, device, dtype, KNOWN_LEFTOVERS[component],
                     f"Is this the right file for this component? {DOWNLOAD_HINT}")


def _prompt_ids(tokenizer_dir: Path) -> list[int]:
    try:
        return empty_prompt_ids(tokenizer_dir)
    except (FileNotFoundError, ValueError) as e:
        raise WeightsError(f"tokenizer in {tokenizer_dir}: {e}. {DOWNLOAD_HINT}") from None


@torch.inference_mode()
def _encode_prompt(config: dict, weights: Path, ids: list[int]) -> torch.Tensor:
    """The CLIP embedding of the empty prompt, (1, 77, C) float32, computed on the CPU."""
    state_dict = read_state_dict(weights)
    if state_dict and not any(k.startswith("text_model.") for k in state_dict):
        # transformers >= 5 saves CLIPTextModel without the "text_model." prefix the official export has.
        state_dict = {"text_model." + k: v for k, v in state_dict.items()}
    tower = build_component(CLIPTextTower, config, state_dict, "text_encoder", weights, "cpu", torch.float32)
    return tower(torch.tensor([ids], dtype=torch.long)).to(torch.float32)


def _load_folder(folder: Path, device, dtype, operations) -> StreamDiffVSRPipeline:
    index = folder / "model_index.json"
    if index.exists():
        class_name = _read_json(index).get("_class_name")
        if class_name not in (None, "StreamDiffVSRPipeline"):
            log.warning("%s declares %s, not StreamDiffVSRPipeline; loading it anyway", index, class_name)
    for sub in COMPONENTS + ("text_encoder", "tokenizer", "scheduler"):
        if not (folder / sub).is_dir():
            raise WeightsError(f"{folder} has no {sub}/ folder. {DOWNLOAD_HINT}")
    # Every small file is read and every weight file found before any weights load, so a damaged or
    # incomplete download is reported at once rather than after the large components are built.
    configs = {name: _read_json(folder / name / "config.json") for name in COMPONENTS}
    weights = {name: component_weights(folder / name) for name in COMPONENTS}
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    scheduler = _read_json(scheduler_path)
    _check_scheduler(scheduler, scheduler_path)
    text_config = _read_json(folder / "text_encoder" / "config.json")
    text_weights = component_weights(folder / "text_encoder")
    for path in (text_weights, *weights.values()):
        check_weights_file(path, DOWNLOAD_HINT)
    ids = _prompt_ids(folder / "tokenizer")
    # The text encoder runs first and is freed before the large components load, which lowers the peak.
    embeds = _encode_prompt(text_config, text_weights, ids)
    _check_prompt_embeds(embeds, configs["unet"], folder / "text_encoder")
    classes = {"unet": UNet, "controlnet": ControlNet, "vae": TemporalAutoencoderTiny}
    modules = {name: build_component(classes[name], configs[name], read_state_dict(weights[name]), name,
                                     weights[name], device, dtype, operations)
               for name in COMPONENTS}
    return StreamDiffVSRPipeline(modules["unet"], modules["controlnet"], modules["vae"], embeds.to(device),
                                 scheduler, configs)


def _load_single_file(path: Path, device, dtype, operations) -> StreamDiffVSRPipeline:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise WeightsError(f"cannot read {path}: {e}. The file is truncated or not a safetensors file; "
                           f"download or convert it again. {DOWNLOAD_HINT}") from None
    if meta.get("format") != SINGLE_FILE_FORMAT:
        raise WeightsError(
            f"{path} is not a Stream-DiffVSR single file (its metadata has no format={SINGLE_FILE_FORMAT!r}). "
            "Pass the official folder, or a file written by `streamvsr convert`.")
    configs = {name: _meta_json(meta, f"{name}_config", path) for name in COMPONENTS}
    scheduler = _meta_json(meta, "scheduler_config", path)
    _check_scheduler(scheduler, path)
    tensors = read_state_dict(path)
    known = {"prompt_embeds"} | {k for k in tensors if k.split(".", 1)[0] in COMPONENTS}
    if tensors.keys() - known:
        raise WeightsError(f"{path} has unexpected tensors: {summary(tensors.keys() - known)}")
    if "prompt_embeds" not in tensors:
        raise WeightsError(f"{path} has no prompt_embeds tensor; convert it again.")
    embeds = tensors.pop("prompt_embeds")
    _check_prompt_embeds(embeds, configs["unet"], path)
    classes = {"unet": UNet, "controlnet": ControlNet, "vae": TemporalAutoencoderTiny}
    modules = {}
    for name in COMPONENTS:
        prefix = name + "."
        sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        modules[name] = build_component(classes[name], configs[name], sd, name, path, device, dtype, operations)
    return StreamDiffVSRPipeline(modules["unet"], modules["controlnet"], modules["vae"],
                                 embeds.to(device, torch.float32), scheduler, configs)


def load_pipeline(path, device="cpu", dtype: torch.dtype = torch.float32, operations=None) -> StreamDiffVSRPipeline:
    """Load Stream-DiffVSR from the official folder or a single ``.safetensors`` file.

    ``dtype`` is the weight dtype; ``operations`` the layer namespace (``torch.nn`` by default, or
    ``comfy.ops.manual_cast`` inside ComfyUI).
    """
    check_torch_version()
    path = Path(os.fspath(path)).expanduser()
    if path.is_dir():
        try:
            pipe = _load_folder(path, device, dtype, operations)
        except WeightsError as e:  # (the commands need the folder, which the inner errors do not all know)
            raise WeightsError(f"{e} {download_commands(path)}") from None
    elif path.is_file():
        pipe = _load_single_file(path, device, dtype, operations)
    else:
        raise WeightsError(f"{path} does not exist. {DOWNLOAD_HINT}")
    log.info("loaded Stream-DiffVSR from %s (%s, %s)", path, dtype, device)
    return pipe


def convert_to_single_file(source, out_path, dtype: torch.dtype = torch.float16) -> Path:
    """Write the official folder (or another single file) as one ``.safetensors`` in ``dtype``.

    The empty-prompt embedding is stored precomputed in float32, so the 1.4 GB text encoder is not needed.
    """
    pipe = load_pipeline(source, device="cpu", dtype=torch.float32)
    tensors = {}
    for name in COMPONENTS:
        for k, v in getattr(pipe, name).state_dict().items():
            tensors[f"{name}.{k}"] = (v.to(dtype) if v.is_floating_point() else v).contiguous()
    tensors["prompt_embeds"] = pipe.prompt_embeds.to(torch.float32).contiguous()
    meta = {"format": SINGLE_FILE_FORMAT, "format_version": SINGLE_FILE_VERSION,
            "dtype": str(dtype).replace("torch.", ""),
            "scheduler_config": json.dumps(pipe.scheduler_config)}
    for name in COMPONENTS:
        meta[f"{name}_config"] = json.dumps(pipe.configs[name])
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".part")
    try:
        save_safetensors(tensors, tmp, metadata=meta)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)  # (a full disk leaves GBs)
    return out_path
