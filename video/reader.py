"""Decoding a video file one frame at a time into float RGB tensors, with its timing."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator

import torch

from ..models.shared.errors import UserInputError

# AVColorSpace values -> swscale matrix names.
_MATRICES = {1: "ITU709", 4: "FCC", 5: "ITU601", 6: "ITU601", 7: "SMPTE240M", 9: "BT2020", 10: "BT2020"}


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    rate: Fraction            # average frame rate
    time_base: Fraction
    frames: int               # from the header, or estimated from the duration; 0 if unknown
    audio_streams: int


def open_input(source):
    """``source``: a path, bytes (the whole file), or a binary file object (read from its start)."""
    import av

    if isinstance(source, (str, os.PathLike)):
        return av.open(str(source))
    if isinstance(source, (bytes, bytearray, memoryview)):
        return av.open(io.BytesIO(source))
    if hasattr(source, "seek"):
        source.seek(0)
    return av.open(source)


def describe(source) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else "the input video (in memory)"


def reopenable(source):
    """The video and the audio are read by two demuxers at once; they cannot share one file object."""
    if isinstance(source, (str, os.PathLike, bytes)):
        return source
    if hasattr(source, "getvalue"):
        return source.getvalue()  # BytesIO: no copy while the buffer is not modified
    if hasattr(source, "seek"):
        source.seek(0)
    return source.read()


def frame_to_tensor(frame) -> torch.Tensor:
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
        self.container = open_input(source)
        if not self.container.streams.video:
            self.container.close()
            raise UserInputError(f"{describe(source)} has no video stream")
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
            yield index, (frame_to_tensor(frame) if index >= self.start else None), pts

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
