"""Streaming video files through the engine: frames, timing, audio, lossless output, scene cuts, interrupts."""

import tracemalloc
from dataclasses import replace

import numpy as np
import pytest
import torch

from streamvsr.models.engine import new_state
from streamvsr.video import SceneCutDetector, upscale_video

av = pytest.importorskip("av")


def make_clip(path, n=12, w=32, h=24, fps=24, audio=True, cut_at=None):
    c = av.open(str(path), "w")
    v = c.add_stream("libx264", rate=fps, options={"crf": "0"})
    v.width, v.height, v.pix_fmt = w, h, "yuv444p"
    a = c.add_stream("aac", rate=16000) if audio else None
    for i in range(n):
        img = np.full((h, w, 3), 40, np.uint8)
        img[:, (i * 2) % w: (i * 2) % w + 6] = 200
        if cut_at is not None and i >= cut_at:
            img = 255 - img
        for p in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            c.mux(p)
    if a is not None:
        t = np.arange(int(16000 * n / fps)) / 16000
        samples = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
        for k in range(0, samples.shape[1], 1024):
            fr = av.AudioFrame.from_ndarray(samples[:, k:k + 1024], format="fltp", layout="mono")
            fr.sample_rate = 16000
            for p in a.encode(fr):
                c.mux(p)
        for p in a.encode():
            c.mux(p)
    for p in v.encode():
        c.mux(p)
    c.close()
    return path


class FakeEngine:
    """4x nearest upscale that records what it was given."""

    def __init__(self):
        self.first_frames = []

    def new_state(self, seed):
        return new_state(seed)

    def step(self, frame, state):
        if state.prev_output is None:
            self.first_frames.append(state.frame_index)
        hr = torch.nn.functional.interpolate(frame[None], scale_factor=4, mode="nearest")
        return hr, replace(state, frame_index=state.frame_index + 1, prev_output=hr, prev_upscaled=hr)


def decode(path):
    with av.open(str(path)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    return frames


def streams(path):
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        audio_packets = sum(1 for p in c.demux(audio=0) if p.size) if c.streams.audio else 0
        return {"fps": v.average_rate, "size": (v.codec_context.width, v.codec_context.height),
                "audio": audio_packets, "codec": v.codec_context.name}


def test_h264_output_keeps_frames_fps_and_audio(tmp_path):
    clip = make_clip(tmp_path / "in.mp4")
    out = tmp_path / "out.mp4"
    summary = upscale_video(FakeEngine(), clip, out)
    assert summary["frames"] == 12 and summary["size"] == (128, 96)
    info, src = streams(out), streams(clip)
    assert info["fps"] == 24 and info["size"] == (128, 96) and info["codec"] == "h264"
    assert info["audio"] == src["audio"] > 0
    assert len(decode(out)) == 12


def test_lossless_is_pixel_exact(tmp_path):
    clip = make_clip(tmp_path / "in.mp4", audio=False)
    out = tmp_path / "out.mkv"
    upscale_video(FakeEngine(), clip, out, codec="lossless")
    for lr, hr in zip(decode(clip), decode(out)):
        expected = np.repeat(np.repeat(lr, 4, axis=0), 4, axis=1)
        assert np.array_equal(hr, expected)


def test_real_engine_lossless_matches_engine_steps(tmp_path):
    pytest.importorskip("diffusers")
    from helpers import make_tiny_checkpoint, make_tiny_raft
    from streamvsr.models.engine import StreamEngine
    from streamvsr.models.flow import load_raft
    from streamvsr.models.loader import load_pipeline

    engine = StreamEngine(load_pipeline(make_tiny_checkpoint(tmp_path / "ckpt")),
                          load_raft(make_tiny_raft(tmp_path / "raft.pth"), num_flow_updates=3))
    clip = make_clip(tmp_path / "in.mp4", n=3, audio=False)
    out = tmp_path / "out.mkv"
    upscale_video(engine, clip, out, seed=9, codec="lossless")
    state = engine.new_state(9)
    for lr, got in zip(decode(clip), decode(out)):
        hr, state = engine.step(torch.from_numpy(lr).permute(2, 0, 1).float() / 255, state)
        expected = (hr[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        assert np.array_equal(got, expected)


def test_scene_cut_resets_temporal_state(tmp_path):
    clip = make_clip(tmp_path / "in.mp4", n=10, audio=False, cut_at=6)
    engine = FakeEngine()
    summary = upscale_video(engine, clip, tmp_path / "out.mp4", scene_cut_threshold=0.3)
    assert summary["scene_cuts"] == 1
    assert engine.first_frames == [0, 6]  # the noise sequence continues: frame_index keeps counting
    plain = FakeEngine()
    upscale_video(plain, clip, tmp_path / "out2.mp4")
    assert plain.first_frames == [0]


def test_scene_cut_metric():
    det = SceneCutDetector(0.3)
    a = torch.zeros(3, 90, 160)
    assert det(a) is False
    assert det(a + 0.1) is False  # a global change of 0.1 is below the threshold
    assert det(torch.ones(3, 90, 160)) is True


def test_interrupt_leaves_a_playable_shorter_file(tmp_path):
    clip = make_clip(tmp_path / "in.mp4", n=12)
    out = tmp_path / "out.mp4"
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        upscale_video(FakeEngine(), clip, out, should_stop=stop)
    assert len(decode(out)) == 5


def test_memory_does_not_grow_with_length(tmp_path):
    short = make_clip(tmp_path / "short.mp4", n=20, audio=False)
    long = make_clip(tmp_path / "long.mp4", n=120, audio=False)
    peaks = []
    for clip in (short, long):
        tracemalloc.start()
        upscale_video(FakeEngine(), clip, tmp_path / f"{clip.stem}.out.mp4")
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < peaks[0] * 1.5 + 1_000_000


def test_rejects_wrong_container(tmp_path):
    clip = make_clip(tmp_path / "in.mp4", n=2, audio=False)
    with pytest.raises(ValueError, match="mkv"):
        upscale_video(FakeEngine(), clip, tmp_path / "out.mp4", codec="lossless")
