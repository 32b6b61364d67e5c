"""The one set of model and engine options, shared by ``frames`` and ``upscale``, and turning them into an engine."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

# Options that only one family understands: option dest -> family name. They default to None so that an option
# given for the wrong model can be reported instead of silently ignored.
FAMILY_OPTIONS = {
    "flow": "stream-diffvsr", "steps": "stream-diffvsr", "corr": "stream-diffvsr", "flow_downscale": "stream-diffvsr",
    "version": "flashvsr", "scale": "flashvsr", "sparse_ratio": "flashvsr", "local_range": "flashvsr",
    "kv_ratio": "flashvsr", "color_fix": "flashvsr",
}


def default_models_dir() -> Path:
    return Path(os.environ.get("STREAMVSR_MODELS", Path.home() / ".cache" / "streamvsr"))


def seed_value(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"{value} is outside 0 … 2^64-1")
    return value


def add_flow_options(p: argparse.ArgumentParser, default=("auto", 1)) -> None:
    p.add_argument("--corr", choices=("auto", "all_pairs", "on_demand"), default=default[0],
                   help="RAFT correlation: all-pairs volume (fast, O((HW)^2) memory), on-demand lookup "
                        "(bounded memory) or chosen from the frame size and free memory (default)")
    p.add_argument("--flow-downscale", type=int, choices=(1, 2, 4), default=default[1],
                   help="compute flow at 1/N resolution and upsample it (faster, less memory, "
                        "deviates from the official full-resolution flow); default 1")


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
    p.add_argument("--seed", type=seed_value, default=42, help="noise seed (the official scripts use 42)")
    p.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), default=dtype_default,
                   help="compute precision; auto: bf16 (or fp16) on CUDA, fp32 elsewhere")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto")

    g = p.add_argument_group("Stream-DiffVSR")
    g.add_argument("--flow", help="RAFT weights in torchvision's format (default with --download: RAFT-large)")
    g.add_argument("--steps", type=int, help="denoising steps (default 4: the model is distilled for 4)")
    add_flow_options(g, default=(None, None))

    g = p.add_argument_group("FlashVSR")
    g.add_argument("--flashvsr-version", dest="version", choices=("v1.1", "v1"),
                   help="which release the weights are (default v1.1): v1 and v1.1 files have the same keys but "
                        "their LQ projections run differently")
    g.add_argument("--scale", type=int, choices=(2, 3, 4), help="output/input size ratio (default 4, the trained one)")
    g.add_argument("--sparse-ratio", type=float,
                   help="attention budget (default 2.0; 1.5 is faster, larger attends more)")
    g.add_argument("--local-range", type=int, help="side of the local attention window, in 8x8-token blocks "
                   "(default 11: more stable; 9: sharper)")
    g.add_argument("--kv-ratio", type=float, help="latent slices of attention memory kept (default 3.0)")
    g.add_argument("--color-fix", choices=("adain", "wavelet", "none"), help="colour correction (default adain)")


def family_options(args, family) -> dict:
    """The family-specific options given on the command line; a one-line error for one the model does not take."""
    from ..models.shared.errors import UserInputError

    options = {}
    for dest, owner in FAMILY_OPTIONS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if owner != family.name:
            flag = "--flashvsr-version" if dest == "version" else "--" + dest.replace("_", "-")
            raise UserInputError(f"{flag} is a {owner} option, but {args.model} is a {family.title} model")
        options[dest] = value
    return options


def engine_from_args(args):
    """Device, precision and the engine of the model the arguments name (``--model`` or ``--download``)."""
    from ..models.registry import detect_family
    from ..models.shared.runtime import pick_device, pick_dtype

    if getattr(args, "download", False):
        from ..models.raft.weights import download_raft
        from ..models.stream_diffvsr.hub import download_stream_diffvsr

        root = default_models_dir()
        args.model = str(download_stream_diffvsr(root / "Stream-DiffVSR"))
        args.flow = args.flow or str(download_raft("raft_large", root / "raft"))
    if not args.model:
        from ..models.shared.errors import UserInputError

        raise UserInputError("give --model PATH, or --download to fetch the official Stream-DiffVSR weights")
    family = detect_family(args.model)
    options = family_options(args, family)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    return family.load_engine(args.model, device=device, dtype=dtype, **options)
