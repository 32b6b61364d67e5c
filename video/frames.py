"""Folders of frames: reading PNGs (8- and 16-bit), writing PNG/16-bit PNG/npy, and the folder jobs of
``streamvsr frames`` and ``streamvsr flow`` (any engine of ``models/contract.py``; any flow function)."""

from __future__ import annotations

import logging
import struct
import zlib
from collections import deque
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..models.shared.errors import UserInputError

log = logging.getLogger(__name__)

SAVE_FORMATS = ("png", "png16", "npy")


def write_png16(path: Path, rgb: np.ndarray) -> None:
    """Write an H x W x 3 uint16 array as a 16-bit RGB PNG (PIL cannot write 16-bit RGB)."""
    h, w, _ = rgb.shape
    raw = np.ascontiguousarray(rgb.astype(">u2")).view(np.uint8).reshape(h, w * 6)
    rows = np.concatenate([np.zeros((h, 1), np.uint8), raw], axis=1)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + chunk(b"IEND", b""))


def read_frame(path: Path) -> torch.Tensor:
    """A PNG as a (3, h, w) float32 tensor in [0, 1] (alpha dropped, like the official preprocessing)."""
    from PIL import Image

    with Image.open(path) as img:
        if img.mode in ("I;16", "I;16B", "I"):
            arr = np.asarray(img, dtype=np.float32) / 65535.0
            arr = np.repeat(arr[..., None], 3, axis=2)
        else:
            arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)


def save_frame(hr: torch.Tensor, path_stem: Path, fmt: str) -> Path:
    """Save a (1, 3, H, W) [0, 1] tensor as png (8-bit, rounded like the official), png16 or npy."""
    from PIL import Image

    arr = hr[0].permute(1, 2, 0).to("cpu").float().numpy()
    if fmt == "npy":
        path = path_stem.with_suffix(".npy")
        np.save(path, arr.astype(np.float32))
    elif fmt == "png16":
        path = path_stem.with_suffix(".png")
        write_png16(path, np.round(arr * 65535).astype(np.uint16))
    else:
        path = path_stem.with_suffix(".png")
        Image.fromarray(np.round(arr * 255).astype(np.uint8)).save(path)
    return path


def list_pngs(in_dir: Path) -> list[Path]:
    in_dir = Path(in_dir)
    if not in_dir.is_dir():
        raise UserInputError(f"{in_dir} is not a folder")
    files = sorted(p for p in in_dir.iterdir() if p.suffix.lower() == ".png")
    if not files:
        raise UserInputError(f"no .png files in {in_dir}")
    return files


def upscale_folder(engine, files: list[Path], out_dir: Path, seed: int = 42, save: str = "png",
                   progress: Callable[[int], None] | None = None) -> int:
    """Upscale ``files`` (one sequence, in order) into ``out_dir``, one output per input with the same stem.
    Frames are written as the engine finishes them. Returns the number written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = engine.new_state(seed)
    stems: deque[str] = deque()
    written = 0

    def emit(frames: torch.Tensor) -> None:
        nonlocal written
        for hr in frames:
            save_frame(hr[None], out_dir / stems.popleft(), save)
            written += 1
            if progress is not None:
                progress(written)

    for path in files:
        stems.append(path.stem)
        out, state = engine.push(state, read_frame(path)[None])
        emit(out)
    out, state = engine.flush(state)
    emit(out)
    return written


def flow_folder(estimator: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], files: list[Path], out_dir: Path,
                save: str = "npy") -> int:
    """For each consecutive pair of ``files``, write the flow that backward-warps frame i-1 onto frame i, i.e.
    ``estimator(image1=frame i, image2=frame i-1)``, at input resolution, named after frame i: ``npy`` = float32
    H x W x 2 (x then y, in pixels), ``png`` = colour-wheel picture. Returns the number of flows written."""
    from ..models.raft.visualise import flow_to_image

    if save not in ("npy", "png"):
        raise UserInputError(f"save must be 'npy' or 'png', got {save!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = None
    count = 0
    for path in files:
        current = read_frame(path)[None] * 2 - 1
        if previous is not None:
            if previous.shape != current.shape:
                raise UserInputError(f"{path.name} is {tuple(current.shape[-2:])}, the previous frame "
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
