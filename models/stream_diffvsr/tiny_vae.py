"""Stream-DiffVSR's TemporalAutoencoderTiny: a TAESD-style autoencoder whose decoder blocks carry a
Temporal Processor Module (TPM) fed with encoder features of the warped previous output.

State-dict keys follow the official ``vae/diffusion_pytorch_model.safetensors``: ``encoder.layers.N.*`` and
``decoder.layers.N.*`` with ``nn.Sequential`` indices. Unlike the official module, the previous-frame features
are passed as arguments instead of being stored on the blocks, so the module holds no per-frame state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

TPM_POOL = 4  # the official block pools both feature maps 4x4 (floor) before the temporal Conv1d
TPM_WEIGHT = 0.1

# The activations the official block accepts (diffusers' get_activation).
ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU, "mish": nn.Mish}

# Defaults of the official class signature, used only for keys a config leaves out.
DEFAULTS = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "encoder_block_out_channels": (64, 64, 64, 64), "num_encoder_blocks": (1, 3, 3, 3),
    "decoder_block_out_channels": (64, 64, 64, 64), "num_decoder_blocks": (3, 3, 3, 1),
    "act_fn": "relu", "upsample_fn": "nearest", "upsampling_scaling_factor": 2, "scaling_factor": 1.0,
}


def _activation(name) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"vae config: act_fn={name!r} is not supported (use one of {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[name]()


class TemporalAutoencoderTinyBlock(nn.Module):
    """conv-act-conv-act-conv residual block; given ``prev`` features, the TPM adds a temporal term."""

    def __init__(self, channels: int, act_fn: str = "relu", operations=nn, device=None, dtype=None):
        super().__init__()
        act = _activation(act_fn)
        conv = dict(kernel_size=3, padding=1, device=device, dtype=dtype)
        self.conv = nn.Sequential(
            operations.Conv2d(channels, channels, **conv), act,
            operations.Conv2d(channels, channels, **conv), act,
            operations.Conv2d(channels, channels, **conv),
        )
        self.alpha = nn.Parameter(torch.tensor(0.5, device=device, dtype=dtype))
        self.temporal_processor = nn.Sequential(
            operations.Conv1d(channels, channels, **conv), act,
            operations.Conv1d(channels, channels, **conv),
        )

    def forward(self, x: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
        features = self.conv(x)
        if prev is not None:
            features = features + TPM_WEIGHT * self.temporal_term(features, prev)
        # The official block's output activation is a ReLU whatever act_fn is.
        return F.relu(features + x)

    def temporal_term(self, current: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        if prev.shape != current.shape:
            raise ValueError(f"temporal features of shape {tuple(prev.shape)} do not match the block's feature map "
                             f"{tuple(current.shape)}; the previous output must be exactly the decoded size")
        b, c, h, w = current.shape
        if h < TPM_POOL or w < TPM_POOL:
            raise ValueError(f"the temporal module needs feature maps of at least {TPM_POOL}x{TPM_POOL}, got {h}x{w}")
        cur = F.avg_pool2d(current, TPM_POOL, TPM_POOL)
        old = F.avg_pool2d(prev.to(device=current.device, dtype=current.dtype), TPM_POOL, TPM_POOL)
        n = cur.shape[-2] * cur.shape[-1]
        # Current and previous are joined along one flattened axis, so the Conv1d also mixes across row ends
        # and across the boundary between the two frames (quirk Q12); reproduced as trained.
        seq = self.temporal_processor(torch.cat([cur.flatten(2), old.flatten(2)], dim=2))
        # ComfyUI's partial loading moves only leaf layers, so the block's own scalar follows the input here.
        alpha = self.alpha.to(device=seq.device, dtype=seq.dtype)
        fused = alpha * seq[:, :, :n] + (1 - alpha) * seq[:, :, n:]
        fused = fused.reshape(cur.shape)
        return F.interpolate(fused, size=(h, w), mode="bilinear", align_corners=False)


def _positive_int(config: dict, key: str) -> int:
    value = config.get(key, DEFAULTS[key])
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"vae config: {key}={value!r} must be a positive integer")
    return value


def _stages(config: dict, channels_key: str, blocks_key: str) -> list[tuple[int, int]]:
    channels = config.get(channels_key, DEFAULTS[channels_key])
    blocks = config.get(blocks_key, DEFAULTS[blocks_key])
    if not isinstance(channels, (list, tuple)) or not channels:
        raise ValueError(f"vae config: {channels_key}={channels!r} must be a non-empty list")
    if not isinstance(blocks, (list, tuple)) or len(blocks) != len(channels):
        raise ValueError(f"vae config: {blocks_key}={blocks!r} must be a list as long as {channels_key}={channels!r}")
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in channels):
        raise ValueError(f"vae config: {channels_key}={channels!r} must hold positive integers")
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in blocks):
        raise ValueError(f"vae config: {blocks_key}={blocks!r} must hold non-negative integers")
    if len(set(channels)) != 1:
        # The official stride/upsample convs map a stage's own channel count to itself, so a network with
        # changing widths builds but cannot run; such a checkpoint cannot exist.
        raise ValueError(f"vae config: {channels_key}={channels!r} must use one channel count for every stage")
    return list(zip(channels, blocks))


class TemporalAutoencoderTiny(nn.Module):
    def __init__(self, config: dict, operations=nn, device=None, dtype=None):
        super().__init__()
        act = config.get("act_fn", DEFAULTS["act_fn"])
        _activation(act)
        upsample = config.get("upsample_fn", DEFAULTS["upsample_fn"])
        if upsample != "nearest":
            raise ValueError(f"vae config: upsample_fn={upsample!r} is not supported (expected 'nearest')")
        scaling = config.get("scaling_factor", DEFAULTS["scaling_factor"])
        if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not (
                math.isfinite(scaling) and scaling > 0):
            raise ValueError(f"vae config: scaling_factor={scaling!r} must be a positive number")
        # The caller divides latents by this before decode() (the official pipeline does it outside the VAE).
        self.scaling_factor = float(scaling)
        in_ch, out_ch = _positive_int(config, "in_channels"), _positive_int(config, "out_channels")
        latent = _positive_int(config, "latent_channels")
        factor = _positive_int(config, "upsampling_scaling_factor")
        enc = _stages(config, "encoder_block_out_channels", "num_encoder_blocks")
        dec = _stages(config, "decoder_block_out_channels", "num_decoder_blocks")
        kw = dict(device=device, dtype=dtype)

        layers: list[nn.Module] = []
        for i, (ch, n) in enumerate(enc):
            if i == 0:
                layers.append(operations.Conv2d(in_ch, ch, 3, padding=1, **kw))
            else:
                layers.append(operations.Conv2d(ch, ch, 3, padding=1, stride=2, bias=False, **kw))
            layers += [TemporalAutoencoderTinyBlock(ch, act, operations, **kw) for _ in range(n)]
        layers.append(operations.Conv2d(enc[-1][0], latent, 3, padding=1, **kw))
        self.encoder = nn.Module()
        self.encoder.layers = nn.Sequential(*layers)

        layers = [operations.Conv2d(latent, dec[0][0], 3, padding=1, **kw), _activation(act)]
        for i, (ch, n) in enumerate(dec):
            last = i == len(dec) - 1
            layers += [TemporalAutoencoderTinyBlock(ch, act, operations, **kw) for _ in range(n)]
            if not last:
                layers.append(nn.Upsample(scale_factor=factor, mode="nearest"))
            layers.append(operations.Conv2d(ch, out_ch if last else ch, 3, padding=1, bias=last, **kw))
        self.decoder = nn.Module()
        self.decoder.layers = nn.Sequential(*layers)

    @property
    def num_decoder_temporal_blocks(self) -> int:
        return sum(isinstance(m, TemporalAutoencoderTinyBlock) for m in self.decoder.layers)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Plain TAESD encoding of an image in [-1, 1]."""
        return self.encoder.layers(x.add(1).div(2))

    def encode_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of every encoder block, in order, computed from ``x`` as is.

        The official feature path skips the encoder's usual [-1,1]->[0,1] scaling (quirk Q4); the TPM weights
        were trained on these features, so it is reproduced.
        """
        blocks_left = sum(isinstance(m, TemporalAutoencoderTinyBlock) for m in self.encoder.layers)
        features = []
        for layer in self.encoder.layers:
            if not blocks_left:
                break  # the latent conv after the last block is not part of the feature path
            x = layer(x)
            if isinstance(layer, TemporalAutoencoderTinyBlock):
                features.append(x)
                blocks_left -= 1
        return features

    def decode(self, z: torch.Tensor, temporal_features: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Decode a latent to an image in roughly [-1, 1] (not clamped: the engine warps the raw output).

        ``temporal_features`` go to the decoder blocks in execution order; the engine passes
        ``encode_features(warped_previous)[::-1]`` so resolutions line up. Like the official decoder, features
        beyond the number of decoder blocks are not used. ``None`` decodes without the TPM.
        """
        if temporal_features is not None and len(temporal_features) < self.num_decoder_temporal_blocks:
            raise ValueError(f"decode() got {len(temporal_features)} temporal feature maps for "
                             f"{self.num_decoder_temporal_blocks} decoder blocks")
        x = torch.tanh(z / 3) * 3
        k = 0
        for layer in self.decoder.layers:
            if isinstance(layer, TemporalAutoencoderTinyBlock):
                x = layer(x, None if temporal_features is None else temporal_features[k])
                k += 1
            else:
                x = layer(x)
        return x.mul(2).sub(1)
