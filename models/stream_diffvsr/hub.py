"""Download the official Stream-DiffVSR checkpoint (only the files the pipeline needs) from the Hugging Face hub.

Used by the ComfyUI loader node and by ``streamvsr download``; no ComfyUI import.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..shared.hub import download_command, download_files, hub_url

log = logging.getLogger(__name__)

HUB_REPO = "Jamichsu/Stream-DiffVSR"
# The files StreamDiffVSRPipeline reads (about 4.1 GB in all; the repository holds more); sha256 where the spec
# records it (§1.4, §1.5). The hub client checks the size of every file it downloads against the server's.
HUB_FILES = {
    "scheduler/scheduler_config.json": None,
    "unet/config.json": None,
    "unet/diffusion_pytorch_model.safetensors": None,
    "controlnet/config.json": None,
    "controlnet/diffusion_pytorch_model.safetensors":
        "f801cc49443bc9cfc685d57bfacd2b17d852f6c9095b6344c0e55ae41adb5b98",
    "vae/config.json": None,
    "vae/diffusion_pytorch_model.safetensors": "26554a150686f4f2213c1192232bf51a5770d54e976b7b00000f533fff4e4c3a",
    "text_encoder/config.json": None,
    "text_encoder/model.safetensors": None,
    "tokenizer/vocab.json": None,
    "tokenizer/merges.txt": None,
    "tokenizer/special_tokens_map.json": None,
    "tokenizer/tokenizer_config.json": None,
    # Last: a folder is listed as a model by it, so a download stopped half-way does not pass for a model
    "model_index.json": None,
}


def manual_instructions(dest: Path) -> str:
    folders = sorted({name.split("/")[0] + "/" for name in HUB_FILES if "/" in name})
    weighted = ", ".join(f for f in folders if f not in ("scheduler/", "tokenizer/"))
    return (f"Download these files from {hub_url(HUB_REPO)}/tree/main by hand, keeping the folder layout, into "
            f"{dest}: model_index.json; in {weighted}: config.json and the .safetensors weights; scheduler/: "
            "scheduler_config.json; tokenizer/: vocab.json, merges.txt, special_tokens_map.json, "
            f"tokenizer_config.json. Or run `{download_command(HUB_REPO, dest, list(HUB_FILES))}` on a machine "
            "that is online.")


def download_stream_diffvsr(dest_dir, progress=None) -> Path:
    """Fetch the official checkpoint into ``dest_dir`` and return it (files already there are kept and checked).
    ``progress``: see ``download_files``."""
    dest = download_files(HUB_REPO, HUB_FILES, dest_dir, manual_instructions(Path(dest_dir)), progress)
    log.info("Stream-DiffVSR is in %s", dest)
    return dest
