"""Stream-DiffVSR's ARTG ControlNet (diffusers ``ControlNetModel`` key layout).

It sees the same 7-channel input as the UNet plus the warped previous output at the output resolution
(``controlnet_cond``), which its conditioning embedding brings down to the latent size; it returns one residual
per UNet skip tensor and one for the mid block.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .unet import BlockSettings, DownPath

_CONTROLNET_KEYS = {"conditioning_channels", "conditioning_embedding_out_channels",
                    "controlnet_conditioning_channel_order", "global_pool_conditions"}


class ConditioningEmbedding(nn.Module):
    """Brings ``controlnet_cond`` to the latent size: one stride-2 conv per entry after the first."""

    def __init__(self, in_ch: int, out_ch: int, channels: list[int], operations=nn, device=None, dtype=None):
        super().__init__()
        kw = dict(kernel_size=3, padding=1, device=device, dtype=dtype)
        self.conv_in = operations.Conv2d(in_ch, channels[0], **kw)
        blocks = []
        for cin, cout in zip(channels[:-1], channels[1:]):
            blocks.append(operations.Conv2d(cin, cin, **kw))
            blocks.append(operations.Conv2d(cin, cout, stride=2, **kw))
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = operations.Conv2d(channels[-1], out_ch, **kw)

    def forward(self, x):
        x = F.silu(self.conv_in(x))
        for block in self.blocks:
            x = F.silu(block(x))
        return self.conv_out(x)


class ControlNet(DownPath):
    """``forward(sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale)`` returns
    ``(down_residuals, mid_residual)`` for ``UNet.forward``."""

    def __init__(self, config: dict, operations=nn, device=None, dtype=None):
        for key, expected in (("controlnet_conditioning_channel_order", "rgb"), ("global_pool_conditions", False)):
            if config.get(key, expected) != expected:
                raise ValueError(f"{key}={config[key]!r} is not supported (this model family uses {expected!r})")
        embedding_channels = [int(c) for c in config.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)]
        if not embedding_channels:
            raise ValueError("conditioning_embedding_out_channels must not be empty")
        s = BlockSettings(config, extra_keys=_CONTROLNET_KEYS)
        super().__init__(s, operations, device, dtype)
        self.controlnet_cond_embedding = ConditioningEmbedding(
            int(config.get("conditioning_channels") or 3), s.channels[0], embedding_channels,
            operations, device, dtype)
        # One 1x1 conv per UNet skip tensor, in the order run_down_blocks returns them (conv_in output first).
        skip_channels = [s.channels[0]]
        for i, block in enumerate(self.down_blocks):
            skip_channels += [s.channels[i]] * (len(block.resnets) + (block.downsamplers is not None))
        kw = dict(device=device, dtype=dtype)
        self.controlnet_down_blocks = nn.ModuleList([operations.Conv2d(c, c, 1, **kw) for c in skip_channels])
        self.controlnet_mid_block = operations.Conv2d(s.channels[-1], s.channels[-1], 1, **kw)
        self.number_blocks()

    def embed_condition(self, controlnet_cond):
        """The conditioning embedding: it depends on ``controlnet_cond`` only, so a caller that runs several steps
        with one condition computes it once and passes it as ``cond_embedding``."""
        return self.controlnet_cond_embedding(controlnet_cond)

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond=None, conditioning_scale: float = 1.0,
                cond_embedding=None):
        """``timestep`` may be a ``StepEmbedding`` and ``encoder_hidden_states`` a ``PromptKV`` (see unet.py);
        ``cond_embedding`` replaces ``controlnet_cond`` with its ``embed_condition``."""
        temb = self.embed_time(timestep, sample)
        if cond_embedding is None:
            cond_embedding = self.embed_condition(controlnet_cond)
        x = self.conv_in(sample) + cond_embedding
        x, skips = self.run_down_blocks(x, temb, encoder_hidden_states)
        x = self.mid_block(x, temb, encoder_hidden_states)
        down = [conv(skip) for conv, skip in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(x)
        if conditioning_scale != 1:  # x * 1.0 is x: the official scale (1.0) costs no pass over the residuals
            down = [d * conditioning_scale for d in down]
            mid = mid * conditioning_scale
        return down, mid
