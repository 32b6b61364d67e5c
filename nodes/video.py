"""Video-file node: stream a VIDEO through Stream-DiffVSR or FlashVSR into a file in the output folder.

Unlike LoadVideo → GetVideoComponents → Stream Upscale → CreateVideo, nothing here holds the whole video as an
IMAGE batch (a 10-second 1080p→4K clip would be ~25 GB of float32): the file is decoded, upscaled and encoded
one frame at a time by ``video.stream.upscale_video``, and the result is handed on as a VIDEO backed by the
new file, which core nodes (SaveVideo, GetVideoComponents, …) accept.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import time

import folder_paths
from comfy_api.latest import InputImpl, io, ui

import comfy.model_management as mm
import comfy.utils

from ..video.outputs import (LOCK_TAG, RESUME_NAME_EXTRA, WORK_NAME_EXTRA, OutputLock, check_name_length,
                             check_output_file, lock_path, partial_path, temp_path)
from ..video.audio import check_audio
from ..video.reader import check_av_version, probe_video, reopenable
from ..video.resume import STATE_SUFFIX, ResumeFiles, fingerprint, fingerprint_mismatch, glob_escape
from ..video.stream import clean_after_killed_run, upscale_video
from ..video.writer import CODECS, check_frame_size, codec_spec
from ..models.shared.errors import OutputBusyError, StreamVSRError, UserInputError
from .common import (CATEGORY, FlashVSRModelType, FlashVSRSettingsType, FlowModel, VSRModel, check_not_cropped,
                     out_of_memory_advice, tensor_to_preview, whole_file)
from .flashvsr import FlashVSRModel, oom_message
from .flashvsr import load_engine as load_flashvsr_engine
from .flashvsr import make_engine as make_flashvsr_engine
from .stream_diffvsr import load_engine, make_engine, oom_ladder

log = logging.getLogger(__name__)

EXTENSIONS = {"h264": ".mp4", "lossless": ".mkv"}
PREVIEW_SECONDS = 1.0  # a preview costs a device→CPU copy and a JPEG encode of a 4x frame: not every frame


def _check_prefix(filename_prefix: str) -> None:
    """A prefix without a file name (ComfyUI would write the hidden ``._00001_.mp4``) or with a character no file
    name can hold: one line, before any model is prepared."""
    name = os.path.basename(os.path.normpath(filename_prefix)) if filename_prefix.strip() else ""
    if name in ("", ".", ".."):
        raise UserInputError(f"filename_prefix {filename_prefix!r} names no file: give a name, e.g. "
                             "streamvsr/upscaled")
    if "\0" in filename_prefix:
        raise UserInputError("filename_prefix holds a NUL character, which no file name can: remove it")


def _output_path(filename_prefix: str, codec: str, width: int, height: int, resume: dict | None, scale: int,
                 inputs: list, reserved: contextlib.ExitStack):
    """(absolute path, file name, subfolder), checked as an output of ``inputs`` and its lock taken into
    ``reserved``: another run (another ComfyUI on the same output folder) that picks a name meanwhile takes the
    next one, instead of failing on this one once its models are loaded. ``resume``: the job's settings
    (``video.resume.fingerprint``), to continue an unfinished job of this prefix with the same ones."""
    extension = EXTENSIONS[codec]
    output = os.path.abspath(folder_paths.get_output_directory())
    # ComfyUI refuses these too, but with a multi-line exception that reads like a bug
    inside = os.path.abspath(os.path.join(output, os.path.dirname(os.path.normpath(filename_prefix))))
    try:
        same_tree = os.path.commonpath((output, inside)) == output
    except ValueError:  # on Windows: another drive or a network share ("Paths don't have the same drive")
        same_tree = False
    if not same_tree:
        raise UserInputError(f"filename_prefix {filename_prefix!r} leads outside ComfyUI's output folder: give a "
                             "name inside it, e.g. streamvsr/upscaled")

    def numbered_name():
        try:
            return folder_paths.get_save_image_path(filename_prefix, output, width * scale, height * scale)
        except OSError as e:  # ComfyUI lists or creates the folder: a file in the way, no permission
            raise UserInputError(f"cannot use the output folder of filename_prefix {filename_prefix!r}: "
                                 f"{e.strerror or e} ({e.filename})") from None

    folder, name, counter, subfolder, _ = numbered_name()
    if _clean_killed_runs(folder, name, extension):
        folder, name, counter, subfolder, _ = numbered_name()  # ComfyUI counted their files too
    if resume is not None:
        path = _unfinished_job(folder, name, extension, resume)
        if path is not None:
            _check_output(path, name, resume, inputs)
            reserved.enter_context(OutputLock(path))  # (a run continuing it already: said before the models load)
            log.info("StreamVSR: continuing the unfinished %s", path)
            return path, os.path.basename(path), subfolder
    # ComfyUI counts from the files it saw; another run may have taken the name since, or be writing it (then only
    # its lock and temporary file are there), or have left a partial result under it: never replace any of
    # these, take the next number. A name is the run's once its lock is held and nothing else is there.
    while True:
        filename = f"{name}_{counter:05}_{extension}"
        path = os.path.join(folder, filename)
        if not any(os.path.lexists(p) for p in _taken(path)):
            _check_output(path, name, resume, inputs)
            lock = OutputLock(path)
            with contextlib.suppress(OutputBusyError):
                lock.__enter__()
                if not any(os.path.lexists(p) for p in _taken(path) if p != lock.path):
                    reserved.push(lock)
                    return path, filename, subfolder
                lock.__exit__(None, None, None)
        counter += 1


def _check_output(path: str, name: str, resume: dict | None, inputs: list) -> None:
    # (a name too long is said in what the user types: filename_prefix, without the number and extension that
    # make the file name of ``name``)
    check_name_length(path, RESUME_NAME_EXTRA if resume is not None else WORK_NAME_EXTRA, "filename_prefix",
                      len(os.path.basename(path)) - len(name))
    check_output_file(path, inputs)


def _numbered(folder: str, name: str, extension: str, suffix: str) -> list[str]:
    """The files named like ComfyUI's numbered outputs of this prefix (``name_00007_.mp4``, not
    ``name_v2_00001_.mp4``) followed by ``suffix``."""
    numbered = re.compile(rf"{re.escape(name)}_\d{{5,}}_{re.escape(extension)}{re.escape(suffix)}")
    pattern = f"{glob_escape(name)}_*_{extension}{suffix}"
    return [p for p in glob.glob(os.path.join(glob_escape(folder), pattern))
            if numbered.fullmatch(os.path.basename(p))]


def _clean_killed_runs(folder: str, name: str, extension: str) -> bool:
    """Removes what runs of this prefix that were killed (ComfyUI closed, out of memory) left: a new run takes a
    new number, so nothing else would. True where something was removed."""
    cleaned = False
    for lock in _numbered(folder, name, extension, LOCK_TAG):
        try:
            cleaned = clean_after_killed_run(lock[: -len(LOCK_TAG)]) or cleaned
        except (StreamVSRError, OSError) as e:  # (another user's files): this run takes another number anyway
            log.info("StreamVSR: left %s as it is: %s", lock, e)
    return cleaned


def _unfinished_job(folder: str, name: str, extension: str, job: dict) -> str | None:
    """The output path of the newest unfinished resumable job named like ComfyUI's numbered files of this prefix
    (``name_00007_.mp4``, not ``name_v2_00001_.mp4``) whose checkpoint has ``job``'s settings, or None."""
    for state in sorted(_numbered(folder, name, extension, STATE_SUFFIX), key=os.path.getmtime, reverse=True):
        path = state[: -len(STATE_SUFFIX)]
        if os.path.lexists(path):  # finished, its work files left by a crash in the last step: not continuable
            log.warning("StreamVSR: %s is finished but its resume files are still there; a new file is started "
                        "(delete %s)", path, os.path.basename(state))
            continue
        try:
            info = ResumeFiles(path).read_info()
        except UserInputError as e:  # damaged or unreadable: it cannot be continued, and it is not ours to delete
            log.warning("StreamVSR: %s; a new file is started", getattr(e, "problem", e))
            continue
        if info is None:
            continue
        differs = fingerprint_mismatch(info["fingerprint"], job)
        if differs is None:
            return path
        log.info("StreamVSR: not continuing the unfinished %s (%s); a new file is started", path, differs)
    return None


def _taken(path: str):
    return path, lock_path(path), temp_path(path), partial_path(path), ResumeFiles(path).state


class StreamVSRVideoUpscale(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StreamVSRVideoUpscale",
            display_name="Stream Upscale Video File (StreamVSR)",
            category=CATEGORY,
            description="Upscales a whole video straight from its file to a new file in the output folder with "
                        "Stream-DiffVSR or FlashVSR, streaming: memory stays flat however long the video is. "
                        "Audio, the subtitles the container holds, chapters, labels, frame rate and timestamps "
                        "(starting at 0) are kept. Outputs a VIDEO for the core video nodes.",
            inputs=[
                io.MultiType.Input("model", types=[VSRModel, FlashVSRModelType],
                                   tooltip="From Load Stream-DiffVSR Model (then connect flow_model) or Load "
                                           "FlashVSR Model."),
                FlowModel.Input("flow_model", optional=True,
                                tooltip="From Load RAFT Flow Model; needed by Stream-DiffVSR, not used by FlashVSR."),
                io.Video.Input("video", tooltip="A video, e.g. from the core Load Video node. Read from its file "
                                                "frame by frame (never decoded as a whole)."),
                io.Int.Input("seed", default=42, min=0, max=2**63 - 1, control_after_generate=False,
                             tooltip="Noise seed (42 is what the official script uses)."),
                io.Int.Input("steps", default=4, min=1, max=8,
                             tooltip="Stream-DiffVSR's denoising steps (distilled for 4); FlashVSR takes one step "
                                     "and ignores this."),
                io.Combo.Input("codec", options=list(CODECS), default="h264",
                               tooltip="; ".join(f"{k}: {v.description}" for k, v in CODECS.items())
                                       + ". h264 writes .mp4, lossless .mkv (browsers cannot preview it)."),
                io.Float.Input("scene_cut_threshold", default=0.0, min=0.0, max=1.0, step=0.05,
                               tooltip="Reset the temporal guidance at a scene cut, detected when the mean "
                                       "absolute difference of consecutive input frames (0..1, at 64 px) "
                                       "exceeds this; 0.3 is a good start. 0 turns detection off."),
                io.String.Input("filename_prefix", default="streamvsr/upscaled",
                                tooltip="Output file name prefix, relative to ComfyUI's output folder."),
                io.Boolean.Input("resume", default=False, optional=True,
                                 tooltip="Write resumably (segments plus a .streamvsr-resume.safetensors state "
                                         "next to the output) and, if an interrupted job of this prefix with "
                                         "the same video, model and settings is there, continue it (Cancel "
                                         "saves one). Needs the video as a file (Load Video). FlashVSR's state "
                                         "is large: about 10 GB of disk (and RAM while saving) at a 1080p output, "
                                         "saved less often the longer it takes."),
                io.Boolean.Input("allow_truncated", default=False, optional=True,
                                 tooltip="Accept a video that ends early or breaks off (an interrupted download or "
                                         "copy): the output has the frames that could be decoded. Off, such a "
                                         "video is an error, and those frames are kept as a partial file."),
                FlashVSRSettingsType.Input("flashvsr_settings", optional=True,
                                           tooltip="From FlashVSR Settings (scale, sparse_ratio, local_range, "
                                                   "kv_ratio, color_fix); without it the official defaults. "
                                                   "FlashVSR only: refused with a Stream-DiffVSR model."),
            ],
            outputs=[io.Video.Output(display_name="video")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename_prefix) -> bool | str:
        # ComfyUI validates a prompt before running any node: a PyAV too old is said there, not after the loaders
        # upstream took their minutes. (It passes a function only the inputs it names, and reports a failure per
        # input named; a plain string's own checks are none, so naming this one skips nothing.)
        try:
            check_av_version()
        except UserInputError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, model, video, seed, steps, codec, scene_cut_threshold, filename_prefix, flow_model=None,
                resume=False, flashvsr_settings=None, allow_truncated=False) -> io.NodeOutput:
        if flashvsr_settings is not None and not isinstance(model, FlashVSRModel):
            # Ignoring them would quietly change the result (e.g. a chosen x2 scale), as the CLI refuses too
            raise UserInputError("flashvsr_settings only apply to FlashVSR, but the model is Stream-DiffVSR: "
                                 "disconnect FlashVSR Settings, or connect a FlashVSR model")
        _check_prefix(filename_prefix)
        source = whole_file(video, "Stream Upscale Video File")
        if resume and not isinstance(source, (str, os.PathLike)):
            raise ValueError("resume needs a video backed by a file (e.g. from Load Video); this VIDEO lives in "
                             "memory. Turn resume off, or save the video first and load it with Load Video.")
        # The size as the file is meant to be seen (a phone video's rotation applied, as upscale_video reads it);
        # probing also reports an unreadable or audio-only input before any model is prepared.
        readable = reopenable(source)  # (a path as it is; a file object's bytes, read once)
        info = probe_video(readable)
        width, height = info.width, info.height
        check_not_cropped(video, width, height, "Stream Upscale Video File")
        if isinstance(model, FlashVSRModel):
            engine = make_flashvsr_engine(model, flashvsr_settings)
            engine.check_size(height, width)
            advice = oom_message(engine, height, width)
        else:
            if flow_model is None:
                raise UserInputError("Stream-DiffVSR needs a flow model: connect Load RAFT Flow Model to flow_model")
            engine = make_engine(model, flow_model, steps)
            advice = oom_ladder(model, width, height, engine.scale, flow_model)
        job = fingerprint(source, seed, codec, None, scene_cut_threshold or None, (width, height), engine) \
            if resume else None  # what an unfinished job must have been started with to be continued
        with contextlib.ExitStack() as reserved:  # (the output's name, from its choice to the run's end)
            return _upscale_to_output(reserved, model, flow_model, engine, advice, readable, source, info, job, seed,
                                      codec, scene_cut_threshold, filename_prefix, resume, allow_truncated)


def _upscale_to_output(reserved, model, flow_model, engine, advice, readable, source, info, job, seed, codec,
                       scene_cut_threshold, filename_prefix, resume, allow_truncated) -> io.NodeOutput:
    width, height = info.width, info.height
    out_path, filename, subfolder = _output_path(filename_prefix, codec, width, height, job, engine.scale,
                                                 [source], reserved)
    # An output that cannot be written is reported before the models take their minutes to load (upscale_video
    # checks the whole job again once they are; the input was probed above, the output's file checked as named).
    codec_spec(codec, out_path)  # an FFmpeg without the encoder is found here, not after the models load
    check_frame_size(codec, width * engine.scale, height * engine.scale)
    check_audio(readable, os.path.splitext(out_path)[1])

    bar = comfy.utils.ProgressBar(0)
    shown = {"done": 0, "total": 0, "at": 0.0}

    def update(image=None):
        # ComfyUI's progress hook raises a pending interrupt itself, in the middle of writing a frame; left
        # pending, it is raised by should_stop before the next frame, which ends the run properly (with
        # resume, a checkpoint of every frame done). A Cancel between the check and the hook is put back.
        if not mm.processing_interrupted():
            try:
                bar.update_absolute(shown["done"], shown["total"] or None, image)
            except mm.InterruptProcessingException:
                mm.interrupt_current_processing(True)

    def progress(done, total):
        shown["done"], shown["total"] = done, total
        update()

    def preview(hr):
        now = time.monotonic()
        if now - shown["at"] >= PREVIEW_SECONDS:
            shown["at"] = now
            update(("JPEG", tensor_to_preview(hr), 512))

    with out_of_memory_advice(advice):
        if isinstance(model, FlashVSRModel):
            load_flashvsr_engine(engine, model, (height, width))
        else:
            load_engine(engine, model, flow_model, (height, width))
        summary = upscale_video(engine, readable, out_path, seed=seed, codec=codec,
                                scene_cut_threshold=scene_cut_threshold or None, resume=bool(resume),
                                progress=progress, preview=preview,
                                should_stop=mm.throw_exception_if_processing_interrupted,
                                allow_truncated=bool(allow_truncated))
    if summary["input_problem"]:
        log.warning("StreamVSR: %s; the output has the %d frames that could be decoded (allow_truncated)",
                    summary["input_problem"], summary["frames"])
    log.info("StreamVSR: wrote %s (%d frames, %dx%d, %d scene cuts)", out_path, summary["frames"],
             *summary["size"], summary["scene_cuts"])
    result = ui.PreviewVideo([ui.SavedResult(filename, subfolder, io.FolderType.output)])
    return io.NodeOutput(InputImpl.VideoFromFile(out_path), ui=result)
