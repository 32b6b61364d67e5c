"""Tiny, randomly initialised FlashVSR checkpoints in the official file formats and names, for CPU tests.

``write_official_folder`` writes what the official release folder holds: the DiT as
``diffusion_pytorch_model_streaming_dmd.safetensors`` (original Wan2.1 keys), ``LQ_proj_in.ckpt`` (a torch.save'd
plain state dict, bf16 like the release unless told otherwise), ``TCDecoder.ckpt`` (``decoder.N`` keys plus unused
entries, fp32) and ``posi_prompt.pth`` (a pickled (1, L, text_dim) tensor). The sizes are shrunk (DiT width 256 =
2 heads of 128, 2 blocks, FFN 512, text width 64, 16 prompt tokens; LQ projection 768 -> 32 -> 48 -> 256; TC
decoder channels 32/16/8/8) but the fixed parts keep their real values: 768 = 3*16*16 LQ input channels, 16 latent
channels, 784 = 768 + 16 decoder input channels, (1,2,2) patches, 256-wide timestep sinusoid.
``write_repackaged`` writes the same tensors under the names the ComfyUI ports use.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

TINY = dict(dim=256, num_layers=2, ffn_dim=512, text_dim=64, prompt_len=16, freq_dim=256, latent_channels=16,
            lq_hidden=(32, 48), tc_channels=(32, 16, 8, 8))


@contextlib.contextmanager
def one_thread():
    """Run torch single-threaded: tiny tensors gain nothing from threads, and on a shared machine the idle
    threads' spinning can slow small convolutions down a hundredfold."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def dit_shapes(dim=256, num_layers=2, ffn_dim=512, text_dim=64, freq_dim=256, latent_channels=16) -> dict:
    """Key -> shape of a Wan2.1 T2V DiT state dict as FlashVSR's release stores it (825 keys at 30 blocks)."""
    shapes = {
        "patch_embedding.weight": (dim, latent_channels, 1, 2, 2), "patch_embedding.bias": (dim,),
        "text_embedding.0.weight": (dim, text_dim), "text_embedding.0.bias": (dim,),
        "text_embedding.2.weight": (dim, dim), "text_embedding.2.bias": (dim,),
        "time_embedding.0.weight": (dim, freq_dim), "time_embedding.0.bias": (dim,),
        "time_embedding.2.weight": (dim, dim), "time_embedding.2.bias": (dim,),
        "time_projection.1.weight": (6 * dim, dim), "time_projection.1.bias": (6 * dim,),
        "head.head.weight": (latent_channels * 4, dim), "head.head.bias": (latent_channels * 4,),
        "head.modulation": (1, 2, dim),
    }
    for b in range(num_layers):
        p = f"blocks.{b}."
        shapes[p + "modulation"] = (1, 6, dim)
        for attn in ("self_attn", "cross_attn"):
            for lin in "qkvo":
                shapes[f"{p}{attn}.{lin}.weight"] = (dim, dim)
                shapes[f"{p}{attn}.{lin}.bias"] = (dim,)
            shapes[f"{p}{attn}.norm_q.weight"] = (dim,)
            shapes[f"{p}{attn}.norm_k.weight"] = (dim,)
        shapes[p + "norm3.weight"] = (dim,)
        shapes[p + "norm3.bias"] = (dim,)
        shapes[p + "ffn.0.weight"] = (ffn_dim, dim)
        shapes[p + "ffn.0.bias"] = (ffn_dim,)
        shapes[p + "ffn.2.weight"] = (dim, ffn_dim)
        shapes[p + "ffn.2.bias"] = (dim,)
    return shapes


def lq_shapes(hidden=(32, 48), out_dim=256, num_layers=1) -> dict:
    h1, h2 = hidden
    shapes = {"conv1.weight": (h1, 768, 4, 3, 3), "conv1.bias": (h1,), "norm1.gamma": (h1, 1, 1, 1),
              "conv2.weight": (h2, h1, 4, 3, 3), "conv2.bias": (h2,), "norm2.gamma": (h2, 1, 1, 1)}
    for i in range(num_layers):
        shapes[f"linear_layers.{i}.weight"] = (out_dim, h2)
        shapes[f"linear_layers.{i}.bias"] = (out_dim,)
    return shapes


def tc_shapes(channels=(32, 16, 8, 8), latent_channels=16) -> dict:
    c0, c1, c2, c3 = channels
    shapes = {"decoder.1.weight": (c0, 768 + latent_channels, 3, 3), "decoder.1.bias": (c0,),
              "decoder.3.weight": (c0, c0, 3, 3)}
    for first, c in ((5, c0), (11, c1), (17, c2)):
        for i in range(first, first + 3):
            shapes[f"decoder.{i}.conv.0.weight"] = (c, 2 * c, 3, 3)
            shapes[f"decoder.{i}.conv.0.bias"] = (c,)
            for j in (2, 4):
                shapes[f"decoder.{i}.conv.{j}.weight"] = (c, c, 3, 3)
                shapes[f"decoder.{i}.conv.{j}.bias"] = (c,)
    shapes.update({"decoder.9.conv.weight": (c0, c0, 1, 1), "decoder.10.weight": (c1, c0, 3, 3),
                   "decoder.15.conv.weight": (2 * c1, c1, 1, 1), "decoder.16.weight": (c2, c1, 3, 3),
                   "decoder.21.conv.weight": (2 * c2, c2, 1, 1), "decoder.22.weight": (c3, c2, 3, 3),
                   "decoder.24.weight": (c3, c3, 3, 3), "decoder.26.weight": (3, c3, 3, 3), "decoder.26.bias": (3,)})
    return shapes


def _fill(shapes: dict, gen: torch.Generator) -> dict:
    out = {}
    for key, shape in shapes.items():
        if key.endswith(("norm1.gamma", "norm2.gamma")) or key.endswith(("norm_q.weight", "norm_k.weight",
                                                                          "norm3.weight")):
            t = 1 + 0.1 * torch.randn(shape, generator=gen)
        elif key.endswith("modulation"):
            t = torch.randn(shape, generator=gen) / shape[-1] ** 0.5
        elif len(shape) == 1:
            t = 0.02 * torch.randn(shape, generator=gen)
        else:
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            t = torch.randn(shape, generator=gen) / fan_in ** 0.5
        out[key] = t
    return out


def tiny_state_dicts(seed: int = 0, **sizes) -> dict:
    """Random tensors for every component: {"dit", "lq_proj", "tc_decoder", "tc_extras", "prompt"} (fp32)."""
    s = {**TINY, **sizes}
    gen = torch.Generator().manual_seed(seed)
    return {
        "dit": _fill(dit_shapes(s["dim"], s["num_layers"], s["ffn_dim"], s["text_dim"], s["freq_dim"],
                                s["latent_channels"]), gen),
        "lq_proj": _fill(lq_shapes(s["lq_hidden"], s["dim"]), gen),
        "tc_decoder": _fill(tc_shapes(s["tc_channels"], s["latent_channels"]), gen),
        # Stand-ins for the unused entries of the official TCDecoder.ckpt (their real names are not published).
        "tc_extras": {"encoder.0.weight": torch.randn(8, 3, 3, 3, generator=gen),
                      "encoder.0.bias": torch.randn(8, generator=gen)},
        "prompt": torch.randn(1, s["prompt_len"], s["text_dim"], generator=gen),
    }


def write_official_folder(folder, seed: int = 0, lq_dtype=torch.bfloat16, lq_prefix: bool = False,
                          tc_extras: bool = True, **sizes) -> dict:
    """Write the four official files into ``folder``; returns the tensors written (after the dtype casts)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = tiny_state_dicts(seed, **sizes)
    sd["lq_proj"] = {k: v.to(lq_dtype) for k, v in sd["lq_proj"].items()}
    sd["prompt"] = sd["prompt"].to(torch.bfloat16)  # the released prompt is ~4 MB, i.e. (1, 512, 4096) in bf16
    save_file(sd["dit"], str(folder / "diffusion_pytorch_model_streaming_dmd.safetensors"))
    lq = {("LQ_proj_in." if lq_prefix else "") + k: v for k, v in sd["lq_proj"].items()}
    torch.save(lq, folder / "LQ_proj_in.ckpt")
    torch.save({**sd["tc_decoder"], **(sd["tc_extras"] if tc_extras else {})}, folder / "TCDecoder.ckpt")
    torch.save(sd["prompt"], folder / "posi_prompt.pth")
    return sd


def write_repackaged(folder, style: str, seed: int = 0, **sizes) -> dict:
    """The same tiny model under a port's file names: "1038lab" (v1.1 set: FlashVSR1_1.safetensors,
    LQ_proj_in.safetensors, TCDecoder.safetensors, Prompt.safetensors) or "kijai" (v1 DiT, ``LQ_proj_in.``-prefixed
    LQ projection, strict TC decoder, plus the official posi_prompt.pth)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = tiny_state_dicts(seed, **sizes)
    sd["lq_proj"] = {k: v.to(torch.bfloat16) for k, v in sd["lq_proj"].items()}
    if style == "1038lab":
        save_file(sd["dit"], str(folder / "FlashVSR1_1.safetensors"))
        save_file(sd["lq_proj"], str(folder / "LQ_proj_in.safetensors"))
        save_file(sd["tc_decoder"], str(folder / "TCDecoder.safetensors"))
        save_file({"context": sd["prompt"]}, str(folder / "Prompt.safetensors"))
    elif style == "kijai":
        save_file(sd["dit"], str(folder / "Wan2_1-T2V-1_3B_FlashVSR_fp32.safetensors"))
        save_file({"LQ_proj_in." + k: v for k, v in sd["lq_proj"].items()},
                  str(folder / "Wan2_1_FlashVSR_LQ_proj_model_bf16.safetensors"))
        save_file(sd["tc_decoder"], str(folder / "Wan2_1_FlashVSR_TCDecoder_fp32.safetensors"))
        torch.save(sd["prompt"], folder / "posi_prompt.pth")
    else:
        raise ValueError(f"unknown style {style!r}")
    return sd
