"""Optical-flow estimator around RAFT: weights (torchvision's released files), options, visualisation, and the
``streamvsr flow`` folder command.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .raft import RAFT, all_pairs_bytes, padded_size

log = logging.getLogger(__name__)

# name -> (url, file name, sha256 prefix). torchvision publishes no full digests: its files are named
# <name>-<first 8 hex digits of their sha256>.pth and torch.hub checks that prefix; so do we.
RAFT_WEIGHTS = {
    "raft_large": ("https://download.pytorch.org/models/raft_large_C_T_SKHT_V2-ff5fadd5.pth",
                   "raft_large_C_T_SKHT_V2-ff5fadd5.pth", "ff5fadd5"),
    "raft_small": ("https://download.pytorch.org/models/raft_small_C_T_V2-01064c6d.pth",
                   "raft_small_C_T_V2-01064c6d.pth", "01064c6d"),
}


class FlowEstimator(nn.Module):
    """``estimator(image1, image2)`` -> (B, 2, H, W) float32 flow in pixels that backward-warps image2 onto
    image1 (``image1(p) ≈ image2(p + flow(p))``), for images in [-1, 1] of any size (torchvision's
    ``raft(image1, image2)[-1]``).

    corr: "auto" | "all_pairs" | "on_demand" (see ``models/raft.py``); downscale: 1 (official), 2 or 4 to
    compute the flow at reduced resolution (images resized with antialiasing) and upsample it bilinearly, its
    values scaled by the factor (faster, less memory, not the official flow).
    """

    def __init__(self, raft: RAFT, num_flow_updates: int = 12, corr: str = "auto", downscale: int = 1):
        super().__init__()
        if downscale not in (1, 2, 4):
            raise ValueError(f"downscale must be 1, 2 or 4, got {downscale}")
        if corr not in ("auto", "all_pairs", "on_demand"):
            raise ValueError(f"corr must be 'auto', 'all_pairs' or 'on_demand', got {corr!r}")
        if int(num_flow_updates) < 1:
            raise ValueError(f"num_flow_updates must be at least 1, got {num_flow_updates}")
        self.raft = raft.eval()
        self.num_flow_updates, self.corr, self.downscale = int(num_flow_updates), corr, int(downscale)

    @property
    def arch(self) -> str:
        return self.raft.arch

    def estimate_memory(self, h: int, w: int, batch: int = 1) -> int:
        """Rough peak bytes of one call on h x w images, beyond the weights. "auto" is counted as on-demand:
        it only takes the all-pairs volume when that fits in a quarter of what is free at call time."""
        h, w = padded_size(max(h // self.downscale, 1), max(w // self.downscale, 1))
        px = h * w * batch
        # feature encoder: about three 64-channel fp32 maps at half resolution; then fmap1, pooled fmap2,
        # context and the update block's maps at 1/8 resolution (a few dozen 256-channel-equivalents / 64)
        encoders = px // 4 * 64 * 4 * 3
        eighth = px // 64 * 4 * (256 * 10)
        corr = all_pairs_bytes(h, w, batch) if self.corr == "all_pairs" else (256 << 20)
        return int(max(encoders, eighth + corr) * 1.25)

    @torch.inference_mode()
    def forward(self, image1: torch.Tensor, image2: torch.Tensor, corr: str | None = None) -> torch.Tensor:
        param = next(self.raft.parameters())
        image1 = image1.to(param.device, param.dtype)
        image2 = image2.to(param.device, param.dtype)
        h, w = image1.shape[-2:]
        if self.downscale > 1:
            size = (max(h // self.downscale, 1), max(w // self.downscale, 1))
            image1 = F.interpolate(image1, size=size, mode="bilinear", align_corners=False, antialias=True)
            image2 = F.interpolate(image2, size=size, mode="bilinear", align_corners=False, antialias=True)
        flow = self.raft(image1, image2, self.num_flow_updates, corr=corr or self.corr).to(torch.float32)
        if self.downscale > 1:
            # per axis, the exact ratio (sizes that are not multiples of the factor are rounded down)
            scale = torch.tensor([w / flow.shape[-1], h / flow.shape[-2]], device=flow.device).view(1, 2, 1, 1)
            flow = F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False) * scale
        return flow


def detect_arch(state_dict: dict) -> str:
    # Only RAFT-large has the convex-upsampling mask predictor.
    return "raft_large" if any(k.startswith("mask_predictor.") for k in state_dict) else "raft_small"


def _manual_hint(name: str | None = None) -> str:
    names = [name] if name in RAFT_WEIGHTS else list(RAFT_WEIGHTS)
    links = ", ".join(f"{n}: {RAFT_WEIGHTS[n][0]}" for n in names)
    return (f"Use torchvision's RAFT weights ({links}); `streamvsr download` fetches RAFT-large, the one "
            f"Stream-DiffVSR was trained with.")


def read_state_dict(path) -> dict:
    """Tensors of a .pth (loaded with weights_only=True) or .safetensors file; a ``state_dict``/``model`` wrapper
    and a DataParallel ``module.`` prefix are removed."""
    from .loader import WeightsError

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"RAFT weights {path} do not exist. {_manual_hint()}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state_dict = load_file(str(path))
        else:
            state_dict = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"cannot read {path}: {e}. The file is truncated or not a weights file. "
                           f"{_manual_hint()}") from None
    for key in ("state_dict", "model"):
        if isinstance(state_dict, dict) and isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors. {_manual_hint()}")
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def load_raft(path, operations=None, device="cpu", dtype=torch.float32, num_flow_updates: int = 12,
              corr: str = "auto", downscale: int = 1) -> FlowEstimator:
    """Load RAFT weights in torchvision's format (.pth or .safetensors) strictly; large/small is read from the
    keys. A file that does not match raises WeightsError naming the missing, unexpected and misshapen keys."""
    from .loader import WeightsError, key_mismatches

    path = Path(path)
    state_dict = read_state_dict(path)
    arch = detect_arch(state_dict)
    model = RAFT(arch, operations=operations or nn, device="meta", dtype=dtype)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = key_mismatches(expected, state_dict)
    if problems:
        raise WeightsError("; ".join([f"{path} is not a torchvision {arch} state dict"] + problems) + ". "
                           + _manual_hint())
    state_dict = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    model = model.to(device).eval().requires_grad_(False)
    return FlowEstimator(model, num_flow_updates=num_flow_updates, corr=corr, downscale=downscale)


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hash_prefix(filename) -> str | None:
    """The sha256 prefix in a torchvision-style name ``<name>-<8+ hex digits>.<ext>``, or None."""
    tail = Path(filename).name.split(".")[0].rsplit("-", 1)
    if len(tail) == 2 and len(tail[1]) >= 8 and all(ch in "0123456789abcdef" for ch in tail[1].lower()):
        return tail[1].lower()
    return None


def check_hash_prefix(path, prefix: str | None = None) -> None:
    """Raise ValueError when the file's sha256 does not start with ``prefix`` (default: the one in its name)."""
    prefix = prefix or hash_prefix(path)
    if prefix and not sha256_of(path).startswith(prefix):
        raise ValueError(f"{path} is corrupt or not the published file: its sha256 does not start with "
                         f"{prefix}. Delete it and download it again.")


def download_raft(name: str, dest_dir, progress: bool = True) -> Path:
    """Download torchvision's RAFT weights ``name`` ("raft_large" or "raft_small") into ``dest_dir`` and return
    the path; a verified copy already there is reused. The file is written as ``.part`` and renamed only after
    its sha256 prefix matched. Offline, the error says where to download the file by hand."""
    if name not in RAFT_WEIGHTS:
        raise ValueError(f"unknown RAFT weights {name!r} (use one of {sorted(RAFT_WEIGHTS)})")
    url, filename, prefix = RAFT_WEIGHTS[name]
    dest_dir = Path(dest_dir)
    target = dest_dir / filename
    if target.is_file():
        check_hash_prefix(target, prefix)
        return target
    manual = (f"Download {url} by hand (browser, curl -LO or wget) and put it at {target} "
              f"(its sha256 starts with {prefix}).")
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RuntimeError(f"cannot create {dest_dir}: {e}") from None
    part = target.with_name(target.name + ".part")
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
                if progress and total and done * 10 // total > reported:
                    reported = done * 10 // total
                    log.info("%s: %d%%", filename, 10 * reported)
    except (urllib.error.URLError, OSError) as e:
        part.unlink(missing_ok=True)
        raise RuntimeError(f"could not download {url} ({getattr(e, 'reason', e)}). Offline? {manual}") from None
    if not digest.hexdigest().startswith(prefix):
        part.unlink(missing_ok=True)
        raise RuntimeError(f"the download of {url} is corrupt (its sha256 does not start with {prefix}); try "
                           f"again. {manual}")
    os.replace(part, target)
    return target


# The Middlebury colour wheel (Baker et al. 2011): number of hues between consecutive primaries/secondaries,
# red -> yellow -> green -> cyan -> blue -> magenta -> red.
_WHEEL_SEGMENTS = (15, 6, 4, 11, 13, 6)


def _colour_wheel() -> np.ndarray:
    rows = []
    corners = [(255, 0, 0), (255, 255, 0), (0, 255, 0), (0, 255, 255), (0, 0, 255), (255, 0, 255), (255, 0, 0)]
    for n, start, end in zip(_WHEEL_SEGMENTS, corners, corners[1:]):
        i = np.arange(n)
        # the channel that changes moves in integer steps floor(255 * i / n), as in the reference tables
        seg = np.empty((n, 3))
        for ch in range(3):
            if start[ch] == end[ch]:
                seg[:, ch] = start[ch]
            elif end[ch] > start[ch]:
                seg[:, ch] = np.floor(255 * i / n)
            else:
                seg[:, ch] = 255 - np.floor(255 * i / n)
        rows.append(seg)
    return np.concatenate(rows) / 255.0


def flow_to_image(flow, max_magnitude: float | None = None) -> np.ndarray:
    """Colour-wheel visualisation (Middlebury, Baker et al.) of an H x W x 2 or 2 x H x W flow -> uint8 H x W x 3.

    Hue is the direction (right red, down orange-yellow, left cyan, up blue-violet), saturation the speed
    relative to ``max_magnitude`` (default: the largest in the flow); white is no motion. Speeds beyond
    ``max_magnitude`` are drawn at full saturation and darkened by 25%, as in the Middlebury code.
    """
    if torch.is_tensor(flow):
        flow = flow.detach().to("cpu", torch.float32).numpy()
    flow = np.asarray(flow, dtype=np.float32)
    if flow.ndim == 3 and flow.shape[0] == 2 and flow.shape[-1] != 2:
        flow = flow.transpose(1, 2, 0)
    if flow.ndim != 3 or flow.shape[-1] != 2:
        raise ValueError(f"flow must be H x W x 2 or 2 x H x W, got {flow.shape}")
    u, v = flow[..., 0].astype(np.float64), flow[..., 1].astype(np.float64)
    u = np.nan_to_num(u)
    v = np.nan_to_num(v)
    magnitude = np.sqrt(u * u + v * v)
    scale = float(max_magnitude) if max_magnitude else float(magnitude.max())
    scale = max(scale, np.finfo(np.float32).eps)
    radius = magnitude / scale
    wheel = _colour_wheel()
    n = wheel.shape[0]
    angle = np.arctan2(-v, -u) / np.pi  # in [-1, 1]
    position = (angle + 1) / 2 * (n - 1)
    k0 = np.floor(position).astype(np.int64)
    k1 = (k0 + 1) % n
    frac = (position - k0)[..., None]
    colour = (1 - frac) * wheel[k0] + frac * wheel[k1]
    inside = (radius <= 1)[..., None]
    colour = np.where(inside, 1 - np.minimum(radius, 1)[..., None] * (1 - colour), colour * 0.75)
    return np.floor(255 * colour).clip(0, 255).astype(np.uint8)


def flow_dir(in_dir, out_dir, flow_path, save: str = "npy", device="cpu", corr: str = "auto",
             downscale: int = 1, num_flow_updates: int = 12, dtype=torch.float32) -> int:
    """``streamvsr flow``: for each consecutive pair of ``in_dir/*.png`` (sorted by name), write the flow that
    backward-warps frame i-1 onto frame i, i.e. ``RAFT(image1=frame i, image2=frame i-1)``, at input resolution,
    named after frame i: ``npy`` = float32 H x W x 2 (x then y, in pixels), ``png`` = colour-wheel picture.
    Returns the number of flows written."""
    from ..cli import list_pngs, read_frame

    if save not in ("npy", "png"):
        raise ValueError(f"save must be 'npy' or 'png', got {save!r}")
    estimator = load_raft(flow_path, device=device, dtype=dtype, corr=corr, downscale=downscale,
                          num_flow_updates=num_flow_updates)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = None
    count = 0
    for path in list_pngs(in_dir):
        current = read_frame(path)[None] * 2 - 1
        if previous is not None:
            if previous.shape != current.shape:
                raise ValueError(f"{path.name} is {tuple(current.shape[-2:])}, the previous frame "
                                 f"{tuple(previous.shape[-2:])}: all frames must have the same size")
            flow = estimator(current, previous)[0].permute(1, 2, 0).cpu().numpy().astype(np.float32)
            if save == "npy":
                np.save(out_dir / f"{path.stem}.npy", flow)
            else:
                from PIL import Image

                Image.fromarray(flow_to_image(flow)).save(out_dir / f"{path.stem}.png")
            count += 1
            log.debug("flow %s", path.name)
        previous = current
    return count
