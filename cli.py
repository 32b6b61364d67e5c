"""The ``streamvsr`` command line: the engine without ComfyUI.

    streamvsr upscale IN_VIDEO OUT_VIDEO --download       # the main job: a video file in, a 4x video file out
    streamvsr frames IN_DIR OUT_DIR --model PATH --flow PATH
    streamvsr flow IN_DIR OUT_DIR --flow PATH
    streamvsr convert MODEL_DIR OUT.safetensors --dtype fp16
    streamvsr download [--dest DIR]
"""

from __future__ import annotations

import argparse
import logging
import os
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np

log = logging.getLogger("streamvsr")


def default_models_dir() -> Path:
    return Path(os.environ.get("STREAMVSR_MODELS", Path.home() / ".cache" / "streamvsr"))


def pick_device(name: str):
    import torch

    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(name: str, device):
    import torch

    from .models.loader import DTYPES

    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class Progress:
    """A one-line progress report on stderr (frames done, frames/s, time left)."""

    def __init__(self, total: int | None, label: str):
        self.total, self.label, self.start = total, label, time.monotonic()
        self.enabled = sys.stderr.isatty() or os.environ.get("STREAMVSR_PROGRESS") == "1"

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = done / elapsed
        if self.total:
            eta = (self.total - done) / rate if rate > 0 else float("inf")
            text = f"{self.label}: {done}/{self.total} frames, {rate:.2f} fps, {eta:.0f} s left"
        else:
            text = f"{self.label}: {done} frames, {rate:.2f} fps"
        sys.stderr.write("\r" + text)
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


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


def read_frame(path: Path):
    """A PNG as a (3, h, w) float32 tensor in [0, 1] (alpha dropped, like the official preprocessing)."""
    import torch
    from PIL import Image

    with Image.open(path) as img:
        if img.mode in ("I;16", "I;16B", "I"):
            arr = np.asarray(img, dtype=np.float32) / 65535.0
            arr = np.repeat(arr[..., None], 3, axis=2)
        else:
            arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)


def save_frame(hr, path_stem: Path, fmt: str) -> Path:
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
    files = sorted(p for p in Path(in_dir).iterdir() if p.suffix.lower() == ".png")
    if not files:
        raise SystemExit(f"error: no .png files in {in_dir}")
    return files


def cmd_frames(args) -> int:
    from .models.engine import StreamEngine
    from .models.flow import load_raft
    from .models.loader import load_pipeline

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    files = list_pngs(args.in_dir)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(args.model, device=device, dtype=dtype)
    flow = load_raft(args.flow, device=device, corr=args.corr, downscale=args.flow_downscale)
    engine = StreamEngine(pipe, flow, steps=args.steps, device=device, compute_dtype=dtype)
    state = engine.new_state(args.seed)
    progress = Progress(len(files), "frames")
    for i, path in enumerate(files):
        hr, state = engine.step(read_frame(path), state)
        save_frame(hr, out_dir / path.stem, args.save)
        progress.update(i + 1)
    progress.close()
    log.info("wrote %d frames to %s", len(files), out_dir)
    return 0


def cmd_flow(args) -> int:
    from .models.flow import flow_dir

    flow_dir(args.in_dir, args.out_dir, args.flow, save=args.save, device=pick_device(args.device),
             corr=args.corr, downscale=args.flow_downscale)
    return 0


def cmd_convert(args) -> int:
    from .models.loader import DTYPES, convert_to_single_file

    out = convert_to_single_file(args.source, args.out, dtype=DTYPES[args.dtype])
    log.info("wrote %s (%.1f MB)", out, out.stat().st_size / 1e6)
    return 0


def cmd_download(args) -> int:
    from .models.flow import download_raft
    from .models.hub import download_stream_diffvsr

    dest = Path(args.dest) if args.dest else default_models_dir()
    model = download_stream_diffvsr(dest / "Stream-DiffVSR")
    raft = download_raft("raft_large", dest / "raft")
    log.info("model: %s\nflow: %s", model, raft)
    return 0


def _add_flow_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corr", choices=("auto", "all_pairs", "on_demand"), default="auto",
                   help="RAFT correlation: all-pairs volume (fast, O((HW)^2) memory), on-demand lookup "
                        "(bounded memory) or chosen from the frame size and free memory (default)")
    p.add_argument("--flow-downscale", type=int, choices=(1, 2, 4), default=1,
                   help="compute flow at 1/N resolution and upsample it (faster, less memory, "
                        "deviates from the official full-resolution flow); default 1")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamvsr", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("frames", help="upscale a folder of PNG frames (one sequence) 4x")
    p.add_argument("in_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--model", required=True, help="official Stream-DiffVSR folder or single .safetensors")
    p.add_argument("--flow", required=True, help="RAFT weights in torchvision's format (.pth or .safetensors)")
    p.add_argument("--seed", type=int, default=42, help="noise seed (the official inference script uses 42)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps (the model is distilled for 4)")
    p.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), default="fp32")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto")
    p.add_argument("--save", choices=("png", "png16", "npy"), default="png",
                   help="png: 8-bit; png16: 16-bit; npy: float32 HxWx3 in [0,1]")
    _add_flow_options(p)
    p.set_defaults(func=cmd_frames)

    p = sub.add_parser("flow", help="optical flow of consecutive PNG frames (backward-warps frame i-1 onto i)")
    p.add_argument("in_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--flow", required=True, help="RAFT weights in torchvision's format")
    p.add_argument("--save", choices=("npy", "png"), default="npy",
                   help="npy: float32 HxWx2 (x, y) in pixels; png: colour-wheel visualisation")
    p.add_argument("--device", default="auto")
    _add_flow_options(p)
    p.set_defaults(func=cmd_flow)

    try:
        from .video import add_upscale_arguments, cli_upscale
    except ImportError:
        pass
    else:
        p = sub.add_parser("upscale", help="upscale a video file 4x, streaming frame by frame")
        add_upscale_arguments(p)
        p.set_defaults(func=cli_upscale)

    p = sub.add_parser("convert", help="pack the official folder into one .safetensors file")
    p.add_argument("source", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp16")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("download", help="download the official Stream-DiffVSR and RAFT-large weights")
    p.add_argument("--dest", help=f"folder (default: $STREAMVSR_MODELS or {default_models_dir()})")
    p.set_defaults(func=cmd_download)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    from .models.loader import WeightsError

    try:
        return int(args.func(args) or 0)
    except WeightsError as e:
        log.error("error: %s", e)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
