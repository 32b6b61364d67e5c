"""Stream a video file through the upscaler into another video file, one frame at a time.

Memory does not depend on the video's length. The main thread decodes a frame, runs ``engine.step`` and converts
the result to 8-bit RGB; a writer thread encodes and muxes it. Between the two sits a queue of at most
``QUEUE_FRAMES`` frames, and x264's look-ahead is capped at ``X264_LOOKAHEAD`` frames, so at any time only a
fixed number of frames is alive however long the video is. Nothing is kept per frame.

Timing: output frames keep the input frames' timestamps (same time base), so frame rate and variable frame
timing survive. Audio: every audio stream is copied packet for packet; only where the output container cannot
hold the codec (e.g. PCM in MP4) is it re-encoded to AAC. Colour: the input is decoded to RGB with the matrix
it is tagged with (untagged: BT.709 from 720 lines up, BT.601 below, as players assume); H.264 output is
encoded and tagged as BT.709 limited range, the convention for HD and 4K video.

Scene cuts (optional): ``SceneCutDetector`` compares consecutive LR frames; at a cut the temporal guidance is
dropped, so the first frame of the new shot is upscaled like a first frame instead of being guided by a warp
of the previous shot. The noise generator is not reseeded: frame *n* of the video always gets the *n*-th noise
draw, with or without detection.

Resume (optional, ``resume=True``): the video is written as segments ``OUT.streamvsr-partNNNN.EXT`` (video
only, each a complete file) and, at every checkpoint, the engine state and the count of frames written go to
``OUT.streamvsr-resume.safetensors``. A checkpoint closes the current segment first, so the state always
matches what is on disk, also after a crash or power loss (work since the last checkpoint is redone). When
all frames are done, the segments are joined into OUT without re-encoding, the audio is added from the input,
and the work files are deleted. H.264 segments are encoded without B-frames so that their timestamps can be
joined as they are (files get a few percent larger at the same CRF).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# Frames waiting between the engine and the encoder: enough to overlap the two, few enough to stay flat.
QUEUE_FRAMES = 2
# x264 buffers about this many frames (+1); medium's default of 40 would make memory grow over the first 41
# frames, and at 4K that is ~0.5 GB.
X264_LOOKAHEAD = 20


@dataclass(frozen=True)
class Codec:
    encoder: str
    pix_fmt: str
    options: dict
    containers: tuple[str, ...]
    description: str


CODECS = {
    "h264": Codec("libx264", "yuv420p", {"crf": "16", "preset": "medium"}, (".mp4", ".mkv", ".mov"),
                  "H.264 (libx264, yuv420p, CRF 16, BT.709): plays everywhere"),
    "lossless": Codec("ffv1", "bgr0", {"level": "3"}, (".mkv",),
                      "FFV1 RGB in MKV: bit-exact 8-bit RGB, large files"),
}
# Audio codecs MP4/MOV carry without trouble in every FFmpeg version; others are re-encoded to AAC there.
# Matroska takes any codec.
MP4_AUDIO = {"aac", "mp3", "alac", "ac3", "eac3"}
SCENE_CUT_SIZE = 64
# AVColorSpace values -> swscale matrix names.
_MATRICES = {1: "ITU709", 4: "FCC", 5: "ITU601", 6: "ITU601", 7: "SMPTE240M", 9: "BT2020", 10: "BT2020"}
_RESUME_VERSION = 1


class SceneCutDetector:
    """Flags a cut when consecutive LR frames differ a lot.

    Metric: mean absolute difference of the two frames in [0, 1] (RGB), after area-downscaling to at most 64 px
    on the long side, so noise, grain and small motion barely count. A cut is declared when it exceeds
    ``threshold``. 0.3 separates hard cuts from fast motion on typical footage; lower values (0.15-0.2) also
    catch cuts between similar-looking shots but may fire on flashes or very fast pans.
    """

    def __init__(self, threshold: float):
        if not 0 < threshold <= 1:
            raise ValueError(f"scene-cut threshold must be in (0, 1], got {threshold}")
        self.threshold = float(threshold)
        self.previous: torch.Tensor | None = None

    @staticmethod
    def thumbnail(frame: torch.Tensor) -> torch.Tensor:
        h, w = frame.shape[-2:]
        small = frame.reshape(-1, *frame.shape[-3:])[:1, :3].float().cpu()
        scale = SCENE_CUT_SIZE / max(h, w)
        if scale < 1:
            small = F.interpolate(small, size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="area")
        return small

    def __call__(self, frame: torch.Tensor) -> bool:
        small = self.thumbnail(frame)
        cut = self.previous is not None and self.previous.shape == small.shape and \
            float((small - self.previous).abs().mean()) > self.threshold
        self.previous = small
        return cut


def reset_for_cut(state):
    """A state that starts a new shot: no temporal guidance, but the noise sequence carries on."""
    return replace(state, prev_output=None, prev_upscaled=None)


# --------------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    rate: Fraction            # average frame rate
    time_base: Fraction
    frames: int               # from the header, or estimated from the duration; 0 if unknown
    audio_streams: int


def _open_input(source):
    """``source``: a path, bytes (the whole file), or a binary file object (read from its start)."""
    import av

    if isinstance(source, (str, os.PathLike)):
        return av.open(str(source))
    if isinstance(source, (bytes, bytearray, memoryview)):
        return av.open(io.BytesIO(source))
    if hasattr(source, "seek"):
        source.seek(0)
    return av.open(source)


def _describe(source) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else "the input video (in memory)"


def _reopenable(source):
    """The video and the audio are read by two demuxers at once; they cannot share one file object."""
    if isinstance(source, (str, os.PathLike, bytes)):
        return source
    if hasattr(source, "getvalue"):
        return source.getvalue()  # BytesIO: no copy while the buffer is not modified
    if hasattr(source, "seek"):
        source.seek(0)
    return source.read()


def _frame_to_tensor(frame) -> torch.Tensor:
    """A decoded frame -> (3, h, w) float32 RGB in [0, 1], 16-bit when the source has more than 8 bits."""
    kwargs = {}
    if not frame.format.is_rgb:
        kwargs["src_colorspace"] = _MATRICES.get(frame.colorspace, "ITU709" if frame.height >= 720 else "ITU601")
        if frame.color_range == 2:
            kwargs["src_color_range"] = "JPEG"
    deep = max(c.bits for c in frame.format.components) > 8
    arr = frame.to_ndarray(format="rgb48le" if deep else "rgb24", **kwargs)
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(65535.0 if deep else 255.0)


class FrameReader:
    """Decodes the first video stream of a file one frame at a time.

    Iterating yields ``(index, frame, pts)``: ``frame`` is (3, h, w) float32 RGB in [0, 1] on the CPU, ``pts``
    the presentation time in ``info.time_base`` units (made up from the frame rate if the file has none, and
    nudged to stay strictly increasing, which encoders require). Frames before ``start`` are decoded but not
    converted (for resuming).
    """

    def __init__(self, source, start: int = 0):
        self.container = _open_input(source)
        if not self.container.streams.video:
            self.container.close()
            raise ValueError(f"{_describe(source)} has no video stream")
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "AUTO"
        self.start = start
        ctx = self.stream.codec_context
        rate = self.stream.average_rate or self.stream.guessed_rate or Fraction(25)
        frames = self.stream.frames or 0
        if not frames and self.container.duration:
            frames = round(self.container.duration / 1_000_000 * rate)
        self.info = VideoInfo(ctx.width, ctx.height, Fraction(rate),
                              Fraction(self.stream.time_base or Fraction(1, 90000)), int(frames),
                              len(self.container.streams.audio))

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor | None, int]]:
        step = 1 / (self.info.rate * self.info.time_base)
        last = None
        for index, frame in enumerate(self.container.decode(self.stream)):
            pts = frame.pts if frame.pts is not None else round(index * step)
            if last is not None and pts <= last:
                pts = last + 1
            last = pts
            yield index, (_frame_to_tensor(frame) if index >= self.start else None), pts

    def close(self) -> None:
        self.container.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_frames(source, start: int = 0) -> Iterator[tuple[int, torch.Tensor, int]]:
    """``(index, frame (3, h, w) float32 in [0, 1], pts)`` for each frame, decoding one at a time."""
    with FrameReader(source) as reader:
        for index, frame, pts in reader:
            if index >= start:
                yield index, frame, pts


# --------------------------------------------------------------------------------------------------- writing


class _AudioCopy:
    """Copies the audio streams of ``source`` into ``sink``, interleaved with the video by time."""

    def __init__(self, source, sink, out_suffix: str):
        self.container = _open_input(source)
        self.streams = list(self.container.streams.audio)
        self.sink = sink
        self.map = {}
        mp4 = out_suffix.lower() in (".mp4", ".mov", ".m4v")
        for a in self.streams:
            if mp4 and a.codec_context.name not in MP4_AUDIO:
                log.info("audio stream %d (%s) cannot go into %s as it is: re-encoding to AAC",
                         a.index, a.codec_context.name, out_suffix)
                out = sink.add_stream("aac", rate=a.codec_context.sample_rate)
                out.bit_rate = 192000
                self.map[a.index] = ("encode", out)
            else:
                self.map[a.index] = ("copy", sink.add_stream_from_template(a))
        self.packets = self.container.demux(self.streams) if self.streams else iter(())
        self.pending = None

    def mux_until(self, seconds: float | None) -> None:
        """Mux audio packets that start before ``seconds`` (all of them if None)."""
        while True:
            if self.pending is None:
                self.pending = next(self.packets, None)
                if self.pending is None:
                    return
            packet = self.pending
            if packet.dts is None and packet.pts is None:
                self.pending = None
                continue
            start = float((packet.pts if packet.pts is not None else packet.dts) * packet.time_base)
            if seconds is not None and start > seconds:
                return
            self.pending = None
            mode, out = self.map[packet.stream.index]
            if mode == "copy":
                if packet.dts is None:
                    continue
                packet.stream = out
                self.sink.mux(packet)
            else:
                for frame in packet.decode():
                    frame.pts = None  # the encoder's resampler re-times the re-chunked frames
                    self.sink.mux(out.encode(frame))

    def finish(self, until: float | None) -> None:
        try:
            self.mux_until(until)
            for mode, out in self.map.values():
                if mode == "encode":
                    self.sink.mux(out.encode(None))
        finally:
            self.container.close()


class VideoWriter:
    """Encodes RGB frames into a video file as they come.

    ``write(rgb, pts)`` takes an H x W x 3 uint8 array and the frame's pts in ``time_base`` units. Odd sizes
    (not possible for 4x output, but the writer is general) are padded by one replicated row/column for
    yuv420p. ``audio_from``: a file whose audio streams are copied in, interleaved by time. ``b_frames=False``
    makes every packet's dts equal its pts (needed to join segments).
    """

    def __init__(self, path, width: int, height: int, rate: Fraction, time_base: Fraction, codec: str = "h264",
                 crf: int | None = None, audio_from=None, b_frames: bool = True, sample_aspect_ratio=None,
                 color_tags: dict | None = None):
        import av

        spec = _codec(codec, path)
        self.path = Path(path)
        self.width, self.height = width, height
        options = dict(spec.options)
        if spec.encoder == "libx264":
            if crf is not None:
                options["crf"] = str(int(crf))
            params = [f"rc-lookahead={X264_LOOKAHEAD}"] + ([] if b_frames else ["bframes=0"])
            options["x264-params"] = ":".join(params)
        self.pad = (height % 2, width % 2) if spec.pix_fmt == "yuv420p" else (0, 0)
        self.yuv = spec.pix_fmt.startswith("yuv")
        self.container = av.open(str(self.path), "w")
        try:
            stream = self.container.add_stream(spec.encoder, rate=rate, options=options)
            stream.width, stream.height = width + self.pad[1], height + self.pad[0]
            stream.pix_fmt = spec.pix_fmt
            stream.codec_context.time_base = time_base
            stream.time_base = time_base
            if sample_aspect_ratio:
                stream.codec_context.sample_aspect_ratio = sample_aspect_ratio
            if self.yuv:
                # BT.709 matrix, limited range; primaries/transfer kept from the source when it has them.
                tags = {"colorspace": 1, "color_range": 1, "color_primaries": 1, "color_trc": 1}
                tags.update(color_tags or {})
                for name, value in tags.items():
                    try:
                        setattr(stream.codec_context, name, value)
                    except (AttributeError, TypeError, ValueError):
                        pass
            self.stream = stream
            # Every stream must exist before the first packet is muxed (that writes the header).
            self.audio = _AudioCopy(audio_from, self.container, self.path.suffix) if audio_from is not None \
                else None
        except BaseException:
            self.container.close()
            raise
        self.frame_seconds = float(1 / rate) if rate else 0.0
        self.last_time = 0.0
        self.frames = 0

    def write(self, rgb: np.ndarray, pts: int) -> None:
        import av

        if rgb.shape != (self.height, self.width, 3):
            raise ValueError(f"expected a {self.height}x{self.width}x3 frame, got {rgb.shape}")
        if any(self.pad):
            rgb = np.pad(rgb, ((0, self.pad[0]), (0, self.pad[1]), (0, 0)), mode="edge")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        if self.yuv:
            frame = frame.reformat(format=self.stream.pix_fmt, dst_colorspace="ITU709", dst_color_range="MPEG")
        frame.pts, frame.time_base = int(pts), self.stream.codec_context.time_base
        self._mux_video(self.stream.encode(frame))
        self.frames += 1

    def _mux_video(self, packets) -> None:
        for packet in packets:
            if self.audio is not None and packet.pts is not None:
                # Audio up to the video already written keeps the muxer's interleaving buffer short.
                self.last_time = max(self.last_time, float(packet.pts * packet.time_base))
                self.audio.mux_until(self.last_time)
            self.container.mux(packet)

    def close(self, complete: bool = True) -> None:
        """Flush and finish the file. ``complete=False`` (an interrupted run) cuts the audio at the video's end."""
        try:
            self._mux_video(self.stream.encode(None))
            if self.audio is not None:
                self.audio.finish(None if complete else self.last_time + self.frame_seconds)
        finally:
            self.container.close()


def _codec(name: str, path) -> Codec:
    if name not in CODECS:
        raise ValueError(f"codec must be one of {sorted(CODECS)}, got {name!r}")
    spec = CODECS[name]
    suffix = Path(path).suffix.lower()
    if suffix not in spec.containers and suffix != ".nut":
        raise ValueError(f"codec {name!r} needs a {' or '.join(spec.containers)} output file, got {Path(path).name}")
    return spec


def _color_tags(source) -> dict:
    """Primaries and transfer of the input's video stream, when tagged (the RGB values keep meaning them)."""
    try:
        with _open_input(source) as c:
            ctx = c.streams.video[0].codec_context
            tags = {"color_primaries": getattr(ctx, "color_primaries", 2),
                    "color_trc": getattr(ctx, "color_trc", 2)}
    except Exception:  # tags are cosmetic; never fail a job over them
        return {}
    return {k: v for k, v in tags.items() if v not in (0, 2)}  # 2 = unspecified


def _to_rgb24(hr: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) [0, 1] on any device -> H x W x 3 uint8 (rounded; converted on the device, then copied)."""
    return hr[0].mul(255).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().cpu().numpy()


# ---------------------------------------------------------------------------------------------------- resume


class ResumeFiles:
    """The work files of a resumable job writing ``out_path``."""

    def __init__(self, out_path):
        self.out = Path(out_path)
        self.state = self.out.with_name(self.out.name + ".streamvsr-resume.safetensors")

    def part(self, index: int) -> Path:
        # NUT keeps every timestamp exactly in the input's time base (MP4 would round a segment's start to the
        # millisecond through its edit list) and carries any codec.
        return self.out.with_name(f"{self.out.name}.streamvsr-part{index:04d}.nut")

    def parts_on_disk(self) -> list[Path]:
        prefix = self.out.name + ".streamvsr-part"
        return sorted(p for p in self.out.parent.glob(f"{glob_escape(prefix)}*") if p.name.startswith(prefix))

    def load(self):
        from safetensors import safe_open

        from .models.engine import StreamState

        if not self.state.exists():
            return None
        with safe_open(str(self.state), "pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        info = json.loads(meta["streamvsr_resume"])
        state = StreamState.from_dict({k: v for k, v in tensors.items() if k != "scene_thumbnail"}, meta)
        return info, state, tensors.get("scene_thumbnail")

    def save(self, state, info: dict, thumbnail: torch.Tensor | None) -> None:
        from safetensors.torch import save_file

        tensors, meta = state.to("cpu").to_dict()
        if thumbnail is not None:
            tensors["scene_thumbnail"] = thumbnail.contiguous()
        meta = {**meta, "streamvsr_resume": json.dumps(info)}
        tmp = self.state.with_name(self.state.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, self.state)  # atomic: a crash leaves the previous checkpoint intact

    def remove(self) -> None:
        for p in self.parts_on_disk():
            p.unlink(missing_ok=True)
        self.state.unlink(missing_ok=True)


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def _fingerprint(source, engine, seed, codec, crf, scene_cut_threshold, info: VideoInfo) -> dict:
    if isinstance(source, (str, os.PathLike)):
        src = {"input": os.path.abspath(source), "input_bytes": os.path.getsize(source)}
    else:
        src = {"input": None, "input_bytes": None}
    return {**src, "size": [info.width, info.height], "seed": int(seed), "codec": codec,
            "crf": crf, "scene_cut": scene_cut_threshold, "steps": getattr(engine, "steps", None),
            "model": _model_identity(engine), "version": _RESUME_VERSION}


def _model_identity(engine) -> str | None:
    """Compute dtype and a checksum of a few weights: resuming with another model or precision would splice two
    different renderings into one video."""
    engine = getattr(engine, "engine", engine)  # unwrap the ComfyUI node's out-of-memory guard
    pipe = getattr(engine, "pipeline", None)
    if pipe is None:
        return None
    tensors = [pipe.prompt_embeds] + [p for _, p in zip(range(4), pipe.parameters())]
    checksum = sum(float(t.detach().to("cpu", torch.float64).sum()) for t in tensors)
    return f"{getattr(engine, 'compute_dtype', None)}|{checksum:.10g}"


def join_segments(parts: list[Path], out_path: Path, audio_from=None, time_base: Fraction | None = None) -> int:
    """Remux video-only segments into one file (no re-encoding) and add the audio of ``audio_from``."""
    import av

    frames = 0
    with av.open(str(parts[0])) as first:
        template = first.streams.video[0]
        sink = av.open(str(out_path), "w")
        try:
            v_out = sink.add_stream_from_template(template)
            if time_base is not None:
                v_out.time_base = time_base
            audio = _AudioCopy(audio_from, sink, out_path.suffix) if audio_from is not None else None
            for part in parts:
                with av.open(str(part)) as seg:
                    for packet in seg.demux(seg.streams.video[0]):
                        if packet.dts is None:
                            continue
                        if audio is not None:
                            audio.mux_until(float(packet.pts * packet.time_base))
                        packet.stream = v_out
                        sink.mux(packet)
                        frames += 1
            if audio is not None:
                audio.finish(None)
        finally:
            sink.close()
    return frames


# ------------------------------------------------------------------------------------------------ the driver


class _WriterThread(threading.Thread):
    """Encodes frames from a bounded queue; handles segment switches and checkpoints in resume mode."""

    def __init__(self, make_writer: Callable[[int], VideoWriter], checkpoint: Callable | None, segment: int = 0):
        super().__init__(name="streamvsr-video-writer", daemon=True)
        self.queue: queue.Queue = queue.Queue(maxsize=QUEUE_FRAMES)
        self.make_writer, self.checkpoint = make_writer, checkpoint
        self.writer: VideoWriter | None = None
        self.segment = segment
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while True:
                item = self.queue.get()
                if item is None:
                    return
                kind, *payload = item
                if kind == "frame":
                    if self.writer is None:
                        self.writer = self.make_writer(self.segment)
                    self.writer.write(*payload)
                elif kind == "close":
                    self._close(*payload)
                elif kind == "checkpoint":
                    if self.writer is not None:
                        self._close(True)
                        self.segment += 1
                    self.checkpoint(self.segment, *payload)
        except BaseException as e:  # handed to the main thread, which raises it
            self.error = e
            if self.writer is not None:
                try:
                    self.writer.close(complete=False)
                except Exception:
                    pass

    def _close(self, complete: bool) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.close(complete=complete)

    def put(self, item) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        if self.is_alive():
            self.put(None)
            self.join()
        if self.error is not None:
            raise self.error


def upscale_video(engine, in_path, out_path, seed: int = 42, codec: str = "h264", crf: int | None = None,
                  scene_cut_threshold: float | None = None, resume: bool = False,
                  checkpoint_seconds: float = 60.0, checkpoint_frames: int | None = None,
                  progress: Callable[[int, int], None] | None = None,
                  should_stop: Callable[[], bool | None] | None = None,
                  preview: Callable[[torch.Tensor], None] | None = None) -> dict:
    """Upscale ``in_path`` 4x into ``out_path``, frame by frame. Returns a summary dict.

    engine: anything with ``new_state(seed)`` and ``step(frame, state) -> (hr, state)`` (``StreamEngine``).
    in_path: a path, or a seekable binary file object (not with ``resume``).
    codec: a key of ``CODECS``; the container is taken from ``out_path``'s extension. crf: H.264 quality.
    scene_cut_threshold: see ``SceneCutDetector``; None or 0 turns detection off.
    resume: write resumably (see the module docstring) and continue from a checkpoint of an earlier run of the
        same job if one is there. checkpoint_seconds / checkpoint_frames: how often to checkpoint.
    progress(done, total): after each frame; total is 0 when the file does not tell.
    should_stop(): polled before each frame; return True, or raise (ComfyUI's interrupt), to stop. The frames
        done so far are then finished properly: a shorter but playable file, or (resume) a checkpoint; a truthy
        return gives a summary with ``interrupted=True``, an exception is re-raised afterwards.
    preview(hr): called with each output frame (on the engine's device), e.g. for a UI preview.

    Summary: frames (in the output), processed (this run), scene_cuts, fps, size (w, h), path, resumed_from,
    interrupted.
    """
    out_path = Path(out_path)
    _codec(codec, out_path)
    if resume and not isinstance(in_path, (str, os.PathLike)):
        raise ValueError("resume needs the input as a file path (a file object cannot be checked on resume)")
    if isinstance(in_path, (str, os.PathLike)) and Path(in_path).resolve() == out_path.resolve():
        raise ValueError("the output file must not be the input file")
    in_path = _reopenable(in_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    files = ResumeFiles(out_path) if resume else None
    detector = SceneCutDetector(scene_cut_threshold) if scene_cut_threshold else None

    probe = FrameReader(in_path)
    info = probe.info
    sar = probe.stream.codec_context.sample_aspect_ratio
    probe.close()
    fingerprint = _fingerprint(in_path, engine, seed, codec, crf, scene_cut_threshold, info)
    summary = {"frames": 0, "processed": 0, "scene_cuts": 0, "fps": float(info.rate),
               "size": (info.width * 4, info.height * 4), "path": str(out_path), "resumed_from": 0,
               "interrupted": False}

    state, start, segments, complete = engine.new_state(seed), 0, 0, False
    if files is not None:
        loaded = files.load()
        if loaded is not None:
            saved, saved_state, thumbnail = loaded
            if saved.get("fingerprint") != fingerprint:
                raise ValueError(
                    f"{files.state} belongs to a job with other settings or another input "
                    f"(saved {saved.get('fingerprint')}, now {fingerprint}); delete it to start over, or run "
                    "with the same settings")
            state, start, segments = saved_state, int(saved["frames"]), int(saved["segments"])
            complete, summary["scene_cuts"] = bool(saved["complete"]), int(saved["scene_cuts"])
            if detector is not None:
                detector.previous = thumbnail
            log.info("resuming %s after %d frames", out_path, start)
        keep = {files.part(i) for i in range(segments)}
        for stale in files.parts_on_disk():
            if stale not in keep:
                stale.unlink()  # written after the last checkpoint: incomplete or not matching the state
        missing = [p for p in sorted(keep) if not p.exists()]
        if missing:
            raise ValueError(f"the resume state {files.state} needs {missing[0]}, which is gone; delete the "
                             "state file to start over")
    summary["resumed_from"] = summary["frames"] = start

    color_tags = _color_tags(in_path) if codec != "lossless" else {}

    def make_writer(segment: int) -> VideoWriter:
        path = files.part(segment) if files is not None else out_path
        return VideoWriter(path, info.width * 4, info.height * 4, info.rate, info.time_base, codec=codec, crf=crf,
                           audio_from=None if files is not None else in_path, b_frames=files is None,
                           sample_aspect_ratio=sar, color_tags=color_tags)

    def checkpoint(segment_count: int, ckpt_state, frames: int, cuts: int, thumb, done: bool) -> None:
        files.save(ckpt_state, {"frames": frames, "segments": segment_count, "scene_cuts": cuts,
                                "complete": done, "fingerprint": fingerprint}, thumb)

    done = start
    stop_error: BaseException | None = None
    if not complete:
        writer = _WriterThread(make_writer, checkpoint if files is not None else None, segments)
        if files is None:
            # Opening the output up front fails early on unwritable paths, and a file exists even for 0 frames.
            writer.writer = make_writer(0)
        writer.start()
        last_checkpoint, since_checkpoint = time.monotonic(), 0
        stopped = False
        reader = FrameReader(in_path, start=start)
        try:
            for index, lr, pts in reader:
                if index < start:
                    continue
                if should_stop is not None:
                    try:
                        stopped = bool(should_stop())
                    except BaseException as e:
                        stop_error, stopped = e, True
                    if stopped:
                        summary["interrupted"] = True
                        break
                if detector is not None and detector(lr) and state.prev_output is not None:
                    state = reset_for_cut(state)
                    summary["scene_cuts"] += 1
                    log.info("scene cut at frame %d: temporal state reset", index)
                hr, state = engine.step(lr, state)
                if preview is not None:
                    preview(hr)
                writer.put(("frame", _to_rgb24(hr), pts))
                done += 1
                since_checkpoint += 1
                if progress is not None:
                    progress(done, max(info.frames, done))
                if files is not None and (
                        (checkpoint_frames and since_checkpoint >= checkpoint_frames)
                        or (not checkpoint_frames and time.monotonic() - last_checkpoint >= checkpoint_seconds)):
                    writer.put(("checkpoint", state.to("cpu"), done, summary["scene_cuts"],
                                detector.previous if detector is not None else None, False))
                    last_checkpoint, since_checkpoint = time.monotonic(), 0
            # Reached only at the end of the input or at a requested stop: the state matches the frames queued.
            if files is not None:
                writer.put(("checkpoint", state.to("cpu"), done, summary["scene_cuts"],
                            detector.previous if detector is not None else None, not stopped))
            else:
                writer.put(("close", not stopped))
            writer.finish()
            segments = writer.segment
        except BaseException:
            # An error or a hard interrupt mid-frame: end the writer without a new checkpoint (the last one still
            # matches what is on disk) and keep the file written so far playable.
            if writer.is_alive():
                try:
                    writer.put(("close", False))
                    writer.finish()
                except BaseException:
                    log.warning("could not finalise %s", out_path)
            raise
        finally:
            reader.close()
        complete = not stopped
    summary["frames"] = done
    summary["processed"] = done - start

    if files is not None and complete:
        parts = [files.part(i) for i in range(segments)]
        if not parts:
            raise ValueError(f"{_describe(in_path)} has no frames to upscale")
        tmp = out_path.with_name(out_path.stem + ".streamvsr-tmp" + out_path.suffix)
        summary["frames"] = join_segments(parts, tmp, audio_from=in_path, time_base=info.time_base)
        os.replace(tmp, out_path)
        files.remove()
    if stop_error is not None:
        raise stop_error
    if summary["interrupted"] and files is not None:
        log.info("stopped after %d frames; run again with resume to continue", done)
    return summary


# ------------------------------------------------------------------------------------------- command line


def add_upscale_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("in_video", type=Path)
    p.add_argument("out_video", type=Path, help="output file: .mp4/.mkv/.mov (h264) or .mkv (lossless)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="official Stream-DiffVSR folder or a single .safetensors")
    src.add_argument("--download", action="store_true",
                     help="use the official weights (and RAFT-large) from $STREAMVSR_MODELS (default "
                          "~/.cache/streamvsr), downloading them first if they are not there")
    p.add_argument("--flow", help="RAFT weights in torchvision's format (default with --download: RAFT-large)")
    p.add_argument("--seed", type=int, default=42, help="noise seed (the official inference script uses 42)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps (the model is distilled for 4)")
    p.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                   help="auto: bf16/fp16 on CUDA, fp32 elsewhere")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto")
    p.add_argument("--codec", choices=sorted(CODECS), default="h264",
                   help="; ".join(f"{k}: {v.description}" for k, v in CODECS.items()))
    p.add_argument("--crf", type=int, help="h264 quality, lower is better (default 16)")
    p.add_argument("--scene-cut", type=float, metavar="T",
                   help="reset the temporal guidance where the mean absolute difference of consecutive input "
                        "frames (in [0,1], at 64 px) exceeds T; 0.3 is a good start. Off by default")
    p.add_argument("--resume", action="store_true",
                   help="write resumably (segments + OUT.streamvsr-resume.safetensors next to OUT) and continue "
                        "an interrupted job; the same command again picks up where it stopped")
    p.add_argument("--checkpoint-every", type=float, default=60.0, metavar="SECONDS",
                   help="with --resume: seconds between checkpoints (default 60)")
    p.add_argument("--corr", choices=("auto", "all_pairs", "on_demand"), default="auto",
                   help="RAFT correlation (see `streamvsr frames --help`)")
    p.add_argument("--flow-downscale", type=int, choices=(1, 2, 4), default=1,
                   help="compute flow at 1/N resolution (faster, not the official flow)")


def _model_paths(args) -> tuple[str, str]:
    from .cli import default_models_dir

    if args.download:
        from .models.flow import download_raft
        from .models.hub import download_stream_diffvsr

        root = default_models_dir()
        model = root / "Stream-DiffVSR"
        model_path = download_stream_diffvsr(model)
        flow_path = args.flow or download_raft("raft_large", root / "raft")
        return str(model_path), str(flow_path)
    if not args.model:
        raise SystemExit("error: give --model PATH, or --download to fetch the official weights")
    if not args.flow:
        raise SystemExit("error: give --flow PATH (torchvision RAFT weights, e.g. from `streamvsr download`), "
                         "or use --download")
    return args.model, args.flow


class _GracefulStop:
    """First Ctrl-C: finish the current frame and close the file properly. Second: abort at once."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("\nstopping after this frame (Ctrl-C again to abort at once)")

    def __call__(self) -> bool:
        return self.requested

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def cli_upscale(args) -> int:
    """``streamvsr upscale``: returns 0 when the whole video was written, 130 after a Ctrl-C stop."""
    from .cli import Progress, pick_device, pick_dtype
    from .models.engine import StreamEngine
    from .models.flow import load_raft
    from .models.loader import load_pipeline

    if not Path(args.in_video).is_file():
        raise SystemExit(f"error: {args.in_video} does not exist")
    try:
        _codec(args.codec, args.out_video)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    model_path, flow_path = _model_paths(args)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    engine = StreamEngine(load_pipeline(model_path, device=device, dtype=dtype),
                          load_raft(flow_path, device=device, corr=args.corr, downscale=args.flow_downscale),
                          steps=args.steps, device=device, compute_dtype=dtype)
    bar = Progress(None, "upscale")

    def progress(done, total):
        bar.total = total or None
        bar.update(done)

    with _GracefulStop() as stop:
        try:
            summary = upscale_video(engine, args.in_video, args.out_video, seed=args.seed, codec=args.codec,
                                    crf=args.crf, scene_cut_threshold=args.scene_cut, resume=args.resume,
                                    checkpoint_seconds=args.checkpoint_every, progress=progress,
                                    should_stop=stop)
        finally:
            bar.close()
    w, h = summary["size"]
    if summary["interrupted"]:
        if args.resume:
            log.warning("stopped after %d frames; run the same command again to continue", summary["frames"])
        else:
            log.warning("stopped: %s has the first %d frames (use --resume to be able to continue a job)",
                        args.out_video, summary["frames"])
        return 130
    log.info("wrote %s: %d frames, %dx%d, %.3g fps, %d scene cuts", args.out_video, summary["frames"], w, h,
             summary["fps"], summary["scene_cuts"])
    return 0
