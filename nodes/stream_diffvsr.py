"""Stream-DiffVSR nodes: load the model, and upscale an IMAGE batch as one causal stream."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import folder_paths
import torch
from comfy_api.latest import io

import comfy.model_management as mm
import comfy.utils

from ..models.shared.errors import WeightsError
from ..models.shared.packed import prepare_packed
from ..models.stream_diffvsr import COMPILE_ON_CPU
from ..models.stream_diffvsr.engine import StreamEngine, StreamState
from ..models.stream_diffvsr.loader import COMPONENTS, component_weights, load_pipeline
from .common import (CATEGORY, DOWNLOAD_MODEL, MODEL_FOLDER, FlowModel, StreamStateType, VSRModel, as_rgb,
                     check_family, continuation_inputs, download_progress, find_in_model_folders, listed_models,
                     load_flow_patcher, loaded_from, memory_before, operations_for, out_of_memory_advice, params_in,
                     pick_precision, remember_source, show_text, tensor_to_preview, uses_cpu_layers, wrap)
from .streams import StoredStream, StreamStore, batch_origin, chunk_video, redo_state

log = logging.getLogger(__name__)

def oom_ladder(model_patcher, w: int, h: int, scale: int = 4, flow_patcher=None) -> str:
    """What to change when a {w}x{h} frame ran out of memory: for the device ComfyUI runs on, only what the loaded
    models do not do already."""
    on_cpu = mm.is_device_cpu(mm.get_torch_device())
    pipe = getattr(model_patcher, "model", None)  # (advice, made before the run: never an error of its own)
    steps = (["turn cpu_layers off on Load Stream-DiffVSR Model (about half the memory, slower)"]
             if on_cpu and getattr(pipe, "streamvsr_cpu_layers", False) else [])
    smaller = {1: "half", 2: "quarter"}.get(getattr(getattr(flow_patcher, "model", None), "downscale", 1))
    if smaller:
        steps.append(f"set Load RAFT Flow Model's resolution to '{smaller}'")
    if getattr(pipe, "streamvsr_compute_dtype", torch.float32) == torch.float32:
        steps.append("precision bf16 on Load Stream-DiffVSR Model (half the weights; fast on CPUs with bf16 "
                     "arithmetic)" if on_cpu else "precision fp16 or bf16 on Load Stream-DiffVSR Model (half the "
                     "weights and activations)")
    steps.append("upscale smaller frames (the output is 4x the input on each side, so memory grows with the output "
                 "size)")
    steps += ["close other programs"] if on_cpu else [
        "close other programs using the GPU", "start ComfyUI with --lowvram, then --novram",
        "as a last resort run on the CPU (--cpu, slow)"]
    return (f"Stream-DiffVSR ran out of memory on a {w}x{h} frame ({scale * w}x{scale * h} output). Try, in this "
            f"order: {'; '.join(steps)}.")

# Module level because V3 node classes are stateless clones (see streams.py).
STREAMS = StreamStore("Stream Upscale", StreamState, settings="model, precision, seed, steps, flow model or settings")


def compute_dtype_of(pipe) -> torch.dtype:
    """The precision the loader chose to compute in (it may differ from the weights'; see pick_precision)."""
    return getattr(pipe, "streamvsr_compute_dtype", None) or pipe.dtype


def model_key(model_patcher, flow_patcher, seed: int, steps: int) -> str:
    """What must not change for a run to continue a sequence: the model, its precision, the seed, the steps and the
    flow model with the options that change its numbers."""
    pipe, flow = model_patcher.model, flow_patcher.model
    flow_name = (f"{loaded_from(flow)}|{flow.arch}|updates={flow.num_flow_updates}|downscale={flow.downscale}")
    # The weights' dtype and the one computed in (ComfyUI may pick a compute dtype other than the weights')
    precision = f"{pipe.dtype}/{compute_dtype_of(pipe)}"
    return f"{loaded_from(pipe)}|{precision}|steps={steps}|seed={seed}|flow={flow_name}"


def model_choices() -> list[str]:
    """Official hub folders (found by their model_index.json) and single .safetensors files."""
    components = {"unet", "controlnet", "vae", "text_encoder"}
    choices = set()
    for name in listed_models(MODEL_FOLDER, "stream-diffvsr"):
        parts = name.split("/")
        if parts[0] == "raft":  # the flow folder lies inside ours
            continue
        if parts[-1] == "model_index.json" and len(parts) > 1:
            choices.add("/".join(parts[:-1]))
        elif parts[-1].endswith(".safetensors") and not (len(parts) > 1 and parts[-2] in components):
            choices.add("/".join(parts))
    return sorted(choices) + [DOWNLOAD_MODEL]


def resolve_model_path(choice: str) -> str:
    if choice == DOWNLOAD_MODEL:
        from ..models.stream_diffvsr.hub import download_stream_diffvsr

        return str(download_stream_diffvsr(os.path.join(folder_paths.get_folder_paths(MODEL_FOLDER)[0],
                                                        "Stream-DiffVSR"), download_progress()))
    return find_in_model_folders(choice, MODEL_FOLDER, DOWNLOAD_MODEL)


def weights_params(path: str) -> int:
    """Parameter count of the denoising networks (ComfyUI's dtype choice takes model size into account), read from
    the safetensors headers of the files the loader takes (a folder may hold others: an fp16 variant, a .bin);
    ``.bin`` weights are counted from their size as fp32."""
    files = []
    if os.path.isfile(path):
        files = [path]
    else:
        for sub in COMPONENTS:
            try:
                files.append(str(component_weights(Path(path) / sub)))
            except WeightsError:  # (the loader, next, says what is missing and what to download)
                pass
    return sum(params_in(f) if f.endswith(".safetensors") else os.path.getsize(f) // 4 for f in files)


def load_for_inference(model_patcher, flow_patcher, memory_required: int):
    """Make room for both models plus one frame's activations; ComfyUI offloads other models as needed.

    The denoiser goes first (it may be partially loaded under --lowvram/--novram); the small flow model last,
    so that loading the big one cannot push it off the device again.
    """
    mm.load_models_gpu([model_patcher], memory_required=memory_before(memory_required, flow_patcher))
    if flow_patcher is not None:
        load_flow_patcher(flow_patcher, memory_required)


def make_engine(model_patcher, flow_patcher, steps: int) -> StreamEngine:
    """A StreamEngine in the loader's compute precision; nothing is loaded yet (``load_engine``)."""
    pipe = model_patcher.model
    return StreamEngine(pipe, flow_patcher.model, steps=steps, device=model_patcher.load_device,
                        compute_dtype=compute_dtype_of(pipe), compile=bool(getattr(pipe, "streamvsr_compile", False)))


def load_engine(engine: StreamEngine, model_patcher, flow_patcher, lr_size: tuple[int, int]) -> StreamEngine:
    """Both models loaded for ``engine`` on frames of ``lr_size`` (ComfyUI offloads other models as needed)."""
    load_for_inference(model_patcher, flow_patcher, engine.estimate_memory(*lr_size))
    return engine



class StreamVSRLoadModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StreamVSRLoadModel",
            display_name="Load Stream-DiffVSR Model",
            category=CATEGORY,
            description="Loads Stream-DiffVSR (official hub folder or a single file from `streamvsr convert`) "
                        "from models/streamvsr, or downloads the official checkpoint there.",
            inputs=[
                io.Combo.Input("model", options=model_choices(),
                               tooltip="A folder with model_index.json (the official layout) or a single "
                                       ".safetensors file in models/streamvsr. '(download) …' fetches the "
                                       "official weights (about 4 GB) into models/streamvsr/Stream-DiffVSR."),
                io.Combo.Input("precision", options=["auto", "fp32", "fp16", "bf16"], default="auto",
                               tooltip="Weight and compute precision. auto follows ComfyUI (bf16/fp16 on "
                                       "recent GPUs, fp32 on the CPU). A choice is used as made, on the CPU too "
                                       "(bf16 is fast on CPUs with bf16 arithmetic; fp16, hundreds of times "
                                       "slower there, is refused). Flow and warping always stay fp32."),
                io.Boolean.Input("compile", default=False, optional=True,
                                 tooltip="torch.compile the networks: minutes of compiling for the first frames "
                                         "of each frame size (kept while the model stays loaded); output equal "
                                         "up to float rounding. Meant for GPUs (H200, fp16, 1280x736: 0.14 "
                                         "instead of 0.20 s per frame); on the CPU it is at most about 5 % "
                                         "faster (at a 1280x736 output), so leave it off there unless the video "
                                         "is long. Falls back to normal running, with a warning in the log, where "
                                         "compiling is unavailable."),
                io.Boolean.Input("cpu_layers", default=True, optional=True,
                                 tooltip="ComfyUI running on the CPU in fp32 only: layers that keep reordered "
                                         "weight copies and run wide convolutions as Winograd, 1.7-2.3x faster "
                                         "with the same output up to float rounding, but about twice the memory "
                                         "for the model (7.2 instead of 3.8 GB at 64x64 input). Turn off if the "
                                         "machine runs short of RAM. No effect on GPUs."),
            ],
            outputs=[VSRModel.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, precision, compile=False, cpu_layers=True) -> io.NodeOutput:
        path = resolve_model_path(model)
        check_family(path, "stream-diffvsr")
        device = mm.get_torch_device()
        weight_dtype, compute_dtype = pick_precision(precision, device, weights_params(path))
        # Weights go to the offload device; ComfyUI moves them (whole or layer by layer) when Stream Upscale asks.
        # The text encoder runs once on the CPU inside load_pipeline and is dropped: only its output is kept.
        operations = operations_for(weight_dtype, compute_dtype, device, cpu_layers=bool(cpu_layers))
        packed = uses_cpu_layers(weight_dtype, compute_dtype, device, bool(cpu_layers))
        pipe = load_pipeline(path, device=mm.unet_offload_device(), dtype=weight_dtype, operations=operations)
        prepare_packed(pipe)  # the linear layers' CPU copies: made now rather than in the first frame
        remember_source(pipe, path)
        pipe.streamvsr_compute_dtype = compute_dtype
        pipe.streamvsr_compile = bool(compile)
        if compile and device.type == "cpu":
            log.warning("StreamVSR: compile on the CPU: %s", COMPILE_ON_CPU)
        pipe.streamvsr_cpu_layers = packed
        log.info("StreamVSR: loaded %s (weights %s, compute %s)", model, weight_dtype, compute_dtype)
        return io.NodeOutput(wrap(pipe))


class StreamVSRUpscale(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StreamVSRUpscale",
            display_name="Stream Upscale (Stream-DiffVSR)",
            category=CATEGORY,
            description="Upscales a batch of video frames 4x, one frame at a time, each guided by the previous "
                        "output. With 'continue' on, the next run of this node picks up where this one "
                        "stopped, so a long video can be upscaled in chunks with the same result as in one go.",
            inputs=[
                VSRModel.Input("model", tooltip="From Load Stream-DiffVSR Model."),
                FlowModel.Input("flow_model", tooltip="From Load RAFT Flow Model (RAFT-large is the official)."),
                io.Image.Input("images", tooltip="Consecutive frames of one shot, in order."),
                io.Int.Input("seed", default=42, min=0, max=2**63 - 1, control_after_generate=False,
                             tooltip="Noise seed for the sequence (42 is what the official script uses)."),
                io.Int.Input("steps", default=4, min=1, max=8,
                             tooltip="Denoising steps; the model is distilled for 4."),
                io.Boolean.Input("continue_sequence", default=False, label_on="continue", label_off="restart",
                                 tooltip="continue: these frames are the next chunk of the sequence this node "
                                         "processed in its last successful run (for long videos queued in "
                                         "chunks); the node then always re-runs. restart: start a new sequence. "
                                         "A continuation with another model, precision, seed, steps, flow "
                                         "model or frame size restarts by itself and says so in the log."),
                *continuation_inputs("Stream Upscale"),
            ],
            outputs=[io.Image.Output(display_name="images"),
                     StreamStateType.Output(display_name="state")],
            hidden=[io.Hidden.unique_id],
            # Each node carries its own sequence: two alike must not share one cached result (ComfyUI keys the
            # cache by node id only for these; V3's unique_id does not make it do so).
            not_idempotent=True,
        )

    @classmethod
    def fingerprint_inputs(cls, continue_sequence=None, **kwargs):
        # A continuation depends on the previous run, not only on the inputs: never reuse a cached result.
        return STREAMS.fingerprint(continue_sequence)

    @classmethod
    def execute(cls, model, flow_model, images, seed, steps, continue_sequence, state=None,
                start_frame=None) -> io.NodeOutput:
        frames = as_rgb(images, "Stream Upscale")
        b, h, w, _ = frames.shape
        node_id = str(cls.hidden.unique_id)
        key = model_key(model, flow_model, seed, steps)
        engine = make_engine(model, flow_model, steps)
        # A mistake in the sequence (a chunk out of order, a state of other frames) is reported before any loading.
        start = STREAMS.start_state(node_id, key, (h, w), lambda: engine.new_state(seed), continue_sequence, state,
                                    start_frame, notify=lambda text: show_text(node_id, text))
        load_engine(engine, model, flow_model, (h, w))
        origin = batch_origin(key, frames, state) if state is not None or start.frame_index == 0 else None

        out = torch.empty(b, h * 4, w * 4, 3, dtype=torch.float32, device=mm.intermediate_device())
        bar = comfy.utils.ProgressBar(b)
        current = start.to(model.load_device)
        for i in range(b):
            mm.throw_exception_if_processing_interrupted()
            with out_of_memory_advice(oom_ladder(model, w, h, flow_patcher=flow_model)):
                hr, current = engine.push(current, frames[i].permute(2, 0, 1))
            out[i] = hr[0].permute(1, 2, 0).to(out.device)
            bar.update_absolute(i + 1, b, ("JPEG", tensor_to_preview(hr), 512))
        final = current.to("cpu")
        # Only a completed batch replaces the stored stream: an interrupted or failed run leaves it as it was. A
        # cancel during the last frame counts too: the nodes after this one would not run, and a stream moved on
        # past frames that reached no one could not give them again.
        mm.throw_exception_if_processing_interrupted()
        STREAMS.put(node_id, StoredStream(key, final, origin, start.frame_index,
                                          redo_state(start, state, start_frame), start.frame_index + b,
                                          chunk_video(start_frame)))
        return io.NodeOutput(out, final)
