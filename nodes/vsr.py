"""Stream-DiffVSR nodes: load the model, and upscale an IMAGE batch as one causal stream."""

from __future__ import annotations

import logging
import functools

import torch
from comfy_api.latest import io

import comfy.model_management as mm
import comfy.utils

from ..models.engine import StreamEngine
from ..models.loader import load_pipeline
from .common import (CATEGORY, FlowModel, StreamStateType, VSRModel, as_rgb, model_choices, prepare_engine,
                     operations_for, pick_precision, resolve_model_path, tensor_to_preview, weights_params, wrap)
from .streams import StoredStream, StreamStore

log = logging.getLogger(__name__)

OOM_LADDER = (
    "Stream-DiffVSR ran out of memory on a {w}x{h} frame ({W}x{H} output), also with on-demand flow correlation. "
    "Try, in this order: set Load RAFT Flow Model's resolution to 'half'; load the model in fp16 or bf16; "
    "upscale smaller frames (the output is 4x the input on each side, so memory grows with the output size); "
    "close other programs using the GPU; start ComfyUI with --lowvram, then --novram; "
    "as a last resort run on the CPU (--cpu, slow).")

# Module level because V3 node classes are stateless clones (see streams.py).
STREAMS = StreamStore()


def model_key(model_patcher, seed: int, steps: int) -> str:
    pipe = model_patcher.model
    return f"{getattr(pipe, 'streamvsr_source', id(pipe))}|{pipe.dtype}|steps={steps}|seed={seed}"


def batch_origin(key: str, images: torch.Tensor) -> tuple:
    """Cheap identity of a restart run's frames (shape and checksums), see StreamStore.put."""
    # Summed in float64 without a float64 copy of the batch (a long batch can be several GB).
    sparse = images.detach()[:, ::7, ::7].square()
    return (key, tuple(images.shape), float(images.detach().sum(dtype=torch.float64)),
            float(sparse.sum(dtype=torch.float64)))


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
        weight_dtype, compute_dtype = pick_precision(precision, device, weights_params(path))
        # Weights go to the offload device; ComfyUI moves them (whole or layer by layer) when Stream Upscale asks.
        # The text encoder runs once on the CPU inside load_pipeline and is dropped: only its output is kept.
        pipe = load_pipeline(path, device=mm.unet_offload_device(), dtype=weight_dtype,
                             operations=operations_for(weight_dtype, compute_dtype, device))
        pipe.streamvsr_source = model
        pipe.streamvsr_compute_dtype = compute_dtype
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
                                         "A continuation with another model, precision, seed, steps or frame "
                                         "size restarts by itself and says so in the log."),
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
        return STREAMS.fingerprint(bool(continue_sequence))

    @classmethod
    def execute(cls, model, flow_model, images, seed, steps, continue_sequence, state=None) -> io.NodeOutput:
        frames = as_rgb(images, "Stream Upscale")
        b, h, w, _ = frames.shape
        bad = (~torch.isfinite(frames)).flatten(1).any(1).nonzero()
        if len(bad):
            raise ValueError(f"Stream Upscale: frame {int(bad[0])} of the batch (and {len(bad) - 1} more) contains "
                             "NaN or infinite values; fix the node that produced these images")
        node_id = str(cls.hidden.unique_id)
        key = model_key(model, seed, steps)
        start = STREAMS.start_state(node_id, key, (h, w), seed, continue_sequence, state)
        origin = batch_origin(key, frames) if state is None and start.frame_index == 0 else None

        engine = prepare_engine(model, flow_model, steps, (h, w))

        out = torch.empty(b, h * 4, w * 4, 3, dtype=torch.float32, device=mm.intermediate_device())
        bar = comfy.utils.ProgressBar(b)
        current = start.to(model.load_device)
        fallback = None
        for i in range(b):
            mm.throw_exception_if_processing_interrupted()
            frame = frames[i].permute(2, 0, 1)
            hr, current, fallback = cls._step(engine, fallback, frame, current, (h, w))
            out[i] = hr[0].permute(1, 2, 0).to(out.device)
            bar.update_absolute(i + 1, b, ("JPEG", tensor_to_preview(hr), 512))
        final = current.to("cpu")
        # Only a completed batch replaces the stored stream: an interrupted or failed run leaves it as it was.
        STREAMS.put(node_id, StoredStream(key, final, origin))
        return io.NodeOutput(out, final)

    @staticmethod
    def _step(engine, fallback, frame, state, size):
        """One frame; on out-of-memory, retry it (and run the rest of the batch) with on-demand correlation."""
        if fallback is None:
            try:
                hr, new = engine.step(frame, state)
                return hr, new, None
            except mm.OOM_EXCEPTION:
                pass  # handled outside the except block, so the failed attempt's tensors can be freed first
            mm.soft_empty_cache()
            log.warning("StreamVSR: out of memory; retrying with on-demand flow correlation "
                        "(same result, bounded memory)")
            fallback = StreamEngine(engine.pipeline, functools.partial(engine.flow, corr="on_demand"),
                                    steps=engine.steps, device=engine.device, compute_dtype=engine.compute_dtype)
        try:
            hr, new = fallback.step(frame, state)
            return hr, new, fallback
        except mm.OOM_EXCEPTION:
            pass
        mm.soft_empty_cache()
        h, w = size
        raise RuntimeError(OOM_LADDER.format(w=w, h=h, W=4 * w, H=4 * h))
