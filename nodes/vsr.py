"""Stream-DiffVSR nodes: load the model, and upscale an IMAGE batch as one causal stream."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch
from comfy_api.latest import io

import comfy.model_management as mm
import comfy.utils

from ..models.engine import StreamEngine, StreamState, new_state
from ..models.loader import load_pipeline
from .common import (CATEGORY, FlowModel, StreamStateType, VSRModel, model_choices, operations_for, pick_dtype,
                     resolve_model_path, tensor_to_preview, wrap)
from .flow import load_flow_patcher

log = logging.getLogger(__name__)

OOM_LADDER = (
    "Stream-DiffVSR ran out of memory. In order: set the flow model's correlation to on_demand; set its "
    "resolution to half; load the model in fp16/bf16; upscale smaller frames (the output is 4x the input); "
    "start ComfyUI with --lowvram or --novram; close other GPU programs.")


@dataclass(frozen=True)
class StoredStream:
    """A sequence continued across queue runs, kept per node (on the CPU)."""
    model_key: str
    state: StreamState


# unique_id of the Stream Upscale node -> its stream. Module level because V3 node classes are stateless clones.
_STREAMS: dict[str, StoredStream] = {}
_LOCK = threading.Lock()


def model_key(model_patcher, seed: int, steps: int) -> str:
    pipe = model_patcher.model
    return f"{pipe.streamvsr_source}|{pipe.dtype}|steps={steps}|seed={seed}"


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
                                       "recent GPUs, fp32 on the CPU). Flow and warping always stay fp32."),
            ],
            outputs=[VSRModel.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, precision) -> io.NodeOutput:
        path = resolve_model_path(model)
        device = mm.get_torch_device()
        dtype = pick_dtype(precision, device)
        # The text encoder runs once on the CPU inside load_pipeline and is dropped: only its output stays.
        pipe = load_pipeline(path, device=mm.unet_offload_device(), dtype=dtype,
                             operations=operations_for(dtype, device))
        pipe.streamvsr_source = f"{model}"
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
                                 tooltip="continue: treat these frames as the next chunk of the sequence this "
                                         "node processed in its previous run (same model, seed, steps and frame "
                                         "size). restart: start a new sequence."),
                StreamStateType.Input("state", optional=True,
                                      tooltip="Continue from this state (from another Stream Upscale) instead; "
                                              "takes precedence over continue_sequence."),
            ],
            outputs=[io.Image.Output(display_name="images"),
                     StreamStateType.Output(display_name="state")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def fingerprint_inputs(cls, continue_sequence=False, **kwargs):
        # A continuation depends on the previous run, not only on the inputs: never reuse a cached result.
        return float("nan") if continue_sequence else None

    @classmethod
    def execute(cls, model, flow_model, images, seed, steps, continue_sequence, state=None) -> io.NodeOutput:
        if images.ndim != 4 or images.shape[0] == 0:
            raise ValueError(f"Stream Upscale got an empty or malformed image batch {tuple(images.shape)}")
        b, h, w, c = images.shape
        if c not in (1, 3, 4):
            raise ValueError(f"Stream Upscale expects 1, 3 or 4 channels per frame, got {c}")
        node_id = str(cls.hidden.unique_id)
        key = model_key(model, seed, steps)
        start = cls._start_state(node_id, key, state, continue_sequence, seed, (h, w))

        pipe, estimator = model.model, flow_model.model
        load_flow_patcher(flow_model)
        engine = StreamEngine(pipe, estimator, steps=steps, device=model.load_device, compute_dtype=pipe.dtype)
        mm.load_models_gpu([model], memory_required=engine.estimate_memory(h, w))

        out = torch.empty(b, h * 4, w * 4, 3, dtype=torch.float32, device=mm.intermediate_device())
        bar = comfy.utils.ProgressBar(b)
        current = start.to(model.load_device)
        for i in range(b):
            mm.throw_exception_if_processing_interrupted()
            frame = images[i].permute(2, 0, 1)
            hr, current = cls._step(engine, estimator, frame, current)
            out[i] = hr[0].permute(1, 2, 0).to(out.device)
            bar.update_absolute(i + 1, b, ("JPEG", tensor_to_preview(hr), 512))
        final = current.to("cpu")
        # Only a completed batch updates the stored stream: an interrupted or failed run leaves it untouched.
        with _LOCK:
            _STREAMS[node_id] = StoredStream(key, final)
        return io.NodeOutput(out, final)

    @classmethod
    def _start_state(cls, node_id, key, state, continue_sequence, seed, size) -> StreamState:
        if state is not None:
            if state.lr_size is not None and tuple(state.lr_size) != size:
                raise ValueError(f"the state input belongs to frames of {state.lr_size[1]}x{state.lr_size[0]}, "
                                 f"these are {size[1]}x{size[0]}")
            return state
        if continue_sequence:
            with _LOCK:
                stored = _STREAMS.get(node_id)
            if stored is None:
                log.info("StreamVSR: no previous run of node %s to continue; starting a new sequence", node_id)
            elif stored.model_key != key:
                log.info("StreamVSR: model, seed or steps changed since the last run; starting a new sequence")
            elif stored.state.lr_size is not None and tuple(stored.state.lr_size) != size:
                log.info("StreamVSR: frame size changed from %s to %s; starting a new sequence",
                         stored.state.lr_size, size)
            else:
                return stored.state
        return new_state(seed)

    @staticmethod
    def _step(engine, estimator, frame, state):
        try:
            return engine.step(frame, state)
        except mm.OOM_EXCEPTION:
            pass  # retried below, outside the except block so the failed attempt's tensors can be freed
        mm.soft_empty_cache()
        if getattr(estimator, "corr", None) == "on_demand":
            raise RuntimeError(OOM_LADDER)
        log.warning("StreamVSR: out of memory; retrying this frame with on-demand flow correlation")
        estimator.corr = "on_demand"
        try:
            return engine.step(frame, state)
        except mm.OOM_EXCEPTION:
            pass
        raise RuntimeError(OOM_LADDER)
