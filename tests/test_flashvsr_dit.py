"""FlashVSR's Wan2.1 DiT: RoPE against the formula (spec §1.1, §1.3), config and key layout of the released
checkpoint (spec §1.1), the fixed-timestep constants, chunked streaming and half-precision smoke runs, and the
whole network against diffusers' Wan transformer."""

import copy
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from flashvsr_helpers import one_thread
from streamvsr.models.flashvsr import rope as R
from streamvsr.models.flashvsr.dit import (WanDiT, dit_config_from_state_dict, timestep_sinusoid)
from streamvsr.models.shared.errors import WeightsError
from streamvsr.models.shared.weights import load_into

TINY = dict(dim=256, blocks=2, ffn=512, text=64, freq=256, in_ch=16, out_ch=16)


def official_state_dict(dim=256, blocks=2, ffn=512, text=64, freq=256, in_ch=16, out_ch=16, seed=0):
    """Random tensors under the released checkpoint's key names and shapes (spec §1.1)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "patch_embedding.weight": (dim, in_ch, 1, 2, 2), "patch_embedding.bias": (dim,),
        "text_embedding.0.weight": (dim, text), "text_embedding.0.bias": (dim,),
        "text_embedding.2.weight": (dim, dim), "text_embedding.2.bias": (dim,),
        "time_embedding.0.weight": (dim, freq), "time_embedding.0.bias": (dim,),
        "time_embedding.2.weight": (dim, dim), "time_embedding.2.bias": (dim,),
        "time_projection.1.weight": (6 * dim, dim), "time_projection.1.bias": (6 * dim,),
        "head.head.weight": (out_ch * 4, dim), "head.head.bias": (out_ch * 4,), "head.modulation": (1, 2, dim),
    }
    for i in range(blocks):
        p = f"blocks.{i}."
        shapes[p + "modulation"] = (1, 6, dim)
        for attn in ("self_attn", "cross_attn"):
            for n in "qkvo":
                shapes[f"{p}{attn}.{n}.weight"] = (dim, dim)
                shapes[f"{p}{attn}.{n}.bias"] = (dim,)
            shapes[f"{p}{attn}.norm_q.weight"] = (dim,)
            shapes[f"{p}{attn}.norm_k.weight"] = (dim,)
        shapes.update({p + "norm3.weight": (dim,), p + "norm3.bias": (dim,), p + "ffn.0.weight": (ffn, dim),
                       p + "ffn.0.bias": (ffn,), p + "ffn.2.weight": (dim, ffn), p + "ffn.2.bias": (dim,)})
    sd = {}
    for k, shape in shapes.items():
        t = torch.randn(shape, generator=g)
        if len(shape) >= 2 and "modulation" not in k:
            t = t / math.sqrt(math.prod(shape[1:]))
        elif "norm" in k and k.endswith("weight"):
            t = 1 + 0.1 * t
        else:
            t = 0.1 * t
        sd[k] = t
    return sd


@pytest.fixture(scope="module")
def tiny():
    sd = official_state_dict(**TINY)
    model = load_into(WanDiT(dit_config_from_state_dict(sd), device="meta"), sd, "FlashVSR DiT", "test")
    prompt = torch.randn(1, 12, TINY["text"], generator=torch.Generator().manual_seed(1))
    return model, prompt


def latents(frames, h8=32, w8=32, seed=0, dtype=torch.float32):
    return torch.randn(1, 16, frames, h8, w8, generator=torch.Generator().manual_seed(seed)).to(dtype)


# --------------------------------------------------------------------------------------------------------------
# RoPE
# --------------------------------------------------------------------------------------------------------------

def formula_table(width, positions):
    """complex128 table of one axis: exp(i * p * 10000^(-2j/width)), j < width/2."""
    j = torch.arange(width // 2, dtype=torch.float64)
    inv = 10000.0 ** (-2 * j / width)
    p = torch.as_tensor(positions, dtype=torch.float64)
    return torch.polar(torch.ones(len(p), len(j), dtype=torch.float64), p[:, None] * inv[None])


def test_rope_split_and_angles_below_1024_match_formula():
    assert R.axis_widths(128) == (44, 42, 42)
    positions = list(range(0, 1024, 7)) + [1023]
    for width in (44, 42):
        ref = formula_table(width, positions)
        got = torch.polar(torch.ones(len(positions), width // 2, dtype=torch.float64),
                          R.axis_angles(torch.tensor(positions), width))
        assert torch.allclose(got, ref, rtol=0, atol=1e-12)


def test_rope_grid_layout_and_far_positions():
    for t_start in (4, 1020, 5000, 1_000_000):
        frames, rows, cols = 2, 3, 5
        table = R.RopeTable(t_start, frames, rows, cols, 128)
        ref = torch.cat([
            formula_table(44, range(t_start, t_start + frames))[:, None, None].expand(frames, rows, cols, -1),
            formula_table(42, range(rows))[None, :, None].expand(frames, rows, cols, -1),
            formula_table(42, range(cols))[None, None, :].expand(frames, rows, cols, -1),
        ], dim=-1).reshape(frames * rows * cols, 1, 64)
        assert table.rotation.dtype == torch.complex128 and table.cos is None
        assert torch.allclose(table.rotation, ref, rtol=0, atol=1e-12)


def official_rotation(x, heads, t_start, frames, rows, cols):
    """The official rotation: x as complex128 pairs times the complex128 table of the three axes (torch.polar of
    position times inverse frequency), rounded back to x's dtype."""
    table = torch.cat([
        formula_table(44, range(t_start, t_start + frames))[:, None, None].expand(frames, rows, cols, -1),
        formula_table(42, range(rows))[None, :, None].expand(frames, rows, cols, -1),
        formula_table(42, range(cols))[None, None, :].expand(frames, rows, cols, -1),
    ], dim=-1).reshape(frames * rows * cols, 1, 64)
    pairs = torch.view_as_complex(x.to(torch.float64).reshape(x.shape[0], heads, 64, 2))
    return torch.view_as_real(pairs * table).reshape(x.shape).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_apply_rope_equals_the_official_complex128_rotation(dtype):
    heads, frames, rows, cols, t_start = 2, 2, 8, 12, 6
    x = (torch.randn(frames * rows * cols, heads * 128, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    got = R.apply_rope(x, R.RopeTable(t_start, frames, rows, cols, 128), heads)
    assert got.dtype == dtype
    assert torch.equal(got, official_rotation(x, heads, t_start, frames, rows, cols))


def test_rope_in_bands_equals_one_pass(monkeypatch):
    heads, frames, rows, cols = 2, 2, 8, 12
    x = torch.randn(frames * rows * cols, heads * 128, generator=torch.Generator().manual_seed(1))  # fp32: where
    table = R.RopeTable(4, frames, rows, cols, 128)  # a float32 rotation would show
    whole = R.apply_rope(x, table, heads)
    monkeypatch.setattr(R, "ROPE_STEP_VALUES", 7 * heads * 128)  # bands of 7 tokens, the last one shorter
    banded = R.apply_rope(x, table, heads)
    assert torch.equal(banded, whole) and torch.equal(banded, official_rotation(x, heads, 4, frames, rows, cols))


def test_rope_in_float32_where_there_is_no_float64_is_close_to_the_official(monkeypatch):
    heads, frames, rows, cols, t_start = 2, 2, 8, 12, 6
    x = torch.randn(frames * rows * cols, heads * 128, generator=torch.Generator().manual_seed(0)) * 3
    monkeypatch.setattr(R, "rotation_dtype", lambda device: torch.float32)  # as on MPS
    table = R.RopeTable(t_start, frames, rows, cols, 128)
    assert table.rotation is None and table.cos.dtype == torch.float32
    official = official_rotation(x, heads, t_start, frames, rows, cols)
    got = R.apply_rope(x, table, heads)
    assert torch.allclose(got, official, rtol=1e-6, atol=1e-5) and not torch.equal(got, official)
    monkeypatch.setattr(R, "ROPE_STEP_VALUES", 5 * heads * 128)
    assert torch.equal(R.apply_rope(x, table, heads), got)  # in bands too


def test_rope_rotates_in_float32_where_the_device_has_no_float64():
    assert R.rotation_dtype("cpu") == R.rotation_dtype(None) == R.rotation_dtype("cuda:1") == torch.float64
    for device in ("mps", torch.device("mps"), "xpu", "privateuseone:0"):  # Apple, Intel Arc, DirectML
        assert R.rotation_dtype(device) == torch.float32, device


# --------------------------------------------------------------------------------------------------------------
# Config and weights
# --------------------------------------------------------------------------------------------------------------

def test_config_from_official_layout():
    cfg = dit_config_from_state_dict(official_state_dict(**TINY))
    assert cfg == dict(dim=256, in_dim=16, out_dim=16, num_layers=2, ffn_dim=512, text_dim=64, freq_dim=256,
                       num_heads=2, eps=1e-6)


def test_config_errors_name_keys():
    sd = official_state_dict(**TINY)
    with pytest.raises(WeightsError, match="patch_embedding.weight"):
        dit_config_from_state_dict({k: v for k, v in sd.items() if k != "patch_embedding.weight"})
    with pytest.raises(WeightsError, match="multiple of the head size 128"):
        dit_config_from_state_dict(official_state_dict(dim=192, blocks=1, ffn=64, text=8, freq=16))
    gap = {k: v for k, v in sd.items() if not k.startswith("blocks.0.")}
    with pytest.raises(WeightsError, match=r"blocks \[0\]"):
        dit_config_from_state_dict(gap)


def test_loading_reports_missing_unexpected_and_misshapen_keys():
    sd = official_state_dict(**TINY)
    cfg = dit_config_from_state_dict(sd)
    bad = dict(sd)
    del bad["blocks.1.cross_attn.norm_k.weight"]
    bad["blocks.1.extra.weight"] = torch.zeros(1)
    bad["blocks.0.modulation"] = torch.zeros(1, 5, 256)
    with pytest.raises(WeightsError) as e:
        load_into(WanDiT(cfg, device="meta"), bad, "FlashVSR DiT", "bad.safetensors")
    msg = str(e.value)
    assert "blocks.1.cross_attn.norm_k.weight" in msg and "blocks.1.extra.weight" in msg
    assert "blocks.0.modulation" in msg


def test_layers_come_from_the_operations_namespace():
    made = []

    def recording(cls):
        class Recorded(cls):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                made.append(cls.__name__)
        return Recorded

    ops = SimpleNamespace(Linear=recording(nn.Linear), Conv3d=recording(nn.Conv3d), LayerNorm=recording(nn.LayerNorm))
    model = WanDiT(dit_config_from_state_dict(official_state_dict(**TINY)), operations=ops, device="meta")
    assert made.count("Conv3d") == 1 and made.count("LayerNorm") == 2 * 3 + 1
    assert made.count("Linear") == 2 + 2 + 1 + 2 * (4 + 4 + 2) + 1
    assert all(p.is_meta for p in model.parameters())


# --------------------------------------------------------------------------------------------------------------
# Constants and streaming
# --------------------------------------------------------------------------------------------------------------

def test_timestep_sinusoid_is_cos_then_sin():
    emb = timestep_sinusoid(256, 1000.0)
    i = torch.arange(128, dtype=torch.float64)
    angles = 1000.0 * 10000.0 ** (-i / 128)
    assert torch.allclose(emb.double(), torch.cat([angles.cos(), angles.sin()])[None], atol=1e-7)


def test_prepare_caches_modulation_and_cross_kv(tiny):
    model, prompt = tiny
    c = model.prepare(prompt)
    t = model.time_embedding(timestep_sinusoid(256, 1000.0))
    assert torch.allclose(c.t, t)
    assert c.t_mod.shape == (1, 6, 256)
    assert torch.allclose(c.block_mods[1][2], model.blocks[1].modulation[:, 2] + c.t_mod[:, 2])
    k, v = c.cross_kv[0]
    assert k.shape == v.shape == (2, 12, 128)
    ctx = model.text_embedding(prompt[0])
    assert torch.allclose(v, model.blocks[0].cross_attn.v(ctx).reshape(12, 2, 128).transpose(0, 1))


def run_stream(model, prompt, chunks, dtype=torch.float32, h8=32, w8=32, **kw):
    c = model.prepare(prompt, dtype=dtype)
    cache = model.new_cache()
    tokens = (h8 // 2) * (w8 // 2)
    frames = 6 + 2 * (chunks - 1)
    noise = latents(16, h8, w8, dtype=dtype)[:, :, :frames]
    lq = 0.1 * torch.randn(1, 16 * tokens, 256, generator=torch.Generator().manual_seed(3)).to(dtype)
    outs, slices = [], []
    for i in range(chunks):
        first, t_start = (0, 0) if i == 0 else (4 + 2 * i, 4 + 2 * i)
        n = 6 if i == 0 else 2
        x = noise[:, :, first:first + n]
        v = model.forward_chunk(x, lq[:, first * tokens:(first + n) * tokens], cache, t_start, c, **kw)
        assert v.shape == x.shape and v.dtype == dtype
        outs.append(v)
        slices.append(cache.slices)
    return outs, slices, cache


def test_streaming_chunks(tiny):
    model, prompt = tiny
    outs, slices, cache = run_stream(model, prompt, chunks=4, sparse_ratio=0.5, local_range=3, kv_ratio=3.0)
    assert all(torch.isfinite(o).all() for o in outs)
    assert slices == [3, 3, 3, 3] and cache.chunks == 4 and cache.grid == (16, 16)
    assert cache.blocks[1].k.shape == (2, 3 * 4, 128, 128)
    # Same chunks again from a fresh cache give the same result; a wrong grid is refused.
    again, _, _ = run_stream(model, prompt, chunks=2, sparse_ratio=0.5, local_range=3, kv_ratio=3.0)
    assert torch.equal(again[1], outs[1])
    with pytest.raises(ValueError, match="token grid"):
        model.forward_chunk(latents(2, 16, 32), None, cache, 12, model.prepare(prompt))


def test_each_lq_layer_adds_its_tokens_before_its_block(tiny):
    """The official adds LQ layer i's tokens before block i (for i below the layer count); the released files
    have one layer, added after the patch embedding, i.e. before block 0."""
    model, prompt = tiny
    assert len(model.blocks) >= 2
    c = model.prepare(prompt)
    x = latents(6)
    g = torch.Generator().manual_seed(4)
    t0, t1 = (0.3 * torch.randn(1, 6 * 16 * 16, 256, generator=g) for _ in range(2))

    def run(lq):
        return model.forward_chunk(x, lq, model.new_cache(), 0, c)

    one = run(t0)
    assert torch.equal(run([t0]), one) and torch.equal(run([t0, torch.zeros_like(t1)]), one)
    two = run([t0, t1])
    assert not torch.allclose(two, one)  # the second layer's tokens count
    assert not torch.allclose(two, run(t0 + t1))  # and go in before block 1, not block 0
    # the same as adding them by hand between block 0 and block 1
    seen = []
    block1 = model.blocks[1]
    real = block1.forward

    def forward(tokens, *args):
        seen.append(tokens)
        return real(tokens, *args)

    block1.forward = forward
    try:
        run([t0, t1])
        run(t0)
    finally:
        del block1.forward
    torch.testing.assert_close(seen[0] - seen[1], t1[0], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="sets of LQ tokens"):
        run([t0] * (len(model.blocks) + 1))


def test_streaming_chunk_uses_the_cache(tiny):
    model, prompt = tiny
    c = model.prepare(prompt)
    x0, x1 = latents(6), latents(2, seed=1)
    warm = model.new_cache()
    model.forward_chunk(x0, None, warm, 0, c)
    with_history = model.forward_chunk(x1, None, warm, 6, c)
    without = model.forward_chunk(x1, None, model.new_cache(), 6, c)
    assert not torch.allclose(with_history, without)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_smoke(tiny, dtype):
    model, prompt = tiny
    ref, _, _ = run_stream(model, prompt, chunks=2, h8=16, w8=32, kv_ratio=1.0)
    half = copy.deepcopy(model).to(dtype)
    got, slices, _ = run_stream(half, prompt, chunks=2, dtype=dtype, h8=16, w8=32, kv_ratio=1.0)
    assert slices == [2, 2]
    for g, r in zip(got, ref):
        assert torch.isfinite(g).all()
        assert (g.float() - r).abs().mean() < 0.05 * r.abs().mean()


def test_constants_must_match_device(tiny):
    model, prompt = tiny
    c = dataclasses.replace(model.prepare(prompt), device=torch.device("meta"))
    with pytest.raises(ValueError, match="prepared on meta"):
        model.forward_chunk(latents(6), None, model.new_cache(), 0, c)


# --------------------------------------------------------------------------------------------------------------
# Parity with diffusers' Wan2.1 transformer
# --------------------------------------------------------------------------------------------------------------

def _diffusers_to_wan_names() -> tuple[dict, dict]:
    """diffusers' module paths -> the original Wan2.1 ones (the inverse of diffusers' conversion of original
    checkpoints): top-level modules, and modules inside a block. Inside a block diffusers names the
    cross-attention's affine LayerNorm ``norm2`` where the original says ``norm3``; the two affine-free LayerNorms
    hold no tensors, so no other norm needs a name."""
    names = {
        "patch_embedding": "patch_embedding",
        "condition_embedder.time_embedder.linear_1": "time_embedding.0",
        "condition_embedder.time_embedder.linear_2": "time_embedding.2",
        "condition_embedder.time_proj": "time_projection.1",
        "condition_embedder.text_embedder.linear_1": "text_embedding.0",
        "condition_embedder.text_embedder.linear_2": "text_embedding.2",
        "proj_out": "head.head",
    }
    block = {"norm2": "norm3", "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2"}
    for d_attn, w_attn in (("attn1", "self_attn"), ("attn2", "cross_attn")):
        for d, w in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o"), ("norm_q", "norm_q"),
                     ("norm_k", "norm_k")):
            block[f"{d_attn}.{d}"] = f"{w_attn}.{w}"
    return names, block


def wan_state_dict_from_diffusers(sd: dict) -> dict:
    """Rename a diffusers WanTransformer3DModel state dict to the original Wan2.1 keys; unknown keys raise."""
    names, block = _diffusers_to_wan_names()
    out = {}
    for key, tensor in sd.items():
        if key == "scale_shift_table":
            new = "head.modulation"
        elif key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            if rest == "scale_shift_table":
                new = f"blocks.{index}.modulation"
            else:
                module, leaf = rest.rsplit(".", 1)
                new = f"blocks.{index}.{block[module]}.{leaf}"
        else:
            module, leaf = key.rsplit(".", 1)
            new = f"{names[module]}.{leaf}"
        out[new] = tensor
    return out


def local_token_mask(frames, rows, cols, local_range):
    """(tokens, tokens) bool: key token inside the local_range x local_range square of 8x8-token windows that
    starts local_range // 2 windows before the query's window on each axis, in every 2-frame slice (spec §1.4)."""
    _, r, c = torch.meshgrid(torch.arange(frames), torch.arange(rows), torch.arange(cols), indexing="ij")
    wr, wc = r.reshape(-1) // 8, c.reshape(-1) // 8
    lo_r, lo_c = wr - local_range // 2, wc - local_range // 2
    in_r = (wr[None] >= lo_r[:, None]) & (wr[None] < lo_r[:, None] + local_range)
    in_c = (wc[None] >= lo_c[:, None]) & (wc[None] < lo_c[:, None] + local_range)
    return in_r & in_c


def test_dit_matches_diffusers_wan_transformer():
    """The whole DiT (time/text embeddings, every block's modulation, norms, self-attention with RoPE,
    cross-attention, FFN, the head and unpatchify) against diffusers' WanTransformer3DModel with the same random
    weights, renamed to the original keys, on CPU in float32.

    Where FlashVSR differs from stock Wan by design, the comparison is arranged so both compute the same thing:

    * Timestep: FlashVSR's is fixed at 1000; diffusers is given 1000. Its sinusoid is computed in float32, which
      at t=1000 is up to 4e-5 off the float64 one of the official code (spec §1.1), enough to move the output by
      about 3e-5; so its sinusoid module is replaced by the spec's float64 formula (cos half, then sin half).
    * LQ conditioning: FlashVSR adds the LQ projection's tokens right after the patch embedding; diffusers has no
      such input, so a forward hook adds the same tokens to the output of its patch embedding.
    * Sparse attention: FlashVSR attends within a window-level selection that keeps only the tiles strictly more
      probable than the (budget+1)-th, so with every tile a candidate the least probable one is always dropped and
      fully dense attention is unreachable. With local_range 3 on a 2x3 grid of windows some key windows are
      outside the local square (probability 0) and the budget is larger than the candidates, so exactly the local
      tiles are kept; diffusers' own attention processor is given that local mask, built here from the spec.
    * Streaming: one 4-frame chunk (two slices) starting at temporal RoPE position 0 and an empty KV cache, the
      positions diffusers' RoPE uses. (RoPE is relative, so a constant offset of every position would not show
      here; the absolute positions are checked against the formula above.)
    * No image embedding (Wan2.1 T2V, as FlashVSR).
    """
    diffusers = pytest.importorskip("diffusers")
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    class MaskedSelfAttention:
        """diffusers' own processor, told the attention mask that its transformer does not pass."""

        def __init__(self, mask):
            self.inner, self.mask = WanAttnProcessor(), mask

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
            return self.inner(attn, hidden_states, encoder_hidden_states, self.mask, rotary_emb)

    class Float64Sinusoid(nn.Module):
        def forward(self, t):
            angles = t.double()[:, None] * 10000.0 ** (-torch.arange(128, dtype=torch.float64) / 128)
            return torch.cat([angles.cos(), angles.sin()], dim=1).float()

    frames, rows, cols, local_range = 4, 16, 24, 3
    with one_thread():
        ref = diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=16, out_channels=16,
            text_dim=64, freq_dim=256, ffn_dim=512, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6).eval()
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            # diffusers initialises norms to 1/0 and biases to 0: random values make each of them count
            for name, p in ref.named_parameters():
                if "norm" in name:
                    p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
                elif "scale_shift_table" in name:
                    p.copy_(0.5 * torch.randn(p.shape, generator=g))
                elif p.ndim == 1:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
        sd = wan_state_dict_from_diffusers(ref.state_dict())
        ours = load_into(WanDiT(dit_config_from_state_dict(sd), device="meta"), sd, "FlashVSR DiT", "diffusers")

        x = latents(frames, 2 * rows, 2 * cols, seed=6)
        prompt = torch.randn(1, 12, 64, generator=g)
        lq = 0.5 * torch.randn(1, frames * rows * cols, 256, generator=g)
        mask = local_token_mask(frames, rows, cols, local_range)
        assert 0 < mask.float().mean() < 1  # else every tile is a candidate and one would be dropped
        for blk in ref.blocks:
            blk.attn1.set_processor(MaskedSelfAttention(mask[None, None]))
        ref.condition_embedder.timesteps_proj = Float64Sinusoid()
        hook = ref.patch_embedding.register_forward_hook(
            lambda module, args, out: out + lq.reshape(1, frames, rows, cols, -1).permute(0, 4, 1, 2, 3))
        try:
            with torch.no_grad():
                want = ref(x, torch.tensor([1000.0]), prompt, return_dict=False)[0]
        finally:
            hook.remove()
        got = ours.forward_chunk(x, lq, ours.new_cache(), 0, ours.prepare(prompt), sparse_ratio=2.0,
                                 local_range=local_range)
    assert got.shape == want.shape == x.shape
    # Only float32 rounding differs (summation order, diffusers' float32 RoPE): about 2e-6 on outputs up to ~5.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
