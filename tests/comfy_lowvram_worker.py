"""Run by tests/test_lowvram.py with ComfyUI's Python: the engine under ComfyUI's real partial loading.

argv: COMFYUI_DIR PACK_DIR CHECKPOINT RAFT OUT.npz [cuda]

The pipeline is built twice from the same checkpoint with bf16 weights: once with plain torch layers (upcast
to fp32), once with ``comfy.ops`` manual-cast layers inside a ``ModelPatcher`` loaded with a tiny low-VRAM
budget, so nearly every layer is cast on the fly (what --lowvram/--novram do on a GPU). Both run 3 frames in
fp32; their outputs and the loader's report go to OUT.npz for the test to compare.

Then the CPU layers under ComfyUI's classes (what the nodes build on a CPU-only ComfyUI): fp32 weights with
``packed_operations(base=comfy.ops...)`` in a ModelPatcher loaded whole (the packed path runs) and loaded
partially (ComfyUI's cast path runs), each against the plain fp32 pipeline.

With ``cuda`` (``on_gpu``), what --lowvram does on a GPU instead: fp16 weights, the GPU as the load device and the
CPU as the offload device; ComfyUI's layers loaded whole and loaded partially (most layers left on the CPU and cast
to the GPU on the fly), each against plain torch layers on the GPU, with the peak VRAM of each.
"""

import importlib.util
import sys

import numpy as np
import torch


def _import(comfy_dir, pack_dir, comfy_args):
    sys.path.insert(0, comfy_dir)
    import comfy.options

    comfy.options.enable_args_parsing()
    sys.argv = [sys.argv[0], *comfy_args]
    spec = importlib.util.spec_from_file_location("streamvsr", f"{pack_dir}/__init__.py",
                                                  submodule_search_locations=[pack_dir])
    package = importlib.util.module_from_spec(spec)
    sys.modules["streamvsr"] = package
    spec.loader.exec_module(package)


def _frames():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(3, 40, 48, generator=g)
    return [base[:, i:i + 32, 2 * i:2 * i + 40] for i in range(3)]


def _upscale(model, flow, device, dtype):
    from streamvsr.models.stream_diffvsr.engine import StreamEngine

    engine = StreamEngine(model, flow, steps=4, device=device, compute_dtype=dtype)
    state, outputs = engine.new_state(42), []
    for frame in _frames():
        hr, state = engine.step(frame, state)
        outputs.append(hr)
    return torch.cat(outputs).cpu().numpy()


def on_gpu(comfy_dir, pack_dir, checkpoint, raft, out):
    _import(comfy_dir, pack_dir, [])
    import comfy.model_patcher
    import comfy.ops
    from streamvsr.models.raft.weights import load_raft
    from streamvsr.models.stream_diffvsr.loader import load_pipeline

    gpu, cpu, half = torch.device("cuda"), torch.device("cpu"), torch.float16
    flow = load_raft(raft, num_flow_updates=4, device=gpu)
    ops = comfy.ops.pick_operations(half, half, load_device=gpu, disable_fast_fp8=True)
    whole = load_pipeline(checkpoint, dtype=half, operations=ops)
    comfy.model_patcher.ModelPatcher(whole, load_device=gpu, offload_device=cpu).load(gpu, full_load=True)
    partial = load_pipeline(checkpoint, dtype=half, operations=ops)
    comfy.model_patcher.ModelPatcher(partial, load_device=gpu, offload_device=cpu).load(
        gpu, lowvram_model_memory=64 * 1024)
    results = {}
    for name, model in (("reference", load_pipeline(checkpoint, device=gpu, dtype=half)), ("whole", whole),
                        ("partial", partial)):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        results[name] = _upscale(model, flow, gpu, half)
        results[f"{name}_peak_vram"] = torch.cuda.max_memory_allocated()
    on_gpu_params = sum(p.device.type == "cuda" for p in partial.parameters())
    np.savez(out, lowvram_flag=bool(getattr(partial, "model_lowvram", False)),
             cast_layers=sum(bool(getattr(m, "comfy_cast_weights", False)) for m in partial.modules()),
             partial_params_on_gpu=on_gpu_params, params=len(list(partial.parameters())), ops=str(ops.__name__),
             **results)


def main(comfy_dir, pack_dir, checkpoint, raft, out):
    _import(comfy_dir, pack_dir, ["--cpu"])  # as `main.py --cpu`; the partial-loading code path is the GPU one
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.ops
    from streamvsr.models.raft.weights import load_raft
    from streamvsr.models.shared.packed import packed_operations
    from streamvsr.models.stream_diffvsr.loader import load_pipeline

    cpu = torch.device("cpu")
    flow = load_raft(raft, num_flow_updates=4)
    reference = load_pipeline(checkpoint, dtype=torch.bfloat16).to(torch.float32)

    ops = comfy.ops.pick_operations(torch.bfloat16, torch.float32, load_device=cpu, disable_fast_fp8=True)
    pipe = load_pipeline(checkpoint, dtype=torch.bfloat16, operations=ops)
    patcher = comfy.model_patcher.ModelPatcher(pipe, load_device=cpu, offload_device=cpu)
    patcher.load(cpu, lowvram_model_memory=64 * 1024)  # far less than the model: partial loading
    cast = sum(bool(getattr(m, "comfy_cast_weights", False)) for m in pipe.modules())

    fp32_ops = comfy.ops.pick_operations(torch.float32, torch.float32, load_device=cpu, disable_fast_fp8=True)
    plain32 = load_pipeline(checkpoint)
    packed_whole = load_pipeline(checkpoint, operations=packed_operations(base=fp32_ops))
    comfy.model_patcher.ModelPatcher(packed_whole, load_device=cpu, offload_device=cpu).load(cpu, full_load=True)
    packed_partial = load_pipeline(checkpoint, operations=packed_operations(base=fp32_ops))
    comfy.model_patcher.ModelPatcher(packed_partial, load_device=cpu, offload_device=cpu).load(
        cpu, lowvram_model_memory=64 * 1024)
    packed_cast = sum(bool(getattr(m, "comfy_cast_weights", False)) for m in packed_partial.modules())

    results = {name: _upscale(model, flow, cpu, torch.float32)
               for name, model in (("reference", reference), ("lowvram", pipe), ("plain32", plain32),
                                   ("packed_whole", packed_whole), ("packed_partial", packed_partial))}
    ran_packed = any(getattr(m, attr, None) is not None for m in packed_whole.modules()
                     for attr in ("_packed", "_winograd", "_phases", "_halves"))
    np.savez(out, lowvram_flag=bool(getattr(pipe, "model_lowvram", False)), cast_layers=cast,
             packed_cast_layers=packed_cast, packed_ran_whole=ran_packed,
             ops=str(ops.__name__), comfy_cpu=mm.is_device_cpu(mm.get_torch_device()), **results)


if __name__ == "__main__":
    (on_gpu if sys.argv[6:7] == ["cuda"] else main)(*sys.argv[1:6])
