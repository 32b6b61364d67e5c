"""The Stable-Diffusion-x4-upscaler-family UNet used as Stream-DiffVSR's denoiser.

Module names follow the diffusers ``UNet2DConditionModel`` state dict (``down_blocks.1.attentions.0.
transformer_blocks.0.attn1.to_q.weight`` ...) so the official weights load unchanged; hyperparameters come from
the component's ``config.json``. Only the features this model family uses are implemented, and a config asking
for anything else is rejected with the offending key named.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_DOWN_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
_UP_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
# Config entries that must keep these values (diffusers defaults) because nothing else is implemented.
_FIXED = {
    "act_fn": "silu", "center_input_sample": False, "class_embed_type": None, "num_class_embeds": None,
    "addition_embed_type": None, "encoder_hid_dim": None, "time_embedding_type": "positional",
    "resnet_time_scale_shift": "default", "dual_cross_attention": False, "upcast_attention": False,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "timestep_post_act": None, "time_cond_proj_dim": None,
    "projection_class_embeddings_input_dim": None, "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None, "cross_attention_norm": None, "attention_type": "default",
    "mid_block_type": "UNetMidBlock2DCrossAttn", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "global_pool_conditions": False,
    "controlnet_conditioning_channel_order": "rgb", "reverse_transformer_layers_per_block": None,
    "time_embedding_act_fn": None, "time_embedding_dim": None, "addition_time_embed_dim": None,
}


def _listify(value, n: int, key: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{key}={list(value)} must have one entry per block ({n})")
        return list(value)
    return [value] * n


def check_config(config: dict) -> None:
    for key, expected in _FIXED.items():
        if key in config and config[key] != expected and not (expected is None and config[key] in (None, "")):
            raise ValueError(f"{key}={config[key]!r} is not supported (this model family uses {expected!r})")
    n = len(config.get("block_out_channels", ()))
    if n == 0:
        raise ValueError("block_out_channels is missing")
    for t in config.get("down_block_types", ()):
        if t not in _DOWN_TYPES:
            raise ValueError(f"down_block_types entry {t!r} is not supported (use {_DOWN_TYPES})")
    for t in config.get("up_block_types", ()):
        if t not in _UP_TYPES:
            raise ValueError(f"up_block_types entry {t!r} is not supported (use {_UP_TYPES})")
    layers = config.get("transformer_layers_per_block", 1)
    if any(v != 1 for v in _listify(layers, n, "transformer_layers_per_block")):
        raise ValueError(f"transformer_layers_per_block={layers!r} is not supported (only 1)")
    if config.get("num_attention_heads") is not None:
        raise ValueError("num_attention_heads is not supported; this family sets attention_head_dim "
                         "(which diffusers reads as the number of heads)")


def timestep_embedding(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> torch.Tensor:
    """Sinusoidal embedding, float32 (as diffusers computes it, then casts to the sample dtype)."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int, operations, device, dtype):
        super().__init__()
        self.linear_1 = operations.Linear(in_dim, dim, device=device, dtype=dtype)
        self.linear_2 = operations.Linear(dim, dim, device=device, dtype=dtype)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, groups: int, eps: float, operations, device, dtype):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.norm1 = operations.GroupNorm(groups, in_ch, eps=eps, **kw)
        self.conv1 = operations.Conv2d(in_ch, out_ch, 3, padding=1, **kw)
        self.time_emb_proj = operations.Linear(temb_ch, out_ch, **kw)
        self.norm2 = operations.GroupNorm(groups, out_ch, eps=eps, **kw)
        self.conv2 = operations.Conv2d(out_ch, out_ch, 3, padding=1, **kw)
        self.conv_shortcut = operations.Conv2d(in_ch, out_ch, 1, **kw) if in_ch != out_ch else None

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int | None, operations, device, dtype):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.heads = heads
        self.to_q = operations.Linear(dim, dim, bias=False, **kw)
        self.to_k = operations.Linear(context_dim or dim, dim, bias=False, **kw)
        self.to_v = operations.Linear(context_dim or dim, dim, bias=False, **kw)
        self.to_out = nn.ModuleList([operations.Linear(dim, dim, **kw)])

    def forward(self, x, context=None):
        context = x if context is None else context
        b = x.shape[0]

        def split(t):
            return t.reshape(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.to_q(x)), split(self.to_k(context)),
                                             split(self.to_v(context)))
        return self.to_out[0](out.transpose(1, 2).reshape(b, -1, x.shape[-1]))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int, operations, device, dtype):
        super().__init__()
        self.proj = operations.Linear(dim, inner * 2, device=device, dtype=dtype)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, operations, device, dtype):
        super().__init__()
        # Index 1 is a parameter-free dropout in diffusers; keeping the slot keeps the key ``ff.net.2``.
        self.net = nn.ModuleList([GEGLU(dim, dim * 4, operations, device, dtype), nn.Identity(),
                                  operations.Linear(dim * 4, dim, device=device, dtype=dtype)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int, only_cross: bool, operations, device, dtype):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.only_cross = only_cross
        self.norm1 = operations.LayerNorm(dim, **kw)
        # In "only cross-attention" blocks attn1 also attends to the text instead of the image (quirk Q16).
        self.attn1 = Attention(dim, heads, context_dim if only_cross else None, operations, device, dtype)
        self.norm2 = operations.LayerNorm(dim, **kw)
        self.attn2 = Attention(dim, heads, context_dim, operations, device, dtype)
        self.norm3 = operations.LayerNorm(dim, **kw)
        self.ff = FeedForward(dim, operations, device, dtype)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x), context if self.only_cross else None)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2D(nn.Module):
    def __init__(self, channels: int, heads: int, context_dim: int, groups: int, linear_projection: bool,
                 only_cross: bool, operations, device, dtype):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.linear_projection = linear_projection
        self.norm = operations.GroupNorm(groups, channels, eps=1e-6, **kw)
        if linear_projection:
            self.proj_in = operations.Linear(channels, channels, **kw)
            self.proj_out = operations.Linear(channels, channels, **kw)
        else:
            self.proj_in = operations.Conv2d(channels, channels, 1, **kw)
            self.proj_out = operations.Conv2d(channels, channels, 1, **kw)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, heads, context_dim, only_cross, operations, device, dtype)])

    def forward(self, x, context):
        b, c, h, w = x.shape
        residual = x
        x = self.norm(x)
        if self.linear_projection:
            x = self.proj_in(x.permute(0, 2, 3, 1).reshape(b, h * w, c))
        else:
            x = self.proj_in(x).permute(0, 2, 3, 1).reshape(b, h * w, c)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.linear_projection:
            x = self.proj_out(x).reshape(b, h, w, c).permute(0, 3, 1, 2)
        else:
            x = self.proj_out(x.reshape(b, h, w, c).permute(0, 3, 1, 2))
        return x + residual


class Downsample2D(nn.Module):
    def __init__(self, channels: int, operations, device, dtype):
        super().__init__()
        self.conv = operations.Conv2d(channels, channels, 3, stride=2, padding=1, device=device, dtype=dtype)

    def forward(self, x):
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, channels: int, operations, device, dtype):
        super().__init__()
        self.conv = operations.Conv2d(channels, channels, 3, padding=1, device=device, dtype=dtype)

    def forward(self, x, size=None):
        dtype = x.dtype
        if dtype == torch.bfloat16:  # nearest upsampling has no bf16 kernel on some builds
            x = x.float()
        x = F.interpolate(x, scale_factor=2.0, mode="nearest") if size is None else \
            F.interpolate(x, size=size, mode="nearest")
        return self.conv(x.to(dtype))


class _BlockSettings:
    """Per-block hyperparameters read from a diffusers UNet/ControlNet config."""

    def __init__(self, config: dict):
        check_config(config)
        self.channels = [int(c) for c in config["block_out_channels"]]
        n = len(self.channels)
        self.layers = int(config.get("layers_per_block", 2))
        self.heads = [int(h) for h in _listify(config.get("attention_head_dim", 8), n, "attention_head_dim")]
        self.only_cross = [bool(v) for v in _listify(config.get("only_cross_attention", False), n,
                                                     "only_cross_attention")]
        self.context_dim = int(config.get("cross_attention_dim", 1280))
        self.groups = int(config.get("norm_num_groups", 32))
        self.eps = float(config.get("norm_eps", 1e-5))
        self.linear_projection = bool(config.get("use_linear_projection", False))
        self.down_types = list(config.get("down_block_types", ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"]))
        if len(self.down_types) != n:
            raise ValueError(f"down_block_types has {len(self.down_types)} entries for {n} block_out_channels")
        self.temb = self.channels[0] * 4

    def transformer(self, channels, heads, only_cross, operations, device, dtype):
        return Transformer2D(channels, heads, self.context_dim, self.groups, self.linear_projection, only_cross,
                             operations, device, dtype)

    def resnet(self, cin, cout, operations, device, dtype):
        return ResnetBlock2D(cin, cout, self.temb, self.groups, self.eps, operations, device, dtype)


class DownBlock(nn.Module):
    def __init__(self, s: _BlockSettings, i: int, operations, device, dtype):
        super().__init__()
        cin = s.channels[max(i - 1, 0)]
        cout = s.channels[i]
        self.resnets = nn.ModuleList([s.resnet(cin if j == 0 else cout, cout, operations, device, dtype)
                                      for j in range(s.layers)])
        if s.down_types[i] == "CrossAttnDownBlock2D":
            self.attentions = nn.ModuleList([s.transformer(cout, s.heads[i], s.only_cross[i], operations, device,
                                                           dtype) for _ in range(s.layers)])
        else:
            self.attentions = None
        if i < len(s.channels) - 1:
            self.downsamplers = nn.ModuleList([Downsample2D(cout, operations, device, dtype)])
        else:
            self.downsamplers = None

    def forward(self, x, temb, context):
        outputs = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context)
            outputs.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            outputs.append(x)
        return x, outputs


class MidBlock(nn.Module):
    def __init__(self, s: _BlockSettings, operations, device, dtype):
        super().__init__()
        c = s.channels[-1]
        self.resnets = nn.ModuleList([s.resnet(c, c, operations, device, dtype) for _ in range(2)])
        # The mid block always uses spatial self-attention (diffusers passes it no only_cross_attention).
        self.attentions = nn.ModuleList([s.transformer(c, s.heads[-1], False, operations, device, dtype)])

    def forward(self, x, temb, context):
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class DownPath:
    """conv_in, time embedding, down blocks and mid block: shared by the UNet and the ControlNet."""

    def build_down_path(self, config: dict, operations, device, dtype) -> "_BlockSettings":
        s = self.settings = _BlockSettings(config)
        self.flip_sin_to_cos = bool(config.get("flip_sin_to_cos", True))
        self.freq_shift = float(config.get("freq_shift", 0))
        self.conv_in = operations.Conv2d(int(config.get("in_channels", 4)), s.channels[0], 3, padding=1,
                                         device=device, dtype=dtype)
        self.time_embedding = TimestepEmbedding(s.channels[0], s.temb, operations, device, dtype)
        self.down_blocks = nn.ModuleList([DownBlock(s, i, operations, device, dtype) for i in range(len(s.channels))])
        self.mid_block = MidBlock(s, operations, device, dtype)
        return s

    def time_conditioning(self, timestep, sample: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], device=sample.device)
        timestep = timestep.to(sample.device).reshape(-1).expand(sample.shape[0])
        emb = timestep_embedding(timestep, self.settings.channels[0], self.flip_sin_to_cos, self.freq_shift)
        return self.time_embedding(emb.to(sample.dtype))

    def run_down_path(self, x, temb, context):
        """Down blocks and mid block; returns the mid output and the skip tensors (conv_in output first)."""
        skips = [x]
        for block in self.down_blocks:
            x, outputs = block(x, temb, context)
            skips += outputs
        return x, skips


class UpBlock(nn.Module):
    def __init__(self, s: _BlockSettings, i: int, up_type: str, operations, device, dtype):
        super().__init__()
        rev = s.channels[::-1]
        n = len(rev)
        cout, prev_out = rev[i], rev[max(i - 1, 0)]
        cin = rev[min(i + 1, n - 1)]
        layers = s.layers + 1
        self.resnets = nn.ModuleList()
        for j in range(layers):
            skip = cin if j == layers - 1 else cout
            self.resnets.append(s.resnet((prev_out if j == 0 else cout) + skip, cout, operations, device, dtype))
        if up_type == "CrossAttnUpBlock2D":
            heads, only_cross = s.heads[::-1][i], s.only_cross[::-1][i]
            self.attentions = nn.ModuleList([s.transformer(cout, heads, only_cross, operations, device, dtype)
                                             for _ in range(layers)])
        else:
            self.attentions = None
        self.upsamplers = nn.ModuleList([Upsample2D(cout, operations, device, dtype)]) if i < n - 1 else None

    def forward(self, x, skips, temb, context, size=None):
        for j, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, size)
        return x


class UNet(nn.Module, DownPath):
    """Denoiser: ``forward(sample, timestep, encoder_hidden_states, down_residuals, mid_residual)``."""

    def __init__(self, config: dict, operations=nn, device=None, dtype=None):
        super().__init__()
        s = self.build_down_path(config, operations, device, dtype)
        up_types = list(config.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (len(s.channels) - 1)))
        if len(up_types) != len(s.channels):
            raise ValueError(f"up_block_types has {len(up_types)} entries for {len(s.channels)} block_out_channels")
        self.up_blocks = nn.ModuleList([UpBlock(s, i, t, operations, device, dtype) for i, t in enumerate(up_types)])
        c0 = s.channels[0]
        self.conv_norm_out = operations.GroupNorm(s.groups, c0, eps=s.eps, device=device, dtype=dtype)
        self.conv_out = operations.Conv2d(c0, int(config.get("out_channels", 4)), 3, padding=1, device=device,
                                          dtype=dtype)

    def forward(self, sample, timestep, encoder_hidden_states, down_block_additional_residuals=None,
                mid_block_additional_residual=None):
        temb = self.time_conditioning(timestep, sample)
        x, skips = self.run_down_path(self.conv_in(sample), temb, encoder_hidden_states)
        if down_block_additional_residuals is not None:
            skips = [s + r for s, r in zip(skips, down_block_additional_residuals)]
        x = self.mid_block(x, temb, encoder_hidden_states)
        if mid_block_additional_residual is not None:
            x = x + mid_block_additional_residual
        # When the latent is not a multiple of 2^n, each upsample goes to its skip tensor's size (quirk Q15).
        factor = 2 ** (len(self.up_blocks) - 1)
        odd = any(d % factor for d in sample.shape[-2:])
        for block in self.up_blocks:
            skips_here = skips[-len(block.resnets):]
            skips = skips[: -len(block.resnets)]
            size = skips[-1].shape[-2:] if odd and block.upsamplers is not None else None
            x = block(x, skips_here, temb, encoder_hidden_states, size)
        return self.conv_out(F.silu(self.conv_norm_out(x)))
