"""Download the official Stream-DiffVSR checkpoint (only the files the pipeline needs) from the Hugging Face hub.

Used by the ComfyUI loader node and by ``streamvsr download``; no ComfyUI import.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

log = logging.getLogger(__name__)

HUB_REPO = "Jamichsu/Stream-DiffVSR"
HUB_URL = f"https://huggingface.co/{HUB_REPO}"
# The files StreamDiffVSRPipeline reads (about 4.2 GB in all; the repository holds more); sha256 where the spec
# records it (§1.4, §1.5). The hub client itself checks every file's size against the server's.
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


def manual_instructions(dest: Path) -> str:
    folders = sorted({name.split("/")[0] + "/" for name in HUB_FILES if "/" in name})
    return (f"Download these files from {HUB_URL}/tree/main by hand, keeping the folder layout, into {dest}: "
            f"model_index.json and the folders {', '.join(folders)} (in each: config.json and the .safetensors "
            "weights; tokenizer/: vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json). "
            f"Or run `huggingface-cli download {HUB_REPO} --local-dir {dest}` on a machine that is online.")


def _check(path: Path, name: str, sha: str | None) -> None:
    if sha is not None and _sha256(path) != sha:
        path.unlink(missing_ok=True)
        raise RuntimeError(f"{name} is corrupt: its sha256 is not {sha[:12]}…; it was deleted, download it again.")


def download_stream_diffvsr(dest_dir) -> Path:
    """Fetch the official checkpoint into ``dest_dir`` and return it.

    Files already there are kept (and hash-checked where the hash is known), so an interrupted download
    resumes where it stopped; the hub client also resumes a partly downloaded file.
    """
    dest = Path(dest_dir)
    missing = [name for name in HUB_FILES if not (dest / name).is_file()]
    for name in HUB_FILES:
        if name not in missing:
            _check(dest / name, name, HUB_FILES[name])
    missing = [name for name in HUB_FILES if not (dest / name).is_file()]
    if not missing:
        return dest
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise RuntimeError("downloading needs huggingface_hub (pip install huggingface_hub). "
                           + manual_instructions(dest)) from None
    dest.mkdir(parents=True, exist_ok=True)
    log.info("downloading %d files of %s into %s", len(missing), HUB_REPO, dest)
    for name in missing:
        try:
            path = Path(hf_hub_download(HUB_REPO, name, local_dir=str(dest)))
        except Exception as e:  # offline, DNS, HTTP and hub errors come in many types
            raise RuntimeError(f"could not download {name} from {HUB_URL} ({type(e).__name__}: {e}). "
                               + manual_instructions(dest)) from None
        _check(path, name, HUB_FILES[name])
    log.info("Stream-DiffVSR is in %s", dest)
    return dest
