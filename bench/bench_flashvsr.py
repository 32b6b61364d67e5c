"""FlashVSR benchmarks (not a test): per-chunk time and peak memory with the real network dimensions (random
weights), and the memory of the exact sparse attention against a dense masked one.

    python bench/bench_flashvsr.py chunks --sizes 128x128,256x256 --frames 25,41,57
    python bench/bench_flashvsr.py attention --sizes 768x1280,1024x1920,2048x3840

``chunks``: each (output size, frame count) runs in a fresh process: the real-size DiT (1536 wide, 30 blocks, FFN
8960, 4096-wide prompt of 512 tokens), LQ projection (768 -> 2048 -> 3072 -> 1536) and TC decoder (512/256/128/128)
with random weights stream that many LR frames; it prints seconds per chunk (first chunk: 6 latent frames, later
ones: 2) and the process's peak RSS (VmHWM).

``attention``: one block's self-attention in the steady state at kv_ratio 3 (a 2-latent-frame query slice against
4 slices of keys) at sparse_ratio 2 and local_range 11. The dense figure is computed: what an SDPA call with the
block mask expanded to a token mask needs (a boolean mask and a float32 score matrix per head); the sparse figure is
measured for the sizes given to ``--measure`` (peak RSS of a fresh process above its baseline) and computed
otherwise, and the table says which.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
REAL = dict(dim=1536, num_layers=30, ffn_dim=8960, text_dim=4096, prompt_len=512, lq_hidden=(2048, 3072),
            tc_channels=(512, 256, 128, 128))


def _import_package():
    import importlib.util

    if "streamvsr" not in sys.modules:
        spec = importlib.util.spec_from_file_location("streamvsr", ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["streamvsr"] = module
        spec.loader.exec_module(module)


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024


def _real_pipeline(device, dtype):
    import torch

    from streamvsr.models.flashvsr.dit import WanDiT
    from streamvsr.models.flashvsr.engine import FlashVSRPipeline
    from streamvsr.models.flashvsr.lq_proj import LQProjection
    from streamvsr.models.flashvsr.tc_decoder import TCDecoder

    torch.manual_seed(0)
    config = dict(dim=REAL["dim"], in_dim=16, out_dim=16, num_layers=REAL["num_layers"], ffn_dim=REAL["ffn_dim"],
                  text_dim=REAL["text_dim"], freq_dim=256, num_heads=REAL["dim"] // 128, eps=1e-6)
    with torch.no_grad():
        dit = WanDiT(config, device=device, dtype=dtype)
        lq = LQProjection("v1.1", 768, *REAL["lq_hidden"], REAL["dim"], 1, device=device, dtype=dtype)
        tc = TCDecoder(REAL["tc_channels"], 16, device=device, dtype=dtype)
        for module in (dit, lq, tc):
            for p in module.parameters():  # small, so activations stay finite through 30 blocks
                p.normal_(0, 0.02)
        prompt = torch.randn(1, REAL["prompt_len"], REAL["text_dim"], dtype=dtype, device=device)
    return FlashVSRPipeline(dit.eval(), lq.eval(), tc.eval(), prompt, "v1.1")


def run_chunks(size: str, frames: int, device: str, dtype_name: str) -> dict:
    import torch

    from streamvsr.models.flashvsr.engine import FlashVSREngine

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    h, w = (int(v) for v in size.split("x"))
    engine = FlashVSREngine(_real_pipeline(device, dtype), device=device, compute_dtype=dtype)
    loaded = _peak_rss()
    g = torch.Generator().manual_seed(1)
    frames = int(frames)
    lr = torch.rand(frames, 3, h // 4, w // 4, generator=g)
    state = engine.new_state(42)
    times, out_count = [], 0
    start = time.perf_counter()
    for i in range(frames):
        t0 = time.perf_counter()
        out, state = engine.push(state, lr[i])
        if out.shape[0]:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        out_count += out.shape[0]
    t0 = time.perf_counter()
    out, state = engine.flush(state)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
    out_count += out.shape[0]
    result = {"size": size, "frames": frames, "outputs": out_count, "chunk_s": [round(t, 2) for t in times],
              "total_s": round(time.perf_counter() - start, 1), "peak_rss_mb": _peak_rss() >> 20,
              "rss_after_load_mb": loaded >> 20}
    if device.startswith("cuda"):
        result["peak_vram_mb"] = torch.cuda.max_memory_allocated() >> 20
    return result


def attention_shapes(size: str, sparse_ratio=2.0, local_range=11, kv_slices=4, heads=12, head_dim=128) -> dict:
    from streamvsr.models.flashvsr.attention import topk_budget

    h, w = (int(v) for v in size.split("x"))
    windows = (h // 128) * (w // 128)  # per slice
    sq = windows * 128
    sk = kv_slices * sq
    budget = min(topk_budget(sparse_ratio, h, w), windows * windows * kv_slices - 1)
    # at most the local candidates: local_range^2 windows per query window and key slice
    local = min(local_range, h // 128) * min(local_range, w // 128)
    selected = min(budget + 1, windows * local * kv_slices)  # key blocks per (head, query slice)
    dense_mask = heads * sq * sk  # bool token mask
    dense_scores = heads * sq * sk * 4  # float32 scores (the math path SDPA takes with an arbitrary mask)
    kv = 2 * heads * sk * head_dim * 2 + 2 * heads * sq * head_dim * 2  # bf16 K/V cache, queries and output
    # the gather path's temporaries: gathered K and V of one group (bounded by gather_tokens)
    sparse_work = 2 * (1 << 21) * head_dim * 2
    return {"size": size, "windows_per_slice": windows, "query_tokens": sq, "key_tokens": sk,
            "selected_pairs_per_slice": selected, "density": selected / (windows * windows * kv_slices),
            "dense_bytes": dense_mask + dense_scores + kv, "sparse_bytes_computed": kv + sparse_work}


def run_attention(size: str) -> dict:
    import torch

    from streamvsr.models.flashvsr.attention import block_mask, block_sparse_attention, local_window_mask, topk_budget

    shapes = attention_shapes(size)
    heads, d = 12, 128
    h, w = (int(v) for v in size.split("x"))
    rows, cols = h // 128, w // 128
    nq, nk = shapes["windows_per_slice"], 4 * shapes["windows_per_slice"]
    base = _peak_rss()  # before the inputs: like the dense figure, the measured one includes q and the K/V cache
    g = torch.Generator().manual_seed(0)
    q = torch.randn(heads, nq, 128, d, generator=g, dtype=torch.bfloat16)
    k = torch.randn(heads, nk, 128, d, generator=g, dtype=torch.bfloat16)
    v = torch.randn(heads, nk, 128, d, generator=g, dtype=torch.bfloat16)
    local = local_window_mask(rows, cols, 11)
    mask = block_mask(q.mean(2).permute(1, 0, 2).reshape(nq, -1), k.mean(2).permute(1, 0, 2).reshape(nk, -1), heads,
                      local, topk_budget(2.0, h, w))
    t0 = time.perf_counter()
    out = block_sparse_attention(q, k, v, mask)
    elapsed = time.perf_counter() - t0
    assert out.shape == q.shape
    return {**shapes, "sparse_bytes_measured": _peak_rss() - base, "sparse_s": round(elapsed, 2),
            "selected_measured": int(mask.sum()) // heads}


def _fresh(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "_one", *args], capture_output=True, text=True, timeout=7200)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    c = sub.add_parser("chunks")
    c.add_argument("--sizes", default="128x128,256x256", help="output sizes HxW (multiples of 128)")
    c.add_argument("--frames", default="25,41,57", help="LR frame counts")
    c.add_argument("--device", default="cpu")
    c.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    a = sub.add_parser("attention")
    a.add_argument("--sizes", default="768x1280,1024x1920,2048x3840")
    a.add_argument("--measure", default="768x1280,1024x1920,2048x3840",
                   help="sizes to measure (others are computed)")
    one = sub.add_parser("_one")
    one.add_argument("job", nargs="+")
    args = p.parse_args(argv)
    _import_package()
    import torch

    if args.what == "_one":
        kind, *rest = args.job
        result = run_chunks(*rest) if kind == "chunks" else run_attention(*rest)
        print(json.dumps(result))
        return 0
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    if args.what == "chunks":
        cuda = args.device.startswith("cuda")
        print("| output | LR frames | outputs | s/chunk (first; later) | total s | peak RSS MB (after load) |"
              + (" peak VRAM MB (allocated) |" if cuda else ""))
        print("|---|---|---|---|---|---|" + ("---|" if cuda else ""))
        for size in args.sizes.split(","):
            for frames in args.frames.split(","):
                r = _fresh(["chunks", size, frames, args.device, args.dtype])
                later = r["chunk_s"][1:]
                vram = f" {r['peak_vram_mb']} |" if cuda else ""
                print(f"| {size} | {frames} | {r['outputs']} | {r['chunk_s'][0]}; "
                      f"{sum(later) / max(len(later), 1):.2f} | {r['total_s']} | {r['peak_rss_mb']} "
                      f"({r['rss_after_load_mb']}) |{vram}", flush=True)
    else:
        measure = set(args.measure.split(",")) if args.measure else set()
        print("| output | key blocks per slice (density) | dense masked SDPA (computed) | exact sparse | time |")
        print("|---|---|---|---|---|")
        for size in args.sizes.split(","):
            if size in measure:
                r = _fresh(["attention", size])
                sparse = f"{r['sparse_bytes_measured'] / 2**30:.2f} GiB (measured)"
                t = f"{r['sparse_s']} s"
            else:
                r = attention_shapes(size)
                sparse = f"{r['sparse_bytes_computed'] / 2**30:.2f} GiB (computed)"
                t = "—"
            print(f"| {size} | {r['selected_pairs_per_slice']} ({r['density']:.0%}) | "
                  f"{r['dense_bytes'] / 2**30:.1f} GiB | {sparse} | {t} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
