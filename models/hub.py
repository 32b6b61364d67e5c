"""Download the official Stream-DiffVSR checkpoint (only the files the pipeline needs) from the Hugging Face hub."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

log = logging.getLogger(__name__)

HUB_REPO = "Jamichsu/Stream-DiffVSR"
# The files StreamDiffVSRPipeline reads; sha256 where it is published (spec §1.4/§1.5).
HUB_FILES = {
    "model_index.json": None,
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
}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def download_stream_diffvsr(dest_dir) -> Path:
    """Fetch the official checkpoint into ``dest_dir`` (resumable; files already there are kept)."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise RuntimeError("huggingface_hub is not installed: pip install huggingface_hub") from None
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    for name, sha in HUB_FILES.items():
        target = dest / name
        try:
            path = Path(hf_hub_download(HUB_REPO, name, local_dir=str(dest)))
        except Exception as e:  # network errors come in many types (requests, httpx, hub-specific)
            raise RuntimeError(
                f"could not download {name} from https://huggingface.co/{HUB_REPO} ({type(e).__name__}: {e}). "
                f"If this machine is offline, download the repository's model_index.json and its scheduler/, "
                f"unet/, controlnet/, vae/, text_encoder/ and tokenizer/ folders by hand into {dest}.") from None
        if sha is not None and _sha256(path) != sha:
            target.unlink(missing_ok=True)
            raise RuntimeError(f"{name} failed its sha256 check (expected {sha[:12]}…); it was deleted, try again.")
    log.info("Stream-DiffVSR is in %s", dest)
    return dest
