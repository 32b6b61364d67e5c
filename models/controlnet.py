"""Stream-DiffVSR's ARTG ControlNet (diffusers ``ControlNetModel`` key layout).

It sees the same 7-channel input as the UNet plus the warped previous output at the output resolution
(``controlnet_cond``), which its conditioning embedding brings down to the latent size; it returns one residual
per UNet skip tensor and one for the mid block.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .unet import DownPath


class ConditioningEmbedding(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, channels: list[int], operations, device, dtype):
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


class ControlNet(nn.Module, DownPath):
    def __init__(self, config: dict, operations=nn, device=None, dtype=None):
        super().__init__()
        s = self.build_down_path(config, operations, device, dtype)
        self.controlnet_cond_embedding = ConditioningEmbedding(
            int(config.get("conditioning_channels", 3)), s.channels[0],
            [int(c) for c in config.get("conditioning_embedding_out_channels", (16, 32, 96, 256))],
            operations, device, dtype)
        zero_convs = []
        for block in self.down_blocks:
            channels = block.resnets[0].conv1.out_channels
            zero_convs += [channels] * (len(block.resnets) + (block.downsamplers is not None))
        zero_convs.insert(0, s.channels[0])  # the conv_in output is a skip tensor too
        kw = dict(device=device, dtype=dtype)
        self.controlnet_down_blocks = nn.ModuleList([operations.Conv2d(c, c, 1, **kw) for c in zero_convs])
        self.controlnet_mid_block = operations.Conv2d(s.channels[-1], s.channels[-1], 1, **kw)

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale: float = 1.0):
        temb = self.time_conditioning(timestep, sample)
        x = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond)
        x, skips = self.run_down_path(x, temb, encoder_hidden_states)
        x = self.mid_block(x, temb, encoder_hidden_states)
        down = [conv(s) * conditioning_scale for conv, s in zip(self.controlnet_down_blocks, skips)]
        return down, self.controlnet_mid_block(x) * conditioning_scale
