"""The arithmetic of one guided Stream-DiffVSR frame: multiply-adds of the official pipeline against ours.

Where a CPU is bound by arithmetic (both sides run their matrix products near its peak), the speed ratio cannot
exceed the ratio of the work done, so this is the ceiling that a side-by-side run (bench_vs_official.py) is read
against. The real-size UNet and ControlNet are built on PyTorch's meta device (no weights, no memory) and run once
at the given LR size; every convolution and linear layer is counted by a hook:

- official: every layer as a direct product, the UNet and the ControlNet once per step;
- ours: as the engine runs them on the CPU in fp32 (shared/packed.py, engine.py): the wide 3x3 convolutions as
  Winograd F(4x4, 3x3) (36 products per 4x4 output tile instead of 144), the UNet's upsampling convolutions folded
  into 2x2 phase kernels (16 instead of 36 per input pixel), the prompt's keys and values computed once (not counted
  per step), the ControlNet's conditioning embedding once per frame.

RAFT and the autoencoder, which run once per frame on both sides, are not counted.

    python bench/count_work.py [--size 64x64] [--steps 4]
"""

from __future__ import annotations

import argparse
import collections
import math

from bench_engine import _import_package


def _conv_factor(module, x) -> float:
    """Ours' multiply-adds over the direct convolution's for this call, by the CPU layer's own rule."""
    h, w = x.shape[-2:]
    if getattr(module, "_folded_upsample", False):
        return 16 / 36
    if module.uses_winograd(x):
        return 36 * math.ceil(h / 4) * math.ceil(w / 4) / (9 * h * w)
    return 1.0


def count(network, inputs: dict) -> dict:
    """{"official": ..., "ours": ..., "once": ...} multiply-adds of one call of ``network`` on meta tensors
    (``once``: ours' part that runs once per frame, the conditioning embedding)."""
    import torch

    totals = collections.Counter()
    hooks = []
    for name, module in network.named_modules():
        if ".upsamplers." in f".{name}." and isinstance(module, torch.nn.Conv2d):
            module._folded_upsample = True

        def hook(m, args, out, name=name):
            x = args[0]
            if isinstance(m, torch.nn.Conv2d):
                # per output pixel: an upsampler's convolution runs on the upsampled map in the official code
                macs = out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
                ours = macs * _conv_factor(m, x)
            else:
                macs = out.numel() * m.in_features
                # the prompt's keys and values (77 tokens of the constant context): once per model
                ours = 0 if name.endswith((".to_k", ".to_v")) and x.shape[-2] == 77 else macs
            totals["official"] += macs
            totals["once" if name.startswith("controlnet_cond_embedding") else "ours"] += ours

        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            hooks.append(module.register_forward_hook(hook))
    with torch.inference_mode():
        network(**inputs)
    for h in hooks:
        h.remove()
    return dict(totals)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="64x64", help="LR size HxW (default 64x64)")
    p.add_argument("--steps", type=int, default=4)
    args = p.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    _import_package()
    import torch

    import realsize
    from streamvsr.models.shared.packed import packed_operations
    from streamvsr.models.stream_diffvsr.controlnet import ControlNet
    from streamvsr.models.stream_diffvsr.unet import UNet

    # the CPU layers, for their rule of which convolutions run as Winograd (on meta tensors they run as plain ones)
    ops = packed_operations()
    with torch.device("meta"):
        unet, controlnet = UNet(realsize.UNET_CONFIG, ops), ControlNet(realsize.CONTROLNET_CONFIG, ops)
        sample = torch.empty(1, realsize.UNET_CONFIG["in_channels"], h, w)
        context = torch.empty(1, 77, realsize.UNET_CONFIG["cross_attention_dim"])
        timestep = torch.tensor(500)
        warped = torch.empty(1, 3, 4 * h, 4 * w)
    parts = {"UNet": count(unet, dict(sample=sample, timestep=timestep, encoder_hidden_states=context)),
             "ControlNet": count(controlnet, dict(sample=sample, timestep=timestep, encoder_hidden_states=context,
                                                  controlnet_cond=warped))}
    print(f"LR {h}x{w}, {args.steps} steps; multiply-adds (G) per call, and per guided frame")
    print("| network | official | ours per step | ours once per frame |")
    print("|---|---|---|---|")
    for name, c in parts.items():
        print(f"| {name} | {c['official'] / 1e9:.1f} | {c.get('ours', 0) / 1e9:.1f} | {c.get('once', 0) / 1e9:.1f} |")
    official = args.steps * sum(c["official"] for c in parts.values())
    ours = args.steps * sum(c.get("ours", 0) for c in parts.values()) + sum(c.get("once", 0) for c in parts.values())
    print(f"| per guided frame (steps x per call, + once) | {official / 1e9:.0f} | {ours / 1e9:.0f} | |")
    print(f"\nceiling of the speed ratio where both sides are bound by arithmetic: {official / ours:.2f}x")


if __name__ == "__main__":
    main()
