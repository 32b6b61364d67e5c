"""Stream a video file through any engine (``models/contract.py``) into another video file.

Memory does not depend on the video's length. The main thread decodes a frame, pushes it into the engine and
converts whatever frames the engine returns to 8-bit RGB (one per input frame for Stream-DiffVSR; a chunk at a
time, a few frames late, for FlashVSR); a writer thread encodes and muxes them. Between the two sits a queue of at most
``QUEUE_FRAMES`` frames, and x264's look-ahead is capped at ``X264_LOOKAHEAD`` frames, so at any time only a
fixed number of frames is alive however long the video is. Nothing is kept per frame.

Timing: output frames keep the input frames' timestamps (same time base; the clock starts at the earliest video or
audio start), so frame rate and variable frame timing survive. Audio: every audio stream is copied packet for
packet, with its title, language and default flag; only where the output container cannot hold the codec (e.g. PCM
in MP4) is it re-encoded to AAC. Subtitles are copied where the output container holds them as they are (SubRip,
ASS, WebVTT, PGS, DVD and DVB subtitles in Matroska; MP4's text and DVD subtitles in MP4). The file's title, other
labels and chapters are kept; its other streams (a cover picture, data) are not, and a warning says so. Colour: the
input is decoded to RGB with the matrix it is tagged with (untagged: BT.709 from 720 lines up, BT.601 below, as
players assume); H.264 output is encoded and tagged as BT.709 limited range, the convention for HD and 4K video;
both codecs keep the input's primaries and transfer tags. HDR input and samples deeper than 8 bits are said in a
warning (the output is 8-bit, not tone-mapped).

Scene cuts (optional): ``SceneCutDetector`` compares consecutive LR frames; at a cut the temporal guidance is
dropped (``engine.reset_temporal``), so the first frame of the new shot is upscaled like a first frame instead of
being guided by the previous shot. The noise sequence carries on across a cut.

Files: nothing is written under the output's name until it is complete (``outputs``): the video goes to a
temporary file next to it and is moved into place at the end. A run that stops early (a stop request, an error, a
damaged or cut-off input) keeps what it finished as ``NAME.streamvsr-partial.EXT`` and says so; an existing
output is replaced only with ``overwrite``; a lock next to the output refuses a second run to it.

Input: probed before anything else (``check_video_job``, also usable before a model is loaded): readable, has a
video stream whose first frame decodes; frames are turned upright by the file's display matrix. If decoding
stops early (a decoder error, fewer frames than the header promises, or a change of frame size), the frames
before it are finished and kept, and ``InputDamagedError`` says how many and where the input broke;
``allow_truncated`` instead accepts a cut-off or damaged input and writes what could be decoded to the output.

Resume (optional, ``resume=True``): the video is written as segments ``OUT.streamvsr-partNNNN.nut`` (OUT with its
extension; video only, each a complete file) and, at every checkpoint, the engine state and the count of frames
written go to ``OUT.streamvsr-resume.safetensors`` (with the timestamps of frames the engine still holds). A
checkpoint closes the current segment first, so the state always matches what is on disk, also after a crash or
power loss (work since the last checkpoint is redone). When all frames are done, the segments are joined (under the
temporary name) without re-encoding, the audio, subtitles, chapters and labels are added from the input, and once
the joined file holds every frame it is moved to OUT and the work files are deleted. H.264 segments are encoded
without B-frames so that their timestamps can be joined as they are (files get a few percent larger at the same
CRF).
"""

from __future__ import annotations

import contextlib
import logging
import operator
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable

import torch

from ..models.shared.errors import InputDamagedError, OutputBusyError, OutputExistsError, UserInputError
from .audio import check_audio, not_kept
from .outputs import (RESUME_NAME_EXTRA, OutputLock, check_name_length, check_output_file, keep_partial,
                      make_folder, publish, remove_stale, sync_file, temp_path)
from .range import seek_to
from .reader import FrameReader, VideoInfo, describe, probe_video, reopenable, warn_if_interlaced
from .resume import CheckpointClock, ResumeFiles, fingerprint, fingerprint_mismatch, join_segments, other_settings
from .scenecut import SceneCutDetector
from .writer import (VideoWriter, check_crf, check_frame_size, codec_spec, color_tags, depth_notes, frames_on_disk,
                     to_rgb24)

log = logging.getLogger(__name__)

# Frames waiting between the engine and the encoder: enough to overlap the two, few enough to stay flat.
QUEUE_FRAMES = 2
# Input problems that --allow-truncated cannot accept: the frames after them need an output of their own (another
# frame size, another clock)
ONE_OUTPUT = ("size", "jump")
# By default a resumable job's segments hold at least this many frames (half a second or so; see CheckpointClock)
MIN_SEGMENT_FRAMES = 12


class WriterThread(threading.Thread):
    """Encodes frames from a bounded queue; handles segment switches and checkpoints in resume mode."""

    def __init__(self, make_writer: Callable[[int], VideoWriter], checkpoint: Callable | None, segment: int = 0):
        super().__init__(name="streamvsr-video-writer", daemon=True)
        self.queue: queue.Queue = queue.Queue(maxsize=QUEUE_FRAMES)
        self.make_writer, self.checkpoint = make_writer, checkpoint
        self.writer: VideoWriter | None = None
        self.segment = segment
        self.error: BaseException | None = None
        self.unfinished: Path | None = None  # a file that could not be closed properly after an error
        self.frames = 0  # written by its video writers (frames queued to it after it failed are not)

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
                    self.frames += 1
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
                    self.unfinished = self.writer.path
                finally:
                    self.writer = None

    def _close(self, complete: bool) -> None:
        # (`writer` stays set until its file is closed: a caller that stops waiting meanwhile knows it unfinished)
        writer = self.writer
        if writer is not None:
            try:
                writer.close(complete=complete)
            except BaseException:
                # (MP4 and Matroska write what they buffered, the index among it, only here: a full disk shows
                # now, and the file on disk may hold fewer frames than were encoded, or none that play)
                self.unfinished = writer.path
                raise
            finally:
                self.writer = None

    def put(self, item) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    @property
    def finalised(self) -> bool:
        return self.unfinished is None

    def finish(self) -> None:
        if self.is_alive():
            self.put(None)
            self.join()
        if self.error is not None:
            raise self.error

    def abandon(self) -> None:
        """Ends the thread after an error, the caller's or its own, with its file closed as unfinished; returns
        once that file is closed (a writer that failed closes its own file as it ends: its file is looked at only
        after that)."""
        if self.ident is None:  # stopped before it started: the file it was given is closed here
            with contextlib.suppress(Exception):  # (a failure marks it unfinished)
                self._close(False)
            return
        try:
            try:
                if self.is_alive() and self.error is None:
                    self.put(("close", False))
                    self.put(None)
            except BaseException as e:
                if e is not self.error:  # (its own error, raised here too, is the one being handled)
                    raise
            self.join()
        except BaseException:  # a further stop while it waited (Ctrl-C again): the file is left as it is
            self.unfinished = getattr(self.writer, "path", None) or self.unfinished


@dataclass
class VideoJob:
    """A checked upscaling job (``check_video_job``): what can be known before the model is loaded."""

    source: object             # a path, or the bytes of an in-memory input
    out: Path
    info: VideoInfo
    files: ResumeFiles | None  # resume work files (with resume)
    base: dict                 # the fingerprint without the model
    discard_unfinished: bool   # an unfinished resumable job of this output is to be thrown away (overwrite)


def clean_after_killed_run(out_path) -> bool:
    """Removes the work files that a killed run to ``out_path`` left (its lock file, temporary file and, where it
    made no checkpoint, its resume segments), unless a run holds the output's lock now: then False. A checkpointed
    job, a partial result and the output itself stay. (A run to the same output does this itself; this is for a
    caller that moves on to another name, as the video node does.)"""
    out, files = Path(out_path), ResumeFiles(out_path)
    try:
        with OutputLock(out):
            remove_stale([temp_path(out), files.state_tmp])
            if not files.state.exists():
                remove_stale(files.parts_on_disk(), "left by a resumable run without a checkpoint")
    except OutputBusyError:
        return False
    return True


def check_video_job(in_path, out_path, seed: int = 42, codec: str = "h264", crf: int | None = None,
                    scene_cut_threshold: float | None = None, resume: bool = False,
                    overwrite: bool = False) -> VideoJob:
    """Every check of an upscaling job that needs no model, each failure a one-line ``StreamVSRError``: the
    options, the input (readable, a video stream, a first frame that decodes), the output (not the input by
    identity, not there already unless ``overwrite``, its folder can be made) and, with ``resume``, that a
    checkpoint found belongs to this job. Nothing is written."""
    out = Path(out_path)
    if out.is_dir():  # said plainly, before the codec's rule on the suffix (which a folder's name lacks) speaks
        check_output_file(out)
    codec_spec(codec, out)
    check_crf(crf, codec)
    if not _whole(seed) or not 0 <= seed < 2**64:
        raise UserInputError(f"seed must be a whole number from 0 to 2^64-1, got {seed!r}")
    if scene_cut_threshold:
        SceneCutDetector(scene_cut_threshold)  # checks the range
    is_path = isinstance(in_path, (str, os.PathLike))
    if resume and not is_path:
        raise UserInputError("resume needs the input as a file path (a file object cannot be checked on resume)")
    source = in_path if is_path else reopenable(in_path)
    info = probe_video(source)
    check_audio(source, out.suffix)
    files = ResumeFiles(out)
    if resume:
        check_name_length(out, RESUME_NAME_EXTRA)
    try:
        check_output_file(out, [in_path] if is_path else [], overwrite=overwrite,
                          work_files=[files.state, files.state_tmp, *files.parts_on_disk()])
    except OutputExistsError as e:
        try:
            saved = files.read_info()
        except UserInputError:
            saved = None
        if saved is None:
            raise
        # A finished job whose output came after its last checkpoint: the run that published it was cut off (a
        # power cut, a kill) before its work files went. An older output is another's (its join failed).
        if saved["complete"] and _newer(out, files.state):
            raise OutputExistsError(f"{e}; the resume files next to it ({files.state.name} and its segments) are "
                                    f"left from the run that wrote it: delete them once {out.name} plays to its "
                                    "end") from None
        done = "a finished" if saved["complete"] else "an unfinished"
        raise OutputExistsError(f"{e}; {done} resumable job of it is there too ({saved['frames']} frames done, "
                                f"{files.state.name}): --resume --overwrite with its settings continues that job and "
                                f"puts its result in place of {out.name}") from None
    base = fingerprint(source, seed, codec, crf, scene_cut_threshold or None, (info.width, info.height))
    saved, damaged = files.read_info_or_discard(overwrite)
    if saved is not None or damaged:
        with OutputLock(out):  # a run writing this job right now is what to report, not its checkpoint
            pass
    if saved is not None and not resume:
        if not overwrite:
            raise UserInputError(f"{out} has an unfinished resumable job next to it ({saved['frames']} frames done, "
                                 f"{files.state.name}): add --resume to continue it, or --overwrite to discard it")
    discard = damaged or (saved is not None and not resume)
    if saved is not None and resume:
        discard = other_settings(files, fingerprint_mismatch(saved["fingerprint"], base), overwrite)
        if not discard:
            try:
                files.check_segments(saved)
            except UserInputError as e:
                if not overwrite:
                    raise
                log.info("discarding the unfinished job of %s (overwrite): %s", out, e)
                discard = True
    return VideoJob(source, out, info, files if resume else None, base, discard)


def _newer(path: Path, than: Path) -> bool:
    """Whether ``path`` was written at or after ``than`` (False where either cannot be looked at)."""
    try:
        return path.stat().st_mtime >= than.stat().st_mtime
    except OSError:  # (a symbolic link to nothing)
        return False


def _whole(value) -> bool:
    """An integer of any kind (Python, NumPy), but not a bool or a float."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def upscale_video(engine, in_path, out_path, seed: int = 42, codec: str = "h264", crf: int | None = None,
                  scene_cut_threshold: float | None = None, resume: bool = False,
                  checkpoint_seconds: float | None = None, checkpoint_frames: int | None = None,
                  progress: Callable[[int, int], None] | None = None,
                  should_stop: Callable[[], bool | None] | None = None,
                  preview: Callable[[torch.Tensor], None] | None = None, overwrite: bool = False,
                  allow_truncated: bool = False) -> dict:
    """Upscale ``in_path`` into ``out_path`` with ``engine`` (see ``models/contract.py``). Returns a summary dict.

    in_path: a path, or a seekable binary file object (not with ``resume``).
    codec: a key of ``CODECS``; the container is taken from ``out_path``'s extension. crf: H.264 quality.
    scene_cut_threshold: see ``SceneCutDetector``; None or 0 turns detection off.
    resume: write resumably (see the module docstring) and continue from a checkpoint of an earlier run of the
        same job if one is there. checkpoint_seconds / checkpoint_frames: how often to checkpoint (counted in
        input frames); neither: ``CheckpointClock``'s default.
    progress(done, total): after each written frame; total is 0 when the file does not tell.
    should_stop(): polled before each frame; return True, or raise (ComfyUI's interrupt), to stop. The frames
        done so far are then finished properly: a shorter, playable file under the partial name, or (resume) a
        checkpoint; a truthy return gives a summary with ``interrupted=True``, an exception is re-raised
        afterwards.
    preview(hr): called with each output frame (1, 3, H, W) (on the engine's device), e.g. for a UI preview.
    overwrite: replace an existing output (only once the new one is complete), or discard an unfinished
        resumable job of this output when not resuming, or when resuming one made with other settings.
    allow_truncated: a cut-off or damaged input is not an error: the frames that could be decoded go to the
        output, and the summary's ``input_problem`` says what was wrong. (A change of frame size always is.)

    Summary: frames (in the output), processed (written by this run), scene_cuts, fps, size (w, h), path (where
    the frames are: the output, or the partial file after a stop), resumed_from, interrupted, input_problem.
    """
    job = check_video_job(in_path, out_path, seed=seed, codec=codec, crf=crf,
                          scene_cut_threshold=scene_cut_threshold, resume=resume, overwrite=overwrite)
    make_folder(job.out.parent)
    with OutputLock(job.out):
        # Holding the lock, any work file of this output belongs to a run that is over.
        remove_stale([temp_path(job.out), ResumeFiles(job.out).state_tmp])
        if job.discard_unfinished:
            ResumeFiles(job.out).remove()
            log.info("discarded the unfinished resumable job of %s (overwrite)", job.out)
        elif job.files is None:
            remove_stale(ResumeFiles(job.out).parts_on_disk(), "left by a resumable run without a checkpoint")
        return _run(engine, job, seed, codec, crf, scene_cut_threshold, checkpoint_seconds, checkpoint_frames,
                    progress, should_stop, preview, overwrite, allow_truncated)


def _run(engine, job: VideoJob, seed, codec, crf, scene_cut_threshold, checkpoint_seconds, checkpoint_frames,
         progress, should_stop, preview, overwrite, allow_truncated) -> dict:
    source, out_path, info, files = job.source, job.out, job.info, job.files
    warn_if_interlaced(info, source)
    tmp = temp_path(out_path)
    detector = SceneCutDetector(scene_cut_threshold) if scene_cut_threshold else None
    scale = int(engine.scale)
    size = (info.width * scale, info.height * scale)
    check_frame_size(codec, *size)
    encoded = size
    if codec_spec(codec, out_path).pix_fmt == "yuv420p" and (size[0] % 2 or size[1] % 2):
        # FlashVSR at scale 1 or 3 can make odd sides, which 4:2:0 cannot hold (VideoWriter pads them)
        encoded = (size[0] + size[0] % 2, size[1] + size[1] % 2)
        log.info("the output frames are %dx%d; H.264 in 4:2:0 needs even sides, so the file is %dx%d (the last "
                 "column or row repeated; the lossless codec keeps the size)", *size, *encoded)
    sar = Fraction(info.sample_aspect_ratio) if info.sample_aspect_ratio else Fraction(1)
    if codec == "lossless" and sar != 1:
        # FFV1 keeps it only in a frame's side data and Matroska in the stream's header, neither of which PyAV
        # writes (H.264 keeps it in its own bitstream): said, with the one command that sets it afterwards
        shown = round(size[0] * sar)
        log.warning("the input's pixels are not square (sample aspect %s): the lossless %s will not say so, and "
                    "players show it %dx%d instead of %dx%d. Use codec h264, or afterwards: mkvpropedit \"%s\" "
                    "--edit track:v1 --set display-width=%d --set display-height=%d", sar, out_path.name, *size,
                    shown, size[1], out_path, shown, size[1])
    for note in not_kept(source, out_path.suffix) + depth_notes(source):
        log.warning(note)
    fp = {**job.base, "model": engine.identity()}
    summary = {"frames": 0, "processed": 0, "scene_cuts": 0, "fps": float(info.rate), "size": encoded,
               "path": str(out_path), "resumed_from": 0, "interrupted": False, "input_problem": None}

    state, consumed, written, segments, complete = engine.new_state(seed), 0, 0, 0, False
    last_time = [0.0]  # seconds: end of the last frame written, where the audio of a cut-off output ends
    held_pts: deque[int] = deque()  # timestamps of frames pushed into the engine and not yet returned
    problem: dict | None = None  # where the input broke: {"kind", "message"} (see reader.InputProblem)
    if files is not None:
        loaded = files.load_or_discard(engine, overwrite)
        # (the model's part of the settings can only be compared now)
        differs = fingerprint_mismatch(loaded[0]["fingerprint"], fp) if loaded is not None else None
        if other_settings(files, differs, overwrite):
            files.remove()
            log.info("discarded the unfinished resumable job of %s (%s; overwrite)", out_path, differs)
            loaded = None
        if loaded is not None:
            saved, saved_state, thumbnail = loaded
            state, segments = saved_state, int(saved["segments"])
            consumed, written = int(saved["consumed"]), int(saved["frames"])
            held_pts.extend(int(p) for p in saved["held_pts"])
            complete, summary["scene_cuts"] = bool(saved["complete"]), int(saved["scene_cuts"])
            problem = saved.get("input_problem")
            last_time[0] = float(saved.get("end_time") or 0.0)
            if detector is not None:
                detector.previous = thumbnail
            log.info("resuming %s after %d frames", out_path, written)
        keep = {files.part(i) for i in range(segments)}
        remove_stale([p for p in files.parts_on_disk() if p not in keep],
                     "written after the last checkpoint (redone now)")
    summary["resumed_from"] = written

    tags = color_tags(source)

    def make_writer(segment: int) -> VideoWriter:
        path = files.part(segment) if files is not None else tmp
        return VideoWriter(path, size[0], size[1], info.rate, info.time_base, codec=codec, crf=crf,
                           audio_from=None if files is not None else source, b_frames=files is None,
                           sample_aspect_ratio=info.sample_aspect_ratio, color_tags=tags,
                           origin_us=0 if files is not None else info.origin_us)

    clock = CheckpointClock(checkpoint_seconds, checkpoint_frames, min_frames=MIN_SEGMENT_FRAMES)

    def checkpoint(segment_count: int, ckpt_state, counts: dict, thumb, done: bool, copy_took: float) -> None:
        started = time.monotonic() - copy_took  # (the state's copy to the CPU, on the main thread, counts too)
        if segment_count:  # the segments a checkpoint counts reach the disk before it does (the earlier ones did)
            sync_file(files.part(segment_count - 1))
        # (their sizes, so that a resume finds a segment cut short before it redoes the rest, not when joining)
        sizes = [files.part(i).stat().st_size for i in range(segment_count)]
        files.save(ckpt_state, {**counts, "segments": segment_count, "segment_bytes": sizes, "complete": done,
                                "fingerprint": fp}, thumb)
        clock.save_took = time.monotonic() - started

    stop_error: BaseException | None = None
    start_written = written
    stopped = False
    if not complete:
        seeked = seek_to(source, consumed) if consumed else None
        if consumed and seeked is None:
            # (said, since the progress stays put meanwhile: decoding a long input up to there takes minutes)
            log.info("the input cannot be seeked exactly: it is decoded up to frame %d first", consumed)
        writer = WriterThread(make_writer, checkpoint if files is not None else None, segments)

        def emit(frames: torch.Tensor) -> None:
            nonlocal written
            for hr in frames:
                hr = hr[None]
                if preview is not None:
                    preview(hr)
                pts = held_pts.popleft()
                duration = reader.duration_of(pts)
                writer.put(("frame", to_rgb24(hr), pts, duration))
                last_time[0] = float((pts + (duration or 1 / (info.rate * info.time_base))) * info.time_base)
                written += 1
                if progress is not None:
                    progress(written, max(info.frames, written))

        def save_checkpoint(final: bool) -> None:
            counts = {"frames": written, "consumed": consumed, "held_pts": list(held_pts),
                      "scene_cuts": summary["scene_cuts"], "input_problem": problem, "end_time": last_time[0]}
            started = time.monotonic()
            on_cpu = state.to("cpu")
            writer.put(("checkpoint", on_cpu, counts, detector.previous if detector is not None else None, final,
                        time.monotonic() - started))

        clock.restart()
        reader, decoding_back = None, False
        try:
            if files is None:
                # Opening the output up front fails early on unwritable paths, and a file exists even for 0 frames.
                writer.writer = make_writer(0)
            writer.start()
            reader = FrameReader(source, start=consumed, info=info, seeked=seeked)
            for index, lr, pts in reader:
                if should_stop is not None:  # (also while a resumed job decodes its way back, which takes minutes)
                    try:
                        stopped = bool(should_stop())
                    except BaseException as e:
                        stop_error, stopped = e, True
                    if stopped:
                        summary["interrupted"] = True
                        break
                if index < consumed:
                    decoding_back = True
                    continue
                if decoding_back:  # (that time was no work a checkpoint keeps: the clock starts at the first frame)
                    clock.restart()
                    decoding_back = False
                if detector is not None and detector(lr) and index > 0:
                    out, state = engine.reset_temporal(state, consume=True)
                    emit(out)
                    summary["scene_cuts"] += 1
                    log.info("scene cut at frame %d: temporal state reset", index)
                held_pts.append(pts)
                out, state = engine.push(state, lr[None], consume=True)
                consumed += 1
                emit(out)
                if clock.frame_done() and files is not None:
                    save_checkpoint(False)
                    clock.restart()
            # Reached at the end of the input (complete or not) or at a requested stop. A stop does not finish the
            # frames the engine holds (that can be a whole chunk of work): with resume they stay in the
            # checkpointed state. Where the input broke, the frames before it are finished: they are good.
            if stopped:
                if files is not None:
                    save_checkpoint(False)
                else:
                    writer.put(("close", False))
            else:
                if reader.problem is not None:
                    problem = {"kind": reader.problem.kind, "message": reader.problem.message}
                out, state = engine.flush(state, consume=True)
                emit(out)
                if files is not None:
                    save_checkpoint(True)
                else:
                    writer.put(("close", problem is None))
            writer.finish()
            segments = writer.segment
            # (here, not in `finally`: a stop while it closes keeps the finished file as partial, said below)
            closing, reader, seeked = reader, None, None
            closing.close()
        except BaseException as e:
            # An error or a hard interrupt mid-frame: end the writer without a new checkpoint (the last one still
            # matches what is on disk) and keep what was written, playable, under the partial name.
            cause = "stop" if isinstance(e, KeyboardInterrupt) else "error"
            writer.abandon()
            if not writer.finalised:
                log.warning("could not finalise %s", writer.unfinished)
            if files is None:
                written = max(written, writer.frames)  # (a stop can come between a frame's hand-over and its count)
                if written > start_written:
                    on_disk = writer.frames if writer.finalised or not tmp.exists() else frames_on_disk(tmp)
                    if not on_disk:  # e.g. a full disk: an MP4 without its index, of no use and taking space
                        with contextlib.suppress(OSError):
                            tmp.unlink()
                    kept = keep_partial(tmp, out_path)
                    if kept is not None and writer.finalised:
                        log.warning("%s written before this %s %s in %s", _the_frames(on_disk), cause,
                                    "is" if on_disk == 1 else "are", kept)
                    elif kept is not None:
                        log.warning("%d of the %d frames done before this %s are in %s, which could not be "
                                    "finished and may not play everywhere", on_disk, written, cause, kept)
                    else:  # the writer failed before it made its file, or its file holds none
                        log.warning("%s done before this %s could not be kept", _the_frames(written), cause)
                else:
                    remove_stale([tmp], "an empty output of a failed run")
            raise
        finally:
            if reader is not None:
                reader.close()
            elif seeked is not None:
                seeked.container.close()
        complete = not stopped
    summary["frames"] = written
    summary["processed"] = written - start_written
    summary["input_problem"] = problem["message"] if problem else None
    # A cut-off or damaged input may be accepted; a change of frame size or clock cannot be (the output has one).
    accept = problem is not None and allow_truncated and problem["kind"] not in ONE_OUTPUT

    if files is None:
        if stopped:
            if written:
                summary["path"] = str(keep_partial(tmp, out_path))
            else:
                remove_stale([tmp], "an empty output of a stopped run")
                summary["path"] = None
        elif problem is not None and not accept:
            kept = keep_partial(tmp, out_path)
            raise InputDamagedError(_broken(problem, written, kept, out_path), frames=written, path=kept)
        else:
            _publish(tmp, out_path, overwrite, None)
    elif complete:
        parts = [files.part(i) for i in range(segments)]
        if not parts:
            raise UserInputError(f"{describe(source)} has no frames to upscale")
        until = last_time[0] if problem is not None and last_time[0] else None
        try:
            summary["frames"] = join_segments(parts, tmp, audio_from=source, time_base=info.time_base,
                                              audio_until=until, rate=info.rate, origin_us=info.origin_us,
                                              end=last_time[0] or None)
        except BaseException as e:
            with contextlib.suppress(OSError):
                tmp.unlink()  # (half a file, taking the space a join needs)
            if isinstance(e, (OSError, KeyboardInterrupt)):  # (the machine or a stop; not a damaged segment)
                log.warning("all %d frames of %s are in its resume files: the same job run again with resume only "
                            "joins them", written, out_path)
            raise
        if summary["frames"] != written:
            # A segment damaged in place (its size unchanged: the demuxer skips what it cannot read), or a bug:
            # nothing is published, and the work files stay, for the user to decide
            remove_stale([tmp], "an incomplete join")
            raise UserInputError(f"joining the resume segments of {out_path} gave {summary['frames']} frames instead "
                                 f"of {written}, so one of them is damaged (if none is, please report it); the "
                                 f"segments and {files.state.name} were kept: delete {files.state.name} to start over "
                                 "(its finished segments are then redone)")
        if problem is not None and not accept:
            # The finished job stays (checkpoint and segments) where the input can be accepted as the error
            # suggests, which then joins them again instead of upscaling the whole video anew; a change of frame
            # size cannot be accepted, so those files would never be of use.
            kept = keep_partial(tmp, out_path)
            acceptable = problem["kind"] not in ONE_OUTPUT
            if not acceptable:
                files.remove()
            raise InputDamagedError(_broken(problem, summary["frames"], kept, out_path, resumable=acceptable),
                                    frames=summary["frames"], path=kept)
        _publish(tmp, out_path, overwrite, files)
    if stop_error is not None:
        # The caller (ComfyUI's Cancel) only sees the exception: what was kept must be said here
        if files is not None:
            log.warning("stopped after writing %d frames of %s; its resume files keep the work done: run it again "
                        "with the same settings and resume on to continue", written, out_path)
        elif summary["path"] is not None:
            log.warning("stopped after %d frames: they are in %s (%s was not written)", written, summary["path"],
                        out_path)
        raise stop_error
    if summary["interrupted"] and files is not None:  # (the command line says it in its own words)
        log.debug("stopped after %d frames; run again with resume to continue", written)
    return summary


def _the_frames(count: int) -> str:
    return "the frame" if count == 1 else f"the {count} frames"


def _publish(tmp: Path, out: Path, overwrite: bool, files: ResumeFiles | None) -> None:
    """``publish``, then the resume files go. A stop (a second Ctrl-C) that comes once the result is in place, while
    the folder is flushed or the work files go, leaves a finished job: said, and its work files removed (they told
    the next run to continue a job that is done)."""
    finished = os.stat(tmp)
    try:
        # (a resume job stopped before the move keeps its work in the resume files, which the same command joins
        # again: a second whole copy, kept as partial, would only take the space)
        publish(tmp, out, overwrite=overwrite, keep_stopped=files is None)
        if files is not None:
            files.remove()
    except KeyboardInterrupt:
        with contextlib.suppress(OSError):
            now = os.stat(out)
            if (now.st_dev, now.st_ino) == (finished.st_dev, finished.st_ino):
                log.warning("the stop came after %s was finished", out)
                if files is not None:
                    files.remove()
        raise


def _broken(problem: dict, frames: int, kept, out_path, resumable: bool = False) -> str:
    """The one-line report of an input that broke: what broke, what was kept where, what to do (``resumable``: the
    job's resume files are kept)."""
    if frames == 1:
        where = f"the frame before it was upscaled into {kept}"
    elif frames:
        where = f"the {frames} frames before it were upscaled into {kept}"
    else:
        where = "no frame could be upscaled"
    text = f"{problem['message']}. {out_path} was not written; {where}"
    if problem["kind"] not in ONE_OUTPUT:
        text += ". To accept the input as it is: --allow-truncated (command line) or allow_truncated (the node)"
        if resumable:
            text += ", with resume on: the job's resume files are kept, so that only joins them again"
    return text
