"""FlashVSR's LQ projection (``LQ_proj_in``): the bicubic-upscaled LR video, in [-1, 1], turned into one latent
frame of DiT tokens per 4 LR frames; the tokens are added to the DiT input before block 0.

Space-to-depth by 16 (768 channels), two causal Conv3d (kernel (4,3,3), temporal stride 2) each followed by an RMS
norm and SiLU, then one Linear per injected block. Keys follow the official ``LQ_proj_in.ckpt``: ``conv1``,
``norm1.gamma``, ``conv2``, ``norm2.gamma``, ``linear_layers.N``.

The two releases share keys and shapes but not the temporal padding of the convolutions, so the version must be
chosen by the caller:

* ``"v1"`` (official ``Buffer_LQ4x_Proj``): every 4-frame clip is padded with its own last two frames, so clips
  are independent and nothing is carried between calls.
* ``"v1.1"`` (official ``Causal_LQ4x_Proj``): each conv is padded with the previous clip's last two input frames
  (replicate padding on the very first clip), so features see the past.

The conv memory lives in an explicit, immutable ``LQProjState``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

VERSIONS = ("v1", "v1.1")
SPACE_TO_DEPTH = 16
CLIP_FRAMES = 4  # LR frames per latent frame
CACHE_FRAMES = 2  # temporal padding of each causal conv (kernel 4, stride 2)
LQ_CHANNELS = 3 * SPACE_TO_DEPTH * SPACE_TO_DEPTH


def check_version(version) -> str:
    if version not in VERSIONS:
        raise ValueError(f"FlashVSR version {version!r} is not one of {VERSIONS}: v1 and v1.1 weights look the same, "
                         "so the version has to be given")
    return version


def lq_config_from_state_dict(state_dict: dict) -> dict:
    """Constructor arguments of ``LQProjection`` read from the shapes of an (unprefixed) state dict."""
    try:
        conv1, conv2 = state_dict["conv1.weight"].shape, state_dict["conv2.weight"].shape
        linear = state_dict["linear_layers.0.weight"].shape
    except KeyError as e:
        raise ValueError(f"not an LQ projection state dict: no {e.args[0]!r}") from None
    num_layers = 0
    while f"linear_layers.{num_layers}.weight" in state_dict:
        num_layers += 1
    return dict(in_channels=int(conv1[1]), hidden1=int(conv1[0]), hidden2=int(conv2[0]), out_dim=int(linear[0]),
                num_layers=num_layers)


@dataclass(frozen=True)
class LQProjState:
    """What the projection carries between calls.

    clips: 4-frame clips consumed, the priming clip (frame 0 repeated) included; 0 means a fresh stream.
    conv1, conv2: v1.1 only, the last two frames that entered each conv, (B, C, 2, h, w); None for v1, whose
    clips are independent.
    """

    clips: int = 0
    conv1: torch.Tensor | None = None
    conv2: torch.Tensor | None = None

    def to(self, device=None, dtype=None) -> LQProjState:
        move = (lambda t: None if t is None else t.to(device=device, dtype=dtype))
        return replace(self, conv1=move(self.conv1), conv2=move(self.conv2))

    def to_dict(self, prefix: str = "lq_proj.") -> tuple[dict, dict]:
        tensors = {f"{prefix}{name}": t.contiguous() for name, t in (("conv1", self.conv1), ("conv2", self.conv2))
                   if t is not None}
        return tensors, {f"{prefix}clips": str(self.clips)}

    @classmethod
    def from_dict(cls, tensors: dict, meta: dict, prefix: str = "lq_proj.") -> LQProjState:
        return cls(clips=int(meta[f"{prefix}clips"]), conv1=tensors.get(f"{prefix}conv1"),
                   conv2=tensors.get(f"{prefix}conv2"))


class RMSNorm3d(nn.Module):
    """Channel RMS norm written as the official one: L2-normalise over channels, times sqrt(C) and gamma."""

    def __init__(self, channels: int, device=None, dtype=None):
        super().__init__()
        self.scale = channels ** 0.5
        self.gamma = nn.Parameter(torch.ones(channels, 1, 1, 1, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ComfyUI's partial loading moves only the ops layers, so this parameter follows the input here.
        gamma = self.gamma.to(device=x.device, dtype=x.dtype)
        return F.normalize(x, dim=1) * self.scale * gamma


def space_to_depth(video: torch.Tensor, factor: int = SPACE_TO_DEPTH) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, C*f*f, T, H/f, W/f), channel order (c, row, col) with c outermost."""
    b, c, t, h, w = video.shape
    if h % factor or w % factor:
        raise ValueError(f"LQ frames must have sides divisible by {factor}, got {h}x{w}")
    x = video.reshape(b, c, t, h // factor, factor, w // factor, factor)
    return x.permute(0, 1, 4, 6, 2, 3, 5).reshape(b, c * factor * factor, t, h // factor, w // factor)


class LQProjection(nn.Module):
    def __init__(self, version: str, in_channels: int = LQ_CHANNELS, hidden1: int = 2048, hidden2: int = 3072,
                 out_dim: int = 1536, num_layers: int = 1, operations=nn, device=None, dtype=None):
        super().__init__()
        self.version = check_version(version)
        if in_channels != LQ_CHANNELS:
            raise ValueError(f"the LQ projection takes {LQ_CHANNELS} input channels (RGB, space-to-depth by "
                             f"{SPACE_TO_DEPTH}), not {in_channels}")
        kw = dict(device=device, dtype=dtype)
        # Padding is applied by hand (replicate, or the cached frames in front), so the convs themselves have none.
        conv = dict(kernel_size=(4, 3, 3), stride=(2, 1, 1), padding=0, **kw)
        self.conv1 = operations.Conv3d(in_channels, hidden1, **conv)
        self.norm1 = RMSNorm3d(hidden1, **kw)
        self.conv2 = operations.Conv3d(hidden1, hidden2, **conv)
        self.norm2 = RMSNorm3d(hidden2, **kw)
        self.linear_layers = nn.ModuleList(operations.Linear(hidden2, out_dim, **kw) for _ in range(num_layers))

    @staticmethod
    def _causal_conv(conv: nn.Module, x: torch.Tensor, front: torch.Tensor | None) -> torch.Tensor:
        if front is None:
            x = F.pad(x, (1, 1, 1, 1, CACHE_FRAMES, 0), mode="replicate")
        else:
            x = F.pad(torch.cat([front.to(device=x.device, dtype=x.dtype), x], dim=2), (1, 1, 1, 1, 0, 0),
                      mode="replicate")
        return conv(x)

    def _clip(self, frames: torch.Tensor, state: LQProjState) -> tuple[list[torch.Tensor] | None, LQProjState]:
        """One 4-frame clip (the priming clip already expanded to 4 frames)."""
        priming = state.clips == 0
        if self.version == "v1" and priming:
            # v1 pads every clip with its own frames, so the priming clip leaves nothing the next clip reads.
            return None, replace(state, clips=1)
        x = space_to_depth(frames)
        tail1 = x[:, :, -CACHE_FRAMES:].clone()
        # v1 (Buffer): the clip's own tail is the padding; v1.1 (Causal): the previous clip's tail.
        x = self._causal_conv(self.conv1, x, tail1 if self.version == "v1" else state.conv1)
        x = F.silu(self.norm1(x))
        tail2 = x[:, :, -CACHE_FRAMES:].clone()
        carried = LQProjState(clips=state.clips + 1, conv1=tail1, conv2=tail2) if self.version == "v1.1" else \
            LQProjState(clips=state.clips + 1)
        if priming:
            return None, carried
        x = self._causal_conv(self.conv2, x, tail2 if self.version == "v1" else state.conv2)
        x = F.silu(self.norm2(x))
        tokens = x.flatten(2).transpose(1, 2)  # (B, f*h*w, C), f outermost
        return [linear(tokens) for linear in self.linear_layers], carried

    def project(self, frames: torch.Tensor, state: LQProjState | None = None
                ) -> tuple[list[torch.Tensor] | None, LQProjState]:
        """Feed LR frames (B, 3, n, H, W) in [-1, 1] and get the tokens of the latent frames they complete.

        A fresh stream (``state`` None or ``clips == 0``) takes 1 + 4k frames: frame 0 primes the convs (the
        official first call, frame 0 repeated 4 times) and emits nothing; a continuing stream takes 4k frames.
        Returns, per linear layer, (B, k*(H/16)*(W/16), out_dim) tokens ordered (latent frame, row, col), or
        None when k == 0, and the new state. Splitting the frames over several calls gives identical tokens.
        """
        state = state or LQProjState()
        if frames.ndim != 5 or frames.shape[1] != 3:
            raise ValueError(f"LQ frames must be (B, 3, n, H, W), got {tuple(frames.shape)}")
        n = frames.shape[2]
        start = 0
        if state.clips == 0:
            if n < 1 or (n - 1) % CLIP_FRAMES:
                raise ValueError(f"a new LQ stream takes 1 + {CLIP_FRAMES}k frames, got {n}")
            first = frames[:, :, :1]
            _, state = self._clip(torch.cat([first.expand(-1, -1, CLIP_FRAMES - 1, -1, -1), first], dim=2), state)
            start = 1
        elif n % CLIP_FRAMES:
            raise ValueError(f"a continuing LQ stream takes a multiple of {CLIP_FRAMES} frames, got {n}")
        pieces = []
        for i in range(start, n, CLIP_FRAMES):
            out, state = self._clip(frames[:, :, i:i + CLIP_FRAMES], state)
            pieces.append(out)
        if not pieces:
            return None, state
        if len(pieces) == 1:
            return pieces[0], state
        return [torch.cat(parts, dim=1) for parts in zip(*pieces)], state

    def forward(self, video: torch.Tensor) -> list[torch.Tensor]:
        """Whole clip at once (B, 3, 1 + 4k, H, W): the same computation, and the same bits, as streaming it."""
        out, _ = self.project(video, None)
        if out is None:
            raise ValueError("a whole-clip LQ projection needs at least 5 frames (1 + 4)")
        return out
