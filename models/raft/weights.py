"""torchvision's released RAFT weights: names, hashes, download, detection of large/small, strict loading."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import torch
from torch import nn

from ..shared.errors import DownloadError, UserInputError, WeightsError
from ..shared.hub import folder_for_download, local_failure
from ..shared.runtime import check_torch_version
from ..shared.weights import key_mismatches, read_state_dict, sha256_of
from .estimator import FlowEstimator
from .network import RAFT

log = logging.getLogger(__name__)

# name -> (url, file name, sha256 prefix). torchvision publishes no full digests: its files are named
# <name>-<first 8 hex digits of their sha256>.pth and torch.hub checks that prefix; so do we.
RAFT_WEIGHTS = {
    "raft_large": ("https://download.pytorch.org/models/raft_large_C_T_SKHT_V2-ff5fadd5.pth",
                   "raft_large_C_T_SKHT_V2-ff5fadd5.pth", "ff5fadd5"),
    "raft_small": ("https://download.pytorch.org/models/raft_small_C_T_V2-01064c6d.pth",
                   "raft_small_C_T_V2-01064c6d.pth", "01064c6d"),
}


def detect_arch(state_dict: dict) -> str:
    # Only RAFT-large has the convex-upsampling mask predictor.
    return "raft_large" if any(k.startswith("mask_predictor.") for k in state_dict) else "raft_small"


def manual_hint(name: str | None = None) -> str:
    names = [name] if name in RAFT_WEIGHTS else list(RAFT_WEIGHTS)
    links = ", ".join(f"{n}: {RAFT_WEIGHTS[n][0]}" for n in names)
    return (f"Use torchvision's RAFT weights ({links}); `streamvsr download` (in ComfyUI: Load RAFT Flow Model's "
            "'(download) raft_large') fetches RAFT-large, the one Stream-DiffVSR was trained with.")


def load_raft(path, operations=None, device="cpu", dtype=torch.float32, num_flow_updates: int = 12,
              corr: str = "auto", downscale: int = 1) -> FlowEstimator:
    """Load RAFT weights in torchvision's format (.pth or .safetensors) strictly; large/small is read from the
    keys. A file that does not match raises WeightsError naming the missing, unexpected and misshapen keys."""
    check_torch_version()
    path = Path(path).expanduser()  # as every loader does (a shell leaves ~ alone after --flow=)
    state_dict = read_state_dict(path, manual_hint())
    arch = detect_arch(state_dict)
    model = RAFT(arch, operations=operations or nn, device="meta", dtype=dtype)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if not expected.keys() & state_dict.keys():  # (another format or model: a list of its keys would tell nothing)
        original = any(k.startswith(("fnet.", "module.fnet.")) for k in state_dict)
        what = ("is in the original RAFT repository's format (princeton-vl), which this does not read" if original
                else f"holds none of torchvision's RAFT tensors (none of its {len(state_dict)})")
        raise WeightsError(f"{path} {what}. " + manual_hint())
    problems = key_mismatches(expected, state_dict)
    if problems:
        raise WeightsError("; ".join([f"{path} is not a torchvision {arch} state dict"] + problems) + ". "
                           + manual_hint())
    state_dict = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    model = model.to(device).eval().requires_grad_(False)
    return FlowEstimator(model, num_flow_updates=num_flow_updates, corr=corr, downscale=downscale)


def _from_torch_cache(filename: str, prefix: str, part: Path, target: Path) -> bool:
    """Put the published ``filename`` at ``target`` from torch's download cache, where torchvision fetched it
    before (``raft_large(weights=...)``): a second name of the same data where the cache is on the same drive, else
    a copy. False where the cache has no verified copy."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    try:
        if not cached.is_file() or not sha256_of(cached).startswith(prefix):
            return False
        try:
            os.link(cached, part)
        except OSError:  # another drive, or a file system without hard links
            shutil.copyfile(cached, part)
        os.replace(part, target)
    except OSError as e:
        part.unlink(missing_ok=True)
        log.warning("could not take %s from torch's download cache (%s): downloading it", cached, e.strerror or e)
        return False
    except BaseException:  # stopped (Cancel, Ctrl-C): nothing left behind, as for a download
        part.unlink(missing_ok=True)
        raise
    log.info("took %s from torch's download cache (%s)", target, cached)
    return True


def download_raft(name: str, dest_dir, progress=True) -> Path:
    """Download torchvision's RAFT weights ``name`` ("raft_large" or "raft_small") into ``dest_dir`` and return
    the path; a verified copy already there is reused. The file is written as ``.part`` and renamed only after
    its sha256 prefix matched; a download that fails or is stopped leaves nothing behind. A file there that is not
    the published one is kept until a verified download replaces it (the user's, never lost to an offline
    download). Offline, the error says where to download the file by hand. ``progress``: True logs every 10 %; a
    callable gets ``(bytes done, total bytes)`` after each block (total 0 when the server does not say) and may
    raise to stop."""
    if name not in RAFT_WEIGHTS:
        raise UserInputError(f"unknown RAFT weights {name!r} (use one of {sorted(RAFT_WEIGHTS)})")
    url, filename, prefix = RAFT_WEIGHTS[name]
    dest_dir = Path(dest_dir).absolute()  # every message names the file where it is on disk
    target = dest_dir / filename
    kept = ""  # appended to an error: the file that differs is still there
    if target.is_file():
        if sha256_of(target).startswith(prefix):
            return target
        # As the hub downloads do: downloaded again, and replaced only once the download is verified
        log.warning("%s is not the published file (its sha256 does not start with %s): downloading it again",
                    target, prefix)
        kept = f" {target} was kept as it was, though its sha256 does not start with {prefix}."
    manual = (f"Download {url} by hand (browser, curl -LO or wget) and put it at {target} "
              f"(its sha256 starts with {prefix}).{kept}")
    with folder_for_download(dest_dir):
        return _fetch_raft(url, filename, prefix, target, dest_dir, manual, kept, progress)


def _fetch_raft(url: str, filename: str, prefix: str, target: Path, dest_dir: Path, manual: str, kept: str,
                progress) -> Path:
    """``download_raft``'s download into ``dest_dir``, which exists."""
    part = target.with_name(target.name + ".part")
    if _from_torch_cache(filename, prefix, part, target):
        return target
    log.info("downloading %s to %s", url, target)
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done, reported = 0, 0
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
                digest.update(block)
                done += len(block)
                if callable(progress):
                    progress(done, total)
                elif progress and total and done * 10 // total > reported:
                    reported = done * 10 // total
                    log.info("%s: %d%%", filename, 10 * reported)
    except (urllib.error.URLError, OSError) as e:
        part.unlink(missing_ok=True)
        local = local_failure(e, dest_dir)  # (None for a network error: a URLError has no errno)
        if local is not None:
            raise DownloadError(f"could not save {url}: {local}.{kept}") from None
        raise DownloadError(f"could not download {url} ({getattr(e, 'reason', e)}). Offline? {manual}") from None
    except BaseException:  # stopped (Cancel, Ctrl-C): no half file left behind
        part.unlink(missing_ok=True)
        raise
    if not digest.hexdigest().startswith(prefix):
        part.unlink(missing_ok=True)
        raise DownloadError(f"the download of {url} is corrupt (its sha256 does not start with {prefix}); try "
                           f"again. {manual}")
    os.replace(part, target)
    return target
