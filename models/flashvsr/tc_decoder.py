"""FlashVSR's Tiny Conditional decoder (TCDecoder): a decoder-only TAEHV that turns latent frames plus the
upscaled LR video into RGB, 4 frames per latent frame.

The LR video (B, 3, 4T, H, W) is space-to-depth'ed by (4 frames, 8, 8) into 768 channels at latent size and put
in front of the latent channels. The network is causal in time: every MemBlock sees its own input at the previous
time step ("memory"); TGrow layers turn one time step into 1 or 2, so the last stages run at 4 steps per latent.
Keys follow the official ``TCDecoder.ckpt`` (``decoder.N`` with the indices of the official ``nn.Sequential``).

The memory is carried in an explicit, immutable ``TCDecoderState``. Decoding a stream in one call, chunk by
chunk, or one latent frame at a time gives the same frames.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

COND_FRAMES, COND_PIXELS = 4, 8
COND_CHANNELS = 3 * COND_FRAMES * COND_PIXELS * COND_PIXELS
FRAMES_PER_LATENT = 4
# The first latent of a stream stands for one frame: its 4 decoded frames are 3 warm-up frames and frame 0.
FRAMES_TO_TRIM = 3

# Indices of the official Sequential (after its "identity deepening" insertions), which the keys use.
_CONV_IN, _DEEPEN_IN, _CONV_1, _CONV_2, _CONV_3, _DEEPEN_OUT, _CONV_OUT = 1, 3, 10, 16, 22, 24, 26


def tc_config_from_state_dict(state_dict: dict) -> dict:
    """Constructor arguments of ``TCDecoder`` read from the shapes of a ``decoder.N`` state dict."""
    try:
        conv_in = state_dict[f"decoder.{_CONV_IN}.weight"].shape
        channels = (int(conv_in[0]),) + tuple(int(state_dict[f"decoder.{i}.weight"].shape[0])
                                              for i in (_CONV_1, _CONV_2, _CONV_3))
    except KeyError as e:
        raise ValueError(f"not a TC decoder state dict: no {e.args[0]!r}") from None
    return dict(channels=channels, latent_channels=int(conv_in[1]) - COND_CHANNELS)


@dataclass(frozen=True)
class TCDecoderState:
    """What the decoder carries between calls.

    memory: for each MemBlock in order, its input at the last decoded time step, (B, C, h, w); empty for a fresh
    stream. started: whether anything was decoded yet (the first call trims its first 3 frames).
    """

    memory: tuple = ()
    started: bool = False

    def to(self, device=None, dtype=None) -> TCDecoderState:
        return replace(self, memory=tuple(m.to(device=device, dtype=dtype) for m in self.memory))

    def to_dict(self, prefix: str = "tc_decoder.") -> tuple[dict, dict]:
        tensors = {f"{prefix}memory.{i}": m.contiguous() for i, m in enumerate(self.memory)}
        return tensors, {f"{prefix}started": str(int(self.started)), f"{prefix}memory": str(len(self.memory))}

    @classmethod
    def from_dict(cls, tensors: dict, meta: dict, prefix: str = "tc_decoder.") -> TCDecoderState:
        n = int(meta[f"{prefix}memory"])
        return cls(memory=tuple(tensors[f"{prefix}memory.{i}"] for i in range(n)),
                   started=bool(int(meta[f"{prefix}started"])))


class Clamp(nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    def __init__(self, channels: int, operations=nn, device=None, dtype=None):
        super().__init__()
        kw = dict(kernel_size=3, padding=1, device=device, dtype=dtype)
        self.conv = nn.Sequential(operations.Conv2d(channels * 2, channels, **kw), nn.ReLU(),
                                  operations.Conv2d(channels, channels, **kw), nn.ReLU(),
                                  operations.Conv2d(channels, channels, **kw))

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(torch.cat([x, past], dim=1)) + x)


class TGrow(nn.Module):
    """1x1 conv to ``stride`` times the channels, read as ``stride`` consecutive time steps."""

    def __init__(self, channels: int, stride: int, operations=nn, device=None, dtype=None):
        super().__init__()
        self.stride = stride
        self.conv = operations.Conv2d(channels, channels * stride, 1, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return self.conv(x).reshape(n * self.stride, c, h, w)


def space_to_depth_condition(cond: torch.Tensor) -> torch.Tensor:
    """(B, 3, F, H, W) -> (B, ceil(F/4), 768, H/8, W/8), front-padding F to a multiple of 4 with frame 0.

    Channel order (c, frame, row, col), c outermost, as the official PixelShuffle3d(4, 8, 8)."""
    b, c, f, h, w = cond.shape
    if h % COND_PIXELS or w % COND_PIXELS:
        raise ValueError(f"conditioning frames must have sides divisible by {COND_PIXELS}, got {h}x{w}")
    if f % COND_FRAMES:
        cond = torch.cat([cond[:, :, :1].expand(-1, -1, COND_FRAMES - f % COND_FRAMES, -1, -1), cond], dim=2)
        f = cond.shape[2]
    x = cond.reshape(b, c, f // COND_FRAMES, COND_FRAMES, h // COND_PIXELS, COND_PIXELS, w // COND_PIXELS,
                     COND_PIXELS)
    x = x.permute(0, 2, 1, 3, 5, 7, 4, 6)
    return x.reshape(b, f // COND_FRAMES, c * COND_FRAMES * COND_PIXELS * COND_PIXELS, h // COND_PIXELS,
                     w // COND_PIXELS)


def condition_frames_needed(num_latents: int, first: bool) -> int:
    """LR frames a decode call of ``num_latents`` latents takes: 4 per latent, 3 fewer when it starts a stream."""
    return FRAMES_PER_LATENT * num_latents - (FRAMES_TO_TRIM if first else 0)


class TCDecoder(nn.Module):
    def __init__(self, channels=(512, 256, 128, 128), latent_channels: int = 16, operations=nn, device=None,
                 dtype=None):
        super().__init__()
        c0, c1, c2, c3 = channels
        kw = dict(device=device, dtype=dtype)

        def conv(n_in, n_out, bias=True):
            return operations.Conv2d(n_in, n_out, 3, padding=1, bias=bias, **kw)

        def mem(c):
            return [MemBlock(c, operations, **kw) for _ in range(3)]

        up = nn.Upsample(scale_factor=2, mode="nearest")
        self.latent_channels = latent_channels
        self.decoder = nn.Sequential(
            Clamp(), conv(COND_CHANNELS + latent_channels, c0), nn.ReLU(), conv(c0, c0, bias=False), nn.ReLU(),
            *mem(c0), up, TGrow(c0, 1, operations, **kw), conv(c0, c1, bias=False),
            *mem(c1), up, TGrow(c1, 2, operations, **kw), conv(c1, c2, bias=False),
            *mem(c2), up, TGrow(c2, 2, operations, **kw), conv(c2, c3, bias=False),
            nn.ReLU(), conv(c3, c3, bias=False), nn.ReLU(), conv(c3, 3),
        )
        self._memblocks = [i for i, layer in enumerate(self.decoder) if isinstance(layer, MemBlock)]

    def decode(self, latents: torch.Tensor, cond: torch.Tensor, state: TCDecoderState | None = None, *,
               sequential: bool = True, latents_per_batch: int | None = None
               ) -> tuple[torch.Tensor, TCDecoderState]:
        """Decode latents (B, C, T, h, w) with their LR frames (B, 3, F, 8h, 8w) in [-1, 1] to RGB in [-1, 1].

        F must be ``condition_frames_needed(T, first)``: 4T, or 4T - 3 when the call starts a stream (frame 0 is
        repeated in front, and the 3 warm-up frames it produces are dropped). Returns (B, 3, F, 8h, 8w) and the
        new state. ``sequential`` (default) runs one time step at a time, depth first, as the official tiny-long
        pipeline does: same bits, least memory. Otherwise all time steps of ``latents_per_batch`` latent frames
        (default: all) run through each layer together, each MemBlock's first past taken from the state: faster,
        more memory (4x the frames at the last stages), equal to the sequential result up to float rounding
        (convolutions of another batch size may round differently).
        """
        state = state or TCDecoderState()
        if latents.ndim != 5 or cond.ndim != 5:
            raise ValueError(f"latents (B, C, T, h, w) and conditioning (B, 3, F, H, W) expected, got "
                             f"{tuple(latents.shape)} and {tuple(cond.shape)}")
        b, _, t, h, w = latents.shape
        first = not state.started
        need = condition_frames_needed(t, first)
        if t < 1 or cond.shape[2] != need or cond.shape[0] != b or cond.shape[-2:] != (h * COND_PIXELS,
                                                                                      w * COND_PIXELS):
            raise ValueError(f"{t} latent frames of {h}x{w} need {need} conditioning frames of "
                             f"{h * COND_PIXELS}x{w * COND_PIXELS}, got {tuple(cond.shape)}")
        x = torch.cat([space_to_depth_condition(cond).to(latents.dtype), latents.transpose(1, 2)], dim=2)
        memory = list(state.memory) or [None] * len(self._memblocks)
        if sequential:
            frames = []
            for i in range(t):
                self._run_step(0, x[:, i], memory, frames)
            out = torch.stack(frames, dim=2)
        else:
            step = latents_per_batch or t
            pieces = [self._run_batch(x[:, i:i + step], memory) for i in range(0, t, step)]
            out = torch.cat(pieces, dim=2)
        if first:
            out = out[:, :, FRAMES_TO_TRIM:]
        return out.mul(2).sub(1), TCDecoderState(memory=tuple(memory), started=True)

    def _run_step(self, start: int, x: torch.Tensor, memory: list, out: list) -> None:
        for i in range(start, len(self.decoder)):
            layer = self.decoder[i]
            if isinstance(layer, MemBlock):
                k = self._memblocks.index(i)
                past = torch.zeros_like(x) if memory[k] is None else memory[k].to(x)
                memory[k] = x
                x = layer(x, past)
            elif isinstance(layer, TGrow):
                steps = layer(x).unflatten(0, (x.shape[0], layer.stride))
                for s in range(layer.stride):
                    self._run_step(i + 1, steps[:, s], memory, out)
                return
            else:
                x = layer(x)
        out.append(x)

    def _run_batch(self, x: torch.Tensor, memory: list) -> torch.Tensor:
        """x: (B, T, C, h, w); every time step of every layer at once, each MemBlock's first past seeded from
        ``memory`` (updated in place)."""
        b, t = x.shape[:2]
        x = x.flatten(0, 1)
        k = 0
        for layer in self.decoder:
            if isinstance(layer, MemBlock):
                steps = x.unflatten(0, (b, -1))
                first = torch.zeros_like(steps[:, 0]) if memory[k] is None else memory[k].to(steps)
                past = torch.cat([first.unsqueeze(1), steps[:, :-1]], dim=1).flatten(0, 1)
                memory[k] = steps[:, -1].clone()  # a view would keep the whole batch alive
                x = layer(x, past)
                k += 1
            else:
                x = layer(x)
        return x.unflatten(0, (b, -1)).transpose(1, 2)
