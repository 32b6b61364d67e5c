"""Reading a range of frames of a video file without decoding the frames before it.

A frame index lists every frame's presentation timestamp, from the container's packets (demuxed, not decoded:
cheap next to decoding, and kept per file while the file is unchanged). To read frames [start, start + count) the
decoder seeks to the keyframe at or before frame ``start``'s timestamp and decodes from there, dropping the frames
before it. Frame numbers are those of a decode from the beginning (``reader.FrameReader``), also for variable frame
rates, and frames come out turned as the file is meant to be seen (``reader.probe_video``'s orientation, as
``FrameReader`` applies it). A seek is trusted only where decoding starts on a keyframe of the index and gives
exactly the timestamps the index lists from frame ``start`` on; otherwise it is tried again from further back, and
where the timestamps cannot be trusted at all (packets without them, seeks that never land right) the range is read
by decoding from the beginning: slower, same frames.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from fractions import Fraction

import torch

from ..models.shared.errors import InputDamagedError, UserInputError
from .reader import (JUMP_BACK_SECONDS, VideoFrames, check_input_file, content_sample, cut_inside, describe,
                     frame_to_tensor, jumps_back, open_video, probe_video, reason, shortfall, warn_if_interlaced)

log = logging.getLogger(__name__)

_CACHE_SIZE = 16
# Inputs longer than this without timestamps are told that reading late in them costs decoding all before
UNSEEKABLE_WARN_FRAMES = 2000
_cache: OrderedDict = OrderedDict()
_lock = threading.Lock()


@dataclass(frozen=True)
class FrameIndex:
    """pts: every frame's presentation timestamp in ``time_base`` units, in order (None when the file's packets
    carry none: then only sequential reading is possible, and ``count`` comes from decoding the whole file).
    keyframes: the timestamps of the packets the container marks as keyframes (where decoding may start).
    rate: average frame rate. width, height: frame size as displayed. orientation: ``reader.Orientation``."""

    count: int
    pts: tuple[int, ...] | None
    time_base: Fraction
    rate: Fraction
    width: int
    height: int
    orientation: object = None
    keyframes: frozenset = frozenset()
    problem: str | None = None  # the file ends before its header says (``reader.shortfall``): it was cut off
    durations: bool = True  # whether its packets, demuxed from the start, tell how long each frame lasts


def _cache_key(source):
    if isinstance(source, (str, os.PathLike)):
        check_input_file(source)  # (a file gone or unreadable: the reader's one-line error, not os.stat's)
        st = os.stat(source)
        # (the sample: a file copied over it with its size and time kept is another video too)
        return os.path.realpath(source), st.st_size, f"{st.st_mtime_ns}:{content_sample(source)[:16]}"
    return None  # in-memory videos are indexed every time


def video_identity(source) -> tuple[str, str]:
    """What names the video ``source`` while it stays unchanged, and a name to show for it: a file's path, size,
    modification time and a sample of its content (a file replaced or rewritten is another video), or a digest of
    an in-memory video's bytes."""
    key = _cache_key(source)
    if key is not None:
        return "|".join(map(str, key)), os.path.basename(key[0])
    digest = hashlib.blake2b(digest_size=16)
    if isinstance(source, (bytes, bytearray, memoryview)):
        digest.update(source)
    else:
        position = source.tell()
        source.seek(0)
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
        source.seek(position)
    return digest.hexdigest(), "the video"


def frame_index(source) -> FrameIndex:
    """The frame index of the first video stream of ``source`` (a path, bytes or a binary file object)."""
    key = _cache_key(source)
    if key is not None:
        with _lock:
            if key in _cache:
                _cache.move_to_end(key)
                return _cache[key]
    info = probe_video(source)  # also reports an unreadable or damaged file in one line
    warn_if_interlaced(info, source)  # (once per file: the index is kept)
    container, stream = open_video(source)
    try:
        rate = Fraction(stream.average_rate or stream.guessed_rate or 25)
        time_base = Fraction(stream.time_base or Fraction(1, 90000))
        start_time = stream.start_time
        width, height, orientation = info.width, info.height, info.orientation
        stamps, keyframes, trusted, durations, cut, untimed = [], set(), True, False, False, False
        latest = None  # the latest timestamp so far
        for packet in container.demux(stream):
            if packet.size == 0:  # the flush packet at the end
                continue
            if getattr(packet, "is_discard", False):
                continue
            if packet.pts is None:
                trusted, untimed = False, True
                break
            # (the timestamps are sorted below: those after a jump would be numbered among those before it)
            latest = packet.pts if latest is None else max(latest, packet.pts)
            if (latest - packet.pts) * time_base > JUMP_BACK_SECONDS:
                raise UserInputError(jumps_back(source, len(stamps), float((latest - packet.pts) * time_base)))
            stamps.append(int(packet.pts))
            durations = durations or bool(packet.duration)
            cut = bool(getattr(packet, "is_corrupt", False))  # the last packet's says the file ends inside it
            if packet.is_keyframe:
                keyframes.add(int(packet.pts))
        # A decoder that does not reorder gives the frames in file order: where their timestamps do not increase
        # in that order, the frame numbers of a decode from the beginning are not those of the sorted timestamps.
        if trusted and not getattr(stream.codec_context.codec, "reorder", True):
            trusted = all(a < b for a, b in zip(stamps, stamps[1:]))
        if trusted and cut:  # not decoded (``reader.VideoFrames``)
            keyframes.discard(stamps.pop())
    finally:
        container.close()
    if trusted:
        # A file cut after a keyframe (a stream copy, a capture) starts with packets the decoder cannot use and
        # drops: they have no frame, and counting them would shift every later frame number.
        stamps = sorted(s for s in stamps if info.first_pts is None or s >= info.first_pts)
        problem = cut_inside(source, len(stamps)) if cut else None
        if stamps and not cut:
            first = start_time if start_time is not None else stamps[0]
            # the last frame lasting as the reader has it without durations (``FrameReader``)
            gap = (stamps[-1] - stamps[-2]) * time_base if len(stamps) > 1 else 0
            end = float((stamps[-1] - first) * time_base + max(1 / rate, gap))
            found = shortfall(info, len(stamps), end, source)
            problem = found.message if found is not None else None
        index = FrameIndex(len(stamps), tuple(stamps), time_base, rate, width, height, orientation,
                           frozenset(keyframes), problem, durations)
    else:
        index = FrameIndex(_count_by_decoding(source), None, time_base, rate, width, height, orientation)
        if index.count > UNSEEKABLE_WARN_FRAMES and key is not None:  # (once per file: the index is kept)
            why, remedy = (("has no timestamps to seek by", "remuxed with timestamps, it seeks (e.g. `ffmpeg "
                            f"-fflags +genpts -r {float(rate):g} -i IN -c copy OUT.mkv`)") if untimed else
                           ("has timestamps out of order for its decoder", "re-encoded, it seeks (e.g. losslessly: "
                            "`ffmpeg -i IN -c:v ffv1 OUT.mkv`)"))
            log.warning("%s %s (%d frames): reading from frame N decodes every frame before it, so chunks late in it "
                        "take longer and longer, as does resuming there; %s", describe(source), why, index.count,
                        remedy)
    if key is not None:
        with _lock:
            _cache[key] = index
            while len(_cache) > _CACHE_SIZE:
                _cache.popitem(last=False)
    return index


def _count_by_decoding(source) -> int:
    container, stream = open_video(source)
    try:
        return sum(1 for _ in VideoFrames(container, stream))
    finally:
        container.close()


def read_range(source, start: int, count: int, channels_last: bool = False,
               to_end: bool = False) -> torch.Tensor:
    """Frames [start, start + count) of ``source`` as float32 RGB in [0, 1] on the CPU, (n, 3, h, w) or with
    ``channels_last`` (n, h, w, 3), decoded as ``reader.FrameReader`` does. Fewer frames come back where the
    video ends first; with ``to_end`` every frame from ``start`` to the end of the file comes back (for a last
    chunk, in case the index counted fewer frames than the decoder makes)."""
    if start < 0 or count < 1:
        raise UserInputError(f"a frame range needs start >= 0 and count >= 1, got start={start}, count={count}")
    index = frame_index(source)
    if start >= index.count and not to_end:
        return _empty(index, channels_last)
    frames = None
    if index.pts is not None and start < index.count:
        frames = _read_seeking(source, index, start, count, to_end)
    if frames is None:
        frames = _read_sequential(source, index, start, count, to_end)
    out = frames.result()
    if out is None:
        return _empty(index, channels_last)
    return out if channels_last else out.permute(0, 3, 1, 2)


class _Frames:
    """Decoded frames written straight into one (n, h, w, 3) buffer (no second copy of the chunk): sized for
    ``count`` frames, grown only when reading to the end of the file."""

    def __init__(self, count: int, index: FrameIndex | None = None, source=None, start: int = 0):
        self.count, self.n, self.buffer = count, 0, None
        self.orientation = None if index is None else index.orientation
        self.size = None if index is None else (index.height, index.width)  # as displayed, like the frames
        self.source, self.start = source, start

    def __len__(self) -> int:
        return self.n

    def append(self, frame) -> None:
        pixels = frame_to_tensor(frame)
        if self.orientation is not None:
            pixels = self.orientation.apply(pixels)
        pixels = pixels.permute(1, 2, 0)
        if self.size is not None and tuple(pixels.shape[:2]) != self.size:
            (h, w), (new_h, new_w) = self.size, pixels.shape[:2]
            raise UserInputError(f"{describe(self.source)} changes its frame size at frame {self.start + self.n}, "
                                 f"from {w}x{h} to {new_w}x{new_h}; one output video has one size: cut the input "
                                 "at the change and upscale the parts separately")
        if self.buffer is None:
            self.buffer = torch.empty((self.count, *pixels.shape), dtype=pixels.dtype)
        elif self.n == self.buffer.shape[0]:
            self.buffer = torch.cat([self.buffer, torch.empty_like(self.buffer[: max(self.n // 2, 1)])])
        self.buffer[self.n] = pixels
        self.n += 1

    def result(self) -> torch.Tensor | None:
        if self.buffer is None:
            return None
        return self.buffer if self.n == self.buffer.shape[0] else self.buffer[: self.n]


def _empty(index: FrameIndex, channels_last: bool) -> torch.Tensor:
    shape = (0, index.height, index.width, 3) if channels_last else (0, 3, index.height, index.width)
    return torch.empty(shape)


# How far before a frame to seek, in seconds, on each try: MPEG program and transport streams (and some others)
# land on the keyframe after the timestamp asked for, or on a frame labelled with another's timestamp.
_SEEK_BACK = (0, 1, 4, 16)


def _read_seeking(source, index: FrameIndex, start: int, count: int, to_end: bool) -> _Frames | None:
    """The range read from a keyframe before it, or None where no seek could be trusted: decoding must begin at
    a keyframe of the index and give, from frame ``start`` on, exactly the timestamps the index lists."""
    target = index.pts[start]
    expected = index.count - start if to_end else min(count, index.count - start)
    for back in _SEEK_BACK if start > 0 else (0,):
        container, stream = open_video(source)
        frames = _Frames(expected, index, source, start)
        try:
            if start > 0:
                container.seek(max(target - int(back / index.time_base), index.pts[0]), stream=stream,
                               backward=True, any_frame=False)
            first = True
            for frame in VideoFrames(container, stream):
                if frame.pts is None:
                    return None
                if first and index.keyframes and frame.pts not in index.keyframes:
                    break  # not where decoding can start: its frames or their labels cannot be trusted
                first = False
                if not frames and frame.pts < target:
                    continue
                at = start + len(frames)
                if at < index.count and frame.pts != index.pts[at]:
                    break  # a frame out of its place: what follows the seek cannot be trusted
                frames.append(frame)
                if len(frames) == count and not to_end:
                    break
        except UserInputError:
            raise
        except Exception as e:  # a container that cannot seek: fall back to decoding from the start
            log.info("%s: cannot seek (%s); decoding from the start", describe(source), e)
            return None
        finally:
            container.close()
        if len(frames) >= expected:
            return frames
    log.info("%s: seeking to frame %d did not land where the frame index says; decoding from the start",
             describe(source), start)
    return None


@dataclass
class Seeked:
    """A decoder that ``seek_to`` positioned at frame ``start``."""

    container: object
    stream: object
    decoder: VideoFrames  # the frames after ``first``
    first: object  # frame ``start``, decoded
    start: int
    first_pts: int  # the first frame's timestamp: where a decode from the beginning starts the stream's clock
    previous_pts: int  # the timestamp of the frame before frame ``start``
    durations: bool  # whether a decode from the beginning gets frame durations (AVI gives them after a seek only)
    began: int  # the frame (a keyframe) where decoding began


def seek_to(source, start: int) -> Seeked | None:
    """A decoder at frame ``start`` of ``source`` (a resumed job goes on from there), or None where decoding must
    begin at the start of the file. A seek is trusted as ``read_range`` trusts one: decoding begins on a keyframe of
    the index, and every frame from there up to frame ``start`` has the index's timestamp; from a keyframe on, the
    decoder gives the frames that a decode from the beginning gives. Only where the index's timestamps strictly
    increase: a decode from the beginning nudges a repeated one, and each later one after it."""
    try:
        index = frame_index(source)
        pts = index.pts
        if start <= 0 or pts is None or start >= index.count or any(b <= a for a, b in zip(pts, pts[1:])):
            return None
        for back in _SEEK_BACK:
            found = _seek_once(source, index, start, back)
            if found is not None:
                return found
    except Exception as e:  # noqa: BLE001 - the decode from the beginning reports what matters, in its words
        log.info("%s: cannot seek (%s); decoding from the start", describe(source), reason(e))
        return None
    log.info("%s: seeking to frame %d did not land where the frame index says; decoding from the start",
             describe(source), start)
    return None


def _seek_once(source, index: FrameIndex, start: int, back: float) -> Seeked | None:
    pts = index.pts
    target = pts[start]
    container, stream = open_video(source)
    try:
        container.seek(max(target - int(back / index.time_base), pts[0]), stream=stream, backward=True,
                       any_frame=False)
        frames = VideoFrames(container, stream)
        frame = next(frames, None)
        if frame is not None and frame.pts is not None and (not index.keyframes or frame.pts in index.keyframes):
            began = at = bisect.bisect_left(pts, frame.pts)
            while at < start and frame is not None and frame.pts == pts[at]:
                frame, at = next(frames, None), at + 1
            if frame is not None and at == start and frame.pts == target:
                seeked = Seeked(container, stream, frames, frame, start, pts[0], pts[start - 1], index.durations,
                                began)
                container = None  # the caller's now
                return seeked
        return None
    finally:
        if container is not None:
            container.close()


def _read_sequential(source, index: FrameIndex, start: int, count: int, to_end: bool) -> _Frames:
    import av

    container, stream = open_video(source)
    frames = _Frames(max(min(count, index.count - start), 1), index, source, start)
    decoded = 0
    try:
        for frame in VideoFrames(container, stream):
            decoded += 1
            if decoded <= start:
                continue
            frames.append(frame)
            if len(frames) == count and not to_end:
                break
    except (av.FFmpegError, OSError) as e:
        raise InputDamagedError(f"{describe(source)} is damaged: decoding stopped at frame {decoded} ({reason(e)}); "
                                "cut the video before that frame, or repair it (e.g. re-encode it with FFmpeg)",
                                frames=decoded) from None
    finally:
        container.close()
    return frames
