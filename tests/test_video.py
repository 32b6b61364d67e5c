"""Streaming video files through the engine: frames, timing, audio, colour, lossless output, scene cuts,
interrupts, resume, flat memory, the ``upscale`` command and the video-file node.

Expected pixels are computed independently: input frames are decoded with PyAV directly and upscaled with
``torch.repeat_interleave`` (or the real engine's ``step``), never with the code under test.
"""

import io
import logging
import shutil
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from streamvsr.models.shared.errors import UserInputError
from streamvsr.models.stream_diffvsr.engine import StreamState, new_state
from streamvsr.video import ResumeFiles, SceneCutDetector, VideoWriter, read_frames, upscale_video
from streamvsr.video.reader import probe_video

av = pytest.importorskip("av")


def _pattern(i, w, h, cut_at=None):
    """Big flat saturated blocks (colour is tested on them) plus a moving bar."""
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2, : w // 2] = (200, 30, 40)
    img[: h // 2, w // 2:] = (30, 180, 60)
    img[h // 2:, : w // 2] = (40, 50, 210)
    img[h // 2:, w // 2:] = (120, 120, 120)
    x = (i * 2) % w
    img[:, x: x + 3] = 250
    if cut_at is not None and i >= cut_at:
        img = 255 - img
    return img


def noise_video(path, n, fmt=None, codec="libx264", options=None, w=64, h=48):
    """``n`` frames of noise (each frame large, so damage or a cut lands mid-file) in any container and codec,
    e.g. with B-frames and a keyframe interval from ``options``."""
    with av.open(str(path), "w", format=fmt) as c:
        v = c.add_stream(codec, rate=24, options=options or {})
        v.width, v.height, v.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            pixels = (np.random.default_rng(i).random((h, w, 3)) * 255).astype(np.uint8)
            for packet in v.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                c.mux(packet)
        for packet in v.encode():
            c.mux(packet)
    return path


def make_clip(path, n=12, w=32, h=24, fps=24, audio="aac", cut_at=None, pts=None, vcodec="libx264"):
    """A small clip: lossless-ish H.264 (yuv444p, CRF 0) or FFV1, optional sine-wave audio (aac or pcm)."""
    c = av.open(str(path), "w")
    if vcodec == "libx264":
        v = c.add_stream("libx264", rate=fps, options={"crf": "0"})
        v.pix_fmt = "yuv444p"
    else:
        v = c.add_stream(vcodec, rate=fps)
        v.pix_fmt = "bgr0"
    v.width, v.height = w, h
    if pts is not None:
        v.codec_context.time_base = Fraction(1, fps)
    a = None
    if audio:
        a = c.add_stream("aac" if audio == "aac" else "pcm_s16le", rate=16000)
        a.layout = "mono"
    for i in range(n):
        frame = av.VideoFrame.from_ndarray(_pattern(i, w, h, cut_at), format="rgb24")
        if pts is not None:
            frame.pts, frame.time_base = pts[i], Fraction(1, fps)
        for p in v.encode(frame):
            c.mux(p)
    if a is not None:
        t = np.arange(int(16000 * n / fps)) / 16000
        wave = 0.3 * np.sin(2 * np.pi * 440 * t)
        fmt = "fltp" if audio == "aac" else "s16"
        samples = wave.astype(np.float32)[None] if audio == "aac" else (wave * 32767).astype(np.int16)[None]
        for k in range(0, samples.shape[1], 1024):
            fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, k:k + 1024]), format=fmt, layout="mono")
            fr.sample_rate = 16000
            fr.pts = k
            for p in a.encode(fr):
                c.mux(p)
        for p in a.encode():
            c.mux(p)
    for p in v.encode():
        c.mux(p)
    c.close()
    return path


class OneToOne:
    """The engine contract (models/contract.py) around a ``step(frame, state) -> (hr, state)``."""

    scale = 4

    def push(self, state, frames, consume=False):
        outs = []
        for frame in frames:
            hr, state = self.step(frame, state)
            outs.append(hr)
        return torch.cat(outs), state

    def flush(self, state, consume=False):
        return torch.empty(0, 3, 1, 1), state

    def reset_temporal(self, state, consume=False):
        return torch.empty(0, 3, 1, 1), replace(state, prev_output=None, prev_upscaled=None)

    def pending(self, state):
        return 0

    def identity(self):
        return "fake"

    def state_from_dict(self, tensors, meta):
        return StreamState.from_dict(tensors, meta)


class FakeEngine(OneToOne):
    """A 4x upscaler with real temporal state: output mixes the nearest upscale with the previous output and a
    draw from the state's generator, so a wrong state (on resume or at a cut) changes the pixels."""

    def __init__(self, fail_at=None):
        self.calls = []          # (frame_index, had_previous_output, generator_state)
        self.fail_at = fail_at

    def new_state(self, seed):
        return new_state(seed)

    def step(self, frame, state):
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise RuntimeError("engine failure")
        self.calls.append((state.frame_index, state.prev_output is not None, state.generator_state.clone()))
        g = torch.Generator()
        g.set_state(state.generator_state)
        noise = torch.rand((), generator=g)
        up = frame[None].repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)
        hr = up if state.prev_output is None else 0.7 * up + 0.3 * state.prev_output
        hr = (hr + 0.1 * (noise - 0.5)).clamp(0, 1)
        return hr, replace(state, frame_index=state.frame_index + 1, generator_state=g.get_state(),
                           prev_output=hr, prev_upscaled=up, lr_size=tuple(frame.shape[-2:]))

    @property
    def first_frames(self):
        return [i for i, (_, had_prev, _) in enumerate(self.calls) if not had_prev]


def expected_frames(engine, clip, seed=42):
    """What upscale_video must write, computed by stepping the engine on frames decoded by PyAV directly."""
    state = engine.new_state(seed)
    out = []
    with av.open(str(clip)) as c:
        for f in c.decode(video=0):
            lr = torch.from_numpy(f.to_ndarray(format="rgb24")).permute(2, 0, 1).float() / 255
            hr, state = engine.step(lr, state)
            out.append((hr[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
    return out


def input_breaks_at(monkeypatch, frame: int) -> None:
    """Every input read from here on breaks at ``frame``, as a decoder error half-way would: the frames before it
    come, then the reader reports the damage."""
    from streamvsr.video import reader

    whole = reader.FrameReader.__iter__

    def broken(self):
        for item in whole(self):
            if item[0] == frame:
                self.problem = reader.InputProblem("damaged", frame, f"the input is damaged: decoding stopped at "
                                                                     f"frame {frame}")
                return
            yield item

    monkeypatch.setattr(reader.FrameReader, "__iter__", broken)


def decode(path):
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def video_times(path):
    with av.open(str(path)) as c:
        return [float(f.pts * f.time_base) for f in c.decode(video=0)]


def audio_info(path):
    with av.open(str(path)) as c:
        if not c.streams.audio:
            return None
        s = c.streams.audio[0]
        samples = sum(f.samples for f in c.decode(audio=0))
        return {"codec": s.codec_context.name, "seconds": samples / s.codec_context.sample_rate,
                "channels": s.codec_context.channels}


def stream_info(path):
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        return {"fps": v.average_rate, "size": (v.codec_context.width, v.codec_context.height),
                "codec": v.codec_context.name, "colorspace": v.codec_context.colorspace}


def test_h264_keeps_frames_size_fps_timestamps_audio_and_colour(tmp_path):
    clip = make_clip(tmp_path / "in.mp4")
    out = tmp_path / "out.mp4"
    summary = upscale_video(FakeEngine(), clip, out)
    assert summary["frames"] == 12 and summary["size"] == (128, 96) and not summary["interrupted"]
    info = stream_info(out)
    assert info["fps"] == 24 and info["size"] == (128, 96) and info["codec"] == "h264"
    assert info["colorspace"] == 1  # tagged BT.709, like the matrix it was encoded with
    assert video_times(out) == pytest.approx(video_times(clip))
    a_in, a_out = audio_info(clip), audio_info(out)
    assert a_out["codec"] == "aac" and a_out["seconds"] == pytest.approx(a_in["seconds"], abs=0.01)
    # colour: H.264 at CRF 16 with 4:2:0 chroma; compare block interiors (away from chroma edges)
    for got, want in zip(decode(out), expected_frames(FakeEngine(), clip)):
        for y, x in ((20, 20), (20, 100), (70, 20), (70, 100)):
            diff = np.abs(got[y - 4:y + 4, x - 4:x + 4].astype(int) - want[y - 4:y + 4, x - 4:x + 4]).mean()
            assert diff < 4, (y, x, diff)


def test_lossless_is_pixel_exact(tmp_path):
    clip = make_clip(tmp_path / "in.mp4", audio=None)
    out = tmp_path / "out.mkv"
    upscale_video(FakeEngine(), clip, out, codec="lossless", seed=3)
    got = decode(out)
    want = expected_frames(FakeEngine(), clip, seed=3)
    assert len(got) == len(want) == 12
    assert all(np.array_equal(g, w) for g, w in zip(got, want))


def test_variable_frame_timing_and_pcm_audio(tmp_path):
    pts = [0, 1, 2, 4, 5, 8, 9, 10]
    clip = make_clip(tmp_path / "in.mkv", n=8, audio="pcm", pts=pts, vcodec="ffv1")
    assert video_times(clip) == pytest.approx([p / 24 for p in pts], abs=1e-3)
    mp4 = tmp_path / "out.mp4"
    upscale_video(FakeEngine(), clip, mp4)
    assert video_times(mp4) == pytest.approx(video_times(clip), abs=1e-3)
    assert audio_info(mp4)["codec"] == "aac"  # PCM cannot go into MP4: re-encoded
    assert audio_info(mp4)["channels"] == audio_info(clip)["channels"] == 1  # not made stereo
    # AAC adds up to two frames (priming + padding, 2 x 1024 samples = 0.128 s at 16 kHz)
    assert audio_info(clip)["seconds"] <= audio_info(mp4)["seconds"] <= audio_info(clip)["seconds"] + 0.13
    mkv = tmp_path / "out.mkv"
    upscale_video(FakeEngine(), clip, mkv, codec="lossless")
    assert audio_info(mkv) == audio_info(clip)  # copied as it is
    assert video_times(mkv) == pytest.approx(video_times(clip), abs=1e-3)


@pytest.mark.parametrize("suffix, codec", [(".mp4", "h264"), (".mov", "h264"), (".mkv", "h264"), (".mkv", "lossless")])
def test_a_variable_rate_output_lasts_as_long_as_its_frames(tmp_path, suffix, codec):
    """MP4 and MOV state a track's length from its decoding times, which B-frames delay by the first gaps: a
    clip ending on a long still (a screen recording) was stated 0.54 s long with frames until 0.83 s, and
    players that trust the length stop early. The length is the last frame's time plus one frame at the nominal
    rate, whatever the container."""
    pts = [0, 1, 2, 5, 6, 10, 11, 20]
    clip = make_clip(tmp_path / "in.mkv", n=8, audio=None, pts=pts, vcodec="ffv1")
    out = tmp_path / f"out{suffix}"
    upscale_video(FakeEngine(), clip, out, codec=codec)
    assert video_times(out) == pytest.approx([p / 24 for p in pts], abs=1e-3)
    with av.open(str(out)) as c:
        v = c.streams.video[0]
        assert c.duration / 1e6 == pytest.approx(21 / 24, abs=2e-3)
        if v.duration is not None:
            assert float(v.duration * v.time_base) == pytest.approx(21 / 24, abs=2e-3)
    # at a constant rate nothing changes: as long as its frames, no longer
    clip = make_clip(tmp_path / "cfr.mkv", n=8, audio=None, vcodec="ffv1")
    upscale_video(FakeEngine(), clip, out, codec=codec, overwrite=True)
    with av.open(str(out)) as c:
        assert c.duration / 1e6 == pytest.approx(8 / 24, abs=2e-3)


def clip_with_tone(path, frames, acodec, samples, start=0, vcodec="ffv1", rate=16000):
    """``frames`` video frames (24 fps, 32x24) and a mono 440 Hz tone of ``samples`` samples at ``rate`` in
    ``acodec`` that starts ``start`` samples after the video."""
    c = av.open(str(path), "w")
    v = c.add_stream(vcodec, rate=24)
    v.width, v.height, v.pix_fmt = 32, 24, "bgr0" if vcodec == "ffv1" else "yuv420p"
    a = c.add_stream(acodec, rate=rate)
    a.layout = "mono"
    for i in range(frames):
        for p in v.encode(av.VideoFrame.from_ndarray(_pattern(i, 32, 24, None), format="rgb24")):
            c.mux(p)
    wave = (0.3 * np.sin(2 * np.pi * 440 * np.arange(samples) / rate) * 32767).astype(np.int16)[None]
    for k in range(0, samples, 1024):
        fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave[:, k:k + 1024]), format="s16", layout="mono")
        fr.sample_rate, fr.pts, fr.time_base = rate, start + k, Fraction(1, rate)
        for p in a.encode(fr):
            c.mux(p)
    for p in list(a.encode()) + list(v.encode()):
        c.mux(p)
    c.close()
    return path


def test_re_encoded_audio_keeps_its_start(tmp_path):
    """Audio that starts half a second after the video still does once re-encoded (PCM cannot go into MP4)."""
    clip = clip_with_tone(tmp_path / "late.mkv", 24, "pcm_s16le", 8000, start=8000)

    def audio_start(path):  # presentation time of the first decoded sample
        with av.open(str(path)) as f:
            frame = next(f.decode(audio=0))
            return float(frame.pts * frame.time_base)

    assert audio_start(clip) == pytest.approx(0.5, abs=1e-3)
    out = tmp_path / "out.mp4"
    upscale_video(FakeEngine(), clip, out)
    assert audio_info(out)["codec"] == "aac"
    # AAC's priming (1024 samples = 64 ms here) may show before the start, as the encoder's delay
    assert audio_start(out) == pytest.approx(0.5, abs=0.07)


def test_re_encoded_audio_keeps_a_gap_in_its_place(tmp_path):
    """A source whose sound stops for a while (a capture that dropped it: no packets from 0.5 to 1 s) keeps the
    gap once re-encoded: counted by samples alone, everything after it played half a second early."""
    rate = 16000
    path = tmp_path / "gap.mkv"
    with av.open(str(path), "w") as c:
        v = c.add_stream("ffv1", rate=24)
        v.width, v.height, v.pix_fmt = 32, 24, "bgr0"
        a = c.add_stream("pcm_s16le", rate=rate)
        a.layout = "mono"
        for i in range(36):
            for p in v.encode(av.VideoFrame.from_ndarray(_pattern(i, 32, 24), format="rgb24")):
                c.mux(p)
        tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(1024) / rate) * 32767).astype(np.int16)[None]
        for k in [*range(0, rate // 2, 1024), *range(rate, 3 * rate // 2, 1024)]:
            fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(tone), format="s16", layout="mono")
            fr.sample_rate, fr.pts, fr.time_base = rate, k, Fraction(1, rate)
            for p in a.encode(fr):
                c.mux(p)
        for p in list(a.encode()) + list(v.encode()):
            c.mux(p)

    out = tmp_path / "out.mp4"
    upscale_video(FakeEngine(), path, out)
    assert audio_info(out)["codec"] == "aac"
    with av.open(str(out)) as f:
        frames = [(float(fr.pts * fr.time_base), np.abs(fr.to_ndarray()).max()) for fr in f.decode(audio=0)]
    loud = [t for t, peak in frames if peak > 0.05]
    quiet = [t for t, peak in frames if peak <= 0.05 and 0.55 < t < 0.95]
    # AAC frames of 1024 samples (64 ms here): the tone ends near 0.5 s and comes back near 1 s
    assert quiet and max(t for t in loud if t < 0.8) <= 0.5 and min(t for t in loud if t > 0.6) >= 0.9
    assert max(loud) == pytest.approx(1.5 - 1024 / rate, abs=0.07)


def recording_clip(path, start=600.0, n=12, fps=24, audio_lead=0.25):
    """An MPEG transport stream as a recorder writes one: its clock stands at ``start`` s when it begins, the
    audio ``audio_lead`` s before the video."""
    c = av.open(str(path), "w", format="mpegts")
    v = c.add_stream("libx264", rate=fps, options={"crf": "0", "bframes": "0"})
    v.width, v.height, v.pix_fmt = 32, 24, "yuv444p"
    v.codec_context.time_base = Fraction(1, fps)
    a = c.add_stream("mp2", rate=16000)
    a.layout = "mono"
    t = np.arange(int(16000 * (n / fps + audio_lead))) / 16000
    samples = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)[None]
    for k in range(0, samples.shape[1] - 1152, 1152):
        fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, k:k + 1152]), format="s16", layout="mono")
        fr.sample_rate, fr.pts = 16000, round((start - audio_lead) * 16000) + k
        for p in a.encode(fr):
            c.mux(p)
    for i in range(n):
        frame = av.VideoFrame.from_ndarray(_pattern(i, 32, 24, None), format="rgb24")
        frame.pts, frame.time_base = round(start * fps) + i, Fraction(1, fps)
        for p in v.encode(frame):
            c.mux(p)
    for stream in (v, a):
        for p in stream.encode():
            c.mux(p)
    c.close()
    return path


@pytest.mark.parametrize("suffix,resume", [(".mp4", False), (".mkv", False), (".mkv", True)])
def test_a_recording_whose_clock_starts_late_starts_at_zero_keeping_the_audio_lead(tmp_path, suffix, resume):
    """A transport stream starts wherever the recorder's clock stood (here 600 s): kept as it was, the output
    opened on ten minutes of nothing. It starts at 0, the audio still a quarter second before the video."""
    def starts(path):  # (container's duration; first video frame's and first audio frame's times)
        with av.open(str(path)) as c:
            duration = c.duration / 1e6
            video = next(c.decode(video=0))
        with av.open(str(path)) as c:
            audio = next(c.decode(audio=0))
        return duration, float(video.pts * video.time_base), float(audio.pts * audio.time_base)

    clip = recording_clip(tmp_path / "rec.ts")
    duration, video, audio = starts(clip)
    assert video == pytest.approx(600, abs=0.01) and audio == pytest.approx(599.75, abs=0.05)  # (the encoder's delay)
    out = tmp_path / f"out{suffix}"
    if resume:  # joined from segments, which keep the input's clock
        polls = []
        upscale_video(FakeEngine(), clip, out, resume=True, checkpoint_frames=4,
                      should_stop=lambda: polls.append(1) or len(polls) > 6)
        assert not out.exists()
    upscale_video(FakeEngine(), clip, out, resume=resume)
    out_duration, out_video, out_audio = starts(out)
    assert out_duration == pytest.approx(duration, abs=0.05) and out_duration < 1
    assert out_audio == pytest.approx(0, abs=0.002) and out_video == pytest.approx(video - audio, abs=0.002)
    assert len(decode(out)) == 12


def labelled_clip(path, n=6, pix_fmt="yuv420p", color=None, subtitles=True, start=0, cues=None):
    """A Matroska file as a film comes: a title, two chapters, two audio tracks with languages and titles (the
    second not the default), French subtitles; ``color``: the video's colour tags; ``start``: the second its clock
    starts at; ``cues``: the subtitles' (from, to) seconds (default: the first 0.2 s)."""
    c = av.open(str(path), "w")
    c.metadata["title"] = "My movie"
    c.set_chapters([{"id": i + 1, "start": 1000 * start + a, "end": 1000 * start + b,
                     "time_base": Fraction(1, 1000), "metadata": {"title": title}}
                    for i, (a, b, title) in enumerate(((0, 100, "Intro"), (100, 250, "Main")))])
    v = c.add_stream("libx264", rate=24, options={"crf": "0"})
    v.width, v.height, v.pix_fmt = 32, 24, pix_fmt
    v.codec_context.time_base = Fraction(1, 24)
    for name, value in (color or {}).items():
        setattr(v.codec_context, name, value)
    tracks = []
    for language, title in (("eng", "English"), ("ger", "Deutsch commentary")):
        a = c.add_stream("aac", rate=16000)
        a.layout = "mono"
        a.metadata.update(language=language, title=title)
        tracks.append(a)
    tracks[0].disposition, tracks[1].disposition = 1, 0  # (1: the track played by default)
    sub = None
    if subtitles:
        srt = path.with_suffix(".srt")
        def stamp(t):
            ms = round(t * 1000)
            return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"

        srt.write_text("\n".join(f"{i + 1}\n{stamp(a)} --> {stamp(b)}\nBonjour\n"
                                 for i, (a, b) in enumerate(cues or [(start, start + 0.2)])))
        srt_in = av.open(str(srt))
        sub = c.add_stream_from_template(srt_in.streams[0])
        sub.metadata["language"] = "fre"
    for i in range(n):
        frame = av.VideoFrame.from_ndarray(_pattern(i, 32, 24, None), format="rgb24").reformat(format=pix_fmt)
        frame.pts, frame.time_base = 24 * start + i, Fraction(1, 24)
        for p in v.encode(frame):
            c.mux(p)
    for p in v.encode():
        c.mux(p)
    for a in tracks:
        wave = (0.3 * np.sin(np.arange(16000 * n // 24) / 5)).astype(np.float32)[None]
        for k in range(0, wave.shape[1], 1024):
            fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave[:, k:k + 1024]), format="fltp", layout="mono")
            fr.sample_rate, fr.pts = 16000, 16000 * start + k
            for p in a.encode(fr):
                c.mux(p)
        for p in a.encode():
            c.mux(p)
    if sub is not None:
        for p in srt_in.demux():
            if p.dts is not None:
                p.stream = sub
                c.mux(p)
        srt_in.close()
    c.close()
    return path


@pytest.mark.parametrize("suffix,resume,start", [(".mkv", False, 0), (".mp4", False, 0), (".mkv", True, 0),
                                                 (".mkv", False, 600)])
def test_the_labels_of_a_film_and_its_tracks_are_kept_and_its_subtitles_where_the_output_holds_them(tmp_path, suffix,
                                                                                                  resume, start,
                                                                                                  caplog):
    """Dubbed tracks without their languages and titles cannot be told apart, and subtitles that vanish without a
    word are easy to miss: Matroska holds them as they are, MP4 not (a warning says so)."""
    clip = labelled_clip(tmp_path / "film.mkv", start=start)  # (600: chapters move with the clock's start)
    out = tmp_path / f"out{suffix}"
    with caplog.at_level(logging.WARNING):
        if resume:  # (joined from segments: the audio and subtitles are added then)
            polls = []
            upscale_video(FakeEngine(), clip, out, resume=True, checkpoint_frames=2,
                          should_stop=lambda: polls.append(1) or len(polls) > 3)
        upscale_video(FakeEngine(), clip, out, resume=resume)
    with av.open(str(out)) as c:
        assert c.metadata.get("title") == "My movie"
        assert [s.metadata.get("language") for s in c.streams.audio] == ["eng", "ger"]
        if suffix == ".mkv":
            assert [s.metadata.get("title") for s in c.streams.audio] == ["English", "Deutsch commentary"]
        assert [bool(s.disposition & 1) for s in c.streams.audio] == [True, False]  # (1: default)
        subtitles = [s.metadata.get("language") for s in c.streams.subtitles]
        chapters = [(ch["metadata"].get("title"), float(ch["start"] * ch["time_base"]),
                     float(ch["end"] * ch["time_base"])) for ch in c.chapters()]
    assert chapters == [("Intro", 0.0, 0.1), ("Main", 0.1, 0.25)]
    if suffix == ".mkv":  # Matroska holds SubRip as it is
        assert subtitles == ["fre"] and "not copied" not in caplog.text
        with av.open(str(out)) as c:
            cue = next(p for p in c.demux(c.streams.subtitles[0]) if p.size)
        assert bytes(cue).decode().strip() == "Bonjour" and float(cue.pts * cue.time_base) == pytest.approx(0)
    else:
        assert subtitles == []
        assert ("the input's subtitle stream 3 (srt, fre) is not copied: .mp4 cannot hold srt subtitles; a .mkv "
                "output can") in caplog.text
        # QuickTime keeps the chapters' names in a text track, which reads as a data stream: the chapters are
        # copied, so it is not one to warn about
        from streamvsr.video.audio import not_kept

        assert not_kept(out, ".mkv") == []


def test_subtitles_from_before_the_output_clocks_start_are_cut_to_it_not_moving_the_rest(tmp_path):
    """A broadcast's subtitles may begin before its first picture: left as they were, their timestamps went below
    0 and the muxer moved every stream 2 s later (the chapters not)."""
    clip = labelled_clip(tmp_path / "rec.mkv", start=600, cues=[(598.0, 599.5), (599.8, 600.2)])
    out = tmp_path / "out.mkv"
    upscale_video(FakeEngine(), clip, out)
    with av.open(str(out)) as c:
        video = next(c.decode(video=0))
        cues = [(float(p.pts * p.time_base), float(p.duration * p.time_base))
                for p in c.demux(c.streams.subtitles[0]) if p.size]
        chapters = [float(ch["start"] * ch["time_base"]) for ch in c.chapters()]
    assert float(video.pts * video.time_base) == pytest.approx(0, abs=0.002)
    assert cues == [(0.0, pytest.approx(0.2, abs=0.002))]  # the first left out, the second from 600.0 s on
    assert chapters == [0.0, 0.1]


@pytest.mark.parametrize("suffix", [".mkv", ".mp4"])
def test_the_track_titles_of_an_mp4_input_are_kept(tmp_path, suffix):
    """FFmpeg reads an MP4 track's title as the tag "name", which no muxer writes back as a title."""
    clip = labelled_clip(tmp_path / "film.mp4", subtitles=False)
    with av.open(str(clip)) as c:  # (what the reader hands over)
        assert [s.metadata.get("name") for s in c.streams.audio] == ["English", "Deutsch commentary"]
    out = tmp_path / f"out{suffix}"
    upscale_video(FakeEngine(), clip, out)
    with av.open(str(out)) as c:
        titles = [s.metadata.get("title" if suffix == ".mkv" else "name") for s in c.streams.audio]
    assert titles == ["English", "Deutsch commentary"]


def _stopped_after(clip, frames: int):
    """The partial file of a run of ``clip`` stopped after ``frames`` frames, and how many frames it holds."""
    from streamvsr.video.outputs import partial_path

    out = clip.with_name("out.mkv")
    polls = []
    upscale_video(FakeEngine(), clip, out, should_stop=lambda: polls.append(1) or len(polls) > frames)
    with av.open(str(partial_path(out))) as c:
        return partial_path(out), sum(1 for _ in c.decode(video=0))


def test_an_output_cut_short_has_the_chapters_of_what_it_holds(tmp_path):
    """Chapters are set once the end is known: a run stopped after two frames keeps its frames as a partial file,
    whose chapters end with them (they ran to the input's end before)."""
    partial, frames = _stopped_after(labelled_clip(tmp_path / "film.mkv", subtitles=False), 2)
    with av.open(str(partial)) as c:
        chapters = [(ch["metadata"].get("title"), float(ch["start"] * ch["time_base"]),
                     float(ch["end"] * ch["time_base"])) for ch in c.chapters()]
    assert frames == 2 and chapters == [("Intro", 0.0, pytest.approx(2 / 24, abs=1e-3))]


def test_a_resumed_output_cut_short_ends_its_last_subtitle_with_it(tmp_path, monkeypatch):
    """Joining the segments of an input that broke (accepted): a cue running past the last frame ends with it (it
    ran on, and players showed the file as long as the cue)."""
    clip = labelled_clip(tmp_path / "film.mkv", n=24, cues=[(0.1, 0.9)])
    input_breaks_at(monkeypatch, 6)
    out = tmp_path / "out.mkv"
    assert upscale_video(FakeEngine(), clip, out, resume=True, allow_truncated=True)["frames"] == 6
    with av.open(str(out)) as c:
        cues = [(float(p.pts * p.time_base), float((p.pts + p.duration) * p.time_base))
                for p in c.demux(c.streams.subtitles[0]) if p.size]
        duration = c.duration / 1e6
    assert cues == [(pytest.approx(0.1), pytest.approx(0.25, abs=0.002))] and duration < 0.5  # (was 0.9)


def test_a_stopped_run_ends_its_last_subtitle_with_its_last_frame(tmp_path):
    """A run stopped (no resume) keeps its frames as a partial file: a cue begun before the stop ran on to its own
    end (players showed the file as long as the cue); the cues before it are as they were."""
    partial, frames = _stopped_after(labelled_clip(tmp_path / "film.mkv", n=24, cues=[(0.0, 0.05), (0.1, 0.9)]), 5)
    with av.open(str(partial)) as c:
        cues = [(float(p.pts * p.time_base), float((p.pts + p.duration) * p.time_base))
                for p in c.demux(c.streams.subtitles[0]) if p.size]
        duration = c.duration / 1e6
    assert frames == 5
    assert cues == [(0.0, pytest.approx(0.05)), (pytest.approx(0.1), pytest.approx(5 / 24, abs=0.002))], cues
    assert duration < 0.5  # (was 0.9)


def test_subtitles_are_interleaved_with_the_video_by_their_start(tmp_path):
    """Players read a file in order: a long cue stored after the video of its end (held back to learn whether the
    run would stop before it ended) would reach them when it was over, and never be shown."""
    clip = labelled_clip(tmp_path / "film.mkv", n=24 * 14, cues=[(0.1, 13.0)])
    out = tmp_path / "out.mkv"
    upscale_video(FakeEngine(), clip, out)
    with av.open(str(out)) as c:
        order = [(p.stream.type, float(p.pts * p.time_base)) for p in c.demux(c.streams.video[0],
                                                                              c.streams.subtitles[0])
                 if p.size and p.pts is not None]
    cue = next(i for i, (kind, _) in enumerate(order) if kind == "subtitle")
    assert order[cue][1] == pytest.approx(0.1)
    assert max(t for kind, t in order[:cue] if kind == "video") <= 0.1 + 0.1, order[cue - 3:cue + 1]


def test_only_labels_of_the_content_are_copied():
    """Not what describes the input's encoding (its statistics, encoder) nor the picture's turn or transparency: an
    old file's "rotate" tag on the upright output would have players turn it a second time."""
    from streamvsr.video.audio import _labels

    tags = {"language": "eng", "title": "Main", "DURATION-eng": "00:00:01.000", "ENCODER": "Lavf", "rotate": "90",
            "alpha_mode": "1", "_STATISTICS_TAGS": "BPS", "timecode": "01:00:00:00", "creation_time": "2020-01-01"}
    assert _labels(tags) == {"language": "eng", "title": "Main", "timecode": "01:00:00:00",
                             "creation_time": "2020-01-01"}


def test_hdr_and_deep_input_are_said_and_the_lossless_output_keeps_the_colour_tags(tmp_path, caplog):
    """The output is 8-bit and not tone-mapped: said. Its RGB values mean what the input's did (BT.2020, PQ), and
    the lossless output now says so too (it was left untagged, shown as BT.709)."""
    clip = labelled_clip(tmp_path / "hdr.mkv", pix_fmt="yuv420p10le", subtitles=False,
                         color={"color_primaries": 9, "color_trc": 16, "colorspace": 9})
    out = tmp_path / "out.mkv"
    with caplog.at_level(logging.WARNING):
        upscale_video(FakeEngine(), clip, out, codec="lossless")
    assert "the input is HDR (PQ)" in caplog.text and "the input has 10 bits per sample" in caplog.text
    with av.open(str(out)) as c:
        ctx = c.streams.video[0].codec_context
        assert (ctx.color_primaries, ctx.color_trc) == (9, 16)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        upscale_video(FakeEngine(), make_clip(tmp_path / "sdr.mp4", n=3, audio=None), tmp_path / "sdr.mkv")
    assert "HDR" not in caplog.text and "bits per sample" not in caplog.text and "not copied" not in caplog.text


def test_audio_the_container_cannot_hold_is_re_encoded(tmp_path):
    """ADPCM (QuickTime) cannot go into Matroska at all: re-encoded to AAC, with and without resume (where the
    audio joins at the end, after every frame is done)."""
    clip = clip_with_tone(tmp_path / "in.mov", 6, "adpcm_ima_qt", 4000, vcodec="libx264")
    assert audio_info(clip)["codec"] == "adpcm_ima_qt"
    for resume in (False, True):
        out = tmp_path / f"out{resume}.mkv"
        assert upscale_video(FakeEngine(), clip, out, codec="lossless", resume=resume)["frames"] == 6
        got = audio_info(out)
        assert got["codec"] == "aac" and got["channels"] == 1
        assert audio_info(clip)["seconds"] <= got["seconds"] <= audio_info(clip)["seconds"] + 0.13


@pytest.mark.parametrize("acodec, suffix", [("libmp3lame", ".mp4"), ("libmp3lame", ".mkv"), ("pcm_s24le", ".mov"),
                                            ("pcm_s16be", ".mov")])
def test_audio_an_output_holds_is_copied_as_it_is(tmp_path, acodec, suffix):
    """MP3 (read by FFmpeg's "mp3float" decoder, whose name no list of codecs holds) and PCM in a QuickTime .mov
    are copied bit for bit, not re-encoded to AAC (a lossy copy of a lossy or lossless original)."""
    if acodec not in av.codecs_available:
        pytest.skip(f"this FFmpeg has no {acodec} encoder")
    clip = clip_with_tone(tmp_path / "in.mkv", 6, acodec, 12000, rate=48000)
    for resume in (False, True):
        out = tmp_path / f"out{resume}{suffix}"
        assert upscale_video(FakeEngine(), clip, out, codec="h264", resume=resume)["frames"] == 6
        with av.open(str(clip)) as src, av.open(str(out)) as got:
            assert got.streams.audio[0].codec_context.codec.canonical_name == acodec.replace("libmp3lame", "mp3")
            want = [bytes(p) for p in src.demux(src.streams.audio[0]) if p.size]
            assert [bytes(p) for p in got.demux(got.streams.audio[0]) if p.size] == want


def test_an_audio_track_without_sound_is_left_out_with_a_line(tmp_path, caplog):
    """A broadcast recording may declare an audio track it never fills (no packets: FFmpeg finds no format, 0 Hz,
    0 channels). Copied, it made the muxer fail once every frame was done ("Invalid argument"; with resume, at
    every try to join); it is left out and said so, the real audio is kept."""
    clip = tmp_path / "in.ts"
    with av.open(str(clip), "w", format="mpegts") as c:
        v = c.add_stream("libx264", rate=24)
        v.width, v.height, v.pix_fmt = 32, 24, "yuv420p"
        sound = c.add_stream("ac3", rate=48000)
        sound.layout = "stereo"
        c.add_stream("mp2", rate=48000).layout = "stereo"  # declared, never filled
        for i in range(6):
            for p in v.encode(av.VideoFrame.from_ndarray(_pattern(i, 32, 24, None), format="rgb24")):
                c.mux(p)
        tone = av.AudioFrame.from_ndarray(np.zeros((2, 6000), np.float32), format="fltp", layout="stereo")
        tone.sample_rate, tone.pts = 48000, 0
        for p in list(sound.encode(tone)) + list(sound.encode()) + list(v.encode()):
            c.mux(p)
    with av.open(str(clip)) as c:
        assert [a.codec_context.sample_rate for a in c.streams.audio] == [48000, 0]
    for suffix, resume in ((".mkv", False), (".mkv", True), (".mp4", False), (".mp4", True)):
        caplog.clear()
        out = tmp_path / f"out{resume}{suffix}"
        with caplog.at_level(logging.WARNING):
            assert upscale_video(FakeEngine(), clip, out, codec="h264", resume=resume)["frames"] == 6
        with av.open(str(out)) as got:
            assert [a.codec_context.codec.canonical_name for a in got.streams.audio] == ["ac3"]
        assert "the input's audio stream 2 (mp3) is not copied: FFmpeg found no sound in it" in caplog.text


def test_audio_at_a_rate_aac_does_not_take_is_resampled(tmp_path):
    """FFmpeg's AAC encoder stops at 96 kHz: 192 kHz PCM going into MP4 is resampled, not a failed job."""
    clip = clip_with_tone(tmp_path / "in.mkv", 6, "pcm_s16le", 48000, rate=192000)
    for resume in (False, True):
        out = tmp_path / f"out{resume}.mp4"
        assert upscale_video(FakeEngine(), clip, out, resume=resume)["frames"] == 6
        with av.open(str(out)) as f:
            assert f.streams.audio[0].codec_context.sample_rate == 96000
        got = audio_info(out)
        assert got["codec"] == "aac" and got["channels"] == 1
        assert audio_info(clip)["seconds"] <= got["seconds"] <= audio_info(clip)["seconds"] + 0.03


def clip_with_16_channels(path):
    """3 FFV1 frames (32x24) and 16 channels of PCM silence, which MP4 cannot hold and AAC cannot take."""
    c = av.open(str(path), "w")
    v = c.add_stream("ffv1", rate=24)
    v.width, v.height, v.pix_fmt = 32, 24, "bgr0"
    a = c.add_stream("pcm_s16le", rate=48000)
    a.layout = "hexadecagonal"
    for i in range(3):
        for p in v.encode(av.VideoFrame.from_ndarray(_pattern(i, 32, 24, None), format="rgb24")):
            c.mux(p)
    tone = av.AudioFrame.from_ndarray(np.zeros((1, 16 * 6000), np.int16), format="s16", layout="hexadecagonal")
    tone.sample_rate, tone.pts = 48000, 0
    for p in list(a.encode(tone)) + list(a.encode()) + list(v.encode()):
        c.mux(p)
    c.close()
    return path


def test_audio_that_aac_cannot_take_is_refused_before_any_work_where_it_must_be_re_encoded(tmp_path):
    """16 unnamed PCM channels cannot go into MP4 as they are and FFmpeg's AAC encoder refuses them: found before
    the first frame (not after the work, which would be lost); Matroska keeps them as they are."""
    clip = clip_with_16_channels(tmp_path / "in.mkv")
    engine = FakeEngine()
    with pytest.raises(UserInputError, match="audio stream 1 .*16 channels.* write a Matroska"):
        upscale_video(engine, clip, tmp_path / "out.mp4")
    assert engine.calls == [] and sorted(p.name for p in tmp_path.iterdir()) == ["in.mkv"]
    upscale_video(engine, clip, tmp_path / "out.mkv", codec="lossless")
    assert audio_info(tmp_path / "out.mkv")["channels"] == 16


def test_transparency_is_dropped_with_a_word(tmp_path, caplog):
    clip = tmp_path / "alpha.mov"
    c = av.open(str(clip), "w")
    v = c.add_stream("png", rate=24)
    v.width, v.height, v.pix_fmt = 32, 24, "rgba"
    rgba = np.dstack([_pattern(0, 32, 24, None), np.full((24, 32), 128, np.uint8)])
    for p in list(v.encode(av.VideoFrame.from_ndarray(rgba, format="rgba"))) + list(v.encode()):
        c.mux(p)
    c.close()
    with caplog.at_level("INFO"):
        (_, frame, _), = read_frames(clip)
    assert "alpha channel is dropped" in caplog.text
    assert np.array_equal((frame.permute(1, 2, 0) * 255).round().byte().numpy(), rgba[..., :3])


def test_odd_sizes(tmp_path):
    clip = make_clip(tmp_path / "in.mp4", n=3, w=33, h=25, audio=None)
    out = tmp_path / "out.mp4"
    assert upscale_video(FakeEngine(), clip, out)["size"] == (132, 100)
    assert stream_info(out)["size"] == (132, 100)
    # an engine that makes odd sides (FlashVSR at scale 3): the summary gives the size the file has
    class Times3(FakeEngine):
        scale = 3

        def step(self, frame, state):
            hr, state = super().step(frame, state)
            return torch.nn.functional.interpolate(frame[None], scale_factor=3, mode="nearest"), state

    assert upscale_video(Times3(), clip, tmp_path / "x3.mp4")["size"] == stream_info(tmp_path / "x3.mp4")["size"] \
        == (100, 76)
    assert upscale_video(Times3(), clip, tmp_path / "x3.mkv", codec="lossless")["size"] == (99, 75)
    # the writer on its own pads odd frames by one replicated row/column for 4:2:0
    w = VideoWriter(tmp_path / "odd.mp4", 33, 25, Fraction(24), Fraction(1, 24))
    w.write(np.full((25, 33, 3), 90, np.uint8), 0)
    w.close()
    assert stream_info(tmp_path / "odd.mp4")["size"] == (34, 26)


def test_reader_yields_frames_one_by_one(tmp_path):
    clip = make_clip(tmp_path / "in.mp4", n=5, audio=None)
    frames = read_frames(clip)
    index, frame, pts = next(frames)
    assert index == 0 and frame.shape == (3, 24, 32) and frame.dtype == torch.float32
    raw = decode(clip)
    assert np.array_equal((frame.permute(1, 2, 0) * 255).round().byte().numpy(), raw[0])
    assert [i for i, _, _ in frames] == [1, 2, 3, 4]
    assert [i for i, _, _ in read_frames(clip, start=3)] == [3, 4]


def test_in_memory_input(tmp_path):
    clip = make_clip(tmp_path / "in.mp4", n=4)
    out = tmp_path / "out.mp4"
    upscale_video(FakeEngine(), io.BytesIO(clip.read_bytes()), out)  # what ComfyUI's VIDEO may hand over
    assert len(decode(out)) == 4 and audio_info(out)["seconds"] > 0


def test_scene_cut_resets_temporal_state_but_not_the_noise(tmp_path):
    clip = make_clip(tmp_path / "in.mp4", n=10, audio=None, cut_at=6)
    engine, plain = FakeEngine(), FakeEngine()
    summary = upscale_video(engine, clip, tmp_path / "out.mp4", scene_cut_threshold=0.3)
    upscale_video(plain, clip, tmp_path / "out2.mp4")
    assert summary["scene_cuts"] == 1
    assert engine.first_frames == [0, 6] and plain.first_frames == [0]
    # the generator continues through the cut: frame 6 gets the same noise draw either way
    assert all(torch.equal(a[2], b[2]) for a, b in zip(engine.calls, plain.calls))
    assert [c[0] for c in engine.calls] == list(range(10))


def test_scene_cut_metric():
    det = SceneCutDetector(0.3)
    a = torch.full((3, 90, 160), 0.2)
    assert det(a) is False
    assert det(a + 0.29) is False           # a uniform change of 0.29 is below 0.3
    b = a + 0.29
    b[:, :, :80] += 0.58                    # half the picture changes by 0.58: mean |diff| = 0.29
    assert det(b) is False
    c = b.clone()
    c[:, :, 80:] += 0.62                    # now the mean difference to b is 0.31
    assert det(c) is True
    assert det(torch.rand(3, 40, 40)) is False  # another shape: no comparison, no cut
    with pytest.raises(ValueError):
        SceneCutDetector(1.5)


def test_stop_leaves_a_playable_shorter_file(tmp_path):
    clip = make_clip(tmp_path / "in.mp4", n=12)
    out = tmp_path / "out.mp4"
    polls = []
    summary = upscale_video(FakeEngine(), clip, out, should_stop=lambda: polls.append(1) or len(polls) > 5)
    assert summary["interrupted"] and summary["frames"] == 5
    partial = tmp_path / "out.streamvsr-partial.mp4"  # never under the output's own name: it is not complete
    assert summary["path"] == str(partial) and not out.exists()
    assert len(decode(partial)) == 5
    assert audio_info(partial)["seconds"] == pytest.approx(5 / 24, abs=0.07)  # audio cut with the video


def test_interrupt_exception_is_reraised_after_closing_the_file(tmp_path):
    clip = make_clip(tmp_path / "in.mp4", n=12)
    out = tmp_path / "out.mp4"
    polls = []

    def stop():
        polls.append(1)
        if len(polls) > 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        upscale_video(FakeEngine(), clip, out, should_stop=stop)
    assert len(decode(tmp_path / "out.streamvsr-partial.mp4")) == 5 and not out.exists()


def test_engine_error_keeps_what_was_written(tmp_path):
    clip = make_clip(tmp_path / "in.mp4", n=12, audio=None)
    out = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError, match="engine failure"):
        upscale_video(FakeEngine(fail_at=4), clip, out)
    assert len(decode(tmp_path / "out.streamvsr-partial.mp4")) == 4 and not out.exists()


def test_resume_after_stop_equals_uninterrupted(tmp_path):
    clip = make_clip(tmp_path / "in.mp4", n=12)
    whole = tmp_path / "whole.mkv"
    upscale_video(FakeEngine(), clip, whole, codec="lossless", seed=5)

    out = tmp_path / "out.mkv"
    polls = []
    first = upscale_video(FakeEngine(), clip, out, codec="lossless", seed=5, resume=True, checkpoint_frames=4,
                          should_stop=lambda: polls.append(1) or len(polls) > 7)
    assert first["interrupted"] and first["frames"] == 7 and not out.exists()
    assert (tmp_path / "out.mkv.streamvsr-resume.safetensors").exists()
    engine = FakeEngine()
    second = upscale_video(engine, clip, out, codec="lossless", seed=5, resume=True, checkpoint_frames=4)
    assert second["resumed_from"] == 7 and second["processed"] == 5 and second["frames"] == 12
    assert [c[0] for c in engine.calls] == list(range(7, 12))
    got, want = decode(out), decode(whole)
    assert len(got) == 12 and all(np.array_equal(g, w) for g, w in zip(got, want))
    assert video_times(out) == pytest.approx(video_times(whole))
    assert audio_info(out) == audio_info(whole)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "out.mkv", "whole.mkv"]


def test_resume_after_crash_redoes_only_since_the_last_checkpoint(tmp_path):
    clip = make_clip(tmp_path / "in.mp4", n=12, audio=None, cut_at=5)
    whole = tmp_path / "whole.mkv"
    upscale_video(FakeEngine(), clip, whole, codec="lossless", scene_cut_threshold=0.3)
    out = tmp_path / "out.mkv"
    with pytest.raises(RuntimeError):
        upscale_video(FakeEngine(fail_at=10), clip, out, codec="lossless", scene_cut_threshold=0.3, resume=True,
                      checkpoint_frames=4)
    engine = FakeEngine()
    summary = upscale_video(engine, clip, out, codec="lossless", scene_cut_threshold=0.3, resume=True,
                            checkpoint_frames=4)
    assert summary["resumed_from"] == 8 and summary["scene_cuts"] == 1
    got, want = decode(out), decode(whole)
    assert len(got) == 12 and all(np.array_equal(g, w) for g, w in zip(got, want))


def test_resume_h264_segments_join_into_one_timeline(tmp_path):
    clip = make_clip(tmp_path / "in.mp4", n=12)
    out = tmp_path / "out.mp4"
    polls = []
    upscale_video(FakeEngine(), clip, out, resume=True, checkpoint_frames=3,
                  should_stop=lambda: polls.append(1) or len(polls) > 5)
    upscale_video(FakeEngine(), clip, out, resume=True, checkpoint_frames=3)
    assert video_times(out) == pytest.approx(video_times(clip))
    assert stream_info(out)["size"] == (128, 96)
    assert audio_info(out)["seconds"] == pytest.approx(audio_info(clip)["seconds"], abs=0.01)
    want = expected_frames(FakeEngine(), clip)
    assert all(np.abs(g.astype(int) - w).mean() < 3 for g, w in zip(decode(out), want))


@pytest.mark.parametrize("n,every,name", [(7, 7, "out.mp4"), (14, 7, "out.mkv"), (12, 5, "out.mkv")])
def test_resumed_outputs_have_every_frame_and_the_input_frame_rate(tmp_path, n, every, name):
    # FFmpeg's NUT demuxer gives no decode times to the packets of a segment of exactly 7 H.264 frames; a join
    # that skipped them lost those frames, and Matroska took its frame rate from the segments' time base
    clip = make_clip(tmp_path / "in.mp4", n=n)
    whole, out = tmp_path / ("whole" + name[3:]), tmp_path / name
    upscale_video(FakeEngine(), clip, whole)
    summary = upscale_video(FakeEngine(), clip, out, resume=True, checkpoint_frames=every)
    assert summary["frames"] == n and len(decode(out)) == n
    assert video_times(out) == pytest.approx(video_times(whole))
    assert stream_info(out)["fps"] == stream_info(whole)["fps"] == 24
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in.mp4", whole.name, name])


def test_a_long_input_without_timestamps_is_said_to_cost_decoding_from_its_start(tmp_path, caplog, monkeypatch):
    """Chunks of a raw H.264 stream each decode the file from its start (chunk k costs k chunks): over a
    video of thousands of frames that made later queue runs ever slower without a word. Said once per file, with
    the remedy; not for a file with timestamps, nor for a short one."""
    import streamvsr.video.range as video_range

    monkeypatch.setattr(video_range, "UNSEEKABLE_WARN_FRAMES", 5)
    raw = noise_video(tmp_path / "in.h264", 10, fmt="h264", w=32, h=24)
    short = noise_video(tmp_path / "short.h264", 4, fmt="h264", w=32, h=24)
    timed = noise_video(tmp_path / "in.mkv", 10, w=32, h=24)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            assert len(video_range.read_range(raw, 6, 2)) == 2
        video_range.read_range(short, 2, 2)
        video_range.read_range(timed, 6, 2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    rate = float(video_range.frame_index(raw).rate)
    assert warnings == [f"{raw} has no timestamps to seek by (10 frames): reading from frame N decodes every frame "
                        "before it, so chunks late in it take longer and longer, as does resuming there; remuxed "
                        f"with timestamps, it seeks (e.g. `ffmpeg -fflags +genpts -r {rate:g} -i IN -c copy "
                        "OUT.mkv`)"]


def test_a_pyav_too_old_is_said_before_any_work(tmp_path, monkeypatch, caplog):
    """Before PyAV 18.1 a BT.2020 input failed to convert, a track's default flag was dropped without a word and
    some timestamps differed; requirements.txt asks for 18.1, but an environment may hold an older one."""
    import av

    from streamvsr.cli import main

    clip = make_clip(tmp_path / "in.mp4", n=2, audio=None)
    monkeypatch.setattr(av, "__version__", "17.1.0")
    with pytest.raises(UserInputError, match=r'^video needs PyAV 18.1 or newer, and 17.1.0 is installed: pip install '
                                             r'-U "av>=18.1"'):
        probe_video(clip)
    assert main(["upscale", str(clip), str(tmp_path / "out.mp4"), "--model", str(tmp_path / "none")]) == 2
    assert "error: video needs PyAV 18.1 or newer" in caplog.text and not (tmp_path / "out.mp4").exists()
    # on Python 3.10, where PyAV 18.1 has no release, upgrading PyAV is not the way
    import types

    import streamvsr.video.reader as reader

    monkeypatch.setattr(reader, "sys", types.SimpleNamespace(version_info=(3, 10, 12)))
    with pytest.raises(UserInputError, match=r"installed: PyAV 18.1 needs Python 3.11 or newer, and this is Python "
                                             r"3.10: use a Python 3.11\+ environment"):
        probe_video(clip)
    monkeypatch.setattr(av, "__version__", "18.1.0")
    assert probe_video(clip).frames == 2


def test_decoding_back_to_where_a_job_stopped_is_not_counted_as_work_between_checkpoints(tmp_path, monkeypatch):
    """An input without timestamps is decoded from its start on resume: that time counted towards the next
    checkpoint, so the first frame done made one (a segment, and a keyframe, of a single frame)."""
    import types

    import streamvsr.video.resume as resume

    clip = noise_video(tmp_path / "in.h264", 10, fmt="h264", w=32, h=24)
    out = tmp_path / "out.mkv"
    polls = []
    upscale_video(FakeEngine(), clip, out, codec="lossless", resume=True, checkpoint_frames=2,
                  should_stop=lambda: polls.append(1) or len(polls) > 7)
    now, saved = [0.0], []
    monkeypatch.setattr(resume, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    save = ResumeFiles.save
    monkeypatch.setattr(ResumeFiles, "save", lambda self, state, info, thumb: saved.append(info["consumed"]) or
                        save(self, state, info, thumb))

    def poll():  # before each frame, those decoded back to frame 7 too: 100 s each
        now[0] += 100.0

    summary = upscale_video(FakeEngine(), clip, out, codec="lossless", resume=True, checkpoint_seconds=150.0,
                            should_stop=poll)
    assert summary["resumed_from"] == 7 and summary["frames"] == 10
    assert saved == [10, 10]  # after frame 9 (200 s of work since frame 7), and the end; not after frame 7


def test_a_stop_while_a_resumed_job_decodes_its_way_back_is_heard_and_loses_nothing(tmp_path, caplog):
    # A raw H.264 stream has no timestamps to seek by: a resume decodes its way back from the first frame.
    caplog.set_level(logging.INFO)
    clip = noise_video(tmp_path / "in.h264", 10, fmt="h264", w=32, h=24)
    out = tmp_path / "out.mkv"
    polls = []
    upscale_video(FakeEngine(), clip, out, codec="lossless", resume=True, checkpoint_frames=2,
                  should_stop=lambda: polls.append(1) or len(polls) > 7)
    polls.clear()
    engine = FakeEngine()
    stopped = upscale_video(engine, clip, out, codec="lossless", resume=True, checkpoint_frames=2,
                            should_stop=lambda: polls.append(1) or len(polls) > 3)
    assert stopped["interrupted"] and engine.calls == [] and len(polls) == 4  # (not after the 7 frames done)
    assert "it is decoded up to frame 7 first" in caplog.text
    summary = upscale_video(FakeEngine(), clip, out, codec="lossless", resume=True, checkpoint_frames=2)
    assert summary["resumed_from"] == 7 and summary["frames"] == 10
    whole = tmp_path / "whole.mkv"
    upscale_video(FakeEngine(), clip, whole, codec="lossless")
    assert all(np.array_equal(g, w) for g, w in zip(decode(out), decode(whole))) and len(decode(out)) == 10


def test_resume_takes_the_default_crf_spelled_out_as_the_same_job(tmp_path):
    clip = make_clip(tmp_path / "in.mp4", n=6, audio=None)
    out = tmp_path / "out.mp4"
    polls = []
    upscale_video(FakeEngine(), clip, out, resume=True, checkpoint_frames=2,
                  should_stop=lambda: polls.append(1) or len(polls) > 3)
    with pytest.raises(ValueError, match="crf the default then, 20 now"):
        upscale_video(FakeEngine(), clip, out, resume=True, crf=20)
    summary = upscale_video(FakeEngine(), clip, out, resume=True, crf=16)  # the default, said
    assert summary["resumed_from"] == 3 and len(decode(out)) == 6


def test_an_anamorphic_input_keeps_its_display_aspect_in_h264_and_the_lossless_output_says_how(tmp_path, caplog):
    """DVD and DV sources store wide pictures in narrow pixels (sample aspect 4:3 here): H.264 output carries
    it (players show 16:9); the lossless .mkv cannot with PyAV, which is said with the command that fixes it."""
    clip = tmp_path / "dvd.mp4"
    with av.open(str(clip), "w") as c:
        v = c.add_stream("libx264", rate=24)
        v.width, v.height, v.pix_fmt = 16, 12, "yuv420p"
        v.codec_context.sample_aspect_ratio = Fraction(4, 3)
        for i in range(3):
            frame = av.VideoFrame.from_ndarray(np.full((12, 16, 3), 40 * i, np.uint8), format="rgb24")
            frame.pts = i
            for packet in v.encode(frame):
                c.mux(packet)
        for packet in v.encode():
            c.mux(packet)
    for name, resume in (("out.mp4", False), ("resumed.mp4", True)):
        upscale_video(FakeEngine(), clip, tmp_path / name, resume=resume, checkpoint_frames=1)
        with av.open(str(tmp_path / name)) as c:
            assert c.streams.video[0].sample_aspect_ratio == Fraction(4, 3)
    assert "not square" not in caplog.text
    upscale_video(FakeEngine(), clip, tmp_path / "out.mkv", codec="lossless")
    assert "pixels are not square (sample aspect 4/3): the lossless out.mkv will not say so, and players show it " \
           "64x48 instead of 85x48" in caplog.text
    assert f'mkvpropedit "{tmp_path / "out.mkv"}" --edit track:v1 --set display-width=85 --set display-height=48' \
        in caplog.text


def test_resume_refuses_other_settings(tmp_path):
    clip = make_clip(tmp_path / "in.mp4", n=6, audio=None)
    out = tmp_path / "out.mkv"
    polls = []
    upscale_video(FakeEngine(), clip, out, codec="lossless", resume=True,
                  should_stop=lambda: polls.append(1) or len(polls) > 2)
    with pytest.raises(ValueError, match="seed 42 then, 7 now.*add --overwrite to discard it"):
        upscale_video(FakeEngine(), clip, out, codec="lossless", resume=True, seed=7)


def test_resume_tells_the_input_by_its_content_not_its_path(tmp_path):
    """Another video of the same size in the input's place is refused (only its path and size were compared, and
    the output mixed two videos); the same file moved to another folder continues (it was refused, and the only
    way offered, --overwrite, threw the work away)."""
    folder = tmp_path / "project"
    folder.mkdir()
    clip = make_clip(folder / "in.mkv", n=6, audio=None, vcodec="ffv1")
    other = make_clip(tmp_path / "other.mkv", n=6, audio=None, vcodec="ffv1", cut_at=3)
    assert other.stat().st_size == clip.stat().st_size and other.read_bytes() != clip.read_bytes()
    upscale_video(FakeEngine(), clip, tmp_path / "whole.mkv", codec="lossless")
    out = tmp_path / "out.mkv"
    polls = []
    upscale_video(FakeEngine(), clip, out, codec="lossless", resume=True, checkpoint_frames=1,
                  should_stop=lambda: polls.append(1) or len(polls) > 3)
    kept = clip.read_bytes()
    clip.write_bytes(other.read_bytes())
    with pytest.raises(ValueError, match="other settings \\(the input is another file of the same size\\)"):
        upscale_video(FakeEngine(), clip, out, codec="lossless", resume=True)
    clip.write_bytes(kept)
    moved = tmp_path / "renamed"
    folder.rename(moved)
    engine = FakeEngine()
    summary = upscale_video(engine, moved / "in.mkv", out, codec="lossless", resume=True)
    assert summary["resumed_from"] == 3 and [c[0] for c in engine.calls] == [3, 4, 5]
    assert all(np.array_equal(a, b) for a, b in zip(decode(out), decode(tmp_path / "whole.mkv")))


@pytest.mark.parametrize("resume", [False, True])
def test_names_with_a_colon_are_files_not_protocols(tmp_path, monkeypatch, resume):
    """FFmpeg read a relative name with a colon ("take2:out.mp4", a time of day, a Mac's name with a "/") as a
    protocol: the input was "not a video" and an output failed after all the work was done."""
    monkeypatch.chdir(tmp_path)
    make_clip(tmp_path / "v1:clip.mkv", n=4, audio="pcm", vcodec="ffv1")
    if resume:
        polls = []
        upscale_video(FakeEngine(), Path("v1:clip.mkv"), Path("take2:out.mkv"), codec="lossless", resume=True,
                      checkpoint_frames=1, should_stop=lambda: polls.append(1) or len(polls) > 2)
    summary = upscale_video(FakeEngine(), Path("v1:clip.mkv"), Path("take2:out.mkv"), codec="lossless",
                            resume=resume)
    assert summary["frames"] == 4 and summary["resumed_from"] == (2 if resume else 0)
    assert len(decode(tmp_path / "take2:out.mkv")) == 4 and audio_info(tmp_path / "take2:out.mkv") is not None


def _peak_rss(frames, work, leak=""):
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "tests" / "video_memory_worker.py"), str(root), str(frames),
                          str(work)] + ([leak] if leak else []), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


def test_memory_does_not_grow_with_length(tmp_path):
    """Peak process RSS (torch allocations included) for 40 and 240 frames of 256x256 output, each run in a fresh
    process; a driver that keeps every output frame (the control) grows by ~150 MB and must be caught."""
    short, long = _peak_rss(40, tmp_path), _peak_rss(240, tmp_path)
    assert long < short * 1.05 + (20 << 20), (short, long)
    leaky = _peak_rss(240, tmp_path, leak="leak")
    assert leaky > short * 1.05 + (20 << 20), (short, leaky)  # the check above can fail


def test_rejects_wrong_container_and_same_file(tmp_path):
    clip = make_clip(tmp_path / "in.mp4", n=2, audio=None)
    with pytest.raises(ValueError, match="mkv"):
        upscale_video(FakeEngine(), clip, tmp_path / "out.mp4", codec="lossless")
    with pytest.raises(ValueError, match="input"):
        upscale_video(FakeEngine(), clip, clip)


# ------------------------------------------------------------------------------ real engine, CLI and node


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("diffusers")
    pytest.importorskip("torchvision")
    from helpers import make_tiny_checkpoint, make_tiny_raft

    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_checkpoint(root / "ckpt"), make_tiny_raft(root / "raft_small.pth")


def test_real_engine_lossless_matches_engine_steps(tiny, tmp_path):
    from streamvsr.models.stream_diffvsr.engine import StreamEngine
    from streamvsr.models.raft.weights import load_raft
    from streamvsr.models.stream_diffvsr.loader import load_pipeline

    ckpt, raft = tiny
    engine = StreamEngine(load_pipeline(ckpt), load_raft(raft, num_flow_updates=2), steps=1)
    clip = make_clip(tmp_path / "in.mp4", n=2, w=16, h=12, audio=None)
    decoded_inputs = [torch.from_numpy(f).permute(2, 0, 1).float() / 255 for f in decode(clip)]
    seen = []

    class Recording(OneToOne):  # what the engine was given and returned, for an exact comparison with the file
        def new_state(self, seed):
            return engine.new_state(seed)

        def step(self, frame, state):
            hr, state = engine.step(frame, state)
            seen.append((frame.clone(), (hr[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()))
            return hr, state

    upscale_video(Recording(), clip, tmp_path / "out.mkv", seed=9, codec="lossless")
    got = decode(tmp_path / "out.mkv")
    assert len(got) == len(seen) == 2
    for (frame, want), lr, g in zip(seen, decoded_inputs, got):
        assert torch.equal(frame, lr) and np.array_equal(g, want)


def test_resume_refuses_another_model_precision_or_flow(tiny, tmp_path):
    from streamvsr.models.stream_diffvsr.engine import StreamEngine
    from streamvsr.models.raft.weights import load_raft
    from streamvsr.models.stream_diffvsr.loader import load_pipeline

    ckpt, raft = tiny
    pipe, flow = load_pipeline(ckpt), load_raft(raft, num_flow_updates=1)
    clip = make_clip(tmp_path / "in.mp4", n=3, w=16, h=12, audio=None)
    out = tmp_path / "out.mkv"
    polls = []
    upscale_video(StreamEngine(pipe, flow, steps=1), clip, out, codec="lossless", resume=True,
                  should_stop=lambda: polls.append(1) or len(polls) > 1)
    assert ResumeFiles(out).state.exists()
    with pytest.raises(ValueError, match="\\(precision fp32 then, bf16 now\\).*add --overwrite"):
        upscale_video(StreamEngine(pipe, flow, steps=1, compute_dtype=torch.bfloat16), clip, out,
                      codec="lossless", resume=True)
    other = load_pipeline(ckpt)
    with torch.no_grad():
        next(other.parameters()).add_(0.01)
    with pytest.raises(ValueError, match="\\(another model\\)"):
        upscale_video(StreamEngine(other, flow, steps=1), clip, out, codec="lossless", resume=True)
    with pytest.raises(ValueError, match="\\(steps 1 then, 2 now\\)"):
        upscale_video(StreamEngine(pipe, flow, steps=2), clip, out, codec="lossless", resume=True)
    # The flow guides every frame after the first: another flow model, flow resolution or update count splices two
    # renderings as surely as another model.
    other_flow = load_raft(raft, num_flow_updates=1)
    with torch.no_grad():
        next(other_flow.parameters()).add_(0.01)
    for changed, said in ((other_flow, "other flow weights"),
                          (load_raft(raft, num_flow_updates=1, downscale=2), "flow downscale 1 then, 2 now"),
                          (load_raft(raft, num_flow_updates=2), "flow iterations 1 then, 2 now")):
        with pytest.raises(ValueError, match=f"\\({said}\\)"):
            upscale_video(StreamEngine(pipe, changed, steps=1), clip, out, codec="lossless", resume=True)
    # the correlation mode gives the same flow (up to rounding) and is the advice for running out of memory
    same_flow = load_raft(raft, num_flow_updates=1, corr="on_demand")
    summary = upscale_video(StreamEngine(pipe, same_flow, steps=1), clip, out, codec="lossless", resume=True)
    assert summary["resumed_from"] == 1 and summary["frames"] == 3


def test_cli_upscale_with_download(tiny, tmp_path, monkeypatch):
    """`streamvsr upscale IN OUT --download`: weights come from $STREAMVSR_MODELS (downloads stubbed)."""
    import streamvsr.models.raft.weights as flow
    import streamvsr.models.stream_diffvsr.hub as hub
    from streamvsr.cli import main

    ckpt, raft = tiny
    calls = []

    def fake_model_download(dest):
        calls.append(("model", dest))
        shutil.copytree(ckpt, dest, dirs_exist_ok=True)
        return dest

    def fake_raft_download(name, dest):
        calls.append((name, dest))
        return raft

    monkeypatch.setattr(hub, "download_stream_diffvsr", fake_model_download)
    monkeypatch.setattr(flow, "download_raft", fake_raft_download)
    monkeypatch.setenv("STREAMVSR_MODELS", str(tmp_path / "models"))
    clip = make_clip(tmp_path / "in.mp4", n=2, w=16, h=12)
    out = tmp_path / "out.mp4"
    assert main(["upscale", str(clip), str(out), "--download", "--steps", "1", "--device", "cpu",
                 "--seed", "1"]) == 0
    assert calls == [("model", tmp_path / "models" / "Stream-DiffVSR"), ("raft_large", tmp_path / "models" / "raft")]
    assert len(decode(out)) == 2 and stream_info(out)["size"] == (64, 48)
    assert audio_info(out)["seconds"] > 0
    assert main(["upscale", str(clip), str(tmp_path / "x.mp4"), "--model", str(ckpt)]) == 2  # no --flow


def test_ctrl_c_stops_gracefully_then_hard():
    from streamvsr.cli.commands import _GracefulStop

    stop = _GracefulStop()
    assert stop() is False
    stop._handle(2, None)
    assert stop() is True
    with pytest.raises(KeyboardInterrupt):
        stop._handle(2, None)


def test_video_node_streams_to_the_output_folder(tiny, tmp_path, monkeypatch):
    import asyncio

    import fake_comfy

    ckpt, raft = tiny
    models = tmp_path / "models"
    shutil.copytree(ckpt, models / "streamvsr" / "tiny")
    (models / "streamvsr" / "raft").mkdir(parents=True)
    shutil.copy(raft, models / "streamvsr" / "raft" / raft.name)
    mm = fake_comfy.install(monkeypatch, models)
    import streamvsr

    nodes = {n.define_schema().node_id: n
             for n in asyncio.run(asyncio.run(streamvsr.comfy_entrypoint()).get_node_list())}
    (model,) = nodes["StreamVSRLoadModel"].execute(model="tiny", precision="auto").values
    (flow_model,) = nodes["StreamVSRLoadFlowModel"].execute(model=raft.name, correlation="auto", resolution="full",
                                                             iterations=2).values
    clip = make_clip(tmp_path / "in.mp4", n=2, w=16, h=12)

    class Video:  # core VideoFromFile, reduced to what the node uses
        def get_dimensions(self):
            return 16, 12

        def get_stream_source(self):
            return io.BytesIO(clip.read_bytes())

    node = nodes["StreamVSRVideoUpscale"]
    schema = node.define_schema()
    assert {i.id for i in schema.inputs} >= {"model", "flow_model", "video", "seed", "steps", "codec",
                                             "scene_cut_threshold", "filename_prefix", "resume"}
    out = node.execute(model=model, flow_model=flow_model, video=Video(), seed=1, steps=1, codec="lossless",
                       scene_cut_threshold=0.0, filename_prefix="streamvsr/test", resume=False)
    kind, path = out.values[0]
    assert kind == "VideoFromFile" and path.endswith(".mkv")
    assert len(decode(path)) == 2 and audio_info(path)["seconds"] > 0
    assert out.ui["images"][0]["filename"] == path.rsplit("/", 1)[-1]
    assert mm.calls["interrupt_checks"] >= 2 and mm.calls["load_models_gpu"]


def _remux(src, dst, sample_aspect_ratio=None):
    """``src``'s video stream alone in a new file, the container told ``sample_aspect_ratio`` (the codec not)."""
    with av.open(str(src)) as c:
        out = av.open(str(dst), "w")
        stream = out.add_stream_from_template(c.streams.video[0])
        if sample_aspect_ratio:
            stream.codec_context.sample_aspect_ratio = sample_aspect_ratio
        for packet in c.demux(c.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
        out.close()
    return dst


def test_pixels_not_square_by_the_containers_word_alone_are_kept(tmp_path):
    """An MP4 whose `pasp` box says 32:27 over H.264 that says nothing (MP4Box -par, DVD rips): the output lost it and
    played at the wrong shape."""
    clip = _remux(make_clip(tmp_path / "in.mp4", n=3, audio=None), tmp_path / "pasp.mp4", Fraction(32, 27))
    with av.open(str(clip)) as c:  # (the input as meant: the container's word only)
        assert c.streams.video[0].sample_aspect_ratio == Fraction(32, 27)
        assert not c.streams.video[0].codec_context.sample_aspect_ratio
    assert probe_video(clip).sample_aspect_ratio == Fraction(32, 27)
    upscale_video(FakeEngine(), clip, tmp_path / "out.mp4")
    with av.open(str(tmp_path / "out.mp4")) as c:
        assert c.streams.video[0].sample_aspect_ratio == Fraction(32, 27)


def _with_cover(path, video_from=None):
    """An MP4 holding a cover picture (a PNG, attached) and ``video_from``'s video, else AAC audio (a song with its
    cover art)."""
    from PIL import Image

    c = av.open(str(path), "w", format="mp4")
    cover = c.add_stream("png", rate=1)
    cover.width, cover.height, cover.pix_fmt = 20, 20, "rgb24"
    cover.disposition = av.stream.Disposition.attached_pic
    src = av.open(str(video_from)) if video_from is not None else None
    if src is not None:
        video = c.add_stream_from_template(src.streams.video[0])
    else:
        audio = c.add_stream("aac", rate=16000)
        audio.layout = "mono"
    png = io.BytesIO()
    Image.fromarray(np.full((20, 20, 3), (255, 0, 255), np.uint8)).save(png, "PNG")
    packet = av.Packet(png.getvalue())
    packet.stream, packet.pts, packet.dts = cover, 0, 0
    c.mux(packet)
    if src is not None:
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = video
                c.mux(packet)
        src.close()
    else:
        for k in range(0, 8192, 1024):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, k
            for p in audio.encode(frame):
                c.mux(p)
        for p in audio.encode():
            c.mux(p)
    c.close()
    return path


def test_a_cover_picture_is_not_taken_for_the_video(tmp_path):
    """A song with its cover art was "upscaled" into a one-frame video at 90000 fps."""
    song = _with_cover(tmp_path / "song.m4a")
    with pytest.raises(UserInputError, match="song.m4a has no video stream \\(it holds (1 audio stream, 1 cover "
                                             "picture|1 cover picture, 1 audio stream)\\)"):
        upscale_video(FakeEngine(), song, tmp_path / "o.mp4")
    film = _with_cover(tmp_path / "film.mp4", make_clip(tmp_path / "in.mp4", n=4, w=32, h=24, audio=None))
    info = probe_video(film)  # (the control: a film with its cover, which MP4 stores after the video)
    assert (info.width, info.height, info.frames) == (32, 24, 4)
    upscale_video(FakeEngine(), film, tmp_path / "out.mkv", codec="lossless")
    assert [f.shape for f in decode(tmp_path / "out.mkv")] == [(96, 128, 3)] * 4


@pytest.mark.parametrize("size, matrix", [((1280, 536), "ITU709"), ((1920, 800), "ITU709"), ((1280, 720), "ITU709"),
                                          ((720, 576), "ITU601"), ((640, 480), "ITU601")])
def test_a_frame_without_a_matrix_is_read_with_the_one_its_size_implies(size, matrix):
    """An untagged 720p 'scope' encode (1280x536) was read as BT.601: red (200, 40, 60) came out (186, 22, 62)."""
    from streamvsr.video.reader import frame_to_tensor

    w, h = size
    rgb = np.full((h, w, 3), (200, 40, 60), np.uint8)
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv444p", dst_colorspace=matrix)
    frame.colorspace = 2  # (what the file says: unspecified)
    got = (frame_to_tensor(frame)[:, h // 2, w // 2] * 255).round().tolist()
    assert max(abs(a - b) for a, b in zip(got, (200, 40, 60))) <= 2, got


def test_only_a_gif_with_transparent_pixels_is_said_to_have_transparency(tmp_path, caplog):
    """FFmpeg decodes every GIF with an alpha channel: each one was said to have its transparency dropped; one that
    turns transparent after its first frame must still be said to (once)."""
    from PIL import Image

    from streamvsr.video.reader import FrameReader

    def gif(path, transparent):
        frames = [Image.new("RGBA", (16, 12), (200 - 20 * i, 40, 60, 255)) for i in range(3)]
        if transparent is not None:
            frames[transparent].putpixel((3, 3), (0, 0, 0, 0))
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0, disposal=2,
                       optimize=False)  # (PIL's optimiser would drop a transparent pixel of a later frame)
        return path

    caplog.set_level("INFO")
    for transparent in (None, 0, 2):  # (which frame has a transparent pixel)
        caplog.clear()
        path = gif(tmp_path / f"{transparent}.gif", transparent)
        assert len(list(FrameReader(path, info=probe_video(path)))) == 3
        said = [r.getMessage() for r in caplog.records if "has transparency" in r.getMessage()]
        assert len(said) == (transparent is not None) and all(f"from frame {transparent})" in m for m in said), said


def _video_end(path) -> float:
    """Seconds from the first frame's start to the last frame's end, by the packets' own times."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        packets = [(p.pts, p.duration or 0) for p in c.demux(s) if p.size]
    return float((max(pts + d for pts, d in packets) - min(pts for pts, _ in packets)) * s.time_base)


@pytest.mark.parametrize("codec, suffix, resume", [("h264", ".mp4", False), ("lossless", ".mkv", False),
                                                   ("h264", ".mp4", True), ("lossless", ".mkv", True)])
def test_the_last_frame_lasts_as_long_as_the_inputs_did(tmp_path, codec, suffix, resume):
    """A GIF that holds its last picture for a second (frames of 0.1, 0.4, 0.1, 1 s): the output's last frame got
    the average frame time (0.4 s), cutting the hold short, as for any input of variable frame rate."""
    from PIL import Image

    frames = [Image.new("RGB", (16, 12), (200 - 30 * i, 40, 60)) for i in range(4)]
    frames[0].save(tmp_path / "in.gif", save_all=True, append_images=frames[1:], duration=[100, 400, 100, 1000],
                   loop=0)
    assert _video_end(tmp_path / "in.gif") == pytest.approx(1.6)
    out = tmp_path / f"out{suffix}"
    upscale_video(FakeEngine(), tmp_path / "in.gif", out, codec=codec, resume=resume, checkpoint_frames=2)
    assert video_times(out) == pytest.approx([0.0, 0.1, 0.5, 0.6])
    assert _video_end(out) == pytest.approx(1.6, abs=1e-3)


def _cover_listed_first(path, out):
    """``path`` (an MP4 whose cover is an iTunes-style `covr` tag) with its `udta` box moved before the tracks, as
    some taggers write it: FFmpeg then lists the cover as stream 0, before the video."""
    import struct

    def boxes(data, start, end):
        found = []
        while start < end:
            size, kind = struct.unpack(">I4s", data[start:start + 8])
            found.append((kind, data[start:start + size]))
            start += size
        return found

    data = Path(path).read_bytes()
    rebuilt = b""
    for kind, box in boxes(data, 0, len(data)):
        if kind == b"moov":
            inner = boxes(box, 8, len(box))
            first = [b for k, b in inner if k == b"mvhd"] + [b for k, b in inner if k == b"udta"]
            box = box[:8] + b"".join(first + [b for k, b in inner if k not in (b"mvhd", b"udta")])
        rebuilt += box
    Path(out).write_bytes(rebuilt)
    return out


def test_a_cover_listed_before_the_video_gives_neither_frames_nor_colour_tags(tmp_path):
    """The colour tags (HDR: BT.2020, PQ) and the notes on them were read from the first video stream, the cover."""
    from streamvsr.video.writer import color_tags, depth_notes

    c = av.open(str(tmp_path / "hdr.mp4"), "w")
    v = c.add_stream("libx264", rate=24, options={"crf": "0", "x264-params": "colorprim=bt2020:transfer=smpte2084:"
                                                                               "colormatrix=bt2020nc"})
    v.pix_fmt, v.width, v.height = "yuv444p", 32, 24
    for i in range(4):
        for p in v.encode(av.VideoFrame.from_ndarray(np.full((24, 32, 3), 40 * i, np.uint8), format="rgb24")):
            c.mux(p)
    for p in v.encode():
        c.mux(p)
    c.close()
    film = _cover_listed_first(_with_cover(tmp_path / "film.mp4", tmp_path / "hdr.mp4"), tmp_path / "first.mp4")
    with av.open(str(film)) as c:
        assert [s.codec_context.name for s in c.streams] == ["png", "h264"]
    info = probe_video(film)
    assert (info.width, info.height, info.frames) == (32, 24, 4)
    assert color_tags(film) == {"color_primaries": 9, "color_trc": 16}
    assert any("the input is HDR" in note for note in depth_notes(film))
    upscale_video(FakeEngine(), film, tmp_path / "out.mkv", codec="lossless")
    with av.open(str(tmp_path / "out.mkv")) as c:
        ctx = c.streams.video[0].codec_context
        assert (ctx.color_primaries, ctx.color_trc) == (9, 16)
    assert len(decode(tmp_path / "out.mkv")) == 4


def test_a_stopped_run_ends_its_audio_where_its_longer_last_frame_ends(tmp_path):
    """Frames at 0, 1, 2, 3, then 15/24 s (a hold): stopped after 4 frames, the partial's video lasts to 15/24 s
    with its last frame's own duration, and its audio was cut an average frame after that frame's start."""
    clip = make_clip(tmp_path / "in.mp4", n=20, fps=24, audio="aac", pts=[0, 1, 2, 3] + list(range(15, 31)))
    polls = []
    summary = upscale_video(FakeEngine(), clip, tmp_path / "out.mkv", codec="lossless",
                            should_stop=lambda: polls.append(1) or len(polls) > 4)
    kept = summary["path"]
    assert summary["interrupted"] and len(decode(kept)) == 4
    assert _video_end(kept) == pytest.approx(15 / 24, abs=0.002)
    # (to whole AAC frames, copied as they are, with the encoder's priming: within two)
    assert audio_info(kept)["seconds"] == pytest.approx(15 / 24, abs=2 * 1024 / 16000)


def test_a_file_without_frame_durations_ends_its_last_frame_a_frame_after_it(tmp_path):
    """An AVI with a millisecond time base gives no frame durations: its last frame got 1 ms (a frame of the
    1000 fps its time base claims), where it lasts as long as the frames before it (40 ms)."""
    tb = Fraction(1, 1000)
    with av.open(str(tmp_path / "ms.avi"), "w") as c:
        v = c.add_stream("mjpeg", rate=25)
        v.width, v.height, v.pix_fmt = 32, 24, "yuvj420p"
        v.codec_context.time_base = v.time_base = tb
        for i in range(6):
            frame = av.VideoFrame.from_ndarray(np.full((24, 32, 3), 30 * i, np.uint8), format="rgb24")
            frame = frame.reformat(format="yuvj420p")
            frame.pts, frame.time_base = 40 * i, tb
            for p in v.encode(frame):
                c.mux(p)
        for p in v.encode():
            c.mux(p)
    upscale_video(FakeEngine(), tmp_path / "ms.avi", tmp_path / "out.mp4")
    assert _video_end(tmp_path / "out.mp4") == pytest.approx(0.24, abs=0.002)
