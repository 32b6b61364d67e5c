"""Video-file node: stream a VIDEO through Stream-DiffVSR into a file in the output folder, frame by frame.

Unlike LoadVideo → GetVideoComponents → Stream Upscale → CreateVideo, nothing here holds the whole video as an
IMAGE batch (a 10-second 1080p→4K clip would be ~25 GB of float32): the file is decoded, upscaled and encoded
one frame at a time by ``video.stream.upscale_video``, and the result is handed on as a VIDEO backed by the
new file, which core nodes (SaveVideo, GetVideoComponents, …) accept.
"""

from __future__ import annotations

import glob
import logging
import os
import time

import folder_paths
from comfy_api.latest import InputImpl, io, ui

import comfy.model_management as mm
import comfy.utils

from ..video.resume import ResumeFiles, glob_escape
from ..video.stream import upscale_video
from ..video.writer import CODECS
from .common import CATEGORY, FlowModel, VSRModel, out_of_memory_advice, tensor_to_preview
from .stream_diffvsr import OOM_LADDER, prepare_engine

log = logging.getLogger(__name__)

EXTENSIONS = {"h264": ".mp4", "lossless": ".mkv"}
PREVIEW_SECONDS = 1.0  # a preview costs a device→CPU copy and a JPEG encode of a 4x frame: not every frame


def _output_path(filename_prefix: str, codec: str, width: int, height: int, resume: bool):
    """(absolute path, file name, subfolder). With resume, an unfinished job of this prefix is continued."""
    extension = EXTENSIONS[codec]
    folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
        filename_prefix, folder_paths.get_output_directory(), width * 4, height * 4)
    if resume:
        states = glob.glob(os.path.join(glob_escape(folder), f"{glob_escape(name)}_*_{extension}"
                                        ".streamvsr-resume.safetensors"))
        if states:
            state = max(states, key=os.path.getmtime)
            path = state[: -len(".streamvsr-resume.safetensors")]
            log.info("StreamVSR: continuing the unfinished %s", path)
            return path, os.path.basename(path), subfolder
    filename = f"{name}_{counter:05}_{extension}"
    return os.path.join(folder, filename), filename, subfolder


class StreamVSRVideoUpscale(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StreamVSRVideoUpscale",
            display_name="Stream Upscale Video File (Stream-DiffVSR)",
            category=CATEGORY,
            description="Upscales a whole video 4x straight from its file to a new file in the output folder, "
                        "one frame at a time: memory stays flat however long the video is. Audio, frame rate "
                        "and timestamps are kept. Outputs a VIDEO for the core video nodes.",
            inputs=[
                VSRModel.Input("model", tooltip="From Load Stream-DiffVSR Model."),
                FlowModel.Input("flow_model", tooltip="From Load RAFT Flow Model."),
                io.Video.Input("video", tooltip="A video, e.g. from the core Load Video node. Read from its file "
                                                "frame by frame (never decoded as a whole)."),
                io.Int.Input("seed", default=42, min=0, max=2**63 - 1, control_after_generate=False,
                             tooltip="Noise seed (42 is what the official script uses)."),
                io.Int.Input("steps", default=4, min=1, max=8, tooltip="Denoising steps; distilled for 4."),
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
                                         "next to the output) and, if an interrupted job with this prefix is "
                                         "there, continue it. Needs the video as a file (Load Video)."),
            ],
            outputs=[io.Video.Output(display_name="video")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, flow_model, video, seed, steps, codec, scene_cut_threshold, filename_prefix,
                resume=False) -> io.NodeOutput:
        source = video.get_stream_source()
        if resume and not isinstance(source, (str, os.PathLike)):
            raise ValueError("resume needs a video backed by a file (e.g. from Load Video); this VIDEO lives in "
                             "memory. Turn resume off, or save the video first and load it with Load Video.")
        width, height = video.get_dimensions()
        out_path, filename, subfolder = _output_path(filename_prefix, codec, width, height, resume)
        if not resume and os.path.exists(ResumeFiles(out_path).state):
            raise ValueError(f"{out_path} has unfinished resume files next to it; turn resume on to continue")

        engine = prepare_engine(model, flow_model, steps, (height, width))
        bar = comfy.utils.ProgressBar(0)
        shown = {"done": 0, "total": 0, "at": 0.0}

        def progress(done, total):
            shown["done"], shown["total"] = done, total
            bar.update_absolute(done, total or None)

        def preview(hr):
            now = time.monotonic()
            if now - shown["at"] >= PREVIEW_SECONDS:
                shown["at"] = now
                bar.update_absolute(shown["done"], shown["total"] or None, ("JPEG", tensor_to_preview(hr), 512))

        with out_of_memory_advice(OOM_LADDER.format(w=width, h=height, W=4 * width, H=4 * height)):
            summary = upscale_video(engine, source, out_path, seed=seed, codec=codec,
                                    scene_cut_threshold=scene_cut_threshold or None, resume=bool(resume),
                                    progress=progress, preview=preview,
                                    should_stop=mm.throw_exception_if_processing_interrupted)
        log.info("StreamVSR: wrote %s (%d frames, %dx%d, %d scene cuts)", out_path, summary["frames"],
                 *summary["size"], summary["scene_cuts"])
        result = ui.PreviewVideo([ui.SavedResult(filename, subfolder, io.FolderType.output)])
        return io.NodeOutput(InputImpl.VideoFromFile(out_path), ui=result)
