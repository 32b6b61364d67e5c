"""Decoding a video file one frame at a time into float RGB tensors, with its timing, upright, and with a report of
where it breaks when it is damaged or cut off.

Decoding runs without frame threading: FFmpeg's frame-threaded decoders drop the error of a damaged packet at the
end of a stream and simply stop, so a cut-off file would look like a short, complete one. Decoding is cheap next
to upscaling, so nothing is lost. Whether the file ends where its header says is checked afterwards
(``FrameReader.problem``).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
import math
import os
import re
import sys
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import torch

from ..models.shared.errors import InputDamagedError, UserInputError

log = logging.getLogger(__name__)

# The oldest PyAV that reads and writes videos right: before it, colour conversion of BT.2020 input failed, stream
# flags were dropped and some timestamps differed (requirements.txt asks for it; an environment may hold another).
MIN_AV = (18, 1)


def check_av_version(version: str | None = None) -> None:
    """A UserInputError where the installed PyAV (or ``version``) is older than ``MIN_AV``."""
    if version is None:
        import av

        version = av.__version__
    found = re.match(r"(\d+)\.(\d+)", version)
    if found is not None and tuple(map(int, found.groups())) < MIN_AV:
        wanted = ".".join(map(str, MIN_AV))
        how = (f"pip install -U \"av>={wanted}\" with the Python that runs this (for the nodes, ComfyUI's)"
               if sys.version_info >= (3, 11) else
               f"PyAV {wanted} needs Python 3.11 or newer, and this is Python {sys.version_info[0]}."
               f"{sys.version_info[1]}: use a Python 3.11+ environment (ComfyUI's portable build ships one)")
        raise UserInputError(f"video needs PyAV {wanted} or newer, and {version} is installed: {how}")


# AVColorSpace values -> swscale matrix names.
_MATRICES = {1: "ITU709", 4: "FCC", 5: "ITU601", 6: "ITU601", 7: "SMPTE240M", 9: "BT2020", 10: "BT2020"}


@dataclass(frozen=True)
class Orientation:
    """How a stored frame is turned to be seen as meant (the container's display matrix, e.g. a phone's portrait
    video stored landscape): transpose, then flip rows and/or columns. ``degrees`` (counter-clockwise) and
    ``mirrored`` are for messages."""

    transpose: bool = False
    flip_rows: bool = False
    flip_cols: bool = False
    degrees: int = 0
    mirrored: bool = False

    @property
    def identity(self) -> bool:
        return not (self.transpose or self.flip_rows or self.flip_cols)

    def size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) as displayed, for a stored (width, height)."""
        return (height, width) if self.transpose else (width, height)

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        """``image``: (..., h, w) as stored -> as displayed."""
        if self.transpose:
            image = image.transpose(-2, -1)
        dims = [d for d, flip in ((-2, self.flip_rows), (-1, self.flip_cols)) if flip]
        if dims:
            image = image.flip(dims)
        return image.contiguous() if not self.identity else image

    def describe(self) -> str:
        if self.mirrored:  # a mirror has several rotate-and-flip spellings; none reads better than this
            return "mirrored by its display matrix"
        if self.degrees:
            return f"rotated {abs(self.degrees)}° {'counter-clockwise' if self.degrees > 0 else 'clockwise'}"
        return "upright"


def orientation_from_matrix(matrix) -> Orientation | None:
    """FFmpeg's display matrix (9 ints, 16.16 fixed point; a point (p, q) of the stored frame is shown at
    (a p + c q, b p + d q), y pointing down) -> Orientation; None for a turn that is not a multiple of 90°."""
    a, b, c, d = (matrix[i] / 65536.0 for i in (0, 1, 3, 4))
    sx, sy = math.hypot(a, c), math.hypot(b, d)
    if sx == 0 or sy == 0:
        return None
    a, c, b, d = a / sx, c / sx, b / sy, d / sy

    def unit(v):
        return 0 if abs(v) < 0.01 else (1 if v > 0.99 else -1 if v < -0.99 else None)

    a, b, c, d = unit(a), unit(b), unit(c), unit(d)
    if None in (a, b, c, d):
        return None
    degrees = round(-math.degrees(math.atan2(b, a))) % 360
    degrees = degrees - 360 if degrees > 180 else degrees
    mirrored = a * d - b * c < 0
    if b == 0 and c == 0 and a and d:
        return Orientation(False, d < 0, a < 0, degrees, mirrored)
    if a == 0 and d == 0 and b and c:
        return Orientation(True, b < 0, c < 0, degrees, mirrored)
    return None


def orientation_from_degrees(degrees: float) -> Orientation | None:
    """A counter-clockwise display rotation (what FFmpeg's av_display_rotation_get returns)."""
    turn = round(degrees) % 360
    if turn % 90:
        return None
    r = math.radians(turn)  # av_display_rotation_set(matrix, -degrees): set takes a clockwise angle
    m = [round(math.cos(r) * 65536), round(-math.sin(r) * 65536), 0, round(math.sin(r) * 65536),
         round(math.cos(r) * 65536), 0, 0, 0, 1 << 30]
    return orientation_from_matrix(m)


@dataclass(frozen=True)
class VideoInfo:
    width: int                # as displayed, after the orientation
    height: int
    rate: Fraction            # average frame rate
    time_base: Fraction
    frames: int               # from the header, or estimated from the duration; 0 if unknown
    audio_streams: int
    header_frames: int = 0    # the container's own frame count (MP4/MOV index); 0 if it has none
    duration: float | None = None  # seconds of the video stream, when the container says
    orientation: Orientation = field(default_factory=Orientation)
    sample_aspect_ratio: Fraction | None = None  # of the displayed frame
    stored_size: tuple[int, int] = (0, 0)        # (width, height) as decoded, before the orientation
    first_pts: int | None = None  # the first decoded frame's timestamp (packets before it decode to nothing)
    origin_us: int = 0  # where the output's clock starts: the video's and audio's earliest start, if after 0
    interlaced: bool = False  # the first frame is flagged as two fields (broadcast, DVD, camcorders)


@dataclass(frozen=True)
class InputProblem:
    """Why decoding stopped before the end: ``kind`` is ``truncated`` (ends before its header says),
    ``damaged`` (a decoder or demuxer error), ``size`` (the frame size changes) or ``jump`` (the timestamps jump
    back); ``index``: frames decoded before it; ``message``: a sentence about the input."""

    kind: str
    index: int
    message: str


def describe(source) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else "the input video (in memory)"


def reason(e: BaseException) -> str:
    """An FFmpeg error as a phrase (its message without the errno)."""
    text = getattr(e, "strerror", None) or str(e)
    return text.rstrip(".")


def check_input_file(path) -> None:
    """The problems of an input path that need no decoder, each as a one-line error."""
    path = Path(path)
    if str(path) == "-":
        raise UserInputError("- (standard input) cannot be an input: a video is read more than once (checked, then "
                             "upscaled); save it to a file first")
    if not os.path.lexists(path):
        raise UserInputError(f"{path} does not exist")
    if not path.exists():
        raise UserInputError(f"{path} is a broken symbolic link")
    if path.is_dir():
        raise UserInputError(f"{path} is a folder, not a video file")
    if not path.is_file():
        raise UserInputError(f"{path} is a pipe or device, not a file: a video is read more than once (checked, then "
                             "upscaled); save it to a file first")
    if not os.access(path, os.R_OK):
        raise UserInputError(f"{path} cannot be read: permission denied")
    if path.stat().st_size == 0:
        raise UserInputError(f"{path} is empty (0 bytes)")


# Bytes read from each end of a video file to tell it from another file of its size.
SAMPLE_BYTES = 1 << 20


# (path, inode, size, modification and change times) -> content_sample, for the files sampled in this process
_SAMPLES: dict[tuple, str] = {}


def content_sample(path) -> str:
    """A digest of the first and last ``SAMPLE_BYTES`` of a file: what tells it from another file of its size (a
    video exported again, another take, one copied over it with its time kept) without reading gigabytes. Read
    once per version of the file in a process: writing into a file or putting another in its place changes its
    change time or its inode, which no one can set back (on POSIX systems; on Windows it is read every time)."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key in _SAMPLES and os.name != "nt":  # (on Windows st_ctime is the creation time, kept by a rewrite)
        return _SAMPLES[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(SAMPLE_BYTES))
        end = os.fstat(f.fileno()).st_size
        f.seek(max(f.tell(), end - SAMPLE_BYTES))
        digest.update(f.read(SAMPLE_BYTES))
    if len(_SAMPLES) > 256:
        _SAMPLES.clear()
    _SAMPLES[key] = digest.hexdigest()
    return _SAMPLES[key]


def ffmpeg_path(path) -> str:
    """``path`` as FFmpeg must be given it: absolute, since it reads a relative name with a colon in its first part
    ("take2:out.mp4", "12:30.mp4", a Mac's name with a "/" in it) as a protocol and fails ("Protocol not found")."""
    return os.path.abspath(path)


def open_input(source):
    """``source``: a path, bytes (the whole file), or a binary file object (read from its start). A file that
    FFmpeg cannot open is a one-line error."""
    import av

    try:
        if isinstance(source, (str, os.PathLike)):
            return av.open(ffmpeg_path(source))
        if isinstance(source, (bytes, bytearray, memoryview)):
            return av.open(io.BytesIO(source))
        if hasattr(source, "seek"):
            source.seek(0)
        return av.open(source)
    except av.FFmpegError as e:
        raise UserInputError(f"{describe(source)} cannot be read as a video ({reason(e)}); is it a video file, "
                             "and complete?") from None
    except OSError as e:
        raise UserInputError(f"cannot read {describe(source)}: {reason(e)}") from None


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
        kwargs["src_colorspace"] = _MATRICES.get(frame.colorspace, _untagged_matrix(frame.width, frame.height))
        if frame.color_range == 2:
            kwargs["src_color_range"] = "JPEG"
    deep = max(c.bits for c in frame.format.components) > 8
    arr = frame.to_ndarray(format="rgb48le" if deep else "rgb24", **kwargs)
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(65535.0 if deep else 255.0)


def _untagged_matrix(width: int, height: int) -> str:
    """The matrix of a frame whose file names none, by its size as players guess it (mpv, libplacebo): HD sizes
    are BT.709, SD ones BT.601. Width counts too: a widescreen HD encode cropped to 1280x536 or 1920x800 is HD."""
    return "ITU709" if width >= 1280 or height > 576 else "ITU601"


def _frame_orientation(frame, stream) -> Orientation:
    """The display orientation, from the first frame's display-matrix side data (FFmpeg attaches the container's
    matrix to decoded frames), else PyAV's ``frame.rotation``, else an old FFmpeg's ``rotate`` stream tag."""
    import numpy as np

    try:
        for side in frame.side_data:
            if "DISPLAYMATRIX" in str(getattr(side.type, "name", side.type)).upper():
                found = orientation_from_matrix(np.frombuffer(bytes(side), dtype="<i4")[:9].tolist())
                if found is None:
                    log.warning("the input's display matrix is not a turn by a multiple of 90°: shown as stored")
                    return Orientation()
                return found
    except (AttributeError, TypeError, ValueError):
        pass
    degrees = getattr(frame, "rotation", None)
    if degrees is None:
        tag = (stream.metadata or {}).get("rotate")
        try:
            degrees = -float(tag) if tag is not None else None  # the old tag counts clockwise
        except ValueError:
            degrees = None
    if degrees:
        found = orientation_from_degrees(degrees)
        if found is None:
            log.warning("the input is rotated by %s°, not a multiple of 90°: shown as stored", degrees)
        return found or Orientation()
    return Orientation()


def _stream_seconds(container, stream) -> float | None:
    """The video stream's own duration, where the container really gives one. FFmpeg fills a missing stream
    duration with the whole file's, and audio may run longer than the video, so a stream's duration is trusted
    only from MP4/MOV track headers or when the video is the file's only stream; Matroska files carry the
    track's duration as a ``DURATION`` tag (FFmpeg and mkvmerge write it)."""
    metadata = stream.metadata or {}
    formats = set((getattr(container.format, "name", "") or "").split(","))
    only = len(container.streams) == 1
    if stream.duration and stream.time_base and ("mov" in formats or only):
        return float(stream.duration * stream.time_base)
    tag = metadata.get("DURATION") or metadata.get("duration")
    if tag:
        try:
            h, m, s = tag.split(":")
            seconds = int(h) * 3600 + int(m) * 60 + float(s)
        except ValueError:
            seconds = None
        if seconds is not None:
            # FFmpeg's muxer writes the track's end time there (mkvmerge its length): a video that starts late
            # (1 s, or a few ms of AAC priming) lasts that much less
            if (container.metadata or {}).get("ENCODER", "").startswith("Lavf") and stream.start_time:
                seconds -= max(0.0, float(stream.start_time * stream.time_base))
            return seconds
    if container.duration and only:
        seconds = container.duration / 1_000_000
        if "flv" in formats and container.start_time:
            # FLV's header duration is the last frame's end time: B-frames start the video a few frames late
            seconds -= max(0.0, container.start_time / 1_000_000)
        return seconds
    return None


def _header_frames(stream) -> int:
    """The container's own count of video frames: MP4/MOV and AVI indexes, or mkvmerge's NUMBER_OF_FRAMES tag."""
    if stream.frames:
        return int(stream.frames)
    try:
        return int((stream.metadata or {}).get("NUMBER_OF_FRAMES", 0))
    except ValueError:
        return 0


def open_video(source):
    """The container and its first video stream, decoded without frame threading (see the module docstring); a
    one-line error for a file without video."""
    container = open_input(source)
    stream = video_stream(container)
    if stream is None:
        kinds = {}
        for s in container.streams:
            kind = "cover picture" if is_cover(s) else f"{s.type} stream"
            kinds[kind] = kinds.get(kind, 0) + 1
        held = ", ".join(f"{n} {k}{'s' if n > 1 else ''}" for k, n in kinds.items()) or "no streams"
        container.close()
        raise UserInputError(f"{describe(source)} has no video stream (it holds {held})")
    # No frame threading: see the module docstring. Slice threading reports errors as they happen.
    stream.thread_type = "SLICE"
    return container, stream


def is_cover(stream) -> bool:
    """Whether a video stream is a picture attached to the file (an album or poster cover), not video."""
    import av

    flag = getattr(getattr(av.stream, "Disposition", None), "attached_pic", None)
    disposition = getattr(stream, "disposition", None)
    return stream.type == "video" and flag is not None and disposition is not None and bool(disposition & flag)


def video_stream(container):
    """The first video stream that is video (a cover picture is stored as a one-frame video stream, and may come
    first), or None."""
    return next((s for s in container.streams.video if not is_cover(s)), None)


def _origin_us(streams) -> int:
    """Microseconds before the earliest start of ``streams``, when they start after 0: an MPEG transport stream
    (a broadcast or camcorder recording) starts wherever its clock stood, minutes or hours in, and an output that
    kept that would open on as long a stretch of nothing. The gaps between the streams are kept."""
    starts = [Fraction(s.start_time) * s.time_base for s in streams if s.start_time is not None and s.time_base]
    return max(0, math.floor(min(starts) * 1_000_000)) if starts else 0


def probe_video(source) -> VideoInfo:
    """What ``FrameReader`` will deliver: size as displayed, timing, frame count, orientation. The first frame is
    decoded, so an unreadable, audio-only or undecodable input is reported here (one-line errors), before any
    model is loaded."""
    import av

    check_av_version()
    if isinstance(source, (str, os.PathLike)):
        check_input_file(source)
    container, stream = open_video(source)
    try:
        try:
            first = next(iter(container.decode(stream)), None)
        except av.FFmpegError as e:
            raise InputDamagedError(f"{describe(source)} is damaged: its first frame cannot be decoded "
                                    f"({reason(e)})") from None
        if first is None:
            raise InputDamagedError(f"{describe(source)} has no video frames that can be decoded")
        orientation = _frame_orientation(first, stream)
        ctx = stream.codec_context
        rate = stream.average_rate or stream.guessed_rate or Fraction(25)
        header = _header_frames(stream)
        duration = _stream_seconds(container, stream)
        frames = header or (round(duration * rate) if duration else 0)
        # (the container's, where it says one: an MP4's `pasp` box may be all there is, as FFmpeg takes it)
        sar = stream.sample_aspect_ratio or ctx.sample_aspect_ratio
        if sar and orientation.transpose:
            sar = 1 / Fraction(sar)
        stored = (first.width, first.height)
        width, height = orientation.size(*stored)
        return VideoInfo(width, height, Fraction(rate), Fraction(stream.time_base or Fraction(1, 90000)),
                         int(frames), len(container.streams.audio), header, duration, orientation,
                         Fraction(sar) if sar else None, stored, first.pts,
                         _origin_us([stream, *container.streams.audio]), bool(first.interlaced_frame))
    finally:
        container.close()


def warn_if_interlaced(info: VideoInfo, source) -> None:
    """Interlaced video is upscaled as whole frames (the models know no fields): said once per job, since
    moving edges then come out combed, four times larger."""
    if info.interlaced:
        log.warning("%s is interlaced (its frames are flagged as two fields): it is upscaled as whole frames, which "
                    "enlarges any combing on motion; for a clean result deinterlace it first (e.g. ffmpeg -i IN -vf "
                    "bwdif OUT)", describe(source))


class VideoFrames:
    """The decoded frames of ``stream``, as ``container.decode`` gives them, except for a last packet that the
    demuxer marks corrupt (the file ends inside it): that one is not decoded, and ``cut`` says so. A decoder fills
    what is missing from whatever its buffers hold (MJPEG: the frame decoded before it), so that frame would be
    partly garbage, and garbage that depends on where decoding began."""

    def __init__(self, container, stream):
        self.cut = False
        self._frames = self._decode(container.demux(stream))

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._frames)

    def _decode(self, packets):
        held = None
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except BaseException:  # a demuxer error: the packet before it decodes first, as it did unheld
                if held is not None:
                    yield from held.decode()
                raise
            if held is not None:
                if packet.size == 0 and held.size and getattr(held, "is_corrupt", False):
                    self.cut = True  # the flush packet follows: ``held`` was the last with data
                else:
                    yield from held.decode()
            held = packet
        if held is not None:
            yield from held.decode()


def _transparent(frame) -> bool:
    """Whether a frame of a format with alpha has any pixel that is not opaque (FFmpeg decodes every GIF as bgra)."""
    try:
        return bool((frame.to_ndarray(format="rgba")[..., 3] < 255).any())
    except Exception:  # noqa: BLE001 - for a note only: said where it cannot be told
        return True


def cut_inside(source, frame: int) -> str:
    return f"{describe(source)} ends early: it is cut off inside frame {frame}"


# Timestamps that go back by more than this start a new clock (files joined end to end, a recorder's reset); less
# is a damaged file's jitter, nudged forward
JUMP_BACK_SECONDS = 1.0


def jumps_back(source, frame: int, seconds: float) -> str:
    return (f"{describe(source)}'s timestamps jump back by {seconds:.3f} s at frame {frame}, as in files joined end "
            f"to end; one output needs one clock: cut it there and upscale the parts separately, or join the "
            f"original files with ffmpeg's concat demuxer, which runs their clocks on")


class FrameReader:
    """Decodes the first video stream of a file one frame at a time.

    Iterating yields ``(index, frame, pts)``: ``frame`` is (3, h, w) float32 RGB in [0, 1] on the CPU, turned as
    the file asks to be shown, ``pts`` the presentation time in ``info.time_base`` units (made up from the frame
    rate if the file has none, and nudged to stay strictly increasing, which encoders require). Frames before
    ``start`` are decoded but not converted (for resuming), unless ``seeked`` (``range.seek_to``) is a decoder
    already at frame ``start``: then they are not decoded at all.

    Iteration ends at the end of the stream, at a decoder error, where the frame size changes or where the
    timestamps jump back (``JUMP_BACK_SECONDS``); ``problem`` then tells which (None for a complete stream, also
    when the caller stopped early).
    """

    def __init__(self, source, start: int = 0, info: VideoInfo | None = None, seeked=None):
        self.info = info if info is not None else probe_video(source)
        self.source = source
        self.seeked = seeked
        self.container, self.stream = (seeked.container, seeked.stream) if seeked is not None else open_video(source)
        self.start = start
        self.decoded = 0
        self.problem: InputProblem | None = None
        self._end: float | None = None  # seconds from the stream's start to the end of the last frame decoded
        self._latest: tuple[int, float | None] | None = None  # (pts, how long it lasts) of the last frame read

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor | None, int]]:
        import av

        info = self.info
        step = 1 / (info.rate * info.time_base)
        start_pts = self.stream.start_time
        last = None
        previous, durations = None, True  # the last frame's own timestamp; whether to take frame durations
        alpha = None  # whether frames carry an alpha channel: then looked at until one is transparent
        if self.seeked is not None:
            decoder, index = self.seeked.decoder, self.seeked.start
            frames = itertools.chain([self.seeked.first], decoder)
            start_pts = self.seeked.first_pts if start_pts is None else start_pts
            previous, durations = self.seeked.previous_pts, self.seeked.durations
        else:
            decoder = frames = VideoFrames(self.container, self.stream)
            index = 0
        while True:
            try:
                frame = next(frames)
            except StopIteration:
                break
            except (av.FFmpegError, OSError) as e:
                of = f" of the {info.header_frames} its header counts" if info.header_frames > index else ""
                self.problem = InputProblem("damaged", index, f"{describe(self.source)} is damaged or cut off: "
                                            f"decoding stopped at frame {index}{of} ({reason(e)})")
                return
            if (frame.width, frame.height) != info.stored_size:
                self.problem = InputProblem(
                    "size", index, f"{describe(self.source)} changes its frame size at frame {index}, from "
                    f"{info.stored_size[0]}x{info.stored_size[1]} to {frame.width}x{frame.height}; one output video "
                    "has one size: cut the input at the change and upscale the parts separately")
                return
            if frame.pts is not None and previous is not None and \
                    (previous - frame.pts) * info.time_base > JUMP_BACK_SECONDS:
                self.problem = InputProblem("jump", index, jumps_back(
                    self.source, index, float((previous - frame.pts) * info.time_base)))
                return
            if frame.pts is not None:
                if start_pts is None:
                    start_pts = frame.pts
                # Without a duration a frame lasts as long as the one before it did, or a nominal frame at least (an
                # AVI with a millisecond time base claims 1000 frames a second; it gives packet durations only after
                # a seek, which a resumed read must then ignore to end where a read from the beginning ends)
                gap = frame.pts - previous if previous is not None else 0
                length = frame.duration if durations and getattr(frame, "duration", None) else max(step, gap)
                self._end = float((frame.pts - start_pts + length) * info.time_base)
                previous = frame.pts
            pts = frame.pts if frame.pts is not None else round(index * step)
            if last is not None and pts <= last:
                pts = last + 1
            last = pts
            self._latest = (pts, length if frame.pts is not None else None)
            self.decoded = index + 1
            if alpha is None:
                alpha = any(c.is_alpha for c in frame.format.components)
            if alpha and _transparent(frame):  # (an opaque start may turn transparent later: said once, then)
                log.info("%s has transparency (%s, from frame %d): the upscale is of the colours; its alpha channel "
                         "is dropped", describe(self.source), frame.format.name, index)
                alpha = False
            tensor = info.orientation.apply(frame_to_tensor(frame)) if index >= self.start else None
            yield index, tensor, pts
            index += 1
        if decoder.cut:
            self.problem = InputProblem("truncated", index, cut_inside(self.source, index))
        else:
            self.problem = shortfall(self.info, self.decoded, self._end, self.source)

    def duration_of(self, pts: int) -> float | None:
        """How long the frame at ``pts`` lasts (``info.time_base`` units: the file's own duration, else the gap
        from the frame before, a nominal frame at least) if it is the last one read, else None. The output's last
        frame then lasts as long as the input's did (a GIF that holds its last picture, variable frame rates),
        where the writer would give it the average."""
        return self._latest[1] if self._latest is not None and self._latest[0] == pts else None

    def close(self) -> None:
        self.container.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def shortfall(info: VideoInfo, decoded: int, end: float | None, source) -> InputProblem | None:
    """A stream of ``decoded`` frames, the last ending ``end`` seconds after the stream's start, that ended cleanly
    but before its header says it should: a cut-off file. MP4/MOV count their frames; Matroska and others only
    give a duration, so there the last frame may end up to 1.5 frames early (variable frame rates) before it
    counts as cut. A header's count that the frames fall short of is only a cut where they also end early: an AVI
    counts the empty chunks of dropped frames, which decode to nothing, so its frames end on time (its duration,
    where the container gives none, being its count of frame slots)."""
    frame_s = float(1 / info.rate) if info.rate else 0.04
    name = describe(source)
    if info.header_frames and decoded < info.header_frames:
        expected = info.duration if info.duration is not None or not info.rate else info.header_frames * frame_s
        if expected is None or end is None or end < expected - 0.5 * frame_s:
            return InputProblem("truncated", decoded, f"{name} ends early: its header counts "
                                f"{info.header_frames} frames, but the data stops after frame {decoded}")
    elif not info.header_frames and info.duration and end is not None and end < info.duration - 1.5 * frame_s:
        return InputProblem("truncated", decoded, f"{name} ends early: its header says {info.duration:.3f} s "
                            f"(about {round(info.duration * info.rate)} frames), but the data stops after "
                            f"frame {decoded}, at {end:.3f} s")
    return None


def read_frames(source, start: int = 0) -> Iterator[tuple[int, torch.Tensor, int]]:
    """``(index, frame (3, h, w) float32 in [0, 1], pts)`` for each frame, decoding one at a time. A damaged or
    cut-off input raises ``InputDamagedError`` after its last good frame."""
    with FrameReader(source, start=start) as reader:
        for index, frame, pts in reader:
            if index >= start:
                yield index, frame, pts
        if reader.problem is not None:
            raise InputDamagedError(reader.problem.message, frames=reader.decoded)
