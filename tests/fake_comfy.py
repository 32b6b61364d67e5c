"""Minimal stand-ins for the ComfyUI modules the node layer imports, so nodes run in tests without ComfyUI.

Only what the nodes use is modelled; the real-ComfyUI test (test_comfyui_server.py) covers the rest.
"""

from __future__ import annotations

import sys
import types

import torch


class _Input:
    def __init__(self, io_type, id, **kwargs):
        self.io_type, self.id, self.kwargs = io_type, id, kwargs


class _Output:
    def __init__(self, io_type, display_name=None, **kwargs):
        self.io_type, self.display_name = io_type, display_name


def _type(io_type):
    return type(io_type, (), {
        "io_type": io_type,
        "Input": staticmethod(lambda id, **kw: _Input(io_type, id, **kw)),
        "Output": staticmethod(lambda display_name=None, **kw: _Output(io_type, display_name, **kw)),
    })


class Schema:
    def __init__(self, node_id, inputs=(), outputs=(), hidden=(), **kwargs):
        ids = [i.id for i in inputs]
        # ComfyUI's schema validation refuses a node whose inputs share an id
        assert len(ids) == len(set(ids)), f"{node_id}: duplicate input ids {ids}"
        self.node_id, self.inputs, self.outputs, self.hidden, self.kwargs = node_id, list(inputs), list(outputs), \
            list(hidden), kwargs


class NodeOutput:
    def __init__(self, *values, ui=None):
        self.values, self.ui = values, ui


class _Hidden:
    unique_id = "UNIQUE_ID"


class ComfyNode:
    hidden = types.SimpleNamespace(unique_id=None)

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return None


class ExecutionBlocker:
    """As ComfyUI's: returned for an output, it skips the nodes that take it (silently where message is None)."""

    def __init__(self, message):
        self.message = message


def make_io():
    io = types.ModuleType("comfy_api.latest.io")
    io.Schema, io.NodeOutput, io.ComfyNode, io.Hidden = Schema, NodeOutput, ComfyNode, _Hidden
    for name, t in (("Int", "INT"), ("Float", "FLOAT"), ("Boolean", "BOOLEAN"), ("Combo", "COMBO"),
                    ("Image", "IMAGE"), ("Video", "VIDEO"), ("String", "STRING"), ("Latent", "LATENT")):
        setattr(io, name, _type(t))
    io.Custom = _type
    # As ComfyUI: an input that accepts several types has the comma-joined type.
    io.MultiType = types.SimpleNamespace(
        Input=lambda id, types=(), **kw: _Input(",".join(t.io_type for t in types), id, **kw))
    return io


class Wan21:
    """comfy.latent_formats.Wan21's process_out (ComfyUI 0.3.64): latent * std + mean per channel."""

    latents_mean = torch.tensor([-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                                 0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921])
    latents_std = torch.tensor([2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                                3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160])

    def process_out(self, latent):
        shape = (1, 16, 1, 1, 1)
        return latent * self.latents_std.view(shape).to(latent) + self.latents_mean.view(shape).to(latent)


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0):
        self.model, self.load_device, self.offload_device = model, load_device, offload_device
        self.partial_loads = []

    def model_size(self):
        return sum(t.numel() * t.element_size() for t in self.model.state_dict().values())

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        self.partial_loads.append((device_to, extra_memory))
        self.model.model_lowvram = False
        return extra_memory


class FileVideo:
    """What core Load Video hands over (a VIDEO of a file), reduced to what the nodes use."""

    def __init__(self, path):
        self.path = path

    def get_stream_source(self):
        return str(self.path)

    def get_dimensions(self):
        import av

        with av.open(str(self.path)) as container:
            codec = container.streams.video[0].codec_context
            return codec.width, codec.height


class Interrupted(Exception):
    pass


class ProgressBar:
    updates: list = []
    hook = None  # as the ComfyUI server's progress hook (main.py), which raises a pending interrupt

    def __init__(self, total, node_id=None):
        self.total = total

    def update_absolute(self, value, total=None, preview=None):
        if ProgressBar.hook is not None:
            ProgressBar.hook()
        ProgressBar.updates.append((value, total, preview is not None))

    def update(self, n):
        pass


def install(monkeypatch, models_dir, interrupt_after=None):
    """Put fake comfy modules into sys.modules; returns the fake model_management for inspection."""
    latest = types.ModuleType("comfy_api.latest")
    latest.io = make_io()
    latest.ui = types.ModuleType("comfy_api.latest.ui")
    latest.ui.PreviewVideo = lambda values, **kw: {"images": values}
    latest.ui.SavedResult = lambda filename, subfolder, type: {"filename": filename, "subfolder": subfolder}
    latest.io.FolderType = types.SimpleNamespace(output="output")
    latest.InputImpl = types.SimpleNamespace(VideoFromFile=lambda path: ("VideoFromFile", path))

    class ComfyExtension:
        async def get_node_list(self):
            return []

    latest.ComfyExtension = ComfyExtension
    comfy_api = types.ModuleType("comfy_api")
    comfy_api.latest = latest

    mm = types.ModuleType("comfy.model_management")
    mm.calls = {"load_models_gpu": [], "interrupt_checks": 0}
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.unet_offload_device = lambda: torch.device("cpu")
    mm.intermediate_device = lambda: torch.device("cpu")
    mm.is_device_cpu = lambda d: torch.device(d).type == "cpu"
    mm.should_use_bf16 = lambda *a, **k: False
    mm.should_use_fp16 = lambda *a, **k: False
    mm.soft_empty_cache = lambda *a, **k: None
    def unet_dtype(device=None, model_params=0, supported_dtypes=(), weight_dtype=None):
        # as ComfyUI's: a --fp32-unet/--bf16-unet/... flag first (mm.unet_flag here), then fp32 on a CPU
        if mm.unet_flag is not None:
            return mm.unet_flag
        return torch.float32 if device is not None and torch.device(device).type == "cpu" else supported_dtypes[0]

    def unet_manual_cast(weight_dtype, device, supported_dtypes=()):
        # a CPU computes in fp32 whatever the weights (ComfyUI's should_use_fp16/bf16 say no there)
        on_cpu = device is not None and torch.device(device).type == "cpu"
        return torch.float32 if on_cpu and weight_dtype != torch.float32 else None

    mm.unet_flag = None
    mm.unet_dtype = unet_dtype
    mm.unet_manual_cast = unet_manual_cast
    mm.OOM_EXCEPTION = torch.cuda.OutOfMemoryError
    mm.InterruptProcessingException = Interrupted

    def load_models_gpu(models, memory_required=0, **kwargs):
        mm.calls["load_models_gpu"].append((models, memory_required, kwargs))

    # The interrupt flag, set as the Cancel button does (mm.interrupt_current_processing) and cleared by the
    # check that raises it.
    mm.interrupted = False

    def interrupt_current_processing(value=True):
        mm.interrupted = value

    def raise_pending_interrupt():
        if mm.interrupted:
            mm.interrupted = False
            raise Interrupted()

    def throw_exception_if_processing_interrupted():
        mm.calls["interrupt_checks"] += 1
        if interrupt_after is not None and mm.calls["interrupt_checks"] > interrupt_after:
            raise Interrupted()
        raise_pending_interrupt()

    def unload_all_models():
        mm.calls.setdefault("unload_all_models", 0)
        mm.calls["unload_all_models"] += 1

    mm.load_models_gpu = load_models_gpu
    mm.extra_reserved_memory = lambda: 400 * 1024 * 1024  # (ComfyUI's formulas, its default reserve on Linux)
    mm.minimum_inference_memory = lambda: 1024 * 1024 * 1024 * 0.8 + mm.extra_reserved_memory()
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    mm.processing_interrupted = lambda: mm.interrupted
    mm.interrupt_current_processing = interrupt_current_processing
    mm.unload_all_models = unload_all_models

    patcher_mod = types.ModuleType("comfy.model_patcher")
    patcher_mod.ModelPatcher = ModelPatcher
    ops = types.ModuleType("comfy.ops")
    ops.pick_operations = lambda weight_dtype, compute_dtype, load_device=None, **k: torch.nn
    utils = types.ModuleType("comfy.utils")
    ProgressBar.updates = []
    ProgressBar.hook = raise_pending_interrupt
    utils.ProgressBar = ProgressBar
    latent_formats = types.ModuleType("comfy.latent_formats")
    latent_formats.Wan21 = Wan21
    comfy = types.ModuleType("comfy")
    comfy.model_management, comfy.model_patcher, comfy.ops, comfy.utils = mm, patcher_mod, ops, utils
    comfy.latent_formats = latent_formats

    folder_paths = types.ModuleType("folder_paths")
    folder_paths.models_dir = str(models_dir)
    folder_paths.folder_names_and_paths = {}

    def add_model_folder_path(name, path, is_default=False):
        folder_paths.folder_names_and_paths.setdefault(name, ([], set()))[0].append(path)

    def get_folder_paths(name):
        return list(folder_paths.folder_names_and_paths[name][0])

    def get_filename_list(name):
        """As ComfyUI: every file under the folder's paths whose extension is registered (all if none is)."""
        import os

        exts = folder_paths.folder_names_and_paths[name][1]
        out = []
        for root in get_folder_paths(name):
            for dirpath, _, files in os.walk(root):
                out += [os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/") for f in files
                        if not exts or os.path.splitext(f)[1].lower() in exts]
        return sorted(out)

    folder_paths.add_model_folder_path = add_model_folder_path
    folder_paths.get_folder_paths = get_folder_paths
    folder_paths.get_filename_list = get_filename_list
    folder_paths.get_output_directory = lambda: str(models_dir / "output")

    def get_save_image_path(prefix, output_dir, width=0, height=0):
        import os

        full = os.path.join(output_dir, os.path.dirname(prefix))
        try:  # as ComfyUI's: it lists the folder (to count), creating it when missing
            os.listdir(full)
        except FileNotFoundError:
            os.makedirs(full, exist_ok=True)
        return full, os.path.basename(prefix), 1, os.path.dirname(prefix), prefix

    folder_paths.get_save_image_path = get_save_image_path

    execution = types.ModuleType("comfy_execution")
    execution.graph_utils = types.ModuleType("comfy_execution.graph_utils")
    execution.graph_utils.ExecutionBlocker = ExecutionBlocker

    for name, module in {"comfy_api": comfy_api, "comfy_api.latest": latest, "comfy": comfy,
                         "comfy.model_management": mm, "comfy.model_patcher": patcher_mod, "comfy.ops": ops,
                         "comfy.utils": utils, "comfy.latent_formats": latent_formats,
                         "comfy_execution": execution, "comfy_execution.graph_utils": execution.graph_utils,
                         "folder_paths": folder_paths}.items():
        monkeypatch.setitem(sys.modules, name, module)
    for name in [m for m in sys.modules if m.startswith("streamvsr.nodes")]:
        monkeypatch.delitem(sys.modules, name)
    return mm
