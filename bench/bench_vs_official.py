"""Ours against the official Stream-DiffVSR pipeline: same frames, same weights, one run, interleaved.

The official code (a checkout of jamichss/Stream-DiffVSR) runs in its own virtual environment with its pinned
diffusers/transformers (e.g. diffusers==0.27.2 transformers==4.37.2 plus torch, torchvision, accelerate, pillow);
ours runs in this one. Each implementation is one long-lived worker process that loads its model once; the
driver then asks them in turn (official, ours, ours compiled, ... then again) to upscale the same sequence, so
load changes on a shared machine hit every variant alike. Reported per variant: seconds per frame (the best
round; whole sequence, frame 0 included, model loading excluded), the first round against the reference's (what
one pass costs, with the weight copies that are made on first use, and compiling), peak RSS of its process, and the
largest difference from the official output (the [0, 1] frames and the raw decoder outputs that are warped into
the next frame). Noise: frame i gets the i-th draw of a CPU generator seeded 42 on both sides (the official draws
it from the global RNG after ``torch.manual_seed(42)``, which on the CPU gives the same numbers).

    python bench/bench_vs_official.py --official ~/Stream-DiffVSR --official-python ~/sdvsr/.venv/bin/python
        [--model HUB_FOLDER] [--flow raft_large.pth] [--size 64x64] [--frames 3] [--rounds 3]
        [--variants official,ours,compiled (default; plain, exact, channels_last, nchw too)]
        [--device cuda --dtype fp16] [--breakdown] [--profile DIR]

Without ``--model`` a random model of the real-size architecture is written in the hub layout
(bench/realsize.py, 2.7 GB, in ``--workdir``); without ``--flow`` a random RAFT-large. Variants: ``official``;
``plain`` (ours with plain layers and the savings off: the official arithmetic); ``exact`` (plain layers with the
savings on: what the bit-identical savings alone give, ``--plain-layers``); ``ours`` (what ``streamvsr``
runs: the savings, bit-identical, and on the CPU in fp32 the oneDNN-packed layers, equal up to float rounding);
``compiled`` (``ours`` with ``compile=True``, ``--compile-mode`` passed to ``torch.compile``; its first round
includes compilation, reported separately); ``channels_last`` and ``nchw`` (``ours`` eager with its networks'
weights stored channels-last or NCHW, which their convolutions follow: ours stores them channels-last on a GPU in
half precision and leaves them NCHW elsewhere, see shared/norms.py). A variant whose worker dies is reported as
failed and the others go on.

On a GPU (``--device cuda --dtype fp16``) both sides run in that precision with RAFT's weights in float32 (as the
official inference.py loads them); the official pipeline, which runs only in float32 as shipped, runs under
``torch.autocast`` in that precision, so its RAFT computes in it too. Each round is timed between
``torch.cuda.synchronize()`` calls and reports the peak of ``torch.cuda.max_memory_allocated`` beside the RSS.
``--breakdown`` times each network call with CUDA events, ``--profile`` each kernel with torch.profiler (one more
pass each, outside the timed rounds). Each worker hands its cached GPU memory back after every answer: the variants
run interleaved, and what each keeps cached would not fit an 80 GB GPU together.
The initial noise is drawn in float32 on the CPU on both sides, then cast and moved (the official draws it in the
pipeline's dtype on the device, which would make the outputs incomparable). ``bench/gpu_side_by_side.sh`` runs
this on a lent GPU machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

from bench_engine import _import_package, machine  # makes this checkout importable as ``streamvsr``

ROOT = pathlib.Path(__file__).resolve().parents[1]
log = logging.getLogger("bench_vs_official")  # progress on stderr; the tables go to stdout
VARIANTS = ("official", "plain", "exact", "ours", "compiled", "channels_last", "nchw")


# ---------------------------------------------------------------------------------------------- workers


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reset_vram(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_vram_mb(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None


def _dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


class _Stamp:
    """A point in time on the device's stream: a recorded CUDA event, or on the CPU (which runs in order) the
    host clock."""

    def __init__(self, device: str):
        import torch

        self.event = torch.cuda.Event(enable_timing=True) if device.startswith("cuda") else None
        if self.event is not None:
            self.event.record()
        else:
            self.t = time.perf_counter()

    def ms_until(self, later: "_Stamp") -> float:
        return self.event.elapsed_time(later.event) if self.event is not None else (later.t - self.t) * 1000


def _breakdown(device: str, parts: dict, sequence) -> dict:
    """Milliseconds spent inside each named callable while ``sequence()`` runs once, and the total: each
    ``(owner, attribute)`` is wrapped for that run (an instance attribute, so a module's ``forward`` or a bound
    method alike; timed with CUDA events on a GPU), then restored. What lies between the parts (scheduler,
    warps, bicubic, host work and the GPU's idle gaps) is the total minus their sum."""
    spans = {name: [] for name in parts}

    def timed(name, fn):
        def call(*a, **k):
            start = _Stamp(device)
            out = fn(*a, **k)
            spans[name].append((start, _Stamp(device)))
            return out
        return call

    saved = []
    for name, (owner, attr) in parts.items():
        saved.append((owner, attr, owner.__dict__.get(attr)))
        setattr(owner, attr, timed(name, getattr(owner, attr)))
    try:
        _sync(device)
        first = _Stamp(device)
        sequence()
        last = _Stamp(device)
        _sync(device)
    finally:
        for owner, attr, before in saved:
            if before is None:
                delattr(owner, attr)
            else:
                setattr(owner, attr, before)
    return {"total_ms": first.ms_until(last),
            "parts_ms": {name: sum(a.ms_until(b) for a, b in pairs) for name, pairs in spans.items()},
            "calls": {name: len(pairs) for name, pairs in spans.items()}}


# What a kernel (GPU) or an operator (CPU) is, by its name; the first pattern that matches wins. Inductor's kernels
# are named triton_<tem|red|per|poi>_fused_<ops>: templates (its own matrix products), reductions (the fused norms)
# and pointwise apart.
_CATEGORIES = (
    ("fused (triton) template", r"^triton_tem_"),
    ("fused (triton) reduction", r"^triton_(red|per)_"),
    ("fused (triton) pointwise", r"^triton_"),
    ("attention", r"attention|flash|fmha|sdpa"),
    ("convolution", r"conv|fprop|implicit|winograd|dgrad"),
    ("grid sample, resize", r"grid_sampl|upsample|interpolate|bicubic|nearest"),  # before "linear" (bilinear)
    ("matrix product", r"gemm|cutlass|matmul|addmm|\bmm\b|bmm|linear"),
    ("normalisation", r"norm|welford|moments"),
    ("layout and copies", r"nchw|nhwc|transpose|permute|copy|memcpy|memset|contiguous|clone|cat|pad|reorder"),
    ("elementwise", r"elementwise|vectorized|unrolled|add|mul|silu|gelu|sigmoid|tanh|relu|sub|div|fill"),
)


def _category(name: str) -> str:
    import re

    return next((label for label, pattern in _CATEGORIES if re.search(pattern, name, re.IGNORECASE)), "other")


def _profile(device: str, sequence, path: str) -> dict:
    """``sequence()`` once under torch.profiler: the time of its GPU kernels (on the CPU: of its operators, self
    time) by category and the busiest ones, written as a table to ``path``. ``busy_ms`` against ``wall_ms`` tells
    how much of the time the GPU had nothing to do (the profiler's own host overhead widens such gaps, so read it
    as an upper bound)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    gpu = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    _sync(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        sequence()
        _sync(device)
        wall_ms = (time.perf_counter() - start) * 1000
    rows = [(e.key, (e.self_device_time_total if gpu else e.self_cpu_time_total) / 1000, e.count)
            for e in prof.key_averages()
            if (e.device_type == DeviceType.CUDA) == gpu and (e.self_device_time_total if gpu else
                                                                e.self_cpu_time_total) > 0]
    rows.sort(key=lambda r: -r[1])
    busy = sum(ms for _, ms, _ in rows)
    categories: dict[str, float] = {}
    for name, ms, _ in rows:
        categories[_category(name)] = categories.get(_category(name), 0.0) + ms
    what = "GPU kernels" if gpu else "CPU operators (self time)"
    lines = [f"{what}: {busy:.1f} ms busy of {wall_ms:.1f} ms wall", "", "| category | ms | share |", "|---|---|---|"]
    lines += [f"| {c} | {ms:.1f} | {ms / busy:.1%} |" for c, ms in sorted(categories.items(), key=lambda kv: -kv[1])]
    lines += ["", "| ms | calls | category | name |", "|---|---|---|---|"]
    lines += [f"| {ms:.2f} | {n} | {_category(name)} | {name[:160]} |" for name, ms, n in rows[:60]]
    pathlib.Path(path).write_text("\n".join(lines) + "\n")
    return {"wall_ms": wall_ms, "busy_ms": busy, "categories_ms": categories}


def _profile_or_error(device: str, sequence, path: str) -> dict:
    """``_profile``, or what went wrong with it: a profiler that does not work on a machine must not cost the run
    its timings."""
    try:
        return _profile(device, sequence, path)
    except Exception as e:  # noqa: BLE001 - reported in the table's place
        return {"error": f"{type(e).__name__}: {str(e).strip()[:300]}"}


def _diagnostic(device: str, request: dict, parts: dict, sequence) -> dict | None:
    """The answer to a breakdown or profile request (one more pass of ``sequence``), or None for a timed round."""
    if request.get("breakdown"):
        return _breakdown(device, parts, sequence)
    if request.get("profile"):
        return _profile_or_error(device, sequence, request["profile"])
    return None


def _stop_on_sigterm(signum, frame):
    # `timeout` signals the process and then its group: the second SIGTERM must not cut the tables short
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def _serve(run) -> None:
    """Answer one JSON request per stdin line with one JSON line on stdout."""
    # Library chatter must not mix with the answers, also what C++ code or child processes (Inductor's compile
    # workers, the profiler) write to file descriptor 1: the answers get their own copy of it, and 1 becomes 2.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    print(json.dumps({"ready": True, "rss_loaded_mb": _peak_rss_mb()}), file=out, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        answer = run(request)
        answer["peak_rss_mb"] = _peak_rss_mb()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            # The variants run interleaved, each in a process of its own: the memory one keeps cached between its
            # rounds (near 30 GB after cuDNN's autotuning) would leave the next too little on an 80 GB GPU.
            torch.cuda.empty_cache()
        print(json.dumps(answer), file=out, flush=True)


def official_worker(args) -> None:
    import numpy as np
    import PIL.Image
    import torch
    from torchvision.models.optical_flow import raft_large

    torch.set_num_threads(args.threads)
    # diffusers uses peft when it is installed, and a current peft does not import beside the pinned transformers
    # 4.37; the official pipeline has no LoRA, so peft is hidden (find_spec then answers None, as if absent).
    sys.modules.setdefault("peft", None)
    sys.path.insert(0, str(pathlib.Path(args.official).resolve()))
    from diffusers import DDIMScheduler  # noqa: E402
    from pipeline.stream_diffvsr_pipeline import (ControlNetModel, StreamDiffVSRPipeline,  # noqa: E402
                                                  UNet2DConditionModel)
    from temporal_autoencoder.autoencoder_tiny import TemporalAutoencoderTiny  # noqa: E402

    model = args.model
    controlnet = ControlNetModel.from_pretrained(model, subfolder="controlnet")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    vae = TemporalAutoencoderTiny.from_pretrained(model, subfolder="vae")
    scheduler = DDIMScheduler.from_pretrained(model, subfolder="scheduler")
    device, dtype = args.device, _dtype(args.dtype)
    pipe = StreamDiffVSRPipeline.from_pretrained(model, controlnet=controlnet, vae=vae, unet=unet,
                                                 scheduler=scheduler).to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    if device.startswith("cuda") and args.cudnn_benchmark == "both":  # not as shipped: to compare like with like
        torch.backends.cudnn.benchmark = True
    of_model = raft_large(weights=None)
    of_model.load_state_dict(torch.load(args.flow, map_location="cpu"))
    # in float32 whatever the pipeline's dtype, as the official inference.py loads it: the pipeline hands RAFT its
    # float32 bicubic upscales
    of_model = of_model.eval().requires_grad_(False).to(device)

    # Frame i's noise: the i-th float32 draw of a CPU generator seeded 42, cast to the pipeline's dtype, as ours
    # draws it. On the CPU in fp32 these are the numbers the official gets from the global RNG after
    # ``torch.manual_seed(42)``; elsewhere it would draw in its dtype on the device.
    noise = torch.Generator("cpu")

    def prepare_latents(batch_size, channels, height, width, dtype, device, generator, latents=None):
        shape = (batch_size, channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
        drawn = torch.randn(shape, generator=noise, dtype=torch.float32).to(device, dtype)
        return drawn * pipe.scheduler.init_noise_sigma

    pipe.prepare_latents = prepare_latents

    raw = []
    decode = vae.decode

    def recording_decode(*a, **k):  # the raw decoder output, which the pipeline warps into the next frame
        out = decode(*a, **k)
        raw.append(out[0].detach().clone())
        return out

    vae.decode = recording_decode

    def run(request):
        frames = np.load(request["frames"])
        images = [PIL.Image.fromarray(f) for f in frames]
        raw.clear()
        torch.manual_seed(42)  # the official inference.py: set_seed(42), once, before the sequence
        noise.manual_seed(42)

        def sequence():
            # The official pipeline runs only in float32 as shipped (it builds its latents and time embeddings in
            # float32 and hands them to the half-precision UNet); autocast in the weights' dtype is the least
            # help that makes it run in fp16/bf16 (its RAFT then runs in that precision too).
            with torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
                return pipe("", images, num_inference_steps=request["steps"], guidance_scale=0, of_model=of_model,
                            output_type="pt")

        answer = _diagnostic(device, request, {"UNet": (unet, "forward"), "ControlNet": (controlnet, "forward"),
                                               "RAFT": (of_model, "forward"), "VAE decode": (vae, "decode"),
                                               "VAE features": (vae, "encode")}, sequence)
        if answer is not None:
            return answer
        _reset_vram(device)
        start = time.perf_counter()
        result = sequence()
        _sync(device)
        seconds = time.perf_counter() - start
        outputs = torch.cat([img for img in result.images]).float().cpu().numpy()
        np.save(request["out"], outputs)
        np.save(request["raw"], torch.cat(raw).float().cpu().numpy())
        return {"seconds": seconds, "peak_vram_mb": _peak_vram_mb(device)}

    _serve(run)


def ours_worker(args) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    _import_package()
    from streamvsr.models.raft.weights import load_raft
    from streamvsr.models.stream_diffvsr import load_engine
    from streamvsr.models.stream_diffvsr.engine import StreamEngine
    from streamvsr.models.stream_diffvsr.loader import load_pipeline

    logging.basicConfig(level=logging.INFO, format="  [%(name)s] %(message)s", stream=sys.stderr)
    device, dtype = args.device, _dtype(args.dtype)
    if device.startswith("cuda") and args.cudnn_benchmark in ("ours", "both"):
        torch.backends.cudnn.benchmark = True  # as the `streamvsr` command sets it (cli/options.py)
    if args.worker == "plain":  # plain layers, no savings: the official arithmetic
        engine = StreamEngine(load_pipeline(args.model, device=device, dtype=dtype),
                              load_raft(args.flow, corr=args.corr, device=device), steps=args.steps,
                              device=device, compute_dtype=dtype, reuse=False)
    else:  # what `streamvsr` runs
        engine = load_engine(args.model, device=device, dtype=dtype, flow=args.flow, steps=args.steps,
                             corr=args.corr, compile=args.worker == "compiled", compile_mode=args.compile_mode,
                             plain_layers=args.worker == "exact")
    if args.worker in ("channels_last", "nchw"):  # the weights' layout, which the convolutions follow
        layout = torch.channels_last if args.worker == "channels_last" else torch.contiguous_format
        for network in (engine.pipeline.unet, engine.pipeline.controlnet, engine.pipeline.vae):
            network.to(memory_format=layout)

    def run(request):
        frames = torch.from_numpy(np.load(request["frames"])).permute(0, 3, 1, 2).float() / 255

        def sequence():
            state = engine.new_state(42)
            for frame in frames:
                _, state = engine.step(frame, state)

        answer = _diagnostic(device, request, {"UNet": (engine, "_unet"), "ControlNet": (engine, "_controlnet"),
                                               "RAFT": (engine, "_call_flow"), "VAE decode": (engine, "_decode"),
                                               # a first frame decodes without temporal features, by itself
                                               "VAE decode, frame 0": (engine.pipeline.vae, "decode"),
                                               "VAE features": (engine, "_features")}, sequence)
        if answer is not None:
            return answer
        compile_before = engine.compile_seconds
        state = engine.new_state(42)
        outputs, raw, per_frame = [], [], []
        _reset_vram(device)
        start = time.perf_counter()
        for frame in frames:
            t = time.perf_counter()
            hr, state = engine.step(frame, state)
            _sync(device)
            per_frame.append(time.perf_counter() - t)
            outputs.append(hr)
            raw.append(state.prev_output)
        seconds = time.perf_counter() - start
        np.save(request["out"], torch.cat(outputs).cpu().numpy())
        np.save(request["raw"], torch.cat(raw).cpu().numpy())
        return {"seconds": seconds, "per_frame": per_frame, "compile_seconds": engine.compile_seconds - compile_before,
                "peak_vram_mb": _peak_vram_mb(device)}

    _serve(run)


# ---------------------------------------------------------------------------------------------- driver


class WorkerDied(RuntimeError):
    """A worker process ended (a crash, an error in its variant): the other variants go on without it."""


class Worker:
    def __init__(self, name: str, python: str, args, workdir: pathlib.Path):
        cmd = [python, str(pathlib.Path(__file__).resolve()), "--worker", name, "--model", str(args.model),
               "--flow", str(args.flow), "--steps", str(args.steps), "--threads", str(args.threads),
               "--corr", args.corr, "--device", args.device, "--dtype", args.dtype,
               "--cudnn-benchmark", args.cudnn_benchmark]
        if args.compile_mode:
            cmd += ["--compile-mode", args.compile_mode]
        if name == "official":
            cmd += ["--official", str(args.official)]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.name = name
        self.log = open(workdir / f"{name}.log", "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, env=env, cwd=str(workdir))
        self.ready = self._read()

    def _died(self) -> WorkerDied:
        self.log.flush()
        tail = pathlib.Path(self.log.name).read_text()[-3000:]
        return WorkerDied(f"worker {self.name} died:\n{tail}")

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise self._died()
            try:
                answer = json.loads(line)
            except json.JSONDecodeError:
                answer = None
            if isinstance(answer, dict):
                return answer
            log.warning("%s wrote something that is not an answer: %s", self.name, line.rstrip()[:300])

    def ask(self, request: dict) -> dict:
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise self._died() from None
        return self._read()

    def close(self, kill: bool = False) -> None:
        """Let the worker end after its request; ``kill``: at once (a run stopped by its time limit)."""
        if kill:
            self.proc.kill()
        try:
            self.proc.stdin.close()
        except BrokenPipeError:  # it died
            pass
        self.proc.wait()
        self.log.close()


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"


def make_frames(path: pathlib.Path, n: int, h: int, w: int) -> None:
    """A moving crop of a smooth random texture, as uint8 (n, h, w, 3): consecutive frames are related by a
    translation, like video."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    base = F.interpolate(torch.rand(1, 3, (h + 2 * n) // 4 + 2, (w + 2 * n) // 4 + 2, generator=g),
                         size=(h + 2 * n, w + 2 * n), mode="bicubic", align_corners=False).clamp(0, 1)[0]
    frames = [base[:, i: i + h, 2 * i: 2 * i + w] for i in range(n)]
    np.save(path, (torch.stack(frames).permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", help="checkout of jamichss/Stream-DiffVSR")
    p.add_argument("--official-python", help="python of a venv with the official code's pinned packages")
    p.add_argument("--model", help="hub folder (default: random real-size architecture, written to --workdir)")
    p.add_argument("--flow", help="torchvision RAFT-large weights (default: random)")
    p.add_argument("--size", default="64x64", help="LR size HxW (default 64x64 -> 256x256)")
    p.add_argument("--frames", type=int, default=3)
    # three: ours makes its convolutions' weight copies in its first round, and this machine's noise is large
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    # what the goal is judged by: the exact savings (ours) and the compiled path; plain is a diagnostic
    p.add_argument("--variants", default="official,ours,compiled")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--corr", default="all_pairs", help="our RAFT correlation (the official is all-pairs)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (both sides)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"), help="both sides' precision")
    p.add_argument("--compile-mode", help="torch.compile mode of the compiled variant (default: torch's default), "
                   "e.g. max-autotune-no-cudagraphs or reduce-overhead (CUDA graphs)")
    p.add_argument("--cudnn-benchmark", default="ours", choices=("ours", "both", "none"),
                   help="on a GPU, which side lets cuDNN time its algorithms per convolution shape "
                   "(torch.backends.cudnn.benchmark): ours, as the streamvsr command does (default; the official "
                   "code leaves it off), both, or none")
    p.add_argument("--breakdown", action="store_true",
                   help="after the timed rounds, one more pass per variant (not in the timings) with its UNet, "
                   "ControlNet, RAFT and VAE calls timed (CUDA events on a GPU); prints the ms per frame of each")
    p.add_argument("--profile", metavar="DIR",
                   help="after the timed rounds, one more pass per variant under torch.profiler (not in the "
                   "timings): prints the ms per frame of its GPU kernels (CPU: operators) by category and writes "
                   "each variant's busiest kernels to DIR/<variant>.txt")
    p.add_argument("--workdir", help="where the random model and the outputs go (default: a temporary folder)")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker == "official":
        official_worker(args)
        return
    if args.worker:
        ours_worker(args)
        return

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if any(v not in VARIANTS for v in variants):
        p.error(f"--variants: choose from {', '.join(VARIANTS)}")
    if "official" in variants and not (args.official and args.official_python):
        p.error("the official variant needs --official and --official-python")
    # the workers run in the work folder, so every path given is made absolute; abspath, not resolve: a venv's
    # python is a link that must stay one
    args.official, args.official_python, args.model, args.flow, args.profile, args.workdir = (
        os.path.abspath(a) if a else a
        for a in (args.official, args.official_python, args.model, args.flow, args.profile, args.workdir))
    h, w = (int(v) for v in args.size.split("x"))
    if args.profile:  # now, not after the timed rounds
        pathlib.Path(args.profile).mkdir(parents=True, exist_ok=True)
    if "official" in variants and (h % 4 or w % 4):
        p.error("--size: the official pipeline shrinks each side to a multiple of 4 (where this pack pads), so "
                "compare at such sizes")
    if "official" in variants and min(h, w) < 32 and args.frames > 1:
        p.error("--size: the official pipeline's flow (torchvision's RAFT) refuses frames under 32 pixels a side "
                "(its feature maps are too small), so compare at 32x32 or more")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = pathlib.Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        _import_package()
        if args.model is None:
            import realsize

            args.model = workdir / "realsize"
            if not (args.model / "model_index.json").exists():
                log.info("writing a random real-size model to %s ...", args.model)
                realsize.write_hub_folder(args.model)
        if args.flow is None:
            import torch
            from torchvision.models.optical_flow import raft_large

            args.flow = workdir / "raft_large_random.pth"
            if not args.flow.exists():
                torch.manual_seed(0)
                torch.save(raft_large(weights=None).state_dict(), args.flow)
        frames = workdir / "frames.npy"
        make_frames(frames, args.frames, h, w)

        import numpy as np

        workers, failed = {}, {}  # failed: variant -> why its worker died (a one-shot GPU run keeps the others)
        alive = []  # the variants whose workers still answer

        def ask(v, request):
            try:
                answer = workers[v].ask(request)
            except WorkerDied as e:
                failed[v] = str(e)
                alive.remove(v)
                log.warning("%s failed; going on without it:\n%s", v, e)
                return None
            # each answer in the log as it comes: a run cut short keeps what it measured
            log.info("answer of %s: %s", v, json.dumps(answer))
            return answer

        results = {v: [] for v in variants}
        breakdown, profiles, stopped = {}, {}, False
        # `timeout` (a device call's deadline) stops the run with SIGTERM, also while the workers start: the tables
        # of what was done still print
        previous_handler = signal.signal(signal.SIGTERM, _stop_on_sigterm)
        try:
            for v in variants:  # started one after another: each loads 2.7 GB
                log.info("starting %s ...", v)
                try:
                    workers[v] = Worker(v, args.official_python if v == "official" else sys.executable, args,
                                        workdir)
                    alive.append(v)
                except (WorkerDied, OSError) as e:
                    failed[v] = str(e)
            for r in range(args.rounds):
                for v in list(alive):
                    out, raw = workdir / f"{v}_{r}_out.npy", workdir / f"{v}_{r}_raw.npy"
                    answer = ask(v, {"frames": str(frames), "steps": args.steps, "out": str(out), "raw": str(raw)})
                    if answer is None:
                        continue
                    answer.update(out=str(out), raw=str(raw))
                    results[v].append(answer)
                    log.info("round %d %s: %.1f s", r, v, answer["seconds"])
            if args.breakdown:
                for v in list(alive):
                    breakdown[v] = ask(v, {"frames": str(frames), "steps": args.steps, "breakdown": True})
            if args.profile:
                for v in list(alive):
                    profiles[v] = ask(v, {"frames": str(frames), "steps": args.steps,
                                          "profile": str(pathlib.Path(args.profile) / f"{v}.txt")})
        except KeyboardInterrupt:
            stopped = True
            print("\nSTOPPED before the end (time limit or Ctrl-C): the tables hold what was measured")
        finally:
            if not stopped:
                signal.signal(signal.SIGTERM, previous_handler)
            for worker in workers.values():
                worker.close(kill=stopped)
        # A variant whose worker died after some timed rounds keeps their figures
        variants = [v for v in variants if results.get(v)]
        for v, why in failed.items():
            what = (f"its worker died after {len(results[v])} of {args.rounds} timed rounds" if v in variants
                    else "FAILED (no figures)")
            print(f"\n{v}: {what}. {why.strip().splitlines()[-1] if why.strip() else ''}")
        breakdown = {v: b for v, b in breakdown.items() if b is not None}
        profiles = {v: b for v, b in profiles.items() if b is not None}
        if not variants:
            raise SystemExit("no variant finished a round" + (f" (their logs are in {workdir})" if args.workdir
                                                             else "; give --workdir to keep their logs"))

        reference = "official" if "official" in variants else variants[0]
        ref_out, ref_raw = np.load(results[reference][0]["out"]), np.load(results[reference][0]["raw"])
        base = min(a["seconds"] for a in results[reference]) / args.frames
        gpu = args.device.startswith("cuda")
        where = f"{_gpu_name()}, " if gpu else f"CPU, {args.threads} threads, "
        rounds = max(len(results[v]) for v in variants)
        print(f"\nLR {w}x{h} -> {4 * w}x{4 * h}, {args.frames} frames, {args.steps} steps, {args.dtype}, {where}"
              f"best of {rounds} interleaved rounds; model {args.model}\nmachine: {machine()}")
        # the first round is what a single pass costs: it includes the copies made on first use (and compiling)
        # the first round's peak includes what cuDNN's autotuning (`streamvsr` turns it on) tries; later rounds'
        # is what a long video keeps needing
        vram = " peak VRAM GB, first round / later (allocated) |" if gpu else ""
        print(f"| variant | s/frame | speed vs {reference} | first round vs {reference} | compile s | "
              f"RSS after load GB | peak RSS GB |{vram} max abs diff (output) | max abs diff (raw decoder) |")
        print("|---|---|---|---|---|---|---|" + ("---|" if gpu else "") + "---|---|")
        for v in variants:
            runs = results[v]
            # the compiled variant's first round includes compilation: its speed is taken from later rounds
            timed = runs[1:] if v == "compiled" and len(runs) > 1 else runs
            spf = min(a["seconds"] for a in timed) / args.frames
            compile_s = sum(a.get("compile_seconds", 0.0) for a in runs)
            diff_out = max(float(np.abs(np.load(a["out"]) - ref_out).max()) for a in runs)
            diff_raw = max(float(np.abs(np.load(a["raw"]) - ref_raw).max()) for a in runs)
            first = results[reference][0]["seconds"] / runs[0]["seconds"]
            print(f"| {v} | {spf:.2f} | {base / spf:.2f}x | {first:.2f}x | {compile_s:.0f} | "
                  f"{workers[v].ready['rss_loaded_mb'] / 1024:.2f} | {runs[-1]['peak_rss_mb'] / 1024:.2f} | "
                  + (f"{runs[0]['peak_vram_mb'] / 1024:.2f} / "
                     f"{max(a['peak_vram_mb'] for a in runs[1:] or runs) / 1024:.2f} | " if gpu else "")
                  + f"{diff_out:.2e} | {diff_raw:.2e} |")
        for v in variants:
            print(f"{v}: whole-sequence seconds by round {[round(a['seconds'], 1) for a in results[v]]}")
        if breakdown:
            names = list(dict.fromkeys(n for b in breakdown.values() for n in b["parts_ms"]))
            print(f"\nms per frame inside each part (one more pass of {args.frames} frames; other: the rest of "
                  "the frame, host work and idle gaps included)")
            print("| variant | " + " | ".join(names) + " | other | total |")
            print("|---|" + "---|" * (len(names) + 2))
            for v, b in breakdown.items():
                parts = [b["parts_ms"].get(n) for n in names]
                other = b["total_ms"] - sum(x for x in parts if x is not None)
                cells = ["-" if x is None else f"{x / args.frames:.1f}" for x in parts]
                print(f"| {v} | " + " | ".join(cells) + f" | {other / args.frames:.1f} | "
                      f"{b['total_ms'] / args.frames:.1f} |")
            for v, b in breakdown.items():
                print(f"{v}: calls per part {b['calls']}")
        for v, prof in list(profiles.items()):
            if "error" in prof:
                print(f"\n{v}: no profile ({prof['error']})")
                del profiles[v]
        if profiles:
            names = sorted({c for p in profiles.values() for c in p["categories_ms"]},
                           key=lambda c: -max(p["categories_ms"].get(c, 0.0) for p in profiles.values()))
            unit = "GPU kernels" if gpu else "CPU operators, self time"
            print(f"\nms per frame by kind of work (torch.profiler, one more pass; {unit}; busy: their sum, wall: "
                  f"the pass, the profiler's overhead included; the busiest kernels are in {args.profile})")
            print("| variant | busy | wall | " + " | ".join(names) + " |")
            print("|---|---|---|" + "---|" * len(names))
            for v, prof in profiles.items():
                cells = [f"{prof['categories_ms'].get(c, 0.0) / args.frames:.1f}" for c in names]
                print(f"| {v} | {prof['busy_ms'] / args.frames:.1f} | {prof['wall_ms'] / args.frames:.1f} | "
                      + " | ".join(cells) + " |")
        steady = {v: [a["per_frame"] for a in results[v] if "per_frame" in a] for v in variants}
        for v, rows in steady.items():
            if rows:
                print(f"{v}: per-frame seconds by round {[[round(x, 2) for x in row] for row in rows]}")


if __name__ == "__main__":
    main()
