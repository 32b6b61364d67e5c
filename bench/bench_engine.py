"""Per-frame time and peak memory of the streaming engine against the number of frames.

Each frame count runs in a fresh subprocess so peak RSS (ru_maxrss) belongs to that run alone; on CUDA the
peak allocated memory is reported too. The point is that memory stays flat as the sequence grows.

    python bench/bench_engine.py                       # tiny random checkpoint, CPU, 8/32/128 frames
    python bench/bench_engine.py --model PATH --flow PATH --device cuda --size 180x320
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _import_package():
    import importlib.util

    if "streamvsr" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location("streamvsr", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["streamvsr"] = module
    spec.loader.exec_module(module)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = 0
    try:  # the vector width PyTorch's kernels use: what separates one "AMD EPYC" VM from another
        import torch

        cpu += f" ({torch.backends.cpu.get_cpu_capability()})"
    except (ImportError, AttributeError):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GB RAM, {platform.system()}"


def worker(args) -> None:
    import resource

    import torch

    _import_package()
    from streamvsr.models.stream_diffvsr import load_engine

    device = torch.device(args.device)
    # as `streamvsr` builds it (the CPU layers and the allocator setting on the CPU)
    engine = load_engine(args.model, device=device, flow=args.flow, steps=args.steps)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    h, w = (int(v) for v in args.size.split("x"))
    frames = int(args.frames)
    g = torch.Generator().manual_seed(0)
    base = torch.rand(3, h + frames, w + frames, generator=g)
    state = engine.new_state(0)
    rss_after_first = None
    start = time.perf_counter()
    for i in range(frames):
        frame = base[:, i: i + h, i: i + w]
        hr, state = engine.step(frame, state)
        hr = hr.cpu()
        if i == 0:
            rss_after_first = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            start_steady = time.perf_counter()
    end = time.perf_counter()
    result = {
        "frames": frames,
        "s_per_frame": (end - start) / frames,
        "s_per_frame_steady": (end - start_steady) / max(frames - 1, 1),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_first_frame_mb": rss_after_first / 1024,
        "rss_loaded_mb": rss_loaded / 1024,
    }
    if device.type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint (default: a tiny random one, made on the fly)")
    p.add_argument("--flow", help="RAFT weights (default: random raft_small)")
    p.add_argument("--frames", default="8,32,128")
    p.add_argument("--size", default="32x40", help="LR size HxW")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None or args.flow is None:
            sys.path.insert(0, str(ROOT / "tests"))
            _import_package()
            from helpers import make_tiny_checkpoint, make_tiny_raft

            args.model = args.model or str(make_tiny_checkpoint(pathlib.Path(tmp) / "ckpt"))
            args.flow = args.flow or str(make_tiny_raft(pathlib.Path(tmp) / "raft_small.pth"))
        rows = []
        for n in (int(v) for v in args.frames.split(",")):
            cmd = [sys.executable, __file__, "--worker", "--model", args.model, "--flow", args.flow,
                   "--frames", str(n), "--size", args.size, "--steps", str(args.steps), "--device", args.device]
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode != 0:  # the worker's own error, not only its exit status
                raise RuntimeError(f"the worker for {n} frames failed:\n{run.stderr[-3000:]}")
            rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
            print(rows[-1], file=sys.stderr)
    print(f"\nLR {args.size} -> x4, {args.steps} steps, device {args.device}\n")
    cuda = "peak_cuda_mb" in rows[0]
    print("| frames | s/frame (steady) | RSS after loading MB | peak RSS MB | RSS after frame 1 MB |"
          + (" peak CUDA MB |" if cuda else ""))
    print("|---|---|---|---|---|" + ("---|" if cuda else ""))
    for r in rows:
        line = (f"| {r['frames']} | {r['s_per_frame_steady']:.3f} | {r['rss_loaded_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
                f"{r['rss_after_first_frame_mb']:.0f} |")
        print(line + (f" {r['peak_cuda_mb']:.0f} |" if cuda else ""))


if __name__ == "__main__":
    main()
