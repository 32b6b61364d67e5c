"""Peak memory and time of RAFT's two correlation paths against resolution.

Each case runs in a fresh subprocess (peak RSS = ru_maxrss of that process; on CUDA, peak allocated memory).
All-pairs cases whose volume would not fit in the free memory are reported as skipped with the size they need.

    python bench/bench_raft_corr.py                               # CPU, RAFT-large, random weights
    python bench/bench_raft_corr.py --device cuda --updates 12
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZES = [(720, 1280), (1080, 1920), (1440, 2560), (2160, 3840), (2880, 5120)]


def worker(args) -> None:
    import resource

    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from bench_engine import _import_package

    _import_package()
    from streamvsr.models.raft.network import RAFT

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = RAFT(args.arch).to(device).eval()
    h, w = args.h, args.w
    g = torch.Generator().manual_seed(1)
    a = (torch.rand(1, 3, h, w, generator=g) * 2 - 1).to(device)
    b = torch.roll(a, shifts=(2, 5), dims=(-2, -1))
    start = time.perf_counter()
    with torch.inference_mode():
        flow = model(a, b, num_flow_updates=args.updates, corr=args.corr)
    if device.type == "cuda":
        torch.cuda.synchronize()
    result = {"seconds": time.perf_counter() - start,
              "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              "flow_abs_mean": float(flow.abs().mean())}
    if device.type == "cuda":
        result["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--arch", default="raft_large")
    p.add_argument("--updates", type=int, default=12)
    p.add_argument("--sizes", default=",".join(f"{w}x{h}" for h, w in SIZES), help="WxH list")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--corr", default="all_pairs", help=argparse.SUPPRESS)
    p.add_argument("--h", type=int, help=argparse.SUPPRESS)
    p.add_argument("--w", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_engine import _import_package

    _import_package()
    import torch

    from streamvsr.models.raft.correlation import all_pairs_bytes
    from streamvsr.models.shared.runtime import available_memory

    rows = []
    for size in args.sizes.split(","):
        w, h = (int(v) for v in size.split("x"))
        for corr in ("all_pairs", "on_demand"):
            need = all_pairs_bytes(h, w)
            if corr == "all_pairs" and need > available_memory(torch.device(args.device)) * 0.8:
                rows.append((w, h, corr, None, f"skipped: the volume needs {need / 2**30:.1f} GiB"))
                continue
            cmd = [sys.executable, __file__, "--worker", "--device", args.device, "--arch", args.arch,
                   "--updates", str(args.updates), "--corr", corr, "--h", str(h), "--w", str(w)]
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode != 0:
                # (a worker killed for memory prints nothing)
                last = (run.stderr.strip().splitlines() or [f"exit status {run.returncode}"])[-1]
                rows.append((w, h, corr, None, "failed: " + last[:80]))
            else:
                rows.append((w, h, corr, json.loads(run.stdout.strip().splitlines()[-1]), ""))
            print(rows[-1], file=sys.stderr)
    cuda = args.device.startswith("cuda")
    print(f"\n{args.arch}, {args.updates} updates, device {args.device}\n")
    print("| frame | correlation | time s | peak RSS GiB |" + (" peak CUDA GiB |" if cuda else "") + " note |")
    print("|---|---|---|---|" + ("---|" if cuda else "") + "---|")
    for w, h, corr, r, note in rows:
        if r is None:
            print(f"| {w}x{h} | {corr} | – | – |" + (" – |" if cuda else "") + f" {note} |")
        else:
            extra = f" {r['peak_cuda_gib']:.2f} |" if cuda else ""
            print(f"| {w}x{h} | {corr} | {r['seconds']:.1f} | {r['peak_rss_gib']:.2f} |{extra} {note} |")


if __name__ == "__main__":
    main()
