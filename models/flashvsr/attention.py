"""FlashVSR's locality-constrained sparse self-attention (LCSA), exact, in plain PyTorch.

Tokens are grouped into 3-D windows of (2 latent frames x 8 rows x 8 columns) = 128 tokens, one 128x128 tile of
the official block-sparse kernel. A *slice* is one temporal row of windows (S = rows/8 * cols/8 windows). Per
head, a window-level score decides which (query window, key window) tiles are computed; attention inside the
chosen tiles is ordinary softmax attention over all their keys together, and a query window with no chosen tile
outputs zeros (what the official kernel writes).

Selection, as the official code does it (spec §1.4; the arithmetic order matters for ties):

* q and k are mean-pooled over each window **in the activation dtype**, split into heads, and scored
  ``q̄·k̄ / sqrt(head_dim)`` still in that dtype;
* a spatial mask of side ``local_range`` centred on the query window (not clamped at the borders, the same for
  every key slice) is added as 0/-inf in float32, and a float32 softmax runs over all key windows;
* for every (head, query slice) the S x K probabilities are flattened and the entries strictly greater than the
  (budget+1)-th largest are kept, budget = min(S*K - 1, topk), topk = int(S*S * sparse_ratio*768*1280/(H*W)) - 1.

The KV cache (:class:`BlockKV`) keeps the post-RoPE keys/values of the last slices per block; see
:func:`attend_streaming` for the append / attend / drop order.
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..shared.errors import SessionLimitError, UserInputError, first_line
from ..shared.runtime import concrete_device, is_out_of_memory, recompile_limit, recompile_limit_hit

log = logging.getLogger(__name__)

WINDOW = (2, 8, 8)
BLOCK = WINDOW[0] * WINDOW[1] * WINDOW[2]  # 128 tokens, the kernel's tile side
# The resolution FlashVSR's sparsity was tuned at: the budget is scaled by (768*1280)/(H*W).
REFERENCE_PIXELS = (768, 1280)
# Keys gathered per step of the gather path (per step K and V each take this many tokens x head_dim values).
DEFAULT_GATHER_TOKENS = 1 << 21


# ---------------------------------------------------------------------------------------------------------------
# Window partition
# ---------------------------------------------------------------------------------------------------------------

def check_grid(frames: int, rows: int, cols: int) -> None:
    wf, wh, ww = WINDOW
    if frames % wf or rows % wh or cols % ww:
        raise ValueError(f"token grid {frames}x{rows}x{cols} (frames x rows x cols) is not divisible by the "
                         f"{wf}x{wh}x{ww} attention window: the latent needs an even frame count and an output "
                         f"size that is a multiple of 128 pixels")


def partition(x: torch.Tensor, frames: int, rows: int, cols: int) -> torch.Tensor:
    """(frames*rows*cols, C) tokens in (frame, row, col) order -> (windows, 128, C).

    Windows are ordered (slice, window row, window column), tokens inside one (frame, row, col).
    """
    wf, wh, ww = WINDOW
    c = x.shape[-1]
    x = x.reshape(frames // wf, wf, rows // wh, wh, cols // ww, ww, c)
    return x.permute(0, 2, 4, 1, 3, 5, 6).reshape(-1, BLOCK, c)


def unpartition(windows: torch.Tensor, frames: int, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`partition`: (windows, 128, C) -> (frames*rows*cols, C)."""
    wf, wh, ww = WINDOW
    c = windows.shape[-1]
    x = windows.reshape(frames // wf, rows // wh, cols // ww, wf, wh, ww, c)
    return x.permute(0, 3, 1, 4, 2, 5, 6).reshape(frames * rows * cols, c)


# ---------------------------------------------------------------------------------------------------------------
# Block mask
# ---------------------------------------------------------------------------------------------------------------

def local_window_mask(window_rows: int, window_cols: int, local_range: int, device=None) -> torch.Tensor:
    """(S, S) bool, S = window_rows*window_cols: key window within the local_range x local_range square that
    starts ``local_range // 2`` before the query window on each axis. Not clamped, so border windows have fewer
    candidates; an even ``local_range`` reaches one further back than forward, as in the official code."""
    if local_range < 1:
        raise ValueError(f"local_range must be >= 1, got {local_range}")
    r = torch.arange(window_rows, device=device).repeat_interleave(window_cols)
    c = torch.arange(window_cols, device=device).repeat(window_rows)
    lo_r, lo_c = r - local_range // 2, c - local_range // 2
    in_r = (r[None, :] >= lo_r[:, None]) & (r[None, :] <= lo_r[:, None] + local_range - 1)
    in_c = (c[None, :] >= lo_c[:, None]) & (c[None, :] <= lo_c[:, None] + local_range - 1)
    return in_r & in_c


def topk_budget(sparse_ratio: float, height: int, width: int) -> int:
    """Tiles kept per (head, query slice) for an output of height x width pixels (the official formula and
    float evaluation order, including the trailing -1)."""
    windows = 2 * (height // 16) * (width // 16) // BLOCK
    ratio = sparse_ratio * REFERENCE_PIXELS[0] * REFERENCE_PIXELS[1] / (height * width)
    topk = int(windows * windows * ratio) - 1
    if topk < 0:
        least = height * width / (windows * windows * REFERENCE_PIXELS[0] * REFERENCE_PIXELS[1])
        step = 10.0 ** (math.floor(math.log10(least)) - 2)  # three significant digits, rounded up
        raise UserInputError(f"sparse_ratio {sparse_ratio} leaves no attention budget at a {width}x{height} output "
                             f"(padded): use at least {math.ceil(least / step * (1 + 1e-9)) * step:.3g} (official "
                             "2.0)")
    return topk


def window_scores(q_mean: torch.Tensor, k_mean: torch.Tensor, heads: int) -> torch.Tensor:
    """(heads, Nq, Nk) scores of window means (Nq, C) and (Nk, C), in their dtype, as the official code."""
    qh = q_mean.unflatten(-1, (heads, -1)).transpose(0, 1)
    kh = k_mean.unflatten(-1, (heads, -1)).transpose(0, 1)
    return torch.matmul(qh, kh.transpose(1, 2)) / math.sqrt(qh.shape[-1])


def block_mask(q_mean: torch.Tensor, k_mean: torch.Tensor, heads: int, local_mask: torch.Tensor,
               topk: int) -> torch.Tensor:
    """Which 128x128 tiles to compute: bool (heads, Nq, Nk).

    ``q_mean`` (Nq, C) and ``k_mean`` (Nk, C) are the per-window means of the query and key windows (Nq and Nk
    whole slices of S = local_mask.shape[0] windows; keys oldest slice first). ``topk`` from :func:`topk_budget`.
    """
    s = local_mask.shape[0]
    nq, nk = q_mean.shape[0], k_mean.shape[0]
    if nq % s or nk % s:
        raise ValueError(f"{nq} query / {nk} key windows are not whole slices of {s} windows")
    q_slices, k_slices = nq // s, nk // s
    bias = torch.zeros(local_mask.shape, dtype=torch.float32, device=local_mask.device)
    bias.masked_fill_(~local_mask, -math.inf)
    bias = bias.repeat(q_slices, k_slices)
    probs = torch.softmax(window_scores(q_mean, k_mean, heads).float() + bias, dim=-1)
    flat = probs.reshape(heads * q_slices, s * nk)
    keep = min(flat.shape[1] - 1, topk) + 1
    threshold = torch.topk(flat, k=keep, dim=1).values[:, -1:]
    return (flat > threshold).reshape(heads, nq, nk)


# ---------------------------------------------------------------------------------------------------------------
# Exact block-sparse attention
# ---------------------------------------------------------------------------------------------------------------

def _pair_groups(counts: list[int], budget: int) -> list[tuple[int, int]]:
    """Split pairs sorted by descending tile count into [start, end) runs whose padded gather fits ``budget``
    tiles (at least one pair per run)."""
    groups, start, n = [], 0, len(counts)
    while start < n:
        width = counts[start]
        end = min(n, start + max(1, budget // width))
        groups.append((start, end))
        start = end
    return groups


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                           gather_tokens: int = DEFAULT_GATHER_TOKENS) -> torch.Tensor:
    """Softmax attention restricted to the selected 128x128 tiles; query windows with none give zeros.

    ``q`` (heads, Nq, 128, D), ``k``/``v`` (heads, Nk, 128, D), ``mask`` bool (heads, Nq, Nk); returns
    (heads, Nq, 128, D). For each (head, query window) the selected key windows are gathered and attended with
    SDPA (scale 1/sqrt(D)); pairs are processed longest first in groups of about ``gather_tokens`` gathered keys,
    so memory stays bounded whatever the sparsity.
    """
    heads, nq, blk, d = q.shape
    nk = k.shape[1]
    out = torch.zeros_like(q)
    counts = mask.sum(-1).reshape(-1)
    order = torch.argsort(counts, descending=True, stable=True)
    sorted_counts = counts[order].tolist()
    active = next((i for i, c in enumerate(sorted_counts) if c == 0), len(sorted_counts))
    if active == 0:
        return out
    order = order[:active]
    # Selected key windows first, ascending, per pair; offset into the head-flattened key blocks.
    rows = mask.reshape(heads * nq, nk)[order]
    picks = torch.argsort((~rows).to(torch.int8), dim=1, stable=True)
    picks = picks + (order // nq)[:, None] * nk
    q_flat = q.reshape(heads * nq, blk, d)
    k_flat = k.reshape(heads * nk, blk, d)
    v_flat = v.reshape(heads * nk, blk, d)
    out_flat = out.view(heads * nq, blk, d)
    for start, end in _pair_groups(sorted_counts[:active], max(1, gather_tokens // blk)):
        width = sorted_counts[start]
        idx = picks[start:end, :width]
        # 4-D (batch, 1 head, tokens, D): the fused CUDA kernels refuse 3-D inputs.
        kg = k_flat[idx].reshape(end - start, 1, width * blk, d)
        vg = v_flat[idx].reshape(end - start, 1, width * blk, d)
        attn_mask = None
        if sorted_counts[end - 1] != width:
            # Past its count a row's picks are unselected windows: gathered as padding, masked out.
            valid = torch.arange(width, device=mask.device)[None, :] < counts[order[start:end]][:, None]
            attn_mask = valid.repeat_interleave(blk, dim=1)[:, None, None, :]
        out_flat[order[start:end]] = F.scaled_dot_product_attention(
            q_flat[order[start:end]][:, None], kg, vg, attn_mask=attn_mask)[:, 0]
    return out


# Dynamo keeps one set of compiled graphs for flex_attention's code, shared by every torch.compile of it in the
# process, and compiles at most ``recompile_limit`` (8) shapes before it runs the function eagerly: for
# FlexAttention that is the whole score matrix (tens of GB at a 1080p output). A frame size takes two or three
# shapes (the first chunk's and the later chunks' key lengths), so 8 are used up after a few sizes in one session.
FLEX_RECOMPILE_LIMIT = 64


class FlexCompileError(RuntimeError):
    """The compiled FlexAttention failed to compile or run; the gather attention computes the same."""


def flex_unavailable(device) -> str | None:
    """Why the compiled FlexAttention cannot run on ``device``, or None when it can: it is compiled by Triton for
    CUDA GPUs, with PyTorch features of recent releases."""
    if torch.device(device).type != "cuda":
        return "it is compiled for CUDA GPUs only"
    try:
        from torch import _dynamo
        from torch.nn.attention.flex_attention import BlockMask
        from torch.utils._triton import has_triton
    except ImportError:
        return f"this PyTorch ({torch.__version__}) has no FlexAttention"
    needs = (hasattr(_dynamo.config, "recompile_limit") and hasattr(_dynamo.config, "fail_on_recompile_limit_hit")
             and hasattr(_dynamo.exc, "FailOnRecompileLimitHit")
             and "seq_lengths" in inspect.signature(BlockMask.from_kv_blocks).parameters)
    if not needs:
        return f"this PyTorch ({torch.__version__}) lacks parts of it that the engine uses"
    if not has_triton():
        return "Triton is not installed for this GPU (ComfyUI's Windows portable build has none)"
    capability = None if torch.version.hip else torch.cuda.get_device_capability(device)
    if capability is not None and capability < (7, 0):  # has_triton() is content with any capable GPU there
        return f"this GPU (compute capability {capability[0]}.{capability[1]}) is older than Triton's 7.0"
    failed = flex_failure(device)
    if failed is not None:
        return f"it failed earlier in this session ({failed})"
    return None


def choose_attention(choice: str, device) -> str:
    """The attention for ``choice``: "auto" takes the compiled FlexAttention where it can run (CUDA with Triton),
    else gather; "flex" where it cannot is a one-line error (eager FlexAttention would hold the whole score
    matrix); "gather" is taken as it is."""
    if choice not in ("auto", "gather", "flex"):
        raise UserInputError(f"attention must be auto, gather or flex, got {choice!r}")
    reason = None if choice == "gather" else flex_unavailable(device)
    if choice == "flex" and reason is not None:
        raise UserInputError(f"attention 'flex' cannot be used here: {reason}. Choose 'gather' (the same result) "
                             "or 'auto'")
    if choice == "auto":
        if reason is not None and torch.device(device).type == "cuda":
            log.info("FlashVSR: gather attention (FlexAttention is unavailable: %s)", reason)
        return "gather" if reason is not None else "flex"
    return choice


# device -> why the compiled FlexAttention failed there in this process: later engines take the gather attention at
# once instead of failing (and warning) again
_FLEX_FAILED: dict[str, str] = {}


def record_flex_failure(device, reason: str) -> None:
    _FLEX_FAILED[str(concrete_device(device))] = reason


def flex_failure(device) -> str | None:
    """Why the compiled FlexAttention failed on ``device`` earlier in this process, or None."""
    return _FLEX_FAILED.get(str(concrete_device(device)))


def compiled_flex_attention():
    """``torch.compile``-d ``flex_attention`` (static shapes) that compiles up to ``FLEX_RECOMPILE_LIMIT`` shapes,
    and past that raises an error that says what to do instead of silently falling back to eager attention.
    The limits are raised only around its own calls. A failure to compile raises ``FlexCompileError``."""
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)

    def run(*args, **kwargs):
        try:
            with recompile_limit(FLEX_RECOMPILE_LIMIT):
                return compiled(*args, **kwargs)
        except recompile_limit_hit():
            limit = max(FLEX_RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)
            raise SessionLimitError(f"FlexAttention has been compiled for {limit} shapes in this process (each frame "
                                    "size and kv_ratio takes two or three); restart it, or use the 'gather' "
                                    "attention, which needs no compiling") from None
        except Exception as e:  # noqa: BLE001 - the compiler's (Triton, Inductor); the gather path tells input errors
            if is_out_of_memory(e):
                raise
            raise FlexCompileError(f"{type(e).__name__}: {first_line(e)}") from e

    return run


def flex_block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                                compiled=None) -> torch.Tensor:
    """The same computation through FlexAttention with a 128-token BlockMask of full tiles.

    Shapes as :func:`block_sparse_attention`. ``compiled`` is an optional ``torch.compile``-d ``flex_attention``
    (what makes it fast on CUDA); eager (the default) materialises the scores and is only meant for checking.
    Empty query windows are zeroed here rather than trusting the backend.
    """
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    heads, nq, blk, d = q.shape
    nk = k.shape[1]
    m = mask[None]
    counts = m.sum(-1).to(torch.int32)
    indices = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    empty = torch.zeros_like(counts)
    # No tile is partial: their list is never read, but must be a tensor of its own (given the full tiles' list,
    # Inductor's CPU template generated code that did not compile)
    no_partial = torch.zeros_like(indices)

    # Every selected tile is a full tile, which compiled kernels compute without calling mask_mod; eager flex
    # ignores the block structure and only applies mask_mod, so it has to carry the selection too.
    def selected(b, h, q_idx, kv_idx):
        return mask[h, q_idx // blk, kv_idx // blk]

    block_mask = BlockMask.from_kv_blocks(empty, no_partial, counts, indices, BLOCK_SIZE=blk, mask_mod=selected,
                                          seq_lengths=(nq * blk, nk * blk))
    fn = compiled or flex_attention
    out = fn(q.reshape(1, heads, nq * blk, d), k.reshape(1, heads, nk * blk, d), v.reshape(1, heads, nk * blk, d),
             block_mask=block_mask)
    out = out.reshape(heads, nq, blk, d)
    return out.masked_fill((counts[0] == 0)[..., None, None], 0)


# ---------------------------------------------------------------------------------------------------------------
# Streaming KV cache
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class BlockKV:
    """One block's self-attention cache: post-RoPE keys and values of the most recent slices, oldest first.

    ``k``/``v``: (heads, windows, 128, head_dim); ``k_mean``: (windows, C), each key window's mean in the
    activation dtype (what the mask scores use; equal to re-pooling the cached keys).
    """

    k: torch.Tensor
    v: torch.Tensor
    k_mean: torch.Tensor
    windows_per_slice: int

    @property
    def slices(self) -> int:
        return self.k.shape[1] // self.windows_per_slice


def kept_slices(kv_ratio: float) -> int:
    """The official ``kv_len = int(kv_ratio)``: after a chunk, one slice is dropped if more than this are held."""
    kv_len = int(kv_ratio)
    if kv_len < 0:
        raise ValueError(f"kv_ratio must be >= 0, got {kv_ratio}")
    return kv_len


def attend_streaming(q_w: torch.Tensor, k_w: torch.Tensor, v_w: torch.Tensor, heads: int,
                     cache: BlockKV | None, local_mask: torch.Tensor, topk: int, kv_ratio: float,
                     backend: str = "gather", gather_tokens: int = DEFAULT_GATHER_TOKENS,
                     compiled_flex=None) -> tuple[torch.Tensor, BlockKV]:
    """LCSA for one chunk of one block, with its KV cache.

    ``q_w``/``k_w``/``v_w``: (windows, 128, C) current-chunk windows (post-RoPE q and k). The current windows are
    appended to ``cache``, the queries attend over cache + current, and then, if the slices held exceed
    ``int(kv_ratio)``, exactly one (the oldest) slice is dropped. Returns the (windows, 128, C) output and the
    new cache (``cache`` itself is not modified).
    """
    s = local_mask.shape[0]
    n, blk, c = q_w.shape
    d = c // heads
    q_mean, k_mean = q_w.mean(dim=1), k_w.mean(dim=1)
    qh = q_w.reshape(n, blk, heads, d).permute(2, 0, 1, 3).contiguous()
    kh = k_w.reshape(n, blk, heads, d).permute(2, 0, 1, 3)
    vh = v_w.reshape(n, blk, heads, d).permute(2, 0, 1, 3)
    if cache is not None:
        if cache.windows_per_slice != s:
            raise ValueError(f"KV cache holds slices of {cache.windows_per_slice} windows, this chunk has {s}")
        kh = torch.cat([cache.k, kh], dim=1)
        vh = torch.cat([cache.v, vh], dim=1)
        k_mean = torch.cat([cache.k_mean, k_mean], dim=0)
    else:
        kh, vh = kh.contiguous(), vh.contiguous()
    mask = block_mask(q_mean, k_mean, heads, local_mask, topk)
    if backend == "gather":
        out = block_sparse_attention(qh, kh, vh, mask, gather_tokens)
    elif backend == "flex":
        out = flex_block_sparse_attention(qh, kh, vh, mask, compiled_flex)
    else:
        raise ValueError(f"unknown attention backend {backend!r} (use 'gather' or 'flex')")
    del qh, mask
    if kh.shape[1] // s > kept_slices(kv_ratio):
        # Copies, so the dropped slice's memory is released rather than kept alive by a view.
        kh, vh, k_mean = kh[:, s:].clone(), vh[:, s:].clone(), k_mean[s:].clone()
    new_cache = BlockKV(kh, vh, k_mean, s)
    return out.permute(1, 2, 0, 3).reshape(n, blk, c), new_cache
