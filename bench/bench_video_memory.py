"""Peak memory and speed of streaming a video file (``upscale_video`` / ``streamvsr upscale``) against its length.

Each length runs in a fresh process, so its peak RSS (ru_maxrss, from os.wait4) belongs to that run alone.
Flat memory means the peak does not grow with the number of frames. Frames/s counts the upscaling loop only
(decode + engine + encode), not start-up and model loading.

    python bench/bench_video_memory.py                          # tiny random checkpoint, CPU, 30/120/480 frames
    python bench/bench_video_memory.py --lengths 30,120 --via-cli   # the real `streamvsr upscale` command
    python bench/bench_video_memory.py --model PATH --flow PATH --device cuda --size 180x320 --lengths 30,120
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_engine import _import_package, machine  # noqa: E402

# `streamvsr` of this checkout (`-m streamvsr` would run an installed copy, or none in a ComfyUI-only checkout)
CHECKOUT_CLI = (f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); from bench_engine import _import_package; "
                "_import_package(); from streamvsr.cli import main; sys.exit(main())")


def make_clip(path: pathlib.Path, frames: int, h: int, w: int, fps: int = 24) -> None:
    """A moving random texture (H.264, yuv420p) with a sine-wave AAC track."""
    import av
    import numpy as np

    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, (h * 2, w * 2, 3), dtype=np.uint8)
    c = av.open(str(path), "w")
    v = c.add_stream("libx264", rate=fps, options={"crf": "18"})
    v.width, v.height, v.pix_fmt = w, h, "yuv420p"
    a = c.add_stream("aac", rate=16000)
    a.layout = "mono"
    for i in range(frames):
        y, x = (i * 3) % h, (i * 2) % w
        for p in v.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(texture[y:y + h, x:x + w]),
                                                     format="rgb24")):
            c.mux(p)
    t = np.arange(int(16000 * frames / fps)) / 16000
    samples = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
    for k in range(0, samples.shape[1], 1024):
        fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, k:k + 1024]), format="fltp", layout="mono")
        fr.sample_rate, fr.pts = 16000, k
        for p in a.encode(fr):
            c.mux(p)
    for stream in (a, v):
        for p in stream.encode():
            c.mux(p)
    c.close()


def worker(args) -> None:
    import resource

    import torch

    _import_package()
    from streamvsr.models.stream_diffvsr import load_engine
    from streamvsr.video import upscale_video

    device = torch.device(args.device)
    # as `streamvsr upscale` builds it (the CPU layers and the allocator setting on the CPU)
    engine = load_engine(args.model, device=device, flow=args.flow, steps=args.steps,
                         flow_iterations=args.flow_iters)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    summary = upscale_video(engine, args.clip, args.out, codec=args.codec)
    seconds = time.perf_counter() - start
    result = {"frames": summary["frames"], "fps": summary["frames"] / seconds, "seconds": seconds,
              "rss_loaded_mb": rss_loaded / 1024}
    if device.type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(result))


def run_child(cmd: list[str]) -> tuple[str, float, float]:
    """stdout, peak RSS (MB, of this child alone) and wall seconds of one child process."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err.read()[-3000:]}")
        return out.read(), usage.ru_maxrss / 1024, wall


def count_frames(path) -> int:
    import av

    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint (default: a tiny random one, made on the fly)")
    p.add_argument("--flow", help="RAFT weights (default: random raft_small)")
    p.add_argument("--lengths", default="30,120,480", help="frame counts, comma-separated")
    p.add_argument("--size", default="24x32", help="LR size HxW")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--flow-iters", type=int, default=12, help="RAFT iterations (12 is the official setting)")
    p.add_argument("--codec", default="h264")
    p.add_argument("--device", default="cpu")
    p.add_argument("--via-cli", action="store_true",
                   help="run `python -m streamvsr upscale` itself (frames/s then include start-up)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--clip", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    h, w = (int(v) for v in args.size.split("x"))
    ext = ".mkv" if args.codec == "lossless" else ".mp4"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        if args.model is None or args.flow is None:
            sys.path.insert(0, str(ROOT / "tests"))
            _import_package()
            from helpers import make_tiny_checkpoint, make_tiny_raft

            args.model = args.model or str(make_tiny_checkpoint(tmp / "ckpt"))
            args.flow = args.flow or str(make_tiny_raft(tmp / "raft_small.pth"))
        rows = []
        for n in (int(v) for v in args.lengths.split(",")):
            clip, out = tmp / f"in{n}.mp4", tmp / f"out{n}{ext}"
            make_clip(clip, n, h, w)
            if args.via_cli:
                cmd = [sys.executable, "-c", CHECKOUT_CLI, "upscale", str(clip), str(out), "--model", args.model,
                       "--flow", args.flow, "--steps", str(args.steps), "--device", args.device, "--dtype", "fp32",
                       "--codec", args.codec, "--flow-iterations", str(args.flow_iters)]
                _, rss, wall = run_child(cmd)
                row = {"frames": n, "fps": n / wall, "seconds": wall}
            else:
                cmd = [sys.executable, __file__, "--worker", "--model", args.model, "--flow", args.flow,
                       "--clip", str(clip), "--out", str(out), "--steps", str(args.steps), "--device", args.device,
                       "--flow-iters", str(args.flow_iters), "--codec", args.codec]
                text, rss, wall = run_child(cmd)
                row = json.loads(text.strip().splitlines()[-1])
            row["peak_rss_mb"] = rss
            row["written"] = count_frames(out)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
            out.unlink()
    base = rows[0]["peak_rss_mb"]
    mode = "`streamvsr upscale` (frames/s include start-up)" if args.via_cli else "upscale_video loop"
    print(f"\nLR {w}x{h} -> {4 * w}x{4 * h}, {args.codec}, {args.steps} steps, RAFT {args.flow_iters} iterations, "
          f"device {args.device}, {mode}\nmachine: {machine()}\n")
    cuda = "peak_cuda_mb" in rows[0]
    print("| frames | written | frames/s | time s | peak RSS MB | vs first |" + (" peak CUDA MB |" if cuda else ""))
    print("|---|---|---|---|---|---|" + ("---|" if cuda else ""))
    for r in rows:
        line = (f"| {r['frames']} | {r['written']} | {r['fps']:.2f} | {r['seconds']:.0f} | {r['peak_rss_mb']:.0f} | "
                f"{r['peak_rss_mb'] / base:.3f} |")
        print(line + (f" {r['peak_cuda_mb']:.0f} |" if cuda else ""))


if __name__ == "__main__":
    main()
