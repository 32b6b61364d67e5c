"""Encoding RGB frames into a video file as they come: codecs, colour tags, odd sizes, and from the source its audio,
subtitles, chapters and labels (``audio.AudioCopy``)."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from ..models.shared.errors import UserInputError
from .audio import AudioCopy
from .reader import ffmpeg_path, open_input, video_stream

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
    max_side: int | None = None  # the encoder's largest frame width or height


CODECS = {
    "h264": Codec("libx264", "yuv420p", {"crf": "16", "preset": "medium"}, (".mp4", ".mkv", ".mov"),
                  "H.264 (libx264, yuv420p, CRF 16, BT.709): plays everywhere", max_side=16384),
    "lossless": Codec("ffv1", "bgr0", {"level": "3"}, (".mkv",),
                      "FFV1 RGB in MKV: bit-exact 8-bit RGB, large files"),
}


def clock_start(origin_us: int) -> dict:
    """The muxer options that make an output's clock start at ``origin_us`` of its input's (``VideoInfo``): the
    muxer shifts every stream's timestamps alike, and everything before it keeps the input's clock."""
    if origin_us <= 0:
        return {}
    return {"output_ts_offset": f"-{origin_us // 1_000_000}.{origin_us % 1_000_000:06d}"}


class VideoWriter:
    """Encodes RGB frames into a video file as they come.

    ``write(rgb, pts)`` takes an H x W x 3 uint8 array and the frame's pts in ``time_base`` units. Odd sizes
    (FlashVSR at scale 1 or 3 makes them) are padded by one replicated row/column for yuv420p. ``audio_from``: a
    file whose audio streams (and what else ``audio.AudioCopy`` copies) are copied in, interleaved by time.
    ``b_frames=False`` makes every packet's dts equal its pts (needed to join segments).
    """

    def __init__(self, path, width: int, height: int, rate: Fraction, time_base: Fraction, codec: str = "h264",
                 crf: int | None = None, audio_from=None, b_frames: bool = True, sample_aspect_ratio=None,
                 color_tags: dict | None = None, origin_us: int = 0):
        import av

        spec = codec_spec(codec, path)
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
        self.container = av.open(ffmpeg_path(self.path), "w", options=clock_start(origin_us))
        try:
            stream = self.container.add_stream(spec.encoder, rate=rate, options=options)
            stream.width, stream.height = width + self.pad[1], height + self.pad[0]
            stream.pix_fmt = spec.pix_fmt
            stream.codec_context.time_base = time_base
            stream.time_base = time_base
            if sample_aspect_ratio:
                stream.codec_context.sample_aspect_ratio = sample_aspect_ratio
            # BT.709 matrix, limited range for YUV (RGB has no matrix); primaries/transfer kept from the source
            # when it has them, so that its RGB values keep their meaning.
            tags = {"colorspace": 1, "color_range": 1, "color_primaries": 1, "color_trc": 1} if self.yuv else \
                {"colorspace": 0}
            if self.yuv or color_tags:
                tags.update(color_tags or {})
                for name, value in tags.items():
                    try:
                        setattr(stream.codec_context, name, value)
                    except (AttributeError, TypeError, ValueError):
                        pass
            self.stream = stream
            # Every stream must exist before the first packet is muxed (that writes the header).
            self.audio = AudioCopy(audio_from, self.container, self.path.suffix, origin_us) \
                if audio_from is not None else None
        except BaseException:
            self.container.close()
            raise
        self.frame_seconds = float(1 / rate) if rate else 0.0
        self.last_time = 0.0
        self.video_end = 0.0  # seconds: where the frames written so far end, each with its own duration
        self.frames = 0
        # MP4 and MOV state a track's length as its decoding times' span plus the last packet's duration, which
        # falls short of the frames' times where B-frames delay the decoding times by unequal gaps (variable frame
        # rate): the last packet is held back, to be given the duration that makes up for it
        self.dts_span = self.container.format.name.split(",")[0] in ("mov", "mp4")
        self.held = None
        self.first, self.pts_end = None, None  # (first dts, first pts), latest pts + duration
        self.durations: dict[int, int] = {}  # pts -> duration of the frames given one, until their packet comes

    def write(self, rgb: np.ndarray, pts: int, duration: float | None = None) -> None:
        """Encode one frame at ``pts``; ``duration`` (time-base units): how long it is shown, where known (set on
        its packet as the encoder gives it out: the muxers end the video with the last one's)."""
        import av

        if rgb.shape != (self.height, self.width, 3):
            raise UserInputError(f"expected a {self.height}x{self.width}x3 frame, got {rgb.shape}")
        if any(self.pad):
            rgb = np.pad(rgb, ((0, self.pad[0]), (0, self.pad[1]), (0, 0)), mode="edge")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        if self.yuv:
            frame = frame.reformat(format=self.stream.pix_fmt, dst_colorspace="ITU709", dst_color_range="MPEG")
        frame.pts, frame.time_base = int(pts), self.stream.codec_context.time_base
        if duration:
            self.durations[int(pts)] = max(1, round(duration))  # (encoders leave their packets without one)
        self._mux_video(self.stream.encode(frame))
        self.frames += 1

    def _mux_video(self, packets) -> None:
        for packet in packets:
            duration = self.durations.pop(packet.pts, None) if packet.pts is not None else None
            if duration and not packet.duration:
                packet.duration = duration
            if packet.pts is not None:
                length = packet.duration or round(self.frame_seconds / packet.time_base)
                self.video_end = max(self.video_end, float((packet.pts + length) * packet.time_base))
            if self.audio is not None and packet.pts is not None:
                # Audio up to the video already written keeps the muxer's interleaving buffer short.
                self.last_time = max(self.last_time, float(packet.pts * packet.time_base))
                self.audio.mux_until(self.last_time)
            if not self.dts_span or packet.pts is None or packet.dts is None:
                self.container.mux(packet)
                continue
            if self.first is None:
                self.first = (packet.dts, packet.pts)
            # (the encoder leaves durations out: a frame of the nominal rate, as the muxer would take)
            end = packet.pts + (packet.duration or round(self.frame_seconds / packet.time_base))
            self.pts_end = end if self.pts_end is None else max(self.pts_end, end)
            if self.held is not None:
                self.container.mux(self.held)
            self.held = packet

    def _mux_last(self) -> None:
        packet, self.held = self.held, None
        if packet is None:
            return
        first_dts, first_pts = self.first
        packet.duration = max(packet.duration or 0, (self.pts_end - first_pts) - (packet.dts - first_dts))
        self.container.mux(packet)

    def close(self, complete: bool = True) -> None:
        """Flush and finish the file. ``complete=False`` (an interrupted run) cuts the audio at the video's end."""
        try:
            self._mux_video(self.stream.encode(None))
            self._mux_last()
            if self.audio is not None:
                self.audio.finish(None if complete else self.video_end)
        finally:
            if self.audio is not None:
                self.audio.close()  # (after a failed flush: the source stays open otherwise, locked on Windows)
            self.container.close()


def frames_on_disk(path) -> int:
    """How many video frames a file that could not be finished holds (its packets as far as they can be read; 0
    where it does not open: an MP4 whose index was never written)."""
    import av

    count = 0
    try:
        with av.open(ffmpeg_path(path)) as container:
            if container.streams.video:
                for packet in container.demux(container.streams.video[0]):
                    count += packet.size > 0  # (the end-of-stream marker is empty)
    except Exception:  # noqa: BLE001 - damage ends the count; what was read before it is there
        pass
    return count


def check_frame_size(codec: str, width: int, height: int) -> None:
    """A one-line error where ``codec`` cannot encode output frames of ``width`` x ``height`` (x264 refuses sides
    over 16384, once the model has loaded and upscaled the first frame): to be found before that."""
    limit = CODECS[codec].max_side if codec in CODECS else None
    if limit is not None and max(width, height) > limit:
        raise UserInputError(f"{codec} cannot encode the {width}x{height} output frames ({CODECS[codec].encoder} "
                             f"takes at most {limit} pixels a side): choose the lossless codec (a .mkv output), or "
                             "a smaller input (FlashVSR: or a smaller scale)")


def codec_spec(name: str, path) -> Codec:
    if name not in CODECS:
        raise UserInputError(f"codec must be one of {sorted(CODECS)}, got {name!r}")
    spec = CODECS[name]
    suffix = Path(path).suffix.lower()
    if suffix not in spec.containers and suffix != ".nut":
        raise UserInputError(f"codec {name!r} needs a {' or '.join(spec.containers)} output file, got {Path(path).name}")
    if not _has_encoder(spec.encoder):
        # PyAV built against a system FFmpeg without x264 (some distributions leave it out) would otherwise fail
        # only once the models have loaded
        other = [k for k, v in CODECS.items() if k != name and _has_encoder(v.encoder)]
        raise UserInputError(f"this PyAV's FFmpeg has no {spec.encoder} encoder, which codec {name!r} needs: "
                             + (f"choose codec {other[0]!r}, or " if other else "")
                             + "install PyPI's av wheel (pip install --force-reinstall av)")
    return spec


def _has_encoder(encoder: str) -> bool:
    import av

    try:
        av.codec.Codec(encoder, "w")
    except av.codec.codec.UnknownCodecError:
        return False
    return True


def check_crf(crf, codec: str) -> None:
    """``crf`` is x264's quality (0-51) and means nothing to the other codecs: refused there, not ignored."""
    if crf is None:
        return
    if codec != "h264":
        raise UserInputError(f"crf sets H.264 quality; codec {codec!r} has no such setting (leave crf out)")
    if isinstance(crf, bool) or not hasattr(crf, "__index__") or not 0 <= crf <= 51:
        raise UserInputError(f"crf must be a whole number from 0 to 51 (x264's range; lower is better), got {crf!r}")


# Transfer characteristics (ISO/IEC 23091-2) of HDR video
HDR_TRANSFERS = {16: "PQ", 18: "HLG"}


def depth_notes(source) -> list[str]:
    """What an output loses of the input's picture beyond its size: HDR, which nothing here tone-maps, and samples
    deeper than the 8 bits of every output codec."""
    try:
        with open_input(source) as c:
            ctx = video_stream(c).codec_context  # (None: caught)
            transfer = getattr(ctx, "color_trc", 2)
            bits = max((comp.bits for comp in ctx.format.components), default=8) if ctx.format else 8
    except Exception:  # notes only; the reader reports an input it cannot use
        return []
    notes = []
    if transfer in HDR_TRANSFERS:
        notes.append(f"the input is HDR ({HDR_TRANSFERS[transfer]}): the models were trained on SDR video and "
                     "nothing here tone-maps, so the output (tagged as the input) may look off; tone-map it to SDR "
                     "first for the best result")
    if bits > 8:
        notes.append(f"the input has {bits} bits per sample; the output has 8 (banding may show in smooth areas)")
    return notes


def color_tags(source) -> dict:
    """Primaries and transfer of the input's video stream, when tagged (the RGB values keep meaning them)."""
    try:
        with open_input(source) as c:
            ctx = video_stream(c).codec_context  # (None: caught)
            tags = {"color_primaries": getattr(ctx, "color_primaries", 2),
                    "color_trc": getattr(ctx, "color_trc", 2)}
    except Exception:  # tags are cosmetic; never fail a job over them
        return {}
    return {k: v for k, v in tags.items() if v not in (0, 2)}  # 2 = unspecified


def to_rgb24(hr: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) [0, 1] on any device -> H x W x 3 uint8 (rounded; converted on the device, then copied)."""
    return hr[0].mul(255).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().cpu().numpy()
