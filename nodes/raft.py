"""Optical-flow nodes: load RAFT, estimate flow of consecutive frames, visualise it."""

from __future__ import annotations

import logging

import folder_paths
import numpy as np
import torch
from comfy_api.latest import io

import comfy.model_management as mm
import comfy.utils

from ..models.raft.visualise import flow_to_image, largest_speed
from ..models.raft.weights import load_raft
from ..models.shared.errors import UserInputError
from .common import (CATEGORY, DOWNLOAD_RAFT, FLOW_FOLDER, FlowField, FlowModel, as_rgb, download_progress,
                     find_in_model_folders, load_flow_patcher, operations_for, out_of_memory, remember_source, wrap)

log = logging.getLogger(__name__)


def flow_choices() -> list[str]:
    return sorted(folder_paths.get_filename_list(FLOW_FOLDER)) + list(DOWNLOAD_RAFT)


def resolve_flow_path(choice: str) -> str:
    if choice in DOWNLOAD_RAFT:
        from ..models.raft.weights import download_raft

        return str(download_raft(DOWNLOAD_RAFT[choice], folder_paths.get_folder_paths(FLOW_FOLDER)[0],
                                 download_progress()))
    # (RAFT-large unless the name says small: the one Stream-DiffVSR was trained with)
    download = next(entry for entry, arch in DOWNLOAD_RAFT.items() if arch == ("raft_small" if "small" in choice
                                                                                 else "raft_large"))
    return find_in_model_folders(choice, FLOW_FOLDER, download)


class StreamVSRLoadFlowModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StreamVSRLoadFlowModel",
            display_name="Load RAFT Flow Model (StreamVSR)",
            category=CATEGORY,
            description="Loads torchvision's RAFT optical-flow weights from models/streamvsr/raft, or downloads "
                        "them. Stream-DiffVSR was trained with RAFT-large.",
            inputs=[
                io.Combo.Input("model", options=flow_choices(),
                               tooltip="RAFT weights in torchvision's format; '(download) …' fetches them from "
                                       "download.pytorch.org into models/streamvsr/raft."),
                io.Combo.Input("correlation", options=["auto", "all_pairs", "on_demand"], default="auto",
                               tooltip="all_pairs: the original all-pairs volume (memory grows with the square "
                                       "of the pixel count); on_demand: the same flow in bounded memory; auto: "
                                       "all_pairs only while its volume is under 2 GiB, a quarter of the device's "
                                       "memory and half of what is free (decided at the first frame of a size), "
                                       "else on_demand."),
                io.Combo.Input("resolution", options=["full", "half", "quarter"], default="full",
                               tooltip="Compute flow at reduced resolution and upsample it: faster and lighter, "
                                       "but no longer the official (full-resolution) flow."),
                io.Int.Input("iterations", default=12, min=1, max=32,
                             tooltip="RAFT update iterations (12 is the official setting)."),
            ],
            outputs=[FlowModel.Output(display_name="flow_model")],
        )

    @classmethod
    def execute(cls, model, correlation, resolution, iterations) -> io.NodeOutput:
        device = mm.get_torch_device()
        # RAFT is small (20 MB): fp32 weights (flow is computed in fp32), always loaded whole (load_flow_patcher).
        operations = operations_for(torch.float32, torch.float32, device, cpu_layers=True)
        path = resolve_flow_path(model)
        estimator = load_raft(path, operations=operations, device=mm.unet_offload_device(),
                              num_flow_updates=iterations, corr=correlation,
                              downscale={"full": 1, "half": 2, "quarter": 4}[resolution])
        # names it in a sequence's settings (a continuation needs the same file, whichever list entry gave it)
        remember_source(estimator, path)
        return io.NodeOutput(wrap(estimator))


class StreamVSREstimateFlow(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StreamVSREstimateFlow",
            display_name="Estimate Optical Flow (StreamVSR)",
            category=CATEGORY,
            description="Flow between consecutive frames: entry i is the flow that backward-warps frame i onto "
                        "frame i+1, i.e. RAFT(image1=frame i+1, image2=frame i), in pixels (x, y).",
            inputs=[
                FlowModel.Input("flow_model", tooltip="From Load RAFT Flow Model."),
                io.Image.Input("images", tooltip="Two or more frames of one video, in order."),
            ],
            outputs=[FlowField.Output(display_name="flow")],
        )

    @classmethod
    def execute(cls, flow_model, images) -> io.NodeOutput:
        # clamped as Stream Upscale clamps its frames, so that this is the flow the upscale uses
        frames = as_rgb(images, "Estimate Optical Flow").clamp(0, 1)
        if frames.shape[0] < 2:
            raise UserInputError(f"Estimate Optical Flow needs at least 2 frames, got {frames.shape[0]}")
        n, h, w, _ = frames.shape
        estimator = load_flow_patcher(flow_model, flow_model.model.estimate_memory(h, w))
        device = flow_model.load_device
        flows = torch.empty(n - 1, h, w, 2, dtype=torch.float32, device=mm.intermediate_device())
        bar = comfy.utils.ProgressBar(n - 1)
        corr = None
        prev = frames[0:1].to(device).permute(0, 3, 1, 2) * 2 - 1
        for i in range(1, n):
            mm.throw_exception_if_processing_interrupted()
            cur = frames[i:i + 1].to(device).permute(0, 3, 1, 2) * 2 - 1
            flow, corr = _estimate(estimator, cur, prev, corr, flow_model.model.downscale)
            flows[i - 1] = flow[0].permute(1, 2, 0).to(flows.device)
            prev = cur
            bar.update_absolute(i, n - 1)
        return io.NodeOutput(flows)


def _estimate(estimator, image1, image2, corr, downscale: int):
    """RAFT(image1, image2); on out-of-memory retry (and keep going) with on-demand correlation (``downscale``: the
    flow model's resolution setting, for the advice should that fail too)."""
    if corr is None:
        try:
            return estimator(image1, image2), None
        except Exception as e:
            if not out_of_memory(e):
                raise
            # retried outside the except block so the failed attempt's memory can be released
        mm.soft_empty_cache()
        log.warning("StreamVSR: out of memory in RAFT; retrying with on-demand correlation")
    try:
        return estimator(image1, image2, corr="on_demand"), "on_demand"
    except Exception as e:
        if not out_of_memory(e):
            raise
    mm.soft_empty_cache()
    smaller = {1: "'half' or 'quarter'", 2: "'quarter'"}.get(downscale)
    steps = [f"set Load RAFT Flow Model's resolution to {smaller}"] if smaller else []
    steps += ["use smaller frames", "close other programs" + ("" if mm.is_device_cpu(mm.get_torch_device()) else
                                                              " using the GPU")]
    raise RuntimeError(f"RAFT ran out of memory even with on-demand correlation: {', '.join(steps)}.")


class StreamVSRFlowToImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StreamVSRFlowToImage",
            display_name="Flow to Image (StreamVSR)",
            category=CATEGORY,
            description="Colour-wheel visualisation: hue is the direction, saturation the speed.",
            inputs=[
                FlowField.Input("flow", tooltip="From Estimate Optical Flow."),
                io.Float.Input("max_magnitude", default=0.0, min=0.0, max=10000.0, step=0.5,
                               tooltip="Speed (pixels) shown fully saturated; 0 uses the largest in the batch."),
            ],
            outputs=[io.Image.Output(display_name="image")],
        )

    @classmethod
    def execute(cls, flow, max_magnitude) -> io.NodeOutput:
        if flow.ndim != 4 or flow.shape[0] == 0 or flow.shape[-1] != 2:
            raise ValueError(f"Flow to Image expects flows shaped (pairs, height, width, 2), got {tuple(flow.shape)}")
        flows = flow.detach().cpu().numpy()
        peak = max_magnitude or largest_speed(flows) or 1.0
        images = np.stack([flow_to_image(f, peak) for f in flows]).astype(np.float32) / 255
        return io.NodeOutput(torch.from_numpy(images).to(mm.intermediate_device()))
