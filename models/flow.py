"""Optical-flow estimator around RAFT: weights (torchvision's released files), options, and the
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

from .raft import RAFT, all_pairs_bytes

log = logging.getLogger(__name__)

# name -> (url, file name). torchvision names its files <name>-<first 8 hex digits of the sha256>.pth.
RAFT_WEIGHTS = {
    "raft_large": ("https://download.pytorch.org/models/raft_large_C_T_SKHT_V2-ff5fadd5.pth",
                   "raft_large_C_T_SKHT_V2-ff5fadd5.pth"),
    "raft_small": ("https://download.pytorch.org/models/raft_small_C_T_V2-01064c6d.pth",
                   "raft_small_C_T_V2-01064c6d.pth"),
}


class FlowEstimator(nn.Module):
    """``estimator(image1, image2)`` -> (B, 2, H, W) float32 flow in pixels that backward-warps image2 onto
    image1 (``image1(p) ≈ image2(p + flow(p))``), for images in [-1, 1] of any size.

    corr: "auto" | "all_pairs" | "on_demand" (see ``models/raft.py``); downscale: 1 (official), 2 or 4 to
    compute the flow at reduced resolution and upsample it (faster, less memory, not the official flow).
    """

    def __init__(self, raft: RAFT, num_flow_updates: int = 12, corr: str = "auto", downscale: int = 1):
        super().__init__()
        if downscale not in (1, 2, 4):
            raise ValueError(f"downscale must be 1, 2 or 4, got {downscale}")
        self.raft = raft.eval()
        self.num_flow_updates, self.corr, self.downscale = int(num_flow_updates), corr, int(downscale)

    @property
    def arch(self) -> str:
        return self.raft.arch

    def estimate_memory(self, h: int, w: int) -> int:
        h, w = h // self.downscale, w // self.downscale
        encoders = h * w * 64 * 4 * 6  # a few 64-channel maps at half resolution for one image
        corr = all_pairs_bytes(h, w) if self.corr == "all_pairs" else (h // 8) * (w // 8) * 256 * 4 * 8
        return int(encoders + corr)

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
            scale = torch.tensor([w / flow.shape[-1], h / flow.shape[-2]], device=flow.device).view(1, 2, 1, 1)
            flow = F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False) * scale
        return flow


def detect_arch(state_dict: dict) -> str:
    # Only RAFT-large has the convex-upsampling mask predictor.
    return "raft_large" if any(k.startswith("mask_predictor.") for k in state_dict) else "raft_small"


def load_raft(path, operations=None, device="cpu", dtype=torch.float32, num_flow_updates: int = 12,
              corr: str = "auto", downscale: int = 1) -> FlowEstimator:
    """Load RAFT weights in torchvision's format (.pth or .safetensors); large/small is read from the keys."""
    from .loader import WeightsError

    path = Path(path)
    hint = (f"Use torchvision's RAFT weights: {RAFT_WEIGHTS['raft_large'][0]} (or raft_small: "
            f"{RAFT_WEIGHTS['raft_small'][0]}), e.g. via `streamvsr download`.")
    if not path.is_file():
        raise WeightsError(f"RAFT weights {path} do not exist. {hint}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state_dict = load_file(str(path))
        else:
            state_dict = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"cannot read {path}: {e}. The file is truncated or not a weights file. {hint}") \
            from None
    if not isinstance(state_dict, dict):
        raise WeightsError(f"{path} does not hold a state dict. {hint}")
    arch = detect_arch(state_dict)
    model = RAFT(arch, operations=operations or nn, device="meta", dtype=dtype)
    expected = model.state_dict()
    missing = expected.keys() - state_dict.keys()
    unexpected = state_dict.keys() - expected.keys()
    shapes = [k for k in expected.keys() & state_dict.keys() if tuple(expected[k].shape) != tuple(state_dict[k].shape)]
    if missing or unexpected or shapes:
        def names(keys):
            keys = sorted(keys)
            return ", ".join(keys[:8]) + (f" … and {len(keys) - 8} more" if len(keys) > 8 else "")
        parts = [f"{path} is not a torchvision {arch} state dict"]
        if missing:
            parts.append(f"missing {len(missing)} keys: {names(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys: {names(unexpected)}")
        if shapes:
            parts.append(f"wrong shapes: {names(shapes)}")
        raise WeightsError("; ".join(parts) + ". " + hint)
    state_dict = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    model = model.to(device).eval().requires_grad_(False)
    return FlowEstimator(model, num_flow_updates=num_flow_updates, corr=corr, downscale=downscale)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_hash_prefix(path: Path) -> None:
    """torchvision's convention: the file name ends in ``-<first 8 hex digits of its sha256>``."""
    prefix = Path(path).stem.rsplit("-", 1)[-1]
    if len(prefix) == 8 and not sha256_of(path).startswith(prefix):
        raise ValueError(f"{path} is corrupt: its sha256 does not start with {prefix}. Delete it and download again.")


def download_raft(name: str, dest_dir, progress: bool = True) -> Path:
    """Download torchvision's RAFT weights into ``dest_dir`` (skipped when a verified copy is there)."""
    if name not in RAFT_WEIGHTS:
        raise ValueError(f"unknown RAFT weights {name!r} (use one of {sorted(RAFT_WEIGHTS)})")
    url, filename = RAFT_WEIGHTS[name]
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / filename
    if target.exists():
        check_hash_prefix(target)
        return target
    part = target.with_name(target.name + ".part")
    log.info("downloading %s to %s", url, target)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
                done += len(block)
                if progress and total:
                    log.debug("%s: %.0f%%", filename, 100 * done / total)
    except (urllib.error.URLError, OSError) as e:
        part.unlink(missing_ok=True)
        raise RuntimeError(
            f"could not download {url} ({e}). Offline? Download it by hand and put it at {target}.") from None
    prefix = Path(filename).stem.rsplit("-", 1)[-1]
    if not sha256_of(part).startswith(prefix):
        part.unlink(missing_ok=True)
        raise RuntimeError(f"the download of {url} is corrupt (sha256 does not start with {prefix}); try again")
    os.replace(part, target)
    return target


def flow_to_image(flow: np.ndarray | torch.Tensor, max_magnitude: float | None = None) -> np.ndarray:
    """Colour-wheel visualisation (Baker et al., Middlebury) of an H x W x 2 or 2 x H x W flow -> uint8 H x W x 3.

    Hue is the direction, saturation the magnitude relative to ``max_magnitude`` (default: the largest).
    """
    if torch.is_tensor(flow):
        flow = flow.detach().to("cpu", torch.float32).numpy()
    flow = np.asarray(flow, dtype=np.float32)
    if flow.ndim == 3 and flow.shape[0] == 2 and flow.shape[-1] != 2:
        flow = flow.transpose(1, 2, 0)
    u, v = flow[..., 0], flow[..., 1]
    magnitude = np.sqrt(u * u + v * v)
    scale = max_magnitude if max_magnitude else max(float(magnitude.max()), 1e-6)
    u, v, magnitude = u / scale, v / scale, np.clip(magnitude / scale, 0, 1)
    wheel = _colour_wheel()
    n = wheel.shape[0]
    angle = np.arctan2(-v, -u) / np.pi  # in [-1, 1]
    position = (angle + 1) / 2 * (n - 1)
    k0 = np.floor(position).astype(int)
    k1 = (k0 + 1) % n
    frac = (position - k0)[..., None]
    colour = (1 - frac) * wheel[k0] + frac * wheel[k1]
    colour = 1 - magnitude[..., None] * (1 - colour)
    return np.round(colour * 255).astype(np.uint8)


def _colour_wheel() -> np.ndarray:
    # Segment lengths of the Middlebury colour wheel: red-yellow, yellow-green, green-cyan, cyan-blue,
    # blue-magenta, magenta-red.
    segments = [(15, (1, 0, 0), (1, 1, 0)), (6, (1, 1, 0), (0, 1, 0)), (4, (0, 1, 0), (0, 1, 1)),
                (11, (0, 1, 1), (0, 0, 1)), (13, (0, 0, 1), (1, 0, 1)), (6, (1, 0, 1), (1, 0, 0))]
    rows = []
    for length, start, end in segments:
        t = np.arange(length)[:, None] / length
        rows.append((1 - t) * np.array(start) + t * np.array(end))
    return np.concatenate(rows).astype(np.float32)


def flow_dir(in_dir, out_dir, flow_path, save: str = "npy", device="cpu", corr: str = "auto",
             downscale: int = 1) -> int:
    """Write, for each consecutive pair of ``in_dir/*.png``, the flow that backward-warps frame i-1 onto
    frame i (``RAFT(image1=frame i, image2=frame i-1)``) at input resolution, named after frame i."""
    from ..cli import list_pngs, read_frame

    estimator = load_raft(flow_path, device=device, corr=corr, downscale=downscale)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = None
    count = 0
    for path in list_pngs(in_dir):
        current = read_frame(path)[None] * 2 - 1
        if previous is not None:
            if previous.shape != current.shape:
                raise ValueError(f"{path.name} has a different size from the previous frame")
            flow = estimator(current, previous)[0].permute(1, 2, 0).cpu().numpy()
            if save == "npy":
                np.save(out_dir / f"{path.stem}.npy", flow.astype(np.float32))
            else:
                from PIL import Image

                Image.fromarray(flow_to_image(flow)).save(out_dir / f"{path.stem}.png")
            count += 1
        previous = current
    return count
