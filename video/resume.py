"""The work files of a resumable job: video segments, the engine state checkpoint, and joining the segments."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import logging
import os
import re
import time
from fractions import Fraction
from pathlib import Path

import torch

from ..models.contract import LATER_IDENTITY_FIELDS
from ..models.shared.errors import UserInputError, cannot_read
from ..models.shared.runtime import PRECISIONS
from ..models.shared.weights import save_safetensors
from .audio import AudioCopy
from .outputs import sync_file, sync_folder
from .reader import content_sample, ffmpeg_path
from .writer import CODECS, clock_start

# Bumped whenever the checkpoint's content changes meaning: an old checkpoint is then refused, not misread.
# 3: frames are turned upright by the input's display matrix (older segments of a rotated input were not).
# 4: Stream-DiffVSR's identity names its flow model (a checkpoint of 3 cannot tell which flow made it).
RESUME_VERSION = 4

log = logging.getLogger(__name__)


STATE_SUFFIX = ".streamvsr-resume.safetensors"  # a job's checkpoint: its output's name with this added
PART_TAG = ".streamvsr-part"  # a job's segments: its output's name with this, a number and .nut added


class CheckpointClock:
    """When a resumable job saves a checkpoint. Where asked for (``seconds``, or ``frames`` input frames), exactly
    so. By default every 60 s, but no sooner than 20 times as long as the last checkpoint took to write (a FlashVSR
    state at a 1080p output is about 10 GB: written every minute it would cost more than the frames), and with
    ``min_frames`` (a video, where each checkpoint closes a segment, and each segment starts with a keyframe) not
    before that many frames since the last one, unless 10 minutes have passed: a CPU run whose frames take over a
    minute made a keyframe of every frame."""

    DEFAULT_SECONDS = 60.0
    SAVE_SHARE = 20  # (a checkpoint's writing is then at most 5 % of the run)
    LONGEST_WAIT = 600.0  # the most work a crash may lose to ``min_frames``, in seconds

    def __init__(self, seconds: float | None = None, frames: int | None = None, min_frames: int = 1):
        self.seconds, self.frames, self.min_frames = seconds, frames, min_frames
        self.save_took = 0.0  # set by whoever writes the checkpoint (in a video job, the writer thread)
        self.restart()

    def restart(self) -> None:
        """A checkpoint was just made (or the run started)."""
        self.since, self.frames_since = time.monotonic(), 0

    def frame_done(self) -> bool:
        """Counts an input frame; whether to checkpoint now."""
        self.frames_since += 1
        if self.frames:
            return self.frames_since >= self.frames
        elapsed = time.monotonic() - self.since
        if self.seconds is not None:
            return elapsed >= self.seconds
        return elapsed >= max(self.DEFAULT_SECONDS, self.SAVE_SHARE * self.save_took) and (
            self.frames_since >= self.min_frames or elapsed >= self.LONGEST_WAIT)


class DamagedCheckpoint(UserInputError):
    """A resume file that cannot be read as a run writes it; ``problem`` says so without advice."""

    def __init__(self, problem: str):
        super().__init__(f"{problem}; add --overwrite to discard the job and start over (in ComfyUI: delete that "
                         "resume file)")
        self.problem = problem


class ResumeFiles:
    """The work files of a resumable job writing ``out_path``."""

    def __init__(self, out_path):
        self.out = Path(out_path)
        self.state = self.out.with_name(self.out.name + STATE_SUFFIX)

    def part(self, index: int) -> Path:
        # NUT keeps every timestamp exactly in the input's time base (MP4 would round a segment's start to the
        # millisecond through its edit list) and carries any codec.
        return self.out.with_name(f"{self.out.name}{PART_TAG}{index:04d}.nut")

    def parts_on_disk(self) -> list[Path]:
        """This job's segments that are on the disk, in order; exactly the names ``part`` makes (a prefix would also
        take other files: another output's partial result ``OUT.streamvsr-partial.EXT``, a user's file)."""
        name = re.compile(re.escape(self.out.name + PART_TAG) + r"(\d{4,})\.nut")
        found = []
        for p in self.out.parent.glob(f"{glob_escape(self.out.name)}{PART_TAG}*.nut"):
            match = name.fullmatch(p.name)
            if match:
                found.append((int(match.group(1)), p))
        return [p for _, p in sorted(found)]

    @property
    def state_tmp(self) -> Path:
        return self.state.with_name(self.state.name + ".tmp")

    def read_info(self) -> dict | None:
        """The checkpoint's description (frames done, settings), read without the model; None when there is no
        checkpoint. A damaged file is a one-line error that says how to start over."""
        from safetensors import safe_open

        if not self.state.exists():
            return None
        _check_readable(self.state)
        try:
            with safe_open(str(self.state), "pt") as f:
                meta = f.metadata() or {}
            info = json.loads(meta["streamvsr_resume"])
            missing = [k for k in ("fingerprint", "segments", "consumed", "frames", "held_pts", "complete",
                                   "scene_cuts") if k not in info]
            if missing:
                raise KeyError(", ".join(missing))
            _check_info(info)
        except Exception as e:  # any kind of damage means the same to the user
            raise DamagedCheckpoint(f"the resume file {self.state} is damaged ({type(e).__name__}: {e})") from None
        return info

    def read_info_or_discard(self, overwrite: bool) -> tuple[dict | None, bool]:
        """``(read_info(), False)``, or ``(None, True)`` where the checkpoint is damaged and ``overwrite`` discards
        the job (the work it counts cannot be continued without it)."""
        try:
            return self.read_info(), False
        except DamagedCheckpoint as e:
            if not overwrite:
                raise
            log.info("discarding the unfinished job (overwrite): %s", e.problem)
            return None, True

    def check_segments(self, info: dict) -> None:
        """That the segments the checkpoint ``info`` counts are there, as long as they were (where it recorded
        that) and readable: a damaged one is found before the rest of the job is done, not when joining."""
        import av

        sizes = info.get("segment_bytes") or itertools.repeat(None)  # (none recorded by an earlier release)
        for i, size in zip(range(info["segments"]), sizes):
            part = self.part(i)
            if not part.exists():
                raise UserInputError(f"the resume state {self.state} needs {part}, which is gone; delete the state "
                                     "file to start over")
            _check_readable(part)
            try:
                if size is not None and part.stat().st_size != size:
                    raise ValueError(f"{part.stat().st_size} bytes, where it was written with {size}")
                with av.open(ffmpeg_path(part)) as segment:
                    if not segment.streams.video:
                        raise ValueError("no video stream")
            except Exception as e:  # any kind of damage means the same to the user
                raise _damaged(part, e) from None

    def load(self, engine):
        """``(info, engine state, scene thumbnail or None)`` of the last checkpoint, or None when there is none; the
        state None where the checkpoint is of another model or model settings (for the caller to say so)."""
        from safetensors import safe_open

        info = self.read_info()
        if info is None:
            return None
        now = engine.identity()
        if info["fingerprint"].get("model", now) != as_saved(info["fingerprint"].get("model"), now):
            # another model's state would not fit this one: the callers say what changed (and discard the job
            # with overwrite), as for any other setting
            return info, None, None
        try:
            with safe_open(str(self.state), "pt") as f:
                meta = f.metadata()
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            state = engine.state_from_dict({k: v for k, v in tensors.items() if k != "scene_thumbnail"}, meta)
        except Exception as e:
            raise DamagedCheckpoint(f"the resume file {self.state} is damaged or does not fit this model "
                                    f"({type(e).__name__}: {e})") from None
        return info, state, tensors.get("scene_thumbnail")

    def load_or_discard(self, engine, overwrite: bool):
        """``load(engine)``, where ``overwrite`` discards a damaged checkpoint (its files removed: None)."""
        try:
            return self.load(engine)
        except DamagedCheckpoint as e:
            if not overwrite:
                raise
            self.remove()
            log.info("discarded the unfinished job (overwrite): %s", e.problem)
            return None

    def save(self, state, info: dict, thumbnail: torch.Tensor | None) -> None:
        tensors, meta = state.to("cpu").to_dict()
        if thumbnail is not None:
            tensors["scene_thumbnail"] = thumbnail.contiguous()
        meta = {**meta, "streamvsr_resume": json.dumps(info)}
        tmp = self.state_tmp
        save_safetensors(tensors, tmp, metadata=meta)
        sync_file(tmp)
        os.replace(tmp, self.state)  # atomic: a crash leaves the previous checkpoint intact
        sync_folder(self.state.parent)

    def remove(self) -> None:
        # The checkpoint first: segments without one are work files of no job (removed by the next run), while a
        # checkpoint without its segments would stop every later run.
        self.state.unlink(missing_ok=True)
        self.state_tmp.unlink(missing_ok=True)
        for p in self.parts_on_disk():
            p.unlink(missing_ok=True)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_info(info: dict) -> None:
    """Raise where a checkpoint's description is not what a run writes (a file damaged, or edited by hand): every
    count a whole number in its range, every list of its kind. Read as it was, such a file hung a run (a billion
    segments to look for) or gave a short video and success."""
    fingerprint, size = info["fingerprint"], info["fingerprint"].get("size") if isinstance(info["fingerprint"],
                                                                                         dict) else None
    if not isinstance(fingerprint, dict) or not (isinstance(size, list) and len(size) == 2
                                                 and all(_whole(v) and v > 0 for v in size)):
        raise ValueError("its settings are not readable")
    counts = {key: info[key] for key in ("segments", "consumed", "frames", "scene_cuts")}
    if not all(_whole(v) and v >= 0 for v in counts.values()) or info["frames"] > info["consumed"]:
        raise ValueError(f"its counts do not add up ({', '.join(f'{k} {v}' for k, v in counts.items())})")
    if not isinstance(info["complete"], bool):
        raise ValueError("it does not say whether the job is complete")
    if not isinstance(info["held_pts"], list) or not all(_whole(v) and abs(v) < 2**62 for v in info["held_pts"]):
        raise ValueError("its timestamps are not whole numbers")
    lengths = info.get("segment_bytes")
    if lengths is not None and not (isinstance(lengths, list) and len(lengths) == info["segments"]
                                    and all(_whole(v) and v >= 0 for v in lengths)):
        raise ValueError("its segment sizes do not match its segments")
    after = info.get("after", [])
    if not (isinstance(after, list) and all(isinstance(v, str) for v in after)):
        raise ValueError("its list of outputs is not readable")
    end = info.get("end_time")
    if end is not None and not (isinstance(end, (int, float)) and not isinstance(end, bool) and math.isfinite(end)):
        raise ValueError("its end time is not a number")
    problem = info.get("input_problem")
    if problem is not None and not (isinstance(problem, dict) and isinstance(problem.get("kind"), str)
                                    and isinstance(problem.get("message"), str)):
        raise ValueError("its note on the input is not readable")


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def fingerprint(source, seed, codec, crf, scene_cut_threshold, size: tuple[int, int], engine=None) -> dict:
    """Everything that must be equal for a checkpoint to continue a job: the input, the output settings and, once
    the model is loaded, the engine's identity (model, precision, options). Without ``engine`` it is the part
    that can be checked before loading the model."""
    if isinstance(source, (str, os.PathLike)):
        src = {"input": os.path.abspath(source), "input_bytes": os.path.getsize(source),
               "input_sample": content_sample(source)}
    else:
        src = {"input": None, "input_bytes": None}
    if crf is not None and str(int(crf)) == CODECS[codec].options.get("crf"):
        crf = None  # the default spelled out is the same job (and None is what checkpoints hold for it)
    job = {**src, "size": list(size), "seed": int(seed), "codec": codec, "crf": crf,
           "scene_cut": scene_cut_threshold, "version": RESUME_VERSION}
    if engine is not None:
        job["model"] = engine.identity()
    return job


def folder_fingerprint(in_dir, names: list[str], stamps: list[str], seed, save: str, size: tuple[int, int],
                       engine=None) -> dict:
    """``fingerprint`` of a ``frames`` job that has read the frames ``names`` of ``in_dir`` (``stamps``: each
    one's size and modification time): only those. Frames after them may change or be added, so that a sequence
    still being rendered, or a bad frame that stopped the job and was fixed, is continued."""
    digest = hashlib.sha256()
    for name, stamp in zip(names, stamps):
        digest.update(f"{name}\0{stamp}\0".encode("utf-8", "surrogateescape"))
    job = {"input": os.path.abspath(in_dir), "frames_read": {"count": len(names), "sha256": digest.hexdigest()},
           "size": list(size), "seed": int(seed), "save": save, "version": RESUME_VERSION}
    if engine is not None:
        job["model"] = engine.identity()
    return job


def fingerprint_mismatch(saved: dict, now: dict) -> str | None:
    """None when ``saved`` continues ``now`` (only the keys of ``now`` are compared), else what differs. An input
    told by its content (a video's size and sample, a folder's frames) may have moved: its path is then not
    compared. A checkpoint without a sample (of an earlier release) is compared by the input's path and size."""
    names = {"input": "input", "input_bytes": "input size", "size": "frame size", "seed": "seed", "codec": "codec",
             "scene_cut": "scene cut", "version": "resume format", "model": "model/settings", "save": "format"}
    same_content = (("input_sample" in now and saved.get("input_sample") == now["input_sample"]
                     and saved.get("input_bytes") == now.get("input_bytes"))
                    or ("frames_read" in now and saved.get("frames_read") == now["frames_read"]))
    diffs = []
    for key, value in now.items():
        if (key == "input" and same_content) or (key == "input_sample" and "input_sample" not in saved):
            continue
        if saved.get(key) != value:
            if key == "input_sample":
                if saved.get("input_bytes") == now.get("input_bytes"):  # (else the size says it)
                    diffs.append("the input is another file of the same size")
            elif key == "frames_read":
                diffs.append(f"the {value['count']} frames it read are not those files now (renamed, changed, added "
                             "between them or removed)")
            elif key == "model":
                if saved.get(key) != as_saved(saved.get(key), value):
                    diffs.append(_model_change(saved.get(key), as_saved(saved.get(key), value)))
            elif key == "crf":
                diffs.append(f"crf {_crf(saved.get(key))} then, {_crf(value)} now")
            elif key == "scene_cut":
                diffs.append(f"scene cut {saved.get(key) or 'off'} then, {value or 'off'} now")
            else:
                diffs.append(f"{names.get(key, key)} {saved.get(key)!r} then, {value!r} now")
    return "; ".join(diffs) or None


def other_settings(files: ResumeFiles, differs: str | None, overwrite: bool) -> bool:
    """Whether a checkpoint whose settings ``differs`` (None: the same) is to be discarded: with ``overwrite``;
    without it, that is an error."""
    if differs and not overwrite:
        raise UserInputError(f"{files.state} belongs to a job with other settings ({differs}); run with the same "
                             "settings to continue it, or add --overwrite to discard it and start over")
    return bool(differs)


def check_model_family(files: ResumeFiles, family: str, overwrite: bool) -> None:
    """Before the model loads: a checkpoint that another model family wrote is refused now, in the line the full
    comparison gives once the model is loaded (that of a large model can take minutes). With ``overwrite`` it is
    left for that comparison to discard."""
    info = None if overwrite else files.read_info()
    saved = info["fingerprint"].get("model") if info is not None else None
    if saved is not None and str(saved).split("|")[0] != family:
        other_settings(files, _model_change(saved, family), overwrite=False)


def _crf(value) -> str:
    return "the default" if value is None else str(value)


_OPTION_NAMES = {"steps": "steps", "scale": "scale", "sparse": "sparse ratio", "local": "local range",
                 "kv": "kv ratio", "color": "color fix"}


def as_saved(saved, now: str) -> str:
    """Engine identity ``now`` as a checkpoint that holds ``saved`` would have written it: without the fields added
    since (``LATER_IDENTITY_FIELDS``) that ``saved`` lacks, so that a job of an earlier release continues."""
    if not isinstance(saved, str):
        return now
    had = {field.partition("=")[0] + "=" for field in saved.split("|")}
    return "|".join(f for f in now.split("|") if not (f.startswith(LATER_IDENTITY_FIELDS) and
                                                       f.partition("=")[0] + "=" not in had))


_PRECISIONS = {str(dtype): name for name, dtype in PRECISIONS.items()}


def _model_change(saved, now: str) -> str:
    """What differs between two engine identities (``identity()``: "family|...|name=value|..."), naming the
    precision and the options that changed; the weights are checksums, told as another model."""
    old, new = str(saved).split("|"), now.split("|")
    if old[0] != new[0]:
        return f"another model: {old[0]} then, {new[0]} now"
    if len(old) != len(new):
        return "another model"
    named, weights = [], False
    for index, (a, b) in enumerate(zip(old, new)):
        key, _, before = a.partition("=")
        after = b.partition("=")[2]
        if a == b:
            continue
        if key in _OPTION_NAMES and b.startswith(key + "="):
            named.append(f"{_OPTION_NAMES[key]} {before} then, {after} now")
        elif key == "flow" and b.startswith("flow="):
            named.append(_flow_change(before, after))
        elif a in _PRECISIONS and b in _PRECISIONS:
            named.append(f"precision {_PRECISIONS[a]} then, {_PRECISIONS[b]} now")
        elif old[0] == "flashvsr" and index == 1:  # (its release: v1, v1.1)
            named.append(f"FlashVSR {a} then, {b} now")
        else:
            weights = True
    if weights:  # (weights loaded in another precision have other checksums: that change is named already)
        precision = any(n.startswith("precision ") for n in named)
        named.append("the weights as loaded differ too" if precision else "another model")
    return "; ".join(named)


def _flow_change(before: str, after: str) -> str:
    """What differs between two flow fields of an identity ("arch,updates=N,downscale=N,checksum")."""
    old, new = before.split(","), after.split(",")
    if len(old) != 4 or len(new) != 4:
        return "another flow model or flow option"
    if old[0] != new[0]:
        return f"flow model {old[0]} then, {new[0]} now"
    named = [f"flow {name} {a.partition('=')[2]} then, {b.partition('=')[2]} now"
             for name, a, b in (("iterations", old[1], new[1]), ("downscale", old[2], new[2])) if a != b]
    return "; ".join(named + (["other flow weights"] if old[3] != new[3] else []))


def join_segments(parts: list[Path], out_path: Path, audio_from=None, time_base: Fraction | None = None,
                  audio_until: float | None = None, rate: Fraction | None = None, origin_us: int = 0,
                  end: float | None = None) -> int:
    """Remux video-only segments into one file (no re-encoding) and add what ``audio.AudioCopy`` copies of
    ``audio_from`` (its audio up to ``audio_until`` seconds, all of it if None); ``rate``: the frame rate to declare;
    ``origin_us``: see ``writer.clock_start`` (segments keep the input's clock); ``end``: where the last frame ends,
    in seconds of that clock (else it lasts a frame of the nominal rate). Returns the frames joined."""
    import av

    frames = 0
    with av.open(ffmpeg_path(parts[0])) as first:
        template = first.streams.video[0]
        sink = av.open(ffmpeg_path(out_path), "w", options=clock_start(origin_us))
        audio = None
        try:
            v_out = sink.add_stream_from_template(template)
            if time_base is not None:
                v_out.time_base = time_base
            if rate is not None:  # (Matroska declares 1/time_base of the segments otherwise, e.g. 12288 fps)
                v_out.codec_context.framerate = rate
            audio = AudioCopy(audio_from, sink, out_path.suffix, origin_us, end=audio_until) \
                if audio_from is not None else None
            def mux(packet, until) -> None:
                # (NUT keeps no frame durations: each frame lasts up to the next, the last up to ``end``)
                if until is not None and until > packet.pts * packet.time_base:
                    packet.duration = max(1, round((until - packet.pts * packet.time_base) / packet.time_base))
                if audio is not None:
                    audio.mux_until(float(packet.pts * packet.time_base))
                packet.stream = v_out
                sink.mux(packet)

            held = None  # (segments have no B-frames: decoding order is display order)
            for part in parts:
                for packet in _segment_packets(part):
                    if held is not None:
                        mux(held, packet.pts * packet.time_base)
                    held = packet
                    frames += 1
            if held is not None:
                mux(held, Fraction(end) if end else None)
            if audio is not None:
                audio.finish(audio_until)
        finally:
            if audio is not None:
                audio.close()
            sink.close()
    return frames


def _segment_packets(part: Path):
    """The video packets of a segment, each with its timestamps; a damaged segment (its size is checked on
    resume, not its bytes: reading them all would cost minutes for a long job) is a one-line error."""
    import av

    try:
        with av.open(ffmpeg_path(part)) as segment:
            for packet in segment.demux(segment.streams.video[0]):
                if packet.size == 0:  # the demuxer's end-of-stream marker
                    continue
                if packet.pts is None:
                    raise ValueError("a frame without a timestamp")
                if packet.dts is None:
                    # FFmpeg's NUT demuxer leaves it unset in some segments (every packet of one of 7 H.264
                    # frames); segments have no B-frames, so decoding order is display order
                    packet.dts = packet.pts
                yield packet
    except (av.error.FFmpegError, ValueError, IndexError) as e:
        raise _damaged(part, e) from None


def _check_readable(path: Path) -> None:
    # Not "damaged", whose advice is to delete the finished work.
    refusal = cannot_read(path)
    if refusal:
        raise UserInputError(f"{refusal}; the finished work is kept for when it can be read")


def _damaged(part: Path, why) -> UserInputError:
    state = part.name.rsplit(PART_TAG, 1)[0] + STATE_SUFFIX
    return UserInputError(f"the resume segment {part} is damaged ({why}); delete {state} to start over (its "
                          "finished segments are then redone)")
