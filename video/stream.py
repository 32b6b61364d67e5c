"""Stream a video file through any engine (``models/contract.py``) into another video file.

Memory does not depend on the video's length. The main thread decodes a frame, pushes it into the engine and
converts whatever frames the engine returns to 8-bit RGB (one per input frame for Stream-DiffVSR; a chunk at a
time, a few frames late, for FlashVSR); a writer thread encodes and muxes them. Between the two sits a queue of at most
``QUEUE_FRAMES`` frames, and x264's look-ahead is capped at ``X264_LOOKAHEAD`` frames, so at any time only a
fixed number of frames is alive however long the video is. Nothing is kept per frame.

Timing: output frames keep the input frames' timestamps (same time base), so frame rate and variable frame
timing survive. Audio: every audio stream is copied packet for packet; only where the output container cannot
hold the codec (e.g. PCM in MP4) is it re-encoded to AAC. Colour: the input is decoded to RGB with the matrix
it is tagged with (untagged: BT.709 from 720 lines up, BT.601 below, as players assume); H.264 output is
encoded and tagged as BT.709 limited range, the convention for HD and 4K video.

Scene cuts (optional): ``SceneCutDetector`` compares consecutive LR frames; at a cut the temporal guidance is
dropped (``engine.reset_temporal``), so the first frame of the new shot is upscaled like a first frame instead of
being guided by the previous shot. The noise sequence carries on across a cut.

Resume (optional, ``resume=True``): the video is written as segments ``OUT.streamvsr-partNNNN.EXT`` (video
only, each a complete file) and, at every checkpoint, the engine state and the count of frames written go to
``OUT.streamvsr-resume.safetensors`` (with the timestamps of frames the engine still holds). A checkpoint closes the current segment first, so the state always
matches what is on disk, also after a crash or power loss (work since the last checkpoint is redone). When
all frames are done, the segments are joined into OUT without re-encoding, the audio is added from the input,
and the work files are deleted. H.264 segments are encoded without B-frames so that their timestamps can be
joined as they are (files get a few percent larger at the same CRF).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

import torch

from ..models.shared.errors import UserInputError
from .reader import FrameReader, describe, reopenable
from .resume import ResumeFiles, fingerprint, join_segments
from .scenecut import SceneCutDetector
from .writer import VideoWriter, codec_spec, color_tags, to_rgb24

log = logging.getLogger(__name__)

# Frames waiting between the engine and the encoder: enough to overlap the two, few enough to stay flat.
QUEUE_FRAMES = 2


class WriterThread(threading.Thread):
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
    """Upscale ``in_path`` into ``out_path`` with ``engine`` (see ``models/contract.py``). Returns a summary dict.

    in_path: a path, or a seekable binary file object (not with ``resume``).
    codec: a key of ``CODECS``; the container is taken from ``out_path``'s extension. crf: H.264 quality.
    scene_cut_threshold: see ``SceneCutDetector``; None or 0 turns detection off.
    resume: write resumably (see the module docstring) and continue from a checkpoint of an earlier run of the
        same job if one is there. checkpoint_seconds / checkpoint_frames: how often to checkpoint (counted in
        input frames).
    progress(done, total): after each written frame; total is 0 when the file does not tell.
    should_stop(): polled before each frame; return True, or raise (ComfyUI's interrupt), to stop. The frames
        done so far are then finished properly: a shorter but playable file, or (resume) a checkpoint; a truthy return gives a summary with ``interrupted=True``, an
        exception is re-raised afterwards.
    preview(hr): called with each output frame (1, 3, H, W) (on the engine's device), e.g. for a UI preview.

    Summary: frames (in the output), processed (written by this run), scene_cuts, fps, size (w, h), path,
    resumed_from, interrupted.
    """
    out_path = Path(out_path)
    codec_spec(codec, out_path)
    if resume and not isinstance(in_path, (str, os.PathLike)):
        raise UserInputError("resume needs the input as a file path (a file object cannot be checked on resume)")
    if isinstance(in_path, (str, os.PathLike)) and Path(in_path).resolve() == out_path.resolve():
        raise UserInputError("the output file must not be the input file")
    in_path = reopenable(in_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    files = ResumeFiles(out_path) if resume else None
    detector = SceneCutDetector(scene_cut_threshold) if scene_cut_threshold else None

    probe = FrameReader(in_path)
    info = probe.info
    sar = probe.stream.codec_context.sample_aspect_ratio
    probe.close()
    scale = int(engine.scale)
    size = (info.width * scale, info.height * scale)
    job = fingerprint(in_path, engine, seed, codec, crf, scene_cut_threshold, (info.width, info.height))
    summary = {"frames": 0, "processed": 0, "scene_cuts": 0, "fps": float(info.rate), "size": size,
               "path": str(out_path), "resumed_from": 0, "interrupted": False}

    state, consumed, written, segments, complete = engine.new_state(seed), 0, 0, 0, False
    held_pts: deque[int] = deque()  # timestamps of frames pushed into the engine and not yet returned
    if files is not None:
        loaded = files.load(engine)
        if loaded is not None:
            saved, saved_state, thumbnail = loaded
            if saved.get("fingerprint") != job:
                raise UserInputError(
                    f"{files.state} belongs to a job with other settings or another input "
                    f"(saved {saved.get('fingerprint')}, now {job}); delete it to start over, or run "
                    "with the same settings")
            state, segments = saved_state, int(saved["segments"])
            consumed, written = int(saved["consumed"]), int(saved["frames"])
            held_pts.extend(int(p) for p in saved["held_pts"])
            complete, summary["scene_cuts"] = bool(saved["complete"]), int(saved["scene_cuts"])
            if detector is not None:
                detector.previous = thumbnail
            log.info("resuming %s after %d frames", out_path, written)
        keep = {files.part(i) for i in range(segments)}
        for stale in files.parts_on_disk():
            if stale not in keep:
                stale.unlink()  # written after the last checkpoint: incomplete or not matching the state
        missing = [p for p in sorted(keep) if not p.exists()]
        if missing:
            raise UserInputError(f"the resume state {files.state} needs {missing[0]}, which is gone; delete the "
                             "state file to start over")
    summary["resumed_from"] = written

    tags = color_tags(in_path) if codec != "lossless" else {}

    def make_writer(segment: int) -> VideoWriter:
        path = files.part(segment) if files is not None else out_path
        return VideoWriter(path, size[0], size[1], info.rate, info.time_base, codec=codec, crf=crf,
                           audio_from=None if files is not None else in_path, b_frames=files is None,
                           sample_aspect_ratio=sar, color_tags=tags)

    def checkpoint(segment_count: int, ckpt_state, counts: dict, thumb, done: bool) -> None:
        files.save(ckpt_state, {**counts, "segments": segment_count, "complete": done, "fingerprint": job}, thumb)

    stop_error: BaseException | None = None
    start_written = written
    if not complete:
        writer = WriterThread(make_writer, checkpoint if files is not None else None, segments)
        if files is None:
            # Opening the output up front fails early on unwritable paths, and a file exists even for 0 frames.
            writer.writer = make_writer(0)
        writer.start()

        def emit(frames: torch.Tensor) -> None:
            nonlocal written
            for hr in frames:
                hr = hr[None]
                if preview is not None:
                    preview(hr)
                writer.put(("frame", to_rgb24(hr), held_pts.popleft()))
                written += 1
                if progress is not None:
                    progress(written, max(info.frames, written))

        def save_checkpoint(final: bool) -> None:
            counts = {"frames": written, "consumed": consumed, "held_pts": list(held_pts),
                      "scene_cuts": summary["scene_cuts"]}
            writer.put(("checkpoint", state.to("cpu"), counts,
                        detector.previous if detector is not None else None, final))

        last_checkpoint, since_checkpoint = time.monotonic(), 0
        stopped = False
        reader = FrameReader(in_path, start=consumed)
        try:
            for index, lr, pts in reader:
                if index < consumed:
                    continue
                if should_stop is not None:
                    try:
                        stopped = bool(should_stop())
                    except BaseException as e:
                        stop_error, stopped = e, True
                    if stopped:
                        summary["interrupted"] = True
                        break
                if detector is not None and detector(lr) and index > 0:
                    out, state = engine.reset_temporal(state)
                    emit(out)
                    summary["scene_cuts"] += 1
                    log.info("scene cut at frame %d: temporal state reset", index)
                held_pts.append(pts)
                out, state = engine.push(state, lr[None])
                consumed += 1
                emit(out)
                since_checkpoint += 1
                if files is not None and (
                        (checkpoint_frames and since_checkpoint >= checkpoint_frames)
                        or (not checkpoint_frames and time.monotonic() - last_checkpoint >= checkpoint_seconds)):
                    save_checkpoint(False)
                    last_checkpoint, since_checkpoint = time.monotonic(), 0
            # Reached only at the end of the input or at a requested stop. A stop does not finish the frames the
            # engine holds (that can be a whole chunk of work): with resume they stay in the checkpointed state.
            if stopped:
                if files is not None:
                    save_checkpoint(False)
                else:
                    writer.put(("close", False))
            else:
                out, state = engine.flush(state)
                emit(out)
                if files is not None:
                    save_checkpoint(True)
                else:
                    writer.put(("close", True))
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
    summary["frames"] = written
    summary["processed"] = written - start_written

    if files is not None and complete:
        parts = [files.part(i) for i in range(segments)]
        if not parts:
            raise UserInputError(f"{describe(in_path)} has no frames to upscale")
        tmp = out_path.with_name(out_path.stem + ".streamvsr-tmp" + out_path.suffix)
        summary["frames"] = join_segments(parts, tmp, audio_from=in_path, time_base=info.time_base)
        os.replace(tmp, out_path)
        files.remove()
    if stop_error is not None:
        raise stop_error
    if summary["interrupted"] and files is not None:
        log.info("stopped after %d frames; run again with resume to continue", written)
    return summary
