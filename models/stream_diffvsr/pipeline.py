"""The loaded Stream-DiffVSR model: denoiser, ARTG ControlNet, temporal tiny autoencoder and the prompt embedding."""

from __future__ import annotations

import torch
from torch import nn

from .scheduler import DDIMScheduler


class StreamDiffVSRPipeline(nn.Module):
    """Container of the Stream-DiffVSR components, as one module so ComfyUI's ModelPatcher can manage it.

    The text encoder is not part of it: the official pipeline only ever encodes the empty prompt, so
    ``prompt_embeds`` (1, 77, C) holds that constant, computed once in float32 when the weights are loaded.
    """

    def __init__(self, unet: nn.Module, controlnet: nn.Module, vae: nn.Module, prompt_embeds: torch.Tensor,
                 scheduler_config: dict, configs: dict | None = None):
        super().__init__()
        self.unet = unet
        self.controlnet = controlnet
        self.vae = vae
        self.register_buffer("prompt_embeds", prompt_embeds.detach().to(torch.float32))
        self.scheduler_config = dict(scheduler_config)
        self.scheduler = DDIMScheduler(self.scheduler_config)
        # The component configs, kept so the pipeline can be written back to a single file.
        self.configs = dict(configs or {})

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def latent_channels(self) -> int:
        return int(self.configs.get("vae", {}).get("latent_channels", 4))

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.configs.get("vae", {}).get("scaling_factor", 1.0))
