"""Readiness for ComfyUI's low-VRAM partial loading.

With --lowvram/--novram, ComfyUI moves (or casts on the fly) only the layers made by ``comfy.ops``; a parameter
or buffer owned by any other module stays on the offload device. The first test checks, without ComfyUI, that
every tensor of the pipeline lives in a layer of the injected operations namespace, apart from the two that the
code moves itself. The second (opt-in, STREAMVSR_COMFYUI) runs the engine under ComfyUI's real ``comfy.ops``
manual-cast layers and ``ModelPatcher`` partial loading on the CPU and compares it with plain torch layers.
"""

import logging
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from helpers import make_tiny_checkpoint, make_tiny_raft
from streamvsr.models.stream_diffvsr.loader import load_pipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Moved to the compute device by the code that uses them (engine: prompt_embeds; TPM: alpha).
MOVED_BY_CODE = {"prompt_embeds", "alpha"}


def _marked_operations():
    """An operations namespace like comfy.ops: torch layers that carry a ``comfy_cast_weights`` flag."""
    names = ("Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose2d", "GroupNorm", "LayerNorm", "Embedding")
    return type("Ops", (), {n: type(n, (getattr(nn, n),), {"comfy_cast_weights": False}) for n in names})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    pytest.importorskip("diffusers")
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


def test_every_tensor_is_in_an_operations_layer(checkpoint):
    pipe = load_pipeline(checkpoint, operations=_marked_operations())
    stray = []
    for module_name, module in pipe.named_modules():
        tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for name, _ in tensors:
            if not hasattr(module, "comfy_cast_weights") and name not in MOVED_BY_CODE:
                stray.append(f"{module_name}.{name} ({type(module).__name__})")
    assert not stray, f"tensors that partial loading would leave behind: {stray}"
    assert any(hasattr(m, "comfy_cast_weights") for m in pipe.unet.modules())


@pytest.mark.comfyui
@pytest.mark.skipif(not os.environ.get("STREAMVSR_COMFYUI"),
                    reason="set STREAMVSR_COMFYUI=/path/to/ComfyUI (and STREAMVSR_COMFYUI_PYTHON) to run with comfy.ops")
def test_partial_loading_with_comfy_ops_matches_plain_layers(checkpoint, tmp_path):
    pytest.importorskip("torchvision")
    raft = make_tiny_raft(tmp_path / "raft_small.pth")
    out = tmp_path / "out.npz"
    python = os.environ.get("STREAMVSR_COMFYUI_PYTHON", sys.executable)
    run = subprocess.run([python, str(ROOT / "tests" / "comfy_lowvram_worker.py"), os.environ["STREAMVSR_COMFYUI"],
                          str(ROOT), str(checkpoint), str(raft), str(out)], capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    result = np.load(out)
    assert bool(result["comfy_cpu"])
    assert str(result["ops"]).endswith("manual_cast"), str(result["ops"])
    assert bool(result["lowvram_flag"]), "ModelPatcher did not take the partial-loading path"
    assert int(result["cast_layers"]) > 50
    reference, lowvram = torch.from_numpy(result["reference"]), torch.from_numpy(result["lowvram"])
    assert reference.shape == lowvram.shape == (3, 3, 128, 160)
    assert (reference - lowvram).abs().max() <= 1e-5
    # the CPU layers under ComfyUI's classes: the packed path when loaded whole, ComfyUI's cast path when not
    plain32 = torch.from_numpy(result["plain32"])
    assert bool(result["packed_ran_whole"])
    assert (torch.from_numpy(result["packed_whole"]) - plain32).abs().max() <= 1e-4
    assert int(result["packed_cast_layers"]) > 50
    assert (torch.from_numpy(result["packed_partial"]) - plain32).abs().max() <= 1e-4


@pytest.mark.comfyui
@pytest.mark.skipif(not (os.environ.get("STREAMVSR_COMFYUI") and torch.cuda.is_available()),
                    reason="needs a CUDA GPU and STREAMVSR_COMFYUI=/path/to/ComfyUI (what --lowvram does on a GPU)")
def test_partial_loading_on_a_gpu_matches_plain_layers(checkpoint, tmp_path):
    """ComfyUI's partial loading on a GPU: fp16 weights, most layers left on the CPU and cast to the GPU on the fly,
    against the same layers loaded whole and against plain torch layers on the GPU."""
    pytest.importorskip("torchvision")
    raft = make_tiny_raft(tmp_path / "raft_small.pth")
    out = tmp_path / "out.npz"
    python = os.environ.get("STREAMVSR_COMFYUI_PYTHON", sys.executable)
    run = subprocess.run([python, str(ROOT / "tests" / "comfy_lowvram_worker.py"), os.environ["STREAMVSR_COMFYUI"],
                          str(ROOT), str(checkpoint), str(raft), str(out), "cuda"], capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    result = np.load(out)
    assert bool(result["lowvram_flag"]), "ModelPatcher did not take the partial-loading path"
    assert int(result["cast_layers"]) > 50
    assert int(result["partial_params_on_gpu"]) < int(result["params"])
    reference = torch.from_numpy(result["reference"])
    assert reference.shape == (3, 3, 128, 160)
    for name in ("whole", "partial"):
        assert (torch.from_numpy(result[name]) - reference).abs().max() <= 2e-3, name
    logging.getLogger(__name__).info("peak VRAM (bytes): %s", ", ".join(
        f"{n} {int(result[f'{n}_peak_vram'])}" for n in ("reference", "whole", "partial")))
