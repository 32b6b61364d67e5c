"""The one set of model and engine options, shared by ``frames`` and ``upscale``, and turning them into an engine."""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("streamvsr")

# Options that only one family understands: option dest -> family name. They default to None so that an option
# given for the wrong model can be reported instead of silently ignored.
FAMILY_OPTIONS = {
    "flow": "stream-diffvsr", "steps": "stream-diffvsr", "corr": "stream-diffvsr", "flow_downscale": "stream-diffvsr",
    "flow_iterations": "stream-diffvsr",
    "compile": "stream-diffvsr", "plain_layers": "stream-diffvsr",
    "version": "flashvsr", "scale": "flashvsr", "sparse_ratio": "flashvsr", "local_range": "flashvsr",
    "kv_ratio": "flashvsr", "color_fix": "flashvsr", "attention": "flashvsr",
}


def default_models_dir() -> Path:
    """$STREAMVSR_MODELS, or ~/.cache/streamvsr where it is unset or empty (``STREAMVSR_MODELS=`` would otherwise
    be the current folder, and every other folder a run starts in would download the models again); absolute, so
    that it names the same folder wherever it is printed or used."""
    return Path(os.environ.get("STREAMVSR_MODELS") or Path.home() / ".cache" / "streamvsr").expanduser().absolute()


def user_path(text: str) -> Path:
    """An argparse type: a path with ``~`` expanded (the shell leaves it in ``--dest=~/x`` and in quotes). An
    empty one is refused: Path("") is the current folder, which the user did not name (an unset variable in
    ``--dest "$DIR"``)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path; give a file or folder (\".\" for the current folder)")
    return Path(text).expanduser()


# scheme:// with a scheme of two letters or more, so that a Windows drive (C:/...) is still a path
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+://")


def video_path(direction: str):
    """An argparse type for the video file read (``direction`` "in") or written ("out"): a local path, as
    ``user_path``. A URL is refused whole: the resume, lock, partial-file and same-file checks all work on files, and
    a path would turn ``http://`` into ``http:/``."""

    def parse(text: str) -> Path:
        if _URL.match(text):
            what = "a local video file to read: download it first, e.g. `ffmpeg -i URL -c copy in.mkv`" \
                if direction == "in" else "a local file to write: upload the finished file afterwards"
            raise argparse.ArgumentTypeError(f"{text} is a URL; give {what}")
        return user_path(text)

    return parse


def int_range(low: int, high: int | None = None, what: str = ""):
    """An argparse type: a whole number in [low, high] (no upper bound if None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            span = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{value} is out of range: must be {span}{what}")
        return value

    return parse


def float_range(low: float, high: float | None = None, low_open: bool = False, what: str = ""):
    """An argparse type: a finite number >= low (> low if ``low_open``) and <= high."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < low or (low_open and value == low) or \
                (high is not None and value > high):
            bound = f"{'above' if low_open else 'at least'} {low:g}" + (f" and at most {high:g}" if high is not None
                                                                         else "")
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {bound}{what}")
        return value

    return parse


def seed_value(text: str) -> int:
    try:
        value = int(text, 0) if text.strip().lower().startswith(("0x", "0o", "0b")) else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"{value} is outside 0 … 2^64-1")
    return value


def add_flow_options(p: argparse.ArgumentParser, default=("auto", 1, 12)) -> None:
    p.add_argument("--corr", choices=("auto", "all_pairs", "on_demand"), default=default[0],
                   help="RAFT correlation: all-pairs volume (fast, O((HW)^2) memory), on-demand lookup "
                        "(bounded memory) or chosen from the frame size and the memory (default)")
    p.add_argument("--flow-downscale", type=int, choices=(1, 2, 4), default=default[1],
                   help="compute flow at 1/N resolution and upsample it (faster, less memory, "
                        "deviates from the official full-resolution flow); default 1")
    p.add_argument("--flow-iterations", type=int_range(1, 32), default=default[2],
                   help="RAFT's update iterations, 1-32 (default 12, the official; fewer is faster, coarser)")


def add_model_options(p: argparse.ArgumentParser, dtype_default: str, model_required: bool) -> None:
    if model_required:
        p.add_argument("--model", required=True,
                       help="model weights: an official folder (Stream-DiffVSR hub folder, FlashVSR folder) or a "
                            "single file from `streamvsr convert`; the model is recognised from its files")
    else:
        src = p.add_mutually_exclusive_group()
        src.add_argument("--model", help="model weights (see `streamvsr frames --help`)")
        src.add_argument("--download", action="store_true",
                         help="use the official Stream-DiffVSR weights (and RAFT-large) from $STREAMVSR_MODELS "
                              "(default ~/.cache/streamvsr), downloading them first if they are not there")
    p.add_argument("--seed", type=seed_value, default=42, help="noise seed (default 42, as the official scripts)")
    why = ": the reference output; auto is faster on a GPU" if dtype_default == "fp32" else ""
    p.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), default=dtype_default,
                   help=f"compute precision (default {dtype_default}{why}); auto: bf16 (or fp16) on CUDA, fp32 "
                        "elsewhere")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (the default: CUDA, then MPS, "
                   "then the CPU)")

    g = p.add_argument_group("Stream-DiffVSR")
    # Only a command that has --download can fetch RAFT-large itself.
    g.add_argument("--flow", help="RAFT weights in torchvision's format, e.g. RAFT-large from `streamvsr download` "
                                  + ("(needed)" if model_required else "(needed, except with --download, which "
                                                                       "brings RAFT-large)"))
    g.add_argument("--steps", type=int_range(1, 50), help="denoising steps, 1-50 (default 4: the model is distilled "
                                                          "for 4)")
    add_flow_options(g, default=(None, None, None))
    g.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the networks (minutes to compile per frame size, once per run; output "
                        "equal to float rounding; runs eagerly with a warning where compiling is unavailable). "
                        "Meant for GPUs; on the CPU as fast as the default CPU layers at small sizes, up to 5%% "
                        "faster at a 1280x736 output")
    g.add_argument("--plain-layers", action="store_true", default=None,
                   help="on the CPU in fp32, run PyTorch's plain layers instead of the faster CPU layers "
                        "(reordered weights, Winograd convolutions): about half the peak memory, 1.7-2.3x "
                        "slower; the output differs only by float rounding")

    g = p.add_argument_group("FlashVSR")
    g.add_argument("--flashvsr-version", dest="version", choices=("v1.1", "v1"),
                   help="which release the weights are (default: what a converted file records, else what the "
                        "files say: a repackaged DiT's name, the published v1.1 LQ file's hash, a folder named for "
                        "v1.1 or v1 (FlashVSR counts as v1); else v1.1, but official files that nothing names "
                        "with an LQ file other than the published v1.1 one ask for this option): v1 and v1.1 files "
                        "have the same keys but their LQ projections run differently")
    g.add_argument("--scale", type=int_range(1, 8), help="output/input size ratio, 1-8 (default 4, the trained one; "
                   "2 or 3 are faster but softer)")
    g.add_argument("--sparse-ratio", type=float_range(0, 1000, low_open=True),  # (beyond: dense everywhere)
                   help="attention budget (default 2.0; 1.5 is faster, larger attends more)")
    g.add_argument("--local-range", type=int_range(1), help="side of the local attention window, in 8x8-token "
                   "blocks (default 11: more stable; 9: sharper)")
    g.add_argument("--kv-ratio", type=float_range(1), help="latent slices of attention memory kept, at least 1, "
                   "in whole slices as the official int() (2.5 keeps 2; 1 and 2 both keep two; default 3.0)")
    g.add_argument("--color-fix", choices=("adain", "wavelet", "none"), help="colour correction (default adain)")
    g.add_argument("--attention", choices=("auto", "gather", "flex"),
                   help="how the sparse attention is computed, the same result: gather (PyTorch attention on the "
                        "selected blocks, any device) or flex (FlexAttention compiled for CUDA with Triton; the "
                        "first chunk waits for the compiling); default auto: flex where it can run, else gather")


def family_options(args, family) -> dict:
    """The family-specific options given on the command line; a one-line error for one the model does not take."""
    from ..models.registry import family_by_name
    from ..models.shared.errors import UserInputError

    options = {}
    for dest, owner in FAMILY_OPTIONS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if owner != family.name:
            flag = "--flashvsr-version" if dest == "version" else "--" + dest.replace("_", "-")
            raise UserInputError(f"{flag} is a {family_by_name(owner).title} option, but {args.model or 'the model'} "
                                 f"is a {family.title} model")
        options[dest] = value
    return options


@dataclass
class EnginePlan:
    """What ``--model``/``--download`` and the options name, checked without loading any weights: the family, its
    options, the device (which must exist) and the precision. ``load()`` then downloads (``--download``) and
    loads."""

    family: object
    options: dict
    device: object
    dtype: object
    model: str | None          # None with --download: known after the download
    download: bool = False

    def check_size(self, h: int, w: int) -> None:
        """A one-line error when the options cannot run LR frames of h x w (before anything loads)."""
        if self.family.check_size is not None:
            self.family.check_size(h, w, **self.options)

    @property
    def scale(self) -> int:
        """The output/input size ratio these options give."""
        return int(self.options.get("scale") or self.family.scale)

    def load(self):
        from ..models.shared.runtime import FP16_ON_CPU, PRECISIONS, has_native_bf16

        # Taken as asked (a parity check may want it), with a warning said here: after every check of the job, so
        # that a mistake is one line alone
        if self.dtype == PRECISIONS["fp16"] and self.device.type == "cpu":
            log.warning("%s; --dtype bf16 takes the same memory", FP16_ON_CPU)
        if self.dtype == PRECISIONS["bf16"] and self.device.type == "cuda" and not has_native_bf16(self.device):
            log.warning("this GPU has no bf16 arithmetic (it is emulated, several times slower): --dtype fp16, or "
                        "auto, which picks it here, takes the same memory")
        options = dict(self.options)
        model = self.model
        if self.device.type == "cuda":
            import torch

            # The command owns its process and a video's frames share one size, so cuDNN may time its algorithms
            # once per convolution shape and keep the fastest (inside ComfyUI that is the user's `--fast autotune`).
            torch.backends.cudnn.benchmark = True
        if self.download:
            from ..models.raft.weights import download_raft
            from ..models.stream_diffvsr.hub import download_stream_diffvsr

            root = default_models_dir()
            model = str(download_stream_diffvsr(root / "Stream-DiffVSR"))
            options["flow"] = options.get("flow") or str(download_raft("raft_large", root / "raft"))
        return self.family.load_engine(model, device=self.device, dtype=self.dtype, **options)


def check_flow_file(flow, takes_model: bool = True) -> None:
    """A one-line error where ``flow`` (the --flow option) is not a file, or is an upscaling model (which goes to
    --model where the command ``takes_model``)."""
    from ..models.registry import families
    from ..models.shared.errors import UserInputError

    path = Path(flow).expanduser()
    model = next((family for family in families() if family.detect(path)), None)
    if model is not None:
        where = "give it as --model; " if takes_model else ""
        raise UserInputError(f"the flow weights {flow} are the {model.title} model: {where}--flow takes "
                             "torchvision's RAFT file (e.g. from `streamvsr download`)")
    if not path.is_file():
        raise UserInputError(f"the flow weights {flow} {'are a folder' if path.is_dir() else 'do not exist'}; "
                             "give torchvision's RAFT file (e.g. from `streamvsr download`)")


def plan_engine(args) -> EnginePlan:
    """Every model-side mistake that can be found without loading weights, each a one-line error: a device that
    does not exist, no model, a model that is not recognised, an option the model does not take, a missing flow
    file. Nothing is downloaded or loaded."""
    from ..models.registry import detect_family, family_by_name
    from ..models.shared.errors import UserInputError
    from ..models.shared.runtime import check_torch_version, pick_device, pick_dtype

    check_torch_version()
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    flow = getattr(args, "flow", None)
    if flow is not None:
        check_flow_file(flow)
    download = bool(getattr(args, "download", False))
    if download:
        family = family_by_name("stream-diffvsr")  # what --download fetches
    elif not args.model:
        fetch = ", or --download to fetch the official Stream-DiffVSR weights" if hasattr(args, "download") else ""
        raise UserInputError(f"give --model PATH{fetch}")
    else:
        family = detect_family(args.model)
    # Another family's option first: it says the user meant another model, which needs no flow.
    options = family_options(args, family)
    if family.name == "stream-diffvsr" and not download and flow is None:  # before any folder is made
        raise UserInputError("Stream-DiffVSR needs optical flow: give --flow PATH (torchvision RAFT weights, "
                             "e.g. from `streamvsr download`)")
    if getattr(family, "dtypes", None) and dtype not in family.dtypes:
        raise UserInputError(f"{family.title} does not run in {args.dtype}")
    return EnginePlan(family, options, device, dtype, None if download else args.model, download)


def _given(args, name: str, value) -> bool:
    """Whether ``args`` already has option ``name`` at ``value`` or at a setting that takes less memory."""
    given = getattr(args, name, None)
    if given is None or value is None:
        return bool(given)
    if name == "flow_downscale":  # (a larger factor: a smaller flow)
        return given >= value
    if name in ("kv_ratio", "sparse_ratio"):  # (smaller: fewer keys kept or attended to)
        return given <= value
    return given == value


def memory_options(args, cpu: bool = False) -> list[str]:
    """The options that lower the memory of what ``args`` run, the most useful first, as typed (for the
    out-of-memory advice; none for a command without a model, or a model that cannot be recognised), leaving out
    those given already, or given at a setting that takes less memory. ``cpu``: it ran on the CPU, where
    Stream-DiffVSR's CPU layers (fp32) take about twice the memory of plain ones."""
    from ..models.raft import MEMORY_OPTIONS as RAFT_MEMORY_OPTIONS
    from ..models.registry import detect_family, family_by_name

    if args.command == "flow":
        options = RAFT_MEMORY_OPTIONS
    elif args.command in ("frames", "upscale"):
        try:
            family = (family_by_name("stream-diffvsr") if getattr(args, "download", False)
                      else detect_family(args.model))
        except Exception:  # noqa: BLE001 - advice after an error: never a second error instead of it
            return []
        options = family.memory_options
        if cpu and family.name == "stream-diffvsr" and getattr(args, "dtype", "fp32") in ("auto", "fp32") \
                and not getattr(args, "plain_layers", None):
            options = (("plain_layers", None), *options)
    else:
        return []
    return [f"--{name.replace('_', '-')}" + ("" if value is None else f" {value}") for name, value in options
            if not _given(args, name, value)]


def engine_from_args(args):
    """Device, precision and the engine of the model the arguments name (``--model`` or ``--download``)."""
    return plan_engine(args).load()
