"""Stream-DiffVSR's TemporalAutoencoderTiny: a TAESD-style autoencoder whose decoder blocks carry a
Temporal Processor Module (TPM) fed with encoder features of the warped previous output.

State-dict keys follow the official ``vae/diffusion_pytorch_model.safetensors``: ``encoder.layers.N.*`` and
``decoder.layers.N.*`` with ``nn.Sequential`` indices. Unlike the official module, the previous-frame features
are passed as arguments instead of being stored on the blocks, so the module holds no per-frame state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TPM_POOL = 4  # the official block pools both feature maps 4x4 before the temporal Conv1d
TPM_WEIGHT = 0.1


def _activation(name: str) -> nn.Module:
    acts = {"relu": nn.ReLU, "silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU, "mish": nn.Mish}
    if name not in acts:
        raise ValueError(f"vae config: act_fn={name!r} is not supported (use one of {sorted(acts)})")
    return acts[name]()


class TemporalAutoencoderTinyBlock(nn.Module):
    """conv-act-conv-act-conv residual block; with ``prev`` features, the TPM adds a temporal term."""

    def __init__(self, channels: int, act_fn: str, operations=nn, device=None, dtype=None):
        super().__init__()
        conv = dict(kernel_size=3, padding=1, device=device, dtype=dtype)
        self.conv = nn.Sequential(
            operations.Conv2d(channels, channels, **conv), _activation(act_fn),
            operations.Conv2d(channels, channels, **conv), _activation(act_fn),
            operations.Conv2d(channels, channels, **conv),
        )
        self.alpha = nn.Parameter(torch.tensor(0.5, device=device, dtype=dtype))
        self.temporal_processor = nn.Sequential(
            operations.Conv1d(channels, channels, 3, padding=1, device=device, dtype=dtype), _activation(act_fn),
            operations.Conv1d(channels, channels, 3, padding=1, device=device, dtype=dtype),
        )

    def forward(self, x: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
        features = self.conv(x)
        if prev is not None:
            features = features + TPM_WEIGHT * self.temporal_term(features, prev)
        return F.relu(features + x)

    def temporal_term(self, current: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        b, c, h, w = current.shape
        cur = F.avg_pool2d(current, TPM_POOL, TPM_POOL)
        old = F.avg_pool2d(prev.to(current.dtype), TPM_POOL, TPM_POOL)
        ph, pw = cur.shape[-2:]
        # Current and previous are joined along one flattened axis, so the Conv1d also mixes across row ends
        # and across the boundary between the two frames (quirk Q12); reproduced as trained.
        seq = self.temporal_processor(torch.cat([cur.reshape(b, c, -1), old.reshape(b, c, -1)], dim=2))
        alpha = self.alpha.to(device=seq.device, dtype=seq.dtype)
        n = ph * pw
        fused = alpha * seq[:, :, :n].reshape(b, c, ph, pw) + (1 - alpha) * seq[:, :, -n:].reshape(b, c, ph, pw)
        return F.interpolate(fused, size=(h, w), mode="bilinear", align_corners=False)


def _check_config(config: dict) -> None:
    for key, expected in (("upsample_fn", "nearest"),):
        value = config.get(key, expected)
        if value != expected:
            raise ValueError(f"vae config: {key}={value!r} is not supported (expected {expected!r})")
    for key in ("encoder_block_out_channels", "decoder_block_out_channels"):
        channels = list(config.get(key, [64, 64, 64]))
        if len(set(channels)) != 1:
            raise ValueError(f"vae config: {key}={channels} must use one channel count for every block")


class TemporalAutoencoderTiny(nn.Module):
    def __init__(self, config: dict, operations=nn, device=None, dtype=None):
        super().__init__()
        _check_config(config)
        act = config.get("act_fn", "relu")
        in_ch, out_ch = int(config.get("in_channels", 3)), int(config.get("out_channels", 3))
        latent = int(config.get("latent_channels", 4))
        factor = int(config.get("upsampling_scaling_factor", 2))
        kw = dict(device=device, dtype=dtype)

        enc_ch = list(config.get("encoder_block_out_channels", [64, 64, 64]))
        enc_blocks = list(config.get("num_encoder_blocks", [1, 3, 3]))
        layers: list[nn.Module] = []
        for i, (ch, n) in enumerate(zip(enc_ch, enc_blocks)):
            if i == 0:
                layers.append(operations.Conv2d(in_ch, ch, 3, padding=1, **kw))
            else:
                layers.append(operations.Conv2d(ch, ch, 3, padding=1, stride=2, bias=False, **kw))
            layers += [TemporalAutoencoderTinyBlock(ch, act, operations, **kw) for _ in range(n)]
        layers.append(operations.Conv2d(enc_ch[-1], latent, 3, padding=1, **kw))
        self.encoder = nn.Module()
        self.encoder.layers = nn.Sequential(*layers)

        dec_ch = list(config.get("decoder_block_out_channels", [64, 64, 64]))
        dec_blocks = list(config.get("num_decoder_blocks", [3, 3, 1]))
        layers = [operations.Conv2d(latent, dec_ch[0], 3, padding=1, **kw), _activation(act)]
        for i, (ch, n) in enumerate(zip(dec_ch, dec_blocks)):
            last = i == len(dec_blocks) - 1
            layers += [TemporalAutoencoderTinyBlock(ch, act, operations, **kw) for _ in range(n)]
            if not last:
                layers.append(nn.Upsample(scale_factor=factor, mode="nearest"))
            layers.append(operations.Conv2d(ch, out_ch if last else ch, 3, padding=1, bias=last, **kw))
        self.decoder = nn.Module()
        self.decoder.layers = nn.Sequential(*layers)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Plain TAESD encoding of an image in [-1, 1]."""
        return self.encoder.layers(x.add(1).div(2))

    def encode_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of every encoder block, run on ``x`` as is.

        The official feature path skips the encoder's usual [-1,1]->[0,1] scaling (quirk Q4); the weights were
        trained with it, so it is reproduced.
        """
        features = []
        blocks_left = sum(isinstance(m, TemporalAutoencoderTinyBlock) for m in self.encoder.layers)
        for layer in self.encoder.layers:
            x = layer(x)
            if isinstance(layer, TemporalAutoencoderTinyBlock):
                features.append(x)
                blocks_left -= 1
                if blocks_left == 0:
                    break
        return features

    def decode(self, z: torch.Tensor, temporal_features: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Decode a latent to an image in roughly [-1, 1] (not clamped).

        ``temporal_features`` go to the decoder blocks in execution order; the engine passes
        ``encode_features(warped_previous)[::-1]`` so resolutions line up.
        """
        x = torch.tanh(z / 3) * 3
        features = iter(temporal_features) if temporal_features is not None else None
        for layer in self.decoder.layers:
            if isinstance(layer, TemporalAutoencoderTinyBlock):
                x = layer(x, next(features) if features is not None else None)
            else:
                x = layer(x)
        return x.mul(2).sub(1)
