"""A CPU engine's process setup: large freed blocks kept by glibc for the next allocation."""

import os
import subprocess
import sys

import pytest

# Allocates a 256 MB tensor, frees it, allocates 200 MB: the minor page faults of the second allocation (51200 for
# 200 MB of 4 KB pages when it is fresh memory).
PROBE = """
import resource, sys
from streamvsr.models.shared.runtime import keep_freed_memory
import torch
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
t = torch.ones(64 << 20); del t
before = faults(); t = torch.ones(50 << 20); print(kept, faults() - before)
"""


def _probe(mode: str, env: dict | None = None) -> tuple[str, int]:
    """``env``: the child's environment; by default this one without the allocator's settings (a test run's own,
    e.g. a container's MALLOC_TRIM_THRESHOLD_, made the setting step aside)."""
    from streamvsr.models.shared.runtime import _MALLOC_ENV

    if env is None:
        env = {name: value for name, value in os.environ.items() if name not in _MALLOC_ENV}
    run = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    kept, faults = run.stdout.split()
    return kept, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator (Linux)")
def test_large_freed_blocks_are_reused_without_page_faults():
    kept, fresh = _probe("default")
    if fresh < 30000:
        pytest.skip(f"this C library already reuses large blocks ({fresh} faults for fresh 200 MB)")
    kept, reused = _probe("keep")
    assert kept == "True"
    assert reused < 2000, f"{reused} page faults allocating 200 MB after freeing 256 MB (fresh: {fresh})"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator (Linux)")
def test_an_allocator_tuned_by_the_environment_is_left_alone():
    kept, faults = _probe("keep", env=dict(os.environ, MALLOC_MMAP_MAX_="65536"))
    assert kept == "False"
    assert faults > 30000


@pytest.mark.parametrize("plain_layers", [False, True])
def test_a_cpu_engine_keeps_freed_memory(plain_layers, monkeypatch, tmp_path):
    """Whoever loads a Stream-DiffVSR engine for the CPU (the command, a script, the benchmark) gets the allocator
    setting with it."""
    from helpers import make_tiny_checkpoint, make_tiny_raft
    from streamvsr.models.shared import runtime
    from streamvsr.models.stream_diffvsr import load_engine

    calls = []
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: calls.append(True) or True)
    load_engine(make_tiny_checkpoint(tmp_path / "ckpt"), flow=make_tiny_raft(tmp_path / "raft.pth"),
                plain_layers=plain_layers)
    assert calls == [True]


def test_auto_precision_is_bf16_where_the_chosen_gpu_computes_in_it(monkeypatch):
    """bf16 on Ampere and later, fp16 before (torch.cuda.is_bf16_supported() says yes there too, since bf16 can be
    emulated, and asks the current GPU): a machine with a new cuda:0 and an old cuda:1."""
    import torch

    from streamvsr.models.shared.runtime import pick_dtype

    capability = {"cuda:0": (8, 9), "cuda:1": (7, 5)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[str(device)])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.version, "hip", None)
    assert pick_dtype("auto", torch.device("cuda:0")) == torch.bfloat16
    assert pick_dtype("auto", torch.device("cuda:1")) == torch.float16
    assert pick_dtype("fp32", torch.device("cuda:1")) == torch.float32
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    # ROCm GPUs from RDNA 3 and CDNA on compute in bf16; RDNA 2 and older do not (as ComfyUI's own choice says)
    import types

    arch = {"cuda:0": "gfx1100", "cuda:1": "gfx1030:xnack-"}
    monkeypatch.setattr(torch.version, "hip", "6.2")
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: types.SimpleNamespace(gcnArchName=arch[str(device)]))
    assert pick_dtype("auto", torch.device("cuda:0")) == torch.bfloat16
    assert pick_dtype("auto", torch.device("cuda:1")) == torch.float16


def test_free_gpu_memory_counts_what_the_allocator_holds_unused(monkeypatch):
    """After a frame, PyTorch's allocator keeps the freed activations for reuse: the driver reports that memory as
    taken, but the next frame can have it (RAFT's correlation choice, made at the first flow, reads this)."""
    import torch

    from streamvsr.models.shared import runtime

    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 30 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 6 * gib)
    assert runtime.available_memory("cuda:0") == 26 * gib


@pytest.mark.parametrize("message, expected", [
    ("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported", True),
    ("Triton Error [CUDA]: out of memory", True),
    ("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", True),
    ("cuDNN error: CUDNN_STATUS_ALLOC_FAILED", True),
    ("HIP error: out of memory\nHIP kernel errors might be asynchronously reported", True),  # (ROCm's words)
    ("MIOpen Error: miopenStatusAllocFailed", True),
    ("CUDA error: an illegal memory access was encountered", False),
    ("out of resource: shared memory, Required: 262144, Hardware limit: 232448", False),
])
def test_memory_running_out_outside_the_cuda_allocator_is_known(message, expected):
    """The driver, Triton and the CUDA libraries report running out of memory in plain errors of their own, which
    must get the out-of-memory advice (and RAFT's retry) rather than pass for a bug or a compiler failure."""
    import torch

    from streamvsr.models.shared.runtime import is_out_of_memory

    kind = getattr(torch, "AcceleratorError", RuntimeError)
    assert is_out_of_memory(kind(message)) is expected
    assert is_out_of_memory(RuntimeError(message)) is expected


def test_a_pytorch_too_old_is_said_before_any_model_loads(monkeypatch, tmp_path, caplog):
    """Below the oldest PyTorch it runs on, one line that says to update, from every loader (the nodes call them)
    and from the command line before anything is read."""
    import torch

    from PIL import Image

    from helpers import make_tiny_raft
    from streamvsr.cli import main
    from streamvsr.models.flashvsr.weights import load_flashvsr
    from streamvsr.models.raft.weights import load_raft
    from streamvsr.models.stream_diffvsr.loader import load_pipeline
    from streamvsr.models.shared.errors import UserInputError
    from streamvsr.models.shared.runtime import check_torch_version

    for fine in ("2.5.1", "2.14.1+cu130", "2.10.0a0+git1234", "3.0.0"):
        check_torch_version(fine)
    raft = make_tiny_raft(tmp_path / "raft.pth")
    monkeypatch.setattr(torch, "__version__", "2.4.1+cu121")
    with pytest.raises(UserInputError, match=r"^this needs PyTorch 2.5 or newer, and 2.4.1\+cu121 is installed: "
                                             "update it"):
        load_raft(raft)
    for load in (load_pipeline, load_flashvsr):
        with pytest.raises(UserInputError, match="this needs PyTorch 2.5 or newer"):
            load(tmp_path / "none")
    frames = tmp_path / "in"
    frames.mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8)).save(frames / f"f{i}.png")
    assert main(["frames", str(frames), str(tmp_path / "out"), "--model", str(tmp_path / "none"),
                 "--flow", str(raft)]) == 2
    assert "error: this needs PyTorch 2.5 or newer" in caplog.text  # (before the missing model is noticed)
    assert not (tmp_path / "out").exists()


def test_the_recompile_guard_uses_the_names_of_older_pytorch(monkeypatch):
    """PyTorch 2.6 calls the recompile limit cache_size_limit and its failure switch fail_on_cache_limit_hit (the
    same FailOnRecompileLimitHit is raised; checked on 2.6.0); 2.5 has the limit without the switch: the limit is
    still raised (at 8 graphs, a few frame sizes, a network ran eagerly without a word)."""
    import contextlib
    import types

    import torch._dynamo

    from streamvsr.models.shared.runtime import recompile_limit

    patched = []
    old = types.SimpleNamespace(cache_size_limit=8, fail_on_cache_limit_hit=False,
                                patch=lambda changes: patched.append(changes) or contextlib.nullcontext())
    monkeypatch.setattr(torch._dynamo, "config", old)
    with recompile_limit(20):
        pass
    assert patched == [{"cache_size_limit": 20, "fail_on_cache_limit_hit": True}]
    patched.clear()
    monkeypatch.setattr(torch._dynamo, "config", types.SimpleNamespace(
        cache_size_limit=8, patch=lambda changes: patched.append(changes) or contextlib.nullcontext()))
    with recompile_limit(20):
        pass
    assert patched == [{"cache_size_limit": 20}]
    monkeypatch.setattr(torch._dynamo, "config", types.SimpleNamespace())
    assert isinstance(recompile_limit(20), contextlib.nullcontext)


def test_progress_speed_counts_only_the_frames_of_this_run(monkeypatch, capsys):
    """A resumed job starts its report at the frames done before, which took no time in this run: 500 of 1000
    frames at 2 s a frame showed 250 fps and 2 s left."""
    from streamvsr.models.shared import runtime

    clock = [100.0]
    monkeypatch.setattr(runtime.time, "monotonic", lambda: clock[0])
    monkeypatch.setenv("STREAMVSR_PROGRESS", "1")
    progress = runtime.Progress(1000, "frames")
    for done in (500, 501, 502):
        progress.update(done)
        clock[0] += 2.0
    assert capsys.readouterr().err.split("\r")[1:] == [
        "frames: 500/1000 frames", "frames: 501/1000 frames, 0.50 fps, 998 s left",
        "frames: 502/1000 frames, 0.50 fps, 996 s left"]


def test_a_shorter_progress_line_leaves_nothing_of_the_longer_one_behind(monkeypatch, capsys):
    """A carriage return only moves the cursor: "101 s left" followed by "1 s left" showed "1 s leftft"."""
    from streamvsr.models.shared import runtime

    clock = [0.0]
    monkeypatch.setattr(runtime.time, "monotonic", lambda: clock[0])
    monkeypatch.setenv("STREAMVSR_PROGRESS", "1")
    progress = runtime.Progress(100, "upscale")
    for done, at in ((0, 0.0), (50, 101.0), (99, 102.0)):
        clock[0] = at
        progress.update(done)
    screen = []  # what a terminal shows: each write from the start of the line, over what was there
    for text in capsys.readouterr().err.split("\r")[1:]:
        screen[:len(text)] = text
    assert "".join(screen).rstrip() == "upscale: 99/100 frames, 0.97 fps, 1 s left"


def test_progress_into_a_file_writes_a_line_per_interval_not_per_frame(monkeypatch, capsys):
    """STREAMVSR_PROGRESS=1 with stderr in a file wrote the line again for every frame (12 MB over a long video);
    the last count, held back for being too soon, is still written when the report closes."""
    from streamvsr.models.shared import runtime

    clock = [0.0]
    monkeypatch.setattr(runtime.time, "monotonic", lambda: clock[0])
    monkeypatch.setenv("STREAMVSR_PROGRESS", "1")
    progress = runtime.Progress(None, "upscale")
    for done in range(1, 101):  # 100 frames at 20 fps: 5 s
        progress.update(done)
        clock[0] += 0.05
    progress.close()
    lines = [line.rstrip() for line in capsys.readouterr().err.split("\r")[1:]]
    assert 8 <= len(lines) <= 12, lines
    assert lines[0] == "upscale: 1 frames" and lines[-1] == "upscale: 100 frames, 20.00 fps"


@pytest.mark.parametrize("layout", ["v2", "v1", "v1 without a limit", "none"])
def test_memory_in_a_container_is_what_its_limit_leaves(monkeypatch, tmp_path, layout):
    """/proc/meminfo shows the host in a container: its cgroup's limit caps what is free, the older layout (v1) too
    (the host's memory was taken as free: an all-pairs volume that size gets the process killed), and the page
    cache the kernel gives back (inactive files, the weights just read) is not counted as used (it turned RAFT to
    the slower on-demand correlation)."""
    from streamvsr.models.shared import runtime

    gib = 1 << 30
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal: {64 * gib // 1024} kB\nMemAvailable: {40 * gib // 1024} kB\n")
    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    v2.mkdir(), v1.mkdir()
    monkeypatch.setattr(runtime, "MEMINFO", str(meminfo))
    monkeypatch.setattr(runtime, "CGROUP_V2", str(v2))
    monkeypatch.setattr(runtime, "CGROUP_V1", str(v1))
    (v2 / "memory.max").write_text("max\n")  # (a v2 host outside a limited cgroup)
    if layout == "v2":
        (v2 / "memory.max").write_text(f"{16 * gib}\n")
        (v2 / "memory.current").write_text(f"{10 * gib}\n")
        (v2 / "memory.stat").write_text(f"anon {4 * gib}\nfile {6 * gib}\ninactive_file {5 * gib}\n")
    elif layout.startswith("v1"):
        limit = 9223372036854771712 if "without" in layout else 16 * gib
        (v1 / "memory.limit_in_bytes").write_text(f"{limit}\n")
        (v1 / "memory.usage_in_bytes").write_text(f"{10 * gib}\n")
        (v1 / "memory.stat").write_text(f"cache {6 * gib}\ntotal_inactive_file {5 * gib}\n")
    total, free = runtime.device_memory("cpu"), runtime.available_memory("cpu")
    if layout in ("v2", "v1"):
        assert (total, free) == (16 * gib, 11 * gib)  # 16 - (10 - 5 reclaimable)
    else:
        assert (total, free) == (64 * gib, 40 * gib)


def test_memory_without_proc_is_what_psutil_says(monkeypatch, tmp_path):
    """Windows has neither /proc nor sysconf, and macOS no count of available pages: both got a fixed 8 GiB, which
    sized RAFT's correlation volume as if 8 GiB were free on any machine."""
    import types

    from streamvsr.models.shared import runtime

    monkeypatch.setattr(runtime, "MEMINFO", str(tmp_path / "no-proc"))
    monkeypatch.setattr(runtime, "_cgroup_memory", lambda: (None, 0))
    psutil = types.SimpleNamespace(virtual_memory=lambda: types.SimpleNamespace(total=24 << 30, available=5 << 30))
    monkeypatch.setitem(sys.modules, "psutil", psutil)
    assert runtime.device_memory("cpu") == 24 << 30 and runtime.available_memory("cpu") == 5 << 30
