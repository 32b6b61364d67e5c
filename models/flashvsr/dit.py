"""FlashVSR's one-step streaming Wan2.1 DiT.

Module names follow the original Wan2.1 state dict (``patch_embedding``, ``text_embedding.{0,2}``,
``time_embedding.{0,2}``, ``time_projection.1``, ``blocks.N.{modulation, self_attn.*, cross_attn.*, norm3, ffn.*}``,
``head.{head, modulation}``), so the released ``diffusion_pytorch_model_streaming_dmd.safetensors`` loads
unchanged. The sizes come from the state dict (:func:`dit_config_from_state_dict`).

FlashVSR runs the network at the fixed timestep 1000 with one fixed prompt embedding, so the time embeddings, the
per-block modulation vectors and the cross-attention keys/values are computed once by :meth:`WanDiT.prepare`
(a :class:`DiTConstants` the caller keeps). The video is processed in chunks by :meth:`WanDiT.forward_chunk`:
6 latent frames first, then 2 at a time, each attending to itself and to the per-block KV cache of earlier chunks
(a :class:`StreamCache` the caller keeps and replaces with a fresh one for each video).

Self-attention is the locality-constrained sparse attention of ``attention.py``. The norms follow the official
module: LayerNorms (eps 1e-6) in the activation dtype, the q/k RMSNorms in float32, the RoPE rotation in float64
(float32 on devices without it; see ``rope.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..shared.errors import WeightsError
from .attention import (DEFAULT_GATHER_TOKENS, WINDOW, BlockKV, FlexCompileError, attend_streaming, check_grid,
                        local_window_mask, partition, topk_budget, unpartition)
from .rope import RopeTable, apply_rope

HEAD_DIM = 128  # what the 44/42/42 RoPE split was trained with; the head count is dim // 128
PATCH = (1, 2, 2)
EPS = 1e-6
TIMESTEP = 1000.0  # FlashVSR's only timestep (sigma 1: the update is x0 = noise - velocity)
# Tokens per FFN call: the 4x-wide hidden activation of a whole 1080p chunk 0 would take several GB.
FFN_CHUNK = 32768


def _key(sd: dict, name: str) -> torch.Tensor:
    if name not in sd:
        raise WeightsError(f"not a Wan2.1 DiT state dict: key {name!r} is missing (FlashVSR's DiT uses the original "
                           f"Wan2.1 key names, e.g. patch_embedding.weight, blocks.0.self_attn.q.weight)")
    return sd[name]


def dit_config_from_state_dict(sd: dict) -> dict:
    """Sizes of the DiT in ``sd`` (original Wan2.1 key names, no prefix)."""
    patch = _key(sd, "patch_embedding.weight")
    if patch.ndim != 5 or tuple(patch.shape[2:]) != PATCH:
        raise WeightsError(f"patch_embedding.weight has shape {tuple(patch.shape)}; FlashVSR's DiT needs a "
                           f"{PATCH} Conv3d patch embedding")
    dim, in_dim = int(patch.shape[0]), int(patch.shape[1])
    if dim % HEAD_DIM:
        raise WeightsError(f"DiT width {dim} is not a multiple of the head size {HEAD_DIM} that FlashVSR's 3-axis "
                           f"RoPE needs")
    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("blocks.") and k.split(".")[1].isdigit()})
    if not blocks:
        raise WeightsError("not a Wan2.1 DiT state dict: no blocks.N.* keys")
    if blocks != list(range(len(blocks))):
        missing = sorted(set(range(blocks[-1] + 1)) - set(blocks))
        raise WeightsError(f"DiT state dict has gaps in its block numbering: no keys for blocks {missing}")
    head = _key(sd, "head.head.weight")
    if head.shape[0] % math.prod(PATCH):
        raise WeightsError(f"head.head.weight has shape {tuple(head.shape)}, not out_channels*{math.prod(PATCH)} rows")
    return {
        "dim": dim,
        "in_dim": in_dim,
        "out_dim": int(head.shape[0]) // math.prod(PATCH),
        "num_layers": len(blocks),
        "ffn_dim": int(_key(sd, "blocks.0.ffn.0.weight").shape[0]),
        "text_dim": int(_key(sd, "text_embedding.0.weight").shape[1]),
        "freq_dim": int(_key(sd, "time_embedding.0.weight").shape[1]),
        "num_heads": dim // HEAD_DIM,
        "eps": EPS,
    }


def timestep_sinusoid(dim: int, timestep: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """(1, dim): cos half then sin half of timestep * 10000^(-i/(dim/2)), in float64, cast to ``dtype``.

    The official code first stores the timestep in the model dtype; 1000 is exact in every float format.
    """
    half = dim // 2
    t = torch.tensor([timestep], dtype=dtype).to(torch.float64)
    angles = torch.outer(t, torch.pow(10000, -torch.arange(half, dtype=torch.float64).div(half)))
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).to(device=device, dtype=dtype)


class RMSNorm(nn.Module):
    """RMS normalisation over the last axis computed in float32, rounded back, then scaled (official order)."""

    def __init__(self, dim: int, eps: float = EPS, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x):
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).to(x.dtype)
        return normed * self.weight.to(device=x.device, dtype=x.dtype)


class _Attention(nn.Module):
    """The layers both attentions hold (Wan's keys ``q``, ``k``, ``v``, ``o``, ``norm_q``, ``norm_k``)."""

    def __init__(self, dim: int, heads: int, eps: float, operations=nn, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.heads = heads
        for name in ("q", "k", "v", "o"):
            setattr(self, name, operations.Linear(dim, dim, **kw))
        self.norm_q = RMSNorm(dim, eps, **kw)
        self.norm_k = RMSNorm(dim, eps, **kw)


class SelfAttention(_Attention):
    def forward(self, x, chunk: "ChunkGeometry", cache: BlockKV | None, kv_ratio: float):
        """``x`` (tokens, C) of one chunk -> output (tokens, C) and the block's new KV cache."""
        rope = chunk.rope
        q = apply_rope(self.norm_q(self.q(x)), rope, self.heads)
        k = apply_rope(self.norm_k(self.k(x)), rope, self.heads)
        v = self.v(x)
        grid = (chunk.frames, chunk.rows, chunk.cols)
        q_w, k_w, v_w = (partition(t, *grid) for t in (q, k, v))
        del q, k, v
        try:
            out, cache = attend_streaming(q_w, k_w, v_w, self.heads, cache, chunk.local_mask, chunk.topk, kv_ratio,
                                          chunk.backend, chunk.gather_tokens, chunk.compiled_flex)
        except FlexCompileError as e:
            if chunk.on_flex_failure is None:
                raise
            # A new shape compiles at any block (the first chunk's, the later chunks' key lengths). The cache is
            # as it was and the earlier blocks' caches already hold this chunk, so the pass goes on from this
            # block rather than starting again; gather computes the same.
            chunk.on_flex_failure(e)
            chunk.backend, chunk.compiled_flex, chunk.on_flex_failure = "gather", None, None
            out, cache = attend_streaming(q_w, k_w, v_w, self.heads, cache, chunk.local_mask, chunk.topk, kv_ratio,
                                          "gather", chunk.gather_tokens)
        return self.o(unpartition(out, *grid)), cache


class CrossAttention(_Attention):
    """Attention to the fixed prompt; its keys/values come precomputed from :meth:`WanDiT.prepare`."""

    def context_kv(self, context):
        """(heads, ctx_len, head_dim) keys (normed) and values of ``context`` (ctx_len, C)."""
        k = self.norm_k(self.k(context)).unflatten(-1, (self.heads, -1)).transpose(0, 1)
        v = self.v(context).unflatten(-1, (self.heads, -1)).transpose(0, 1)
        return k.contiguous(), v.contiguous()

    def forward(self, x, kv):
        q = self.norm_q(self.q(x)).unflatten(-1, (self.heads, -1)).transpose(0, 1)
        # 4-D: with 3-D inputs CUDA's fused kernels decline and the math path holds every score (GBs at 1080p)
        out = F.scaled_dot_product_attention(q[None], kv[0][None], kv[1][None])[0]
        return self.o(out.transpose(0, 1).flatten(1))


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_dim: int, eps: float, operations=nn, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.self_attn = SelfAttention(dim, heads, eps, operations, **kw)
        self.cross_attn = CrossAttention(dim, heads, eps, operations, **kw)
        self.norm1 = operations.LayerNorm(dim, eps=eps, elementwise_affine=False, **kw)
        self.norm2 = operations.LayerNorm(dim, eps=eps, elementwise_affine=False, **kw)
        self.norm3 = operations.LayerNorm(dim, eps=eps, elementwise_affine=True, **kw)
        self.ffn = nn.Sequential(operations.Linear(dim, ffn_dim, **kw), nn.GELU(approximate="tanh"),
                                 operations.Linear(ffn_dim, dim, **kw))
        self.modulation = nn.Parameter(torch.empty(1, 6, dim, **kw))

    def _ffn(self, x):
        if x.shape[0] <= FFN_CHUNK:
            return self.ffn(x)
        return torch.cat([self.ffn(part) for part in x.split(FFN_CHUNK)])

    def forward(self, x, mod, cross_kv, chunk: "ChunkGeometry", cache: BlockKV | None, kv_ratio: float):
        """``mod``: the six (1, C) vectors shift/scale/gate for attention then FFN (``modulation + t_mod``)."""
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = mod
        attn, cache = self.self_attn(self.norm1(x) * (1 + scale_a) + shift_a, chunk, cache, kv_ratio)
        x = x + gate_a * attn
        del attn
        x = x + self.cross_attn(self.norm3(x), cross_kv)
        x = x + gate_f * self._ffn(self.norm2(x) * (1 + scale_f) + shift_f)
        return x, cache


class Head(nn.Module):
    def __init__(self, dim: int, out_dim: int, eps: float, operations=nn, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.norm = operations.LayerNorm(dim, eps=eps, elementwise_affine=False, **kw)
        self.head = operations.Linear(dim, out_dim * math.prod(PATCH), **kw)
        self.modulation = nn.Parameter(torch.empty(1, 2, dim, **kw))

    def forward(self, x, shift, scale):
        return self.head(self.norm(x) * (1 + scale) + shift)


@dataclass
class DiTConstants:
    """Everything that depends only on the weights, the fixed timestep and the prompt.

    ``t`` (1, C) time embedding; ``t_mod`` (1, 6, C) its projection; ``block_mods[i]`` the six (1, C) modulation
    vectors of block i (``modulation + t_mod``); ``head_mod`` the head's (shift, scale); ``cross_kv[i]`` block i's
    cross-attention (K normed, V), each (heads, ctx_len, head_dim). All in ``dtype`` on ``device``; recompute with
    :meth:`WanDiT.prepare` after the weights, device or dtype change.
    """

    t: torch.Tensor
    t_mod: torch.Tensor
    block_mods: list
    head_mod: tuple
    cross_kv: list
    device: torch.device
    dtype: torch.dtype


@dataclass
class StreamCache:
    """Per-video streaming state of the DiT: each block's self-attention KV cache (None before the first chunk).

    Make a new one (:meth:`WanDiT.new_cache`) for every video. ``chunks`` counts the chunks processed.
    """

    blocks: list
    chunks: int = 0
    grid: tuple | None = None  # (token rows, token cols) of the stream

    @property
    def slices(self) -> int:
        """Slices currently cached (the same for every block)."""
        return self.blocks[0].slices if self.blocks and self.blocks[0] is not None else 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for b in self.blocks if b is not None for t in (b.k, b.v, b.k_mean))


@dataclass
class ChunkGeometry:
    """Per-chunk values shared by all blocks."""

    frames: int
    rows: int
    cols: int
    rope: RopeTable
    local_mask: torch.Tensor
    topk: int
    backend: str = "gather"
    gather_tokens: int = DEFAULT_GATHER_TOKENS
    compiled_flex: object = field(default=None, repr=False)
    # called with the FlexCompileError when the compiled FlexAttention fails; the pass then goes on with gather
    # (None: the error is raised)
    on_flex_failure: object = field(default=None, repr=False)


class WanDiT(nn.Module):
    """The Wan2.1 DiT with FlashVSR's streaming sparse self-attention (see the module docstring)."""

    def __init__(self, config: dict, operations=nn, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.config = dict(config)
        dim, heads = config["dim"], config["num_heads"]
        eps = config.get("eps", EPS)
        if dim != heads * HEAD_DIM:
            raise ValueError(f"dim {dim} with {heads} heads: FlashVSR's RoPE needs head_dim {HEAD_DIM}")
        self.dim, self.heads = dim, heads
        self.in_dim, self.out_dim, self.freq_dim = config["in_dim"], config["out_dim"], config["freq_dim"]
        self.patch_embedding = operations.Conv3d(self.in_dim, dim, kernel_size=PATCH, stride=PATCH, **kw)
        self.text_embedding = nn.Sequential(operations.Linear(config["text_dim"], dim, **kw),
                                            nn.GELU(approximate="tanh"), operations.Linear(dim, dim, **kw))
        self.time_embedding = nn.Sequential(operations.Linear(self.freq_dim, dim, **kw), nn.SiLU(),
                                            operations.Linear(dim, dim, **kw))
        self.time_projection = nn.Sequential(nn.SiLU(), operations.Linear(dim, 6 * dim, **kw))
        self.blocks = nn.ModuleList(DiTBlock(dim, heads, config["ffn_dim"], eps, operations, **kw)
                                    for _ in range(config["num_layers"]))
        self.head = Head(dim, self.out_dim, eps, operations, **kw)

    def new_cache(self) -> StreamCache:
        return StreamCache([None] * len(self.blocks))

    @torch.no_grad()
    def prepare(self, prompt_embeds: torch.Tensor, device=None, dtype=None) -> DiTConstants:
        """Time embedding of the fixed timestep, modulation vectors and cross-attention K/V of ``prompt_embeds``
        ((1, ctx_len, text_dim) or (ctx_len, text_dim), e.g. FlashVSR's posi_prompt), computed in ``dtype``
        (default: the prompt's floating dtype) on ``device`` (default: the prompt's)."""
        device = torch.device(device) if device is not None else prompt_embeds.device
        dtype = dtype or prompt_embeds.dtype
        if prompt_embeds.ndim == 3:
            if prompt_embeds.shape[0] != 1:
                raise ValueError(f"prompt embedding batch must be 1, got shape {tuple(prompt_embeds.shape)}")
            prompt_embeds = prompt_embeds[0]
        t = self.time_embedding(timestep_sinusoid(self.freq_dim, TIMESTEP, dtype, device))
        device = t.device  # "cuda" -> "cuda:0", to compare with the latents' device later
        t_mod = self.time_projection(t).unflatten(1, (6, self.dim))
        block_mods = [tuple((blk.modulation.to(device=device, dtype=dtype) + t_mod).unbind(1))
                      for blk in self.blocks]
        head_mod = tuple((self.head.modulation.to(device=device, dtype=dtype) + t[:, None]).unbind(1))
        context = self.text_embedding(prompt_embeds.to(device=device, dtype=dtype))
        cross_kv = [blk.cross_attn.context_kv(context) for blk in self.blocks]
        return DiTConstants(t, t_mod, block_mods, head_mod, cross_kv, device, dtype)

    def chunk_geometry(self, frames: int, rows: int, cols: int, t_start: int, sparse_ratio: float,
                       local_range: int, device, backend: str = "gather",
                       gather_tokens: int = DEFAULT_GATHER_TOKENS, compiled_flex=None,
                       on_flex_failure=None) -> ChunkGeometry:
        check_grid(frames, rows, cols)
        return ChunkGeometry(
            frames, rows, cols,
            rope=RopeTable(t_start, frames, rows, cols, HEAD_DIM, device),
            local_mask=local_window_mask(rows // WINDOW[1], cols // WINDOW[2], local_range, device),
            topk=topk_budget(sparse_ratio, rows * 16, cols * 16),
            backend=backend, gather_tokens=gather_tokens, compiled_flex=compiled_flex,
            on_flex_failure=on_flex_failure)

    @torch.no_grad()
    def forward_chunk(self, x: torch.Tensor, lq_tokens, cache: StreamCache, t_start: int,
                      constants: DiTConstants, sparse_ratio: float = 2.0, local_range: int = 11,
                      kv_ratio: float = 3.0, backend: str = "gather",
                      gather_tokens: int = DEFAULT_GATHER_TOKENS, compiled_flex=None,
                      on_block=None, on_flex_failure=None) -> torch.Tensor:
        """Velocity (1, out_dim, T, H/8, W/8) for one chunk of noise latents ``x`` (1, in_dim, T, H/8, W/8).

        ``lq_tokens``: (1, T*H/16*W/16, C) tokens added after the patch embedding, or a list of such, one per LQ
        projection layer, the i-th added before block i (the official arithmetic; the released projections have
        one layer), or None. ``t_start`` is the temporal RoPE
        position of the chunk's first latent frame (official: 0 for the 6-frame first chunk, 4+2i for chunk i).
        ``cache`` is updated in place. ``on_block(i)``, if given, is called after each block (progress /
        interruption). ``on_flex_failure(error)``: see ``ChunkGeometry``. Computation runs in ``constants.dtype``;
        ``x`` is cast to it.
        """
        if x.ndim != 5 or x.shape[0] != 1 or x.shape[1] != self.in_dim:
            raise ValueError(f"expected latents (1, {self.in_dim}, T, H/8, W/8), got {tuple(x.shape)}")
        if x.device != constants.device:
            raise ValueError(f"latents on {x.device} but the DiT constants were prepared on {constants.device}")
        if len(cache.blocks) != len(self.blocks) or len(constants.block_mods) != len(self.blocks):
            raise ValueError("stream cache / constants were made for a DiT with a different block count")
        dtype = constants.dtype
        frames, rows, cols = x.shape[2], x.shape[3] // PATCH[1], x.shape[4] // PATCH[2]
        if cache.grid is not None and cache.grid != (rows, cols):
            raise ValueError(f"chunk token grid {(rows, cols)} differs from the stream's {cache.grid}")
        chunk = self.chunk_geometry(frames, rows, cols, t_start, sparse_ratio, local_range, x.device, backend,
                                    gather_tokens, compiled_flex, on_flex_failure)
        tokens = self.patch_embedding(x.to(dtype)).flatten(2)[0].transpose(0, 1).contiguous()
        lq = [] if lq_tokens is None else [lq_tokens] if torch.is_tensor(lq_tokens) else list(lq_tokens)
        if len(lq) > len(self.blocks):
            raise ValueError(f"{len(lq)} sets of LQ tokens for a DiT of {len(self.blocks)} blocks")
        for t in lq:
            if t.shape[-2:] != tokens.shape:
                raise ValueError(f"LQ tokens {tuple(t.shape)} do not match the chunk's {tuple(tokens.shape)} tokens")
        for i, block in enumerate(self.blocks):
            if i < len(lq):
                tokens = tokens + lq[i].reshape(tokens.shape).to(device=tokens.device, dtype=dtype)
            tokens, cache.blocks[i] = block(tokens, constants.block_mods[i], constants.cross_kv[i], chunk,
                                            cache.blocks[i], kv_ratio)
            if on_block is not None:
                on_block(i)
        cache.chunks += 1
        cache.grid = (rows, cols)
        out = self.head(tokens, *constants.head_mod)
        return self.unpatchify(out, frames, rows, cols)

    def unpatchify(self, tokens: torch.Tensor, frames: int, rows: int, cols: int) -> torch.Tensor:
        """(tokens, pt*ph*pw*out_dim) with channels innermost -> (1, out_dim, frames*pt, rows*ph, cols*pw)."""
        pt, ph, pw = PATCH
        x = tokens.reshape(frames, rows, cols, pt, ph, pw, self.out_dim)
        x = x.permute(6, 0, 3, 1, 4, 2, 5).reshape(self.out_dim, frames * pt, rows * ph, cols * pw)
        return x[None]
