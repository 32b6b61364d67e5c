"""Video-file node: stream a VIDEO through Stream-DiffVSR into a file in the output folder, frame by frame."""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import InputImpl, io, ui

import comfy.model_management as mm
import comfy.utils

from ..models.engine import StreamEngine
from ..video import CODECS, upscale_video
from .common import CATEGORY, FlowModel, VSRModel
from .flow import load_flow_patcher


class StreamVSRVideoUpscale(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StreamVSRVideoUpscale",
            display_name="Stream Upscale Video File (Stream-DiffVSR)",
            category=CATEGORY,
            description="Upscales a whole video 4x straight from its file to a new file in the output folder, "
                        "one frame at a time: memory stays flat however long the video is. Audio, frame rate "
                        "and timestamps are kept.",
            inputs=[
                VSRModel.Input("model", tooltip="From Load Stream-DiffVSR Model."),
                FlowModel.Input("flow_model", tooltip="From Load RAFT Flow Model."),
                io.Video.Input("video", tooltip="A video, e.g. from the core Load Video node."),
                io.Int.Input("seed", default=42, min=0, max=2**63 - 1, control_after_generate=False,
                             tooltip="Noise seed (42 is what the official script uses)."),
                io.Int.Input("steps", default=4, min=1, max=8, tooltip="Denoising steps; distilled for 4."),
                io.Combo.Input("codec", options=list(CODECS), default="h264",
                               tooltip="h264: MP4, libx264 yuv420p, crf 16. lossless: FFV1 RGB in MKV "
                                       "(large files, exact pixels)."),
                io.Float.Input("scene_cut_threshold", default=0.0, min=0.0, max=1.0, step=0.05,
                               tooltip="Reset the temporal guidance at a scene cut, detected when the mean "
                                       "absolute difference of consecutive input frames exceeds this (0.3 is "
                                       "a good start). 0 turns detection off."),
                io.String.Input("filename_prefix", default="streamvsr/upscaled",
                                tooltip="Output file name prefix, relative to ComfyUI's output folder."),
            ],
            outputs=[io.Video.Output(display_name="video")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, flow_model, video, seed, steps, codec, scene_cut_threshold,
                filename_prefix) -> io.NodeOutput:
        width, height = video.get_dimensions()
        extension = ".mkv" if codec == "lossless" else ".mp4"
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, folder_paths.get_output_directory(), width * 4, height * 4)
        filename = f"{name}_{counter:05}_{extension}"
        out_path = os.path.join(folder, filename)

        pipe, estimator = model.model, flow_model.model
        load_flow_patcher(flow_model)
        engine = StreamEngine(pipe, estimator, steps=steps, device=model.load_device, compute_dtype=pipe.dtype)
        mm.load_models_gpu([model], memory_required=engine.estimate_memory(height, width))
        bar = comfy.utils.ProgressBar(0)

        def progress(done, total):
            bar.update_absolute(done, total or None)

        upscale_video(engine, video.get_stream_source(), out_path, seed=seed, codec=codec,
                      scene_cut_threshold=scene_cut_threshold or None, progress=progress,
                      should_stop=mm.throw_exception_if_processing_interrupted)
        preview = ui.PreviewVideo([ui.SavedResult(filename, subfolder, io.FolderType.output)])
        return io.NodeOutput(InputImpl.VideoFromFile(out_path), ui=preview)

