"""The Stable-Diffusion-x4-upscaler-family UNet used as Stream-DiffVSR's denoiser.

Module names follow the diffusers ``UNet2DConditionModel`` state dict (``down_blocks.1.attentions.0.
transformer_blocks.0.attn1.to_q.weight`` ...) so the official weights load unchanged; hyperparameters come from
the component's ``config.json``. Only the features this model family uses are implemented; a config asking for
anything else is rejected with the offending key named. The conv_in / time-embedding / down / mid part is
``DownPath``, shared with the ControlNet.

What stays the same from call to call can be computed once and passed in instead (``DownPath.prompt_kv`` for the
cross-attention keys/values of the constant prompt embedding, ``DownPath.step_embedding`` for a timestep's
embedding and every resnet's projection of it): the networks then skip that work and compute exactly the same
numbers, since the very same operations run on the same inputs, only once.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..shared.norms import group_norm
from ..shared.packed import PackedConv2d, PackedLinear

logger = logging.getLogger(__name__)


class PromptKV:
    """The cross-attention keys and values of one context tensor, for every cross-attention of one network
    (``kv[attention.kv_slot]``), made by ``DownPath.prompt_kv``. Pass it as ``encoder_hidden_states``."""

    __slots__ = ("kv",)

    def __init__(self, kv):
        self.kv = tuple(kv)


class StepEmbedding:
    """A timestep's embedding and every resnet's projection of it (``proj[resnet.temb_slot]``), made by
    ``DownPath.step_embedding``. Pass it as ``timestep``."""

    __slots__ = ("temb", "proj")

    def __init__(self, temb, proj):
        self.temb, self.proj = temb, tuple(proj)

DOWN_BLOCK_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")

# Keys whose only supported value is the diffusers default; anything else would add layers or change the maths.
_REQUIRED = {
    "act_fn": "silu", "center_input_sample": False, "class_embed_type": None, "num_class_embeds": None,
    "addition_embed_type": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "time_embedding_type": "positional", "time_embedding_act_fn": None, "timestep_post_act": None,
    "time_cond_proj_dim": None, "resnet_time_scale_shift": "default", "dual_cross_attention": False,
    "cross_attention_norm": None, "attention_type": "default", "mid_block_type": "UNetMidBlock2DCrossAttn",
    "reverse_transformer_layers_per_block": None,
}
# Keys read below.
_USED = {
    "in_channels", "out_channels", "block_out_channels", "down_block_types", "up_block_types", "layers_per_block",
    "attention_head_dim", "num_attention_heads", "cross_attention_dim", "only_cross_attention",
    "use_linear_projection", "norm_num_groups", "norm_eps", "flip_sin_to_cos", "freq_shift", "downsample_padding",
    "mid_block_scale_factor", "upcast_attention", "transformer_layers_per_block", "time_embedding_dim",
    "conv_in_kernel", "conv_out_kernel",
}
# Keys without effect here (besides "_"-prefixed metadata): training-only settings, or settings read only by
# block types or embeddings that the checks above exclude.
_IGNORED = {
    "sample_size", "dropout", "resnet_out_scale_factor",
    "resnet_skip_time_act", "mid_block_only_cross_attention", "addition_embed_type_num_heads",
    "addition_time_embed_dim", "projection_class_embeddings_input_dim", "class_embeddings_concat",
}


def _get(config: dict, key: str, default):
    value = config.get(key)
    return default if value is None else value


def _per_block(config: dict, key: str, default, n: int) -> list:
    value = _get(config, key, default)
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{key}={list(value)!r} needs one entry per block ({n} block_out_channels)")
        return list(value)
    return [value] * n


def _int_list(values: list, key: str) -> list[int]:
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{key}={values!r} is not supported (one integer per block)")
    return values


class BlockSettings:
    """Hyperparameters of the conv_in / time embedding / down / mid path, read from a diffusers config dict."""

    def __init__(self, config: dict, extra_keys=()):
        for key, expected in _REQUIRED.items():
            if config.get(key, expected) != expected:
                raise ValueError(f"{key}={config[key]!r} is not supported (this model family uses {expected!r})")
        if config.get("upcast_attention") not in (None, False, True):
            raise ValueError(f"upcast_attention={config['upcast_attention']!r} must be a boolean")
        unknown = {k for k in config if not k.startswith("_")} - _USED - _IGNORED - set(_REQUIRED) - set(extra_keys)
        if unknown:
            logger.warning("Ignoring unrecognised config keys: %s", ", ".join(sorted(unknown)))

        self.channels = _int_list(list(_get(config, "block_out_channels", [])), "block_out_channels")
        n = len(self.channels)
        if n == 0:
            raise ValueError("block_out_channels is missing or empty")
        self.in_channels = int(_get(config, "in_channels", 4))
        self.down_types = list(_get(config, "down_block_types", ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"]))
        if len(self.down_types) != n:
            raise ValueError(f"down_block_types has {len(self.down_types)} entries for {n} block_out_channels")
        for t in self.down_types:
            if t not in DOWN_BLOCK_TYPES:
                raise ValueError(f"down_block_types entry {t!r} is not supported (use one of {DOWN_BLOCK_TYPES})")
        self.layers = _int_list(_per_block(config, "layers_per_block", 2, n), "layers_per_block")
        # diffusers reads attention_head_dim as the number of heads (quirk Q16).
        heads_key = "num_attention_heads" if config.get("num_attention_heads") is not None else "attention_head_dim"
        self.heads = _int_list(_per_block(config, heads_key, 8, n), heads_key)
        for c, h in zip(self.channels, self.heads):
            if c % h:
                raise ValueError(f"{heads_key}={h} does not divide the block's {c} channels")
        self.context_dims = _int_list(_per_block(config, "cross_attention_dim", 1280, n), "cross_attention_dim")
        self.only_cross = [bool(v) for v in _per_block(config, "only_cross_attention", False, n)]
        self.transformer_layers = _int_list(_per_block(config, "transformer_layers_per_block", 1, n),
                                            "transformer_layers_per_block")
        self.groups = int(_get(config, "norm_num_groups", 32))
        self.eps = float(_get(config, "norm_eps", 1e-5))
        self.linear_projection = bool(_get(config, "use_linear_projection", False))
        self.upcast_attention = bool(_get(config, "upcast_attention", False))
        self.flip_sin_to_cos = bool(_get(config, "flip_sin_to_cos", True))
        self.freq_shift = float(_get(config, "freq_shift", 0))
        self.downsample_padding = int(_get(config, "downsample_padding", 1))
        self.mid_scale = float(_get(config, "mid_block_scale_factor", 1.0))
        self.temb_dim = int(_get(config, "time_embedding_dim", self.channels[0] * 4))
        self.conv_in_kernel = int(_get(config, "conv_in_kernel", 3))

    def resnet(self, cin, cout, operations, device, dtype, output_scale_factor=1.0):
        return ResnetBlock2D(cin, cout, self.temb_dim, self.groups, self.eps, output_scale_factor, operations,
                             device, dtype)

    def transformer(self, i: int, channels: int, only_cross: bool, layers: int, operations, device, dtype):
        return Transformer2D(channels, self.heads[i], self.context_dims[i], self.groups, self.linear_projection,
                             only_cross, layers, self.upcast_attention, operations, device, dtype)


def timestep_embedding(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0) -> torch.Tensor:
    """Sinusoidal embedding of 1-D ``timesteps``, always float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
                      / (half - freq_shift))
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)],
                    dim=-1)
    return F.pad(emb, (0, dim % 2))


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int, operations=nn, device=None, dtype=None):
        super().__init__()
        self.linear_1 = operations.Linear(in_dim, dim, device=device, dtype=dtype)
        self.linear_2 = operations.Linear(dim, dim, device=device, dtype=dtype)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, groups: int, eps: float,
                 output_scale_factor: float = 1.0, operations=nn, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.output_scale_factor = output_scale_factor
        self.norm1 = operations.GroupNorm(groups, in_ch, eps=eps, **kw)
        self.conv1 = operations.Conv2d(in_ch, out_ch, 3, padding=1, **kw)
        self.time_emb_proj = operations.Linear(temb_ch, out_ch, **kw)
        self.norm2 = operations.GroupNorm(groups, out_ch, eps=eps, **kw)
        self.conv2 = operations.Conv2d(out_ch, out_ch, 3, padding=1, **kw)
        self.conv_shortcut = operations.Conv2d(in_ch, out_ch, 1, **kw) if in_ch != out_ch else None

    temb_slot = -1  # index in StepEmbedding.proj, numbered by the network that owns the block

    def project_time(self, temb):
        return self.time_emb_proj(F.silu(temb))[:, :, None, None]

    def forward(self, x, temb):
        h = self.conv1(F.silu(group_norm(self.norm1, x)))
        h = h + (temb.proj[self.temb_slot] if isinstance(temb, StepEmbedding) else self.project_time(temb))
        h = self.conv2(F.silu(group_norm(self.norm2, h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        return out if self.output_scale_factor == 1 else out / self.output_scale_factor


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int | None = None, upcast: bool = False,
                 operations=nn, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.heads = heads
        self.upcast = upcast
        self.to_q = operations.Linear(dim, dim, bias=False, **kw)
        self.to_k = operations.Linear(context_dim or dim, dim, bias=False, **kw)
        self.to_v = operations.Linear(context_dim or dim, dim, bias=False, **kw)
        # diffusers' to_out.1 is a parameter-free dropout, so a single entry keeps the key to_out.0.
        self.to_out = nn.ModuleList([operations.Linear(dim, dim, **kw)])
        self.is_cross = context_dim is not None
        if self.is_cross:  # the context is the constant prompt: its keys and values are computed once (PromptKV)
            for layer in (self.to_k, self.to_v):
                if isinstance(layer, PackedLinear):
                    layer.single_use = True

    kv_slot = -1  # index in PromptKV.kv, numbered by the network that owns the block (cross-attentions only)

    def _heads(self, t):
        t = t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
        # the config may ask for float32 attention to avoid half-precision overflow
        return t.float() if self.upcast else t

    def project_context(self, context):
        """Keys and values of ``context``, exactly as ``forward`` computes them."""
        return self._heads(self.to_k(context)), self._heads(self.to_v(context))

    def forward(self, x, context=None):
        if isinstance(context, PromptKV):
            k, v = context.kv[self.kv_slot]
        else:
            k, v = self.project_context(x if context is None else context)
        q = self._heads(self.to_q(x))
        out = F.scaled_dot_product_attention(q, k, v).to(x.dtype)
        return self.to_out[0](out.transpose(1, 2).flatten(2))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int, operations=nn, device=None, dtype=None):
        super().__init__()
        self.proj = operations.Linear(dim, inner * 2, device=device, dtype=dtype)
        if isinstance(self.proj, PackedLinear):
            self.proj.gated = True  # runs through gated_gelu only: its prepared copy is the two halves

    def forward(self, x):
        if isinstance(self.proj, PackedLinear):
            return self.proj.gated_gelu(x)  # the same up to float rounding, one pass fewer over the output
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, operations=nn, device=None, dtype=None):
        super().__init__()
        # Slot 1 is diffusers' parameter-free dropout; keeping it keeps the key ff.net.2.
        self.net = nn.ModuleList([GEGLU(dim, dim * 4, operations, device, dtype), nn.Identity(),
                                  operations.Linear(dim * 4, dim, device=device, dtype=dtype)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int, only_cross: bool, upcast: bool = False,
                 operations=nn, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.only_cross = only_cross
        self.norm1 = operations.LayerNorm(dim, **kw)
        # In only-cross-attention blocks attn1 attends to the text, not the image (quirk Q16).
        self.attn1 = Attention(dim, heads, context_dim if only_cross else None, upcast, operations, device, dtype)
        self.norm2 = operations.LayerNorm(dim, **kw)
        self.attn2 = Attention(dim, heads, context_dim, upcast, operations, device, dtype)
        self.norm3 = operations.LayerNorm(dim, **kw)
        self.ff = FeedForward(dim, operations, device, dtype)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x), context if self.only_cross else None)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


def _channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


class Transformer2D(nn.Module):
    def __init__(self, channels: int, heads: int, context_dim: int, groups: int, linear_projection: bool,
                 only_cross: bool, layers: int = 1, upcast: bool = False, operations=nn, device=None, dtype=None):
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
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(channels, heads, context_dim, only_cross, upcast, operations, device, dtype)
            for _ in range(layers)])

    def forward(self, x, context):
        b, c, h, w = x.shape
        residual = x
        x = group_norm(self.norm, x)
        if not self.linear_projection:
            x = self.proj_in(x)
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
        if self.linear_projection:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.linear_projection:
            x = self.proj_out(x)
        # Back to the input's layout (contiguous, as diffusers does, unless the network runs channels-last): a
        # channels-last view here would make the following convolutions copy their weights on every call.
        layout = torch.channels_last if _channels_last(residual) else torch.contiguous_format
        x = x.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous(memory_format=layout)
        if not self.linear_projection:
            x = self.proj_out(x)
        return x + residual


class Downsample2D(nn.Module):
    def __init__(self, channels: int, padding: int = 1, operations=nn, device=None, dtype=None):
        super().__init__()
        self.padding = padding
        self.conv = operations.Conv2d(channels, channels, 3, stride=2, padding=padding, device=device, dtype=dtype)

    def forward(self, x):
        if self.padding == 0:  # diffusers pads right/bottom only in this case
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, channels: int, operations=nn, device=None, dtype=None):
        super().__init__()
        self.conv = operations.Conv2d(channels, channels, 3, padding=1, device=device, dtype=dtype)

    def forward(self, x, size=None):
        doubles = size is None or tuple(size) == (2 * x.shape[-2], 2 * x.shape[-1])
        if doubles and isinstance(self.conv, PackedConv2d) and self.conv.can_fold_upsample(x):
            return self.conv.upsampled(x)  # the same up to float rounding, 2.25x fewer multiply-adds
        dtype = x.dtype
        if dtype == torch.bfloat16:  # nearest upsampling lacks a bf16 kernel on some builds; it is a copy anyway
            x = x.float()
        x = F.interpolate(x, scale_factor=2.0, mode="nearest") if size is None else \
            F.interpolate(x, size=size, mode="nearest")
        return self.conv(x.to(dtype))


class DownBlock(nn.Module):
    """``DownBlock2D`` or, with attentions, ``CrossAttnDownBlock2D``."""

    def __init__(self, s: BlockSettings, i: int, operations=nn, device=None, dtype=None):
        super().__init__()
        cin, cout = s.channels[max(i - 1, 0)], s.channels[i]
        self.resnets = nn.ModuleList([s.resnet(cin if j == 0 else cout, cout, operations, device, dtype)
                                      for j in range(s.layers[i])])
        self.attentions = None
        if s.down_types[i] == "CrossAttnDownBlock2D":
            self.attentions = nn.ModuleList([
                s.transformer(i, cout, s.only_cross[i], s.transformer_layers[i], operations, device, dtype)
                for _ in range(s.layers[i])])
        self.downsamplers = None
        if i < len(s.channels) - 1:
            self.downsamplers = nn.ModuleList([Downsample2D(cout, s.downsample_padding, operations, device, dtype)])

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
    """``UNetMidBlock2DCrossAttn``: resnet, transformer, resnet."""

    def __init__(self, s: BlockSettings, operations=nn, device=None, dtype=None):
        super().__init__()
        c = s.channels[-1]
        self.resnets = nn.ModuleList([s.resnet(c, c, operations, device, dtype, s.mid_scale) for _ in range(2)])
        # diffusers gives the mid block no only_cross_attention: it always has spatial self-attention.
        self.attentions = nn.ModuleList([
            s.transformer(-1, c, False, s.transformer_layers[-1], operations, device, dtype)])

    def forward(self, x, temb, context):
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class UpBlock(nn.Module):
    """``UpBlock2D`` or, with attentions, ``CrossAttnUpBlock2D``; ``i`` counts from the deepest block."""

    def __init__(self, s: BlockSettings, i: int, up_type: str, operations=nn, device=None, dtype=None):
        super().__init__()
        n = len(s.channels)
        k = n - 1 - i  # the matching down block
        cout = s.channels[k]
        prev_out = s.channels[min(k + 1, n - 1)]
        skip_in = s.channels[max(k - 1, 0)]
        layers = s.layers[k] + 1
        self.resnets = nn.ModuleList([
            s.resnet((prev_out if j == 0 else cout) + (skip_in if j == layers - 1 else cout), cout,
                     operations, device, dtype)
            for j in range(layers)])
        self.attentions = None
        if up_type == "CrossAttnUpBlock2D":
            self.attentions = nn.ModuleList([
                s.transformer(k, cout, s.only_cross[k], s.transformer_layers[k], operations, device, dtype)
                for _ in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(cout, operations, device, dtype)]) if i < n - 1 else None

    def forward(self, x, skips: list, temb, context, size=None):
        for j, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, size)
        return x


class DownPath(nn.Module):
    """conv_in, time embedding, down blocks and mid block: the part shared by the UNet and the ControlNet."""

    def __init__(self, s: BlockSettings, operations=nn, device=None, dtype=None):
        super().__init__()
        self.settings = s
        self.conv_in = operations.Conv2d(s.in_channels, s.channels[0], s.conv_in_kernel,
                                         padding=(s.conv_in_kernel - 1) // 2, device=device, dtype=dtype)
        self.time_embedding = TimestepEmbedding(s.channels[0], s.temb_dim, operations, device, dtype)
        self.down_blocks = nn.ModuleList([DownBlock(s, i, operations, device, dtype) for i in range(len(s.channels))])
        self.mid_block = MidBlock(s, operations, device, dtype)

    def number_blocks(self) -> None:
        """Give every cross-attention its slot in a PromptKV and every resnet its slot in a StepEmbedding (run by
        the subclasses once all their blocks exist)."""
        self.cross_attentions = tuple(m for m in self.modules() if isinstance(m, Attention) and m.is_cross)
        self.time_resnets = tuple(m for m in self.modules() if isinstance(m, ResnetBlock2D))
        for i, m in enumerate(self.cross_attentions):
            m.kv_slot = i
        for i, m in enumerate(self.time_resnets):
            m.temb_slot = i

    def prompt_kv(self, context: torch.Tensor) -> PromptKV:
        """Keys and values of ``context`` for every cross-attention: pass the result as ``encoder_hidden_states``
        to reuse them across calls (same numbers, computed once)."""
        return PromptKV(m.project_context(context) for m in self.cross_attentions)

    def step_embedding(self, timestep, sample: torch.Tensor) -> StepEmbedding:
        """``timestep``'s embedding and every resnet's projection of it for a sample like ``sample`` (only its
        batch size, device and dtype count): pass the result as ``timestep`` to reuse it across calls."""
        temb = self.embed_time(timestep, sample)
        return StepEmbedding(temb, (m.project_time(temb) for m in self.time_resnets))

    def embed_time(self, timestep, sample: torch.Tensor) -> torch.Tensor:
        """Time embedding for ``timestep`` (int, 0-dim or 1-dim tensor), broadcast to the batch."""
        if isinstance(timestep, StepEmbedding):
            return timestep
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep])
        timestep = timestep.to(sample.device).reshape(-1).expand(sample.shape[0])
        s = self.settings
        # Computed in float32 and cast to the sample dtype, as diffusers does.
        emb = timestep_embedding(timestep, s.channels[0], s.flip_sin_to_cos, s.freq_shift)
        return self.time_embedding(emb.to(sample.dtype))

    def skip_shapes(self, sample_shape) -> tuple[list[tuple], tuple]:
        """The shapes of the skip tensors that ``run_down_blocks`` returns for a sample of ``sample_shape``
        (B, C, H, W), and of the deepest features: what a ControlNet's residuals for such a sample look like."""
        s = self.settings
        b, _, h, w = sample_shape
        shapes = [(b, s.channels[0], h, w)]  # conv_in keeps the size (odd kernel, same padding)
        for i, block in enumerate(self.down_blocks):
            shapes += [(b, s.channels[i], h, w)] * len(block.resnets)
            if block.downsamplers is not None:
                p = block.downsamplers[0].padding
                # a 3x3 convolution of stride 2 and padding p; padding 0 first pads one row and column (Downsample2D)
                h, w = ((n + (2 * p if p else 1) - 3) // 2 + 1 for n in (h, w))
                shapes.append((b, s.channels[i], h, w))
        return shapes, (b, s.channels[-1], h, w)

    def run_down_blocks(self, x, temb, context):
        """Down blocks after conv_in; returns the deepest features and every skip tensor (``x`` first)."""
        skips = [x]
        for block in self.down_blocks:
            x, outputs = block(x, temb, context)
            skips += outputs
        return x, skips


class UNet(DownPath):
    """Denoiser: ``forward(sample, timestep, encoder_hidden_states, down_residuals, mid_residual)`` returns the
    v-prediction (``out_channels`` channels at the sample's size)."""

    def __init__(self, config: dict, operations=nn, device=None, dtype=None):
        s = BlockSettings(config)
        super().__init__(s, operations, device, dtype)
        n = len(s.channels)
        up_types = list(_get(config, "up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1)))
        if len(up_types) != n:
            raise ValueError(f"up_block_types has {len(up_types)} entries for {n} block_out_channels")
        for t in up_types:
            if t not in UP_BLOCK_TYPES:
                raise ValueError(f"up_block_types entry {t!r} is not supported (use one of {UP_BLOCK_TYPES})")
        self.up_blocks = nn.ModuleList([UpBlock(s, i, t, operations, device, dtype) for i, t in enumerate(up_types)])
        c0 = s.channels[0]
        k = int(_get(config, "conv_out_kernel", 3))
        self.conv_norm_out = operations.GroupNorm(s.groups, c0, eps=s.eps, device=device, dtype=dtype)
        self.conv_out = operations.Conv2d(c0, int(_get(config, "out_channels", 4)), k, padding=(k - 1) // 2,
                                          device=device, dtype=dtype)
        self.number_blocks()

    def forward(self, sample, timestep, encoder_hidden_states, down_block_additional_residuals=None,
                mid_block_additional_residual=None):
        temb = self.embed_time(timestep, sample)
        x, skips = self.run_down_blocks(self.conv_in(sample), temb, encoder_hidden_states)
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(f"got {len(down_block_additional_residuals)} down-block residuals for "
                                 f"{len(skips)} skip tensors")
            skips = [s + r for s, r in zip(skips, down_block_additional_residuals)]
        x = self.mid_block(x, temb, encoder_hidden_states)
        if mid_block_additional_residual is not None:
            x = x + mid_block_additional_residual
        for block in self.up_blocks:
            n = len(block.resnets)
            here, skips = skips[-n:], skips[:-n]
            # Upsample to the next skip tensor's size: equal to x2 for even sizes, and the only way to meet the
            # ceil-rounded sizes of the down path when the latent is not a multiple of 2^n (quirk Q15).
            size = skips[-1].shape[-2:] if skips else None
            x = block(x, here, temb, encoder_hidden_states, size)
        return self.conv_out(F.silu(group_norm(self.conv_norm_out, x)))
