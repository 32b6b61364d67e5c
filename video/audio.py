"""Copying a file's audio and subtitle streams into an output container, interleaved with its video by time, with
the labels of the file and its streams (title, language); saying what else it holds that the output does not keep."""

from __future__ import annotations

import logging
from fractions import Fraction

import io
import math

from ..models.shared.errors import UserInputError
from .reader import JUMP_BACK_SECONDS, open_input, video_stream

log = logging.getLogger(__name__)

# Audio codecs MP4 carries without trouble in every FFmpeg version; others are re-encoded to AAC there. MOV
# (QuickTime) holds uncompressed PCM too, which is what cameras and editors put there.
MP4_AUDIO = {"aac", "mp3", "alac", "ac3", "eac3"}
MOV_AUDIO = MP4_AUDIO | {f"pcm_{kind}" for kind in ("s16le", "s16be", "s24le", "s24be", "s32le", "s32be", "f32le",
                                                   "f32be", "f64le", "f64be", "s8", "u8", "alaw", "mulaw")}


# A re-encoded stream whose timestamps run ahead of its samples by more than this (a capture that lost its sound for
# a while) gets silence for the gap; less is the rounding of the container's clock (Matroska's is in milliseconds).
AUDIO_GAP_SECONDS = 0.05
# The usual channel order for a count, where a source gives only the count (PCM in Matroska does)
_DEFAULT_LAYOUTS = {1: "mono", 2: "stereo", 3: "2.1", 4: "4.0", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}


# A subtitle cue is held back at most this long after its start (see AudioCopy.held): the muxer keeps the last 10 s
# of packets (FFmpeg's max_interleave_delta) to put them in order, and a cue muxed later would be stored after the
# video of its time, which players read (in file order) only once the cue is over.
SUBTITLE_HOLD_SECONDS = 5.0


def _release_seconds(packet) -> float:
    """When a held subtitle packet is muxed: once the video reaches its end, or its start plus the hold."""
    start, duration = Fraction(packet.pts) * packet.time_base, Fraction(packet.duration or 0) * packet.time_base
    return float(start + min(duration, Fraction(SUBTITLE_HOLD_SECONDS)))


def _named_layout(layout):
    """``layout``, or the default one for its channel count where it names no order ("2 channels"): the AAC
    encoder refuses those."""
    if layout.name.endswith(" channels") and layout.nb_channels in _DEFAULT_LAYOUTS:
        return _DEFAULT_LAYOUTS[layout.nb_channels]
    return layout


def _aac_rate(rate: int) -> int:
    """``rate``, or where FFmpeg's AAC encoder cannot take it (it refuses e.g. 192 kHz), the nearest rate above it
    that it takes (the highest, 96 kHz, for higher ones); the encoder resamples."""
    import av

    rates = av.codec.Codec("aac", "w").audio_rates
    if not rates or rate in rates:
        return rate
    above = [r for r in rates if r >= rate]
    return min(above) if above else max(rates)


def _aac_settings(source_codec) -> dict:
    """The AAC encoder's settings for an audio stream to re-encode: its channels (named: the encoder refuses
    unnamed layouts), a rate the encoder takes, AAC's usual 96 kbit/s per channel."""
    return {"rate": _aac_rate(source_codec.sample_rate), "layout": _named_layout(source_codec.layout),
            "bit_rate": 96000 * source_codec.layout.nb_channels}


def _taken_as_is(out_suffix: str) -> set | None:
    """The audio codecs an output of this kind takes as they are, where it is choosier than its muxer (None: any
    codec the muxer holds)."""
    suffix = out_suffix.lower()
    return MOV_AUDIO if suffix == ".mov" else MP4_AUDIO if suffix in (".mp4", ".m4v") else None


def _codec(stream) -> str:
    """The codec of an audio ``stream`` by its own name ("mp3"), as the lists above name it, not by the decoder's
    that reads it ("mp3float")."""
    context = stream.codec_context
    return getattr(context.codec, "canonical_name", None) or context.name


def _soundless(stream) -> bool:
    """An audio stream whose format FFmpeg could not find (0 Hz, 0 channels): a track a broadcast declares and never
    fills, or one that starts too far into the file. No muxer takes it, as it is or re-encoded."""
    context = stream.codec_context
    return context is None or not context.sample_rate or not context.layout.nb_channels


def _audio(container) -> list:
    """The audio streams of ``container`` that an output can take."""
    return [a for a in container.streams.audio if not _soundless(a)]


def check_audio(source, out_suffix: str) -> None:
    """Before any work: each audio stream that an MP4/MOV output needs re-encoded to AAC can be (a one-line error
    that says to write Matroska otherwise). ``source`` as for ``reader.open_input``."""
    import av

    taken = _taken_as_is(out_suffix)
    if taken is None:
        return
    container = open_input(source)
    try:
        for a in _audio(container):
            codec = a.codec_context
            if _codec(a) in taken:
                continue
            settings = _aac_settings(codec)
            encoder = av.CodecContext.create("aac", "w")
            encoder.sample_rate, encoder.layout = settings["rate"], settings["layout"]
            encoder.format, encoder.bit_rate = "fltp", settings["bit_rate"]
            try:
                encoder.open()
            except av.FFmpegError as e:
                raise UserInputError(
                    f"the input's audio stream {a.index} ({_codec(a)}, {codec.layout.nb_channels} channels, "
                    f"{codec.sample_rate} Hz) cannot go into {out_suffix} as it is, and AAC cannot take it ({e}): "
                    "write a Matroska (.mkv) output, which keeps it as it is (the video node writes one with the "
                    "lossless codec)") from None
    finally:
        container.close()


# Tags the muxer writes itself or that describe the input's encoding, not its content; and the picture's turn and
# transparency, which the output's frames (upright, opaque) no longer have
_TECHNICAL_TAGS = {"duration", "encoder", "major_brand", "minor_version", "compatible_brands", "handler_name",
                   "vendor_id", "bps", "number_of_frames", "number_of_bytes", "_statistics_tags",
                   "_statistics_writing_app", "_statistics_writing_date_utc", "rotate", "alpha_mode",
                   "encoder_settings"}


def _labels(metadata) -> dict:
    """The tags of ``metadata`` that say what the content is (title, language, artist, comment, ...)."""
    labels = {k: v for k, v in dict(metadata or {}).items()
              if k.lower() not in _TECHNICAL_TAGS and k.lower().split("-")[0] not in _TECHNICAL_TAGS and v is not None}
    if "name" in labels and "title" not in labels:
        # FFmpeg reads an MP4 track's title as "name", and its MP4 and Matroska muxers write only "title" as one
        labels["title"] = labels.pop("name")
    return labels


_MUXERS = {".mkv": "matroska", ".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".nut": "nut"}


def _carries(out_suffix: str) -> set:
    """The codecs an output of this kind can hold (asked of FFmpeg's muxer, writing nothing)."""
    import av

    fmt = _MUXERS.get(out_suffix.lower())
    if fmt is None:
        return set()
    with av.open(io.BytesIO(), "w", format=fmt) as probe:
        return set(probe.supported_codecs)


def _subtitles(container, carried: set) -> list:
    """The subtitle streams of ``container`` that an output holding ``carried`` codecs takes as they are."""
    return [s for s in container.streams.subtitles if s.codec_context is not None and s.codec_context.name in carried]


def _chapters(container) -> list:
    return container.chapters() if hasattr(container, "chapters") else []  # (PyAV 16 on)


def not_kept(source, out_suffix: str) -> list[str]:
    """One line for each stream of ``source`` that an output of this kind does not carry (it takes the first video
    stream, every audio stream, the subtitles it can hold as they are): a cover picture, data and timecode tracks,
    other video streams, subtitles of a kind it cannot hold."""
    carried = _carries(out_suffix)
    container = open_input(source)
    try:
        video = video_stream(container)
        kept = {s.index for s in _subtitles(container, carried)}
        chapters = bool(_chapters(container))
        lines = []
        for s in container.streams:
            if s is video or (s.type == "audio" and not _soundless(s)) or s.index in kept:
                continue
            codec = None if s.codec_context is None else _codec(s) if s.type == "audio" else s.codec_context.name
            if s.type == "data" and codec is None and chapters:
                continue  # (QuickTime keeps the chapters' names in a text track; the chapters are copied)
            language = dict(s.metadata or {}).get("language")
            what = ", ".join(x for x in (codec, language) if x and x != "und")
            why = "outputs hold the video, its audio and subtitles"
            if s.type == "audio":
                why = ("FFmpeg found no sound in it where it looks to read its format (a track declared and never "
                       "filled, or one that starts late in the file)")
            elif s.type == "subtitle":
                why = f"{out_suffix} cannot hold {codec or 'these'} subtitles" + (
                    "; a .mkv output can" if codec in _carries(".mkv") else "")
            lines.append(f"the input's {s.type} stream {s.index}{f' ({what})' if what else ''} is not copied: {why}")
        return lines
    finally:
        container.close()


class AudioCopy:
    """Copies the audio streams of ``source`` into ``sink``, and the subtitle streams that ``sink`` can hold as they
    are, interleaved with the video by time, and the labels (title, language, ...) of the file, its first video
    stream and the streams copied, to the output's video stream that ``sink`` holds already and the streams added
    here, and the chapters (``origin_us``: where the output's clock starts, ``writer.clock_start``). ``end``: where
    the output ends, in seconds of the input's clock, where that is known before the streams are copied (joining
    the segments of an output cut short): a subtitle then ends there too."""

    def __init__(self, source, sink, out_suffix: str, origin_us: int = 0, end: float | None = None):
        self.origin_us, self.end = origin_us, end
        self.container = open_input(source)
        try:
            sink.metadata.update(_labels(self.container.metadata))
            video = video_stream(self.container)
            if video is not None and sink.streams.video:
                sink.streams.video[0].metadata.update(_labels(video.metadata))
            self._add_streams(sink, out_suffix)
        except BaseException:
            self.container.close()
            raise

    def _add_streams(self, sink, out_suffix: str) -> None:
        subtitles = _subtitles(self.container, set(sink.supported_codecs))
        self.streams = _audio(self.container) + subtitles
        self.sink = sink
        self.map = {}
        taken = _taken_as_is(out_suffix)
        for a in self.streams:
            # Matroska takes nearly any audio; what a container cannot hold at all (ADPCM in Matroska) is
            # re-encoded too, rather than failing once the video is done
            if a.type == "subtitle":
                out = sink.add_stream_from_template(a)
                self.map[a.index] = ("copy", out)
            elif (taken is not None and _codec(a) not in taken) or a.codec_context.name not in sink.supported_codecs:
                log.info("audio stream %d (%s) cannot go into %s as it is: re-encoding to AAC",
                         a.index, _codec(a), out_suffix)
                settings = _aac_settings(a.codec_context)
                if settings["rate"] != a.codec_context.sample_rate:
                    log.info("audio stream %d: AAC does not take %d Hz; resampling to %d Hz", a.index,
                             a.codec_context.sample_rate, settings["rate"])
                out = sink.add_stream("aac", rate=settings["rate"])
                # the source's channels (PyAV's default would be stereo)
                out.layout, out.bit_rate = settings["layout"], settings["bit_rate"]
                self.map[a.index] = ("encode", out)
            else:
                out = sink.add_stream_from_template(a)
                self.map[a.index] = ("copy", out)
            out.metadata.update(_labels(a.metadata))
            try:  # which track plays by default, a commentary, ... (PyAV before 16 takes a plain number)
                out.disposition = int(a.disposition)
            except (AttributeError, TypeError, ValueError):
                pass
        self.packets = self.container.demux(self.streams) if self.streams else iter(())
        self.pending = None
        self.position = "the start"
        self.samples: dict[int, int] = {}  # re-encoded stream -> its next frame's timestamp, in samples
        self.latest: dict[int, float] = {}  # stream -> the latest start of a packet muxed, seconds
        self.ended: set[int] = set()  # streams whose timestamps jumped back: the video stops at such a jump
        # Subtitle packets copied whose cue runs on past the video written so far, in the order read: where the
        # output's end is not known in advance (a run that may be stopped), a cue is muxed once the video has
        # passed its end (or SUBTITLE_HOLD_SECONDS after its start), or cut at the video's end by ``finish`` (it
        # ran on past a stopped run's last frame)
        self.held: list = []

    def _copy_chapters(self, until: float | None) -> None:
        """The input's chapters, moved with the output clock's start (the muxer does not shift them) and, in an
        output cut short at ``until`` seconds, cut there. Set at the end, which both Matroska and MP4 take: only
        then is the end known."""
        chapters = []
        for chapter in _chapters(self.container):
            tb = chapter["time_base"]
            end = chapter["end"] if until is None else min(chapter["end"], math.ceil(Fraction(until) / tb))
            shift = round(Fraction(self.origin_us, 1_000_000) / tb)
            start, end = chapter["start"] - shift, end - shift
            if end > max(start, 0):
                chapters.append({**chapter, "start": max(start, 0), "end": end,
                                 "metadata": _labels(chapter.get("metadata"))})
        if chapters and hasattr(self.sink, "set_chapters"):
            self.sink.set_chapters(chapters)

    def _fit_subtitle(self, packet) -> bool:
        """A subtitle packet made to lie inside the output's time: one that ends before the output's clock starts
        is left out, one that begins before is shortened to begin there (the muxer would move every stream
        instead, to keep timestamps from going below 0), and, where the output's end is known, one that runs past
        it ends there (a player would show the file that much longer). False: leave it out."""
        tb = packet.time_base
        if packet.pts is None or not tb:
            return False
        origin = round(Fraction(self.origin_us, 1_000_000) / tb)
        duration = packet.duration or 0
        if packet.pts < origin:
            if packet.pts + duration <= origin:
                return False
            duration -= origin - packet.pts
            packet.pts = origin
        if self.end is not None and duration:
            end = math.ceil(Fraction(self.end) / tb)
            if packet.pts >= end:
                return False
            duration = min(duration, end - packet.pts)
        packet.duration = duration
        packet.dts = packet.pts  # (a subtitle is shown when it is decoded)
        return True

    def mux_until(self, seconds: float | None) -> None:
        """Mux audio packets that start before ``seconds`` (all of them if None), and the subtitles held whose
        ``_release_seconds`` it has reached."""
        self._mux_packets(seconds)
        kept, waiting = [], set()
        for packet in self.held:
            if packet.stream.index in waiting or (seconds is not None and _release_seconds(packet) > seconds):
                kept.append(packet)
                waiting.add(packet.stream.index)  # (its later cues wait behind it)
            else:
                self.sink.mux(packet)
        self.held = kept

    def _mux_packets(self, seconds: float | None) -> None:
        import av

        while True:
            if self.pending is None:
                try:
                    self.pending = next(self.packets, None)
                except av.FFmpegError as e:
                    # A damaged or cut-off input: its audio ends here. The video side reports the damage; the
                    # audio must not turn it into a crash.
                    log.warning("the input's audio is damaged from %s on (%s): it stops there", self.position, e)
                    self.packets, self.pending = iter(()), None
                if self.pending is None:
                    return
            packet = self.pending
            if packet.dts is None and packet.pts is None:
                self.pending = None
                continue
            start = float((packet.pts if packet.pts is not None else packet.dts) * packet.time_base)
            index = packet.stream.index
            if index not in self.ended and self.latest.get(index, start) - start > JUMP_BACK_SECONDS:
                # files joined end to end: the video reader ends at its own jump (one output, one clock), and
                # what follows here would go back in the output's time, which a muxer refuses
                log.warning("the input's %s stream %d jumps back in time after %.3f s: it ends there",
                            packet.stream.type, index, self.latest[index])
                self.ended.add(index)
            if index in self.ended:
                self.pending = None
                continue
            if seconds is not None and start > seconds:
                return
            self.pending = None
            self.latest[index] = max(self.latest.get(index, start), start)
            self.position = f"{start:.3f} s"
            mode, out = self.map[packet.stream.index]
            if mode == "copy":
                if packet.stream.type == "subtitle" and not self._fit_subtitle(packet):
                    continue
                if packet.dts is None:
                    continue
                packet.stream = out
                if packet.stream.type == "subtitle" and self.end is None and (
                        any(h.stream.index == out.index for h in self.held)
                        or (seconds is not None and _release_seconds(packet) > seconds)):
                    self.held.append(packet)  # (behind those of its stream held before it: their order is kept)
                else:
                    self.sink.mux(packet)
            else:
                try:
                    decoded = packet.decode()
                except av.FFmpegError as e:  # one damaged packet: a moment of silence, not a failed job
                    log.warning("skipped a damaged audio packet at %s (%s)", self.position, e)
                    continue
                for frame in decoded:
                    for part in self._retimed(packet.stream.index, frame):
                        self.sink.mux(out.encode(part))

    def _retimed(self, index: int, frame) -> list:
        """A frame to re-encode with sample-exact timestamps: the stream's first timestamp (so audio that starts
        after the video still does), then the samples before it; the encoder re-chunks them. Where the frame's
        own timestamp lies further ahead (a gap in the source), silence comes first, in frames of at most a
        second: else everything after the gap would play early by its length."""
        import av

        rate = frame.sample_rate
        own = round(frame.pts * frame.time_base * rate) if frame.pts is not None and frame.time_base else None
        if index not in self.samples:
            self.samples[index] = max(own or 0, 0)
        parts = []
        gap = own - self.samples[index] if own is not None else 0
        if gap > AUDIO_GAP_SECONDS * rate:
            for start in range(0, gap, rate):
                silence = av.AudioFrame(format=frame.format.name, layout=frame.layout.name,
                                        samples=min(rate, gap - start))
                for plane in silence.planes:
                    plane.update(bytes(plane.buffer_size))
                silence.sample_rate = rate
                parts.append(silence)
        for part in parts + [frame]:
            part.pts, part.time_base = self.samples[index], Fraction(1, rate)
            self.samples[index] += part.samples
        return parts + [frame]

    def finish(self, until: float | None) -> None:
        """Mux the rest, up to ``until`` seconds (an output cut short) or all of it (None), and flush."""
        try:
            self.mux_until(until)
            if until is not None:
                self.end = until
                for packet in self.held:
                    if self._fit_subtitle(packet):
                        self.sink.mux(packet)
            self.held = []
            self._copy_chapters(until)
            for mode, out in self.map.values():
                if mode == "encode":
                    self.sink.mux(out.encode(None))
        finally:
            self.close()

    def close(self) -> None:
        """Close the source (again: harmless); for an output abandoned before ``finish``."""
        self.container.close()
