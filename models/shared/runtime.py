"""Where and in what precision the engines run, how much memory is free, and a console progress line.

Used by the command line and by the engines' callers; the ComfyUI nodes use ComfyUI's own device and dtype choice.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
import time

import torch

from .errors import PrecisionError, UserInputError

log = logging.getLogger(__name__)

# The one precision table: option value -> dtype.
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# glibc's mallopt parameters and the environment variables that set them at start-up
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory() -> bool:
    """For a process that runs an engine on the CPU (the command line; ``load_engine`` of Stream-DiffVSR for the
    CPU) on Linux with glibc: serve large allocations from the heap and keep freed memory there for the next ones,
    instead of a fresh ``mmap`` per allocation that is returned on ``free``; whether it did.

    PyTorch's CPU tensors come straight from ``malloc``. glibc maps every block over its mmap threshold (128 KB at
    first, rising to at most 32 MB) fresh from the kernel and unmaps them when freed, so every large activation is new
    memory, touched page by page on first write: at a 1280x736 output, where a layer's output runs to hundreds of MB,
    those page faults took about a third of a frame on a 2-core EPYC (frame 67 -> 41 s, the same numbers). Kept, the
    freed blocks serve the next frame's identical allocations. The cost is fragmentation: peak RSS grows (11.6 -> 13.7
    GB there). Nothing changes when the environment already tunes glibc's allocator (e.g. ``MALLOC_MMAP_MAX_=65536``
    restores its default behaviour), or on another C library. Not for the ComfyUI nodes: that process is ComfyUI's.
    """
    if sys.platform != "linux" or any(name in os.environ for name in _MALLOC_ENV):
        return False
    try:
        import ctypes

        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    # trim threshold first: with mmap off, a freed top of the heap would otherwise go back to the kernel
    return bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)) and bool(mallopt(_M_MMAP_MAX, 0))


def recompile_limit(at_least: int):
    """A context in which torch.compile keeps at least ``at_least`` graphs per function and beyond that raises
    (``recompile_limit_hit``) instead of running the function eagerly without a word: Dynamo's default is 8 per code
    object in the process, which a few frame sizes use up (networks of one class share their code)."""
    import contextlib

    import torch._dynamo

    config = torch._dynamo.config
    # (named cache_size_limit and fail_on_cache_limit_hit before PyTorch 2.7; 2.5 has no such failure: there the
    # limit is raised, and the silent eager run beyond it stays possible)
    pairs = (("recompile_limit", "fail_on_recompile_limit_hit"), ("cache_size_limit", "fail_on_cache_limit_hit"))
    for limit, fail in sorted(pairs, key=lambda pair: not hasattr(config, pair[1])):  # (a pair with both first)
        if hasattr(config, limit):
            return config.patch({limit: max(at_least, getattr(config, limit)),
                                 **({fail: True} if hasattr(config, fail) else {})})
    return contextlib.nullcontext()


def recompile_limit_hit() -> tuple[type, ...]:
    """The exception ``recompile_limit`` raises where this PyTorch has it (else nothing to catch)."""
    import torch._dynamo

    found = getattr(getattr(torch._dynamo, "exc", None), "FailOnRecompileLimitHit", None)
    return (found,) if found is not None else ()


# The oldest PyTorch this runs on (tested from 2.5.1; torch.library.custom_op, which the CPU layers register for
# torch.compile, came in 2.4): a one-line error below it instead of an AttributeError somewhere in a model.
MIN_TORCH = (2, 5)


def check_torch_version(version: str | None = None) -> None:
    """A UserInputError where the installed PyTorch (or ``version``) is older than ``MIN_TORCH``."""
    version = version or torch.__version__
    found = re.match(r"(\d+)\.(\d+)", version)
    if found is not None and tuple(map(int, found.groups())) < MIN_TORCH:
        raise UserInputError(f"this needs PyTorch {'.'.join(map(str, MIN_TORCH))} or newer, and {version} is "
                             "installed: update it (in ComfyUI, as its update instructions say; else the build for "
                             "your GPU from pytorch.org)")


def pick_device(name: str) -> torch.device:
    """``auto`` (CUDA, then MPS, then CPU) or an explicit device that must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            check_gpu_supported(torch.device("cuda"), name)
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserInputError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserInputError(f"--device {name}: this machine has no usable CUDA GPU (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserInputError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
        check_gpu_supported(device, name)
    elif device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserInputError(f"--device {name}: MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserInputError(f"unsupported device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    return device


def _runs_on(arch: str, major: int, minor: int) -> bool:
    """Whether code built for ``arch``, an entry of ``torch.cuda.get_arch_list()``, runs on a GPU of that compute
    capability: machine code ("sm_86") on the same major version with an equal or newer minor one, or only on its
    own version where it uses that version's own features ("sm_90a"); PTX ("compute_120") on that version and any
    newer, compiled by the driver. An entry not so named counts as running (it cannot be told)."""
    found = re.fullmatch(r"(sm|compute)_(\d+)(\d)([a-z]?)", arch)
    if found is None:
        return True
    kind, built_major, built_minor, suffix = found.groups()
    built = (int(built_major), int(built_minor))
    if kind == "compute":
        return built <= (major, minor)
    return built == (major, minor) if suffix == "a" else built[0] == major and built[1] <= minor


def check_gpu_supported(device: torch.device, name: str) -> None:
    """A CUDA GPU that this PyTorch build has no kernels for (too old for the wheel: recent CUDA builds leave out
    Maxwell, Pascal and Volta) fails at its first computation with "no kernel image is available", after the models
    have loaded: said here instead, in one line. A build runs on a GPU where it holds machine code for the same
    major version and an older or equal minor one, or PTX of an older or equal version, which the driver
    compiles."""
    if torch.version.hip:  # (ROCm's list names gfx targets; its wheels say what they run on)
        return
    try:
        built = list(torch.cuda.get_arch_list())
        major, minor = torch.cuda.get_device_capability(device)
    except Exception:  # noqa: BLE001 - a build that cannot say: its first kernel will tell
        return
    if not built or any(_runs_on(arch, major, minor) for arch in built):
        return
    gpu = torch.cuda.get_device_name(device)
    given = "" if name == "auto" else f"--device {name}: "  # (auto: the default, which the user may not have typed)
    raise UserInputError(f"{given}this PyTorch ({torch.__version__}) has no kernels for the GPU {gpu} (compute "
                         f"capability {major}.{minor}; it was built for {', '.join(built)}): install a PyTorch build "
                         "for this GPU (pytorch.org lists which CUDA version supports it), or use --device cpu")


FP16_ON_CPU = ("fp16 on the CPU computes hundreds of times slower than bf16 or fp32 (few CPUs have fp16 "
               "arithmetic; a convolution took 10 s in fp16 against 6 ms in bf16 on a 2-core EPYC)")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on CUDA GPUs that compute in it (``has_native_bf16``), else fp16 on CUDA, fp32 elsewhere.
    fp16 on a CPU is taken (a parity check may want it; a user most likely not: the command line warns)."""
    if name != "auto":
        return PRECISIONS[name]
    if device.type == "cuda":
        return torch.bfloat16 if has_native_bf16(device) else torch.float16
    return torch.float32


# AMD GPUs before RDNA 3 and CDNA (RDNA 2 and 1, Vega, Polaris: as ComfyUI lists them) have no bf16 arithmetic
NO_BF16_AMD = ("gfx1030", "gfx1031", "gfx1010", "gfx1011", "gfx1012", "gfx906", "gfx900", "gfx803")


def has_native_bf16(device) -> bool:
    """Whether the CUDA GPU ``device`` computes in bf16 natively (Ampere and later; AMD's ROCm GPUs from RDNA 3 and
    CDNA on). Not ``torch.cuda.is_bf16_supported()``: it says yes wherever bf16 can be emulated (slowly), and asks
    the current GPU, which may be another one."""
    if torch.version.hip:
        arch = getattr(torch.cuda.get_device_properties(device), "gcnArchName", "")
        return not any(name in arch for name in NO_BF16_AMD)
    return torch.cuda.get_device_capability(device)[0] >= 8


# A device running out of memory (torch.OutOfMemoryError since PyTorch 2.5; before it only CUDA's existed).
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


# What PyTorch's allocators say in the plain RuntimeError they raise: the CPU's on Linux and macOS, the CPU's on
# Windows, and Apple's MPS (PyTorch 2.14 still raises these); and what fails when memory runs out outside PyTorch's
# CUDA allocator: the driver (an AcceleratorError), a Triton kernel's launch, cuBLAS, cuDNN or cuFFT.
_OUT_OF_MEMORY_TEXTS = ("can't allocate memory", "DefaultCPUAllocator: not enough memory", "MPS backend out of memory",
                        "CUDA error: out of memory", "[CUDA]: out of memory", "_ALLOC_FAILED",
                        "HIP error: out of memory", "hipErrorOutOfMemory", "miopenStatusAllocFailed")  # (ROCm)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says that memory ran out: a device's ``OUT_OF_MEMORY``, Python's ``MemoryError``, or
    an allocator's plain RuntimeError (known by its message); also wrapped in another error, as the compiler wraps
    what fails while it generates code (``inner_exception``, or the error's cause)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (OUT_OF_MEMORY, MemoryError)) or (
                isinstance(error, RuntimeError) and any(text in str(error) for text in _OUT_OF_MEMORY_TEXTS)):
            return True
        error = getattr(error, "inner_exception", None) or error.__cause__  # (not __context__: an error of its own)
    return False


def concrete_device(device) -> torch.device:
    """``device`` with its index, as tensors report theirs ("cuda" -> "cuda:0", the current one)."""
    device = torch.device(device)
    if device.index is None and device.type in ("cuda", "xpu", "mps"):
        return torch.empty(0, device=device).device
    return device


def check_finite(output, model: str, dtype) -> None:
    """A ``PrecisionError`` that says what to change when ``output`` holds inf or NaN, which would otherwise
    become black or white frames without a word."""
    if torch.isfinite(output).all():
        return
    if dtype == torch.float16:
        advice = "load the model in bf16 or fp32 (fp16's range is too small for it here)"
    else:
        advice = "the weights may be damaged: download them again"
    raise PrecisionError(f"{model} computed inf or NaN in {str(dtype).replace('torch.', '')}: {advice}")


def checksum(tensors) -> float:
    """The sum of all values of ``tensors`` in float64, taken on the CPU (MPS has no float64, and a copy that casts
    on the way out of it would cast there)."""
    return sum(float(t.detach().cpu().double().sum()) for t in tensors)


def weights_checksum(network: torch.nn.Module) -> float:
    """``checksum`` of a few weights of each part of ``network`` (its direct children: a pipeline's UNet,
    ControlNet and autoencoder each) and of its prompt embedding, where it keeps one: what tells a model from
    another of the same architecture, also one that differs in one part alone, cheaply enough for every load."""
    prompt = [network.prompt_embeds] if isinstance(getattr(network, "prompt_embeds", None), torch.Tensor) else []
    # (the first and the last weights of each: an autoencoder whose decoder alone was trained anew differs there)
    ends = [params[:2] + params[-2:] for params in (list(part.parameters()) for part in
                                                    (list(network.children()) or [network]))]
    return checksum(prompt + [p for params in ends for p in params])


def device_memory(device) -> int:
    """Bytes of memory ``device`` has in all: its VRAM on CUDA; elsewhere the system's MemTotal (/proc/meminfo,
    else sysconf), capped by a cgroup's memory limit when there is one."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    total = _system_memory("MemTotal", "SC_PHYS_PAGES")
    limit, _ = _cgroup_memory()
    return int(min(total, limit)) if limit is not None else int(total)


MEMINFO = "/proc/meminfo"
# A container's memory limit and use (cgroup v2; v1 where the host has the older layout)
CGROUP_V2, CGROUP_V1 = "/sys/fs/cgroup", "/sys/fs/cgroup/memory"


def _system_memory(field: str, pages: str) -> int:
    """``field`` (MemTotal or MemAvailable) of /proc/meminfo in bytes; else (Windows, macOS) what psutil says,
    which ComfyUI installs; else sysconf's count of ``pages``; else 8 GiB."""
    try:
        with open(MEMINFO) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        import psutil

        memory = psutil.virtual_memory()
        return int(memory.total if field == "MemTotal" else memory.available)
    except Exception:  # noqa: BLE001 - not installed, or a system it does not know
        pass
    try:
        return os.sysconf(pages) * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _read_number(path: str, key: str | None = None) -> int | None:
    """The number in the file ``path`` (of the line that starts with ``key``, as in memory.stat); None where
    there is none (no such file, or "max")."""
    try:
        with open(path) as f:
            if key is None:
                return int(f.read().strip())
            for line in f:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        pass
    return None


def _cgroup_memory() -> tuple[int | None, int]:
    """(limit, usage) of this process's cgroup (v2, else v1), limit None outside one or without a limit
    (containers show the host in /proc/meminfo); usage 0 where it cannot be read. The usage leaves out the page
    cache that the kernel gives back before the cgroup runs out (inactive files: the weights just read, say)."""
    for folder, limit_file, usage_file, inactive in (
            (CGROUP_V2, "memory.max", "memory.current", "inactive_file"),
            (CGROUP_V1, "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")):
        limit = _read_number(os.path.join(folder, limit_file))
        if limit is None:
            continue
        if limit >= 1 << 60:  # (v1's "no limit": 2^63 - 1 rounded to pages)
            return None, 0
        usage = _read_number(os.path.join(folder, usage_file)) or 0
        reclaimable = _read_number(os.path.join(folder, "memory.stat"), inactive) or 0
        return limit, max(usage - reclaimable, 0)
    return None, 0


def available_memory(device) -> int:
    """Bytes that can be allocated now on ``device``: on CUDA the free VRAM plus what PyTorch's allocator holds
    unused (the driver counts that as taken; ComfyUI counts it as free too); on other devices the system's
    MemAvailable (/proc/meminfo, else sysconf), capped by what a cgroup's memory limit leaves when there is one."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    free = _system_memory("MemAvailable", "SC_AVPHYS_PAGES")
    limit, usage = _cgroup_memory()
    if limit is not None:
        free = min(free, limit - usage)
    return max(int(free), 0)


class Progress:
    """A one-line progress report on stderr (frames done, frames/s, time left); silent unless stderr is a
    terminal or STREAMVSR_PROGRESS=1. A log message ends the line first (``end_line``, called by the command
    line's log handler). Losing stderr (closed, or its reader gone: ``2>&1 | head``) turns the report off, never
    the work: a job of hours must not fail, its output unwritten, for want of a progress line. The line is
    rewritten at most every ``interval`` seconds (stderr sent to a file grew by a line a frame, 12 MB over a long
    video), and ``close`` writes the last count if it was held back."""

    _open: "Progress | None" = None  # the report whose line on stderr is unfinished
    interval = 0.5

    def __init__(self, total: int | None, label: str):
        self.total, self.label = total, label
        self.first: tuple[float, int] | None = None  # (when, frames done) at the first update
        self.width = 0  # of the line written last: a shorter one pads over what it would leave behind
        self.written = -math.inf  # when the line was written last
        self.held: str | None = None  # the latest line, not written for being too soon after the last one
        try:
            self.enabled = sys.stderr is not None and (
                sys.stderr.isatty() or os.environ.get("STREAMVSR_PROGRESS") == "1")
        except ValueError:  # (a closed stream)
            self.enabled = False

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        # The speed is that since the first update: the frames a resumed job had done took no time in this run,
        # and the first frame's time holds the warm-up
        self.first = self.first or (now, done)
        rate = (done - self.first[1]) / max(now - self.first[0], 1e-9) if done > self.first[1] else None
        text = f"{self.label}: {done}/{self.total} frames" if self.total else f"{self.label}: {done} frames"
        if rate:
            text += f", {rate:.2f} fps"
            if self.total:
                text += f", {(self.total - done) / rate:.0f} s left"
        if now - self.written < self.interval:
            self.held = text
            return
        self.written = now
        self._show(text)

    def _show(self, text: str) -> None:
        self.held = None
        padded = text.ljust(self.width)
        if self._write("\r" + padded):
            Progress._open = self
            self.width = len(text)

    def _write(self, text: str) -> bool:
        try:
            sys.stderr.write(text)
            sys.stderr.flush()
            return True
        except (OSError, ValueError) as e:
            self.enabled = False
            if Progress._open is self:
                Progress._open = None
            if isinstance(e, BrokenPipeError):
                # The reader is gone: what stderr still holds, and every later message, goes nowhere instead of
                # failing again (Python's own exit would fail on it, with status 120).
                with contextlib.suppress(OSError, ValueError):
                    devnull = os.open(os.devnull, os.O_WRONLY)
                    os.dup2(devnull, sys.stderr.fileno())
                    os.close(devnull)
            return False

    @classmethod
    def end_line(cls) -> None:
        """Finish an unfinished progress line, for another message to start on a line of its own."""
        report, cls._open = cls._open, None
        if report is not None:
            report._write("\n")

    def close(self) -> None:
        if self.enabled and self.held is not None:
            self._show(self.held)
        if Progress._open is self:
            Progress.end_line()
