"""Streaming FlashVSR inference with an explicit state: LR frames in, finished frames out, chunk by chunk.

The official tiny-long pipeline, restated as a stream (``frames.py`` has the frame arithmetic): the DiT runs on
chunks of latent frames (6, then 2 at a time), each needing LR frames up to 4 past the last frame it finishes, so
output lags input and comes in bursts of 21, then 8 frames. ``FlashVSRState`` holds everything carried between
calls: the conditioning frames not yet used up, the LQ projection's conv memory, the DiT's KV caches, the TC
decoder's memory, the noise generator and the counters. Memory is flat in the number of frames, and a sequence fed
in any split gives the same frames.

Noise: latent frame j gets the j-th (1, 16, 1, H/8, W/8) float32 standard-normal draw of a CPU generator seeded with
the seed (H, W the padded output size), cast to the compute dtype. The official draws the whole video's noise at
once on the GPU in bf16, which depends on the video's length and the device; per-frame CPU draws reproduce on every
device and in any split.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..shared.errors import UserInputError
from ..shared.image import to_rgb
from ..shared.runtime import check_finite, checksum, concrete_device
from .attention import (BlockKV, FlexCompileError, compiled_flex_attention, flex_failure, kept_slices,
                        record_flex_failure, topk_budget)
from .color import METHODS as COLOR_FIXES
from .color import color_fix
from .dit import StreamCache, WanDiT
from .frames import (chunk, chunks_ready, num_chunks, output_size, pad_to, padded_size, quantize_8bit,
                     stream_length, upscale_frame)
from .lq_proj import LQProjection, LQProjState
from .tc_decoder import TCDecoder, TCDecoderState

log = logging.getLogger(__name__)

LATENT_STRIDE = 8  # output pixels per latent pixel


class FlashVSRPipeline(nn.Module):
    """The loaded FlashVSR model as one module (so ComfyUI's ModelPatcher can manage it): DiT, LQ projection,
    TC decoder and the fixed prompt embedding, plus the release version that decides the LQ arithmetic."""

    def __init__(self, dit: WanDiT, lq_proj: LQProjection, tc_decoder: TCDecoder, prompt: torch.Tensor,
                 version: str, facts: dict | None = None):
        super().__init__()
        self.dit, self.lq_proj, self.tc_decoder = dit, lq_proj, tc_decoder
        self.register_buffer("prompt", prompt.detach().clone())
        self.version = version
        self.facts = dict(facts or {})

    @property
    def dtype(self) -> torch.dtype:
        return next(self.dit.parameters()).dtype


@dataclass(frozen=True)
class FlashVSRState:
    """Everything carried from one call to the next (see the module docstring).

    frame_index: LR frames pushed in this sequence; emitted: output frames returned so far.
    lr_size: (h, w) of this sequence's frames. cond: the conditioning frames [cond_start, frame_index) that later
    chunks still need, (3, n, H, W) in [-1, 1] in the compute dtype (upscaled and padded), or None.
    chunks: DiT chunks run. lq, dit, decoder: the three networks' stream memories.
    generator_state: the CPU noise generator, positioned at the next latent frame's draw.
    """

    seed: int
    generator_state: torch.Tensor
    frame_index: int = 0
    emitted: int = 0
    lr_size: tuple[int, int] | None = None
    cond: torch.Tensor | None = None
    cond_start: int = 0
    chunks: int = 0
    lq: LQProjState = field(default_factory=LQProjState)
    dit: StreamCache | None = None
    decoder: TCDecoderState = field(default_factory=TCDecoderState)

    def to(self, device) -> "FlashVSRState":
        dit = None
        if self.dit is not None:
            blocks = [None if b is None else BlockKV(b.k.to(device), b.v.to(device), b.k_mean.to(device),
                                                     b.windows_per_slice) for b in self.dit.blocks]
            dit = StreamCache(blocks, self.dit.chunks, self.dit.grid)
        return replace(self, cond=None if self.cond is None else self.cond.to(device), lq=self.lq.to(device),
                       dit=dit, decoder=self.decoder.to(device))

    def to_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Tensors and string metadata for ``safetensors.torch.save_file`` (resume files)."""
        tensors = {"generator_state": self.generator_state.clone()}
        if self.cond is not None:
            tensors["cond"] = self.cond.contiguous()
        lq_t, lq_m = self.lq.to_dict()
        dec_t, dec_m = self.decoder.to_dict()
        tensors.update(lq_t)
        tensors.update(dec_t)
        blocks = []
        if self.dit is not None:
            for i, b in enumerate(self.dit.blocks):
                blocks.append(None if b is None else b.windows_per_slice)
                if b is not None:
                    tensors.update({f"dit.{i}.k": b.k.contiguous(), f"dit.{i}.v": b.v.contiguous(),
                                    f"dit.{i}.k_mean": b.k_mean.contiguous()})
        info = {"seed": self.seed, "frame_index": self.frame_index, "emitted": self.emitted,
                "lr_size": list(self.lr_size) if self.lr_size else None, "cond_start": self.cond_start,
                "chunks": self.chunks,
                "dit": None if self.dit is None else {"blocks": blocks, "chunks": self.dit.chunks,
                                                      "grid": list(self.dit.grid) if self.dit.grid else None}}
        return tensors, {"streamvsr_state": json.dumps(info), **lq_m, **dec_m}

    @classmethod
    def from_dict(cls, tensors: dict, meta: dict) -> "FlashVSRState":
        info = json.loads(meta["streamvsr_state"])
        dit = None
        if info["dit"] is not None:
            blocks = [None if s is None else BlockKV(tensors[f"dit.{i}.k"], tensors[f"dit.{i}.v"],
                                                     tensors[f"dit.{i}.k_mean"], int(s))
                      for i, s in enumerate(info["dit"]["blocks"])]
            grid = info["dit"]["grid"]
            dit = StreamCache(blocks, int(info["dit"]["chunks"]), tuple(grid) if grid else None)
        return cls(seed=int(info["seed"]), generator_state=tensors["generator_state"].clone(),
                   frame_index=int(info["frame_index"]), emitted=int(info["emitted"]),
                   lr_size=tuple(info["lr_size"]) if info["lr_size"] else None, cond=tensors.get("cond"),
                   cond_start=int(info["cond_start"]), chunks=int(info["chunks"]),
                   lq=LQProjState.from_dict(tensors, meta), dit=dit, decoder=TCDecoderState.from_dict(tensors, meta))


def check_size(h: int, w: int, scale: int = 4, sparse_ratio: float = 2.0, **_options) -> None:
    """A one-line error when these options cannot upscale LR frames of h x w: a sparse_ratio that leaves no
    attention budget at that size. Needs no weights, so callers run it before loading them."""
    topk_budget(sparse_ratio, *padded_size(*output_size(h, w, scale)))


def held_back(state: FlashVSRState) -> int:
    """Frames pushed into ``state``'s sequence and not yet returned (the engine's ``pending``)."""
    return state.frame_index - state.emitted


def new_state(seed: int) -> FlashVSRState:
    generator = torch.Generator("cpu")
    generator.manual_seed(int(seed))
    return FlashVSRState(seed=int(seed), generator_state=generator.get_state())


class FlashVSREngine:
    """Runs FlashVSR as a stream (the engine contract of ``models/contract.py``).

    scale: output/input side ratio (the model is trained for 4). sparse_ratio, local_range, kv_ratio: the official
    attention settings (budget of attended key blocks, local window in 8x8-token blocks, latent slices of KV memory:
    ``int(kv_ratio)`` as the official). color_fix: "adain" (official default), "wavelet" or "none".
    attention: "gather" (per-query-block gather + SDPA, bounded memory, any device) or "flex" (FlexAttention block
    masks; compiled on CUDA; if that fails, a warning and gather, also for later engines on that device in this
    process). latent_sink: optional callable receiving each chunk's latents (see ``__init__``).
    """

    def __init__(self, pipeline: FlashVSRPipeline, device=None, compute_dtype: torch.dtype | None = None,
                 scale: int = 4, sparse_ratio: float = 2.0, local_range: int = 11, kv_ratio: float = 3.0,
                 color_fix: str = "adain", attention: str = "gather", latent_sink=None):
        if int(scale) != scale or not 1 <= scale <= 8:
            raise UserInputError(f"scale must be a whole number from 1 to 8 (the model is trained for 4), got {scale}")
        if not sparse_ratio > 0:
            raise UserInputError(f"sparse_ratio must be positive (official 2.0), got {sparse_ratio}")
        if int(local_range) != local_range or local_range < 1:
            raise UserInputError(f"local_range must be a positive whole number (official 9 or 11), got {local_range}")
        if not kv_ratio >= 1:
            raise UserInputError(f"kv_ratio must be at least 1 (official 3.0), got {kv_ratio}")
        if color_fix not in COLOR_FIXES:
            raise UserInputError(f"color_fix must be one of {', '.join(COLOR_FIXES)}, got {color_fix!r}")
        if attention not in ("gather", "flex"):
            raise UserInputError(f"attention must be 'gather' or 'flex', got {attention!r}")
        self.pipeline = pipeline
        # concrete ("cuda" -> "cuda:0"), as the tensors it compares with report theirs
        self.device = concrete_device(device) if device is not None else next(pipeline.dit.parameters()).device
        self.compute_dtype = compute_dtype or pipeline.dtype
        self.scale = int(scale)
        self.sparse_ratio, self.local_range, self.kv_ratio = float(sparse_ratio), int(local_range), float(kv_ratio)
        self.color_fix, self.attention = color_fix, attention
        self._constants = None
        self._compiled_flex = None
        # Optional, for decoding with the Wan 2.1 VAE instead of the TC decoder (the ComfyUI LATENT output):
        # called with each chunk's normalised latents (1, 16, t, H/8, W/8), compute dtype, on the device, in
        # stream order (a flush's chunks included, which cover the padded frames too). Not part of the state.
        self.latent_sink = latent_sink

    # ------------------------------------------------------------------ the engine contract (see models/contract.py)

    def new_state(self, seed: int) -> FlashVSRState:
        return new_state(seed)

    def pending(self, state: FlashVSRState) -> int:
        return held_back(state)

    def check_size(self, h: int, w: int) -> None:
        check_size(h, w, self.scale, self.sparse_ratio)

    @torch.inference_mode()
    def push(self, state: FlashVSRState, frames: torch.Tensor,
             consume: bool = False) -> tuple[torch.Tensor, FlashVSRState]:
        """LR frames (n, C, h, w) or (C, h, w) in [0, 1], C in 1/3/4 -> the output frames that became final,
        (m, 3, scale*h, scale*w) float32 in [0, 1] on the engine's device (m = 0 until a chunk is complete).
        ``consume``: the caller gives ``state`` up (see ``models/contract.py``): each DiT block's KV cache is then
        let go as soon as its successor exists, so one cache is held instead of two (the old one stays whole
        otherwise, as ``state`` must)."""
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4:
            raise UserInputError(f"expected frames shaped (n, 3, h, w), got {tuple(frames.shape)}")
        frames = to_rgb(frames, channel_dim=1)
        if frames.shape[0] == 0:
            return self._empty(state), state
        h, w = frames.shape[-2:]
        if state.lr_size is not None and tuple(state.lr_size) != (h, w):
            raise UserInputError(f"this sequence has frames of {state.lr_size[1]}x{state.lr_size[0]} but got {w}x{h}: "
                                 "start a new sequence to change the resolution")
        if not torch.isfinite(frames).all():
            raise UserInputError(f"a frame from {state.frame_index} on contains NaN or infinite values")
        if state.lr_size is None:  # found before any work (callers that can, check before loading)
            self.check_size(h, w)
        given = state.dit
        state = replace(state, lr_size=(h, w))
        cond = self._condition(frames)
        state = replace(state, cond=cond if state.cond is None else torch.cat([state.cond, cond], dim=1),
                        frame_index=state.frame_index + frames.shape[0])
        outputs = []
        while state.chunks < chunks_ready(state.frame_index):
            out, state = self._run_chunk(state, owned=consume or state.dit is not given)
            outputs.append(out)
        return self._cat(outputs, state), state

    @torch.inference_mode()
    def flush(self, state: FlashVSRState, consume: bool = False) -> tuple[torch.Tensor, FlashVSRState]:
        """The end of the sequence: the frames still held back, computed by padding the stream with copies of the
        last frame (their outputs are dropped). Afterwards every pushed frame has been returned once, and the state
        starts a new sequence (same noise generator, which carries on). ``consume``: as for ``push``."""
        n = state.frame_index
        given = state.dit
        if n == 0:
            return self._empty(state), state
        total = stream_length(n)
        last = state.cond[:, -1:]
        state = replace(state, cond=torch.cat([state.cond, last.expand(-1, total - n, -1, -1)], dim=1),
                        frame_index=total)
        outputs = []
        while state.chunks < num_chunks(total):
            out, state = self._run_chunk(state, keep=n, owned=consume or state.dit is not given)
            outputs.append(out)
        out = self._cat(outputs, state)
        fresh = FlashVSRState(seed=state.seed, generator_state=state.generator_state)
        return out, fresh

    def reset_temporal(self, state: FlashVSRState, consume: bool = False) -> tuple[torch.Tensor, FlashVSRState]:
        """A scene cut: the shot so far is finished (as at a flush) and the next frame starts a new stream, so no
        attention memory, LQ or decoder memory crosses the cut; the noise sequence carries on."""
        return self.flush(state, consume)

    def identity(self) -> str:
        pipe = self.pipeline
        tensors = [pipe.prompt] + [p for _, p in zip(range(4), pipe.dit.parameters())] + \
            [next(pipe.lq_proj.parameters()), next(pipe.tc_decoder.parameters())]
        total = checksum(tensors)
        return (f"flashvsr|{pipe.version}|{self.compute_dtype}|scale={self.scale}|sparse={self.sparse_ratio}|"
                f"local={self.local_range}|kv={self.kv_ratio}|color={self.color_fix}|{total:.10g}")

    def state_from_dict(self, tensors: dict, meta: dict) -> FlashVSRState:
        # On the engine's device: push and flush take the state as it is (its KV caches are concatenated with
        # the next chunk's). A resume file damaged or edited is found here, not as a failure mid-chunk or as
        # frames of NaN: a generator state, and every value finite.
        state = FlashVSRState.from_dict(tensors, meta)
        torch.Generator("cpu").set_state(state.generator_state)
        bad = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise ValueError(f"{', '.join(sorted(bad)[:3])} hold values that are not finite")
        return state.to(self.device)

    def estimate_memory(self, h: int, w: int) -> int:
        """Rough peak bytes beyond the weights for LR frames of h x w: KV caches, the first chunk's activations
        (6 latent frames), the held conditioning frames and the decoder's full-resolution maps."""
        hp, wp = padded_size(*output_size(h, w, self.scale))
        elem = torch.finfo(self.compute_dtype).bits // 8
        dit = self.pipeline.dit
        tokens = hp * wp // 256  # per latent frame
        kept = max(2, kept_slices(self.kv_ratio))
        kv = 2 * kept * 2 * tokens * dit.dim * elem * len(dit.blocks) + 2 * tokens * dit.dim * elem * len(dit.blocks)
        ffn = dit.config["ffn_dim"]
        activations = 6 * tokens * (8 * dit.dim + min(ffn, 32768 * ffn // max(6 * tokens, 1))) * elem
        cond = 30 * 3 * hp * wp * elem
        decoder = 8 * 4 * 128 * hp * wp * elem // 16 + 6 * 3 * hp * wp * 4
        return int((kv + activations + cond + decoder) * 1.2)

    # ----------------------------------------------------------------------------------------------- internals

    def _empty(self, state: FlashVSRState) -> torch.Tensor:
        h, w = state.lr_size or (0, 0)
        return torch.empty(0, 3, h * self.scale, w * self.scale, device=self.device)

    def _cat(self, outputs: list, state: FlashVSRState) -> torch.Tensor:
        return torch.cat(outputs) if outputs else self._empty(state)

    def _condition(self, frames: torch.Tensor) -> torch.Tensor:
        """LR frames -> conditioning frames (3, n, H, W) in [-1, 1], compute dtype, on the device: quantised to 8
        bits, PIL-bicubic-upscaled and mapped as v/255*2-1 in float32 (the official preprocessing), then padded
        at the bottom/right to multiples of 128 (replicate)."""
        pixels = quantize_8bit(frames.detach().to("cpu")).permute(0, 2, 3, 1).numpy()
        size = output_size(pixels.shape[1], pixels.shape[2], self.scale)
        up = torch.stack([torch.from_numpy(upscale_frame(p, size).copy()) for p in pixels])
        video = up.to(torch.float32).permute(3, 0, 1, 2) / 255.0 * 2.0 - 1.0
        video = pad_to(video, *padded_size(*size))
        return video.to(device=self.device, dtype=self.compute_dtype)

    def _constants_for(self):
        c = self._constants
        if c is None or c.device != self.device or c.dtype != self.compute_dtype:
            self._constants = c = self.pipeline.dit.prepare(self.pipeline.prompt, self.device, self.compute_dtype)
        return c

    def _attention(self) -> tuple[str, object]:
        """(backend, compiled FlexAttention or None) for the next DiT pass."""
        if self.attention != "flex":
            return "gather", None
        if self.device.type != "cuda":
            return "flex", None  # eager FlexAttention: the whole score matrix, for checking only
        if self._compiled_flex is None:
            failed = flex_failure(self.device)
            if failed is not None:
                log.info("FlashVSR: gather attention (FlexAttention failed earlier in this session: %s)", failed)
                self.attention = "gather"
                return "gather", None
            self._compiled_flex = compiled_flex_attention()
        return "flex", self._compiled_flex

    def _noise(self, state: FlashVSRState, latents: int, size: tuple[int, int]):
        generator = torch.Generator("cpu")
        generator.set_state(state.generator_state)
        h, w = size[0] // LATENT_STRIDE, size[1] // LATENT_STRIDE
        channels = self.pipeline.dit.in_dim
        draws = [torch.randn((1, channels, 1, h, w), generator=generator, dtype=torch.float32)
                 for _ in range(latents)]
        noise = torch.cat(draws, dim=2).to(device=self.device, dtype=self.compute_dtype)
        return noise, generator.get_state()

    def _dit_pass(self, noise, tokens, state: FlashVSRState, t_start: int, owned: bool = False):
        """The DiT's velocity for one chunk and the new KV caches. The state's own are left as they are, unless
        ``owned``: then each block's is replaced in the state's list as the pass goes, and the old one freed."""
        dit = self.pipeline.dit
        if state.dit is None:
            cache = dit.new_cache()
        else:
            blocks = state.dit.blocks if owned else list(state.dit.blocks)
            cache = StreamCache(blocks, state.dit.chunks, state.dit.grid)
        backend, compiled_flex = self._attention()
        velocity = dit.forward_chunk(noise, tokens, cache, t_start, self._constants_for(),
                                     sparse_ratio=self.sparse_ratio, local_range=self.local_range,
                                     kv_ratio=self.kv_ratio, backend=backend, compiled_flex=compiled_flex,
                                     on_flex_failure=self._flex_failed if compiled_flex is not None else None)
        return velocity, cache

    def _flex_failed(self, error: FlexCompileError) -> None:
        """The compiled FlexAttention failed (the DiT goes on with gather): said once, and gather from now on, in
        this engine and in later ones on this device."""
        log.warning("FlashVSR: FlexAttention failed (%s); using the gather attention, which computes the same",
                    error)
        record_flex_failure(self.device, str(error))
        self.attention, self._compiled_flex = "gather", None

    def _run_chunk(self, state: FlashVSRState, keep: int | None = None,
                   owned: bool = False) -> tuple[torch.Tensor, FlashVSRState]:
        """One DiT pass: the next chunk's output frames (only those < ``keep`` when flushing) and the new state.
        ``owned``: ``state`` may be taken apart (``_dit_pass``)."""
        pipe = self.pipeline
        c = chunk(state.chunks)
        cond = state.cond  # frames [cond_start, frame_index)
        at = state.cond_start

        def frames(rng):
            # contiguous: convolutions may round differently on strided views, and the view's strides depend on
            # how many frames happen to be held, i.e. on how the input was split
            return cond[:, rng[0] - at:rng[1] - at][None].contiguous()

        size = cond.shape[-2:]
        lq_in = frames(c.lq)
        tokens, lq_state = pipe.lq_proj.project(lq_in, state.lq if state.chunks else None)
        noise, generator_state = self._noise(state, c.latents[1] - c.latents[0], size)
        velocity, cache = self._dit_pass(noise, tokens, state, c.latents[0], owned=owned)
        latents = noise - velocity.to(noise.dtype)
        # (the decoder's first layer squashes an overflow of the DiT's last layer, inf, into finite frames)
        check_finite(latents, "FlashVSR", self.compute_dtype)
        if self.latent_sink is not None:
            self.latent_sink(latents)
        reference = frames(c.output)
        video, decoder_state = pipe.tc_decoder.decode(latents, reference, state.decoder)
        # The colour statistics are those of the frames returned, as the official code's (it crops where this
        # pads): the padding at the bottom and right is cut off first.
        h, w = state.lr_size
        crop = (..., slice(0, h * self.scale), slice(0, w * self.scale))
        video = color_fix(video[crop], reference[crop].to(video.dtype), self.color_fix)
        first, end = c.output
        if keep is not None:
            end = min(end, keep)
        out = video[0, :, :end - first].transpose(0, 1)
        check_finite(out, "FlashVSR", self.compute_dtype)
        out = ((out.float() + 1) / 2).clamp(0, 1)
        # The next chunk reads LR frames from its output start on (its LQ frames come later).
        nxt = chunk(state.chunks + 1).output[0]
        new = replace(state, cond=cond[:, nxt - at:].clone(), cond_start=nxt, chunks=state.chunks + 1, lq=lq_state,
                      dit=cache, decoder=decoder_state, generator_state=generator_state,
                      emitted=state.emitted + out.shape[0])
        return out, new
