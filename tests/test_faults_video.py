"""Fault injection for the video and frame-folder jobs (issue #13): nothing the user has is lost or hidden, and
what breaks is reported with what was kept and where.

Outputs that are the input (hard links, symlinks, OUT_DIR = IN_DIR), existing outputs and failed runs, cut-off and
damaged inputs, rotated video, 16-bit PNGs, two runs at once and stale locks, a frame size that changes, and the
same guarantees in the ComfyUI video node. Every media file is generated here and tiny; the engine is the
FakeEngine of test_video.py (the engine contract, no model).
"""

import contextlib
import errno
import hashlib
import importlib
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from streamvsr.models.shared.errors import (InputDamagedError, OutputBusyError, OutputExistsError,
                                            OutputMoveError, UserInputError)
from streamvsr.video.frames import (check_folder_job, check_frames, flow_folder, list_pngs, read_frame, upscale_folder,
                                    write_png16)
from streamvsr.video.outputs import OutputLock, lock_path, partial_path, temp_path
from streamvsr.video.reader import FrameReader, probe_video
from streamvsr.video.resume import ResumeFiles
from streamvsr.video.stream import check_video_job, upscale_video
from test_video import FakeEngine, decode, expected_frames, input_breaks_at, make_clip

av = pytest.importorskip("av")

ROOT = Path(__file__).resolve().parents[1]


def digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def noise_clip(path, n=6, w=64, h=48, fmt_options=None, codec="libx264", rotation=None, hflip=False):
    """Random frames (so every frame is large and a cut lands mid-file), H.264 or FFV1, optionally with a display
    matrix. FFV1/bgr0 decodes bit-exactly, for pixel comparisons."""
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]
    c = av.open(str(path), "w", options=fmt_options or {})
    v = c.add_stream(codec, rate=24)
    v.width, v.height = w, h
    v.pix_fmt = "yuv420p" if codec == "libx264" else "bgr0"
    if rotation is not None or hflip:
        v.set_display_rotation(rotation or 0, hflip=hflip)
    for img in frames:
        for p in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            c.mux(p)
    for p in v.encode():
        c.mux(p)
    c.close()
    return frames


def cut(path, fraction, to=None):
    data = Path(path).read_bytes()
    to = Path(to or path)
    to.write_bytes(data[: int(len(data) * fraction)])
    return to


def nearest4(img):
    return np.repeat(np.repeat(img, 4, axis=0), 4, axis=1)


class Identity(FakeEngine):
    """Nearest-neighbour 4x, no noise and no temporal mixing: output pixels follow the input exactly."""

    def step(self, frame, state):
        hr, state = super().step(frame, state)
        return frame[None].repeat_interleave(4, dim=2).repeat_interleave(4, dim=3), state


# ------------------------------------------------------------------------------------ 1. never destroy data


def test_output_that_is_a_hard_link_or_symlink_to_the_input_is_refused(tmp_path):
    clip = make_clip(tmp_path / "in.mp4", n=3, audio=None)
    before = digest(clip)
    os.link(clip, tmp_path / "link.mp4")
    (tmp_path / "sym.mp4").symlink_to(clip)
    for out in ("link.mp4", "sym.mp4", "in.mp4"):
        engine = FakeEngine()
        with pytest.raises(UserInputError, match="is the input"):
            upscale_video(engine, clip, tmp_path / out, overwrite=True)  # not even with overwrite
        assert engine.calls == []
    assert digest(clip) == before


def test_existing_output_is_refused_without_overwrite_and_kept_when_a_run_fails(tmp_path):
    clip = make_clip(tmp_path / "in.mp4", n=8, audio=None)
    out = tmp_path / "out.mp4"
    out.write_bytes(b"the user's precious file")
    engine = FakeEngine()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        upscale_video(engine, clip, out)
    assert engine.calls == [] and out.read_bytes() == b"the user's precious file"
    # with overwrite, a failure half-way leaves the old file untouched and the finished frames labelled
    with pytest.raises(RuntimeError, match="engine failure"):
        upscale_video(FakeEngine(fail_at=3), clip, out, overwrite=True)
    assert out.read_bytes() == b"the user's precious file"
    assert len(decode(partial_path(out))) == 3
    # a stop request too
    polls = []
    summary = upscale_video(FakeEngine(), clip, out, overwrite=True,
                            should_stop=lambda: polls.append(1) or len(polls) > 2)
    assert summary["interrupted"] and summary["path"] == str(partial_path(out, 2))
    assert len(decode(partial_path(out))) == 3  # an older partial result is never replaced
    assert out.read_bytes() == b"the user's precious file"
    # an interrupt that raises (ComfyUI's, or a second Ctrl-C)
    def interrupt():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        upscale_video(FakeEngine(), clip, out, overwrite=True, should_stop=interrupt)
    assert out.read_bytes() == b"the user's precious file"
    # only a complete run replaces it, and no work file is left
    upscale_video(FakeEngine(), clip, out, overwrite=True)
    assert len(decode(out)) == 8
    assert not temp_path(out).exists() and not lock_path(out).exists()


def test_resume_run_that_fails_leaves_existing_output_alone(tmp_path):
    clip = make_clip(tmp_path / "in.mp4", n=8, audio=None)
    out = tmp_path / "out.mkv"
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        upscale_video(FakeEngine(fail_at=5), clip, out, codec="lossless", resume=True, checkpoint_frames=2,
                      overwrite=True)
    assert out.read_bytes() == b"old"
    summary = upscale_video(FakeEngine(), clip, out, codec="lossless", resume=True, checkpoint_frames=2,
                            overwrite=True)
    assert summary["resumed_from"] == 4 and len(decode(out)) == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "out.mkv"]


def test_the_audio_source_is_closed_when_writing_or_joining_fails(tmp_path, monkeypatch):
    """An output abandoned before its audio was finished still closes the input it copies the audio from (open, it
    stays locked on Windows and leaks in a long-lived ComfyUI)."""
    from streamvsr.video import audio, resume, writer

    clip = make_clip(tmp_path / "in.mkv", n=2)
    opened, real_init = [], audio.AudioCopy.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        opened.append(self)

    monkeypatch.setattr(audio.AudioCopy, "__init__", init)

    def fails(*args, **kwargs):
        raise OSError(28, "No space left on device")

    out = writer.VideoWriter(tmp_path / "out.mkv", 32, 24, Fraction(24), Fraction(1, 24), audio_from=clip)
    monkeypatch.setattr(out, "_mux_video", fails)
    with pytest.raises(OSError):
        out.close()
    part = tmp_path / "part.nut"
    make_clip(part, n=2, audio=None)
    monkeypatch.setattr(audio.AudioCopy, "mux_until", fails)
    with pytest.raises(OSError):
        resume.join_segments([part], tmp_path / "joined.mkv", audio_from=clip)
    assert len(opened) == 2
    for copy in opened:
        with pytest.raises(AssertionError, match="not open"):
            next(copy.container.demux())


class Timed(FakeEngine):
    """A FakeEngine whose every frame takes ``seconds`` on a fake clock (``now[0]``)."""

    def __init__(self, now, seconds):
        super().__init__()
        self.now, self.seconds = now, seconds

    def step(self, frame, state):
        self.now[0] += self.seconds
        return super().step(frame, state)


def test_the_default_checkpoint_clock_spares_slow_runs_keyframes_and_fast_ones_slow_writes(monkeypatch):
    """Every 60 s by default; not sooner than 20 times what the last checkpoint took to write (FlashVSR's state is
    about 10 GB at a 1080p output); with min_frames (a video's segments) not before that many frames unless 10
    minutes passed. Asked for, seconds or frames are kept exactly."""
    import streamvsr.video.resume as resume

    now = [1000.0]
    monkeypatch.setattr(resume, "time", SimpleNamespace(monotonic=lambda: now[0]))

    def due_after(clock, seconds_per_frame, frames=100):
        clock.restart()
        for n in range(1, frames + 1):
            now[0] += seconds_per_frame
            if clock.frame_done():
                return n
        return None

    clock = resume.CheckpointClock(min_frames=12)
    assert due_after(clock, 1.0) == 60  # fast frames: every minute
    assert due_after(clock, 30.0) == 12  # 360 s, but a segment holds 12 frames
    assert due_after(clock, 70.0) == 9  # at 630 s: at most 10 minutes of work at stake
    clock.save_took = 10.0  # a slow checkpoint: the next after 200 s
    assert due_after(clock, 1.0, 1000) == 200
    assert due_after(resume.CheckpointClock(), 70.0) == 1  # frames of a folder: each is a file of its own
    explicit = resume.CheckpointClock(seconds=5.0, min_frames=12)
    explicit.save_took = 10.0
    assert due_after(explicit, 1.0) == 5
    assert due_after(resume.CheckpointClock(frames=3, min_frames=12), 70.0) == 3


def test_a_slow_video_run_checkpoints_whole_segments_and_a_slow_save_spaces_folder_checkpoints(tmp_path,
                                                                                               monkeypatch):
    """Frames of 70 s (a CPU at a large output): a checkpoint after every frame closed a segment per frame, each
    starting with a keyframe. By default the first segment closes at 10 minutes (9 frames), the next at the stop;
    --checkpoint-every 60 still closes one per frame. A folder job whose checkpoint takes 10 s to write saves every
    200 s."""
    import streamvsr.video.resume as resume

    now = [1000.0]
    monkeypatch.setattr(resume, "time", SimpleNamespace(monotonic=lambda: now[0]))
    clip = make_clip(tmp_path / "in.mp4", n=20, audio=None)
    for seconds, segments in ((None, 2), (60.0, 15)):
        out = tmp_path / f"out{seconds}.mkv"
        polls = []
        given = {} if seconds is None else {"checkpoint_seconds": seconds}
        upscale_video(Timed(now, 70.0), clip, out, codec="lossless", resume=True, **given,
                      should_stop=lambda: polls.append(1) or len(polls) > 15)
        assert len(ResumeFiles(out).parts_on_disk()) == segments, seconds
    # a folder job: the time a save takes is measured where it is written
    import streamvsr.video.frames as frames_module

    monkeypatch.setattr(frames_module, "time", SimpleNamespace(monotonic=lambda: now[0]))
    consumed = []
    save = ResumeFiles.save

    def slow_save(self, state, info, thumbnail):
        save(self, state, info, thumbnail)
        consumed.append(info["consumed"])
        now[0] += 10.0

    monkeypatch.setattr(ResumeFiles, "save", slow_save)
    files = png_folder(tmp_path / "frames", n=20)
    polls = []
    upscale_folder(Timed(now, 30.0), files, tmp_path / "up", save="npy", resume=True,
                   should_stop=lambda: polls.append(1) or len(polls) > 18)
    assert consumed == [2, 9, 16, 18]  # 60 s, then 210 s apart (at least 200), then the stop


def test_unfinished_resume_job_is_not_silently_discarded(tmp_path):
    clip = make_clip(tmp_path / "in.mp4", n=6, audio=None)
    out = tmp_path / "out.mkv"
    polls = []
    upscale_video(FakeEngine(), clip, out, codec="lossless", resume=True, checkpoint_frames=2,
                  should_stop=lambda: polls.append(1) or len(polls) > 3)
    assert ResumeFiles(out).state.exists()
    with pytest.raises(UserInputError, match="add --resume to continue it, or --overwrite"):
        upscale_video(FakeEngine(), clip, out, codec="lossless")
    # while another run continues it, that is what a second run is told
    with locked_elsewhere(out):
        for resume in (False, True):
            with pytest.raises(OutputBusyError, match="is being written by another"):
                check_video_job(clip, out, codec="lossless", resume=resume)
    assert ResumeFiles(out).state.exists()
    upscale_video(FakeEngine(), clip, out, codec="lossless", overwrite=True)  # discards it, on request
    assert not ResumeFiles(out).state.exists() and not ResumeFiles(out).parts_on_disk()
    assert len(decode(out)) == 6


@contextlib.contextmanager
def locked_elsewhere(target):
    """While the block runs, ``target``'s output lock is held by another thread (another job of this program)."""
    holding, release = threading.Event(), threading.Event()

    def hold():
        with OutputLock(target):
            holding.set()
            release.wait(60)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert holding.wait(10)
        yield
    finally:
        release.set()
        thread.join()


def png_folder(folder, n=3, size=(12, 8), seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"f{i:03d}.png")
    return sorted(folder.iterdir())


def test_frames_and_flow_refuse_out_dir_equal_to_in_dir_or_overlapping_it(tmp_path):
    files = png_folder(tmp_path / "in")
    before = {p.name: digest(p) for p in files}
    (tmp_path / "alias").symlink_to(tmp_path / "in")
    for out_dir in (tmp_path / "in", tmp_path / "alias"):
        engine = FakeEngine()
        with pytest.raises(UserInputError, match="is the input folder"):
            upscale_folder(engine, files, out_dir, save="png", overwrite=True)
        with pytest.raises(UserInputError, match="is the input folder"):
            flow_folder(lambda a, b: torch.zeros(1, 2, *a.shape[-2:]), files, out_dir, save="png", overwrite=True)
        assert engine.calls == []
    # another folder whose files are hard links to the inputs
    (tmp_path / "linked").mkdir()
    os.link(files[1], tmp_path / "linked" / files[1].name)
    with pytest.raises(UserInputError, match="is the input frame"):
        upscale_folder(FakeEngine(), files, tmp_path / "linked", save="png", overwrite=True)
    assert {p.name: digest(p) for p in files} == before


def test_frames_into_a_folder_leave_other_jobs_work_files_alone(tmp_path):
    """A frames run cleans up what an unfinished run of its own outputs left, not the temporary file of a video
    being upscaled into the same folder (that job holds its own lock, not the folder's)."""
    files = png_folder(tmp_path / "in", n=2)
    out = tmp_path / "shared"
    out.mkdir()
    video_in_progress = temp_path(out / "clip.mp4")
    video_in_progress.write_bytes(b"a video being written")
    leftover = temp_path(out / "f000.png")
    leftover.write_bytes(b"half a frame")
    assert upscale_folder(FakeEngine(), files, out, save="png") == 2
    assert video_in_progress.read_bytes() == b"a video being written" and not leftover.exists()
    assert flow_folder(lambda a, b: torch.zeros(1, 2, *a.shape[-2:]), files, out / "flow", save="npy") == 1
    assert video_in_progress.exists()


def test_a_frames_run_stopped_by_ctrl_c_says_how_many_frames_it_wrote(tmp_path, caplog):
    files = png_folder(tmp_path / "in", n=4)

    class StoppedAtTheThird(FakeEngine):
        def step(self, frame, state):
            if state.frame_index == 2:
                raise KeyboardInterrupt
            return super().step(frame, state)

    with pytest.raises(KeyboardInterrupt):
        upscale_folder(StoppedAtTheThird(), files, tmp_path / "out", save="png")
    assert f"stopped: 2 of 4 frames were written to {tmp_path / 'out'}, each complete" in caplog.text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [files[0].name, files[1].name]


def test_a_stopped_overwrite_says_which_outputs_are_still_an_earlier_runs_and_flow_says_what_it_wrote(tmp_path,
                                                                                                        caplog):
    """--overwrite replaces each output as it is written: a run stopped half-way leaves the folder half old, half
    new, which the message says. A run stopped before its first frame says so, and `flow` says what it wrote."""
    files = png_folder(tmp_path / "in", n=5)
    out = tmp_path / "out"
    upscale_folder(FakeEngine(), files, out, save="npy")

    with pytest.raises(KeyboardInterrupt):
        upscale_folder(StopsAt(2), files, out, save="npy", seed=7, overwrite=True)
    assert (f"stopped: 2 of 5 frames were written to {out}, each complete; 3 after them (f002.npy to f004.npy) are "
            "still those of an earlier run") in caplog.text
    caplog.clear()
    with pytest.raises(KeyboardInterrupt):
        upscale_folder(StopsAt(0), files, out, save="npy", seed=7, overwrite=True)
    assert (f"stopped: no frame was written to {out}; 5 there (f000.npy to f004.npy) are still those of an earlier "
            "run") in caplog.text  # (not "after them")
    caplog.clear()
    with pytest.raises(KeyboardInterrupt):
        upscale_folder(StopsAt(0), files, tmp_path / "none", save="npy")
    assert "stopped: no frame was written" in caplog.text

    def flow(current, previous):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return torch.zeros(1, 2, *current.shape[-2:])

    calls = []
    with pytest.raises(KeyboardInterrupt):
        flow_folder(flow, files, tmp_path / "flow")
    assert f"stopped: 2 of 4 flow fields were written to {tmp_path / 'flow'}, each complete\n" in caplog.text
    # over a finished run's, with --overwrite: the two it did not reach are still the earlier run's
    assert flow_folder(lambda a, b: torch.ones(1, 2, *a.shape[-2:]), files, tmp_path / "again") == 4
    calls = []
    caplog.clear()
    with pytest.raises(KeyboardInterrupt):
        flow_folder(flow, files, tmp_path / "again", overwrite=True)
    assert (f"stopped: 2 of 4 flow fields were written to {tmp_path / 'again'}, each complete; 2 after them "
            "(f003.npy to f004.npy) are still those of an earlier run") in caplog.text


def test_an_output_name_taken_by_a_folder_is_refused_before_any_work(tmp_path):
    """It was found only when the first output computed for it was put in place, with an error that asked whether
    the file was open in another program."""
    files = png_folder(tmp_path / "in", n=3)
    for out in (tmp_path / "frames", tmp_path / "flow"):
        (out / "f002.npy").mkdir(parents=True)
    engine = FakeEngine()
    with pytest.raises(UserInputError, match="f002.npy is a folder, where an output file of that name is to go"):
        upscale_folder(engine, files, tmp_path / "frames", save="npy", overwrite=True)
    assert engine.calls == [] and sorted(p.name for p in (tmp_path / "frames").iterdir()) == ["f002.npy"]
    with pytest.raises(UserInputError, match="f002.npy is a folder"):
        flow_folder(lambda a, b: torch.zeros(1, 2, *a.shape[-2:]), files, tmp_path / "flow", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "flow").iterdir()) == ["f002.npy"]


class StopsAt(FakeEngine):
    """Ctrl-C while the engine steps frame ``at`` (of the whole sequence), or ``error`` raised there."""

    def __init__(self, at, error=KeyboardInterrupt):
        super().__init__()
        self.at, self.error = at, error

    def step(self, frame, state):
        if state.frame_index == self.at:
            raise self.error
        return super().step(frame, state)


def npy_outputs(folder):
    return {p.name: np.load(p) for p in sorted(Path(folder).glob("*.npy"))}


def test_a_frames_job_with_resume_continues_after_a_stop_as_if_it_ran_through(tmp_path, caplog):
    """A hard Ctrl-C mid-frame checkpoints the frames before it (a state is never changed by later steps), and the
    same job again continues there, also with its frames' folder moved: the same outputs as one run, no frame
    upscaled twice, no work files left."""
    files = png_folder(tmp_path / "in", n=6)
    upscale_folder(FakeEngine(), files, tmp_path / "whole", save="npy", seed=3)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        upscale_folder(StopsAt(4), files, out, save="npy", seed=3, resume=True)
    assert f"stopped: 4 of 6 frames were written to {out}, each complete; run the same command again" in caplog.text
    state_file = ResumeFiles(out).state
    assert state_file.exists() and ResumeFiles(out).read_info()["consumed"] == 4
    (tmp_path / "in").rename(tmp_path / "moved")  # the same frames, told by their names, sizes and times
    files = list_pngs(tmp_path / "moved")
    engine = FakeEngine()
    assert upscale_folder(engine, files, out, save="npy", seed=3, resume=True) == 6
    assert [index for index, _, _ in engine.calls] == [4, 5]
    whole, got = npy_outputs(tmp_path / "whole"), npy_outputs(out)
    assert list(got) == list(whole) and all(np.array_equal(got[k], whole[k]) for k in whole)
    assert not state_file.exists() and not os.path.exists(ResumeFiles(out).state_tmp)


def test_a_folder_job_asked_to_stop_keeps_the_frame_in_progress_and_continues(tmp_path, caplog):
    """A first Ctrl-C of the frames and flow commands (``should_stop``) used to stop at once, losing the frame in
    progress (minutes of work on a CPU): the frame is finished, the run stops before the next one, says what it
    wrote and, with resume, continues there as if it had run through."""
    files = png_folder(tmp_path / "in", n=6)
    upscale_folder(FakeEngine(), files, tmp_path / "whole", save="npy", seed=3)
    for resume in (False, True):
        out, engine, polls = tmp_path / f"out{resume}", FakeEngine(), []

        def after_three(polls=polls):
            polls.append(1)
            return len(polls) > 3

        assert upscale_folder(engine, files, out, save="npy", seed=3, resume=resume, should_stop=after_three) == 3
        assert [index for index, _, _ in engine.calls] == [0, 1, 2]
        again = "; run the same command again to continue" if resume else ""
        assert f"stopped: 3 of 6 frames were written to {out}, each complete{again}" in caplog.text
        assert sorted(npy_outputs(out)) == [p.stem + ".npy" for p in files[:3]]
        assert ResumeFiles(out).state.exists() == resume
    engine = FakeEngine()
    assert upscale_folder(engine, files, out, save="npy", seed=3, resume=True) == 6
    assert [index for index, _, _ in engine.calls] == [3, 4, 5]
    whole, got = npy_outputs(tmp_path / "whole"), npy_outputs(out)
    assert list(got) == list(whole) and all(np.array_equal(got[k], whole[k]) for k in whole)
    # asked while the last frame is read: nothing is left to stop, the job finishes
    asked = []
    assert upscale_folder(FakeEngine(), files, tmp_path / "last", save="npy", resume=True,
                          should_stop=lambda: asked.append(1) or len(asked) > 6) == 6
    assert len(asked) == 6 and not ResumeFiles(tmp_path / "last").state.exists()

    pairs = []
    flow = tmp_path / "flow"
    assert flow_folder(lambda a, b: pairs.append(1) or torch.zeros(1, 2, *a.shape[-2:]), files, flow,
                       should_stop=lambda: len(pairs) == 2) == 2
    assert f"stopped: 2 of 5 flow fields were written to {flow}, each complete" in caplog.text
    assert sorted(npy_outputs(flow)) == ["f001.npy", "f002.npy"]


def test_a_killed_frames_job_continues_from_its_last_checkpoint(tmp_path, monkeypatch):
    """A run killed outright saves nothing at the end: the next one continues from the last periodic
    checkpoint, redoing (and replacing) the outputs written after it."""
    files = png_folder(tmp_path / "in", n=7)
    upscale_folder(FakeEngine(), files, tmp_path / "whole", save="npy")
    out = tmp_path / "out"
    killed, save = [], ResumeFiles.save

    class KilledAt(StopsAt):
        def step(self, frame, state):
            if state.frame_index == self.at:
                killed.append(1)
            return super().step(frame, state)

    with monkeypatch.context() as m:
        m.setattr(ResumeFiles, "save", lambda *a, **k: None if killed else save(*a, **k))  # (dead: saves nothing)
        with pytest.raises(KeyboardInterrupt):
            upscale_folder(KilledAt(5), files, out, save="npy", resume=True, checkpoint_frames=2)
    assert ResumeFiles(out).read_info()["frames"] == 4 and len(npy_outputs(out)) == 5
    # the output it wrote after its last checkpoint cannot be told from a file put there since: said, and replaced
    # only when asked
    with pytest.raises(OutputExistsError, match="already has f004.npy of the frames after the 4 that "
                                                "out.streamvsr-resume.safetensors counts: .* add --overwrite"):
        upscale_folder(FakeEngine(), files, out, save="npy", resume=True)
    engine = FakeEngine()
    upscale_folder(engine, files, out, save="npy", resume=True, overwrite=True)
    assert [index for index, _, _ in engine.calls] == [4, 5, 6]
    whole, got = npy_outputs(tmp_path / "whole"), npy_outputs(out)
    assert list(got) == list(whole) and all(np.array_equal(got[k], whole[k]) for k in whole)


def test_a_frames_job_killed_before_its_first_checkpoint_is_told_as_having_none(tmp_path, monkeypatch):
    """Its outputs are there and no checkpoint: --resume was refused with "already has f000.npy and 2 more of this
    run's outputs", as if nothing were to be continued and without saying why."""
    files = png_folder(tmp_path / "in", n=4)
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(ResumeFiles, "save", lambda *a, **k: None)  # (killed: it never got to save one)
        with pytest.raises(KeyboardInterrupt):
            upscale_folder(StopsAt(3), files, out, save="npy", resume=True)
    assert len(npy_outputs(out)) == 3 and not ResumeFiles(out).state.exists()
    with pytest.raises(OutputExistsError, match="already has f000.npy and 2 more of this run's outputs; add "
                                                "--overwrite to replace them; --resume finds no resume file of a "
                                                "job \\(out.streamvsr-resume.safetensors\\) to continue$"):
        upscale_folder(FakeEngine(), files, out, save="npy", resume=True)
    with pytest.raises(OutputExistsError, match="add --overwrite to replace them$"):  # (no --resume: as before)
        upscale_folder(FakeEngine(), files, out, save="npy")


def test_a_continued_overwrite_job_stopped_again_names_the_outputs_still_from_an_earlier_run(tmp_path, caplog):
    """--resume --overwrite over an earlier run's outputs, stopped twice: each stop says which outputs past the
    frames written are still the earlier run's (the folder mixes two runs)."""
    files = png_folder(tmp_path / "in", n=6)
    out = tmp_path / "out"
    upscale_folder(FakeEngine(), files, out, save="npy", seed=1)
    with pytest.raises(KeyboardInterrupt):
        upscale_folder(StopsAt(2), files, out, save="npy", resume=True, overwrite=True)
    assert "4 after them (f002.npy to f005.npy) are still those of an earlier run" in caplog.text
    caplog.clear()
    with pytest.raises(KeyboardInterrupt):
        upscale_folder(StopsAt(4), files, out, save="npy", resume=True, overwrite=True)
    assert ("stopped: 4 of 6 frames were written to " in caplog.text
            and "; 2 after them (f004.npy to f005.npy) are still those of an earlier run" in caplog.text)


def test_an_unfinished_frames_job_is_continued_only_as_the_same_job(tmp_path):
    """Without --resume it is neither continued nor discarded unasked; other settings, other frames before the
    checkpoint or finished outputs gone are one line each (before the model loads), and --overwrite discards it.
    Frames added after the ones it read (a sequence still being rendered) are continued."""
    files = png_folder(tmp_path / "in", n=4)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        upscale_folder(StopsAt(2), files, out, save="npy", resume=True)
    state_file = ResumeFiles(out).state
    with pytest.raises(UserInputError, match=f"{out} has an unfinished resumable job \\(2 frames done, "
                                             f"{state_file.name} next to it\\): add --resume"):
        check_folder_job(files, out, save="npy")
    with pytest.raises(UserInputError, match="other settings \\(seed 42 then, 7 now; format 'npy' then, 'png' now"):
        check_folder_job(files, out, seed=7, save="png", resume=True)
    shutil.copy2(files[1], tmp_path / "kept.png")
    written = files[1].stat().st_mtime_ns
    shutil.copy(files[0], files[1])  # another frame of the same size, written a second later
    os.utime(files[1], ns=(written + 10**9, written + 10**9))
    assert files[1].stat().st_size == (tmp_path / "kept.png").stat().st_size
    with pytest.raises(UserInputError, match="the 2 frames it read are not those files now"):
        check_folder_job(files, out, save="npy", resume=True)
    with pytest.raises(UserInputError, match="the 2 frames it read are not those files now"):
        check_folder_job(files[:1], out, save="npy", resume=True)
    shutil.copy2(tmp_path / "kept.png", files[1])  # the frame as it was
    (out / "f001.npy").unlink()
    with pytest.raises(UserInputError, match="counts 2 finished frames, but .*f001.npy are gone; put them back"):
        check_folder_job(files, out, save="npy", resume=True)
    assert state_file.exists()
    np.save(out / "f001.npy", np.zeros(1))
    for name in ("f004.png", "f005.png"):  # two more frames rendered meanwhile
        shutil.copy(files[0], tmp_path / "in" / name)
    files = list_pngs(tmp_path / "in")
    engine = FakeEngine()
    assert upscale_folder(engine, files, out, save="npy", resume=True) == 6
    assert [index for index, _, _ in engine.calls] == [2, 3, 4, 5]
    with pytest.raises(KeyboardInterrupt):
        upscale_folder(StopsAt(3), files, out, save="npy", resume=True, overwrite=True)
    engine = FakeEngine()
    upscale_folder(engine, files, out, save="npy", seed=9, resume=True, overwrite=True)  # other seed: discarded
    assert [index for index, _, _ in engine.calls] == list(range(6)) and not state_file.exists()
    expected = FakeEngine()
    upscale_folder(expected, files, tmp_path / "seed9", save="npy", seed=9)
    assert all(np.array_equal(a, b) for a, b in zip(npy_outputs(out).values(),
                                                     npy_outputs(tmp_path / "seed9").values()))


def test_a_damaged_frames_checkpoint_is_discarded_by_overwrite_as_its_message_says(tmp_path):
    files = png_folder(tmp_path / "in", n=4)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        upscale_folder(StopsAt(2), files, out, save="npy", resume=True)
    state = ResumeFiles(out).state
    state.write_bytes(state.read_bytes()[:40])
    for resume in (True, False):
        with pytest.raises(UserInputError, match=f"the resume file {state} is damaged .*; add --overwrite to "
                                                 r"discard the job and start over \(in ComfyUI: delete that resume "
                                                 r"file\)$"):
            upscale_folder(FakeEngine(), files, out, save="npy", resume=resume)
    engine = FakeEngine()
    assert upscale_folder(engine, files, out, save="npy", resume=True, overwrite=True) == 4
    assert [index for index, _, _ in engine.calls] == list(range(4)) and not state.exists()
    # its description readable, its state not: the same
    from safetensors.torch import save_file

    out = tmp_path / "out2"
    with pytest.raises(KeyboardInterrupt):
        upscale_folder(StopsAt(2), files, out, save="npy", resume=True)
    state = ResumeFiles(out).state
    tensors, meta = checkpoint_contents(state)
    save_file({k: v for k, v in tensors.items() if k != "generator_state"}, str(state), metadata=meta)
    with pytest.raises(UserInputError, match="is damaged or does not fit this model .*; add --overwrite"):
        upscale_folder(FakeEngine(), files, out, save="npy", resume=True)
    engine = FakeEngine()
    assert upscale_folder(engine, files, out, save="npy", resume=True, overwrite=True) == 4
    assert [index for index, _, _ in engine.calls] == list(range(4)) and not state.exists()


def test_a_frames_job_that_fails_keeps_a_checkpoint_and_one_that_cannot_save_it_reports_the_failure(tmp_path,
                                                                                                    monkeypatch,
                                                                                                    caplog):
    files = png_folder(tmp_path / "in", n=4)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="engine failure"):
        upscale_folder(StopsAt(3, RuntimeError("engine failure")), files, out, save="npy", resume=True)
    assert ResumeFiles(out).read_info()["frames"] == 3

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ResumeFiles, "save", full)
    with pytest.raises(KeyboardInterrupt):
        upscale_folder(StopsAt(1), files, tmp_path / "other", save="npy", resume=True)
    assert (f"could not save the resume checkpoint {ResumeFiles(tmp_path / 'other').state} (OSError: [Errno 28] No "
            "space left on device); there is none yet, so the next run starts over") in caplog.text
    # a periodic checkpoint that cannot be saved does not stop the run: said once
    caplog.clear()
    assert upscale_folder(FakeEngine(), files, tmp_path / "goes_on", save="npy", resume=True,
                          checkpoint_frames=1) == 4
    assert caplog.text.count("could not save the resume checkpoint") == 1 and ", going on;" in caplog.text


def test_a_continued_frames_job_replaces_no_file_it_did_not_write_and_takes_dot_as_its_folder(tmp_path,
                                                                                                monkeypatch):
    """Frames added after a stop whose outputs exist already (another's files) are not replaced without
    --overwrite (a continued job replaced every output past its checkpoint). An output folder given as "." has its
    checkpoint next to it (it was a traceback: a path without a name)."""
    files = png_folder(tmp_path / "in", n=4)
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)
    with pytest.raises(KeyboardInterrupt):
        upscale_folder(StopsAt(2), files, Path("."), save="npy", resume=True)
    assert ResumeFiles(out).state.exists()
    np.save(out / "f005.npy", np.zeros(1))  # someone else's
    shutil.copy(files[0], tmp_path / "in" / "f005.png")
    with pytest.raises(OutputExistsError, match="already has f005.npy of the frames after the 2 that"):
        upscale_folder(FakeEngine(), list_pngs(tmp_path / "in"), Path("."), save="npy", resume=True)
    assert np.load(out / "f005.npy").shape == (1,)
    (tmp_path / "in" / "f005.png").unlink()
    assert upscale_folder(FakeEngine(), files, Path("."), save="npy", resume=True) == 4
    assert not ResumeFiles(out).state.exists()


def test_a_sequence_folder_as_it_comes_from_other_machines(tmp_path, caplog):
    """A frame behind a link whose file is gone was left out, joining its neighbours; a Mac's ._ copies were
    frames; a work file of a stopped run and other image files were left out without a word; an EXIF orientation
    outside 1-8 counted as turned; an animated PNG gave its first picture; transparency was dropped unsaid."""
    from PIL import Image

    from streamvsr.video.frames import list_pngs

    folder = tmp_path / "in"
    files = png_folder(folder, n=4)
    (folder / "._f000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (folder / ".DS_Store").write_bytes(b"\x00")
    (folder / "f001.streamvsr-tmp.png").write_bytes(b"half")
    (folder / "f009.jpg").write_bytes(b"")
    (folder / "f010.apng").write_bytes(b"")  # (an animated PNG's usual name)
    moved = tmp_path / "gone.png"
    files[2].rename(moved)
    files[2].symlink_to(moved)
    moved.unlink()
    with caplog.at_level(logging.WARNING):
        listed = list_pngs(folder)
    assert [p.name for p in listed] == ["f000.png", "f001.png", "f002.png", "f003.png"]
    assert "left out f001.streamvsr-tmp.png: the work file of a run that did not finish" in caplog.text
    assert "also holds 1 .apng file, 1 .jpg file: only the .png files are frames" in caplog.text
    with pytest.raises(UserInputError, match="f002.png is not a readable image \\(a link to a file that is gone\\)"):
        check_frames(listed)
    files[2].unlink()
    img = Image.open(files[0])
    exif = img.getexif()
    exif[0x0112] = 9  # not an orientation: shown as stored
    img.save(files[1], exif=exif)
    assert check_frames(list_pngs(folder)) == (12, 8)
    frames = [Image.new("RGB", (12, 8), c) for c in ("red", "blue")]
    frames[0].save(files[3], save_all=True, append_images=frames[1:])
    with pytest.raises(UserInputError, match="f003.png is not a readable image \\(it is animated, 2 pictures"):
        check_frames(list_pngs(folder))
    Image.new("RGBA", (12, 8)).save(files[3])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        check_frames(list_pngs(folder))
    assert "f003.png has transparency: only its colours are upscaled" in caplog.text


def test_an_output_through_a_folder_not_yet_there_is_still_the_input(tmp_path, monkeypatch):
    clip = make_clip(tmp_path / "in.mp4", n=2, audio=None)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserInputError, match="is the input"):
        check_video_job(clip, Path("new") / ".." / "in.mp4", overwrite=True)
    assert not (tmp_path / "new").exists()


def test_frames_outputs_are_not_replaced_without_overwrite_and_dotted_names_stay_apart(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("shot.0001.png", "shot.0002.png"):  # Path.with_suffix would map both to shot.png
        Image.fromarray(rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)).save(folder / name)
    files = sorted(folder.iterdir())
    out = tmp_path / "out"
    assert upscale_folder(FakeEngine(), files, out, save="npy") == 2
    assert sorted(p.name for p in out.iterdir()) == ["shot.0001.npy", "shot.0002.npy"]
    kept = digest(out / "shot.0001.npy")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        upscale_folder(FakeEngine(), files, out, save="npy")
    assert digest(out / "shot.0001.npy") == kept
    assert upscale_folder(FakeEngine(), files, out, save="npy", overwrite=True) == 2


@pytest.mark.parametrize("resume", [False, True])
def test_a_finished_result_that_cannot_be_moved_into_place_is_kept(tmp_path, monkeypatch, resume):
    """The last step fails (Windows: the old output is open in a player). The finished video must not stay under the
    temporary name, which the next run deletes as a leftover: it is kept, and the error says where."""
    clip = make_clip(tmp_path / "in.mp4", n=5, audio=None)
    out = tmp_path / "out.mkv"
    out.write_bytes(b"old result, open elsewhere")
    real_replace = os.replace

    def busy(src, dst):
        if Path(dst) == out:
            raise PermissionError(13, "The process cannot access the file", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", busy)
    with pytest.raises(OutputMoveError, match="is that file open") as e:
        upscale_video(FakeEngine(), clip, out, codec="lossless", overwrite=True, resume=resume)
    monkeypatch.setattr(os, "replace", real_replace)
    kept = partial_path(out)
    assert str(kept) in str(e.value) and out.read_bytes() == b"old result, open elsewhere"
    assert len(decode(kept)) == 5 and not temp_path(out).exists()
    # The next run leaves the kept result alone (and with resume joins the finished job again without redoing it).
    engine = FakeEngine()
    summary = upscale_video(engine, clip, out, codec="lossless", overwrite=True, resume=resume)
    assert summary["frames"] == 5 and len(decode(out)) == 5 and len(decode(kept)) == 5
    assert len(engine.calls) == (0 if resume else 5)


def test_a_partial_file_that_could_not_be_finished_is_reported_as_such(tmp_path, monkeypatch, caplog):
    """A full disk mid-file: the encoder fails, and so does writing the file's end (an MP4's index). The frames are
    kept, but the message must not promise a playable file."""
    from streamvsr.video.writer import VideoWriter

    clip = make_clip(tmp_path / "in.mp4", n=6, audio=None)
    real_write, real_close = VideoWriter.write, VideoWriter.close
    writes = []

    def write(self, *args):
        writes.append(1)
        if len(writes) == 3:
            raise OSError(28, "No space left on device")
        return real_write(self, *args)

    def close(self, complete=True):
        real_close(self, complete)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(VideoWriter, "write", write)
    monkeypatch.setattr(VideoWriter, "close", close)
    caplog.set_level("WARNING")
    with pytest.raises(OSError, match="No space"):
        upscale_video(FakeEngine(), clip, tmp_path / "out.mp4")
    assert partial_path(tmp_path / "out.mp4").exists() and "may not play" in caplog.text
    caplog.clear()
    monkeypatch.setattr(VideoWriter, "close", real_close)
    with pytest.raises(RuntimeError, match="engine failure"):  # the control: a file finished properly
        upscale_video(FakeEngine(fail_at=2), clip, tmp_path / "out.mp4")
    assert "are in" in caplog.text and "may not play" not in caplog.text


@pytest.mark.parametrize("suffix, codec", [(".mkv", "lossless"), (".mp4", "h264")])
def test_a_file_whose_end_could_not_be_written_is_kept_with_the_frames_it_holds(tmp_path, monkeypatch, caplog,
                                                                                suffix, codec):
    """MP4 and Matroska write what they buffered (an MP4's index, Matroska's last clusters) only as the file is
    closed: on a full disk that fails after every frame was encoded. The partial was said to hold them all, though
    the MKV held some and the MP4 none that play; one with none is of no use on a full disk."""
    from streamvsr.video.writer import VideoWriter

    clip = make_clip(tmp_path / "in.mp4", n=6, audio=None)
    real_close = VideoWriter.close

    def close(self, complete=True):
        real_close(self, complete)
        with open(self.path, "r+b") as f:  # what reached the disk before it filled
            f.truncate(os.path.getsize(self.path) * 2 // 3)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(VideoWriter, "close", close)
    caplog.set_level("WARNING")
    out = tmp_path / f"out{suffix}"
    with pytest.raises(OSError, match="No space"):
        upscale_video(FakeEngine(), clip, out, codec=codec)
    kept = partial_path(out)
    if suffix == ".mkv":
        held = len(decode(kept))
        assert 0 < held < 6
        assert f"{held} of the 6 frames done before this error are in {kept}, which could not be finished" \
            in caplog.text
    else:
        assert "the 6 frames done before this error could not be kept" in caplog.text
        assert not kept.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in.mp4"] + ([kept.name] if suffix == ".mkv"
                                                                               else []))


def test_an_input_named_like_a_work_file_of_the_output_is_refused(tmp_path):
    """Every run removes the temporary name and the segments of its output and writes the lock: an input under one
    of those names (e.g. the finished file a failed move left) would be destroyed."""
    source = make_clip(tmp_path / "source.mp4", n=2, audio=None)
    before = digest(source)
    out = tmp_path / "out.mp4"
    for name in ("out.streamvsr-tmp.mp4", "out.mp4.streamvsr-lock", "out.mp4.streamvsr-part0000.nut",
                 "out.mp4.streamvsr-resume.safetensors"):
        clip = tmp_path / name
        os.link(source, clip)
        for given in (clip, source):  # under that name, and as another name of the same file
            engine = FakeEngine()
            with pytest.raises(UserInputError, match="work file of the output"):
                upscale_video(engine, given, out, resume=True)
            assert engine.calls == [] and digest(clip) == before
        clip.unlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source.mp4"]


def test_only_the_outputs_own_segments_count_as_its_work_files(tmp_path):
    """Files that merely start like a segment name (the partial result of output ``a.mp4.mkv``, a user's file) are
    neither removed nor refused as inputs; a stale segment of the output is removed."""
    clip = make_clip(tmp_path / "a.mp4.streamvsr-partial.mkv", n=2, audio=None, vcodec="ffv1")
    before = digest(clip)
    out = tmp_path / "a.mp4"
    others = {"a.mp4.streamvsr-partners.txt": b"x", "a.mp4.streamvsr-part0001.nut.bak": b"y"}
    for name, data in others.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "a.mp4.streamvsr-part0000.nut").write_bytes(b"a segment left by a run without a checkpoint")
    upscale_video(FakeEngine(), clip, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([clip.name, "a.mp4", *others])
    assert digest(clip) == before and all((tmp_path / name).read_bytes() == data for name, data in others.items())
    files = ResumeFiles(out)
    for index in (10000, 2, 9999):
        files.part(index).write_bytes(b"")
    assert files.parts_on_disk() == [files.part(i) for i in (2, 9999, 10000)]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names fsync'ed files through /proc/self/fd")
def test_checkpoints_and_results_reach_the_disk_before_what_counts_on_them(tmp_path, monkeypatch):
    """After a power cut a checkpoint must not count a segment whose data never reached the disk, and a result
    must not replace its work files while its own data is still in the page cache."""
    clip = make_clip(tmp_path / "in.mp4", n=5, audio=None)
    out = tmp_path / "out.mkv"
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    upscale_video(FakeEngine(), clip, out, codec="lossless", resume=True, checkpoint_frames=2)
    files = ResumeFiles(out)
    checkpoints = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(files.state)]
    assert len(checkpoints) >= 3
    for k, i in enumerate(checkpoints):
        synced = {e[1] for e in events[:i] if e[0] == "fsync"}
        assert str(files.state_tmp) in synced
        assert {str(files.part(j)) for j in range(k + 1)} <= synced  # segment j closes before checkpoint j
    # the joined result, before it is put in place (the segments are deleted right after)
    synced = [e[1] for e in events if e[0] == "fsync"]
    assert str(temp_path(out)) in synced and len(decode(out)) == 5


def test_audio_of_a_cut_input_stays_cut_when_a_finished_resumable_job_is_joined_later(tmp_path, monkeypatch, caplog):
    """A cut-off input, accepted: the audio ends with the last frame. That must hold too when the run that
    finished the frames died while joining them, and a later run only joins."""
    import streamvsr.video.stream as stream
    from test_video import audio_info

    clip = make_clip(tmp_path / "in.mkv", n=24, fps=24, audio="aac")  # 1 s of video and of audio
    input_breaks_at(monkeypatch, 12)
    clean = tmp_path / "clean.mkv"
    upscale_video(FakeEngine(), clip, clean, resume=True, allow_truncated=True, checkpoint_frames=4)
    out = tmp_path / "out.mkv"
    real_join = stream.join_segments

    def disk_full(parts, joined, **kwargs):
        joined.write_bytes(b"\x1a\x45\xdf\xa3" * 100)  # (begun, then the disk filled)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(stream, "join_segments", disk_full)
    with pytest.raises(OSError, match="No space"):
        upscale_video(FakeEngine(), clip, out, resume=True, allow_truncated=True, checkpoint_frames=4)
    # the half-joined file goes (it takes the space a join needs), and what is kept is said
    assert not temp_path(out).exists() and ResumeFiles(out).state.exists()
    assert f"all 12 frames of {out} are in its resume files: the same job run again with resume only joins them" \
        in caplog.text
    monkeypatch.setattr(stream, "join_segments", real_join)
    engine = FakeEngine()
    upscale_video(engine, clip, out, resume=True, allow_truncated=True, checkpoint_frames=4)
    assert engine.calls == [] and len(decode(out)) == len(decode(clean)) == 12
    assert audio_info(out)["seconds"] == audio_info(clean)["seconds"] < 0.6


def test_chunks_of_a_video_cut_after_a_keyframe_are_the_frames_a_decoder_makes(tmp_path):
    """A stream copy that starts after a keyframe: its first packets decode to nothing. Frame numbers (and so the
    chunks of Load Video Chunk) must count decoded frames, or chunks overlap and frames repeat."""
    from streamvsr.video.range import frame_index, read_range
    from streamvsr.video.reader import FrameReader

    whole, copy = tmp_path / "whole.mkv", tmp_path / "copy.mkv"
    c = av.open(str(whole), "w")
    v = c.add_stream("libx264", rate=24, options={"crf": "0", "x264-params": "keyint=8:min-keyint=8:bframes=0:"
                                                                              "scenecut=0"})
    v.width, v.height, v.pix_fmt = 32, 24, "yuv444p"
    for i in range(24):
        for p in v.encode(av.VideoFrame.from_ndarray(np.full((24, 32, 3), i * 10, np.uint8), format="rgb24")):
            c.mux(p)
    for p in v.encode():
        c.mux(p)
    c.close()
    with av.open(str(whole)) as src, av.open(str(copy), "w") as dst:
        out = dst.add_stream_from_template(src.streams.video[0])
        for k, packet in enumerate(src.demux(src.streams.video[0])):
            if packet.dts is not None and k > 0:  # the first keyframe is gone
                packet.stream = out
                dst.mux(packet)
    with FrameReader(copy) as reader:
        decoded = [frame for _, frame, _ in reader]
    index = frame_index(copy)
    assert index.count == len(decoded) == 16
    chunks = [read_range(copy, start, 5, to_end=start + 5 >= index.count) for start in range(0, index.count, 5)]
    assert torch.equal(torch.cat(chunks), torch.stack(decoded))


# ------------------------------------------------------------------------- 2. cut-off or corrupt input


@pytest.mark.parametrize("kind", ["mp4", "mkv"])
@pytest.mark.parametrize("resume", [False, True])
def test_truncated_input_is_reported_with_the_frames_kept(tmp_path, kind, resume):
    clip = tmp_path / f"full.{kind}"
    noise_clip(clip, n=6, fmt_options={"movflags": "faststart"} if kind == "mp4" else None)
    broken = cut(clip, 0.75, tmp_path / f"cut.{kind}")
    out = tmp_path / f"out.{kind}"
    with pytest.raises(InputDamagedError) as e:
        upscale_video(FakeEngine(), broken, out, resume=resume, checkpoint_frames=2)
    assert 0 < e.value.frames < 6
    message = str(e.value)
    assert any(f"{where} frame {e.value.frames}" in message for where in ("after", "stopped at", "cut off inside"))
    assert f"{out} was not written" in message and "--allow-truncated" in message
    assert not out.exists() and e.value.path == partial_path(out)
    assert len(decode(partial_path(out))) == e.value.frames
    # with resume the finished job stays, so accepting the input as the message suggests upscales nothing again
    # (it used to be deleted, and the whole video redone)
    job = [ResumeFiles(out).state.name, *(p.name for p in ResumeFiles(out).parts_on_disk())] if resume else []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([clip.name, broken.name, partial_path(out).name, *job])
    assert ("with resume on: the job's resume files are kept" in message) == resume
    # accepted on request: the decodable frames go to the output, and the summary says what was wrong
    engine = FakeEngine()
    summary = upscale_video(engine, broken, out, resume=resume, allow_truncated=True)
    assert summary["frames"] == e.value.frames and summary["input_problem"]
    assert len(decode(out)) == e.value.frames
    assert (engine.calls == []) == resume
    assert np.array_equal(np.stack(decode(out)), np.stack(decode(partial_path(out))))
    assert not ResumeFiles(out).state.exists() and not ResumeFiles(out).parts_on_disk()


def test_threaded_decoding_would_have_hidden_the_cut(tmp_path):
    """The control: FFmpeg's frame threading ends a cut-off MP4 without an error, so the reader must not use it."""
    clip = tmp_path / "full.mp4"
    noise_clip(clip, n=6, fmt_options={"movflags": "faststart"})
    broken = cut(clip, 0.75, tmp_path / "cut.mp4")
    with av.open(str(broken)) as c:
        c.streams.video[0].thread_type = "FRAME"
        c.streams.video[0].thread_count = 4  # (FFmpeg's automatic count is 1 on a one-CPU machine: no threading)
        threaded = sum(1 for _ in c.decode(video=0))  # no exception: the damage is swallowed
    assert 0 < threaded < 6


def _two_sizes(tmp_path):
    data = b""
    for w, h, n in ((32, 24, 3), (48, 32, 3)):  # two raw H.264 streams back to back: the size changes at frame 3
        part = tmp_path / f"p{w}.h264"
        c = av.open(str(part), "w", format="h264")
        v = c.add_stream("libx264", rate=24)
        v.width, v.height, v.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            for p in v.encode(av.VideoFrame.from_ndarray(np.full((h, w, 3), 40 * i, np.uint8), format="rgb24")):
                c.mux(p)
        for p in v.encode():
            c.mux(p)
        c.close()
        data += part.read_bytes()
    clip = tmp_path / "mixed.h264"
    clip.write_bytes(data)
    return clip


def test_a_video_copied_over_with_its_size_and_time_kept_is_another_video(tmp_path):
    """`cp -p` of another take of the same size over the input kept its path, size and time, which named it: the
    chunk loader's index served the old file's frames and an upscale node continued the old video's sequence."""
    from streamvsr.video.range import read_range, video_identity

    clip = make_clip(tmp_path / "take.mkv", n=6, audio=None, vcodec="ffv1")
    other = make_clip(tmp_path / "other.mkv", n=6, audio=None, vcodec="ffv1", cut_at=3)
    assert other.stat().st_size == clip.stat().st_size
    before, first = video_identity(clip), read_range(clip, 0, 6)
    st = os.stat(clip)
    shutil.copyfile(other, clip)
    os.utime(clip, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert video_identity(clip) != before
    again = read_range(clip, 0, 6)
    assert torch.equal(again, read_range(other, 0, 6)) and not torch.equal(again, first)


def stopped_job(tmp_path):
    """A resumable job of a 6-frame clip stopped after 3 frames: (input, output)."""
    clip = make_clip(tmp_path / "in.mkv", n=6, audio=None, vcodec="ffv1")
    out = tmp_path / "out.mkv"
    polls = []
    upscale_video(FakeEngine(), clip, out, codec="lossless", resume=True, checkpoint_frames=1,
                  should_stop=lambda: polls.append(1) or len(polls) > 3)
    return clip, out


def test_an_output_with_resume_files_left_next_to_it_says_what_they_are(tmp_path, monkeypatch):
    """A run cut off (a power cut, a kill) between publishing its output and removing its resume files left them;
    the same command then said only that the output exists. It now says they are left over from the run that wrote
    it; and next to a file of another origin, that the unfinished job there continues with --resume."""
    clip, out = stopped_job(tmp_path)
    with pytest.raises(UserInputError, match="unfinished resumable job"):  # without --resume: as before
        upscale_video(FakeEngine(), clip, out, codec="lossless")
    out.write_bytes(b"another run's file")
    with pytest.raises(OutputExistsError, match=r"an unfinished resumable job of it is there too \(3 frames done, "
                                                r"out\.mkv\.streamvsr-resume\.safetensors\): --resume --overwrite "
                                                r"with its settings continues that job and puts its result in place "
                                                r"of out\.mkv$"):
        upscale_video(FakeEngine(), clip, out, codec="lossless", resume=True)
    assert upscale_video(FakeEngine(), clip, out, codec="lossless", resume=True, overwrite=True)["resumed_from"] == 3
    assert not ResumeFiles(out).state.exists()
    done = decode(out)

    monkeypatch.setattr(ResumeFiles, "remove", lambda self: None)  # cut off right after the output is in place
    again = tmp_path / "again.mkv"
    upscale_video(FakeEngine(), clip, again, codec="lossless", resume=True)
    assert ResumeFiles(again).state.exists()
    with pytest.raises(OutputExistsError, match=r"again\.mkv already exists; add --overwrite .*; the resume files next "
                                                r"to it \(again\.mkv\.streamvsr-resume\.safetensors and its segments\) "
                                                r"are left from the run that wrote it: delete them once again\.mkv"):
        upscale_video(FakeEngine(), clip, again, codec="lossless", resume=True)
    assert all(np.array_equal(a, b) for a, b in zip(decode(again), done))
    # a finished job next to an older file (its join failed, and that file is another's): not to be deleted
    os.utime(again, (1, 1))
    with pytest.raises(OutputExistsError, match=r"; a finished resumable job of it is there too \(6 frames done, .*: "
                                                r"--resume --overwrite with its settings continues that job"):
        upscale_video(FakeEngine(), clip, again, codec="lossless", resume=True)


def checkpoint_contents(state):
    """(tensors, metadata) of a resume file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(state), "pt") as f:
        meta = f.metadata()
    return load_file(str(state)), meta


@pytest.mark.parametrize("edit", [{"segments": 10**30}, {"segments": -1}, {"complete": "false"},
                                  {"consumed": 10**12, "frames": 10**12 + 1}, {"held_pts": ["x"]},
                                  {"held_pts": [1.5e300]}, {"end_time": "x"}, {"input_problem": 5},
                                  {"segment_bytes": 5}, {"frames": -2}, {"after": [[1]]}])
def test_a_resume_file_edited_or_damaged_is_a_one_line_error(tmp_path, edit):
    """Read as they were, such files hung a run (a billion segments to look for), gave a short video and success,
    or a traceback after all the work."""
    from safetensors.torch import save_file

    clip, out = stopped_job(tmp_path)
    state = ResumeFiles(out).state
    tensors, meta = checkpoint_contents(state)
    info = {**json.loads(meta["streamvsr_resume"]), **edit}
    save_file(tensors, str(state), metadata={**meta, "streamvsr_resume": json.dumps(info)})
    engine = FakeEngine()
    with pytest.raises(UserInputError, match="the resume file .* is damaged .*; add --overwrite to discard the job"):
        upscale_video(engine, clip, out, codec="lossless", resume=True)
    assert engine.calls == []


def test_a_job_resumed_with_another_model_family_is_told_as_such_and_overwrite_discards_it(tmp_path):
    """Its state was read first, by the other model: "damaged", and --overwrite could not discard it."""
    clip, out = stopped_job(tmp_path)

    class OtherFamily(FakeEngine):
        def identity(self):
            return "flashvsr|v1.1|torch.float32|scale=4"

        def state_from_dict(self, tensors, meta):
            raise KeyError("dit")

    with pytest.raises(UserInputError, match="belongs to a job with other settings \\(another model: fake then, flashvsr now\\)"):
        upscale_video(OtherFamily(), clip, out, codec="lossless", resume=True)
    engine = OtherFamily()
    assert upscale_video(engine, clip, out, codec="lossless", resume=True, overwrite=True)["frames"] == 6
    assert engine.calls[0][0] == 0  # started over


@pytest.mark.parametrize("damage", ["shape", "nan", "generator"])
def test_a_resume_files_state_that_cannot_be_its_frames_is_refused_before_the_work(tmp_path, damage):
    """A previous frame of another size failed mid-frame with a traceback; one of NaN gave garbage and success."""
    from safetensors.torch import save_file

    clip, out = stopped_job(tmp_path)
    state = ResumeFiles(out).state
    tensors, meta = checkpoint_contents(state)
    if damage == "shape":
        tensors["prev_output"] = torch.zeros(1, 3, 2, 2)
    elif damage == "nan":
        tensors["prev_upscaled"] = torch.full_like(tensors["prev_upscaled"], float("nan"))
    else:
        tensors["generator_state"] = tensors["generator_state"][:10].clone()
    save_file(tensors, str(state), metadata=meta)
    engine = FakeEngine()
    with pytest.raises(UserInputError, match="is damaged or does not fit this model .*; add --overwrite to discard "
                                             "the job and start over"):
        upscale_video(engine, clip, out, codec="lossless", resume=True)
    assert engine.calls == []
    # as it says (it asked to delete the file, and --overwrite could not discard it)
    assert upscale_video(engine, clip, out, codec="lossless", resume=True, overwrite=True)["frames"] == 6
    assert engine.calls[0][0] == 0 and not state.exists()


@pytest.mark.parametrize("resume", [False, True])
def test_frame_size_change_mid_video_stops_with_a_labelled_partial(tmp_path, resume):
    clip = _two_sizes(tmp_path)
    out = tmp_path / "out.mkv"
    engine = FakeEngine()
    with pytest.raises(InputDamagedError, match="changes its frame size at frame 3, from 32x24 to 48x32") as e:
        upscale_video(engine, clip, out, codec="lossless", allow_truncated=True, resume=resume)  # not acceptable
    assert "--allow-truncated" not in str(e.value)
    assert len(engine.calls) == 3 and not out.exists()
    assert len(decode(partial_path(out))) == 3
    # a resumable job's files are kept only where the input can be accepted: here they would never be of use
    assert not ResumeFiles(out).state.exists() and not ResumeFiles(out).parts_on_disk()


@pytest.mark.parametrize("start,count,to_end", [(0, 6, True), (2, 2, False), (3, 3, True)])
def test_a_chunk_across_or_after_a_frame_size_change_is_a_one_line_error(tmp_path, start, count, to_end):
    from streamvsr.video.range import read_range

    clip = _two_sizes(tmp_path)
    assert read_range(clip, 0, 3).shape == (3, 3, 24, 32)
    with pytest.raises(UserInputError, match="changes its frame size at frame 3, from 32x24 to 48x32"):
        read_range(clip, start, count, to_end=to_end)


def _joined_recordings(tmp_path):
    """Two transport streams of 50 and 30 frames (25 fps, with audio), each with its own clock from 0, joined byte
    by byte (``cat a.ts b.ts``, as camcorder clips are): the timestamps jump back by about 2 s at frame 50."""
    data = b""
    for n, shade in ((50, 40), (30, 200)):
        part = tmp_path / f"part{n}.ts"
        with av.open(str(part), "w") as c:
            v = c.add_stream("libx264", rate=25, options={"g": "10"})
            v.width, v.height, v.pix_fmt = 32, 24, "yuv420p"
            a = c.add_stream("mp2", rate=48000)
            a.layout = "stereo"
            for i in range(n):
                for p in v.encode(av.VideoFrame.from_ndarray(np.full((24, 32, 3), shade, np.uint8), format="rgb24")):
                    c.mux(p)
                sound = av.AudioFrame.from_ndarray(np.zeros((1, 2 * 1920), np.int16), format="s16", layout="stereo")
                sound.sample_rate, sound.pts = 48000, 1920 * i
                for p in a.encode(sound):
                    c.mux(p)
            for p in list(v.encode()) + list(a.encode()):
                c.mux(p)
        data += part.read_bytes()
    clip = tmp_path / "joined.ts"
    clip.write_bytes(data)
    return clip


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_timestamps_that_jump_back_stop_with_a_labelled_partial(tmp_path, suffix):
    """Frames after the jump used to be squeezed one tick apart after the last one before it, and the audio,
    copied with its own timestamps, went back in time: the MP4 muxer refused it with a traceback."""
    clip = _joined_recordings(tmp_path)
    out = tmp_path / f"out{suffix}"
    engine = Identity()
    with pytest.raises(InputDamagedError, match=r"joined\.ts's timestamps jump back by 1\.9\d\d s at frame 50, as in "
                                                "files joined end to end") as e:
        upscale_video(engine, clip, out, allow_truncated=True)  # not acceptable: the rest needs a clock of its own
    assert "--allow-truncated" not in str(e.value) and not out.exists()
    with av.open(str(partial_path(out))) as c:
        video = [(float(f.time), int(f.to_rgb().to_ndarray()[8, 8, 0])) for f in c.decode(video=0)]
        c.seek(0)
        audio = [float(p.pts * p.time_base) for p in c.demux(audio=0) if p.pts is not None]
    assert len(video) == 50 and all(abs(shade - 40) <= 2 for _, shade in video)
    assert np.allclose(np.diff([t for t, _ in video]), 1 / 25, atol=1e-3)
    assert audio and video[0][0] - 0.05 <= min(audio) and max(audio) <= video[-1][0] + 0.05


def test_a_video_index_refuses_timestamps_that_jump_back(tmp_path):
    """Sorting them would number the frames after the jump among those before it (Load Video Chunk)."""
    from streamvsr.video.range import frame_index

    with pytest.raises(UserInputError, match=r"jump back by 1\.9\d\d s at frame 50, .* concat demuxer"):
        frame_index(_joined_recordings(tmp_path))


def test_unreadable_inputs_are_one_line_errors_before_any_work(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("this is not a video\n" * 50)
    a = av.open(str(tmp_path / "audio.m4a"), "w")
    s = a.add_stream("aac", rate=16000)
    s.layout = "mono"
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
    frame.sample_rate, frame.pts = 16000, 0
    for p in list(s.encode(frame)) + list(s.encode()):
        a.mux(p)
    a.close()
    clip = tmp_path / "full.mp4"
    noise_clip(clip, n=4, fmt_options={"movflags": "faststart"})
    cut(clip, 0.3, tmp_path / "head.mp4")  # not even the first frame survives
    cases = {"missing.mp4": "does not exist", "empty.mp4": "is empty", "text.mp4": "cannot be read as a video",
             "audio.m4a": "has no video stream", "head.mp4": "first frame", ".": "is a folder"}
    for name, message in cases.items():
        engine = FakeEngine()
        with pytest.raises(UserInputError, match=message):
            upscale_video(engine, tmp_path / name, tmp_path / "o.mp4")
        assert engine.calls == []
    assert not (tmp_path / "o.mp4").exists()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="file permissions do not bind root")
def test_unreadable_input_and_unwritable_folder(tmp_path):
    clip = make_clip(tmp_path / "in.mp4", n=2, audio=None)
    locked = tmp_path / "locked.mp4"
    locked.write_bytes(clip.read_bytes())
    locked.chmod(0)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(UserInputError, match="permission denied"):
            upscale_video(FakeEngine(), locked, tmp_path / "o.mp4")
        for out in (ro / "o.mp4", ro / "sub" / "o.mp4"):
            with pytest.raises(UserInputError, match="no permission to write"):
                upscale_video(FakeEngine(), clip, out)
    finally:
        locked.chmod(0o644)
        ro.chmod(0o755)


@pytest.mark.skipif(not hasattr(os, "statvfs"), reason="no statvfs to tell a read-only file system")
def test_a_read_only_file_system_is_told_as_such_not_as_a_permission(tmp_path, monkeypatch):
    """A drive mounted read-only (or write-protected) was "no permission to write", sending users to chmod/sudo."""
    import streamvsr.video.outputs as outputs

    clip = make_clip(tmp_path / "in.mp4", n=2, audio=None)
    drive = tmp_path / "drive"
    drive.mkdir()
    monkeypatch.setattr(outputs.os, "access", lambda path, mode: Path(path) != drive)
    real_statvfs = os.statvfs
    monkeypatch.setattr(outputs.os, "statvfs", lambda path: SimpleNamespace(f_flag=os.ST_RDONLY)
                        if Path(path) == drive else real_statvfs(path))
    for out in (drive / "o.mp4", drive / "sub" / "o.mp4"):
        with pytest.raises(UserInputError, match=f"cannot write to {out.parent}: {drive} is on a read-only file "
                                                 "system \\(a write-protected or read-only mounted drive\\)"):
            upscale_video(FakeEngine(), clip, out)
    monkeypatch.setattr(outputs.os, "statvfs", real_statvfs)  # (the control: a folder one may not write to)
    with pytest.raises(UserInputError, match=f"no permission to write in {drive}$"):
        upscale_video(FakeEngine(), clip, drive / "o.mp4")


def test_a_lock_that_cannot_be_written_on_a_full_disk_names_its_file_and_leaves_none(tmp_path, monkeypatch):
    """A disk with no byte free: "No space left on device" alone, and an empty lock file left behind."""
    import streamvsr.video.outputs as outputs

    real_write = os.write

    def write(fd, data):
        if bytes(data).startswith(b"process "):  # (the lock's holder line)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(outputs.os, "write", write)
    out = tmp_path / "o.mp4"
    with pytest.raises(OSError, match="No space left on device") as e:
        with OutputLock(out):
            pass
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(lock_path(out))
    assert list(tmp_path.iterdir()) == []


def test_damaged_resume_file_and_other_settings_are_found_without_the_model(tmp_path):
    clip = make_clip(tmp_path / "in.mp4", n=6, audio=None)
    out = tmp_path / "out.mkv"
    polls = []
    upscale_video(FakeEngine(), clip, out, codec="lossless", resume=True, checkpoint_frames=2,
                  should_stop=lambda: polls.append(1) or len(polls) > 3)
    with pytest.raises(UserInputError, match="seed 42 then, 7 now.*add --overwrite to discard it"):
        check_video_job(clip, out, seed=7, codec="lossless", resume=True)  # no engine needed
    state = ResumeFiles(out).state
    state.write_bytes(state.read_bytes()[:40])
    with pytest.raises(UserInputError, match="is damaged.*; add --overwrite to discard the job and start over"):
        check_video_job(clip, out, codec="lossless", resume=True)
    # as the message says: the job starts over
    engine = FakeEngine()
    assert upscale_video(engine, clip, out, codec="lossless", resume=True, overwrite=True)["frames"] == 6
    assert [index for index, _, _ in engine.calls] == list(range(6)) and not state.exists()


def gop_clip(path, fmt, codec, n=24, w=32, h=24, options=None, pix_fmt="yuv420p", container_options=None):
    """Smooth moving content (so that encoders make P- and B-frames, unlike noise) with a keyframe every 5
    frames and B-frames where the codec has them."""
    from test_video import _pattern

    with av.open(str(path), "w", format=fmt, options=container_options or {}) as c:
        v = c.add_stream(codec, rate=24, options={"g": "5", **(options or {})})
        v.width, v.height, v.pix_fmt = w, h, pix_fmt
        for i in range(n):
            for packet in v.encode(av.VideoFrame.from_ndarray(_pattern(i, w, h), format="rgb24")):
                c.mux(packet)
        for packet in v.encode():
            c.mux(packet)
    return path


@pytest.mark.parametrize("name, fmt, codec, options", [
    ("gop.mp4", "mp4", "libx264", {"bf": "2"}), ("gop.mkv", "matroska", "libx264", {"bf": "2"}),
    ("gop.avi", "avi", "mpeg4", None), ("gop.mpg", "mpeg", "mpeg2video", {"bf": "2"}),
    ("gop.ts", "mpegts", "libx264", {"bf": "2"}), ("vfr.mp4", None, None, None), ("phone.mkv", None, None, None)])
def test_a_resumed_job_seeks_to_its_frame_and_reads_what_a_decode_from_the_start_reads(tmp_path, name, fmt, codec,
                                                                                       options):
    """A resumed job no longer decodes the input up to where it stopped (minutes for a long video): it seeks. From
    any frame, the frames, their numbers and their timestamps are those of a decode from the beginning, or the
    seek is not used (MPEG transport streams land elsewhere for early frames)."""
    from streamvsr.video.range import seek_to

    path = tmp_path / name
    if name == "vfr.mp4":
        make_clip(path, n=12, audio=None, pts=[0, 1, 3, 4, 8, 9, 10, 15, 16, 17, 20, 21])
    elif name == "phone.mkv":
        if not hasattr(av.video.stream.VideoStream, "set_display_rotation"):
            pytest.skip("this PyAV cannot write a display matrix")
        noise_clip(path, n=8, w=16, h=8, codec="ffv1", rotation=90)
    else:
        gop_clip(path, fmt, codec, options=options)
    with FrameReader(str(path)) as reader:
        whole = list(reader)
    began = []
    assert seek_to(str(tmp_path / "gone.mp4"), 3) is None  # (moved away after the checks: decoded as before)
    for start in range(1, len(whole)):
        seeked = seek_to(str(path), start)
        began.append(None if seeked is None else seeked.began)
        with FrameReader(str(path), start=start, seeked=seeked) as reader:
            got = [(i, f, pts) for i, f, pts in reader if i >= start]
        assert [(i, pts) for i, _, pts in got] == [(i, pts) for i, _, pts in whole[start:]], start
        assert all(torch.equal(a, b) for (_, a, _), (_, b, _) in zip(got, whole[start:])), start
        assert seeked is None or seeked.began <= start
    if name in ("gop.mp4", "gop.mkv", "gop.avi"):  # (vfr.mp4 has one keyframe, phone.mkv one cluster)
        assert max(b for b in began if b is not None) >= len(whole) - 6, began  # it does seek


def test_an_intra_stream_with_timestamps_out_of_file_order_is_read_in_file_order_everywhere(tmp_path):
    """A decoder that does not reorder (MJPEG) gives frames in file order, so where the file's timestamps are out of
    order, frame numbers are those of the file order, not of the sorted timestamps: neither a resume nor a chunk
    may seek by the sorted ones (the 5th frame by timestamp is not the 5th frame)."""
    from streamvsr.video.range import frame_index, read_range, seek_to
    from test_video import _pattern

    time_base, order = Fraction(1, 1000), [0, 40, 80, 120, 320, 160, 200, 240, 280, 360, 400, 440]
    path = tmp_path / "shuffled.mkv"
    with av.open(str(path), "w", format="matroska") as c:
        v = c.add_stream("mjpeg", rate=25)
        v.width, v.height, v.pix_fmt = 32, 24, "yuvj420p"
        v.codec_context.time_base = v.time_base = time_base
        packets = []
        for i in range(len(order)):
            frame = av.VideoFrame.from_ndarray(_pattern(i, 32, 24), format="rgb24").reformat(format="yuvj420p")
            frame.pts, frame.time_base = 40 * i, time_base
            packets += list(v.encode(frame))
        packets += list(v.encode())
        for k, packet in enumerate(packets):
            packet.pts, packet.dts = order[k] + 100, 40 * k + 60
            c.mux(packet)
    with FrameReader(str(path)) as reader:
        whole = list(reader)
    assert [pts for _, _, pts in whole][3:6] == [220, 420, 421]  # file order, the later ones nudged
    assert frame_index(str(path)).pts is None
    for start in (2, 5, 8):
        assert seek_to(str(path), start) is None
        assert torch.equal(read_range(str(path), start, 3), torch.stack([f for _, f, _ in whole[start:start + 3]]))


def test_a_resumed_read_ends_where_a_read_from_the_beginning_ends(tmp_path):
    """An AVI gives packet durations only after a seek: a resumed read must not use them where a read from the
    beginning has none, or the two disagree on whether the file was cut off (with a millisecond time base the
    AVI claims 1000 frames a second, and a frame without a duration lasted as long as the one before it)."""
    from streamvsr.video.range import frame_index, seek_to

    time_base = Fraction(1, 1000)
    for name, stamps in (("steady.avi", [40 * i for i in range(16)]),
                         ("uneven.avi", [0, 40, 80, 200, 240, 250, 260, 400, 440, 480, 520, 530, 540, 700, 740, 780])):
        path = tmp_path / name
        with av.open(str(path), "w") as c:
            v = c.add_stream("mjpeg", rate=25)
            v.width, v.height, v.pix_fmt = 32, 24, "yuvj420p"
            v.codec_context.time_base = v.time_base = time_base
            for i, pts in enumerate(stamps):
                frame = av.VideoFrame.from_ndarray(np.full((24, 32, 3), 15 * i, np.uint8), format="rgb24")
                frame = frame.reformat(format="yuvj420p")
                frame.pts, frame.time_base = pts, time_base
                for packet in v.encode(frame):
                    c.mux(packet)
            for packet in v.encode():
                c.mux(packet)
        with FrameReader(str(path)) as reader:
            whole = list(reader)
            assert len(whole) == 16 and reader.problem is None, name  # complete: not "ends early"
            end = reader._end
        assert frame_index(str(path)).problem is None, name  # nor in Load Video Chunk's warning
        for start in (1, 5, 15):
            seeked = seek_to(str(path), start)
            assert seeked is not None
            with FrameReader(str(path), start=start, seeked=seeked) as reader:
                assert [(i, pts) for i, _, pts in reader] == [(i, pts) for i, _, pts in whole[start:]]
                assert reader.problem is None and reader._end == end, (name, start)


@pytest.mark.parametrize("name", ["camera.avi", "camera.mov"])
def test_a_file_cut_inside_its_last_frame_ends_before_it_whatever_the_reader(tmp_path, name):
    """MJPEG (old cameras) conceals a frame cut short with whatever its buffer held, the frame decoded before it:
    garbage, and garbage that depends on where decoding began. The demuxer marks that last packet corrupt: every
    reader stops before it, and says the file is cut off (an AVI said nothing at all)."""
    from streamvsr.video.range import frame_index, read_range, seek_to

    whole = gop_clip(tmp_path / f"whole.{name}", None, "mjpeg", n=20, w=64, h=48, pix_fmt="yuvj420p",
                     container_options={"movflags": "faststart"} if name.endswith(".mov") else None)
    with FrameReader(str(whole)) as reader:
        frames = list(reader)
    cut_file = cut(whole, 0.93, tmp_path / name)
    with FrameReader(str(cut_file)) as reader:
        got = list(reader)
        problem = reader.problem
    n = len(got)
    assert 10 < n < 20 and problem is not None and problem.kind == "truncated"
    assert problem.message == f"{cut_file} ends early: it is cut off inside frame {n}"
    assert all(torch.equal(a, b) for (_, a, _), (_, b, _) in zip(got, frames))
    index = frame_index(str(cut_file))
    assert index.count == n and index.problem == problem.message
    assert torch.equal(read_range(str(cut_file), n - 3, 10, to_end=True), torch.stack([f for _, f, _ in got[-3:]]))
    for start in range(1, n):
        with FrameReader(str(cut_file), start=start, seeked=seek_to(str(cut_file), start)) as reader:
            assert [(i, pts) for i, _, pts in reader] == [(i, pts) for i, _, pts in got[start:]]
            assert reader.problem == problem


def test_a_resumed_job_that_seeks_equals_one_that_ran_through(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    clip = gop_clip(tmp_path / "in.mp4", "mp4", "libx264", n=30, options={"bf": "2"})
    whole = tmp_path / "whole.mkv"
    upscale_video(FakeEngine(), clip, whole, codec="lossless")
    for stop_after in (4, 13, 22):
        out = tmp_path / f"out{stop_after}.mkv"
        polls = []
        upscale_video(FakeEngine(), clip, out, codec="lossless", resume=True, checkpoint_frames=3,
                      should_stop=lambda: polls.append(1) or len(polls) > stop_after)
        summary = upscale_video(FakeEngine(), clip, out, codec="lossless", resume=True)
        assert summary["resumed_from"] == stop_after and summary["frames"] == 30
        assert np.array_equal(np.stack(decode(out)), np.stack(decode(whole)))
    assert "cannot be seeked exactly" not in caplog.text


def test_a_damaged_resume_segment_is_a_one_line_error_found_before_the_work_where_it_is_cut_short(tmp_path):
    """A segment cut short (a copy or a disk that lost its end) is found by its size before the model loads; one
    damaged inside (same size) only when joining, but still in one line that says what to do, not a TypeError."""
    clip = make_clip(tmp_path / "in.mp4", n=8, audio=None)
    out = tmp_path / "out.mkv"
    files = ResumeFiles(out)
    polls = []
    upscale_video(FakeEngine(), clip, out, codec="lossless", resume=True, checkpoint_frames=2,
                  should_stop=lambda: polls.append(1) or len(polls) > 5)
    assert files.read_info()["segments"] >= 2
    first, second = files.part(0), files.part(1)
    good = first.read_bytes()
    first.write_bytes(good[: len(good) // 2])
    with pytest.raises(UserInputError, match=f"segment {first} is damaged \\({len(good) // 2} bytes, where it was "
                                             f"written with {len(good)}\\); delete out.mkv.streamvsr-resume"):
        check_video_job(clip, out, codec="lossless", resume=True)  # no engine needed
    assert check_video_job(clip, out, codec="lossless", resume=True, overwrite=True).discard_unfinished
    first.write_bytes(bytes(64) + good[64:])
    with pytest.raises(UserInputError, match="segment .*part0000.nut is damaged.*delete out.mkv.streamvsr-resume"):
        upscale_video(FakeEngine(), clip, out, codec="lossless", resume=True)
    first.write_bytes(good)
    second.unlink()
    with pytest.raises(UserInputError, match="needs .*part0001.nut, which is gone"):
        check_video_job(clip, out, codec="lossless", resume=True)
    files.state.unlink()
    upscale_video(FakeEngine(), clip, out, codec="lossless", resume=True)
    assert np.array_equal(np.stack(decode(out)), np.stack(expected_frames(FakeEngine(), clip)))


UNREADABLE = textwrap.dedent("""
    import importlib.util, os, sys
    spec = importlib.util.spec_from_file_location("streamvsr", sys.argv[1] + "/__init__.py",
                                                  submodule_search_locations=[sys.argv[1]])
    module = importlib.util.module_from_spec(spec); sys.modules["streamvsr"] = module; spec.loader.exec_module(module)
    from streamvsr.models.flashvsr import load_pipeline
    from streamvsr.models.shared.errors import StreamVSRError
    from streamvsr.models.shared.weights import read_state_dict
    from streamvsr.video.resume import ResumeFiles
    files = ResumeFiles(sys.argv[3])
    for attempt in (lambda: read_state_dict(sys.argv[2], hint="Download it from X."), files.read_info,
                    lambda: (os.chmod(files.state, 0o600), files.check_segments(files.read_info())),
                    lambda: load_pipeline(sys.argv[4])):  # (the version taken from what the files say)
        try:
            attempt()
            print("read")
        except StreamVSRError as e:
            print(e)
""")


def test_files_without_read_permission_are_said_so_not_called_damaged(tmp_path):
    """safetensors reports any failure to open a file as "No such file", and FFmpeg's permission error looked like
    damage: the advice for either (delete it, download it or redo the work) would cost the user hours. A file the
    user may not read is said to be that. Root reads anything, so as root the check drops that privilege."""
    from safetensors.torch import save_file

    weights = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(2)}, str(weights))
    clip = make_clip(tmp_path / "in.mp4", n=6, audio=None)
    out = tmp_path / "out.mkv"
    files = ResumeFiles(out)
    polls = []
    upscale_video(FakeEngine(), clip, out, codec="lossless", resume=True, checkpoint_frames=2,
                  should_stop=lambda: polls.append(1) or len(polls) > 3)
    from flashvsr_helpers import write_official_folder

    flashvsr = tmp_path / "FlashVSR"
    write_official_folder(flashvsr)
    lq = flashvsr / "LQ_proj_in.ckpt"
    for path in (weights, files.state, files.part(0), lq):
        path.chmod(0)
    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root, and setpriv (util-linux) is not there to give up root's right to read")
        # (the inherited and ambient sets too: older container runtimes would hand the right back on exec)
        prefix = ["setpriv", "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set",
                  "-dac_override,-dac_read_search"]
    if subprocess.run([*prefix, sys.executable, "-c", f"open({str(weights)!r}, 'rb')"],
                      capture_output=True).returncode == 0:
        pytest.skip("this process cannot give up the right to read any file (a container without CAP_SETPCAP)")
    result = subprocess.run([*prefix, sys.executable, "-c", UNREADABLE, str(ROOT), str(weights), str(out),
                             str(flashvsr)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines == [
        f"cannot read {weights} (Permission denied; give the user that runs this read access to it)",
        f"cannot read {files.state} (Permission denied; give the user that runs this read access to it); the "
        "finished work is kept for when it can be read",
        f"cannot read {files.part(0)} (Permission denied; give the user that runs this read access to it); the "
        "finished work is kept for when it can be read",
        f"cannot read {lq} (Permission denied; give the user that runs this read access to it)"], result.stdout


def test_a_checkpoint_that_cannot_be_written_is_the_systems_error_naming_the_file(tmp_path):
    """safetensors reports a full disk or a file-size limit in its own exception type, without the file: it comes
    out as the OSError it is (the command line prints those in one line, with advice), naming the checkpoint."""
    import errno

    clip = make_clip(tmp_path / "in.mp4", n=4, audio=None)
    out = tmp_path / "out.mkv"

    class Blocked(FakeEngine):
        def step(self, frame, state):
            if state.frame_index == 0:  # (after the run cleared its old work files)
                ResumeFiles(out).state_tmp.mkdir()  # in the checkpoint's way, as a full disk would be
            return super().step(frame, state)

    with pytest.raises(OSError) as e:
        upscale_video(Blocked(), clip, out, codec="lossless", resume=True, checkpoint_frames=2)
    assert e.value.errno == errno.EISDIR and e.value.filename == str(ResumeFiles(out).state_tmp)


class Settings(FakeEngine):
    """An engine whose identity names its options, as the real ones do (``identity()``)."""

    def __init__(self, steps=4, weights="1.5"):
        super().__init__()
        self.name = f"stream-diffvsr|torch.float32|steps={steps}|{weights}|flow=raft,updates=12,downscale=1,2.5"

    def identity(self):
        return self.name


@pytest.mark.parametrize("engine, differs", [(Settings(steps=2), "steps 4 then, 2 now"),
                                             (Settings(weights="9"), "another model"),
                                             (FakeEngine(), "another model: stream-diffvsr then, fake now")])
def test_resume_with_other_settings_names_them_and_overwrite_discards_the_job(tmp_path, engine, differs):
    """--resume --overwrite starts the job again where its settings changed (as --overwrite's help says: it
    discards an unfinished job), also where only the model's part of them did, known once it is loaded."""
    clip = make_clip(tmp_path / "in.mp4", n=6, audio=None)
    out = tmp_path / "out.mkv"
    polls = []
    upscale_video(Settings(), clip, out, codec="lossless", resume=True, checkpoint_frames=2,
                  should_stop=lambda: polls.append(1) or len(polls) > 3)
    assert ResumeFiles(out).read_info()["frames"] == 3
    with pytest.raises(UserInputError, match=f"\\({differs}\\); run with the same settings.*--overwrite"):
        upscale_video(engine, clip, out, codec="lossless", resume=True)
    summary = upscale_video(engine, clip, out, codec="lossless", resume=True, overwrite=True)
    assert summary["resumed_from"] == 0 and summary["frames"] == 6 and not ResumeFiles(out).state.exists()
    assert np.array_equal(np.stack(decode(out)), np.stack(expected_frames(engine, clip)))
    out.unlink()
    polls.clear()
    upscale_video(Settings(), clip, out, codec="lossless", resume=True, checkpoint_frames=2, scene_cut_threshold=0.3,
                  should_stop=lambda: polls.append(1) or len(polls) > 3)
    with pytest.raises(UserInputError, match="scene cut 0.3 then, off now"):
        check_video_job(clip, out, codec="lossless", resume=True)
    assert check_video_job(clip, out, codec="lossless", resume=True, overwrite=True).discard_unfinished


def test_option_mistakes_are_one_line_errors(tmp_path):
    clip = make_clip(tmp_path / "in.mp4", n=2, audio=None)
    for kwargs, message in (({"crf": -5}, "0 to 51"), ({"crf": 20, "codec": "lossless"}, "has no such setting"),
                            ({"seed": 2**64}, "2\\^64-1"), ({"seed": -1}, "2\\^64-1"),
                            ({"scene_cut_threshold": 2.0}, "scene-cut"), ({"codec": "h265"}, "codec must be")):
        out = tmp_path / ("o.mkv" if kwargs.get("codec") == "lossless" else "o.mp4")
        with pytest.raises(UserInputError, match=message):
            upscale_video(FakeEngine(), clip, out, **kwargs)
    blocked = tmp_path / "file"
    blocked.write_text("x")
    with pytest.raises(UserInputError, match="is a file"):
        upscale_video(FakeEngine(), clip, blocked / "sub" / "o.mp4")


# -------------------------------------------------------------------- 3. as meant to be seen, full precision


@pytest.mark.skipif(not hasattr(av.video.stream.VideoStream, "set_display_rotation"),
                    reason="this PyAV cannot write a display matrix")
@pytest.mark.parametrize("rotation,hflip,turn", [
    (90, False, lambda a: np.rot90(a, 1)),      # PyAV: degrees counter-clockwise; np.rot90 turns counter-clockwise
    (-90, False, lambda a: np.rot90(a, -1)),
    (180, False, lambda a: np.rot90(a, 2)),
    (90, True, lambda a: np.fliplr(np.rot90(a, 1))),  # PyAV: the mirror applies after the rotation
])
def test_rotated_input_comes_out_as_it_is_shown(tmp_path, rotation, hflip, turn):
    clip = tmp_path / "phone.mkv"
    frames = noise_clip(clip, n=2, w=16, h=8, codec="ffv1", rotation=rotation, hflip=hflip)
    with av.open(str(clip)) as c:  # what was written really carries the matrix
        assert next(c.decode(video=0)).rotation == (rotation if rotation != 180 else -180)
    out = tmp_path / "out.mkv"
    summary = upscale_video(Identity(), clip, out, codec="lossless")
    want = [nearest4(turn(f)) for f in frames]
    assert summary["size"] == (want[0].shape[1], want[0].shape[0])
    got = decode(out)
    assert [g.shape for g in got] == [w.shape for w in want]
    assert all(np.array_equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("rotation,turn", [(90, lambda a: np.rot90(a, 1)), (-90, lambda a: np.rot90(a, -1)),
                                           (180, lambda a: np.rot90(a, 2)), (270, lambda a: np.rot90(a, -1))])
def test_a_rotation_given_without_a_display_matrix_turns_the_same_way(rotation, turn):
    """Older PyAV/FFmpeg give only the frame's rotation (counter-clockwise) or the stream's legacy ``rotate`` tag
    (clockwise), no display matrix: the same turn as the matrix would give."""
    import types

    from streamvsr.video.reader import _frame_orientation

    a = np.arange(6).reshape(2, 3)
    stream = types.SimpleNamespace(metadata={})
    found = _frame_orientation(types.SimpleNamespace(side_data=[], rotation=rotation), stream)
    assert np.array_equal(found.apply(torch.from_numpy(a)).numpy(), turn(a))
    tagged = types.SimpleNamespace(metadata={"rotate": str(-rotation % 360)})
    found = _frame_orientation(types.SimpleNamespace(side_data=[]), tagged)
    assert np.array_equal(found.apply(torch.from_numpy(a)).numpy(), turn(a))


def _avi_with_audio(path, n, drop_after=None):
    """An AVI of ``n`` FFV1 frames (24 fps) and PCM audio; an empty chunk after packet ``drop_after``: a frame
    that a capture program dropped, which the header counts and which decodes to nothing."""
    c = av.open(str(path), "w")
    v = c.add_stream("ffv1", rate=24)
    v.width, v.height, v.pix_fmt = 16, 8, "bgr0"
    a = c.add_stream("pcm_s16le", rate=8000)
    a.layout = "mono"
    rng = np.random.default_rng(0)
    packets = [p for _ in range(n) for p in v.encode(av.VideoFrame.from_ndarray(
        rng.integers(0, 256, (8, 16, 3), dtype=np.uint8), format="rgb24"))] + list(v.encode())
    t = 0
    for i, packet in enumerate(packets):
        packet.pts = packet.dts = t
        t += 1
        c.mux(packet)
        if i == drop_after:
            empty = av.Packet(b"")
            empty.stream, empty.pts, empty.dts, empty.time_base = v, t, t, packet.time_base
            t += 1
            c.mux(empty)
    tone = av.AudioFrame.from_ndarray(np.zeros((1, 8000 * t // 24), np.int16), format="s16", layout="mono")
    tone.sample_rate, tone.pts = 8000, 0
    for packet in list(a.encode(tone)) + list(a.encode()):
        c.mux(packet)
    c.close()
    return path


def test_an_avi_with_a_dropped_frame_is_complete_and_a_cut_one_is_not(tmp_path):
    clip = _avi_with_audio(tmp_path / "capture.avi", 6, drop_after=2)
    assert probe_video(clip).header_frames == 7  # the dropped frame's slot counts
    out = tmp_path / "out.mkv"
    summary = upscale_video(FakeEngine(), clip, out, codec="lossless")
    assert summary["frames"] == 6 and summary["input_problem"] is None and out.is_file()
    data = _avi_with_audio(tmp_path / "full.avi", 24).read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[:int(len(data) * 0.6)])
    with FrameReader(cut) as reader:
        frames = sum(1 for _ in reader)
    assert frames < 24 and reader.problem is not None and reader.problem.index == frames


def _png16(path, arr, colour_type):
    """A 16-bit PNG written by hand (PIL writes none but grey): arr H x W x channels uint16."""
    import struct
    import zlib

    h, w, ch = arr.shape
    raw = np.ascontiguousarray(arr.astype(">u2")).view(np.uint8).reshape(h, w * ch * 2)
    rows = np.concatenate([np.zeros((h, 1), np.uint8), raw], axis=1)

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows.tobytes())) + chunk(b"IEND", b""))


@pytest.mark.parametrize("colour_type,channels", [(2, 3), (6, 4), (0, 1), (4, 2)])
def test_16_bit_pngs_keep_16_bits(tmp_path, colour_type, channels):
    rng = np.random.default_rng(colour_type)
    arr = rng.integers(0, 65536, (5, 7, channels)).astype(np.uint16)
    arr[0, 0, 0] = 257 * 10 + 1  # not a multiple of 257: an 8-bit read cannot give it back
    path = tmp_path / "deep.png"
    _png16(path, arr, colour_type)
    got = read_frame(path)
    rgb = np.repeat(arr[..., :1], 3, axis=2) if channels <= 2 else arr[..., :3]
    assert got.shape == (3, 5, 7) and got.dtype == torch.float32
    assert torch.equal(got, torch.from_numpy(rgb.astype(np.float32) / 65535).permute(2, 0, 1))
    assert check_frames([path]) == (7, 5)


@pytest.mark.parametrize("orientation", [2, 6, 8])
def test_png_exif_orientation_is_applied(tmp_path, orientation):
    from PIL import ImageOps

    arr = np.random.default_rng(orientation).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).save(tmp_path / "o.png", exif=exif)
    with Image.open(tmp_path / "o.png") as img:
        want = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))  # PIL's own reading of the tag
    got = (read_frame(tmp_path / "o.png").permute(1, 2, 0) * 255).round().byte().numpy()
    assert np.array_equal(got, want)
    assert check_frames([tmp_path / "o.png"]) == (want.shape[1], want.shape[0])


def test_checking_png_frames_decodes_no_pixels_yet_finds_exif_after_them(tmp_path, monkeypatch):
    """Pillow decodes a whole PNG when asked for EXIF it has not met before the pixel data: the check of a folder
    decoded every frame (minutes for thousands of 4K frames). An EXIF chunk after the pixel data, which PNG
    allows, still turns the frame."""
    from PIL import ImageFile

    arr = np.random.default_rng(0).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "plain.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(tmp_path / "before.png", exif=exif)
    # the same file with its eXIf chunk moved after the pixel data
    data = (tmp_path / "before.png").read_bytes()
    at = data.index(b"eXIf") - 4
    chunk = data[at: at + 12 + int.from_bytes(data[at: at + 4], "big")]
    rest = data[:at] + data[at + len(chunk):]
    end = rest.index(b"IEND") - 4
    (tmp_path / "after.png").write_bytes(rest[:end] + chunk + rest[end:])
    with Image.open(tmp_path / "after.png") as img:
        assert "exif" not in img.info and img.getexif()[0x0112] == 6  # Pillow finds it only by decoding
    loads = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: (loads.append(self.filename), load(self))[1])
    assert check_frames([tmp_path / "plain.png"]) == (6, 4)
    assert check_frames([tmp_path / "before.png"]) == (4, 6)
    assert loads == []
    assert check_frames([tmp_path / "after.png"]) == (4, 6)


def test_png16_written_by_frames_reads_back_exactly(tmp_path):
    arr = np.random.default_rng(1).integers(0, 65536, (4, 6, 3)).astype(np.uint16)
    write_png16(tmp_path / "w.png", arr)
    assert torch.equal((read_frame(tmp_path / "w.png") * 65535).round().to(torch.int64).permute(1, 2, 0),
                       torch.from_numpy(arr.astype(np.int64)))


# ------------------------------------------------------------------------- 4. folders: inputs checked first


def test_frames_folder_problems_are_found_before_the_engine_runs(tmp_path):
    files = png_folder(tmp_path / "in", n=4)
    (tmp_path / "in" / "f002.png").write_text("not an image")
    with pytest.raises(UserInputError, match="f002.png is not a readable image"):
        check_frames(sorted((tmp_path / "in").iterdir()))
    png_folder(tmp_path / "sizes", n=2)
    Image.new("RGB", (10, 10)).save(tmp_path / "sizes" / "f009.png")
    with pytest.raises(UserInputError, match="one size: f000.png is 12x8, f009.png is 10x10"):
        check_frames(sorted((tmp_path / "sizes").iterdir()))
    data = files[1].read_bytes()
    (tmp_path / "in" / "f002.png").write_bytes(data[: len(data) // 2])  # a cut-off PNG
    with pytest.raises(UserInputError, match="f002.png is not a readable image"):
        check_frames(sorted((tmp_path / "in").iterdir()))


def test_frame_that_breaks_mid_run_reports_what_was_written(tmp_path):
    files = png_folder(tmp_path / "in", n=4)
    files[2].write_text("not an image")
    out = tmp_path / "out"
    with pytest.raises(UserInputError, match="f002.png cannot be read as an image.*2 of 4 frames were written"):
        upscale_folder(FakeEngine(), files, out, save="png")
    assert sorted(p.name for p in out.iterdir()) == ["f000.png", "f001.png"]  # complete files only


def test_flow_of_one_frame_is_an_error_not_an_empty_success(tmp_path):
    files = png_folder(tmp_path / "in", n=1)
    with pytest.raises(UserInputError, match="at least two frames"):
        flow_folder(lambda a, b: torch.zeros(1, 2, *a.shape[-2:]), files, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------- two runs, stale locks

HOLDER = textwrap.dedent("""
    import importlib.util, sys, time
    spec = importlib.util.spec_from_file_location("streamvsr", sys.argv[1] + "/__init__.py",
                                                  submodule_search_locations=[sys.argv[1]])
    module = importlib.util.module_from_spec(spec); sys.modules["streamvsr"] = module; spec.loader.exec_module(module)
    from streamvsr.video.outputs import OutputLock
    with OutputLock(sys.argv[2]):
        print("locked", flush=True)
        sys.stdin.read()   # held until the test closes our stdin
""")


@pytest.fixture
def lock_holder():
    """Holds the lock of an output in another process (another run in progress) until the test ends."""
    procs = []

    def hold(target):
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(ROOT), str(target)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield hold
    for proc in procs:
        proc.stdin.close()
        proc.wait(timeout=30)


def test_second_run_to_the_same_output_fails_at_once(tmp_path, lock_holder):
    clip = make_clip(tmp_path / "in.mp4", n=3, audio=None)
    out = tmp_path / "out.mkv"
    holder = lock_holder(out)
    for resume in (False, True):
        engine = FakeEngine()
        with pytest.raises(OutputBusyError, match=f"being written by another streamvsr run \\(process {holder.pid}"):
            upscale_video(engine, clip, out, codec="lossless", resume=resume)
        assert engine.calls == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", lock_path(out).name]
    files = png_folder(tmp_path / "in")
    lock_holder(tmp_path / "frames")
    with pytest.raises(OutputBusyError):
        upscale_folder(FakeEngine(), files, tmp_path / "frames")


def test_two_runs_at_once_in_threads_one_is_refused_the_other_completes(tmp_path):
    clip = make_clip(tmp_path / "in.mp4", n=6, audio=None)
    out = tmp_path / "out.mkv"
    started, release = threading.Event(), threading.Event()

    class Slow(FakeEngine):
        def step(self, frame, state):
            started.set()
            release.wait(30)
            return super().step(frame, state)

    results = {}

    def first():
        results["first"] = upscale_video(Slow(), clip, out, codec="lossless", resume=True, checkpoint_frames=2)

    t = threading.Thread(target=first)
    t.start()
    assert started.wait(30)
    try:
        with pytest.raises(OutputBusyError):
            upscale_video(FakeEngine(), clip, out, codec="lossless", resume=True)
    finally:
        release.set()
        t.join(60)
    assert results["first"]["frames"] == 6 and len(decode(out)) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "out.mkv"]


def test_stale_lock_and_work_files_of_a_crashed_run_are_cleaned(tmp_path):
    clip = make_clip(tmp_path / "in.mp4", n=4, audio=None)
    out = tmp_path / "out.mkv"
    # what a run killed mid-way leaves: its lock file (no process holds it any more), a half-written temporary
    # output, a half-written checkpoint and a segment written after no checkpoint
    lock_path(out).write_text("process 999999 on elsewhere, since 2020-01-01 00:00:00\n")
    temp_path(out).write_bytes(b"half a video")
    ResumeFiles(out).state_tmp.write_bytes(b"half a checkpoint")
    ResumeFiles(out).part(0).write_bytes(b"half a segment")
    lock = OutputLock(out)
    with lock:
        assert lock.stale
    summary = upscale_video(FakeEngine(), clip, out, codec="lossless")
    assert summary["frames"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "out.mkv"]


CRASHER = textwrap.dedent("""
    import importlib.util, os, sys, time
    spec = importlib.util.spec_from_file_location("streamvsr", sys.argv[1] + "/__init__.py",
                                                  submodule_search_locations=[sys.argv[1]])
    module = importlib.util.module_from_spec(spec); sys.modules["streamvsr"] = module; spec.loader.exec_module(module)
    sys.path.insert(0, sys.argv[1] + "/tests")
    from test_video import FakeEngine
    from streamvsr.video.stream import upscale_video

    resume = sys.argv[4] == "1"

    class Slow(FakeEngine):
        def step(self, frame, state):
            if len(self.calls) == 3:
                while resume and not os.path.exists(sys.argv[3] + ".streamvsr-resume.safetensors"):
                    time.sleep(0.05)  # the writer thread saves the checkpoint after frame 2
                print("busy", flush=True)
                time.sleep(600)   # killed here
            return super().step(frame, state)

    upscale_video(Slow(), sys.argv[2], sys.argv[3], codec="lossless", resume=resume, overwrite=not resume,
                  checkpoint_frames=2)
""")


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
@pytest.mark.parametrize("resume", [False, True])
def test_a_killed_run_leaves_nothing_that_blocks_the_next(tmp_path, resume):
    """A run killed mid-way (SIGKILL: no cleanup at all). Without resume it was replacing an existing file, which
    must survive; with resume the next run continues from its checkpoint. Either way the next run is not blocked
    by the lock or work files it left, and cleans them."""
    clip = make_clip(tmp_path / "in.mp4", n=6, audio=None)
    out = tmp_path / "out.mkv"
    if not resume:
        out.write_bytes(b"old result")
    proc = subprocess.Popen([sys.executable, "-c", CRASHER, str(ROOT), str(clip), str(out), "1" if resume else "0"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "busy"
    work_file = ResumeFiles(out).state if resume else temp_path(out)
    deadline = time.monotonic() + 30
    while not work_file.exists() and time.monotonic() < deadline:  # the writer thread opens it on its own time
        time.sleep(0.05)
    proc.kill()
    proc.wait(30)
    assert lock_path(out).exists()  # what the killed run left
    assert work_file.name in sorted(p.name for p in tmp_path.iterdir())
    if not resume:
        assert out.read_bytes() == b"old result"
    engine = FakeEngine()
    summary = upscale_video(engine, clip, out, codec="lossless", resume=resume, overwrite=not resume)
    assert summary["frames"] == 6 and len(decode(out)) == 6
    assert summary["resumed_from"] == (2 if resume else 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "out.mkv"]


@pytest.mark.parametrize("code,busy", [(errno.EACCES, True), (errno.EINVAL, False)])
def test_windows_locking_tells_a_lock_held_from_a_file_system_without_locks(tmp_path, monkeypatch, caplog, code,
                                                                         busy):
    """msvcrt says a lock held by another with EACCES; any other error is a drive without byte locks, which was
    taken as "being written by another run" on every run."""
    import types

    from streamvsr.video import outputs

    msvcrt = types.ModuleType("msvcrt")
    msvcrt.LK_NBLCK = 2

    def locking(fd, mode, count):
        raise OSError(code, os.strerror(code))

    msvcrt.locking = locking
    monkeypatch.setitem(sys.modules, "msvcrt", msvcrt)
    monkeypatch.setattr(outputs.os, "name", "nt")
    fd = os.open(tmp_path / "lock", os.O_RDWR | os.O_CREAT)
    try:
        assert outputs._try_lock(fd, tmp_path / "lock") is not busy
    finally:
        os.close(fd)
        monkeypatch.undo()
    assert ("cannot lock" in caplog.text) is not busy


def test_lock_is_reentrant_in_one_thread_only(tmp_path):
    target = tmp_path / "x.mp4"
    with OutputLock(target):
        with OutputLock(target):
            pass
        assert lock_path(target).exists()
        errors = []

        def other():
            try:
                with OutputLock(target):
                    pass
            except OutputBusyError as e:
                errors.append(e)

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert errors
    assert not lock_path(target).exists()


# ----------------------------------------------------------------------------------- 6. the ComfyUI node


@pytest.fixture
def video_node(tmp_path, monkeypatch):
    import fake_comfy

    mm = fake_comfy.install(monkeypatch, tmp_path / "comfy")
    module = importlib.import_module("streamvsr.nodes.video")
    engines = [Identity]  # the engine class the next runs get
    loads = []  # one entry per model load
    monkeypatch.setattr(module, "make_engine", lambda *a, **k: engines[0]())
    monkeypatch.setattr(module, "load_engine", lambda engine, *a, **k: loads.append(engine))

    def run(path, prefix="streamvsr/test", resume=False, seed=1, **options):
        return module.StreamVSRVideoUpscale.execute(
            model=object(), flow_model=object(), video=fake_comfy.FileVideo(path), seed=seed, steps=1,
            codec="lossless", scene_cut_threshold=0.0, filename_prefix=prefix, resume=resume, **options)

    run.mm, run.engines, run.loads = mm, engines, loads
    return run, tmp_path / "comfy" / "output" / "streamvsr"


def cancelled_during(run, index):
    """An Identity engine during whose frame ``index`` the Cancel button is pressed."""

    class Cancelled(Identity):
        def step(self, frame, state):
            if state.frame_index == index:
                run.mm.interrupt_current_processing()
            return super().step(frame, state)

    return Cancelled


def test_video_node_never_replaces_a_file_and_reports_a_cut_input(tmp_path, video_node):
    run, folder = video_node
    clip = tmp_path / "in.mkv"
    noise_clip(clip, n=4, w=16, h=8, codec="ffv1")
    folder.mkdir(parents=True)
    taken = folder / "test_00001_.mkv"  # the name ComfyUI's counter gives (the fake's is always 1)
    taken.write_bytes(b"an earlier result")
    out = run(clip)
    path = Path(out.values[0][1])
    assert path.name == "test_00002_.mkv" and len(decode(path)) == 4
    assert taken.read_bytes() == b"an earlier result"

    broken = cut(clip, 0.6, tmp_path / "cut.mkv")
    with pytest.raises(InputDamagedError, match="ends early.*allow_truncated \\(the node\\)") as e:
        run(broken, prefix="streamvsr/cut")
    assert str(e.value.path) in str(e.value) and len(decode(e.value.path)) == e.value.frames > 0
    assert not (folder / "cut_00001_.mkv").exists()
    accepted = Path(run(broken, prefix="streamvsr/accepted", allow_truncated=True).values[0][1])
    assert accepted.name == "accepted_00001_.mkv" and len(decode(accepted)) == e.value.frames


def test_video_node_cleans_what_killed_runs_left_but_not_a_running_job(tmp_path, video_node):
    """A run killed (ComfyUI closed, out of memory) leaves its lock file, its temporary file and, without a
    checkpoint, its resume segments; the next run takes a new number, so it must remove them itself, as README
    promises. A run still writing (its lock held), a partial result and a checkpointed job are kept."""
    run, folder = video_node
    clip = tmp_path / "in.mkv"
    noise_clip(clip, n=2, w=16, h=8, codec="ffv1")
    folder.mkdir(parents=True)
    killed, unsaved, checkpointed, running = (folder / f"test_0000{i}_.mkv" for i in (1, 2, 3, 4))
    stale = [lock_path(killed), temp_path(killed), lock_path(unsaved), ResumeFiles(unsaved).part(0),
             lock_path(checkpointed), temp_path(checkpointed)]
    kept = [partial_path(unsaved), ResumeFiles(checkpointed).state, ResumeFiles(checkpointed).part(0),
            temp_path(running)]
    for path in stale + kept:
        path.write_bytes(b"process 4242 on a crashed host" if path.name.endswith("lock") else b"work")
    with locked_elsewhere(running):
        out = Path(run(clip).values[0][1])
    assert out == killed and len(decode(out)) == 2  # (the fake counter gives 1: the killed run's number is free)
    assert [p.name for p in stale if os.path.lexists(p)] == []
    assert all(p.read_bytes() == b"work" for p in kept)
    # what cannot be cleaned (another user's lock file: here one that cannot be opened) only costs its number
    lock_path(folder / "test_00005_.mkv").mkdir()
    assert Path(run(clip).values[0][1]).name == "test_00006_.mkv"  # 2-4 hold a partial, a job, a temporary file
    assert lock_path(folder / "test_00005_.mkv").is_dir()


def test_video_node_reports_an_unusable_output_folder_in_one_line_before_loading_models(tmp_path, video_node):
    run, folder = video_node
    clip = tmp_path / "in.mkv"
    noise_clip(clip, n=2, w=16, h=8, codec="ffv1")
    folder.mkdir(parents=True)
    (folder / "blocked").write_bytes(b"a file where the prefix wants a folder")
    with pytest.raises(UserInputError, match="blocked"):
        run(clip, prefix="streamvsr/blocked/x")
    for prefix in ("../escaped/x", str(tmp_path / "elsewhere" / "x"), "streamvsr/../../x"):
        with pytest.raises(UserInputError, match="leads outside ComfyUI's output folder: give a name inside it"):
            run(clip, prefix=prefix)
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "elsewhere").exists()
    # a name too long is said in what the user types: "_00001_.mkv" (11) and the work files (21) come on top
    with pytest.raises(UserInputError, match=r"is too long: 261 bytes.*shorten the file name of filename_prefix "
                                             r"to at most 223 bytes"):
        run(clip, prefix="streamvsr/" + "a" * 250)
    # no file name (ComfyUI writes "._00001_.mp4", hidden and named like macOS's metadata files), a NUL (Python's
    # "embedded null byte" after the engine was made)
    for prefix, says in (("", "names no file"), (".", "names no file"), ("streamvsr/..", "names no file"),
                         ("  ", "names no file"), ("x\0y", "NUL character")):
        with pytest.raises(UserInputError, match=says):
            run(clip, prefix=prefix)
    assert run.loads == []
    assert len(decode(run(clip).values[0][1])) == 2 and len(run.loads) == 1


def test_a_trimmed_or_cropped_video_is_refused_not_upscaled_whole(tmp_path, video_node):
    """Newer ComfyUI's Trim Video / Video Slice and Crop Video hand on the whole file with a window attached: both
    video nodes read the file itself, so they upscaled all of it (hours on frames not asked for, another video)."""
    import fake_comfy

    from streamvsr.nodes.video_range import StreamVSRLoadVideoChunk

    run, _ = video_node
    clip = tmp_path / "in.mkv"
    noise_clip(clip, n=4, w=16, h=8, codec="ffv1")

    class Trimmed(fake_comfy.FileVideo):
        def get_active_trim_window(self):
            return 0.5, 0.25

    class Cropped(fake_comfy.FileVideo):
        def get_active_trim_window(self):
            return 0.0, 0.0

        def get_dimensions(self):
            return 8, 8

    module = importlib.import_module("streamvsr.nodes.video")
    for video, says in ((Trimmed(clip), "a trimmed view of one \\(0.25 s from 0.5 s\\)"),
                        (Cropped(clip), "a 8x8 view of a 16x8 one \\(cropped\\)")):
        with pytest.raises(UserInputError, match=f"Stream Upscale Video File upscales whole video files, and this "
                                                 f"VIDEO is {says}: save it first"):
            module.StreamVSRVideoUpscale.execute(model=object(), flow_model=object(), video=video, seed=1, steps=1,
                                                 codec="lossless", scene_cut_threshold=0.0,
                                                 filename_prefix="streamvsr/t")
        with pytest.raises(UserInputError, match=f"Load Video Chunk reads the chunks of whole video files, and this "
                                                 f"VIDEO is {says}"):
            StreamVSRLoadVideoChunk.execute(video=video, chunk_index=0, chunk_frames=2)
    assert run.loads == []
    # a VIDEO of the whole file, untrimmed (0, 0) and as large as its file, is taken
    assert len(decode(run(clip).values[0][1])) == 4


def test_a_prefix_on_another_windows_drive_is_the_same_one_line_error(video_node, monkeypatch):
    """Windows paths on two drives have no common path: Python raises ValueError, which reached the user raw."""
    import ntpath
    import types

    import folder_paths

    from streamvsr.nodes import video as video_nodes

    windows_os = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
    windows_os.path = ntpath
    monkeypatch.setattr(video_nodes, "os", windows_os)
    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: "C:\\ComfyUI\\output")
    with pytest.raises(UserInputError, match="leads outside ComfyUI's output folder"):
        video_nodes._output_path("D:\\renders\\upscaled", "h264", 64, 64, None, 4, [], contextlib.ExitStack())


@pytest.mark.skipif(not hasattr(av.video.stream.VideoStream, "set_display_rotation"),
                    reason="this PyAV cannot write a display matrix")
def test_video_node_honours_rotation(tmp_path, video_node):
    run, _ = video_node
    clip = tmp_path / "phone.mkv"
    frames = noise_clip(clip, n=2, w=16, h=8, codec="ffv1", rotation=90)
    got = decode(run(clip).values[0][1])
    assert got[0].shape == (64, 32, 3) and np.array_equal(got[0], nearest4(np.rot90(frames[0])))


def test_video_node_cancel_mid_frame_checkpoints_every_frame_done(tmp_path, video_node, caplog):
    """Cancel arrives while a frame is computed: ComfyUI's progress hook would raise it while that frame is being
    written, past the checkpoint; the node leaves it to the poll before the next frame, which checkpoints."""
    import fake_comfy

    caplog.set_level(logging.INFO)
    run, folder = video_node
    clip = tmp_path / "in.mkv"
    frames = noise_clip(clip, n=6, w=16, h=8, codec="ffv1")

    run.engines[0] = cancelled_during(run, 2)
    with pytest.raises(fake_comfy.Interrupted):
        run(clip, resume=True)
    job = ResumeFiles(folder / "test_00001_.mkv")
    assert job.read_info()["frames"] == 3  # frames 0-2 were done and written: none is redone
    assert "stopped after writing 3 frames of" in caplog.text and "resume on to continue" in caplog.text
    run.engines[0] = Identity
    out = Path(run(clip, resume=True).values[0][1])
    assert out.name == "test_00001_.mkv" and not job.state.exists()
    got = decode(out)
    assert len(got) == 6 and all(np.array_equal(g, nearest4(f)) for g, f in zip(got, frames))


def test_video_node_cancel_without_resume_says_where_the_frames_done_are(tmp_path, video_node, caplog):
    """ComfyUI shows a Cancel as an interruption only: the frames kept under the partial name are named in the log
    (the command line prints them from the summary, which a raised Cancel never returns)."""
    import fake_comfy

    run, folder = video_node
    clip = tmp_path / "in.mkv"
    noise_clip(clip, n=6, w=16, h=8, codec="ffv1")

    run.engines[0] = cancelled_during(run, 2)
    with pytest.raises(fake_comfy.Interrupted):
        run(clip)
    partial = folder / "test_00001_.streamvsr-partial.mkv"
    assert len(decode(partial)) == 3 and not (folder / "test_00001_.mkv").exists()
    assert f"stopped after 3 frames: they are in {partial}" in caplog.text


def test_video_node_cancel_between_its_check_and_the_progress_hook_still_checkpoints(tmp_path, video_node,
                                                                                    monkeypatch):
    """The node looks for a pending Cancel before it reports progress; one that arrives after that look is raised
    by ComfyUI's progress hook inside the writing of a frame. It is put back for the poll before the next frame,
    which checkpoints, instead of ending the run with the work since the last checkpoint lost."""
    import fake_comfy

    run, folder = video_node
    clip = tmp_path / "in.mkv"
    frames = noise_clip(clip, n=6, w=16, h=8, codec="ffv1")
    reports = []

    def hook():  # the Cancel lands just before the server's hook runs, at the 4th report of progress (only)
        reports.append(1)
        if len(reports) == 4:
            run.mm.interrupt_current_processing()
        if run.mm.interrupted:
            run.mm.interrupted = False
            raise fake_comfy.Interrupted()

    monkeypatch.setattr(fake_comfy.ProgressBar, "hook", staticmethod(hook))
    with pytest.raises(fake_comfy.Interrupted):
        run(clip, resume=True)
    job = ResumeFiles(folder / "test_00001_.mkv")
    assert job.read_info() is not None and job.read_info()["frames"] >= 2
    out = Path(run(clip, resume=True).values[0][1])
    got = decode(out)
    assert len(got) == 6 and all(np.array_equal(g, nearest4(f)) for g, f in zip(got, frames))


def test_video_node_resumes_only_its_own_job(tmp_path, video_node):
    """resume continues the unfinished job of this prefix with these settings: not a job of another input or
    seed (those stay as they are, and a new file is started), not one of a longer prefix (test_v2_…)."""
    import fake_comfy

    run, folder = video_node
    first, second = tmp_path / "a.mkv", tmp_path / "b.mkv"
    frames_a = noise_clip(first, n=5, w=16, h=8, codec="ffv1")
    noise_clip(second, n=4, w=16, h=8, codec="ffv1")

    run.engines[0] = cancelled_during(run, 2)
    for prefix in ("streamvsr/test_v2", "streamvsr/test"):
        with pytest.raises(fake_comfy.Interrupted):
            run(first, prefix=prefix, resume=True)
    unfinished = {p.name for p in folder.iterdir() if p.name.endswith(".streamvsr-resume.safetensors")}
    assert unfinished == {"test_v2_00001_.mkv.streamvsr-resume.safetensors",
                          "test_00001_.mkv.streamvsr-resume.safetensors"}
    run.engines[0] = Identity
    # another input, then another seed, with the same prefix: new jobs, the unfinished one untouched
    other = Path(run(second, resume=True).values[0][1])
    assert other.name == "test_00002_.mkv" and len(decode(other)) == 4
    reseeded = Path(run(first, resume=True, seed=2).values[0][1])
    assert reseeded.name == "test_00003_.mkv"
    assert ResumeFiles(folder / "test_00001_.mkv").read_info()["frames"] == 3
    # the job itself: continued to the end under its own name; test_v2's job is still there
    done = Path(run(first, resume=True).values[0][1])
    assert done.name == "test_00001_.mkv" and not ResumeFiles(done).state.exists()
    got = decode(done)
    assert len(got) == len(frames_a) and all(np.array_equal(g, nearest4(f)) for g, f in zip(got, frames_a))
    assert ResumeFiles(folder / "test_v2_00001_.mkv").read_info()["frames"] == 3


def test_an_encoder_missing_from_ffmpeg_is_a_one_line_error_before_any_work(tmp_path, monkeypatch):
    from streamvsr.video import writer

    clip = make_clip(tmp_path / "in.mp4", n=2, audio=None)
    real = writer._has_encoder
    monkeypatch.setattr(writer, "_has_encoder", lambda name: name != "libx264" and real(name))
    with pytest.raises(UserInputError, match="no libx264 encoder, which codec 'h264' needs: choose codec 'lossless'"):
        check_video_job(clip, tmp_path / "out.mp4")
    check_video_job(clip, tmp_path / "out.mkv", codec="lossless")  # the other codec is still there
    monkeypatch.setattr(writer, "_has_encoder", lambda name: False)
    with pytest.raises(UserInputError, match=r"no ffv1 encoder.*: install PyPI's av wheel"):
        check_video_job(clip, tmp_path / "out.mkv", codec="lossless")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4"]


def test_frames_numbered_without_leading_zeros_are_taken_in_numeric_order(tmp_path):
    # A plain sort gives f1, f10, f11, f2, ...: the sequence would be upscaled out of order, its temporal guidance
    # warped from the wrong frames
    names = [f"f{i}.png" for i in (1, 2, 3, 9, 10, 11, 20, 100)] + ["shot2_0009.png", "shot2_0010.png",
                                                                     "shot10_0001.png"]
    for name in reversed(names):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    assert [p.name for p in list_pngs(tmp_path)] == names


@pytest.mark.parametrize("audio", [None, "aac"])
def test_matroska_whose_video_starts_late_is_not_called_cut_off(tmp_path, audio):
    """FFmpeg writes a Matroska track's DURATION tag as its end time: a video that starts after 0 s (1 s here; AAC
    priming delays it by a few ms in an MKV made from an MP4 with AAC, this pack's own outputs included) ends
    on time, and an MKV cut short still counts as cut off."""
    clip = make_clip(tmp_path / "late.mkv", n=24, audio=audio, pts=list(range(24, 48)))
    assert probe_video(clip).duration == pytest.approx(1.0, abs=0.05)  # (the tag says 2 s: the end)
    summary = upscale_video(FakeEngine(), clip, tmp_path / "out.mkv", codec="lossless")
    assert summary["frames"] == 24 and summary["input_problem"] is None
    again = upscale_video(FakeEngine(), tmp_path / "out.mkv", tmp_path / "again.mp4")
    assert again["frames"] == 24 and again["input_problem"] is None
    data = clip.read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) * 9 // 10])
    with pytest.raises(InputDamagedError, match="ends early"):
        upscale_video(FakeEngine(), cut, tmp_path / "cut_out.mkv", codec="lossless")


def test_flv_with_b_frames_is_not_called_cut_off(tmp_path):
    """FLV's header duration is the last frame's end time, and B-frames start an H.264 video a few frames late:
    a complete file ends on time; one cut short still counts as cut off."""
    from test_video import noise_video

    path = noise_video(tmp_path / "b.flv", 60, "flv", options={"g": "10", "bf": "2"})
    assert av.open(str(path)).start_time > 0  # (what made it look short)
    summary = upscale_video(FakeEngine(), path, tmp_path / "out.mkv", codec="lossless")
    assert summary["frames"] == 60 and summary["input_problem"] is None
    with pytest.raises(InputDamagedError):
        upscale_video(FakeEngine(), cut(path, 0.9, tmp_path / "cut.flv"), tmp_path / "cut_out.mkv",
                      codec="lossless")


def test_a_join_short_of_frames_publishes_nothing_and_keeps_the_work(tmp_path, monkeypatch, caplog):
    """Should joining the segments ever lose frames (a segment damaged in place, or FFmpeg's NUT demuxer as it once
    did), the job's work stays instead of being replaced by a short file, and the user is told what to do in one
    line (it was a traceback, again on every run)."""
    from streamvsr.video import resume, stream

    clip = make_clip(tmp_path / "in.mp4", n=6, audio=None)
    out = tmp_path / "out.mkv"

    def short_join(*args, **kwargs):
        return resume.join_segments(*args, **kwargs) - 1

    monkeypatch.setattr(stream, "join_segments", short_join)
    with pytest.raises(UserInputError, match="gave 5 frames instead of 6, so one of them is damaged .* delete "
                                             "out.mkv.streamvsr-resume.safetensors to start over"):
        upscale_video(FakeEngine(), clip, out, codec="lossless", resume=True, checkpoint_frames=2)
    files = ResumeFiles(out)
    assert not out.exists() and not temp_path(out).exists()
    assert files.state.exists() and len(files.parts_on_disk()) == 3
    monkeypatch.undo()

    def damaged(parts, joined, **kwargs):  # a segment found damaged as it is joined: running again is no help
        joined.write_bytes(b"half")
        raise resume._damaged(parts[1], "invalid data")

    caplog.set_level("WARNING")
    with monkeypatch.context() as m:
        m.setattr(stream, "join_segments", damaged)
        with pytest.raises(UserInputError, match="is damaged"):
            upscale_video(FakeEngine(), clip, out, codec="lossless", resume=True, checkpoint_frames=2)
    assert "only joins them" not in caplog.text and not temp_path(out).exists()
    summary = upscale_video(FakeEngine(), clip, out, codec="lossless", resume=True, checkpoint_frames=2)
    assert summary["resumed_from"] == 6 and len(decode(out)) == 6


def test_an_interlaced_input_is_said_once_per_job(tmp_path, caplog):
    """Broadcast, DVD and camcorder video flagged as fields is upscaled as whole frames, combing and all: the
    user is told to deinterlace it first, once per job (a chunked read indexes the file once); progressive
    video is not mentioned."""
    from streamvsr.video.range import frame_index

    interlaced = gop_clip(tmp_path / "tv.mkv", "matroska", "libx264", n=6, w=32, h=32,
                          options={"x264-params": "tff=1", "flags": "+ildct+ilme"})
    progressive = gop_clip(tmp_path / "web.mkv", "matroska", "libx264", n=6, w=32, h=32)
    for clip in (interlaced, progressive):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            upscale_video(FakeEngine(), clip, tmp_path / f"out_{clip.stem}.mkv", codec="lossless")
            frame_index(clip)
            frame_index(clip)
        said = [r.getMessage() for r in caplog.records if "interlaced" in r.getMessage()]
        if clip == interlaced:
            assert len(said) == 2 and said[0].startswith(f"{clip} is interlaced") and "deinterlace it first" in said[0]
        else:
            assert said == []


def test_a_frame_stopped_while_put_in_place_adds_no_frame_to_the_folder(tmp_path, monkeypatch):
    """Ctrl-C while a frame is flushed: not kept under a partial name, which would count as one more frame of the
    folder (the frame is redone by the next run)."""
    from streamvsr.video import outputs

    files = png_folder(tmp_path / "in", n=3)
    real, calls = outputs.sync_file, []

    def stopped_at_the_second(path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(outputs, "sync_file", stopped_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        upscale_folder(FakeEngine(), files, tmp_path / "out", save="png")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["f000.png"]


def test_an_output_name_is_measured_as_its_file_system_counts(tmp_path, monkeypatch):
    """255 bytes of UTF-8 on Linux, 255 UTF-16 units on Windows: 104 Japanese characters are 304 bytes, and were
    refused on Windows too."""
    from streamvsr.video import outputs

    name = tmp_path / ("動画" * 50 + ".mp4")
    with pytest.raises(UserInputError, match="is too long: 304 bytes"):
        outputs.check_name_length(name)
    monkeypatch.setattr(outputs.os, "name", "nt")
    outputs.check_name_length(name)
    with pytest.raises(UserInputError, match="is too long: 244 characters.*at most 234 characters"):
        outputs.check_name_length(tmp_path / ("動" * 240 + ".mp4"))


# A stop at once (a second Ctrl-C) at unlucky points: what was written is kept and said, nothing is left running

def _writer_threads() -> list:
    return [t for t in threading.enumerate() if t.name == "streamvsr-video-writer" and t.is_alive()]


@pytest.mark.parametrize("when", ["the input closes", "a frame is handed over"])
def test_a_stop_at_once_keeps_what_the_writer_wrote(tmp_path, monkeypatch, caplog, when):
    """The input closing: the writer had finished the whole file, which stayed under the temporary name, unsaid,
    and the next run removed it as "left by a run that did not finish". A frame handed over: the writer wrote it,
    but it was not yet counted, so the run removed the file as "an empty output"."""
    import streamvsr.video.stream as stream

    clip, out = make_clip(tmp_path / "in.mp4", n=5, audio=None), tmp_path / "out.mp4"
    if when == "the input closes":
        real, cls, name, kept_frames, said = FrameReader.close, FrameReader, "close", 5, "the 5 frames written"
    else:
        real, cls, name, kept_frames, said = stream.WriterThread.put, stream.WriterThread, "put", 1, "the frame written"

    def stopped(self, *item):
        real(self, *item)
        if name == "close" or (item[0] is not None and item[0][0] == "frame"):
            raise KeyboardInterrupt

    monkeypatch.setattr(cls, name, stopped)
    with pytest.raises(KeyboardInterrupt):
        upscale_video(FakeEngine(), clip, out)
    kept = partial_path(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", kept.name] and len(decode(kept)) == kept_frames
    assert f"{said} before this stop {'is' if kept_frames == 1 else 'are'} in {kept}" in caplog.text


def test_a_stop_while_the_file_is_being_closed_does_not_call_it_finished(tmp_path, monkeypatch, caplog):
    """A third Ctrl-C while the writer closes the file (long for big frames: the encoder's look-ahead, the MP4
    index): the run said the frames were in the partial, which, the process ending, held none."""
    import streamvsr.video.stream as stream
    from streamvsr.video.writer import VideoWriter

    clip, out = make_clip(tmp_path / "in.mp4", n=5, audio=None), tmp_path / "out.mp4"
    closing, release = threading.Event(), threading.Event()
    real_close, real_put, real_join = VideoWriter.close, stream.WriterThread.put, stream.WriterThread.join

    def close(self, *args, **kwargs):
        closing.set()
        release.wait(60)
        return real_close(self, *args, **kwargs)

    # The stops come while the run waits for the writer: to take what it hands over, or to end
    def put(self, item):
        if closing.is_set():
            raise KeyboardInterrupt
        return real_put(self, item)

    def join(self, timeout=None):
        if timeout is None and self.is_alive():
            assert closing.wait(60)
            raise KeyboardInterrupt
        return real_join(self, timeout)

    monkeypatch.setattr(VideoWriter, "close", close)
    monkeypatch.setattr(stream.WriterThread, "put", put)
    monkeypatch.setattr(stream.WriterThread, "join", join)
    try:
        with pytest.raises(KeyboardInterrupt):
            upscale_video(FakeEngine(), clip, out)
    finally:
        release.set()
        for thread in _writer_threads():
            real_join(thread, 60)
    assert f"could not finalise {temp_path(out)}" in caplog.text
    assert "written before this stop" not in caplog.text


@pytest.mark.parametrize("where", ["before the writer", "as it starts"])
def test_a_stop_before_the_writer_runs_leaves_no_thread_or_file(tmp_path, monkeypatch, where):
    """A stop just before the writer thread's work began left it waiting forever, its file open (a library
    caller's process kept both)."""
    import streamvsr.video.stream as stream

    clip, out = make_clip(tmp_path / "in.mp4", n=3, audio=None), tmp_path / "out.mp4"
    if where == "before the writer":
        restart, restarts = stream.CheckpointClock.restart, []

        def stop_at_the_second(clock):  # (the checkpoint clock starts when made, and again just before the `try`)
            restarts.append(1)
            if len(restarts) == 2:
                raise KeyboardInterrupt
            restart(clock)

        monkeypatch.setattr(stream.CheckpointClock, "restart", stop_at_the_second)
    else:
        def start(self):
            raise KeyboardInterrupt

        monkeypatch.setattr(stream.WriterThread, "start", start)
    with pytest.raises(KeyboardInterrupt):
        upscale_video(FakeEngine(), clip, out)
    assert not _writer_threads()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4"]
    monkeypatch.undo()
    assert upscale_video(FakeEngine(), clip, out)["frames"] == 3


@pytest.mark.parametrize("resume", [False, True])
def test_a_stop_once_the_result_is_in_place_says_it_is_finished(tmp_path, monkeypatch, caplog, resume):
    """A stop while the folder was flushed after the move: the output was finished, yet with resume the message
    said to run the same command again to continue (which then refused: the output exists) and the work files
    stayed beside the finished output."""
    import streamvsr.video.outputs as outputs

    clip, out = make_clip(tmp_path / "in.mp4", n=5, audio=None), tmp_path / "out.mkv"

    def sync_folder(folder):
        raise KeyboardInterrupt

    monkeypatch.setattr(outputs, "sync_folder", sync_folder)
    with pytest.raises(KeyboardInterrupt):
        upscale_video(FakeEngine(), clip, out, codec="lossless", resume=resume, checkpoint_frames=2)
    assert f"the stop came after {out} was finished" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "out.mkv"] and len(decode(out)) == 5


@pytest.mark.parametrize("kind", ["frames", "flow"])
def test_a_stop_as_an_output_lands_counts_it(tmp_path, monkeypatch, caplog, kind):
    """A stop while the folder was flushed after a frame was moved into place: the frame was not counted, so the
    message was one short and the same command with resume refused to go on (an output past its checkpoint that
    it did not know as its own)."""
    import streamvsr.video.outputs as outputs

    files = png_folder(tmp_path / "in", n=4)
    whole, out = tmp_path / "whole", tmp_path / "out"
    if kind == "frames":
        upscale_folder(FakeEngine(), files, whole, save="npy", seed=3)
    real_sync, synced = outputs.sync_folder, []

    def sync_folder(folder):
        real_sync(folder)
        if Path(folder) == out:
            synced.append(folder)
            if len(synced) == 2:  # (the second frame is in place)
                raise KeyboardInterrupt

    monkeypatch.setattr(outputs, "sync_folder", sync_folder)
    with pytest.raises(KeyboardInterrupt):
        if kind == "frames":
            upscale_folder(FakeEngine(), files, out, save="npy", seed=3, resume=True, checkpoint_frames=1)
        else:
            flow_folder(lambda a, b: (a - b)[:, :2], files, out)
    assert len(list(out.iterdir())) == 2
    what = "frames" if kind == "frames" else "flow fields"
    assert f"stopped: 2 of {len(files) - (kind == 'flow')} {what} were written to {out}, each complete" in caplog.text
    if kind == "frames":
        monkeypatch.setattr(outputs, "sync_folder", real_sync)
        assert upscale_folder(FakeEngine(), files, out, save="npy", seed=3, resume=True) == 4
        got, expected = npy_outputs(out), npy_outputs(whole)
        assert list(got) == list(expected) and all(np.array_equal(got[k], expected[k]) for k in expected)


def test_a_stop_as_a_finished_frames_job_removes_its_checkpoint_says_it_is_finished(tmp_path, monkeypatch, caplog):
    """The checkpoint half removed, the job said only "interrupted", and the same command with resume refused:
    every output was there, with no checkpoint to continue."""
    files = png_folder(tmp_path / "in", n=3)
    out = tmp_path / "out"
    real_remove, removals = ResumeFiles.remove, []

    def remove(self):
        removals.append(1)
        if len(removals) == 1:
            self.state.unlink()
            raise KeyboardInterrupt
        real_remove(self)

    monkeypatch.setattr(ResumeFiles, "remove", remove)
    with pytest.raises(KeyboardInterrupt):
        upscale_folder(FakeEngine(), files, out, save="npy", resume=True, checkpoint_frames=1)
    assert f"the stop came after the last frame: all 3 were written to {out}" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"] and len(list(out.iterdir())) == 3


def test_two_video_node_runs_at_once_take_two_names(tmp_path, video_node, monkeypatch):
    """Two runs with one filename_prefix at once (two ComfyUIs on one output folder, or two threads): both picked
    the same free name, and the second failed on it ("being written by another run", or, the first finished, "add
    --overwrite", which the node has not) after its models had loaded."""
    run, folder = video_node
    module = importlib.import_module("streamvsr.nodes.video")
    clip = tmp_path / "in.mkv"
    noise_clip(clip, n=2, w=16, h=8, codec="ffv1")
    both_named = threading.Barrier(2, timeout=60)

    def load(engine, *args, **kwargs):  # (both have their names before either writes)
        run.loads.append(engine)
        both_named.wait()

    monkeypatch.setattr(module, "load_engine", load)
    results = []

    def job():
        try:
            results.append(Path(run(clip).values[0][1]).name)
        except Exception as e:  # noqa: BLE001 - what the test reports
            results.append(e)

    threads = [threading.Thread(target=job) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sorted(map(str, results)) == ["test_00001_.mkv", "test_00002_.mkv"], results
    assert sorted(p.name for p in folder.iterdir()) == ["test_00001_.mkv", "test_00002_.mkv"]


def test_a_lock_on_a_name_too_long_is_a_one_line_error(tmp_path):
    """Path.is_dir raises for a name too long instead of saying False: the lock's fallback check turned the error
    into a traceback."""
    with pytest.raises(UserInputError, match="cannot create the lock file .*: File name too long"):
        with OutputLock(tmp_path / ("a" * 300 + ".mkv")):
            pass


def test_a_file_another_program_puts_at_a_frames_name_is_not_counted_as_the_runs(tmp_path, monkeypatch):
    """Only this run's file at the name counts as landed: another program's, put there while the frame was written
    (the move then leaves it alone), was listed in the checkpoint as the run's, and the next run replaced it."""
    import streamvsr.video.frames as frames

    files = png_folder(tmp_path / "in", n=4)
    out = tmp_path / "out"
    real_write, written = frames._write, []

    def write(hr, path, fmt):
        real_write(hr, path, fmt)
        written.append(path)
        if len(written) == 3:
            np.save(out / "f002.npy", np.zeros(3))

    monkeypatch.setattr(frames, "_write", write)
    with pytest.raises(OutputExistsError, match="f002.npy was created by something else"):
        upscale_folder(FakeEngine(), files, out, save="npy", resume=True, checkpoint_frames=1)
    assert ResumeFiles(out).read_info()["after"] == []
    monkeypatch.setattr(frames, "_write", real_write)
    with pytest.raises(OutputExistsError, match="already has f002.npy"):
        upscale_folder(FakeEngine(), files, out, save="npy", resume=True)
    assert np.load(out / "f002.npy").shape == (3,)


def test_a_resume_job_stopped_as_its_result_is_put_in_place_keeps_one_copy(tmp_path, monkeypatch, caplog):
    """A stop while the joined result was flushed before its move kept it as a partial, beside the resume files
    that the same command joins again: two whole copies of the video."""
    import streamvsr.video.outputs as outputs

    clip, out = make_clip(tmp_path / "in.mp4", n=4, audio=None), tmp_path / "out.mkv"
    real_sync = outputs.sync_file

    def sync_file(path):
        if Path(path) == temp_path(out):
            raise KeyboardInterrupt
        real_sync(path)

    monkeypatch.setattr(outputs, "sync_file", sync_file)
    with pytest.raises(KeyboardInterrupt):
        upscale_video(FakeEngine(), clip, out, codec="lossless", resume=True)
    assert not partial_path(out).exists() and not temp_path(out).exists() and ResumeFiles(out).state.exists()
    monkeypatch.undo()
    engine = FakeEngine()
    assert upscale_video(engine, clip, out, codec="lossless", resume=True)["frames"] == 4 and engine.calls == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "out.mkv"] and len(decode(out)) == 4
