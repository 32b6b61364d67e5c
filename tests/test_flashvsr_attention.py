"""FlashVSR's locality-constrained sparse attention against plain re-derivations of spec §1.3/§1.4: window order,
local mask, mask scoring and top-k budget (incl. the saturation quirk), exact tile-restricted attention with
empty query windows -> 0, and the KV-cache slice counts."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from streamvsr.models.flashvsr import attention as A

D = 128  # head dim; the window means, scores and kernels do not care, but keep the real one


# --------------------------------------------------------------------------------------------------------------
# Independent references
# --------------------------------------------------------------------------------------------------------------

def dense_reference(q, k, v, mask):
    """(heads, Nq, 128, D) attention with the block mask expanded to single tokens, float64, empty rows -> 0."""
    h, nq, blk, d = q.shape
    nk = k.shape[1]
    tok = mask.repeat_interleave(blk, 1).repeat_interleave(blk, 2)
    s = q.double().reshape(h, nq * blk, d) @ k.double().reshape(h, nk * blk, d).transpose(1, 2) / math.sqrt(d)
    s = s.masked_fill(~tok, -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p @ v.double().reshape(h, nk * blk, d)).reshape(h, nq, blk, d)


def spec_local_mask(rows, cols, local_range):
    m = torch.zeros(rows * cols, rows * cols, dtype=torch.bool)
    for qi in range(rows * cols):
        qr, qc = divmod(qi, cols)
        for ki in range(rows * cols):
            kr, kc = divmod(ki, cols)
            lo_r, lo_c = qr - local_range // 2, qc - local_range // 2
            m[qi, ki] = lo_r <= kr < lo_r + local_range and lo_c <= kc < lo_c + local_range
    return m


def spec_block_mask(q_w, k_w, heads, rows, cols, local_range, topk):
    """§1.4 step 3 written out: pool (activation dtype), score per head, -inf outside the local square in every key
    slice, float32 softmax over key windows, keep entries > the (budget+1)-th largest per (head, query slice)."""
    s = rows * cols
    local = spec_local_mask(rows, cols, local_range)
    qm, km = q_w.mean(dim=1), k_w.mean(dim=1)
    nq, nk = qm.shape[0], km.shape[0]
    out = torch.zeros(heads, nq, nk, dtype=torch.bool)
    d = qm.shape[1] // heads
    for h in range(heads):
        qh, kh = qm[:, h * d:(h + 1) * d], km[:, h * d:(h + 1) * d]
        scores = (qh @ kh.T / math.sqrt(d)).float()
        allowed = local.repeat(nq // s, nk // s)
        probs = torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1)
        for sl in range(nq // s):
            block = probs[sl * s:(sl + 1) * s]
            values = block.flatten().sort(descending=True).values
            budget = min(values.numel() - 1, topk)
            out[h, sl * s:(sl + 1) * s] = block > values[budget]
    return out


def random_windows(n, heads, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # A per-window offset makes window means differ clearly, as real activations do.
    x = torch.randn(n, 128, heads * D, generator=g) + 2 * torch.randn(n, 1, heads * D, generator=g)
    return x.to(dtype)


# --------------------------------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------------------------------

def test_partition_order_and_round_trip():
    f, r, c = 4, 16, 24
    fi, ri, ci = torch.meshgrid(torch.arange(f), torch.arange(r), torch.arange(c), indexing="ij")
    coords = torch.stack([fi, ri, ci], -1).reshape(-1, 3)
    w = A.partition(coords, f, r, c)
    assert w.shape == (f * r * c // 128, 128, 3)
    wr, wc = r // 8, c // 8
    for n in range(w.shape[0]):
        sl, rest = divmod(n, wr * wc)
        row, col = divmod(rest, wc)
        for j in (0, 1, 9, 63, 64, 127):
            df, rest = divmod(j, 64)
            dr, dc = divmod(rest, 8)
            assert w[n, j].tolist() == [2 * sl + df, 8 * row + dr, 8 * col + dc]
    assert torch.equal(A.unpartition(w, f, r, c), coords)


def test_grid_must_fit_windows():
    with pytest.raises(ValueError, match="multiple of 128"):
        A.check_grid(2, 12, 16)
    with pytest.raises(ValueError):
        A.check_grid(3, 8, 8)


# --------------------------------------------------------------------------------------------------------------
# Mask
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows,cols,local_range", [(3, 5, 3), (6, 7, 11), (8, 15, 11), (9, 9, 9), (5, 5, 4), (1, 1, 9)])
def test_local_mask_matches_spec(rows, cols, local_range):
    assert torch.equal(A.local_window_mask(rows, cols, local_range), spec_local_mask(rows, cols, local_range))


def test_local_mask_is_not_clamped_at_borders():
    m = A.local_window_mask(6, 6, 3)
    assert m[0].sum() == 4  # corner: 2x2 of the 3x3 square are inside the grid
    assert m[7].sum() == 9  # interior
    assert m[1].sum() == 6  # edge


def test_topk_budget_formula():
    assert A.topk_budget(2.0, 768, 1280) == 60 * 60 * 2 - 1
    assert A.topk_budget(2.0, 1024, 1920) == 120 * 120 - 1
    assert A.topk_budget(1.5, 768, 1408) == int(66 * 66 * (1.5 * 768 * 1280 / (768 * 1408))) - 1
    assert A.topk_budget(2.0, 128, 128) == 119
    with pytest.raises(ValueError):
        A.topk_budget(0.0, 768, 1280)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,cols,q_slices,k_slices,local_range,topk", [
    (3, 4, 1, 4, 3, 20), (3, 4, 3, 3, 3, 7), (4, 4, 1, 3, 5, 1000), (2, 3, 2, 3, 11, 0), (5, 3, 1, 2, 4, 12),
])
def test_block_mask_matches_spec(dtype, rows, cols, q_slices, k_slices, local_range, topk):
    s, heads = rows * cols, 2
    q_w = random_windows(s * q_slices, heads, dtype, seed=1)
    k_w = random_windows(s * k_slices, heads, dtype, seed=2)
    got = A.block_mask(q_w.mean(1), k_w.mean(1), heads, A.local_window_mask(rows, cols, local_range), topk)
    assert torch.equal(got, spec_block_mask(q_w, k_w, heads, rows, cols, local_range, topk))


def test_budget_is_exact_per_head_and_query_slice():
    rows, cols, heads, q_slices, k_slices = 6, 6, 3, 3, 3
    s = rows * cols
    topk = 20  # fewer than the 36 query windows of a slice, so some windows must get nothing
    m = A.block_mask(random_windows(s * q_slices, heads).mean(1), random_windows(s * k_slices, heads, seed=5).mean(1),
                     heads, A.local_window_mask(rows, cols, 3), topk)
    per_slice = m.reshape(heads, q_slices, s, -1).sum(dim=(2, 3))
    assert (per_slice == topk).all()
    # Global per slice, not per row: rows differ, and some rows get nothing.
    per_row = m.sum(-1)
    assert per_row.max() > per_row.float().mean() and (per_row == 0).any()


def test_saturation_quirk_drops_the_smallest_of_four():
    # 128x128 output: one window per slice, 4 key slices attended (kv_ratio 3), budget 119 clamps to 3.
    heads = 2
    topk = A.topk_budget(2.0, 128, 128)
    q_w, k_w = random_windows(1, heads), random_windows(4, heads, seed=3)
    m = A.block_mask(q_w.mean(1), k_w.mean(1), heads, A.local_window_mask(1, 1, 11), topk)
    assert m.shape == (heads, 1, 4)
    assert (m.sum(-1) == 3).all()
    scores = A.window_scores(q_w.mean(1), k_w.mean(1), heads)[:, 0]
    assert torch.equal(~m[:, 0], scores == scores.min(dim=-1, keepdim=True).values)


def test_budget_above_local_candidates_keeps_every_local_pair():
    rows, cols, heads = 5, 5, 2
    local = A.local_window_mask(rows, cols, 3)
    q_w, k_w = random_windows(25, heads), random_windows(75, heads, seed=4)
    m = A.block_mask(q_w.mean(1), k_w.mean(1), heads, local, topk=10_000)
    assert torch.equal(m, local.repeat(1, 3).expand(heads, -1, -1))


# --------------------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------------------

def qkv(heads, nq, nk, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(heads, n, 128, D, generator=g).to(dtype) for n in (nq, nk, nk))


@pytest.mark.parametrize("heads,nq,nk,density,gather_tokens", [
    (2, 6, 12, 0.3, A.DEFAULT_GATHER_TOKENS), (3, 4, 16, 0.15, 700), (1, 5, 5, 0.9, 128), (2, 8, 8, 0.05, 4096),
])
def test_block_sparse_attention_matches_dense_reference(heads, nq, nk, density, gather_tokens):
    q, k, v = qkv(heads, nq, nk)
    mask = torch.rand(heads, nq, nk, generator=torch.Generator().manual_seed(7)) < density
    mask[0, 1] = False  # at least one empty query window
    mask[-1, -1] = True  # and one full row
    got = A.block_sparse_attention(q, k, v, mask, gather_tokens)
    ref = dense_reference(q, k, v, mask)
    assert torch.allclose(got.double(), ref, atol=2e-5)
    assert (got[0, 1] == 0).all()


def test_block_sparse_attention_all_empty_and_half_precision():
    q, k, v = qkv(2, 3, 6)
    assert (A.block_sparse_attention(q, k, v, torch.zeros(2, 3, 6, dtype=torch.bool)) == 0).all()
    mask = torch.rand(2, 3, 6, generator=torch.Generator().manual_seed(1)) < 0.5
    for dtype in (torch.bfloat16, torch.float16):
        got = A.block_sparse_attention(q.to(dtype), k.to(dtype), v.to(dtype), mask)
        assert got.dtype == dtype
        assert torch.allclose(got.double(), dense_reference(q, k, v, mask), atol=3e-2)


def _require_block_mask():
    """The engine's block masks need BlockMask.from_kv_blocks(seq_lengths=...), from PyTorch 2.6 (its gate
    refuses FlexAttention before: ``flex_unavailable``)."""
    import inspect

    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    if "seq_lengths" not in inspect.signature(flex.BlockMask.from_kv_blocks).parameters:
        pytest.skip(f"this PyTorch ({torch.__version__}) builds no block mask with seq_lengths (2.6 and later do)")


def test_flex_path_matches_dense_reference():
    _require_block_mask()
    q, k, v = qkv(2, 2, 4, seed=3)
    mask = torch.rand(2, 2, 4, generator=torch.Generator().manual_seed(2)) < 0.4
    mask[1, 0] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex warns that it is unfused
        got = A.flex_block_sparse_attention(q, k, v, mask)
    assert torch.allclose(got.double(), dense_reference(q, k, v, mask), atol=2e-5)
    assert (got[1, 0] == 0).all()


def test_flex_block_structure_is_the_selection():
    """Compiled FlexAttention kernels (CUDA) read only the block structure, full tiles without calling mask_mod;
    eager flex, which the test above runs, reads only mask_mod. So the block structure is checked on its own: it
    holds exactly the selected (query window, key window) tiles, all as full tiles."""
    _require_block_mask()
    heads, nq, nk = 3, 4, 7
    q, k, v = qkv(heads, nq, nk, seed=5)
    mask = torch.rand(heads, nq, nk, generator=torch.Generator().manual_seed(4)) < 0.35
    mask[0, 2] = False  # an empty query window
    mask[2, 1] = True  # a full row
    seen = {}

    def kernel(q4, k4, v4, block_mask):  # stands in for the compiled flex_attention
        seen["block_mask"] = block_mask
        return torch.zeros_like(q4)

    A.flex_block_sparse_attention(q, k, v, mask, compiled=kernel)
    bm = seen["block_mask"]
    assert bm.BLOCK_SIZE == (128, 128) and bm.seq_lengths == (nq * 128, nk * 128)
    assert int(bm.kv_num_blocks.sum()) == 0  # no partial tiles
    full = torch.zeros(1, heads, nq, nk, dtype=torch.bool)
    for h in range(heads):
        for i in range(nq):
            n = int(bm.full_kv_num_blocks[0, h, i])
            full[0, h, i, bm.full_kv_indices[0, h, i, :n].long()] = True
    assert torch.equal(full[0], mask)
    assert torch.equal(bm.to_dense()[0].bool(), mask)


def _require_compiled_flex():
    """Skip only where plain torch.compile of flex_attention fails (no C++ compiler for Inductor, an unsupported
    build); it does not go through our wrapper, so a bug there still fails the test below."""
    from torch.nn.attention.flex_attention import flex_attention

    x = torch.randn(1, 1, 128, D, generator=torch.Generator().manual_seed(1))
    try:
        torch.compile(flex_attention, dynamic=False)(x, x, x)
    except Exception as e:  # noqa: BLE001 - whatever the toolchain raises
        pytest.skip(f"torch.compile of flex_attention is unavailable here: {type(e).__name__}: {e}"[:300])


def test_compiled_flex_is_not_limited_to_eight_shapes_and_never_falls_back_to_eager(monkeypatch):
    """Dynamo compiles flex_attention for at most recompile_limit shapes per process and then runs it eagerly
    (the whole score matrix); the engine's compiled flex raises the limit around its calls and, past its own
    limit, stops with an error instead of falling back. On the CPU (the engine compiles flex on CUDA only), with
    plain attention: Inductor's CPU template does not build the engine's block masks."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    import torch._dynamo

    _require_compiled_flex()
    torch._dynamo.reset()  # also drops the probe's graph, so the shape counts below are this test's own
    flex = A.compiled_flex_attention()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 128, D, generator=g)
    with torch._dynamo.config.patch(recompile_limit=1):  # as if other shapes had used it up
        # No except here: the probe showed flex compiles, so any error from our wrapper is a failure.
        for keys in (128, 256, 384):  # three key lengths: three graphs
            k, v = torch.randn(2, 1, 2, keys, D, generator=g)
            with warnings.catch_warnings():
                warnings.simplefilter("error", UserWarning)  # eager flex warns that it materialises the scores
                got = flex(q, k, v)
            assert torch.allclose(got, F.scaled_dot_product_attention(q, k, v), atol=1e-5)
        monkeypatch.setattr(A, "FLEX_RECOMPILE_LIMIT", 3)
        k, v = torch.randn(2, 1, 2, 512, D, generator=g)
        from streamvsr.models.shared.errors import SessionLimitError

        # one line for the command line (StreamVSRError), not a traceback
        with pytest.raises(SessionLimitError, match="compiled for 3 shapes.*'gather' attention"):
            flex(q, k, v)
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------------------------
# Streaming and the KV cache
# --------------------------------------------------------------------------------------------------------------

def stream(kv_ratio, chunks=5, rows=2, cols=2, heads=1, check_against_reference=False):
    """Run attend_streaming over a chunk of 3 slices then 1-slice chunks; return (attended, cached) slice counts."""
    s = rows * cols
    local = A.local_window_mask(rows, cols, 3)
    cache, counts = None, []
    for i in range(chunks):
        n = s * (3 if i == 0 else 1)
        q_w, k_w, v_w = (random_windows(n, heads, seed=10 * i + j) for j in range(3))
        held = cache.slices if cache is not None else 0
        out, new = A.attend_streaming(q_w, k_w, v_w, heads, cache, local, topk=10_000, kv_ratio=kv_ratio)
        attended = held + n // s
        if check_against_reference:
            keys = torch.cat([cache.k, k_w.reshape(n, 128, heads, D).permute(2, 0, 1, 3)], 1) if cache else None
            vals = torch.cat([cache.v, v_w.reshape(n, 128, heads, D).permute(2, 0, 1, 3)], 1) if cache else None
            if keys is None:
                keys = k_w.reshape(n, 128, heads, D).permute(2, 0, 1, 3)
                vals = v_w.reshape(n, 128, heads, D).permute(2, 0, 1, 3)
            assert keys.shape[1] == attended * s
            # The mask from the spec's own derivation, not A.block_mask, so the whole reference is independent.
            mask = spec_block_mask(q_w, keys.permute(1, 2, 0, 3).reshape(-1, 128, heads * D), heads, rows, cols, 3,
                                   10_000)
            ref = dense_reference(q_w.reshape(n, 128, heads, D).permute(2, 0, 1, 3), keys, vals, mask)
            assert torch.allclose(out.double(), ref.permute(1, 2, 0, 3).reshape(n, 128, heads * D), atol=2e-5)
        counts.append((attended, new.slices))
        cache = new
    return counts


# Steady state: the slices held (int(kv_ratio), but at least 2, as one chunk drops at most one slice) plus the
# new one are attended, then the oldest is dropped.
@pytest.mark.parametrize("kv_ratio,steady_attended", [(1.0, 3), (2.0, 3), (2.5, 3), (2.99, 3), (3.0, 4), (4.0, 5)])
def test_kv_cache_slice_counts(kv_ratio, steady_attended):
    counts = stream(kv_ratio, chunks=6)
    kv_len = int(kv_ratio)
    assert counts[0] == (3, 3 if 3 <= kv_len else 2)
    assert counts[-1] == (steady_attended, steady_attended - 1)


def test_kv_cache_attends_before_dropping():
    # With kv_ratio 3 chunk 1 attends 4 slices (the oldest is dropped only afterwards); checked against the dense
    # reference over exactly those keys.
    assert stream(3.0, chunks=3, check_against_reference=True)[1] == (4, 3)


def test_kv_cache_keeps_post_rope_keys_and_means():
    rows = cols = 2
    local = A.local_window_mask(rows, cols, 3)
    q_w, k_w, v_w = (random_windows(12, 2, seed=j) for j in range(3))
    _, cache = A.attend_streaming(q_w, k_w, v_w, 2, None, local, 100, kv_ratio=1.0)
    assert cache.slices == 2 and cache.windows_per_slice == 4
    assert torch.equal(cache.k, k_w[4:].reshape(8, 128, 2, D).permute(2, 0, 1, 3))
    assert torch.equal(cache.v, v_w[4:].reshape(8, 128, 2, D).permute(2, 0, 1, 3))
    assert torch.equal(cache.k_mean, k_w[4:].mean(1))
    with pytest.raises(ValueError, match="slices of 4 windows"):
        A.attend_streaming(q_w[:9], k_w[:9], v_w[:9], 2, cache, A.local_window_mask(3, 3, 3), 100, 1.0)


def test_the_block_mask_compiles_with_inductor():
    """The GPU compiles FlexAttention with Triton, which no test here can run; Inductor's CPU template compiles the
    same block mask. Handed the full tiles' list as the partial tiles' too, it generated code that did not compile:
    a block mask that a compiler cannot take is found here, not on a lent GPU."""
    _require_block_mask()
    torch.manual_seed(0)
    heads, nq, nk, blk, d = 2, 3, 4, 128, 64
    q, k, v = (torch.randn(heads, n, blk, d) for n in (nq, nk, nk))
    mask = torch.rand(heads, nq, nk) > 0.5
    mask[:, 0] = False  # a query block with no key block: zeros
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex warns that it is unfused
        eager = A.flex_block_sparse_attention(q, k, v, mask)
    got = A.flex_block_sparse_attention(q, k, v, mask, compiled=A.compiled_flex_attention())
    assert (got - eager).abs().max() < 1e-5
