"""Stream a video file through the upscaler into another video file, one frame at a time.

Decoding, upscaling and encoding are interleaved, so memory does not depend on the video's length: at any time
one input frame, one output frame and the engine's state are alive. Audio packets are copied unchanged,
timestamps and frame rate are kept.
"""

from __future__ import annotations

import argparse
import logging
from fractions import Fraction
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

CODECS = {
    # name: (PyAV codec, pixel format, options, containers it suits)
    "h264": ("libx264", "yuv420p", {"crf": "16", "preset": "medium"}, (".mp4", ".mkv", ".mov")),
    "lossless": ("ffv1", "bgr0", {}, (".mkv",)),
}
# Audio codecs an MP4/MOV can carry as they are; others are re-encoded to AAC there.
MP4_AUDIO = {"aac", "mp3", "alac", "ac3", "eac3", "opus", "flac"}
SCENE_CUT_SIZE = 64


class SceneCutDetector:
    """Flags a cut when consecutive LR frames differ a lot.

    Metric: mean absolute difference of the two frames in [0, 1], after area-downscaling to at most 64 px on
    the long side (so noise and small motion barely count). A cut is declared when it exceeds ``threshold``;
    0.3 separates hard cuts from fast motion on typical footage.
    """

    def __init__(self, threshold: float):
        self.threshold = float(threshold)
        self.previous: torch.Tensor | None = None

    def __call__(self, frame: torch.Tensor) -> bool:
        h, w = frame.shape[-2:]
        scale = SCENE_CUT_SIZE / max(h, w)
        small = frame[None, :3].float()
        if scale < 1:
            small = F.interpolate(small, size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="area")
        cut = self.previous is not None and self.previous.shape == small.shape and \
            float((small - self.previous).abs().mean()) > self.threshold
        self.previous = small
        return cut


def reset_for_cut(state):
    """A state that starts a new shot: no temporal guidance, but the noise sequence carries on."""
    from dataclasses import replace

    return replace(state, prev_output=None, prev_upscaled=None)


def _frame_to_tensor(frame) -> torch.Tensor:
    arr = frame.to_ndarray(format="rgb24")
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255)


def _tensor_to_rgb24(hr: torch.Tensor) -> np.ndarray:
    return (hr[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def upscale_video(engine, in_path, out_path, seed: int = 42, codec: str = "h264", crf: int | None = None,
                  scene_cut_threshold: float | None = None,
                  progress: Callable[[int, int], None] | None = None,
                  should_stop: Callable[[], None] | None = None) -> dict:
    """Upscale ``in_path`` 4x into ``out_path``. Returns a summary (frames, cuts, fps, size).

    ``in_path`` may be a path or a binary file object. ``should_stop`` is called before each frame and may
    raise to abort; the output written so far is then closed properly (a playable, shorter file).
    """
    import av

    if codec not in CODECS:
        raise ValueError(f"codec must be one of {sorted(CODECS)}, got {codec!r}")
    av_codec, pix_fmt, options, containers = CODECS[codec]
    out_path = Path(out_path)
    if out_path.suffix.lower() not in containers:
        raise ValueError(f"codec {codec!r} needs a {' or '.join(containers)} output file, got {out_path.name}")
    options = dict(options)
    if crf is not None and codec == "h264":
        options["crf"] = str(int(crf))

    source = av.open(str(in_path) if isinstance(in_path, (str, Path)) else in_path)
    if not source.streams.video:
        source.close()
        raise ValueError(f"{in_path} has no video stream")
    v_in = source.streams.video[0]
    v_in.thread_type = "AUTO"
    a_ins = list(source.streams.audio)
    total = v_in.frames or 0
    rate = v_in.average_rate or v_in.guessed_rate or Fraction(30)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    sink = av.open(str(out_path), "w")
    # Every stream must exist before the first packet is muxed (that writes the header); the output is
    # exactly 4x the input.
    v_out = sink.add_stream(av_codec, rate=rate, options=options)
    v_out.width, v_out.height = v_in.codec_context.width * 4, v_in.codec_context.height * 4
    v_out.pix_fmt = pix_fmt
    v_out.time_base = v_in.time_base
    a_map = {}
    mp4 = out_path.suffix.lower() in (".mp4", ".mov")
    for a in a_ins:
        if mp4 and a.codec_context.name not in MP4_AUDIO:
            a_map[a.index] = ("transcode", sink.add_stream("aac", rate=a.rate))
        else:
            a_map[a.index] = ("copy", sink.add_stream_from_template(a))

    state = engine.new_state(seed)
    detector = SceneCutDetector(scene_cut_threshold) if scene_cut_threshold else None
    done = cuts = 0
    finished = False
    try:
        for packet in source.demux([v_in, *a_ins]):
            if packet.stream.type == "audio":
                mode, stream = a_map[packet.stream.index]
                if mode == "copy":
                    if packet.dts is None:
                        continue
                    packet.stream = stream
                    sink.mux(packet)
                else:
                    for aframe in packet.decode():
                        aframe.pts = None
                        for out_packet in stream.encode(aframe):
                            sink.mux(out_packet)
                continue
            for frame in packet.decode():
                if should_stop is not None:
                    should_stop()
                lr = _frame_to_tensor(frame)
                if detector is not None and detector(lr) and state.prev_output is not None:
                    state = reset_for_cut(state)
                    cuts += 1
                    log.info("scene cut at frame %d: temporal state reset", done)
                hr, state = engine.step(lr, state)
                out_frame = av.VideoFrame.from_ndarray(_tensor_to_rgb24(hr), format="rgb24")
                out_frame.pts, out_frame.time_base = frame.pts, frame.time_base
                for out_packet in v_out.encode(out_frame):
                    sink.mux(out_packet)
                done += 1
                if progress is not None:
                    progress(done, total)
        finished = True
    finally:
        try:  # flush the encoders, also after an interrupt, so what was written stays playable
            for out_packet in v_out.encode():
                sink.mux(out_packet)
            for mode, stream in a_map.values():
                if mode == "transcode":
                    for out_packet in stream.encode():
                        sink.mux(out_packet)
        except Exception:
            if finished:
                raise
            log.warning("could not finalise %s after an error", out_path)
        sink.close()
        source.close()
    return {"frames": done, "scene_cuts": cuts, "fps": float(rate),
            "size": (v_out.width, v_out.height)}


def add_upscale_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("in_video", type=Path)
    p.add_argument("out_video", type=Path, help=".mp4/.mkv/.mov (h264) or .mkv (lossless)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="official Stream-DiffVSR folder or single .safetensors")
    src.add_argument("--download", action="store_true",
                     help="download the official weights (and RAFT-large) into $STREAMVSR_MODELS "
                          "(default ~/.cache/streamvsr) if missing, and use them")
    p.add_argument("--flow", help="RAFT weights in torchvision's format (default with --download: RAFT-large)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--codec", choices=sorted(CODECS), default="h264",
                   help="h264: libx264 yuv420p (crf 16); lossless: FFV1 RGB in .mkv")
    p.add_argument("--crf", type=int, help="h264 quality (lower is better; default 16)")
    p.add_argument("--scene-cut", type=float, metavar="T",
                   help="reset the temporal state where the mean abs difference of consecutive input frames "
                        "exceeds T (0..1; 0.3 is a good start); off by default")
    p.add_argument("--corr", choices=("auto", "all_pairs", "on_demand"), default="auto")
    p.add_argument("--flow-downscale", type=int, choices=(1, 2, 4), default=1)


def cli_upscale(args) -> int:
    from .cli import Progress, default_models_dir, pick_device, pick_dtype
    from .models.engine import StreamEngine
    from .models.flow import download_raft, load_raft
    from .models.loader import load_pipeline

    if not args.model and not args.download:
        raise SystemExit("error: give --model PATH or --download")
    if args.download:
        from .models.hub import download_stream_diffvsr

        model_path = download_stream_diffvsr(default_models_dir() / "Stream-DiffVSR")
        flow_path = args.flow or download_raft("raft_large", default_models_dir() / "raft")
    else:
        model_path = args.model
        flow_path = args.flow
        if not flow_path:
            raise SystemExit("error: give --flow PATH (torchvision RAFT weights), or use --download")
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    engine = StreamEngine(load_pipeline(model_path, device=device, dtype=dtype),
                          load_raft(flow_path, device=device, corr=args.corr, downscale=args.flow_downscale),
                          steps=args.steps, device=device, compute_dtype=dtype)
    bar = Progress(None, "upscale")

    def progress(done, total):
        bar.total = total or None
        bar.update(done)

    summary = upscale_video(engine, args.in_video, args.out_video, seed=args.seed, codec=args.codec,
                            crf=args.crf, scene_cut_threshold=args.scene_cut, progress=progress)
    bar.close()
    log.info("wrote %s: %d frames, %sx%s, %.3g fps, %d scene cuts", args.out_video, summary["frames"],
             *(summary["size"] or (0, 0)), summary["fps"], summary["scene_cuts"])
    return 0

