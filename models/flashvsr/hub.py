"""Download the official FlashVSR release (only the files the engine reads) from the Hugging Face hub.

Used by the ComfyUI loader node; no ComfyUI import. The prompt embedding ``posi_prompt.pth`` is not on the hub: it
ships in the GitHub repository under ``examples/WanVSR/prompt_tensor/``, so it is fetched from there and checked
against its git blob id; offline, the error says where to put it by hand. The DiT comes last: the loader
lists any folder that holds one, so a download that stopped half-way does not pass for a model.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.request
from pathlib import Path

from ..shared.errors import DownloadError
from ..shared.hub import download_command, download_files, hub_url, local_failure, offline_mode

log = logging.getLogger(__name__)

REPOS = {"v1.1": "JunhaoZhuang/FlashVSR-v1.1", "v1": "JunhaoZhuang/FlashVSR"}
# Folder names as the hub repositories are called (the weights loader reads "1.1" in a folder name as a version
# hint, so the two downloads never mix).
FOLDERS = {"v1.1": "FlashVSR-v1.1", "v1": "FlashVSR"}
# name -> sha256 prefix where one is recorded (v1.1 at revision 27561b1); the hub client checks the size of every
# file it downloads. The DiT last: the loader lists a folder by it (see the module's docstring).
FILES = {
    "v1.1": {"LQ_proj_in.ckpt": "d6d011cd", "TCDecoder.ckpt": "e224bdcf",
             "diffusion_pytorch_model_streaming_dmd.safetensors": "bd28180e"},
    "v1": {"LQ_proj_in.ckpt": None, "TCDecoder.ckpt": None,
           "diffusion_pytorch_model_streaming_dmd.safetensors": None},
}
SIZES = {"diffusion_pytorch_model_streaming_dmd.safetensors": "5.68 GB", "LQ_proj_in.ckpt": "576 MB",
         "TCDecoder.ckpt": "189 MB"}
PROMPT = "posi_prompt.pth"
PROMPT_URL = ("https://raw.githubusercontent.com/OpenImagingLab/FlashVSR/main/examples/WanVSR/prompt_tensor/"
              + PROMPT)
PROMPT_PAGE = "https://github.com/OpenImagingLab/FlashVSR/tree/main/examples/WanVSR/prompt_tensor"
PROMPT_GIT_BLOB = "95c840b2"  # the file's git blob id (prefix), the same in the official repository and its ports


def manual_instructions(version: str, dest: Path) -> str:
    repo = REPOS[version]
    files = ", ".join(f"{name} ({SIZES[name]})" for name in FILES[version])
    return (f"Download by hand into {dest}: {files} from {hub_url(repo)}/tree/main, and {PROMPT} "
            f"(about 4 MB) from {PROMPT_PAGE}. Or run `{download_command(repo, dest)}` on a "
            "machine that is online and copy the folder over.")


def git_blob_id(path: Path) -> str:
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_prompt(dest: Path, url: str = PROMPT_URL, timeout: float = 60.0) -> Path:
    """``posi_prompt.pth`` from the official GitHub repository into ``dest`` (kept if already there and intact).
    A different file already there is the user's (a prompt of their own, or a damaged copy): it is kept and the
    download refused, as for the hub's files, rather than replaced without a word."""
    path = dest / PROMPT
    by_hand = f"download it by hand from {PROMPT_PAGE} (the file {PROMPT}, about 4 MB) and put it into {dest}."
    manual = f"FlashVSR's prompt embedding {PROMPT} is not on the Hugging Face hub; {by_hand}"
    if path.is_file():
        if git_blob_id(path).startswith(PROMPT_GIT_BLOB):
            return path
        raise DownloadError(f"{path} is not the official {PROMPT} (its git blob id does not start with "
                            f"{PROMPT_GIT_BLOB}); it was kept: move it away to download the official one")
    if offline_mode():  # (the client's setting: this download goes around the client, and would wait for GitHub)
        raise DownloadError(f"HF_HUB_OFFLINE is set: unset it to download {PROMPT}, or {by_hand}")
    tmp = dest / f".{PROMPT}.{os.getpid()}.part"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
            while block := response.read(1 << 20):
                f.write(block)
    except Exception as e:  # offline, DNS, HTTP errors come in many types
        tmp.unlink(missing_ok=True)
        local = local_failure(e, dest)
        if local is not None:
            raise DownloadError(f"could not save {PROMPT}: {local}") from None
        raise DownloadError(f"could not download {PROMPT} ({type(e).__name__}: {e}). {manual}") from None
    if not git_blob_id(tmp).startswith(PROMPT_GIT_BLOB):
        tmp.unlink(missing_ok=True)
        raise DownloadError(f"the downloaded {PROMPT} is not the official file (git blob id does not start with "
                            f"{PROMPT_GIT_BLOB}). {manual}")
    os.replace(tmp, path)
    return path


def download_flashvsr(version: str, models_dir, progress=None) -> Path:
    """Fetch FlashVSR ``version`` ("v1.1" or "v1") into ``models_dir/<repo name>`` and return that folder.

    Files already there are kept (and hash-checked where the hash is known), so an interrupted download resumes.
    ``progress``: see ``download_files`` (the hub's files; the small prompt file comes just before the DiT)."""
    if version not in REPOS:
        raise DownloadError(f"unknown FlashVSR version {version!r}; use one of {', '.join(REPOS)}")
    dest = Path(models_dir) / FOLDERS[version]
    download_files(REPOS[version], FILES[version], dest, manual_instructions(version, dest), progress,
                   before_last=lambda: download_prompt(dest))  # the DiT, which makes the folder a model, last
    log.info("FlashVSR %s is in %s", version, dest)
    return dest
