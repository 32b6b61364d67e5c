"""Causal, frame-by-frame Stream-DiffVSR inference with an explicit state.

The official pipeline keeps every frame, flow and latent of a sequence on the GPU. Everything a frame needs
from the past is in fact three things (spec §3.7): the previous raw decoder output, the previous bicubic
upscale (for the flow), and the position of the noise generator. ``StreamState`` holds exactly those, so
memory is flat in the number of frames and a sequence can be split anywhere without changing the result.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

from ..contract import PARTS_FIELD
from ..raft.network import RAFT
from .pipeline import StreamDiffVSRPipeline
from ..shared.errors import UserInputError
from ..shared.image import to_rgb
from ..shared.norms import prefers_channels_last
from ..shared.packed import as_operators
from ..shared.runtime import check_finite, checksum, is_out_of_memory, weights_checksum
from ..shared.tensor_key import TensorKey
from ..shared.warp import flow_warp_official
from .speed import compiled, failed_before

log = logging.getLogger(__name__)

FlowFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

SCALE = 4
# LR sides are padded to a multiple of this (the tiny autoencoder downsamples the HR frame by 4).
LR_MULTIPLE = 4


@dataclass(frozen=True)
class StreamState:
    """Everything carried from one frame to the next.

    seed: the seed the sequence was started with (informational; the generator state is what counts).
    frame_index: number of frames already produced in this sequence (0 = the next frame is a first frame).
    generator_state: state of the CPU ``torch.Generator`` that draws each frame's initial latent.
    prev_output: raw (unclamped, roughly [-1, 1]) decoder output of the previous frame, (1, 3, 4h', 4w')
        float32, where h', w' are the LR sides padded to a multiple of 4. None before the first frame.
    prev_upscaled: bicubic x4 upscale of the previous (padded) LR frame in [-1, 1], same shape, float32.
    lr_size: (h, w) of the input frames of this sequence; frames of another size need a new state.
    flow_features: a cache, not part of the sequence: the flow model's features of ``prev_upscaled`` (RAFT
        encoded it as image 1 of the previous pair and needs it as image 2 of the next one), valid only for the
        flow model named by ``flow_features_key``. Not serialised: after ``from_dict`` (or with another flow
        model) it is simply recomputed, with the same result.
    """

    seed: int
    frame_index: int = 0
    generator_state: torch.Tensor | None = None
    prev_output: torch.Tensor | None = None
    prev_upscaled: torch.Tensor | None = None
    lr_size: tuple[int, int] | None = None
    flow_features: torch.Tensor | None = None
    flow_features_key: str | None = None

    def to(self, device) -> "StreamState":
        move = (lambda t: None if t is None else t.to(device))
        return replace(self, prev_output=move(self.prev_output), prev_upscaled=move(self.prev_upscaled),
                       flow_features=move(self.flow_features))

    def to_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Tensors and string metadata, ready for ``safetensors.torch.save_file(tensors, path, metadata)``."""
        tensors = {"generator_state": self.generator_state.clone()}
        if self.prev_output is not None:
            tensors["prev_output"] = self.prev_output.detach().to("cpu", torch.float32).contiguous()
            tensors["prev_upscaled"] = self.prev_upscaled.detach().to("cpu", torch.float32).contiguous()
        meta = {"streamvsr_state": json.dumps(
            {"seed": self.seed, "frame_index": self.frame_index,
             "lr_size": list(self.lr_size) if self.lr_size else None})}
        return tensors, meta

    @classmethod
    def from_dict(cls, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> "StreamState":
        """The state ``to_dict`` wrote; a ValueError where the tensors are not what a state of its frames holds (a
        resume file damaged or edited: found here, not mid-frame, and not as frames of NaN)."""
        info = json.loads(meta["streamvsr_state"])
        state = cls(seed=int(info["seed"]), frame_index=int(info["frame_index"]),
                    generator_state=tensors["generator_state"].clone(),
                    prev_output=tensors.get("prev_output"), prev_upscaled=tensors.get("prev_upscaled"),
                    lr_size=tuple(info["lr_size"]) if info["lr_size"] else None)
        torch.Generator("cpu").set_state(state.generator_state)  # (raises for anything else)
        if (state.prev_output is None) != (state.prev_upscaled is None):
            raise ValueError("it holds half of the previous frame")
        if state.prev_output is not None:
            if state.lr_size is None:
                raise ValueError("it holds a previous frame without its size")
            h, w = state.lr_size
            size = (1, 3, (h + (-h) % LR_MULTIPLE) * SCALE, (w + (-w) % LR_MULTIPLE) * SCALE)
            for t in (state.prev_output, state.prev_upscaled):
                if tuple(t.shape) != size or not t.is_floating_point() or not torch.isfinite(t).all():
                    raise ValueError(f"its previous frame is not a finite {size[3]}x{size[2]} picture")
        return state


def new_state(seed: int) -> StreamState:
    generator = torch.Generator("cpu")
    generator.manual_seed(int(seed))
    return StreamState(seed=int(seed), generator_state=generator.get_state())


class StreamEngine:
    """Runs Stream-DiffVSR one frame at a time.

    ``flow(image1, image2)`` must return the (B, 2, H, W) float32 flow in pixels that backward-warps
    ``image2`` onto ``image1`` for inputs in [-1, 1] (torchvision RAFT convention); the official model uses
    RAFT-large with 12 updates at the output resolution.
    """

    scale = SCALE

    def __init__(self, pipeline: StreamDiffVSRPipeline, flow: FlowFn, steps: int = 4,
                 device: torch.device | str | None = None, compute_dtype: torch.dtype | None = None,
                 reuse: bool = True, compile: bool = False, compile_mode: str | None = None):
        """``reuse``: compute once what gives the same numbers every time (the prompt's cross-attention keys and
        values, each timestep's embeddings, the ControlNet's conditioning embedding once per frame, RAFT's
        features of the previous frame). The output is bit-identical either way; False runs the plain per-step
        arithmetic (a reference for tests).

        ``compile``: run the UNet, ControlNet, temporal decoder and RAFT's encoders and update block through
        ``torch.compile`` (channels-last, shapes static per sequence, compiled once per frame size and kept for the
        session; see speed.py). The output then differs from the eager one by float rounding; where compilation
        is unavailable the networks run eagerly after a one-line warning. ``compile_mode``: ``torch.compile``'s
        mode (None: its default; the CUDA graph modes are handled, see speed.py).

        On a GPU in half precision the UNet, ControlNet and autoencoder are stored channels-last (in place: a
        pipeline shared with other engines is stored so for them too), the layout of cuDNN's half-precision
        convolutions (see shared/norms.py); the numbers differ from NCHW's by float rounding."""
        if not 1 <= int(steps) <= 50:
            raise UserInputError(f"steps must be between 1 and 50 (the model is distilled for 4), got {steps}")
        self.pipeline = pipeline
        self.flow = flow
        self.steps = int(steps)
        # No ``pipeline.device`` property: ComfyUI's ModelPatcher assigns that attribute itself.
        self.device = torch.device(device) if device is not None else next(pipeline.unet.parameters()).device
        self.compute_dtype = compute_dtype or pipeline.dtype
        self.timesteps = pipeline.scheduler.timesteps(self.steps)
        self._on_demand = False
        self.reuse = bool(reuse)
        # name -> (fingerprint of the weights it was computed from, value): constants of the networks
        self._constants: dict = {}
        self.compile = bool(compile)
        if not self.compile and prefers_channels_last(self.device, self.compute_dtype):  # compiled(): its own
            for network in (pipeline.unet, pipeline.controlnet, pipeline.vae):
                network.to(memory_format=torch.channels_last)  # no copy where a weight is so already
        if self.compile:
            failure = failed_before(pipeline.unet)
            if failure is not None:
                log.warning("torch.compile failed earlier in this session (%s): this model runs eagerly too (a "
                            "restart tries compiling again)", failure)
            self._unet = compiled(pipeline.unet, "forward", "UNet", mode=compile_mode)
            self._controlnet = compiled(pipeline.controlnet, "forward", "ControlNet", mode=compile_mode)
            self._decode = compiled(pipeline.vae, "decode", "temporal decoder", mode=compile_mode)
            self._features = compiled(pipeline.vae, "encode_features", "temporal encoder", mode=compile_mode)
            # The compiled UNet's graph is specialised to its inputs' strides, so the residuals are handed over in
            # one layout: channels-last, that of the compiled ControlNet's convolutions, or contiguous where the
            # CPU layers (kept whole as operators) keep their own layouts.
            self._residual_format = (torch.contiguous_format if as_operators(pipeline.controlnet)
                                     else torch.channels_last)
            # RAFT's encoders and update block (run 12 times a frame at 1/8 of the output size), which a compiled
            # graph fuses; the correlation lookup between them stays eager
            raft = getattr(flow, "raft", None)
            self._flow_parts = {name: compiled(getattr(raft, name), "forward", "RAFT " + name.replace("_", " "),
                                               mode=compile_mode)
                                for name in RAFT.PARTS} if isinstance(raft, RAFT) else {}
        else:
            self._unet, self._controlnet = pipeline.unet, pipeline.controlnet
            self._decode, self._features = pipeline.vae.decode, pipeline.vae.encode_features
            self._flow_parts = {}

    def _zero_residuals(self, sample_shape) -> tuple[list[torch.Tensor], torch.Tensor]:
        """ControlNet-shaped zeros for the first frame of a compiled run, which has no residuals: adding zeros
        changes no number (x + 0 == x), and the UNet then runs the graph of every later frame instead of
        compiling a second one. Laid out as the residuals are handed over (see ``_residuals_for_compiled``)."""
        shapes, mid = self.pipeline.unet.skip_shapes(sample_shape)
        zero = [torch.zeros(s, device=self.device, dtype=self.compute_dtype) for s in shapes]
        return self._residuals_for_compiled(zero, torch.zeros(mid, device=self.device, dtype=self.compute_dtype))

    def _residuals_for_compiled(self, down, mid):
        """Residuals in the compiled UNet's layout (``_residual_format``; a no-op for the ControlNet's own)."""
        fmt = self._residual_format
        return [d.contiguous(memory_format=fmt) for d in down], mid.contiguous(memory_format=fmt)

    @property
    def compile_seconds(self) -> float:
        """Time spent compiling so far (0 without ``compile``)."""
        if not self.compile:
            return 0.0
        return sum(c.seconds for c in (self._unet, self._controlnet, self._decode, self._features,
                                       *self._flow_parts.values()))

    # ------------------------------------------------------------------ the engine contract (see models/contract.py)

    def new_state(self, seed: int) -> StreamState:
        return new_state(seed)

    def push(self, state: StreamState, frames: torch.Tensor, consume: bool = False) -> tuple[torch.Tensor, StreamState]:
        """Frames (n, 3, h, w) or (3, h, w) in [0, 1] -> their n upscaled frames (n, 3, 4h, 4w): one in, one out.
        (``consume`` changes nothing here: the state is two frames, nothing worth letting go early.)"""
        if frames.ndim == 3:
            frames = frames[None]
        outputs = []
        for frame in frames:
            hr, state = self.step(frame, state)
            outputs.append(hr)
        if not outputs:
            return self.no_frames(state), state
        return torch.cat(outputs), state

    def flush(self, state: StreamState, consume: bool = False) -> tuple[torch.Tensor, StreamState]:
        """Nothing is held back: every pushed frame has already been returned."""
        return self.no_frames(state), state

    def reset_temporal(self, state: StreamState, consume: bool = False) -> tuple[torch.Tensor, StreamState]:
        """A scene cut: the next frame is upscaled like a first frame, the noise sequence carries on."""
        return self.no_frames(state), replace(state, prev_output=None, prev_upscaled=None, flow_features=None,
                                              flow_features_key=None)

    def pending(self, state: StreamState) -> int:
        return 0

    def no_frames(self, state: StreamState) -> torch.Tensor:
        h, w = state.lr_size or (0, 0)
        return torch.empty(0, 3, h * SCALE, w * SCALE)

    def identity(self) -> str:
        """Compute dtype, steps, the flow model with the options that change its numbers, and checksums of a few
        weights of each: resuming with another model, precision, step count or flow would splice two different
        renderings into one video. (The flow's correlation mode is left out: both modes give the same flow up to
        float rounding, and switching to on-demand is the advice for running out of memory.)"""
        pipe, flow = self.pipeline, self.flow
        # (this formula is in the resume files of unfinished jobs: changed, it would refuse them all; the parts'
        # checksum, which tells a ControlNet or autoencoder changed alone, came later, last, and a checkpoint of an
        # earlier release, without it, is compared without it: video/resume.py)
        total = checksum([pipe.prompt_embeds] + [p for _, p in zip(range(4), pipe.parameters())])
        flow_weights = checksum([p for _, p in zip(range(4), flow.parameters())]) \
            if isinstance(flow, torch.nn.Module) else 0.0
        flow_name = (f"{getattr(flow, 'arch', type(flow).__name__)},updates={getattr(flow, 'num_flow_updates', None)},"
                     f"downscale={getattr(flow, 'downscale', 1)},{flow_weights:.10g}")
        return (f"stream-diffvsr|{self.compute_dtype}|steps={self.steps}|{total:.10g}|flow={flow_name}|"
                f"{PARTS_FIELD}{weights_checksum(pipe):.10g}")

    def state_from_dict(self, tensors: dict, meta: dict) -> StreamState:
        return StreamState.from_dict(tensors, meta)

    def estimate_memory(self, h: int, w: int) -> int:
        """Rough peak activation bytes for one frame of LR size h x w (weights not included)."""
        hp, wp = -(-h // LR_MULTIPLE) * LR_MULTIPLE, -(-w // LR_MULTIPLE) * LR_MULTIPLE
        lr_px, hr_px = hp * wp, hp * wp * SCALE * SCALE
        elem = torch.finfo(self.compute_dtype).bits // 8
        # Tiny decoder/encoder: a handful of 64-channel maps at the output size; UNet/ControlNet: about a dozen
        # 256-channel maps at the latent size; plus fp32 HR frames for warping and flow.
        est = hr_px * 64 * elem * 5 + lr_px * 256 * elem * 16 + hr_px * 4 * 12
        flow_estimate = getattr(self.flow, "estimate_memory", None)
        if callable(flow_estimate):
            est = max(est, flow_estimate(hp * SCALE, wp * SCALE))
        return int(est)

    def _flow_key(self) -> str | None:
        """Names the flow model whose features a state may carry (None: it cannot hand out features)."""
        if not (self.reuse and callable(getattr(self.flow, "flow_and_features", None))):
            return None
        token = getattr(self.flow, "_streamvsr_token", None)
        if token is None:
            token = uuid.uuid4().hex
            self.flow._streamvsr_token = token
        return f"{token}|downscale={getattr(self.flow, 'downscale', 1)}"

    def _call_flow(self, image1, image2, features2, corr=None):
        """(flow, image1's features or None)."""
        kw = {} if corr is None else {"corr": corr}
        if self._flow_parts:
            kw["parts"] = self._flow_parts
        if self._flow_key() is None:
            return self.flow(image1, image2, **kw).to(torch.float32), None
        flow, features = self.flow.flow_and_features(image1, image2, features2, **kw)
        return flow.to(torch.float32), features

    def _flow(self, image1: torch.Tensor, image2: torch.Tensor, features2=None):
        """(flow, image1's features or None). On out-of-memory retried, and from then on computed, with RAFT's
        on-demand correlation, which gives the same numbers in bounded memory (the one out-of-memory fallback
        of the pack)."""
        if not self._on_demand and callable(getattr(self.flow, "forward", None)) and \
                getattr(self.flow, "corr", None) not in (None, "on_demand"):
            try:
                return self._call_flow(image1, image2, features2)
            except Exception as e:
                if not is_out_of_memory(e):
                    raise
                # retried outside the except block, so the failed attempt's tensors can be freed first
            if image1.device.type == "cuda":
                torch.cuda.empty_cache()
            log.warning("out of memory in the optical flow; continuing with on-demand correlation "
                        "(same result, bounded memory)")
            self._on_demand = True
        if self._on_demand:
            return self._call_flow(image1, image2, features2, corr="on_demand")
        return self._call_flow(image1, image2, features2)

    def _constant(self, name: str, sources, make):
        """``make()``, computed again only when one of the ``sources`` tensors was replaced or changed in place
        (weights patched or moved, e.g. by ComfyUI; as far as ``TensorKey`` can tell)."""
        key = TensorKey(sources)
        hit = self._constants.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        value = make()
        self._constants[name] = (key, value)
        return value

    def _prompt_kv(self, net, embeds: torch.Tensor):
        """The prompt's keys and values for every cross-attention of ``net``: the same for every step of every
        frame."""
        sources = [embeds] + [p for m in net.cross_attentions for layer in (m.to_k, m.to_v)
                              for p in (layer.weight, layer.bias)]
        return self._constant(f"kv:{id(net)}", sources, lambda: net.prompt_kv(embeds))

    def _step_embedding(self, net, t: int, sample: torch.Tensor):
        """Timestep ``t``'s embedding and its projection in every resnet of ``net``: the same for every frame."""
        embedding = net.time_embedding
        layers = [embedding.linear_1, embedding.linear_2] + [m.time_emb_proj for m in net.time_resnets]
        sources = [p for layer in layers for p in (layer.weight, layer.bias)]
        return self._constant(f"temb:{id(net)}:{t}:{sample.dtype}:{sample.device}:{sample.shape[0]}", sources,
                              lambda: net.step_embedding(torch.tensor(t, device=sample.device), sample))

    @torch.inference_mode()
    def step(self, frame: torch.Tensor, state: StreamState) -> tuple[torch.Tensor, StreamState]:
        """Upscale one frame. Returns ``(hr, new_state)``; hr is (1, 3, 4h, 4w) float32 in [0, 1]."""
        if frame.ndim == 3:
            frame = frame.unsqueeze(0)
        if frame.ndim != 4 or frame.shape[0] != 1:
            raise UserInputError(f"expected one frame shaped (3, h, w) or (1, 3, h, w), got {tuple(frame.shape)}")
        frame = to_rgb(frame, channel_dim=1)
        h, w = frame.shape[-2:]
        if state.lr_size is not None and tuple(state.lr_size) != (h, w):
            raise UserInputError(
                f"this sequence has frames of {state.lr_size[1]}x{state.lr_size[0]} but got {w}x{h}: "
                "reset the state (start a new sequence) to change the resolution")
        device, dtype, pipe = self.device, self.compute_dtype, self.pipeline
        lr = frame.to(device=device, dtype=torch.float32)
        if self.compile:
            # Graphs are specialised to their inputs' memory layout: frames read from files or handed over by
            # ComfyUI come channels-last, a previous frame restored from a checkpoint does not, and each layout
            # would compile the networks again
            lr = lr.contiguous()
        if not torch.isfinite(lr).all():
            raise UserInputError(f"frame {state.frame_index} contains NaN or infinite values")
        # The model only ever saw images read from files, [0, 1]; an IMAGE from an overshooting filter is taken as
        # a saved file of it would be (as FlashVSR's input is)
        lr = lr.clamp(0, 1) * 2 - 1
        pad_h, pad_w = (-h) % LR_MULTIPLE, (-w) % LR_MULTIPLE
        if pad_h or pad_w:
            # Padding (and cropping the output back) keeps the picture geometry; the official code instead
            # resizes the frame to the floored multiple of 4 with Lanczos.
            lr = F.pad(lr, (0, pad_w, 0, pad_h), mode="replicate")
        upscaled = F.interpolate(lr, scale_factor=SCALE, mode="bicubic")

        generator = torch.Generator("cpu")
        generator.set_state(state.generator_state)
        latent = torch.randn((1, pipe.latent_channels, *lr.shape[-2:]), generator=generator,
                             dtype=torch.float32).to(device)

        warped = temporal = features = None
        flow_key = self._flow_key()
        if state.prev_output is not None:
            carried = state.flow_features if flow_key is not None and state.flow_features_key == flow_key else None
            flow, features = self._flow(upscaled, state.prev_upscaled.to(device), carried)
            warped = flow_warp_official(state.prev_output.to(device, torch.float32), flow)
            temporal = self._features(warped.to(dtype))[::-1]
            warped = warped.to(dtype)

        # Kept: a fresh cast each frame (half precision, or a buffer ComfyUI left on the CPU) would be another
        # tensor, and the prompt's keys and values kept for it would be computed again
        embeds = self._constant(f"embeds:{device}:{dtype}", [pipe.prompt_embeds],
                                lambda: pipe.prompt_embeds.to(device, dtype))
        lr_in = lr.to(dtype)
        unet_context = controlnet_context = cond_embedding = None
        if self.reuse:
            unet_context = self._prompt_kv(pipe.unet, embeds)
            if warped is not None:
                controlnet_context = self._prompt_kv(pipe.controlnet, embeds)
                cond_embedding = pipe.controlnet.embed_condition(warped)  # depends on the frame, not the step
        no_residuals = (None, None)
        if warped is None and self.compile:
            no_residuals = self._zero_residuals((1, pipe.latent_channels + lr_in.shape[1], *lr_in.shape[-2:]))
        for t in self.timesteps:
            model_in = torch.cat([latent.to(dtype), lr_in], dim=1)
            down, mid = no_residuals
            if not self.reuse:
                timestep = torch.tensor(t, device=device)
                if warped is not None:
                    down, mid = self._controlnet(model_in, timestep, embeds, warped)
                    if self.compile:
                        down, mid = self._residuals_for_compiled(down, mid)
                v = self._unet(model_in, timestep, embeds, down, mid)
            else:
                if warped is not None:
                    down, mid = self._controlnet(model_in, self._step_embedding(pipe.controlnet, t, model_in),
                                                 controlnet_context, cond_embedding=cond_embedding)
                    if self.compile:
                        down, mid = self._residuals_for_compiled(down, mid)
                v = self._unet(model_in, self._step_embedding(pipe.unet, t, model_in), unet_context, down, mid)
            del down, mid
            latent, _ = pipe.scheduler.step(v.to(torch.float32), t, latent, self.steps)

        # A first frame decodes without temporal features: another graph, used once per sequence (and after a scene
        # cut), so the compiled path runs it eagerly instead of compiling it.
        decode = self._decode if temporal is not None else pipe.vae.decode
        decoded = decode((latent / pipe.vae_scaling_factor).to(dtype), temporal).to(torch.float32)
        check_finite(decoded, "Stream-DiffVSR", dtype)
        new = StreamState(seed=state.seed, frame_index=state.frame_index + 1,
                          generator_state=generator.get_state(), prev_output=decoded,
                          prev_upscaled=upscaled, lr_size=(h, w), flow_features=features,
                          flow_features_key=flow_key if features is not None else None)
        hr = (decoded[..., : h * SCALE, : w * SCALE] / 2 + 0.5).clamp(0, 1)
        return hr, new
