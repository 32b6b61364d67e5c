"""Which model family a file or folder holds, recognised from its files (as spandrel recognises architectures by
their keys), so one ``--model PATH`` serves every family."""

from __future__ import annotations

import importlib
from pathlib import Path

from .contract import Family
from .shared.errors import UserInputError
from .shared.weights import check_weights_file

# Packages under models/ that define FAMILY; looked up in this order.
FAMILY_PACKAGES = ("stream_diffvsr", "flashvsr")


def families() -> list[Family]:
    found = []
    for name in FAMILY_PACKAGES:
        try:
            module = importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.{name}":
                raise
            continue
        family = getattr(module, "FAMILY", None)
        if family is not None:
            found.append(family)
    return found


def family_by_name(name: str) -> Family:
    for family in families():
        if family.name == name:
            return family
    raise UserInputError(f"unknown model family {name!r} (known: {', '.join(f.name for f in families())})")


# What to do with RAFT's weights given as the model (the command line's words)
FLOW_AS_MODEL = "give it as the flow model (--flow), and the upscaling model's folder or file as the model"


def detect_family(path, flow_advice: str = FLOW_AS_MODEL) -> Family:
    """The family of the weights at ``path``; a one-line error when there are none or they are not recognised
    (``flow_advice``: what to do where they are RAFT's)."""
    given = str(path)
    path = Path(path).expanduser()
    if not path.exists():
        # The models table names Hugging Face repositories, "owner/name" with a slash on every system; not
        # "models/FlashVSR" where models/ is here, nor "weights/x.safetensors": mistyped paths.
        if "/" in given and len(path.parts) == 2 and not given.startswith((".", "/", "~")) \
                and not path.parent.exists() and path.suffix.lower() not in (".safetensors", ".ckpt", ".pth", ".pt"):
            from .shared.hub import download_command

            raise UserInputError(
                f"model {path} does not exist; a model is a folder or file on this computer, not a Hugging Face "
                f"name: `streamvsr download` fetches Stream-DiffVSR, and `{download_command(given, 'FOLDER')}` "
                "any repository (FlashVSR also needs posi_prompt.pth from its GitHub repository)")
        raise UserInputError(f"model {path} does not exist")
    found = [family for family in families() if family.detect(path)]
    if len(found) > 1:
        raise UserInputError(f"{path} holds the files of {' and '.join(f.title for f in found)}: give the folder "
                             "or file of one model")
    if found:
        return found[0]
    if path.is_file():
        # one file of a model folder in the diffusers layout (model_index.json, unet/...): the folder is meant
        for folder in _folders_of_part(path):
            owner = next((f for f in families() if f.detect(folder)), None)
            if owner is not None:
                raise UserInputError(f"{path} is one file of the {owner.title} model in {folder}: give that folder "
                                     "as the model")
        if _is_raft(path):
            raise UserInputError(f"{path} holds RAFT optical flow weights: {flow_advice}")
        check_weights_file(path)  # a damaged download is told as such, not as an unknown model
    known = "; ".join(f"{f.title}" for f in families())
    raise UserInputError(f"{path} holds no model this pack knows ({known}). Give the official model folder or a "
                         "single file written by `streamvsr convert`.")


# The subfolders of a model in the diffusers layout (a pipeline's components)
_COMPONENT_FOLDERS = {"unet", "controlnet", "vae", "text_encoder", "tokenizer", "scheduler"}


def _folders_of_part(path: Path) -> list[Path]:
    """The model folder ``path`` would be a part of in the diffusers layout: its own folder for model_index.json,
    the one above for a file in a component's subfolder; none for any other file (a video next to a model is not
    a part of it)."""
    if path.name == "model_index.json":
        return [path.parent]
    return [path.parent.parent] if path.parent.name in _COMPONENT_FOLDERS else []


def _is_raft(path: Path) -> bool:
    """Whether ``path`` is torchvision's RAFT weights, a flow model given where an upscaler is asked for. Reads
    the names only (a memory map of the archive); never raises."""
    if path.suffix not in (".pth", ".pt"):
        return False
    try:
        import torch

        keys = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True).keys()
    except Exception:  # noqa: BLE001 - not that, or not readable: the usual message follows
        return False
    return any(k.startswith("feature_encoder.") for k in keys) and any(k.startswith("update_block.") for k in keys)
